"""The VAE family on the run layer: both experiments' tiny presets end to end, sharded
training equal to one device, the test bits/dim over devices, and bad configs."""

import json
import pathlib

import chex
import jax
import numpy as np
import pytest

from genjax import mesh as meshlib
from genjax import run
from genjax import vae as vae_family
from genjax.data import images as imagelib
from genjax.models import vae
from tests.families import train_by_hand

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def test_points_tiny_preset_writes_samples_picture_and_scores(tmp_path):
    argv = ["--workdir", str(tmp_path), "--preset", "tiny", "--dataset", "grid"]
    assert run.main(vae_family.FAMILY, argv) == 0
    num = vae_family.PRESETS["tiny"].sample.num
    samples = np.load(tmp_path / "samples.npy")
    assert samples.shape == (num, 2) and np.isfinite(samples).all()
    assert (tmp_path / "samples.png").read_bytes()[:8] == PNG
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report["samples"]) == {"modes", "high_quality", "reverse_kl"}
    assert report["perfect_sampler"]["modes"] == 25


def test_digits_tiny_preset_writes_samples_interpolations_and_scores(tmp_path):
    assert run.main(vae_family.IMAGES, ["--workdir", str(tmp_path), "--preset", "tiny"]) == 0
    num = vae_family.IMAGE_PRESETS["tiny"].sample.num
    samples = np.load(tmp_path / "samples.npy")
    assert samples.shape == (num, 8, 8) and samples.min() >= 0 and samples.max() <= 16
    for picture in ("samples.png", "interpolation.png"):
        assert (tmp_path / picture).read_bytes()[:8] == PNG
    report = json.loads((tmp_path / "eval.json").read_text())
    assert {"frechet_distance", "class_coverage", "test_bits_per_dim"} <= set(report["samples"])
    assert "frechet_distance" in report["real_vs_real"]
    # 17 levels: a model no better than uniform scores log2(17) = 4.09 bits/dim.
    assert 0 < report["samples"]["test_bits_per_dim"] < 8


def test_sharded_training_equals_one_device():
    cfg = run.configure(vae_family.FAMILY, "tiny")
    one, state_one = train_by_hand(
        vae_family.FAMILY, cfg, meshlib.make_mesh("data=1", jax.devices()[:1]), 4
    )
    many, state_many = train_by_hand(vae_family.FAMILY, cfg, meshlib.make_mesh("data=4,fsdp=2"), 4)
    np.testing.assert_allclose(many, one, rtol=1e-5)
    chex.assert_trees_all_close(
        jax.device_get(state_many.params), jax.device_get(state_one.params), atol=2e-5
    )


def test_test_bits_per_dim_over_devices_equals_one_pass(monkeypatch):
    cfg = run.configure(vae_family.IMAGES, "tiny")
    params = vae.init_params(cfg.model, jax.random.key(1))
    images = cfg.data.load_images()
    split = vae_family.test_bits_per_dim(cfg, params, images)
    traced = []
    monkeypatch.setattr(vae, "iwae_bound", lambda *a, **kw: traced.append(1) / 0)
    assert vae_family.test_bits_per_dim(cfg, params, images) == split  # compiled once a run
    assert not traced
    monkeypatch.undo()
    s = cfg.sample
    nll = -vae.iwae_bound(cfg.model, params, images.test, key=jax.random.key(0), k=s.iwae_k,
                          chunk=s.iwae_chunk)  # fmt: skip
    whole = float(vae.bits_per_dim(np.mean(np.asarray(nll)), images.dims))
    np.testing.assert_allclose(split, whole, rtol=1e-4)


def test_images_are_read_back_as_their_levels():
    cfg = run.configure(vae_family.IMAGES, "tiny").model
    levels = np.arange(17, dtype=np.uint8)
    x = vae_family.model_input(cfg, imagelib.to_unit(levels, 17))
    np.testing.assert_array_equal(np.asarray(x), levels)


@pytest.mark.parametrize(
    "family, assignments, match",
    [
        (vae_family.IMAGES, ["data.dequantize=true"], "data.dequantize=false"),
        (vae_family.IMAGES, ["sample.num=100000"], "sample.num"),
        (vae_family.FAMILY, ["sample.iwae_chunk=7"], "iwae_chunk"),
        (vae_family.FAMILY, ["model.likelihood=nope"], "likelihood"),
    ],
)
def test_bad_configs_are_clear_errors(family, assignments, match):
    with pytest.raises(ValueError, match=match):
        run.configure(family, "tiny", assignments)
