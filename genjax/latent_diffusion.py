"""Latent diffusion: the diffusion family, unchanged, in the latent space of a trained VAE.

VAE workdir (``experiments/vae_digits.py``) → its newest checkpoint encodes the
training images once: q(z|x) = N(μ, σ²) per image → batches of fresh draws
z ~ q(z|x), so the model learns the aggregate posterior the decoder was trained on,
scaled to unit variance (LDM's scale factor, Rombach et al., 2022) with each image's
label → the diffusion step (``genjax.diffuse``: EDM, a class-conditional MLP denoiser,
condition dropout for guidance, EMA) → evaluation: latents drawn with guidance from
the EMA weights, unscaled, decoded by the VAE (its decoder's mean) and scored like
every image family's samples (``genjax.generative``). At the end the workdir gets
``samples.npy``, ``samples.png`` and ``eval.json``; there is no test bits/dim (a
likelihood through the decoder is not computed here).

The VAE is part of the run's config (``latent.vae_workdir``, and the latent size it
has, ``latent.dim``): a run resumed over another VAE is refused, as is a VAE whose
latent size differs from a ``latent.dim`` given. The VAE's checkpoint step is kept in
``WORKDIR/latent_vae.json``: a run resumed over the same VAE trained further (other
latents) is refused too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import sys

import jax
import numpy as np

from genjax import diffuse, generative, run, train
from genjax import vae as vae_family
from genjax.data import rows
from genjax.models import diffusion, vae


@dataclasses.dataclass(frozen=True)
class LatentConfig:
    vae_workdir: str = ""  # a run of experiments/vae_digits.py (its newest checkpoint)
    dim: int = 0  # the latent size this run is for; 0: the VAE's (filled in)

    def __post_init__(self):
        if self.dim < 0:
            raise ValueError(f"latent config: dim={self.dim} must be >= 0 (0: the VAE's)")


@dataclasses.dataclass(frozen=True)
class Config(diffuse.Config):
    latent: LatentConfig = dataclasses.field(default_factory=LatentConfig)


def vae_config(latent: LatentConfig) -> vae_family.Config:
    """The config of the VAE run in ``latent.vae_workdir``, checked to be one of images."""
    if not latent.vae_workdir:
        raise ValueError(
            "latent.vae_workdir is not set: give a run of experiments/vae_digits.py "
            "(--vae-workdir DIR)"
        )
    try:
        cfg = run.saved_config(latent.vae_workdir, vae_family.IMAGES)
    except FileNotFoundError as e:
        raise ValueError(
            f"latent.vae_workdir={latent.vae_workdir}: {e}; train it with "
            "`python experiments/vae_digits.py --workdir DIR`"
        ) from None
    if not cfg.data.is_images:
        raise ValueError(
            f"latent.vae_workdir={latent.vae_workdir} holds a VAE of 2-D points; latent "
            "diffusion decodes images: give a run of experiments/vae_digits.py"
        )
    return cfg


# ----------------------------------------------------------------------------- latents


@dataclasses.dataclass(frozen=True)
class Latents:
    """The VAE's posteriors of the training images, and the scale the model sees."""

    mean: np.ndarray  # [N, Z] μ of q(z|x)
    std: np.ndarray  # [N, Z] σ of q(z|x)
    scale: float  # 1 / the standard deviation of z ~ q(z|x) over the training set

    def draw(self, batch: dict, rng: np.random.Generator) -> dict:
        """A batch's rows (``"x"`` holding their μ, ``"std"`` their σ) as scaled draws
        z ~ q(z|x), for ``rows.row_batches``' transform."""
        mean, std = batch["x"], batch["std"]
        z = mean + std * rng.standard_normal(mean.shape, np.float32)
        drawn = {"x": (self.scale * z).astype(np.float32)}
        return {**drawn, "label": batch["label"]} if "label" in batch else drawn


@functools.partial(jax.jit, static_argnames="cfg")
def _encode(cfg, params, x_int):
    return vae.encode(cfg, params, x_int)


