"""Grounding records and the JSONL manifest that carries them (DESIGN.md §3).

The manifest is the contract between the data set adapters and everything downstream, so it is
validated strictly on both sides: a record cannot be built with a wrong field, and a manifest line that
would make one is refused with an error naming the file, the line and the field.

Format: one JSON object per line (blank lines are ignored), one file per split. Every line carries
``"schema_version": MANIFEST_SCHEMA_VERSION`` — a per-line field rather than a header line, so that
manifests can be concatenated, split, shuffled or filtered with line tools (``cat``, ``grep``, ``shuf``)
without breaking them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mg3d.atomic import atomic_write
from mg3d.boxes import validate_box
from mg3d.data.jsonl import iter_jsonl_objects
from mg3d.errors import BoxError, DataError

__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "SPLITS",
    "GroundingRecord",
    "MaskRef",
    "iter_manifest",
    "known_modalities",
    "read_manifest",
    "record_from_dict",
    "register_modality",
    "write_manifest",
]

MANIFEST_SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")

# The modality keys a record may carry. `mg3d.data.modalities` registers its presets here, so this set is
# only the floor that lets a manifest be read before any preset module has been imported.
_MODALITIES: set[str] = {"CXR", "CT", "MR", "PET"}
_MODALITY_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")

_REQUIRED = ("id", "dataset", "split", "modality", "ndim", "image", "text", "boxes", "spatial_shape")
_OPTIONAL = ("mask", "category", "question_type", "spacing", "affine", "source")


def register_modality(key: str) -> None:
    """Allow ``key`` (upper-case, e.g. ``"US"``) as a record modality; idempotent."""
    if not isinstance(key, str) or not _MODALITY_RE.match(key):
        raise DataError(f"modality key {key!r} must be an upper-case identifier such as 'CT' or 'US'")
    _MODALITIES.add(key)


def known_modalities() -> frozenset[str]:
    """The modality keys records may use right now."""
    return frozenset(_MODALITIES)


class _FieldError(Exception):
    """Internal: a problem with one field, turned into a DataError by whoever knows the context."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name
        self.message = message


@dataclass(frozen=True)
class MaskRef:
    """The target of a record as a label map: the target is ``mask == label`` in the file at ``path``."""

    path: str
    label: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "label": self.label}


