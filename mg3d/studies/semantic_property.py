"""The semantic reward's defining property, measured per data source and per data pipeline.

The property (MedGround-R1's reason for the reward): a miss that lands on *another lesion* scores above a
miss on background and above a miss on normal tissue. Per case a scene (:mod:`~mg3d.studies.lesions`: a
phantom, or a real image with inserted lesions) gives a target lesion, whose box is the ground truth, and
another lesion; three misses of the target box's size are built — centred on the other lesion, on
background (≤ 10 % normal-tissue voxels) and on normal tissue (≥ ``organ_fraction`` of one tissue class,
the target's host when it fits). Background and tissue misses keep the whole crop (box plus the reward's
context margin) free of lesion voxels; a case where the other-lesion miss overlaps the target (IoU ≥ 0.5)
or a kind of miss cannot be placed is skipped and counted.

Scoring goes through a data pipeline exactly as training does: the scene is written to a NIfTI file, read by
the pipeline (:func:`~mg3d.data.transforms.build_pipeline` with the given :class:`PipelineConfig`), and the
sample becomes the reward's target through :func:`~mg3d.rewards.targets.target_from_sample`, the function
``GRPOModule`` uses; the misses are mapped onto the pipeline grid through the sample's frame. So the reward
sees here what it sees in training (the windowed tensor turned back into HU through the preset's declared
inverse). ``pipeline=None`` skips the pipeline and hands the scene's image over as it is (HU for CT).

Rates come with percentile-bootstrap intervals over cases; ``same``/``opposite`` split the cases by whether
the target and the other lesion have the same density (both hypo- or both hyperdense) or opposite ones.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mg3d.boxes import pair_iou
from mg3d.errors import ConfigError
from mg3d.rewards.base import RewardTarget
from mg3d.rewards.semantic import SemanticReward
from mg3d.rewards.targets import target_from_sample
from mg3d.studies.lesions import LesionInserter, Scene, phantom_scene
from mg3d.studies.real_volumes import RealVolume, load_real_volume

__all__ = [
    "PipelineRoute",
    "PropertyStudy",
    "bootstrap_interval",
    "build_misses",
    "phantom_property_study",
    "real_property_study",
    "score_scene",
    "semantic_property_study",
]

_KINDS = ("other lesion", "background", "normal tissue")


def _box_sums(indicator: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Sum of ``indicator`` over every placement of a box of integer ``size`` (summed-volume table)."""
    d = indicator.ndim
    table = np.zeros(tuple(n + 1 for n in indicator.shape))
    table[tuple(slice(1, None) for _ in range(d))] = indicator
    for a in range(d):
        table = np.cumsum(table, axis=a)
    total = np.zeros(tuple(max(n - s + 1, 0) for n, s in zip(indicator.shape, size)))
    if total.size == 0:
        return total
    for corner in np.ndindex(*(2,) * d):
        sl = tuple(
            slice(s, None) if c else slice(None, n - s + 1) for c, s, n in zip(corner, size, indicator.shape)
        )
        sign = (-1) ** (d - sum(corner))
        total += sign * table[sl]
    return total


