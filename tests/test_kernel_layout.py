"""The kernels' weight layout: rows of whole kilobytes padded, and every path through padded
weights equal to a plain model masked by its own hooks."""

from __future__ import annotations

import pytest
import torch
from conftest import by_hand, decode_logits, mask_decode_inputs, rescore_decode_logits
from transformers import AutoModelForCausalLM, LlamaConfig

from sparse_lightning import SparseActivationModule, resolve
from sparse_lightning.inference import Sparsifier
from sparse_lightning.kernels import (
    in_kernel_layout,
    load,
    load_topk,
    row_stride,
    transposed_rows,
)
from sparse_lightning.selection import DynamicSelector

PROMPT = torch.tensor([[5, 9, 17, 3, 44, 61]])


@pytest.mark.parametrize(
    "columns,element_size,stride",
    [
        (256, 4, 320),  # 1 KB rows: 256 bytes more
        (3072, 4, 3136),  # SmolLM2's gate|up, 12 KB
        (9728, 4, 9792),  # Qwen 0.5B's gate|up, 38 KB
        (49152, 2, 49280),  # SmolLM2's lm_head approximation in bfloat16
        (128, 8, 160),  # float64
        (960, 4, 960),  # SmolLM2's q|k|v, 3.75 KB: packed
        (576, 4, 576),
        (255, 4, 255),
        (1152, 4, 1152),  # 4.5 KB
    ],
)
def test_row_stride_pads_rows_of_whole_kilobytes(columns, element_size, stride):
    assert row_stride(columns, element_size) == stride


