"""Tests of the data set adapters on fixtures written in each published format, and on real images.

Real images: pydicom-data's chest radiograph RG1_UNCI.dcm (MONOCHROME1), pydicom's CT_small.dcm
(stacked into a volume) and nibabel's anatomical.nii. Every expected box is computed here with plain
numpy (``argwhere`` on a painted mask), independently of the code under test.
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from pydicom.data import get_testdata_file

from mg3d.data.sources import ChestXray8Source, M3DRefSegSource, MedRPGSource, MSCXRSource, SourceError
from mg3d.data.sources._common import read_image_header_2d, seeded_group_split
from mg3d.data.sources.chestxray8 import bbox_header
from mg3d.data.sources.mscxr import phrase_from_problem
from mg3d.errors import DataError

RG1 = Path(get_testdata_file("RG1_UNCI.dcm", download=False))
CT_SMALL = Path(get_testdata_file("CT_small.dcm", download=False))
ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"

MSCXR_HEADER = [
    "dicom_id",
    "category_name",
    "label_text",
    "path",
    "x",
    "y",
    "w",
    "h",
    "image_width",
    "image_height",
    "split",
]
M3D_HEADER = ["Image", "Mask", "Mask_ID", "Question_Type", "Question", "Answer"]


# ------------------------------------------------------------------------------------------ helpers


def numpy_box(mask: np.ndarray) -> list[float]:
    """Independent reference: half-open box of the non-zero voxels, by argwhere."""
    idx = np.argwhere(mask)
    return [float(v) for v in idx.min(axis=0)] + [float(v) for v in idx.max(axis=0) + 1]


def xywh_reference(x: int, y: int, w: int, h: int, width: int, height: int) -> list[float]:
    """Paint the pixel box into a row-major (H, W) picture and read it back as a voxel-frame (x-first) box."""
    picture = np.zeros((height, width), dtype=bool)
    picture[y : y + h, x : x + w] = True
    return numpy_box(picture.T)  # transpose: voxel frame axis 0 = column


@functools.lru_cache(maxsize=1)
def rg1_display() -> np.ndarray:
    """The real radiograph as 8-bit display pixels (H, W): MONOCHROME1, so inverted."""
    ds = pydicom.dcmread(RG1)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    arr = ds.pixel_array.astype(np.float64)
    arr = arr.max() - arr
    arr = (arr - arr.min()) / (arr.max() - arr.min()) * 255
    return arr.astype(np.uint8)


def save_image(path: Path, pixels_hw: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels_hw).save(path, **kw)
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def mimic_rel(patient: str, study: str, dicom_id: str, ext: str = "jpg") -> str:
    return f"files/p{patient[:2]}/p{patient}/s{study}/{dicom_id}.{ext}"


def write_case(
    root: Path, case: str, ct: np.ndarray, mask: np.ndarray, affine: np.ndarray, texts: dict[str, str] | None
) -> None:
    folder = root / case
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(ct, affine), folder / "ct.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine), folder / "mask.nii.gz")
    if texts is not None:
        (folder / "text.json").write_text(json.dumps(texts))


def refseg_rows(case: str, ids: list[int], prefix: str = "") -> list[list]:
    rows = []
    for mask_id in ids:
        for qtype in (0, 1):
            rows.append(
                [
                    f"{prefix}{case}/ct.nii.gz",
                    f"{prefix}{case}/mask.nii.gz",
                    mask_id,
                    qtype,
                    f"Q{qtype} about region {mask_id} of {case}?",
                    "Sure, it is [SEG].",
                ]
            )
    return rows


def small_case(shape=(16, 14, 8), label_boxes=((1, (2, 3, 1, 6, 9, 4)),)) -> tuple[np.ndarray, np.ndarray]:
    ct = np.full(shape, -1000, dtype=np.int16)
    mask = np.zeros(shape, dtype=np.uint8)
    for label, (a, b, c, d, e, f) in label_boxes:
        mask[a:d, b:e, c:f] = label
        ct[a:d, b:e, c:f] = 40
    return ct, mask


def small_refseg(tmp_path: Path, n_cases: int = 2) -> Path:
    root = tmp_path / "M3D_RefSeg"
    rows = []
    for i in range(n_cases):
        case = f"s{i:04d}"
        ct, mask = small_case(label_boxes=((1, (2, 3, 1, 6, 9, 4)), (2, (8 + i, 1, 5, 12, 4, 8))))
        write_case(
            root, case, ct, mask, np.diag([1.5, 1.5, 3.0, 1.0]), {"1": "a lesion", "2": "another lesion"}
        )
        rows += refseg_rows(case, [1, 2])
    write_csv(root / "M3D_RefSeg_train.csv", M3D_HEADER, rows[: len(rows) // 2])
    write_csv(root / "M3D_RefSeg_test.csv", M3D_HEADER, rows[len(rows) // 2 :])
    return root


# ------------------------------------------------------------------------------------------ MS-CXR


def _mscxr_real(tmp_path: Path, ext: str = "jpg") -> tuple[Path, Path, list[list]]:
    root = tmp_path / "mimic-cxr-jpg"
    pixels = rg1_display()
    height, width = pixels.shape
    rel = mimic_rel("10000032", "50414267", "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", ext)
    if ext == "dcm":
        (root / rel).parent.mkdir(parents=True)
        shutil.copy(RG1, root / rel)
    else:
        save_image(root / rel, pixels, quality=90)
    did = "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"
    rows = [
        [
            did,
            "Pleural Effusion",
            "bilateral pleural effusions",
            rel,
            120,
            1300,
            400,
            350,
            width,
            height,
            "test",
        ],
        [
            did,
            "Pleural Effusion",
            "bilateral pleural effusions",
            rel,
            1250,
            1320,
            420,
            330,
            width,
            height,
            "test",
        ],
        [did, "Cardiomegaly", "enlarged cardiac silhouette", rel, 600, 900, 700, 600, width, height, "test"],
    ]
    return write_csv(tmp_path / "MS_CXR_Local_Alignment_v1.1.0.csv", MSCXR_HEADER, rows), root, rows


def test_mscxr_real_radiograph_groups_boxes(tmp_path: Path) -> None:
    csv_path, root, rows = _mscxr_real(tmp_path)
    records = list(MSCXRSource(csv_path, root))
    assert len(records) == 2
    effusion, cardio = records
    width, height = 1841, 1955  # RG1: 1841 columns × 1955 rows
    assert effusion.spatial_shape == cardio.spatial_shape == (width, height)
    assert effusion.text == "bilateral pleural effusions" and effusion.category == "Pleural Effusion"
    assert [list(b) for b in effusion.boxes] == [xywh_reference(*r[4:8], width, height) for r in rows[:2]]
    assert list(cardio.boxes[0]) == xywh_reference(*rows[2][4:8], width, height) == [600, 900, 1300, 1500]
    assert effusion.split == "test" and effusion.modality == "CXR" and effusion.ndim == 2
    assert effusion.source["lines"] == [2, 3] and effusion.source["boxes_xywh"][1] == [1250, 1320, 420, 330]
    assert effusion.spacing is None and effusion.affine is None
    assert Path(effusion.image).is_file() and effusion.id != cardio.id


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")  # MONAI probing an optional GPU decoder
def test_mscxr_box_matches_monai_loaded_pixels(tmp_path: Path) -> None:
    """The box indexes the image as MONAI loads it: paint the box, load with MONAI, find the paint."""
    from monai.transforms import LoadImage

    width, height = 300, 220
    x, y, w, h = 40, 150, 90, 50
    picture = np.zeros((height, width), dtype=np.uint8)
    picture[y : y + h, x : x + w] = 255
    rel = mimic_rel("11000011", "51000011", "abc", "png")
    save_image(tmp_path / "root" / rel, picture)
    csv_path = write_csv(
        tmp_path / "ms.csv",
        MSCXR_HEADER,
        [["abc", "Edema", "edema", rel, x, y, w, h, width, height, "train"]],
    )
    (record,) = MSCXRSource(csv_path, tmp_path / "root")
    loaded = np.asarray(LoadImage(image_only=True, reader="PILReader")(record.image))
    assert loaded.shape == record.spatial_shape
    assert list(record.boxes[0]) == numpy_box(loaded > 128) == [40, 150, 130, 200]


def test_mscxr_reads_dicom_and_strips_files_prefix(tmp_path: Path) -> None:
    csv_path, root, _rows = _mscxr_real(tmp_path, ext="dcm")
    records = list(MSCXRSource(csv_path, root / "files"))  # root given as the files/ folder itself
    assert len(records) == 2
    assert records[0].image.endswith(".dcm") and records[0].spatial_shape == (1841, 1955)
    assert records[0].spacing is None  # RG1 declares PixelSpacing 0\0: not a usable spacing


def test_mscxr_image_ext_and_spacing_from_dicom(tmp_path: Path) -> None:
    ds = pydicom.dcmread(CT_SMALL)  # any 2D DICOM with a PixelSpacing will do for the header path
    rel = mimic_rel("12000012", "52000012", "ct", "jpg")
    target = (tmp_path / "root" / rel).with_suffix(".dcm")
    target.parent.mkdir(parents=True)
    ds.save_as(target)
    csv_path = write_csv(
        tmp_path / "ms.csv", MSCXR_HEADER, [["ct", "Edema", "x", rel, 1, 2, 3, 4, 128, 128, "val"]]
    )
    (record,) = MSCXRSource(csv_path, tmp_path / "root", image_ext=".dcm")
    assert record.spacing == pytest.approx((0.661468, 0.661468))
    assert record.split == "val"


def test_mscxr_without_split_column_splits_by_patient(tmp_path: Path) -> None:
    header = MSCXR_HEADER[:-1]
    rows = []
    for p in range(12):
        patient = f"1{p:07d}"
        for s in range(2):
            rel = mimic_rel(patient, f"5{p:03d}{s:04d}", f"d{p}-{s}", "png")
            save_image(tmp_path / "root" / rel, np.zeros((40, 50), np.uint8))
            rows.append([f"d{p}-{s}", "Pneumonia", f"opacity {s}", rel, 1, 1, 10, 10, 50, 40])
    csv_path = write_csv(tmp_path / "v1.0.0.csv", header, rows)
    first = list(
        MSCXRSource(csv_path, tmp_path / "root", val_fraction=0.25, test_fraction=0.25, split_seed=3)
    )
    again = list(
        MSCXRSource(csv_path, tmp_path / "root", val_fraction=0.25, test_fraction=0.25, split_seed=3)
    )
    assert first == again
    by_patient: dict[str, set[str]] = {}
    for rec in first:
        by_patient.setdefault(re.search(r"/(p\d{8})/", rec.image).group(1), set()).add(rec.split)
    assert len(by_patient) == 12
    assert all(len(splits) == 1 for splits in by_patient.values())
    assert sorted(sum(1 for r in first if r.split == s) for s in ("train", "val", "test")) == [6, 6, 12]


def test_mscxr_size_mismatch_and_rescale(tmp_path: Path) -> None:
    rel = mimic_rel("13000013", "53000013", "small", "png")
    save_image(tmp_path / "root" / rel, np.zeros((80, 100), np.uint8))
    row = ["small", "Edema", "edema", rel, 20, 40, 60, 80, 200, 160, "train"]
    csv_path = write_csv(tmp_path / "ms.csv", MSCXR_HEADER, [row])
    with pytest.raises(DataError, match=r"ms\.csv:2: image .* is 100×80 but the annotation says 200×160"):
        list(MSCXRSource(csv_path, tmp_path / "root"))
    (record,) = MSCXRSource(csv_path, tmp_path / "root", rescale_to_image=True)
    assert list(record.boxes[0]) == [10, 20, 40, 60]
    assert record.source["rescaled"] == [0.5, 0.5]


def test_mscxr_box_outside_image(tmp_path: Path) -> None:
    rel = mimic_rel("14000014", "54000014", "edge", "png")
    save_image(tmp_path / "root" / rel, np.zeros((80, 100), np.uint8))
    csv_path = write_csv(
        tmp_path / "ms.csv", MSCXR_HEADER, [["edge", "Edema", "edema", rel, 60, 10, 41, 20, 100, 80, "train"]]
    )
    with pytest.raises(
        DataError,
        match=r"ms\.csv:2: box \[60.0, 10.0, 101.0, 30.0\] lies outside the image of shape \[100, 80\]",
    ):
        list(MSCXRSource(csv_path, tmp_path / "root"))
    (record,) = MSCXRSource(csv_path, tmp_path / "root", box_tolerance=1.0)
    assert list(record.boxes[0]) == [60, 10, 100, 30]


def test_mscxr_missing_image_raise_and_skip(tmp_path: Path) -> None:
    csv_path, root, rows = _mscxr_real(tmp_path)
    rows.append(
        ["ffff", "Edema", "edema", mimic_rel("19999999", "59999999", "ffff"), 1, 1, 5, 5, 100, 100, "train"]
    )
    csv_path = write_csv(csv_path, MSCXR_HEADER, rows)
    with pytest.raises(
        DataError, match=r"v1\.1\.0\.csv:5: image not found for dicom_id ffff \(tried .*ffff\.jpg"
    ):
        list(MSCXRSource(csv_path, root))
    source = MSCXRSource(csv_path, root, on_error="skip")
    assert len(list(source)) == 2 and len(source) == 3
    (skip,) = source.skips.items
    assert skip.kind == "missing_file" and "ffff" in skip.item and "image not found" in skip.reason


def test_mscxr_csv_missing_column_always_raises(tmp_path: Path) -> None:
    header = [c for c in MSCXR_HEADER if c != "h"]
    csv_path = write_csv(
        tmp_path / "ms.csv", header, [["a", "Edema", "edema", "x.jpg", 1, 1, 5, 100, 100, "train"]]
    )
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError, match=r"ms\.csv: CSV is missing column\(s\) \['h'\]"):
            MSCXRSource(csv_path, tmp_path, on_error=on_error)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        pytest.param(lambda p: p.write_bytes(b""), r"is empty \(0 bytes\)", id="zero-byte"),
        pytest.param(
            lambda p: p.write_bytes(p.read_bytes()[:300]), r"cannot decode image .*truncated", id="truncated"
        ),
        pytest.param(lambda p: p.write_bytes(b"not an image at all"), "not a readable image", id="garbage"),
    ],
)
def test_mscxr_bad_image_files(tmp_path: Path, damage, message: str) -> None:
    rel = mimic_rel("15000015", "55000015", "bad", "png")
    noise = np.random.default_rng(0).integers(0, 255, (60, 70), dtype=np.uint8)
    image = save_image(tmp_path / "root" / rel, noise)
    damage(image)
    csv_path = write_csv(
        tmp_path / "ms.csv", MSCXR_HEADER, [["bad", "Edema", "edema", rel, 1, 1, 5, 5, 70, 60, "train"]]
    )
    with pytest.raises(DataError, match=message):
        list(MSCXRSource(csv_path, tmp_path / "root"))


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that only declares its size (IHDR + IEND): a 'decompression bomb' header without the pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [12000, 30000])  # below and above PIL's own bomb limit
def test_enormous_2d_header_refused_before_decoding(tmp_path: Path, side: int) -> None:
    path = _png_header_only(tmp_path / "huge.png", side, side)
    with pytest.raises(SourceError, match=r"huge\.png: .*(above the limit|too large)") as info:
        read_image_header_2d(path)
    assert info.value.kind == "too_large"


# ------------------------------------------------------------------------------------------ MedRPG


def test_medrpg_split_files(tmp_path: Path) -> None:
    images = tmp_path / "medrpg_images"
    save_image(images / "a.png", np.zeros((602, 640), np.uint8))  # 640 px long side (width)
    save_image(images / "b.png", np.zeros((640, 512), np.uint8))  # 640 px long side (height)
    prefix = "Please provide the bounding box coordinate of the region this sentence describes: "
    train = tmp_path / "train.json"
    train.write_text(
        json.dumps(
            [
                {
                    "image": "a.png",
                    "problem": prefix + "small left apical pneumothorax.",
                    "solution": [345, 70, 486, 115],
                },
                {
                    "image": "b.png",
                    "problem": prefix + "Left pneumothorax is small.",
                    "solution": [13, 408, 67, 495],
                    "normal_caption": "Left pneumothorax is small.",
                },
            ]
        )
    )
    test = tmp_path / "test.jsonl"
    test.write_text(
        json.dumps(
            {
                "image": "a.png",
                "problem": prefix + "cardiac silhouette enlarged.",
                "solution": [235.0, 353.0, 561.0, 535.0],
            }
        )
        + "\n"
    )
    records = list(MedRPGSource({"train": train, "test": test}, images))
    assert [r.split for r in records] == ["train", "train", "test"]
    assert [r.text for r in records] == [
        "small left apical pneumothorax",
        "Left pneumothorax is small.",
        "cardiac silhouette enlarged",
    ]
    assert [list(r.boxes[0]) for r in records] == [
        [345, 70, 486, 115],
        [13, 408, 67, 495],
        [235, 353, 561, 535],
    ]
    assert records[0].spatial_shape == (640, 602) and records[1].spatial_shape == (512, 640)
    assert records[0].dataset == "mscxr_medrpg" and records[2].id == "mscxr_medrpg/test/00000"
    assert records[0].source["problem"].startswith(prefix)


def test_medrpg_image_size_check_and_rescale(tmp_path: Path) -> None:
    save_image(
        tmp_path / "img" / "orig.png", np.zeros((1200, 1280), np.uint8)
    )  # original size: 2× the 640 frame
    split = tmp_path / "val.json"
    split.write_text(json.dumps([{"image": "orig.png", "problem": "p", "solution": [10, 20, 30, 40]}]))
    with pytest.raises(
        DataError, match=r"val\.json\[0\]: image .* is 1280×1200, but MedRPG boxes are on images 640"
    ):
        list(MedRPGSource({"val": split}, tmp_path / "img"))
    (record,) = MedRPGSource({"val": split}, tmp_path / "img", rescale_to_image=True)
    assert list(record.boxes[0]) == [20, 40, 60, 80]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"image": "a.png", "problem": "p"}, r"lacks key\(s\) \['solution'\]"),
        ({"image": "a.png", "problem": "p", "solution": [1, 2, 3]}, r"'solution' must be \[x1, y1, x2, y2\]"),
        ({"image": "a.png", "problem": "p", "solution": [30, 2, 10, 4]}, "hi < lo on axis 0"),
        ({"image": "gone.png", "problem": "p", "solution": [1, 2, 3, 4]}, "image not found"),
        ({"image": "a.png", "problem": "p", "solution": [600, 2, 700, 4]}, "lies outside the image"),
    ],
)
def test_medrpg_bad_items(tmp_path: Path, item: dict, message: str) -> None:
    save_image(tmp_path / "a.png", np.zeros((400, 640), np.uint8))
    split = tmp_path / "train.json"
    split.write_text(json.dumps([item]))
    with pytest.raises(DataError, match=r"train\.json\[0\]: .*" + message):
        list(MedRPGSource({"train": split}, tmp_path))


def test_phrase_from_problem() -> None:
    prefix = "Please provide the bounding box coordinate of the region this sentence describes:"
    assert phrase_from_problem(f"{prefix} right basilar opacity.") == "right basilar opacity"
    assert phrase_from_problem("free text without the prefix.") == "free text without the prefix."


# ------------------------------------------------------------------------------------------ ChestX-ray8


BBOX_HEADER_LINE = "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
DATA_ENTRY_LINE = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
)


def _nih_fixture(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Real radiograph resized to 1024² PNGs, nested as the NIH tarballs unpack, and both CSVs verbatim."""
    images = tmp_path / "nih"
    pixels = np.asarray(Image.fromarray(rg1_display()).resize((1024, 1024), Image.BILINEAR))
    for name in ("00000001_000.png", "00000001_001.png", "00000002_000.png"):
        save_image(images / "images_001" / "images" / name, pixels, compress_level=1)
    bbox = tmp_path / "BBox_List_2017.csv"
    bbox.write_text(
        BBOX_HEADER_LINE
        + "00000001_000.png,Infiltrate,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661,,,\n"
        + "00000001_000.png,Infiltrate,600.5,300.25,100.0,120.5,,,\n"
        + "00000001_000.png,Cardiomegaly,380,500,400,300,,,\n"
        + "00000001_001.png,Effusion,700,650,200,180,,,\n"
        + "00000002_000.png,Nodule,100,100,30,30\n"
    )
    entry = tmp_path / "Data_Entry_2017.csv"
    entry.write_text(
        DATA_ENTRY_LINE
        + "00000001_000.png,Cardiomegaly|Infiltration,0,1,58,M,PA,2682,2749,0.143,0.143\n"
        + "00000001_001.png,Effusion,1,1,58,M,PA,2894,2729,0.143,0.143\n"
        + "00000002_000.png,Nodule,0,2,81,M,PA,2500,2048,0.171,0.171\n"
    )
    return bbox, images, entry


