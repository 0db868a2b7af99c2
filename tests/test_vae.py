"""The VAE family's core (genjax.models.vae, genjax.nn.vae_nets): the reparameterization
gradient, the KL, the likelihoods' normalization, IWAE exact on a linear-Gaussian model,
ELBO ≤ IWAE_5 ≤ IWAE_50 after training, interpolation, bits/dim, config errors, shapes
and logical axes, and a sharded loss equal to one device."""

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from scipy import special, stats

from genjax import mesh as meshlib
from genjax.data import images as imagelib
from genjax.data import toy2d
from genjax.models import vae


def randomized_params(cfg: vae.VAEConfig, seed: int = 0, std: float = 0.2) -> dict:
    """Parameters shaped as ``init_params``'s, drawn from N(0, std²) on the host: no
    per-shape compiles of the initializers (seconds each on a busy 2-core CPU), and no
    zero-initialized outputs to hide a dependence."""
    shapes = jax.eval_shape(lambda key: vae.init_params(cfg, key), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: jnp.asarray(std * rng.standard_normal(v.shape), v.dtype), shapes)


# ----------------------------------------------------------------------------- latents


def test_reparameterization_gradient_matches_finite_differences():
    """∇ of the common-random-numbers estimate of E_q f(z) equals its central differences,
    and with many samples the analytic ∇ E_q z² = (2μ, e^logvar)."""
    Z, N = 3, 64
    mean = jnp.array([0.3, -1.0, 0.5])
    logvar = jnp.array([-0.5, 0.2, 0.0])
    key = jax.random.key(0)

    @jax.jit
    def expectation(mean, logvar):
        z_NZ = vae.reparameterize(
            jnp.broadcast_to(mean, (N, Z)), jnp.broadcast_to(logvar, (N, Z)), key=key
        )
        return jnp.mean(jnp.sum(jnp.sin(z_NZ) + 0.5 * z_NZ**2, axis=-1))

    grads = jax.jit(jax.grad(expectation, argnums=(0, 1)))(mean, logvar)
    h = 1e-2
    for arg, grad in enumerate(grads):
        for i in range(Z):
            step = jnp.zeros(Z).at[i].set(h)
            plus = [mean, logvar]
            minus = [mean, logvar]
            plus[arg], minus[arg] = plus[arg] + step, minus[arg] - step
            fd = (expectation(*plus) - expectation(*minus)) / (2 * h)
            np.testing.assert_allclose(grad[i], fd, rtol=1e-3, atol=1e-3)

    many = 200_000

    def second_moment(mean, logvar):
        z = vae.reparameterize(
            jnp.broadcast_to(mean, (many, Z)), jnp.broadcast_to(logvar, (many, Z)), key=key
        )
        return jnp.mean(jnp.sum(z**2, axis=-1))

    g_mean, g_logvar = jax.jit(jax.grad(second_moment, argnums=(0, 1)))(mean, logvar)
    np.testing.assert_allclose(g_mean, 2 * mean, atol=0.02)
    np.testing.assert_allclose(g_logvar, jnp.exp(logvar), rtol=0.02)


def test_gaussian_kl_closed_form_and_monte_carlo():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(4, 5)).astype(np.float32)
    logvar = rng.normal(scale=0.7, size=(4, 5)).astype(np.float32)
    kl = vae.gaussian_kl(jnp.asarray(mean), jnp.asarray(logvar))
    chex.assert_shape(kl, (4,))

    # The general multivariate-normal formula, float64: ½(tr Σ + μᵀμ − k − log det Σ).
    for b in range(4):
        cov = np.diag(np.exp(logvar[b].astype(np.float64)))
        _, logdet = np.linalg.slogdet(cov)
        mu = mean[b].astype(np.float64)
        expected = 0.5 * (np.trace(cov) + mu @ mu - len(mu) - logdet)
        np.testing.assert_allclose(kl[b], expected, rtol=1e-5)

    # E_q[log q(z) − log p(z)] by sampling, within 4 standard errors.
    n = 100_000
    z = mean + np.exp(0.5 * logvar) * rng.standard_normal((n, 4, 5))
    log_ratio = np.sum(
        stats.norm.logpdf(z, mean, np.exp(0.5 * logvar)) - stats.norm.logpdf(z), axis=-1
    )
    stderr = log_ratio.std(axis=0) / math.sqrt(n)
    assert np.all(np.abs(log_ratio.mean(axis=0) - kl) < 4 * stderr + 1e-4)

    np.testing.assert_allclose(vae.gaussian_kl(jnp.zeros((2, 3)), jnp.zeros((2, 3))), 0.0)


