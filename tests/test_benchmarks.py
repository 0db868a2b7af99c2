"""Smoke tests of the decoding benchmarks: they run and print their tables."""

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


@pytest.mark.slow
def test_decode_compile_memory_benchmark_measures_both_option_sets():
    cmd = [sys.executable, str(ROOT / "experiments/benchmarks/decode_compile_memory.py")]
    cmd += ["--preset", "tiny", "--batches", "2", "--new-tokens", "4", "--reps", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'auto' = {'xla_cpu_use_fusion_emitters': False}" in out.stdout, out.stdout
    for row in ("| 2 | auto | +", "| 2 | xla | +"):
        assert row in out.stdout, out.stdout


@pytest.mark.slow
def test_decode_floors_benchmark_times_each_part_in_both():
    cmd = [sys.executable, str(ROOT / "experiments/benchmarks/decode_floors.py")]
    cmd += ["--batch", "2", "--slots", "16", "--reps", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for row in ("| 25 weight matmuls, batch 2 |", "| attention over 16 slots, 6 layers |"):
        assert row in out.stdout, out.stdout
