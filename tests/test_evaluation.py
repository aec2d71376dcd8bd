"""Tests for mg3d.evaluation and scripts/evaluate.py: hand-computed metrics, protocols, files, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mg3d.boxes import pair_iou
from mg3d.errors import ConfigError, DataError
from mg3d.evaluation import (
    GroundingEvaluator,
    aggregate,
    bootstrap_ci,
    get_protocol,
    item_from_prediction,
    m3d_enclosing_iou,
    m3d_normalize,
    medground_r1_iou,
    read_predictions,
    rescore,
    score_item,
)
from mg3d.frames import CoordinateFrame, crop_step, resize_step

REPO = Path(__file__).resolve().parents[1]
THINK = (
    "<think>\nThe cardiac silhouette is enlarged; the heart lies centrally, slightly to the left.\n</think>\n"
)


def answer(box: list[float], key: str = "bbox_2d") -> str:
    return THINK + f'<answer>\n{{\n  "{key}": {json.dumps(box)},\n  "label": "finding"\n}}\n</answer>'


# ------------------------------------------------------------------------------------------------------
# IoU variants
# ------------------------------------------------------------------------------------------------------


def test_medground_r1_iou_hand_values() -> None:
    gt = np.array([[0.0, 0.0, 100.0, 100.0]])
    assert medground_r1_iou([0, 0, 100, 50], gt)[0] == 0.5  # 5000 / 10000
    # 2 px overlap on x: their (x2-1)-x1+1 gives the plain overlap 2 → 20 / (120 + 100 - 20)
    assert medground_r1_iou([8, 0, 20, 10], np.array([[0, 0, 10, 10]]))[0] == pytest.approx(0.1)
    # 1 px overlap: standard IoU 10/200 = 0.05, their rule counts no intersection
    assert medground_r1_iou([9, 0, 20, 10], np.array([[0, 0, 10, 10]]))[0] == 0.0
    assert pair_iou([[9, 0, 20, 10]], [[0, 0, 10, 10]])[0] == pytest.approx(0.05)
    # failure box and inverted box: no intersection
    assert medground_r1_iou([0, 0, 0, 0], gt)[0] == 0.0
    assert medground_r1_iou([60, 60, 40, 40], gt)[0] == 0.0
    # 3D analogue: 125 / 1875
    cube = np.array([[5, 5, 5, 15, 15, 15]])
    assert medground_r1_iou([0, 0, 0, 10, 10, 10], cube)[0] == pytest.approx(125 / 1875)
    # several ground truths at once
    np.testing.assert_allclose(medground_r1_iou([0, 0, 100, 50], np.vstack([gt, gt])), [0.5, 0.5])


box_ints = st.tuples(st.integers(0, 60), st.integers(0, 60), st.integers(1, 40), st.integers(1, 40)).map(
    lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]]
)


@settings(max_examples=200, deadline=None)
@given(box_ints, box_ints)
def test_medground_r1_iou_is_standard_iou_unless_overlap_at_most_one_pixel(
    a: list[int], b: list[int]
) -> None:
    ours = medground_r1_iou(a, np.array([b], dtype=float))[0]
    overlap = [min(a[i + 2], b[i + 2]) - max(a[i], b[i]) for i in range(2)]
    if min(overlap) > 1:
        assert ours == pytest.approx(pair_iou([a], [b])[0])
    else:
        assert ours == 0.0


def test_m3d_normalize_and_enclosing_iou_hand_values() -> None:
    shape = (10, 10, 10)
    gt = m3d_normalize(np.array([[2, 2, 2, 6, 6, 6]]), shape)
    pred = m3d_normalize(np.array([[4, 4, 4, 8, 8, 8]]), shape)
    np.testing.assert_allclose(gt, [[0.2, 0.2, 0.2, 0.5, 0.5, 0.5]])  # inclusive max: (6 - 1) / 10
    np.testing.assert_allclose(pred, [[0.4, 0.4, 0.4, 0.7, 0.7, 0.7]])
    # intersection 0.1³, enclosing box 0.5³ (the union would be 2·0.3³ − 0.1³)
    assert m3d_enclosing_iou(pred[0], gt)[0] == pytest.approx(0.001 / (0.125 + 1e-6))
    # rounding to 3 decimals as M3D writes its boxes
    np.testing.assert_allclose(
        m3d_normalize(np.array([[1, 0, 0, 3, 7, 7]]), (3, 7, 7)), [[0.333, 0, 0, 0.667, 0.857, 0.857]]
    )


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(0, 0.5), min_size=3, max_size=3),
    st.lists(st.floats(0.05, 0.5), min_size=3, max_size=3),
    st.lists(st.floats(0, 0.5), min_size=3, max_size=3),
    st.lists(st.floats(0.05, 0.5), min_size=3, max_size=3),
)
def test_m3d_enclosing_iou_never_exceeds_true_iou(lo1, size1, lo2, size2) -> None:
    a = np.array(lo1 + [x + s for x, s in zip(lo1, size1)])
    b = np.array(lo2 + [x + s for x, s in zip(lo2, size2)])
    assert m3d_enclosing_iou(a, b[None])[0] <= pair_iou(a[None], b[None])[0] + 1e-9


# ------------------------------------------------------------------------------------------------------
# mg3d protocol: hand-computed 2D and 3D cases
# ------------------------------------------------------------------------------------------------------


def test_2d_box_mapped_back_through_the_frame() -> None:
    frame = CoordinateFrame((200, 100)).then(resize_step((200, 100), (100, 50)))  # model sees half size
    ev = GroundingEvaluator(n_bootstrap=0)
    row = ev.add(answer([10, 20, 30, 40]), [[20, 40, 60, 100]], frame=frame.to_dict(), id="a")
    assert row.box_text == (10, 20, 30, 40)
    assert row.box_voxel == (20, 40, 60, 80)
    assert row.iou == pytest.approx(1600 / 2400)  # 40·40 inside a 40·60 ground truth
    assert row.center_vox == pytest.approx(10.0)  # centres (40, 60) and (40, 70)
    assert row.center_mm is None  # no affine


def test_3d_box_through_frame_with_centre_error_in_mm() -> None:
    frame = CoordinateFrame((64, 64, 32)).then(resize_step((64, 64, 32), (32, 32, 32)))
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-100, 50, 7]  # the translation must not matter
    ev = GroundingEvaluator(n_bootstrap=0)
    row = ev.add(
        answer([4, 4, 10, 12, 12, 20], "bbox_3d"),
        [[8, 8, 10, 24, 24, 30]],
        frame=frame.to_dict(),
        affine=affine.tolist(),
        ndim=3,
    )
    assert row.box_voxel == (8, 8, 10, 24, 24, 20)
    assert row.iou == pytest.approx(0.5)  # 16·16·10 / 16·16·20
    assert row.center_vox == pytest.approx(5.0)  # z centres 15 and 20
    assert row.center_mm == pytest.approx(15.0)  # 5 slices × 3 mm


def test_normalised_codec_and_clipping_to_the_image() -> None:
    frame = CoordinateFrame((64, 64)).then(crop_step((64, 64), (0, 0), (32, 32)))  # text grid 32×32
    ev = GroundingEvaluator(n_bootstrap=0, codec="qwen2-vl")
    # 0–1000 integers: 250 → 8, 500 → 16 on a 32 grid
    row = ev.add(answer([250, 250, 500, 500]), [[8, 8, 16, 16]], frame=frame.to_dict())
    assert row.box_voxel == (8, 8, 16, 16) and row.iou == 1.0
    # a box reaching past the image is clipped to it before IoU (MedRPG clamps likewise)
    ev2 = GroundingEvaluator(n_bootstrap=0)
    row2 = ev2.add(answer([-10, 0, 20, 10]), [[0, 0, 20, 10]], spatial_shape=[64, 64])
    assert row2.box_voxel == (0, 0, 20, 10) and row2.iou == 1.0


def test_several_ground_truth_boxes_best_match() -> None:
    ev = GroundingEvaluator(n_bootstrap=0)
    row = ev.add(answer([50, 50, 60, 60]), [[0, 0, 10, 10], [50, 50, 60, 65]])
    assert row.ious == pytest.approx((0.0, 100 / 150))
    assert row.best_gt == 1 and row.iou == pytest.approx(100 / 150)
    # no overlap with either: the nearest centre is the match (for the centre error)
    row = ev.add(answer([20, 0, 30, 10]), [[100, 100, 110, 110], [0, 0, 10, 10]])
    assert row.iou == 0.0 and row.best_gt == 1 and row.center_vox == pytest.approx(20.0)


def five_cases() -> list[dict]:
    """IoUs 1, 0.5, 0.3, 0.1 and a parse failure (exact decimal fractions of 100)."""
    gt = [[0, 0, 10, 10]]
    rows = [
        ("a", [0, 0, 10, 10], "mscxr", "cardiomegaly", 0),
        ("b", [0, 0, 10, 5], "mscxr", "cardiomegaly", 1),
        ("c", [0, 0, 10, 3], "mscxr", "effusion", 1),
        ("d", [0, 0, 10, 1], "chestxray8", "effusion", 0),
    ]
    out = [
        {"id": i, "completion": answer(b), "gt_boxes": gt, "dataset": d, "category": c, "question_type": q}
        for i, b, d, c, q in rows
    ]
    out.append(
        {
            "id": "e",
            "completion": "The region is the heart.",
            "gt_boxes": gt,
            "dataset": "chestxray8",
            "category": "x",
        }
    )
    return out


def test_aggregate_hand_computed_ge_and_gt() -> None:
    ev = GroundingEvaluator(n_bootstrap=0)  # mg3d default: IoU ≥ τ
    ev.update(five_cases())
    m = ev.compute()
    assert m["n"] == 5
    assert m["mIoU"] == pytest.approx(1.9 / 5)  # the failure counts as 0 and stays in the denominator
    assert (m["acc@0.1"], m["acc@0.3"], m["acc@0.5"], m["acc@0.7"]) == (0.8, 0.6, 0.4, 0.2)
    assert m["parse_failure_rate"] == 0.2
    assert m["parse_status/no_answer_tag"] == 0.2 and m["parse_status/ok"] == 0.8
    assert m["dataset/mscxr/mIoU"] == pytest.approx(0.6) and m["dataset/mscxr/n"] == 3
    assert m["dataset/chestxray8/mIoU"] == pytest.approx(0.05)
    assert m["dataset/chestxray8/parse_failure_rate"] == 0.5
    assert m["category/effusion/acc@0.3"] == 0.5  # c (0.3 ≥ 0.3) yes, d no
    assert m["question_type/1/mIoU"] == pytest.approx(0.4) and m["question_type/0/n"] == 2
    assert "question_type/None/n" not in m  # e has no question type: not a group
    gt_rule = GroundingEvaluator(n_bootstrap=0, comparison=">")
    gt_rule.update(five_cases())
    m2 = gt_rule.compute()
    assert (m2["acc@0.1"], m2["acc@0.3"], m2["acc@0.5"], m2["acc@0.7"]) == (0.6, 0.4, 0.2, 0.2)
    assert m2["mIoU"] == m["mIoU"]


def test_bootstrap_intervals_are_seeded_vectorised_and_calibrated() -> None:
    ev = GroundingEvaluator(n_bootstrap=500, seed=3)
    ev.update(five_cases())
    m = ev.compute()
    assert m["mIoU_ci_low"] <= m["mIoU"] <= m["mIoU_ci_high"]
    assert m == ev.compute()  # same seed, same numbers
    rng = np.random.default_rng(0)
    values = (rng.random(400) < 0.5).astype(float)
    low, high = bootstrap_ci(values, n_resamples=2000, seed=1)
    expected = 2 * 1.96 * np.sqrt(values.mean() * (1 - values.mean()) / 400)
    assert high[0] - low[0] == pytest.approx(expected, rel=0.12)
    # blocks (bounded memory) give exactly the same draws as one big block
    small = bootstrap_ci(values, n_resamples=300, seed=5, max_block=1000)
    big = bootstrap_ci(values, n_resamples=300, seed=5)
    np.testing.assert_array_equal(small, big)
    assert bootstrap_ci(values, n_resamples=300, seed=6) != big


def test_aggregate_rejects_empty_and_bad_settings() -> None:
    with pytest.raises(DataError, match="no predictions"):
        GroundingEvaluator().compute()
    with pytest.raises(ConfigError, match="unknown evaluation protocol"):
        GroundingEvaluator("refcoco")
    with pytest.raises(ConfigError, match="IoU > τ"):
        GroundingEvaluator("medground-r1", comparison=">=")
    with pytest.raises(ConfigError, match="thresholds"):
        GroundingEvaluator(thresholds=(0.5, 1.5))
    with pytest.raises(ConfigError, match="comparison"):
        aggregate([], comparison="=")  # type: ignore[arg-type]
    assert get_protocol("MedGround_R1").name == "medground-r1"


# ------------------------------------------------------------------------------------------------------
# Strict (medground-r1) vs lenient (mg3d) on realistic completions
# ------------------------------------------------------------------------------------------------------

GT = [100, 100, 200, 200]
REALISTIC = [
    # (name, completion, medground-r1 box read, medground-r1 IoU, mg3d IoU, mg3d parse ok)
    ("json_object", answer([100, 100, 200, 150]), [100, 100, 200, 150], 0.5, 0.5, True),
    (
        "list_of_objects",
        THINK + '<answer>\n[\n\t{"bbox_2d": [100, 100, 200, 200], "label": "effusion"}\n]\n</answer>',
        [100, 100, 200, 200],
        1.0,
        1.0,
        True,
    ),
    ("bare_list_fig1_style", THINK + "<answer>[100, 100, 200, 200]</answer>", [0, 0, 0, 0], 0.0, 1.0, True),
    ("float_coordinates", answer([100.0, 100.5, 200, 200]), [0, 0, 0, 0], 0.0, 99.5 / 100, True),
    ("negative_start", answer([-20, 100, 200, 200]), [0, 0, 0, 0], 0.0, 10000 / 22000, True),
    (
        "changed_its_mind",
        THINK
        + '<answer>{"bbox_2d": [0, 0, 50, 50]}</answer>\nWait.\n<answer>{"bbox_2d": [100, 100, 200, 200]}</answer>',
        [0, 0, 50, 50],
        0.0,
        1.0,
        True,
    ),
    ("inverted_corners", answer([200, 200, 100, 100]), [200, 200, 100, 100], 0.0, 1.0, True),
    ("truncated", THINK + '<answer>\n{"bbox_2d": [100, 100, 200, 200], "lab', [0, 0, 0, 0], 0.0, 0.0, False),
    ("qwen2vl_pair", THINK + "<answer>(100,100),(200,200)</answer>", [0, 0, 0, 0], 0.0, 1.0, True),
]


@pytest.mark.parametrize("case", REALISTIC, ids=[c[0] for c in REALISTIC])
def test_strict_versus_lenient_on_realistic_completions(case) -> None:
    _, completion, strict_box, strict_iou, lenient_iou, lenient_ok = case
    item = item_from_prediction({"completion": completion, "gt_box": GT, "id": "x"})
    strict = score_item(item, "medground-r1")
    lenient = score_item(item, "mg3d")
    assert list(strict.box_text) == strict_box
    assert strict.iou == pytest.approx(strict_iou)
    assert lenient.iou == pytest.approx(lenient_iou)
    assert lenient.parse_ok is lenient_ok
    assert strict.parse_ok is (strict_box != [0, 0, 0, 0])


# ------------------------------------------------------------------------------------------------------
# The medground-r1 protocol on a file in the style of the paper's evaluation logs
# ------------------------------------------------------------------------------------------------------

Q = "Please provide the bounding box coordinate of the region this sentence describes: {}."


def paper_log() -> tuple[dict, float]:
    """Entries as the MedGround-R1 eval logs store them; extracted_answer / correct by the paper's rules, by hand."""
    entries = [
        # IoU = 322·177 / (326·182 + 325·243 − 322·177) = 56994 / 81313 ≈ 0.701 → correct
        (
            "enlarged cardiac silhouette",
            [235.0, 353.0, 561.0, 535.0],
            answer([239, 287, 564, 530]),
            [239, 287, 564, 530],
            1,
        ),
        (
            "small left apical pneumothorax",
            [345.0, 70.0, 486.0, 115.0],
            THINK + '<answer>\n[\n\t{"bbox_2d": [0, 64, 571, 493], "label": "pneumothorax"}\n]\n</answer>',
            [0, 64, 571, 493],
            0,
        ),  # 6345 / 244959
        (
            "left effusion",
            [100.0, 100.0, 200.0, 200.0],
            answer([100, 100, 200, 150]),
            [100, 100, 200, 150],
            0,
        ),  # 0.5, not > 0.5
        (
            "left midlung consolidation",
            [370.0, 259.0, 537.0, 554.0],
            THINK + "<answer>[370, 259, 537, 554]</answer>",
            [0, 0, 0, 0],
            0,
        ),
        ("right effusion", [48.0, 316.0, 179.0, 435.0], answer([48.5, 316, 179, 435]), [0, 0, 0, 0], 0),
        (
            "cardiomegaly",
            [100.0, 100.0, 200.0, 200.0],
            THINK
            + '<answer>{"bbox_2d": [10, 10, 20, 20]}</answer><answer>{"bbox_2d": [100, 100, 200, 200]}</answer>',
            [10, 10, 20, 20],
            0,
        ),
        (
            "tiny nodule",
            [0.0, 0.0, 10.0, 10.0],
            answer([9, 0, 20, 10]),
            [9, 0, 20, 10],
            0,
        ),  # 1 px overlap → 0
        (
            "opacity",
            [10.0, 10.0, 90.0, 90.0],
            THINK + '<answer>{"bbox_2d": [10, 10, 90, 90]',
            [0, 0, 0, 0],
            0,
        ),
        # 130·162 / (130·166 + 130·162 − 130·162) = 21060 / 21580 → correct
        (
            "moderate right pleural effusion",
            [31.0, 318.0, 161.0, 484.0],
            answer([31, 318, 161, 480]),
            [31, 318, 161, 480],
            1,
        ),
    ]
    results = [
        {
            "question": Q.format(p),
            "ground_truth": gt,
            "model_output": out,
            "extracted_answer": ex,
            "correct": c,
        }
        for p, gt, out, ex, c in entries
    ]
    miou = (56994 / 81313 + 6345 / 244959 + 0.5 + 21060 / 21580) / len(entries)
    return {"accuracy": 100 * 2 / len(entries), "results": results}, miou


