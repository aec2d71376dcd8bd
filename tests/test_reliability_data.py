"""Bad inputs at scale: a generated corpus of 50+ broken files and rows mixed into valid phantoms.

``prepare_data --on-error skip`` reports each broken item with its reason (``raise`` stops at the first, naming
it); the items that only fail when decoded (NaN voxels, complex dtype, files corrupted after preparation) are
left out by the DataModule's ``on_error="skip"`` at fit time and reported in ``skipped.json``, while every valid
item is trained on. Headers that claim enormous images are refused without allocating them.
"""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import struct
import tracemalloc
import zlib
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from mg3d.data import synthetic
from mg3d.data.datamodule import SKIPPED_FILE, GroundingDataModule, SourceConfig
from mg3d.data.prepare import main as prepare_main
from mg3d.data.records import read_manifest
from mg3d.data.transforms import PipelineConfig
from mg3d.errors import DataError

N_CT, N_CXR = 10, 10
M3D_HEADER = ["Image", "Mask", "Mask_ID", "Question_Type", "Question", "Answer"]


@dataclass(frozen=True)
class Broken:
    """One broken input: which CSV line carries it, and where and how it must be reported."""

    name: str
    csv: str  # "ct" or "cxr"
    line: int
    stage: str  # "prepare" (summary.json skip of this kind) or "fit" (DataModule skip)
    kind: str  # prepare: the SourceError kind; fit: a fragment of the reason
    id_part: str  # a string in the record id (fit stage) or the skip's item name (prepare stage)


# ---------------------------------------------------------------------------------------------- writers


def write_dicom(path: Path, pixels: np.ndarray, **tags) -> Path:
    """A minimal uncompressed DICOM radiograph (pydicom), ``pixels`` as (rows, columns) uint16."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = (
        "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    )
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = (int(v) for v in pixels.shape)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def png_with_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims ``width × height`` pixels, with one tiny compressed row of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0\0"))
                     + chunk(b"IEND", b""))  # fmt: skip
    return path


def nifti_header_only(path: Path, shape: tuple[int, ...], dtype=np.float32) -> Path:
    """A gzipped NIfTI holding a header that claims ``shape`` and almost no voxel data."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_zooms((1.0,) * len(shape))
    header.set_qform(np.eye(4), code=1)
    header["vox_offset"] = 352
    with gzip.open(path, "wb") as handle:
        handle.write(header.binaryblock + b"\0" * 4 + b"\0" * 64)
    return path


def truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _stored_then_cut(path: Path, fraction: float) -> None:
    """Re-gzip without compression (so the header survives a cut), then cut the voxel data short."""
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw, compresslevel=0))
    truncate(path, fraction)


def resave(path: Path, array: np.ndarray, affine: np.ndarray | None = None, **fields) -> None:
    """Rewrite a NIfTI with ``array``; raw header ``fields`` (``pixdim``, ``srow_x`` …) are written as given,
    bypassing nibabel's setters, which refuse (or repair) the bad values on purpose."""
    affine = nib.load(path).affine if affine is None else affine
    header = nib.Nifti1Header()
    header.set_data_shape(array.shape)
    header.set_data_dtype(array.dtype)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header["vox_offset"] = 352  # single-file NIfTI: 348-byte header + 4 extension bytes
    for key, value in fields.items():
        header[key] = value
    with gzip.open(path, "wb") as handle:
        handle.write(header.binaryblock + b"\0" * 4 + np.asarray(array).tobytes(order="F"))


# ---------------------------------------------------------------------------------------------- the corpus


