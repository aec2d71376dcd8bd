"""Tests of mg3d.data.prepare and scripts/prepare_data.py: manifests, summary.json, the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_sources import M3D_HEADER, refseg_rows, save_image, small_refseg, write_csv

from mg3d.data.prepare import main, prepare
from mg3d.data.records import read_manifest
from mg3d.data.sources import ChestXray8Source, M3DRefSegSource
from mg3d.errors import DataError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "prepare_data.py"


def _nih_small(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "nih"
    for name in ("00000001_000.png", "00000002_000.png", "00000003_000.png"):
        save_image(images / name, np.zeros((1024, 1024), np.uint8), compress_level=1)
    bbox = tmp_path / "BBox_List_2017.csv"
    bbox.write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "00000001_000.png,Infiltrate,10,20,30,40,,,\n"
        "00000001_000.png,Infiltrate,100,200,30,40,,,\n"
        "00000002_000.png,Mass,500,500,50,60,,,\n"
        "00000003_000.png,Mass,1000,500,50,60,,,\n"  # outside the 1024² image
    )
    return bbox, images


def _read_all(out: Path) -> dict[str, list]:
    return {split: read_manifest(out / f"{split}.jsonl") for split in ("train", "val", "test")}


def test_prepare_writes_manifests_and_matching_summary(tmp_path: Path) -> None:
    root = small_refseg(tmp_path, n_cases=3)
    (root / "s0002" / "text.json").write_text('{"1": "only one region"}')  # region 2 rows of s0002 are bad
    bbox, images = _nih_small(tmp_path)
    sources = [
        M3DRefSegSource(root, on_error="skip"),
        ChestXray8Source(bbox, images, on_error="skip", test_fraction=0.4),
    ]
    out = tmp_path / "out"
    summary = prepare(sources, out, progress=False, command=["prepare_data.py", "test"])
    written = _read_all(out)
    records = [r for split in written.values() for r in split]
    on_disk = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert on_disk == summary

    assert summary["records"] == {"total": len(records), **{s: len(v) for s, v in written.items()}}
    assert summary["boxes"]["total"] == sum(len(r.boxes) for r in records)
    for key, table in (
        ("dataset", "datasets"),
        ("category", "categories"),
        ("question_type", "question_types"),
        ("modality", "modalities"),
    ):
        expected = Counter((str(getattr(r, key)), r.split) for r in records if getattr(r, key) is not None)
        for value, row in summary[table].items():
            assert row["total"] == sum(row[s] for s in ("train", "val", "test"))
            for split in ("train", "val", "test"):
                assert row[split] == expected[(value, split)]
        assert sum(row["total"] for row in summary[table].values()) == sum(expected.values())
    assert summary["datasets"]["m3d_refseg"]["total"] == 12 - 2
    assert summary["datasets"]["chestxray8"]["total"] == 2
    assert summary["categories"]["Infiltration"]["total"] == 1
    assert summary["question_types"]["0"]["total"] == summary["question_types"]["1"]["total"] == 5

    skipped = summary["skipped"]
    assert skipped["total"] == 3 and skipped["by_kind"] == {"box_outside": 1, "missing_text": 2}
    assert {s["dataset"] for s in skipped["items"]} == {"m3d_refseg", "chestxray8"}
    assert all(s["reason"] and s["item"] for s in skipped["items"])
    assert summary["inputs"]["m3d_refseg"] == {"items": 12, "records": 10, "skipped": 2}
    assert summary["inputs"]["chestxray8"] == {"items": 3, "records": 2, "skipped": 1}
    assert summary["command"] == ["prepare_data.py", "test"]
    # every record went to the file of its own split
    assert all(r.split == split for split, recs in written.items() for r in recs)


def test_prepare_relative_paths(tmp_path: Path) -> None:
    root = small_refseg(tmp_path, n_cases=1)
    out = tmp_path / "out"
    prepare(M3DRefSegSource(root), out, relative_paths=True, progress=False)
    line = json.loads((out / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert line["image"] == "../M3D_RefSeg/s0000/ct.nii.gz"
    assert line["mask"]["path"] == "../M3D_RefSeg/s0000/mask.nii.gz"
    for record in read_manifest(out / "train.jsonl"):
        assert Path(record.image).is_file() and Path(record.mask.path).is_file()


def test_prepare_refuses_ids_produced_twice(tmp_path: Path) -> None:
    root = small_refseg(tmp_path, n_cases=1)
    with pytest.raises(DataError, match="produced twice"):
        prepare([M3DRefSegSource(root), M3DRefSegSource(root)], tmp_path / "out", progress=False)


def test_main_in_process_errors_and_success(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = small_refseg(tmp_path, n_cases=2)
    (root / "s0001" / "mask.nii.gz").unlink()
    out = tmp_path / "out"
    # a one-line error and exit code 2, like every script
    assert main(["m3d-refseg", "--root", str(root), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "M3D_RefSeg_test.csv:2: mask not found" in err and "s0001/mask.nii.gz" in err
    assert (
        main(["m3d-refseg", "--root", str(root), "--out", str(out), "--no-progress", "--on-error", "skip"])
        == 0
    )
    assert "skipped 4 item(s)" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["skipped"]["by_kind"] == {"missing_file": 4}
    assert summary["records"]["total"] == 4
    assert main(["mscxr-medrpg", "--image-root", str(tmp_path), "--out", str(out)]) == 2
    assert "needs at least one of --train, --val, --test" in capsys.readouterr().err


def test_main_synthetic_boxes_match_generator_truth(tmp_path: Path) -> None:
    """The generator's own ground truth, read back through the real adapters, box for box."""
    out = tmp_path / "ct"
    assert (
        main(
            [
                "synthetic",
                "--kind",
                "ct3d",
                "--n",
                "3",
                "--ct-shape",
                "40",
                "36",
                "16",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    truth = json.loads((out / "raw" / "phantom_truth.json").read_text(encoding="utf-8"))["cases"]
    records = [r for recs in _read_all(out).values() for r in recs]
    assert records and all(r.ndim == 3 and r.dataset == "synthetic3d" for r in records)
    assert all(r.id.startswith("synthetic3d/s000") for r in records)
    for rec in records:
        region = truth[rec.source["case"]]["regions"][str(rec.mask.label)]
        assert list(rec.boxes[0]) == region["box_voxel"]
        assert rec.source["description"] == region["description"]
        assert rec.spatial_shape == (40, 36, 16)

    for layout in ("mscxr", "chestxray8"):
        out = tmp_path / layout
        assert (
            main(
                [
                    "synthetic",
                    "--kind",
                    "cxr2d",
                    "--layout",
                    layout,
                    "--n",
                    "4",
                    "--out",
                    str(out),
                    "--no-progress",
                ]
            )
            == 0
        )
        images = json.loads((out / "raw" / "phantom_truth.json").read_text(encoding="utf-8"))["images"]
        records = [r for recs in _read_all(out).values() for r in recs]
        assert records and all(r.modality == "CXR" and r.dataset == "synthetic2d" for r in records)
        assert all(r.id.startswith("synthetic2d/") for r in records)
        for rec in records:
            key = rec.source["dicom_id"] if layout == "mscxr" else rec.source["image_index"]
            label = "label_text" if layout == "mscxr" else "finding_label"
            wanted = rec.text if layout == "mscxr" else rec.source["finding_label"]
            truth_boxes = [b for f in images[key]["findings"] if f[label] == wanted for b in f["boxes_xyxy"]]
            np.testing.assert_allclose(sorted(rec.boxes), sorted(truth_boxes))


@pytest.mark.e2e
@pytest.mark.slow  # one interpreter start-up importing torch + MONAI: 15–50 s on a busy 2-core machine
def test_script_subprocess(tmp_path: Path) -> None:
    root = small_refseg(tmp_path, n_cases=2)
    rows = refseg_rows("s0001", [1, 2]) + refseg_rows(
        "s0001", [9]
    )  # region 9: absent from mask and text.json
    write_csv(root / "M3D_RefSeg_test.csv", M3D_HEADER, rows)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "m3d-refseg",
        "--root",
        str(root),
        "--out",
        str(out),
        "--on-error",
        "skip",
        "--relative-paths",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "wrote 8 records" in done.stdout and "skipped 2 item(s)" in done.stdout
    assert "prepare m3d_refseg" in done.stderr  # the progress bar
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    written = _read_all(out)
    assert summary["records"]["total"] == sum(len(v) for v in written.values()) == 8
    assert summary["records"]["test"] == len(written["test"]) == 4
    assert [s["kind"] for s in summary["skipped"]["items"]] == ["missing_text", "missing_text"]
    assert all(
        "M3D_RefSeg_test.csv:" in s["reason"] and "has no region 9" in s["reason"]
        for s in summary["skipped"]["items"]
    )
    assert summary["command"][:2] == ["prepare_data.py", "m3d-refseg"]
    assert not Path(
        json.loads((out / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])["image"]
    ).is_absolute()
