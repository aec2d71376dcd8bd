"""Synthetic phantoms: exact on-disk formats, determinism, laterality from the affine, unique phrases.

Every expectation is recomputed here from the written files with nibabel / PIL / the csv module, not
read back from the generator's own numbers.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nibabel.affines import apply_affine
from PIL import Image
from scipy import ndimage

from mg3d.data.synthetic import (
    CXR8_BBOX_HEADER,
    CXR8_DATA_ENTRY_HEADER,
    M3D_CSV_COLUMNS,
    MSCXR_COLUMNS,
    MSCXR_CSV_NAME,
    ORGAN_LABELS,
    TRUTH_NAME,
    generate_ct_case,
    generate_cxr_case,
    make_ct3d,
    make_cxr2d,
    orientation_affine,
    patient_side,
)
from mg3d.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SMALL = {"shape": (64, 64, 24), "spacing": (1.0, 1.0, 4.0)}


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _np_box(mask: np.ndarray) -> list[int]:
    idx = np.nonzero(mask)
    return [int(a.min()) for a in idx] + [int(a.max()) + 1 for a in idx]


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ct")
    make_ct3d(out, 4, seed=11)
    return out


@pytest.fixture(scope="module")
def cxr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cxr")
    make_cxr2d(out, 6, seed=5, layout="both", n_normal=1)
    return out


# ------------------------------------------------------------------------------------------ geometry


def test_orientation_affine_hand_computed() -> None:
    aff = orientation_affine((4, 6, 8), (0.5, 2.0, 3.0), "LPS", center_mm=(10.0, 20.0, 30.0))
    expected = np.array(
        [[-0.5, 0, 0, 10.75], [0, -2.0, 0, 25.0], [0, 0, 3.0, 19.5], [0, 0, 0, 1]]
    )  # origin = centre - D · (shape - 1) / 2
    np.testing.assert_allclose(aff, expected)
    assert nib.aff2axcodes(aff) == ("L", "P", "S")
    ras = orientation_affine((4, 6, 8), (0.5, 2.0, 3.0), "RAS", center_mm=(0, 0, 0))
    np.testing.assert_allclose(ras[:3, :3], np.diag([0.5, 2.0, 3.0]))


def test_patient_side_hand_computed() -> None:
    # RAS+ world: x grows toward the patient's right.
    assert patient_side((-20.0, 0, 0), (0.0, 0, 0)) == "left"
    assert patient_side((20.0, 0, 0), (0.0, 0, 0)) == "right"
    assert patient_side((3.0, 0, 0), (0.0, 0, 0)) == "midline"
    assert patient_side((45.0, 0, 0), (50.0, 0, 0), margin_mm=5.0) == "left"
    # Voxel i = 56 of a 64-wide grid, body centre at i = 31.5, 1 mm voxels: the patient's left under an
    # LPS-like affine (i runs toward L), the patient's right under a RAS one.
    for code, side in (("LPS", "left"), ("RAS", "right")):
        aff = orientation_affine((64, 64, 16), (1.0, 1.0, 1.0), code, center_mm=(7.0, -3.0, 100.0))
        centre = apply_affine(aff, (31.5, 31.5, 7.5))
        assert patient_side(apply_affine(aff, (56, 31.5, 7.5)), centre) == side


@settings(max_examples=60, deadline=None)
@given(
    perm=st.permutations([0, 1, 2]),
    flips=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    spacing=st.tuples(*[st.floats(0.3, 5.0)] * 3),
    centre=st.tuples(*[st.floats(-500, 500)] * 3),
    step=st.integers(6, 30),
)
def test_orientation_affine_property(perm, flips, spacing, centre, step) -> None:
    pairs = ("LR", "PA", "IS")
    code = "".join(pairs[w][int(f)] for w, f in zip(perm, flips, strict=True))
    shape = (40, 50, 30)
    aff = orientation_affine(shape, spacing, code, center_mm=centre)
    assert "".join(nib.aff2axcodes(aff)) == code
    np.testing.assert_allclose(apply_affine(aff, (np.array(shape) - 1) / 2), centre, atol=1e-6)
    # Moving along the stored axis that carries L/R toward the letter it names lands on that side.
    n = next(i for i, c in enumerate(code) if c in "LR")
    voxel = (np.array(shape) - 1) / 2
    voxel[n] += step
    side = patient_side(apply_affine(aff, voxel), centre, margin_mm=1e-3)
    assert side == {"L": "left", "R": "right"}[code[n]]


# ------------------------------------------------------------------------------------------ CT phantom


@pytest.mark.parametrize("other", ["RAS", "LAS", "PLS"])
def test_same_seed_is_the_same_patient_in_every_orientation(other: str) -> None:
    """Stored in LPS or any other orientation, nibabel's canonical view is the same volume and affine."""
    views = {}
    for code in ("LPS", other):
        ph = generate_ct_case(np.random.default_rng(3), orientation=code, **SMALL)
        assert ph.orientation == code
        img = nib.as_closest_canonical(nib.Nifti1Image(ph.volume, ph.affine))
        msk = nib.as_closest_canonical(nib.Nifti1Image(ph.mask, ph.affine))
        views[code] = (np.asarray(img.dataobj), np.asarray(msk.dataobj), img.affine, ph)
    a, b = views["LPS"], views[other]
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[2], b[2], atol=1e-9)
    assert [(r.phrase, r.side) for r in a[3].regions] == [(r.phrase, r.side) for r in b[3].regions]


