"""``SparseActivationModule``: a Hugging Face causal LM as a frozen LightningModule."""

from __future__ import annotations

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
from sparse_lightning.hooks import ActivationCapture, gradients_enabled
from sparse_lightning.models import load_model

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
    def prepare_batch(self, batch: dict[str, Tensor]) -> TeacherForcedBatch:
        """Turn a collated QA batch (see :mod:`sparse_lightning.data`) into prompt + answer.

        Raises:
            ValueError: the batch lacks the keys the targets need, or has no answer token.
        """
        _require(batch, ("prompt_input_ids", "prompt_attention_mask"))
        if self.targets == "dense":
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
                f"This batch has no answer tokens (targets={self.targets!r}), so there is no "
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
            loss_sum = self.answer_loss(tf)
        else:
            tf = tf.autograd_ready()
            with gradients_enabled(), self.activation_capture.record():
                loss_sum = self.answer_loss(tf)
        tokens = tf.num_answer_tokens
        loss = loss_sum.detach() / tokens
        self.log("val_loss", loss, batch_size=tokens, prog_bar=True, sync_dist=True)
        return {"loss": loss, "loss_sum": loss_sum, "batch": tf}


def _require(batch: dict[str, Tensor], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(
            f"The batch lacks {missing}; build batches with sparse_lightning.data.QACollator "
            "(or collate_token_ids) so they carry prompt and answer token ids."
        )
