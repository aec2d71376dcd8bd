"""Completions fuzzing: generated and adversarial completions through the parser and every registered reward.

Nothing raises; every value is finite within the reward's documented ``value_range`` or NaN; each completion
takes well under a second (a generous bound that still catches catastrophic regex backtracking, which takes
minutes on the 10⁵-character inputs below).
"""

from __future__ import annotations

import math
import time
from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mg3d.frames import CoordinateFrame, resize_step
from mg3d.prompts import get_codec, parse_completion, strict_format_ok
from mg3d.rewards import RewardTarget, available_rewards, build_reward

SECONDS_PER_COMPLETION = 1.0
N = 100_000

# Pieces a model (or a broken one) writes: tags, numbers of every shape, brackets, keys, unicode digits.
TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<answer", "answer>", "</", "<", ">", "<box>", "</box>",
        "<|im_end|>", "<|endoftext|>"]  # fmt: skip
NUMBERS = ["0", "1", "-1", "7", "23", "1.5", "-0.0", "1e3", "1e308", "1e309", "-1e-320", "9" * 400, "nan", "NaN",
           "inf", "-Infinity", "0x1F", "1_000", "١٢", "１２", "۳", "५", "²", "½", "0.5", ".5", "5.", "+3", "--4"]  # fmt: skip
PUNCT = ["[", "]", "(", ")", "{", "}", ",", ", ", " ", "\n", "\t", ":", '"', "'", "`", "```json\n", '{"bbox_2d": ',
         '"bbox_3d": ', '"label": "x"', "\\", "\x00", "\ufeff", "\u200b", "\ud800"]  # fmt: skip

fragments = st.one_of(st.sampled_from(TAGS), st.sampled_from(NUMBERS), st.sampled_from(PUNCT),
                      st.text(max_size=8), st.integers().map(str),
                      st.floats(allow_nan=True, allow_infinity=True).map(repr))  # fmt: skip
completions = st.one_of(st.text(max_size=300), st.lists(fragments, max_size=80).map("".join))


def _adversarial() -> dict[str, str]:
    box = "[1, 2, 3, 4, 5, 6]"
    return {
        "open_brackets": "[" * N,
        "number_list": "[" + "1, " * (N // 3) + "]",
        "digits": "9" * N,
        "unicode_digits": "١" * N,
        "fullwidth_list": "<answer>[" + "１, " * (N // 3) + "]</answer>",
        "nested_answers": "<answer>" * (N // 16) + box + "</answer>" * (N // 16),
        "unclosed_answers": "<answer>" * (N // 8),
        "nested_think": "<think>" * (N // 14) + "[1, 2, 3, 4]" + "</think>" * (N // 14),
        "many_boxes": (box + " ") * (N // 19),
        "json_keys": '{"bbox_2d": ' * (N // 12),
        "exponent_run": "1e" + "9" * N,
        "signs": "-" * N + "1",
        "decimal_points": "1." * (N // 2),
        "pairs": "(1,2)," * (N // 6),
        "whitespace": " \t\n" * (N // 3),
        "backtrack_answer": "<answer>" + "[1, 2, 3" * (N // 8),
        "backtrack_think": "<think>" + "a " * (N // 2) + "</thin",
        "huge_ints": "<answer>[" + ", ".join(["9" * 5000] * 6) + "]</answer>",
        "huge_floats": "<answer>[1e308, 1e308, 1e308, -1e308, -1e308, -1e308]</answer>",
        "nan_box": "<answer>[nan, nan, nan, nan, nan, nan]</answer>",
        "inf_box": "<answer>[inf, -inf, 1, 2, 3, 4]</answer>",
        "zero_box": "<answer>[0, 0, 0, 0, 0, 0]</answer>",
        "inverted_box": "<answer>[9, 9, 9, 1, 1, 1]</answer>",
        "fraction_box": "<answer>[0.1, 0.2, 0.3, 0.9, 0.8, 0.7]</answer>",
        "good_box_long_think": "<think>" + "x" * N + "</think><answer>[2, 3, 1, 9, 10, 5]</answer>",
        "surrogates": "\ud800\udfff" * 1000 + "<answer>[1,2,3,4,5,6]</answer>",
        "null_bytes": "\x00" * N,
        "empty": "",
    }


ADVERSARIAL = _adversarial()


@cache
def _targets() -> dict[int, RewardTarget]:
    """A small CT-like phantom volume (voxel frame 24×20×12, 1.5 mm) seen resized to 12×10×6, and a radiograph."""
    rng = np.random.default_rng(0)
    vol = rng.normal(-600, 50, (24, 20, 12))
    vol[6:12, 4:10, 2:6] = 250.0
    frame3 = CoordinateFrame((24, 20, 12)).then(resize_step((24, 20, 12), (12, 10, 6)))
    img = rng.normal(100, 10, (40, 32))
    img[10:20, 8:16] = 220.0
    return {
        3: RewardTarget("phantom/ct/1", np.array([[6, 4, 2, 12, 10, 6]], float), frame=frame3, image=vol,
                        spacing=(1.5, 1.5, 1.5), phrase="the bright lesion"),
        2: RewardTarget("phantom/cxr/1", np.array([[10, 8, 20, 16]], float), frame=CoordinateFrame((40, 32)),
                        image=img, phrase="an opacity"),
    }  # fmt: skip


@cache
def _rewards():
    return [build_reward(key) for key in available_rewards()] + [build_reward("giou", rescale=True)]


def _check(text: str) -> None:
    """Parser (both modes, both dims) and every reward on one completion: no exception, bounded, in range."""
    start = time.perf_counter()
    for ndim, target in _targets().items():
        grid = target.frame.shape
        for mode in ("lenient", "strict"):
            parsed = parse_completion(text, ndim, mode=mode, codec=get_codec("qwen2.5-vl"), grid_shape=grid)
            if parsed.box is not None:
                assert len(parsed.box) == 2 * ndim and all(math.isfinite(v) for v in parsed.box)
        strict_format_ok(text, ndim)
        for reward in _rewards():
            values = reward([text], [target])
            assert values.shape == (1,), reward
            value = float(values[0])
            lo, hi = reward.value_range
            assert math.isnan(value) or lo <= value <= hi, (
                f"{reward.name}: {value} outside {reward.value_range}"
            )
    elapsed = time.perf_counter() - start
    assert elapsed < SECONDS_PER_COMPLETION, f"{elapsed:.2f} s for a completion of {len(text)} characters"


def test_every_registered_reward_is_fuzzed():
    assert {r.key for r in _rewards()} == set(available_rewards())
    assert len(available_rewards()) >= 7


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_completion(name):
    _check(ADVERSARIAL[name])


def test_good_answers_still_score():
    """The fuzzed code paths are the real ones: a correct answer gets IoU 1 on both targets."""
    iou = build_reward("iou")
    assert iou(["<think>x</think><answer>[3, 2, 1, 6, 5, 3]</answer>"], [_targets()[3]])[0] == pytest.approx(
        1.0
    )
    assert iou(["<answer>[10, 8, 20, 16]</answer>"], [_targets()[2]])[0] == pytest.approx(1.0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=completions)
def test_generated_completions(text):
    _check(text)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(fragments, min_size=1, max_size=12), repeat=st.integers(1, 4000))
def test_generated_long_completions(parts, repeat):
    """Repeated fragment patterns up to ~10⁵ characters: the shape that exposes super-linear parsing."""
    _check(("".join(parts) * repeat)[:N])
