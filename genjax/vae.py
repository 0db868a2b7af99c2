"""The VAE family on the shared run layer: 2-D mixtures and images.

data (``genjax.generative``: exact mixture points, or images) → grain iterator (per
process) → the run layer → a step that maximizes the ELBO (``genjax.models.vae``,
β and KL warm-up) → evaluation (``genjax.generative``, every generating family's):
samples from the prior, decoded, scored by the PacGAN protocol (2-D) or in a
classifier's features next to the real-vs-real floor, with the test split's bits/dim
by the importance-weighted bound (images). At the end the workdir gets
``samples.npy``, ``samples.png``, ``eval.json`` and, for images, ``interpolation.png``.

A sample is what the model generates: z ~ N(0, I), then x ~ p(x|z) for 2-D points
(the decoder's Gaussian noise included: the model's density, which the protocol
scores); for images the decoder's mean E[x|z] rounded to the levels, the picture VAE
papers show (a draw of every pixel independently is speckled).

``FAMILY`` (2-D mixtures, ``experiments/vae_2d.py``) and ``IMAGES`` (digits,
``experiments/vae_digits.py``) share everything and differ in their presets.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from genjax import evaluate as evallib
from genjax import generative, run, train
from genjax.data import images as imagelib
from genjax.models import vae


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """How evaluation samples and scores."""

    num: int = 2500  # samples scored (PacGAN's count for 2-D)
    seed: int = 0
    # Images: the test split's bits/dim by IWAE with k importance samples (Burda et al.,
    # 2016: k = 5,000 there; 1,000 here), ``chunk`` of them per pass through the decoder.
    iwae_k: int = 1000
    iwae_chunk: int = 100
    nll: bool = True  # images: compute the test bits/dim
    interpolations: int = 8  # images: rows of interpolation.png (pairs of test digits)

    def __post_init__(self):
        if self.num < 1 or self.iwae_k < 1 or self.iwae_chunk < 1:
            raise ValueError("sample config: num, iwae_k and iwae_chunk must be >= 1")
        if self.iwae_k % min(self.iwae_chunk, self.iwae_k):
            raise ValueError(
                f"sample config: iwae_chunk={self.iwae_chunk} must divide iwae_k={self.iwae_k}"
            )


@dataclasses.dataclass(frozen=True)
class Config:
    model: vae.VAEConfig = dataclasses.field(default_factory=lambda: vae.PRESETS["points"])
    optim: train.OptimConfig = dataclasses.field(
        default_factory=lambda: train.OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=100)
    )
    data: generative.DataConfig = dataclasses.field(default_factory=generative.DataConfig)
    run: run.RunConfig = dataclasses.field(
        default_factory=lambda: run.RunConfig(steps=10_000, checkpoint_every=2000, log_every=100)
    )
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)


# The state is the run layer's TrainState: step, params, opt_state, rng.
State = train.TrainState


def init(cfg: Config, key: jax.Array) -> State:
    params = vae.init_params(cfg.model, jax.random.fold_in(key, 0))
    rng = jax.random.key_data(jax.random.fold_in(key, 1))
    opt_state = train.make_optimizer(cfg.optim).init(params)
    return State(jnp.zeros((), jnp.int32), params, opt_state, rng)


def model_input(cfg: vae.VAEConfig, x: jax.Array) -> jax.Array:
    """A batch's ``"x"`` as the VAE reads it: images ([−1, 1], not dequantized) back to
    their integer levels, which the discrete likelihoods score; points as they are."""
    return imagelib.to_levels(x, cfg.levels) if cfg.levels else x


def make_step(cfg: Config):
    """One Adam update of the negative ELBO (KL weighted by its warm-up at this step)."""
    optimizer, schedule = train.make_optimizer(cfg.optim), train.make_schedule(cfg.optim)

    def step(state: State, batch) -> tuple[State, dict]:
        def loss_fn(params, batch, *, key):
            x = model_input(cfg.model, batch["x"])
            return vae.loss(cfg.model, params, x, key=key, step=state.step)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        loss, grads = train.accumulate_gradients(
            grad_fn, state.params, batch, micro_batches=cfg.optim.grad_accum,
            key=train.step_key(state),
        )  # fmt: skip
        params, opt_state = train.apply_gradients(optimizer, state.params, state.opt_state, grads)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        return State(state.step + 1, params, opt_state, state.rng), metrics

    return step


# ----------------------------------------------------------------------------- sampling


@functools.partial(jax.jit, static_argnames="cfg")
def decoded_images(cfg: vae.VAEConfig, params, z_NZ: jax.Array) -> jax.Array:
    """Images [N, H, W, C] in [−1, 1] of latents z [N, Z]: the decoder's mean (float
    levels; the scores round them)."""
    return imagelib.to_unit(vae.decode_mean(cfg, params, z_NZ), cfg.levels)


@functools.partial(jax.jit, static_argnames=("cfg", "num"))
def _generate(cfg: vae.VAEConfig, params, key, *, num: int) -> jax.Array:
    k_z, k_x = jax.random.split(key)
    z_NZ = vae.sample_prior(cfg, num, key=k_z)
    if cfg.levels:
        return decoded_images(cfg, params, z_NZ)
    theta = vae.decode(cfg, params, z_NZ)
    mean, log_std = theta[..., 0], theta[..., 1]
    return mean + jnp.exp(log_std) * jax.random.normal(k_x, mean.shape)


def draw(cfg: Config, params, *, num: int, seed: int = 0) -> np.ndarray:
    """``num`` samples [num, *shape] of the model: images in [−1, 1] (the decoder's mean),
    points with the decoder's noise."""
    params = evallib.gather_to_host(params)
    return np.asarray(_generate(cfg.model, params, jax.random.key(seed), num=num))


def _iwae_sums(cfg: Config, key: jax.Array, params, batch) -> dict[str, jax.Array]:
    nll_B = -vae.iwae_bound(
        cfg.model, params, batch["x"], key=key, k=cfg.sample.iwae_k, chunk=cfg.sample.iwae_chunk
    )
    mask_B = batch["mask"]
    return {"nll": jnp.sum(nll_B * mask_B), "count": jnp.sum(mask_B)}


@functools.lru_cache(maxsize=8)
def _iwae_sums_fn(cfg: Config, seed: int):
    # One function object per config and seed, so evaluate's compile cache hits on every
    # evaluation of a run.
    return functools.partial(_iwae_sums, cfg, jax.random.key(seed))


def test_bits_per_dim(cfg: Config, params, images: imagelib.Images, *, seed: int = 0) -> float:
    """The test split's bits/dim, −IWAE_k / (D ln 2): a bound on the discrete images'
    NLL (the likelihood scores their levels: no dequantization). Split over this
    process's devices, 64 images per device and pass."""
    sums = _iwae_sums_fn(cfg, seed)
    x = images.test
    rows = 64 * len(jax.local_devices())
    batches = [{"x": x[i : i + rows], "mask": np.ones(len(x[i : i + rows]), np.float32)}
               for i in range(0, len(x), rows)]  # fmt: skip
    totals = evallib.evaluate(sums, params, batches)
    return float(vae.bits_per_dim(totals["nll"] / totals["count"], images.dims))


def plot_interpolations(path, cfg: Config, params, images: imagelib.Images) -> None:
    """Rows of decoded latents between pairs of test images (their posterior means):
    linear interpolation, ten points each, the two images at the ends."""
    rows = cfg.sample.interpolations
    x = images.test[: 2 * rows]
    mean_BZ, _ = vae.encode(cfg.model, params, jnp.asarray(x))
    paths = [vae.interpolate(mean_BZ[2 * r], mean_BZ[2 * r + 1], 10) for r in range(rows)]
    decoded = vae.decode_mean(cfg.model, params, jnp.concatenate(paths))
    levels = np.asarray(decoded).round().clip(0, images.levels - 1).reshape(rows, 10, *images.shape)
    plt = generative.pyplot()
    fig, axes = plt.subplots(rows, 12, figsize=(7.2, 0.6 * rows), squeeze=False)
    for r in range(rows):
        strip = [x[2 * r], *levels[r], x[2 * r + 1]]
        for ax, image in zip(axes[r], strip, strict=True):
            ax.imshow(image[..., 0], cmap="gray_r", vmin=0, vmax=images.levels - 1)
            ax.axis("off")
    fig.suptitle(f"{images.name}: test image, 10 decoded interpolation points, test image",
                 fontsize=7)  # fmt: skip
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- run layer


def data(cfg: Config, workdir: pathlib.Path) -> run.Data:
    s = cfg.sample

    def bits_per_dim(state: State, images: imagelib.Images) -> float:
        return test_bits_per_dim(cfg, state.params, images, seed=s.seed)

    def pictures(state: State, images: imagelib.Images) -> None:
        params = evallib.gather_to_host(state.params)
        plot_interpolations(workdir / "interpolation.png", cfg, params, images)

    is_images = cfg.data.is_images
    sampling = generative.Sampling(
        draw=lambda state: draw(cfg, state.params, num=s.num, seed=s.seed),
        num=s.num,
        seed=s.seed,
        bits_per_dim=bits_per_dim if is_images and s.nll else None,
        describe="decoded prior samples",
        pictures=pictures if is_images else None,
    )
    return generative.data(cfg.data, workdir, sampling)


def check(cfg: Config, mesh) -> None:
    generative.check_batch(cfg.data.global_batch_size, cfg.optim.grad_accum, mesh)


def complete(cfg: Config, explicit: frozenset[str]) -> Config:
    """The schedule follows the run; the model takes the data's shape and levels."""
    cfg = run.schedule_follows_run(cfg, explicit)
    if not cfg.data.is_images:
        model = dataclasses.replace(cfg.model, shape=(2,), levels=0)
        return dataclasses.replace(cfg, model=model)
    if cfg.data.dequantize:
        raise ValueError(
            "the VAE scores images' integer levels (a discrete likelihood): set "
            "data.dequantize=false"
        )
    images = cfg.data.load_images()
    model = dataclasses.replace(cfg.model, shape=images.shape, levels=images.levels)
    generative.check_sample_count(images, cfg.sample.num)
    return dataclasses.replace(cfg, model=model)


PRESETS = {
    "default": Config(),
    # Seconds on a CPU: a small network, few updates, few samples.
    "tiny": Config(
        model=vae.PRESETS["tiny"],
        data=generative.DataConfig(size=4096, global_batch_size=64),
        run=run.RunConfig(steps=40, checkpoint_every=20, log_every=10),
        sample=SampleConfig(num=256),
    ),
}
_DIGITS = Config(
    model=vae.PRESETS["digits"],
    optim=train.OptimConfig(lr=2e-3, weight_decay=0.0, warmup_steps=200),
    data=generative.DataConfig(dataset="digits", dequantize=False, global_batch_size=128),
    # 1,500 updates: the 1,437 digits overfit past that. Seed 0, a 3,000-update schedule,
    # test bits/dim (IWAE, k = 100) and FD every 500: 1.968 / 42.7, 1.859 / 28.4,
    # 1.920 / 23.9, 2.128 / 23.3 at 500 … 2,000; 5,000 updates ended at 6.613 / 24.1.
    run=run.RunConfig(steps=1500, checkpoint_every=500, log_every=100),
    sample=SampleConfig(num=1000),
)
IMAGE_PRESETS = {
    "default": _DIGITS,
    "tiny": dataclasses.replace(
        _DIGITS,
        model=vae.PRESETS["tiny-digits"],
        data=generative.DataConfig(dataset="digits", dequantize=False, global_batch_size=32),
        run=run.RunConfig(steps=20, checkpoint_every=10, log_every=10),
        sample=SampleConfig(num=40, iwae_k=8, iwae_chunk=4, interpolations=2),
    ),
}

_SHARED = dict(
    name="vae",
    init=init,
    param_axes=lambda cfg: {"params": vae.param_axes(cfg.model)},
    rules=vae.RULES,
    step=make_step,
    data=data,
    check=check,
    complete=complete,
    add_flags=generative.add_dataset_flag,
    flag_overrides=generative.dataset_override,
)
FAMILY = run.Family(presets=PRESETS, default_preset="default", **_SHARED)
IMAGES = run.Family(presets=IMAGE_PRESETS, default_preset="default", **_SHARED)
