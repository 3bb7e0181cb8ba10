"""Find the units of a Hugging Face causal LM: its decoder layers and the modules at each site.

Units are read and changed at the *input* of projections (see :mod:`sparse_lightning.units`),
so one forward pre-hook per projection serves capture (calibration) and masking (inference)
for every architecture. Where the modules are comes from the model's own plans
(:mod:`~sparse_lightning.architectures.plans`), or a row of
:data:`~sparse_lightning.architectures.overrides.ARCHITECTURES`.

Example:
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37,
    ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> arch = resolve(AutoModelForCausalLM.from_config(cfg))
    >>> (arch.num_layers, arch.units("mlp"), arch.units("heads"), arch.head_dim)
    (2, 37, 4, 8)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from torch import nn

from sparse_lightning.architectures.overrides import ARCHITECTURES, ArchitectureSpec
from sparse_lightning.architectures.plans import PlanError, experts, spec_from_plans, text_config
from sparse_lightning.architectures.weights import in_features, is_transposed, out_features
from sparse_lightning.units import SITES, unit_kind


class UnsupportedArchitectureError(ValueError):
    """The model's units cannot be found, or its kind (mixture of experts) is not supported."""


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
    """The units of one concrete model: the spec, the shape facts and the modules themselves."""

    spec: ArchitectureSpec
    fingerprint: Fingerprint
    layers: tuple[nn.Module, ...]
    hidden_size: int
    #: site -> the decoder layers that have it: every layer, except in hybrid models whose
    #: convolution or linear-attention layers have no attention site. Per-layer tables of a
    #: unit kind (statistics, levels, selectors) have one row per layer listed here.
    site_layers: dict[str, tuple[int, ...]]
    #: Multiply-adds per token of the output (vocabulary) projection: streamed at every decode
    #: step like the layers' weights, and never skipped.
    output_macs: int = 0

    @property
    def model_type(self) -> str:
        return self.fingerprint.model_type

    @property
    def num_layers(self) -> int:
        return self.fingerprint.num_layers

    @property
    def num_heads(self) -> int:
        return self.fingerprint.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.fingerprint.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.fingerprint.head_dim

    def layers_with(self, site: str) -> tuple[int, ...]:
        """The decoder layers that have ``site`` (all of them unless the model is hybrid)."""
        return self.site_layers[site]

    def depth(self, kind: str) -> int:
        """Rows of a per-layer table of ``kind``: the layers that have its site."""
        return len(self.layers_with(unit_kind(kind).site))

    def layer_of(self, site: str, row: int) -> int:
        """The decoder layer of row ``row`` of a per-layer table at ``site``."""
        return self.layers_with(site)[row]

    def site_modules(self, site: str, row: int) -> tuple[nn.Module, ...]:
        """The projections whose input is ``site``, in row ``row`` of the layers that have it
        (:meth:`layers_with`; the decoder layer ``row`` unless the model is hybrid)."""
        layer = self.layers[self.layer_of(site, row)]
        return tuple(layer.get_submodule(p) for p in self.spec.paths(site))

    def site_outputs(self, site: str) -> int:
        """Output features of the projections reading ``site``, summed (one layer)."""
        return sum(out_features(m) for m in self.site_modules(site, 0))

    def site_macs(self, site: str) -> int:
        """Multiply-adds per token of the projections reading ``site`` in one layer (= their
        weights: what a decode step streams for that site)."""
        return sum(in_features(m) * out_features(m) for m in self.site_modules(site, 0))

    def linear_macs(self) -> int:
        """Multiply-adds per token of every linear layer, the output projection included
        (and the layers' projections outside the sites, such as a hybrid's convolutions)."""
        return self.output_macs + sum(
            in_features(module) * out_features(module)
            for layer in self.layers
            for module in layer.modules()
            if isinstance(module, nn.Linear) or is_transposed(module)
        )

    def site_macs_all_layers(self, site: str) -> int:
        """Multiply-adds per token of every projection reading ``site``, over all layers."""
        return len(self.layers_with(site)) * self.site_macs(site)

    def out_modules(self, kind: str) -> tuple[nn.Module, ...]:
        """Per layer, the projection whose input holds the units of ``kind``."""
        site = unit_kind(kind).site
        return tuple(self.site_modules(site, row)[0] for row in range(self.depth(kind)))

    def unit_width(self, kind: str) -> int:
        """Features per unit at the projection input: 1, or ``head_dim`` for a head."""
        return self.head_dim if unit_kind(kind).per_head else 1

    def units(self, kind: str) -> int:
        """Units per layer of ``kind``."""
        return in_features(self.out_modules(kind)[0]) // self.unit_width(kind)


