"""What inference takes and gives: inputs, predictions (boxes in the stored voxel frame and in mm), image probing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mg3d.data.readers import read_sitk_header
from mg3d.errors import DataError
from mg3d.prompts import ParsedCompletion

#: The one frame of a prediction row's ``box_voxel``, ``box_world_mm``, ``spacing``, ``affine`` and ``spatial_shape``.
BOX_FRAME = "stored image voxel frame (box_world_mm: RAS mm through its affine)"


@dataclass(frozen=True)
class Prediction:
    """One greedy answer, read back and mapped to the stored image's voxel frame (and to mm where known).

    ``box_voxel`` follows DESIGN.md §2 (half-open voxel-edge box, MONAI axis order of the stored image), clipped
    to the image as :mod:`mg3d.evaluation` scores it;
    ``box_text`` is the same box on the grid the model saw; ``box_world_mm`` is the hull of the box's corners
    through ``affine`` (RAS mm; exact for axis-aligned affines), ``None`` without geometry (radiographs).
    ``frame`` is the :class:`~mg3d.frames.CoordinateFrame` (as a dict) from the voxel frame to the text grid.
    ``gt_boxes`` is empty when the input had no ground truth (bundle inputs). ``spacing``, ``affine`` and
    ``spatial_shape`` are the stored image's, the frame of ``box_voxel`` (rows name it: ``"box_frame"``).
    """

    id: str
    dataset: str
    text: str
    ndim: int
    completion: str
    parsed: ParsedCompletion
    box_text: tuple[float, ...] | None
    box_voxel: tuple[float, ...] | None
    box_world_mm: tuple[float, ...] | None
    gt_boxes: tuple[tuple[float, ...], ...]
    frame: dict[str, Any]
    affine: tuple[tuple[float, ...], ...] | None
    spacing: tuple[float, ...] | None
    category: str | None
    question_type: int | None
    image: str
    modality: str = ""
    spatial_shape: tuple[int, ...] = ()
    codec: str = ""

    @property
    def ok(self) -> bool:
        """True when the completion gave a box that maps back to the voxel frame."""
        return self.box_voxel is not None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the parse as its status, flags and detail)."""
        return {
            "id": self.id,
            "dataset": self.dataset,
            "image": self.image,
            "phrase": self.text,
            "modality": self.modality,
            "ndim": self.ndim,
            "spatial_shape": list(self.spatial_shape),
            "completion": self.completion,
            "parse_status": self.parsed.status.value,
            "parse_flags": sorted(f.value for f in self.parsed.flags),
            "parse_detail": self.parsed.detail,
            "box_voxel": None if self.box_voxel is None else list(self.box_voxel),
            "box_world_mm": None if self.box_world_mm is None else list(self.box_world_mm),
            "box_text": None if self.box_text is None else list(self.box_text),
            "gt_boxes": [list(b) for b in self.gt_boxes],
            "category": self.category,
            "question_type": self.question_type,
            "spacing": None if self.spacing is None else list(self.spacing),
            "affine": None if self.affine is None else [list(r) for r in self.affine],
            "frame": self.frame,
            "box_frame": BOX_FRAME,
            "codec": self.codec,
        }


@dataclass(frozen=True)
class InferenceInput:
    """An image (file or DICOM series folder) and a phrase, without ground truth.

    ``modality`` picks the intensity preset (default: the grounder's default for the image's ndim);
    ``dataset`` picks a per-dataset pipeline when the grounder has one under that name.
    """

    image: str
    phrase: str
    id: str | None = None
    modality: str | None = None
    dataset: str | None = None


@dataclass(frozen=True)
class ImageInfo:
    """What a header says without decoding pixels: ndim, spatial shape (MONAI axis order), geometry."""

    ndim: int
    spatial_shape: tuple[int, ...]
    has_geometry: bool


# ---------------------------------------------------------------------------------------------- image probing


def probe_image(path: str | os.PathLike[str]) -> ImageInfo:
    """Read only the header of an image to learn its ndim and spatial shape (in MONAI's axis order).

    The pipeline's loader checks the decoded image against this shape, so a probe that disagreed with MONAI
    would fail loudly, never shift a box. NIfTI, MetaImage/NRRD and DICOM series carry world geometry;
    PNG/JPEG/2D DICOM radiographs and ``.npy`` arrays do not (as for records, DESIGN.md §3).
    """
    from mg3d.data.readers import read_image_header_2d, read_nifti, read_npy_header

    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: image not found")
    name = p.name.lower()
    try:
        if p.is_dir():
            return _probe_sitk(p)
        if name.endswith((".nii", ".nii.gz")):
            header, _ = read_nifti(p, verify=False)
            return ImageInfo(3, tuple(header.spatial_shape), True)
        if name.endswith((".mhd", ".mha", ".nrrd", ".nhdr")):
            return _probe_sitk(p)
        if name.endswith(".npy"):
            shape, _ = read_npy_header(p)
            if len(shape) in (3, 4) and shape[0] == 1:
                shape = shape[1:]
            if len(shape) not in (2, 3):
                raise DataError(
                    f"{p}: array of shape {list(shape)} is neither one 2D image nor one 3D volume"
                )
            return ImageInfo(len(shape), tuple(shape), False)
        header = read_image_header_2d(p, verify=False)
        return ImageInfo(2, tuple(header.spatial_shape), False)
    except DataError as err:
        raise DataError(f"cannot use {p} as an input image: {err}") from None


def _probe_sitk(path: Path) -> ImageInfo:
    size, _dtype = read_sitk_header(path)  # headers only; refuses a claim above the voxel limit
    if len(size) not in (2, 3):
        raise DataError(f"{path}: {len(size)}D image; mg3d reads 2D images and 3D volumes")
    return ImageInfo(len(size), size, len(size) == 3)
