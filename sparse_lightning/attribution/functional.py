"""The attribution metrics as pure functions of activations and gradients.

Shapes: ``a`` and ``g`` are ``(..., units, width)``: the activation of each unit at the input of
the output projection and the gradient of the loss with respect to it. ``width`` is 1 for an MLP
neuron and ``head_dim`` for an attention head; every function returns ``(..., units)``.

Conventions (Song et al. 2024, arXiv:2406.06562; see docs in README):

* A *score* ranks units for keeping: higher = more important. GxO-type scores are the
  first-order rise of the loss when the unit is zeroed, ``-g . a`` (summed over the head's
  width for a head, which is the exact first-order change of zeroing the whole head).
* ``magnitude`` is ``|a|`` for a neuron and the L2 norm of the head's output vector.
* ``corrected_gxo`` adds half of the paper's error bound, ``0.5 * ||a_unit|| * ||g_layer||_2``,
  where ``||g_layer||_2`` is the norm of the gradient over all units of that layer and token.
  (The reference scripts average ``g*a`` over the head dimension instead of summing; that
  differs from ours by the constant factor ``head_dim`` in the GxO part of head scores.)

Example:
    >>> import torch
    >>> a = torch.tensor([[[1.0], [-2.0]]]); g = torch.tensor([[[0.5], [0.25]]])
    >>> gxo(a, g)
    tensor([[-0.5000,  0.5000]])
    >>> corrected_gxo(a, g)  # ||g|| = sqrt(0.3125)
    tensor([[-0.2205,  1.0590]])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def magnitude(a: Tensor) -> Tensor:
    """``|a|`` per neuron; the L2 norm of the output vector per head."""
    return torch.linalg.vector_norm(a, dim=-1)


def gradient(g: Tensor) -> Tensor:
    """The gradient summed over the unit's width (a neuron's own gradient)."""
    return g.sum(dim=-1)


def gxo(a: Tensor, g: Tensor) -> Tensor:
    """Gradient x output: the first-order rise of the loss when the unit is zeroed, ``-g . a``."""
    return -(g * a).sum(dim=-1)


def snip(a: Tensor, g: Tensor) -> Tensor:
    """SNIP: ``|g . a|``."""
    return gxo(a, g).abs()


def fisher(a: Tensor, g: Tensor) -> Tensor:
    """Fisher: ``(g . a)^2`` (ranks like SNIP)."""
    return gxo(a, g).square()


def layer_gradient_norm(g: Tensor) -> Tensor:
    """``||g||_2`` over every unit of the layer: ``(..., units, width) -> (...)``."""
    return torch.linalg.vector_norm(g.flatten(-2), dim=-1)


def corrected_gxo(a: Tensor, g: Tensor) -> Tensor:
    """GxO plus half of the paper's bound on its error: ``-g.a + 0.5 |a| ||g_layer||_2``."""
    return gxo(a, g) + 0.5 * magnitude(a) * layer_gradient_norm(g).unsqueeze(-1)


def integration_points(steps: int) -> Tensor:
    """The scales ``alpha_k = k / steps, k = 1..steps`` of the right Riemann sum for IG.

    The last point is always ``1``: the dense pass, so IG with one step is exactly GxO.
    """
    if steps < 1:
        raise ValueError(f"Integrated gradients needs steps >= 1, got {steps}.")
    return torch.arange(1, steps + 1, dtype=torch.float64) / steps


def integrated_gradients(a: Tensor, mean_path_gradient: Tensor) -> Tensor:
    """IG as a keep-score: ``-a . mean_k g(alpha_k a)``.

    Args:
        a: the unscaled activation.
        mean_path_gradient: the gradient averaged over the points of
            :func:`integration_points` (the loss's gradient where the units are ``alpha_k a``).

    By the fundamental theorem of calculus, summed over units this tends to
    ``F(0) - F(a)``: the loss rise when every unit on the path is zeroed.
    """
    return gxo(a, mean_path_gradient)


#: log10 range and bin count of the per-layer magnitude histograms (0.005 decades per bin).
HISTOGRAM_LOG10_RANGE = (-6.0, 3.0)
HISTOGRAM_BINS = 1800


