"""Inference speed of compacted static masks, and the cost of the wrapper at sparsity 0.

SmolLM2-135M-Instruct, float32, CPU. For static masks at 50% and 80% of MLP neurons and heads
(heads group-balanced for GQA), the compacted stock model's

* prefill time of a batch of 8 x 128 tokens, and
* batch-1 greedy decode tokens/s (32 new tokens), eager and compiled (static KV cache and
  ``torch.compile`` of the decode step, transformers' own compiled generation),

against the dense model in the same run (alternating, median of per-repetition ratios), next
to the FLOP bound (dense / compact multiply-adds of all linear layers per token, lm_head
included). Also the forward time of a module loaded at sparsity 0 against the plain model (no
hooks are installed at 0).

    python benchmarks/static_inference.py [--repeats 5] [--checkpoint PATH]

Prints a table and writes benchmarks/results/static_inference.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    STATIC_CHECKPOINT,
    STATIC_ROWS,
    calibrated_checkpoint,
    greedy_decode,
    linear_macs,
    machine_info,
    paired_ratio,
    save_report,
)
from sparse_lightning import (  # noqa: E402
    SparseActivationModule,
    load_demo_model,
)

LEVELS = (0.5, 0.8)


def prefill(model: nn.Module, ids: torch.Tensor):
    def run() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "static_inference.json"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_demo_model()
    checkpoint = calibrated_checkpoint(
        model, tokenizer, STATIC_ROWS, args.checkpoint or STATIC_CHECKPOINT
    )
    ids = torch.randint(100, 40000, (8, 128))
    prompt = tokenizer("Write a short story about a lighthouse keeper.", return_tensors="pt")
    prompt = prompt["input_ids"]

    dense_macs = linear_macs(model)
    rows = []
    for level in LEVELS:
        module = SparseActivationModule.from_pretrained(
            model, checkpoint, level, mode="static", tokenizer=tokenizer
        )
        small = module.compact()
        module.disable_sparsity()
        bound = dense_macs / linear_macs(small)
        prefill_speedup, dense_prefill_s, prefill_s = paired_ratio(
            prefill(model, ids), prefill(small, ids), args.repeats
        )
        row = {
            "sparsity": level,
            "mlp_units_kept": small.config.intermediate_size,
            "heads_kept": small.config.num_attention_heads,
            "flop_bound": bound,
            "dense_prefill_s": dense_prefill_s,
            "prefill_s": prefill_s,
            "prefill_speedup": prefill_speedup,
            "prefill_share_of_bound": prefill_speedup / bound,
        }
        for name, compiled in (("eager", False), ("compiled", True)):
            speedup, dense_s, small_s = paired_ratio(
                greedy_decode(model, prompt, args.new_tokens, compiled),
                greedy_decode(small, prompt, args.new_tokens, compiled),
                args.repeats,
            )
            row[f"decode_{name}"] = {
                "dense_tokens_per_s": args.new_tokens / dense_s,
                "tokens_per_s": args.new_tokens / small_s,
                "speedup": speedup,
                "share_of_bound": speedup / bound,
            }
        rows.append(row)

    wrapped = SparseActivationModule.from_pretrained(
        model, checkpoint, 0.0, tokenizer=tokenizer
    ).model
    overhead, at_zero, plain = paired_ratio(
        prefill(wrapped, ids), prefill(model, ids), args.repeats
    )

    report = {
        "benchmark": "static_inference",
        "model": "SmolLM2-135M-Instruct, float32",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(),
        "repeats": args.repeats,
        "prefill_shape": list(ids.shape),
        "decode_new_tokens": args.new_tokens,
        "dense_linear_macs_per_token": dense_macs,
        "compacted": rows,
        "overhead_at_sparsity_0": {
            "plain_s": plain,
            "wrapped_s": at_zero,
            "ratio": overhead,
        },
    }
    save_report(report, args.out)
    for r in rows:
        eager, compiled = r["decode_eager"], r["decode_compiled"]
        print(
            f"static {r['sparsity']:.0%}: bound {r['flop_bound']:.2f}x | prefill "
            f"{r['prefill_speedup']:.2f}x ({r['prefill_share_of_bound']:.0%} of bound) | decode "
            f"eager {eager['speedup']:.2f}x ({eager['share_of_bound']:.0%}; "
            f"{eager['dense_tokens_per_s']:.1f} -> {eager['tokens_per_s']:.1f} tok/s), compiled "
            f"{compiled['speedup']:.2f}x ({compiled['share_of_bound']:.0%}; "
            f"{compiled['dense_tokens_per_s']:.1f} -> {compiled['tokens_per_s']:.1f} tok/s)"
        )
    print(f"sparsity 0 wrapper: {overhead:.3f}x the plain model's forward time")


if __name__ == "__main__":
    main()
