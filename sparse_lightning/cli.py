"""The ``sparse-lightning`` command: calibrate, evaluate, sweep and export, driven by recipes.

Every subcommand reads the same recipe schema (a YAML file given with ``--config``), so one
recipe drives the whole flow, and every key is also a command-line option
(``--data.evaluation_rows [0,24]``), as with LightningCLI::

    sparse-lightning calibrate --config recipes/smollm2-truthfulqa.yaml
    sparse-lightning sweep     --config recipes/smollm2-truthfulqa.yaml --data.batch_size 4
    sparse-lightning evaluate  --config recipes/smollm2-truthfulqa.yaml \
        --evaluation.levels '{mlp: [0.7], heads: [0.0]}'
    sparse-lightning export    --config recipes/smollm2-truthfulqa.yaml --export.levels '{mlp: 0.5}'

``sparse-lightning sweep --print_config`` prints a complete recipe to start from.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparse_lightning.recipe import (
    CalibrationOptions,
    EvaluationOptions,
    ExportOptions,
    ModelOptions,
    Recipe,
    check_recipe,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SUBCOMMANDS = {
    "calibrate": "measure attribution statistics and save the sparsity checkpoint",
    "evaluate": "QA metrics of the sparsity settings of a saved checkpoint",
    "sweep": "calibrate if needed, then evaluate every setting and plot the table",
    "export": "write a compacted (static-mask) model loadable by stock transformers",
}


def _user_errors() -> tuple[type[Exception], ...]:
    from sparse_lightning.architectures import UnsupportedArchitectureError
    from sparse_lightning.checkpoint import CheckpointError
    from sparse_lightning.data.sources import DataError

    return (DataError, CheckpointError, UnsupportedArchitectureError)


# ------------------------------------------------------------------------------ parser
def build_parser() -> Any:
    """The jsonargparse parser: one recipe schema shared by every subcommand."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog="sparse-lightning", description=__doc__.splitlines()[0], exit_on_error=False
    )
    subcommands = parser.add_subcommands(dest="subcommand")
    for name, help_text in SUBCOMMANDS.items():
        sub = ArgumentParser(description=help_text, exit_on_error=False)
        sub.add_argument("--config", action=ActionConfigFile, help="a recipe YAML file")
        _add_recipe_arguments(sub)
        subcommands.add_subcommand(name, sub, help=help_text)
    return parser


