"""Assembly: the cached/random split of a pipeline, :func:`build_pipeline`, and the final sample contract."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    Orientationd,
    RandAdjustContrastd,
    RandBiasFieldd,
    RandGaussianNoised,
    Spacingd,
    Transform,
)

from mg3d.boxes import mask_to_box
from mg3d.data.transforms.config import PipelineConfig
from mg3d.data.transforms.intensity import ClampIntensityd, IntensityPresetd
from mg3d.data.transforms.loading import CheckHeaderd, LoadRecordd
from mg3d.data.transforms.spatial import (
    FitToGridd,
    ForegroundCropd,
    RandAffineBoxd,
    RandLateralFlipd,
    RandTargetCropd,
    SpatialStepd,
)
from mg3d.data.transforms.tracking import (
    _SPATIAL_KEYS,
    BOXES,
    IMAGE,
    MASK,
    _frame,
    _np64,
    _require_meta,
    visible_boxes,
)
from mg3d.errors import ConfigError, Mg3dError


class Finalized(Transform):
    """Turn the pipeline's working dict into the sample contract of :mod:`mg3d.data.transforms`."""

    def __init__(self, keep_mask: bool = False) -> None:
        self.keep_mask = keep_mask

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[str, Any]:
        d = dict(data)
        img = _require_meta(d, "Finalized")
        frame = _frame(d)
        boxes = _np64(d[BOXES]).reshape(-1, 2 * frame.ndim)
        target = visible_boxes(frame, boxes)
        if not frame.exact and MASK in d and len(boxes) == 1 and bool((d[MASK][0] > 0.5).any()):
            target = mask_to_box(d[MASK][0] > 0.5)[None, :]
        spacing = None
        if frame.ndim == 3 and d.get("has_spacing"):
            spacing = tuple(float(v) for v in np.linalg.norm(_np64(img.affine)[:3, :3], axis=0))
        affine = d.get("affine_src")
        # always present, so samples from sources with and without masks collate into one batch
        mask = (d[MASK] > 0.5).as_tensor() if self.keep_mask and MASK in d else None
        return {
            "image": img.as_tensor().to(torch.float32).contiguous(),
            "mask": mask,
            "boxes": boxes,
            "target_boxes": target,
            "frame": frame,
            "text": str(d["text"]),
            "source_text": str(d.get("source_text", d["text"])),
            "flipped": bool(d.get("flipped", False)),
            "id": str(d["id"]),
            "dataset": str(d["dataset"]),
            "ndim": frame.ndim,
            "modality": str(d["modality"]),
            "intensity": d.get("intensity"),  # the preset's declaration (None in caches written before it)
            "category": d.get("category"),
            "question_type": d.get("question_type"),
            "spacing": spacing,
            "affine": None if affine is None else _np64(affine),
        }


class CompactMetad(Transform):
    """Keep only the affine on the image and mask (drop reader headers and MONAI's operation log).

    Ends the cached part: the frame already records every spatial step, the headers are not needed
    downstream, and ``PersistentDataset`` loads its files with ``torch.load(weights_only=True)``, which
    refuses the numpy arrays readers put into the metadata (the cache would silently never hit).
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in _SPATIAL_KEYS:
            if isinstance(d.get(key), MetaTensor):
                d[key] = MetaTensor(d[key].as_tensor(), affine=d[key].affine.detach().clone())
        d[BOXES] = _np64(d[BOXES])
        return d


class _KeepSourceText(Transform):
    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d.setdefault("source_text", d["text"])
        d.setdefault("flipped", False)
        return d


def unwrap_error(err: BaseException) -> BaseException:
    """The first mg3d error in ``err``'s cause chain (MONAI wraps every transform error in RuntimeError)."""
    current: BaseException | None = err
    while current is not None:
        if isinstance(current, Mg3dError):
            return current
        current = current.__cause__
    return err


