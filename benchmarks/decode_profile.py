"""Where inference time goes: matrix multiplies versus everything else (issue 5, items 3-4).

``--what generate`` (default) profiles 32 greedy ``generate`` steps of dense
SmolLM2-135M-Instruct, of its compacted static-mask model (50% of MLP neurons, heads
group-balanced) and of ``mode="gate"`` at 50% of MLP neurons with ``torch.profiler``, and
prints the share of CPU time spent in matrix multiplies and the top operators. The rest does
not shrink with compaction, which caps the decode speedup below the linear-layer FLOP bound;
the gate path's gathers and top-k cost what its smaller matrix multiplies save.

``--what tuned`` profiles three 32-token runs of ``benchmarks.common.tuned_decode`` (dense and
compacted at ``--level``, default 80%), compiled with Inductor's kernel profiling so that the
step splits into its generated GEMM kernels, its other kernels and its wrapper; it prints the
time per step of each next to what runs outside the step. ``--what prefill`` profiles two
8 x 128 prefills, dense and compacted at ``--level``, then times each kind of linear layer
without the profiler. ``--what skip`` profiles the tuned decode of ``--model`` (smollm2 or
qwen) dense and input-sparse at ``--budget`` (``--allocation``, the frontier's checkpoint,
``--lm-head`` for the output projection's level), the kernel's calls included, and prints the
rate at which each side streams its weights. ``--what split`` takes the same step apart by
interleaved timings instead of a profiler (:func:`split_step`); ``--what padding`` times
the kernels' padded rows against packed ones in the same decode (:func:`padding_step`). See
the README's Performance section.

    python benchmarks/decode_profile.py [--checkpoint PATH] [--what tuned --level 0.8]
    python benchmarks/decode_profile.py --what skip --model qwen --budget 0.3
    python benchmarks/decode_profile.py --what skip --budget 0.2 --allocation attribution \
        --lm-head 0.5
    python benchmarks/decode_profile.py --what padding --budget 0.2 --allocation greedy \
        --lm-head 0.8
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    DTYPES,
    STATIC_CHECKPOINT,
    STATIC_ROWS,
    calibrated_checkpoint,
    frontier_checkpoint,
    results_path,
    tuned_decode,
)
from sparse_lightning import SparseActivationModule, load_demo_model  # noqa: E402

MATMULS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear")
#: The input-sparse kernel's op, an extern call inside the compiled step.
KERNEL = "sparse_lightning::input_sparse_linear"


def is_matmul(key: str) -> bool:
    """An eager matrix-multiply operator, a GEMM kernel that Inductor generated, or the
    input-sparse kernel."""
    return key in MATMULS or key == KERNEL or "gemm" in key.lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument(
        "--what",
        choices=("generate", "tuned", "prefill", "skip", "split", "padding"),
        default="generate",
    )
    parser.add_argument("--level", type=float, default=None, help="tuned/prefill: default 0.8")
    parser.add_argument(
        "--model", choices=("smollm2", "qwen"), default="smollm2", help="skip/split/padding"
    )
    parser.add_argument(
        "--budget", type=float, default=0.3, help="skip/split/padding: decode bytes to skip"
    )
    parser.add_argument(
        "--allocation", default="uniform", help="skip/split/padding: how the budget spreads"
    )
    parser.add_argument(
        "--lm-head", type=float, default=0.0, help="skip/split/padding: lm_head level"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="split: the model's type (the float32 checkpoint's thresholds serve both)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="split/padding: where the JSON goes (results_path('decode_<what>', dtype=...))",
    )
    args = parser.parse_args()
    if args.dtype != "float32" and args.what != "split":
        parser.error("--dtype is an option of --what split")
    if args.what == "skip":
        profile_skip(args.model, args.budget, args.allocation, args.lm_head)
        return
    out = args.out or results_path(f"decode_{args.what}", dtype=args.dtype)
    if args.what == "split":
        dtype = getattr(torch, args.dtype)
        split_step(args.model, args.budget, args.allocation, args.lm_head, out, dtype)
        return
    if args.what == "padding":
        padding_step(args.model, args.budget, args.allocation, args.lm_head, out)
        return
    model, tokenizer = load_demo_model()
    checkpoint = calibrated_checkpoint(
        model, tokenizer, STATIC_ROWS, args.checkpoint or STATIC_CHECKPOINT
    )
    level = args.level or (0.5 if args.what == "generate" else 0.8)
    module = SparseActivationModule.from_pretrained(
        model, checkpoint, level, mode="static", tokenizer=tokenizer
    )
    compact = module.compact()
    module.disable_sparsity()
    if args.what == "generate":
        profile_generate(module, compact, tokenizer, level)
    elif args.what == "prefill":
        profile_prefill(model, compact, level)
    else:
        nets = (("dense", model), (f"compacted {level:.0%}", compact))
        profile_tuned(nets, tokenizer)


def profile_skip(key: str, budget: float, allocation: str, lm_head: float) -> None:
    """The tuned decode, dense and input-sparse at ``budget``, and each side's weight stream."""
    import copy

    from sparse_lightning import SparsityConfig
    from sparse_lightning.architectures import resolve

    model, tokenizer, path = frontier_checkpoint(key, allocation)
    dense = copy.deepcopy(model)
    module = SparseActivationModule.from_pretrained(model, path, tokenizer=tokenizer)
    module.set_sparsity(SparsityConfig(budget=budget, allocation=allocation, lm_head=lm_head))
    architecture = resolve(dense)
    total = architecture.linear_macs() * 4  # float32 bytes per decode token
    head = dense.get_output_embeddings().weight.numel() * 4
    # Bytes each side streams per step: all of them dense; sparse, the budget's share and the
    # lm_head's dropped rows skipped (its exact candidates, 2% of it, are left out).
    streamed = {"dense": total, "sparse": total * (1 - budget) - head * lm_head}
    steps = profile_tuned(
        (("dense", dense), (f"{allocation} {budget:.2f}", module.model)), tokenizer
    )
    for (name, ms), side in zip(steps.items(), streamed, strict=True):
        print(
            f"{name}: {ms:.2f} ms per step, {streamed[side] / 1e6:.0f} MB of weights "
            f"({head / 1e6:.0f} MB lm_head) -> {streamed[side] / ms / 1e6:.1f} GB/s"
        )
    dense_ms, sparse_ms = steps.values()
    bound = streamed["dense"] / streamed["sparse"]
    print(f"step ratio {dense_ms / sparse_ms:.2f}x, byte bound {bound:.2f}x")


