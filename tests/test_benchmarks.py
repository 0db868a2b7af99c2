"""Smoke tests of the benchmark scripts: they run and print their tables."""

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import pytest

from genjax import benchmarking

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = "experiments/benchmarks"
SCRIPTS = ("lm_train_speed.py", "lm_decode_speed.py")


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
def test_compile_time_benchmark_compiles_all_three_programs():
    cmd = [sys.executable, str(ROOT / "experiments/benchmarks/compile_time.py"), "--layers", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    header = "| layers | train step, scan (s) | train step, unrolled (s) | decode loop (s) |"
    assert header in out.stdout and "\n| 1 | " in out.stdout, out.stdout


def test_op_time_shares_of_a_traced_program():
    matmul = jax.jit(lambda a: jax.numpy.tanh(a @ a))
    a = jax.numpy.ones((128, 128))
    matmul(a).block_until_ready()
    shares = benchmarking.op_time_shares(lambda: matmul(a).block_until_ready(), top=1)
    assert 1 <= len(shares) <= 2 and abs(sum(s for _, s in shares) - 1) < 1e-9
    assert all(0 < s <= 1 for _, s in shares) and shares[0][0] != "other"


def test_a_side_runs_in_its_own_process_and_hands_back_its_result(tmp_path):
    script = tmp_path / "side.py"
    script.write_text(
        "from genjax.benchmarking import child_request, send_result\n"
        "side, spec = child_request()\n"
        "print('noise')\n"
        "send_result({'side': side, 'twice': 2 * spec['n']})\n"
    )
    assert benchmarking.run_side(script, "left", {"n": 21}) == {"side": "left", "twice": 42}
    assert benchmarking.child_request(["side.py", "--out", "x"]) is None
    script.write_text("import sys; print('no result'); sys.exit(3)\n")
    with pytest.raises(RuntimeError, match="side 'left' failed \\(exit 3\\):\nno result"):
        benchmarking.run_side(script, "left", {})


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the refusal of a CPU")
def test_accelerator_checks_print_their_plan_and_refuse_a_cpu(tmp_path, capsys, load_script):
    checks = load_script("experiments/benchmarks/accelerator_checks.py")
    assert checks.main(["--dry-run", "--out", str(tmp_path)]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert [line.split(" ")[0] for line in plan] == ["tests", "train", "decode"]
    assert "-m accelerator tests/" in plan[0]
    assert "--preset 1b" in plan[1] and "remat_policy=dots" in plan[1]
    assert "--preset 1b --sides genjax" in plan[2] and str(tmp_path / "RESULTS.md") in plan[2]
    with pytest.raises(SystemExit, match="unknown or no steps"):
        checks.main(["--dry-run", "--only", "tests,bogus"])
    with pytest.raises(SystemExit, match="no accelerator"):  # the suite runs on CPU
        checks.main(["--only", "tests", "--out", str(tmp_path)])
    assert not (tmp_path / "tests.log").exists()  # refused before running anything


def test_accelerator_check_step_past_its_limit_is_killed_with_its_children(tmp_path, load_script):
    checks = load_script("experiments/benchmarks/accelerator_checks.py")
    spawn = "import subprocess, time; print(subprocess.Popen(['sleep', '60']).pid, flush=True); "
    spawn += "time.sleep(60)"
    log = tmp_path / "step.log"
    with log.open("w") as f:
        t0 = time.perf_counter()
        code = checks.run_step([sys.executable, "-c", spawn], dict(os.environ), f, limit=2)
    assert code == "timeout" and time.perf_counter() - t0 < 30
    grandchild = pathlib.Path(f"/proc/{int(log.read_text().split()[0])}/stat")
    deadline = time.time() + 10
    while grandchild.exists() and grandchild.read_text().split()[2] != "Z":
        assert time.time() < deadline, "the step's child survived its step"
        time.sleep(0.1)


def test_accelerator_checks_run_every_step_on_the_backend_found(tmp_path, load_script, capsys):
    checks = load_script("experiments/benchmarks/accelerator_checks.py")
    ran = []

    def fake_step(cmd, env, log, limit):
        ran.append((cmd, env["JAX_PLATFORMS"], env["XLA_PYTHON_CLIENT_PREALLOCATE"]))
        return 1 if len(ran) == 1 else 0  # the first step fails; the others still run

    checks.device_report = lambda env: ("gpu", "[CudaDevice(id=0)]")
    checks.run_step = fake_step
    assert checks.main(["--out", str(tmp_path)]) == 1
    assert [cmd[2] if cmd[1] == "-m" else cmd[1] for cmd, _, _ in ran] == [
        "pytest",
        *(f"{BENCH}/{s}" for s in SCRIPTS),
    ]
    # conftest.py defaults JAX_PLATFORMS to cpu: without this the GPU tests would be skipped
    assert {(platform, prealloc) for _, platform, prealloc in ran} == {("", "false")}
    assert "failed: ['tests']" in capsys.readouterr().out


def _run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """A benchmark script in its own process, with JAX's own device count (no fake CPUs)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, str(ROOT / BENCH / script), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_diffusers_peer_has_the_parameters_of_the_genjax_unet(load_script):
    diffusers = pytest.importorskip("diffusers")  # the bench extra
    speed = load_script(f"{BENCH}/diffusion_speed.py")
    for overrides, expected in (([], 702_753), (["model.condition=none"], 701_345)):
        cfg = speed.genjax_config(8, overrides)
        peer = diffusers.UNet2DModel(**speed.peer_kwargs(cfg))
        assert speed.count_genjax_params(cfg) == expected
        assert sum(p.numel() for p in peer.parameters()) == expected


@pytest.mark.slow
def test_diffusion_speed_benchmark_runs_the_genjax_side(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = _run_script(
        "diffusion_speed.py", "--sides", "genjax", "--batch", "8", "--steps", "1", "--warmup",
        "0", "--reps", "1", "--sample-num", "4", "--sample-steps", "2", "--results", str(results),
        "--profile",
    )  # fmt: skip
    assert "parameters: genjax 702,753" in out.stdout, out.stdout
    assert "\n| genjax | " in out.stdout and "genjax / best PyTorch" not in out.stdout
    assert "genjax training step, share of XLA op time (profile): " in out.stdout
    assert "## Digits U-Net: training and DDIM sampling speed" in results.read_text()


def test_compile_clock_counts_a_nested_compile_once(load_script):
    """A jit compiled and run while another is traced (as ops on constants in the
    adaptive ODE sampler's set-up are) reports its compile events inside the outer trace's;
    a sum of the events counted it twice and passed the call's wall time."""
    quality = load_script("experiments/benchmarks/diffusion_digits_quality.py")
    assert quality.covered_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.6)]) == 4

    def many_ops(x):
        for _ in range(400):
            x = jax.numpy.sin(x) + x
        return x

    @jax.jit
    def outer(x):
        with jax.ensure_compile_time_eval():  # compiled and run while outer is traced
            constant = jax.jit(many_ops)(jax.numpy.ones(3))
        return x + constant

    with quality.compile_clock() as compile_s:
        t0 = time.perf_counter()
        jax.block_until_ready(outer(jax.numpy.ones(3)))
        wall = time.perf_counter() - t0
    assert 0 < compile_s[0] <= wall


