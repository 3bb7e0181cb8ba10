"""The input-sparse executor: at batch-1 decode, projections read only the kept channels' weights.

For a kind whose units are the input channels of linear layers (the neurons entering the MLP
output projection, the hidden state entering q/k/v or gate/up, the head features entering o)
and a threshold selector (``mode="dynamic"``), a channel is kept when ``|x_i| >= t``. The
projections that read the site are fused into one weight stored transposed,
``(in_features, sum of out_features)``, whose rows are the channels: a dropped channel's row is
never read. The layout change replaces the weights (each projection's ``weight`` becomes a view
of its columns, so there is no second copy) and :meth:`InputSparseExecutor.remove` puts the
original layout back, bit for bit.

A single-token forward (batch-1 decode) calls the compiled kernel
(:mod:`sparse_lightning.kernels`) once for the whole group: q, k and v (or gate and up) read
their columns of one result. Every other forward (a prompt, teacher forcing, a batch) masks the
input and runs the projection: the reference the kernel must equal.

Example:
    >>> module = SparseActivationModule.from_pretrained(  # doctest: +SKIP
    ...     model, "checkpoints/run.safetensors", attn_input=0.4, mlp_input=0.4,
    ...     head_features=0.4, mlp=0.4)
    >>> module.model.generate(**inputs)  # doctest: +SKIP
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from sparse_lightning.architectures import ResolvedArchitecture
from sparse_lightning.architectures.weights import input_rows, is_transposed
from sparse_lightning.inference.executor import Executor, Owner, restrict
from sparse_lightning.inference.mask import MaskExecutor
from sparse_lightning.kernels import in_kernel_layout, load, transposed_rows
from sparse_lightning.selection import Selector
from sparse_lightning.units import UNIT_KINDS


def threshold_executor(
    owner: Owner,
    architecture: ResolvedArchitecture,
    kind: str,
    layer: int,
    selector: Selector,
) -> Executor:
    """The executor of a threshold selector: the kernel for input channels, masking for heads
    (a head is a block of channels, which one scalar threshold per channel cannot skip)."""
    factory = MaskExecutor if UNIT_KINDS[kind].per_head else InputSparseExecutor
    return factory(owner, architecture, kind, layer, selector)


class InputSparseExecutor(Executor):
    """Input-sparse projections for one layer and one kind of channel (not heads), from a
    threshold selector (``threshold(layer)``); see :class:`Executor`."""

    def __init__(
        self,
        owner: Owner,
        architecture: ResolvedArchitecture,
        kind: str,
        layer: int,
        selector: Selector,
    ) -> None:
        super().__init__(owner, architecture, kind, layer, selector)
        self.threshold = float(selector.threshold(layer))  # type: ignore[attr-defined]
        self.modules = architecture.site_modules(UNIT_KINDS[kind].site, layer)
        self.op = load()
        parts = [input_rows(m) for m in self.modules]
        # A new storage unless the one projection's weight already is the kernel's layout.
        self._own_storage = len(parts) > 1 or not in_kernel_layout(parts[0])
        self.weight_t = transposed_rows(parts) if self._own_storage else parts[0]
        self.slices: list[tuple[int, int]] = []
        start = 0
        with torch.no_grad():
            for module, part in zip(self.modules, parts, strict=True):
                columns = self.weight_t[:, start : start + part.shape[1]]
                self.slices.append((start, start + part.shape[1]))
                start += part.shape[1]
                if self._own_storage:
                    module.weight.data = columns if is_transposed(module) else columns.t()
        biases = [getattr(m, "bias", None) for m in self.modules]
        self.bias = (
            None
            if all(b is None for b in biases)
            else torch.cat(
                [
                    b.detach() if b is not None else self.weight_t.new_zeros(stop - begin)
                    for b, (begin, stop) in zip(biases, self.slices, strict=True)
                ]
            )
        )
        self._originals = [m.forward for m in self.modules]
        self._last: tuple[Tensor, Tensor] | None = None
        for index, module in enumerate(self.modules):
            module.forward = functools.partial(self._forward, index)

    def remove(self) -> None:
        """Put the original forwards and weight layout back (the same values, bit for bit)."""
        for module in self.modules:
            if module.__dict__.get("forward") is not None:
                del module.forward
            if self._own_storage:
                module.weight.data = module.weight.data.contiguous()
        self._last = None

    def _forward(self, index: int, x: Tensor) -> Tensor:
        original = self._originals[index]
        if not self.owner.enabled:
            return original(x)
        rows = self.owner.sparse_rows(x)
        if rows is False:
            return original(x)
        tokens = x.numel() // x.shape[-1]
        if self.owner.gather and tokens == 1 and rows is True and not x.requires_grad:
            begin, stop = self.slices[index]
            return self._fused(x, count=index == 0)[..., begin:stop]
        view = x.reshape(-1, self.units, 1)
        keep, zeroed, seen = restrict(self.selector.keep(self.layer, view), rows, tokens)
        if index == 0:
            self.owner.count(self.kind, zeroed=zeroed, seen=seen)
        return original(x * keep.reshape(x.shape).to(x.dtype))

    def _fused(self, x: Tensor, count: bool) -> Tensor:
        """The whole group's output for one token, computed once per input (eager)."""
        eager = not torch.compiler.is_compiling()
        if eager and self._last is not None and self._last[0] is x:
            return self._last[1]
        y = self.op(x, self.weight_t, self.threshold, self.bias)
        if count and eager:
            kept = (x.abs() >= self.threshold).sum()
            self.owner.count(self.kind, zeroed=self.units - kept, seen=self.units)
        if eager:
            self._last = (x, y)
        return y
