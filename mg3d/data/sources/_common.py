"""Shared pieces of the data set adapters: the bad-data policy, skip accounting, CSV rows, boxes, splits.

The header readers the adapters use (sizes read before any pixel is decoded, every reader failure re-raised
as a :class:`~mg3d.errors.SourceError` naming the file) live in :mod:`mg3d.data.readers`, their public home;
they are re-exported here for the adapters.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from mg3d.data.readers import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_VOXELS,
    ImageHeader,
    load_nifti_array,
    load_npy,
    read_image_header_2d,
    read_nifti,
    read_npy_header,
    require_file,
)
from mg3d.data.records import GroundingRecord
from mg3d.errors import BoxError, DataError, SourceError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_VOXELS",
    "CsvRow",
    "ImageHeader",
    "OnError",
    "Skip",
    "SkipLog",
    "Source",
    "SourceError",
    "check_box_in_image",
    "check_on_error",
    "load_nifti_array",
    "load_npy",
    "read_csv_rows",
    "read_image_header_2d",
    "read_nifti",
    "read_npy_header",
    "require_file",
    "seeded_group_split",
    "stable_choice",
    "xywh_to_box",
]

OnError = Literal["raise", "skip"]
ON_ERROR_CHOICES = ("raise", "skip")

T = TypeVar("T")


def check_on_error(on_error: str) -> OnError:
    if on_error not in ON_ERROR_CHOICES:
        raise DataError(f"on_error must be one of {list(ON_ERROR_CHOICES)}, got {on_error!r}")
    return on_error  # type: ignore[return-value]


@dataclass(frozen=True)
class Skip:
    """One skipped input item and why."""

    dataset: str
    item: str
    kind: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"dataset": self.dataset, "item": self.item, "kind": self.kind, "reason": self.reason}


@dataclass
class SkipLog:
    """Every item skipped under ``on_error="skip"``, so nothing is ever dropped silently."""

    items: list[Skip] = field(default_factory=list)

    def add(self, dataset: str, item: str, error: DataError) -> None:
        kind = getattr(error, "kind", "invalid")
        self.items.append(Skip(dataset, item, kind, str(error)))

    def __len__(self) -> int:
        return len(self.items)

    def by_kind(self) -> dict[str, int]:
        return dict(sorted(Counter(s.kind for s in self.items).items()))


class Source:
    """Base of the adapters: iterate to get records; bad items raise or are counted in ``skips``.

    Subclasses fill ``self._items`` (one entry per raw input unit, e.g. a phrase group or a CSV row)
    in ``__init__`` — file-level problems (missing CSV, missing column) always raise there — and
    implement ``_item_name`` and ``_build``. ``len(source)`` is the number of raw items, for progress bars.
    An item holding a CSV row that :func:`read_csv_rows` marked as malformed is refused before ``_build``.
    ``dataset`` overrides the class's data set name (it also prefixes record ids).
    """

    dataset: str = ""

    def __init__(self, on_error: str = "raise", dataset: str | None = None) -> None:
        self.on_error: OnError = check_on_error(on_error)
        if dataset is not None:  # e.g. "synthetic3d" for phantoms read through the M3D-RefSeg adapter
            if not isinstance(dataset, str) or not dataset.strip() or "/" in dataset:
                raise DataError(f"dataset name must be a non-empty string without '/', got {dataset!r}")
            self.dataset = dataset
        self.skips = SkipLog()
        self._items: list[Any] = []

    def __len__(self) -> int:
        return len(self._items)

    def _item_name(self, item: Any) -> str:
        raise TypeError(f"{type(self).__name__} must define _item_name")

    def _build(self, item: Any) -> GroundingRecord:
        raise TypeError(f"{type(self).__name__} must define _build")

    def __iter__(self) -> Iterator[GroundingRecord]:
        for item in self._items:
            try:
                problem = malformed_row(item)
                if problem is not None:  # never build a record from a row whose columns cannot be trusted
                    raise SourceError(str(problem), problem.kind)
                record = self._build(item)
            except DataError as err:
                if self.on_error == "raise":
                    raise
                self.skips.add(self.dataset, self._item_name(item), err)
                continue
            yield record


# ---------------------------------------------------------------------------------------------- CSV


class CsvRow(dict[str, str]):
    """One CSV row by column name. ``problem`` is set when the row itself is malformed (more cells than the
    header: an unquoted comma shifts every later column), so that :class:`Source` refuses the item built from
    it under its ``on_error`` policy instead of reading shifted or truncated values."""

    problem: SourceError | None = None


def malformed_row(item: Any, _depth: int = 0) -> SourceError | None:
    """The problem of the first malformed :class:`CsvRow` inside an adapter item (a row, or a dataclass, list
    or tuple holding rows, as the adapters group them), else ``None``."""
    if isinstance(item, CsvRow):
        return item.problem
    if _depth > 4:
        return None
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        children: Any = (getattr(item, f.name) for f in dataclasses.fields(item))
    elif isinstance(item, (list, tuple)):
        children = item
    else:
        return None
    for child in children:
        problem = malformed_row(child, _depth + 1)
        if problem is not None:
            return problem
    return None


def read_csv_rows(
    path: Path, required: Sequence[str], *, rename: Callable[[list[str]], list[str]] | None = None
) -> tuple[list[str], list[tuple[int, CsvRow]]]:
    """Rows of a CSV as ``(line_number, {column: value})``; raise naming the file on a missing column.

    ``rename`` maps the raw header to canonical names (for headers that are malformed as published).
    Line numbers count the header as line 1, so they match what an editor shows. A row with fewer cells
    than the header reads the missing ones as ``""`` (the adapters refuse empty required values); a row with
    *more* cells is returned marked (:attr:`CsvRow.problem`, kind ``bad_row``, naming file and line), so
    that the adapter raises or skips it by its ``on_error`` policy.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: CSV file not found", "missing_file")
    if path.stat().st_size == 0:
        raise SourceError(f"{path}: CSV file is empty (0 bytes)", "empty_file")
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise SourceError(f"{path}: CSV file has no header line", "bad_csv")
            names = rename(header) if rename else [h.strip() for h in header]
            missing = [c for c in required if c not in names]
            if missing:
                raise SourceError(
                    f"{path}: CSV is missing column(s) {missing}; header is {header}", "missing_column"
                )
            rows: list[tuple[int, CsvRow]] = []
            for raw in reader:
                if not any(cell.strip() for cell in raw):
                    continue
                row = CsvRow(
                    (name, raw[i].strip() if i < len(raw) else "") for i, name in enumerate(names) if name
                )
                if len(raw) > len(names):
                    extra = [cell.strip() for cell in raw[len(names) :]]
                    row.problem = SourceError(
                        f"{path}:{reader.line_num}: the row has {len(raw)} cells, the header {len(names)} (extra "
                        f"{extra[:3]!r}; an unquoted comma in a value?); its columns cannot be trusted, so it "
                        "is not read",
                        "bad_row",
                    )
                rows.append((reader.line_num, row))
    except UnicodeDecodeError as err:
        raise SourceError(f"{path}: CSV is not UTF-8 text ({err.reason})", "bad_csv") from None
    except csv.Error as err:
        raise SourceError(f"{path}: malformed CSV ({err})", "bad_csv") from None
    return names, rows


