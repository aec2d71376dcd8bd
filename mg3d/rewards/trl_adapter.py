"""mg3d rewards as TRL reward functions, for groups that train with TRL's ``GRPOTrainer``.

TRL calls each reward function with keywords: ``prompts``, ``completions``, ``completion_ids``, every dataset
column except ``prompt`` (one value per completion, rows already repeated G times) and a few extras
(``trainer_state``, ``log_extra``, ``log_metric``); it wants one float or ``None`` (not applicable) per
completion (``research/grpo_anchors.md`` §1.3). :class:`TRLReward` turns the dataset columns into
:class:`~mg3d.rewards.base.RewardTarget` objects and returns NaN as ``None``.

Dataset columns read (names configurable with ``columns``):

* ``boxes`` — ground-truth boxes in the voxel frame (required);
* ``id`` — record id (cache key of the semantic reward; falls back to the row's content);
* ``frame`` — the ``CoordinateFrame`` voxel → text grid as a dict or JSON string
  (``CoordinateFrame.to_dict()``). Without it, for a 2D PIL ``image`` and a given ``image_processor``, the
  frame is the Qwen-VL processor's own resize (``smart_resize``), which is what the policy saw;
* ``image`` — a PIL image (converted to grey and transposed to the voxel frame: axis 0 = x = column) or an
  array in the voxel frame; only the semantic reward needs it;
* ``affine`` / ``spacing`` — for millimetre distances; ``text`` — the phrase.

Functions made from one :func:`trl_reward_functions` call share a parse cache, so TRL's one call per
function still parses each batch once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mg3d.errors import ConfigError, DataError
from mg3d.frames import CoordinateFrame, resize_step
from mg3d.rewards.base import ParsedBatch, Reward, RewardSet, RewardTarget, build_reward

__all__ = [
    "DEFAULT_COLUMNS",
    "TRLReward",
    "image_to_voxel_array",
    "qwen_image_frame",
    "target_from_row",
    "trl_reward_functions",
]

#: mg3d field → dataset column name
DEFAULT_COLUMNS: dict[str, str] = {
    "id": "id",
    "boxes": "boxes",
    "frame": "frame",
    "image": "image",
    "affine": "affine",
    "spacing": "spacing",
    "phrase": "text",
}


def image_to_voxel_array(image: Any) -> np.ndarray:
    """A PIL image → grey float32 array in the voxel frame ``(X, Y)`` (axis 0 = column); arrays pass through."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image.Image
        return np.asarray(image.convert("F"), dtype=np.float32).T.copy()
    if isinstance(image, (str, bytes)):
        raise DataError(
            f"image column holds a path or bytes ({str(image)[:60]!r}); load the image into the dataset"
        )
    return np.asarray(image, dtype=np.float32)


