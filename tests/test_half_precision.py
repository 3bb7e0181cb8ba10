"""The kernels on bfloat16 and float16 tensors, against float64 hand computations.

A model loaded in bfloat16 or float16 keeps its type through the kernels: x, the weight, the
bias and the output are of it, the sums are float32 and each output is rounded once, as
ATen's own matmul of those types does. So every output must lie within half a unit in the
last place of the float64 sum over the same kept channels.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    by_hand,
    calibrate,
    decode_logits,
    loader_of,
    mask_decode_inputs,
    tiny_model,
    token_pairs,
)
from test_kernels import CHANNELS, KEPT_PATTERNS, PROMPT

from sparse_lightning import SparseActivationModule
from sparse_lightning.kernels import load, load_logits, load_rotated, load_topk
from sparse_lightning.kernels.ops import (
    reference_logits,
    reference_rotated_logits,
    reference_topk,
)
from sparse_lightning.units import UNIT_KINDS

HALF_TYPES = (torch.bfloat16, torch.float16)


def within_half_an_ulp(got: torch.Tensor, expected: torch.Tensor) -> None:
    """``got`` (of a two-byte type) is ``expected`` (float64) rounded to it, give or take the
    float32 sums' own rounding (1e-6 of the value, 1e-5 near zero)."""
    assert got.dtype in HALF_TYPES
    error = (got.double() - expected).abs()
    bound = expected.abs() * (torch.finfo(got.dtype).eps / 2 + 1e-6) + 1e-5
    assert bool((error <= bound).all()), f"max error / bound {(error / bound).max().item():.3f}"


def half_case(dtype: torch.dtype, inputs: int, outputs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(inputs, outputs, generator=g) / inputs**0.5).to(dtype)
    x = torch.randn(2, inputs, generator=g).to(dtype)
    bias = torch.randn(outputs, generator=g).to(dtype)
    return x, w, bias


def wide(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.double()


# Row and column splits (16500 columns), AVX-512's two-chain blocks of 32 columns and their
# remainders (29, 40, 5000 columns).
SHAPES = [(37, 29), (64, 40), (96, 5000), (24, 16500), (576, 960)]


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_half_precision_kernel_is_the_rounded_hand_computation(dtype, shape):
    x, w, bias = half_case(dtype, *shape, seed=sum(shape))
    for threshold in (0.0, 0.5, 1.5):  # exact in both types, so no rounding of it matters
        for b in (None, bias):
            got = load()(x, w, threshold, b)
            assert got.dtype == dtype
            within_half_an_ulp(got, by_hand(x, w, threshold, b))


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_half_precision_logit_ops_are_the_rounded_hand_computation(dtype):
    for inputs, outputs in ((37, 29), (96, 5000), (576, 4099)):
        x, w, bias = half_case(dtype, inputs, outputs, seed=inputs)
        keep = inputs // 3
        q = torch.linalg.qr(torch.randn(inputs, inputs, dtype=torch.float64))[0]
        approx_t = (q.T @ w.double()).to(dtype)
        x_rot = (x.double() @ q).to(dtype)
        weight = w.T.contiguous()
        for b in (None, bias):
            within_half_an_ulp(
                load_topk()(x, w, keep, b), reference_topk(wide(x), wide(w), keep, wide(b))
            )
            within_half_an_ulp(
                load_logits()(x, w, keep, 8, b),
                reference_logits(wide(x), wide(w), keep, 8, wide(b)),
            )
            expected = reference_rotated_logits(
                wide(x_rot), wide(approx_t), keep, 8, wide(x), wide(weight), wide(b)
            )
            within_half_an_ulp(load_rotated()(x_rot, approx_t, keep, 8, x, weight, b), expected)


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_half_precision_kernel_never_reads_a_dropped_row(dtype):
    """Dropped channels' rows hold NaN: a kernel that read them (ATen's masked matmul would:
    0 x NaN is NaN) returns NaN; the kernel returns the hand computation."""
    x, w, _ = half_case(dtype, 96, 300, seed=3)
    x = x[:1]
    dropped = x[0].abs() < 0.5
    poisoned = w.clone()
    poisoned[dropped] = float("nan")
    got = load()(x, poisoned, 0.5, None)
    within_half_an_ulp(got, by_hand(x, w, 0.5, None))


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_half_precision_threshold_is_compared_like_aten(dtype):
    """ATen compares a tensor of a two-byte type with a Python float after rounding the float
    to that type (in float16, 0.1 becomes 0.0999755859375, so x = 0.0999755859375 passes
    ``|x| >= 0.1``); the kernel keeps the same channels as that mask."""
    t = 0.1
    x = torch.tensor([[0.1, -0.1, 0.0999, 0.1001, 0.2, -0.05]]).to(dtype)
    w = torch.arange(12.0).reshape(6, 2).to(dtype)
    kept = x * (x.abs() >= t).to(dtype)  # ATen's own comparison
    within_half_an_ulp(load()(x, w, t, None), kept.double() @ w.double())


def test_half_precision_model_decodes_through_the_kernels_like_the_masked_reference(tmp_path):
    """A bfloat16 model with every channel kind at 0.5 decodes like the same bfloat16 model
    masked by its own hooks, to bfloat16's precision (the two round at different points:
    the kernel once per output, the masked matmuls once per product sum)."""
    model_type = "llama"
    path = calibrate(
        tiny_model(model_type), loader_of(token_pairs(6)), run_name="half", dirpath=tmp_path
    )[2].checkpoint_path
    levels = dict.fromkeys(CHANNELS, 0.5)
    module = SparseActivationModule.from_pretrained(
        tiny_model(model_type).to(torch.bfloat16), path, **levels
    )
    got = decode_logits(module.model, PROMPT)
    assert got.dtype == torch.bfloat16
    reference = tiny_model(model_type).to(torch.bfloat16)
    for kind in CHANNELS:
        mask_decode_inputs(reference, kind, module.sparsifier.selectors[kind].thresholds)
    expected = decode_logits(reference, PROMPT)
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.02, atol=0.02)
    realized = module.realized_sparsity()
    assert all(0.0 < realized[UNIT_KINDS[kind].ratio_key] < 1.0 for kind in CHANNELS)


@pytest.mark.parametrize("pattern", KEPT_PATTERNS)
@pytest.mark.parametrize("out", [40, 200, 1100, 4200])
def test_half_precision_kernel_for_every_pattern_of_kept_rows(pattern, out):
    """Two-byte rows up to 4 KB (40-1100 columns) are read as sixteen stretches of the kept
    rows, longer ones (4200) sixteen consecutive kept rows at a time: both are the rounded
    hand computation for every neighbourhood of kept rows."""
    in_features = 300  # 75-150 kept rows a thread: several steps of sixteen stretches
    g = torch.Generator().manual_seed(out)
    weight_t = torch.randn(in_features, out, generator=g).to(torch.bfloat16)
    keep = torch.tensor([KEPT_PATTERNS[pattern](i, in_features) for i in range(in_features)])
    magnitude = torch.where(keep, 1 + torch.rand(in_features), 0.5 * torch.rand(in_features))
    x = (magnitude * torch.where(torch.rand(in_features) < 0.5, -1.0, 1.0)).unsqueeze(0)
    x = x.to(torch.bfloat16)
    got = load()(x, weight_t, 0.75, None)
    within_half_an_ulp(got, x.double()[:, keep] @ weight_t.double()[keep])