@pytest.mark.slow
def test_diffusion_digits_quality_scores_a_run(tmp_path, tiny_digits_run, load_script):
    quality = load_script("experiments/benchmarks/diffusion_digits_quality.py")
    logged = quality.logged_bits_per_dim(tiny_digits_run, 20)  # the run's own evaluation
    report = json.loads((tiny_digits_run / "eval.json").read_text())
    assert logged == report["samples"]["test_bits_per_dim"]
    assert quality.logged_bits_per_dim(tiny_digits_run, 19) is None
    plot = tmp_path / "steps.png"
    out = _run_script(
        "diffusion_digits_quality.py", "--workdirs", str(tiny_digits_run), "--num", "20",
        "--samplers", "ddim-2", "ode", "--gmm-ks", "2", "--steps-plot", str(plot),
        "--set", "sample.eta=1",
    )  # fmt: skip
    for row in ("| seed-0 (step 20) | ", "| real-vs-real floor | ", "| genjax, seed-0 (step 20) |",
                "| GaussianMixture, k = 10, full covariance |", "| DDIM | 2 | 2 | ", "DDIM's η 1):",
                "| adaptive PF-ODE (Dopri5) | adaptive | "):  # fmt: skip
        assert row in out.stdout, out.stdout
    assert f"test_bits_per_dim {logged:.4g}" in out.stdout
    assert plot.stat().st_size > 0


