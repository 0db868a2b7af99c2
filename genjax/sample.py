"""More samples from any diffusion run's newest checkpoint (its EMA weights).

    python -m genjax.sample --workdir DIR [--sampler heun|dpmpp2m|ddim|pc|ode|em]
        [--steps N] [--num N] [--seed S] [--guidance W] [--churn C] [--eta E] [--out FILE]

Writes the samples as ``.npy`` (default ``DIR/samples-<sampler>-<steps>.npy``; images
on the data's own scale) and prints how they score by the run's own evaluation
(modes, % high quality and reverse KL for a 2-D mixture; a classifier's scores
for labelled images). ``--guidance`` is for class- or text-conditional runs;
``--churn`` (Heun) and ``--eta`` (DDIM) default to the run's.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import numpy as np

from genjax import diffuse, generative, run
from genjax.data import images as imagelib
from genjax.data import toy2d
from genjax.metrics.modes import mode_metrics
from genjax.sampling import diffusion as samplers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Samples from a diffusion run's EMA weights.")
    p.add_argument("--workdir", required=True, help="a run of experiments/diffusion_*.py")
    p.add_argument("--sampler", help=f"one of {sorted(samplers.SAMPLERS)} (default: the run's)")
    p.add_argument("--steps", type=int, help="noise levels (default: the run's)")
    p.add_argument("--num", type=int, default=2500, help="how many samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument("--churn", type=float, help="Heun: noise added back per level (0: ODE)")
    p.add_argument("--eta", type=float, help="DDIM: 0 deterministic, 1 ancestral")
    p.add_argument("--out", type=pathlib.Path, help="the .npy to write")
    args = p.parse_args(argv)
    try:
        if args.sampler is not None:
            samplers.get(args.sampler)
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps={args.steps} must be >= 1")
        if args.num < 1:
            raise ValueError(f"--num={args.num} must be >= 1")
        for name in ("guidance", "churn", "eta"):
            if getattr(args, name) is not None and getattr(args, name) < 0:
                raise ValueError(f"--{name}={getattr(args, name)} must be >= 0")
        with run.one_line_warnings():
            cfg = run.saved_config(args.workdir, diffuse.FAMILY)
            if args.guidance is not None and not cfg.model.conditional:
                raise ValueError(
                    "--guidance needs a class- or text-conditional model; this run is "
                    "unconditional: leave --guidance out"
                )
            loaded = run.load(args.workdir, diffuse.FAMILY)
    except run.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sampler, steps = args.sampler or cfg.sample.sampler, args.steps or cfg.sample.steps
    chosen = {name: getattr(args, name) for name in ("churn", "eta")}
    sample = dataclasses.replace(cfg.sample, **{k: v for k, v in chosen.items() if v is not None})
    cfg = dataclasses.replace(cfg, sample=sample)
    samples = diffuse.draw(
        cfg, loaded.state.ema_params, num=args.num, seed=args.seed, sampler=sampler,
        steps=steps, guidance=args.guidance,
    )  # fmt: skip
    out = args.out or pathlib.Path(args.workdir) / f"samples-{sampler}-{steps}.npy"
    if cfg.data.is_images:
        images = cfg.data.load_images()
        labels = diffuse.sample_labels(cfg.model, args.num)
        scores = generative.score_images(samples, images, labels)
        np.save(out, imagelib.to_levels(samples, images.levels))
    else:
        scores = mode_metrics(samples, toy2d.get(cfg.data.dataset))
        np.save(out, samples)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
    print(f"step {loaded.step}, {sampler} with {steps} steps: {shown}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
