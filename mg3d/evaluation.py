"""Grounding metrics under named evaluation protocols, an accumulator for Lightning hooks, and result files.

Three protocols (``docs/evaluation.md`` puts them side by side):

* ``mg3d`` (default) — the lenient parser (a box counts when it comes from a complete ``<answer>``, as in
  training); the box is decoded with the model's codec, mapped from the text frame back to the stored image's
  voxel frame through the record's :class:`~mg3d.boxes.CoordinateFrame`, clipped to the image, and scored with
  the standard (MONAI-convention, half-open) IoU against the best of the ground-truth boxes. Acc@τ uses
  ``IoU ≥ τ`` by default (MedRPG's rule); ``comparison=">"`` switches.
* ``medground-r1`` — the MedGround-R1 / VLM-R1 evaluation, exactly: the strict parser (first ``<answer>``,
  integers inside ``{…}``), ``[0, 0, 0, 0]`` when that fails, no rescaling (the model's numbers are compared
  with the ground truth as stored), their IoU formula (:func:`medground_r1_iou`) and ``IoU > 0.5``.
* ``m3d`` — M3D-LaMed's REC numbers: both boxes normalised as M3D does (index / axis length, *inclusive* max,
  3 decimals) and compared with M3D's "IoU", whose denominator is the volume of the enclosing box, not the
  union (:func:`m3d_enclosing_iou`). **Not a standard IoU** — only for comparing with numbers reported that way.

In every protocol a completion without a usable box scores IoU 0 and stays in the denominator.

Lightning use (one evaluator per stage; ``sync`` gathers the rows of every rank before ``compute``)::

    def on_validation_epoch_start(self):
        self.evaluator.reset()

    def validation_step(self, batch, batch_idx):
        self.evaluator.update(self.grounder.predict_records(batch["records"], progress=False))

    def on_validation_epoch_end(self):
        self.evaluator.sync()
        self.log_dict({f"val/{k}": v for k, v in self.evaluator.compute().items()}, rank_zero_only=True)
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mg3d.boxes import CoordinateFrame, center_distance_mm, clip_boxes, pair_iou, validate_boxes
from mg3d.errors import BoxError, ConfigError, DataError
from mg3d.prompts import BoxCodec, get_codec, parse_completion

__all__ = [
    "DEFAULT_THRESHOLDS",
    "PROTOCOLS",
    "EvalItem",
    "GroundingEvaluator",
    "ProtocolSpec",
    "ScoredPrediction",
    "aggregate",
    "bootstrap_ci",
    "get_protocol",
    "item_from_prediction",
    "m3d_enclosing_iou",
    "m3d_normalize",
    "medground_r1_iou",
    "read_predictions",
    "rescore",
    "score_item",
    "write_metrics_json",
    "write_metrics_md",
    "write_predictions",
]

Comparison = Literal[">", ">="]
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7)
GROUP_KEYS: tuple[str, ...] = ("dataset", "category", "question_type")


# ----------------------------------------------------------------------------------------------------------
# IoU variants that are not MONAI's (written by hand because they reproduce other projects' exact formulas)
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Protocols
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Input items
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalItem:
    """One completion to score, with its ground truth (voxel frame) and, optionally, its frame and geometry."""

    id: str
    completion: str
    gt_boxes: tuple[tuple[float, ...], ...]
    ndim: int
    dataset: str | None = None
    phrase: str | None = None
    category: str | None = None
    question_type: int | None = None
    image: str | None = None
    frame: Mapping[str, Any] | None = None
    affine: tuple[tuple[float, ...], ...] | None = None
    spacing: tuple[float, ...] | None = None
    spatial_shape: tuple[int, ...] | None = None
    codec: str | None = None

    def gt_array(self) -> np.ndarray:
        return np.asarray(self.gt_boxes, dtype=np.float64).reshape(len(self.gt_boxes), 2 * self.ndim)


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _first(obj: Any, names: Sequence[str]) -> tuple[str | None, Any]:
    for name in names:
        value = _get(obj, name)
        if value is not None:
            return name, value
    return None, None


def _codec_name(codec: Any) -> str | None:
    if codec is None:
        return None
    if isinstance(codec, BoxCodec):
        return codec.name
    return str(codec)


def item_from_prediction(obj: Any, *, where: str = "prediction", default_id: str | None = None) -> EvalItem:
    """Build an :class:`EvalItem` from a ``Grounder`` ``Prediction``, a predictions.jsonl row or a paper log entry.

    Field names accepted: completion (``completion`` / ``model_output``), ground truth (``gt_boxes``, or one
    box as ``gt_box`` / ``ground_truth``), phrase (``phrase`` / ``text`` / ``question``); ``ndim`` defaults to
    the ground-truth box length. ``where`` names the file and line in error messages.
    """
    if isinstance(obj, EvalItem):
        return obj
    _, completion = _first(obj, ("completion", "model_output"))
    rid = _get(obj, "id")
    rid = str(rid) if rid is not None else default_id
    label = f"{where} (id {rid!r})" if rid is not None else where
    if not isinstance(completion, str):
        raise DataError(f"{label}: needs a 'completion' (or 'model_output') string, got {completion!r:.80}")
    key, gt = _first(obj, ("gt_boxes", "gt_box", "ground_truth"))
    if key is None:
        raise DataError(f"{label}: needs 'gt_boxes' (a list of boxes) or 'gt_box' / 'ground_truth' (one box)")
    if key != "gt_boxes":
        gt = [gt] if gt and not isinstance(_safe_index(gt), (list, tuple)) else gt
    ndim = _get(obj, "ndim")
    try:
        boxes = validate_boxes(gt, ndim if ndim is not None else None, what=f"{label} {key}")
    except BoxError as err:
        raise DataError(str(err)) from None
    if boxes.shape[0] == 0:
        raise DataError(f"{label}: {key} holds no box")
    ndim = boxes.shape[1] // 2
    _, phrase = _first(obj, ("phrase", "text", "question"))
    qt = _get(obj, "question_type")
    frame = _get(obj, "frame")
    if frame is not None and not isinstance(frame, Mapping):
        to_dict = getattr(frame, "to_dict", None)
        if to_dict is None:
            raise DataError(f"{label}: 'frame' must be a CoordinateFrame dict, got {type(frame).__name__}")
        frame = to_dict()
    affine = _get(obj, "affine")
    spacing = _get(obj, "spacing")
    shape = _get(obj, "spatial_shape")
    try:
        return EvalItem(
            id=rid if rid is not None else "",
            completion=completion,
            gt_boxes=tuple(tuple(float(v) for v in row) for row in boxes),
            ndim=int(ndim),
            dataset=None if _get(obj, "dataset") is None else str(_get(obj, "dataset")),
            phrase=None if phrase is None else str(phrase),
            category=None if _get(obj, "category") is None else str(_get(obj, "category")),
            question_type=None if qt is None else int(qt),
            image=None if _get(obj, "image") is None else str(_get(obj, "image")),
            frame=frame,
            affine=None if affine is None else tuple(tuple(float(v) for v in row) for row in affine),
            spacing=None if spacing is None else tuple(float(v) for v in spacing),
            spatial_shape=tuple(int(v) for v in shape) if shape else None,  # () from inputs without one
            codec=_codec_name(_get(obj, "codec")),
        )
    except (TypeError, ValueError) as err:
        raise DataError(f"{label}: malformed field ({err})") from None


def _safe_index(value: Any) -> Any:
    try:
        return value[0]
    except (TypeError, IndexError, KeyError):
        return None


# ----------------------------------------------------------------------------------------------------------
# Scoring one item
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ScoredPrediction:
    """One scored completion: what was parsed, where it lands in the voxel frame, and how well it matches."""

    item: EvalItem
    protocol: str
    parse_status: str
    parse_ok: bool
    parse_flags: tuple[str, ...]
    parse_detail: str
    format_ok: bool
    box_raw: tuple[float, ...]  # the numbers as the model wrote them (empty when none were read)
    box_text: (
        tuple[float, ...] | None
    )  # text-grid box as the protocol read it (medground-r1: [0,…] on failure)
    box_voxel: tuple[float, ...] | None  # in the voxel frame of the stored image (None on failure)
    think_boxes_text: tuple[tuple[float, ...], ...]
    think_boxes_voxel: tuple[tuple[float, ...], ...]
    ious: tuple[float, ...]  # against every ground-truth box
    iou: float  # the best of ``ious`` (0 on failure)
    best_gt: int
    center_vox: float | None  # centre distance to the matched box, in voxels of the stored image
    center_mm: float | None  # the same through the affine, when there is one

    @property
    def id(self) -> str:
        return self.item.id

    def group_value(self, key: str) -> str | None:
        value = getattr(self.item, key)
        return None if value is None else str(value)

    def to_dict(self) -> dict[str, Any]:
        """The predictions.jsonl row: enough to re-score the completion and to draw it."""
        it = self.item
        return {
            "id": it.id,
            "dataset": it.dataset,
            "phrase": it.phrase,
            "category": it.category,
            "question_type": it.question_type,
            "ndim": it.ndim,
            "image": it.image,
            "completion": it.completion,
            "protocol": self.protocol,
            "parse_status": self.parse_status,
            "parse_ok": self.parse_ok,
            "parse_flags": list(self.parse_flags),
            "parse_detail": self.parse_detail,
            "format_ok": self.format_ok,
            "box_raw": list(self.box_raw),
            "box_text": _list(self.box_text),
            "box_voxel": _list(self.box_voxel),
            "think_boxes_text": [list(b) for b in self.think_boxes_text],
            "think_boxes_voxel": [list(b) for b in self.think_boxes_voxel],
            "gt_boxes": [list(b) for b in it.gt_boxes],
            "ious": list(self.ious),
            "iou": self.iou,
            "best_gt": self.best_gt,
            "center_vox": self.center_vox,
            "center_mm": self.center_mm,
            "frame": None if it.frame is None else dict(it.frame),
            "codec": it.codec,
            "spatial_shape": _list(it.spatial_shape),
            "spacing": _list(it.spacing),
            "affine": None if it.affine is None else [list(r) for r in it.affine],
        }


def _list(values: Sequence[Any] | None) -> list[Any] | None:
    return None if values is None else list(values)


def _floats(arr: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(arr, dtype=np.float64).ravel())


def _frame_of(item: EvalItem) -> CoordinateFrame | None:
    """The item's frame; an identity frame over ``spatial_shape`` when only the shape is known."""
    try:
        if item.frame is not None:
            frame = CoordinateFrame.from_dict(dict(item.frame))
        elif item.spatial_shape is not None:
            frame = CoordinateFrame(item.spatial_shape)
        else:
            return None
    except BoxError as err:
        raise DataError(f"prediction {item.id!r}: bad frame: {err}") from None
    if frame.ndim != item.ndim:
        raise DataError(f"prediction {item.id!r}: a {frame.ndim}D frame for {item.ndim}D boxes")
    return frame