def bootstrap_interval(
    hits: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of a 0/1 vector (cases resampled with replacement)."""
    hits = np.asarray(hits, dtype=np.float64)
    if hits.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = hits[rng.integers(0, hits.size, (n_boot, hits.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------- the misses


@dataclass(frozen=True)
class MissCase:
    """The ground truth and the three misses (other lesion, background, normal tissue) in the voxel frame."""

    gt: np.ndarray
    boxes: np.ndarray  # (3, 2·ndim)
    phrase: str
    pair: tuple[str, str]  # (target density, other density)


def build_misses(
    rng: np.random.Generator, scene: Scene, *, margin: float, organ_fraction: float = 0.9
) -> MissCase | None:
    """The three misses of one scene (see the module doc), or ``None`` when one cannot be placed."""
    t, o = rng.choice(len(scene.lesions), 2, replace=False)
    target, other = scene.lesions[int(t)], scene.lesions[int(o)]
    d = scene.ndim
    gt = np.asarray(target.box, dtype=np.float64)
    size = (gt[d:] - gt[:d]).astype(int)
    grow = np.ceil(size * margin).astype(int)
    lesion_free = (
        _box_sums(np.pad(scene.lesion_labels > 0, [(g, g) for g in grow]).astype(np.float64), size + 2 * grow)
        == 0
    )
    volume = float(np.prod(size))
    tissue_share = _box_sums((scene.tissue > 0).astype(np.float64), size) / volume
    background_ok = lesion_free & (tissue_share <= 0.1)
    organ_ok = lesion_free & (
        _box_sums((scene.tissue == target.host).astype(np.float64), size) / volume >= organ_fraction
    )
    if not organ_ok.any():
        best = np.zeros_like(tissue_share)
        for label in (int(v) for v in np.unique(scene.tissue) if v > 0):
            best = np.maximum(best, _box_sums((scene.tissue == label).astype(np.float64), size) / volume)
        organ_ok = lesion_free & (best >= organ_fraction)
    lesion_box = np.concatenate([other.centre - size / 2, other.centre + size / 2])
    if not background_ok.any() or not organ_ok.any() or pair_iou(lesion_box, gt)[0] >= 0.5:
        return None
    places = [np.argwhere(ok) for ok in (background_ok, organ_ok)]
    picks = [p[rng.integers(len(p))].astype(np.float64) for p in places]
    boxes = np.stack([lesion_box] + [np.concatenate([p, p + size]) for p in picks])
    return MissCase(gt, boxes, target.phrase, (target.density, other.density))


# ---------------------------------------------------------------------------------------------- scoring


class PipelineRoute:
    """Scenes through a data pipeline into the reward, as in training (one pipeline per dimensionality)."""

    def __init__(self, config: object, workdir: Path) -> None:
        from mg3d.data.transforms import PipelineConfig, build_pipeline

        if not isinstance(config, PipelineConfig):
            raise ConfigError(f"pipeline must be a PipelineConfig, got {type(config).__name__}")
        self.config = config
        self.workdir = workdir
        self._build = build_pipeline
        self._pipelines: dict[int, object] = {}

    def target(self, scene: Scene, case: MissCase) -> tuple[RewardTarget, np.ndarray]:
        """The reward's target (built as ``GRPOModule`` builds it) and the misses on the pipeline grid."""
        sample = self.sample(scene, case)
        target = target_from_sample(sample, record_id=scene.record_id, phrase=case.phrase)
        return target, sample["frame"].to_text(case.boxes)

    def sample(self, scene: Scene, case: MissCase) -> dict[str, Any]:
        """The scene written to NIfTI and read back through the pipeline: a training sample."""
        import nibabel as nib

        from mg3d.data.records import GroundingRecord
        from mg3d.data.transforms import record_to_item

        d = scene.ndim
        affine = scene.affine if scene.affine is not None else np.diag([*scene.spacing, *(1.0,) * (4 - d)])
        path = self.workdir / "scene.nii"
        nib.save(nib.Nifti1Image(scene.image.astype(np.float32), affine), str(path))
        record = GroundingRecord(
            id=scene.record_id,
            dataset="study",
            split="test",
            modality=scene.modality,
            ndim=d,
            image=str(path),
            text=case.phrase,
            boxes=(tuple(float(v) for v in case.gt),),
            spatial_shape=tuple(int(s) for s in scene.image.shape),
            spacing=tuple(float(s) for s in scene.spacing) if d == 3 else None,
            affine=tuple(tuple(float(v) for v in row) for row in scene.affine)
            if scene.affine is not None
            else None,
        )
        if d not in self._pipelines:
            self._pipelines[d] = self._build(self.config, d)
        return self._pipelines[d](record_to_item(record))  # type: ignore[operator]


def score_scene(
    reward: SemanticReward, scene: Scene, case: MissCase, route: PipelineRoute | None
) -> tuple[np.ndarray, np.ndarray]:
    """Raw similarities and calibrated rewards ``(3,)`` of the case's misses, through ``route`` (or none)."""
    if route is None:
        target = RewardTarget(
            record_id=scene.record_id,
            boxes=case.gt[None],
            image=scene.image,
            affine=scene.affine if scene.ndim == 3 else None,
            phrase=case.phrase,
            unit="HU" if scene.modality == "CT" else None,
        )
        boxes = case.boxes
    else:
        target, boxes = route.target(scene, case)
    return reward.similarities(target, boxes)


# ---------------------------------------------------------------------------------------------- the study


@dataclass
class PropertyStudy:
    """Per-case rewards of the three kinds of miss, for one source through one pipeline."""

    rewards: np.ndarray  # (cases, 3): other lesion, background, normal tissue
    similarities: np.ndarray  # (cases, 3) raw encoder similarities
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (target density, other density)
    skipped: int = 0
    source: str = ""
    pipeline: str = ""

    @property
    def n(self) -> int:
        return int(self.rewards.shape[0])

    def hits(self, use: Literal["rewards", "similarities"] = "rewards") -> dict[str, np.ndarray]:
        """Per-case 0/1 outcomes: each comparison, both at once, and both at once per density pairing."""
        v = self.rewards if use == "rewards" else self.similarities
        over_bg, over_organ = v[:, 0] > v[:, 1], v[:, 0] > v[:, 2]
        both = over_bg & over_organ
        same = np.asarray([a == b for a, b in self.pairs], dtype=bool)
        if same.size != both.size:
            same = np.zeros_like(both)
        return {
            "lesion_over_background": over_bg,
            "lesion_over_organ": over_organ,
            "lesion_over_both": both,
            "same_density_both": both[same],
            "opposite_density_both": both[~same],
        }

    def rates(self, use: Literal["rewards", "similarities"] = "rewards") -> dict[str, float]:
        return {k: float(h.mean()) if h.size else float("nan") for k, h in self.hits(use).items()}

    def intervals(self, n_boot: int = 2000, level: float = 0.95) -> dict[str, tuple[float, float]]:
        return {k: bootstrap_interval(h, n_boot, level) for k, h in self.hits().items()}

    def table(self) -> str:
        hits, ci = self.hits(), self.intervals()
        lines = [
            f"| comparison ({self.n} cases, {self.skipped} skipped) | rate [95 % bootstrap] | cases |",
            "| --- | --- | --- |",
        ]
        for key, label in (
            ("lesion_over_background", "miss on another lesion > miss on background"),
            ("lesion_over_organ", "miss on another lesion > miss on normal tissue"),
            ("lesion_over_both", "both at once"),
            ("same_density_both", "both at once, same-density pair"),
            ("opposite_density_both", "both at once, opposite-density pair"),
        ):
            h = hits[key]
            rate = f"{h.mean():.3f} [{ci[key][0]:.2f}, {ci[key][1]:.2f}]" if h.size else "—"
            lines.append(f"| {label} | {rate} | {h.size} |")
        means = self.rewards.mean(0)
        lines.append(
            f"| mean reward: lesion / background / tissue | {means[0]:.3f} / {means[1]:.3f} / {means[2]:.3f} | |"
        )
        return "\n".join(lines)


def _run(
    make_scene: Callable[[np.random.Generator, str], Scene],
    n_cases: int,
    seed: int,
    reward: SemanticReward | None,
    pipeline: object | None,
    organ_fraction: float,
    source: str,
    pipeline_name: str,
) -> PropertyStudy:
    reward = reward if reward is not None else SemanticReward()
    rewards, sims, pairs = [], [], []
    skipped = 0
    with tempfile.TemporaryDirectory(prefix="mg3d-study-") as tmp:
        route = None if pipeline is None else PipelineRoute(pipeline, Path(tmp))
        for i, child in enumerate(np.random.SeedSequence(seed).spawn(n_cases)):
            rng = np.random.default_rng(child)
            scene = make_scene(rng, f"{source}/{seed}/{i}")
            case = build_misses(rng, scene, margin=reward.margin, organ_fraction=organ_fraction)
            if case is None:
                skipped += 1
                continue
            sim, cal = score_scene(reward, scene, case, route)
            rewards.append(cal)
            sims.append(sim)
            pairs.append(case.pair)
    if not rewards:
        raise ConfigError(f"semantic property study on {source}: no usable case in {n_cases} (all skipped)")
    return PropertyStudy(np.asarray(rewards), np.asarray(sims), pairs, skipped, source, pipeline_name)


def phantom_property_study(
    n_cases: int = 200,
    seed: int = 0,
    *,
    reward: SemanticReward | None = None,
    shape: tuple[int, int, int] = (96, 96, 48),
    organ_fraction: float = 0.9,
    pipeline: object | None = None,
    pipeline_name: str = "",
) -> PropertyStudy:
    """The property on synthetic CT phantoms with 2–4 lesions (``pipeline``: a ``PipelineConfig`` or None)."""
    return _run(
        lambda rng, rid: phantom_scene(rng, rid, shape),
        n_cases,
        seed,
        reward,
        pipeline,
        organ_fraction,
        "phantoms",
        pipeline_name or ("none" if pipeline is None else "custom"),
    )


def real_property_study(
    source: str | RealVolume,
    n_cases: int = 200,
    seed: int = 0,
    *,
    reward: SemanticReward | None = None,
    organ_fraction: float = 0.9,
    pipeline: object | None = None,
    pipeline_name: str = "",
) -> PropertyStudy:
    """The property on a real image (:mod:`~mg3d.studies.real_volumes`) with 2–4 inserted lesions per case."""
    volume = load_real_volume(source) if isinstance(source, str) else source
    return _run(
        LesionInserter(volume),
        n_cases,
        seed,
        reward,
        pipeline,
        organ_fraction,
        volume.name,
        pipeline_name or ("none" if pipeline is None else "custom"),
    )


#: the phantom study under its earlier name
semantic_property_study = phantom_property_study
