"""Evaluation over all local devices (pmap semantics) with ``jax.shard_map``.

Parameters are replicated, each batch is split along its leading axis over a
1-D mesh named ``"batch"``, every device computes partial sums of its slice, and
``lax.psum`` reduces them; batches are then summed on the host in float64.

``sum_fn(params, batch) -> {name: scalar}`` returns SUMS over the examples it
is given (summed NLL, token count, correct predictions, ...), never means:
sums of slices add up to the sum of the batch, means do not.

A batch whose leading size does not divide the device count is padded with
copies of its last row and a zero ``batch["mask"]``, so no example is dropped or
counted twice. ``sum_fn`` must therefore weight every per-example term by
``batch["mask"]`` when that key is present. Padding a batch without a mask
adds a float32 mask of shape [B] (ones for real rows); a batch's own mask (any
shape with leading axis B, e.g. per-token [B, T]) is padded with zeros.
Batches that need no padding reach ``sum_fn`` unchanged. Copies of a real row,
not zeros, keep padding in-distribution: a zero row can make a per-example term
NaN, and NaN * 0 is still NaN.

Every batch is padded up to the largest (padded) batch seen so far, so a
ragged final batch reuses the compiled program of the full ones when the
batches carry a mask (without one, adding it costs one more compile). The jitted
program is cached per (sum_fn, mesh): pass the same function object each call
(a module-level function or a stored ``functools.partial``), not a fresh lambda.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "batch"
_IN_FLIGHT = 2
# Compiled programs kept per (sum_fn, mesh); small, since a caller passing a fresh
# lambda each call misses anyway and would otherwise pin stale executables.
_CACHE_SIZE = 8

Batch = Mapping[str, np.ndarray]
SumFn = Callable[[Any, Batch], Mapping[str, jax.Array]]


def make_eval_mesh(devices: Iterable[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named "batch" over `devices` (default: this process's devices)."""
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_eval_mesh: no devices given")
    # Auto axes, like genjax.mesh: inside shard_map every axis is manual anyway.
    return Mesh(np.array(devices), (AXIS,))


def evaluate(
    sum_fn: SumFn, params: Any, batches: Iterable[Batch], *, mesh: Mesh | None = None
) -> dict[str, float]:
    """Sums of `sum_fn` over all `batches`, each split across the mesh's devices.

    Returns this process's totals: with several processes, each evaluates the
    batches it is given (give every process the same ones, or add the totals up).
    """
    mesh = make_eval_mesh() if mesh is None else mesh
    step = _sharded_sum(sum_fn, mesh)
    params = _replicate(params, mesh)
    batch_sharding = NamedSharding(mesh, PartitionSpec(AXIS))
    rows, outputs = 0, []
    for i, batch in enumerate(batches):
        size = _leading_size(batch, i)
        if size == 0:
            continue
        rows = max(rows, -(-size // mesh.size) * mesh.size)  # round up to whole devices
        padded = pad_batch(batch, rows)
        outputs.append(step(params, jax.device_put(padded, batch_sharding)))
        # Two batches in flight: the devices never wait on the host, and queued
        # inputs cannot pile up in device memory.
        if len(outputs) > _IN_FLIGHT:
            jax.block_until_ready(outputs[-_IN_FLIGHT - 1])
    return _host_totals(outputs)


def evaluate_single_device(
    sum_fn: SumFn, params: Any, batches: Iterable[Batch]
) -> dict[str, float]:
    """The reference: the same sums with `sum_fn` jitted on one device, no sharding."""
    device = jax.local_devices()[0]
    step = _jitted(sum_fn)
    params = jax.device_put(gather_to_host(params), device)
    outputs = []
    for i, batch in enumerate(batches):
        if _leading_size(batch, i):
            outputs.append(step(params, jax.device_put(dict(batch), device)))
    return _host_totals(outputs)


def pad_batch(batch: Batch, rows: int) -> dict[str, np.ndarray]:
    """`batch` grown to `rows` rows by repeating its last row, with zero mask there."""
    size = _leading_size(batch, 0)
    if rows < size:
        raise ValueError(f"pad_batch: cannot pad {size} rows down to {rows}")
    if rows == size:
        return dict(batch)
    out = {k: _pad_edge(np.asarray(v), rows) for k, v in batch.items() if k != "mask"}
    mask = np.asarray(batch["mask"]) if "mask" in batch else np.ones((size,), np.float32)
    out["mask"] = np.concatenate([mask, np.zeros((rows - size, *mask.shape[1:]), mask.dtype)])
    return out


# ----------------------------------------------------------------------------- internals


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _sharded_sum(sum_fn: SumFn, mesh: Mesh) -> Callable:
    """jit(shard_map(sum_fn + psum)), built once per (sum_fn, mesh)."""

    def per_device(params, batch):
        return jax.lax.psum(dict(sum_fn(params, batch)), AXIS)

    mapped = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec(AXIS)),  # params replicated, rows split
        out_specs=PartitionSpec(),  # psum leaves every device with the same totals
    )
    return jax.jit(mapped)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _jitted(sum_fn: SumFn) -> Callable:
    return jax.jit(lambda params, batch: dict(sum_fn(params, batch)))


def _replicate(params: Any, mesh: Mesh) -> Any:
    return jax.device_put(gather_to_host(params), NamedSharding(mesh, PartitionSpec()))


def gather_to_host(params: Any) -> Any:
    # Multi-host train states hold arrays this process cannot read alone; gather
    # them whole first. Fully addressable ones (one process) are left on device.
    leaves = jax.tree.leaves(params)
    if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in leaves):
        return multihost_utils.process_allgather(params, tiled=True)
    return params


def _pad_edge(x: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)])


def _leading_size(batch: Batch, index: int) -> int:
    if not batch:
        raise ValueError(f"evaluate: batch {index} is empty (no arrays)")
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in batch.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(
            f"evaluate: every array of batch {index} needs the same leading (example) axis; "
            f"got leading sizes {sizes}"
        )
    return next(iter(sizes.values()))


def _host_totals(outputs: list[Mapping[str, jax.Array]]) -> dict[str, float]:
    if not outputs:
        raise ValueError("evaluate: no batches to evaluate (the iterable was empty)")
    totals: dict[str, float] = {}
    # float64 on the host: millions of float32 batch sums would otherwise lose digits.
    for out in jax.device_get(outputs):
        for k, v in out.items():
            if np.ndim(v):
                raise ValueError(
                    f"evaluate: sum_fn must return scalars; {k!r} has shape {np.shape(v)}"
                )
            totals[k] = totals.get(k, 0.0) + float(np.asarray(v, np.float64))
    return totals