def test_in_kernel_layout_by_hand():
    assert in_kernel_layout(torch.zeros(3, 100))  # packed rows of 400 bytes
    assert not in_kernel_layout(torch.zeros(3, 256))  # 1 KB rows want padding
    assert in_kernel_layout(torch.zeros(3, 320)[:, :256])  # and have it
    assert not in_kernel_layout(torch.zeros(100, 3).t())  # not rows at all


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_transposed_rows_holds_the_parts_side_by_side_in_a_new_storage(dtype):
    g = torch.Generator().manual_seed(0)
    size = torch.empty(0, dtype=dtype).element_size()
    columns, pad = 1024 // size, 256 // size  # rows of exactly 1 KB
    parts = [
        torch.randn(5, columns // 4, generator=g),
        torch.randn(5, 3 * columns // 4, generator=g),
    ]
    parts = [part.to(dtype) for part in parts]
    rows = transposed_rows(parts)
    assert torch.equal(rows, torch.cat(parts, dim=1))
    assert rows.stride() == (columns + pad, 1)
    storage = rows.as_strided((5, columns + pad), (columns + pad, 1))
    assert torch.equal(storage[:, columns:], torch.zeros(5, pad, dtype=dtype))
    assert all(rows.untyped_storage().data_ptr() != p.untyped_storage().data_ptr() for p in parts)
    single = torch.randn(3, 100, generator=g)  # packed rows: a copy, contiguous
    assert transposed_rows([single]).is_contiguous()


@pytest.mark.parametrize("out", [5, 256, 4200, 16400])  # 16400: the threads split the columns
def test_the_ops_read_padded_rows_like_a_hand_computation(out):
    g = torch.Generator().manual_seed(out)
    storage = torch.randn(40, out + 64, generator=g)
    weight_t = storage[:, :out]  # rows 64 floats apart beyond their length
    x = torch.randn(3, 40, generator=g)
    bias = torch.randn(out, generator=g)
    for t in (0.0, 0.7):
        got = load()(x, weight_t, t, bias)
        torch.testing.assert_close(
            got.double(), by_hand(x, weight_t, t, bias), rtol=1e-5, atol=1e-5
        )
    keep = 12  # the top-k op: each token's 12 largest channels
    t = x.abs().sort(dim=-1, descending=True).values[:, keep - 1 : keep]
    want = torch.stack([by_hand(x[i : i + 1], weight_t, float(t[i]), None)[0] for i in range(3)])
    torch.testing.assert_close(
        load_topk()(x, weight_t, keep, None).double(), want, rtol=1e-5, atol=1e-5
    )


def wide_llama(seed: int = 0, tied: bool = False):
    """A llama whose gate|up rows (2 x 128 floats) and lm_head rows (256 floats) are 1 KB, so
    both get padded; q|k|v (64 + 2 x 32 floats) and o and down (64) stay packed."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        tie_word_embeddings=tied,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.config.pad_token_id = 0
    return model.eval()


def masked_decode(
    kind_threshold: dict[str, float], lm_head_keep: int | None = None, tied: bool = False
):
    """The plain wide llama with its own hooks: on decode steps, each projection's input
    channels below the kind's threshold zeroed; the lm_head's logits from its ``lm_head_keep``
    largest input channels, the 4 largest of them recomputed densely."""
    model = wide_llama(tied=tied)
    for kind, t in kind_threshold.items():
        mask_decode_inputs(model, kind, [t] * model.config.num_hidden_layers)
    if lm_head_keep is not None:
        rescore_decode_logits(model.get_output_embeddings(), lm_head_keep, 4)
    return decode_logits(model, PROMPT)


def test_decode_through_padded_rows_equals_the_masked_reference_and_removal_restores():
    model = wide_llama()
    arch = resolve(model)
    t = 0.6
    selectors = {kind: DynamicSelector(torch.full((2,), t)) for kind in ("mlp_input", "attn_input")}
    sparsifier = Sparsifier(model, arch, selectors, lm_head=0.5, lm_head_candidates=4)
    strides = {ex.kind: ex.weight_t.stride(0) for ex in sparsifier.executors}
    assert strides == {"mlp_input": 256 + 64, "attn_input": 128}  # gate|up padded, q|k|v not
    assert sparsifier.output.weight_t.stride(0) == 256 + 64
    kernel = decode_logits(model, PROMPT)
    realized = sparsifier.realized()
    assert 0.0 < realized["mlp_input"] < 1.0 and 0.0 < realized["attn_input"] < 1.0
    expected = masked_decode({"mlp_input": t, "attn_input": t}, lm_head_keep=32)
    torch.testing.assert_close(kernel, expected, rtol=1e-5, atol=1e-5)
    # A prompt of 24 tokens runs dense through the padded views, bit for bit.
    ids = torch.randint(3, 255, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, wide_llama()(ids).logits)
    sparsifier.remove()
    plain = wide_llama()
    for name, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert all(p.is_contiguous() for p in model.parameters())


def test_a_tied_embedding_reads_the_padded_lm_head_rows():
    """With the input embedding tied to the lm_head, the embedding reads the padded storage
    through a view while the executor is installed."""
    model = wide_llama(tied=True)
    embedding = model.get_input_embeddings()
    assert embedding.weight is model.get_output_embeddings().weight
    sparsifier = Sparsifier(model, resolve(model), {}, lm_head=0.5, lm_head_candidates=4)
    assert sparsifier.output.weight_t.stride(0) == 256 + 64
    assert embedding.weight.stride() == (1, 256 + 64)
    kernel = decode_logits(model, PROMPT)
    torch.testing.assert_close(kernel, masked_decode({}, 32, tied=True), rtol=1e-5, atol=1e-5)
    ids = torch.randint(3, 255, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, wide_llama(tied=True)(ids).logits)
    sparsifier.remove()
    assert embedding.weight.is_contiguous()
    assert torch.equal(embedding.weight, wide_llama(tied=True).get_input_embeddings().weight)


def test_module_with_a_budget_on_padded_rows_equals_its_own_masked_path(tmp_path):
    """The public path: every channel kind at 0.5 through from_pretrained's executors, the
    kernel against the executors' masked reference path (gather off)."""
    from conftest import calibrate, loader_of, token_pairs

    _, _, callback = calibrate(
        wide_llama(), loader_of(token_pairs(4)), run_name="wide", dirpath=tmp_path
    )
    module = SparseActivationModule.from_pretrained(
        wide_llama(),
        callback.checkpoint_path,
        attn_input=0.5,
        mlp_input=0.5,
        head_features=0.5,
        mlp=0.5,
    )
    assert any(ex.weight_t.stride(0) != ex.weight_t.shape[1] for ex in module.sparsifier.executors)
    kernel = decode_logits(module.model, PROMPT)
    module.sparsifier.gather = False
    torch.testing.assert_close(decode_logits(module.model, PROMPT), kernel, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(kernel, decode_logits(wide_llama(), PROMPT))  # really sparse
