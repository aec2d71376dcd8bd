"""Spatial accuracy rewards: box overlap (binary, IoU, GIoU) and, for volumes, centre distance in mm.

All geometry is in the **voxel frame**: the predicted text-grid box is mapped back through the record's
``CoordinateFrame`` first (DESIGN.md §2), so the score does not depend on how the image was resized for the
model. With several ground-truth boxes the best match counts. A completion without a usable box gets the
reward's ``failure_value`` (by default the bottom of its range); boxes are not clipped to the image, so the
score agrees with the evaluation protocol.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mg3d.errors import ConfigError
from mg3d.rewards.base import ParsedBatch, Reward, register_reward

__all__ = ["CenterDistanceReward", "GIoUReward", "IoUReward", "IoUThresholdReward"]


class _SpatialReward(Reward):
    def __init__(self, *, failure_value: float | None = None, name: str | None = None) -> None:
        super().__init__(name=name)
        lo, hi = self.value_range
        value = lo if failure_value is None else float(failure_value)
        if not lo <= value <= hi:
            raise ConfigError(
                f"{self.name}: failure_value {value} is outside the reward's range [{lo}, {hi}]"
            )
        self.failure_value = value

    def _with_failures(self, batch: ParsedBatch, values: np.ndarray) -> np.ndarray:
        return np.where(batch.has_box, values, self.failure_value)


@register_reward("iou_binary")
class IoUThresholdReward(_SpatialReward):
    """MedGround-R1 / VLM-R1's accuracy reward: 1 if the best IoU is **strictly** above τ (0.5), else 0."""

    value_range = (0.0, 1.0)

    def __init__(
        self, *, threshold: float = 0.5, failure_value: float | None = None, name: str | None = None
    ) -> None:
        super().__init__(failure_value=failure_value, name=name)
        if not 0.0 <= threshold < 1.0:
            raise ConfigError(f"{self.name}: threshold must be in [0, 1), got {threshold}")
        self.threshold = float(threshold)

    def score(self, batch: ParsedBatch) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            hit = (batch.best_iou > self.threshold).astype(np.float64)
        return self._with_failures(batch, hit)


@register_reward("iou")
class IoUReward(_SpatialReward):
    """Continuous best IoU in [0, 1]: dense feedback where the binary rule gives a group of zeros."""

    value_range = (0.0, 1.0)

    def score(self, batch: ParsedBatch) -> np.ndarray:
        return self._with_failures(batch, batch.best_iou)


@register_reward("giou")
class GIoUReward(_SpatialReward):
    """Best generalised IoU in [-1, 1] (``rescale=True``: ``(GIoU + 1) / 2`` in [0, 1]).

    Unlike IoU it still ranks disjoint boxes by how far apart they are (the enclosing hull grows).
    """

    value_range = (-1.0, 1.0)

    def __init__(
        self, *, rescale: bool = False, failure_value: float | None = None, name: str | None = None
    ) -> None:
        self.rescale = bool(rescale)
        if self.rescale:
            self.value_range = (0.0, 1.0)  # type: ignore[misc]
        super().__init__(failure_value=failure_value, name=name)

    def score(self, batch: ParsedBatch) -> np.ndarray:
        g = batch.best_giou
        if self.rescale:
            g = (g + 1.0) / 2.0
        return self._with_failures(batch, g)


@register_reward("center_distance")
class CenterDistanceReward(_SpatialReward):
    """``exp(−d / scale_mm)`` in (0, 1], d = distance from the predicted box centre to the nearest ground-truth
    centre, in mm through the record's affine (or spacing); in voxels when the record has neither.

    Applies to the dimensions in ``ndims`` (default: volumes only) and is NaN for the others, so a mixed
    2D/3D batch does not reward radiographs with a term that only exists for volumes.
    """

    value_range = (0.0, 1.0)

    def __init__(
        self,
        *,
        scale_mm: float = 20.0,
        ndims: Sequence[int] = (3,),
        require_mm: bool = False,
        failure_value: float | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(failure_value=failure_value, name=name)
        if not (math.isfinite(scale_mm) and scale_mm > 0):
            raise ConfigError(f"{self.name}: scale_mm must be positive, got {scale_mm}")
        dims = tuple(int(d) for d in ndims)
        if not dims or any(d not in (2, 3) for d in dims):
            raise ConfigError(f"{self.name}: ndims must list 2 and/or 3, got {list(ndims)}")
        self.scale_mm = float(scale_mm)
        self.ndims = dims
        self.require_mm = bool(require_mm)

    def score(self, batch: ParsedBatch) -> np.ndarray:
        values = self._with_failures(batch, np.exp(-batch.best_center_distance / self.scale_mm))
        applies = np.isin(batch.ndims, self.ndims)
        if self.require_mm:
            applies &= np.asarray([t.mm_affine() is not None for t in batch.targets], dtype=bool)
        return np.where(applies, values, np.nan)