def test_medground_r1_protocol_reproduces_the_paper_log(tmp_path: Path) -> None:
    log, miou = paper_log()
    path = tmp_path / "rec_results_cxr_test.json"
    path.write_text(json.dumps(log, indent=2))
    items = read_predictions(path)
    assert [it.id for it in items] == [str(i) for i in range(9)]
    assert items[0].phrase == log["results"][0]["question"]
    ev = GroundingEvaluator("medground-r1", n_bootstrap=0)
    rows = ev.update(items)
    for row, entry in zip(rows, log["results"]):
        assert list(row.box_text) == entry["extracted_answer"], row.id
        assert int(row.iou > 0.5) == entry["correct"], row.id
    m = ev.compute()
    assert 100 * m["acc@0.5"] == pytest.approx(log["accuracy"])
    assert m["mIoU"] == pytest.approx(miou)
    assert m["parse_failure_rate"] == pytest.approx(3 / 9)  # bare list, float, truncated
    # the same file under the mg3d rules reads more boxes and scores higher
    lenient = GroundingEvaluator("mg3d", n_bootstrap=0)
    lenient.update(items)
    lm = lenient.compute()
    assert lm["parse_failure_rate"] == pytest.approx(1 / 9)  # only the truncated answer
    assert lm["mIoU"] > m["mIoU"]


