"""No silently wrong result, and bad input caught before the expensive part (one test per case)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import calibrate, char_tokenizer, loader_of, tiny_model, token_pairs

import sparse_lightning.checkpoint as checkpoint_module
from sparse_lightning import AttributionCalibration, SparseActivationModule
from sparse_lightning.checkpoint import CheckpointError, load_statistics, save_statistics
from sparse_lightning.cli import main

IDS = torch.tensor([[5, 9, 17, 3, 44, 61, 8]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reliability")
    _, _, callback = calibrate(
        tiny_model("llama"), loader_of(token_pairs(4)), run_name="llama", dirpath=folder
    )
    return callback.checkpoint_path


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# ------------------------------------------------------------------- 1. stacked wrappers
def test_a_new_wrapper_takes_the_model_over_and_the_old_one_leaves_nothing(checkpoint):
    model = tiny_model("llama")
    plain = logits(tiny_model("llama"))
    first = SparseActivationModule.from_pretrained(
        model, checkpoint, 0.9, mode="magnitude", phase="all"
    )
    assert not torch.allclose(logits(model), plain, atol=1e-6)
    with pytest.warns(UserWarning, match="takes it over"):
        second = SparseActivationModule.from_pretrained(model, checkpoint, 0.0)
    del first
    assert torch.equal(logits(model), plain)  # no hook of the first wrapper is left
    assert second.realized_sparsity()["mlp_zero_ratio"] == 0.0


def test_the_wrapper_taken_over_knows_it_and_can_take_the_model_back(checkpoint):
    model = tiny_model("llama")
    plain = logits(tiny_model("llama"))
    first = SparseActivationModule.from_pretrained(
        model, checkpoint, 0.9, mode="magnitude", phase="all"
    )
    with pytest.warns(UserWarning, match="takes it over"):
        second = SparseActivationModule(model)
    assert first.sparsifier is None and first.sparsity.is_dense  # no stale setting reported
    assert torch.equal(logits(model), plain)
    first.set_sparsity(0.5, mode="magnitude", phase="all")  # takes the model back
    with pytest.raises(RuntimeError, match="took this model over"):
        second.realized_sparsity()  # it would report dense while the model runs sparse
    sparse = logits(model)
    first.disable_sparsity()
    assert not torch.allclose(sparse, plain, atol=1e-6)
    assert torch.equal(logits(model), plain)


# ----------------------------------------------- 2. sweep reuses only a matching calibration
@pytest.fixture(scope="module")
def two_folders(tmp_path_factory) -> tuple[Path, Path]:
    """Two models of the same shapes and family but different weights (base vs instruct)."""
    folders = []
    for seed in (0, 1):
        folder = tmp_path_factory.mktemp(f"model{seed}")
        model = tiny_model("llama", seed=seed)
        model.config.eos_token_id = model.generation_config.eos_token_id = 1
        model.save_pretrained(folder)
        char_tokenizer().save_pretrained(folder)
        folders.append(folder)
    return folders[0], folders[1]


def sweep_options(folder: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "sweep",
        f"--model.name={folder}",
        "--model.max_new_tokens=3",
        "--data.path=demo",
        "--data.format=generic",
        "--data.calibration_rows=[0,4]",
        "--data.evaluation_rows=[32,34]",
        "--data.batch_size=2",
        f"--calibration.dirpath={tmp_path / 'ck'}",
        "--calibration.run_name=shared",
        "--evaluation.modes=[magnitude]",
        "--evaluation.levels={mlp: [0.5]}",
        "--evaluation.generation=false",
        "--evaluation.multiple_choice=false",
        f"--evaluation.output_dir={tmp_path / 'results'}",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


@pytest.mark.parametrize(
    "change",
    ["other model", "--calibration.targets=reference", "--calibration.ig_steps=2"],
)
def test_sweep_recalibrates_when_the_checkpoint_came_from_another_run(
    two_folders, tmp_path, capsys, change
):
    first, second = two_folders
    main(sweep_options(first, tmp_path))
    assert "reusing" not in capsys.readouterr().out
    main(sweep_options(first, tmp_path))
    assert "reusing" in capsys.readouterr().out  # the same run: reused
    if change == "other model":
        main(sweep_options(second, tmp_path))
    else:
        main(sweep_options(first, tmp_path, change))
    out = capsys.readouterr().out
    assert "reusing" not in out and "recalibrating" in out


# --------------------------------------------------------------- 3. read while replaced
WRITER = """
import os, shutil, sys, time
sources, target, seconds = sys.argv[1:3], sys.argv[3], float(sys.argv[4])
end, i = time.time() + seconds, 0
while time.time() < end:
    tmp = target + f".writer{i % 2}.tmp"
    shutil.copyfile(sources[i % 2], tmp)
    os.replace(tmp, target)
    i += 1
