"""KV-cached decoding and sampling (genjax.sampling.decode)."""

import dataclasses
import math
import os
import platform
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from genjax import mesh as meshlib
from genjax.models import transformer
from genjax.nn.layers import einsum
from genjax.sampling import decode, kv_cache, layouts, strategies

# init_std 0.1: logits spread enough that argmax ties and near-ties do not occur.
CFG = dataclasses.replace(transformer.get_preset("tiny"), init_std=0.1)
# Row 0 pads the batch to 16 positions; rows 1 and 2 alone pad to 8.
PROMPTS = [[2, 5, 7, 9, 11, 13, 17, 19, 23, 29], [2, 3], [2, 40, 41, 42, 43]]
NEW = 10  # one max_new_tokens for most tests: fewer compiles
# Cached logits agree with full recomputation to float32 rounding: the same
# matmuls on [B·1, D] instead of [B·T, D] rows, and softmax sums over extra
# masked (exactly zero) terms. Logits here have std ≈ 0.4.
LOGIT_ATOL = 2e-5


@pytest.fixture(scope="module")
def params():
    return transformer.init(CFG, jax.random.key(0))


_forward = jax.jit(transformer.forward, static_argnums=0)


def full_forward(cfg, params, seq):
    """Logits [len(seq), V] by one forward over the sequence, padded to the full
    context (causality makes the padding irrelevant) so every call shares a compile."""
    tokens = np.zeros((1, cfg.max_seq_len), np.int32)
    tokens[0, : len(seq)] = seq
    return np.asarray(_forward(cfg, params, jnp.asarray(tokens))[0, : len(seq)])


def full_forward_logits(cfg, params, prompt, new_tokens):
    """Logits predicting each new token, recomputed from the whole sequence."""
    logits = full_forward(cfg, params, list(prompt) + list(new_tokens))
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(new_tokens)]


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_logits_equal_full_recomputation_at_every_step(params, scan_layers):
    cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
    sampling = decode.SamplingParams(temperature=1.0, top_p=0.9)
    gen = decode.generate(
        cfg, params, PROMPTS, max_new_tokens=NEW, sampling=sampling, seed=3, return_logits=True
    )
    for b, prompt in enumerate(PROMPTS):
        assert len(gen.tokens[b]) == NEW
        ref = full_forward_logits(cfg, params, prompt, gen.tokens[b])
        np.testing.assert_allclose(gen.logits[b], ref, atol=LOGIT_ATOL, rtol=0)


def test_blocked_cache_equals_full_recomputation_and_one_block(params):
    # 16 prompt slots + 10 new in blocks of 4: the prefill writes across four
    # blocks, and each step reads the 5th..7th block only once it is reached.
    assert kv_cache.cache_block_sizes(16 + NEW, 4) == [4] * 6 + [2]
    sampling = decode.SamplingParams(temperature=1.0, top_p=0.9)
    kw = dict(max_new_tokens=NEW, sampling=sampling, seed=3, return_logits=True)
    blocked = decode.generate(CFG, params, PROMPTS, cache_block=4, **kw)
    single = decode.generate(CFG, params, PROMPTS, cache_block=None, **kw)
    assert blocked.tokens == single.tokens
    for b, prompt in enumerate(PROMPTS):
        ref = full_forward_logits(CFG, params, prompt, blocked.tokens[b])
        np.testing.assert_allclose(blocked.logits[b], ref, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize(
    "slots,block,sizes",
    [(256, 64, [64] * 4), (256, 16, [32] * 8), (26, 4, [4] * 6 + [2]), (100, None, [100]),
     (50, 64, [50]), (65, 64, [64, 1])],
)  # fmt: skip
def test_cache_block_sizes(slots, block, sizes):
    assert kv_cache.cache_block_sizes(slots, block) == sizes


def test_write_window_writes_exactly_the_overlap():
    rng = np.random.default_rng(0)
    for n, T in [(8, 1), (8, 3), (4, 10), (5, 5)]:
        buf = rng.standard_normal((2, n))
        new = rng.standard_normal((2, T))
        for offset in range(-T - 1, n + 2):
            want = buf.copy()
            for t in range(T):
                if 0 <= offset + t < n:
                    want[:, offset + t] = new[:, t]
            got = kv_cache._write_window(jnp.asarray(buf), jnp.asarray(new), offset, axis=1)
            np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))


