"""MONAI dictionary pipelines for 2D radiographs and 3D volumes, with every spatial step recorded.

Sample contract (what :func:`build_pipeline` returns per record, and what tokenization consumes)
---------------------------------------------------------------------------------------------------
``image``
    ``torch.float32`` tensor, channel-first, values in ``[0, 1]`` (modality preset applied; CT with
    several windows has one channel per window). Spatial axes in *display orientation*:
    2D ``(x = column, y = row)`` as a radiograph is read; 3D ``(x, y, z)`` with ``x`` running from the
    patient's right to left, ``y`` from anterior to posterior and ``z`` from inferior to superior
    (``axcodes="LPS"``). An axial slice ``image[c, :, :, z].T`` therefore shows patient left on the
    image right and anterior up — the radiological convention of DESIGN.md §2.
``boxes``
    ``float64 (N, 2·ndim)`` ground truth in the voxel frame of the ORIGINAL stored image (unchanged).
``frame``
    :class:`~mg3d.boxes.CoordinateFrame` from that voxel grid to the grid of ``image``
    (``frame.shape == image.shape[1:]``); tokenization appends its own steps.
``target_boxes``
    The ground truth on the grid of ``image``: ``frame.to_text(boxes)`` clipped to every grid on the way
    (:func:`visible_boxes` — the part of the target the image still shows), except when
    the frame holds a free rotation (random affine augmentation) and the record has a mask — then the
    box of the rotated mask, which is tight where the corner hull is only an upper bound.
``text`` / ``source_text`` / ``flipped``
    The phrase the model reads (laterality words swapped when a left–right flip was applied), the
    phrase as the manifest gives it, and whether that flip happened.
``id``, ``dataset``, ``ndim``, ``modality``, ``category``, ``question_type``
    From the record.
``mask``
    The target mask on the grid of ``image`` (bool, channel-first) when ``PipelineConfig.carry_mask`` and
    the record has one, else ``None``.
``spacing``
    Output voxel size in mm (3D images with geometry), else ``None``.
``affine``
    The ORIGINAL image's voxel→world (RAS mm) affine as ``float64`` array, or ``None`` (radiographs).

How boxes follow the image
--------------------------
Every spatial step runs as a MONAI transform on the image (and the target mask when one is carried);
its MetaTensor affine before and after gives the exact voxel-to-voxel map ``inv(A_after) @ A_before``
(the points route of research/data_formats.md §2.3, done in closed form). :func:`step_from_affines`
turns that map into the matching named step of :mod:`mg3d.boxes` (``reorient``, ``respace``, ``crop``,
``resize``, ``pad``, ``flip``, ``affine``) and raises if the named step does not reproduce MONAI's map
exactly, so a behaviour change in MONAI can never silently shift boxes. Only the frame moves: boxes are
not transformed separately, so nothing is applied twice (the pitfall of MONAI's detection transforms).

Laterality rule
---------------
A left–right flip turns the patient's left into the image's patient-right. mg3d offers only the lateral
flip (axis 0 of the display orientation; flips along the other axes would invert "upper"/"anterior",
which no word swap fixes cleanly), it is **off by default** (``AugmentConfig.lateral_flip_prob = 0``)
because a mirrored body is situs inversus and phrases without a side word ("the liver") would teach it,
and when enabled the phrase's ``left``/``right`` words are swapped (:func:`swap_laterality`).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pydicom
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Affined,
    Compose,
    Flipd,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandBiasFieldd,
    RandGaussianNoised,
    RandomizableTransform,
    Resized,
    ResizeWithPadOrCropd,
    Spacingd,
    SpatialCropd,
    SpatialPadd,
    Transform,
)
from monai.transforms.utils import generate_spatial_bounding_box

from mg3d.boxes import (
    AffineStep,
    AxisAffineStep,
    CoordinateFrame,
    Step,
    clip_boxes,
    crop_step,
    flip_step,
    mask_to_box,
    pad_step,
    reorient_step,
    resize_step,
    respace_step,
)
from mg3d.data.modalities import PHOTOMETRIC_KEY, get_preset
from mg3d.data.readers import SimpleITKReader, read_spatial_header
from mg3d.data.records import GroundingRecord
from mg3d.errors import BoxError, ConfigError, DataError, Mg3dError

__all__ = [
    "DISPLAY_AXCODES",
    "AugmentConfig",
    "CheckHeaderd",
    "FitToGridd",
    "ForegroundCropd",
    "IntensityPresetd",
    "LoadRecordd",
    "Mg3dCompose",
    "Pipeline",
    "PipelineConfig",
    "RandAffineBoxd",
    "RandLateralFlipd",
    "RandTargetCropd",
    "SpatialStepd",
    "build_pipeline",
    "record_to_item",
    "step_from_affines",
    "swap_laterality",
    "unwrap_error",
    "visible_boxes",
    "voxel_map",
]

#: Canonical 3D display orientation: x → patient Left, y → Posterior, z → Superior (DICOM's LPS grid).
DISPLAY_AXCODES = "LPS"

IMAGE, MASK, FRAME, BOXES = "image", "mask", "frame", "boxes"
_SPATIAL_KEYS = (IMAGE, MASK)
_FIT_MODES = ("resize", "letterbox", "pad_crop")
_STEP_KINDS = ("reorient", "respace", "resize", "crop", "pad", "flip", "affine")


# ---------------------------------------------------------------------------------------------- configuration


@dataclass
class AugmentConfig:
    """Training-time augmentations; every probability defaults to 0 (off).

    Spatial ones keep boxes exact through the frame (the random affine is exact when ``rotate_deg`` is
    0; with rotation the frame's box is a corner hull and ``target_boxes`` comes from the carried mask).
    """

    target_crop_prob: float = 0.0
    target_crop_scale: tuple[float, float] = (0.6, 1.0)
    lateral_flip_prob: float = 0.0
    affine_prob: float = 0.0
    rotate_deg: float = 0.0
    scale: float = 0.1
    translate: float = 0.05
    noise_prob: float = 0.0
    noise_std: float = 0.02
    gamma_prob: float = 0.0
    gamma: tuple[float, float] = (0.7, 1.5)
    bias_prob: float = 0.0
    bias_coeff: float = 0.2

    def __post_init__(self) -> None:
        for name in (
            "target_crop_prob",
            "lateral_flip_prob",
            "affine_prob",
            "noise_prob",
            "gamma_prob",
            "bias_prob",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"AugmentConfig.{name} must lie in [0, 1], got {value}")
        lo, hi = self.target_crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(
                f"AugmentConfig.target_crop_scale must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}"
            )
        if (
            self.rotate_deg < 0
            or self.rotate_deg > 45
            or not 0 <= self.scale < 1
            or not 0 <= self.translate < 0.5
        ):
            raise ConfigError(
                f"AugmentConfig: rotate_deg in [0, 45], scale in [0, 1), translate in [0, 0.5) expected, got "
                f"{self.rotate_deg}, {self.scale}, {self.translate}"
            )

    @property
    def rotates(self) -> bool:
        return self.affine_prob > 0 and self.rotate_deg > 0


@dataclass
class PipelineConfig:
    """Per-source pipeline options (LightningCLI reads these from YAML).

    Args:
        spatial_size: the model grid, in display axis order ((x, y) or (x, y, z)); ``None`` keeps the grid.
        fit: how to reach ``spatial_size``: ``resize`` (stretch), ``letterbox`` (keep the aspect ratio,
            pad the rest) or ``pad_crop`` (no resampling: centre pad/crop).
        axcodes: 3D orientation the volume is turned to (``LPS`` = display orientation); ``None`` keeps
            the stored axis order (arrays without geometry, e.g. M3D's preprocessed ``.npy``).
        pixdim: 3D output voxel size in mm (``Spacingd``); ``None`` keeps the stored spacing.
        preset: modality preset to use; ``None`` uses the record's modality.
        preset_options: per-modality preset options, e.g. ``{"CT": {"windows": ["lung", "mediastinum"]}}``.
        crop_foreground: crop to voxels above ``foreground_threshold`` (after the preset), never cutting
            the target, with ``foreground_margin`` voxels kept around.
        use_mask: load the record's mask when a rotation augmentation needs it for exact boxes.
        carry_mask: always carry the record's target mask (``mask == label``) through the pipeline and
            return it as ``sample["mask"]`` (bool, channel-first) — for visualisation and for checking boxes.
        augment: training augmentations (ignored for validation/test pipelines).
    """

    spatial_size: tuple[int, ...] | None = None
    fit: Literal["resize", "letterbox", "pad_crop"] = "resize"
    axcodes: str | None = DISPLAY_AXCODES
    pixdim: tuple[float, ...] | None = None
    preset: str | None = None
    preset_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    crop_foreground: bool = False
    foreground_threshold: float = 0.05
    foreground_margin: int = 2
    use_mask: bool = True
    carry_mask: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if isinstance(self.augment, Mapping):  # plain dicts from YAML / jsonargparse
            self.augment = AugmentConfig(**self.augment)
        if self.spatial_size is not None:
            self.spatial_size = tuple(int(s) for s in self.spatial_size)
            if len(self.spatial_size) not in (2, 3) or min(self.spatial_size) <= 0:
                raise ConfigError(
                    f"PipelineConfig.spatial_size must be 2 or 3 positive ints, got {self.spatial_size}"
                )
        if self.fit not in _FIT_MODES:
            raise ConfigError(f"PipelineConfig.fit must be one of {_FIT_MODES}, got {self.fit!r}")
        if self.pixdim is not None:
            self.pixdim = tuple(float(p) for p in self.pixdim)
            if len(self.pixdim) != 3 or min(self.pixdim) <= 0:
                raise ConfigError(f"PipelineConfig.pixdim must be 3 positive sizes in mm, got {self.pixdim}")
        if self.axcodes is not None and (
            len(self.axcodes) != 3 or {c for c in self.axcodes.upper()} - set("LRAPSI")
            or len({_AXIS_OF[c] for c in self.axcodes.upper()}) != 3
        ):  # fmt: skip
            raise ConfigError(
                f"PipelineConfig.axcodes must name each of L/R, A/P, S/I once, got {self.axcodes!r}"
            )
        if self.foreground_margin < 0:
            raise ConfigError(f"PipelineConfig.foreground_margin must be >= 0, got {self.foreground_margin}")

    def check_ndim(self, ndim: int, where: str = "pipeline") -> None:
        """Refuse a config that cannot apply to ``ndim``-D images (e.g. a 3D grid for radiographs)."""
        if self.spatial_size is not None and len(self.spatial_size) != ndim:
            raise ConfigError(f"{where}: spatial_size {self.spatial_size} has {len(self.spatial_size)} axes, "
                              f"the images are {ndim}D")  # fmt: skip
        if ndim == 2 and self.pixdim is not None:
            raise ConfigError(f"{where}: pixdim (respacing) applies to 3D volumes only")


_AXIS_OF = {"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}


# ---------------------------------------------------------------------------------------------- geometry


def _np64(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def voxel_map(before: Any, after: Any, ndim: int) -> np.ndarray:
    """``(ndim+1)²`` map of voxel-centre coordinates from the grid of affine ``before`` to that of ``after``.

    MONAI keeps ``world = A @ voxel_centre`` true for every spatial transform's output, so the old centre
    ``c`` sits at new centre ``inv(A_after) @ A_before @ c``. 2D images may carry a 4×4 affine; only the
    in-plane part and the translation column are kept.
    """
    b, a = _np64(before), _np64(after)
    full = np.linalg.solve(a, b)
    n = full.shape[0] - 1
    out = np.eye(ndim + 1)
    out[:ndim, :ndim] = full[:ndim, :ndim]
    out[:ndim, ndim] = full[:ndim, n]
    return out


def _edge_matrix(centre_map: np.ndarray) -> np.ndarray:
    """Centre-coordinate map → edge-coordinate map: ``e' = M (e − ½) + ½``."""
    d = centre_map.shape[0] - 1
    out = centre_map.copy()
    out[:d, d] = centre_map[:d, d] + 0.5 - 0.5 * centre_map[:d, :d].sum(axis=1)
    return out


def _axis_parts(edge: np.ndarray, tol: float = 1e-6) -> tuple[list[int], list[float], list[float]] | None:
    """(perm, scale, offset) when ``edge`` is axis-aligned (one non-zero per row and column), else None."""
    d = edge.shape[0] - 1
    lin = edge[:d, :d]
    big = np.abs(lin) > tol * max(1.0, float(np.abs(lin).max()))
    if not (big.sum(axis=1) == 1).all() or not (big.sum(axis=0) == 1).all():
        return None
    perm = [int(np.flatnonzero(big[a])[0]) for a in range(d)]
    scale = [float(lin[a, perm[a]]) for a in range(d)]
    return perm, scale, [float(v) for v in edge[:d, d]]


def _step_matrix(step: Step) -> np.ndarray:
    if isinstance(step, AffineStep):
        return np.asarray(step.matrix, dtype=np.float64)
    d = step.ndim
    out = np.eye(d + 1)
    for a in range(d):
        out[a, :] = 0.0
        out[a, step.perm[a]] = step.scale[a]
        out[a, d] = step.offset[a]
    return out


def step_from_affines(
    kind: str, in_shape: Sequence[int], out_shape: Sequence[int], before: Any, after: Any
) -> Step:
    """The :mod:`mg3d.boxes` step of ``kind`` that reproduces what a MONAI transform did to the grid.

    ``before``/``after`` are the image affines around the transform. Raises :class:`BoxError` when the
    named step does not match MONAI's voxel map (tolerance 1e-4 voxel), e.g. a crop by a fraction.
    """
    if kind not in _STEP_KINDS:
        raise ConfigError(f"unknown spatial step kind {kind!r}; known: {_STEP_KINDS}")
    in_shape = tuple(int(s) for s in in_shape)
    out_shape = tuple(int(s) for s in out_shape)
    d = len(in_shape)
    centre = voxel_map(before, after, d)
    edge = _edge_matrix(centre)
    parts = _axis_parts(edge)
    if parts is None:
        if kind != "affine":
            raise BoxError(f"{kind}: MONAI's voxel map is not axis-aligned:\n{np.round(edge, 6)}")
        matrix = tuple(tuple(float(v) for v in row) for row in edge)
        return AffineStep("affine", in_shape, out_shape, matrix, {"exact": False})
    perm, scale, offset = parts
    identity_perm = perm == list(range(d))

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise BoxError(f"{kind}: MONAI's voxel map is not a {what}:\n{np.round(edge, 6)}")

    step: Step
    if kind == "reorient":
        need(all(abs(abs(s) - 1) < 1e-6 for s in scale), "signed permutation")
        step = reorient_step(in_shape, perm, [s < 0 for s in scale])
    elif kind == "respace":
        need(identity_perm and min(scale) > 0, "per-axis rescaling")
        in_spacing = np.linalg.norm(_np64(before)[:d, :d], axis=0)
        out_spacing = np.linalg.norm(_np64(after)[:d, :d], axis=0)
        step = respace_step(in_shape, in_spacing.tolist(), out_spacing.tolist(), out_shape,
                            (-centre[:d, d]).tolist())  # fmt: skip
    elif kind == "resize":
        step = resize_step(in_shape, out_shape)
    elif kind in ("crop", "pad"):
        need(identity_perm and all(abs(s - 1) < 1e-6 for s in scale), "translation")
        shift = [round(v) for v in offset]
        need(all(abs(v - s) < 1e-4 for v, s in zip(offset, shift)), "whole-voxel translation")
        if kind == "pad" and min(shift) >= 0:
            after_pad = [o - i - b for o, i, b in zip(out_shape, in_shape, shift)]
            step = pad_step(in_shape, shift, after_pad)
        else:
            start = [-s for s in shift]
            step = crop_step(in_shape, start, [a + o for a, o in zip(start, out_shape)])
    elif kind == "flip":
        need(identity_perm and all(abs(abs(s) - 1) < 1e-6 for s in scale), "flip")
        step = flip_step(in_shape, [a for a in range(d) if scale[a] < 0])
    else:
        step = AxisAffineStep("affine", in_shape, out_shape, tuple(perm), tuple(scale), tuple(offset))
    if tuple(step.out_shape) != out_shape:
        raise BoxError(f"{kind}: step output shape {step.out_shape} differs from MONAI's {out_shape}")
    tol = 1e-4 * max(1.0, *in_shape, *out_shape)
    if not np.allclose(_step_matrix(step), edge, atol=tol):
        raise BoxError(
            f"{kind}: the {step.name} step does not reproduce MONAI's voxel map "
            f"(step {np.round(_step_matrix(step), 6).tolist()} vs MONAI {np.round(edge, 6).tolist()})"
        )
    return step


def _frame(d: Mapping[Hashable, Any]) -> CoordinateFrame:
    return CoordinateFrame.from_dict(d[FRAME])


def visible_boxes(frame: CoordinateFrame, boxes: np.ndarray) -> np.ndarray:
    """Voxel-frame boxes on the frame's final grid, clipped to *every* intermediate grid on the way.

    Clipping only at the end is not enough: a part of the target that fell outside an intermediate grid
    (e.g. beyond the last voxel centre after respacing) is gone from the image even if a later pad puts
    grid back there. A box that vanishes keeps zero extent (never silently dropped).
    """
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 2 * frame.ndim)
    if not len(arr):
        return arr
    arr = clip_boxes(arr, frame.source_shape)
    for step in frame.steps:
        arr = clip_boxes(step.map_boxes(arr), step.out_shape)
    return arr


def _grid_boxes(d: Mapping[Hashable, Any]) -> np.ndarray:
    """The record's boxes as visible on the current grid; ``(0, 2·ndim)`` for items without boxes."""
    frame = _frame(d)
    return visible_boxes(frame, _np64(d[BOXES]).reshape(-1, 2 * frame.ndim))


def _require_meta(d: Mapping[Hashable, Any], who: str) -> MetaTensor:
    img = d[IMAGE]
    if not isinstance(img, MetaTensor):
        raise ConfigError(f"{who}: the image is a plain tensor; mg3d needs monai.data.set_track_meta(True)")
    return img


def _tracked(
    d: dict[Hashable, Any], kind: str, apply: Callable[[dict[Hashable, Any]], Any]
) -> dict[Hashable, Any]:
    """Run ``apply`` (a MONAI spatial dict transform) and append the matching step to the frame."""
    img = _require_meta(d, kind)
    before = img.affine.detach().clone()
    in_shape = tuple(int(s) for s in img.shape[1:])
    out = dict(apply(d))
    res = _require_meta(out, kind)
    step = step_from_affines(kind, in_shape, tuple(int(s) for s in res.shape[1:]), before, res.affine)
    out[FRAME] = _frame(out).then(step).to_dict()
    return out


# ---------------------------------------------------------------------------------------------- text


_LATERAL = re.compile(r"\b(left|right)(?=ward|wards|most|\b)", re.IGNORECASE)


def swap_laterality(text: str) -> str:
    """Swap the words ``left`` ↔ ``right`` (also in left-sided, leftward, rightmost …), keeping case."""

    def repl(match: re.Match[str]) -> str:
        word = match.group(1)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        return other.capitalize() if word[0].isupper() else other

    return _LATERAL.sub(repl, text)


# ---------------------------------------------------------------------------------------------- loading


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


# ---------------------------------------------------------------------------------------------- deterministic steps


class SpatialStepd(MapTransform):
    """Wrap a deterministic MONAI spatial dict transform so the frame records the step it made."""

    def __init__(self, transform: MapTransform, kind: str) -> None:
        super().__init__(list(_SPATIAL_KEYS), allow_missing_keys=True)
        if kind not in _STEP_KINDS:
            raise ConfigError(f"SpatialStepd: unknown kind {kind!r}; known: {_STEP_KINDS}")
        self.transform = transform
        self.kind = kind

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return _tracked(dict(data), self.kind, self.transform)


class IntensityPresetd(MapTransform):
    """Apply the modality preset (``preset`` or the record's modality) to ``"image"``."""

    def __init__(self, preset: str | None, options: Mapping[str, Mapping[str, Any]], ndim: int) -> None:
        super().__init__([IMAGE])
        self.preset = preset
        self.options = {k: dict(v) for k, v in options.items()}
        self.ndim = ndim
        self._built: dict[str, Compose] = {}
        if preset is not None:
            self._compose(preset)  # fail at construction on a bad name or option

    def _compose(self, name: str) -> Compose:
        if name not in self._built:
            preset = get_preset(name)
            if self.ndim not in preset.ndims:
                raise ConfigError(f"modality preset {name!r} is for {preset.ndims}D images, not {self.ndim}D")
            self._built[name] = preset.compose(**self.options.get(name, {}))
        return self._built[name]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        name = self.preset or str(d["modality"])
        try:
            compose = self._compose(name)
        except ConfigError as err:
            raise ConfigError(f"record {d.get('id')!r}: {err}") from err
        d = dict(compose(d))
        d[IMAGE] = d[IMAGE].to(torch.float32)
        return d


class ForegroundCropd(MapTransform):
    """Crop to the foreground (any channel above ``threshold``) plus ``margin``, never cutting a target box.

    MONAI's ``CropForegroundd`` knows nothing of boxes; here its bounding-box helper finds the body and
    the crop is widened to hold every target before ``SpatialCropd`` runs (tracked as a ``crop`` step).
    """

    def __init__(self, threshold: float = 0.05, margin: int = 2) -> None:
        super().__init__(list(_SPATIAL_KEYS), allow_missing_keys=True)
        self.threshold = float(threshold)
        self.margin = int(margin)

    def _select(self, x: torch.Tensor) -> torch.Tensor:
        return x > self.threshold

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        img = _require_meta(d, "ForegroundCropd")
        shape = np.asarray(img.shape[1:])
        start, end = generate_spatial_bounding_box(img, self._select, margin=self.margin)
        if np.any(np.asarray(end) <= np.asarray(start)):
            return d  # nothing above the threshold: keep the whole image
        boxes = _grid_boxes(d)
        ndim = len(shape)
        lo, hi = np.asarray(start, dtype=int), np.asarray(end, dtype=int)
        if len(boxes):  # inference items carry no boxes: the foreground alone decides
            lo = np.minimum(lo, np.floor(boxes[:, :ndim].min(axis=0))).astype(int)
            hi = np.maximum(hi, np.ceil(boxes[:, ndim:].max(axis=0))).astype(int)
        lo, hi = np.clip(lo, 0, shape), np.clip(hi, 0, shape)
        if np.array_equal(lo, np.zeros_like(lo)) and np.array_equal(hi, shape):
            return d
        crop = SpatialCropd(
            list(_SPATIAL_KEYS), roi_start=lo.tolist(), roi_end=hi.tolist(), allow_missing_keys=True
        )
        return _tracked(d, "crop", crop)


def _linear_mode(ndim: int) -> str:
    return "bilinear" if ndim == 2 else "trilinear"


def _resize(size: Sequence[int], shape: Sequence[int]) -> Resized:
    """Resize ``shape`` to ``size``; the mask always with ``nearest-exact`` (centred, unlike ``nearest``).

    The image: ``area`` (box-filter averaging) when every axis shrinks — anti-aliased and ~40× faster than
    linear plus MONAI's Gaussian anti-aliasing on a 1024² radiograph — otherwise linear, anti-aliased
    along the axes that shrink. Either way the grid's edges scale exactly (the ``resize`` step).
    """
    shrink = [t < n for t, n in zip(size, shape)]
    if all(t <= n for t, n in zip(size, shape)):
        mode, aa = "area", False
    else:
        mode, aa = _linear_mode(len(shape)), any(shrink)
    return Resized(list(_SPATIAL_KEYS), spatial_size=list(size), mode=(mode, "nearest-exact"),
                   anti_aliasing=(aa, False), allow_missing_keys=True)  # fmt: skip


class FitToGridd(MapTransform):
    """Bring the image to the model grid: ``resize``, ``letterbox`` (resize + symmetric pad) or ``pad_crop``."""

    def __init__(self, spatial_size: Sequence[int], fit: str = "resize") -> None:
        super().__init__(list(_SPATIAL_KEYS), allow_missing_keys=True)
        if fit not in _FIT_MODES:
            raise ConfigError(f"FitToGridd: fit must be one of {_FIT_MODES}, got {fit!r}")
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.fit = fit

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        shape = tuple(int(s) for s in _require_meta(d, "FitToGridd").shape[1:])
        ndim = len(shape)
        if ndim != len(self.spatial_size):
            raise ConfigError(f"record {d.get('id')!r}: model grid {self.spatial_size} is not {ndim}D")
        if self.fit == "pad_crop":
            pad_crop = ResizeWithPadOrCropd(list(_SPATIAL_KEYS), self.spatial_size, allow_missing_keys=True)
            return _tracked(d, "crop", pad_crop)
        if self.fit == "resize":
            return _tracked(d, "resize", _resize(self.spatial_size, shape))
        factor = min(t / n for t, n in zip(self.spatial_size, shape))
        inner = tuple(min(t, max(1, round(n * factor))) for t, n in zip(self.spatial_size, shape))
        d = _tracked(d, "resize", _resize(inner, shape))
        if inner != self.spatial_size:
            d = _tracked(
                d, "pad", SpatialPadd(list(_SPATIAL_KEYS), self.spatial_size, allow_missing_keys=True)
            )
        return d


# ---------------------------------------------------------------------------------------------- random steps


class _RandSpatial(RandomizableTransform, MapTransform):
    def __init__(self, prob: float) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, list(_SPATIAL_KEYS), allow_missing_keys=True)


