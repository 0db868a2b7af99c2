"""The training runtime every model family shares.

``TrainState`` is a small named pytree; a step is ``(state, batch) -> (state,
metrics)``, jitted once with explicit shardings and the state donated; per-step
randomness is ``fold_in(state.rng, state.step)`` so a restored run replays
exactly. ``fit`` drives any such step: logging, checkpoints, SIGTERM/SIGINT,
and stopping on a non-finite loss before it can reach a checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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

    def __post_init__(self):
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
    adamw = optax.adamw(
        make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, mask=decay_mask,
    )  # fmt: skip
    return optax.chain(clip, adamw)


def make_train_step(
    loss_fn: Callable[..., tuple[jax.Array, dict]],
    optimizer: optax.GradientTransformation,
    cfg: OptimConfig,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """A pure step. ``loss_fn(params, batch, *, key) -> (loss, aux)``.

    With ``grad_accum = A`` the batch is split into A micro-batches along its
    leading axis and their gradients averaged inside one compiled scan.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    schedule = make_schedule(cfg)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if cfg.grad_accum == 1:
            (loss, _), grads = grad_fn(state.params, batch, key=key)
        else:
            # Micro-batch i takes rows i, i+A, i+2A, ...: every data shard holds
            # its share of each micro-batch, so the scan never reshards.
            micro = jax.tree.map(
                lambda x: x.reshape(
                    x.shape[0] // cfg.grad_accum, cfg.grad_accum, *x.shape[1:]
                ).swapaxes(0, 1),
                batch,
            )

            def accumulate(carry, xs):
                i, mb = xs
                (loss_i, _), g_i = grad_fn(state.params, mb, key=jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, carry, (loss_i, g_i)), None

            zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(cfg.grad_accum), micro))
            loss, grads = jax.tree.map(lambda x: x / cfg.grad_accum, (loss, grads))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return step


# ----------------------------------------------------------------------------- sharded state


def state_shardings(
    abstract_state: TrainState,
    param_shardings: Any,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
) -> TrainState:
    """Optimizer moments follow their parameters; everything else is replicated."""
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_state.opt_state,
        param_shardings,
        transform_non_params=lambda _: meshlib.replicated(mesh),
    )
    rep = meshlib.replicated(mesh)
    return TrainState(step=rep, params=param_shardings, opt_state=opt_shardings, rng=rep)


def _init_fn(init_params, optimizer, seed: int) -> Callable[[], TrainState]:
    def init() -> TrainState:
        key = jax.random.key(seed)
        params = init_params(jax.random.fold_in(key, 0))
        rng = jax.random.key_data(jax.random.fold_in(key, 1))
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng)

    return init


def abstract_train_state(
    init_params: Callable[[jax.Array], Any],
    param_axes: Any,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    seed: int = 0,
) -> tuple[TrainState, TrainState]:
    """``(abstract state, shardings)``: ShapeDtypeStructs that carry their shardings
    (what a checkpoint restores into, never materialized) and the shardings."""
    abstract = jax.eval_shape(_init_fn(init_params, optimizer, seed))
    param_sh = meshlib.tree_shardings(param_axes, abstract.params, mesh)
    shardings = state_shardings(abstract, param_sh, optimizer, mesh)
    with_sharding = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings
    )
    return with_sharding, shardings


def create_train_state(
    init_params: Callable[[jax.Array], Any],
    param_axes: Any,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    seed: int,
) -> tuple[TrainState, TrainState]:
    """Creates the state sharded from the start: abstract shapes → shardings →
    ``jit(init, out_shardings)``, so no device ever holds the whole model.
    Returns ``(state, shardings)``."""
    _, shardings = abstract_train_state(init_params, param_axes, optimizer, mesh, seed=seed)
    with jax.set_mesh(mesh):
        state = jax.jit(_init_fn(init_params, optimizer, seed), out_shardings=shardings)()
    return state, shardings


