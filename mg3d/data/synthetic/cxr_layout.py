"""Chest-radiograph phantoms written in the MS-CXR and ChestX-ray8 layouts.

MS-CXR: a MIMIC-CXR-JPG tree plus ``MS_CXR_Local_Alignment_v1.1.0.csv``. ChestX-ray8: ``images/*.png``,
``BBox_List_2017.csv`` with its malformed header, ``Data_Entry_2017.csv`` and the split lists. Annotated
boxes are the generator's tight boxes grown a little, as a human annotator draws them.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from mg3d.data.synthetic.cxr import MASS_RADIUS, CXRFinding, generate_cxr_case
from mg3d.data.synthetic.files import TRUTH_NAME, _check_seed, _progress, _write_csv, _write_json
from mg3d.errors import ConfigError

MSCXR_CSV_NAME = "MS_CXR_Local_Alignment_v1.1.0.csv"
MSCXR_COLUMNS = (
    "dicom_id",
    "category_name",
    "label_text",
    "path",
    "x",
    "y",
    "w",
    "h",
    "image_width",
    "image_height",
    "split",
)
# Written verbatim: the published header has the box columns split by their own commas plus three
# empty trailing columns, while the data rows have six fields (checked against the file shipped in
# the torchxrayvision 1.5.7 wheel).
CXR8_BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
CXR8_DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)


_MSCXR_CATEGORY = {
    "atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "consolidation": "Consolidation",
    "edema": "Edema",
    "opacity": "Lung Opacity",
    "effusion": "Pleural Effusion",
    "pneumonia": "Pneumonia",
    "pneumothorax": "Pneumothorax",
}
_CXR8_LABEL = {
    "atelectasis": "Atelectasis",
    "effusion": "Effusion",
    "cardiomegaly": "Cardiomegaly",
    "infiltrate": "Infiltrate",
    "pneumonia": "Pneumonia",
    "pneumothorax": "Pneumothorax",
    "mass": "Mass",
    "nodule": "Nodule",
}
_CXR8_ENTRY_LABEL = {"Infiltrate": "Infiltration"}  # the label file's name for the box file's "Infiltrate"


_LAYOUT_KEY = {"mscxr": 1, "chestxray8": 2}
_MSCXR_KINDS = tuple(_MSCXR_CATEGORY)
_CXR8_KINDS = tuple(_CXR8_LABEL)
_CXR8_ORIGINAL = ((2500, 2048, 0.168), (2992, 2991, 0.143), (3056, 2544, 0.139), (2682, 2749, 0.143))


@dataclass(frozen=True)
class CXROptions:
    """How the 2D phantoms are drawn and laid out. Sizes are (width, height) in pixels."""

    kinds: tuple[str, ...] | None = None  # None = every kind the layout has a category for
    min_findings: int = 1
    max_findings: int = 3
    bilateral_probability: float = 0.2
    mscxr_size: tuple[int, int] = (256, 320)  # MIMIC-CXR-JPG images are ~2500–3000 px, portrait
    size_jitter: int = 16  # each MS-CXR image gets its own size, ± this much per axis
    chestxray8_size: int = 256  # the real PNGs are 1024×1024
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)  # MS-CXR train/val/test, by patient
    test_fraction: float = 0.2  # ChestX-ray8 test_list.txt share, by patient
    n_normal: int = 0  # ChestX-ray8: extra "No Finding" images (label file only, no box)
    jpeg_quality: int = 95
    # a mass's radius as a fraction of the width; the 2D demo doubles it (masses of 3.5-5.5 % were not found by
    # its tiny policy among the chest's bright structures; docs/benchmarks.md)
    mass_radius: tuple[float, float] = MASS_RADIUS

    def __post_init__(self) -> None:
        if self.kinds is not None:
            object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "mscxr_size", tuple(int(v) for v in self.mscxr_size))
        object.__setattr__(self, "split_fractions", tuple(float(v) for v in self.split_fractions))
        object.__setattr__(self, "mass_radius", tuple(float(v) for v in self.mass_radius))
        if len(self.mscxr_size) != 2 or min(self.mscxr_size) - abs(self.size_jitter) < 64:
            raise ConfigError(f"mscxr_size must be (width, height) ≥ 64 + size_jitter, got {self.mscxr_size}")
        if self.chestxray8_size < 64:
            raise ConfigError(f"chestxray8_size must be ≥ 64, got {self.chestxray8_size}")
        fr = self.split_fractions
        if len(fr) != 3 or min(fr) < 0 or not math.isclose(sum(fr), 1.0, abs_tol=1e-6) or fr[0] <= 0:
            raise ConfigError(
                f"split_fractions must be 3 non-negative fractions summing to 1 with train > 0, got {fr}"
            )
        if not 0 <= self.test_fraction < 1 or self.n_normal < 0 or not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(
                f"need 0 ≤ test_fraction < 1, n_normal ≥ 0, 1 ≤ jpeg_quality ≤ 100; got {self.test_fraction}, "
                f"{self.n_normal}, {self.jpeg_quality}"
            )
        if not 1 <= self.min_findings <= self.max_findings:
            raise ConfigError(
                f"need 1 ≤ min_findings ≤ max_findings, got {self.min_findings}, {self.max_findings}"
            )

    def layout_kinds(self, layout: str) -> tuple[str, ...]:
        allowed = _MSCXR_KINDS if layout == "mscxr" else _CXR8_KINDS
        if self.kinds is None:
            return allowed
        bad = [k for k in self.kinds if k not in allowed]
        if bad or not self.kinds:
            raise ConfigError(
                f"kinds {bad or list(self.kinds)} have no {layout} category; {layout} allows {list(allowed)}"
            )
        return self.kinds


def _cxr_options(options: dict[str, Any]) -> CXROptions:
    names = {f.name for f in fields(CXROptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(f"unknown CXR phantom option(s) {unknown}; known options: {sorted(names)}")
    return CXROptions(**options)


def _loose_boxes(
    rng: np.random.Generator, finding: CXRFinding, width: int, height: int, integer: bool
) -> list[tuple[float, float, float, float]]:
    """The annotator's (x, y, w, h): the tight box grown a little, inside the image.

    MS-CXR boxes are whole pixels; ChestX-ray8 boxes are floats (steps of 1/8 px, exact in binary,
    so the written text and the truth file agree to the last digit).
    """
    out = []
    for x1, y1, x2, y2 in finding.tight_boxes:
        m = rng.integers(0, 3, 4) if integer else rng.integers(0, 17, 4) / 8.0
        a, b = max(0.0, x1 - m[0]), max(0.0, y1 - m[1])
        c, d = min(float(width), x2 + m[2]), min(float(height), y2 + m[3])
        out.append((a, b, c - a, d - b) if not integer else (int(a), int(b), int(c - a), int(d - b)))
    return out


def _fmt(v: float) -> str:
    return f"{v:.15g}"


def _unique_ids(rng: np.random.Generator, count: int, lo: int, hi: int) -> list[int]:
    seen: set[int] = set()
    out = []
    while len(out) < count:
        v = int(rng.integers(lo, hi))
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def _patients(rng: np.random.Generator, n: int) -> list[int]:
    """Patient index of each of n images: 1 or 2 images per patient."""
    owner, p = [], 0
    while len(owner) < n:
        owner.extend([p] * int(rng.integers(1, 3)))
        p += 1
    return owner[:n]


def _finding_truth(f: CXRFinding, boxes: list[tuple[float, float, float, float]]) -> dict[str, Any]:
    return {
        "kind": f.kind,
        "side": f.side,
        "zone": f.zone,
        "phrase": f.phrase,
        "tight_boxes_xyxy": [list(b) for b in f.tight_boxes],
        "boxes_xywh": [list(b) for b in boxes],
        "boxes_xyxy": [[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in boxes],
    }


def _write_mscxr(
    out: Path, n: int, seed: int, opts: CXROptions, progress: bool = False
) -> tuple[list[Path], dict[str, Any]]:
    kinds = opts.layout_kinds("mscxr")
    root = np.random.SeedSequence([int(seed), _LAYOUT_KEY["mscxr"]])
    meta_seq, *image_seqs = root.spawn(n + 1)
    meta = np.random.default_rng(meta_seq)
    owner = _patients(meta, n)
    n_patients = owner[-1] + 1
    subjects = _unique_ids(meta, n_patients, 10_000_000, 20_000_000)
    studies = _unique_ids(meta, n, 50_000_000, 60_000_000)
    dicom_ids = ["-".join(f"{int(meta.integers(0, 2**32)):08x}" for _ in range(5)) for _ in range(n)]
    order = meta.permutation(n_patients)
    n_val = round(n_patients * opts.split_fractions[1])
    n_test = round(n_patients * opts.split_fractions[2])
    n_train = max(1, n_patients - n_val - n_test)
    split_of = {}
    for rank, p in enumerate(order.tolist()):
        split_of[p] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    written, rows, images = [], [], {}
    for i, seq in enumerate(_progress(image_seqs, n, "write MS-CXR phantoms", progress)):
        rng = np.random.default_rng(seq)
        w = opts.mscxr_size[0] + int(rng.integers(-opts.size_jitter, opts.size_jitter + 1))
        h = opts.mscxr_size[1] + int(rng.integers(-opts.size_jitter, opts.size_jitter + 1))
        ph = generate_cxr_case(
            rng,
            width=w,
            height=h,
            kinds=kinds,
            min_findings=opts.min_findings,
            max_findings=opts.max_findings,
            bilateral_probability=opts.bilateral_probability,
            mass_radius=opts.mass_radius,
        )
        sid = f"{subjects[owner[i]]:08d}"
        rel = f"files/p{sid[:2]}/p{sid}/s{studies[i]:08d}/{dicom_ids[i]}.jpg"
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ph.image).save(path, quality=opts.jpeg_quality)
        written.append(path)
        split = split_of[owner[i]]
        findings = []
        for f in ph.findings:
            boxes = _loose_boxes(rng, f, w, h, integer=True)
            for x, y, bw, bh in boxes:
                rows.append([dicom_ids[i], _MSCXR_CATEGORY[f.kind], f.phrase, rel, x, y, bw, bh, w, h, split])
            findings.append(
                {**_finding_truth(f, boxes), "category_name": _MSCXR_CATEGORY[f.kind], "label_text": f.phrase}
            )
        images[dicom_ids[i]] = {
            "path": rel,
            "width": w,
            "height": h,
            "subject_id": sid,
            "study_id": f"{studies[i]:08d}",
            "split": split,
            "findings": findings,
        }
    csv_path = out / MSCXR_CSV_NAME
    _write_csv(csv_path, MSCXR_COLUMNS, rows)
    written.append(csv_path)
    return written, {"csv": MSCXR_CSV_NAME, "image_root": ".", "images": images}


def _write_chestxray8(
    out: Path, n: int, seed: int, opts: CXROptions, progress: bool = False
) -> tuple[list[Path], dict[str, Any]]:
    kinds = opts.layout_kinds("chestxray8")
    size = opts.chestxray8_size
    total = n + opts.n_normal
    root = np.random.SeedSequence([int(seed), _LAYOUT_KEY["chestxray8"]])
    meta_seq, *image_seqs = root.spawn(total + 1)
    meta = np.random.default_rng(meta_seq)
    owner = _patients(meta, total)
    n_patients = owner[-1] + 1
    patient_ids = _unique_ids(meta, n_patients, 1, 30806)
    ages = meta.integers(18, 90, n_patients)
    genders = meta.choice(np.array(["M", "F"]), n_patients)
    n_test = min(
        n_patients - 1,
        max(1 if opts.test_fraction > 0 and n_patients > 1 else 0, round(n_patients * opts.test_fraction)),
    )
    test_patients = set(meta.permutation(n_patients)[:n_test].tolist())
    followup: dict[int, int] = {}
    normal = set(meta.permutation(total)[: opts.n_normal].tolist())
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    written, box_rows, entry_rows, images = [], [], [], {}
    lists: dict[str, list[str]] = {"train_val": [], "test": []}
    for i, seq in enumerate(_progress(image_seqs, total, "write ChestX-ray8 phantoms", progress)):
        rng = np.random.default_rng(seq)
        p = owner[i]
        fu = followup.get(p, -1) + 1 + int(rng.integers(0, 3))
        followup[p] = fu
        index = f"{patient_ids[p]:08d}_{fu:03d}.png"
        if i in normal:
            ph = generate_cxr_case(rng, width=size, height=size, kinds=kinds, min_findings=0, max_findings=0)
        else:
            ph = generate_cxr_case(
                rng,
                width=size,
                height=size,
                kinds=kinds,
                min_findings=opts.min_findings,
                max_findings=opts.max_findings,
                bilateral_probability=opts.bilateral_probability,
                mass_radius=opts.mass_radius,
            )
        Image.fromarray(ph.image).save(images_dir / index)
        written.append(images_dir / index)
        findings, labels = [], set()
        for f in ph.findings:
            label = _CXR8_LABEL[f.kind]
            boxes = _loose_boxes(rng, f, size, size, integer=False)
            for box in boxes:
                box_rows.append([index, label, *(_fmt(v) for v in box)])
            labels.add(_CXR8_ENTRY_LABEL.get(label, label))
            findings.append({**_finding_truth(f, boxes), "finding_label": label})
        orig_w, orig_h, spacing = _CXR8_ORIGINAL[int(rng.integers(len(_CXR8_ORIGINAL)))]
        view = "PA" if rng.random() < 0.8 else "AP"
        finding_labels = "|".join(sorted(labels)) if labels else "No Finding"
        entry_rows.append(
            [
                index,
                finding_labels,
                fu,
                patient_ids[p],
                int(ages[p]) + fu // 4,
                genders[p],
                view,
                orig_w,
                orig_h,
                spacing,
                spacing,
            ]
        )
        split = "test" if p in test_patients else "train_val"
        lists[split].append(index)
        images[index] = {
            "path": f"images/{index}",
            "width": size,
            "height": size,
            "patient_id": int(patient_ids[p]),
            "split": split,
            "finding_labels": finding_labels,
            "findings": findings,
        }
    bbox_path, entry_path = out / "BBox_List_2017.csv", out / "Data_Entry_2017.csv"
    with bbox_path.open("w", newline="", encoding="utf-8") as fh:
        fh.write(CXR8_BBOX_HEADER + "\n")
        csv.writer(fh, lineterminator="\n").writerows(box_rows)
    with entry_path.open("w", newline="", encoding="utf-8") as fh:
        fh.write(CXR8_DATA_ENTRY_HEADER + "\n")
        csv.writer(fh, lineterminator="\n").writerows(sorted(entry_rows))
    written += [bbox_path, entry_path]
    for name, key in (("train_val_list.txt", "train_val"), ("test_list.txt", "test")):
        (out / name).write_text("".join(f"{v}\n" for v in sorted(lists[key])), encoding="utf-8")
        written.append(out / name)
    return written, {
        "bbox_csv": bbox_path.name,
        "data_entry_csv": entry_path.name,
        "image_root": "images",
        "images": images,
    }


def make_cxr2d(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int,
    layout: Literal["mscxr", "chestxray8", "both"] = "mscxr",
    progress: bool = False,
    **options: Any,
) -> list[Path]:
    """Write ``n`` chest-radiograph phantoms in the MS-CXR and/or ChestX-ray8 layout; return the files.

    One layout goes straight into ``out_dir``; ``"both"`` writes ``out_dir/mscxr`` and
    ``out_dir/chestxray8`` (each exactly what a single-layout call with the same seed writes).
    ``options`` are :class:`CXROptions` fields; ``progress`` shows a progress bar on stderr.
    """
    _check_seed(seed, n)
    opts = _cxr_options(options)
    if layout not in ("mscxr", "chestxray8", "both"):
        raise ConfigError(f"layout must be 'mscxr', 'chestxray8' or 'both', got {layout!r}")
    out = Path(out_dir)
    targets = (
        [("mscxr", out / "mscxr"), ("chestxray8", out / "chestxray8")]
        if layout == "both"
        else [(layout, out)]
    )
    written: list[Path] = []
    for name, folder in targets:
        folder.mkdir(parents=True, exist_ok=True)
        writer: Callable[..., tuple[list[Path], dict[str, Any]]] = (
            _write_mscxr if name == "mscxr" else _write_chestxray8
        )
        files, truth = writer(folder, n, seed, opts, progress)
        opts_json = {f.name: getattr(opts, f.name) for f in fields(CXROptions)}
        truth = {
            "generator": "mg3d.data.synthetic.make_cxr2d",
            "kind": "cxr2d",
            "layout": name,
            "seed": int(seed),
            "n": int(n),
            "options": opts_json,
            "box_convention": "pixels, x = column, y = row; boxes_xyxy half-open = [x, y, x + w, y + h]",
            **truth,
        }
        _write_json(folder / TRUTH_NAME, truth)
        written += [*files, folder / TRUTH_NAME]
    return written
