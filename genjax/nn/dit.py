"""A diffusion transformer (DiT, Peebles & Xie 2023) denoiser for images [B, H, W, C].

Glossary: B batch, H W height and width, C image channels, P patch side, T =
(H/P)·(W/P) tokens, D width, F MLP hidden width, N heads, K head dim, L text
length, E text width.

    patchify (P×P×C → D linear) + fixed 2-D sin-cos positions
    depth × block:  x += gate₁ · attn(modulate(LN x, shift₁, scale₁))
                    x += cross-attn(LN x, text)                      (with text)
                    x += gate₂ · mlp(modulate(LN x, shift₂, scale₂))
    final: linear(modulate(LN x, shift, scale)) → unpatchify

adaLN-Zero: shift, scale and gate come from c = noise embedding (+ label
embedding) by a zero-initialized linear of SiLU(c), so every block starts as
the identity; the final linear starts at zero (the network starts as 0), and so
does each cross-attention's output projection (PixArt-α).

Logical axes and their intended rules: "embed" (D, E) "fsdp"; "heads" and
"mlp" "tensor"; "head_dim", "vocab", "seq" None. Patch pixels and the six
modulation chunks are None.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from genjax.nn.conditioning import (
    MLP,
    CrossAttention,
    LabelEmbedding,
    NoiseEmbedding,
    SelfAttention,
    TextEncoder,
    label_vector,
    layer_norm,
    linear,
    text_context,
    zeros,
)
from genjax.nn.layers import einsum


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    image_channels: int = 1
    patch: int = 2  # P: an 8×8 image is 16 tokens
    width: int = 128  # D
    depth: int = 4  # blocks
    heads: int = 4  # of every attention (the text encoder's too)
    mlp_ratio: int = 4  # F = mlp_ratio · D
    num_classes: int = 0  # 0: no label input; else labels 0..num_classes-1 (+ null)
    text: bool = False  # cross-attention on byte text
    text_width: int = 64
    text_len: int = 8  # bytes

    def __post_init__(self):
        for name in ("image_channels", "patch", "width", "depth", "heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"dit config: {name}={getattr(self, name)} must be >= 1")
        if self.num_classes < 0:
            raise ValueError(f"dit config: num_classes={self.num_classes} must be >= 0")
        if self.width % self.heads:
            raise ValueError(f"dit config: heads={self.heads} must divide width={self.width}")
        if self.width % 4:
            raise ValueError(f"dit config: width={self.width} must divide by 4 (2-D sin-cos)")
        if self.text and (self.text_width < 1 or self.text_len < 1):
            raise ValueError("dit config: text_width and text_len must be >= 1")
        if self.text and self.text_width % self.heads:
            raise ValueError(
                f"dit config: heads={self.heads} must divide text_width={self.text_width}"
            )


def sincos_positions(rows: int, cols: int, dim: int) -> np.ndarray:
    """[rows·cols, dim] fixed 2-D positions, row-major: the first half of the
    features encodes the column, the second the row (as DiT's reference code)."""

    def one_axis(pos, d):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        angles = pos.reshape(-1)[:, None] * omega
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    row, col = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.concatenate([one_axis(col, dim // 2), one_axis(row, dim // 2)], 1).astype(np.float32)


def modulate(x_BTD, shift_BD, scale_BD) -> jax.Array:
    return x_BTD * (1 + scale_BD[:, None]) + shift_BD[:, None]


class Block(nnx.Module):
    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        D = cfg.width
        # SiLU(c) → (shift, scale, gate) of attention and of the MLP; zero: identity.
        self.w_mod_DSD = zeros((D, 6, D), ("embed", None, None))
        self.b_mod_SD = zeros((6, D), (None, None))
        self.attn = SelfAttention(D, cfg.heads, axis="embed", zero_out=False, rngs=rngs)
        self.cross = (
            CrossAttention(D, cfg.text_width, cfg.heads, axis="embed", zero_out=True, rngs=rngs)
            if cfg.text
            else None
        )
        self.mlp = MLP(D, cfg.mlp_ratio * D, rngs=rngs)

    def __call__(self, x_BTD: jax.Array, c_BD: jax.Array, text: tuple | None) -> jax.Array:
        mod_BSD = einsum("BD,DSE->BSE", jax.nn.silu(c_BD), self.w_mod_DSD[...])
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.unstack(
            mod_BSD + self.b_mod_SD[...], axis=1
        )
        h_BTD = self.attn(modulate(layer_norm(x_BTD), shift1, scale1))
        x_BTD = x_BTD + gate1[:, None] * h_BTD
        if self.cross is not None and text is not None:
            x_BTD = x_BTD + self.cross(layer_norm(x_BTD), *text)
        h_BTD = self.mlp(modulate(layer_norm(x_BTD), shift2, scale2))
        return x_BTD + gate2[:, None] * h_BTD


class DiT(nnx.Module):
    """``dit(x [B, H, W, C], noise [B], label [B] | None, text [B, L] | None) -> [B, H, W, C]``.

    A label of None is the null label; a text of None is the null (empty) text,
    whose cross-attention adds exactly 0. H and W must divide by the patch.
    """

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, P, C = cfg.width, cfg.patch, cfg.image_channels
        pixels = P * P * C
        self.w_patch_PD = linear(rngs, pixels, (pixels, D), (None, "embed"))
        self.b_patch_D = zeros((D,), ("embed",))
        self.noise_embed = NoiseEmbedding(D, D, rngs=rngs)
        self.label_embed = (
            LabelEmbedding(cfg.num_classes, D, rngs=rngs) if cfg.num_classes else None
        )
        self.text_encoder = (
            TextEncoder(cfg.text_width, cfg.text_len, cfg.heads, rngs=rngs) if cfg.text else None
        )
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.w_mod_DSD = zeros((D, 2, D), ("embed", None, None))  # final (shift, scale)
        self.b_mod_SD = zeros((2, D), (None, None))
        self.w_out_DP = zeros((D, pixels), ("embed", None))
        self.b_out_P = zeros((pixels,), (None,))

    def __call__(
        self,
        x_BHWC: jax.Array,
        noise_B: jax.Array,
        label_B: jax.Array | None = None,
        text_BL: jax.Array | None = None,
    ) -> jax.Array:
        B, H, W, C = x_BHWC.shape
        P = self.cfg.patch
        if H % P or W % P:
            raise ValueError(f"dit: image sides {(H, W)} must divide by the patch {P}")
        c_BD = self.noise_embed(noise_B) + label_vector(self.label_embed, label_B, B, "dit")
        text = text_context(self.text_encoder, text_BL, "dit")

        patches_BTP = (
            x_BHWC.reshape(B, H // P, P, W // P, P, C)
            .transpose(0, 1, 3, 2, 4, 5)
            .reshape(B, (H // P) * (W // P), P * P * C)
        )
        x_BTD = einsum("BTP,PD->BTD", patches_BTP, self.w_patch_PD[...]) + self.b_patch_D[...]
        x_BTD = x_BTD + sincos_positions(H // P, W // P, self.cfg.width)
        for block in self.blocks:
            x_BTD = block(x_BTD, c_BD, text)

        mod_BSD = einsum("BD,DSE->BSE", jax.nn.silu(c_BD), self.w_mod_DSD[...])
        shift, scale = jnp.unstack(mod_BSD + self.b_mod_SD[...], axis=1)
        h_BTD = modulate(layer_norm(x_BTD), shift, scale)
        out_BTP = einsum("BTD,DP->BTP", h_BTD, self.w_out_DP[...]) + self.b_out_P[...]
        return (
            out_BTP.reshape(B, H // P, W // P, P, P, C)
            .transpose(0, 1, 3, 2, 4, 5)
            .reshape(B, H, W, C)
        )
