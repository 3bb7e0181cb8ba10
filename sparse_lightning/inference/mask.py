"""The reference executor: zero the dropped units at the input of the projection that reads them.

Masking multiplies by zero and saves no work; it is what every faster executor must equal, and
what multi-token forwards (prefill, teacher forcing) run.
"""

from __future__ import annotations

from torch import Tensor, nn

from sparse_lightning.architectures import ResolvedArchitecture
from sparse_lightning.inference.executor import Owner
from sparse_lightning.selection import Selector


class MaskExecutor:
    """A forward pre-hook that masks one layer's units of one kind; a removable handle.

    Args:
        sparsifier: the owner; supplies ``enabled`` and the counts.
        architecture: the resolved model.
        kind: the unit kind.
        layer: decoder layer index.
        selector: the rule choosing the kept units.
    """

    def __init__(
        self,
        sparsifier: Owner,
        architecture: ResolvedArchitecture,
        kind: str,
        layer: int,
        selector: Selector,
    ) -> None:
        self.sparsifier, self.kind, self.layer, self.selector = sparsifier, kind, layer, selector
        self.units = architecture.units(kind)
        self.width = architecture.unit_width(kind)
        module = architecture.out_modules(kind)[layer]
        self._handle = module.register_forward_pre_hook(self._hook)

    def remove(self) -> None:
        self._handle.remove()

    def _hook(self, module: nn.Module, args: tuple) -> tuple | None:
        if not self.sparsifier.enabled:
            return None
        x: Tensor = args[0]
        view = x.reshape(-1, self.units, self.width)
        keep = self.selector.keep(self.layer, view)
        tokens = view.shape[0]
        kept = keep.sum() * (tokens if keep.dim() == 1 else 1)
        seen = tokens * self.units
        self.sparsifier.count(self.kind, zeroed=seen - kept, seen=seen)
        masked = view * keep.unsqueeze(-1).to(x.dtype)
        return (masked.reshape(x.shape), *args[1:])
