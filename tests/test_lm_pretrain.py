"""End to end: the pre-training script, kill-and-resume, scoring, bad input."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import numpy as np
import pytest

from genjax import run

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "lm_pretrain.py"
STEPS = 40
COMMON = [
    "--preset", "tiny", "--steps", str(STEPS), "--checkpoint-every", "10",
    "--mesh", "data=2,fsdp=2,tensor=2", "--sample-tokens", "0",
    "--set", "data.seq_len=32", "data.global_batch_size=8", "run.log_every=1",
    "model.vocab_size=384",
]  # fmt: skip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    """A small real corpus: a few stdlib packages, split into train/val by module."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for name in ("json", "email", "logging", "importlib", "html", "http"):
        shutil.copytree(stdlib / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _env():
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(workdir, corpus, *extra, check=True):
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--workdir",
        str(workdir),
        "--corpus",
        str(corpus),
        *COMMON,
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def _start(workdir, corpus):
    cmd = [sys.executable, str(SCRIPT), "--workdir", str(workdir), "--corpus", str(corpus), *COMMON]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env()
    )


def _losses(workdir) -> dict[int, float]:
    """Last logged loss of every step (a resumed run re-logs steps after its checkpoint)."""
    out = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def _committed_steps(workdir) -> list[int]:
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _final_params(workdir):
    from genjax import lm

    loaded = lm.load(workdir)
    assert loaded.step == STEPS
    import jax

    return jax.tree.leaves(jax.device_get(loaded.params))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    proc = _run(workdir, corpus)
    return workdir, proc


def test_run_logs_every_step_and_validates(uninterrupted):
    workdir, proc = uninterrupted
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1]
    assert "validation bits/byte" in proc.stdout
    assert (workdir / "tokenizer.model").exists()
    assert list((workdir / "tensorboard").iterdir())
    assert _committed_steps(workdir)[-1] == STEPS


def _interrupt_and_resume(tmp_path, corpus, sig):
    workdir = tmp_path / "run"
    proc = _start(workdir, corpus)
    deadline = time.time() + 300
    while not _committed_steps(workdir) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, (
        "run finished before it could be interrupted:\n" + proc.stdout.read()
    )
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:  # stopped, not finished: a scheduler can tell
        assert proc.returncode == run.EXIT_STOPPED, out
    stopped_at = max(_losses(workdir))
    assert stopped_at < STEPS, out
    saved_before_resume = _committed_steps(workdir)
    resumed = _run(workdir, corpus)
    assert f"resumed from step {saved_before_resume[-1]}" in resumed.stdout
    return workdir, stopped_at, saved_before_resume, out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_run_resumes_exactly(tmp_path, corpus, uninterrupted, sig):
    ref_dir, _ = uninterrupted
    workdir, stopped_at, saved, out = _interrupt_and_resume(tmp_path, corpus, sig)
    if sig == signal.SIGTERM:
        # The handler saved the step it stopped at, off the every-10-steps cadence.
        assert f"SIGTERM received: saved a checkpoint at step {stopped_at}" in out
        assert saved[-1] == stopped_at
    # Every step's loss, before and after the interruption, equals the uninterrupted run's.
    assert _losses(workdir) == _losses(ref_dir)
    for a, b in zip(_final_params(workdir), _final_params(ref_dir), strict=True):
        np.testing.assert_array_equal(a, b)


