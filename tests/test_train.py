import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from genjax import lm, run, train
from genjax import mesh as meshlib
from genjax.checkpoint import Checkpointer
from genjax.models import transformer

# 8 heads and 8 kv heads so pure tensor parallelism over 8 devices divides evenly;
# the GQA path is covered by the tiny preset on the mixed mesh.
CFG_TP = dataclasses.replace(
    transformer.get_preset("tiny"), num_heads=8, num_kv_heads=8, head_dim=8
)
OPTIM = train.OptimConfig(lr=3e-3, warmup_steps=1, total_steps=10)


def _create(cfg, mesh, optim=OPTIM):
    """The LM family's state and shardings, created sharded."""
    family_cfg = lm.PretrainConfig(model=cfg, optim=optim)
    _, shardings = run.abstract_state(family_cfg, lm.FAMILY, mesh)
    init = lambda key: lm.init(family_cfg, key)
    return train.create_state(init, shardings, mesh, jax.random.key(0)), shardings


def _setup(cfg, mesh, optim=OPTIM):
    state, shardings = _create(cfg, mesh, optim)
    step = lm.make_step(lm.PretrainConfig(model=cfg, optim=optim))
    return state, train.jit_train_step(step, shardings, mesh)


def _batches(cfg, n, batch=8, length=33):
    rng = np.random.default_rng(0)
    return [
        {"tokens": rng.integers(0, cfg.vocab_size, (batch, length), dtype=np.int32)}
        for _ in range(n)
    ]


def _run(cfg, spec, devices=None, n=5, optim=OPTIM, length=33):
    mesh = meshlib.make_mesh(spec, devices)
    state, step = _setup(cfg, mesh, optim)
    losses = []
    for b in _batches(cfg, n, length=length):
        state, metrics = step(state, meshlib.global_batch(b, mesh))
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


@pytest.fixture(scope="module")
def single_device_tp():
    return _run(CFG_TP, "data=1", jax.devices()[:1])


@pytest.fixture(scope="module")
def single_device_tiny():
    return _run(transformer.get_preset("tiny"), "data=1", jax.devices()[:1])


# Sharded and single-device runs differ only in reduction order: float32 noise.
LOSS_RTOL = 2e-5
PARAM_ATOL = 2e-5


@pytest.mark.parametrize("spec", ["fsdp=8", "tensor=8", "data=8"])
def test_sharded_training_equals_one_device(spec, single_device_tp):
    losses, state = _run(CFG_TP, spec)
    ref_losses, ref_state = single_device_tp
    np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
    chex.assert_trees_all_close(
        jax.device_get(state.params), jax.device_get(ref_state.params), atol=PARAM_ATOL
    )


def test_mixed_mesh_equals_one_device_with_gqa(single_device_tiny):
    losses, state = _run(transformer.get_preset("tiny"), "data=2,fsdp=2,tensor=2")
    np.testing.assert_allclose(losses, single_device_tiny[0], rtol=LOSS_RTOL)
    chex.assert_trees_all_close(
        jax.device_get(state.params), jax.device_get(single_device_tiny[1].params), atol=PARAM_ATOL
    )


def test_splash_attention_on_a_mixed_mesh_equals_xla_on_one_device():
    # The splash kernel runs per shard (shard_map over batch and heads),
    # interpreted on these CPU devices; GQA: 2 query heads and 1 KV head a
    # shard. Its key blocks are 128 wide: 128-token rows, 3 steps.
    tiny = dataclasses.replace(transformer.get_preset("tiny"), max_seq_len=128)
    splash = dataclasses.replace(tiny, attention="splash")
    ref_losses, ref_state = _run(tiny, "data=1", jax.devices()[:1], n=3, length=129)
    losses, state = _run(splash, "data=2,fsdp=2,tensor=2", n=3, length=129)
    np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
    chex.assert_trees_all_close(
        jax.device_get(state.params), jax.device_get(ref_state.params), atol=PARAM_ATOL
    )


def test_gradient_accumulation_on_a_sharded_mesh_equals_one_device(single_device_tiny):
    optim = dataclasses.replace(OPTIM, grad_accum=2)
    losses, _ = _run(transformer.get_preset("tiny"), "data=2,fsdp=2,tensor=2", optim=optim)
    np.testing.assert_allclose(losses, single_device_tiny[0], rtol=LOSS_RTOL)