@pytest.mark.parametrize("family", ["diffusion", "gan"])
def test_quality_2d_benchmark_runs_one_seed(tmp_path, family):
    out = _run_script(
        "quality_2d.py", "--family", family, "--preset", "tiny", "--seeds", "1",
        "--datasets", "ring", "--workdir", str(tmp_path), "--set", "run.steps=20",
        "--label", "short",
    )  # fmt: skip
    name = f"{family} short"
    assert f"\n| {name} | ring | 1 | " in out.stdout, out.stdout
    assert f"\n| {name} | ring | 0 | " in out.stdout, out.stdout


def test_digits_families_tables_finished_runs_and_refuses_unfinished(tmp_path):
    from genjax import gan, run, vae

    for name, family in (("vae", vae.IMAGES), ("gan", gan.IMAGES)):
        assert run.main(family, ["--workdir", str(tmp_path / name), "--preset", "tiny"]) == 0
    runs = [f"VAE tiny={tmp_path / 'vae'}", f"GAN tiny={tmp_path / 'gan'}"]
    out = _run_script("digits_families.py", "--runs", *runs, "--no-baselines")
    for row in (
        "| VAE tiny | ",
        "| GAN tiny | ",
        "| real-vs-real floor | ",
        "| genjax VAE tiny | ",
    ):
        assert row in out.stdout, out.stdout
    cmd = [sys.executable, str(ROOT / BENCH / "digits_families.py"), "--runs",
           f"new={tmp_path / 'missing'}"]  # fmt: skip
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "no eval.json" in refused.stderr


@pytest.mark.slow
def test_ppo_speed_benchmark_runs_the_genjax_side(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = _run_script(
        "ppo_speed.py", "--sides", "genjax", "--timesteps", "2048", "--seeds", "2", "--reps",
        "1", "--rounds", "2", "--genjax-cpu-devices", "2", "--results", str(results),
    )  # fmt: skip
    # One seed runs on one device, the two seeds one on each.
    for row in ("\n| genjax | 1 | 1 | ", "\n| genjax | 2 | 2 | "):
        assert row in out.stdout, out.stdout
    assert "median of 2 × 1 runs in 2 processes a JAX side" in out.stdout
    assert "## PPO on CartPole: genjax vs rejax vs stable-baselines3" in results.read_text()
    bad = [sys.executable, str(ROOT / BENCH / "ppo_speed.py"), "--sides", "nope"]
    proc = subprocess.run(bad, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--sides: choose from genjax,rejax,sb3" in proc.stderr


def test_ppo_speed_credits_each_side_the_steps_it_ran(load_script):
    """rejax and stable-baselines3 roll out until total_timesteps is reached; genjax runs
    the whole updates within it."""
    from genjax.rl import ppo

    bench = load_script("experiments/benchmarks/ppo_speed.py")
    h = bench.hyper({"timesteps": 500_000})
    assert bench.peer_steps(h) == 977 * 512
    cfg = ppo.PPOConfig(total_timesteps=500_000)
    assert cfg.num_updates * cfg.steps_per_update == 976 * 512
