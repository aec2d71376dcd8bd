"""Loading: the item a pipeline starts from, the header check before decoding, and the record loader."""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import pydicom
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImaged, MapTransform

from mg3d.boxes import mask_to_box
from mg3d.data.modalities import PHOTOMETRIC_KEY
from mg3d.data.readers import SimpleITKReader, read_spatial_header
from mg3d.data.records import GroundingRecord
from mg3d.data.transforms.tracking import _SPATIAL_KEYS, BOXES, FRAME, IMAGE, MASK, _np64
from mg3d.errors import DataError
from mg3d.frames import CoordinateFrame


def record_to_item(record: GroundingRecord) -> dict[str, Any]:
    """The data dict a pipeline starts from (paths, not pixels; what caches hash)."""
    item: dict[str, Any] = {
        IMAGE: record.image,
        "id": record.id,
        "dataset": record.dataset,
        "modality": record.modality,
        "ndim": record.ndim,
        "text": record.text,
        BOXES: record.boxes_array(),
        "spatial_shape": list(record.spatial_shape),
        "category": record.category,
        "question_type": record.question_type,
        "has_spacing": record.spacing is not None,
        "affine_src": None if record.affine is None else [list(r) for r in record.affine],
    }
    if record.mask is not None:
        item[MASK] = record.mask.path
        # not "mask_*": Spacingd treats keys named "<image key>_*" as meta dicts
        item["target_label"] = record.mask.label
    return item


def _photometric(path: str) -> str | None:
    """PhotometricInterpretation of a DICOM file (MONAI's pydicom reader drops it from the metadata)."""
    try:
        if not pydicom.misc.is_dicom(path):
            return None
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PhotometricInterpretation"])
    except (OSError, pydicom.errors.InvalidDicomError):
        return None
    value = ds.get("PhotometricInterpretation")
    return None if value is None else str(value)