def test_auto_cache_block_blocks_only_large_caches_on_cpu():
    small = transformer.get_preset("cpu-small")
    on_cpu = jax.default_backend() == "cpu"
    assert layouts.auto_cache_block(small, 16, 256) == (128 if on_cpu else None)  # 75 MB
    assert layouts.auto_cache_block(small, 2, 256) is None  # 9 MB
    for bad in (0, -4, True, "halves"):
        with pytest.raises(ValueError, match="cache_block"):
            decode.Decoder(CFG, {}, cache_block=bad)


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("static_slot", [True, False], ids=["static_slot", "traced_slot"])
def test_cached_attention_never_reads_blocks_past_the_last_query(T, static_slot):
    # Blocks of 4 over 16 slots; the blocks after the last query's are NaN, so
    # reading one block too many poisons the output (masking does not help:
    # 0 · NaN), and reading too few differs from the one-block reference.
    B, N, G, K, S = 2, 4, 2, 8, 16
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, T, N, K)).astype(np.float32)
    k_BGSK = rng.standard_normal((B, G, S, K)).astype(np.float32)
    v_BGSK = rng.standard_normal((B, G, S, K)).astype(np.float32)
    start_B = jnp.array([0, 3])  # row 1 is left-padded by 3 slots
    starts = [0, 4, 8, 12]

    def attend(slot, k, v, block_starts):
        cuts = block_starts[1:]
        k_blocks, v_blocks = tuple(np.split(k, cuts, axis=2)), tuple(np.split(v, cuts, axis=2))
        return kv_cache.cached_attention(q, k_blocks, v_blocks, slot, start_B, block_starts)

    for first in range(3, S - T + 1):
        unused = ((first + T - 1) // 4 + 1) * 4  # first slot of the first unused block
        poisoned_k, poisoned_v = k_BGSK.copy(), v_BGSK.copy()
        poisoned_k[:, :, unused:] = np.nan
        poisoned_v[:, :, unused:] = np.nan
        if static_slot:
            out = attend(first, poisoned_k, poisoned_v, starts)
        else:
            out = jax.jit(lambda s, k, v: attend(s, k, v, starts))(first, poisoned_k, poisoned_v)
        zeroed_k, zeroed_v = np.nan_to_num(poisoned_k), np.nan_to_num(poisoned_v)
        ref = attend(jnp.int32(first), zeroed_k, zeroed_v, [0])
        np.testing.assert_allclose(out, ref, atol=1e-6, err_msg=f"first slot {first}")


@pytest.mark.parametrize("column_blocks,cache_block", [(1, None), (2, None), (4, 4)])
def test_single_prompt_logits_equal_full_recomputation(params, column_blocks, cache_block):
    # One prompt: a cache without the batch axis, and with column
    # blocks every projection is a dot batched over blocks of its columns.
    sampling = decode.SamplingParams(temperature=1.0, top_k=40)
    gen = decode.generate(
        CFG, params, PROMPTS[:1], max_new_tokens=NEW, sampling=sampling, seed=3,
        return_logits=True, column_blocks=column_blocks, cache_block=cache_block,
    )  # fmt: skip
    ref = full_forward_logits(CFG, params, PROMPTS[0], gen.tokens[0])
    np.testing.assert_allclose(gen.logits[0], ref, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("options", ["auto", {}], ids=["auto_options", "xla_defaults"])
@pytest.mark.parametrize("batch", [1, 2])
def test_decoding_loop_never_copies_the_cache(params, batch, options):
    # XLA:CPU copied every cache buffer at each step when the batch axis was a
    # unit one; the compiled loop must update the buffers in place.
    P, G, K = 8, CFG.num_kv_heads, CFG.head_dim
    args = (np.zeros((batch, P), np.int32), np.zeros(batch, np.int32))
    args += (np.zeros(batch, np.uint32), np.float32(0), np.int32(0), np.float32(1))
    args += (np.int32(-1), decode._stop_array([]), np.bool_(False))
    weights = layouts.DecodingWeights(CFG, params, None, column_blocks=1).params
    hlo = (
        decode.decoding_program(options)
        .lower(CFG, weights, *args, max_new_tokens=NEW, return_logits=False, cache_block=None)
        .compile()
        .as_text()
    )
    cache_size = batch * G * K * (P + NEW)  # one layer's keys (or values), any shape
    copies = [
        line
        for line in hlo.splitlines()
        if (m := re.search(r"= f32\[([\d,]+)\]\S* copy\(", line))
        and math.prod(map(int, m.group(1).split(","))) == cache_size
    ]
    assert not copies, copies[:3]


def test_column_blocks_apply_and_merge_exactly():
    rng = np.random.default_rng(0)
    x_BTNK = jnp.asarray(rng.standard_normal((3, 2, 4, 8)), jnp.float32)
    w_NKD = jnp.asarray(rng.standard_normal((4, 8, 6)), jnp.float32)
    w_NKF = jnp.asarray(rng.standard_normal((4, 8, 10)), jnp.float32)
    blocks = layouts.ColumnBlocks.of([w_NKD, w_NKF], in_dims=2, blocks=4)
    assert blocks.w_SIO.shape == (4, 32, 4)  # 6 + 10 columns in 4 blocks
    for got, w in zip(blocks.merged(), (w_NKD, w_NKF), strict=True):
        np.testing.assert_array_equal(got, w)
    for got, w in zip(blocks.project(x_BTNK), (w_NKD, w_NKF), strict=True):
        np.testing.assert_allclose(got, einsum("BTNK,NKD->BTD", x_BTNK, w), atol=1e-5)
    with pytest.raises(ValueError, match="16 output columns do not split into 3 blocks"):
        layouts.ColumnBlocks.of([w_NKD, w_NKF], in_dims=2, blocks=3)


def test_column_block_layout_round_trips_exactly(params):
    plain = kv_cache.split_layers(params)
    blocked = layouts.with_column_blocks(plain, 2)
    assert isinstance(blocked["blocks"][0]["attn"]["wq_DNK"], layouts.ColumnBlocks)
    assert isinstance(blocked["blocks"][0]["attn"]["wk_DGK"], layouts.Joined)
    for layout in (layouts.with_column_blocks(blocked, 1), layouts.with_column_blocks(
        layouts.with_column_blocks(blocked, 4), 1)):  # fmt: skip
        assert jax.tree.structure(layout) == jax.tree.structure(plain)
        for a, b in zip(jax.tree.leaves(layout), jax.tree.leaves(plain), strict=True):
            np.testing.assert_array_equal(a, b)


def test_decoder_relays_out_its_weights_between_one_and_many_prompts(params):
    # One Decoder serving one prompt, then three, then one again gives what
    # fresh decoders give: the layout switches (column blocks <-> plain) are exact.
    decoder = decode.Decoder(CFG, params, column_blocks=2)
    kw = dict(max_new_tokens=NEW, return_logits=True)
    calls = [PROMPTS[:1], PROMPTS, PROMPTS[:1]]
    for prompts in calls:
        got = decoder.generate(prompts, **kw)
        fresh = decode.generate(CFG, params, prompts, column_blocks=1, **kw)
        assert got.tokens == fresh.tokens
        np.testing.assert_allclose(got.logits, fresh.logits, atol=LOGIT_ATOL, rtol=0)
    assert decoder.weights.layout == 2  # the last call was of one prompt


def test_auto_column_blocks_one_per_cpu_core():
    small = transformer.get_preset("cpu-small")
    if jax.default_backend() != "cpu":
        assert layouts.auto_column_blocks(small) == 1
        return
    cores = len(os.sched_getaffinity(0))
    blocks = layouts.auto_column_blocks(small)
    assert 1 <= blocks <= cores and 128 % blocks == 0  # gcd of cpu-small's column counts
    for bad in (0, 1.5, "two"):
        with pytest.raises(ValueError, match="column_blocks"):
            decode.Decoder(CFG, params={}, column_blocks=bad)


def test_greedy_equals_argmax_loop_over_full_forwards(params):
    prompt, num_new = PROMPTS[0], NEW
    gen = decode.generate(CFG, params, [prompt], max_new_tokens=num_new)
    seq = list(prompt)
    for _ in range(num_new):
        seq.append(int(np.argmax(full_forward(CFG, params, seq)[-1])))
    assert gen.tokens[0] == seq[len(prompt) :]
    assert gen.finish_reasons == ["length"]


@pytest.mark.parametrize(
    "sampling",
    [decode.SamplingParams(), decode.SamplingParams(temperature=1.0, top_k=50, top_p=0.9)],
    ids=["greedy", "top_k_top_p"],
)
def test_batch_of_different_lengths_equals_each_prompt_alone(params, sampling):
    batch = decode.generate(CFG, params, PROMPTS, max_new_tokens=NEW, sampling=sampling, seed=7)
    assert batch.prompt_len == 16
    for b, prompt in enumerate(PROMPTS):
        # Row b samples with seed + b: alone, it gets that seed directly.
        alone = decode.generate(
            CFG, params, [prompt], max_new_tokens=NEW, sampling=sampling, seed=7 + b
        )
        assert alone.tokens[0] == batch.tokens[b]


def test_reproducible_by_seed_and_seed_matters(params):
    sampling = decode.SamplingParams(temperature=1.5)
    run = lambda seed: (
        decode.generate(
            CFG, params, PROMPTS, max_new_tokens=NEW, sampling=sampling, seed=seed
        ).tokens
    )
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_temperature_to_zero_equals_greedy(params):
    greedy = decode.generate(CFG, params, PROMPTS, max_new_tokens=NEW).tokens
    cold = decode.SamplingParams(temperature=1e-4)
    assert decode.generate(CFG, params, PROMPTS, max_new_tokens=NEW, sampling=cold).tokens == greedy


def reference_distribution(logits, temperature, top_k, top_p):
    """The truncated, renormalized distribution, computed independently in numpy."""
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros_like(p, dtype=bool)
    k = top_k if top_k > 0 else len(p)
    kept_mass = p[order[:k]] / p[order[:k]].sum()
    mass = 0.0
    for rank, i in enumerate(order[:k]):
        keep[i] = True
        mass += kept_mass[rank]
        if mass >= top_p:
            break
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.0, 0, 0.8), (1.3, 5, 0.6), (0.5, 2, 0.99)],
)
def test_sampling_follows_truncated_distribution_chi_square(temperature, top_k, top_p):
    logits_V = np.array([2.0, 1.5, 1.2, 0.9, 0.3, 0.0, -0.5, -1.5], np.float32)
    draws = 40_000
    keys = jax.random.split(jax.random.key(0), draws)
    tokens = strategies.sample_logits(
        jnp.broadcast_to(logits_V, (draws, len(logits_V))),
        keys,
        jnp.float32(temperature),
        jnp.int32(top_k),
        jnp.float32(top_p),
    )
    counts = np.bincount(np.asarray(tokens), minlength=len(logits_V))
    expected = reference_distribution(logits_V.astype(np.float64), temperature, top_k, top_p)
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a token outside the truncated set"
    _, p_value = stats.chisquare(counts[support], expected[support] * draws)
    assert p_value > 1e-3, (counts, expected * draws)


