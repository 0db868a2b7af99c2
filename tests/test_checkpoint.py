"""Checkpointer: sharded round trip, cadence, corrupt/incomplete steps, config checks."""

import asyncio
import gc
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorstore
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from genjax import checkpoint
from genjax.checkpoint import Checkpointer, ConfigMismatchError

# A restore that fails on one tensorstore read leaves other reads in flight; their
# callbacks land on orbax's already-closed event loop (harmless, reported as unraisable).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CONFIG = {
    "model": {"d_model": 384, "mlp": {"hidden": [64, 64]}},
    "train": {"steps": 100, "lr": 1e-3},
    "data": {"batch": 4},
}


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    params: dict
    opt_state: Any
    rng: jax.Array  # uint32 key data


@pytest.fixture(scope="module")
def mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((8,), ("fsdp",))


def make_state(mesh: jax.sharding.Mesh, step: int) -> TrainState:
    """A small train state whose values depend on `step`; w is sharded over fsdp."""
    w_DF = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8) + step
    params = {
        "dense": {
            "w": jax.device_put(w_DF, NamedSharding(mesh, P("fsdp", None))),
            "b": jax.device_put(jnp.full((8,), step, jnp.float32), NamedSharding(mesh, P())),
        }
    }
    replicated = NamedSharding(mesh, P())
    return TrainState(
        step=jax.device_put(jnp.int32(step), replicated),
        params=params,
        opt_state=optax.adam(1e-3).init(params),
        rng=jax.device_put(jax.random.key_data(jax.random.key(step)), replicated),
    )


def abstract(state: TrainState) -> TrainState:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def make_iterator(advance: int = 0) -> grain.DatasetIterator:
    it = grain.MapDataset.range(64).shuffle(seed=0).batch(4).to_iter_dataset().__iter__()
    for _ in range(advance):
        next(it)
    return it


def take(it: grain.DatasetIterator, n: int) -> list[np.ndarray]:
    return [np.asarray(next(it)) for _ in range(n)]


def assert_tree_equal(a: Any, b: Any) -> None:
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def save_steps(directory: Path, mesh: jax.sharding.Mesh, steps: list[int]) -> None:
    """Saves make_state(step) with the iterator advanced `step` batches, for each step."""
    with Checkpointer(directory, config=CONFIG, keep=10) as ckpt:
        for step in steps:
            assert ckpt.save(step, make_state(mesh, step), make_iterator(step), force=True)


def test_round_trip_sharded_state_and_iterator(tmp_path, mesh):
    state, it = make_state(mesh, 5), make_iterator(3)
    expected = jax.device_get(state)
    ckpt = Checkpointer(tmp_path, config=CONFIG)
    assert ckpt.save(5, state, it, force=True)
    # The save must be a snapshot: the loop donates (frees) the state right away.
    jax.tree.map(lambda x: x.delete(), state)
    expected_batches = take(it, 3)
    ckpt.close()

    # Ask for a different layout than was saved: restore must land in it directly.
    target = abstract(make_state(mesh, 0))
    w_sharding = NamedSharding(mesh, P(None, "fsdp"))
    target.params["dense"]["w"] = jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=w_sharding)
    restored_it = make_iterator()
    restored, step = Checkpointer(tmp_path, config=CONFIG).restore(target, restored_it)

    assert step == 5
    assert isinstance(restored, TrainState)
    assert_tree_equal(restored, expected)
    shardings = jax.tree.map(lambda x: x.sharding, restored)
    assert shardings == jax.tree.map(lambda x: x.sharding, target)
    np.testing.assert_array_equal(take(restored_it, 3), expected_batches)