def test_parameters_are_sharded_as_declared():
    mesh = meshlib.make_mesh("data=2,fsdp=2,tensor=2")
    state, _ = _setup(transformer.get_preset("tiny"), mesh)
    axes = transformer.param_axes(transformer.get_preset("tiny"))
    jax.tree.map(
        lambda a, x: _assert_spec(x, meshlib.logical_to_spec(a, transformer.RULES)),
        axes, state.params, is_leaf=lambda a: isinstance(a, tuple),
    )  # fmt: skip
    emb = state.params["embed_VD"]  # (vocab, embed) -> (tensor, fsdp)
    assert emb.sharding.spec == P("tensor", "fsdp")
    assert {s.data.shape for s in emb.addressable_shards} == {(512 // 2, 64 // 2)}
    wq = state.params["blocks"]["attn"]["wq_DNK"]  # (layers, embed, heads, head_dim)
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
    # Adam moments are sharded like their parameters.
    mu = state.opt_state[1][0].mu["embed_VD"]
    assert mu.sharding.spec == P("tensor", "fsdp")
    fsdp_state, _ = _setup(CFG_TP, meshlib.make_mesh("fsdp=8"))
    w_up = fsdp_state.params["blocks"]["mlp"]["w_up_DF"]
    assert {s.data.shape for s in w_up.addressable_shards} == {(2, 64 // 8, 128)}


def _assert_spec(x, spec):
    assert x.sharding.spec == spec, (x.sharding.spec, spec)


def test_gradient_accumulation_equals_full_batch():
    cfg = transformer.get_preset("tiny")
    full, s_full = _run(cfg, "data=1", jax.devices()[:1], n=3)
    accum, s_acc = _run(
        cfg, "data=1", jax.devices()[:1], n=3, optim=dataclasses.replace(OPTIM, grad_accum=4)
    )
    np.testing.assert_allclose(accum, full, rtol=1e-5)
    chex.assert_trees_all_close(s_acc.params, s_full.params, atol=1e-5)


def test_schedule_warms_up_then_decays():
    sched = train.make_schedule(
        train.OptimConfig(lr=1.0, warmup_steps=10, total_steps=100, min_lr_ratio=0.1)
    )
    assert float(sched(0)) == 0.0
    assert float(sched(10)) == pytest.approx(1.0)
    assert float(sched(100)) == pytest.approx(0.1)
    assert float(sched(55)) < float(sched(20))


def test_weight_decay_skips_vectors():
    mask = transformer.decay_mask(transformer.get_preset("tiny"))
    assert mask["embed_VD"] and mask["blocks"]["mlp"]["w_up_DF"]
    assert not mask["final_norm"]["scale"] and not mask["blocks"]["attn_norm"]["scale"]


class _ListLogger:
    def __init__(self):
        self.records = []

    def log(self, step, metrics):
        self.records.append({"step": step, **metrics})

    def advance(self, n=1):
        pass

    def write(self, msg):
        pass


def test_non_finite_loss_stops_before_it_reaches_a_checkpoint(tmp_path):
    """A NaN at step 4 (saving every step) leaves checkpoints 1-3, all finite."""
    cfg = transformer.get_preset("tiny")
    mesh = meshlib.make_mesh("data=1", jax.devices()[:1])
    state, shardings = _create(cfg, mesh)
    optimizer = lm.make_optimizer(lm.PretrainConfig(model=cfg, optim=OPTIM))

    def poisonable_loss(params, batch, *, key):
        loss, aux = transformer.loss(cfg, params, batch)
        return loss * batch["scale"][0], aux

    step = train.jit_train_step(
        train.make_train_step(poisonable_loss, optimizer, OPTIM), shardings, mesh
    )
    batches = []
    for i, b in enumerate(_batches(cfg, 8)):
        b["scale"] = np.full((8,), np.nan if i == 3 else 1.0, np.float32)
        batches.append(meshlib.global_batch(b, mesh))
    abstract = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state, shardings
    )
    logger = _ListLogger()
    with Checkpointer(tmp_path, config={"model": {}}, keep=10, save_every=1) as ckpt:
        with pytest.raises(
            run.NonFiniteLossError,
            match=r"loss is nan.* at step 4; .*last good checkpoint \(step 3\) is untouched",
        ):
            run.fit(
                state,
                step,
                iter(batches),
                num_steps=8,
                checkpointer=ckpt,
                logger=logger,
                log_every=1,
            )
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2, 3]
        restored, restored_step = ckpt.restore(abstract)
    assert restored_step == 3
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(restored.params)))
    assert [r["step"] for r in logger.records] == [1, 2, 3]


def test_fit_logs_every_step_and_counts():
    cfg = transformer.get_preset("tiny")
    mesh = meshlib.make_mesh("data=1", jax.devices()[:1])
    state, step = _setup(cfg, mesh)
    logger = _ListLogger()
    batches = (meshlib.global_batch(b, mesh) for b in _batches(cfg, 4))
    result = run.fit(
        state, step, batches, num_steps=4, logger=logger, log_every=2, throughput=("tokens", 8 * 32)
    )
    assert int(result.state.step) == 4
    assert [r["step"] for r in logger.records] == [2, 4]
    assert {"loss", "grad_norm", "lr", "tokens_per_s"} <= set(logger.records[-1])


