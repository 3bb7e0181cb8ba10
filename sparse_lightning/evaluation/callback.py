"""``QAEvaluation``: every QA metric for several sparsity settings in one ``trainer.test`` pass.

The dense reference of a batch (greedy answers, teacher-forced logits) is computed once by
:meth:`SparseActivationModule.test_step` and shared by all settings, so a sweep of ten
settings costs ten sparse passes plus one dense one, not twenty.

Example:
    >>> from sparse_lightning.selection import SparsityConfig
    >>> evaluation = QAEvaluation([SparsityConfig(), SparsityConfig(mlp=0.5)])
    >>> trainer = L.Trainer(callbacks=[evaluation])  # doctest: +SKIP
    >>> trainer.test(module, datamodule=dm)  # doctest: +SKIP
    >>> evaluation.results[1]["bleu_vs_dense"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from sparse_lightning.data.collate import pad
from sparse_lightning.data.teacher_forcing import IGNORE, TeacherForcedBatch
from sparse_lightning.evaluation.functional import sequence_log_likelihood
from sparse_lightning.evaluation.metrics import QAMetrics
from sparse_lightning.module import SparseActivationModule
from sparse_lightning.selection import SparsityConfig
from sparse_lightning.selection.allocation import resolve_allocation
from sparse_lightning.units import UNIT_KINDS

#: Realized-sparsity keys averaged into every result row (as ``realized_<key>``).
REALIZED_KEYS = (
    *(kind.ratio_key for kind in UNIT_KINDS.values()),
    "paper_sparsity",
    "decode_bytes_skipped",
)


class QAEvaluation(L.Callback):
    """Evaluates sparsity settings against the dense model during ``trainer.test``.

    Args:
        settings: the sparsity settings to compare (``SparsityConfig()`` is the dense model
            itself). Settings whose masks come from the batch itself (the oracle) get
            teacher-forced metrics only: their masks need the answer's own gradients, which
            free generation and choices do not have.
        generation: greedy-answer metrics (BLEU vs dense, gold SacreBLEU/ROUGE/SQuAD).
        teacher_forced: top-1 agreement and KL vs dense, gold-answer perplexity.
        perplexity: with ``teacher_forced``, also the gold-answer perplexity (one more forward
            per setting and batch).
        multiple_choice: choice accuracy where examples have choices.
        choice_batch_size: sequences per forward when scoring choices.

    Attributes:
        results: after ``trainer.test``, one dict per setting: the setting, every metric
            and the realized sparsity.
    """

    def __init__(
        self,
        settings: Sequence[SparsityConfig] = (SparsityConfig(),),
        generation: bool = True,
        teacher_forced: bool = True,
        multiple_choice: bool = True,
        choice_batch_size: int = 16,
        perplexity: bool = True,
    ) -> None:
        if not settings:
            raise ValueError("QAEvaluation needs at least one sparsity setting.")
        self.settings = list(settings)
        self.generation = generation
        self.teacher_forced = teacher_forced
        self.perplexity = perplexity
        self.multiple_choice = multiple_choice
        self.choice_batch_size = choice_batch_size
        self.metrics = torch.nn.ModuleList(QAMetrics() for _ in self.settings)
        self.realized: list[list[dict[str, float]]] = [[] for _ in self.settings]
        self.results: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ Lightning hooks
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, SparseActivationModule):
            raise TypeError("QAEvaluation evaluates a SparseActivationModule.")
        self._restore = pl_module.sparsity
        self.metrics.to(pl_module.device)
        for metrics in self.metrics:
            metrics.reset()
        self.realized = [[] for _ in self.settings]

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        assert isinstance(pl_module, SparseActivationModule)
        dense_tf: TeacherForcedBatch = outputs["batch"]
        reference = self.dense_reference(pl_module, batch, dense_tf)
        for index, setting in enumerate(self.settings):
            pl_module.set_sparsity(setting)
            self.evaluate_setting(pl_module, setting, self.metrics[index], batch, reference)
            self.realized[index].append(pl_module.realized_sparsity(reset=True))
        pl_module.disable_sparsity()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, SparseActivationModule)
        self.results = []
        for setting, metrics, realized in zip(
            self.settings, self.metrics, self.realized, strict=True
        ):
            row: dict[str, Any] = setting.as_dict()
            if setting.budget:  # the method that ran ("auto" names one of the others)
                row["allocation"] = resolve_allocation(setting.allocation, pl_module.statistics)
            row.update(metrics.compute())
            for key in REALIZED_KEYS:
                row[f"realized_{key}"] = sum(r[key] for r in realized) / max(1, len(realized))
            row["activation_ratio"] = 1.0 - row["realized_paper_sparsity"]
            self.results.append(row)
        if not self._restore.is_dense:
            pl_module.set_sparsity(self._restore)

    # --------------------------------------------------------------- override points
    def dense_reference(
        self, module: SparseActivationModule, batch: dict[str, Any], dense_tf: TeacherForcedBatch
    ) -> dict[str, Any]:
        """What every setting is compared with: dense answers (text) and answer logits."""
        reference: dict[str, Any] = {"tf": dense_tf}
        if self.generation:
            reference["answers"] = self._answer_texts(module, dense_tf)
        if self.teacher_forced:
            with module.dense(), torch.no_grad():
                logits = module.model(
                    input_ids=dense_tf.input_ids, attention_mask=dense_tf.attention_mask
                ).logits
            reference["logits"] = logits[dense_tf.predict_mask]
            if self.perplexity:
                reference["gold"] = module.prepare_batch(batch, targets="reference")
        return reference

    def evaluate_setting(
        self,
        module: SparseActivationModule,
        setting: SparsityConfig,
        metrics: QAMetrics,
        batch: dict[str, Any],
        reference: dict[str, Any],
    ) -> None:
        """Update one setting's metrics on one batch (the setting is already applied)."""
        per_batch = module.sparsifier is not None and module.sparsifier.needs_batch
        if self.teacher_forced:
            tf: TeacherForcedBatch = reference["tf"]
            logits = module.sparse_logits(tf)
            metrics.update_teacher_forced(reference["logits"], logits[tf.predict_mask])
            if self.perplexity:
                gold: TeacherForcedBatch = reference["gold"]
                metrics.update_perplexity(module.sparse_logits(gold), gold.labels)
        if self.generation and not per_batch:
            answers, mask = module.generate_answers(
                batch["prompt_input_ids"], batch["prompt_attention_mask"]
            )
            texts = _decode(module, answers, mask)
            metrics.update_generation(texts, reference["answers"], batch["correct_answers"])
        if self.multiple_choice and not per_batch and any(batch["choices"]):
            scores = self.choice_log_likelihoods(module, batch)
            metrics.update_choices(scores, batch["label"])

    def choice_log_likelihoods(
        self, module: SparseActivationModule, batch: dict[str, Any]
    ) -> list[Tensor]:
        """Summed log-likelihood of each choice after its prompt, under the current sparsity."""
        rows: list[tuple[int, list[int], list[int]]] = []
        prompts = zip(batch["prompt_input_ids"], batch["prompt_attention_mask"], strict=True)
        for question, (ids, keep) in enumerate(prompts):
            prompt = ids[keep.bool()].tolist()
            rows += [(question, prompt, choice) for choice in batch["choice_input_ids"][question]]
        scores: list[list[float]] = [[] for _ in batch["choice_input_ids"]]
        for start in range(0, len(rows), self.choice_batch_size):
            chunk = rows[start : start + self.choice_batch_size]
            ids, mask, labels = _pack([(p, c) for _, p, c in chunk], module.pad_token_id)
            ids, mask, labels = (t.to(module.device) for t in (ids, mask, labels))
            # A choice's tokens are what decoding would produce: sparse, the prompt dense.
            with torch.no_grad(), module.sparse_positions(labels != IGNORE):
                logits = module.model(input_ids=ids, attention_mask=mask).logits
            chunk_scores = sequence_log_likelihood(logits, labels)
            for (question, _, _), score in zip(chunk, chunk_scores, strict=True):
                scores[question].append(float(score))
        return [torch.tensor(s) for s in scores]

    def _answer_texts(self, module: SparseActivationModule, tf: TeacherForcedBatch) -> list[str]:
        answer = tf.labels != -100
        return [
            module.tokenizer.decode(ids[keep], skip_special_tokens=True).strip()
            for ids, keep in zip(tf.input_ids, answer, strict=True)
        ]


def _decode(module: SparseActivationModule, answers: Tensor, mask: Tensor) -> list[str]:
    return [
        module.tokenizer.decode(ids[keep.bool()], skip_special_tokens=True).strip()
        for ids, keep in zip(answers, mask, strict=True)
    ]


def _pack(
    pairs: Sequence[tuple[list[int], list[int]]], pad_token_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``prompt + choice`` ids, attention mask, and labels on the choice only."""
    ids, mask = pad([[*prompt, *choice] for prompt, choice in pairs], pad_token_id)
    labels, _ = pad([[IGNORE] * len(prompt) + choice for prompt, choice in pairs], IGNORE)
    return ids, mask, labels
