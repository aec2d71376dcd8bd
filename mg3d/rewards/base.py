"""The one reward signature, the parsed batch every reward shares, the registry and the weighted combiner.

DESIGN.md §4: a reward receives the completions of a batch and the batch's targets and returns one float per
completion, or NaN where it does not apply. Parsing is the expensive, shared part (a completion is read once
per batch, not once per reward), so rewards score a :class:`ParsedBatch`; calling a reward with plain
completions and targets builds one. :class:`RewardSet` applies the config weights exactly as TRL does
(NaN-aware weighted sum; a row where every reward is NaN stays NaN) and reports ``rewards/<name>/mean|std``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from mg3d.boxes import center_distance_mm, pair_giou, pair_iou, validate_boxes
from mg3d.errors import BoxError, ConfigError, DataError
from mg3d.frames import CoordinateFrame
from mg3d.prompts import (
    AbsolutePixelCodec,
    Answer,
    BoxCodec,
    ParsedCompletion,
    get_codec,
    parse_completion,
    read_answer,
)

__all__ = [
    "REWARD_REGISTRY",
    "ParsedBatch",
    "Reward",
    "RewardOutput",
    "RewardSet",
    "RewardTarget",
    "available_rewards",
    "build_reward",
    "combine",
    "completion_text",
    "register_reward",
]

ParseMode = Literal["lenient", "strict"]


# ----------------------------------------------------------------------------------------------------------
# Targets


def _as_image(image: Any, ndim: int, record_id: str) -> np.ndarray:
    """A spatial float32 array in the voxel frame; a leading channel axis (1–4 channels) is averaged away."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == ndim + 1 and arr.shape[0] <= 4:
        arr = arr.mean(axis=0)
    if arr.ndim != ndim:
        raise DataError(
            f"record {record_id!r}: image of shape {arr.shape} is not a {ndim}D array "
            "(or channel-first with at most 4 channels) in the voxel frame"
        )
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        raise DataError(f"record {record_id!r}: image is empty or has non-finite values")
    return np.ascontiguousarray(arr)


@dataclass(frozen=True, eq=False)
class RewardTarget:
    """What a completion is scored against: one record as the batch sees it.

    * ``boxes`` — ground-truth boxes in the **voxel frame** (``(K, 2·ndim)``; several when a phrase has
      several regions, the best match counts).
    * ``frame`` — the :class:`CoordinateFrame` from the voxel frame to the text grid the model saw; ``None``
      means the model saw the voxel grid itself.
    * ``image`` — the image/volume in the voxel frame, spatial axes only (a channel-first array is averaged
      over channels), **in modality units** (HU for CT, raw or normalised intensities otherwise). Only the
      semantic reward reads it; its encoders normalise per image.
    * ``affine`` (``(ndim+1)²``, voxel centres → mm) or ``spacing`` (mm per voxel) give distances in mm.
    * ``phrase`` — the referring text (semantic reward with a text tower).
    * ``unit`` — what ``image``'s numbers are: ``"HU"``, ``"SUV"``, ``"normalised"`` (a preset's stated
      ``[0, 1]`` normalisation, e.g. MR percentiles) or ``None`` (unknown: the semantic reward reads the image
      in its own robust range). :func:`mg3d.rewards.targets.target_from_sample` sets it from the pipeline.
    """

    record_id: str
    boxes: np.ndarray
    frame: CoordinateFrame | None = None
    image: np.ndarray | None = None
    affine: np.ndarray | None = None
    spacing: tuple[float, ...] | None = None
    phrase: str = ""
    unit: str | None = None
    ndim: int = field(init=False)

    def __post_init__(self) -> None:
        rid = str(self.record_id)
        object.__setattr__(self, "record_id", rid)
        try:
            boxes = validate_boxes(self.boxes, what=f"record {rid!r} ground-truth boxes")
        except BoxError as err:
            raise DataError(str(err)) from err
        if boxes.shape[0] == 0:
            raise DataError(f"record {rid!r}: no ground-truth box")
        boxes.setflags(write=False)
        object.__setattr__(self, "boxes", boxes)
        ndim = boxes.shape[1] // 2
        object.__setattr__(self, "ndim", ndim)
        if self.frame is not None:
            if not isinstance(self.frame, CoordinateFrame):
                raise DataError(
                    f"record {rid!r}: frame must be a CoordinateFrame, got {type(self.frame).__name__}"
                )
            if self.frame.ndim != ndim:
                raise DataError(f"record {rid!r}: {ndim}D boxes but a {self.frame.ndim}D coordinate frame")
        if self.image is not None:
            image = _as_image(self.image, ndim, rid)
            if self.frame is not None and image.shape != self.frame.source_shape:
                raise DataError(
                    f"record {rid!r}: image shape {image.shape} differs from the frame's voxel grid "
                    f"{self.frame.source_shape}"
                )
            image.setflags(write=False)
            object.__setattr__(self, "image", image)
        if self.affine is not None:
            aff = np.asarray(self.affine, dtype=np.float64)
            if aff.shape != (ndim + 1, ndim + 1) or not np.all(np.isfinite(aff)):
                raise DataError(f"record {rid!r}: affine must be a finite {(ndim + 1, ndim + 1)} matrix")
            object.__setattr__(self, "affine", aff)
        if self.spacing is not None:
            sp = tuple(float(s) for s in self.spacing)
            if len(sp) != ndim or not all(math.isfinite(s) and s > 0 for s in sp):
                raise DataError(f"record {rid!r}: spacing {self.spacing!r} needs {ndim} positive numbers")
            object.__setattr__(self, "spacing", sp)
        object.__setattr__(self, "phrase", "" if self.phrase is None else str(self.phrase))

    @property
    def voxel_shape(self) -> tuple[int, ...] | None:
        """Spatial shape of the voxel grid, when the frame or the image tells it."""
        if self.frame is not None:
            return self.frame.source_shape
        return None if self.image is None else tuple(self.image.shape)

    @property
    def grid_shape(self) -> tuple[int, ...] | None:
        """Shape of the text grid (what a codec scales by)."""
        return self.frame.shape if self.frame is not None else self.voxel_shape

    def mm_affine(self) -> np.ndarray | None:
        """Voxel → mm matrix for distances: the affine, else a diagonal of the spacing, else None (voxels)."""
        if self.affine is not None:
            return self.affine
        if self.spacing is not None:
            return np.diag([*self.spacing, 1.0])
        return None


