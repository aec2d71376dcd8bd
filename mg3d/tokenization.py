"""Images and volumes → Qwen-VL model inputs, with a token budget and an exact :class:`CoordinateFrame`.

Axis contract (DESIGN.md §2)
----------------------------
The input is what the data pipeline hands over: a float tensor with intensities already in ``[0, 1]`` (the
modality preset did that), channel-first in MONAI's voxel-axis order, already in *display orientation*:

* 2D ``(C, X, Y)``: axis 0 = x = image column (left → right), axis 1 = y = image row (top → bottom).
* 3D ``(C, X, Y, Z)``: x, y as above for every axial slice, axis 2 = z = slice index.

and a ``CoordinateFrame`` whose ``.shape`` is the tensor's spatial shape. Orienting to the display convention
(radiographs as read, axial CT in radiological convention) is the data pipeline's job; tokenization only
resizes, resamples depth, selects slices, tiles, pads and patch-aligns, and appends each of those operations to
the frame as an exact axis-aligned step. The text grid therefore keeps the axis order ``(x, y[, z])`` (no
permutation): the picture the model sees is ``slice[:, :, z].T`` with ``rows = y`` and ``cols = x``, and
``frame.to_text(voxel_boxes)`` gives boxes in the integer grid the model writes about. What z means per strategy:

* ``image`` (2D): no z. Text grid = pixels of the resized image.
* ``video`` (3D default): depth is time. Text z = slice index of the frames fed to the model, after depth
  resampling (only when the budget needs it) and the padding to a multiple of the temporal patch.
* ``slices``: K slices as separate images, each labelled ``Slice k:``. Text z = the input tensor's own slice
  index, i.e. exactly the numbers written in the prompt (the frame has no z step).
* ``montage``: K slices tiled into one image. Text x, y = pixels *within a tile*, text z = tile number (0 = top
  left, row-major). Tile t shows the z-bin ``[s + t·L/K, s + (t+1)·L/K)`` of the input window ``[s, s + L)``,
  resampled with anti-aliasing, so the tile index is an exact (crop + resize) map of z.

Pixels are prepared as Qwen2-VL's image processor does (grey → RGB, ``(x − mean) / std`` with the processor's
image mean/std) and cut into patches by :func:`patchify`, written here because the torchvision-backed
transformers processors cannot be imported with the pinned CPU torch; it is bit-identical to
``Qwen2VLImageProcessorPil`` on 2D images (tests/test_tokenization.py). :func:`build_model_inputs` then does what
the HF processor's ``__call__`` does: expand placeholders, left-pad, and build ``mm_token_type_ids``, which
Qwen2.5-VL needs to compute its 3D rotary positions at all (without it, it silently uses 1D positions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from mg3d.boxes import AxisAffineStep, CoordinateFrame, crop_step, pad_step, resize_step
from mg3d.errors import BoxError, ConfigError, DataError
from mg3d.model import MM_TYPE_IMAGE, MM_TYPE_VIDEO

__all__ = [
    "DEFAULT_MAX_VISION_TOKENS",
    "MM_PER_SECOND",
    "NOMINAL_FPS",
    "Strategy",
    "TokenizedVisual",
    "VisionSpec",
    "VisualPlan",
    "VisualTokenizer",
    "build_mm_token_type_ids",
    "build_model_inputs",
    "normalize_frames",
    "patchify",
    "plan_image",
    "plan_montage",
    "plan_slices",
    "plan_video",
    "tokenize_image",
    "tokenize_montage",
    "tokenize_slices",
    "tokenize_video",
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

#: Intensities may overshoot [0, 1] by this much (rounding in upstream resampling) before we call it an error.
_RANGE_SLACK = 1e-3


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

    @property
    def factor(self) -> int:
        """Pixels per merged token side (patch × merge, 28 for Qwen-VL): every image side is a multiple of it."""
        return self.patch_size * self.merge_size

    def tokens(self, grid_thw: Sequence[int]) -> int:
        """LLM tokens of a patch grid ``(t, h, w)``."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // (self.merge_size * self.merge_size)

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
        """From an :class:`mg3d.model.Policy` (model + PIL image processor)."""
        return cls.from_model(policy.model, policy.processor)