@pytest.mark.parametrize("code", ["LPS", "RAS", "PLS"])
def test_organs_and_lesions_are_on_the_patients_side(code: str) -> None:
    """Liver on the patient's right, spleen and left kidney on the left — in world x through the affine."""
    for seed in range(3):
        ph = generate_ct_case(np.random.default_rng(seed), orientation=code, **SMALL)
        mid_x = ph.midline_world[0]
        world_x = {
            name: apply_affine(ph.affine, ndimage.center_of_mass(ph.anatomy == ORGAN_LABELS[name]))[0]
            for name in ("liver", "spleen", "left kidney", "right kidney", "left lung", "right lung")
        }
        assert (
            world_x["liver"] > mid_x + 5
            and world_x["right kidney"] > mid_x + 5
            and world_x["right lung"] > mid_x
        )
        assert (
            world_x["spleen"] < mid_x - 5
            and world_x["left kidney"] < mid_x - 5
            and world_x["left lung"] < mid_x
        )
        for reg in ph.regions:
            centre = apply_affine(ph.affine, np.argwhere(ph.mask == reg.region_id).mean(axis=0))
            assert reg.side == patient_side(centre, ph.midline_world)
            if reg.site in ("left kidney", "left lung", "spleen"):
                assert reg.side != "right"
            if reg.site in ("right kidney", "right lung", "liver"):
                assert reg.side != "left"


def test_lesion_in_patients_left_half_is_called_left_for_lps_and_ras() -> None:
    found = {"LPS": 0, "RAS": 0}
    for code in found:
        for seed in range(12):
            ph = generate_ct_case(np.random.default_rng(seed), orientation=code, **SMALL)
            for reg in ph.regions:
                world = apply_affine(ph.affine, np.argwhere(ph.mask == reg.region_id).mean(axis=0))
                if world[0] < ph.midline_world[0] - 5:  # RAS+: smaller x = the patient's left
                    assert reg.side == "left"
                    found[code] += 1
                    if reg.phrase_type == "laterality" and reg.phrase_value in ("left", "right"):
                        assert "left" in reg.phrase
    assert min(found.values()) > 0


def test_hu_ranges_are_plausible() -> None:
    ph = generate_ct_case(np.random.default_rng(0))
    vol = ph.volume
    assert vol.dtype == np.int16 and vol.shape == (96, 96, 48)
    assert vol.min() >= -1024 and vol.max() <= 3071
    corners = vol[:4, :4, :].astype(float)
    assert abs(corners.mean() + 1000) < 15
    mean = {k: vol[ph.anatomy == v].mean() for k, v in ORGAN_LABELS.items() if np.any(ph.anatomy == v)}
    assert -900 < mean["left lung"] < -650 and -900 < mean["right lung"] < -650
    assert 30 < mean["liver"] < 90 and 0 < mean["soft tissue"] < 60 and mean["fat"] < -50
    assert vol[ph.anatomy == ORGAN_LABELS["bone"]].max() > 500
    for reg in ph.regions:
        assert reg.mean_hu == pytest.approx(vol[ph.mask == reg.region_id].mean())


