"""Byte budgets and their allocations over channel kinds and layers; older checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import calibrate, loader_of, tiny_model, token_pairs
from safetensors.torch import load_file, save_file

from sparse_lightning import SparseActivationModule, SparsityConfig, resolve
from sparse_lightning.checkpoint import CheckpointError, read_metadata
from sparse_lightning.selection.allocation import CHANNEL_KINDS, allocate

#: Tiny Llama (hidden 32, MLP 37, 4 query heads and 2 KV heads of 8, 2 layers, vocab 99):
#: weights per layer read by each channel kind, and the whole model's per decode token.
SITE_WEIGHTS = {
    "attn_input": 32 * (32 + 16 + 16),  # q, k, v
    "head_features": 32 * 32,  # o
    "mlp_input": 32 * 2 * 37,  # gate, up
    "mlp": 37 * 32,  # down
}
TOTAL = 2 * sum(SITE_WEIGHTS.values()) + 32 * 99  # lm_head included


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A calibrated tiny Llama with both measured allocations, saved and reloaded."""
    folder = tmp_path_factory.mktemp("allocation")
    _, _, callback = calibrate(
        tiny_model("llama"),
        loader_of(token_pairs(8, answer_len=6)),
        run_name="searched",
        dirpath=folder,
        allocations=("greedy", "attribution"),
    )
    return callback.checkpoint_path


def skipped_share(levels: dict[str, torch.Tensor]) -> float:
    """Decode bytes skipped by per-layer levels, counted by hand from the weights above."""
    return sum(float(levels[k].sum()) * SITE_WEIGHTS[k] for k in CHANNEL_KINDS) / TOTAL


def test_uniform_allocation_is_one_level_that_skips_the_budget():
    arch = resolve(tiny_model("llama"))
    for budget in (0.1, 0.3, 0.6):
        levels = allocate(budget, "uniform", arch, None)
        values = torch.cat(list(levels.values()))
        assert torch.allclose(values, values[0])
        assert skipped_share(levels) == pytest.approx(budget, rel=1e-6)


@pytest.mark.parametrize("method", ["greedy", "attribution"])
def test_measured_allocations_skip_the_budget_and_survive_the_checkpoint(searched, method):
    module = SparseActivationModule.from_pretrained(tiny_model("llama"), searched)
    table = module.statistics.allocations[method]
    assert table["levels"].shape[1:] == (2, len(CHANNEL_KINDS))
    for budget in (0.1, 0.25, 0.4):
        levels = allocate(budget, method, module.architecture, module.statistics)
        # The table's rows are whole steps of the search: within one step of the budget.
        assert skipped_share(levels) == pytest.approx(budget, abs=0.05)
        assert all(float(v.min()) >= 0.0 and float(v.max()) <= 0.9 for v in levels.values())
    # More budget never lowers a level (both methods walk each block's path forward).
    assert (table["levels"][1:] >= table["levels"][:-1] - 1e-6).all()


def test_a_budget_installs_per_layer_thresholds_at_the_allocated_levels(searched):
    module = SparseActivationModule.from_pretrained(
        tiny_model("llama"), searched, budget=0.3, allocation="attribution"
    )
    levels = allocate(0.3, "attribution", module.architecture, module.statistics)
    for kind, selector in module.sparsifier.selectors.items():
        stats = module.statistics[kind]
        expected = [stats.magnitude_threshold(i, float(levels[kind][i])) for i in range(2)]
        assert selector.thresholds.tolist() == pytest.approx(expected)
    assert module.sparsity.budget == 0.3


def test_the_attribution_allocation_is_not_uniform(searched):
    """The measured search puts different levels on different kinds and layers."""
    module = SparseActivationModule.from_pretrained(tiny_model("llama"), searched)
    table = module.statistics.allocations["attribution"]
    row = table["levels"][int((table["budgets"] - 0.3).abs().argmin())]
    assert not torch.allclose(row, row.flatten()[0].expand_as(row))  # not uniform


