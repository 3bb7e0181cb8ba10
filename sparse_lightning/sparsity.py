"""What sparsity to apply and what it saves: the config, selector construction, accounting."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sparse_lightning.architectures import ResolvedArchitecture
from sparse_lightning.attribution.functional import METRICS
from sparse_lightning.attribution.statistics import Statistics
from sparse_lightning.selectors import (
    MODES,
    DynamicSelector,
    GateSelector,
    MagnitudeSelector,
    OracleSelector,
    Selector,
    StaticSelector,
)


@dataclass(frozen=True)
class SparsityConfig:
    """Fractions of units zeroed and how they are chosen.

    Attributes:
        mlp: fraction of MLP neurons zeroed per layer, in [0, 1).
        heads: fraction of attention heads zeroed per layer, in [0, 1).
        mode: ``"dynamic"`` (default), ``"magnitude"``, ``"static"``, ``"oracle"`` or
            ``"gate"`` (see :mod:`~sparse_lightning.selectors`).
        metric: calibrated metric ranking units for ``static`` and ``oracle``.
    """

    mlp: float = 0.0
    heads: float = 0.0
    mode: str = "dynamic"
    metric: str = "corrected_gxo"

    def __post_init__(self) -> None:
        for name in ("mlp", "heads"):
            value = getattr(self, name)
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(
                    f"{name} sparsity must be in [0, 1) (the fraction of units zeroed), got "
                    f"{value}; 0.5 zeroes half."
                )
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}.")

    @property
    def is_dense(self) -> bool:
        return self.mlp == 0.0 and self.heads == 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def build_selectors(
    config: SparsityConfig, architecture: ResolvedArchitecture, statistics: Statistics | None
) -> dict[str, Selector]:
    """One selector per unit kind with non-zero sparsity."""
    selectors: dict[str, Selector] = {}
    for kind in ("mlp", "heads"):
        sparsity = getattr(config, kind)
        if sparsity == 0.0:
            continue
        units = architecture.units(kind)
        if config.mode == "gate" and kind == "mlp":
            selectors[kind] = GateSelector(sparsity, units)
        elif config.mode in ("magnitude", "gate"):
            selectors[kind] = MagnitudeSelector(sparsity, units)
        elif config.mode == "oracle":
            selectors[kind] = OracleSelector(sparsity, units, config.metric)
        else:
            if statistics is None:
                raise ValueError(
                    f"mode={config.mode!r} reads calibrated statistics; load a checkpoint with "
                    "SparseActivationModule.from_pretrained(model, path) or use mode='magnitude'."
                )
            stats = statistics[kind]
            if config.mode == "dynamic":
                selectors[kind] = DynamicSelector.from_statistics(stats, sparsity)
            else:
                fp = architecture.fingerprint
                gqa = kind == "heads" and fp.num_kv_heads < fp.num_heads
                groups = fp.num_kv_heads if gqa else 1
                selectors[kind] = StaticSelector.from_statistics(
                    stats, sparsity, config.metric, groups
                )
    return selectors


def linear_flops_per_token(architecture: ResolvedArchitecture, hidden: int, vocab: int) -> dict:
    """Multiply-adds per token of every linear layer, and what one unit of each kind costs.

    A neuron costs one row of each projection that produces it and one column of the output
    projection; a head costs its rows of the query projection and its columns of the output
    projection (keys and values are shared by the KV group and needed by later tokens).
    """
    fp = architecture.fingerprint
    n_mlp_in = len(architecture.spec.mlp_in)
    per_neuron = (n_mlp_in + 1) * hidden
    per_head = 2 * hidden * fp.head_dim
    attention = (2 * fp.num_heads + 2 * fp.num_kv_heads) * fp.head_dim * hidden
    total = fp.num_layers * (fp.mlp_units * per_neuron + attention) + hidden * vocab
    return {"total": total, "mlp": per_neuron, "heads": per_head}


def sparsity_report(
    realized: dict[str, float], architecture: ResolvedArchitecture, hidden: int, vocab: int
) -> dict[str, float]:
    """The paper's sparsity figure and the share of linear-layer FLOPs that could be skipped."""
    mlp, heads = realized.get("mlp", 0.0), realized.get("heads", 0.0)
    flops = linear_flops_per_token(architecture, hidden, vocab)
    fp = architecture.fingerprint
    skipped = fp.num_layers * (
        mlp * fp.mlp_units * flops["mlp"] + heads * fp.num_heads * flops["heads"]
    )
    return {
        "mlp_zero_ratio": mlp,
        "head_zero_ratio": heads,
        "paper_sparsity": heads / 3 + 2 * mlp / 3,
        "linear_flops_skippable": skipped / flops["total"],
    }
