"""A group's own images as grounding records: one table of (image, phrase, mask or box) rows.

The table is a CSV (header row) or JSONL file, or a folder holding ``phrases.csv``; relative paths resolve
against the table's folder. Images are anything mg3d's pipelines load (NIfTI, NRRD/MHA, a DICOM series folder,
PNG/JPEG, DICOM files); they are read with the pipelines' own MONAI loader, so a record's voxel frame is the
one training uses. Columns:

* ``image``, ``phrase`` (or ``text``) — required;
* ``mask`` (+ ``label``, default 1): the target is ``mask == label``, its box derived exactly and the mask
  carried in the record; or ``box``: ``lo… hi…`` numbers (space, comma or semicolon separated) in voxels or in
  RAS millimetres (``box_units`` column or the importer's ``box_units``: ``voxel`` / ``mm``);
* optional ``case`` (rows of one case stay in one split; default: the image), ``split`` (fixes it),
  ``category``, ``id``;
* PET in Bq/ml or counts (``pet_units``): ``injected_dose_bq``, ``patient_weight_kg``, ``injection_time``,
  ``scan_time``, optional ``half_life_s``, ``bqml_per_count`` (:mod:`mg3d.data.sources.pet`).

The modality is never guessed: the importer is given it (``--modality``), and it must be a registered key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mg3d.boxes import mask_to_box, world_to_voxel
from mg3d.data.jsonl import iter_jsonl_objects
from mg3d.data.records import GroundingRecord, known_modalities
from mg3d.data.sources._common import (
    Source,
    SourceError,
    check_box_in_image,
    check_fractions,
    normalise_split,
    parse_float,
    parse_int,
    read_csv_rows,
    seeded_group_split,
    short_hash,
)
from mg3d.data.sources.pet import F18_HALF_LIFE_S, PET_UNITS, suv_factor, write_suv_image
from mg3d.errors import DataError

__all__ = ["OWN_TABLE_NAME", "OwnDataSource"]

#: The table a folder given to the importer must hold.
OWN_TABLE_NAME = "phrases.csv"
_NUMBERS = re.compile(r"[\s,;\[\]()]+")


@dataclass
class _Row:
    line: int
    row: dict[str, str]
    image: Path
    case: str


@dataclass
class _Image:
    """What the loader says about one stored image (read once per image)."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None
    affine: tuple[tuple[float, ...], ...] | None


def _loader() -> Any:
    """MONAI's ``LoadImage`` with the readers mg3d's pipelines use (the same voxel frame as training)."""
    import warnings

    from monai.transforms import LoadImage

    from mg3d.data.readers import SimpleITKReader

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
        loader = LoadImage(image_only=True, ensure_channel_first=True)
    loader.register(SimpleITKReader())
    return loader


