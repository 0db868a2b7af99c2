"""Generative adversarial networks: losses, R1, spectral normalization, PacGAN packing,
and the two named steps.

Glossary: B batch, Z latent, M examples per pack (PacGAN), K classes; an example x is
a point [D] (D = 2 for the toy mixtures) or an image [H, W, C]. With an argument, D(x)
is the discriminator's logit and G(z) the generator's sample; σ is the logistic
function, so σ(D(x)) is the discriminator's probability that x is real. Spectral
normalization reads a weight as a matrix [J, O]: its fan-in J by its output axis O.

One step of training is ``d_steps`` discriminator updates, then one generator update,
then the generator's EMA:

    discriminator_step  slice i of the batch (rows i, i + n, …) against as many fresh
                        fakes; loss + R1; every spectral-norm vector u one power
                        iteration further. Its key: fold_in(step key, i).
    generator_step      fakes as many as the whole batch (for its labels), scored by
                        the discriminator as it stands. Its key: fold_in(step key, n).

Networks (``genjax.nn.gan_nets``): "mlp" for 2-D points (PacGAN's), "conv" for small
images. With ``pack`` = M the discriminator judges M examples at once, all real or all
fake, concatenated along the last axis; a pack's logit is one number.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple, NoReturn

import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util

from genjax import mesh as meshlib
from genjax import train
from genjax.nn.gan_nets import ConvDiscriminator, ConvGenerator, MLPDiscriminator, MLPGenerator

ARCHS = ("mlp", "conv")
LATENT_DISTRIBUTIONS = ("normal", "uniform")
LOSS_NAMES = ("minimax", "nonsaturating", "hinge", "relativistic")  # see LOSSES


@dataclasses.dataclass(frozen=True)
class GANConfig:
    arch: str = "mlp"  # mlp (2-D points) | conv (images)
    shape: tuple[int, ...] = (2,)  # one example: (D,) for mlp, (H, W, C) for conv
    latent: int = 2  # Z (PacGAN's 2-D runs: 2)
    # The latents' law: normal, or uniform on [−√3, √3]^Z (bounded, unit variance; DCGAN
    # drew uniform latents).
    latent_distribution: str = "normal"
    g_hidden: int = 400  # mlp: the generator's hidden units and layers (PacGAN: 4 × 400)
    g_layers: int = 4
    g_batch_norm: bool = False  # mlp: batch-normalize the generator's hidden layers (PacGAN)
    d_hidden: int = 200  # mlp: the discriminator's maxout units and layers (PacGAN: 3 × 200)
    d_layers: int = 3
    maxout: int = 5  # mlp: linear pieces of each discriminator unit (PacGAN: 5)
    # mlp: the discriminator reads [x, sin(xW), cos(xW)] of R fixed random frequencies W ~
    # N(0, fourier_scale²) per unit of x (Tancik et al. 2020) rather than x; 0 reads x.
    # A maxout net of x needs weights and biases ~ 1/std of the modes to tell the grid's
    # bumps apart, which Adam at 1e-4 grows in ~10⁵ steps; Fourier features see them at
    # once (trained alone for 600 steps against a blur of the grid, D's loss ends at
    # 1.33 on x, 0.09 on sin and cos of 128 frequencies; chance is 1.39).
    fourier_features: int = 0
    fourier_scale: float = 1.0
    channels: tuple[int, ...] = (32, 64)  # conv: per resolution, full size first
    groups: int = 8  # conv: GroupNorm groups of the generator
    loss: str = "nonsaturating"  # minimax | nonsaturating | hinge | relativistic
    r1_gamma: float = 0.0  # γ of the R1 penalty on real data; 0 turns it off
    r2_gamma: float = 0.0  # γ of the same penalty on the fakes (R2); 0 turns it off
    spectral_norm: bool = False  # divide every discriminator weight by its σ̂
    pack: int = 1  # M: examples per discriminator input (PacGAN); 1 is a plain GAN
    d_steps: int = 1  # discriminator updates per generator update
    ema_decay: float = 0.999  # per generator update; samples come from the EMA weights
    # The data's scale: the generator's output is multiplied by it and the
    # discriminator's input divided, so both networks can work at unit scale (every
    # preset keeps 1: the grid's Fourier features are sized for its units as they are).
    data_scale: float = 1.0
    # conv: DiffAugment's translation (Zhao et al., 2020): every image the discriminator
    # reads, real or fake, shifted by up to an eighth of its size, differentiably, so a
    # discriminator of a small dataset cannot memorize it; the generator is not pushed
    # to shift its images, since its fakes are shifted the same way.
    augment: bool = False
    num_classes: int = 0  # K > 0: class-conditional G and a projection discriminator
    # Adam for both players (two time scales allowed: TTUR). β1 below 0.9: DCGAN
    # (Radford et al. 2016) found 0.9 oscillated and 0.5 stabilized; momentum averages
    # gradients against an opponent that has since moved. R1 and hinge + spectral norm
    # setups go further, to β1 = 0 (StyleGAN2, projection D).
    g_lr: float = 2e-4
    d_lr: float = 2e-4
    b1: float = 0.5
    b2: float = 0.999
    # Both rates held, then linear to 0 over the last lr_decay of total_steps generator
    # updates (pix2pix's and CycleGAN's schedule: at small steps the game settles);
    # 0 keeps them constant. total_steps is the run's (the GAN family sets it).
    lr_decay: float = 0.0
    total_steps: int = 0

    def __post_init__(self):
        def bad(msg: str) -> NoReturn:
            raise ValueError(f"gan config: {msg}")

        if self.arch not in ARCHS:
            bad(f"arch={self.arch!r}; choose one of {ARCHS}")
        if self.latent_distribution not in LATENT_DISTRIBUTIONS:
            bad(
                f"latent_distribution={self.latent_distribution!r}; choose one of "
                f"{LATENT_DISTRIBUTIONS}"
            )
        if self.loss not in LOSS_NAMES:
            bad(f"loss={self.loss!r}; choose one of {LOSS_NAMES}")
        for name in ("latent", "g_hidden", "g_layers", "d_hidden", "d_layers", "groups"):
            if getattr(self, name) < 1:
                bad(f"{name}={getattr(self, name)} must be >= 1")
        if self.maxout < 2:
            bad(f"maxout={self.maxout}: one piece is a linear unit; use >= 2 (PacGAN: 5)")
        if self.fourier_features < 0 or self.fourier_scale <= 0:
            bad(
                f"fourier_features={self.fourier_features} must be >= 0 (0: off) and "
                f"fourier_scale={self.fourier_scale} > 0"
            )
        if self.fourier_features and self.arch != "mlp":
            bad("fourier_features are the mlp discriminator's input; set it to 0 for conv")
        if min(self.r1_gamma, self.r2_gamma) < 0:
            bad(
                f"r1_gamma={self.r1_gamma} and r2_gamma={self.r2_gamma} must be >= 0 "
                "(0 turns each off)"
            )
        if self.pack < 1:
            bad(f"pack={self.pack} must be >= 1 (1: no packing)")
        if self.data_scale <= 0:
            bad(f"data_scale={self.data_scale} must be > 0 (1: the data as it is)")
        if self.d_steps < 1:
            bad(f"d_steps={self.d_steps} must be >= 1")
        if not 0 <= self.ema_decay < 1:
            bad(f"ema_decay={self.ema_decay} must be in [0, 1)")
        if self.num_classes < 0:
            bad(f"num_classes={self.num_classes} must be >= 0 (0: unconditional)")
        if self.num_classes and self.pack > 1:
            bad(
                "a pack of M examples has M labels, and neither PacGAN nor the projection "
                "discriminator defines its logit; set pack=1 or num_classes=0"
            )
        if min(self.g_lr, self.d_lr) <= 0:
            bad(f"g_lr={self.g_lr} and d_lr={self.d_lr} must be > 0")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            bad(f"b1={self.b1} and b2={self.b2} must be in [0, 1)")
        if not 0 <= self.lr_decay <= 1:
            bad(f"lr_decay={self.lr_decay} must be in [0, 1] (0: constant rates)")
        if self.total_steps < 0:
            bad(f"total_steps={self.total_steps} must be >= 0 (the run's updates)")
        if self.augment and self.arch != "conv":
            bad("augment translates images: use arch='conv', or augment=false")
        if self.arch == "mlp" and len(self.shape) != 1:
            bad(f"arch='mlp' takes points: shape=(D,), got {self.shape}; use arch='conv'")
        if self.arch == "conv":
            if len(self.shape) != 3:
                bad(f"arch='conv' takes images: shape=(H, W, C), got {self.shape}")
            if not self.channels or min(self.channels) < 1:
                bad(f"channels={self.channels} needs entries >= 1")
            scale = 2 ** (len(self.channels) - 1)
            if self.shape[0] % scale or self.shape[1] % scale:
                bad(
                    f"image sides {self.shape[:2]} must divide by {scale} for "
                    f"{len(self.channels)} resolutions; use fewer channels entries"
                )
            if any(c % self.groups for c in self.channels):
                bad(f"groups={self.groups} must divide every entry of channels={self.channels}")
        if min(self.shape, default=0) < 1:
            bad(f"shape={self.shape} needs sides >= 1")


PRESETS: dict[str, GANConfig] = {
    # Tests: seconds on a CPU.
    "tiny": GANConfig(g_hidden=32, g_layers=2, d_hidden=32, d_layers=2, maxout=2, ema_decay=0.9),
    # PacGAN's ring and grid runs: its networks, its loss (non-saturating), its
    # optimizer (Adam, lr 1e-4, β1 0.8); pack=2 is its PacGAN2.
    "ring": GANConfig(pack=2, g_lr=1e-4, d_lr=1e-4, b1=0.8),
    # Class-conditional digits (8×8×1): hinge loss, spectral norm, projection discriminator,
    # with SNGAN's Adam (β1 = 0, β2 = 0.9) and two D steps per G step; the EMA at 0.995
    # (a window of ~200 updates) since the generator is good within a few hundred.
    "digits": GANConfig(
        arch="conv",
        shape=(8, 8, 1),
        latent=32,
        loss="hinge",
        spectral_norm=True,
        num_classes=10,
        d_steps=2,
        b1=0.0,
        b2=0.9,
        ema_decay=0.995,
    ),
}

# Logical axis -> mesh axis: hidden units and feature channels over fsdp.
RULES: meshlib.Rules = {
    "batch": meshlib.BATCH_AXES,
    "hidden": "fsdp",
    "hidden_in": None,
    "channels": "fsdp",
    "channels_in": None,
    "conv_h": None,
    "conv_w": None,
    "features": None,
}


def check_batch_size(cfg: GANConfig, batch_size: int) -> None:
    """A step splits its batch into ``d_steps`` slices, each into packs of ``pack``."""
    n = cfg.d_steps * cfg.pack
    if batch_size % n:
        raise ValueError(
            f"gan: a batch of {batch_size} does not split into d_steps={cfg.d_steps} slices "
            f"of whole packs of {cfg.pack}; make the batch size a multiple of {n}"
        )


# ----------------------------------------------------------------------------- losses
# Every loss is a mean over the discriminator's inputs (packs, with packing) and takes
# logits, never probabilities: softplus(l) = −log σ(−l) stays exact where σ saturates.


def minimax_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """−E log σ(D(x)) − E log(1 − σ(D(G(z)))) = E softplus(−D(x)) + E softplus(D(G(z))):
    the discriminator's cross-entropy, real against fake (Goodfellow et al. 2014, Eq. 1)."""
    return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))


