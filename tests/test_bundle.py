"""Tests for mg3d.bundle: export, MONAI's verify_metadata and run, fresh-process loading, tampering."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_grounder import (
    MAX_NEW,
    PIPELINES,
    PROMPT,
    lightning_checkpoint,
    make_grounder,
    train_policy,
    write_phantoms,
)

from mg3d.bundle import (
    SCHEMA_PATH,
    BundleInference,
    export_bundle,
    load_bundle,
    read_inputs,
    schema_sha256,
    verify_bundle,
)
from mg3d.bundle.inference import _output_name
from mg3d.errors import BundleError, ConfigError, DataError
from mg3d.grounder import Grounder

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _run(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    folder = tmp_path_factory.mktemp("images")
    return folder, write_phantoms(folder)


@pytest.fixture(scope="module")
def grounder(data) -> Grounder:
    g = make_grounder(train_policy(data[1]))
    g.checkpoint_info = {
        "eval_results": {"after_grpo": {"greedy/mIoU": 0.5, "greedy/acc@0.5": 0.4, "n": 5.0}}
    }
    return g


@pytest.fixture(scope="module")
def bundle(grounder: Grounder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(grounder, tmp_path_factory.mktemp("export") / "mg3d_test_bundle", name="mg3d test")


@pytest.fixture(scope="module")
def reference(grounder: Grounder, data) -> list:
    """What evaluation sees: Grounder.predict_records on the manifest records, batch size 8."""
    return list(grounder.predict_records(data[1], batch_size=8, progress=False))


def fresh_copy(bundle: Path, tmp_path: Path) -> Path:
    dest = tmp_path / bundle.name
    shutil.copytree(bundle, dest)
    return dest


def write_pairs(data: tuple[Path, list], name: str = "pairs.csv") -> Path:
    folder, records = data
    path = folder / name
    lines = ["image,phrase,id,modality"]
    lines += [f'{Path(r.image).name},"{r.text}",{r.id.replace("/", "_")},{r.modality}' for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- export


def test_export_layout_and_metadata(bundle: Path, grounder: Grounder) -> None:
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    for rel in ("configs/metadata.json", "configs/inference.json", "docs/README.md", "LICENSE"):
        assert rel in files
    assert "models/model.safetensors" in files and "models/mg3d_inference.json" in files
    assert "models/tokenizer.json" in files and "models/preprocessor_config.json" in files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".bin", ".pkl", ".ckpt"))]
    meta = json.loads((bundle / "configs/metadata.json").read_text(encoding="utf-8"))
    jsonschema.validate(meta, json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version", "task", "description",
                "authors", "copyright", "intended_use", "data_source", "schema"):  # fmt: skip
        assert meta[key]
    inputs, outputs = meta["network_data_format"]["inputs"], meta["network_data_format"]["outputs"]
    assert inputs["image"]["modality"] == "CT" and inputs["image"]["spatial_shape"] == [28, 28, 4]
    assert inputs["image_2d"]["modality"] == "CR" and inputs["image_2d"]["value_range"] == [0, 1]
    assert inputs["text"]["format"] == "sequence"
    assert {"box_voxel", "box_world_mm", "completion"} <= set(outputs)
    assert meta["eval_metrics"] == {
        "after_grpo/greedy/mIoU": 0.5,
        "after_grpo/greedy/acc@0.5": 0.4,
        "after_grpo/n": 5.0,
    }
    assert meta["mg3d"]["ndims"] == [2, 3] and meta["mg3d"]["codec"] == "qwen2.5-vl"
    assert set(meta["mg3d"]["files"]) == {f for f in files if f != "configs/metadata.json"}
    assert meta["required_packages_version"]["mg3d"] and "optional_packages_version" not in meta
    config = json.loads((bundle / "configs/inference.json").read_text(encoding="utf-8"))
    assert config["inference"]["_target_"] == "mg3d.bundle.BundleInference" and config["run"] == [
        "$@inference.run()"
    ]
    readme = (bundle / "docs/README.md").read_text(encoding="utf-8")
    assert (
        f"--hash_val {schema_sha256()}" in readme
        and "Limitations" in readme
        and "after_grpo/greedy/mIoU" in readme
    )


def test_export_refuses_to_overwrite(bundle: Path, grounder: Grounder, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not empty"):
        export_bundle(grounder, bundle)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="not a bundle"):
        export_bundle(grounder, other, overwrite=True)
    assert (other / "keep.txt").read_text(encoding="utf-8") == "mine"


def test_load_bundle_predicts_like_the_grounder(bundle: Path, data, reference) -> None:
    loaded = load_bundle(bundle)
    again = list(loaded.predict_records(data[1], batch_size=8, progress=False))
    assert [(p.completion, p.box_voxel, p.box_world_mm) for p in again] == [
        (p.completion, p.box_voxel, p.box_world_mm) for p in reference
    ]
    assert loaded.bundle_metadata["name"] == "mg3d test"


def test_zip_bundle(grounder: Grounder, data, reference, tmp_path: Path) -> None:
    archive = export_bundle(grounder, tmp_path / "zipped", zip=True)
    assert archive.suffix == ".zip" and archive.is_file()
    with zipfile.ZipFile(archive) as handle:
        assert "zipped/configs/metadata.json" in handle.namelist()
    loaded = load_bundle(archive)
    preds = list(loaded.predict_records(data[1], batch_size=8, progress=False))
    assert [p.box_voxel for p in preds] == [p.box_voxel for p in reference]
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as handle:
        handle.writestr("../outside.txt", "x")
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(evil)


# ---------------------------------------------------------------------------------------------- tampering


def _tamper_pickle_pt(root: Path) -> None:
    torch.save({"w": torch.zeros(2)}, root / "models" / "extra.pt")


def _tamper_disguised_pickle(root: Path) -> None:
    import pickle

    (root / "models" / "notes.json").write_bytes(pickle.dumps({"a": 1}, protocol=4))


def _tamper_missing_tokenizer(root: Path) -> None:
    (root / "models" / "tokenizer.json").unlink()


def _tamper_missing_readme(root: Path) -> None:
    (root / "docs" / "README.md").unlink()


def _tamper_weights(root: Path) -> None:
    path = root / "models" / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


def _tamper_extra_file(root: Path) -> None:
    (root / "models" / "added_tokens.txt").write_text("<x>")


def _edit_metadata(root: Path, edit) -> None:
    path = root / "configs" / "metadata.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    edit(meta)
    path.write_text(json.dumps(meta))


def _tamper_meta_no_box(root: Path) -> None:
    _edit_metadata(root, lambda m: m["network_data_format"]["outputs"].pop("box_voxel"))


def _tamper_meta_version(root: Path) -> None:
    _edit_metadata(root, lambda m: m.update(version=3))


def _tamper_meta_not_json(root: Path) -> None:
    (root / "configs" / "metadata.json").write_text("{ not json")


def _tamper_symlink(root: Path) -> None:
    (root / "models" / "link.json").symlink_to("/etc/hostname")


TAMPERING = {
    "pickle_in_models": (_tamper_pickle_pt, r"models/extra\.pt may be a pickle"),
    "disguised_pickle": (_tamper_disguised_pickle, r"notes\.json may be a pickle.*protocol-4"),
    "missing_file": (_tamper_missing_tokenizer, r"tokenizer\.json is listed in the metadata but missing"),
    "missing_required": (_tamper_missing_readme, r"incomplete bundle, missing \['docs/README\.md'\]"),
    "changed_weights": (_tamper_weights, r"model\.safetensors differs.*SHA-256"),
    "unexpected_file": (_tamper_extra_file, r"unexpected file.*added_tokens\.txt"),
    "metadata_no_box": (_tamper_meta_no_box, r"wrong shape.*'box_voxel' is a required property"),
    "metadata_version": (_tamper_meta_version, r"wrong shape.*version: 3 is not of type 'string'"),
    "metadata_not_json": (_tamper_meta_not_json, r"metadata\.json: not valid JSON"),
    "symlink": (_tamper_symlink, r"symbolic link"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampered_bundles_are_refused(bundle: Path, tmp_path: Path, case: str) -> None:
    tamper, message = TAMPERING[case]
    root = fresh_copy(bundle, tmp_path)
    verify_bundle(root)  # the untouched copy is fine
    tamper(root)
    with pytest.raises(BundleError, match=message):
        load_bundle(root)


def test_monai_verify_metadata_refuses_wrong_shape(bundle: Path, tmp_path: Path) -> None:
    from monai.bundle import verify_metadata

    root = fresh_copy(bundle, tmp_path)
    pinned = {"filepath": str(SCHEMA_PATH), "hash_val": schema_sha256(), "hash_type": "sha256"}
    verify_metadata(meta_file=str(root / "configs/metadata.json"), **pinned)
    _tamper_meta_no_box(root)
    with pytest.raises(ValueError, match="box_voxel"):
        verify_metadata(meta_file=str(root / "configs/metadata.json"), **pinned)


# ---------------------------------------------------------------------------------------------- inputs


def test_read_inputs_csv_and_jsonl(data, tmp_path: Path) -> None:
    folder, records = data
    rows = read_inputs(write_pairs(data, "pairs_a.csv"))
    assert [r.image for r in rows] == [rec.image for rec in records]
    assert rows[0].phrase == records[0].text and rows[0].id == "syn3_ct0_0" and rows[3].modality == "CXR"
    manifest = tmp_path / "m.jsonl"  # an mg3d manifest works too: 'text' is the phrase, other keys ignored
    manifest.write_text("\n".join(json.dumps(r.to_dict()) for r in records) + "\n\n")
    assert [r.phrase for r in read_inputs(manifest)] == [r.text for r in records]
    bad = tmp_path / "bad.csv"
    bad.write_text("image,phrase\nct0.nii.gz,\n")
    with pytest.raises(DataError, match=r"bad\.csv:2: needs a non-empty 'phrase'"):
        read_inputs(bad, folder)
    bad.write_text("file,words\na,b\n")
    with pytest.raises(DataError, match="needs the columns 'image' and 'phrase'"):
        read_inputs(bad)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"image": "a.png", "phrase": "x"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object"):
        read_inputs(bad_jsonl)
    with pytest.raises(DataError, match="pairs must be"):
        read_inputs(manifest.rename(tmp_path / "m.txt"))


def test_bundle_inference_in_process(bundle: Path, data, reference, tmp_path: Path) -> None:
    folder, records = data
    out = tmp_path / "out"
    written = BundleInference(str(bundle), dataset_dir=str(folder), pairs=write_pairs(data).name,
                              output_dir=str(out)).run()  # fmt: skip
    assert len(written) == len(records)
    rows = [json.loads(p.read_text(encoding="utf-8")) for p in written]
    assert [r["box_voxel"] for r in rows] == [
        None if p.box_voxel is None else list(p.box_voxel) for p in reference
    ]
    assert rows[0]["phrase"] == records[0].text and rows[0]["model"]["name"] == "mg3d test"
    with pytest.raises(ConfigError, match="both 'image' and 'phrase'"):
        BundleInference(str(bundle), image=records[0].image).inputs()
    with pytest.raises(ConfigError, match="no inputs"):
        BundleInference(str(bundle)).inputs()


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=0, max_size=300))
def test_output_names_stay_inside_the_folder(rid: str) -> None:
    name = _output_name(rid)
    assert name.endswith(".json") and len(name) <= 155 and not name.startswith(".")
    assert Path(name).name == name and "/" not in name and "\\" not in name


# ---------------------------------------------------------------------------------------------- MONAI's tools


@pytest.mark.slow
@pytest.mark.e2e
def test_verify_metadata_cli_offline(bundle: Path, tmp_path: Path) -> None:
    result = _run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(bundle / "configs/metadata.json"),
         "--filepath", str(SCHEMA_PATH), "--hash_val", schema_sha256(), "--hash_type", "sha256"],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    log = result.stdout + result.stderr
    assert "skipped downloading" in log and "metadata is verified with no error" in log


@pytest.mark.slow
@pytest.mark.e2e
def test_monai_run_writes_the_evaluation_boxes(bundle: Path, data, reference, tmp_path: Path) -> None:
    """``monai.bundle run`` in a fresh process on a copied bundle (nothing else of the export left) gives the
    boxes Grounder.predict_records — what scripts/evaluate.py scores — gives on the same inputs."""
    folder, records = data
    root = fresh_copy(bundle, tmp_path)
    pairs = write_pairs(data, "pairs_run.csv")
    out = tmp_path / "out"
    result = _run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(root / "configs/inference.json"),
         "--meta_file", str(root / "configs/metadata.json"), "--bundle_root", str(root),
         "--dataset_dir", str(folder), "--pairs", pairs.name, "--output_dir", str(out)],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for rec, pred in zip(records, reference):
        row = json.loads((out / f"{rec.id.replace('/', '_')}.json").read_text(encoding="utf-8"))
        assert row["completion"] == pred.completion
        assert row["box_voxel"] == (None if pred.box_voxel is None else list(pred.box_voxel))
        assert row["box_world_mm"] == (None if pred.box_world_mm is None else list(pred.box_world_mm))
        assert row["phrase"] == rec.text and row["spatial_shape"] == list(rec.spatial_shape)
    assert (
        sum(json.loads(p.read_text(encoding="utf-8"))["box_voxel"] is not None for p in out.glob("*.json"))
        >= 3
    )


@pytest.mark.slow
@pytest.mark.e2e
def test_monai_run_one_image_and_fresh_process_load(
    bundle: Path, grounder: Grounder, data, tmp_path: Path
) -> None:
    records = data[1]
    root = fresh_copy(bundle, tmp_path)
    ct = records[1]
    out = tmp_path / "one"
    result = _run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(root / "configs/inference.json"),
         "--meta_file", str(root / "configs/metadata.json"), "--bundle_root", str(root),
         "--image", ct.image, "--phrase", ct.text, "--output_dir", str(out)],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (row_path,) = list(out.glob("*.json"))
    row = json.loads(row_path.read_text(encoding="utf-8"))
    expected = grounder.predict_image(ct.image, ct.text, modality="CT")
    assert row["completion"] == expected.completion and row["id"] == "0000_ct1"
    assert row["box_voxel"] == (None if expected.box_voxel is None else list(expected.box_voxel))
    # a plain Python process that knows only the bundle folder
    script = (
        "import json, sys; from mg3d.bundle import load_bundle; "
        "p = load_bundle(sys.argv[1]).predict_image(sys.argv[2], sys.argv[3]); print(json.dumps(p.to_dict()))"
    )
    fresh = _run([sys.executable, "-c", script, str(root), records[4].image, records[4].text], cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    got = json.loads(fresh.stdout.strip().splitlines()[-1])
    want = grounder.predict_image(records[4].image, records[4].text)
    assert got["completion"] == want.completion
    assert got["box_voxel"] == (None if want.box_voxel is None else list(want.box_voxel))


@pytest.mark.slow
@pytest.mark.e2e
def test_export_script_from_checkpoint(
    grounder: Grounder, data, reference, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = lightning_checkpoint(grounder.policy, tmp_path / "last.ckpt")
    out = tmp_path / "from_ckpt"
    result = _run([sys.executable, str(REPO / "scripts/export_bundle.py"), "--ckpt", str(ckpt), "--out", str(out),
                   "--version", "1.2.0"], cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    meta = verify_bundle(out)
    assert meta["version"] == "1.2.0" and meta["eval_metrics"]["warm_start/greedy/mIoU"] == 0.25
    loaded = load_bundle(out)
    assert loaded.prompt_config == PROMPT and loaded.max_new_tokens == MAX_NEW
    assert loaded.pipeline_config(None, 3) == PIPELINES["3d"]
    preds = list(loaded.predict_records(data[1], batch_size=8, progress=False))
    assert [p.box_voxel for p in preds] == [p.box_voxel for p in reference]
    spec = importlib.util.spec_from_file_location("export_bundle_script", REPO / "scripts/export_bundle.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--ckpt", str(ckpt), "--out", str(out)]) == 2  # an existing bundle is not overwritten
    assert "not empty" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.e2e
def test_evaluate_script_gives_the_bundle_boxes(bundle: Path, data, reference, tmp_path: Path) -> None:
    """scripts/evaluate.py on the bundle's model folder scores the same boxes the bundle writes (the test above
    checks that ``monai.bundle run`` writes ``reference``)."""
    from mg3d.data.records import write_manifest

    manifest = tmp_path / "test.jsonl"
    write_manifest(manifest, data[1])
    out = tmp_path / "eval"
    result = _run(
        [sys.executable, str(REPO / "scripts/evaluate.py"), "--model", str(bundle / "models"), "--manifest",
         str(manifest), "--out", str(out), "--bootstrap", "0", "--no-progress", "--batch-size", "8"],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        json.loads(line)
        for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    assert [r["id"] for r in rows] == [p.id for p in reference]
    assert [r["completion"] for r in rows] == [p.completion for p in reference]
    assert [r["box_voxel"] for r in rows] == [
        None if p.box_voxel is None else list(p.box_voxel) for p in reference
    ]
