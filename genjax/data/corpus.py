"""Text corpora on disk: the Python standard library by default, or the user's files.

The stdlib is a corpus every machine already has (~12 MB of Python once tests
are excluded). It is split into train/validation by top-level module, so the
validation set measures generalization to code the model never saw a line of.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sysconfig
import warnings
from collections.abc import Iterable, Sequence

# Folders whose files are tests, vendored packages or deliberately broken
# fixtures (lib2to3/tests holds Python 2 and non-UTF-8 files).
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})
# What a directory given as corpus contributes.
TEXT_SUFFIXES = (".py", ".txt")
_EMPTY_HINT = "pass --corpus PATH with .py/.txt files"


def stdlib_root() -> pathlib.Path:
    """The directory of this interpreter's standard library."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """All stdlib ``*.py`` files outside test folders and site-packages, sorted."""
    root = pathlib.Path(root) if root is not None else stdlib_root()
    return sorted(
        path
        for path in root.rglob("*.py")
        # Judge only the part below root, so a root inside e.g. "tests/" still works.
        if not EXCLUDED_DIRS.intersection(path.relative_to(root).parts[:-1]) and path.is_file()
    )


def _module_of(path: pathlib.Path, root: pathlib.Path) -> str:
    """Top-level module name: "email" for email/mime/text.py, "os" for os.py."""
    try:
        first = path.relative_to(root).parts[0]
    except ValueError:
        raise ValueError(f"{path} is not under the split root {root}") from None
    return first.removesuffix(".py")


def _stable_hash(name: str) -> int:
    # hashlib, not hash(): the split must not depend on PYTHONHASHSEED.
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


def split_by_module(
    files: Sequence[pathlib.Path],
    *,
    val_fraction: float = 0.02,
    root: str | os.PathLike | None = None,
) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
    """Deterministic (train, validation) split that never divides a top-level module.

    Modules are visited in the order of a stable hash of their name and added
    to validation while it stays within ``val_fraction`` of the files; if every
    module is too big, the first one is taken so validation is never empty. A module
    of empty files only (a package's bare ``__init__.py``) is never validation: it
    holds no text to score. `root` defaults to the common directory of `files`.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    files = [pathlib.Path(f) for f in files]
    if not files:
        raise ValueError(f"cannot split an empty file list: {_EMPTY_HINT}")
    root = pathlib.Path(root) if root is not None else pathlib.Path(os.path.commonpath(files))
    if len(files) == 1 or root in files:
        root = root.parent  # one file: its own name is its module
    counts: dict[str, int] = {}
    has_text: set[str] = set()
    for f in files:
        module = _module_of(f, root)
        counts[module] = counts.get(module, 0) + 1
        if f.stat().st_size:
            has_text.add(module)
    if len(counts) < 2:
        raise ValueError(
            f"cannot split by module: all {len(files)} files are in module "
            f"{next(iter(counts))!r} under {root}; pass a root one level deeper"
        )
    target = val_fraction * len(files)
    val_modules: set[str] = set()
    size = 0
    candidates = sorted(has_text, key=lambda m: (_stable_hash(m), m))
    for module in candidates:
        if size + counts[module] <= target:
            val_modules.add(module)
            size += counts[module]
    if not val_modules and candidates:
        val_modules.add(candidates[0])
    train = [f for f in files if _module_of(f, root) not in val_modules]
    val = [f for f in files if _module_of(f, root) in val_modules]
    return train, val


def _text_files_under(directory: pathlib.Path) -> list[pathlib.Path]:
    """The ``*.py``/``*.txt`` files under ``directory``, sorted. Symlinked folders are
    followed (``rglob`` does not before Python 3.13), each real folder once: a link back
    up is no loop, and a folder linked twice is not read twice."""
    found, seen = [], set()
    for root, dirs, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        for name in files:
            f = pathlib.Path(root, name)
            if f.suffix in TEXT_SUFFIXES and f.is_file():
                found.append(f)
    return sorted(found)


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[pathlib.Path]:
    """Files as given, directories replaced by their ``*.py``/``*.txt`` files (sorted)."""
    out: list[pathlib.Path] = []
    for p in paths:
        path = pathlib.Path(p)
        if path.is_dir():
            out.extend(_text_files_under(path))
        elif path.is_file():
            out.append(path)
        elif not path.exists():
            raise FileNotFoundError(f"corpus path does not exist: {path}")
        else:
            raise ValueError(f"corpus path is neither a file nor a directory: {path}")
    return out


def read_texts(paths: Iterable[str | os.PathLike]) -> list[tuple[pathlib.Path, str]]:
    """Reads the corpus as exact text (no newline translation).

    Empty files are skipped; non-UTF-8 files are skipped with one warning that
    counts and names them. An unreadable path raises, naming it. A corpus with
    nothing usable raises ValueError rather than training on nothing.
    """
    paths = list(paths)
    files = expand_paths(paths)
    texts: list[tuple[pathlib.Path, str]] = []
    not_utf8: list[pathlib.Path] = []
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as e:
            raise OSError(f"cannot read corpus file {f}: {e.strerror or e}") from e
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            not_utf8.append(f)
            continue
        if text:
            texts.append((f, text))
    if not_utf8:
        names = ", ".join(str(f) for f in not_utf8[:10])
        more = f", ... ({len(not_utf8) - 10} more)" if len(not_utf8) > 10 else ""
        warnings.warn(
            f"skipped {len(not_utf8)} of {len(files)} files that are not valid UTF-8: "
            f"{names}{more}",
            stacklevel=2,
        )
    if not texts:
        shown = ", ".join(str(p) for p in paths[:3]) or "no paths given"
        raise ValueError(
            f"corpus is empty: {len(files)} files found in {shown}, none with UTF-8 text; "
            f"{_EMPTY_HINT}"
        )
    return texts
