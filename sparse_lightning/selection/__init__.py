"""Selection: which units a sparse forward keeps, from calibrated statistics or on the fly."""

from sparse_lightning.selection.config import SparsityConfig, build_selectors, check_level
from sparse_lightning.selection.modes import MODES
from sparse_lightning.selection.oracle import OracleSelector, prepare_oracles
from sparse_lightning.selection.selectors import (
    DynamicSelector,
    GateSelector,
    MagnitudeSelector,
    Selector,
    StaticSelector,
    kept_count,
)

__all__ = [
    "MODES",
    "DynamicSelector",
    "GateSelector",
    "MagnitudeSelector",
    "OracleSelector",
    "Selector",
    "SparsityConfig",
    "StaticSelector",
    "build_selectors",
    "check_level",
    "kept_count",
    "prepare_oracles",
]
