"""MetricsLogger: jsonl + TensorBoard contents, flushing, resume, non-finite values."""

import json
import math
import os
import struct
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from genjax.metrics_log import MetricsLogger, read_metrics


def tensorboard_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} read from the TFRecord event files (no TensorBoard needed)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            # TFRecord: uint64 length, uint32 crc of length, payload, uint32 crc of payload.
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


def _strict_json(line: str) -> dict:
    def reject(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=reject)


def test_logs_numpy_and_jax_scalars_to_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, total_steps=3, enabled=True) as logger:
        for step in (1, 2, 3):
            logger.advance()
            metrics = {
                "loss": jnp.float32(1.0 / step),
                "lr": np.float64(3e-4),
                "tokens": np.int64(7),
            }
            logger.log(step, metrics)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["loss"] == pytest.approx(0.5) and records[1]["tokens"] == 7
    assert isinstance(records[0]["tokens"], int) and isinstance(records[0]["time"], float)
    assert all(_strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
    tb = tensorboard_scalars(tmp_path)
    assert [s for s, _ in tb["loss"]] == [1, 2, 3]
    assert tb["loss"][2][1] == pytest.approx(1 / 3)


def test_non_finite_values_are_valid_json_strings(tmp_path):
    with MetricsLogger(tmp_path, total_steps=1, enabled=True) as logger:
        logger.log(1, {"a": float("nan"), "b": np.float32("inf"), "c": -math.inf})
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    raw = _strict_json(line)
    assert (raw["a"], raw["b"], raw["c"]) == ("NaN", "Infinity", "-Infinity")
    (record,) = read_metrics(tmp_path)
    assert math.isnan(record["a"]) and record["b"] == math.inf and record["c"] == -math.inf


def test_log_is_complete_after_sigkill(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        from genjax.metrics_log import MetricsLogger
        logger = MetricsLogger({str(tmp_path)!r}, total_steps=10, enabled=True)
        for step in range(1, 4):
            logger.log(step, {{"loss": 1.0 / step}})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert proc.returncode == -9, proc.stderr.decode()
    # The jsonl is the record of truth; TensorBoard's async writer may lag it by a step.
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_resume_appends_and_drops_steps_after_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, total_steps=6, enabled=True) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # torn by a kill mid-write
    # Resumed from the step-3 checkpoint: steps 4 and 5 are recomputed.
    with MetricsLogger(tmp_path, total_steps=6, start_step=3, enabled=True) as logger:
        for step in range(4, 7):
            logger.log(step, {"loss": 10.0 * step})
    records = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [
        (1, 1),
        (2, 2),
        (3, 3),
        (4, 40),
        (5, 50),
        (6, 60),
    ]


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", total_steps=2, enabled=False)
    logger.log(1, {"loss": 1.0})
    logger.advance()
    logger.write("hidden")
    logger.close()
    assert not (tmp_path / "run").exists()


def test_progress_bar_postfix_shows_training_metrics(tmp_path):
    with MetricsLogger(tmp_path, total_steps=4, enabled=True) as logger:
        logger.log(1, {"loss": 2.5, "lr": 3e-4, "grad_norm": 0.75, "tokens_per_s": 12345.6, "x": 1})
        logger.log(2, {"val_loss": 2.0})  # an eval record keeps the training postfix
        assert logger._bar.postfix == "loss=2.5 lr=3.00e-04 grad_norm=0.75 tok/s=12,346"
        logger.log(3, {"d_loss": 1.5, "g_loss": 0.5})  # a GAN's two losses join it
        assert logger._bar.postfix.endswith("tok/s=12,346 d_loss=1.5 g_loss=0.5")


def test_bad_metrics_are_rejected(tmp_path):
    with MetricsLogger(tmp_path, total_steps=1, enabled=True) as logger:
        with pytest.raises(ValueError, match="'loss' must be a scalar"):
            logger.log(1, {"loss": np.zeros(3)})
        with pytest.raises(ValueError, match="'step' is reserved"):
            logger.log(1, {"step": 1})
        with pytest.raises(ValueError, match="'name' must be a number"):
            logger.log(1, {"name": "adam"})
    assert read_metrics(tmp_path) == []
