"""Greedy decoding by full recomputation inside one jitted loop.

Each step runs the model over a fixed [B, max_seq_len] buffer; causality makes
the positions after the cursor irrelevant, so one compile serves every prompt.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from genjax.models import transformer


@functools.partial(jax.jit, static_argnames=("cfg", "num_new"))
def greedy(cfg: transformer.Config, params, buffer_BT: jax.Array, start: jax.Array, num_new: int):
    """Fills ``buffer_BT[:, start:start+num_new]`` with argmax continuations of
    the tokens before ``start``."""

    def body(i, buf):
        pos = start + i
        logits_BTV = transformer.forward(cfg, params, buf)
        next_B = jnp.argmax(jax.lax.dynamic_index_in_dim(logits_BTV, pos - 1, 1, False), -1)
        return jax.lax.dynamic_update_index_in_dim(buf, next_B.astype(buf.dtype), pos, 1)

    return jax.lax.fori_loop(0, num_new, body, buffer_BT)


def greedy_sample(
    cfg: transformer.Config, params, tokenizer, prompt: str, max_new_tokens: int
) -> str:
    """Greedy continuation of ``prompt`` as text (stops at the context length)."""
    ids = [tokenizer.eos_id, *tokenizer.encode(prompt)][-cfg.max_seq_len + 1 :]
    num_new = min(max_new_tokens, cfg.max_seq_len - len(ids))
    buffer = np.full((1, cfg.max_seq_len), tokenizer.eos_id, np.int32)
    buffer[0, : len(ids)] = ids
    out = np.asarray(greedy(cfg, params, jnp.asarray(buffer), jnp.int32(len(ids)), num_new))
    new = out[0, len(ids) : len(ids) + num_new].tolist()
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    return tokenizer.decode(new)
