"""The run layer with a family that is not a transformer (tests/toy_gan.py: two
parameter trees, two optimizers, an EMA copy): sharded equals one device,
kill-and-resume equals an uninterrupted run, chunked steps, non-finite losses."""

import dataclasses
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import warnings
from typing import NamedTuple

import chex
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from genjax import config as configlib
from genjax import mesh as meshlib
from genjax import run, train
from genjax.checkpoint import Checkpointer
from genjax.metrics_log import read_metrics
from tests import toy_gan
from tests.families import train_by_hand

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(*assignments: str) -> toy_gan.Config:
    return configlib.override(toy_gan.Config(), list(assignments))


LOSSES = ("d_loss", "g_loss")


def test_family_trains_sharded_on_data_and_fsdp_as_on_one_device():
    cfg = _config()
    one, state_one = train_by_hand(
        toy_gan.FAMILY, cfg, meshlib.make_mesh("data=1", jax.devices()[:1]), 10, LOSSES
    )
    many, state_many = train_by_hand(
        toy_gan.FAMILY, cfg, meshlib.make_mesh("data=4,fsdp=2"), 10, LOSSES
    )
    np.testing.assert_allclose(many, one, rtol=2e-5)
    chex.assert_trees_all_close(jax.device_get(state_many), jax.device_get(state_one), atol=2e-5)
    # Each parameter tree, its optimizer moments and the EMA copy are sharded as declared.
    w = state_many.g_params[0]["w"]
    assert w.sharding.spec == P(None, "fsdp") and w.addressable_shards[0].data.shape == (2, 8)
    assert state_many.g_opt_state[0].mu[0]["w"].sharding.spec == P(None, "fsdp")
    assert state_many.d_opt_state[0].nu[1]["w"].sharding.spec == P("fsdp", None)
    assert state_many.g_ema[1]["w"].sharding.spec == P("fsdp", None)
    assert state_many.step.sharding.spec == P()


def _cli(workdir, *flags):
    return [sys.executable, str(ROOT / "tests" / "toy_gan.py"), "--workdir", str(workdir), *flags]


def _losses(workdir) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["d_loss"], r["g_loss"]) for r in read_metrics(workdir) if "d_loss" in r}


def _committed(workdir) -> list[int]:
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.mark.slow
@pytest.mark.parametrize("updates_per_step", [1, 4])
def test_killed_run_resumes_with_identical_losses_and_parameters(tmp_path, updates_per_step):
    steps = 800  # the kill lands just after step 40's save: hundreds of steps still to run
    flags = ["--mesh", "data=4,fsdp=2", "--steps", str(steps), "--checkpoint-every", "40"]
    flags += ["--set", f"model.updates_per_step={updates_per_step}", "run.log_every=4"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(_cli(reference, *flags), check=True, env=env, capture_output=True, timeout=600)
    proc = subprocess.Popen(_cli(killed, *flags), env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not _committed(killed) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = _committed(killed)
    assert saved and max(_losses(killed)) < steps, "killed too late to test resume"
    resumed = subprocess.run(_cli(killed, *flags), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from step {saved[-1]}" in resumed.stdout
    assert _losses(killed) == _losses(reference)  # every logged step, before and after
    a, b = run.load(killed, toy_gan.FAMILY), run.load(reference, toy_gan.FAMILY)
    assert a.step == b.step == steps
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a.state), jax.device_get(b.state))


def test_chunked_step_stopped_and_resumed_equals_one_run(tmp_path):
    cfg = _config("model.updates_per_step=4", "run.log_every=4", "run.checkpoint_every=8")
    half = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, steps=16))
    run.train(half, tmp_path / "two_parts", toy_gan.FAMILY)
    resumed = run.train(cfg, tmp_path / "two_parts", toy_gan.FAMILY)
    whole = run.train(cfg, tmp_path / "one_part", toy_gan.FAMILY)
    assert int(whole.state.step) == 40
    chex.assert_trees_all_equal(jax.device_get(resumed.state), jax.device_get(whole.state))
    assert _losses(tmp_path / "two_parts") == _losses(tmp_path / "one_part")
    assert sorted(_losses(tmp_path / "one_part")) == list(range(4, 41, 4))