def test_lesion_contrast_sets_the_lesion_hu_from_the_host() -> None:
    """With ``lesion_contrast_hu`` a lesion is its host's HU ∓ the drawn contrast (mean over the mask, blurred by
    the 0.8 mm smoothing and noise, so checked against the range with a margin); without it the phantom is the
    same draw as before, lesion for lesion."""
    host_hu = {"liver": 60, "spleen": 50, "right lung": -850, "left lung": -850, "soft tissue": 40}
    seen = 0
    for seed in range(6):
        plain = generate_ct_case(np.random.default_rng(seed), single_lesion=True, shape=(64, 64, 16))
        bright = generate_ct_case(
            np.random.default_rng(seed), single_lesion=True, shape=(64, 64, 16), lesion_contrast_hu=(300, 500)
        )
        a, b = plain.regions[0], bright.regions[0]
        # one HU draw either way: same site, density, shape and mask; only the intensity differs
        assert (a.site, a.density, a.box_voxel) == (b.site, b.density, b.box_voxel)
        np.testing.assert_array_equal(plain.mask, bright.mask)
        host = host_hu.get(b.site, 40)  # kidney lesions sit in the soft tissue next to the kidney
        delta = b.mean_hu - host if b.density == "hyperdense" else host - b.mean_hu
        assert 200 < delta < 520, (b.site, b.density, b.mean_hu)
        seen += 1
    assert seen == 6


@pytest.mark.parametrize("contrast", [(0, 10), (500, 300), (100,), (100, float("inf"))])
def test_bad_lesion_contrast(contrast: tuple) -> None:
    with pytest.raises(ConfigError, match="lesion_contrast_hu"):
        generate_ct_case(np.random.default_rng(0), lesion_contrast_hu=contrast)


def test_single_lesion_mode() -> None:
    for seed in range(4):
        ph = generate_ct_case(np.random.default_rng(seed), single_lesion=True, shape=(64, 64, 16))
        assert [r.phrase for r in ph.regions] == ["the lesion"]
        assert set(np.unique(ph.mask)) == {0, 1}


def test_lesion_counts_follow_options() -> None:
    counts = {
        len(generate_ct_case(np.random.default_rng(s), min_lesions=2, max_lesions=3).regions)
        for s in range(8)
    }
    assert counts <= {2, 3} and counts


