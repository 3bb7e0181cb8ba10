"""Sparse inference from a checkpoint: round trips, selection rules, accounting."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCH_TYPES, calibrate, loader_of, quiet_trainer, tiny_model, token_pairs

from sparse_lightning import SparseActivationModule
from sparse_lightning.data import TeacherForcedBatch

MODES = ("dynamic", "magnitude", "static", "oracle", "gate")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One calibration checkpoint per architecture (tiny seeded models, dense targets)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for model_type in ARCH_TYPES:
        stats, _, callback = calibrate(
            tiny_model(model_type),
            loader_of(token_pairs(6)),
            targets="dense",
            run_name=model_type,
            dirpath=folder,
        )
        out[model_type] = (stats, callback.checkpoint_path)
    return out


def sample_batch(seed: int = 5) -> TeacherForcedBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (2, 9), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return TeacherForcedBatch(ids, torch.ones_like(ids), labels)


def sparse_output(module: SparseActivationModule, batch: TeacherForcedBatch) -> torch.Tensor:
    return module.sparse_logits(batch)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_round_trip_equals_in_memory_sparse_module(model_type, mode, checkpoints):
    stats, path = checkpoints[model_type]
    batch = sample_batch()
    in_memory = SparseActivationModule(tiny_model(model_type))
    in_memory.statistics = stats  # straight from the callback, never written
    in_memory.set_sparsity(0.5, mode=mode)
    loaded = SparseActivationModule.from_pretrained(tiny_model(model_type), path, 0.5, mode=mode)
    expected = sparse_output(in_memory, batch)
    assert torch.equal(sparse_output(loaded, batch), expected)
    with torch.no_grad():
        dense = tiny_model(model_type)(input_ids=batch.input_ids).logits
    assert not torch.allclose(expected, dense, atol=1e-6), "50% sparsity changed nothing"
    loaded.set_sparsity(0.0, mode=mode)
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=batch.input_ids).logits, dense)


def test_magnitude_mode_equals_hand_zeroing_of_smallest_units():
    """Reference: own hooks zero, per token, the 18 smallest |a| of 37 neurons (50%)."""
    model = tiny_model("llama")
    ids = sample_batch().input_ids
    module = SparseActivationModule(tiny_model("llama"))
    module.set_sparsity(mlp=0.5, heads=0.0, mode="magnitude", phase="all")

    def zero_smallest(mod, args):
        x = args[0]
        order = x.abs().argsort(dim=-1)
        return (x.scatter(-1, order[..., :18], 0.0),)

    for i in range(2):
        model.get_submodule(f"model.layers.{i}.mlp.down_proj").register_forward_pre_hook(
            zero_smallest
        )
    with torch.no_grad():
        torch.testing.assert_close(module.model(ids).logits, model(ids).logits)
    assert module.realized_sparsity()["mlp_zero_ratio"] == pytest.approx(18 / 37)


def test_static_mode_zeroes_top_units_of_mean_corrected_gxo(checkpoints):
    stats, path = checkpoints["llama"]
    module = SparseActivationModule.from_pretrained(
        tiny_model("llama"), path, mlp=0.7, heads=0.0, mode="static", phase="all"
    )
    model = tiny_model("llama")
    keep = round(37 * 0.3)  # 11 kept of 37
    for i in range(2):
        mean = stats.mlp.sums["corrected_gxo"][i] / stats.mlp.tokens
        kept = mean.argsort(descending=True)[:keep]
        mask = torch.zeros(37)
        mask[kept] = 1.0
        model.get_submodule(f"model.layers.{i}.mlp.down_proj").register_forward_pre_hook(
            lambda mod, args, mask=mask: (args[0] * mask,)
        )
    ids = sample_batch().input_ids
    with torch.no_grad():
        torch.testing.assert_close(module.model(ids).logits, model(ids).logits)


def test_dynamic_mode_hits_target_sparsity_on_calibration_data(tmp_path):
    """Thresholds are calibrated magnitude quantiles: on the calibration data itself the
    realized zero ratio matches the target up to the histogram's resolution."""
    pairs = token_pairs(8, answer_len=6)
    _, _, callback = calibrate(
        tiny_model("llama"), loader_of(pairs), run_name="dyn", dirpath=tmp_path
    )
    for target in (0.3, 0.7):
        module = SparseActivationModule.from_pretrained(
            tiny_model("llama"), callback.checkpoint_path, target, targets="reference", phase="all"
        )
        # Only answer-predicting positions were calibrated: measure there.
        for raw in loader_of(pairs):
            batch = module.prepare_batch(raw)
            with torch.no_grad():
                module.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        realized = module.realized_sparsity()
        assert 0.1 < realized["mlp_zero_ratio"] < 0.9
        assert realized["mlp_zero_ratio"] == pytest.approx(target, abs=0.15)


