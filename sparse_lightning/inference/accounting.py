"""What sparsity saves: multiply-adds of the linear layers per token, and the realized report.

At batch-1 decode every multiply-add of a linear layer is one weight read, so the same counts
are the bytes streamed per token (times the element size).

Example:
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from sparse_lightning.architectures import resolve
    >>> model = AutoModelForCausalLM.from_config(LlamaConfig(
    ...     vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2))
    >>> macs = linear_macs_per_token(model, resolve(model))
    >>> macs["total"], macs["mlp"], macs["heads"]
    (16064, 96, 512)
"""

from __future__ import annotations

from torch import nn

from sparse_lightning.architectures import ResolvedArchitecture
from sparse_lightning.architectures.weights import in_features, out_features
from sparse_lightning.units import SITES, UNIT_KINDS


def linear_macs_per_token(model: nn.Module, architecture: ResolvedArchitecture) -> dict[str, int]:
    """Multiply-adds per token of every linear layer (``"total"``, lm_head included), and
    what one unit of each kind accounts for (``UnitKind.macs``), keyed by kind."""
    per_layer = 0
    for layer in range(architecture.num_layers):
        for site in SITES:
            for module in architecture.site_modules(site, layer):
                per_layer += in_features(module) * out_features(module)
    head = model.get_output_embeddings()
    lm_head = head.weight.numel() if head is not None else 0
    out = {"total": per_layer + lm_head}
    out.update({name: kind.macs(architecture) for name, kind in UNIT_KINDS.items()})
    return out


def sparsity_report(
    realized: dict[str, float], model: nn.Module, architecture: ResolvedArchitecture
) -> dict[str, float]:
    """Per-kind zero ratios, the paper's sparsity figure, and the share of linear-layer MACs
    that the zeroed units account for.

    Args:
        realized: unit kind -> fraction of unit-tokens zeroed (kinds left out: 0).
        model: the model (its lm_head counts in the total).
        architecture: its resolution.
    """
    macs = linear_macs_per_token(model, architecture)
    report: dict[str, float] = {}
    paper = skipped = 0.0
    for name, kind in UNIT_KINDS.items():
        ratio = realized.get(name, 0.0)
        report[kind.ratio_key] = ratio
        paper += kind.paper_weight * ratio
        skipped += ratio * architecture.units(name) * macs[name]
    report["paper_sparsity"] = paper
    report["linear_macs_skippable"] = architecture.num_layers * skipped / macs["total"]
    return report
