"""JSON-lines files: one JSON object per line, blank lines ignored, every error naming ``file:line``.

Manifests, the own-data table, prediction files and bundle pairs files are all JSON lines; they share this one
reader so they agree on what a line is and on how a bad one is reported. It lives apart from
:mod:`mg3d.data.readers` because that module loads SimpleITK and MONAI, and the manifest and prediction readers
must stay quick to import.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mg3d.errors import DataError

__all__ = ["iter_jsonl_objects"]


def iter_jsonl_objects(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSON-lines file, read one line at a time.

    Lines end at ``\\n`` only (as JSON writers mean them: a U+2028 inside a string stays in its line), and each
    is decoded on its own, so a non-UTF-8 byte is reported with its line. Raises :class:`DataError` naming
    ``path:line`` for a line that is not UTF-8, not JSON, or not a JSON object, and naming ``path`` when the file
    cannot be opened. Whether the file exists, and whether an empty one is allowed, is the caller's business.
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{where}: not UTF-8 text ({err.reason} at byte {err.start} of the line); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj
