"""Variational autoencoders: the ELBO, the importance-weighted bound and their likelihoods.

Glossary: B batch, D data dimensions (one example's shape flattened: 2 for 2-D points,
H·W·C for images), Z latent, K importance samples (C of them per chunk), L gray levels,
P likelihood parameters per data dimension, N points of an interpolation.

    prior     p(z) = N(0, I)
    encoder   q(z|x) = N(μ(x), diag e^{logvar(x)})
    decoder   p(x|z) = Π_d p(x_d | θ_d(z)), one of
      gaussian      N(x_d; μ_d(z), σ_d²), σ_d a learned constant per dimension (2-D data)
      logistic      a logistic(μ_d(z), s_d(z)) integrated over level x_d's bin (images)
      categorical   a softmax over the L levels (images)

    ELBO(x)   = E_q[log p(x|z)] − KL(q(z|x) ‖ p(z))                      ≤ log p(x)
    IWAE_K(x) = E_{z_1..z_K ~ q}[log (1/K) Σ_k p(x, z_k) / q(z_k|x)]    ≤ log p(x)

IWAE_1 is the ELBO, and IWAE_K rises with K towards log p(x) (Burda et al., 2016).

Images are integer levels 0..L−1 (``genjax.data.images``): encoders read their
``to_unit`` values in [−1, 1], the discrete likelihoods score the levels themselves,
and ``decode_mean`` answers in levels. Gaussian data are floats, read as they are.

Pure entry points take ``(cfg, params, ...)``, params a plain nested dict
(``init_params``); ``param_axes`` gives every parameter's logical axes, which ``RULES``
maps to mesh axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from genjax import mesh as meshlib
from genjax.data.images import to_unit
from genjax.nn.conditioning import zeros
from genjax.nn.vae_nets import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder

ARCHS = ("mlp", "conv")
LIKELIHOODS = ("gaussian", "logistic", "categorical")
LOG_2PI = math.log(2 * math.pi)
# PixelCNN++'s floor on a logistic's log-scale, s ≥ e^−7 ≈ 9e-4: 1/s stays finite (e^−log s
# overflows float32 past log s = −88) and a level's probability at most 0.973 at 256 levels
# (tanh(2.15); 1 − 3e-30 at 17), where the gradients stay tame.
MIN_LOG_SCALE = -7.0


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    # Filled in from the data: one example's shape, and its gray levels (0: continuous data).
    shape: tuple[int, ...] = (2,)
    levels: int = 0
    latent: int = 2  # Z
    arch: str = "mlp"  # mlp (any shape) | conv (images [H, W, C] with even H and W)
    hidden: tuple[int, ...] = (128, 128)  # mlp: encoder widths; the decoder's are reversed
    channels: int = 32  # conv: F, feature channels at full size (2F at half size)
    groups: int = 8  # conv: GroupNorm groups, dividing F
    likelihood: str = "gaussian"  # gaussian (continuous data) | logistic | categorical (levels)
    beta: float = 1.0  # weight of the KL term (β-VAE, Higgins et al., 2017); 1 is the ELBO
    # The KL weight rises linearly from 0 to β over this many steps (Sønderby et al.,
    # 2016), so the decoder learns to use z before the KL pulls q to the prior; 0: β always.
    kl_warmup_steps: int = 0

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"vae config: arch={self.arch!r}; choose one of {ARCHS}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(
                f"vae config: likelihood={self.likelihood!r}; choose one of {LIKELIHOODS}"
            )
        if not self.shape or min(self.shape) < 1:
            raise ValueError(f"vae config: shape={self.shape}; give one example's shape, e.g. (2,)")
        if self.latent < 1:
            raise ValueError(f"vae config: latent={self.latent}; set latent >= 1")
        if self.beta < 0:
            raise ValueError(f"vae config: beta={self.beta}; set beta >= 0 (1 is the ELBO)")
        if self.kl_warmup_steps < 0:
            raise ValueError(
                f"vae config: kl_warmup_steps={self.kl_warmup_steps}; set it >= 0 (0: no warm-up)"
            )
        if self.likelihood == "gaussian" and self.levels:
            raise ValueError(
                f"vae config: likelihood='gaussian' models continuous data, but levels="
                f"{self.levels}; use 'logistic' or 'categorical' for images, or levels=0"
            )
        if self.likelihood != "gaussian" and self.levels < 2:
            raise ValueError(
                f"vae config: likelihood={self.likelihood!r} scores integer levels; set levels "
                f"to the data's gray levels (17 for digits, 256 for uint8 images)"
            )
        if self.arch == "mlp" and min(self.hidden, default=1) < 1:
            raise ValueError(f"vae config: hidden={self.hidden}; every width must be >= 1")
        if self.arch == "conv":
            if len(self.shape) != 3 or self.shape[0] % 2 or self.shape[1] % 2:
                raise ValueError(
                    f"vae config: arch='conv' needs images [H, W, C] with even H and W; got "
                    f"shape={self.shape}; use arch='mlp' for other data"
                )
            if self.channels < 1 or self.groups < 1 or self.channels % self.groups:
                raise ValueError(
                    f"vae config: groups={self.groups} must divide channels={self.channels}; "
                    f"pick channels a multiple of groups"
                )

    @property
    def dims(self) -> int:
        """D: the dimensions of one example."""
        return math.prod(self.shape)

    @property
    def params_per_dim(self) -> int:
        """P: what the decoder network outputs per data dimension."""
        return {"gaussian": 1, "logistic": 2, "categorical": self.levels}[self.likelihood]


PRESETS: dict[str, VAEConfig] = {
    # Tests: 744 parameters (2-D), 17,506 (digits).
    "tiny": VAEConfig(hidden=(16, 16)),
    "tiny-digits": VAEConfig(
        shape=(8, 8, 1), levels=17, latent=4, arch="conv", channels=8, groups=4,
        likelihood="logistic",
    ),
    # 2-D mixtures (genjax.data.toy2d).
    # KL warm-up over 3,000 of the 10,000 updates: without it the decoder learns one
    # Gaussian blob and ignores z (ring, seed 0: 5/8 modes, 0.3% high quality, reverse
    # KL 0.52; with it 8/8, 29.9%, 0.020).
    "points": VAEConfig(kl_warmup_steps=3000),
    # scikit-learn's digits, 8×8×1 at 17 levels. The logistic beat the categorical at
    # equal budget: test IWAE_200 1.870 against 1.972 bits/dim (channels=16, latent=8,
    # 1,500 steps of 128, Adam 2e-3, warm-up 200, one seed; 2-core CPU, 80 s each), likely
    # because neighbouring levels share the logistic's mass where 17 free logits do not.
    "digits": VAEConfig(
        shape=(8, 8, 1), levels=17, latent=16, arch="conv", likelihood="logistic",
        kl_warmup_steps=1000,
    ),
}  # fmt: skip

# Logical axis -> mesh axis: MLP widths and conv channels over fsdp; the latent, the data
# dimensions and the kernels replicated.
RULES: meshlib.Rules = {
    "batch": meshlib.BATCH_AXES,
    "hidden": "fsdp",
    "hidden_in": None,
    "latent": None,
    "channels": "fsdp",
    "channels_in": None,
    "conv_h": None,
    "conv_w": None,
}


# ----------------------------------------------------------------------------- the network


class VAE(nnx.Module):
    """``encode(x [B, *shape]) -> (mean, logvar) [B, Z]``; ``decode(z [B, Z]) -> θ [B, *shape, P]``.

    θ is what ``log_likelihood`` reads: (μ, log σ) for gaussian, (μ, log s) for logistic
    (both on the [−1, 1] scale), L logits for categorical.
    """

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        Z, P = cfg.latent, cfg.params_per_dim
        if cfg.arch == "mlp":
            self.encoder = MLPEncoder(cfg.shape, cfg.hidden, Z, rngs=rngs)
            self.decoder = MLPDecoder(Z, cfg.hidden[::-1], cfg.shape, P, rngs=rngs)
        else:
            self.encoder = ConvEncoder(cfg.shape, cfg.channels, cfg.groups, Z, rngs=rngs)
            self.decoder = ConvDecoder(Z, cfg.channels, cfg.groups, cfg.shape, P, rngs=rngs)
        if cfg.likelihood == "gaussian":
            # One σ per dimension, the same for every z (Rybkin et al., 2021): a fixed σ is
            # a hidden β to tune per dataset (the reconstruction is ‖x − μ‖²/2σ²), and a σ
            # the decoder outputs per z may shrink to 0 on points its mean fits, making the
            # likelihood unbounded (Mattei & Frellsen, 2018). A shared σ learns the RMS
            # residual per dimension: the decoder is calibrated and the ELBO a fair bound.
            self.log_std = zeros(cfg.shape, (None,) * len(cfg.shape))

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.cfg.levels:
            return self.encoder(to_unit(x, self.cfg.levels))
        return self.encoder(x.astype(jnp.float32))

    def decode(self, z_BZ: jax.Array) -> jax.Array:
        theta = self.decoder(z_BZ)
        if self.cfg.likelihood == "gaussian":
            log_std = jnp.broadcast_to(self.log_std[...], theta.shape[:-1])
            theta = jnp.stack([theta[..., 0], log_std], axis=-1)
        return theta


@functools.lru_cache(maxsize=16)
def _abstract(cfg: VAEConfig):
    return nnx.split(nnx.eval_shape(lambda: VAE(cfg, rngs=nnx.Rngs(0))))


def init_params(cfg: VAEConfig, key: jax.Array) -> dict:
    """Fresh parameters as a plain nested dict: "encoder", "decoder" (and "log_std")."""
    return nnx.to_pure_dict(nnx.state(VAE(cfg, rngs=nnx.Rngs(params=key))))


def param_axes(cfg: VAEConfig) -> dict:
    """The logical sharding axes of every parameter, a tree shaped like ``init_params``."""
    _, state = _abstract(cfg)
    flat = {path: var.get_metadata()["axes"] for path, var in nnx.to_flat_state(state)}
    return nnx.to_pure_dict(nnx.from_flat_state(flat))


def net(cfg: VAEConfig, params: dict) -> VAE:
    """The ``VAE`` module with these weights (its ``encode`` and ``decode``)."""
    graphdef, abstract = _abstract(cfg)
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def encode(cfg: VAEConfig, params: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, logvar) [B, Z] of q(z|x)."""
    return net(cfg, params).encode(x)