def encode_training_set(vae_cfg: vae_family.Config, vae_params, images) -> Latents:
    """q(z|x) of every training image, and the scale that gives z unit variance
    (the variance of the mixture of the posteriors: of μ, plus the mean σ²)."""
    mean, logvar = (np.asarray(a) for a in _encode(vae_cfg.model, vae_params, images.train))
    var = np.exp(logvar)
    total_var = np.var(mean) + np.mean(var)
    return Latents(mean, np.sqrt(var), float(1 / np.sqrt(total_var)))


# ----------------------------------------------------------------------------- the family


def check_vae_step(workdir: pathlib.Path, vae_workdir: str, step: int) -> None:
    """Records the VAE step this run's latents come from, or refuses another one once the
    run has a checkpoint (its model learned the latents of the recorded step)."""
    record = workdir / "latent_vae.json"
    if record.exists() and (workdir / "checkpoints").is_dir():
        recorded = json.loads(record.read_text())["vae_step"]
        if recorded != step:
            raise ValueError(
                f"the VAE in {vae_workdir} is at step {step}, but this run learned the "
                f"latents of its step {recorded} ({record}); use a fresh --workdir for "
                "the VAE as it is now"
            )
        return
    if jax.process_index() == 0:
        run.write_whole(record, json.dumps({"vae_workdir": vae_workdir, "vae_step": step}) + "\n")


def data(cfg: Config, workdir: pathlib.Path) -> run.Data:
    loaded = run.load(cfg.latent.vae_workdir, vae_family.IMAGES)
    check_vae_step(workdir, cfg.latent.vae_workdir, loaded.step)
    vae_cfg, vae_params = loaded.cfg, loaded.state.params
    images = vae_cfg.data.load_images()
    latents = encode_training_set(vae_cfg, vae_params, images)
    arrays = {"x": latents.mean, "std": latents.std}
    if cfg.model.conditional:
        arrays["label"] = images.train_labels
    batches = rows.row_batches(
        arrays, cfg.data.global_batch_size, seed=cfg.data.seed, transform=latents.draw
    )
    s = cfg.sample

    def draw(state) -> np.ndarray:
        z = diffuse.draw(cfg, state.ema_params, num=s.num, seed=s.seed) / latents.scale
        return np.asarray(vae_family.decoded_images(vae_cfg.model, vae_params, z))

    sampling = generative.Sampling(
        draw=draw,
        num=s.num,
        seed=s.seed,
        labels=diffuse.sample_labels(cfg.model, s.num),
        describe=f"{s.sampler} in the latent space, decoded by the VAE",
    )
    return generative.image_run_data(
        images, workdir, sampling, batches,
        describe=(f"{len(images.train):,} {images.name} images as {cfg.latent.dim}-D "
                  f"latents of the VAE in {cfg.latent.vae_workdir} (scale {latents.scale:.3f})"),
        throughput=("images", cfg.data.global_batch_size),
    )  # fmt: skip


def check(cfg: Config, mesh) -> None:
    generative.check_batch(cfg.data.global_batch_size, cfg.optim.grad_accum, mesh)


def complete(cfg: Config, explicit: frozenset[str]) -> Config:
    """The schedule follows the run; the data, the latent size and the classes follow
    the VAE (its images and its labels)."""
    cfg = run.schedule_follows_run(cfg, explicit)
    vae_cfg = vae_config(cfg.latent)
    z_dim = vae_cfg.model.latent
    if cfg.latent.dim and cfg.latent.dim != z_dim:
        raise ValueError(
            f"latent.vae_workdir={cfg.latent.vae_workdir} holds a VAE with a {z_dim}-D "
            f"latent, but this run is for latent.dim={cfg.latent.dim}: give a VAE of that "
            f"latent size, or set latent.dim={z_dim} (0 takes the VAE's)"
        )
    model = cfg.model
    if model.arch != "mlp" or model.condition == "text":
        raise ValueError(
            "latents are vectors: use model.arch=mlp with model.condition=class or none"
        )
    images = vae_cfg.data.load_images()
    if model.conditional and images.train_labels is None:
        raise ValueError(
            f"model.condition=class needs labels, and the VAE's images ({images.name}) have "
            "none: set model.condition=none"
        )
    if model.conditional and model.cond_dropout == 0 and cfg.sample.guidance != 1:
        raise ValueError(
            "model.cond_dropout=0 trains no unconditional model, which guidance uses: set "
            "model.cond_dropout > 0, or sample.guidance=1"
        )
    generative.check_sample_count(images, cfg.sample.num)
    num_classes = images.num_classes if model.conditional else 0
    model = dataclasses.replace(model, shape=(z_dim,), num_classes=num_classes)
    data = dataclasses.replace(
        vae_cfg.data, global_batch_size=cfg.data.global_batch_size, seed=cfg.data.seed
    )
    vae_workdir = str(pathlib.Path(cfg.latent.vae_workdir).resolve())
    latent = LatentConfig(vae_workdir=vae_workdir, dim=z_dim)
    return dataclasses.replace(cfg, model=model, data=data, latent=latent)


