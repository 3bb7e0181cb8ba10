"""The sparse-input lm_head with exact candidates, against hand computations and masked models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ARCH_TYPES,
    by_hand,
    decode_logits,
    rescore_decode_logits,
    static_cache_step,
    tiny_model,
)

from sparse_lightning import SparseActivationModule, SparsityConfig, resolve
from sparse_lightning.inference import Sparsifier
from sparse_lightning.inference.accounting import decode_bytes_skipped
from sparse_lightning.inference.output import OutputReads
from sparse_lightning.kernels import load_logits, load_topk

PROMPT = torch.tensor([[5, 9, 17, 3, 44, 61]])


def top_k_by_hand(x: torch.Tensor, weight_t: torch.Tensor, keep: int, bias) -> torch.Tensor:
    """Per token: sort the magnitudes, and sum the rows at or above the keep-th (by_hand)."""
    rows = []
    for token in x.reshape(-1, 1, x.shape[-1]):
        ordered = sorted((abs(v) for v in token[0].tolist()), reverse=True)
        t = float("inf") if keep == 0 else ordered[min(keep, len(ordered)) - 1]
        rows.append(by_hand(token, weight_t, t, bias)[0])
    return torch.stack(rows).reshape(*x.shape[:-1], weight_t.shape[1])


@pytest.mark.parametrize("shape", [(7, 5), (64, 200), (96, 3000)])
@pytest.mark.parametrize("keep", [0, 1, 5, 48, 200])
def test_topk_kernel_equals_a_hand_computation(shape, keep):
    g = torch.Generator().manual_seed(sum(shape) + keep)
    weight_t = torch.randn(*shape, generator=g)
    bias = torch.randn(shape[1], generator=g)
    for x in (torch.randn(1, shape[0], generator=g), torch.randn(2, 3, shape[0], generator=g)):
        for b in (None, bias):
            got = load_topk()(x, weight_t, keep, b)
            torch.testing.assert_close(
                got.double(), top_k_by_hand(x, weight_t, keep, b), rtol=1e-5, atol=1e-5
            )


def test_topk_opcheck_passes_and_a_negative_count_is_refused():
    g = torch.Generator().manual_seed(2)
    op = load_topk()
    torch.library.opcheck(op, (torch.randn(1, 24, generator=g), torch.randn(24, 40), 6, None))
    torch.library.opcheck(
        op, (torch.randn(2, 3, 24, generator=g), torch.randn(24, 40), 9, torch.randn(40))
    )
    with pytest.raises(RuntimeError, match="keep must be >= 0"):
        op(torch.randn(1, 4), torch.randn(4, 3), -1, None)


def logits_by_hand(x, weight_t, keep, candidates, bias) -> torch.Tensor:
    """Per token: the top-k kernel's hand computation, then its ``candidates`` largest values
    (sorted by hand) replaced by the full dot products."""
    approx = top_k_by_hand(x, weight_t, keep, bias).reshape(-1, weight_t.shape[1])
    out = approx.clone()
    for r, token in enumerate(x.reshape(-1, x.shape[-1]).double()):
        order = sorted(range(approx.shape[1]), key=lambda c: -float(approx[r, c]))
        for c in order[:candidates]:
            exact = float(token @ weight_t[:, c].double())
            out[r, c] = exact + (0.0 if bias is None else float(bias[c]))
    return out.reshape(*x.shape[:-1], weight_t.shape[1])


@pytest.mark.parametrize("shape", [(7, 5), (64, 200), (96, 3000)])
@pytest.mark.parametrize("keep", [1, 5, 48, 200])
@pytest.mark.parametrize("candidates", [1, 7, 64, 5000])
def test_logits_kernel_equals_a_hand_computation(shape, keep, candidates):
    """Approximate logits with their largest ``candidates`` exact: one token and several,
    with and without bias, fewer and more candidates than columns; float64 weights, so no
    near-tie of the approximations orders differently in the two computations."""
    g = torch.Generator().manual_seed(sum(shape) + keep + candidates)
    weight_t = torch.randn(*shape, generator=g, dtype=torch.float64)
    bias = torch.randn(shape[1], generator=g, dtype=torch.float64)
    for x in (
        torch.randn(1, shape[0], generator=g, dtype=torch.float64),
        torch.randn(2, 3, shape[0], generator=g, dtype=torch.float64),
    ):
        for b in (None, bias):
            got = load_logits()(x, weight_t, keep, candidates, b)
            expected = logits_by_hand(x, weight_t, keep, candidates, b)
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_logits_kernel_in_float32_on_the_smollm2_shape():
    """SmolLM2's lm_head shape (576 x 49,152) at keep 288 and 64 candidates, float32, against
    the ATen composition of the masked top-k input, torch.topk and the dense logits."""
    g = torch.Generator().manual_seed(5)
    weight_t = torch.randn(576, 49152, generator=g)
    x = torch.randn(1, 576, generator=g)
    got = load_logits()(x, weight_t, 288, 64, None)
    magnitude = x.abs()
    kept = x * (magnitude >= magnitude.topk(288).values[:, -1:])
    approx = kept @ weight_t
    index = approx.topk(64).indices
    expected = approx.scatter(-1, index, (x @ weight_t).gather(-1, index))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(got, x @ weight_t, atol=1e-3)  # the tail stayed approximate


def test_logits_opcheck_passes_and_bad_counts_are_refused():
    g = torch.Generator().manual_seed(3)
    op = load_logits()
    torch.library.opcheck(op, (torch.randn(1, 24, generator=g), torch.randn(24, 400), 6, 5, None))
    torch.library.opcheck(
        op, (torch.randn(2, 3, 24, generator=g), torch.randn(24, 40), 9, 3, torch.randn(40))
    )
    with pytest.raises(RuntimeError, match="candidates must be >= 1"):
        op(torch.randn(1, 4), torch.randn(4, 3), 2, 0, None)
    with pytest.raises(RuntimeError, match="keep must be >= 0"):
        op(torch.randn(1, 4), torch.randn(4, 3), -1, 2, None)


def masked_head_decode(model_type: str, level: float, candidates: int) -> torch.Tensor:
    """A plain model whose own lm_head hook, on decode steps only, recomputes the logits from
    each token's largest ``1 - level`` input channels and writes the dense logits back over
    the ``candidates`` largest of them (no sparse_lightning code involved)."""
    model = tiny_model(model_type)
    head = model.get_output_embeddings()
    keep = max(1, head.in_features - round(level * head.in_features))
    rescore_decode_logits(head, keep, candidates)
    return decode_logits(model, PROMPT)


# 0.01 of 32 channels rounds to none dropped: the kernel path with every channel kept.
@pytest.mark.parametrize("level,candidates", [(0.01, 1), (0.5, 1), (0.5, 4), (0.9, 4)])
@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_lm_head_decode_through_the_kernel_equals_the_masked_reference(
    model_type, level, candidates
):
    module = SparseActivationModule(tiny_model(model_type))
    module.set_sparsity(lm_head=level, lm_head_candidates=candidates)
    kernel = decode_logits(module.model, PROMPT)
    expected = masked_head_decode(model_type, level, candidates)
    torch.testing.assert_close(kernel, expected, rtol=1e-5, atol=1e-5)
    ratio = module.realized_sparsity()["lm_head_zero_ratio"]
    assert ratio == pytest.approx(round(level * 32) / 32)  # hidden size 32, every step counted
    if ratio > 0:  # the approximation really changed logits outside the candidates
        assert not torch.allclose(kernel, decode_logits(tiny_model(model_type), PROMPT))
    module.sparsifier.gather = False  # the executor's own masked path agrees too
    torch.testing.assert_close(decode_logits(module.model, PROMPT), kernel, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi"])
def test_every_candidate_recomputed_is_the_dense_model(model_type):
    """With as many candidates as the vocabulary, every logit is recomputed exactly."""
    module = SparseActivationModule(tiny_model(model_type))
    module.set_sparsity(lm_head=0.9, lm_head_candidates=10_000)
    torch.testing.assert_close(
        decode_logits(module.model, PROMPT),
        decode_logits(tiny_model(model_type), PROMPT),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_prompt_is_dense_and_removal_restores_the_model_bit_for_bit(model_type):
    """gpt2 and opt tie the lm_head to the input embedding, which reads the transposed
    storage through a view while the executor is installed."""
    model = tiny_model(model_type)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (model_type != "llama")
    module = SparseActivationModule(model)
    module.set_sparsity(lm_head=0.5)
    ids = torch.randint(3, 99, (2, 24), generator=torch.Generator().manual_seed(3))
    plain = tiny_model(model_type)
    with torch.no_grad():
        assert torch.equal(module.model(ids).logits, plain(ids).logits)
        # generate's prompt forward keeps only the last position's logits: still dense.
        last = module.model(ids[:1], logits_to_keep=1).logits
        torch.testing.assert_close(last, plain(ids[:1]).logits[:, -1:], rtol=1e-5, atol=1e-6)
    assert module.realized_sparsity()["lm_head_zero_ratio"] == 0.0
    module.disable_sparsity()
    for name, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert model.get_output_embeddings().weight.is_contiguous()
    assert torch.equal(decode_logits(model, PROMPT), decode_logits(plain, PROMPT))


def test_a_compiled_decode_step_with_the_lm_head_has_no_graph_break():
    model = tiny_model("llama")
    Sparsifier(model, resolve(model), {}, lm_head=0.5, lm_head_candidates=3)
    model.set_attn_implementation("eager")
    eager = static_cache_step(model, model.forward, PROMPT[:, :3])
    compiled_step = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    compiled = static_cache_step(model, compiled_step, PROMPT[:, :3])
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    plain = tiny_model("llama")
    plain.set_attn_implementation("eager")
    dense = static_cache_step(plain, plain.forward, PROMPT[:, :3])
    assert not torch.allclose(eager, dense)  # the step really ran the sparse lm_head


def test_lm_head_bytes_by_hand():
    """Tiny llama: 2 layers, hidden 32, 37 neurons, vocab 99, untied lm_head (99 x 32)."""
    arch = resolve(tiny_model("llama"))
    total = arch.linear_macs()
    # half of the lm_head's 3168 weights, less 2 candidates x the 16 dropped rows x 16 floats
    # per cache line (the exact recomputation reads only the dropped rows' candidate weights)
    expected = (0.5 * 99 * 32 - 2 * 16 * 16) / total
    reads = OutputReads(candidates=2)
    assert decode_bytes_skipped({"lm_head": 0.5}, arch, reads, 4) == pytest.approx(expected)
    both = decode_bytes_skipped({"lm_head": 0.5, "mlp": 0.25}, arch, reads, 4)
    assert both == pytest.approx(expected + 0.25 * 2 * 37 * 32 / total)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"lm_head": 1.0}, r"lm_head sparsity must be in \[0, 1\)"),
        ({"lm_head": "0.5"}, "lm_head sparsity must be a number"),
        ({"lm_head": 0.5, "lm_head_candidates": 0}, "lm_head_candidates must be a whole number"),
        ({"lm_head": 0.5, "lm_head_candidates": 2.5}, "lm_head_candidates must be a whole number"),
    ],
)
def test_bad_lm_head_options_are_refused(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        SparsityConfig(**options)


def test_config_round_trips_its_lm_head_options():
    config = SparsityConfig(budget=0.2, lm_head=0.5, lm_head_candidates=16)
    assert config.replace(lm_head=0.3).lm_head == 0.3
    assert config.replace(lm_head=0.3).lm_head_candidates == 16
    assert not SparsityConfig(lm_head=0.5).is_dense
    assert "lm_head=0.5" in repr(config)


@pytest.mark.slow
def test_smollm2_greedy_tokens_with_a_sparse_lm_head(smollm2):
    """32 greedy tokens of the real model with half of the lm_head's input dropped per token
    (float64, so no near-tie flips between the two paths): with 4 candidates they equal those
    of a separate copy whose own hook does the same on decode steps; with 64 they equal the
    dense model's, since the dense token always ranks among the candidates here."""
    import copy

    model, tokenizer = smollm2
    dense = copy.deepcopy(model).double()
    reference = copy.deepcopy(model).double()
    layers = {"tokens": 0}
    reference.model.layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: layers.update(
            tokens=(args or [kwargs["hidden_states"]])[0].shape[1]
        ),
        with_kwargs=True,
    )
    keep = 576 - round(0.5 * 576)

    def rescore(module, args, output):
        if layers["tokens"] != 1:
            return None  # the prompt's forward runs dense
        x = args[0]
        t = x.abs().sort(dim=-1, descending=True).values[..., keep - 1 : keep]
        approx = F.linear(x * (x.abs() >= t).to(x.dtype), module.weight)
        index = approx.topk(4, dim=-1).indices
        return approx.scatter(-1, index, output.gather(-1, index))

    reference.get_output_embeddings().register_forward_hook(rescore)
    module = SparseActivationModule(copy.deepcopy(model).double(), tokenizer=tokenizer)
    ids = tokenizer("The three primary colors are", return_tensors="pt")

    def greedy(m) -> list[int]:
        with torch.no_grad():
            out = m.generate(**ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        return out[0, ids["input_ids"].shape[1] :].tolist()

    module.set_sparsity(lm_head=0.5, lm_head_candidates=4)
    assert greedy(module.model) == greedy(reference)
    assert module.realized_sparsity()["lm_head_zero_ratio"] == pytest.approx(0.5)
    module.set_sparsity(lm_head=0.5, lm_head_candidates=64)
    assert greedy(module.model) == greedy(dense)


def test_sweep_settings_try_each_lm_head_level_with_every_budget():
    from sparse_lightning.evaluation import sweep_settings
    from sparse_lightning.evaluation.sweep import is_dense_row, method

    settings = sweep_settings(["dynamic"], {"mlp": [0.5]}, budgets=[0.0, 0.2], lm_head=[0.0, 0.5])
    budgets = [(s.budget, s.lm_head) for s in settings[2:]]
    assert budgets == [(0.2, 0.0), (None, 0.5), (0.2, 0.5)]
    rows = [s.as_dict() for s in settings]
    assert [method(r) for r in rows] == [
        "dense",
        "dynamic",
        "budget auto",
        "budget auto + lm_head 0.5",
        "budget auto + lm_head 0.5",
    ]
    assert [is_dense_row(r) for r in rows] == [True, False, False, False, False]
