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

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from torch import Tensor

from sparse_lightning.architectures import Fingerprint
from sparse_lightning.attribution.statistics import Statistics
from sparse_lightning.version import __version__

FORMAT = "sparse_lightning.statistics/3"
#: Formats this version reads: /1 held MLP neurons and heads only; /2 adds the channel kinds,
#: the run record (units, weights digest) and allocation tables; /3 the lm_head input's second
#: moment (``lm_head.*``, which a /2 reader would take for a unit kind). The layout is the same.
READABLE = ("sparse_lightning.statistics/1", "sparse_lightning.statistics/2", FORMAT)
DEFAULT_DIR = Path("checkpoints")


class CheckpointError(ValueError):
    """A sparsity checkpoint is missing, damaged, or belongs to another model."""


def run_path(run_name: str, dirpath: str | os.PathLike[str] = DEFAULT_DIR) -> Path:
    """Where a calibration run's checkpoint lives: ``<dirpath>/<run_name>.safetensors``."""
    return Path(dirpath) / f"{run_name}.safetensors"


def save_statistics(statistics: Statistics, path: str | os.PathLike[str]) -> Path:
    """Write ``statistics`` to ``path`` atomically (temp file in the same folder, then rename).

    An interrupted write leaves any earlier file at ``path`` untouched; statistics that are not
    finite are refused before anything is written. The file gets the usual permissions
    (``0666`` less the umask).

    Raises:
        CheckpointError: a path that is not ``.safetensors``, non-finite statistics, or
            statistics without an architecture fingerprint.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"Checkpoint path must end in .safetensors, got {path}.")
    tensors = {k: v.contiguous().cpu() for k, v in statistics.tensors().items()}
    _check_finite(tensors, path)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        # mkstemp makes the file private (0600); a checkpoint is an ordinary file.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of a checkpoint, without loading its tensors."""
    return _read(path, tensors=False)[0]


def load_statistics(path: str | os.PathLike[str], expect: Fingerprint | None = None) -> Statistics:
    """Read a checkpoint; with ``expect``, check it was calibrated on that architecture.

    Metadata and tensors come from one open handle, so a file replaced while it is read
    (another process saving the same run) gives one whole file, never a mix of two.

    Raises:
        CheckpointError: missing, truncated or corrupted file, non-finite statistics, or a
            fingerprint mismatch (the message names both fingerprints).
    """
    metadata, tensors = _read(path, tensors=True)
    if expect is not None:
        stored = Fingerprint.from_json(metadata["fingerprint"])
        if stored != expect:
            raise CheckpointError(
                f"{path} was calibrated on {stored.to_json()} but the model is "
                f"{expect.to_json()}. Load it onto the model it was calibrated on, or calibrate "
                "this model."
            )
    _check_finite(tensors, Path(path))
    return Statistics.from_tensors(tensors, int(metadata.get("ig_steps", 0)), metadata)


def _read(path: str | os.PathLike[str], tensors: bool) -> tuple[dict[str, str], dict[str, Tensor]]:
    # The file is read once, through one handle: safetensors' lazy loading reopens the file by
    # name for each tensor, which mixes two files when the checkpoint is replaced meanwhile.
    path = _existing(path)
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if size > os.fstat(handle.fileno()).st_size - 8:
                raise ValueError(f"its header claims {size} bytes, more than the file holds")
            header = handle.read(size)
            rest = handle.read() if tensors else b""
        metadata = json.loads(header).get("__metadata__") or {}
        if metadata.get("format") not in READABLE:
            raise CheckpointError(
                f"{path} is not a sparse_lightning checkpoint (format "
                f"{metadata.get('format')!r}, expected {FORMAT!r})."
            )
        loaded = load_bytes(size.to_bytes(8, "little") + header + rest) if tensors else {}
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, AttributeError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated or "
            "corrupted. Recalibrate to write it again."
        ) from err
    return metadata, loaded


def _check_finite(tensors: dict[str, Tensor], path: Path) -> None:
    bad = [key for key, value in tensors.items() if not torch.isfinite(value).all()]
    if bad:
        raise CheckpointError(
            f"The statistics for {path} are not finite (NaN or inf) in {', '.join(sorted(bad))}; "
            "selection would read nonsense from them. Recalibrate in float32 (float16 "
            "overflows) on data whose loss is finite."
        )


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _existing(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"No sparsity checkpoint at {path}. Calibrate first (AttributionCalibration with "
            "run_name=...) or pass the path of an existing .safetensors checkpoint."
        )
    return path