# ------------------------------------------------------------------------------------------------------
# m3d protocol
# ------------------------------------------------------------------------------------------------------


def test_m3d_protocol_is_lower_than_true_iou_and_labelled() -> None:
    row = {
        "completion": answer([4, 4, 4, 8, 8, 8], "bbox_3d"),
        "gt_boxes": [[2, 2, 2, 6, 6, 6]],
        "spatial_shape": [10, 10, 10],
    }
    m3d = GroundingEvaluator("m3d", n_bootstrap=0)
    std = GroundingEvaluator("mg3d", n_bootstrap=0)
    assert m3d.add(**row).iou == pytest.approx(0.001 / (0.125 + 1e-6))
    assert std.add(**row).iou == pytest.approx(8 / 120)
    assert m3d.settings()["standard_iou"] is False
    with pytest.raises(DataError, match="normalises by the image shape"):
        m3d.add(answer([4, 4, 4, 8, 8, 8], "bbox_3d"), [[2, 2, 2, 6, 6, 6]])


# ------------------------------------------------------------------------------------------------------
# Files: predictions.jsonl round trip, errors naming the line
# ------------------------------------------------------------------------------------------------------


def mixed_rows() -> list[dict]:
    f2 = CoordinateFrame((200, 100)).then(resize_step((200, 100), (100, 50))).to_dict()
    f3 = CoordinateFrame((64, 64, 32)).then(resize_step((64, 64, 32), (32, 32, 32))).to_dict()
    aff = np.diag([0.8, 0.8, 2.5, 1.0]).tolist()
    rows = five_cases()
    rows += [
        {
            "id": "f",
            "completion": answer([10, 20, 30, 40]),
            "gt_boxes": [[20, 40, 60, 100]],
            "frame": f2,
            "dataset": "mscxr",
        },
        {
            "id": "g",
            "completion": THINK.replace("centrally", "centrally [2, 2, 4, 30, 30, 28]")
            + answer([4, 4, 10, 12, 12, 20], "bbox_3d"),
            "gt_boxes": [[8, 8, 10, 24, 24, 30], [40, 40, 2, 50, 50, 6]],
            "ndim": 3,
            "frame": f3,
            "affine": aff,
            "spacing": [0.8, 0.8, 2.5],
            "dataset": "m3d_refseg",
            "question_type": 1,
        },
    ]
    return rows


