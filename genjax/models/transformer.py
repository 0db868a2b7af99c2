"""Llama-style decoder-only transformer.

Glossary of shapes:
  B  batch                  T  query positions        S  key/value positions
  D  model width            N  query heads            G  key/value heads (GQA groups)
  R  query heads per group  K  head dim               F  SwiGLU hidden width
  V  vocabulary             L  layers

Pure entry points: ``init(cfg, key) -> params`` (a plain nested dict),
``param_axes(cfg)`` (the logical sharding axes of every parameter),
``forward(cfg, params, tokens) -> logits`` and ``loss(cfg, params, batch)``.
The layers are NNX modules; parameters cross the jit boundary as pure pytrees.
Blocks are always stored stacked (a leading L axis), so scan-over-layers and the
plain layer loop run on the same parameters.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from genjax import mesh as meshlib

Params = dict[str, Any]


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
    # in 16-bit compute, else "xla" (the blocked einsum attention below, the
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
        if self.attention not in ("auto", "xla", "cudnn", "splash"):
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
    # The BENCHMARKS.md configuration; the default on a laptop CPU.
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


def _param(rngs: nnx.Rngs, shape, axes, std: float, dtype: str) -> nnx.Param:
    """A parameter carrying its logical sharding axes as metadata."""
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, dtype)
    return nnx.Param(value, axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype: str):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
        self.eps = eps

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...]).astype(x_BTD.dtype)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["w_SIO"], meta_fields=["shapes", "in_dims"]
)
@dataclasses.dataclass(frozen=True)
class ColumnBlocks:
    """Projection weights of one input, side by side, stored as S blocks of
    their output columns: ``w_SIO`` [S, I, O/S], I the ``in_dims`` leading axes
    flattened and O all the weights' remaining axes, flattened and joined.

    For one row (a decoding step at batch 1) XLA:CPU runs ``x @ w`` on one
    thread; as a dot batched over the blocks it runs on all cores (cpu-small,
    the weight matmuls of a batch-1 step, 2-core CPU: 1.9 ms as plain matmuls,
    1.1 ms in two blocks, torch 1.2 ms), and joining q/k/v and gate/up saves a
    dot each (43 → 25 dots a step: 1.29 → 1.13 ms). From two rows on the
    batched dot is slower than the plain one (``with_column_blocks(params, 1)`` undoes it).
    """

    w_SIO: jax.Array
    shapes: tuple[tuple[int, ...], ...]  # of the plain weights, in order
    in_dims: int

    @classmethod
    def of(cls, ws: Sequence[jax.Array], in_dims: int, blocks: int) -> ColumnBlocks:
        w_IO = jnp.concatenate([w.reshape(math.prod(w.shape[:in_dims]), -1) for w in ws], axis=1)
        if w_IO.shape[1] % blocks:
            raise ValueError(f"{w_IO.shape[1]} output columns do not split into {blocks} blocks")
        w_SIO = w_IO.reshape(w_IO.shape[0], blocks, -1).transpose(1, 0, 2)
        return cls(w_SIO, tuple(w.shape for w in ws), in_dims)

    def _split(self, y_MO: jax.Array) -> list[jax.Array]:
        widths = [math.prod(shape[self.in_dims :]) for shape in self.shapes]
        return jnp.split(y_MO, list(itertools.accumulate(widths))[:-1], axis=-1)

    def merged(self) -> list[jax.Array]:
        """The plain weights."""
        w_IO = self.w_SIO.transpose(1, 0, 2).reshape(self.w_SIO.shape[1], -1)
        return [w.reshape(shape) for w, shape in zip(self._split(w_IO), self.shapes, strict=True)]

    def apply(self, x: jax.Array) -> list[jax.Array]:
        """``x`` times each weight: one dot batched over the blocks."""
        lead = x.shape[: x.ndim - self.in_dims]
        x_MI = x.reshape(-1, self.w_SIO.shape[1])
        x_SMI = jnp.broadcast_to(x_MI, (self.w_SIO.shape[0], *x_MI.shape))
        y_SMO = jnp.einsum("SMI,SIO->SMO", x_SMI, self.w_SIO.astype(x.dtype))
        y_MO = y_SMO.transpose(1, 0, 2).reshape(x_MI.shape[0], -1)
        return [
            y.reshape(*lead, *shape[self.in_dims :])
            for y, shape in zip(self._split(y_MO), self.shapes, strict=True)
        ]

    def __getitem__(self, index):
        return self  # read as a parameter's value (``param[...]``) by the layers


@functools.partial(jax.tree_util.register_dataclass, data_fields=[], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Joined:
    """Stands for a weight whose columns the group's first weight holds (``ColumnBlocks``)."""

    def __getitem__(self, index):
        return self


