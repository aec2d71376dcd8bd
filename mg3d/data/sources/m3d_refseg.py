"""M3D-RefSeg (BAAI, HF ``GoodBaiBai88/M3D-RefSeg``) as grounding records, from NIfTI or M3D's npy variant.

Layout as distributed: ``<root>/sNNNN/{ct.nii.gz, mask.nii.gz, text.json, text_zh.txt}`` plus
``M3D_RefSeg_{train,test,all}.csv`` with columns ``Image, Mask, Mask_ID, Question_Type, Question, Answer``.
``mask.nii.gz`` is one integer label map per case; a CSV row's target is ``mask == Mask_ID``, and
``text.json`` maps the region id (a string) to its English description. One record per CSV row:
text = the row's ``Question`` (``Question_Type`` 0 = description-based, 1 = reasoning-based), box = the
tight half-open box of the target in the NIfTI's own voxel frame (i, j, k — no reorientation),
spacing and affine from the header.

The preprocessed variant (``M3D_RefSeg_npy/sNNNN/{ct.npy, mask.npy}``, arrays ``1×D×H×W`` after M3D's
crop-and-resize to 32×256×256) has boxes in its array axes (D, H, W) and no physical geometry, so
spacing and affine are ``None``. The CSV paths still name ``.nii.gz`` files; they are remapped to ``.npy``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mg3d.boxes import mask_to_box
from mg3d.data.records import GroundingRecord, known_modalities
from mg3d.data.sources._common import (
    DEFAULT_MAX_VOXELS,
    ImageHeader,
    Source,
    SourceError,
    check_fractions,
    load_nifti_array,
    load_npy,
    parse_int,
    read_csv_rows,
    read_nifti,
    read_npy_header,
    require_file,
    seeded_group_split,
    short_hash,
    wrap_box_error,
)
from mg3d.errors import DataError

__all__ = ["M3D_REFSEG_COLUMNS", "M3DRefSegSource"]

M3D_REFSEG_COLUMNS = ("Image", "Mask", "Mask_ID", "Question_Type", "Question", "Answer")
Variant = Literal["nifti", "npy"]


@dataclass
class _Row:
    csv: Path
    line: int
    row: dict[str, str]
    origin: str  # "train", "test" or "all": which CSV, decides how the split is drawn
    image: Path
    mask: Path
    case: str


@dataclass
class _Case:
    """What one case contributes to every row that points at it (computed once)."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None
    affine: tuple[tuple[float, ...], ...] | None
    boxes: dict[int, tuple[float, ...]] = field(default_factory=dict)


