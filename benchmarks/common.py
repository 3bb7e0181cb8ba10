"""Helpers shared by the benchmark scripts: machine description and JSON output."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import platform
import statistics
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

# The timers live in the library (the sweep measures decode speed too); re-exported here.
from sparse_lightning.evaluation.speed import (  # noqa: F401
    DecodeRun,
    check_decode_tokens,
    decode_ratios,
    decode_speed,
    greedy_decode,
    paired_decode,
    paired_ratio,
)

#: The shared TruthfulQA CSV beside the checkout.
TRUTHFULQA = Path(__file__).resolve().parents[2] / "shared" / "data" / "TruthfulQA.csv"
#: Where the speed benchmarks keep the checkpoint their static masks come from, and its rows.
STATIC_CHECKPOINT = (
    Path(__file__).resolve().parents[1]
    / "checkpoints"
    / "smollm2-truthfulqa-static-bench.safetensors"
)
STATIC_ROWS = range(400, 432)


#: The types the benchmarks with ``--dtype`` run a model in.
DTYPES = ("float32", "bfloat16")


def dtype_suffix(dtype: str) -> str:
    """What a default output name gains for a model type: nothing for float32, ``_<dtype>``
    for another, so that a run in one type never overwrites the other's results."""
    return "" if dtype == "float32" else f"_{dtype}"


def results_path(benchmark: str, model: str = "smollm2", dtype: str = "float32") -> Path:
    """Where ``benchmark`` saves its report for ``model`` in ``dtype`` by default: SmolLM2's
    float32 one at ``benchmarks/results/<benchmark>.json``, another model's with ``_<model>``
    added, then :func:`dtype_suffix`."""
    suffix = ("" if model == "smollm2" else f"_{model}") + dtype_suffix(dtype)
    return Path(__file__).resolve().parent / "results" / f"{benchmark}{suffix}.json"


def frontier_checkpoint_path(key: str, calib: range = range(400, 800)) -> Path:
    """Where the frontier keeps model ``key``'s checkpoint calibrated on TruthfulQA ``calib``."""
    name = f"{key}-frontier-{calib.start}-{calib.stop}.safetensors"
    return Path(__file__).resolve().parents[1] / "checkpoints" / name


def frontier_checkpoint(key: str, allocation: str):
    """Model ``key``'s model and tokenizer, and the frontier's checkpoint of it (calibrated on
    TruthfulQA 400-799 when missing, with ``allocation``'s table unless it is uniform)."""
    from benchmarks.frontier import MODELS

    _, load = MODELS[key]
    model, tokenizer = load()
    path = frontier_checkpoint_path(key)
    measured = () if allocation == "uniform" else (allocation,)
    calibrated_checkpoint(model, tokenizer, range(400, 800), path, allocations=measured)
    return model, tokenizer, path


def calibrated_checkpoint(
    model,
    tokenizer,
    rows: range,
    path: Path,
    batch_size: int = 8,
    allocations: tuple[str, ...] = (),
    allocation_batches: int = 2,
) -> Path:
    """``path`` once it holds a checkpoint calibrated on TruthfulQA ``rows`` with the measured
    ``allocations``: calibrates if there is none, then measures the tables it lacks.

    Dense greedy answers (32 tokens), every unit kind, no IG: the library's defaults. The
    allocation search runs on the first ``allocation_batches`` calibration batches, after the
    statistics are saved (so a new search reuses the calibration).
    """
    import itertools

    import lightning as L
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader

    from sparse_lightning import (
        AttributionCalibration,
        QACollator,
        SparseActivationModule,
        load_truthfulqa,
    )
    from sparse_lightning.checkpoint import CheckpointError, read_metadata, save_statistics

    questions = load_truthfulqa(TRUTHFULQA, rows=rows)
    loader = DataLoader(questions, batch_size=batch_size, collate_fn=QACollator(tokenizer))
    module = SparseActivationModule(model, tokenizer, targets="dense", max_new_tokens=32)
    try:
        read_metadata(path)
    except CheckpointError:
        print(f"calibrating on TruthfulQA rows {rows.start}-{rows.stop - 1} -> {path}")
        callback = AttributionCalibration(
            run_name=path.stem,
            dirpath=path.parent,
            dataset=f"TruthfulQA rows {rows.start}-{rows.stop - 1}",
        )
        L.Trainer(accelerator="cpu", callbacks=[callback], logger=False).validate(module, loader)
    stored = load_file(str(path))
    missing = [m for m in allocations if f"allocation.{m}.levels" not in stored]
    if missing:
        print(f"searching allocations {missing} on {allocation_batches} calibration batches")
        module.load_statistics(path)
        batches = [module.prepare_batch(b) for b in itertools.islice(loader, allocation_batches)]
        module.search_allocations(batches, methods=missing)
        save_statistics(module.statistics, path)
    return path


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def linear_macs(model: torch.nn.Module) -> int:
    """Multiply-adds per token of every linear layer, lm_head included (the package's count)."""
    from sparse_lightning import resolve
    from sparse_lightning.inference import linear_macs_per_token

    return linear_macs_per_token(resolve(model))["total"]