def dense_group(x: jax.Array, *ws: jax.Array | ColumnBlocks | Joined) -> list[jax.Array]:
    """``[dense(x, w) for w in ws]``, or one dot where ``ws[0]`` holds them all."""
    if isinstance(ws[0], ColumnBlocks):
        if len(ws[0].shapes) != len(ws) or not all(isinstance(w, Joined) for w in ws[1:]):
            raise ValueError(f"ColumnBlocks of {len(ws[0].shapes)} weights used for {len(ws)}")
        return ws[0].apply(x)
    return [dense(x, w) for w in ws]


def dense(x: jax.Array, w: jax.Array | ColumnBlocks, in_dims: int = 1) -> jax.Array:
    """Contracts the last ``in_dims`` axes of x with the first of w, as one 2-D matmul.

    Same as the einsum it replaces ("BTD,DNK->BTNK", "BTNK,NKD->BTD"), but XLA:CPU
    runs a [B·T, in] @ [in, out] matmul about 2x faster than a 3-D dot_general.
    """
    lead, contract = x.shape[: x.ndim - in_dims], x.shape[x.ndim - in_dims :]
    if isinstance(w, ColumnBlocks):
        return w.apply(x)[0]
    w_2d = w.reshape(math.prod(contract), -1)
    y = x.reshape(-1, w_2d.shape[0]) @ w_2d.astype(x.dtype)
    return y.reshape(*lead, *w.shape[in_dims:])


