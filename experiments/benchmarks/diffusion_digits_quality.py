"""Digits diffusion quality over seeds, its likelihood beside scikit-learn's, and steps vs quality.

    python experiments/diffusion_digits.py --workdir runs/digits-0 --seed 0   # one per seed
    python experiments/benchmarks/diffusion_digits_quality.py \\
        --workdirs runs/digits-0 runs/digits-1 runs/digits-2 \\
        --results experiments/benchmarks/RESULTS.md
    python experiments/benchmarks/diffusion_digits_quality.py --train-seeds 3 \\
        --train-dir runs/digits-seeds                          # trains the three runs first

Three tables:

1. **Quality per run**: each run's EMA weights draw ``--num`` samples (default the run's
   own count, 1,000; the run's sampler, steps, guidance and churn, or ``--set
   sample.FIELD=VALUE``: the preset's are Heun, 32 levels, guidance 0.8, churn 30),
   scored in the features of the classifier of ``genjax.metrics.images`` against the
   test split: Fréchet distance (and its ratio to the real-vs-real floor at the same
   count), KID, precision/recall, density/coverage, class coverage and conditional
   accuracy; then mean and worst over the runs, and the floor (``real_floor``: as many
   real train digits scored the same way, the mean of 5 draws).
2. **Test bits/dim**: each run's probability-flow ODE likelihood
   (``diffuse.test_bits_per_dim``; read from the run's metrics log where its evaluation
   at the checkpoint's step logged it, the same solve of the same EMA weights) beside
   scikit-learn density models fitted here on the dequantized train split and scored on
   the dequantized test split (uniform dequantization to [−1, 1],
   ``genjax.data.images.dequantize`` with fixed keys; per-image log-densities turned into
   bits/dim by ``genjax.data.images.bits_per_dim``, as genjax's): ``GaussianMixture``
   (full covariance, random_state 0) with k = 10 and with k chosen by 5-fold
   cross-validated likelihood on the train split over ``--gmm-ks``, and a Gaussian
   ``KernelDensity`` whose bandwidth is chosen the same way.
3. **Steps vs quality** (the first run): Fréchet distance and images/s of each of
   ``--samplers`` (SAMPLER-STEPS, or ``ode``: the adaptive probability-flow ODE), at the
   run's guidance (Heun at its churn, DDIM at its η), as a table and a plot
   (``--steps-plot``, FD against images/s, log x).
   images/s leaves out compilation: seconds JAX spent tracing, lowering and compiling
   during the call (``jax.monitoring``'s compile events, nested ones counted once) are
   subtracted from its wall time; one call of ``--num`` images each. The 1,000-step
   ancestral sampler is ``em`` (Euler–Maruyama of the reverse SDE over the levels,
   score_sde's reverse-diffusion predictor); ``--set sample.eta=1``
   makes DDIM's steps exactly ancestral.

Smoke run (seconds, after ``python experiments/diffusion_digits.py --workdir /tmp/dg
--preset tiny``): ``--workdirs /tmp/dg --num 40 --samplers heun-2 ddim-2 --no-nll
--gmm-ks 10 --steps-plot /tmp/steps.png``. Hardware: a 2-core CPU; the default run
draws 1,000 samples per run and per sampler, the 1,000-step sampler alone for tens of
minutes, and solves one ODE per run for the likelihood.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import sklearn

from genjax import benchmarking, diffuse, generative, run
from genjax import config as configlib
from genjax.data import images as imagelib
from genjax.metrics import density_baselines
from genjax.metrics import images as image_metrics
from genjax.metrics_log import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "diffusion_digits.py"
STEPS_PLOT = ROOT / "experiments" / "benchmarks" / "diffusion_steps.png"
SAMPLERS = ("heun-18", "heun-35", "heun-50", "dpmpp2m-20", "ddim-50", "em-1000", "ode")
NAMES = {
    "heun": "Heun",
    "dpmpp2m": "DPM-Solver++(2M)",
    "ddim": "DDIM",
    "em": "Euler–Maruyama (ancestral)",
    "pc": "predictor–corrector",
    "ode": "adaptive PF-ODE (Dopri5)",
}
SHORT = {"heun": "Heun", "dpmpp2m": "DPM++(2M)", "ddim": "DDIM", "em": "EM", "pc": "PC"}
# Denoiser calls per image for N levels (guidance doubles each call's batch, not their
# count): genjax's Heun evaluates its correction on the last step too, then discards it.
NFE = {"heun": lambda n: 2 * n, "pc": lambda n: 2 * n}
# (key, column, format, worst): the quality table's columns; worst picks over the runs.
COLUMNS = (
    ("frechet_distance", "FD", ".2f", max),
    ("fd_ratio", "FD / floor", ".2f", max),
    ("kid", "KID", ".4f", max),
    ("precision", "precision", ".3f", min),
    ("recall", "recall", ".3f", min),
    ("density", "density", ".3f", lambda v: max(v, key=lambda d: abs(d - 1))),
    ("coverage", "coverage", ".3f", min),
    ("class_coverage", "class coverage", ".2f", min),
    ("conditional_accuracy", "cond. accuracy", ".3f", min),
    ("test_bits_per_dim", "test bits/dim", ".3f", max),
)
COMPILE_EVENTS = frozenset(
    f"/jax/core/compile/{e}_duration"
    for e in ("jaxpr_trace", "jaxpr_to_mlir_module", "backend_compile")
)


# ----------------------------------------------------------------------------- runs


def train_runs(seeds: int, base: pathlib.Path, preset: str) -> list[pathlib.Path]:
    """``experiments/diffusion_digits.py --workdir base/seed-S --seed S``, one process each."""
    workdirs = []
    for seed in range(seeds):
        workdir = base / f"seed-{seed}"
        cmd = [sys.executable, str(SCRIPT), "--workdir", str(workdir), "--seed", str(seed)]
        if preset != "default":
            cmd += ["--preset", preset]
        print(f"training {workdir} ...", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        workdirs.append(workdir)
    return workdirs


@contextlib.contextmanager
def compile_clock():
    """Yields a one-item list that becomes, when the block ends, the seconds JAX spent
    tracing, lowering and compiling inside it: the union of those events' intervals, as
    tracing a jit that calls another jit reports the inner trace within the outer one."""
    spans, total = [], [0.0]

    def listen(event: str, duration: float, **_) -> None:
        if event in COMPILE_EVENTS:
            end = time.perf_counter()
            spans.append((end - duration, end))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield total
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
        total[0] = covered_seconds(spans)


def covered_seconds(spans: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals."""
    total, reach = 0.0, -float("inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def timed_draw(cfg, params, *, num: int, sampler: str, steps: int) -> tuple[np.ndarray, float]:
    """(samples, seconds of the call less its compilation) at the run's seed and guidance."""
    with compile_clock() as compile_s:
        t0 = time.perf_counter()
        samples = diffuse.draw(cfg, params, num=num, seed=cfg.sample.seed, sampler=sampler,
                               steps=steps)  # fmt: skip
        wall = time.perf_counter() - t0
    return samples, wall - compile_s[0]


def logged_bits_per_dim(workdir: pathlib.Path, step: int) -> float | None:
    """The test bits/dim the run's own evaluation logged at ``step``, if it did: the
    solve ``diffuse.test_bits_per_dim`` would repeat (EMA weights, seed 0)."""
    logged = [r["test_bits_per_dim"] for r in read_metrics(workdir)
              if r.get("step") == step and "test_bits_per_dim" in r]  # fmt: skip
    return logged[-1] if logged else None


def score_run(loaded: run.Loaded, workdir: pathlib.Path, images, *, num: int, nll: bool) -> dict:
    """The run's own evaluation at ``num`` samples, with images/s of the sampling."""
    cfg, params, s = loaded.cfg, loaded.state.ema_params, loaded.cfg.sample
    samples, seconds = timed_draw(cfg, params, num=num, sampler=s.sampler, steps=s.steps)
    scores = generative.score_images(samples, images, diffuse.sample_labels(cfg.model, num))
    scores["images_per_s"] = num / seconds
    if nll:
        bpd = logged_bits_per_dim(workdir, loaded.step)
        if bpd is None:
            bpd = diffuse.test_bits_per_dim(cfg, params, images)
        scores["test_bits_per_dim"] = bpd
    return scores


# ----------------------------------------------------------------------------- steps vs quality


def parse_sampler(text: str, default_steps: int) -> tuple[str, int]:
    """``"heun-18"`` → ("heun", 18); ``"ode"`` → ("ode", the run's steps: only the
    schedule's ends matter to the adaptive solve)."""
    name, _, steps = text.partition("-")
    if name == "ode" and not steps:
        return name, default_steps
    if name not in NAMES or not steps.isdigit() or int(steps) < 1:
        raise SystemExit(f"--samplers: {text!r}; expected SAMPLER-STEPS ({sorted(NAMES)}) or ode")
    return name, int(steps)


def steps_vs_quality(cfg, params, images, samplers, *, num: int, floor_fd: float) -> list[dict]:
    rows = []
    classifier = image_metrics.train_classifier(images)
    for name, steps in samplers:
        samples, seconds = timed_draw(cfg, params, num=num, sampler=name, steps=steps)
        fake_NF = classifier.features(generative.quantized(samples, images.levels))
        real_MF = classifier.features(imagelib.to_unit(images.test, images.levels))
        fd = image_metrics.frechet_distance(fake_NF, real_MF)
        nfe = "adaptive" if name == "ode" else NFE.get(name, lambda n: n)(steps)
        row = {"sampler": name, "steps": steps, "nfe": nfe, "fd": fd, "seconds": seconds}
        row.update(fd_ratio=fd / floor_fd, images_per_s=num / seconds)
        label = name if name == "ode" else f"{name}-{steps}"  # the ODE's steps are adaptive
        print(f"{label}: FD {fd:.2f}, {row['images_per_s']:.1f} images/s", flush=True)
        rows.append(row)
    return rows


def plot_steps(path: pathlib.Path, rows: list[dict], floor_fd: float, title: str) -> None:
    """FD against images/s (log x), each point labelled; the floor as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["images_per_s"], r["fd"], color="tab:blue")
        label = "ODE" if r["sampler"] == "ode" else f"{SHORT[r['sampler']]} {r['steps']}"
        ax.annotate(label, (r["images_per_s"], r["fd"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)  # fmt: skip
    ax.axhline(floor_fd, color="gray", linestyle="--", linewidth=0.8, label="real-vs-real floor")
    # FD spans orders of magnitude between few-step samplers and the floor: log y too.
    ax.set(xscale="log", yscale="log", xlabel="images/s (compilation excluded)",
           ylabel="Fréchet distance")  # fmt: skip
    for axis in (ax.xaxis, ax.yaxis):  # "30", not "3×10¹": short enough not to overlap
        axis.set_major_formatter(matplotlib.ticker.LogFormatter())
        axis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- tables


def quality_table(names: list[str], runs: list[dict], floor: dict) -> list[str]:
    keys = [c for c in COLUMNS if c[0] in runs[0] or c[0] == "fd_ratio"]
    lines = [
        "| run | " + " | ".join(c[1] for c in keys) + " | images/s |",
        "|---|" + "---|" * (len(keys) + 1),
    ]
    cell = lambda v, fmt: format(v, fmt)
    for name, r in zip(names, runs, strict=True):
        values = " | ".join(cell(r[k], fmt) for k, _, fmt, _ in keys)
        lines.append(f"| {name} | {values} | {r['images_per_s']:.1f} |")
    if len(runs) > 1:
        mean = " | ".join(cell(statistics.fmean(r[k] for r in runs), f) for k, _, f, _ in keys)
        worst = " | ".join(cell(w([r[k] for r in runs]), f) for k, _, f, w in keys)
        lines += [f"| mean | {mean} | |", f"| worst | {worst} | |"]
    floor = {**floor, "fd_ratio": 1.0}
    floor_cells = " | ".join(cell(floor[k], f) if k in floor else "–" for k, _, f, _ in keys)
    lines.append(f"| real-vs-real floor | {floor_cells} | |")
    return lines


def likelihood_table(names, runs, rows) -> list[str]:
    lines = ["", "| model | test bits/dim | fitted |", "|---|---|---|"]
    for name, r in zip(names, runs, strict=True):
        lines.append(f"| genjax, {name} | {r['test_bits_per_dim']:.3f} | probability-flow ODE |")
    if len(runs) > 1:
        values = [r["test_bits_per_dim"] for r in runs]
        lines.append(f"| genjax, mean / worst | {statistics.fmean(values):.3f} / "
                     f"{max(values):.3f} | |")  # fmt: skip
    lines += [f"| {model} | {value:.3f} | {how} |" for model, value, how in rows]
    return lines


def steps_table(name: str, rows: list[dict], sample: diffuse.SampleConfig) -> list[str]:
    lines = [
        "",
        f"Steps vs quality ({name}, guidance {sample.guidance:g}, Heun's churn "
        f"{sample.churn:g}, DDIM's η {sample.eta:g}):",
        "",
        "| sampler | steps | denoiser calls | FD | FD / floor | images/s | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        steps = "adaptive" if r["sampler"] == "ode" else r["steps"]
        lines.append(
            f"| {NAMES[r['sampler']]} | {steps} | {r['nfe']} | {r['fd']:.2f} "
            f"| {r['fd_ratio']:.2f} | {r['images_per_s']:.1f} | {r['seconds']:.1f} |"
        )
    return lines


# ----------------------------------------------------------------------------- main


def with_sampling(loaded: run.Loaded, assignments: list[str]) -> run.Loaded:
    """The run with its sample config overridden (``sample.FIELD=VALUE`` only: the
    weights were trained under the rest)."""
    for a in assignments:
        if not a.startswith("sample."):
            raise SystemExit(f"--set {a!r}: only sample.* settings apply to trained runs")
    return dataclasses.replace(loaded, cfg=configlib.override(loaded.cfg, assignments))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    runs = p.add_mutually_exclusive_group(required=True)
    runs.add_argument("--workdirs", nargs="+", type=pathlib.Path, help="trained digits runs")
    runs.add_argument("--train-seeds", type=int, help="train this many runs, seeds 0..N-1")
    p.add_argument("--train-dir", type=pathlib.Path, help="where to train them (default: temp)")
    p.add_argument("--preset", default="default", help="the experiment's preset when training")
    p.add_argument("--num", type=int, help="samples per run and sampler (default: the run's)")
    p.add_argument("--samplers", nargs="*", default=list(SAMPLERS),
                   help="SAMPLER-STEPS or ode, for steps vs quality; none to skip")  # fmt: skip
    p.add_argument("--steps-plot", type=pathlib.Path, default=STEPS_PLOT, help="the plot's path")
    p.add_argument("--no-nll", action="store_true", help="skip test bits/dim (ODE and baselines)")
    p.add_argument("--gmm-ks", nargs="+", type=int, default=[1, 2, 3, 5, 10, 20],
                   help="GaussianMixture components searched by cross-validation")  # fmt: skip
    configlib.add_set_flag(p, "sample otherwise, e.g. sample.guidance=1 sample.churn=0",
                           metavar="sample.FIELD=VALUE")  # fmt: skip
    p.add_argument("--results", type=pathlib.Path, help="append the section to this RESULTS.md")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    workdirs = args.workdirs
    if args.train_seeds is not None:
        if args.train_seeds < 1:
            raise SystemExit("--train-seeds must be >= 1")
        base = args.train_dir or pathlib.Path(tempfile.mkdtemp(prefix="diffusion_digits_"))
        workdirs = train_runs(args.train_seeds, base, args.preset)
    loaded = [with_sampling(run.load(w, diffuse.IMAGES), args.set) for w in workdirs]
    cfg0 = loaded[0].cfg
    if any(r.cfg.data != cfg0.data for r in loaded):
        raise SystemExit("--workdirs: the runs were trained on different data")
    images = cfg0.data.load_images()
    if images.train_labels is None:
        raise SystemExit(f"{images.name} has no labels: the classifier metrics need them")
    num = args.num or cfg0.sample.num
    samplers = [parse_sampler(s, cfg0.sample.steps) for s in args.samplers if s != "none"]

    classifier = image_metrics.train_classifier(images)
    floor = image_metrics.real_floor(images, classifier, num, seed=cfg0.sample.seed)
    names = [
        f"{pathlib.Path(w).name} (step {r.step})" for w, r in zip(workdirs, loaded, strict=True)
    ]
    runs = []
    for name, r, workdir in zip(names, loaded, workdirs, strict=True):
        scores = score_run(r, workdir, images, num=num, nll=not args.no_nll)
        scores["fd_ratio"] = scores["frechet_distance"] / floor["frechet_distance"]
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()), flush=True)
        runs.append(scores)
    lines = quality_table(names, runs, floor)
    if not args.no_nll:
        lines += likelihood_table(names, runs, density_baselines.baselines(images, args.gmm_ks))
    if samplers:
        first = loaded[0]
        rows = steps_vs_quality(first.cfg, first.state.ema_params, images, samplers, num=num,
                                floor_fd=floor["frechet_distance"])  # fmt: skip
        lines += steps_table(names[0], rows, first.cfg.sample)
        title = f"{images.name}, {names[0]}: {num} samples, guidance {first.cfg.sample.guidance:g}"
        plot_steps(args.steps_plot, rows, floor["frechet_distance"], title)

    s = cfg0.sample
    header = [
        "runs: " + ", ".join(str(w) for w in workdirs),
        f"{num} samples per run ({s.sampler}, {s.steps} levels, guidance {s.guidance:g}, "
        f"churn {s.churn:g}, "
        f"EMA weights, seed {s.seed}) against the {len(images.test)} test digits, in the "
        f"features of a classifier of test accuracy {classifier.test_accuracy:.3f}; the floor "
        f"is the mean of 5 draws of {num} real train digits (FD "
        f"{floor['frechet_distance_min']:.2f}–{floor['frechet_distance_max']:.2f})",
        "images/s excludes compilation; 'worst' is per column (density: farthest from 1)",
    ]
    if not args.no_nll:
        header.append(
            "bits/dim of the dequantized test split; scikit-learn models fitted on the "
            "dequantized train split (fixed keys)"
        )
    versions = {"jax": jax.__version__, "scikit-learn": sklearn.__version__}
    benchmarking.report(
        "Digits diffusion: quality over seeds, likelihood, steps vs quality",
        __file__,
        argv,
        versions,
        header,
        lines,
        args.results,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
