"""What image denoisers are conditioned on, and the attention they share.

Glossary: B batch, T query tokens (image pixels or patches), S key tokens, L text
length, D query width, E embedding width (conditioning vector, text context), F
MLP hidden width or noise features, N heads, K head dim, V byte vocabulary (257).

    noise_features   fixed sines and cosines of the noise input (σ, ¼ ln σ or t)
    NoiseEmbedding   features → Linear → SiLU → Linear: the [B, E] vector every
                     residual block (U-Net) or adaLN modulation (DiT) reads
    LabelEmbedding   a class table with one extra row, ``null``, for classifier-free
                     guidance (condition dropout replaces labels with it)
    TextEncoder      a small bidirectional transformer over UTF-8 bytes; its output
                     is the context of ``CrossAttention``
    SelfAttention,   non-causal multi-head attention by one einsum softmax
    CrossAttention   (``attend``): the fastest formulation on CPU at these sizes

Text is bytes: token id = byte + 1, 0 is padding, so the null text of guidance is
the empty string (all padding). Padding keys are masked everywhere, and a query
row whose every key is padding gets exactly 0 from ``attend``: the null text then
adds nothing to the image stream.

Logical axes of the parameters here: "embed" (E, or the width D of a DiT), "mlp"
(F), "heads" (N), "head_dim" (K), "vocab" (table rows), "seq" (text positions);
the U-Net passes "channels" as the query width axis of its attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from genjax.nn.layers import einsum, param, projections

VOCAB = 257  # UTF-8 bytes + 1; id 0 is padding
PAD = 0


def zeros(shape: Sequence[int], axes: tuple) -> nnx.Param:
    """A zero-initialized parameter (outputs and gates that start as identity)."""
    return nnx.Param(jnp.zeros(shape, jnp.float32), axes=axes)


def linear(rngs: nnx.Rngs, fan_in: int, shape: Sequence[int], axes: tuple, zero: bool = False):
    """A projection weight of ``shape`` reading ``fan_in`` inputs: std 1/√fan_in, or zeros."""
    if zero:
        return zeros(shape, axes)
    return param(rngs, shape, axes, 1 / math.sqrt(fan_in), "float32")


# ----------------------------------------------------------------------------- noise, labels


def noise_features(noise_B: jax.Array, dim: int, max_frequency: float = 1000.0) -> jax.Array:
    """[B, dim] sines and cosines of the noise input at frequencies from 1 to
    ``max_frequency``, geometrically spaced: fine enough for t in [0, 1] and for
    ¼ ln σ alike."""
    half = dim // 2
    freqs_K = jnp.exp(jnp.linspace(0.0, math.log(max_frequency), half))
    angles_BK = noise_B[:, None].astype(jnp.float32) * freqs_K
    return jnp.concatenate([jnp.sin(angles_BK), jnp.cos(angles_BK)], axis=-1)


class NoiseEmbedding(nnx.Module):
    """noise [B] → ``features`` sinusoids → Linear → SiLU → Linear → [B, E]."""

    def __init__(self, features: int, embed: int, *, rngs: nnx.Rngs):
        F, M, E = features, embed, embed  # M: the hidden width, E as in DDPM
        self.features = features
        self.w_in_FM = linear(rngs, F, (F, M), (None, "mlp"))
        self.b_in_M = zeros((M,), ("mlp",))
        self.w_out_ME = linear(rngs, M, (M, E), ("mlp", "embed"))
        self.b_out_E = zeros((E,), ("embed",))

    def __call__(self, noise_B: jax.Array) -> jax.Array:
        f_BF = noise_features(noise_B, self.features)
        h_BM = jax.nn.silu(einsum("BF,FM->BM", f_BF, self.w_in_FM[...]) + self.b_in_M[...])
        return einsum("BM,ME->BE", h_BM, self.w_out_ME[...]) + self.b_out_E[...]


class LabelEmbedding(nnx.Module):
    """label [B] → [B, E]; row ``null`` (= num_classes) is the unconditional label."""

    def __init__(self, num_classes: int, embed: int, *, rngs: nnx.Rngs):
        self.null = num_classes
        self.table_CE = param(rngs, (num_classes + 1, embed), ("vocab", "embed"), 1.0, "float32")

    def __call__(self, label_B: jax.Array) -> jax.Array:
        return jnp.take(self.table_CE[...], label_B, axis=0)


def label_vector(embed: LabelEmbedding | None, label_B, batch: int, who: str) -> jax.Array:
    """[B, E] embedding of the labels (None: the null label), or 0 for a network
    built without labels (num_classes=0), which refuses labels."""
    if embed is None:
        if label_B is not None:
            raise ValueError(f"{who}: got labels but the config has num_classes=0")
        return jnp.zeros((), jnp.float32)
    if label_B is None:
        label_B = jnp.full((batch,), embed.null, jnp.int32)
    return embed(label_B)


# ----------------------------------------------------------------------------- layers


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Normalizes the last axis to zero mean, unit variance (no scale, no shift)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int):
        self.scale_D = nnx.Param(jnp.ones((dim,), jnp.float32), axes=("embed",))
        self.bias_D = zeros((dim,), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, 1e-5) * self.scale_D[...] + self.bias_D[...]


class MLP(nnx.Module):
    """Linear → GELU → Linear over the last axis (the transformer feed-forward)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        D, F = dim, hidden
        self.w_in_DF = linear(rngs, D, (D, F), ("embed", "mlp"))
        self.b_in_F = zeros((F,), ("mlp",))
        self.w_out_FD = linear(rngs, F, (F, D), ("mlp", "embed"))
        self.b_out_D = zeros((D,), ("embed",))

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        h_BTF = jax.nn.gelu(einsum("BTD,DF->BTF", x_BTD, self.w_in_DF[...]) + self.b_in_F[...])
        return einsum("BTF,FD->BTD", h_BTF, self.w_out_FD[...]) + self.b_out_D[...]