def rope(x_BTHK: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half convention (as Hugging Face Llama)."""
    half = x_BTHK.shape[-1] // 2
    freqs_K = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BTK = positions_BT[..., None].astype(jnp.float32) * freqs_K
    sin, cos = jnp.sin(angles_BTK)[:, :, None, :], jnp.cos(angles_BTK)[:, :, None, :]
    x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHK.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        D, N, G, K = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std, pd = cfg.init_std, cfg.param_dtype
        self.wq_DNK = _param(rngs, (D, N, K), ("embed", "heads", "head_dim"), std, pd)
        self.wk_DGK = _param(rngs, (D, G, K), ("embed", "kv_heads", "head_dim"), std, pd)
        self.wv_DGK = _param(rngs, (D, G, K), ("embed", "kv_heads", "head_dim"), std, pd)
        # Output projection scaled down with depth (GPT-2 style residual init).
        out_std = std / math.sqrt(2 * cfg.num_layers)
        self.wo_NKD = _param(rngs, (N, K, D), ("heads", "head_dim", "embed"), out_std, pd)
        self.cfg = cfg

    def __call__(
        self, x_BTD: jax.Array, positions_BT: jax.Array, cache: KVCache | None = None
    ) -> tuple[jax.Array, KVCache | None]:
        """Self-attention over the sequence, or (with ``cache``) over the cached
        keys and values plus these T new ones, which are written into the cache."""
        cfg = self.cfg
        q_BTNK, k_BTGK, v_BTGK = dense_group(
            x_BTD, self.wq_DNK[...], self.wk_DGK[...], self.wv_DGK[...]
        )
        q_BTNK = rope(q_BTNK, positions_BT, cfg.rope_theta)
        k_BTGK = rope(k_BTGK, positions_BT, cfg.rope_theta)
        impl = attention_impl(cfg, seq_len=x_BTD.shape[1])
        if cache is None and impl == "cudnn":
            # Index-causal, which equals position-causal for increasing positions.
            out_BTNK = jax.nn.dot_product_attention(
                q_BTNK, k_BTGK, v_BTGK, is_causal=True, implementation="cudnn"
            )
        elif cache is None and impl == "splash":
            out_BTNK = splash_attention(q_BTNK, k_BTGK, v_BTGK)  # index-causal, as cuDNN
        elif cache is None:
            out_BTNK = causal_attention(
                q_BTNK, k_BTGK, v_BTGK, positions_BT, block=cfg.attn_block_size
            )
        else:
            cache = cache.write(k_BTGK, v_BTGK)
            k_blocks, v_blocks = cache.layer_kv()
            out_BTNK = cached_attention(
                q_BTNK, k_blocks, v_blocks, cache.slot, cache.start_B, cache.block_starts()
            )
        return dense(out_BTNK, self.wo_NKD[...], in_dims=2), cache


def attention_impl(cfg: Config, seq_len: int | None = None) -> str:
    """The attention implementation ``cfg.attention`` resolves to on this backend
    (for sequences of ``seq_len``, where that matters)."""
    if cfg.attention != "auto":
        return cfg.attention
    backend = jax.default_backend()
    if backend == "tpu" and (seq_len is None or splash_block_size(seq_len) is not None):
        return "splash"
    if backend == "gpu" and cfg.dtype in ("bfloat16", "float16"):
        return "cudnn"
    return "xla"


def splash_block_size(seq_len: int) -> int | None:
    """Query and key block of the splash kernel for ``seq_len``: the largest of
    512, 256, 128 that divides it, else None (the kernel computes key blocks
    of a multiple of 128, the TPU's lane count)."""
    for block in (512, 256, 128):
        if seq_len % block == 0:
            return block
    return None


@functools.lru_cache(maxsize=32)
def _splash_kernel(seq_len: int, heads_per_kv: int, interpret: bool):
    """A causal splash kernel for one (example, KV head) with its query heads:
    q [R, T, K], k and v [T, K] (the kernel's MQA form; GQA is vmapped over KV heads)."""
    # Imported here: Pallas is only needed by configurations that use it.
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash_kernel,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as splash_mask,
    )

    block = splash_block_size(seq_len)
    if block is None:
        raise ValueError(
            f"attention='splash' needs a sequence length that is a multiple of 128; "
            f"got {seq_len}. Use attention='xla' or pad the sequence"
        )
    mask = splash_mask.MultiHeadMask(
        [splash_mask.CausalMask((seq_len, seq_len)) for _ in range(heads_per_kv)]
    )
    sizes = splash_kernel.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    # The kernel keeps its mask tables as arrays: made concrete here, they stay
    # valid in every later trace (built inside a jit they would be tracers).
    with jax.ensure_compile_time_eval():
        return splash_kernel.make_splash_mqa_single_device(
            mask, block_sizes=sizes, interpret=interpret
        )


def splash_attention(q_BTNK, k_BTGK, v_BTGK) -> jax.Array:
    """Causal attention by the Pallas splash kernel (interpreted off TPU, for tests).

    Under a genjax mesh the kernel runs per shard (``shard_map``): batch over
    the data axes and heads over ``tensor``, so GSPMD never gathers its inputs.
    """
    T, N, K = q_BTNK.shape[1:]
    R = N // k_BTGK.shape[2]
    kernel = _splash_kernel(T, R, jax.default_backend() != "tpu")

    def per_shard(q_BTNK, k_BTGK, v_BTGK):
        B, G = q_BTNK.shape[0], k_BTGK.shape[2]
        q_BGRTK = q_BTNK.reshape(B, T, G, R, K).transpose(0, 2, 3, 1, 4) * (K**-0.5)
        k_BGTK, v_BGTK = k_BTGK.transpose(0, 2, 1, 3), v_BTGK.transpose(0, 2, 1, 3)
        out_BGRTK = jax.vmap(jax.vmap(kernel))(q_BGRTK, k_BGTK, v_BGTK)
        return out_BGRTK.transpose(0, 3, 1, 2, 4).reshape(B, T, G * R, K)

    mesh = jax.sharding.get_abstract_mesh()
    if (
        mesh.empty
        or not set(meshlib.MESH_AXES) <= set(mesh.axis_names)
        or any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types)  # in a shard_map
    ):
        return per_shard(q_BTNK, k_BTGK, v_BTGK)
    q_spec = meshlib.logical_to_spec(("batch", "seq", "heads", "head_dim"))
    kv_spec = meshlib.logical_to_spec(("batch", "seq", "kv_heads", "head_dim"))
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    for name, dim, entry in [
        ("batch", q_BTNK.shape[0], q_spec[0]),
        ("KV heads", k_BTGK.shape[2], kv_spec[2]),
    ]:
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        shards = math.prod(sizes[a] for a in axes)
        if dim % shards:
            raise ValueError(
                f"attention='splash' runs per shard: {name} {dim} must divide by the "
                f"{shards} shards of mesh axes {axes}. Use attention='xla' or change the mesh"
            )
    return jax.shard_map(
        per_shard, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False
    )(q_BTNK, k_BTGK, v_BTGK)


