"""The run layer: one way to train, resume, log, stop and load, for every model family.

A family hands over only its own pieces, as a ``Family``: presets of its
config (a frozen dataclass with a ``run: RunConfig`` section), an ``init``
returning its state (any named pytree with a ``step`` field), the logical axes
of its parameter fields and its rules table, a pure step, and its ``Data``
(a checkpointable iterator of this process's batches, with optional
evaluation and sample callbacks). The rest is done here, the same way for every
family:

    main(family)     the command line every experiment script uses: --workdir
                     --preset --steps --seed --mesh --checkpoint-every --set,
                     multi-process flags, errors as one message and exit code 2,
                     a run stopped by a signal exit code 3
    train(cfg, ...)  validate before any compile, refuse another run's checkpoints,
                     restore (into abstract shapes: nothing is initialized first)
                     or create the state sharded, fit, evaluate, sample
    fit(...)         the loop: logs, checkpoints, SIGTERM/SIGINT, stops on a
                     non-finite loss before it can reach a checkpoint
    start(...)       step 0 of a run from given parameters (a model imported from
                     elsewhere); training it later is an ordinary resume
    load(...)        the newest checkpoint of a workdir, for scoring, sampling, export

A workdir holds ``checkpoints/<step>/`` (state, data position, config),
``metrics.jsonl`` and ``tensorboard/``, plus whatever the family writes there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import math
import pathlib
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from genjax import config as configlib
from genjax import mesh as meshlib
from genjax import train as trainlib
from genjax.checkpoint import Checkpointer, CheckpointError
from genjax.metrics_log import MetricsLogger

State = Any
Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]
StepFn = Callable[[State, Batch | None], tuple[State, Metrics]]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    steps: int = 400  # optimizer updates in total (a resumed run continues to this)
    checkpoint_every: int = 50  # updates between checkpoints
    keep_checkpoints: int = 3  # newest checkpoints kept on disk
    log_every: int = 10  # updates between metrics.jsonl records
    eval_every: int = 0  # updates between evaluations; 0 = only at the end
    mesh: str = "data=-1"  # device mesh, e.g. "data=2,fsdp=2,tensor=2"
    seed: int = 0  # state init and per-step RNG

    def __post_init__(self):
        for name in ("steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"run config: {name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"run config: eval_every must be >= 0, got {self.eval_every}")
        if not 0 <= self.seed < 2**32:  # jax.random.key folds larger ones onto smaller
            raise ValueError(f"run config: seed must be in [0, 2**32), got {self.seed}")


@dataclasses.dataclass
class Data:
    """One run's data, made by the family once its workdir exists."""

    # This process's numpy batches, each a dict of arrays with the same leading
    # axis; a grain iterator is checkpointed with the state. None: the step
    # makes its own data (an environment inside the step).
    batches: Iterator[Batch] | None
    evaluate: Callable[[State], dict[str, float]] | None = None  # metrics, all devices
    # After a run that reached its last step: (state, final evaluation) -> None; says
    # the results in the family's words and draws samples (text, pictures).
    finish: Callable[[State, dict[str, float]], None] | None = None
    describe: str = ""  # the data in a few words, for the run's first log line
    # (unit, count per update) for a throughput metric, e.g. ("tokens", 4096).
    throughput: tuple[str, int] | None = None


def _no_check(cfg: Any, mesh: Mesh) -> None:
    del cfg, mesh


def _as_is(cfg: Any, explicit: frozenset[str]) -> Any:
    del explicit
    return cfg


