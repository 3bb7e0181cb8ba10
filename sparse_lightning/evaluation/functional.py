"""Pure functions behind the QA metrics: no state, no model, tested against hand computations.

Example:
    >>> round(sentence_bleu("Paris is the capital", "Paris is the capital"), 6)
    100.0
    >>> import torch
    >>> logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens
    >>> labels = torch.tensor([[-100, 2, 3]])  # the last two tokens are scored
    >>> round(float(sequence_log_likelihood(logits, labels)), 4)  # 2 * log(1/4)
    -2.7726
"""

from __future__ import annotations

import torch
from torch import Tensor


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """Sentence-level SacreBLEU (0-100) of one hypothesis against one reference, as the paper.

    Uses ``sacrebleu.sentence_bleu`` (exponential smoothing, effective order), so short
    identical strings score 100. Two empty strings are identical and score 100 too (sacrebleu
    says 0 there, which would count a model that agrees with dense on "say nothing" as wrong).
    """
    import sacrebleu

    if not hypothesis.strip() and not reference.strip():
        return 100.0
    return float(sacrebleu.sentence_bleu(hypothesis, [reference]).score)


def sequence_log_likelihood(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of ``log p(label_t | prefix)`` over labelled positions of each sequence.

    Args:
        logits: ``(N, T, V)`` next-token logits of ``N`` sequences.
        labels: ``(N, T)`` the sequences' own token ids, negative (e.g. ``-100``) where not
            scored (prompt, padding). Position ``t`` is predicted by the logits at ``t - 1``.

    Returns:
        ``(N,)`` float32 log-likelihoods.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    scored = target >= 0
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * scored).sum(-1)


def agreement_and_kl(dense_logits: Tensor, sparse_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per position: does the sparse argmax equal the dense one, and ``KL(dense || sparse)``.

    Args:
        dense_logits, sparse_logits: ``(N, V)`` logits at the same positions.

    Returns:
        ``(agree, kl)``, both ``(N,)`` float32 (``agree`` is 0/1).
    """
    dense = torch.log_softmax(dense_logits.float(), -1)
    sparse = torch.log_softmax(sparse_logits.float(), -1)
    agree = (dense.argmax(-1) == sparse.argmax(-1)).float()
    kl = (dense.exp() * (dense - sparse)).sum(-1)
    return agree, kl