class OwnDataSource(Source):
    """Records from a user's table of images, phrases and masks or boxes (see the module doc).

    Args:
        table: a CSV or JSONL file, or a folder with ``phrases.csv``.
        modality: the modality key of every record (``CT``, ``MR``, ``PET`` or a registered preset).
        dataset: the data set name (record id prefix).
        box_units: unit of ``box`` values for rows without a ``box_units`` column: ``voxel`` or ``mm``.
        val_fraction, test_fraction, seed: case-level split of rows without a ``split``.
        pet_units: ``BQML`` or ``CNTS`` to convert PET images to SUV (written as NIfTI under ``converted_dir``);
            ``None`` when the images already hold SUV (or are not PET).
        converted_dir: where converted images go (needed with ``pet_units``).
        on_error: ``"raise"`` or ``"skip"`` (each bad row counted with its reason).
    """

    dataset = "own"

    def __init__(
        self,
        table: str | os.PathLike[str],
        *,
        modality: str,
        dataset: str | None = None,
        box_units: str = "voxel",
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        pet_units: str | None = None,
        converted_dir: str | os.PathLike[str] | None = None,
        on_error: str = "raise",
    ) -> None:
        super().__init__(on_error, dataset)
        if modality not in known_modalities():
            raise DataError(
                f"modality {modality!r} is not a registered key; known: {sorted(known_modalities())} (register a "
                "preset in a user module and pass --imports)"
            )
        if box_units not in ("voxel", "mm"):
            raise DataError(f"box_units must be 'voxel' or 'mm', got {box_units!r}")
        if pet_units is not None and pet_units not in PET_UNITS:
            raise DataError(f"pet_units must be one of {list(PET_UNITS)}, got {pet_units!r}")
        if pet_units is not None and converted_dir is None:
            raise DataError("pet_units needs converted_dir (where the SUV images are written)")
        check_fractions(val_fraction, test_fraction)
        self.modality, self.box_units, self.pet_units = modality, box_units, pet_units
        self.converted_dir = None if converted_dir is None else Path(converted_dir)
        path = Path(table).expanduser()
        if path.is_dir():
            path = path / OWN_TABLE_NAME
        self.table = path
        base = path.resolve().parent
        for line, row in self._read_rows(path):
            image = Path(row.get("image", "")).expanduser()
            image = image if image.is_absolute() else base / image
            case = row.get("case") or image.name
            self._items.append(_Row(line, row, image, case))
        self._splits = seeded_group_split(
            [r.case for r in self._items], val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
        )
        self._base = base
        self._images: dict[Path, _Image | SourceError] = {}
        self._suv: dict[Path, Path] = {}
        self._ids: dict[str, int] = {}
        self._load: Any = None

    # ------------------------------------------------------------------------------------------ table

    @staticmethod
    def _read_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
        if not path.is_file():
            raise DataError(
                f"{path}: table not found (a CSV or JSONL file, or a folder with {OWN_TABLE_NAME})"
            )
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            rows: list[tuple[int, dict[str, str]]] = []
            for lineno, obj in iter_jsonl_objects(path):
                flat = {k: " ".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in obj.items()
                        if v is not None}  # fmt: skip
                rows.append((lineno, flat))
        else:
            names, csv_rows = read_csv_rows(path, ["image"])
            if "phrase" not in names and "text" not in names:
                raise DataError(f"{path}: needs a 'phrase' (or 'text') column; header is {names}")
            rows = [(line, dict(row)) for line, row in csv_rows]
        if not rows:
            raise DataError(f"{path}: holds no rows")
        return rows

    def _item_name(self, item: _Row) -> str:
        return f"{self.table.name}:{item.line}"

    # ------------------------------------------------------------------------------------------ images

    def _image(self, path: Path, what: str) -> _Image:
        cached = self._images.get(path)
        if isinstance(cached, SourceError):
            raise cached
        if cached is not None:
            return cached
        try:
            img = self._read(path, what)
            found: _Image | SourceError = _Image(
                tuple(int(s) for s in img.shape[1:]), *self._geometry(img, len(img.shape) - 1)
            )
        except SourceError as err:
            found = err
        self._images[path] = found
        if isinstance(found, SourceError):
            raise found
        return found

    def _read(self, path: Path, what: str) -> Any:
        if not path.exists():
            raise SourceError(f"{what}: {path} not found", "missing_file")
        if self._load is None:
            self._load = _loader()
        try:
            img = self._load(str(path))
        except Exception as err:  # MONAI wraps every reader failure
            raise SourceError(
                f"{what}: cannot read {path}: {type(err).__name__}: {err}", "bad_image"
            ) from None
        if img.ndim == 5 and img.shape[1] == 1:  # a stored channel axis, as the pipeline's loader drops it
            img = img[:, 0]
        if img.ndim - 1 not in (2, 3):
            raise SourceError(
                f"{what}: {path} loads as {tuple(img.shape[1:])}; expected 2D or 3D", "bad_image"
            )
        return img

    @staticmethod
    def _geometry(
        img: Any, ndim: int
    ) -> tuple[tuple[float, ...] | None, tuple[tuple[float, ...], ...] | None]:
        if ndim == 2:  # radiographs / photos: no world frame in mg3d
            return None, None
        affine = np.asarray(img.meta.get("original_affine", img.affine), dtype=np.float64)
        spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
        return spacing, tuple(tuple(float(v) for v in row) for row in affine)

    def _pet_image(self, item: _Row, where: str) -> Path:
        """The SUV copy of a PET image (written once per image)."""
        if item.image in self._suv:
            return self._suv[item.image]
        row = item.row

        def number(key: str, default: float | None = None) -> float:
            if not row.get(key):
                if default is None:
                    raise SourceError(f"{where}: PET in {self.pet_units} needs the column {key!r}", "bad_row")
                return default
            return parse_float(row[key], f"{where}: {key}")

        try:
            factor = suv_factor(
                number("injected_dose_bq"), number("patient_weight_kg"), row.get("injection_time", ""),
                row.get("scan_time", ""), half_life_s=number("half_life_s", F18_HALF_LIFE_S), what=where,
            )  # fmt: skip
            per_count = number("bqml_per_count") if self.pet_units == "CNTS" else None
            assert self.converted_dir is not None
            name = f"{short_hash(str(item.image.resolve()), 12)}_{item.case}_suv.nii.gz"
            out = write_suv_image(item.image, self.converted_dir / name, factor, units=str(self.pet_units),
                                  bqml_per_count=per_count, what=where)  # fmt: skip
        except SourceError:
            raise
        except DataError as err:
            raise SourceError(str(err), "bad_row") from None
        self._suv[item.image] = out.resolve()
        return self._suv[item.image]

    # ------------------------------------------------------------------------------------------ records

    def _boxes(self, item: _Row, info: _Image, where: str) -> tuple[tuple[float, ...], dict[str, Any] | None]:
        row, ndim = item.row, len(info.shape)
        if row.get("mask") and row.get("box"):
            raise SourceError(f"{where}: give a mask or a box, not both", "bad_row")
        if row.get("mask"):
            mask_path = Path(row["mask"]).expanduser()
            mask_path = mask_path if mask_path.is_absolute() else self._base / mask_path
            label = parse_int(row["label"], f"{where}: label") if row.get("label") else 1
            mask = self._read(mask_path, f"{where}: mask")
            if tuple(mask.shape[1:]) != info.shape:
                raise SourceError(
                    f"{where}: mask {mask_path} has shape {tuple(mask.shape[1:])}, the image {info.shape}",
                    "shape_mismatch",
                )
            target = np.asarray(mask[0]) == label
            if not target.any():
                raise SourceError(
                    f"{where}: mask {mask_path} has no voxel with label {label}", "label_absent"
                )
            box = tuple(float(v) for v in mask_to_box(target))
            return box, {"path": str(mask_path.resolve()), "label": label}
        if not row.get("box"):
            raise SourceError(f"{where}: needs a 'mask' or a 'box'", "bad_row")
        values = [parse_float(v, f"{where}: box") for v in _NUMBERS.split(row["box"].strip()) if v]
        if len(values) != 2 * ndim:
            raise SourceError(
                f"{where}: box {row['box']!r} has {len(values)} numbers; a {ndim}D image needs {2 * ndim}",
                "bad_box",
            )
        units = row.get("box_units") or self.box_units
        if units not in ("voxel", "mm"):
            raise SourceError(f"{where}: box_units must be 'voxel' or 'mm', got {units!r}", "bad_row")
        box = np.asarray(values, dtype=np.float64)
        if units == "mm":
            if info.affine is None:
                raise SourceError(
                    f"{where}: a box in mm needs an image with geometry (not {ndim}D)", "bad_box"
                )
            box = world_to_voxel(box, info.affine)[0]
        box = check_box_in_image(box, info.shape, where, tolerance=1e-6 if units == "voxel" else 1e-3)
        return tuple(float(v) for v in box), None

    def _build(self, item: _Row) -> GroundingRecord:
        where = f"{self.table}:{item.line}"
        row = item.row
        phrase = (row.get("phrase") or row.get("text") or "").strip()
        if not phrase:
            raise SourceError(f"{where}: empty phrase", "bad_row")
        if not row.get("image"):
            raise SourceError(f"{where}: empty image path", "bad_row")
        info = self._image(item.image, where)
        box, mask = self._boxes(item, info, where)
        image = item.image.resolve()
        if self.pet_units is not None:
            image = self._pet_image(item, where)
        split = (
            normalise_split(row["split"], f"{where}: split") if row.get("split") else self._splits[item.case]
        )
        base_id = row.get("id") or f"{self.dataset}/{item.case}/{short_hash(phrase, 8)}"
        n = self._ids.get(base_id, 0) + 1
        self._ids[base_id] = n
        return GroundingRecord(
            id=base_id if n == 1 else f"{base_id}-{n}",
            dataset=self.dataset,
            split=split,
            modality=self.modality,
            ndim=len(info.shape),
            image=str(image),
            text=phrase,
            boxes=(box,),
            spatial_shape=info.shape,
            mask=mask,
            category=row.get("category") or None,
            spacing=info.spacing,
            affine=info.affine,
            source={"table": self.table.name, "line": item.line, "case": item.case,
                    **({"original_image": str(item.image.resolve())} if self.pet_units else {})},
        )  # fmt: skip
