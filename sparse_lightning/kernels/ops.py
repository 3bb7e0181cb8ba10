"""The compiled input-sparse linear op: built on first use, registered with ``torch.library``.

``torch.ops.sparse_lightning.input_sparse_linear(x, weight_t, threshold, bias)`` computes
``(x * (|x| >= threshold)) @ weight_t + bias`` while reading only the rows of ``weight_t``
(``(in_features, out_features)``, the weight stored transposed) whose input channel is kept.
``input_sparse_linear_topk(x, weight_t, keep, bias)`` keeps instead each token's ``keep``
channels of largest magnitude (those at or above the ``keep``-th largest ``|x_i|``), the
per-token count that the output projection's input uses (no calibrated threshold).
``input_sparse_logits(x, weight_t, keep, candidates, bias)`` is the output projection of a
decode step in one call: the top-k op's approximate logits with their ``candidates`` largest
recomputed exactly (:func:`reference_logits`). ``rotated_logits(x_rot, approx_t, keep,
candidates, x, weight, bias)`` does the same from an input and a weight in another basis
(``approx_t`` may be bfloat16), the candidates' exact logits from ``weight``'s own rows
(:func:`reference_rotated_logits`).
All four take float32, float64, bfloat16 or float16 tensors (a model's own type): the two-byte
types stream half the bytes, are summed in float32 and rounded once per output, as ATen's
matmul of them is. Other types, devices or layouts run the same math with ATen operators.
The C++ source (``csrc/input_sparse_linear.cpp``) is compiled with
``torch.utils.cpp_extension`` the first time :func:`load` runs (AVX2/FMA when this CPU has
them, OpenMP threads through ``at::parallel_for``) and cached by torch's extension cache. A
fake implementation makes it traceable by ``torch.compile`` without graph breaks. Without a
working compiler the same op is defined in pure PyTorch (it reads every weight, so it saves
no time) and one warning says why.

Example:
    >>> import torch
    >>> op = load()
    >>> x = torch.tensor([[0.5, -0.01, 2.0]])
    >>> w_t = torch.arange(6.0).reshape(3, 2)  # 3 input channels, 2 outputs
    >>> op(x, w_t, 0.1, None)  # 0.5 * [0, 1] + 2.0 * [4, 5]; channel 1's row is skipped
    tensor([[ 8.0000, 10.5000]])
"""

from __future__ import annotations

import ctypes
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

NAME = "sparse_lightning::input_sparse_linear"
SCHEMA = "(Tensor x, Tensor weight_t, float threshold, Tensor? bias) -> Tensor"
TOPK_NAME = "sparse_lightning::input_sparse_linear_topk"
TOPK_SCHEMA = "(Tensor x, Tensor weight_t, int keep, Tensor? bias) -> Tensor"
LOGITS_NAME = "sparse_lightning::input_sparse_logits"
LOGITS_SCHEMA = "(Tensor x, Tensor weight_t, int keep, int candidates, Tensor? bias) -> Tensor"
ROTATED_NAME = "sparse_lightning::rotated_logits"
ROTATED_SCHEMA = (
    "(Tensor x_rot, Tensor approx_t, int keep, int candidates, Tensor x, Tensor weight, "
    "Tensor? bias) -> Tensor"
)
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE = CSRC / "input_sparse_linear.cpp"
#: The extension's sources (``sparse_rows.h`` holds what both share).
SOURCES = [SOURCE, CSRC / "sparse_logits.cpp"]
#: The C functions the compiled kernel exports for Inductor's C++ wrapper, per op: their
#: declarations, as ``torch._inductor.config.aot_inductor.custom_ops_to_c_shims`` takes them.
C_SHIMS = {
    "input_sparse_linear": "AOTITorchError aoti_torch_cpu_input_sparse_linear(AtenTensorHandle x, "
    "AtenTensorHandle weight_t, double threshold, AtenTensorHandle* bias, AtenTensorHandle* ret0)",
    "input_sparse_linear_topk": "AOTITorchError aoti_torch_cpu_input_sparse_linear_topk("
    "AtenTensorHandle x, AtenTensorHandle weight_t, int64_t keep, AtenTensorHandle* bias, "
    "AtenTensorHandle* ret0)",
    "input_sparse_logits": "AOTITorchError aoti_torch_cpu_input_sparse_logits(AtenTensorHandle x, "
    "AtenTensorHandle weight_t, int64_t keep, int64_t candidates, AtenTensorHandle* bias, "
    "AtenTensorHandle* ret0)",
    "rotated_logits": "AOTITorchError aoti_torch_cpu_rotated_logits(AtenTensorHandle x_rot, "
    "AtenTensorHandle approx_t, int64_t keep, int64_t candidates, AtenTensorHandle x, "
    "AtenTensorHandle weight, AtenTensorHandle* bias, AtenTensorHandle* ret0)",
}

_state: dict[str, object] = {}


