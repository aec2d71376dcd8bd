"""TorchIO patch sampling for volumes larger than the model's token budget, with boxes carried into patches.

The volumes come from an mg3d pipeline (``mg3d.data.transforms``) *without* the final fit to the model
grid (``spatial_size=None``), so patches keep the pipeline's resolution and the patch size is the model
grid. Each pipeline sample becomes a TorchIO ``Subject`` whose metadata holds the record's boxes, text
and :class:`~mg3d.frames.CoordinateFrame`; a ``LabelMap`` of the target (its carried mask, or its boxes
rasterised) lets ``LabelSampler``/``WeightedSampler`` centre patches on the target with probability
``target_probability`` (random context patches otherwise).

TorchIO 1.x has no box type (research/data_formats.md §3.3); patches carry ``tio.LOCATION``
``(i0, j0, k0, i1, j1, k1)`` on the volume grid, and :func:`remap_boxes_to_patch` moves boxes into the
patch with the :class:`PatchPolicy` for targets cut by the patch edge. Each patch sample's frame is
the volume's frame plus a ``crop`` step, so a box predicted on the patch maps back to the original
voxel frame like any other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torchio as tio
from torch.utils.data import Dataset, IterableDataset

from mg3d.boxes import mask_to_box
from mg3d.data.patch_config import PatchConfig
from mg3d.errors import ConfigError, DataError
from mg3d.frames import CoordinateFrame, crop_step

__all__ = [
    "PatchConfig",
    "PatchDataset",
    "PatchPolicy",
    "PatchSamples",
    "PatchTarget",
    "PipelineSubjects",
    "boxes_from_grid_predictions",
    "grid_patches",
    "make_queue",
    "make_subject",
    "patch_sample",
    "remap_boxes_to_patch",
]

TARGET = "target"
SAMPLING_MAP = "sampling_map"
_META = ("boxes", "target_boxes", "frame", "text", "source_text", "flipped", "id", "dataset", "ndim", "modality",
         "category", "question_type", "spacing", "affine", "intensity")  # fmt: skip
#: Subject metadata key: the target label map is the record's carried mask (exact boxes), not rasterised boxes.
HAS_MASK = "has_mask"


@dataclass(frozen=True)
class PatchPolicy:
    """What to do with a target that the patch edge cuts.

    ``edge="clip"`` keeps the visible part when at least ``min_visible`` of the box's volume is inside the
    patch and rejects the patch otherwise (a sliver of a target is a misleading answer); ``edge="reject"``
    rejects every patch that cuts a target. A patch with no target at all is a context patch: kept with
    no boxes when ``keep_absent`` (teaches "not in view"), rejected otherwise.
    """

    edge: Literal["clip", "reject"] = "clip"
    min_visible: float = 0.5
    keep_absent: bool = True

    def __post_init__(self) -> None:
        if self.edge not in ("clip", "reject"):
            raise ConfigError(f"PatchPolicy.edge must be 'clip' or 'reject', got {self.edge!r}")
        if not 0.0 < self.min_visible <= 1.0:
            raise ConfigError(f"PatchPolicy.min_visible must lie in (0, 1], got {self.min_visible}")


@dataclass(frozen=True)
class PatchTarget:
    """Boxes of one patch on the patch grid, the visible fraction of each input box, and the verdict."""

    boxes: np.ndarray
    visible: np.ndarray
    status: Literal["whole", "clipped", "absent", "rejected"]

    @property
    def kept(self) -> bool:
        return self.status != "rejected"


def remap_boxes_to_patch(
    boxes: np.ndarray, start: Sequence[int], patch_size: Sequence[int], policy: PatchPolicy = PatchPolicy()
) -> PatchTarget:
    """Move volume-grid boxes into the patch ``[start, start + patch_size)`` and apply ``policy``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 2 * len(start))
    d = len(start)
    shift = np.tile(np.asarray(start, dtype=np.float64), 2)
    local = boxes - shift
    size = np.asarray(patch_size, dtype=np.float64)
    lo = np.clip(local[:, :d], 0.0, size)
    hi = np.clip(local[:, d:], lo, size)
    full = np.prod(local[:, d:] - local[:, :d], axis=1)
    visible = np.where(full > 0, np.prod(hi - lo, axis=1) / np.where(full > 0, full, 1.0), 0.0)
    cut = (visible > 0) & (visible < 1.0 - 1e-9)
    present = visible > 0
    # A target larger than the patch is never whole in it: judge it by how much of the patch it can fill.
    attainable = np.prod(np.minimum(local[:, d:] - local[:, :d], size), axis=1)
    filled = np.where(
        attainable > 0, np.prod(hi - lo, axis=1) / np.where(attainable > 0, attainable, 1.0), 0.0
    )
    too_big = np.any(local[:, d:] - local[:, :d] > size, axis=1)
    judged = np.where(too_big, filled, visible)
    if cut.any() and (
        (policy.edge == "reject" and not too_big[cut].all()) or (judged[cut] < policy.min_visible).any()
    ):
        return PatchTarget(np.zeros((0, 2 * d)), visible, "rejected")
    if not present.any():
        return PatchTarget(np.zeros((0, 2 * d)), visible, "absent" if policy.keep_absent else "rejected")
    kept = np.concatenate([lo, hi], axis=1)[present]
    return PatchTarget(kept, visible, "clipped" if cut.any() else "whole")


