"""Rewards: format, spatial, Chain-of-Box, the parsed batch, registry and the weighted combiner.

Every expected number below is worked out by hand in the comment next to it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mg3d.errors import ConfigError, DataError
from mg3d.frames import CoordinateFrame, resize_step
from mg3d.rewards import (
    PAPER_REWARDS,
    REWARD_REGISTRY,
    CenterDistanceReward,
    ChainOfBoxReward,
    FormatReward,
    GIoUReward,
    IoUReward,
    IoUThresholdReward,
    ParsedBatch,
    RewardSet,
    RewardTarget,
    available_rewards,
    build_reward,
    combine,
    completion_text,
)


def ans2(box: list[float], think: str = "ok") -> str:
    return f'<think>{think}</think><answer>{{"bbox_2d": {box}}}</answer>'


def ans3(box: list[float], think: str = "ok") -> str:
    return f'<think>{think}</think><answer>{{"bbox_3d": {box}}}</answer>'


@pytest.fixture
def target2d() -> RewardTarget:
    # voxel grid 100 × 80 shown to the model at 50 × 40: text units are 2 voxels
    frame = CoordinateFrame((100, 80)).then(resize_step((100, 80), (50, 40)))
    return RewardTarget("cxr/1", boxes=[[10, 20, 30, 40]], frame=frame)


@pytest.fixture
def target3d() -> RewardTarget:
    # 3D, model sees the voxel grid itself; spacing 1 × 1 × 2.5 mm
    return RewardTarget(
        "ct/1", boxes=[[10, 10, 4, 20, 20, 8]], spacing=(1.0, 1.0, 2.5), image=np.zeros((32, 32, 16))
    )


# ------------------------------------------------------------------------------------------------ parsing


def test_parsed_batch_maps_text_boxes_to_voxel_frame(target2d: RewardTarget) -> None:
    batch = ParsedBatch([ans2([5, 10, 15, 20]), "nothing"], [target2d, target2d])
    np.testing.assert_allclose(batch.pred_voxel[0], [10, 20, 30, 40])  # ×2 back through the resize
    assert batch.pred_voxel[1] is None
    assert batch.has_box.tolist() == [True, False]
    np.testing.assert_allclose(batch.best_iou, [1.0, np.nan])


def test_parsed_batch_with_normalised_codec() -> None:
    target = RewardTarget("x", boxes=[[10, 20, 30, 40]], frame=CoordinateFrame((100, 80)))
    # qwen2-vl writes 0–1000: [100, 250, 300, 500] → [10, 20, 30, 40] on a 100 × 80 grid
    batch = ParsedBatch([ans2([100, 250, 300, 500])], [target], codec="qwen2-vl")
    np.testing.assert_allclose(batch.pred_voxel[0], [10, 20, 30, 40])


def test_normalised_codec_without_grid_is_a_data_error() -> None:
    target = RewardTarget("x", boxes=[[1, 1, 2, 2]])
    with pytest.raises(DataError, match="'x'"):
        ParsedBatch([ans2([1, 1, 2, 2])], [target], codec="qwen2-vl")


def test_recovered_boxes_only_on_request(target2d: RewardTarget) -> None:
    truncated = "<think>the box is [5, 10, 15, 20]"  # no answer: the lenient parser recovers the last box
    assert not ParsedBatch([truncated], [target2d]).has_box[0]
    assert ParsedBatch([truncated], [target2d], accept_recovered=True).has_box[0]


def test_strict_parse_mode_follows_the_paper_rule(target2d: RewardTarget) -> None:
    bare = "<answer>[5, 10, 15, 20]</answer>"  # no {…}: the paper's parser fails, the lenient one reads it
    assert not ParsedBatch([bare], [target2d], parse_mode="strict").has_box[0]
    assert ParsedBatch([bare], [target2d]).has_box[0]


def test_completion_text_forms() -> None:
    assert completion_text("abc") == "abc"
    assert completion_text([{"role": "assistant", "content": "abc"}]) == "abc"
    assert (
        completion_text(
            [{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
        )
        == "ab"
    )
    assert completion_text(None) == ""
    assert completion_text(42) == ""


def test_target_validation_names_the_record() -> None:
    with pytest.raises(DataError, match="'bad/1'"):
        RewardTarget("bad/1", boxes=[[5, 5, 1, 1]])  # inverted
    with pytest.raises(DataError, match="'bad/2'"):
        RewardTarget("bad/2", boxes=[[0, 0, 2, 2]], image=np.zeros((8, 8, 8)))  # 3D image for 2D boxes
    with pytest.raises(DataError, match="'bad/3'"):
        RewardTarget("bad/3", boxes=[[0, 0, 2, 2]], frame=CoordinateFrame((8, 8)), image=np.zeros((4, 4)))
    with pytest.raises(ConfigError):
        ParsedBatch(["a"], [])


# ------------------------------------------------------------------------------------------------ format


def test_format_strict_and_lenient_2d(target2d: RewardTarget) -> None:
    texts = [
        ans2([1, 2, 3, 4]),  # the paper's full match
        "<answer>[1, 2, 3, 4]</answer>",  # lenient only: no think, no braces
        ans2([1, 2, 3]),  # wrong dimension: neither
        "",  # empty: neither
        '<think>x</think><answer>{"bbox_2d": [3, 2, 3, 4]}</answer>',  # degenerate (zero width): strict only
    ]
    batch = ParsedBatch(texts, [target2d] * 5)
    assert FormatReward(mode="strict").score(batch).tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert FormatReward(mode="lenient").score(batch).tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_format_3d_and_sanity_component(target3d: RewardTarget) -> None:
    texts = [ans3([1, 2, 3, 4, 5, 6], think="abc"), ans3([1, 2, 3, 4, 5, 6], think=""), ans2([1, 2, 3, 4])]
    batch = ParsedBatch(texts, [target3d] * 3)
    assert FormatReward().score(batch).tolist() == [1.0, 1.0, 0.0]
    # sanity: think ≥ 3 chars and total ≤ 200 chars, weight 0.25 → 0.75·fmt + 0.25·sane
    # ("abc" passes; "" and "ok" are too short; the 2D answer also fails the 3D format)
    r = FormatReward(sanity_weight=0.25, min_think_chars=3, max_chars=200).score(batch)
    assert r.tolist() == [1.0, 0.75, 0.0]
    assert FormatReward(sanity_weight=0.25, min_think_chars=3, max_chars=10).score(batch).tolist() == [
        0.75,
        0.75,
        0.0,
    ]


# ------------------------------------------------------------------------------------------------ spatial


def test_spatial_rewards_2d(target2d: RewardTarget) -> None:
    texts = [
        ans2([5, 10, 15, 20]),  # exact: IoU 1
        ans2([5, 10, 15, 21]),  # voxel [10, 20, 30, 42]: IoU 400 / 440 = 10/11
        ans2([0, 0, 5, 5]),  # voxel [0, 0, 10, 10], disjoint; hull 30 × 40 = 1200, union 500 → GIoU −7/12
        ans2([5, 10, 15, 15]),  # voxel [10, 20, 30, 30]: IoU 200 / 400 = 0.5, not > 0.5
        "no box at all",
        ans2([5, 10, 5, 20]),  # zero width: a parse failure
    ]
    batch = ParsedBatch(texts, [target2d] * 6)
    np.testing.assert_allclose(IoUThresholdReward().score(batch), [1, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(IoUReward().score(batch), [1, 10 / 11, 0, 0.5, 0, 0])
    np.testing.assert_allclose(GIoUReward().score(batch), [1, 10 / 11, -7 / 12, 0.5, -1, -1])
    np.testing.assert_allclose(
        GIoUReward(rescale=True).score(batch), [1, (10 / 11 + 1) / 2, 5 / 24, 0.75, 0, 0]
    )
    # centre distance applies to 3D only by default
    assert np.isnan(CenterDistanceReward().score(batch)).all()
    # with 2D on and no spacing: voxels; pred 2 centre (20, 31) vs (20, 30): d = 1 → exp(−1/20)
    cd = CenterDistanceReward(ndims=(2, 3)).score(batch)
    np.testing.assert_allclose(cd[:2], [1.0, math.exp(-1 / 20)])
    assert cd[4] == 0.0
    assert np.isnan(CenterDistanceReward(ndims=(2,), require_mm=True).score(batch)).all()


def test_spatial_rewards_3d_and_best_match() -> None:
    target = RewardTarget(
        "ct/2", boxes=[[0, 0, 0, 10, 10, 10], [20, 20, 20, 30, 30, 30]], affine=np.diag([0.5, 0.5, 2.0, 1.0])
    )
    texts = [
        ans3([20, 20, 20, 30, 30, 25]),  # inside the second box: IoU 500 / 1000 = 0.5
        ans3([0, 0, 0, 10, 10, 20]),  # first box doubled in z: IoU 1000 / 2000 = 0.5... of the first box
        ans3([0, 0, 0, 10, 10, 9]),  # IoU 0.9 with the first box
        ans3([1, 2, 3, 4, 5]),  # wrong dimension → failure
    ]
    batch = ParsedBatch(texts, [target] * 4)
    np.testing.assert_allclose(IoUReward().score(batch), [0.5, 0.5, 0.9, 0.0])
    assert IoUThresholdReward().score(batch).tolist() == [0.0, 0.0, 1.0, 0.0]
    assert IoUThresholdReward(threshold=0.4).score(batch).tolist() == [1.0, 1.0, 1.0, 0.0]
    # centres: (25, 25, 22.5) vs (25, 25, 25): Δz 2.5 voxels × 2 mm = 5 mm → exp(−5/20)
    # (5, 5, 10) vs (5, 5, 5): 5 voxels × 2 mm = 10 mm; (5, 5, 4.5) vs (5, 5, 5): 0.5 × 2 = 1 mm
    cd = CenterDistanceReward(scale_mm=20).score(batch)
    np.testing.assert_allclose(cd, [math.exp(-0.25), math.exp(-0.5), math.exp(-0.05), 0.0])


def test_failure_value_and_config_errors() -> None:
    assert IoUReward(failure_value=0.25).failure_value == 0.25
    with pytest.raises(ConfigError):
        IoUReward(failure_value=2.0)
    with pytest.raises(ConfigError):
        GIoUReward(failure_value=-1.0, rescale=True)
    with pytest.raises(ConfigError):
        IoUThresholdReward(threshold=1.0)
    with pytest.raises(ConfigError):
        CenterDistanceReward(ndims=(4,))


# ------------------------------------------------------------------------------------------------ chain of box


def test_chain_of_box_2d(target2d: RewardTarget) -> None:
    texts = [
        # think box [1, 2, 3, 4] grown 10 % → [0.8, 1.8, 3.2, 4.2]; answer [0, 0, 5, 5]: 2.4² / 25 = 0.2304
        "<think>region [1, 2, 3, 4]</think><answer>[0, 0, 5, 5]</answer>",
        # answer inside the think box: consistent 1; well-formed 1 → 1
        "<think>lung [0, 0, 20, 20]</think><answer>[5, 5, 10, 10]</answer>",
        # one valid box, one 3-number list, one box outside the 50 × 40 grid: well-formed 1/3; answer inside
        "<think>a [0, 0, 20, 20] b [1, 2, 3] c [60, 60, 70, 70]</think><answer>[5, 5, 10, 10]</answer>",
        # no box in think: does not apply
        "<think>no boxes</think><answer>[5, 5, 10, 10]</answer>",
        # a think box but no answer: well-formed 1, consistent 0
        "<think>a [0, 0, 20, 20]</think>",
    ]
    r = ChainOfBoxReward().score(ParsedBatch(texts, [target2d] * 5))
    np.testing.assert_allclose(r[:3], [0.5 + 0.5 * 0.2304, 1.0, 0.5 / 3 + 0.5])
    assert np.isnan(r[3])
    assert r[4] == 0.5


def test_chain_of_box_3d(target3d: RewardTarget) -> None:
    text = "<think>organ [0, 0, 0, 10, 10, 10]</think><answer>[5, 5, 5, 15, 15, 15]</answer>"
    # slack 0 → overlap 5³ of the answer's 10³ = 0.125; w = 0.5 → 0.5 + 0.0625
    r = ChainOfBoxReward(slack=0.0).score(ParsedBatch([text], [target3d]))
    np.testing.assert_allclose(r, [0.5625])


# ------------------------------------------------------------------------------------------------ registry, combiner


def test_registry_and_builder() -> None:
    assert {"format", "iou_binary", "iou", "giou", "center_distance", "semantic", "chain_of_box"} <= set(
        available_rewards()
    )
    assert isinstance(build_reward("iou", name="acc"), IoUReward)
    assert build_reward("iou", name="acc").name == "acc"
    assert REWARD_REGISTRY["format"] is FormatReward
    with pytest.raises(ConfigError, match="unknown reward"):
        build_reward("nope")
    with pytest.raises(ConfigError, match="bad arguments"):
        build_reward("iou", threshold=0.3)


def test_combine_matches_trl_semantics() -> None:
    cols = {"a": np.array([1.0, np.nan, np.nan, 0.5]), "b": np.array([0.0, 2.0, np.nan, 0.5])}
    out = combine(cols, {"a": 2.0, "b": 0.5})
    # nansum of weighted values; all-NaN row stays NaN
    np.testing.assert_allclose(out.total, [2.0, 1.0, np.nan, 1.25])
    m = out.metrics()
    assert m["rewards/a/mean"] == pytest.approx(0.75)
    assert m["rewards/a/std"] == pytest.approx(np.std([1.0, 0.5], ddof=1))
    assert m["rewards/b/mean"] == pytest.approx(2.5 / 3)
    assert m["reward"] == pytest.approx((2.0 + 1.0 + 1.25) / 3)
    assert out.as_tensor().shape == (4, 2)


def test_reward_set_from_config(target2d: RewardTarget) -> None:
    rs = RewardSet.from_config(
        {"format": 1.0, "acc": {"type": "iou_binary", "threshold": 0.5, "weight": 2.0}}
    )
    assert rs.names == ["format", "acc"] and rs.weights == [1.0, 2.0]
    out = rs([ans2([5, 10, 15, 20]), "<answer>[0, 0, 5, 5]</answer>"], [target2d, target2d])
    assert out.columns["format"].tolist() == [1.0, 0.0]
    assert out.columns["acc"].tolist() == [1.0, 0.0]
    assert out.total.tolist() == [3.0, 0.0]
    assert set(RewardSet.from_config(PAPER_REWARDS).names) == {"format", "iou_binary", "semantic"}
    with pytest.raises(ConfigError, match="unique"):
        RewardSet([IoUReward(), IoUReward()])
    with pytest.raises(ConfigError):
        RewardSet([IoUReward()], weights=[1.0, 2.0])
    with pytest.raises(ConfigError):
        RewardSet([IoUReward()], codec="nope")


# ------------------------------------------------------------------------------------------------ properties

_box_text = st.one_of(
    st.lists(st.integers(-50, 150), min_size=4, max_size=6).map(lambda v: f"<answer>{v}</answer>"),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=4, max_size=4).map(
        lambda v: f'<think>[1, 2, 3, 4]</think><answer>{{"bbox_2d": {v}}}</answer>'
    ),
    st.text(max_size=80),
    st.lists(st.integers(0, 60), min_size=4, max_size=4).map(lambda v: ans2(v, think=f"roi {v}")),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    texts=st.lists(_box_text, min_size=1, max_size=6), gt=st.lists(st.integers(0, 40), min_size=4, max_size=4)
)
def test_every_geometric_reward_is_finite_or_nan_and_in_range(texts: list[str], gt: list[int]) -> None:
    lo = np.minimum(gt[:2], gt[2:])
    box = np.concatenate([lo, lo + np.abs(np.subtract(gt[2:], gt[:2])) + 1])
    frame = CoordinateFrame((64, 48)).then(resize_step((64, 48), (32, 24)))
    target = RewardTarget("h", boxes=[box], frame=frame, spacing=(0.5, 0.5))
    batch = ParsedBatch(texts, [target] * len(texts), accept_recovered=True)
    rewards = [
        FormatReward(),
        FormatReward(mode="lenient", sanity_weight=0.3, max_chars=50),
        IoUThresholdReward(),
        IoUReward(),
        GIoUReward(),
        GIoUReward(rescale=True),
        CenterDistanceReward(ndims=(2,)),
        ChainOfBoxReward(),
    ]
    for reward in rewards:
        values = reward(texts, [target] * len(texts), batch=batch)
        finite = values[~np.isnan(values)]
        assert np.all(np.isfinite(finite)), reward
        lo_r, hi_r = reward.value_range
        assert np.all((finite >= lo_r - 1e-12) & (finite <= hi_r + 1e-12)), (reward, values)
    assert not np.isnan(FormatReward().score(batch)).any()


def test_mixed_2d_3d_batch(target2d: RewardTarget, target3d: RewardTarget) -> None:
    texts = [
        ans2([5, 10, 15, 20]),
        ans3([10, 10, 4, 20, 20, 6]),
        ans2([1, 2, 3, 4]),
        ans3([10, 10, 4, 20, 20, 8]),
    ]
    targets = [target2d, target3d, target3d, target3d]  # the third answers a volume with a 2D box: a failure
    out = RewardSet([IoUReward(), CenterDistanceReward()])(texts, targets)
    # 3D: [10, 10, 4, 20, 20, 6] covers half the z range → IoU 0.5; centres z 5 vs 6: 1 voxel × 2.5 mm
    np.testing.assert_allclose(out.columns["iou"], [1.0, 0.5, 0.0, 1.0])
    np.testing.assert_allclose(out.columns["center_distance"], [np.nan, math.exp(-2.5 / 20), 0.0, 1.0])


def test_reward_set_builds_from_a_lightning_cli_style_config() -> None:
    """Typed __init__ arguments: jsonargparse (what LightningCLI uses) builds a RewardSet from YAML-like data."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(RewardSet, "rewards")
    cfg = parser.parse_object(
        {
            "rewards": {
                "rewards": [
                    {"class_path": "mg3d.rewards.FormatReward", "init_args": {"mode": "lenient"}},
                    {"class_path": "mg3d.rewards.IoUThresholdReward", "init_args": {"threshold": 0.3}},
                    {
                        "class_path": "mg3d.rewards.SemanticReward",
                        "init_args": {
                            "mode": "misses",
                            "encoder": {
                                "class_path": "mg3d.rewards.encoders.RadiomicsEncoder",
                                "init_args": {"level_weight": 2.0},
                            },
                        },
                    },
                ],
                "weights": [1.0, 2.0, 0.5],
                "codec": "qwen2-vl",
            }
        }
    )
    rs = parser.instantiate(cfg).rewards
    assert rs.names == ["format", "iou_binary", "semantic"] and rs.weights == [1.0, 2.0, 0.5]
    assert (
        rs.rewards[1].threshold == 0.3 and rs.rewards[2].encoder.weights[0] == 2.0 and rs.codec == "qwen2-vl"
    )