def decode(cfg: VAEConfig, params: dict, z_BZ: jax.Array) -> jax.Array:
    """θ(z) [B, *shape, P]: the likelihood's parameters (``VAE``)."""
    return net(cfg, params).decode(z_BZ)


# ----------------------------------------------------------------------------- likelihoods


def gaussian_logp(x: jax.Array, mean: jax.Array, log_std: jax.Array) -> jax.Array:
    """log N(x; μ, σ²) = −½((x − μ)/σ)² − log σ − ½ log 2π, elementwise."""
    return -0.5 * jnp.square((x - mean) * jnp.exp(-log_std)) - log_std - 0.5 * LOG_2PI


def discretized_logistic_logp(
    x_int: jax.Array, mean: jax.Array, log_scale: jax.Array, levels: int
) -> jax.Array:
    """log P(x), elementwise, of level x under a logistic(μ, s) on the [−1, 1] scale
    integrated over x's bin: with c = to_unit(x), δ = 1/(L − 1) half the level spacing,

        P(x) = σ((c + δ − μ)/s) − σ((c − δ − μ)/s)      0 < x < L − 1
        P(0) = σ((c + δ − μ)/s),   P(L − 1) = 1 − σ((c − δ − μ)/s)

    (the edge bins reach ∓∞, so the L probabilities sum to 1; Salimans et al., 2017).
    """
    x_int = jnp.asarray(x_int)
    c = to_unit(x_int, levels)
    half_bin = 1 / (levels - 1)
    inv_s = jnp.exp(-jnp.maximum(log_scale, MIN_LOG_SCALE))
    a = (c + half_bin - mean) * inv_s
    b = (c - half_bin - mean) * inv_s
    log_cdf_a = -jax.nn.softplus(-a)  # log σ(a)
    log_sf_b = -jax.nn.softplus(b)  # log(1 − σ(b))
    # σ(a) − σ(b) = σ(a)·(1 − σ(b))·(1 − e^{b−a}): each factor's log is accurate in float32
    # far into the tails, where the difference of the two CDFs rounds to 0 (PixelCNN++
    # falls back to the density at the bin's centre there).
    log_mid = log_cdf_a + log_sf_b + jnp.log(-jnp.expm1(b - a))
    return jnp.where(x_int == 0, log_cdf_a, jnp.where(x_int == levels - 1, log_sf_b, log_mid))


