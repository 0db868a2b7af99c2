"""Smoke test of the decoding benchmark: both sides run and the side-by-side table prints."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_decode_benchmark_runs_both_sides_on_a_cpu_split_in_two():
    cmd = [sys.executable, str(ROOT / "experiments/benchmarks/lm_decode_speed.py")]
    cmd += ["--preset", "tiny", "--batches", "1", "2", "--new-tokens", "4", "--prompt-len", "8"]
    cmd += ["--reps", "1", "--genjax-cpu-devices", "2", "--genjax-mesh", "tensor=2"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # its own device count
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "on 2 XLA CPU device(s), mesh tensor=2 for batches" in out.stdout
    for row in ("| 1 | greedy | genjax |", "| 2 | top_p | hf |", "tokens/s genjax / HF"):
        assert row in out.stdout, out.stdout