#: Inductor options for batch-1 CPU decode. ``freezing`` treats the weights as constants, so
#: ``cpp.enable_concat_linear`` can fuse the linears that read the same input (q/k/v, gate/up)
#: into one GEMM, and ``max_autotune`` with the CPP backend generates a GEMM kernel for each
#: weight shape instead of calling a generic BLAS routine: fewer, better-fitted calls per
#: token, which is what small matrix-vector products need. ``cpp_wrapper`` calls the step's
#: kernels (the sparse custom op included) from generated C++ instead of Python: measured on
#: SmolLM2 at budget 0.20, 1.02x faster dense and 1.07x faster input-sparse steps
#: (docs/performance.md).
CPU_DECODE_OPTIONS = {
    "freezing": True,
    "cpp.enable_concat_linear": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "ATEN,CPP",
    "cpp_wrapper": True,
}


#: What a report says of :class:`TunedDecode`'s loop, which changed on 2026-12-07 (reports
#: without it timed the step through Dynamo, with an eager argmax and the prompt's logits
#: through ``logits_to_keep=1``).
TUNED_LOOP = "argmax compiled into the step; steps called without Dynamo once warm"


def decode_options() -> dict:
    """``CPU_DECODE_OPTIONS`` plus the kernel's C entry points
    (:func:`sparse_lightning.kernels.inductor_options`), which only the sparse steps call."""
    from sparse_lightning.kernels import inductor_options

    return {**CPU_DECODE_OPTIONS, **inductor_options()}


def decode_options_record() -> dict:
    """:func:`decode_options` as a report records it: the ops called as C functions by name."""
    from sparse_lightning.kernels import inductor_options
    from sparse_lightning.kernels.ops import C_SHIMS

    return {**CPU_DECODE_OPTIONS, "c_shims": sorted(C_SHIMS) if inductor_options() else []}