def test_bbox_header_variants() -> None:
    published = ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""]
    assert bbox_header(published) == ["Image Index", "Finding Label", "x", "y", "w", "h", "", "", ""]
    assert bbox_header(["Image Index", "Finding Label", "Bbox [x,y,w,h]", "", "", ""])[2:6] == [
        "x",
        "y",
        "w",
        "h",
    ]
    assert bbox_header(["Image Index", "Finding Label", "Bbox [x,y,w,h]"])[2:] == ["x", "y", "w", "h"]
    assert bbox_header(["Image Index", "Finding Label", "x", "y", "w", "h"])[2:] == ["x", "y", "w", "h"]


def test_chestxray8_real_radiograph(tmp_path: Path) -> None:
    bbox, images, entry = _nih_fixture(tmp_path)
    records = {
        r.id: r
        for r in ChestXray8Source(
            bbox, images, data_entry_csv=entry, val_fraction=0.0, test_fraction=0.5, seed=1
        )
    }
    assert sorted(records) == [
        "chestxray8/00000001_000/Cardiomegaly",
        "chestxray8/00000001_000/Infiltration",
        "chestxray8/00000001_001/Effusion",
        "chestxray8/00000002_000/Nodule",
    ]
    infiltration = records["chestxray8/00000001_000/Infiltration"]
    assert infiltration.category == "Infiltration" and infiltration.source["finding_label"] == "Infiltrate"
    expected = [
        [
            225.084745762712,
            547.019216763771,
            225.084745762712 + 86.7796610169491,
            547.019216763771 + 79.1864406779661,
        ],
        [600.5, 300.25, 700.5, 420.75],
    ]
    np.testing.assert_allclose(infiltration.boxes, expected, rtol=0, atol=1e-9)
    cardio = records["chestxray8/00000001_000/Cardiomegaly"]
    assert list(cardio.boxes[0]) == xywh_reference(380, 500, 400, 300, 1024, 1024)
    assert "pulmonary infiltration" in infiltration.text and "cardiomegaly" in cardio.text
    assert infiltration.spatial_shape == (1024, 1024) and infiltration.modality == "CXR"
    # Patient 1's two images share a split; with two patients and test_fraction 0.5, one patient is test.
    assert cardio.split == records["chestxray8/00000001_001/Effusion"].split
    assert {cardio.split, records["chestxray8/00000002_000/Nodule"].split} == {"train", "test"}


