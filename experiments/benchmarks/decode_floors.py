"""The parts of a batched cpu-small decoding step, timed alone in XLA and in PyTorch.

What bounds a decoding step at batch B on this CPU, measured in one process, median of
`--reps` calls each:

- weights: the step's 25 weight matmuls ([B, 384] or [B, 1024] times the 6 layers'
  q/k/v, output, gate/up and down projections, and the LM head), XLA `x @ w` against
  torch `x @ w` (float32, all cores);
- attention: one query per row over a full cache (6 layers, 6 KV heads of 64, `--slots`
  slots), XLA's einsum products (the shapes `transformer.cached_attention` uses) against
  torch's `scaled_dot_product_attention`;
- bandwidth: XLA summing a cache-sized float32 array whole, and in B·G rows (how
  reductions with outer dimensions run), against torch's sum.

    python experiments/benchmarks/decode_floors.py
    python experiments/benchmarks/decode_floors.py --results experiments/benchmarks/RESULTS.md

About a minute on a 2-core CPU. Needs torch (the `bench` extra).
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lm_train_speed import report  # noqa: E402  (same folder)

TITLE = "LM decoding: the parts of a batched step, XLA and torch"

LAYERS, D, F, V, G, K = 6, 384, 1024, 4096, 6, 64
# (in, out) of each matmul of a step: joined q/k/v, output, joined gate/up, down; the head.
WEIGHT_SHAPES = [(D, 3 * G * K), (G * K, D), (D, 2 * F), (F, D)] * LAYERS + [(D, V)]


def median_ms(fn, reps: int) -> float:
    fn()  # compiles (XLA) or warms up (torch)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def weights_ms(batch: int, reps: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    ws = [rng.standard_normal(s).astype(np.float32) * 0.05 for s in WEIGHT_SHAPES]
    xs = {n: rng.standard_normal((batch, n)).astype(np.float32) for n in (D, F)}

    @jax.jit
    def xla(xs, ws):  # each product summed, so none is dead code
        return sum(jnp.sum(xs[w.shape[0]] @ w) for w in ws)

    jws, jxs = [jnp.asarray(w) for w in ws], {n: jnp.asarray(x) for n, x in xs.items()}
    tws, txs = [torch.from_numpy(w) for w in ws], {n: torch.from_numpy(x) for n, x in xs.items()}

    def eager():
        with torch.inference_mode():
            return sum((txs[w.shape[0]] @ w).sum() for w in tws).item()

    return {
        "xla": median_ms(lambda: xla(jxs, jws).block_until_ready(), reps),
        "torch": median_ms(eager, reps),
    }


def attention_ms(batch: int, slots: int, reps: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    q = rng.standard_normal((batch, G, 1, K)).astype(np.float32)
    ks = [rng.standard_normal((batch, G, slots, K)).astype(np.float32) for _ in range(LAYERS)]
    vs = [rng.standard_normal((batch, G, slots, K)).astype(np.float32) for _ in range(LAYERS)]

    @jax.jit
    def xla(q_BGQK, ks, vs):  # each layer's output is the next one's query: nothing is dead
        for k_BGSK, v_BGSK in zip(ks, vs, strict=True):
            scores_BGQS = jnp.einsum("BGQK,BGSK->BGQS", q_BGQK, k_BGSK) * K**-0.5
            q_BGQK = jnp.einsum("BGQS,BGSK->BGQK", jax.nn.softmax(scores_BGQS, -1), v_BGSK)
        return q_BGQK

    jq, jks, jvs = jnp.asarray(q), [jnp.asarray(k) for k in ks], [jnp.asarray(v) for v in vs]
    tq, tks, tvs = (
        torch.from_numpy(q),
        list(map(torch.from_numpy, ks)),
        list(map(torch.from_numpy, vs)),
    )
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def eager():
        with torch.inference_mode():
            out = tq
            for k, v in zip(tks, tvs, strict=True):
                out = sdpa(out, k, v)
            return out.sum().item()

    return {
        "xla": median_ms(lambda: xla(jq, jks, jvs).block_until_ready(), reps),
        "torch": median_ms(eager, reps),
    }


def bandwidth_ms(batch: int, slots: int, reps: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import torch

    n = 2 * LAYERS * batch * G * slots * K  # every cached key and value
    a = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    ja, ta = jnp.asarray(a), torch.from_numpy(a)
    whole, rows = jax.jit(jnp.sum), jax.jit(lambda x: x.reshape(batch * G, -1).sum(1))
    return {
        "xla whole": median_ms(lambda: whole(ja).block_until_ready(), reps),
        "xla rows": median_ms(lambda: rows(ja).block_until_ready(), reps),
        "torch": median_ms(lambda: ta.sum().item(), reps),
        "mb": a.nbytes / 2**20,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16, help="rows decoded at once")
    p.add_argument("--slots", type=int, default=256, help="cache slots per row")
    p.add_argument("--reps", type=int, default=30, help="timed calls per measurement")
    p.add_argument("--results", type=pathlib.Path, help="append a dated section to this file")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if min(args.batch, args.slots, args.reps) < 1:
        raise SystemExit("--batch, --slots and --reps must be >= 1")
    import jax
    import torch

    w = weights_ms(args.batch, args.reps)
    a = attention_ms(args.batch, args.slots, args.reps)
    b = bandwidth_ms(args.batch, args.slots, args.reps)
    lines = [
        "| part of a step | XLA (ms) | torch (ms) | XLA / torch |",
        "|---|---|---|---|",
        f"| 25 weight matmuls, batch {args.batch} | {w['xla']:.2f} | {w['torch']:.2f} "
        f"| {w['xla'] / w['torch']:.2f} |",
        f"| attention over {args.slots} slots, 6 layers | {a['xla']:.2f} | {a['torch']:.2f} "
        f"| {a['xla'] / a['torch']:.2f} |",
        f"| sum of the cache ({b['mb']:.0f} MB), whole | {b['xla whole']:.2f} | {b['torch']:.2f} "
        f"| {b['xla whole'] / b['torch']:.2f} |",
        f"| same, in {args.batch * G} row sums | {b['xla rows']:.2f} | {b['torch']:.2f} "
        f"| {b['xla rows'] / b['torch']:.2f} |",
    ]
    header = [
        f"cpu-small shapes, float32, batch {args.batch}, one query per row; median of "
        f"{args.reps} calls; torch {torch.__version__} with {torch.get_num_threads()} threads"
    ]
    versions = {"python": platform.python_version(), "jax": jax.__version__}
    report(TITLE, __file__, argv, versions, header, lines, args.results)


if __name__ == "__main__":
    main()