def test_predictions_round_trip_rescoring_is_exact(tmp_path: Path) -> None:
    ev = GroundingEvaluator(n_bootstrap=200, seed=7)
    ev.update(mixed_rows())
    paths = ev.write(tmp_path / "out")
    written = json.loads(paths["metrics_json"].read_text(encoding="utf-8"))
    assert written["metrics"] == ev.compute()
    assert written["protocol"] == "mg3d" and written["comparison"] == ">="
    first = json.loads(paths["predictions"].read_text(encoding="utf-8").splitlines()[-1])
    assert first["id"] == "g" and first["think_boxes_text"] == [[2, 2, 4, 30, 30, 28]]
    assert first["think_boxes_voxel"] == [[4, 4, 4, 60, 60, 28]]
    assert first["box_voxel"] == [8, 8, 10, 24, 24, 20] and first["iou"] == pytest.approx(0.5)
    assert first["center_mm"] == pytest.approx(12.5)  # 5 slices × 2.5 mm
    again = rescore(paths["predictions"], n_bootstrap=200, seed=7)
    assert again.report() == written
    md = paths["metrics_md"].read_text(encoding="utf-8")
    assert "| mIoU |" in md and "## By dataset" in md and "no_answer_tag" in md


def test_read_predictions_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "p.jsonl"
    bad.write_text(
        json.dumps({"completion": "x", "gt_boxes": [[0, 0, 1, 1]]})
        + "\n"
        + json.dumps({"completion": "y"})
        + "\n"
    )
    with pytest.raises(DataError, match=r"p\.jsonl:2.*gt_boxes"):
        read_predictions(bad)
    bad.write_text('{"completion": "x", "gt_box": [5, 0, 1, 1]}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:1.*inverted"):
        read_predictions(bad)
    bad.write_text(
        '{"completion": "x", "gt_box": [0, 0, 1, 1], "id": "a"}\n\n{"completion": "y", "gt_box": [0, 0, 1, 1], "id": "a"}\n'
    )
    with pytest.raises(DataError, match=r"already used at .*p\.jsonl:1"):
        read_predictions(bad)
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match=r"p\.jsonl:1: not valid JSON"):
        read_predictions(bad)
    bad.write_text("\n")
    with pytest.raises(DataError, match="no predictions"):
        read_predictions(bad)


