"""The one table of selection modes: which selector each mode builds for each unit kind.

Example:
    >>> sorted(MODES)
    ['dynamic', 'gate', 'magnitude', 'oracle', 'static']
    >>> MODES["magnitude"].needs_statistics
    False
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sparse_lightning.architectures import ResolvedArchitecture
from sparse_lightning.attribution.statistics import Statistics, UnitStatistics
from sparse_lightning.selection.oracle import OracleSelector
from sparse_lightning.selection.selectors import (
    DynamicSelector,
    GateSelector,
    MagnitudeSelector,
    Selector,
    StaticSelector,
)
from sparse_lightning.units import UNIT_KINDS


@dataclass(frozen=True)
class SelectionRequest:
    """What a mode's builder gets: one kind at one level, on one model."""

    kind: str
    sparsity: float
    metric: str
    architecture: ResolvedArchitecture
    statistics: Statistics | None

    @property
    def num_units(self) -> int:
        return self.architecture.units(self.kind)

    def kind_statistics(self, mode: str) -> UnitStatistics:
        if self.statistics is None:
            raise ValueError(
                f"mode={mode!r} reads calibrated statistics; load a checkpoint with "
                "SparseActivationModule.from_pretrained(model, path) or use mode='magnitude'."
            )
        if self.kind not in self.statistics.units:
            raise ValueError(
                f"This checkpoint has no statistics for {self.kind!r} (it measured "
                f"{sorted(self.statistics.units)}: an older version, or units=... left it out). "
                f"Recalibrate with every unit kind, or use mode='magnitude' for {self.kind!r}."
            )
        return self.statistics[self.kind]


@dataclass(frozen=True)
class SelectionMode:
    """One row of :data:`MODES`.

    Attributes:
        build: makes the selector of one kind.
        needs_statistics: reads a calibration checkpoint.
        summary: one line for tables and the CLI.
    """

    build: Callable[[SelectionRequest], Selector]
    needs_statistics: bool
    summary: str


def _static(request: SelectionRequest) -> Selector:
    arch = request.architecture
    # GQA heads are chosen group-balanced, so a compacted model stays a valid GQA model.
    grouped = UNIT_KINDS[request.kind].per_head and arch.num_kv_heads < arch.num_heads
    return StaticSelector.from_statistics(
        request.kind_statistics("static"),
        request.sparsity,
        request.metric,
        arch.num_kv_heads if grouped else 1,
    )


def _gate(request: SelectionRequest) -> Selector:
    if UNIT_KINDS[request.kind].site == "mlp_out":
        return GateSelector(request.sparsity, request.num_units)
    return MagnitudeSelector(request.sparsity, request.num_units)


#: mode -> how its selectors are built.
MODES: dict[str, SelectionMode] = {
    "dynamic": SelectionMode(
        lambda r: DynamicSelector.from_statistics(r.kind_statistics("dynamic"), r.sparsity),
        needs_statistics=True,
        summary="per token, units above the layer's calibrated magnitude threshold",
    ),
    "magnitude": SelectionMode(
        lambda r: MagnitudeSelector(r.sparsity, r.num_units),
        needs_statistics=False,
        summary="per token, the top-k units by magnitude",
    ),
    "static": SelectionMode(
        _static,
        needs_statistics=True,
        summary="one fixed set per layer by the calibrated mean score (compactable)",
    ),
    "oracle": SelectionMode(
        lambda r: OracleSelector(r.sparsity, r.num_units, r.metric),
        needs_statistics=False,
        summary="per token, top-k by the batch's own gradients (research only)",
    ),
    "gate": SelectionMode(
        _gate,
        needs_statistics=False,
        summary="MLP neurons by the gate activation, so batch-1 decode can skip work",
    ),
}


#: Which tokens a setting makes sparse: decode steps only (the default), or every token.
PHASES = ("decode", "all")


def check_mode(mode: str) -> str:
    """``mode`` if it is in :data:`MODES`, else a ``ValueError`` listing them."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}.")
    return mode
