"""tpu_scripts/tpu_vm.sh against a stand-in for gcloud: it records every call, checks the
shell syntax of each command sent to the hosts, and, where a test asks, runs that command
here as the one host of a slice (its home directory a temporary folder, its venv's python
a script that records its arguments and waits for SIGTERM). slurm_gpu.sbatch against
stand-ins for srun and scontrol (tests/test_multiprocess.py trains through it)."""

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tpu_scripts" / "tpu_vm.sh"

FAKE_GCLOUD = f"""\
#!{sys.executable}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
home = os.environ["FAKE_HOST_HOME"]
if args[3] == "scp":  # scp LOCAL NAME:REMOTE
    shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
if args[3] == "ssh":
    command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
    if subprocess.run(["bash", "-n", "-c", command]).returncode:
        sys.exit("fake gcloud: the command sent to the hosts is not valid bash")
    if os.environ.get("FAKE_HOST_RUNS"):
        env = dict(os.environ, HOME=home)
        sys.exit(subprocess.run(["bash", "-c", command], env=env, cwd=home).returncode)
"""

FAKE_PYTHON = """\
#!/usr/bin/env bash
trap 'echo terminated > ~/stopped.txt; exit 0' TERM
printf '%s\\n' "$@" > ~/args.part && mv ~/args.part ~/args.txt
while true; do sleep 0.05; done
"""


@pytest.fixture
def slice_env(tmp_path):
    """The environment of tpu_vm.sh: a fake gcloud first on PATH, a host's home folder."""
    bin_dir, home = tmp_path / "bin", tmp_path / "host"
    bin_dir.mkdir()
    (home / "genjax" / ".venv" / "bin").mkdir(parents=True)
    for path, text in ((bin_dir / "gcloud", FAKE_GCLOUD),
                       (home / "genjax" / ".venv" / "bin" / "python", FAKE_PYTHON)):  # fmt: skip
        path.write_text(text)
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    env |= {"PATH": f"{bin_dir}:{env['PATH']}", "FAKE_GCLOUD_LOG": str(tmp_path / "calls"),
            "FAKE_HOST_HOME": str(home)}  # fmt: skip
    return env | {"TPU_NAME": "my-slice", "TPU_ZONE": "us-central2-b"}


def run_script(env, *args):
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True)


