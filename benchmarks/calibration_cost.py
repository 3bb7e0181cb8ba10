"""What calibration costs: ours versus a dense forward, and versus the reference scheme.

On SmolLM2-135M-Instruct and TruthfulQA questions (dense greedy answers teacher-forced):

* ``dense forward``: one no-grad forward of the batch (the unit of cost);
* ``ours``: one calibration step of AttributionCalibration, all 30 layers, MLP neurons and heads
  (forward with capture, one ``autograd.grad``, all metric sums incl. corrected GxO);
* ``reference``: the paper's scripts' scheme on the same samples: for every answer token and
  every layer, a forward over the prefix and a backward of that token's cross-entropy to that
  layer's activations.

Also: peak RSS, and RSS after each of several calibration batches (it must not grow).

    python benchmarks/calibration_cost.py [--questions 8] [--ref-tokens 4] [--repeats 5]

Prints a table and writes benchmarks/results/calibration_cost.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import TRUTHFULQA, median_seconds, save_report  # noqa: E402
from sparse_lightning import (  # noqa: E402
    AttributionCalibration,
    QACollator,
    SparseActivationModule,
    TeacherForcedBatch,
    load_demo_model,
    load_truthfulqa,
)
from sparse_lightning.attribution import ActivationCapture, gradients_enabled  # noqa: E402

DATA = TRUTHFULQA


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def truncate_answers(batch: TeacherForcedBatch, tokens: int) -> TeacherForcedBatch:
    """Keep the first ``tokens`` answer tokens of every sample (labels elsewhere -100)."""
    labels = batch.labels.clone()
    for row in labels:
        answer = (row != -100).nonzero().flatten()
        row[answer[tokens:]] = -100
    return TeacherForcedBatch(batch.input_ids, batch.attention_mask, labels)


def reference_scheme(module: SparseActivationModule, batch: TeacherForcedBatch) -> int:
    """One forward + backward per (answer token, layer), as the paper's scripts do."""
    passes = 0
    for i in range(batch.input_ids.shape[0]):
        answer_positions = (batch.labels[i] != -100).nonzero().flatten().tolist()
        for position in answer_positions:
            ids = batch.input_ids[i : i + 1, : position + 1]
            target = batch.input_ids[i, position]
            for layer in range(module.architecture.num_layers):
                with ActivationCapture(module.architecture) as capture, gradients_enabled():
                    with capture.record():
                        logits = module.model(input_ids=ids).logits[0, -1]
                    loss = torch.nn.functional.cross_entropy(logits[None], target[None])
                    wanted = [capture.captured["mlp"][layer], capture.captured["heads"][layer]]
                    torch.autograd.grad(loss, wanted)
                passes += 1
    return passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--ref-questions", type=int, default=2)
    parser.add_argument("--ref-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-batches", type=int, default=6)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/calibration_cost.json"
    )
    args = parser.parse_args()

    model, tokenizer = load_demo_model()
    module = SparseActivationModule(model, tokenizer, targets="dense", max_new_tokens=32)
    questions = load_truthfulqa(DATA, rows=range(400, 400 + args.questions))
    raw = next(
        iter(DataLoader(questions, batch_size=args.questions, collate_fn=QACollator(tokenizer)))
    )
    batch = module.prepare_batch(raw)
    answer_tokens = batch.num_answer_tokens

    # The callback's own hooks, called as trainer.validate calls them: metric states, capture.
    callback = AttributionCalibration()
    trainer = SimpleNamespace(sanity_checking=False)
    callback.setup(trainer, module, "validate")
    callback.on_validation_start(trainer, module)
    capture = module.active_capture

    def dense_forward() -> None:
        with torch.no_grad():
            module.answer_loss(batch)

    def calibration_step(on: TeacherForcedBatch):
        def step() -> None:
            tf = on.autograd_ready()
            with gradients_enabled(), capture.record():
                loss = module.answer_loss(tf)
            callback.attribute(module, loss, tf)

        return step

    ours = calibration_step(batch)

    t_dense = median_seconds(dense_forward, args.repeats)
    t_ours = median_seconds(ours, args.repeats)

    rss = []
    for _ in range(args.memory_batches):
        ours()
        rss.append(current_rss_mb())

    ref_batch = truncate_answers(
        TeacherForcedBatch(
            *(
                t[: args.ref_questions]
                for t in (batch.input_ids, batch.attention_mask, batch.labels)
            )
        ),
        args.ref_tokens,
    )

    t_ours_ref = median_seconds(calibration_step(ref_batch), args.repeats)
    start = time.perf_counter()
    passes = reference_scheme(module, ref_batch)
    t_reference = time.perf_counter() - start
    module.stop_capture()

    report = {
        "benchmark": "calibration_cost",
        "model": "SmolLM2-135M-Instruct (30 layers; MLP neurons + heads; all sums)",
        "data": f"TruthfulQA rows 400-{399 + args.questions}, dense greedy answers",
        "answer_tokens": answer_tokens,
        "padded_tokens": batch.input_ids.numel(),
        "repeats": args.repeats,
        "seconds": {"dense_forward": t_dense, "ours": t_ours},
        "ours_over_dense_forward": t_ours / t_dense,
        "target_ours_over_dense_forward": 3.0,
        "reference": {
            "samples": args.ref_questions,
            "answer_tokens_each": args.ref_tokens,
            "passes": passes,
            "seconds_reference": t_reference,
            "seconds_ours": t_ours_ref,
            "speedup": t_reference / t_ours_ref,
            "target_speedup": 30.0,
        },
        "memory": {
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_each_batch_mb": rss,
            "growth_mb_first_to_last": rss[-1] - rss[0],
        },
    }
    save_report(report, args.out)
    ratio, speedup = t_ours / t_dense, t_reference / t_ours_ref
    print(f"dense forward {t_dense:.2f} s | ours {t_ours:.2f} s | {ratio:.2f}x (target <= 3.0x)")
    print(
        f"reference scheme: {passes} passes in {t_reference:.1f} s vs ours {t_ours_ref:.3f} s "
        f"on {args.ref_questions} samples x {args.ref_tokens} tokens: {speedup:.0f}x (target >= 30)"
    )
    peak = report["memory"]["peak_rss_mb"]
    print(f"peak RSS {peak:.0f} MB; RSS after each batch {[round(r) for r in rss]} MB")


if __name__ == "__main__":
    main()
