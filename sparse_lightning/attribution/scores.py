"""``AttributionScores``: torchmetrics state for the per-unit attribution sums of one unit kind.

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
from sparse_lightning.attribution.statistics import UNIT_SUMS, UnitStatistics


class AttributionScores(Metric):
    """Accumulates attribution sums per layer and unit for MLP neurons or attention heads.

    Args:
        kind: ``"mlp"`` or ``"heads"`` (recorded in the result).
        num_layers: decoder layers.
        num_units: units per layer (MLP width or number of heads).
        integrated_gradients: also accumulate IG (needs ``mean_path_gradient`` in ``update``).

    Example:
        >>> import torch
        >>> scores = AttributionScores("mlp", num_layers=1, num_units=2)
        >>> a = torch.tensor([[[1.0], [2.0]]]); g = torch.tensor([[[0.5], [-1.0]]])
        >>> scores.update(0, a, g)
        >>> scores.compute().sums["gxo"]
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
        self._per_unit = [
            name for name in UNIT_SUMS if integrated_gradients or name != "integrated_gradients"
        ]
        zeros = torch.zeros(num_layers, num_units, dtype=torch.float64)
        for name in self._per_unit:
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
        a, g = a.double(), g.double()
        per_unit = {
            "magnitude": F.magnitude(a),
            "sq_magnitude": a.square().sum(-1),
            "gradient": F.gradient(g),
            "sq_gradient": g.square().sum(-1),
            "gxo": F.gxo(a, g),
            "snip": F.snip(a, g),
            "fisher": F.fisher(a, g),
            "corrected_gxo": F.corrected_gxo(a, g),
        }
        if self.with_ig:
            if mean_path_gradient is None:
                raise ValueError("integrated_gradients=True needs mean_path_gradient in update.")
            per_unit["integrated_gradients"] = F.integrated_gradients(
                a, mean_path_gradient.double()
            )
        for name, value in per_unit.items():
            state = getattr(self, name)
            state[layer] += value.sum(0)
        self.magnitude_histogram[layer] += F.magnitude_histogram(per_unit["magnitude"])
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
        sums = {name: getattr(self, name).clone() for name in self._per_unit}
        return UnitStatistics(
            self.kind,
            int(tokens[0]),
            sums,
            self.layer_grad_norm.clone(),
            self.magnitude_histogram.clone(),
        )
