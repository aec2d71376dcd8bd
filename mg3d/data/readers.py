"""A MONAI ``ImageReader`` backed by SimpleITK (DICOM series, MetaImage / NRRD), and header readers.

Header readers look at sizes before any pixel is decoded (PIL's lazy open, pydicom with
``stop_before_pixels``, nibabel's header, the ``.npy`` header, SimpleITK's ``ReadImageInformation``), so a
file that claims an enormous image is refused before memory is allocated for it. Every failure of a reader
library is caught and re-raised naming the file (:class:`~mg3d.errors.SourceError` with a skip ``kind`` for
the data set adapters' readers, :class:`~mg3d.errors.DataError` for the SimpleITK ones), never as a traceback
from inside nibabel, PIL or pydicom. The adapters (``mg3d.data.sources``), the inference probe and
:func:`read_spatial_header` — which :class:`mg3d.data.transforms.CheckHeaderd` runs before every load, for
every format the pipelines read — all use them.

Why: CT data sets often ship as DICOM series folders or ``.mhd``/``.nrrd`` files. MONAI's own
``ITKReader`` needs the ``itk`` package and its ``NrrdReader`` needs ``pynrrd``; mg3d depends on
SimpleITK (TorchIO does too), so this reader plugs SimpleITK into ``LoadImage``.

Output follows MONAI's reader conventions, so every later transform behaves as with NIfTI:
the array is in the file's (i, j, k) index order (SimpleITK's numpy view is (k, j, i), hence the
transpose), vector pixels become a trailing channel axis, and the affine is converted from ITK's LPS
world to the RAS world that ``NibabelReader`` reports (``space = RAS``).
"""

from __future__ import annotations

import gzip
import math
import os
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from monai.data.image_reader import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from mg3d.errors import DataError, SourceError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_VOXELS",
    "SUFFIXES",
    "ImageHeader",
    "SimpleITKReader",
    "is_dicom_series_dir",
    "load_nifti_array",
    "load_npy",
    "read_image_header_2d",
    "read_nifti",
    "read_npy_header",
    "read_sitk_header",
    "read_spatial_header",
    "require_file",
]

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


# ---------------------------------------------------------------------------------------------- header readers

# Refuse images larger than this before decoding them: 2D radiographs are ≤ ~4k², CT volumes ≤ ~1e9 voxels.
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_VOXELS = 1_500_000_000


