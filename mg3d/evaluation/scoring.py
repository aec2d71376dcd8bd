"""Scoring one completion: the item a prediction row holds, and its score under a protocol.

The one scoring convention of mg3d (box read with :func:`mg3d.prompts.read_answer`, clipped to the image,
best match over the ground truth) — used by held-out evaluation in ``fit``, ``scripts/evaluate.py`` and
the ``Grounder``'s output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mg3d.boxes import center_distance_mm, clip_boxes, pair_iou, validate_boxes
from mg3d.errors import BoxError, DataError
from mg3d.evaluation.protocols import (
    ProtocolSpec,
    get_protocol,
    m3d_enclosing_iou,
    m3d_normalize,
    medground_r1_iou,
)
from mg3d.frames import CoordinateFrame
from mg3d.grounding import Predicted
from mg3d.prompts import BoxCodec, get_codec, parse_completion, read_answer


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
        answer = read_answer(
            item.completion,
            item.ndim,
            frame=frame,
            codec=box_codec,
            mode=spec.parse_mode,
            accept_native=spec.accept_native,
        )
        parsed = answer.parsed
        # A box the lenient parser recovered from a truncated or tag-less completion is kept in box_text for
        # reading; only a box from a complete answer is scored (read_answer, as in training and inference).
        box_text = parsed.box
        think_text = parsed.think_boxes
        think_voxel = tuple(_floats(b) for b in answer.think_boxes_source)
        parse_ok = answer.box_source is not None
        shape = _voxel_shape(item, frame)
        if shape is None and spec.iou_kind == "m3d-enclosing":
            raise DataError(
                f"prediction {item.id!r}: the m3d protocol normalises by the image shape; the row has "
                "neither 'frame' nor 'spatial_shape'"
            )
        box_voxel = None
        if answer.box_source is not None:
            box_voxel = _floats(box_in_image(answer.box_source, shape))
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


def box_in_image(box: Sequence[float] | np.ndarray, shape: Sequence[int] | None) -> np.ndarray:
    """The region a predicted box denotes: its part inside the image (MedRPG clamps predictions likewise).

    The one scoring convention of mg3d: held-out evaluation in ``fit``, ``scripts/evaluate.py`` and the
    ``Grounder``'s output all clip this way (``shape=None``: the image size is unknown, nothing to clip to).
    """
    arr = np.asarray(box, dtype=np.float64)
    return arr if shape is None else clip_boxes(arr[None], shape)[0]


def score_predicted(
    predicted: Predicted, *, codec: str, protocol: str | ProtocolSpec = "mg3d"
) -> list[ScoredPrediction]:
    """Score a :func:`mg3d.grounding.predict` result exactly as ``scripts/evaluate.py`` scores its rows.

    Each completion becomes the :class:`EvalItem` a prediction file would hold (completion, ground truth,
    ``voxel_to_text`` frame, codec) and goes through :func:`score_item`: training-time evaluation and
    offline evaluation cannot disagree.
    """
    batch = predicted.batch
    rows = []
    for i, text in enumerate(predicted.texts):
        sample = batch.samples[i] if batch.samples else {}
        affine = sample.get("affine")
        item = EvalItem(
            id=batch.ids[i],
            completion=text,
            gt_boxes=tuple(tuple(float(v) for v in box) for box in batch.gt_boxes[i]),
            ndim=batch.ndims[i],
            dataset=sample.get("dataset"),
            phrase=batch.texts[i],
            frame=batch.voxel_to_text[i].to_dict(),
            affine=None
            if affine is None
            else tuple(tuple(float(v) for v in row) for row in np.asarray(affine)),
            codec=codec,
        )
        rows.append(score_item(item, protocol))
    return rows


def _best_match(ious: np.ndarray, box: Sequence[float] | None, gts: np.ndarray) -> int:
    """Highest IoU; when every IoU is 0 and there is a box, the ground truth with the nearest centre."""
    if ious.max() > 0 or box is None or len(gts) == 1:
        return int(np.argmax(ious))
    dist = center_distance_mm(np.repeat(np.asarray(box)[None], len(gts), axis=0), gts)
    return int(np.argmin(dist))
