"""Corpus discovery and splitting, and the grain text pipeline: packing, shuffling,
per-process sharding, exact resume, evaluation batches, token caching."""

import contextlib
import os
import subprocess
import sys

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genjax.data import text as text_lib
from genjax.data.corpus import read_texts, split_by_module, stdlib_files, stdlib_root
from genjax.data.text import (
    document_rows,
    make_train_iterator,
    pack,
    prepare_corpus,
    tokenize_documents,
)
from genjax.tokenizer import Tokenizer

# ----------------------------------------------------------------------------- corpus


def _touch(root, rel, content="x = 1\n"):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def test_stdlib_files_excludes_tests_and_site_packages():
    files = stdlib_files()
    assert len(files) > 300
    assert files == sorted(files) == stdlib_files()
    root = stdlib_root()
    for f in files:
        assert f.suffix == ".py"
        assert not {"test", "tests", "idle_test", "site-packages"} & set(f.relative_to(root).parts)
    names = {f.relative_to(root).as_posix() for f in files}
    assert {"os.py", "json/decoder.py"} <= names


def test_stdlib_files_on_a_fake_tree(tmp_path):
    for rel in [
        "top.py",
        "pkg/mod.py",
        "pkg/test/t.py",
        "pkg/tests/t.py",
        "idlelib/idle_test/t.py",
        "site-packages/x/y.py",
        "dist-packages/z.py",
        "lib2to3/tests/data/bad.py",
        "notes.txt",
    ]:
        _touch(tmp_path, rel)
    assert stdlib_files(tmp_path) == [tmp_path / "pkg/mod.py", tmp_path / "top.py"]


def test_split_by_module_stdlib():
    files = stdlib_files()
    train, val = split_by_module(files)
    assert (train, val) == split_by_module(files)
    assert train and val
    assert sorted(train + val) == files  # disjoint and complete
    root = stdlib_root()

    def modules(fs):
        return {f.relative_to(root).parts[0].removesuffix(".py") for f in fs}

    assert not modules(train) & modules(val)
    assert len(val) <= 0.02 * len(files)


def test_split_does_not_depend_on_hash_seed():
    code = (
        "from genjax.data.corpus import split_by_module, stdlib_files;"
        "print([str(p) for p in split_by_module(stdlib_files())[1]])"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str([str(p) for p in split_by_module(stdlib_files())[1]])


def test_split_small_tree_keeps_modules_whole(tmp_path):
    files = [_touch(tmp_path, f"m{i}/f{j}.py") for i in range(6) for j in range(i + 1)]
    train, val = split_by_module(files, val_fraction=0.2)
    assert train and val
    assert not {f.parent for f in train} & {f.parent for f in val}
    with pytest.raises(ValueError, match="all 6 files are in module 'm5'"):
        split_by_module(files[-6:], root=tmp_path)
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_module(files, val_fraction=1.0)


def test_a_module_of_empty_files_is_never_the_validation_split(tmp_path):
    """A package passed as the corpus: its bare __init__.py is a module of its own, and
    the one the stable hash ranks first here."""
    init = _touch(tmp_path, "pkg/__init__.py", "")
    files = [init] + [_touch(tmp_path, f"pkg/{m}.py") for m in ("model", "cli", "config")]
    train, val = split_by_module(files, val_fraction=0.02)
    assert val and init not in val and init in train
    _, val_by_name = split_by_module([_touch(tmp_path, "pkg/__init__.py", "x = 1\n"), *files[1:]])
    assert val_by_name == [init]  # the hash's first choice, when it has text


def test_read_texts_is_exact_and_skips_non_utf8_with_one_warning(tmp_path):
    good = {"a.py": "x = 1\r\n\ty = '▁'\n", "b.txt": "héllo", "sub/c.py": "\x00 no newline"}
    for rel, content in good.items():
        _touch(tmp_path, rel, content)
    _touch(tmp_path, "bad1.py", b"\xff\xfe latin-1 \xe9")
    _touch(tmp_path, "sub/bad2.py", b"caf\xe9")
    _touch(tmp_path, "empty.py", "")
    _touch(tmp_path, "ignored.bin", b"\x00\x01")  # directories contribute .py/.txt only
    with pytest.warns(
        UserWarning, match=r"skipped 2 of 6 files that are not valid UTF-8: .*bad1\.py"
    ):
        texts = read_texts([tmp_path])
    assert {p.relative_to(tmp_path).as_posix(): t for p, t in texts} == good


def test_read_texts_accepts_files_and_dirs(tmp_path):
    a = _touch(tmp_path, "one/a.py")
    _touch(tmp_path, "two/b.py")
    texts = read_texts([a, tmp_path / "two"])
    assert [p.name for p, _ in texts] == ["a.py", "b.py"]


@pytest.mark.parametrize("case", ["no paths", "empty dir", "only empty files", "only non-utf8"])
def test_read_texts_empty_corpus(tmp_path, case):
    paths = [] if case == "no paths" else [tmp_path]
    if case == "only empty files":
        _touch(tmp_path, "e.py", "")
    if case == "only non-utf8":
        _touch(tmp_path, "x.py", b"\xff")
    with pytest.warns(UserWarning) if case == "only non-utf8" else contextlib.nullcontext():
        with pytest.raises(ValueError, match=r"corpus is empty: .*--corpus PATH"):
            read_texts(paths)


def test_read_texts_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"corpus path does not exist: .*nope"):
        read_texts([tmp_path / "nope"])


