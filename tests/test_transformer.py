import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from genjax import mesh as meshlib
from genjax.models import transformer
from genjax.nn import attention

splash_attention = functools.partial(attention.splash_attention, rules=transformer.RULES)

CFG = transformer.get_preset("tiny")


@pytest.fixture(scope="module")
def params():
    return transformer.init(CFG, jax.random.key(0))


def _tokens(key, batch=2, length=33):
    return jax.random.randint(jax.random.key(key), (batch, length), 0, CFG.vocab_size)


def test_logits_shape_dtype_with_and_without_jit(params):
    tokens = _tokens(1)[:, :-1]
    eager = transformer.forward(CFG, params, tokens)
    jitted = jax.jit(transformer.forward, static_argnums=0)(CFG, params, tokens)
    chex.assert_shape(eager, (2, 32, CFG.vocab_size))
    chex.assert_type(eager, jnp.float32)
    np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-5)


def test_causality_by_gradient():
    """d logits[t] / d input[s] is zero for every s > t."""
    cfg = dataclasses.replace(CFG, tie_embeddings=False)  # a tied head would see every row
    params = transformer.init(cfg, jax.random.key(0))
    tokens = _tokens(2, batch=1)[:, :16]
    embeds = params["embed_VD"][tokens]

    def logits_at(t, x_BTD):
        # Feed embeddings directly: row i of the table is position i's input.
        p = dict(params, embed_VD=x_BTD[0])
        return transformer.forward(cfg, p, jnp.arange(16)[None])[0, t].sum()

    for t in (0, 7, 15):
        grad = jax.grad(logits_at, argnums=1)(t, embeds)[0]  # [T, D]
        influence = jnp.abs(grad).sum(-1)
        assert float(influence[t + 1 :].sum()) == 0.0
        assert float(influence[: t + 1].min()) > 0.0


@pytest.mark.parametrize(
    "variant", [{"scan_layers": True}, {"remat": True}, {"scan_layers": True, "remat": True}]
)
def test_scan_and_remat_equal_plain_path(params, variant):
    batch = {"tokens": _tokens(3)}
    cfg2 = dataclasses.replace(CFG, **variant)
    (l1, _), g1 = jax.value_and_grad(transformer.loss, argnums=1, has_aux=True)(CFG, params, batch)
    (l2, _), g2 = jax.value_and_grad(transformer.loss, argnums=1, has_aux=True)(cfg2, params, batch)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    chex.assert_trees_all_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_initial_loss_is_log_vocab(params):
    loss, _ = transformer.loss(CFG, params, {"tokens": _tokens(4, batch=8)})
    assert abs(float(loss) - math.log(CFG.vocab_size)) < 0.05


