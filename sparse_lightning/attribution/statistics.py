"""The result of a calibration run: per-layer, per-unit sums over calibration tokens.

One :class:`UnitStatistics` per unit kind (see :mod:`sparse_lightning.units`); a
:class:`Statistics` bundles them with what produced them. The same object is what the
calibration callback produces, what a sparsity checkpoint stores and what selectors read.

Every tensor is a *sum over tokens* (float64), so runs on several processes or several datasets
combine by addition; divide by ``tokens`` (``mean``/``score``) for per-token averages.

Shapes, with ``L`` layers and ``U`` units per layer (``U`` = MLP width or number of heads):

===================  ========  ===============================================================
name                 shape     sum over answer tokens of
===================  ========  ===============================================================
magnitude            (L, U)    ``|a|`` (head: ``||a_head||_2``)
sq_magnitude         (L, U)    ``a^2`` (head: ``||a_head||^2``)
gradient             (L, U)    ``g`` (head: summed over head_dim)
sq_gradient          (L, U)    ``g^2`` (head: ``||g_head||^2``)
gxo                  (L, U)    ``-g.a`` (the GxO keep-score)
snip                 (L, U)    ``|g.a|``
fisher               (L, U)    ``(g.a)^2``
corrected_gxo        (L, U)    ``-g.a + 0.5 |a| ||g_layer||_2``
integrated_gradients (L, U)    ``-a . mean_k g(alpha_k a)`` (only when IG ran)
layer_grad_norm      (L,)      ``||g_layer||_2`` (norm over all units of the layer)
magnitude_histogram  (L, 1800) counts of ``log10 |a|`` (per-unit magnitude; see functional)
===================  ========  ===============================================================

Beside the units, :attr:`Statistics.output` holds the output projection's (lm_head's) input
``x``: ``second_moment`` ``(H, H)``, the sum of ``x x^T`` over the answer-predicting tokens,
and ``tokens``; its eigenbasis is where a sparse lm_head drops channels
(:mod:`sparse_lightning.inference.output`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from sparse_lightning.attribution.functional import (
    AUXILIARY_SUMS,
    METRICS,
    check_metric,
    histogram_quantile,
)
from sparse_lightning.units import UNIT_KINDS

#: Key prefix of the allocation tables in the flat (safetensors) layout.
ALLOCATION_PREFIX = "allocation"
#: Key prefix of the output projection's input statistics in the flat layout.
OUTPUT_PREFIX = "lm_head"

#: Per-unit sums a run accumulates: every metric (``integrated_gradients`` only when IG steps
#: > 0) and the auxiliary second moments.
UNIT_SUMS = (*METRICS, *AUXILIARY_SUMS)


@dataclass
class UnitStatistics:
    """Sums over calibration tokens for one unit kind.

    Attributes:
        kind: the unit kind (see :mod:`sparse_lightning.units`).
        tokens: number of tokens summed over.
        sums: name (see :data:`UNIT_SUMS`) -> ``(layers, units)`` float64 tensor.
        layer_grad_norm: ``(layers,)`` sum over tokens of the layer's gradient norm.
        magnitude_histogram: ``(layers, bins)`` counts of unit magnitudes over tokens (per-layer
            magnitude quantiles, e.g. thresholds for a target sparsity).

    Example:
        >>> import torch
        >>> s = UnitStatistics("mlp", 2, {"gxo": torch.ones(1, 3, dtype=torch.float64)},
        ...                    torch.ones(1))
        >>> s.mean("gxo")
        tensor([[0.5000, 0.5000, 0.5000]], dtype=torch.float64)
    """

    kind: str
    tokens: int
    sums: dict[str, Tensor]
    layer_grad_norm: Tensor
    magnitude_histogram: Tensor | None = None

    def __setattr__(self, name: str, value: object) -> None:
        # One row per layer even with one layer (a hybrid's lone attention layer): torchmetrics
        # squeezes one-element tensors in what compute() returns, field by field.
        if name == "layer_grad_norm" and isinstance(value, Tensor):
            value = value.reshape(-1)
        super().__setattr__(name, value)

    def magnitude_threshold(self, layer: int, sparsity: float) -> float:
        """The magnitude under which a fraction ``sparsity`` of layer ``layer``'s units fell."""
        if self.magnitude_histogram is None:
            raise KeyError("These statistics have no magnitude histogram (recalibrate).")
        return histogram_quantile(self.magnitude_histogram[layer], sparsity)

    @property
    def num_layers(self) -> int:
        return int(self.layer_grad_norm.shape[0])

    @property
    def num_units(self) -> int:
        return int(next(iter(self.sums.values())).shape[1])

    def mean(self, name: str) -> Tensor:
        """Per-token average of the sum ``name``."""
        if name not in self.sums:
            hint = " (run calibration with ig_steps > 0)" if name == "integrated_gradients" else ""
            raise KeyError(f"No statistic {name!r}{hint}; available: {sorted(self.sums)}.")
        return self.sums[name] / self.tokens

    def score(self, metric: str) -> Tensor:
        """Mean per-token keep-score of every unit under ``metric`` (one of :data:`METRICS`)."""
        return self.mean(check_metric(metric))


