"""A run's checkpoints with orbax: train state + data-iterator position + config.

One `Checkpointer` per work directory. Each step directory holds three items:

    <dir>/<step>/state/   the train state (sharded arrays, ocdbt)
    <dir>/<step>/data/    grain iterator state, one `process_{i}-of-{n}.json` per process
    <dir>/<step>/config/  the run config as JSON

Saves are asynchronous: `save` returns once the arrays are copied off the
device, and the files are written in the background. Orbax writes a step into
`<step>.orbax-checkpoint-tmp` and renames it when every item is written, so a
run killed mid-save leaves a tmp directory that is never listed as a step (and
is removed when the next `Checkpointer` opens the directory).

`restore` checks the saved config against this run's before reading any
tensor, then tries the newest step and falls back to older ones if a step is
corrupt, so a damaged checkpoint costs progress, not the run. Each process of a
multi-process run reads its own arrays and data position (a file each), and the
processes agree: a step that fails to read on any of them is skipped by all. A
step-0 checkpoint may carry no data position (a run started from given
parameters, ``run.start``): nothing has been read yet, so the iterator starts at
the beginning.
"""

import json
import logging
import os
import pathlib
import re
import shutil
import sys
import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

_MISSING = "<missing>"
# Characters of an error's first line kept in a skip warning.
_REASON_CHARS = 80


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why and what to do."""


class ConfigMismatchError(CheckpointError, ValueError):
    """The checkpoint was written by a run with a different (compared) config."""


class UnrestorableError(CheckpointError, RuntimeError):
    """Checkpoints exist but none of them could be read."""


class Checkpointer:
    """A run's checkpoints: train state + data-iterator position + config, async, keep-last-K."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        config: dict,
        keep: int = 3,
        save_every: int | None = None,
        async_save: bool = True,
        compare_keys: Sequence[str] = ("model",),
        normalize: Callable[[dict], dict] | None = None,
        read_only: bool = False,
    ):
        """Opens (or creates) `directory`.

        Args:
          config: this run's JSON-able config, saved with every step.
          keep: how many of the newest steps to keep on disk.
          save_every: `save` writes steps that are multiples of this; None: only forced
            saves (end of run, signals) and preemption saves.
          async_save: write in the background (False: `save` blocks until written).
          compare_keys: top-level config keys that must match a checkpoint to restore it.
          normalize: maps a saved config to this code's form before comparing (fields
            added since it was written take their defaults), e.g. a round trip
            through the config dataclass; may raise ValueError for an unreadable one.
          read_only: only read (scoring or sampling a run that may still be training):
            nothing is created, cleaned up or saved.
        """
        # orbax needs absolute paths (a relative one fails in its background commit).
        self.directory = os.path.abspath(os.fspath(directory))
        # A JSON round trip makes tuples lists, as they come back from disk, and
        # fails here, not in a background save, if the config is not JSON-able.
        self.config = json.loads(json.dumps(config))
        self.save_every = save_every
        self.compare_keys = tuple(compare_keys)
        self._normalize = normalize or (lambda config: config)
        # Steps this object found unrestorable; `save` may replace them.
        self._corrupt_steps: set[int] = set()
        # (step, due): JAX's preemption check must run once per step, not per call.
        self._due: tuple[int, bool] | None = None
        self.preempted = False  # JAX's preemption sync point was reached: save and stop
        self.read_only = read_only
        if not read_only:  # a running save's tmp directory is not a leftover to a reader
            _remove_unfinished_saves(self.directory)
        # Not orbax's own read_only: it logs warnings; a manager writes nothing until saving.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=async_save,
            create=not read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest committed step (it may still turn out corrupt on restore)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first; in-progress (tmp) saves are not listed."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int, *, updates: int = 1) -> bool:
        """Whether `save(step)` would write: a multiple of `save_every` or JAX's
        preemption sync point, and not already on disk. Call it after every step on
        every process (JAX's preemption protocol needs that); a call that made
        several `updates` reports each step id it passed, since JAX's sync point is
        one step id past the largest any process reported."""
        if self._due is None or self._due[0] != step:
            # Every id asked, first: any of them may be the sync point JAX picked.
            asked = [
                self._manager.reached_preemption(s) for s in range(step - updates + 1, step + 1)
            ]
            due = self.save_every is not None and step % self.save_every == 0
            self.preempted = any(asked)
            self._due = (step, due or self.preempted)
        return self._due[1] and not self.on_disk(step)

    def save(self, step: int, state: Any, data_iterator=None, *, force: bool = False) -> bool:
        """Starts an async save of `state` (+ iterator position, config) at `step`.

        Saves when `should_save(step)` or `force`; returns whether a save started.
        A step already on disk is never overwritten, unless this object found it
        corrupt while restoring. Blocks only while the previous save finishes and
        the arrays are copied off the device; call `wait` before exiting.
        """
        if self.read_only:
            raise ValueError(f"this Checkpointer of {self.directory} only reads")
        if not (force or self.should_save(step)) or self.on_disk(step):
            return False
        if step in self._corrupt_steps and step in self._manager.all_steps():
            self._manager.delete(step)  # found corrupt (and said so) when restoring
        items = {
            "state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave(self.config),
        }
        if data_iterator is not None:
            # grain's handler reads the iterator state before save returns, so the
            # loop may advance the iterator right away.
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        # force: the cadence was decided above; orbax's own policy would also
        # refuse steps older than the newest one (after a fallback restore).
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._corrupt_steps.discard(step)
        return saved

    def restore(self, abstract_state: Any, data_iterator=None) -> tuple[Any, int] | None:
        """Restores the newest restorable step; None if the directory has no checkpoint.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding`:
        arrays are read straight into those shardings. `data_iterator` is set to
        the saved position in place. Raises ConfigMismatchError (before reading
        any tensor) if the compared config keys differ, and UnrestorableError if
        checkpoints exist but none can be restored. Steps skipped on the way are
        named in one warning with the step restored.
        """
        self._manager.wait_until_finished()
        steps = sorted(self._manager.all_steps(), reverse=True)
        self._check_same_steps_everywhere(steps)
        if not steps:
            return None
        _ignore_reads_left_in_flight()
        # A step that fails to read may have moved the iterator already; the next one
        # tried (step 0 of a run that has read nothing has no position) starts from here.
        start_position = None if data_iterator is None else data_iterator.get_state()
        failures: list[tuple[int, str]] = []
        for step in steps:
            saved_config, error = _everywhere(self._read_config, step)
            if error is not None:
                failures.append(self._skip(step, error))
                continue
            # Outside the agreement: a mismatch is the user's to fix, not a reason to
            # fall back (every process read the same file, so every one raises).
            self._check_config(saved_config, step)
            if data_iterator is not None:
                self._check_process_count(step)
            state, error = _everywhere(self._read_step, step, abstract_state, data_iterator)
            if error is not None:
                failures.append(self._skip(step, error))
                if data_iterator is not None:
                    data_iterator.set_state(start_position)
                continue
            if failures:
                skipped = "; ".join(f"step {s} ({reason})" for s, reason in failures)
                warnings.warn(
                    f"skipped checkpoint {skipped} in {self.directory}: restored step {step}",
                    stacklevel=2,
                )
            return state, step
        reasons = "\n".join(f"  step {s}: {r}" for s, r in failures)
        raise UnrestorableError(
            f"no checkpoint in {self.directory} could be restored:\n{reasons}\n"
            "If every step fails the same way, the state being restored into probably "
            "differs from the saved one (another optimizer or model)."
        )

    def saved_config(self, step: int | None = None) -> dict | None:
        """The config saved at `step` (default: the newest step whose config reads)."""
        if step is not None:
            return self._read_config(step)
        for s in sorted(self._manager.all_steps(), reverse=True):
            try:
                return self._read_config(s)
            except Exception:
                continue
        return None

    def check_config(self) -> None:
        """Raises ConfigMismatchError now if the newest readable checkpoint was written
        with another config: lets a run refuse before preparing data or compiling."""
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                saved = self._read_config(step)
            except Exception:
                continue
            self._check_config(saved, step)
            return

    def wait(self) -> None:
        """Blocks until the in-flight save (if any) is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes the in-flight save and releases orbax's threads."""
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def on_disk(self, step: int) -> bool:
        """Whether `step` is committed and not known to be corrupt."""
        return step in self._manager.all_steps() and step not in self._corrupt_steps

    def _check_same_steps_everywhere(self, steps: list[int]) -> None:
        """Raises on every process if the processes of the run list different steps (a
        step another job committed or removed between their listings): they would try,
        and could restore, different steps."""
        if jax.process_count() == 1:
            return
        fingerprint = np.uint32(zlib.crc32(repr(steps).encode()))
        if len(set(multihost_utils.process_allgather(fingerprint).tolist())) > 1:
            raise CheckpointError(
                f"the processes of this run list different checkpoint steps in "
                f"{self.directory} (process {jax.process_index()}: {sorted(steps)}): is "
                "another job still writing there? Stop it and rerun."
            )

    def _read_config(self, step: int) -> dict:
        return ocp.JsonCheckpointHandler().restore(self._step_dir(step) / "config")

    def _step_dir(self, step: int) -> pathlib.Path:
        return pathlib.Path(self.directory) / str(step)

    def _check_config(self, saved: dict, step: int) -> None:
        try:
            saved = self._normalize(saved)
        except ValueError as e:
            raise ConfigMismatchError(
                f"checkpoint step {step} in {self.directory} has a config this code cannot "
                f"read ({e}); use a fresh --workdir"
            ) from None
        diffs = config_diff(saved, self.config, self.compare_keys)
        if diffs:
            lines = "\n".join(f"  {d}" for d in diffs)
            raise ConfigMismatchError(
                f"checkpoint step {step} in {self.directory} was written with a different "
                f"config:\n{lines}\nUse a fresh --workdir, or rerun with the checkpoint's "
                "config (Checkpointer.saved_config())."
            )

    def _check_process_count(self, step: int) -> None:
        """Raises if `step`'s data positions were written by another number of processes
        than this run has (grain names each ``process_{i}-of-{n}.json``): every step of
        the run would fail the same way, so this is the user's to fix, not a fallback."""
        folder = self._step_dir(step) / "data"
        n = jax.process_count()
        written = {f.name.rsplit("-of-", 1)[-1].removesuffix(".json")
                   for f in (folder.iterdir() if folder.is_dir() else ())
                   if f.name.startswith("process_")}  # fmt: skip
        if written and str(n) not in written:
            counts = " or ".join(sorted(written))
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} holds the data positions of "
                f"{counts} processes; this run has {n}: resume it with {counts} processes"
            )

    def _read_step(self, step: int, abstract_state: Any, data_iterator) -> Any:
        """This process's arrays of `step`; its data position set on `data_iterator`.

        Read with orbax's and grain's handlers, not the manager's restore: that ends at
        a barrier of every process, so a process whose read failed (its own position
        file, the chunks only it reads) could neither fall back alone nor tell the
        others, who wait there. Here each process reads, then they agree.
        """
        folder = self._step_dir(step)
        if data_iterator is not None:
            if (folder / "data").is_dir():
                grain.checkpoint.CheckpointHandler().restore(
                    folder / "data", args=grain.checkpoint.CheckpointRestore(data_iterator)
                )
            elif step != 0:  # only a run that has read nothing may lack a position
                raise FileNotFoundError("data iterator position missing")
        handler = ocp.StandardCheckpointHandler()
        try:
            return handler.restore(folder / "state", args=ocp.args.StandardRestore(abstract_state))
        finally:
            handler.close()

    def _skip(self, step: int, error: Exception) -> tuple[int, str]:
        """Marks a step that would not restore; returns (step, why in a few words)."""
        self._corrupt_steps.add(step)
        return step, _reason(error)


