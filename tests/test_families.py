"""Every supported model family, end to end on a tiny seeded model built from its config.

The table :data:`FAMILIES` is the list of supported families (docs/architecture.md is generated
from it). A family is supported when its tiny model passes the whole path: resolution, a
calibration through ``trainer.validate`` that leaves every weight as it was, a checkpoint round
trip, every selection mode (or a clear refusal), decode through the input-sparse kernel, and a
compaction that reloads in stock transformers with the masked model's logits (or a clear
refusal where the family cannot lose heads or neurons).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import VOCAB, cache_kwargs, calibrate, loader_of, returned_cache, token_pairs
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from sparse_lightning import SparseActivationModule, UnsupportedArchitectureError, resolve
from sparse_lightning.architectures import ARCHITECTURES
from sparse_lightning.data import TeacherForcedBatch
from sparse_lightning.inference import compact, sparsity_report
from sparse_lightning.selection import MODES
from sparse_lightning.units import UNIT_KINDS

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
#: model_type -> its tiny config's arguments (on top of COMMON unless it replaces them).
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},  # head_dim != hidden / heads
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16},
    "phi": {"num_key_value_heads": 4},
    "phi3": {},
    "smollm3": {},
    "granite": {},
    "olmo": {},
    "olmo2": {},
    "stablelm": {},
    "cohere": {},
    "helium": {"head_dim": 8},
    "starcoder2": {},
    "glm": {"head_dim": 8},
    "gpt_neox": {"num_key_value_heads": 4},
    "falcon": {"ffn_hidden_size": 37, "new_decoder_architecture": True, "num_kv_heads": 2},
    "opt": {"ffn_dim": 37, "word_embed_proj_dim": 32, "num_key_value_heads": 4},
    # a hybrid: the first layer is a short convolution without attention; the MLP width is
    # two thirds of intermediate_size, rounded up to a multiple of block_multiple_of
    "lfm2": {
        "intermediate_size": 56,
        "block_multiple_of": 1,
        "layer_types": ["conv", "full_attention"],
    },
    "gpt2": {
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 4,
        "n_inner": 37,
        "n_positions": 128,
    },
}


def family_model(model_type: str, seed: int = 0):
    arguments = {**COMMON, **FAMILIES[model_type]}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](**arguments))
    model.generation_config.pad_token_id = 0
    return model.eval()


def batch() -> TeacherForcedBatch:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return TeacherForcedBatch(ids, torch.ones_like(ids), labels)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    cache: dict[str, tuple] = {}

    def get(model_type: str):
        if model_type not in cache:
            folder = tmp_path_factory.mktemp(model_type)
            model = family_model(model_type)
            before = {k: v.clone() for k, v in model.state_dict().items()}
            stats, _, callback = calibrate(
                model, loader_of(token_pairs(4)), run_name=model_type, dirpath=folder
            )
            after = model.state_dict()
            unchanged = all(torch.equal(before[k], after[k]) for k in before)
            cache[model_type] = (stats, callback.checkpoint_path, unchanged)
        return cache[model_type]

    return get


def test_at_least_twenty_families_and_the_required_ones():
    required = {
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3",
        "smollm3", "granite", "olmo2", "stablelm", "gpt_neox", "opt", "gpt2", "falcon", "glm",
    }  # fmt: skip
    assert required <= set(FAMILIES) and len(FAMILIES) >= 20


@pytest.mark.parametrize("model_type", FAMILIES)
def test_resolution_finds_units_that_the_modules_really_consume(model_type):
    model = family_model(model_type)
    arch = resolve(model)
    assert arch.num_layers == 2 and arch.units("mlp") == 37
    head_dim = FAMILIES[model_type].get("head_dim", 8)
    assert (arch.num_heads, arch.head_dim) == (4, head_dim)
    for name, kind in UNIT_KINDS.items():
        for row in range(arch.depth(name)):
            for module in arch.site_modules(kind.site, row):
                # The unit count matches what every projection at the site reads.
                module(torch.zeros(1, arch.units(name) * arch.unit_width(name)))
    # Every layer has each site, except the hybrid's attention-free layers.
    layer_types = FAMILIES[model_type].get("layer_types", ["full_attention"] * 2)
    attention = tuple(i for i, t in enumerate(layer_types) if t == "full_attention")
    assert arch.layers_with("attn_in") == arch.layers_with("attn_out") == attention
    assert arch.layers_with("mlp_in") == arch.layers_with("mlp_out") == (0, 1)
    for row, layer in enumerate(attention):
        q = arch.site_modules("attn_in", row)[0]
        assert any(q is m for m in model.get_submodule(arch.spec.layers)[layer].modules())


@pytest.mark.parametrize("model_type", FAMILIES)
def test_calibration_round_trip_and_every_mode(model_type, calibrated):
    stats, path, unchanged = calibrated(model_type)
    assert unchanged, "calibration changed a weight"
    for kind in stats.units:
        for name, value in stats[kind].sums.items():
            assert torch.isfinite(value).all() and (value.abs().sum(1) > 0).all(), (kind, name)
    module = SparseActivationModule.from_pretrained(family_model(model_type), path)
    for key, value in stats.tensors().items():
        assert torch.equal(module.statistics.tensors()[key], value), key
    with torch.no_grad():
        dense = module.model(input_ids=batch().input_ids).logits
    for mode in MODES:
        try:
            module.set_sparsity(0.5, mode=mode)
        except ValueError as refusal:  # a family that cannot run the mode says why
            assert mode == "gate" and "gate" in str(refusal)
            assert resolve(module.model).spec.fused_gate_up
            continue
        sparse = module.sparse_logits(batch())
        assert not torch.allclose(sparse, dense, atol=1e-6), mode
    # The channel kinds through the kernel: a decode step runs and drops channels.
    module.set_sparsity(attn_input=0.5, mlp_input=0.5, head_features=0.5, mlp=0.5)
    with torch.no_grad():
        out = module.model(batch().input_ids[:1, :5], use_cache=True)
        module.model(batch().input_ids[:1, 5:6], **cache_kwargs(module.model, returned_cache(out)))
    assert module.realized_sparsity()["decode_bytes_skipped"] > 0.1


@pytest.mark.parametrize("model_type", FAMILIES)
def test_compaction_reloads_in_stock_transformers_or_refuses(model_type, calibrated, tmp_path):
    """Neurons and heads where the family allows; where its code cannot lose heads, a clear
    refusal and then neurons only; the export reloads with the masked model's logits."""
    _, path, _ = calibrated(model_type)
    spec = resolve(family_model(model_type)).spec
    module = SparseActivationModule.from_pretrained(
        family_model(model_type), path, 0.5, mode="static", phase="all"
    )
    try:
        small = module.compact()
    except ValueError as refusal:
        message = str(refusal)
        if "compact heads only" in message:  # the MLP width is not a config field
            assert spec.mlp_size is None
            module.set_sparsity(heads=0.5, mode="static", phase="all")
        else:
            assert "Heads cannot be removed" in message or "heads=0" in message, message
            module.set_sparsity(mlp=0.5, mode="static", phase="all")
        small = module.compact()
    else:
        assert spec.heads_removable and spec.mlp_size is not None
    ids = batch().input_ids
    small.save_pretrained(tmp_path / "small")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(ids).logits, module.model(ids).logits, atol=1e-5, rtol=1e-4
        )
    assert sum(p.numel() for p in reloaded.parameters()) < sum(
        p.numel() for p in module.model.parameters()
    )


