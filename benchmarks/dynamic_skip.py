"""Can per-token neuron skipping beat the dense MLP at batch-1 decode on CPU? (issue 5, item 4)

The skip path decides from the gate first, then computes the up and down projections only for
the kept neurons: ``g = silu(x W_gate^T)``; keep ``|g| >= t``; ``u = W_up[keep] x``;
``y = (g[keep] * u) W_down[:, keep]^T`` (the down projection as ``embedding_bag`` over rows of
``W_down^T``, which reads only the kept rows and copies nothing). The threshold ``t`` is the
quantile of ``|g|`` that keeps the wanted share on this token, so the count is exact; the
selection (one comparison and a ``nonzero``) is timed with the rest. The reference is the dense
MLP, and the skip path's output is checked against the masked dense computation.

Real SmolLM2-135M-Instruct MLP weights (layer 15), batch 1, float32, medians over repeats.

    python benchmarks/dynamic_skip.py [--repeats 2000]

Prints a table and writes benchmarks/results/dynamic_skip.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, save_report  # noqa: E402
from sparse_lightning import load_demo_model  # noqa: E402

LEVELS = (0.5, 0.7)


def per_call_us(fn, repeats: int) -> float:
    """Median of 5 blocks of ``repeats // 5`` calls, in microseconds per call."""
    for _ in range(50):
        fn()
    block = max(1, repeats // 5)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(block):
            fn()
        times.append((time.perf_counter() - start) / block * 1e6)
    return sorted(times)[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "dynamic_skip.json"
    )
    args = parser.parse_args()
    model, tokenizer = load_demo_model()
    mlp = model.model.layers[args.layer].mlp
    w_gate, w_up = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()
    w_down = mlp.down_proj.weight.detach()
    w_down_rows = w_down.t().contiguous()  # (neurons, hidden): one row per neuron
    # A real hidden state: the layer's input for the last token of a prompt.
    captured = {}
    handle = model.model.layers[args.layer].post_attention_layernorm.register_forward_hook(
        lambda m, i, out: captured.__setitem__("x", out[0, -1:].detach())
    )
    with torch.no_grad():
        model(**tokenizer("The lighthouse keeper climbed the stairs", return_tensors="pt"))
    handle.remove()
    x = captured["x"]  # (1, hidden)
    hidden, neurons = w_gate.shape[1], w_gate.shape[0]

    def dense() -> torch.Tensor:
        return mlp(x)

    rows = []
    with torch.no_grad():
        t_dense = per_call_us(dense, args.repeats)
        gate_only = per_call_us(lambda: F.silu(F.linear(x, w_gate)), args.repeats)
        for level in LEVELS:
            g_ref = F.silu(F.linear(x, w_gate))[0]
            keep_n = neurons - round(level * neurons)
            threshold = g_ref.abs().topk(keep_n).values[-1]

            def skip(threshold: torch.Tensor = threshold) -> torch.Tensor:
                g = F.silu(F.linear(x, w_gate))[0]
                index = (g.abs() >= threshold).nonzero().squeeze(1)
                u = w_up.index_select(0, index) @ x[0]
                weights = (g.index_select(0, index) * u).unsqueeze(0)
                return F.embedding_bag(
                    index.unsqueeze(0), w_down_rows, per_sample_weights=weights, mode="sum"
                )

            mask = (g_ref.abs() >= threshold).float()
            reference = F.linear(g_ref * F.linear(x, w_up)[0] * mask, w_down)
            error = float((skip()[0] - reference).abs().max())
            t_skip = per_call_us(skip, args.repeats)
            # Share of the MLP's multiply-adds left: the gate dense, up and down for kept ones.
            bound = 3.0 / (1.0 + 2.0 * keep_n / neurons)
            rows.append(
                {
                    "mlp_sparsity": level,
                    "kept": keep_n,
                    "dense_us": t_dense,
                    "skip_us": t_skip,
                    "speedup": t_dense / t_skip,
                    "mlp_flop_bound": bound,
                    "max_abs_error_vs_masked": error,
                }
            )
    report = {
        "benchmark": "dynamic_skip",
        "model": f"SmolLM2-135M-Instruct layer {args.layer} MLP ({hidden}x{neurons}), float32",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(),
        "gate_projection_alone_us": gate_only,
        "results": rows,
    }
    save_report(report, args.out)
    print(f"dense MLP {t_dense:.0f} us/token; gate projection alone {gate_only:.0f} us")
    for r in rows:
        print(
            f"{r['mlp_sparsity']:.0%}: skip {r['skip_us']:.0f} us -> {r['speedup']:.2f}x "
            f"(MLP FLOP bound {r['mlp_flop_bound']:.2f}x), max |error| vs masked "
            f"{r['max_abs_error_vs_masked']:.1e}"
        )


if __name__ == "__main__":
    main()