# ----------------------------------------------------------------------------------------------------------
# Parsed batch


def completion_text(completion: Any) -> str:
    """The text of a completion in any form TRL hands over; anything unreadable becomes ``""`` (a failure).

    Standard datasets give strings; conversational ones a list holding one assistant message whose content is
    a string or a list of typed blocks (``{"type": "text", "text": …}``).
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, np.ndarray):  # conversational completions read back from parquet / Arrow
        return completion_text(completion.tolist())
    if isinstance(completion, Mapping):
        return completion_text(completion.get("content", ""))
    if isinstance(completion, Sequence) and not isinstance(completion, (bytes, bytearray)):
        parts: list[str] = []
        for item in completion:
            if isinstance(item, Mapping) and item.get("type", "text") == "text" and "text" in item:
                parts.append(str(item["text"]))
            elif isinstance(item, Mapping) and "content" in item:
                if item.get("role", "assistant") == "assistant":
                    parts.append(completion_text(item["content"]))
            elif isinstance(item, str):
                parts.append(item)
        return "".join(parts)
    return ""


def _reduce_best(values: np.ndarray, owners: np.ndarray, n: int, how: Literal["max", "min"]) -> np.ndarray:
    """Best value per owner (completion index) over its flattened (completion, ground truth) pairs; NaN if none."""
    fill = -np.inf if how == "max" else np.inf
    out = np.full(n, fill)
    (np.maximum if how == "max" else np.minimum).at(out, owners, values)
    out[~np.isfinite(out)] = np.nan
    return out


class ParsedBatch:
    """Completions of one batch, each parsed once, with predicted boxes mapped back to the voxel frame.

    ``has_box[i]`` says whether completion ``i`` yields a usable box: a box of the target's dimension from a
    complete ``<answer>`` (``accept_recovered=True`` also accepts a box recovered from a truncated or
    answer-less completion, which the lenient parser flags). Best-match geometry against the ground truth
    (IoU, GIoU, centre distance) is computed once on first use, vectorised over every (completion, box) pair.
    """

    def __init__(
        self,
        completions: Sequence[Any],
        targets: Sequence[RewardTarget],
        *,
        codec: str | BoxCodec | None = "qwen2.5-vl",
        parse_mode: ParseMode = "lenient",
        accept_recovered: bool = False,
    ) -> None:
        if len(completions) != len(targets):
            raise ConfigError(
                f"{len(completions)} completions but {len(targets)} targets: one target per completion"
            )
        if parse_mode not in ("lenient", "strict"):
            raise ConfigError(f"parse_mode must be 'lenient' or 'strict', got {parse_mode!r}")
        for i, target in enumerate(targets):
            if not isinstance(target, RewardTarget):
                raise ConfigError(f"target {i} is a {type(target).__name__}, not a RewardTarget")
        self.targets: list[RewardTarget] = list(targets)
        self.texts: list[str] = [completion_text(c) for c in completions]
        self.codec: BoxCodec | None = get_codec(codec) if isinstance(codec, str) else codec
        self.parse_mode = parse_mode
        self.accept_recovered = accept_recovered
        self.n = len(self.texts)
        self.ndims = np.asarray([t.ndim for t in self.targets], dtype=np.int64)
        answers = [self._read(text, target) for text, target in zip(self.texts, self.targets)]
        self.parsed: list[ParsedCompletion] = [a.parsed for a in answers]
        self.pred_text: list[np.ndarray | None] = [a.box_text for a in answers]
        # in each target's source grid (its frame's source: the voxel grid the ground truth lives in)
        self.pred_voxel: list[np.ndarray | None] = [a.box_source for a in answers]
        self.has_box = np.asarray([b is not None for b in self.pred_voxel], dtype=bool)

    def __len__(self) -> int:
        return self.n

    # -- parsing -----------------------------------------------------------------------------------------
    def _check_grid(self, target: RewardTarget) -> tuple[int, ...] | None:
        grid = target.grid_shape
        codec = self.codec
        if codec is not None and grid is None and not isinstance(codec, AbsolutePixelCodec):
            raise DataError(
                f"record {target.record_id!r}: codec {codec.name!r} scales by the text grid, but the target has "
                "neither a frame nor an image to tell the grid's shape"
            )
        return grid

    def _read(self, text: str, target: RewardTarget) -> Answer:
        """mg3d's one completion → box path (:func:`mg3d.prompts.read_answer`), through the target's frame."""
        grid = self._check_grid(target)
        return read_answer(
            text,
            target.ndim,
            frame=target.frame,
            codec=self.codec,
            mode=self.parse_mode,
            accept_recovered=self.accept_recovered,
            grid_shape=grid,
        )

    def _parse(self, text: str, target: RewardTarget, mode: ParseMode | None = None) -> ParsedCompletion:
        grid = self._check_grid(target)
        return parse_completion(
            text,
            target.ndim,
            mode=mode or self.parse_mode,
            codec=self.codec if grid is not None else None,
            grid_shape=grid,
        )

    # -- shared geometry ---------------------------------------------------------------------------------
    def _pairs(self, ndim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flattened (owner, predicted box, ground-truth box) over completions of dimension ``ndim`` with a box."""
        owners: list[int] = []
        preds: list[np.ndarray] = []
        gts: list[np.ndarray] = []
        for i in np.flatnonzero(self.has_box & (self.ndims == ndim)):
            gt = self.targets[i].boxes
            owners.extend([int(i)] * gt.shape[0])
            preds.append(np.broadcast_to(self.pred_voxel[i], gt.shape))
            gts.append(gt)
        if not owners:
            empty = np.zeros((0, 2 * ndim))
            return np.zeros(0, dtype=np.int64), empty, empty
        return np.asarray(owners, dtype=np.int64), np.concatenate(preds), np.concatenate(gts)

    def best_over_ground_truth(
        self, metric: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], how: Literal["max", "min"]
    ) -> np.ndarray:
        """Best ``metric(owners, preds, gts)`` per completion over its ground-truth boxes; NaN without a box."""
        out = np.full(self.n, np.nan)
        for ndim in (2, 3):
            owners, preds, gts = self._pairs(ndim)
            if owners.size:
                best = _reduce_best(metric(owners, preds, gts), owners, self.n, how)
                sel = np.unique(owners)
                out[sel] = best[sel]
        return out

    @cached_property
    def best_iou(self) -> np.ndarray:
        """Best IoU with any ground-truth box (voxel frame); NaN where there is no usable box."""
        return self.best_over_ground_truth(lambda o, p, g: pair_iou(p, g), "max")

    @cached_property
    def best_giou(self) -> np.ndarray:
        """Best GIoU with any ground-truth box, in [-1, 1]; NaN where there is no usable box."""
        return self.best_over_ground_truth(lambda o, p, g: pair_giou(p, g), "max")

    @cached_property
    def best_center_distance(self) -> np.ndarray:
        """Smallest centre distance to a ground-truth box, in mm when the target has an affine or spacing."""

        def metric(owners: np.ndarray, preds: np.ndarray, gts: np.ndarray) -> np.ndarray:
            out = np.empty(owners.size)
            # One call per distinct target: each has its own affine.
            keys = np.asarray([id(self.targets[o]) for o in owners])
            for key in np.unique(keys):
                sel = keys == key
                target = self.targets[owners[np.argmax(sel)]]
                out[sel] = center_distance_mm(preds[sel], gts[sel], target.mm_affine())
            return out

        return self.best_over_ground_truth(metric, "min")

    @cached_property
    def lenient_parsed(self) -> list[ParsedCompletion]:
        """Lenient parses (the batch's own when it was parsed leniently, else parsed once more, once)."""
        if self.parse_mode == "lenient":
            return self.parsed
        return [self._parse(text, t, "lenient") for text, t in zip(self.texts, self.targets)]

    @cached_property
    def strict_format_ok(self) -> np.ndarray:
        return np.asarray([p.format_ok_strict for p in self.parsed], dtype=bool)


