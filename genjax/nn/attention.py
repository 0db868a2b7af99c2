"""Causal self-attention, one implementation per backend, with one calling convention.

Glossary: B batch, T query positions, S key positions, N query heads, G
key/value heads (grouped-query attention), R = N / G query heads per group, K
head dim. Queries are ``[B, T, N, K]``, keys and values ``[B, S, G, K]``.

    "xla"     blocked einsum attention (``blocked_causal``): the fastest
              formulation measured on CPU, and the reference
    "cudnn"   ``jax.nn.dot_product_attention``'s flash kernel on a GPU (16-bit)
    "splash"  the Pallas splash kernel on a TPU (``splash_attention``)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from genjax import mesh as meshlib

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


def implementation(choice: str, dtype: str, seq_len: int | None = None) -> str:
    """The implementation ``choice`` resolves to on this backend ("auto": splash on a
    TPU where a block fits ``seq_len``, cuDNN on a GPU in 16-bit compute, else xla)."""
    if choice != "auto":
        return choice
    backend = jax.default_backend()
    if backend == "tpu" and (seq_len is None or splash_block_size(seq_len) is not None):
        return "splash"
    if backend == "gpu" and dtype in ("bfloat16", "float16"):
        return "cudnn"
    return "xla"


def causal(q_BTNK, k_BTGK, v_BTGK, positions_BT, *, impl: str, block: int, rules) -> jax.Array:
    """Each query attends to the keys at positions up to its own, by ``impl``.

    cuDNN and splash are index-causal, which equals position-causal for the
    increasing positions of training rows.
    """
    if impl == "cudnn":
        return jax.nn.dot_product_attention(
            q_BTNK, k_BTGK, v_BTGK, is_causal=True, implementation="cudnn"
        )
    if impl == "splash":
        return splash_attention(q_BTNK, k_BTGK, v_BTGK, rules)
    return blocked_causal(q_BTNK, k_BTGK, v_BTGK, positions_BT, block=block)


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


def splash_attention(q_BTNK, k_BTGK, v_BTGK, rules: meshlib.Rules) -> jax.Array:
    """Causal attention by the Pallas splash kernel (interpreted off TPU, for tests).

    Under a genjax mesh the kernel runs per shard (``shard_map``), batch and
    heads split as ``rules`` shard them, so GSPMD never gathers its inputs.
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

    if not meshlib.in_mesh_context():
        return per_shard(q_BTNK, k_BTGK, v_BTGK)
    q_spec = meshlib.logical_to_spec(("batch", "seq", "heads", "head_dim"), rules)
    kv_spec = meshlib.logical_to_spec(("batch", "seq", "kv_heads", "head_dim"), rules)
    mesh = jax.sharding.get_abstract_mesh()
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


def blocked_causal(q_BTNK, k_BSGK, v_BSGK, positions_BT, *, block: int) -> jax.Array:
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
