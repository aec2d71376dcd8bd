"""The Chain-of-Box warm start: a coarse box trail in ``<think>`` that the parsers and rewards accept in full.

``coarsen_box`` widens a box outward to a coarse grid (hand-computed cases and properties); the prompter's
``warm_start_reasoning="coarse_box"`` target must pass the strict format rule, parse in strict mode, and score
the full Chain-of-Box reward and full IoU — otherwise supervised warm start and GRPO would disagree on what a
good answer is.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mg3d.boxes import coarsen_box, pair_iou
from mg3d.errors import BoxError, ConfigError
from mg3d.frames import CoordinateFrame, resize_step
from mg3d.grounding import GroundingPrompter
from mg3d.model import build_tiny_policy
from mg3d.prompts import parse_completion, strict_format_ok
from mg3d.rewards import ChainOfBoxReward, FormatReward, IoUReward, ParsedBatch, RewardTarget

# ------------------------------------------------------------------------------------------------ coarsen_box


@pytest.mark.parametrize(
    ("box", "shape", "cell", "want"),
    [
        # 3D: x 7 → 0, 35 → 40; y 14 → 8, 42 → 48; z 2 → 0, 10 → 12
        ([7, 14, 2, 35, 42, 10], (56, 56, 16), (8, 8, 4), [0, 8, 0, 40, 48, 12]),
        # already on the grid: unchanged
        ([0, 8, 0, 40, 48, 12], (56, 56, 16), (8, 8, 4), [0, 8, 0, 40, 48, 12]),
        # 2D, high edges clipped to the grid: x 110 → 112 (= size), y 83 → 96 → 84
        ([100, 20, 110, 83], (112, 84), (16, 16), [96, 16, 112, 84]),
        # outside the grid: clipped first to [0, 3, 112, 84], then y 3 → 0
        ([-5, 3, 120, 90], (112, 84), (16, 16), [0, 0, 112, 84]),
        # a size that is no multiple of the cell: the far border is a boundary (x 99 → 100, not 112)
        ([90, 0, 99, 10], (100, 84), (16, 16), [80, 0, 100, 16]),
        # fractional edges move outward: 7.5 → 0, 8.25 → 16
        ([7.5, 1, 8.25, 2], (32, 32), (8, 8), [0, 0, 16, 8]),
        # zero extent on a cell boundary (x = 16): the cell above it; y 5–9 spans two cells, 0–16
        ([16, 5, 16, 9], (112, 84), (8, 8), [16, 0, 24, 16]),
        # zero extent on the far border (x = 112): the last cell, 96–112
        ([112, 5, 112, 9], (112, 84), (16, 8), [96, 0, 112, 16]),
    ],
)
def test_coarsen_box_by_hand(box, shape, cell, want) -> None:
    np.testing.assert_array_equal(coarsen_box(box, shape, cell), want)


@pytest.mark.parametrize(
    ("box", "shape", "cell", "match"),
    [
        ([10, 0, 5, 4], (32, 32), (8, 8), "inverted"),
        ([0, 0, 5, 4], (32, 32, 8), (8, 8, 4), "needs 2 grid sizes"),
        ([0, 0, 5, 4], (32, 32), (8, 8, 4), "cell sizes"),
        ([0, 0, 5, 4], (32, 32), (0, 8), "positive"),
        ([0, 0, 5], (32, 32), (8, 8), "4 or 6 numbers"),
        ([0, 0, math.inf, 4], (32, 32), (8, 8), "non-finite"),
    ],
)
def test_coarsen_box_rejects(box, shape, cell, match) -> None:
    with pytest.raises(BoxError, match=match):
        coarsen_box(box, shape, cell)


@st.composite
def _box_grid_cell(draw: st.DrawFn) -> tuple[list[float], tuple[int, ...], tuple[int, ...]]:
    d = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.integers(1, 300)) for _ in range(d))
    cell = tuple(draw(st.integers(1, 64)) for _ in range(d))
    lo, hi = [], []
    for size in shape:
        a = draw(st.floats(-20, size + 20, allow_nan=False, allow_infinity=False))
        b = draw(st.floats(-20, size + 20, allow_nan=False, allow_infinity=False))
        lo.append(min(a, b))
        hi.append(max(a, b))
    return lo + hi, shape, cell


@settings(max_examples=300, deadline=None)
@given(_box_grid_cell())
def test_coarsen_box_properties(case) -> None:
    box, shape, cell = case
    d = len(shape)
    out = coarsen_box(box, shape, cell)
    size, g = np.asarray(shape, dtype=float), np.asarray(cell, dtype=float)
    low = np.clip(np.asarray(box[:d]), 0, size)
    high = np.clip(np.asarray(box[d:]), low, size)
    c_lo, c_hi = out[:d], out[d:]
    # contains the (clipped) box, inside the grid, positive extent
    assert np.all(c_lo <= low) and np.all(c_hi >= high)
    assert np.all(c_lo >= 0) and np.all(c_hi <= size) and np.all(c_hi > c_lo)
    # on the coarse grid: edges are cell multiples (or the far border)
    assert np.all(np.mod(c_lo, g) == 0)
    assert np.all((np.mod(c_hi, g) == 0) | (c_hi == size))
    # tight: at most one cell beyond the box on an axis of positive extent (strictly less than one
    # mathematically; ``<=`` because ``high + g`` rounds in floating point)
    wide = high > low
    assert np.all(c_lo[wide] >= low[wide] - g[wide]) and np.all(c_hi[wide] <= high[wide] + g[wide])
    # idempotent
    np.testing.assert_array_equal(coarsen_box(out, shape, cell), out)


# ------------------------------------------------------------------------------------- the warm-start target


@pytest.fixture(scope="module", params=["qwen2.5-vl", "qwen2-vl"])
def policy(request):
    return build_tiny_policy(family=request.param, extra_tokens=("<answer>", "</answer>"), seed=0)


def _samples() -> list[dict]:
    # Boxes chosen to be exact in both codecs' integers: the 3D voxel box maps to text [7, 14, 2, 35, 42, 10]
    # (64 → 56: × 7/8), the 2D one is the text box itself (x multiples of 14, y of 21 are whole 0–1000 values).
    frame3 = CoordinateFrame((64, 64, 16)).then(resize_step((64, 64, 16), (56, 56, 16)))
    return [
        {"id": "ct", "text": "the lesion", "image": torch.rand(1, 56, 56, 16), "frame": frame3,
         "boxes": np.asarray([[8, 16, 2, 40, 48, 10]]), "spacing": None},
        {"id": "cxr", "text": "the left lung opacity", "image": torch.rand(1, 112, 84),
         "frame": CoordinateFrame((112, 84)), "boxes": np.asarray([[14, 21, 56, 63]])},
    ]  # fmt: skip


# Text-grid trail boxes, worked out by hand: 3D see test_coarsen_box_by_hand; 2D x 14 → 8, 56 → 56; y 21 → 16,
# 63 → 64 (grid 8, 8). The qwen2-vl codec writes them as 0–1000 integers (rounded half up): 3D x 0, 40/56 →
# 714.29 → 714; y 8/56 → 142.86 → 143, 48/56 → 857.14 → 857; z 0, 12/16 → 750. 2D 8/112 → 71.43 → 71,
# 16/84 → 190.48 → 190, 56/112 → 500, 64/84 → 761.90 → 762. The answers: 3D 125, 250, 125, 625, 750, 625;
# 2D 125, 250, 500, 750.
EXPECTED = {
    "qwen2.5-vl": [
        '<think>the lesion [0, 8, 0, 40, 48, 12]</think><answer>{"bbox_3d": [7, 14, 2, 35, 42, 10]}</answer>',
        '<think>the lesion [8, 16, 56, 64]</think><answer>{"bbox_2d": [14, 21, 56, 63]}</answer>',
    ],
    "qwen2-vl": [
        '<think>the lesion [0, 143, 0, 714, 857, 750]</think><answer>{"bbox_3d": [125, 250, 125, 625, 750, 625]}'
        "</answer>",
        '<think>the lesion [71, 190, 500, 762]</think><answer>{"bbox_2d": [125, 250, 500, 750]}</answer>',
    ],
}


def _targets(batch) -> list[RewardTarget]:
    return [
        RewardTarget(batch.ids[i], boxes=batch.gt_boxes[i], frame=batch.voxel_to_text[i])
        for i in range(len(batch))
    ]


def test_warm_start_target_by_hand(policy) -> None:
    prompter = GroundingPrompter(policy, template="chain_of_box", warm_start_reasoning="coarse_box")
    assert prompter.build(_samples()).answers == EXPECTED[policy.codec_name]


def test_warm_start_target_earns_full_chain_of_box_reward_and_iou(policy) -> None:
    prompter = GroundingPrompter(
        policy, template="chain_of_box", parse_mode="strict", warm_start_reasoning="coarse_box"
    )
    batch = prompter.build(_samples())
    answers = batch.answers
    for text, visual in zip(answers, batch.visuals):
        assert strict_format_ok(text, visual.ndim)
        parsed = parse_completion(
            text, visual.ndim, mode="strict", codec=policy.codec, grid_shape=visual.text_shape
        )
        assert parsed.ok and len(parsed.think_boxes) == 1
    scored = ParsedBatch(answers, _targets(batch), codec=policy.codec_name, parse_mode="strict")
    np.testing.assert_allclose(FormatReward(mode="strict").score(scored), [1.0, 1.0])
    np.testing.assert_allclose(ChainOfBoxReward().score(scored), [1.0, 1.0])
    # slack 0: the answer lies inside the trail box itself, not only inside its 10 % margin
    np.testing.assert_allclose(ChainOfBoxReward(slack=0.0).score(scored), [1.0, 1.0])
    np.testing.assert_allclose(IoUReward().score(scored), [1.0, 1.0])
    read = prompter.read(answers, batch, [0, 1])
    assert all(a.ok for a in read)
    ious = [pair_iou(a.box_source[None], gt[:1])[0] for a, gt in zip(read, batch.gt_boxes)]
    np.testing.assert_allclose(ious, [1.0, 1.0])


def test_empty_reasoning_leaves_the_chain_of_box_reward_nothing_to_score(policy) -> None:
    prompter = GroundingPrompter(policy, template="chain_of_box", parse_mode="strict")
    batch = prompter.build(_samples())
    assert all(a.startswith("<think></think><answer>") for a in batch.answers)
    scored = ParsedBatch(batch.answers, _targets(batch), codec=policy.codec_name, parse_mode="strict")
    assert np.isnan(ChainOfBoxReward().score(scored)).all()


@pytest.mark.parametrize("template", ["terse", "plain"])
def test_templates_without_think_ignore_the_trail(policy, template: str) -> None:
    with_trail = GroundingPrompter(policy, template=template, warm_start_reasoning="coarse_box")
    without = GroundingPrompter(policy, template=template)
    samples = _samples()
    assert with_trail.build(samples).answers == without.build(samples).answers


def test_r1_template_gets_the_trail_too(policy) -> None:
    # the trail is a property of think templates, not of the Chain-of-Box instruction
    prompter = GroundingPrompter(policy, template="r1", warm_start_reasoning="coarse_box")
    assert prompter.build(_samples()).answers == EXPECTED[policy.codec_name]


def test_a_2d_trail_grid_refuses_a_volume(policy) -> None:
    prompter = GroundingPrompter(
        policy, template="chain_of_box", warm_start_reasoning="coarse_box", trail_grid=(16, 16)
    )
    assert prompter.build(_samples()[1:]).answers[0].startswith("<think>the lesion [")
    with pytest.raises(ConfigError, match="trail_grid"):
        prompter.build(_samples()[:1])