class TunedDecode(DecodeRun):
    """Batch-1 greedy decode of ``new_tokens`` in a plain loop (a :class:`DecodeRun` returning
    the ids), the best dense decode we have.

    The prefill is eager; each decode step is :func:`next_token_step` (``model.forward`` and
    the argmax) compiled with ``CPU_DECODE_OPTIONS`` over a static KV cache, with eager
    (matmul) attention so the attention also compiles into the step. After the first call
    (which compiles, through Dynamo) the steps call the compiled code directly
    (:func:`without_dynamo`, checked once to give the same tokens): the shapes never change,
    so Dynamo's per-call cache lookup is pure overhead. Switches ``model`` to eager attention.
    :meth:`prefill` and :meth:`step` let :func:`interleaved_decode` alternate two decodes
    token by token.
    """

    def __init__(self, model, prompt: torch.Tensor, new_tokens: int) -> None:
        from transformers import StaticCache

        model.set_attn_implementation("eager")
        self.model, self.prompt, self.new_tokens = model, prompt, new_tokens
        self.compiled = torch.compile(next_token_step(model), dynamic=False)
        self.cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens)
        self.cache_kwargs = cache_kwargs(model, self.cache)  # reset in place, never replaced
        self.warm = False
        self.replay: Callable | None = None  # the compiled step without Dynamo, once warm
        super().__init__(self._run)

    @contextlib.contextmanager
    def running(self):
        """No grad, guards skipped once warm, and the first (compiling) call under
        ``CPU_DECODE_OPTIONS``: ``torch.compile(options=...)`` does not pass max_autotune's
        GEMM templates on (the steps then still call aten::mm)."""
        from torch._inductor import config as inductor_config

        stance = torch.compiler.set_stance("default", skip_guard_eval_unsafe=self.warm)
        options = contextlib.nullcontext() if self.warm else inductor_config.patch(decode_options())
        with torch.no_grad(), stance, options:
            yield
        self.warm = True

    def positions(self) -> range:
        """The cache positions of the decode steps."""
        length = self.prompt.shape[1]
        return range(length, length + self.new_tokens - 1)

    def prefill(self) -> torch.Tensor:
        """Empty the cache and run the prompt; returns the first new token."""
        self.cache.reset()
        length = self.prompt.shape[1]
        out = self.model(
            input_ids=self.prompt,
            **self.cache_kwargs,
            cache_position=torch.arange(length),
            # The last position as an index, not logits_to_keep=1: that slice keeps the
            # prompt's stride on a size-1 dimension, so matmul does not fold it into mm, and
            # the bmm it takes instead copies the whole lm_head weight transposed, which in
            # bfloat16 took 90 of a 140 ms prompt on SmolLM2 (torch 2.13, pytorch#186148).
            logits_to_keep=torch.tensor([length - 1]),
        )
        return out.logits[:, -1:].argmax(-1)

    def step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """One compiled decode step: ``token`` at ``position``; returns the next token."""
        where = torch.tensor([position])
        return (self.replay or self.compiled)(token, self.cache, where, where[None])

    def _run(self, stamps: list[float]) -> torch.Tensor:
        with self.running():
            tokens = [self.prefill()]
            stamps.append(time.perf_counter())
            for position in self.positions():
                tokens.append(self.step(tokens[-1], position))
            stamps.append(time.perf_counter())
        tokens = torch.cat(tokens, dim=1)
        if self.replay is None:  # the first run compiled the step through Dynamo
            self.replay = without_dynamo(self.compiled)
            if not torch.equal(self._run([]), tokens):
                raise RuntimeError(
                    "The compiled decode step called without Dynamo gave other tokens than "
                    "through it: benchmarks.common.without_dynamo does not fit this torch."
                )
        return tokens


def tuned_decode(model, prompt: torch.Tensor, new_tokens: int) -> TunedDecode:
    """The tuned decode of ``model`` (see :class:`TunedDecode`)."""
    return TunedDecode(model, prompt, new_tokens)


def interleaved_decode(
    baseline: TunedDecode, candidate: TunedDecode, repeats: int
) -> dict[str, float]:
    """What :func:`paired_decode` returns, with the two decodes alternated token by token.

    A shared machine's memory bandwidth drifts over seconds; alternating whole 32-token runs
    (2-3 s each for Qwen 0.5B) lets a drift hit one side only, while alternating single steps
    (about 50 ms) puts both sides in the same spell. Each repetition runs both prompts, then
    each position's two steps, the order switching at every position.
    """
    if baseline.positions() != candidate.positions():
        raise ValueError("interleaved_decode needs the same prompt length and new tokens.")
    check_decode_tokens(baseline.new_tokens)
    for run in (baseline, candidate):
        run()  # compiles on first use
    sides = (baseline, candidate)
    times: tuple[list, list] = ([], [])
    for _ in range(repeats):
        spent = [[0.0, 0.0], [0.0, 0.0]]  # per side: prompt, decode steps
        tokens = [None, None]
        with baseline.running(), candidate.running():
            for side in (0, 1):
                start = time.perf_counter()
                tokens[side] = sides[side].prefill()
                spent[side][0] += time.perf_counter() - start
            for k, position in enumerate(baseline.positions()):
                for side in (k % 2, 1 - k % 2):
                    start = time.perf_counter()
                    tokens[side] = sides[side].step(tokens[side], position)
                    spent[side][1] += time.perf_counter() - start
        for side in (0, 1):
            times[side].append((sum(spent[side]), spent[side][1]))
    return decode_ratios(*times, baseline.new_tokens)


