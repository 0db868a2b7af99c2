"""A noise-conditioned MLP: the denoiser network of low-dimensional data (2-D mixtures,
a VAE's latents).

Glossary: B batch, D data dimensions, H hidden width, E noise-embedding width.

The noise input (EDM's c_noise = ¼ ln σ, or the diffusion time t) enters as
fixed sinusoidal features (``conditioning.noise_features``), plus a learned class
embedding when the network has classes, mapped to every hidden layer's width and
added before its activation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from genjax.nn.conditioning import LabelEmbedding, label_vector, noise_features
from genjax.nn.layers import einsum, param


class NoiseMLP(nnx.Module):
    def __init__(
        self, dim: int, hidden: int, layers: int, embed: int, num_classes: int = 0,
        *, rngs: nnx.Rngs,
    ):  # fmt: skip
        D, H, E = dim, hidden, embed
        self.embed = embed
        # num_classes = 0: no label input; else labels 0..num_classes-1 and the null label.
        self.label_embed = LabelEmbedding(num_classes, E, rngs=rngs) if num_classes else None
        self.w_in_DH = param(rngs, (D, H), (None, "hidden"), 1 / math.sqrt(D), "float32")
        self.w_noise_LEH = param(
            rngs, (layers, E, H), ("layers", None, "hidden"), 1 / math.sqrt(E), "float32"
        )
        self.w_hidden_LHH = param(
            rngs, (layers - 1, H, H), ("layers", "hidden_in", "hidden"), 1 / math.sqrt(H), "float32"
        )
        self.b_LH = nnx.Param(jnp.zeros((layers, H)), axes=("layers", "hidden"))
        self.w_out_HD = param(rngs, (H, D), ("hidden", None), 1e-3 / math.sqrt(H), "float32")
        self.b_out_D = nnx.Param(jnp.zeros((D,)), axes=(None,))

    def __call__(
        self, x_BD: jax.Array, noise_B: jax.Array, label_B: jax.Array | None = None
    ) -> jax.Array:
        emb_BE = noise_features(noise_B, self.embed)
        emb_BE = emb_BE + label_vector(self.label_embed, label_B, x_BD.shape[0], "noise mlp")
        noise_BLH = jnp.einsum("BE,LEH->BLH", emb_BE, self.w_noise_LEH[...])
        pre_BH = einsum("BD,DH->BH", x_BD, self.w_in_DH[...]) + noise_BLH[:, 0] + self.b_LH[0]
        h_BH = jax.nn.silu(pre_BH)
        for layer in range(1, noise_BLH.shape[1]):
            w_HH = self.w_hidden_LHH[layer - 1]
            pre_BH = einsum("BH,HK->BK", h_BH, w_HH) + noise_BLH[:, layer] + self.b_LH[layer]
            h_BH = jax.nn.silu(pre_BH)
        return einsum("BH,HD->BD", h_BH, self.w_out_HD[...]) + self.b_out_D[...]
