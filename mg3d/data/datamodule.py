"""``GroundingDataModule``: several manifests (2D and 3D) mixed by weight, one pipeline per source.

(About 660 lines: sources, their datasets, the bad-item policy and the resume state are one object's job;
batching and the draw order live in :mod:`mg3d.data.batching`, patch sampling in :mod:`mg3d.data.sampling`.)

Batch contract (what :func:`collate_samples` returns and ``GRPOModule.training_step`` receives)
--------------------------------------------------------------------------------------------
A ``list`` of per-sample dicts, each exactly the sample contract of ``mg3d.data.transforms`` —
``image`` (a 2D radiograph ``(C, x, y)`` can sit next to a volume ``(C, x, y, z)``), ``boxes`` (original
voxel frame), ``target_boxes``, ``frame`` (:class:`~mg3d.frames.CoordinateFrame`), ``text``, ``id``,
``ndim``, ``modality``, ``spacing``, ``affine`` … Nothing is stacked: each phrase stays with its own
visual, boxes and frame whatever their shapes, and Lightning still moves the tensors inside the dicts to
the device. :func:`batch_columns` gives the same batch as a dict of aligned lists when that is handier.

Sources
-------
Each :class:`SourceConfig` names a manifest: a folder holding ``train.jsonl`` / ``val.jsonl`` /
``test.jsonl`` (what ``scripts/prepare_data.py`` writes) or one ``.jsonl`` file whose records are split
by their ``split`` field. Training draws a sample from source ``s`` with probability
``weight_s / Σ weight`` whatever the sources' sizes (so a small M3D-RefSeg is not drowned by a large
ChestX-ray8); validation and test read every record once, in order.

Caching
-------
The deterministic part of each pipeline (decode, orientation, spacing, preset, crop, fit) is cached:
``cache="memory"`` (MONAI ``CacheDataset``, filled in ``setup``), ``"disk"`` (``PersistentDataset`` under
``cache_dir``, reused across runs) or ``"none"``. Random augmentations run after the cache on every draw.

Bad items
---------
A record whose files fail to load or preprocess (truncated, corrupt, replaced since ``prepare_data``, NaN
voxels …) stops the run with a :class:`~mg3d.errors.DataError` naming it (``on_error="raise"``), or with
``on_error="skip"`` is left out, logged with its id and reason, listed in :attr:`GroundingDataModule.skipped`
and written to ``skipped.json`` in the trainer's log folder — never dropped silently. Skipping checks every
item once in ``setup`` (the memory and disk caches are filled by that pass; ``cache="none"`` decodes each
item one extra time).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.transforms import MapTransform
from torch.utils.data import ConcatDataset, Subset
from tqdm import tqdm

from mg3d.data.batching import ResumableWeightedSampler, batch_columns, collate_samples
from mg3d.data.modalities import check_preset_settings
from mg3d.data.patch_config import PatchConfig
from mg3d.data.records import SPLITS, GroundingRecord, read_manifest
from mg3d.data.transforms import (
    AugmentConfig,
    CheckHeaderd,
    LoadRecordd,
    Mg3dCompose,
    PipelineConfig,
    build_pipeline,
    record_to_item,
)
from mg3d.errors import ConfigError, DataError, Mg3dError

log = logging.getLogger(__name__)

__all__ = [
    "CheckHeaderd",
    "GroundingDataModule",
    "RequireFinited",
    "SourceConfig",
    "batch_columns",
    "check_sources",
    "collate_samples",
    "load_source_records",
]

SKIPPED_FILE = "skipped.json"


@dataclass
class SyntheticConfig:
    """Phantoms written on first use into a source's folder (the demo's data; nothing is downloaded).

    Args:
        kind: ``ct3d`` (M3D-RefSeg layout) or ``cxr2d`` (MS-CXR or ChestX-ray8 layout, see ``layout``).
        n: number of phantom volumes / images.
        seed: generator seed (the same seed writes byte-identical files).
        split_seed: seed of the case-level train/val/test split.
        val_fraction: share of cases held out for validation.
        layout: 2D on-disk layout, ``mscxr`` or ``chestxray8``.
        questions_per_region: (description, reasoning) questions written per 3D region.
        options: generator options, e.g. ``{"shape": [64, 64, 16], "single_lesion": true}``.
    """

    kind: Literal["ct3d", "cxr2d"] = "ct3d"
    n: int = 64
    seed: int = 0
    split_seed: int = 0
    val_fraction: float = 0.1
    layout: Literal["mscxr", "chestxray8"] = "mscxr"
    questions_per_region: list[int] | None = None
    options: dict[str, Any] = field(default_factory=dict)


def stale_phantom_settings(folder: Path, spec: SyntheticConfig) -> list[str]:
    """How the phantoms already written in ``folder`` differ from ``spec`` (empty when they match).

    The DataModule reuses a folder that has a manifest, so a config whose phantom settings changed (say, the demo's
    lesion contrast) would otherwise train on the old phantoms without a word. Folders without the generator's
    ``raw/phantom_truth.json`` (a user's own data) are not checked.
    """
    from mg3d.data.synthetic import TRUTH_NAME

    truth_path = folder / "raw" / TRUTH_NAME
    if not truth_path.is_file():
        return []
    try:
        truth = json.loads(truth_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{truth_path}: cannot read the phantoms' settings ({err})") from err
    wanted: dict[str, Any] = {"kind": spec.kind, "seed": spec.seed, "n": spec.n}
    have: dict[str, Any] = {k: truth.get(k) for k in wanted}
    if spec.kind == "ct3d" and spec.questions_per_region is not None:
        wanted["questions_per_region"] = spec.questions_per_region
        have["questions_per_region"] = truth.get("questions_per_region")
    # generator options are CTOptions/CXROptions fields (truth["options"]) or writer arguments (top level, e.g.
    # question_style); one the file does not record (written by an older version) cannot be compared
    stored_options = truth.get("options") or {}
    for key, value in spec.options.items():
        if key in stored_options or key in truth:
            wanted[f"options.{key}"] = value
            have[f"options.{key}"] = stored_options[key] if key in stored_options else truth[key]
    # JSON round trip: tuples and lists, ints and floats compare as the file stores them
    wanted, have = json.loads(json.dumps(wanted)), json.loads(json.dumps(have))
    return [f"{k}: {have[k]!r} on disk, {wanted[k]!r} in the config" for k in wanted if have[k] != wanted[k]]


@dataclass
class SourceConfig:
    """One manifest source.

    Args:
        path: folder with ``{train,val,test}.jsonl`` or a single ``.jsonl`` manifest.
        weight: relative sampling weight during training (independent of the source's size).
        name: label used in errors and logs (defaults to the path's name).
        pipeline: the source's pipeline options (model grid, orientation, preset, augmentations).
        max_records: keep only the first N records per split (quick experiments).
        synthetic: if set and ``path`` holds no manifest yet, write phantoms there first (``prepare_data``).
        patches: train this source's 3D volumes on TorchIO patches of the model grid (volumes larger than the
            model's budget; :class:`~mg3d.data.sampling.PatchConfig`); needs ``pipeline.spatial_size: null``.
    """

    path: str
    weight: float = 1.0
    name: str | None = None
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    max_records: int | None = None
    synthetic: SyntheticConfig | None = None
    patches: PatchConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.pipeline, Mapping):
            self.pipeline = PipelineConfig(**self.pipeline)
        if isinstance(self.synthetic, Mapping):
            self.synthetic = SyntheticConfig(**self.synthetic)
        if isinstance(self.patches, Mapping):
            self.patches = PatchConfig(**self.patches)
        if self.patches is not None and self.pipeline.spatial_size is not None:
            raise ConfigError(
                f"source {self.label}: patches take the model grid from patches.patch_size; set "
                "pipeline.spatial_size: null (the volume keeps its own grid and is cut into patches)"
            )
        if not self.weight > 0:
            raise ConfigError(f"source {self.label}: weight must be positive, got {self.weight}")
        if self.max_records is not None and self.max_records <= 0:
            raise ConfigError(f"source {self.label}: max_records must be positive, got {self.max_records}")

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


def check_sources(sources: Sequence[Any], *, paths: bool = True) -> list[SourceConfig]:
    """The sources of a config as :class:`SourceConfig`, refused before anything is built when a preset name or
    option is unknown or (``paths``) a path without a ``synthetic`` block does not exist; errors name the entry."""
    out: list[SourceConfig] = []
    for i, raw in enumerate(sources):
        value = raw.as_dict() if hasattr(raw, "as_dict") else raw
        try:
            source = value if isinstance(value, SourceConfig) else SourceConfig(**dict(value))
        except TypeError as err:
            raise ConfigError(f"data.sources[{i}]: {err}") from None
        where = f"data.sources[{i}] ({source.label})"
        check_preset_settings(source.pipeline.preset, source.pipeline.preset_options, where)
        path = Path(source.path).expanduser()
        if paths and source.synthetic is None and not path.exists():
            raise DataError(
                f"{where}: {path} does not exist; give a folder with train/val/test.jsonl (prepare_data.py) or a "
                ".jsonl manifest"
            )
        out.append(source)
    return out


def load_source_records(source: SourceConfig, split: str) -> list[GroundingRecord]:
    """Records of one split of a source; ``[]`` when a folder source has no file for that split."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; known: {SPLITS}")
    path = Path(source.path).expanduser()
    if path.is_dir():
        manifest = path / f"{split}.jsonl"
        records = read_manifest(manifest) if manifest.is_file() else []
    elif path.is_file():
        records = [r for r in read_manifest(path) if r.split == split]
    else:
        raise DataError(f"source {source.label}: {path} is neither a manifest folder nor a .jsonl file")
    return records[: source.max_records] if source.max_records else records


# Checkpoints store the DataModule's hyper-parameters (these dataclasses); Lightning loads checkpoints with
# weights_only=True, so they are allow-listed for the safe unpickler, and nothing else is.
torch.serialization.add_safe_globals(
    [SourceConfig, SyntheticConfig, PipelineConfig, AugmentConfig, PatchConfig]
)


class RequireFinited(MapTransform):
    """Refuse an image with NaN/Inf voxels: as stored (``where="as stored"``, before an intensity window clips
    an Inf into a plausible value) or after preprocessing (a normalisation of a constant image divides by zero).
    Either would reach the vision tower and make the whole batch's loss non-finite, far from the file."""

    def __init__(self, where: str = "after preprocessing") -> None:
        super().__init__(["image"])
        self.where = where

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        image = data["image"]
        if isinstance(image, torch.Tensor) and image.is_floating_point():
            bad = int((~torch.isfinite(image)).sum())
            if bad:
                raise DataError(
                    f"record {data.get('id')!r}: its image holds {bad} non-finite voxel(s) (NaN/Inf) {self.where}; "
                    "fix or remove the file"
                )
        return data


def _failure(err: BaseException, rid: str) -> str:
    """The reason an item failed, naming it: mg3d's own error if one is in the chain (MONAI wraps every
    transform error in ``RuntimeError("applying transform …")``), else the innermost exception."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for exc in chain:
        if isinstance(exc, Mg3dError):
            return str(exc) if repr(rid) in str(exc) else f"record {rid!r}: {exc}"
    inner = chain[-1]
    return f"record {rid!r}: {type(inner).__name__}: {inner}"


class _RecordDataset(Dataset):
    """A part's dataset whose failures at draw time name the record (a file broken after ``setup``)."""

    def __init__(self, data: Any, transform: Any, ids: Sequence[str]) -> None:
        super().__init__(data, transform)
        self.ids = list(ids)

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as err:
            raise DataError(_failure(err, self.ids[index])) from err


@dataclass
class _Part:
    """One (source, ndim) slice of a split: its dataset and what the sampling weights need."""

    source_index: int
    source: SourceConfig
    ndim: int
    dataset: Dataset
    size: int


class GroundingDataModule(L.LightningDataModule):
    """Mix 2D and 3D grounding sources, each with its own pipeline, into one training stream.

    Args:
        sources: manifest sources with their sampling weights and pipelines.
        batch_size: training batch size (samples per step).
        eval_batch_size: validation/test batch size (defaults to ``batch_size``).
        num_workers: DataLoader worker processes.
        seed: base seed for sampling and augmentation; each rank uses ``seed + rank``.
        cache: ``memory`` (CacheDataset), ``disk`` (PersistentDataset under ``cache_dir``) or ``none``.
        cache_dir: folder for ``cache="disk"``.
        samples_per_epoch: training draws per epoch (default: the total number of training records).
        cache_workers: threads used to fill the memory cache.
        pin_memory: pin batches for GPU transfer.
        on_error: an item that fails to load stops the run naming it (``raise``) or is left out and reported
            (``skip``: :attr:`skipped`, the log and ``skipped.json`` in the log folder).
    """

    def __init__(
        self,
        sources: list[SourceConfig],
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache: Literal["memory", "disk", "none"] = "memory",
        cache_dir: str | None = None,
        samples_per_epoch: int | None = None,
        cache_workers: int = 1,
        pin_memory: bool = False,
        on_error: Literal["raise", "skip"] = "raise",
    ) -> None:
        super().__init__()
        # Stored in checkpoints so that inference (mg3d.grounder) rebuilds the exact pipelines.
        self.save_hyperparameters()
        self.sources = check_sources(sources, paths=False)
        if not self.sources:
            raise ConfigError("GroundingDataModule: give at least one source")
        if batch_size <= 0 or (eval_batch_size is not None and eval_batch_size <= 0):
            raise ConfigError(
                f"GroundingDataModule: batch sizes must be positive, got {batch_size}, {eval_batch_size}"
            )
        if cache not in ("memory", "disk", "none"):
            raise ConfigError(f"GroundingDataModule: cache must be 'memory', 'disk' or 'none', got {cache!r}")
        if cache == "disk" and not cache_dir:
            raise ConfigError("GroundingDataModule: cache='disk' needs cache_dir")
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"GroundingDataModule: on_error must be 'raise' or 'skip', got {on_error!r}")
        if samples_per_epoch is not None and samples_per_epoch <= 0:
            raise ConfigError(
                f"GroundingDataModule: samples_per_epoch must be positive, got {samples_per_epoch}"
            )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.cache = cache
        self.cache_dir = cache_dir
        self.samples_per_epoch = samples_per_epoch
        self.cache_workers = cache_workers
        self.pin_memory = pin_memory
        self.on_error = on_error
        #: items left out under ``on_error="skip"``: ``{"id", "source", "split", "image", "reason"}`` each.
        self.skipped: list[dict[str, Any]] = []
        self._parts: dict[str, list[_Part]] = {}
        #: modality keys of the records each ndim was trained on (saved in checkpoints for the Grounder)
        self.modalities: dict[int, set[str]] = {}
        self._resume: tuple[int, int] = (0, 0)
        self._sampler: ResumableWeightedSampler | None = None

    # ------------------------------------------------------------------------------------------ datasets

    @property
    def rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_rank) if trainer is not None else 0

    def _dataset(self, items: list[dict[str, Any]], index: int, ndim: int, split: str) -> tuple[Dataset, int]:
        """The part's dataset and its size (after leaving out bad items under ``on_error="skip"``)."""
        source = self.sources[index]
        patched = source.patches is not None and split == "train" and ndim == 3
        config = dataclasses.replace(source.pipeline, carry_mask=True) if patched else source.pipeline
        pipeline = build_pipeline(config, ndim, train=split == "train")
        # distinct augmentation streams per rank and per part; workers are reseeded by MONAI's DataLoader
        pipeline.set_random_state(self.seed + 1_000_003 * self.rank + 10 * index + ndim)
        # flat, so that CacheDataset sees non-random transforms only (a nested Compose counts as random);
        # the pipeline starts with CheckHeaderd (headers checked before anything is decoded)
        steps = list(pipeline.deterministic.transforms)
        loaded = next((i + 1 for i, t in enumerate(steps) if isinstance(t, LoadRecordd)), 0)
        steps[loaded:loaded] = [RequireFinited("as stored")]
        deterministic = Mg3dCompose([*steps, RequireFinited()])
        if self.cache == "memory":
            # Filled item by item by _check_items (threads as before), so a bad item is attributed and skippable.
            base: Dataset = CacheDataset(items, deterministic, num_workers=self.cache_workers, progress=False,
                                         runtime_cache=True)  # fmt: skip
        elif self.cache == "disk":
            folder = Path(str(self.cache_dir)) / f"{index}-{source.label}-{split}-{ndim}d"
            base = PersistentDataset(items, deterministic, cache_dir=folder, track_meta=True)
        else:
            base = Dataset(items, deterministic)
        keep = list(range(len(items)))
        if self.cache == "memory" or self.on_error == "skip":
            keep = self._check_items(base, items, source.label, split)
            if len(keep) < len(items):
                base = Subset(base, keep)  # type: ignore[assignment]
        dataset: Dataset = _RecordDataset(base, pipeline.random, [items[i]["id"] for i in keep])
        if patched:  # cut boxes from the carried mask, exact
            from mg3d.data.sampling import PatchDataset

            dataset = PatchDataset(dataset, source.patches, source.label)  # type: ignore[arg-type]
        return dataset, len(keep)

    def _check_items(self, base: Dataset, items: list[dict[str, Any]], label: str, split: str) -> list[int]:
        """Run every item's deterministic pipeline once (filling a cache); raise on or record each failure."""

        def attempt(i: int) -> BaseException | None:
            try:
                base[i]
            except Exception as err:  # any reader/transform failure is a bad item, reported with its reason
                return err
            return None

        workers = max(1, int(self.cache_workers)) if self.cache == "memory" else 1
        with ThreadPoolExecutor(max_workers=workers) as pool:
            done = pool.map(attempt, range(len(items)))
            errors = list(tqdm(done, total=len(items), desc=f"{split} {label}", unit="record", file=sys.stderr,
                               disable=self.rank != 0, dynamic_ncols=True))  # fmt: skip
        keep = []
        for i, err in enumerate(errors):
            if err is None:
                keep.append(i)
                continue
            reason = _failure(err, items[i]["id"])
            if self.on_error == "raise":
                raise DataError(f"{reason} (source {label}, {split} split; data.on_error: skip leaves such "
                                "items out and reports them)") from err  # fmt: skip
            self.skipped.append(
                {"id": items[i]["id"], "source": label, "split": split, "image": str(items[i]["image"]),
                 "reason": reason}
            )  # fmt: skip
            log.warning("skipped (source %s, %s split) %s", label, split, reason)
        return keep

    def build_split(self, split: str) -> list[_Part]:
        """Datasets of ``split``, one per (source, ndim); built once and kept."""
        if split in self._parts:
            return self._parts[split]
        parts: list[_Part] = []
        for index, source in enumerate(self.sources):
            records = load_source_records(source, split)
            by_ndim: dict[int, list[dict[str, Any]]] = {}
            for record in records:
                by_ndim.setdefault(record.ndim, []).append(record_to_item(record))
                if split == "train":
                    self.modalities.setdefault(record.ndim, set()).add(record.modality)
            for ndim, items in sorted(by_ndim.items()):
                try:
                    source.pipeline.check_ndim(ndim, where=f"source {source.label}")
                except ConfigError as err:
                    raise ConfigError(f"{err} (record {items[0]['id']!r})") from None
                dataset, size = self._dataset(items, index, ndim, split)
                if size:
                    parts.append(_Part(index, source, ndim, dataset, size))
        self._parts[split] = parts
        return parts

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage or "fit", SPLITS):
            self.build_split(split)
        self._report_skipped()
        if (stage or "fit") == "fit" and not self.build_split("train"):
            skipped = sum(1 for s in self.skipped if s["split"] == "train")
            raise DataError(
                f"no training records in any source: {[s.path for s in self.sources]}"
                + (f" ({skipped} skipped as unreadable, see {SKIPPED_FILE})" if skipped else "")
            )
        if (stage or "fit") == "fit":
            self._check_every_source_trains()

    def _check_every_source_trains(self) -> None:
        """A source whose training records were all skipped, or that holds no record at all, stops the run: with
        ``on_error: skip`` it would otherwise vanish and the run train on the other sources alone. (A source with
        only val/test records is allowed: it is logged.)"""
        used = {p.source_index for p in self.build_split("train")}
        for index, source in enumerate(self.sources):
            if index in used:
                continue
            skipped = [s for s in self.skipped if s["source"] == source.label and s["split"] == "train"]
            if skipped:
                raise DataError(
                    f"source {source.label} ({source.path}): all {len(skipped)} training record(s) were skipped as "
                    f"unreadable (first: {skipped[0]['reason']}); fix or remove the source"
                )
            held_out = sum(len(load_source_records(source, split)) for split in ("val", "test"))
            if not held_out:
                raise DataError(
                    f"source {source.label} ({source.path}): holds no usable record; fix or remove it"
                )
            log.warning(
                "source %s has no training records; it is used for validation/test only", source.label
            )

    def skipped_report(self) -> dict[str, Any]:
        """What ``skipped.json`` holds: counts per split and source, and every skipped item with its reason."""
        by_split: dict[str, int] = {}
        by_source: dict[str, int] = {}
        for item in self.skipped:
            by_split[item["split"]] = by_split.get(item["split"], 0) + 1
            by_source[item["source"]] = by_source.get(item["source"], 0) + 1
        return {
            "total": len(self.skipped),
            "by_split": by_split,
            "by_source": by_source,
            "items": self.skipped,
        }

    def _report_skipped(self) -> None:
        if not self.skipped:
            return
        per_source = self.skipped_report()["by_source"]
        log.warning(
            "%d record(s) skipped as unreadable (on_error=skip), per source %s: %s", len(self.skipped),
            ", ".join(f"{k}: {v}" for k, v in per_source.items()),
            ", ".join(s["id"] for s in self.skipped[:5]) + (" …" if len(self.skipped) > 5 else ""),
        )  # fmt: skip
        trainer = getattr(self, "trainer", None)
        folder = getattr(trainer, "log_dir", None) if trainer is not None else None
        if folder and trainer.is_global_zero:
            from mg3d.atomic import atomic_write

            text = json.dumps(self.skipped_report(), indent=2, ensure_ascii=False) + "\n"
            atomic_write(Path(folder) / SKIPPED_FILE, lambda handle: handle.write(text.encode("utf-8")))

    # ------------------------------------------------------------------------------------------ loaders

    def _concat(self, split: str) -> tuple[ConcatDataset, list[_Part]]:
        parts = self.build_split(split)
        if not parts:
            raise DataError(f"no {split} records in any source: {[s.path for s in self.sources]}")
        return ConcatDataset([p.dataset for p in parts]), parts

    def sample_weights(self, split: str = "train") -> torch.Tensor:
        """Per-sample draw probabilities: each source gets ``weight / Σ weights`` spread over its samples."""
        parts = self.build_split(split)
        sizes: dict[int, int] = {}
        for part in parts:
            sizes[part.source_index] = sizes.get(part.source_index, 0) + part.size
        total = sum(self.sources[i].weight for i in sizes)
        chunks = [torch.full((p.size,), p.source.weight / total / sizes[p.source_index], dtype=torch.float64)
                  for p in parts]  # fmt: skip
        return torch.cat(chunks)

    def _loader(self, dataset: ConcatDataset, batch_size: int, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_samples,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        dataset, _ = self._concat("train")
        weights = self.sample_weights("train")
        sampler = ResumableWeightedSampler(
            weights, num_samples=self.samples_per_epoch or len(dataset), seed=self.seed + self.rank
        )
        epoch, skip = self._resume
        sampler.set_epoch(epoch)
        sampler.start = skip
        self._sampler = sampler
        generator = torch.Generator().manual_seed(self.seed + self.rank)
        return self._loader(dataset, self.batch_size, sampler=sampler, generator=generator)

    # ------------------------------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """Where the training stream stands: epoch and samples already consumed in it (for exact resume)."""
        from mg3d.data.user_modules import imported_user_modules

        saved: dict[str, Any] = {
            "modalities": {str(n): sorted(m) for n, m in sorted(self.modalities.items())},
            "user_modules": [m.to_dict() for m in imported_user_modules()],
        }
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return saved
        # `processed`, not `completed`: ModelCheckpoint saves in on_train_batch_end, before Lightning counts the
        # batch as completed, so `completed` would make a resumed run see that batch a second time.
        progress = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {
            **saved,
            "epoch": int(trainer.current_epoch),
            "samples_consumed": int(progress) * self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = (int(state.get("epoch", 0)), int(state.get("samples_consumed", 0)))

    # ------------------------------------------------------------------------------------------ first use

    def prepare_data(self) -> None:
        """Write synthetic phantoms and their manifests for sources that ask for them and have none yet."""
        from mg3d.data.prepare import prepare, synthetic_sources

        for source in self.sources:
            spec = source.synthetic
            folder = Path(source.path)
            if spec is None:
                continue
            if (folder / "train.jsonl").is_file():
                stale = stale_phantom_settings(folder, spec)
                if stale:
                    raise ConfigError(
                        f"source {source.label}: {folder} already holds phantoms written with other settings "
                        f"({'; '.join(stale)}); delete that folder to write them anew, or point `path` elsewhere (a "
                        "`--data.sources=[...]` override keeps the config's `synthetic` block unless it sets "
                        "`synthetic: null`)"
                    )
                continue
            rank_zero_info(f"mg3d: writing {spec.n} synthetic {spec.kind} phantoms to {folder} (first use)")
            adapters = synthetic_sources(
                spec.kind, folder / "raw", spec.n, gen_seed=spec.seed, layout=spec.layout,
                split_seed=spec.split_seed, val_fraction=spec.val_fraction,
                questions_per_region=spec.questions_per_region, progress=True, **spec.options,
            )  # fmt: skip
            prepare(
                adapters,
                folder,
                relative_paths=True,
                progress=True,
                command=["GroundingDataModule.prepare_data"],
            )

    def eval_samples(self, max_samples: int | None = None, split: str = "val") -> list[dict[str, Any]]:
        """Held-out samples (the ``val`` split, else ``test``) through the deterministic pipeline, in order."""
        parts = self.build_split(split) or self.build_split("test")
        samples: list[dict[str, Any]] = []
        for part in parts:
            for i in range(part.size):
                if max_samples is not None and len(samples) >= max_samples:
                    return samples
                samples.append(part.dataset[i])
        return samples

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches; ``[]`` (Lightning: no validation) when no source has a val split."""
        if not self.build_split("val"):
            log.warning(
                "no val records in any source %s: validation is skipped", [s.path for s in self.sources]
            )
            return []
        return self._loader(self._concat("val")[0], self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._concat("test")[0], self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def patch_stats(self) -> dict[str, dict[str, int]]:
        """Training patches per source and verdict (``whole`` / ``clipped`` / ``rejected``: cut too much or cut
        away, never trained on), for sources with ``patches``."""
        out: dict[str, dict[str, int]] = {}
        for part in self._parts.get("train", []):
            if hasattr(part.dataset, "stats"):  # a PatchDataset
                stats = out.setdefault(part.source.label, {})
                for key, value in part.dataset.stats.items():
                    stats[key] = stats.get(key, 0) + int(value)
        return out

    def source_counts(self, split: str = "train") -> dict[str, dict[int, int]]:
        """Records per source and ndim in ``split`` (for logs and the data summary)."""
        out: dict[str, dict[int, int]] = {}
        for part in self.build_split(split):
            out.setdefault(part.source.label, {})[part.ndim] = part.size
        return out
