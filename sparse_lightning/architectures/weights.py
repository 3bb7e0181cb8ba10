"""One adapter for the two weight orientations: ``nn.Linear`` and transformers' ``Conv1D``.

``nn.Linear`` stores its weight as ``(out_features, in_features)``; GPT-2's ``Conv1D`` stores
``(in_features, out_features)``. Everything that reads sizes, slices weights or relays them
out goes through here, so the orientation is decided in one place.

Example:
    >>> from torch import nn
    >>> linear = nn.Linear(3, 5)
    >>> in_features(linear), out_features(linear), tuple(input_rows(linear).shape)
    (3, 5, (3, 5))
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn


def is_transposed(module: nn.Module) -> bool:
    """The weight is stored ``(in_features, out_features)`` (transformers' ``Conv1D``)."""
    return type(module).__name__ == "Conv1D"


def in_features(module: nn.Module) -> int:
    """Width of the projection's input."""
    return int(module.weight.shape[0 if is_transposed(module) else 1])


def out_features(module: nn.Module) -> int:
    """Width of the projection's output."""
    return int(module.weight.shape[1 if is_transposed(module) else 0])


def input_rows(module: nn.Module) -> Tensor:
    """The weight as ``(in_features, out_features)``: one row per input feature (a view)."""
    return module.weight if is_transposed(module) else module.weight.t()


def store_input_rows(module: nn.Module) -> bool:
    """Lay an ``nn.Linear`` weight out so that :func:`input_rows` is contiguous, in place.

    The values and the parameter object stay the same (no extra memory); only the strides
    change. Returns whether the layout changed (then :func:`restore_layout` undoes it).
    """
    if input_rows(module).is_contiguous():
        return False
    with torch.no_grad():
        module.weight.data = module.weight.data.t().contiguous().t()
    return True


def restore_layout(module: nn.Module) -> None:
    """Undo :func:`store_input_rows`: the weight contiguous in its own orientation again."""
    module.weight.data = module.weight.data.contiguous()


def slice_outputs(state: dict[str, Tensor], path: str, module: nn.Module, keep: Tensor) -> None:
    """Keep only the output features ``keep`` of ``path`` in a state dict (weight and bias)."""
    dim = 1 if is_transposed(module) else 0
    state[f"{path}.weight"] = state[f"{path}.weight"].index_select(dim, keep)
    if getattr(module, "bias", None) is not None:
        state[f"{path}.bias"] = state[f"{path}.bias"].index_select(0, keep)


def slice_inputs(state: dict[str, Tensor], path: str, module: nn.Module, keep: Tensor) -> None:
    """Keep only the input features ``keep`` of ``path`` in a state dict."""
    dim = 0 if is_transposed(module) else 1
    state[f"{path}.weight"] = state[f"{path}.weight"].index_select(dim, keep)


def weights_digest(model: nn.Module, sample: int = 4096) -> str:
    """A short fingerprint of a model's weight *values* (not only their shapes).

    Hashes every tensor's name, shape, dtype and its first and last ``sample`` elements: two
    checkpoints of the same architecture (a base model and its instruct tune) differ there,
    and it costs milliseconds where hashing every byte would cost seconds.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        for part in (flat[:sample], flat[-sample:]):
            digest.update(part.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
