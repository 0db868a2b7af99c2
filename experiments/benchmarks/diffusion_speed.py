"""Digits U-Net speed: training and 50-step DDIM sampling, genjax vs diffusers' UNet2DModel.

The model is the default digits preset's (``genjax.diffuse.IMAGES``): a class-conditional
U-Net laid out as diffusers' ``UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D",
"AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)``.
The peer is that very ``UNet2DModel`` with ``num_class_embeds=11`` (ten digits and the
null label of classifier-free guidance) and ``attention_head_dim=16`` (genjax's 4 heads
at 64 channels); both have 702,753 parameters, checked before timing.

- **Training**: one step = EDM-preconditioned denoising MSE (ln σ ~ N(−1.2, 1.2²),
  c_skip, c_out, c_in, c_noise = ¼ ln σ), one label in ten replaced by the null label,
  backward, global-norm clip 1.0, Adam(W) (b1 0.9, b2 0.95, eps 1e-8, the preset's lr and
  weight decay) and an EMA update of the weights (0.999): genjax's own step
  (``diffuse.make_step``) against the same arithmetic in PyTorch, eager and with the loss
  (forward and backward) under ``torch.compile``. Real digits, batch 128, float32. The
  learning rates differ (genjax warms up over the preset's first steps, PyTorch's is
  constant), which changes the losses, not the work of a step.
  Per side: the first step alone, ``--warmup`` more, then ``--reps`` windows of
  ``--steps`` steps; images/s is the median over the windows.
- **Sampling**: ``--sample-num`` images by ``--sample-steps`` (50) DDIM steps, one network
  call each (guidance 1: the conditional model alone): ``diffuse.draw(sampler="ddim")``
  against a ``DDIMScheduler`` (ε prediction, 1,000 training steps) loop over the peer
  (``torch.inference_mode``; compiled: the U-Net under ``torch.compile``). The first call
  alone, then ``--reps`` timed calls; images/s is the median. The two schedules differ
  (EDM's σ against DDPM's linear β), the work per step does not.

Each side runs in its own process (``genjax.benchmarking.run_side``) with a fresh
inductor cache, on ``--threads`` cores.

    python experiments/benchmarks/diffusion_speed.py                      # print the table
    python experiments/benchmarks/diffusion_speed.py --results experiments/benchmarks/RESULTS.md
    python experiments/benchmarks/diffusion_speed.py --batch 8 --steps 2 --reps 1 \\
        --warmup 1 --sample-num 8 --sample-steps 2                        # smoke test
    python experiments/benchmarks/diffusion_speed.py --set model.condition=none  # unconditional
    python experiments/benchmarks/diffusion_speed.py --sides genjax --threads 1 --profile

``--profile`` traces ``--steps`` more genjax training steps and prints the share of
XLA's op time per kind of op (``genjax.benchmarking.op_time_shares``).

Hardware: a 2-core CPU, idle: beside another busy process PyTorch's OpenMP threads spin
against it and its 2-thread numbers collapse (100× slower forward passes here), so on a
shared machine compare at ``--threads 1``. Needs the ``bench`` extra (torch==2.13.0 CPU
build and diffusers), nothing beyond genjax with ``--sides genjax``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import tempfile
import time

import numpy as np

from genjax import benchmarking
from genjax import config as configlib

# On a GPU the driver would otherwise hold 75% of the memory while a side runs.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
SIDES = ("genjax", "torch_eager", "torch_compile")
PARAM_TOLERANCE = 0.05  # the two U-Nets' parameter counts may differ by this share at most


# ----------------------------------------------------------------------------- shared


def digit_batches(spec: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """Four batches of real digits, x [B, 8, 8, 1] in [−1, 1] and labels [B]: the same
    arrays on every side (numpy only, so the torch sides never import JAX)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
        index = rng.choice(len(digits.target), spec["batch"], replace=False)
        x = digits.images[index, :, :, None].astype(np.float32) / 8 - 1  # levels 0..16
        batches.append((x, digits.target[index].astype(np.int32)))
    return batches


