"""MR and PET phantoms in the own-data layout (``images/``, ``masks/``, ``phrases.csv``): a stand-in for a group's
own scans, so the walk-through of ``docs/extending.md`` (import → train → evaluate → bundle) runs offline.

MR: T1-like arbitrary units (head-shaped ellipsoid ~600, a bright lesion ~1000, noise), stored LPS at
``spacing`` (default 1.5 × 1.5 × 3 mm). PET: SUV background ~1, lesion SUV 4–8, at 4 mm; written in SUV, or in
Bq/ml with the dose, weight and times columns the importer needs to convert back (``pet_units="BQML"``).
One lesion per case, phrase ``"the lesion"``; its mask (label 1) gives the box.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from mg3d.errors import ConfigError

__all__ = ["make_own_volumes"]

_DEFAULT_SPACING = {"MR": (1.5, 1.5, 3.0), "PET": (4.0, 4.0, 4.0)}
#: The dose, weight and times written for ``pet_units="BQML"`` (¹⁸F: 60 min uptake).
_PET_HEADER = {"injected_dose_bq": 3.7e8, "patient_weight_kg": 70.0, "injection_time": "10:00:00",
               "scan_time": "11:00:00"}  # fmt: skip


def _affine(spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """LPS-stored axes (i → patient left, j → posterior, k → superior) in nibabel's RAS world, centred."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def make_own_volumes(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    *,
    modality: str = "MR",
    shape: Sequence[int] = (32, 32, 16),
    spacing: Sequence[float] | None = None,
    pet_units: str | None = None,
) -> Path:
    """Write ``n`` cases under ``out_dir`` and return the ``phrases.csv`` that lists them."""
    if modality not in ("MR", "PET"):
        raise ConfigError(f"make_own_volumes: modality must be 'MR' or 'PET', got {modality!r}")
    if pet_units not in (None, "BQML") or (pet_units and modality != "PET"):
        raise ConfigError(f"make_own_volumes: pet_units is None or 'BQML' (PET only), got {pet_units!r}")
    if n < 1 or len(shape) != 3 or min(shape) < 8:
        raise ConfigError(f"make_own_volumes: need n >= 1 and a 3D shape >= 8 voxels, got {n}, {list(shape)}")
    spacing = tuple(float(s) for s in (spacing or _DEFAULT_SPACING[modality]))
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([int(seed), 0x0D17])
    grid = np.stack(np.meshgrid(*(np.arange(s, dtype=np.float64) for s in shape), indexing="ij"))
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    head = (
        ((grid - centre[:, None, None, None]) / (0.45 * np.asarray(shape))[:, None, None, None]) ** 2
    ).sum(0) <= 1
    affine = _affine(spacing, shape)
    rows = []
    for case in range(n):
        # round in mm: 1-2 of the coarsest voxels
        radius = rng.uniform(1.0, 2.0) * max(spacing) / np.asarray(spacing)
        at = rng.uniform(0.3, 0.7, size=3) * (np.asarray(shape) - 1)
        lesion = (((grid - at[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0) <= 1
        lesion &= head
        if not lesion.any():
            lesion[tuple(np.round(at).astype(int))] = True
        if modality == "MR":
            image = np.where(head, 600.0, 20.0) + np.where(lesion, 400.0, 0.0) + rng.normal(0, 15, shape)
        else:
            image = np.where(head, 1.0, 0.05) + np.where(lesion, rng.uniform(3.0, 7.0), 0.0)
            image = np.clip(image + rng.normal(0, 0.05, shape), 0, None)
            if pet_units == "BQML":  # SUV → Bq/ml: SUV · decayed dose / weight_g
                dose = _PET_HEADER["injected_dose_bq"] * 2.0 ** (-3600.0 / 6586.2)
                image = image * dose / (_PET_HEADER["patient_weight_kg"] * 1000.0)
        name = f"case{case:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), out / "images" / name)
        nib.save(nib.Nifti1Image(lesion.astype(np.uint8), affine), out / "masks" / name)
        row = {"image": f"images/{name}", "phrase": "the lesion", "mask": f"masks/{name}", "label": 1,
               "case": f"case{case:03d}"}  # fmt: skip
        if pet_units == "BQML":
            row.update(_PET_HEADER)
        rows.append(row)
    table = out / "phrases.csv"
    with table.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return table
