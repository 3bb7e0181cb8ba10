"""sparse_lightning: attribution-based sparse activation for small language models."""

from sparse_lightning.architectures import (
    ARCHITECTURES,
    UnsupportedArchitectureError,
    resolve,
)
from sparse_lightning.attribution import METRICS, AttributionScores, Statistics, UnitStatistics
from sparse_lightning.calibration import AttributionCalibration
from sparse_lightning.data import QACollator, collate_token_ids, load_truthfulqa
from sparse_lightning.datamodule import QADataModule
from sparse_lightning.evaluation import QAEvaluation, QAMetrics
from sparse_lightning.models import load_demo_model, load_model
from sparse_lightning.module import SparseActivationModule, TeacherForcedBatch
from sparse_lightning.sources import DataError, load_examples
from sparse_lightning.sparsity import SparsityConfig

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "METRICS",
    "AttributionCalibration",
    "AttributionScores",
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
    "collate_token_ids",
    "load_demo_model",
    "load_examples",
    "load_model",
    "load_truthfulqa",
    "resolve",
]
