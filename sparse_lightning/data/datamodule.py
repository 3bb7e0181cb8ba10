"""QA data as a LightningDataModule: a fixed calibration split and a disjoint evaluation split.

``trainer.validate`` reads the calibration split (that is where the calibration callback
listens) and ``trainer.test`` the evaluation split (where :class:`~sparse_lightning.evaluation.
QAEvaluation` listens). Both are ``[start, stop)`` row ranges of one file, recorded in
:meth:`QADataModule.describe` so every checkpoint and result says which questions it saw.

Example:
    >>> dm = QADataModule("../shared/data/TruthfulQA.csv", format="truthfulqa",
    ...                   calibration_rows=(400, 800), evaluation_rows=(0, 100))  # doctest: +SKIP
    >>> trainer.validate(module, datamodule=dm)  # calibrate  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from sparse_lightning.data.collate import QACollator
from sparse_lightning.data.sources import (
    DataError,
    SourceFormat,
    as_range,
    load_examples,
    select_rows,
)


class QADataModule(L.LightningDataModule):
    """Questions with answers (and choices) for calibration and evaluation.

    Args:
        path: CSV/JSON/JSONL file, hub dataset name, ``"demo"`` (the QA set shipped with the
            package), or ``None`` for TruthfulQA from the hub.
        format: ``"truthfulqa"``, ``"openbookqa"`` or ``"generic"`` (see
            :func:`~sparse_lightning.data.sources.load_examples`).
        columns: ``{field: column}`` for ``generic`` data.
        calibration_rows: ``[start, stop)`` rows used by ``trainer.validate`` (calibration).
        evaluation_rows: ``[start, stop)`` rows used by ``trainer.test``; must not overlap.
        batch_size: examples per batch.
        prompt_format: ``"auto"`` (chat template if the tokenizer has one, else the paper's
            ``"Instruct: {question}\\nOutput:"``), ``"chat"`` or a format string.
        max_answer_tokens: reference answers are cut to this many tokens.
        tokenizer: the model's tokenizer; taken from the trainer's module when omitted.
        split: hub split name.
        subset: hub configuration name.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        format: SourceFormat = "truthfulqa",
        columns: Mapping[str, str] | None = None,
        calibration_rows: Sequence[int] = (400, 800),
        evaluation_rows: Sequence[int] = (0, 100),
        batch_size: int = 8,
        prompt_format: str = "auto",
        max_answer_tokens: int = 64,
        tokenizer: Any | None = None,
        split: str = "validation",
        subset: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.path, self.format, self.columns = path, format, dict(columns or {})
        self.calibration_rows = as_range(calibration_rows, "calibration")
        self.evaluation_rows = as_range(evaluation_rows, "evaluation")
        overlap = set(self.calibration_rows) & set(self.evaluation_rows)
        if overlap:
            raise DataError(
                f"calibration_rows {_span(self.calibration_rows)} and evaluation_rows "
                f"{_span(self.evaluation_rows)} share {len(overlap)} rows; evaluating on "
                "calibration questions overstates accuracy. Choose disjoint ranges."
            )
        self.batch_size = batch_size
        self.prompt_format = prompt_format
        self.max_answer_tokens = max_answer_tokens
        self.tokenizer = tokenizer
        self.split, self.subset = split, subset
        self.examples: list[dict[str, Any]] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read the data file once (the splits are cut when their loader is asked for)."""
        if self.examples is None:
            self.examples = load_examples(
                self.path, self.format, self.columns, self.split, self.subset
            )

    def examples_of(self, split: str) -> list[dict[str, Any]]:
        """The examples of the ``"calibration"`` or ``"evaluation"`` split.

        Raises:
            DataError: the split is empty or reaches past the end of the data.
        """
        self.setup()
        assert self.examples is not None
        rows = self.calibration_rows if split == "calibration" else self.evaluation_rows
        return select_rows(self.examples, rows, split, str(self.path or "TruthfulQA (hub)"))

    def describe(self, split: str) -> str:
        """A one-line record of a split, stored in checkpoints and result tables."""
        rows = self.calibration_rows if split == "calibration" else self.evaluation_rows
        return f"{self.path or 'truthful_qa (hub)'} ({self.format}) rows {_span(rows)}"

    def collator(self) -> QACollator:
        tokenizer = self.tokenizer
        if tokenizer is None and self.trainer is not None:
            tokenizer = getattr(self.trainer.lightning_module, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                "QADataModule needs a tokenizer: pass tokenizer=..., or use it with a trainer "
                "whose module has one (SparseActivationModule(model, tokenizer))."
            )
        return QACollator(tokenizer, self.prompt_format, self.max_answer_tokens)

    def val_dataloader(self) -> DataLoader:
        """The calibration split (``trainer.validate`` is how calibration runs)."""
        examples = self.examples_of("calibration")
        return DataLoader(examples, batch_size=self.batch_size, collate_fn=self.collator())

    def test_dataloader(self) -> DataLoader:
        """The evaluation split."""
        examples = self.examples_of("evaluation")
        return DataLoader(examples, batch_size=self.batch_size, collate_fn=self.collator())


def _span(rows: range) -> str:
    return f"[{rows.start}, {rows.stop})"