def test_a_family_with_a_plan_resolves_without_a_row():
    """Qwen3 has no override row: its config's plans are enough."""
    assert "qwen3" not in ARCHITECTURES
    assert resolve(family_model("qwen3")).spec.attn_out == "self_attn.o_proj"


def test_a_hybrid_counts_its_convolution_layers_and_refuses_measured_allocations(calibrated):
    """lfm2's first layer is a short convolution: its projections stream bytes at decode (so
    they count in the total) but hold no unit; a byte budget is spread over what exists."""
    _, path, _ = calibrated("lfm2")
    module = SparseActivationModule.from_pretrained(family_model("lfm2"), path)
    arch = module.architecture
    h, n, kv = 32, 37, 16  # hidden, MLP width, key/value width (2 KV heads of 8)
    mlp = 3 * h * n
    conv = h * 3 * h + h * h  # in_proj (B, C, x) and out_proj
    attention = h * h + 2 * h * kv + h * h  # q, k, v, out_proj
    assert arch.linear_macs() == conv + mlp + attention + mlp + VOCAB * h
    # One attention layer of two: all its input channels dropped skip q, k and v once.
    skipped = sparsity_report({"attn_input": 1.0}, arch)["decode_bytes_skipped"]
    assert skipped == pytest.approx((h * h + 2 * h * kv) / arch.linear_macs())
    module.set_sparsity(budget=0.2)
    assert all(len(s.thresholds) == arch.depth(k) for k, s in module.sparsifier.selectors.items())
    with pytest.raises(ValueError, match=r"lfm2 is hybrid.*allocation='uniform'"):
        module.search_allocations([batch()])


