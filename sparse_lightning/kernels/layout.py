"""The layout the input-sparse kernels read: the weight transposed, its rows apart by a stride
that keeps sixteen rows out of each other's cache sets.

The kernels stream sixteen kept rows of the transposed weight at once, one cache line of each
in turn. Rows whose length is a multiple of 1 KB start at only a few offsets within a 4 KB
page, so the sixteen lines read together fall into a few sets of the L1 cache (all into one
when the rows are 4 KB multiples, as SmolLM2's fused gate|up rows of 12 KB are) and evict each
other. Such rows get 256 bytes of padding after them, which puts sixteen consecutive rows at
sixteen different offsets. Measured on Zen 4 (2026-12-06, ``docs/performance.md``): SmolLM2's
gate|up calls 1.08-1.12x faster, its tuned decode at the 0.90 point 1.03-1.05x; other row
lengths gained nothing from padding, so they stay packed.

Example:
    >>> import torch
    >>> w_t = transposed_rows([torch.ones(3, 128), torch.ones(3, 128)])  # 1 KB rows
    >>> w_t.shape, w_t.stride()
    (torch.Size([3, 256]), (320, 1))
    >>> transposed_rows([torch.ones(3, 100)]).stride()  # 400-byte rows: packed
    (100, 1)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: Rows whose length in bytes is a multiple of this share too few offsets within a page.
ALIASED_BYTES = 1024
#: What such a row is padded by: sixteen consecutive rows then start at sixteen 256-byte
#: offsets of a 4 KB page.
PAD_BYTES = 256


def row_stride(columns: int, element_size: int) -> int:
    """Elements from one row of a kernel weight with ``columns`` columns to the next."""
    if (columns * element_size) % ALIASED_BYTES == 0:
        return columns + PAD_BYTES // element_size
    return columns


def in_kernel_layout(weight_t: Tensor) -> bool:
    """Whether a 2-d ``(in_features, out_features)`` tensor already has the kernels' layout:
    unit column stride, rows :func:`row_stride` apart."""
    columns = weight_t.shape[1]
    return weight_t.stride() == (row_stride(columns, weight_t.element_size()), 1)


def transposed_rows(parts: Sequence[Tensor]) -> Tensor:
    """``parts`` (each ``(in_features, out_i)``, one dtype) side by side in one new storage
    whose rows are :func:`row_stride` apart: the ``(in_features, sum of out_i)`` view of it.

    The padding is zero and never read by the kernels; views of the result's columns (the
    projections' weights) work in every ATen op, as any strided tensor does.
    """
    columns = sum(part.shape[1] for part in parts)
    first = parts[0]
    storage = torch.zeros(
        first.shape[0],
        row_stride(columns, first.element_size()),
        dtype=first.dtype,
        device=first.device,
    )
    rows = storage[:, :columns]
    start = 0
    for part in parts:
        rows[:, start : start + part.shape[1]] = part
        start += part.shape[1]
    return rows
