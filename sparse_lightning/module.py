"""``SparseActivationModule``: a Hugging Face causal LM as a frozen LightningModule."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedModel

from sparse_lightning.architectures import ResolvedArchitecture, resolve
from sparse_lightning.attribution.functional import per_token_score
from sparse_lightning.attribution.statistics import Statistics
from sparse_lightning.checkpoint import load_statistics
from sparse_lightning.compaction import compact
from sparse_lightning.hooks import ActivationCapture, UnitMasking, gradients_enabled
from sparse_lightning.models import load_model
from sparse_lightning.selectors import OracleSelector
from sparse_lightning.sparsity import SparsityConfig, build_selectors, sparsity_report

Targets = Literal["dense", "reference"]


@dataclass
class TeacherForcedBatch:
    """Prompt + answer sequences, right-padded, ready for one teacher-forced forward.

    Attributes:
        input_ids: ``(B, S)`` prompt tokens followed by answer tokens, then padding.
        attention_mask: ``(B, S)``, 1 on real tokens.
        labels: ``(B, S)``, the token id at answer positions, -100 elsewhere.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    @property
    def predict_mask(self) -> Tensor:
        """``(B, S)`` bool: positions whose next token is an answer token (they carry the loss)."""
        mask = torch.zeros_like(self.labels, dtype=torch.bool)
        mask[:, :-1] = self.labels[:, 1:] != -100
        return mask

    @property
    def num_answer_tokens(self) -> int:
        return int((self.labels != -100).sum())

    def autograd_ready(self) -> TeacherForcedBatch:
        """Copies that autograd may save (tensors made under inference mode may not be)."""
        with torch.inference_mode(False):
            return TeacherForcedBatch(
                self.input_ids.clone(), self.attention_mask.clone(), self.labels.clone()
            )


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
        if targets not in ("dense", "reference"):
            raise ValueError(f"targets must be 'dense' or 'reference', got {targets!r}.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        if not isinstance(model, torch.nn.Module):
            model, loaded_tokenizer = load_model(model, gguf_file=gguf_file)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        self.architecture: ResolvedArchitecture = resolve(model)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.targets: Targets = targets
        self.max_new_tokens = max_new_tokens
        self.activation_capture: ActivationCapture | None = None
        self.statistics: Statistics | None = None
        self.sparsity = SparsityConfig()
        self.masking: UnitMasking | None = None

    # --------------------------------------------------------------------------- sparsity
    @classmethod
    def from_pretrained(
        cls,
        model: PreTrainedModel | str | os.PathLike[str],
        path: str | os.PathLike[str],
        sparsity: float | None = 0.5,
        *,
        mlp: float | None = None,
        heads: float | None = None,
        mode: str = "dynamic",
        metric: str = "corrected_gxo",
        **kwargs: Any,
    ) -> SparseActivationModule:
        """Wrap ``model`` and apply sparsity chosen from a calibration checkpoint.

        Args:
            model: as for the constructor.
            path: a ``.safetensors`` checkpoint written by the calibration callback.
            sparsity: fraction of units zeroed, for MLP neurons and heads alike.
            mlp: MLP fraction, overriding ``sparsity``.
            heads: head fraction, overriding ``sparsity``.
            mode: ``"dynamic"``, ``"magnitude"``, ``"static"``, ``"oracle"`` or ``"gate"``
                (see :mod:`~sparse_lightning.selectors`).
            metric: ranking metric of ``static`` and ``oracle``.
            **kwargs: passed to the constructor (``tokenizer``, ``targets``, ...).

        Example:
            >>> module = SparseActivationModule.from_pretrained(  # doctest: +SKIP
            ...     model, "checkpoints/smollm2.safetensors", mlp=0.7, heads=0.0)
            >>> module.model.generate(**inputs)  # sparse  # doctest: +SKIP
        """
        module = cls(model, **kwargs)
        module.load_statistics(path)
        module.set_sparsity(sparsity, mlp=mlp, heads=heads, mode=mode, metric=metric)
        return module

    def load_statistics(self, path: str | os.PathLike[str]) -> Statistics:
        """Read calibrated statistics, checking they belong to this architecture."""
        self.statistics = load_statistics(path, expect=self.architecture.fingerprint)
        return self.statistics

    def set_sparsity(
        self,
        sparsity: float | None = None,
        *,
        mlp: float | None = None,
        heads: float | None = None,
        mode: str = "dynamic",
        metric: str = "corrected_gxo",
    ) -> SparsityConfig:
        """Choose (or change) the sparsity applied to the wrapped model; 0 everywhere = dense."""
        base = 0.0 if sparsity is None else sparsity
        config = SparsityConfig(
            mlp=base if mlp is None else mlp,
            heads=base if heads is None else heads,
            mode=mode,
            metric=metric,
        )
        selectors = build_selectors(config, self.architecture, self.statistics)
        self.disable_sparsity()
        self.sparsity = config
        if selectors:
            self.masking = UnitMasking(self.architecture, selectors)
        return config

    def disable_sparsity(self) -> None:
        """Back to the dense model (the statistics stay loaded)."""
        if self.masking is not None:
            self.masking.remove()
        self.masking = None
        self.sparsity = SparsityConfig()

    def dense(self) -> contextlib.AbstractContextManager[None]:
        """Inside, the wrapped model runs dense; the sparsity comes back on exit.

        Example:
            >>> with module.dense():  # doctest: +SKIP
            ...     reference = module.model(**inputs).logits
        """
        return self.masking.paused() if self.masking is not None else contextlib.nullcontext()

    def realized_sparsity(self, reset: bool = False) -> dict[str, float]:
        """What the forwards since the last reset really zeroed.

        Returns:
            ``mlp_zero_ratio``, ``head_zero_ratio``, ``paper_sparsity`` (1/3 heads + 2/3 MLP)
            and ``linear_flops_skippable`` (share of all linear-layer multiply-adds).
        """
        realized = self.masking.realized() if self.masking is not None else {}
        if reset and self.masking is not None:
            self.masking.reset_counts()
        config = self.model.config
        hidden = int(config.hidden_size)
        return sparsity_report(realized, self.architecture, hidden, int(config.vocab_size))

    def compact(self) -> PreTrainedModel:
        """A smaller stock model without the units the current static masks drop.

        Loads with plain ``AutoModelForCausalLM.from_pretrained`` after ``save_pretrained`` and
        gives the masked model's outputs. Needs ``mode="static"``.
        """
        if self.masking is None or self.sparsity.mode != "static":
            raise RuntimeError(
                "Only static masks remove the same units for every token; call "
                "set_sparsity(..., mode='static') before compact()."
            )
        masks = {kind: sel.masks for kind, sel in self.masking.selectors.items()}
        return compact(self.model, masks)

    def prepare_oracle(
        self, batch: TeacherForcedBatch, units: dict[str, tuple[list, list]] | None = None
    ) -> None:
        """Oracle mode: score every token from this batch's own dense gradients.

        The dense model's loss on ``batch`` (its labels, e.g. the dense answer) is
        differentiated once; each layer keeps, per token, the top units by ``metric``.

        Args:
            batch: the teacher-forced batch about to be run.
            units: precomputed :meth:`dense_units_and_gradients` of ``batch`` (lets several
                oracle settings share one backward).
        """
        if self.masking is None or self.sparsity.mode != "oracle":
            raise RuntimeError("prepare_oracle needs set_sparsity(..., mode='oracle') first.")
        if units is None:
            units = self.dense_units_and_gradients(batch, tuple(self.masking.selectors))
        for kind, selector in self.masking.selectors.items():
            assert isinstance(selector, OracleSelector)
            a, g = units[kind]
            metric = self.sparsity.metric
            selector.set_scores([per_token_score(metric, x, y) for x, y in zip(a, g, strict=True)])

    def dense_units_and_gradients(
        self, batch: TeacherForcedBatch, kinds: tuple[str, ...] = ("mlp", "heads")
    ) -> dict[str, tuple[list[Tensor], list[Tensor]]]:
        """Per layer ``(tokens, units, width)`` activations and loss gradients, dense model."""
        batch = batch.autograd_ready()
        with self.dense(), ActivationCapture(self.architecture, kinds) as capture:
            with gradients_enabled():
                with capture.record():
                    loss = self.answer_loss(batch)
                grads = torch.autograd.grad(loss, capture.tensors())
            acts = [t.detach() for t in capture.tensors()]
            a_by, g_by = capture.by_kind(acts), capture.by_kind(grads)
        return {kind: (a_by[kind], g_by[kind]) for kind in a_by}

    def sparse_logits(self, batch: TeacherForcedBatch) -> Tensor:
        """Teacher-forced logits under the current sparsity (oracle masks prepared first)."""
        if self.masking is not None and self.sparsity.mode == "oracle":
            self.prepare_oracle(batch)
        with torch.no_grad():
            return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    # ----------------------------------------------------------------------------- token ids
    @property
    def eos_token_id(self) -> int | None:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            eos = self.model.generation_config.eos_token_id
        return eos[0] if isinstance(eos, list) else eos

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = self.model.generation_config.pad_token_id
        if pad is None:
            pad = self.eos_token_id
        return 0 if pad is None else int(pad)

    # ------------------------------------------------------------------------------ targets
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
        _require(batch, ("prompt_input_ids", "prompt_attention_mask"))
        targets = self.targets if targets is None else targets
        if targets == "dense":
            answers, answer_mask = self.generate_answers(
                batch["prompt_input_ids"], batch["prompt_attention_mask"]
            )
        else:
            _require(batch, ("answer_input_ids", "answer_attention_mask"))
            answers, answer_mask = batch["answer_input_ids"], batch["answer_attention_mask"]
        sequences, labels = [], []
        for prompt, p_mask, answer, a_mask in zip(
            batch["prompt_input_ids"],
            batch["prompt_attention_mask"],
            answers,
            answer_mask,
            strict=True,
        ):
            prompt, answer = prompt[p_mask.bool()], answer[a_mask.bool()]
            sequences.append(torch.cat([prompt, answer]))
            labels.append(torch.cat([torch.full_like(prompt, -100), answer]))
        tf = TeacherForcedBatch(
            input_ids=pad_sequence(sequences, batch_first=True, padding_value=self.pad_token_id),
            attention_mask=pad_sequence(
                [torch.ones_like(s) for s in sequences], batch_first=True, padding_value=0
            ),
            labels=pad_sequence(labels, batch_first=True, padding_value=-100),
        )
        if tf.num_answer_tokens == 0:
            raise ValueError(
                f"This batch has no answer tokens (targets={targets!r}), so there is no "
                "loss to attribute. With targets='reference' give every example a non-empty "
                "answer; with targets='dense' check that the model does not emit EOS at once "
                "(prompt format / chat template)."
            )
        return tf

    @torch.no_grad()
    def generate_answers(self, prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Greedy answers of the wrapped model, up to and including the first EOS.

        Returns:
            ``(answers, mask)``, both ``(B, max_new_tokens)`` or shorter.
        """
        generated = self.model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
        )[:, prompt_ids.shape[1] :]
        mask = torch.ones_like(generated)
        if self.eos_token_id is not None:
            is_eos = (generated == self.eos_token_id).long()
            # Keep tokens up to the first EOS inclusive: zero where an EOS came strictly before.
            mask = (is_eos.cumsum(1) - is_eos == 0).long()
        return generated, mask

    # --------------------------------------------------------------------------------- loss
    def answer_loss(self, batch: TeacherForcedBatch) -> Tensor:
        """Sum (not mean) of the cross-entropy of answer tokens, teacher-forced.

        A sum keeps each token's gradient independent of how tokens are grouped into batches
        and processes, so calibration sums add up exactly across DDP ranks.
        """
        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        # Half-precision logits lose the loss's low bits; float32 and float64 stay as they are.
        logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1),
            batch.labels[:, 1:].flatten(),
            ignore_index=-100,
            reduction="sum",
        )

    # -------------------------------------------------------------------------- Lightning
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        """Teacher-forced answer loss; with gradients when a calibration capture is attached.

        Returns:
            ``{"loss": mean CE, "loss_sum": summed CE (graph attached while calibrating),
            "batch": TeacherForcedBatch}`` for callbacks.
        """
        tf = self.prepare_batch(batch)
        if self.activation_capture is None:
            if self.masking is not None and self.sparsity.mode == "oracle":
                self.prepare_oracle(tf)
            loss_sum = self.answer_loss(tf)
        else:
            tf = tf.autograd_ready()
            with gradients_enabled(), self.activation_capture.record():
                loss_sum = self.answer_loss(tf)
        tokens = tf.num_answer_tokens
        loss = loss_sum.detach() / tokens
        self.log("val_loss", loss, batch_size=tokens, prog_bar=True, sync_dist=True)
        if self.masking is not None:
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


def _require(batch: dict[str, Tensor], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(
            f"The batch lacks {missing}; build batches with sparse_lightning.data.QACollator "
            "(or collate_token_ids) so they carry prompt and answer token ids."
        )
