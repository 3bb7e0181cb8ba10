"""What sparsity saves: multiply-adds of the linear layers per token, and the realized report.

At batch-1 decode every multiply-add of a linear layer is one weight read, so the same counts
are the bytes streamed per token (times the element size).

Example:
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from sparse_lightning.architectures import resolve
    >>> model = AutoModelForCausalLM.from_config(LlamaConfig(
    ...     vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2))
    >>> macs = linear_macs_per_token(resolve(model))
    >>> macs["total"], macs["mlp"], macs["heads"]
    (16416, 96, 512)
"""

from __future__ import annotations

from sparse_lightning.architectures import ResolvedArchitecture
from sparse_lightning.inference.output import KIND as OUTPUT_KIND
from sparse_lightning.inference.output import OutputReads
from sparse_lightning.units import UNIT_KINDS


def linear_macs_per_token(architecture: ResolvedArchitecture) -> dict[str, int]:
    """Multiply-adds per token of every linear layer (``"total"``, lm_head included), and
    what one unit of each kind accounts for (``UnitKind.macs``), keyed by kind."""
    out = {"total": architecture.linear_macs()}
    out.update({name: kind.macs(architecture) for name, kind in UNIT_KINDS.items()})
    return out


def decode_bytes_skipped(
    realized: dict[str, float],
    architecture: ResolvedArchitecture,
    lm_head: OutputReads | None = None,
    element_size: int = 4,
) -> float:
    """The share of the weight bytes streamed per decode token that input-sparse execution
    skips: a dropped channel's weights in every projection that reads it (heads and neurons:
    their columns of o and down, not the rows of the projections that made them), and what
    the sparse output projection saves (:meth:`OutputReads.skipped_macs`: its dropped input
    rows less what its approximation and exact candidates read; ``lm_head`` describes them,
    64 candidates in the input's own channels when it is ``None``)."""
    skipped = sum(
        ratio * architecture.site_macs_all_layers(UNIT_KINDS[kind].site)
        for kind, ratio in realized.items()
        if kind in UNIT_KINDS
    )
    if realized.get(OUTPUT_KIND):
        reads = lm_head or OutputReads(64)
        inputs = architecture.hidden_size
        outputs = architecture.output_macs // max(inputs, 1)
        skipped += reads.skipped_macs(realized[OUTPUT_KIND], inputs, outputs, element_size)
    return skipped / architecture.linear_macs()


def sparsity_report(
    realized: dict[str, float],
    architecture: ResolvedArchitecture,
    lm_head: OutputReads | None = None,
    element_size: int = 4,
) -> dict[str, float]:
    """Per-kind zero ratios, the paper's sparsity figure, the share of linear-layer MACs that
    the zeroed units account for, and the share of decode bytes skipped (with its bound).

    Args:
        realized: unit kind (or ``"lm_head"``, the output projection's input) -> fraction of
            unit-tokens zeroed (kinds left out: 0).
        architecture: the resolved model (its output projection counts in the total).
        lm_head, element_size: see :func:`decode_bytes_skipped`.
    """
    macs = linear_macs_per_token(architecture)
    report: dict[str, float] = {}
    paper = skipped = 0.0
    for name, kind in UNIT_KINDS.items():
        ratio = realized.get(name, 0.0)
        report[kind.ratio_key] = ratio
        paper += kind.paper_weight * ratio
        skipped += ratio * architecture.depth(name) * architecture.units(name) * macs[name]
    report["lm_head_zero_ratio"] = realized.get(OUTPUT_KIND, 0.0)
    report["paper_sparsity"] = paper
    report["linear_macs_skippable"] = skipped / macs["total"]
    report["decode_bytes_skipped"] = decode_bytes_skipped(
        realized, architecture, lm_head, element_size
    )
    report["decode_byte_bound"] = 1.0 / (1.0 - report["decode_bytes_skipped"])
    return report