def _ct_breakers() -> list[tuple[str, str, str, object]]:
    """(name, stage, kind, mutate(case_folder) → optional CSV row override)."""

    def vol(folder: Path, name: str = "ct.nii.gz") -> np.ndarray:
        return np.asarray(nib.load(folder / name).dataobj)

    def with_nan(folder: Path, value: float) -> None:
        a = vol(folder).astype(np.float32)
        a[3, 4, 5] = value
        resave(folder / "ct.nii.gz", a)

    rgb = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
    return [
        ("ct_truncated_60", "prepare", "truncated", lambda f: truncate(f / "ct.nii.gz", 0.6)),
        ("ct_truncated_crc", "prepare", "truncated",
         lambda f: (f / "ct.nii.gz").write_bytes((f / "ct.nii.gz").read_bytes()[:-6])),
        ("ct_truncated_header", "prepare", "unreadable", lambda f: truncate(f / "ct.nii.gz", 0.02)),
        ("ct_zero_bytes", "prepare", "empty_file", lambda f: (f / "ct.nii.gz").write_bytes(b"")),
        ("ct_not_gzip", "prepare", "unreadable", lambda f: (f / "ct.nii.gz").write_bytes(b"\x01\x02garbage" * 50)),
        ("ct_missing", "prepare", "missing_file", lambda f: (f / "ct.nii.gz").unlink()),
        ("mask_zero_bytes", "prepare", "empty_file", lambda f: (f / "mask.nii.gz").write_bytes(b"")),
        ("mask_truncated", "prepare", "truncated", lambda f: _stored_then_cut(f / "mask.nii.gz", 0.7)),
        ("ct_4d", "prepare", "bad_geometry", lambda f: resave(f / "ct.nii.gz", vol(f)[..., None].repeat(2, -1))),
        ("ct_1d", "prepare", "bad_geometry", lambda f: resave(f / "ct.nii.gz", vol(f).reshape(-1))),
        ("ct_2d", "prepare", "bad_geometry", lambda f: resave(f / "ct.nii.gz", vol(f)[:, :, 0])),
        ("shape_mismatch", "prepare", "shape_mismatch",
         lambda f: resave(f / "mask.nii.gz", vol(f, "mask.nii.gz")[:20])),
        ("affine_mismatch", "prepare", "affine_mismatch",
         lambda f: resave(f / "mask.nii.gz", vol(f, "mask.nii.gz"), affine=np.diag([3.0, 3.0, 3.0, 1.0]))),
        ("mask_empty", "prepare", "empty_mask", lambda f: resave(f / "mask.nii.gz", vol(f, "mask.nii.gz") * 0)),
        ("mask_nan", "prepare", "bad_mask", lambda f: resave(
            f / "mask.nii.gz", np.where(vol(f, "mask.nii.gz") > 0, np.nan, 0).astype(np.float32))),
        ("mask_fractional", "prepare", "bad_mask", lambda f: resave(
            f / "mask.nii.gz", (vol(f, "mask.nii.gz") * 1.5).astype(np.float32))),
        ("label_absent", "prepare", "label_absent", lambda f: (
            (f / "text.json").write_text('{"1": "the lesion", "7": "a lesion not in the mask"}', "utf-8"),
            {"Mask_ID": "7"})[1]),
        ("spacing_negative", "prepare", "bad_geometry", lambda f: resave(f / "ct.nii.gz", vol(f), pixdim=[1, -1, 1, 1, 1, 1, 1, 1])),
        ("spacing_nan", "prepare", "bad_geometry", lambda f: resave(f / "ct.nii.gz", vol(f), pixdim=[1, np.nan, 1, 1, 1, 1, 1, 1])),
        ("spacing_zero", "prepare", "bad_geometry", lambda f: resave(f / "ct.nii.gz", vol(f), pixdim=[1, 1, 0, 1, 1, 1, 1, 1])),
        ("affine_infinite", "prepare", "bad_geometry", lambda f: resave(
            f / "ct.nii.gz", vol(f), srow_x=[np.inf, 0, 0, 0], qform_code=0)),
        ("huge_header_over_limit", "prepare", "too_large",
         lambda f: nifti_header_only(f / "ct.nii.gz", (4000, 4000, 4000))),
        ("huge_header_under_limit", "prepare", "truncated",
         lambda f: nifti_header_only(f / "ct.nii.gz", (1100, 1100, 1100))),
        ("text_not_utf8", "prepare", "bad_json",
         lambda f: (f / "text.json").write_bytes('{"1": "l\u00e9sion"}'.encode("latin-1"))),
        ("text_not_json", "prepare", "bad_json", lambda f: (f / "text.json").write_text("{1: lesion", "utf-8")),
        ("text_region_missing", "prepare", "missing_text",
         lambda f: (f / "text.json").write_text('{"2": "another region"}', "utf-8")),
        ("text_missing", "prepare", "missing_file", lambda f: (f / "text.json").unlink()),
        ("row_missing_fields", "prepare", "bad_row", lambda f: {"__cells__": 4}),
        ("row_bad_mask_id", "prepare", "bad_row", lambda f: {"Mask_ID": "one"}),
        ("row_bad_question_type", "prepare", "bad_row", lambda f: {"Question_Type": "1.5"}),
        ("row_empty_question", "prepare", "bad_row", lambda f: {"Question": ""}),
        ("ct_nan_voxel", "fit", "non-finite", lambda f: with_nan(f, np.nan)),
        ("ct_inf_voxel", "fit", "non-finite", lambda f: with_nan(f, np.inf)),
        ("ct_complex_dtype", "fit", "complex64", lambda f: resave(f / "ct.nii.gz", vol(f).astype(np.complex64))),
        ("ct_rgb_dtype", "fit", "voxels; expected real", lambda f: resave(
            f / "ct.nii.gz", np.zeros(vol(f).shape, dtype=rgb))),
    ]  # fmt: skip


