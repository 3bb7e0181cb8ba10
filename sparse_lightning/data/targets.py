"""Targets: what the answer tokens of a batch are, and the loss of a model on them.

``"dense"`` targets are the model's own greedy answer (the paper's protocol), ``"reference"``
the dataset's answer. Either way the batch becomes prompt + answer, teacher-forced
(:mod:`~sparse_lightning.data.teacher_forcing`), and the loss is the summed cross-entropy of
the answer tokens.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_lightning.data.teacher_forcing import (
    IGNORE,
    TeacherForcedBatch,
    teacher_forced,
    until_first,
)

Targets = Literal["dense", "reference"]
TARGETS = ("dense", "reference")


def eos_token_id(model: nn.Module, tokenizer: Any | None) -> int | None:
    """The end-of-sequence id: the tokenizer's, else the model's generation config's."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = model.generation_config.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


def pad_token_id(model: nn.Module, tokenizer: Any | None) -> int:
    """The padding id: the tokenizer's, the generation config's, EOS, or 0."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = model.generation_config.pad_token_id
    if pad is None:
        pad = eos_token_id(model, tokenizer)
    return 0 if pad is None else int(pad)


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    tokenizer: Any | None,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    max_new_tokens: int,
) -> tuple[Tensor, Tensor]:
    """Greedy answers of ``model`` (as it runs now), up to and including the first EOS.

    Returns:
        ``(answers, mask)``, both ``(B, max_new_tokens)`` or shorter.
    """
    eos = eos_token_id(model, tokenizer)
    generated = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id(model, tokenizer),
        eos_token_id=eos,
    )[:, prompt_ids.shape[1] :]
    return generated, until_first(generated, eos)


def targeted_batch(
    batch: dict[str, Tensor],
    targets: Targets,
    answers: Any,
    pad: int,
) -> TeacherForcedBatch:
    """Prompt + answer of a collated batch (see :mod:`sparse_lightning.data.collate`).

    Args:
        batch: a collated batch.
        targets: ``"dense"`` (``answers(prompt_ids, prompt_mask)`` makes them) or
            ``"reference"`` (the batch's own answers).
        answers: the greedy-answer function of the dense targets.
        pad: the padding id.

    Raises:
        ValueError: the batch lacks the keys the targets need, or has no answer token.
    """
    _require(batch, ("prompt_input_ids", "prompt_attention_mask"))
    if targets == "dense":
        answer_ids, answer_mask = answers(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    else:
        _require(batch, ("answer_input_ids", "answer_attention_mask"))
        answer_ids, answer_mask = batch["answer_input_ids"], batch["answer_attention_mask"]
    tf = teacher_forced(
        batch["prompt_input_ids"], batch["prompt_attention_mask"], answer_ids, answer_mask, pad
    )
    if tf.num_answer_tokens == 0:
        raise ValueError(
            f"This batch has no answer tokens (targets={targets!r}), so there is no loss to "
            "attribute. With targets='reference' give every example a non-empty answer; with "
            "targets='dense' check that the model does not emit EOS at once (prompt format / "
            "chat template)."
        )
    return tf


def answer_loss(model: nn.Module, batch: TeacherForcedBatch) -> Tensor:
    """Sum (not mean) of the cross-entropy of the answer tokens, teacher-forced.

    A sum keeps each token's gradient independent of how tokens are grouped into batches and
    processes, so calibration sums add up exactly across DDP ranks.
    """
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).logits
    # Half-precision logits lose the loss's low bits; float32 and float64 stay as they are.
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1),
        batch.labels[:, 1:].flatten(),
        ignore_index=IGNORE,
        reduction="sum",
    )


def _require(batch: dict[str, Tensor], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(
            f"The batch lacks {missing}; build batches with sparse_lightning.data.QACollator "
            "(or collate_token_ids) so they carry prompt and answer token ids."
        )