def categorical_logp(x_int: jax.Array, logits: jax.Array) -> jax.Array:
    """log softmax(logits)[x], elementwise; logits carry a trailing axis of the L levels."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    index = jnp.asarray(x_int, jnp.int32)[..., None]
    return jnp.take_along_axis(log_probs, index, axis=-1)[..., 0]


def log_likelihood(cfg: VAEConfig, theta: jax.Array, x: jax.Array) -> jax.Array:
    """log p(x|z) = Σ_d log p(x_d | θ_d(z)) per example [B], θ from ``decode``."""
    if cfg.likelihood == "gaussian":
        logp = gaussian_logp(x, theta[..., 0], theta[..., 1])
    elif cfg.likelihood == "logistic":
        logp = discretized_logistic_logp(x, theta[..., 0], theta[..., 1], cfg.levels)
    else:
        logp = categorical_logp(x, theta)
    return jnp.sum(logp.reshape(logp.shape[0], -1), axis=-1)


def likelihood_mean(cfg: VAEConfig, theta: jax.Array) -> jax.Array:
    """E[x | θ] [B, *shape] on the data's scale: μ for gaussian, Σ_k k·P(k) in levels else."""
    if cfg.likelihood == "gaussian":
        return theta[..., 0]
    levels_L = jnp.arange(cfg.levels)
    if cfg.likelihood == "categorical":
        return jax.nn.softmax(theta, axis=-1) @ levels_L.astype(jnp.float32)
    # Every level's probability at once: the level axis leads, broadcast over [B, *shape].
    k = levels_L.reshape(-1, *(1,) * (theta.ndim - 1))
    probs_L = jnp.exp(discretized_logistic_logp(k, theta[..., 0], theta[..., 1], cfg.levels))
    return jnp.tensordot(levels_L.astype(jnp.float32), probs_L, axes=1)