def sample_labels(spec: dict) -> np.ndarray | None:
    """The classes conditional samples are drawn for: 0, 1, …, K−1, 0, … (as ``draw``)."""
    k = spec["num_classes"]
    return np.arange(spec["sample_num"], dtype=np.int32) % k if k else None


def time_train(run_step, sync, spec: dict) -> dict:
    """First step, warm-up, then ``reps`` timed windows of ``steps`` steps."""
    t0 = time.perf_counter()
    sync(run_step(0))
    first_s = time.perf_counter() - t0
    for i in range(spec["warmup"]):
        out = run_step(1 + i)
    if spec["warmup"]:
        sync(out)
    window_s, i = [], 1 + spec["warmup"]
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        for _ in range(spec["steps"]):
            out = run_step(i)
            i += 1
        last_loss = sync(out)
        window_s.append(time.perf_counter() - t0)
    images = spec["batch"] * spec["steps"]
    return {
        "train_first_s": first_s,
        "train_images_per_s": [images / s for s in window_s],
        "last_loss": last_loss,
    }


def time_sample(sample, spec: dict) -> dict:
    """The first call alone (compile), then ``reps`` timed calls; ``sample(seed)`` returns
    host arrays."""
    t0 = time.perf_counter()
    out = sample(0)
    first_s = time.perf_counter() - t0
    times = []
    for rep in range(spec["reps"]):
        t0 = time.perf_counter()
        out = sample(1 + rep)
        times.append(time.perf_counter() - t0)
    if not np.isfinite(out).all():
        raise FloatingPointError("a sampler returned non-finite images")
    return {
        "sample_first_s": first_s,
        "sample_images_per_s": [spec["sample_num"] / s for s in times],
    }


# ----------------------------------------------------------------------------- genjax


def genjax_config(batch: int, overrides: list[str]):
    """The digits preset with this batch and ``--set`` overrides."""
    from genjax import diffuse, run

    return run.configure(diffuse.IMAGES, "default", [f"data.global_batch_size={batch}", *overrides])


def count_genjax_params(cfg) -> int:
    import jax

    from genjax import diffuse

    shapes = jax.eval_shape(lambda: diffuse.init_params(cfg.model, jax.random.key(0)))
    return sum(x.size for x in jax.tree.leaves(shapes))


def run_genjax(spec: dict) -> dict:
    import jax

    from genjax import diffuse, run, train
    from genjax import mesh as meshlib

    cfg = genjax_config(spec["batch"], spec["overrides"])
    # The family's own state and step, as experiments/diffusion_digits.py trains it.
    mesh = meshlib.make_mesh("data=1", devices=jax.devices()[:1])
    _, shardings = run.abstract_state(cfg, diffuse.IMAGES, mesh)
    init = lambda key: diffuse.IMAGES.init(cfg, key)
    state = train.create_state(init, shardings, mesh, jax.random.key(0))
    step_fn = train.jit_train_step(diffuse.IMAGES.step(cfg), shardings, mesh)
    batches = []
    for x, label in digit_batches(spec):
        batch = {"x": x, "label": label} if cfg.model.conditional else {"x": x}
        batches.append(meshlib.global_batch(batch, mesh))
    holder = {"state": state}

    def run_step(i):
        holder["state"], metrics = step_fn(holder["state"], batches[i % len(batches)])
        return metrics

    def sync(metrics):
        jax.block_until_ready(holder["state"])
        return float(metrics["loss"])

    out = time_train(run_step, sync, spec)
    if spec["profile"]:
        out["op_shares"] = benchmarking.op_time_shares(
            lambda: sync([run_step(i) for i in range(spec["steps"])][-1])
        )
    params = holder["state"].ema_params
    # An unconditional model takes no guidance (draw refuses one it cannot use).
    guidance = spec["guidance"] if cfg.model.conditional else None
    sample = lambda seed: diffuse.draw(
        cfg, params, num=spec["sample_num"], seed=seed, sampler="ddim",
        steps=spec["sample_steps"], guidance=guidance,
    )  # fmt: skip
    out.update(time_sample(sample, spec))
    out["params"] = count_genjax_params(cfg)
    out["versions"] = benchmarking.jax_side_versions()
    return out