# ----------------------------------------------------------------------------------------------------------
# Pixels: normalisation and the patchifier
# ----------------------------------------------------------------------------------------------------------


def normalize_frames(frames: torch.Tensor, spec: VisionSpec) -> torch.Tensor:
    """``(T, C, H, W)`` intensities in [0, 1] → float32 ``(T, spec.channels, H, W)`` model pixels.

    Grey is replicated to RGB (what the HF processor's ``convert_rgb`` does) and each channel becomes
    ``(x - mean) / std`` in float32, the same IEEE operations as transformers' ``normalize``, so the result is
    bit-identical to ``Qwen2VLImageProcessorPil`` for the same [0, 1] pixels.
    """
    if frames.ndim != 4:
        raise DataError(f"frames must be (T, C, H, W), got shape {tuple(frames.shape)}")
    x = frames.to(torch.float32)
    if x.shape[1] != spec.channels:
        if x.shape[1] != 1:
            raise DataError(
                f"frames have {x.shape[1]} channels; the model takes {spec.channels} (or 1, replicated)"
            )
        x = x.expand(-1, spec.channels, -1, -1)
    mean = torch.tensor(spec.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.image_std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean) / std


def patchify(
    frames: torch.Tensor, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T, C, H, W)`` → ``pixel_values (t·h·w, C·tp·p·p)`` and ``grid_thw = (t, h, w)`` in Qwen-VL's order.

    Patches come out merge-window by merge-window (each ``merge × merge`` block of patches is contiguous, row
    major inside and across blocks, one temporal patch after another); inside a patch the values are ordered
    channel, time, row, column. ``T == 1`` is an image: the frame is repeated ``tp`` times, as the HF image
    processor does. Otherwise ``T`` must already be a multiple of ``tp`` (the caller pads and records it in the
    frame, so no slice appears that the geometry does not know about).
    """
    if frames.ndim != 4:
        raise DataError(f"patchify: frames must be (T, C, H, W), got shape {tuple(frames.shape)}")
    t_in, c, h, w = (int(v) for v in frames.shape)
    p, m, tp = patch_size, merge_size, temporal_patch_size
    if h % (p * m) or w % (p * m):
        raise DataError(f"patchify: frame size {h}×{w} is not a multiple of patch × merge = {p * m}")
    if t_in == 1:
        frames = frames.expand(tp, -1, -1, -1)
    elif t_in % tp:
        raise DataError(
            f"patchify: {t_in} frames is not a multiple of the temporal patch {tp}; pad the depth first"
        )
    t = frames.shape[0] // tp
    gh, gw = h // p, w // p
    x = frames.reshape(t, tp, c, gh // m, m, p, gw // m, m, p)
    # (t, gh/m, gw/m, m_h, m_w, C, tp, p_h, p_w): merge windows contiguous, then the per-patch layout.
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = x.reshape(t * gh * gw, c * tp * p * p)
    return pixel_values, torch.tensor([t, gh, gw], dtype=torch.long)


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
    min_pixels: int = _MIN_PIXELS,
) -> VisualPlan:
    """2D ``(X, Y)`` → resize to multiples of 28 inside the budget, aspect kept (Qwen's ``smart_resize``)."""
    budget = _check_budget(max_vision_tokens)
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
    model's temporal positions grow with millimetres (see :data:`MM_PER_SECOND`).
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


# ----------------------------------------------------------------------------------------------------------
# Tokenized visuals
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TokenizedVisual:
    """One image or volume ready for the model, with the frame that maps its boxes to and from the text grid.

    ``pixel_inputs`` holds ``pixel_values`` + ``image_grid_thw`` (image, slices, montage) or
    ``pixel_values_videos`` + ``video_grid_thw`` (+ ``second_per_grid_ts`` for Qwen2.5-VL) (video).
    ``content`` are the chat-message parts for the visual (one placeholder per image/video, plus the
    ``Slice k:`` labels of the slices strategy), in the same layout as ``mg3d.prompts.build_messages``.
    """

    strategy: Strategy
    pixel_inputs: dict[str, torch.Tensor]
    num_tokens: int
    frame: CoordinateFrame
    content: tuple[dict[str, Any], ...]
    plan: VisualPlan
    slice_indices: tuple[int, ...] | None = None

    @property
    def modality(self) -> Literal["image", "video"]:
        return "video" if "video_grid_thw" in self.pixel_inputs else "image"

    @property
    def grid_thw(self) -> torch.Tensor:
        return self.pixel_inputs["video_grid_thw" if self.modality == "video" else "image_grid_thw"]

    @property
    def text_shape(self) -> tuple[int, ...]:
        """Size of the text grid ``(x, y[, z])``: the ``grid_shape`` a box codec needs."""
        return self.frame.shape

    @property
    def ndim(self) -> int:
        return self.frame.ndim

    def prompt_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``mg3d.prompts.build_messages`` / ``build_instruction`` that describe this visual."""
        kwargs: dict[str, Any] = {"visual": self.strategy}
        if self.strategy in ("slices", "montage"):
            kwargs["slice_indices"] = list(self.slice_indices or ())
        if self.strategy == "video":
            kwargs["depth"] = int(self.frame.shape[2])
        return kwargs


def _as_tensor(data: torch.Tensor | np.ndarray, ndim: int, what: str) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(data)) if isinstance(data, np.ndarray) else data
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{what}: expected a torch tensor or numpy array, got {type(data).__name__}")
    if hasattr(x, "as_tensor"):  # MONAI MetaTensor: plain tensor, so no meta-tracking work downstream
        x = x.as_tensor()
    if x.ndim != ndim + 1:
        axes = "(C, X, Y)" if ndim == 2 else "(C, X, Y, Z)"
        raise DataError(f"{what}: expected a channel-first {ndim}D tensor {axes}, got shape {tuple(x.shape)}")
    if not (x.is_floating_point()):
        raise DataError(f"{what}: expected float intensities in [0, 1], got dtype {x.dtype}")
    x = x.detach().to(torch.float32)
    if x.numel() == 0:
        raise DataError(f"{what}: empty tensor of shape {tuple(x.shape)}")
    lo, hi = float(x.min()), float(x.max())
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
        raise DataError(
            f"{what}: intensities span [{lo:.4g}, {hi:.4g}]; tokenization expects [0, 1] "
            "(apply the modality preset's normalisation first)"
        )
    return x


def _check_frame(frame: CoordinateFrame, x: torch.Tensor, what: str) -> None:
    if tuple(frame.shape) != tuple(x.shape[1:]):
        raise DataError(
            f"{what}: the CoordinateFrame ends at grid {frame.shape}, the tensor's spatial shape is "
            f"{tuple(x.shape[1:])}; the data pipeline must append every spatial step it applies"
        )


def _check_channels(x: torch.Tensor, spec: VisionSpec, what: str) -> None:
    if x.shape[0] not in (1, spec.channels):
        raise DataError(f"{what}: {x.shape[0]} channels; the model takes 1 (grey) or {spec.channels}")


def _resize(x: torch.Tensor, out: Sequence[int]) -> torch.Tensor:
    """Resample ``(C, X, Y[, Z])`` to ``out`` on cell-centred grids (``align_corners=False``), the geometry
    ``resize_step`` assumes. In-plane: anti-aliased bicubic, the filter Qwen's processors use (PIL's); along z:
    anti-aliased linear, so a shrunk depth averages its slabs instead of skipping slices. Identity sizes return
    the input untouched (bit-exact).

    Written on ``torch.nn.functional.interpolate`` rather than MONAI ``Resize``: MONAI's Gaussian anti-aliasing
    took ~1.5 s on one 1955×1841 radiograph, and torch has no anti-aliased 3D mode, so z is a separate pass.
    """
    out = tuple(int(v) for v in out)
    if tuple(x.shape[1:]) == out:
        return x
    c = x.shape[0]
    if x.ndim == 3:
        y = F.interpolate(x[None], size=out, mode="bicubic", antialias=True, align_corners=False)[0]
        return y.clamp_(0.0, 1.0)
    (nx, ny, nz), (w, h, d) = x.shape[1:], out
    if nz != d:  # first, so a shrunk depth leaves fewer planes for the (costlier) in-plane pass
        # (1, C·X, Y, Z) → (1, C·X, Y, d): Y keeps its size, and an unscaled axis is an exact identity.
        x = F.interpolate(x.reshape(1, c * nx, ny, nz), size=(ny, d), mode="bilinear", antialias=True,
                          align_corners=False).reshape(c, nx, ny, d)  # fmt: skip
    if (nx, ny) != (w, h):
        planes = x.permute(0, 3, 1, 2).reshape(c * d, 1, nx, ny)
        planes = F.interpolate(planes, size=(w, h), mode="bicubic", antialias=True, align_corners=False)
        x = planes.reshape(c, d, w, h).permute(0, 2, 3, 1).clamp_(0.0, 1.0)
    return x.contiguous()


def _image_inputs(images: Sequence[torch.Tensor], spec: VisionSpec) -> dict[str, torch.Tensor]:
    """Display-layout images ``(C, H, W)`` → ``pixel_values`` + ``image_grid_thw``."""
    values, grids = [], []
    for img in images:
        pv, grid = patchify(
            normalize_frames(img[None], spec), spec.patch_size, spec.merge_size, spec.temporal_patch_size
        )
        values.append(pv)
        grids.append(grid)
    return {"pixel_values": torch.cat(values), "image_grid_thw": torch.stack(grids)}


def _region_z(frame: CoordinateFrame, region: Any) -> tuple[float, float] | None:
    """A voxel-frame box → its z-range on the tensor's grid (through the incoming frame)."""
    if region is None:
        return None
    box = frame.to_text(region)
    if box.shape[0] != 1:
        raise BoxError(f"region must be one box, got {box.shape[0]}")
    return float(box[0, 2]), float(box[0, 5])