def _cxr_breakers(ok_row: dict[str, str], ok_image: Path) -> list[tuple[str, str, str, object]]:
    """(name, stage, kind, make(image_path) → CSV cell overrides); each gets its own image path and dicom_id."""
    w, h = int(ok_row["image_width"]), int(ok_row["image_height"])
    pixels = (np.arange(h * w).reshape(h, w) % 4000).astype(np.uint16)

    def image_copy(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ok_image, path)

    def png(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.open(ok_image).save(path)

    def dcm(path: Path, **tags) -> Path:
        return write_dicom(path, pixels, **tags)

    def cut(fn, fraction):
        def make(path: Path) -> None:
            fn(path)
            truncate(path, fraction)

        return make

    return [
        ("jpg_truncated", "prepare", "truncated", ("jpg", cut(image_copy, 0.5))),
        ("jpg_zero_bytes", "prepare", "empty_file", ("jpg", lambda p: (image_copy(p), p.write_bytes(b"")))),
        ("jpg_not_image", "prepare", "unreadable", ("jpg", lambda p: (image_copy(p), p.write_text("no image")))),
        ("png_truncated", "prepare", "truncated", ("png", cut(png, 0.5))),
        ("png_zero_bytes", "prepare", "empty_file", ("png", lambda p: (png(p), p.write_bytes(b"")))),
        ("png_huge_header", "prepare", "too_large", ("png", lambda p: png_with_header(p, 100_000, 100_000))),
        ("dcm_truncated", "prepare", "truncated", ("dcm", cut(dcm, 0.6))),
        ("dcm_zero_bytes", "prepare", "empty_file", ("dcm", lambda p: (dcm(p), p.write_bytes(b"")))),
        ("dcm_no_pixels", "prepare", "unreadable", ("dcm", lambda p: _drop_pixels(dcm(p)))),
        ("dcm_huge_rows", "prepare", "too_large", ("dcm", lambda p: _claim_rows(dcm(p), 60_000, 60_000))),
        ("dcm_multiframe", "prepare", "bad_geometry", ("dcm", lambda p: dcm(p, NumberOfFrames=2))),
        ("dcm_garbage", "prepare", "unreadable",
         ("dcm", lambda p: (dcm(p), p.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 300)))),
        ("size_mismatch", "prepare", "size_mismatch", ("jpg", lambda p: (image_copy(p), {"image_width": w + 7})[1])),
        ("x_not_number", "prepare", "bad_row", ("jpg", lambda p: (image_copy(p), {"x": "left"})[1])),
        ("w_negative", "prepare", "bad_box", ("jpg", lambda p: (image_copy(p), {"w": "-5"})[1])),
        ("h_nan", "prepare", "bad_row", ("jpg", lambda p: (image_copy(p), {"h": "nan"})[1])),
        ("box_outside", "prepare", "box_outside", ("jpg", lambda p: (image_copy(p), {"x": str(w + 50)})[1])),
        ("phrase_empty", "prepare", "bad_row", ("jpg", lambda p: (image_copy(p), {"label_text": ""})[1])),
        ("split_unknown", "prepare", "bad_row", ("jpg", lambda p: (image_copy(p), {"split": "holdout"})[1])),
        ("image_missing", "prepare", "missing_file", ("jpg", lambda p: None)),
        ("row_missing_fields", "prepare", "bad_row", ("jpg", lambda p: (image_copy(p), {"__cells__": 6})[1])),
        # an unquoted comma in the phrase: one cell more than the header, every later column shifted
        ("row_extra_fields", "prepare", "bad_row",
         ("jpg", lambda p: (image_copy(p), {"__shift__": "opacity, left"})[1])),
    ]  # fmt: skip


