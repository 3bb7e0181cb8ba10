"""QA evaluation: pure metric functions, torchmetrics states, the test-time callback, sweeps."""

from sparse_lightning.evaluation.callback import QAEvaluation
from sparse_lightning.evaluation.metrics import KEYS, QAMetrics
from sparse_lightning.evaluation.speed import decode_speeds
from sparse_lightning.evaluation.sweep import (
    format_table,
    plot,
    plot_tradeoff,
    run_sweep,
    save_table,
    sweep_settings,
)

__all__ = [
    "KEYS",
    "QAEvaluation",
    "QAMetrics",
    "decode_speeds",
    "format_table",
    "plot",
    "plot_tradeoff",
    "run_sweep",
    "save_table",
    "sweep_settings",
]