def test_chestxray8_split_and_phrases_are_seeded(tmp_path: Path) -> None:
    bbox, images, _entry = _nih_fixture(tmp_path)
    a = list(ChestXray8Source(bbox, images, seed=7))
    b = list(ChestXray8Source(bbox, images, seed=7))
    assert a == b
    templates = ("{finding}", "where is {finding}")
    texts = {
        r.text for seed in range(6) for r in ChestXray8Source(bbox, images, seed=seed, templates=templates)
    }
    assert "a nodule" in texts and "where is a nodule" in texts
    with pytest.raises(DataError, match=r"needs a '\{finding\}' field"):
        ChestXray8Source(bbox, images, templates=("no field",))


def test_chestxray8_bad_items(tmp_path: Path) -> None:
    bbox, images, entry = _nih_fixture(tmp_path)
    with bbox.open("a") as handle:
        handle.write("00000001_000.png,Mass,1000,10,40,40,,,\n")  # x + w = 1040 > 1024
        handle.write("00000099_000.png,Mass,10,10,40,40,,,\n")  # no such image (and no patient)
    with pytest.raises(
        DataError, match=r"BBox_List_2017\.csv:7: box \[1000.0, 10.0, 1040.0, 50.0\] lies outside"
    ):
        list(ChestXray8Source(bbox, images))
    source = ChestXray8Source(bbox, images, data_entry_csv=entry, on_error="skip")
    assert len(list(source)) == 4
    assert source.skips.by_kind() == {"box_outside": 1, "missing_patient": 1}
    source = ChestXray8Source(bbox, images, on_error="skip")
    list(source)
    assert source.skips.by_kind() == {"box_outside": 1, "missing_file": 1}
    assert any("00000099_000.png not found" in s.reason for s in source.skips.items)