class _FailedElsewhere(Exception):
    """A step this process read but another process of the run could not."""


def _everywhere(read: Callable[..., Any], *args) -> tuple[Any, Exception | None]:
    """(read(*args), None) if it returned on every process of the run; else (None, the
    error it raised here, or a `_FailedElsewhere` if it raised on another process).
    Every process must call it."""
    try:
        value, error = read(*args), None
    except Exception as e:
        value, error = None, e
    if jax.process_count() > 1:
        failed = multihost_utils.process_allgather(np.int32(error is not None))
        if error is None and failed.any():
            where = ", ".join(str(i) for i in np.flatnonzero(failed))
            value, error = None, _FailedElsewhere(f"unreadable on process {where}")
    return value, error


def _reason(error: Exception) -> str:
    """Why a step would not restore, in a few words."""
    if isinstance(error, _FailedElsewhere):
        return str(error)
    first_line = (str(error).splitlines() or [""])[0]
    # tensorstore errors open with an absl status ("OUT_OF_RANGE: Error opening ...")
    # and go on with a driver spec no user needs here.
    status = re.match(r"([A-Z_]{4,}): ", first_line)
    if status:
        return f"unreadable arrays, {status.group(1)}"
    if len(first_line) > _REASON_CHARS:
        first_line = first_line[: _REASON_CHARS - 1] + "…"
    return f"{type(error).__name__}: {first_line}"