def calls(env) -> list[list[str]]:
    path = pathlib.Path(env["FAKE_GCLOUD_LOG"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_create_names_the_slice_its_type_and_the_generations_software(slice_env):
    env = slice_env | {"TPU_TYPE": "v5litepod-16", "TPU_PROJECT": "my-project"}
    out = run_script(env, "create", "--spot")
    assert out.returncode == 0, out.stderr
    (call,) = calls(env)
    assert call[:5] == ["compute", "tpus", "tpu-vm", "create", "my-slice"]
    for flag in ("--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot",
                 "--zone=us-central2-b", "--project=my-project"):  # fmt: skip
        assert flag in call, call
    out = run_script(slice_env, "create")  # the defaults: v4-8, no spot, gcloud's project
    assert out.returncode == 0, out.stderr
    call = calls(slice_env)[-1]
    assert "--version=tpu-ubuntu2204-base" in call and "--accelerator-type=v4-8" in call
    assert "--spot" not in call and not any(a.startswith("--project") for a in call)


def test_setup_copies_the_tracked_files_installs_and_mounts_the_bucket(slice_env):
    out = run_script(slice_env, "setup", "gs://my-bucket")
    assert out.returncode == 0, out.stderr
    scp, ssh = calls(slice_env)
    assert scp[3:6] == ["scp", scp[4], "my-slice:genjax.tar.gz"] and "--worker=all" in scp
    with tarfile.open(pathlib.Path(slice_env["FAKE_HOST_HOME"]) / "genjax.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "genjax/run.py", "tpu_scripts/tpu_vm.sh"} <= names
    assert not any(n.startswith((".venv", ".git/")) for n in names)
    assert ssh[3:5] == ["ssh", "my-slice"] and "--worker=all" in ssh
    (command,) = [a.removeprefix("--command=") for a in ssh if a.startswith("--command=")]
    assert "pip install -q -e '.[tpu]'" in command
    # What the host must expand is sent unexpanded.
    assert "sudo chown $(id -u):$(id -g) /mnt/genjax" in command
    assert "gcsfuse-'$(lsb_release -cs)' main" in command
    assert "gcsfuse --implicit-dirs my-bucket /mnt/genjax" in command


def test_launch_runs_the_script_with_distributed_and_stop_sends_sigterm(slice_env, request):
    env = slice_env | {"FAKE_HOST_RUNS": "1"}
    home = pathlib.Path(env["FAKE_HOST_HOME"])
    request.addfinalizer(lambda: _kill_run(home))
    workdir = "/mnt/genjax/runs/my lm"  # a space: the arguments reach the host as given
    assert "no run" in run_script(env, "stop").stdout
    out = run_script(env, "launch", "experiments/lm_pretrain.py", "--workdir", workdir)
    assert out.returncode == 0, out.stderr
    assert "started; its log is ~/genjax.log" in out.stdout
    deadline = time.time() + 30
    while not (home / "args.txt").exists() and time.time() < deadline:
        time.sleep(0.05)
    args = (home / "args.txt").read_text().splitlines()
    assert args == ["experiments/lm_pretrain.py", "--workdir", workdir, "--distributed"]

    again = run_script(env, "launch", "experiments/lm_pretrain.py", "--workdir", workdir)
    assert again.returncode != 0 and "a run is going on" in again.stderr

    out = run_script(env, "stop")
    assert out.returncode == 0 and "stopping; it saves a checkpoint first" in out.stdout
    while not (home / "stopped.txt").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (home / "stopped.txt").read_text() == "terminated\n"
    while "no run" not in (last := run_script(env, "stop").stdout) and time.time() < deadline:
        time.sleep(0.05)  # the pid file outlives the run: it is no longer taken for one
    assert "no run" in last


def _kill_run(home: pathlib.Path) -> None:
    """A run a failed test left going."""
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
        os.kill(int((home / "genjax.pid").read_text()), signal.SIGKILL)


@pytest.mark.parametrize(
    ("args", "env_change", "message"),
    [
        (["create"], {"TPU_NAME": ""}, "set TPU_NAME"),
        (["create"], {"TPU_ZONE": ""}, "set TPU_ZONE"),
        (["create"], {"TPU_TYPE": "v9-8"}, "no default TPU_VERSION for TPU_TYPE=v9-8"),
        (["create", "--preemptible"], {}, "create takes only --spot"),
        (["setup", "gs://my-bucket/runs"], {}, "is not a bucket name"),
        (["resize"], {}, "unknown command resize"),
        (["launch"], {}, "launch needs a script"),
        (["launch", "experiments/missing.py"], {}, "no script experiments/missing.py"),
    ],
)
def test_bad_input_is_refused_before_gcloud_runs(slice_env, args, env_change, message):
    out = run_script(slice_env | env_change, *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert calls(slice_env) == []


def test_help_prints_the_commands():
    out = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert out.returncode == 2
    for command in ("create [--spot]", "setup [BUCKET]", "launch", "logs", "stop", "delete"):
        assert f"  tpu_scripts/tpu_vm.sh {command}" in out.stderr, out.stderr


def test_slurm_job_requeues_itself_when_the_run_was_stopped(tmp_path):
    """Exit code 3 (SIGTERM before the time limit, a checkpoint saved): requeue; any other
    code is the job's own."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol"):
        record = f'echo "{name} $*" >> {tmp_path / "calls"}'
        exit_with = "exit $SRUN_EXIT" if name == "srun" else ""
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{record}\n{exit_with}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    cmd = ["bash", "tpu_scripts/slurm_gpu.sbatch", "experiments/lm_pretrain.py", "--workdir", "w"]
    for srun_exit, requeued in (("3", True), ("0", False), ("1", False)):
        (tmp_path / "calls").unlink(missing_ok=True)
        out = subprocess.run(cmd, cwd=ROOT, env=env | {"SRUN_EXIT": srun_exit}, text=True,
                             capture_output=True)  # fmt: skip
        assert out.returncode == int(srun_exit), out.stderr
        srun, *rest = (tmp_path / "calls").read_text().splitlines()
        assert srun.endswith("experiments/lm_pretrain.py --workdir w --distributed")
        assert "--gpu-bind=none" in srun
        assert rest == (["scontrol requeue 4242"] if requeued else [])
