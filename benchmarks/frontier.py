"""Fidelity against measured decode speed: byte budgets x allocations, on both real models.

For SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct on the CPU, in float32 or, with
``--dtype bfloat16``, cast to bfloat16 after calibrating in float32 (the best dense decode
there, docs/half_precision.md; fidelity and speed then against the bfloat16 model dense):

1. calibrate on TruthfulQA questions 400-799 (the dense model's own greedy answers, every unit
   kind) and measure the greedy (TEAL) and attribution allocation tables on its first batches;
2. fidelity on questions 0-99: the dense model's greedy answers teacher-forced through the
   sparse model with the prompt dense and the answer's tokens sparse (as decoding runs them):
   top-1 agreement and KL(dense || sparse), and the realized share of decode bytes skipped,
   whose bound is ``1 / (1 - skipped)``;
3. speed: batch-1 greedy decode (32 new tokens) of the sparse model against a separate dense
   copy in the same run, median of per-repetition ratios, in two runtimes: eager
   ``generate`` (whole runs alternating), and the tuned compiled loop
   (``benchmarks.common.tuned_decode``: the best dense decode we have, compiled with the same
   options on both sides; the two decodes' steps alternate token by token). The headline is
   decode tokens/s, the 31 steps after the dense prompt's forward; the end-to-end ratio,
   the prompt included, is kept beside it;

at each budget (share of the decode bytes to skip) for each allocation (uniform, greedy,
attribution), and with ``--lm-head L`` a second set of points that also drops the share ``L``
of the lm_head's input per token (``--lm-head-basis rotated``, the default: in the calibrated
eigenbasis of that input; ``channels``: its plain channels), the 64 largest approximate logits
recomputed exactly. Prints a table, writes benchmarks/results/frontier.json and the plot
docs/frontier.png (top-1 agreement against decode speedup, one line per allocation and
runtime); in bfloat16 ``frontier_bfloat16.json`` and ``docs/frontier_bfloat16.png``.

    python benchmarks/frontier.py [--models smollm2 qwen] [--budgets 0.1 0.2 0.3 0.4 0.5]
        [--allocations uniform greedy attribution] [--runtimes eager tuned] [--repeats 5]
        [--lm-head 0.8 [--lm-head-basis rotated|channels]] [--resume [--remeasure]]
        [--dtype bfloat16]

The fidelity points are saved before the speed stage starts and each speed as it is measured;
``--resume`` reuses them (same checkpoint and rows) and measures only what is missing (a
subset of allocations or runtimes keeps the saved run's other points). Each
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    DTYPES,
    TRUTHFULQA,
    TUNED_LOOP,
    calibrated_checkpoint,
    decode_options_record,
    dtype_suffix,
    frontier_checkpoint_path,
    greedy_decode,
    interleaved_decode,
    paired_decode,
    results_path,
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
#: runtime -> the decode maker, and how a candidate is timed against the dense baseline: the
#: tuned loop's steps alternate token by token, ``generate`` runs alternate whole.
DECODES = {"eager": greedy_decode, "tuned": tuned_decode}
TIMERS = {
    "eager": paired_decode,
    "tuned": lambda base, cand, repeats, tokens: interleaved_decode(base, cand, repeats),
}


def truthfulqa_data(tokenizer, calib: range, evaluation: range, batch_size: int) -> QADataModule:
    """TruthfulQA with the frontier's calibration and evaluation rows."""
    return QADataModule(
        TRUTHFULQA,
        "truthfulqa",
        calibration_rows=(calib.start, calib.stop),
        evaluation_rows=(evaluation.start, evaluation.stop),
        batch_size=batch_size,
        tokenizer=tokenizer,
    )


def fidelity(module, tokenizer, settings, calib: range, evaluation: range, batch_size: int):
    """One row per setting: top-1 agreement, KL and realized sparsity on held-out questions."""
    import lightning as L

    data = truthfulqa_data(tokenizer, calib, evaluation, batch_size)
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
    if not settings:
        return []
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
                "lm_head": setting.lm_head,
                "lm_head_candidates": setting.lm_head_candidates,
                "lm_head_basis": setting.lm_head_basis,
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


