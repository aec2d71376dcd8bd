"""A MONAI ``ImageReader`` backed by SimpleITK (DICOM series, MetaImage / NRRD), and header probes.

:func:`read_spatial_header` reads what a file's header claims (spatial shape, voxel type) without decoding
anything, for every format the pipelines load; :class:`mg3d.data.transforms.CheckHeaderd` uses it so that a
file claiming an enormous volume is refused before a reader allocates it.

Why: CT data sets often ship as DICOM series folders or ``.mhd``/``.nrrd`` files. MONAI's own
``ITKReader`` needs the ``itk`` package and its ``NrrdReader`` needs ``pynrrd``; mg3d depends on
SimpleITK (TorchIO does too), so this reader plugs SimpleITK into ``LoadImage``.

Output follows MONAI's reader conventions, so every later transform behaves as with NIfTI:
the array is in the file's (i, j, k) index order (SimpleITK's numpy view is (k, j, i), hence the
transpose), vector pixels become a trailing channel axis, and the affine is converted from ITK's LPS
world to the RAS world that ``NibabelReader`` reports (``space = RAS``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from monai.data.image_reader import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from mg3d.data.sources._common import (
    DEFAULT_MAX_VOXELS,
    read_image_header_2d,
    read_npy_header,
    require_file,
)
from mg3d.errors import DataError

__all__ = ["SUFFIXES", "SimpleITKReader", "is_dicom_series_dir", "read_sitk_header", "read_spatial_header"]

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


# ---------------------------------------------------------------------------------------------- header probes

_SITK_COMPLEX = {
    "complex of 32-bit float": np.dtype(np.complex64),
    "complex of 64-bit float": np.dtype(np.complex128),
}


def _check_voxels(path: Path, shape: Sequence[int], max_voxels: int) -> None:
    total = math.prod(shape)
    if total > max_voxels:
        raise DataError(
            f"{path}: header claims {total:,} voxels {list(shape)}, above the limit of {max_voxels:,}; "
            "refusing to load it"
        )


# Deflate cannot compress better than about 1032:1, so a .nii.gz of n bytes holds at most ~1032·n bytes.
_MAX_DEFLATE_RATIO = 1032


def _check_nifti_size(path: Path, need: int) -> None:
    """Refuse a NIfTI that cannot hold the data its header promises, from the file size alone: nibabel allocates
    the claimed array before it reads (and finds the data missing), so a header-only file claiming a large
    volume under the voxel limit would otherwise cost gigabytes."""
    size = path.stat().st_size
    if path.name.lower().endswith(".gz"):
        if need > size * _MAX_DEFLATE_RATIO + (1 << 20):
            raise DataError(
                f"{path}: truncated: header promises {need:,} bytes, a gzip stream of {size:,} bytes holds at most "
                f"~{size * _MAX_DEFLATE_RATIO:,}"
            )
    elif size < need:
        raise DataError(f"{path}: truncated: header promises {need:,} bytes, file holds {size:,}")


def read_sitk_header(
    path: PathLike, *, max_voxels: int = DEFAULT_MAX_VOXELS
) -> tuple[tuple[int, ...], np.dtype | None]:
    """Size (``(i, j, k)``, MONAI's order after :class:`SimpleITKReader`'s transpose) and complex voxel type of
    a MetaImage/NRRD file or a one-series DICOM folder, from headers only (``ReadImageInformation``).

    A DICOM series is as large as its first slice's rows × columns × the number of slices.
    """
    p = Path(path)
    try:
        if p.is_dir():
            ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p))
            if len(ids) != 1:
                raise DataError(f"{p}: a volume folder must hold exactly one DICOM series, found {len(ids)}")
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), ids[0])
            reader = sitk.ImageFileReader()
            reader.SetFileName(files[0])
            reader.ReadImageInformation()
            size: tuple[int, ...] = (*(int(s) for s in reader.GetSize()[:2]), len(files))
        else:
            require_file(p, "image")
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(p))
            reader.ReadImageInformation()
            size = tuple(int(s) for s in reader.GetSize())
        kind = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    except RuntimeError as err:  # SimpleITK reports every I/O failure as RuntimeError
        raise DataError(
            f"{p}: SimpleITK cannot read the header: {str(err).strip().splitlines()[-1]}"
        ) from None
    _check_voxels(p, size, max_voxels)
    return size, _SITK_COMPLEX.get(kind)


def read_spatial_header(
    path: PathLike, ndim: int, what: str = "image", *, max_voxels: int = DEFAULT_MAX_VOXELS
) -> tuple[tuple[int, ...], np.dtype | None] | None:
    """Spatial shape and voxel dtype (``None`` when the header does not say) of an image the pipelines load,
    from its header alone; raise :class:`DataError` naming the file when it claims more than ``max_voxels``,
    is a NIfTI too small to hold what its header promises, or cannot be read. ``None`` for a file this does not
    probe (a multi-frame DICOM volume: MONAI's pydicom
    reader checks it). Singleton channel axes (NIfTI ``x×y×z×1``, ``.npy`` ``1×…``) are dropped, as the loader
    drops them.
    """
    import nibabel as nib

    p = Path(path)
    name = p.name.lower()
    need: int | None = None  # bytes a NIfTI must hold
    if name.endswith((".nii", ".nii.gz")):
        require_file(p, what)
        try:
            img = nib.load(str(p))  # reads the header; the data stay on disk behind a proxy
            shape = tuple(int(v) for v in img.shape)
            dtype = img.header.get_data_dtype()
            offset = getattr(img.dataobj, "offset", None)  # the on-disk one (img.header's is reset to 0)
            need = int(offset or 0) + math.prod(shape) * dtype.itemsize
        except Exception as err:  # nibabel raises many types for a broken header
            raise DataError(f"{p}: cannot read NIfTI header ({type(err).__name__}: {err})") from None
    elif name.endswith(".npy"):
        shape, dtype = read_npy_header(p, max_voxels=max_voxels, what=what)
        if len(shape) == ndim + 1 and shape[0] == 1:
            shape = shape[1:]
    elif p.is_dir() or name.endswith(SUFFIXES):
        shape, dtype = read_sitk_header(p, max_voxels=max_voxels)
    elif ndim == 2:
        return tuple(read_image_header_2d(p, verify=False).spatial_shape), None
    else:
        return None
    while len(shape) > ndim and shape[-1] == 1:
        shape = shape[:-1]
    _check_voxels(p, shape, max_voxels)
    if need is not None:
        _check_nifti_size(p, need)
    return shape, dtype