def test_lesion_crop() -> None:
    ph = generate_ct_case(np.random.default_rng(1), **SMALL)
    reg = ph.regions[0]
    vol, msk, sl = ph.lesion_crop(reg.region_id, margin=1)
    assert msk.sum() == reg.n_voxels and vol.shape == msk.shape
    assert [s.start for s in sl] == [max(0, b - 1) for b in reg.box_voxel[:3]]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"orientation": "LLS"}, "not a valid axis code"),
        ({"min_lesions": 3, "max_lesions": 2}, "min_lesions"),
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        ({"shape": (8, 64, 64)}, "shape"),
        ({"lesion_radus_mm": (1, 2)}, "unknown CT phantom option"),
    ],
)
def test_bad_ct_options(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        generate_ct_case(np.random.default_rng(0), **options)


# ------------------------------------------------------------------------------------------ M3D-RefSeg files


def test_m3d_refseg_files(ct_dir: Path) -> None:
    truth = json.loads((ct_dir / TRUTH_NAME).read_text(encoding="utf-8"))
    all_rows = []
    for split in ("train", "test", "all"):
        header, rows = _read_csv(ct_dir / f"M3D_RefSeg_{split}.csv")
        assert header == list(M3D_CSV_COLUMNS)
        assert (ct_dir / f"M3D_RefSeg_{split}.csv").read_bytes().startswith(b"Image,Mask,Mask_ID,")
        if split == "all":
            all_rows = rows
    train_cases = {r[0].split("/")[0] for r in _read_csv(ct_dir / "M3D_RefSeg_train.csv")[1]}
    test_cases = {r[0].split("/")[0] for r in _read_csv(ct_dir / "M3D_RefSeg_test.csv")[1]}
    assert train_cases and test_cases and not train_cases & test_cases
    assert train_cases | test_cases == set(truth["cases"])
    assert len(all_rows) == len(_read_csv(ct_dir / "M3D_RefSeg_train.csv")[1]) + len(
        _read_csv(ct_dir / "M3D_RefSeg_test.csv")[1]
    )
    for image, mask, mask_id, qtype, question, answer in all_rows:
        case = image.split("/")[0]
        assert image == f"{case}/ct.nii.gz" and mask == f"{case}/mask.nii.gz"
        assert case.startswith("s") and len(case) == 5 and case[1:].isdigit()
        region = truth["cases"][case]["regions"][mask_id]
        assert qtype in ("0", "1") and "[SEG]" in answer
        assert region["phrase"].lower() in question.lower()
        texts = json.loads((ct_dir / case / "text.json").read_text(encoding="utf-8"))
        assert mask_id in texts
    for case, entry in truth["cases"].items():
        img = nib.load(ct_dir / entry["image"])
        msk = nib.load(ct_dir / entry["mask"])
        assert img.get_data_dtype() == np.int16 and msk.get_data_dtype() == np.uint8
        assert img.shape == msk.shape == (96, 96, 48)
        np.testing.assert_allclose(img.header.get_zooms(), (0.8, 0.8, 2.5), rtol=1e-6)
        np.testing.assert_allclose(img.affine, msk.affine)
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
        assert np.all(np.abs(img.affine[:3, 3]) > 1)  # a real, non-zero origin
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        labels = set(np.unique(np.asarray(msk.dataobj)).tolist()) - {0}
        texts = json.loads((ct_dir / case / "text.json").read_text(encoding="utf-8"))
        assert labels == {int(k) for k in texts} == {int(k) for k in entry["regions"]}
        qtypes = {r[3] for r in all_rows if r[0].startswith(case)}
        assert qtypes == {"0", "1"}


def test_truth_boxes_equal_numpy_on_the_written_mask(ct_dir: Path) -> None:
    truth = json.loads((ct_dir / TRUTH_NAME).read_text(encoding="utf-8"))
    for case, entry in truth["cases"].items():
        mask = np.asarray(nib.load(ct_dir / entry["mask"]).dataobj)
        affine = nib.load(ct_dir / entry["image"]).affine
        for rid, reg in entry["regions"].items():
            target = mask == int(rid)
            assert reg["box_voxel"] == _np_box(target), (case, rid)
            centre = np.argwhere(target).mean(axis=0)
            np.testing.assert_allclose(reg["center_voxel"], centre, atol=1e-3)
            np.testing.assert_allclose(reg["center_world"], apply_affine(affine, centre), atol=1e-3)
            assert reg["n_voxels"] == int(target.sum())


def _measured(ct_dir: Path, entry: dict) -> dict[int, dict]:
    """Each region's attributes recomputed from the written files."""
    img = nib.load(ct_dir / entry["image"])
    vol = np.asarray(img.dataobj).astype(float)
    mask = np.asarray(nib.load(ct_dir / entry["mask"]).dataobj)
    voxel_mm3 = float(np.prod(img.header.get_zooms()))
    out = {}
    for rid in entry["regions"]:
        target = mask == int(rid)
        out[int(rid)] = {
            "x": apply_affine(img.affine, np.argwhere(target).mean(axis=0))[0],
            "z": apply_affine(img.affine, np.argwhere(target).mean(axis=0))[2],
            "volume": target.sum() * voxel_mm3,
            "hu": vol[target].mean(),
        }
    return out


def test_midline_matches_an_independent_body_estimate(ct_dir: Path) -> None:
    truth = json.loads((ct_dir / TRUTH_NAME).read_text(encoding="utf-8"))
    for entry in truth["cases"].values():
        img = nib.load(ct_dir / entry["image"])
        vol = np.asarray(img.dataobj)
        s_axis = nib.aff2axcodes(img.affine).index("S")
        body = np.stack(
            [
                ndimage.binary_fill_holes(np.take(vol, k, axis=s_axis) > -500)
                for k in range(vol.shape[s_axis])
            ],
            axis=s_axis,
        )
        x = apply_affine(img.affine, ndimage.center_of_mass(body))[0]
        assert x == pytest.approx(entry["midline_world"][0], abs=1.0)


def test_each_phrase_picks_out_exactly_its_lesion(ct_dir: Path) -> None:
    truth = json.loads((ct_dir / TRUTH_NAME).read_text(encoding="utf-8"))
    seen_types = set()
    for entry in truth["cases"].values():
        regions = {int(k): v for k, v in entry["regions"].items()}
        phrases = [r["phrase"] for r in regions.values()]
        assert len(set(phrases)) == len(phrases)
        meas = _measured(ct_dir, entry)
        mid = entry["midline_world"][0]
        for rid, reg in regions.items():
            me = meas[rid]
            others = [meas[k] for k in regions if k != rid]
            other_regs = [regions[k] for k in regions if k != rid]
            kind, value = reg["phrase_type"], reg["phrase_value"]
            seen_types.add(kind)
            if kind == "plain":
                assert not others
            elif kind == "laterality" and value in ("left", "right"):
                sign = -1 if value == "left" else 1
                assert sign * (me["x"] - mid) >= 5
                assert all(-sign * (o["x"] - mid) >= 5 for o in others)
            elif kind == "laterality":
                sign = -1 if value == "leftmost" else 1
                assert all(sign * (me["x"] - o["x"]) >= 8 for o in others)
            elif kind == "craniocaudal":
                sign = 1 if value == "superior" else -1
                assert all(sign * (me["z"] - o["z"]) >= 8 for o in others)
            elif kind == "size":
                if value == "largest":
                    assert all(me["volume"] >= 1.5 * o["volume"] - 1e-6 for o in others)
                else:
                    assert all(1.5 * me["volume"] <= o["volume"] + 1e-6 for o in others)
            elif kind == "intensity":
                sign = 1 if value == "brightest" else -1
                assert all(sign * (me["hu"] - o["hu"]) >= 40 for o in others)
            elif kind == "organ":
                assert reg["site"] == value and all(o["site"] != value for o in other_regs)
                assert value in reg["phrase"]
            elif kind == "description":
                assert all(o["density"] != value for o in other_regs)
            else:
                pytest.fail(f"unknown phrase type {kind}")
    assert len(seen_types) >= 2


def test_ct_determinism_and_case_stability(tmp_path: Path) -> None:
    make_ct3d(tmp_path / "a", 2, seed=4, **SMALL)
    make_ct3d(tmp_path / "b", 2, seed=4, **SMALL)
    make_ct3d(tmp_path / "c", 3, seed=4, **SMALL)
    make_ct3d(tmp_path / "d", 2, seed=5, **SMALL)
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert a == b  # byte-identical NIfTI (nibabel writes gzip without a timestamp), CSVs, JSON
    c = _tree_bytes(tmp_path / "c")
    for name in ("s0000/ct.nii.gz", "s0001/mask.nii.gz", "s0001/text.json"):
        assert a[name] == c[name]  # case i does not depend on how many cases are made
    d = _tree_bytes(tmp_path / "d")
    assert a["s0000/ct.nii.gz"] != d["s0000/ct.nii.gz"]


@pytest.mark.slow  # importing MONAI takes 5-30 s on a busy 2-core machine
def test_m3d_npy_variant(tmp_path: Path) -> None:
    make_ct3d(tmp_path, 2, seed=2, npy=True, npy_shape=(24, 48, 48), **SMALL)
    truth = json.loads((tmp_path / TRUTH_NAME).read_text(encoding="utf-8"))
    npy_root = tmp_path / truth["npy"]["dir"]
    for name in ("train", "test", "all"):  # the CSVs travel with the arrays, unchanged
        assert (npy_root / f"M3D_RefSeg_{name}.csv").read_bytes() == (
            tmp_path / f"M3D_RefSeg_{name}.csv"
        ).read_bytes()
    for case, entry in truth["cases"].items():
        ct = np.load(npy_root / case / "ct.npy")
        mask = np.load(npy_root / case / "mask.npy")
        assert ct.shape == mask.shape == (1, 24, 48, 48) == tuple(entry["npy_shape"])
        assert ct.dtype == mask.dtype == np.float32
        assert ct.min() == 0.0 and ct.max() == 1.0
        assert set(np.unique(mask).tolist()) - {0.0} == {float(k) for k in entry["regions"]}
        assert (npy_root / case / "text.json").read_text(encoding="utf-8") == (
            tmp_path / case / "text.json"
        ).read_text(encoding="utf-8")
        for rid, reg in entry["regions"].items():
            assert reg["npy_box"] == _np_box(mask[0] == int(rid))
            # D is the NIfTI's k axis (M3D transposes (2, 0, 1)); air noise fills every slice, so the
            # foreground crop keeps all 24 slices and D = k exactly.
            assert [reg["npy_box"][0], reg["npy_box"][3]] == [reg["box_voxel"][2], reg["box_voxel"][5]]


def test_single_lesion_files(tmp_path: Path) -> None:
    make_ct3d(tmp_path, 2, seed=0, single_lesion=True, questions_per_region=(1, 0), **SMALL)
    _, rows = _read_csv(tmp_path / "M3D_RefSeg_all.csv")
    assert len(rows) == 2 and all(r[2] == "1" and r[3] == "0" and "the lesion" in r[4] for r in rows)


def test_bad_writer_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="questions_per_region"):
        make_ct3d(tmp_path, 1, seed=0, questions_per_region=(9, 0))
    with pytest.raises(ConfigError, match="seed"):
        make_ct3d(tmp_path, 1, seed=-1)
    with pytest.raises(ConfigError, match="layout"):
        make_cxr2d(tmp_path, 1, seed=0, layout="padchest")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no chestxray8 category"):
        make_cxr2d(tmp_path, 1, seed=0, layout="chestxray8", kinds=("edema",))