def test_chestxray8_missing_column(tmp_path: Path) -> None:
    bbox = tmp_path / "BBox_List_2017.csv"
    bbox.write_text("Image Index,Bbox [x,y,w,h],,,\n00000001_000.png,1,2,3,4\n")
    with pytest.raises(
        DataError, match=r"BBox_List_2017\.csv: CSV is missing column\(s\) \['Finding Label'\]"
    ):
        ChestXray8Source(bbox, tmp_path)


def test_chestxray8_resized_images(tmp_path: Path) -> None:
    bbox, images, _ = _nih_fixture(tmp_path)
    small = tmp_path / "small"
    for path in images.rglob("*.png"):
        save_image(small / path.name, np.zeros((512, 512), np.uint8))
    with pytest.raises(DataError, match="is 512×512, but the boxes refer to 1024×1024"):
        list(ChestXray8Source(bbox, small))
    recs = {r.id: r for r in ChestXray8Source(bbox, small, rescale_to_image=True)}
    assert list(recs["chestxray8/00000001_000/Cardiomegaly"].boxes[0]) == [190, 250, 390, 400]


# ------------------------------------------------------------------------------------------ M3D-RefSeg


def _ct_small_volume(n_slices: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """CT_small's HU slice stacked (with shifts) into an (i=column, j=row, k=slice) volume and its affine."""
    ds = pydicom.dcmread(CT_SMALL)
    hu = (ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).astype(
        np.int16
    )
    volume = np.stack([np.roll(hu.T, 3 * k, axis=1) for k in range(n_slices)], axis=-1)
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
    affine = np.diag([col_mm, row_mm, float(ds.SliceThickness), 1.0])
    affine[:3, 3] = [-40.0, -40.0, 10.0]
    return volume, affine


def test_m3d_refseg_real_ct_slices(tmp_path: Path) -> None:
    root = tmp_path / "M3D_RefSeg"
    volume, affine = _ct_small_volume()
    mask = np.zeros(volume.shape, dtype=np.uint8)
    mask[20:41, 30:46, 2:5] = 1
    region = np.zeros(volume.shape, dtype=bool)
    region[60:100, 55:110, 1:7] = True
    mask[region & (volume > 0)] = 2  # irregular, intensity-defined region of the real slice
    assert (mask == 2).sum() > 50
    write_case(
        root, "s0000", volume, mask, affine, {"1": "a block", "2": "the bright structure", "3": "unused"}
    )
    write_csv(root / "M3D_RefSeg_train.csv", M3D_HEADER, refseg_rows("s0000", [1]))
    write_csv(root / "M3D_RefSeg_test.csv", M3D_HEADER, refseg_rows("s0000", [2]))
    records = list(M3DRefSegSource(root))
    assert len(records) == 4
    by_label = {(r.mask.label, r.question_type): r for r in records}
    for (label, qtype), rec in by_label.items():
        assert list(rec.boxes[0]) == numpy_box(mask == label)
        assert rec.question_type == qtype
        assert rec.text == f"Q{qtype} about region {label} of s0000?"
        assert rec.source["description"] == {1: "a block", 2: "the bright structure"}[label]
    assert list(by_label[(1, 0)].boxes[0]) == [20, 30, 2, 41, 46, 5]
    rec = by_label[(2, 1)]
    assert rec.split == "test" and by_label[(1, 0)].split in ("train", "val")
    assert rec.spatial_shape == (128, 128, 8) and rec.modality == "CT" and rec.ndim == 3
    assert rec.spacing == pytest.approx((0.661468, 0.661468, 5.0))
    np.testing.assert_allclose(rec.affine, affine)
    assert rec.mask.path.endswith("s0000/mask.nii.gz") and rec.image.endswith("s0000/ct.nii.gz")
    assert len({r.id for r in records}) == 4


def test_m3d_refseg_real_mr_volume_las(tmp_path: Path) -> None:
    """nibabel's anatomical.nii (LAS): the box stays in the file's own i, j, k frame, affine recorded as is."""
    src = nib.load(ANATOMICAL)
    data = np.asarray(src.dataobj)
    mask = np.zeros(data.shape, dtype=np.int16)
    threshold = np.percentile(data, 90)
    mask[:16][data[:16] > threshold] = 4  # bright voxels in the first half of axis i
    mask[25:28, 5:9, 20:23] = 7
    root = tmp_path / "data"
    write_case(root, "s0042", data, mask, src.affine, {"4": "bright region", "7": "small block"})
    # CSV paths as M3D's generator wrote them: a prefix that is not the local root.
    rows = refseg_rows("s0042", [4, 7], prefix="./Data/data/RefSegData/")
    write_csv(tmp_path / "all.csv", M3D_HEADER, rows)
    records = list(M3DRefSegSource(root, all_csv=tmp_path / "all.csv", val_fraction=0.0, test_fraction=0.0))
    assert len(records) == 4 and {r.split for r in records} == {"train"}
    for rec in records:
        assert list(rec.boxes[0]) == numpy_box(mask == rec.mask.label)
        assert rec.spacing == (2.0, 2.0, 2.0) and rec.spatial_shape == (33, 41, 25)
        np.testing.assert_allclose(rec.affine, src.affine)
        assert nib.aff2axcodes(np.asarray(rec.affine)) == ("L", "A", "S")
    assert list(next(r for r in records if r.mask.label == 7).boxes[0]) == [25, 5, 20, 28, 9, 23]


def test_m3d_refseg_npy_variant(tmp_path: Path) -> None:
    root = tmp_path / "M3D_RefSeg_npy" / "s0003"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ct = rng.random((1, 32, 256, 256), dtype=np.float32)
    mask = np.zeros((1, 32, 256, 256), dtype=np.float32)
    mask[0, 4:9, 100:140, 30:61] = 2.0
    mask[0, 20:21, 7:8, 200:250] = 5.0
    np.save(root / "ct.npy", ct)
    np.save(root / "mask.npy", mask)
    (root / "text.json").write_text(json.dumps({"2": "a", "5": "b"}))
    rows = refseg_rows("s0003", [2, 5], prefix="M3D_RefSeg/")  # CSV still names .nii.gz files
    write_csv(root.parent / "M3D_RefSeg_test.csv", M3D_HEADER, rows)
    records = list(M3DRefSegSource(root.parent, variant="npy"))
    assert len(records) == 4
    for rec in records:
        assert list(rec.boxes[0]) == numpy_box(mask[0] == rec.mask.label)
        assert rec.spatial_shape == (32, 256, 256) and rec.spacing is None and rec.affine is None
        assert rec.image.endswith("s0003/ct.npy") and rec.mask.path.endswith("s0003/mask.npy")
        assert rec.split == "test"
    assert list(next(r for r in records if r.mask.label == 2).boxes[0]) == [4, 100, 30, 9, 140, 61]


def test_m3d_refseg_split_by_case(tmp_path: Path) -> None:
    root = tmp_path / "M3D_RefSeg"
    rows = []
    for i in range(10):
        ct, mask = small_case()
        write_case(root, f"s{i:04d}", ct, mask, np.eye(4), {"1": "x"})
        rows += refseg_rows(f"s{i:04d}", [1])
    write_csv(root / "M3D_RefSeg_all.csv", M3D_HEADER, rows)
    records = list(M3DRefSegSource(root, val_fraction=0.2, test_fraction=0.3, seed=5))
    per_case: dict[str, set[str]] = {}
    for rec in records:
        per_case.setdefault(rec.source["case"], set()).add(rec.split)
    assert all(len(s) == 1 for s in per_case.values())
    counts = {s: sum(1 for v in per_case.values() if s in v) for s in ("train", "val", "test")}
    assert counts == {"train": 5, "val": 2, "test": 3}
    assert seeded_group_split(
        [f"s{i:04d}" for i in range(10)], val_fraction=0.2, test_fraction=0.3, seed=5
    ) == {c: next(iter(s)) for c, s in per_case.items()}


def test_m3d_refseg_duplicate_questions_get_distinct_ids(tmp_path: Path) -> None:
    root = small_refseg(tmp_path, n_cases=1)
    rows = refseg_rows("s0000", [1]) * 2
    write_csv(root / "M3D_RefSeg_train.csv", M3D_HEADER, rows)
    ids = [r.id for r in M3DRefSegSource(root, train_csv=root / "M3D_RefSeg_train.csv")]
    assert len(ids) == 4 and len(set(ids)) == 4 and ids[2] == ids[0] + "-2"


# ---- bad M3D inputs: one test each, checking the message


def _corrupt(root: Path, what: str) -> None:
    case = root / "s0000"
    if what == "missing-image":
        (case / "ct.nii.gz").unlink()
    elif what == "missing-mask":
        (case / "mask.nii.gz").unlink()
    elif what in ("truncated-ct", "truncated-mask"):
        # Re-compress without compression (stored blocks) so the cut lands in the voxel data, not the header.
        path = case / ("ct.nii.gz" if what == "truncated-ct" else "mask.nii.gz")
        data = gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=0)
        path.write_bytes(data[: len(data) - 600])
    elif what == "zero-byte-mask":
        (case / "mask.nii.gz").write_bytes(b"")
    elif what == "garbage-ct":
        (case / "ct.nii.gz").write_bytes(b"this is not a nifti file" * 20)
    elif what == "empty-mask":
        ct, _ = small_case()
        write_case(root, "s0000", ct, np.zeros_like(ct, dtype=np.uint8), np.diag([1.5, 1.5, 3, 1]), None)
    elif what == "label-absent":
        ct, mask = small_case(label_boxes=((1, (2, 3, 1, 6, 9, 4)),))  # label 2 gone
        write_case(root, "s0000", ct, mask, np.diag([1.5, 1.5, 3, 1]), None)
    elif what == "shape-mismatch":
        ct, _ = small_case(shape=(16, 14, 9))
        nib.save(nib.Nifti1Image(ct, np.diag([1.5, 1.5, 3, 1])), case / "ct.nii.gz")
    elif what == "4d":
        ct = np.zeros((16, 14, 8, 2), dtype=np.int16)
        nib.save(nib.Nifti1Image(ct, np.diag([1.5, 1.5, 3, 1])), case / "ct.nii.gz")
    elif what in ("nan-spacing", "zero-spacing", "negative-spacing"):
        ct, _ = small_case()
        img = nib.Nifti1Image(ct, np.diag([1.5, 1.5, 3, 1]))
        img.header["pixdim"][2] = {"nan-spacing": np.nan, "zero-spacing": 0.0, "negative-spacing": -1.5}[what]
        nib.save(img, case / "ct.nii.gz")
    elif what == "huge-header":
        header = nib.Nifti1Header()
        header.set_data_shape((4000, 4000, 4000))
        header.set_data_dtype(np.int16)
        (case / "ct.nii.gz").unlink()
        with (case / "ct.nii").open("wb") as handle:  # header only: the data it claims is not there
            header.write_to(handle)
        rows = [[r[0].replace(".nii.gz", ".nii"), *r[1:]] for r in refseg_rows("s0000", [1, 2])]
        write_csv(root / "M3D_RefSeg_train.csv", M3D_HEADER, rows)
    elif what == "affine-mismatch":
        ct, _ = small_case()
        nib.save(nib.Nifti1Image(ct, np.diag([1.0, 1.5, 3, 1])), case / "ct.nii.gz")
    elif what == "text-region":
        (case / "text.json").write_text(json.dumps({"1": "a lesion"}))
    elif what == "text-missing":
        (case / "text.json").unlink()
    else:
        raise AssertionError(what)


