"""PPO on CartPole-v1, side by side: genjax against rejax's PPO and stable-baselines3's.

The same hyperparameters on every side (purejaxrl's): 4 environments × 128 steps per
rollout, 500,000 environment steps, 4 epochs × 4 minibatches, Adam lr 2.5e-4 (annealed
linearly to 0 where the side can: genjax and SB3; rejax's is constant), γ 0.99, GAE λ
0.95, clip 0.2, value coefficient 0.5, entropy 0.01, gradient norm 0.5 (rejax clips each
gradient element at 0.5 instead, and takes the actor's and critic's steps apart), actor
and critic MLPs 2 × 64 tanh.

- **genjax**: ``genjax.rl.ppo.make_train`` under ``jax.jit``, one seed and ``--seeds``
  seeds under ``jax.vmap``; compile (lower + compile) timed apart from the run. With
  ``--genjax-cpu-devices N`` the CPU is split into N XLA devices
  (``genjax.mesh.split_cpu``) and the seeds spread over them (``ppo.shard_seeds``), as
  ``ppo_cartpole.py --cpu-devices N`` runs them.
- **rejax** 0.1.3: ``rejax.PPO.create(...).train`` under ``jax.jit`` (and ``vmap``),
  on gymnax's CartPole-v1 through a two-line adapter: rejax reads gymnax's older
  5-tuple ``step``, gymnax 1.0 returns termination and truncation apart (rejax then
  treats both as the end of the episode, as it always did). Its evaluation callback runs
  once, at the end (``eval_freq`` = the whole run), inside the timed call: 128 episodes
  of the final policy, a small share of the run that counts against rejax. rejax has no
  way to spread seeds over devices; ``--rejax-cpu-devices N`` gives it the same split
  by hand (its keys placed by ``ppo.shard_seeds``), to show what the split alone is worth.
- **sb3**: stable-baselines3's ``PPO("MlpPolicy")`` on gymnasium's CartPole-v1 with 4
  ``DummyVecEnv`` environments, torch on CPU: one seed (``--sb3-seeds`` more run one
  after another; SB3 has no batched seeds, so its rate at N seeds is its 1-seed rate).

Reported per side and seed count: environment steps/s (all seeds' steps over the run's
wall time, the median of ``--reps`` runs in each of ``--rounds`` processes, the JAX
sides taking turns), compile time (the first call's extra time for rejax, whose
``train`` is jitted inside), and the final return: genjax, the mean return
of the training episodes that ended in the last 10 updates; rejax, its own evaluation (128
episodes of the final policy); SB3, the mean of its last 100 training episodes. Seeds at
return ≥ 475 are counted. Ratios are genjax over each peer.

    python experiments/benchmarks/ppo_speed.py --rounds 2 --genjax-cpu-devices 2 \
        --results experiments/benchmarks/RESULTS.md
    python experiments/benchmarks/ppo_speed.py --rounds 2 --genjax-cpu-devices 2 \
        --rejax-cpu-devices 2 --sides genjax,rejax     # both sides on both cores
    python experiments/benchmarks/ppo_speed.py --timesteps 8192 --seeds 2 --reps 1  # smoke

Needs the ``bench`` extra (rejax, stable-baselines3 and torch==2.13.0, a CPU build);
nothing beyond genjax with ``--sides genjax``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

from genjax import benchmarking

SIDES = ("genjax", "rejax", "sb3")
SOLVED = 475.0


def hyper(spec: dict) -> dict:
    return {"num_envs": 4, "num_steps": 128, "total_timesteps": spec["timesteps"],
            "update_epochs": 4, "num_minibatches": 4, "lr": 2.5e-4}  # fmt: skip


def peer_steps(h: dict) -> int:
    """The steps rejax and stable-baselines3 run for ``total_timesteps``: whole rollouts
    until it is reached (977 × 512 for 500,000), where genjax stops at whole updates
    within it (976 × 512); each side is credited the steps it ran."""
    per_update = h["num_envs"] * h["num_steps"]
    return -(-h["total_timesteps"] // per_update) * per_update


def timed_runs(run, reps: int) -> tuple[float, list[float], object]:
    """(median seconds, every time, the last result) of ``reps`` calls of run()."""
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def seed_keys(seeds: int):
    """The keys of ``seeds`` seeds, spread over the side's devices."""
    import jax

    from genjax.rl import ppo

    return ppo.shard_seeds(jax.random.split(jax.random.key(0), seeds))


