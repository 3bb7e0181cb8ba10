"""Spreading a byte budget over the channel kinds and the layers.

A *budget* is the share of the weight bytes streamed per decode token that sparsity skips
(every linear layer's weights, the output projection included, the input embedding not). The
channel kinds (:data:`CHANNEL_KINDS`: the inputs of q/k/v, o, gate/up and down) can skip their
weights; an *allocation* says at which level each kind runs in each layer:

==============  ===========================================================================
method          levels
==============  ===========================================================================
auto            (default) the held-out winner the checkpoint holds a table for: ``greedy``,
                else ``attribution``, else ``uniform``
uniform         the same level at every kind and layer (needs no measurement)
greedy          TEAL's search: in each block, raise step by step the kind whose increase adds
                the least relative L2 error to the block's output per byte saved; every block
                skips the same share of its bytes
attribution     this project's: the same per-block steps, each priced by the paper's corrected
                score of the block-output change (``|g.e| + 0.5 ||g|| ||e||`` with ``g`` the
                loss gradient at the block output), taken across all blocks cheapest first
==============  ===========================================================================

The measured methods store a table in the checkpoint (levels at a grid of budgets), written by
:func:`~sparse_lightning.inference.allocation_search.search_allocations`. ``auto`` prefers them
because they keep more fidelity on held-out questions (docs/results.md: on SmolLM2 greedy
reaches top-1 0.90 with 1.28x the byte bound, attribution 1.25x, uniform 1.23x), and falls
back to uniform, which needs no search, when the checkpoint has no table.

Example:
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from sparse_lightning.architectures import resolve
    >>> arch = resolve(AutoModelForCausalLM.from_config(LlamaConfig(
    ...     vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2)))
    >>> round(float(allocate(0.2, "uniform", arch, None)["mlp"][0]), 3)
    0.248
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparse_lightning.architectures import ResolvedArchitecture
from sparse_lightning.attribution.statistics import Statistics
from sparse_lightning.units import UNIT_KINDS

#: Kinds whose units are the input channels of linear layers: the ones a budget spreads over.
CHANNEL_KINDS = tuple(name for name, kind in UNIT_KINDS.items() if not kind.per_head)
#: Allocation methods; ``uniform`` needs nothing, ``greedy`` and ``attribution`` a measured table.
ALLOCATIONS = ("auto", "uniform", "greedy", "attribution")
#: What ``auto`` picks, best first (held-out fidelity at equal bytes; uniform always works).
AUTO_ORDER = ("greedy", "attribution", "uniform")
#: The highest level any kind is given (a layer keeps at least 5% of each input).
MAX_LEVEL = 0.95


def channel_bytes(architecture: ResolvedArchitecture) -> dict[str, int]:
    """Multiply-adds (weights) per token of each channel kind's projections, in one layer."""
    return {kind: architecture.site_macs(UNIT_KINDS[kind].site) for kind in CHANNEL_KINDS}


def check_budget(budget: object) -> float:
    """A budget: a number in ``[0, 1)``, the share of decode bytes skipped."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a number in [0, 1), got {budget!r}.")
    if not 0.0 <= float(budget) < 1.0:
        raise ValueError(
            f"budget must be in [0, 1) (the share of the weight bytes streamed per decode token "
            f"that is skipped), got {budget}; 0.3 skips 30%."
        )
    return float(budget)


def allocate(
    budget: float, method: str, architecture: ResolvedArchitecture, statistics: Statistics | None
) -> dict[str, Tensor]:
    """Per-layer levels of every channel kind that skip ``budget`` of the decode bytes.

    Raises:
        ValueError: an unknown method, a budget the channel kinds cannot reach, or a measured
            method whose table the checkpoint does not hold.
    """
    budget = check_budget(budget)
    method = resolve_allocation(method, statistics)
    if method == "uniform":
        return _uniform(budget, architecture)
    table = None if statistics is None else statistics.allocations.get(method)
    if table is None:
        raise ValueError(
            f"allocation={method!r} reads a table measured after calibration, and this "
            "checkpoint has none: calibrate with AttributionCalibration(allocations="
            f"({method!r},)) or call module.search_allocations(batches); or use "
            "allocation='uniform'."
        )
    return _interpolate(table, budget, method)


def check_allocation(method: object) -> str:
    """``method`` if it is one of :data:`ALLOCATIONS`; else a clear error."""
    if method not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {method!r}.")
    return method  # type: ignore[return-value]


def resolve_allocation(method: str, statistics: Statistics | None) -> str:
    """The method ``method`` names: itself, or for ``"auto"`` the first of
    :data:`AUTO_ORDER` whose table ``statistics`` holds.

    Raises:
        ValueError: an unknown method.
    """
    if check_allocation(method) != "auto":
        return method
    tables = {} if statistics is None else statistics.allocations
    return next(m for m in AUTO_ORDER if m == "uniform" or m in tables)


def _uniform(budget: float, architecture: ResolvedArchitecture) -> dict[str, Tensor]:
    sizes = channel_bytes(architecture)
    skippable = sum(architecture.depth(kind) * size for kind, size in sizes.items())
    level = budget * architecture.linear_macs() / skippable
    if level > MAX_LEVEL:
        reachable = MAX_LEVEL * skippable / architecture.linear_macs()
        raise ValueError(
            f"budget {budget} needs {level:.0%} of every channel kind, above the {MAX_LEVEL:.0%} "
            f"cap: the layers hold {skippable / architecture.linear_macs():.0%} of the bytes "
            f"streamed per token. Ask for at most {reachable:.2f}."
        )
    return {kind: torch.full((architecture.depth(kind),), level) for kind in CHANNEL_KINDS}


def _interpolate(table: dict[str, Tensor], budget: float, method: str) -> dict[str, Tensor]:
    budgets, levels = table["budgets"].double(), table["levels"].double()
    if budget > float(budgets[-1]) + 1e-9:
        raise ValueError(
            f"budget {budget} is beyond the {method} allocation table of this checkpoint, "
            f"which reaches {float(budgets[-1]):.2f}: ask for at most that."
        )
    upper = int(torch.searchsorted(budgets, torch.tensor(budget, dtype=torch.float64)))
    upper = min(max(upper, 1), len(budgets) - 1)
    low, high = float(budgets[upper - 1]), float(budgets[upper])
    weight = 0.0 if high == low else (budget - low) / (high - low)
    row = levels[upper - 1] * (1 - weight) + levels[upper] * weight
    return {kind: row[:, index].float() for index, kind in enumerate(CHANNEL_KINDS)}