# ----------------------------------------------------------------------------- latents


def gaussian_kl(mean_BZ: jax.Array, logvar_BZ: jax.Array) -> jax.Array:
    """KL(N(μ, diag e^logvar) ‖ N(0, I)) = ½ Σ_z (μ² + e^logvar − 1 − logvar), per example [B]."""
    return 0.5 * jnp.sum(jnp.square(mean_BZ) + jnp.exp(logvar_BZ) - 1 - logvar_BZ, axis=-1)


def reparameterize(mean: jax.Array, logvar: jax.Array, *, key: jax.Array) -> jax.Array:
    """z = μ + e^{logvar/2}·ε, ε ~ N(0, I): a sample of q differentiable in (μ, logvar)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def sample_prior(cfg: VAEConfig, n: int, *, key: jax.Array) -> jax.Array:
    """n latents [N, Z] from p(z) = N(0, I)."""
    return jax.random.normal(key, (n, cfg.latent))


def decode_mean(cfg: VAEConfig, params: dict, z_BZ: jax.Array) -> jax.Array:
    """E[x | z] [B, *shape] on the data's scale (float levels for images; round to show)."""
    return likelihood_mean(cfg, decode(cfg, params, z_BZ))


def interpolate(z0: jax.Array, z1: jax.Array, n: int, mode: str = "linear") -> jax.Array:
    """n latents [N, *z0.shape] from z0 to z1 (both included), t = 0, 1/(n − 1), …, 1:

        linear      (1 − t)·z0 + t·z1
        spherical   (sin((1 − t)θ)·z0 + sin(tθ)·z1) / sin θ,   cos θ = z0·z1 / (|z0| |z1|)

    Spherical (slerp; Shoemake, 1985; White, 2016) keeps the norm of equal-norm
    endpoints, where a Gaussian prior's mass lies (|z| ≈ √Z); the straight line cuts
    through the low-norm middle no sample comes from. Nearly parallel endpoints
    (sin θ < 1e-6) fall back to the line, which they then equal; slerp of opposite
    endpoints has no single path, and this one is not meaningful there.
    """
    if mode not in ("linear", "spherical"):
        raise ValueError(f"interpolate: mode={mode!r}; choose 'linear' or 'spherical'")
    if n < 2:
        raise ValueError(f"interpolate: n={n}; need n >= 2 to include both endpoints")
    t_N = jnp.linspace(0.0, 1.0, n).reshape(-1, *(1,) * z0.ndim)
    if mode == "linear":
        return (1 - t_N) * z0 + t_N * z1
    cos = jnp.vdot(z0, z1) / (jnp.linalg.norm(z0) * jnp.linalg.norm(z1))
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    sin = jnp.sin(theta)
    parallel = sin < 1e-6
    safe_sin = jnp.where(parallel, 1.0, sin)
    w0 = jnp.where(parallel, 1 - t_N, jnp.sin((1 - t_N) * theta) / safe_sin)
    w1 = jnp.where(parallel, t_N, jnp.sin(t_N * theta) / safe_sin)
    return w0 * z0 + w1 * z1


# ----------------------------------------------------------------------------- bounds


