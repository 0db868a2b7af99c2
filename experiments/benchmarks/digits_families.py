"""Digits, every family side by side: sample quality next to the real-vs-real floor, the
VAE's likelihood next to scikit-learn's, and training speed.

    python experiments/diffusion_digits.py --workdir runs/diffusion-digits
    python experiments/vae_digits.py --workdir runs/vae-digits
    python experiments/gan_digits.py --workdir runs/gan-digits
    python experiments/latent_diffusion_digits.py --workdir runs/latent-digits \\
        --vae-workdir runs/vae-digits
    python experiments/benchmarks/digits_families.py --runs diffusion=runs/diffusion-digits \\
        vae=runs/vae-digits gan=runs/gan-digits "latent diffusion=runs/latent-digits" \\
        --results experiments/benchmarks/RESULTS.md

Reads what each finished run wrote: ``eval.json`` (its samples scored in the features
of ``genjax.metrics.images``' classifier against the test split, and the real-vs-real
floor at the same count) and ``metrics.jsonl`` (training images/s: the median of the
logged windows; training minutes: first to last training record, so neither the first
window's compilation nor the evaluation). Fits scikit-learn's density
models (``genjax.metrics.density_baselines``) in the same run for the test bits/dim
of the runs that have one. ``--no-baselines`` skips the fits (seconds, for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import jax
import sklearn

from genjax import benchmarking
from genjax.data import images as imagelib
from genjax.metrics import density_baselines

# (key, column, format): the quality table's columns.
COLUMNS = (
    ("frechet_distance", "FD", ".2f"),
    ("fd_ratio", "FD / floor", ".2f"),
    ("kid", "KID", ".3f"),
    ("precision", "precision", ".3f"),
    ("recall", "recall", ".3f"),
    ("class_coverage", "class coverage", ".2f"),
    ("conditional_accuracy", "cond. accuracy", ".3f"),
    ("test_bits_per_dim", "test bits/dim", ".3f"),
)


def read_run(workdir: pathlib.Path) -> dict:
    """A finished run's scores, floor and training speed."""
    report_path = workdir / "eval.json"
    if not report_path.exists():
        raise FileNotFoundError(f"{report_path}: no eval.json; let the run finish first")
    report = json.loads(report_path.read_text())
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_s"] for r in records if "images_per_s" in r]
    times = [r["time"] for r in records if "steps_per_s" in r]  # training records
    if "real_vs_real" not in report:
        raise ValueError(f"{report_path}: no real-vs-real floor; the scores need labelled images")
    samples = report["samples"]
    floor = report["real_vs_real"]
    return {
        **samples,
        "fd_ratio": samples["frechet_distance"] / floor["frechet_distance"],
        "floor": floor,
        "num": report["num"],
        "images_per_s": statistics.median(speeds) if speeds else float("nan"),
        "train_minutes": (max(times) - min(times)) / 60 if len(times) > 1 else float("nan"),
    }


def quality_table(runs: dict[str, dict]) -> list[str]:
    lines = [
        "| model | " + " | ".join(c[1] for c in COLUMNS) + " | training images/s "
        "| training minutes |",
        "|---|" + "---|" * (len(COLUMNS) + 2),
    ]
    cell = lambda r, k, fmt: format(r[k], fmt) if k in r else "–"
    for name, r in runs.items():
        values = " | ".join(cell(r, k, fmt) for k, _, fmt in COLUMNS)
        lines.append(f"| {name} | {values} | {r['images_per_s']:.0f} | {r['train_minutes']:.1f} |")
    floor = {**next(iter(runs.values()))["floor"], "fd_ratio": 1.0}
    values = " | ".join(cell(floor, k, fmt) for k, _, fmt in COLUMNS)
    lines.append(f"| real-vs-real floor | {values} | | |")
    return lines


def likelihood_table(runs: dict[str, dict], rows) -> list[str]:
    lines = ["", "| model | test bits/dim | how |", "|---|---|---|"]
    for name, r in runs.items():
        if "test_bits_per_dim" in r:
            lines.append(f"| genjax {name} | {r['test_bits_per_dim']:.3f} | the run's own bound |")
    lines += [f"| {model} | {value:.3f} | {how} |" for model, value, how in rows]
    return lines


def parse_runs(items: list[str]) -> dict[str, pathlib.Path]:
    runs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--runs {item!r}: expected NAME=WORKDIR")
        runs[name] = pathlib.Path(path)
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, metavar="NAME=WORKDIR")
    p.add_argument("--gmm-ks", nargs="+", type=int, default=[1, 2, 3, 5, 10, 20],
                   help="GaussianMixture components searched by cross-validation")  # fmt: skip
    p.add_argument("--no-baselines", action="store_true", help="skip scikit-learn's fits")
    p.add_argument("--results", type=pathlib.Path, help="append the section to this RESULTS.md")
    args = p.parse_args(argv)
    try:
        runs = {name: read_run(path) for name, path in parse_runs(args.runs).items()}
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = quality_table(runs)
    if any("test_bits_per_dim" in r for r in runs.values()):
        rows = [] if args.no_baselines else density_baselines.baselines(
            imagelib.load("digits"), args.gmm_ks
        )  # fmt: skip
        lines += likelihood_table(runs, rows)
    counts = sorted({r["num"] for r in runs.values()})
    floor = next(iter(runs.values()))["floor"]
    spread = ""
    if "frechet_distance_min" in floor:  # runs scored before 2026-12-06 hold one draw
        spread = (f", the mean of its draws (FD {floor['frechet_distance_min']:.2f}–"
                  f"{floor['frechet_distance_max']:.2f})")  # fmt: skip
    header = [
        f"runs: {', '.join(f'{n} = {w}' for n, w in parse_runs(args.runs).items())}",
        f"samples per run: {counts}; the floor scores as many real train digits{spread}",
    ]
    benchmarking.report(
        "Digits: every family side by side",
        __file__,
        argv,
        {"jax": jax.__version__, "scikit-learn": sklearn.__version__},
        header,
        lines,
        args.results,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
