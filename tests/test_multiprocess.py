"""Multi-host is the same program: two processes on loopback (gloo), 4 CPU devices
each, train the same run as one process with 8 devices."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.test_lm_pretrain import COMMON, SCRIPT, _losses, _run, corpus  # noqa: F401

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_process(i, workdir, corpus, port, env):  # noqa: F811
    cmd = [sys.executable, str(SCRIPT), "--workdir", str(workdir), "--corpus", str(corpus), *COMMON]
    cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def test_two_processes_match_one_process(tmp_path, corpus):  # noqa: F811
    single = tmp_path / "single"
    _run(single, corpus)
    multi = tmp_path / "multi"
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    procs = [_start_process(i, multi, corpus, port, env) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    one, two = _losses(single), _losses(multi)
    assert sorted(two) == sorted(one)
    # Same global batches and math; collectives sum in another order.
    np.testing.assert_allclose(
        [two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=2e-5
    )