def test_inverse_cdf_sampling_never_draws_a_zero_probability_token():
    probs_V = np.array([0.0, 0.3, 0.0, 0.0, 0.7, 0.0], np.float32)  # zeros at both ends too
    draws = 20_000
    keys = jax.random.split(jax.random.key(1), draws)
    tokens = strategies.inverse_cdf_sample(jnp.broadcast_to(probs_V, (draws, 6)), keys)
    counts = np.bincount(np.asarray(tokens), minlength=6)
    assert counts[probs_V == 0].sum() == 0
    _, p_value = stats.chisquare(counts[[1, 4]], [0.3 * draws, 0.7 * draws])
    assert p_value > 1e-3, counts


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (40, 1.0), (100, 0.9), (1, 0.3), (0, 0.999)])
def test_truncated_set_equals_sorting_reference_on_a_large_vocabulary(top_k, top_p):
    logits_BV = 3.0 * jax.random.normal(jax.random.key(top_k), (4, 4096))
    kept = np.isfinite(np.asarray(strategies.truncate_logits(logits_BV, top_k, top_p)))
    for row, logits in zip(kept, np.asarray(logits_BV, np.float64), strict=True):
        expected = reference_distribution(logits, 1.0, top_k, top_p) > 0
        np.testing.assert_array_equal(row, expected)


