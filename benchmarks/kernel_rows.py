"""Which rows a token keeps decides how close the kernel gets to the byte bound.

The input-sparse kernel reads one row of the transposed weight per kept input channel, front to
back. The hardware prefetcher runs on past a row's end into the next row; if that row is
dropped, those bytes are fetched for nothing. Revision 589e63c of the kernel (``--against``,
not shipped) read a kept row backwards when only its previous neighbour is kept, and from both
ends towards its middle when neither is, so that the run-on lands in bytes read anyway, and kept
its buffers per thread. This script measures that kernel against the shipped one on the narrow
projections (threads split rows), with half of each input's channels kept

* ``random``: a random half;
* ``first half``: contiguous rows (no neighbour ever dropped: the easy case);
* ``every other``: every kept row has both neighbours dropped (the worst case);

and a random quarter (75% skipped). Eager calls, enough copies to stream 256 MB per repetition,
the two kernels alternating inside each repetition, medians; share of bound =
``t0 / (t * channels / kept)``, each kernel against its own 0%.

``--activations smollm2 qwen`` adds the patterns that matter: the inputs of every projection
group of the real models over 8 greedy decode steps, each token keeping its largest channels at
levels 0, 0.2 and 0.5 (as a uniform allocation would), weights fused and transposed as the
executor stores them; both kernels time every call of a pass, alternating passes. Each of
those rows also gives the ratio over the fastest, middle and slowest third of the passes
(ranked by the earlier kernel's time), since this machine's bandwidth drifts between spells
(60 or more ``--repeats`` make the thirds meaningful).

``--dtype bfloat16`` runs both kernels on bfloat16 weights and inputs (the real models cast),
as a model in that type streams them.

    python benchmarks/kernel_rows.py [--repeats 11] [--against REV] [--activations smollm2 qwen]
        [--dtype bfloat16]

Prints a table and writes benchmarks/results/kernel_rows[_bfloat16].json.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import DTYPES, results_path, save_report  # noqa: E402
from benchmarks.frontier import MODELS, PROMPT  # noqa: E402
from benchmarks.kernel_layout import SHAPES  # noqa: E402
from sparse_lightning.kernels import load, transposed_rows  # noqa: E402
from sparse_lightning.kernels.ops import SOURCE, build_flags  # noqa: E402

#: The kernel that read rows in an order set by their neighbours (measured, not shipped).
READING_ORDER = "589e63c"


def pattern(name: str, channels: int, g: torch.Generator) -> torch.Tensor:
    """A boolean mask of the kept channels."""
    keep = torch.zeros(channels, dtype=torch.bool)
    if name == "0%":
        keep[:] = True
    elif name == "random":
        keep[torch.randperm(channels, generator=g)[: channels // 2]] = True
    elif name == "first half":
        keep[: channels // 2] = True
    elif name == "every other":
        keep[::2] = True
    elif name == "random quarter":
        keep[torch.randperm(channels, generator=g)[: channels // 4]] = True
    return keep


PATTERNS = ("0%", "random", "first half", "every other", "random quarter")


def input_keeping(keep: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """An input whose kept channels have magnitudes in [1, 2) and the others below 0.5, so
    threshold 0.75 keeps exactly ``keep``."""
    n = keep.numel()
    magnitude = torch.where(keep, 1 + torch.rand(n, generator=g), 0.5 * torch.rand(n, generator=g))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return (magnitude * sign).unsqueeze(0)


def file_at(revision: str, path: Path) -> str | None:
    """``path``'s text at ``revision`` (``None``: not in that revision)."""
    shown = subprocess.run(
        ["git", "show", f"{revision}:{path.relative_to(ROOT)}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return shown.stdout if shown.returncode == 0 else None


def kernel_at(revision: str):
    """The kernel's source at ``revision``, built under its own op namespace.

    Its helpers (``sparse_rows.h``) keep their names: ``build_flags`` hides them in each
    library, so this build calls its own, not the shipped kernel's. Before that (2026-12-07)
    they were weak exported symbols, and this build, loaded after the shipped library (which
    is global), ran the shipped row loop: ``--against`` timed one loop twice.
    """
    from torch.utils.cpp_extension import load as load_extension

    source = file_at(revision, SOURCE)
    assert source is not None, f"{SOURCE.name} is not in revision {revision}"
    tag = re.sub(r"\W", "_", revision)
    namespace = f"sparse_lightning_{tag}"
    source = source.replace("TORCH_LIBRARY(sparse_lightning,", f"TORCH_LIBRARY({namespace},")
    source = source.replace(
        "TORCH_LIBRARY_IMPL(sparse_lightning,", f"TORCH_LIBRARY_IMPL({namespace},"
    )
    folder = Path(tempfile.mkdtemp())
    path = folder / f"kernel_{tag}.cpp"
    path.write_text(source)
    header = SOURCE.parent / "sparse_rows.h"  # revisions since 916fe6d include it
    shared = file_at(revision, header)
    if shared is not None:
        (folder / header.name).write_text(shared)
    load_extension(
        name=f"kernel_{tag}", sources=[str(path)], **build_flags(), is_python_module=False
    )
    return getattr(torch.ops, namespace).input_sparse_linear


def decode_inputs(
    model_key: str, steps: int = 8, dtype: torch.dtype = torch.float32
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(channel kind, input, fused transposed weight) of every call of an input-sparse site over
    ``steps`` greedy decode steps of the real model in ``dtype``: the sites and the projections
    that read them as the resolver gives them to the executor."""
    from sparse_lightning import resolve
    from sparse_lightning.architectures.weights import input_rows
    from sparse_lightning.units import UNIT_KINDS

    model, tokenizer = MODELS[model_key][1]()
    model = model.to(dtype).eval()
    architecture = resolve(model)
    calls: list[tuple[str, int, torch.Tensor]] = []
    weights: dict[tuple[str, int], torch.Tensor] = {}
    for kind, unit in UNIT_KINDS.items():
        if unit.per_head:
            continue
        for row in architecture.layers_with(unit.site):
            modules = architecture.site_modules(unit.site, row)
            weights[(kind, row)] = transposed_rows([input_rows(m) for m in modules])

            def record(module, args, kind=kind, row=row) -> None:
                if args[0].shape[1] == 1:  # decode steps only; the prompt runs dense
                    calls.append((kind, row, args[0].detach().reshape(1, -1).clone()))

            modules[0].register_forward_pre_hook(record)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False)
    return [(kind, x, weights[(kind, row)]) for kind, row, x in calls]


def by_speed(seconds: list[float], ratios: list[float]) -> dict[str, float]:
    """Median ``ratios`` over the fastest, middle and slowest third of the repetitions, ranked
    by ``seconds``: this machine's memory bandwidth drifts between spells, and a kernel can
    keep up in a slow one and fall behind in a fast one (docs/performance.md)."""
    order = sorted(range(len(seconds)), key=seconds.__getitem__)
    third = max(1, len(order) // 3)
    parts = {"fast": order[:third], "middle": order[third:-third], "slow": order[-third:]}
    return {k: statistics.median(ratios[i] for i in v) for k, v in parts.items() if v}


def activation_rows(
    model_key: str, kernels: dict, repeats: int, dtype: torch.dtype = torch.float32
) -> list[dict]:
    """Both kernels on the real model's decode inputs, per level and channel kind."""
    calls = decode_inputs(model_key, dtype=dtype)
    rows = []
    for level in (0.0, 0.2, 0.5):
        timed = []
        for group, x, w in calls:
            keep = x.shape[1] - round(level * x.shape[1])
            threshold = float(x.abs().flatten().topk(keep).values[-1]) if level else 0.0
            timed.append((group, x, w, threshold))
        times: dict[tuple[str, str], list[float]] = {}
        for repeat in range(repeats):
            order = list(kernels.items())
            for kernel, op in order if repeat % 2 else order[::-1]:  # alternating passes
                spent: dict[str, float] = {}
                for group, x, w, threshold in timed:
                    start = time.perf_counter()
                    op(x, w, threshold, None)
                    spent[group] = spent.get(group, 0.0) + time.perf_counter() - start
                spent["all"] = sum(spent.values())
                for group, seconds in spent.items():
                    times.setdefault((kernel, group), []).append(seconds)
        shipped, earlier = kernels
        for group in ("all", *sorted({c[0] for c in timed})):
            ratios = [
                a / b for a, b in zip(times[(earlier, group)], times[(shipped, group)], strict=True)
            ]
            row = {
                "model": model_key,
                "level": level,
                "group": group,
                "calls": sum(1 for c in timed if group in ("all", c[0])),
                f"{earlier}_ms": statistics.median(times[(earlier, group)]) * 1e3,
                "shipped_ms": statistics.median(times[(shipped, group)]) * 1e3,
                "speedup_of_shipped": statistics.median(ratios),
                "speedup_of_shipped_by_speed": by_speed(times[(earlier, group)], ratios),
            }
            rows.append(row)
            thirds = " ".join(f"{k} {v:.3f}" for k, v in row["speedup_of_shipped_by_speed"].items())
            print(
                f"{model_key} decode inputs, level {level:.1f}, {group:13}: {earlier} "
                f"{row[f'{earlier}_ms']:7.2f} ms, shipped {row['shipped_ms']:7.2f} ms "
                f"(shipped {row['speedup_of_shipped']:.3f}x; by speed: {thirds})",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--against", default=READING_ORDER)
    parser.add_argument("--stream-mb", type=int, default=256)
    parser.add_argument("--activations", nargs="*", choices=list(MODELS), default=[])
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    out = args.out or results_path("kernel_rows", dtype=args.dtype)
    load()
    kernels = {
        "shipped": torch.ops.sparse_lightning.input_sparse_linear,
        args.against: kernel_at(args.against),
    }
    started = time.time()
    rows = []
    for (model, projection), (inputs, outputs) in SHAPES.items():
        g = torch.Generator().manual_seed(inputs * outputs)
        size = inputs * outputs * dtype.itemsize
        copies = max(4, args.stream_mb * 2**20 // size)
        ws = [torch.randn(inputs, outputs, generator=g).to(dtype) for _ in range(copies)]
        times: dict[tuple[str, str], list[float]] = {}
        kept = {}
        for name in PATTERNS:
            masks = [pattern(name, inputs, g) for _ in range(copies)]
            kept[name] = int(masks[0].sum())
            xs = [input_keeping(mask, g).to(dtype) for mask in masks]
            for x, w, mask in zip(xs[:2], ws, masks, strict=False):  # both kernels are right
                expected = x[:, mask].double() @ w[mask].double()
                for op in kernels.values():
                    got = op(x, w, 0.75, None).double()
                    tolerance = 1e-4 if dtype == torch.float32 else 1e-2  # one rounding to dtype
                    torch.testing.assert_close(got, expected, rtol=tolerance, atol=1e-3)
            for _ in range(args.repeats):
                for kernel, op in kernels.items():  # alternating
                    start = time.perf_counter()
                    for x, w in zip(xs, ws, strict=True):
                        op(x, w, 0.75, None)
                    elapsed = (time.perf_counter() - start) / copies
                    times.setdefault((kernel, name), []).append(elapsed)
        for kernel in kernels:
            t0 = statistics.median(times[(kernel, "0%")])
            row = {
                "model": model,
                "projection": projection,
                "in_features": inputs,
                "out_features": outputs,
                "kernel": kernel,
                "copies": copies,
                "kernel0_us": t0 * 1e6,
            }
            cells = [f"0%: {t0 * 1e6:6.1f} us"]
            for name in PATTERNS[1:]:
                t = statistics.median(times[(kernel, name)])
                share = t0 / (t * inputs / kept[name])
                row[name] = {"kept": kept[name], "us": t * 1e6, "share_of_bound": share}
                cells.append(f"{name}: {t * 1e6:6.1f} us ({share:.0%})")
            rows.append(row)
            print(f"{model[:7]:8} {projection:6} {kernel:8} " + "  ".join(cells), flush=True)
        del ws
    activations = [
        row
        for key in args.activations
        for row in activation_rows(key, kernels, args.repeats, dtype)
    ]
    save_report(
        {
            "benchmark": "kernel_rows",
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "stream_mb": args.stream_mb,
            "dtype": args.dtype,
            "seconds": time.time() - started,
            "results": rows,
            "activations": activations,
        },
        out,
    )


if __name__ == "__main__":
    main()
