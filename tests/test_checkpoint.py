"""Checkpoint files: metadata, fingerprint checks, damaged files, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import calibrate, loader_of, tiny_model, token_pairs
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

import sparse_lightning.checkpoint as checkpoint_module
from sparse_lightning import SparseActivationModule
from sparse_lightning.checkpoint import CheckpointError, load_statistics, read_metadata


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    stats, _, callback = calibrate(
        tiny_model("llama"),
        loader_of(token_pairs(4)),
        run_name="run",
        dirpath=folder,
        ig_steps=2,
        dataset="4 random pairs",
    )
    return stats, callback.checkpoint_path


def test_checkpoint_holds_statistics_and_metadata(calibrated):
    stats, path = calibrated
    assert path.name == "run.safetensors"
    meta = read_metadata(path)
    fingerprint = json.loads(meta["fingerprint"])
    assert fingerprint == {
        "model_type": "llama",
        "num_layers": 2,
        "mlp_units": 37,
        "num_heads": 4,
        "head_dim": 8,
        "num_kv_heads": 2,
    }
    assert meta["model_type"] == "llama"
    assert meta["tokens"] == str(4 * 4)
    assert meta["ig_steps"] == "2"
    assert meta["dataset"] == "4 random pairs"
    assert meta["targets"] == "reference"
    assert "corrected_gxo" in json.loads(meta["metrics"])
    assert meta["library_version"]
    loaded = load_statistics(path)
    for key, value in stats.tensors().items():
        assert torch.equal(loaded.tensors()[key], value), key


def test_other_architecture_or_shape_names_both_fingerprints(calibrated):
    _, path = calibrated
    for other in (
        tiny_model("phi"),
        AutoModelForCausalLM.from_config(
            LlamaConfig(
                vocab_size=99,
                hidden_size=32,
                intermediate_size=40,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        ),
    ):
        with pytest.raises(CheckpointError) as err:
            SparseActivationModule.from_pretrained(other, path, 0.5)
        message = str(err.value)
        assert '"mlp_units": 37' in message and "calibrated on" in message
        assert ('"model_type": "phi"' in message) or ('"mlp_units": 40' in message)


def test_truncated_corrupted_and_foreign_files_fail_clearly(calibrated, tmp_path):
    _, path = calibrated
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    for bad, pattern in (
        (truncated, "truncated or corrupted|could not be read"),
        (garbage, "truncated or corrupted"),
        (foreign, "not a sparse_lightning checkpoint"),
        (tmp_path / "missing.safetensors", "No sparsity checkpoint"),
    ):
        with pytest.raises(CheckpointError, match=pattern):
            SparseActivationModule.from_pretrained(tiny_model("llama"), bad, 0.5)


def test_interrupted_save_leaves_earlier_file_intact(calibrated, monkeypatch):
    stats, path = calibrated
    before = path.read_bytes()
    real_save = checkpoint_module.save_file

    def dying_save(tensors, filename, metadata=None):
        real_save(dict(list(tensors.items())[:2]), filename, metadata=metadata)
        with open(filename, "ab") as handle:  # half-written
            handle.write(b"\x00" * 10)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(checkpoint_module, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_module.save_statistics(stats, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    load_statistics(path)  # still loads


def test_save_refuses_a_path_that_is_not_safetensors(calibrated, tmp_path):
    stats, _ = calibrated
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        checkpoint_module.save_statistics(stats, tmp_path / "stats.pt")
