"""Smoke-run each benchmark script at a tiny shape (figures are not checked: speed claims live in benchmarks/README.md)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "args",
    [
        ["benchmarks/bench_capture.py", "--shape", "tiny", "--batch", "2", "--seq", "16", "--repeat", "1"],
        ["benchmarks/bench_swap.py", "--shape", "tiny", "--rank", "2"],
        ["benchmarks/bench_fingerprint.py", "--shape", "tiny", "--prompts", "2"],
        ["benchmarks/bench_sampling.py", "--samples", "1", "--max-new-tokens", "2", "--big-batch", "64"],
        ["benchmarks/bench_judge.py", "--items", "4", "--latency", "0.001", "--workers", "1", "4"],
        pytest.param(
            ["benchmarks/bench_trajectory.py", "--checkpoints", "3", "--samples", "1", "--max-new-tokens", "2"],
            marks=pytest.mark.science,  # samples the organism's insecure-s0 run
        ),
        ["benchmarks/bench_memory.py", "--shapes", "tiny", "--ckpts", "3", "--batch", "2", "--seq", "4"],
        [
            "benchmarks/bench_mixed.py",
            *"--shape tiny --checkpoints 3 --prompts 2 --max-new-tokens 2 --rank 2 --no-save".split(),
        ],
    ],
)
def test_benchmark_runs(args):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "device:" in r.stdout
