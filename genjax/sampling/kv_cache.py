"""The KV cache and the decoding forward pass: new tokens against cached keys and values.

Glossary as in ``models/transformer.py``; S cache slots. ``split_layers`` lays
the parameters out for decoding once; ``decode`` runs T new tokens through the
layers, each layer's attention writing its keys and values into the cache and
attending over the slots filled so far (``KVCache.attend``).
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from genjax import mesh as meshlib
from genjax.models import transformer

Params = dict


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

    def at_layer(self, layer: int) -> KVCache:
        return self._replace(layer=layer)

    def attend(self, q_BTNK: jax.Array, k_BTGK: jax.Array, v_BTGK: jax.Array):
        """Writes this layer's T new keys and values at ``slot``, then attends the T
        queries over every slot they can see: (out [B, T, N, K], updated cache)."""
        cache = self.write(k_BTGK, v_BTGK)
        k_blocks, v_blocks = cache.layer_kv()
        out_BTNK = cached_attention(
            q_BTNK, k_blocks, v_blocks, cache.slot, cache.start_B, cache.block_starts()
        )
        return out_BTNK, cache


def init_cache(
    cfg: transformer.Config, batch: int, slots: int, start_B: jax.Array, block: int | None = None
) -> KVCache:
    """An empty cache of ``slots`` positions per row in the compute dtype, cut
    into blocks of ``block`` slots (see ``cache_block_sizes``)."""
    G, K, dtype = cfg.num_kv_heads, cfg.head_dim, jnp.dtype(cfg.dtype)
    sizes = cache_block_sizes(slots, block)

    def empty(shape, axes):
        return meshlib.constrain(jnp.zeros(shape, dtype), axes, transformer.RULES)

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


def split_layers_axes(cfg: transformer.Config) -> Params:
    """Logical sharding axes of the ``split_layers`` layout."""
    axes = transformer.param_axes(cfg)
    is_axes = lambda x: isinstance(x, tuple)
    layer = jax.tree.map(lambda a: a[1:], axes["blocks"], is_leaf=is_axes)  # no 'layers'
    return {**axes, "blocks": [layer] * cfg.num_layers, "head_DV": ("embed", "vocab")}


def decode(
    cfg: transformer.Config, params: Params, tokens_BT, positions_BT, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """Feeds T new tokens (written at ``cache.slot``): float32 logits of the last [B, V].

    ``params`` in the ``split_layers`` layout. The layers are unrolled: layer i
    reads and writes its own cache buffers.
    """
    shared = {k: v for k, v in params.items() if k not in ("blocks", "head_DV")}
    model = transformer.model(cfg, shared)  # the stacked blocks stay abstract: unused
    x_BTD = model.embed(tokens_BT)
    for i, layer in enumerate(params["blocks"]):
        x_BTD, cache = transformer.block(cfg, layer)(x_BTD, positions_BT, cache.at_layer(i))
    return model.logits(x_BTD[:, -1:], params["head_DV"])[:, 0], cache