def test_sample_prior():
    cfg = vae.VAEConfig(latent=3)
    z = vae.sample_prior(cfg, 20_000, key=jax.random.key(0))
    chex.assert_shape(z, (20_000, 3))
    np.testing.assert_allclose(jnp.mean(z, axis=0), 0.0, atol=0.03)
    np.testing.assert_allclose(jnp.std(z, axis=0), 1.0, atol=0.03)


def test_interpolate():
    z0, z1 = jnp.array([3.0, 0.0, 0.0]), jnp.array([0.0, 0.0, 3.0])
    line = vae.interpolate(z0, z1, 5)
    chex.assert_shape(line, (5, 3))
    np.testing.assert_allclose(line[2], (z0 + z1) / 2)

    arc = vae.interpolate(z0, z1, 7, mode="spherical")
    np.testing.assert_allclose(arc[0], z0, atol=1e-6)
    np.testing.assert_allclose(arc[-1], z1, atol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(arc, axis=-1), 3.0, rtol=1e-6)
    np.testing.assert_allclose(arc[3], (z0 + z1) / math.sqrt(2), rtol=1e-6)  # 45°

    # Equal norms at a random angle, over a batch of latents [2, 4].
    a, b = jax.random.normal(jax.random.key(1), (2, 2, 4))
    b = b * jnp.linalg.norm(a) / jnp.linalg.norm(b)
    arc = vae.interpolate(a, b, 9, mode="spherical")
    chex.assert_shape(arc, (9, 2, 4))
    np.testing.assert_allclose(
        jnp.linalg.norm(arc.reshape(9, -1), axis=-1), jnp.linalg.norm(a), rtol=1e-5
    )
    np.testing.assert_allclose(arc[0], a, atol=1e-5)
    np.testing.assert_allclose(arc[-1], b, atol=1e-5)

    # Parallel endpoints: the line, no NaN.
    same = vae.interpolate(z0, 2 * z0, 3, mode="spherical")
    np.testing.assert_allclose(same, vae.interpolate(z0, 2 * z0, 3))

    with pytest.raises(ValueError, match="choose 'linear' or 'spherical'"):
        vae.interpolate(z0, z1, 3, mode="slerp")
    with pytest.raises(ValueError, match="n >= 2"):
        vae.interpolate(z0, z1, 1)


# ----------------------------------------------------------------------------- likelihoods


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_discretized_logistic_sums_to_one(levels):
    rng = np.random.default_rng(levels)
    mean = jnp.asarray(rng.uniform(-1.5, 1.5, 50), jnp.float32)
    log_scale = jnp.asarray(rng.uniform(-8.0, 1.0, 50), jnp.float32)
    k_L1 = jnp.arange(levels)[:, None]
    logp_LN = jax.jit(vae.discretized_logistic_logp, static_argnums=3)(
        k_L1, mean, log_scale, levels
    )
    chex.assert_tree_all_finite(logp_LN)
    np.testing.assert_allclose(jax.nn.logsumexp(logp_LN, axis=0), 0.0, atol=1e-4)

    # Against the difference of CDFs in float64, where that difference does not round off.
    mu = np.asarray(mean, np.float64)
    s = np.exp(np.maximum(np.asarray(log_scale, np.float64), vae.MIN_LOG_SCALE))
    c = 2 * np.arange(levels)[:, None] / (levels - 1) - 1
    half = 1 / (levels - 1)
    upper = np.where(c[:, :1] < 1, special.expit((c + half - mu) / s), 1.0)
    lower = np.where(c[:, :1] > -1, special.expit((c - half - mu) / s), 0.0)
    with np.errstate(divide="ignore"):
        reference = np.log(upper - lower)
    ok = reference > -30
    np.testing.assert_allclose(np.asarray(logp_LN)[ok], reference[ok], rtol=1e-4, atol=1e-4)


