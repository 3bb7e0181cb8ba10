"""The model in bfloat16: is it the best dense decode, and what does sparsity add to it?

Three tuned decodes of ``--model`` in one process (``benchmarks.common.tuned_decode``): dense
float32, dense bfloat16 (the same weights cast) and the input-sparse setting (``--budget``,
greedy, ``--lm-head``) on the bfloat16 model, through the kernels' two-byte path. Each round
interleaves float32 against bfloat16 dense, then bfloat16 dense against the sparse decode
(``interleaved_decode``, ``--repeats`` repetitions each). With ``--fidelity``, first the
cast's fidelity (bfloat16 against float32, both dense) and the sparse setting's (against the
bfloat16 model dense), as ``frontier.py`` measures them: TruthfulQA questions 0-99, the dense
model's greedy answers teacher-forced, prompt dense.

    python benchmarks/half_precision.py [--model smollm2] [--budget 0.2 --lm-head 0.8] \
        [--rounds 4] [--fidelity]

Prints one line per round and a summary, and writes
``benchmarks/results/half_precision.json`` (``half_precision_<model>.json`` for another model).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    frontier_checkpoint,
    interleaved_decode,
    results_path,
    save_report,
    tuned_decode,
)


def cast_fidelity(model, half, tokenizer) -> dict[str, float]:
    """Top-1 agreement and KL of ``half`` against ``model`` (both dense) on the frontier's
    held-out answers."""
    from benchmarks.frontier import truthfulqa_data
    from sparse_lightning import SparseActivationModule
    from sparse_lightning.evaluation.functional import agreement_and_kl

    module = SparseActivationModule(model, tokenizer, targets="dense", max_new_tokens=32)
    data = truthfulqa_data(tokenizer, range(400, 800), range(0, 100), batch_size=8)
    data.setup("test")
    agree, kl = [], []
    with torch.no_grad():
        for batch in data.test_dataloader():
            tf = module.prepare_batch(batch, targets="dense")
            inputs = {"input_ids": tf.input_ids, "attention_mask": tf.attention_mask}
            reference = model(**inputs).logits[tf.predict_mask]
            a, k = agreement_and_kl(reference, half(**inputs).logits[tf.predict_mask])
            agree.append(a)
            kl.append(k)
    return {"top1_agreement": torch.cat(agree).mean().item(), "kl": torch.cat(kl).mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "qwen"), default="smollm2")
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--lm-head", type=float, default=0.8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fidelity", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from benchmarks.frontier import PROMPT, fidelity
    from sparse_lightning import SparseActivationModule, SparsityConfig

    model, tokenizer, path = frontier_checkpoint(args.model, "greedy")
    setting = SparsityConfig(budget=args.budget, allocation="greedy", lm_head=args.lm_head)
    half = copy.deepcopy(model).to(torch.bfloat16)
    report: dict = {
        "benchmark": "half_precision",
        "model": args.model,
        "setting": {"budget": args.budget, "allocation": "greedy", "lm_head": args.lm_head},
    }
    if args.fidelity:
        report["cast_fidelity"] = cast_fidelity(model, half, tokenizer)
        print(f"bfloat16 against float32, dense: {report['cast_fidelity']}", flush=True)
    prompt = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    dense32 = tuned_decode(model, prompt, 32)
    dense16 = tuned_decode(copy.deepcopy(half), prompt, 32)
    module = SparseActivationModule.from_pretrained(half, path, tokenizer=tokenizer)
    if args.fidelity:
        row = fidelity(
            module, tokenizer, [SparsityConfig(), setting], range(400, 800), range(0, 100), 8
        )[1]
        skipped = row["realized_decode_bytes_skipped"]
        report["sparse_fidelity"] = {
            "top1_agreement": row["top1_agreement"],
            "kl": row["kl"],
            "decode_bytes_skipped": skipped,
            "byte_bound": 1.0 / (1.0 - skipped),
        }
        print(f"sparse against bfloat16 dense: {report['sparse_fidelity']}", flush=True)
    module.set_sparsity(setting)
    sparse16 = tuned_decode(module.model, prompt, 32)
    rounds = []
    for _ in range(args.rounds):
        cast = interleaved_decode(dense32, dense16, args.repeats)
        sparse = interleaved_decode(dense16, sparse16, args.repeats)
        rounds.append(
            {
                "float32_ms_per_step": 1e3 / cast["dense_decode_tokens_per_s"],
                "bfloat16_ms_per_step": 1e3 / cast["decode_tokens_per_s"],
                "bfloat16_over_float32": cast["decode_speedup"],
                "bfloat16_ms_per_step_beside_sparse": 1e3 / sparse["dense_decode_tokens_per_s"],
                "sparse_ms_per_step": 1e3 / sparse["decode_tokens_per_s"],
                "sparse_over_bfloat16": sparse["decode_speedup"],
            }
        )
        r = rounds[-1]
        print(
            f"float32 {r['float32_ms_per_step']:.2f} ms | bfloat16 "
            f"{r['bfloat16_ms_per_step']:.2f} ms ({r['bfloat16_over_float32']:.3f}x) | "
            f"beside sparse {r['bfloat16_ms_per_step_beside_sparse']:.2f} ms, sparse "
            f"{r['sparse_ms_per_step']:.2f} ms ({r['sparse_over_bfloat16']:.3f}x)",
            flush=True,
        )
    for key in ("bfloat16_over_float32", "sparse_over_bfloat16"):
        values = [r[key] for r in rounds]
        report[key] = {"median": statistics.median(values), "range": [min(values), max(values)]}
        print(
            f"{key}: median {statistics.median(values):.3f}x ({min(values):.3f}-{max(values):.3f})"
        )
    report["rounds"] = rounds
    save_report(report, args.out or results_path("half_precision", args.model))


if __name__ == "__main__":
    main()
