"""Compile time against depth: scan-over-layers versus the unrolled layer loop.

    python experiments/benchmarks/compile_time.py                 # layers 2 4 8 16
    python experiments/benchmarks/compile_time.py --layers 2 6 12 24 \\
        --results experiments/benchmarks/RESULTS.md
    python experiments/benchmarks/compile_time.py --layers 1       # smoke test, ~20 s

For each depth, the cpu-small width (d_model 384, 6 heads, SwiGLU 1024, vocab
4096) is compiled three ways, each timed as ``jit(...).lower(...).compile()``
in a fresh process (no compilation cache): the LM family's training step
(forward, backward, AdamW; batch 4 × 64 tokens) with ``scan_layers`` on and
off, and the KV-cached decoding loop (``genjax.sampling.decode``, batch 1,
prompt 32, 32 new tokens, the decoding compile options of this backend), which
always unrolls its layers. Expected on a 2-core CPU: the scanned step stays
near flat in depth while the unrolled one grows about linearly; a few
minutes in all. Protocol: experiments/benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import platform
import time

from genjax.benchmarking import child_request, report, run_side, send_result

KINDS = ("train_scan", "train_unrolled", "decode")


def model_config(kind: str, num_layers: int):
    """The cpu-small width at this depth, layers scanned for ``train_scan`` only."""
    from genjax.models import transformer

    return dataclasses.replace(
        transformer.get_preset("cpu-small"),
        num_layers=num_layers,
        scan_layers=kind == "train_scan",
    )


def decode_seconds(cfg) -> float:
    """Lowering plus compiling the decoding loop of one 32-token prompt."""
    import jax
    import numpy as np

    from genjax.models import transformer
    from genjax.sampling import decode, layouts

    weights = jax.eval_shape(
        lambda p: layouts.DecodingWeights(cfg, p, None, column_blocks=1).params,
        transformer.abstract_params(cfg),
    )
    program = decode.decoding_program("auto")
    prompt = np.zeros((1, 32), np.int32)
    args = (prompt, np.zeros(1, np.int32), np.zeros(1, np.uint32), np.float32(0))
    args += (np.int32(0), np.float32(1), np.int32(-1), decode._stop_array(()))
    args += (np.bool_(False),)  # not streaming
    t0 = time.perf_counter()
    program.lower(
        cfg, weights, *args, max_new_tokens=32, return_logits=False, cache_block=None
    ).compile()
    return time.perf_counter() - t0


def train_seconds(cfg) -> float:
    """Lowering plus compiling the LM family's training step on one device."""
    import jax
    import numpy as np

    from genjax import lm, run, train
    from genjax import mesh as meshlib

    pretrain = lm.PretrainConfig(model=cfg)
    mesh = meshlib.make_mesh("data=1", devices=jax.devices()[:1])
    abstract, shardings = run.abstract_state(pretrain, lm.FAMILY, mesh)
    step = train.jit_train_step(lm.make_step(pretrain), shardings, mesh)
    batch = {"tokens": jax.ShapeDtypeStruct((4, 65), np.int32)}
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        step.jitted.lower(abstract, batch).compile()
    return time.perf_counter() - t0


def compile_seconds(kind: str, num_layers: int) -> float:
    """Lowering plus compiling one program, in this (fresh) process."""
    cfg = model_config(kind, num_layers)
    return decode_seconds(cfg) if kind == "decode" else train_seconds(cfg)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--results", type=pathlib.Path, help="append a dated section to this file")
    args = p.parse_args(argv)
    if min(args.layers) < 1:
        raise SystemExit("--layers must be >= 1")
    rows = []
    for layers in args.layers:
        row = {"layers": layers}
        for kind in KINDS:
            row[kind] = run_side(__file__, kind, {"layers": layers})["seconds"]
        print(row, flush=True)
        rows.append(row)
    import jax

    lines = [
        "| layers | train step, scan (s) | train step, unrolled (s) | decode loop (s) |",
        "|---|---|---|---|",
        *(
            f"| {r['layers']} | {r['train_scan']:.1f} | {r['train_unrolled']:.1f} "
            f"| {r['decode']:.1f} |"
            for r in rows
        ),
    ]
    versions = {"python": platform.python_version(), "jax": jax.__version__}
    report("Compile time against depth", __file__, argv, versions, [], lines, args.results)


if __name__ == "__main__":
    request = child_request()
    if request:
        kind, spec = request
        send_result({"seconds": compile_seconds(kind, spec["layers"])})
    else:
        main()