def test_loss_falls_on_a_fixed_batch(params):
    batch = {"tokens": _tokens(5, batch=4)}
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(lambda p: transformer.loss(CFG, p, batch)[0])(p)
        u, s = opt.update(g, s)
        return optax.apply_updates(p, u), s, loss

    p, losses = params, []
    for _ in range(30):
        p, state, loss = step(p, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_mask_excludes_targets(params):
    tokens = _tokens(6)
    mask = jnp.ones((2, 32)).at[:, 16:].set(0.0)
    masked, aux = transformer.loss(CFG, params, {"tokens": tokens, "mask": mask})
    nll = transformer.token_nll(CFG, params, tokens)
    np.testing.assert_allclose(masked, nll[:, :16].mean(), rtol=1e-6)
    assert float(aux["tokens"]) == 32


def test_gqa_matches_repeated_kv_heads(params):
    """Grouped-query attention equals full MHA with each kv head repeated."""
    cfg_mha = dataclasses.replace(CFG, num_kv_heads=CFG.num_heads)
    r = CFG.num_heads // CFG.num_kv_heads
    blocks = dict(params["blocks"])
    attn = dict(blocks["attn"])
    attn["wk_DGK"] = jnp.repeat(attn["wk_DGK"], r, axis=2)
    attn["wv_DGK"] = jnp.repeat(attn["wv_DGK"], r, axis=2)
    blocks["attn"] = attn
    tokens = _tokens(7)[:, :-1]
    np.testing.assert_allclose(
        transformer.forward(CFG, params, tokens),
        transformer.forward(cfg_mha, dict(params, blocks=blocks), tokens),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


def test_untied_head_has_own_parameter():
    cfg = dataclasses.replace(CFG, tie_embeddings=False)
    p = transformer.init(cfg, jax.random.key(0))
    assert p["lm_head_DV"].shape == (CFG.d_model, CFG.vocab_size)
    assert transformer.param_axes(cfg)["lm_head_DV"] == ("embed", "vocab")


def test_param_axes_match_param_ranks():
    shapes = transformer.abstract_params(CFG)
    axes = transformer.param_axes(CFG)
    jax.tree.map(
        lambda a, s: assert_rank(a, s), axes, shapes, is_leaf=lambda x: isinstance(x, tuple)
    )


def assert_rank(axes, shape):
    assert len(axes) == len(shape.shape), (axes, shape.shape)


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("125m", 123_685_632),
        ("1b", 1_100_048_384),
        ("7b", 6_738_415_616),
        ("cpu-small", 12_194_688),
    ],
)
def test_preset_parameter_counts_from_abstract_shapes(preset, expected):
    # 7b is Llama-2-7B's 6,738,415,616; 1b is TinyLlama-1.1B's shape.
    assert transformer.count_params(transformer.get_preset(preset))["total"] == expected


def test_unknown_preset_and_bad_config():
    with pytest.raises(ValueError, match=r"unknown preset 'cpu-smal'.*did you mean 'cpu-small'"):
        transformer.get_preset("cpu-smal")
    with pytest.raises(ValueError, match="must be a multiple of num_kv_heads"):
        dataclasses.replace(CFG, num_heads=4, num_kv_heads=3)


@pytest.mark.parametrize(("block", "length"), [(16, 32), (16, 40), (8, 33), (64, 32)])
def test_blocked_causal_attention_equals_one_block(params, block, length):
    tokens = _tokens(8, length=length + 1)[:, :-1]
    blocked = transformer.forward(dataclasses.replace(CFG, attn_block_size=block), params, tokens)
    whole = transformer.forward(dataclasses.replace(CFG, attn_block_size=0), params, tokens)
    np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-5)


def test_remat_policy_dots_equals_plain_path(params):
    tokens = _tokens(3)
    grad = lambda cfg: jax.grad(lambda p: transformer.loss(cfg, p, {"tokens": tokens})[0])(params)
    plain = grad(CFG)
    for scan in (False, True):
        cfg = dataclasses.replace(CFG, remat=True, remat_policy="dots", scan_layers=scan)
        chex.assert_trees_all_close(grad(cfg), plain, atol=1e-6, rtol=1e-5)


def test_attention_resolves_per_backend():
    bf16 = dataclasses.replace(CFG, dtype="bfloat16")
    backend = jax.default_backend()
    expected = {"tpu": "splash", "gpu": "cudnn"}.get(backend, "xla")
    assert transformer.attention_impl(bf16) == expected
    # cuDNN flash needs 16-bit compute; splash takes any dtype and most lengths.
    assert transformer.attention_impl(CFG) == ("splash" if backend == "tpu" else "xla")
    assert transformer.attention_impl(CFG, seq_len=600) == "xla"  # no splash block fits
    assert transformer.attention_impl(CFG, seq_len=64) == "xla"
    with pytest.raises(ValueError, match="attention='flash'"):
        dataclasses.replace(CFG, attention="flash")
    with pytest.raises(ValueError, match="remat_policy='all'"):
        dataclasses.replace(CFG, remat_policy="all")