@dataclass(frozen=True)
class GroundingRecord:
    """One referring phrase on one image, with its ground-truth boxes in the voxel frame.

    Boxes are half-open voxel-edge boxes ``[lo_0, lo_1, (lo_2), hi_0, hi_1, (hi_2)]`` in the axis order of
    the stored image as MONAI loads it (2D: axis 0 = column x, axis 1 = row y; 3D: the file's i, j, k),
    and must lie inside ``spatial_shape``. ``spacing``/``affine`` are ``None`` when the stored image has
    no physical geometry (PNG/JPEG radiographs, M3D's preprocessed ``.npy`` arrays). ``source`` is a
    JSON object for provenance (raw row, file name); it must never hold patient identifiers.
    Construction validates every field and raises :class:`DataError` naming the record and the field.
    """

    id: str
    dataset: str
    split: str
    modality: str
    ndim: int
    image: str
    text: str
    boxes: tuple[tuple[float, ...], ...]
    spatial_shape: tuple[int, ...]
    mask: MaskRef | None = None
    category: str | None = None
    question_type: int | None = None
    spacing: tuple[float, ...] | None = None
    affine: tuple[tuple[float, ...], ...] | None = None
    source: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        raw = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(raw["mask"], MaskRef):
            raw["mask"] = raw["mask"].to_dict()
        try:
            clean = _validate(raw)
        except _FieldError as err:
            raise DataError(f"record {self.id!r}: field {err.field!r}: {err.message}") from None
        for name, value in clean.items():
            object.__setattr__(self, name, value)

    def __hash__(self) -> int:
        # By id: ``source`` is a dict, so the generated field hash would fail; equal records share an id.
        return hash(self.id)

    def boxes_array(self) -> np.ndarray:
        """Boxes as a float64 array of shape ``(n_boxes, 2 * ndim)``."""
        return np.asarray(self.boxes, dtype=np.float64).reshape(len(self.boxes), 2 * self.ndim)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of one manifest line (including ``schema_version``)."""
        out: dict[str, Any] = {"schema_version": MANIFEST_SCHEMA_VERSION}
        for name in (*_REQUIRED, *_OPTIONAL):
            value = getattr(self, name)
            if name == "mask":
                value = None if value is None else value.to_dict()
            elif name == "source":
                value = dict(value)
            elif name in ("boxes", "affine"):
                value = None if value is None else [list(row) for row in value]
            elif name in ("spatial_shape", "spacing"):
                value = None if value is None else list(value)
            out[name] = value
        return out

    def with_paths(self, image: str, mask_path: str | None = None) -> GroundingRecord:
        """A copy with the image (and mask) path replaced, e.g. resolved or made relative."""
        mask = self.mask if self.mask is None or mask_path is None else MaskRef(mask_path, self.mask.label)
        return replace(self, image=image, mask=mask)


# ---------------------------------------------------------------------------------------------- validation


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _str_field(raw: Mapping[str, Any], name: str, *, optional: bool = False) -> str | None:
    value = raw.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _FieldError(name, f"must be a string, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise _FieldError(name, "must be a non-empty string")
    return value


def _number_list(name: str, value: Any, length: int, what: str) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)):
        raise _FieldError(name, f"{what} must be a list of {length} numbers, got {type(value).__name__}")
    if len(value) != length:
        raise _FieldError(name, f"{what} has {len(value)} numbers, expected {length}")
    bad = [v for v in value if not _is_number(v)]
    if bad:
        raise _FieldError(name, f"{what} holds a non-number {bad[0]!r}")
    out = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in out):
        raise _FieldError(name, f"{what} holds a non-finite value: {list(out)}")
    return out


def _validate(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Check and normalise every field; raise `_FieldError` on the first bad one."""
    out: dict[str, Any] = {}
    for name in ("id", "dataset", "image", "text"):
        out[name] = _str_field(raw, name)

    split = raw.get("split")
    if split not in SPLITS:
        raise _FieldError("split", f"must be one of {list(SPLITS)}, got {split!r}")
    out["split"] = split

    modality = raw.get("modality")
    if not isinstance(modality, str) or modality not in _MODALITIES:
        raise _FieldError(
            "modality",
            f"unknown modality {modality!r}; known: {sorted(_MODALITIES)} "
            "(a new modality is a preset registered with mg3d.data.modalities.register_preset in a user module; "
            "import it with --imports, docs/extending.md)",
        )
    out["modality"] = modality

    ndim = raw.get("ndim")
    if not _is_int(ndim) or ndim not in (2, 3):
        raise _FieldError("ndim", f"must be the integer 2 or 3, got {ndim!r}")
    ndim = int(ndim)
    out["ndim"] = ndim

    shape = raw.get("spatial_shape")
    if not isinstance(shape, (list, tuple)) or len(shape) != ndim:
        raise _FieldError("spatial_shape", f"must be a list of {ndim} positive integers, got {shape!r}")
    if not all(_is_int(s) and s > 0 for s in shape):
        raise _FieldError("spatial_shape", f"must hold positive integers, got {list(shape)}")
    out["spatial_shape"] = tuple(int(s) for s in shape)

    boxes = raw.get("boxes")
    if not isinstance(boxes, (list, tuple)) or not boxes:
        raise _FieldError("boxes", f"must be a non-empty list of boxes, got {boxes!r}")
    clean_boxes = []
    for i, box in enumerate(boxes):
        numbers = _number_list("boxes", box, 2 * ndim, f"box {i} (ndim={ndim})")
        try:
            validate_box(np.asarray(numbers), ndim, what=f"box {i}")
        except BoxError as err:
            raise _FieldError("boxes", str(err)) from None
        lo, hi = numbers[:ndim], numbers[ndim:]
        if any(v < 0 for v in lo) or any(h > s for h, s in zip(hi, out["spatial_shape"])):
            raise _FieldError(
                "boxes",
                f"box {i} {list(numbers)} lies outside the image of shape {list(out['spatial_shape'])}",
            )
        clean_boxes.append(numbers)
    out["boxes"] = tuple(clean_boxes)

    mask = raw.get("mask")
    if mask is None:
        out["mask"] = None
    else:
        if not isinstance(mask, Mapping) or set(mask) != {"path", "label"}:
            raise _FieldError(
                "mask", f"must be null or an object with exactly 'path' and 'label', got {mask!r}"
            )
        if not isinstance(mask["path"], str) or not mask["path"]:
            raise _FieldError("mask", f"'path' must be a non-empty string, got {mask['path']!r}")
        if not _is_int(mask["label"]):
            raise _FieldError("mask", f"'label' must be an integer, got {mask['label']!r}")
        out["mask"] = MaskRef(mask["path"], int(mask["label"]))

    out["category"] = _str_field(raw, "category", optional=True)

    qt = raw.get("question_type")
    if qt is not None and not _is_int(qt):
        raise _FieldError("question_type", f"must be null or an integer, got {qt!r}")
    out["question_type"] = None if qt is None else int(qt)

    spacing = raw.get("spacing")
    if spacing is None:
        out["spacing"] = None
    else:
        values = _number_list("spacing", spacing, ndim, "spacing")
        if any(v <= 0 for v in values):
            raise _FieldError("spacing", f"must be positive, got {list(values)}")
        out["spacing"] = values

    affine = raw.get("affine")
    if affine is None:
        out["affine"] = None
    else:
        n = ndim + 1
        if not isinstance(affine, (list, tuple)) or len(affine) != n:
            raise _FieldError("affine", f"must be null or a {n}x{n} matrix (list of {n} rows)")
        out["affine"] = tuple(
            _number_list("affine", row, n, f"affine row {r}") for r, row in enumerate(affine)
        )

    source = raw.get("source")
    if source is None:
        source = {}
    if not isinstance(source, Mapping):
        raise _FieldError("source", f"must be a JSON object, got {type(source).__name__}")
    try:
        json.dumps(source, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise _FieldError("source", f"is not JSON-serialisable: {err}") from None
    out["source"] = dict(source)
    return out


def record_from_dict(obj: Mapping[str, Any], *, where: str = "record") -> GroundingRecord:
    """Build a record from one manifest JSON object; errors are prefixed with ``where`` (file:line)."""
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    label = f"{where}: record {rid!r}" if isinstance(rid, str) else where
    version = obj.get("schema_version")
    if version is None:
        raise DataError(
            f"{label}: field 'schema_version': missing (this mg3d writes {MANIFEST_SCHEMA_VERSION})"
        )
    if not _is_int(version) or version < 1:
        raise DataError(f"{label}: field 'schema_version': must be a positive integer, got {version!r}")
    if version > MANIFEST_SCHEMA_VERSION:
        raise DataError(
            f"{label}: field 'schema_version': {version} is newer than this mg3d supports "
            f"({MANIFEST_SCHEMA_VERSION}); upgrade mg3d or re-run scripts/prepare_data.py"
        )
    missing = [name for name in _REQUIRED if name not in obj]
    if missing:
        raise DataError(f"{label}: field {missing[0]!r}: missing (required fields: {', '.join(_REQUIRED)})")
    unknown = sorted(set(obj) - set(_REQUIRED) - set(_OPTIONAL) - {"schema_version"})
    if unknown:
        raise DataError(
            f"{label}: field {unknown[0]!r}: unknown field (put provenance in 'source'); known fields: "
            f"{', '.join((*_REQUIRED, *_OPTIONAL))}"
        )
    try:
        clean = _validate(obj)
    except _FieldError as err:
        raise DataError(f"{label}: field {err.field!r}: {err.message}") from None
    return GroundingRecord(**clean)


# ---------------------------------------------------------------------------------------------- manifest I/O


def _resolve(path_value: str, base: Path) -> str:
    path = Path(path_value).expanduser()
    return str(path if path.is_absolute() else (base / path))


def iter_manifest(path: str | os.PathLike[str], *, resolve_paths: bool = True) -> Iterator[GroundingRecord]:
    """Yield the records of a JSONL manifest, validating each line.

    Relative image and mask paths are resolved against the manifest's folder when ``resolve_paths``.
    Raises :class:`DataError` naming ``path:line`` and the field on the first bad line, and on a
    duplicate id (naming both lines).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    base = path.resolve().parent
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl_objects(path):
        where = f"{path}:{lineno}"
        record = record_from_dict(obj, where=where)
        if record.id in seen:
            raise DataError(f"{where}: record {record.id!r}: field 'id': duplicate of line {seen[record.id]}")
        seen[record.id] = lineno
        if resolve_paths:
            mask_path = None if record.mask is None else _resolve(record.mask.path, base)
            record = record.with_paths(_resolve(record.image, base), mask_path)
        yield record


def read_manifest(path: str | os.PathLike[str], *, resolve_paths: bool = True) -> list[GroundingRecord]:
    """All records of a JSONL manifest (see :func:`iter_manifest`)."""
    return list(iter_manifest(path, resolve_paths=resolve_paths))


def _relative(path_value: str, base: Path) -> str:
    path = Path(path_value)
    if not path.is_absolute():
        return path_value
    return os.path.relpath(path, base)


def write_manifest(
    path: str | os.PathLike[str], records: Iterable[GroundingRecord], *, relative_paths: bool = False
) -> int:
    """Write records as JSONL (atomically and durably: :func:`mg3d.atomic.atomic_write`); return the count.

    With ``relative_paths`` absolute image/mask paths are rewritten relative to the manifest's folder,
    so a folder holding both data and manifests can be moved as a whole. Duplicate ids are refused.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.resolve().parent
    seen: set[str] = set()
    count = 0

    def write(handle: BinaryIO) -> None:
        nonlocal count
        for record in records:
            if not isinstance(record, GroundingRecord):
                raise DataError(f"{path}: can only write GroundingRecord, got {type(record).__name__}")
            if record.id in seen:
                raise DataError(f"{path}: record {record.id!r}: field 'id': duplicate id")
            seen.add(record.id)
            if relative_paths:
                mask_path = None if record.mask is None else _relative(record.mask.path, base)
                record = record.with_paths(_relative(record.image, base), mask_path)
            line = json.dumps(record.to_dict(), ensure_ascii=False, allow_nan=False) + "\n"
            handle.write(line.encode("utf-8"))
            count += 1

    atomic_write(path, write)
    return count