# ------------------------------------------------------------------------------------------ CXR


def test_cxr_phrase_sides_follow_the_pa_convention() -> None:
    """On a PA film the patient's left is on the image's right."""
    n_left = n_right = 0
    for seed in range(12):
        ph = generate_cxr_case(np.random.default_rng(seed), width=200, height=240)
        assert len({f.phrase for f in ph.findings}) == len(ph.findings)
        for f in ph.findings:
            for x1, _y1, x2, _y2 in f.tight_boxes:
                if f.side == "left":
                    assert (x1 + x2) / 2 > ph.width / 2 and "left" in f.phrase
                    n_left += 1
                elif f.side == "right":
                    assert (x1 + x2) / 2 < ph.width / 2 and "right" in f.phrase
                    n_right += 1
            if f.side == "bilateral":
                assert len(f.tight_boxes) == 2
                assert sorted((b[0] + b[2]) / 2 < ph.width / 2 for b in f.tight_boxes) == [False, True]
    assert n_left and n_right


def test_cxr_findings_are_visible() -> None:
    """A finding changes the pixels inside its box (brighter, or darker for a pneumothorax)."""
    for seed in range(6):
        rng = np.random.default_rng(seed)
        ph = generate_cxr_case(rng, width=256, height=256, kinds=("nodule", "pneumothorax", "effusion"))
        again = generate_cxr_case(
            np.random.default_rng(seed), width=256, height=256, kinds=("nodule", "pneumothorax", "effusion")
        )
        np.testing.assert_array_equal(ph.image, again.image)
        for f in ph.findings:
            x1, y1, x2, y2 = f.tight_boxes[0]
            inside = ph.image[y1:y2, x1:x2].astype(float).mean()
            if f.kind == "pneumothorax":
                assert inside < 60
            else:
                assert inside > 70


