"""The GAN family on the shared run layer: 2-D mixtures and images.

data (``genjax.generative``: exact mixture points, or images) → grain iterator (per
process) → the run layer → one step of ``d_steps`` discriminator updates and one
generator update (``genjax.models.gan``: its losses, R1, spectral norm, PacGAN
packing, the generator's EMA) → evaluation (``genjax.generative``, every generating
family's): samples of the EMA generator scored by the PacGAN protocol (2-D) or in a
classifier's features next to the real-vs-real floor (images; a class-conditional
generator draws 0, 1, …, 9, 0, …). At the end the workdir gets ``samples.npy``,
``samples.png`` and ``eval.json``.

``FAMILY`` (2-D mixtures, ``experiments/gan_2d.py``) and ``IMAGES`` (digits,
``experiments/gan_digits.py``) share everything and differ in their presets.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import numpy as np

from genjax import evaluate as evallib
from genjax import generative, run
from genjax.models import gan


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """How evaluation samples."""

    num: int = 2500  # samples scored (PacGAN's count for 2-D)
    seed: int = 0

    def __post_init__(self):
        if self.num < 1:
            raise ValueError(f"sample config: num={self.num} must be >= 1")


@dataclasses.dataclass(frozen=True)
class Config:
    model: gan.GANConfig = dataclasses.field(default_factory=lambda: gan.PRESETS["ring"])
    data: generative.DataConfig = dataclasses.field(default_factory=generative.DataConfig)
    run: run.RunConfig = dataclasses.field(
        default_factory=lambda: run.RunConfig(steps=10_000, checkpoint_every=2000, log_every=100)
    )
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)


State = gan.State


def init(cfg: Config, key: jax.Array) -> State:
    return gan.init(cfg.model, key)


def make_step(cfg: Config):
    return gan.make_step(cfg.model)


@functools.partial(jax.jit, static_argnames=("cfg", "num"))
def _generate(cfg: gan.GANConfig, g_params, key, *, num: int) -> jax.Array:
    return gan.sample(cfg, g_params, num, key=key)


def draw(cfg: Config, g_params, *, num: int, seed: int = 0) -> np.ndarray:
    """``num`` samples [num, *shape] of the generator ``g_params`` (images in [−1, 1]);
    a class-conditional generator draws classes 0, 1, …, K−1, 0, …"""
    g_params = evallib.gather_to_host(g_params)
    return np.asarray(_generate(cfg.model, g_params, jax.random.key(seed), num=num))


def sample_labels(cfg: gan.GANConfig, num: int) -> np.ndarray | None:
    """The classes ``draw`` draws ``num`` samples for (None: unconditional)."""
    return np.arange(num, dtype=np.int32) % cfg.num_classes if cfg.num_classes else None


def data(cfg: Config, workdir: pathlib.Path) -> run.Data:
    s = cfg.sample
    sampling = generative.Sampling(
        draw=lambda state: draw(cfg, state.g_ema, num=s.num, seed=s.seed),
        num=s.num,
        seed=s.seed,
        labels=sample_labels(cfg.model, s.num),
        describe="EMA generator",
    )
    return generative.data(cfg.data, workdir, sampling)


def check(cfg: Config, mesh) -> None:
    generative.check_batch(cfg.data.global_batch_size, 1, mesh)
    local = cfg.data.global_batch_size // jax.process_count()
    gan.check_batch_size(cfg.model, local)


# The grid's 25 small modes (std 0.05, 2 apart) need a discriminator that tells them
# apart from the start, and R1 to keep it smooth: without these, seed 0 found 14/25
# modes and 1.3% high quality (experiments/benchmarks/RESULTS.md). Twice PacGAN's
# learning rates then find and sharpen the modes sooner (seeds 0–4 after 30,000 updates:
# high quality 94.6% on average and 92.0% the worst, against 91.4% and 88.1% at 1e-4);
# both at 4e-4 lost modes for thousands of updates. Uniform latents, bounded, are
# sharper sooner still (87% on average at 10,000 updates against 73%), but 4 of 5 seeds
# then swung a column of modes away and back; rates falling to 0 over the second half
# settle them (96.4% and 94.8% the worst at 30,000). With that decay, 3 times PacGAN's
# rates sharpen the slow seeds sooner and the swings they still make are settled in time
# (96.8% and 96.5% the worst). --set overrides each of them.
GRID_MODEL = {
    "fourier_features": 128,
    "r1_gamma": 1.0,
    "g_lr": 3e-4,
    "d_lr": 3e-4,
    "latent_distribution": "uniform",
    "lr_decay": 0.5,
}
# ... and more updates than the ring's 10,000: high quality was still rising when every
# such run ended. A quarter of the batch takes 3 times the updates in about the same
# time (56 against 18 updates a second on 2 cores; seed 0 takes 9 min 8 s alone).
# Seeds 0–4 at 1e-4, high quality mean and worst: 70.6% and 62.3% after 10,000 updates
# of 512; 91.4% and 88.1% after 30,000 of 128 (reverse KL 0.087 → 0.012).
GRID_BATCH_DIVISOR, GRID_UPDATES_FACTOR = 4, 3


def _more_smaller_updates(cfg: Config, explicit: frozenset[str]) -> Config:
    """The grid's batch a ``GRID_BATCH_DIVISOR``-th of the preset's, its updates
    ``GRID_UPDATES_FACTOR`` times as many, each unless --set gives it."""
    data, run_cfg = cfg.data, cfg.run
    if "data.global_batch_size" not in explicit:
        batch = max(1, data.global_batch_size // GRID_BATCH_DIVISOR)
        data = dataclasses.replace(data, global_batch_size=batch)
    if "run.steps" not in explicit:
        run_cfg = dataclasses.replace(run_cfg, steps=run_cfg.steps * GRID_UPDATES_FACTOR)
    return dataclasses.replace(cfg, data=data, run=run_cfg)


def complete(cfg: Config, explicit: frozenset[str]) -> Config:
    """The networks take the data's shape and, for labelled images, its classes; the
    grid gets ``GRID_MODEL`` and smaller, more updates; decaying rates span the run.
    Each where --set does not say otherwise."""
    if cfg.data.is_images:
        model = _fit_images(cfg, explicit)
    else:
        if cfg.model.arch != "mlp" or cfg.model.num_classes:
            raise ValueError(
                f"data.dataset={cfg.data.dataset!r} is unlabelled 2-D points: use "
                "model.arch=mlp and model.num_classes=0"
            )
        model = {"shape": (2,)}
        if cfg.data.dataset == "grid":
            model |= {k: v for k, v in GRID_MODEL.items() if f"model.{k}" not in explicit}
            cfg = _more_smaller_updates(cfg, explicit)
    # Constant rates leave total_steps 0, so such a run can be resumed for longer.
    if model.get("lr_decay", cfg.model.lr_decay) and "model.total_steps" not in explicit:
        model["total_steps"] = cfg.run.steps
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))


def _fit_images(cfg: Config, explicit: frozenset[str]) -> dict:
    """The model fields an image dataset sets: its shape and classes."""
    if cfg.model.arch != "conv":
        raise ValueError("images need model.arch=conv")
    images = cfg.data.load_images()
    num_classes = cfg.model.num_classes
    if num_classes and images.train_labels is None:
        raise ValueError(
            "model.num_classes > 0 needs labels; give them with data.labels=PATH.npy or "
            "set model.num_classes=0"
        )
    if num_classes and num_classes != images.num_classes:
        if "model.num_classes" in explicit:  # labels past its tables would read NaN
            raise ValueError(
                f"model.num_classes={num_classes}, but the images have "
                f"{images.num_classes} classes; leave it out (the data sets it), or set 0 "
                "for an unconditional model"
            )
        num_classes = images.num_classes
    generative.check_sample_count(images, cfg.sample.num)
    return {"shape": images.shape, "num_classes": num_classes}


PRESETS = {
    "default": Config(),
    # Seconds on a CPU: small networks, few updates, few samples.
    "tiny": Config(
        model=dataclasses.replace(gan.PRESETS["tiny"], pack=2),
        data=generative.DataConfig(size=4096, global_batch_size=64),
        run=run.RunConfig(steps=40, checkpoint_every=20, log_every=10),
        sample=SampleConfig(num=256),
    ),
}
_DIGITS = Config(
    model=gan.PRESETS["digits"],
    data=generative.DataConfig(dataset="digits", dequantize=False, global_batch_size=128),
    # Seed 0, FD of the EMA generator every 500 updates up to 2,500 (the floor: 7.39 in
    # its first draw, 8.98 the mean of five): 15.1, 15.6, 11.4, 10.0, 10.0, recall 0.74
    # to 0.83. With DCGAN's Adam (β1 0.5, β2 0.999), one D step and EMA 0.999 (the preset
    # before): 797, 72.4, 22.3, 24.6, 27.9, recall 0.46 falling to 0.43, the generator
    # losing variety within each class.
    run=run.RunConfig(steps=2000, checkpoint_every=500, log_every=100),
    sample=SampleConfig(num=1000),
)
IMAGE_PRESETS = {
    "default": _DIGITS,
    "tiny": dataclasses.replace(
        _DIGITS,
        model=dataclasses.replace(gan.PRESETS["digits"], channels=(8, 16), groups=4, latent=8),
        data=generative.DataConfig(dataset="digits", dequantize=False, global_batch_size=32),
        run=run.RunConfig(steps=20, checkpoint_every=10, log_every=10),
        sample=SampleConfig(num=40),
    ),
}

_SHARED = dict(
    name="gan",
    init=init,
    param_axes=lambda cfg: gan.param_axes(cfg.model),
    rules=gan.RULES,
    step=make_step,
    data=data,
    check=check,
    complete=complete,
    add_flags=generative.add_dataset_flag,
    flag_overrides=generative.dataset_override,
)
FAMILY = run.Family(presets=PRESETS, default_preset="default", **_SHARED)
IMAGES = run.Family(presets=IMAGE_PRESETS, default_preset="default", **_SHARED)