# ------------------------------------------------------------------------------------------------------
# Lightning: the evaluator inside validate / test hooks, and across ranks
# ------------------------------------------------------------------------------------------------------


def test_evaluator_in_lightning_validate_and_test() -> None:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    rows = mixed_rows()

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.evaluator = GroundingEvaluator(n_bootstrap=50)

        def _step(self, batch: list[dict]) -> None:
            self.evaluator.update(batch)

        def _end(self, stage: str) -> None:
            self.evaluator.sync()
            metrics = {f"{stage}/{k}": v for k, v in self.evaluator.compute().items() if "/" not in k}
            self.log_dict(metrics, batch_size=len(self.evaluator))
            self.evaluator.reset()

        def validation_step(self, batch, batch_idx):
            self._step(batch)

        def on_validation_epoch_end(self):
            self._end("val")

        def test_step(self, batch, batch_idx):
            self._step(batch)

        def on_test_epoch_end(self):
            self._end("test")

    loader = DataLoader(rows, batch_size=3, collate_fn=list)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    torch.set_num_threads(1)
    val = trainer.validate(Module(), dataloaders=loader, verbose=False)[0]
    test = trainer.test(Module(), dataloaders=loader, verbose=False)[0]
    direct = GroundingEvaluator(n_bootstrap=50)
    direct.update(rows)
    expected = direct.compute()
    for stage, logged in (("val", val), ("test", test)):
        assert logged[f"{stage}/mIoU"] == pytest.approx(expected["mIoU"], rel=1e-6)
        assert logged[f"{stage}/acc@0.5"] == pytest.approx(expected["acc@0.5"], rel=1e-6)
        assert logged[f"{stage}/parse_failure_rate"] == pytest.approx(
            expected["parse_failure_rate"], rel=1e-6
        )


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = five_cases()
    mine = [*rows[rank::2], rows[0]]  # rank 1 repeats "a", as a distributed sampler pads
    ev = GroundingEvaluator(n_bootstrap=0)
    ev.update(mine)
    dropped = ev.sync()
    Path(out, f"{rank}.json").write_text(json.dumps({"dropped": dropped, "metrics": ev.compute()}))
    dist.destroy_process_group()


