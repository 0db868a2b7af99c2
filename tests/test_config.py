"""override / to_dict / from_dict on nested frozen dataclass configs."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Literal

import pytest

from genjax.config import add_set_flag, from_dict, override, to_dict


@dataclasses.dataclass(frozen=True)
class Model:
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int = 4
    tie_embeddings: bool = True
    dropout: float = 0.0
    dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} not a multiple of {self.num_kv_heads}")


@dataclasses.dataclass(frozen=True)
class Data:
    corpus: tuple[str, ...] = ()
    name: str = "stdlib"
    max_docs: int | None = None
    shape: tuple[int, int] = (8, 8)
    weights: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Run:
    model: Model = Model()
    data: Data = Data()
    lr: float = 1e-3
    mesh: str = "data=-1"


def test_overrides_parse_by_declared_type():
    cfg = override(
        Run(),
        [
            "model.d_model=128",
            "lr=3e-4",
            "model.tie_embeddings=false",
            "data.corpus=['a', 'b']",
            "data.max_docs=10",
            "data.shape=(4, 2)",
            "model.dropout=1",
            "model.dtype=bfloat16",
            "mesh=data=2,fsdp=4",  # only the first '=' splits
            "data.weights={'a': 1, 'b': 0.5}",
        ],
    )
    assert cfg.model.d_model == 128 and cfg.lr == 3e-4 and cfg.model.tie_embeddings is False
    assert cfg.data.corpus == ("a", "b") and cfg.data.max_docs == 10 and cfg.data.shape == (4, 2)
    assert cfg.model.dropout == 1.0 and isinstance(cfg.model.dropout, float)
    assert cfg.model.dtype == "bfloat16" and cfg.mesh == "data=2,fsdp=4"
    assert cfg.data.weights == {"a": 1.0, "b": 0.5}
    assert Run() == Run()  # the input is untouched (frozen, replaced)


@pytest.mark.parametrize(
    ("raw", "want"), [("true", True), ("True", True), ("1", True), ("false", False), ("0", False)]
)
def test_bool_spellings(raw, want):
    assert override(Run(), [f"model.tie_embeddings={raw}"]).model.tie_embeddings is want


def test_optional_none_and_quoted_strings():
    cfg = override(Run(), ["data.max_docs=10"])
    assert override(cfg, ["data.max_docs=None"]).data.max_docs is None
    assert override(cfg, ["data.max_docs=null"]).data.max_docs is None
    assert override(Run(), ["data.name='my corpus'"]).data.name == "my corpus"
    assert override(Run(), ["data.name=none"]).data.name == "none"  # str, not Optional


def test_changes_to_one_section_apply_together_and_last_wins():
    # 6 heads over 4 kv heads is invalid; checking only the final combination lets this pass.
    cfg = override(Run(), ["model.num_heads=6", "model.num_kv_heads=3", "lr=1", "lr=2"])
    assert (cfg.model.num_heads, cfg.model.num_kv_heads, cfg.lr) == (6, 3, 2.0)
    with pytest.raises(ValueError, match="not a multiple"):
        override(Run(), ["model.num_heads=6"])
    assert override(Run(), []) == Run()


def test_every_set_flag_counts_and_the_last_value_of_a_field_wins():
    p = argparse.ArgumentParser()
    add_set_flag(p, "overrides")
    args = p.parse_args(["--set", "model.d_model=128", "lr=1", "--set", "lr=2"])
    assert args.set == ["model.d_model=128", "lr=1", "lr=2"]
    assert (override(Run(), args.set).model.d_model, override(Run(), args.set).lr) == (128, 2.0)
    assert p.parse_args([]).set == []


def test_unknown_field_names_it_and_suggests():
    with pytest.raises(ValueError, match=r"'model.d_modle' \(did you mean 'model.d_model'\?\)"):
        override(Run(), ["model.d_modle=1"])
    with pytest.raises(ValueError, match="valid fields of 'model': d_model, num_heads"):
        override(Run(), ["model.bogus=1"])
    with pytest.raises(ValueError, match=r"did you mean 'model'\?.*top level: model, data, lr"):
        override(Run(), ["modle.d_model=1"])
    with pytest.raises(ValueError, match="'lr' is a field of type float, not a config section"):
        override(Run(), ["lr.x=1"])


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("model.d_model=3.5", r"cannot set model.d_model='3.5': expected int"),
        ("model.tie_embeddings=yes", r"tie_embeddings='yes': expected bool \(true/false/1/0\)"),
        ("lr=fast", r"lr='fast': expected float"),
        ("data.max_docs=many", r"max_docs='many': expected int \| None"),
        ("data.corpus=[1, 2]", r"corpus='\[1, 2\]': expected tuple\[str, ...\]"),
        ("data.shape=(1, 2, 3)", r"expected tuple\[int, int\]"),
        ("model.dtype=float64", r"expected Literal\['float32', 'bfloat16'\]"),
        ("model.d_model", "expected FIELD=VALUE"),
        ("model=1", "'model' is a config section"),
        ("data.name='a', 'b'", r"data.name=\"'a', 'b'\": expected str"),
    ],
)
def test_bad_values_name_field_value_and_type(assignment, message):
    with pytest.raises(ValueError, match=message):
        override(Run(), [assignment])


def test_dict_round_trip_through_json():
    cfg = override(Run(), ["data.corpus=('a', 'b')", "data.max_docs=3", "data.weights={'x': 2.0}"])
    d = to_dict(cfg)
    assert d["data"]["corpus"] == ["a", "b"] and d["data"]["shape"] == [8, 8]
    assert from_dict(Run, json.loads(json.dumps(d))) == cfg


def test_from_dict_fills_defaults_and_coerces_json_numbers():
    cfg = from_dict(Run, {"lr": 1, "model": {"d_model": 32}})
    assert cfg == Run(lr=1.0, model=Model(d_model=32)) and isinstance(cfg.lr, float)


def test_from_dict_rejects_unknown_keys_and_bad_types():
    with pytest.raises(ValueError, match=r"'model.d_modle' \(did you mean 'model.d_model'\?\)"):
        from_dict(Run, {"model": {"d_modle": 3}})
    with pytest.raises(ValueError, match=r"'model.d_model' = '3': expected int"):
        from_dict(Run, {"model": {"d_model": "3"}})
    with pytest.raises(ValueError, match="missing required config fields"):
        from_dict(_Required, {})


@dataclasses.dataclass(frozen=True)
class _Required:
    steps: int
