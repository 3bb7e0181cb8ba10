"""The rotated sparse lm_head: channels dropped in the calibrated eigenbasis of its input.

References: hand computations in float64, a plain model whose own hook does the same math on
decode steps (no sparse_lightning code), and the lm_head input's second moment summed through
a hook of the test's own.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ARCH_TYPES,
    by_hand,
    calibrate,
    decode_logits,
    loader_of,
    reference_batch,
    static_cache_step,
    tiny_model,
    token_pairs,
)

from sparse_lightning import SparseActivationModule, SparsityConfig, resolve
from sparse_lightning.checkpoint import load_statistics, save_statistics
from sparse_lightning.inference import Sparsifier
from sparse_lightning.inference.accounting import decode_bytes_skipped
from sparse_lightning.inference.output import OutputReads, output_rotation
from sparse_lightning.kernels import load_rotated

PROMPT = torch.tensor([[5, 9, 17, 3, 44, 61]])


def orthonormal(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0].to(dtype)


def rotated_by_hand(x_rot, approx_t, keep, candidates, x, weight, bias) -> torch.Tensor:
    """Per token: the kept channels' rows summed by hand, the ``candidates`` largest of those
    sums (ordered by hand) replaced by dot products with the weight's rows."""
    rows = []
    flat_x = x.reshape(-1, x.shape[-1]).double()
    for r, token in enumerate(x_rot.reshape(-1, x_rot.shape[-1])):
        ordered = sorted((abs(v) for v in token.tolist()), reverse=True)
        t = float("inf") if keep == 0 else ordered[min(keep, len(ordered)) - 1]
        approx = by_hand(token[None], approx_t.double(), t, bias)[0]
        out = approx.clone()
        for c in sorted(range(out.shape[0]), key=lambda c: -float(approx[c]))[:candidates]:
            exact = float(weight[c].double() @ flat_x[r])
            out[c] = exact + (0.0 if bias is None else float(bias[c]))
        rows.append(out)
    return torch.stack(rows).reshape(*x_rot.shape[:-1], approx_t.shape[1])


@pytest.mark.parametrize("shape", [(7, 5), (64, 200), (96, 3000)])
@pytest.mark.parametrize("keep", [0, 1, 5, 48, 200])
@pytest.mark.parametrize("candidates", [1, 7, 64, 5000])
def test_rotated_kernel_equals_a_hand_computation(shape, keep, candidates):
    """float64, one token and several, with and without bias; the rotation is any square
    matrix to the kernel, so a random orthonormal one."""
    inputs, outputs = shape
    g = torch.Generator().manual_seed(inputs + keep + candidates)
    weight = torch.randn(outputs, inputs, generator=g, dtype=torch.float64)
    bias = torch.randn(outputs, generator=g, dtype=torch.float64)
    rotation = orthonormal(inputs, seed=keep)
    approx_t = (weight @ rotation).t().contiguous()
    for x in (
        torch.randn(1, inputs, generator=g, dtype=torch.float64),
        torch.randn(2, 3, inputs, generator=g, dtype=torch.float64),
    ):
        for b in (None, bias):
            args = (x @ rotation, approx_t, keep, candidates, x, weight, b)
            got = load_rotated()(*args)
            torch.testing.assert_close(got, rotated_by_hand(*args), rtol=1e-9, atol=1e-9)


def test_rotated_kernel_reads_a_bfloat16_copy_in_float32():
    """float32 input and weight, the approximation's copy in bfloat16: the approximate logits
    are the bfloat16 values widened exactly, summed in float32; the candidates are exact."""
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(3000, 96, generator=g)
    rotation = orthonormal(96, seed=1, dtype=torch.float32)
    approx_t = (weight @ rotation).t().contiguous().to(torch.bfloat16)
    x = torch.randn(1, 96, generator=g)
    got = load_rotated()(x @ rotation, approx_t, 24, 64, x, weight, None)
    expected = rotated_by_hand(x @ rotation, approx_t.double(), 24, 64, x, weight, None)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    approximations = rotated_by_hand(x @ rotation, approx_t.double(), 24, 0, x, weight, None)
    top = approximations.topk(64).indices  # the candidates hold the float32 weight's logits
    exact = F.linear(x, weight).double()
    torch.testing.assert_close(got.gather(-1, top), exact.float().gather(-1, top))


