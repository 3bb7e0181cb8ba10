"""Where the units are, read from the model itself: its pipeline and tensor-parallel plans.

Hugging Face models declare, in their config, a pipeline plan (``base_model_pp_plan``: the
decoder's parts, among them ``"layers"``) and a tensor-parallel plan (``base_model_tp_plan``:
each projection of a decoder layer, ``colwise`` for the ones that read the layer's input and
``rowwise`` for the ones that write back into the residual stream). Those are exactly the
projections sparse_lightning needs: per layer, the attention and MLP output projections
(``rowwise``) and the projections that read each site (``colwise``), grouped by the module they
sit in. So any family with these plans resolves without a table row; the families without them
(gpt2, opt, falcon, stablelm, ...) have one in :mod:`~sparse_lightning.architectures.overrides`.

Example:
    >>> from transformers import AutoModelForCausalLM, Qwen3Config
    >>> model = AutoModelForCausalLM.from_config(Qwen3Config(
    ...     vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    >>> spec = spec_from_plans(model)
    >>> spec.layers, spec.attn_out, spec.mlp_in
    ('model.layers', 'self_attn.o_proj', ('mlp.gate_proj', 'mlp.up_proj'))
"""

from __future__ import annotations

from torch import nn

from sparse_lightning.architectures.overrides import ArchitectureSpec
from sparse_lightning.architectures.weights import in_features

#: Config attributes that may hold the MLP width (compaction rewrites the one that does).
MLP_SIZE_NAMES = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "inner_dim")
#: Config attributes that count experts: any above 1 means a mixture of experts.
EXPERT_NAMES = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
#: Attributes of an MLP module that hold the activation of a gated MLP.
ACTIVATION_NAMES = ("act_fn", "activation_fn", "act")


class PlanError(ValueError):
    """The model's plans do not say where its units are (the message says what is missing)."""


def text_config(model: nn.Module):
    """The decoder's config (``get_text_config()`` for multimodal configs)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def experts(model: nn.Module) -> int:
    """Experts per MoE layer (0 for a dense model), from the config or the plan."""
    config = text_config(model)
    counts = [int(getattr(config, name, 0) or 0) for name in EXPERT_NAMES]
    plan = getattr(config, "base_model_tp_plan", None) or {}
    if any("experts" in key for key in plan):
        counts.append(2)
    return max(counts, default=0)


def spec_from_plans(model: nn.Module) -> ArchitectureSpec:
    """The module paths of ``model``'s units, from its config's plans.

    Raises:
        PlanError: no layer list, no tensor-parallel plan, or no attention or MLP output
            projection in it; the message names what is missing.
    """
    config = text_config(model)
    layers_path = _layers_path(model, config)
    layer = model.get_submodule(layers_path)[0]
    plan = getattr(config, "base_model_tp_plan", None) or {}
    if not plan:
        raise PlanError(
            "its config has no tensor-parallel plan (base_model_tp_plan) to find the attention "
            "and MLP projections in"
        )
    groups: dict[str, dict[str, list[str]]] = {}
    for key, style in plan.items():
        if not key.startswith("layers.*."):
            continue
        path = key.removeprefix("layers.*.")
        parent = path.rpartition(".")[0]
        side = "out" if "rowwise" in style else "in" if "colwise" in style else None
        if side is not None and parent:
            groups.setdefault(parent, {"in": [], "out": []})[side].append(path)
    attention = _group(layer, groups, _is_attention, "attention")
    mlp = _group(layer, groups, lambda parent, module: not _is_attention(parent, module), "MLP")
    mlp_in = tuple(sorted(mlp["in"], key=lambda path: "gate" not in path.rpartition(".")[2]))
    gated = len(mlp_in) == 2 or "gate_up" in mlp_in[0]
    mlp_parent = mlp["out"][0].rpartition(".")[0]
    activation = next(
        (
            f"{mlp_parent}.{name}"
            for name in ACTIVATION_NAMES
            if gated and isinstance(getattr(layer.get_submodule(mlp_parent), name, None), nn.Module)
        ),
        None,
    )
    width = in_features(layer.get_submodule(mlp["out"][0]))
    size = next((n for n in MLP_SIZE_NAMES if getattr(config, n, None) == width), None)
    return ArchitectureSpec(
        layers=layers_path,
        attn_in=tuple(attention["in"]),
        attn_out=attention["out"][0],
        mlp_in=mlp_in,
        mlp_out=mlp["out"][0],
        mlp_size=size,
        heads_removable=len(attention["in"]) == 3 and hasattr(config, "num_key_value_heads"),
        mlp_gate_act=activation,
        fused_gate_up=len(mlp_in) == 1 and gated,
    )


def _layers_path(model: nn.Module, config) -> str:
    """The path of the decoder's ``ModuleList`` of layers: the pipeline plan's ``layers``, or
    the list of the class named in ``_no_split_modules``."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    prefix = next((name for name, module in model.named_modules() if module is decoder), "")
    pipeline = getattr(config, "base_model_pp_plan", None) or {}
    candidates = ["layers"] if "layers" in pipeline else []
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    candidates += [
        name
        for name, child in decoder.named_children()
        if isinstance(child, nn.ModuleList) and len(child) and type(child[0]).__name__ in blocks
    ]
    for name in candidates:
        if isinstance(getattr(decoder, name, None), nn.ModuleList):
            return f"{prefix}.{name}" if prefix else name
    raise PlanError(
        "no layer list found: its config's pipeline plan has no 'layers' and its decoder has "
        f"no ModuleList of {sorted(blocks) or 'its decoder blocks'}"
    )


def _is_attention(parent: str, module: nn.Module) -> bool:
    name = parent.rpartition(".")[2].lower()
    return "attention" in type(module).__name__.lower() or "attn" in name or "attention" in name


def _group(layer: nn.Module, groups: dict, wanted, what: str) -> dict[str, list[str]]:
    found = [
        group
        for parent, group in groups.items()
        if group["out"] and group["in"] and wanted(parent, layer.get_submodule(parent))
    ]
    if len(found) != 1 or len(found[0]["out"]) != 1:
        raise PlanError(
            f"no single {what} output projection found in its tensor-parallel plan "
            f"(groups: {sorted(groups)})"
        )
    return found[0]