def reference(x: Tensor, weight_t: Tensor, threshold: float, bias: Tensor | None) -> Tensor:
    """The op's math in plain PyTorch: the fallback, and what the kernel is tested against."""
    kept = x * (x.abs() >= threshold).to(x.dtype)
    y = kept @ weight_t
    return y if bias is None else y + bias


def top_k_channels(x: Tensor, keep: int) -> Tensor:
    """The top-k op's keep-mask: each token's channels at or above its ``keep``-th largest
    magnitude (every channel when ``keep >= in_features``, none at 0)."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}.")
    magnitude = x.abs()
    if keep == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    if keep >= x.shape[-1]:
        return torch.ones_like(x, dtype=torch.bool)
    return magnitude >= magnitude.topk(keep, dim=-1).values[..., keep - 1 :]


def reference_topk(x: Tensor, weight_t: Tensor, keep: int, bias: Tensor | None) -> Tensor:
    """The top-k op's math in plain PyTorch (see :func:`top_k_channels`)."""
    y = (x * top_k_channels(x, keep).to(x.dtype)) @ weight_t
    return y if bias is None else y + bias


def reference_logits(
    x: Tensor, weight_t: Tensor, keep: int, candidates: int, bias: Tensor | None
) -> Tensor:
    """The logits op's math in plain PyTorch: :func:`reference_topk`'s approximate logits, with
    the ``candidates`` largest of each token replaced by the exact ``x @ weight_t + bias``."""
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}.")
    approx = reference_topk(x, weight_t, keep, bias)
    index = approx.topk(min(candidates, weight_t.shape[1]), dim=-1).indices
    exact = x @ weight_t if bias is None else x @ weight_t + bias
    return approx.scatter(-1, index, exact.gather(-1, index))


def reference_rotated_logits(
    x_rot: Tensor,
    approx_t: Tensor,
    keep: int,
    candidates: int,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
) -> Tensor:
    """The rotated op's math in plain PyTorch: approximate logits from ``x_rot``'s ``keep``
    largest channels and ``approx_t`` (upcast to ``x_rot``'s dtype), with the ``candidates``
    largest of each token replaced by the exact ``x @ weight.T + bias``."""
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}.")
    approx = reference_topk(x_rot, approx_t.to(x_rot.dtype), keep, bias)
    index = approx.topk(min(candidates, approx_t.shape[1]), dim=-1).indices
    exact = torch.nn.functional.linear(x, weight, bias)
    return approx.scatter(-1, index, exact.gather(-1, index))


def load() -> Callable[..., Tensor]:
    """The op, building (first call) or loading (later calls) the compiled kernel.

    Returns:
        ``torch.ops.sparse_lightning.input_sparse_linear``.
    """
    if "op" not in _state:
        _state["compiled"] = _build()
        if not _state["compiled"]:
            torch.library.define(NAME, SCHEMA)
            torch.library.impl(NAME, "CompositeExplicitAutograd")(reference)
            torch.library.define(TOPK_NAME, TOPK_SCHEMA)
            torch.library.impl(TOPK_NAME, "CompositeExplicitAutograd")(reference_topk)
            torch.library.define(LOGITS_NAME, LOGITS_SCHEMA)
            torch.library.impl(LOGITS_NAME, "CompositeExplicitAutograd")(reference_logits)
            torch.library.define(ROTATED_NAME, ROTATED_SCHEMA)
            torch.library.impl(ROTATED_NAME, "CompositeExplicitAutograd")(reference_rotated_logits)
        torch.library.register_fake(NAME)(_fake)
        torch.library.register_fake(TOPK_NAME)(_fake)
        torch.library.register_fake(LOGITS_NAME)(_fake_logits)
        torch.library.register_fake(ROTATED_NAME)(_fake_rotated)
        _state["op"] = torch.ops.sparse_lightning.input_sparse_linear
        _state["topk"] = torch.ops.sparse_lightning.input_sparse_linear_topk
        _state["logits"] = torch.ops.sparse_lightning.input_sparse_logits
        _state["rotated"] = torch.ops.sparse_lightning.rotated_logits
    return _state["op"]  # type: ignore[return-value]


def load_topk() -> Callable[..., Tensor]:
    """``torch.ops.sparse_lightning.input_sparse_linear_topk`` (built as :func:`load` does)."""
    load()
    return _state["topk"]  # type: ignore[return-value]


def load_logits() -> Callable[..., Tensor]:
    """``torch.ops.sparse_lightning.input_sparse_logits`` (built as :func:`load` does)."""
    load()
    return _state["logits"]  # type: ignore[return-value]


def load_rotated() -> Callable[..., Tensor]:
    """``torch.ops.sparse_lightning.rotated_logits`` (built as :func:`load` does)."""
    load()
    return _state["rotated"]  # type: ignore[return-value]


def compiled() -> bool:
    """Whether the op runs the compiled kernel (``False``: the pure-PyTorch fallback)."""
    load()
    return bool(_state["compiled"])