_DIGITS = Config(
    model=diffuse.ModelConfig(
        arch="mlp", condition="class", mlp=diffuse.MLPConfig(hidden=512, layers=4, embed=64)
    ),
    # EDM over latents scaled to unit variance.
    process=diffusion.Process(sigma_data=1.0),
    optim=train.OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=200),
    data=generative.DataConfig(dataset="digits", dequantize=False, global_batch_size=256),
    run=run.RunConfig(steps=10_000, checkpoint_every=2000, log_every=100),
    sample=diffuse.SampleConfig(steps=32, num=1000, guidance=1.0, nll=False),
)
PRESETS = {
    "default": _DIGITS,
    # Seconds on a CPU: a small network, few updates, few samples.
    "tiny": dataclasses.replace(
        _DIGITS,
        model=dataclasses.replace(_DIGITS.model, mlp=diffuse.MLPConfig(32, 2, 16)),
        data=generative.DataConfig(dataset="digits", dequantize=False, global_batch_size=32),
        run=run.RunConfig(steps=20, checkpoint_every=10, log_every=10),
        sample=diffuse.SampleConfig(steps=4, num=40, guidance=1.5, nll=False),
    ),
}


def add_flags(p) -> None:
    p.add_argument(
        "--vae-workdir",
        help="a run of experiments/vae_digits.py (default: WORKDIR/vae, trained first)",
    )


def vae_workdir(args) -> pathlib.Path:
    """The VAE the command line names, or WORKDIR/vae."""
    return pathlib.Path(args.vae_workdir or pathlib.Path(args.workdir) / "vae")


IMAGES = run.Family(
    name="latent diffusion",
    presets=PRESETS,
    default_preset="default",
    init=diffuse.init,
    param_axes=lambda cfg: {
        "params": diffuse.param_axes(cfg.model),
        "ema_params": diffuse.param_axes(cfg.model),
    },
    rules=diffuse.RULES,
    step=diffuse.make_step,
    data=data,
    check=check,
    compare=("model", "process", "data", "latent"),
    complete=complete,
    add_flags=add_flags,
    flag_overrides=lambda args: [f"latent.vae_workdir={vae_workdir(args)}"],
)


def main(argv=None, description: str | None = None) -> int:
    """The command line of ``experiments/latent_diffusion_digits.py``: with no
    ``--vae-workdir``, first trains (or resumes) the VAE of the same preset and seed in
    WORKDIR/vae, unless a finished one is there."""
    args = run.parser(IMAGES, description).parse_args(argv)
    vae_dir = vae_workdir(args)
    if args.vae_workdir is None and not (vae_dir / "eval.json").exists():
        if args.distributed or args.coordinator:
            print(
                "error: train the VAE first (experiments/vae_digits.py) and give it with "
                "--vae-workdir; a multi-process run does not train it on the way",
                file=sys.stderr,
            )
            return 2
        vae_argv = ["--workdir", str(vae_dir), "--preset", args.preset]
        if args.seed is not None:
            vae_argv += ["--seed", str(args.seed)]
        print(f"training the VAE first, in {vae_dir}", flush=True)
        if code := run.main(vae_family.IMAGES, vae_argv):
            return code
    return run.main(IMAGES, argv, description)