BAD_M3D = [
    ("missing-image", "missing_file", r"image not found: .*s0000/ct\.nii\.gz"),
    ("missing-mask", "missing_file", r"mask not found: .*s0000/mask\.nii\.gz"),
    ("truncated-ct", "truncated", r"s0000/ct\.nii\.gz: truncated or corrupt gzip stream"),
    ("truncated-mask", "truncated", r"s0000/mask\.nii\.gz: cannot read voxel data .*truncated\?"),
    ("zero-byte-mask", "empty_file", r"s0000/mask\.nii\.gz: mask is empty \(0 bytes\)"),
    ("garbage-ct", "unreadable", r"s0000/ct\.nii\.gz: cannot read NIfTI header"),
    ("empty-mask", "empty_mask", r"s0000/mask\.nii\.gz: mask is empty \(no non-zero voxel\)"),
    ("label-absent", "label_absent", r"label 2 is absent from .*s0000/mask\.nii\.gz \(labels present: 1\)"),
    ("shape-mismatch", "shape_mismatch", r"mask shape \[16, 14, 8\] differs from image shape \[16, 14, 9\]"),
    (
        "4d",
        "bad_geometry",
        r"s0000/ct\.nii\.gz: image has 4 dimensions \[16, 14, 8, 2\]; expected a 3D volume",
    ),
    (
        "nan-spacing",
        "bad_geometry",
        r"s0000/ct\.nii\.gz: image has invalid voxel spacing \[1\.5, nan, 3\.0\]",
    ),
    ("zero-spacing", "bad_geometry", r"invalid voxel spacing \[1\.5, 0\.0, 3\.0\] \(NaN or ≤ 0\)"),
    ("negative-spacing", "bad_geometry", r"invalid voxel spacing \[1\.5, -1\.5, 3\.0\]"),
    ("huge-header", "too_large", r"s0000/ct\.nii: header claims 64,000,000,000 voxels"),
    ("affine-mismatch", "affine_mismatch", r"mask affine differs from the image's"),
    ("text-region", "missing_text", r"s0000/text\.json has no region 2 \(regions: 1\)"),
    ("text-missing", "missing_file", r"s0000/text\.json: text\.json not found"),
]


