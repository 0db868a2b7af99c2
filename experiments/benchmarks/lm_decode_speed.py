"""Decoding throughput on CPU: genjax `decode.generate` vs Hugging Face `generate`.

The configuration of experiments/benchmarks/README.md: preset "cpu-small" (6 layers,
d_model 384, 6 heads of 64, SwiGLU 1024, vocabulary 4096, tied embeddings, context 256),
random weights, float32, prompts of 32 random token ids, 224 new tokens, batch 1 and 16,
greedy and top-p (top_p 0.9, temperature 1.0, no top-k), never stopping early. The peer
is `transformers`' `LlamaForCausalLM` built from the equivalent `LlamaConfig` (random
weights, its default SDPA attention and dynamic KV cache) calling `model.generate` under
`torch.inference_mode()`.

Each side runs in its own subprocess and goes through every (batch, strategy) in turn. Per
configuration: one first call (genjax compiles here), `--reps` timed calls whose median gives
new tokens/s (batch × new tokens ÷ seconds), then one untimed streaming call and `--reps`
streaming calls whose median gives the time to first token (TTFT): for genjax, from calling
`generate` to `on_token` firing for step 0 (the same program: streaming is a traced switch);
for HF, to the streamer's second `put` (the first carries the prompt). Compile time is
the first call minus the median call; a row that reuses an earlier row's program (genjax's
top_p after greedy: the sampling settings are traced values) shows ≈ 0, noise either way.
Peak RSS is the process's VmHWM, reset at the start of each configuration
(`/proc/self/clear_refs`), so a row's peak is the most that process held resident during that
configuration (libraries, weights, compiled programs and caches left from earlier rows
included); the side's peak is the largest over its rows and its start-up.

    python experiments/benchmarks/lm_decode_speed.py                  # print the tables
    python experiments/benchmarks/lm_decode_speed.py --results experiments/benchmarks/RESULTS.md
    python experiments/benchmarks/lm_decode_speed.py --sides hf --batches 1 --reps 1  # ~30 s
    # genjax with the CPU split into two XLA devices: batches tensor-parallel over them
    python experiments/benchmarks/lm_decode_speed.py --genjax-cpu-devices 2 --genjax-mesh tensor=2

Hardware: a 2-core CPU. Expected time for the default run: about 4 minutes when the machine is
lightly loaded (other jobs on the two cores slow both sides many-fold: check `uptime`). HF
there ran at ≈ 220–300 new tokens/s at batch 1 and ≈ 950–1,200 at batch 16 (greedy; top-p
≈ 180–250 and ≈ 750–950), TTFT ≈ 10–12 ms and ≈ 60–70 ms, depending on the machine. The
issue's goal: genjax ≥ 3× HF's tokens/s at batch 1 and 16, with peak memory ≤ HF's.

Needs the `bench` extra (torch, CPU build) and transformers (the `test` extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

from genjax.benchmarking import (
    child_request,
    peak_rss_mb,
    report,
    reset_peak_rss,
    run_side,
    send_result,
)

SIDES = ("genjax", "hf")
# Sampling settings per strategy, in genjax's terms (temperature 0 = greedy; top_k 0 = off).
STRATEGIES = {
    "greedy": {"temperature": 0.0, "top_k": 0, "top_p": 1.0},
    "top_p": {"temperature": 1.0, "top_k": 0, "top_p": 0.9},
}


def prompt_ids(spec: dict, batch: int) -> np.ndarray:
    """Random int64 [B, P] prompts, identical across sides."""
    rng = np.random.default_rng(batch)
    return rng.integers(0, spec["model"]["vocab_size"], (batch, spec["prompt_len"]))


# ----------------------------------------------------------------------------- timing


def time_config(call, spec: dict, batch: int) -> dict:
    """Times `call(stream) -> (new_tokens_BN, first_token_time | None)` as the docstring says."""
    t0 = time.perf_counter()
    new_BN, _ = call(False)
    first_call_s = time.perf_counter() - t0
    if new_BN.shape != (batch, spec["new_tokens"]):
        raise AssertionError(
            f"expected {batch} × {spec['new_tokens']} new tokens, got {new_BN.shape}"
        )
    call_s = []
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        call(False)
        call_s.append(time.perf_counter() - t0)
    call(True)  # warm the streaming path (HF's streamer; genjax's is the same program)
    ttft_s = []
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        _, t_first = call(True)
        ttft_s.append(t_first - t0)
    steady_s = statistics.median(call_s)
    return {
        "first_call_s": first_call_s,
        "compile_s": first_call_s - steady_s,
        "tokens_per_s": [batch * spec["new_tokens"] / s for s in call_s],
        "ttft_s": statistics.median(ttft_s),
    }


def run_configs(make_call, spec: dict) -> dict:
    """Every (batch, strategy) of `spec`; `make_call(prompt_ids_BP, strategy)` builds a call."""
    startup_mb = side_peak = peak_rss_mb()  # imports and weights
    rows, resets = [], []
    for batch in spec["batches"]:
        for strategy in spec["strategies"]:
            resets.append(reset_peak_rss())
            row = time_config(make_call(prompt_ids(spec, batch), strategy), spec, batch)
            row.update(batch=batch, strategy=strategy, peak_rss_mb=peak_rss_mb())
            side_peak = max(side_peak, row["peak_rss_mb"])
            rows.append(row)
            print(f"  batch {batch} {strategy}: {row}", file=sys.stderr, flush=True)
    return {
        "rows": rows,
        "startup_rss_mb": startup_mb,
        "peak_rss_mb": side_peak,
        "peak_reset": all(resets),
    }


# ----------------------------------------------------------------------------- sides


def run_genjax(spec: dict) -> dict:
    import jax

    from genjax import mesh as meshlib

    if spec["genjax_cpu_devices"] > 1:  # before JAX starts its CPU client
        meshlib.split_cpu(spec["genjax_cpu_devices"])
    from genjax.models import transformer
    from genjax.sampling import decode

    cfg = transformer.get_preset(spec["preset"])
    mesh = meshlib.make_mesh(spec["genjax_mesh"]) if spec["genjax_mesh"] else None
    shardings = None
    if mesh is not None:
        abstract = transformer.abstract_params(cfg)
        axes = transformer.param_axes(cfg)
        shardings = meshlib.tree_shardings(axes, abstract, mesh, transformer.RULES)
    init = jax.jit(transformer.init, static_argnums=0, out_shardings=shardings)
    # The decoder keeps its own per-layer copy of the weights; the stacked
    # training layout is not kept alongside (HF too holds one copy).
    decoder = decode.Decoder(cfg, init(cfg, jax.random.key(0)), mesh=mesh)

    def make_call(prompts_BP: np.ndarray, strategy: str):
        prompts = prompts_BP.tolist()
        sampling = decode.SamplingParams(**STRATEGIES[strategy])

        def call(stream: bool):
            first = []

            def on_token(step: int, tokens_B: np.ndarray) -> None:
                if step == 0:
                    first.append(time.perf_counter())

            gen = decoder.generate(
                prompts, max_new_tokens=spec["new_tokens"], sampling=sampling,
                seed=0, eos_id=None, on_token=on_token if stream else None,
            )  # fmt: skip
            return np.asarray(gen.tokens), (first[0] if first else None)

        return call

    out = run_configs(make_call, spec)
    out["versions"] = {"jax": jax.__version__}
    out["params"] = transformer.count_params(cfg)["total"]
    out["device"] = f"{jax.default_backend().upper()} ({jax.devices()[0].device_kind})"
    return out


def hf_config(model: dict):
    """The `LlamaConfig` equivalent to genjax's config fields in `model`."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=model["vocab_size"],
        hidden_size=model["d_model"],
        intermediate_size=model["ffn_dim"],
        num_hidden_layers=model["num_layers"],
        num_attention_heads=model["num_heads"],
        num_key_value_heads=model["num_kv_heads"],
        head_dim=model["head_dim"],
        max_position_embeddings=model["max_seq_len"],
        rms_norm_eps=model["norm_eps"],
        rope_theta=model["rope_theta"],
        tie_word_embeddings=model["tie_embeddings"],
        # No special tokens: nothing can end a row early.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def run_hf(spec: dict) -> dict:
    import torch
    import transformers
    from transformers import LlamaForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class FirstTokenTimer(BaseStreamer):
        """Records when `generate` hands over a first new token (the first `put` is the prompt)."""

        def __init__(self):
            self.puts = 0
            self.first_token_time = None

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                self.first_token_time = time.perf_counter()

        def end(self):
            pass

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_config(spec["model"])).eval()
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != spec["expected_params"]:
        raise AssertionError(
            f"HF peer has {n_params} parameters, genjax {spec['expected_params']}: "
            "the two models are not the same shape"
        )

    def make_call(prompts_BP: np.ndarray, strategy: str):
        input_ids = torch.from_numpy(prompts_BP).long()
        sampling = STRATEGIES[strategy]
        if sampling["temperature"] == 0.0:
            options = {"do_sample": False}
        else:  # top_k=0: switch off generate's default top-k of 50
            options = {"do_sample": True, **sampling}

        def call(stream: bool):
            streamer = FirstTokenTimer() if stream else None
            torch.manual_seed(0)
            with torch.inference_mode():
                out_BT = model.generate(
                    input_ids, attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"],
                    eos_token_id=None, pad_token_id=None, streamer=streamer, **options,
                )  # fmt: skip
            new_BN = out_BT[:, input_ids.shape[1] :].numpy()
            return new_BN, (streamer.first_token_time if stream else None)

        return call

    out = run_configs(make_call, spec)
    out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    out["params"] = n_params
    return out


