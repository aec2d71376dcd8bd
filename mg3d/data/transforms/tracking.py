"""Frame bookkeeping: the keys of a pipeline's working dict, and how each MONAI spatial step enters the frame.

Every spatial step runs as a MONAI transform; its MetaTensor affine before and after gives the exact
voxel-to-voxel map, which :func:`step_from_affines` turns into the matching :mod:`mg3d.frames` step (or
raises when the named step does not reproduce it). :func:`visible_boxes` maps voxel-frame boxes onto the final grid.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from mg3d.boxes import clip_boxes
from mg3d.errors import BoxError, ConfigError
from mg3d.frames import (
    AffineStep,
    AxisAffineStep,
    CoordinateFrame,
    Step,
    crop_step,
    flip_step,
    pad_step,
    reorient_step,
    resize_step,
    respace_step,
)

IMAGE, MASK, FRAME, BOXES = "image", "mask", "frame", "boxes"
_SPATIAL_KEYS = (IMAGE, MASK)


_STEP_KINDS = ("reorient", "respace", "resize", "crop", "pad", "flip", "affine")


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
    """The :mod:`mg3d.frames` step of ``kind`` that reproduces what a MONAI transform did to the grid.

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