@pytest.mark.parametrize(("what", "kind", "message"), BAD_M3D, ids=[b[0] for b in BAD_M3D])
def test_m3d_refseg_bad_input(tmp_path: Path, what: str, kind: str, message: str) -> None:
    root = small_refseg(tmp_path, n_cases=2)
    write_csv(root / "M3D_RefSeg_train.csv", M3D_HEADER, refseg_rows("s0000", [1, 2]))
    write_csv(root / "M3D_RefSeg_test.csv", M3D_HEADER, refseg_rows("s0001", [1, 2]))
    _corrupt(root, what)
    with pytest.raises(DataError, match=r"M3D_RefSeg_train\.csv:\d+: .*" + message) as info:
        list(M3DRefSegSource(root))
    assert "Traceback" not in str(info.value)
    source = M3DRefSegSource(root, on_error="skip")
    records = list(source)
    good = [r for r in records if r.source["case"] == "s0001"]
    assert len(good) == 4  # the intact case is untouched
    bad_rows = 4 - (len(records) - len(good))
    assert len(source.skips) == bad_rows and bad_rows >= 1
    assert {s.kind for s in source.skips.items} == {kind}


def test_m3d_refseg_csv_missing_column(tmp_path: Path) -> None:
    root = small_refseg(tmp_path, n_cases=1)
    write_csv(
        root / "M3D_RefSeg_train.csv", [c for c in M3D_HEADER if c != "Mask_ID"], [["a", "b", 0, "q", "a"]]
    )
    with pytest.raises(DataError, match=r"M3D_RefSeg_train\.csv: CSV is missing column\(s\) \['Mask_ID'\]"):
        M3DRefSegSource(root, on_error="skip")


