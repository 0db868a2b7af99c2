"""A family written only against the run layer: a GAN of two MLPs on a ring of 8 Gaussians,
two optimizers, an EMA copy of the generator. ``python tests/toy_gan.py --workdir DIR``."""

import dataclasses
import sys
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from genjax import mesh, run, train
from genjax.run import RunConfig


@dataclasses.dataclass(frozen=True)
class Model:
    hidden: int = 16
    batch: int = 8  # ring points per update
    lr: float = 3e-3
    ema_decay: float = 0.9
    updates_per_step: int = 1  # > 1: one call scans over that many updates
    nan_loss: str = ""  # "d_loss" or "g_loss": NaN from step nan_from on (tests)
    nan_from: int = 0


@dataclasses.dataclass(frozen=True)
class Config:
    model: Model = Model()
    run: RunConfig = RunConfig(steps=40, checkpoint_every=8, log_every=1)  # noqa: RUF009


class State(NamedTuple):
    step: jax.Array
    g_params: Any
    d_params: Any
    g_opt_state: Any
    d_opt_state: Any
    g_ema: Any
    rng: jax.Array


RULES = {"batch": mesh.BATCH_AXES, "hidden": "fsdp"}
AXES = [{"w": (None, "hidden"), "b": ("hidden",)}, {"w": ("hidden", None), "b": (None,)}]


def mlp(params, x):
    return jnp.tanh(x @ params[0]["w"] + params[0]["b"]) @ params[1]["w"] + params[1]["b"]


def init(cfg: Config, key) -> State:
    def make(key, out):  # 2 -> hidden -> out
        k1, k2, h = *jax.random.split(key), cfg.model.hidden
        w1, w2 = jax.random.normal(k1, (2, h)), jax.random.normal(k2, (h, out)) / 4
        return [{"w": w1, "b": jnp.zeros(h)}, {"w": w2, "b": jnp.zeros(out)}]

    g, d = make(jax.random.fold_in(key, 0), 2), make(jax.random.fold_in(key, 1), 1)
    opt, rng = optax.adam(cfg.model.lr), jax.random.key_data(jax.random.fold_in(key, 2))
    return State(jnp.zeros((), jnp.int32), g, d, opt.init(g), opt.init(d), g, rng)


def make_step(cfg: Config):
    opt, m = optax.adam(cfg.model.lr), cfg.model

    def update(params, opt_state, loss_fn, name, step):
        poisoned = lambda p: jnp.where((m.nan_loss == name) & (step >= m.nan_from), jnp.nan, 1.0)
        loss, grads = jax.value_and_grad(lambda p: loss_fn(p) * poisoned(p))(params)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    def discriminator_step(s: State, real, z) -> tuple[State, jax.Array]:
        fake = mlp(s.g_params, z)
        loss_fn = lambda d: jnp.mean(jax.nn.softplus(-mlp(d, real)) + jax.nn.softplus(mlp(d, fake)))
        d, d_opt_state, loss = update(s.d_params, s.d_opt_state, loss_fn, "d_loss", s.step)
        return s._replace(d_params=d, d_opt_state=d_opt_state), loss

    def generator_step(s: State, z) -> tuple[State, jax.Array]:
        loss_fn = lambda g: jnp.mean(jax.nn.softplus(-mlp(s.d_params, mlp(g, z))))
        g, g_opt_state, loss = update(s.g_params, s.g_opt_state, loss_fn, "g_loss", s.step)
        g_ema = train.ema_update(s.g_ema, g, m.ema_decay)
        return s._replace(g_params=g, g_opt_state=g_opt_state, g_ema=g_ema), loss

    def one_update(s: State, real):
        z = jax.random.normal(train.step_key(s), real.shape)
        s, d_loss = discriminator_step(s, real, z)
        s, g_loss = generator_step(s, z)
        return s._replace(step=s.step + 1), {"d_loss": d_loss, "g_loss": g_loss}

    def step(s: State, batch):  # batch["x"]: [B, updates_per_step, 2]
        s, metrics = jax.lax.scan(one_update, s, batch["x"].swapaxes(0, 1))
        return s, jax.tree.map(lambda x: x[-1], metrics)

    return step


def batches(cfg: Config) -> grain.MapDataset:
    """This process's batches of ring points, repeated."""
    angles = 2 * np.pi * np.random.default_rng(0).integers(0, 8, 512) / 8
    ring = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    k, n = cfg.model.updates_per_step, jax.process_count()
    ds = grain.MapDataset.source(ring).shuffle(seed=0).batch(k).batch(cfg.model.batch // n)
    return ds[jax.process_index() :: n].repeat().map(lambda x: {"x": x})


def data(cfg: Config, workdir, batches=batches) -> run.Data:
    ds = batches(cfg).to_iter_dataset(grain.ReadOptions(num_threads=0))
    return run.Data(iter(ds), describe="ring")


FAMILY = run.Family(
    name="toy-gan", presets={"tiny": Config()}, default_preset="tiny", init=init, rules=RULES,
    param_axes=lambda cfg: {"g_params": AXES, "d_params": AXES}, step=make_step, data=data,
    updates_per_step=lambda cfg: cfg.model.updates_per_step, compare=("model",),
)  # fmt: skip

if __name__ == "__main__":
    sys.exit(run.main(FAMILY))