@dataclasses.dataclass(frozen=True)
class Family:
    """What a model family hands the run layer. Callables take the run's config."""

    name: str  # in messages: "lm", "gan", ...
    presets: Mapping[str, Any]  # preset name -> whole config (with a `run` section)
    default_preset: str
    init: Callable[[Any, jax.Array], State]  # (cfg, key) -> fresh state; traced
    param_axes: Callable[[Any], Mapping[str, Any]]  # state field -> its logical axes
    rules: meshlib.Rules  # logical axis -> mesh axes
    step: Callable[[Any], StepFn]  # cfg -> the pure step
    data: Callable[[Any, pathlib.Path], Data]  # (cfg, workdir) -> this process's data
    check: Callable[[Any, Mesh], None] = _no_check  # raise ValueError before any compile
    # (cfg, fields the user set) -> cfg with the fields that follow others filled in.
    complete: Callable[[Any, frozenset[str]], Any] = _as_is
    compare: tuple[str, ...] = ("model", "data")  # sections a checkpoint must match
    updates_per_step: Callable[[Any], int] = lambda cfg: 1  # > 1: a scanned chunk
    # (cfg, params, key) -> state around given parameters, for `start` and `base_params`.
    init_from_params: Callable[[Any, Any, jax.Array], State] | None = None
    # cfg -> the parameters a fresh run starts from (fine-tuning: another run's
    # weights); None: a fresh run starts from ``init``.
    base_params: Callable[[Any], Any] | None = None
    # cfg -> {state field: tree}: frozen parts of a fresh run's state read from other
    # runs (a reference policy, a reward model), placed with their fields' shardings.
    frozen: Callable[[Any], Mapping[str, Any]] | None = None
    add_flags: Callable[[argparse.ArgumentParser], None] | None = None
    flag_overrides: Callable[[argparse.Namespace], list[str]] = lambda args: []

    @property
    def config_type(self) -> type:
        return type(self.presets[self.default_preset])

    def preset(self, name: str) -> Any:
        if name not in self.presets:
            close = difflib.get_close_matches(name, self.presets, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown preset {name!r}{hint}; choose one of {sorted(self.presets)}")
        return self.presets[name]


# ----------------------------------------------------------------------------- the loop


class NonFiniteLossError(FloatingPointError):
    pass


@dataclasses.dataclass
class FitResult:
    state: State
    stopped_by_signal: str | None = None  # "SIGTERM", "SIGINT" or "preemption" when stopped
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # evaluation at the end


class Stopped(Exception):
    """A run that a signal (SIGTERM, SIGINT, a preemption) stopped before it ended (its
    last step, its final evaluation and the family's ``finish``), after saving a
    checkpoint: the same command resumes it."""


# The exit code of a command whose run was stopped: a scheduler tells it from a finished
# run (0) and from bad input (2), and can requeue the job.
EXIT_STOPPED = 3


class _Interrupted(BaseException):
    """A signal received by ``_StopSignals(interrupt=True)``; not an ``Exception``, so
    that no ``except Exception`` of the interrupted code swallows it."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class _StopSignals:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps, or with
    ``interrupt`` into ``_Interrupted`` raised where the code is. A second signal
    gets the handler from before: a second Ctrl-C stops a run stuck in a step."""

    def __init__(self, interrupt: bool = False):
        self.received: str | None = None
        self._interrupt = interrupt
        self._previous = {}

    def __enter__(self):
        if jax.process_count() > 1:
            # One process's flag would split the processes across steps and hang
            # their collectives. Multi-host runs save and stop at JAX's preemption
            # sync point instead (Checkpointer.should_save finds it; fit stops).
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.received = signal.Signals(signum).name
        if self._interrupt:
            raise _Interrupted(self.received)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _interruptible(work: Callable[[], None]) -> str | None:
    """Runs ``work`` (the end of a run: its final evaluation, the family's ``finish``)
    so that a signal interrupts it; returns the signal's name, or None when ``work``
    finished. The checkpoint is saved by then, and the same command redoes the end."""
    try:
        with _StopSignals(interrupt=True):
            work()
    except _Interrupted as e:
        return e.signal_name
    return None


def _must_be_finite(name: str) -> bool:
    # Every loss a step reports (a GAN's d_loss and g_loss) and gradient norms:
    # a finite loss with non-finite gradients still writes NaN parameters.
    return name == "loss" or name.endswith("_loss") or name.endswith("grad_norm")


def _check_finite(step: int, metrics: Metrics, last_checkpoint: int | None) -> dict[str, float]:
    host = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
    shaped = {k: v.shape for k, v in host.items() if v.ndim}
    if shaped:
        raise ValueError(
            f"the step's metrics must be scalars, got shapes {shaped}; a step that makes "
            "several updates reports their last or mean values"
        )
    host = {k: float(v) for k, v in host.items()}
    bad = {k: v for k, v in host.items() if _must_be_finite(k) and not math.isfinite(v)}
    if bad:
        kept = f"step {last_checkpoint}" if last_checkpoint is not None else "none yet"
        what = ", ".join(f"{k} is {v}" for k, v in bad.items())
        raise NonFiniteLossError(
            f"{what} at step {step}; stopping. The last good checkpoint "
            f"({kept}) is untouched. Lower the learning rate or raise warm-up, then re-run "
            f"to resume from it."
        )
    return host


_RAN_OUT = object()  # what fit's next(batches) returns when a finite dataset ends


def fit(
    state: State,
    train_step: StepFn,
    batches: Iterable[Batch] | None,
    *,
    num_steps: int,
    updates_per_step: int = 1,
    checkpointer: Checkpointer | None = None,
    data_iterator=None,
    logger: MetricsLogger | None = None,
    log_every: int = 10,
    throughput: tuple[str, int] | None = None,
    eval_fn: Callable[[State], dict[str, float]] | None = None,
    eval_every: int = 0,
) -> FitResult:
    """Runs ``train_step`` until ``state.step == num_steps``.

    Each call of ``train_step`` applies ``updates_per_step`` updates (a scanned
    chunk, PPO style); ``num_steps`` and the cadences count updates and are
    multiples of it. ``batches=None`` calls ``train_step(state, None)``.
    Metrics of call c are fetched after call c+1 is dispatched, so the host never
    stalls the device; on checkpoint steps the losses are checked before saving,
    so a non-finite loss never reaches disk. ``data_iterator`` is the
    checkpointable iterator behind ``batches``; batches are not prefetched past it.
    """
    step = int(jax.device_get(state.step))
    if step % updates_per_step:
        raise ValueError(
            f"the state is at step {step}, not a multiple of the {updates_per_step} updates "
            "each call makes; resume with the updates_per_step it was saved with"
        )
    if step > num_steps:
        raise ValueError(
            f"the state is at step {step}, past the {num_steps} steps asked for; ask for "
            f"at least {step} (--steps), or start a fresh run in another --workdir"
        )
    # The step restored; a newer step on disk was found corrupt and is rewritten.
    last_saved = step if checkpointer is not None and checkpointer.on_disk(step) else None
    stopped: str | None = None
    ran_out = False
    evaluated: tuple[int, dict[str, float]] | None = None
    batch_iter: Iterator[Batch] | None = None if batches is None else iter(batches)
    pending: tuple[int, Metrics] | None = None
    window_start, window_steps = time.perf_counter(), 0

    def report(s: int, metrics: Metrics) -> None:
        nonlocal window_start, window_steps
        host = _check_finite(s, metrics, last_saved)
        if logger is not None and (s % log_every == 0 or s == num_steps):
            elapsed = time.perf_counter() - window_start
            if throughput and window_steps:
                unit, per_update = throughput
                host[f"{unit}_per_s"] = per_update * window_steps / elapsed
            host["steps_per_s"] = window_steps / elapsed if window_steps else 0.0
            logger.log(s, host)
            window_start, window_steps = time.perf_counter(), 0

    with _StopSignals() as signals:
        while step < num_steps and stopped is None:
            batch = None if batch_iter is None else next(batch_iter, _RAN_OUT)
            if batch is _RAN_OUT:
                ran_out = True
                break
            state, metrics = train_step(state, batch)
            step += updates_per_step
            window_steps += updates_per_step
            if pending is not None:
                report(*pending)
            pending = (step, metrics)
            if logger is not None:
                logger.advance(updates_per_step)
            saving = checkpointer is not None and checkpointer.should_save(
                step, updates=updates_per_step
            )
            if saving:  # the losses are checked before anything is kept
                report(*pending)
                pending = None
            # Evaluated before saving: a run killed in between redoes the evaluation.
            if eval_fn is not None and eval_every and step % eval_every == 0:
                evaluated = (step, eval_fn(state))
                if logger is not None:
                    logger.log(*evaluated)
            if saving:
                checkpointer.save(step, state, data_iterator)
                last_saved = step
            stopped = signals.received or (
                "preemption" if checkpointer is not None and checkpointer.preempted else None
            )
        if pending is not None:
            report(*pending)
        if checkpointer is not None and (stopped or ran_out or step == num_steps):
            if last_saved != step:
                checkpointer.save(step, state, data_iterator, force=True)
            checkpointer.wait()
    if ran_out:
        raise ValueError(
            f"the data ran out after step {step} of {num_steps}, saved in a checkpoint; "
            "make the batches repeat (grain's .repeat()), or ask for fewer steps"
        )
    if stopped and logger is not None:
        logger.write(
            f"{stopped} received: saved a checkpoint at step {step}; "
            f"re-run the same command to resume."
        )
    final_eval = evaluated[1] if evaluated and evaluated[0] == step else {}
    return FitResult(state, stopped, final_eval)


# ----------------------------------------------------------------------------- runs


def _workdir(workdir: str | pathlib.Path) -> pathlib.Path:
    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir {workdir} exists and is not a directory")
    return workdir


def check(cfg: Any, mesh: Mesh, family: Family) -> tuple[State, State]:
    """Everything wrong with a config on a mesh, before anything is read or compiled;
    returns ``abstract_state`` (computing it checks that every parameter divides
    over its mesh axes)."""
    k = family.updates_per_step(cfg)
    run = cfg.run
    for name in ("steps", "checkpoint_every", "log_every", "eval_every"):
        if getattr(run, name) % k:
            raise ValueError(
                f"run.{name}={getattr(run, name)} is not a multiple of the {k} updates "
                f"each {family.name} step makes; use a multiple of {k}"
            )
    family.check(cfg, mesh)
    return abstract_state(cfg, family, mesh)


def abstract_state(cfg: Any, family: Family, mesh: Mesh) -> tuple[State, State]:
    """(abstract state carrying shardings, shardings) of the family's init."""
    return trainlib.abstract_state(
        lambda key: family.init(cfg, key),
        mesh,
        family.rules,
        family.param_axes(cfg),
        jax.random.key(cfg.run.seed),
    )


def checkpointer(
    cfg: Any, workdir: pathlib.Path, family: Family, *, read_only: bool = False
) -> Checkpointer:
    """The run's checkpointer; everything that writes a run's checkpoints uses it."""
    config_type = type(cfg)
    return Checkpointer(
        workdir / "checkpoints",
        config=configlib.to_dict(cfg),
        keep=cfg.run.keep_checkpoints,
        save_every=cfg.run.checkpoint_every,
        # A resumed iterator is only meaningful over the same model and data.
        compare_keys=family.compare,
        # Fields added since a checkpoint was written are compared at their defaults.
        normalize=lambda saved: configlib.to_dict(configlib.from_dict(config_type, saved)),
        read_only=read_only,
    )


def _parameter_count(abstract: State, family: Family, cfg: Any) -> int:
    fields = family.param_axes(cfg)
    return sum(
        math.prod(x.shape) for name in fields for x in jax.tree.leaves(getattr(abstract, name))
    )


def train(cfg: Any, workdir: str | pathlib.Path, family: Family) -> FitResult:
    """Trains (or resumes) ``family`` with ``cfg`` in ``workdir``; returns the result."""
    workdir = _workdir(workdir)
    mesh = meshlib.make_mesh(cfg.run.mesh)
    abstract, shardings = check(cfg, mesh, family)
    if (workdir / "checkpoints").is_dir():  # refuse another run's checkpoints before any work
        with checkpointer(cfg, workdir, family, read_only=True) as probe:
            probe.check_config()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = family.data(cfg, workdir)
    prep_s = time.perf_counter() - t0
    with checkpointer(cfg, workdir, family) as ckpt:  # an in-flight save completes on error
        restored = ckpt.restore(abstract, data.batches)
        if restored is None and family.base_params is not None:
            state = _state_from_params(cfg, family, family.base_params(cfg), shardings, mesh)
        elif restored is None:
            key = jax.random.key(cfg.run.seed)
            state = trainlib.create_state(lambda k: family.init(cfg, k), shardings, mesh, key)
        else:
            state, step = restored
            print(f"resumed from step {step} in {ckpt.directory}", flush=True)
        if restored is None and family.frozen is not None:
            placed = {name: jax.device_put(tree, getattr(shardings, name))
                      for name, tree in family.frozen(cfg).items()}  # fmt: skip
            state = state._replace(**placed)
        step_fn = trainlib.jit_train_step(family.step(cfg), shardings, mesh)
        start_step = int(jax.device_get(state.step))
        with MetricsLogger(workdir, total_steps=cfg.run.steps, start_step=start_step) as logger:
            logger.write(
                f"{family.name}: {_parameter_count(abstract, family, cfg):,} parameters · mesh "
                f"{dict(mesh.shape)} · {data.describe} · data prepared in {prep_s:.1f}s"
            )
            result = fit(
                state,
                step_fn,
                None if data.batches is None else _global_batches(data.batches, mesh),
                num_steps=cfg.run.steps,
                updates_per_step=family.updates_per_step(cfg),
                checkpointer=ckpt,
                data_iterator=data.batches,
                logger=logger,
                log_every=cfg.run.log_every,
                throughput=data.throughput,
                eval_fn=data.evaluate if cfg.run.eval_every else None,
                eval_every=cfg.run.eval_every,
            )
            if result.stopped_by_signal is None and data.evaluate and not result.metrics:
                result.stopped_by_signal = _interruptible(
                    lambda: _evaluate_at_the_end(result, data.evaluate, logger)
                )
    if result.stopped_by_signal is None and data.finish is not None:
        result.stopped_by_signal = _interruptible(lambda: data.finish(result.state, result.metrics))
    return result


def _evaluate_at_the_end(
    result: FitResult, evaluate: Callable[[State], dict[str, float]], logger: MetricsLogger
) -> None:
    """The final evaluation, logged unless the log has it: the same command run again
    on a finished run evaluates (``finish`` gets the metrics) without a second record."""
    result.metrics = evaluate(result.state)
    step = int(jax.device_get(result.state.step))
    if not logger.has_record(step, result.metrics):
        logger.log(step, result.metrics)


def write_whole(path: pathlib.Path, text: str) -> None:
    """Writes ``text`` to ``path`` whole or not at all (a temporary file, then a rename):
    a command killed while writing leaves no half file for the next one to trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_text(text, encoding="utf-8")
    part.replace(path)


def train_to_end(cfg: Any, workdir: str | pathlib.Path, family: Family) -> FitResult:
    """``train``, raising ``Stopped`` when a signal stopped the run early: for commands and
    pipelines, whose next stage must not start from an unfinished run."""
    result = train(cfg, workdir, family)
    if result.stopped_by_signal is not None:
        step = int(jax.device_get(result.state.step))
        where = (
            f"after its last step ({step}), before its final evaluation and output"
            if step == cfg.run.steps
            else f"at step {step} of {cfg.run.steps}"
        )
        raise Stopped(
            f"{family.name} stopped by {result.stopped_by_signal} {where}, its checkpoint "
            "saved; run the same command again to resume"
        )
    return result


def _global_batches(local_batches: Iterator[Batch], mesh: Mesh) -> Iterator[dict[str, jax.Array]]:
    """Each process's batches as global arrays; the first is checked against the mesh."""
    for i, local in enumerate(local_batches):
        if i == 0:
            rows = {np.shape(v)[0] for v in local.values()}
            if len(rows) != 1:
                raise ValueError(f"a batch's arrays differ in their leading (row) axis: {rows}")
            global_rows = rows.pop() * jax.process_count()
            meshlib.check_batch_size(global_rows, mesh)
            meshlib.check_process_batch_layout(global_rows, mesh)
        yield meshlib.global_batch(local, mesh)


def start(cfg: Any, workdir: str | pathlib.Path, family: Family, params: Any) -> None:
    """Writes step 0 of a run from given parameters (an imported model) into a fresh
    ``workdir``: the state ``family.init_from_params`` builds around them (its
    ``params`` field), without a data position, so ``train`` later resumes it as a
    run that has read nothing yet."""
    if family.init_from_params is None:
        raise ValueError(f"the {family.name} family cannot start from given parameters")
    workdir = _workdir(workdir)
    ckpt_dir = workdir / "checkpoints"
    if ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
        raise ValueError(f"--workdir {workdir} already holds a run; use a fresh directory")
    mesh = meshlib.make_mesh(cfg.run.mesh)
    abstract, shardings = check(cfg, mesh, family)
    if not hasattr(abstract, "params"):
        raise ValueError(f"run.start puts given parameters in a state's `params`; the "
                         f"{family.name} family's state has none")  # fmt: skip
    state = _state_from_params(cfg, family, params, shardings, mesh)
    with checkpointer(cfg, workdir, family) as ckpt:
        ckpt.save(0, state, force=True)


def _state_from_params(cfg: Any, family: Family, params: Any, shardings: Any, mesh: Mesh):
    """Step 0 around given parameters: ``family.init_from_params``, sharded."""
    params = jax.device_put(params, shardings.params)  # each device gets its shards only
    init = lambda p, key: family.init_from_params(cfg, p, key)
    return trainlib.create_state(init, shardings, mesh, params, jax.random.key(cfg.run.seed))


@dataclasses.dataclass
class Loaded:
    cfg: Any  # the run's config, as saved
    state: State  # the newest restorable state
    step: int


def saved_dict(workdir: str | pathlib.Path, family_name: str = "") -> dict:
    """The config of the newest readable checkpoint of ``workdir``, as saved (a dict)."""
    ckpt_dir = pathlib.Path(workdir) / "checkpoints"
    saved = None
    if ckpt_dir.is_dir():
        with Checkpointer(ckpt_dir, config={}, compare_keys=(), read_only=True) as probe:
            saved = probe.saved_config()
    if saved is None:
        which = f" (family {family_name!r})" if family_name else ""
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; train one there first{which}")
    return saved


def saved_config(workdir: str | pathlib.Path, family: Family) -> Any:
    """The config of the newest readable checkpoint of ``workdir``."""
    return configlib.from_dict(family.config_type, saved_dict(workdir, family.name))


def load(workdir: str | pathlib.Path, family: Family, *, mesh: str = "data=-1") -> Loaded:
    """The newest checkpoint of ``workdir`` for scoring, sampling or export: its config
    and its state, read straight into ``mesh`` (replicated by default)."""
    cfg = saved_config(workdir, family)
    abstract, _ = abstract_state(cfg, family, meshlib.make_mesh(mesh))
    ckpt_dir = pathlib.Path(workdir) / "checkpoints"
    with Checkpointer(ckpt_dir, config={}, compare_keys=(), read_only=True) as ckpt:
        state, step = ckpt.restore(abstract)
    return Loaded(cfg, state, step)


# ----------------------------------------------------------------------------- command line


def parser(family: Family, description: str | None = None) -> argparse.ArgumentParser:
    """The command line every experiment script shares, plus the family's own flags."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workdir", required=True, help="checkpoints and logs go here")
    p.add_argument(
        "--preset", default=family.default_preset, help=f"one of {sorted(family.presets)}"
    )
    p.add_argument("--steps", type=int, help="total optimizer updates")
    p.add_argument("--seed", type=int, help="state init and per-step randomness")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=2,tensor=2 (one axis may be -1)")
    p.add_argument("--checkpoint-every", type=int, help="updates between checkpoints")
    configlib.add_set_flag(p, "override any config field, e.g. optim.lr=1e-3 model.num_layers=4")
    if family.add_flags is not None:
        family.add_flags(p)
    p.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run (TPU VM slice, SLURM: found from the environment)",
    )
    p.add_argument("--coordinator", help="HOST:PORT of process 0, for a hand-made cluster")
    p.add_argument("--num-processes", type=int, help="processes in a hand-made cluster")
    p.add_argument("--process-id", type=int, help="this process's index in a hand-made cluster")
    return p


def schedule_follows_run(cfg: Any, explicit: frozenset[str]) -> Any:
    """``cfg`` with its learning-rate schedule (``cfg.optim``, a ``train.OptimConfig``)
    spanning the run: ``total_steps`` = ``run.steps``, warm-up at most a tenth of it;
    fields the user set are kept. For a family's ``complete``."""
    optim = cfg.optim
    if "optim.total_steps" not in explicit:
        optim = dataclasses.replace(optim, total_steps=cfg.run.steps)
    if "optim.warmup_steps" not in explicit:
        warmup = min(optim.warmup_steps, max(cfg.run.steps // 10, 1))
        optim = dataclasses.replace(optim, warmup_steps=warmup)
    return dataclasses.replace(cfg, optim=optim)


def configure(family: Family, preset: str, assignments: Sequence[str] = ()) -> Any:
    """The config a run gets: the preset, ``"section.field=value"`` assignments applied
    in order, then the fields that follow others filled in where not assigned."""
    cfg = configlib.override(family.preset(preset), assignments)
    explicit = frozenset(a.split("=", 1)[0].strip() for a in assignments)
    return family.complete(cfg, explicit)


def config_from_args(family: Family, args: argparse.Namespace) -> Any:
    """``configure`` from the command line: the flags, then ``--set``."""
    flags = [
        f"run.{field}={value}"
        for field, value in (
            ("steps", args.steps),
            ("seed", args.seed),
            ("mesh", args.mesh),
            ("checkpoint_every", args.checkpoint_every),
        )
        if value is not None
    ]
    return configure(family, args.preset, [*flags, *family.flag_overrides(args), *args.set])


# What a command line reports as one `error:` line: bad input, unusable checkpoints,
# a diverged run.
USER_ERRORS = (ValueError, OSError, FloatingPointError, CheckpointError)


def _one_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


@contextlib.contextmanager
def one_line_warnings():
    """Warnings print as ``warning: <message>``, one line, not a source excerpt."""
    previous = warnings.formatwarning
    warnings.formatwarning = _one_line
    try:
        yield
    finally:
        warnings.formatwarning = previous


def main(family: Family, argv: Sequence[str] | None = None, description: str | None = None) -> int:
    """Parses the command line, joins a multi-process run if asked, trains; returns the
    exit code. Bad input (config, mesh, data, checkpoints) and a diverged run end
    with one message on stderr and exit code 2; a run a signal stopped (its checkpoint
    saved) with one message and ``EXIT_STOPPED``."""
    args = parser(family, description).parse_args(argv)
    with one_line_warnings():
        try:
            if (args.num_processes or args.process_id is not None) and not args.coordinator:
                raise ValueError("--num-processes and --process-id need --coordinator HOST:PORT")
            # First: making a config may read another run's checkpoint (a fine-tune's
            # base), which starts JAX, and JAX joins a cluster only before it starts.
            if args.distributed or args.coordinator:
                meshlib.initialize_distributed(
                    args.coordinator, args.num_processes, args.process_id
                )
            cfg = config_from_args(family, args)
            train_to_end(cfg, args.workdir, family)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except Stopped as e:
            print(f"stopped: {e}", file=sys.stderr)
            return EXIT_STOPPED
    return 0
