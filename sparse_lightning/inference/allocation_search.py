"""Measuring allocations: which channel kinds, in which layers, can give up bytes cheaply.

Both measured methods of :mod:`~sparse_lightning.selection.allocation` walk, block by block,
TEAL's path: from dense, raise one channel kind's level by ``step`` at a time, always the kind
whose raise adds the least relative L2 change to the block's output (``sum ||e||^2 / sum
||y||^2`` over answer tokens) per byte saved. They differ in how the budget is spread over the
blocks:

* ``greedy`` (TEAL): every block skips the same share of its bytes;
* ``attribution`` (ours): each point of each path is priced by the paper's corrected score of
  the block-output change, ``sum |g.e| + 0.5 ||g|| ||e||`` with ``g`` the loss gradient at the
  block's output (the first-order loss change plus half of its error bound, as the corrected
  GxO scores a unit), and steps are taken across the whole model, cheapest per byte first, so
  blocks the loss is sensitive to keep more.

Each block runs alone on its dense inputs (recorded from one dense forward per batch), with its
sites' channels below the level's calibrated threshold zeroed on the answer tokens only (the
prompt stays dense, as at decode). The result is a table of levels at a grid of budgets.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparse_lightning.architectures import ResolvedArchitecture
from sparse_lightning.attribution.capture import gradients_enabled
from sparse_lightning.attribution.statistics import Statistics
from sparse_lightning.data.teacher_forcing import IGNORE, TeacherForcedBatch
from sparse_lightning.selection.allocation import CHANNEL_KINDS, channel_bytes
from sparse_lightning.units import UNIT_KINDS

METHODS = ("greedy", "attribution")


@dataclass
class _Block:
    """One block's recorded dense run on one batch."""

    args: tuple
    kwargs: dict
    output: Tensor  # (tokens, hidden) at answer rows
    gradient: Tensor  # dL/d output at the same rows
    rows: Tensor  # (B * S,) bool, the answer tokens


def search_allocations(
    model: nn.Module,
    architecture: ResolvedArchitecture,
    statistics: Statistics,
    batches: Sequence[TeacherForcedBatch],
    loss: Callable[[TeacherForcedBatch], Tensor],
    methods: Sequence[str] = METHODS,
    step: float = 0.1,
    cap: float = 0.9,
    grid: float = 0.01,
) -> dict[str, dict[str, Tensor]]:
    """Allocation tables for ``methods`` (see the module docstring).

    Args:
        model: the dense model (no sparsity installed).
        architecture: its resolution.
        statistics: calibration statistics with every channel kind (their thresholds).
        batches: teacher-forced calibration batches (a few are enough).
        loss: the summed answer loss of a batch (the module's ``answer_loss``).
        methods: ``"greedy"`` and/or ``"attribution"``.
        step: level increment of one step of a block's path.
        cap: highest level of any kind.
        grid: spacing of the budgets in the table.

    Returns:
        method -> ``{"budgets": (G,), "levels": (G, layers, kinds)}`` (kinds in
        ``CHANNEL_KINDS`` order).
    """
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"methods must be among {METHODS}, got {sorted(unknown)}.")
    partial = [k for k in CHANNEL_KINDS if architecture.depth(k) != architecture.num_layers]
    if partial:
        raise ValueError(
            f"Measured allocations walk every decoder block through every channel kind, and "
            f"{architecture.model_type} is hybrid: {partial[0]} is in "
            f"{architecture.depth(partial[0])} of its {architecture.num_layers} layers. Use "
            "allocation='uniform' (or levels per kind)."
        )
    missing = statistics.kinds_missing(CHANNEL_KINDS)
    if missing:
        raise ValueError(
            f"These statistics have no {missing}: calibrate every channel kind (the default "
            "units) before searching allocations."
        )
    records = _record(model, architecture, batches, loss)
    sizes = channel_bytes(architecture)
    block_bytes = sum(sizes.values())
    total = architecture.linear_macs()
    paths = [
        _path(architecture, statistics, layer, records[layer], step, cap, sizes)
        for layer in range(architecture.num_layers)
    ]
    spread = {
        "greedy": lambda: _same_share(paths, block_bytes, total, grid),
        "attribution": lambda: _cheapest_first(paths, total, grid),
    }
    return {method: spread[method]() for method in methods}