def child_main(side: str, spec: dict) -> None:
    if spec["threads"] < (os.cpu_count() or 1):
        # Same cores for both sides: XLA sizes its pool from the affinity mask.
        os.sched_setaffinity(0, range(spec["threads"]))
    send_result(run_genjax(spec) if side == "genjax" else run_hf(spec))


# ----------------------------------------------------------------------------- driver


def tables(results: dict[str, dict]) -> list[str]:
    lines = [
        "| batch | strategy | side | new tokens/s (median) | min–max | TTFT (ms) "
        "| first call (s) | compile (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {}
    for side, r in results.items():
        for row in r["rows"]:
            by_key.setdefault((row["batch"], row["strategy"]), {})[side] = row
    for (batch, strategy), sides in by_key.items():
        for side, row in sides.items():
            tps = row["tokens_per_s"]
            lines.append(
                f"| {batch} | {strategy} | {side} | {statistics.median(tps):,.0f} | "
                f"{min(tps):,.0f}–{max(tps):,.0f} | {row['ttft_s'] * 1e3:,.1f} | "
                f"{row['first_call_s']:.1f} | {row['compile_s']:.1f} | {row['peak_rss_mb']:,.0f} |"
            )
    peaks = ", ".join(
        f"{side} {r['peak_rss_mb']:,.0f} MB ({r['startup_rss_mb']:,.0f} after imports and weights)"
        for side, r in results.items()
    )
    lines += ["", f"Peak RSS of each side's process over all its rows: {peaks}."]
    if not all(side in results for side in SIDES):
        return lines

    lines += [
        "",
        "| batch | strategy | tokens/s genjax / HF (↑) | TTFT genjax / HF (↓) "
        "| peak RSS genjax / HF (↓) |",
        "|---|---|---|---|---|",
    ]
    speedups = {}
    for (batch, strategy), sides in by_key.items():
        g, h = sides["genjax"], sides["hf"]
        speedup = statistics.median(g["tokens_per_s"]) / statistics.median(h["tokens_per_s"])
        speedups[batch, strategy] = speedup
        lines.append(
            f"| {batch} | {strategy} | **{speedup:.2f}×** | {g['ttft_s'] / h['ttft_s']:.2f}× | "
            f"{g['peak_rss_mb'] / h['peak_rss_mb']:.2f}× |"
        )
    low = min(speedups, key=speedups.get)
    mem_g, mem_h = results["genjax"]["peak_rss_mb"], results["hf"]["peak_rss_mb"]
    lines += [
        "",
        f"Goal ≥ 3× tokens/s: {'met' if speedups[low] >= 3 else 'missed'} (lowest "
        f"{speedups[low]:.2f}× at batch {low[0]} {low[1]}). Goal peak RSS ≤ HF: "
        f"{'met' if mem_g <= mem_h else 'missed'} ({mem_g:,.0f} vs {mem_h:,.0f} MB).",
    ]
    return lines


def genjax_devices(device: str, args: argparse.Namespace) -> str:
    """Where the genjax side decoded, e.g. "one XLA CPU device"."""
    kind = "XLA CPU" if device.startswith("CPU") else device
    if not args.genjax_mesh:
        return f"one {kind} device"
    count = args.genjax_cpu_devices if kind == "XLA CPU" else "its"
    return f"{count} {kind} device(s), mesh {args.genjax_mesh} for batches"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu-small", help="genjax transformer preset")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="prompts per call")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--reps", type=int, default=3, help="timed calls per row (median reported)")
    p.add_argument("--new-tokens", type=int, default=224, help="tokens generated per prompt")
    p.add_argument("--prompt-len", type=int, default=32, help="random prompt tokens")
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU cores per side")
    p.add_argument(
        "--genjax-cpu-devices", type=int, default=1,
        help="split the CPU into this many XLA devices on the genjax side",
    )  # fmt: skip
    p.add_argument(
        "--genjax-mesh", default=None,
        help="genjax decodes batches on this mesh, e.g. tensor=2 (single prompts: one device)",
    )  # fmt: skip
    p.add_argument("--results", type=pathlib.Path, help="append a dated section to this file")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from genjax.models import transformer

    for name in ("reps", "new_tokens", "prompt_len", "threads", "genjax_cpu_devices"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.batches) < 1:
        raise SystemExit("--batches must be >= 1")
    cfg = transformer.get_preset(args.preset)
    if args.prompt_len + args.new_tokens > cfg.max_seq_len:
        raise SystemExit(
            f"--prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} exceeds "
            f"max_seq_len {cfg.max_seq_len} of {args.preset}"
        )
    spec = {
        "preset": args.preset,
        "model": dataclasses.asdict(cfg),  # the HF child builds its LlamaConfig from these
        "expected_params": transformer.count_params(cfg)["total"],
        "batches": args.batches,
        "strategies": args.strategies,
        "reps": args.reps,
        "new_tokens": args.new_tokens,
        "prompt_len": args.prompt_len,
        "threads": args.threads,
        "genjax_cpu_devices": args.genjax_cpu_devices,
        "genjax_mesh": args.genjax_mesh,
    }
    results = {side: run_side(__file__, side, spec) for side in dict.fromkeys(args.sides)}

    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for r in results.values():
        versions.update(r["versions"])
    header = [
        f"preset {args.preset!r}, {spec['expected_params']:,} params, {cfg.dtype} compute, "
        f"{cfg.param_dtype} weights (random); "
        f"prompt {args.prompt_len} random tokens + {args.new_tokens} new tokens, no early stop; "
        f"greedy, top_p = top-p 0.9 at temperature 1.0 (no top-k); median of {args.reps} calls "
        f"after a first call; {args.threads} threads; compile = first call − median call "
        "(≈ 0, or slightly negative from noise, where a row reuses an earlier row's program)",
    ]
    if "hf" in results:
        header.append(
            "HF: LlamaForCausalLM.generate (SDPA attention, dynamic KV cache) under "
            "torch.inference_mode()"
        )
    if "genjax" in results:
        header.append(
            "genjax: genjax.sampling.decode.Decoder.generate on "
            + genjax_devices(results["genjax"]["device"], args)
        )
    if not all(r["peak_reset"] for r in results.values()):
        header.append("VmHWM could not be reset: each row's peak RSS includes the rows before it")
    report(
        "LM decoding throughput", __file__, argv, versions, header, tables(results), args.results
    )


if __name__ == "__main__":
    request = child_request()
    if request:
        child_main(*request)
    else:
        main()
