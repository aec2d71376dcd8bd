"""MS-CXR (PhysioNet release) and the MedRPG split used by MedGround-R1, as grounding records.

MS-CXR ships annotations only: a CSV with ``dicom_id, category_name, label_text, path, x, y, w, h,
image_width, image_height[, split]`` (``split`` since v1.1.0); images come from MIMIC-CXR-JPG (or, as
DICOM, from MIMIC-CXR). Boxes are pixel ``x, y, w, h`` (x = column) in the image of size
``image_width × image_height``; several rows with the same image and phrase are one target with
several boxes. In the voxel frame (axis 0 = column) a row becomes ``[x, y, x + w, y + h]``.

The MedRPG split (what MedGround-R1 trained on) is a VLM-R1 style JSON list of
``{"image", "problem", "solution"}`` with ``solution = [x1, y1, x2, y2]`` in pixels of MedRPG's
resized images (640 px on the long side); ``problem`` is the instruction
"Please provide the bounding box coordinate of the region this sentence describes: {phrase}.".
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mg3d.boxes import validate_box
from mg3d.data.records import GroundingRecord
from mg3d.data.sources._common import (
    DEFAULT_MAX_PIXELS,
    ImageHeader,
    Source,
    SourceError,
    check_box_in_image,
    check_fractions,
    mimic_patient,
    normalise_split,
    parse_float,
    read_csv_rows,
    read_image_header_2d,
    require_file,
    seeded_group_split,
    short_hash,
    wrap_box_error,
    xywh_to_box,
)
from mg3d.errors import DataError

__all__ = ["MEDRPG_PROMPT_PREFIX", "MSCXR_COLUMNS", "MSCXRSource", "MedRPGSource"]

MSCXR_COLUMNS = ("dicom_id", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height")
MEDRPG_PROMPT_PREFIX = "Please provide the bounding box coordinate of the region this sentence describes:"


def _image_path(root: Path, rel: str, image_ext: str | None) -> tuple[Path, list[Path]]:
    """Find a MIMIC image: ``root/path``, or without the leading ``files/`` (roots that end in files/)."""
    rel = rel.replace("\\", "/").lstrip("/")
    candidates = [rel]
    if rel.startswith("files/"):
        candidates.append(rel[len("files/") :])
    tried = []
    for cand in candidates:
        path = root / cand
        if image_ext:
            path = path.with_suffix(image_ext if image_ext.startswith(".") else f".{image_ext}")
        tried.append(path)
        if path.is_file():
            return path, tried
    return tried[0], tried


def _scale_to_image(
    header: ImageHeader, claimed: tuple[float, float], rescale: bool, what: str
) -> tuple[float, float]:
    """Factors from the annotation's pixel frame to the stored image's; refuse a silent size mismatch."""
    width, height = header.spatial_shape
    if (width, height) == claimed:
        return 1.0, 1.0
    if not rescale:
        raise SourceError(
            f"{what}: image {header.path} is {width}×{height} but the annotation says "
            f"{claimed[0]:g}×{claimed[1]:g}; use the original-size images or pass rescale_to_image=True "
            "(--rescale-to-image) if these are resized copies",
            "size_mismatch",
        )
    return width / claimed[0], height / claimed[1]


@dataclass
class _Group:
    key: tuple[str, str]
    rows: list[tuple[int, dict[str, str]]]


class MSCXRSource(Source):
    """Records from an MS-CXR CSV and a MIMIC-CXR-JPG (or DICOM) image root.

    Args:
        csv_path: ``MS_CXR_Local_Alignment_v1.x.0.csv``.
        image_root: folder the CSV's ``path`` column is relative to (with or without its ``files/``).
        image_ext: replace the image suffix (``".dcm"`` for MIMIC-CXR DICOMs, ``".png"`` for converted copies).
        rescale_to_image: accept images whose size differs from ``image_width/height`` (resized copies)
            and scale the boxes by the per-axis size ratio; otherwise such a mismatch is an error.
        val_fraction, test_fraction, split_seed: used only when the CSV has no ``split`` column (v1.0.0):
            a seeded split by patient (the ``pNNNNNNNN`` folder of ``path``).
        box_tolerance: boxes outside the image by at most this many pixels are clipped, not refused.
        verify_images: decode each image once to catch truncated files now rather than mid-training.
        on_error: ``"raise"`` or ``"skip"`` (skips are listed in ``self.skips``).
    """

    dataset = "mscxr"

    def __init__(
        self,
        csv_path: str | os.PathLike[str],
        image_root: str | os.PathLike[str],
        *,
        image_ext: str | None = None,
        rescale_to_image: bool = False,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        box_tolerance: float = 0.0,
        verify_images: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        on_error: str = "raise",
        dataset: str | None = None,
    ) -> None:
        super().__init__(on_error, dataset)
        self.csv_path = Path(csv_path)
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise DataError(f"{self.image_root}: image root folder not found")
        self.image_ext = image_ext
        self.rescale_to_image = rescale_to_image
        self.box_tolerance = box_tolerance
        self.verify_images = verify_images
        self.max_pixels = max_pixels
        check_fractions(val_fraction, test_fraction)
        names, rows = read_csv_rows(self.csv_path, MSCXR_COLUMNS)
        self.has_split = "split" in names
        self.has_category = "category_name" in names
        groups: dict[tuple[str, str], _Group] = {}
        for line, row in rows:
            key = (row["dicom_id"], row["label_text"])
            groups.setdefault(key, _Group(key, [])).rows.append((line, row))
        self._items = list(groups.values())
        self._splits: dict[str, str] = {}
        if not self.has_split:
            patients = [mimic_patient(g.rows[0][1]["path"]) or g.key[0] for g in self._items]
            self._splits = seeded_group_split(
                patients, val_fraction=val_fraction, test_fraction=test_fraction, seed=split_seed
            )
            self._patient = dict(zip([g.key for g in self._items], patients))

    def _item_name(self, item: _Group) -> str:
        lines = ",".join(str(line) for line, _ in item.rows)
        return f"{self.csv_path.name}:{lines} ({item.key[0]}: {item.key[1]!r})"

    def _build(self, item: _Group) -> GroundingRecord:
        dicom_id, phrase = item.key
        first_line, first = item.rows[0]
        where = f"{self.csv_path}:{first_line}"
        if not dicom_id or not phrase:
            raise SourceError(f"{where}: empty dicom_id or label_text", "bad_row")
        for line, row in item.rows[1:]:
            for column in ("path", "image_width", "image_height", "split", "category_name"):
                if row.get(column) != first.get(column):
                    raise SourceError(
                        f"{self.csv_path}:{line}: column {column!r} is {row.get(column)!r} but line {first_line} "
                        f"of the same image and phrase says {first.get(column)!r}",
                        "bad_row",
                    )
        claimed = (
            parse_float(first["image_width"], f"{where}: image_width"),
            parse_float(first["image_height"], f"{where}: image_height"),
        )
        image, tried = _image_path(self.image_root, first["path"], self.image_ext)
        if not image.is_file():
            raise SourceError(
                f"{where}: image not found for dicom_id {dicom_id} (tried {', '.join(map(str, tried))})",
                "missing_file",
            )
        header = read_image_header_2d(image, max_pixels=self.max_pixels, verify=self.verify_images)
        sx, sy = _scale_to_image(header, claimed, self.rescale_to_image, where)
        boxes, raw_boxes = [], []
        for line, row in item.rows:
            at = f"{self.csv_path}:{line}"
            x, y, w, h = (parse_float(row[c], f"{at}: {c}") for c in ("x", "y", "w", "h"))
            raw_boxes.append([x, y, w, h])
            box = xywh_to_box(x, y, w, h, at) * np.asarray([sx, sy, sx, sy])
            boxes.append(check_box_in_image(box, header.spatial_shape, at, self.box_tolerance).tolist())
        if self.has_split:
            split = normalise_split(first["split"], f"{where}: split")
        else:
            split = self._splits[self._patient[item.key]]
        source: dict[str, Any] = {
            "csv": self.csv_path.name,
            "lines": [line for line, _ in item.rows],
            "dicom_id": dicom_id,
            "boxes_xywh": raw_boxes,
            "annotation_size": list(claimed),
        }
        if (sx, sy) != (1.0, 1.0):
            source["rescaled"] = [sx, sy]
        return GroundingRecord(
            id=f"{self.dataset}/{dicom_id}/{short_hash(phrase)}",
            dataset=self.dataset,
            split=split,
            modality="CXR",
            ndim=2,
            image=str(image.resolve()),
            text=phrase,
            boxes=tuple(tuple(b) for b in boxes),
            spatial_shape=header.spatial_shape,
            category=(first.get("category_name") or None) if self.has_category else None,
            spacing=None if (sx, sy) != (1.0, 1.0) else header.spacing,
            source=source,
        )


def _load_json_items(path: Path) -> list[Any]:
    """A JSON list (``.json``) or JSON lines (``.jsonl``); VLM-R1 accepts both."""
    require_file(path, "MedRPG split file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SourceError(f"{path}: not UTF-8 text ({err.reason})", "bad_json") from None
    if path.suffix.lower() == ".jsonl":
        data = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise SourceError(f"{path}:{lineno}: not valid JSON ({err.msg})", "bad_json") from None
        return data
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SourceError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})", "bad_json") from None
    if not isinstance(data, list):
        raise SourceError(f"{path}: expected a JSON list of items, got {type(data).__name__}", "bad_json")
    return data


def phrase_from_problem(problem: str) -> str:
    """The referring phrase inside a MedRPG/VLM-R1 ``problem`` (the instruction prefix and its final '.' removed)."""
    text = problem.strip()
    if text.startswith(MEDRPG_PROMPT_PREFIX):
        text = text[len(MEDRPG_PROMPT_PREFIX) :].strip()
        if text.endswith("."):
            text = text[:-1].rstrip()
    return text


class MedRPGSource(Source):
    """Records from MedRPG-split JSON files (one per split) and the folder of their images.

    Args:
        split_files: ``{"train": path, "val": path, "test": path}`` (any subset).
        image_root: folder the items' ``image`` paths are relative to.
        long_side: the long side, in pixels, of the images ``solution`` refers to (640 for MedRPG);
            ``None`` disables the check.
        rescale_to_image: accept images of another size (e.g. the original MIMIC JPEGs) and scale boxes by
            ``image long side / long_side`` (MedRPG resized keeping the aspect ratio).
    """

    dataset = "mscxr_medrpg"

    def __init__(
        self,
        split_files: Mapping[str, str | os.PathLike[str]],
        image_root: str | os.PathLike[str],
        *,
        long_side: int | None = 640,
        rescale_to_image: bool = False,
        box_tolerance: float = 0.0,
        verify_images: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        on_error: str = "raise",
        dataset: str | None = None,
    ) -> None:
        super().__init__(on_error, dataset)
        if not split_files:
            raise DataError("MedRPGSource needs at least one split file (train/val/test)")
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise DataError(f"{self.image_root}: image root folder not found")
        self.long_side = long_side
        self.rescale_to_image = rescale_to_image
        self.box_tolerance = box_tolerance
        self.verify_images = verify_images
        self.max_pixels = max_pixels
        for split, file in split_files.items():
            split = normalise_split(split, "split_files")
            path = Path(file)
            for index, entry in enumerate(_load_json_items(path)):
                self._items.append((split, path, index, entry))

    def _item_name(self, item: tuple[str, Path, int, Any]) -> str:
        return f"{item[1].name}[{item[2]}]"

    def _build(self, item: tuple[str, Path, int, Any]) -> GroundingRecord:
        split, path, index, entry = item
        where = f"{path}[{index}]"
        if not isinstance(entry, Mapping):
            raise SourceError(f"{where}: item is not a JSON object", "bad_row")
        missing = [k for k in ("image", "problem", "solution") if k not in entry]
        if missing:
            raise SourceError(f"{where}: item lacks key(s) {missing}", "bad_row")
        solution = entry["solution"]
        if (
            not isinstance(solution, list)
            or len(solution) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in solution)
        ):
            raise SourceError(f"{where}: 'solution' must be [x1, y1, x2, y2], got {solution!r}", "bad_box")
        phrase = entry.get("normal_caption") or phrase_from_problem(str(entry["problem"]))
        if not phrase:
            raise SourceError(f"{where}: empty phrase in 'problem' {entry['problem']!r}", "bad_row")
        image = self.image_root / str(entry["image"])
        if not image.is_file():
            raise SourceError(f"{where}: image not found: {image}", "missing_file")
        header = read_image_header_2d(image, max_pixels=self.max_pixels, verify=self.verify_images)
        scale = 1.0
        if self.long_side is not None and max(header.spatial_shape) != self.long_side:
            if not self.rescale_to_image:
                raise SourceError(
                    f"{where}: image {image} is {header.spatial_shape[0]}×{header.spatial_shape[1]}, but MedRPG "
                    f"boxes are on images {self.long_side} px on the long side; point image_root at those "
                    "images or pass rescale_to_image=True (--rescale-to-image)",
                    "size_mismatch",
                )
            scale = max(header.spatial_shape) / self.long_side
        box = np.asarray(solution, dtype=np.float64) * scale
        box = wrap_box_error(lambda: validate_box(box, 2, what=f"{where}: solution"), where)
        box = check_box_in_image(box, header.spatial_shape, where, self.box_tolerance)
        source: dict[str, Any] = {
            "json": path.name,
            "index": index,
            "problem": entry["problem"],
            "solution": solution,
        }
        if scale != 1.0:
            source["rescaled"] = scale
        return GroundingRecord(
            id=f"{self.dataset}/{split}/{index:05d}",
            dataset=self.dataset,
            split=split,
            modality="CXR",
            ndim=2,
            image=str(image.resolve()),
            text=phrase,
            boxes=(tuple(box.tolist()),),
            spatial_shape=header.spatial_shape,
            category=entry.get("category") if isinstance(entry.get("category"), str) else None,
            spacing=header.spacing if scale == 1.0 else None,
            source=source,
        )
