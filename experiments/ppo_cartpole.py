"""PPO on a gymnax environment, every seed at once: the whole run one jitted function.

Command:

    python experiments/ppo_cartpole.py --workdir runs/ppo-cartpole --num-seeds 8 --cpu-devices 2

Hardware: a 2-core CPU; CartPole-v1 at purejaxrl's settings (4 environments × 128
steps, 500,000 environment steps, 4 epochs × 4 minibatches) trains 8 seeds under
``vmap`` in 12 s, 8 s more compiling (experiments/benchmarks/RESULTS.md). The seeds
are spread over the devices (``ppo.shard_seeds``); ``--cpu-devices N`` makes a CPU N
XLA devices, so that both cores work (27 s on one device). Writes
``DIR/returns.png`` (episodic return against environment steps, one line per seed)
and ``DIR/returns.json``, and prints the final mean episodic return (of the episodes
that ended in the last 10 updates, mean over seeds) and environment steps/s.

Any other gymnax environment by name (``--env Acrobot-v1``; continuous actions get a
Gaussian policy), and any field of ``genjax.rl.ppo.PPOConfig`` by
``--set field=value`` (e.g. ``--set total_timesteps=100000 lr=0.001``). Smoke run:

    python experiments/ppo_cartpole.py --workdir /tmp/ppo --set total_timesteps=4096
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import jax
import numpy as np

from genjax import config as configlib
from genjax import mesh as meshlib
from genjax.generative import pyplot
from genjax.rl import ppo

WINDOW = 10  # updates per point of the curve, and of the final return


def plot_returns(path: pathlib.Path, returns_SU: np.ndarray, steps_U: np.ndarray, env: str):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for seed, curve in enumerate(returns_SU):
        ax.plot(steps_U, curve, lw=1, label=f"seed {seed}" if len(returns_SU) <= 8 else None)
    ax.set(xlabel="environment steps", ylabel="episodic return", title=f"PPO on {env}")
    if len(returns_SU) <= 8:
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=pathlib.Path, required=True)
    p.add_argument("--num-seeds", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seeds seed .. seed + N − 1")
    p.add_argument("--env", default="CartPole-v1", help="any gymnax environment name")
    configlib.add_set_flag(p, "PPOConfig fields, e.g. num_envs=8 lr=3e-4", metavar="FIELD=VALUE")
    p.add_argument(
        "--cpu-devices", type=int, default=None,
        help="split the CPU into N XLA devices, the seeds spread over them (N = cores)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.num_seeds < 1:
        p.error(f"--num-seeds {args.num_seeds} must be >= 1")
    try:
        if args.cpu_devices is not None:
            meshlib.split_cpu(args.cpu_devices)
        cfg = configlib.override(ppo.PPOConfig(env=args.env), args.set)
        train = ppo.make_train(cfg)
    except ValueError as e:
        p.error(str(e))
    keys = ppo.shard_seeds(jax.random.split(jax.random.key(args.seed), args.num_seeds))

    t0 = time.perf_counter()
    compiled = jax.jit(jax.vmap(train)).lower(keys).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, metrics = jax.block_until_ready(compiled(keys))
    run_s = time.perf_counter() - t0

    env_steps = args.num_seeds * cfg.num_updates * cfg.steps_per_update
    devices = len(keys.sharding.device_set)
    window = min(WINDOW, cfg.num_updates)  # a short run is one point
    final = ppo.final_return(metrics, window)  # [seeds]
    curves = ppo.episode_returns(metrics, window)  # [seeds, U / window]
    steps = (np.arange(curves.shape[-1]) + 1) * window * cfg.steps_per_update
    args.workdir.mkdir(parents=True, exist_ok=True)
    plot_returns(args.workdir / "returns.png", curves, steps, cfg.env)
    report = {
        "env": cfg.env, "seeds": args.num_seeds, "final_return": final.tolist(),
        "mean_final_return": float(final.mean()),
        "first_return": float(np.nanmean(curves[:, 0])), "env_steps": env_steps,
        "env_steps_per_s": env_steps / run_s, "devices": devices,
        "compile_s": compile_s, "run_s": run_s,
        "config": dataclasses.asdict(cfg),
    }  # fmt: skip
    (args.workdir / "returns.json").write_text(json.dumps(report, indent=2) + "\n")
    each = ", ".join(f"{r:.0f}" for r in final)
    print(f"{cfg.env}: final mean episodic return {final.mean():.1f} over {args.num_seeds} "
          f"seeds (worst {final.min():.1f}; each: {each})")  # fmt: skip
    print(f"{env_steps:,} environment steps in {run_s:.1f} s: {env_steps / run_s:,.0f} steps/s "
          f"on {devices} device{'s' * (devices > 1)} (compile {compile_s:.1f} s) · "
          f"{args.workdir / 'returns.png'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
