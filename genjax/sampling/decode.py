"""Language-model decoding: prefill, then a KV-cached sampling loop in one jit.

    decoder = decode.Decoder(cfg, params)  # weights laid out for decoding, once
    gen = decoder.generate([[2, 17, 5], [2, 9]], max_new_tokens=64,
                           sampling=decode.SamplingParams(temperature=0.8, top_p=0.95),
                           seed=0, eos_id=2)
    gen.tokens  # new tokens of each prompt, cut at the end-of-sequence token

``decode.generate(cfg, params, prompts, ...)`` does both in one call.

Prompts of different lengths are left-padded to a common length P (rounded up
to a power of two, so new prompt texts rarely change a shape) and every row
then decodes in lockstep: slot P + t of the cache holds token t of every row.
Positions count from each row's first real token, and padded slots are masked
out of attention, so a row gives the same tokens alone or in a batch.

Compiled once per (config, batch size, padded prompt length, max_new_tokens,
cache blocks, weight layout): the prompt tokens, seeds, sampling values,
end-of-sequence id and stop sequences are traced arguments. Sampling row b
uses the key of ``seed + b``, so a prompt's sample does not depend on what
else is in the batch. The weights' layouts and the CPU's settings are in
``genjax.sampling.layouts``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from genjax import mesh as meshlib
from genjax.models import transformer
from genjax.sampling import kv_cache, layouts
from genjax.sampling.strategies import GREEDY, SamplingParams, sample_logits

# Stop sequences are padded to these sizes so that adding one rarely recompiles.
_STOP_SLOTS = 4
_STOP_LEN = 8
_NO_TOKEN = -1


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, without the stop token / sequence
    finish_reasons: list[str]  # "eos", "stop" (a stop sequence) or "length"
    prompt_len: int  # padded prompt length P the call compiled for
    logits: np.ndarray | None = None  # [B, max_new_tokens, V] when return_logits


# ----------------------------------------------------------------------------- the loop


def _stop_hit(window_BM: jax.Array, stops_QM: jax.Array) -> jax.Array:
    """Whether each row's last tokens end with any (right-aligned, -1 padded) stop sequence."""
    used_QM = stops_QM != _NO_TOKEN
    equal_BQM = (window_BM[:, None, :] == stops_QM[None]) | ~used_QM[None]
    return jnp.any(jnp.all(equal_BQM, axis=-1) & jnp.any(used_QM, axis=-1)[None], axis=-1)