# ----------------------------------------------------------------------------- PyTorch


def build_peer(spec: dict):
    """diffusers' UNet2DModel with the genjax U-Net's layout; its parameter count checked."""
    from diffusers import UNet2DModel

    model = UNet2DModel(**spec["peer"])
    n = sum(p.numel() for p in model.parameters())
    expected = spec["expected_params"]
    if abs(n - expected) > PARAM_TOLERANCE * expected:
        raise AssertionError(
            f"the diffusers U-Net has {n:,} parameters, genjax's {expected:,}: "
            f"more than {PARAM_TOLERANCE:.0%} apart, not the same model"
        )
    print(f"parameters: diffusers {n:,}, genjax {expected:,}", flush=True)
    return model, n


def edm_loss(model, x0, labels, *, process: dict, cond_dropout: float, null: int):
    """genjax.models.diffusion.loss (EDM, "simple" weighting) with condition dropout,
    written for the peer: mean of ‖F(c_in x̂, c_noise) − (x₀ − c_skip x̂)/c_out‖²."""
    import torch

    B = x0.shape[0]
    log_sigma = process["p_mean"] + process["p_std"] * torch.randn(B)
    sigma = torch.exp(log_sigma).clamp(process["sigma_min"], process["sigma_max"])
    s = sigma.view(B, 1, 1, 1)
    x_hat = x0 + s * torch.randn_like(x0)
    sd2 = process["sigma_data"] ** 2
    c_skip, c_out = sd2 / (s**2 + sd2), s * process["sigma_data"] / torch.sqrt(s**2 + sd2)
    c_in = 1 / torch.sqrt(s**2 + sd2)
    if labels is not None:
        labels = torch.where(torch.rand(B) < cond_dropout, null, labels)
    out = model(c_in * x_hat, 0.25 * torch.log(sigma), class_labels=labels).sample
    return torch.mean((out - (x0 - c_skip * x_hat) / c_out) ** 2)