def test_bad_budgets_and_allocations_are_clear_errors(searched, tmp_path):
    module = SparseActivationModule.from_pretrained(tiny_model("llama"), searched)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"budget must be in \[0, 1\)"):
            module.set_sparsity(budget=bad)
    with pytest.raises(TypeError, match="budget must be a number"):
        module.set_sparsity(budget="0.3")
    with pytest.raises(ValueError, match="cap"):
        module.set_sparsity(budget=0.95, allocation="uniform")
    with pytest.raises(ValueError, match="beyond the greedy allocation table"):
        module.set_sparsity(budget=0.95)  # auto: greedy, whose table stops below
    with pytest.raises(ValueError, match="allocation must be one of"):
        module.set_sparsity(budget=0.2, allocation="best")
    with pytest.raises(ValueError, match="drop the levels"):
        module.set_sparsity(budget=0.2, mlp=0.5)
    with pytest.raises(ValueError, match="mode='dynamic'"):
        module.set_sparsity(budget=0.2, mode="magnitude")
    with pytest.raises(ValueError, match="same projections"):
        SparsityConfig(heads=0.5, head_features=0.5)
    # A checkpoint without measured tables: the error says how to get one.
    _, _, plain = calibrate(
        tiny_model("llama"), loader_of(token_pairs(4)), run_name="plain", dirpath=tmp_path
    )
    other = SparseActivationModule.from_pretrained(tiny_model("llama"), plain.checkpoint_path)
    with pytest.raises(ValueError, match="allocations="):
        other.set_sparsity(budget=0.2, allocation="greedy")
    other.set_sparsity(budget=0.2)  # the default, auto, falls back to uniform: no table needed
    uniform = allocate(0.2, "uniform", other.architecture, None)
    for kind, selector in other.sparsifier.selectors.items():
        stats = other.statistics[kind]
        level = float(uniform[kind][0])
        assert selector.thresholds.tolist() == pytest.approx(
            [stats.magnitude_threshold(i, level) for i in range(2)]
        )


def test_the_default_allocation_is_the_measured_winner_when_the_checkpoint_has_it(searched):
    """``auto`` (the default) spreads a budget as greedy does when its table is there (the
    held-out winner), as attribution does when only that one is, else uniformly."""
    module = SparseActivationModule.from_pretrained(tiny_model("llama"), searched, budget=0.3)
    assert module.sparsity.allocation == "auto"
    greedy = allocate(0.3, "greedy", module.architecture, module.statistics)
    for kind, selector in module.sparsifier.selectors.items():
        stats = module.statistics[kind]
        expected = [stats.magnitude_threshold(i, float(greedy[kind][i])) for i in range(2)]
        assert selector.thresholds.tolist() == pytest.approx(expected)
    del module.statistics.allocations["greedy"]
    auto = allocate(0.3, "auto", module.architecture, module.statistics)
    attribution = allocate(0.3, "attribution", module.architecture, module.statistics)
    assert all(torch.equal(auto[k], attribution[k]) for k in CHANNEL_KINDS)
    assert not all(torch.equal(auto[k], greedy[k]) for k in CHANNEL_KINDS)


def test_an_older_checkpoint_still_loads_and_names_the_kinds_it_lacks(tmp_path):
    """Format 1 held MLP neurons and heads only: it serves them, and a channel kind asked of
    it is a clear error, not a crash."""
    _, _, callback = calibrate(
        tiny_model("llama"), loader_of(token_pairs(4)), run_name="new", dirpath=tmp_path
    )
    tensors = {
        key: value
        for key, value in load_file(str(callback.checkpoint_path)).items()
        if key.split(".")[0] in ("mlp", "heads")
    }
    metadata = dict(read_metadata(callback.checkpoint_path))
    metadata["format"] = "sparse_lightning.statistics/1"
    for key in ("units", "model_digest"):
        metadata.pop(key)
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=metadata)
    module = SparseActivationModule.from_pretrained(tiny_model("llama"), old, mlp=0.5)
    assert set(module.statistics.units) == {"mlp", "heads"}
    with pytest.raises(ValueError, match=r"no statistics for 'attn_input'.*Recalibrate"):
        module.set_sparsity(attn_input=0.5)
    metadata["format"] = "sparse_lightning.statistics/0"
    save_file(tensors, str(old), metadata=metadata)
    with pytest.raises(CheckpointError, match="not a sparse_lightning checkpoint"):
        SparseActivationModule.from_pretrained(tiny_model("llama"), old)
