"""Text pipeline: documents -> one token stream -> packed rows -> grain batches.

Glossary: N rows, L sequence length, B batch (global ``B``, per-process ``B_local``).
A row is ``L + 1`` tokens: the model reads ``row[:-1]`` and predicts ``row[1:]``.

Training order: every epoch is a fresh permutation of the rows (grain reseeds
its shuffle per epoch), cut to whole global batches. Global batch ``s`` is rows
``perm[s*B:(s+1)*B]``; process ``i`` of ``P`` gets the ``i``-th block of
``B/P`` of them, so the processes' blocks concatenated in process order are
exactly the batch one process would see. The iterator is a grain
``DatasetIterator``: ``get_state``/``set_state`` and orbax
``grain.checkpoint.CheckpointSave``/``CheckpointRestore`` resume it exactly.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import socket
from collections.abc import Iterable, Sequence

import grain
import numpy as np

from genjax.data.corpus import expand_paths, read_texts
from genjax.tokenizer import Tokenizer

# Documents encoded per call: bounds the Python int lists alive at once.
_ENCODE_CHUNK = 256


def tokenize_documents(tokenizer: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """One int32 stream: doc0 tokens, eod, doc1 tokens, eod, ..."""
    parts: list[np.ndarray] = []
    eod = np.array([tokenizer.eos_id], np.int32)
    for start in range(0, len(texts), _ENCODE_CHUNK):
        for ids in tokenizer.encode_batch(list(texts[start : start + _ENCODE_CHUNK])):
            parts += [np.asarray(ids, np.int32), eod]
    return np.concatenate(parts) if parts else np.zeros([0], np.int32)


def pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """[N, seq_len + 1] non-overlapping rows of `tokens`; the final partial row is dropped."""
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D stream, got shape {tokens.shape}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n = len(tokens) // (seq_len + 1)
    return tokens[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def _check_rows(rows: np.ndarray) -> None:
    if rows.ndim != 2 or rows.shape[1] < 2:
        raise ValueError(f"rows must be [N, seq_len + 1] with seq_len >= 1, got {rows.shape}")


def _check_processes(batch_size: int, process_index: int, process_count: int) -> int:
    """Returns the per-process batch size."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if batch_size % process_count:
        raise ValueError(
            f"global batch size {batch_size} is not divisible by process_count={process_count}"
        )
    return batch_size // process_count


def _as_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": tokens}


def make_train_iterator(
    rows: np.ndarray,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """Shuffled, per-process batches ``{"tokens": int32 [B_local, L + 1]}``.

    The row stream is one fresh permutation of all N rows per epoch, epochs
    back to back, cut into global batches: no row is dropped or repeated at an
    epoch boundary (a batch may straddle two epochs). ``num_epochs=None``
    repeats forever; a finite stream ends at its last whole global batch.
    """
    _check_rows(rows)
    local_batch_size = _check_processes(global_batch_size, process_index, process_count)
    if len(rows) < global_batch_size:
        raise ValueError(
            f"not enough data for one batch: {len(rows)} rows of {rows.shape[1]} tokens, but "
            f"global_batch_size={global_batch_size} needs {global_batch_size} rows; use a "
            "smaller batch or seq_len, or a bigger corpus"
        )
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    # Shuffle then repeat: grain passes the epoch down the index, so each epoch
    # is a new permutation.
    ds = grain.MapDataset.source(rows).shuffle(seed=seed).repeat(num_epochs)
    if num_epochs is not None:
        ds = ds[: len(ds) // global_batch_size * global_batch_size]  # whole global batches
    # Block c of B_local rows belongs to step c // P on process c % P.
    ds = ds.batch(local_batch_size, drop_remainder=True)[process_index::process_count]
    ds = ds.map(_as_batch)
    # Rows are in memory: a little prefetch overlaps batching with the train step.
    options = read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    return iter(ds.to_iter_dataset(options))


def document_rows(
    tokens: Sequence[int], seq_len: int, eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows that predict every token of one document exactly once, for scoring.

    The document is preceded by the end-of-document token (its beginning, as in
    training); rows of ``seq_len + 1`` tokens overlap by one so each row's targets
    continue where the previous row's stopped. Returns rows ``int32 [N, L+1]``
    and mask ``float32 [N, L]`` (0 on the padding of the last row).
    """
    stream = np.concatenate([[eos_id], np.asarray(tokens, np.int32)]).astype(np.int32)
    n_rows = max(1, -(-(len(stream) - 1) // seq_len))
    rows = np.full((n_rows, seq_len + 1), eos_id, np.int32)
    mask = np.zeros((n_rows, seq_len), np.float32)
    for i in range(n_rows):
        chunk = stream[i * seq_len : i * seq_len + seq_len + 1]
        rows[i, : len(chunk)] = chunk
        mask[i, : len(chunk) - 1] = 1.0
    return rows, mask


def corpus_fingerprint(tokenizer: Tokenizer, files: Iterable[pathlib.Path]) -> str:
    """Hash of the tokenizer model and each file's path and bytes. The bytes, not a size
    and mtime: an edit that keeps both (``cp -p``, ``rsync -t``) is seen, and a copy of
    the corpus on a new machine still finds the cache (the standard library's 12 MB:
    0.06 s here)."""
    h = hashlib.sha256(tokenizer.model_proto)
    for f in files:
        h.update(f"{f.resolve()}\0".encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:20]


def prepare_corpus(
    tokenizer: Tokenizer,
    paths: Iterable[str | os.PathLike],
    *,
    cache_dir: str | os.PathLike,
) -> np.ndarray:
    """Token stream of `paths` (see `tokenize_documents`), cached as ``.npy``.

    The cache key covers the tokenizer and every file's bytes, so an edited corpus or a
    retrained tokenizer re-tokenizes and nothing else does.
    """
    files = expand_paths(paths)
    cache = pathlib.Path(cache_dir) / f"tokens-{corpus_fingerprint(tokenizer, files)}.npy"
    if cache.is_file():
        return np.load(cache)
    tokens = tokenize_documents(tokenizer, [text for _, text in read_texts(files)])
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Unique temp name then rename: concurrent processes may prepare the same corpus.
    tmp = cache.with_name(f"{cache.stem}.{socket.gethostname()}.{os.getpid()}.tmp.npy")
    np.save(tmp, tokens)
    os.replace(tmp, cache)
    return tokens
