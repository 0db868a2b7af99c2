"""A DDPM/ADM-style U-Net denoiser for images [B, H, W, C].

Glossary: B batch, H W height and width, C channels (I input channels of a
convolution), E conditioning width, T = H·W pixels as attention tokens, L text
length.

    conv 3×3 ─▶ per level (``channel_mult``): ``num_res_blocks`` × [res block (+ attention)]
             ─▶ 3×3 stride-2 conv between levels
    middle: res block, attention, res block
    up path, per level from the lowest: ``num_res_blocks + 1`` × [concat skip ─▶ res block
             (+ attention)] ─▶ nearest ×2 + conv 3×3
    GroupNorm ─▶ SiLU ─▶ conv 3×3 (zero-initialized)

Every res block adds a projection of c = noise embedding (+ label embedding)
between its two convolutions. Attention runs at the feature-map sides in
``attention_levels``; with ``text`` each attention is followed by cross-attention
on the ``TextEncoder`` context. The last conv of every res block, every attention
output and the network's output start at zero (ADM): each block starts as the
identity and the network as 0. The default is Hugging Face diffusers'
``UNet2DModel(block_out_channels=(32, 64), layers_per_block=1, down_block_types=
("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
norm_num_groups=8)`` layer for layer: 701,345 parameters for 1-channel images.

Logical axes, and the rule each is meant for (the table is the family's):

    "conv_h", "conv_w"   kernel rows and columns                 None
    "channels_in"        a convolution's input channels          None
    "channels"           feature channels (outputs, norms)       "fsdp"
    "embed"              conditioning / text width E             "fsdp"
    "heads", "head_dim"  attention                               "tensor", None
    "mlp"                hidden of the noise embedding           "tensor"
    "vocab", "seq"       table rows, text positions              None

Image channels (the input of the first conv, the output of the last) are None.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from genjax.nn.conditioning import (
    CrossAttention,
    LabelEmbedding,
    NoiseEmbedding,
    SelfAttention,
    TextEncoder,
    label_vector,
    linear,
    text_context,
    zeros,
)
from genjax.nn.layers import einsum


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    image_channels: int = 1
    channels: int = 32  # channels of the first level; level i has channels · channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2)  # one entry per resolution: 8×8 and 4×4 here
    num_res_blocks: int = 1  # per level on the way down (one more on the way up)
    attention_levels: tuple[int, ...] = (1,)  # levels with self-attention (0: full size)
    groups: int = 8  # GroupNorm groups
    embed: int = 128  # conditioning width E (4 × channels, as DDPM)
    heads: int = 4  # of every attention (the text encoder's too)
    num_classes: int = 0  # 0: no label input; else labels 0..num_classes-1 (+ null)
    text: bool = False  # cross-attention on byte text
    text_width: int = 64
    text_len: int = 8  # bytes

    def __post_init__(self):
        for name in ("image_channels", "channels", "num_res_blocks", "groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"unet config: {name}={getattr(self, name)} must be >= 1")
        for name in ("embed", "heads", "text_width", "text_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"unet config: {name}={getattr(self, name)} must be >= 1")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"unet config: channel_mult={self.channel_mult} needs entries >= 1")
        if self.num_classes < 0:
            raise ValueError(f"unet config: num_classes={self.num_classes} must be >= 0")
        if self.channels % 2:
            raise ValueError(f"unet config: channels={self.channels} must be even")
        for level in self.attention_levels:
            if not 0 <= level < len(self.channel_mult):
                raise ValueError(
                    f"unet config: attention level {level} does not exist; the levels are "
                    f"0..{len(self.channel_mult) - 1}, one per channel_mult entry"
                )
        for mult in self.channel_mult:
            c = self.channels * mult
            if c % self.groups:
                raise ValueError(f"unet config: groups={self.groups} must divide {c} channels")
            if c % self.heads:
                raise ValueError(f"unet config: heads={self.heads} must divide {c} channels")
        if self.channels % self.groups:  # the stem's output, the first skip, is normed too
            raise ValueError(
                f"unet config: groups={self.groups} must divide channels={self.channels}"
            )
        if self.text and self.text_width % self.heads:
            raise ValueError(
                f"unet config: heads={self.heads} must divide text_width={self.text_width}"
            )

    @property
    def downsampling(self) -> int:
        """How much smaller the lowest level is: image sides must divide by it."""
        return 2 ** (len(self.channel_mult) - 1)


# ----------------------------------------------------------------------------- layers


class Conv(nnx.Module):
    """A k×k convolution, NHWC activations and HWIO weights, padded k // 2 each side."""

    def __init__(
        self,
        cin: int,
        cout: int,
        *,
        kernel: int = 3,
        stride: int = 1,
        axes_io: tuple = ("channels_in", "channels"),
        zero: bool = False,
        rngs: nnx.Rngs,
    ):
        shape = (kernel, kernel, cin, cout)
        axes = ("conv_h", "conv_w", *axes_io)
        self.w_HWIC = linear(rngs, kernel * kernel * cin, shape, axes, zero=zero)
        self.b_C = zeros((cout,), (axes_io[1],))
        self.stride = stride

    def __call__(self, x_BHWI: jax.Array) -> jax.Array:
        pad = self.w_HWIC.shape[0] // 2
        y_BHWC = jax.lax.conv_general_dilated(
            x_BHWI,
            self.w_HWIC[...].astype(x_BHWI.dtype),
            window_strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y_BHWC + self.b_C[...]


class GroupNorm(nnx.Module):
    def __init__(self, channels: int, groups: int, eps: float = 1e-5):
        self.groups, self.eps = groups, eps
        self.scale_C = nnx.Param(jnp.ones((channels,), jnp.float32), axes=("channels",))
        self.bias_C = zeros((channels,), ("channels",))

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        B, H, W, C = x_BHWC.shape
        x_BHWGc = x_BHWC.reshape(B, H, W, self.groups, C // self.groups)
        mean = jnp.mean(x_BHWGc, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(x_BHWGc - mean), axis=(1, 2, 4), keepdims=True)
        x_BHWGc = (x_BHWGc - mean) * jax.lax.rsqrt(var + self.eps)
        return x_BHWGc.reshape(B, H, W, C) * self.scale_C[...] + self.bias_C[...]


class ResBlock(nnx.Module):
    """GroupNorm → SiLU → conv, + projection of SiLU(c), GroupNorm → SiLU → conv (zero),
    added to the input (through a 1×1 conv where the channels change)."""

    def __init__(self, cin: int, cout: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(cin, cfg.groups)
        self.conv1 = Conv(cin, cout, rngs=rngs)
        self.w_emb_EC = linear(rngs, cfg.embed, (cfg.embed, cout), ("embed", "channels"))
        self.b_emb_C = zeros((cout,), ("channels",))
        self.norm2 = GroupNorm(cout, cfg.groups)
        self.conv2 = Conv(cout, cout, zero=True, rngs=rngs)
        self.skip = Conv(cin, cout, kernel=1, rngs=rngs) if cin != cout else None

    def __call__(self, x_BHWI: jax.Array, c_BE: jax.Array) -> jax.Array:
        h_BHWC = self.conv1(jax.nn.silu(self.norm1(x_BHWI)))
        emb_BC = einsum("BE,EC->BC", jax.nn.silu(c_BE), self.w_emb_EC[...]) + self.b_emb_C[...]
        h_BHWC = h_BHWC + emb_BC[:, None, None, :]
        h_BHWC = self.conv2(jax.nn.silu(self.norm2(h_BHWC)))
        return (x_BHWI if self.skip is None else self.skip(x_BHWI)) + h_BHWC


class AttentionBlock(nnx.Module):
    """Self-attention over the H·W pixels, then (with text) cross-attention on the
    context; each pre-normed by a GroupNorm and added to the stream."""

    def __init__(self, channels: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
        C = channels
        self.norm = GroupNorm(C, cfg.groups)
        self.attn = SelfAttention(C, cfg.heads, axis="channels", zero_out=True, rngs=rngs)
        self.norm_cross = GroupNorm(C, cfg.groups) if cfg.text else None
        self.cross = (
            CrossAttention(C, cfg.text_width, cfg.heads, axis="channels", zero_out=True, rngs=rngs)
            if cfg.text
            else None
        )

    def __call__(self, x_BHWC: jax.Array, text: tuple | None) -> jax.Array:
        B, H, W, C = x_BHWC.shape
        x_BTC = x_BHWC.reshape(B, H * W, C)
        x_BTC = x_BTC + self.attn(self.norm(x_BHWC).reshape(B, H * W, C))
        if self.cross is not None and text is not None:
            h_BTC = self.norm_cross(x_BTC.reshape(B, H, W, C)).reshape(B, H * W, C)
            x_BTC = x_BTC + self.cross(h_BTC, *text)
        return x_BTC.reshape(B, H, W, C)


class Level(nnx.Module):
    """The res blocks of one resolution (each with its attention, if any), then a
    resampling conv: ×½ on the way down, ×2 on the way up, none at the ends."""

    def __init__(self, cins, cout, attention, resample, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.res = nnx.List([ResBlock(cin, cout, cfg, rngs=rngs) for cin in cins])
        attns = [AttentionBlock(cout, cfg, rngs=rngs) for _ in cins] if attention else []
        self.attn = nnx.List(attns)
        self.resample = resample
        stride = 2 if resample == "down" else 1
        self.conv = Conv(cout, cout, stride=stride, rngs=rngs) if resample else None

    def block(self, i: int, h_BHWC, c_BE, text) -> jax.Array:
        h_BHWC = self.res[i](h_BHWC, c_BE)
        return self.attn[i](h_BHWC, text) if len(self.attn) else h_BHWC

    def resize(self, h_BHWC: jax.Array) -> jax.Array:
        if self.resample == "up":
            h_BHWC = jnp.repeat(jnp.repeat(h_BHWC, 2, axis=1), 2, axis=2)  # nearest
        return h_BHWC if self.conv is None else self.conv(h_BHWC)


# ----------------------------------------------------------------------------- the network


class UNet(nnx.Module):
    """``unet(x [B, H, W, C], noise [B], label [B] | None, text [B, L] | None) -> [B, H, W, C]``.

    A label of None is the null label; a text of None is the null (empty) text, whose
    cross-attention adds exactly 0. H and W must divide by 2^(levels − 1).
    """

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        ch, levels = cfg.channels, len(cfg.channel_mult)
        self.noise_embed = NoiseEmbedding(ch, cfg.embed, rngs=rngs)
        self.label_embed = (
            LabelEmbedding(cfg.num_classes, cfg.embed, rngs=rngs) if cfg.num_classes else None
        )
        self.text_encoder = (
            TextEncoder(cfg.text_width, cfg.text_len, cfg.heads, rngs=rngs) if cfg.text else None
        )
        axes_in = (None, "channels")  # image channels are never sharded
        self.conv_in = Conv(cfg.image_channels, ch, axes_io=axes_in, rngs=rngs)

        skips, down, c = [ch], [], ch  # channels of every skip the up path concatenates
        for i, mult in enumerate(cfg.channel_mult):
            cout, attention = ch * mult, i in cfg.attention_levels
            cins = [c] + [cout] * (cfg.num_res_blocks - 1)
            last = i == levels - 1
            down.append(Level(cins, cout, attention, None if last else "down", cfg, rngs=rngs))
            c = cout
            skips += [cout] * (cfg.num_res_blocks + (0 if last else 1))
        self.down = nnx.List(down)

        self.mid_res1 = ResBlock(c, c, cfg, rngs=rngs)
        self.mid_attn = AttentionBlock(c, cfg, rngs=rngs)
        self.mid_res2 = ResBlock(c, c, cfg, rngs=rngs)

        up = []
        for i in reversed(range(levels)):
            cout, attention = ch * cfg.channel_mult[i], i in cfg.attention_levels
            cins = []
            for _ in range(cfg.num_res_blocks + 1):
                cins.append(c + skips.pop())
                c = cout
            up.append(Level(cins, cout, attention, "up" if i else None, cfg, rngs=rngs))
        self.up = nnx.List(up)

        self.norm_out = GroupNorm(c, cfg.groups)
        axes_out = ("channels_in", None)
        self.conv_out = Conv(c, cfg.image_channels, axes_io=axes_out, zero=True, rngs=rngs)

    def __call__(
        self,
        x_BHWC: jax.Array,
        noise_B: jax.Array,
        label_B: jax.Array | None = None,
        text_BL: jax.Array | None = None,
    ) -> jax.Array:
        c_BE, text = self.conditioning(noise_B, label_B, text_BL)
        scale = 2 ** (len(self.down) - 1)
        if x_BHWC.shape[1] % scale or x_BHWC.shape[2] % scale:
            raise ValueError(f"unet: image sides {x_BHWC.shape[1:3]} must divide by {scale}")
        h_BHWC = self.conv_in(x_BHWC)
        skips = [h_BHWC]
        for level in self.down:
            for i in range(len(level.res)):
                h_BHWC = level.block(i, h_BHWC, c_BE, text)
                skips.append(h_BHWC)
            if level.conv is not None:
                h_BHWC = level.resize(h_BHWC)
                skips.append(h_BHWC)
        h_BHWC = self.mid_res2(self.mid_attn(self.mid_res1(h_BHWC, c_BE), text), c_BE)
        for level in self.up:
            for i in range(len(level.res)):
                h_BHWC = jnp.concatenate([h_BHWC, skips.pop()], axis=-1)
                h_BHWC = level.block(i, h_BHWC, c_BE, text)
            h_BHWC = level.resize(h_BHWC)
        return self.conv_out(jax.nn.silu(self.norm_out(h_BHWC)))

    def conditioning(self, noise_B: jax.Array, label_B, text_BL):
        """(c [B, E], (context [B, L, E], mask [B, L]) or None) of these inputs."""
        c_BE = self.noise_embed(noise_B)
        c_BE = c_BE + label_vector(self.label_embed, label_B, noise_B.shape[0], "unet")
        return c_BE, text_context(self.text_encoder, text_BL, "unet")