def resolve(model: nn.Module) -> ResolvedArchitecture:
    """Find the units of a Hugging Face causal LM.

    The module paths come from the config's pipeline and tensor-parallel plans
    (:mod:`~sparse_lightning.architectures.plans`), or from a row of
    :data:`~sparse_lightning.architectures.overrides.ARCHITECTURES` for the families without.

    Raises:
        UnsupportedArchitectureError: a mixture of experts, or a family whose plans do not
            say where its units are; the message names the model type and what is missing.
        ValueError: the config's head count does not divide the attention width.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no config: wrap a Hugging Face PreTrainedModel."
        )
    text = text_config(model)
    model_type = getattr(config, "model_type", None)
    count = experts(model)
    if count > 1:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is a mixture of experts ({count} per layer): a token "
            "runs only some experts, so a layer's MLP neurons are not one set that calibration "
            "and selection can rank. sparse_lightning supports dense decoder models."
        )
    spec = ARCHITECTURES.get(model_type) or ARCHITECTURES.get(getattr(text, "model_type", None))
    if spec is None:
        try:
            spec = spec_from_plans(model)
        except PlanError as missing:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} is not supported by sparse_lightning: {missing}. "
                "Families whose config has a tensor-parallel plan resolve by themselves (e.g. "
                "llama, mistral, qwen2, qwen3, gemma, phi, phi3, gpt_neox, olmo2); the others "
                "need one row in sparse_lightning/architectures/overrides.py (ARCHITECTURES, "
                f"now {', '.join(sorted(ARCHITECTURES))}) and a tiny config in the test table "
                "(docs/architecture.md)."
            ) from None
    layers = tuple(model.get_submodule(spec.layers))
    site_layers = {site: _layers_having(layers, spec.paths(site)) for site in SITES}
    for site, found in site_layers.items():
        if not found:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r}: no decoder layer has {' and '.join(spec.paths(site))}"
                " (the module paths of its architecture row or plans do not match the model)."
            )
    attn_out = layers[site_layers["attn_out"][0]].get_submodule(spec.attn_out)
    mlp_out = layers[site_layers["mlp_out"][0]].get_submodule(spec.mlp_out)
    num_heads = _first_int(text, ("num_attention_heads", "n_head", "num_heads"))
    attn_width = in_features(attn_out)
    if not num_heads or attn_width % num_heads:
        raise ValueError(
            f"{spec.attn_out} takes {attn_width} features, not a multiple of "
            f"num_attention_heads={num_heads}; the config does not match the weights."
        )
    kv_heads = _first_int(text, ("num_key_value_heads", "num_kv_heads", "n_head_kv"))
    if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", 0):
        kv_heads = 1
    fingerprint = Fingerprint(
        model_type=model_type,
        num_layers=len(layers),
        mlp_units=in_features(mlp_out),
        num_heads=num_heads,
        head_dim=attn_width // num_heads,
        num_kv_heads=kv_heads or num_heads,
    )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_macs = int(head.weight.numel()) if head is not None else 0
    return ResolvedArchitecture(
        spec,
        fingerprint,
        layers,
        hidden_size=out_features(mlp_out),
        output_macs=output_macs,
        site_layers=site_layers,
    )


def _layers_having(layers: tuple[nn.Module, ...], paths: tuple[str, ...]) -> tuple[int, ...]:
    """The layers that hold every module in ``paths`` (hybrids: some layers have no attention)."""

    def has(layer: nn.Module, path: str) -> bool:
        try:
            layer.get_submodule(path)
        except AttributeError:
            return False
        return True

    return tuple(i for i, layer in enumerate(layers) if all(has(layer, p) for p in paths))


def _first_int(config, names: tuple[str, ...]) -> int:
    return next((int(v) for n in names if (v := getattr(config, n, None)) is not None), 0)