@dataclass
class Statistics:
    """Calibration statistics of every unit kind, with a description of the run.

    Attributes:
        units: unit kind (see :mod:`sparse_lightning.units`) -> :class:`UnitStatistics`.
        ig_steps: integration steps used for integrated gradients (0 = not computed).
        metadata: free-form strings describing the run (targets, dataset, model).
        allocations: allocation method -> its table (``"budgets"`` ``(G,)`` and ``"levels"``
            ``(G, layers, kinds)``), measured after calibration (see
            :mod:`sparse_lightning.selection.allocation`); stored as ``allocation.<method>.*``.
        output: the output projection's input statistics (``second_moment``, ``tokens``; see
            the module docstring), stored as ``lm_head.*``; empty for checkpoints written
            before they were measured, or for a model without a linear lm_head.
    """

    units: dict[str, UnitStatistics]
    ig_steps: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    allocations: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    output: dict[str, Tensor] = field(default_factory=dict)

    def __getattr__(self, name: str) -> UnitStatistics:
        # ``statistics.mlp``, ``statistics.heads``: one attribute per row of the unit table.
        if name in UNIT_KINDS:
            return self[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def tokens(self) -> int:
        return next(iter(self.units.values())).tokens

    def kinds_missing(self, kinds: list[str] | tuple[str, ...]) -> list[str]:
        """Which of ``kinds`` this run did not measure (an older checkpoint, or ``units=``)."""
        return [kind for kind in kinds if kind not in self.units]

    def __getitem__(self, kind: str) -> UnitStatistics:
        if kind not in self.units:
            raise KeyError(f"No statistics for {kind!r}; this run measured {sorted(self.units)}.")
        return self.units[kind]

    def tensors(self) -> dict[str, Tensor]:
        """Flat ``"<kind>.<name>" -> tensor`` mapping (the safetensors layout)."""
        flat: dict[str, Tensor] = {}
        for kind, stats in self.units.items():
            for name, value in stats.sums.items():
                flat[f"{kind}.{name}"] = value
            flat[f"{kind}.layer_grad_norm"] = stats.layer_grad_norm
            if stats.magnitude_histogram is not None:
                flat[f"{kind}.magnitude_histogram"] = stats.magnitude_histogram
            flat[f"{kind}.tokens"] = torch.tensor([stats.tokens], dtype=torch.int64)
        for method, table in self.allocations.items():
            for name, value in table.items():
                flat[f"{ALLOCATION_PREFIX}.{method}.{name}"] = value
        for name, value in self.output.items():
            flat[f"{OUTPUT_PREFIX}.{name}"] = value
        return flat

    @classmethod
    def from_tensors(
        cls, flat: dict[str, Tensor], ig_steps: int = 0, metadata: dict[str, str] | None = None
    ) -> Statistics:
        """Inverse of :meth:`tensors`."""
        grouped: dict[str, dict[str, Tensor]] = {}
        allocations: dict[str, dict[str, Tensor]] = {}
        output: dict[str, Tensor] = {}
        for key, value in flat.items():
            kind, _, name = key.partition(".")
            if kind == OUTPUT_PREFIX:
                output[name] = value
                continue
            if kind == ALLOCATION_PREFIX:
                method, _, part = name.partition(".")
                allocations.setdefault(method, {})[part] = value
                continue
            grouped.setdefault(kind, {})[name] = value
        units = {}
        for kind, named in grouped.items():
            tokens = int(named.pop("tokens").item())
            grad_norm = named.pop("layer_grad_norm")
            histogram = named.pop("magnitude_histogram", None)
            units[kind] = UnitStatistics(kind, tokens, named, grad_norm, histogram)
        return cls(units, ig_steps, dict(metadata or {}), allocations, output)
