"""QA data: reading sources, collating batches, teacher forcing, the LightningDataModule."""

from sparse_lightning.data.collate import PAPER_PROMPT, QACollator, collate_token_ids, pad
from sparse_lightning.data.datamodule import QADataModule
from sparse_lightning.data.sources import DataError, load_examples, load_truthfulqa
from sparse_lightning.data.teacher_forcing import TeacherForcedBatch, teacher_forced

__all__ = [
    "PAPER_PROMPT",
    "DataError",
    "QACollator",
    "QADataModule",
    "TeacherForcedBatch",
    "collate_token_ids",
    "load_examples",
    "load_truthfulqa",
    "pad",
    "teacher_forced",
]
