"""Spatial steps between grids and the :class:`CoordinateFrame` that chains them.

* Every spatial operation the pipelines use (flip, 90° rotation, orientation change, crop, pad,
  resize, zoom, respacing) is an *axis-aligned affine* map: output axis ``a`` is
  ``scale[a] * input[perm[a]] + offset[a]``. Such maps send boxes to boxes exactly, compose into
  one map, and have exact inverses. General affines (free rotations) send a box to the corner hull,
  which is only an upper bound of the tight box; :class:`AffineStep` says so with ``exact = False``.
* Steps work on the voxel-edge coordinates of :mod:`mg3d.boxes` (its conventions hold here).

Together with :mod:`mg3d.boxes` this is the geometry layer: it imports nothing else from mg3d but
:mod:`mg3d.errors` and :mod:`mg3d.boxes` (which never imports this module), so data pipelines and
tokenization both append steps to a frame without importing each other.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mg3d.boxes import ArrayLike, Box, Frame, _as_float_array, _corners, _hull, _shape
from mg3d.errors import BoxError

__all__ = [
    "AffineStep",
    "AxisAffineStep",
    "CoordinateFrame",
    "Step",
    "crop_step",
    "flip_step",
    "pad_step",
    "reorient_step",
    "resize_step",
    "respace_step",
    "rot90_step",
    "step_from_dict",
    "zoom_step",
]


# --------------------------------------------------------------------------------------------------
# Spatial steps


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

    Which grids: a frame maps boxes from its *source grid* (``source_shape``, where its first step starts) to
    its *destination grid* (``shape``, where its last step ends) and back; nothing else. Where those grids are
    depends on who built the frame: a data sample's frame runs from the stored image's voxel grid to the
    pipeline grid (the tensor handed to tokenization); once tokenization has appended its steps it runs from
    the stored voxel grid to the text grid the model writes in; a frame started on the pipeline grid runs
    from there to the text grid. ``to_text`` always means source → destination and ``to_voxel`` destination
    → source; the names say where a complete frame ends, so check ``source_shape`` / ``shape`` (or who built
    the frame) before reading a result as stored-voxel or text-grid coordinates.

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
