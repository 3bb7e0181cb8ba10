"""Inference speed of compacted static masks, and the cost of the wrapper at sparsity 0.

SmolLM2-135M-Instruct, float32, CPU. For static masks at 50% and 80% of MLP neurons and heads
(heads group-balanced for GQA), the compacted stock model's

* prefill time of a batch of 8 x 128 tokens, and
* batch-1 greedy decode tokens/s (32 new tokens),

against the dense model in the same run, next to the FLOP bound (dense / compact multiply-adds
of all linear layers per token, lm_head included). Also the forward time of a module loaded at
sparsity 0 against the plain model (no hooks are installed at 0).

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
    machine_info,
    median_seconds,
    save_report,
)
from sparse_lightning import (  # noqa: E402
    SparseActivationModule,
    load_demo_model,
)

LEVELS = (0.5, 0.8)


def linear_macs(model: nn.Module) -> int:
    """Multiply-adds per token of every linear layer (= their weight sizes), lm_head included."""
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    # A tied lm_head is an nn.Linear sharing the embedding; counted once above as a module.
    return total


def prefill(model: nn.Module, ids: torch.Tensor):
    def run() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    return run


def decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int):
    def run() -> None:
        with torch.no_grad():
            model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

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

    dense = {
        "prefill_s": median_seconds(prefill(model, ids), args.repeats),
        "decode_s": median_seconds(decode(model, prompt, args.new_tokens), args.repeats),
        "linear_macs": linear_macs(model),
    }
    rows = []
    for level in LEVELS:
        module = SparseActivationModule.from_pretrained(
            model, checkpoint, level, mode="static", tokenizer=tokenizer
        )
        small = module.compact()
        module.disable_sparsity()
        t_prefill = median_seconds(prefill(small, ids), args.repeats)
        t_decode = median_seconds(decode(small, prompt, args.new_tokens), args.repeats)
        bound = dense["linear_macs"] / linear_macs(small)
        prefill_speedup = dense["prefill_s"] / t_prefill
        decode_speedup = dense["decode_s"] / t_decode
        rows.append(
            {
                "sparsity": level,
                "mlp_units_kept": small.config.intermediate_size,
                "heads_kept": small.config.num_attention_heads,
                "flop_bound": bound,
                "prefill_s": t_prefill,
                "prefill_speedup": prefill_speedup,
                "prefill_share_of_bound": prefill_speedup / bound,
                "decode_tokens_per_s": args.new_tokens / t_decode,
                "decode_speedup": decode_speedup,
                "decode_share_of_bound": decode_speedup / bound,
            }
        )

    wrapped = SparseActivationModule.from_pretrained(
        model, checkpoint, 0.0, tokenizer=tokenizer
    ).model
    plain = median_seconds(prefill(model, ids), args.repeats)
    at_zero = median_seconds(prefill(wrapped, ids), args.repeats)

    report = {
        "benchmark": "static_inference",
        "model": "SmolLM2-135M-Instruct, float32",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(),
        "repeats": args.repeats,
        "prefill_shape": list(ids.shape),
        "decode_new_tokens": args.new_tokens,
        "dense": {**dense, "decode_tokens_per_s": args.new_tokens / dense["decode_s"]},
        "compacted": rows,
        "overhead_at_sparsity_0": {
            "plain_s": plain,
            "wrapped_s": at_zero,
            "ratio": at_zero / plain,
        },
    }
    save_report(report, args.out)
    print(
        f"dense: prefill {dense['prefill_s']:.2f} s, "
        f"decode {args.new_tokens / dense['decode_s']:.1f} tok/s"
    )
    for r in rows:
        print(
            f"static {r['sparsity']:.0%}: bound {r['flop_bound']:.2f}x | prefill "
            f"{r['prefill_speedup']:.2f}x ({r['prefill_share_of_bound']:.0%} of bound) | decode "
            f"{r['decode_tokens_per_s']:.1f} tok/s {r['decode_speedup']:.2f}x "
            f"({r['decode_share_of_bound']:.0%} of bound)"
        )
    print(f"sparsity 0 wrapper: {at_zero / plain:.3f}x the plain model's forward time")


if __name__ == "__main__":
    main()
