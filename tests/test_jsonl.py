"""The one JSON-lines reader (mg3d.data.jsonl) that manifests, own tables, predictions and bundle pairs share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mg3d.data.jsonl import iter_jsonl_objects
from mg3d.errors import DataError


def test_objects_come_with_their_line_numbers_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"b": [2, 3]}\r\n{"c": null}', encoding="utf-8")
    assert list(iter_jsonl_objects(path)) == [(1, {"a": 1}), (4, {"b": [2, 3]}), (5, {"c": None})]


def test_a_line_separator_inside_a_string_does_not_split_the_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    text = "left\u2028right\x1cend"
    path.write_text(json.dumps({"phrase": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert list(iter_jsonl_objects(path)) == [(1, {"phrase": text})]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(
            b'{"a": 1}\n{"id": "caf\xe9"}\n', r"rows\.jsonl:2: not UTF-8 text .* of the line", id="utf8"
        ),
        pytest.param(
            b'{"a": 1}\n\n{"a": }\n', r"rows\.jsonl:3: not valid JSON \(.* at column 7\)", id="json"
        ),
        pytest.param(b'{"a": 1}\n[1, 2]\n', r"rows\.jsonl:2: expected a JSON object, got list", id="list"),
        pytest.param(b'"text"\n', r"rows\.jsonl:1: expected a JSON object, got str", id="string"),
    ],
)
def test_a_bad_line_is_refused_naming_file_and_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    seen = []
    with pytest.raises(DataError, match=message):
        for row in iter_jsonl_objects(path):
            seen.append(row)
    assert seen == ([(1, {"a": 1})] if content.startswith(b'{"a": 1}') else [])  # lines before it were read


def test_a_file_that_cannot_be_opened_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"gone\.jsonl: cannot read"):
        list(iter_jsonl_objects(tmp_path / "gone.jsonl"))
