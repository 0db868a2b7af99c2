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
else is in the batch.

On a CPU a single prompt decodes with its projections stored as blocks of
columns (``transformer.ColumnBlocks``), so that each step's one-row matmuls
run on every core; several prompts use the plain layout.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import math
import os
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from genjax import mesh as meshlib
from genjax.models import transformer

# Stop sequences are padded to these sizes so that adding one rarely recompiles.
_STOP_SLOTS = 4
_STOP_LEN = 8
_NO_TOKEN = -1


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


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, without the stop token / sequence
    finish_reasons: list[str]  # "eos", "stop" (a stop sequence) or "length"
    prompt_len: int  # padded prompt length P the call compiled for
    logits: np.ndarray | None = None  # [B, max_new_tokens, V] when return_logits


# ----------------------------------------------------------------------------- sampling


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
    likely tokens until their probability reaches top_p (at least one token).
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
    return jnp.where(p_keys_BV >= nucleus_B[:, None], logits_BV, -jnp.inf)


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
    stream: jax.Array,
    *,
    max_new_tokens: int,
    return_logits: bool,
    cache_block: int | None,
):
    """Prefill the left-padded prompts, then sample ``max_new_tokens`` in a while loop.

    ``params`` in the ``transformer.split_layers`` layout. Returns (new tokens
    [B, N] padded with -1 after a row stops, number of steps run, logits
    [B, N, V] or None). The loop ends early once every row stopped.
    """
    B, P = prompt_BP.shape
    N = max_new_tokens
    keys_B = jax.vmap(jax.random.key)(seeds_B)
    positions_BP = jnp.maximum(jnp.arange(P)[None] - start_B[:, None], 0)
    cache = transformer.init_cache(cfg, B, P + N, start_B, cache_block)
    logits_BV, cache = transformer.decode(cfg, params, prompt_BP, positions_BP, cache)
    cache = cache._replace(slot=jnp.int32(P))  # a traced slot from here on (the loop's carry)

    def cond(carry):
        step, _, _, _, done_B, _, _ = carry
        return (step < N) & ~jnp.all(done_B)

    def body(carry):
        step, logits_BV, cache, out_BN, done_B, window_BM, all_logits = carry
        step_keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, step)
        # Whole rows of logits on every device: top-k/top-p make 64 passes over
        # the vocabulary, each a collective if it stayed split over `tensor`.
        logits_BV = meshlib.constrain(logits_BV, ("batch", None))
        token_B = sample_logits(logits_BV, step_keys_B, temperature, top_k, top_p)
        token_B = jnp.where(done_B, _NO_TOKEN, token_B)
        out_BN = jax.lax.dynamic_update_index_in_dim(out_BN, token_B, step, 1)
        # A traced switch: streaming or not is the same program (one compile).
        jax.lax.cond(stream, lambda: jax.debug.callback(_deliver, step, token_B), lambda: None)
        if return_logits:
            all_logits = jax.lax.dynamic_update_index_in_dim(all_logits, logits_BV, step, 1)
        window_BM = jnp.concatenate([window_BM[:, 1:], token_B[:, None]], axis=1)
        done_B = done_B | (token_B == eos_id) | _stop_hit(window_BM, stops_QM)
        # Feed the token back: slot P + step, position = the row's length so far.
        positions_B1 = (P + step - start_B)[:, None]
        cache = cache._replace(slot=P + step)
        logits_BV, cache = transformer.decode(
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


# ----------------------------------------------------------------------------- host side


# XLA:CPU compile options of the decoding programs. The MLIR fusion emitters
# (XLA's default) take most of a decoding loop's compile memory (cpu-small, peak
# RSS while compiling, experiments/benchmarks/decode_compile_memory.py: batch 1
# +184 MB with them against +57 without, batch 16 +165 against +77) and gain
# little at decoding shapes (batch 1 the same speed; batch 16 1.5-4% faster, in
# the cache writes); without them the compile takes longer (batch 1 2.5 -> 2.8 s,
# batch 16 2.9 -> 4.4 s).
CPU_COMPILE_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


@functools.cache
def _generate_program(options: tuple[tuple[str, object], ...] = ()):
    """``_generate`` jitted with these XLA compile options (a jit cache per options)."""
    return jax.jit(
        _generate,
        static_argnames=("cfg", "max_new_tokens", "return_logits", "cache_block"),
        compiler_options=dict(options) or None,
    )


@functools.cache
def _options_supported(options: tuple[tuple[str, object], ...]) -> bool:
    """Whether this jaxlib's compiler takes ``options`` (a name it lacks is an error)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options))(np.int32(0))
    except jax.errors.JaxRuntimeError as e:
        if "No such compile option" in str(e):
            return False
        raise
    return True


def auto_compile_options() -> dict[str, object]:
    """``CPU_COMPILE_OPTIONS`` on a CPU (where this jaxlib knows them); none elsewhere."""
    if jax.default_backend() != "cpu":
        return {}
    supported = _options_supported(tuple(sorted(CPU_COMPILE_OPTIONS.items())))
    return dict(CPU_COMPILE_OPTIONS) if supported else {}


def decoding_program(compile_options: dict[str, object] | str = "auto"):
    """The jitted decoding loop (``_generate``) compiled with XLA's ``compile_options``;
    "auto" is ``auto_compile_options``, {} XLA's defaults."""
    if compile_options == "auto":
        compile_options = auto_compile_options()
    elif not isinstance(compile_options, dict):
        raise ValueError(f"compile_options={compile_options!r}: pass a dict or 'auto'")
    options = tuple(sorted(compile_options.items()))
    if options and not _options_supported(options):  # before any layout work or compile
        raise ValueError(
            f"compile_options={compile_options!r}: this jaxlib's XLA does not know one of "
            "these options (names are XLA DebugOptions fields, e.g. xla_cpu_use_fusion_emitters)"
        )
    return _generate_program(options)


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
            raise ValueError(
                f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} that "
                f"exceeds the model's context of {cfg.max_seq_len} positions. Shorten the prompt "
                f"or ask for at most {cfg.max_seq_len - len(prompt)} new tokens"
            )


