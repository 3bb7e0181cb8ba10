import pytest
import torch
from conftest import ARCH_TYPES, tiny_model
from transformers import AutoModelForCausalLM, BloomConfig

from sparse_lightning import ARCHITECTURES, UnsupportedArchitectureError, resolve


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_resolve_counts_units_of_every_architecture(model_type):
    model = tiny_model(model_type)
    arch = resolve(model)
    assert arch.model_type == model_type
    assert (arch.num_layers, arch.units("mlp"), arch.num_heads, arch.head_dim) == (2, 37, 4, 8)
    expected_kv = 2 if model_type in ("llama", "mistral", "qwen2") else 4
    assert arch.fingerprint.num_kv_heads == expected_kv
    # The hooked modules really consume the units: their input width is units * width.
    for kind in ("mlp", "heads"):
        for module in arch.out_modules(kind):
            x = torch.zeros(1, arch.units(kind) * arch.unit_width(kind))
            assert module(x).shape == (1, 32)


def test_families_with_plans_need_no_row():
    """Only the families whose config has no tensor-parallel plan have an override row."""
    for model_type in ARCH_TYPES:
        plan = getattr(tiny_model(model_type).config, "base_model_tp_plan", None)
        assert (model_type in ARCHITECTURES) == (not plan), model_type


def test_unsupported_architecture_names_it_and_lists_supported():
    model = AutoModelForCausalLM.from_config(
        BloomConfig(vocab_size=99, hidden_size=32, n_layer=1, n_head=4)
    )
    with pytest.raises(UnsupportedArchitectureError) as err:
        resolve(model)
    message = str(err.value)
    assert "'bloom'" in message
    for name in ARCH_TYPES:
        assert name in message
    assert "overrides.py" in message
