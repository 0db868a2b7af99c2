"""A minimal safetensors reader and writer in numpy: data only, never code.

Format (https://huggingface.co/docs/safetensors): an 8-byte little-endian
header length ``n``; ``n`` bytes of JSON ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}``; then the tensors'
raw little-endian bytes, offsets relative to the end of the header.

Hand-written rather than taken from the ``safetensors`` package because it is
~150 lines, keeps the checkpoint path free of torch, and lets us promise two
things: reading validates every offset against the file before touching data
(a truncated or hostile file is a clear error, never a crash or a huge
allocation), and writing is deterministic (sorted names, fixed metadata), so
the same tensors always give the same bytes.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

# safetensors dtype name ↔ numpy dtype (explicitly little-endian where numpy has byte orders).
DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
}
_NAMES = {dtype.newbyteorder("="): name for name, dtype in DTYPES.items()}
_HEADER_LENGTH_BYTES = 8
# The reference implementation's limit: a larger header is a corrupt file, not a model.
MAX_HEADER_BYTES = 100_000_000
# What transformers expects to find in "__metadata__" (it refuses other formats).
DEFAULT_METADATA = {"format": "pt"}


class SafetensorsError(ValueError):
    """A file that is not valid safetensors, or tensors that cannot be written as such."""


def dtype_name(dtype: np.dtype) -> str:
    """The safetensors name of a numpy dtype ("F32", "BF16", ...)."""
    name = _NAMES.get(np.dtype(dtype).newbyteorder("="))
    if name is None:
        raise SafetensorsError(
            f"dtype {np.dtype(dtype)} is not supported; supported: {', '.join(DTYPES)}"
        )
    return name


# ----------------------------------------------------------------------------- writing


def _layout(tensors: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """Header entries in sorted-name order, tensors back to back."""
    header, offset = {}, 0
    for name in sorted(tensors):
        array = tensors[name]
        size = array.size * array.dtype.itemsize
        header[name] = {
            "dtype": dtype_name(array.dtype),
            "shape": list(array.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    return header


def _encode_header(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """Length prefix + JSON header, space-padded to 8 bytes so the data is aligned."""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SafetensorsError(f"__metadata__ must map strings to strings, got {dict(metadata)}")
    header = {"__metadata__": dict(sorted(metadata.items())), **_layout(tensors)}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def save(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] = DEFAULT_METADATA,
) -> None:
    """Writes ``tensors`` to ``path``; the same tensors and metadata give the same bytes.

    Written to a temporary name and renamed, so a crash never leaves half a file.
    """
    if "__metadata__" in tensors:
        raise SafetensorsError("'__metadata__' is reserved and cannot name a tensor")
    arrays = {name: np.asarray(array) for name, array in tensors.items()}
    for name, array in arrays.items():
        if not isinstance(name, str):
            raise SafetensorsError(f"tensor names must be strings, got {name!r}")
        dtype_name(array.dtype)  # fails early, naming the dtype
    header = _encode_header(arrays, metadata)  # bad metadata fails before any file exists
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        for name in sorted(arrays):
            array = arrays[name]
            little = array.astype(array.dtype.newbyteorder("<"), copy=False)
            f.write(np.ascontiguousarray(little).tobytes())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- reading


def _check_entry(
    name: str, entry, data_size: int, where: str
) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, every field checked."""
    where = f"{where}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsError(
            f"{where}: header entry must have exactly dtype, shape and data_offsets, got {entry!r}"
        )
    if not isinstance(entry["dtype"], str) or entry["dtype"] not in DTYPES:
        raise SafetensorsError(
            f"{where}: dtype {entry['dtype']!r} is not supported (supported: {', '.join(DTYPES)})"
        )
    dtype, shape, offsets = DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise SafetensorsError(f"{where}: bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise SafetensorsError(f"{where}: bad data_offsets {offsets!r}")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise SafetensorsError(
            f"{where}: data_offsets [{begin}, {end}] point outside the "
            f"{data_size} data bytes of the file (truncated or corrupt file?)"
        )
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise SafetensorsError(
            f"{where}: {entry['dtype']} {tuple(shape)} needs {expected} bytes, "
            f"but data_offsets [{begin}, {end}] hold {end - begin}"
        )
    return dtype, tuple(shape), begin, end


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _read_header(f, file_size: int, where: str) -> tuple[dict, dict[str, str], int]:
    """(tensor entries, metadata, offset of the data) from an open file, bounds-checked."""
    if file_size < _HEADER_LENGTH_BYTES:
        raise SafetensorsError(
            f"{where}: {file_size} bytes is too short for a safetensors file (truncated?)"
        )
    (length,) = struct.unpack("<Q", f.read(_HEADER_LENGTH_BYTES))
    if length > MAX_HEADER_BYTES:
        raise SafetensorsError(
            f"{where}: header length {length} exceeds the format's {MAX_HEADER_BYTES}-byte "
            "limit (not a safetensors file?)"
        )
    if length > file_size - _HEADER_LENGTH_BYTES:
        raise SafetensorsError(
            f"{where}: header length {length} points past the end of the "
            f"{file_size}-byte file (truncated, or not a safetensors file)"
        )
    text = f.read(length)
    if not text.lstrip().startswith(b"{"):  # nor a nesting deep enough to exhaust the stack
        raise SafetensorsError(f"{where}: header is not valid JSON: one JSON object expected")
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SafetensorsError(f"{where}: header is not valid JSON: {e}") from None
    except _DuplicateKey as e:
        raise SafetensorsError(f"{where}: header names {e} twice") from None
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{where}: __metadata__ must map strings to strings")
    return header, metadata, _HEADER_LENGTH_BYTES + length


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        raise _DuplicateKey(repr(next(k for k in keys if keys.count(k) > 1)))
    return dict(pairs)


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, as numpy arrays in the file's dtypes.

    The header is fully validated (dtypes, shapes, offsets within the file and
    matching the sizes, no gaps or overlaps) before any tensor is read.
    """
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        header, _, data_start = _read_header(f, file_size, str(path))
        data_size = file_size - data_start
        entries = {name: _check_entry(name, e, data_size, str(path)) for name, e in header.items()}
        _check_coverage(entries, data_size, str(path))
        tensors = {}
        for name, (dtype, shape, begin, end) in entries.items():
            f.seek(data_start + begin)
            tensors[name] = np.frombuffer(f.read(end - begin), dtype).reshape(shape)
    return tensors


def _check_coverage(entries: dict, data_size: int, where: str) -> None:
    """Tensors tile the data section exactly, as the format requires: a gap or an
    overlap means a corrupt file (and an overlap could alias two tensors)."""
    cursor = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != cursor:
            raise SafetensorsError(
                f"{where}: tensor {name!r} starts at data byte {begin}, expected {cursor} "
                "(tensors overlap or leave a gap)"
            )
        cursor = end
    if cursor != data_size:
        raise SafetensorsError(
            f"{where}: tensors end at data byte {cursor} but the file has {data_size} "
            "(trailing bytes)"
        )
