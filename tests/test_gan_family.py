"""The GAN family on the run layer: both experiments' tiny presets end to end, sharded
training equal to one device, kill-and-resume equal to an uninterrupted run (both
optimizers restored), and bad configs."""

import json

import chex
import jax
import numpy as np
import pytest

from genjax import gan, run
from genjax import mesh as meshlib
from genjax.metrics_log import read_metrics
from tests.families import train_by_hand

PNG = b"\x89PNG\r\n\x1a\n"


def test_points_tiny_preset_writes_samples_picture_and_scores(tmp_path):
    assert run.main(gan.FAMILY, ["--workdir", str(tmp_path), "--preset", "tiny"]) == 0
    samples = np.load(tmp_path / "samples.npy")
    assert samples.shape == (gan.PRESETS["tiny"].sample.num, 2) and np.isfinite(samples).all()
    assert (tmp_path / "samples.png").read_bytes()[:8] == PNG
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report["samples"]) == {"modes", "high_quality", "reverse_kl"}


def test_digits_tiny_preset_writes_class_rows_and_scores(tmp_path):
    assert run.main(gan.IMAGES, ["--workdir", str(tmp_path), "--preset", "tiny"]) == 0
    samples = np.load(tmp_path / "samples.npy")
    assert samples.shape == (gan.IMAGE_PRESETS["tiny"].sample.num, 8, 8)
    assert (tmp_path / "samples.png").read_bytes()[:8] == PNG
    report = json.loads((tmp_path / "eval.json").read_text())
    assert {"frechet_distance", "class_coverage", "conditional_accuracy"} <= set(report["samples"])
    assert "frechet_distance" in report["real_vs_real"]


LOSSES = ("d_loss", "g_loss")


def test_sharded_training_equals_one_device():
    cfg = run.configure(gan.FAMILY, "tiny")
    one, state_one = train_by_hand(
        gan.FAMILY, cfg, meshlib.make_mesh("data=1", jax.devices()[:1]), 4, LOSSES
    )
    many, state_many = train_by_hand(gan.FAMILY, cfg, meshlib.make_mesh("data=4,fsdp=2"), 4, LOSSES)
    np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(
        jax.device_get(state_many.g_ema), jax.device_get(state_one.g_ema), atol=2e-5
    )


# Constant rates, and rates decaying over the second half of 40 updates (total_steps
# set, so the first part's --steps 20 keeps the whole run's schedule).
@pytest.mark.parametrize("rates", [[], ["--set", "model.lr_decay=0.5", "model.total_steps=40"]])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, rates):
    """Stopped after its first checkpoint and run again, a run logs the same losses and
    ends with the same generator, discriminator and both optimizers' states."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    tiny = ["--preset", "tiny", *rates]
    assert run.main(gan.FAMILY, ["--workdir", str(whole), *tiny]) == 0
    assert run.main(gan.FAMILY, ["--workdir", str(parts), "--steps", "20", *tiny]) == 0
    assert run.main(gan.FAMILY, ["--workdir", str(parts), *tiny]) == 0

    def losses(workdir):
        return {r["step"]: (r["d_loss"], r["g_loss"]) for r in read_metrics(workdir)
                if "d_loss" in r}  # fmt: skip

    assert losses(parts) == losses(whole)
    end_whole = run.load(whole, gan.FAMILY).state
    end_parts = run.load(parts, gan.FAMILY).state
    for field in ("g_params", "d_params", "g_opt_state", "d_opt_state", "g_ema"):
        chex.assert_trees_all_equal(
            jax.device_get(getattr(end_parts, field)), jax.device_get(getattr(end_whole, field))
        )


@pytest.mark.parametrize(
    "family, assignments, match",
    [
        (gan.FAMILY, ["model.d_steps=3"], "multiple of 6"),
        (gan.FAMILY, ["model.arch=conv"], "arch='conv' takes images"),
        (gan.IMAGES, ["model.arch=mlp"], "arch"),
        (gan.IMAGES, ["sample.num=100000"], "sample.num"),
        (gan.IMAGES, ["model.num_classes=5"], "model.num_classes=5, but the images have 10"),
    ],
)
def test_bad_configs_are_clear_errors(family, assignments, match, tmp_path, capsys):
    argv = ["--workdir", str(tmp_path / "w"), "--preset", "tiny", "--set", *assignments]
    assert run.main(family, argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_grid_gets_its_model_rates_and_smaller_updates_unless_set():
    ring = run.configure(gan.FAMILY, "default")
    grid = run.configure(gan.FAMILY, "default", ["data.dataset=grid"])
    assert (ring.model.fourier_features, ring.model.r1_gamma) == (0, 0.0)
    assert (grid.model.fourier_features, grid.model.r1_gamma) == (128, 1.0)
    assert (ring.model.g_lr, ring.model.d_lr) == (1e-4, 1e-4)
    assert (grid.model.g_lr, grid.model.d_lr) == (3e-4, 3e-4)
    assert (ring.model.latent_distribution, grid.model.latent_distribution) == ("normal", "uniform")
    # The grid's rates fall over the second half of its run; the ring's stay constant.
    assert (ring.model.lr_decay, ring.model.total_steps) == (0.0, 0)
    assert (grid.model.lr_decay, grid.model.total_steps) == (0.5, 30_000)
    assert (ring.data.global_batch_size, ring.run.steps) == (512, 10_000)
    assert (grid.data.global_batch_size, grid.run.steps) == (128, 30_000)
    plain = run.configure(
        gan.FAMILY,
        "default",
        ["data.dataset=grid", "model.r1_gamma=0", "model.g_lr=1e-4", "run.steps=500"],
    )
    assert (plain.model.fourier_features, plain.model.r1_gamma) == (128, 0.0)
    assert (plain.model.g_lr, plain.model.d_lr) == (1e-4, 3e-4)
    assert (plain.data.global_batch_size, plain.run.steps) == (128, 500)
    assert plain.model.total_steps == 500  # the schedule spans the run it is given
    constant = run.configure(gan.FAMILY, "default", ["data.dataset=grid", "model.lr_decay=0"])
    assert constant.model.total_steps == 0
    digits = run.configure(gan.IMAGES, "tiny", ["model.lr_decay=0.5"])
    assert digits.model.total_steps == digits.run.steps == 20