class M3DRefSegSource(Source):
    """Records from an M3D-RefSeg folder and its CSVs.

    Args:
        root: the folder holding the ``sNNNN`` case folders (and, usually, the CSVs).
        train_csv, test_csv: the official split; ``val_fraction`` of the *training cases* becomes ``val``.
        all_csv: instead of train/test, one CSV split by case with ``val_fraction``/``test_fraction``.
            With none of the three given, ``M3D_RefSeg_{train,test}.csv`` (else ``_all.csv``) in ``root``.
        variant: ``"nifti"`` (as distributed) or ``"npy"`` (M3D's preprocessed arrays).
        seed: seed of the case-level split.
        verify_images: stream each CT once to catch truncated files now rather than mid-training.
        max_voxels: refuse volumes whose header claims more voxels than this.
        on_error: ``"raise"`` or ``"skip"``; a broken case skips each of its rows, each counted.
        modality: the records' modality key. M3D-RefSeg is CT; another data set written in its layout (MR, PET)
            names its own — the layout cannot tell, and a wrong key sends the volumes through the wrong preset.
    """

    dataset = "m3d_refseg"

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        train_csv: str | os.PathLike[str] | None = None,
        test_csv: str | os.PathLike[str] | None = None,
        all_csv: str | os.PathLike[str] | None = None,
        variant: Variant = "nifti",
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        verify_images: bool = True,
        max_voxels: int = DEFAULT_MAX_VOXELS,
        on_error: str = "raise",
        dataset: str | None = None,
        modality: str = "CT",
    ) -> None:
        super().__init__(on_error, dataset)
        if modality not in known_modalities():
            raise DataError(
                f"modality {modality!r} is not a known modality key; known: {sorted(known_modalities())}"
            )
        self.modality = modality
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: M3D-RefSeg root folder not found")
        if variant not in ("nifti", "npy"):
            raise DataError(f"variant must be 'nifti' or 'npy', got {variant!r}")
        self.variant = variant
        self.verify_images = verify_images
        self.max_voxels = max_voxels
        csvs = self._choose_csvs(train_csv, test_csv, all_csv)
        for origin, csv_path in csvs.items():
            _, rows = read_csv_rows(csv_path, M3D_REFSEG_COLUMNS)
            for line, row in rows:
                image = self._resolve(row["Image"])
                mask = self._resolve(row["Mask"])
                self._items.append(_Row(csv_path, line, row, origin, image, mask, image.parent.name))
        if "all" in csvs:
            check_fractions(val_fraction, test_fraction)
            self._splits = seeded_group_split(
                [r.case for r in self._items],
                val_fraction=val_fraction,
                test_fraction=test_fraction,
                seed=seed,
            )
        else:
            check_fractions(val_fraction, 0.0)
            train_cases = [r.case for r in self._items if r.origin == "train"]
            self._splits = seeded_group_split(
                train_cases, val_fraction=val_fraction, test_fraction=0.0, seed=seed
            )
        self._cases: dict[tuple[Path, Path], _Case | SourceError] = {}
        self._texts: dict[Path, dict[str, Any] | SourceError] = {}
        self._ids: dict[str, int] = {}

    def _choose_csvs(self, train_csv: Any, test_csv: Any, all_csv: Any) -> dict[str, Path]:
        if all_csv is not None and (train_csv is not None or test_csv is not None):
            raise DataError("give either all_csv or train_csv/test_csv, not both")
        if all_csv is not None:
            return {"all": Path(all_csv)}
        if train_csv is not None or test_csv is not None:
            return {k: Path(v) for k, v in (("train", train_csv), ("test", test_csv)) if v is not None}
        train, test, every = (self.root / f"M3D_RefSeg_{s}.csv" for s in ("train", "test", "all"))
        if train.is_file() or test.is_file():
            return {k: v for k, v in (("train", train), ("test", test)) if v.is_file()}
        if every.is_file():
            return {"all": every}
        raise DataError(
            f"{self.root}: no M3D_RefSeg_train.csv / _test.csv / _all.csv found; pass the CSV paths"
        )

    def _resolve(self, value: str) -> Path:
        """A CSV path → file: absolute, relative to root, or its last two parts (``sNNNN/ct.nii.gz``) under root."""
        value = value.strip().replace("\\", "/")
        if self.variant == "npy":
            for suffix in (".nii.gz", ".nii"):
                if value.endswith(suffix):
                    value = value[: -len(suffix)] + ".npy"
                    break
        path = Path(value)
        candidates = [path] if path.is_absolute() else [self.root / path]
        if len(path.parts) >= 2:
            candidates.append(self.root / path.parts[-2] / path.parts[-1])
        for cand in candidates:
            if cand.is_file():
                return cand
        return candidates[-1]

    def __iter__(self):  # type: ignore[override]
        self._ids = {}
        return super().__iter__()

    def _item_name(self, item: _Row) -> str:
        return f"{item.csv.name}:{item.line} ({item.case}, Mask_ID {item.row.get('Mask_ID')})"

    # ------------------------------------------------------------------------------------------ cases

    def _case(self, item: _Row) -> _Case:
        key = (item.image, item.mask)
        if key not in self._cases:
            try:
                self._cases[key] = self._load_case(item.image, item.mask)
            except SourceError as err:
                self._cases[key] = err
        case = self._cases[key]
        if isinstance(case, SourceError):
            raise SourceError(str(case), case.kind)
        return case

    def _load_case(self, image: Path, mask_path: Path) -> _Case:
        if self.variant == "nifti":
            header, _ = read_nifti(image, max_voxels=self.max_voxels, verify=self.verify_images, what="image")
            mask_header, mask_img = read_nifti(
                mask_path, max_voxels=self.max_voxels, verify=False, what="mask"
            )
            self._check_same_grid(header, mask_header)
            mask = load_nifti_array(mask_path, mask_img)
            return self._boxes_of(mask, mask_path, _Case(header.spatial_shape, header.spacing, header.affine))
        shape = self._npy_spatial_shape(image, "image")
        mask_shape = self._npy_spatial_shape(mask_path, "mask")
        if shape != mask_shape:
            raise SourceError(
                f"{mask_path}: mask shape {list(mask_shape)} differs from image shape {list(shape)} ({image})",
                "shape_mismatch",
            )
        mask = load_npy(mask_path).reshape(mask_shape)
        return self._boxes_of(mask, mask_path, _Case(shape, None, None))

    def _npy_spatial_shape(self, path: Path, what: str) -> tuple[int, ...]:
        shape, _dtype = read_npy_header(path, max_voxels=self.max_voxels, what=what)
        if len(shape) == 4 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) != 3 or min(shape) < 1:
            raise SourceError(
                f"{path}: {what} array has shape {list(shape)}; expected 1×D×H×W or D×H×W (one 3D volume)",
                "bad_geometry",
            )
        return shape

    @staticmethod
    def _check_same_grid(image: ImageHeader, mask: ImageHeader) -> None:
        if image.spatial_shape != mask.spatial_shape:
            raise SourceError(
                f"{mask.path}: mask shape {list(mask.spatial_shape)} differs from image shape "
                f"{list(image.spatial_shape)} ({image.path})",
                "shape_mismatch",
            )
        a, b = np.asarray(image.affine), np.asarray(mask.affine)
        if not np.allclose(a, b, rtol=1e-4, atol=1e-3):
            raise SourceError(
                f"{mask.path}: mask affine differs from the image's ({image.path}); they are not on the same grid",
                "affine_mismatch",
            )

    @staticmethod
    def _boxes_of(mask: np.ndarray, mask_path: Path, case: _Case) -> _Case:
        """Boxes of every label in the mask, in the mask's (= image's) voxel frame.

        One pass finds the non-zero voxels and each label's extent; ``mask_to_box`` then runs on each
        label's small crop rather than on the whole volume once per label (13 labels on a 512²×300 CT:
        one full pass instead of 13).
        """
        if mask.dtype.kind == "f" and not np.all(np.isfinite(mask)):
            raise SourceError(f"{mask_path}: mask holds NaN or infinite values", "bad_mask")
        coords = np.nonzero(mask)
        if coords[0].size == 0:
            raise SourceError(f"{mask_path}: mask is empty (no non-zero voxel)", "empty_mask")
        labels, inverse = np.unique(mask[coords], return_inverse=True)
        for k, label in enumerate(labels):
            if float(label) != int(label):
                raise SourceError(f"{mask_path}: mask holds a non-integer label {float(label)}", "bad_mask")
            picked = inverse == k
            lo = [int(axis[picked].min()) for axis in coords]
            hi = [int(axis[picked].max()) + 1 for axis in coords]
            crop = mask[tuple(slice(a, b) for a, b in zip(lo, hi))] == label
            box = wrap_box_error(lambda crop=crop: mask_to_box(crop), str(mask_path))
            box = box + np.asarray(lo + lo, dtype=np.float64)
            case.boxes[int(label)] = tuple(float(v) for v in box)
        return case

    def _text(self, mask_path: Path) -> dict[str, Any]:
        path = mask_path.parent / "text.json"
        if path not in self._texts:
            try:
                require_file(path, "text.json")
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise SourceError(f"{path}: not valid JSON ({err})", "bad_json") from None
                if not isinstance(data, dict):
                    raise SourceError(f"{path}: expected an object region id → description", "bad_json")
                self._texts[path] = data
            except SourceError as err:
                self._texts[path] = err
        texts = self._texts[path]
        if isinstance(texts, SourceError):
            raise SourceError(str(texts), texts.kind)
        return texts

    # ------------------------------------------------------------------------------------------ records

    def _build(self, item: _Row) -> GroundingRecord:
        where = f"{item.csv}:{item.line}"
        row = item.row
        mask_id = parse_int(row["Mask_ID"], f"{where}: Mask_ID")
        question_type = parse_int(row["Question_Type"], f"{where}: Question_Type")
        question = row["Question"]
        if not question:
            raise SourceError(f"{where}: empty Question", "bad_row")
        for path, what in ((item.image, "image"), (item.mask, "mask")):
            if not path.is_file():
                raise SourceError(
                    f"{where}: {what} not found: {path} (CSV says {row[what.title()]!r})", "missing_file"
                )
        try:
            case = self._case(item)
            texts = self._text(item.mask)
        except SourceError as err:
            raise SourceError(f"{where}: {err}", err.kind) from None
        if str(mask_id) not in texts:
            raise SourceError(
                f"{where}: {item.mask.parent / 'text.json'} has no region {mask_id} "
                f"(regions: {', '.join(sorted(texts, key=str)) or 'none'})",
                "missing_text",
            )
        if mask_id not in case.boxes:
            raise SourceError(
                f"{where}: label {mask_id} is absent from {item.mask} "
                f"(labels present: {', '.join(map(str, sorted(case.boxes)))})",
                "label_absent",
            )
        split = "test" if item.origin == "test" else self._splits[item.case]
        base_id = f"{self.dataset}/{item.case}/{mask_id}/q{question_type}-{short_hash(question, 8)}"
        n = self._ids.get(base_id, 0) + 1
        self._ids[base_id] = n
        return GroundingRecord(
            id=base_id if n == 1 else f"{base_id}-{n}",
            dataset=self.dataset,
            split=split,
            modality=self.modality,
            ndim=3,
            image=str(item.image.resolve()),
            text=question,
            boxes=(case.boxes[mask_id],),
            spatial_shape=case.shape,
            mask={"path": str(item.mask.resolve()), "label": mask_id},
            question_type=question_type,
            spacing=case.spacing,
            affine=case.affine,
            source={
                "csv": item.csv.name,
                "line": item.line,
                "case": item.case,
                "mask_id": mask_id,
                "description": texts[str(mask_id)],
                "answer": row["Answer"],
                "variant": self.variant,
            },
        )
