"""Real CT and MR images that installed Python packages ship inside their wheels (nothing is downloaded).

Each source loads to a :class:`RealVolume`: the image in the voxel frame (2D ``(x, y)``, 3D ``(i, j, k)``
as MONAI would load the file), in the modality's physical units where it has them (HU for CT after the
DICOM rescale; raw scanner units for MR), with its spacing and, for 3D, a voxel → RAS+ mm affine.

Sources (``research/data_formats.md`` §4 lists what the wheels hold):

========================  ====  ====  ===============================================================
name                      dim   mod.  file
========================  ====  ====  ===============================================================
``head_ct_atlas``         3D    CT    TotalSegmentator's skull-stripped head CT atlas (1 mm, 202×202×179;
                                      outside the brain exactly 0) — ``pip install --no-deps totalsegmentator``
``head_ct_perfusion``     3D    CT    pydicom-data ``eCT_Supplemental.dcm``: enhanced CT, 2 frames 512², 10 mm
``head_ct_slice``         2D    CT    pydicom-data ``693_UNCR.dcm``: head CT slice with a haemorrhage
``abdomen_ct_slice``      2D    CT    pydicom-data ``explicit_VR-UN.dcm``: abdomen CT slice (TCIA pancreas)
``chest_ct_small``        2D    CT    pydicom ``CT_small.dcm``: 128² paraspinal CT slice
``brain_mr``              3D    MR    nibabel ``tests/data/anatomical.nii``: brain T1, 2 mm, 33×41×25
``abdomen_mr_slice``      2D    MR    pydicom-data ``MR-SIEMENS-DICOM-WithOverlays.dcm``: abdomen MR slice
``shoulder_mr_slice``     2D    MR    pydicom-data ``MR2_UNCR.dcm``: shoulder MR slice, 1024²
========================  ====  ====  ===============================================================
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mg3d.errors import ConfigError, DataError

__all__ = ["REAL_SOURCES", "RealSource", "RealVolume", "available_sources", "load_real_volume"]


@dataclass(frozen=True)
class RealVolume:
    """One real image in the voxel frame: ``image`` (float32, physical or scanner units) and its geometry."""

    name: str
    modality: str
    image: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray | None  # 3D only: voxel centres → RAS+ mm
    origin: str  # package and file, for the report

    @property
    def ndim(self) -> int:
        return self.image.ndim


@dataclass(frozen=True)
class RealSource:
    name: str
    modality: str
    ndim: int
    package: str  # the distribution that ships the file (what to install)
    loader: Callable[[], RealVolume]
    description: str


def _package_file(package: str, relative: str, install: str) -> Path:
    """A data file inside an installed package, found without importing the package (no heavy imports)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} is not installed: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataError(f"{path}: expected inside the installed {package!r} package, not found")
    return path


def _pydicom_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        raise ConfigError(f"pydicom test file {name!r} not found: pip install pydicom-data (the dev extra)")
    return Path(str(path))


def _rescaled(ds: object) -> np.ndarray:
    """Pixel data through the rescale (per frame group for enhanced DICOM), float32."""
    pixels = np.asarray(ds.pixel_array, dtype=np.float32)  # type: ignore[attr-defined]
    slope, intercept = getattr(ds, "RescaleSlope", None), getattr(ds, "RescaleIntercept", None)
    if slope is None and "SharedFunctionalGroupsSequence" in ds:  # type: ignore[operator]
        group = ds.SharedFunctionalGroupsSequence[0]  # type: ignore[attr-defined]
        if "PixelValueTransformationSequence" in group:
            pvt = group.PixelValueTransformationSequence[0]
            slope, intercept = pvt.RescaleSlope, pvt.RescaleIntercept
    return pixels * np.float32(slope if slope is not None else 1.0) + np.float32(intercept or 0.0)


def _dicom_slice(name: str, modality: str, source: str) -> RealVolume:
    import pydicom

    path = _pydicom_file(name)
    ds = pydicom.dcmread(path)
    image = _rescaled(ds).T  # (rows = y, cols = x) → voxel frame (x, y)
    spacing = tuple(float(v) for v in ds.PixelSpacing)[::-1]  # PixelSpacing is (row, column) spacing
    return RealVolume(
        source, modality, np.ascontiguousarray(image), spacing, None, f"{path.parent.name}/{name}"
    )