def _generate(
    cfg: transformer.Config,
    params,
    prompt_BP: jax.Array,
    start_B: jax.Array,
    seeds_B: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    eos_id: jax.Array,
    stops_QM: jax.Array,
    stream: jax.Array | None,
    *,
    max_new_tokens: int,
    return_logits: bool,
    cache_block: int | None,
):
    """Prefill the left-padded prompts, then sample ``max_new_tokens`` in a while loop.

    ``params`` in the ``kv_cache.split_layers`` layout. Returns (new tokens
    [B, N] padded with -1 after a row stops, number of steps run, logits
    [B, N, V] or None). The loop ends early once every row stopped. ``stream`` a traced
    bool: each step's tokens go to the current listener when true; None: the loop holds
    no callback at all.
    """
    B, P = prompt_BP.shape
    N = max_new_tokens
    keys_B = jax.vmap(jax.random.key)(seeds_B)
    positions_BP = jnp.maximum(jnp.arange(P)[None] - start_B[:, None], 0)
    cache = kv_cache.init_cache(cfg, B, P + N, start_B, cache_block)
    logits_BV, cache = kv_cache.decode(cfg, params, prompt_BP, positions_BP, cache)
    cache = cache._replace(slot=jnp.int32(P))  # a traced slot from here on (the loop's carry)

    def cond(carry):
        step, _, _, _, done_B, _, _ = carry
        return (step < N) & ~jnp.all(done_B)

    def body(carry):
        step, logits_BV, cache, out_BN, done_B, window_BM, all_logits = carry
        step_keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, step)
        # Whole rows of logits on every device: top-k/top-p make 64 passes over
        # the vocabulary, each a collective if it stayed split over `tensor`.
        logits_BV = meshlib.constrain(logits_BV, ("batch", None), transformer.RULES)
        token_B = sample_logits(logits_BV, step_keys_B, temperature, top_k, top_p)
        token_B = jnp.where(done_B, _NO_TOKEN, token_B)
        out_BN = jax.lax.dynamic_update_index_in_dim(out_BN, token_B, step, 1)
        if stream is not None:  # a traced switch: streaming or not is one program
            jax.lax.cond(stream, lambda: jax.debug.callback(_deliver, step, token_B), lambda: None)
        if return_logits:
            all_logits = jax.lax.dynamic_update_index_in_dim(all_logits, logits_BV, step, 1)
        window_BM = jnp.concatenate([window_BM[:, 1:], token_B[:, None]], axis=1)
        done_B = done_B | (token_B == eos_id) | _stop_hit(window_BM, stops_QM)
        # Feed the token back: slot P + step, position = the row's length so far.
        positions_B1 = (P + step - start_B)[:, None]
        cache = cache._replace(slot=P + step)
        logits_BV, cache = kv_cache.decode(
            cfg, params, jnp.maximum(token_B, 0)[:, None], positions_B1, cache
        )
        return step + 1, logits_BV, cache, out_BN, done_B, window_BM, all_logits

    out_BN = jnp.full((B, N), _NO_TOKEN, jnp.int32)
    window_BM = jnp.full((B, stops_QM.shape[1]), -2, jnp.int32)  # matches no stop token
    all_logits = jnp.zeros((B, N, cfg.vocab_size), jnp.float32) if return_logits else None
    done_B = jnp.zeros((B,), bool)
    carry = (jnp.int32(0), logits_BV, cache, out_BN, done_B, window_BM, all_logits)
    step, _, _, out_BN, _, _, all_logits = jax.lax.while_loop(cond, body, carry)
    return out_BN, step, all_logits


def sample_in_jit(cfg: transformer.Config, params, prompt_BP: jax.Array, start_B: jax.Array,
                  seeds_B: jax.Array, *, temperature: float, max_new_tokens: int,
                  eos_id: int) -> jax.Array:  # fmt: skip
    """New tokens [B, max_new_tokens] of left-padded prompts (row b starts at
    ``start_B[b]``), -1 after a row's ``eos_id``, which is kept: the decoding loop traced
    into a caller's jit (an RL step's rollouts). ``params`` in the model's own layout.
    Nothing streams: a program holding a host callback never enters JAX's persistent
    compilation cache, and the caller's step would compile anew in every process."""
    out_BN, _, _ = _generate(
        cfg, kv_cache.split_layers(params), prompt_BP, start_B, seeds_B,
        jnp.float32(temperature), jnp.int32(0), jnp.float32(1.0), jnp.int32(eos_id),
        jnp.asarray(_stop_array(())), None,
        max_new_tokens=max_new_tokens, return_logits=False, cache_block=None,
    )  # fmt: skip
    return out_BN


# ----------------------------------------------------------------------------- host side


@functools.cache
def _generate_program(options: tuple[tuple[str, object], ...] = ()):
    """``_generate`` jitted with these XLA compile options (a jit cache per options)."""
    return jax.jit(
        _generate,
        static_argnames=("cfg", "max_new_tokens", "return_logits", "cache_block"),
        compiler_options=dict(options) or None,
    )


def decoding_program(compile_options: dict[str, object] | str = "auto"):
    """The jitted decoding loop compiled with XLA's ``compile_options`` ("auto":
    ``layouts.auto_compile_options``; {} XLA's defaults)."""
    return _generate_program(layouts.compile_options(compile_options))


def padded_prompt_len(longest: int) -> int:
    """Prompt lengths are rounded up to a power of two (at least 8): fewer compiles."""
    return max(8, 1 << (longest - 1).bit_length())


def _stop_array(stop_sequences: Sequence[Sequence[int]]) -> np.ndarray:
    slots = max(_STOP_SLOTS, len(stop_sequences))
    length = max([_STOP_LEN, *map(len, stop_sequences)])
    stops = np.full((slots, length), _NO_TOKEN, np.int32)
    for i, seq in enumerate(stop_sequences):
        if len(seq) == 0:
            raise ValueError(f"stop sequence {i} is empty")
        stops[i, length - len(seq) :] = seq
    return stops


