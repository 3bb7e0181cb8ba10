"""Two CPU processes (gloo) add up to the same sums as one process over the same data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("ddp_calibrate.py")
EVALUATE = Path(__file__).with_name("ddp_evaluate.py")


def run(devices: int, out: Path, script: Path = SCRIPT, *extra: str, timeout: int = 600) -> None:
    # One thread per process in both runs: float32 reductions then happen in the same order, so
    # per-example activations are bit-identical and only the float64 sums' order differs.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(devices), str(out), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_two_processes_sum_to_the_single_process_statistics(tmp_path):
    run(1, tmp_path)
    run(2, tmp_path)
    single = load_file(tmp_path / "devices1_rank0.safetensors")
    rank0 = load_file(tmp_path / "devices2_rank0.safetensors")
    rank1 = load_file(tmp_path / "devices2_rank1.safetensors")
    assert single.keys() == rank0.keys() == rank1.keys()
    assert int(single["mlp.tokens"]) > 0
    for key, expected in single.items():
        # compute() is collective: both ranks hold the global sums.
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], expected, rtol=1e-5, atol=1e-12, msg=key)


def test_two_processes_reduce_qa_metrics_to_the_single_process_values(tmp_path):
    run(1, tmp_path, EVALUATE)
    run(2, tmp_path, EVALUATE)
    single = json.loads((tmp_path / "eval_devices1_rank0.json").read_text())
    rank0 = json.loads((tmp_path / "eval_devices2_rank0.json").read_text())
    rank1 = json.loads((tmp_path / "eval_devices2_rank1.json").read_text())
    assert len(single) == len(rank0) == 2
    for expected, got0, got1 in zip(single, rank0, rank1, strict=True):
        metric_keys = {"bleu_vs_dense", "sacrebleu", "rougeL", "f1", "top1_agreement", "kl"}
        assert metric_keys <= set(expected)
        for key in metric_keys | {"perplexity", "exact_match", "mc_accuracy"}:
            # compute() is collective: both ranks hold the metric over all 8 questions.
            assert got0[key] == got1[key], key
            assert got0[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key


def test_a_rank_without_multiple_choice_questions_finishes_and_matches_one_process(tmp_path):
    """compute() is collective: a rank that saw no choice question must still make the same
    calls as the others (deciding per rank deadlocked). With batch size 1 and two ranks, rank 0
    gets rows 0, 2, 4, 6 (all the questions with choices) and rank 1 rows 1, 3, 5, 7."""
    rows = []
    for i in range(8):
        row = {"question": f"Question {i}?", "answer": f"answer {i}"}
        if i % 2 == 0:
            row.update(choices=["abc", "xyz", f"answer {i}"], label=i % 3)
        rows.append(row)
    data = tmp_path / "uneven.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    run(1, tmp_path, EVALUATE, str(data))
    # A deadlock shows as a timeout here (the subprocess is killed and the test fails).
    run(2, tmp_path, EVALUATE, str(data), timeout=300)
    single = json.loads((tmp_path / "eval_devices1_rank0.json").read_text())
    rank0 = json.loads((tmp_path / "eval_devices2_rank0.json").read_text())
    rank1 = json.loads((tmp_path / "eval_devices2_rank1.json").read_text())
    for expected, got0, got1 in zip(single, rank0, rank1, strict=True):
        assert "mc_accuracy" in expected and "bleu_vs_dense" in expected
        assert set(got0) == set(got1) == set(expected)
        for key, value in expected.items():
            if isinstance(value, float):
                assert got0[key] == got1[key], key
                assert got0[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
