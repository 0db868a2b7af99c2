"""The accelerator items of the inference issue, as one prepared run on a GPU or TPU.

What a CPU cannot measure, in the order to run it on a lent machine:

1. tests: the accelerator-marked tests (`pytest -m accelerator`: cuDNN flash attention
   against the XLA attention in bf16, forward and gradients);
2. train: training throughput and MFU of the ~1B preset in bf16
   (`lm_train_speed.py --preset 1b`, remat keeping the projections' outputs; the goal is
   >= 50% of the bf16 matmul rate that the same command measures);
3. decode: decoding throughput of the ~1B preset at batch 1 and 16, greedy and top-p
   (`lm_decode_speed.py --preset 1b --sides genjax`).

Each step runs in its own process with its own time limit; a step that fails or times out
is reported and the next one still runs. Logs and a RESULTS.md with the steps' sections
go to `--out`. Nothing is installed: the machine's own jax (with its accelerator plugin),
flax, optax, orbax-checkpoint, grain, sentencepiece, chex and pytest are used, with the
repository on PYTHONPATH (torch is not needed); pytest collects every test module, so the
test extra's tensorboardX, hypothesis and scikit-learn must be importable too. A machine
without network can install the missing ones from wheels downloaded elsewhere
(`pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64`,
then `pip install --no-index --find-links WHEELS grain ...`), which keeps its own jax.
This process never opens the device itself (a child reports the backend), so each step has
the whole accelerator; a step that runs past its limit is killed with its own children.

    python experiments/benchmarks/accelerator_checks.py --out "$OUT"    # ~2 min on an H200
    python experiments/benchmarks/accelerator_checks.py --only tests,train     # a subset
    python experiments/benchmarks/accelerator_checks.py --dry-run              # the commands

Refuses to run on a CPU (the numbers would mean nothing), except with --dry-run.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCH = "experiments/benchmarks"


def steps(out: pathlib.Path) -> dict[str, tuple[list[str], int]]:
    """name -> (argv, time limit in seconds)."""
    results = str(out / "RESULTS.md")
    py = sys.executable
    train = [py, f"{BENCH}/lm_train_speed.py", "--preset", "1b", "--sides", "genjax"]
    train += ["--batch", "8", "--seq", "2048", "--steps", "5", "--reps", "3", "--warmup", "2"]
    train += ["--set", "remat_policy=dots", "--results", results]
    decode = [py, f"{BENCH}/lm_decode_speed.py", "--preset", "1b", "--sides", "genjax"]
    decode += ["--reps", "3", "--results", results]
    return {
        "tests": ([py, "-m", "pytest", "-q", "-m", "accelerator", "tests/"], 120),
        "train": (train, 270),
        "decode": (decode, 200),
    }


def device_report(env: dict[str, str]) -> tuple[str, str]:
    """(jax's default backend, its devices), from a child process: on a TPU the process
    that opens the device holds it, so this one must not."""
    probe = "import jax; print(jax.default_backend()); print(jax.devices())"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    backend, devices = out.stdout.strip().splitlines()[-2:]
    return backend, devices


def run_step(cmd: list[str], env: dict[str, str], log, limit: int) -> int | str:
    """The step's exit code, or "timeout" after killing its whole process group."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the benchmarks' per-side children too
        proc.wait()
        return "timeout"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path(os.environ.get("OUT", "/tmp/accelerator_checks")),
        help="folder for the logs and RESULTS.md (default: $OUT or /tmp/accelerator_checks)",
    )
    p.add_argument("--only", default="tests,train,decode", help="comma-separated steps")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = steps(args.out)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in plan]
    if unknown or not chosen:
        raise SystemExit(f"--only: unknown or no steps {unknown}; choose from {list(plan)}")
    if args.dry_run:
        for name in chosen:
            cmd, limit = plan[name]
            print(f"{name} (limit {limit} s): {shlex.join(cmd)}")
        return 0
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    # The benchmarks run each side in a further process: none may hold 75% of a GPU.
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    backend, devices = device_report(env)
    if backend == "cpu":
        raise SystemExit(
            "no accelerator: jax.default_backend() is 'cpu'; run this on a GPU or TPU "
            "machine (--dry-run prints the commands)"
        )
    print(f"devices: {devices}", flush=True)
    # tests/conftest.py defaults JAX_PLATFORMS to cpu, so the steps get "" (JAX's own choice,
    # the accelerator found above). Not the backend's name: "gpu" makes JAX >= 0.11 also
    # require a ROCm plugin, and fails without one.
    env["JAX_PLATFORMS"] = ""
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in chosen:
        cmd, limit = plan[name]
        log = args.out / f"{name}.log"
        t0 = time.perf_counter()
        with log.open("w") as f:
            code = run_step(cmd, env, f, limit)
        took = time.perf_counter() - t0
        print(f"{name}: exit {code} in {took:.0f} s (log {log})", flush=True)
        print("".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:]), flush=True)
        if code != 0:
            failed.append(name)
    print(f"failed: {failed}" if failed else "all steps passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
