"""Training pieces every family shares: optimizers, gradient accumulation, EMA,
and sharded state for any state pytree.

A family's state is a small named pytree with a ``step`` field: ``TrainState``
for one model with one optimizer (the LM, SFT, a VAE); a GAN, a diffusion model
or PPO name their own fields. ``state_shardings`` shards any of them from the
logical axes of its parameter trees alone, and ``create_state`` creates the
state sharded from the start (abstract shapes → shardings → ``jit(init,
out_shardings)``), so no device ever holds a whole model. A step is a pure
``(state, batch) -> (state, metrics)``, jitted once by ``jit_train_step`` with
the state donated; its randomness is ``step_key(state)``, so a restored run
replays exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from genjax import mesh as meshlib

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any  # model parameters, a pure pytree
    opt_state: optax.OptState  # optimizer moments etc., sharded like params
    rng: jax.Array  # uint32 key data of the run's base key; step keys are fold_in(rng, step)


# ----------------------------------------------------------------------------- optimizers


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    warmup_steps: int = 100  # linear warm-up from 0, in optimizer steps
    total_steps: int = 1000  # warm-up + cosine decay length, in optimizer steps
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr
    weight_decay: float = 0.1  # decoupled (AdamW), matrices only
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0  # global gradient-norm clip; None disables
    grad_accum: int = 1  # micro-batches per optimizer step
    # Where Adam's eps sits: "pytorch" m̂ / (√v̂ + ε); "tensorflow" m̂ / (√v̂ + ε̂) with
    # ε̂ = ε / √(1 − β₂ᵗ), larger early on (the RLHF-with-PPO implementations' choice).
    eps_style: str = "pytorch"

    def __post_init__(self):
        if self.eps_style not in ("pytorch", "tensorflow"):
            raise ValueError(f"optim config: eps_style={self.eps_style!r}; "
                             "choose 'pytorch' or 'tensorflow'")  # fmt: skip
        if self.grad_accum < 1:
            raise ValueError(f"optim config: grad_accum must be >= 1, got {self.grad_accum}")
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError("optim config: total_steps must be >= 1 and warmup_steps >= 0")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, cfg.total_steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=cfg.total_steps,
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def matrices(params: Any) -> Any:
    """Default weight-decay mask: arrays of rank >= 2 (not norm scales or biases)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    cfg: OptimConfig, *, decay_mask: Callable[[Any], Any] = matrices
) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the warm-up + cosine schedule.

    ``decay_mask(params)`` is a bool tree choosing what weight decay applies to;
    models with stacked layers pass their own (a stacked vector has rank 2).
    """
    clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity()
    if cfg.eps_style == "tensorflow":
        return optax.chain(
            clip,
            scale_by_tf_adam(cfg.b1, cfg.b2, cfg.eps),
            optax.add_decayed_weights(cfg.weight_decay, decay_mask),
            optax.scale_by_learning_rate(make_schedule(cfg)),
        )
    adamw = optax.adamw(
        make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, mask=decay_mask,
    )  # fmt: skip
    return optax.chain(clip, adamw)


def scale_by_tf_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam as TensorFlow computes it: lr_t = √(1 − β₂ᵗ) / (1 − β₁ᵗ), update = lr_t · m /
    (√v + ε): the same as optax's Adam with ε̂ = ε / √(1 − β₂ᵗ) in place of ε."""

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        scale = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        out = jax.tree.map(lambda m, v: scale * m / (jnp.sqrt(v) + eps), mu, nu)
        return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(optax.scale_by_adam(b1, b2, eps).init, update)


# ----------------------------------------------------------------------------- step pieces


