"""QA metrics against hand computations on hand-made examples."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_lightning.evaluation import QAMetrics
from sparse_lightning.evaluation.functional import (
    agreement_and_kl,
    sentence_bleu,
    sequence_log_likelihood,
)


def test_bleu_of_identical_strings_is_100():
    for text in ("Paris", "The capital of France is Paris.", ""):
        assert sentence_bleu(text, text) == pytest.approx(100.0)


def test_sentence_bleu_matches_the_formula_by_hand():
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat": clipped n-gram precisions
    # 5/6, 3/5, 2/4, 1/3, equal lengths (brevity penalty 1): BLEU = geometric mean.
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert sentence_bleu("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(
        expected, abs=1e-6
    )
    # Shorter hypothesis: brevity penalty exp(1 - 6/4); all 4-gram-free orders match fully.
    short = 100 * math.exp(1 - 6 / 4)
    assert sentence_bleu("the cat sat on", "the cat sat on a mat") == pytest.approx(short, abs=1e-6)


def test_squad_exact_match_and_f1_of_known_pairs():
    metrics = QAMetrics()
    # Normalisation drops articles, case and punctuation: "The Eiffel tower." == "eiffel tower".
    # "the cat sat" vs "a cat sat down": tokens {cat, sat} vs {cat, sat, down}:
    # precision 1, recall 2/3, F1 0.8; the best of several gold answers counts.
    metrics.update_generation(
        ["The Eiffel tower.", "the cat sat"],
        ["x", "y"],
        [["eiffel tower"], ["a dog", "a cat sat down"]],
    )
    out = metrics.compute()
    assert out["exact_match"] == pytest.approx(50.0)
    assert out["f1"] == pytest.approx((100.0 + 80.0) / 2)


def test_rouge_of_a_known_pair():
    metrics = QAMetrics()
    metrics.update_generation(["cat sat"], ["cat sat"], [["cat sat down"]])
    out = metrics.compute()
    # unigrams: P 1, R 2/3 -> F 0.8; bigrams {cat sat} vs {cat sat, sat down}: P 1, R 1/2.
    assert out["rouge1"] == pytest.approx(80.0, abs=1e-4)
    assert out["rouge2"] == pytest.approx(100 * 2 / 3, abs=1e-4)
    assert out["rougeL"] == pytest.approx(80.0, abs=1e-4)
    assert out["bleu_vs_dense"] == pytest.approx(100.0)


def test_sequence_log_likelihood_matches_a_loop():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    labels = torch.randint(0, 7, (3, 5))
    labels[:, :2] = -100
    labels[2, 4] = -200  # padding
    expected = torch.zeros(3)
    for n in range(3):
        for t in range(1, 5):
            if labels[n, t] >= 0:
                expected[n] += torch.log_softmax(logits[n, t - 1], -1)[labels[n, t]]
    torch.testing.assert_close(sequence_log_likelihood(logits, labels), expected)


def test_agreement_and_kl_against_torch_kl_div():
    torch.manual_seed(1)
    dense, sparse = torch.randn(6, 11), torch.randn(6, 11)
    sparse[:3] = dense[:3] + 0.01  # same argmax on the first three rows
    agree, kl = agreement_and_kl(dense, sparse)
    expected_agree = (dense.argmax(-1) == sparse.argmax(-1)).float()
    expected_kl = torch.nn.functional.kl_div(
        torch.log_softmax(sparse, -1),
        torch.log_softmax(dense, -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    torch.testing.assert_close(agree, expected_agree)
    torch.testing.assert_close(kl, expected_kl)
    assert agree[:3].sum() == 3


def test_perplexity_is_exp_of_the_mean_answer_nll():
    torch.manual_seed(2)
    logits = torch.randn(2, 6, 9)
    labels = torch.randint(0, 9, (2, 6))
    labels[:, :3] = -100
    metrics = QAMetrics()
    metrics.update_perplexity(logits, labels)
    nll = -sequence_log_likelihood(logits, labels).sum() / (labels[:, 1:] >= 0).sum()
    assert metrics.compute()["perplexity"] == pytest.approx(float(torch.exp(nll)), rel=1e-5)


def test_choice_accuracy_counts_argmax_hits():
    metrics = QAMetrics()
    scores = [torch.tensor([-1.0, -3.0]), torch.tensor([-5.0, -2.0, -9.0]), torch.tensor([0.0])]
    metrics.update_choices(scores, torch.tensor([0, 2, -1]))  # hit, miss, no choices
    assert metrics.compute()["mc_accuracy"] == pytest.approx(0.5)


def test_only_updated_families_are_reported():
    metrics = QAMetrics()
    metrics.update_teacher_forced(torch.randn(4, 5), torch.randn(4, 5))
    assert set(metrics.compute()) == {"top1_agreement", "kl"}
