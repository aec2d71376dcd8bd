"""GroundingDataModule: mixed 2D + 3D sources, weights, caching, collate, LightningCLI-readable config."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from PIL import Image

import mg3d.data.transforms as transforms
from mg3d.boxes import mask_to_box
from mg3d.data.datamodule import (
    GroundingDataModule,
    SourceConfig,
    batch_columns,
    collate_samples,
    load_source_records,
)
from mg3d.data.records import GroundingRecord, MaskRef, write_manifest
from mg3d.data.transforms import PipelineConfig
from mg3d.errors import ConfigError, DataError
from mg3d.frames import CoordinateFrame


def make_ct_source(root: Path, n: int = 3, splits=("train", "val")) -> Path:
    """Tiny CT volumes (32×32×16, RAS, 1.5 mm) with a bright lesion; one manifest per split."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for split in splits:
        records = []
        for i in range(n):
            vol = np.full((32, 32, 16), -800, np.int16)
            lo = rng.integers(2, 20, size=3)
            lo[2] = rng.integers(1, 9)
            hi = lo + np.array([6, 5, 4])
            mask = np.zeros(vol.shape, np.uint8)
            mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 2
            vol[mask > 0] = 300
            stem = f"{split}_{i}"
            nib.save(nib.Nifti1Image(vol, affine), root / f"{stem}.nii.gz")
            nib.save(nib.Nifti1Image(mask, affine), root / f"{stem}_mask.nii.gz")
            records.append(GroundingRecord(
                id=f"synthetic3d/{stem}/2", dataset="synthetic3d", split=split, modality="CT", ndim=3,
                image=f"{stem}.nii.gz", text=f"lesion {i}", boxes=(tuple(float(v) for v in [*lo, *hi]),),
                spatial_shape=(32, 32, 16), mask=MaskRef(f"{stem}_mask.nii.gz", 2), spacing=(1.5, 1.5, 2.0),
                affine=tuple(map(tuple, affine.tolist())),
            ))  # fmt: skip
        write_manifest(root / f"{split}.jsonl", records)
    return root


def make_cxr_source(root: Path, n: int = 4, splits=("train", "val")) -> Path:
    """Tiny radiographs (48 wide × 40 tall PNG) with one bright finding each."""
    root.mkdir(parents=True, exist_ok=True)
    for split in splits:
        records = []
        for i in range(n):
            arr = np.full((40, 48), 60, np.uint8)
            x0, y0 = 4 + 6 * i, 5 + 3 * i
            arr[y0 : y0 + 8, x0 : x0 + 10] = 230
            Image.fromarray(arr).save(root / f"{split}_{i}.png")
            records.append(GroundingRecord(
                id=f"synthetic2d/{split}/{i}", dataset="synthetic2d", split=split, modality="CXR", ndim=2,
                image=f"{split}_{i}.png", text=f"opacity in the left lung {i}",
                boxes=((float(x0), float(y0), float(x0 + 10), float(y0 + 8)),), spatial_shape=(48, 40),
            ))  # fmt: skip
        write_manifest(root / f"{split}.jsonl", records)
    return root


@pytest.fixture
def sources(tmp_path):
    ct = make_ct_source(tmp_path / "ct")
    cxr = make_cxr_source(tmp_path / "cxr")
    return [
        SourceConfig(str(ct), weight=1.0, name="ct", pipeline=PipelineConfig(spatial_size=(16, 16, 8))),
        SourceConfig(
            str(cxr), weight=3.0, name="cxr", pipeline=PipelineConfig(spatial_size=(24, 20), fit="letterbox")
        ),
    ]