def tokenize_image(
    image: torch.Tensor | np.ndarray,
    frame: CoordinateFrame,
    spec: VisionSpec = VisionSpec(),
    *,
    max_vision_tokens: int = DEFAULT_MAX_VISION_TOKENS,
    min_pixels: int = _MIN_PIXELS,
) -> TokenizedVisual:
    """A 2D image ``(C, X, Y)`` in [0, 1] → one Qwen-VL image; the frame gains the resize step."""
    x = _as_tensor(image, 2, "image")
    _check_frame(frame, x, "image")
    _check_channels(x, spec, "image")
    plan = plan_image(x.shape[1:], spec, max_vision_tokens=max_vision_tokens, min_pixels=min_pixels)
    resized = _resize(x, plan.resized_shape)
    inputs = _image_inputs([resized.transpose(1, 2)], spec)
    return TokenizedVisual(
        "image", inputs, plan.num_tokens, frame.extend(plan.steps), ({"type": "image"},), plan
    )


def tokenize_video(
    volume: torch.Tensor | np.ndarray,
    frame: CoordinateFrame,
    spec: VisionSpec = VisionSpec(),
    *,
    spacing: Sequence[float] | None = None,
    max_vision_tokens: int = DEFAULT_MAX_VISION_TOKENS,
    min_slice_tokens: int = 64,
    max_slice_tokens: int | None = None,
    max_slices: int | None = None,
    mm_per_second: float = MM_PER_SECOND,
) -> TokenizedVisual:
    """A volume ``(C, X, Y, Z)`` in [0, 1] → a Qwen-VL video (depth = time); see :func:`plan_video`.

    ``spacing`` is the tensor grid's voxel size in mm ``(x, y, z)``; without it slices are frames of a
    nominal 2-fps video.
    """
    x = _as_tensor(volume, 3, "volume")
    _check_frame(frame, x, "volume")
    _check_channels(x, spec, "volume")
    plan = plan_video(
        x.shape[1:], spec, spacing=spacing, max_vision_tokens=max_vision_tokens, min_slice_tokens=min_slice_tokens,
        max_slice_tokens=max_slice_tokens, max_slices=max_slices, mm_per_second=mm_per_second,
    )  # fmt: skip
    resized = _resize(x, plan.resized_shape)
    frames = resized.permute(3, 0, 2, 1)  # (Z, C, Y, X): one display-layout frame per slice
    if plan.depth_pad:
        frames = torch.cat([frames, frames[-1:].expand(plan.depth_pad, -1, -1, -1)])
    pv, grid = patchify(
        normalize_frames(frames, spec), spec.patch_size, spec.merge_size, spec.temporal_patch_size
    )
    inputs = {"pixel_values_videos": pv, "video_grid_thw": grid[None]}
    if spec.uses_second_per_grid_ts:
        inputs["second_per_grid_ts"] = torch.tensor([plan.second_per_grid_t], dtype=torch.float32)
    return TokenizedVisual(
        "video", inputs, plan.num_tokens, frame.extend(plan.steps), ({"type": "video"},), plan
    )


