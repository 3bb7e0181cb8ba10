"""The input-sparse kernel and its executor, against hand computations and masked references."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import (
    ARCH_TYPES,
    by_hand,
    calibrate,
    decode_logits,
    loader_of,
    mask_decode_inputs,
    static_cache_step,
    tiny_model,
    token_pairs,
)

from sparse_lightning import SparseActivationModule, resolve
from sparse_lightning.inference import Sparsifier
from sparse_lightning.kernels import compiled, inductor_options, load, load_topk, reference
from sparse_lightning.kernels.ops import reference_topk
from sparse_lightning.selection import DynamicSelector
from sparse_lightning.units import UNIT_KINDS

#: Kinds whose units are input channels of linear layers (the kernel's kinds).
CHANNELS = tuple(name for name, kind in UNIT_KINDS.items() if not kind.per_head)
PROMPT = torch.tensor([[5, 9, 17, 3, 44, 61]])


# --------------------------------------------------------------------------- the op itself
def test_the_kernel_is_compiled_here():
    assert compiled(), "g++ and ninja are on every machine of this project (ENVIRONMENT.md)"


@pytest.mark.parametrize("shape", [(7, 5), (64, 200), (96, 1000), (33, 17)])
@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.5, 10.0])
def test_kernel_equals_a_hand_computation(shape, threshold):
    g = torch.Generator().manual_seed(sum(shape))
    weight_t = torch.randn(*shape, generator=g)
    bias = torch.randn(shape[1], generator=g)
    for x in (torch.randn(1, shape[0], generator=g), torch.randn(2, 3, shape[0], generator=g)):
        for b in (None, bias):
            got = load()(x, weight_t, threshold, b)
            expected = by_hand(x, weight_t, threshold, b)
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


#: Which channels a token keeps, as functions of the channel index and count: isolated rows,
#: runs of two and three, and both ends of the weight (the row-reading experiments of
#: benchmarks/kernel_rows.py turned on exactly these neighbourhoods).
KEPT_PATTERNS = {
    "every other": lambda i, n: i % 2 == 0,
    "pairs": lambda i, n: i % 4 < 2,
    "runs of three, gaps of two": lambda i, n: i % 5 < 3,
    "first and last only": lambda i, n: i in (0, n - 1),
}


@pytest.mark.parametrize("pattern", KEPT_PATTERNS)
#: Output widths: 0 to 262 whole blocks of 16 columns, odd and even counts, with and without a
#: remainder, rows split between threads (up to 16384 columns, sparse_rows.h's kRowSplitColumns)
#: and columns split (16400).
@pytest.mark.parametrize("out", [5, 40, 53, 200, 4200, 16400])
def test_kernel_equals_a_hand_computation_for_every_pattern_of_kept_rows(pattern, out):
    in_features = 83
    g = torch.Generator().manual_seed(out)
    weight_t = torch.randn(in_features, out, generator=g)
    keep = torch.tensor([KEPT_PATTERNS[pattern](i, in_features) for i in range(in_features)])
    # Kept channels get magnitudes in [1, 2), dropped ones below 0.5: threshold 0.75.
    magnitude = torch.where(
        keep, 1 + torch.rand(in_features, generator=g), 0.5 * torch.rand(in_features, generator=g)
    )
    sign = torch.where(torch.rand(in_features, generator=g) < 0.5, -1.0, 1.0)
    x = (magnitude * sign).unsqueeze(0)
    for dtype in (torch.float64, torch.float32):
        got = load()(x.to(dtype), weight_t.to(dtype), 0.75, None)
        expected = x.double()[:, keep] @ weight_t.double()[keep]
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_kernel_reads_a_strided_weight_and_other_dtypes_like_the_reference():
    g = torch.Generator().manual_seed(0)
    weight_t = torch.randn(40, 30, generator=g)[:, ::2]  # rows not contiguous: ATen path
    x = torch.randn(1, 40, generator=g)
    torch.testing.assert_close(load()(x, weight_t, 0.7, None), reference(x, weight_t, 0.7, None))
    x64, w64 = x.double(), weight_t.double().contiguous()
    torch.testing.assert_close(load()(x64, w64, 0.7, None), by_hand(x64, w64, 0.7, None))


def test_opcheck_passes():
    g = torch.Generator().manual_seed(1)
    load()  # registers the op (run alone, nothing else has)
    op = torch.ops.sparse_lightning.input_sparse_linear
    cases = [
        (torch.randn(1, 24, generator=g), torch.randn(24, 40, generator=g), 0.6, None),
        (
            torch.randn(3, 5, 24, generator=g),
            torch.randn(24, 40, generator=g),
            0.2,
            torch.randn(40, generator=g),
        ),
        (  # a model's own two-byte type: the fake's dtype must follow it
            torch.randn(2, 24, generator=g).to(torch.bfloat16),
            torch.randn(24, 40, generator=g).to(torch.bfloat16),
            0.6,
            torch.randn(40, generator=g).to(torch.bfloat16),
        ),
    ]
    for args in cases:
        torch.library.opcheck(op, args)


def test_buffers_reused_across_calls_of_every_size_give_the_hand_computation():
    """The kernel keeps its per-call buffers between calls and grows them on demand: calls
    that alternate small and large inputs and outputs, row and column splits, both ops."""
    g = torch.Generator().manual_seed(3)
    sizes = [(8, 6), (300, 4500), (20, 30), (40, 16500), (700, 90), (8, 17000), (5, 3)]
    for in_features, out in sizes:
        weight_t = torch.randn(in_features, out, generator=g, dtype=torch.float64)
        x = torch.randn(2, in_features, generator=g, dtype=torch.float64)
        torch.testing.assert_close(load()(x, weight_t, 0.8, None), by_hand(x, weight_t, 0.8, None))
        keep = in_features // 3
        kept = x * (x.abs() >= x.abs().topk(keep, -1).values[:, -1:])
        torch.testing.assert_close(load_topk()(x, weight_t, keep, None), kept @ weight_t)


def test_eight_threads_add_their_partial_rows_like_a_hand_computation():
    """Past sparse_rows.h's kSerialSum (65536 partial sums), the threads of the row split add
    their partial rows together, each a run of columns: 8 threads x 9000 columns."""
    g = torch.Generator().manual_seed(5)
    weight_t = torch.randn(150, 9000, generator=g, dtype=torch.float64)
    x = torch.randn(2, 150, generator=g, dtype=torch.float64)
    bias = torch.randn(9000, generator=g, dtype=torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        for t in (0.0, 0.9):
            got = load()(x, weight_t, t, bias)
            torch.testing.assert_close(got, by_hand(x, weight_t, t, bias))
    finally:
        torch.set_num_threads(previous)


def test_a_cpp_wrapper_step_calls_the_kernel_as_a_c_function():
    """With ``inductor_options()``, Inductor's C++ wrapper calls the kernel's exported C
    functions (not the dispatcher by name), and the step equals the plain-PyTorch math."""
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    g = torch.Generator().manual_seed(4)
    w1, w2 = torch.randn(24, 40, generator=g), torch.randn(40, 16, generator=g)
    w3, bias = torch.randn(16, 300, generator=g), torch.randn(40, generator=g)
    w4 = torch.randn(200, 16, generator=g)
    rotation = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    w4_t = (w4 @ rotation).t().contiguous().to(torch.bfloat16)

    def step(x):
        h = torch.ops.sparse_lightning.input_sparse_linear(x, w1, 0.5, bias)
        h = torch.ops.sparse_lightning.input_sparse_linear_topk(torch.relu(h), w2, 7, None)
        h = torch.tanh(h)
        logits = torch.ops.sparse_lightning.input_sparse_logits(h, w3, 5, 4, None)
        rotated = torch.ops.sparse_lightning.rotated_logits(h @ rotation, w4_t, 6, 3, h, w4, None)
        return logits, rotated

    x = torch.randn(1, 24, generator=g)
    options = inductor_options()
    assert set(options) == {"aot_inductor.custom_ops_to_c_shims"}
    with config.patch({"cpp_wrapper": True, **options}), torch.no_grad():
        got, code = run_and_get_code(torch.compile(step, fullgraph=True), x)
    source = "\n".join(code)
    assert "aoti_torch_cpu_input_sparse_linear(" in source, source[-2000:]
    assert "aoti_torch_cpu_input_sparse_linear_topk(" in source
    assert "aoti_torch_cpu_input_sparse_logits(" in source
    assert "aoti_torch_cpu_rotated_logits(" in source
    assert "aoti_torch_call_dispatcher" not in source
    h = torch.tanh(reference_topk(torch.relu(reference(x, w1, 0.5, bias)), w2, 7, None))
    approx = reference_topk(h, w3, 5, None)
    index = approx.topk(4).indices
    expected = approx.scatter(-1, index, (h @ w3).gather(-1, index))
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-5)
    approx = reference_topk(h @ rotation, w4_t.float(), 6, None)
    index = approx.topk(3).indices
    expected = approx.scatter(-1, index, (h @ w4.t()).gather(-1, index))
    torch.testing.assert_close(got[1], expected, rtol=1e-5, atol=1e-5)


def test_without_a_compiler_one_warning_and_the_same_outputs(tmp_path):
    """A fresh extension folder and a compiler that does not exist: the build fails, one
    warning names the cause and the fix, and decode gives the masked reference's outputs."""
    script = textwrap.dedent(
        """
        import warnings, torch
        from conftest import cache_kwargs, returned_cache, tiny_model
        from sparse_lightning.inference import Sparsifier
        from sparse_lightning.kernels import compiled, inductor_options, load, load_logits
        from sparse_lightning.kernels import load_rotated
        from sparse_lightning.kernels import reference
        from sparse_lightning.selection import DynamicSelector
        from sparse_lightning import resolve
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not compiled()
            load(); load()
        messages = [str(w.message) for w in caught if "kernel" in str(w.message)]
        assert len(messages) == 1, messages
        assert "pure-PyTorch" in messages[0] and "ninja" in messages[0], messages[0]
        x, w = torch.randn(1, 16), torch.randn(16, 8)
        assert torch.equal(load()(x, w, 0.5, None), reference(x, w, 0.5, None))
        approx = (x * (x.abs() >= x.abs().topk(4).values[:, -1:])) @ w
        index = approx.topk(3).indices
        expected = approx.scatter(-1, index, (x @ w).gather(-1, index))
        torch.testing.assert_close(load_logits()(x, w, 4, 3, None), expected)
        q = torch.linalg.qr(torch.randn(16, 16))[0]
        xq = x @ q
        approx = (xq * (xq.abs() >= xq.abs().topk(4).values[:, -1:])) @ (q.T @ w)
        index = approx.topk(3).indices
        expected = approx.scatter(-1, index, (x @ w).gather(-1, index))
        got = load_rotated()(xq, (q.T @ w).contiguous(), 4, 3, x, w.T.contiguous(), None)
        torch.testing.assert_close(got, expected)
        assert inductor_options() == {}  # the fallback has no C entry points
        model = tiny_model("llama")
        arch = resolve(model)
        Sparsifier(model, arch, {"mlp_input": DynamicSelector(torch.full((2,), 0.5))})
        with torch.no_grad():
            out = model(torch.tensor([[5, 9]]), use_cache=True)
            model(torch.tensor([[3]]), **cache_kwargs(model, returned_cache(out)))
        print("ok")
        """
    )
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-compiler"),
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"),
        "PYTHONPATH": os.path.dirname(__file__),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_an_unknown_instruction_set_is_refused(monkeypatch):
    from sparse_lightning.kernels.ops import cpu_flags

    monkeypatch.setenv("SPARSE_LIGHTNING_KERNEL_ISA", "avx10")
    with pytest.raises(ValueError, match=r"must be one of .*'avx2'"):
        cpu_flags()


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_narrower_builds_equal_the_hand_computation(isa, tmp_path):
    """The kernel built for AVX2 (eight rows at a time) or without SIMD flags, beside this
    CPU's own build: the row and column splits, the top-k and both logits ops equal the
    float64 hand computation, and the linear and rotated ops in bfloat16 and float16 its
    rounding (the AVX-512 path, where this CPU has it, is the one the other tests run)."""
    script = textwrap.dedent(
        """
        import torch
        from conftest import by_hand
        from sparse_lightning.kernels import compiled, load, load_logits, load_rotated
        from sparse_lightning.kernels import load_topk
        from sparse_lightning.kernels.ops import cpu_flags
        assert compiled()
        print(cpu_flags())
        g = torch.Generator().manual_seed(0)
        for inputs, outputs in ((37, 29), (96, 5000), (24, 16500), (200, 80)):
            w = torch.randn(inputs, outputs, generator=g)
            x = torch.randn(2, inputs, generator=g)
            bias = torch.randn(outputs, generator=g)
            got = load()(x, w, 0.7, bias).double()
            torch.testing.assert_close(got, by_hand(x, w, 0.7, bias), rtol=1e-5, atol=1e-5)
            keep = inputs // 3
            t = x.abs().topk(keep, -1).values[:, -1:]
            expected = (x * (x.abs() >= t)) @ w
            torch.testing.assert_close(load_topk()(x, w, keep, None), expected)
            index = expected.topk(4).indices
            logits = expected.scatter(-1, index, (x @ w).gather(-1, index))
            torch.testing.assert_close(load_logits()(x, w, keep, 4, None), logits)
            q = torch.linalg.qr(torch.randn(inputs, inputs, generator=g))[0]
            approx_t = (q.T @ w).contiguous().to(torch.bfloat16)
            xq = x @ q
            t = xq.abs().topk(keep, -1).values[:, -1:]
            approx = (xq * (xq.abs() >= t)) @ approx_t.float()
            index = approx.topk(4).indices
            rotated = approx.scatter(-1, index, (x @ w).gather(-1, index))
            got = load_rotated()(xq, approx_t, keep, 4, x, w.T.contiguous(), None)
            torch.testing.assert_close(got, rotated, rtol=1e-5, atol=1e-5)
            for dtype in (torch.bfloat16, torch.float16):  # rounded once from float sums
                tol = dict(rtol=torch.finfo(dtype).eps / 2 + 1e-6, atol=1e-5)
                xh, wh, bh = x.to(dtype), w.to(dtype), bias.to(dtype)
                got = load()(xh, wh, 0.75, bh).double()
                torch.testing.assert_close(got, by_hand(xh, wh, 0.75, bh), **tol)
                xqh, ah, weight = xq.to(dtype), approx_t.to(dtype), wh.T.contiguous()
                got = load_rotated()(xqh, ah, keep, 4, xh, weight, None).double()
                t = xqh.abs().topk(keep, -1).values[:, -1:]
                approx = (xqh * (xqh.abs() >= t)).double() @ ah.double()
                index = approx.topk(4).indices
                exact = (xh.double() @ wh.double()).gather(-1, index)
                torch.testing.assert_close(got, approx.scatter(-1, index, exact), **tol)
        print("ok")
        """
    )
    env = {
        **os.environ,
        "SPARSE_LIGHTNING_KERNEL_ISA": isa,
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"),
        "PYTHONPATH": os.path.dirname(__file__),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
    assert "-mavx512f" not in result.stdout


# ------------------------------------------------------------- executors on every family
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kernel-checkpoints")
    return {
        model_type: calibrate(
            tiny_model(model_type), loader_of(token_pairs(6)), run_name=model_type, dirpath=folder
        )[2].checkpoint_path
        for model_type in ARCH_TYPES
    }


def decode(model, steps: int = 5) -> torch.Tensor:
    return decode_logits(model, PROMPT, steps)


def masked_reference(model_type: str, kind: str, thresholds: torch.Tensor) -> torch.Tensor:
    """A plain model masked on decode steps by its own hooks (:func:`mask_decode_inputs`)."""
    model = tiny_model(model_type)
    mask_decode_inputs(model, kind, thresholds)
    return decode(model)


@pytest.mark.parametrize("level", [0.5, 0.9])
@pytest.mark.parametrize("kind", CHANNELS)
@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_kernel_decode_equals_the_masked_reference(model_type, kind, level, checkpoints):
    module = SparseActivationModule.from_pretrained(
        tiny_model(model_type), checkpoints[model_type], **{kind: level}
    )
    thresholds = module.sparsifier.selectors[kind].thresholds
    kernel = decode(module.model)
    realized = module.realized_sparsity()[UNIT_KINDS[kind].ratio_key]
    torch.testing.assert_close(
        kernel, masked_reference(model_type, kind, thresholds), rtol=1e-5, atol=1e-6
    )
    assert realized > 0.0  # the decode steps really dropped channels
    assert level > 0.5 or realized < 1.0  # and at 50% kept some
    module.sparsifier.gather = False  # the executor's own masked path agrees too
    torch.testing.assert_close(decode(module.model), kernel, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", CHANNELS)
@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_kernel_at_sparsity_zero_equals_the_plain_model(model_type, kind):
    model = tiny_model(model_type)
    arch = resolve(model)
    zero = DynamicSelector(torch.zeros(arch.num_layers))  # threshold 0 keeps every channel
    sparsifier = Sparsifier(model, arch, {kind: zero})
    got = decode(model)
    assert sparsifier.realized()[kind] == 0.0 and sparsifier.counts[kind] is not None
    torch.testing.assert_close(got, decode(tiny_model(model_type)), rtol=1e-5, atol=1e-6)
    sparsifier.remove()
    assert torch.equal(decode(model), decode(tiny_model(model_type)))  # layout restored


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_prompt_forwards_stay_dense_in_the_decode_phase(model_type, checkpoints):
    """A prompt runs dense, through the transposed weights. From 16 tokens on, MKL's GEMM packs
    the weight whatever its layout and the logits are the plain model's bit for bit; shorter
    prompts take its small-matrix path, whose summation order follows the layout."""
    levels = {"attn_input": 0.5, "mlp_input": 0.5, "head_features": 0.5, "mlp": 0.5}
    module = SparseActivationModule.from_pretrained(
        tiny_model(model_type), checkpoints[model_type], **levels
    )
    g = torch.Generator().manual_seed(4)
    for length, exact in ((24, True), (64, True), (6, False)):
        ids = torch.randint(3, 99, (2, length), generator=g)
        with torch.no_grad():
            prefill = module.model(ids).logits
            plain = tiny_model(model_type)(ids).logits
        if exact:
            assert torch.equal(prefill, plain), length
        else:
            torch.testing.assert_close(prefill, plain, rtol=1e-5, atol=1e-6)
    assert module.realized_sparsity()["mlp_zero_ratio"] == 0.0  # nothing was sparse


def test_a_compiled_decode_step_has_no_graph_break_and_matches_eager():
    model = tiny_model("llama")
    arch = resolve(model)
    selectors = {k: DynamicSelector(torch.full((2,), 0.3)) for k in ("attn_input", "mlp")}
    sparsifier = Sparsifier(model, arch, selectors)
    model.set_attn_implementation("eager")
    eager = static_cache_step(model, model.forward, PROMPT[:, :3])
    assert 0.0 < sparsifier.realized()["attn_input"] < 1.0
    sparsifier.reset_counts()
    # fullgraph: a graph break (the op, the executors, the tallies) would be an error.
    compiled_step = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    compiled = static_cache_step(model, compiled_step, PROMPT[:, :3])
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    # Compiled steps are not counted (counting made compiles several times slower); the
    # eager step before was.
    assert sparsifier.realized()["attn_input"] == 0.0


@pytest.mark.slow
def test_smollm2_greedy_tokens_through_the_kernel_equal_the_masked_reference(smollm2, tmp_path):
    """32 greedy tokens of the real model, every channel kind at 40%, through the kernel equal
    those of a separate copy masked by its own hooks (decode steps only).

    In float64: the kernel's double instantiation runs the same code as its float one, and the
    two paths then agree to ~1e-13, so no channel sitting at its threshold is kept by one and
    dropped by the other. In float32 they agree to ~3e-5 per step, and over 32 steps of
    ~100,000 threshold decisions one such flip is likely (seen at step 8), after which greedy
    text can part.
    """
    import copy

    from conftest import SHARED_DATA
    from torch.utils.data import DataLoader

    from sparse_lightning import QACollator, load_truthfulqa

    model, tokenizer = smollm2
    path = SHARED_DATA / "TruthfulQA.csv"
    if not path.is_file():
        pytest.skip(f"{path} is absent: this test reads the shared data beside the checkout")
    loader = DataLoader(
        load_truthfulqa(path, rows=range(400, 404)), batch_size=4, collate_fn=QACollator(tokenizer)
    )
    _, _, callback = calibrate(model, loader, run_name="kernel", dirpath=tmp_path)
    reference = copy.deepcopy(model).double()
    module = SparseActivationModule.from_pretrained(
        copy.deepcopy(model).double(),
        callback.checkpoint_path,
        tokenizer=tokenizer,
        **dict.fromkeys(CHANNELS, 0.4),
    )
    for kind in CHANNELS:
        mask_decode_inputs(reference, kind, module.sparsifier.selectors[kind].thresholds)
    ids = tokenizer("The three primary colors are", return_tensors="pt")

    def greedy(m) -> list[int]:
        with torch.no_grad():
            out = m.generate(**ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        return out[0, ids["input_ids"].shape[1] :].tolist()

    kernel = greedy(module.model)
    report = module.realized_sparsity()
    assert kernel == greedy(reference)
    assert 0.2 < report["attn_input_zero_ratio"] < 0.8
    assert report["decode_bytes_skipped"] > 0.2
