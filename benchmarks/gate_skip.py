"""Batch-1 decode where skipped neurons really skip work: ``mode="gate"`` (issue 5, item 4).

``mode="gate"`` decides each token's MLP neurons from the gate activation, then runs the down
projection (and, when under a third are kept, the up projection) for the kept neurons only
(see ``sparse_lightning/inference/gate.py``). Measured on
SmolLM2-135M-Instruct, float32, CPU, at 50% and 70% of MLP neurons skipped (heads dense):

* one MLP (layer 15, a real hidden state): the gate-first path against the dense MLP;
* one MLP of the shapes of larger gated SLMs (random weights), where each call streams the
  weights from memory as in a real decode step;
* whole-model greedy decode (``generate``, 32 new tokens), eager and compiled (static KV cache
  and ``torch.compile``): against a plain copy of the model, and the same path with
  ``gather=False`` (dense compute, then mask: the reference its outputs must equal; the
  largest logit difference over all decode steps is reported).

Timings alternate dense and sparse within each repetition and report the median of the
per-repetition ratios, so a slow spell on a shared machine hits both. The selector's top-k
runs inside the timed region. Bounds count multiply-adds of linear layers that the path really
skips: the gate stays dense, the down projection (and the up projection where gathered)
shrinks to the kept neurons.

    python benchmarks/gate_skip.py [--repeats 7]

Prints a table and writes benchmarks/results/gate_skip.json.
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
    decode_speed,
    greedy_decode,
    linear_macs,
    paired_ratio,
    save_report,
)
from sparse_lightning import SparseActivationModule, load_demo_model  # noqa: E402
from sparse_lightning.inference.gate import GATHER_UP_BELOW  # noqa: E402
from sparse_lightning.selection import kept_count  # noqa: E402

LEVELS = (0.5, 0.7)
PROMPT = "Write a short story about a lighthouse keeper."
#: (hidden, MLP width) of larger gated SLMs: SmolLM2-360M, TinyLlama-1.1B / MobiLlama, Qwen2-1.5B.
SHAPES = ((960, 2560), (2048, 5632), (1536, 8960))


def mlp_shape_scan(shapes, repeats: int) -> list[dict]:
    """One MLP of each shape (random weights, a one-layer Llama), dense vs ``mode="gate"``.

    At batch 1 these weights do not fit in cache, so each call streams them from memory as a
    real decode step does; the question is at what size the gathers pay for themselves.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    rows = []
    for hidden, width in shapes:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=128,
            hidden_size=hidden,
            intermediate_size=width,
            num_hidden_layers=1,
            num_attention_heads=hidden // 64,
        )
        model = AutoModelForCausalLM.from_config(config).eval()
        dense_mlp = copy.deepcopy(model.model.layers[0].mlp)
        module = SparseActivationModule(model)
        x = torch.randn(1, 1, hidden)
        for level in LEVELS:
            module.set_sparsity(mlp=level, heads=0.0, mode="gate")
            timing = mlp_timing(dense_mlp, model.model.layers[0].mlp, x, 20, level, repeats)
            rows.append({"hidden": hidden, "mlp_width": width, **timing})
    return rows


def mlp_timing(
    dense_mlp: torch.nn.Module,
    gate_mlp: torch.nn.Module,
    x: torch.Tensor,
    calls: int,
    level: float,
    repeats: int,
) -> dict[str, float]:
    """``calls`` forwards of a plain MLP against the same MLP in gate mode at ``level``."""
    units = gate_mlp.down_proj.in_features
    kept = kept_count(units, level)
    ratio, dense_s, gate_s = paired_ratio(
        _calls(dense_mlp, x, calls), _calls(gate_mlp, x, calls), repeats
    )
    return {
        "mlp_sparsity": level,
        "kept_neurons": kept,
        "mlp_us_dense": dense_s / calls * 1e6,
        "mlp_us_gate": gate_s / calls * 1e6,
        "mlp_speedup": ratio,
        "mlp_flop_bound": 3 * units / (units + projections_kept(units, kept)),
    }


