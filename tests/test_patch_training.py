"""The TorchIO patch sampler as a DataModule option (issue 19): large volumes trained on patches of the model
grid, cut targets boxed exactly from their carried mask, cut-away targets never trained on (counted), targets
larger than the patch still sampled."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mg3d.boxes import mask_to_box
from mg3d.data.datamodule import GroundingDataModule, SourceConfig
from mg3d.data.prepare import main as prepare_main
from mg3d.data.sampling import PatchPolicy, remap_boxes_to_patch
from mg3d.errors import ConfigError


def test_target_larger_than_the_patch_is_kept_when_it_fills_it() -> None:
    big = np.array([[0.0, 0.0, 0.0, 40.0, 40.0, 40.0]])
    inside = remap_boxes_to_patch(big, (10, 10, 10), (8, 8, 8), PatchPolicy(min_visible=0.5))
    assert inside.status == "clipped" and inside.boxes.tolist() == [[0, 0, 0, 8, 8, 8]]
    corner = remap_boxes_to_patch(big, (36, 36, 36), (8, 8, 8), PatchPolicy(min_visible=0.5))
    assert corner.status == "rejected"  # 4³ of the 8³ the target could fill: 1/8 < 0.5


@pytest.fixture(scope="module")
def patch_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Volumes of 40×40×20 (1 mm) with a large target (a 24×20×12 block) or a small one (4³), masks carried."""
    root = tmp_path_factory.mktemp("patches")
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    rows = []
    rng = np.random.default_rng(0)
    for case in range(4):
        image = rng.normal(100, 5, (40, 40, 20)).astype(np.float32)
        mask = np.zeros((40, 40, 20), np.uint8)
        if case % 2:
            mask[8:32, 10:30, 4:16] = 1
        else:
            mask[18:22, 18:22, 8:12] = 1
        image[mask > 0] += 300
        nib.save(nib.Nifti1Image(image, affine), root / f"i{case}.nii.gz")
        nib.save(nib.Nifti1Image(mask, affine), root / f"m{case}.nii.gz")
        rows.append(
            {"image": f"i{case}.nii.gz", "phrase": "the block", "mask": f"m{case}.nii.gz", "split": "train"}
        )
    with (root / "phrases.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert (
        prepare_main(
            ["own", "--table", str(root), "--modality", "MR", "--out", str(root / "data"), "--no-progress"]
        )
        == 0
    )
    return root / "data"


def test_datamodule_trains_on_patches_with_exact_boxes(patch_source: Path) -> None:
    source = SourceConfig(
        str(patch_source),
        pipeline={"spatial_size": None, "pixdim": None},
        patches={"patch_size": (16, 16, 8), "samples_per_volume": 2, "queue_length": 8, "min_visible": 0.3},
    )
    dm = GroundingDataModule([source], batch_size=4, cache="memory", samples_per_epoch=12)
    dm.setup("fit")
    samples = [s for batch in dm.train_dataloader() for s in batch]
    assert len(samples) == 12
    for sample in samples:
        assert tuple(sample["image"].shape) == (1, 16, 16, 8)
        assert sample["mask"] is not None and bool(sample["mask"].any())  # cut-away targets are never drawn
        box = np.asarray(sample["target_boxes"])[0]
        assert np.array_equal(box, mask_to_box(sample["mask"][0].numpy()))  # exact, from the mask
        back = sample["frame"].to_voxel(box[None])[0]
        assert np.all(back[:3] >= 0) and np.all(back[3:] <= [40, 40, 20])
    stats = dm.patch_stats()["data"]
    assert stats.get("whole", 0) + stats.get("clipped", 0) == 12
    assert stats.get("clipped", 0) > 0  # the large targets (24×20×12 > 16×16×8) are sampled, cut


def test_patches_refuse_a_fixed_model_grid(patch_source: Path) -> None:
    with pytest.raises(ConfigError, match=r"set pipeline.spatial_size: null"):
        SourceConfig(
            str(patch_source), pipeline={"spatial_size": (16, 16, 8)}, patches={"patch_size": (16, 16, 8)}
        )