def _voxel_shape(item: EvalItem, frame: CoordinateFrame | None) -> tuple[int, ...] | None:
    if frame is not None:
        return frame.source_shape
    return item.spatial_shape


def score_item(
    item: EvalItem, protocol: str | ProtocolSpec = "mg3d", *, codec: str | BoxCodec | None = None
) -> ScoredPrediction:
    """Parse and score one completion under ``protocol``. ``codec`` is used when the item names none."""
    spec = get_protocol(protocol)
    gts = item.gt_array()
    if spec.map_frames:
        frame = _frame_of(item)
        name = item.codec or _codec_name(codec)
        box_codec = get_codec(name) if name is not None else None
        if box_codec is not None and frame is None and box_codec.name != "qwen2.5-vl":
            raise DataError(
                f"prediction {item.id!r}: codec {box_codec.name!r} needs the text grid, but the row has "
                "neither 'frame' nor 'spatial_shape'"
            )
        grid = frame.shape if frame is not None else None
        parsed = parse_completion(
            item.completion,
            item.ndim,
            mode=spec.parse_mode,
            codec=box_codec if grid is not None else None,
            grid_shape=grid,
        )
        box_text = parsed.box
        think_text = parsed.think_boxes
        # Only a box from a complete answer counts (as in training's GroundingPrompter.decode); a box the
        # lenient parser recovered from a truncated or tag-less completion is kept in box_text for reading.
        parse_ok = parsed.ok and box_text is not None
        if frame is not None:
            box_voxel = _floats(frame.to_voxel(box_text)[0]) if parse_ok else None
            think_voxel = tuple(_floats(b) for b in frame.to_voxel(think_text)) if think_text else ()
        else:
            box_voxel, think_voxel = (box_text if parse_ok else None), think_text
        shape = _voxel_shape(item, frame)
        if shape is None and spec.iou_kind == "m3d-enclosing":
            raise DataError(
                f"prediction {item.id!r}: the m3d protocol normalises by the image shape; the row has "
                "neither 'frame' nor 'spatial_shape'"
            )
        if parse_ok and shape is not None:
            # The region a box denotes is its part inside the image (MedRPG clamps predictions likewise).
            box_voxel = _floats(clip_boxes(np.asarray(box_voxel)[None], shape)[0])
        if not parse_ok:
            ious = np.zeros(len(gts))
        elif spec.iou_kind == "standard":
            ious = pair_iou(np.repeat(np.asarray(box_voxel)[None], len(gts), axis=0), gts)
        else:
            ious = m3d_enclosing_iou(
                m3d_normalize(np.asarray(box_voxel), shape)[0], m3d_normalize(gts, shape)
            )
    else:
        # medground-r1: the model's numbers against the stored ground truth, no decoding, no rescaling.
        parsed = parse_completion(item.completion, item.ndim, mode="strict")
        box_text = parsed.box
        parse_ok = parsed.ok
        box_voxel = box_text if parse_ok else None
        think_text = think_voxel = parsed.think_boxes
        ious = medground_r1_iou(box_text, gts)
    ious = np.asarray(ious, dtype=np.float64)
    best = _best_match(ious, box_voxel, gts)
    center_vox = center_mm = None
    if box_voxel is not None:
        matched = gts[best][None]
        center_vox = float(center_distance_mm(np.asarray(box_voxel)[None], matched)[0])
        if item.affine is not None:
            try:
                center_mm = float(center_distance_mm(np.asarray(box_voxel)[None], matched, item.affine)[0])
            except BoxError as err:
                raise DataError(f"prediction {item.id!r}: {err}") from None
    return ScoredPrediction(
        item=item,
        protocol=spec.name,
        parse_status=parsed.status.value,
        parse_ok=bool(parse_ok),
        parse_flags=tuple(sorted(f.value for f in parsed.flags)),
        parse_detail=parsed.detail,
        format_ok=parsed.format_ok_strict,
        box_raw=_floats(np.asarray(parsed.raw_numbers)),
        box_text=None if box_text is None else _floats(np.asarray(box_text)),
        box_voxel=box_voxel,
        think_boxes_text=tuple(_floats(np.asarray(b)) for b in think_text),
        think_boxes_voxel=tuple(_floats(np.asarray(b)) for b in think_voxel),
        ious=_floats(ious),
        iou=float(ious[best]),
        best_gt=int(best),
        center_vox=center_vox,
        center_mm=center_mm,
    )


