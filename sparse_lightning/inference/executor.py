"""What executors and their owner promise each other (so neither imports the other).

An *executor* applies one layer's selection of one unit kind to the model (masking, or a path
that skips work); the :class:`~sparse_lightning.inference.sparsifier.Sparsifier` owns them.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


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


class Executor(Protocol):
    """Applies one layer's selection for one unit kind; removable."""

    def remove(self) -> None: ...
