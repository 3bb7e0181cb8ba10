"""Decode timing: the split at the prompt's forward, and the paired decode speeds."""

from __future__ import annotations

import contextlib
import time
from types import SimpleNamespace

import pytest
import torch

from sparse_lightning.evaluation.speed import greedy_decode, paired_decode
from tests.conftest import tiny_model


def test_greedy_decode_splits_after_the_prompts_forward():
    """The stamps fall right after the first forward (the prompt's) and after the last one."""
    model = tiny_model("llama")
    entered: list[float] = []
    forward = model.forward

    def counted(*args, **kwargs):
        entered.append(time.perf_counter())
        return forward(*args, **kwargs)

    model.forward = counted
    run = greedy_decode(model, torch.tensor([[5, 9, 17, 3]]), new_tokens=5)
    run()
    assert len(entered) == 5  # one prompt forward, then four decode steps
    start, after_prompt, after_last = run.stamps
    assert start < entered[0] < after_prompt < entered[1]
    assert after_last > entered[-1]
    assert run.prefill_s == pytest.approx(after_prompt - start)
    assert run.decode_s == pytest.approx(after_last - after_prompt)
    assert 0 < run.decode_s < run.total_s


def test_paired_decode_reports_both_ratios_and_needs_two_tokens():
    model = tiny_model("llama")
    prompt = torch.tensor([[5, 9, 17]])
    slow_model = tiny_model("llama")
    forward = slow_model.forward

    def slow(*args, **kwargs):  # every forward 20 ms slower
        time.sleep(0.02)
        return forward(*args, **kwargs)

    slow_model.forward = slow
    fast, slow_run = greedy_decode(model, prompt, 5), greedy_decode(slow_model, prompt, 5)
    speed = paired_decode(slow_run, fast, repeats=3, new_tokens=5)
    assert speed["decode_speedup"] > 1.5 and speed["speedup"] > 1.5
    with pytest.raises(ValueError, match="at least 2 new tokens"):
        paired_decode(fast, fast, repeats=1, new_tokens=1)


class _FakeDecode:
    """Stands in for a TunedDecode: steps that sleep, and a log of who ran when."""

    def __init__(self, name: str, step_s: float, log: list[str], new_tokens: int = 5) -> None:
        self.name, self.step_s, self.log, self.new_tokens = name, step_s, log, new_tokens

    def __call__(self):
        self.log.append(f"{self.name} run")

    def running(self):
        return contextlib.nullcontext()

    def positions(self) -> range:
        return range(3, 3 + self.new_tokens - 1)

    def prefill(self) -> int:
        self.log.append(f"{self.name} prefill")
        return 0

    def step(self, token: int, position: int) -> int:
        self.log.append(f"{self.name} {position}")
        time.sleep(self.step_s)
        return token + 1


def test_interleaved_decode_alternates_steps_and_times_each_side():
    from benchmarks.common import interleaved_decode

    log: list[str] = []
    slow, fast = _FakeDecode("slow", 0.004, log), _FakeDecode("fast", 0.002, log)
    speed = interleaved_decode(slow, fast, repeats=2)
    assert 1.5 < speed["decode_speedup"] < 2.5
    assert speed["dense_decode_tokens_per_s"] == pytest.approx(1 / 0.004, rel=0.5)
    one_repeat = log[2 : 2 + 2 + 8]  # after the two warm-up runs: two prompts, 4 x 2 steps
    assert one_repeat == [
        "slow prefill", "fast prefill",
        "slow 3", "fast 3", "fast 4", "slow 4", "slow 5", "fast 5", "fast 6", "slow 6",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="same prompt length"):
        interleaved_decode(slow, _FakeDecode("other", 0.0, log, new_tokens=3), repeats=1)
    with pytest.raises(ValueError, match="at least 2 new tokens"):
        one = [_FakeDecode(name, 0.0, log, new_tokens=1) for name in ("a", "b")]
        interleaved_decode(*one, repeats=1)


def test_next_token_step_is_the_argmax_of_the_models_step():
    """The tuned loop's step function against the model's own forward over a static cache."""
    from benchmarks.common import next_token_step
    from tests.conftest import static_cache_step

    model = tiny_model("llama")
    prompt = torch.tensor([[5, 9, 17, 3]])
    logits = static_cache_step(model, model.forward, prompt)
    step = next_token_step(model)
    assert step.__code__ is not next_token_step(model).__code__  # a Dynamo cache per model

    def as_logits(input_ids, cache_position, position_ids, **cache):
        (cache,) = cache.values()  # under the keyword this transformers takes
        # static_cache_step reads .logits of what the step returns
        return SimpleNamespace(logits=step(input_ids, cache, cache_position, position_ids))

    token = static_cache_step(model, as_logits, prompt)
    assert token.shape == (1, 1) and token.item() == logits[0, -1].argmax().item()


