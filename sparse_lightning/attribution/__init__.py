"""Attribution: pure metric functions, torchmetrics state, and the statistics they produce."""

from sparse_lightning.attribution.functional import METRICS
from sparse_lightning.attribution.scores import AttributionScores
from sparse_lightning.attribution.statistics import Statistics, UnitStatistics

__all__ = ["METRICS", "AttributionScores", "Statistics", "UnitStatistics"]
