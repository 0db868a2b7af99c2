"""The weights and settings decoding runs with; what it does differently on a CPU.

``DecodingWeights`` keeps a model's weights in the layout each call wants: per
layer (``kv_cache.split_layers``), and on a CPU, for single prompts, as
``ColumnBlocks``. The CPU mechanisms here are off the model's readable path,
each kept for its measured gain: each was switched off alone in one run of
the cpu-small decoding benchmark (``experiments/benchmarks/lm_decode_speed.py``: prompt 32,
224 new tokens, greedy, 2-core CPU, 2026-12-02, two rounds, RESULTS.md):

- ``ColumnBlocks`` (single prompts): 731 → 543 new tokens/s at batch 1 without.
- Cache blocks (``auto_cache_block``, read by ``kv_cache.cached_attention``):
  1,537 → 1,236 new tokens/s at batch 16 without.
- ``CPU_COMPILE_OPTIONS``: peak RSS 521 → 636 MB without.
- ``release_free_heap`` after a compile: the rows that follow one hold 13-17% less
  (batch 1 top-p 354 vs 415 MB, batch 16 top-p 474 vs 534; the process's peak,
  reached while compiling, 5%).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import itertools
import math
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from genjax import mesh as meshlib
from genjax.models import transformer
from genjax.sampling import kv_cache

# ----------------------------------------------------------------------------- column blocks


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["w_SIO"], meta_fields=["shapes", "in_dims"]
)
@dataclasses.dataclass(frozen=True)
class ColumnBlocks:
    """Projection weights of one input, side by side, stored as S blocks of
    their output columns: ``w_SIO`` [S, I, O/S], I the ``in_dims`` leading axes
    flattened and O all the weights' remaining axes, flattened and joined.

    For one row (a decoding step at batch 1) XLA:CPU runs ``x @ w`` on one
    thread; as a dot batched over the blocks it runs on all cores (cpu-small,
    the weight matmuls of a batch-1 step, 2-core CPU: 1.9 ms as plain matmuls,
    1.1 ms in two blocks, torch 1.2 ms), and joining q/k/v and gate/up saves a
    dot each. From two rows on the batched dot is slower than the plain one.
    The model's layers take it through ``nn.layers.projections``.
    """

    w_SIO: jax.Array
    shapes: tuple[tuple[int, ...], ...]  # of the plain weights, in order
    in_dims: int

    @classmethod
    def of(cls, ws: Sequence[jax.Array], in_dims: int, blocks: int) -> ColumnBlocks:
        w_IO = jnp.concatenate([w.reshape(math.prod(w.shape[:in_dims]), -1) for w in ws], axis=1)
        if w_IO.shape[1] % blocks:
            raise ValueError(f"{w_IO.shape[1]} output columns do not split into {blocks} blocks")
        w_SIO = w_IO.reshape(w_IO.shape[0], blocks, -1).transpose(1, 0, 2)
        return cls(w_SIO, tuple(w.shape for w in ws), in_dims)

    def _split(self, y_MO: jax.Array) -> list[jax.Array]:
        widths = [math.prod(shape[self.in_dims :]) for shape in self.shapes]
        return jnp.split(y_MO, list(itertools.accumulate(widths))[:-1], axis=-1)

    def merged(self) -> list[jax.Array]:
        """The plain weights."""
        w_IO = self.w_SIO.transpose(1, 0, 2).reshape(self.w_SIO.shape[1], -1)
        return [w.reshape(shape) for w, shape in zip(self._split(w_IO), self.shapes, strict=True)]

    def project(self, x: jax.Array) -> list[jax.Array]:
        """``x`` times each weight: one dot batched over the blocks."""
        lead = x.shape[: x.ndim - self.in_dims]
        x_MI = x.reshape(-1, self.w_SIO.shape[1])
        x_SMI = jnp.broadcast_to(x_MI, (self.w_SIO.shape[0], *x_MI.shape))
        y_SMO = jnp.einsum("SMI,SIO->SMO", x_SMI, self.w_SIO.astype(x.dtype))
        y_MO = y_SMO.transpose(1, 0, 2).reshape(x_MI.shape[0], -1)
        return [
            y.reshape(*lead, *shape[self.in_dims :])
            for y, shape in zip(self._split(y_MO), self.shapes, strict=True)
        ]

    def __getitem__(self, index):
        return self  # read as a parameter's value (``param[...]``) by the layers


@functools.partial(jax.tree_util.register_dataclass, data_fields=[], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Joined:
    """Stands for a weight whose columns the group's first weight holds (``ColumnBlocks``)."""

    def __getitem__(self, index):
        return self


# Projections of one input that ``ColumnBlocks`` join: (module, weights, in_dims).
_COLUMN_GROUPS = [
    ("attn", ("wq_DNK", "wk_DGK", "wv_DGK"), 1),
    ("attn", ("wo_NKD",), 2),
    ("mlp", ("w_gate_DF", "w_up_DF"), 1),
    ("mlp", ("w_down_FD",), 1),
]


