"""Multi-host is the same program: two processes on loopback (gloo), 4 CPU devices
each, train the same run as one process with 8 devices — joined by hand
(``--coordinator``), and launched by tpu_scripts/slurm_gpu.sbatch (``--distributed``
reading SLURM's environment)."""

import os
import pathlib
import random
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.test_lm_pretrain import COMMON, SCRIPT, STEPS, _losses, _run, corpus  # noqa: F401

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_process(i, workdir, corpus, port, env, extra):  # noqa: F811
    cmd = [sys.executable, str(SCRIPT), "--workdir", str(workdir), "--corpus", str(corpus)]
    cmd += [*COMMON, *extra]
    cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


@pytest.fixture(scope="module")
def one_process_losses(tmp_path_factory, corpus):  # noqa: F811
    single = tmp_path_factory.mktemp("single")
    _run(single, corpus)
    return _losses(single)


def _two_process_env() -> dict[str, str]:
    return dict(
        os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS="--xla_force_host_platform_device_count=4"
    )


def _assert_same_losses(two, one):
    assert sorted(two) == sorted(one)
    # Same global batches and math; collectives sum in another order.
    np.testing.assert_allclose(
        [two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=2e-5
    )


def _run_two_processes(workdir, corpus, *extra, exit_code=0) -> list[str]:  # noqa: F811
    """Both processes' output; fails the test if either exits otherwise or hangs."""
    port = _free_port()
    env = _two_process_env()
    procs = [_start_process(i, workdir, corpus, port, env, extra) for i in range(2)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == exit_code, out[-4000:]
    return outs


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, corpus):  # noqa: F811
    multi = tmp_path_factory.mktemp("multi")
    _run_two_processes(multi, corpus)
    return multi


def test_two_processes_match_one_process(two_process_run, one_process_losses):
    _assert_same_losses(_losses(two_process_run), one_process_losses)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param({"data/process_1-of-2.json": "{"}, id="position-unreadable"),
        # Valid JSON that grain's set_state rejects, on process 1 only
        pytest.param({"data/process_1-of-2.json": "{}"}, id="position-rejected"),
    ],
)
def test_step_unreadable_on_one_process_is_skipped_by_both(
    tmp_path,
    corpus,  # noqa: F811
    two_process_run,
    one_process_losses,
    damage,
):
    """Process 1 cannot read its data position at the newest step; process 0 can. Both
    must resume from the step before, or they wait on each other's collectives."""
    workdir = tmp_path / "multi"
    shutil.copytree(two_process_run, workdir)
    for name, text in damage.items():
        (workdir / "checkpoints" / str(STEPS) / name).write_text(text)
    outs = _run_two_processes(workdir, corpus)
    assert f"skipped checkpoint step {STEPS} (unreadable on process 1)" in outs[0], outs[0]
    for out in outs:
        assert f"restored step {STEPS - 10}" in out, out[-4000:]
    _assert_same_losses(_losses(workdir), one_process_losses)


# What SLURM's srun does on one node: start SLURM_NTASKS copies of the command, each told
# its rank (SLURM_PROCID, SLURM_LOCALID) and the step's nodes.
FAKE_SRUN = f"""#!{sys.executable}
import os, subprocess, sys
command = sys.argv[1:]
while command[0].startswith("--"):  # srun's own flags
    command.pop(0)
tasks = []
for rank in range(int(os.environ["SLURM_NTASKS"])):
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
               SLURM_STEP_NODELIST="localhost")
    tasks.append(subprocess.Popen(command, env=env))
sys.exit(max(task.wait() for task in tasks))
"""


def _slurm_job_id() -> int:
    """A job id whose coordinator port (JAX: 61440 + id mod 4096) is free here."""
    for job_id in random.sample(range(4096), 64):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 61440 + job_id))
            except OSError:
                continue
        return job_id
    raise RuntimeError("no free port in 61440-65535")


def test_slurm_launcher_joins_the_tasks_into_one_run(tmp_path, corpus, one_process_losses):  # noqa: F811
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = _two_process_env() | {"PATH": f"{bin_dir}:{os.environ['PATH']}",
                                "PYTHON": sys.executable, "SLURM_NTASKS": "2",
                                "SLURM_JOB_ID": str(_slurm_job_id())}  # fmt: skip
    workdir = tmp_path / "slurm"
    cmd = ["bash", "tpu_scripts/slurm_gpu.sbatch", "experiments/lm_pretrain.py",
           "--workdir", str(workdir), "--corpus", str(corpus), *COMMON]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    _assert_same_losses(_losses(workdir), one_process_losses)

    refused = subprocess.run(["bash", "tpu_scripts/slurm_gpu.sbatch", "experiments/missing.py"],
                             cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 2 and "give the experiment script" in refused.stderr


def test_step_whose_arrays_are_unreadable_is_skipped_by_both(
    tmp_path,
    corpus,  # noqa: F811
    two_process_run,
    one_process_losses,
):
    """Arrays that fail to read: each process reads its own and the processes agree, so
    both fall back to the step before together."""
    workdir = tmp_path / "multi"
    shutil.copytree(two_process_run, workdir)
    for f in (workdir / "checkpoints" / str(STEPS) / "state").rglob("d/*"):
        f.write_bytes(b"garbage")
    outs = _run_two_processes(workdir, corpus)
    assert f"skipped checkpoint step {STEPS} (unreadable arrays, " in outs[0], outs[0]
    for out in outs:
        assert f"restored step {STEPS - 10}" in out, out[-4000:]
    _assert_same_losses(_losses(workdir), one_process_losses)


def test_chunks_unreadable_on_one_process_only_are_skipped_by_both(tmp_path, corpus):  # noqa: F811
    """With fsdp spanning the processes, each process writes and reads only its own
    shards of the parameters. Damage process 1's alone: only its read fails, and both
    fall back to the step before together."""
    sharded = ("--mesh", "fsdp=4,tensor=2")
    uninterrupted = tmp_path / "uninterrupted"
    _run_two_processes(uninterrupted, corpus, *sharded)
    workdir = tmp_path / "damaged"
    shutil.copytree(uninterrupted, workdir)
    own_chunks = list((workdir / "checkpoints" / str(STEPS) / "state").glob("ocdbt.process_1/d/*"))
    assert own_chunks, "process 1 wrote no shards of its own"
    for f in own_chunks:
        f.write_bytes(b"garbage")
    outs = _run_two_processes(workdir, corpus, *sharded)
    assert f"skipped checkpoint step {STEPS} (unreadable on process 1)" in outs[0], outs[0]
    for out in outs:
        assert f"restored step {STEPS - 10}" in out, out[-4000:]
    _assert_same_losses(_losses(workdir), _losses(uninterrupted))


def test_one_process_refuses_the_positions_of_two_naming_the_counts(
    tmp_path,
    corpus,  # noqa: F811
    two_process_run,
):
    workdir = tmp_path / "multi"
    shutil.copytree(two_process_run, workdir)
    proc = _run(workdir, corpus, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"checkpoint step {STEPS} in " in proc.stderr, proc.stderr[-2000:]
    assert (
        "holds the data positions of 2 processes; this run has 1: resume it with 2 processes"
        in proc.stderr
    )
