"""Architecture resolution: where the units of a Hugging Face decoder model are."""

from sparse_lightning.architectures.overrides import ARCHITECTURES, ArchitectureSpec
from sparse_lightning.architectures.resolver import (
    Fingerprint,
    ResolvedArchitecture,
    UnsupportedArchitectureError,
    resolve,
)

__all__ = [
    "ARCHITECTURES",
    "ArchitectureSpec",
    "Fingerprint",
    "ResolvedArchitecture",
    "UnsupportedArchitectureError",
    "resolve",
]
