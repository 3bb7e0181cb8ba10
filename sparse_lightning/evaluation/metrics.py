"""QA metrics of one sparsity setting, as torchmetrics states (multi-process runs reduce right).

Three families, fed by :class:`~sparse_lightning.evaluation.QAEvaluation`:

- ``bleu_vs_dense``: the paper's metric, mean sentence SacreBLEU of the greedy answer against
  the dense model's greedy answer (dense against itself: 100);
- ``sacrebleu``: corpus SacreBLEU of greedy answers against all correct gold answers;
- ``rouge1``, ``rouge2``, ``rougeL``: F-measure against the best-matching correct answer;
- ``exact_match``, ``f1``: SQuAD-style (normalised text) against all correct answers, 0-100;
- ``top1_agreement``: teacher-forced on the dense answer, share of positions whose argmax is
  the dense model's;
- ``kl``: teacher-forced, mean ``KL(dense || sparse)`` per answer token;
- ``perplexity``: of the gold best answer, teacher-forced;
- ``mc_accuracy``: multiple choice by summed answer log-likelihood (OpenBookQA, TruthfulQA MC1).

Example:
    >>> m = QAMetrics()
    >>> m.update_generation(["Paris"], ["Paris"], [["Paris", "The capital is Paris"]])
    >>> {k: round(v, 1) for k, v in m.compute().items()}["bleu_vs_dense"]
    100.0
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import MeanMetric, Metric
from torchmetrics.text import Perplexity, ROUGEScore, SacreBLEUScore, SQuAD

from sparse_lightning.evaluation.functional import agreement_and_kl, sentence_bleu

GENERATION_KEYS = ("bleu_vs_dense", "sacrebleu", "rouge1", "rouge2", "rougeL", "exact_match", "f1")
TEACHER_FORCED_KEYS = ("top1_agreement", "kl", "perplexity")
CHOICE_KEYS = ("mc_accuracy",)
KEYS = GENERATION_KEYS + TEACHER_FORCED_KEYS + CHOICE_KEYS

#: The torchmetrics children of :class:`QAMetrics`, each computed only when some rank fed it.
FAMILIES = ("bleu_vs_dense", "sacrebleu", "rouge", "squad", *TEACHER_FORCED_KEYS, *CHOICE_KEYS)


class UpdateCounts(Metric):
    """How many updates each family received, summed over processes.

    ``compute()`` is collective, so :class:`QAMetrics` decides from these global counts which
    families to compute: every rank then makes the same collective calls, even a rank that saw
    no multiple-choice question (deciding from local counts deadlocks DDP).
    """

    full_state_update = False

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.names = tuple(names)
        self.add_state("counts", torch.zeros(len(self.names), dtype=torch.long), "sum")

    def update(self, *names: str) -> None:  # type: ignore[override]
        for name in names:
            self.counts[self.names.index(name)] += 1

    def compute(self) -> dict[str, int]:
        return dict(zip(self.names, self.counts.tolist(), strict=True))


class QAMetrics(torch.nn.Module):
    """All QA metrics of one setting; each family is optional (only updated keys are reported)."""

    def __init__(self) -> None:
        super().__init__()
        self.bleu_vs_dense = MeanMetric()
        self.sacrebleu = SacreBLEUScore(tokenize="13a")
        # rougeLsum would need nltk and a download; the three keys below need nothing.
        self.rouge = ROUGEScore(rouge_keys=("rouge1", "rouge2", "rougeL"), accumulate="best")
        self.squad = SQuAD()
        self.top1_agreement = MeanMetric()
        self.kl = MeanMetric()
        self.perplexity = Perplexity(ignore_index=-100)
        self.mc_accuracy = MeanMetric()
        self.updates = UpdateCounts(FAMILIES)

    def update_generation(
        self, answers: Sequence[str], dense_answers: Sequence[str], gold: Sequence[Sequence[str]]
    ) -> None:
        """Greedy answers against the dense model's and against the gold correct answers."""
        for answer, dense in zip(answers, dense_answers, strict=True):
            self.bleu_vs_dense.update(sentence_bleu(answer, dense))
        self.updates.update("bleu_vs_dense")
        with_gold = [(a, list(g)) for a, g in zip(answers, gold, strict=True) if len(g) > 0]
        if not with_gold:
            return
        preds, targets = [a for a, _ in with_gold], [g for _, g in with_gold]
        self.sacrebleu.update(preds, targets)
        self.rouge.update(preds, targets)
        self.squad.update(
            [{"prediction_text": p, "id": str(i)} for i, p in enumerate(preds)],
            [
                {"answers": {"text": g, "answer_start": [0] * len(g)}, "id": str(i)}
                for i, g in enumerate(targets)
            ],
        )
        self.updates.update("sacrebleu", "rouge", "squad")

    def update_teacher_forced(self, dense_logits: Tensor, sparse_logits: Tensor) -> None:
        """``(N, V)`` logits at the answer-predicting positions of the dense answer."""
        agree, kl = agreement_and_kl(dense_logits, sparse_logits)
        self.top1_agreement.update(agree)
        self.kl.update(kl)
        self.updates.update("top1_agreement", "kl")

    def update_perplexity(self, logits: Tensor, labels: Tensor) -> None:
        """``(B, T, V)`` logits of prompt + gold answer; ``labels`` -100 outside the answer."""
        self.perplexity.update(logits[:, :-1].float(), labels[:, 1:])
        self.updates.update("perplexity")

    def update_choices(self, log_likelihoods: Sequence[Tensor], labels: Tensor) -> None:
        """One ``(choices,)`` tensor of answer log-likelihoods per question, and the right index."""
        for scores, label in zip(log_likelihoods, labels.tolist(), strict=True):
            if label >= 0 and len(scores) > 0:
                self.mc_accuracy.update(float(int(scores.argmax()) == label))
                self.updates.update("mc_accuracy")

    def compute(self) -> dict[str, float]:
        """Every metric that received data on some process, as plain floats.

        Collective under DDP: call it on every rank; every rank makes the same calls and gets
        the same values.
        """
        self.updates.update()  # marks the counter updated on a rank that saw nothing
        seen = {name for name, count in self.updates.compute().items() if count > 0}
        out: dict[str, float] = {}
        with warnings.catch_warnings():
            # A rank that saw none of a family's data computes it too (collectively).
            warnings.filterwarnings("ignore", ".*was called before the ``update`` method.*")
            if "bleu_vs_dense" in seen:
                out["bleu_vs_dense"] = float(self.bleu_vs_dense.compute())
            if "sacrebleu" in seen:
                out["sacrebleu"] = 100.0 * float(self.sacrebleu.compute())
            if "rouge" in seen:
                rouge = self.rouge.compute()
                for key in ("rouge1", "rouge2", "rougeL"):
                    out[key] = 100.0 * float(rouge[f"{key}_fmeasure"])
            if "squad" in seen:
                squad = self.squad.compute()
                out["exact_match"], out["f1"] = float(squad["exact_match"]), float(squad["f1"])
            for key in (*TEACHER_FORCED_KEYS, *CHOICE_KEYS):
                if key in seen:
                    out[key] = float(getattr(self, key).compute())
        return out

    def reset(self) -> None:
        for child in self.children():
            child.reset()
