"""Small layers every family builds from.

``einsum`` is how every projection is written: the einsum string carries the
shapes (``"BTD,DNK->BTNK"``), and a projection (``x``'s trailing axes against
``w``'s leading ones) runs as one 2-D matmul. XLA:CPU runs a ``[M, I] @ [I, O]``
matmul much faster than the 3-D ``dot_general`` the einsum lowers to: the
cpu-small training step of ``experiments/benchmarks/lm_train_speed.py`` made
2,030 tokens/s with it and 1,509 with ``jnp.einsum`` (2-core CPU, 2026-12-02).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: tuple, std: float, dtype: str) -> nnx.Param:
    """A truncated-normal parameter carrying its logical sharding axes as metadata."""
    # Drawn flat, then reshaped: the same values (the bits are generated flat either
    # way), but XLA:CPU compiles a rank-4 draw (a conv kernel) in 1.2–2.2 s against 0.4 s
    # flat, and modules built outside jit compile one draw per shape.
    flat = jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (math.prod(shape),), dtype)
    value = std * flat.reshape(shape)
    return nnx.Param(value, axes=axes)


@functools.lru_cache(maxsize=64)
def _as_matmul(spec: str) -> tuple[int, int] | None:
    """(x's leading axes, contracted axes) when ``spec`` is a projection
    ``lead + contract, contract + rest -> lead + rest``; else None."""
    inputs, out = spec.replace(" ", "").split("->")
    x, w = inputs.split(",")
    for n in range(1, min(len(x), len(w)) + 1):
        if x[-n:] == w[:n] and out == x[:-n] + w[n:]:
            return len(x) - n, n
    return None


def einsum(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """``jnp.einsum(spec, x, w)`` in x's dtype, as one 2-D matmul where ``spec`` is a
    projection (see the module docstring)."""
    w = w.astype(x.dtype)
    split = _as_matmul(spec)
    if split is None:
        return jnp.einsum(spec, x, w)
    lead, contract = split
    w_IO = w.reshape(math.prod(w.shape[:contract]), -1)
    y = x.reshape(-1, w_IO.shape[0]) @ w_IO
    return y.reshape(*x.shape[:lead], *w.shape[contract:])


def projections(spec: str, x: jax.Array, *ws) -> list[jax.Array]:
    """``[einsum(spec, x, w) for w in ws]``, several projections of one input.

    Decoding on a CPU may hand a joined layout as the first weight (anything with
    a ``project(x)`` method, ``genjax.sampling.layouts.ColumnBlocks``), which makes
    all of them in one matmul; the other weights are then placeholders.
    """
    if hasattr(ws[0], "project"):
        out = ws[0].project(x)
        if len(out) != len(ws):
            raise ValueError(f"a joined layout of {len(out)} weights used for {len(ws)}")
        return out
    return [einsum(spec, x, w) for w in ws]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype: str):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...]).astype(x.dtype)


def rope(x_BTHK: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half convention (as Hugging Face Llama)."""
    half = x_BTHK.shape[-1] // 2
    freqs_K = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BTK = positions_BT[..., None].astype(jnp.float32) * freqs_K
    sin, cos = jnp.sin(angles_BTK)[:, :, None, :], jnp.cos(angles_BTK)[:, :, None, :]
    x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHK.dtype)