# ----------------------------------------------------------------------------- attention


def attend(q_BTNK, k_BSNK, v_BSNK, mask_BS: jax.Array | None = None) -> jax.Array:
    """Softmax attention of every query over every unmasked key; [B, T, N, K].

    A query whose keys are all masked gets exactly 0 (its softmax over -1e30s is
    uniform and finite, then zeroed), so fully padded text contributes nothing.
    """
    K = q_BTNK.shape[-1]
    scores_BNTS = jnp.einsum("BTNK,BSNK->BNTS", q_BTNK * K**-0.5, k_BSNK)
    if mask_BS is None:
        return jnp.einsum("BNTS,BSNK->BTNK", jax.nn.softmax(scores_BNTS, axis=-1), v_BSNK)
    mask_B11S = mask_BS[:, None, None, :]
    probs_BNTS = jax.nn.softmax(jnp.where(mask_B11S, scores_BNTS, -1e30), axis=-1)
    any_key_B111 = jnp.any(mask_BS, axis=-1)[:, None, None, None]
    return jnp.einsum("BNTS,BSNK->BTNK", jnp.where(any_key_B111, probs_BNTS, 0.0), v_BSNK)


class SelfAttention(nnx.Module):
    """Non-causal multi-head self-attention over tokens [B, T, D], with biases;
    ``axis`` names D ("embed" in a transformer, "channels" in a U-Net)."""

    def __init__(self, dim: int, heads: int, *, axis: str, zero_out: bool, rngs: nnx.Rngs):
        D, N, K = dim, heads, dim // heads
        qkv_axes = (axis, "heads", "head_dim")
        self.w_q_DNK, self.w_k_DNK, self.w_v_DNK = (
            linear(rngs, D, (D, N, K), qkv_axes) for _ in range(3)
        )
        self.b_q_NK, self.b_k_NK, self.b_v_NK = (
            zeros((N, K), ("heads", "head_dim")) for _ in range(3)
        )
        self.w_o_NKD = linear(rngs, D, (N, K, D), ("heads", "head_dim", axis), zero=zero_out)
        self.b_o_D = zeros((D,), (axis,))

    def __call__(self, x_BTD: jax.Array, mask_BT: jax.Array | None = None) -> jax.Array:
        q, k, v = projections(
            "BTD,DNK->BTNK", x_BTD, self.w_q_DNK[...], self.w_k_DNK[...], self.w_v_DNK[...]
        )
        out_BTNK = attend(q + self.b_q_NK[...], k + self.b_k_NK[...], v + self.b_v_NK[...], mask_BT)
        return einsum("BTNK,NKD->BTD", out_BTNK, self.w_o_NKD[...]) + self.b_o_D[...]


