"""The multi-box reward (``box_f1``): the answer parser for several boxes and the matched IoU F1, 2D and 3D."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mg3d.boxes import iou_matrix
from mg3d.errors import ConfigError
from mg3d.frames import CoordinateFrame, resize_step
from mg3d.prompts import ParseFlag, get_codec, parse_answer_boxes, parse_completion, read_answer_boxes
from mg3d.rewards import MultiBoxF1Reward, RewardSet, RewardTarget, build_reward
from mg3d.rewards.multibox import matched_f1


def _boxes(ndim: int, min_size: int = 1, max_size: int = 4):
    box = st.tuples(st.tuples(*[st.integers(0, 30)] * ndim), st.tuples(*[st.integers(1, 8)] * ndim)).map(
        lambda lo_size: [*lo_size[0], *(lo + s for lo, s in zip(*lo_size))]
    )
    return st.lists(box, min_size=min_size, max_size=max_size, unique_by=tuple).map(
        lambda b: np.asarray(b, dtype=np.float64)
    )


ndims = st.sampled_from([2, 3])
thresholds = st.sampled_from([None, 0.3, 0.5])


@st.composite
def box_pairs(draw):
    ndim = draw(ndims)
    return draw(_boxes(ndim)), draw(_boxes(ndim)), draw(thresholds)


@given(box_pairs())
@settings(max_examples=150, deadline=None)
def test_f1_is_in_unit_interval_and_invariant_to_order(pair):
    predicted, truth, tau = pair
    f1 = matched_f1(predicted, truth, tau)
    assert 0.0 <= f1 <= 1.0
    rng = np.random.default_rng(len(predicted) * 7 + len(truth))
    shuffled = matched_f1(predicted[rng.permutation(len(predicted))], truth[rng.permutation(len(truth))], tau)
    assert shuffled == pytest.approx(f1, abs=1e-12)
    assert matched_f1(truth, predicted, tau) == pytest.approx(f1, abs=1e-12)  # symmetric


@given(box_pairs())
@settings(max_examples=150, deadline=None)
def test_f1_is_one_iff_the_matching_is_perfect(pair):
    predicted, truth, tau = pair
    assert matched_f1(truth, truth, tau) == pytest.approx(1.0)
    f1 = matched_f1(predicted, truth, tau)
    iou = iou_matrix(predicted, truth)
    if tau is None:  # perfect = the same set of boxes
        perfect = len(predicted) == len(truth) and all(
            iou[i].max() == pytest.approx(1.0) for i in range(len(iou))
        )
    else:  # perfect = a one-to-one matching with every IoU ≥ τ (brute force over permutations)
        perfect = len(predicted) == len(truth) and any(
            all(iou[i, j] >= tau for i, j in enumerate(perm))
            for perm in itertools.permutations(range(len(truth)))
        )
    assert (f1 == pytest.approx(1.0)) == perfect


@given(box_pairs())
@settings(max_examples=100, deadline=None)
def test_hungarian_matching_is_the_best_one_to_one_matching(pair):
    predicted, truth, tau = pair
    iou = iou_matrix(predicted, truth)
    gain = iou if tau is None else (iou >= tau).astype(float)
    small, large = (predicted, truth) if len(predicted) <= len(truth) else (truth, predicted)
    g = gain if len(predicted) <= len(truth) else gain.T
    best = max(
        sum(g[i, j] for i, j in enumerate(perm))
        for perm in itertools.permutations(range(len(large)), len(small))
    )
    assert matched_f1(predicted, truth, tau) == pytest.approx(
        min(1.0, 2 * best / (len(predicted) + len(truth)))
    )


@given(box_pairs())
@settings(max_examples=100, deadline=None)
def test_an_extra_far_away_box_costs(pair):
    predicted, truth, tau = pair
    f1 = matched_f1(predicted, truth, tau)
    ndim = predicted.shape[1] // 2
    far = np.asarray([[1000.0] * ndim + [1001.0] * ndim])
    extra = matched_f1(np.concatenate([predicted, far]), truth, tau)
    assert extra == pytest.approx(f1 * (len(predicted) + len(truth)) / (len(predicted) + 1 + len(truth)))


def test_one_box_against_one_box_is_the_iou():
    a, b = np.asarray([[0.0, 0, 4, 4]]), np.asarray([[2.0, 0, 6, 4]])
    assert matched_f1(a, b) == pytest.approx(1 / 3)
    assert matched_f1(a, b, 0.3) == 1.0 and matched_f1(a, b, 0.5) == 0.0
    assert matched_f1(np.zeros((0, 4)), b) == 0.0


# --------------------------------------------------------------------------------------------------
# Reading several boxes from an answer
# --------------------------------------------------------------------------------------------------


def test_parser_reads_every_box_of_the_answer_and_leaves_the_single_box_path_alone():
    text = "<think>left [1, 1, 2, 2]</think><answer>[{'bbox_2d': [10, 12, 20, 30]}, {'bbox_2d': [40, 8, 50, 18]}]</answer>"
    assert parse_answer_boxes(text, 2) == ((10.0, 12.0, 20.0, 30.0), (40.0, 8.0, 50.0, 18.0))
    single = parse_completion(text, 2)
    assert single.box == (10.0, 12.0, 20.0, 30.0) and ParseFlag.SEVERAL_BOXES in single.flags
    three_d = "<answer>[1, 2, 3, 5, 6, 7] and [9, 9, 9, 12, 12, 12] and [1, 2, 3, 5, 6, 7]</answer>"
    assert parse_answer_boxes(three_d, 3) == (
        (1.0, 2.0, 3.0, 5.0, 6.0, 7.0),
        (9.0, 9.0, 9.0, 12.0, 12.0, 12.0),
    )
    assert parse_answer_boxes("<answer>[20, 30, 10, 12], [5, 5, 5, 9]</answer>", 2) == (
        (10.0, 12.0, 20.0, 30.0),
    )
    assert parse_answer_boxes("<answer>10 12 20 30</answer>", 2) == (
        (10.0, 12.0, 20.0, 30.0),
    )  # bare numbers
    assert parse_answer_boxes("<answer>[1, 2, 3, 4], [5, 6", 2) == ()  # truncated: no complete answer
    assert parse_answer_boxes("no answer [1, 2, 3, 4]", 2) == ()
    many = "<answer>" + ", ".join(f"[{i}, 0, {i + 1}, 1]" for i in range(50)) + "</answer>"
    assert len(parse_answer_boxes(many, 2, max_boxes=5)) == 5
    with pytest.raises(ConfigError, match="max_boxes"):
        parse_answer_boxes(many, 2, max_boxes=0)


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_parser_never_raises(text):
    for ndim in (2, 3):
        boxes = parse_answer_boxes(text, ndim)
        assert all(len(b) == 2 * ndim for b in boxes)


def test_boxes_are_mapped_through_the_frame():
    frame = CoordinateFrame((64, 64)).then(resize_step((64, 64), (32, 32)))  # the model saw half the size
    text = "<answer>[1, 2, 3, 4], [10, 10, 20, 20]</answer>"
    boxes = read_answer_boxes(text, 2, frame=frame, codec=get_codec("qwen2.5-vl"))
    assert np.allclose(boxes, [[2, 4, 6, 8], [20, 20, 40, 40]])
    assert read_answer_boxes("<answer>none</answer>", 2, frame=frame, codec=None).shape == (0, 4)


# --------------------------------------------------------------------------------------------------
# The reward
# --------------------------------------------------------------------------------------------------


def test_reward_scores_several_findings():
    target = RewardTarget("mscxr/1/a", boxes=np.asarray([[10, 10, 20, 20], [40, 40, 50, 50]], dtype=float))
    completions = [
        "<answer>[10, 10, 20, 20], [40, 40, 50, 50]</answer>",  # both findings
        "<answer>[10, 10, 20, 20]</answer>",  # one of two: F1 = 2/3
        "<answer>[10, 10, 20, 20], [40, 40, 50, 50], [70, 70, 80, 80]</answer>",  # one extra: 4/5
        "<answer>nothing</answer>",
        "<answer>[10, 10, 20, 20]",  # truncated
    ]
    reward = build_reward("box_f1")
    assert isinstance(reward, MultiBoxF1Reward)
    values = reward(completions, [target] * len(completions), codec="qwen2.5-vl")
    assert values == pytest.approx([1.0, 2 / 3, 0.8, 0.0, 0.0])
    # with one true box and one predicted box the soft F1 is the IoU, as the ``iou`` reward gives
    one = RewardTarget("x", boxes=np.asarray([[0, 0, 4, 4]], dtype=float))
    text = ["<answer>[2, 0, 6, 4]</answer>"]
    assert reward(text, [one]) == pytest.approx(build_reward("iou")(text, [one]))


def test_reward_in_3d_and_from_config():
    target = RewardTarget("ct/1", boxes=np.asarray([[1, 1, 1, 5, 5, 5], [8, 8, 8, 12, 12, 12]], dtype=float))
    rewards = RewardSet.from_config({"box_f1": {"weight": 1.0, "threshold": 0.5}})
    out = rewards(["<answer>[1, 1, 1, 5, 5, 6], [0, 0, 0, 1, 1, 1]</answer>"], [target])
    assert out.total == pytest.approx([0.5])  # one match ≥ 0.5 of 2 + 2 boxes
    with pytest.raises(ConfigError, match="threshold"):
        MultiBoxF1Reward(threshold=0.0)