def step_key(state: Any) -> jax.Array:
    """This step's key: ``fold_in(run key, step)``, the same on every replay of the step."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def accumulate_gradients(
    grad_fn: Callable[..., tuple[tuple[jax.Array, Any], Any]],
    params: Any,
    batch: Batch,
    *,
    micro_batches: int,
    key: jax.Array,
    weight: str | None = None,
) -> tuple[jax.Array, Any]:
    """The loss and gradients of ``batch``, summed over ``micro_batches`` slices in one scan.

    ``grad_fn(params, batch, key=) -> ((loss, aux), grads)`` is ``jax.value_and_grad``
    of a loss with aux. Micro-batch i takes rows i, i+A, i+2A, ... and the key
    ``fold_in(key, i)``: every data shard holds its share of each micro-batch, so
    the scan never reshards. With one micro-batch this is ``grad_fn`` itself.

    A loss that is a mean over a count that differs between micro-batches (the
    response tokens of SFT rows) names that count's aux entry as ``weight``: each
    micro-batch then weighs by its count, and the result is the whole batch's mean,
    not a mean of the micro-batches' means. Without it they weigh alike.
    """
    if micro_batches == 1:
        (loss, _), grads = grad_fn(params, batch, key=key)
        return loss, grads
    micro = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]).swapaxes(
            0, 1
        ),
        batch,
    )

    def add_one(carry, xs):
        i, mb = xs
        (loss_i, aux_i), grads_i = grad_fn(params, mb, key=jax.random.fold_in(key, i))
        w_i = jnp.ones(()) if weight is None else aux_i[weight].astype(jnp.float32)
        weighted = jax.tree.map(lambda x: (w_i * x).astype(x.dtype), (loss_i, grads_i))
        return jax.tree.map(jnp.add, carry, (*weighted, w_i)), None

    zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params), jnp.zeros(()))
    (loss, grads, total), _ = jax.lax.scan(add_one, zeros, (jnp.arange(micro_batches), micro))
    total = jnp.where(total > 0, total, 1.0)  # nothing counted: the sums are 0
    return jax.tree.map(lambda x: (x / total).astype(x.dtype), (loss, grads))


def check_micro_batches(grad_accum: int, global_batch_size: int, mesh: Mesh) -> None:
    """``grad_accum`` divides each device's share of the global batch: micro-batch i takes
    rows i, i + A, ... of every shard, so the scan never reshards."""
    per_device = global_batch_size // meshlib.data_parallel_size(mesh)
    if per_device % grad_accum:
        raise ValueError(
            f"optim.grad_accum={grad_accum} does not divide the {per_device} rows each device "
            f"takes of the global batch of {global_batch_size}; use a divisor of {per_device}"
        )


def refuse_micro_batches(cfg: OptimConfig, family: str) -> None:
    """For the families whose step takes the whole batch at once."""
    if cfg.grad_accum != 1:
        raise ValueError(
            f"optim.grad_accum={cfg.grad_accum}: {family} updates on its whole batch at once; "
            "leave grad_accum at 1 and lower the batch to save memory"
        )


def apply_gradients(
    optimizer: optax.GradientTransformation, params: Any, opt_state: Any, grads: Any
) -> tuple[Any, Any]:
    """One optimizer update: (new params, new optimizer state)."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def ema_update(ema: Any, params: Any, decay: float | jax.Array) -> Any:
    """``decay · ema + (1 − decay) · params``, leaf by leaf, in the EMA's dtype."""
    return jax.tree.map(
        lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype), ema, params
    )