# ------------------------------------------------------------------------------ recording
def _record(
    model: nn.Module,
    architecture: ResolvedArchitecture,
    batches: Sequence[TeacherForcedBatch],
    loss: Callable[[TeacherForcedBatch], Tensor],
) -> list[list[_Block]]:
    """Every block's inputs, dense output and output gradient, per batch (one forward and
    one backward each)."""
    records: list[list[_Block]] = [[] for _ in architecture.layers]
    inputs: list[tuple[tuple, dict]] = []
    outputs: list[Tensor] = []

    def keep_input(module, args, kwargs):
        inputs.append((_detached(args), _detached(kwargs)))

    def keep_output(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    def start_graph(module, args, output):
        return output.detach().requires_grad_()

    for batch in batches:
        batch = batch.autograd_ready()
        rows = (batch.labels != IGNORE).reshape(-1)
        inputs.clear()
        outputs.clear()
        handles = [
            handle
            for layer in architecture.layers
            for handle in (
                layer.register_forward_pre_hook(keep_input, with_kwargs=True),
                layer.register_forward_hook(keep_output),
            )
        ]
        handles.append(model.get_input_embeddings().register_forward_hook(start_graph))
        try:
            with gradients_enabled():
                grads = torch.autograd.grad(loss(batch), outputs)
        finally:
            for handle in handles:
                handle.remove()
        for layer, ((args, kwargs), out, grad) in enumerate(
            zip(inputs, outputs, grads, strict=True)
        ):
            records[layer].append(
                _Block(
                    args,
                    kwargs,
                    out.detach().reshape(-1, out.shape[-1])[rows],
                    grad.reshape(-1, grad.shape[-1])[rows],
                    rows,
                )
            )
    return records


def _detached(value):
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------- block paths
def _cost(
    architecture: ResolvedArchitecture,
    statistics: Statistics,
    layer: int,
    runs: list[_Block],
    levels: dict[str, float],
) -> tuple[float, float]:
    """Block ``layer`` at ``levels``: the relative L2 error of its output and the corrected
    score of that change (see the module docstring), over the answer tokens of ``runs``."""
    module = architecture.layers[layer]
    thresholds = {
        kind: statistics[kind].magnitude_threshold(layer, level)
        for kind, level in levels.items()
        if level > 0
    }
    squared = norm = score = 0.0
    for run in runs:
        handles = []
        for kind, threshold in thresholds.items():
            for projection in architecture.site_modules(UNIT_KINDS[kind].site, layer):
                handles.append(projection.register_forward_pre_hook(_masker(threshold, run.rows)))
        try:
            with torch.no_grad():
                output = module(*run.args, **run.kwargs)
        finally:
            for handle in handles:
                handle.remove()
        hidden = output[0] if isinstance(output, tuple) else output
        error = hidden.reshape(-1, hidden.shape[-1])[run.rows] - run.output
        squared += float(error.square().sum())
        norm += float(run.output.square().sum())
        first_order = (run.gradient * error).sum(-1).abs()
        bound = run.gradient.norm(dim=-1) * error.norm(dim=-1)
        score += float((first_order + 0.5 * bound).sum())
    return (squared / norm if norm > 0 else squared), score


def _masker(threshold: float, rows: Tensor):
    def mask(module, args):
        x = args[0]
        flat = x.reshape(-1, x.shape[-1])
        keep = (flat.abs() >= threshold) | ~rows.unsqueeze(-1)
        return ((flat * keep.to(x.dtype)).reshape(x.shape), *args[1:])

    return mask


def _path(
    architecture: ResolvedArchitecture,
    statistics: Statistics,
    layer: int,
    runs: list[_Block],
    step: float,
    cap: float,
    sizes: dict[str, int],
) -> list[tuple[dict[str, float], float, float]]:
    """Block ``layer``'s path, TEAL's way: from all dense, raise by ``step`` the kind whose
    raise adds the least relative L2 output error per byte saved, until every kind is at
    ``cap``. Each point: ``(levels, bytes skipped, corrected score)``."""
    levels = dict.fromkeys(CHANNEL_KINDS, 0.0)
    error, score = _cost(architecture, statistics, layer, runs, levels)
    path = [(dict(levels), 0.0, score)]
    while True:
        options = []
        for kind in CHANNEL_KINDS:
            if levels[kind] + step > cap + 1e-9:
                continue
            trial = {**levels, kind: round(levels[kind] + step, 6)}
            trial_error, trial_score = _cost(architecture, statistics, layer, runs, trial)
            price = (trial_error - error) / (step * sizes[kind])
            options.append((price, kind, trial_error, trial_score))
        if not options:
            return path
        _, kind, error, score = min(options)
        levels[kind] = round(levels[kind] + step, 6)
        skipped = sum(levels[k] * sizes[k] for k in CHANNEL_KINDS)
        path.append((dict(levels), skipped, score))


# ------------------------------------------------------------------------ across blocks
def _table(rows: list[tuple[float, list[dict[str, float]]]]) -> dict[str, Tensor]:
    budgets = torch.tensor([b for b, _ in rows], dtype=torch.float64)
    levels = torch.tensor(
        [[[layer[k] for k in CHANNEL_KINDS] for layer in state] for _, state in rows],
        dtype=torch.float32,
    )
    return {"budgets": budgets, "levels": levels}


def _same_share(paths, block_bytes: int, total: int, grid: float) -> dict[str, Tensor]:
    """TEAL: every block skips the same share of its bytes, split as its path says."""
    layers = len(paths)
    most = min(path[-1][1] for path in paths) / block_bytes
    rows = []
    budget = 0.0
    while budget * total / (layers * block_bytes) <= most + 1e-12:
        share = budget * total / layers
        rows.append((budget, [_at(path, share) for path in paths]))
        budget = round(budget + grid, 6)
    return _table(rows)


def _at(path, skipped: float) -> dict[str, float]:
    """Levels on ``path`` where it skips ``skipped`` bytes (linear between its points)."""
    for (low, low_bytes, _), (high, high_bytes, _) in itertools.pairwise(path):
        if low_bytes <= skipped <= high_bytes:
            t = 0.0 if high_bytes == low_bytes else (skipped - low_bytes) / (high_bytes - low_bytes)
            return {k: low[k] + t * (high[k] - low[k]) for k in CHANNEL_KINDS}
    return dict(path[-1][0])


def _cheapest_first(paths, total: int, grid: float) -> dict[str, Tensor]:
    """Ours: take the cheapest next step of any block until the budget is met."""
    position = [0] * len(paths)
    skipped = 0.0
    heap = [
        ((path[1][2] - path[0][2]) / max(path[1][1], 1e-9), layer)
        for layer, path in enumerate(paths)
        if len(path) > 1
    ]
    heapq.heapify(heap)
    rows = [(0.0, [dict(path[0][0]) for path in paths])]
    budget = grid
    while heap:
        _, layer = heapq.heappop(heap)
        path, i = paths[layer], position[layer]
        skipped += path[i + 1][1] - path[i][1]
        position[layer] = i + 1
        if i + 2 < len(path):
            gain = path[i + 2][1] - path[i + 1][1]
            heapq.heappush(heap, ((path[i + 2][2] - path[i + 1][2]) / max(gain, 1e-9), layer))
        while skipped / total >= budget - 1e-12:
            rows.append((budget, [dict(p[position[n]][0]) for n, p in enumerate(paths)]))
            budget = round(budget + grid, 6)
    return _table(rows)
