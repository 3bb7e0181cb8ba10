"""QAEvaluation end to end on tiny models: dense is perfect against itself, a rigged model's
choice accuracy is what its rigging implies, gold perplexity matches plain autograd-free math."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCH_TYPES, calibrate, char_tokenizer, quiet_trainer, tiny_model

from sparse_lightning import SparseActivationModule
from sparse_lightning.data import QADataModule
from sparse_lightning.evaluation import QAEvaluation, run_sweep, sweep_settings
from sparse_lightning.selection import SparsityConfig


def char_model(model_type: str = "llama"):
    model = tiny_model(model_type)
    model.config.eos_token_id = model.generation_config.eos_token_id = 1
    return model


def demo_data(tokenizer, calibration=(0, 4), evaluation=(32, 40)) -> QADataModule:
    return QADataModule(
        "demo",
        "generic",
        calibration_rows=calibration,
        evaluation_rows=evaluation,
        batch_size=4,
        tokenizer=tokenizer,
    )


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_dense_setting_agrees_with_itself_and_sparse_settings_differ(model_type):
    tokenizer = char_tokenizer()
    dm = demo_data(tokenizer)
    stats, module, _ = calibrate(char_model(model_type), dm.val_dataloader(), targets="dense")
    module.tokenizer, module.statistics = tokenizer, stats
    settings = [SparsityConfig(), SparsityConfig(mlp=0.9, heads=0.5, mode="magnitude")]
    rows = run_sweep(module, dm, settings, trainer=quiet_trainer())
    dense, sparse = rows
    assert dense["bleu_vs_dense"] == pytest.approx(100.0)
    assert dense["top1_agreement"] == 1.0 and dense["kl"] == pytest.approx(0.0, abs=1e-6)
    assert dense["realized_paper_sparsity"] == 0.0
    assert sparse["kl"] > 1e-6  # dense against itself is exactly 0
    assert sparse["realized_mlp_zero_ratio"] == pytest.approx(1 - 4 / 37, abs=1e-6)
    assert module.sparsifier is None  # the module is left as it was (dense)


def test_perplexity_can_be_left_out_without_changing_the_other_metrics():
    """perplexity=False drops the gold-answer forward, and only it."""
    tokenizer = char_tokenizer()
    dm = demo_data(tokenizer)
    stats, module, _ = calibrate(char_model(), dm.val_dataloader(), targets="dense")
    module.tokenizer, module.statistics = tokenizer, stats
    settings = [SparsityConfig(), SparsityConfig(mlp=0.7, mode="dynamic")]
    kept, left_out = (
        run_sweep(module, dm, settings, trainer=quiet_trainer(), generation=False, perplexity=p)
        for p in (True, False)
    )
    for with_it, without in zip(kept, left_out, strict=True):
        assert "perplexity" in with_it and "perplexity" not in without
        assert without["top1_agreement"] == with_it["top1_agreement"]
        assert without["kl"] == pytest.approx(with_it["kl"], abs=1e-9)


def test_gold_perplexity_equals_plain_model_math():
    tokenizer = char_tokenizer()
    dm = demo_data(tokenizer)
    module = SparseActivationModule(char_model(), tokenizer, targets="dense", max_new_tokens=4)
    rows = run_sweep(module, dm, [SparsityConfig()], trainer=quiet_trainer(), generation=False)
    nll, count = 0.0, 0
    for example in dm.examples_of("evaluation"):
        prompt = tokenizer(f"Instruct: {example['question']}\nOutput:")["input_ids"]
        answer = tokenizer(" " + example["answer"])["input_ids"] + [1]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logp = torch.log_softmax(module.model(input_ids=ids).logits[0, :-1].double(), -1)
        for t in range(len(prompt), ids.shape[1]):
            nll -= float(logp[t - 1, ids[0, t]])
            count += 1
    assert rows[0]["perplexity"] == pytest.approx(
        torch.exp(torch.tensor(nll / count)).item(), rel=1e-4
    )


def test_choice_accuracy_of_a_rigged_model(tmp_path):
    """A model whose logits favour 'x' picks the all-x choice; the label decides the score."""
    tokenizer = char_tokenizer()
    x = tokenizer.convert_tokens_to_ids("x")
    model = char_model()
    bonus = torch.zeros(model.config.vocab_size)
    bonus[x] = 30.0
    model.lm_head.register_forward_hook(lambda m, i, out: out + bonus)
    rows = []
    for i in range(8):
        choices = ["abc", "xxx", "abd"]
        label = 1 if i < 6 else 0  # the rigged pick is right 6 times out of 8
        rows.append({"question": f"Question {i}?", "choices": choices, "label": label})
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dm = QADataModule(
        path,
        "generic",
        calibration_rows=(0, 0),
        evaluation_rows=(0, 8),
        batch_size=3,
        tokenizer=tokenizer,
    )
    module = SparseActivationModule(model, tokenizer, targets="dense", max_new_tokens=2)
    evaluation = QAEvaluation(
        [SparsityConfig()], generation=False, teacher_forced=False, choice_batch_size=4
    )
    quiet_trainer(callbacks=[evaluation]).test(module, datamodule=dm, verbose=False)
    assert evaluation.results[0]["mc_accuracy"] == pytest.approx(6 / 8)


def test_oracle_settings_report_teacher_forced_metrics_only():
    tokenizer = char_tokenizer()
    dm = demo_data(tokenizer)
    module = SparseActivationModule(char_model(), tokenizer, targets="dense", max_new_tokens=4)
    oracle = SparsityConfig(mlp=0.5, mode="oracle", metric="corrected_gxo")
    rows = run_sweep(module, dm, [oracle], trainer=quiet_trainer())
    assert {"top1_agreement", "kl", "perplexity"} <= set(rows[0])
    assert "bleu_vs_dense" not in rows[0] and "mc_accuracy" not in rows[0]


def test_sweep_settings_put_dense_first_and_skip_duplicates():
    settings = sweep_settings(["magnitude", "static"], mlp=[0.0, 0.5], heads=[0.0, 0.5])
    assert settings[0].is_dense
    assert sum(s.is_dense for s in settings) == 1
    assert len(settings) == 1 + 2 * 3