@pytest.mark.accelerator
def test_cudnn_attention_matches_xla_attention_in_bf16():
    if jax.default_backend() != "gpu":
        pytest.skip("cuDNN attention needs a GPU")
    cfg = dataclasses.replace(CFG, dtype="bfloat16", max_seq_len=128, attn_block_size=32)
    params = transformer.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 129), 0, cfg.vocab_size)

    def loss_and_grad(attention):
        c = dataclasses.replace(cfg, attention=attention)
        f = jax.jit(jax.value_and_grad(lambda p: transformer.loss(c, p, {"tokens": tokens})[0]))
        return f(params)

    (loss_xla, grad_xla), (loss_cudnn, grad_cudnn) = loss_and_grad("xla"), loss_and_grad("cudnn")
    # bf16 compute: both sides round activations to 8 mantissa bits.
    np.testing.assert_allclose(loss_cudnn, loss_xla, rtol=2e-3)
    chex.assert_trees_all_close(grad_cudnn, grad_xla, atol=2e-3, rtol=5e-2)


@pytest.mark.parametrize(
    "length,block", [(128, 128), (512, 512), (768, 256), (1024, 512), (640, 128), (64, None)]
)
def test_splash_block_size(length, block):
    assert attention.splash_block_size(length) == block


def test_splash_attention_equals_xla_attention_with_gqa(params):
    # Off TPU the Pallas kernel runs interpreted: the same kernel code and numbers.
    # Splash computes keys in blocks of 128: a 128-token context.
    tokens = _tokens(4, length=129)

    def loss_and_grad(attention):
        cfg = dataclasses.replace(CFG, attention=attention, max_seq_len=128)
        f = jax.jit(jax.value_and_grad(lambda p: transformer.loss(cfg, p, {"tokens": tokens})[0]))
        return f(params)

    (loss_xla, grad_xla), (loss_splash, grad_splash) = loss_and_grad("xla"), loss_and_grad("splash")
    assert CFG.num_kv_heads < CFG.num_heads  # grouped-query attention exercised
    # Interpreted, the kernel computes in float32 like the XLA path. On a TPU
    # both run at the default (bf16-pass) matmul precision: looser bounds there
    # (not run on one).
    tol = 2e-2 if jax.default_backend() == "tpu" else 1e-6
    np.testing.assert_allclose(loss_splash, loss_xla, rtol=tol)
    chex.assert_trees_all_close(grad_splash, grad_xla, atol=tol, rtol=10 * tol)


def test_splash_kernel_is_reused_across_traces():
    # The kernel is built once per length and cached: a second jit (another
    # batch size, same length) and a gradient must reuse it without tracer leaks.
    rng = np.random.default_rng(0)

    def qkv(batch):
        q = rng.standard_normal((batch, 128, 4, 16), dtype=np.float32)
        kv = rng.standard_normal((2, batch, 128, 2, 16), dtype=np.float32)
        return q, kv[0], kv[1]

    def reference(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    for batch in (1, 2):
        q, k, v = qkv(batch)
        out = jax.jit(splash_attention)(q, k, v)
        np.testing.assert_allclose(out, reference(q, k, v), atol=1e-5)
    grad = jax.grad(lambda q: jnp.sum(jax.jit(splash_attention)(q, k, v) ** 2))(q)
    ref = jax.grad(lambda q: jnp.sum(reference(q, k, v) ** 2))(q)
    np.testing.assert_allclose(grad, ref, atol=1e-4)


def test_splash_attention_refuses_a_batch_the_mesh_cannot_split():
    q = jnp.zeros((3, 128, 4, 16))
    kv = jnp.zeros((3, 128, 2, 16))
    with jax.set_mesh(meshlib.make_mesh("data=2,fsdp=2,tensor=2")):
        with pytest.raises(ValueError, match="batch 3 must divide by the 4 shards"):
            jax.jit(splash_attention)(q, kv, kv)


def test_splash_attention_refuses_lengths_it_cannot_block():
    q = jnp.zeros((1, 600, 4, 16))
    kv = jnp.zeros((1, 600, 2, 16))
    with pytest.raises(ValueError, match="attention='splash' needs a sequence length"):
        splash_attention(q, kv, kv)