def jit_train_step(step_fn, shardings: TrainState, mesh: Mesh):
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


# ----------------------------------------------------------------------------- the loop


class NonFiniteLossError(FloatingPointError):
    pass


@dataclasses.dataclass
class FitResult:
    state: TrainState
    stopped_by_signal: str | None = None  # "SIGTERM" / "SIGINT" when interrupted


class _StopSignals:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if jax.process_count() > 1:
            # One process's flag would split the processes across steps and hang
            # their collectives. Multi-host runs stop at JAX's preemption sync
            # point instead (Checkpointer.should_save saves there).
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_finite(step: int, metrics: Metrics, last_checkpoint: int | None) -> dict[str, float]:
    host = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
    # A finite loss with non-finite gradients still writes NaN parameters.
    bad = {k: host[k] for k in ("loss", "grad_norm") if k in host and not math.isfinite(host[k])}
    if bad:
        kept = f"step {last_checkpoint}" if last_checkpoint is not None else "none yet"
        what = ", ".join(f"{k} is {v}" for k, v in bad.items())
        raise NonFiniteLossError(
            f"{what} at step {step}; stopping. The last good checkpoint "
            f"({kept}) is untouched. Lower the learning rate or raise warm-up, then re-run "
            f"to resume from it."
        )
    return host


def fit(
    state: TrainState,
    train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]],
    batches: Iterable[Batch],
    *,
    num_steps: int,
    checkpointer=None,
    data_iterator=None,
    logger=None,
    log_every: int = 10,
    tokens_per_step: int | None = None,
    eval_fn: Callable[[TrainState], dict[str, float]] | None = None,
    eval_every: int | None = None,
) -> FitResult:
    """Runs ``train_step`` until ``state.step == num_steps``.

    Metrics of step s are fetched after step s+1 is dispatched, so the host never
    stalls the device; on checkpoint steps the loss is checked before saving, so
    a non-finite loss never reaches disk. ``data_iterator`` is the checkpointable
    iterator behind ``batches``; batches are not prefetched past it.
    """
    step = int(jax.device_get(state.step))
    last_saved = checkpointer.latest_step() if checkpointer else None
    batch_iter: Iterator[Batch] = iter(batches)
    pending: tuple[int, Metrics] | None = None
    window_start, window_steps = time.perf_counter(), 0

    def report(s: int, metrics: Metrics) -> None:
        nonlocal window_start, window_steps
        host = _check_finite(s, metrics, last_saved)
        if logger is not None and (s % log_every == 0 or s == num_steps):
            elapsed = time.perf_counter() - window_start
            if tokens_per_step and window_steps:
                host["tokens_per_s"] = tokens_per_step * window_steps / elapsed
            host["steps_per_s"] = window_steps / elapsed if window_steps else 0.0
            logger.log(s, host)
            window_start, window_steps = time.perf_counter(), 0

    with _StopSignals() as signals:
        while step < num_steps and signals.received is None:
            state, metrics = train_step(state, next(batch_iter))
            step += 1
            window_steps += 1
            if pending is not None:
                report(*pending)
            pending = (step, metrics)
            if logger is not None:
                logger.advance()
            if checkpointer is not None and checkpointer.should_save(step):
                report(*pending)
                pending = None
                checkpointer.save(step, state, data_iterator)
                last_saved = step
            if eval_fn is not None and eval_every and step % eval_every == 0:
                if logger is not None:
                    logger.log(step, eval_fn(state))
        if pending is not None:
            report(*pending)
        if checkpointer is not None and (signals.received or step == num_steps):
            if last_saved != step:
                checkpointer.save(step, state, data_iterator, force=True)
            checkpointer.wait()
    if signals.received and logger is not None:
        logger.write(
            f"{signals.received} received: saved a checkpoint at step {step}; "
            f"re-run the same command to resume."
        )
    return FitResult(state, signals.received)