def genjax_side(spec: dict) -> dict:
    import jax

    from genjax import mesh as meshlib
    from genjax.rl import ppo

    meshlib.split_cpu(spec["cpu_devices"]["genjax"])  # before JAX starts
    cfg = ppo.PPOConfig(**hyper(spec))
    train = ppo.make_train(cfg)
    rows = {}
    for seeds in spec["seed_counts"]:
        keys = seed_keys(seeds)
        fn = jax.jit(jax.vmap(train)) if seeds > 1 else jax.jit(train)
        args = keys if seeds > 1 else keys[0]
        t0 = time.perf_counter()
        compiled = fn.lower(args).compile()
        compile_s = time.perf_counter() - t0
        run_s, times, (_, metrics) = timed_runs(
            lambda c=compiled, a=args: jax.block_until_ready(c(a)), spec["reps"]
        )
        final = np.atleast_1d(ppo.final_return(metrics))
        steps = seeds * cfg.num_updates * cfg.steps_per_update
        rows[seeds] = {"steps_per_s": steps / run_s, "compile_s": compile_s, "run_s": run_s,
                       "steps": steps, "times": times, "final_return": final.tolist(),
                       "devices": len(keys.sharding.device_set)}  # fmt: skip
    return {"rows": rows, "versions": benchmarking.jax_side_versions()}


def rejax_side(spec: dict) -> dict:
    import jax

    from genjax import mesh as meshlib

    meshlib.split_cpu(spec["cpu_devices"]["rejax"])  # before JAX starts

    import gymnax
    import rejax

    env, env_params = gymnax.make("CartPole-v1")

    class FiveTupleStep(type(env)):
        """gymnax 1.0's CartPole with the 5-tuple ``step`` rejax 0.1.3 unpacks."""

        def step(self, key, state, action, params=None):
            obs, state, reward, terminated, truncated, info = super().step(
                key, state, action, params
            )
            return obs, state, reward, terminated | truncated, info

    h = hyper(spec)
    algo = rejax.PPO.create(
        env=FiveTupleStep(), env_params=env_params, num_envs=h["num_envs"],
        num_steps=h["num_steps"], total_timesteps=h["total_timesteps"],
        num_epochs=h["update_epochs"], num_minibatches=h["num_minibatches"],
        learning_rate=h["lr"], gamma=0.99, gae_lambda=0.95, clip_eps=0.2, vf_coef=0.5,
        ent_coef=0.01, max_grad_norm=0.5, agent_kwargs={"activation": "tanh"},
        eval_freq=h["total_timesteps"], skip_initial_evaluation=True,
    )  # fmt: skip
    rows = {}
    for seeds in spec["seed_counts"]:
        keys = seed_keys(seeds)
        fn = jax.jit(jax.vmap(algo.train)) if seeds > 1 else jax.jit(algo.train)
        args = keys if seeds > 1 else keys[0]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(args))
        first_s = time.perf_counter() - t0
        run_s, times, (_, (_, returns)) = timed_runs(
            lambda f=fn, a=args: jax.block_until_ready(f(a)), spec["reps"]
        )
        # returns: [(seeds,) evaluations, 128 episodes]; the last evaluation is the end.
        final = np.asarray(returns).reshape(seeds, -1, np.asarray(returns).shape[-1])[:, -1]
        steps = seeds * peer_steps(h)
        rows[seeds] = {"steps_per_s": steps / run_s, "compile_s": max(first_s - run_s, 0.0),
                       "run_s": run_s, "steps": steps, "times": times,
                       "final_return": final.mean(-1).tolist(),
                       "devices": len(keys.sharding.device_set)}  # fmt: skip
    versions = {name: importlib.metadata.version(name) for name in ("rejax", "gymnax")}
    return {"rows": rows, "versions": versions}


def sb3_side(spec: dict) -> dict:
    import stable_baselines3 as sb3
    import torch
    from stable_baselines3.common.env_util import make_vec_env

    torch.set_num_threads(spec["threads"])
    h = hyper(spec)
    finals, times = [], []
    for seed in range(spec["sb3_seeds"]):
        env = make_vec_env("CartPole-v1", n_envs=h["num_envs"], seed=seed)
        model = sb3.PPO(
            "MlpPolicy", env, n_steps=h["num_steps"],
            batch_size=h["num_envs"] * h["num_steps"] // h["num_minibatches"],
            n_epochs=h["update_epochs"], learning_rate=lambda left: h["lr"] * left,
            gamma=0.99, gae_lambda=0.95, clip_range=0.2, ent_coef=0.01, vf_coef=0.5,
            max_grad_norm=0.5, seed=seed, device="cpu",
            policy_kwargs={"net_arch": {"pi": [64, 64], "vf": [64, 64]},
                           "activation_fn": torch.nn.Tanh},
        )  # fmt: skip
        t0 = time.perf_counter()
        model.learn(total_timesteps=h["total_timesteps"])
        times.append(time.perf_counter() - t0)
        finals.append(float(np.mean([ep["r"] for ep in model.ep_info_buffer])))
    run_s = statistics.median(times)
    row = {"steps_per_s": peer_steps(h) / run_s, "compile_s": 0.0, "run_s": run_s,
           "final_return": finals, "devices": "–"}  # fmt: skip
    versions = {"stable-baselines3": sb3.__version__, "torch": torch.__version__}
    return {"rows": {seeds: row for seeds in spec["seed_counts"]}, "versions": versions}


CHILDREN = {"genjax": genjax_side, "rejax": rejax_side, "sb3": sb3_side}


