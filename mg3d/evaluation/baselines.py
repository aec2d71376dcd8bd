"""Prior-only baselines: the best boxes a policy could write without looking at the image.

A held-out mIoU is read against these. The **best constant box** ignores image and phrase (where targets
usually are); the **best box per phrase** ignores only the image (what the words alone say). Both are fitted on
the *training* split by coordinate ascent on mean IoU over integer coordinates, starting from the median box,
and scored on the held-out split. Boxes must share one frame (the demos' phantoms share one shape, or are
scaled per axis to one grid, under which IoU does not change).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from mg3d.boxes import pair_iou


def mean_iou(box: np.ndarray, targets: np.ndarray) -> float:
    """Mean IoU of one box against every target box (``(N, 2·ndim)``, half-open)."""
    return float(np.mean(pair_iou(np.repeat(np.asarray(box, float)[None], len(targets), 0), targets)))


def best_constant_box(train: np.ndarray, sweeps: int = 3) -> np.ndarray:
    """The box with (locally) the best mean IoU over ``train``: coordinate ascent over integer coordinates."""
    train = np.asarray(train, dtype=float)
    box = np.round(np.median(train, axis=0))
    nd = train.shape[1] // 2
    upper = int(np.ceil(train.max()))
    for _ in range(sweeps):
        for i in range(2 * nd):
            best_value, best_score = box[i], mean_iou(box, train)
            for value in range(upper + 1):
                trial = box.copy()
                trial[i] = value
                if np.all(trial[nd:] > trial[:nd]) and (score := mean_iou(trial, train)) > best_score:
                    best_value, best_score = value, score
            box[i] = best_value
    return box


def best_box_per_key(
    train: np.ndarray, train_keys: Sequence[Hashable], held_out: np.ndarray, held_out_keys: Sequence[Hashable]
) -> float:
    """Mean held-out IoU of the best constant box fitted per key (e.g. per phrase) on ``train``.

    A held-out key never seen in training falls back to the best constant box over all of ``train``.
    """
    train = np.asarray(train, dtype=float)
    keys = np.asarray([str(k) for k in train_keys])
    fallback = best_constant_box(train)
    boxes = {k: best_constant_box(train[keys == k]) for k in sorted(set(keys))}
    ious = [
        mean_iou(boxes.get(str(k), fallback), np.asarray(t, float)[None])
        for t, k in zip(held_out, held_out_keys, strict=True)
    ]
    return float(np.mean(ious)) if ious else float("nan")


def in_one_frame(
    boxes: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]], shape: Sequence[int]
) -> np.ndarray:
    """Boxes of images of different ``shapes`` scaled per axis to one image ``shape`` (IoU does not change).

    The demos' pipelines stretch every image to one model grid, so one box then means the same place in every
    image, as it does on the model's grid.
    """
    ref = np.asarray(shape, dtype=float)
    out = []
    for box, own in zip(boxes, shapes, strict=True):
        scale = ref / np.asarray(own, dtype=float)
        out.append(np.asarray(box, dtype=float) * np.concatenate([scale, scale]))
    return np.asarray(out).reshape(len(out), 2 * len(ref))


def prior_baselines(
    train: tuple[np.ndarray, Sequence[str]], held_out: tuple[np.ndarray, Sequence[str]]
) -> dict[str, float]:
    """Held-out mIoU of the prior-only answers fitted on ``train``: ``constant_box/mIoU`` always,
    ``phrase_box/mIoU`` (the best box per phrase) when the training phrases differ. Each argument is
    ``(boxes in one frame, phrases)``."""
    (train_boxes, train_phrases), (held_boxes, held_phrases) = train, held_out
    out = {"constant_box/mIoU": mean_iou(best_constant_box(train_boxes), held_boxes)}
    if len(set(train_phrases)) > 1:
        out["phrase_box/mIoU"] = best_box_per_key(train_boxes, train_phrases, held_boxes, held_phrases)
    return out
