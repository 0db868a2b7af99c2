"""What the benchmark scripts of ``experiments/benchmarks/`` share.

The machine (``cpu_name``, ``matmul_gflops``), a process's peak memory
(``peak_rss_mb``, ``reset_peak_rss``), the child-process protocol that runs each
side of a comparison in its own process (``run_side``, ``child_request``,
``send_result``), where a compiled program spends its time (``op_time_shares``)
and the dated sections of ``RESULTS.md`` (``results_section``, ``append_section``,
``report``). The protocols themselves are described in
``experiments/benchmarks/README.md``.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np

RESULT_TAG = "RESULT_JSON:"  # a child's result: this tag, then JSON, on one stdout line

# ----------------------------------------------------------------------------- the machine


def jax_side_versions() -> dict[str, str]:
    """A JAX side's versions line: JAX's, and the device that ran it (``cpu``, ``NVIDIA
    H100 80GB HBM3``, ``TPU v5 lite``), which the machine line (the host's) does not name."""
    import jax

    devices = jax.devices()
    return {"jax": jax.__version__, "device": f"{len(devices)} × {devices[0].device_kind}"}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median_rate(mm, a, b, n: int, repeats: int) -> float:
    """GFLOP/s of ``mm(a, b)`` for n×n operands: the median of ``repeats`` timed calls."""
    mm(a, b)  # warm the BLAS thread pool and caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def matmul_gflops(n: int = 2048, repeats: int = 7) -> dict[str, float]:
    """Median float32 n×n @ n×n rate in GFLOP/s of numpy's BLAS, XLA's and torch's.

    On an accelerator also ``jax_bf16_8192``: the bf16 rate at 8192³, what MFU is
    measured against there. torch is left out where it is not installed.
    """
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    rates = {"numpy": _median_rate(np.matmul, a, b, n, repeats)}
    import jax

    jax_mm = jax.jit(lambda x, y: x @ y)
    mm = lambda x, y: jax_mm(x, y).block_until_ready()
    rates["jax"] = _median_rate(mm, *jax.device_put((a, b)), n, repeats)
    if jax.default_backend() != "cpu":
        # Accelerators train in bf16: MFU is against the bf16 rate at a large size.
        big = 8192
        x = jax.random.normal(jax.random.key(0), (big, big), jax.numpy.bfloat16)
        rates["jax_bf16_8192"] = _median_rate(mm, x, x, big, repeats)
    try:
        import torch
    except ImportError:
        return rates
    a_t, b_t = torch.from_numpy(a), torch.from_numpy(b)
    rates["torch"] = _median_rate(torch.matmul, a_t, b_t, n, repeats)
    return rates


# ----------------------------------------------------------------------------- memory


def peak_rss_mb() -> float:
    """Peak resident memory of this process image, in MB.

    VmHWM, not ``ru_maxrss``: Linux carries ``ru_maxrss`` across exec, so a child would
    inherit its parent's peak (the driver imports jax and torch); VmHWM starts afresh
    with the exec'd image.
    """
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Lower this process's VmHWM to its current RSS (Linux ≥ 4.0); False where refused."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def op_time_shares(run, top: int = 8) -> list[tuple[str, float]]:
    """(kind of XLA op, share of the op time) of one call of ``run``, largest first.

    ``run`` executes under ``jax.profiler.trace``; the trace's op events are grouped by
    their name less its numeric suffix (``ynn_fusion.52`` → ``ynn_fusion``: on CPU the
    convolutions and matmuls XLA hands to the XNNPACK library, ``transpose_copy_fusion``:
    layout changes, ``*_fusion``: fused elementwise work). Shares of the ``top`` kinds;
    the rest is summed as ``other``.
    """
    import collections
    import gzip
    import re
    import tempfile

    import jax

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            run()
        (path,) = pathlib.Path(trace_dir).rglob("*.trace.json.gz")
        events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
    op_name = re.compile(r"^[a-z][a-z_\-]*(\.\d+)*$")  # HLO ops, not Python or runtime spans
    micros: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and op_name.match(event.get("name", "")):
            micros[re.sub(r"(\.\d+)+$", "", event["name"])] += event["dur"]
    total = sum(micros.values()) or 1
    shares = [(kind, us / total) for kind, us in micros.most_common(top)]
    rest = 1 - sum(share for _, share in shares)
    return shares + ([("other", rest)] if rest > 0 else [])


# ----------------------------------------------------------------------------- child processes


def run_side(
    script: str | os.PathLike, side: str, spec: dict, env: Mapping[str, str] | None = None
) -> dict:
    """Runs ``script --child SIDE SPEC`` (SPEC as JSON) in a fresh process and returns
    the result it sent (``send_result``); raises with its output's tail if it failed."""
    cmd = [sys.executable, str(pathlib.Path(script).resolve()), "--child", side, json.dumps(spec)]
    print(f"[{side}] running ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"side {side!r} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    return json.loads(lines[-1][len(RESULT_TAG) :])


def child_request(argv: Sequence[str] | None = None) -> tuple[str, dict] | None:
    """``(side, spec)`` when ``argv`` (default ``sys.argv``) is a ``run_side`` call, else None."""
    argv = sys.argv if argv is None else argv
    if len(argv) == 4 and argv[1] == "--child":
        return argv[2], json.loads(argv[3])
    return None


def send_result(out: dict) -> None:
    """Hands ``out`` to the ``run_side`` that started this process (one stdout line)."""
    print(RESULT_TAG + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- RESULTS.md


def results_section(
    title: str, script: str, argv, versions: dict, header: list[str], lines: list[str]
) -> list[str]:
    """A dated RESULTS.md section: machine, versions, the exact command, notes, tables."""
    command = "python " + shlex.join([os.path.relpath(script), *(argv or sys.argv[1:])])
    return [
        "",
        f"## {title} — {datetime.date.today().isoformat()}",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, {platform.machine()}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- command: `{command}`",
        *(f"- {h}" for h in header),
        "",
        *lines,
        "",
    ]


def append_section(path: pathlib.Path, section: list[str]) -> None:
    """Appends a ``results_section`` to ``path`` (RESULTS.md) and says so."""
    with path.open("a") as f:
        f.write("\n".join(section))
    print(f"appended to {path}")


def report(title: str, script: str, argv, versions: dict, header, lines, results) -> None:
    """Prints a ``results_section`` and appends it to ``results`` (a path) unless None."""
    section = results_section(title, script, argv, versions, header, lines)
    print("\n".join(section))
    if results:
        append_section(results, section)