def _head_ct_perfusion() -> RealVolume:
    import pydicom

    name = "eCT_Supplemental.dcm"
    path = _pydicom_file(name)
    ds = pydicom.dcmread(path)
    group = ds.SharedFunctionalGroupsSequence[0]
    measures = group.PixelMeasuresSequence[0]
    dy, dx = (float(v) for v in measures.PixelSpacing)
    positions = [
        np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    dz = float(np.linalg.norm(positions[1] - positions[0]))
    cosines = np.asarray(group.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=np.float64)
    col_dir, row_dir = cosines[:3], cosines[3:]
    slice_dir = (positions[1] - positions[0]) / dz
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = col_dir * dx, row_dir * dy, slice_dir * dz, positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM LPS world → nibabel's RAS+
    image = _rescaled(ds).transpose(2, 1, 0)  # (frames, rows, cols) → (i = col, j = row, k = frame)
    return RealVolume(
        "head_ct_perfusion", "CT", np.ascontiguousarray(image), (dx, dy, dz), affine, f"data_store/{name}"
    )


def _nifti(path: Path, name: str, modality: str, origin: str) -> RealVolume:
    import nibabel as nib

    img = nib.load(str(path))
    image = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    spacing = tuple(float(v) for v in img.header.get_zooms()[:3])
    return RealVolume(name, modality, image, spacing, np.asarray(img.affine, dtype=np.float64), origin)


def _head_ct_atlas() -> RealVolume:
    rel = "resources/ct_brain_atlas_1mm.nii.gz"
    path = _package_file(
        "totalsegmentator", rel, "pip install --no-deps totalsegmentator==2.18.0 (only its data file is read)"
    )
    return _nifti(path, "head_ct_atlas", "CT", f"totalsegmentator/{rel}")


def _brain_mr() -> RealVolume:
    rel = "tests/data/anatomical.nii"
    return _nifti(_package_file("nibabel", rel, "pip install nibabel"), "brain_mr", "MR", f"nibabel/{rel}")


REAL_SOURCES: dict[str, RealSource] = {
    s.name: s
    for s in (
        RealSource("head_ct_atlas", "CT", 3, "totalsegmentator", _head_ct_atlas, "skull-stripped head CT atlas"),
        RealSource("head_ct_perfusion", "CT", 3, "pydicom-data", _head_ct_perfusion, "2-frame head CT (perfusion)"),
        RealSource("head_ct_slice", "CT", 2, "pydicom-data",
                   lambda: _dicom_slice("693_UNCR.dcm", "CT", "head_ct_slice"), "head CT slice, haemorrhage"),
        RealSource("abdomen_ct_slice", "CT", 2, "pydicom-data",
                   lambda: _dicom_slice("explicit_VR-UN.dcm", "CT", "abdomen_ct_slice"), "abdomen CT slice"),
        RealSource("chest_ct_small", "CT", 2, "pydicom",
                   lambda: _dicom_slice("CT_small.dcm", "CT", "chest_ct_small"), "128² paraspinal CT slice"),
        RealSource("brain_mr", "MR", 3, "nibabel", _brain_mr, "brain T1 MR, 2 mm"),
        RealSource("abdomen_mr_slice", "MR", 2, "pydicom-data",
                   lambda: _dicom_slice("MR-SIEMENS-DICOM-WithOverlays.dcm", "MR", "abdomen_mr_slice"),
                   "abdomen MR slice"),
        RealSource("shoulder_mr_slice", "MR", 2, "pydicom-data",
                   lambda: _dicom_slice("MR2_UNCR.dcm", "MR", "shoulder_mr_slice"), "shoulder MR slice"),
    )
}  # fmt: skip


def load_real_volume(name: str) -> RealVolume:
    """Load one source of :data:`REAL_SOURCES` (``ConfigError`` naming the package to install when absent)."""
    if name not in REAL_SOURCES:
        raise ConfigError(f"unknown real source {name!r}; known: {sorted(REAL_SOURCES)}")
    return REAL_SOURCES[name].loader()


def available_sources() -> list[str]:
    """Names of the sources whose package is installed here."""
    found = []
    for name, source in REAL_SOURCES.items():
        module = "data_store" if source.package == "pydicom-data" else source.package
        if importlib.util.find_spec(module) is not None:
            found.append(name)
    return found
