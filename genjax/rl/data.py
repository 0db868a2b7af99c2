"""Post-training data as JSON lines, checked line by line before anything trains.

    SFT pairs          {"prompt": str, "response": str}
    preference pairs   {"prompt": str, "chosen": str, "rejected": str}

Every field must be present and a string; responses (``response``, ``chosen``,
``rejected``) must not be empty (the prompt may be). A bad line is an error naming the
file, the line and the field. ``pair_rows`` and ``preference_rows`` turn records into
the padded token rows and response masks every post-training stage trains on.
"""

from __future__ import annotations

import json
import pathlib
import zlib
from collections.abc import Sequence

import numpy as np

from genjax import run
from genjax.tokenizer import Tokenizer

SFT_FIELDS = ("prompt", "response")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


def read_jsonl(path: str | pathlib.Path, fields: Sequence[str]) -> list[dict[str, str]]:
    """The records of ``path``, each with exactly the string ``fields`` it needs (extra
    keys are dropped); blank lines are skipped. Raises ValueError at the first bad line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (JSON lines with fields {', '.join(fields)})")
    records = []
    # Lines end at newlines only: str.splitlines would also split at U+2028 and U+0085,
    # which JSON strings may hold unescaped (json.dumps(..., ensure_ascii=False)).
    with path.open(encoding="utf-8") as lines:
        numbered = list(enumerate(lines, start=1))
    for number, line in numbered:
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg}); each line is one object") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object with fields {', '.join(fields)}")
        for field in fields:
            if field not in record:
                raise ValueError(f"{where}: missing field {field!r} (needs {', '.join(fields)})")
            if not isinstance(record[field], str):
                kind = type(record[field]).__name__
                raise ValueError(f"{where}: field {field!r} must be a string, got {kind}")
            if field != "prompt" and not record[field].strip():
                raise ValueError(f"{where}: field {field!r} is empty; a response needs text")
        records.append({field: record[field] for field in fields})
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def write_jsonl(path: pathlib.Path, rows: Sequence[dict]) -> None:
    """Whole or not at all: a run killed while writing leaves no half file to resume from."""
    run.write_whole(path, "".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows):,} records to {path}")


def read_sft(path: str | pathlib.Path) -> list[dict[str, str]]:
    return read_jsonl(path, SFT_FIELDS)


def read_preferences(path: str | pathlib.Path) -> list[dict[str, str]]:
    return read_jsonl(path, PREFERENCE_FIELDS)


# ----------------------------------------------------------------------------- rows
# A row is ``<eod> prompt response <eod>`` then padding (``<pad>``, distinct from the end
# of a response); target j predicts token j + 1, and a response's mask marks the targets
# of its tokens and of its closing ``<eod>`` (the model learns to answer and to stop).


def pair_row(prompt_ids: Sequence[int], response_ids: Sequence[int], seq_len: int, eod: int,
             pad: int) -> tuple[np.ndarray, np.ndarray] | None:  # fmt: skip
    """(tokens [seq_len + 1], mask [seq_len]) of one pair, or None when the prompt leaves
    no response target in the row. mask[j] = 1 where target j (token j + 1) is a response
    token or the closing <eod>; a longer pair keeps its first seq_len + 1 tokens."""
    ids = [eod, *prompt_ids, *response_ids, eod][: seq_len + 1]
    first_target = len(prompt_ids)  # target j predicts token j + 1; response starts at 1 + P
    if len(ids) - 1 <= first_target:
        return None
    tokens = np.full(seq_len + 1, pad, np.int32)
    tokens[: len(ids)] = ids
    mask = np.zeros(seq_len, np.float32)
    mask[first_target : len(ids) - 1] = 1.0
    return tokens, mask


def response_rows(tok: Tokenizer, prompts: Sequence[str], responses: Sequence[str],
                  seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(tokens [N, seq_len + 1], mask [N, seq_len], kept [N] bool): every pair's row; a
    pair whose prompt fills the row is all padding with an empty mask and kept False."""
    encoded = zip(tok.encode_batch(list(prompts)), tok.encode_batch(list(responses)), strict=True)
    tokens = np.full((len(prompts), seq_len + 1), tok.pad_id, np.int32)
    mask = np.zeros((len(prompts), seq_len), np.float32)
    kept = np.zeros(len(prompts), bool)
    for i, (p, r) in enumerate(encoded):
        row = pair_row(p, r, seq_len, tok.eos_id, tok.pad_id)
        if row is not None:
            tokens[i], mask[i], kept[i] = *row, True
    return tokens, mask, kept


def pair_rows(tok: Tokenizer, pairs: Sequence[dict], seq_len: int):
    """(tokens [N, seq_len + 1], mask [N, seq_len], dropped) of the SFT pairs that fit."""
    tokens, mask, kept = response_rows(
        tok, [p["prompt"] for p in pairs], [p["response"] for p in pairs], seq_len
    )
    return tokens[kept], mask[kept], int(np.sum(~kept))


def preference_rows(tok: Tokenizer, pairs: Sequence[dict], seq_len: int) -> tuple[dict, int]:
    """({"chosen", "chosen_mask", "rejected", "rejected_mask"}, dropped) of the
    preference pairs whose two rows both keep a response token."""
    prompts = [p["prompt"] for p in pairs]
    chosen, chosen_mask, kept_c = response_rows(tok, prompts, [p["chosen"] for p in pairs],
                                                seq_len)  # fmt: skip
    rejected, rejected_mask, kept_r = response_rows(
        tok, prompts, [p["rejected"] for p in pairs], seq_len
    )
    kept = kept_c & kept_r
    rows = {"chosen": chosen[kept], "chosen_mask": chosen_mask[kept],
            "rejected": rejected[kept], "rejected_mask": rejected_mask[kept]}  # fmt: skip
    return rows, int(np.sum(~kept))


def split(records: Sequence[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, validation): a record is held out by a hash of its prompt, so the split
    does not move when records are added and one prompt never lands on both sides."""

    def held_out(p):
        return zlib.crc32(p["prompt"].encode("utf-8")) % 10_000 < val_fraction * 10_000

    return [p for p in records if not held_out(p)], [p for p in records if held_out(p)]
