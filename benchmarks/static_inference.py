"""Inference speed of compacted static masks, and the cost of the wrapper at sparsity 0.

SmolLM2-135M-Instruct, float32, CPU. For static masks at 50% and 80% of MLP neurons and heads
(heads group-balanced for GQA), the compacted stock model's

* prefill time of a batch of 8 x 128 tokens, and
* batch-1 greedy decode tokens/s (32 new tokens, prefill of the prompt included) three ways:
  ``eager`` generate; ``compiled``, transformers' own compiled generation (static KV cache,
  ``torch.compile`` of the decode step); and ``tuned``, a plain greedy loop over a decode step
  compiled with Inductor's CPU options (``benchmarks.common.tuned_decode``); its tokens are
  checked against the argmax of one eager forward over the generated sequence,

against the dense model in the same run (alternating, median of per-repetition ratios), next
to the FLOP bound (dense / compact multiply-adds of all linear layers per token, lm_head
included). Also the forward time of a module loaded at sparsity 0 against the plain model (no
hooks are installed at 0): a separately loaded plain model against the module's own call, for a
prefill forward and for eager batch-1 generate.

    python benchmarks/static_inference.py [--repeats 7] [--quick-repeats 21] [--checkpoint PATH]

``--quick-repeats`` applies to the rows whose repetitions take seconds (prefill, tuned decode
and the sparsity-0 overhead): more per-repetition ratios make their median steadier on a noisy
machine.

About 28 minutes on 2 CPU cores, most of it compiling. Prints a table and writes
benchmarks/results/static_inference.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
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
    decode_speed,
    greedy_decode,
    linear_macs,
    paired_ratio,
    save_report,
    tuned_decode,
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
    parser.add_argument("--repeats", type=int, default=7, help="for the generate rows")
    parser.add_argument(
        "--quick-repeats", type=int, default=21, help="for prefill, tuned decode and overhead"
    )
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
    rows, smalls = [], []
    for level in LEVELS:
        module = SparseActivationModule.from_pretrained(
            model, checkpoint, level, mode="static", tokenizer=tokenizer
        )
        small = module.compact()
        module.disable_sparsity()
        bound = dense_macs / linear_macs(small)
        prefill_speedup, dense_prefill_s, prefill_s = paired_ratio(
            prefill(model, ids), prefill(small, ids), args.quick_repeats
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
            speed = decode_speed(
                paired_ratio(
                    greedy_decode(model, prompt, args.new_tokens, compiled),
                    greedy_decode(small, prompt, args.new_tokens, compiled),
                    args.repeats,
                ),
                args.new_tokens,
            )
            row[f"decode_{name}"] = {**speed, "share_of_bound": speed["speedup"] / bound}
        rows.append(row)
        smalls.append(small)

    # Dynamo keeps one cache per code object and reuses an entry across module instances of
    # the same shapes, so the entries compiled for generate above could serve the tuned steps.
    torch._dynamo.reset()
    dense_tuned = tuned_decode(copy.deepcopy(model), prompt, args.new_tokens)
    dense_confirmed = eager_greedy_agreement(model, prompt, dense_tuned())
    for row, small in zip(rows, smalls, strict=True):
        small_tuned = tuned_decode(small, prompt, args.new_tokens)
        speed = decode_speed(
            paired_ratio(dense_tuned, small_tuned, args.quick_repeats), args.new_tokens
        )
        row["decode_tuned"] = {
            **speed,
            "share_of_bound": speed["speedup"] / row["flop_bound"],
            "greedy_tokens_confirmed_eager": eager_greedy_agreement(small, prompt, small_tuned()),
        }

    del smalls, dense_tuned
    plain, _ = load_demo_model()
    module = SparseActivationModule.from_pretrained(model, checkpoint, 0.0, tokenizer=tokenizer)
    overhead = {}
    for name, plain_run, module_run in (
        ("prefill", prefill(plain, ids), prefill(module, ids)),
        (
            "decode_eager",
            greedy_decode(plain, prompt, args.new_tokens),
            greedy_decode(module.model, prompt, args.new_tokens),
        ),
    ):
        ratio, plain_s, module_s = paired_ratio(plain_run, module_run, args.quick_repeats)
        # plain time / module time: below 1 means the module is slower.
        overhead[name] = {"plain_s": plain_s, "module_s": module_s, "ratio": ratio}

    report = {
        "benchmark": "static_inference",
        "model": "SmolLM2-135M-Instruct, float32",
        "repeats": args.repeats,
        "quick_repeats": args.quick_repeats,
        "prefill_shape": list(ids.shape),
        "decode_new_tokens": args.new_tokens,
        "dense_linear_macs_per_token": dense_macs,
        "dense_tuned_greedy_tokens_confirmed_eager": dense_confirmed,
        "compacted": rows,
        "overhead_at_sparsity_0": overhead,
    }
    save_report(report, args.out)
    for r in rows:
        print(
            f"static {r['sparsity']:.0%}: bound {r['flop_bound']:.2f}x | prefill "
            f"{r['prefill_speedup']:.2f}x ({r['prefill_share_of_bound']:.0%} of bound)"
        )
        for name in ("eager", "compiled", "tuned"):
            d = r[f"decode_{name}"]
            print(
                f"  decode {name:8s} {d['speedup']:.2f}x ({d['share_of_bound']:.0%} of bound; "
                f"{d['dense_tokens_per_s']:.1f} -> {d['tokens_per_s']:.1f} tok/s)"
            )
    print(
        f"tuned tokens agreeing with an eager forward (of {args.new_tokens}): dense "
        f"{dense_confirmed}, compact "
        + ", ".join(str(r["decode_tuned"]["greedy_tokens_confirmed_eager"]) for r in rows)
    )
    for name, o in overhead.items():
        print(f"sparsity 0, {name}: plain/module time {o['ratio']:.3f}")


def eager_greedy_agreement(model: nn.Module, prompt: torch.Tensor, tokens: torch.Tensor) -> int:
    """How many leading ``tokens`` are also the argmax of one eager forward over the sequence.

    Against the raw argmax, not eager ``generate``: generate's ``min_new_tokens`` forbids end
    tokens, which the plain loop of ``tuned_decode`` does not.
    """
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt, tokens], dim=1), use_cache=False).logits
    picked = logits[0, prompt.shape[1] - 1 : -1].argmax(-1)
    differ = (picked != tokens[0]).nonzero()
    return int(differ[0, 0]) if len(differ) else tokens.shape[1]


if __name__ == "__main__":
    main()
