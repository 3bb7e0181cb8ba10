"""Teacher-forced batches: prompt + answer in one sequence, labels on the answer only.

Example:
    >>> import torch
    >>> tf = teacher_forced(
    ...     torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]]),
    ...     torch.tensor([[3, 4], [2, 0]]), torch.tensor([[1, 1], [1, 0]]), pad_token_id=0)
    >>> tf.input_ids.tolist(), tf.labels.tolist()
    ([[5, 6, 3, 4], [7, 8, 9, 2]], [[-100, -100, 3, 4], [-100, -100, -100, 2]])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparse_lightning.data.collate import pad

#: Label of positions that carry no loss (the prompt, padding), as in ``cross_entropy``.
IGNORE = -100


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
        mask[:, :-1] = self.labels[:, 1:] != IGNORE
        return mask

    @property
    def num_answer_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def autograd_ready(self) -> TeacherForcedBatch:
        """Copies that autograd may save (tensors made under inference mode may not be)."""
        with torch.inference_mode(False):
            return TeacherForcedBatch(
                self.input_ids.clone(), self.attention_mask.clone(), self.labels.clone()
            )


def teacher_forced(
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    answer_ids: Tensor,
    answer_mask: Tensor,
    pad_token_id: int,
) -> TeacherForcedBatch:
    """Join each prompt's real tokens with its answer's real tokens, right-padded."""
    sequences, labels = [], []
    for prompt, p_mask, answer, a_mask in zip(
        prompt_ids, prompt_mask, answer_ids, answer_mask, strict=True
    ):
        prompt, answer = prompt[p_mask.bool()], answer[a_mask.bool()]
        sequences.append(torch.cat([prompt, answer]))
        labels.append(torch.cat([torch.full_like(prompt, IGNORE), answer]))
    input_ids, attention_mask = pad(sequences, pad_token_id)
    return TeacherForcedBatch(input_ids, attention_mask, pad(labels, IGNORE)[0])


def until_first(tokens: Tensor, stop: int | None) -> Tensor:
    """``(B, T)`` mask of the tokens up to and including the first ``stop`` token of each row."""
    if stop is None:
        return torch.ones_like(tokens)
    is_stop = (tokens == stop).long()
    # Zero where a stop token came strictly before.
    return (is_stop.cumsum(1) - is_stop == 0).long()
