"""Tokenization plans: the model's vision geometry, token budgets, and what each strategy decides from shapes alone.

A plan is pure geometry (sizes, slice choice, frame steps, token counts) and touches no pixels, so budgets can be
checked cheaply; :mod:`mg3d.tokenization.visual` then applies it. The axis contract and what text z means per
strategy are in :mod:`mg3d.tokenization`'s docstring.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from mg3d.errors import BoxError, ConfigError, DataError
from mg3d.frames import AxisAffineStep, crop_step, pad_step, resize_step

__all__ = [
    "DEFAULT_MAX_VISION_TOKENS",
    "MM_PER_SECOND",
    "NOMINAL_FPS",
    "Strategy",
    "VisionSpec",
    "VisualPlan",
    "distinct_second_per_grid",
    "plan_image",
    "plan_montage",
    "plan_slices",
    "plan_video",
]

Strategy = Literal["image", "video", "slices", "montage"]

#: Default cap on vision tokens per visual (image, volume, slice set or montage).
DEFAULT_MAX_VISION_TOKENS = 1024

#: Millimetres of z that count as one "second" of video for Qwen2.5-VL's time-aligned rotary positions.
#: A temporal patch of ``tp`` slices with spacing ``dz`` then lasts ``tp·dz / MM_PER_SECOND`` seconds, and the
#: model places it at temporal position ``floor(t · tokens_per_second · tp·dz / MM_PER_SECOND)``: positions
#: grow linearly with millimetres. 10 mm makes a 5-mm axial CT look like a 2-fps video, the frame rate
#: Qwen2.5-VL's video training used, so pretrained checkpoints see temporal strides they know.
MM_PER_SECOND = 10.0

#: Frame rate assumed when a volume's z-spacing is unknown (Qwen's default sampling rate).
NOMINAL_FPS = 2.0

#: Qwen's default lower bound on image pixels (``min_pixels`` = 56 × 56, i.e. 4 vision tokens).
_MIN_PIXELS = 56 * 56


# ----------------------------------------------------------------------------------------------------------
# Vision geometry of the model
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionSpec:
    """The model-side numbers tokenization needs: patch sizes, pixel normalisation, temporal-position inputs."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    channels: int = 3
    image_mean: tuple[float, ...] = tuple(OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = tuple(OPENAI_CLIP_STD)
    #: Qwen2.5-VL scales temporal positions by ``second_per_grid_ts``; Qwen2-VL has no such input.
    uses_second_per_grid_ts: bool = True
    #: Qwen2.5-VL's temporal positions per second of video (the vision config's); ``None``: unknown / Qwen2-VL.
    tokens_per_second: float | None = None
    #: Pixel limits of one image from the checkpoint folder's preprocessor (``None``: mg3d's defaults).
    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        for name in ("patch_size", "merge_size", "temporal_patch_size", "channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"VisionSpec.{name} must be a positive integer, got {value!r}")
        if len(self.image_mean) != self.channels or len(self.image_std) != self.channels:
            raise ConfigError(
                f"VisionSpec: image_mean {self.image_mean} / image_std {self.image_std} need {self.channels} values"
            )
        if any(s <= 0 for s in self.image_std):
            raise ConfigError(f"VisionSpec: image_std {self.image_std} must be positive")
        if self.tokens_per_second is not None and not self.tokens_per_second > 0:
            raise ConfigError(
                f"VisionSpec.tokens_per_second must be positive, got {self.tokens_per_second!r}"
            )
        lo, hi = self.min_pixels, self.max_pixels
        if (lo is not None and lo < 1) or (hi is not None and hi < 1) or (lo and hi and lo > hi):
            raise ConfigError(f"VisionSpec: pixel limits min={lo}, max={hi} are not 1 <= min <= max")

    @property
    def factor(self) -> int:
        """Pixels per merged token side (patch × merge, 28 for Qwen-VL): every image side is a multiple of it."""
        return self.patch_size * self.merge_size

    def tokens(self, grid_thw: Sequence[int]) -> int:
        """LLM tokens of a patch grid ``(t, h, w)``."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // (self.merge_size * self.merge_size)

    def image_budget(self, max_vision_tokens: int | None) -> int:
        """Vision tokens one image may take: the config's budget, else the folder's ``max_pixels``, else
        :data:`DEFAULT_MAX_VISION_TOKENS` — the one rule every image path uses (prompter and TRL processor)."""
        if max_vision_tokens is not None:
            return max_vision_tokens
        if self.max_pixels is not None:
            return max(1, self.max_pixels // (self.factor * self.factor))
        return DEFAULT_MAX_VISION_TOKENS

    @property
    def image_min_pixels(self) -> int:
        """The lower bound on one image's pixels: the folder's ``min_pixels``, else Qwen's default 56²."""
        return self.min_pixels if self.min_pixels is not None else _MIN_PIXELS

    @classmethod
    def from_model(cls, model: Any, image_processor: Any = None) -> VisionSpec:
        """Read the sizes from a Qwen2-VL / Qwen2.5-VL model (or its config) and mean/std from its processor."""
        config = getattr(model, "config", model)
        vision = getattr(config, "vision_config", None)
        if vision is None:
            raise ConfigError(f"{type(model).__name__} has no vision_config: not a Qwen-VL model or config")
        mean = tuple(getattr(image_processor, "image_mean", None) or OPENAI_CLIP_MEAN)
        std = tuple(getattr(image_processor, "image_std", None) or OPENAI_CLIP_STD)
        spec = cls(
            patch_size=int(vision.patch_size),
            merge_size=int(vision.spatial_merge_size),
            temporal_patch_size=int(vision.temporal_patch_size),
            channels=int(getattr(vision, "in_channels", getattr(vision, "in_chans", 3))),
            image_mean=tuple(float(v) for v in mean),
            image_std=tuple(float(v) for v in std),
            uses_second_per_grid_ts=getattr(config, "model_type", "") == "qwen2_5_vl",
            tokens_per_second=_tokens_per_second(config),
        )
        if image_processor is not None:
            for name in ("patch_size", "merge_size", "temporal_patch_size"):
                theirs = getattr(image_processor, name, None)
                if theirs is not None and int(theirs) != getattr(spec, name):
                    raise ConfigError(
                        f"image processor {name}={theirs} does not match the model's {getattr(spec, name)}"
                    )
        return spec

    @classmethod
    def from_policy(cls, policy: Any) -> VisionSpec:
        """From an :class:`mg3d.model.Policy` (model + PIL image processor + the folder's pixel limits)."""
        spec = cls.from_model(policy.model, policy.processor)
        limits = getattr(policy, "pixel_limits", None)
        if limits is None:
            return spec
        return dataclasses.replace(spec, min_pixels=int(limits[0]), max_pixels=int(limits[1]))


def _tokens_per_second(config: Any) -> float | None:
    if getattr(config, "model_type", "") != "qwen2_5_vl":
        return None
    value = getattr(config.vision_config, "tokens_per_second", None)
    return float(value) if value is not None else None


def distinct_second_per_grid(second: float, tokens_per_second: float | None, steps: int) -> float:
    """``second`` itself when its ``steps`` temporal positions are distinct, else the least float32 seconds
    per temporal patch that makes them distinct (one position per step).

    Qwen2.5-VL places temporal patch ``i`` at ``⌊i · second · tokens_per_second⌋`` (float32); below one
    position per patch, thin slices collide (2 mm slices with the released ``tokens_per_second = 2``: a stride
    of 0.8, so 32 temporal patches get 25 distinct ids). Collisions are never wanted, so the stride is raised
    to one position per patch; strides of one or more are left exactly as they were.
    """
    if tokens_per_second is None or steps < 2:
        return second

    def distinct(value: float) -> bool:
        idx = (torch.arange(steps, dtype=torch.float32) * torch.tensor(value, dtype=torch.float32)) * float(
            tokens_per_second
        )
        return bool((idx.long().diff() >= 1).all())

    if distinct(second):
        return second
    value = float(torch.tensor(1.0 / tokens_per_second, dtype=torch.float32))
    while not distinct(value):
        value = float(np.nextafter(np.float32(value), np.float32(np.inf)))
    return value


# ----------------------------------------------------------------------------------------------------------
# Plans: pure geometry (sizes, slice choice, frame steps, token counts) — cheap, no pixels
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisualPlan:
    """Everything a strategy decides before touching pixels; ``steps`` map the input grid to the text grid."""

    strategy: Strategy
    in_shape: tuple[int, ...]
    steps: tuple[AxisAffineStep, ...]
    grids: tuple[tuple[int, int, int], ...]  # one (t, h, w) patch grid per image/video placeholder
    num_tokens: int
    resized_shape: tuple[int, ...]  # spatial shape after the resize (x, y[, z]) before padding / tiling
    window: tuple[int, int] | None = None  # z window [start, stop) of the input (slices, montage)
    slice_indices: tuple[int, ...] | None = None
    depth_pad: int = 0
    layout: tuple[int, int] | None = None  # montage (rows, cols)
    second_per_grid_t: float | None = None

    @property
    def text_shape(self) -> tuple[int, ...]:
        return self.steps[-1].out_shape if self.steps else self.in_shape


def _fit(height: int, width: int, spec: VisionSpec, max_tokens: int, min_pixels: int) -> tuple[int, int]:
    """Qwen's ``smart_resize`` (sides multiple of 28, aspect kept, pixels within bounds) for a token cap.

    ``smart_resize`` rounds *up* when it enlarges a small image to ``min_pixels``, which can overshoot a small
    cap; then the floor is dropped to one merged token and it is asked again.
    """
    f = spec.factor
    cap = max_tokens * f * f
    try:
        h, w = smart_resize(height, width, factor=f, min_pixels=min(min_pixels, cap), max_pixels=cap)
        if h * w > cap:
            h, w = smart_resize(height, width, factor=f, min_pixels=f * f, max_pixels=cap)
    except ValueError as err:  # aspect ratio > 200
        raise DataError(f"image of {width}×{height} pixels cannot be tokenized: {err}") from err
    return int(h), int(w)


def _check_budget(max_vision_tokens: int) -> int:
    if isinstance(max_vision_tokens, bool) or not isinstance(max_vision_tokens, int) or max_vision_tokens < 1:
        raise ConfigError(f"max_vision_tokens must be a positive integer, got {max_vision_tokens!r}")
    return max_vision_tokens


def _over_budget(what: str, tokens: int, budget: int, shape: Sequence[int]) -> ConfigError:
    return ConfigError(
        f"{what} of spatial shape {tuple(shape)} needs at least {tokens} vision tokens, above "
        f"max_vision_tokens={budget}; raise the budget or use fewer slices / tiles"
    )


def _with_resize(shape: tuple[int, ...], out: tuple[int, ...]) -> tuple[AxisAffineStep, ...]:
    return () if tuple(out) == tuple(shape) else (resize_step(shape, out),)


def plan_image(
    shape: Sequence[int],
    spec: VisionSpec = VisionSpec(),
    *,
    max_vision_tokens: int = DEFAULT_MAX_VISION_TOKENS,
    min_pixels: int | None = None,
) -> VisualPlan:
    """2D ``(X, Y)`` → resize to multiples of 28 inside the budget, aspect kept (Qwen's ``smart_resize``).

    ``min_pixels`` defaults to the spec's (the checkpoint folder's ``min_pixels``, else Qwen's 56²).
    """
    budget = _check_budget(max_vision_tokens)
    min_pixels = spec.image_min_pixels if min_pixels is None else min_pixels
    shape = tuple(int(v) for v in shape)
    if len(shape) != 2:
        raise DataError(f"image strategy needs a 2D spatial shape (X, Y), got {shape}")
    h, w = _fit(shape[1], shape[0], spec, budget, min_pixels)
    grid = (1, h // spec.patch_size, w // spec.patch_size)
    tokens = spec.tokens(grid)
    if tokens > budget:
        raise _over_budget("image", tokens, budget, shape)
    return VisualPlan("image", shape, _with_resize(shape, (w, h)), (grid,), tokens, (w, h))


def _check_shape3(shape: Sequence[int], strategy: str) -> tuple[int, int, int]:
    out = tuple(int(v) for v in shape)
    if len(out) != 3 or min(out) < 1:
        raise DataError(f"{strategy} strategy needs a 3D spatial shape (X, Y, Z), got {out}")
    return out  # type: ignore[return-value]


def plan_video(
    shape: Sequence[int],
    spec: VisionSpec = VisionSpec(),
    *,
    spacing: Sequence[float] | None = None,
    max_vision_tokens: int = DEFAULT_MAX_VISION_TOKENS,
    min_slice_tokens: int = 64,
    max_slice_tokens: int | None = None,
    max_slices: int | None = None,
    mm_per_second: float = MM_PER_SECOND,
) -> VisualPlan:
    """3D ``(X, Y, Z)`` → a video of ``D'`` axial frames, ``D'`` a multiple of the temporal patch.

    Budget policy: keep every slice (capped at ``max_slices``) and shrink the in-plane size, down to
    ``min_slice_tokens`` tokens per temporal patch; beyond that, keep that in-plane size and resample the depth
    to fit (an M3D-like 32 × 224² for a long CT under the default 1024 tokens). Depth that is kept is padded
    to a multiple of ``tp`` (repeating the last slice, as HF's video processor does).
    ``second_per_grid_t = tp · dz' / mm_per_second`` with ``dz'`` the z-spacing after resampling, so that the
    model's temporal positions grow with millimetres (see :data:`MM_PER_SECOND`), raised where needed so that
    every temporal patch gets its own position (:func:`distinct_second_per_grid`).
    """
    budget = _check_budget(max_vision_tokens)
    nx, ny, nz = _check_shape3(shape, "video")
    if min_slice_tokens < 1 or (max_slice_tokens is not None and max_slice_tokens < 1):
        raise ConfigError(
            f"min_slice_tokens {min_slice_tokens} / max_slice_tokens {max_slice_tokens} must be ≥ 1"
        )
    if mm_per_second <= 0 or not math.isfinite(mm_per_second):
        raise ConfigError(f"mm_per_second must be positive, got {mm_per_second}")
    tp = spec.temporal_patch_size
    cap = budget if max_slice_tokens is None else min(budget, max_slice_tokens)
    depth = nz
    if max_slices is not None:
        if max_slices < tp:
            raise ConfigError(f"max_slices {max_slices} is below the temporal patch {tp}")
        if nz > max_slices:
            depth = max_slices - max_slices % tp
    steps_t = -(-depth // tp)
    h, w = _fit(ny, nx, spec, cap, _MIN_PIXELS)
    per_step = spec.tokens((1, h // spec.patch_size, w // spec.patch_size))
    if steps_t * per_step > budget:
        allowed = budget // steps_t
        if allowed >= min_slice_tokens:
            h, w = _fit(ny, nx, spec, min(cap, allowed), _MIN_PIXELS)
        else:  # keep a useful in-plane size and trade depth for it
            h, w = _fit(ny, nx, spec, min(cap, min_slice_tokens), _MIN_PIXELS)
        per_step = spec.tokens((1, h // spec.patch_size, w // spec.patch_size))
        if steps_t * per_step > budget:
            steps_t = budget // per_step
            if steps_t < 1:
                raise _over_budget("volume", per_step, budget, (nx, ny, nz))
            depth = steps_t * tp
    pad = -depth % tp
    steps = _with_resize((nx, ny, nz), (w, h, depth))
    if pad:
        steps = (*steps, pad_step((w, h, depth), (0, 0, 0), (0, 0, pad)))
    grid = (steps_t, h // spec.patch_size, w // spec.patch_size)
    if spacing is None:
        second = tp / NOMINAL_FPS
    else:
        dz = _check_spacing(spacing)[2] * nz / depth
        second = tp * dz / mm_per_second
    second = distinct_second_per_grid(second, spec.tokens_per_second, steps_t)
    return VisualPlan(
        "video", (nx, ny, nz), steps, (grid,), spec.tokens(grid), (w, h, depth),
        depth_pad=pad, second_per_grid_t=float(second),
    )  # fmt: skip


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise DataError(f"spacing must be three positive millimetre values (x, y, z), got {list(spacing)}")
    return values  # type: ignore[return-value]


def _z_window(nz: int, z_range: tuple[float, float] | None, min_len: int, context: float) -> tuple[int, int]:
    """The z window ``[start, stop)``: the whole depth, or ``context`` × the region's extent centred on it."""
    if z_range is None:
        return 0, nz
    lo, hi = (min(max(float(v), 0.0), float(nz)) for v in z_range)
    if hi <= lo:
        raise BoxError(f"region z-range {list(z_range)} lies outside the volume's {nz} slices")
    length = min(nz, max(min_len, math.ceil((hi - lo) * context)))
    start = math.floor((lo + hi) / 2 - length / 2 + 0.5)
    start = min(max(start, 0), nz - length)
    return start, start + length


def plan_slices(
    shape: Sequence[int],
    spec: VisionSpec = VisionSpec(),
    *,
    num_slices: int = 8,
    z_range: tuple[float, float] | None = None,
    region_context: float = 2.0,
    max_vision_tokens: int = DEFAULT_MAX_VISION_TOKENS,
) -> VisualPlan:
    """3D → ``K`` axial slices as separate images, evenly spaced over the depth or over a window around
    ``z_range`` (input-grid slice units; ``region_context`` × its extent, at least ``K`` slices).

    Slice ``k`` of a window ``[s, s + L)`` is ``s + floor((k + ½)·L/K)``, the centre of the k-th of K equal bins.
    The frame only resizes x and y: text z *is* the input slice index, the number written in ``Slice k:``.
    """
    budget = _check_budget(max_vision_tokens)
    nx, ny, nz = _check_shape3(shape, "slices")
    if num_slices < 1:
        raise ConfigError(f"num_slices must be ≥ 1, got {num_slices}")
    start, stop = _z_window(nz, z_range, num_slices, region_context)
    length = stop - start
    k = min(num_slices, length)
    indices = tuple(start + (2 * i + 1) * length // (2 * k) for i in range(k))  # exact integer bins
    if budget < k:
        raise _over_budget(f"{k} slices", k, budget, (nx, ny, nz))
    h, w = _fit(ny, nx, spec, budget // k, _MIN_PIXELS)
    grid = (1, h // spec.patch_size, w // spec.patch_size)
    tokens = k * spec.tokens(grid)
    if tokens > budget:
        raise _over_budget(f"{k} slices", tokens, budget, (nx, ny, nz))
    return VisualPlan(
        "slices", (nx, ny, nz), _with_resize((nx, ny, nz), (w, h, nz)), (grid,) * k, tokens, (w, h, nz),
        window=(start, stop), slice_indices=indices,
    )  # fmt: skip


def plan_montage(
    shape: Sequence[int],
    spec: VisionSpec = VisionSpec(),
    *,
    num_tiles: int = 16,
    z_range: tuple[float, float] | None = None,
    region_context: float = 2.0,
    max_vision_tokens: int = DEFAULT_MAX_VISION_TOKENS,
) -> VisualPlan:
    """3D → one 2D image of ``K`` tiles (``rows × cols``, row-major), each tile a multiple of 28 pixels.

    Geometry: crop z to the window ``[s, s + L)``, then resize ``(X, Y, L) → (tile_w, tile_h, K)``. The text
    grid is ``(tile_w, tile_h, K)``: a 3D box is ``[x1, y1, t1, x2, y2, t2]`` with x, y pixels inside a tile and
    ``t1 … t2 − 1`` the tiles it covers. Tiles align with merged tokens, so no token straddles two tiles.
    """
    budget = _check_budget(max_vision_tokens)
    nx, ny, nz = _check_shape3(shape, "montage")
    if num_tiles < 1:
        raise ConfigError(f"num_tiles must be ≥ 1, got {num_tiles}")
    start, stop = _z_window(nz, z_range, num_tiles, region_context)
    length = stop - start
    k = min(num_tiles, length)
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    per_tile = budget // (rows * cols)
    if per_tile < 1:
        raise _over_budget(f"a montage of {rows}×{cols} tiles", rows * cols, budget, (nx, ny, nz))
    th, tw = _fit(ny, nx, spec, per_tile, spec.factor * spec.factor)
    grid = (1, rows * th // spec.patch_size, cols * tw // spec.patch_size)
    tokens = spec.tokens(grid)
    if tokens > budget:
        raise _over_budget(f"a montage of {rows}×{cols} tiles", tokens, budget, (nx, ny, nz))
    steps: tuple[AxisAffineStep, ...] = ()
    cropped = (nx, ny, length)
    if (start, stop) != (0, nz):
        steps = (crop_step((nx, ny, nz), (0, 0, start), (nx, ny, stop)),)
    steps = (*steps, *_with_resize(cropped, (tw, th, k)))
    centres = tuple(start + (2 * i + 1) * length // (2 * k) for i in range(k))
    return VisualPlan(
        "montage", (nx, ny, nz), steps, (grid,), tokens, (tw, th, k),
        window=(start, stop), slice_indices=centres, layout=(rows, cols),
    )  # fmt: skip
