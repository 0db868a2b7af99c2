"""What the families that generate data share: the data, the scores, the files a run leaves.

Diffusion, the VAE and the GAN learn the same data and are judged the same way:

    2-D mixtures (genjax.data.toy2d)   points drawn once from the exact mixture; samples
                                       scored by the PacGAN protocol (modes, % high quality,
                                       reverse KL) next to a perfect sampler's
    images (genjax.data.images)        scikit-learn's digits or a user's array; samples
                                       scored in a classifier's features (labelled images)
                                       next to real train images scored the same way, and
                                       the test split's bits/dim when the model has one

A family hands ``data`` its own sampler (state → samples in [−1, 1] for images, the
data's units for points) and, optionally, its test bits/dim; ``data`` makes the run's
batches, its evaluation and, at the end, the workdir's ``eval.json``, ``samples.npy``
(images on the data's own 0..L−1 scale) and ``samples.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from genjax import mesh as meshlib
from genjax import run, train
from genjax.data import images as imagelib
from genjax.data import rows, toy2d
from genjax.metrics import images as image_metrics
from genjax.metrics.modes import mode_metrics


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # ring | grid: 2-D points (genjax.data.toy2d); digits | PATH.npy: images
    # (genjax.data.images; an array [N, H, W, C] of integer levels).
    dataset: str = "ring"
    labels: str = ""  # PATH.npy images: a .npy of their integer labels, for a conditional model
    levels: int = 0  # PATH.npy images: gray levels (0: 256 for uint8, else the largest + 1)
    # Images: train on uniformly dequantized values (each level spread over its bin), the
    # density a continuous model's test bits/dim scores; samples are rounded back.
    dequantize: bool = True
    size: int = 200_000  # 2-D: training points, drawn once from the exact mixture
    global_batch_size: int = 512  # examples per update, summed over processes
    seed: int = 0  # draw and shuffle

    def __post_init__(self):
        if self.dataset not in toy2d.DATASETS and not self.is_images:
            raise ValueError(
                f"data config: unknown dataset {self.dataset!r}; choose one of "
                f"{sorted(toy2d.DATASETS)}, 'digits' or the path of an image array (.npy)"
            )
        if self.size < 1 or self.global_batch_size < 1:
            raise ValueError("data config: size and global_batch_size must be positive")

    @property
    def is_images(self) -> bool:
        return self.dataset == "digits" or self.dataset.endswith(".npy")

    def load_images(self) -> imagelib.Images:
        return imagelib.load(self.dataset, labels=self.labels or None, levels=self.levels or None)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a family's evaluation samples, in the words the scores need."""

    draw: Callable[[Any], np.ndarray]  # state -> [num, *shape] samples ([−1, 1] for images)
    num: int  # samples drawn and scored
    seed: int = 0  # the perfect sampler's and the real-vs-real floor's draw
    labels: np.ndarray | None = None  # [num] classes conditional samples are drawn for
    # Images: state -> the test split's bits/dim, for a model with a likelihood.
    bits_per_dim: Callable[[Any, imagelib.Images], float] | None = None
    describe: str = ""  # how they are drawn, for the printed line ("heun, 128 levels")
    # Images: (state, images) -> None, more pictures in the workdir at the end (process 0).
    pictures: Callable[[Any, imagelib.Images], None] | None = None


def data(cfg: DataConfig, workdir: pathlib.Path, sampling: Sampling) -> run.Data:
    """The run layer's data of a generating family: this process's batches
    (``{"x": [b, *shape]}``, with ``"label"`` for labelled images), the evaluation and
    the files written when the run ends."""
    if cfg.is_images:
        return _image_data(cfg, workdir, sampling)
    return _point_data(cfg, workdir, sampling)


def point_batches(cfg: DataConfig):
    """This process's share of shuffled, endlessly repeated batches of mixture points."""
    points = toy2d.get(cfg.dataset).sample(cfg.size, seed=cfg.seed)
    return rows.row_batches({"x": points}, cfg.global_batch_size, seed=cfg.seed)