def test_cxr_mass_radius_sets_the_mass_size() -> None:
    """A mass's tight box is its disc (clipped to the lung, which holds ≥ 80 % of it): at most 2r + 1 px wide and
    mostly at least 2r for r drawn from ``mass_radius`` (fractions of the width); the default range is the
    generator's own (the files of the default option do not change)."""
    width = 256
    means = []
    for lo, hi in ((0.035, 0.055), (0.07, 0.11)):
        sizes = []
        for seed in range(8):
            ph = generate_cxr_case(
                np.random.default_rng(seed), width=width, height=width, kinds=("mass",), min_findings=1,
                max_findings=1, mass_radius=(lo, hi),
            )  # fmt: skip
            (finding,) = ph.findings
            x1, y1, x2, y2 = finding.tight_boxes[0]
            sizes += [x2 - x1, y2 - y1]
        median = float(np.median(sizes))
        assert 2 * lo * width - 1 <= median and max(sizes) <= 2 * hi * width + 1, (lo, hi, sizes)
        means.append(float(np.mean(sizes)))
    assert means[1] > 1.6 * means[0], means
    default = generate_cxr_case(np.random.default_rng(3), width=width, height=width, kinds=("mass",))
    explicit = generate_cxr_case(
        np.random.default_rng(3), width=width, height=width, kinds=("mass",), mass_radius=(0.035, 0.055)
    )
    np.testing.assert_array_equal(default.image, explicit.image)
    for bad in ((0.0, 0.05), (0.08, 0.05), (0.1, 0.3)):
        with pytest.raises(ConfigError, match="mass_radius"):
            generate_cxr_case(np.random.default_rng(0), kinds=("mass",), mass_radius=bad)


