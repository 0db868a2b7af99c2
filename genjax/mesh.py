"""Device meshes, logical-axis sharding, and multi-host set-up.

Every parameter is created with logical axis names (``("embed", "mlp")``), and
each model brings its own rules table mapping those names to mesh axes
(``transformer.RULES``). Data parallel, FSDP and tensor parallel are then only
mesh specs over the same code:

    data=8                   pure data parallel
    fsdp=8                   parameters and optimizer state sharded over 8 devices
    tensor=8                 heads / MLP hidden / vocabulary split over 8 devices
    data=2,fsdp=2,tensor=2   all three

Batches are the run layer's, not a model's: their leading axis is always split
over ``BATCH_AXES`` (data and fsdp), so every family's data reaches the devices
the same way.

Meshes use ``AxisType.Auto``: shardings are declared on parameters, batches and
a few activations, and GSPMD propagates the rest. Explicit axes would make every
einsum state its output sharding, which buys nothing for these models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# The mesh axes a batch's leading axis is split over, for every family.
BATCH_AXES = ("data", "fsdp")

# A model's table: logical axis -> mesh axis, several mesh axes, or None (replicated).
Rules = Mapping[str, str | tuple[str, ...] | None]


def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
    """Parses ``"data=2,fsdp=-1"`` into axis sizes; one axis may be -1 (the rest)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen: set[str] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ValueError(
                f"bad mesh spec {spec!r}: {part!r} is not AXIS=SIZE with AXIS one of {MESH_AXES}"
            )
        if name in seen:
            raise ValueError(f"bad mesh spec {spec!r}: axis {name!r} given twice")
        seen.add(name)
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(
                f"bad mesh spec {spec!r}: size of {name!r} is not an integer"
            ) from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise ValueError(f"bad mesh spec {spec!r}: size of {name!r} must be positive or -1")
    wildcards = [n for n, s in sizes.items() if s == -1]
    if len(wildcards) > 1:
        raise ValueError(f"bad mesh spec {spec!r}: only one axis may be -1, got {wildcards}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if wildcards:
        if num_devices % known:
            raise ValueError(
                f"mesh {spec!r} does not divide the {num_devices} devices: the fixed axes "
                f"multiply to {known}, which does not divide {num_devices}"
            )
        sizes[wildcards[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"mesh {spec!r} has {known} devices but {num_devices} are available; make the "
            f"sizes multiply to {num_devices}, or use -1 for one axis (e.g. 'data=-1')"
        )
    return sizes


def make_mesh(spec: str = "data=-1", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if len(devices) == len(jax.devices()):
        # make_mesh orders devices for the physical topology (ICI rings on TPU).
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def split_cpu(num_devices: int) -> None:
    """Makes the host CPU ``num_devices`` XLA devices (``jax_num_cpu_devices``), so a
    mesh over them runs its shards on separate cores: one device ran 16 PPO seeds on
    1.5 of 2 cores, two devices of 8 seeds each on both. It must come before JAX's
    first operation in the process."""
    if num_devices < 1:
        raise ValueError(f"--cpu-devices={num_devices} must be >= 1")
    try:
        jax.config.update("jax_num_cpu_devices", num_devices)
    except RuntimeError:
        raise ValueError("--cpu-devices must be set before JAX starts in this process") from None


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec by ``rules``; a mesh axis is used once."""
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
        target = None if name is None else rules[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ValueError(
                f"rule {name!r} -> {target!r} names mesh axes {unknown}; mesh axes are {MESH_AXES}"
            )
        axes = tuple(a for a in axes if a not in used)  # first use of a mesh axis wins
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _axis_size(mesh: Mesh, entry: str | tuple[str, ...] | None) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh.shape[n] for n in names)


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of logical axes; checks every sharded dim divides evenly."""

    def one(path, axes, shape):
        shape = getattr(shape, "shape", shape)
        if len(axes) != len(shape):
            raise ValueError(f"{jax.tree_util.keystr(path)}: axes {axes} do not match {shape}")
        spec = logical_to_spec(axes, rules)
        for dim, entry, name in zip(shape, spec, axes, strict=False):
            if dim % _axis_size(mesh, entry):
                raise ValueError(
                    f"parameter {jax.tree_util.keystr(path)} of shape {tuple(shape)}: "
                    f"dimension {name!r} = {dim} does not divide over mesh axis {entry} "
                    f"of size {_axis_size(mesh, entry)}; choose sizes that divide, or "
                    f"another mesh"
                )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, axes_tree, shapes_tree, is_leaf=_is_axes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rank: int = 2) -> NamedSharding:
    """Leading (batch) dimension split over ``BATCH_AXES``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *(None,) * (rank - 1)))


def data_parallel_size(mesh: Mesh) -> int:
    return _axis_size(mesh, BATCH_AXES)


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over data-parallel devices and processes."""
    dp = data_parallel_size(mesh)
    if global_batch_size % dp:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the data-parallel "
            f"size {dp} (data × fsdp of mesh {dict(mesh.shape)}); use a multiple of {dp}"
        )
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the "
            f"{jax.process_count()} processes"
        )


def check_process_batch_layout(global_batch_size: int, mesh: Mesh) -> None:
    """Process i must own rows [i·B/P, (i+1)·B/P) of the global batch, since that is
    the block its data pipeline reads; a mesh whose batch axes do not span the
    processes that way (say tensor=-1 across hosts) would silently mix data."""
    local = global_batch_size // jax.process_count()
    start = jax.process_index() * local
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size, 1))
    rows = {i for idx in index_map.values() for i in range(*idx[0].indices(global_batch_size))}
    if rows != set(range(start, start + local)):
        raise ValueError(
            f"mesh {dict(mesh.shape)} gives process {jax.process_index()} batch rows "
            f"{min(rows)}..{max(rows)}, not its block {start}..{start + local - 1}; put the "
            f"data/fsdp axes across processes and tensor within a process"
        )


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows into one global array sharded over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), v)
        for k, v in local_batch.items()
    }


def in_mesh_context() -> bool:
    """Whether code is traced under a genjax mesh (``jax.set_mesh``) and outside any
    shard_map, where sharding constraints and per-shard kernels apply."""
    mesh = jax.sharding.get_abstract_mesh()
    return (
        not mesh.empty
        and set(MESH_AXES) <= set(mesh.axis_names)
        and not any(t == AxisType.Manual for t in mesh.axis_types)
    )


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules) -> jax.Array:
    """Sharding constraint on an activation; a no-op outside a genjax mesh context
    and inside shard_map (manual axes, e.g. evaluation over a 1-D device mesh)."""
    if not in_mesh_context():
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules))


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Joins a multi-process run. With no arguments JAX reads the cluster from the
    environment (TPU VM metadata, SLURM, or JAX_COORDINATOR_ADDRESS etc.)."""
    # CPU collectives across processes go through gloo (no effect on GPU/TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
