"""The metric formulas against hand computations."""

import itertools
import math

import pytest
import torch

from sparse_lightning.attribution import functional as F
from sparse_lightning.attribution.sums import AttributionSums


def test_neuron_metrics_by_hand():
    # One token, three neurons: a = (1, -2, 3), g = (0.5, 0.25, -1).
    a = torch.tensor([[[1.0], [-2.0], [3.0]]])
    g = torch.tensor([[[0.5], [0.25], [-1.0]]])
    norm_g = math.sqrt(0.25 + 0.0625 + 1.0)
    assert F.magnitude(a).tolist() == [[1.0, 2.0, 3.0]]
    assert F.gradient(g).tolist() == [[0.5, 0.25, -1.0]]
    assert F.gxo(a, g).tolist() == [[-0.5, 0.5, 3.0]]
    assert F.snip(a, g).tolist() == [[0.5, 0.5, 3.0]]
    assert F.fisher(a, g).tolist() == [[0.25, 0.25, 9.0]]
    assert F.layer_gradient_norm(g).item() == pytest.approx(norm_g)
    expected = [-0.5 + 0.5 * 1 * norm_g, 0.5 + 0.5 * 2 * norm_g, 3.0 + 0.5 * 3 * norm_g]
    assert F.corrected_gxo(a, g)[0].tolist() == pytest.approx(expected)


def test_head_metrics_sum_over_head_dim():
    # Two heads of width 2.
    a = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
    g = torch.tensor([[[1.0, -1.0], [2.0, 2.0]]])
    assert F.magnitude(a).tolist() == [[5.0, 1.0]]
    assert F.gradient(g).tolist() == [[0.0, 4.0]]
    assert F.gxo(a, g).tolist() == [[1.0, -2.0]]  # -(3 - 4), -(2 + 0)
    norm_g = math.sqrt(1 + 1 + 4 + 4)
    assert F.corrected_gxo(a, g)[0].tolist() == pytest.approx(
        [1.0 + 0.5 * 5 * norm_g, -2.0 + 0.5 * 1 * norm_g]
    )


def test_integration_points_are_right_riemann_and_end_at_one():
    assert F.integration_points(4).tolist() == [0.25, 0.5, 0.75, 1.0]
    assert F.integration_points(1).tolist() == [1.0]
    with pytest.raises(ValueError, match="steps >= 1"):
        F.integration_points(0)


def test_ig_converges_to_exact_path_integral_of_a_cubic():
    # F(a) = sum c_i a_i^3 has g(alpha a) = 3 c_i alpha^2 a_i^2; the exact IG keep-score is
    # -(F(a) - F(0)) per unit = -c_i a_i^3.
    c = torch.tensor([0.3, -1.2, 2.0])
    a = torch.tensor([[[1.5], [-0.7], [0.4]]])
    exact = -(c * a[0, :, 0] ** 3)
    errors = []
    for n in (1, 4, 16, 64, 256):
        alphas = F.integration_points(n).float()
        mean_g = torch.stack([3 * c.view(1, 3, 1) * (al * a) ** 2 for al in alphas]).mean(0)
        errors.append((F.integrated_gradients(a, mean_g)[0] - exact).abs().max().item())
    assert all(e2 < e1 for e1, e2 in itertools.pairwise(errors))
    assert errors[-1] < 0.01 * exact.abs().max().item()
    # Right Riemann sum of a smooth integrand: error ~ 1/n.
    assert errors[2] / errors[3] == pytest.approx(4, rel=0.15)


def test_scores_metric_sums_tokens_and_layers():
    scores = AttributionSums("mlp", num_layers=2, num_units=2, integrated_gradients=True)
    a1 = torch.tensor([[[1.0], [2.0]], [[3.0], [-1.0]]])
    g1 = torch.tensor([[[0.5], [0.5]], [[-1.0], [2.0]]])
    scores.update(0, a1, g1, g1)
    scores.update(1, a1[:1], g1[:1], 2 * g1[:1])
    scores.update(1, a1[1:], g1[1:], 2 * g1[1:])
    out = scores.compute()
    assert out.tokens == 2
    assert out.sums["gxo"][0].tolist() == [-0.5 + 3.0, -1.0 + 2.0]
    assert out.sums["integrated_gradients"][1].tolist() == [2 * (-0.5 + 3.0), 2 * (-1.0 + 2.0)]
    assert out.sums["sq_magnitude"][0].tolist() == [10.0, 5.0]
    assert out.mean("gxo")[0].tolist() == [1.25, 0.5]
    with pytest.raises(ValueError, match="tokens, units, width"):
        scores.update(0, a1[0], g1[0])
