"""TorchIO patches: boxes remapped into patches, the cut-target policy, target-centred sampling, grid inference."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mg3d.boxes import mask_to_box
from mg3d.data.records import GroundingRecord, MaskRef
from mg3d.data.sampling import (
    PatchPolicy,
    PatchSamples,
    boxes_from_grid_predictions,
    grid_patches,
    make_queue,
    make_subject,
    remap_boxes_to_patch,
)
from mg3d.data.transforms import PipelineConfig, build_pipeline, record_to_item
from mg3d.errors import ConfigError

BOX = (20.0, 6.0, 4.0, 26.0, 11.0, 8.0)


@pytest.fixture
def volume_sample(tmp_path):
    """A 32×32×16 CT phantom through the 3D pipeline without the fit to a model grid."""
    shape = (32, 32, 16)
    affine = np.diag([-1.5, -1.5, 2.0, 1.0])  # stored LPS: the pipeline's reorientation is the identity
    vol = np.full(shape, -700, np.int16)
    mask = np.zeros(shape, np.uint8)
    mask[20:26, 6:11, 4:8] = 1
    vol[mask > 0] = 500
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine), tmp_path / "mask.nii.gz")
    rec = GroundingRecord(
        id="synthetic3d/patch/1", dataset="synthetic3d", split="train", modality="CT", ndim=3,
        image=str(tmp_path / "ct.nii.gz"), text="the bright lesion", boxes=(BOX,), spatial_shape=shape,
        mask=MaskRef(str(tmp_path / "mask.nii.gz"), 1), spacing=(1.5, 1.5, 2.0), affine=tuple(map(tuple, affine)),
    )  # fmt: skip
    return build_pipeline(PipelineConfig(carry_mask=True), 3)(record_to_item(rec))


def test_remap_hand_computed():
    boxes = np.array([[10, 10, 10, 20, 20, 20.0]])
    whole = remap_boxes_to_patch(boxes, (5, 5, 5), (20, 20, 20))
    assert whole.status == "whole"
    np.testing.assert_allclose(whole.boxes, [[5, 5, 5, 15, 15, 15]])
    # patch [15, 35) on x keeps half of the box: visible 0.5 ≥ min_visible 0.5 → clipped
    half = remap_boxes_to_patch(boxes, (15, 0, 0), (20, 32, 32), PatchPolicy(min_visible=0.5))
    assert half.status == "clipped" and half.visible[0] == pytest.approx(0.5)
    np.testing.assert_allclose(half.boxes, [[0, 10, 10, 5, 20, 20]])
    assert (
        remap_boxes_to_patch(boxes, (15, 0, 0), (20, 32, 32), PatchPolicy(min_visible=0.6)).status
        == "rejected"
    )
    assert (
        remap_boxes_to_patch(boxes, (15, 0, 0), (20, 32, 32), PatchPolicy(edge="reject")).status == "rejected"
    )
    absent = remap_boxes_to_patch(boxes, (40, 0, 0), (8, 8, 8))
    assert absent.status == "absent" and absent.boxes.shape == (0, 6)
    assert (
        remap_boxes_to_patch(boxes, (40, 0, 0), (8, 8, 8), PatchPolicy(keep_absent=False)).status
        == "rejected"
    )


@settings(max_examples=60, deadline=None)
@given(
    lo=st.tuples(*[st.integers(0, 20)] * 3),
    size=st.tuples(*[st.integers(1, 10)] * 3),
    start=st.tuples(*[st.integers(0, 24)] * 3),
    patch=st.tuples(*[st.integers(2, 16)] * 3),
)
def test_remap_matches_cropping_a_mask(lo, size, start, patch):
    """Property: the clipped patch box is the box of the cropped mask; visibility is the voxel fraction."""
    hi = tuple(a + s for a, s in zip(lo, size))
    mask = np.zeros((40, 40, 40), bool)
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    crop = mask[tuple(slice(s, s + p) for s, p in zip(start, patch))]
    target = remap_boxes_to_patch(np.array([[*lo, *hi]], float), start, patch, PatchPolicy(min_visible=1e-9))
    assert target.visible[0] == pytest.approx(crop.sum() / mask.sum())
    if crop.any():
        np.testing.assert_allclose(target.boxes[0], mask_to_box(crop))
    else:
        assert target.status == "absent"


def test_subject_carries_record_and_target(volume_sample):
    subject = make_subject(volume_sample)
    assert subject["text"] == "the bright lesion" and subject["id"] == "synthetic3d/patch/1"
    np.testing.assert_allclose(subject["boxes"][0], BOX)
    assert tuple(subject["image"].shape) == (1, 32, 32, 16)
    np.testing.assert_allclose(
        mask_to_box(subject["target"].data[0].numpy()), volume_sample["target_boxes"][0]
    )
    with pytest.raises(ConfigError, match="3D volumes"):
        make_subject({**volume_sample, "ndim": 2})


@pytest.mark.parametrize("sampler", ["label", "weighted"])
def test_queue_patches_contain_target_with_configured_probability(volume_sample, sampler):
    torch.manual_seed(0)
    queue = make_queue([volume_sample] * 4, (12, 12, 8), target_probability=0.8, sampler=sampler,
                       samples_per_volume=25, max_length=100)  # fmt: skip
    patches = PatchSamples(queue, PatchPolicy(edge="clip", min_visible=1e-9, keep_absent=True))
    samples = list(patches)
    assert len(samples) == 100 and sum(patches.stats.values()) == 100
    with_target = [s for s in samples if s["patch_status"] != "absent"]
    assert 0.65 <= len(with_target) / len(samples) <= 1.0
    for s in samples:
        image = s["image"]
        assert tuple(image.shape) == (1, 12, 12, 8) and s["frame"].shape == (12, 12, 8)
        bright = image[0].numpy() > 0.6  # the lesion (500 HU) is the only bright tissue
        if s["patch_status"] == "absent":
            assert not bright.any() and s["boxes"].shape == (0, 6)
            continue
        # the remapped box is where the lesion is on the patch, and maps back into the original voxel frame
        np.testing.assert_allclose(mask_to_box(bright), s["target_boxes"][0])
        back = s["frame"].to_voxel(s["target_boxes"])[0]
        np.testing.assert_allclose(back, s["boxes"][0])
        assert np.all(back[:3] >= np.asarray(BOX[:3]) - 1e-9) and np.all(
            back[3:] <= np.asarray(BOX[3:]) + 1e-9
        )


def test_queue_policy_rejects_cut_targets(volume_sample):
    torch.manual_seed(1)
    queue = make_queue(
        [volume_sample] * 2, (8, 8, 6), target_probability=1.0, samples_per_volume=30, max_length=60
    )
    patches = PatchSamples(queue, PatchPolicy(edge="reject"))
    samples = list(patches)
    assert patches.stats["rejected"] > 0  # an 8-voxel patch cannot hold the 6-voxel box every time
    assert all(s["patch_status"] == "whole" for s in samples)
    assert patches.stats["rejected"] + len(samples) == 60


def test_grid_sampler_covers_volume_and_maps_predictions_back(volume_sample):
    patches = grid_patches(volume_sample, (16, 16, 8), overlap=(4, 4, 2))
    covered = np.zeros((32, 32, 16), bool)
    for p in patches:
        a, b = p["location"][:3], p["location"][3:]
        covered[a[0] : b[0], a[1] : b[1], a[2] : b[2]] = True
    assert covered.all()
    holding = [i for i, p in enumerate(patches) if p["patch_status"] == "whole"]
    assert holding
    # a "model" that answers each patch with the lesion's box on that patch (and an empty-ish box elsewhere)
    boxes, scores = [], []
    for p in patches:
        bright = p["image"][0].numpy() > 0.6
        boxes.append(mask_to_box(bright) if bright.any() else np.array([0, 0, 0, 1, 1, 1.0]))
        scores.append(float(bright.sum()))
    box, best = boxes_from_grid_predictions(patches, boxes, scores)
    assert best in holding
    np.testing.assert_allclose(box, BOX)
    with pytest.raises(ConfigError, match="exceeds the volume"):
        grid_patches(volume_sample, (64, 16, 8))
