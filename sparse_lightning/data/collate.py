"""Collation: prompts formatted and tokenized, token ids padded into batches.

A batch is a dict of tensors:

* ``prompt_input_ids``, ``prompt_attention_mask``: ``(B, P)``, left-padded (ready for
  batched ``generate``);
* ``answer_input_ids``, ``answer_attention_mask``: ``(B, A)``, right-padded reference answers
  (used when the module's targets are ``"reference"``);
* from :class:`QACollator` also the examples' texts for evaluation:
  ``correct_answers``, ``choices``, ``choice_input_ids`` (lists) and ``label`` (``(B,)``, -1
  without choices).

Example:
    >>> batch = collate_token_ids([([5, 6], [7]), ([8], [9, 10])], pad_token_id=0)
    >>> batch["prompt_input_ids"].tolist(), batch["answer_input_ids"].tolist()
    ([[5, 6], [0, 8]], [[7, 0], [9, 10]])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

#: The paper's prompt, used when the tokenizer has no chat template.
PAPER_PROMPT = "Instruct: {question}\nOutput:"


def pad(
    sequences: Sequence[Tensor | Sequence[int]],
    value: int,
    side: Literal["left", "right"] = "right",
) -> tuple[Tensor, Tensor]:
    """Pad 1-d token id sequences into ``(ids, attention_mask)``, both ``(N, longest)``.

    The one padding helper of the package: batches, teacher-forced sequences and choices all
    go through it.
    """
    seqs = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
    ids = pad_sequence(seqs, batch_first=True, padding_value=value, padding_side=side)
    ones = [torch.ones(len(s), dtype=torch.long, device=s.device) for s in seqs]
    mask = pad_sequence(ones, batch_first=True, padding_value=0, padding_side=side)
    return ids, mask


def collate_token_ids(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Pad ``(prompt_ids, answer_ids)`` pairs into a batch (prompts left, answers right)."""
    if any(len(p) == 0 for p, _ in pairs):
        raise ValueError("A prompt has no tokens; every example needs a non-empty question.")
    batch = {}
    for name, index, side in (("prompt", 0, "left"), ("answer", 1, "right")):
        ids, mask = pad([pair[index] for pair in pairs], pad_token_id, side)  # type: ignore[arg-type]
        batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"] = ids, mask
    return batch


class QACollator:
    """Tokenize ``{"question", "answer"}`` examples into a batch for the module.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt_format: ``"auto"`` (the chat template when the tokenizer has one, else
            :data:`PAPER_PROMPT`), ``"chat"``, or a format string with ``{question}``.
        max_answer_tokens: reference answers are cut to this many tokens (EOS included).

    Example:
        >>> collate = QACollator(tokenizer)  # doctest: +SKIP
        >>> questions = load_truthfulqa("../shared/data/TruthfulQA.csv", range(8))  # doctest: +SKIP
        >>> loader = DataLoader(questions, batch_size=4, collate_fn=collate)  # doctest: +SKIP
    """

    def __init__(self, tokenizer: Any, prompt_format: str = "auto", max_answer_tokens: int = 64):
        self.tokenizer = tokenizer
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if prompt_format == "auto":
            prompt_format = "chat" if has_template else PAPER_PROMPT
        if prompt_format == "chat" and not has_template:
            raise ValueError("prompt_format='chat' but the tokenizer has no chat template.")
        if prompt_format != "chat" and "{question}" not in prompt_format:
            raise ValueError(f"prompt_format must contain '{{question}}', got {prompt_format!r}.")
        self.prompt_format = prompt_format
        self.max_answer_tokens = max_answer_tokens
        pad = tokenizer.pad_token_id
        self.pad_token_id = tokenizer.eos_token_id if pad is None else pad

    def format_prompt(self, question: str) -> str:
        """The prompt text for one question."""
        if self.prompt_format == "chat":
            messages = [{"role": "user", "content": question}]
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        return self.prompt_format.format(question=question)

    def answer_ids(self, text: str) -> list[int]:
        """Token ids of an answer as the model would write it after the prompt."""
        # After "Output:" the model writes a space first; after a chat header it does not.
        if text and self.prompt_format != "chat":
            text = " " + text
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        chat = self.prompt_format == "chat"
        pairs = []
        for example in examples:
            prompt = self.tokenizer(
                self.format_prompt(example["question"]), add_special_tokens=not chat
            )["input_ids"]
            answer = self.answer_ids(example.get("answer") or "")
            answer = [*answer[: self.max_answer_tokens - 1], self.tokenizer.eos_token_id]
            pairs.append((prompt, answer))
        batch: dict[str, Any] = collate_token_ids(pairs, self.pad_token_id)
        batch["correct_answers"] = [list(e.get("correct_answers") or []) for e in examples]
        batch["choices"] = [list(e.get("choices") or []) for e in examples]
        batch["choice_input_ids"] = [[self.answer_ids(c) for c in cs] for cs in batch["choices"]]
        batch["label"] = torch.tensor([int(e.get("label", -1)) for e in examples])
        return batch
