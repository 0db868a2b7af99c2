"""Run logging: a tqdm progress bar, ``WORKDIR/metrics.jsonl`` and TensorBoard events.

``metrics.jsonl`` holds one JSON object per ``log`` call,
``{"step": 120, "loss": 2.31, ..., "time": 1718000000.0}`` (``time``: Unix
seconds). It is flushed after every line, so a killed run's log is complete up
to the last step it logged. JSON has no NaN or infinity, so non-finite values
are written as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (the
spellings of JavaScript and of Python's lenient JSON); ``read_metrics`` turns
them back into floats.

TensorBoard events go through tensorboardX's background writer and may lag
the jsonl by the last record when the process is killed; the jsonl is the
record of truth.

Resuming at ``start_step`` keeps the records of steps <= start_step and drops
later ones (the resumed run recomputes those steps), and TensorBoard is told to
purge its later events, so a resumed run's logs read like an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
POSTFIX_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s")
_RESERVED = ("step", "time")
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class MetricsLogger:
    """Progress bar (tqdm) + WORKDIR/metrics.jsonl + TensorBoard events in WORKDIR/tensorboard."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        total_steps: int,
        start_step: int = 0,
        enabled: bool | None = None,
        desc: str = "train",
        postfix_keys: Sequence[str] = POSTFIX_KEYS,
    ):
        """`enabled` defaults to "this is process 0": other processes log nothing."""
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = Path(workdir) / METRICS_FILE
        self._postfix_keys = tuple(postfix_keys)
        self._postfix: dict[str, float] = {}
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_records_after(self.path, start_step)
        self._file = open(self.path, "a", encoding="utf-8")  # closed in close()
        self._tb = _summary_writer(
            str(self.path.parent / TENSORBOARD_DIR), purge_step=start_step + 1
        )
        # Redirected to a file (a TPU VM's nohup log), refresh rarely: one line per refresh.
        self._bar = tqdm.tqdm(
            total=total_steps,
            initial=start_step,
            desc=desc,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
        )
        self._closed = False

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends ``{"step", **metrics, "time"}`` to metrics.jsonl and TensorBoard."""
        values = {k: _to_python(k, v) for k, v in metrics.items()}
        if not self.enabled:
            return
        record = {
            "step": int(step),
            **{k: _json_safe(v) for k, v in values.items()},
            "time": time.time(),
        }
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()  # reaches the OS now: survives SIGKILL of this process
        for k, v in values.items():
            self._tb.add_scalar(k, float(v), int(step))
        self._tb.flush()
        # Every training loss a family reports (a GAN's d_loss and g_loss) shows on
        # the bar; evaluation records (val_*, eval_*, test_*) leave it as it is.
        shown = [k for k in values if k in self._postfix_keys or _is_training_loss(k)]
        self._postfix.update({k: values[k] for k in shown})
        self._bar.set_postfix_str(_format_postfix(self._postfix), refresh=False)

    def has_record(self, step: int, metrics: Mapping[str, Any]) -> bool:
        """Whether metrics.jsonl holds a record of ``step`` with every key of ``metrics``
        (on process 0; elsewhere ``log`` writes nothing anyway)."""
        if not self.enabled:
            return False
        records = read_metrics(self.path)
        return any(r["step"] == step and metrics.keys() <= r.keys() for r in records)

    def advance(self, n_steps: int = 1) -> None:
        """Moves the progress bar (and its rate and ETA) by `n_steps`."""
        if self.enabled:
            self._bar.update(n_steps)

    def write(self, msg: str) -> None:
        """Prints a line above the progress bar without breaking it."""
        if self.enabled:
            self._bar.write(msg)

    def close(self) -> None:
        if not self.enabled or self._closed:
            return
        self._closed = True
        self._bar.close()
        self._tb.close()
        self._file.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (or of the one in a workdir), non-finite values restored.

    A torn last line (the process died mid-write) is skipped.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [
        {k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in record.items()}
        for record in _parse_lines(path.read_text(encoding="utf-8"), path)
    ]


# ----------------------------------------------------------------------------- internals


def _is_training_loss(name: str) -> bool:
    return name.endswith("_loss") and not name.startswith(("val_", "eval_", "test_"))


def _summary_writer(logdir: str, purge_step: int):
    """tensorboardX's SummaryWriter, imported only by a process that logs.

    tensorboardX imports torch whenever torch is installed, only to accept torch
    tensors; genjax logs Python numbers. Keeping torch out while tensorboardX loads
    saves a training run about 200 MB and a second where torch is installed.
    """
    if "torch" in sys.modules:
        import tensorboardX
    else:
        sys.modules["torch"] = None  # `import torch` raises ImportError meanwhile
        try:
            import tensorboardX
        finally:
            del sys.modules["torch"]
    return tensorboardX.SummaryWriter(logdir, purge_step=purge_step)


def _to_python(key: str, value: Any) -> bool | int | float:
    """A JSON/TensorBoard-ready Python scalar from a Python, numpy or jax scalar."""
    if key in _RESERVED:
        raise ValueError(f"metric name {key!r} is reserved (the record has {_RESERVED} itself)")
    a = np.asarray(value)
    if a.ndim != 0:
        raise ValueError(f"metric {key!r} must be a scalar, got an array of shape {a.shape}")
    if a.dtype.kind == "b":
        return bool(a)
    if a.dtype.kind in "iu":
        return int(a)
    try:
        return float(a)  # float16/bfloat16/float32/float64 alike
    except (TypeError, ValueError):
        raise ValueError(f"metric {key!r} must be a number, got {value!r}") from None


def _json_safe(value: bool | int | float) -> bool | int | float | str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _format_postfix(values: Mapping[str, float]) -> str:
    parts = []
    for k, v in values.items():
        if k == "tokens_per_s":
            parts.append(f"tok/s={v:,.0f}")
        elif k == "lr":
            parts.append(f"lr={v:.2e}")
        else:
            parts.append(f"{k}={v:.4g}")
    return " ".join(parts)


def _parse_lines(text: str, path: Path) -> list[dict[str, Any]]:
    lines = text.splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not text.endswith("\n"):
                break  # torn by a kill mid-write; the step is logged again on resume
            raise ValueError(f"{path}:{i + 1} is not a JSON record: {line[:80]!r}") from None
    return records


def _drop_records_after(path: Path, step: int) -> None:
    """Rewrites `path` keeping records of steps <= `step`, atomically (a kill loses nothing)."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    records = _parse_lines(text, path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) == len(records) and (not text or text.endswith("\n")):
        return
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)