def test_rotated_opcheck_passes_and_bad_arguments_are_refused():
    g = torch.Generator().manual_seed(3)
    op = load_rotated()
    w = torch.randn(400, 24, generator=g)
    x = torch.randn(1, 24, generator=g)
    torch.library.opcheck(op, (x, w.t().contiguous(), 6, 5, x, w, None))
    xs = torch.randn(2, 3, 24, generator=g)
    approx = w.t().contiguous().to(torch.bfloat16)
    torch.library.opcheck(op, (xs, approx, 9, 3, xs, w, torch.randn(400)))
    with pytest.raises(RuntimeError, match="candidates must be >= 1"):
        op(x, w.t().contiguous(), 2, 0, x, w, None)
    with pytest.raises(RuntimeError, match="keep must be >= 0"):
        op(x, w.t().contiguous(), -1, 2, x, w, None)
    with pytest.raises(RuntimeError, match="both are the output features"):
        op(x, w.t().contiguous(), 2, 2, x, w[:10], None)


def masked_rotated_decode(model_type, rotation, level, candidates) -> torch.Tensor:
    """A plain model whose own lm_head hook, on decode steps only, drops the input's smallest
    ``level`` of channels in the basis ``rotation``, takes approximate logits from a bfloat16
    copy of the rotated weight, and writes the dense logits over the ``candidates`` largest."""
    model = tiny_model(model_type)
    head = model.get_output_embeddings()
    keep = max(1, head.in_features - round(level * head.in_features))
    q = rotation.float()
    approx_t = (head.weight.detach() @ q).t().to(torch.bfloat16).float()

    def rescore(module, args, output):
        x = args[0]
        if x.numel() != x.shape[-1]:  # the prompt: dense
            return None
        xr = x @ q
        t = xr.abs().sort(dim=-1, descending=True).values[..., keep - 1 : keep]
        approx = (xr * (xr.abs() >= t).to(x.dtype)) @ approx_t
        approx = approx if module.bias is None else approx + module.bias
        index = approx.topk(candidates, dim=-1).indices
        return approx.scatter(-1, index, output.gather(-1, index))

    head.register_forward_hook(rescore)
    return decode_logits(model, PROMPT)


@pytest.mark.parametrize("level,candidates", [(0.01, 1), (0.5, 4), (0.9, 4)])
@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_rotated_decode_through_the_kernel_equals_the_masked_reference(
    model_type, level, candidates
):
    model = tiny_model(model_type)
    rotation = orthonormal(32, seed=7)
    Sparsifier(model, resolve(model), {}, lm_head=level, lm_head_candidates=candidates,
               lm_head_rotation=rotation)  # fmt: skip
    kernel = decode_logits(model, PROMPT)
    expected = masked_rotated_decode(model_type, rotation, level, candidates)
    torch.testing.assert_close(kernel, expected, rtol=1e-5, atol=1e-5)
    if level > 0.1:  # the approximation really changed logits outside the candidates
        assert not torch.allclose(kernel, decode_logits(tiny_model(model_type), PROMPT))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_rotated_prompt_is_dense_and_removal_restores_the_model_bit_for_bit(model_type):
    """The rotated basis leaves the weight in place (gpt2 and opt tie it to the embedding);
    the executor's own masked path equals its kernel path."""
    model = tiny_model(model_type)
    plain = tiny_model(model_type)
    sparsifier = Sparsifier(model, resolve(model), {}, lm_head=0.5, lm_head_candidates=3,
                            lm_head_rotation=orthonormal(32, seed=2))  # fmt: skip
    ids = torch.randint(3, 99, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    kernel = decode_logits(model, PROMPT)
    sparsifier.gather = False
    torch.testing.assert_close(decode_logits(model, PROMPT), kernel, rtol=1e-5, atol=1e-5)
    sparsifier.remove()
    for name, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert torch.equal(decode_logits(model, PROMPT), decode_logits(plain, PROMPT))


def test_a_compiled_decode_step_with_the_rotated_lm_head_has_no_graph_break():
    model = tiny_model("llama")
    Sparsifier(model, resolve(model), {}, lm_head=0.5, lm_head_candidates=3,
               lm_head_rotation=orthonormal(32, seed=5))  # fmt: skip
    model.set_attn_implementation("eager")
    eager = static_cache_step(model, model.forward, PROMPT[:, :3])
    compiled_step = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    compiled = static_cache_step(model, compiled_step, PROMPT[:, :3])
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def lm_head_inputs_by_hand(model, pairs) -> torch.Tensor:
    """The lm_head's input at every position whose next token is an answer token, through a
    hook of the test's own on a plain copy of the model."""
    seen = []
    handle = model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach())
    )
    ids, mask, labels = reference_batch(pairs)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != -100
    return seen[0][predicts].double()


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_calibration_keeps_the_lm_head_inputs_second_moment(model_type, tmp_path):
    pairs = token_pairs(5)
    stats, module, _ = calibrate(tiny_model(model_type), loader_of(pairs, batch_size=2))
    x = lm_head_inputs_by_hand(tiny_model(model_type), pairs)
    assert int(stats.output["tokens"]) == x.shape[0] == sum(len(a) for _, a in pairs)
    torch.testing.assert_close(stats.output["second_moment"], x.T @ x, rtol=1e-5, atol=1e-8)
    stats.metadata["fingerprint"] = module.architecture.fingerprint.to_json()
    path = save_statistics(stats, tmp_path / "run.safetensors")
    loaded = load_statistics(path)
    assert torch.equal(loaded.output["second_moment"], stats.output["second_moment"])
    rotation = output_rotation(loaded, "auto")
    # orthonormal columns that diagonalise the moment
    torch.testing.assert_close(rotation.T @ rotation, torch.eye(32, dtype=torch.float64))
    inner = rotation.T @ (x.T @ x) @ rotation
    off_diagonal = inner - torch.diag(torch.diagonal(inner))
    assert float(off_diagonal.abs().max()) < 1e-8 * float(inner.abs().max())