def run_rounds(sides: list[str], spec: dict, rounds: int) -> dict:
    """Each side's result over ``rounds`` fresh processes, the JAX sides taking turns
    (reversed order every other round) so that a machine slowing down over minutes
    weighs on both; SB3 runs in the first round only. A side's rate is over the median
    of every timed run of every round, its compile time the median of the rounds'."""
    jax_sides = [s for s in sides if s != "sb3"]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(rounds):
        order = jax_sides if r % 2 == 0 else jax_sides[::-1]
        if r == 0 and "sb3" in sides:
            order = [*order, "sb3"]
        for side in order:
            runs[side].append(benchmarking.run_side(__file__, side, spec))
    return {side: merge_rounds(results) for side, results in runs.items()}


def merge_rounds(results: list[dict]) -> dict:
    """One side's rounds as one result (see ``run_rounds``)."""
    if len(results) == 1:
        return results[0]
    rows = {}
    for seeds, first in results[0]["rows"].items():
        times = [t for r in results for t in r["rows"][seeds]["times"]]
        run_s = statistics.median(times)
        compile_s = statistics.median(r["rows"][seeds]["compile_s"] for r in results)
        rows[seeds] = first | {"steps_per_s": first["steps"] / run_s, "run_s": run_s,
                               "compile_s": compile_s, "times": times}  # fmt: skip
    return {"rows": rows, "versions": results[0]["versions"]}


def table(results: dict, seed_counts: list[int], sb3_seeds: int) -> list[str]:
    lines = ["| side | seeds | devices | env steps/s | genjax / side | compile s | final "
             f"return: mean / worst | seeds ≥ {SOLVED:.0f} |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for seeds in seed_counts:
        ours = results.get("genjax", {}).get("rows", {}).get(str(seeds))
        for side, r in results.items():
            row = r["rows"][str(seeds)]
            final = np.asarray(row["final_return"])
            ratio = f"{ours['steps_per_s'] / row['steps_per_s']:.2f}×" if ours else "–"
            note = f" ({len(final)} run{'s' * (len(final) > 1)}, one after another)" if (
                side == "sb3") else ""  # fmt: skip
            lines.append(
                f"| {side}{note} | {seeds} | {row['devices']} | {row['steps_per_s']:,.0f} "
                f"| {ratio} | {row['compile_s']:.1f} | {final.mean():.1f} / {final.min():.1f} "
                f"| {int(np.sum(final >= SOLVED))}/{len(final)} |"
            )
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--timesteps", type=int, default=500_000)
    p.add_argument("--seeds", type=int, default=16, help="the batched run's seeds (and 1)")
    p.add_argument("--sb3-seeds", type=int, default=1, help="SB3 runs, one after another")
    p.add_argument("--reps", type=int, default=3, help="timed runs per process")
    p.add_argument("--rounds", type=int, default=1, help="processes per JAX side, in turns")
    p.add_argument("--threads", type=int, default=2, help="torch threads (SB3)")
    for side in ("genjax", "rejax"):
        help = f"split {side}'s CPU into N XLA devices, its seeds over them"
        p.add_argument(f"--{side}-cpu-devices", type=int, default=1, help=help)
    p.add_argument("--results", type=pathlib.Path, help="append the section to this RESULTS.md")
    args = p.parse_args(argv)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or set(sides) - set(SIDES):
        raise SystemExit(f"--sides: choose from {','.join(SIDES)}")
    for name in ("timesteps", "seeds", "sb3_seeds", "reps", "rounds", "threads",
                 "genjax_cpu_devices", "rejax_cpu_devices"):  # fmt: skip
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    seed_counts = sorted({1, args.seeds})
    spec = {"timesteps": args.timesteps, "seed_counts": seed_counts, "reps": args.reps,
            "sb3_seeds": args.sb3_seeds, "threads": args.threads,
            "cpu_devices": {"genjax": args.genjax_cpu_devices,
                            "rejax": args.rejax_cpu_devices}}  # fmt: skip
    results = run_rounds(sides, spec, args.rounds)
    versions = {"python": platform.python_version()}
    for r in results.values():
        versions.update(r["versions"])
    header = [
        f"CartPole-v1, {args.timesteps:,} environment steps per seed, 4 envs × 128 steps, "
        f"4 epochs × 4 minibatches; median of {args.rounds} × {args.reps} runs in "
        f"{args.rounds} process{'es' * (args.rounds > 1)} a JAX side, taking turns "
        f"(SB3: of {args.sb3_seeds})",
    ]
    benchmarking.report(
        "PPO on CartPole: genjax vs rejax vs stable-baselines3",
        __file__, argv, versions, header,
        table(results, seed_counts, args.sb3_seeds), args.results,
    )  # fmt: skip


if __name__ == "__main__":
    request = benchmarking.child_request()
    if request:
        side, spec = request
        benchmarking.send_result(CHILDREN[side](spec))
        sys.exit(0)
    main()
