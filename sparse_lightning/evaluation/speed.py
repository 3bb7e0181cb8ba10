"""Measured decode speed: batch-1 greedy decode of a sparse model against a dense copy.

What a user's machine really gives, beside the fidelity metrics: the sweep (and the CLI) time
each setting's decode against a separate plain copy of the model, alternating the two within
each repetition so that a slow spell hits both, and report the median of per-repetition
ratios. A run's time splits at the prompt's forward: the decode steps after it are what
sparsity speeds up (the prompt runs dense), and decode tokens/s counts them alone, as
llama.cpp's ``tg`` and TEAL's decode speeds do; the end-to-end time is reported beside it.

Example:
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> model = AutoModelForCausalLM.from_config(LlamaConfig(
    ...     vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2))
    >>> run = greedy_decode(model, torch.tensor([[5, 9, 17]]), new_tokens=4)
    >>> speed = paired_decode(run, run, repeats=2, new_tokens=4)
    >>> speed["decode_speedup"] > 0 and run.decode_s < run.total_s
    True
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


class DecodeRun:
    """A batch-1 decode closure that also reports where its time went.

    ``steps(stamps)`` runs the decode and appends ``time.perf_counter()`` once right after the
    prompt's forward and again after the last decode step; a call returns what ``steps``
    returns and sets ``total_s``, ``prefill_s`` and ``decode_s`` (the decode steps alone).
    """

    def __init__(self, steps: Callable[[list[float]], torch.Tensor]) -> None:
        self.steps = steps
        self.stamps: list[float] = []
        self.total_s = self.prefill_s = self.decode_s = float("nan")

    def __call__(self) -> torch.Tensor:
        self.stamps = stamps = [time.perf_counter()]
        out = self.steps(stamps)
        end = time.perf_counter()
        self.total_s = end - stamps[0]
        self.prefill_s = stamps[1] - stamps[0]
        self.decode_s = stamps[-1] - stamps[1]
        return out


class _Stamp:
    """A logits processor that only notes when ``generate`` produced each token's logits."""

    def __init__(self, stamps: list[float]) -> None:
        self.stamps = stamps

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores


def greedy_decode(
    model, prompt: torch.Tensor, new_tokens: int, compiled: bool = False
) -> DecodeRun:
    """A :class:`DecodeRun` of batch-1 greedy ``generate`` of exactly ``new_tokens``; returns
    the logits.

    ``compiled=True`` is transformers' own compiled decoding: a static KV cache and the decode
    step through ``torch.compile`` (prefill stays eager). transformers does this by itself on
    GPUs only; ``_compile_all_devices`` is its switch for CPUs. The first call compiles.
    """
    from transformers import CompileConfig

    extra: dict[str, object] = {}
    if compiled:
        config = CompileConfig(mode="default")
        config._compile_all_devices = True
        extra = {"cache_implementation": "static", "compile_config": config}

    def steps(stamps: list[float]) -> torch.Tensor:
        from transformers import LogitsProcessorList

        clock = LogitsProcessorList([_Stamp(stamps)])
        with torch.no_grad():
            out = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
                logits_processor=clock,
                **extra,
            )
        # Keep the first stamp (after the prompt's forward) and the last (after the last step).
        del stamps[2:-1]
        return torch.cat(out.logits)

    return DecodeRun(steps)


def paired_ratio(
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    repeats: int,
    prepare: tuple[Callable[[], object], Callable[[], object]] | None = None,
) -> tuple[float, float, float]:
    """Median of baseline/candidate time ratios timed back to back, and both median times.

    Alternating the two within each repetition lets a slow spell on a shared machine hit
    both sides. ``prepare`` (untimed) runs before each side, e.g. to switch a mode on or off.
    """
    base, cand = _alternate(baseline, candidate, repeats, prepare)
    return _median_ratio([t for t, _ in base], [t for t, _ in cand])


def paired_decode(
    baseline: DecodeRun, candidate: DecodeRun, repeats: int, new_tokens: int
) -> dict[str, float]:
    """Decode tokens/s of two :class:`DecodeRun` s, alternated as in :func:`paired_ratio`.

    Returns:
        ``decode_speedup`` with ``dense_decode_tokens_per_s`` and ``decode_tokens_per_s`` (the
        ``new_tokens - 1`` decode steps after the prompt's forward), and ``speedup`` with
        ``dense_tokens_per_s`` and ``tokens_per_s`` (whole runs, the dense prompt included).
    """
    check_decode_tokens(new_tokens)
    return decode_ratios(*_alternate(baseline, candidate, repeats), new_tokens)