def test_score_prints_total_bits_per_byte(uninterrupted, corpus):
    workdir, _ = uninterrupted
    files = sorted((corpus / "json").glob("*.py"))[:2]
    proc = subprocess.run(
        [sys.executable, "-m", "genjax.score", "--workdir", str(workdir), *map(str, files)],
        capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("bits_per_byte=")
    total = float(lines[-1].split("=")[1])
    per_file = [line.split("\t") for line in lines[: len(files)]]
    n_bytes = [int(b.split()[0]) for _, b, _ in per_file]
    bpb = [float(x.split()[0]) for _, _, x in per_file]
    assert n_bytes == [len(f.read_bytes()) for f in files]
    np.testing.assert_allclose(total, np.dot(n_bytes, bpb) / sum(n_bytes), rtol=1e-3)
    np.testing.assert_allclose(bpb[0], _direct_bits_per_byte(workdir, files[0]), rtol=1e-5)


def _direct_bits_per_byte(workdir, path) -> float:
    """The same number without genjax.evaluate: every token's NLL on one device."""
    import jax

    from genjax import lm
    from genjax.data import document_rows
    from genjax.models import transformer

    loaded = lm.load(workdir)
    tok, seq_len = loaded.tokenizer, loaded.cfg.data.seq_len
    params = jax.device_put(jax.device_get(loaded.params), jax.devices()[0])
    rows, mask = document_rows(tok.encode(path.read_bytes().decode()), seq_len, tok.eos_id)
    nll = transformer.token_nll(loaded.cfg.model, params, jax.numpy.asarray(rows))
    return float((np.asarray(nll) * mask).sum() / np.log(2) / len(path.read_bytes()))


def _assert_only_the_message(proc, match: str) -> None:
    """Exit code 2, and the whole output is the one error message (no traceback)."""
    assert proc.returncode == 2
    assert proc.stdout == "", proc.stdout
    assert proc.stderr.startswith("error: ") and proc.stderr.count("error: ") == 1, proc.stderr
    assert match in proc.stderr
    assert "Traceback" not in proc.stderr and "ERROR:" not in proc.stderr, proc.stderr


def test_checkpoint_from_another_model_config_is_refused(uninterrupted, corpus):
    workdir, _ = uninterrupted
    proc = _run(workdir, corpus, "model.d_model=32", check=False)  # continues COMMON's --set
    _assert_only_the_message(proc, "model.d_model: checkpoint 64, this run 32")


@pytest.mark.parametrize("case", ["empty", "missing"])
def test_empty_or_missing_corpus_is_a_clear_error(tmp_path, case):
    corpus = tmp_path / "corpus"
    if case == "empty":
        corpus.mkdir()
    proc = _run(tmp_path / "w", corpus, check=False)
    match = "corpus is empty" if case == "empty" else f"corpus path does not exist: {corpus}"
    _assert_only_the_message(proc, match)


def test_corrupt_newest_checkpoint_is_one_warning_line(uninterrupted, corpus, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], workdir)
    for f in (workdir / "checkpoints" / str(STEPS) / "state").rglob("d/*"):
        f.write_bytes(b"garbage")
    proc = _run(workdir, corpus, "--steps", str(STEPS + 10))
    output = proc.stdout + proc.stderr
    warnings = [line for line in output.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1, output
    assert warnings[0].startswith(f"warning: skipped checkpoint step {STEPS} (")
    assert warnings[0].endswith(f"restored step {STEPS - 10}")
    assert f"resumed from step {STEPS - 10}" in proc.stdout
    assert "Traceback" not in output and "never retrieved" not in output, output


def test_tiny_preset_trains_with_no_other_flag(tmp_path):
    """The tiny preset alone: its model's context sets the rows, the stdlib the corpus."""
    cmd = [sys.executable, str(SCRIPT), "--workdir", str(tmp_path), "--preset", "tiny"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training rows of 64 tokens" in proc.stdout + proc.stderr
    assert "validation bits/byte" in proc.stdout
    assert (
        "sample (greedy):" in proc.stdout and "sample (temperature 0.8, top-p 0.95):" in proc.stdout
    )
    assert _committed_steps(tmp_path)[-1] == 100


def test_corpus_of_one_module_needs_no_validation(tmp_path, corpus):
    one_module = corpus / "json" / "decoder.py"
    proc = _run(tmp_path / "w", one_module, check=False)
    assert proc.returncode != 0
    assert "data.val_fraction=0" in proc.stderr
    # As the message says: no validation split, and the run ends with a sample.
    settings = COMMON[COMMON.index("--set") + 1 :]
    extra = ["--steps", "2", "--sample-tokens", "8", "--set", *settings, "data.val_fraction=0"]
    proc = _run(tmp_path / "w2", one_module, *extra)
    assert "validation bits/byte" not in proc.stdout
    assert "sample (greedy):\ndef fibonacci(n):\n" in proc.stdout


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--mesh", "data=3"], "has 3 devices but 8 are available"),
        (["--set", "data.global_batch_size=6"], "not divisible by the data-parallel size 4"),
        (["--set", "model.nonsense=1"], "nonsense"),
    ],
)
def test_bad_arguments_fail_before_compiling(tmp_path, corpus, extra, match):
    proc = _run(tmp_path / "w", corpus, *extra, check=False)
    _assert_only_the_message(proc, match)
    assert not (tmp_path / "w" / "checkpoints").exists()