class RandTargetCropd(_RandSpatial):
    """With probability ``prob``, crop a window holding every target box, then resize back to the grid.

    The window keeps the image's aspect ratio, its size is a random fraction (``scale``) of the image
    (never smaller than the target), and its position is uniform among windows that hold the target.
    """

    def __init__(self, prob: float, scale: tuple[float, float] = (0.6, 1.0),
                 spatial_size: Sequence[int] | None = None) -> None:  # fmt: skip
        super().__init__(prob)
        self.scale = (float(scale[0]), float(scale[1]))
        self.spatial_size = None if spatial_size is None else tuple(int(s) for s in spatial_size)

    def window(self, shape: Sequence[int], boxes: np.ndarray) -> tuple[list[int], list[int]]:
        """Draw a crop window ``(start, stop)`` on a grid of ``shape`` that holds all ``boxes``."""
        ndim = len(shape)
        lo = np.floor(boxes[:, :ndim].min(axis=0)).astype(int)
        hi = np.ceil(boxes[:, ndim:].max(axis=0)).astype(int)
        factor = self.R.uniform(*self.scale)
        start, stop = [], []
        for a, n in enumerate(shape):
            size = int(np.clip(max(round(n * factor), hi[a] - lo[a]), 1, n))
            first, last = max(0, hi[a] - size), min(lo[a], n - size)
            s = int(self.R.randint(first, last + 1)) if last >= first else int(np.clip(lo[a], 0, n - size))
            start.append(s)
            stop.append(s + size)
        return start, stop

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        shape = tuple(int(s) for s in _require_meta(d, "RandTargetCropd").shape[1:])
        boxes = _grid_boxes(d)
        if not len(boxes):
            return d  # no target to keep in view
        start, stop = self.window(shape, boxes)
        d = _tracked(
            d,
            "crop",
            SpatialCropd(list(_SPATIAL_KEYS), roi_start=start, roi_end=stop, allow_missing_keys=True),
        )
        if self.spatial_size is not None:
            d = _tracked(d, "resize", _resize(self.spatial_size, [b - a for a, b in zip(start, stop)]))
        return d


