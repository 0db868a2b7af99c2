"""Memory of compiling a decoding program, and its step time, per set of XLA compile options.

For each batch size, each option set ("auto" = `decode.auto_compile_options()`, on a CPU
without XLA's MLIR fusion emitters; "xla" = XLA's defaults) runs in a fresh subprocess:
build a `Decoder` (preset weights from one jitted `init`), return freed heap to the OS
(glibc `malloc_trim`, so the baseline is what is live), reset the peak (`/proc/self/clear_refs`),
then trace, lower and compile the decoding program of that batch (prompt 32 tokens +
224 new by default, greedy) and report the peak RSS above the baseline during the compile, and what
stays after it (the executable and JAX's caches, measured after another trim).

Step times come from one more subprocess per batch that holds both programs and alternates
calls between them (`--reps` rounds), so machine noise hits both alike: median ms per new
token step (prefill included).

    python experiments/benchmarks/decode_compile_memory.py
    python experiments/benchmarks/decode_compile_memory.py \
        --results experiments/benchmarks/RESULTS.md

About 2 minutes on a 2-core CPU. Linux only (reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lm_train_speed import report  # noqa: E402  (same folder)

TITLE = "LM decoding: compile memory per XLA compile options"

OPTION_SETS = ("auto", "xla")
RESULT_TAG = "RESULT_JSON:"
PROMPT_LEN = 32


def rss_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MB."""
    fields = {}
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.split()
    return int(fields["VmRSS"][0]) / 1024, int(fields["VmHWM"][0]) / 1024


def return_free_heap() -> None:
    """glibc keeps freed heap mapped; hand it back so RSS is what is live (elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def decoder_and_call_args(preset: str, batch: int):
    """A Decoder of `preset` and the arguments of its decoding program for `batch` prompts."""
    import jax

    from genjax.models import transformer
    from genjax.sampling import decode

    cfg = transformer.get_preset(preset)
    params = jax.jit(transformer.init, static_argnums=0)(cfg, jax.random.key(0))
    decoder = decode.Decoder(cfg, params)
    del params
    prompts = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, PROMPT_LEN))
    return decoder, prompts.tolist()


def options_of(name: str) -> dict:
    from genjax.sampling import decode

    return decode.auto_compile_options() if name == "auto" else {}


def measure_compile(preset: str, batch: int, new_tokens: int, option_set: str) -> dict:
    from genjax.sampling import decode

    decoder, prompts = decoder_and_call_args(preset, batch)
    captured = {}

    class Captured(Exception):
        pass

    def capture(*args, **static):  # the arguments the decoder would call its program with
        captured.update(args=args, static=static)
        raise Captured

    decoder.program = capture
    try:
        decoder.generate(prompts, max_new_tokens=new_tokens, eos_id=None)
    except Captured:
        pass
    program = decode.decoding_program(options_of(option_set))
    return_free_heap()
    base, _ = rss_mb()
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    compiled = program.lower(*captured["args"], **captured["static"]).compile()
    compile_s = time.perf_counter() - t0
    _, peak = rss_mb()
    return_free_heap()
    kept, _ = rss_mb()
    del compiled
    return {
        "baseline_mb": base,
        "compile_peak_mb": peak - base,
        "kept_mb": kept - base,
        "compile_s": compile_s,
    }


def measure_steps(preset: str, batch: int, new_tokens: int, reps: int) -> dict:
    from genjax.sampling import decode

    decoder, prompts = decoder_and_call_args(preset, batch)
    programs = {name: decode.decoding_program(options_of(name)) for name in OPTION_SETS}
    tokens, times = {}, {name: [] for name in OPTION_SETS}

    def call(name: str):
        decoder.program = programs[name]
        gen = decoder.generate(prompts, max_new_tokens=new_tokens, eos_id=None)
        return gen.tokens

    for name in OPTION_SETS:
        tokens[name] = call(name)  # compiles
    for _ in range(reps):
        for name in OPTION_SETS:
            t0 = time.perf_counter()
            call(name)
            times[name].append((time.perf_counter() - t0) / new_tokens * 1e3)
    return {
        "step_ms": {name: statistics.median(ts) for name, ts in times.items()},
        "same_tokens": tokens["auto"] == tokens["xla"],
    }


def run_child(*argv: str) -> dict:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", *argv]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{argv} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    return json.loads(lines[-1][len(RESULT_TAG) :])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu-small", help="genjax transformer preset")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="prompts per call")
    p.add_argument("--reps", type=int, default=5, help="alternating timed calls per program")
    p.add_argument("--new-tokens", type=int, default=224, help="tokens generated per prompt")
    p.add_argument("--results", type=pathlib.Path, help="append a dated section to this file")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        kind, preset, batch, new_tokens, extra = args.child
        if kind == "compile":
            out = measure_compile(preset, int(batch), int(new_tokens), extra)
        else:
            out = measure_steps(preset, int(batch), int(new_tokens), int(extra))
        print(RESULT_TAG + json.dumps(out), flush=True)
        return
    if min(args.reps, args.new_tokens, *args.batches) < 1:
        raise SystemExit("--reps, --new-tokens and --batches must be >= 1")
    import jax

    from genjax.sampling import decode

    lines = [
        "| batch | compile options | compile peak (MB above live) | kept after (MB) "
        "| compile (s) | ms a step (median) |",
        "|---|---|---|---|---|---|",
    ]
    for batch in args.batches:
        steps = run_child("steps", args.preset, str(batch), str(args.new_tokens), str(args.reps))
        if not steps["same_tokens"]:
            raise AssertionError(f"batch {batch}: the option sets decoded different tokens")
        for name in OPTION_SETS:
            mem = run_child("compile", args.preset, str(batch), str(args.new_tokens), name)
            lines.append(
                f"| {batch} | {name} | +{mem['compile_peak_mb']:.0f} | +{mem['kept_mb']:.0f} "
                f"| {mem['compile_s']:.1f} | {steps['step_ms'][name]:.2f} |"
            )
            print(f"batch {batch} {name}: {mem} {steps}", file=sys.stderr, flush=True)
    header = [
        f"preset {args.preset!r}, float32; prompt {PROMPT_LEN} + {args.new_tokens} new tokens, "
        f"greedy; 'auto' = {decode.auto_compile_options()}, 'xla' = XLA's defaults; "
        f"step times: median of {args.reps} alternating calls per program in one process "
        "(prefill included); the same tokens from both"
    ]
    versions = {"python": platform.python_version(), "jax": jax.__version__}
    report(TITLE, __file__, argv, versions, header, lines, args.results)


if __name__ == "__main__":
    main()
