"""Box geometry for 2D images and 3D volumes, and the :class:`CoordinateFrame` that links frames.

Conventions (DESIGN.md §2):

* A box is ``[lo_0, lo_1, (lo_2), hi_0, hi_1, (hi_2)]`` in *voxel-edge* coordinates of an array's
  spatial axes, half-open: voxel ``i`` covers ``[i, i + 1)``. This is MONAI's standard mode
  (``xyxy`` / ``xyzxyz`` with ``TO_REMOVE = 0``), so MONAI's box utilities apply unchanged.
* Points in MONAI affines are voxel *centres*: the centre of voxel ``i`` is edge coordinate ``i + 0.5``.
* Every spatial operation the pipelines use (flip, 90° rotation, orientation change, crop, pad,
  resize, zoom, respacing) is an *axis-aligned affine* map: output axis ``a`` is
  ``scale[a] * input[perm[a]] + offset[a]``. Such maps send boxes to boxes exactly, compose into
  one map, and have exact inverses. General affines (free rotations) send a box to the corner hull,
  which is only an upper bound of the tight box; :class:`AffineStep` says so with ``exact = False``.

This module imports nothing else from mg3d but :mod:`mg3d.errors`: data pipelines and tokenization
both build on it without importing each other. MONAI's ``box_utils`` is imported where it is used, because
``import monai`` loads all of MONAI (seconds), which parsers and rewards should not pay for.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from mg3d.errors import BoxError

Frame = Literal["voxel", "text", "world"]
FRAMES: tuple[str, ...] = ("voxel", "text", "world")
ArrayLike = np.ndarray | torch.Tensor | Sequence[float]

__all__ = [
    "FRAMES",
    "AffineStep",
    "AxisAffineStep",
    "Box",
    "CoordinateFrame",
    "box_centers",
    "box_sizes",
    "box_volumes",
    "center_distance_mm",
    "clip_boxes",
    "coarsen_box",
    "convert_box_mode",
    "crop_step",
    "flip_step",
    "giou_matrix",
    "iou_matrix",
    "mask_to_box",
    "pad_step",
    "pair_giou",
    "pair_iou",
    "reorient_step",
    "resize_step",
    "respace_step",
    "rot90_step",
    "step_from_dict",
    "validate_box",
    "validate_boxes",
    "voxel_to_world",
    "world_to_voxel",
    "zoom_step",
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


# --------------------------------------------------------------------------------------------------
# Spatial steps


def _shape(values: Iterable[int], what: str) -> tuple[int, ...]:
    out = tuple(int(v) for v in values)
    if len(out) not in (2, 3) or any(v <= 0 for v in out):
        raise BoxError(f"{what}: a spatial shape has 2 or 3 positive sizes, got {out}")
    return out


@dataclass(frozen=True)
class AxisAffineStep:
    """An axis-aligned affine map between two grids: ``out[a] = scale[a] * in[perm[a]] + offset[a]``.

    Works on edge coordinates; a negative scale reverses an axis (so a box's lo and hi swap).
    """

    name: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    perm: tuple[int, ...]
    scale: tuple[float, ...]
    offset: tuple[float, ...]
    params: dict[str, Any] = field(default_factory=dict, compare=False)

    exact = True

    def __post_init__(self) -> None:
        d = len(self.in_shape)
        if not (len(self.out_shape) == len(self.perm) == len(self.scale) == len(self.offset) == d):
            raise BoxError(f"{self.name}: inconsistent dimensions in step {self}")
        if sorted(self.perm) != list(range(d)):
            raise BoxError(f"{self.name}: perm {self.perm} is not a permutation of {d} axes")
        if any(s == 0 or not math.isfinite(s) for s in self.scale):
            raise BoxError(f"{self.name}: scale must be finite and non-zero, got {self.scale}")

    @property
    def ndim(self) -> int:
        return len(self.in_shape)

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """Map ``(..., d)`` edge-coordinate points."""
        pts = np.asarray(points, dtype=np.float64)
        return pts[..., list(self.perm)] * np.asarray(self.scale) + np.asarray(self.offset)

    def map_boxes(self, boxes: ArrayLike) -> np.ndarray:
        arr = np.atleast_2d(_as_float_array(boxes, "boxes"))
        d = self.ndim
        if arr.shape[1] != 2 * d:
            raise BoxError(f"{self.name}: expects {d}D boxes, got {arr.shape[1]} numbers per box")
        a = self.map_points(arr[:, :d])
        b = self.map_points(arr[:, d:])
        return np.concatenate([np.minimum(a, b), np.maximum(a, b)], axis=1)

    def inverse(self) -> AxisAffineStep:
        d = self.ndim
        perm = [0] * d
        scale = [0.0] * d
        offset = [0.0] * d
        for a in range(d):
            src = self.perm[a]
            perm[src] = a
            scale[src] = 1.0 / self.scale[a]
            offset[src] = -self.offset[a] / self.scale[a]
        return AxisAffineStep(
            f"inverse({self.name})", self.out_shape, self.in_shape, tuple(perm), tuple(scale), tuple(offset)
        )

    def then(self, other: AxisAffineStep) -> AxisAffineStep:
        """The composition ``other ∘ self`` as one step."""
        if other.in_shape != self.out_shape:
            raise BoxError(
                f"cannot compose {self.name} (out {self.out_shape}) with {other.name} (in {other.in_shape})"
            )
        d = self.ndim
        perm, scale, offset = [], [], []
        for a in range(d):
            mid = other.perm[a]
            perm.append(self.perm[mid])
            scale.append(other.scale[a] * self.scale[mid])
            offset.append(other.scale[a] * self.offset[mid] + other.offset[a])
        return AxisAffineStep(
            f"{self.name}+{other.name}",
            self.in_shape,
            other.out_shape,
            tuple(perm),
            tuple(scale),
            tuple(offset),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "axis_affine",
            "name": self.name,
            "in_shape": list(self.in_shape),
            "out_shape": list(self.out_shape),
            "perm": list(self.perm),
            "scale": list(self.scale),
            "offset": list(self.offset),
            "params": self.params,
        }


@dataclass(frozen=True)
class AffineStep:
    """A general affine map of edge coordinates (free rotation, shear): ``out = M @ [in, 1]``.

    Not exact for boxes: the image of a box is a parallelepiped and we return its axis-aligned hull,
    an upper bound of the tight box of the transformed region. Where a mask exists, carry the mask
    through the image transform and recompute its box instead (DESIGN.md §2).
    """

    name: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    matrix: tuple[tuple[float, ...], ...]
    params: dict[str, Any] = field(default_factory=dict, compare=False)

    exact = False

    def __post_init__(self) -> None:
        d = len(self.in_shape)
        m = np.asarray(self.matrix, dtype=np.float64)
        if m.shape != (d + 1, d + 1) or not np.all(np.isfinite(m)) or abs(np.linalg.det(m[:d, :d])) < 1e-12:
            raise BoxError(f"{self.name}: matrix must be a finite invertible {(d + 1, d + 1)} affine")

    @property
    def ndim(self) -> int:
        return len(self.in_shape)

    def map_points(self, points: np.ndarray) -> np.ndarray:
        m = np.asarray(self.matrix, dtype=np.float64)
        d = self.ndim
        return np.asarray(points, dtype=np.float64) @ m[:d, :d].T + m[:d, d]

    def map_boxes(self, boxes: ArrayLike) -> np.ndarray:
        arr = np.atleast_2d(_as_float_array(boxes, "boxes"))
        if arr.shape[1] != 2 * self.ndim:
            raise BoxError(f"{self.name}: expects {self.ndim}D boxes, got {arr.shape[1]} numbers per box")
        return _hull(self.map_points(_corners(arr)))

    def inverse(self) -> AffineStep:
        inv = np.linalg.inv(np.asarray(self.matrix, dtype=np.float64))
        return AffineStep(
            f"inverse({self.name})",
            self.out_shape,
            self.in_shape,
            tuple(tuple(float(v) for v in r) for r in inv),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "affine",
            "name": self.name,
            "in_shape": list(self.in_shape),
            "out_shape": list(self.out_shape),
            "matrix": [list(r) for r in self.matrix],
            "params": self.params,
        }


Step = AxisAffineStep | AffineStep


def step_from_dict(data: dict[str, Any]) -> Step:
    """Rebuild a step written by ``to_dict`` (for prediction files and bundles)."""
    kind = data.get("type")
    if kind == "axis_affine":
        return AxisAffineStep(
            data["name"],
            tuple(data["in_shape"]),
            tuple(data["out_shape"]),
            tuple(data["perm"]),
            tuple(float(v) for v in data["scale"]),
            tuple(float(v) for v in data["offset"]),
            dict(data.get("params", {})),
        )
    if kind == "affine":
        return AffineStep(
            data["name"],
            tuple(data["in_shape"]),
            tuple(data["out_shape"]),
            tuple(tuple(float(v) for v in r) for r in data["matrix"]),
            dict(data.get("params", {})),
        )
    raise BoxError(f"unknown spatial step type {kind!r} in {data!r:.120}")


def _identity_parts(d: int) -> tuple[list[int], list[float], list[float]]:
    return list(range(d)), [1.0] * d, [0.0] * d


def flip_step(shape: Sequence[int], axes: Sequence[int]) -> AxisAffineStep:
    """Reverse the given axes (``np.flip`` / MONAI ``Flip``): ``x' = n - x``."""
    shape = _shape(shape, "flip")
    perm, scale, offset = _identity_parts(len(shape))
    for a in axes:
        if not 0 <= a < len(shape):
            raise BoxError(f"flip: axis {a} out of range for shape {shape}")
        scale[a], offset[a] = -1.0, float(shape[a])
    return AxisAffineStep(
        "flip", shape, shape, tuple(perm), tuple(scale), tuple(offset), {"axes": list(axes)}
    )


def rot90_step(shape: Sequence[int], k: int = 1, axes: tuple[int, int] = (0, 1)) -> AxisAffineStep:
    """Rotate by ``k`` × 90° in the plane ``axes`` exactly as ``np.rot90(arr, k, axes)`` moves voxels.

    ``np.rot90`` with k=1 is ``flip(swapaxes(arr, a0, a1), a0)``: the new axis a0 reads the old axis a1
    reversed, the new axis a1 reads the old axis a0. MONAI's ``Rotate90`` calls ``torch.rot90`` (same).
    """
    shape = _shape(shape, "rot90")
    d = len(shape)
    a0, a1 = axes
    if a0 == a1 or not (0 <= a0 < d and 0 <= a1 < d):
        raise BoxError(f"rot90: invalid axes {axes} for shape {shape}")
    step: AxisAffineStep | None = None
    current = shape
    for _ in range(k % 4):
        perm, scale, offset = _identity_parts(d)
        perm[a0], perm[a1] = a1, a0
        scale[a0], offset[a0] = -1.0, float(current[a1])
        out = list(current)
        out[a0], out[a1] = current[a1], current[a0]
        one = AxisAffineStep("rot90", current, tuple(out), tuple(perm), tuple(scale), tuple(offset))
        step = one if step is None else step.then(one)
        current = tuple(out)
    if step is None:
        perm, scale, offset = _identity_parts(d)
        step = AxisAffineStep("rot90", shape, shape, tuple(perm), tuple(scale), tuple(offset))
    return AxisAffineStep(
        "rot90",
        step.in_shape,
        step.out_shape,
        step.perm,
        step.scale,
        step.offset,
        {"k": k, "axes": list(axes)},
    )


def reorient_step(shape: Sequence[int], perm: Sequence[int], flips: Sequence[bool]) -> AxisAffineStep:
    """Orientation change: output axis ``a`` reads input axis ``perm[a]``, reversed where ``flips[a]``.

    This is what ``Orientation`` / ``nibabel.as_closest_canonical`` do to the voxel grid.
    """
    shape = _shape(shape, "reorient")
    d = len(shape)
    if len(perm) != d or len(flips) != d:
        raise BoxError(f"reorient: perm {perm} / flips {flips} do not match {d} axes")
    out_shape = tuple(shape[p] for p in perm)
    scale = tuple(-1.0 if f else 1.0 for f in flips)
    offset = tuple(float(out_shape[a]) if flips[a] else 0.0 for a in range(d))
    return AxisAffineStep(
        "reorient", shape, out_shape, tuple(int(p) for p in perm), scale, offset,
        {"perm": list(perm), "flips": [bool(f) for f in flips]},
    )  # fmt: skip


def crop_step(shape: Sequence[int], start: Sequence[int], stop: Sequence[int]) -> AxisAffineStep:
    """Keep ``[start, stop)`` of each axis: ``x' = x - start``. Start may be negative (that is padding)."""
    shape = _shape(shape, "crop")
    if len(start) != len(shape) or len(stop) != len(shape):
        raise BoxError(f"crop: start {start} / stop {stop} do not match shape {shape}")
    out = tuple(int(b) - int(a) for a, b in zip(start, stop))
    _shape(out, f"crop {list(start)}..{list(stop)} of {shape}")
    perm, scale, _ = _identity_parts(len(shape))
    offset = tuple(-float(a) for a in start)
    return AxisAffineStep(
        "crop", shape, out, tuple(perm), tuple(scale), offset, {"start": list(start), "stop": list(stop)}
    )


def pad_step(shape: Sequence[int], before: Sequence[int], after: Sequence[int]) -> AxisAffineStep:
    """Pad ``before``/``after`` voxels on each axis: ``x' = x + before``."""
    shape = _shape(shape, "pad")
    if len(before) != len(shape) or len(after) != len(shape):
        raise BoxError(f"pad: before {before} / after {after} do not match shape {shape}")
    if any(int(v) < 0 for v in [*before, *after]):
        raise BoxError(f"pad: negative padding {before}/{after}; use crop_step")
    out = tuple(n + int(b) + int(a) for n, b, a in zip(shape, before, after))
    perm, scale, _ = _identity_parts(len(shape))
    return AxisAffineStep(
        "pad", shape, out, tuple(perm), tuple(scale), tuple(float(b) for b in before),
        {"before": list(before), "after": list(after)},
    )  # fmt: skip


def resize_step(shape: Sequence[int], out_shape: Sequence[int]) -> AxisAffineStep:
    """Resample the grid to ``out_shape`` covering the same extent (MONAI ``Resize``, align_corners=False).

    Edges scale exactly: ``x' = x * out / in``.
    """
    shape = _shape(shape, "resize")
    out = _shape(out_shape, "resize target")
    if len(out) != len(shape):
        raise BoxError(f"resize: {shape} and {out} differ in dimension")
    perm, _, offset = _identity_parts(len(shape))
    scale = tuple(o / n for o, n in zip(out, shape))
    return AxisAffineStep("resize", shape, out, tuple(perm), scale, tuple(offset), {"out_shape": list(out)})


def zoom_step(shape: Sequence[int], factors: Sequence[float]) -> AxisAffineStep:
    """MONAI ``Zoom(keep_size=False)``: output size ``floor(n * f)``, edges scaled by ``out / in``."""
    shape = _shape(shape, "zoom")
    if len(factors) != len(shape) or any(f <= 0 for f in factors):
        raise BoxError(f"zoom: factors {factors} must be positive, one per axis of {shape}")
    out = tuple(math.floor(n * f + 1e-9) for n, f in zip(shape, factors))
    step = resize_step(shape, out)
    return AxisAffineStep(
        "zoom", step.in_shape, step.out_shape, step.perm, step.scale, step.offset, {"factors": list(factors)}
    )


def respace_step(
    shape: Sequence[int],
    in_spacing: Sequence[float],
    out_spacing: Sequence[float],
    out_shape: Sequence[int] | None = None,
    origin_shift: Sequence[float] | None = None,
) -> AxisAffineStep:
    """Resample from ``in_spacing`` to ``out_spacing`` mm with voxel centre 0 kept in place (MONAI ``Spacing``).

    A voxel centre ``c`` (= edge − 0.5) moves to ``c * in / out − shift``, so an edge ``e`` maps to
    ``(e − 0.5) * r + 0.5 − shift`` with ``r = in / out``. ``origin_shift`` (in output voxels) covers
    grids whose first centre moved; ``out_shape`` defaults to ``round(n * r)``.
    """
    shape = _shape(shape, "respace")
    d = len(shape)
    if len(in_spacing) != d or len(out_spacing) != d or any(s <= 0 for s in [*in_spacing, *out_spacing]):
        raise BoxError(
            f"respace: spacings {in_spacing} -> {out_spacing} must be positive, one per axis of {shape}"
        )
    ratio = [float(i) / float(o) for i, o in zip(in_spacing, out_spacing)]
    shift = [0.0] * d if origin_shift is None else [float(s) for s in origin_shift]
    out = (
        tuple(max(1, round(n * r)) for n, r in zip(shape, ratio))
        if out_shape is None
        else _shape(out_shape, "respace target")
    )
    perm, _, _ = _identity_parts(d)
    offset = tuple(0.5 - 0.5 * r - s for r, s in zip(ratio, shift))
    return AxisAffineStep(
        "respace", shape, out, tuple(perm), tuple(ratio), offset,
        {"in_spacing": list(in_spacing), "out_spacing": list(out_spacing)},
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# CoordinateFrame


@dataclass(frozen=True)
class CoordinateFrame:
    """The chain of spatial steps from a stored image's voxel grid to the grid the model sees.

    Immutable: ``frame.then(step)`` returns a new frame, so a cached pipeline output can be shared by
    several samples that then diverge (random crops). ``to_text`` maps voxel-frame boxes forward,
    ``to_voxel`` maps text-grid boxes (floats, before a codec rounds them) back.
    """

    source_shape: tuple[int, ...]
    steps: tuple[Step, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "source_shape", _shape(self.source_shape, "CoordinateFrame source"))

    @property
    def ndim(self) -> int:
        return len(self.source_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the grid after every step (the text grid once tokenization has appended its steps)."""
        return self.steps[-1].out_shape if self.steps else self.source_shape

    @property
    def exact(self) -> bool:
        """True when every step maps boxes to boxes exactly (no free rotation)."""
        return all(s.exact for s in self.steps)

    def then(self, step: Step) -> CoordinateFrame:
        if tuple(step.in_shape) != self.shape:
            raise BoxError(
                f"step {step.name!r} expects a grid of shape {tuple(step.in_shape)}, the frame is at {self.shape}"
            )
        return CoordinateFrame(self.source_shape, (*self.steps, step))

    def extend(self, steps: Iterable[Step]) -> CoordinateFrame:
        frame = self
        for step in steps:
            frame = frame.then(step)
        return frame

    def to_text(self, boxes: ArrayLike | Box) -> np.ndarray:
        """Voxel-frame boxes → text-grid boxes (floats)."""
        arr = self._boxes(boxes, "voxel")
        for step in self.steps:
            arr = step.map_boxes(arr)
        return arr

    def to_voxel(self, boxes: ArrayLike | Box) -> np.ndarray:
        """Text-grid boxes → voxel-frame boxes, through each step's inverse in reverse order."""
        arr = self._boxes(boxes, "text")
        for step in reversed(self.steps):
            arr = step.inverse().map_boxes(arr)
        return arr

    def composed(self) -> AxisAffineStep:
        """All steps as one axis-aligned map (only for exact frames)."""
        if not self.exact:
            raise BoxError("composed(): the frame contains a general affine step; map step by step")
        perm, scale, offset = _identity_parts(self.ndim)
        total = AxisAffineStep(
            "identity", self.source_shape, self.source_shape, tuple(perm), tuple(scale), tuple(offset)
        )
        for step in self.steps:
            total = total.then(step)  # type: ignore[arg-type]
        return total

    def text_scale(self) -> np.ndarray:
        """Voxel-frame size of one text-grid unit along each voxel axis (for round-trip tolerances)."""
        return np.abs(np.asarray(self.composed().inverse().scale))

    def _boxes(self, boxes: ArrayLike | Box, frame: Frame) -> np.ndarray:
        if isinstance(boxes, Box):
            boxes = boxes.require(frame).array()
        arr = np.atleast_2d(_as_float_array(boxes, f"{frame} boxes"))
        if arr.shape[1] != 2 * self.ndim:
            raise BoxError(f"{frame} boxes have {arr.shape[1]} numbers, the frame is {self.ndim}D")
        return arr

    def to_dict(self) -> dict[str, Any]:
        return {"source_shape": list(self.source_shape), "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CoordinateFrame:
        try:
            frame = cls(tuple(data["source_shape"]))
            return frame.extend(step_from_dict(s) for s in data.get("steps", []))
        except (KeyError, TypeError) as err:
            raise BoxError(f"malformed CoordinateFrame record: {err}") from err
