"""The sparse-lightning command on a tiny saved model, every shipped recipe, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_model
from transformers import AutoModelForCausalLM

from sparse_lightning.cli import build_parser, main
from sparse_lightning.selection import kept_count

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.config.eos_token_id = model.generation_config.eos_token_id = 1
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def options(folder: Path, tmp_path: Path) -> list[str]:
    return [
        f"--model.name={folder}",
        "--model.max_new_tokens=4",
        "--data.path=demo",
        "--data.format=generic",
        "--data.calibration_rows=[0,4]",
        "--data.evaluation_rows=[32,36]",
        "--data.batch_size=4",
        f"--calibration.dirpath={tmp_path / 'ck'}",
        "--calibration.run_name=tiny",
        "--evaluation.modes=[magnitude,static]",
        "--evaluation.levels={mlp: [0.5]}",
        f"--evaluation.output_dir={tmp_path / 'results'}",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
    ]


def test_sweep_writes_table_plot_logs_and_reuses_its_checkpoint(tiny_folder, tmp_path, capsys):
    main(["sweep", *options(tiny_folder, tmp_path)])
    out = tmp_path / "results" / "tiny"
    table = json.loads((out / "table.json").read_text())
    assert [(r["mode"], r["mlp"]) for r in table["results"]] == [
        ("dynamic", 0.0),
        ("magnitude", 0.5),
        ("static", 0.5),
    ]
    assert table["results"][0]["bleu_vs_dense"] == pytest.approx(100.0)
    assert table["model"] == str(tiny_folder)
    assert "rows [32, 36)" in table["evaluation"] and "rows [0, 4)" in table["calibration"]
    assert (out / "table.csv").read_text().count("\n") == 4
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert list((out / "logs").rglob("metrics.csv"))  # CSV logs by default
    assert (tmp_path / "ck" / "tiny.safetensors").is_file()
    capsys.readouterr()
    main(["sweep", *options(tiny_folder, tmp_path)])
    assert "reusing" in capsys.readouterr().out


def test_export_reloads_in_stock_transformers_with_fewer_neurons(tiny_folder, tmp_path):
    main(["calibrate", *options(tiny_folder, tmp_path)])
    target = tmp_path / "export"
    main(
        [
            "export",
            *options(tiny_folder, tmp_path),
            "--export.levels={mlp: 0.5}",
            f"--export.output_dir={target}",
        ]
    )
    exported = AutoModelForCausalLM.from_pretrained(target)
    assert exported.config.intermediate_size == kept_count(37, 0.5)
    with torch.no_grad():
        logits = exported(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits).all()


def test_evaluate_without_a_checkpoint_says_to_calibrate_first(tiny_folder, tmp_path):
    with pytest.raises(SystemExit, match=r"no checkpoint at .*tiny\.safetensors.*calibrate"):
        main(["evaluate", *options(tiny_folder, tmp_path)])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_parses(recipe):
    config = build_parser().parse_args(["sweep", "--config", str(recipe)])
    assert config.sweep.data.calibration_rows and config.sweep.evaluation.modes


def test_a_model_folder_under_home_can_be_named_with_a_tilde(tiny_folder, monkeypatch):
    """Recipes name the converted Qwen folder as ~/.cache/...: the loader expands ``~``."""
    from sparse_lightning.models import load_model

    monkeypatch.setenv("HOME", str(tiny_folder.parent))
    model, _ = load_model(f"~/{tiny_folder.name}")
    reference = AutoModelForCausalLM.from_pretrained(tiny_folder)
    ids = torch.tensor([[3, 5, 7]])
    assert torch.equal(model(ids).logits, reference(ids).logits)


def test_unknown_recipe_key_names_the_key_the_file_and_the_fix(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("data:\n  batch_sise: 4\n")
    with pytest.raises(SystemExit) as error:
        main(["sweep", "--config", str(recipe)])
    message = str(error.value)
    assert "data.batch_sise" in message and "bad.yaml" in message and "--print_config" in message


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("--data.path=missing.csv", "not found: missing.csv"),
        ("--data.columns={question: Frage}", "no column 'Frage'"),
        ("--data.evaluation_rows=[40,40]", "evaluation split \\[40, 40\\) .* is empty"),
    ],
)
def test_bad_data_fails_before_the_model_loads(tmp_path, option, expected):
    # A model name that does not exist: the data error must come first.
    argv = ["sweep", *options(tmp_path / "no-model", tmp_path), option]
    with pytest.raises(SystemExit, match=expected):
        main(argv)


def test_sweep_times_every_setting_and_plots_fidelity_against_speed(tiny_folder, tmp_path):
    main(
        [
            "sweep",
            *options(tiny_folder, tmp_path),
            "--evaluation.budgets=[0.2, 0.4]",
            "--evaluation.speed_tokens=4",
            "--evaluation.speed_repeats=1",
        ]
    )
    out = tmp_path / "results" / "tiny"
    rows = json.loads((out / "table.json").read_text())["results"]
    budgets = [r for r in rows if r.get("budget")]
    assert [(r["budget"], r["allocation"], r["mode"]) for r in budgets] == [
        (0.2, "uniform", "dynamic"),
        (0.4, "uniform", "dynamic"),
    ]
    for row in rows:
        assert row["decode_speedup"] > 0 and row["decode_tokens_per_s"] > 0
    # The budget rows ran the channel kinds: their realized decode bytes are not zero.
    assert all(r["realized_decode_bytes_skipped"] > 0.05 for r in budgets)
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


def test_model_dtype_calibrates_in_float32_then_evaluates_times_and_exports_in_it(
    tiny_folder, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    import sparse_lightning.cli as cli
    import sparse_lightning.evaluation as evaluation

    seen: dict[str, torch.dtype] = {}

    def recording(name, function, position):
        def wrapper(*args, **kwargs):
            module = args[position] if len(args) > position else None
            if module is not None:  # `calibrate` from the command line makes its own
                seen[name] = next(module.model.parameters()).dtype
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(cli, "calibrate", recording("calibrate", cli.calibrate, 1))
    monkeypatch.setattr(evaluation, "run_sweep", recording("run_sweep", evaluation.run_sweep, 0))
    monkeypatch.setattr(
        evaluation, "decode_speeds", recording("decode_speeds", evaluation.decode_speeds, 0)
    )
    half = [*options(tiny_folder, tmp_path), "--model.dtype=bfloat16"]
    speed = ["--evaluation.budgets=[0.4]", "--evaluation.speed_tokens=3"]
    main(["sweep", *half, *speed, "--evaluation.speed_repeats=1"])
    assert seen == {
        "calibrate": torch.float32,
        "run_sweep": torch.bfloat16,
        "decode_speeds": torch.bfloat16,
    }
    table = json.loads((tmp_path / "results" / "tiny" / "table.json").read_text())
    assert table["dtype"] == "bfloat16"
    budget = next(r for r in table["results"] if r.get("budget"))
    assert budget["realized_decode_bytes_skipped"] > 0.05 and budget["decode_speedup"] > 0

    # The checkpoint is the one a float32 recipe calibrates, tensor for tensor.
    main(["calibrate", *options(tiny_folder, tmp_path), "--calibration.run_name=fp32"])
    ours, theirs = (load_file(tmp_path / "ck" / f"{n}.safetensors") for n in ("tiny", "fp32"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    target = tmp_path / "export"
    main(["export", *half, f"--export.output_dir={target}"])
    exported = AutoModelForCausalLM.from_pretrained(target, dtype="auto")
    assert {p.dtype for p in exported.parameters()} == {torch.bfloat16}


def test_a_model_dtype_the_kernels_lack_is_refused_before_loading(tmp_path):
    argv = ["sweep", *options(tmp_path / "no-model", tmp_path), "--model.dtype=int8"]
    with pytest.raises(SystemExit, match=r"model\.dtype: must be one of float32, bfloat16"):
        main(argv)
