"""``SparsityConfig``: how many units of each kind to zero and how to choose them, and
:func:`build_selectors`, which turns a config into one selector per kind.

Example:
    >>> config = SparsityConfig(mlp=0.5, mode="magnitude")
    >>> config.mlp, config.heads, config.is_dense
    (0.5, 0.0, False)
    >>> {k: v for k, v in SparsityConfig.uniform(0.3).levels.items() if v}
    {'mlp': 0.3, 'heads': 0.3}
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from sparse_lightning.architectures import ResolvedArchitecture
from sparse_lightning.attribution.functional import check_metric
from sparse_lightning.attribution.statistics import Statistics
from sparse_lightning.selection.allocation import (
    CHANNEL_KINDS,
    allocate,
    check_allocation,
    check_budget,
)
from sparse_lightning.selection.modes import MODES, PHASES, SelectionRequest, check_mode
from sparse_lightning.selection.selectors import DynamicSelector, Selector
from sparse_lightning.units import (
    UNIT_KINDS,
    check_kinds,
    kind_names,
    shared_sites,
    uniform_kinds,
)


def check_level(name: str, value: object) -> float:
    """A sparsity level: a real number in ``[0, 1)``, the fraction of units zeroed.

    Args:
        name: how the error names the argument (``"mlp sparsity"``, ``"sparsity"``).
        value: the level.

    Raises:
        TypeError: not a number (a string such as ``"0.5"``, ``None``, a bool).
        ValueError: outside ``[0, 1)``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a number in [0, 1), got {value!r} ({type(value).__name__}); "
            "0.5 zeroes half of the units."
        )
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(
            f"{name} must be in [0, 1) (the fraction of units zeroed), got {value}; "
            "0.5 zeroes half."
        )
    return float(value)


#: The constructor's options besides the levels.
OPTIONS = (
    "mode",
    "metric",
    "phase",
    "budget",
    "allocation",
    "lm_head",
    "lm_head_candidates",
    "lm_head_basis",
)
#: ``lm_head_basis`` values (see :mod:`sparse_lightning.inference.output`).
LM_HEAD_BASES = ("auto", "rotated", "channels")


