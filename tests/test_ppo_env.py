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
    # The experiment as users run it, in its own process: purejaxrl's settings, 4 envs ×
    # 128 steps, 5e5 steps, 4 epochs × 4 minibatches, 8 seeds over the CPU split in two.
    script = ROOT / "experiments" / "ppo_cartpole.py"
    cmd = [sys.executable, str(script), "--workdir", str(tmp_path), "--num-seeds", "8",
           "--cpu-devices", "2"]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    assert re.search(r"return \d+(\.\d+)?", out) and "steps/s on 2 devices" in out
    report = json.loads((tmp_path / "returns.json").read_text())
    assert report["devices"] == 2
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


@pytest.mark.parametrize(
    "args, message",
    [
        (["--env", "NoSuchEnv-v0"], "unknown gymnax environment 'NoSuchEnv-v0'"),
        (["--cpu-devices", "0"], "--cpu-devices=0 must be >= 1"),
    ],
)
def test_ppo_cartpole_refuses_bad_arguments(tmp_path, args, message):
    script = ROOT / "experiments" / "ppo_cartpole.py"
    cmd = [sys.executable, str(script), "--workdir", str(tmp_path), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_ppo_cartpole_smoke_run_shorter_than_a_curve_point(tmp_path, load_script):
    # The docstring's smoke run: 8 updates, fewer than the 10 of a point of the curve.
    script = load_script("experiments/ppo_cartpole.py")
    args = ["--workdir", str(tmp_path), "--num-seeds", "2", "--set", "total_timesteps=4096"]
    assert script.main(args) == 0
    report = json.loads((tmp_path / "returns.json").read_text())
    assert len(report["final_return"]) == 2 and report["devices"] == 2
    assert 0 < report["first_return"] < 200


def test_seeds_spread_over_devices_train_as_on_one_device_and_never_communicate():
    # conftest gives 8 CPU devices. Seeds share nothing, so spread over devices the
    # program has no collective, and each seed's numbers are its one-device numbers (to
    # float rounding: a device's matmuls see 1 seed, not 8). A clip fraction counts the
    # entries on one side of a boundary, and rounding moves the few that sit on it (at
    # the first minibatch a value equals its old value): each is 1/2048 of the mean.
    train = jax.jit(jax.vmap(ppo.make_train(ppo.PPOConfig(total_timesteps=1024))))
    keys = jax.random.split(jax.random.key(0), 8)
    spread = ppo.shard_seeds(keys)
    assert len(spread.sharding.device_set) == 8
    hlo = train.lower(spread).compile().as_text()
    assert not re.search(r"all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter", hlo)
    params, metrics = train(spread)
    assert len(params["actor"][0]["w"].sharding.device_set) == 8
    one_params, one_metrics = train(jax.device_put(keys, jax.devices()[0]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 one_params, params)  # fmt: skip
    for name, value in one_metrics.items():
        atol = 4 / 2048 if name.endswith("fraction") else 1e-6
        np.testing.assert_allclose(value, metrics[name], rtol=1e-4, atol=atol, err_msg=name)
    # Seeds that do not split over all the devices use as many as divide them.
    assert len(ppo.shard_seeds(keys[:6]).sharding.device_set) == 2
    assert len(ppo.shard_seeds(keys[:3]).sharding.device_set) == 1
    with pytest.raises(ValueError, match=r"one key per seed, shape \[S\], not \(\)"):
        ppo.shard_seeds(keys[0])


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
