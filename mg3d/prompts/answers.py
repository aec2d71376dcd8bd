"""From a completion to the box it answers, in the text grid and back in the source grid of a frame.

The one completion → box path of mg3d: training rewards (:class:`mg3d.rewards.ParsedBatch`), held-out
evaluation during ``fit``, ``scripts/evaluate.py`` (:func:`mg3d.evaluation.score_item`) and inference
(``Grounder``, bundles) all read answers with :func:`read_answer`, so a completion gives the same box
everywhere. Only a box from a complete answer counts by default; ``accept_recovered`` also takes the box the
lenient parser recovers from a truncated or tag-less completion (a reward option).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mg3d.errors import Mg3dError
from mg3d.frames import CoordinateFrame
from mg3d.prompts.codecs import BoxCodec
from mg3d.prompts.parser import (
    MAX_ANSWER_BOXES,
    ParsedCompletion,
    ParseFlag,
    ParseMode,
    parse_answer_boxes,
    parse_completion,
)

__all__ = ["Answer", "read_answer", "read_answer_boxes", "usable_box"]


@dataclass(frozen=True)
class Answer:
    """One completion read back.

    ``box_text`` is the answer's box on the text grid the model saw, ``box_source`` the same box mapped
    through the frame to the frame's *source* grid (the original voxel frame for a prompt's ``voxel_to_text``
    frame, the pipeline grid for a reward target's ``grid_to_text`` frame). Both are ``None`` when the
    completion gives no usable box.
    """

    parsed: ParsedCompletion
    box_text: np.ndarray | None
    box_source: np.ndarray | None
    think_boxes_source: tuple[np.ndarray, ...] = ()

    @property
    def ok(self) -> bool:
        return self.box_source is not None


def _valid(box: np.ndarray) -> bool:
    d = box.size // 2
    return bool(np.all(np.isfinite(box)) and np.all(box[d:] > box[:d]))


def usable_box(
    parsed: ParsedCompletion, *, accept_recovered: bool = False, accept_native: bool = False
) -> np.ndarray | None:
    """The parse's box when it counts: from a complete answer (or recovered, if accepted), finite, non-empty.

    ``accept_native`` also counts a tag-less Qwen-native JSON answer (``[{"bbox_2d": [...]}]``, what a
    pretrained Qwen2.5-VL writes zero-shot): the ``qwen-native`` evaluation protocol, so a baseline of a
    pretrained checkpoint is measurable. Strict mode never accepts it. Strict mode hands boxes back
    unvalidated (the all-zero failure box, reversed corners), hence the check.
    """
    native = accept_native and parsed.mode == "lenient" and ParseFlag.NATIVE_JSON in parsed.flags
    if parsed.box is None or not (parsed.ok or native or (accept_recovered and parsed.mode == "lenient")):
        return None
    box = np.asarray(parsed.box, dtype=np.float64)
    return box if _valid(box) else None


def _to_source(frame: CoordinateFrame | None, boxes: np.ndarray) -> np.ndarray | None:
    if frame is None:
        return boxes
    try:
        return frame.to_voxel(boxes)
    except Mg3dError:  # malformed output never raises
        return None


def read_answer(
    text: str,
    ndim: int,
    *,
    frame: CoordinateFrame | None,
    codec: BoxCodec | None,
    mode: ParseMode = "lenient",
    accept_recovered: bool = False,
    accept_native: bool = False,
    grid_shape: Sequence[int] | None = None,
) -> Answer:
    """Parse ``text`` and map its box through ``frame`` (text grid → the frame's source grid).

    The codec scales by the text grid: ``frame.shape``, or ``grid_shape`` when there is no frame (the model
    saw the source grid itself). Without either the numbers are taken as text-grid units. Never raises on
    any completion text.
    """
    grid = (
        tuple(frame.shape) if frame is not None else (tuple(grid_shape) if grid_shape is not None else None)
    )
    parsed = parse_completion(
        text, ndim, mode=mode, codec=codec if grid is not None else None, grid_shape=grid
    )
    think: tuple[np.ndarray, ...] = ()
    if parsed.think_boxes:
        mapped = _to_source(frame, np.asarray(parsed.think_boxes, dtype=np.float64))
        think = () if mapped is None else tuple(mapped)
    box_text = usable_box(parsed, accept_recovered=accept_recovered, accept_native=accept_native)
    if box_text is None:
        return Answer(parsed, None, None, think)
    mapped = _to_source(frame, box_text[None])
    box_source = None if mapped is None or not _valid(mapped[0]) else mapped[0]
    return Answer(parsed, box_text, box_source, think)


def read_answer_boxes(
    text: str,
    ndim: int,
    *,
    frame: CoordinateFrame | None,
    codec: BoxCodec | None,
    grid_shape: Sequence[int] | None = None,
    max_boxes: int = MAX_ANSWER_BOXES,
) -> np.ndarray:
    """Every box of a completion's answer (:func:`mg3d.prompts.parser.parse_answer_boxes`), mapped through
    ``frame`` to its source grid as :func:`read_answer` maps the one box: ``(K, 2·ndim)``, ``K = 0`` when the
    completion has no complete answer with a usable box. Never raises on any completion text."""
    grid = (
        tuple(frame.shape) if frame is not None else (tuple(grid_shape) if grid_shape is not None else None)
    )
    boxes = parse_answer_boxes(
        text, ndim, codec=codec if grid is not None else None, grid_shape=grid, max_boxes=max_boxes
    )
    empty = np.zeros((0, 2 * ndim), dtype=np.float64)
    if not boxes:
        return empty
    mapped = _to_source(frame, np.asarray(boxes, dtype=np.float64))
    if mapped is None:
        return empty
    keep = [box for box in mapped if _valid(box)]
    return np.asarray(keep, dtype=np.float64).reshape(-1, 2 * ndim)
