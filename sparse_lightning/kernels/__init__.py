"""Compiled CPU kernels (built on first use) with a pure-PyTorch fallback."""

from sparse_lightning.kernels.ops import compiled, load, reference

__all__ = ["compiled", "load", "reference"]
