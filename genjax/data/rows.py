"""Batches of rows of arrays held in memory: the input pipeline of the generating
families (2-D points, images, a VAE's latents).

One global stream of batches, shuffled afresh every epoch and repeated endlessly;
process i of n takes batches i, i + n, i + 2n, … The iterator is grain's, so a
checkpoint stores its position (``get_state`` / ``set_state``) and a resumed run
reads on where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grain
import jax
import numpy as np

Batch = dict[str, np.ndarray]


def _spread(seed: int) -> int:
    """A seed for grain's shuffle far from the one of seed ± 1 (they count epochs up)."""
    return int(np.random.SeedSequence(seed).generate_state(1)[0] >> 1)


def row_batches(
    arrays: Batch,
    global_batch_size: int,
    *,
    seed: int,
    transform: Callable[[Batch, np.random.Generator], Batch] | None = None,
) -> Iterator[Batch]:
    """This process's share of batches of rows of ``arrays`` (all with one leading axis
    of N rows), ``global_batch_size / processes`` rows each. ``transform(batch, rng)``
    maps each batch with a generator seeded by the batch's global index, so every
    process and every resumed run draws the same randomness for it."""
    n, i = jax.process_count(), jax.process_index()
    rows = {len(v) for v in arrays.values()}
    if len(rows) != 1:
        raise ValueError(f"arrays differ in their number of rows: {sorted(rows)}")
    num_rows = rows.pop()
    if not 1 <= global_batch_size <= num_rows:
        raise ValueError(
            f"global_batch_size={global_batch_size}; expected 1..{num_rows}, the number of "
            "training examples"
        )
    if global_batch_size % n:
        raise ValueError(
            f"global_batch_size={global_batch_size} does not divide over {n} processes"
        )
    # ShuffleMapDataset seeds index k's permutation with seed + k // N, and
    # repeat() keeps that epoch number (reseed_each_epoch=True), so every epoch
    # is a fresh permutation (grain 0.2.18, transformations/shuffle.py). Given the
    # seed itself, seed s's epoch e + 1 would be seed s + 1's epoch e: a sweep over
    # data.seed = 0, 1, 2 would read one order, shifted by an epoch.
    ds = grain.MapDataset.range(num_rows).shuffle(seed=_spread(seed)).repeat()
    ds = ds.batch(global_batch_size // n).map(lambda index_b: _take(arrays, index_b))
    if transform is not None:  # before the split over processes: seeded by the global index
        ds = ds.random_map(transform, seed=seed)
    return iter(ds[i::n].to_iter_dataset(grain.ReadOptions(num_threads=0)))


def _take(arrays: Batch, index_b: np.ndarray) -> Batch:
    return {name: array[index_b] for name, array in arrays.items()}