def minimax_g_loss(fake_logits: jax.Array) -> jax.Array:
    """E log(1 − σ(D(G(z)))) = −E softplus(D(G(z))): the other side of the same game.
    It saturates: where D rejects the fakes confidently its gradient vanishes."""
    return -jnp.mean(jax.nn.softplus(fake_logits))


def nonsaturating_g_loss(fake_logits: jax.Array) -> jax.Array:
    """−E log σ(D(G(z))) = E softplus(−D(G(z))): the same fixed point, strong gradients
    early in training (Goodfellow et al. 2014, Section 3)."""
    return jnp.mean(jax.nn.softplus(-fake_logits))


def hinge_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """E max(0, 1 − D(x)) + E max(0, 1 + D(G(z))) (Lim & Ye 2017; Miyato et al. 2018)."""
    return jnp.mean(jax.nn.relu(1 - real_logits)) + jnp.mean(jax.nn.relu(1 + fake_logits))


def hinge_g_loss(fake_logits: jax.Array) -> jax.Array:
    """−E D(G(z))."""
    return -jnp.mean(fake_logits)


def relativistic_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """E softplus(D(G(z)) − D(x)): each real input paired with a fake one, the
    discriminator judges which of the two is real (RpGAN: Jolicoeur-Martineau 2019;
    with R1 and R2 the loss of R3GAN, Huang et al. 2024)."""
    return jnp.mean(jax.nn.softplus(fake_logits - real_logits))