#: ``--what split``: levels that drop nearly every input channel (what is left of a step when
#: the channel kinds stream almost nothing: attention, norms, the calls themselves).
NEAR_EMPTY = dict.fromkeys(("attn_input", "mlp_input", "head_features", "mlp"), 0.995)


def split_step(
    key: str,
    budget: float,
    allocation: str,
    lm_head: float,
    out: Path,
    dtype: torch.dtype = torch.float32,
) -> None:
    """A decode step taken apart without a profiler: four tuned decodes, each pair's steps
    interleaved in one process (:func:`interleaved_decode`), differences of ms per step.

    ``D`` is dense, ``S`` the setting, ``Z`` the same lm_head with the channel kinds at
    :data:`NEAR_EMPTY`, ``Z0`` that with a dense lm_head. ``S - Z`` is what the channel
    kinds' kept rows cost, ``D - Z0`` what the dense decoder projections cost beyond the
    kernel's calls, ``Z0 - Z`` what the lm_head setting saves (in the basis the checkpoint
    allows: rotated when it holds the lm_head input's second moment). ``dtype``: the model's
    type, all four decodes. JSON in ``out``.
    """
    import copy

    from benchmarks.common import save_report
    from benchmarks.frontier import PROMPT
    from sparse_lightning import SparsityConfig

    model, tokenizer, path = frontier_checkpoint(key, allocation)
    model = model.to(dtype)
    settings = {
        "S": SparsityConfig(budget=budget, allocation=allocation, lm_head=lm_head),
        "Z": SparsityConfig(NEAR_EMPTY, lm_head=lm_head),
        "Z0": SparsityConfig(NEAR_EMPTY),
    }
    prompt = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    runs = {"D": tuned_decode(copy.deepcopy(model), prompt, 32)}
    modules = []  # each setting on a copy of its own, so nothing switches between steps
    for name, setting in settings.items():
        modules.append(
            SparseActivationModule.from_pretrained(copy.deepcopy(model), path, tokenizer=tokenizer)
        )
        modules[-1].set_sparsity(setting)
        runs[name] = tuned_decode(modules[-1].model, prompt, 32)
    rows = interleaved_pairs(runs, (("D", "S"), ("S", "Z"), ("Z0", "Z"), ("D", "Z0")))
    report = {
        "benchmark": "decode_split",
        "model": key,
        "settings": {
            "S": {
                "budget": budget,
                "allocation": allocation,
                "lm_head": lm_head,
                "lm_head_rotated": bool(lm_head) and modules[0].sparsifier.output.reads.rotated,
            }
        },
        "near_empty": NEAR_EMPTY,
        "dtype": str(dtype).removeprefix("torch."),
        "rows": rows,
    }
    save_report(report, out)


