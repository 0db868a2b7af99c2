import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from genjax import mesh as meshlib
from genjax.models import transformer


def test_parse_mesh_spec_fills_wildcard_and_defaults():
    assert meshlib.parse_mesh_spec("data=2,fsdp=-1", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert meshlib.parse_mesh_spec("tensor=8", 8) == {"data": 1, "fsdp": 1, "tensor": 8}
    assert meshlib.parse_mesh_spec("", 1) == {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("data=3", "has 3 devices but 8 are available"),
        ("data=3,fsdp=-1", "does not divide the 8 devices"),
        ("data=-1,fsdp=-1", "only one axis may be -1"),
        ("pipeline=2", "not AXIS=SIZE"),
        ("data=two", "not an integer"),
        ("data=2,data=4", "given twice"),
    ],
)
def test_bad_mesh_specs_are_clear_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        meshlib.make_mesh(spec)


def test_make_mesh_shape_and_axes():
    mesh = meshlib.make_mesh("data=2,fsdp=2,tensor=2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.devices.size == len(jax.devices()) == 8


def test_logical_rules_map_to_mesh_axes():
    rules = transformer.RULES  # each model brings its own table
    assert meshlib.logical_to_spec(("vocab", "embed"), rules) == P("tensor", "fsdp")
    assert meshlib.logical_to_spec(("batch", None), rules) == P(("data", "fsdp"), None)
    assert meshlib.logical_to_spec(("layers", "embed", "mlp"), rules) == P(None, "fsdp", "tensor")
    with pytest.raises(KeyError, match="no rule"):
        meshlib.logical_to_spec(("nonsense",), rules)
    with pytest.raises(ValueError, match=r"names mesh axes \['pipeline'\]"):
        meshlib.logical_to_spec(("embed",), {"embed": "pipeline"})


def test_batch_not_divisible_by_data_axes():
    mesh = meshlib.make_mesh("data=2,fsdp=2,tensor=2")
    meshlib.check_batch_size(8, mesh)
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 4"):
        meshlib.check_batch_size(6, mesh)


def test_parameter_that_does_not_divide_is_named():
    cfg = transformer.get_preset("tiny")  # 2 kv heads
    mesh = meshlib.make_mesh("tensor=8")
    with pytest.raises(ValueError, match=r"wk_DGK.*'kv_heads' = 2 does not divide"):
        axes, shapes = transformer.param_axes(cfg), transformer.abstract_params(cfg)
        meshlib.tree_shardings(axes, shapes, mesh, transformer.RULES)


def test_global_batch_is_sharded_over_batch_axes():
    mesh = meshlib.make_mesh("data=2,fsdp=2,tensor=2")
    local = {"tokens": np.arange(8 * 5, dtype=np.int32).reshape(8, 5)}
    batch = meshlib.global_batch(local, mesh)
    assert batch["tokens"].sharding.spec == P(("data", "fsdp"), None)
    assert {s.data.shape for s in batch["tokens"].addressable_shards} == {(2, 5)}
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), local["tokens"])