def qwen_image_frame(width: int, height: int, image_processor: Any) -> CoordinateFrame:
    """The frame voxel → text grid of a 2D image resized by a Qwen-VL image processor (``smart_resize``)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    size = getattr(image_processor, "size", None)
    min_pixels = getattr(size, "shortest_edge", None) or getattr(image_processor, "min_pixels", None)
    max_pixels = getattr(size, "longest_edge", None) or getattr(image_processor, "max_pixels", None)
    if not (min_pixels and max_pixels):
        raise ConfigError(
            f"{type(image_processor).__name__} does not say its min/max pixels; pass a frame column"
        )
    factor = int(image_processor.patch_size) * int(image_processor.merge_size)
    new_h, new_w = smart_resize(
        int(height), int(width), factor=factor, min_pixels=min_pixels, max_pixels=max_pixels
    )
    shape = (int(width), int(height))
    return CoordinateFrame(shape).then(resize_step(shape, (new_w, new_h)))


def _frame(value: Any, record: str) -> CoordinateFrame | None:
    if value is None or isinstance(value, CoordinateFrame):
        return value
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f"record {record!r}: frame column is not JSON ({err})") from err
    if isinstance(value, Mapping):
        return CoordinateFrame.from_dict(dict(value))
    raise DataError(
        f"record {record!r}: frame must be a CoordinateFrame, dict or JSON string, got {type(value).__name__}"
    )


def _optional(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (list, tuple)) and len(value) == 0:
        return None
    return value


def target_from_row(
    row: Mapping[str, Any], *, columns: Mapping[str, str] | None = None, image_processor: Any = None
) -> RewardTarget:
    """One dataset row (column → value) → a :class:`RewardTarget`; a bad row raises DataError naming it."""
    cols = {**DEFAULT_COLUMNS, **(columns or {})}
    if cols["boxes"] not in row:
        raise DataError(
            f"dataset row has no {cols['boxes']!r} column (ground-truth boxes); columns: {sorted(row)}"
        )
    boxes = row[cols["boxes"]]
    record = str(row.get(cols["id"], f"row-with-boxes-{boxes!r:.60}"))
    image_value = _optional(row.get(cols["image"]))
    image = None if image_value is None else image_to_voxel_array(image_value)
    frame = _frame(_optional(row.get(cols["frame"])), record)
    if frame is None and image is not None and image.ndim == 2 and image_processor is not None:
        frame = qwen_image_frame(image.shape[0], image.shape[1], image_processor)
    return RewardTarget(
        record_id=record,
        boxes=np.asarray(boxes, dtype=np.float64),
        frame=frame,
        image=image,
        affine=_optional(row.get(cols["affine"])),
        spacing=_optional(row.get(cols["spacing"])),
        phrase=row.get(cols["phrase"]) or "",
    )


class _ParseCache:
    """The last batch parsed, reused while TRL calls the other functions on the same completions list."""

    def __init__(self) -> None:
        self.completions: Any = None
        self.batch: ParsedBatch | None = None


class TRLReward:
    """A mg3d reward with TRL's reward-function signature; NaN (does not apply) becomes ``None``."""

    def __init__(
        self,
        reward: Reward | str,
        *,
        codec: str | None = "qwen2.5-vl",
        parse_mode: str = "lenient",
        accept_recovered: bool = False,
        columns: Mapping[str, str] | None = None,
        image_processor: Any = None,
        cache: _ParseCache | None = None,
        **reward_kwargs: Any,
    ) -> None:
        self.reward = build_reward(reward, **reward_kwargs) if isinstance(reward, str) else reward
        self.__name__ = self.reward.name  # TRL logs rewards/<__name__>/mean
        self.codec = codec
        self.parse_mode = parse_mode
        self.accept_recovered = accept_recovered
        self.columns = dict(columns or {})
        self.image_processor = image_processor
        self.cache = cache if cache is not None else _ParseCache()

    def targets(self, n: int, kwargs: Mapping[str, Any]) -> list[RewardTarget]:
        """One target per completion from TRL's column lists; identical rows share one target object."""
        names = [k for k, v in kwargs.items() if isinstance(v, list) and len(v) == n]
        built: dict[tuple[Any, ...], RewardTarget] = {}
        out = []
        id_col = {**DEFAULT_COLUMNS, **self.columns}["id"]
        for i in range(n):
            row = {k: kwargs[k][i] for k in names}
            key = (str(row.get(id_col)), repr(row.get({**DEFAULT_COLUMNS, **self.columns}["boxes"])))
            if key not in built or id_col not in row:
                built[key] = target_from_row(row, columns=self.columns, image_processor=self.image_processor)
            out.append(built[key])
        return out

    def parse(self, completions: Sequence[Any], kwargs: Mapping[str, Any]) -> ParsedBatch:
        if self.cache.completions is completions and self.cache.batch is not None:
            return self.cache.batch
        batch = ParsedBatch(
            completions,
            self.targets(len(completions), kwargs),
            codec=self.codec,
            parse_mode=self.parse_mode,  # type: ignore[arg-type]
            accept_recovered=self.accept_recovered,
        )
        self.cache.completions, self.cache.batch = completions, batch  # holding the list keeps its id unique
        return batch

    def __call__(
        self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] | None = None, **kwargs: Any
    ) -> list[float | None]:
        if completions is None:
            raise ConfigError(f"reward {self.__name__!r}: TRL passes completions=…; none given")
        values = self.reward.score(self.parse(completions, kwargs))
        return [None if math.isnan(v) else float(v) for v in np.asarray(values, dtype=np.float64)]

    def __repr__(self) -> str:
        return f"TRLReward({self.reward!r})"


def trl_reward_functions(
    rewards: RewardSet | Sequence[Reward] | Mapping[str, Any], **kwargs: Any
) -> tuple[list[TRLReward], list[float]]:
    """Reward functions and weights for ``GRPOTrainer(reward_funcs=…)`` / ``GRPOConfig(reward_weights=…)``.

    ``rewards``: a :class:`RewardSet` (its weights and parse options are used), a list of rewards (weight 1)
    or a ``RewardSet.from_config`` mapping. The functions share one parse per batch.
    """
    if isinstance(rewards, Mapping):
        rewards = RewardSet.from_config(rewards)
    if isinstance(rewards, RewardSet):
        kwargs = {
            "codec": rewards.codec,
            "parse_mode": rewards.parse_mode,
            "accept_recovered": rewards.accept_recovered,
            **kwargs,
        }
        members, weights = rewards.rewards, list(rewards.weights)
    else:
        members, weights = list(rewards), [1.0] * len(rewards)
    cache = _ParseCache()
    return [TRLReward(r, cache=cache, **kwargs) for r in members], weights
