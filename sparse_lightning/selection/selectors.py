"""Selection rules: turn one layer's unit activations into a keep-mask.

Every selector answers ``keep(layer, units) -> mask`` where ``units`` is ``(tokens, U, width)``
(see :meth:`~sparse_lightning.attribution.capture.ActivationCapture.unit_view`) and the mask is
bool ``(tokens, U)`` or ``(U,)`` for a fixed set. Nothing here runs a backward pass; the oracle
(:mod:`~sparse_lightning.selection.oracle`) is handed its gradients. :data:`MODES` is the one
table of selection modes.

=============  =================================================================================
mode           rule
=============  =================================================================================
magnitude      per token, keep the ``k`` units of largest ``||a||`` (the baseline)
dynamic        per token, keep units whose ``||a||`` reaches the layer's calibrated threshold:
               the magnitude quantile at the target sparsity over calibration tokens. The
               count kept varies per token; on calibration-like data the mean sparsity is the
               target. One comparison per unit replaces a sort.
static         one fixed set per layer: the ``k`` units of highest mean calibrated score
oracle         per token, the ``k`` units of highest score from that sequence's own gradients
gate           MLP: per token, the ``k`` neurons of largest gate activation ``|act(x W_gate)|``,
               known before the up projection runs, so decode can skip the rest's work
               (:mod:`~sparse_lightning.inference.gate`); heads as ``magnitude``
=============  =================================================================================

Example:
    >>> import torch
    >>> sel = MagnitudeSelector(sparsity=0.5, num_units=4)
    >>> sel.keep(0, torch.tensor([[[1.0], [-3.0], [0.5], [2.0]]]))
    tensor([[False,  True, False,  True]])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sparse_lightning.attribution import functional as F
from sparse_lightning.attribution.statistics import UnitStatistics


def kept_count(num_units: int, sparsity: float) -> int:
    """Units kept per layer at ``sparsity`` (at least one)."""
    return max(1, num_units - round(sparsity * num_units))


def top_k_mask(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` largest entries along the last dimension."""
    if k >= scores.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    index = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, True)


class Selector:
    """Base class: override :meth:`keep`.

    Attributes:
        reads: what the decision is taken from, which decides the executor that
            :class:`~sparse_lightning.inference.sparsifier.Sparsifier` installs: ``"units"``
            (the units themselves, masked at the projection input) or ``"gate"`` (the MLP's
            gate activation, before the neurons exist).
        needs_batch: the masks come from the batch itself and must be prepared before each
            forward (the oracle).
    """

    reads = "units"
    needs_batch = False

    def keep(self, layer: int, units: Tensor) -> Tensor:
        raise NotImplementedError


class MagnitudeSelector(Selector):
    """Per-token top-k by activation magnitude (no calibration needed)."""

    def __init__(self, sparsity: float, num_units: int) -> None:
        self.k = kept_count(num_units, sparsity)

    def keep(self, layer: int, units: Tensor) -> Tensor:
        return top_k_mask(F.magnitude(units), self.k)


class GateSelector(MagnitudeSelector):
    """Per-token top-k by the gate activation (the activation itself in a plain MLP).

    :class:`~sparse_lightning.inference.gate.GateExecutor` feeds it ``act(x W_gate)`` instead
    of the neuron activation; :meth:`keep_index` serves the single-token path that gathers.
    """

    reads = "gate"

    def keep_index(self, layer: int, gate: Tensor) -> Tensor:
        """Indices of the ``k`` kept neurons of one token's ``(U,)`` gate activation."""
        return gate.abs().topk(self.k).indices


class DynamicSelector(Selector):
    """Per-token comparison with per-layer magnitude thresholds from calibration.

    A threshold is known before the units are: an input-sparse kernel applies it while it
    reads the weights (``reads = "threshold"``, see :mod:`~sparse_lightning.inference.skip`).

    Args:
        thresholds: ``(layers,)``, a unit is kept when ``||a|| >= thresholds[layer]``.
    """

    reads = "threshold"

    def __init__(self, thresholds: Tensor) -> None:
        self.thresholds = thresholds

    def threshold(self, layer: int) -> float:
        """Layer ``layer``'s threshold, as the float32 value :meth:`keep` compares with."""
        return float(self.thresholds[layer])

    @classmethod
    def from_statistics(
        cls, stats: UnitStatistics, sparsity: float | Sequence[float] | Tensor
    ) -> DynamicSelector:
        """Thresholds at the ``sparsity`` quantile of each layer's calibrated magnitudes
        (one level for every layer, or one per layer)."""
        levels = [float(sparsity)] * stats.num_layers if _scalar(sparsity) else list(sparsity)
        thresholds = [
            stats.magnitude_threshold(layer, float(level)) for layer, level in enumerate(levels)
        ]
        return cls(torch.tensor(thresholds, dtype=torch.float32))

    def keep(self, layer: int, units: Tensor) -> Tensor:
        return F.magnitude(units) >= self.thresholds[layer].to(units.dtype)


class StaticSelector(Selector):
    """A fixed set of units per layer: the top-k by a calibrated mean score.

    Args:
        masks: ``(layers, units)`` bool.
    """

    def __init__(self, masks: Tensor) -> None:
        self.masks = masks

    @classmethod
    def from_statistics(
        cls, stats: UnitStatistics, sparsity: float, metric: str, groups: int = 1
    ) -> StaticSelector:
        """Top-k per layer; with ``groups > 1`` (GQA heads), the same k within every group.

        Balanced groups keep the model a valid GQA model after compaction (every key/value
        head keeps the same number of query heads).
        """
        scores = stats.score(metric).float()
        grouped = scores.unflatten(-1, (groups, scores.shape[-1] // groups))
        k = kept_count(grouped.shape[-1], sparsity)
        return cls(top_k_mask(grouped, k).flatten(-2))

    def keep(self, layer: int, units: Tensor) -> Tensor:
        return self.masks[layer].to(units.device)


def _scalar(value: object) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, Tensor) and value.dim() == 0)
