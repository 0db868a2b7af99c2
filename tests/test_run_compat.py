"""A run written by genjax before the run layer (tests/fixtures/lm_run_v0, see the
README there) resumes, scores and exports to the numbers that code measured on it."""

import hashlib
import json
import pathlib
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from genjax.metrics_log import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "lm_run_v0"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())

pytestmark = pytest.mark.slow


@pytest.fixture
def old_run(tmp_path) -> pathlib.Path:
    workdir = tmp_path / "lm_run_v0"
    shutil.copytree(FIXTURE, workdir)  # resuming writes into it
    return workdir


def _python(*args: str) -> subprocess.CompletedProcess:
    # From the repository root: the run's corpus path is relative to it.
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_old_run_resumes_to_the_losses_the_old_code_computed(old_run):
    # The command that wrote it, continued to step 6.
    argv = shlex.split(EXPECTED["command"])[1:]
    argv[argv.index("--workdir") + 1] = str(old_run)
    argv[argv.index("--steps") + 1] = "6"
    proc = _python(*argv)
    assert "resumed from step 4" in proc.stdout
    losses = {r["step"]: r["loss"] for r in read_metrics(old_run) if "loss" in r}
    for step, loss in EXPECTED["resumed_to_6_losses"].items():
        np.testing.assert_allclose(losses[int(step)], loss, rtol=1e-6)
    expected_bpb = EXPECTED["resumed_to_6_val_bits_per_byte"]
    assert f"validation bits/byte: {expected_bpb:.4f}" in proc.stdout


def test_old_run_scores_as_the_old_code_did(old_run):
    target = "tests/fixtures/lm_corpus/bisect.py"
    proc = _python("-m", "genjax.score", "--workdir", str(old_run), target)
    bits = float(proc.stdout.strip().splitlines()[-1].removeprefix("bits_per_byte="))
    np.testing.assert_allclose(bits, EXPECTED["score_bisect_bits_per_byte"], atol=2e-6)


def test_old_run_exports_the_same_bytes(old_run, tmp_path):
    out = tmp_path / "hf"
    _python("-m", "genjax.interop.hf", "export", "--workdir", str(old_run), "--out", str(out))
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert digest == EXPECTED["export_model_safetensors_sha256"]