def causal_attention(q_BTNK, k_BSGK, v_BSGK, positions_BT, *, block: int) -> jax.Array:
    """Softmax attention of each query over the keys at positions <= its own.

    Queries go in blocks of ``block``; block i reads only the keys of blocks
    0..i, since positions increase along the sequence and later keys would be
    masked anyway. At T = 4·block that skips 3/8 of the score matrix: its
    FLOPs, its exponentials and the memory kept for the backward pass.
    """
    B, T, N, K = q_BTNK.shape
    G = k_BSGK.shape[2]
    q_BTGRK = q_BTNK.reshape(B, T, G, N // G, K) * (K**-0.5)
    block = block if 0 < block < T else T
    outs = []
    for start in range(0, T, block):
        end = min(start + block, T)
        q_BtGRK = q_BTGRK[:, start:end]
        scores_BGRtS = jnp.einsum("BtGRK,BSGK->BGRtS", q_BtGRK, k_BSGK[:, :end])
        causal_BtS = positions_BT[:, start:end, None] >= positions_BT[:, None, :end]
        scores_BGRtS = jnp.where(causal_BtS[:, None, None], scores_BGRtS.astype(jnp.float32), -1e30)
        probs_BGRtS = jax.nn.softmax(scores_BGRtS, axis=-1).astype(q_BTNK.dtype)
        outs.append(jnp.einsum("BGRtS,BSGK->BtGRK", probs_BGRtS, v_BSGK[:, :end]))
    return jnp.concatenate(outs, axis=1).reshape(B, T, N, K)


def cached_attention(
    q_BTNK, k_blocks, v_blocks, first_slot, key_start_B, block_starts
) -> jax.Array:
    """Attention of T new queries over the cache slots they can see.

    Row b's sequence occupies slots ``key_start_B[b]`` onwards (prompts are
    left-padded), and query t sits at slot ``first_slot + t``: it sees the
    slots in between. Masked slots get probability exactly 0, so the result
    equals attention over the unpadded sequence. The slots are stored in
    blocks (``k_blocks[j]`` and ``v_blocks[j]`` [B, G, n_j, K],
    without the B axis at batch 1; see ``KVCache``), starting at slot
    ``block_starts[j]``: only the blocks up to the last query's slot are
    read: a dynamic (``lax.switch``) choice among ``len(k_blocks)`` programs,
    or one program where ``first_slot`` is a Python int (the prefill). Both
    products are batched over (B, G), so the blocks are read in place (stored
    [B, S, G, K], XLA:CPU transposed the whole cache at every step); a slot's
    key is one contiguous row, so a step's cache write touches B·G rows (with
    keys stored [B, G, K, n], the writes were B·G·K scattered floats: 1.4 of
    a profiled 18 ms cpu-small step at batch 16, against 0.25). The products'
    "..." is (B, G), or G alone.
    """
    B, T, N, K = q_BTNK.shape
    G = k_blocks[0].shape[-3]
    R = N // G
    # Q = R·T: each KV head's queries, for every new position.
    q_BGQK = q_BTNK.reshape(B, T, G, R, K).transpose(0, 2, 3, 1, 4).reshape(B, G, R * T, K)
    q_BGQK = q_BGQK * (K**-0.5)
    q_BGQK = q_BGQK[0] if k_blocks[0].ndim == 3 else q_BGQK  # batch 1: no B axis
    query_slots_T = first_slot + jnp.arange(T)

    def attend(num_blocks, q_BGQK, k_blocks, v_blocks, query_slots_T, key_start_B):
        sizes = [k.shape[-2] for k in k_blocks[:num_blocks]]
        scores_BGQS = jnp.concatenate(
            [jnp.einsum("...QK,...SK->...QS", q_BGQK, k) for k in k_blocks[:num_blocks]], axis=-1
        )
        slots_S = jnp.concatenate(
            [
                start + jnp.arange(n)
                for start, n in zip(block_starts[:num_blocks], sizes, strict=True)
            ]
        )
        visible_BTS = (slots_S <= query_slots_T[:, None])[None] & (
            slots_S >= key_start_B[:, None, None]
        )
        scores_BGRTS = scores_BGQS.reshape(B, G, R, T, -1).astype(jnp.float32)
        scores_BGRTS = jnp.where(visible_BTS[:, None, None], scores_BGRTS, -1e30)
        probs_BGRTS = jax.nn.softmax(scores_BGRTS, axis=-1).astype(q_BGQK.dtype)
        probs_BGQS = probs_BGRTS.reshape(scores_BGQS.shape)
        cuts = list(itertools.accumulate(sizes))[:-1]
        # Blocks summed in float32 and rounded once, as one block would be.
        out_BGQK = sum(
            jnp.einsum("...QS,...SK->...QK", p, v, preferred_element_type=jnp.float32)
            for p, v in zip(
                jnp.split(probs_BGQS, cuts, axis=-1), v_blocks[:num_blocks], strict=True
            )
        )
        return out_BGQK.astype(q_BGQK.dtype)

    operands = (q_BGQK, k_blocks, v_blocks, query_slots_T, key_start_B)
    if isinstance(first_slot, int):  # known while tracing: one program
        # Blocks holding any slot up to the last query's; the rest are empty.
        out_BGQK = attend(sum(s <= first_slot + T - 1 for s in block_starts), *operands)
    elif len(k_blocks) == 1:
        out_BGQK = attend(1, *operands)
    else:
        needed = jnp.sum(jnp.asarray(block_starts) <= query_slots_T[-1])
        branches = [functools.partial(attend, n) for n in range(1, len(k_blocks) + 1)]
        out_BGQK = jax.lax.switch(needed - 1, branches, *operands)
    return out_BGQK.reshape(B, G, R, T, K).transpose(0, 3, 1, 2, 4).reshape(B, T, N, K)


def cache_block_sizes(slots: int, block: int | None) -> list[int]:
    """How a cache of ``slots`` positions is cut into blocks of ``block`` slots
    (None: one block), with at most 8 blocks (``block`` grows to slots / 8)."""
    if block is None or block >= slots:
        return [slots]
    block = max(block, -(-slots // 8))
    return [min(block, slots - start) for start in range(0, slots, block)]


def _write_window(buf: jax.Array, new: jax.Array, offset: jax.Array, axis: int) -> jax.Array:
    """``buf`` with ``new`` written along ``axis`` from ``offset`` (may be
    negative or run past the end: only the overlapping part is written).

    Reads and rewrites one window of min(n, T) positions in place, so a
    one-token write costs one position per block, not the whole block.
    """
    n, T = buf.shape[axis], new.shape[axis]
    W = min(n, T)
    at = jnp.clip(offset, 0, n - W)
    src_W = at - offset + jnp.arange(W)  # index into `new` of each window position
    valid_W = (src_W >= 0) & (src_W < T)
    shape = [1] * buf.ndim
    shape[axis] = W
    vals = jnp.take(new, jnp.clip(src_W, 0, T - 1), axis=axis).astype(buf.dtype)
    old = jax.lax.dynamic_slice_in_dim(buf, at, W, axis)
    vals = jnp.where(valid_W.reshape(shape), vals, old)
    return jax.lax.dynamic_update_slice_in_dim(buf, vals, at, axis)


class KVCache(NamedTuple):
    """Keys and values of every layer for S slots, and where this call writes.

    Per layer, the slots are cut into blocks (``cache_block_sizes``), each
    its own buffer: ``k[i][j]`` and ``v[i][j]`` are [B, G, n_j, K]; at batch 1
    without the B axis ([G, n_j, K]): with a unit axis there, XLA:CPU
    duplicated each cache write into two fusions and copied every buffer three
    times a step. Every buffer is updated in place inside the decoding loop
    and read without copying, which a slice of one stacked
    [L, ...] buffer would cost (XLA:CPU copies such slices: at batch 16 those
    copies took three quarters of a cpu-small decoding step); attention reads
    only the blocks filled so far. ``slot`` is the first slot this call writes
    (the same for every row; a Python int where known while tracing, as 0 for
    the prefill, else an array) and ``start_B`` each row's first real slot
    (slots before it are left padding and never attended to); ``layer`` is
    the transformer layer being applied.
    """

    k: tuple[tuple[jax.Array, ...], ...]
    v: tuple[tuple[jax.Array, ...], ...]
    slot: int | jax.Array
    start_B: jax.Array
    layer: int = 0

    def block_starts(self) -> list[int]:
        sizes = [k.shape[-2] for k in self.k[0]]
        return [0, *itertools.accumulate(sizes)][:-1]

    def write(self, k_BTGK: jax.Array, v_BTGK: jax.Array) -> KVCache:
        starts = self.block_starts()

        def put(bufs, new, axis):
            if len(starts) == 1:  # one block: the write always fits
                parts = (
                    jax.lax.dynamic_update_slice_in_dim(
                        bufs[self.layer][0], new.astype(bufs[self.layer][0].dtype), self.slot, axis
                    ),
                )
            else:
                parts = tuple(
                    _write_window(buf, new, self.slot - start, axis)
                    for buf, start in zip(bufs[self.layer], starts, strict=True)
                )
            return (*bufs[: self.layer], parts, *bufs[self.layer + 1 :])

        k_BGTK, v_BGTK = k_BTGK.transpose(0, 2, 1, 3), v_BTGK.transpose(0, 2, 1, 3)
        if self.k[0][0].ndim == 3:  # batch 1: no B axis
            k_BGTK, v_BGTK = k_BGTK[0], v_BGTK[0]
        return self._replace(k=put(self.k, k_BGTK, -2), v=put(self.v, v_BGTK, -2))

    def layer_kv(self) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        return self.k[self.layer], self.v[self.layer]


def init_cache(
    cfg: Config, batch: int, slots: int, start_B: jax.Array, block: int | None = None
) -> KVCache:
    """An empty cache of ``slots`` positions per row in the compute dtype, cut
    into blocks of ``block`` slots (see ``cache_block_sizes``)."""
    G, K, dtype = cfg.num_kv_heads, cfg.head_dim, jnp.dtype(cfg.dtype)
    sizes = cache_block_sizes(slots, block)

    def empty(shape, axes):
        return meshlib.constrain(jnp.zeros(shape, dtype), axes)

    B, BA = ((), ()) if batch == 1 else ((batch,), ("batch",))  # batch 1: no B axis
    layer_k = lambda: tuple(
        empty((*B, G, n, K), (*BA, "kv_heads", "seq", "head_dim")) for n in sizes
    )
    layer_v = lambda: tuple(
        empty((*B, G, n, K), (*BA, "kv_heads", "seq", "head_dim")) for n in sizes
    )

    L = cfg.num_layers
    return KVCache(
        tuple(layer_k() for _ in range(L)),
        tuple(layer_v() for _ in range(L)),
        0,  # the prefill's slot, static: its attention reads a known number of blocks
        start_B.astype(jnp.int32),
    )


class SwiGLU(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        D, F, std, pd = cfg.d_model, cfg.ffn_dim, cfg.init_std, cfg.param_dtype
        self.w_gate_DF = _param(rngs, (D, F), ("embed", "mlp"), std, pd)
        self.w_up_DF = _param(rngs, (D, F), ("embed", "mlp"), std, pd)
        self.w_down_FD = _param(
            rngs, (F, D), ("mlp", "embed"), std / math.sqrt(2 * cfg.num_layers), pd
        )

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        gate_BTF, up_BTF = dense_group(x_BTD, self.w_gate_DF[...], self.w_up_DF[...])
        return dense(jax.nn.silu(gate_BTF) * up_BTF, self.w_down_FD[...])


class Block(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype)
        self.mlp = SwiGLU(cfg, rngs=rngs)

    def __call__(
        self, x_BTD: jax.Array, positions_BT: jax.Array, cache: KVCache | None = None
    ) -> tuple[jax.Array, KVCache | None]:
        attn_BTD, cache = self.attn(self.attn_norm(x_BTD), positions_BT, cache)
        x_BTD = x_BTD + attn_BTD
        x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
        return meshlib.constrain(x_BTD, ("batch", "seq", "act_embed")), cache


class Transformer(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        V, D, pd = cfg.vocab_size, cfg.d_model, cfg.param_dtype
        self.embed_VD = _param(rngs, (V, D), ("vocab", "embed"), cfg.init_std, pd)
        # One Block's parameters stacked L times: init vmapped over per-layer keys.
        keys = jax.random.split(rngs.params(), cfg.num_layers)
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0))))
        self.blocks = nnx.merge(
            graphdef, jax.vmap(lambda k: nnx.state(Block(cfg, rngs=nnx.Rngs(k))))(keys)
        )
        self.final_norm = RMSNorm(D, cfg.norm_eps, pd)
        if not cfg.tie_embeddings:
            self.lm_head_DV = _param(rngs, (D, V), ("embed", "vocab"), cfg.init_std, pd)
        self.cfg = cfg

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None) -> jax.Array:
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        x_BTD, _ = _run_blocks(self.blocks, self.embed(tokens_BT), positions_BT, self.cfg)
        return self.logits(x_BTD)

    def decode(
        self, tokens_BT: jax.Array, positions_BT: jax.Array, cache: KVCache, layers, head_DV
    ) -> tuple[jax.Array, KVCache]:
        """Runs T new tokens against the cache: logits of the last one [B, V], new cache.

        ``layers`` and ``head_DV`` come from ``split_layers``."""
        x_BTD, cache = _run_blocks(
            self.blocks, self.embed(tokens_BT), positions_BT, self.cfg, cache, layers
        )
        return self.logits(x_BTD[:, -1:], head_DV)[:, 0], cache

    def embed(self, tokens_BT: jax.Array) -> jax.Array:
        # Gather from the table replicated: a lookup into a (vocab, embed)-sharded
        # table would force GSPMD to rematerialize the output anyway.
        table_VD = meshlib.constrain(self.embed_VD[...], (None, None))
        x_BTD = table_VD.astype(jnp.dtype(self.cfg.dtype))[tokens_BT]
        return meshlib.constrain(x_BTD, ("batch", "seq", "act_embed"))

    def logits(self, x_BTD: jax.Array, head_DV: jax.Array | None = None) -> jax.Array:
        x_BTD = self.final_norm(x_BTD)
        if head_DV is None:
            head_DV = self.embed_VD[...].T if self.cfg.tie_embeddings else self.lm_head_DV[...]
        return dense(x_BTD, head_DV).astype(jnp.float32)