def parse_float(value: str, what: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise SourceError(f"{what}: not a number: {value!r}", "bad_row") from None
    if not math.isfinite(out):
        raise SourceError(f"{what}: not a finite number: {value!r}", "bad_row")
    return out


def parse_int(value: str, what: str) -> int:
    number = parse_float(value, what)
    if number != int(number):
        raise SourceError(f"{what}: not an integer: {value!r}", "bad_row")
    return int(number)


# ---------------------------------------------------------------------------------------------- boxes


def xywh_to_box(x: float, y: float, w: float, h: float, what: str) -> np.ndarray:
    """Pixel ``x, y, w, h`` (x = column) → voxel-frame ``[x, y, x + w, y + h]`` (MONAI ``xywh`` → ``xyxy``).

    Added in float64 here rather than through ``convert_box_mode``: MONAI computes box modes in float32,
    which moves the published float coordinates (e.g. NIH's 225.084745762712) by up to ~1e-5 px.
    """
    if w <= 0 or h <= 0:
        raise SourceError(
            f"{what}: box x={x}, y={y}, w={w}, h={h} has non-positive width or height", "bad_box"
        )
    return np.asarray([x, y, x + w, y + h], dtype=np.float64)


def check_box_in_image(
    box: np.ndarray, shape: Sequence[int], what: str, tolerance: float = 0.0
) -> np.ndarray:
    """Return ``box`` if it lies inside ``[0, shape]``; clip it if it is out by at most ``tolerance``.

    A box further out means the annotation and the image disagree (wrong image, wrong size, swapped
    axes), so it is an error rather than something to clip away.
    """
    d = len(shape)
    box = np.asarray(box, dtype=np.float64)
    lo, hi = box[:d], box[d:]
    limits = np.asarray(shape, dtype=np.float64)
    over = max(float(np.max(-lo)), float(np.max(hi - limits)), 0.0)
    if over > tolerance:
        raise SourceError(
            f"{what}: box {np.round(box, 3).tolist()} lies outside the image of shape {list(shape)} "
            f"(by {over:.3g} px; tolerance {tolerance})",
            "box_outside",
        )
    clipped = np.concatenate([np.clip(lo, 0, limits), np.clip(hi, 0, limits)])
    if np.any(clipped[d:] <= clipped[:d]):
        raise SourceError(
            f"{what}: box {box.tolist()} is empty inside the image of shape {list(shape)}", "bad_box"
        )
    return clipped


# ---------------------------------------------------------------------------------------------- splits


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (0.0 <= value < 1.0):
            raise DataError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise DataError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")


def seeded_group_split(
    groups: Sequence[str], *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """Assign each distinct group (patient, case) to train/val/test, deterministically for a seed.

    Whole groups go to one split so that no patient appears in two splits. The group order is sorted
    before the seeded shuffle, so the result does not depend on the order rows were read in.
    """
    check_fractions(val_fraction, test_fraction)
    unique = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(unique))
    n = len(unique)
    n_test = round(n * test_fraction)
    n_val = round(n * val_fraction)
    out: dict[str, str] = {}
    for rank, idx in enumerate(order):
        out[unique[idx]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out


def stable_choice(key: str, n: int, seed: int) -> int:
    """An index in ``range(n)`` fixed by ``key`` and ``seed`` (independent of item order and of Python's hash)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n


def short_hash(text: str, n: int = 10) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:n]


_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


def normalise_split(value: str, what: str) -> str:
    split = _SPLIT_ALIASES.get(value.strip().lower())
    if split is None:
        raise SourceError(f"{what}: unknown split {value!r} (expected train/val/test)", "bad_row")
    return split


def find_in_tree(root: Path, names: set[str]) -> dict[str, Path]:
    """Map file names to paths under ``root`` (one walk), for releases that nest images in sub-folders."""
    found: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name in names and name not in found:
                found[name] = Path(dirpath) / name
    return found


_PATIENT_RE = re.compile(r"(?:^|/)(p\d{6,})(?:/|$)")


def mimic_patient(path: str) -> str | None:
    """The MIMIC patient folder (``p10000032``) in a MIMIC-CXR relative path, if any."""
    match = _PATIENT_RE.search(path.replace("\\", "/"))
    return match.group(1) if match else None


def wrap_box_error(fn: Callable[[], T], what: str) -> T:
    try:
        return fn()
    except BoxError as err:
        raise SourceError(f"{what}: {err}", "bad_box") from None