def _add_recipe_arguments(parser: Any) -> None:
    import lightning as L

    from sparse_lightning.data import QADataModule

    parser.add_class_arguments(ModelOptions, "model")
    parser.add_class_arguments(QADataModule, "data", skip={"tokenizer"})
    parser.add_class_arguments(CalibrationOptions, "calibration")
    parser.add_class_arguments(EvaluationOptions, "evaluation")
    parser.add_class_arguments(ExportOptions, "export")
    # Loggers and callbacks are the command's own (CSV logs, calibration, evaluation).
    parser.add_class_arguments(
        L.Trainer, "trainer", skip={"logger", "callbacks", "plugins", "strategy"}
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``sparse-lightning`` command."""
    from jsonargparse import ArgumentError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        config = parser.parse_args(argv)
    except ArgumentError as error:
        raise SystemExit(_explain(error, argv)) from None
    name = config.subcommand
    commands = {"calibrate": calibrate, "evaluate": evaluate, "sweep": sweep, "export": export}
    try:
        init = parser.instantiate_classes(config)[name]
        recipe = Recipe(
            model=init.model,
            data=init.data,
            calibration=init.calibration,
            evaluation=init.evaluation,
            export=init.export,
            trainer=dict(config[name].trainer),
        )
        check_recipe(recipe)
    except (ValueError, TypeError) as error:
        # An option out of range, before anything is loaded: one line, no traceback.
        raise SystemExit(f"error: {error}") from None
    try:
        commands[name](recipe)
    except _user_errors() as error:
        # Bad input, not a bug: the message names the problem and the fix; no traceback.
        raise SystemExit(f"error: {error}") from None


# --------------------------------------------------------------------------- subcommands
def calibrate(recipe: Recipe, module: Any | None = None) -> Path:
    """Calibrate on the data's calibration split; returns the checkpoint path."""
    from sparse_lightning.calibration import AttributionCalibration

    module = module or _module(recipe)
    options = recipe.calibration
    callback = AttributionCalibration(
        units=options.units,
        ig_steps=options.ig_steps,
        run_name=options.run_name,
        dirpath=options.dirpath,
        dataset=recipe.data.describe("calibration"),
        allocations=options.allocations,
        allocation_batches=options.allocation_batches,
    )
    started = time.time()
    _trainer(recipe, [callback]).validate(module, datamodule=recipe.data, verbose=False)
    print(f"calibrated in {time.time() - started:.0f} s -> {callback.checkpoint_path}")
    return Path(callback.checkpoint_path)


def evaluate(
    recipe: Recipe, module: Any | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Evaluate the recipe's settings with the saved checkpoint; writes and prints the table.

    A given ``module``'s model is cast to ``model.dtype`` in place (the sweep passes the one it
    calibrated in float32).

    Returns:
        The table's rows and its metadata (model, splits, dtype, date, seconds).
    """
    from sparse_lightning.evaluation import (
        decode_speeds,
        format_table,
        run_sweep,
        save_table,
        sweep_settings,
    )

    path = recipe.calibration.checkpoint
    module = _cast(module or _module(recipe), recipe)
    _load_checkpoint(module, path)
    options = recipe.evaluation
    settings = sweep_settings(
        options.modes,
        options.levels,
        options.metric,
        options.budgets,
        options.allocations,
        options.lm_head,
    )
    started = time.time()
    rows = run_sweep(
        module,
        recipe.data,
        settings,
        trainer=_trainer(recipe, []),
        generation=options.generation,
        teacher_forced=options.teacher_forced,
        multiple_choice=options.multiple_choice,
    )
    if options.speed:
        prompt = _speed_prompt(recipe, module)
        speeds = decode_speeds(
            module, settings, prompt, options.speed_tokens, options.speed_repeats
        )
        for row, speed in zip(rows, speeds, strict=True):
            row["decode_tokens_per_s"] = speed["decode_tokens_per_s"]
            row["dense_decode_tokens_per_s"] = speed["dense_decode_tokens_per_s"]
            row["decode_speedup"] = speed["decode_speedup"]
            row["end_to_end_speedup"] = speed["speedup"]
    metadata = {
        "model": _model_label(recipe.model.name),
        "checkpoint": str(path),
        "calibration": recipe.data.describe("calibration"),
        "evaluation": recipe.data.describe("evaluation"),
        "dtype": recipe.model.dtype,
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.time() - started, 1),
    }
    json_path, _ = save_table(rows, _output(recipe) / "table", metadata)
    print(format_table(rows))
    print(f"evaluated {len(settings)} settings in {metadata['seconds']:.0f} s -> {json_path}")
    return rows, metadata


def sweep(recipe: Recipe) -> Path:
    """Calibrate unless a matching checkpoint exists, evaluate every setting, plot."""
    from sparse_lightning.calibration import run_differences
    from sparse_lightning.checkpoint import CheckpointError, read_metadata
    from sparse_lightning.evaluation import plot, plot_tradeoff

    module = _module(recipe)
    options, path = recipe.calibration, recipe.calibration.checkpoint
    dataset = recipe.data.describe("calibration")
    try:
        stored = read_metadata(path)
    except CheckpointError:
        stored = None
    differ = (
        run_differences(stored, module, options.units, dataset, options.ig_steps)
        if stored is not None
        else []
    )
    if options.reuse and stored is not None and not differ:
        print(f"reusing {path} (calibrated on {dataset})")
    else:
        if stored is not None and options.reuse:
            # Another model, targets, units, data or IG steps: its statistics are not ours.
            print(f"recalibrating: {path} came from a run with another {', '.join(differ)}")
        calibrate(recipe, module)
    rows, metadata = evaluate(recipe, module)
    title = (
        f"{metadata['model']} ({metadata['dtype']}): eval {metadata['evaluation']}, "
        f"calib {metadata['calibration']}, {metadata['date']}"
    )
    figure = plot(rows, _output(recipe) / "plot.png", title)
    print(f"plot -> {figure}")
    if any("decode_speedup" in row for row in rows):
        tradeoff = plot_tradeoff(rows, _output(recipe) / "tradeoff.png", title)
        print(f"fidelity against measured decode speed -> {tradeoff}")
    return figure


def export(recipe: Recipe) -> Path:
    """Compact the model with static masks and ``save_pretrained`` it (plus the tokenizer)."""
    options = recipe.export
    module = _cast(_module(recipe), recipe)
    _load_checkpoint(module, recipe.calibration.checkpoint)
    module.set_sparsity(mode="static", metric=options.metric, **options.levels)
    target = Path(options.output_dir or Path("exports") / recipe.calibration.run_name)
    compacted = module.compact()
    compacted.save_pretrained(target)
    if module.tokenizer is not None:
        module.tokenizer.save_pretrained(target)
    before = sum(p.numel() for p in module.model.parameters())
    after = sum(p.numel() for p in compacted.parameters())
    print(f"exported {after / 1e6:.1f} M parameters (from {before / 1e6:.1f} M) -> {target}")
    return target


# ----------------------------------------------------------------------------- helpers
def _explain(error: Exception, argv: Sequence[str]) -> str:
    """The parser's complaint, the recipe files involved, and how to find the valid keys."""
    recipes = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    where = f" (recipe: {', '.join(recipes)})" if recipes else ""
    sub = next((a for a in argv if a in SUBCOMMANDS), "<subcommand>")
    message = str(error)
    if "does not exist" in message:
        fix = "Check the path; the shipped recipes are in recipes/."
    elif "invalid choice" in message:
        fix = f"Subcommands: {', '.join(SUBCOMMANDS)}."
    else:
        fix = (
            "Fix the key's spelling or remove it; `sparse-lightning "
            f"{sub} --print_config` prints every valid key with its default."
        )
    return f"error: {message}{where}\n{fix}"


def _module(recipe: Recipe) -> Any:
    from sparse_lightning.models import load_demo_model, load_model
    from sparse_lightning.module import SparseActivationModule

    for split in ("calibration", "evaluation"):  # bad data fails here, before the model loads
        recipe.data.examples_of(split)
    options = recipe.model
    if options.name == "demo":
        model, tokenizer = load_demo_model()
    else:
        model, tokenizer = load_model(
            options.name, options.gguf_file, trust_remote_code=options.trust_remote_code
        )
    return SparseActivationModule(
        model,
        tokenizer,
        targets=recipe.calibration.targets,  # type: ignore[arg-type]
        max_new_tokens=options.max_new_tokens,
    )


def _cast(module: Any, recipe: Recipe) -> Any:
    """The module's model in ``model.dtype``, after any calibration (which stays float32)."""
    import torch

    module.model.to(getattr(torch, recipe.model.dtype))
    return module


def _load_checkpoint(module: Any, path: Path) -> None:
    if not path.is_file():
        raise SystemExit(
            f"error: no checkpoint at {path}. Run `sparse-lightning calibrate` with the same "
            "recipe first (or `sweep`, which calibrates), or set --calibration.run_name / "
            "--calibration.dirpath to an existing checkpoint."
        )
    module.load_statistics(path)


def _speed_prompt(recipe: Recipe, module: Any) -> Any:
    """The first evaluation question, formatted as the evaluation prompts are: what the
    speed is timed on."""
    from sparse_lightning.data import QACollator

    if module.tokenizer is None:
        raise SystemExit("error: timing decode needs a tokenizer; set evaluation.speed false.")
    data = recipe.data
    collate = QACollator(module.tokenizer, data.prompt_format, data.max_answer_tokens)
    return collate(data.examples_of("evaluation")[:1])["prompt_input_ids"]


def _output(recipe: Recipe) -> Path:
    return Path(recipe.evaluation.output_dir) / recipe.calibration.run_name


def _trainer(recipe: Recipe, callbacks: list[Any]) -> Any:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(save_dir=str(_output(recipe)), name="logs")
    return L.Trainer(**{**recipe.trainer, "logger": logger, "callbacks": callbacks})


def _model_label(name: str) -> str:
    """What tables and plots call the model: the ``demo`` alias names the packaged SmolLM2."""
    from sparse_lightning.models import DEMO_NAME, DEMO_PACKAGE

    return f"{DEMO_NAME} ({DEMO_PACKAGE})" if name == "demo" else name


if __name__ == "__main__":
    main(sys.argv[1:])
