"""evaluate over 8 fake devices equals the single-device reference, padding included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax import evaluate as ev

D, C, T = 8, 5, 3  # features, classes, tokens per row (for the per-token mask test)


def _params(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"w_DC": jax.random.normal(k1, (D, C)), "b_C": jax.random.normal(k2, (C,))}


def _batch(rng, n, mask=False):
    b = {"x": rng.normal(size=(n, D)).astype(np.float32), "y": rng.integers(0, C, n)}
    if mask:
        b["mask"] = (rng.random(n) < 0.7).astype(np.float32)
    return b


def classifier_sums(params, batch):
    """Linear softmax classifier: summed NLL, correct predictions and example count."""
    logits_BC = batch["x"] @ params["w_DC"] + params["b_C"]
    nll_B = -jnp.take_along_axis(jax.nn.log_softmax(logits_BC), batch["y"][:, None], 1)[:, 0]
    mask_B = batch.get("mask", jnp.ones_like(nll_B))
    correct_B = (logits_BC.argmax(-1) == batch["y"]).astype(jnp.float32)
    return {
        "nll": jnp.sum(nll_B * mask_B),
        "correct": jnp.sum(correct_B * mask_B),
        "count": jnp.sum(mask_B),
    }


def token_sums(params, batch):
    """Per-token NLL with a per-token [B, T] mask, like a language model's."""
    logits_BTC = batch["x"] @ params["w_DC"] + params["b_C"]
    logp_BTC = jax.nn.log_softmax(logits_BTC)
    nll_BT = -jnp.take_along_axis(logp_BTC, batch["y"][..., None], -1)[..., 0]
    return {"nll": jnp.sum(nll_BT * batch["mask"]), "tokens": jnp.sum(batch["mask"])}


def _assert_close(got, want):
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, err_msg=k)


def test_mesh_spans_all_local_devices():
    mesh = ev.make_eval_mesh()
    assert mesh.axis_names == ("batch",) and mesh.size == 8 == len(jax.local_devices())


@pytest.mark.parametrize("with_mask", [False, True])
def test_sharded_equals_single_device_with_ragged_last_batch(with_mask):
    rng = np.random.default_rng(0)
    batches = [_batch(rng, n, mask=with_mask) for n in (16, 16, 11)]  # 11 is not a multiple of 8
    params = _params()
    got = ev.evaluate(classifier_sums, params, batches)
    want = ev.evaluate_single_device(classifier_sums, params, batches)
    _assert_close(got, want)
    expected_count = sum(b["mask"].sum() for b in batches) if with_mask else 43
    assert got["count"] == expected_count  # padding rows counted nowhere


def test_per_token_mask_is_padded_with_zeros():
    rng = np.random.default_rng(1)
    batches = []
    for n in (24, 5):
        mask_BT = (rng.random((n, T)) < 0.8).astype(np.float32)
        x_BTD = rng.normal(size=(n, T, D)).astype(np.float32)
        batches.append({"x": x_BTD, "y": rng.integers(0, C, (n, T)), "mask": mask_BT})
    got = ev.evaluate(token_sums, _params(1), batches)
    _assert_close(got, ev.evaluate_single_device(token_sums, _params(1), batches))
    assert got["tokens"] == sum(b["mask"].sum() for b in batches)


def test_runs_on_eight_devices_each_with_an_eighth_of_the_batch():
    seen_shapes = []

    def probe(params, batch):
        seen_shapes.append(batch["x"].shape)  # at trace time: the per-device slice
        return {"device_ids": jax.lax.axis_index("batch"), "devices": jnp.ones(())}

    out = ev.evaluate(probe, _params(), [_batch(np.random.default_rng(2), 32)])
    assert seen_shapes == [(4, D)]
    assert out == {"device_ids": float(sum(range(8))), "devices": 8.0}


def test_input_is_sharded_over_eight_devices():
    mesh = ev.make_eval_mesh()
    batch = ev.pad_batch(_batch(np.random.default_rng(3), 13), 16)
    placed = jax.device_put(batch, jax.NamedSharding(mesh, jax.P("batch")))
    shards = placed["x"].addressable_shards
    assert len({s.device for s in shards}) == 8 and all(s.data.shape == (2, D) for s in shards)


def test_compiles_once_for_full_and_ragged_batches():
    traces = []

    def counting_sums(params, batch):
        traces.append(batch["x"].shape)
        return classifier_sums(params, batch)

    rng = np.random.default_rng(4)
    batches = [_batch(rng, n, mask=True) for n in (16, 16, 16, 5)]
    ev.evaluate(counting_sums, _params(), batches)
    ev.evaluate(counting_sums, _params(), batches)  # cached by sum_fn: no retrace
    assert len(traces) == 1


def test_pad_batch_repeats_last_row_and_zeroes_mask():
    batch = _batch(np.random.default_rng(5), 3)
    padded = ev.pad_batch(batch, 8)
    np.testing.assert_array_equal(padded["x"][3:], np.repeat(batch["x"][-1:], 5, 0))
    np.testing.assert_array_equal(padded["mask"], [1, 1, 1, 0, 0, 0, 0, 0])
    assert ev.pad_batch(batch, 3) == batch


def test_bad_input_gets_clear_errors():
    rng = np.random.default_rng(6)
    with pytest.raises(ValueError, match="no batches"):
        ev.evaluate(classifier_sums, _params(), [])
    bad = {"x": np.zeros((8, D), np.float32), "y": np.zeros((7,), np.int32)}
    with pytest.raises(ValueError, match="same leading"):
        ev.evaluate(classifier_sums, _params(), [bad])
    vector_sums = lambda p, b: {"per_class": jnp.zeros(C)}
    with pytest.raises(ValueError, match="must return scalars"):
        ev.evaluate(vector_sums, _params(), [_batch(rng, 8)])


def test_params_sharded_elsewhere_are_replicated_first():
    # A train state sharded FSDP-style (rows of w over all devices) evaluates the same.
    mesh = jax.make_mesh((8,), ("fsdp",))
    params = _params()
    sharded = {
        "w_DC": jax.device_put(params["w_DC"], jax.NamedSharding(mesh, jax.P("fsdp"))),
        "b_C": params["b_C"],
    }
    batches = [_batch(np.random.default_rng(7), 16)]
    _assert_close(
        ev.evaluate(classifier_sums, sharded, batches),
        ev.evaluate_single_device(classifier_sums, params, batches),
    )


def test_a_language_model_batch_without_a_mask_gets_its_padding_rows_masked():
    """The row mask [B] evaluate adds covers each padding row's every target."""
    from genjax.models import transformer

    cfg = transformer.get_preset("tiny")
    params = transformer.init(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 9)).astype(np.int32)
    sums = lambda p, b: transformer.nll_sums(cfg, p, b)
    got = ev.evaluate(sums, params, [{"tokens": tokens}])
    _assert_close(got, ev.evaluate_single_device(sums, params, [{"tokens": tokens}]))
    assert got["tokens"] == 3 * 8
