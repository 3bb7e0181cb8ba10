"""Compiled CPU kernels (built on first use) with a pure-PyTorch fallback."""

from sparse_lightning.kernels.ops import compiled, load, load_topk, reference, reference_topk

__all__ = ["compiled", "load", "load_topk", "reference", "reference_topk"]