def inductor_options() -> dict[str, object]:
    """Inductor config entries that let a step compiled with ``cpp_wrapper`` call the compiled
    kernel as a C function, instead of looking the op up in the dispatcher and boxing its
    arguments on every call (each decode step makes some hundred calls). Empty when the
    kernel did not build (the pure-PyTorch op has no C entry points).

    Example:
        >>> from torch._inductor import config
        >>> with config.patch({"cpp_wrapper": True, **inductor_options()}):
        ...     pass  # compile (first call of) the decode step here
    """
    if not compiled() or not _state.get("shims"):
        return {}
    ops = torch.ops.sparse_lightning
    shims = {getattr(ops, name).default: [declaration] for name, declaration in C_SHIMS.items()}
    return {"aot_inductor.custom_ops_to_c_shims": shims}


def _fake(x: Tensor, weight_t: Tensor, threshold: float | int, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


def _fake_logits(
    x: Tensor, weight_t: Tensor, keep: int, candidates: int, bias: Tensor | None
) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


def _fake_rotated(x_rot: Tensor, approx_t: Tensor, *rest: object) -> Tensor:
    return x_rot.new_empty((*x_rot.shape[:-1], approx_t.shape[1]))


#: ``SPARSE_LIGHTNING_KERNEL_ISA`` values: the widest this CPU has, at most AVX2, or none of
#: these (a build for an older CPU of the same family, or to exercise the narrower paths).
ISAS = ("native", "avx2", "generic")


def cpu_flags() -> list[str]:
    """Compiler flags for this CPU: AVX2 and FMA where ``/proc/cpuinfo`` lists both (with
    F16C, half-precision conversion, where it lists it), and AVX-512F beside them where it
    lists that too; ``SPARSE_LIGHTNING_KERNEL_ISA`` (one of :data:`ISAS`) caps them."""
    isa = os.environ.get("SPARSE_LIGHTNING_KERNEL_ISA", "native")
    if isa not in ISAS:
        raise ValueError(f"SPARSE_LIGHTNING_KERNEL_ISA must be one of {ISAS}, got {isa!r}.")
    try:
        with open("/proc/cpuinfo") as handle:
            flags = set(next((line for line in handle if line.startswith("flags")), "").split())
    except OSError:
        flags = set()
    if isa == "generic" or not {"avx2", "fma"} <= flags:
        return []
    return [
        "-mavx2",
        "-mfma",
        *(["-mf16c"] if "f16c" in flags else []),
        *(["-mavx512f"] if "avx512f" in flags and isa == "native" else []),
    ]


def isa_suffix(flags: list[str]) -> str:
    """The extension's name suffix for its instruction set (a build per ISA in the cache)."""
    return "_avx512" if "-mavx512f" in flags else "_avx2" if flags else ""


def build_flags(flags: list[str] | None = None) -> dict[str, list[str]]:
    """``extra_cflags`` and ``extra_ldflags`` of the kernel's build on this CPU (``flags``:
    :func:`cpu_flags`'s, by default; benchmarks that build another revision of the kernel
    beside it use the same)."""
    # -fopenmp gives at::parallel_for its threads; it links libgomp.so.1, the runtime torch
    # already loaded, so there is still one thread pool. -fvisibility=hidden keeps the helpers
    # of sparse_rows.h (inline functions of a named namespace) to each library: exported as weak
    # symbols, a build's calls to them went through the PLT and, the kernel's library being
    # global (_build), bound to another build's of the same names loaded before it (an ISA's or
    # a benchmark's revision; docs/kernel_tries.md, "A flaw"). The C entry points are exported
    # by their own attribute, the ops by registration.
    flags = cpu_flags() if flags is None else flags
    return {
        "extra_cflags": ["-O3", "-fopenmp", "-fvisibility=hidden", *flags],
        "extra_ldflags": ["-fopenmp"],
    }


def _build() -> bool:
    if os.environ.get("SPARSE_LIGHTNING_KERNELS", "1") == "0":
        return False
    flags = cpu_flags()  # a bad SPARSE_LIGHTNING_KERNEL_ISA is an error, not a fallback
    try:
        from torch.utils.cpp_extension import load as load_extension

        library = load_extension(
            name="sparse_lightning_kernels" + isa_suffix(flags),
            sources=[str(source) for source in SOURCES],
            **build_flags(flags),
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # any build or load failure means: use the fallback
        warnings.warn(
            "sparse_lightning could not build its CPU kernel (input_sparse_linear), so sparse "
            "decode runs a pure-PyTorch path with the same outputs but no speedup. "
            f"Cause: {type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}. "
            "Fix: install a C++ compiler (g++) and `pip install ninja`; set "
            "SPARSE_LIGHTNING_KERNELS=0 to skip the build silently.",
            stacklevel=3,
        )
        return False
    try:
        # torch loads the library with its symbols private; the C entry points of
        # inductor_options() must resolve from the generated wrapper's library, so make them
        # global (RTLD_NOLOAD: the library is already loaded, this only widens its scope).
        ctypes.CDLL(library, mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
        _state["shims"] = True
    except (AttributeError, OSError, TypeError):  # then steps call it through the dispatcher
        _state["shims"] = False
    return True