def check_decode_tokens(new_tokens: int) -> None:
    """Decode speed times the steps after the first token (the prompt's): at least 2, checked
    before any timing."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens}: decode speed needs at least 2 new tokens.")


def decode_ratios(
    base: list[tuple[float, float]], cand: list[tuple[float, float]], new_tokens: int
) -> dict[str, float]:
    """What :func:`paired_decode` returns, from each side's ``(total, decode)`` seconds per
    repetition (the repetitions paired in order)."""
    speedup, base_s, cand_s = _median_ratio([t for t, _ in base], [t for t, _ in cand])
    decode, base_d, cand_d = _median_ratio([d for _, d in base], [d for _, d in cand])
    return {
        "decode_speedup": decode,
        "dense_decode_tokens_per_s": (new_tokens - 1) / base_d,
        "decode_tokens_per_s": (new_tokens - 1) / cand_d,
        "speedup": speedup,
        "dense_tokens_per_s": new_tokens / base_s,
        "tokens_per_s": new_tokens / cand_s,
    }


def decode_speed(paired: tuple[float, float, float], new_tokens: int) -> dict[str, float]:
    """Tokens/s of both sides and the speedup, from a :func:`paired_ratio` of two decodes."""
    speedup, baseline_s, candidate_s = paired
    return {
        "dense_tokens_per_s": new_tokens / baseline_s,
        "tokens_per_s": new_tokens / candidate_s,
        "speedup": speedup,
    }


def decode_speeds(
    module,
    settings: list,
    prompt: torch.Tensor,
    new_tokens: int = 32,
    repeats: int = 3,
) -> list[dict[str, float]]:
    """Each setting's batch-1 eager ``generate`` against a plain copy of the model.

    Args:
        module: a :class:`~sparse_lightning.SparseActivationModule` (its sparsity comes back
            as it was).
        settings: :class:`~sparse_lightning.selection.SparsityConfig` objects.
        prompt: ``(1, P)`` prompt token ids.
        new_tokens: greedy tokens per decode (at least 2: the first comes from the prompt's
            forward, the rest are the decode steps timed).
        repeats: paired repetitions per setting.

    Returns:
        Per setting what :func:`paired_decode` returns: decode-step tokens/s of both sides
        and their ratio, and the end-to-end ones (the dense prompt included).
    """
    import copy

    restore = module.sparsity
    module.disable_sparsity()
    dense = copy.deepcopy(module.model)  # a separate plain model: nothing switches while timed
    baseline = greedy_decode(dense, prompt, new_tokens)
    out = []
    try:
        for setting in settings:
            module.set_sparsity(setting)
            candidate = greedy_decode(module.model, prompt, new_tokens)
            out.append(paired_decode(baseline, candidate, repeats, new_tokens))
    finally:
        module.set_sparsity(restore)
    return out


def _alternate(
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    repeats: int,
    prepare: tuple[Callable[[], object], Callable[[], object]] | None = None,
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Each side's ``(total, decode)`` seconds per repetition, the sides back to back (decode:
    a :class:`DecodeRun`'s own split, else the total)."""
    sides: tuple[tuple[Callable[[], object], list], ...] = ((baseline, []), (candidate, []))
    before = prepare or (lambda: None, lambda: None)
    for (run, _), setup in zip(sides, before, strict=True):
        setup()
        run()  # warm-up
    for _ in range(repeats):
        for (run, times), setup in zip(sides, before, strict=True):
            setup()
            start = time.perf_counter()
            run()
            total = time.perf_counter() - start
            times.append((total, run.decode_s if isinstance(run, DecodeRun) else total))
    return sides[0][1], sides[1][1]


def _median_ratio(base: list[float], cand: list[float]) -> tuple[float, float, float]:
    ratios = [b / c for b, c in zip(base, cand, strict=True)]
    return statistics.median(ratios), statistics.median(base), statistics.median(cand)
