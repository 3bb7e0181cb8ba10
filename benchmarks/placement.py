"""Where a virtual machine's two CPUs sit, and what it does to the sparse decode's speedup.

On the project's Zen 4 machine (a 2-vCPU guest of an AMD EPYC host) the tuned dense decode of
SmolLM2 ran at two speeds that took turns every few minutes (docs/performance.md, "The two
spells"), and the input-sparse decode's ratio over it with them. This benchmark tests the
explanation that the host places the two vCPUs either on one die (CCD: a shared L3 cache and
one link to memory) or on two (a link each, and cache lines handed over between the dies).
For ``--minutes`` it alternates

* a probe: the one-way time of a cache line handed between two threads pinned to CPUs 0 and 1
  (``benchmarks/csrc/core_probe.cpp``), and the rate of a plain read (``torch.sum``) of 256 MB
  with one thread and with two;
* the tuned decode of ``--model``: dense against the input-sparse setting (``--budget``,
  ``--allocation``, ``--lm-head``), steps interleaved (``interleaved_decode``, 3 repetitions).

Runs are grouped by the hand-over time (``--far-ns``: above it, the CPUs are taken to share no
cache) and the table gives each group's hand-over, read rates, dense step and ratio.

    python benchmarks/placement.py [--model smollm2] [--minutes 20] [--budget 0.2 \
        --allocation greedy --lm-head 0.8] [--dtype bfloat16]

Prints a table and writes benchmarks/results/placement.json (``placement_<model>.json`` for
another model, ``_bfloat16`` added in bfloat16).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    DTYPES,
    frontier_checkpoint,
    interleaved_decode,
    results_path,
    save_report,
    tuned_decode,
)

SOURCE = ROOT / "benchmarks" / "csrc" / "core_probe.cpp"


def read_gbs(buffer: torch.Tensor, threads: int) -> float:
    """GB/s of one ``torch.sum`` over ``buffer`` with ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        buffer.sum()
        return buffer.numel() * buffer.element_size() / (time.perf_counter() - start) / 1e9
    finally:
        torch.set_num_threads(before)


def probe(ext, buffer: torch.Tensor) -> dict[str, float]:
    """The hand-over time (median of three) and the read rates, measured now."""
    handover = statistics.median(ext.handover_ns(0, 1, 100_000) for _ in range(3))
    return {
        "handover_ns": handover,
        "read_gbs_1_thread": read_gbs(buffer, 1),
        "read_gbs_2_threads": read_gbs(buffer, 2),
    }


def summarize(runs: list[dict], far_ns: float) -> list[dict]:
    """One row per placement: medians and ranges of the runs whose hand-over is above or at
    most ``far_ns``."""
    groups = []
    for name, keep in (("one die", lambda r: r <= far_ns), ("two dies", lambda r: r > far_ns)):
        group = [run for run in runs if keep(run["handover_ns"])]
        if not group:
            continue

        def med(key, rows=group):
            return statistics.median(row[key] for row in rows)

        ratios = [run["decode_speedup"] for run in group]
        groups.append(
            {
                "placement": name,
                "runs": len(group),
                "handover_ns": med("handover_ns"),
                "read_gbs_1_thread": med("read_gbs_1_thread"),
                "read_gbs_2_threads": med("read_gbs_2_threads"),
                "dense_ms_per_step": med("dense_ms_per_step"),
                "sparse_ms_per_step": med("sparse_ms_per_step"),
                "decode_speedup": statistics.median(ratios),
                "decode_speedup_range": [min(ratios), max(ratios)],
            }
        )
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "qwen"])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--allocation", default="greedy")
    parser.add_argument("--lm-head", type=float, default=0.8)
    parser.add_argument("--far-ns", type=float, default=100.0)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="both decodes' type")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if os.cpu_count() is None or os.cpu_count() < 2:
        parser.error("placement.py needs two CPUs (it pins a thread to each of CPUs 0 and 1).")
    from torch.utils.cpp_extension import load as load_extension

    from benchmarks.frontier import PROMPT
    from sparse_lightning import SparseActivationModule, SparsityConfig

    ext = load_extension(
        name="sparse_lightning_bench_core_probe", sources=[str(SOURCE)], extra_cflags=["-O2"]
    )
    model, tokenizer, path = frontier_checkpoint(args.model, args.allocation)
    model = model.to(getattr(torch, args.dtype))
    setting = SparsityConfig(budget=args.budget, allocation=args.allocation, lm_head=args.lm_head)
    prompt = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    dense = tuned_decode(copy.deepcopy(model), prompt, 32)
    module = SparseActivationModule.from_pretrained(model, path, tokenizer=tokenizer)
    module.set_sparsity(setting)
    sparse = tuned_decode(module.model, prompt, 32)
    buffer = torch.ones(64 << 20)  # 256 MB
    runs: list[dict] = []
    end = time.time() + 60 * args.minutes
    while time.time() < end or not runs:
        run = probe(ext, buffer)
        result = interleaved_decode(dense, sparse, 3)
        run["dense_ms_per_step"] = 1e3 / result["dense_decode_tokens_per_s"]
        run["sparse_ms_per_step"] = 1e3 / result["decode_tokens_per_s"]
        run["decode_speedup"] = result["decode_speedup"]  # the median of per-repetition ratios
        runs.append(run)
        print(
            f"hand-over {run['handover_ns']:5.0f} ns | read {run['read_gbs_1_thread']:4.1f} / "
            f"{run['read_gbs_2_threads']:4.1f} GB/s | dense {run['dense_ms_per_step']:5.2f} ms"
            f" | {run['decode_speedup']:.3f}x",
            flush=True,
        )
    groups = summarize(runs, args.far_ns)
    print(
        "\n| placement | runs | hand-over | read, 1 / 2 threads | dense step | sparse step "
        "| decode speedup (range) |\n|---|---|---|---|---|---|---|"
    )
    for g in groups:
        low, high = g["decode_speedup_range"]
        print(
            f"| {g['placement']} | {g['runs']} | {g['handover_ns']:.0f} ns | "
            f"{g['read_gbs_1_thread']:.1f} / {g['read_gbs_2_threads']:.1f} GB/s | "
            f"{g['dense_ms_per_step']:.1f} ms | {g['sparse_ms_per_step']:.1f} ms | "
            f"{g['decode_speedup']:.3f}x ({low:.3f}-{high:.3f}) |"
        )
    save_report(
        {
            "benchmark": "placement",
            "model": args.model,
            "dtype": args.dtype,
            "setting": {
                "budget": args.budget,
                "allocation": args.allocation,
                "lm_head": args.lm_head,
            },
            "far_ns": args.far_ns,
            "groups": groups,
            "runs": runs,
        },
        args.out or results_path("placement", args.model, args.dtype),
    )


if __name__ == "__main__":
    main()
