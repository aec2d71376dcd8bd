"""Semantic consistency reward: does the predicted region *look like* the target?

MedGround-R1's idea (method notes §0, fact 4): a frozen encoder gives graded feedback where the spatial reward
gives none, so a group of completions that all miss is not a group of zeros — a miss that lands on something
that looks like the target scores above a miss on background. The released code scored the whole image
against the text, ignored the completion and could not be called; this is a working version in 2D and 3D.

For each completion: crop the predicted box and each ground-truth box with a context margin (the box is the
central ``1 / (1 + 2·margin)`` of every crop axis), resample them to the encoder's fixed size, embed both with
the frozen :mod:`~mg3d.rewards.encoders` encoder, and calibrate the similarity ``s`` per record.

``s`` is the similarity of the predicted crop to the reference: the best-matching ground-truth crop, or the
phrase when the encoder has a text tower and ``reference="phrase"``. ``s_gt`` is that of the ground-truth
crop itself (1 for region references). The calibration (``"rank"``, default) compares ``s`` with the
similarities ``r_1 ≤ … ≤ r_n`` of ``n_reference`` crops of the ground-truth size centred on fixed pseudo-random
voxels of the image's body (its foreground, :func:`~mg3d.rewards.intensity.foreground_mask`; seeded by the
record id): the reward is the piecewise-linear interpolation through ``(floor, 0), (r_i, (i − ½) / n),
(s_gt, 1)`` — the share of random regions of this body that look less like the target than the prediction
does, made continuous. It is strictly increasing in ``s`` (no ties, so
rankings within a GRPO group survive), comparable across records and encoders, 1 for the target itself.
``"linear"`` is ``(s − floor) / (s_gt − floor)``. Ground-truth embeddings and references are cached per record.

Intensities are read on the scale of the target's ``unit`` (HU, SUV, a preset's stated normalisation; see
:mod:`~mg3d.rewards.intensity`), so training targets come from :func:`mg3d.rewards.targets.target_from_sample`,
which turns the pipeline's windowed tensor back into those units.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from mg3d.errors import ConfigError
from mg3d.rewards.base import ParsedBatch, Reward, RewardTarget, register_reward
from mg3d.rewards.encoders import RegionEncoder, build_encoder
from mg3d.rewards.intensity import PHYSICAL_SCALES, IntensityStats, foreground_mask, intensity_stats

__all__ = ["SemanticReward", "crop_regions"]


# ----------------------------------------------------------------------------------------------------------
# Crops


def crop_regions(
    image: torch.Tensor | np.ndarray, boxes: np.ndarray, size: Sequence[int], margin: float
) -> torch.Tensor:
    """Fixed-size crops ``(N, *size)`` of voxel-frame ``boxes`` grown by ``margin`` × their size on each side.

    One ``grid_sample`` call for all boxes (bilinear/trilinear, ``align_corners=False`` so voxel-edge
    coordinates map exactly; replicated border outside the image). Hand-written rather than MONAI
    ``SpatialCrop`` + ``Resize`` per box because boxes have sub-voxel edges and a batch of G boxes per image is
    one vectorised call here instead of G crop-and-resize pairs. Boxes thinner than one voxel count as one.
    """
    img = (
        image.float()
        if isinstance(image, torch.Tensor)
        else torch.from_numpy(np.array(image, dtype=np.float32))
    )
    d = img.ndim
    arr = torch.from_numpy(np.array(boxes, dtype=np.float64)).reshape(-1, 2 * d)
    n = arr.shape[0]
    if n == 0:
        return torch.zeros((0, *size), dtype=torch.float32)
    lo, hi = arr[:, :d], arr[:, d:]
    extent = (hi - lo).clamp_min(1.0) * (1.0 + 2.0 * margin)
    centre = (lo + hi) / 2.0
    coords = []
    for a in range(d):
        steps = (torch.arange(size[a], dtype=torch.float64) + 0.5) / size[a] - 0.5
        edge = centre[:, a, None] + steps[None] * extent[:, a, None]  # (N, S_a) voxel-edge coordinates
        view = [n] + [1] * d
        view[1 + a] = size[a]
        coords.append((2.0 * edge / img.shape[a] - 1.0).reshape(view).expand(n, *size))
    grid = torch.stack(coords[::-1], dim=-1).float()  # grid_sample wants the last spatial axis first
    source = img[None, None].expand(n, 1, *img.shape)
    out = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, 0]


def _reference_boxes(foreground: np.ndarray, box: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` boxes of ``box``'s size centred on pseudo-random foreground voxels (fixed per seed).

    Centred on the body, not anywhere in the field of view: a reference set half made of air or padding
    would rank any tissue above it and tell nothing about the body (issue 24). Boxes are shifted to lie
    inside the image.
    """
    rng = np.random.default_rng(seed)
    shape = np.asarray(foreground.shape, dtype=np.float64)
    d = len(shape)
    size = np.minimum(box[d:] - box[:d], shape)
    voxels = np.flatnonzero(foreground.reshape(-1))
    if voxels.size == 0:
        lo = rng.uniform(0.0, 1.0, (count, d)) * (shape - size)
    else:
        picks = voxels[rng.integers(0, voxels.size, count)]
        centres = np.stack(np.unravel_index(picks, foreground.shape), axis=1) + rng.uniform(
            0.0, 1.0, (count, d)
        )
        lo = np.clip(centres - size / 2, 0.0, shape - size)
    return np.concatenate([lo, lo + size], axis=1)


