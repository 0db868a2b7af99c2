"""Choosing the next token: greedy, temperature, top-k and top-p, all traced values.

Glossary: B rows, V vocabulary. Every function here runs inside the compiled
decoding loop, so changing a sampling setting never recompiles.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 switch truncation off.

    The order is Hugging Face's: divide by temperature, keep the top k, then
    keep the smallest set of most likely tokens whose probability reaches top_p.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")


GREEDY = SamplingParams()


def _ordered_bits(x: jax.Array) -> jax.Array:
    """uint32 keys with the order of the float32 values (the radix-sort trick)."""
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(0x80000000))


def _largest_threshold(keys_BV: jax.Array, weights_BV: jax.Array, target_B: jax.Array):
    """Per row, the largest key t with sum(weights where keys >= t) >= target.

    Bisection over the 2^32 keys: 32 passes over the vocabulary, exact. A full
    sort costs XLA:CPU several times more (12 ms a step at batch 16, V 4096).
    Assumes the smallest key of each row already meets the target.
    """

    def halve(_, bounds):
        lo_B, hi_B = bounds
        gap_B = hi_B - lo_B
        mid_B = lo_B + (gap_B >> 1) + (gap_B & 1)  # ceil((lo + hi) / 2) without overflow
        mass_B = jnp.sum(jnp.where(keys_BV >= mid_B[:, None], weights_BV, 0), axis=-1)
        ok_B = (mass_B >= target_B) & (gap_B > 0)
        return jnp.where(ok_B, mid_B, lo_B), jnp.where(ok_B | (gap_B == 0), hi_B, mid_B - 1)

    bounds = (jnp.min(keys_BV, axis=-1), jnp.max(keys_BV, axis=-1))
    return jax.lax.fori_loop(0, 32, halve, bounds)[0]


def truncate_logits(logits_BV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Sets every logit outside the top-k, then the top-p (nucleus), set to -inf.

    Top-k keeps the logits >= the k-th largest; top-p then keeps the most
    likely tokens until their probability reaches top_p (at least one token); top_p
    >= 1 keeps them all, where float32 sums may reach 1 before the last of them.
    Exact for distinct logits; a logit tied with the smallest kept one is kept.
    """
    B, V = logits_BV.shape
    k_B = jnp.broadcast_to(jnp.where(top_k > 0, jnp.minimum(top_k, V), V), (B,))

    def top_k_only(logits_BV):
        keys_BV = _ordered_bits(logits_BV)
        kth_B = _largest_threshold(keys_BV, jnp.ones_like(logits_BV, jnp.int32), k_B)
        return jnp.where(keys_BV >= kth_B[:, None], logits_BV, -jnp.inf)

    logits_BV = jax.lax.cond(top_k > 0, top_k_only, lambda x: x, logits_BV)
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    p_keys_BV = _ordered_bits(probs_BV)
    top_p_B = jnp.broadcast_to(top_p, (B,)).astype(jnp.float32)
    # The most likely token alone may exceed the target: never cut above it.
    nucleus_B = jnp.minimum(
        _largest_threshold(p_keys_BV, probs_BV, top_p_B), jnp.max(p_keys_BV, axis=-1)
    )
    kept_BV = (p_keys_BV >= nucleus_B[:, None]) | (top_p_B[:, None] >= 1.0)
    return jnp.where(kept_BV, logits_BV, -jnp.inf)


def inverse_cdf_sample(probs_BV: jax.Array, keys_B: jax.Array) -> jax.Array:
    """One token per row [B] (int32) drawn from ``probs_BV`` with one uniform per row:
    the first token whose cumulative probability reaches u · total, u in (0, 1].

    A zero-probability token is never drawn (its cumulative value equals the one
    before it). Gumbel-max (``jax.random.categorical``) needs a random number per
    vocabulary entry: 0.95 ms a step against 0.2 at batch 16, V 4096, 2-core CPU.
    """
    u_B = 1.0 - jax.vmap(jax.random.uniform)(keys_B)  # (0, 1]
    cdf_BV = jnp.cumsum(probs_BV.astype(jnp.float32), axis=-1)
    target_B1 = (u_B * cdf_BV[:, -1])[:, None]
    return jnp.minimum(jnp.sum(cdf_BV < target_B1, axis=-1), probs_BV.shape[-1] - 1).astype(
        jnp.int32
    )


def sample_logits(
    logits_BV: jax.Array,
    keys_B: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """One token per row [B] (int32); all sampling values may be traced."""

    def sample():
        scaled_BV = logits_BV / temperature
        # Truncation (64 passes over the vocabulary) only runs when it is on.
        scaled_BV = jax.lax.cond(
            (top_k > 0) | (top_p < 1.0),
            lambda x: truncate_logits(x, top_k, top_p),
            lambda x: x,
            scaled_BV,
        )
        return inverse_cdf_sample(jax.nn.softmax(scaled_BV, axis=-1), keys_B)

    greedy = lambda: jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.lax.cond(temperature > 0, sample, greedy)