# -------------------------------------------------------------------- packing


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 200), seq_len=st.integers(1, 20))
def test_pack_drops_only_the_final_partial_row(n, seq_len):
    stream = np.arange(n, dtype=np.int32)
    rows = pack(stream, seq_len)
    assert rows.shape == (n // (seq_len + 1), seq_len + 1)
    assert n - rows.size < seq_len + 1
    np.testing.assert_array_equal(rows.reshape(-1), stream[: rows.size])


def _rows(n, width=5):
    """Row i is filled with i, so a batch's first column names its rows."""
    return np.repeat(np.arange(n, dtype=np.int32)[:, None], width, axis=1)


def _ids(batch):
    return batch["tokens"][:, 0].tolist()


def _flat_ids(batches):
    return [i for b in batches for i in _ids(b)]


# ------------------------------------------------------------ training iterator


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 60), batch=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_every_epoch_yields_every_row_exactly_once(n, batch, seed):
    if n < batch:
        with pytest.raises(ValueError, match=f"{n} rows"):
            make_train_iterator(_rows(n), global_batch_size=batch, seed=seed)
        return
    it = make_train_iterator(_rows(n), global_batch_size=batch, seed=seed)
    batches = [next(it) for _ in range(-(-3 * n // batch))]  # three epochs' worth
    assert all(b["tokens"].shape == (batch, 5) and b["tokens"].dtype == np.int32 for b in batches)
    stream = _flat_ids(batches)
    # Epoch boundaries fall inside batches: nothing is dropped or repeated there.
    for e in range(3):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))
    # A finite stream drops only the rows that do not fill a last global batch.
    finite = _flat_ids(
        make_train_iterator(_rows(n), global_batch_size=batch, seed=seed, num_epochs=1)
    )
    assert finite == stream[: n - n % batch]


def test_epochs_reshuffle():
    n, batch = 24, 4
    batches = list(make_train_iterator(_rows(n), global_batch_size=batch, seed=7, num_epochs=3))
    epochs = [_flat_ids(batches[e * 6 : (e + 1) * 6]) for e in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    again = list(make_train_iterator(_rows(n), global_batch_size=batch, seed=7, num_epochs=3))
    assert [_ids(b) for b in again] == [_ids(b) for b in batches]
    other = list(make_train_iterator(_rows(n), global_batch_size=batch, seed=8, num_epochs=1))
    assert _flat_ids(other) != epochs[0]


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_make_up_the_global_batch(process_count):
    rows, batch, steps = _rows(50), 8, 20  # 6 steps per epoch: crosses epochs
    glob = make_train_iterator(rows, global_batch_size=batch, seed=3)
    local = [
        make_train_iterator(
            rows, global_batch_size=batch, seed=3, process_index=i, process_count=process_count
        )
        for i in range(process_count)
    ]
    for _ in range(steps):
        parts = [next(it)["tokens"] for it in local]
        assert all(p.shape == (batch // process_count, 5) for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), next(glob)["tokens"])


@pytest.mark.parametrize("k", [0, 1, 5, 13])
def test_get_state_set_state_resumes_exactly(k):
    rows = _rows(30)
    it = make_train_iterator(rows, global_batch_size=4, seed=1, process_index=1, process_count=2)
    for _ in range(k):
        next(it)
    state = it.get_state()
    expected = [_ids(next(it)) for _ in range(10)]
    resumed = make_train_iterator(
        rows, global_batch_size=4, seed=1, process_index=1, process_count=2
    )
    resumed.set_state(state)
    assert [_ids(next(resumed)) for _ in range(10)] == expected


def test_orbax_checkpoint_round_trip(tmp_path):
    rows = _rows(30)
    it = make_train_iterator(rows, global_batch_size=4, seed=2)
    for _ in range(9):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = [_ids(next(it)) for _ in range(10)]

    restored = make_train_iterator(rows, global_batch_size=4, seed=2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        assert manager.latest_step() == 9
        manager.restore(
            9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored))
        )
    assert [_ids(next(restored)) for _ in range(10)] == expected


def test_train_iterator_errors():
    with pytest.raises(ValueError, match="not divisible by process_count=4"):
        make_train_iterator(_rows(100), global_batch_size=6, seed=0, process_count=4)
    with pytest.raises(
        ValueError, match=r"7 rows of 5 tokens.*needs 8 rows.*smaller batch or seq_len"
    ):
        make_train_iterator(_rows(7), global_batch_size=8, seed=0)
    with pytest.raises(ValueError, match="process_index=2"):
        make_train_iterator(
            _rows(100), global_batch_size=4, seed=0, process_index=2, process_count=2
        )


# ------------------------------------------------------------------ evaluation


@pytest.mark.parametrize("n_tokens, seq_len", [(0, 4), (1, 4), (3, 4), (4, 4), (5, 4), (17, 8)])
def test_document_rows_predict_every_token_once(n_tokens, seq_len):
    tokens = np.arange(10, 10 + n_tokens)
    rows, mask = document_rows(tokens, seq_len, eos_id=2)
    assert rows.shape[1] == seq_len + 1 and mask.shape == (len(rows), seq_len)
    targets = rows[:, 1:][mask == 1]
    np.testing.assert_array_equal(targets, tokens)  # in order, each exactly once
    inputs = rows[:, :-1][mask == 1]
    np.testing.assert_array_equal(inputs, np.concatenate([[2], tokens[:-1]])[:n_tokens])


# ------------------------------------------------------- tokenization and caching


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [t for _, t in read_texts(stdlib_files()[::40])]
    path = tmp_path_factory.mktemp("tok") / "spm.model"
    return Tokenizer.train(texts, vocab_size=400, model_path=path)


def test_tokenize_documents_separates_documents_with_eod(tokenizer):
    docs = ["def f():\n    pass\n", "", "▁x\r\n", "🙂"]
    stream = tokenize_documents(tokenizer, docs)
    assert stream.dtype == np.int32 and stream.ndim == 1
    assert (stream == tokenizer.eos_id).sum() == len(docs) and stream[-1] == tokenizer.eos_id
    ends = np.flatnonzero(stream == tokenizer.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    assert [tokenizer.decode(stream[s:e]) for s, e in zip(starts, ends, strict=True)] == docs


def test_prepare_corpus_caches_and_invalidates(tokenizer, tmp_path, monkeypatch):
    a = _touch(tmp_path / "corpus", "a.py", "import os\n")
    _touch(tmp_path / "corpus", "b.py", "print('hi')\n")
    cache = tmp_path / "cache"
    first = prepare_corpus(tokenizer, [tmp_path / "corpus"], cache_dir=cache)
    np.testing.assert_array_equal(
        first, tokenize_documents(tokenizer, ["import os\n", "print('hi')\n"])
    )

    def fail(*args):
        raise AssertionError("re-tokenized although cached")

    monkeypatch.setattr(text_lib, "tokenize_documents", fail)
    np.testing.assert_array_equal(
        prepare_corpus(tokenizer, [tmp_path / "corpus"], cache_dir=cache), first
    )
    monkeypatch.undo()

    a.write_text("import sys, os\n")
    second = prepare_corpus(tokenizer, [tmp_path / "corpus"], cache_dir=cache)
    assert tokenizer.decode(second[: np.argmax(second == tokenizer.eos_id)]) == "import sys, os\n"
    assert len(list(cache.glob("*.npy"))) == 2
    # An edit that keeps the size and the mtime (cp -p, rsync -t) is seen too.
    stat = a.stat()
    a.write_text("import sys, re\n")
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    third = prepare_corpus(tokenizer, [tmp_path / "corpus"], cache_dir=cache)
    assert tokenizer.decode(third[: np.argmax(third == tokenizer.eos_id)]) == "import sys, re\n"


def test_neighbouring_seeds_shuffle_rows_independently():
    """grain seeds epoch e with seed + e: seed s's second epoch must not be seed s + 1's
    first."""
    from genjax.data import rows

    def epochs(seed, n=3):
        it = rows.row_batches({"x": np.arange(10)}, 10, seed=seed)
        return [next(it)["x"].tolist() for _ in range(n)]

    first, second = epochs(3), epochs(4)
    assert first[1] != second[0] and first[2] != second[1]
    assert epochs(3) == first  # and a seed still gives one order
    assert all(sorted(e) == list(range(10)) for e in first)


def test_a_corpus_folder_follows_symlinked_folders_once(tmp_path):
    from genjax.data.corpus import expand_paths

    a = _touch(tmp_path / "corpus", "pkg/a.py")
    b = _touch(tmp_path / "elsewhere", "b.py")
    (tmp_path / "corpus" / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "corpus" / "pkg" / "up").symlink_to(tmp_path / "corpus")  # a loop
    files = expand_paths([tmp_path / "corpus"])
    assert [f.resolve() for f in files] == [b.resolve(), a.resolve()]