def test_discretized_logistic_tails_stay_finite():
    """Far from the mean, where σ(a) − σ(b) rounds to 0 in float32, log P stays finite and
    keeps falling linearly: log P ≈ −|c − μ|/s + log(2δ/s)."""
    logp_fn = jax.jit(lambda x, m: vae.discretized_logistic_logp(x, m, -4.0, 17))
    logp = logp_fn(jnp.arange(1, 16), -3.0)
    chex.assert_tree_all_finite(logp)
    assert jnp.all(jnp.diff(logp) < 0)
    chex.assert_tree_all_finite(jax.jit(jax.grad(logp_fn, argnums=1))(8, -3.0))


def test_categorical_sums_to_one():
    levels = 17
    logits = jax.random.normal(jax.random.key(0), (6, levels)) * 3
    logp_LB = jnp.stack([vae.categorical_logp(jnp.full((6,), k), logits) for k in range(levels)])
    np.testing.assert_allclose(jax.nn.logsumexp(logp_LB, axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(logp_LB.T, jax.nn.log_softmax(logits), atol=1e-6)


def test_log_likelihood_sums_dimensions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2)).astype(np.float32)
    theta = rng.normal(size=(3, 2, 2)).astype(np.float32)
    cfg = vae.VAEConfig()
    expected = stats.norm.logpdf(x, theta[..., 0], np.exp(theta[..., 1])).sum(-1)
    np.testing.assert_allclose(vae.log_likelihood(cfg, jnp.asarray(theta), x), expected, rtol=1e-5)

    images = vae.VAEConfig(shape=(2, 2, 1), levels=17, likelihood="categorical")
    x_int = jnp.asarray(rng.integers(0, 17, (3, 2, 2, 1)))
    logits = jnp.asarray(rng.normal(size=(3, 2, 2, 1, 17)), jnp.float32)
    per_pixel = vae.categorical_logp(x_int, logits)
    np.testing.assert_allclose(
        vae.log_likelihood(images, logits, x_int), per_pixel.sum((1, 2, 3)), rtol=1e-6
    )


def test_likelihood_mean():
    levels = 17
    logistic = vae.VAEConfig(shape=(4,), levels=levels, likelihood="logistic")
    centres = jnp.asarray(imagelib.to_unit(np.array([0, 3, 8, 16]), levels))
    sharp = jnp.stack([centres, jnp.full(4, -7.0)], axis=-1)[None]  # s ≪ a bin
    np.testing.assert_allclose(vae.likelihood_mean(logistic, sharp)[0], [0, 3, 8, 16], atol=1e-3)
    wide = jnp.stack([jnp.zeros(4), jnp.full(4, 1.0)], axis=-1)[None]  # symmetric about 0
    np.testing.assert_allclose(vae.likelihood_mean(logistic, wide)[0], (levels - 1) / 2, atol=1e-4)

    categorical = dataclasses.replace(logistic, likelihood="categorical")
    one_hot = 50.0 * jax.nn.one_hot(jnp.array([[0, 3, 8, 16]]), levels)
    np.testing.assert_allclose(
        vae.likelihood_mean(categorical, one_hot)[0], [0, 3, 8, 16], atol=1e-3
    )
    uniform = jnp.zeros((1, 4, levels))
    np.testing.assert_allclose(
        vae.likelihood_mean(categorical, uniform), (levels - 1) / 2, rtol=1e-6
    )

    theta = jnp.array([[[0.5, -1.0], [-2.0, 0.3]]])
    np.testing.assert_allclose(vae.likelihood_mean(vae.VAEConfig(), theta), [[0.5, -2.0]])


