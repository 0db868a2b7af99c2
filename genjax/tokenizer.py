"""Lossless sentencepiece BPE tokenizer, trained in-repo.

Contract: ``decode(encode(x)) == x`` for every string that is valid UTF-8.

How the settings keep text exact:

- ``normalization_rule_name="identity"``, ``add_dummy_prefix=False`` and
  ``remove_extra_whitespaces=False``: sentencepiece changes nothing, so leading,
  trailing and repeated spaces survive.
- ``byte_fallback=True``: a character that has no piece is spelled as UTF-8
  byte pieces, so nothing becomes ``<unk>`` (emoji, NUL, control characters).
- Newlines: sentencepiece strips a trailing newline from each training
  sentence, but keeps newlines inside a sentence. We train on chunks of whole
  lines where each chunk after the first *starts* with the newline that ended
  the previous chunk, so every newline is seen and pieces such as ``"):\n"``
  and ``"\n        "`` (newline plus indentation) are learned. Encoding needs
  no special handling: newlines are ordinary characters.
- U+2581 (``▁``): sentencepiece writes a space as ``▁``, so a literal ``▁`` in
  the text would decode as a space. ``encode`` cuts the text at each literal
  ``▁`` and spells it with its three byte pieces, which decode back to ``▁``.

Ids: 0 ``<pad>``, 1 ``<unk>``, 2 ``<eod>`` (end of document, a control piece
that text never produces), 3..258 the bytes ``<0x00>``..``<0xFF>``, then BPE pieces.
"""

from __future__ import annotations

import io
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

PAD_ID, UNK_ID, EOD_ID = 0, 1, 2
_NUM_SPECIAL = 3
_NUM_BYTES = 256
# Smallest vocabulary that holds the specials, all bytes and at least one learned piece.
MIN_VOCAB_SIZE = _NUM_SPECIAL + _NUM_BYTES + 1
# sentencepiece's whitespace meta symbol; a literal one in text needs escaping.
_SPACE_SYMBOL = "\u2581"
# Training sentences are chunks of whole lines of about this many characters.
_CHUNK_CHARS = 2048
_MAX_SENTENCE_BYTES = 16384


def _training_chunks(texts: Iterable[str], chunk_chars: int = _CHUNK_CHARS) -> Iterator[str]:
    """Chunks of whole lines; every chunk but a document's first starts with "\\n".

    sentencepiece strips a *trailing* newline from each sentence, so the newline
    that separates two chunks is carried at the start of the next one instead. A line
    longer than ``chunk_chars`` goes in pieces of that many characters, each a chunk:
    sentencepiece skips, without a word, a sentence over its ``max_sentence_length``
    bytes (minified code, data in a string), and a chunk stays under it this way.
    """
    for text in texts:
        lines = text.split("\n")
        chunk: list[str] = []
        size = 0
        for i, line in enumerate(lines):
            if len(line) > chunk_chars:
                if chunk:
                    yield "\n".join(chunk)
                    chunk, size = [], 0
                for start in range(0, len(line), chunk_chars):
                    newline = "\n" if i > 0 and start == 0 else ""
                    yield newline + line[start : start + chunk_chars]
                continue
            chunk.append(("\n" if i > 0 and not chunk else "") + line)
            size += len(line) + 1
            if size >= chunk_chars:
                yield "\n".join(chunk)
                chunk, size = [], 0
        if chunk and any(chunk):
            yield "\n".join(chunk)


def _trainer_options(vocab_size: int, max_sentences: int, num_threads: int) -> dict:
    return dict(
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        # Pieces may cross spaces and newlines: code compresses ~10% better and
        # "\n" + indentation becomes one piece.
        split_by_whitespace=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=0.9995,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        eos_id=EOD_ID,
        eos_piece="<eod>",
        bos_id=-1,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        train_extremely_large_corpus=False,
        num_threads=num_threads,
        minloglevel=2,  # sentencepiece logs every meta piece at INFO
    )