def test_top_p_of_one_keeps_the_whole_top_k():
    """A tail whose float32 probabilities add nothing to the head's 1.0 stays in."""
    logits_BV = jnp.array([[0.0, -20.0, -21.0, -22.0]])
    kept = np.isfinite(np.asarray(strategies.truncate_logits(logits_BV, 3, 1.0)))
    assert kept.tolist() == [[True, True, True, False]]


def test_changing_prompt_seed_or_sampling_values_does_not_recompile(params):
    generate = lambda prompts, **kw: decode.generate(CFG, params, prompts, max_new_tokens=NEW, **kw)
    generate([[2, 5, 6]])
    program = decode.decoding_program("auto")
    compiled = program._cache_size()
    assert compiled >= 1  # generate used this program
    generate([[2, 9, 9, 9, 1]], seed=4)  # another prompt text, same padded length
    generate([[2, 5, 6]], sampling=decode.SamplingParams(temperature=0.8, top_k=7, top_p=0.5))
    generate([[2, 5, 6]], sampling=decode.SamplingParams(temperature=1.2), seed=9)
    generate([[2, 5, 6]], eos_id=3, stop_sequences=[[4, 4]])
    generate([[2, 5, 6]], on_token=lambda step, tokens: None)  # streaming
    assert program._cache_size() == compiled


