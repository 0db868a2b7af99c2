"""The diffusion family on the run layer: experiment outputs, sharding, kill-and-resume,
the sampling CLI and its bad input."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from genjax import diffuse, run, sample
from genjax import mesh as meshlib
from genjax.metrics_log import read_metrics
from tests.families import train_by_hand

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "diffusion_2d.py"
TINY = diffuse.PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ring")
    assert run.main(diffuse.FAMILY, ["--workdir", str(workdir), "--preset", "tiny"]) == 0
    return workdir


def test_tiny_preset_writes_samples_picture_and_scores(tiny_run):
    samples = np.load(tiny_run / "samples.npy")
    assert samples.shape == (TINY.sample.num, 2) and np.isfinite(samples).all()
    assert (tiny_run / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tiny_run / "eval.json").read_text())
    assert set(report["samples"]) == {"modes", "high_quality", "reverse_kl"}
    assert report["perfect_sampler"]["modes"] == 8
    logged = [r for r in read_metrics(tiny_run) if "modes" in r]
    assert [r["step"] for r in logged] == [TINY.run.steps]  # the final evaluation, once


def test_sharded_training_equals_one_device():
    one, state_one = train_by_hand(
        diffuse.FAMILY, TINY, meshlib.make_mesh("data=1", jax.devices()[:1]), 5
    )
    many, state_many = train_by_hand(diffuse.FAMILY, TINY, meshlib.make_mesh("data=4,fsdp=2"), 5)
    np.testing.assert_allclose(many, one, rtol=2e-5)
    chex.assert_trees_all_close(
        jax.device_get(state_many.ema_params), jax.device_get(state_one.ema_params), atol=2e-5
    )
    w = state_many.params["w_in_DH"]
    assert w.sharding.spec == P(None, "fsdp")
    assert state_many.ema_params["w_in_DH"].sharding.spec == P(None, "fsdp")


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def _committed(workdir):
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_losses_and_ema(tmp_path):
    steps = 1000  # the kill lands just after step 100's save: hundreds of steps still to run
    flags = ["--preset", "tiny", "--steps", str(steps), "--checkpoint-every", "100"]
    flags += ["--set", "run.log_every=10", "sample.num=16", "sample.steps=2"]
    cmd = lambda w: [sys.executable, str(SCRIPT), "--workdir", str(w), *flags]
    env = dict(os.environ)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(cmd(reference), check=True, env=env, capture_output=True, timeout=600)
    proc = subprocess.Popen(cmd(killed), env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not _committed(killed) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = _committed(killed)
    assert saved and max(_losses(killed)) < steps, "killed too late to test resume"
    resumed = subprocess.run(cmd(killed), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from step {saved[-1]}" in resumed.stdout
    assert _losses(killed) == _losses(reference)
    a, b = run.load(killed, diffuse.FAMILY), run.load(reference, diffuse.FAMILY)
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(a.state.ema_params),
        jax.device_get(b.state.ema_params),
    )


def test_sample_cli_draws_with_any_sampler(tiny_run, capsys):
    out = tiny_run / "more.npy"
    argv = ["--workdir", str(tiny_run), "--sampler", "dpmpp2m", "--steps", "4", "--num", "32"]
    assert sample.main([*argv, "--out", str(out)]) == 0
    assert np.load(out).shape == (32, 2)
    assert f"step {TINY.run.steps}, dpmpp2m with 4 steps: modes" in capsys.readouterr().out


@pytest.mark.parametrize(("sampler", "option"), [("heun", "--churn"), ("ddim", "--eta")])
def test_sample_cli_noise_options_change_the_samples(tiny_run, sampler, option):
    argv = ["--workdir", str(tiny_run), "--sampler", sampler, "--steps", "4", "--num", "32"]
    paths = [tiny_run / f"{sampler}-{value}.npy" for value in ("0", "1")]
    for value, path in zip(("0", "1"), paths, strict=True):
        assert sample.main([*argv, option, value, "--out", str(path)]) == 0
    deterministic, noisy = (np.load(path) for path in paths)
    assert np.isfinite(noisy).all() and not np.allclose(deterministic, noisy)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--sampler", "magic"], "unknown sampler 'magic'"),
        (["--steps", "0"], "--steps=0 must be >= 1"),
        (["--guidance", "2"], "--guidance needs a class- or text-conditional model"),
        (["--churn", "-1"], "--churn=-1.0 must be >= 0"),
        (["--eta", "-0.5"], "--eta=-0.5 must be >= 0"),
    ],
)
def test_sample_cli_bad_input_is_one_error(tiny_run, capsys, extra, match):
    assert sample.main(["--workdir", str(tiny_run), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err


def test_bad_config_values_are_clear_errors(tmp_path, capsys):
    for assignment, match in [
        ("sample.sampler=magic", "unknown sampler 'magic'"),
        ("process.sde=cosine", "sde='cosine'"),
        ("sample.steps=0", "steps=0 and num=2500 must be >= 1"),
        ("data.dataset=spiral", "unknown dataset 'spiral'"),
    ]:
        argv = ["--workdir", str(tmp_path / "w"), "--set", assignment]
        assert run.main(diffuse.FAMILY, argv) == 2
        assert match in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_noise_scales_follow_the_mixture_spread():
    ring = run.configure(diffuse.FAMILY, "default", ["data.dataset=ring"]).process
    grid = run.configure(diffuse.FAMILY, "default", ["data.dataset=grid"]).process
    assert (ring.sigma_data, ring.p_mean) == (0.5, -3.0)  # the values tuned on the ring
    # The grid's coordinates spread sqrt(8 + 0.05²) against the ring's sqrt(1/2 + 0.01²).
    ratio = np.sqrt((8 + 0.05**2) / (0.5 + 0.01**2))
    np.testing.assert_allclose(grid.sigma_data, 0.5 * ratio, rtol=1e-6)
    np.testing.assert_allclose(grid.p_mean, -3.0 + np.log(ratio), rtol=1e-6)
    assert grid.p_std == ring.p_std
    mine = ["data.dataset=grid", "process.sigma_data=1", "process.p_mean=-2"]
    kept = run.configure(diffuse.FAMILY, "default", mine).process
    assert (kept.sigma_data, kept.p_mean) == (1.0, -2.0)


def test_the_grid_trains_longer_than_the_ring_unless_steps_are_given():
    def configure(*assignments):
        return run.configure(diffuse.FAMILY, "default", list(assignments))

    ring, grid = configure("data.dataset=ring"), configure("data.dataset=grid")
    assert (ring.run.steps, grid.run.steps) == (16_000, 24_000)
    assert grid.optim.total_steps == 24_000  # the schedule spans the longer run
    assert configure("data.dataset=grid", "run.steps=500").run.steps == 500