print(i)
"""


def test_loading_while_another_process_replaces_the_file_gives_one_whole_file(tmp_path):
    """Two checkpoints whose every tensor and metadata differ; a writer swaps them in a loop.
    Every load must be entirely one of them (or a CheckpointError), never a mix."""
    files = []
    for name, seed in (("a", 0), ("b", 1)):
        _, _, callback = calibrate(
            tiny_model("llama", seed=seed),
            loader_of(token_pairs(4, seed=seed)),
            run_name=name,
            dirpath=tmp_path,
            dataset=f"dataset {name}",
        )
        files.append(callback.checkpoint_path)
    expected = {
        f"dataset {name}": load_statistics(path).tensors()
        for name, path in zip("ab", files, strict=True)
    }
    target = tmp_path / "live.safetensors"
    target.write_bytes(files[0].read_bytes())
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(files[0]), str(files[1]), str(target), "4"],
        stdout=subprocess.PIPE,
        text=True,
    )
    loads, failures, end = 0, 0, time.time() + 3.5
    while time.time() < end:
        try:
            stats = load_statistics(target)
        except CheckpointError:
            failures += 1
            continue
        reference = expected[stats.metadata["dataset"]]
        for key, tensor in stats.tensors().items():
            assert torch.equal(tensor, reference[key]), (stats.metadata["dataset"], key)
        loads += 1
    swaps = int(writer.communicate(timeout=60)[0])
    assert swaps > 50 and loads > 50, (swaps, loads, failures)


# ------------------------------------------------------------ 4. non-finite statistics
def test_non_finite_statistics_are_refused_at_save_and_at_load(checkpoint, tmp_path, monkeypatch):
    stats = load_statistics(checkpoint)
    stats.mlp.sums["gxo"][0, 3] = float("nan")
    with pytest.raises(CheckpointError, match=r"not finite.*mlp\.gxo"):
        save_statistics(stats, tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()
    # A file written by something else (or an older version) is refused when read.
    with monkeypatch.context() as patched:
        patched.setattr(checkpoint_module, "_check_finite", lambda tensors, path: None)
        save_statistics(stats, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match=r"not finite.*mlp\.gxo"):
        SparseActivationModule.from_pretrained(tiny_model("llama"), tmp_path / "nan.safetensors")


# -------------------------------------------------- 5. CLI options checked before the model
@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("--calibration.ig_steps=-2", "ig_steps"),
        ("--calibration.units=[neurons]", "units"),
        ("--calibration.targets=gold", "targets"),
        ("--model.max_new_tokens=0", "max_new_tokens"),
        ("--calibration.run_name=", "run_name"),
        ("--evaluation.levels={mlp: [1.5]}", r"mlp sparsity must be in \[0, 1\)"),
        ("--evaluation.levels={neurons: [0.5]}", "neurons"),
        ("--evaluation.modes=[fastest]", "mode must be one of"),
        ("--evaluation.metric=best", "metric must be one of"),
        ("--export.levels={mlp: 1.0}", r"mlp sparsity must be in \[0, 1\)"),
        ("--data.batch_size=0", "batch_size"),
        ("--evaluation.speed_tokens=1", "speed_tokens must be >= 2"),
    ],
)
def test_bad_options_stop_with_one_error_line_before_any_model_loads(tmp_path, option, expected):
    # A model folder that does not exist: had the model been loaded first, that would fail.
    argv = sweep_options(tmp_path / "no-model", tmp_path, option)
    with pytest.raises(SystemExit) as error:
        main(argv)
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message.strip(), message
    assert re.search(expected, message), message
    assert not (tmp_path / "ck").exists()  # nothing calibrated, nothing written


# --------------------------------------------------------------------- 6. ig_steps type
@pytest.mark.parametrize("bad", [2.0, 1.5, True, "2"])
def test_ig_steps_must_be_an_integer(bad):
    with pytest.raises(TypeError, match="ig_steps must be an integer"):
        AttributionCalibration(ig_steps=bad)


# ------------------------------------------------------------------ 7. string sparsity
def test_a_sparsity_that_is_not_a_number_names_the_argument(checkpoint):
    module = SparseActivationModule.from_pretrained(tiny_model("llama"), checkpoint)
    with pytest.raises(TypeError, match="mlp sparsity must be a number"):
        module.set_sparsity(mlp="0.5")
    with pytest.raises(TypeError, match=r"^sparsity must be a number"):
        module.set_sparsity("0.5")
    with pytest.raises(TypeError, match="heads sparsity must be a number"):
        SparseActivationModule.from_pretrained(tiny_model("llama"), checkpoint, heads="half")


# ---------------------------------------------------------------- 8. one meaning of None
def test_a_kind_left_unnamed_means_the_same_in_from_pretrained_and_set_sparsity(checkpoint):
    loaded = SparseActivationModule.from_pretrained(tiny_model("llama"), checkpoint, mlp=0.5)
    module = SparseActivationModule(tiny_model("llama"))
    module.statistics = loaded.statistics
    module.set_sparsity(mlp=0.5)
    assert loaded.sparsity == module.sparsity
    assert loaded.sparsity.heads == 0.0 and loaded.sparsity.mlp == 0.5
    both = SparseActivationModule.from_pretrained(tiny_model("llama"), checkpoint, 0.5)
    assert both.sparsity.heads == both.sparsity.mlp == 0.5


# ------------------------------------------------------------- 9. checkpoint file mode
def test_checkpoints_are_written_with_the_usual_permissions(checkpoint, tmp_path):
    stats = load_statistics(checkpoint)
    previous = os.umask(0o022)
    try:
        path = save_statistics(stats, tmp_path / "perm.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