# ----------------------------------------------------------------------------------------------------------
# Rewards and the registry


class Reward(ABC):
    """One reward: ``score(batch)`` returns ``(N,)`` floats within :attr:`value_range`, or NaN where it does not apply.

    Subclasses take only typed keyword arguments in ``__init__`` (LightningCLI builds them from YAML) and
    must never raise on a malformed completion: the parser reports failures as statuses, not exceptions.
    """

    #: registry key, also the default logging name
    key: ClassVar[str] = ""
    #: documented range of the finite values
    value_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

    def __init__(self, *, name: str | None = None) -> None:
        self.name = name or self.key or type(self).__name__
        if not self.name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ConfigError(f"reward name {self.name!r} may hold letters, digits, '_', '-' and '.' only")

    @abstractmethod
    def score(self, batch: ParsedBatch) -> np.ndarray:
        """One value per completion of ``batch``."""

    def __call__(
        self,
        completions: Sequence[Any],
        targets: Sequence[RewardTarget],
        *,
        batch: ParsedBatch | None = None,
        **batch_kwargs: Any,
    ) -> np.ndarray:
        """Score completions against targets (builds the :class:`ParsedBatch` unless one is passed)."""
        if batch is None:
            batch = ParsedBatch(completions, targets, **batch_kwargs)
        values = np.asarray(self.score(batch), dtype=np.float64)
        if values.shape != (batch.n,):
            raise RuntimeError(
                f"reward {self.name!r} returned shape {values.shape} for {batch.n} completions"
            )
        return values

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