def _run_blocks(
    blocks: Block, x_BTD, positions_BT, cfg: Config, cache: KVCache | None = None, layers=None
):
    """Applies the L stacked blocks by lax.scan or by a Python loop (same numbers).

    Decoding (with a cache) always unrolls the layers: layer i reads and writes
    its own cache buffers. ``layers`` (per-layer states, see ``split_layers``)
    replaces slicing the stacked parameters here.
    """
    graphdef, stacked = nnx.split(blocks)

    def apply(x, layer_state, cache):
        return nnx.merge(graphdef, layer_state)(x, positions_BT, cache)

    if cfg.remat and cache is None:
        # Under scan, CSE across iterations cannot happen, so its guard is dropped.
        policy = REMAT_POLICIES[cfg.remat_policy]
        apply = jax.checkpoint(apply, policy=policy, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers and cache is None:
        body = lambda x, layer_state: (apply(x, layer_state, None)[0], None)
        return jax.lax.scan(body, x_BTD, stacked)[0], None
    if layers is None:
        layers = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(cfg.num_layers)]
    for i, layer_state in enumerate(layers):
        x_BTD, cache = apply(x_BTD, layer_state, None if cache is None else cache._replace(layer=i))
    return x_BTD, cache


# ----------------------------------------------------------------------------- pure API