class RandLateralFlipd(_RandSpatial):
    """With probability ``prob``, flip the patient's left–right axis and swap left/right in the text.

    ``axis`` is that axis on the current grid: 0 for radiographs and for the ``LPS`` display orientation.
    """

    def __init__(self, prob: float, axis: int = 0) -> None:
        super().__init__(prob)
        self.axis = int(axis)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        d = _tracked(d, "flip", Flipd(list(_SPATIAL_KEYS), spatial_axis=self.axis, allow_missing_keys=True))
        d["text"] = swap_laterality(str(d["text"]))
        d["flipped"] = not bool(d.get("flipped", False))
        return d


class RandAffineBoxd(_RandSpatial):
    """Random rotation (``rotate_deg`` per axis), isotropic scale and translation, tracked in the frame.

    Parameters are drawn here and applied with MONAI's deterministic ``Affined`` (so the applied map is
    known); without rotation the step is axis-aligned and exact, with rotation it is a general affine.
    """

    def __init__(
        self, prob: float, rotate_deg: float = 0.0, scale: float = 0.1, translate: float = 0.05
    ) -> None:
        super().__init__(prob)
        self.rotate = math.radians(float(rotate_deg))
        self.scale = float(scale)
        self.translate = float(translate)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        shape = tuple(int(s) for s in _require_meta(d, "RandAffineBoxd").shape[1:])
        ndim = len(shape)
        n_rot = 1 if ndim == 2 else 3
        rotate = [
            float(self.R.uniform(-self.rotate, self.rotate)) if self.rotate else 0.0 for _ in range(n_rot)
        ]
        zoom = float(self.R.uniform(1 - self.scale, 1 + self.scale)) if self.scale else 1.0
        shift = [float(self.R.uniform(-self.translate, self.translate)) * n for n in shape]
        affine = Affined(list(_SPATIAL_KEYS), rotate_params=rotate, scale_params=[zoom] * ndim, translate_params=shift,
                         mode=("bilinear", "nearest"), padding_mode="zeros", allow_missing_keys=True)  # fmt: skip
        return _tracked(d, "affine", affine)


