"""Issue 19: user code at every entry point, the own-data importer, PET → SUV, modality checks, and every bad
input of the issue refused with one line naming the file / record / key (exit 2 from the scripts)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from mg3d.boxes import voxel_to_world
from mg3d.data.datamodule import GroundingDataModule, SourceConfig, check_sources
from mg3d.data.modalities import available_presets, check_preset_settings, get_preset
from mg3d.data.prepare import main as prepare_main
from mg3d.data.records import read_manifest
from mg3d.data.sources.own import OwnDataSource
from mg3d.data.sources.pet import parse_clock, suv_factor
from mg3d.data.synthetic.own_volumes import make_own_volumes
from mg3d.data.user_modules import import_user_module, imported_user_modules, user_modules_from
from mg3d.errors import ConfigError, DataError
from mg3d.inference_settings import check_input_kind
from mg3d.viz import _turn_boxes, _turn_volume, display_axes

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- user modules


def test_user_module_by_file_and_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "issue19_plugin_a.py").write_text("VALUE = 41\n", encoding="utf-8")
    info = import_user_module(tmp_path / "issue19_plugin_a.py")
    assert info.name == "issue19_plugin_a" and info.file == str((tmp_path / "issue19_plugin_a.py").resolve())
    assert sys.modules["issue19_plugin_a"].VALUE == 41 and info in imported_user_modules()
    assert not (tmp_path / "__pycache__").exists()  # a bundle's copy must stay the only file
    (tmp_path / "issue19_plugin_b.py").write_text("VALUE = 42\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert import_user_module("issue19_plugin_b").name == "issue19_plugin_b"
    with pytest.raises(ConfigError, match=r"user module 'no_such_mod_19' cannot be imported"):
        import_user_module("no_such_mod_19")
    with pytest.raises(ConfigError, match=r"missing\.py'?: file not found"):
        import_user_module(tmp_path / "missing.py")
    (tmp_path / "issue19_broken.py").write_text("raise RuntimeError('boom')\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"issue19_broken\.py' failed on import: RuntimeError: boom"):
        import_user_module(tmp_path / "issue19_broken.py")
    with pytest.raises(ConfigError, match=r"run\.ckpt: the model needs user module 'gone_19'"):
        user_modules_from([{"name": "gone_19", "file": "/nowhere/gone_19.py"}], "run.ckpt")


# ---------------------------------------------------------------------------------------------- config checks


def test_preset_names_and_options_checked_when_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"names preset 'MR_T1X', which is not registered; registered: \["):
        check_preset_settings(None, {"MR_T1X": {}}, "data.sources[0] (mr)")
    with pytest.raises(
        ConfigError, match=r"data.sources\[0\] \(mr\): modality preset 'MR': unknown option\(s\) \['lowr'\]"
    ):
        check_preset_settings(None, {"MR": {"lowr": 1.0}}, "data.sources[0] (mr)")
    with pytest.raises(ConfigError, match=r"pipeline.preset 'CTT' is not a registered preset"):
        check_preset_settings("CTT", {}, "x")
    with pytest.raises(DataError, match=r"data.sources\[0\] \(nowhere\): .*nowhere does not exist"):
        check_sources([{"path": str(tmp_path / "nowhere")}])
    with pytest.raises(ConfigError, match="unknown option"):  # the DataModule itself refuses it too
        GroundingDataModule(
            [SourceConfig(str(tmp_path), pipeline={"preset_options": {"PET": {"suvmax": 3}}})]
        )
    assert "PET" in available_presets()


def test_docs_point_at_files_that_exist() -> None:
    texts = [
        p.read_text(encoding="utf-8")
        for p in [*(REPO / "docs").glob("*.md"), *(REPO / "configs").rglob("*.yaml")]
    ]
    assert not [t for t in texts if "DESIGN.md" in t or "research/method.md" in t]
    assert all("runs/demo/version_" not in t for t in texts)  # the CSV logger writes under lightning_logs/


def _train_cli(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts/train.py"), "fit", "--trainer.max_steps=1", "--trainer.logger=false",
         f"--trainer.default_root_dir={tmp_path}", *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )  # fmt: skip


@pytest.mark.e2e
def test_train_script_refuses_bad_settings_in_one_line(tmp_path: Path) -> None:
    source = json.dumps({"path": str(tmp_path), "pipeline": {"preset_options": {"MRX": {}}}})
    done = _train_cli(tmp_path, f"--data.sources=[{source}]")
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.sources[0]") and "'MRX', which is not registered" in last
    assert "Traceback" not in done.stderr
    done = _train_cli(tmp_path, f"--data.sources=[{json.dumps({'path': str(tmp_path / 'nowhere')})}]")
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].endswith(
        "nowhere does not exist; give a folder with train/val/test.jsonl (prepare_data.py) or a .jsonl manifest"
    )
    assert "Loading" not in done.stderr  # refused before any model is built
    done = _train_cli(
        tmp_path, "--trainer.max_step=3", f"--data.sources=[{json.dumps({'path': str(tmp_path)})}]"
    )
    assert done.returncode == 2 and "max_step" in done.stderr  # no prefix matching to max_steps


# ---------------------------------------------------------------------------------------------- data


def test_datamodule_stops_on_a_source_with_no_usable_record(tmp_path: Path) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    make_own_volumes(good / "raw", 3, 0, modality="MR", shape=(16, 16, 8))
    make_own_volumes(bad / "raw", 2, 1, modality="MR", shape=(16, 16, 8))
    for folder in (good, bad):
        assert prepare_main(["own", "--table", str(folder / "raw"), "--modality", "MR", "--out", str(folder),
                             "--val-fraction", "0", "--test-fraction", "0", "--no-progress"]) == 0  # fmt: skip
    for path in (bad / "raw" / "images").iterdir():
        path.write_bytes(b"not a nifti")
    dm = GroundingDataModule([SourceConfig(str(good)), SourceConfig(str(bad))], on_error="skip", cache="none")
    with pytest.raises(DataError, match=r"source bad \(.*bad\): all 2 training record\(s\) were skipped"):
        dm.setup("fit")
    assert dm.skipped_report()["by_source"] == {"bad": 2}


def test_unknown_modality_in_a_manifest_names_the_way_to_register_it(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl"
    record = {"schema_version": 1, "id": "a/1", "dataset": "a", "split": "test", "modality": "MR_T2", "ndim": 3,
              "image": "x.nii.gz", "text": "t", "boxes": [[0, 0, 0, 1, 1, 1]], "spatial_shape": [2, 2, 2]}  # fmt: skip
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(
        DataError,
        match=r"test\.jsonl:1: .*unknown modality 'MR_T2'.*register_preset in a user module.*--imports",
    ):
        read_manifest(path)


def test_manifest_that_is_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"id": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:1: not UTF-8 text"):
        read_manifest(path)


def test_prepare_synthetic_honours_test_fraction(tmp_path: Path) -> None:
    args = ["synthetic", "--kind", "ct3d", "--n", "5", "--ct-shape", "32", "32", "16", "--no-progress"]
    assert prepare_main([*args, "--out", str(tmp_path / "a"), "--test-fraction", "0.4"]) == 0
    assert prepare_main([*args, "--out", str(tmp_path / "b"), "--test-fraction", "0"]) == 0
    summary = [json.loads((tmp_path / n / "summary.json").read_text(encoding="utf-8")) for n in "ab"]
    assert summary[0]["records"]["test"] > 0 and summary[1]["records"]["test"] == 0


def test_m3d_refseg_layout_takes_the_modality(tmp_path: Path) -> None:
    from mg3d.data.synthetic import make_ct3d

    make_ct3d(tmp_path / "raw", 2, 0, shape=(32, 32, 16), questions_per_region=(1, 0))
    assert prepare_main(["m3d-refseg", "--root", str(tmp_path / "raw"), "--modality", "MR", "--out",
                         str(tmp_path / "out"), "--no-progress"]) == 0  # fmt: skip
    records = [r for s in ("train", "val", "test") for r in read_manifest(tmp_path / "out" / f"{s}.jsonl")]
    assert records and {r.modality for r in records} == {"MR"}
    assert prepare_main(["m3d-refseg", "--root", str(tmp_path / "raw"), "--modality", "XX", "--out",
                         str(tmp_path / "out2"), "--no-progress"]) == 2  # fmt: skip


# ---------------------------------------------------------------------------------------------- own importer


def _table(path: Path, rows: list[dict]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_own_importer_masks_boxes_in_voxels_and_mm(tmp_path: Path) -> None:
    affine = np.array([[-1.5, 0, 0, 20.0], [0, -1.5, 0, 10.0], [0, 0, 3.0, -5.0], [0, 0, 0, 1]])
    image = np.zeros((20, 18, 10), np.float32)
    mask = np.zeros((20, 18, 10), np.uint8)
    mask[4:9, 5:7, 2:6] = 3
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine), tmp_path / "a_mask.nii.gz")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "b.png")  # 40 columns × 30 rows
    mm = voxel_to_world(np.array([2.0, 3.0, 1.0, 8.0, 9.0, 4.0]), affine)[0]
    table = _table(tmp_path / "t.csv", [
        {"image": "a.nii.gz", "phrase": "the mask target", "mask": "a_mask.nii.gz", "label": "3", "split": "train"},
        {"image": "a.nii.gz", "phrase": "a box in mm", "box": " ".join(map(str, mm)), "box_units": "mm",
         "split": "train"},
        {"image": "b.png", "phrase": "a 2D box", "box": "[1, 2, 30, 20]", "split": "test"},
        {"image": "b.png", "phrase": "outside", "box": "1 2 50 20", "split": "test"},
    ])  # fmt: skip
    source = OwnDataSource(table, modality="MR", on_error="skip")
    records = list(source)
    assert [r.boxes[0] for r in records] == [
        (4.0, 5.0, 2.0, 9.0, 7.0, 6.0),
        pytest.approx((2.0, 3.0, 1.0, 8.0, 9.0, 4.0)),
        (1.0, 2.0, 30.0, 20.0),
    ]
    assert (
        records[0].mask is not None and records[0].mask.label == 3 and records[0].spacing == (1.5, 1.5, 3.0)
    )
    assert records[2].ndim == 2 and records[2].spatial_shape == (40, 30) and records[2].affine is None
    assert {r.modality for r in records} == {"MR"}
    assert len(source.skips) == 1 and "t.csv:5" in source.skips.items[0].reason
    with pytest.raises(DataError, match=r"modality 'MRI' is not a registered key"):
        OwnDataSource(table, modality="MRI")
    _table(tmp_path / "u.csv", [{"image": "a.nii.gz", "label": "1"}])
    with pytest.raises(DataError, match=r"u\.csv: needs a 'phrase' \(or 'text'\) column"):
        OwnDataSource(tmp_path / "u.csv", modality="MR")


def test_pet_suv_factor_by_hand_and_conversion(tmp_path: Path) -> None:
    # 370 MBq, 70 kg, 60 min of ¹⁸F decay: dose 370e6 · 2^(-3600/6586.2) = 253.3 MBq; factor = 70 000 g / that
    factor = suv_factor(370e6, 70.0, "10:00:00", "110000.00")
    assert factor == pytest.approx(70_000 / (370e6 * 2 ** (-3600 / 6586.2)), rel=1e-12)
    assert factor == pytest.approx(2.7634e-4, rel=1e-4)
    assert parse_clock("2026-01-02T10:00:00", "t").hour == 10
    with pytest.raises(DataError, match="scan_time '09:00:00' is before injection_time"):
        suv_factor(370e6, 70.0, "10:00:00", "09:00:00")
    with pytest.raises(DataError, match="patient_weight_kg must be a positive number"):
        suv_factor(370e6, 0.0, "10:00:00", "11:00:00")
    raw = tmp_path / "raw"
    make_own_volumes(raw, 2, 0, modality="PET", shape=(16, 16, 8), pet_units="BQML")
    source = OwnDataSource(raw, modality="PET", pet_units="BQML", converted_dir=tmp_path / "suv")
    record = next(iter(source))
    suv = np.asarray(nib.load(record.image).dataobj)
    assert 3.0 < suv.max() < 9.0  # the phantom's lesion SUV, back from Bq/ml
    with pytest.raises(DataError, match="are not PET in SUV"):  # unconverted PET is refused by the preset
        get_preset("PET").check_input(np.asarray(nib.load(raw / "images/case000.nii.gz").dataobj), "case000")


# ---------------------------------------------------------------------------------------------- inference


def test_mismatched_modality_or_ndim_refused_in_one_line() -> None:
    check_input_kind({3: ("PET",)}, "PET", 3, "input 'x'", allow=False)
    check_input_kind(None, "CT", 2, "input 'x'", allow=False)  # unknown training data: nothing to check
    with pytest.raises(
        DataError, match=r"input 'x': modality 'CT', the model was trained on 3D PET only; refused"
    ):
        check_input_kind({3: ("PET",)}, "CT", 3, "input 'x'", allow=False)
    with pytest.raises(DataError, match=r"modality 'PET', the model was trained on 3D CT only"):
        check_input_kind({3: ("CT",)}, "PET", 3, "input 'x'", allow=False)
    with pytest.raises(DataError, match=r"is a 2D image, the model was trained on 3D images only"):
        check_input_kind({3: ("CT",)}, "CXR", 2, "input 'x.png'", allow=False)
    with pytest.warns(UserWarning, match="running anyway"):
        check_input_kind({3: ("CT",)}, "PET", 3, "input 'x'", allow=True)


def test_export_script_reads_evaluate_metrics(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from export_bundle import read_eval_metrics
    finally:
        sys.path.remove(str(REPO / "scripts"))
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"protocol": "mg3d", "thresholds": [0.5], "metrics": {"mIoU": 0.25, "n": 4}}))
    assert read_eval_metrics(path) == {"mIoU": 0.25, "n": 4.0}
    path.write_text(json.dumps({"mIoU": 0.25, "protocol": "mg3d"}))
    with pytest.raises(ConfigError, match=r"metrics\.json: metric 'protocol' is 'mg3d', not a finite number"):
        read_eval_metrics(path)


def test_pictures_turn_to_display_orientation_exactly() -> None:
    # stored axes: i → inferior, j → patient right, k → anterior (permuted and every one reversed vs. LPS)
    affine = np.array([[0, 2.0, 0, 0], [0, 0, 3.0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 1]])
    perm, flips = display_axes(affine)
    assert perm == [1, 2, 0] and flips == [True, True, True]  # L from R, P from A, S from I
    vol = np.zeros((6, 5, 4))
    vol[1:3, 2:4, 0:1] = 1
    turned = _turn_volume(vol, perm, flips)
    box = _turn_boxes(np.array([[1.0, 2.0, 0.0, 3.0, 4.0, 1.0]]), perm, flips, vol.shape)[0]
    idx = np.argwhere(turned > 0)
    assert np.array_equal(box, np.concatenate([idx.min(0), idx.max(0) + 1]))


def test_progress_bar_names_the_step_budget() -> None:
    from types import SimpleNamespace

    from mg3d.cli import StepsProgressBar

    bar = StepsProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=2000)
    assert bar._get_train_description(1).strip() == "Epoch 1 (max_steps 2000)"
    bar._trainer = SimpleNamespace(max_epochs=3, max_steps=-1)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"