def _target_map(sample: Mapping[str, Any], shape: Sequence[int]) -> torch.Tensor:
    if sample.get("mask") is not None:
        return torch.as_tensor(sample["mask"]).to(torch.uint8)
    label = torch.zeros((1, *shape), dtype=torch.uint8)
    for box in np.asarray(sample["target_boxes"]).reshape(-1, 6):
        lo = np.clip(np.floor(box[:3]), 0, shape).astype(int)
        hi = np.clip(np.ceil(box[3:]), 0, shape).astype(int)
        label[0, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1
    return label


def make_subject(sample: Mapping[str, Any], target_probability: float | None = None) -> tio.Subject:
    """A TorchIO ``Subject`` from a 3D pipeline sample: image, target label map, and the record as metadata.

    With ``target_probability`` a ``sampling_map`` image is added for ``WeightedSampler``: mass
    ``target_probability`` spread over the target voxels, the rest over the whole volume.
    """
    if int(sample["ndim"]) != 3:
        raise ConfigError(
            f"record {sample.get('id')!r}: patch sampling is for 3D volumes, got {sample['ndim']}D"
        )
    image = torch.as_tensor(sample["image"])
    shape = tuple(int(s) for s in image.shape[1:])
    frame = sample["frame"]
    if isinstance(frame, CoordinateFrame):
        if frame.shape != shape:
            raise DataError(f"record {sample.get('id')!r}: frame ends at {frame.shape}, the image is {shape}")
        frame = frame.to_dict()
    spacing = sample.get("spacing") or (1.0, 1.0, 1.0)
    affine = np.diag([*spacing, 1.0])  # TorchIO needs an affine; the grid's world position is not used here
    target = _target_map(sample, shape)
    images: dict[str, Any] = {
        "image": tio.ScalarImage(tensor=image, affine=affine),
        TARGET: tio.LabelMap(tensor=target, affine=affine),
    }
    if target_probability is not None:
        weights = torch.full((1, *shape), (1.0 - target_probability) / float(np.prod(shape)))
        n_target = int(target.sum())
        if n_target:
            weights += target.to(torch.float32) * (target_probability / n_target)
        images[SAMPLING_MAP] = tio.ScalarImage(tensor=weights, affine=affine)
    meta = {k: sample[k] for k in _META if k in sample}
    meta[HAS_MASK] = sample.get("mask") is not None
    meta["frame"] = frame
    meta["target_boxes"] = np.asarray(sample["target_boxes"], dtype=np.float64)
    meta["boxes"] = np.asarray(sample["boxes"], dtype=np.float64)
    return tio.Subject(**images, **meta)


def patch_sample(patch: tio.Subject, policy: PatchPolicy = PatchPolicy()) -> dict[str, Any] | None:
    """The sample contract for one patch (``None`` when the policy rejects it).

    ``boxes`` become the visible part of the target in the original voxel frame (what the answer on this
    patch should be scored against); ``target_boxes`` are on the patch grid.
    """
    location = [int(v) for v in torch.as_tensor(patch[tio.LOCATION]).tolist()]
    d = len(location) // 2
    start, stop = location[:d], location[d:]
    size = [b - a for a, b in zip(start, stop)]
    target = remap_boxes_to_patch(patch["target_boxes"], start, size, policy)
    if not target.kept:
        return None
    mask = None
    if patch.get(HAS_MASK):
        mask = patch[TARGET].data > 0
        if target.status == "clipped" and len(target.boxes) == 1:
            # the box of the visible part of the target, exact from its mask (the clipped box is an upper bound)
            if not bool(mask.any()):
                return None  # the box's corner is in the patch, the target is not: nothing to answer
            target = PatchTarget(mask_to_box(mask[0].numpy())[None, :], target.visible, target.status)
    frame = CoordinateFrame.from_dict(patch["frame"])
    frame = frame.then(crop_step(frame.shape, start, stop))
    boxes = frame.to_voxel(target.boxes) if len(target.boxes) else np.zeros((0, 2 * d))
    out = {k: patch[k] for k in _META if k in patch}
    out.update(
        mask=mask,
        image=patch["image"].data.to(torch.float32),
        frame=frame,
        boxes=boxes,
        target_boxes=target.boxes,
        visible=target.visible,
        patch_status=target.status,
        location=location,
    )
    return out


class PipelineSubjects(Dataset):
    """Subjects built on access from any dataset of 3D pipeline samples (e.g. a MONAI ``CacheDataset``).

    TorchIO's ``Queue`` only needs ``len`` and indexing, so the pipeline's cached, box-tracked volumes feed
    it directly instead of TorchIO re-reading the files.
    """

    def __init__(
        self, samples: Sequence[Mapping[str, Any]] | Dataset, target_probability: float | None = None
    ):
        self.samples = samples
        self.target_probability = target_probability

    def __len__(self) -> int:
        return len(self.samples)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tio.Subject:
        return make_subject(self.samples[index], self.target_probability)

    def dry_iter(self) -> list[tio.Subject]:
        """Subjects for ``Queue.iterations_per_epoch`` (builds them, so only for small sets)."""
        return [self[i] for i in range(len(self))]


def make_queue(
    samples: Sequence[Mapping[str, Any]] | Dataset,
    patch_size: Sequence[int],
    *,
    target_probability: float = 0.7,
    sampler: Literal["label", "weighted"] = "label",
    samples_per_volume: int = 4,
    max_length: int = 64,
    num_workers: int = 0,
    shuffle: bool = True,
) -> tio.Queue:
    """A ``tio.Queue`` of patches that contain the target with probability ``target_probability``.

    ``sampler="label"`` uses ``LabelSampler`` (patch centre on a target voxel with that probability, on a
    background voxel otherwise); ``"weighted"`` uses ``WeightedSampler`` on the ``sampling_map``.
    """
    if not 0.0 <= target_probability <= 1.0:
        raise ConfigError(f"make_queue: target_probability must lie in [0, 1], got {target_probability}")
    size = tuple(int(s) for s in patch_size)
    if len(size) != 3 or min(size) <= 0:
        raise ConfigError(f"make_queue: patch_size must be 3 positive ints, got {patch_size}")
    if sampler == "label":
        probabilities = {k: v for k, v in ((0, 1.0 - target_probability), (1, target_probability)) if v > 0}
        patch_sampler: tio.PatchSampler = tio.LabelSampler(
            size, label_name=TARGET, label_probabilities=probabilities
        )
        subjects = PipelineSubjects(samples)
    elif sampler == "weighted":
        patch_sampler = tio.WeightedSampler(size, probability_map=SAMPLING_MAP)
        subjects = PipelineSubjects(samples, target_probability)
    else:
        raise ConfigError(f"make_queue: sampler must be 'label' or 'weighted', got {sampler!r}")
    return tio.Queue(
        subjects,  # type: ignore[arg-type]
        max_length=max_length,
        samples_per_volume=samples_per_volume,
        sampler=patch_sampler,
        num_workers=num_workers,
        shuffle_subjects=shuffle,
        shuffle_patches=shuffle,
        start_background=False,
    )


class PatchSamples(IterableDataset):
    """Iterate a queue's patches as sample dicts, dropping the ones the :class:`PatchPolicy` rejects.

    ``stats`` counts patches per status (whole / clipped / absent / rejected) so the rejection rate is
    visible, never silent.
    """

    def __init__(self, queue: tio.Queue, policy: PatchPolicy = PatchPolicy()) -> None:
        self.queue = queue
        self.policy = policy
        self.stats: Counter[str] = Counter()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index in range(len(self.queue)):
            patch = self.queue[index]
            sample = patch_sample(patch, self.policy)
            if sample is None:
                self.stats["rejected"] += 1
                continue
            self.stats[sample["patch_status"]] += 1
            yield sample


def grid_patches(
    sample: Mapping[str, Any],
    patch_size: Sequence[int],
    overlap: Sequence[int] = (0, 0, 0),
    policy: PatchPolicy = PatchPolicy(edge="clip", min_visible=1e-9, keep_absent=True),
) -> list[dict[str, Any]]:
    """Cover a whole volume with ``GridSampler`` patches for inference; each carries its own frame.

    The default policy keeps every patch (inference must see the whole volume).
    """
    subject = make_subject(sample)
    shape = subject.spatial_shape
    if any(p > s for p, s in zip(patch_size, shape)):
        raise ConfigError(
            f"record {sample.get('id')!r}: patch {tuple(patch_size)} exceeds the volume {shape}"
        )
    out = []
    for patch in tio.GridSampler(subject, patch_size=tuple(patch_size), patch_overlap=tuple(overlap)):
        converted = patch_sample(patch, policy)
        if converted is not None:
            out.append(converted)
    return out


def boxes_from_grid_predictions(
    patches: Sequence[Mapping[str, Any]], boxes: Sequence[np.ndarray], scores: Sequence[float]
) -> tuple[np.ndarray, int]:
    """Map each patch's predicted box (on its patch grid) to the original voxel frame; return the best one.

    Returns ``(box, patch_index)`` of the highest score; boxes are mapped through each patch's own frame.
    """
    if not (len(patches) == len(boxes) == len(scores)) or not patches:
        raise ConfigError(f"boxes_from_grid_predictions: {len(patches)} patches, {len(boxes)} boxes, "
                          f"{len(scores)} scores")  # fmt: skip
    best = int(np.argmax(np.asarray(scores, dtype=np.float64)))
    frame: CoordinateFrame = patches[best]["frame"]
    return frame.to_voxel(np.asarray(boxes[best], dtype=np.float64).reshape(1, -1))[0], best


# ---------------------------------------------------------------------------------------------- DataModule option


class PatchDataset(Dataset):
    """A source's training volumes as a stream of target-holding patches, indexable for the DataModule's
    weighted sampler (one index per volume; a draw returns the queue's next accepted patch).

    Patches the policy rejects are drawn again (at most ``max_draws`` times, then a :class:`DataError` naming the
    source); :attr:`stats` counts whole / clipped / rejected patches. Sample keys are the pipeline's contract.
    """

    def __init__(self, volumes: Dataset, config: PatchConfig, label: str) -> None:
        self.volumes = volumes
        self.config = config
        self.label = label
        self.policy = PatchPolicy(edge="clip", min_visible=config.min_visible, keep_absent=False)
        self.stats: Counter[str] = Counter()
        self._queue: tio.Queue | None = None
        self._keys: list[str] | None = None

    def __len__(self) -> int:
        return len(self.volumes)  # type: ignore[arg-type]

    def _next_patch(self) -> tio.Subject:
        if self._queue is None:
            self._queue = make_queue(
                self.volumes, self.config.patch_size, target_probability=self.config.target_probability,
                sampler=self.config.sampler, samples_per_volume=self.config.samples_per_volume,
                max_length=self.config.queue_length,
            )  # fmt: skip
        return self._queue[0]  # a Queue hands out its next patch whatever the index

    def __getitem__(self, index: int) -> dict[str, Any]:
        for _ in range(self.config.max_draws):
            try:
                patch = self._next_patch()
            except (RuntimeError, ValueError) as err:  # TorchIO: e.g. a patch larger than the volume
                raise DataError(f"source {self.label}: patch sampling failed: {err}") from err
            sample = patch_sample(patch, self.policy)
            if sample is None:
                self.stats["rejected"] += 1
                continue
            self.stats[str(sample["patch_status"])] += 1
            for extra in ("visible", "patch_status", "location"):
                sample.pop(extra, None)
            return sample
        raise DataError(
            f"source {self.label}: no patch of {self.config.patch_size} kept a usable target in "
            f"{self.config.max_draws} draws (stats {dict(self.stats)}); lower patches.min_visible or enlarge the patch"
        )
