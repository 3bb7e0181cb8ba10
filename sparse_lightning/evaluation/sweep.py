"""Sweeps: metrics x sparsity levels x modes, written as JSON, CSV and a plot like the paper's.

Example:
    >>> settings = sweep_settings(["magnitude"], mlp=[0.5], heads=[0.0])
    >>> [(s.mode, s.mlp, s.heads) for s in settings]
    [('dynamic', 0.0, 0.0), ('magnitude', 0.5, 0.0)]
"""

from __future__ import annotations

import csv
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L

from sparse_lightning.evaluation.callback import QAEvaluation
from sparse_lightning.evaluation.metrics import KEYS
from sparse_lightning.selection import SparsityConfig
from sparse_lightning.units import UNIT_KINDS, check_kinds

#: Metrics drawn in the plot (all on a 0-100 scale there).
PLOTTED = ("bleu_vs_dense", "rougeL", "f1", "top1_agreement", "mc_accuracy")
#: Metrics kept as fractions in tables, shown x100 in the plot.
FRACTIONS = ("top1_agreement", "mc_accuracy")
#: Measured decode speed (see :func:`~sparse_lightning.evaluation.speed.decode_speeds`).
SPEED_KEYS = ("decode_speedup", "decode_tokens_per_s", "end_to_end_speedup")


def sweep_settings(
    modes: Sequence[str],
    levels: Mapping[str, Sequence[float]] | None = None,
    metric: str = "corrected_gxo",
    budgets: Sequence[float] = (),
    allocations: Sequence[str] = ("auto",),
    lm_head: Sequence[float] = (0.0,),
    **per_kind: Sequence[float],
) -> list[SparsityConfig]:
    """The dense model first, then every mode at every combination of levels but all-zero,
    then every byte budget under every allocation (``mode="dynamic"``, the kernel's).

    Args:
        modes: selection modes.
        levels: unit kind -> the levels to try (kinds left out: dense); also as keywords
            (``mlp=[0.5, 0.7], heads=[0.0]``). The first kind varies fastest.
        metric: ranking metric of ``static`` and ``oracle``.
        budgets: shares of the decode weight bytes to skip.
        allocations: how each budget spreads over channel kinds and layers.
        lm_head: levels of the output projection's input, each tried with every budget (a
            budget of 0 with a level > 0 sparsifies only the lm_head).
    """
    grid = {**dict(levels or {}), **per_kind}
    kinds = check_kinds(grid or UNIT_KINDS, "sweep levels")
    settings = [SparsityConfig()]
    for mode in modes:
        for combination in itertools.product(*(grid.get(k, [0.0]) for k in reversed(kinds))):
            chosen = dict(zip(reversed(kinds), combination, strict=True))
            if any(chosen.values()):
                settings.append(SparsityConfig(chosen, mode=mode, metric=metric))
    settings += [
        SparsityConfig(budget=budget or None, allocation=allocation, lm_head=head)
        for head in lm_head
        for allocation in allocations
        for budget in budgets
        if budget or head
    ]
    return settings


def method(row: Mapping[str, Any]) -> str:
    """How a result row chose its units: the mode, or the allocation of a byte budget."""
    if is_dense_row(row):
        return "dense"
    head = f" + lm_head {row['lm_head']:g}" if row.get("lm_head") else ""
    if row.get("budget") or head:
        return f"budget {row['allocation']}{head}"
    return row["mode"]


def is_dense_row(row: Mapping[str, Any]) -> bool:
    """A result row of the dense setting (every kind at 0, no budget)."""
    sparse = any(row.get(kind, 0.0) for kind in UNIT_KINDS)
    return not sparse and not row.get("budget") and not row.get("lm_head")