def _ignore_reads_left_in_flight() -> None:
    """Silences what the reads a failed restore left in flight report afterwards.

    When one tensor of a step fails to read, orbax stops waiting and closes its
    event loop while tensorstore still reads the others. Each of those later
    reports, a traceback apiece and long after the step was skipped, one of:
    "Event loop is closed" or its own read error through ``sys.unraisablehook``
    (``_left_in_flight``), or asyncio's "Task (or Future) exception was never
    retrieved" when collected. Only these reports are dropped; anything else goes
    through as before.
    """
    previous = sys.unraisablehook
    if getattr(previous, "ignores_closed_loop", False):
        return

    def hook(unraisable):
        if not _left_in_flight(unraisable):
            previous(unraisable)

    hook.ignores_closed_loop = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_unretrieved_read_failure)


def _left_in_flight(unraisable) -> bool:
    """Whether ``sys.unraisablehook``'s report is of a read a failed restore left in flight:
    its callback on the closed loop, or its own failure when its coroutine was collected
    (orbax awaits every read of a restore that succeeds)."""
    value, tb = unraisable.exc_value, unraisable.exc_traceback
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    closed = isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
    failed_read = str(value).startswith("Encountered error while reading array index")
    return (closed and "call_soon_threadsafe" in frames) or (
        failed_read and "_read_array_index_and_device_put" in frames
    )


