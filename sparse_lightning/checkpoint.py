"""Sparsity checkpoints: calibration statistics in one safetensors file, written atomically.

Layout: tensors ``"<kind>.<name>"`` (see :mod:`sparse_lightning.attribution.statistics`);
metadata (all strings, nested values as JSON): ``format``, ``library_version``,
``base_model``, ``model_type``, ``fingerprint``, ``metrics``, ``ig_steps``, ``tokens``,
``targets``, ``dataset``, ``created``.

Example:
    >>> path = save_statistics(stats, "checkpoints/smollm2.safetensors")  # doctest: +SKIP
    >>> stats = load_statistics(path, expect=resolve(model).fingerprint)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from sparse_lightning.architectures import Fingerprint
from sparse_lightning.attribution.statistics import Statistics
from sparse_lightning.version import __version__

FORMAT = "sparse_lightning.statistics/1"
DEFAULT_DIR = Path("checkpoints")


class CheckpointError(ValueError):
    """A sparsity checkpoint is missing, damaged, or belongs to another model."""


def run_path(run_name: str, dirpath: str | os.PathLike[str] = DEFAULT_DIR) -> Path:
    """Where a calibration run's checkpoint lives: ``<dirpath>/<run_name>.safetensors``."""
    return Path(dirpath) / f"{run_name}.safetensors"


def save_statistics(statistics: Statistics, path: str | os.PathLike[str]) -> Path:
    """Write ``statistics`` to ``path`` atomically (temp file in the same folder, then rename).

    An interrupted write leaves any earlier file at ``path`` untouched.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"Checkpoint path must end in .safetensors, got {path}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = statistics.metadata.get("fingerprint")
    if fingerprint is None:
        raise CheckpointError("These statistics carry no architecture fingerprint; recalibrate.")
    metadata = {
        **statistics.metadata,
        "format": FORMAT,
        "library_version": __version__,
        "model_type": Fingerprint.from_json(fingerprint).model_type,
        "metrics": json.dumps(sorted(next(iter(statistics.units.values())).sums)),
        "ig_steps": str(statistics.ig_steps),
        "tokens": str(statistics.tokens),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tensors = {k: v.contiguous().cpu() for k, v in statistics.tensors().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of a checkpoint, without loading its tensors."""
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated or "
            "corrupted. Recalibrate to write it again."
        ) from err
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a sparse_lightning checkpoint (format {metadata.get('format')!r}, "
            f"expected {FORMAT!r})."
        )
    return metadata


def load_statistics(path: str | os.PathLike[str], expect: Fingerprint | None = None) -> Statistics:
    """Read a checkpoint; with ``expect``, check it was calibrated on that architecture.

    Raises:
        CheckpointError: missing, truncated or corrupted file, or a fingerprint mismatch (the
            message names both fingerprints).
    """
    metadata = read_metadata(path)
    if expect is not None:
        stored = Fingerprint.from_json(metadata["fingerprint"])
        if stored != expect:
            raise CheckpointError(
                f"{path} was calibrated on {stored.to_json()} but the model is "
                f"{expect.to_json()}. Load it onto the model it was calibrated on, or calibrate "
                "this model."
            )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} could not be read ({err}); it may be corrupted.") from err
    return Statistics.from_tensors(tensors, int(metadata.get("ig_steps", 0)), metadata)


def _existing(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"No sparsity checkpoint at {path}. Calibrate first (AttributionCalibration with "
            "run_name=...) or pass the path of an existing .safetensors checkpoint."
        )
    return path
