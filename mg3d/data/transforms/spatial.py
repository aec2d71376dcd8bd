"""Spatial steps, each recorded in the frame: orientation/spacing wrappers, foreground crop, the fit to the
model grid, and the random augmentations (target crop, lateral flip with its text swap, affine)."""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Affined,
    Flipd,
    MapTransform,
    RandomizableTransform,
    Resized,
    ResizeWithPadOrCropd,
    SpatialCropd,
    SpatialPadd,
)
from monai.transforms.utils import generate_spatial_bounding_box

from mg3d.data.transforms.config import _FIT_MODES
from mg3d.data.transforms.tracking import (
    _SPATIAL_KEYS,
    _STEP_KINDS,
    _grid_boxes,
    _require_meta,
    _tracked,
)
from mg3d.errors import ConfigError


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