def test_chunked_step_needs_cadences_that_are_multiples_of_its_updates(tmp_path):
    cfg = _config("model.updates_per_step=4", "run.checkpoint_every=6", "run.log_every=4")
    with pytest.raises(ValueError, match=r"run\.checkpoint_every=6 is not a multiple of the 4"):
        run.train(cfg, tmp_path, toy_gan.FAMILY)
    assert not tmp_path.joinpath("checkpoints").exists()


@pytest.mark.parametrize("loss", ["d_loss", "g_loss"])
def test_non_finite_loss_in_either_network_stops_before_a_checkpoint(tmp_path, loss, capsys):
    argv = ["--workdir", str(tmp_path), "--set", f"model.nan_loss={loss}", "model.nan_from=11"]
    assert run.main(toy_gan.FAMILY, argv) == 2
    err = capsys.readouterr().err
    # The update that made step 12; a NaN discriminator then also poisons g_loss,
    # while a NaN generator leaves d_loss finite: each loss is checked alone.
    expected = "d_loss is nan, g_loss is nan" if loss == "d_loss" else "g_loss is nan"
    assert f"error: {expected} at step 12; stopping." in err
    assert "last good checkpoint (step 8) is untouched" in err
    assert _committed(tmp_path) == [8]
    state = run.load(tmp_path, toy_gan.FAMILY).state
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state)))


def test_a_signal_stops_the_command_with_its_own_exit_code_and_the_run_resumes(tmp_path, capsys):
    """SIGTERM mid-run: a checkpoint at that step, exit code 3 (a scheduler's cue to
    requeue), and the same command finishes the run."""
    sent = []

    def sigterm_at_third_batch(batch):  # read as the loop asks for batch 3
        if len(sent) < 3:
            sent.append(batch)
            if len(sent) == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would
        return batch

    def data_that_sends_sigterm_once(cfg, workdir):
        return toy_gan.data(cfg, workdir, lambda c: toy_gan.batches(c).map(sigterm_at_third_batch))

    family = dataclasses.replace(toy_gan.FAMILY, data=data_that_sends_sigterm_once)
    argv = ["--workdir", str(tmp_path)]
    assert run.main(family, argv) == run.EXIT_STOPPED == 3
    err = capsys.readouterr().err
    assert "stopped: toy-gan stopped by SIGTERM at step 3 of 40" in err
    assert _committed(tmp_path) == [3]
    assert run.main(family, argv) == 0
    assert _committed(tmp_path)[-1] == 40 and len(sent) == 3


def test_load_restores_the_whole_state_of_a_family(tmp_path):
    run.train(_config("run.steps=8"), tmp_path, toy_gan.FAMILY)
    loaded = run.load(tmp_path, toy_gan.FAMILY)
    assert loaded.step == 8 and isinstance(loaded.state, toy_gan.State)
    assert loaded.cfg == _config("run.steps=8")
    ema, g = jax.device_get((loaded.state.g_ema, loaded.state.g_params))
    assert not np.allclose(ema[0]["w"], g[0]["w"])  # a real EMA, not a copy


class _Counter(NamedTuple):
    step: jax.Array
    total: jax.Array


def test_fit_drives_a_step_that_makes_its_own_data():
    """batches=None (an environment inside the step, PPO style): fit calls step(state, None)."""
    mesh = meshlib.make_mesh("data=1", jax.devices()[:1])
    state = _Counter(jax.numpy.zeros((), jax.numpy.int32), jax.numpy.zeros(()))

    def step(s, batch):
        assert batch is None
        s = _Counter(s.step + 2, s.total + 1.0)  # two updates per call
        return s, {"loss": s.total}

    shardings = jax.tree.map(lambda _: meshlib.replicated(mesh), state)
    result = run.fit(state, train.jit_train_step(step, shardings, mesh), None, num_steps=6,
                     updates_per_step=2)  # fmt: skip
    assert int(result.state.step) == 6 and float(result.state.total) == 3.0


