"""Per-image intensity statistics for the semantic reward's encoders: scale, noise and the body.

Why this exists (issue 24): statistics taken over the whole image depend on how much air or padding the
field of view holds. On a skull-stripped head CT (81 % of voxels exactly 0) the median neighbour difference
is 0 and the 0.5–99.5 % window is [0, 54] HU, so a dark and a bright lesion land at opposite ends of the
scale, while on an abdominal phantom the same lesions are a few per cent of [−1014, 292] HU apart. So:

* **Scale** — where the image has physical units the scale is fixed by the unit, not by the image:
  :data:`PHYSICAL_SCALES` (HU for CT, SUV for PET, the presets' stated ``[0, 1]`` normalisation for MR and
  radiographs). Only an image of unknown units (``unit=None``) falls back to its foreground's robust range.
* **Foreground** — :func:`foreground_mask`: not constant padding (:func:`padding_mask`: an atlas's outside,
  a scanner's circular field of view, air clipped by a CT window) and, with a
  known unit, above air (CT: −500 HU; PET and normalised MR: the image's Otsu threshold), with holes filled
  slice by slice (lungs, bowel gas) so the body is one region.
* **Noise** — a robust σ of neighbour differences between foreground voxels only (:func:`noise_level`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "PHYSICAL_SCALES",
    "IntensityStats",
    "foreground_mask",
    "intensity_stats",
    "noise_level",
    "otsu_threshold",
    "padding_mask",
]

_MAX_STAT_VOXELS = 1_000_000
_MIN_FOREGROUND = 0.01  # share of voxels below which the foreground is not trusted

#: unit → (lo, hi) reference scale the encoders read intensities in, and the level under which a voxel is
#: air / empty rather than body (``None``: the image's own Otsu threshold)
PHYSICAL_SCALES: dict[str, tuple[float, float, float | None]] = {
    "HU": (-1000.0, 1000.0, -500.0),
    "SUV": (0.0, 10.0, None),
    "normalised": (0.0, 1.0, None),
}


@dataclass(frozen=True)
class IntensityStats:
    """One image's intensity statistics (modality units); ``lo``/``hi`` = the scale encoders read in."""

    quantiles: torch.Tensor  # (Q,) non-decreasing, of the foreground
    levels: torch.Tensor  # (Q,) from 0 to 1
    lo: float
    hi: float
    noise: float  # robust noise σ of the foreground (modality units)
    unit: str | None = None

    @property
    def span(self) -> float:
        return max(self.hi - self.lo, 1e-6)

    def window(self, x: torch.Tensor) -> torch.Tensor:
        """Linear map of ``[lo, hi]`` to ``[0, 1]`` (clipped): what network encoders see."""
        return ((x - self.lo) / self.span).clamp_(0.0, 1.0)

    def equalise(self, x: torch.Tensor) -> torch.Tensor:
        """The foreground's empirical CDF at ``x`` (piecewise linear, mid-plateau on ties), in ``[0, 1]``."""
        q, lv = self.quantiles, self.levels
        flat = x.reshape(-1).contiguous()
        out = torch.zeros_like(flat)
        for right in (False, True):
            idx = torch.searchsorted(q, flat, right=right).clamp_(1, q.numel() - 1)
            q0, q1 = q[idx - 1], q[idx]
            width = q1 - q0
            t = torch.where(width > 0, (flat - q0) / width.clamp_min(1e-12), torch.full_like(flat, 0.5))
            out += lv[idx - 1] + t.clamp_(0.0, 1.0) * (lv[idx] - lv[idx - 1])
        return (out / 2).reshape(x.shape)