class ClampIntensityd(Transform):
    """Clamp ``"image"`` to ``[0, 1]`` after intensity augmentations (the tokenizer's input range)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d[IMAGE] = d[IMAGE].clamp(0.0, 1.0)
        return d


class Finalized(Transform):
    """Turn the pipeline's working dict into the sample contract of this module's docstring."""

    def __init__(self, keep_mask: bool = False) -> None:
        self.keep_mask = keep_mask

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[str, Any]:
        d = dict(data)
        img = _require_meta(d, "Finalized")
        frame = _frame(d)
        boxes = _np64(d[BOXES]).reshape(-1, 2 * frame.ndim)
        target = visible_boxes(frame, boxes)
        if not frame.exact and MASK in d and len(boxes) == 1 and bool((d[MASK][0] > 0.5).any()):
            target = mask_to_box(d[MASK][0] > 0.5)[None, :]
        spacing = None
        if frame.ndim == 3 and d.get("has_spacing"):
            spacing = tuple(float(v) for v in np.linalg.norm(_np64(img.affine)[:3, :3], axis=0))
        affine = d.get("affine_src")
        # always present, so samples from sources with and without masks collate into one batch
        mask = (d[MASK] > 0.5).as_tensor() if self.keep_mask and MASK in d else None
        return {
            "image": img.as_tensor().to(torch.float32).contiguous(),
            "mask": mask,
            "boxes": boxes,
            "target_boxes": target,
            "frame": frame,
            "text": str(d["text"]),
            "source_text": str(d.get("source_text", d["text"])),
            "flipped": bool(d.get("flipped", False)),
            "id": str(d["id"]),
            "dataset": str(d["dataset"]),
            "ndim": frame.ndim,
            "modality": str(d["modality"]),
            "category": d.get("category"),
            "question_type": d.get("question_type"),
            "spacing": spacing,
            "affine": None if affine is None else _np64(affine),
        }


class CompactMetad(Transform):
    """Keep only the affine on the image and mask (drop reader headers and MONAI's operation log).

    Ends the cached part: the frame already records every spatial step, the headers are not needed
    downstream, and ``PersistentDataset`` loads its files with ``torch.load(weights_only=True)``, which
    refuses the numpy arrays readers put into the metadata (the cache would silently never hit).
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in _SPATIAL_KEYS:
            if isinstance(d.get(key), MetaTensor):
                d[key] = MetaTensor(d[key].as_tensor(), affine=d[key].affine.detach().clone())
        d[BOXES] = _np64(d[BOXES])
        return d


class _KeepSourceText(Transform):
    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d.setdefault("source_text", d["text"])
        d.setdefault("flipped", False)
        return d


# ---------------------------------------------------------------------------------------------- pipelines


def unwrap_error(err: BaseException) -> BaseException:
    """The first mg3d error in ``err``'s cause chain (MONAI wraps every transform error in RuntimeError)."""
    current: BaseException | None = err
    while current is not None:
        if isinstance(current, Mg3dError):
            return current
        current = current.__cause__
    return err


class Mg3dCompose(Compose):
    """``Compose`` that re-raises mg3d's own errors (DataError naming the record …) instead of MONAI's wrapper."""

    def __call__(self, input_: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as err:
            inner = unwrap_error(err)
            if inner is err:
                raise
            raise inner from inner.__cause__


@dataclass(frozen=True)
class Pipeline:
    """A record pipeline split where caching must stop.

    ``deterministic`` (loading, orientation, spacing, the preset, the foreground crop, the fit to the model
    grid) is what ``CacheDataset``/``PersistentDataset`` store; ``random`` (augmentations and the final
    conversion to the sample contract) runs on every access. Calling the pipeline runs both.
    """

    deterministic: Compose
    random: Compose
    ndim: int
    train: bool

    def __call__(self, item: Mapping[Hashable, Any]) -> dict[str, Any]:
        return self.random(self.deterministic(item))

    def set_random_state(self, seed: int | None = None) -> Pipeline:
        self.random.set_random_state(seed=seed)
        return self


def _lateral_axis(config: PipelineConfig, ndim: int) -> int:
    """The patient's left–right axis after the pipeline's orientation (a flip needs to know it)."""
    if ndim == 2:
        return 0
    if config.axcodes is None:
        raise ConfigError(
            "lateral_flip_prob > 0 needs a known orientation: with axcodes null the left-right axis is unknown"
        )
    return next(a for a, c in enumerate(config.axcodes.upper()) if c in "LR")


def build_pipeline(config: PipelineConfig, ndim: int, *, train: bool = False) -> Pipeline:
    """The pipeline for ``ndim``-D records (training pipelines add ``config.augment``)."""
    if ndim not in (2, 3):
        raise ConfigError(f"build_pipeline: ndim must be 2 or 3, got {ndim}")
    config.check_ndim(ndim)
    aug = config.augment
    carry_mask = config.carry_mask or (train and config.use_mask and aug.rotates)
    geometry = ndim == 3 and (config.axcodes is not None or config.pixdim is not None)
    t: list[Any] = [
        CheckHeaderd(load_mask=carry_mask),
        LoadRecordd(load_mask=carry_mask, needs_geometry=geometry),
        _KeepSourceText(),
    ]
    if ndim == 3 and config.axcodes is not None:
        orient = Orientationd(
            list(_SPATIAL_KEYS), axcodes=config.axcodes, labels=None, allow_missing_keys=True
        )
        t.append(SpatialStepd(orient, "reorient"))
    if ndim == 3 and config.pixdim is not None:
        # a mask must not be extended by border padding where the new grid overhangs the old one
        spacing = Spacingd(list(_SPATIAL_KEYS), pixdim=config.pixdim, mode=("bilinear", "nearest"),
                           padding_mode=("border", "zeros"), allow_missing_keys=True)  # fmt: skip
        t.append(SpatialStepd(spacing, "respace"))
    t.append(IntensityPresetd(config.preset, config.preset_options, ndim))
    if config.crop_foreground:
        t.append(ForegroundCropd(config.foreground_threshold, config.foreground_margin))
    if config.spatial_size is not None:
        t.append(FitToGridd(config.spatial_size, config.fit))
    t.append(CompactMetad())
    r: list[Any] = []
    if train:
        if aug.target_crop_prob > 0:
            r.append(RandTargetCropd(aug.target_crop_prob, aug.target_crop_scale, config.spatial_size))
        if aug.lateral_flip_prob > 0:
            r.append(RandLateralFlipd(aug.lateral_flip_prob, _lateral_axis(config, ndim)))
        if aug.affine_prob > 0:
            r.append(RandAffineBoxd(aug.affine_prob, aug.rotate_deg, aug.scale, aug.translate))
        intensity = []
        if aug.noise_prob > 0:
            intensity.append(RandGaussianNoised(IMAGE, prob=aug.noise_prob, std=aug.noise_std))
        if aug.gamma_prob > 0:
            intensity.append(RandAdjustContrastd(IMAGE, prob=aug.gamma_prob, gamma=aug.gamma))
        if aug.bias_prob > 0:
            intensity.append(RandBiasFieldd(IMAGE, prob=aug.bias_prob, coeff_range=(0.0, aug.bias_coeff)))
        if intensity:
            r.extend([*intensity, ClampIntensityd()])
    r.append(Finalized(keep_mask=config.carry_mask))
    return Pipeline(Mg3dCompose(t), Mg3dCompose(r), ndim, train)
