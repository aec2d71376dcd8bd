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
    :class:`~mg3d.frames.CoordinateFrame` from that voxel grid to the grid of ``image``
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
``intensity``
    The preset the image went through, as ``{"preset", "unit", "options"}``
    (:func:`~mg3d.data.modalities.intensity_declaration`): what :func:`~mg3d.data.modalities.to_physical`
    needs to turn ``image`` back into HU / SUV for the semantic reward. ``None`` in disk caches older than it.
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
turns that map into the matching named step of :mod:`mg3d.frames` (``reorient``, ``respace``, ``crop``,
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

Where things live
-----------------
:mod:`~mg3d.data.transforms.config` (``PipelineConfig``, ``AugmentConfig``),
:mod:`~mg3d.data.transforms.tracking` (sample keys, :func:`step_from_affines`, :func:`voxel_map`,
:func:`visible_boxes`), :mod:`~mg3d.data.transforms.loading` (:func:`record_to_item`, ``CheckHeaderd``,
``LoadRecordd``), :mod:`~mg3d.data.transforms.spatial` (spatial steps and augmentations,
:func:`swap_laterality`), :mod:`~mg3d.data.transforms.intensity` (preset, clamp),
:mod:`~mg3d.data.transforms.assembly` (:class:`Pipeline`, :func:`build_pipeline`, ``Finalized``).
Every public name is importable from here.
"""

from __future__ import annotations

from mg3d.data.transforms.assembly import (
    CompactMetad,
    Finalized,
    Mg3dCompose,
    Pipeline,
    build_pipeline,
    unwrap_error,
)
from mg3d.data.transforms.config import DISPLAY_AXCODES, AugmentConfig, PipelineConfig
from mg3d.data.transforms.intensity import ClampIntensityd, IntensityPresetd
from mg3d.data.transforms.loading import CheckHeaderd, LoadRecordd, record_to_item
from mg3d.data.transforms.spatial import (
    FitToGridd,
    ForegroundCropd,
    RandAffineBoxd,
    RandLateralFlipd,
    RandTargetCropd,
    SpatialStepd,
    swap_laterality,
)
from mg3d.data.transforms.tracking import (
    BOXES,
    FRAME,
    IMAGE,
    MASK,
    step_from_affines,
    visible_boxes,
    voxel_map,
)

__all__ = [
    "BOXES",
    "DISPLAY_AXCODES",
    "FRAME",
    "IMAGE",
    "MASK",
    "AugmentConfig",
    "CheckHeaderd",
    "ClampIntensityd",
    "CompactMetad",
    "Finalized",
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
