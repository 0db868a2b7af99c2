"""Language-model training throughput on CPU: genjax vs PyTorch eager and torch.compile.

The configuration of experiments/benchmarks/README.md (preset "cpu-small": 6 layers,
d_model 384, 6 heads of 64, SwiGLU 1024, vocabulary 4096, tied embeddings) at sequence
256, batch 16, AdamW (lr 3e-4, betas 0.9/0.95, weight decay 0.1 on matrices, eps 1e-8,
clip 1.0), float32, random token batches. The peer is `torch_llama.py`, the same model
in plain PyTorch.

Each side runs in its own subprocess, so its peak RSS (VmHWM of that process) is its
own (torch.compile's compile workers, if any, are not counted). Per side: the first
step alone (compile time for genjax and torch.compile), `--warmup` more steps, then
`--reps` repetitions of `--steps` timed steps; tokens/s is the median over the
repetitions. Throughput is also given as achieved GFLOP/s and as MFU against this
machine's float32 matmul rate (2048³ matmul, best of numpy, jax and torch, median of
7), with FLOPs counted as the README says (`flops_per_token`).

    python experiments/benchmarks/lm_train_speed.py                      # print the table
    python experiments/benchmarks/lm_train_speed.py --results experiments/benchmarks/RESULTS.md
    python experiments/benchmarks/lm_train_speed.py --preset tiny --batch 2 --seq 32 \\
        --steps 2 --reps 2 --warmup 1                                     # smoke test, ~1 min

Hardware: a 2-core CPU. Expected time for the default run: ~4 minutes, most of it
torch.compile's first step and the 3 × 10 steps of each side. Expected numbers there:
PyTorch eager ≈2,200 tokens/s, torch.compile ≈2,500; a plain JAX port ran at ≈0.55×
eager. Needs the `bench` extra (torch==2.13.0, CPU build).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import platform
import statistics
import tempfile
import time

import numpy as np

from genjax import benchmarking
from genjax import config as configlib

# On a GPU the driver's matmul measurement would otherwise hold 75% of the
# memory while the side under test runs in a child process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
SIDES = ("genjax", "torch_eager", "torch_compile")
OPTIM = {"lr": 3e-4, "b1": 0.9, "b2": 0.95, "weight_decay": 0.1, "eps": 1e-8, "clip_norm": 1.0}


def flops_per_token(cfg, seq_len: int | None = None) -> int:
    """Training FLOPs per token: 6·(non-embedding params + LM-head matmul) + 6·L·T·D.

    Non-embedding params are the blocks and the final norm; the LM head's V·D matmul is
    counted once whether or not it is tied to the embedding. The last term is causal
    attention (QKᵀ and AV, forward and backward, half the positions masked).

    Unit check, "cpu-small" at T = 256:
      per block 4·384·384 (q, k, v, o) + 3·384·1024 (SwiGLU) + 2·384 (norms) = 1,770,240;
      × 6 layers + 384 (final norm) = 10,621,824 non-embedding; LM head 4096·384 = 1,572,864;
      6 · 12,194,688 = 73,168,128; attention 6·6·256·384 = 3,538,944;
      total 76,707,072 FLOPs per token (asserted in `main`).
    """
    T = cfg.max_seq_len if seq_len is None else seq_len
    D, L, K, F, V = cfg.d_model, cfg.num_layers, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    attn = D * cfg.num_heads * K * 2 + D * cfg.num_kv_heads * K * 2  # q, o; k, v
    block = attn + 3 * D * F + 2 * D
    non_embedding = L * block + D
    return 6 * (non_embedding + V * D) + 6 * L * T * D


# ----------------------------------------------------------------------------- timing


def time_steps(run_step, sync, spec: dict) -> dict:
    """First step, warm-up, then `reps` timed windows of `steps` steps (sync at the end)."""
    t0 = time.perf_counter()
    sync(run_step(0))
    first_s = time.perf_counter() - t0
    for i in range(spec["warmup"]):
        out = run_step(1 + i)
    if spec["warmup"]:
        sync(out)
    window_s = []
    i = 1 + spec["warmup"]
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        for _ in range(spec["steps"]):
            out = run_step(i)
            i += 1
        last_loss = sync(out)
        window_s.append(time.perf_counter() - t0)
    tokens = spec["batch"] * spec["seq"] * spec["steps"]
    return {
        "first_step_s": first_s,
        "tokens_per_s": [tokens / s for s in window_s],
        "last_loss": last_loss,
    }


def token_batches(spec: dict) -> list[np.ndarray]:
    """A few random int32 [B, T+1] batches, identical across sides."""
    rng = np.random.default_rng(0)
    shape = (spec["batch"], spec["seq"] + 1)
    return [rng.integers(0, spec["vocab_size"], shape, dtype=np.int32) for _ in range(4)]


def model_config(preset: str, overrides: list[str]):
    """The preset with ``field=value`` overrides (genjax side only, e.g. attention=cudnn)."""
    from genjax.models import transformer

    return configlib.override(transformer.get_preset(preset), overrides)


def run_genjax(spec: dict) -> dict:
    import jax

    from genjax import lm, run, train
    from genjax import mesh as meshlib

    model = model_config(spec["preset"], spec["model_overrides"])
    cfg = lm.PretrainConfig(
        model=model,
        optim=train.OptimConfig(
            lr=OPTIM["lr"],
            warmup_steps=0,
            total_steps=1000,
            weight_decay=OPTIM["weight_decay"],
            b1=OPTIM["b1"],
            b2=OPTIM["b2"],
            eps=OPTIM["eps"],
            clip_norm=OPTIM["clip_norm"],
        ),
    )
    # The LM family's own state and step (weight decay on matrices only, as the torch peer).
    mesh = meshlib.make_mesh("data=1", devices=jax.devices()[:1])
    _, shardings = run.abstract_state(cfg, lm.FAMILY, mesh)
    state = train.create_state(lambda k: lm.init(cfg, k), shardings, mesh, jax.random.key(0))
    step_fn = train.jit_train_step(lm.make_step(cfg), shardings, mesh)
    batches = [meshlib.global_batch({"tokens": b}, mesh) for b in token_batches(spec)]
    holder = {"state": state}

    def run_step(i):
        holder["state"], metrics = step_fn(holder["state"], batches[i % len(batches)])
        return metrics

    def sync(metrics):
        jax.block_until_ready(holder["state"])
        return float(metrics["loss"])

    out = time_steps(run_step, sync, spec)
    out["versions"] = benchmarking.jax_side_versions()
    out["params"] = sum(x.size for x in jax.tree.leaves(holder["state"].params))
    return out


def run_torch(spec: dict, compiled: bool) -> dict:
    import torch
    import torch_llama  # this script's folder: the child runs the script itself

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = torch_llama.Config(**spec["model"])
    model = torch_llama.Llama(cfg)
    n_params = torch_llama.count_params(model)
    if n_params != spec["expected_params"]:
        raise AssertionError(
            f"torch peer has {n_params} parameters, genjax {spec['expected_params']}: "
            "the two models are not the same shape"
        )
    opt = torch_llama.make_optimizer(
        model, lr=OPTIM["lr"], betas=(OPTIM["b1"], OPTIM["b2"]),
        weight_decay=OPTIM["weight_decay"], eps=OPTIM["eps"],
    )  # fmt: skip
    loss_fn = torch.compile(torch_llama.lm_loss) if compiled else torch_llama.lm_loss
    batches = [torch.from_numpy(b).long() for b in token_batches(spec)]

    def run_step(i):
        return torch_llama.train_step(
            model, opt, loss_fn, batches[i % len(batches)], clip_norm=OPTIM["clip_norm"]
        )

    out = time_steps(run_step, lambda loss: float(loss), spec)
    out["versions"] = {"torch": torch.__version__}
    out["params"] = n_params
    return out


def child_main(side: str, spec: dict) -> None:
    if spec["threads"] < (os.cpu_count() or 1):
        # Same cores for every side: XLA sizes its pool from the affinity mask.
        os.sched_setaffinity(0, range(spec["threads"]))
    if side == "genjax":
        out = run_genjax(spec)
    else:
        out = run_torch(spec, compiled=side == "torch_compile")
    out["peak_rss_mb"] = benchmarking.peak_rss_mb()
    benchmarking.send_result(out)


# ----------------------------------------------------------------------------- driver


def run_side(side: str, spec: dict) -> dict:
    """One side in its own process, with a fresh inductor cache: torch.compile's first
    step is a cold compile, like genjax's (JAX's persistent compilation cache is off by
    default)."""
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        return benchmarking.run_side(__file__, side, spec, env=env)


def table(results: dict[str, dict], flops_tok: int, peak_gflops: float) -> list[str]:
    rows = [
        "| side | first step (s) | tokens/s (median) | min–max | GFLOP/s | MFU "
        "| peak RSS (MB) | loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for side, r in results.items():
        tps = statistics.median(r["tokens_per_s"])
        gflops = tps * flops_tok / 1e9
        rows.append(
            f"| {side} | {r['first_step_s']:.1f} | {tps:,.0f} | "
            f"{min(r['tokens_per_s']):,.0f}–{max(r['tokens_per_s']):,.0f} | {gflops:.1f} | "
            f"{gflops / peak_gflops:.1%} | {r['peak_rss_mb']:,.0f} | {r['last_loss']:.3f} |"
        )
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu-small", help="genjax transformer preset")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=10, help="timed steps per repetition")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of these")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU cores per side")
    p.add_argument("--results", type=pathlib.Path, help="append a dated section to this file")
    configlib.add_set_flag(
        p,
        "genjax model overrides, e.g. attention=cudnn remat_policy=dots",
        metavar="FIELD=VALUE",
    )
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from genjax.models import transformer

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = sorted(set(sides) - set(SIDES))
    if unknown or not sides:
        raise SystemExit(f"--sides: unknown {unknown}; choose from {','.join(SIDES)}")
    for name in ("batch", "seq", "steps", "reps", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1")
    cfg = model_config(args.preset, args.set)
    if args.seq > cfg.max_seq_len:
        raise SystemExit(f"--seq {args.seq} exceeds max_seq_len {cfg.max_seq_len} of {args.preset}")
    if args.preset == "cpu-small":
        assert flops_per_token(cfg, 256) == 76_707_072, "FLOP count disagrees with the docstring"

    torch_fields = set()
    if set(sides) - {"genjax"}:  # torch only where a torch side runs (not on a GPU machine)
        import torch_llama  # the peer's config: genjax's fields, minus the JAX-only ones

        torch_fields = {f.name for f in dataclasses.fields(torch_llama.Config)}
    spec = {
        "preset": args.preset,
        "model_overrides": args.set,
        "model": {k: v for k, v in dataclasses.asdict(cfg).items() if k in torch_fields},
        "expected_params": transformer.count_params(cfg)["total"],
        "vocab_size": cfg.vocab_size,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "reps": args.reps,
        "warmup": args.warmup,
        "threads": args.threads,
    }
    rates = benchmarking.matmul_gflops()
    peak_lib = max(rates, key=rates.get)
    results = {side: run_side(side, spec) for side in sides}

    flops_tok = flops_per_token(cfg, args.seq)
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for r in results.values():
        versions.update(r["versions"])
    lines = table(results, flops_tok, rates[peak_lib])
    torch_sides = [s for s in results if s.startswith("torch")]
    if "genjax" in results and torch_sides:
        best = max(torch_sides, key=lambda s: statistics.median(results[s]["tokens_per_s"]))
        ratio = statistics.median(results["genjax"]["tokens_per_s"]) / statistics.median(
            results[best]["tokens_per_s"]
        )
        lines += ["", f"genjax / best PyTorch ({best}): **{ratio:.2f}×**"]
    header = [
        f"preset {args.preset!r}, {spec['expected_params']:,} params, batch {args.batch} × seq "
        f"{args.seq}, {flops_tok / 1e6:.1f} MFLOP/token; {args.steps} steps × {args.reps} reps "
        f"after {1 + args.warmup} warm-up steps; {args.threads} threads",
        "matmul fp32 2048³ unless named (median of 7): "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items())
        + f"; MFU against {peak_lib}",
    ]
    print("\n".join([*header, "", *lines]))

    if args.results:
        title = "LM training throughput"
        section = benchmarking.results_section(title, __file__, argv, versions, header, lines)
        benchmarking.append_section(args.results, section)


if __name__ == "__main__":
    request = benchmarking.child_request()
    if request:
        child_main(*request)
    else:
        main()