def make_train_step(
    loss_fn: Callable[..., tuple[jax.Array, dict]],
    optimizer: optax.GradientTransformation,
    cfg: OptimConfig,
    *,
    weight: str | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The step of a ``TrainState``: one optimizer update of ``loss_fn(params, batch, *,
    key) -> (loss, aux)``, gradients accumulated over ``cfg.grad_accum`` micro-batches
    (weighted by ``aux[weight]``: see ``accumulate_gradients``)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    schedule = make_schedule(cfg)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        loss, grads = accumulate_gradients(
            grad_fn, state.params, batch, micro_batches=cfg.grad_accum, key=step_key(state),
            weight=weight,
        )  # fmt: skip
        params, opt_state = apply_gradients(optimizer, state.params, state.opt_state, grads)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return step


# ----------------------------------------------------------------------------- sharded state


def follow_params(tree: Any, params: Mapping[str, tuple[Any, Any]], mesh: Mesh) -> Any:
    """Shardings for ``tree``: every subtree with the structure and shapes of one of
    ``params`` (name -> (abstract tree, its shardings)) is sharded like it, every other
    leaf replicated. So optimizer moments, EMA copies and frozen references follow
    their parameters, whatever optimizer made them; where an optimizer masks some
    parameters out (``optax.masked``, ``optax.multi_transform``), its ``MaskedNode``
    placeholders stand for them."""
    masked = lambda x: isinstance(x, optax.MaskedNode)
    signatures = {
        name: (jax.tree.structure(abstract), [x.shape for x in jax.tree.leaves(abstract)])
        for name, (abstract, _) in params.items()
    }

    def fits(x: Any, structure, shapes) -> bool:
        if jax.tree.structure(x, is_leaf=masked) != structure:
            return False
        leaves = jax.tree.leaves(x, is_leaf=masked)
        return all(masked(a) or a.shape == b for a, b in zip(leaves, shapes, strict=True))

    def matches(x: Any) -> list[str]:
        return [name for name, signature in signatures.items() if fits(x, *signature)]

    def shard(x: Any) -> Any:
        names = matches(x)
        if not names:
            return meshlib.replicated(mesh)
        shardings = [params[name][1] for name in names]
        if any(s != shardings[0] for s in shardings[1:]):
            raise ValueError(
                f"a state subtree has the shapes of parameters {names}, which are sharded "
                "differently; give those parameter trees different shapes or the same axes"
            )
        # A masked-out parameter keeps its placeholder (it holds no array).
        return jax.tree.map(lambda a, s: a if masked(a) else s, x, shardings[0], is_leaf=masked)

    return jax.tree.map(shard, tree, is_leaf=lambda x: bool(matches(x)))


def state_shardings(
    abstract_state: Any, mesh: Mesh, rules: meshlib.Rules, param_axes: Mapping[str, Any]
) -> Any:
    """Shardings of a family's state: ``param_axes`` maps the names of its parameter
    fields to their logical axes; the rest follows them (``follow_params``)."""
    params = {}
    for name, axes in param_axes.items():
        abstract = getattr(abstract_state, name)
        params[name] = (abstract, meshlib.tree_shardings(axes, abstract, mesh, rules))
    return follow_params(abstract_state, params, mesh)


def abstract_state(
    init: Callable[..., Any],
    mesh: Mesh,
    rules: meshlib.Rules,
    param_axes: Mapping[str, Any],
    *args: Any,
) -> tuple[Any, Any]:
    """``(abstract state, shardings)`` of ``init(*args)``: ShapeDtypeStructs that carry
    their shardings (what a checkpoint restores into; nothing is computed) and the
    shardings themselves."""
    abstract = jax.eval_shape(init, *args)
    shardings = state_shardings(abstract, mesh, rules, param_axes)
    with_shardings = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings
    )
    return with_shardings, shardings


def create_state(init: Callable[..., Any], shardings: Any, mesh: Mesh, *args: Any) -> Any:
    """``init(*args)`` created sharded from the start: ``jit(init, out_shardings)``."""
    with jax.set_mesh(mesh):
        return jax.jit(init, out_shardings=shardings)(*args)


def jit_train_step(step_fn, shardings: Any, mesh: Mesh):
    """Jits the step once: state in/out with its shardings and donated; the batch
    keeps the sharding it was assembled with (see ``mesh.global_batch``)."""
    jitted = jax.jit(
        step_fn,
        in_shardings=(shardings, None),
        out_shardings=(shardings, meshlib.replicated(mesh)),
        donate_argnums=0,
    )

    def run(state, batch):
        with jax.set_mesh(mesh):
            return jitted(state, batch)

    run.jitted = jitted
    return run