@pytest.mark.slow  # two processes each import torch and MONAI (~10 s idle, much more on a loaded machine)
def test_sync_gathers_ranks_and_drops_repeats(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = GroundingEvaluator(n_bootstrap=0)
    single.update(five_cases())
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text(encoding="utf-8"))
        assert got["dropped"] == 2  # "a" is on rank 0 twice and on rank 1 once: two repeats
        assert got["metrics"] == pytest.approx(single.compute())


# ------------------------------------------------------------------------------------------------------
# The script
# ------------------------------------------------------------------------------------------------------


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "evaluate.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=120,
    )


def load_script_main():
    """scripts/evaluate.py's main(), imported in-process (the subprocess test below pays the import once)."""
    import runpy

    return runpy.run_path(str(REPO / "scripts" / "evaluate.py"), run_name="evaluate_script")["main"]


def test_script_main_reads_paper_logs_and_reports_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main = load_script_main()
    log, _ = paper_log()
    (tmp_path / "log.json").write_text(json.dumps(log))
    assert (
        main(
            [
                "--predictions",
                str(tmp_path / "log.json"),
                "--protocol",
                "medground-r1",
                "--json",
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert 100 * out["metrics"]["acc@0.5"] == pytest.approx(log["accuracy"])
    assert out["protocol"] == "medground-r1" and out["comparison"] == ">"

    assert main(["--predictions", str(tmp_path / "log.json"), "--bootstrap", "50"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("protocol mg3d  n=9") and "acc@0.5" in text

    (tmp_path / "bad.jsonl").write_text('{"completion": "x"}\n')
    assert main(["--predictions", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert (
        main(
            ["--predictions", str(tmp_path / "log.json"), "--protocol", "medground-r1", "--comparison", ">="]
        )
        == 2
    )
    assert "IoU > τ" in capsys.readouterr().err
    assert main(["--predictions", str(tmp_path / "log.json"), "--gallery", "2"]) == 2
    assert "need --out" in capsys.readouterr().err


@pytest.mark.e2e
@pytest.mark.slow
def test_script_subprocess_rescores_exactly(tmp_path: Path) -> None:
    ev = GroundingEvaluator(n_bootstrap=300, seed=11)
    ev.update(mixed_rows())
    paths = ev.write(tmp_path / "first")
    proc = run_script(
        "--predictions",
        str(paths["predictions"]),
        "--bootstrap",
        "300",
        "--seed",
        "11",
        "--json",
        "--out",
        str(tmp_path / "second"),
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    written = json.loads(paths["metrics_json"].read_text(encoding="utf-8"))
    assert printed == written
    assert json.loads((tmp_path / "second" / "metrics.json").read_text(encoding="utf-8")) == written
    assert (tmp_path / "second" / "predictions.jsonl").read_text(encoding="utf-8") == paths[
        "predictions"
    ].read_text(encoding="utf-8")
    assert (tmp_path / "second" / "metrics.md").exists()


# ------------------------------------------------------------------------------------------------------
# The model path: a real (tiny, briefly warm-started) Grounder, in-process and through the script
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_grounder(tmp_path_factory: pytest.TempPathFactory):
    """The phantoms and tiny warm-started policy of tests/test_grounder.py (one definition of both)."""
    from test_grounder import make_grounder, train_policy, write_phantoms

    records = write_phantoms(tmp_path_factory.mktemp("phantoms"))
    return make_grounder(train_policy(records)), records


@pytest.mark.slow  # ~10 s: a short supervised warm start so that the tiny model writes boxes
def test_grounder_predictions_score_in_the_same_voxel_frame(tiny_grounder) -> None:
    grounder, records = tiny_grounder
    preds = list(grounder.predict_records(records, batch_size=8, progress=False))
    ev = GroundingEvaluator(n_bootstrap=0)
    rows = ev.update(preds)
    assert [r.id for r in rows] == [r.id for r in records]
    assert any(p.box_voxel is not None for p in preds)
    for pred, row in zip(preds, rows):
        # the evaluator re-parses the completion and maps it through the stored frame: the Grounder's box exactly
        assert row.box_voxel == pred.box_voxel
        assert row.item.codec == grounder.codec and row.item.dataset == pred.dataset
        if pred.box_voxel is not None:
            expected = max(pair_iou([pred.box_voxel], [gt])[0] for gt in pred.gt_boxes)
            assert row.iou == pytest.approx(expected)
    assert ev.compute()["dataset/synthetic3d/n"] == 3


@pytest.mark.e2e
@pytest.mark.slow
def test_script_model_path_writes_predictions_and_metrics(tiny_grounder, tmp_path: Path) -> None:
    from mg3d.data.records import write_manifest

    grounder, records = tiny_grounder
    folder = grounder.save_pretrained(tmp_path / "model")
    write_manifest(tmp_path / "test.jsonl", records)
    out = tmp_path / "eval"
    proc = run_script(
        "--model", str(folder), "--manifest", str(tmp_path / "test.jsonl"), "--out", str(out), "--json",
        "--bootstrap", "100", "--no-progress", "--gallery", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["metrics"]["n"] == len(records) and report["codec"] == "qwen2.5-vl"
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    preds = {p.id: p for p in grounder.predict_records(records, progress=False)}
    assert [x["id"] for x in lines] == [r.id for r in records]
    for x in lines:
        p = preds[x["id"]]
        assert x["completion"] == p.completion  # greedy decoding: the same answer in a fresh process
        assert x["box_voxel"] == (None if p.box_voxel is None else list(p.box_voxel))
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8")) == report
    assert (out / "gallery" / "report.md").exists()
    # and the file it wrote re-scores to the same numbers in-process
    assert rescore(out / "predictions.jsonl", n_bootstrap=100).report()["metrics"] == report["metrics"]