def magnitude_histogram(magnitudes: Tensor) -> Tensor:
    """Counts of ``log10(magnitude)`` in :data:`HISTOGRAM_BINS` equal bins (clamped at the ends).

    Histograms add across batches and processes; :func:`histogram_quantile` inverts them.
    """
    lo, hi = HISTOGRAM_LOG10_RANGE
    logs = magnitudes.double().clamp_min(1e-30).log10()
    index = ((logs - lo) / (hi - lo) * HISTOGRAM_BINS).floor().clamp(0, HISTOGRAM_BINS - 1)
    return torch.bincount(index.long().flatten(), minlength=HISTOGRAM_BINS).double()


def histogram_quantile(histogram: Tensor, q: float) -> float:
    """The magnitude below which a fraction ``q`` of the histogram's values lie.

    Interpolates linearly in log space inside the bin where the cumulative count crosses ``q``.
    """
    lo, hi = HISTOGRAM_LOG10_RANGE
    total = float(histogram.sum())
    if total <= 0:
        raise ValueError("The histogram is empty: calibration saw no tokens.")
    if q <= 0:
        return 0.0
    cumulative = histogram.double().cumsum(0) / total
    b = int(
        torch.searchsorted(cumulative, torch.tensor(q, dtype=torch.float64)).clamp(
            max=HISTOGRAM_BINS - 1
        )
    )
    below = float(cumulative[b - 1]) if b > 0 else 0.0
    inside = float(histogram[b]) / total
    frac = 0.0 if inside <= 0 else min(max((q - below) / inside, 0.0), 1.0)
    width = (hi - lo) / HISTOGRAM_BINS
    return 10 ** (lo + (b + frac) * width)


@dataclass(frozen=True)
class AttributionMetric:
    """One row of :data:`METRICS`.

    Attributes:
        score: ``(a, g) -> (..., units)`` keep-score; for integrated gradients ``g`` is the
            gradient averaged over the integration path.
        one_backward: the score needs only the dense gradient (one backward), so it can also
            be taken per token at inference time (the oracle); integrated gradients needs
            ``ig_steps`` of them.
    """

    score: Callable[[Tensor, Tensor], Tensor]
    one_backward: bool = True


#: Every attribution metric, in the order the paper's table lists them: the one table that
#: calibration sums, statistics, checkpoints, selection and the CLI read.
METRICS: dict[str, AttributionMetric] = {
    "magnitude": AttributionMetric(lambda a, g: magnitude(a)),
    "gradient": AttributionMetric(lambda a, g: gradient(g)),
    "gxo": AttributionMetric(gxo),
    "snip": AttributionMetric(snip),
    "fisher": AttributionMetric(fisher),
    "integrated_gradients": AttributionMetric(integrated_gradients, one_backward=False),
    "corrected_gxo": AttributionMetric(corrected_gxo),
}

#: Per-unit sums calibration keeps besides the metrics (second moments, for variances).
AUXILIARY_SUMS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "sq_magnitude": lambda a, g: a.square().sum(-1),
    "sq_gradient": lambda a, g: g.square().sum(-1),
}

#: Metrics an oracle can score per token from one backward.
ORACLE_METRICS = tuple(name for name, m in METRICS.items() if m.one_backward)


def check_metric(metric: str, one_backward: bool = False) -> str:
    """``metric`` if it is in :data:`METRICS` (and needs one backward, when asked).

    Raises:
        ValueError: an unknown metric, or one that needs several backward passes.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {tuple(METRICS)}, got {metric!r}.")
    if one_backward and not METRICS[metric].one_backward:
        raise ValueError(
            f"The oracle scores each token from one backward; metric {metric!r} is not "
            f"available there. Choose one of {ORACLE_METRICS}."
        )
    return metric


def per_token_score(metric: str, a: Tensor, g: Tensor) -> Tensor:
    """The keep-score of ``metric`` for every token and unit (metrics that need one backward)."""
    return METRICS[check_metric(metric, one_backward=True)].score(a, g)