def check_request(
    cfg: transformer.Config, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> None:
    """Everything wrong with a request, said before compiling anything."""
    if not prompts:
        raise ValueError("no prompts: pass at least one list of token ids")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(
                f"prompt {i} is empty: start it with at least one token (e.g. end-of-document)"
            )
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size}): {bad[:5]}")
        if len(prompt) + max_new_tokens > cfg.max_seq_len:
            fix = (
                f"ask for at most {cfg.max_seq_len - len(prompt)} new tokens"
                if len(prompt) < cfg.max_seq_len
                else f"keep it under {cfg.max_seq_len} tokens"
            )
            raise ValueError(
                f"prompt {i} (0-based) has {len(prompt)} tokens; with max_new_tokens="
                f"{max_new_tokens} that exceeds the model's context of {cfg.max_seq_len} "
                f"positions. Shorten the prompt or {fix}"
            )


class Decoder:
    """A model's weights laid out for decoding, and the decoding calls on them.

    Construction lays the weights out once (``layouts.DecodingWeights``); every
    ``generate`` then reuses them. With ``mesh``, calls run under that mesh: pass
    ``params`` sharded as ``transformer.param_axes`` says (the copies keep it).

    ``cache_block`` cuts the KV cache into blocks of that many slots so that
    each step reads only the blocks filled so far (``kv_cache.cached_attention``);
    None keeps one block; "auto" picks per request (``layouts.auto_cache_block``).
    ``column_blocks`` stores the projections as that many blocks of columns
    for calls of one prompt (``layouts.ColumnBlocks``); 1 keeps them plain;
    "auto" is ``layouts.auto_column_blocks``. ``compile_options`` are XLA's, for
    the decoding programs ("auto": ``layouts.auto_compile_options``).
    """

    def __init__(
        self,
        cfg: transformer.Config,
        params,
        *,
        mesh: jax.sharding.Mesh | None = None,
        cache_block: int | str | None = "auto",
        column_blocks: int | str = "auto",
        compile_options: dict[str, object] | str = "auto",
    ):
        if not (
            cache_block in (None, "auto")
            or (type(cache_block) is int and cache_block > 0)  # not a bool
        ):
            raise ValueError(f"cache_block={cache_block!r}: pass a positive int, None or 'auto'")
        if column_blocks == "auto":
            column_blocks = layouts.auto_column_blocks(cfg)
        elif not (type(column_blocks) is int and column_blocks > 0):
            raise ValueError(f"column_blocks={column_blocks!r}: pass a positive int or 'auto'")
        self.program = decoding_program(compile_options)
        self.cfg, self.cache_block = cfg, cache_block
        self.weights = layouts.DecodingWeights(cfg, params, mesh, column_blocks)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        sampling: SamplingParams = GREEDY,
        seed: int = 0,
        eos_id: int | None = None,
        stop_sequences: Sequence[Sequence[int]] = (),
        on_token: Callable[[int, np.ndarray], None] | None = None,
        return_logits: bool = False,
    ) -> Generation:
        """Continues each prompt (a list of token ids) by up to ``max_new_tokens`` tokens.

        A row stops after ``eos_id`` or after producing any of ``stop_sequences``
        (token ids); neither is included in ``Generation.tokens``. ``on_token(step,
        tokens_B)`` is called from inside the compiled loop as each token is made
        (-1 for rows already stopped), for streaming.
        """
        cfg = self.cfg
        check_request(cfg, prompts, max_new_tokens)
        B = len(prompts)
        P = padded_prompt_len(max(map(len, prompts)))
        prompt_BP = np.zeros((B, P), np.int32)
        start_B = np.zeros((B,), np.int32)
        for b, prompt in enumerate(prompts):
            prompt_BP[b, P - len(prompt) :] = prompt
            start_B[b] = P - len(prompt)
        args = (
            prompt_BP,
            start_B,
            np.arange(seed, seed + B, dtype=np.uint32),  # row b samples with seed + b
            np.float32(sampling.temperature),
            np.int32(sampling.top_k),
            np.float32(sampling.top_p),
            np.int32(-1 if eos_id is None else eos_id),
            _stop_array(stop_sequences),
            np.bool_(on_token is not None),
        )
        static = dict(
            max_new_tokens=max_new_tokens,
            return_logits=return_logits,
            cache_block=(
                layouts.auto_cache_block(cfg, B, P + max_new_tokens)
                if self.cache_block == "auto"
                else self.cache_block
            ),
        )
        layout = self.weights.layout
        weights = self.weights.for_batch(B)
        with _listening(on_token), self.weights.context(B):
            out_BN, steps, logits = self.program(cfg, weights, *args, **static)
            out_BN, steps = np.asarray(out_BN), int(steps)  # waits for the loop and callbacks
        where = self.weights.mesh if self.weights.sharded(B) else None
        signature = (self.program, cfg, where, B, P, self.weights.layout, args[7].shape)
        relaid_out = layout != self.weights.layout
        layouts.release_heap_after_compile((*signature, *static.items()), relaid_out)
        tokens, reasons = [], []
        for row in out_BN[:, :steps].tolist():
            new, reason = _cut(row, eos_id, stop_sequences)
            tokens.append(new)
            reasons.append(reason)
        logits = None if logits is None else np.asarray(logits)
        return Generation(tokens, reasons, P, logits)