class CheckHeaderd(MapTransform):
    """Check each file's header against its record before anything is decoded (the first pipeline step).

    A file replaced or corrupted after ``prepare_data``, or handed in for inference, could claim an enormous
    volume (nibabel allocates what the header claims before it finds the data missing: 16 GB for a
    2000×2000×1000 float header), hold complex or structured voxels (cast silently to real numbers by the
    readers) or have another shape; each is refused here with a :class:`DataError` naming the record, at the
    cost of one header read (:func:`mg3d.data.readers.read_spatial_header`).
    """

    def __init__(self, load_mask: bool = True) -> None:
        super().__init__(list(_SPATIAL_KEYS) if load_mask else [IMAGE], allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        rid, ndim = data.get("id"), int(data["ndim"])
        expected = tuple(int(v) for v in data["spatial_shape"])
        for key in self.key_iterator(dict(data)):
            value = data[key]
            if not isinstance(value, (str, os.PathLike)):
                continue
            try:
                found = read_spatial_header(value, ndim, str(key))
            except DataError as err:
                raise DataError(f"record {rid!r}: {err}") from err
            if found is None:
                continue
            shape, dtype = found
            if dtype is not None and dtype.kind not in "biuf":
                raise DataError(f"record {rid!r}: {key} {value} stores {dtype} voxels; expected real numbers")
            if shape != expected:
                raise DataError(
                    f"record {rid!r}: {key} {value} has spatial shape {shape} in its header, the record "
                    f"says {expected} (changed since the manifest was written?)"
                )
        return data


class LoadRecordd(MapTransform):
    """Load a record's image (and mask) channel-first, check it against the record, start its frame.

    Readers: MONAI's defaults chosen by suffix (NIfTI → nibabel, PNG/JPEG → PIL, DICOM file → pydicom,
    ``.npy``) plus :class:`~mg3d.data.readers.SimpleITKReader` for DICOM series folders and
    ``.mhd``/``.nrrd``. Radiographs (2D) get an identity affine: they have no world frame in mg3d, and
    DICOM radiographs often carry a pixel spacing of 0 that would make a degenerate one. Arrays stored with
    their own leading channel (M3D's ``1×D×H×W`` ``.npy``) lose the extra singleton axis.

    ``needs_geometry`` (set when the pipeline reorients or respaces) refuses 3D records without an affine
    or spacing: their axes have no anatomical meaning, so a reorientation would silently scramble them.
    """

    def __init__(self, load_mask: bool = False, needs_geometry: bool = False) -> None:
        super().__init__(list(_SPATIAL_KEYS), allow_missing_keys=True)
        self.load_mask = load_mask
        self.needs_geometry = needs_geometry
        with warnings.catch_warnings():  # MONAI's optional GPU DICOM decoder announces its absence
            warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
            self._loader = LoadImaged(list(_SPATIAL_KEYS), image_only=True, ensure_channel_first=True,
                                      allow_missing_keys=True)  # fmt: skip
        self._loader.register(SimpleITKReader())

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        rid, ndim = d["id"], int(d["ndim"])
        if ndim == 3 and self.needs_geometry and d.get("affine_src") is None and not d.get("has_spacing"):
            raise DataError(
                f"record {rid!r}: the manifest gives neither affine nor spacing (as for M3D's preprocessed "
                ".npy), so the image cannot be reoriented or respaced; add them to the record if the file has "
                "geometry, or set the source's pipeline axcodes: null and pixdim: null"
            )
        if not self.load_mask:
            d.pop(MASK, None)
        paths = {k: str(d[k]) for k in _SPATIAL_KEYS if k in d}
        try:
            with warnings.catch_warnings():
                if (
                    ndim == 2
                ):  # radiographs have no orientation tags; mg3d gives them an identity affine below
                    warnings.filterwarnings("ignore", message="PydicomReader: ImageOrientationPatient")
                d = dict(self._loader(d))
        except DataError as err:
            raise DataError(f"record {rid!r}: {err}") from err
        except Exception as err:  # MONAI wraps every reader failure in RuntimeError/OSError/ValueError
            raise DataError(f"record {rid!r}: cannot read {paths}: {type(err).__name__}: {err}") from err
        for key in [k for k in _SPATIAL_KEYS if k in d]:
            if d[key].ndim == ndim + 2 and d[key].shape[1] == 1:  # (1, 1, *spatial): the file had a channel
                d[key] = d[key][:, 0]
        img = d[IMAGE]
        shape = tuple(int(s) for s in img.shape[1:])
        if len(shape) != ndim:
            raise DataError(
                f"record {rid!r}: {paths[IMAGE]} loads as {len(shape)}D {shape}, the record says {ndim}D"
            )
        expected = tuple(int(s) for s in d["spatial_shape"])
        if shape != expected:
            raise DataError(
                f"record {rid!r}: {paths[IMAGE]} has spatial shape {shape}, the record says {expected}"
            )
        if ndim == 2:
            img.affine = torch.eye(img.affine.shape[0], dtype=torch.float64)
            photometric = _photometric(paths[IMAGE])
            if photometric is not None:
                d[PHOTOMETRIC_KEY] = photometric
        elif d.get("affine_src") is None and d.get("has_spacing"):
            d["affine_src"] = _np64(img.meta.get("original_affine", img.affine)).tolist()
        if MASK in d:
            d[MASK] = self._target_mask(d, rid, paths[MASK], img)
        d[FRAME] = CoordinateFrame(shape).to_dict()
        return d

    @staticmethod
    def _target_mask(d: dict[Hashable, Any], rid: str, path: str, img: MetaTensor) -> MetaTensor:
        mask = d[MASK]
        if tuple(mask.shape[1:]) != tuple(img.shape[1:]):
            raise DataError(f"record {rid!r}: mask {path} has shape {tuple(mask.shape[1:])}, "
                            f"the image {tuple(img.shape[1:])}")  # fmt: skip
        if img.ndim - 1 == 3 and not np.allclose(_np64(mask.affine), _np64(img.affine), atol=1e-3):
            raise DataError(f"record {rid!r}: mask {path} and its image have different affines")
        label = int(d["target_label"])
        target = (mask[:1] == label).to(torch.float32)
        if not bool(target.any()):
            raise DataError(f"record {rid!r}: mask {path} has no voxel with label {label}")
        if img.ndim - 1 == 2:
            target.affine = img.affine.clone()
        boxes = _np64(d[BOXES])
        if len(boxes) == 1:
            mbox = mask_to_box(target[0].numpy())
            if not np.allclose(mbox, boxes[0]):
                raise DataError(
                    f"record {rid!r}: box {boxes[0].tolist()} differs from the box of mask=={label} "
                    f"{mbox.tolist()} in {path}; fix the manifest or set use_mask=False"
                )
        return target
