"""Llama-style decoder-only transformer.

Glossary of shapes:
  B  batch                  T  query positions        S  key/value positions
  D  model width            N  query heads            G  key/value heads (GQA groups)
  R  query heads per group  K  head dim               F  SwiGLU hidden width
  V  vocabulary             L  layers

Pure entry points: ``init(cfg, key) -> params`` (a plain nested dict),
``param_axes(cfg)`` (the logical sharding axes of every parameter, mapped to
mesh axes by ``RULES``), ``forward(cfg, params, tokens) -> logits`` and
``loss(cfg, params, batch)``. The layers are NNX modules; parameters cross the
jit boundary as pure pytrees. Blocks are always stored stacked (a leading L
axis), so scan-over-layers and the plain layer loop run on the same parameters.
Decoding (the KV cache, its weight layouts) lives in ``genjax.sampling``; it
reaches attention through the ``cache`` argument of the layers.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from genjax import mesh as meshlib
from genjax.nn import attention
from genjax.nn.layers import RMSNorm, param, projections, rope

Params = dict[str, Any]

# Logical axis -> mesh axis. Parameters: FSDP shards the model width, tensor
# parallelism heads, the MLP hidden width and the vocabulary.
RULES: meshlib.Rules = {
    "batch": meshlib.BATCH_AXES,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "seq": None,
    "act_embed": None,
}


REMAT_POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 4096
    d_model: int = 384
    num_layers: int = 6
    num_heads: int = 6
    num_kv_heads: int = 6  # < num_heads gives grouped-query attention
    head_dim: int = 64
    ffn_dim: int = 1024  # SwiGLU hidden width
    max_seq_len: int = 256
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype; "bfloat16" on accelerators
    param_dtype: str = "float32"
    scan_layers: bool = False  # lax.scan over blocks: compile time flat in depth
    remat: bool = False  # recompute block activations in the backward pass
    # What remat keeps: "nothing" recomputes the whole block; "dots" keeps the
    # projection outputs and recomputes only elementwise ops and attention.
    remat_policy: str = "nothing"
    attn_block_size: int = 64  # query block of causal attention; 0 = one block
    # "auto": the Pallas splash kernel on a TPU, cuDNN flash attention on a GPU
    # in 16-bit compute, else "xla" (blocked einsum attention, genjax.nn.attention: the
    # fastest formulation measured on CPU).
    attention: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"model config: {name} must be positive, got {getattr(self, name)}"
                )
        for name in ("head_dim", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"model config: {name} must be positive, got {getattr(self, name)}"
                )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model config: num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim={self.head_dim} must be even for RoPE")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"model config: remat_policy={self.remat_policy!r}; choose one of "
                f"{sorted(REMAT_POLICIES)}"
            )
        if self.attention not in attention.IMPLEMENTATIONS:
            raise ValueError(
                f"model config: attention={self.attention!r}; choose auto, xla, cudnn or splash"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(
                    f"model config: {name}={getattr(self, name)!r} is not a float dtype"
                )


PRESETS: dict[str, Config] = {
    # Tests: a few thousand parameters' worth of everything, GQA exercised.
    "tiny": Config(
        vocab_size=512,
        d_model=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        ffn_dim=128,
        max_seq_len=64,
    ),
    # The benchmarks' configuration (experiments/benchmarks/README.md); the default on a laptop CPU.
    "cpu-small": Config(),
    # Accelerator presets (bf16 compute, scanned layers).
    "125m": Config(
        vocab_size=32_000,
        d_model=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=12,
        head_dim=64,
        ffn_dim=2560,
        max_seq_len=2048,
        dtype="bfloat16",
        scan_layers=True,
    ),
    # TinyLlama-1.1B shapes.
    "1b": Config(
        vocab_size=32_000,
        d_model=2048,
        num_layers=22,
        num_heads=32,
        num_kv_heads=4,
        head_dim=64,
        ffn_dim=5632,
        max_seq_len=2048,
        tie_embeddings=False,
        dtype="bfloat16",
        scan_layers=True,
        remat=True,
    ),
    # Llama-2-7B shapes.
    "7b": Config(
        vocab_size=32_000,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        ffn_dim=11_008,
        max_seq_len=4096,
        tie_embeddings=False,
        dtype="bfloat16",
        scan_layers=True,
        remat=True,
    ),
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


# ----------------------------------------------------------------------------- layers


def _constrain(x: jax.Array, axes: tuple) -> jax.Array:
    return meshlib.constrain(x, axes, RULES)


def attention_impl(cfg: Config, seq_len: int | None = None) -> str:
    """The attention implementation ``cfg.attention`` resolves to on this backend."""
    return attention.implementation(cfg.attention, cfg.dtype, seq_len)


class Attention(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        D, N, G, K = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std, pd = cfg.init_std, cfg.param_dtype
        self.wq_DNK = param(rngs, (D, N, K), ("embed", "heads", "head_dim"), std, pd)
        self.wk_DGK = param(rngs, (D, G, K), ("embed", "kv_heads", "head_dim"), std, pd)
        self.wv_DGK = param(rngs, (D, G, K), ("embed", "kv_heads", "head_dim"), std, pd)
        # Output projection scaled down with depth (GPT-2 style residual init).
        out_std = std / math.sqrt(2 * cfg.num_layers)
        self.wo_NKD = param(rngs, (N, K, D), ("heads", "head_dim", "embed"), out_std, pd)
        self.cfg = cfg

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, cache=None):
        """Causal self-attention; with a KV cache (``genjax.sampling.kv_cache``), the
        cache stores these keys and values and attends over all it holds."""
        cfg = self.cfg
        q_BTNK, k_BTGK, v_BTGK = projections(
            "BTD,DHK->BTHK", x_BTD, self.wq_DNK[...], self.wk_DGK[...], self.wv_DGK[...]
        )
        q_BTNK = rope(q_BTNK, positions_BT, cfg.rope_theta)
        k_BTGK = rope(k_BTGK, positions_BT, cfg.rope_theta)
        if cache is None:
            impl = attention_impl(cfg, seq_len=x_BTD.shape[1])
            out_BTNK = attention.causal(
                q_BTNK, k_BTGK, v_BTGK, positions_BT,
                impl=impl, block=cfg.attn_block_size, rules=RULES,
            )  # fmt: skip
        else:
            out_BTNK, cache = cache.attend(q_BTNK, k_BTGK, v_BTGK)
        [out_BTD] = projections("BTNK,NKD->BTD", out_BTNK, self.wo_NKD[...])
        return out_BTD, cache


class SwiGLU(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        D, F, std, pd = cfg.d_model, cfg.ffn_dim, cfg.init_std, cfg.param_dtype
        self.w_gate_DF = param(rngs, (D, F), ("embed", "mlp"), std, pd)
        self.w_up_DF = param(rngs, (D, F), ("embed", "mlp"), std, pd)
        out_std = std / math.sqrt(2 * cfg.num_layers)
        self.w_down_FD = param(rngs, (F, D), ("mlp", "embed"), out_std, pd)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        gate_BTF, up_BTF = projections("BTD,DF->BTF", x_BTD, self.w_gate_DF[...], self.w_up_DF[...])
        [out_BTD] = projections("BTF,FD->BTD", jax.nn.silu(gate_BTF) * up_BTF, self.w_down_FD[...])
        return out_BTD


class Block(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype)
        self.mlp = SwiGLU(cfg, rngs=rngs)

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, cache=None):
        attn_BTD, cache = self.attn(self.attn_norm(x_BTD), positions_BT, cache)
        x_BTD = x_BTD + attn_BTD
        x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
        return _constrain(x_BTD, ("batch", "seq", "act_embed")), cache


class Transformer(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        V, D, pd = cfg.vocab_size, cfg.d_model, cfg.param_dtype
        self.embed_VD = param(rngs, (V, D), ("vocab", "embed"), cfg.init_std, pd)
        # One Block's parameters stacked L times: init vmapped over per-layer keys.
        keys = jax.random.split(rngs.params(), cfg.num_layers)
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0))))
        self.blocks = nnx.merge(
            graphdef, jax.vmap(lambda k: nnx.state(Block(cfg, rngs=nnx.Rngs(k))))(keys)
        )
        self.final_norm = RMSNorm(D, cfg.norm_eps, pd)
        if not cfg.tie_embeddings:
            self.lm_head_DV = param(rngs, (D, V), ("embed", "vocab"), cfg.init_std, pd)
        self.cfg = cfg

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None) -> jax.Array:
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        return self.logits(self.run_blocks(self.embed(tokens_BT), positions_BT))

    def embed(self, tokens_BT: jax.Array) -> jax.Array:
        # Gather from the table replicated: a lookup into a (vocab, embed)-sharded
        # table would force GSPMD to rematerialize the output anyway.
        table_VD = _constrain(self.embed_VD[...], (None, None))
        x_BTD = table_VD.astype(jnp.dtype(self.cfg.dtype))[tokens_BT]
        return _constrain(x_BTD, ("batch", "seq", "act_embed"))

    def run_blocks(self, x_BTD: jax.Array, positions_BT: jax.Array) -> jax.Array:
        """The L stacked blocks, by lax.scan or by a Python loop (same numbers)."""
        cfg = self.cfg
        graphdef, stacked = nnx.split(self.blocks)

        def apply(x_BTD, layer_state):
            return nnx.merge(graphdef, layer_state)(x_BTD, positions_BT)[0]

        if cfg.remat:
            # Under scan, CSE across iterations cannot happen, so its guard is dropped.
            policy = REMAT_POLICIES[cfg.remat_policy]
            apply = jax.checkpoint(apply, policy=policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            return jax.lax.scan(lambda x, layer: (apply(x, layer), None), x_BTD, stacked)[0]
        for i in range(cfg.num_layers):
            x_BTD = apply(x_BTD, jax.tree.map(lambda a, i=i: a[i], stacked))
        return x_BTD

    def logits(self, x_BTD: jax.Array, head_DV: jax.Array | None = None) -> jax.Array:
        """Float32 logits; ``head_DV`` replaces the output projection (decoding
        keeps a transposed copy of a tied embedding)."""
        x_BTD = self.final_norm(x_BTD)
        if head_DV is None:
            head_DV = self.embed_VD[...].T if self.cfg.tie_embeddings else self.lm_head_DV[...]
        [logits_BTV] = projections("BTD,DV->BTV", x_BTD, head_DV)
        return logits_BTV.astype(jnp.float32)


# ----------------------------------------------------------------------------- pure API


@functools.lru_cache(maxsize=32)
def _abstract(cfg: Config):
    """Graph definition and abstract (shape-only) state of the model, built once."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