def layer_with_column_blocks(layer: dict, column_blocks: int) -> dict:
    """One layer of the ``kv_cache.split_layers`` layout with each projection group
    as ``ColumnBlocks`` of that many blocks (1: plain weights). Takes either layout."""
    layer = {k: dict(v) if isinstance(v, dict) else v for k, v in layer.items()}
    for module, names, in_dims in _COLUMN_GROUPS:
        weights = layer[module]
        first = weights[names[0]]
        ws = first.merged() if isinstance(first, ColumnBlocks) else [weights[n] for n in names]
        if column_blocks == 1:
            weights.update(zip(names, ws, strict=True))
        else:
            weights[names[0]] = ColumnBlocks.of(ws, in_dims, column_blocks)
            weights.update({name: Joined() for name in names[1:]})
    return layer


def head_with_column_blocks(head_DV, column_blocks: int):
    """The output projection in ``column_blocks`` blocks (1: plain). Takes either layout."""
    if isinstance(head_DV, ColumnBlocks):
        head_DV = head_DV.merged()[0]
    return head_DV if column_blocks == 1 else ColumnBlocks.of([head_DV], 1, column_blocks)


def with_column_blocks(params: dict, column_blocks: int) -> dict:
    """The ``split_layers`` layout with every projection in ``column_blocks`` blocks."""
    return {
        **params,
        "blocks": [layer_with_column_blocks(layer, column_blocks) for layer in params["blocks"]],
        "head_DV": head_with_column_blocks(params["head_DV"], column_blocks),
    }


def auto_column_blocks(cfg: transformer.Config) -> int:
    """One block of projection columns per CPU core on a CPU; 1 on accelerators.

    The count must divide every projection's output columns; measured on 2
    cores only.
    """
    if jax.default_backend() != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    D, F, V, K = cfg.d_model, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    columns = math.gcd(D, F, V, (cfg.num_heads + 2 * cfg.num_kv_heads) * K)
    return max(b for b in range(1, (cores or 1) + 1) if columns % b == 0)


# ----------------------------------------------------------------------------- cache blocks

# "auto" blocks a cache of at least this many bytes (all layers, keys and values).
_BLOCKED_CACHE_BYTES = 32 << 20


