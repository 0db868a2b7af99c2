"""Compile time against depth: scan-over-layers versus the unrolled layer loop.

    python experiments/benchmarks/compile_time.py                 # layers 2 4 8 16
    python experiments/benchmarks/compile_time.py --layers 2 8 32 --results RESULTS.md

For each depth, the cpu-small width (d_model 384, 6 heads, SwiGLU 1024, vocab
4096) is compiled three ways, each timed as ``jit(...).lower(...).compile()``
in a fresh process (no compilation cache): the training step (forward,
backward, AdamW) with ``scan_layers`` on and off, and the KV-cached decoding
loop (``genjax.sampling.decode``, batch 1, prompt 32, 32 new tokens), which
always unrolls its layers. Expected on a 2-core CPU: the scanned step stays
near flat in depth while the unrolled one grows about linearly; a few
minutes in all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import subprocess
import sys
import time


def compile_seconds(kind: str, num_layers: int) -> float:
    """Lowering plus compiling one program, in this (fresh) process."""
    import jax
    import numpy as np

    from genjax import mesh as meshlib
    from genjax import train
    from genjax.models import transformer
    from genjax.sampling import decode

    cfg = dataclasses.replace(
        transformer.get_preset("cpu-small"),
        num_layers=num_layers,
        scan_layers=kind == "train_scan",
    )
    params = transformer.abstract_params(cfg)
    if kind == "decode":
        params = jax.eval_shape(transformer.split_layers, params)
        prompt = np.zeros((1, 32), np.int32)
        args = (prompt, np.zeros(1, np.int32), np.zeros(1, np.uint32), np.float32(0))
        args += (np.int32(0), np.float32(1), np.int32(-1), np.full((4, 8), -1, np.int32))
        args += (np.bool_(False),)  # not streaming
        t0 = time.perf_counter()
        decode.decoding_program().lower(
            cfg,
            params,
            *args,
            max_new_tokens=32,
            return_logits=False,
            cache_block=None,
        ).compile()
        return time.perf_counter() - t0
    mesh = meshlib.make_mesh("data=1", devices=jax.devices()[:1])
    opt_cfg = train.OptimConfig()
    optimizer = train.make_optimizer(opt_cfg)
    abstract, shardings = train.abstract_train_state(
        lambda key: transformer.init(cfg, key), transformer.param_axes(cfg), optimizer, mesh
    )
    step = train.jit_train_step(
        train.make_train_step(lambda p, b, *, key: transformer.loss(cfg, p, b), optimizer, opt_cfg),
        shardings,
        mesh,
    )
    batch = {"tokens": jax.ShapeDtypeStruct((4, 65), np.int32)}
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        step.jitted.lower(abstract, batch).compile()
    return time.perf_counter() - t0


KINDS = ("train_scan", "train_unrolled", "decode")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--results", type=pathlib.Path, help="append a dated section to this file")
    args = p.parse_args(argv)
    rows = []
    for layers in args.layers:
        row = {"layers": layers}
        for kind in KINDS:
            out = subprocess.run(
                [sys.executable, __file__, "--child", kind, str(layers)],
                capture_output=True,
                text=True,
                check=True,
            )
            row[kind] = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
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
    print("\n".join(lines))
    if args.results:
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
        from lm_train_speed import append_section, results_section

        versions = {"python": platform.python_version(), "jax": jax.__version__}
        section = results_section("Compile time against depth", __file__, argv, versions, [], lines)
        append_section(args.results, section)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        seconds = compile_seconds(sys.argv[2], int(sys.argv[3]))
        print(json.dumps({"seconds": seconds}))
    else:
        main()