def test_bits_per_dim():
    """A uniform model over L levels is log₂ L bits/dim, both as a discrete likelihood and
    as a uniform density on the dequantized range (images.bits_per_dim)."""
    dims, levels = 64, 17
    nll = jnp.full((2,), dims * math.log(levels))
    np.testing.assert_allclose(vae.bits_per_dim(nll, dims), math.log2(levels), rtol=1e-6)
    uniform_density = dims * math.log(2 * levels / (levels - 1))  # L bins of 2/(L − 1)
    dequantized = imagelib.bits_per_dim(uniform_density, dims, levels)
    np.testing.assert_allclose(dequantized, math.log2(levels), rtol=1e-6)

    cfg = vae.VAEConfig(shape=(8, 8, 1), levels=levels, likelihood="categorical")
    x = jnp.asarray(np.random.default_rng(0).integers(0, levels, (2, 8, 8, 1)))
    nll_uniform = -vae.log_likelihood(cfg, jnp.zeros((2, 8, 8, 1, levels)), x)
    np.testing.assert_allclose(
        vae.bits_per_dim(nll_uniform, cfg.dims), math.log2(levels), rtol=1e-6
    )


# ----------------------------------------------------------------------------- bounds


def linear_gaussian():
    """A VAE that is exactly x = zW + b + σε (probabilistic PCA), its encoder the exact
    posterior; returns (cfg, params, log_density(x))."""
    cfg = vae.VAEConfig(shape=(3,), latent=2, hidden=())
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    W_ZD = np.diag([1.5, 0.7]) @ q[:2]  # orthogonal rows: the posterior is diagonal
    b_D, sigma = np.array([0.3, -0.2, 1.0]), 0.5
    precision_Z = 1 + np.sum(W_ZD**2, axis=1) / sigma**2  # I + W Wᵀ/σ², diagonal
    A_DZ = W_ZD.T / sigma**2 / precision_Z  # posterior mean = (x − b)·A

    params = randomized_params(cfg)  # every leaf is set below
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    params["decoder"]["out"] = {"w_IO": f32(W_ZD), "b_O": f32(b_D)}
    params["log_std"] = f32(np.full(3, math.log(sigma)))
    params["encoder"]["mean"] = {"w_IO": f32(A_DZ), "b_O": f32(-b_D @ A_DZ)}
    params["encoder"]["logvar"] = {"w_IO": f32(np.zeros((3, 2))), "b_O": f32(-np.log(precision_Z))}
    marginal = stats.multivariate_normal(b_D, W_ZD.T @ W_ZD + sigma**2 * np.eye(3))
    return cfg, params, marginal.logpdf


def test_iwae_is_exact_with_the_true_posterior():
    """With q(z|x) = p(z|x) every weight p(x, z)/q(z|x) is p(x): IWAE_k = log p(x) for any
    k and any chunking, and the ELBO averages to it (KL(q ‖ p(z|x)) = 0)."""
    cfg, params, log_density = linear_gaussian()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 3)) * 1.5, jnp.float32)
    exact = log_density(np.asarray(x, np.float64))
    key = jax.random.key(2)
    for k, chunk in [(1, 1), (12, 4)]:
        bound = vae.iwae_bound(cfg, params, x, key=key, k=k, chunk=chunk)
        np.testing.assert_allclose(bound, exact, rtol=1e-5, atol=1e-4)

    keys = jax.random.split(jax.random.key(3), 4000)
    elbos, recon, kl = jax.jit(jax.vmap(lambda k: vae.elbo(cfg, params, x, key=k)))(keys)
    np.testing.assert_allclose(elbos, recon - kl, rtol=1e-6)
    stderr = elbos.std(axis=0) / math.sqrt(len(keys))
    assert np.all(np.abs(elbos.mean(axis=0) - exact) < 4 * stderr + 1e-3)