def key_of(point: dict | SparsityConfig) -> tuple:
    """What identifies a point: its allocation, budget, lm_head level (0 before it existed)
    and, when that is not 0, the lm_head's basis (points before it existed: channels)."""
    if isinstance(point, SparsityConfig):
        level, basis = point.lm_head, point.lm_head_basis
        return point.allocation, point.budget, level, basis if level else None
    level, basis = point.get("lm_head", 0.0), point.get("lm_head_basis", "channels")
    return point["allocation"], point["budget"], level, basis if level else None


def lm_head_suffix(level: float, basis: str | None = None) -> str:
    """How points and settings name their lm_head level (nothing when it is dense) and a
    rotated basis."""
    if not level:
        return ""
    return f" + lm_head {level:.2f}" + (" rotated" if basis == "rotated" else "")


def series(point: dict) -> str:
    """The line a point belongs to: its allocation, with the lm_head level when it has one."""
    allocation, _, level, basis = key_of(point)
    return allocation + lm_head_suffix(level, basis)


def saved_points(saved: dict | None, result: dict) -> list[dict] | None:
    """``--resume``: all the saved run's points, with the speeds it measured, when it was run
    on the same checkpoint and rows; ``None`` otherwise."""
    same = ("model", "checkpoint", "calibration_rows", "evaluation_rows")
    if saved is None or any(saved.get(k) != result[k] for k in same):
        return None
    if saved.get("dtype", "float32") != result["dtype"]:  # runs before --dtype: float32
        return None
    print("--resume: fidelity (and any speeds) from the saved run, where it has them")
    return [dict(p) for p in saved.get("points", [])]


def speed(module, baseline, prompt, setting, runtime: str, new_tokens: int, repeats: int):
    """Decode tokens/s of one setting against the dense ``baseline`` run, in one runtime."""
    module.set_sparsity(setting)
    candidate = DECODES[runtime](module.model, prompt, new_tokens)
    started = time.time()
    result = TIMERS[runtime](baseline, candidate, repeats, new_tokens)
    result["seconds"] = round(time.time() - started, 1)
    print(
        f"  {runtime} {label(setting)}: decode {result['decode_speedup']:.2f}x "
        f"(dense {result['dense_decode_tokens_per_s']:.1f} tok/s), "
        f"end to end {result['speedup']:.2f}x",
        flush=True,
    )
    return result


def earlier(point: dict, runtime: str) -> None:
    """``--remeasure``: move ``point``'s speeds in ``runtime`` to its ``earlier`` list."""
    speeds = {k: point.pop(k) for k in list(point) if k.endswith(f"_{runtime}")}
    if speeds:
        point.setdefault("earlier", []).append(speeds)


def label(setting: SparsityConfig) -> str:
    if setting.is_dense:
        return "dense"
    suffix = lm_head_suffix(setting.lm_head, setting.lm_head_basis)
    return f"{setting.allocation} {setting.budget:.2f}{suffix}"


def at_agreement(points: list[dict], target: float, key: str) -> float | None:
    """``key`` interpolated where top-1 agreement crosses ``target`` (points by budget)."""
    ordered = sorted(points, key=lambda p: p["budget"])
    for low, high in itertools.pairwise(ordered):
        a, b = low["top1_agreement"], high["top1_agreement"]
        if a >= target >= b and a != b:
            t = (a - target) / (a - b)
            return low[key] + t * (high[key] - low[key])
    return None


#: What each runtime's speed is read as: the decode steps (the headline) and whole runs.
SPEED_KINDS = ("decode_speedup", "speedup")