def test_a_mixture_of_experts_is_refused_by_name():
    config = CONFIG_MAPPING["mixtral"](**COMMON, num_local_experts=4, num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError, match=r"'mixtral' is a mixture of experts"):
        SparseActivationModule(model)


def test_an_unsupported_family_says_what_is_missing():
    config = CONFIG_MAPPING["bloom"](vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4)
    with pytest.raises(UnsupportedArchitectureError) as error:
        resolve(AutoModelForCausalLM.from_config(config))
    message = str(error.value)
    assert "'bloom'" in message and "tensor-parallel plan" in message


# ------------------------------------------------------------------ the docs' family table
DOCS_TABLE = Path(__file__).resolve().parents[1] / "docs" / "families.md"


def family_facts(model_type: str) -> dict[str, str]:
    """What the docs' table says of one family, read off its tiny model."""
    model = family_model(model_type)
    arch = resolve(model)
    spec = arch.spec
    fused = [*spec.attn_in[: len(spec.attn_in) == 1], *spec.mlp_in[: spec.fused_gate_up]]
    groups = arch.num_kv_heads
    per_group = arch.num_heads // groups
    heads = torch.zeros(arch.depth("heads"), groups, per_group, dtype=torch.bool)
    heads[..., : max(1, per_group // 2)] = True
    neurons = torch.zeros(arch.depth("mlp"), arch.units("mlp"), dtype=torch.bool)
    neurons[:, : arch.units("mlp") // 2] = True
    removable = [
        label
        for label, masks in (("heads", {"heads": heads.flatten(1)}), ("neurons", {"mlp": neurons}))
        if _compacts(model, masks)
    ]
    attention = len(arch.layers_with("attn_out"))
    return {
        "family": f"`{model_type}`",
        "found by": "override row" if model_type in ARCHITECTURES else "its plans",
        "layers with attention": "all" if attention == arch.num_layers else "some (hybrid)",
        "fused projections": ", ".join(f"`{p.rpartition('.')[2]}`" for p in fused) or "none",
        "mode='gate'": "no (fused gate/up)" if spec.fused_gate_up else "yes",
        "compaction removes": " and ".join(removable) or "nothing",
    }


def _compacts(model, masks) -> bool:
    try:
        compact(model, masks)
    except ValueError:
        return False
    return True


def render_table() -> str:
    rows = [family_facts(model_type) for model_type in FAMILIES]
    head = list(rows[0])
    lines = [
        "# Supported model families",
        "",
        "Generated from the test table (`tests/test_families.py`, `FAMILIES`): each family's tiny",
        "seeded model passes the whole path there (resolution, calibration through",
        "`trainer.validate` with weights unchanged, a checkpoint round trip, every selection mode",
        "or a clear refusal, decode through the input-sparse kernel, compaction that reloads in",
        "stock transformers). Regenerate with `python tests/test_families.py`.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(row[k] for k in head) + " |" for row in rows]
    lines += [
        "",
        "Mixtures of experts (`mixtral`, `qwen2_moe`, ...) are refused by name: a token runs only",
        "some experts, so a layer's neurons are not one set. In hybrid models (`lfm2`), the",
        "layers without attention have MLP and input-channel units only; measured allocations",
        "(`greedy`, `attribution`) need every layer to hold every site, so hybrids use",
        "`uniform` or levels per kind.",
    ]
    return "\n".join(lines) + "\n"


def test_the_docs_family_table_is_generated_from_this_table():
    assert DOCS_TABLE.read_text() == render_table(), "run: python tests/test_families.py"


if __name__ == "__main__":
    DOCS_TABLE.write_text(render_table())
    print(f"wrote {DOCS_TABLE}")
