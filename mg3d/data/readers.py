"""A MONAI ``ImageReader`` backed by SimpleITK, for DICOM series and MetaImage / NRRD volumes.

Why: CT data sets often ship as DICOM series folders or ``.mhd``/``.nrrd`` files. MONAI's own
``ITKReader`` needs the ``itk`` package and its ``NrrdReader`` needs ``pynrrd``; mg3d depends on
SimpleITK (TorchIO does too), so this reader plugs SimpleITK into ``LoadImage``.

Output follows MONAI's reader conventions, so every later transform behaves as with NIfTI:
the array is in the file's (i, j, k) index order (SimpleITK's numpy view is (k, j, i), hence the
transpose), vector pixels become a trailing channel axis, and the affine is converted from ITK's LPS
world to the RAS world that ``NibabelReader`` reports (``space = RAS``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from monai.data.image_reader import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from mg3d.errors import DataError

__all__ = ["SUFFIXES", "SimpleITKReader", "is_dicom_series_dir"]

#: File suffixes this reader claims (directories are read as DICOM series).
SUFFIXES = (".mhd", ".mha", ".nrrd", ".nhdr")

PathLike = str | os.PathLike[str]

# LPS (ITK) <-> RAS (nibabel, MONAI default): negate the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_dicom_series_dir(path: PathLike) -> bool:
    """True when ``path`` is a folder holding at least one DICOM series GDCM can read."""
    p = Path(path)
    return p.is_dir() and len(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p))) > 0


class SimpleITKReader(ImageReader):
    """Read ``.mhd``/``.mha``/``.nrrd``/``.nhdr`` files and DICOM series folders with SimpleITK.

    Args:
        series_id: which series to read when a folder holds several (default: refuse to guess).
        affine_lps_to_ras: report the affine in RAS like ``NibabelReader`` (default) or keep ITK's LPS.
    """

    def __init__(self, series_id: str | None = None, affine_lps_to_ras: bool = True) -> None:
        super().__init__()
        self.series_id = series_id
        self.affine_lps_to_ras = affine_lps_to_ras

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        names = ensure_tuple(filename)
        return all(
            Path(n).is_dir() or any(str(n).lower().endswith(s) for s in SUFFIXES) for n in names
        )  # fmt: skip

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> sitk.Image | list[sitk.Image]:
        names = ensure_tuple(data)
        images = [self._read_one(Path(n)) for n in names]
        return images if len(names) > 1 else images[0]

    def _read_one(self, path: Path) -> sitk.Image:
        if not path.exists():
            raise DataError(f"{path}: image not found")
        try:
            if path.is_dir():
                return self._read_series(path)
            return sitk.ReadImage(str(path))
        except RuntimeError as err:  # SimpleITK reports every I/O failure as RuntimeError
            raise DataError(f"{path}: SimpleITK cannot read it: {str(err).strip().splitlines()[-1]}") from err

    def _read_series(self, folder: Path) -> sitk.Image:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        if not ids:
            raise DataError(f"{folder}: no DICOM series found in this folder")
        if self.series_id is not None:
            if self.series_id not in ids:
                raise DataError(
                    f"{folder}: series {self.series_id!r} not found; the folder holds {list(ids)}"
                )
            series = self.series_id
        elif len(ids) > 1:
            raise DataError(f"{folder}: holds {len(ids)} DICOM series {list(ids)}; choose one with series_id")
        else:
            series = ids[0]
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        return reader.Execute()

    def get_data(self, img: sitk.Image | Sequence[sitk.Image]) -> tuple[np.ndarray, dict]:
        arrays, meta = [], {}
        # not ensure_tuple: a sitk.Image is itself iterable (over its pixels)
        for image in [img] if isinstance(img, sitk.Image) else list(img):
            array, header = self._one(image)
            if meta and not np.allclose(meta[MetaKeys.AFFINE], header[MetaKeys.AFFINE]):
                raise DataError("SimpleITKReader: images stacked as channels must share one affine")
            if meta and tuple(meta[MetaKeys.SPATIAL_SHAPE]) != tuple(header[MetaKeys.SPATIAL_SHAPE]):
                raise DataError("SimpleITKReader: images stacked as channels must share one shape")
            meta = meta or header
            arrays.append(array)
        if len(arrays) == 1:
            return arrays[0], meta
        channel_last = meta[MetaKeys.ORIGINAL_CHANNEL_DIM] == -1
        if channel_last:
            return np.concatenate(arrays, axis=-1), meta
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack(arrays, axis=0), meta

    def _one(self, image: sitk.Image) -> tuple[np.ndarray, dict[str, Any]]:
        d = image.GetDimension()
        if d not in (2, 3):
            raise DataError(f"SimpleITKReader: only 2D and 3D images are supported, got {d}D")
        view = sitk.GetArrayFromImage(image)  # (k, j, i) or (k, j, i, c)
        vector = image.GetNumberOfComponentsPerPixel() > 1
        array = np.moveaxis(view, list(range(d)), list(range(d))[::-1]) if vector else view.T
        spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
        direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(d, d)
        affine = np.eye(d + 1)
        affine[:d, :d] = direction @ np.diag(spacing)
        affine[:d, d] = image.GetOrigin()
        if self.affine_lps_to_ras:
            flip = np.eye(d + 1)
            flip[: min(d, 2), : min(d, 2)] = _LPS_TO_RAS[: min(d, 2), : min(d, 2)]
            affine = flip @ affine
        meta: dict[str, Any] = {
            "spacing": spacing,
            MetaKeys.ORIGINAL_AFFINE: affine,
            MetaKeys.AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(image.GetSize()),
            MetaKeys.SPACE: SpaceKeys.RAS if self.affine_lps_to_ras else SpaceKeys.LPS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if vector else float("nan"),
        }
        for key in image.GetMetaDataKeys():
            if not key.startswith("ITK_"):
                meta[key] = image.GetMetaData(key)
        return np.ascontiguousarray(array), meta
