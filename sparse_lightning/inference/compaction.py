"""Physically remove statically pruned MLP neurons and heads: a smaller stock model.

The compacted model is built from a rewritten config (smaller MLP width, fewer heads, explicit
``head_dim``) and a sliced state dict, so ``save_pretrained`` writes a checkpoint that plain
``AutoModelForCausalLM.from_pretrained`` loads without sparse_lightning.

Example:
    >>> module = SparseActivationModule.from_pretrained(  # doctest: +SKIP
    ...     model, "checkpoints/run.safetensors", 0.5, mode="static")
    >>> small = compact(module.model, module.sparsifier.static_masks())  # doctest: +SKIP
    >>> small.save_pretrained("smollm2-50pct")  # doctest: +SKIP
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from sparse_lightning.architectures import ResolvedArchitecture, resolve
from sparse_lightning.architectures.weights import slice_inputs, slice_outputs
from sparse_lightning.units import UNIT_KINDS, unit_kind


def compact(model: PreTrainedModel, masks: dict[str, Tensor]) -> PreTrainedModel:
    """A new model without the units that ``masks`` drop.

    Args:
        model: the dense model (left unchanged).
        masks: unit kind -> ``(layers, units)`` bool keep-masks with the same count in every
            layer (heads: the same count in every KV group). Kinds left out stay whole.

    Raises:
        ValueError: uneven counts across layers or KV groups, or head removal on an
            architecture whose attention cannot lose heads (GPT-2, GPT-NeoX, OPT).
    """
    arch = resolve(model)
    config = copy.deepcopy(model.config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for kind, kind_masks in masks.items():
        unit = unit_kind(kind)
        if not unit.removable:
            raise ValueError(
                f"Compaction removes whole units; {unit.label} ({kind}) cannot be removed "
                "from a stock model. Compact only removable kinds."
            )
        _REMOVERS[unit.site](model, arch, kind_masks, state, config)
    small = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    try:
        small.load_state_dict(state, strict=True)
    except RuntimeError as mismatch:
        # The family's modelling code sizes some weight from something else than the counts
        # compaction rewrote (o_proj from hidden_size, a norm over all heads' features, ...).
        first = next((line.strip() for line in str(mismatch).splitlines()[1:]), str(mismatch))
        raise ValueError(
            f"{arch.model_type}'s modelling code does not build a model with fewer "
            f"{' and '.join(UNIT_KINDS[k].label for k in masks)}: {first} Compact "
            f"{'MLP neurons only (heads=0)' if 'heads' in masks else 'nothing'} for this family."
        ) from None
    small.generation_config = copy.deepcopy(model.generation_config)
    return small.eval()


def _remove_neurons(
    model: nn.Module,
    arch: ResolvedArchitecture,
    masks: Tensor,
    state: dict[str, Tensor],
    config: PretrainedConfig,
) -> None:
    if arch.spec.mlp_size is None:
        raise ValueError(
            f"{arch.model_type}'s config names no MLP width that compaction could rewrite; "
            "compact heads only (set the mlp sparsity to 0)."
        )
    setattr(config, arch.spec.mlp_size, _even_count(masks, "MLP neurons"))
    width = masks.shape[-1]
    for row, mask in enumerate(masks):
        keep = mask.nonzero().flatten()
        if arch.spec.fused_gate_up:  # gate rows, then the same up rows
            rows = torch.cat([keep, keep + width])
        prefix = f"{arch.spec.layers}.{arch.layer_of('mlp_out', row)}."
        for path in arch.spec.mlp_in:
            _slice_out(model, prefix + path, rows if arch.spec.fused_gate_up else keep, state)
        _slice_in(model, prefix + arch.spec.mlp_out, keep, state)


def _remove_heads(
    model: nn.Module,
    arch: ResolvedArchitecture,
    masks: Tensor,
    state: dict[str, Tensor],
    config: PretrainedConfig,
) -> None:
    fp = arch.fingerprint
    if not arch.spec.heads_removable:
        raise ValueError(
            f"Heads cannot be removed from {fp.model_type} models (fused or hidden-size-derived "
            "attention shapes); compact MLP neurons only (set heads sparsity to 0)."
        )
    heads = _even_count(masks, "heads")
    groups = fp.num_kv_heads
    per_group = masks.unflatten(-1, (groups, fp.num_heads // groups)).sum(-1)
    mha = groups == fp.num_heads
    if not mha and (per_group != per_group[0, 0]).any():
        raise ValueError(
            "Every key/value group must keep the same number of query heads for a GQA model to "
            "stay valid; use static masks from SparseActivationModule (group-balanced)."
        )
    hd = fp.head_dim
    for row, mask in enumerate(masks):
        keep_heads = mask.nonzero().flatten()
        rows = (keep_heads[:, None] * hd + torch.arange(hd)).flatten()
        prefix = f"{arch.spec.layers}.{arch.layer_of('attn_out', row)}."
        q, k, v = arch.spec.attn_in
        _slice_out(model, prefix + q, rows, state)
        if mha:  # with one query head per key/value head, they go together
            _slice_out(model, prefix + k, rows, state)
            _slice_out(model, prefix + v, rows, state)
        _slice_in(model, prefix + arch.spec.attn_out, rows, state)
    config.num_attention_heads = heads
    config.num_key_value_heads = heads if mha else groups
    config.head_dim = hd


#: The site of a removable unit kind -> how its units are cut out of the weights and config.
_REMOVERS = {"mlp_out": _remove_neurons, "attn_out": _remove_heads}


def _even_count(masks: Tensor, what: str) -> int:
    counts = masks.sum(-1)
    if (counts != counts[0]).any():
        raise ValueError(
            f"Compaction needs the same number of kept {what} in every layer (a model config "
            f"has one width); got {counts.tolist()}. Use static masks (one ratio everywhere)."
        )
    return int(counts[0])


def _slice_out(model: nn.Module, path: str, keep: Tensor, state: dict[str, Tensor]) -> None:
    slice_outputs(state, path, model.get_submodule(path), keep)


def _slice_in(model: nn.Module, path: str, keep: Tensor, state: dict[str, Tensor]) -> None:
    slice_inputs(state, path, model.get_submodule(path), keep)
