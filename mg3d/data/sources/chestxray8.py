"""NIH ChestX-ray8 boxes (``BBox_List_2017.csv``) as grounding records.

The box file's header is malformed as published — ``Image Index,Finding Label,Bbox [x,y,w,h],,,`` — so
the four box columns are named ``Bbox [x``, ``y``, ``w``, ``h]`` followed by empty columns; they are
renamed here by position. Boxes are float pixels ``x, y, w, h`` (x = column) on the 1024×1024 PNGs,
which become ``[x, y, x + w, y + h]`` in the voxel frame. The box file says ``Infiltrate`` where the
label file (``Data_Entry_2017.csv``) says ``Infiltration``; categories use the label file's names.

The data set has no phrases: one is made from the finding with a small set of templates, chosen per
record from a seed (so it is stable across runs and row orders). The split is seeded, by patient when
``Data_Entry_2017.csv`` (with its ``Patient ID`` column) is given, otherwise by image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mg3d.data.records import GroundingRecord
from mg3d.data.sources._common import (
    DEFAULT_MAX_PIXELS,
    Source,
    SourceError,
    check_box_in_image,
    check_fractions,
    find_in_tree,
    parse_float,
    read_csv_rows,
    read_image_header_2d,
    require_file,
    seeded_group_split,
    stable_choice,
    xywh_to_box,
)
from mg3d.errors import DataError

__all__ = ["CANONICAL_FINDINGS", "DEFAULT_TEMPLATES", "FINDING_PHRASES", "ChestXray8Source", "bbox_header"]

# Box-file label → label-file (Data_Entry) name.
CANONICAL_FINDINGS = {"Infiltrate": "Infiltration"}

# Finding → noun phrase used in the templates.
FINDING_PHRASES = {
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Effusion": "pleural effusion",
    "Infiltration": "pulmonary infiltration",
    "Mass": "a mass",
    "Nodule": "a nodule",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
}

DEFAULT_TEMPLATES = (
    "{finding}",
    "the region showing {finding}",
    "an area consistent with {finding}",
    "findings of {finding} on this chest radiograph",
)

_BOX_COLUMNS = ("x", "y", "w", "h")


def bbox_header(header: list[str]) -> list[str]:
    """Canonical column names for ``BBox_List_2017.csv``, whatever way its box columns were split.

    Handles the published header (``Bbox [x``, ``y``, ``w``, ``h]`` + empty columns), a single
    ``Bbox [x,y,w,h]`` cell followed by three more value columns, and plain ``x, y, w, h``.
    """
    names = [h.strip() for h in header]
    out: list[str] = []
    i = 0
    while i < len(names):
        token = names[i].lower().replace("bbox", "").replace("[", "").replace("]", "").replace(" ", "")
        if token == "x,y,w,h":
            out.extend(_BOX_COLUMNS)
            i += 4 if all(not n for n in names[i + 1 : i + 4]) else 1
            continue
        out.append(token if token in _BOX_COLUMNS else names[i])
        i += 1
    return out


@dataclass
class _Group:
    image: str
    label: str
    rows: list[tuple[int, dict[str, str]]]


class ChestXray8Source(Source):
    """Records from ``BBox_List_2017.csv`` and the folder of ChestX-ray8 PNGs.

    Args:
        bbox_csv: ``BBox_List_2017.csv``.
        image_root: folder holding the PNGs, directly or in sub-folders (``images_001/images/…``).
        data_entry_csv: ``Data_Entry_2017.csv`` (or ``_v2020``); enables the split by patient.
        test_list, train_val_list: the official ``test_list.txt`` / ``train_val_list.txt``. With
            ``test_list`` its images are the test split and ``val_fraction`` of the others (by patient)
            is val; ``test_fraction`` is then unused. An image in neither given list is an error.
        val_fraction, test_fraction, seed: the seeded split (and the template choice).
        templates: phrase templates with a ``{finding}`` field.
        expected_size: the image size the boxes refer to (1024×1024); a different stored size is an error
            unless ``rescale_to_image`` (then boxes are scaled per axis). ``None`` skips the check.
    """

    dataset = "chestxray8"

    def __init__(
        self,
        bbox_csv: str | os.PathLike[str],
        image_root: str | os.PathLike[str],
        *,
        data_entry_csv: str | os.PathLike[str] | None = None,
        test_list: str | os.PathLike[str] | None = None,
        train_val_list: str | os.PathLike[str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        expected_size: tuple[int, int] | None = (1024, 1024),
        rescale_to_image: bool = False,
        box_tolerance: float = 0.0,
        verify_images: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        on_error: str = "raise",
        dataset: str | None = None,
    ) -> None:
        super().__init__(on_error, dataset)
        self.bbox_csv = Path(bbox_csv)
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise DataError(f"{self.image_root}: image root folder not found")
        if not templates or any("{finding}" not in t for t in templates):
            raise DataError(f"every phrase template needs a '{{finding}}' field, got {list(templates)}")
        check_fractions(val_fraction, test_fraction)
        self.templates = tuple(templates)
        self.seed = seed
        self.expected_size = expected_size
        self.rescale_to_image = rescale_to_image
        self.box_tolerance = box_tolerance
        self.verify_images = verify_images
        self.max_pixels = max_pixels

        _names, rows = read_csv_rows(
            self.bbox_csv, ("Image Index", "Finding Label", *_BOX_COLUMNS), rename=bbox_header
        )
        groups: dict[tuple[str, str], _Group] = {}
        for line, row in rows:
            label = CANONICAL_FINDINGS.get(row["Finding Label"], row["Finding Label"])
            key = (row["Image Index"], label)
            groups.setdefault(key, _Group(row["Image Index"], label, [])).rows.append((line, row))
        self._items = list(groups.values())

        self.data_entry_csv = None if data_entry_csv is None else Path(data_entry_csv)
        self._patients: dict[str, str] = {}
        if self.data_entry_csv is not None:
            _, entries = read_csv_rows(self.data_entry_csv, ("Image Index", "Patient ID"))
            self._patients = {row["Image Index"]: row["Patient ID"] for _, row in entries}
        if train_val_list is not None and test_list is None:
            raise DataError("train_val_list needs test_list too (the official split is the pair)")
        self.test_list = None if test_list is None else Path(test_list)
        self._test_images = _read_list(self.test_list) if self.test_list is not None else set()
        self._train_val_images = None if train_val_list is None else _read_list(Path(train_val_list))
        pool = [self._group_key(g) for g in self._items if g.image not in self._test_images]
        self._splits = seeded_group_split(
            [k for k in pool if k is not None],
            val_fraction=val_fraction,
            test_fraction=0.0 if self.test_list is not None else test_fraction,
            seed=seed,
        )
        self._image_index: dict[str, Path] | None = None

    def _group_key(self, group: _Group) -> str | None:
        if self.data_entry_csv is None:
            return f"image:{group.image}"
        patient = self._patients.get(group.image)
        return None if not patient else f"patient:{patient}"

    def _find_image(self, name: str) -> Path | None:
        direct = self.image_root / name
        if direct.is_file():
            return direct
        if self._image_index is None:  # one walk over the tree, only when images are nested
            self._image_index = find_in_tree(self.image_root, {g.image for g in self._items})
        return self._image_index.get(name)

    def _item_name(self, item: _Group) -> str:
        lines = ",".join(str(line) for line, _ in item.rows)
        return f"{self.bbox_csv.name}:{lines} ({item.image}: {item.label})"

    def phrase(self, record_id: str, label: str) -> tuple[str, int]:
        """The phrase for a finding and the index of the template used."""
        finding = FINDING_PHRASES.get(label, label.replace("_", " ").lower())
        index = stable_choice(record_id, len(self.templates), self.seed)
        return self.templates[index].format(finding=finding), index

    def _build(self, item: _Group) -> GroundingRecord:
        first_line = item.rows[0][0]
        where = f"{self.bbox_csv}:{first_line}"
        if not item.image or not item.label:
            raise SourceError(f"{where}: empty Image Index or Finding Label", "bad_row")
        key = self._group_key(item)
        if key is None:
            raise SourceError(
                f"{where}: image {item.image} has no Patient ID in {self.data_entry_csv}", "missing_patient"
            )
        if item.image in self._test_images:
            split = "test"
        elif self._train_val_images is not None and item.image not in self._train_val_images:
            raise SourceError(
                f"{where}: image {item.image} is in neither test_list nor train_val_list", "missing_split"
            )
        else:
            split = self._splits[key]
        image = self._find_image(item.image)
        if image is None:
            raise SourceError(
                f"{where}: image {item.image} not found under {self.image_root}", "missing_file"
            )
        header = read_image_header_2d(image, max_pixels=self.max_pixels, verify=self.verify_images)
        scale = np.ones(4)
        if self.expected_size is not None and header.spatial_shape != tuple(self.expected_size):
            if not self.rescale_to_image:
                raise SourceError(
                    f"{where}: image {image} is {header.spatial_shape[0]}×{header.spatial_shape[1]}, but the "
                    f"boxes refer to {self.expected_size[0]}×{self.expected_size[1]}; pass rescale_to_image=True "
                    "(--rescale-to-image) for resized copies",
                    "size_mismatch",
                )
            sx = header.spatial_shape[0] / self.expected_size[0]
            sy = header.spatial_shape[1] / self.expected_size[1]
            scale = np.asarray([sx, sy, sx, sy])
        boxes, raw = [], []
        for line, row in item.rows:
            at = f"{self.bbox_csv}:{line}"
            x, y, w, h = (parse_float(row[c], f"{at}: {c}") for c in _BOX_COLUMNS)
            raw.append([x, y, w, h])
            box = xywh_to_box(x, y, w, h, at) * scale
            boxes.append(
                tuple(check_box_in_image(box, header.spatial_shape, at, self.box_tolerance).tolist())
            )
        record_id = f"{self.dataset}/{Path(item.image).stem}/{item.label}"
        text, template = self.phrase(record_id, item.label)
        source = {
            "csv": self.bbox_csv.name,
            "lines": [line for line, _ in item.rows],
            "image_index": item.image,
            "finding_label": item.rows[0][1]["Finding Label"],
            "boxes_xywh": raw,
            "template": template,
        }
        return GroundingRecord(
            id=record_id,
            dataset=self.dataset,
            split=split,
            modality="CXR",
            ndim=2,
            image=str(image.resolve()),
            text=text,
            boxes=tuple(boxes),
            spatial_shape=header.spatial_shape,
            category=item.label,
            spacing=header.spacing if np.all(scale == 1) else None,
            source=source,
        )


def _read_list(path: Path) -> set[str]:
    """Image names of an official split list (one per line)."""
    require_file(path, "split list")
    return {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