def test_iwae_rejects_a_chunk_that_does_not_divide_k():
    cfg, params, _ = linear_gaussian()
    with pytest.raises(ValueError, match="chunk that divides k"):
        vae.iwae_bound(cfg, params, jnp.zeros((2, 3)), key=jax.random.key(0), k=10, chunk=4)


def test_trained_bounds_are_ordered():
    """After a few hundred Adam steps on a noisy ring, the loss has fallen and, on average
    over the points, ELBO ≤ IWAE_5 ≤ IWAE_50; the chunk size does not change IWAE."""
    cfg = dataclasses.replace(vae.PRESETS["tiny"], kl_warmup_steps=50)
    ring = toy2d.Mixture("ring", toy2d.ring().means, 0.1)
    x = jnp.asarray(ring.sample(512, seed=0))
    params = vae.init_params(cfg, jax.random.key(0))
    opt = optax.adam(1e-2)

    @jax.jit
    def train(params):
        def update(carry, step):
            params, opt_state = carry
            key = jax.random.fold_in(jax.random.key(1), step)
            grad_fn = jax.value_and_grad(vae.loss, argnums=1, has_aux=True)
            (value, _), grads = grad_fn(cfg, params, x, key=key, step=step)
            updates, opt_state = opt.update(grads, opt_state)
            return (optax.apply_updates(params, updates), opt_state), value

        (params, _), losses = jax.lax.scan(update, (params, opt.init(params)), jnp.arange(300))
        return params, losses

    params, losses = train(params)
    assert losses[-20:].mean() < losses[:20].mean() - 0.3

    @jax.jit
    def bounds(params):
        keys = jax.random.split(jax.random.key(2), 16)
        elbo_KB = jax.vmap(lambda k: vae.elbo(cfg, params, x, key=k)[0])(keys)
        key = jax.random.key(3)
        iwae = functools.partial(vae.iwae_bound, cfg, params, x, key=key)
        return elbo_KB, iwae(k=5), iwae(k=50, chunk=10), iwae(k=50, chunk=50)

    elbo_KB, iwae5, iwae50, iwae50_one_chunk = bounds(params)
    np.testing.assert_allclose(iwae50, iwae50_one_chunk, rtol=1e-5, atol=1e-5)
    means = [float(jnp.mean(b)) for b in (elbo_KB, iwae5, iwae50)]
    assert means[0] < means[1] < means[2], means


def test_loss_weights_the_kl_by_the_warm_up():
    cfg = dataclasses.replace(vae.PRESETS["tiny"], beta=0.5, kl_warmup_steps=100)
    for step, weight in [(0, 0.0), (50, 0.25), (100, 0.5), (1000, 0.5)]:
        np.testing.assert_allclose(vae.kl_weight(cfg, step), weight)
    np.testing.assert_allclose(vae.kl_weight(vae.VAEConfig(beta=2.0), 0), 2.0)

    params = vae.init_params(cfg, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8, 2)) * 2
    key = jax.random.key(2)
    value, metrics = jax.jit(lambda p, s: vae.loss(cfg, p, x, key=key, step=s))(params, 50)
    _, recon, kl = vae.elbo(cfg, params, x, key=key)
    np.testing.assert_allclose(value, -jnp.mean(recon - 0.25 * kl), rtol=1e-5)
    np.testing.assert_allclose(metrics["elbo"], jnp.mean(recon - kl), rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], jnp.mean(kl), rtol=1e-5)
    np.testing.assert_allclose(metrics["recon"], jnp.mean(recon), rtol=1e-5)
    np.testing.assert_allclose(metrics["kl_weight"], 0.25)
    assert float(metrics["kl"]) > 0


# ----------------------------------------------------------------------------- config, networks


