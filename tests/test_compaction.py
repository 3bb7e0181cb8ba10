"""Compacted export: a smaller stock model with the masked model's outputs."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from conftest import ARCH_TYPES, calibrate, loader_of, tiny_model, token_pairs

from sparse_lightning import SparseActivationModule
from sparse_lightning.architectures import resolve

# Loads the export with plain transformers in a fresh interpreter: no sparse_lightning import.
STOCK_LOADER = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto").eval()
assert "sparse_lightning" not in sys.modules
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
print(sum(p.numel() for p in model.parameters()))
"""


def stock_logits(folder, ids, tmp_path) -> tuple[torch.Tensor, int]:
    torch.save(ids, tmp_path / "ids.pt")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            STOCK_LOADER,
            str(folder),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "logits.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "logits.pt"), int(result.stdout.strip().splitlines()[-1])


def compact_and_compare(module, ids, tmp_path) -> tuple[int, int]:
    with torch.no_grad():
        masked = module.model(ids).logits
    small = module.compact()
    small.save_pretrained(tmp_path / "export")
    logits, params = stock_logits(tmp_path / "export", ids, tmp_path)
    torch.testing.assert_close(logits, masked, rtol=0, atol=1e-5)
    return params, sum(p.numel() for p in module.model.parameters())


@pytest.mark.parametrize("model_type", ["llama", "phi"])
def test_compacted_tiny_models_reload_in_stock_transformers(model_type, tmp_path):
    _, _, callback = calibrate(
        tiny_model(model_type), loader_of(token_pairs(6)), run_name="c", dirpath=tmp_path
    )
    module = SparseActivationModule.from_pretrained(
        tiny_model(model_type), callback.checkpoint_path, 0.5, mode="static", phase="all"
    )
    ids = torch.randint(3, 99, (2, 11), generator=torch.Generator().manual_seed(0))
    small_params, params = compact_and_compare(module, ids, tmp_path)
    assert small_params < params
    with torch.no_grad():
        dense = tiny_model(model_type)(ids).logits
    assert not torch.allclose(module.model(ids).logits, dense, atol=1e-4)


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_compacted_model_decodes_like_the_masked_model(model_type, tmp_path):
    """The static fast path on every architecture: the compacted model's prefill logits and
    greedy KV-cache decode equal the masked model's (heads removed where compaction can)."""
    _, _, callback = calibrate(
        tiny_model(model_type), loader_of(token_pairs(4)), run_name="d", dirpath=tmp_path
    )
    heads = 0.5 if resolve(tiny_model(model_type)).spec.heads_removable else 0.0
    module = SparseActivationModule.from_pretrained(
        tiny_model(model_type),
        callback.checkpoint_path,
        mlp=0.5,
        heads=heads,
        mode="static",
        phase="all",
    )
    small = module.compact()
    ids = torch.randint(3, 99, (1, 6), generator=torch.Generator().manual_seed(2))

    def greedy(model) -> torch.Tensor:
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=6,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        return torch.cat(out.logits)

    torch.testing.assert_close(greedy(small), greedy(module.model), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in small.parameters()) < sum(
        p.numel() for p in module.model.parameters()
    )


def test_gpt2_compacts_neurons_but_refuses_heads(tmp_path):
    _, _, callback = calibrate(
        tiny_model("gpt2"), loader_of(token_pairs(4)), run_name="g", dirpath=tmp_path
    )
    module = SparseActivationModule.from_pretrained(
        tiny_model("gpt2"), callback.checkpoint_path, mlp=0.5, heads=0.5, mode="static", phase="all"
    )
    with pytest.raises(ValueError, match="Heads cannot be removed from gpt2"):
        module.compact()
    module.set_sparsity(mlp=0.5, heads=0.0, mode="static", phase="all")
    ids = torch.randint(3, 99, (1, 7), generator=torch.Generator().manual_seed(1))
    compact_and_compare(module, ids, tmp_path)


def test_compaction_needs_static_masks(tmp_path):
    module = SparseActivationModule(tiny_model("llama"))
    module.set_sparsity(0.5, mode="magnitude")
    with pytest.raises(RuntimeError, match="mode='static'"):
        module.compact()


@pytest.mark.slow
def test_compacted_smollm2_matches_masked_model(smollm2, tmp_path):
    model, tokenizer = smollm2
    # float64: in float32 the export's differently shaped matmuls round differently, and over
    # 30 layers logits (scale ~20) drift by ~3e-4; in float64 any compaction error would show.
    model = copy.deepcopy(model).double()
    pairs = [
        (
            tokenizer("Question: what is the capital of France?\nAnswer:")["input_ids"],
            tokenizer(" Paris.")["input_ids"],
        ),
        (
            tokenizer("Question: why is the sky blue?\nAnswer:")["input_ids"],
            tokenizer(" Rayleigh scattering.")["input_ids"],
        ),
    ]
    _, _, callback = calibrate(model, loader_of(pairs), run_name="s", dirpath=tmp_path)
    module = SparseActivationModule.from_pretrained(
        model, callback.checkpoint_path, 0.5, mode="static", tokenizer=tokenizer, phase="all"
    )
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    small_params, params = compact_and_compare(module, ids, tmp_path)
    # 50% of neurons and heads (1 of 3 query heads per KV group kept) removed.
    assert small_params < 0.75 * params