def _point_data(cfg: DataConfig, workdir: pathlib.Path, sampling: Sampling) -> run.Data:
    mixture = toy2d.get(cfg.dataset)
    last: dict[str, np.ndarray] = {}

    def evaluate(state) -> dict[str, float]:
        last["samples"] = sampling.draw(state)
        return mode_metrics(last["samples"], mixture)

    def finish(state, metrics: dict[str, float]) -> None:
        del state
        if jax.process_index() == 0:
            floor = mode_metrics(mixture.sample(sampling.num, seed=sampling.seed + 1), mixture)
            write_report(workdir, {"samples": metrics, "perfect_sampler": floor})
            np.save(workdir / "samples.npy", last["samples"])
            plot_points(workdir / "samples.png", mixture, last["samples"], metrics)
        _print_scores(cfg.dataset, sampling, metrics)

    return run.Data(
        batches=point_batches(cfg),
        evaluate=evaluate,
        finish=finish,
        describe=f"{cfg.size:,} points of the {cfg.dataset}",
        throughput=("points", cfg.global_batch_size),
    )


def score_images(
    samples_unit: np.ndarray, images: imagelib.Images, labels: np.ndarray | None = None
) -> dict[str, float]:
    """The classifier's scores of samples [N, H, W, C] in [−1, 1] (labelled data only),
    rounded to the data's levels first: the images ``samples.npy`` holds. ``labels``: the
    classes conditional samples were drawn for."""
    if images.train_labels is None:
        return {}
    classifier = image_metrics.train_classifier(images)
    return image_metrics.image_metrics(
        quantized(samples_unit, images.levels), images, classifier, labels=labels
    )


def quantized(x_unit: np.ndarray, levels: int) -> np.ndarray:
    """Samples in [−1, 1] rounded to the nearest of the data's levels (still in [−1, 1]).
    Samples that are not finite are refused: rounded, NaN would score as level 0."""
    x_unit = np.asarray(x_unit)
    if not np.isfinite(x_unit).all():
        bad = int((~np.isfinite(x_unit)).reshape(len(x_unit), -1).any(axis=1).sum())
        raise ValueError(
            f"{bad} of {len(x_unit)} samples hold NaN or inf: the sampler or the weights "
            "diverged, and such samples cannot be scored"
        )
    return imagelib.to_unit(imagelib.to_levels(x_unit, levels), levels)


def _image_data(cfg: DataConfig, workdir: pathlib.Path, sampling: Sampling) -> run.Data:
    images = cfg.load_images()
    iterator = imagelib.batches(
        images, cfg.global_batch_size, seed=cfg.seed, dequantize=cfg.dequantize
    )
    return image_run_data(
        images, workdir, sampling, iterator,
        describe=f"{len(images.train):,} {images.name} images {images.shape}",
        throughput=("images", cfg.global_batch_size),
    )  # fmt: skip


def image_run_data(
    images: imagelib.Images,
    workdir: pathlib.Path,
    sampling: Sampling,
    batches,
    *,
    describe: str,
    throughput: tuple[str, int],
) -> run.Data:
    """The run layer's data of a family that generates ``images``, trained on
    ``batches`` (the images themselves, or what a model made of them: a VAE's
    latents): its evaluation and the files written when the run ends."""
    last: dict[str, np.ndarray] = {}

    def evaluate(state) -> dict[str, float]:
        last["samples"] = sampling.draw(state)
        metrics = score_images(last["samples"], images, sampling.labels)
        if sampling.bits_per_dim is not None:
            metrics["test_bits_per_dim"] = sampling.bits_per_dim(state, images)
        return metrics

    def finish(state, metrics: dict[str, float]) -> None:
        if jax.process_index() == 0:
            report = {"samples": metrics, "num": sampling.num}
            if images.train_labels is not None:
                classifier = image_metrics.train_classifier(images)
                report["real_vs_real"] = image_metrics.real_floor(
                    images, classifier, sampling.num, seed=sampling.seed
                )
                report["classifier_test_accuracy"] = classifier.test_accuracy
            write_report(workdir, report)
            levels = imagelib.to_levels(last["samples"], images.levels)
            np.save(workdir / "samples.npy", levels[..., 0] if levels.shape[-1] == 1 else levels)
            plot_images(workdir / "samples.png", levels, images, metrics, sampling.labels)
            if sampling.pictures is not None:
                sampling.pictures(state, images)
        _print_scores(images.name, sampling, metrics)

    return run.Data(
        batches=batches, evaluate=evaluate, finish=finish, describe=describe,
        throughput=throughput,
    )  # fmt: skip