@pytest.mark.parametrize(
    ("fields", "fix"),
    [
        ({"arch": "resnet"}, "choose one of"),
        ({"likelihood": "bernoulli"}, "choose one of"),
        ({"latent": 0}, "set latent >= 1"),
        ({"beta": -1.0}, "set beta >= 0"),
        ({"kl_warmup_steps": -5}, "set it >= 0"),
        ({"shape": ()}, "give one example's shape"),
        ({"likelihood": "logistic"}, "set levels to the data's gray levels"),
        ({"levels": 17}, "use 'logistic' or 'categorical' for images"),
        ({"hidden": (16, 0)}, "every width must be >= 1"),
        ({"arch": "conv"}, "use arch='mlp' for other data"),
        (
            {
                "arch": "conv",
                "shape": (8, 8, 1),
                "levels": 17,
                "likelihood": "logistic",
                "channels": 12,
                "groups": 8,
            },
            "pick channels a multiple of groups",
        ),
    ],
)
def test_bad_config_names_the_fix(fields, fix):
    with pytest.raises(ValueError, match=fix):
        vae.VAEConfig(**fields)


@pytest.mark.parametrize(
    "cfg",
    [
        vae.PRESETS["tiny"],
        vae.PRESETS["tiny-digits"],  # conv, logistic
        vae.VAEConfig(shape=(8, 8, 1), levels=17, latent=4, hidden=(32,), likelihood="categorical"),
    ],
    ids=["mlp-2d", "conv-logistic", "mlp-digits-categorical"],
)
def test_networks_shapes_and_axes(cfg):
    B, Z = 3, cfg.latent
    params = randomized_params(cfg)
    axes = vae.param_axes(cfg)
    for leaf, leaf_axes in zip(
        jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=_is_axes), strict=True
    ):
        assert len(leaf_axes) == leaf.ndim
        assert all(a is None or a in vae.RULES for a in leaf_axes), leaf_axes

    if cfg.levels:
        x = jnp.asarray(np.random.default_rng(0).integers(0, cfg.levels, (B, *cfg.shape)))
    else:
        x = jax.random.normal(jax.random.key(1), (B, *cfg.shape))

    def forward(params):
        z = vae.sample_prior(cfg, B, key=jax.random.key(2))
        return (
            vae.encode(cfg, params, x),
            vae.decode(cfg, params, z),
            vae.decode_mean(cfg, params, z),
            vae.elbo(cfg, params, x, key=jax.random.key(3)),
        )

    (mean, logvar), theta, images, values = jax.jit(forward)(params)
    chex.assert_shape([mean, logvar], (B, Z))
    chex.assert_shape(theta, (B, *cfg.shape, 2 if cfg.likelihood != "categorical" else 17))
    chex.assert_shape(images, (B, *cfg.shape))
    chex.assert_shape(values, (B,))
    chex.assert_tree_all_finite(values)
    if cfg.levels:
        assert jnp.all((images >= 0) & (images <= cfg.levels - 1))
    if cfg.arch == "mlp" and not cfg.levels:  # eager equals jit (one cheap case)
        chex.assert_trees_all_close(
            forward(params), ((mean, logvar), theta, images, values), rtol=1e-5, atol=1e-5
        )


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def test_sharded_loss_equals_one_device():
    cfg = vae.PRESETS["tiny"]
    params = vae.init_params(cfg, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, 2))
    key = jax.random.key(2)
    fn = jax.jit(lambda p, x: vae.loss(cfg, p, x, key=key, step=0))
    mesh = meshlib.make_mesh("data=4,fsdp=2")
    shardings = meshlib.tree_shardings(vae.param_axes(cfg), params, mesh, vae.RULES)
    sharded = jax.device_put(params, shardings)
    assert sharded["encoder"]["layers"][0]["w_IO"].sharding.spec == P(None, "fsdp")
    x_sharded = jax.device_put(x, meshlib.batch_sharding(mesh))
    chex.assert_trees_all_close(fn(sharded, x_sharded), fn(params, x), rtol=1e-5, atol=1e-5)