def test_mixed_2d_3d_batch_keeps_samples_aligned(sources):
    sources[0].pipeline.carry_mask = True  # volumes bring their masks, radiographs have none: still one batch
    dm = GroundingDataModule(sources, batch_size=7, num_workers=0, seed=1, samples_per_epoch=28)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 4
    mixed = [b for b in batches if {s["ndim"] for s in b} == {2, 3}]
    assert mixed, "some batch must hold both radiographs and volumes"
    for batch in batches:
        assert isinstance(batch, list) and len(batch) == 7 and all(isinstance(s, dict) for s in batch)
        cols = batch_columns(batch)
        assert all(len(v) == 7 for v in cols.values()) and cols["text"][3] == batch[3]["text"]
        for image, boxes, target, frame, ndim, text, sid in zip(
            cols["image"],
            cols["boxes"],
            cols["target_boxes"],
            cols["frame"],
            cols["ndim"],
            cols["text"],
            cols["id"],
        ):
            assert isinstance(frame, CoordinateFrame) and frame.ndim == ndim == image.ndim - 1
            assert (batch[cols["id"].index(sid)]["mask"] is None) == (ndim == 2)
            assert tuple(image.shape[1:]) == ((16, 16, 8) if ndim == 3 else (24, 20))
            assert sid.startswith("synthetic3d/" if ndim == 3 else "synthetic2d/")
            assert text.startswith("lesion" if ndim == 3 else "opacity")
            # the sample's own bright target is where its box says, so nothing was shuffled between samples
            found = mask_to_box(image[0].numpy() > 0.6)
            np.testing.assert_allclose(found, target[0], atol=1.0)
            np.testing.assert_allclose(frame.to_voxel(target)[0], boxes[0], atol=1e-9)


def test_batches_of_both_kinds_appear_and_weights_follow_config(sources):
    dm = GroundingDataModule(sources, batch_size=8, seed=0, samples_per_epoch=400)
    dm.setup("fit")
    weights = dm.sample_weights("train")
    assert weights.shape == (3 + 4,)
    torch.testing.assert_close(weights[:3].sum(), torch.tensor(0.25, dtype=torch.float64))
    torch.testing.assert_close(weights[3:].sum(), torch.tensor(0.75, dtype=torch.float64))
    indices = list(dm.train_dataloader().sampler)
    share_2d = sum(i >= 3 for i in indices) / len(indices)
    assert 0.65 < share_2d < 0.85
    assert dm.source_counts("train") == {"ct": {3: 3}, "cxr": {2: 4}}


def test_validation_reads_every_record_in_order_without_augmentation(sources):
    for s in sources:
        s.pipeline.augment.lateral_flip_prob = 1.0  # must not apply outside training
    dm = GroundingDataModule(sources, batch_size=2, eval_batch_size=5)
    dm.setup("validate")
    ids = [s["id"] for batch in dm.val_dataloader() for s in batch]
    assert ids == [f"synthetic3d/val_{i}/2" for i in range(3)] + [f"synthetic2d/val/{i}" for i in range(4)]
    batch = next(iter(dm.val_dataloader()))
    assert not any(s["flipped"] for s in batch)


def test_eval_samples_and_missing_val_split(sources, tmp_path):
    dm = GroundingDataModule(sources, batch_size=2)
    samples = dm.eval_samples(4)
    assert [s["id"] for s in samples] == [f"synthetic3d/val_{i}/2" for i in range(3)] + ["synthetic2d/val/0"]
    assert len(dm.eval_samples()) == 7 and dm.eval_samples(split="test") == []
    train_only = make_cxr_source(tmp_path / "train_only", n=1, splits=("train",))
    dm = GroundingDataModule([SourceConfig(str(train_only), pipeline=PipelineConfig(spatial_size=(8, 8)))])
    dm.setup("fit")
    assert dm.val_dataloader() == [] and dm.eval_samples() == []
    with pytest.raises(DataError, match="no test records"):
        dm.test_dataloader()


def test_training_augmentations_are_seeded(sources):
    for s in sources:
        s.pipeline.augment.noise_prob = 1.0
    first = next(iter(_fit(GroundingDataModule(sources, batch_size=4, seed=5)).train_dataloader()))
    second = next(iter(_fit(GroundingDataModule(sources, batch_size=4, seed=5)).train_dataloader()))
    other = next(iter(_fit(GroundingDataModule(sources, batch_size=4, seed=6)).train_dataloader()))
    assert [s["id"] for s in first] == [s["id"] for s in second]
    for a, b in zip(first, second):
        torch.testing.assert_close(a["image"], b["image"])
    assert [s["id"] for s in first] != [s["id"] for s in other] or any(
        a["image"].shape != b["image"].shape or not torch.equal(a["image"], b["image"])
        for a, b in zip(first, other)
    )