def auto_cache_block(cfg: transformer.Config, batch: int, slots: int) -> int | None:
    """The cache block for a request: two halves on a CPU when the cache is large.

    Reading only the filled blocks saves memory traffic at every step, but
    each block count is one more attention program per layer to compile.
    Measured on cpu-small at batch 16 with 256 slots (a 75 MB cache, 2-core
    CPU): one block 1,233 new tokens/s and 1.7 s of compile; halves 1,438
    and 2.6 s; blocks of 64 1,498 and 4.6 s. Halves take most of the gain
    for a third of the compile. At batch 1 (9 MB) the saving is within noise.
    Accelerators keep one block: XLA:GPU reads a conditional's branch index
    back to the host, a sync at every layer.
    """
    if jax.default_backend() != "cpu":
        return None
    itemsize = jnp.dtype(cfg.dtype).itemsize
    cache_bytes = 2 * cfg.num_layers * batch * slots * cfg.num_kv_heads * cfg.head_dim * itemsize
    return -(-slots // 2) if cache_bytes >= _BLOCKED_CACHE_BYTES else None


# ----------------------------------------------------------------------------- compile options

# XLA:CPU compile options of the decoding programs. The MLIR fusion emitters
# (XLA's default) take most of a decoding loop's compile memory (cpu-small, peak
# RSS while compiling: batch 1 +184 MB with them against +57 without, batch 16
# +165 against +77) and gain little at decoding shapes; without them the
# compile takes longer (batch 1 2.5 -> 2.8 s, batch 16 2.9 -> 4.4 s).
CPU_COMPILE_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


@functools.cache
def options_supported(options: tuple[tuple[str, object], ...]) -> bool:
    """Whether this jaxlib's compiler takes ``options`` (a name it lacks is an error)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options))(np.int32(0))
    except jax.errors.JaxRuntimeError as e:
        if "No such compile option" in str(e):
            return False
        raise
    return True


def auto_compile_options() -> dict[str, object]:
    """``CPU_COMPILE_OPTIONS`` on a CPU (where this jaxlib knows them); none elsewhere."""
    if jax.default_backend() != "cpu":
        return {}
    supported = options_supported(tuple(sorted(CPU_COMPILE_OPTIONS.items())))
    return dict(CPU_COMPILE_OPTIONS) if supported else {}


def compile_options(choice: dict[str, object] | str) -> tuple[tuple[str, object], ...]:
    """XLA compile options as a hashable tuple: "auto" is ``auto_compile_options``,
    {} XLA's defaults; an option this jaxlib does not know is refused here."""
    if choice == "auto":
        choice = auto_compile_options()
    elif not isinstance(choice, dict):
        raise ValueError(f"compile_options={choice!r}: pass a dict or 'auto'")
    options = tuple(sorted(choice.items()))
    if options and not options_supported(options):
        raise ValueError(
            f"compile_options={choice!r}: this jaxlib's XLA does not know one of these "
            "options (names are XLA DebugOptions fields, e.g. xla_cpu_use_fusion_emitters)"
        )
    return options


# ----------------------------------------------------------------------------- the heap


def _find_malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library lacks it (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()
# Call signatures the decoding programs have compiled, across Decoders (the jit cache is too).
_COMPILED: set[tuple] = set()


def release_free_heap() -> None:
    """Hands the C heap's free pages back to the OS (glibc's ``malloc_trim``; else nothing).

    Compiling a decoding program and laying the weights out again free large
    transients, which glibc keeps mapped in the process: later calls then peak
    on top of them. 15-25 ms, after a compile of seconds.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def release_heap_after_compile(signature: tuple, relaid_out: bool) -> None:
    """``release_free_heap`` after a decoding call that compiled (a ``signature`` not
    seen before) or laid the weights out again; never on a repeated call."""
    if signature not in _COMPILED or relaid_out:
        _COMPILED.add(signature)
        release_free_heap()


# ----------------------------------------------------------------------------- the weights

_decoding_layout = jax.jit(
    lambda params, blocks: with_column_blocks(kv_cache.split_layers(params), blocks),
    static_argnums=1,
)
_relayout_layer = jax.jit(layer_with_column_blocks, static_argnums=1)
_relayout_head = jax.jit(head_with_column_blocks, static_argnums=1)


class DecodingWeights:
    """A model's weights in the layout each decoding call wants, and where it runs.

    The stacked block weights are cut into one buffer per layer once (a copy:
    drop the training parameters if memory is tight). ``column_blocks`` > 1
    stores the projections as that many ``ColumnBlocks`` for calls of one
    prompt, on the mesh's first device; several prompts use the plain layout,
    sharded over the mesh as ``transformer.param_axes`` says. The layout follows
    the calls: a call of several prompts after one of a single prompt (or the
    reverse) first lays the weights out again, a layer at a time. So on a CPU
    split into devices (``jax_num_cpu_devices``), a ``tensor=2`` mesh serves
    batches in parallel over the devices and single prompts on one device's cores.
    """

    def __init__(self, cfg: transformer.Config, params, mesh, column_blocks: int):
        self.cfg, self.mesh, self.column_blocks = cfg, mesh, column_blocks
        self.multi_device = mesh is not None and mesh.size > 1
        # Without devices to move between, the first layout is the single prompt's.
        self.layout = 1 if self.multi_device else column_blocks
        with self.context(batch=2):
            self.params = _decoding_layout(params, self.layout)

    def sharded(self, batch: int) -> bool:
        """Whether a call of ``batch`` prompts runs on the mesh (else on one device)."""
        return self.multi_device and not (batch == 1 and self.column_blocks > 1)

    def context(self, batch: int):
        """The mesh context a call of ``batch`` prompts runs in."""
        return jax.set_mesh(self.mesh) if self.sharded(batch) else contextlib.nullcontext()

    def for_batch(self, batch: int) -> dict:
        """The weights laid out for a call of ``batch`` prompts."""
        layout = self.column_blocks if batch == 1 else 1
        if layout != self.layout:
            self._relayout(layout, self._placement(batch))
        return self.params

    def _placement(self, batch: int):
        """``place(key, layer=None)``: where each weight of the new layout goes."""
        if not self.multi_device:  # the layout changes, the place does not
            return lambda key, i=None: None
        if self.sharded(batch):  # back onto the mesh, as param_axes shards them
            plain = jax.eval_shape(kv_cache.split_layers, transformer.abstract_params(self.cfg))
            axes = kv_cache.split_layers_axes(self.cfg)
            shardings = meshlib.tree_shardings(axes, plain, self.mesh, transformer.RULES)
            return lambda key, i=None: shardings[key] if i is None else shardings[key][i]
        device = jax.sharding.SingleDeviceSharding(self.mesh.devices.flat[0])
        return lambda key, i=None: device  # off the mesh, onto its first device

    def _relayout(self, layout: int, place) -> None:
        put = lambda x, to: x if to is None else jax.device_put(x, to)
        layers = self.params["blocks"]
        for i in range(len(layers)):  # a layer at a time: each old one is freed as we go
            layers[i] = put(_relayout_layer(layers[i], layout), place("blocks", i))
        self.params["head_DV"] = put(
            _relayout_head(self.params["head_DV"], layout), place("head_DV")
        )
        for key in self.params.keys() - {"blocks", "head_DV"}:
            self.params[key] = put(self.params[key], place(key))
        self.layout = layout
