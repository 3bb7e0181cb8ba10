"""The one table of unit kinds: what a unit is, where it is read, what dropping it saves.

A *unit* is a slice of the input of one group of linear layers (a *site*), one value or one
``head_dim`` block per token. Everything that needs to know the kinds (architecture resolution,
capture, statistics, checkpoints, selection, accounting, the CLI and evaluation) reads
:data:`UNIT_KINDS`; adding a kind is one row here (see ``docs/architecture.md``).

Sites, per decoder layer (paths come from :mod:`sparse_lightning.architectures`):

==========  =======================================================================
site        the input of
==========  =======================================================================
attn_in     the query/key/value projections (the normalised hidden state)
attn_out    the attention output projection (the heads' outputs, side by side)
mlp_in      the MLP input projections (gate and up, or fc1)
mlp_out     the MLP output projection (the neurons)
==========  =======================================================================

Example:
    >>> UNIT_KINDS["heads"].site, UNIT_KINDS["heads"].per_head
    ('attn_out', True)
    >>> kind_names()
    ('mlp', 'heads', 'attn_input', 'mlp_input', 'head_features')
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from torch import nn

SITES = ("attn_in", "attn_out", "mlp_in", "mlp_out")


class Shape(Protocol):
    """What the table's formulas read of a resolved model
    (:class:`~sparse_lightning.architectures.ResolvedArchitecture` has it)."""

    hidden_size: int
    head_dim: int

    def site_modules(self, site: str, layer: int) -> tuple[nn.Module, ...]: ...

    def site_outputs(self, site: str) -> int:
        """Output features of the projections reading ``site`` (summed): the weights one
        input channel of the site meets, so the multiply-adds it accounts for."""
        ...


@dataclass(frozen=True)
class UnitKind:
    """One kind of unit.

    Attributes:
        name: the key used everywhere (statistics, checkpoints, ``set_sparsity(name=...)``).
        site: the site whose input holds the units (see the module docstring).
        per_head: one unit is a ``head_dim`` block (an attention head), else one feature.
        removable: compaction can delete these units from a stock model (rows of the
            projections that produce them and columns of the one that reads them).
        paper_weight: weight in the paper's sparsity figure (1/3 heads + 2/3 MLP).
        macs: multiply-adds per token that one unit of this kind accounts for: the columns of
            the projection reading it plus the rows of the projections producing it (what
            compaction removes). Bytes of weight per unit = ``macs`` x element size.
        label: how tables and logs name the kind.
        ratio_key: the key of its realized zero ratio in reports and logs.
        uniform: a bare sparsity level (``set_sparsity(0.5)``) applies to it: the paper's units.
            The input-channel kinds are asked for by name or through a byte budget.
    """

    name: str
    site: str
    per_head: bool
    removable: bool
    paper_weight: float
    macs: Callable[[Shape], int]
    label: str
    ratio_key: str
    uniform: bool = False


#: name -> kind, in the order tables list them.
UNIT_KINDS: dict[str, UnitKind] = {
    kind.name: kind
    for kind in (
        UnitKind(
            name="mlp",
            site="mlp_out",
            per_head=False,
            removable=True,
            paper_weight=2 / 3,
            # its row of every MLP input projection and its column of the output projection
            macs=lambda arch: (len(arch.site_modules("mlp_in", 0)) + 1) * arch.hidden_size,
            label="MLP neurons",
            ratio_key="mlp_zero_ratio",
            uniform=True,
        ),
        UnitKind(
            name="heads",
            site="attn_out",
            per_head=True,
            removable=True,
            paper_weight=1 / 3,
            # its rows of the query projection and its columns of the output projection (keys
            # and values are shared by the KV group and needed by later tokens)
            macs=lambda arch: 2 * arch.hidden_size * arch.head_dim,
            label="attention heads",
            ratio_key="head_zero_ratio",
            uniform=True,
        ),
        # The input channels of the other linear layers (TEAL's view): an input-sparse kernel
        # skips a channel's weights before the layer runs, wherever the layer sits.
        UnitKind(
            name="attn_input",
            site="attn_in",
            per_head=False,
            removable=False,
            paper_weight=0.0,
            macs=lambda arch: arch.site_outputs("attn_in"),
            label="attention input channels",
            ratio_key="attn_input_zero_ratio",
        ),
        UnitKind(
            name="mlp_input",
            site="mlp_in",
            per_head=False,
            removable=False,
            paper_weight=0.0,
            macs=lambda arch: arch.site_outputs("mlp_in"),
            label="MLP input channels",
            ratio_key="mlp_input_zero_ratio",
        ),
        UnitKind(
            name="head_features",
            site="attn_out",
            per_head=False,
            removable=False,
            paper_weight=0.0,
            macs=lambda arch: arch.site_outputs("attn_out"),
            label="head features (attention output projection input channels)",
            ratio_key="head_features_zero_ratio",
        ),
    )
}


def kind_names() -> tuple[str, ...]:
    """Every unit kind's name, in table order."""
    return tuple(UNIT_KINDS)


def uniform_kinds() -> tuple[str, ...]:
    """The kinds a bare sparsity level applies to (see ``UnitKind.uniform``)."""
    return tuple(name for name, kind in UNIT_KINDS.items() if kind.uniform)


def shared_sites(kinds: Iterable[str]) -> dict[str, list[str]]:
    """Sites that more than one of ``kinds`` reads (they cannot both select there)."""
    by_site: dict[str, list[str]] = {}
    for kind in kinds:
        by_site.setdefault(UNIT_KINDS[kind].site, []).append(kind)
    return {site: names for site, names in by_site.items() if len(names) > 1}


def unit_kind(name: str) -> UnitKind:
    """The kind named ``name``; a clear error for an unknown name (see :func:`check_kinds`)."""
    return UNIT_KINDS[check_kinds([name])[0]]


def check_kinds(kinds: Iterable[str], what: str = "units") -> tuple[str, ...]:
    """``kinds`` in table order; a clear error for an unknown or empty selection.

    Raises:
        ValueError: a name that is not in :data:`UNIT_KINDS`, or no name at all.
    """
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in UNIT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"{what} must be a non-empty subset of {kind_names()}, got {list(kinds)}.")
    return tuple(k for k in UNIT_KINDS if k in kinds)
