"""Post-training data as JSON lines, checked line by line before anything trains.

    SFT pairs          {"prompt": str, "response": str}
    preference pairs   {"prompt": str, "chosen": str, "rejected": str}

Every field must be present and a string; responses (``response``, ``chosen``,
``rejected``) must not be empty (the prompt may be). A bad line is an error naming the
file, the line and the field.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

SFT_FIELDS = ("prompt", "response")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


def read_jsonl(path: str | pathlib.Path, fields: Sequence[str]) -> list[dict[str, str]]:
    """The records of ``path``, each with exactly the string ``fields`` it needs (extra
    keys are dropped); blank lines are skipped. Raises ValueError at the first bad line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (JSON lines with fields {', '.join(fields)})")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
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


def read_sft(path: str | pathlib.Path) -> list[dict[str, str]]:
    return read_jsonl(path, SFT_FIELDS)


def read_preferences(path: str | pathlib.Path) -> list[dict[str, str]]:
    return read_jsonl(path, PREFERENCE_FIELDS)