def test_preemption_sync_point_is_counted_in_calls_and_stops_the_run(tmp_path, monkeypatch):
    """Multi-host runs save and stop where JAX's preemption sync point falls: one step id
    past the largest reported, so a call of several updates reports every id it passed."""
    mesh = meshlib.make_mesh("data=1", jax.devices()[:1])
    state = _Counter(jax.numpy.zeros((), jax.numpy.int32), jax.numpy.zeros(()))
    step = lambda s, batch: (_Counter(s.step + 2, s.total + 1.0), {"loss": s.total})
    shardings = jax.tree.map(lambda _: meshlib.replicated(mesh), state)
    asked = []
    with Checkpointer(tmp_path, config={}, save_every=100) as ckpt:
        monkeypatch.setattr(
            ckpt._manager, "reached_preemption", lambda step: asked.append(step) or step == 5
        )
        result = run.fit(state, train.jit_train_step(step, shardings, mesh), None,
                         num_steps=20, updates_per_step=2, checkpointer=ckpt)  # fmt: skip
        assert ckpt.all_steps() == [6]  # saved after the call that passed the sync point
    assert asked[:6] == [1, 2, 3, 4, 5, 6] and result.stopped_by_signal == "preemption"
    assert int(result.state.step) == 6


def test_a_batch_the_mesh_cannot_split_is_a_clear_error(tmp_path, capsys):
    argv = ["--workdir", str(tmp_path), "--mesh", "data=4,fsdp=2", "--set", "model.batch=6"]
    assert run.main(toy_gan.FAMILY, argv) == 2
    assert "error: global batch size 6 is not divisible by the data-parallel size 8" in (
        capsys.readouterr().err
    )


def test_metrics_that_are_not_scalars_are_a_clear_error():
    mesh = meshlib.make_mesh("data=1", jax.devices()[:1])
    state = _Counter(jax.numpy.zeros((), jax.numpy.int32), jax.numpy.zeros(()))
    step = lambda s, batch: (_Counter(s.step + 1, s.total), {"loss": jax.numpy.zeros(3)})
    shardings = jax.tree.map(lambda _: meshlib.replicated(mesh), state)
    with pytest.raises(ValueError, match=r"metrics must be scalars, got shapes \{'loss': \(3,\)\}"):
        run.fit(state, train.jit_train_step(step, shardings, mesh), None, num_steps=2)


def _family(evaluate=None, finish=None, batches=toy_gan.batches) -> run.Family:
    """toy_gan with an end-of-run evaluation and ``finish`` of the test's own."""

    def data(cfg, workdir):
        return dataclasses.replace(
            toy_gan.data(cfg, workdir, batches), evaluate=evaluate, finish=finish
        )

    return dataclasses.replace(toy_gan.FAMILY, data=data)


def _evaluations(workdir) -> list[tuple[int, float]]:
    return [(r["step"], r["eval_step"]) for r in read_metrics(workdir) if "eval_step" in r]


def test_a_corrupt_last_checkpoint_is_written_again(tmp_path):
    """run.steps not a multiple of checkpoint_every: the last step's checkpoint is the one
    the end of the run forces; found corrupt, it is rewritten rather than kept."""
    cfg = _config("run.steps=12", "run.checkpoint_every=8")
    run.train(cfg, tmp_path, toy_gan.FAMILY)
    shutil.rmtree(tmp_path / "checkpoints" / "12" / "state")
    with pytest.warns(UserWarning, match=r"skipped checkpoint step 12 .*: restored step 8$"):
        assert int(run.train(cfg, tmp_path, toy_gan.FAMILY).state.step) == 12
    assert _committed(tmp_path) == [8, 12]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # step 12 restores now
        assert run.load(tmp_path, toy_gan.FAMILY).step == 12