def test_mscxr_layout(cxr_dir: Path) -> None:
    root = cxr_dir / "mscxr"
    csv_path = root / MSCXR_CSV_NAME
    header, rows = _read_csv(csv_path)
    assert header == list(MSCXR_COLUMNS)
    truth = json.loads((root / TRUTH_NAME).read_text(encoding="utf-8"))
    categories = {"Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Lung Opacity", "Pleural Effusion",
                  "Pneumonia", "Pneumothorax"}  # fmt: skip
    groups: dict[tuple[str, str], list[list[int]]] = {}
    patient_split: dict[str, set[str]] = {}
    for row in rows:
        rec = dict(zip(header, row, strict=True))
        assert rec["category_name"] in categories
        parts = rec["path"].split("/")
        assert parts[0] == "files" and parts[1] == parts[2][:3] and len(parts[2]) == 9 and parts[2][0] == "p"
        assert parts[3][0] == "s" and len(parts[3]) == 9 and parts[4] == rec["dicom_id"] + ".jpg"
        assert len(rec["dicom_id"]) == 44 and rec["dicom_id"].count("-") == 4
        with Image.open(root / rec["path"]) as im:
            assert im.format == "JPEG" and im.mode == "L"
            assert im.size == (int(rec["image_width"]), int(rec["image_height"]))
        x, y, w, h = (int(rec[k]) for k in "xywh")  # whole pixels, as in MS-CXR
        assert x >= 0 and y >= 0 and w > 0 and h > 0
        assert x + w <= int(rec["image_width"]) and y + h <= int(rec["image_height"])
        assert rec["split"] in ("train", "val", "test")
        patient_split.setdefault(parts[2], set()).add(rec["split"])
        groups.setdefault((rec["dicom_id"], rec["label_text"]), []).append([x, y, w, h])
    assert all(len(s) == 1 for s in patient_split.values())  # split by patient
    assert any(len(v) > 1 for v in groups.values()), "expected a phrase with several boxes"
    expected = {
        (dicom, f["label_text"]): f["boxes_xywh"]
        for dicom, im in truth["images"].items()
        for f in im["findings"]
    }
    assert groups == expected
    sizes = {(im["width"], im["height"]) for im in truth["images"].values()}
    assert len(sizes) > 1  # each image has its own size, as in MIMIC


def test_chestxray8_layout(cxr_dir: Path) -> None:
    root = cxr_dir / "chestxray8"
    raw = (root / "BBox_List_2017.csv").read_text(encoding="utf-8").splitlines()
    assert raw[0] == CXR8_BBOX_HEADER == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    header, rows = _read_csv(root / "BBox_List_2017.csv")
    assert len(header) == 9 and header[2:6] == ["Bbox [x", "y", "w", "h]"] and header[6:] == ["", "", ""]
    labels = {
        "Atelectasis",
        "Effusion",
        "Cardiomegaly",
        "Infiltrate",
        "Pneumonia",
        "Pneumothorax",
        "Mass",
        "Nodule",
    }
    truth = json.loads((root / TRUTH_NAME).read_text(encoding="utf-8"))
    boxed: dict[str, set[str]] = {}
    for row in rows:
        assert len(row) == 6 and row[1] in labels
        x, y, w, h = (float(v) for v in row[2:])
        assert x >= 0 and y >= 0 and x + w <= 256 and y + h <= 256
        boxed.setdefault(row[0], set()).add(row[1])
        with Image.open(root / "images" / row[0]) as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (256, 256)
    entry_raw = (root / "Data_Entry_2017.csv").read_text(encoding="utf-8").splitlines()
    assert entry_raw[0] == CXR8_DATA_ENTRY_HEADER
    e_header, e_rows = _read_csv(root / "Data_Entry_2017.csv")
    assert (
        e_header[:4] == ["Image Index", "Finding Labels", "Follow-up #", "Patient ID"] and len(e_header) == 11
    )
    listed = {r[0] for r in e_rows}
    assert listed == set(truth["images"]) and set(boxed) <= listed
    assert len(listed) == 7  # 6 with findings + 1 "No Finding"
    for r in e_rows:
        assert len(r) == 11 and r[0] == f"{int(r[3]):08d}_{int(r[2]):03d}.png"
        want = {{"Infiltrate": "Infiltration"}.get(v, v) for v in boxed.get(r[0], set())}
        assert set(r[1].split("|")) == (want or {"No Finding"})
    train = set((root / "train_val_list.txt").read_text(encoding="utf-8").split())
    test = set((root / "test_list.txt").read_text(encoding="utf-8").split())
    assert train | test == listed and not train & test
    pid = {r[0]: r[3] for r in e_rows}
    assert not {pid[i] for i in train} & {pid[i] for i in test}  # by patient