@pytest.mark.parametrize(
    "optimizer",
    [
        optax.adam(1e-3),
        optax.masked(optax.adam(1e-3), {"w": True, "b": False}),  # b frozen: MaskedNode
        optax.multi_transform({"a": optax.adam(1e-3), "s": optax.sgd(1e-2)}, {"w": "a", "b": "s"}),
    ],
    ids=["adam", "masked", "multi_transform"],
)
def test_optimizer_state_follows_its_parameters_whatever_the_optimizer(optimizer):
    mesh = meshlib.make_mesh("fsdp=8")
    rules = {"hidden": "fsdp"}
    axes = {"params": {"w": (None, "hidden"), "b": ("hidden",)}}
    init = lambda key: {
        "step": jnp.zeros((), jnp.int32),
        "params": (p := {"w": jnp.zeros((4, 16)), "b": jnp.zeros(16)}),
        "opt_state": optimizer.init(p),
        "ema": p,
    }
    abstract = jax.eval_shape(init, jax.random.key(0))
    params = {
        "params": (
            abstract["params"],
            meshlib.tree_shardings(axes["params"], abstract["params"], mesh, rules),
        )
    }
    shardings = train.follow_params(abstract, params, mesh)
    specs = {
        jax.tree_util.keystr(path): s.spec
        for path, s in jax.tree_util.tree_leaves_with_path(shardings)
    }
    moments = [k for k in specs if "['w']" in k and "opt_state" in k]
    assert moments and all(specs[k] == P(None, "fsdp") for k in moments), specs
    assert specs["['ema']['w']"] == P(None, "fsdp") and specs["['step']"] == P()
    assert jax.tree.structure(shardings) == jax.tree.structure(abstract)


def test_tensorflow_style_adam_moves_eps_inside_the_bias_correction():
    b1, b2, eps, lr = 0.9, 0.999, 1e-3, 0.1
    cfg = train.OptimConfig(lr=lr, warmup_steps=0, total_steps=10, min_lr_ratio=1.0,
                            weight_decay=0.0, b1=b1, b2=b2, eps=eps, clip_norm=None,
                            eps_style="tensorflow")  # fmt: skip
    opt = train.make_optimizer(cfg)
    params = {"w": jnp.zeros(3)}
    state = opt.init(params)
    m = v = np.zeros(3)
    for t, g in enumerate([np.array([1.0, -2.0, 0.5]), np.array([0.3, 0.1, -1.0])], start=1):
        updates, state = opt.update({"w": jnp.asarray(g)}, state, params)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        expected = -lr * m_hat / (np.sqrt(v_hat) + eps / np.sqrt(1 - b2**t))
        np.testing.assert_allclose(updates["w"], expected, rtol=1e-4)  # float32 1 − β₂ᵗ
    with pytest.raises(ValueError, match="eps_style"):
        train.OptimConfig(eps_style="keras")


def test_gradient_accumulation_of_masked_rows_equals_full_batch():
    """SFT's rows: the loss is a mean over unmasked targets, which the micro-batches hold
    unevenly (micro-batch i is rows i and i + 4; micro-batch 3 has none)."""
    cfg = transformer.get_preset("tiny")
    mesh = meshlib.make_mesh("data=1", jax.devices()[:1])
    targets_per_row = np.array([30, 2, 5, 0, 31, 1, 2, 0])
    mask = (np.arange(32)[None, :] >= 32 - targets_per_row[:, None]).astype(np.float32)
    batches = [dict(b, mask=mask) for b in _batches(cfg, 3)]
    runs = []
    for grad_accum in (1, 4):
        state, step = _setup(cfg, mesh, dataclasses.replace(OPTIM, grad_accum=grad_accum))
        losses = []
        for b in batches:
            state, metrics = step(state, meshlib.global_batch(b, mesh))
            losses.append(float(metrics["loss"]))
        runs.append((losses, jax.device_get(state.params)))
    np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=1e-5)
    chex.assert_trees_all_close(runs[1][1], runs[0][1], atol=2e-5)


def test_micro_batches_that_do_not_divide_a_device_share_or_a_whole_batch_step_are_refused():
    from genjax import dpo, reward_model, rlhf

    mesh = meshlib.make_mesh("data=2,fsdp=4")  # 8-way data parallel: 2 rows a device of 16
    three = train.OptimConfig(grad_accum=3)
    for family, cfg in [
        (lm, lm.PretrainConfig(optim=three)),
        (reward_model, reward_model.Config(optim=three)),
    ]:
        with pytest.raises(ValueError, match=r"grad_accum=3 does not divide the \d+ rows each"):
            family.check(dataclasses.replace(cfg, data=dataclasses.replace(
                cfg.data, global_batch_size=16)), mesh)  # fmt: skip
    two = train.OptimConfig(grad_accum=2)
    with pytest.raises(ValueError, match="grad_accum=2: DPO updates on its whole batch"):
        dpo.check(dpo.Config(optim=two), mesh)
    with pytest.raises(ValueError, match=r"grad_accum=2: RL \(its minibatches"):
        rlhf.check(rlhf.Config(optim=two), mesh)