def test_m3d_refseg_bad_row_values(tmp_path: Path) -> None:
    root = small_refseg(tmp_path, n_cases=1)
    rows = refseg_rows("s0000", [1])
    rows[1][2] = "one"
    write_csv(root / "M3D_RefSeg_train.csv", M3D_HEADER, rows)
    with pytest.raises(DataError, match=r"M3D_RefSeg_train\.csv:3: Mask_ID: not a number: 'one'"):
        list(M3DRefSegSource(root, train_csv=root / "M3D_RefSeg_train.csv"))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-1000]), r"ct\.npy: truncated: header promises"),
        (
            lambda p: np.save(p, np.zeros((2, 4, 8, 8), np.float32)),
            r"ct\.npy: image array has shape \[2, 4, 8, 8\]",
        ),
        (
            lambda p: np.save(p, np.zeros((4, 9, 8), np.float32)),
            r"mask shape \[4, 8, 8\] differs from image shape \[4, 9, 8\]",
        ),
        (lambda p: np.save(p, np.array([{"a": 1}], dtype=object)), r"ct\.npy: holds Python objects"),
    ],
)
def test_m3d_refseg_npy_bad_input(tmp_path: Path, damage, message: str) -> None:
    root = tmp_path / "npy"
    (root / "s0000").mkdir(parents=True)
    mask = np.zeros((1, 4, 8, 8), np.float32)
    mask[0, 1:3, 2:5, 3:4] = 1
    np.save(root / "s0000" / "ct.npy", np.ones((1, 4, 8, 8), np.float32))
    np.save(root / "s0000" / "mask.npy", mask)
    (root / "s0000" / "text.json").write_text('{"1": "x"}')
    write_csv(root / "M3D_RefSeg_train.csv", M3D_HEADER, refseg_rows("s0000", [1]))
    (record, _) = M3DRefSegSource(root, variant="npy")
    assert list(record.boxes[0]) == [1, 2, 3, 3, 5, 4]
    damage(root / "s0000" / "ct.npy")
    with pytest.raises(DataError, match=message):
        list(M3DRefSegSource(root, variant="npy"))