class CrossAttention(nnx.Module):
    """Queries from image tokens [B, T, D], keys and values from a context [B, S, E]
    with its padding mask [B, S]. No biases: a query row with no unmasked key
    returns exactly 0."""

    def __init__(
        self, dim: int, context_dim: int, heads: int, *, axis: str, zero_out: bool, rngs: nnx.Rngs
    ):
        D, E, N, K = dim, context_dim, heads, dim // heads
        self.w_q_DNK = linear(rngs, D, (D, N, K), (axis, "heads", "head_dim"))
        self.w_k_ENK, self.w_v_ENK = (
            linear(rngs, E, (E, N, K), ("embed", "heads", "head_dim")) for _ in range(2)
        )
        self.w_o_NKD = linear(rngs, D, (N, K, D), ("heads", "head_dim", axis), zero=zero_out)

    def __call__(self, x_BTD, context_BSE, mask_BS) -> jax.Array:
        q_BTNK = einsum("BTD,DNK->BTNK", x_BTD, self.w_q_DNK[...])
        k, v = projections("BSE,ENK->BSNK", context_BSE, self.w_k_ENK[...], self.w_v_ENK[...])
        return einsum("BTNK,NKD->BTD", attend(q_BTNK, k, v, mask_BS), self.w_o_NKD[...])


# ----------------------------------------------------------------------------- text


def encode_text(strings: Sequence[str], max_len: int) -> np.ndarray:
    """int32 [B, max_len] token ids: UTF-8 bytes + 1, zero padded on the right."""
    out = np.zeros((len(strings), max_len), np.int32)
    for i, s in enumerate(strings):
        data = s.encode("utf-8")
        if len(data) > max_len:
            raise ValueError(
                f"text {s!r} is {len(data)} UTF-8 bytes; the text encoder reads at most {max_len}"
            )
        out[i, : len(data)] = np.frombuffer(data, np.uint8).astype(np.int32) + 1
    return out


class TextBlock(nnx.Module):
    """Pre-norm transformer block: masked self-attention, then the MLP."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        self.norm_attn = LayerNorm(width)
        self.attn = SelfAttention(width, heads, axis="embed", zero_out=False, rngs=rngs)
        self.norm_mlp = LayerNorm(width)
        self.mlp = MLP(width, 4 * width, rngs=rngs)

    def __call__(self, x_BLE: jax.Array, mask_BL: jax.Array) -> jax.Array:
        x_BLE = x_BLE + self.attn(self.norm_attn(x_BLE), mask_BL)
        return x_BLE + self.mlp(self.norm_mlp(x_BLE))


class TextEncoder(nnx.Module):
    """Byte tokens [B, L] (L <= max_len) → (context [B, L, E], mask [B, L]).

    Bidirectional: every token attends to every non-padding token, so the
    context of a real token does not depend on how much padding follows.
    """

    def __init__(self, width: int, max_len: int, heads: int, layers: int = 2, *, rngs: nnx.Rngs):
        self.max_len = max_len
        self.tokens_VE = param(rngs, (VOCAB, width), ("vocab", "embed"), 0.02, "float32")
        self.positions_LE = param(rngs, (max_len, width), ("seq", "embed"), 0.02, "float32")
        self.blocks = nnx.List([TextBlock(width, heads, rngs=rngs) for _ in range(layers)])
        self.norm_out = LayerNorm(width)

    def __call__(self, text_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
        L = text_BL.shape[1]
        if L > self.max_len:
            raise ValueError(f"text of {L} tokens; the text encoder reads at most {self.max_len}")
        mask_BL = text_BL != PAD
        x_BLE = jnp.take(self.tokens_VE[...], text_BL, axis=0) + self.positions_LE[:L]
        for block in self.blocks:
            x_BLE = block(x_BLE, mask_BL)
        return self.norm_out(x_BLE), mask_BL


def text_context(encoder: TextEncoder | None, text_BL, who: str):
    """(context [B, L, E], mask [B, L]) of the text, or None for no text (the null
    text: cross-attention would add exactly 0) or a network built without text."""
    if encoder is None:
        if text_BL is not None:
            raise ValueError(f"{who}: got text but the config has text=False")
        return None
    return None if text_BL is None else encoder(text_BL)
