"""Input pipelines: corpora on disk and grain text pipelines; exact 2-D mixtures
(``genjax.data.toy2d``) and image arrays (``genjax.data.images``)."""

from genjax.data.corpus import (
    expand_paths,
    read_texts,
    split_by_module,
    stdlib_files,
    stdlib_root,
)
from genjax.data.text import (
    document_rows,
    make_train_iterator,
    pack,
    prepare_corpus,
    tokenize_documents,
)

__all__ = [
    "document_rows",
    "expand_paths",
    "make_train_iterator",
    "pack",
    "prepare_corpus",
    "read_texts",
    "split_by_module",
    "stdlib_files",
    "stdlib_root",
    "tokenize_documents",
]
