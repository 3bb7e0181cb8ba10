"""``AttributionSums``: torchmetrics state for the per-unit attribution sums of one unit kind,
and ``SecondMoment``: the sum of ``x x^T`` over tokens (the lm_head input's statistics).

The math lives in :mod:`sparse_lightning.attribution.functional`; this class only adds token
sums into ``dist_reduce_fx="sum"`` states, so Lightning DDP runs add up across processes and
``compute()`` (collective: call it on every rank) returns the same
:class:`~sparse_lightning.attribution.statistics.UnitStatistics` everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from sparse_lightning.attribution import functional as F
from sparse_lightning.attribution.statistics import UnitStatistics


class AttributionSums(Metric):
    """Accumulates attribution sums per layer and unit for one unit kind.

    Args:
        kind: the unit kind (recorded in the result).
        num_layers: decoder layers.
        num_units: units per layer (MLP width or number of heads).
        integrated_gradients: also accumulate IG (needs ``mean_path_gradient`` in ``update``).

    Example:
        >>> import torch
        >>> sums = AttributionSums("mlp", num_layers=1, num_units=2)
        >>> a = torch.tensor([[[1.0], [2.0]]]); g = torch.tensor([[[0.5], [-1.0]]])
        >>> sums.update(0, a, g)
        >>> sums.compute().sums["gxo"]
        tensor([[-0.5000,  2.0000]], dtype=torch.float64)
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(
        self, kind: str, num_layers: int, num_units: int, integrated_gradients: bool = False
    ) -> None:
        super().__init__()
        self.kind = kind
        self.with_ig = integrated_gradients
        self._metrics = {
            name: metric
            for name, metric in F.METRICS.items()
            if metric.one_backward or integrated_gradients
        }
        zeros = torch.zeros(num_layers, num_units, dtype=torch.float64)
        for name in (*self._metrics, *F.AUXILIARY_SUMS):
            self.add_state(name, default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state(
            "magnitude_histogram",
            default=torch.zeros(num_layers, F.HISTOGRAM_BINS, dtype=torch.float64),
            dist_reduce_fx="sum",
        )
        self.add_state(
            "layer_grad_norm",
            default=torch.zeros(num_layers, dtype=torch.float64),
            dist_reduce_fx="sum",
        )
        # One count per layer: every layer sees the same tokens, but counting per layer catches
        # a layer that was silently skipped.
        self.add_state(
            "tokens", default=torch.zeros(num_layers, dtype=torch.int64), dist_reduce_fx="sum"
        )

    def update(  # type: ignore[override]
        self, layer: int, a: Tensor, g: Tensor, mean_path_gradient: Tensor | None = None
    ) -> None:
        """Add the tokens of one layer.

        Args:
            layer: layer index.
            a: ``(tokens, units, width)`` activations (width 1 for neurons, head_dim for heads).
            g: gradient of the loss with respect to ``a``, same shape.
            mean_path_gradient: IG only: gradient averaged over the integration points.
        """
        if a.shape != g.shape or a.dim() != 3:
            raise ValueError(
                f"a and g must both be (tokens, units, width); got {tuple(a.shape)} and "
                f"{tuple(g.shape)}."
            )
        if self.with_ig and mean_path_gradient is None:
            raise ValueError("integrated_gradients=True needs mean_path_gradient in update.")
        a, g = a.double(), g.double()
        path = None if mean_path_gradient is None else mean_path_gradient.double()
        for name, metric in self._metrics.items():
            getattr(self, name)[layer] += metric.score(a, g if metric.one_backward else path).sum(0)
        for name, fn in F.AUXILIARY_SUMS.items():
            getattr(self, name)[layer] += fn(a, g).sum(0)
        self.magnitude_histogram[layer] += F.magnitude_histogram(F.magnitude(a))
        self.layer_grad_norm[layer] += F.layer_gradient_norm(g).sum()
        self.tokens[layer] += a.shape[0]

    def compute(self) -> UnitStatistics:
        """The accumulated sums (after summing over processes)."""
        tokens = self.tokens
        if int(tokens.min()) != int(tokens.max()):
            raise RuntimeError(
                f"Layers saw different token counts {tokens.tolist()}; a hook did not fire in "
                "every layer. This is a bug in sparse_lightning: please report it."
            )
        names = (*self._metrics, *F.AUXILIARY_SUMS)
        return UnitStatistics(
            self.kind,
            int(tokens[0]),
            {name: getattr(self, name).clone() for name in names},
            self.layer_grad_norm.clone(),
            self.magnitude_histogram.clone(),
        )


class SecondMoment(Metric):
    """Accumulates ``sum over tokens of x x^T`` (float64) and the token count.

    Args:
        features: the width of ``x``.

    Example:
        >>> import torch
        >>> moment = SecondMoment(2)
        >>> moment.update(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
        >>> moment.compute()["second_moment"]
        tensor([[1., 2.],
                [2., 5.]], dtype=torch.float64)
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, features: int) -> None:
        super().__init__()
        zeros = torch.zeros(features, features, dtype=torch.float64)
        self.add_state("second_moment", default=zeros, dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.zeros(1, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, x: Tensor) -> None:  # type: ignore[override]
        """Add ``(tokens, features)`` rows."""
        x = x.detach().double()
        self.second_moment += x.T @ x
        self.tokens += x.shape[0]

    def compute(self) -> dict[str, Tensor]:
        """``{"second_moment": (features, features), "tokens": (1,)}`` (summed over processes)."""
        return {"second_moment": self.second_moment.clone(), "tokens": self.tokens.clone()}
