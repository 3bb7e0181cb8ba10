"""Fidelity against measured decode speed: byte budgets x allocations, on both real models.

For SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct (float32, CPU):

1. calibrate on TruthfulQA questions 400-799 (the dense model's own greedy answers, every unit
   kind) and measure the greedy (TEAL) and attribution allocation tables on its first batches;
2. fidelity on questions 0-99: the dense model's greedy answers teacher-forced through the
   sparse model with the prompt dense and the answer's tokens sparse (as decoding runs them):
   top-1 agreement and KL(dense || sparse), and the realized share of decode bytes skipped,
   whose bound is ``1 / (1 - skipped)``;
3. speed: batch-1 greedy decode (32 new tokens, prompt prefill included) of the sparse model
   against a separate dense copy in the same run, alternating, median of per-repetition
   ratios, in two runtimes: eager ``generate``, and the tuned compiled loop
   (``benchmarks.common.tuned_decode``: the best dense decode we have, compiled with the same
   options on both sides);

at each budget (share of the decode bytes to skip) for each allocation (uniform, greedy,
attribution). Prints a table, writes benchmarks/results/frontier.json and the plot
docs/frontier.png (top-1 agreement against tuned speedup, one line per allocation).

    python benchmarks/frontier.py [--models smollm2 qwen] [--budgets 0.1 0.2 0.3 0.4 0.5]
        [--allocations uniform greedy attribution] [--runtimes eager tuned] [--repeats 5]
        [--resume]

The fidelity points are saved before the speed stage starts and each speed as it is measured;
``--resume`` reuses them (same checkpoint and rows) and measures only what is missing. Each
tuned setting's frozen graph holds about one copy of the weights, which Dynamo keeps (even
``torch._dynamo.reset()`` did not return it): Qwen 0.5B fills 23 GB after about ten settings,
so its run is resumed in a fresh process.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    TRUTHFULQA,
    calibrated_checkpoint,
    decode_speed,
    greedy_decode,
    machine_info,
    paired_ratio,
    save_report,
    tuned_decode,
)
from benchmarks.offline_models import load_qwen  # noqa: E402
from sparse_lightning import (  # noqa: E402
    QADataModule,
    SparseActivationModule,
    SparsityConfig,
    load_demo_model,
)
from sparse_lightning.evaluation import run_sweep  # noqa: E402

MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct", load_demo_model),
    "qwen": ("Qwen2.5-Coder-0.5B-Instruct", load_qwen),
}
PROMPT = "Explain in a few sentences why the sky is blue."
#: runtime -> the decode closure maker that times it
DECODES = {"eager": greedy_decode, "tuned": tuned_decode}


def fidelity(module, tokenizer, settings, calib: range, evaluation: range, batch_size: int):
    """One row per setting: top-1 agreement, KL and realized sparsity on held-out questions."""
    import lightning as L

    data = QADataModule(
        TRUTHFULQA,
        "truthfulqa",
        calibration_rows=(calib.start, calib.stop),
        evaluation_rows=(evaluation.start, evaluation.stop),
        batch_size=batch_size,
        tokenizer=tokenizer,
    )
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    return run_sweep(
        module,
        data,
        settings,
        trainer=trainer,
        generation=False,
        multiple_choice=False,
        perplexity=False,  # one forward per setting and batch instead of two
    )


def fidelity_points(module, tokenizer, settings, calib, evaluation, args, name) -> list[dict]:
    """The fidelity stage: one point per setting, printed as it is measured."""
    rows = fidelity(
        module, tokenizer, [SparsityConfig(), *settings], calib, evaluation, args.batch_size
    )
    points = []
    for setting, row in zip(settings, rows[1:], strict=True):
        skipped = row["realized_decode_bytes_skipped"]
        points.append(
            {
                "allocation": setting.allocation,
                "budget": setting.budget,
                "top1_agreement": row["top1_agreement"],
                "kl": row["kl"],
                "decode_bytes_skipped": skipped,
                "byte_bound": 1.0 / (1.0 - skipped),
            }
        )
        print(
            f"{name} {label(setting)}: top-1 {row['top1_agreement']:.3f} KL {row['kl']:.3f} "
            f"bytes skipped {skipped:.3f} (bound {1 / (1 - skipped):.2f}x)",
            flush=True,
        )
    return points


def saved_points(saved: dict | None, result: dict, settings) -> list[dict] | None:
    """``--resume``: the saved run's points, with the speeds it measured, when it measured these
    settings on the same checkpoint and rows; ``None`` otherwise."""
    same = ("model", "checkpoint", "calibration_rows", "evaluation_rows")
    if saved is None or any(saved.get(k) != result[k] for k in same):
        return None
    wanted = [(s.allocation, s.budget) for s in settings]
    points = {(p["allocation"], p["budget"]): p for p in saved.get("points", [])}
    if not all(w in points for w in wanted):
        return None
    print("--resume: fidelity (and any speeds) from the saved run")
    return [dict(points[w]) for w in wanted]


def speed(module, baseline, prompt, setting, runtime: str, new_tokens: int, repeats: int):
    """Decode tokens/s of one setting against the dense ``baseline`` closure, in one runtime."""
    module.set_sparsity(setting)
    candidate = DECODES[runtime](module.model, prompt, new_tokens)
    started = time.time()
    result = decode_speed(paired_ratio(baseline, candidate, repeats), new_tokens)
    result["seconds"] = round(time.time() - started, 1)
    print(f"  {runtime} {label(setting)}: {result['speedup']:.2f}x", flush=True)
    return result


def label(setting: SparsityConfig) -> str:
    return "dense" if setting.is_dense else f"{setting.allocation} {setting.budget:.2f}"


def at_agreement(points: list[dict], target: float, key: str) -> float | None:
    """``key`` interpolated where top-1 agreement crosses ``target`` (points by budget)."""
    ordered = sorted(points, key=lambda p: p["budget"])
    for low, high in itertools.pairwise(ordered):
        a, b = low["top1_agreement"], high["top1_agreement"]
        if a >= target >= b and a != b:
            t = (a - target) / (a - b)
            return low[key] + t * (high[key] - low[key])
    return None


def table(result: dict) -> str:
    """A markdown table of one model's points (speedups against the same runtime, dense)."""
    lines = [
        "| allocation | budget | top-1 | KL | bytes skipped | bound | eager | tuned |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in sorted(result["points"], key=lambda p: (p["allocation"], p["budget"])):
        speeds = [f"{p[k]:.2f}x" if k in p else "-" for k in ("speedup_eager", "speedup_tuned")]
        lines.append(
            f"| {p['allocation']} | {p['budget']:.2f} | {p['top1_agreement']:.3f} | "
            f"{p['kl']:.3f} | {p['decode_bytes_skipped']:.3f} | {p['byte_bound']:.2f}x | "
            + " | ".join(speeds)
            + " |"
        )
    dense = next(iter(result["points"]), {})
    tokens = [
        f"{runtime} {dense[f'dense_tokens_per_s_{runtime}']:.1f} tok/s"
        for runtime in ("eager", "tuned")
        if f"dense_tokens_per_s_{runtime}" in dense
    ]
    return "\n".join(lines) + (f"\n\nDense: {', '.join(tokens)}." if tokens else "")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        result = report["models"][name]
        for allocation in result["allocations"]:
            points = sorted(
                (p for p in result["points"] if p["allocation"] == allocation),
                key=lambda p: p["budget"],
            )
            for runtime, style in (("tuned", "-o"), ("eager", ":x")):
                key = f"speedup_{runtime}"
                if points and key in points[0]:
                    ax.plot(
                        [1.0] + [p[key] for p in points],
                        [1.0] + [p["top1_agreement"] for p in points],
                        style,
                        label=f"{allocation} ({runtime})",
                    )
            if points:
                ax.plot(
                    [1.0] + [p["byte_bound"] for p in points],
                    [1.0] + [p["top1_agreement"] for p in points],
                    "--",
                    color="grey",
                    alpha=0.4,
                )
        ax.axhline(0.9, color="black", lw=0.6, ls=":")
        ax.axvline(1.3, color="black", lw=0.6, ls=":")
        ax.set(
            title=f"{result['model']}",
            xlabel="decode speedup over dense (grey: byte bound)",
            ylabel="top-1 agreement with dense",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"Budgets {report['budgets']}; TruthfulQA calib 400-799, eval 0-99; {report['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--allocations", nargs="+", default=["uniform", "greedy", "attribution"])
    parser.add_argument("--runtimes", nargs="+", choices=list(DECODES), default=list(DECODES))
    parser.add_argument("--calib", type=int, nargs=2, default=[400, 800])
    parser.add_argument("--eval", type=int, nargs=2, default=[0, 100])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--allocation-batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/frontier.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/frontier.png")
    parser.add_argument(
        "--report-only", action="store_true", help="print the tables and plot from --out; no run"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the points (fidelity and speeds) saved in --out for the same checkpoint and "
        "rows; measure only what is missing",
    )
    args = parser.parse_args()
    if args.report_only:
        report = json.loads(args.out.read_text())
        plot(report, args.plot)
        for result in report["models"].values():
            print(f"\n{result['model']}\n\n{table(result)}")
        return
    calib, evaluation = range(*args.calib), range(*args.eval)
    measured = tuple(a for a in args.allocations if a != "uniform")
    report: dict = {
        "benchmark": "frontier",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(),
        "budgets": args.budgets,
        "repeats": args.repeats,
        "new_tokens": args.new_tokens,
        "prompt": PROMPT,
        "models": {},
    }
    if args.out.is_file():  # keep the other models' results of an earlier run
        report["models"] = json.loads(args.out.read_text()).get("models", {})
    for key in args.models:
        name, load = MODELS[key]
        started = time.time()
        model, tokenizer = load()
        path = ROOT / "checkpoints" / f"{key}-frontier-{calib.start}-{calib.stop}.safetensors"
        calibrated_checkpoint(
            model,
            tokenizer,
            calib,
            path,
            args.batch_size,
            allocations=measured,
            allocation_batches=args.allocation_batches,
        )
        calibrated = time.time()
        module = SparseActivationModule.from_pretrained(model, path, tokenizer=tokenizer)
        settings = [
            SparsityConfig(budget=b, allocation=a) for a in args.allocations for b in args.budgets
        ]
        result = {
            "model": name,
            "checkpoint": str(path.relative_to(ROOT)),
            "calibration_rows": [calib.start, calib.stop],
            "evaluation_rows": [evaluation.start, evaluation.stop],
            "allocations": args.allocations,
        }
        points = saved_points(report["models"].get(key), result, settings) if args.resume else None
        if points is not None:
            result["fidelity_source"] = report["models"][key].get("fidelity_source", "--resume")
        else:
            points = fidelity_points(module, tokenizer, settings, calib, evaluation, args, name)
        report["models"][key] = result | {"points": points}
        save_report(report, args.out)  # fidelity is kept should the speed stage fail
        evaluated = time.time()
        dense = copy.deepcopy(model)  # a separate plain model: nothing switches in timed runs
        prompt = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        for runtime in args.runtimes:
            todo = [
                (s, p)
                for s, p in zip(settings, points, strict=True)
                if f"speedup_{runtime}" not in p
            ]
            if not todo:
                continue
            baseline = DECODES[runtime](dense, prompt, args.new_tokens)
            for setting, point in todo:
                measured = speed(
                    module, baseline, prompt, setting, runtime, args.new_tokens, args.repeats
                )
                point[f"speedup_{runtime}"] = measured["speedup"]
                point[f"tokens_per_s_{runtime}"] = measured["tokens_per_s"]
                point[f"dense_tokens_per_s_{runtime}"] = measured["dense_tokens_per_s"]
                save_report(report, args.out)  # each point as measured: a stopped run resumes
            module.disable_sparsity()
        report["models"][key] = result | {
            "points": points,
            "at_top1_0.90": {
                a: {
                    runtime: at_agreement(
                        [p for p in points if p["allocation"] == a], 0.90, f"speedup_{runtime}"
                    )
                    for runtime in args.runtimes
                }
                | {
                    "byte_bound": at_agreement(
                        [p for p in points if p["allocation"] == a], 0.90, "byte_bound"
                    )
                }
                for a in args.allocations
            },
            "seconds": {
                "calibration": round(calibrated - started),
                "fidelity": round(evaluated - calibrated),
                "speed": round(time.time() - evaluated),
            },
        }
        save_report(report, args.out)
        del dense, module, model
    plot(report, args.plot)
    print(f"plot -> {args.plot}")
    for result in report["models"].values():
        print(f"\n{result['model']}\n\n{table(result)}")
        print(f"at top-1 0.90 -> {json.dumps(result['at_top1_0.90'])}")


if __name__ == "__main__":
    main()