def relativistic_g_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """E softplus(D(x) − D(G(z))): the same pairs, the other side; the generator step
    binds the real logits first, so it too is a loss of the fake logits."""
    return jnp.mean(jax.nn.softplus(real_logits - fake_logits))


# name -> (discriminator loss of (real, fake) logits, generator loss of fake logits,
# after the real logits for the paired loss)
LOSSES: dict[str, tuple[Callable, Callable]] = {
    "minimax": (minimax_d_loss, minimax_g_loss),
    "nonsaturating": (minimax_d_loss, nonsaturating_g_loss),
    "hinge": (hinge_d_loss, hinge_g_loss),
    "relativistic": (relativistic_d_loss, relativistic_g_loss),
}
PAIRED_LOSSES = ("relativistic",)  # each fake's loss reads the real input paired with it


def gradient_penalty(
    d_apply: Callable[[Any, jax.Array], jax.Array], d_params: Any, x: jax.Array, *, gamma
) -> jax.Array:
    """γ/2 · E_x ‖∇ₓ D(x)‖² over the examples x: R1 on real data, R2 on the fakes
    (Mescheder et al. 2018, Eq. 9 and 10).

    ``d_apply(d_params, x [B, ...]) -> logits [N]``, where logit n reads only its own
    rows of x (with packing, N = B/M): then one backward pass of Σ logits gives every
    input's gradient, and the expectation is over the N inputs of the discriminator.
    """
    logits, vjp = jax.vjp(lambda x: d_apply(d_params, x), x)
    (grad,) = vjp(jnp.ones_like(logits))
    return 0.5 * gamma * jnp.sum(jnp.square(grad)) / logits.size


