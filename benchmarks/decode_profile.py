"""Where batch-1 decode time goes: matrix multiplies versus everything else (issue 5, item 3).

Profiles 32 greedy decode steps of dense SmolLM2-135M-Instruct, of its compacted static-mask
model (50% of MLP neurons, heads group-balanced) and of ``mode="gate"`` at 50% of MLP neurons
with ``torch.profiler``, and prints the share of CPU time spent in matrix multiplies and the
top operators. The rest does not shrink with compaction, which caps the decode speedup below
the linear-layer FLOP bound; the gate path's gathers and top-k cost what its smaller matrix
multiplies save (see the README's Performance section).

    python benchmarks/decode_profile.py [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import STATIC_CHECKPOINT, STATIC_ROWS, calibrated_checkpoint  # noqa: E402
from sparse_lightning import SparseActivationModule, load_demo_model  # noqa: E402

MATMULS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    args = parser.parse_args()
    model, tokenizer = load_demo_model()
    checkpoint = calibrated_checkpoint(
        model, tokenizer, STATIC_ROWS, args.checkpoint or STATIC_CHECKPOINT
    )
    module = SparseActivationModule.from_pretrained(
        model, checkpoint, 0.5, heads=0.5, mode="static", tokenizer=tokenizer
    )
    compact = module.compact()
    module.disable_sparsity()
    ids = tokenizer("The lighthouse keeper climbed the stairs and", return_tensors="pt")
    for name, net in (("dense", module.model), ("compacted 50%", compact), ("gate 50%", None)):
        if net is None:
            module.set_sparsity(mlp=0.5, heads=0.0, mode="gate")
            net = module.model
        with torch.no_grad():
            net.generate(**ids, max_new_tokens=4, do_sample=False)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                net.generate(**ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e3
        matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / 1e3
        print(
            f"{name}: {total:.0f} ms CPU, matrix multiplies {matmul:.0f} ms "
            f"({matmul / total:.0%}), other {total - matmul:.0f} ms"
        )
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
        print("  " + ", ".join(f"{e.key} {e.self_cpu_time_total / 1e3:.0f} ms" for e in top))


if __name__ == "__main__":
    main()