def own_forward(model) -> Callable:
    """``model.forward`` through a code object of its own.

    Dynamo keeps compiled entries per code object, so two models of one class (a dense one and
    a sparse one, or two compacted ones of equal shapes) would share entries; with guards
    skipped once warm, one could run the other's frozen weights. A copied code object gives
    each model its own cache.
    """
    return types.MethodType(own_code(model.forward.__func__), model)


def cache_kwargs(model, cache) -> dict:
    """``cache`` under the keyword ``model.forward`` takes a KV cache by: ``cache`` since
    transformers 5.25 (where ``past_key_values`` warns that it goes in 5.40), else
    ``past_key_values``. The tests pass caches through it too."""
    parameters = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in parameters else "past_key_values": cache}


def without_dynamo(compiled: Callable) -> Callable:
    """The code Dynamo compiled ``compiled`` (a ``torch.compile`` d function, called once)
    into, as a plain function: it unpacks the arguments and calls the compiled graph, without
    Dynamo's frame hook and cache lookup (0.3-0.55 ms a token on SmolLM2 even with guards
    skipped, 2026-12-07). No guard runs, so it suits a loop whose inputs never change shape,
    like ``skip_guard_eval_unsafe``. ``compiled`` itself when that code is not to be had (a
    torch without the debug accessor, or not exactly one compiled entry).
    """
    original = getattr(compiled, "_torchdynamo_orig_callable", None)
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        entries = _debug_get_cache_entry_list(original.__code__)
    except (ImportError, AttributeError):
        return compiled
    if len(entries) != 1:
        return compiled
    return types.FunctionType(
        entries[0].code,
        original.__globals__,
        original.__name__,
        original.__defaults__,
        original.__closure__,
    )


def own_code(function: Callable) -> Callable:
    """``function`` with a copy of its code object (a Dynamo cache of its own)."""
    own = types.FunctionType(
        function.__code__.replace(),
        function.__globals__,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    own.__kwdefaults__ = function.__kwdefaults__
    own.__dict__.update(function.__dict__)  # __wrapped__ and the like, for signatures
    return own


def next_token_step(model) -> Callable:
    """One greedy decode step of ``model`` as one function to compile: ``(token, cache,
    cache_position, position_ids) -> next token``. The argmax compiles into the step: eager,
    over a bfloat16 vocabulary, it took 0.27 ms a token (SmolLM2, 2026-12-07), about 3% of a
    tuned step. Its own code object, like :func:`own_forward`'s."""
    forward = own_forward(model)
    keyword = next(iter(cache_kwargs(model, None)))

    def next_token(input_ids, cache, cache_position, position_ids):
        out = forward(
            input_ids=input_ids,
            **{keyword: cache},
            cache_position=cache_position,
            position_ids=position_ids,
            logits_to_keep=1,
        )
        return out.logits[:, -1:].argmax(-1)

    return own_code(next_token)


def machine_info() -> dict[str, object]:
    """What the numbers were measured on. A virtual machine's "model name" can be as vague as
    "AMD EPYC", so the CPU family and model numbers (which tell its generation) go beside it."""
    import transformers

    cpu = platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": fields.get("model name", cpu),
        "cpu_family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def save_report(report: dict, path: Path) -> dict:
    """Write ``report`` as JSON to ``path``, stamped with the date and :func:`machine_info`
    (after its ``benchmark`` name), so that every saved figure says where it was measured;
    returns the stamped report."""
    stamped = {
        "benchmark": report.get("benchmark"),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(),
        **report,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamped, indent=2))
    print(f"saved {path}")
    return stamped
