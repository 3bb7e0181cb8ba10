"""Inference: installing a sparsity setting on a model, what it saves, and compaction."""

from sparse_lightning.inference.accounting import linear_macs_per_token, sparsity_report
from sparse_lightning.inference.compaction import compact
from sparse_lightning.inference.sparsifier import EXECUTORS, Sparsifier, claim, owns

__all__ = [
    "EXECUTORS",
    "Sparsifier",
    "claim",
    "compact",
    "linear_macs_per_token",
    "owns",
    "sparsity_report",
]
