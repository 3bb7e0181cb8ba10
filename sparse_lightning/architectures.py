"""Where the units are: one table row per Hugging Face ``model_type``.

A unit is an MLP neuron (one input feature of the MLP output projection) or an attention head
(one ``head_dim`` slice of the input of the attention output projection). Both are read and
changed at the *input* of those projections, so one forward pre-hook per projection serves
capture (calibration) and masking (inference) for every architecture.

Adding a model family is one row in :data:`ARCHITECTURES` plus a tiny-model test.

Example:
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37,
    ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> arch = resolve(AutoModelForCausalLM.from_config(cfg))
    >>> (arch.num_layers, arch.mlp_units, arch.num_heads, arch.head_dim)
    (2, 37, 4, 8)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from torch import nn


@dataclass(frozen=True)
class ArchitectureSpec:
    """Module paths of one model family (dotted, relative to the model or to one layer).

    Attributes:
        layers: path from the model to the ``ModuleList`` of decoder layers.
        mlp_out: path from a layer to the MLP output projection (its input = the neurons).
        attn_out: path from a layer to the attention output projection (its input = the heads).
        mlp_in: paths from a layer to the projections that produce the neurons (compaction
            slices their output rows).
        attn_in: paths from a layer to the query/key/value projections.
        mlp_size: config attribute holding the MLP width (compaction rewrites it).
        separate_qkv: query, key and value are separate projections taking the head count
            from the config, so heads can be removed by slicing (compaction of heads).
        mlp_gate_act: path from a layer to the activation of a gated MLP, whose neurons are
            ``act(gate(x)) * up(x)`` with ``mlp_in = (gate, up)``; ``None`` for a plain MLP
            (``act(fc1(x))``). ``mode="gate"`` decides from it before running ``up``.
    """

    layers: str
    mlp_out: str
    attn_out: str
    mlp_in: tuple[str, ...]
    attn_in: tuple[str, ...]
    mlp_size: str = "intermediate_size"
    separate_qkv: bool = True
    mlp_gate_act: str | None = None


_LLAMA = ArchitectureSpec(
    layers="model.layers",
    mlp_out="mlp.down_proj",
    attn_out="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    attn_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    mlp_gate_act="mlp.act_fn",
)

#: ``model_type`` -> where its units are. Llama covers SmolLM/SmolLM2 and MobiLlama.
ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "phi": ArchitectureSpec(
        layers="model.layers",
        mlp_out="mlp.fc2",
        attn_out="self_attn.dense",
        mlp_in=("mlp.fc1",),
        attn_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ),
    "gpt2": ArchitectureSpec(
        layers="transformer.h",
        mlp_out="mlp.c_proj",
        attn_out="attn.c_proj",
        mlp_in=("mlp.c_fc",),
        attn_in=("attn.c_attn",),
        mlp_size="n_inner",
        separate_qkv=False,
    ),
    "gpt_neox": ArchitectureSpec(
        layers="gpt_neox.layers",
        mlp_out="mlp.dense_4h_to_h",
        attn_out="attention.dense",
        mlp_in=("mlp.dense_h_to_4h",),
        attn_in=("attention.query_key_value",),
        separate_qkv=False,
    ),
    "opt": ArchitectureSpec(
        layers="model.decoder.layers",
        mlp_out="fc2",
        attn_out="self_attn.out_proj",
        mlp_in=("fc1",),
        attn_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        mlp_size="ffn_dim",
        # OPT derives head_dim from hidden_size / num_attention_heads: no head removal.
        separate_qkv=False,
    ),
}

UNIT_KINDS = ("mlp", "heads")


class UnsupportedArchitectureError(ValueError):
    """The model's ``model_type`` has no row in :data:`ARCHITECTURES`."""


@dataclass(frozen=True)
class Fingerprint:
    """The shape facts a sparsity checkpoint must agree with."""

    model_type: str
    num_layers: int
    mlp_units: int
    num_heads: int
    head_dim: int
    num_kv_heads: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Fingerprint:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class ResolvedArchitecture:
    """The units of one concrete model: the spec plus counts and the modules themselves."""

    spec: ArchitectureSpec
    fingerprint: Fingerprint
    mlp_out_modules: tuple[nn.Module, ...]
    attn_out_modules: tuple[nn.Module, ...]
    layers: tuple[nn.Module, ...] = ()

    @property
    def model_type(self) -> str:
        return self.fingerprint.model_type

    @property
    def num_layers(self) -> int:
        return self.fingerprint.num_layers

    @property
    def mlp_units(self) -> int:
        return self.fingerprint.mlp_units

    @property
    def num_heads(self) -> int:
        return self.fingerprint.num_heads

    @property
    def head_dim(self) -> int:
        return self.fingerprint.head_dim

    def units(self, kind: str) -> int:
        """Units per layer of ``kind`` (``"mlp"`` neurons or ``"heads"``)."""
        return {"mlp": self.mlp_units, "heads": self.num_heads}[_check_kind(kind)]

    def unit_width(self, kind: str) -> int:
        """Features per unit at the projection input: 1 for a neuron, ``head_dim`` for a head."""
        return {"mlp": 1, "heads": self.head_dim}[_check_kind(kind)]

    def out_modules(self, kind: str) -> tuple[nn.Module, ...]:
        """The per-layer output projections whose input holds the units of ``kind``."""
        return {"mlp": self.mlp_out_modules, "heads": self.attn_out_modules}[_check_kind(kind)]


def resolve(model: nn.Module) -> ResolvedArchitecture:
    """Find the units of a Hugging Face causal LM.

    Args:
        model: a ``PreTrainedModel`` whose ``config.model_type`` is in :data:`ARCHITECTURES`.

    Raises:
        UnsupportedArchitectureError: the ``model_type`` is not in the table.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported by sparse_lightning. Supported: "
            f"{', '.join(sorted(ARCHITECTURES))}. To add it, map its module names in "
            "sparse_lightning/architectures.py (ARCHITECTURES) and add a tiny-model test."
        )
    spec = ARCHITECTURES[model_type]
    layers = model.get_submodule(spec.layers)
    mlp_out = tuple(layer.get_submodule(spec.mlp_out) for layer in layers)
    attn_out = tuple(layer.get_submodule(spec.attn_out) for layer in layers)
    num_heads = int(config.num_attention_heads)
    attn_width = _in_features(attn_out[0])
    if attn_width % num_heads:
        raise ValueError(
            f"{spec.attn_out} takes {attn_width} features, not a multiple of "
            f"num_attention_heads={num_heads}; the config does not match the weights."
        )
    fingerprint = Fingerprint(
        model_type=model_type,
        num_layers=len(layers),
        mlp_units=_in_features(mlp_out[0]),
        num_heads=num_heads,
        head_dim=attn_width // num_heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or num_heads),
    )
    return ResolvedArchitecture(spec, fingerprint, mlp_out, attn_out, tuple(layers))


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    # transformers' Conv1D (GPT-2) stores its weight as (in_features, out_features).
    return int(module.weight.shape[0])


def _check_kind(kind: str) -> str:
    if kind not in UNIT_KINDS:
        raise ValueError(f"Unknown unit kind {kind!r}; expected one of {UNIT_KINDS}.")
    return kind