def check_batch(global_batch_size: int, grad_accum: int, mesh) -> None:
    """The batch divides over the mesh's data axes, the processes and the micro-batches."""
    meshlib.check_batch_size(global_batch_size, mesh)
    meshlib.check_process_batch_layout(global_batch_size, mesh)
    train.check_micro_batches(grad_accum, global_batch_size, mesh)


def check_sample_count(images: imagelib.Images, num: int) -> None:
    """Labelled images are scored against as many real training images: 4..N of them."""
    if images.train_labels is not None and not 4 <= num <= len(images.train):
        raise ValueError(
            f"sample.num={num}: the scores need 4..{len(images.train)} samples (the "
            "real-vs-real floor scores as many training images)"
        )


def add_dataset_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", help="ring | grid (2-D), digits | PATH.npy (images)")


def dataset_override(args: argparse.Namespace) -> list[str]:
    return [f"data.dataset={args.dataset}"] if args.dataset else []


def _print_scores(name: str, sampling: Sampling, metrics: dict[str, float]) -> None:
    scores = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    how = f", {sampling.describe}" if sampling.describe else ""
    print(f"{name}: {scores} ({sampling.num} samples{how})")


def write_report(workdir: pathlib.Path, report: dict) -> None:
    """``eval.json``: JSON has no infinity, so a reverse KL with no mode captured is
    written as the string "Infinity"."""
    text = json.dumps(report, indent=2).replace("Infinity", '"Infinity"')
    (pathlib.Path(workdir) / "eval.json").write_text(text + "\n")


# ----------------------------------------------------------------------------- pictures


def pyplot():
    """matplotlib's pyplot drawing to files only (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_points(path, mixture: toy2d.Mixture, samples, metrics) -> None:
    """The samples over contours of the true density at 1, 2 and 3 std from each mode."""
    plt = pyplot()
    extent = np.abs(mixture.means).max() + 0.5
    axis = np.linspace(-extent, extent, 801)
    grid = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
    log_density = mixture.log_prob(grid).reshape(len(axis), len(axis))
    levels = log_density.max() - np.array([4.5, 2.0, 0.5])
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.contour(axis, axis, log_density, levels=levels, colors="tab:blue", linewidths=0.6,
               linestyles="solid")  # fmt: skip
    ax.scatter(samples[:, 0], samples[:, 1], s=1, c="black", alpha=0.5)
    ax.set(xlim=(-extent, extent), ylim=(-extent, extent), aspect="equal")
    ax.set_title(
        f"{mixture.name}: {metrics['modes']}/{len(mixture.means)} modes, "
        f"{100 * metrics['high_quality']:.1f}% high quality, reverse KL {metrics['reverse_kl']:.4f}"
    )
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_images(
    path, levels: np.ndarray, images: imagelib.Images, metrics, labels: np.ndarray | None = None
) -> None:
    """Saves :func:`image_grid` to ``path``."""
    fig = image_grid(levels, images, metrics, labels)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)


def image_grid(
    levels: np.ndarray, images: imagelib.Images, metrics, labels: np.ndarray | None = None
):
    """A figure of samples on the data's scale: with ``labels`` (the classes the samples
    were drawn for), one row per class named at its left, else rows of 16."""
    plt = pyplot()
    pixels = levels[..., 0] if levels.shape[-1] == 1 else levels
    if labels is not None:  # each class's first ten samples
        rows = [np.flatnonzero(labels == k)[:10] for k in range(images.num_classes)]
    else:
        rows = [np.arange(len(levels))[r : r + 16] for r in range(0, min(len(levels), 128), 16)]
    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(0.6 * cols, 0.6 * len(rows)), squeeze=False)
    for r, picks in enumerate(rows):
        for ax in axes[r]:
            ax.axis("off")
        for ax, i in zip(axes[r], picks, strict=False):
            ax.imshow(pixels[i], cmap="gray_r", vmin=0, vmax=images.levels - 1)
        if labels is not None:  # in the margin: a title would sit on the row above's digits
            axes[r][0].text(-0.15, 0.5, images.class_names[r], transform=axes[r][0].transAxes,
                            ha="right", va="center", fontsize=7)  # fmt: skip
    shown = ", ".join(f"{k} {v:.3g}" for k, v in metrics.items() if k in _SHOWN)
    fig.suptitle(f"{images.name}: {shown}", fontsize=7)
    return fig


_SHOWN = ("frechet_distance", "class_coverage", "conditional_accuracy", "test_bits_per_dim")
