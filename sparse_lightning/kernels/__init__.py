"""Compiled CPU kernels (built on first use) with a pure-PyTorch fallback."""

from sparse_lightning.kernels.layout import in_kernel_layout, row_stride, transposed_rows
from sparse_lightning.kernels.ops import (
    compiled,
    inductor_options,
    load,
    load_logits,
    load_rotated,
    load_topk,
    reference,
    reference_logits,
    reference_rotated_logits,
    reference_topk,
)

__all__ = [
    "compiled",
    "in_kernel_layout",
    "inductor_options",
    "load",
    "load_logits",
    "load_rotated",
    "load_topk",
    "reference",
    "reference_logits",
    "reference_rotated_logits",
    "reference_topk",
    "row_stride",
    "transposed_rows",
]
