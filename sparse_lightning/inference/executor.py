"""What executors and their owner promise each other (so neither imports the other).

An *executor* applies one layer's selection of one unit kind to the model (masking, or a path
that skips work); the :class:`~sparse_lightning.inference.sparsifier.Sparsifier` owns them and
says which tokens of a forward are sparse (:meth:`Owner.sparse_rows`): by default only decode
steps, as in the paper and TEAL, so a prompt's forward runs dense.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from sparse_lightning.architectures import ResolvedArchitecture
from sparse_lightning.selection import Selector


class Owner(Protocol):
    """The state an executor reads and the tally it adds to.

    Attributes:
        enabled: ``False`` runs the model dense.
        gather: executors that can skip work do so on single-token forwards; ``False`` makes
            them compute densely and mask (the reference path).
    """

    enabled: bool
    gather: bool

    def count(self, kind: str, zeroed: Tensor, seen: int | Tensor) -> None: ...

    def sparse_rows(self, x: Tensor) -> bool | Tensor:
        """Which tokens of the site input ``x`` are sparse: all (``True``), none (``False``),
        or a ``(tokens,)`` bool mask (teacher forcing: the answer's positions)."""
        ...


class Executor:
    """Applies one layer's selection of one unit kind to the model; subclasses install
    themselves in ``__init__`` and undo it in :meth:`remove`.

    Args:
        owner: supplies ``enabled``, ``gather``, the sparse tokens and the counts.
        architecture: the resolved model.
        kind: the unit kind.
        layer: decoder layer index.
        selector: the rule choosing the kept units.
    """

    def __init__(
        self,
        owner: Owner,
        architecture: ResolvedArchitecture,
        kind: str,
        layer: int,
        selector: Selector,
    ) -> None:
        self.owner, self.kind, self.layer, self.selector = owner, kind, layer, selector
        self.units = architecture.units(kind)

    def remove(self) -> None:
        raise NotImplementedError


def restrict(keep: Tensor, rows: bool | Tensor, tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    """A ``(tokens, units)`` keep-mask that keeps everything outside the sparse ``rows``, and
    how many unit-tokens it zeroes out of how many sparse ones (for the realized tally).

    Args:
        keep: ``(tokens, units)``, or ``(units,)`` for a fixed set.
        rows: :meth:`Owner.sparse_rows` of the forward (not ``False``).
        tokens: tokens in the forward.
    """
    keep = keep.expand(tokens, keep.shape[-1]) if keep.dim() == 1 else keep
    if rows is True:
        return keep, (~keep).sum(), keep.new_tensor(keep.numel(), dtype=keep.sum().dtype)
    assert isinstance(rows, Tensor)
    keep = keep | ~rows.unsqueeze(-1)
    return keep, (~keep).sum(), rows.sum() * keep.shape[-1]