class Mg3dCompose(Compose):
    """``Compose`` that re-raises mg3d's own errors (DataError naming the record …) instead of MONAI's wrapper."""

    def __call__(self, input_: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as err:
            inner = unwrap_error(err)
            if inner is err:
                raise
            raise inner from inner.__cause__


@dataclass(frozen=True)
class Pipeline:
    """A record pipeline split where caching must stop.

    ``deterministic`` (loading, orientation, spacing, the preset, the foreground crop, the fit to the model
    grid) is what ``CacheDataset``/``PersistentDataset`` store; ``random`` (augmentations and the final
    conversion to the sample contract) runs on every access. Calling the pipeline runs both.
    """

    deterministic: Compose
    random: Compose
    ndim: int
    train: bool

    def __call__(self, item: Mapping[Hashable, Any]) -> dict[str, Any]:
        return self.random(self.deterministic(item))

    def set_random_state(self, seed: int | None = None) -> Pipeline:
        self.random.set_random_state(seed=seed)
        return self


def _lateral_axis(config: PipelineConfig, ndim: int) -> int:
    """The patient's left–right axis after the pipeline's orientation (a flip needs to know it)."""
    if ndim == 2:
        return 0
    if config.axcodes is None:
        raise ConfigError(
            "lateral_flip_prob > 0 needs a known orientation: with axcodes null the left-right axis is unknown"
        )
    return next(a for a, c in enumerate(config.axcodes.upper()) if c in "LR")


def build_pipeline(config: PipelineConfig, ndim: int, *, train: bool = False) -> Pipeline:
    """The pipeline for ``ndim``-D records (training pipelines add ``config.augment``)."""
    if ndim not in (2, 3):
        raise ConfigError(f"build_pipeline: ndim must be 2 or 3, got {ndim}")
    config.check_ndim(ndim)
    aug = config.augment
    carry_mask = config.carry_mask or (train and config.use_mask and aug.rotates)
    geometry = ndim == 3 and (config.axcodes is not None or config.pixdim is not None)
    t: list[Any] = [
        CheckHeaderd(load_mask=carry_mask),
        LoadRecordd(load_mask=carry_mask, needs_geometry=geometry),
        _KeepSourceText(),
    ]
    if ndim == 3 and config.axcodes is not None:
        orient = Orientationd(
            list(_SPATIAL_KEYS), axcodes=config.axcodes, labels=None, allow_missing_keys=True
        )
        t.append(SpatialStepd(orient, "reorient"))
    if ndim == 3 and config.pixdim is not None:
        # a mask must not be extended by border padding where the new grid overhangs the old one
        spacing = Spacingd(list(_SPATIAL_KEYS), pixdim=config.pixdim, mode=("bilinear", "nearest"),
                           padding_mode=("border", "zeros"), allow_missing_keys=True)  # fmt: skip
        t.append(SpatialStepd(spacing, "respace"))
    t.append(IntensityPresetd(config.preset, config.preset_options, ndim))
    if config.crop_foreground:
        t.append(ForegroundCropd(config.foreground_threshold, config.foreground_margin))
    if config.spatial_size is not None:
        t.append(FitToGridd(config.spatial_size, config.fit))
    t.append(CompactMetad())
    r: list[Any] = []
    if train:
        if aug.target_crop_prob > 0:
            r.append(RandTargetCropd(aug.target_crop_prob, aug.target_crop_scale, config.spatial_size))
        if aug.lateral_flip_prob > 0:
            r.append(RandLateralFlipd(aug.lateral_flip_prob, _lateral_axis(config, ndim)))
        if aug.affine_prob > 0:
            r.append(RandAffineBoxd(aug.affine_prob, aug.rotate_deg, aug.scale, aug.translate))
        intensity = []
        if aug.noise_prob > 0:
            intensity.append(RandGaussianNoised(IMAGE, prob=aug.noise_prob, std=aug.noise_std))
        if aug.gamma_prob > 0:
            intensity.append(RandAdjustContrastd(IMAGE, prob=aug.gamma_prob, gamma=aug.gamma))
        if aug.bias_prob > 0:
            intensity.append(RandBiasFieldd(IMAGE, prob=aug.bias_prob, coeff_range=(0.0, aug.bias_coeff)))
        if intensity:
            r.extend([*intensity, ClampIntensityd()])
    r.append(Finalized(keep_mask=config.carry_mask))
    return Pipeline(Mg3dCompose(t), Mg3dCompose(r), ndim, train)