def test_save_every_keep_last_k_and_latest_step(tmp_path, mesh):
    state = make_state(mesh, 0)
    with Checkpointer(tmp_path, config=CONFIG, keep=2, save_every=10) as ckpt:
        assert ckpt.latest_step() is None
        assert [step for step in range(36) if ckpt.should_save(step)] == [0, 10, 20, 30]
        started = [step for step in range(36) if ckpt.save(step, state)]
        assert started == [0, 10, 20, 30]
        assert not ckpt.should_save(30), "step 30 is on disk already"
        assert not ckpt.save(30, state, force=True), "a step on disk is never overwritten"
        # The SIGTERM path: a forced save off the cadence, then wait, is complete.
        assert ckpt.save(33, state, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [30, 33]
        assert ckpt.latest_step() == 33
    assert sorted(os.listdir(tmp_path)) == ["30", "33"]
    assert Checkpointer(tmp_path, config=CONFIG).latest_step() == 33


def test_without_save_every_only_forced_saves_happen(tmp_path, mesh):
    with Checkpointer(tmp_path, config=CONFIG) as ckpt:
        assert not any(ckpt.save(step, make_state(mesh, step)) for step in range(5))
        assert ckpt.save(4, make_state(mesh, 4), force=True)
    assert Checkpointer(tmp_path, config=CONFIG).all_steps() == [4]


def _garbage_array_files(step_dir: Path) -> None:
    for f in (step_dir / "state").rglob("d/*"):
        f.write_bytes(os.urandom(f.stat().st_size))


def _truncate_array_files(step_dir: Path) -> None:
    for f in (step_dir / "state").rglob("d/*"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _delete_state_item(step_dir: Path) -> None:
    shutil.rmtree(step_dir / "state")


def _garbage_config(step_dir: Path) -> None:
    (step_dir / "config" / "metadata").write_text("{not json")


def _delete_iterator_state(step_dir: Path) -> None:
    for f in (step_dir / "data").glob("process_*.json"):
        f.unlink()


@pytest.mark.parametrize(
    "corrupt",
    [
        _garbage_array_files,
        _truncate_array_files,
        _delete_state_item,
        _garbage_config,
        _delete_iterator_state,
    ],
)
def test_corrupt_newest_step_falls_back_to_previous(tmp_path, mesh, corrupt):
    save_steps(tmp_path, mesh, [1, 2])
    corrupt(tmp_path / "2")
    ckpt = Checkpointer(tmp_path, config=CONFIG, save_every=2)
    it = make_iterator()
    with pytest.warns(
        UserWarning, match=r"skipped checkpoint step 2 \(.+\) in .*: restored step 1$"
    ):
        state, step = ckpt.restore(abstract(make_state(mesh, 0)), it)
    assert step == 1
    assert_tree_equal(state, make_state(mesh, 1))
    np.testing.assert_array_equal(take(it, 2), take(make_iterator(1), 2))

    # Reaching step 2 again replaces the corrupt step instead of keeping it.
    assert ckpt.should_save(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, when it was skipped
        assert ckpt.save(2, make_state(mesh, 2), it)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state, step = ckpt.restore(abstract(make_state(mesh, 0)))
    assert step == 2
    assert_tree_equal(state, make_state(mesh, 2))


@pytest.mark.parametrize("corrupt", [_garbage_array_files, _truncate_array_files])
def test_falling_back_to_a_step_without_a_position_leaves_the_iterator_at_its_start(
    tmp_path, mesh, corrupt
):
    """The failed read of step 8 sets the iterator before its arrays fail; step 0 (a run
    that has read nothing) has no position to set it back."""
    with Checkpointer(tmp_path, config=CONFIG) as ckpt:
        ckpt.save(0, make_state(mesh, 0), force=True)
        ckpt.save(8, make_state(mesh, 8), make_iterator(5), force=True)
    corrupt(tmp_path / "8")
    it = make_iterator()
    with pytest.warns(UserWarning, match=r"skipped checkpoint step 8 .*: restored step 0$"):
        _, step = Checkpointer(tmp_path, config=CONFIG).restore(abstract(make_state(mesh, 0)), it)
    assert step == 0
    np.testing.assert_array_equal(take(it, 2), take(make_iterator(), 2))


def test_no_restorable_step_raises(tmp_path, mesh):
    save_steps(tmp_path, mesh, [1])
    _garbage_array_files(tmp_path / "1")
    ckpt = Checkpointer(tmp_path, config=CONFIG)
    with pytest.raises(RuntimeError, match=rf"no checkpoint in {tmp_path} could be restored") as e:
        ckpt.restore(abstract(make_state(mesh, 0)))
    assert "step 1: " in str(e.value)


def test_processes_that_list_different_steps_refuse_before_reading(tmp_path, mesh, monkeypatch):
    """Another process of the run listed other steps (a job still writing there): they
    would try, and could restore, different steps."""
    save_steps(tmp_path, mesh, [1, 2])
    ckpt = Checkpointer(tmp_path, config=CONFIG)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    gathered = []

    def allgather(x):  # process 1's fingerprint of its listing differs from ours
        gathered.append(x)
        return np.array([x, x + 1])

    monkeypatch.setattr(checkpoint.multihost_utils, "process_allgather", allgather)
    with pytest.raises(checkpoint.CheckpointError, match=r"list different checkpoint steps"):
        ckpt.restore(abstract(make_state(mesh, 0)))
    assert len(gathered) == 1  # refused before any step was read


def _drop_with_unretrieved_error(error: Exception) -> None:
    """A failed future nobody awaited, collected: asyncio logs it as an error."""
    loop = asyncio.new_event_loop()
    future = loop.create_future()
    future.set_exception(error)
    loop.close()
    del future
    gc.collect()


def test_reads_a_skipped_step_left_unawaited_are_not_reported(tmp_path, mesh, caplog):
    """Sibling reads of a skipped step can fail after orbax stopped awaiting them;
    asyncio would print each one's traceback when it is collected."""
    save_steps(tmp_path, mesh, [1, 2])
    _garbage_array_files(tmp_path / "2")
    with pytest.warns(UserWarning, match="skipped checkpoint step 2"):
        Checkpointer(tmp_path, config=CONFIG).restore(abstract(make_state(mesh, 0)))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ".zarray").write_text("garbage")
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "bad")}}
    with pytest.raises(ValueError) as read_failure:
        tensorstore.open(spec).result()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _drop_with_unretrieved_error(read_failure.value)
        assert caplog.records == []
        _drop_with_unretrieved_error(ValueError("not a checkpoint read"))  # still reported
        assert [r.exc_info[1].args for r in caplog.records] == [("not a checkpoint read",)]