def interleaved_pairs(runs: dict, pairs, rounds: int = 2, repeats: int = 7) -> list[dict]:
    """ms per decode step of each pair of ``runs``, their steps interleaved, ``rounds`` times."""
    from benchmarks.common import interleaved_decode

    rows = []
    for _ in range(rounds):
        for a, b in pairs:
            result = interleaved_decode(runs[a], runs[b], repeats)
            ms_a = 1e3 / result["dense_decode_tokens_per_s"]
            ms_b = 1e3 / result["decode_tokens_per_s"]
            rows.append({"pair": f"{a}-{b}", a: ms_a, b: ms_b, "difference_ms": ms_a - ms_b})
            print(
                f"{a} {ms_a:.2f} vs {b} {ms_b:.2f} ms per step: {a}-{b} = {ms_a - ms_b:.2f} ms, "
                f"{a}/{b} = {ms_a / ms_b:.3f}"
            )
    return rows


def padding_step(key: str, budget: float, allocation: str, lm_head: float, out: Path) -> None:
    """The kernels' padded rows (:mod:`sparse_lightning.kernels.layout`) against packed ones
    in the tuned decode: ``D`` dense, ``S`` the setting as shipped, ``P`` the same setting
    with every kernel weight packed (the layout before 2026-12-06), pairs interleaved in one
    process, three rounds. JSON in ``out``."""
    import copy
    from unittest import mock

    from benchmarks.common import save_report
    from benchmarks.frontier import PROMPT
    from sparse_lightning import SparsityConfig

    model, tokenizer, path = frontier_checkpoint(key, allocation)
    setting = SparsityConfig(budget=budget, allocation=allocation, lm_head=lm_head)
    prompt = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    runs = {"D": tuned_decode(copy.deepcopy(model), prompt, 32)}
    modules = {}
    for name in ("S", "P"):
        packed = mock.patch("sparse_lightning.kernels.layout.row_stride", lambda c, _: c)
        with packed if name == "P" else contextlib.nullcontext():
            modules[name] = SparseActivationModule.from_pretrained(
                copy.deepcopy(model), path, tokenizer=tokenizer
            )
            modules[name].set_sparsity(setting)
        runs[name] = tuned_decode(modules[name].model, prompt, 32)
    padded = {
        name: sum(ex.weight_t.stride(0) != ex.weight_t.shape[1] for ex in m.sparsifier.executors)
        for name, m in modules.items()
    }
    print(f"kernel weights with padded rows: {padded}")
    rows = interleaved_pairs(runs, (("D", "S"), ("D", "P"), ("P", "S")), rounds=3)
    report = {
        "benchmark": "decode_padding",
        "model": key,
        "setting": {"budget": budget, "allocation": allocation, "lm_head": lm_head},
        "padded_weights": padded,
        "rows": rows,
    }
    save_report(report, out)