def _subsample(values: np.ndarray) -> np.ndarray:
    return values[:: math.ceil(values.size / _MAX_STAT_VOXELS)] if values.size > _MAX_STAT_VOXELS else values


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (between-class variance maximised over a histogram)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    return float(centres[int(np.argmax(w0 * w1 * (m0 - m1) ** 2))])


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Fill holes in every 2D slice (the last axis is the slice axis of a volume)."""
    if mask.ndim == 2:
        return ndimage.binary_fill_holes(mask)
    out = np.empty_like(mask)
    for k in range(mask.shape[-1]):
        out[..., k] = ndimage.binary_fill_holes(mask[..., k])
    return out


def padding_mask(image: np.ndarray) -> np.ndarray:
    """Constant padding: regions of one repeated value that hold a flat voxel (whose whole 3^d neighbourhood
    has that value) — with their rim, which a neighbour of other value keeps from being flat itself.

    Only values with at least 0.1 % of the voxels among the flat ones count, so a coincidentally flat patch
    of integer-valued tissue does not make that value padding everywhere.
    """
    img = np.asarray(image)
    size = (3,) * img.ndim
    flat = ndimage.maximum_filter(img, size=size) == ndimage.minimum_filter(img, size=size)
    if not flat.any():
        return flat
    values, counts = np.unique(img[flat], return_counts=True)
    values = values[counts >= 0.001 * img.size]
    if values.size == 0:
        return np.zeros(img.shape, dtype=bool)
    same = np.isin(img, values)
    labels, _ = ndimage.label(same)
    keep = np.unique(labels[flat & same])
    return np.isin(labels, keep[keep > 0])


def foreground_mask(image: np.ndarray, unit: str | None = None) -> np.ndarray:
    """The body: not constant padding and, where the unit says what air is, above it (see the module doc).

    Falls back to every non-padding voxel, then every voxel, when less than 1 % of the image would remain.
    """
    img = np.asarray(image, dtype=np.float32)
    inside = ~padding_mask(img)
    if inside.mean() < _MIN_FOREGROUND:
        return np.ones(img.shape, dtype=bool)
    if unit not in PHYSICAL_SCALES:
        return inside  # unknown units: nothing says what air is
    air = PHYSICAL_SCALES[unit][2]
    threshold = air if air is not None else otsu_threshold(_subsample(img[inside]))
    body = _fill_slices(inside & (img > threshold)) & inside
    return body if body.mean() >= _MIN_FOREGROUND else inside


#: E[|Δ| given |Δ| ≤ its 90th percentile] / σ for Gaussian noise of σ (|Δ| half-normal with scale σ√2)
_TRIMMED_MEAN_FACTOR = 0.9301


def noise_level(image: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Robust noise σ from neighbour differences over pairs inside ``mask``: the mean of the smallest 90 % of
    |Δ|, scaled for Gaussian noise. Not the median: an interpolated or quantised image (many equal
    neighbours) has a median difference of 0 while its texture is plain to see; edges sit in the top 10 %."""
    img = np.asarray(image, dtype=np.float32)
    diffs = []
    for axis in range(img.ndim):
        d = np.abs(np.diff(img, axis=axis))
        if mask is not None:
            both = np.logical_and(
                mask[tuple(slice(1, None) if a == axis else slice(None) for a in range(img.ndim))],
                mask[tuple(slice(None, -1) if a == axis else slice(None) for a in range(img.ndim))],
            )
            d = d[both]
        diffs.append(_subsample(d.reshape(-1)))
    values = np.concatenate(diffs)
    if values.size == 0:
        return 0.0
    kept = values[values <= np.quantile(values, 0.9)]
    return float(kept.mean() / _TRIMMED_MEAN_FACTOR)


def intensity_stats(
    image: np.ndarray | torch.Tensor,
    unit: str | None = None,
    *,
    foreground: np.ndarray | None = None,
    n_levels: int = 257,
) -> IntensityStats:
    """Foreground quantiles, the reading scale (fixed by ``unit``, else the foreground's 0.5–99.5 %) and noise.

    ``foreground`` defaults to :func:`foreground_mask`; pass an all-true mask to use every voxel.
    """
    img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    img = img.astype(np.float32, copy=False)
    mask = foreground_mask(img, unit) if foreground is None else np.asarray(foreground, dtype=bool)
    values = _subsample(img[mask].astype(np.float64)) if mask.any() else _subsample(img.reshape(-1))
    levels = np.linspace(0.0, 1.0, n_levels)
    q = np.quantile(values, np.concatenate([levels, [0.005, 0.995]]))  # one sort for all levels
    quantiles = np.maximum.accumulate(q[:n_levels])  # guard float rounding
    if unit in PHYSICAL_SCALES:
        lo, hi = PHYSICAL_SCALES[unit][:2]
    else:
        lo, hi = float(q[-2]), float(q[-1])
    return IntensityStats(
        torch.from_numpy(quantiles).float(),
        torch.from_numpy(levels).float(),
        float(lo),
        float(hi),
        noise_level(img, mask),
        unit if unit in PHYSICAL_SCALES else None,
    )