def run_torch(spec: dict, compiled: bool) -> dict:
    import diffusers
    import torch
    import torch_llama  # this script's folder: AdamW with decay on matrices, as genjax's

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model, n_params = build_peer(spec)
    optim = spec["optim"]
    opt = torch_llama.make_optimizer(
        model, lr=optim["lr"], betas=(optim["b1"], optim["b2"]),
        weight_decay=optim["weight_decay"], eps=optim["eps"],
    )  # fmt: skip
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    conditional = spec["num_classes"] > 0
    loss_fn = torch.compile(edm_loss) if compiled else edm_loss
    loss_kw = {"process": spec["process"], "cond_dropout": spec["cond_dropout"]}
    loss_kw["null"] = spec["num_classes"]
    batches = [
        (torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y).long())
        for x, y in digit_batches(spec)
    ]

    def run_step(i):
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, x, y if conditional else None, **loss_kw)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, optim["clip_norm"], foreach=True)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - spec["ema_decay"])
        return loss.detach()

    out = time_train(run_step, float, spec)

    net = torch.compile(model) if compiled else model
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, prediction_type="epsilon")
    labels = sample_labels(spec)
    labels = None if labels is None else torch.from_numpy(labels).long()
    w = spec["guidance"]

    def eps(x, t_B):
        if labels is None or w == 1:
            return net(x, t_B, class_labels=labels).sample
        null = torch.full_like(labels, spec["num_classes"])  # classifier-free guidance
        both = net(torch.cat([x, x]), torch.cat([t_B, t_B]), class_labels=torch.cat([labels, null]))
        both = both.sample
        conditional_eps, unconditional_eps = both.chunk(2)
        return unconditional_eps + w * (conditional_eps - unconditional_eps)

    @torch.inference_mode()
    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        shape = (spec["sample_num"], *spec["chw"])
        x = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
        scheduler.set_timesteps(spec["sample_steps"])
        for t in scheduler.timesteps:
            x = scheduler.step(eps(x, t.expand(len(x))), t, x).prev_sample
        return x.numpy()

    out.update(time_sample(sample, spec))
    out["params"] = n_params
    out["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    return out


def child_main(side: str, spec: dict) -> None:
    if spec["threads"] < (os.cpu_count() or 1):
        # Same cores for every side: XLA sizes its pool from the affinity mask.
        os.sched_setaffinity(0, range(spec["threads"]))
    out = run_genjax(spec) if side == "genjax" else run_torch(spec, side == "torch_compile")
    out["peak_rss_mb"] = benchmarking.peak_rss_mb()
    benchmarking.send_result(out)


# ----------------------------------------------------------------------------- driver


def peer_kwargs(cfg) -> dict:
    """UNet2DModel's arguments for the genjax U-Net of ``cfg`` (a ``diffuse.Config``)."""
    unet, model = cfg.model.unet, cfg.model
    widths = [unet.channels * m for m in unet.channel_mult]
    attn = [i in unet.attention_levels for i in range(len(widths))]
    return {
        "sample_size": model.shape[0],
        "in_channels": model.shape[-1],
        "out_channels": model.shape[-1],
        "block_out_channels": widths,
        "layers_per_block": unet.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "norm_num_groups": unet.groups,
        # diffusers gives every attention C / attention_head_dim heads; genjax `heads`.
        "attention_head_dim": widths[-1] // unet.heads,
        # The labels and the null label; None: no label input.
        "num_class_embeds": model.num_classes + 1 if model.condition == "class" else None,
    }


def check_peer_matches(cfg) -> None:
    """What the peer cannot be: anything but a class- or un-conditional EDM U-Net on digits."""
    reasons = []
    if cfg.model.arch != "unet" or cfg.model.condition == "text":
        reasons.append("the peer is a U-Net with class labels or none (model.arch=unet)")
    if (cfg.process.sde, cfg.process.parameterization, cfg.process.weighting) != (
        "edm",
        "edm",
        "simple",
    ):
        reasons.append("the peer's loss is EDM's (process.sde=edm, parameterization=edm)")
    if cfg.model.shape != (8, 8, 1) or cfg.optim.grad_accum != 1 or not cfg.optim.clip_norm:
        reasons.append("the peer trains on 8×8 digits, one micro-batch, clipped gradients")
    if reasons:
        raise SystemExit("torch sides: " + "; ".join(reasons) + " (or use --sides genjax)")


def run_side(side: str, spec: dict) -> dict:
    """One side in its own process with a fresh inductor cache (a cold torch.compile)."""
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        return benchmarking.run_side(__file__, side, spec, env=env)


def table(results: dict[str, dict]) -> list[str]:
    rows = [
        "| side | train: first step (s) | train images/s (median) | min–max | last loss "
        "| DDIM: first call (s) | DDIM images/s (median) | min–max | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for side, r in results.items():
        train, samp = r["train_images_per_s"], r["sample_images_per_s"]
        rows.append(
            f"| {side} | {r['train_first_s']:.1f} | {statistics.median(train):,.0f} "
            f"| {min(train):,.0f}–{max(train):,.0f} | {r['last_loss']:.3f} "
            f"| {r['sample_first_s']:.1f} | {statistics.median(samp):,.1f} "
            f"| {min(samp):,.1f}–{max(samp):,.1f} | {r['peak_rss_mb']:,.0f} |"
        )
    return rows


def ratios(results: dict[str, dict]) -> list[str]:
    """genjax / the best PyTorch side, for training and for sampling."""
    torch_sides = [s for s in results if s.startswith("torch")]
    if "genjax" not in results or not torch_sides:
        return []
    lines = [""]
    for key, what in (("train_images_per_s", "training"), ("sample_images_per_s", "sampling")):
        rate = lambda s, key=key: statistics.median(results[s][key])
        best = max(torch_sides, key=rate)
        lines.append(
            f"{what}: genjax / best PyTorch ({best}): **{rate('genjax') / rate(best):.2f}×**"
        )
    return lines


def profile_lines(results: dict[str, dict]) -> list[str]:
    shares = results.get("genjax", {}).get("op_shares")
    if not shares:
        return []
    listed = ", ".join(f"{kind} {100 * share:.0f}%" for kind, share in shares)
    return ["", f"genjax training step, share of XLA op time (profile): {listed}"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128, help="images per training step")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per repetition")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps after the first")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--sample-num", type=int, default=128, help="images per sampling call")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=1.0, help="1: one network call per step")
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of these")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU cores per side")
    p.add_argument("--profile", action="store_true",
                   help="also trace genjax training steps: XLA's op time by kind")  # fmt: skip
    p.add_argument("--results", type=pathlib.Path, help="append a dated section to this file")
    configlib.add_set_flag(p, "config overrides of the digits preset, e.g. model.condition=none")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = sorted(set(sides) - set(SIDES))
    if unknown or not sides:
        raise SystemExit(f"--sides: unknown {unknown}; choose from {','.join(SIDES)}")
    for name in ("batch", "steps", "reps", "sample_num", "sample_steps", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    cfg = genjax_config(args.batch, args.set)
    if args.guidance != 1 and not cfg.model.conditional:
        raise SystemExit("--guidance needs a conditional model; this one is unconditional")
    if set(sides) - {"genjax"}:
        check_peer_matches(cfg)
    spec = {
        "overrides": args.set,
        "peer": peer_kwargs(cfg),
        "expected_params": count_genjax_params(cfg),
        "num_classes": cfg.model.num_classes,
        "chw": [cfg.model.shape[-1], *cfg.model.shape[:2]],
        "process": {
            k: getattr(cfg.process, k)
            for k in ("p_mean", "p_std", "sigma_data", "sigma_min", "sigma_max")
        },
        "cond_dropout": cfg.model.cond_dropout,
        "ema_decay": cfg.model.ema_decay,
        "optim": {
            k: getattr(cfg.optim, k) for k in ("lr", "b1", "b2", "eps", "weight_decay", "clip_norm")
        },
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "reps": args.reps,
        "sample_num": args.sample_num,
        "sample_steps": args.sample_steps,
        "guidance": args.guidance,
        "threads": args.threads,
        "profile": args.profile,
    }
    results = {side: run_side(side, spec) for side in sides}

    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for r in results.values():
        versions.update(r["versions"])
    counts = ", ".join(f"{side} {r['params']:,}" for side, r in results.items())
    condition = "class-conditional" if cfg.model.conditional else "unconditional"
    header = [
        f"digits U-Net ({condition}), parameters: {counts}",
        f"training: batch {args.batch}, EDM loss + clip + Adam(W) + EMA, {args.steps} steps × "
        f"{args.reps} reps after {1 + args.warmup} warm-up steps",
        f"sampling: {args.sample_num} images × {args.sample_steps} DDIM steps, guidance "
        f"{args.guidance:g}, {args.reps} reps after a first call; {args.threads} threads",
    ]
    lines = table(results) + ratios(results) + profile_lines(results)
    benchmarking.report(
        "Digits U-Net: training and DDIM sampling speed",
        __file__,
        argv,
        versions,
        header,
        lines,
        args.results,
    )


if __name__ == "__main__":
    request = benchmarking.child_request()
    if request:
        child_main(*request)
    else:
        main()