def at_top1(points: list[dict], lines, target: float = 0.90) -> dict:
    """Per line (:func:`series`): the byte bound and each measured speed where top-1 crosses
    ``target``."""
    out = {}
    for line in lines:
        mine = [p for p in points if series(p) == line]
        keys = [k for k in mine[0] if k.startswith(SPEED_KINDS) and all(k in p for p in mine)]
        out[line] = {key: at_agreement(mine, target, key) for key in ["byte_bound", *keys]}
    return out


def table(result: dict) -> str:
    """A markdown table of one model's points: decode-step speedups against the same runtime's
    dense decode (the tuned loop's end-to-end ratio beside them), then the dense tok/s range."""
    columns = ("decode_speedup_eager", "decode_speedup_tuned", "speedup_tuned")
    lines = [
        "| allocation | budget | top-1 | KL | bytes skipped | bound | eager | tuned "
        "| tuned, end to end |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in sorted(result["points"], key=lambda p: (series(p), p["budget"])):
        speeds = [f"{p[k]:.2f}x" if k in p else "-" for k in columns]
        lines.append(
            f"| {series(p)} | {p['budget']:.2f} | {p['top1_agreement']:.3f} | "
            f"{p['kl']:.3f} | {p['decode_bytes_skipped']:.3f} | {p['byte_bound']:.2f}x | "
            + " | ".join(speeds)
            + " |"
        )
    tokens = []
    for runtime in ("eager", "tuned"):
        key = f"dense_decode_tokens_per_s_{runtime}"
        seen = [p[key] for p in result["points"] if key in p]
        if seen:
            tokens.append(f"{runtime} {min(seen):.1f}-{max(seen):.1f} tok/s")
    return "\n".join(lines) + (f"\n\nDense decode: {', '.join(tokens)}." if tokens else "")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        result = report["models"][name]
        lines = result.get("series") or result["allocations"]  # runs before lm_head points
        for color, allocation in enumerate(lines):
            points = sorted(
                (p for p in result["points"] if series(p) == allocation),
                key=lambda p: p["budget"],
            )
            for runtime, style in (("tuned", "-o"), ("eager", ":x")):
                key = f"decode_speedup_{runtime}"
                timed = [p for p in points if key in p]  # a partial re-run times some only
                if timed:
                    ax.plot(
                        [1.0] + [p[key] for p in timed],
                        [1.0] + [p["top1_agreement"] for p in timed],
                        style,
                        color=f"C{color}",
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
            xlabel="decode-step speedup over dense (grey: byte bound)",
            ylabel="top-1 agreement with dense",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{report.get('dtype', 'float32')}, budgets {report['budgets']}; TruthfulQA calib "
        f"400-799, eval 0-99; {report['date']}",
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
    parser.add_argument(
        "--lm-head",
        nargs="+",
        type=float,
        default=[0.0],
        help="lm_head input levels (each a set of points beside the budgets); 0: lm_head dense",
    )
    parser.add_argument("--lm-head-candidates", type=int, default=64)
    parser.add_argument(
        "--lm-head-basis",
        choices=("rotated", "channels"),
        default="rotated",
        help="where the lm_head drops channels (rotated: the calibrated eigenbasis of its input)",
    )
    parser.add_argument("--allocation-batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="the type both sides decode in (calibration runs in float32 either way)",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: by --dtype")
    parser.add_argument("--plot", type=Path, default=None, help="default: by --dtype")
    parser.add_argument(
        "--report-only", action="store_true", help="print the tables and plot from --out; no run"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the points (fidelity and speeds) saved in --out for the same checkpoint and "
        "rows; measure only what is missing",
    )
    parser.add_argument(
        "--remeasure",
        action="store_true",
        help="with --resume: measure the chosen settings' speeds again; the saved ones move to "
        "each point's 'earlier' list",
    )
    args = parser.parse_args()
    if args.remeasure and not args.resume:
        parser.error("--remeasure needs --resume (it re-times saved points)")
    args.out = args.out or results_path("frontier", dtype=args.dtype)
    args.plot = args.plot or ROOT / f"docs/frontier{dtype_suffix(args.dtype)}.png"
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
        "budgets": args.budgets,
        "repeats": args.repeats,
        "new_tokens": args.new_tokens,
        "tuned_options": decode_options_record(),
        "tuned_loop": TUNED_LOOP,
        "prompt": PROMPT,
        "dtype": args.dtype,
        "models": {},
    }
    if args.out.is_file():  # keep the other models' results of an earlier run
        report["models"] = json.loads(args.out.read_text()).get("models", {})
    for key in args.models:
        name, load = MODELS[key]
        started = time.time()
        model, tokenizer = load()
        path = frontier_checkpoint_path(key, calib)
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
        model = model.to(getattr(torch, args.dtype))  # after calibrating, which needs float32
        module = SparseActivationModule.from_pretrained(model, path, tokenizer=tokenizer)
        settings = [
            SparsityConfig(
                budget=b,
                allocation=a,
                lm_head=h,
                lm_head_candidates=args.lm_head_candidates,
                lm_head_basis=args.lm_head_basis,
            )
            for h in args.lm_head
            for a in args.allocations
            for b in args.budgets
        ]
        result = {
            "model": name,
            "checkpoint": str(path.relative_to(ROOT)),
            "calibration_rows": [calib.start, calib.stop],
            "evaluation_rows": [evaluation.start, evaluation.stop],
            "dtype": args.dtype,
        }
        every = saved_points(report["models"].get(key), result) if args.resume else None
        if every:  # a resumed subset keeps the saved run's other points and notes
            saved = report["models"][key]
            result = {
                **saved,
                **result,
                "fidelity_source": saved.get("fidelity_source", "--resume"),
            }
        every = every or []
        known = {key_of(p) for p in every}
        missing = [s for s in settings if key_of(s) not in known]
        every += fidelity_points(module, tokenizer, missing, calib, evaluation, args, name)
        where = {key_of(p): p for p in every}
        points = [where[key_of(s)] for s in settings]
        result["series"] = list(dict.fromkeys(series(p) for p in every))
        report["models"][key] = result | {"points": every}
        save_report(report, args.out)  # fidelity is kept should the speed stage fail
        evaluated = time.time()
        dense = copy.deepcopy(model)  # a separate plain model: nothing switches in timed runs
        prompt = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        for runtime in args.runtimes:
            if args.remeasure:
                for point in points:
                    earlier(point, runtime)
            todo = [
                (s, p)
                for s, p in zip(settings, points, strict=True)
                if f"decode_speedup_{runtime}" not in p
            ]
            if not todo:
                continue
            baseline = DECODES[runtime](dense, prompt, args.new_tokens)
            for setting, point in todo:
                measured = speed(
                    module, baseline, prompt, setting, runtime, args.new_tokens, args.repeats
                )
                point.update({f"{k}_{runtime}": v for k, v in measured.items() if k != "seconds"})
                save_report(report, args.out)  # each point as measured: a stopped run resumes
            module.disable_sparsity()
        report["models"][key] = result | {
            "points": every,
            "at_top1_0.90": at_top1(every, result["series"]),
            "seconds": {
                "calibration": round(calibrated - started),
                "fidelity": round(evaluated - calibrated),
                "speed": round(time.time() - evaluated),
            },
        }
        # A resumed subset measures some budgets; the report holds every model's points.
        all_points = [p for entry in report["models"].values() for p in entry["points"]]
        report["budgets"] = sorted({p["budget"] for p in all_points})
        saved = save_report(report, args.out)  # stamped: its date titles the plot
        del dense, module, model
    plot(saved, args.plot)
    print(f"plot -> {args.plot}")
    for result in report["models"].values():
        print(f"\n{result['model']}\n\n{table(result)}")
        print(f"at top-1 0.90 -> {json.dumps(result['at_top1_0.90'])}")


if __name__ == "__main__":
    main()
