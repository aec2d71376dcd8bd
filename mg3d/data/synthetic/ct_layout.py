"""CT phantoms written in the M3D-RefSeg layout (``sNNNN/ct.nii.gz``, ``mask.nii.gz``, ``text.json``, CSVs).

Optionally also M3D's preprocessed ``.npy`` variant, made with M3D's own preprocessing steps. The CSV rows
ask about each region's referring phrase in the style of the real release (question types 0 and 1).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from mg3d.data.synthetic.ct import CTOptions, LesionRegion, _ct_options, generate_ct_case
from mg3d.data.synthetic.files import TRUTH_NAME, _check_seed, _progress, _write_csv, _write_json
from mg3d.errors import ConfigError

M3D_CSV_COLUMNS = ("Image", "Mask", "Mask_ID", "Question_Type", "Question", "Answer")

_DIAGNOSIS = {
    ("liver", "hypodense"): "a hepatic cyst or a metastasis",
    ("liver", "hyperdense"): "a calcification or a hypervascular lesion",
    ("spleen", "hypodense"): "a splenic cyst or infarct",
    ("spleen", "hyperdense"): "a splenic calcification",
    ("kidney", "hypodense"): "a renal cyst",
    ("kidney", "hyperdense"): "a renal calculus",
    ("lung", "hyperdense"): "a pulmonary nodule",
    ("soft tissue", "hypodense"): "a fat-containing lesion such as a lipoma",
    ("soft tissue", "hyperdense"): "a soft-tissue mass",
}


_Q0_TEMPLATES = (
    "Can you segment {p} in this image?",
    "Where is {p} in this CT scan? Please segment it.",
    "Please segment {p}.",
    "Can you identify and segment {p}?",
    "Where does {p} appear in this image? Please respond with the segmentation mask.",
)
_A0_TEMPLATES = ("Sure, it is [SEG].", "It is [SEG].", "Sure, [SEG].", "The segmentation result is [SEG].")
_Q1_TEMPLATES = (
    "{P} may indicate a pathological change. What could it be? Please segment it and explain.",
    "What could {p} represent? Please segment it and explain the potential cause.",
    "Please segment {p} and explain what it may suggest.",
)
_A1_TEMPLATES = (
    "[SEG]. {D} This may suggest {dx}.",
    "Sure, it is [SEG]. {D} It most likely represents {dx}.",
)


def _site_group(site: str) -> str:
    for group in ("kidney", "lung"):
        if group in site:
            return group
    return site


def _qa_rows(
    rng: np.random.Generator, reg: LesionRegion, n0: int, n1: int, style: str = "question"
) -> list[tuple[int, str, str]]:
    """(Question_Type, Question, Answer) in the style of the real CSVs: the phrase asked about several ways.

    ``style="phrase"`` writes the bare referring phrase in the Question column (one row per region, type 0):
    the short form a tiny CPU model can afford, where every character is a token.
    """
    p = reg.phrase
    if style == "phrase":
        return [(0, p, _A0_TEMPLATES[int(rng.integers(len(_A0_TEMPLATES)))].format(D=reg.description, dx=""))]
    big_p = p[0].upper() + p[1:]
    dx = _DIAGNOSIS[(_site_group(reg.site), reg.density)]
    out = []
    for qtype, count, questions, answers in (
        (0, n0, _Q0_TEMPLATES, _A0_TEMPLATES),
        (1, n1, _Q1_TEMPLATES, _A1_TEMPLATES),
    ):
        for k in rng.permutation(len(questions))[:count]:
            answer = answers[int(rng.integers(len(answers)))]
            out.append(
                (qtype, questions[int(k)].format(p=p, P=big_p), answer.format(D=reg.description, dx=dx))
            )
    return out


def _save_nifti(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)  # "scanner", as CTs converted from DICOM carry
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)


def _m3d_npy(
    volume: np.ndarray, mask: np.ndarray, size: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """M3D's own preprocessing (m3d_refseg_data_prepare.py), with MONAI as it used: → (1, D, H, W) float32.

    get_fdata → transpose (2, 0, 1) + channel → percentile scaling 0.5–99.5 to [0, 1] → crop foreground
    → resize (trilinear image, nearest mask).
    """
    from monai.transforms import Compose, CropForegroundd, Resized, ScaleIntensityRangePercentilesd
    from monai.utils import convert_to_numpy

    pipeline = Compose(
        [
            ScaleIntensityRangePercentilesd(
                keys="image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True
            ),
            CropForegroundd(keys=["image", "seg"], source_key="image"),
            Resized(keys=["image", "seg"], spatial_size=size, mode=("trilinear", "nearest")),
        ]
    )
    data = {
        "image": volume.astype(np.float64).transpose(2, 0, 1)[None],
        "seg": mask.astype(np.float64).transpose(2, 0, 1)[None],
    }
    out = pipeline(data)
    return convert_to_numpy(out["image"], dtype=np.float32), convert_to_numpy(out["seg"], dtype=np.float32)


def _box_of(mask: np.ndarray) -> list[int]:
    sl = ndimage.find_objects(mask.astype(np.uint8))[0]
    return [int(s.start) for s in sl] + [int(s.stop) for s in sl]


def _r(values: Sequence[float], nd: int = 4) -> list[float]:
    return [round(float(v), nd) for v in values]


def make_ct3d(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int,
    *,
    npy: bool = False,
    npy_shape: Sequence[int] = (32, 256, 256),
    npy_dir: str | os.PathLike[str] | None = None,
    questions_per_region: Sequence[int] = (3, 2),
    test_fraction: float = 0.2,
    question_style: str = "question",
    progress: bool = False,
    **options: Any,
) -> list[Path]:
    """Write ``n`` CT phantoms in the M3D-RefSeg layout under ``out_dir``; return every file written.

    ``options`` are :class:`CTOptions` fields. ``questions_per_region`` = (type-0, type-1) CSV rows per
    region (the real release has about 3 + 2). The train/test CSVs split by case. With ``npy=True``
    the preprocessed variant goes to ``npy_dir`` (default ``out_dir/M3D_RefSeg_npy``) with its own copy
    of the CSVs (which, as in the release, still name the ``.nii.gz`` files). ``question_style="phrase"``
    writes the bare referring phrase instead of questions (one row per region; the CPU demo's choice).
    ``progress`` shows a progress bar on stderr.
    """
    if question_style not in ("question", "phrase"):
        raise ConfigError(f"question_style must be 'question' or 'phrase', got {question_style!r}")
    _check_seed(seed, n)
    opts = _ct_options(None, options)
    n0, n1 = (int(v) for v in questions_per_region)
    if not (0 <= n0 <= len(_Q0_TEMPLATES) and 0 <= n1 <= len(_Q1_TEMPLATES) and n0 + n1 >= 1):
        raise ConfigError(
            f"questions_per_region must be (type 0, type 1) with 0..{len(_Q0_TEMPLATES)} and "
            f"0..{len(_Q1_TEMPLATES)} and at least one question, got {tuple(questions_per_region)}"
        )
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in [0, 1), got {test_fraction}")
    size = tuple(int(v) for v in npy_shape)
    if npy and (len(size) != 3 or min(size) < 2):
        raise ConfigError(f"npy_shape must be 3 sizes (D, H, W) ≥ 2, got {list(npy_shape)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npy_root = Path(npy_dir) if npy_dir is not None else out / "M3D_RefSeg_npy"
    n_test = min(n - 1, round(n * test_fraction)) if n > 1 else 0
    if test_fraction > 0 and n > 1:
        n_test = max(1, n_test)
    test_cases = set(
        np.random.default_rng([int(seed), 0x7E57]).choice(n, size=n_test, replace=False).tolist()
    )
    written: list[Path] = []
    rows: dict[str, list[list[Any]]] = {"train": [], "test": []}
    cases: dict[str, Any] = {}
    children = np.random.SeedSequence(int(seed)).spawn(n)
    for i, child in enumerate(_progress(children, n, "write ct3d phantoms", progress)):
        rng = np.random.default_rng(child)
        ph = generate_ct_case(rng, opts)
        case = f"s{i:04d}"
        split = "test" if i in test_cases else "train"
        case_dir = out / case
        case_dir.mkdir(exist_ok=True)
        paths = (case_dir / "ct.nii.gz", case_dir / "mask.nii.gz", case_dir / "text.json")
        _save_nifti(ph.volume, ph.affine, paths[0])
        _save_nifti(ph.mask, ph.affine, paths[1])
        texts = {str(r.region_id): r.description for r in ph.regions}
        _write_json(paths[2], texts)
        written.extend(paths)
        for reg in ph.regions:
            for qtype, question, answer in _qa_rows(rng, reg, n0, n1, question_style):
                rows[split].append(
                    [f"{case}/ct.nii.gz", f"{case}/mask.nii.gz", reg.region_id, qtype, question, answer]
                )
        entry: dict[str, Any] = {
            "image": f"{case}/ct.nii.gz",
            "mask": f"{case}/mask.nii.gz",
            "split": split,
            "shape": list(ph.volume.shape),
            "spacing": _r(ph.spacing, 6),
            "orientation": ph.orientation,
            "affine": [_r(row, 6) for row in ph.affine.tolist()],
            "midline_world": _r(ph.midline_world),
            "regions": {
                str(r.region_id): {
                    "center_voxel": _r(r.center_voxel),
                    "center_world": _r(r.center_world),
                    "box_voxel": list(r.box_voxel),
                    "n_voxels": r.n_voxels,
                    "volume_mm3": round(r.volume_mm3, 3),
                    "mean_hu": round(r.mean_hu, 3),
                    "diameter_mm": round(r.diameter_mm, 3),
                    "site": r.site,
                    "side": r.side,
                    "density": r.density,
                    "shape": r.shape,
                    "phrase": r.phrase,
                    "phrase_type": r.phrase_type,
                    "phrase_value": r.phrase_value,
                    "description": r.description,
                }
                for r in ph.regions
            },
        }
        if npy:
            image, seg = _m3d_npy(ph.volume, ph.mask, size)  # type: ignore[arg-type]
            for reg in ph.regions:
                if not np.any(seg == reg.region_id):
                    raise ConfigError(
                        f"{case}: region {reg.region_id} ({reg.n_voxels} voxels) vanishes when resized to "
                        f"npy_shape {list(size)}; use a larger npy_shape"
                    )
                entry["regions"][str(reg.region_id)]["npy_box"] = _box_of(seg[0] == reg.region_id)
            entry["npy_shape"] = list(seg.shape)
            npy_case = npy_root / case
            npy_case.mkdir(parents=True, exist_ok=True)
            np.save(npy_case / "ct.npy", image)
            np.save(npy_case / "mask.npy", seg)
            _write_json(npy_case / "text.json", texts)
            written.extend([npy_case / "ct.npy", npy_case / "mask.npy", npy_case / "text.json"])
        cases[case] = entry
    csv_dirs = [out, npy_root] if npy else [out]
    for folder in csv_dirs:
        for name, content in (
            ("train", rows["train"]),
            ("test", rows["test"]),
            ("all", sorted(rows["train"] + rows["test"], key=lambda r: r[0])),
        ):
            path = folder / f"M3D_RefSeg_{name}.csv"
            _write_csv(path, M3D_CSV_COLUMNS, content)
            written.append(path)
    truth = {
        "generator": "mg3d.data.synthetic.make_ct3d",
        "kind": "ct3d",
        "layout": "m3d_refseg",
        "seed": int(seed),
        "n": int(n),
        "options": {f.name: getattr(opts, f.name) for f in fields(CTOptions)},
        "questions_per_region": [n0, n1],
        "question_style": question_style,
        "box_convention": "voxel frame of the stored NIfTI (i, j, k), half-open [lo_i, lo_j, lo_k, hi_i, hi_j, hi_k]",
        "npy": {
            "dir": os.path.relpath(npy_root, out),
            "box_convention": "(D, H, W) of the 1×D×H×W array, half-open",
        }
        if npy
        else None,
        "cases": cases,
    }
    _write_json(out / TRUTH_NAME, truth)
    written.append(out / TRUTH_NAME)
    return written
