"""Box geometry for 2D images and 3D volumes: validation, frame-tagged boxes, modes, masks, IoU/GIoU, world frame.

Conventions (DESIGN.md §2):

* A box is ``[lo_0, lo_1, (lo_2), hi_0, hi_1, (hi_2)]`` in *voxel-edge* coordinates of an array's
  spatial axes, half-open: voxel ``i`` covers ``[i, i + 1)``. This is MONAI's standard mode
  (``xyxy`` / ``xyzxyz`` with ``TO_REMOVE = 0``), so MONAI's box utilities apply unchanged.
* Points in MONAI affines are voxel *centres*: the centre of voxel ``i`` is edge coordinate ``i + 0.5``.

The spatial steps that move boxes from one grid to another, and the :class:`~mg3d.frames.CoordinateFrame`
that chains them, live in :mod:`mg3d.frames`, which builds on this module (never the reverse).

This module imports nothing else from mg3d but :mod:`mg3d.errors`: data pipelines and tokenization
both build on it without importing each other. MONAI's ``box_utils`` is imported where it is used, because
``import monai`` loads all of MONAI (seconds), which parsers and rewards should not pay for.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from mg3d.errors import BoxError

Frame = Literal["voxel", "text", "world"]
FRAMES: tuple[str, ...] = ("voxel", "text", "world")
ArrayLike = np.ndarray | torch.Tensor | Sequence[float]

__all__ = [
    "FRAMES",
    "Box",
    "box_centers",
    "box_sizes",
    "box_volumes",
    "center_distance_mm",
    "clip_boxes",
    "coarsen_box",
    "convert_box_mode",
    "giou_matrix",
    "iou_matrix",
    "mask_to_box",
    "pair_giou",
    "pair_iou",
    "validate_box",
    "validate_boxes",
    "voxel_to_world",
    "world_to_voxel",
]


# --------------------------------------------------------------------------------------------------
# Validation


def _as_float_array(values: ArrayLike, what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise BoxError(f"{what}: not a list of numbers ({values!r:.80})") from err
    return arr


def _shape(values: Iterable[int], what: str) -> tuple[int, ...]:
    out = tuple(int(v) for v in values)
    if len(out) not in (2, 3) or any(v <= 0 for v in out):
        raise BoxError(f"{what}: a spatial shape has 2 or 3 positive sizes, got {out}")
    return out


def validate_boxes(
    boxes: ArrayLike, ndim: int | None = None, *, what: str = "boxes", allow_empty: bool = False
) -> np.ndarray:
    """Return ``boxes`` as a float64 ``(N, 2 * ndim)`` array, or raise :class:`BoxError` saying why.

    ``allow_empty`` permits zero extent along an axis (``hi == lo``); an inverted box (``hi < lo``) is
    always an error, because silently swapping corners would hide a coordinate-order bug upstream.
    """
    arr = _as_float_array(boxes, what)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise BoxError(f"{what}: expected shape (N, 4) or (N, 6), got {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        return arr.reshape(0, 2 * ndim if ndim else arr.shape[1] if arr.shape[1] else 4)
    width = arr.shape[1]
    if ndim is None:
        if width not in (4, 6):
            raise BoxError(f"{what}: a box has 4 (2D) or 6 (3D) numbers, got {width}")
        ndim = width // 2
    elif ndim not in (2, 3):
        raise BoxError(f"{what}: ndim must be 2 or 3, got {ndim}")
    if width != 2 * ndim:
        raise BoxError(f"{what}: a {ndim}D box has {2 * ndim} numbers, got {width}")
    for row, box in enumerate(arr):
        label = what if arr.shape[0] == 1 else f"{what}[{row}]"
        if not np.all(np.isfinite(box)):
            raise BoxError(f"{label}: non-finite coordinate in {box.tolist()}")
        lo, hi = box[:ndim], box[ndim:]
        if np.any(hi < lo):
            axis = int(np.argmax(hi < lo))
            raise BoxError(f"{label}: hi < lo on axis {axis} in {box.tolist()} (inverted box)")
        if not allow_empty and np.any(hi == lo):
            axis = int(np.argmax(hi == lo))
            raise BoxError(f"{label}: zero extent on axis {axis} in {box.tolist()}")
    return arr


def validate_box(
    box: ArrayLike, ndim: int | None = None, *, what: str = "box", allow_empty: bool = False
) -> np.ndarray:
    """Validate one box; return it as a float64 ``(2 * ndim,)`` array."""
    arr = _as_float_array(box, what)
    if arr.ndim != 1:
        raise BoxError(f"{what}: expected one box (a flat list of 4 or 6 numbers), got shape {arr.shape}")
    if arr.size == 0:
        raise BoxError(f"{what}: empty box")
    return validate_boxes(arr, ndim, what=what, allow_empty=allow_empty)[0]


@dataclass(frozen=True)
class Box:
    """A box tagged with the frame it lives in, so a text-frame box is never scored as a voxel box."""

    coords: tuple[float, ...]
    frame: Frame = "voxel"

    def __post_init__(self) -> None:
        if self.frame not in FRAMES:
            raise BoxError(f"box frame must be one of {FRAMES}, got {self.frame!r}")
        arr = validate_box(self.coords, what=f"{self.frame} box", allow_empty=True)
        object.__setattr__(self, "coords", tuple(float(v) for v in arr))

    @property
    def ndim(self) -> int:
        return len(self.coords) // 2

    @property
    def lo(self) -> np.ndarray:
        return np.asarray(self.coords[: self.ndim])

    @property
    def hi(self) -> np.ndarray:
        return np.asarray(self.coords[self.ndim :])

    def array(self) -> np.ndarray:
        return np.asarray(self.coords, dtype=np.float64)

    def require(self, frame: Frame) -> Box:
        """Return self if it lives in ``frame``; raise otherwise (guards every frame crossing)."""
        if self.frame != frame:
            raise BoxError(f"expected a box in the {frame} frame, got one in the {self.frame} frame")
        return self


# --------------------------------------------------------------------------------------------------
# Modes, masks, measures


def convert_box_mode(boxes: ArrayLike, src_mode: str, dst_mode: str) -> np.ndarray:
    """Convert between MONAI box modes (``xywh``, ``xyxy``, ``ccwh``, ``xyzwhd``, ``cccwhd``, …)."""
    arr = _as_float_array(boxes, "boxes")
    single = arr.ndim == 1
    from monai.data import box_utils

    out = box_utils.convert_box_mode(np.atleast_2d(arr), src_mode=src_mode, dst_mode=dst_mode)
    out = np.asarray(out, dtype=np.float64)
    return out[0] if single else out


def mask_to_box(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """Tight half-open box of the non-zero voxels of a 2D/3D mask: ``min index`` to ``max index + 1``.

    Written with ``np.any`` projections rather than MONAI's ``convert_mask_to_box`` because that one
    expects one channel per box; here a semantic mask ``mask == label`` is the common input.
    """
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim not in (2, 3):
        raise BoxError(f"mask must be 2D or 3D, got shape {mask.shape}")
    nonzero = mask != 0
    if not nonzero.any():
        raise BoxError(f"mask of shape {mask.shape} is empty: no box can be derived")
    lo, hi = [], []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(nonzero.any(axis=others))
        lo.append(float(idx[0]))
        hi.append(float(idx[-1] + 1))
    return np.asarray(lo + hi, dtype=np.float64)


def box_sizes(boxes: ArrayLike) -> np.ndarray:
    arr = np.atleast_2d(_as_float_array(boxes, "boxes"))
    d = arr.shape[1] // 2
    return arr[:, d:] - arr[:, :d]


def box_volumes(boxes: ArrayLike) -> np.ndarray:
    """Area (2D) or volume (3D) of each box, in voxels."""
    return np.prod(np.clip(box_sizes(boxes), 0, None), axis=1)


def box_centers(boxes: ArrayLike) -> np.ndarray:
    arr = np.atleast_2d(_as_float_array(boxes, "boxes"))
    d = arr.shape[1] // 2
    return (arr[:, :d] + arr[:, d:]) / 2.0


def clip_boxes(boxes: ArrayLike, spatial_shape: Sequence[int]) -> np.ndarray:
    """Clip boxes to ``[0, shape)``; boxes fully outside collapse to zero extent (kept, not dropped)."""
    arr = np.atleast_2d(_as_float_array(boxes, "boxes")).copy()
    d = arr.shape[1] // 2
    if len(spatial_shape) != d:
        raise BoxError(f"clip_boxes: {d}D boxes against a {len(spatial_shape)}D shape {tuple(spatial_shape)}")
    upper = np.asarray(spatial_shape, dtype=np.float64)
    arr[:, :d] = np.clip(arr[:, :d], 0, upper)
    arr[:, d:] = np.clip(arr[:, d:], arr[:, :d], upper)
    return arr


def coarsen_box(box: ArrayLike, spatial_shape: Sequence[int], cell: Sequence[int]) -> np.ndarray:
    """``box`` widened outward to a grid of ``cell``-sized cells (one size per axis), inside ``[0, shape]``.

    Why: a coarse-to-fine reasoning trail (Chain-of-Box warm start) names a coarse region before the exact
    box. Widening only outward keeps the exact box inside the coarse one, so a consistency check that asks
    for containment is met by construction. The box is first clipped to the grid; each low edge then moves
    down and each high edge up to the nearest cell boundary (the grid's far border counts as one). An axis of
    zero extent gets the one cell that holds it. The result lies on the coarse grid: coarsening it again
    returns it unchanged.
    """
    arr = _as_float_array(box, "coarsen_box box")
    if arr.ndim != 1 or arr.size not in (4, 6):
        raise BoxError(f"coarsen_box: expected one box of 4 or 6 numbers, got shape {arr.shape}")
    d = arr.size // 2
    shape = _shape(spatial_shape, "coarsen_box spatial_shape")
    cells = _shape(cell, "coarsen_box cell")
    if len(shape) != d or len(cells) != d:
        raise BoxError(
            f"coarsen_box: a {d}D box needs {d} grid sizes and {d} cell sizes, got {shape}, {cells}"
        )
    lo, hi = validate_box(arr, d, what="coarsen_box box", allow_empty=True).reshape(2, d)
    out = np.empty(2 * d, dtype=np.float64)
    for a, (size, g) in enumerate(zip(shape, cells)):
        low = min(max(lo[a], 0.0), size)
        high = min(max(hi[a], low), size)
        c_lo = math.floor(low / g) * g
        c_hi = min(size, math.ceil(high / g) * g)
        if c_hi == c_lo:  # zero extent on a cell boundary: take the cell above it, or below at the far border
            c_hi = min(size, c_lo + g)
            if c_hi == c_lo:
                c_lo = math.floor((size - 1) / g) * g
        out[a], out[a + d] = c_lo, c_hi
    return out


def iou_matrix(boxes1: ArrayLike, boxes2: ArrayLike) -> np.ndarray:
    """``(N, M)`` IoU matrix (MONAI ``box_iou``)."""
    a = np.atleast_2d(_as_float_array(boxes1, "boxes1"))
    b = np.atleast_2d(_as_float_array(boxes2, "boxes2"))
    from monai.data import box_utils

    return np.asarray(box_utils.box_iou(a, b), dtype=np.float64)


def giou_matrix(boxes1: ArrayLike, boxes2: ArrayLike) -> np.ndarray:
    """``(N, M)`` generalised IoU matrix (MONAI ``box_giou``), in ``[-1, 1]``."""
    a = np.atleast_2d(_as_float_array(boxes1, "boxes1"))
    b = np.atleast_2d(_as_float_array(boxes2, "boxes2"))
    from monai.data import box_utils

    return np.asarray(box_utils.box_giou(a, b), dtype=np.float64)


def _pair_terms(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = a.shape[1] // 2
    inter = np.prod(np.clip(np.minimum(a[:, d:], b[:, d:]) - np.maximum(a[:, :d], b[:, :d]), 0, None), axis=1)
    vol_a = np.prod(np.clip(a[:, d:] - a[:, :d], 0, None), axis=1)
    vol_b = np.prod(np.clip(b[:, d:] - b[:, :d], 0, None), axis=1)
    union = vol_a + vol_b - inter
    return inter, union, d


def pair_iou(boxes1: ArrayLike, boxes2: ArrayLike) -> np.ndarray:
    """IoU of paired boxes ``(N,)``; 0 where the union is empty.

    Hand-written because MONAI has only the ``N × M`` IoU, and rewards score ``G`` completions against
    their own targets: the diagonal alone, vectorised, is ~G times cheaper.
    """
    a = np.atleast_2d(_as_float_array(boxes1, "boxes1"))
    b = np.atleast_2d(_as_float_array(boxes2, "boxes2"))
    if a.shape != b.shape:
        raise BoxError(f"pair_iou: shapes differ {a.shape} vs {b.shape}")
    inter, union, _ = _pair_terms(a, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def pair_giou(boxes1: ArrayLike, boxes2: ArrayLike) -> np.ndarray:
    """Generalised IoU of paired boxes ``(N,)`` in ``[-1, 1]`` (same formula as MONAI's ``box_pair_giou``)."""
    a = np.atleast_2d(_as_float_array(boxes1, "boxes1"))
    b = np.atleast_2d(_as_float_array(boxes2, "boxes2"))
    if a.shape != b.shape:
        raise BoxError(f"pair_giou: shapes differ {a.shape} vs {b.shape}")
    inter, union, d = _pair_terms(a, b)
    hull = np.prod(np.clip(np.maximum(a[:, d:], b[:, d:]) - np.minimum(a[:, :d], b[:, :d]), 0, None), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
        penalty = np.where(hull > 0, (hull - union) / np.where(hull > 0, hull, 1.0), 0.0)
    return iou - penalty


# --------------------------------------------------------------------------------------------------
# World frame


def _check_affine(affine: ArrayLike, d: int) -> np.ndarray:
    aff = _as_float_array(affine, "affine")
    if aff.shape != (d + 1, d + 1) or not np.all(np.isfinite(aff)):
        raise BoxError(f"affine must be a finite {(d + 1, d + 1)} matrix for {d}D boxes, got {aff.shape}")
    if abs(np.linalg.det(aff[:d, :d])) < 1e-12:
        raise BoxError("affine is singular: voxel and world frames cannot be mapped")
    return aff


def _corners(boxes: np.ndarray) -> np.ndarray:
    """``(N, 2**d, d)`` corner points of boxes."""
    d = boxes.shape[1] // 2
    choices = np.asarray(list(itertools.product((0, 1), repeat=d)))  # (2**d, d)
    lo, hi = boxes[:, None, :d], boxes[:, None, d:]
    return np.where(choices[None] == 0, lo, hi)


def _hull(points: np.ndarray) -> np.ndarray:
    return np.concatenate([points.min(axis=1), points.max(axis=1)], axis=1)


def voxel_to_world(boxes: ArrayLike, affine: ArrayLike) -> np.ndarray:
    """Voxel-edge boxes → world (mm) boxes: the hull of the mapped corners.

    Corners sit on voxel edges, i.e. at centre coordinates ``edge - 0.5``, which is what the affine
    maps. For axis-aligned affines (any permutation/flip/spacing) the hull is exact.
    """
    arr = np.atleast_2d(_as_float_array(boxes, "boxes"))
    d = arr.shape[1] // 2
    aff = _check_affine(affine, d)
    pts = _corners(arr) - 0.5
    world = pts @ aff[:d, :d].T + aff[:d, d]
    return _hull(world)


def world_to_voxel(boxes: ArrayLike, affine: ArrayLike) -> np.ndarray:
    """World (mm) boxes → voxel-edge boxes (inverse of :func:`voxel_to_world` for axis-aligned affines)."""
    arr = np.atleast_2d(_as_float_array(boxes, "boxes"))
    d = arr.shape[1] // 2
    inv = np.linalg.inv(_check_affine(affine, d))
    pts = _corners(arr) @ inv[:d, :d].T + inv[:d, d]
    return _hull(pts + 0.5)


def center_distance_mm(boxes1: ArrayLike, boxes2: ArrayLike, affine: ArrayLike | None = None) -> np.ndarray:
    """Paired distance between box centres in mm (the affine maps centres exactly); voxels if no affine."""
    c1 = box_centers(boxes1)
    c2 = box_centers(boxes2)
    if affine is not None:
        aff = _check_affine(affine, c1.shape[1])
        d = c1.shape[1]
        c1 = (c1 - 0.5) @ aff[:d, :d].T
        c2 = (c2 - 0.5) @ aff[:d, :d].T
    return np.linalg.norm(c1 - c2, axis=1)