def run_sweep(
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    settings: Sequence[SparsityConfig],
    trainer: L.Trainer | None = None,
    **evaluation: Any,
) -> list[dict[str, Any]]:
    """Evaluate every setting on the datamodule's evaluation split (one ``trainer.test``).

    Args:
        module: a :class:`~sparse_lightning.SparseActivationModule` with statistics loaded
            (dynamic and static modes read them).
        datamodule: e.g. :class:`~sparse_lightning.QADataModule`.
        settings: from :func:`sweep_settings`.
        trainer: a trainer to run on; a CPU trainer without logger by default. Its own
            callbacks are kept; a :class:`QAEvaluation` is added.
        **evaluation: passed to :class:`QAEvaluation` (``generation=False``, ...).

    Returns:
        One row per setting (see :attr:`QAEvaluation.results`).
    """
    callback = QAEvaluation(settings, **evaluation)
    if trainer is None:
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.callbacks.append(callback)
    try:
        trainer.test(module, datamodule=datamodule, verbose=False)
    finally:
        trainer.callbacks.remove(callback)
    return callback.results


def save_table(
    rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], metadata: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``<path>.json`` (rows + metadata) and ``<path>.csv`` (rows); returns both paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = path.with_suffix(".json"), path.with_suffix(".csv")
    json_path.write_text(json.dumps({**metadata, "results": list(rows)}, indent=2) + "\n")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table: one row per setting, one column per metric present."""
    keys = [k for k in (*KEYS, *SPEED_KEYS) if any(k in r for r in rows)]
    shown = [kind for kind in UNIT_KINDS if any(r.get(kind) for r in rows)]
    budgets = any(r.get("budget") for r in rows)
    head = ["method", *shown, *(["budget", "bytes skipped"] if budgets else []), "AR", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        levels = [f"{r.get(kind, 0.0):.0%}" for kind in shown]
        if budgets:
            skipped = r.get("realized_decode_bytes_skipped")
            levels += [
                f"{r['budget']:.0%}" if r.get("budget") else "—",
                "—" if skipped is None else f"{skipped:.0%}",
            ]
        cells = [method(r), *levels, f"{r['activation_ratio']:.0%}"]
        cells += [f"{r[k]:.3f}" if k in r else "—" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str) -> Path:
    """Metric against activation ratio, one panel per mode and one line per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = [r for r in rows if is_dense_row(r)]
    modes = list(dict.fromkeys(method(r) for r in rows if r not in dense))
    fig, axes = plt.subplots(
        1, max(1, len(modes)), figsize=(4.5 * max(1, len(modes)), 4), squeeze=False
    )
    for ax, mode in zip(axes[0], modes or ["dense"], strict=False):
        points = sorted(
            dense + [r for r in rows if method(r) == mode and r not in dense],
            key=lambda r: r["activation_ratio"],
        )
        for key in PLOTTED:
            have = [r for r in points if key in r]
            if have:
                scale = 100.0 if key in FRACTIONS else 1.0
                ax.plot(
                    [100 * r["activation_ratio"] for r in have],
                    [scale * r[key] for r in have],
                    marker="o",
                    label=key,
                )
        ax.set(title=mode, xlabel="activation ratio (%)", ylabel="score (0-100)", ylim=(0, 102))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_tradeoff(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str) -> Path:
    """Fidelity against measured decode speedup, one line per method (mode or allocation):
    the trade-off on the machine that ran the sweep. Needs rows with ``decode_speedup``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "top1_agreement" if any("top1_agreement" in r for r in rows) else "bleu_vs_dense"
    scale = 100.0 if key == "top1_agreement" else 1.0
    dense = [r for r in rows if is_dense_row(r)]
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for name in dict.fromkeys(method(r) for r in rows if r not in dense):
        points = sorted(
            (r for r in rows if method(r) == name and "decode_speedup" in r and key in r),
            key=lambda r: r["decode_speedup"],
        )
        ax.plot(
            [1.0] + [r["decode_speedup"] for r in points],
            [scale * (1.0 if key == "top1_agreement" else 100.0)]
            + [scale * r[key] for r in points],
            marker="o",
            label=name,
        )
    ax.set(
        xlabel="measured decode speedup over dense (eager generate, batch 1)",
        ylabel=f"{key} (0-100)",
        title=title,
    )
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
