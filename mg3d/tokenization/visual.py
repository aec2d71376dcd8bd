"""Pixels → Qwen-VL patches: normalisation, the patchifier, and tokenizing images and volumes along a plan.

Each ``tokenize_*`` checks its tensor, asks :mod:`mg3d.tokenization.plan` for the geometry, resamples and lays out
the pixels, and returns a :class:`TokenizedVisual` whose frame has gained the plan's steps.
:class:`VisualTokenizer` is the configurable front end over the four strategies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from mg3d.errors import BoxError, ConfigError, DataError
from mg3d.frames import CoordinateFrame
from mg3d.tokenization.plan import (
    DEFAULT_MAX_VISION_TOKENS,
    MM_PER_SECOND,
    Strategy,
    VisionSpec,
    VisualPlan,
    _check_budget,
    plan_image,
    plan_montage,
    plan_slices,
    plan_video,
)

__all__ = [
    "TokenizedVisual",
    "VisualTokenizer",
    "normalize_frames",
    "patchify",
    "tokenize_image",
    "tokenize_montage",
    "tokenize_slices",
    "tokenize_video",
]

#: Intensities may overshoot [0, 1] by this much (rounding in upstream resampling) before we call it an error.
_RANGE_SLACK = 1e-3


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
    spec: VisionSpec = VisionSpec(),  # noqa: B008 -- frozen dataclass, so a shared default is safe
    *,
    max_vision_tokens: int = DEFAULT_MAX_VISION_TOKENS,
    min_pixels: int | None = None,
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
    spec: VisionSpec = VisionSpec(),  # noqa: B008 -- frozen dataclass, so a shared default is safe
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
    spec: VisionSpec = VisionSpec(),  # noqa: B008 -- frozen dataclass, so a shared default is safe
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
    spec: VisionSpec = VisionSpec(),  # noqa: B008 -- frozen dataclass, so a shared default is safe
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
    """Tokenizes 2D images with the ``image`` strategy and volumes with ``volume_strategy``, on one budget.

    ``max_vision_tokens=None`` lets images take what the checkpoint folder's ``max_pixels`` allows
    (:meth:`VisionSpec.image_budget`) and gives volumes :data:`DEFAULT_MAX_VISION_TOKENS`.
    """

    def __init__(
        self,
        spec: VisionSpec | None = None,
        *,
        volume_strategy: Literal["video", "slices", "montage"] = "video",
        max_vision_tokens: int | None = DEFAULT_MAX_VISION_TOKENS,
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
        self.max_vision_tokens = None if max_vision_tokens is None else _check_budget(max_vision_tokens)
        self.image_tokens = self.spec.image_budget(self.max_vision_tokens)
        self.volume_tokens = self.max_vision_tokens or DEFAULT_MAX_VISION_TOKENS
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
            return tokenize_image(tensor, frame, self.spec, max_vision_tokens=self.image_tokens)
        if chosen == "video":
            return tokenize_video(
                tensor, frame, self.spec, spacing=spacing, max_vision_tokens=self.volume_tokens,
                min_slice_tokens=self.min_slice_tokens, max_slice_tokens=self.max_slice_tokens,
                max_slices=self.max_slices, mm_per_second=self.mm_per_second,
            )  # fmt: skip
        if chosen == "slices":
            return tokenize_slices(
                tensor, frame, self.spec, num_slices=self.num_slices, region=region,
                region_context=self.region_context, max_vision_tokens=self.volume_tokens,
            )  # fmt: skip
        if chosen == "montage":
            return tokenize_montage(
                tensor, frame, self.spec, num_tiles=self.num_tiles, region=region,
                region_context=self.region_context, max_vision_tokens=self.volume_tokens,
            )  # fmt: skip
        raise ConfigError(f"unknown strategy {chosen!r}; use image, video, slices or montage")