def profile_generate(module, compact, tokenizer, level: float) -> None:
    ids = tokenizer("The lighthouse keeper climbed the stairs and", return_tensors="pt")
    runs = (("dense", module.model), (f"compacted {level:.0%}", compact), ("gate 50%", None))
    for name, net in runs:
        if net is None:
            module.set_sparsity(mlp=0.5, heads=0.0, mode="gate")
            net = module.model
        with torch.no_grad():
            net.generate(**ids, max_new_tokens=4, do_sample=False)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                net.generate(**ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        summarize(name, prof)


def profile_prefill(model, compact, level: float) -> None:
    ids = torch.randint(100, 40000, (8, 128))
    nets = (("dense", model), (f"compacted {level:.0%}", compact))
    for name, net in nets:
        with torch.no_grad():
            net(input_ids=ids, use_cache=False)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(2):
                    net(input_ids=ids, use_cache=False)
        summarize(f"{name}, two prefills", prof)
    # The profiler's own overhead distorts the compacted model's small operators, so the
    # per-projection split is timed without it: wall time around each nn.Linear call.
    timed = {name: per_linear_ms(net, ids, forwards=3) for name, net in nets}
    for name, (kinds, total) in timed.items():
        listed = ", ".join(f"{k} {v:.0f}" for k, v in kinds.items())
        rest = total - sum(kinds.values())
        print(f"{name}, ms per prefill: {total:.0f} in all; {listed}; outside linears {rest:.0f}")
    (dense, _), (small, _) = timed.values()
    ratio = sum(dense.values()) / sum(small.values())
    head = dense["lm_head"] / sum(dense.values())
    print(f"  linear layers together: {ratio:.2f}x; lm_head is {head:.0%} of the dense linear time")


def per_linear_ms(net, ids: torch.Tensor, forwards: int) -> tuple[dict[str, float], float]:
    """Wall ms per forward in each kind of ``nn.Linear`` (by attribute name), and in all."""
    spent: dict[str, float] = {}
    start: dict[str, float] = {}

    def before(kind):
        return lambda *_: start.__setitem__(kind, time.perf_counter())

    def after(kind):
        def hook(*_):
            spent[kind] = spent.get(kind, 0.0) + time.perf_counter() - start[kind]

        return hook

    handles = []
    for path, mod in net.named_modules():
        if isinstance(mod, torch.nn.Linear):
            kind = path.rsplit(".", 1)[-1]
            handles += [
                mod.register_forward_pre_hook(before(kind)),
                mod.register_forward_hook(after(kind)),
            ]
    with torch.no_grad():
        net(input_ids=ids, use_cache=False)  # warm-up
        spent.clear()
        begin = time.perf_counter()
        for _ in range(forwards):
            net(input_ids=ids, use_cache=False)
        total = time.perf_counter() - begin
    for handle in handles:
        handle.remove()
    return {kind: s / forwards * 1e3 for kind, s in spent.items()}, total / forwards * 1e3


def profile_tuned(nets, tokenizer) -> dict[str, float]:
    """Profile each ``(name, model)``'s tuned decode; returns each one's ms per compiled step."""
    from torch._inductor import config as inductor_config

    prompt = tokenizer("Write a short story about a lighthouse keeper.", return_tensors="pt")
    step_ms = {}
    for name, net in nets:
        run = tuned_decode(net, prompt["input_ids"], 32)
        # Kernel profiling makes each generated C++ kernel a profiler event of its own, so
        # the opaque compiled step splits into GEMMs and the rest.
        with inductor_config.patch({"cpp.enable_kernel_profile": True}):
            run()  # compiles
        run()  # first run with guards skipped
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                run()
        summarize(f"{name}, tuned decode x3", prof)
        events = prof.key_averages()
        steps = [e for e in events if e.key.startswith("## Call CompiledFxGraph")]
        count = sum(e.count for e in steps)
        inside = sum(e.cpu_time_total for e in steps) / 1e3 / count
        wrapper = sum(e.self_cpu_time_total for e in steps) / 1e3 / count
        kernels = [e for e in events if e.key.startswith(("cpp_", "graph_", KERNEL))]
        gemm = sum(e.self_cpu_time_total for e in kernels if is_matmul(e.key)) / 1e3
        other = sum(e.self_cpu_time_total for e in kernels) / 1e3 - gemm
        print(
            f"  compiled step: {count} calls, {inside:.2f} ms each; inside it per step: GEMM "
            f"kernels {gemm / count:.2f} ms, other generated kernels {other / count:.2f} ms, "
            f"the wrapper that calls them {wrapper:.2f} ms"
        )
        top = sorted(kernels, key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
        print("  " + ", ".join(f"{e.key} {e.self_cpu_time_total / 1e3 / count:.3f}" for e in top))
        step_ms[name] = inside
        torch._dynamo.reset()  # the next model must not reuse this one's frozen entry
    return step_ms


def summarize(name: str, prof) -> None:
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    matmul = sum(e.self_cpu_time_total for e in events if is_matmul(e.key)) / 1e3
    print(
        f"{name}: {total:.0f} ms CPU, matrix multiplies {matmul:.0f} ms "
        f"({matmul / total:.0%}), other {total - matmul:.0f} ms"
    )
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    print("  " + ", ".join(f"{e.key} {e.self_cpu_time_total / 1e3:.0f} ms" for e in top))


if __name__ == "__main__":
    main()