def projections_kept(units: int, kept: int) -> int:
    """Rows of the up and down projections the gate path computes (the gate's are all run)."""
    up = kept if kept < GATHER_UP_BELOW * units else units
    return up + kept


def _calls(mlp: torch.nn.Module, x: torch.Tensor, n: int):
    def run() -> None:
        with torch.no_grad():
            for _ in range(n):
                mlp(x)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "gate_skip.json"
    )
    args = parser.parse_args()
    model, tokenizer = load_demo_model()
    dense = copy.deepcopy(model)  # a separate plain model: no switching inside timed runs
    module = SparseActivationModule(model, tokenizer)
    captured = {}
    handle = model.model.layers[args.layer].mlp.register_forward_pre_hook(
        lambda m, a: captured.__setitem__("x", a[0][:, -1:])
    )
    prompt = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model(prompt)
    handle.remove()
    x = captured["x"]  # (1, 1, hidden): a real input of the layer's MLP

    def gather(on: bool):
        return lambda: setattr(module.sparsifier, "gather", on)

    dense_macs = linear_macs(model)
    units, hidden = module.architecture.units("mlp"), module.architecture.hidden_size
    layers = module.architecture.num_layers
    rows = []
    for level in LEVELS:
        kept = kept_count(units, level)
        module.set_sparsity(mlp=level, heads=0.0, mode="gate")  # gather on: the cut path
        row = mlp_timing(
            dense.model.layers[args.layer].mlp,
            model.model.layers[args.layer].mlp,
            x,
            200,
            level,
            args.repeats,
        )
        saved = (2 * units - projections_kept(units, kept)) * hidden
        row["decode_flop_bound"] = dense_macs / (dense_macs - layers * saved)
        for name, compiled in (("eager", False), ("compiled", True)):
            plain = greedy_decode(dense, prompt, args.new_tokens, compiled)
            sparse = greedy_decode(model, prompt, args.new_tokens, compiled)
            speed = decode_speed(paired_ratio(plain, sparse, args.repeats), args.new_tokens)
            masked, _, _ = paired_ratio(
                plain, sparse, args.repeats, prepare=(lambda: None, gather(False))
            )
            module.sparsifier.gather = True
            cut_logits = sparse()
            module.sparsifier.gather = False
            error = float((sparse() - cut_logits).abs().max())
            module.sparsifier.gather = True
            row[f"decode_{name}"] = {
                **speed,
                "masked_reference_speedup": masked,
                "max_abs_logit_diff_vs_masked": error,
            }
        rows.append(row)
        module.disable_sparsity()
    report = {
        "benchmark": "gate_skip",
        "model": "SmolLM2-135M-Instruct, float32, mode='gate', heads dense",
        "repeats": args.repeats,
        "mlp_layer": args.layer,
        "decode_new_tokens": args.new_tokens,
        "results": rows,
        "mlp_shapes": mlp_shape_scan(SHAPES, args.repeats),
    }
    save_report(report, args.out)
    for r in report["mlp_shapes"]:
        print(
            f"MLP {r['hidden']}x{r['mlp_width']} at {r['mlp_sparsity']:.0%}: "
            f"{r['mlp_us_dense']:.0f} -> {r['mlp_us_gate']:.0f} us = {r['mlp_speedup']:.2f}x "
            f"(bound {r['mlp_flop_bound']:.2f}x)"
        )
    for r in rows:
        print(
            f"{r['mlp_sparsity']:.0%} MLP: one MLP {r['mlp_speedup']:.2f}x "
            f"(bound {r['mlp_flop_bound']:.2f}x), decode bound {r['decode_flop_bound']:.2f}x"
        )
        for name in ("eager", "compiled"):
            d = r[f"decode_{name}"]
            print(
                f"  decode {name}: {d['dense_tokens_per_s']:.1f} -> {d['tokens_per_s']:.1f} "
                f"tok/s = {d['speedup']:.2f}x (masked {d['masked_reference_speedup']:.2f}x)"
                f", max |logit diff| vs masked {d['max_abs_logit_diff_vs_masked']:.1e}"
            )


if __name__ == "__main__":
    main()