class Tokenizer:
    """Lossless sentencepiece BPE: decode(encode(x)) == x for any UTF-8 string."""

    def __init__(self, model_proto: bytes, model_path: str | os.PathLike):
        self._model_proto = model_proto
        self.model_path = pathlib.Path(model_path)
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._space_ids = [self._byte_id(b) for b in _SPACE_SYMBOL.encode()]
        self._num_threads = os.cpu_count() or 1

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        vocab_size: int,
        model_path: str | os.PathLike,
        seed: int = 0,
        max_sentences: int = 50_000,
        num_threads: int = 2,
    ) -> Tokenizer:
        """Trains on `texts` (documents) and writes the model to `model_path`.

        At most `max_sentences` chunks of ~2 KB (sampled with `seed`) are used,
        which bounds time and memory: ~12 MB of Python trains in a few seconds.
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: byte fallback needs {_NUM_BYTES} byte "
                f"pieces plus {_NUM_SPECIAL} specials (<pad>, <unk>, <eod>), so at least "
                f"{MIN_VOCAB_SIZE}"
            )
        chunks = _training_chunks(texts)
        first = next(chunks, None)
        if first is None:
            raise ValueError("cannot train a tokenizer on no text: `texts` is empty")
        writer = io.BytesIO()
        # The reservoir sampling behind shuffle_input_sentence uses this global seed.
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_prepend(first, chunks),
                model_writer=writer,
                **_trainer_options(vocab_size, max_sentences, num_threads),
            )
        except RuntimeError as e:
            raise ValueError(
                f"sentencepiece could not train with vocab_size={vocab_size}: {e}"
            ) from e
        path = pathlib.Path(model_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a crash never leaves a half-written model behind.
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(writer.getvalue())
        os.replace(tmp, path)
        return cls(writer.getvalue(), path)

    @classmethod
    def load(cls, model_path: str | os.PathLike) -> Tokenizer:
        """Loads a model written by `train`."""
        path = pathlib.Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model not found: {path} (train one with Tokenizer.train)"
            )
        try:
            tokenizer = cls(path.read_bytes(), path)
        except RuntimeError as e:
            raise ValueError(f"{path} is not a valid sentencepiece model: {e}") from None
        sp = tokenizer._sp
        if not (sp.is_control(EOD_ID) and sp.id_to_piece(EOD_ID) == "<eod>" and sp.is_byte(3)):
            raise ValueError(
                f"{path} is a sentencepiece model but not a genjax tokenizer "
                "(expected <eod> at id 2 and byte pieces from id 3)"
            )
        # The rest of what `train` sets, on which exact round trips rest.
        model = sentencepiece_model_pb2.ModelProto.FromString(tokenizer.model_proto)
        norm, byte_fallback = model.normalizer_spec, model.trainer_spec.byte_fallback
        exact = norm.name == "identity" and byte_fallback
        if not exact or norm.add_dummy_prefix or norm.remove_extra_whitespaces:
            raise ValueError(
                f"{path} is a sentencepiece model but not a genjax tokenizer: it would not "
                f"give text back exactly (normalization {norm.name!r}, dummy prefix "
                f"{norm.add_dummy_prefix}, extra spaces removed {norm.remove_extra_whitespaces}"
                f", byte fallback {byte_fallback})"
            )
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def eos_id(self) -> int:
        """The end-of-document id; `encode` never produces it."""
        return EOD_ID

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def model_proto(self) -> bytes:
        """The serialized model (e.g. to fingerprint caches)."""
        return self._model_proto

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encodes many texts with sentencepiece's thread pool."""
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate: undecodable bytes of an argv
                raise ValueError(
                    f"cannot encode {text[:40]!r}: {e.reason} at {e.start}; text must be valid "
                    "Unicode (was it given as bytes that are not UTF-8?)"
                ) from None
        # Cut each text at literal "▁"; the cuts are re-joined with its byte pieces.
        segments = [text.split(_SPACE_SYMBOL) for text in texts]
        flat = [s for segs in segments for s in segs]
        encoded = self._sp.encode(flat, num_threads=self._num_threads)
        out, i = [], 0
        for segs in segments:
            ids = list(encoded[i])
            for piece_ids in encoded[i + 1 : i + len(segs)]:
                ids += self._space_ids
                ids += piece_ids
            out.append(ids)
            i += len(segs)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def _byte_id(self, byte: int) -> int:
        return self._sp.piece_to_id(f"<0x{byte:02X}>")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, model_path={str(self.model_path)!r})"


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest
