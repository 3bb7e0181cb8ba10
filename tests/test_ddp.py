"""Two CPU processes (gloo) add up to the same sums as one process over the same data."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("ddp_calibrate.py")


def run(devices: int, out: Path) -> None:
    # One thread per process in both runs: float32 reductions then happen in the same order, so
    # per-example activations are bit-identical and only the float64 sums' order differs.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(devices), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
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