class SparsityConfig:
    """Fractions of units zeroed per kind and how they are chosen.

    Args:
        levels: unit kind (see :mod:`sparse_lightning.units`) -> fraction of that kind's units
            zeroed per layer, in ``[0, 1)``. Kinds left out stay dense. Read-only afterwards.
        mode: a selection mode (see :data:`~sparse_lightning.selection.modes.MODES`):
            ``"dynamic"`` (default), ``"magnitude"``, ``"static"``, ``"oracle"`` or ``"gate"``.
        metric: calibrated metric ranking units for ``static`` and ``oracle``.
        phase: ``"decode"`` (default): a prompt's forward runs dense and decode steps sparse,
            as in the paper and TEAL (teacher forcing makes the answer's tokens sparse);
            ``"all"``: every token of every forward.
        budget: instead of levels for the channel kinds, the share of the weight bytes
            streamed per decode token to skip, spread over kinds and layers by
            ``allocation`` (see :mod:`~sparse_lightning.selection.allocation`); needs
            ``mode="dynamic"``.
        allocation: ``"auto"`` (default: the measured table the checkpoint holds, greedy
            first, else uniform), ``"uniform"``, ``"greedy"`` (TEAL) or ``"attribution"``.
        lm_head: the fraction of the output projection's input channels dropped per token
            (each token keeps its largest; no calibration needed), in ``[0, 1)``; its
            ``lm_head_candidates`` largest logits are recomputed exactly, so greedy decoding
            keeps the dense token whenever it ranks among them (see
            :mod:`~sparse_lightning.inference.output`). It adds to a ``budget``'s bytes.
        lm_head_candidates: logits recomputed exactly per token (default 64).
        lm_head_basis: where the lm_head drops channels: ``"rotated"``, the calibrated
            eigenbasis of its input (a small rotation per token and a bfloat16 copy of the
            lm_head, half its size; needs a checkpoint of format /3); ``"channels"``, the
            input's own channels; ``"auto"`` (default) rotated when the statistics allow it.
        **per_kind: levels as keywords (``mlp=0.5, heads=0.25``), merged into ``levels``.

    Raises:
        TypeError, ValueError: an unknown kind, a level that is not a number in ``[0, 1)``, an
            unknown mode or metric.
    """

    __slots__ = (
        "allocation",
        "budget",
        "levels",
        "lm_head",
        "lm_head_basis",
        "lm_head_candidates",
        "metric",
        "mode",
        "phase",
    )

    def __init__(
        self,
        levels: Mapping[str, float] | None = None,
        *,
        mode: str = "dynamic",
        metric: str = "corrected_gxo",
        phase: str = "decode",
        budget: float | None = None,
        allocation: str = "auto",
        lm_head: float = 0.0,
        lm_head_candidates: int = 64,
        lm_head_basis: str = "auto",
        **per_kind: float,
    ) -> None:
        given = {**dict(levels or {}), **per_kind}
        check_kinds(given or kind_names(), "sparsity levels")
        checked = {
            kind: check_level(f"{kind} sparsity", given.get(kind, 0.0)) for kind in UNIT_KINDS
        }
        clash = shared_sites(kind for kind, level in checked.items() if level > 0)
        if clash:
            site, names = next(iter(clash.items()))
            raise ValueError(
                f"{' and '.join(names)} both select at the input of the same projections "
                f"({site}); give a level to one of them."
            )
        object.__setattr__(self, "levels", MappingProxyType(checked))
        object.__setattr__(self, "mode", check_mode(mode))
        object.__setattr__(self, "metric", check_metric(metric))
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}.")
        object.__setattr__(self, "phase", phase)
        check_allocation(allocation)
        if budget is not None:
            budget = check_budget(budget)
            named = [k for k in (*CHANNEL_KINDS, "heads") if checked.get(k)]
            if named:
                raise ValueError(
                    f"A budget spreads over the channel kinds {CHANNEL_KINDS} itself; drop the "
                    f"levels of {named}, or drop the budget."
                )
            if mode != "dynamic":
                raise ValueError(
                    f"A budget runs thresholds (mode='dynamic'), got mode={mode!r}; give levels "
                    "per kind for other modes."
                )
        object.__setattr__(self, "budget", budget)
        object.__setattr__(self, "allocation", allocation)
        object.__setattr__(self, "lm_head", check_level("lm_head sparsity", lm_head))
        if (
            isinstance(lm_head_candidates, bool)
            or not isinstance(lm_head_candidates, numbers.Integral)
            or lm_head_candidates < 1
        ):
            raise ValueError(
                f"lm_head_candidates must be a whole number >= 1 (logits recomputed exactly per "
                f"token), got {lm_head_candidates!r}; 64 is the default."
            )
        object.__setattr__(self, "lm_head_candidates", int(lm_head_candidates))
        if lm_head_basis not in LM_HEAD_BASES:
            raise ValueError(
                f"lm_head_basis must be one of {LM_HEAD_BASES}, got {lm_head_basis!r}; 'auto' "
                "rotates when the checkpoint allows it."
            )
        object.__setattr__(self, "lm_head_basis", lm_head_basis)

    @classmethod
    def uniform(cls, sparsity: float, **options: Any) -> SparsityConfig:
        """The same level for every kind a bare level applies to (the paper's units)."""
        return cls(dict.fromkeys(uniform_kinds(), sparsity), **options)

    @classmethod
    def from_arguments(
        cls, sparsity: float | SparsityConfig | None = None, **arguments: Any
    ) -> SparsityConfig:
        """The config of ``set_sparsity(sparsity, mode=..., ..., **levels)``.

        ``sparsity`` is the level of every uniform kind (``UnitKind.uniform``: MLP neurons and
        heads) not named in ``arguments`` (0 when omitted), or a whole config, which then comes
        alone. ``arguments`` are the constructor's options and levels; one given as ``None``
        counts as not given.
        """
        given = {key: value for key, value in arguments.items() if value is not None}
        if isinstance(sparsity, SparsityConfig):
            if given:
                raise TypeError(
                    "Pass either a SparsityConfig or levels/mode/metric, not both; change a "
                    "config with config.replace(mlp=..., mode=...)."
                )
            return sparsity
        base = 0.0 if sparsity is None else check_level("sparsity", sparsity)
        options = {key: given.pop(key) for key in OPTIONS if key in given}
        return cls({**dict.fromkeys(uniform_kinds(), base), **given}, **options)

    def __getattr__(self, name: str) -> float:
        # ``config.mlp``, ``config.heads``: one attribute per row of the unit table.
        if name in UNIT_KINDS:
            return self.levels[name]
        raise AttributeError(f"'SparsityConfig' object has no attribute {name!r}")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("SparsityConfig is immutable; build a new one (replace(...)).")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SparsityConfig) and self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.as_dict().items()))

    def __repr__(self) -> str:
        levels = ", ".join(f"{k}={v}" for k, v in self.levels.items() if v)
        options = f"mode={self.mode!r}, metric={self.metric!r}, phase={self.phase!r}"
        if self.budget is not None:
            options += f", budget={self.budget}, allocation={self.allocation!r}"
        if self.lm_head:
            options += f", lm_head={self.lm_head}, lm_head_candidates={self.lm_head_candidates}"
            options += f", lm_head_basis={self.lm_head_basis!r}"
        return f"SparsityConfig({levels}{', ' if levels else ''}{options})"

    def __reduce__(self) -> tuple:
        return (_rebuild, (self.as_dict(),))

    @property
    def is_dense(self) -> bool:
        return not any(self.levels.values()) and not self.budget and not self.lm_head

    def replace(self, **changes: Any) -> SparsityConfig:
        """A copy with some levels (as keywords), ``mode`` or ``metric`` changed."""
        return _rebuild({**self.as_dict(), **changes})

    def as_dict(self) -> dict[str, Any]:
        """Every kind's level, then the options (one flat row for tables)."""
        return {
            **self.levels,
            "mode": self.mode,
            "metric": self.metric,
            "phase": self.phase,
            "budget": self.budget,
            "allocation": self.allocation,
            "lm_head": self.lm_head,
            "lm_head_candidates": self.lm_head_candidates,
            "lm_head_basis": self.lm_head_basis,
        }


def build_selectors(
    config: SparsityConfig, architecture: ResolvedArchitecture, statistics: Statistics | None
) -> dict[str, Selector]:
    """One selector per unit kind with non-zero sparsity, as the config's mode builds them;
    with a budget, thresholds at the levels its allocation gives each kind and layer."""
    build = MODES[config.mode].build
    selectors = {
        kind: build(SelectionRequest(kind, level, config.metric, architecture, statistics))
        for kind, level in config.levels.items()
        if level > 0.0
    }
    if config.budget:
        levels = allocate(config.budget, config.allocation, architecture, statistics)
        request = SelectionRequest(CHANNEL_KINDS[0], 0.0, config.metric, architecture, statistics)
        for kind, per_layer in levels.items():
            if float(per_layer.max()) > 0.0:
                stats = dataclasses.replace(request, kind=kind).kind_statistics("dynamic")
                selectors[kind] = DynamicSelector.from_statistics(stats, per_layer)
    return selectors


def _rebuild(row: Mapping[str, Any]) -> SparsityConfig:
    row = dict(row)
    options = {key: row.pop(key) for key in OPTIONS if key in row}
    return SparsityConfig(**options, **row)
