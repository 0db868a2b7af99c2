"""Latent diffusion: the tiny preset end to end (the VAE trained on the way), the latent
batches, and the refusals: another latent size, another VAE on resume, no VAE."""

import json
import pathlib
import types

import jax
import numpy as np
import pytest

from genjax import latent_diffusion, run
from genjax import vae as vae_family
from genjax.data import rows
from genjax.models import vae

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny latent diffusion run whose VAE the experiment trained first (WORKDIR/vae)."""
    workdir = tmp_path_factory.mktemp("latent")
    assert latent_diffusion.main(["--workdir", str(workdir), "--preset", "tiny"]) == 0
    return workdir


def test_a_vae_stopped_by_a_signal_is_not_trained_on(tmp_path, monkeypatch, capsys):
    """SIGTERM while the VAE trains on the way: exit code 3, and no latent model starts
    from the unfinished VAE."""
    trained = []

    def stopped_by_sigterm(cfg, workdir, family):
        trained.append(family.name)
        return run.FitResult(state=types.SimpleNamespace(step=5), stopped_by_signal="SIGTERM")

    monkeypatch.setattr(run, "train", stopped_by_sigterm)
    argv = ["--workdir", str(tmp_path), "--preset", "tiny"]
    assert latent_diffusion.main(argv) == run.EXIT_STOPPED
    assert trained == [vae_family.IMAGES.name]
    assert "stopped by SIGTERM at step 5" in capsys.readouterr().err


def test_tiny_preset_trains_the_vae_then_writes_samples_picture_and_scores(trained):
    assert (trained / "vae" / "eval.json").exists()  # the VAE, trained on the way
    num = latent_diffusion.PRESETS["tiny"].sample.num
    samples = np.load(trained / "samples.npy")
    assert samples.shape == (num, 8, 8) and samples.min() >= 0 and samples.max() <= 16
    assert (trained / "samples.png").read_bytes()[:8] == PNG
    report = json.loads((trained / "eval.json").read_text())
    assert {"frechet_distance", "class_coverage", "conditional_accuracy"} <= set(report["samples"])
    assert "frechet_distance" in report["real_vs_real"]
    cfg = run.saved_config(trained, latent_diffusion.IMAGES)
    vae_latent = vae_family.IMAGE_PRESETS["tiny"].model.latent
    assert cfg.model.shape == (vae_latent,) and cfg.latent.dim == vae_latent
    assert cfg.latent.vae_workdir == str((trained / "vae").resolve())


def test_a_finished_run_with_its_vae_given_resumes_without_training(trained, capsys):
    argv = ["--workdir", str(trained), "--preset", "tiny", "--vae-workdir", str(trained / "vae")]
    assert latent_diffusion.main(argv) == 0
    assert "training the VAE first" not in capsys.readouterr().out


def test_a_vae_of_another_latent_size_is_refused(trained, tmp_path, capsys):
    vae_latent = vae_family.IMAGE_PRESETS["tiny"].model.latent
    argv = ["--workdir", str(tmp_path / "new"), "--preset", "tiny", "--vae-workdir",
            str(trained / "vae"), "--set", f"latent.dim={vae_latent + 3}"]  # fmt: skip
    assert latent_diffusion.main(argv) == 2
    err = capsys.readouterr().err
    assert f"a VAE with a {vae_latent}-D latent" in err and f"latent.dim={vae_latent + 3}" in err
    assert not (tmp_path / "new").exists()  # refused before anything was written

    # Resuming the trained run over a VAE of another latent size is refused too.
    other = tmp_path / "other-vae"
    vae_argv = ["--workdir", str(other), "--preset", "tiny", "--steps", "2",
                "--set", f"model.latent={vae_latent + 1}", "sample.nll=false"]  # fmt: skip
    assert run.main(vae_family.IMAGES, vae_argv) == 0
    before = sorted(p.name for p in (trained / "checkpoints").iterdir())
    argv = ["--workdir", str(trained), "--preset", "tiny", "--vae-workdir", str(other)]
    assert latent_diffusion.main(argv) == 2
    err = capsys.readouterr().err
    assert "latent" in err and "error:" in err
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == before


def test_no_vae_is_a_clear_error(tmp_path, capsys):
    argv = ["--workdir", str(tmp_path / "run"), "--preset", "tiny",
            "--vae-workdir", str(tmp_path / "missing")]  # fmt: skip
    assert latent_diffusion.main(argv) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "experiments/vae_digits.py" in err


def test_batches_draw_from_the_posteriors_at_unit_variance():
    rng = np.random.default_rng(0)
    mean = rng.normal(0, 2.0, (500, 3)).astype(np.float32)
    std = rng.uniform(0.1, 1.0, (500, 3)).astype(np.float32)
    scale = float(1 / np.sqrt(np.var(mean) + np.mean(std**2)))
    latents = latent_diffusion.Latents(mean, std, scale)
    row = np.arange(500, dtype=np.int32)  # as labels: which row each draw is of
    batches = rows.row_batches(
        {"x": mean, "std": std, "label": row}, 500, seed=0, transform=latents.draw
    )
    draws = [next(batches) for _ in range(40)]  # 40 epochs: each row drawn 40 times
    assert set(draws[0]) == {"x", "label"}
    z = np.stack([d["x"][np.argsort(d["label"])] for d in draws])  # [epoch, row, Z]
    np.testing.assert_allclose(z.mean(0), latents.scale * mean, atol=0.7 * latents.scale)
    np.testing.assert_allclose(z.std(0).mean(0), latents.scale * std.mean(0), rtol=0.1)
    assert abs(np.var(np.concatenate([d["x"] for d in draws])) - 1) < 0.05


def test_encoding_scale_is_that_of_the_posteriors_mixture():
    cfg = run.configure(vae_family.IMAGES, "tiny")
    params = vae.init_params(cfg.model, jax.random.key(0))
    images = cfg.data.load_images()
    latents = latent_diffusion.encode_training_set(cfg, params, images)
    mean, logvar = vae.encode(cfg.model, params, images.train)
    np.testing.assert_allclose(latents.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(latents.std, np.exp(np.asarray(logvar) / 2), rtol=1e-5)
    pooled = np.var(np.asarray(mean)) + np.mean(np.exp(np.asarray(logvar)))
    np.testing.assert_allclose(latents.scale, 1 / np.sqrt(pooled), rtol=1e-5)


def test_a_run_resumed_over_its_vae_trained_further_is_refused(trained, tmp_path):
    """Same VAE folder, more steps: other latents than the run learned. Until the run has a
    checkpoint, the step is only recorded (nothing learned yet)."""
    vae_step = run.load(trained / "vae", vae_family.IMAGES).step
    record = json.loads((trained / "latent_vae.json").read_text())
    assert record["vae_step"] == vae_step  # written by the run's data
    latent_diffusion.check_vae_step(tmp_path, "v", 20)
    latent_diffusion.check_vae_step(tmp_path, "v", 40)  # no checkpoint yet: re-recorded
    (tmp_path / "checkpoints").mkdir()
    latent_diffusion.check_vae_step(tmp_path, "v", 40)
    with pytest.raises(ValueError, match="the VAE in v is at step 60, but this run learned the "
                                         "latents of its step 40"):  # fmt: skip
        latent_diffusion.check_vae_step(tmp_path, "v", 60)