_decoding_layout = jax.jit(
    lambda params, blocks: transformer.with_column_blocks(transformer.split_layers(params), blocks),
    static_argnums=1,
)
_relayout_layer = jax.jit(transformer.layer_with_column_blocks, static_argnums=1)
_relayout_head = jax.jit(transformer.head_with_column_blocks, static_argnums=1)


def _find_malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library lacks it (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()
# Call signatures the decoding programs have compiled, across Decoders (the jit cache is too).
_COMPILED: set[tuple] = set()


def release_free_heap() -> None:
    """Hands the C heap's free pages back to the OS (glibc's ``malloc_trim``; else nothing).

    Compiling a decoding program and laying the weights out again free large
    transients, which glibc keeps mapped in the process: later calls then peak
    on top of them. ``Decoder`` trims after a call that compiled or re-laid out
    the weights (15-25 ms, after a compile of seconds): cpu-small peak RSS in
    ``experiments/benchmarks/lm_decode_speed.py --reps 3`` 544 -> 507 MB on one
    XLA CPU device, 728 -> 601 MB on two (RESULTS.md, 2026-12-02).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def auto_column_blocks(cfg: transformer.Config) -> int:
    """One block of projection columns per CPU core on a CPU; 1 on accelerators.

    The count must divide every projection's output columns; measured on 2
    cores only (cpu-small batch 1: 2.3 → 1.9 ms a step with 2 blocks).
    """
    if jax.default_backend() != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    D, F, V, K = cfg.d_model, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    columns = math.gcd(D, F, V, (cfg.num_heads + 2 * cfg.num_kv_heads) * K)
    return max(b for b in range(1, (cores or 1) + 1) if columns % b == 0)


# "auto" blocks a cache of at least this many bytes (all layers, keys and values).
_BLOCKED_CACHE_BYTES = 32 << 20


def auto_cache_block(cfg: transformer.Config, batch: int, slots: int) -> int | None:
    """The cache block for a request: two halves on a CPU when the cache is large.

    Reading only the filled blocks saves memory traffic at every step, but
    each block count is one more attention program per layer to compile.
    Measured on cpu-small at batch 16 with 256 slots (a 75 MB cache, 2-core
    CPU): one block 1,233 new tokens/s and 1.7 s of compile; halves 1,438
    and 2.6 s; blocks of 64 1,498 and 4.6 s. Halves take most of the gain
    for a third of the compile. At batch 1 (9 MB) the saving is within noise.
    Accelerators keep one block: XLA:GPU reads a conditional's branch index
    back to the host, a sync at every layer.
    """
    if jax.default_backend() != "cpu":
        return None
    itemsize = jnp.dtype(cfg.dtype).itemsize
    cache_bytes = 2 * cfg.num_layers * batch * slots * cfg.num_kv_heads * cfg.head_dim * itemsize
    return -(-slots // 2) if cache_bytes >= _BLOCKED_CACHE_BYTES else None


class Decoder:
    """A model's weights laid out for decoding, and the decoding calls on them.

    Construction cuts the stacked block weights into one buffer per layer,
    once (see ``transformer.split_layers``); every ``generate`` then reuses
    them. This is a copy of the block weights: drop the training parameters
    if memory is tight. With ``mesh``, calls run under that mesh: pass
    ``params`` sharded as ``transformer.param_axes`` says (the copies keep it).

    ``cache_block`` cuts the KV cache into blocks of that many slots so that
    each step reads only the blocks filled so far (``transformer.cached_attention``);
    None keeps one block; "auto" picks per request (``auto_cache_block``).
    ``column_blocks`` stores the projections as that many blocks of columns
    for calls of one prompt (``transformer.ColumnBlocks``: their steps then use
    every CPU core), on the mesh's first device; 1 keeps them plain and where
    they are; "auto" is ``auto_column_blocks``. The layout follows the calls:
    a call of several prompts after one of a single prompt (or the reverse)
    first lays the weights out again, a layer at a time. So on a CPU split into
    devices (``jax_num_cpu_devices``), a ``tensor=2`` mesh serves batches in
    parallel over the devices and single prompts on one device's cores.
    ``compile_options`` are XLA's, for the decoding programs (``self.program``:
    ``decoding_program(compile_options)``).
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
            column_blocks = auto_column_blocks(cfg)
        elif not (type(column_blocks) is int and column_blocks > 0):
            raise ValueError(f"column_blocks={column_blocks!r}: pass a positive int or 'auto'")
        self.program = decoding_program(compile_options)
        self.cfg, self.mesh, self.cache_block = cfg, mesh, cache_block
        self.column_blocks = column_blocks
        # Without devices to move between, the first layout is the single prompt's.
        first = 1 if self._multi_device else column_blocks
        with self._mesh(batch=2):
            self.params = _decoding_layout(params, first)
        self._layout = first  # of self.params

    @property
    def _multi_device(self) -> bool:
        return self.mesh is not None and self.mesh.size > 1

    def _sharded(self, batch: int) -> bool:
        """Whether a call of ``batch`` prompts runs on the mesh (else on one device)."""
        return self._multi_device and not (batch == 1 and self.column_blocks > 1)

    def _mesh(self, batch: int):
        return jax.set_mesh(self.mesh) if self._sharded(batch) else contextlib.nullcontext()

    def _weights(self, batch: int):
        """The weights laid out for a call of ``batch`` prompts."""
        layout = self.column_blocks if batch == 1 else 1
        if layout == self._layout:
            return self.params
        if not self._multi_device:  # the layout changes, the place does not
            place = lambda key, i=None: None
        elif self._sharded(batch):  # back onto the mesh, as param_axes shards them
            plain = jax.eval_shape(transformer.split_layers, transformer.abstract_params(self.cfg))
            axes = transformer.split_layers_axes(self.cfg)
            shardings = meshlib.tree_shardings(axes, plain, self.mesh)
            place = lambda key, i=None: shardings[key] if i is None else shardings[key][i]
        else:  # off the mesh, onto its first device
            device = jax.sharding.SingleDeviceSharding(self.mesh.devices.flat[0])
            place = lambda key, i=None: device
        put = lambda x, to: x if to is None else jax.device_put(x, to)
        layers = self.params["blocks"]
        for i in range(len(layers)):  # a layer at a time: each old one is freed as we go
            layers[i] = put(_relayout_layer(layers[i], layout), place("blocks", i))
        head_DV = _relayout_head(self.params["head_DV"], layout)
        self.params["head_DV"] = put(head_DV, place("head_DV"))
        for key in self.params.keys() - {"blocks", "head_DV"}:
            self.params[key] = put(self.params[key], place(key))
        self._layout = layout
        return self.params

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
                auto_cache_block(cfg, B, P + max_new_tokens)
                if self.cache_block == "auto"
                else self.cache_block
            ),
        )
        layout = self._layout
        weights = self._weights(B)
        mesh = self.mesh if self._sharded(B) else None
        signature = (self.program, cfg, mesh, B, P, self._layout, args[7].shape, *static.items())
        with _listening(on_token), self._mesh(B):
            out_BN, steps, logits = self.program(cfg, weights, *args, **static)
            out_BN, steps = np.asarray(out_BN), int(steps)  # waits for the loop and callbacks
        if signature not in _COMPILED or layout != self._layout:
            _COMPILED.add(signature)
            release_free_heap()  # the compile's (or relayout's) freed transients
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
    for seq in stops:
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
