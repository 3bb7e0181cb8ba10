"""sparse_lightning: attribution-based sparse activation for small language models."""

from sparse_lightning.architectures import (
    ARCHITECTURES,
    UnsupportedArchitectureError,
    resolve,
)
from sparse_lightning.attribution import METRICS, AttributionSums, Statistics, UnitStatistics
from sparse_lightning.calibration import AttributionCalibration
from sparse_lightning.checkpoint import CheckpointError
from sparse_lightning.data import (
    DataError,
    QACollator,
    QADataModule,
    TeacherForcedBatch,
    collate_token_ids,
    load_examples,
    load_truthfulqa,
)
from sparse_lightning.evaluation import QAEvaluation, QAMetrics
from sparse_lightning.models import load_demo_model, load_model
from sparse_lightning.module import SparseActivationModule
from sparse_lightning.selection import MODES, SparsityConfig
from sparse_lightning.units import UNIT_KINDS
from sparse_lightning.version import __version__

__all__ = [
    "ARCHITECTURES",
    "METRICS",
    "MODES",
    "UNIT_KINDS",
    "AttributionCalibration",
    "AttributionSums",
    "CheckpointError",
    "DataError",
    "QACollator",
    "QADataModule",
    "QAEvaluation",
    "QAMetrics",
    "SparseActivationModule",
    "SparsityConfig",
    "Statistics",
    "TeacherForcedBatch",
    "UnitStatistics",
    "UnsupportedArchitectureError",
    "__version__",
    "collate_token_ids",
    "load_demo_model",
    "load_examples",
    "load_model",
    "load_truthfulqa",
    "resolve",
]
