"""PPO on gymnax environments (genjax.rl.ppo): CartPole solved, bad input refused, the
experiment's files."""

import json
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from genjax.rl import ppo

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cartpole_reaches_475_within_half_a_million_steps_in_most_of_8_seeds(tmp_path):
    # The experiment as users run it, in its own process (it sets XLA's flags): purejaxrl's
    # settings, 4 envs × 128 steps, 5e5 steps, 4 epochs × 4 minibatches, 8 seeds.
    script = ROOT / "experiments" / "ppo_cartpole.py"
    cmd = [sys.executable, str(script), "--workdir", str(tmp_path), "--num-seeds", "8"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    assert re.search(r"return \d+(\.\d+)?", out) and "steps/s" in out
    report = json.loads((tmp_path / "returns.json").read_text())
    final = np.asarray(report["final_return"])
    assert len(final) == 8 and np.sum(final >= 475) >= 5, final
    assert (tmp_path / "returns.png").stat().st_size > 0
    # The curve rises: the first episodes are short.
    assert report["first_return"] < 200, report["first_return"]


def test_a_continuous_environment_trains_a_gaussian_policy():
    cfg = ppo.PPOConfig(env="Pendulum-v1", total_timesteps=2048, num_steps=64)
    params, metrics = jax.jit(ppo.make_train(cfg))(jax.random.key(0))
    assert params["log_std"].shape == (1,)
    assert metrics["returns"].shape == (cfg.num_updates,)
    assert np.all(np.isfinite(np.asarray(metrics["policy_loss"])))


def test_unknown_environment_and_bad_config_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown gymnax environment 'CartPole'.*CartPole-v1"):
        ppo.make_train(ppo.PPOConfig(env="CartPole"))
    with pytest.raises(ValueError, match="does not split into num_minibatches=3"):
        ppo.PPOConfig(num_minibatches=3)
    with pytest.raises(ValueError, match="less than one rollout"):
        ppo.PPOConfig(total_timesteps=100)


def test_episode_returns_average_the_episodes_that_ended():
    metrics = {"returns": np.array([0.0, 30.0, 10.0, 0.0]), "episodes": np.array([0, 2, 1, 0])}
    np.testing.assert_allclose(ppo.episode_returns(metrics, 2), [15.0, 10.0])
    assert np.isnan(ppo.episode_returns(metrics, 1)[0])
    assert ppo.final_return(metrics, 3) == pytest.approx(40 / 3)


def test_ppo_cartpole_refuses_an_unknown_environment(tmp_path):
    script = ROOT / "experiments" / "ppo_cartpole.py"
    cmd = [sys.executable, str(script), "--workdir", str(tmp_path), "--env", "NoSuchEnv-v0"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown gymnax environment 'NoSuchEnv-v0'" in proc.stderr


@pytest.mark.parametrize("shape", [(4, 64), (64, 64), (64, 2)])
def test_orthogonal_init_is_orthogonal_with_its_gain(shape):
    w = np.asarray(ppo.orthogonal(jax.random.key(0), shape, 2.0))
    gram = w.T @ w if shape[0] >= shape[1] else w @ w.T
    np.testing.assert_allclose(gram, 4.0 * np.eye(min(shape)), atol=1e-5)


def test_seeds_under_vmap_compile_to_no_lapack_call():
    # A batched LAPACK kernel (QR of jax's orthogonal init) deadlocked XLA:CPU's thread
    # pool under vmap over seeds; the program must not call one.
    train = ppo.make_train(ppo.PPOConfig(total_timesteps=512))
    keys = jax.random.split(jax.random.key(0), 4)
    hlo = jax.jit(jax.vmap(train)).lower(keys).as_text()
    assert "lapack" not in hlo.lower()
    assert "lapack" in jax.jit(jax.vmap(lambda k: jax.nn.initializers.orthogonal()(
        k, (8, 8)))).lower(keys).as_text().lower()  # fmt: skip
