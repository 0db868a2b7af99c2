"""Post-training JSON lines: good files read, bad lines named."""

import json

import pytest

from genjax.rl import data


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_sft_and_preference_records(tmp_path):
    sft = write(
        tmp_path / "sft.jsonl", [json.dumps({"prompt": "", "response": "x = 1", "id": 3}), ""]
    )
    assert data.read_sft(sft) == [{"prompt": "", "response": "x = 1"}]
    pairs = write(
        tmp_path / "p.jsonl", [json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})]
    )
    assert data.read_preferences(pairs) == [{"prompt": "a", "chosen": "b", "rejected": "c"}]


def test_strings_may_hold_unicode_line_separators(tmp_path):
    """JSON lines end at "\n" only; U+2028, U+2029 and U+0085 are characters of a string."""
    record = {"prompt": "a\u2028b", "response": "c\u2029d\x85e\r\nf"}
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\r\n", encoding="utf-8")
    assert data.read_sft(path) == [record]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"prompt": "a", "chosen": "b"}, r"p.jsonl:2: missing field 'rejected'"),
        ({"prompt": "a", "chosen": "b", "rejected": "  "}, r"p.jsonl:2: field 'rejected' is empty"),
        (
            {"prompt": "a", "chosen": 1, "rejected": "c"},
            r"p.jsonl:2: field 'chosen' must be a string",
        ),
        ([1, 2], r"p.jsonl:2: expected an object"),
    ],
)
def test_bad_preference_lines_are_named(tmp_path, line, message):
    good = json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
    path = write(tmp_path / "p.jsonl", [good, json.dumps(line)])
    with pytest.raises(ValueError, match=message):
        data.read_preferences(path)


def test_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"p\.jsonl:1: not JSON"):
        data.read_preferences(write(tmp_path / "p.jsonl", ["{oops"]))
    with pytest.raises(ValueError, match="no records"):
        data.read_sft(write(tmp_path / "e.jsonl", [""]))
    with pytest.raises(ValueError, match="no such file"):
        data.read_sft(tmp_path / "missing.jsonl")


def test_write_jsonl_is_read_back_and_leaves_no_part_file(tmp_path):
    rows = [{"prompt": "a\u2028b", "response": "c"}, {"prompt": "", "response": "d"}]
    path = tmp_path / "sub" / "pairs.jsonl"
    data.write_jsonl(path, rows)
    assert data.read_sft(path) == rows
    assert sorted(p.name for p in path.parent.iterdir()) == ["pairs.jsonl"]
