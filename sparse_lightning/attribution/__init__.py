"""Attribution: pure metric functions, unit capture, torchmetrics sums, and the statistics."""

from sparse_lightning.attribution.capture import (
    ActivationCapture,
    CapturedUnits,
    differentiate,
    gradients_enabled,
)
from sparse_lightning.attribution.functional import METRICS
from sparse_lightning.attribution.statistics import Statistics, UnitStatistics
from sparse_lightning.attribution.sums import AttributionSums

__all__ = [
    "METRICS",
    "ActivationCapture",
    "AttributionSums",
    "CapturedUnits",
    "Statistics",
    "UnitStatistics",
    "differentiate",
    "gradients_enabled",
]