class _Suspend:
    def __await__(self):
        yield


async def _read_array_index_and_device_put():  # named as orbax's read of one array
    try:
        await _Suspend()
    finally:
        raise Exception("Encountered error while reading array index: (slice(0, 2, 1),)")


async def _another_coroutine():
    try:
        await _Suspend()
    finally:
        raise Exception("Encountered error while reading array index: not orbax's")


def test_a_read_collected_with_its_failure_is_known_as_left_in_flight(monkeypatch):
    """A read that failed after orbax stopped awaiting it is reported ("Exception ignored
    in: <coroutine ...>") when its coroutine is collected: dropped, and only that."""
    reports = []
    monkeypatch.setattr(sys, "unraisablehook", reports.append)
    for read in (_read_array_index_and_device_put, _another_coroutine):
        suspended = read()
        suspended.send(None)
        del suspended
        gc.collect()
    assert [checkpoint._left_in_flight(r) for r in reports] == [True, False]


def test_incomplete_save_is_ignored(tmp_path, mesh):
    save_steps(tmp_path, mesh, [1])
    # What a save killed mid-write leaves: orbax writes <step>.orbax-checkpoint-tmp
    # and renames it to <step> only once every item is written.
    tmp_dir = tmp_path / "2.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "1", tmp_dir)
    ckpt = Checkpointer(tmp_path, config=CONFIG)
    assert ckpt.latest_step() == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state, step = ckpt.restore(abstract(make_state(mesh, 0)))
    assert step == 1
    assert_tree_equal(state, make_state(mesh, 1))
    # The leftover does not block saving that step later.
    assert ckpt.save(2, make_state(mesh, 2), force=True)
    ckpt.close()
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_config_mismatch_is_reported_before_any_tensor_is_read(tmp_path, mesh):
    save_steps(tmp_path, mesh, [1])
    # The state item is unreadable, so reaching it would warn, not raise a mismatch.
    _garbage_array_files(tmp_path / "1")
    config = {**CONFIG, "model": {"d_model": 128, "mlp": {"hidden": [64, 64]}, "n_layers": 2}}
    ckpt = Checkpointer(tmp_path, config=config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConfigMismatchError) as info:
            ckpt.restore(abstract(make_state(mesh, 0)))
    message = str(info.value)
    assert "model.d_model: checkpoint 384, this run 128" in message
    assert "model.n_layers: checkpoint <missing>, this run 2" in message
    assert "mlp" not in message and "--workdir" in message


def test_config_difference_outside_compared_keys_is_allowed(tmp_path, mesh):
    save_steps(tmp_path, mesh, [1])
    # Tuples come back from JSON as lists; that is not a difference.
    config = {**CONFIG, "model": {"d_model": 384, "mlp": {"hidden": (64, 64)}}}
    config["train"] = {**CONFIG["train"], "steps": 500}
    ckpt = Checkpointer(tmp_path, config=config)
    _, step = ckpt.restore(abstract(make_state(mesh, 0)))
    assert step == 1
    assert ckpt.saved_config()["train"]["steps"] == 100


def test_no_checkpoint_returns_none(tmp_path, mesh):
    ckpt = Checkpointer(tmp_path / "fresh", config=CONFIG)
    assert ckpt.latest_step() is None
    assert ckpt.saved_config() is None
    assert ckpt.restore(abstract(make_state(mesh, 0)), make_iterator()) is None


def test_relative_directory_saves_and_restores(tmp_path, mesh, monkeypatch):
    # The README's main job passes a relative --workdir; orbax's async commit needs
    # an absolute path, so a relative one must be resolved up front.
    monkeypatch.chdir(tmp_path)
    state = make_state(mesh, 5)
    with Checkpointer("runs/lm/checkpoints", config=CONFIG, save_every=5) as ckpt:
        assert ckpt.save(5, state)
        ckpt.wait()
    with Checkpointer("runs/lm/checkpoints", config=CONFIG) as ckpt:
        restored, step = ckpt.restore(abstract(state))
    assert step == 5
    assert_tree_equal(restored, state)


def test_a_reader_leaves_a_save_in_progress_alone(tmp_path, mesh):
    save_steps(tmp_path, mesh, [1])
    in_progress = tmp_path / "2.orbax-checkpoint-tmp"  # a training run's save, mid-write
    shutil.copytree(tmp_path / "1", in_progress)
    with Checkpointer(tmp_path, config=CONFIG, read_only=True) as reader:
        _, step = reader.restore(abstract(make_state(mesh, 0)))
    assert step == 1 and in_progress.is_dir()
    Checkpointer(tmp_path, config=CONFIG).close()  # a writer cleans it up
    assert not in_progress.exists()