# ----------------------------------------------------------------------------- spectral norm


def _unit(v: jax.Array) -> jax.Array:
    return v * jax.lax.rsqrt(jnp.sum(jnp.square(v)) + 1e-12)


def power_iteration(w: jax.Array, u_O: jax.Array, iterations: int = 1):
    """(σ̂, u): the largest singular value of w read as a matrix [J, O], estimated by
    ``iterations`` rounds of power iteration from u [O] (Miyato et al. 2018, Alg. 1).

    σ̂ = vᵀ W u with v = W u / ‖W u‖. The vectors are constants to autodiff, so
    ∂σ̂/∂W = v uᵀ, as in the paper; u is returned to start the next call from.
    """
    w_JO = w.reshape(-1, w.shape[-1])
    w_fixed = jax.lax.stop_gradient(w_JO)

    def one(u, _):
        return _unit(_unit(w_fixed @ u) @ w_fixed), None

    u_O, _ = jax.lax.scan(one, u_O, None, length=iterations)
    u_O = jax.lax.stop_gradient(u_O)
    v_J = _unit(w_fixed @ u_O)
    return v_J @ w_JO @ u_O, u_O


def init_spectral_state(d_params: Any, key: jax.Array) -> dict:
    """A random unit vector u [O] for every weight of rank >= 2 (biases are not
    normalized), in a dict of the parameters' structure."""
    flat = traverse_util.flatten_dict(d_params)
    weights = sorted((k for k, w in flat.items() if w.ndim >= 2), key=str)
    keys = jax.random.split(key, len(weights))
    u = {
        k: _unit(jax.random.normal(kk, (flat[k].shape[-1],)))
        for k, kk in zip(weights, keys, strict=True)
    }
    return traverse_util.unflatten_dict(u)


