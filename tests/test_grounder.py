"""Tests for mg3d.grounder: end-to-end predictions, safe checkpoint loading, save/load round trips."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import tracemalloc
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mg3d.boxes import clip_boxes, voxel_to_world
from mg3d.data.datamodule import SourceConfig
from mg3d.data.records import GroundingRecord
from mg3d.data.transforms import PipelineConfig, build_pipeline, record_to_item
from mg3d.errors import ConfigError, DataError
from mg3d.frames import CoordinateFrame
from mg3d.grounder import (
    INFERENCE_CONFIG_NAME,
    Grounder,
    InferenceInput,
    load_checkpoint_safely,
    pipelines_from_hparams,
    probe_image,
)
from mg3d.grounding import GroundingPrompter, PromptConfig
from mg3d.grpo.config import EvalConfig
from mg3d.model import PolicyConfig
from mg3d.sft import sft_loss

# A policy small enough to learn the answer format in a few seconds (tiny-of-tiny; vision heads default to 4).
POLICY = PolicyConfig(
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    vision_depth=1,
    vision_hidden=32,
    vision_intermediate=64,
    seed=0,
)
PROMPT = PromptConfig(template="terse", max_vision_tokens=16)
PIPELINES = {"3d": PipelineConfig(spatial_size=(28, 28, 4)), "2d": PipelineConfig(spatial_size=(28, 28))}
MAX_NEW = 24
RAS = ((1.5, 0.0, 0.0, -20.0), (0.0, 1.5, 0.0, -30.0), (0.0, 0.0, 4.0, 10.0), (0.0, 0.0, 0.0, 1.0))
LAS = ((-1.5, 0.0, 0.0, 20.0), (0.0, 1.5, 0.0, -30.0), (0.0, 0.0, 4.0, 10.0), (0.0, 0.0, 0.0, 1.0))


def write_phantoms(folder: Path) -> list[GroundingRecord]:
    """Three 32×32×8 CT volumes (RAS and LAS affines) and two 40×24 PNG radiographs, each with a bright box."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    records = []
    for i, affine in enumerate((RAS, LAS, RAS)):
        vol = rng.normal(-700, 30, (32, 32, 8)).astype(np.int16)
        lo = (4 + 3 * i, 6, 1)
        hi = (lo[0] + 10, 20, 5)
        vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 60
        path = folder / f"ct{i}.nii.gz"
        nib.save(nib.Nifti1Image(vol, np.asarray(affine)), path)
        records.append(
            GroundingRecord(
                id=f"syn3/ct{i}/0",
                dataset="synthetic3d",
                split="test",
                modality="CT",
                ndim=3,
                image=str(path),
                text=["the bright block", "the lesion on the left", "the dense region"][i],
                boxes=((*lo, *hi),),
                spatial_shape=(32, 32, 8),
                spacing=(1.5, 1.5, 4.0),
                affine=affine,
                category="block",
            )
        )
    for i in range(2):
        img = (rng.random((24, 40)) * 60).astype(np.uint8)  # PIL: (rows, cols) → MONAI (x=40, y=24)
        img[5:15, 8 + 10 * i : 20 + 10 * i] = 230
        path = folder / f"cxr{i}.png"
        Image.fromarray(img).save(path)
        records.append(
            GroundingRecord(
                id=f"syn2/cxr{i}/0",
                dataset="synthetic2d",
                split="test",
                modality="CXR",
                ndim=2,
                image=str(path),
                text=["the opacity", "the right opacity"][i],
                boxes=((8 + 10 * i, 5, 20 + 10 * i, 15),),
                spatial_shape=(40, 24),
            )
        )
    return records


