"""The generators and discriminators of the GAN family (``genjax.models.gan``).

Glossary: B batch, Z latent, D features of one 2-D point, U hidden units, P maxout
pieces, K classes, R random Fourier frequencies, F the discriminator's features φ(x)
(what its class projection reads), H W C image height, width and channels (I: a layer's
inputs, O: its outputs).

    MLPGenerator       [z ‖ label embedding] → (Linear → ReLU) × layers → Linear → x [B, D]
    MLPDiscriminator   x [B, D] → (optional: random Fourier features [sin xW, cos xW])
                       → (Linear → max over P pieces) × layers = φ [B, U] → logit [B]
    ConvGenerator      [z ‖ label embedding] → dense to the lowest resolution → per level:
                       GroupNorm → ReLU → nearest ×2 → conv 3×3 → … → conv 3×3 → tanh
    ConvDiscriminator  x → conv 3×3 → LeakyReLU → (conv 3×3 stride 2 → LeakyReLU) per level
                       → φ = flatten → logit [B]

The MLPs are PacGAN's 2-D networks (Lin et al. 2018, after VEEGAN): G 4 × 400 ReLU,
D 3 × 200 LinearMaxout of 5 pieces (github.com/fjxmlzn/PacGAN, synthetic_data_experiments).
Their G also batch-normalizes every hidden layer: here optional (``batch_norm``), by the
batch's statistics always (``BatchNorm``). The conv generator normalizes with GroupNorm,
per example.

Labels (``num_classes`` > 0): the generator concatenates a learned embedding of the
label (width Z) to z, the input conditioning of a cGAN (Mirza & Osindero 2014); the
discriminator is a projection discriminator (Miyato & Koyama 2018), logit = ψ(φ(x)) +
⟨V[y], φ(x)⟩. There is no null label: a GAN has no classifier-free guidance to train.

Every weight keeps its output axis last (a maxout layer's P pieces are folded into it,
[I, U·P]), so spectral normalization reads any weight as a matrix [fan-in, O] by one
reshape. Logical axes: "hidden" (U, U·P), "hidden_in", "channels", "channels_in",
"conv_h", "conv_w", "features" (F of the conv discriminator); latent, data and label
axes are None.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from genjax.nn.conditioning import linear, zeros
from genjax.nn.layers import einsum, param
from genjax.nn.unet import Conv, GroupNorm


class Dense(nnx.Module):
    """x [B, I] → x @ w [I, O] + b [O] (no b where a normalization's shift follows);
    the weight's std is 1/√I."""

    def __init__(self, inputs: int, outputs: int, axes: tuple, bias: bool = True, *, rngs):
        self.w_IO = linear(rngs, inputs, (inputs, outputs), axes)
        self.b_O = zeros((outputs,), (axes[1],)) if bias else None

    def __call__(self, x_BI: jax.Array) -> jax.Array:
        y_BO = einsum("BI,IO->BO", x_BI, self.w_IO[...])
        return y_BO if self.b_O is None else y_BO + self.b_O[...]


def label_table(rngs: nnx.Rngs, num_classes: int, width: int, axis: str | None, std: float):
    """A learned vector per class [K, width], or None for an unconditional network."""
    if not num_classes:
        return None
    return param(rngs, (num_classes, width), (None, axis), std, "float32")


def with_label(z_BZ: jax.Array, table_KZ, label_B, who: str) -> jax.Array:
    """[z ‖ table[label]]: the generator's input. A conditional network needs labels,
    an unconditional one refuses them."""
    if table_KZ is None:
        if label_B is not None:
            raise ValueError(f"{who}: got labels but the config has num_classes=0")
        return z_BZ
    if label_B is None:
        raise ValueError(f"{who}: a class-conditional network needs labels [B]")
    return jnp.concatenate([z_BZ, jnp.take(table_KZ[...], label_B, axis=0)], axis=-1)


def project(phi_BF: jax.Array, out: Dense, table_KF, label_B, who: str) -> jax.Array:
    """The logit [B]: ψ(φ) = φ @ w + b, plus ⟨V[y], φ⟩ with labels (projection)."""
    logit_B = out(phi_BF)[:, 0]
    if table_KF is None:
        if label_B is not None:
            raise ValueError(f"{who}: got labels but the config has num_classes=0")
        return logit_B
    if label_B is None:
        raise ValueError(f"{who}: a class-conditional network needs labels [B]")
    return logit_B + jnp.sum(jnp.take(table_KF[...], label_B, axis=0) * phi_BF, axis=-1)


# ----------------------------------------------------------------------------- 2-D points


class MLPGenerator(nnx.Module):
    def __init__(
        self, latent: int, dim: int, hidden: int, layers: int, num_classes: int,
        batch_norm: bool = False, *, rngs: nnx.Rngs,
    ):  # fmt: skip
        Z, D, U = latent, dim, hidden
        self.embed_KZ = label_table(rngs, num_classes, Z, None, 1.0)  # z's scale
        widths = [Z + (Z if num_classes else 0)] + [U] * layers
        self.hidden = nnx.List(
            [
                Dense(i, U, ("hidden_in" if n else None, "hidden"), not batch_norm, rngs=rngs)
                for n, i in enumerate(widths[:-1])
            ]
        )
        # A bias before batch norm would be subtracted again: its gradient is rounding
        # noise, which Adam scales up to full-size steps.
        self.norms = nnx.List([BatchNorm(U) for _ in range(layers)]) if batch_norm else None
        self.out = Dense(U, D, ("hidden", None), rngs=rngs)

    def __call__(self, z_BZ: jax.Array, label_B: jax.Array | None = None) -> jax.Array:
        h_BU = with_label(z_BZ, self.embed_KZ, label_B, "mlp generator")
        for n, layer in enumerate(self.hidden):
            h_BU = layer(h_BU)
            if self.norms is not None:
                h_BU = self.norms[n](h_BU)
            h_BU = jax.nn.relu(h_BU)
        return self.out(h_BU)


class BatchNorm(nnx.Module):
    """x [B, U] normalized by its batch's mean and variance, then scaled and shifted.

    Always the batch's statistics, in training and in sampling alike: a generator's
    batch is i.i.d. draws of z, so its statistics estimate the same expectation over
    p(z) that running averages would, with no state beside the weights (a sampling
    batch of thousands estimates it better than a training batch)."""

    def __init__(self, units: int, eps: float = 1e-5):
        self.eps = eps
        self.scale_U = nnx.Param(jnp.ones((units,), jnp.float32), axes=("hidden",))
        self.shift_U = zeros((units,), ("hidden",))

    def __call__(self, x_BU: jax.Array) -> jax.Array:
        mean_U = jnp.mean(x_BU, axis=0)
        var_U = jnp.mean(jnp.square(x_BU - mean_U), axis=0)
        return (x_BU - mean_U) * jax.lax.rsqrt(var_U + self.eps) * self.scale_U + self.shift_U


class MLPDiscriminator(nnx.Module):
    """``dim`` is the width of one (packed) input: M·D for packs of M points."""

    def __init__(
        self, dim: int, hidden: int, layers: int, pieces: int, num_classes: int,
        fourier_features: int = 0, fourier_scale: float = 1.0, *, rngs: nnx.Rngs,
    ):  # fmt: skip
        U, P = hidden, pieces
        self.pieces = pieces
        self.fourier_features, self.fourier_scale = fourier_features, fourier_scale
        widths = [dim + 2 * fourier_features] + [U] * layers
        self.hidden = nnx.List(
            [
                Dense(i, U * P, ("hidden_in" if n else None, "hidden"), rngs=rngs)
                for n, i in enumerate(widths[:-1])
            ]
        )
        self.out = Dense(U, 1, ("hidden", None), rngs=rngs)
        self.embed_KF = label_table(rngs, num_classes, U, "hidden", 1 / math.sqrt(U))

    def fourier(self, x_BD: jax.Array) -> jax.Array:
        """[x, sin(xW), cos(xW)] [B, D + 2R] of R frequencies W [D, R], drawn from a fixed
        key, not trained and not stored: the same frequencies in every run and on resume.
        x itself stays: far from the data the periodic features repeat, and only x tells
        the generator which way the data lies."""
        W_DR = self.fourier_scale * jax.random.normal(
            jax.random.key(0), (x_BD.shape[-1], self.fourier_features)
        )
        xW_BR = einsum("BD,DR->BR", x_BD, W_DR)
        return jnp.concatenate([x_BD, jnp.sin(xW_BR), jnp.cos(xW_BR)], axis=-1)

    def features(self, x_BD: jax.Array) -> jax.Array:
        """φ(x) [B, U]: the last hidden layer."""
        h_BU = self.fourier(x_BD) if self.fourier_features else x_BD
        for layer in self.hidden:
            h_BUP = layer(h_BU).reshape(x_BD.shape[0], -1, self.pieces)
            h_BU = jnp.max(h_BUP, axis=-1)  # maxout (Goodfellow et al. 2013)
        return h_BU

    def __call__(self, x_BD: jax.Array, label_B: jax.Array | None = None) -> jax.Array:
        return project(self.features(x_BD), self.out, self.embed_KF, label_B, "mlp discriminator")


# ----------------------------------------------------------------------------- images


class ConvGenerator(nnx.Module):
    """Images [B, H, W, C] in [−1, 1] (tanh). ``channels`` run from the full resolution
    down, as the discriminator's: the generator starts from the last (H / 2^(n−1))."""

    def __init__(
        self,
        latent: int,
        shape: tuple[int, int, int],
        channels: tuple[int, ...],
        groups: int,
        num_classes: int,
        *,
        rngs: nnx.Rngs,
    ):
        (H, W, C), scale = shape, 2 ** (len(channels) - 1)
        Z, c0 = latent, channels[-1]
        self.embed_KZ = label_table(rngs, num_classes, Z, None, 1.0)  # z's scale
        fan_in = Z + (Z if num_classes else 0)
        axes = (None, None, None, "channels")
        self.w_in_ZHWC = linear(rngs, fan_in, (fan_in, H // scale, W // scale, c0), axes)
        self.b_in_HWC = zeros((H // scale, W // scale, c0), axes[1:])
        up = channels[::-1]  # lowest resolution first
        self.norms = nnx.List([GroupNorm(c, groups) for c in up[:-1]])
        self.convs = nnx.List([Conv(ci, co, rngs=rngs) for ci, co in itertools.pairwise(up)])
        self.norm_out = GroupNorm(channels[0], groups)
        self.conv_out = Conv(channels[0], C, axes_io=("channels_in", None), rngs=rngs)

    def __call__(self, z_BZ: jax.Array, label_B: jax.Array | None = None) -> jax.Array:
        z_BZ = with_label(z_BZ, self.embed_KZ, label_B, "conv generator")
        h_BHWC = einsum("BZ,ZHWC->BHWC", z_BZ, self.w_in_ZHWC[...]) + self.b_in_HWC[...]
        for norm, conv in zip(self.norms, self.convs, strict=True):
            h_BHWC = jax.nn.relu(norm(h_BHWC))
            h_BHWC = conv(jnp.repeat(jnp.repeat(h_BHWC, 2, axis=1), 2, axis=2))  # nearest ×2
        return jnp.tanh(self.conv_out(jax.nn.relu(self.norm_out(h_BHWC))))


class ConvDiscriminator(nnx.Module):
    """``shape`` is one (packed) input [H, W, M·C]: packs of M images side by side in
    the channels. No normalization layers: spectral normalization, where used, is the
    discriminator's normalization, and batch statistics would mix a batch's examples."""

    def __init__(
        self, shape: tuple[int, int, int], channels: tuple[int, ...], num_classes: int, *, rngs
    ):
        (H, W, C), scale = shape, 2 ** (len(channels) - 1)
        self.conv_in = Conv(C, channels[0], axes_io=(None, "channels"), rngs=rngs)
        pairs = itertools.pairwise(channels)
        self.convs = nnx.List([Conv(ci, co, stride=2, rngs=rngs) for ci, co in pairs])
        F = (H // scale) * (W // scale) * channels[-1]
        self.out = Dense(F, 1, ("features", None), rngs=rngs)
        self.embed_KF = label_table(rngs, num_classes, F, "features", 1 / math.sqrt(F))

    def features(self, x_BHWC: jax.Array) -> jax.Array:
        """φ(x) [B, F]: the last feature map, flattened."""
        h_BHWC = jax.nn.leaky_relu(self.conv_in(x_BHWC), 0.2)
        for conv in self.convs:
            h_BHWC = jax.nn.leaky_relu(conv(h_BHWC), 0.2)
        return h_BHWC.reshape(h_BHWC.shape[0], -1)

    def __call__(self, x_BHWC: jax.Array, label_B: jax.Array | None = None) -> jax.Array:
        phi_BF = self.features(x_BHWC)
        return project(phi_BF, self.out, self.embed_KF, label_B, "conv discriminator")
