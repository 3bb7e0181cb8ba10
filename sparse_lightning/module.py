"""``SparseActivationModule``: a Hugging Face causal LM as a frozen LightningModule.

The module owns the model and the sparsity lifecycle; the work is done elsewhere: capture and
gradients in :mod:`~sparse_lightning.attribution.capture`, selection in
:mod:`~sparse_lightning.selection`, everything that touches the model in
:class:`~sparse_lightning.inference.sparsifier.Sparsifier`, batches in
:mod:`~sparse_lightning.data.teacher_forcing`.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from transformers import PreTrainedModel

from sparse_lightning.architectures import ResolvedArchitecture, resolve
from sparse_lightning.attribution.capture import (
    ActivationCapture,
    CapturedUnits,
    differentiate,
    gradients_enabled,
)
from sparse_lightning.attribution.statistics import Statistics
from sparse_lightning.checkpoint import load_statistics
from sparse_lightning.data.targets import (
    TARGETS,
    Targets,
    answer_loss,
    eos_token_id,
    greedy_answers,
    pad_token_id,
    targeted_batch,
)
from sparse_lightning.data.teacher_forcing import TeacherForcedBatch
from sparse_lightning.inference import Sparsifier, claim, compact, owns, sparsity_report
from sparse_lightning.inference.allocation_search import search_allocations
from sparse_lightning.inference.output import output_rotation
from sparse_lightning.models import load_model
from sparse_lightning.selection import SparsityConfig, build_selectors
from sparse_lightning.units import UNIT_KINDS


class SparseActivationModule(L.LightningModule):
    """Wraps a causal LM (frozen, eval mode) for calibration and sparse inference.

    ``validation_step`` computes the cross-entropy of answer tokens only (prompt masked out),
    teacher-forced, with targets that are either the dense model's own greedy answer (the
    paper's protocol, generated once per batch without gradients) or the dataset's reference
    answer. Add :class:`~sparse_lightning.calibration.AttributionCalibration` to the trainer's
    callbacks and ``trainer.validate`` measures every unit's attribution; no weight changes.

    Args:
        model: a ``PreTrainedModel``, a hub name or local folder, or a ``.gguf`` file path.
        tokenizer: its tokenizer; loaded with the model when ``model`` is a name or path.
            Optional for a model object fed pre-tokenized batches.
        gguf_file: GGUF file name inside the ``model`` folder.
        targets: ``"dense"`` (the model's own greedy answer) or ``"reference"``.
        max_new_tokens: length limit of the dense greedy answers.

    Example:
        >>> import lightning as L
        >>> from sparse_lightning import AttributionCalibration, SparseActivationModule
        >>> module = SparseActivationModule("path/to/model")  # doctest: +SKIP
        >>> calibration = AttributionCalibration(ig_steps=4)  # doctest: +SKIP
        >>> L.Trainer(callbacks=[calibration]).validate(module, loader)  # doctest: +SKIP
        >>> calibration.statistics.mlp.score("corrected_gxo").shape  # doctest: +SKIP
        torch.Size([30, 1536])
    """

    def __init__(
        self,
        model: PreTrainedModel | str | os.PathLike[str],
        tokenizer: Any | None = None,
        gguf_file: str | None = None,
        targets: Targets = "dense",
        max_new_tokens: int = 32,
    ) -> None:
        super().__init__()
        if targets not in TARGETS:
            raise ValueError(f"targets must be 'dense' or 'reference', got {targets!r}.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        if not isinstance(model, torch.nn.Module):
            model, loaded_tokenizer = load_model(model, gguf_file=gguf_file)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        self.architecture: ResolvedArchitecture = resolve(model)
        # One model carries one installation: wrapping a model that an earlier wrapper made
        # sparse takes it over (the earlier hooks go, with a warning).
        claim(model, self)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.targets: Targets = targets
        self.max_new_tokens = max_new_tokens
        self.statistics: Statistics | None = None
        self._sparsity = SparsityConfig()
        self._sparsifier: Sparsifier | None = None
        self._capture: ActivationCapture | None = None

    # --------------------------------------------------------------------------- sparsity
    @classmethod
    def from_pretrained(
        cls,
        model: PreTrainedModel | str | os.PathLike[str],
        path: str | os.PathLike[str],
        sparsity: float | SparsityConfig | None = None,
        **kwargs: Any,
    ) -> SparseActivationModule:
        """Wrap ``model`` and apply sparsity chosen from a calibration checkpoint.

        Args:
            model: as for the constructor.
            path: a ``.safetensors`` checkpoint written by the calibration callback.
            sparsity: as for :meth:`set_sparsity`.
            **kwargs: :meth:`set_sparsity`'s options (a level per unit kind, ``mode``,
                ``metric``, ``phase``, ``budget``, ``allocation``); the rest goes to the
                constructor (``tokenizer``, ``targets``, ...).

        Example:
            >>> module = SparseActivationModule.from_pretrained(  # doctest: +SKIP
            ...     model, "checkpoints/smollm2.safetensors", mlp=0.7, heads=0.0)
            >>> module.model.generate(**inputs)  # sparse  # doctest: +SKIP
        """
        names = (*UNIT_KINDS, *inspect.signature(cls.set_sparsity).parameters)
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        module = cls(model, **kwargs)
        module.load_statistics(path)
        module.set_sparsity(sparsity, **options)
        return module

    def load_statistics(self, path: str | os.PathLike[str]) -> Statistics:
        """Read calibrated statistics, checking they belong to this architecture."""
        self.statistics = load_statistics(path, expect=self.architecture.fingerprint)
        return self.statistics

    def set_sparsity(
        self,
        sparsity: float | SparsityConfig | None = None,
        *,
        mode: str | None = None,
        metric: str | None = None,
        phase: str | None = None,
        budget: float | None = None,
        allocation: str | None = None,
        lm_head: float | None = None,
        lm_head_candidates: int | None = None,
        lm_head_basis: str | None = None,
        **levels: float,
    ) -> SparsityConfig:
        """Choose (or change) the sparsity applied to the wrapped model; 0 everywhere = dense.

        Args:
            sparsity: the level of every unit kind not named in ``levels`` (0 when omitted),
                or a whole :class:`~sparse_lightning.selection.SparsityConfig`.
            mode: selection mode (``"dynamic"`` by default).
            metric: ranking metric of ``static`` and ``oracle``.
            phase: ``"decode"`` (default): a prompt's forward (several tokens, no past) runs
                dense and decode steps sparse, as the paper and TEAL do; ``"all"``: every token.
            budget: instead of levels for the channel kinds, the share of the weight bytes
                streamed per decode token to skip (``mode="dynamic"``).
            allocation: how a budget spreads over kinds and layers: ``"auto"`` (default: the
                measured table the checkpoint holds, greedy first, else uniform),
                ``"uniform"``, ``"greedy"`` (TEAL) or ``"attribution"``; the last two need a
                measured table.
            lm_head: the fraction of the output projection's input channels dropped per
                token, its top ``lm_head_candidates`` logits recomputed exactly (default 64);
                adds to a budget's bytes.
            lm_head_candidates: logits recomputed exactly per token.
            lm_head_basis: ``"auto"`` (default: the calibrated eigenbasis of the lm_head's
                input when the checkpoint holds it, see
                :mod:`~sparse_lightning.inference.output`), ``"rotated"`` or ``"channels"``.
            **levels: a level per unit kind, e.g. ``mlp=0.7, heads=0.0``.

        Example:
            >>> module.set_sparsity(mlp=0.5, mode="magnitude")  # doctest: +SKIP
            >>> module.set_sparsity(SparsityConfig(mlp=0.5, heads=0.25))  # doctest: +SKIP
        """
        config = SparsityConfig.from_arguments(
            sparsity,
            mode=mode,
            metric=metric,
            phase=phase,
            budget=budget,
            allocation=allocation,
            lm_head=lm_head,
            lm_head_candidates=lm_head_candidates,
            lm_head_basis=lm_head_basis,
            **levels,
        )
        selectors = build_selectors(config, self.architecture, self.statistics)
        rotation = (
            output_rotation(self.statistics, config.lm_head_basis) if config.lm_head else None
        )
        self.disable_sparsity()
        claim(self.model, self)  # takes the model back from another wrapper, if one took it
        self._sparsity = config
        if selectors or config.lm_head:
            self._sparsifier = Sparsifier(
                self.model,
                self.architecture,
                selectors,
                owner=self,
                phase=config.phase,
                lm_head=config.lm_head,
                lm_head_candidates=config.lm_head_candidates,
                lm_head_rotation=rotation,
            )
        return config

    def disable_sparsity(self) -> None:
        """Back to the dense model (the statistics stay loaded)."""
        if self._sparsifier is not None:
            self._sparsifier.remove()
        self._sparsifier = None
        self._sparsity = SparsityConfig()

    @property
    def sparsifier(self) -> Sparsifier | None:
        """What this module installed on the model, while it is installed (see
        :class:`~sparse_lightning.inference.sparsifier.Sparsifier`)."""
        installed = self._sparsifier is not None and self._sparsifier.installed
        return self._sparsifier if installed else None

    @property
    def sparsity(self) -> SparsityConfig:
        """The setting the model runs with (dense once another wrapper took the model over)."""
        return self._sparsity if self.sparsifier is not None else SparsityConfig()

    def dense(self) -> contextlib.AbstractContextManager[None]:
        """Inside, the wrapped model runs dense; the sparsity comes back on exit.

        Example:
            >>> with module.dense():  # doctest: +SKIP
            ...     reference = module.model(**inputs).logits
        """
        self._require_ownership()
        return self.sparsifier.paused() if self.sparsifier is not None else contextlib.nullcontext()

    def realized_sparsity(self, reset: bool = False) -> dict[str, float]:
        """What the forwards since the last reset really zeroed.

        Returns:
            Per unit kind its zero ratio (``mlp_zero_ratio``, ``head_zero_ratio``),
            ``paper_sparsity`` (1/3 heads + 2/3 MLP) and ``linear_macs_skippable`` (the share
            of all linear-layer multiply-adds that the zeroed units account for).
        """
        self._require_ownership()
        realized = self.sparsifier.realized() if self.sparsifier is not None else {}
        if reset and self.sparsifier is not None:
            self.sparsifier.reset_counts()
        element_size = next(self.model.parameters()).element_size()
        output = self.sparsifier.output if self.sparsifier is not None else None
        reads = output.reads if output is not None else None
        return sparsity_report(realized, self.architecture, reads, element_size)

    def compact(self) -> PreTrainedModel:
        """A smaller stock model without the units the current static masks drop.

        Loads with plain ``AutoModelForCausalLM.from_pretrained`` after ``save_pretrained`` and
        gives the masked model's outputs. Needs ``mode="static"``.
        """
        if self.sparsifier is None:
            raise RuntimeError(
                "Only static masks remove the same units for every token; call "
                "set_sparsity(..., mode='static') before compact()."
            )
        return compact(self.model, self.sparsifier.static_masks())

    # ---------------------------------------------------------------------------- capture
    def start_capture(self, kinds: Sequence[str] | None = None) -> ActivationCapture:
        """Record units during ``validation_step`` (with gradients) until :meth:`stop_capture`.

        :class:`~sparse_lightning.calibration.AttributionCalibration` calls it when validation
        starts; it then differentiates each step's ``loss_sum`` with
        :func:`~sparse_lightning.attribution.capture.differentiate`.

        Raises:
            RuntimeError: the module runs sparse (calibration measures the dense model).
        """
        if self.sparsifier is not None:
            raise RuntimeError(
                "The module runs sparse; calibration measures the dense model. Call "
                "module.disable_sparsity() before trainer.validate with AttributionCalibration."
            )
        self.stop_capture()
        self._capture = ActivationCapture(self.architecture, kinds).__enter__()
        return self._capture

    @property
    def active_capture(self) -> ActivationCapture | None:
        """The capture of :meth:`start_capture`, while it runs."""
        return self._capture

    def stop_capture(self) -> None:
        """Remove the capture hooks of :meth:`start_capture` (idempotent)."""
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
            self._capture = None

    def dense_units_and_gradients(
        self, batch: TeacherForcedBatch, kinds: Sequence[str] | None = None
    ) -> dict[str, CapturedUnits]:
        """Per layer ``(tokens, units, width)`` activations and loss gradients, dense model."""
        batch = batch.autograd_ready()
        capture = ActivationCapture(self.architecture, kinds)
        with self.dense(), capture, gradients_enabled():
            with capture.record():
                loss = self.answer_loss(batch)
            return differentiate(capture, loss)

    def prepare_masks(
        self, batch: TeacherForcedBatch, units: dict[str, CapturedUnits] | None = None
    ) -> None:
        """Per-batch masks (``mode="oracle"``): score every token from this batch's own dense
        gradients; a no-op for selectors that decide on their own.

        Args:
            batch: the teacher-forced batch about to be run (its labels carry the loss).
            units: precomputed :meth:`dense_units_and_gradients` of ``batch`` (lets several
                oracle settings share one backward).
        """
        if self.sparsifier is None or not self.sparsifier.needs_batch:
            return
        if units is None:
            units = self.dense_units_and_gradients(batch, self.sparsifier.batch_kinds())
        self.sparsifier.prepare(units)

    def search_allocations(
        self,
        batches: Sequence[TeacherForcedBatch],
        methods: Sequence[str] = ("greedy", "attribution"),
        step: float = 0.1,
    ) -> dict[str, dict[str, Tensor]]:
        """Measure the allocation tables of a byte budget and keep them in :attr:`statistics`
        (saved with it), for ``set_sparsity(budget=..., allocation=...)``.

        Args:
            batches: a few teacher-forced calibration batches (not the evaluation data).
            methods: ``"greedy"`` (TEAL) and/or ``"attribution"`` (ours); see
                :mod:`~sparse_lightning.inference.allocation_search`.
            step: level increment of one step of a block's path.
        """
        if self.statistics is None:
            raise RuntimeError("search_allocations reads calibrated thresholds: load statistics.")
        with self.dense():
            tables = search_allocations(
                self.model,
                self.architecture,
                self.statistics,
                batches,
                self.answer_loss,
                methods,
                step,
            )
        self.statistics.allocations.update(tables)
        return tables

    def sparse_positions(self, mask: Tensor) -> contextlib.AbstractContextManager[None]:
        """Inside, a forward of ``mask``'s shape is sparse exactly at ``mask``'s positions.

        With ``phase="decode"`` this is how teacher forcing emulates decoding: pass
        ``labels != -100`` and the answer's tokens run sparse, the prompt's dense.
        """
        if self.sparsifier is None:
            return contextlib.nullcontext()
        return self.sparsifier.sparse_positions(mask)

    def sparse_logits(self, batch: TeacherForcedBatch) -> Tensor:
        """Teacher-forced logits under the current sparsity: the answer's tokens sparse (as
        decode steps would be), the prompt's dense unless ``phase="all"``."""
        self.prepare_masks(batch)
        with torch.no_grad(), self.sparse_positions(batch.labels != -100):
            return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    # ------------------------------------------------------------------ targets and loss
    @property
    def eos_token_id(self) -> int | None:
        return eos_token_id(self.model, self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        return pad_token_id(self.model, self.tokenizer)

    def prepare_batch(
        self, batch: dict[str, Tensor], targets: Targets | None = None
    ) -> TeacherForcedBatch:
        """Turn a collated QA batch (see :mod:`sparse_lightning.data`) into prompt + answer.

        Args:
            batch: a collated batch.
            targets: ``"dense"`` or ``"reference"``; the module's :attr:`targets` by default.
                Dense answers come from the model as it is (sparse if sparsity is on).

        Raises:
            ValueError: the batch lacks the keys the targets need, or has no answer token.
        """
        targets = self.targets if targets is None else targets
        return targeted_batch(batch, targets, self.generate_answers, self.pad_token_id)

    def generate_answers(self, prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Greedy answers of the wrapped model, up to and including the first EOS."""
        return greedy_answers(
            self.model, self.tokenizer, prompt_ids, prompt_mask, self.max_new_tokens
        )

    def answer_loss(self, batch: TeacherForcedBatch) -> Tensor:
        """Sum (not mean) of the answer tokens' cross-entropy, teacher-forced (see
        :func:`~sparse_lightning.data.targets.answer_loss`)."""
        return answer_loss(self.model, batch)

    # -------------------------------------------------------------------------- Lightning
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        """Teacher-forced answer loss; with gradients while a capture is started.

        Returns:
            ``{"loss": mean CE, "loss_sum": summed CE (graph attached while capturing),
            "batch": TeacherForcedBatch}`` for callbacks.
        """
        tf = self.prepare_batch(batch)
        if self._capture is None:
            self.prepare_masks(tf)
            with self.sparse_positions(tf.labels != -100):
                loss_sum = self.answer_loss(tf)
        else:
            tf = tf.autograd_ready()
            with gradients_enabled(), self._capture.record():
                loss_sum = self.answer_loss(tf)
        tokens = tf.num_answer_tokens
        loss = loss_sum.detach() / tokens
        self.log("val_loss", loss, batch_size=tokens, prog_bar=True, sync_dist=True)
        if self.sparsifier is not None:
            report = self.realized_sparsity(reset=True)
            self.log_dict({f"sparsity/{k}": v for k, v in report.items()}, batch_size=tokens)
        return {"loss": loss, "loss_sum": loss_sum, "batch": tf}

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        """The dense reference of one evaluation batch: the dense model's greedy answers.

        :class:`~sparse_lightning.evaluation.QAEvaluation` compares every sparsity setting
        with it; the loss logged here is the dense model's on its own answers.

        Returns:
            ``{"batch": TeacherForcedBatch}`` of prompt + dense greedy answer.
        """
        with self.dense():
            tf = self.prepare_batch(batch, targets="dense")
            with torch.no_grad():
                loss = self.answer_loss(tf) / tf.num_answer_tokens
        self.log("dense_answer_loss", loss, batch_size=tf.num_answer_tokens, sync_dist=True)
        return {"batch": tf}

    def _require_ownership(self) -> None:
        if not owns(self.model, self):
            raise RuntimeError(
                "Another SparseActivationModule took this model over, so this one no longer "
                "knows what the model runs: use the newer wrapper, or call set_sparsity(...) on "
                "this one to take the model back."
            )