@dataclass(frozen=True)
class ImageHeader:
    """What a header says about a stored image, in voxel-frame axis order (2D: x = column first)."""

    path: Path
    format: str
    spatial_shape: tuple[int, ...]
    spacing: tuple[float, ...] | None = None
    affine: tuple[tuple[float, ...], ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def require_file(path: Path, what: str = "file") -> Path:
    """``path`` when it is a non-empty file; else a :class:`SourceError` naming it (kind ``missing_file`` /
    ``empty_file``, counted by the adapters' skip log)."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: {what} not found", "missing_file")
    if path.stat().st_size == 0:
        raise SourceError(f"{path}: {what} is empty (0 bytes)", "empty_file")
    return path


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    with path.open("rb") as handle:
        head = handle.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _check_pixels(path: Path, shape: Sequence[int], max_pixels: int) -> None:
    total = math.prod(shape)
    if total > max_pixels:
        raise SourceError(
            f"{path}: header claims {total:,} pixels {list(shape)}, above the limit of {max_pixels:,}; "
            "refusing to decode it (raise max_pixels if the image is genuine)",
            "too_large",
        )


def _dicom_header(path: Path, max_pixels: int, verify: bool) -> ImageHeader:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as err:
        raise SourceError(
            f"{path}: cannot read DICOM header ({type(err).__name__}: {err})", "unreadable"
        ) from None
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise SourceError(f"{path}: DICOM header has no Rows/Columns (not an image?)", "unreadable")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise SourceError(f"{path}: DICOM holds {frames} frames; a 2D radiograph has one", "bad_geometry")
    shape = (int(cols), int(rows))
    _check_pixels(path, shape, max_pixels)
    spacing = None
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(tag)
        if value is not None and len(value) == 2:
            row_mm, col_mm = float(value[0]), float(value[1])
            if math.isfinite(row_mm) and math.isfinite(col_mm) and row_mm > 0 and col_mm > 0:
                spacing = (col_mm, row_mm)  # voxel frame: axis 0 = column
                break
    info = {"photometric": str(ds.get("PhotometricInterpretation", ""))}
    if verify:
        try:
            full = pydicom.dcmread(path)
            if "PixelData" not in full:
                raise SourceError(f"{path}: DICOM has no pixel data", "unreadable")
            if not full.file_meta.TransferSyntaxUID.is_compressed:
                bits = int(full.get("BitsAllocated", 8))
                need = shape[0] * shape[1] * int(full.get("SamplesPerPixel", 1)) * bits // 8
                if len(full.PixelData) < need:
                    raise SourceError(
                        f"{path}: DICOM pixel data is truncated ({len(full.PixelData)} of {need} bytes)",
                        "truncated",
                    )
        except SourceError:
            raise
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as err:
            raise SourceError(
                f"{path}: cannot read DICOM ({type(err).__name__}: {err})", "truncated"
            ) from None
    return ImageHeader(path, "dicom", shape, spacing, None, info)


def read_image_header_2d(
    path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS, verify: bool = True
) -> ImageHeader:
    """Size (and spacing where the file has one) of a 2D PNG/JPEG/DICOM image, shape ``(width, height)``.

    ``verify`` decodes the pixels once (after the size check) so a truncated or corrupt file fails here,
    at preparation time, rather than in the middle of a training run.
    """
    from PIL import Image, UnidentifiedImageError

    path = require_file(Path(path), "image")
    if _is_dicom(path):
        return _dicom_header(path, max_pixels, verify)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                shape = (int(img.size[0]), int(img.size[1]))
                mode, fmt = img.mode, (img.format or "").lower()
                _check_pixels(path, shape, max_pixels)
                if verify:
                    img.load()
    except SourceError:
        raise
    except Image.DecompressionBombError as err:
        raise SourceError(f"{path}: refused, image too large ({err})", "too_large") from None
    except UnidentifiedImageError:
        raise SourceError(f"{path}: not a readable image (PIL cannot identify it)", "unreadable") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise SourceError(
            f"{path}: cannot decode image ({type(err).__name__}: {err}); truncated?", "truncated"
        ) from None
    return ImageHeader(path, fmt or "image", shape, None, None, {"mode": mode})


def _nifti_data_bytes(img: Any) -> tuple[int, int]:
    header = img.header
    offset = int(header.get_data_offset())
    nbytes = int(math.prod(img.shape)) * header.get_data_dtype().itemsize
    return offset, nbytes


def _check_nifti_complete(path: Path, img: Any) -> None:
    """Stream the (decompressed) file to check it holds all the data its header promises.

    Streams in chunks so a CT of a gigabyte is checked without holding it in memory; written by hand
    because nibabel only notices truncation when the data is finally read (often mid-training).
    """
    offset, nbytes = _nifti_data_bytes(img)
    need = offset + nbytes
    if str(path).endswith(".gz"):
        got = 0
        try:
            with gzip.open(path, "rb") as handle:
                while chunk := handle.read(1 << 22):
                    got += len(chunk)
        except (EOFError, OSError, zlib.error) as err:
            raise SourceError(
                f"{path}: truncated or corrupt gzip stream after {got:,} bytes ({type(err).__name__}: {err})",
                "truncated",
            ) from None
    else:
        got = path.stat().st_size
    if got < need:
        raise SourceError(
            f"{path}: truncated: header promises {need:,} bytes, file holds {got:,}", "truncated"
        )


def read_nifti(
    path: str | os.PathLike[str],
    *,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    verify: bool = True,
    what: str = "image",
) -> tuple[ImageHeader, Any]:
    """Header of a 3D NIfTI (shape, spacing, affine) and the lazily loaded nibabel image.

    Refuses anything that is not exactly 3D, has NaN or non-positive spacing or a non-finite affine,
    or claims more than ``max_voxels`` voxels; ``verify`` checks the file is complete.
    """
    import nibabel as nib

    path = require_file(Path(path), what)
    from nibabel.openers import ImageOpener

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
        # nibabel's loader silently "fixes" zero/negative pixdim (to 1 / abs); read the raw header to see them.
        with ImageOpener(str(path)) as handle:
            raw = type(img.header).from_fileobj(handle, check=False)
        zooms = tuple(float(z) for z in raw["pixdim"][1 : 1 + len(shape)])
    except Exception as err:  # nibabel raises many types (ImageFileError, HeaderDataError, EOFError, ...)
        raise SourceError(
            f"{path}: cannot read NIfTI header ({type(err).__name__}: {err})", "unreadable"
        ) from None
    if len(shape) != 3:
        raise SourceError(
            f"{path}: {what} has {len(shape)} dimensions {list(shape)}; expected a 3D volume", "bad_geometry"
        )
    if math.prod(shape) > max_voxels:
        raise SourceError(
            f"{path}: header claims {math.prod(shape):,} voxels {list(shape)}, above the limit of "
            f"{max_voxels:,}; refusing to load it",
            "too_large",
        )
    if math.prod(shape) == 0:
        raise SourceError(f"{path}: {what} has an empty shape {list(shape)}", "bad_geometry")
    spacing = zooms[:3]
    if not all(math.isfinite(z) and z > 0 for z in spacing):
        raise SourceError(
            f"{path}: {what} has invalid voxel spacing {list(spacing)} (NaN or ≤ 0)", "bad_geometry"
        )
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise SourceError(
            f"{path}: {what} has a non-finite or singular affine {affine.tolist()}", "bad_geometry"
        )
    if verify:
        _check_nifti_complete(path, img)
    header = ImageHeader(
        path,
        "nifti",
        shape,
        spacing,
        tuple(tuple(float(v) for v in row) for row in affine),
        {"dtype": str(img.header.get_data_dtype())},
    )
    return header, img


def load_nifti_array(path: Path, img: Any) -> np.ndarray:
    """The voxel array of a NIfTI loaded by :func:`read_nifti`, read errors wrapped with the file name."""
    try:
        return np.asanyarray(img.dataobj)
    except Exception as err:  # EOFError, zlib.error, OSError, ValueError from nibabel's array proxy
        raise SourceError(
            f"{path}: cannot read voxel data ({type(err).__name__}: {err}); truncated?", "truncated"
        ) from None


def read_npy_header(
    path: str | os.PathLike[str], *, max_voxels: int = DEFAULT_MAX_VOXELS, what: str = "array"
) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file from its header; refuses object arrays and truncated files."""
    path = require_file(Path(path), what)
    try:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = handle.tell()
    except (ValueError, OSError, EOFError) as err:
        raise SourceError(f"{path}: not a readable .npy file ({err})", "unreadable") from None
    if dtype.hasobject:
        raise SourceError(f"{path}: holds Python objects; refusing to unpickle it", "unreadable")
    total = math.prod(shape)
    if total > max_voxels:
        raise SourceError(
            f"{path}: header claims {total:,} voxels {list(shape)}, above the limit of {max_voxels:,}",
            "too_large",
        )
    need = offset + total * dtype.itemsize
    size = path.stat().st_size
    if size < need:
        raise SourceError(
            f"{path}: truncated: header promises {need:,} bytes, file holds {size:,}", "truncated"
        )
    return tuple(int(s) for s in shape), dtype


def load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise SourceError(f"{path}: cannot read .npy data ({err})", "unreadable") from None


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