@functools.lru_cache(maxsize=32)
def _abstract_block(cfg: Config):
    return nnx.split(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0))))


def _bind(graphdef, abstract_state, params: Params):
    state = jax.tree.map(lambda x: x, abstract_state)  # fresh Variables, then fill in
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def init(cfg: Config, key: jax.Array) -> Params:
    """Fresh parameters as a plain nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(params=key))))


def abstract_params(cfg: Config) -> Params:
    """Parameter shapes and dtypes (jax.ShapeDtypeStruct) without allocating anything."""
    return nnx.to_pure_dict(_abstract(cfg)[1])


def param_axes(cfg: Config) -> Params:
    """Logical sharding axes of every parameter (stacked blocks gain a leading 'layers')."""
    _, state = _abstract(cfg)
    flat = {}
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata()["axes"]
        flat[path] = ("layers", *axes) if path[0] == "blocks" else axes
    return nnx.to_pure_dict(nnx.from_flat_state(flat))


def decay_mask(cfg: Config) -> Params:
    """Weight decay for matrices only: parameters with two or more axes besides 'layers'."""
    return jax.tree.map(
        lambda axes: len([a for a in axes if a != "layers"]) >= 2,
        param_axes(cfg),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def model(cfg: Config, params: Params) -> Transformer:
    """Binds pure parameters to the module (cheap: happens at trace time under jit).
    Parameters left out stay abstract (decoding binds the blocks one at a time)."""
    return _bind(*_abstract(cfg), params)


def block(cfg: Config, layer: Params) -> Block:
    """One layer's parameters (a slice of the stacked blocks) bound to a Block."""
    return _bind(*_abstract_block(cfg), layer)