def train_policy(records: list[GroundingRecord], steps: int = 100):
    """Teacher-forced warm start (mg3d.sft) so the tiny model writes parseable boxes; deterministic."""
    torch.manual_seed(0)
    policy = POLICY.build()
    prompter = GroundingPrompter(policy, template=PROMPT.template, max_vision_tokens=PROMPT.max_vision_tokens)
    samples = [build_pipeline(PIPELINES[f"{r.ndim}d"], r.ndim)(record_to_item(r)) for r in records]
    batch = prompter.build(samples)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=3e-3)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    policy.model.train()
    for _ in range(steps):
        loss, _ = sft_loss(policy, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        decay.step()
    policy.model.eval()
    return policy


def make_grounder(policy) -> Grounder:
    return Grounder(policy, prompt=PROMPT, pipelines=PIPELINES, max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[GroundingRecord]:
    return write_phantoms(tmp_path_factory.mktemp("phantoms"))


@pytest.fixture(scope="module")
def grounder(records: list[GroundingRecord]) -> Grounder:
    return make_grounder(train_policy(records))


@pytest.fixture(scope="module")
def predictions(grounder: Grounder, records: list[GroundingRecord]) -> list:
    return list(grounder.predict_records(records, batch_size=8, progress=False))


def boxes_of(preds) -> list:
    return [(p.id, p.completion, p.box_voxel, p.box_world_mm) for p in preds]


# ---------------------------------------------------------------------------------------------- predictions


def test_predictions_follow_records_and_carry_ground_truth(predictions, records) -> None:
    assert [p.id for p in predictions] == [r.id for r in records]
    assert sum(p.ok for p in predictions) >= 3, [p.completion for p in predictions]  # the warm start took
    for p, r in zip(predictions, records):
        assert p.gt_boxes == r.boxes
        assert p.text == r.text and p.dataset == r.dataset and p.ndim == r.ndim and p.image == r.image
        assert p.spatial_shape == r.spatial_shape and p.codec == "qwen2.5-vl" and p.modality == r.modality
        frame = CoordinateFrame.from_dict(p.frame)
        assert frame.source_shape == r.spatial_shape
        if not p.ok:
            continue
        expected = clip_boxes(frame.to_voxel(np.asarray(p.box_text)), r.spatial_shape)[0]
        np.testing.assert_allclose(p.box_voxel, expected)
        assert np.all(np.asarray(p.box_voxel[: r.ndim]) >= 0)
        assert np.all(np.asarray(p.box_voxel[r.ndim :]) <= np.asarray(r.spatial_shape))
        if r.ndim == 3:
            np.testing.assert_allclose(p.box_world_mm, voxel_to_world(np.asarray(p.box_voxel), r.affine)[0])
        else:
            assert p.box_world_mm is None and p.affine is None


def test_box_maps_back_by_hand(predictions) -> None:
    """2D: pure resizes, voxel = text · (40/W_t, 24/H_t). 3D RAS→LPS flips x and y: x_vox = 32 − x_text · 32/X_t."""
    p2 = next(p for p in predictions if p.ndim == 2 and p.ok)
    wt, ht = CoordinateFrame.from_dict(p2.frame).shape
    x1, y1, x2, y2 = p2.box_text
    expected = np.clip([x1 * 40 / wt, y1 * 24 / ht, x2 * 40 / wt, y2 * 24 / ht], 0, [40, 24, 40, 24])
    np.testing.assert_allclose(p2.box_voxel, expected, atol=1e-9)
    p3 = next((p for p in predictions if p.ndim == 3 and p.ok and p.affine[0][0] > 0), None)
    assert p3 is not None
    xt, yt, zt = CoordinateFrame.from_dict(p3.frame).shape
    a1, b1, c1, a2, b2, c2 = p3.box_text
    expected3 = [
        32 - a2 * 32 / xt,
        32 - b2 * 32 / yt,
        c1 * 8 / zt,
        32 - a1 * 32 / xt,
        32 - b1 * 32 / yt,
        c2 * 8 / zt,
    ]
    np.testing.assert_allclose(p3.box_voxel, np.clip(expected3, 0, [32, 32, 8, 32, 32, 8]), atol=1e-9)
    # world: corner (edge) e maps to A·(e − ½); RAS diag(1.5, 1.5, 4) with origin (−20, −30, 10)
    lo = np.asarray(p3.box_voxel[:3]) - 0.5
    np.testing.assert_allclose(p3.box_world_mm[:3], lo * [1.5, 1.5, 4.0] + [-20, -30, 10], atol=1e-9)


def test_ground_truth_never_reaches_the_model(grounder, records) -> None:
    """Other ground truth, and none at all, give the same completion: the model is never shown the answer."""
    r = records[0]
    moved = replace(r, id="moved", boxes=((20.0, 20.0, 5.0, 30.0, 30.0, 8.0), (0.0, 0.0, 0.0, 2.0, 2.0, 2.0)))
    a, b = grounder.predict_records([r, moved], batch_size=1, progress=False)
    c = grounder.predict_image(r.image, r.text, modality="CT")
    assert a.completion == b.completion == c.completion
    assert a.box_voxel == b.box_voxel == c.box_voxel
    assert c.gt_boxes == () and b.gt_boxes == moved.boxes


def test_slices_strategy_does_not_centre_on_the_target(records, tmp_path: Path) -> None:
    """``slices`` tokenization centres its slice window on the target when one is given (training); the
    grounder gives none, so where the ground truth lies cannot change what the model sees."""
    path = tmp_path / "tall.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 24), dtype=np.int16), np.asarray(RAS)), path)
    base = replace(records[0], image=str(path), spatial_shape=(32, 32, 24))
    far = replace(base, id="far", boxes=((0.0, 0.0, 0.0, 4.0, 4.0, 1.0),))
    near = replace(base, id="near", boxes=((0.0, 0.0, 23.0, 4.0, 4.0, 24.0),))
    pipelines = {"3d": PipelineConfig(spatial_size=(28, 28, 24))}
    policy = POLICY.build()
    prompter = GroundingPrompter(policy, template="terse", volume_strategy="slices", max_vision_tokens=16)
    samples = [build_pipeline(pipelines["3d"], 3)(record_to_item(r)) for r in (far, near)]
    with_gt = prompter.build(samples, region_hint=True)
    # given the truth, the strategy shows other slices (it would leak the answer)
    assert with_gt.prompts[0] != with_gt.prompts[1]
    g = Grounder(
        policy, prompt=replace(PROMPT, volume_strategy="slices"), pipelines=pipelines, max_new_tokens=4
    )
    shown = g.prompt_batch([far, near])
    assert shown.prompts[0] == shown.prompts[1] and shown.gt_boxes[0].shape == (0, 6)
    assert torch.equal(
        shown.visuals[0].pixel_inputs["pixel_values"], shown.visuals[1].pixel_inputs["pixel_values"]
    )
    p_far, p_near = g.predict_records([far, near], batch_size=1, progress=False)
    assert p_far.frame == p_near.frame and p_far.completion == p_near.completion


def test_predict_image_and_inputs_match_records(grounder, records, predictions) -> None:
    inputs = [InferenceInput(r.image, r.text, id=r.id, modality=r.modality) for r in records]
    from_inputs = list(grounder.predict_inputs(inputs, batch_size=8))
    assert [(p.completion, p.box_voxel, p.box_world_mm) for p in from_inputs] == [
        (p.completion, p.box_voxel, p.box_world_mm) for p in predictions
    ]
    png = records[3]
    single = grounder.predict_image(png.image, png.text)  # default modality for 2D: CXR
    alone = next(grounder.predict_records([png], batch_size=1, progress=False))
    assert single.box_voxel == alone.box_voxel and single.id == "0000_cxr0" and single.modality == "CXR"


def test_batch_size_does_not_change_order_or_count(grounder, records) -> None:
    preds = list(grounder.predict_records(records + records[:2], batch_size=3, progress=False))
    assert [p.id for p in preds] == [r.id for r in records + records[:2]]


def test_save_pretrained_round_trip(grounder, records, predictions, tmp_path: Path) -> None:
    folder = grounder.save_pretrained(tmp_path / "model")
    names = sorted(p.name for p in folder.iterdir())
    assert (
        "model.safetensors" in names
        and INFERENCE_CONFIG_NAME in names
        and "preprocessor_config.json" in names
    )
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    settings_ = json.loads((folder / INFERENCE_CONFIG_NAME).read_text(encoding="utf-8"))
    assert settings_["prompt"]["template"] == "terse" and settings_["prompt"]["max_vision_tokens"] == 16
    assert settings_["pipelines"]["3d"]["spatial_size"] == [28, 28, 4]
    assert settings_["generation"]["max_new_tokens"] == MAX_NEW and settings_["codec"] == "qwen2.5-vl"
    loaded = Grounder.from_pretrained(folder)
    assert loaded.max_new_tokens == MAX_NEW and loaded.prompt_config == PROMPT
    again = list(loaded.predict_records(records, batch_size=8, progress=False))
    assert boxes_of(again) == boxes_of(predictions)


def test_from_pretrained_overrides_and_bad_settings(grounder, tmp_path: Path) -> None:
    folder = grounder.save_pretrained(tmp_path / "model")
    g = Grounder.from_pretrained(folder, max_new_tokens=5, pipelines={"2d": {"spatial_size": [56, 56]}})
    assert g.max_new_tokens == 5 and g.pipeline_config(None, 2).spatial_size == (56, 56)
    with pytest.raises(ConfigError, match="unknown override"):
        Grounder.from_pretrained(folder, template="r1")
    settings_ = json.loads((folder / INFERENCE_CONFIG_NAME).read_text(encoding="utf-8"))
    settings_["pipelines"]["3d"]["spatial_sise"] = [1, 2, 3]
    (folder / INFERENCE_CONFIG_NAME).write_text(json.dumps(settings_))
    with pytest.raises(ConfigError, match="spatial_sise"):
        Grounder.from_pretrained(folder)


def test_missing_image_names_the_record(grounder, records) -> None:
    bad = replace(records[0], id="broken/1", image=records[0].image + ".missing.nii.gz")
    with pytest.raises(DataError, match="broken/1"):
        list(grounder.predict_records([bad], progress=False))
    with pytest.raises(DataError, match="not found"):
        grounder.predict_image("/nonexistent/ct.nii.gz", "x")
    with pytest.raises(DataError, match="phrase is empty"):
        grounder.predict_image(records[0].image, "  ")


def nifti_claiming(path: Path, shape: tuple[int, ...]) -> Path:
    """A gzipped float32 NIfTI whose header claims ``shape`` but which holds almost no voxel data."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_zooms((1.0,) * len(shape))
    header.set_qform(np.eye(4), code=1)
    header["vox_offset"] = 352
    with gzip.open(path, "wb") as handle:
        handle.write(header.binaryblock + b"\0" * 68)
    return path


@pytest.mark.parametrize(
    ("shape", "reason"),
    [((4000, 4000, 4000), r"header claims 64,000,000,000 voxels"),  # above the voxel limit
     ((1000, 1000, 1000), r"truncated: header promises 4,000,000,352 bytes")],  # under it, but no data
)  # fmt: skip
def test_enormous_nifti_header_is_refused_without_allocating(records, tmp_path: Path, shape, reason) -> None:
    """The inference path (records whose file was swapped, records that agree with the header, a bare image)
    refuses a NIfTI whose header claims a huge volume before anything is allocated (nibabel would allocate the
    claimed 4-256 GB first)."""
    grounder = make_grounder(POLICY.build())  # untrained: the refusal comes before the model
    path = nifti_claiming(tmp_path / "huge.nii.gz", shape)
    swapped = replace(records[0], id="swapped/1", image=str(path))  # the manifest still says 32×32×8
    agreeing = replace(records[0], id="agreeing/1", image=str(path), spatial_shape=shape)
    tracemalloc.start()
    try:
        for record in (swapped, agreeing):
            with pytest.raises(DataError, match=rf"record '{record.id}'.*huge\.nii\.gz.*{reason}"):
                list(grounder.predict_records([record], progress=False))
        with pytest.raises(DataError, match=rf"huge\.nii\.gz.*{reason}"):
            grounder.predict_image(path, "the lesion")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, f"peak traced allocation {peak / 2**20:.1f} MB"


# ---------------------------------------------------------------------------------------------- checkpoints


def lightning_checkpoint(policy, path: Path, **extra) -> Path:
    """What Lightning writes for GRPOModule: ``model.*`` weights and ``save_hyperparameters`` dataclasses."""
    checkpoint = {
        "epoch": 0,
        "global_step": 60,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": {f"model.{k}": v for k, v in policy.model.state_dict().items()},
        "hyper_parameters": {
            "policy": POLICY,
            "prompt": PROMPT,
            "evaluation": EvalConfig(max_new_tokens=MAX_NEW),
            "rewards": {"format": 1.0, "iou": 1.0},
            "sampling_seed": 0,
        },
        "optimizer_states": [],
        "mg3d_eval_results": {"warm_start": {"greedy/mIoU": 0.25, "greedy/acc@0.5": 0.2, "n": 5.0}},
        "datamodule_hyper_parameters": {
            "sources": [
                SourceConfig(path="data/ct", name="ct", pipeline=PIPELINES["3d"]),
                SourceConfig(path="data/cxr", name="cxr", pipeline=PIPELINES["2d"]),
            ],
            "batch_size": 4,
        },
        **extra,
    }
    torch.save(checkpoint, path)
    return path


def test_from_checkpoint_reads_lightning_checkpoint(grounder, records, predictions, tmp_path: Path) -> None:
    path = lightning_checkpoint(grounder.policy, tmp_path / "last.ckpt")
    loaded = Grounder.from_checkpoint(path)
    assert loaded.prompt_config == PROMPT and loaded.max_new_tokens == MAX_NEW
    assert loaded.pipeline_config(None, 3).spatial_size == (28, 28, 4)
    assert loaded.pipeline_config(None, 2).spatial_size == (28, 28)
    assert loaded.checkpoint_info["eval_results"]["warm_start"]["greedy/mIoU"] == 0.25
    assert boxes_of(loaded.predict_records(records, batch_size=8, progress=False)) == boxes_of(predictions)


def test_from_checkpoint_without_datamodule_settings_warns(grounder, tmp_path: Path) -> None:
    path = lightning_checkpoint(grounder.policy, tmp_path / "last.ckpt", datamodule_hyper_parameters={})
    with pytest.warns(UserWarning, match="no DataModule pipeline settings"):
        loaded = Grounder.from_checkpoint(path)
    assert loaded.pipelines == {}
    assert Grounder.from_checkpoint(path, pipelines=PIPELINES).pipelines == PIPELINES


def test_from_checkpoint_refuses_mismatched_weights(grounder, tmp_path: Path) -> None:
    path = lightning_checkpoint(grounder.policy, tmp_path / "last.ckpt")
    with pytest.raises(ConfigError, match="do not fit"):
        Grounder.from_checkpoint(path, policy={"hidden_size": 128, "intermediate_size": 256})
    empty = tmp_path / "empty.ckpt"
    torch.save({"state_dict": {"other.w": torch.zeros(1)}, "hyper_parameters": {}}, empty)
    with pytest.raises(ConfigError, match="no 'model"):
        Grounder.from_checkpoint(empty)


class _Payload:
    """Unpickling this runs ``os.system(touch <marker>)`` — unless the loader refuses it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_checkpoint_is_refused_and_never_runs(grounder, tmp_path: Path) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    zipped = lightning_checkpoint(grounder.policy, tmp_path / "evil.ckpt", callbacks={"x": _Payload(marker)})
    with pytest.raises(ConfigError, match=r"refused.*(posix|nt)\.system"):
        Grounder.from_checkpoint(zipped)
    legacy = tmp_path / "evil_legacy.ckpt"  # a raw pickle, not torch's zip format
    with legacy.open("wb") as handle:
        pickle.dump({"state_dict": {}, "x": _Payload(marker)}, handle)
    with pytest.raises(ConfigError, match="refused"):
        load_checkpoint_safely(legacy)
    assert not marker.exists()
    # the payload is real: plain unpickling would have run it
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def test_only_mg3d_config_dataclasses_are_allowed(tmp_path: Path) -> None:
    path = tmp_path / "class_ref.ckpt"
    torch.save({"state_dict": {}, "cls": Grounder}, path)  # a class reference, not a config dataclass
    with pytest.raises(ConfigError, match=r"mg3d\.grounder\.Grounder"):
        load_checkpoint_safely(path)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConfigError, match=r"garbage\.ckpt"):
        load_checkpoint_safely(garbage)
    with pytest.raises(ConfigError, match="not found"):
        load_checkpoint_safely(tmp_path / "nope.ckpt")


# ---------------------------------------------------------------------------------------------- helpers


def test_pipelines_from_hparams() -> None:
    a3, b3 = PipelineConfig(spatial_size=(32, 32, 8)), PipelineConfig(spatial_size=(16, 16, 8))
    a2 = PipelineConfig(spatial_size=(56, 56))
    found = pipelines_from_hparams(
        {"sources": [SourceConfig("x", name="ct", pipeline=a3), SourceConfig("y", pipeline=a2)]}
    )
    assert found["3d"] == a3 and found["ct"] == a3 and found["2d"] == a2 and set(found) == {"ct", "2d", "3d"}
    # two different 3D settings: no "3d" default, only the named one
    clash = pipelines_from_hparams(
        [SourceConfig("x", name="ct", pipeline=a3), SourceConfig("y", pipeline=b3)]
    )
    assert clash["3d"] is None and clash["ct"] == a3
    g = Grounder.__new__(Grounder)  # only the lookup table is needed, not a model
    g.pipelines = clash
    assert g.pipeline_config("ct", 3) is a3
    with pytest.raises(ConfigError, match=r"several different 3D pipelines \(\['ct'\]\)"):
        g.pipeline_config("other", 3)
    # a config without a grid applies to both kinds; plain dicts under "pipeline" are read too
    both = pipelines_from_hparams({"sources": [{"path": "z", "pipeline": {"axcodes": "RAS"}}]})
    assert both["2d"].axcodes == "RAS" and both["3d"].axcodes == "RAS"
    assert pipelines_from_hparams({}) == {}


def test_probe_image(records, tmp_path: Path) -> None:
    assert probe_image(records[0].image).spatial_shape == (32, 32, 8)
    assert probe_image(records[0].image).has_geometry
    info = probe_image(records[3].image)
    assert (info.ndim, info.spatial_shape, info.has_geometry) == (2, (40, 24), False)
    np.save(tmp_path / "vol.npy", np.zeros((1, 4, 5, 6), dtype=np.float32))
    assert probe_image(tmp_path / "vol.npy").spatial_shape == (4, 5, 6)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"bad\.png"):
        probe_image(tmp_path / "bad.png")


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.sampled_from(["2d", "3d", "ct", "cxr"]), max_size=4),
    st.integers(2, 3),
    st.sampled_from([None, "ct", "x"]),
)
def test_pipeline_lookup_prefers_dataset_then_ndim(keys, ndim, dataset) -> None:
    configs = {
        k: PipelineConfig(spatial_size=(8 + i,) * (3 if k in ("3d", "ct") else 2)) for i, k in enumerate(keys)
    }
    g = Grounder.__new__(Grounder)  # only the lookup table is needed, not a model
    g.pipelines = configs
    got = g.pipeline_config(dataset, ndim)
    if dataset in configs:
        assert got is configs[dataset]
    elif f"{ndim}d" in configs:
        assert got is configs[f"{ndim}d"]
    else:
        assert got == PipelineConfig()