def spectral_normalize(d_params: Any, sn_state: dict, iterations: int = 1):
    """(weights, sn_state): every weight with a vector in ``sn_state`` divided by its σ̂
    after ``iterations`` more power iterations, and those vectors (Miyato et al. 2018).
    With no vectors (spectral norm off: ``{}``) the weights are the parameters."""
    flat, flat_u = traverse_util.flatten_dict(d_params), traverse_util.flatten_dict(sn_state)
    for k, u in flat_u.items():
        sigma, flat_u[k] = power_iteration(flat[k], u, iterations)
        flat[k] = flat[k] / sigma
    return traverse_util.unflatten_dict(flat), traverse_util.unflatten_dict(flat_u)


# ----------------------------------------------------------------------------- packing


def pack(x: jax.Array, m: int) -> jax.Array:
    """[B, ..., C] → [B/M, ..., M·C]: each M consecutive examples side by side along the
    last axis, features of points or channels of images (PacGAN, Lin et al. 2018).

    Consecutive rows, so a pack stays on the device that holds its examples.
    """
    B = x.shape[0]
    if B % m:
        raise ValueError(
            f"pack: a batch of {B} examples does not split into packs of {m}; "
            f"make the batch size a multiple of pack={m}"
        )
    x_BM = x.reshape(B // m, m, *x.shape[1:])
    return jnp.moveaxis(x_BM, 1, -2).reshape(B // m, *x.shape[1:-1], m * x.shape[-1])


def translate(x_BHWC: jax.Array, key: jax.Array, fill: float = -1.0) -> jax.Array:
    """Each image shifted by its own random (dy, dx), each up to an eighth of the side
    (at least 1 pixel) either way, the uncovered border ``fill``ed (−1: the lowest level,
    the digits' background); a gather, so gradients reach every pixel that stays."""
    _, H, W, _ = x_BHWC.shape
    sy, sx = max(1, round(H / 8)), max(1, round(W / 8))
    bound_2 = jnp.array([sy, sx])
    shifts_B2 = jax.random.randint(key, (x_BHWC.shape[0], 2), -bound_2, bound_2 + 1)
    padded = jnp.pad(x_BHWC, ((0, 0), (sy, sy), (sx, sx), (0, 0)), constant_values=fill)

    def crop(image, shift):
        return jax.lax.dynamic_slice(
            image, (sy + shift[0], sx + shift[1], 0), (H, W, image.shape[-1])
        )

    return jax.vmap(crop)(padded, shifts_B2)


# ----------------------------------------------------------------------------- networks


def _modules(cfg: GANConfig, g_rngs: nnx.Rngs, d_rngs: nnx.Rngs):
    packed = (*cfg.shape[:-1], cfg.pack * cfg.shape[-1])  # what the discriminator reads
    K = cfg.num_classes
    if cfg.arch == "mlp":
        g = MLPGenerator(cfg.latent, cfg.shape[0], cfg.g_hidden, cfg.g_layers, K,
                         cfg.g_batch_norm, rngs=g_rngs)  # fmt: skip
        d = MLPDiscriminator(packed[0], cfg.d_hidden, cfg.d_layers, cfg.maxout, K,
                             cfg.fourier_features, cfg.fourier_scale, rngs=d_rngs)  # fmt: skip
        return g, d
    g = ConvGenerator(cfg.latent, cfg.shape, cfg.channels, cfg.groups, K, rngs=g_rngs)
    return g, ConvDiscriminator(packed, cfg.channels, K, rngs=d_rngs)


@functools.lru_cache(maxsize=16)
def _abstract(cfg: GANConfig):
    g, d = nnx.eval_shape(lambda: _modules(cfg, nnx.Rngs(0), nnx.Rngs(1)))
    return nnx.split(g), nnx.split(d)


def init_params(cfg: GANConfig, key: jax.Array) -> tuple[dict, dict]:
    """(generator params, discriminator params), pure dicts."""
    g_rngs = nnx.Rngs(params=jax.random.fold_in(key, 0))
    d_rngs = nnx.Rngs(params=jax.random.fold_in(key, 1))
    g, d = _modules(cfg, g_rngs, d_rngs)
    return nnx.to_pure_dict(nnx.state(g)), nnx.to_pure_dict(nnx.state(d))


def param_axes(cfg: GANConfig) -> dict[str, Any]:
    """The logical axes of the state's parameter fields (optimizer moments follow them)."""

    def axes(state):
        flat = {path: var.get_metadata()["axes"] for path, var in nnx.to_flat_state(state)}
        return nnx.to_pure_dict(nnx.from_flat_state(flat))

    (_, g_state), (_, d_state) = _abstract(cfg)
    return {"g_params": axes(g_state), "d_params": axes(d_state), "g_ema": axes(g_state)}


def _merge(split, params: dict) -> nnx.Module:
    graphdef, abstract = split
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def generator(cfg: GANConfig, g_params: dict) -> nnx.Module:
    """The generator with these weights: ``(z [B, Z], label [B] | None) -> x [B, ...]``."""
    return _merge(_abstract(cfg)[0], g_params)


def discriminator(cfg: GANConfig, d_params: dict) -> nnx.Module:
    """The discriminator with these weights: ``(packed x, label | None) -> logits``, and
    ``features(packed x) -> φ``. Spectral normalization comes before, on the params."""
    return _merge(_abstract(cfg)[1], d_params)


def generate(cfg: GANConfig, g_params: dict, z_BZ: jax.Array, label_B=None) -> jax.Array:
    """G(z) [B, ...] (for labels [B] when class-conditional), in the data's units."""
    return cfg.data_scale * generator(cfg, g_params)(z_BZ, label_B)


def discriminate(cfg: GANConfig, d_weights: dict, x: jax.Array, label_B=None) -> jax.Array:
    """D's logits [B/M] of examples [B, ...], packed M at a time, by the weights it uses:
    ``spectral_normalize(state.d_params, state.d_sn_state)[0]``."""
    return discriminator(cfg, d_weights)(pack(x / cfg.data_scale, cfg.pack), label_B)


def draw_latents(cfg: GANConfig, num: int, key: jax.Array) -> jax.Array:
    """z [num, Z] from the latent distribution."""
    if cfg.latent_distribution == "uniform":
        bound = math.sqrt(3.0)
        return jax.random.uniform(key, (num, cfg.latent), minval=-bound, maxval=bound)
    return jax.random.normal(key, (num, cfg.latent))


def sample(cfg: GANConfig, g_params: dict, num: int, *, key: jax.Array, label_B=None):
    """``num`` samples G(z) of latents z from ``draw_latents``; a conditional generator
    draws classes 0, 1, …, K−1, 0, … unless given labels [num]."""
    if cfg.num_classes and label_B is None:
        label_B = jnp.arange(num, dtype=jnp.int32) % cfg.num_classes
    z_BZ = draw_latents(cfg, num, key)
    return generate(cfg, g_params, z_BZ, label_B)


# ----------------------------------------------------------------------------- the state


class State(NamedTuple):
    step: jax.Array  # int32 scalar: steps applied (generator updates; d_steps per step)
    g_params: Any  # the generator's weights
    d_params: Any  # the discriminator's raw weights (spectral norm divides them by σ̂)
    g_opt_state: Any  # the generator's Adam moments, sharded like g_params
    d_opt_state: Any  # the discriminator's, sharded like d_params
    g_ema: Any  # EMA of g_params: what samples and evaluation use
    # Spectral norm's power-iteration vectors u [O], one per discriminator weight ({}
    # when off): not trained, carried forward one iteration by every discriminator step.
    d_sn_state: Any
    rng: jax.Array  # uint32 key data; step keys are fold_in(rng, step)


def learning_rate(cfg: GANConfig, lr: float, updates_per_step: int) -> optax.ScalarOrSchedule:
    """``lr``, constant or held and then linear to 0 (``cfg.lr_decay``), for a player
    updated ``updates_per_step`` times per step: its Adam counts its own updates."""
    if not cfg.lr_decay:
        return lr
    if cfg.total_steps < 1:  # the GAN family sets it; a config built by hand may not
        raise ValueError(
            f"gan config: lr_decay={cfg.lr_decay} decays over a fraction of total_steps="
            f"{cfg.total_steps}; set total_steps to the run's updates (>= 1)"
        )
    decay = round(cfg.lr_decay * cfg.total_steps) * updates_per_step
    hold = cfg.total_steps * updates_per_step - decay
    return optax.join_schedules(
        [optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, decay)], [hold]
    )


def make_optimizers(cfg: GANConfig) -> tuple[optax.GradientTransformation, ...]:
    """(generator's, discriminator's) Adam, no clipping or weight decay."""
    return (
        optax.adam(learning_rate(cfg, cfg.g_lr, 1), b1=cfg.b1, b2=cfg.b2),
        optax.adam(learning_rate(cfg, cfg.d_lr, cfg.d_steps), b1=cfg.b1, b2=cfg.b2),
    )


def init(cfg: GANConfig, key: jax.Array) -> State:
    """Step 0: fresh networks, zero moments, g_ema = g_params, random unit vectors u."""
    g_params, d_params = init_params(cfg, jax.random.fold_in(key, 0))
    sn_key, rng = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
    sn_state = init_spectral_state(d_params, sn_key) if cfg.spectral_norm else {}
    g_opt, d_opt = make_optimizers(cfg)
    return State(
        step=jnp.zeros((), jnp.int32),
        g_params=g_params,
        d_params=d_params,
        g_opt_state=g_opt.init(g_params),
        d_opt_state=d_opt.init(d_params),
        g_ema=g_params,
        d_sn_state=sn_state,
        rng=jax.random.key_data(rng),
    )


# ----------------------------------------------------------------------------- the steps


def _labels(cfg: GANConfig, batch) -> jax.Array | None:
    if not cfg.num_classes:
        return None
    if "label" not in batch:
        raise ValueError(f"gan: num_classes={cfg.num_classes} needs batch['label'] [B]")
    return batch["label"]


def discriminator_step(cfg: GANConfig, state: State, batch, *, key: jax.Array):
    """One discriminator update on ``batch`` ({"x": real [B, ...], "label": [B] when
    conditional}) against B fresh fakes for the same labels: its loss (+ R1 on the
    real examples, R2 on the fakes) through the spectrally normalized weights, whose vectors advance
    one power iteration. Only d_params, d_opt_state and d_sn_state change."""
    x_real, label_B = batch["x"], _labels(cfg, batch)
    z_BZ = draw_latents(cfg, x_real.shape[0], key)
    x_fake = generate(cfg, state.g_params, z_BZ, label_B)  # only d_params are differentiated
    d_loss_fn, _ = LOSSES[cfg.loss]

    if cfg.augment:
        k_real, k_fake = jax.random.split(jax.random.fold_in(key, 1))
        x_real, x_fake = translate(x_real, k_real), translate(x_fake, k_fake)

    def loss_fn(d_params):
        weights, sn_state = spectral_normalize(d_params, state.d_sn_state)
        d_apply = lambda w, x: discriminate(cfg, w, x, label_B)
        real, fake = d_apply(weights, x_real), d_apply(weights, x_fake)
        r1 = r2 = jnp.zeros(())
        if cfg.r1_gamma:
            r1 = gradient_penalty(d_apply, weights, x_real, gamma=cfg.r1_gamma)
        if cfg.r2_gamma:
            r2 = gradient_penalty(d_apply, weights, x_fake, gamma=cfg.r2_gamma)
        loss = d_loss_fn(real, fake) + r1 + r2
        aux = {"r1": r1, "r2": r2, "d_real": jnp.mean(real), "d_fake": jnp.mean(fake)}
        return loss, (sn_state, aux)

    (loss, (sn_state, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.d_params)
    d_params, d_opt_state = train.apply_gradients(
        make_optimizers(cfg)[1], state.d_params, state.d_opt_state, grads
    )
    metrics = {"d_loss": loss, "d_grad_norm": optax.tree.norm(grads), **aux}
    new = state._replace(d_params=d_params, d_opt_state=d_opt_state, d_sn_state=sn_state)
    return new, metrics


def generator_step(cfg: GANConfig, state: State, batch, *, key: jax.Array):
    """One generator update: fakes as many as ``batch`` has rows (for its labels),
    scored by the discriminator as it stands (its vectors read, not stored), then
    the EMA. Only g_params, g_opt_state and g_ema change."""
    label_B = _labels(cfg, batch)
    z_BZ = draw_latents(cfg, batch["x"].shape[0], key)
    weights, _ = spectral_normalize(state.d_params, state.d_sn_state)
    _, g_loss_fn = LOSSES[cfg.loss]
    if cfg.loss in PAIRED_LOSSES:  # the real side of each pair: constants to the generator
        x_real = batch["x"]
        if cfg.augment:
            x_real = translate(x_real, jax.random.fold_in(key, 2))
        g_loss_fn = functools.partial(g_loss_fn, discriminate(cfg, weights, x_real, label_B))

    def loss_fn(g_params):
        fake = generate(cfg, g_params, z_BZ, label_B)
        if cfg.augment:
            fake = translate(fake, jax.random.fold_in(key, 1))
        return g_loss_fn(discriminate(cfg, weights, fake, label_B))

    loss, grads = jax.value_and_grad(loss_fn)(state.g_params)
    g_params, g_opt_state = train.apply_gradients(
        make_optimizers(cfg)[0], state.g_params, state.g_opt_state, grads
    )
    g_ema = train.ema_update(state.g_ema, g_params, cfg.ema_decay)
    metrics = {"g_loss": loss, "g_grad_norm": optax.tree.norm(grads)}
    return state._replace(g_params=g_params, g_opt_state=g_opt_state, g_ema=g_ema), metrics


def split_batch(batch, n: int):
    """The batch as n slices stacked [n, B/n, ...]: slice i is rows i, i + n, …, so
    every data shard holds its share of every slice and the scan never reshards."""
    return jax.tree.map(lambda x: x.reshape(-1, n, *x.shape[1:]).swapaxes(0, 1), batch)


def make_step(cfg: GANConfig):
    """The pure ``(state, batch) -> (state, metrics)`` of one step: ``d_steps``
    discriminator updates (one ``lax.scan``), one generator update, step + 1. The
    metrics are the discriminator steps' means and the generator step's values."""

    def step(state: State, batch) -> tuple[State, dict]:
        check_batch_size(cfg, batch["x"].shape[0])
        key, n = train.step_key(state), cfg.d_steps

        def d_update(state, xs):
            i, slice_ = xs
            return discriminator_step(cfg, state, slice_, key=jax.random.fold_in(key, i))

        state, d_metrics = jax.lax.scan(d_update, state, (jnp.arange(n), split_batch(batch, n)))
        state, g_metrics = generator_step(cfg, state, batch, key=jax.random.fold_in(key, n))
        metrics = {**jax.tree.map(jnp.mean, d_metrics), **g_metrics}
        return state._replace(step=state.step + 1), metrics

    return step