def test_compile_options_do_not_change_results(params):
    # On a CPU "auto" drops XLA's MLIR fusion emitters (less compile memory);
    # the decoded tokens and logits must not depend on it.
    on_cpu = jax.default_backend() == "cpu"
    assert layouts.auto_compile_options() == (layouts.CPU_COMPILE_OPTIONS if on_cpu else {})
    auto = layouts.compile_options("auto")
    assert auto == layouts.compile_options(layouts.auto_compile_options())
    kw = dict(max_new_tokens=NEW, return_logits=True)
    tuned = decode.generate(CFG, params, PROMPTS, **kw)
    default = decode.generate(CFG, params, PROMPTS, compile_options={}, **kw)
    assert tuned.tokens == default.tokens
    np.testing.assert_allclose(tuned.logits, default.logits, atol=2e-5)


def test_compile_options_are_checked():
    assert not layouts.options_supported((("xla_cpu_no_such_option", True),))
    with pytest.raises(ValueError, match="compile_options"):
        decode.Decoder(CFG, {}, compile_options="fast")
    with pytest.raises(ValueError, match="does not know one of these options"):
        decode.Decoder(CFG, {}, compile_options={"xla_cpu_no_such_option": True})


def test_stops_at_end_of_sequence_and_stop_sequences(params):
    free = decode.generate(CFG, params, PROMPTS, max_new_tokens=NEW).tokens
    # Pretend row 0's first token that is new after step 0 is end-of-sequence.
    cut = next(i for i in range(1, NEW) if free[0][i] not in free[0][:i])
    eos = free[0][cut]
    gen = decode.generate(CFG, params, PROMPTS, max_new_tokens=NEW, eos_id=eos)
    assert gen.tokens[0] == free[0][:cut] and gen.finish_reasons[0] == "eos"
    for b in (1, 2):  # the other rows run on unless they also hit it
        expected = free[b][: free[b].index(eos)] if eos in free[b] else free[b]
        assert gen.tokens[b] == expected
    stop = free[1][4:6]
    gen = decode.generate(CFG, params, PROMPTS, max_new_tokens=NEW, stop_sequences=[stop])
    assert gen.tokens[1] == free[1][:4] and gen.finish_reasons[1] == "stop"
    # Two stops end the row at once, one the other's suffix: the whole longer one goes,
    # whichever the list names first.
    assert stop[1] not in free[1][:5]
    gen = decode.generate(CFG, params, PROMPTS, max_new_tokens=NEW,
                          stop_sequences=[stop[1:], stop])  # fmt: skip
    assert gen.tokens[1] == free[1][:4] and gen.finish_reasons[1] == "stop"


def test_streaming_delivers_every_token_in_order(params):
    seen = []
    gen = decode.generate(
        CFG,
        params,
        PROMPTS,
        max_new_tokens=NEW,
        eos_id=PROMPTS[0][0],
        on_token=lambda step, tokens: seen.append((step, tokens.tolist())),
    )
    assert [s for s, _ in seen] == list(range(len(seen)))
    for b in range(len(PROMPTS)):
        streamed = [t[b] for _, t in seen if t[b] >= 0]
        assert streamed[: len(gen.tokens[b])] == gen.tokens[b]


