"""The compression anchor for the language model's bits per byte on unseen code.

The language model's quality benchmark (experiments/benchmarks/README.md) scores
held-out Python source in bits per byte and compares it with `xz -9e` given the
whole training corpus as a prefix:

    bits/byte = (|xz(train + held)| − |xz(train)|) · 8 / bytes(held)

i.e. what xz pays for the held-out bytes once it has seen everything the model saw.
Here `lzma` at preset 9 | PRESET_EXTREME, FORMAT_XZ (the same as `xz -9e`, whose
64 MiB dictionary holds the whole ~12 MB stdlib prefix). Train is the genjax
training corpus (the stdlib's train split, as `genjax.lm` builds it); held is the
concatenation of the held-out files' UTF-8 text (as `read_texts` gives the model).
The LM scores each file on its own, while xz also sees the earlier held files; on
a package like optax that favours xz slightly, so the anchor is if anything strict.

    python experiments/benchmarks/xz_anchor.py                 # held = installed optax, no tests
    python experiments/benchmarks/xz_anchor.py path/to/pkg file.py --train-corpus stdlib
    python experiments/benchmarks/xz_anchor.py held/ --train-corpus small_corpus_dir/

Expected: about 1.43–1.54 bits/byte on typical third-party Python packages.
Time on a 2-core CPU: a few minutes (two `-9e` passes over the ~12 MB prefix).
"""

from __future__ import annotations

import argparse
import lzma
import pathlib
import sys
import time

XZ_FILTER = {"format": lzma.FORMAT_XZ, "preset": 9 | lzma.PRESET_EXTREME}


def xz_size(data: bytes) -> int:
    return len(lzma.compress(data, **XZ_FILTER))


def xz_conditional_bits_per_byte(train_bytes: bytes, held_bytes: bytes) -> float:
    """(|xz(train + held)| − |xz(train)|) · 8 / len(held): xz's cost of `held` given `train`."""
    if not held_bytes:
        raise ValueError("held-out data is empty: nothing to score")
    return (xz_size(train_bytes + held_bytes) - xz_size(train_bytes)) * 8 / len(held_bytes)


def third_party_heldout_files() -> list[pathlib.Path]:
    """The installed `optax` package's source, tests excluded, sorted by relative path.

    optax ships with every genjax install and is not in the stdlib, so the model
    never trained on it. Excluded: files named `*_test.py`, `test*.py` or
    `conftest.py`, and everything under a folder whose name starts with `test`.
    The set follows the installed optax version (report it with the number).
    """
    import optax

    root = pathlib.Path(optax.__file__).resolve().parent

    def is_test(rel: pathlib.PurePath) -> bool:
        name = rel.name
        if name.endswith("_test.py") or name.startswith("test") or name == "conftest.py":
            return True
        return any(part.startswith("test") for part in rel.parts[:-1])

    rels = sorted(p.relative_to(root) for p in root.rglob("*.py") if p.is_file())
    return [root / r for r in rels if not is_test(r)]


def stdlib_train_files() -> list[pathlib.Path]:
    """The LM's training files: the default corpus split exactly as pre-training splits it."""
    from genjax import lm

    train, _ = lm.corpus_split(lm.DataConfig())
    return train


def corpus_bytes(paths) -> tuple[int, bytes]:
    """(number of files used, their UTF-8 text concatenated in order)."""
    from genjax.data import corpus

    texts = corpus.read_texts(paths)
    return len(texts), "".join(text for _, text in texts).encode("utf-8")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "held", nargs="*", type=pathlib.Path,
        help="held-out files or folders (default: the installed optax, tests excluded)",
    )  # fmt: skip
    p.add_argument(
        "--train-corpus", default="stdlib",
        help="'stdlib' (the genjax LM's train split) or a file/folder of text",
    )  # fmt: skip
    p.add_argument(
        "--list-held", action="store_true",
        help="print the held-out file paths (one per line) and exit, e.g. for genjax.score",
    )  # fmt: skip
    args = p.parse_args(argv)

    if args.held:
        held_paths, held_name = args.held, " ".join(map(str, args.held))
    else:
        import optax

        held_paths, held_name = third_party_heldout_files(), f"optax {optax.__version__} (no tests)"
    if args.list_held:
        print("\n".join(map(str, held_paths)))
        return
    if args.train_corpus == "stdlib":
        version = sys.version.split()[0]
        train_paths, train_name = stdlib_train_files(), f"stdlib {version} train split"
    else:
        train_paths, train_name = [pathlib.Path(args.train_corpus)], args.train_corpus

    n_train, train = corpus_bytes(train_paths)
    n_held, held = corpus_bytes(held_paths)
    print(f"train: {train_name}: {n_train} files, {len(train):,} bytes", flush=True)
    print(f"held:  {held_name}: {n_held} files, {len(held):,} bytes", flush=True)
    t0 = time.perf_counter()
    bpb = xz_conditional_bits_per_byte(train, held)
    print(f"xz -9e conditional bits/byte: {bpb:.4f}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
