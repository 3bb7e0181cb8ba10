"""What the kernel's calls cost in a decode step, apart from the rows they read.

Four tuned decodes of ``--model`` (``--dtype``, the lm_head dense in all four), each pair's
steps interleaved in one process (``decode_profile.interleaved_pairs``):

* ``D``: the model dense (Inductor's GEMVs);
* ``F``: every projection of the decoder layers replaced by a stand-in that reads no weight
  (``x.sum(-1) * 0`` widened to the output's shape: its input stays live, so the norms and
  activations before it are still computed and the graph keeps its shape);
* ``K``: the four channel kinds through the kernel at level 0.01 (about every row read);
* ``E``: the same at level 0.995 (near-empty: the calls run, almost no row is read).

``D - F`` is what the dense projections cost, ``K - F`` what the kernel costs reading the same
rows, ``E - F`` what its 120 (SmolLM2) calls cost with nothing to read, ``D - K`` the kernel
against Inductor where both read every row.

    python benchmarks/fixed_costs.py [--model smollm2] [--dtype bfloat16] [--rounds 3]

JSON in ``benchmarks/results/fixed_costs_bfloat16.json`` (``fixed_costs_<model>_bfloat16.json``
for another model; ``fixed_costs.json`` in float32).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    DTYPES,
    frontier_checkpoint,
    results_path,
    save_report,
    tuned_decode,
)
from benchmarks.decode_profile import NEAR_EMPTY, interleaved_pairs  # noqa: E402

LEVELS = {"K": 0.01, "E": 0.995}


class StandIn(torch.nn.Module):
    """A projection that reads no weight: zeros of its output's shape that still depend on x."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.sum(-1, keepdim=True) * 0).expand(*x.shape[:-1], self.out_features)


def stand_ins(model) -> None:
    """Every ``nn.Linear`` of the decoder layers replaced by a :class:`StandIn`."""
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, StandIn(child.out_features))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "qwen"), default="smollm2")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from benchmarks.frontier import PROMPT
    from sparse_lightning import SparseActivationModule, SparsityConfig

    model, tokenizer, path = frontier_checkpoint(args.model, "greedy")
    model = model.to(getattr(torch, args.dtype))
    prompt = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    floor = copy.deepcopy(model)
    stand_ins(floor)
    runs = {"D": tuned_decode(copy.deepcopy(model), prompt, 32)}
    runs["F"] = tuned_decode(floor, prompt, 32)
    for name, level in LEVELS.items():
        module = SparseActivationModule.from_pretrained(
            copy.deepcopy(model), path, tokenizer=tokenizer
        )
        module.set_sparsity(SparsityConfig(dict.fromkeys(NEAR_EMPTY, level)))
        runs[name] = tuned_decode(module.model, prompt, 32)
    pairs = (("D", "F"), ("K", "F"), ("E", "F"), ("D", "K"))
    rows = interleaved_pairs(runs, pairs, rounds=args.rounds, repeats=args.repeats)
    out = args.out or results_path("fixed_costs", args.model, args.dtype)
    report = {
        "benchmark": "fixed_costs",
        "model": args.model,
        "dtype": args.dtype,
        "levels": LEVELS,
        "rows": rows,
    }
    save_report(report, out)


if __name__ == "__main__":
    main()
