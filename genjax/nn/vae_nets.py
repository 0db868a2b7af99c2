"""Encoders and decoders of a VAE: MLPs for any data shape, small convnets for images.

Glossary: B batch, D data dimensions (flattened), Z latent, I O a dense layer's
input and output widths, H W C an image's height, width and channels (h w the
half-size feature map), F feature channels, P likelihood parameters per data
dimension (1 Gaussian mean; 2 a logistic's mean and log-scale; L level logits).

    encoder(x [B, ...]) -> (mean [B, Z], logvar [B, Z]) of q(z|x) = N(mean, e^logvar)
    decoder(z [B, Z])   -> [B, ..., P], the likelihood's parameters per data dimension

The conv pair, for H×W×C images with even sides (8×8×1 digits):

    encoder  conv 3×3 C→F ─▶ res F ─▶ conv 3×3 stride 2 F→2F ─▶ res 2F ─▶ GroupNorm, SiLU
             ─▶ two projections of the h×w×2F map: mean, logvar
    decoder  projection to h×w×2F ─▶ res 2F ─▶ nearest ×2, conv 3×3 2F→F ─▶ res F
             ─▶ GroupNorm, SiLU ─▶ conv 3×3 F→C·P (zero-initialized)

``Conv`` and ``GroupNorm`` are the U-Net's. Its ``ResBlock`` adds a noise
embedding between its convolutions; nothing conditions a VAE's nets, so ``Res``
is that block without the embedding.

Logical axes: "hidden" (an MLP width; "hidden_in" where it is a layer's input),
"latent" (Z), and the U-Net's "conv_h", "conv_w", "channels_in", "channels".
Data dimensions (the first layer's input, the last one's output) are None.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from genjax.nn.conditioning import linear, zeros
from genjax.nn.layers import einsum
from genjax.nn.unet import Conv, GroupNorm


class Dense(nnx.Module):
    """x [..., I] @ w [I, O] + b [O]."""

    def __init__(self, fan_in: int, fan_out: int, axes: tuple, *, rngs: nnx.Rngs):
        self.w_IO = linear(rngs, fan_in, (fan_in, fan_out), axes)
        self.b_O = zeros((fan_out,), axes[1:])

    def __call__(self, x_BI: jax.Array) -> jax.Array:
        return einsum("BI,IO->BO", x_BI, self.w_IO[...]) + self.b_O[...]


def _hidden_stack(fan_in: int, hidden: Sequence[int], first_axis, *, rngs) -> nnx.List:
    """Dense layers fan_in → hidden[0] → … → hidden[-1] (SiLU after each, in ``_run``)."""
    widths = [fan_in, *hidden]
    axes = [(first_axis, "hidden")] + [("hidden_in", "hidden")] * (len(hidden) - 1)
    return nnx.List(
        [Dense(i, o, a, rngs=rngs) for i, o, a in zip(widths, widths[1:], axes, strict=False)]
    )


def _run(layers: nnx.List, h: jax.Array) -> jax.Array:
    for layer in layers:
        h = jax.nn.silu(layer(h))
    return h


class MLPEncoder(nnx.Module):
    """x [B, *shape] → flattened → SiLU MLP of widths ``hidden`` → (mean, logvar) [B, Z].

    With ``hidden=()`` both outputs are affine in x (probabilistic PCA's posterior)."""

    def __init__(self, shape: Sequence[int], hidden: Sequence[int], latent: int, *, rngs):
        D, Z = math.prod(shape), latent
        self.layers = _hidden_stack(D, hidden, None, rngs=rngs)
        H, axis = (hidden[-1], "hidden") if hidden else (D, None)
        self.mean = Dense(H, Z, (axis, "latent"), rngs=rngs)
        self.logvar = Dense(H, Z, (axis, "latent"), rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h_BH = _run(self.layers, x.reshape(x.shape[0], -1))
        return self.mean(h_BH), self.logvar(h_BH)


class MLPDecoder(nnx.Module):
    """z [B, Z] → SiLU MLP of widths ``hidden`` → [B, *shape, P]; affine with ``hidden=()``."""

    def __init__(
        self, latent: int, hidden: Sequence[int], shape: Sequence[int], params: int, *, rngs
    ):
        D, Z = math.prod(shape), latent
        self.shape, self.params = tuple(shape), params
        self.layers = _hidden_stack(Z, hidden, "latent", rngs=rngs)
        H, axis = (hidden[-1], "hidden") if hidden else (Z, "latent")
        self.out = Dense(H, D * params, (axis, None), rngs=rngs)

    def __call__(self, z_BZ: jax.Array) -> jax.Array:
        out_BO = self.out(_run(self.layers, z_BZ))
        return out_BO.reshape(z_BZ.shape[0], *self.shape, self.params)


class Res(nnx.Module):
    """GroupNorm → SiLU → conv → GroupNorm → SiLU → conv (zero-initialized), added to the
    input: a residual block that starts as the identity."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(channels, groups)
        self.conv1 = Conv(channels, channels, rngs=rngs)
        self.norm2 = GroupNorm(channels, groups)
        self.conv2 = Conv(channels, channels, zero=True, rngs=rngs)

    def __call__(self, x_BHWF: jax.Array) -> jax.Array:
        h_BHWF = self.conv1(jax.nn.silu(self.norm1(x_BHWF)))
        return x_BHWF + self.conv2(jax.nn.silu(self.norm2(h_BHWF)))


def _check_image_shape(shape: Sequence[int], who: str) -> tuple[int, int, int]:
    if len(shape) != 3 or shape[0] % 2 or shape[1] % 2:
        raise ValueError(f"{who}: needs images [H, W, C] with even H and W; got shape {shape}")
    return tuple(shape)


class ConvEncoder(nnx.Module):
    """x [B, H, W, C] → (mean, logvar) [B, Z], through a half-size map of 2F channels."""

    def __init__(self, shape: Sequence[int], channels: int, groups: int, latent: int, *, rngs):
        H, W, C = _check_image_shape(shape, "conv encoder")
        F, Z = channels, latent
        self.conv_in = Conv(C, F, axes_io=(None, "channels"), rngs=rngs)
        self.res1 = Res(F, groups, rngs=rngs)
        self.down = Conv(F, 2 * F, stride=2, rngs=rngs)
        self.res2 = Res(2 * F, groups, rngs=rngs)
        self.norm = GroupNorm(2 * F, groups)
        shape_hwFZ = (H // 2, W // 2, 2 * F, Z)
        axes = (None, None, "channels", "latent")
        fan_in = math.prod(shape_hwFZ[:3])
        self.w_mean_hwFZ = linear(rngs, fan_in, shape_hwFZ, axes)
        self.w_logvar_hwFZ = linear(rngs, fan_in, shape_hwFZ, axes)
        self.b_mean_Z = zeros((Z,), ("latent",))
        self.b_logvar_Z = zeros((Z,), ("latent",))

    def __call__(self, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        h_BHWF = self.res1(self.conv_in(x_BHWC))
        h_BhwF = jax.nn.silu(self.norm(self.res2(self.down(h_BHWF))))
        mean_BZ = einsum("BhwF,hwFZ->BZ", h_BhwF, self.w_mean_hwFZ[...]) + self.b_mean_Z[...]
        logvar = einsum("BhwF,hwFZ->BZ", h_BhwF, self.w_logvar_hwFZ[...]) + self.b_logvar_Z[...]
        return mean_BZ, logvar


class ConvDecoder(nnx.Module):
    """z [B, Z] → [B, H, W, C, P]: the encoder's path in reverse (nearest ×2 upsampling)."""

    def __init__(
        self, latent: int, channels: int, groups: int, shape: Sequence[int], params: int, *, rngs
    ):
        H, W, C = _check_image_shape(shape, "conv decoder")
        F, Z = channels, latent
        self.params = params
        self.w_in_ZhwF = linear(
            rngs, Z, (Z, H // 2, W // 2, 2 * F), ("latent", None, None, "channels")
        )
        self.b_in_F = zeros((2 * F,), ("channels",))
        self.res2 = Res(2 * F, groups, rngs=rngs)
        self.up = Conv(2 * F, F, rngs=rngs)
        self.res1 = Res(F, groups, rngs=rngs)
        self.norm = GroupNorm(F, groups)
        # Zero: the decoder starts at the likelihood's widest setting (zero logits are
        # uniform over the levels; a logistic of scale 1 covers [−1, 1]), as ADM's output.
        self.conv_out = Conv(F, C * params, axes_io=("channels_in", None), zero=True, rngs=rngs)

    def __call__(self, z_BZ: jax.Array) -> jax.Array:
        h_BhwF = self.res2(einsum("BZ,ZhwF->BhwF", z_BZ, self.w_in_ZhwF[...]) + self.b_in_F[...])
        h_BHWF = jnp.repeat(jnp.repeat(h_BhwF, 2, axis=1), 2, axis=2)  # nearest ×2
        h_BHWF = self.res1(self.up(h_BHWF))
        out = self.conv_out(jax.nn.silu(self.norm(h_BHWF)))
        return out.reshape(*out.shape[:3], -1, self.params)
