"""2-D quality over seeds of a generating family: the PacGAN protocol, mean and worst,
beside a perfect sampler.

    python experiments/benchmarks/quality_2d.py --family diffusion \
        --results experiments/benchmarks/RESULTS.md
    python experiments/benchmarks/quality_2d.py --family gan --label plain \
        --set model.pack=1 model.fourier_features=0 model.r1_gamma=0

For each mixture (ring, grid) and seed, runs ``experiments/<family>_2d.py`` exactly as
the README does (no flags but ``--dataset``, ``--seed`` and the ``--set`` given here) in
its own process and workdir, times it, and reads its ``eval.json``: modes captured,
% high quality and reverse KL of 2,500 samples, and the same scores of 2,500 exact
draws from the mixture (the perfect sampler, the floor). Prints one row per mixture
(mean and worst over the seeds) and each seed's row. ``--preset tiny --seeds 2`` checks
the script in seconds.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax

from genjax import benchmarking
from genjax import config as configlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
FAMILIES = ("diffusion", "gan", "vae")
# Worst of a score: fewest modes, lowest % high quality, highest reverse KL.
WORST = {"modes": min, "high_quality": min, "reverse_kl": max}


def command(family: str, dataset: str, seed: int, workdir, preset: str, sets) -> list[str]:
    script = ROOT / "experiments" / f"{family}_2d.py"
    cmd = [sys.executable, str(script), "--workdir", str(workdir), "--dataset", dataset,
           "--seed", str(seed)]  # fmt: skip
    if preset != "default":
        cmd += ["--preset", preset]
    return cmd + (["--set", *sets] if sets else [])


def train_and_score(cmd: list[str], workdir: pathlib.Path) -> dict:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    report = json.loads((workdir / "eval.json").read_text())
    return {**report, "minutes": (time.perf_counter() - t0) / 60}


def _scores(s: dict) -> str:
    # eval.json writes a reverse KL with no mode captured as the string "Infinity".
    return f"{s['modes']:.1f} | {100 * s['high_quality']:.2f}% | {float(s['reverse_kl']):.4f}"


def summarize(runs: list[dict], key: str) -> tuple[dict, dict]:
    """(mean, worst) of each score over the seeds' ``runs[i][key]``."""
    mean = {name: statistics.fmean(float(r[key][name]) for r in runs) for name in WORST}
    worst = {name: pick(float(r[key][name]) for r in runs) for name, pick in WORST.items()}
    return mean, worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=FAMILIES, default="diffusion")
    configlib.add_set_flag(p, "passed to every run, e.g. model.pack=1")
    p.add_argument("--label", default="", help="names this configuration in the rows")
    p.add_argument("--datasets", nargs="+", default=["ring", "grid"])
    p.add_argument("--seeds", type=int, default=5, help="runs per mixture, seeds 0..N-1")
    p.add_argument("--preset", default="default", help="the experiment's preset")
    p.add_argument("--workdir", type=pathlib.Path, help="keep the runs here (default: a temp dir)")
    p.add_argument("--results", type=pathlib.Path, help="append the section to this RESULTS.md")
    args = p.parse_args(argv)
    base = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix=f"{args.family}_2d_quality_"))
    name = f"{args.family} {args.label}".strip()
    lines = [
        "| model | mixture | seeds | modes (mean / worst) | % high quality (mean / worst) "
        "| reverse KL (mean / worst) | perfect sampler: modes | % HQ | reverse KL "
        "| minutes per run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    per_seed = ["", "| model | mixture | seed | modes | % HQ | reverse KL | perfect sampler: "
                "modes | % HQ | reverse KL |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for dataset in args.datasets:
        runs = []
        for seed in range(args.seeds):
            workdir = base / f"{dataset}-{seed}"
            cmd = command(args.family, dataset, seed, workdir, args.preset, args.set)
            r = train_and_score(cmd, workdir)
            runs.append(r)
            floor = _scores(r["perfect_sampler"])
            row = f"| {name} | {dataset} | {seed} | {_scores(r['samples'])} | {floor} |"
            per_seed.append(row)
            print(row, flush=True)
        mean, worst = summarize(runs, "samples")
        floor, _ = summarize(runs, "perfect_sampler")
        minutes = statistics.median(r["minutes"] for r in runs)
        lines.append(
            f"| {name} | {dataset} | {args.seeds} | {mean['modes']:.1f} / {worst['modes']:.0f} "
            f"| {100 * mean['high_quality']:.2f} / {100 * worst['high_quality']:.2f} "
            f"| {mean['reverse_kl']:.4f} / {worst['reverse_kl']:.4f} "
            f"| {_scores(floor)} | {minutes:.1f} |"
        )
    sets = f" --set {' '.join(args.set)}" if args.set else ""
    header = [
        f"each run: `python experiments/{args.family}_2d.py --workdir DIR --dataset D --seed "
        f"S{sets}`, 2,500 samples scored by the PacGAN protocol; the perfect sampler is "
        "2,500 exact draws from the mixture",
        f"workdirs: {base}",
    ]
    benchmarking.report(
        f"{name} on 2-D mixtures: quality over seeds",
        __file__,
        argv,
        {"jax": jax.__version__},
        header,
        lines + per_seed,
        args.results,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