def forward(cfg: Config, params: Params, tokens_BT: jax.Array, positions_BT=None) -> jax.Array:
    """Float32 logits [B, T, V]."""
    return model(cfg, params)(tokens_BT, positions_BT)


def forward_with_features(cfg: Config, params: Params, tokens_BT: jax.Array):
    """(float32 logits [B, T, V], features [B, T, D]): the features are the final norm's
    output, what the output projection reads, for scalar heads (reward, value)."""
    m = model(cfg, params)
    positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    x_BTD = m.run_blocks(m.embed(tokens_BT), positions_BT)
    return m.logits(x_BTD), m.final_norm(x_BTD).astype(jnp.float32)


def features(cfg: Config, params: Params, tokens_BT: jax.Array) -> jax.Array:
    """Float32 features [B, T, D] (``forward_with_features``) without the output projection."""
    m = model(cfg, params)
    positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    return m.final_norm(m.run_blocks(m.embed(tokens_BT), positions_BT)).astype(jnp.float32)


def token_nll(cfg: Config, params: Params, tokens_BT1: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood in nats, [B, T], for rows of T+1 tokens."""
    logits_BTV = forward(cfg, params, tokens_BT1[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT1[:, 1:])


def _target_mask(batch: dict[str, jax.Array], nll_BT: jax.Array) -> jax.Array:
    """[B, T]: ``batch["mask"]`` of the targets, or of the rows ([B]: the padding rows
    ``genjax.evaluate`` adds to a batch without a mask), or all ones."""
    if "mask" not in batch:
        return jnp.ones_like(nll_BT)
    mask = batch["mask"].astype(nll_BT.dtype)
    return jnp.broadcast_to(mask[:, None], nll_BT.shape) if mask.ndim == 1 else mask


def loss(cfg: Config, params: Params, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy over the unmasked targets of ``batch["tokens"]``."""
    nll_BT = token_nll(cfg, params, batch["tokens"])
    mask_BT = _target_mask(batch, nll_BT)
    total = jnp.sum(nll_BT * mask_BT)
    count = jnp.sum(mask_BT)
    return total / jnp.maximum(count, 1.0), {"tokens": count}


def nll_sums(cfg: Config, params: Params, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Summed NLL (nats) and target count: the reducible quantities of evaluation."""
    nll_BT = token_nll(cfg, params, batch["tokens"])
    mask_BT = _target_mask(batch, nll_BT)
    return {"nll": jnp.sum(nll_BT * mask_BT), "tokens": jnp.sum(mask_BT)}


def count_params(cfg: Config) -> dict[str, int]:
    sizes = [math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg))]
    total = sum(sizes)
    embedding = cfg.vocab_size * cfg.d_model
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}