def _fingerprint(target: RewardTarget) -> tuple[Any, ...]:
    """Cache key: record id plus cheap content checks, so a reused id with another image is not confused."""
    img = target.image
    assert img is not None
    step = max(1, img.size // 65536)
    sample = np.ascontiguousarray(img.reshape(-1)[::step])
    unit = target.unit
    return (
        target.record_id,
        img.shape,
        target.boxes.tobytes(),
        zlib.crc32(sample.tobytes()),
        target.phrase,
        unit,
    )


def _unit(target: RewardTarget) -> str | None:
    """The target's declared intensity unit (``None``: unknown, the image's own range is used)."""
    unit = target.unit
    if unit is not None and unit not in PHYSICAL_SCALES:
        raise ConfigError(
            f"record {target.record_id!r}: unknown intensity unit {unit!r}; known: {sorted(PHYSICAL_SCALES)} or None"
        )
    return unit


@dataclass
class _RecordCache:
    stats: IntensityStats
    reference: torch.Tensor  # (K, D) ground-truth embeddings, or (1, D) phrase embedding
    s_gt: np.ndarray  # (K,) similarity of each ground-truth crop to its reference
    s_ref: np.ndarray  # (K, n_reference) sorted similarities of random regions to the reference


# ----------------------------------------------------------------------------------------------------------
# Reward


@register_reward("semantic")
class SemanticReward(Reward):
    """Calibrated similarity in [0, 1] of the predicted region to the ground-truth region (or the phrase).

    ``mode="all"`` scores every completion; ``"misses"`` only completions whose best IoU is at most
    ``iou_threshold`` (hits get NaN: the spatial reward already rewards them). A completion without a usable
    box gets ``failure_value`` (0); a target without an image gets NaN.
    """

    value_range = (0.0, 1.0)

    def __init__(
        self,
        *,
        encoder: RegionEncoder | str = "radiomics",
        mode: Literal["all", "misses"] = "all",
        iou_threshold: float = 0.5,
        reference: Literal["region", "phrase"] = "region",
        calibration: Literal["rank", "linear"] = "rank",
        margin: float = 0.5,
        n_reference: int = 32,
        failure_value: float = 0.0,
        cache_size: int = 4096,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        if mode not in ("all", "misses"):
            raise ConfigError(f"{self.name}: mode must be 'all' or 'misses', got {mode!r}")
        if calibration not in ("rank", "linear"):
            raise ConfigError(f"{self.name}: calibration must be 'rank' or 'linear', got {calibration!r}")
        if reference not in ("region", "phrase"):
            raise ConfigError(f"{self.name}: reference must be 'region' or 'phrase', got {reference!r}")
        if not 0.0 <= iou_threshold < 1.0 or margin < 0 or n_reference < 1 or cache_size < 1:
            raise ConfigError(
                f"{self.name}: need 0 ≤ iou_threshold < 1, margin ≥ 0, n_reference ≥ 1, cache_size ≥ 1"
            )
        if not 0.0 <= failure_value <= 1.0:
            raise ConfigError(f"{self.name}: failure_value must be in [0, 1], got {failure_value}")
        self.encoder = build_encoder(encoder)
        if reference == "phrase" and not self.encoder.has_text:
            raise ConfigError(f"{self.name}: reference='phrase' needs an encoder with a text tower")
        self.mode = mode
        self.iou_threshold = float(iou_threshold)
        self.reference = reference
        self.calibration = calibration
        self.margin = float(margin)
        self.n_reference = int(n_reference)
        self.failure_value = float(failure_value)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[tuple[Any, ...], _RecordCache] = OrderedDict()

    @property
    def inner_fraction(self) -> float:
        return 1.0 / (1.0 + 2.0 * self.margin)

    # -- per-record reference ----------------------------------------------------------------------------
    def _embed(self, target: RewardTarget, stats: IntensityStats, boxes: np.ndarray) -> torch.Tensor:
        crops = crop_regions(target.image, boxes, self.encoder.crop_size(target.ndim), self.margin)
        return self.encoder.embed_regions(crops, stats, self.inner_fraction)

    def _record(self, target: RewardTarget) -> _RecordCache:
        key = _fingerprint(target)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        unit = _unit(target)
        foreground = foreground_mask(target.image, unit)
        stats = intensity_stats(target.image, unit, foreground=foreground)
        gt = self._embed(target, stats, target.boxes)
        seed = zlib.crc32(target.record_id.encode("utf-8"))
        refs = np.concatenate(
            [
                _reference_boxes(foreground, box, self.n_reference, seed + k)
                for k, box in enumerate(target.boxes)
            ]
        )
        ref_emb = self._embed(target, stats, refs).reshape(len(target.boxes), self.n_reference, -1)
        if self.reference == "phrase":
            anchor = self.encoder.embed_texts([target.phrase or " "])
            s_gt = self.encoder.similarity(gt, anchor).double().numpy()
            s_ref = self.encoder.similarity(ref_emb, anchor[None]).double().numpy()
        else:
            anchor = gt
            s_gt = self.encoder.similarity(gt, gt).double().numpy()
            s_ref = self.encoder.similarity(ref_emb, gt[:, None]).double().numpy()
        entry = _RecordCache(stats, anchor, s_gt, np.sort(s_ref, axis=1))
        self._cache[key] = entry
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return entry

    # -- scoring -----------------------------------------------------------------------------------------
    def similarities(self, target: RewardTarget, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw similarity ``(N,)`` of voxel-frame boxes to the reference, and the calibrated reward ``(N,)``."""
        if target.image is None:
            raise ConfigError(f"record {target.record_id!r}: the semantic reward needs the image")
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 2 * target.ndim)
        rec = self._record(target)
        emb = self._embed(target, rec.stats, boxes)  # (N, D)
        sim = self.encoder.similarity(emb[:, None], rec.reference[None]).double().numpy()  # (N, K) or (N, 1)
        sim = np.broadcast_to(sim, (boxes.shape[0], len(rec.s_gt)))  # a phrase is one reference for every box
        calibrated = np.stack([self._calibrate(sim[:, k], rec, k) for k in range(sim.shape[1])], axis=1)
        best = np.argmax(calibrated, axis=1)
        rows = np.arange(boxes.shape[0])
        return sim[rows, best], calibrated[rows, best]

    def _calibrate(self, sim: np.ndarray, rec: _RecordCache, k: int) -> np.ndarray:
        """Map raw similarities to [0, 1] for ground-truth box ``k`` (see the module doc)."""
        floor, top = self.encoder.similarity_floor, float(rec.s_gt[k])
        if self.calibration == "linear":
            return np.clip((sim - floor) / max(top - floor, 1e-12), 0.0, 1.0)
        n = rec.s_ref.shape[1]
        # Knots must increase strictly for a strictly increasing map: squeeze references into (floor, top).
        span = max(top - floor, 1e-12)
        refs = np.clip(rec.s_ref[k], floor + 1e-9 * span, top - 1e-9 * span)
        refs = refs + np.arange(n) * 1e-12 * span
        xs = np.concatenate([[floor], refs, [top]])
        ys = np.concatenate([[0.0], (np.arange(n) + 0.5) / n, [1.0]])
        return np.interp(sim, xs, ys)

    def score_boxes(self, target: RewardTarget, boxes: np.ndarray) -> np.ndarray:
        """Calibrated reward of arbitrary voxel-frame boxes against one target (the study uses this)."""
        return self.similarities(target, boxes)[1]

    def score(self, batch: ParsedBatch) -> np.ndarray:
        out = np.full(batch.n, np.nan)
        has_image = np.asarray([t.image is not None for t in batch.targets], dtype=bool)
        applies = has_image.copy()
        if self.mode == "misses":
            with np.errstate(invalid="ignore"):
                applies &= ~(batch.best_iou > self.iou_threshold)
        out[applies & ~batch.has_box] = self.failure_value
        groups: dict[int, list[int]] = {}
        for i in np.flatnonzero(applies & batch.has_box):
            groups.setdefault(id(batch.targets[i]), []).append(int(i))
        for idx in groups.values():
            target = batch.targets[idx[0]]
            boxes = np.stack([batch.pred_voxel[i] for i in idx])
            out[idx] = self.score_boxes(target, boxes)
        return out