def test_accounting_by_hand():
    module = SparseActivationModule(tiny_model("llama"))
    module.set_sparsity(mlp=0.5, heads=0.5, mode="magnitude", phase="all")
    with torch.no_grad():
        module.model(sample_batch().input_ids)
    report = module.realized_sparsity()
    mlp, heads = 18 / 37, 2 / 4
    assert report["mlp_zero_ratio"] == pytest.approx(mlp)
    assert report["head_zero_ratio"] == pytest.approx(heads)
    assert report["paper_sparsity"] == pytest.approx(heads / 3 + 2 * mlp / 3)
    # Llama, hidden 32, MLP 37 (gate, up, down), 4 heads x 8 (q, o) + 2 kv heads (k, v),
    # 2 layers, lm_head 32 x 99.
    total = 2 * (3 * 32 * 37 + (4 + 4 + 2 + 2) * 8 * 32) + 32 * 99
    skipped = 2 * (18 * 3 * 32 + 2 * 2 * 8 * 32)
    assert report["linear_macs_skippable"] == pytest.approx(skipped / total)


def test_sparsity_outside_unit_interval_is_an_error(checkpoints):
    _, path = checkpoints["llama"]
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"in \[0, 1\)"):
            SparseActivationModule.from_pretrained(tiny_model("llama"), path, bad)
    module = SparseActivationModule.from_pretrained(tiny_model("llama"), path, 0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        module.set_sparsity(mlp=0.2, heads=1.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        module.set_sparsity(0.5, mode="random")
    with pytest.raises(ValueError, match="calibrated statistics"):
        SparseActivationModule(tiny_model("llama")).set_sparsity(0.5, mode="dynamic")


def test_oracle_needs_its_own_batch():
    module = SparseActivationModule(tiny_model("llama"))
    module.set_sparsity(0.5, mode="oracle", metric="corrected_gxo", phase="all")
    with pytest.raises(RuntimeError, match=r"sparse_logits\(batch\)"):
        module.model(sample_batch().input_ids)
    with pytest.raises(ValueError, match="one backward"):
        module.set_sparsity(0.5, mode="oracle", metric="integrated_gradients")


def test_calibrating_a_sparse_module_is_refused(checkpoints):
    from sparse_lightning import AttributionCalibration

    _, path = checkpoints["llama"]
    module = SparseActivationModule.from_pretrained(
        tiny_model("llama"), path, 0.5, targets="reference"
    )
    trainer = quiet_trainer(callbacks=[AttributionCalibration()])
    with pytest.raises(RuntimeError, match="disable_sparsity"):
        trainer.validate(module, loader_of(token_pairs(2)), verbose=False)


def test_module_loads_a_local_folder_and_logs_sparsity(checkpoints, tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    with pytest.warns(UserWarning, match="No tokenizer"):
        module = SparseActivationModule.from_pretrained(
            str(tmp_path / "tiny"),
            checkpoints["llama"][1],
            0.5,
            mode="magnitude",
            targets="reference",
        )
    trainer = quiet_trainer()
    trainer.validate(module, loader_of(token_pairs(4)), verbose=False)
    logged = trainer.callback_metrics
    assert float(logged["sparsity/mlp_zero_ratio"]) == pytest.approx(18 / 37)
    assert float(logged["sparsity/head_zero_ratio"]) == pytest.approx(0.5)
    assert "val_loss" in logged
    with pytest.raises(OSError, match="Could not load a model"):
        SparseActivationModule(str(tmp_path / "does-not-exist"))