def _unretrieved_read_failure(record: logging.LogRecord) -> bool:
    """False (drop) for asyncio's report of a tensorstore read whose failure nobody awaited.

    orbax awaits every read of a restore that succeeds, so such a report can
    only come from a step already skipped.
    """
    error = record.exc_info[1] if record.exc_info else None
    unretrieved = "exception was never retrieved" in record.getMessage()
    return not (unretrieved and "tensorstore_spec" in str(error))


def _remove_unfinished_saves(directory: str) -> None:
    """Deletes what saves killed mid-write left (``<step>.orbax-checkpoint-tmp*``).

    Done here, before the manager opens: orbax's own clean-up runs in a thread
    that nothing waits for, so a run that stops right after opening (a bad
    corpus) printed that thread's traceback at interpreter exit.
    """
    if jax.process_index() != 0:
        return
    for leftover in pathlib.Path(directory).glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(leftover, ignore_errors=True)


def config_diff(saved: dict, current: dict, keys: Sequence[str]) -> list[str]:
    """Lines "a.b: checkpoint X, this run Y" for every differing field under `keys`."""
    flat_saved, flat_current = _flatten(saved, keys), _flatten(current, keys)
    diffs = []
    for name in sorted(flat_saved.keys() | flat_current.keys()):
        a, b = flat_saved.get(name, _MISSING), flat_current.get(name, _MISSING)
        if a != b:
            diffs.append(f"{name}: checkpoint {_show(a)}, this run {_show(b)}")
    return diffs


def _flatten(config: dict, keys: Sequence[str]) -> dict[str, Any]:
    """`config[k]` for k in `keys` as {"k.a.b": leaf}; an empty dict is a leaf."""
    flat = {}
    stack = [(k, config[k]) for k in keys if k in config]
    while stack:
        name, value = stack.pop()
        if isinstance(value, dict) and value:
            stack.extend((f"{name}.{k}", v) for k, v in value.items())
        else:
            flat[name] = value
    return flat


def _show(value: Any) -> str:
    return value if value is _MISSING else json.dumps(value)