def test_set_sparsity_picks_the_basis_from_the_checkpoint(tmp_path):
    """auto: rotated with a checkpoint that holds the moment, the input's channels without;
    rotated without the moment is refused before anything is installed."""
    model = tiny_model("llama")
    stats, module, _ = calibrate(model, loader_of(token_pairs(4)))
    stats.metadata["fingerprint"] = module.architecture.fingerprint.to_json()
    path = save_statistics(stats, tmp_path / "run.safetensors")
    sparse = SparseActivationModule.from_pretrained(tiny_model("llama"), path, lm_head=0.5)
    assert sparse.sparsifier.output.rotation is not None
    assert sparse.sparsifier.output.weight_t.dtype == torch.bfloat16
    sparse.set_sparsity(lm_head=0.5, lm_head_basis="channels")
    assert sparse.sparsifier.output.rotation is None
    sparse.statistics.output.clear()  # as a checkpoint of format /2 loads
    sparse.set_sparsity(lm_head=0.5)
    assert sparse.sparsifier.output.rotation is None
    with pytest.raises(ValueError, match=r"lacks .*recalibrate.*lm_head_basis='channels'"):
        sparse.set_sparsity(lm_head=0.5, lm_head_basis="rotated")
    assert sparse.sparsifier.output.rotation is None  # the earlier setting is still installed
    bare = SparseActivationModule(tiny_model("llama"))
    with pytest.raises(ValueError, match="no statistics"):
        bare.set_sparsity(lm_head=0.5, lm_head_basis="rotated")
    with pytest.raises(ValueError, match="lm_head_basis must be one of"):
        SparsityConfig(lm_head=0.5, lm_head_basis="pca")
    config = SparsityConfig(lm_head=0.5, lm_head_basis="channels")
    assert config.replace(lm_head=0.3).lm_head_basis == "channels"
    assert "lm_head_basis='channels'" in repr(config)


def test_rotated_bytes_by_hand():
    """Tiny llama: vocab 99, hidden 32. Dropping 75% of the rotated input reads 8 of the 32
    rows of the bfloat16 copy (2 bytes a weight), the 32 x 32 rotation and 2 candidate rows of
    the float32 weight."""
    arch = resolve(tiny_model("llama"))
    reads = OutputReads(candidates=2, rotated=True, approximation_size=2)
    expected = (99 * 32 - 8 * 99 / 2 - 32 * 32 - 2 * 32) / arch.linear_macs()
    assert decode_bytes_skipped({"lm_head": 0.75}, arch, reads, 4) == pytest.approx(expected)
