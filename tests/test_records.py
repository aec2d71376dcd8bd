"""Tests of mg3d.data.records: the grounding record and the JSONL manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mg3d.data import records
from mg3d.data.records import (
    MANIFEST_SCHEMA_VERSION,
    GroundingRecord,
    MaskRef,
    iter_manifest,
    known_modalities,
    read_manifest,
    record_from_dict,
    register_modality,
    write_manifest,
)
from mg3d.errors import DataError


def _rec3d(**kw) -> GroundingRecord:
    base = dict(
        id="m3d_refseg/s0001/3/q0-abc",
        dataset="m3d_refseg",
        split="train",
        modality="CT",
        ndim=3,
        image="s0001/ct.nii.gz",
        text="Where is the cyst in the left kidney?",
        boxes=((10.0, 20.0, 3.0, 18.0, 31.0, 9.0),),
        spatial_shape=(64, 64, 32),
        mask={"path": "s0001/mask.nii.gz", "label": 3},
        question_type=0,
        spacing=(0.8, 0.8, 2.5),
        affine=((-0.8, 0, 0, 10), (0, 0.8, 0, -5), (0, 0, 2.5, 1), (0, 0, 0, 1)),
        source={"csv": "M3D_RefSeg_train.csv", "line": 2},
    )
    base.update(kw)
    return GroundingRecord(**base)


def _rec2d(**kw) -> GroundingRecord:
    base = dict(
        id="mscxr/abc/1",
        dataset="mscxr",
        split="val",
        modality="CXR",
        ndim=2,
        image="/data/cxr/a.jpg",
        text="small left apical pneumothorax",
        boxes=((345.0, 70.0, 486.0, 115.0), (10.5, 11.0, 20.0, 30.25)),
        spatial_shape=(2544, 3056),
        category="Pneumothorax",
    )
    base.update(kw)
    return GroundingRecord(**base)


def test_record_normalises_types_and_boxes_array() -> None:
    rec = _rec3d()
    assert rec.mask == MaskRef("s0001/mask.nii.gz", 3)
    assert rec.spatial_shape == (64, 64, 32)
    np.testing.assert_array_equal(rec.boxes_array(), [[10, 20, 3, 18, 31, 9]])
    assert _rec2d().boxes_array().shape == (2, 4)


def test_round_trip_absolute_paths(tmp_path: Path) -> None:
    records = [
        _rec2d(),
        _rec3d(image=str(tmp_path / "ct.nii.gz"), mask={"path": str(tmp_path / "m.nii.gz"), "label": 3}),
    ]
    path = tmp_path / "out" / "train.jsonl"
    assert write_manifest(path, records) == 2
    assert read_manifest(path) == records
    assert list(iter_manifest(path)) == records
    lines = path.read_text(encoding="utf-8").splitlines()
    assert all(json.loads(line)["schema_version"] == MANIFEST_SCHEMA_VERSION for line in lines)


def test_relative_paths_resolve_against_manifest_folder(tmp_path: Path) -> None:
    path = tmp_path / "manifests" / "train.jsonl"
    write_manifest(path, [_rec3d()])
    (back,) = read_manifest(path)
    assert back.image == str(tmp_path / "manifests" / "s0001" / "ct.nii.gz")
    assert back.mask is not None and back.mask.path == str(tmp_path / "manifests" / "s0001" / "mask.nii.gz")
    (raw,) = read_manifest(path, resolve_paths=False)
    assert raw.image == "s0001/ct.nii.gz"


def test_write_relative_paths(tmp_path: Path) -> None:
    image = tmp_path / "data" / "ct.nii.gz"
    rec = _rec3d(image=str(image), mask={"path": str(tmp_path / "data" / "mask.nii.gz"), "label": 3})
    path = tmp_path / "out" / "test.jsonl"
    write_manifest(path, [rec], relative_paths=True)
    assert json.loads(path.read_text(encoding="utf-8"))["image"] == "../data/ct.nii.gz"
    assert read_manifest(path)[0].image == str(tmp_path / "out" / "../data/ct.nii.gz")


def test_write_refuses_duplicate_ids_and_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    with pytest.raises(DataError, match="duplicate id"):
        write_manifest(path, [_rec2d(), _rec2d()])
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_record_error_names_record_and_field() -> None:
    with pytest.raises(
        DataError, match=r"record 'mscxr/abc/1': field 'boxes': box 0 \(ndim=2\) has 6 numbers"
    ):
        _rec2d(boxes=((1, 2, 3, 4, 5, 6),))
    with pytest.raises(DataError, match="field 'split'"):
        _rec2d(split="training")


def test_register_modality(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "_MODALITIES", set(records._MODALITIES))
    assert {"CXR", "CT", "MR", "PET"} <= known_modalities()
    with pytest.raises(DataError, match="unknown modality 'US'"):
        _rec2d(modality="US")
    register_modality("US")
    assert _rec2d(modality="US").modality == "US"
    with pytest.raises(DataError, match="upper-case"):
        register_modality("ultrasound")


# ------------------------------------------------------------------------------------ bad manifest lines


def _write_lines(tmp_path: Path, objs: list[dict | str]) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs) + "\n")
    return path


def _good() -> dict:
    return _rec3d().to_dict()


def _bad(**changes) -> dict:
    obj = _good()
    obj["id"] = "bad/1"
    for key, value in changes.items():
        if value is _DELETE:
            del obj[key]
        else:
            obj[key] = value
    return obj


_DELETE = object()

BAD_LINES = [
    pytest.param(_bad(text=_DELETE), "field 'text': missing", id="missing-field"),
    pytest.param(_bad(boxes=_DELETE), "field 'boxes': missing", id="missing-boxes"),
    pytest.param(_bad(schema_version=_DELETE), "field 'schema_version': missing", id="missing-version"),
    pytest.param(_bad(ndim="3"), "field 'ndim': must be the integer 2 or 3", id="wrong-type-ndim"),
    pytest.param(_bad(text=5), "field 'text': must be a string, got int", id="wrong-type-text"),
    pytest.param(
        _bad(boxes="[1,2,3,4,5,6]"), "field 'boxes': must be a non-empty list", id="wrong-type-boxes"
    ),
    pytest.param(
        _bad(spacing=[1, "a", 1]), "field 'spacing': spacing holds a non-number 'a'", id="wrong-type-spacing"
    ),
    pytest.param(
        _bad(question_type=0.5), "field 'question_type': must be null or an integer", id="wrong-type-qt"
    ),
    pytest.param(
        _bad(boxes=[[1, 2, 3, 4]]), "field 'boxes': box 0 (ndim=3) has 4 numbers, expected 6", id="box-length"
    ),
    pytest.param(
        _bad(boxes=[[5, 2, 3, 4, 8, 9]]), "field 'boxes': box 0: hi < lo on axis 0", id="box-inverted"
    ),
    pytest.param(
        _bad(boxes=[[1, 2, 3, 4, 5, 99]]),
        "field 'boxes': box 0 [1.0, 2.0, 3.0, 4.0, 5.0, 99.0] lies outside",
        id="box-outside",
    ),
    pytest.param(_bad(modality="XRAY"), "field 'modality': unknown modality 'XRAY'", id="unknown-modality"),
    pytest.param(_bad(split="dev"), "field 'split': must be one of", id="bad-split"),
    pytest.param(_bad(spacing=[1, 0, 1]), "field 'spacing': must be positive", id="zero-spacing"),
    pytest.param(
        _bad(affine=[[1, 0, 0], [0, 1, 0], [0, 0, 1]]), "field 'affine': must be null or a 4x4", id="affine"
    ),
    pytest.param(_bad(mask={"path": "m.nii.gz"}), "field 'mask': must be null or an object", id="mask-keys"),
    pytest.param(
        _bad(spatial_shape=[64, 0, 32]), "field 'spatial_shape': must hold positive integers", id="shape"
    ),
    pytest.param(
        _bad(schema_version=MANIFEST_SCHEMA_VERSION + 1), "is newer than this mg3d supports", id="newer"
    ),
    pytest.param(_bad(extra=1), "field 'extra': unknown field", id="unknown-field"),
    pytest.param("{not json", "not valid JSON", id="bad-json"),
    pytest.param("[1, 2]", "expected a JSON object", id="not-object"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_bad_line_names_file_line_and_field(tmp_path: Path, line: dict | str, message: str) -> None:
    path = _write_lines(tmp_path, [_good(), "", line])
    with pytest.raises(DataError) as info:
        read_manifest(path)
    text = str(info.value)
    assert f"{path}:3:" in text
    assert message in text


def test_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = _write_lines(tmp_path, [_good(), _bad(), _good()])
    with pytest.raises(
        DataError, match=rf"{path}:3: record 'm3d_refseg/s0001/3/q0-abc': field 'id': duplicate of line 1"
    ):
        read_manifest(path)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")


def test_record_from_dict_uses_where() -> None:
    with pytest.raises(DataError, match=r"^x\.jsonl:7: record 'bad/1': field 'ndim'"):
        record_from_dict(_bad(ndim=4), where="x.jsonl:7")


# ------------------------------------------------------------------------------------ property test


@st.composite
def _records(draw) -> GroundingRecord:
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.lists(st.integers(1, 600), min_size=ndim, max_size=ndim)))
    boxes = []
    for _ in range(draw(st.integers(1, 3))):
        lo, hi = [], []
        for size in shape:
            a = draw(st.floats(0, size, allow_nan=False))
            b = draw(st.floats(0, size, allow_nan=False))
            if a == b:
                a, b = 0.0, float(size)
            lo.append(min(a, b))
            hi.append(max(a, b))
        boxes.append(tuple(lo + hi))
    text = draw(st.text(min_size=1, max_size=40).filter(lambda s: s.strip()))
    return GroundingRecord(
        id=f"x/{draw(st.integers(0, 10**6))}",
        dataset="synthetic3d" if ndim == 3 else "synthetic2d",
        split=draw(st.sampled_from(["train", "val", "test"])),
        modality="CT" if ndim == 3 else "CXR",
        ndim=ndim,
        image="/abs/img.nii.gz",
        text=text,
        boxes=tuple(boxes),
        spatial_shape=shape,
        question_type=draw(st.one_of(st.none(), st.integers(0, 1))),
        spacing=draw(st.one_of(st.none(), st.tuples(*[st.floats(0.1, 5)] * ndim))),
        source={"note": text},
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(_records(), min_size=1, max_size=5, unique_by=lambda r: r.id))
def test_round_trip_property(
    tmp_path_factory: pytest.TempPathFactory, records: list[GroundingRecord]
) -> None:
    path = tmp_path_factory.mktemp("rt") / "m.jsonl"
    write_manifest(path, records)
    assert read_manifest(path) == records


def test_records_are_hashable_by_id() -> None:
    a, b = _rec2d(), _rec2d(source={"x": 1})
    assert hash(a) == hash(b) and a != b
    assert len({a, _rec2d(), _rec3d()}) == 2