def tokenize_slices(
    volume: torch.Tensor | np.ndarray,
    frame: CoordinateFrame,
    spec: VisionSpec = VisionSpec(),
    *,
    num_slices: int = 8,
    region: Any = None,
    region_context: float = 2.0,
    max_vision_tokens: int = DEFAULT_MAX_VISION_TOKENS,
) -> TokenizedVisual:
    """A volume → ``K`` labelled axial images; see :func:`plan_slices`.

    ``region`` (a voxel-frame box, e.g. the target during training) centres the slices on it. Contract: a box's
    z-range in the text frame is in the slice-index numbers written in the prompt, half-open — a target seen
    on slices 40 … 48 is ``z1 = 40, z2 = 49`` — and maps back to the voxel frame through the incoming frame.
    """
    x = _as_tensor(volume, 3, "volume")
    _check_frame(frame, x, "volume")
    _check_channels(x, spec, "volume")
    plan = plan_slices(
        x.shape[1:], spec, num_slices=num_slices, z_range=_region_z(frame, region), region_context=region_context,
        max_vision_tokens=max_vision_tokens,
    )  # fmt: skip
    assert plan.slice_indices is not None
    chosen = x[..., list(plan.slice_indices)]
    resized = _resize(chosen, (*plan.resized_shape[:2], len(plan.slice_indices)))
    images = [resized[..., i].transpose(1, 2) for i in range(len(plan.slice_indices))]
    content: list[dict[str, Any]] = []
    for i, k in enumerate(plan.slice_indices):
        content.append({"type": "text", "text": f"{'' if i == 0 else chr(10)}Slice {k}: "})
        content.append({"type": "image"})
    return TokenizedVisual(
        "slices", _image_inputs(images, spec), plan.num_tokens, frame.extend(plan.steps), tuple(content), plan,
        slice_indices=plan.slice_indices,
    )  # fmt: skip


