"""Which basis should the sparse lm_head drop channels in: its input's own, or the eigenbasis?

The lm_head alone, on the dense model's own hidden states: for every answer-predicting
position of the dense model's greedy answers to TruthfulQA questions 0-99 (teacher-forced,
not used for calibration), the lm_head's input ``x`` is taken from the dense model, and the
sparse head's logits are computed by the library's reference math
(:func:`~sparse_lightning.kernels.ops.reference_logits` for the channels,
:func:`~sparse_lightning.kernels.ops.reference_rotated_logits` for the rotated basis, with
the bfloat16 copy of ``(W Q)^T`` that the kernel path reads), ``Q`` from the frontier
checkpoint's calibrated second moment (TruthfulQA 400-799, :func:`output_rotation`). Each
token keeps the same number of channels in both bases, and the 64 largest approximate logits
are recomputed exactly. Reported: how often the sparse head's argmax is the dense token, and
KL(dense || sparse head), per level.

    python benchmarks/lm_head_basis.py [--model smollm2|qwen] [--levels 0.5 0.7 0.8 0.9]

Prints a table and writes benchmarks/results/lm_head_basis[_qwen].json (with machine info).
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
    frontier_checkpoint,
    results_path,
    save_report,
)
from benchmarks.selection_quality import MODELS  # noqa: E402
from sparse_lightning import QACollator, SparseActivationModule, load_truthfulqa  # noqa: E402
from sparse_lightning.inference.output import output_rotation  # noqa: E402
from sparse_lightning.kernels.ops import reference_logits, reference_rotated_logits  # noqa: E402
from sparse_lightning.selection.selectors import kept_count  # noqa: E402

CHUNK = 256  # tokens per call: Qwen's logits for all 2636 tokens would take 1.6 GB


def head_inputs(module: SparseActivationModule, rows: range) -> torch.Tensor:
    """The dense lm_head's input at every answer-predicting position of ``rows``."""
    model, head = module.model, module.model.get_output_embeddings()
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    questions = load_truthfulqa(TRUTHFULQA, rows=rows)
    inputs = []
    try:
        for raw in DataLoader(questions, batch_size=8, collate_fn=QACollator(module.tokenizer)):
            batch = module.prepare_batch(raw)
            seen.clear()
            with torch.no_grad():
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            inputs.append(seen[-1][batch.predict_mask])
    finally:
        handle.remove()
    return torch.cat(inputs)


def scores(x: torch.Tensor, heads: dict, dense_of) -> dict:
    """Each sparse head's top-1 agreement with the dense head and KL(dense || sparse), over
    ``x``'s tokens (the dense logits computed once per chunk for all of them)."""
    sums = {name: [0.0, 0.0] for name in heads}
    for chunk in x.split(CHUNK):
        dense = torch.log_softmax(dense_of(chunk), -1)
        for name, logits_of in heads.items():
            sparse = torch.log_softmax(logits_of(chunk), -1)
            sums[name][0] += float((dense.argmax(-1) == sparse.argmax(-1)).sum())
            sums[name][1] += float((dense.exp() * (dense - sparse)).sum())
    return {name: (agree / x.shape[0], kl / x.shape[0]) for name, (agree, kl) in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="smollm2")
    parser.add_argument("--levels", nargs="+", type=float, default=[0.5, 0.7, 0.8, 0.9])
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or results_path("lm_head_basis", args.model)
    started = time.time()
    name = MODELS[args.model][0]
    model, tokenizer, path = frontier_checkpoint(args.model, "uniform")
    module = SparseActivationModule.from_pretrained(model, path, tokenizer=tokenizer)
    head = model.get_output_embeddings()
    weight, bias = head.weight.detach(), head.bias
    rotation = output_rotation(module.statistics, "rotated").to(weight.dtype)
    weight_t = weight.T.contiguous()
    approx_t = (weight @ rotation).T.contiguous().to(torch.bfloat16)  # as the kernel path keeps it
    x = head_inputs(module, range(0, 100))
    width, k = x.shape[-1], args.candidates
    print(f"{name}: {x.shape[0]} answer tokens, lm_head {width} x {weight.shape[0]}")

    def dense_of(chunk):
        return torch.nn.functional.linear(chunk, weight, bias)

    heads = {}
    for level in args.levels:
        keep = kept_count(width, level)
        heads[level, "channels"] = lambda c, keep=keep: reference_logits(c, weight_t, keep, k, bias)
        heads[level, "rotated"] = lambda c, keep=keep: reference_rotated_logits(
            c @ rotation, approx_t, keep, k, c, weight, bias
        )
    rows = []
    for (level, basis), (top1, kl) in scores(x, heads, dense_of).items():
        rows.append({"level": level, "basis": basis, "top1_agreement": top1, "kl": kl})
        print(f"level {level:.2f} {basis:8} top-1 {top1:.4f} KL {kl:.3f}")
    save_report(
        {
            "benchmark": "lm_head_basis",
            "model": name,
            "evaluation": "lm_head inputs of the dense model at the answer-predicting positions "
            "of its greedy answers to TruthfulQA rows 0-99 (teacher-forced)",
            "rotation": f"eigenbasis of the lm_head input's second moment in {path.name}",
            "candidates": k,
            "answer_tokens": int(x.shape[0]),
            "seconds": time.time() - started,
            "results": rows,
        },
        out,
    )


if __name__ == "__main__":
    main()