# ---------------------------------------------------------------------------------------------- the training module


@pytest.mark.slow
@pytest.mark.e2e
def test_grpo_module_checkpoint_matches_module_predictions(records, tmp_path: Path) -> None:
    """A real GRPOModule trained by a Lightning Trainer (warm start only), checkpointed, then read back."""
    import lightning.pytorch as pl

    from mg3d.generation import RolloutConfig
    from mg3d.grpo.config import OptimConfig, WarmStartConfig
    from mg3d.grpo.module import GRPOModule

    samples = [build_pipeline(PIPELINES[f"{r.ndim}d"], r.ndim)(record_to_item(r)) for r in records]
    steps = 100  # warm start (as train_policy: no gradient clipping, linear decay); then one GRPO step
    module = GRPOModule(
        policy=POLICY,
        prompt=PROMPT,
        rollout=RolloutConfig(num_generations=2, max_new_tokens=MAX_NEW, stop_strings=("</answer>",)),
        warm_start=WarmStartConfig(steps=steps, lr=3e-3, schedule="linear"),
        evaluation=EvalConfig(enabled=False, max_new_tokens=MAX_NEW),
        optim=OptimConfig(max_grad_norm=0.0),
    )
    loader = torch.utils.data.DataLoader(samples, batch_size=len(samples), collate_fn=list)
    trainer = pl.Trainer(
        max_steps=steps + 1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    path = tmp_path / "grpo.ckpt"
    trainer.save_checkpoint(path)
    module.eval()
    batch, texts, _ = module.predict_samples(samples)
    decoded = module.prompter.read(texts, batch, list(range(len(texts))))

    grounder = Grounder.from_checkpoint(path, pipelines=PIPELINES)
    preds = list(grounder.predict_records(records, batch_size=len(records), progress=False))
    assert [p.completion for p in preds] == texts
    assert sum(d.box_source is not None for d in decoded) >= 3, texts  # a meaningful comparison: boxes exist
    assert grounder.checkpoint_info["global_step"] == steps + 1
    # the rollout's stop strings carry over: the grounder generates as the module evaluates
    assert grounder.stop_strings == ("</answer>",)
    assert any("</answer>" in t for t in texts) and all(
        t.endswith("</answer>") for t in texts if "</answer>" in t
    )
    assert Grounder.from_pretrained(grounder.save_pretrained(tmp_path / "model")).stop_strings == (
        "</answer>",
    )
    for p, d, r in zip(preds, decoded, records):
        expected = None if d.box_source is None else tuple(clip_boxes(d.box_source[None], r.spatial_shape)[0])
        assert p.box_voxel == expected