def elbo(
    cfg: VAEConfig, params: dict, x: jax.Array, *, key: jax.Array, beta: float = 1.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(ELBO_β, recon, KL), each per example [B]:

        ELBO_β(x) = log p(x|z) − β·KL(q(z|x) ‖ N(0, I)),   z = μ(x) + σ(x)·ε,  ε ~ N(0, I)

    one reparameterized z per example (an unbiased estimate of E_q log p(x|z)), the KL
    in closed form. β = 1 is the evidence lower bound.
    """
    model = net(cfg, params)
    mean_BZ, logvar_BZ = model.encode(x)
    z_BZ = reparameterize(mean_BZ, logvar_BZ, key=key)
    recon_B = log_likelihood(cfg, model.decode(z_BZ), x)
    kl_B = gaussian_kl(mean_BZ, logvar_BZ)
    return recon_B - beta * kl_B, recon_B, kl_B


def kl_weight(cfg: VAEConfig, step: jax.Array) -> jax.Array:
    """β·min(1, step / kl_warmup_steps): the KL weight at this step (β with no warm-up)."""
    if cfg.kl_warmup_steps == 0:
        return jnp.float32(cfg.beta)
    return cfg.beta * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / cfg.kl_warmup_steps)


def loss(
    cfg: VAEConfig, params: dict, x: jax.Array, *, key: jax.Array, step: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(mean over the batch of −ELBO_w, metrics), w = ``kl_weight(cfg, step)``.

    The metrics are batch means: "elbo" (β = 1, whatever w is), "recon", "kl", and
    "kl_weight".
    """
    w = kl_weight(cfg, step)
    value_B, recon_B, kl_B = elbo(cfg, params, x, key=key, beta=w)
    metrics = {
        "elbo": jnp.mean(recon_B - kl_B),
        "recon": jnp.mean(recon_B),
        "kl": jnp.mean(kl_B),
        "kl_weight": w,
    }
    return -jnp.mean(value_B), metrics


def iwae_bound(
    cfg: VAEConfig, params: dict, x: jax.Array, *, key: jax.Array, k: int, chunk: int = 100
) -> jax.Array:
    """IWAE_k(x) = log (1/k) Σ_{i<k} p(x|z_i)·p(z_i) / q(z_i|x),  z_i ~ q(z|x), per example [B].

    The k samples are drawn ``chunk`` at a time under a ``lax.scan`` that keeps a running
    logsumexp of the log-weights, so memory holds [chunk, B, ...] decoder outputs whatever
    k is. Sample i's noise comes from ``fold_in(key, i)``: the bound does not depend on
    the chunk size. k = 1 is a (one-sample, KL-by-sampling) ELBO.
    """
    chunk = min(chunk, k)
    if k < 1 or chunk < 1 or k % chunk:
        raise ValueError(
            f"iwae_bound: k={k} importance samples in chunks of {chunk}; choose k >= 1 and a "
            f"chunk that divides k"
        )
    model = net(cfg, params)
    mean_BZ, logvar_BZ = model.encode(x)
    B, Z = mean_BZ.shape
    x_CB = jnp.broadcast_to(x, (chunk, *x.shape)).reshape(chunk * B, *x.shape[1:])

    def chunk_logsumexp(index_C):
        eps_CBZ = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (B, Z)))(index_C)
        z_CBZ = mean_BZ + jnp.exp(0.5 * logvar_BZ) * eps_CBZ
        log_px_z = log_likelihood(cfg, model.decode(z_CBZ.reshape(chunk * B, Z)), x_CB)
        log_pz = -0.5 * jnp.sum(jnp.square(z_CBZ) + LOG_2PI, axis=-1)
        # log q(z|x) from the noise itself: z − μ = σ·ε, so no division by σ.
        log_qz = -0.5 * jnp.sum(jnp.square(eps_CBZ) + LOG_2PI + logvar_BZ, axis=-1)
        return jax.nn.logsumexp(log_px_z.reshape(chunk, B) + log_pz - log_qz, axis=0)

    def add_chunk(lse_B, index_C):
        return jnp.logaddexp(lse_B, chunk_logsumexp(index_C)), None

    # The first chunk starts the running sum: a constant start (−∞) would not carry the
    # batch's device-varying type under shard_map, which scan requires of its carry.
    index_NC = jnp.arange(k).reshape(k // chunk, chunk)
    lse_B, _ = jax.lax.scan(add_chunk, chunk_logsumexp(index_NC[0]), index_NC[1:])
    return lse_B - math.log(k)


def bits_per_dim(nll_B: jax.Array, dims: int) -> jax.Array:
    """Bits per dimension, nll / (D ln 2), of an NLL in nats of discrete data.

    For the logistic and categorical likelihoods, which give probabilities of the
    levels themselves, −ELBO and −IWAE bound −log P(x) of the discrete image directly:
    no dequantization term. (``genjax.data.images.bits_per_dim`` is the conversion for
    a density on dequantized [−1, 1] values, which adds D·log((L − 1)/2), the volume
    of a level's bin. Never apply it here.)
    """
    return nll_B / (dims * math.log(2))