@pytest.mark.parametrize("cache_block", [None, 4], ids=["one_block", "blocks_of_4"])
def test_sharded_decoding_equals_one_device(params, cache_block):
    mesh = meshlib.make_mesh("fsdp=4,tensor=2")
    axes = transformer.param_axes(CFG)
    shardings = meshlib.tree_shardings(axes, params, mesh, transformer.RULES)
    sharded = jax.device_put(params, shardings)
    wq = sharded["blocks"]["attn"]["wq_DNK"]
    assert wq.sharding.shard_shape(wq.shape) == (CFG.num_layers, CFG.d_model // 4, 2, 16)
    prompts = [*PROMPTS, [2, 8]]  # 4 rows: one per fsdp shard of the batch
    sampling = decode.SamplingParams(temperature=1.0, top_k=40)
    kw = dict(
        max_new_tokens=NEW, sampling=sampling, seed=5, return_logits=True, cache_block=cache_block
    )
    one = decode.generate(CFG, params, prompts, **kw)
    many = decode.generate(CFG, sharded, prompts, mesh=mesh, **kw)
    assert many.tokens == one.tokens
    np.testing.assert_allclose(many.logits, one.logits, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize(
    "prompts,max_new,match",
    [
        ([], 4, "no prompts"),
        ([[2, 3], []], 4, "prompt 1 is empty"),
        ([[2, 512]], 4, r"outside \[0, 512\)"),
        ([[2] * 60], 10, "exceeds the model's context of 64.*at most 4 new tokens"),
        ([[2] * 70], 1, "context of 64 positions. Shorten the prompt or keep it under 64 tokens"),
        ([[2]], 0, "max_new_tokens=0"),
    ],
)
def test_bad_requests_are_refused_before_compiling(params, prompts, max_new, match):
    with pytest.raises(ValueError, match=match):
        decode.generate(CFG, params, prompts, max_new_tokens=max_new)


def test_bad_sampling_values():
    with pytest.raises(ValueError, match="top_p"):
        decode.SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        decode.SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        decode.SamplingParams(top_k=-2)


def test_decoder_returns_freed_heap_after_compiles_and_relayouts_only(params, monkeypatch):
    trims = []
    monkeypatch.setattr(layouts, "release_free_heap", lambda: trims.append(1))
    monkeypatch.setattr(layouts, "_COMPILED", set())  # as in a fresh process
    decoder = decode.Decoder(CFG, params, column_blocks=2)
    decoder.generate([[2, 5, 6]], max_new_tokens=NEW)
    assert len(trims) == 1  # compiled
    decoder.generate(
        [[2, 9, 9, 1]], max_new_tokens=NEW, seed=3, sampling=decode.SamplingParams(1.0)
    )
    assert len(trims) == 1  # same program, same layout
    decoder.generate([[2, 5, 6]], max_new_tokens=NEW + 1)
    assert len(trims) == 2  # another cache size: another program
    decoder.generate([[2, 5, 6], [7, 8]], max_new_tokens=NEW)
    assert len(trims) == 3  # another batch and the plain layout
    decoder.generate([[2, 5, 6]], max_new_tokens=NEW)
    assert len(trims) == 4  # a known program, but the column blocks laid out again
    decoder.generate([[2, 5, 6]], max_new_tokens=NEW)
    decode.Decoder(CFG, params, column_blocks=2).generate([[2, 5]], max_new_tokens=NEW)
    assert len(trims) == 4  # nor for a new Decoder calling a compiled program


def test_release_free_heap_calls_malloc_trim_where_there_is_one(monkeypatch):
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert layouts._MALLOC_TRIM is not None  # as on this project's CI
    calls = []
    monkeypatch.setattr(layouts, "_MALLOC_TRIM", calls.append)
    layouts.release_free_heap()
    assert calls == [0]  # free everything above the heap's live top
    monkeypatch.setattr(layouts, "_MALLOC_TRIM", None)  # macOS, musl, Windows
    layouts.release_free_heap()


def test_decoding_traced_into_a_step_holds_no_host_callback(params):
    """JAX's persistent compilation cache refuses programs holding a host callback: an RL
    step that decodes its rollouts must not carry the streaming one."""
    prompt_BP = jnp.asarray([[0, 0, 2, 5], [2, 40, 41, 42]])

    def rollouts(params, seeds_B):
        return decode.sample_in_jit(CFG, params, prompt_BP, jnp.array([2, 0]), seeds_B,
                                    temperature=1.0, max_new_tokens=4, eos_id=2)  # fmt: skip

    seeds_B = jnp.arange(2, dtype=jnp.uint32)
    assert "callback" not in jax.jit(rollouts).lower(params, seeds_B).as_text()
    streaming = decode.decoding_program({}).lower(
        CFG, kv_cache.split_layers(params), prompt_BP, jnp.array([2, 0]), seeds_B,
        np.float32(1.0), np.int32(0), np.float32(1.0), np.int32(2), decode._stop_array(()),
        np.bool_(False), max_new_tokens=4, return_logits=False, cache_block=None,
    )  # fmt: skip
    assert "callback" in streaming.as_text()  # the check above can fail
    tokens_BN = np.asarray(jax.jit(rollouts)(params, seeds_B))
    assert tokens_BN.shape == (2, 4) and (tokens_BN < CFG.vocab_size).all()