REWARD_REGISTRY: dict[str, type[Reward]] = {}


def register_reward(key: str) -> Callable[[type[Reward]], type[Reward]]:
    """Class decorator: make a reward buildable by name (``build_reward(key, **kwargs)``, configs)."""

    def decorate(cls: type[Reward]) -> type[Reward]:
        if key in REWARD_REGISTRY and REWARD_REGISTRY[key] is not cls:
            raise ConfigError(f"reward name {key!r} is already registered to {REWARD_REGISTRY[key].__name__}")
        cls.key = key
        REWARD_REGISTRY[key] = cls
        return cls

    return decorate


def available_rewards() -> list[str]:
    return sorted(REWARD_REGISTRY)


def build_reward(key: str, **kwargs: Any) -> Reward:
    """Instantiate a registered reward; unknown names and arguments are :class:`ConfigError`."""
    cls = REWARD_REGISTRY.get(key)
    if cls is None:
        raise ConfigError(f"unknown reward {key!r}; registered: {available_rewards()}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"reward {key!r}: bad arguments {sorted(kwargs)} ({err})") from err


# ----------------------------------------------------------------------------------------------------------
# Combination and logging


def _nan_std(values: np.ndarray) -> float:
    """TRL's ``nanstd``: Bessel-corrected over the non-NaN values; NaN with fewer than two."""
    finite = values[~np.isnan(values)]
    return float(np.std(finite, ddof=1)) if finite.size > 1 else math.nan


@dataclass(frozen=True)
class RewardOutput:
    """Per-reward columns and their weighted total for one batch."""

    columns: dict[str, np.ndarray]
    weights: dict[str, float]
    total: np.ndarray

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """``rewards/<name>/mean|std`` (NaN-aware, as TRL logs them) plus ``reward`` and ``reward_std``."""
        out: dict[str, float] = {}
        for name, values in self.columns.items():
            finite = values[~np.isnan(values)]
            out[f"{prefix}rewards/{name}/mean"] = float(finite.mean()) if finite.size else math.nan
            out[f"{prefix}rewards/{name}/std"] = _nan_std(values)
        finite = self.total[~np.isnan(self.total)]
        out[f"{prefix}reward"] = float(finite.mean()) if finite.size else math.nan
        out[f"{prefix}reward_std"] = _nan_std(self.total)
        return out

    def as_tensor(self) -> torch.Tensor:
        """``(N, R)`` float32 tensor of the columns, in order (TRL's ``rewards_per_func``)."""
        return torch.as_tensor(np.stack(list(self.columns.values()), axis=1), dtype=torch.float32)


class RewardSet:
    """Several rewards with config weights: one parse per batch, TRL's NaN-aware weighted sum, per-name logs.

    ``total = nansum_j(w_j · r_j)``, and NaN where every reward is NaN (TRL leaves such rows out of the group
    baseline and gives them zero advantage).
    """

    def __init__(
        self,
        rewards: Sequence[Reward],
        weights: Sequence[float] | None = None,
        *,
        codec: str | None = "qwen2.5-vl",
        parse_mode: ParseMode = "lenient",
        accept_recovered: bool = False,
    ) -> None:
        self.rewards = list(rewards)
        if not self.rewards:
            raise ConfigError("a RewardSet needs at least one reward")
        names = [r.name for r in self.rewards]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"reward names must be unique (they are logging keys); repeated: {dupes}")
        if weights is None:
            weights = [1.0] * len(self.rewards)
        if len(weights) != len(self.rewards):
            raise ConfigError(f"{len(weights)} weights for {len(self.rewards)} rewards {names}")
        self.weights = [float(w) for w in weights]
        if not all(math.isfinite(w) for w in self.weights):
            raise ConfigError(f"reward weights must be finite, got {list(weights)}")
        if codec is not None:
            get_codec(codec)  # fail at configuration time, not in the first batch
        self.codec = codec
        self.parse_mode = parse_mode
        self.accept_recovered = accept_recovered

    @classmethod
    def from_config(cls, spec: Mapping[str, Mapping[str, Any] | float | None], **kwargs: Any) -> RewardSet:
        """Build from ``{name: {"weight": w, "type": registry key (default: name), **init args}}``.

        A bare number is a weight. Example: ``{"format": 1.0, "iou_binary": {"threshold": 0.5},
        "semantic": {"weight": 0.5, "mode": "misses"}}``.
        """
        rewards: list[Reward] = []
        weights: list[float] = []
        for name, entry in spec.items():
            if entry is None or isinstance(entry, (int, float)):
                args: dict[str, Any] = {} if entry is None else {"weight": float(entry)}
            elif isinstance(entry, Mapping):
                args = dict(entry)
            else:
                raise ConfigError(
                    f"reward {name!r}: expected a weight or a mapping of arguments, got {entry!r}"
                )
            weights.append(float(args.pop("weight", 1.0)))
            key = str(args.pop("type", name))
            rewards.append(build_reward(key, name=name, **args))
        return cls(rewards, weights, **kwargs)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    def parse(self, completions: Sequence[Any], targets: Sequence[RewardTarget]) -> ParsedBatch:
        return ParsedBatch(
            completions,
            targets,
            codec=self.codec,
            parse_mode=self.parse_mode,
            accept_recovered=self.accept_recovered,
        )

    def __call__(
        self, completions: Sequence[Any], targets: Sequence[RewardTarget], *, batch: ParsedBatch | None = None
    ) -> RewardOutput:
        batch = batch if batch is not None else self.parse(completions, targets)
        columns = {r.name: r(completions, targets, batch=batch) for r in self.rewards}
        return combine(columns, dict(zip(self.names, self.weights)))


def combine(columns: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> RewardOutput:
    """TRL's aggregation: weighted ``nansum`` over rewards; NaN where every reward is NaN."""
    names = list(columns)
    if not names:
        raise ConfigError("combine: no reward columns")
    stacked = np.stack([np.asarray(columns[n], dtype=np.float64) for n in names], axis=1)
    w = np.asarray([weights[n] for n in names], dtype=np.float64)
    total = np.nansum(stacked * w[None, :], axis=1)
    total[np.isnan(stacked).all(axis=1)] = np.nan
    return RewardOutput(
        {n: stacked[:, j].copy() for j, n in enumerate(names)}, {n: float(weights[n]) for n in names}, total
    )