def _drop_pixels(path: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)


def _claim_rows(path: Path, rows: int, cols: int) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = rows % 65536, cols % 65536
    ds.save_as(path)


@dataclass
class Corpus:
    ct_root: Path
    ct_csv: Path
    cxr_root: Path
    cxr_csv: Path
    broken: list[Broken]
    valid_ct_cases: int
    valid_cxr_rows: int


def build_corpus(root: Path) -> Corpus:
    """Valid phantoms (M3D-RefSeg and MS-CXR layouts) plus one broken case / row per breaker."""
    broken: list[Broken] = []
    # 3D: valid phantom cases, then one copied-and-broken case folder per breaker, all in one CSV
    ct_root = root / "m3d"
    synthetic.make_ct3d(ct_root, N_CT, 0, shape=(24, 24, 16), single_lesion=True, questions_per_region=(1, 0),
                        question_style="phrase", test_fraction=0.0)  # fmt: skip
    with (ct_root / "M3D_RefSeg_all.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    for name in ("M3D_RefSeg_all.csv", "M3D_RefSeg_train.csv", "M3D_RefSeg_test.csv"):
        (ct_root / name).unlink(missing_ok=True)
    assert rows[0] == M3D_HEADER and len(rows) == N_CT + 1
    template = dict(zip(M3D_HEADER, rows[1]))
    out_rows = [list(r) for r in rows]
    for k, (name, stage, kind, mutate) in enumerate(_ct_breakers()):
        case = f"b{k:03d}"
        shutil.copytree(ct_root / "s0000", ct_root / case)
        override = mutate(ct_root / case)
        override = override if isinstance(override, dict) else {}
        row = dict(template, Image=f"{case}/ct.nii.gz", Mask=f"{case}/mask.nii.gz")
        row.update({c: v for c, v in override.items() if not c.startswith("__")})
        cells = [row[c] for c in M3D_HEADER][: override.get("__cells__", len(M3D_HEADER))]
        out_rows.append(cells)
        broken.append(Broken(name, "ct", len(out_rows), stage, kind, case))
    ct_csv = ct_root / "M3D_RefSeg_all.csv"
    with ct_csv.open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows(out_rows)

    # 2D: valid MS-CXR phantoms, then one broken image / row per breaker
    cxr_root = root / "mscxr"
    synthetic.make_cxr2d(cxr_root, N_CXR, 0, layout="mscxr", max_findings=1)
    cxr_csv = cxr_root / synthetic.MSCXR_CSV_NAME
    with cxr_csv.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        header, rows2 = list(reader.fieldnames or []), list(reader)
    ok = rows2[0]
    lines = [",".join(header)] + [_csv_line(header, r) for r in rows2]
    for k, (name, stage, kind, (ext, make)) in enumerate(_cxr_breakers(ok, cxr_root / ok["path"])):
        dicom_id = f"broken{k:03d}-{name}"
        rel = f"files/p90/p9000{k:04d}/s9000{k:04d}/{dicom_id}.{ext}"
        override = make(cxr_root / rel)
        override = override if isinstance(override, dict) else {}
        row = dict(ok, dicom_id=dicom_id, path=rel)
        row.update({c: str(v) for c, v in override.items() if not c.startswith("__")})
        line = _csv_line(header, row)
        if "__cells__" in override:
            line = ",".join(line.split(",")[: override["__cells__"]])
        if "__shift__" in override:  # an unquoted comma inside the phrase: every later column moves right
            line = line.replace(row["label_text"], override["__shift__"], 1)
        lines.append(line)
        broken.append(Broken(name, "cxr", len(lines), stage, kind, dicom_id))
    cxr_csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Corpus(ct_root, ct_csv, cxr_root, cxr_csv, broken, N_CT, len(rows2))


def _csv_line(header: list[str], row: dict[str, str]) -> str:
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow([row[c] for c in header])
    return buffer.getvalue()


def _prepare(corpus: Corpus, out: Path, which: str, on_error: str) -> int:
    common = [
        "--out",
        str(out),
        "--on-error",
        on_error,
        "--no-progress",
        "--val-fraction",
        "0.2",
        "--seed",
        "1",
    ]
    if which == "ct":
        return prepare_main(["m3d-refseg", "--root", str(corpus.ct_root), "--all-csv", str(corpus.ct_csv),
                             "--test-fraction", "0.0", *common])  # fmt: skip
    return prepare_main(["mscxr", "--csv", str(corpus.cxr_csv), "--image-root", str(corpus.cxr_root),
                         "--test-fraction", "0.0", *common])  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("prepared")
    for which in ("ct", "cxr"):
        assert _prepare(corpus, out / which, which, "skip") == 0
    return {"ct": out / "ct", "cxr": out / "cxr"}


# ---------------------------------------------------------------------------------------------- prepare


def test_corpus_is_large_and_varied(corpus):
    assert len(corpus.broken) >= 50
    assert len({b.kind for b in corpus.broken}) >= 12


def test_prepare_skip_reports_every_broken_item_with_its_reason(corpus, prepared):
    for which, csv_path in (("ct", corpus.ct_csv), ("cxr", corpus.cxr_csv)):
        summary = json.loads((prepared[which] / "summary.json").read_text(encoding="utf-8"))
        skips = summary["skipped"]["items"]
        expected = [b for b in corpus.broken if b.csv == which and b.stage == "prepare"]
        for b in expected:
            at = f"{csv_path.name}:{b.line} ("
            found = [s for s in skips if s["item"].startswith(at) and b.id_part in s["item"]]
            assert len(found) == 1, f"{b.name}: no single skip for {at} in {[s['item'] for s in skips]}"
            assert found[0]["kind"] == b.kind, f"{b.name}: kind {found[0]['kind']} ({found[0]['reason']})"
            assert found[0]["reason"], b.name
        assert summary["skipped"]["total"] == len(expected), (
            "a valid item was skipped or a skip was counted twice"
        )
        # every valid item, and every item only decoding can find fault with, became a record
        n_fit = sum(1 for b in corpus.broken if b.csv == which and b.stage == "fit")
        n_valid = corpus.valid_ct_cases if which == "ct" else corpus.valid_cxr_rows
        assert summary["records"]["total"] == n_valid + n_fit


@pytest.mark.parametrize("which", ["ct", "cxr"])
def test_prepare_raise_stops_at_first_broken_item_naming_it(corpus, which, tmp_path, capsys):
    assert _prepare(corpus, tmp_path / "out", which, "raise") == 2  # one-line error, exit 2 (every script)
    err = capsys.readouterr().err
    first = min((b for b in corpus.broken if b.csv == which and b.stage == "prepare"), key=lambda b: b.line)
    csv_name = (corpus.ct_csv if which == "ct" else corpus.cxr_csv).name
    # the CSV line (M3D) or the item's image file (MS-CXR: image errors name the file) — never another item
    assert err.startswith("error: ") and (
        f"{csv_name}:{first.line}:" in err or f"/{first.id_part}." in err
    ), err
    assert not (tmp_path / "out" / "train.jsonl").exists(), "no manifest may be written by a failed run"


def test_non_utf8_csv_is_refused_as_a_whole_naming_the_file(corpus, tmp_path, capsys):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes(corpus.cxr_csv.read_bytes().replace(b"opacity", "opacit\u00e9".encode("latin-1"), 1))
    code = prepare_main(["mscxr", "--csv", str(bad), "--image-root", str(corpus.cxr_root), "--out",
                         str(tmp_path / "o"), "--on-error", "skip", "--no-progress"])  # fmt: skip
    assert code == 2
    assert "latin1.csv" in (err := capsys.readouterr().err) and "UTF-8" in err


def test_huge_headers_are_refused_without_allocating(corpus):
    """Headers claiming 64e9 and 1.3e9 voxels, a 1e10-pixel PNG and a 3.6e9-pixel DICOM: peak < 32 MB."""
    from mg3d.data.sources._common import SourceError, read_image_header_2d, read_nifti

    huge = {b.name: b for b in corpus.broken}
    files = [corpus.ct_root / huge[n].id_part / "ct.nii.gz" for n in ("huge_header_over_limit",
                                                                       "huge_header_under_limit")]  # fmt: skip
    tracemalloc.start()
    try:
        for path in files:
            with pytest.raises(SourceError, match=r"voxels|truncated"):
                read_nifti(path)
        for n in ("png_huge_header", "dcm_huge_rows"):
            path = next(corpus.cxr_root.rglob(f"{huge[n].id_part}.*"))
            with pytest.raises(SourceError, match=r"pixels|too large"):
                read_image_header_2d(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, f"peak traced allocation {peak / 2**20:.1f} MB"


def test_m3d_row_with_extra_fields_is_reported(corpus, tmp_path):
    """An unquoted comma in the last column adds a cell: the row is refused (naming file and line), never read
    with the cell dropped; ``on_error="raise"`` stops at it."""
    csv_path = tmp_path / "extra.csv"
    lines = corpus.ct_csv.read_text(encoding="utf-8").splitlines()[: N_CT + 1]
    lines.append("s0001/ct.nii.gz,s0001/mask.nii.gz,1,1,where is it,Sure, it is [SEG].")
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    from mg3d.data.sources import M3DRefSegSource

    source = M3DRefSegSource(corpus.ct_root, all_csv=csv_path, on_error="skip", test_fraction=0.0)
    records = list(source)
    assert len(records) == N_CT  # every valid row is kept
    assert [s.kind for s in source.skips.items] == ["bad_row"]
    assert f"extra.csv:{N_CT + 2}: the row has 7 cells, the header 6" in source.skips.items[0].reason
    strict = M3DRefSegSource(corpus.ct_root, all_csv=csv_path, on_error="raise", test_fraction=0.0)
    with pytest.raises(DataError, match=rf"extra\.csv:{N_CT + 2}: the row has 7 cells"):
        list(strict)


# ---------------------------------------------------------------------------------------------- fit


def _sources(prepared: dict[str, Path]) -> list[SourceConfig]:
    return [
        SourceConfig(str(prepared["ct"]), name="ct", pipeline=PipelineConfig(spatial_size=(16, 16, 8))),
        SourceConfig(str(prepared["cxr"]), name="cxr", pipeline=PipelineConfig(spatial_size=(32, 40), fit="letterbox")),
    ]  # fmt: skip


def _corrupt_after_preparation(prepared: dict[str, Path], folder: Path) -> dict[str, str]:
    """Copy the prepared data and break some of its valid files the way disks and copies do; return id → fault."""
    shutil.copytree(prepared["ct"].parent, folder)
    out = {"ct": folder / "ct", "cxr": folder / "cxr"}
    ct = [r for r in read_manifest(out["ct"] / "train.jsonl") if r.dataset == "m3d_refseg"]
    cxr = read_manifest(out["cxr"] / "train.jsonl")
    faults: dict[str, str] = {}

    def relocate(manifest: Path, old: str, new: str) -> None:
        manifest.write_text(manifest.read_text(encoding="utf-8").replace(old, new), encoding="utf-8")

    valid_ct = [r for r in ct if Path(r.image).parent.name.startswith("s")]
    # the prepared manifests point at the corpus files (absolute); give the broken ones private copies
    for record, fault in zip(valid_ct, ["truncated", "zero", "deleted", "huge", "nan"]):
        src = Path(record.image)
        private = folder / "private" / src.parent.name
        shutil.copytree(src.parent, private)
        relocate(out["ct"] / "train.jsonl", f"{src.parent}/", f"{private}/")
        target = private / "ct.nii.gz"
        if fault == "truncated":
            truncate(target, 0.5)
        elif fault == "zero":
            target.write_bytes(b"")
        elif fault == "deleted":
            target.unlink()
        elif fault == "huge":
            nifti_header_only(target, (1000, 1000, 1000))
        else:
            a = np.asarray(nib.load(target).dataobj).astype(np.float32)
            a[0, 0, 0] = np.nan
            resave(target, a)
        faults[record.id] = fault
    for record, fault in zip(cxr[:2], ["truncated", "swapped"]):
        private = folder / "private" / Path(record.image).name
        shutil.copy(record.image, private)
        relocate(out["cxr"] / "train.jsonl", record.image, str(private))
        if fault == "truncated":
            truncate(private, 0.4)
        else:  # another image of another size under the same name
            Image.new("L", (40, 30)).save(private, format="JPEG")
        faults[record.id] = fault
    return out, faults


def _module():
    from mg3d.generation import RolloutConfig
    from mg3d.grounding import PromptConfig
    from mg3d.grpo.config import EvalConfig, OptimConfig, WarmStartConfig
    from mg3d.grpo.loss import GRPOLossConfig
    from mg3d.grpo.module import GRPOModule

    return GRPOModule(
        prompt=PromptConfig(template="terse", system_prompt="", max_vision_tokens=32),
        rollout=RolloutConfig(num_generations=2, max_new_tokens=8), loss=GRPOLossConfig(loss_type="dapo"),
        rewards={"iou": 1.0}, optim=OptimConfig(lr=1e-3, schedule="constant"),
        warm_start=WarmStartConfig(steps=1, lr=1e-3), evaluation=EvalConfig(enabled=False),
        log_completions_every_n_steps=0,
    )  # fmt: skip


def test_fit_with_skip_trains_on_every_valid_item_and_reports_the_rest(corpus, prepared, tmp_path):
    data, faults = _corrupt_after_preparation(prepared, tmp_path / "data")
    dm = GroundingDataModule(_sources(data), batch_size=4, cache="memory", on_error="skip")

    seen: set[str] = set()

    class Seen(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.update(s["id"] for s in batch)

    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=pl.loggers.CSVLogger(tmp_path, name="logs"),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
                         callbacks=[Seen()])  # fmt: skip
    trainer.fit(_module(), dm)
    assert trainer.global_step == 3

    # every item that fails only when decoded, and every file broken after preparation, is reported …
    skipped = {s["id"]: s for s in dm.skipped}
    fit_stage = [b for b in corpus.broken if b.stage == "fit"]
    for b in fit_stage:
        hits = [s for rid, s in skipped.items() if f"/{b.id_part}/" in rid]
        assert len(hits) == 1 and b.kind in hits[0]["reason"], (b.name, hits)
    for rid, fault in faults.items():
        assert rid in skipped, f"{rid} ({fault} after preparation) was not reported"
    report = json.loads((Path(trainer.log_dir) / SKIPPED_FILE).read_text(encoding="utf-8"))
    assert report["total"] == len(dm.skipped) == len(skipped) == len(fit_stage) + len(faults)
    assert all(item["reason"].startswith(f"record {item['id']!r}") for item in report["items"])
    # … and every other manifest record is in the training and validation data
    for split in ("train", "val"):
        manifest_ids = {r.id for name in ("ct", "cxr") for r in read_manifest(data[name] / f"{split}.jsonl")}
        kept = {part.dataset.ids[i] for part in dm.build_split(split) for i in range(part.size)}
        assert kept == manifest_ids - set(skipped), split
    assert seen and seen <= {r for part in dm.build_split("train") for r in part.dataset.ids}


def test_fit_with_raise_stops_at_the_first_bad_item_naming_it(corpus, prepared):
    dm = GroundingDataModule(_sources(prepared), batch_size=4, cache="memory", on_error="raise")
    fit_cases = [f"/{b.id_part}/" for b in corpus.broken if b.stage == "fit"]
    order = [(name, split) for split in ("train", "val") for name in ("ct", "cxr")]  # the order setup reads
    first = next(r.id for name, split in order for r in read_manifest(prepared[name] / f"{split}.jsonl")
                 if any(c in r.id for c in fit_cases))  # fmt: skip
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert message.startswith(f"record {first!r}: ") and "on_error: skip" in message, message


def test_cache_none_and_disk_skip_the_same_items(prepared, tmp_path):
    found = []
    for cache in ("none", "disk"):
        dm = GroundingDataModule(_sources(prepared), batch_size=4, cache=cache, cache_dir=str(tmp_path / "c"),
                                 on_error="skip")  # fmt: skip
        dm.setup("fit")
        found.append(sorted(s["id"] for s in dm.skipped))
        batch = next(iter(dm.train_dataloader()))
        assert all(torch.isfinite(s["image"]).all() for s in batch)
    assert found[0] == found[1] and len(found[0]) == 4
