"""Image diffusion on the run layer: the digits experiment end to end, classifier-free
guidance, text conditioning, sharded training of the U-Net and the DiT, bad input."""

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax import diffuse, run, sample
from genjax import mesh as meshlib
from genjax.metrics_log import read_metrics
from tests.families import train_by_hand

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = run.configure(diffuse.IMAGES, "tiny")


def test_tiny_preset_writes_samples_picture_and_scores(tiny_digits_run):
    samples = np.load(tiny_digits_run / "samples.npy")
    assert samples.shape == (TINY.sample.num, 8, 8) and samples.dtype == np.uint8
    assert samples.max() <= 16
    assert (tiny_digits_run / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tiny_digits_run / "eval.json").read_text())
    scores = {"frechet_distance", "kid", "precision", "recall", "density", "coverage",
              "class_coverage", "class_kl", "conditional_accuracy"}  # fmt: skip
    assert scores | {"test_bits_per_dim"} == set(report["samples"])
    spread = {"frechet_distance_min", "frechet_distance_max"}
    assert scores | spread == set(report["real_vs_real"])
    assert report["real_vs_real"]["frechet_distance"] < report["samples"]["frechet_distance"]
    assert 0 < report["samples"]["test_bits_per_dim"] < 16
    logged = [r for r in read_metrics(tiny_digits_run) if "frechet_distance" in r]
    assert [r["step"] for r in logged] == [TINY.run.steps]


def _params(cfg, seed=0):
    """Weights that are not the zero-initialized output layers: every leaf random."""
    shapes = jax.eval_shape(lambda: diffuse.init_params(cfg.model, jax.random.key(seed)))
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(tree, leaves)


@pytest.mark.parametrize("condition", ["class", "text"])
def test_guidance_zero_is_the_unconditional_model_and_guidance_changes_samples(condition):
    cfg = run.configure(diffuse.IMAGES, "tiny", [f"model.condition={condition}"])
    params = _params(cfg)
    x = jax.random.normal(jax.random.key(2), (10, 8, 8, 1))
    sigma_B = jnp.full((10,), 0.7)
    labels = jnp.arange(10, dtype=jnp.int32)
    null = jnp.full((10,), cfg.model.num_classes, jnp.int32)
    d = jax.jit(lambda label_B, w: diffuse.denoiser(cfg, params, label_B, w)(x, sigma_B),
                static_argnums=1)  # fmt: skip
    unconditional = jax.jit(lambda: diffuse.denoiser(cfg, params)(x, sigma_B))()
    conditional = d(labels, 1.0)
    np.testing.assert_allclose(d(labels, 0.0), unconditional, atol=1e-6)
    np.testing.assert_allclose(d(null, 1.0), unconditional, atol=1e-6)
    assert np.abs(conditional - unconditional).max() > 1e-3  # the condition matters
    np.testing.assert_allclose(d(labels, 2.0), 2 * conditional - unconditional, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected \[20\] classes in 0..10"):
        diffuse.draw(cfg, params, num=20, steps=3, labels=np.full(20, 11))
    a = diffuse.draw(cfg, params, num=20, steps=3, guidance=1.0)
    b = diffuse.draw(cfg, params, num=20, steps=3, guidance=3.0)
    assert a.shape == (20, 8, 8, 1) and np.abs(a - b).max() > 1e-3


def test_text_condition_reads_the_class_names_in_words():
    cfg = run.configure(diffuse.IMAGES, "tiny", ["model.condition=text"])
    texts = diffuse.class_texts(cfg.model)
    assert texts.shape == (11, cfg.model.unet.text_len)
    assert bytes((texts[7][texts[7] > 0] - 1).astype(np.uint8)).decode() == "seven"
    assert not texts[10].any()  # the null condition: the empty text, all padding


@pytest.mark.parametrize(
    ("arch", "mesh"),
    [("unet", "data=4,fsdp=2"), ("dit", "data=2,fsdp=2,tensor=2")],
)
def test_sharded_training_equals_one_device(arch, mesh):
    condition = "class" if arch == "unet" else "text"
    cfg = run.configure(
        diffuse.IMAGES, "tiny", [f"model.arch={arch}", f"model.condition={condition}"]
    )
    one, state_one = train_by_hand(
        diffuse.IMAGES, cfg, meshlib.make_mesh("data=1", jax.devices()[:1]), 3
    )
    many, state_many = train_by_hand(diffuse.IMAGES, cfg, meshlib.make_mesh(mesh), 3)
    np.testing.assert_allclose(many, one, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(state_many.ema_params), jax.tree.leaves(state_one.ema_params),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(jax.device_get(a), jax.device_get(b), atol=2e-5)
    specs = {leaf.sharding.spec for leaf in jax.tree.leaves(state_many.params)}
    assert any(spec != jax.sharding.PartitionSpec() for spec in specs)  # something is split


def test_sample_cli_draws_digits_with_guidance(tiny_digits_run, capsys):
    out = tiny_digits_run / "more.npy"
    argv = ["--workdir", str(tiny_digits_run), "--steps", "2", "--num", "20", "--guidance", "3"]
    assert sample.main([*argv, "--out", str(out)]) == 0
    drawn = np.load(out)
    assert drawn.shape == (20, 8, 8, 1) and drawn.max() <= 16
    assert "frechet_distance" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("assignments", "match"),
    [
        (["model.arch=vit"], "unknown arch 'vit'"),
        (["model.arch=mlp"], "images need model.arch=unet or model.arch=dit"),
        (["sample.guidance=-1"], "guidance=-1.0 must be >= 0"),
        (["data.dataset=ring"], "unlabelled 2-D points: use model.arch=mlp"),
        (["process.sde=cosine"], "sde='cosine'"),
        (["sample.num=2000"], "sample.num=2000: the scores need 4..1437 samples"),
        (["model.cond_dropout=0"], "model.cond_dropout=0 trains no unconditional model"),
        (["model.condition=text", "model.unet.text_len=4"], "is 5 UTF-8 bytes"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path, capsys, assignments, match):
    argv = ["--workdir", str(tmp_path / "w"), "--preset", "tiny", "--set", *assignments]
    assert run.main(diffuse.IMAGES, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((10, 8, 8), np.uint8), "x\\[..., None\\]"),
        (np.zeros((10, 8, 8, 1), np.float32), "integer levels"),
    ],
)
def test_bad_image_array_is_one_clear_error(tmp_path, capsys, array, match):
    path = tmp_path / "images.npy"
    np.save(path, array)
    argv = ["--workdir", str(tmp_path / "w"), "--preset", "tiny", "--dataset", str(path),
            "--set", "model.condition=none"]  # fmt: skip
    assert run.main(diffuse.IMAGES, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(match, err)


def test_user_images_train_unconditionally(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "blobs.npy"
    np.save(path, rng.integers(0, 256, (64, 4, 4, 3), dtype=np.uint8))
    argv = ["--workdir", str(tmp_path / "w"), "--preset", "tiny", "--dataset", str(path),
            "--steps", "2", "--set", "model.condition=none", "sample.num=8"]  # fmt: skip
    assert run.main(diffuse.IMAGES, argv) == 0
    samples = np.load(tmp_path / "w" / "samples.npy")
    assert samples.shape == (8, 4, 4, 3) and samples.dtype == np.uint8