def test_chestxray8_infiltrate_vs_infiltration(tmp_path: Path) -> None:
    make_cxr2d(tmp_path, 3, seed=1, layout="chestxray8", kinds=("infiltrate",), chestxray8_size=128)
    _, rows = _read_csv(tmp_path / "BBox_List_2017.csv")
    _, entries = _read_csv(tmp_path / "Data_Entry_2017.csv")
    assert {r[1] for r in rows} == {"Infiltrate"} and {r[1] for r in entries} == {"Infiltration"}


def test_cxr_determinism(tmp_path: Path, cxr_dir: Path) -> None:
    make_cxr2d(tmp_path / "a", 6, seed=5, layout="mscxr")
    make_cxr2d(tmp_path / "b", 6, seed=5, layout="chestxray8", n_normal=1)
    for single, both in ((tmp_path / "a", cxr_dir / "mscxr"), (tmp_path / "b", cxr_dir / "chestxray8")):
        one, two = _tree_bytes(single), _tree_bytes(both)
        t1, t2 = (json.loads(d.pop(TRUTH_NAME)) for d in (one, two))
        assert one == two  # images and CSVs byte-identical, and "both" = each layout on its own
        t1.pop("options"), t2.pop("options")  # n_normal differs for the MS-CXR pair, which ignores it
        assert t1 == t2
    make_cxr2d(tmp_path / "c", 6, seed=6, layout="mscxr")
    assert (tmp_path / "c" / MSCXR_CSV_NAME).read_bytes() != (tmp_path / "a" / MSCXR_CSV_NAME).read_bytes()


# ------------------------------------------------------------------------------------------ script


def test_script_runs(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    script = str(REPO / "scripts" / "make_synthetic.py")
    ct = subprocess.run(
        [sys.executable, script, "--kind", "ct3d", "--n", "2", "--seed", "3", "--out", str(tmp_path / "ct"),
         "--shape", "64", "64", "24", "--spacing", "1", "1", "4", "--orientation", "RAS", "--single-lesion"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert ct.returncode == 0, ct.stderr
    assert "wrote 2 ct3d phantoms" in ct.stdout and "M3D_RefSeg_train.csv" in ct.stdout
    img = nib.load(tmp_path / "ct" / "s0001" / "ct.nii.gz")
    assert img.shape == (64, 64, 24) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    cxr = subprocess.run(
        [sys.executable, script, "--kind", "cxr2d", "--n", "2", "--seed", "3", "--out", str(tmp_path / "cxr"),
         "--layout", "both", "--shape", "160"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert cxr.returncode == 0, cxr.stderr
    assert (tmp_path / "cxr" / "chestxray8" / "BBox_List_2017.csv").is_file()
    assert (tmp_path / "cxr" / "mscxr" / MSCXR_CSV_NAME).is_file()
    bad = subprocess.run(
        [sys.executable, script, "--kind", "ct3d", "--n", "1", "--out", str(tmp_path / "bad"), "--orientation", "LLR"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "not a valid axis code" in bad.stderr