def _best_match(ious: np.ndarray, box: Sequence[float] | None, gts: np.ndarray) -> int:
    """Highest IoU; when every IoU is 0 and there is a box, the ground truth with the nearest centre."""
    if ious.max() > 0 or box is None or len(gts) == 1:
        return int(np.argmax(ious))
    dist = center_distance_mm(np.repeat(np.asarray(box)[None], len(gts), axis=0), gts)
    return int(np.argmin(dist))


# ----------------------------------------------------------------------------------------------------------
# Aggregates
# ----------------------------------------------------------------------------------------------------------


def _check_comparison(comparison: str) -> Comparison:
    if comparison in (">", "gt"):
        return ">"
    if comparison in (">=", "ge", "≥"):
        return ">="
    raise ConfigError(f"comparison must be '>' or '>=', got {comparison!r}")


def _correct(ious: np.ndarray, thresholds: Sequence[float], comparison: Comparison) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64)[:, None]
    return (ious[None, :] > t) if comparison == ">" else (ious[None, :] >= t)


def bootstrap_ci(
    values: np.ndarray,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    max_block: int = 4_000_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap interval of the mean of each row of ``values`` ``(k, n)``; returns ``(low, high)``.

    All rows are resampled with the same index draws (a paired bootstrap), in blocks of at most ``max_block``
    numbers so that memory stays bounded for large test sets. Seeded: the same inputs give the same interval.
    """
    vals = np.atleast_2d(np.asarray(values, dtype=np.float64))
    k, n = vals.shape
    if n == 0:
        raise DataError("bootstrap_ci: no values")
    if not 0 < level < 1:
        raise ConfigError(f"bootstrap level must be in (0, 1), got {level}")
    if n_resamples < 1:
        raise ConfigError(f"n_resamples must be ≥ 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    means = np.empty((k, n_resamples))
    block = max(1, min(n_resamples, max_block // max(1, k * n)))
    for start in range(0, n_resamples, block):
        stop = min(n_resamples, start + block)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[:, start:stop] = vals[:, idx].mean(axis=2)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha], axis=1)
    return low, high


def _tag(t: float) -> str:
    return f"acc@{t:g}"


def _basic(
    rows: Sequence[ScoredPrediction], thresholds: Sequence[float], comparison: Comparison
) -> dict[str, float]:
    ious = np.asarray([r.iou for r in rows], dtype=np.float64)
    correct = _correct(ious, thresholds, comparison)
    out = {"n": float(len(rows)), "mIoU": float(ious.mean())}
    for t, c in zip(thresholds, correct):
        out[_tag(t)] = float(c.mean())
    out["parse_failure_rate"] = float(np.mean([not r.parse_ok for r in rows]))
    return out


def aggregate(
    rows: Sequence[ScoredPrediction],
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    comparison: Comparison = ">=",
    n_bootstrap: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
    group_keys: Sequence[str] = GROUP_KEYS,
) -> dict[str, float]:
    """Flat ``{name: float}`` metrics: overall, bootstrap intervals, parse statistics, centre errors, groups.

    Names: ``n``, ``mIoU``, ``acc@0.5`` …, ``<metric>_ci_low|_ci_high``, ``parse_failure_rate``,
    ``parse_status/<status>`` (fraction of all rows), ``format_ok_rate`` (MedGround-R1's format rule),
    ``center_vox_mean|_median``, ``center_mm_mean|_median`` (rows with a box, and an affine for mm),
    ``<key>/<value>/<metric>`` for every group key (dataset, category, question_type).
    """
    comparison = _check_comparison(comparison)
    if not rows:
        raise DataError("no predictions to score")
    out = _basic(rows, thresholds, comparison)
    if n_bootstrap > 0:
        ious = np.asarray([r.iou for r in rows], dtype=np.float64)
        stacked = np.vstack([ious[None], _correct(ious, thresholds, comparison).astype(np.float64)])
        low, high = bootstrap_ci(stacked, n_resamples=n_bootstrap, level=ci_level, seed=seed)
        for name, lo, hi in zip(["mIoU", *(_tag(t) for t in thresholds)], low, high):
            out[f"{name}_ci_low"] = float(lo)
            out[f"{name}_ci_high"] = float(hi)
    statuses = Counter(r.parse_status for r in rows)
    for status in sorted(statuses):
        out[f"parse_status/{status}"] = statuses[status] / len(rows)
    out["format_ok_rate"] = float(np.mean([r.format_ok for r in rows]))
    for key in ("center_vox", "center_mm"):
        values = [getattr(r, key) for r in rows if getattr(r, key) is not None]
        if values:
            out[f"{key}_mean"] = float(np.mean(values))
            out[f"{key}_median"] = float(np.median(values))
            out[f"{key}_n"] = float(len(values))
    for key in group_keys:
        groups: dict[str, list[ScoredPrediction]] = {}
        for r in rows:
            value = r.group_value(key)
            if value is not None:
                groups.setdefault(value, []).append(r)
        for value in sorted(groups):
            for name, v in _basic(groups[value], thresholds, comparison).items():
                out[f"{key}/{value}/{name}"] = v
    return out


# ----------------------------------------------------------------------------------------------------------
# The accumulator
# ----------------------------------------------------------------------------------------------------------


class GroundingEvaluator:
    """Accumulates scored predictions and computes the metrics of one protocol.

    ``update`` takes ``Grounder`` ``Prediction`` objects, predictions.jsonl rows (dicts), paper-log entries or
    :class:`EvalItem` — one or an iterable. ``compute`` returns ``{name: float}`` (see :func:`aggregate`);
    ``write`` saves predictions.jsonl, metrics.json and metrics.md. ``codec`` is the model family's box codec,
    used for items that do not name one (``None``: numbers are taken as text-grid units).
    """

    def __init__(
        self,
        protocol: str = "mg3d",
        *,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        comparison: Comparison | None = None,
        n_bootstrap: int = 1000,
        ci_level: float = 0.95,
        seed: int = 0,
        codec: str | BoxCodec | None = None,
        group_keys: Sequence[str] = GROUP_KEYS,
    ) -> None:
        self.spec = get_protocol(protocol)
        if comparison is None:
            comparison = self.spec.default_comparison
        comparison = _check_comparison(comparison)
        if self.spec.comparison_fixed and comparison != self.spec.default_comparison:
            raise ConfigError(
                f"the {self.spec.name!r} protocol defines Acc with IoU {self.spec.default_comparison} τ; "
                f"use the 'mg3d' protocol to choose {comparison!r}"
            )
        ts = tuple(float(t) for t in thresholds)
        if not ts or any(not 0.0 < t < 1.0 for t in ts) or len(set(ts)) != len(ts):
            raise ConfigError(f"thresholds must be distinct numbers in (0, 1), got {list(thresholds)!r}")
        if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 0:
            raise ConfigError(f"n_bootstrap must be an integer ≥ 0, got {n_bootstrap!r}")
        unknown = set(group_keys) - set(GROUP_KEYS)
        if unknown:
            raise ConfigError(f"unknown group keys {sorted(unknown)}; known: {list(GROUP_KEYS)}")
        self.thresholds = ts
        self.comparison: Comparison = comparison
        self.n_bootstrap = n_bootstrap
        self.ci_level = float(ci_level)
        self.seed = int(seed)
        self.codec = _codec_name(codec)
        if self.codec is not None:
            get_codec(self.codec)  # fail early on an unknown name
        self.group_keys = tuple(group_keys)
        self.rows: list[ScoredPrediction] = []
        self.duplicates_dropped = 0

    @property
    def protocol(self) -> str:
        return self.spec.name

    def reset(self) -> None:
        self.rows = []
        self.duplicates_dropped = 0

    def __len__(self) -> int:
        return len(self.rows)

    def update(self, predictions: Any) -> list[ScoredPrediction]:
        """Score one prediction or an iterable of them; returns the new rows."""
        if isinstance(predictions, (Mapping, EvalItem)) or hasattr(predictions, "completion"):
            predictions = [predictions]
        new = []
        for obj in predictions:
            item = item_from_prediction(obj, default_id=str(len(self.rows) + len(new)))
            new.append(score_item(item, self.spec, codec=self.codec))
        self.rows.extend(new)
        return new

    def add(self, completion: str, gt_boxes: Sequence[Sequence[float]], **fields: Any) -> ScoredPrediction:
        """Score one completion given as arguments (``ndim``, ``frame``, ``dataset`` … as keywords)."""
        return self.update({"completion": completion, "gt_boxes": gt_boxes, **fields})[0]

    def sync(self) -> int:
        """Gather every rank's rows (``torch.distributed``), dropping repeated ids; returns how many were dropped.

        Lightning's distributed sampler repeats a few samples so that ranks get equal shares; those repeats
        share an id and would otherwise be counted twice. A no-op without an initialised process group.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return 0
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.rows)
        seen: set[str] = set()
        rows: list[ScoredPrediction] = []
        dropped = 0
        for part in gathered:
            for row in part:
                if row.id and row.id in seen:
                    dropped += 1
                    continue
                seen.add(row.id)
                rows.append(row)
        self.rows = rows
        self.duplicates_dropped += dropped
        return dropped

    def compute(self) -> dict[str, float]:
        """The metrics over every row so far (see :func:`aggregate` for the names)."""
        return aggregate(
            self.rows,
            thresholds=self.thresholds,
            comparison=self.comparison,
            n_bootstrap=self.n_bootstrap,
            ci_level=self.ci_level,
            seed=self.seed,
            group_keys=self.group_keys,
        )

    def settings(self) -> dict[str, Any]:
        """The rules the numbers were computed under (written next to them)."""
        return {
            "protocol": self.spec.name,
            "protocol_description": self.spec.description,
            "standard_iou": self.spec.standard,
            "parse_mode": self.spec.parse_mode,
            "comparison": self.comparison,
            "thresholds": list(self.thresholds),
            "n_bootstrap": self.n_bootstrap,
            "ci_level": self.ci_level,
            "seed": self.seed,
            "codec": self.codec,
            "duplicates_dropped": self.duplicates_dropped,
        }

    def report(self) -> dict[str, Any]:
        """``settings()`` plus ``{"metrics": compute()}``: the content of metrics.json."""
        return {**self.settings(), "metrics": self.compute()}

    def write(
        self, out_dir: str | os.PathLike[str], *, gallery: int = 0, image_root: str | None = None
    ) -> dict[str, Path]:
        """Write predictions.jsonl, metrics.json, metrics.md (and a gallery of ``gallery`` cases per tier)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report = self.report()
        paths = {
            "predictions": write_predictions(out / "predictions.jsonl", self.rows),
            "metrics_json": write_metrics_json(out / "metrics.json", report),
            "metrics_md": write_metrics_md(out / "metrics.md", report, self.rows),
        }
        if gallery > 0:
            from mg3d.viz import write_gallery  # matplotlib only when pictures are asked for

            paths["gallery"] = write_gallery(
                self.rows, out / "gallery", k=gallery, metrics=report, image_root=image_root
            )
        return paths


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def _iter_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, object)`` per prediction: JSONL lines, or the ``results`` of a MedGround-R1 / VLM-R1 log."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"cannot read predictions file {path}: {err}") from None
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict) and isinstance(whole.get("results"), list):
            for i, entry in enumerate(whole["results"]):
                yield f"{path}: results[{i}]", entry
            return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield f"{path}:{lineno}", obj


def read_predictions(path: str | os.PathLike[str]) -> list[EvalItem]:
    """Read a predictions file (JSONL, or a MedGround-R1 evaluation log ``{"results": [...]}``) as items.

    Rows without an ``id`` get their position (``"0"``, ``"1"`` …). Duplicate ids are refused.
    """
    p = Path(path)
    items: list[EvalItem] = []
    seen: dict[str, str] = {}
    for where, obj in _iter_rows(p):
        item = item_from_prediction(obj, where=where, default_id=str(len(items)))
        if item.id in seen:
            raise DataError(f"{where}: id {item.id!r} already used at {seen[item.id]}")
        seen[item.id] = where
        items.append(item)
    if not items:
        raise DataError(f"{p}: no predictions in the file")
    return items


def _atomic_write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_predictions(path: str | os.PathLike[str], rows: Iterable[ScoredPrediction]) -> Path:
    """One JSON object per scored prediction (see :meth:`ScoredPrediction.to_dict`)."""
    lines = [json.dumps(r.to_dict(), ensure_ascii=False, allow_nan=False) for r in rows]
    return _atomic_write(Path(path), "\n".join(lines) + ("\n" if lines else ""))


def write_metrics_json(path: str | os.PathLike[str], report: Mapping[str, Any]) -> Path:
    return _atomic_write(Path(path), json.dumps(dict(report), indent=2, allow_nan=False) + "\n")


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def write_metrics_md(
    path: str | os.PathLike[str], report: Mapping[str, Any], rows: Sequence[ScoredPrediction] = ()
) -> Path:
    """A human-readable summary of metrics.json: overall table with intervals, parse reasons, groups."""
    m: Mapping[str, float] = report["metrics"]
    thresholds = report["thresholds"]
    cmp = "≥" if report["comparison"] == ">=" else ">"
    lines = [f"# Grounding evaluation — protocol `{report['protocol']}`", ""]
    if not report.get("standard_iou", True):
        lines += [
            '> **Non-standard metric.** Under this protocol "IoU" is M3D-LaMed\'s intersection over the '
            "*enclosing* box, which is lower than the true IoU. Compare only with numbers reported the same way.",
            "",
        ]
    lines += [
        f"{report['protocol_description']}.",
        "",
        f"n = {int(m['n'])}; Acc@τ counts IoU {cmp} τ; failures score IoU 0 and stay in the denominator; "
        f"{int(report['ci_level'] * 100)}% percentile-bootstrap intervals from {report['n_bootstrap']} resamples "
        f"(seed {report['seed']}).",
        "",
        "| metric | value | CI low | CI high |",
        "| --- | --- | --- | --- |",
    ]
    for name in ["mIoU", *(_tag(t) for t in thresholds)]:
        lines.append(
            f"| {name} | {_fmt(m[name])} | {_fmt(m.get(name + '_ci_low'))} | {_fmt(m.get(name + '_ci_high'))} |"
        )
    lines.append(f"| parse failure rate | {_fmt(m['parse_failure_rate'])} | | |")
    lines.append(f"| strict format rate | {_fmt(m['format_ok_rate'])} | | |")
    for key, unit in (("center_vox", "voxels"), ("center_mm", "mm")):
        if f"{key}_mean" in m:
            lines.append(
                f"| centre error ({unit}, n={int(m[key + '_n'])}) | mean {_fmt(m[key + '_mean'], 2)} | "
                f"median {_fmt(m[key + '_median'], 2)} | |"
            )
    statuses = sorted(k.split("/", 1)[1] for k in m if k.startswith("parse_status/"))
    if statuses:
        lines += ["", "## Parse outcomes", "", "| status | fraction | count |", "| --- | --- | --- |"]
        for s in statuses:
            frac = m[f"parse_status/{s}"]
            lines.append(f"| {s} | {_fmt(frac)} | {round(frac * m['n'])} |")
    failures = Counter(r.parse_detail or r.parse_status for r in rows if not r.parse_ok)
    if failures:
        lines += ["", "Most frequent failure details:", ""]
        lines += [f"- {count} × {detail}" for detail, count in failures.most_common(10)]
    for key in GROUP_KEYS:
        values = sorted({k.split("/")[1] for k in m if k.startswith(f"{key}/") and k.endswith("/n")})
        if not values:
            continue
        header = ["n", "mIoU", *(_tag(t) for t in thresholds), "parse_failure_rate"]
        lines += ["", f"## By {key.replace('_', ' ')}", "", f"| {key} | " + " | ".join(header) + " |"]
        lines.append("| --- " * (len(header) + 1) + "|")
        for v in values:
            cells = [str(int(m[f"{key}/{v}/n"]))] + [_fmt(m[f"{key}/{v}/{h}"]) for h in header[1:]]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return _atomic_write(Path(path), "\n".join(lines) + "\n")


def rescore(
    path: str | os.PathLike[str], protocol: str = "mg3d", **evaluator_kwargs: Any
) -> GroundingEvaluator:
    """Re-score a predictions file without a model: a filled :class:`GroundingEvaluator`."""
    evaluator = GroundingEvaluator(protocol, **evaluator_kwargs)
    evaluator.update(read_predictions(path))
    return evaluator
