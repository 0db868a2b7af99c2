"""Shared layers (genjax.nn): projections as 2-D matmuls, joined layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax.nn import layers


@pytest.mark.parametrize(
    ("spec", "x_shape", "w_shape"),
    [
        ("BTD,DNK->BTNK", (2, 3, 8), (8, 4, 5)),  # one input axis, two output axes
        ("BTNK,NKD->BTD", (2, 3, 4, 5), (4, 5, 8)),  # two input axes
        ("BTD,DV->BTV", (2, 3, 8), (8, 11)),
        ("BD,DF->BF", (3, 8), (8, 6)),
    ],
)
def test_projection_is_the_einsum_it_names(spec, x_shape, w_shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    assert layers._as_matmul(spec) is not None  # lowered to one matmul
    got = jax.jit(lambda x, w: layers.einsum(spec, x, w))(x, w)
    np.testing.assert_allclose(got, jnp.einsum(spec, x, w), rtol=1e-5, atol=1e-5)


def test_other_contractions_fall_back_to_einsum():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 4, 5)), jnp.float32)
    spec = "BTD,BDF->BTF"  # a batched contraction, not a projection
    assert layers._as_matmul(spec) is None
    np.testing.assert_allclose(layers.einsum(spec, x, w), jnp.einsum(spec, x, w), rtol=1e-6)


def test_einsum_computes_in_the_inputs_dtype():
    x = jnp.ones((2, 4), jnp.bfloat16)
    w = jnp.ones((4, 3), jnp.float32)  # float32 parameters, bf16 compute
    assert layers.einsum("BD,DF->BF", x, w).dtype == jnp.bfloat16


def test_projections_hand_a_joined_layout_all_of_its_weights():
    class Joined:
        def project(self, x):
            return [x + 1, x + 2]

    x = jnp.zeros((2, 3))
    a, b = layers.projections("BD,DF->BF", x, Joined(), None)
    np.testing.assert_array_equal(a, 1.0)
    np.testing.assert_array_equal(b, 2.0)
    with pytest.raises(ValueError, match="a joined layout of 2 weights used for 3"):
        layers.projections("BD,DF->BF", x, Joined(), None, None)