def test_on_error_value_checked(tmp_path: Path) -> None:
    root = small_refseg(tmp_path, n_cases=1)
    with pytest.raises(DataError, match="on_error must be one of"):
        M3DRefSegSource(root, on_error="ignore")


def test_xywh_to_box_agrees_with_monai_mode_conversion() -> None:
    from mg3d.boxes import convert_box_mode
    from mg3d.data.sources._common import xywh_to_box

    rng = np.random.default_rng(0)
    for x, y, w, h in rng.uniform(1, 900, size=(50, 4)):
        ours = xywh_to_box(x, y, w, h, "t")
        np.testing.assert_allclose(ours, convert_box_mode([x, y, w, h], "xywh", "xyxy"), rtol=1e-6)
        np.testing.assert_array_equal(ours, [x, y, x + w, y + h])
    with pytest.raises(SourceError, match="non-positive width or height"):
        xywh_to_box(1, 2, 0, 4, "row 9")


def test_chestxray8_official_split_lists(tmp_path: Path) -> None:
    bbox, images, entry = _nih_fixture(tmp_path)
    (tmp_path / "test_list.txt").write_text("00000002_000.png\n")
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n")
    records = list(
        ChestXray8Source(
            bbox,
            images,
            data_entry_csv=entry,
            test_list=tmp_path / "test_list.txt",
            train_val_list=tmp_path / "train_val_list.txt",
            val_fraction=0.0,
        )
    )
    assert {r.source["image_index"]: r.split for r in records} == {
        "00000001_000.png": "train",
        "00000001_001.png": "train",
        "00000002_000.png": "test",
    }
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n")
    source = ChestXray8Source(
        bbox,
        images,
        test_list=tmp_path / "test_list.txt",
        train_val_list=tmp_path / "train_val_list.txt",
        on_error="skip",
    )
    assert len(list(source)) == 3
    assert source.skips.by_kind() == {"missing_split": 1}
    assert "00000001_001.png is in neither test_list nor train_val_list" in source.skips.items[0].reason


@settings(max_examples=80, deadline=None)
@given(
    hnp.arrays(
        np.uint8,
        st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 6)),
        elements=st.sampled_from([0, 0, 0, 1, 2, 7]),
    )
)
def test_label_map_boxes_property(mask: np.ndarray) -> None:
    """Every label's box from the one-pass derivation equals the brute-force argwhere box."""
    from mg3d.data.sources.m3d_refseg import _Case

    if not mask.any():
        with pytest.raises(SourceError, match="mask is empty"):
            M3DRefSegSource._boxes_of(mask, Path("m.nii.gz"), _Case(mask.shape, None, None))
        return
    case = M3DRefSegSource._boxes_of(mask, Path("m.nii.gz"), _Case(mask.shape, None, None))
    assert sorted(case.boxes) == sorted(int(v) for v in np.unique(mask) if v)
    for label, box in case.boxes.items():
        assert list(box) == numpy_box(mask == label)


def test_dataset_name_override(tmp_path: Path) -> None:
    root = small_refseg(tmp_path, n_cases=1)
    records = list(M3DRefSegSource(root, dataset="synthetic3d"))
    assert {r.dataset for r in records} == {"synthetic3d"}
    assert all(r.id.startswith("synthetic3d/s0000/") for r in records)
    with pytest.raises(DataError, match="dataset name must be"):
        M3DRefSegSource(root, dataset="a/b")