def tokenize_montage(
    volume: torch.Tensor | np.ndarray,
    frame: CoordinateFrame,
    spec: VisionSpec = VisionSpec(),
    *,
    num_tiles: int = 16,
    region: Any = None,
    region_context: float = 2.0,
    max_vision_tokens: int = DEFAULT_MAX_VISION_TOKENS,
) -> TokenizedVisual:
    """A volume → one tiled 2D image (for 2D-only VLMs); see :func:`plan_montage` for the box contract.

    ``slice_indices`` are the input slices at the tile centres (what the prompt lists); unused tiles of the
    last row are black.
    """
    x = _as_tensor(volume, 3, "volume")
    _check_frame(frame, x, "volume")
    _check_channels(x, spec, "volume")
    plan = plan_montage(
        x.shape[1:], spec, num_tiles=num_tiles, z_range=_region_z(frame, region), region_context=region_context,
        max_vision_tokens=max_vision_tokens,
    )  # fmt: skip
    assert plan.window is not None and plan.layout is not None
    tiles = _resize(x[..., plan.window[0] : plan.window[1]], plan.resized_shape)  # (C, tw, th, K)
    tw, th, k = plan.resized_shape
    rows, cols = plan.layout
    canvas = torch.zeros((x.shape[0], rows * th, cols * tw), dtype=torch.float32)
    for t in range(k):
        r, c = divmod(t, cols)
        canvas[:, r * th : (r + 1) * th, c * tw : (c + 1) * tw] = tiles[..., t].transpose(1, 2)
    return TokenizedVisual(
        "montage", _image_inputs([canvas], spec), plan.num_tokens, frame.extend(plan.steps), ({"type": "image"},),
        plan, slice_indices=plan.slice_indices,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# A configurable front end (typed __init__ arguments, so LightningCLI can build it from YAML)
# ----------------------------------------------------------------------------------------------------------


class VisualTokenizer:
    """Tokenizes 2D images with the ``image`` strategy and volumes with ``volume_strategy``, on one budget."""

    def __init__(
        self,
        spec: VisionSpec | None = None,
        *,
        volume_strategy: Literal["video", "slices", "montage"] = "video",
        max_vision_tokens: int = DEFAULT_MAX_VISION_TOKENS,
        min_slice_tokens: int = 64,
        max_slice_tokens: int | None = None,
        max_slices: int | None = None,
        num_slices: int = 8,
        num_tiles: int = 16,
        region_context: float = 2.0,
        mm_per_second: float = MM_PER_SECOND,
    ) -> None:
        if volume_strategy not in ("video", "slices", "montage"):
            raise ConfigError(
                f"volume_strategy must be 'video', 'slices' or 'montage', got {volume_strategy!r}"
            )
        self.spec = spec if spec is not None else VisionSpec()
        self.volume_strategy = volume_strategy
        self.max_vision_tokens = _check_budget(max_vision_tokens)
        self.min_slice_tokens = min_slice_tokens
        self.max_slice_tokens = max_slice_tokens
        self.max_slices = max_slices
        self.num_slices = num_slices
        self.num_tiles = num_tiles
        self.region_context = region_context
        self.mm_per_second = mm_per_second

    def __call__(
        self,
        tensor: torch.Tensor | np.ndarray,
        frame: CoordinateFrame,
        *,
        spacing: Sequence[float] | None = None,
        region: Any = None,
        strategy: Strategy | None = None,
    ) -> TokenizedVisual:
        """Tokenize one image ``(C, X, Y)`` or volume ``(C, X, Y, Z)``; ``region`` (voxel-frame box) steers
        slice choice for ``slices`` / ``montage``; ``spacing`` (mm of the tensor grid) feeds ``video``."""
        chosen = strategy or ("image" if frame.ndim == 2 else self.volume_strategy)
        if (frame.ndim == 2) != (chosen == "image"):
            raise ConfigError(f"strategy {chosen!r} does not fit a {frame.ndim}D input")
        if chosen == "image":
            return tokenize_image(tensor, frame, self.spec, max_vision_tokens=self.max_vision_tokens)
        if chosen == "video":
            return tokenize_video(
                tensor, frame, self.spec, spacing=spacing, max_vision_tokens=self.max_vision_tokens,
                min_slice_tokens=self.min_slice_tokens, max_slice_tokens=self.max_slice_tokens,
                max_slices=self.max_slices, mm_per_second=self.mm_per_second,
            )  # fmt: skip
        if chosen == "slices":
            return tokenize_slices(
                tensor, frame, self.spec, num_slices=self.num_slices, region=region,
                region_context=self.region_context, max_vision_tokens=self.max_vision_tokens,
            )  # fmt: skip
        if chosen == "montage":
            return tokenize_montage(
                tensor, frame, self.spec, num_tiles=self.num_tiles, region=region,
                region_context=self.region_context, max_vision_tokens=self.max_vision_tokens,
            )  # fmt: skip
        raise ConfigError(f"unknown strategy {chosen!r}; use image, video, slices or montage")


# ----------------------------------------------------------------------------------------------------------
# Batch assembly: the HF processor's __call__, without its torchvision-only video path
# ----------------------------------------------------------------------------------------------------------


def build_mm_token_type_ids(
    input_ids: torch.Tensor, image_token_id: int, video_token_id: int
) -> torch.Tensor:
    """0 for text (and padding), 1 for image pads, 2 for video pads — Qwen-VL's 3D-position switch."""
    types = torch.zeros_like(input_ids, dtype=torch.long)
    types[input_ids == image_token_id] = MM_TYPE_IMAGE
    types[input_ids == video_token_id] = MM_TYPE_VIDEO
    return types


def _token_id(tokenizer: Any, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == getattr(tokenizer, "unk_token_id", None):
        raise ConfigError(f"the tokenizer has no {token!r} token; it is not a Qwen-VL tokenizer")
    return int(tid)


def build_model_inputs(
    prompts: Sequence[str],
    visuals: Sequence[TokenizedVisual | Sequence[TokenizedVisual] | None],
    tokenizer: Any,
    spec: VisionSpec = VisionSpec(),
    *,
    padding_side: Literal["left", "right"] = "left",
    image_token: str = "<|image_pad|>",
    video_token: str = "<|video_pad|>",
) -> BatchFeature:
    """Chat-templated prompts (one ``<|image_pad|>`` / ``<|video_pad|>`` per image / video) + their visuals →
    ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and the concatenated pixel inputs.

    Each placeholder is expanded to ``grid_thw.prod() // merge²`` pad tokens, in the order the placeholders
    appear (``visuals[i]`` lists the visuals of prompt ``i`` in that order; a slices visual fills one image
    placeholder per slice). Expansion works on token ids (the pads are single special tokens), which equals
    tokenizing the expanded string as the HF processor does, without re-tokenizing thousands of pads.
    """
    if len(prompts) != len(visuals):
        raise ConfigError(
            f"{len(prompts)} prompts but {len(visuals)} visual entries; give one entry per prompt"
        )
    image_id, video_id = _token_id(tokenizer, image_token), _token_id(tokenizer, video_token)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ConfigError("the tokenizer has neither a pad nor an EOS token to pad the batch with")
    encoded = tokenizer(list(prompts))["input_ids"]
    rows: list[list[int]] = []
    images: list[TokenizedVisual] = []
    videos: list[TokenizedVisual] = []
    for i, (ids, entry) in enumerate(zip(encoded, visuals)):
        items = [] if entry is None else [entry] if isinstance(entry, TokenizedVisual) else list(entry)
        expected: list[tuple[int, int]] = []
        for vis in items:
            (videos if vis.modality == "video" else images).append(vis)
            pad = video_id if vis.modality == "video" else image_id
            expected.extend((pad, spec.tokens(g)) for g in vis.grid_thw.tolist())
        found = [tok for tok in ids if tok in (image_id, video_id)]
        if found != [pad for pad, _ in expected]:
            names = {image_id: "image", video_id: "video"}
            raise ConfigError(
                f"prompt {i}: placeholders {[names[t] for t in found]} do not match its visuals "
                f"{[names[p] for p, _ in expected]}; put one <|image_pad|> per image and one <|video_pad|> "
                "per video in the prompt, in order"
            )
        out: list[int] = []
        queue = iter(expected)
        for tok in ids:
            if tok in (image_id, video_id):
                out.extend([tok] * next(queue)[1])
            else:
                out.append(tok)
        rows.append(out)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(length - len(r), length) if padding_side == "left" else slice(0, len(r))
        input_ids[i, sl] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, sl] = 1
    data: dict[str, torch.Tensor] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": build_mm_token_type_ids(input_ids, image_id, video_id),
    }
    if images:
        data["pixel_values"] = torch.cat([v.pixel_inputs["pixel_values"] for v in images])
        data["image_grid_thw"] = torch.cat([v.pixel_inputs["image_grid_thw"] for v in images])
    if videos:
        data["pixel_values_videos"] = torch.cat([v.pixel_inputs["pixel_values_videos"] for v in videos])
        data["video_grid_thw"] = torch.cat([v.pixel_inputs["video_grid_thw"] for v in videos])
        seconds = [v.pixel_inputs.get("second_per_grid_ts") for v in videos]
        if spec.uses_second_per_grid_ts:
            if any(s is None for s in seconds):
                raise ConfigError(
                    "a video visual lacks second_per_grid_ts; tokenize it with a Qwen2.5-VL VisionSpec"
                )
            data["second_per_grid_ts"] = torch.cat(seconds)  # type: ignore[arg-type]
    return BatchFeature(data=data)