def test_an_evaluation_is_logged_before_its_step_is_saved(tmp_path):
    """A run that dies while evaluating at a checkpoint step resumes from the step before,
    so that evaluation is not lost."""

    def dies_at_step_8(state):
        if int(state.step) == 8:
            raise RuntimeError("killed while evaluating")
        return {"eval_step": float(state.step)}

    cfg = _config("run.steps=16", "run.eval_every=4")
    with pytest.raises(RuntimeError, match="killed while evaluating"):
        run.train(cfg, tmp_path, _family(dies_at_step_8))
    assert _committed(tmp_path) == []
    run.train(cfg, tmp_path, _family(lambda state: {"eval_step": float(state.step)}))
    assert _evaluations(tmp_path) == [(4, 4.0), (8, 8.0), (12, 12.0), (16, 16.0)]


def test_a_finished_run_run_again_evaluates_and_finishes_without_logging_twice(tmp_path):
    finished = []
    family = _family(
        lambda state: {"eval_step": float(state.step)},
        lambda state, metrics: finished.append((int(state.step), metrics)),
    )
    cfg = _config("run.steps=8")
    for _ in range(2):
        run.train(cfg, tmp_path, family)
    assert finished == [(8, {"eval_step": 8.0})] * 2
    assert _evaluations(tmp_path) == [(8, 8.0)]


@pytest.mark.parametrize("when", ["the last step", "the final evaluation", "finish"])
def test_a_signal_at_the_end_of_a_run_stops_it_and_the_command_ends_it(tmp_path, capsys, when):
    """SIGTERM on the last step, or while the run evaluates or makes its output: exit 3
    (not 143 from the default handler, or 0 with the output missing), and the same
    command does the end again."""
    sent = []

    def sigterm_once(where):
        if where == when and not sent:
            sent.append(where)
            os.kill(os.getpid(), signal.SIGTERM)

    read = []

    def batch_read(batch):  # as the loop asks for each batch
        read.append(batch)
        if len(read) == 8:
            sigterm_once("the last step")
        return batch

    ended = []

    def evaluate(state):
        sigterm_once("the final evaluation")
        return {"eval_step": float(state.step)}

    def finish(state, metrics):
        sigterm_once("finish")
        ended.append(int(state.step))

    family = _family(evaluate, finish, lambda c: toy_gan.batches(c).map(batch_read))
    argv = ["--workdir", str(tmp_path), "--steps", "8"]
    assert run.main(family, argv) == run.EXIT_STOPPED
    assert sent == [when] and ended == []
    assert "stopped by SIGTERM after its last step (8), before its final evaluation" in (
        capsys.readouterr().err
    )
    assert run.main(family, argv) == 0
    assert ended == [8] and _evaluations(tmp_path) == [(8, 8.0)]


def test_a_run_past_the_steps_asked_for_is_a_clear_error(tmp_path, capsys):
    run.train(_config("run.steps=16"), tmp_path, toy_gan.FAMILY)
    assert run.main(toy_gan.FAMILY, ["--workdir", str(tmp_path), "--steps", "8"]) == 2
    assert "error: the state is at step 16, past the 8 steps asked for" in capsys.readouterr().err


def test_data_that_runs_out_is_a_clear_error_after_a_checkpoint(tmp_path, capsys):
    def ten_batches(cfg):
        return toy_gan.batches(cfg)[:10]

    argv = ["--workdir", str(tmp_path), "--steps", "16"]
    assert run.main(_family(batches=ten_batches), argv) == 2
    assert "error: the data ran out after step 10 of 16, saved in a checkpoint" in (
        capsys.readouterr().err
    )
    assert _committed(tmp_path) == [8, 10]


def test_a_second_signal_interrupts_a_step(tmp_path):
    """The first Ctrl-C asks the loop to stop after this step; a second one, for a step
    that never ends, gets the handler from before: here Python's own KeyboardInterrupt
    (set, since whatever ran earlier in this process may have left another)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    state = _Counter(jax.numpy.zeros((), jax.numpy.int32), jax.numpy.zeros(()))

    def stuck_step(s, batch):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # never reached
        return s, {}

    try:
        with pytest.raises(KeyboardInterrupt):
            run.fit(state, stuck_step, None, num_steps=2)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_jax_would_fold_onto_another_is_refused(seed):
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\)"):
        run.RunConfig(seed=seed)