def generate(
    cfg: transformer.Config,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    mesh: jax.sharding.Mesh | None = None,
    cache_block: int | str | None = "auto",
    column_blocks: int | str = "auto",
    compile_options: dict[str, object] | str = "auto",
    **kwargs,
) -> Generation:
    """One-off ``Decoder(cfg, params, mesh=, cache_block=, column_blocks=,
    compile_options=).generate(prompts, **kwargs)``. Lays the weights out on
    every call; keep a ``Decoder`` to decode repeatedly.
    """
    if column_blocks == "auto" and len(prompts) > 1:
        column_blocks = 1  # the layout several prompts decode with, at once
    decoder = Decoder(
        cfg,
        params,
        mesh=mesh,
        cache_block=cache_block,
        column_blocks=column_blocks,
        compile_options=compile_options,
    )
    return decoder.generate(prompts, **kwargs)


def _cut(row: list[int], eos_id: int | None, stops: Sequence[Sequence[int]]):
    """The row's tokens up to (not including) what stopped it, and why it stopped."""
    if _NO_TOKEN in row:
        row = row[: row.index(_NO_TOKEN)]
    if eos_id is not None and row and row[-1] == eos_id:
        return row[:-1], "eos"
    for seq in sorted(stops, key=len, reverse=True):  # [3, 7] and [7] both end [5, 3, 7]
        if len(row) >= len(seq) and row[len(row) - len(seq) :] == list(seq):
            return row[: len(row) - len(seq)], "stop"
    return row, "length"


# Streaming: the compiled loop calls one module-level function (so a new
# callback never recompiles), which hands the tokens to the current listener.
# Not thread-local: XLA runs the callback on its own threads.
_listener: dict[str, _OrderedStream | None] = {"stream": None}


@contextlib.contextmanager
def _listening(on_token: Callable[[int, np.ndarray], None] | None):
    previous = _listener["stream"]
    _listener["stream"] = _OrderedStream(on_token) if on_token is not None else None
    try:
        yield
    finally:
        _listener["stream"] = previous


def _deliver(step, tokens_B) -> None:
    stream = _listener["stream"]
    if stream is not None:
        stream(int(step), np.asarray(tokens_B))


class _OrderedStream:
    """Delivers streamed tokens in step order: ``jax.debug.callback`` gives no
    ordering guarantee, so early arrivals wait in a buffer."""

    def __init__(self, on_token: Callable[[int, np.ndarray], None]):
        self.on_token = on_token
        self.next_step = 0
        self.pending: dict[int, np.ndarray] = {}

    def __call__(self, step: int, tokens_B: np.ndarray) -> None:
        self.pending[step] = tokens_B
        while self.next_step in self.pending:
            self.on_token(self.next_step, self.pending.pop(self.next_step))
            self.next_step += 1
