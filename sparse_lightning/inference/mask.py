"""The reference executor: zero the dropped units at the input of the projections that read them.

Masking multiplies by zero and saves no work; it is what every faster executor must equal, and
what runs where no faster path applies (several tokens at once, heads).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparse_lightning.architectures import ResolvedArchitecture
from sparse_lightning.inference.executor import Executor, Owner, restrict
from sparse_lightning.selection import Selector
from sparse_lightning.units import UNIT_KINDS


class MaskExecutor(Executor):
    """Forward pre-hooks that mask one layer's units of one kind (see :class:`Executor`).

    Every projection reading the site gets the same masked input (q, k and v; gate and up).
    """

    def __init__(
        self,
        owner: Owner,
        architecture: ResolvedArchitecture,
        kind: str,
        layer: int,
        selector: Selector,
    ) -> None:
        super().__init__(owner, architecture, kind, layer, selector)
        self.width = architecture.unit_width(kind)
        modules = architecture.site_modules(UNIT_KINDS[kind].site, layer)
        self._last: tuple[Tensor, Tensor] | None = None
        self._handles = [
            module.register_forward_pre_hook(self._hook(first=index == 0))
            for index, module in enumerate(modules)
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = None

    def _hook(self, first: bool):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if not self.owner.enabled:
                return None
            x: Tensor = args[0]
            eager = not torch.compiler.is_compiling()
            if eager and not first and self._last is not None and self._last[0] is x:
                return (self._last[1], *args[1:])  # the mask the first projection computed
            rows = self.owner.sparse_rows(x)
            if rows is False:
                return None
            view = x.reshape(-1, self.units, self.width)
            keep, zeroed, seen = restrict(self.selector.keep(self.layer, view), rows, len(view))
            if first:
                self.owner.count(self.kind, zeroed=zeroed, seen=seen)
            masked = (view * keep.unsqueeze(-1).to(x.dtype)).reshape(x.shape)
            if eager:
                self._last = (x, masked)
            return (masked, *args[1:])

        return hook
