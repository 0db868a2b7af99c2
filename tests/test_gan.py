"""The GAN family: losses and R1 against their formulas, spectral norm against the SVD,
packing, which state each named step touches, the composed step against its parts,
sharded against one device, and a short run on the ring."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax import mesh as meshlib
from genjax import train
from genjax.data import toy2d
from genjax.models import gan

TINY = gan.PRESETS["tiny"]
# Every feature that touches the step at once: spectral norm, R1, packs of 2, two D steps.
MLP = dataclasses.replace(
    TINY, spectral_norm=True, r1_gamma=1.0, pack=2, d_steps=2, g_lr=2e-3, d_lr=2e-3
)
# A class-conditional conv net small enough to compile in seconds, with every image option.
CONV = gan.GANConfig(
    arch="conv", shape=(8, 8, 1), latent=4, channels=(4, 8), groups=2, num_classes=3,
    loss="hinge", spectral_norm=True, r1_gamma=1.0, augment=True,
)  # fmt: skip


@functools.cache
def jitted(fn, cfg: gan.GANConfig):
    """``fn(cfg, ...)`` compiled once per config."""
    return jax.jit(functools.partial(fn, cfg))


@functools.cache
def jitted_step(cfg: gan.GANConfig):
    return jax.jit(gan.make_step(cfg))


@functools.cache
def init(cfg: gan.GANConfig) -> gan.State:
    """The state of seed 0. Drawn by the non-partitionable threefry: the same distribution,
    and XLA:CPU compiles its rank-4 draws (conv kernels) in a quarter of the time."""
    with jax.threefry_partitionable(False):
        return jitted(gan.init, cfg)(jax.random.key(0))


def normal(shape, seed: int = 0) -> jax.Array:
    # numpy's: jax.random on rank-4 shapes takes seconds to compile on XLA:CPU.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def batch_for(cfg: gan.GANConfig, size: int, seed: int = 0) -> dict:
    batch = {"x": normal((size, *cfg.shape), seed)}
    if cfg.num_classes:
        labels = np.random.default_rng(seed + 1).integers(0, cfg.num_classes, size)
        batch["label"] = jnp.asarray(labels, jnp.int32)
    return batch


def assert_changed(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    assert not all(np.array_equal(x, y) for x, y in pairs)


# ----------------------------------------------------------------------------- losses, R1


@pytest.mark.parametrize("name", gan.LOSS_NAMES)
def test_losses_equal_their_formulas_at_known_logits(name):
    real, fake = np.array([2.0, -1.0, 0.5]), np.array([-3.0, 0.0, 1.5])
    p_real, p_fake = 1 / (1 + np.exp(-real)), 1 / (1 + np.exp(-fake))  # σ(D(·))
    p_pair = 1 / (1 + np.exp(fake - real))  # σ(D(x) − D(G(z))): the pair's real is real
    d_expected = {
        "minimax": -np.mean(np.log(p_real)) - np.mean(np.log(1 - p_fake)),
        "nonsaturating": -np.mean(np.log(p_real)) - np.mean(np.log(1 - p_fake)),
        "hinge": np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)),
        "relativistic": -np.mean(np.log(p_pair)),
    }[name]
    g_expected = {
        "minimax": np.mean(np.log(1 - p_fake)),
        "nonsaturating": -np.mean(np.log(p_fake)),
        "hinge": -np.mean(fake),
        "relativistic": -np.mean(np.log(1 - p_pair)),
    }[name]
    d_loss, g_loss = gan.LOSSES[name]
    if name in gan.PAIRED_LOSSES:
        g_loss = functools.partial(g_loss, jnp.asarray(real))
    np.testing.assert_allclose(d_loss(jnp.asarray(real), jnp.asarray(fake)), d_expected, rtol=1e-6)
    np.testing.assert_allclose(g_loss(jnp.asarray(fake)), g_expected, rtol=1e-6)
    if name == "hinge":  # by hand: (0 + 2 + 0.5)/3 + (0 + 1 + 2.5)/3
        np.testing.assert_allclose(d_loss(jnp.asarray(real), jnp.asarray(fake)), 2.0)


def test_gradient_penalty_equals_closed_forms():
    gamma, x = 3.0, normal((6, 2))
    # Linear D(x) = a·x + c: ∇ₓD = a everywhere, so R1 = γ/2 ‖a‖², and ∂R1/∂a = γ a.
    linear = lambda p, x: x @ p["a"] + p["c"]
    p = {"a": jnp.array([0.5, -2.0]), "c": jnp.array(1.0)}
    penalty = lambda p: gan.gradient_penalty(linear, p, x, gamma=gamma)
    np.testing.assert_allclose(penalty(p), 1.5 * 4.25, rtol=1e-6)
    grad = jax.grad(penalty)(p)
    np.testing.assert_allclose(grad["a"], gamma * p["a"], rtol=1e-6)
    np.testing.assert_allclose(grad["c"], 0.0)
    # Quadratic D(u) = ½ uᵀAu on packs u of 2 points: ∇ᵤD = ½(A + Aᵀ)u, the mean over packs.
    A = normal((4, 4), seed=1)
    quadratic = lambda A, x: 0.5 * jnp.einsum("bi,ij,bj->b", gan.pack(x, 2), A, gan.pack(x, 2))
    u = np.asarray(x).reshape(3, 4)
    grads = u @ (0.5 * (np.asarray(A) + np.asarray(A).T)).T
    expected = 0.5 * gamma * np.mean(np.sum(grads**2, axis=1))
    penalty = gan.gradient_penalty(quadratic, A, x, gamma=gamma)
    np.testing.assert_allclose(penalty, expected, rtol=1e-5)


# ----------------------------------------------------------------------------- spectral norm


def test_power_iteration_converges_to_the_largest_singular_value():
    w = normal((3, 3, 4, 8))  # a conv kernel: a [36, 8] matrix
    left, s, right = np.linalg.svd(np.asarray(w).reshape(-1, 8))
    u0 = gan._unit(normal((8,), seed=1))

    @jax.jit
    def estimates(w):
        (sigma_1, _), (sigma_50, u) = gan.power_iteration(w, u0, 1), gan.power_iteration(w, u0, 50)
        # At convergence ∂σ̂/∂W = v uᵀ, the top singular pair's outer product (sign-free).
        return sigma_1, sigma_50, jax.grad(lambda w: gan.power_iteration(w, u)[0])(w)

    sigma_1, sigma_50, grad = estimates(w)
    assert abs(sigma_50 - s[0]) / s[0] < 1e-4 < abs(sigma_1 - s[0]) / s[0]
    grad = grad.reshape(-1, 8)
    np.testing.assert_allclose(grad, np.outer(left[:, 0], right[0]), atol=1e-4)


def test_spectral_normalize_carries_its_vectors_from_call_to_call():
    w_IO = normal((20, 10))
    params = {"layer": {"w_IO": w_IO, "b_O": jnp.ones(10)}}
    sn = gan.init_spectral_state(params, jax.random.key(1))
    assert jax.tree.map(jnp.shape, sn) == {"layer": {"w_IO": (10,)}}  # biases stay as they are
    step = jax.jit(gan.spectral_normalize)  # one power iteration a call, as in training
    for _ in range(40):
        weights, sn = step(params, sn)
    sigma = np.linalg.svd(weights["layer"]["w_IO"], compute_uv=False)[0]
    np.testing.assert_allclose(sigma, 1.0, rtol=1e-4)
    chex.assert_trees_all_equal(weights["layer"]["b_O"], params["layer"]["b_O"])
    chex.assert_trees_all_equal(gan.spectral_normalize(params, {}), (params, {}))  # off


# ----------------------------------------------------------------------------- packing


def test_pack_puts_consecutive_examples_side_by_side():
    x = jnp.arange(12.0).reshape(6, 2)
    np.testing.assert_array_equal(gan.pack(x, 3), [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]])
    images = jnp.arange(16.0).reshape(4, 2, 2, 1)
    packed = gan.pack(images, 2)
    assert packed.shape == (2, 2, 2, 2)
    np.testing.assert_array_equal(packed[1, ..., 0], images[2, ..., 0])
    np.testing.assert_array_equal(packed[1, ..., 1], images[3, ..., 0])
    with pytest.raises(ValueError, match="multiple of pack=4"):
        gan.pack(x, 4)


def test_packing_sets_the_discriminators_input():
    d_params = init(MLP).d_params  # packs of 2 points
    assert d_params["hidden"][0]["w_IO"].shape[0] == 2 * 2  # the first layer reads M·D
    x = batch_for(MLP, 8)["x"]
    discriminate = jitted(gan.discriminate, MLP)
    logits = discriminate(d_params, x)
    assert logits.shape == (4,)
    moved = discriminate(d_params, x.at[5].add(1.0))  # example 5 is in pack 2 of 4
    np.testing.assert_array_equal(moved != logits, [False, False, True, False])
    with pytest.raises(ValueError, match="multiple of pack=2"):
        discriminate(d_params, x[:7])
    # Images: packs of 4 side by side in the channels (shapes only: nothing to compile).
    cfg = dataclasses.replace(CONV, num_classes=0, pack=4)
    _, d_params = jax.eval_shape(functools.partial(gan.init_params, cfg), jax.random.key(0))
    assert d_params["conv_in"]["w_HWIC"].shape == (3, 3, 4, 4)
    x_spec = jax.ShapeDtypeStruct((8, 8, 8, 1), jnp.float32)
    assert jax.eval_shape(functools.partial(gan.discriminate, cfg), d_params, x_spec).shape == (2,)


def test_fourier_features_are_the_discriminators_input():
    cfg = dataclasses.replace(MLP, fourier_features=16, fourier_scale=2.0)
    d_params = init(cfg).d_params
    assert d_params["hidden"][0]["w_IO"].shape[0] == 4 + 2 * 16  # a pair, sin and cos of 16
    x = batch_for(cfg, 8)["x"]
    logits = jitted(gan.discriminate, cfg)(d_params, x)
    assert logits.shape == (4,) and bool(jnp.all(jnp.isfinite(logits)))
    # By hand: x, then the sines and cosines of fixed (key 0), scaled frequencies.
    W = 2.0 * jax.random.normal(jax.random.key(0), (4, 16))
    xW = gan.pack(x, 2) @ W
    want = jnp.concatenate([gan.pack(x, 2), jnp.sin(xW), jnp.cos(xW)], -1)
    d = gan.discriminator(cfg, d_params)
    np.testing.assert_allclose(d.fourier(gan.pack(x, 2)), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- networks


@pytest.mark.parametrize(
    "cfg", [dataclasses.replace(TINY, num_classes=3), CONV], ids=["mlp", "conv"]
)
def test_projection_discriminator_adds_the_label_inner_product(cfg):
    d_params = init(cfg).d_params
    x, label_B = batch_for(cfg, 4)["x"], jnp.array([0, 1, 2, 1])

    @jax.jit
    def logits_and_features(d_params):
        d = gan.discriminator(cfg, d_params)
        return d(x, label_B), d.features(x)

    logits, phi_BF = logits_and_features(d_params)
    psi_B = phi_BF @ d_params["out"]["w_IO"][:, 0] + d_params["out"]["b_O"][0]
    expected = psi_B + jnp.sum(d_params["embed_KF"][label_B] * phi_BF, axis=-1)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs labels"):
        jax.eval_shape(lambda: gan.discriminator(cfg, d_params)(x))


def test_conditional_generator_reads_its_labels():
    g_params = init(CONV).g_params
    z_BZ = jnp.tile(normal((1, CONV.latent)), (3, 1))
    x = jitted(gan.generate, CONV)(g_params, z_BZ, jnp.array([0, 1, 2]))
    assert x.shape == (3, 8, 8, 1) and float(jnp.max(jnp.abs(x))) <= 1.0  # tanh: [−1, 1]
    assert not np.allclose(x[0], x[1]) and not np.allclose(x[1], x[2])
    with pytest.raises(ValueError, match="needs labels"):
        jax.eval_shape(lambda: gan.generate(CONV, g_params, z_BZ))
    g_plain, _ = jax.eval_shape(functools.partial(gan.init_params, TINY), jax.random.key(0))
    with pytest.raises(ValueError, match="num_classes=0"):
        jax.eval_shape(lambda: gan.generate(TINY, g_plain, z_BZ[:, :2], jnp.array([0, 1, 2])))


def test_sample_is_the_generator_of_standard_normal_latents():
    key = jax.random.key(2)

    @jax.jit
    def both(g_params):
        x = gan.sample(CONV, g_params, 5, key=key)  # classes 0, 1, 2, 0, 1
        z_BZ = jax.random.normal(key, (5, CONV.latent))
        return x, gan.generate(CONV, g_params, z_BZ, jnp.array([0, 1, 2, 0, 1]))

    np.testing.assert_array_equal(*both(init(CONV).g_params))


def test_uniform_latents_are_bounded_with_unit_variance_and_drive_sample():
    cfg = dataclasses.replace(TINY, latent_distribution="uniform")
    z = np.asarray(gan.draw_latents(cfg, 200_000, jax.random.key(4)))
    assert np.abs(z).max() <= np.sqrt(3) and np.abs(z).max() > 0.999 * np.sqrt(3)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=0.01)
    np.testing.assert_allclose(z.var(0), 1.0, atol=0.01)
    normal_z = gan.draw_latents(TINY, 5, jax.random.key(4))
    np.testing.assert_array_equal(normal_z, jax.random.normal(jax.random.key(4), (5, 2)))
    g_params = init(cfg).g_params
    x = gan.sample(cfg, g_params, 5, key=jax.random.key(4))
    z_BZ = gan.draw_latents(cfg, 5, jax.random.key(4))
    np.testing.assert_allclose(x, gan.generate(cfg, g_params, z_BZ), rtol=1e-6)


def test_param_axes_shard_the_state():
    mesh = meshlib.make_mesh("data=2,fsdp=4")
    axes = gan.param_axes(MLP)
    init_fn = functools.partial(gan.init, MLP)
    _, shardings = train.abstract_state(init_fn, mesh, gan.RULES, axes, jax.random.key(0))
    layer = ("hidden", 1, "w_IO")
    assert axes["d_params"]["hidden"][1]["w_IO"] == ("hidden_in", "hidden")
    assert jax.tree.structure(axes["g_ema"], is_leaf=lambda a: isinstance(a, tuple)) == (
        jax.tree.structure(jax.eval_shape(init_fn, jax.random.key(0)).g_ema)
    )
    for tree in (shardings.d_params, shardings.d_opt_state[0].mu):  # Adam follows the params
        spec = functools.reduce(lambda t, k: t[k], layer, tree).spec
        assert tuple(spec) == (None, "fsdp")


# ----------------------------------------------------------------------------- the steps

G_FIELDS, D_FIELDS = ("g_params", "g_opt_state", "g_ema"), ("d_params", "d_opt_state", "d_sn_state")


@pytest.mark.parametrize("cfg", [MLP, CONV], ids=["mlp", "conv"])
def test_each_step_changes_only_its_own_network(cfg):
    # The shapes of make_step's parts (two D steps on halves): their compiles are shared.
    state, batch, key = init(cfg), batch_for(cfg, 32), jax.random.key(3)
    half = jax.tree.map(lambda a: a[::2], batch)
    after_d, d_metrics = jitted(gan.discriminator_step, cfg)(state, half, key=key)
    after_g, g_metrics = jitted(gan.generator_step, cfg)(state, batch, key=key)
    for field in ("step", "rng", *G_FIELDS):
        chex.assert_trees_all_equal(getattr(after_d, field), getattr(state, field))
    for field in ("step", "rng", *D_FIELDS):
        chex.assert_trees_all_equal(getattr(after_g, field), getattr(state, field))
    for field in D_FIELDS:
        assert_changed(getattr(after_d, field), getattr(state, field))
    for field in G_FIELDS:
        assert_changed(getattr(after_g, field), getattr(state, field))
    assert float(d_metrics["r1"]) > 0
    assert all(np.isfinite(v) for v in jax.tree.leaves({**d_metrics, **g_metrics}))


def test_r2_and_the_paired_loss_read_the_steps_own_fakes_and_reals():
    cfg = dataclasses.replace(TINY, loss="relativistic", r1_gamma=0.5, r2_gamma=2.0, pack=2)
    state, batch, key = init(cfg), batch_for(cfg, 16), jax.random.key(5)
    _, d_metrics = jitted(gan.discriminator_step, cfg)(state, batch, key=key)
    _, g_metrics = jitted(gan.generator_step, cfg)(state, batch, key=key)
    # Each step draws its latents from its key: the same fakes again, by hand.
    fakes = gan.generate(cfg, state.g_params, jax.random.normal(key, (16, cfg.latent)))
    d_apply = functools.partial(gan.discriminate, cfg)
    real, fake = d_apply(state.d_params, batch["x"]), d_apply(state.d_params, fakes)
    r1 = gan.gradient_penalty(d_apply, state.d_params, batch["x"], gamma=0.5)
    r2 = gan.gradient_penalty(d_apply, state.d_params, fakes, gamma=2.0)
    np.testing.assert_allclose(d_metrics["r2"], r2, rtol=1e-5)
    assert float(r2) > 0 and not np.isclose(r2, 4 * r1)  # at the fakes, not the reals
    d_loss = gan.relativistic_d_loss(real, fake) + r1 + r2
    np.testing.assert_allclose(d_metrics["d_loss"], d_loss, rtol=1e-5)
    np.testing.assert_allclose(g_metrics["g_loss"], gan.relativistic_g_loss(real, fake), rtol=1e-5)


def test_make_step_is_two_discriminator_steps_then_a_generator_step():
    state, batch = init(MLP), batch_for(MLP, 32)
    out, metrics = jitted_step(MLP)(state, batch)
    again, _ = jitted_step(MLP)(state, batch)  # pure: the same state and batch, the same step
    chex.assert_trees_all_equal(again, out)

    d_step, g_step = jitted(gan.discriminator_step, MLP), jitted(gan.generator_step, MLP)
    key = train.step_key(state)
    np.testing.assert_array_equal(gan.split_batch(batch, 2)["x"][1], batch["x"][1::2])
    s, m0 = d_step(state, {"x": batch["x"][0::2]}, key=jax.random.fold_in(key, 0))
    s, m1 = d_step(s, {"x": batch["x"][1::2]}, key=jax.random.fold_in(key, 1))
    s, mg = g_step(s, batch, key=jax.random.fold_in(key, 2))
    chex.assert_trees_all_close(out, s._replace(step=s.step + 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["d_loss"], (m0["d_loss"] + m1["d_loss"]) / 2, rtol=1e-5)
    np.testing.assert_allclose(metrics["g_loss"], mg["g_loss"], rtol=1e-5)
    assert int(out.step) == 1


def test_rates_hold_then_fall_to_zero_counting_each_players_updates():
    assert gan.learning_rate(TINY, 1e-3, 1) == 1e-3  # lr_decay=0: constant
    cfg = dataclasses.replace(TINY, lr_decay=0.25, total_steps=400)
    g_rate, d_rate = gan.learning_rate(cfg, 1.0, 1), gan.learning_rate(cfg, 1.0, 2)
    np.testing.assert_allclose([g_rate(n) for n in (0, 300, 350, 400, 500)], [1, 1, 0.5, 0, 0])
    np.testing.assert_allclose([d_rate(n) for n in (0, 600, 700, 800)], [1, 1, 0.5, 0])
    with pytest.raises(ValueError, match="set total_steps"):
        gan.learning_rate(dataclasses.replace(cfg, total_steps=0), 1.0, 1)


def test_steps_past_the_decay_leave_both_networks_as_they_are():
    # One step's worth of decay: the generator's rate is 0 from its 2nd update, the
    # discriminator's (two updates a step) from its 3rd: step 1 moves both, step 2 neither.
    cfg = dataclasses.replace(MLP, lr_decay=1.0, total_steps=1)
    step, state = jitted_step(cfg), init(cfg)
    first, _ = step(state, batch_for(cfg, 32, seed=0))
    second, _ = step(first, batch_for(cfg, 32, seed=1))
    for field in ("g_params", "d_params"):
        assert_changed(getattr(first, field), getattr(state, field))
        chex.assert_trees_all_equal(getattr(second, field), getattr(first, field))
    assert_changed(second.g_ema, first.g_ema)  # still averaging toward the last weights


def assert_sharded_step_equals_one_device(cfg: gan.GANConfig, mesh_spec: str):
    batch, init_fn = batch_for(cfg, 32), functools.partial(gan.init, cfg)
    mesh = meshlib.make_mesh(mesh_spec)
    axes = gan.param_axes(cfg)
    _, shardings = train.abstract_state(init_fn, mesh, gan.RULES, axes, jax.random.key(0))
    single, _ = jitted_step(cfg)(init(cfg), batch)
    # From host copies: the sharded step donates its state, which must not be init's.
    state = jax.device_put(jax.device_get(init(cfg)), shardings)
    step = train.jit_train_step(gan.make_step(cfg), shardings, mesh)
    sharded, _ = step(state, meshlib.global_batch(jax.device_get(batch), mesh))
    chex.assert_trees_all_close(jax.device_get(sharded), single, rtol=1e-4, atol=1e-5)


def test_sharded_step_equals_one_device():
    assert_sharded_step_equals_one_device(MLP, "data=2,fsdp=4")


def test_batch_norm_generator_is_normalized_over_the_batch_and_shards():
    cfg = dataclasses.replace(MLP, g_batch_norm=True, data_scale=4.0)
    g = gan.generator(cfg, init(cfg).g_params)
    h_BU = g.hidden[0](normal((64, cfg.latent)))
    normed = g.norms[0](h_BU)
    np.testing.assert_allclose(jnp.mean(normed, 0), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.std(normed, 0), 1.0, rtol=1e-3)
    # The batch statistics reduce over a batch split across devices.
    assert_sharded_step_equals_one_device(cfg, "data=4,fsdp=2")


def test_translate_shifts_each_image_by_at_most_one_eighth_and_passes_gradients():
    x = normal((16, 8, 8, 2))
    y = jax.jit(gan.translate)(x, jax.random.key(0))
    shifts = set()
    for b in range(16):  # each output is its input shifted by one (dy, dx), −1 filled in
        padded = np.pad(np.asarray(x[b]), ((1, 1), (1, 1), (0, 0)), constant_values=-1.0)
        match = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                 if np.array_equal(y[b], padded[1 + dy : 9 + dy, 1 + dx : 9 + dx])]  # fmt: skip
        assert len(match) == 1, b
        shifts.add(match[0])
    assert len(shifts) > 3  # the shifts vary over the batch
    grad = jax.grad(lambda x: jnp.sum(gan.translate(x, jax.random.key(0))))(x)
    assert set(np.unique(grad)) <= {0.0, 1.0} and float(jnp.sum(grad)) >= 16 * 6 * 6 * 2


def test_data_scale_scales_the_samples_and_the_discriminators_input():
    scaled = dataclasses.replace(TINY, data_scale=4.0)
    state = init(TINY)
    z_BZ, x = normal((6, TINY.latent)), normal((6, 2), seed=1)
    np.testing.assert_allclose(
        jitted(gan.generate, scaled)(state.g_params, z_BZ),
        4.0 * jitted(gan.generate, TINY)(state.g_params, z_BZ),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        jitted(gan.discriminate, scaled)(state.d_params, 4.0 * x),
        jitted(gan.discriminate, TINY)(state.d_params, x),
        rtol=1e-5,
    )


def test_training_on_the_ring_moves_samples_onto_it():
    steps, B = 400, 32  # the batch of the tests above: their compiled step serves here
    data = toy2d.ring().sample(steps * B, seed=0).reshape(steps, B, 2)

    @jax.jit
    def off_ring(g_params):  # mean distance of 1,000 samples from the ring's radius, 1
        x = gan.sample(MLP, g_params, 1000, key=jax.random.key(1))
        return jnp.mean(jnp.abs(jnp.linalg.norm(x, axis=-1) - 1.0))

    state = init(MLP)
    before = off_ring(state.g_ema)
    for x in data:
        state, metrics = jitted_step(MLP)(state, {"x": x})
        assert np.isfinite(metrics["d_loss"]) and np.isfinite(metrics["g_loss"])
    after = off_ring(state.g_ema)
    assert after < 0.3 * before, (before, after)  # seed 0: 0.73 → 0.10


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, fix",
    [
        (dict(arch="gru"), "choose one of"),
        (dict(loss="wasserstein"), "choose one of"),
        (dict(latent_distribution="cauchy"), "choose one of"),
        (dict(r1_gamma=-1.0), "0 turns each off"),
        (dict(r2_gamma=-1.0), "0 turns each off"),
        (dict(pack=0), "1: no packing"),
        (dict(d_steps=0), "must be >= 1"),
        (dict(ema_decay=1.0), r"in \[0, 1\)"),
        (dict(num_classes=-1), "0: unconditional"),
        (dict(num_classes=10, pack=2), "set pack=1 or num_classes=0"),
        (dict(maxout=1), "use >= 2"),
        (dict(fourier_features=-1), "0: off"),
        (dict(fourier_scale=0.0), "0: off"),
        (dict(arch="conv", shape=(8, 8, 1), fourier_features=8), "set it to 0 for conv"),
        (dict(data_scale=0.0), "must be > 0"),
        (dict(augment=True), "use arch='conv'"),
        (dict(latent=0), "must be >= 1"),
        (dict(g_lr=0.0), "must be > 0"),
        (dict(b1=1.0), r"in \[0, 1\)"),
        (dict(lr_decay=1.5), r"in \[0, 1\] \(0: constant rates\)"),
        (dict(total_steps=-1), "the run's updates"),
        (dict(shape=(8, 8, 1)), "use arch='conv'"),
        (dict(arch="conv", shape=(2,)), r"shape=\(H, W, C\)"),
        (dict(arch="conv", shape=(6, 6, 1), channels=(8, 16, 32)), "use fewer channels"),
        (dict(arch="conv", shape=(8, 8, 1), channels=(8, 12), groups=8), "must divide"),
    ],
)
def test_bad_config_values_raise_naming_the_fix(change, fix):
    with pytest.raises(ValueError, match=fix):
        gan.GANConfig(**change)


def test_bad_batches_raise_naming_the_fix():
    cfg = dataclasses.replace(TINY, d_steps=2, pack=3)
    gan.check_batch_size(cfg, 12)
    with pytest.raises(ValueError, match="multiple of 6"):
        gan.check_batch_size(cfg, 9)
    state = jax.eval_shape(functools.partial(gan.init, cfg), jax.random.key(0))
    with pytest.raises(ValueError, match="multiple of 6"):
        jax.eval_shape(gan.make_step(cfg), state, batch_for(cfg, 9))
    state = jax.eval_shape(functools.partial(gan.init, CONV), jax.random.key(0))
    unlabelled = {"x": jnp.zeros((2, 8, 8, 1))}
    with pytest.raises(ValueError, match=r"needs batch\['label'\]"):
        jax.eval_shape(lambda: gan.generator_step(CONV, state, unlabelled, key=jax.random.key(0)))