@functools.lru_cache(maxsize=32)
def _abstract(cfg: Config):
    """Graph definition and abstract (shape-only) state of the model, built once."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


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
    """Binds pure parameters to the module (cheap: happens at trace time under jit)."""
    graphdef, abstract_state = _abstract(cfg)
    state = jax.tree.map(lambda x: x, abstract_state)  # fresh Variables, then fill in
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def forward(cfg: Config, params: Params, tokens_BT: jax.Array, positions_BT=None) -> jax.Array:
    """Float32 logits [B, T, V]."""
    return model(cfg, params)(tokens_BT, positions_BT)


# Projections of one input that ``ColumnBlocks`` join: (module, weights, in_dims).
_COLUMN_GROUPS = [
    ("attn", ("wq_DNK", "wk_DGK", "wv_DGK"), 1),
    ("attn", ("wo_NKD",), 2),
    ("mlp", ("w_gate_DF", "w_up_DF"), 1),
    ("mlp", ("w_down_FD",), 1),
]


def split_layers(params: Params) -> Params:
    """The parameters in the layout ``decode`` takes: ``blocks`` as a list of
    per-layer dicts, and ``head_DV``, the output projection as a [D, V] matrix.

    XLA:CPU copies a slice of a stacked weight before multiplying by it; per
    decoding step those copies cost more than the matmuls (cpu-small, batch 1:
    13 ms against 2 ms). Likewise it transposes a tied embedding for the head
    at every step. Done once here, under jit, these are real arrays; split
    once, decode many times (``sampling.Decoder``).
    """
    blocks = params["blocks"]
    num_layers = jax.tree.leaves(blocks)[0].shape[0]
    layers = [jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(num_layers)]
    head_DV = params["lm_head_DV"] if "lm_head_DV" in params else params["embed_VD"].T
    return {**params, "blocks": layers, "head_DV": head_DV}


def split_layers_axes(cfg: Config) -> Params:
    """Logical sharding axes of the plain ``split_layers`` layout."""
    axes = param_axes(cfg)
    is_axes = lambda x: isinstance(x, tuple)
    layer = jax.tree.map(lambda a: a[1:], axes["blocks"], is_leaf=is_axes)  # no 'layers'
    return {**axes, "blocks": [layer] * cfg.num_layers, "head_DV": ("embed", "vocab")}


def with_column_blocks(params: Params, column_blocks: int) -> Params:
    """The ``split_layers`` layout with each projection group as ``ColumnBlocks``
    of that many blocks (1: plain weights). Takes either layout."""
    return {
        **params,
        "blocks": [layer_with_column_blocks(layer, column_blocks) for layer in params["blocks"]],
        "head_DV": head_with_column_blocks(params["head_DV"], column_blocks),
    }


def layer_with_column_blocks(layer: Params, column_blocks: int) -> Params:
    """One layer of ``with_column_blocks``."""
    layer = {k: dict(v) if isinstance(v, dict) else v for k, v in layer.items()}
    for module, names, in_dims in _COLUMN_GROUPS:
        weights = layer[module]
        first = weights[names[0]]
        ws = first.merged() if isinstance(first, ColumnBlocks) else [weights[n] for n in names]
        if column_blocks == 1:
            weights.update(zip(names, ws, strict=True))
        else:
            weights[names[0]] = ColumnBlocks.of(ws, in_dims, column_blocks)
            weights.update({name: Joined() for name in names[1:]})
    return layer


def head_with_column_blocks(head_DV, column_blocks: int):
    """The output projection of ``with_column_blocks``."""
    if isinstance(head_DV, ColumnBlocks):
        head_DV = head_DV.merged()[0]
    return head_DV if column_blocks == 1 else ColumnBlocks.of([head_DV], 1, column_blocks)


@functools.lru_cache(maxsize=32)
def _abstract_block(cfg: Config):
    return nnx.split(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0))))[1]


def _block_state(cfg: Config, layer: Params):
    state = jax.tree.map(lambda x: x, _abstract_block(cfg))
    nnx.replace_by_pure_dict(state, layer)
    return state


def decode(
    cfg: Config, params: Params, tokens_BT: jax.Array, positions_BT: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """Feeds T new tokens (written at ``cache.slot``): float32 logits of the last [B, V].

    ``params`` in the ``split_layers`` layout.
    """
    shared = {k: v for k, v in params.items() if k not in ("blocks", "head_DV")}
    layers = [_block_state(cfg, layer) for layer in params["blocks"]]
    # The stacked blocks stay abstract in the bound model: decoding runs `layers`.
    return model(cfg, shared).decode(tokens_BT, positions_BT, cache, layers, params["head_DV"])


def token_nll(cfg: Config, params: Params, tokens_BT1: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood in nats, [B, T], for rows of T+1 tokens."""
    logits_BTV = forward(cfg, params, tokens_BT1[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT1[:, 1:])


def loss(cfg: Config, params: Params, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy over the unmasked targets of ``batch["tokens"]``."""
    nll_BT = token_nll(cfg, params, batch["tokens"])
    mask_BT = batch.get("mask", jnp.ones_like(nll_BT))
    total = jnp.sum(nll_BT * mask_BT)
    count = jnp.sum(mask_BT)
    return total / jnp.maximum(count, 1.0), {"tokens": count}


def nll_sums(cfg: Config, params: Params, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Summed NLL (nats) and target count: the reducible quantities of evaluation."""
    nll_BT = token_nll(cfg, params, batch["tokens"])
    mask_BT = batch.get("mask", jnp.ones_like(nll_BT))
    return {"nll": jnp.sum(nll_BT * mask_BT), "tokens": jnp.sum(mask_BT)}


def count_params(cfg: Config) -> dict[str, int]:
    sizes = {
        "/".join(map(str, p)): math.prod(v.shape)
        for p, v in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]
    }
    total = sum(sizes.values())
    embedding = cfg.vocab_size * cfg.d_model
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}
