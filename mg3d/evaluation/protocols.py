"""Evaluation protocols: mg3d's, MedGround-R1's and M3D's rules, and the IoU variants the latter two use."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from mg3d.errors import BoxError, ConfigError

Comparison = Literal[">", ">="]
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7)
GROUP_KEYS: tuple[str, ...] = ("dataset", "category", "question_type")


def medground_r1_iou(pred: Sequence[float], gts: np.ndarray) -> np.ndarray:
    """MedGround-R1 / VLM-R1's IoU of one box against ``(M, 2d)`` boxes, as their code computes it.

    Per axis the intersection runs from ``max(lo)`` to ``min(hi) - 1`` and counts only when that interval
    is non-empty (``max(lo) < min(hi) - 1``); its length is then taken ``+ 1``, which gives back the plain
    overlap ``min(hi) - max(lo)``. Areas are ``(hi - lo)`` products *without* ``+ 1``. So the value equals the
    continuous IoU, except that an overlap of 1 pixel or less on any axis scores 0. Boxes are used as written
    (no reordering, no clipping): an inverted box has no intersection. A zero union (their code would
    divide by zero) scores 0. 2D is their code; 3D applies the same rule on the third axis.
    """
    p = np.asarray(pred, dtype=np.float64)
    g = np.atleast_2d(np.asarray(gts, dtype=np.float64))
    d = g.shape[1] // 2
    lo = np.maximum(p[None, :d], g[:, :d])
    hi = np.minimum(p[None, d:] - 1.0, g[:, d:] - 1.0)
    overlaps = np.all(lo < hi, axis=1)
    inter = np.where(overlaps, np.prod(hi - lo + 1.0, axis=1), 0.0)
    union = np.prod(p[d:] - p[:d]) + np.prod(g[:, d:] - g[:, :d], axis=1) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union != 0, inter / np.where(union != 0, union, 1.0), 0.0)


def m3d_normalize(boxes: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Half-open voxel boxes → M3D-LaMed's normalised boxes: ``[lo / n, (hi - 1) / n]`` rounded to 3 decimals.

    M3D's ``mask2box`` takes the last foreground index (inclusive) as the max; for a half-open box that is
    ``hi - 1``. Python's ``round`` (half to even) is what M3D uses; numpy's ``round`` does the same.
    """
    arr = np.atleast_2d(np.asarray(boxes, dtype=np.float64))
    d = arr.shape[1] // 2
    n = np.asarray(shape, dtype=np.float64)
    if n.shape != (d,) or np.any(n <= 0):
        raise BoxError(f"m3d_normalize: shape {tuple(shape)} does not fit {d}D boxes")
    out = np.concatenate([arr[:, :d] / n, (arr[:, d:] - 1.0) / n], axis=1)
    return np.round(out, 3)


def m3d_enclosing_iou(pred: Sequence[float], gts: np.ndarray) -> np.ndarray:
    """M3D-LaMed's ``calculate_iou``: intersection volume / (volume of the enclosing box + 1e-6).

    The enclosing box (per-axis min of the los to max of the his) is never smaller than the union, so this
    is at most the true IoU. It is kept only to reproduce numbers reported with M3D's evaluation code.
    """
    p = np.asarray(pred, dtype=np.float64)
    g = np.atleast_2d(np.asarray(gts, dtype=np.float64))
    d = g.shape[1] // 2
    inter = np.prod(
        np.clip(np.minimum(p[None, d:], g[:, d:]) - np.maximum(p[None, :d], g[:, :d]), 0, None), axis=1
    )
    enclosing = np.prod(np.maximum(p[None, d:], g[:, d:]) - np.minimum(p[None, :d], g[:, :d]), axis=1)
    return inter / (enclosing + 1e-6)


@dataclass(frozen=True)
class ProtocolSpec:
    """The rules of one evaluation protocol."""

    name: str
    parse_mode: Literal["lenient", "strict"]
    map_frames: bool  # decode with the codec and map text → voxel through the frame
    iou_kind: Literal["standard", "medground-r1", "m3d-enclosing"]
    default_comparison: Comparison
    comparison_fixed: bool  # the protocol defines the comparison; overriding it is refused
    standard: bool  # False: the "IoU" is not the standard IoU
    description: str
    accept_native: bool = False  # also score tag-less Qwen-native JSON answers (mg3d.prompts.usable_box)


PROTOCOLS: dict[str, ProtocolSpec] = {
    "mg3d": ProtocolSpec(
        "mg3d",
        "lenient",
        True,
        "standard",
        ">=",
        False,
        True,
        "lenient parser; text frame → voxel frame through the stored CoordinateFrame; box clipped to the image; "
        "standard IoU, best of several ground-truth boxes",
    ),
    "qwen-native": ProtocolSpec(
        "qwen-native",
        "lenient",
        True,
        "standard",
        ">=",
        False,
        True,
        "mg3d's rules, and a tag-less Qwen-native JSON answer (a list of bbox_2d / bbox_3d objects) also "
        "counts: zero-shot baselines of a pretrained Qwen2.5-VL, which answers that way untrained",
        accept_native=True,
    ),
    "medground-r1": ProtocolSpec(
        "medground-r1",
        "strict",
        False,
        "medground-r1",
        ">",
        True,
        True,
        "MedGround-R1 / VLM-R1 evaluation: strict parser, [0,0,0,0] on failure, no rescaling, "
        "their IoU formula (overlaps of ≤ 1 px count as 0), Acc with IoU > τ",
    ),
    "m3d": ProtocolSpec(
        "m3d",
        "lenient",
        True,
        "m3d-enclosing",
        ">=",
        False,
        False,
        "M3D-LaMed REC evaluation: boxes normalised with inclusive max (3 decimals); 'IoU' = intersection / "
        "enclosing-box volume — NON-STANDARD, lower than the true IoU",
    ),
}


def get_protocol(name: str | ProtocolSpec) -> ProtocolSpec:
    """Protocol by name (``mg3d``, ``medground-r1``, ``m3d``; ``_`` and case are ignored)."""
    if isinstance(name, ProtocolSpec):
        return name
    key = str(name).strip().lower().replace("_", "-")
    spec = PROTOCOLS.get(key)
    if spec is None:
        raise ConfigError(f"unknown evaluation protocol {name!r}; known: {sorted(PROTOCOLS)}")
    return spec


def _check_comparison(comparison: str) -> Comparison:
    if comparison in (">", "gt"):
        return ">"
    if comparison in (">=", "ge", "≥"):
        return ">="
    raise ConfigError(f"comparison must be '>' or '>=', got {comparison!r}")


def _correct(ious: np.ndarray, thresholds: Sequence[float], comparison: Comparison) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64)[:, None]
    return (ious[None, :] > t) if comparison == ">" else (ious[None, :] >= t)
