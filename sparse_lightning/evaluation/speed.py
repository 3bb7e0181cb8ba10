"""Measured decode speed: batch-1 greedy decode of a sparse model against a dense copy.

What a user's machine really gives, beside the fidelity metrics: the sweep (and the CLI) time
each setting's decode against a separate plain copy of the model, alternating the two within
each repetition so that a slow spell hits both, and report the median of per-repetition
ratios.

Example:
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> model = AutoModelForCausalLM.from_config(LlamaConfig(
    ...     vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2))
    >>> run = greedy_decode(model, torch.tensor([[5, 9, 17]]), new_tokens=4)
    >>> speedup, _, _ = paired_ratio(run, run, repeats=2)
    >>> speedup > 0
    True
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def greedy_decode(
    model, prompt: torch.Tensor, new_tokens: int, compiled: bool = False
) -> Callable[[], torch.Tensor]:
    """A closure running batch-1 greedy ``generate`` of exactly ``new_tokens``; returns logits.

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

    def run() -> torch.Tensor:
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
                **extra,
            )
        return torch.cat(out.logits)

    return run


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
    sides = ((baseline, []), (candidate, []))
    before = prepare or (lambda: None, lambda: None)
    for (run, _), setup in zip(sides, before, strict=True):
        setup()
        run()  # warm-up
    for _ in range(repeats):
        for (run, times), setup in zip(sides, before, strict=True):
            setup()
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    base, cand = sides[0][1], sides[1][1]
    ratios = [b / c for b, c in zip(base, cand, strict=True)]
    return statistics.median(ratios), statistics.median(base), statistics.median(cand)


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
        new_tokens: greedy tokens per decode (the prompt's prefill included in the time).
        repeats: paired repetitions per setting.

    Returns:
        Per setting ``dense_tokens_per_s``, ``tokens_per_s`` and ``speedup``.
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
            out.append(decode_speed(paired_ratio(baseline, candidate, repeats), new_tokens))
    finally:
        module.set_sparsity(restore)
    return out