def test_without_dynamo_calls_the_compiled_code_and_skips_its_guards():
    from torch._dynamo.utils import counters

    from benchmarks.common import own_code, without_dynamo

    def double_sin(x):
        return torch.sin(x) * 2

    assert without_dynamo(double_sin) is double_sin  # not compiled: itself
    compiled = torch.compile(own_code(double_sin), backend="eager", dynamic=False)
    x = torch.arange(4.0)
    compiled(x)
    direct = without_dynamo(compiled)
    assert direct is not compiled
    frames = counters["frames"]["total"]
    other = torch.arange(6.0, dtype=torch.float64)  # fails the guards: Dynamo would recompile
    torch.testing.assert_close(direct(other), torch.sin(other) * 2)
    assert counters["frames"]["total"] == frames
    compiled(other)
    assert counters["frames"]["total"] == frames + 1


def test_kernel_speeds_graphs_run_without_dynamo_and_keep_their_thresholds():
    """``kernel_speed.tuned``: the compiled projections, called without Dynamo, give each copy's
    masked product (against ``F.linear`` of the input with the dropped channels zeroed), and
    inputs that fail its guards run the compiled code without a new frame."""
    from torch._dynamo.utils import counters

    from benchmarks.kernel_speed import SparseProjections, inputs_keeping, tuned
    from sparse_lightning.kernels import compiled

    assert compiled(), "g++ and ninja are on every machine of this project (ENVIRONMENT.md)"
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(24, 32, generator=g) for _ in range(3)]
    xs = [torch.randn(1, 32, generator=g) for _ in range(3)]
    run = tuned(SparseProjections(weights, 1.0), xs)
    frames = counters["frames"]["total"]
    # Inputs that need grad fail the compiled entry's guards: through Dynamo they recompile.
    halves = [x.requires_grad_() for x in inputs_keeping(xs, 0.5)]
    outputs = run(halves)
    assert counters["frames"]["total"] == frames
    for x, w, y in zip(halves, weights, outputs, strict=True):
        assert int((x.abs() >= 1.0).sum()) == 16
        torch.testing.assert_close(y, torch.nn.functional.linear(x * (x.abs() >= 1.0), w))


def test_by_speed_ranks_repetitions_by_the_baselines_time():
    from benchmarks.kernel_rows import by_speed

    # Ranked by seconds the repetitions are 1, 2, 0 | 5, 4, 3 | ...: thirds of two each.
    seconds = [3.0, 1.0, 2.0, 6.0, 5.0, 4.0]
    ratios = [0.3, 0.1, 0.2, 0.6, 0.5, 0.4]
    assert by_speed(seconds, ratios) == pytest.approx({"fast": 0.15, "middle": 0.35, "slow": 0.55})
    # Fewer than three repetitions: the thirds overlap instead of going empty.
    assert by_speed([2.0, 1.0], [0.2, 0.1]) == pytest.approx({"fast": 0.1, "slow": 0.2})


def test_placement_groups_runs_by_the_hand_over_time():
    from benchmarks.placement import summarize

    def run(handover, dense, sparse):
        return {
            "handover_ns": handover,
            "read_gbs_1_thread": 20.0,
            "read_gbs_2_threads": 30.0 if handover > 100 else 25.0,
            "dense_ms_per_step": dense,
            "sparse_ms_per_step": sparse,
            "decode_speedup": dense / sparse,
        }

    runs = [run(30, 20.0, 15.0), run(160, 14.0, 12.0), run(40, 21.0, 15.0), run(28, 19.0, 15.0)]
    near, far = summarize(runs, far_ns=100)
    assert (near["placement"], near["runs"], far["placement"], far["runs"]) == (
        "one die",
        3,
        "two dies",
        1,
    )
    assert near["handover_ns"] == 30 and near["read_gbs_2_threads"] == 25.0
    assert near["dense_ms_per_step"] == 20.0 and near["sparse_ms_per_step"] == 15.0
    assert near["decode_speedup"] == pytest.approx(20 / 15)
    assert near["decode_speedup_range"] == pytest.approx([19 / 15, 21 / 15])
    assert far["decode_speedup"] == pytest.approx(14 / 12) and far["read_gbs_2_threads"] == 30.0
    assert summarize(runs[:1], far_ns=100)[0]["placement"] == "one die"  # no empty group
    assert len(summarize(runs[:1], far_ns=100)) == 1
