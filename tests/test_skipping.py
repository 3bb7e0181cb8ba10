"""mode="gate": the single-token path that skips work equals the masked reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCH_TYPES, cache_kwargs, decode_logits, returned_cache, tiny_model

from sparse_lightning import SparseActivationModule
from sparse_lightning.selection import kept_count

PROMPT = torch.tensor([[5, 9, 17, 3, 44, 61]])


def gate_module(model_type: str, mlp: float = 0.5) -> SparseActivationModule:
    module = SparseActivationModule(tiny_model(model_type))
    module.set_sparsity(mlp=mlp, heads=0.0, mode="gate", phase="all")
    return module


def decode(module: SparseActivationModule, steps: int = 5) -> torch.Tensor:
    return decode_logits(module.model, PROMPT, steps)


@pytest.mark.parametrize("mlp", [0.5, 0.7])
@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_cut_decode_equals_masked_reference(model_type, mlp):
    module = gate_module(model_type, mlp)
    cut = decode(module)
    cut_realized = module.realized_sparsity(reset=True)["mlp_zero_ratio"]
    module.sparsifier.gather = False
    masked = decode(module)
    torch.testing.assert_close(cut, masked, atol=1e-4, rtol=0)
    units = module.architecture.units("mlp")
    assert cut_realized == pytest.approx(1 - kept_count(units, mlp) / units)
    with torch.no_grad():
        dense = tiny_model(model_type)(PROMPT).logits[:, -1]
    assert (masked[:, 0] - dense).abs().max() > 1e-6, "gate sparsity changed nothing"


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_generate_with_cut_path_equals_masked_generate(model_type):
    module = gate_module(model_type)

    def generate() -> list[int]:
        with torch.no_grad():
            out = module.model.generate(PROMPT, max_new_tokens=8, do_sample=False)
        return out[0, PROMPT.shape[1] :].tolist()

    cut = generate()
    module.sparsifier.gather = False
    assert cut == generate()


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_incremental_decode_equals_one_forward_over_the_sequence(model_type):
    """Each token's kept set depends on that token only: decoding token by token with the
    cut path gives the logits of one masked forward over the whole sequence."""
    module = gate_module(model_type)
    ids = PROMPT
    with torch.no_grad():
        whole = module.model(ids).logits
        out = module.model(ids[:, :2], use_cache=True)
        steps = [out.logits]
        for i in range(2, ids.shape[1]):
            out = module.model(ids[:, i : i + 1], **cache_kwargs(module.model, returned_cache(out)))
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-4, rtol=0)


def test_gated_rule_matches_hand_formula():
    """Llama MLP by hand: keep the 19 of 37 neurons with largest |silu(W_g x)|, then
    y = W_down (silu(W_g x) * W_up x) over those only."""
    module = gate_module("llama")
    mlp = module.model.model.layers[1].mlp
    x = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        gate = F.silu(x[0, 0] @ mlp.gate_proj.weight.T)
        up = x[0, 0] @ mlp.up_proj.weight.T
        kept = gate.abs().argsort(descending=True)[:19]
        expected = sum(gate[i] * up[i] * mlp.down_proj.weight[:, i] for i in kept.tolist())
        torch.testing.assert_close(mlp(x)[0, 0], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_disable_restores_plain_model_exactly(model_type):
    module = gate_module(model_type)
    with torch.no_grad():
        module.model(PROMPT[:, :1])
        with module.dense():
            paused = module.model(PROMPT).logits
        module.disable_sparsity()
        restored = module.model(PROMPT).logits
        plain = tiny_model(model_type)(PROMPT).logits
    # Paused, the output projection still holds its weight transposed: same values, another
    # summation order, so equal up to rounding; after disable, bit for bit.
    torch.testing.assert_close(paused, plain, atol=1e-6, rtol=0)
    assert torch.equal(restored, plain)
    for out_proj in module.architecture.out_modules("mlp"):
        assert out_proj.weight.is_contiguous()
        assert "forward" not in out_proj.__dict__