def _fit(dm):
    dm.setup("fit")
    return dm


def test_memory_cache_decodes_each_file_once(sources, monkeypatch):
    calls = Counter()
    original = transforms.LoadRecordd.__call__

    def counting(self, data):
        calls[data["id"]] += 1
        return original(self, data)

    monkeypatch.setattr(transforms.LoadRecordd, "__call__", counting)
    dm = GroundingDataModule(sources, batch_size=7, samples_per_epoch=21, cache="memory")
    dm.setup("fit")
    for _ in range(2):  # two epochs
        for _batch in dm.train_dataloader():
            pass
    train_ids = [f"synthetic3d/train_{i}/2" for i in range(3)] + [f"synthetic2d/train/{i}" for i in range(4)]
    assert all(calls[i] == 1 for i in train_ids), calls


def test_disk_cache_is_reused(sources, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    dm = GroundingDataModule(sources, batch_size=4, cache="disk", cache_dir=str(cache))
    dm.setup("validate")
    first = [b for b in dm.val_dataloader()]
    assert len(list(cache.rglob("*.pt"))) == 3 + 4
    calls = Counter()
    original = transforms.LoadRecordd.__call__

    def counting(self, data):
        calls[data["id"]] += 1
        return original(self, data)

    monkeypatch.setattr(transforms.LoadRecordd, "__call__", counting)
    again = GroundingDataModule(sources, batch_size=4, cache="disk", cache_dir=str(cache))
    again.setup("validate")
    second = [b for b in again.val_dataloader()]
    assert not calls, f"a new run decoded files again: {calls}"  # every item came from the disk cache
    for a, b in zip(first, second):
        for x, y in zip(a, b):
            assert x["id"] == y["id"]
            torch.testing.assert_close(x["image"], y["image"])
            assert x["frame"].to_dict() == y["frame"].to_dict()


def test_single_manifest_file_is_split_by_field(tmp_path):
    root = make_cxr_source(tmp_path / "one", n=2, splits=("train", "test"))
    # one file holding both splits, beside the images its relative paths point to
    (root / "all.jsonl").write_text(
        (root / "train.jsonl").read_text(encoding="utf-8") + (root / "test.jsonl").read_text(encoding="utf-8")
    )
    src = SourceConfig(str(root / "all.jsonl"), pipeline=PipelineConfig(spatial_size=(24, 20)))
    assert [r.id for r in load_source_records(src, "test")] == ["synthetic2d/test/0", "synthetic2d/test/1"]
    assert load_source_records(src, "val") == []


def test_lightning_cli_style_config_is_parsed(tmp_path):
    ct = make_ct_source(tmp_path / "ct", n=1, splits=("train",))
    parser = ArgumentParser()
    parser.add_class_arguments(GroundingDataModule, "data")
    config = {
        "data": {
            "sources": [
                {"path": str(ct), "weight": 2.0, "pipeline": {"spatial_size": [16, 16, 8], "pixdim": [2.0, 2.0, 2.0],
                 "preset_options": {"CT": {"windows": ["lung", "mediastinum"]}},
                 "augment": {"lateral_flip_prob": 0.5, "noise_prob": 0.2}}},
            ],
            "batch_size": 2,
            "cache": "none",
        }
    }  # fmt: skip
    cfg = parser.parse_string(json.dumps(config))
    dm = parser.instantiate(cfg).data
    assert isinstance(dm, GroundingDataModule)
    source = dm.sources[0]
    assert source.weight == 2.0 and source.pipeline.spatial_size == (16, 16, 8)
    assert source.pipeline.augment.lateral_flip_prob == 0.5
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch[0]["image"].shape == (2, 16, 16, 8)  # two CT windows → two channels


def test_errors_name_the_source(tmp_path):
    with pytest.raises(DataError, match="neither a manifest folder"):
        GroundingDataModule([SourceConfig(str(tmp_path / "missing"))]).setup("fit")
    cxr = make_cxr_source(tmp_path / "cxr", n=1, splits=("train",))
    bad = SourceConfig(str(cxr), name="cxr", pipeline=PipelineConfig(spatial_size=(8, 8, 8)))
    with pytest.raises(ConfigError, match=r"source cxr.*synthetic2d/train/0"):
        GroundingDataModule([bad]).setup("fit")
    with pytest.raises(ConfigError, match="weight"):
        SourceConfig(str(cxr), weight=0.0)
    with pytest.raises(ConfigError, match="cache_dir"):
        GroundingDataModule([SourceConfig(str(cxr))], cache="disk")
    empty = make_cxr_source(tmp_path / "val_only", n=1, splits=("val",))
    with pytest.raises(DataError, match="no training records"):
        GroundingDataModule([SourceConfig(str(empty), pipeline=PipelineConfig(spatial_size=(8, 8)))]).setup(
            "fit"
        )
    with pytest.raises(DataError, match="empty batch"):
        collate_samples([])
    with pytest.raises(DataError, match=r"differ in keys \['mask'\]"):
        collate_samples([{"id": "a", "text": "t"}, {"id": "b", "text": "t", "mask": None}])


def test_synthetic_m3d_layout_through_prepare_and_datamodule(tmp_path):
    """The real adapters on the phantom generator, then the pipeline: the end-to-end data path."""
    from mg3d.data.prepare import main as prepare_main

    out = tmp_path / "m3d"
    code = prepare_main(["synthetic", "--kind", "ct3d", "--n", "2", "--ct-shape", "32", "32", "16", "--out", str(out),
                         "--no-progress", "--val-fraction", "0", "--test-fraction", "0.5"])  # fmt: skip
    assert code == 0
    src = SourceConfig(str(out), pipeline=PipelineConfig(spatial_size=(16, 16, 8), carry_mask=True))
    dm = GroundingDataModule([src], batch_size=64, cache="none")
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    for mask, target, frame, boxes in zip(
        *(batch_columns(batch)[k] for k in ("mask", "target_boxes", "frame", "boxes"))
    ):
        assert mask is not None  # every M3D record has a mask, and this source carries it
        if mask.any():
            np.testing.assert_allclose(mask_to_box(mask[0].numpy()), target[0], atol=1.0)
        np.testing.assert_allclose(frame.to_voxel(frame.to_text(boxes)), boxes, atol=1e-9)


def test_changed_phantom_settings_are_refused_not_silently_reused(tmp_path):
    """A source folder with a manifest is reused; if its phantoms were written with other settings than the
    config now asks for, prepare_data stops naming the setting instead of training on the old phantoms."""
    folder = tmp_path / "ct3d"
    options = {"shape": [32, 32, 16], "single_lesion": True, "question_style": "phrase"}

    def module(**changes):
        spec = {"kind": "ct3d", "n": 2, "seed": 1, "questions_per_region": [1, 0], "options": dict(options)}
        spec.update(changes)
        return GroundingDataModule([SourceConfig(str(folder), synthetic=spec)], cache="none")

    module().prepare_data()
    written = (folder / "train.jsonl").stat().st_mtime_ns
    module().prepare_data()  # same settings (lists vs the tuples on disk, ints vs floats): reused as is
    assert (folder / "train.jsonl").stat().st_mtime_ns == written
    with pytest.raises(
        ConfigError, match=r"options\.lesion_contrast_hu: None on disk, \[300, 500\] in the config"
    ):
        module(options={**options, "lesion_contrast_hu": [300, 500]}).prepare_data()
    with pytest.raises(
        ConfigError, match=r"source ct3d: .*seed: 1 on disk, 2 in the config; n: 2 on disk, 3"
    ):
        module(n=3, seed=2).prepare_data()
    with pytest.raises(
        ConfigError, match=r"options\.question_style: 'phrase' on disk, 'question' in the config"
    ):
        module(options={**options, "question_style": "question"}).prepare_data()
    # a folder without the generator's truth file (a user's own manifests) is not second-guessed
    (folder / "raw" / "phantom_truth.json").unlink()
    module(n=3).prepare_data()
