"""Helpers shared by the benchmark scripts: machine description and JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

#: The shared TruthfulQA CSV beside the checkout.
TRUTHFULQA = Path(__file__).resolve().parents[2] / "shared" / "data" / "TruthfulQA.csv"
#: Where the speed benchmarks keep the checkpoint their static masks come from, and its rows.
STATIC_CHECKPOINT = (
    Path(__file__).resolve().parents[1]
    / "checkpoints"
    / "smollm2-truthfulqa-static-bench.safetensors"
)
STATIC_ROWS = range(400, 432)


def calibrated_checkpoint(model, tokenizer, rows: range, path: Path, batch_size: int = 8) -> Path:
    """``path`` if it holds a readable checkpoint, else calibrate on TruthfulQA ``rows`` there.

    Dense greedy answers (32 tokens), MLP neurons and heads, no IG: the library's defaults.
    """
    import lightning as L
    from torch.utils.data import DataLoader

    from sparse_lightning import (
        AttributionCalibration,
        QACollator,
        SparseActivationModule,
        load_truthfulqa,
    )
    from sparse_lightning.checkpoint import CheckpointError, read_metadata

    try:
        read_metadata(path)
        return path
    except CheckpointError:
        pass
    print(f"calibrating on TruthfulQA rows {rows.start}-{rows.stop - 1} -> {path}")
    questions = load_truthfulqa(TRUTHFULQA, rows=rows)
    loader = DataLoader(questions, batch_size=batch_size, collate_fn=QACollator(tokenizer))
    module = SparseActivationModule(model, tokenizer, targets="dense", max_new_tokens=32)
    callback = AttributionCalibration(
        run_name=path.stem,
        dirpath=path.parent,
        dataset=f"TruthfulQA rows {rows.start}-{rows.stop - 1}",
    )
    L.Trainer(accelerator="cpu", callbacks=[callback], logger=False).validate(module, loader)
    return path


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_info() -> dict[str, object]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [
                line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")
            ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def save_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"saved {path}")
