"""Tests for mg3d.prompts (codecs, templates, parser) and mg3d.chat_template (offline tokenizer, template)."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mg3d.chat_template import QWEN2_VL_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS, build_byte_level_tokenizer
from mg3d.errors import BoxError, ConfigError, DataError
from mg3d.prompts import (
    MAX_SCAN_CHARS,
    QUESTION_TEMPLATE,
    AbsolutePixelCodec,
    NormalizedCodec,
    ParseFlag,
    ParseStatus,
    build_instruction,
    build_messages,
    format_answer,
    format_completion,
    get_codec,
    get_template,
    laterality_hint,
    parse_completion,
    render_prompt,
    strict_format_ok,
)

S = ParseStatus
F = ParseFlag

# ------------------------------------------------------------------------------------------------------
# Parser: table of realistic completions (styles of Qwen2.5-VL outputs and of the MedGround-R1 logs)
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    text: str
    box: tuple[float, ...] | None
    status: ParseStatus
    ndim: int = 2
    flags: frozenset[ParseFlag] = frozenset()
    n_think: int = 0
    kwargs: dict[str, Any] = field(default_factory=dict)


THINK = "<think>\nThe image is a frontal chest X-ray. The cardiac silhouette is enlarged.\n</think>\n"
LOOP = "The heart is enlarged. " * 2000  # a repetition loop, ~46k characters

CASES = [
    Case(
        "fenced_list_of_objects",
        THINK
        + '<answer>\n```json\n[\n\t{"bbox_2d": [249, 308, 567, 531], "label": "enlarged cardiac silhouette"}\n]'
        "\n```\n</answer>",
        (249, 308, 567, 531),
        S.OK,
    ),
    Case(
        "log_style_object",
        THINK
        + '<answer>\n{\n  "bbox_2d": [48, 316, 179, 435],\n  "label": "Moderate right pleural effusion"\n}\n</answer>',
        (48, 316, 179, 435),
        S.OK,
    ),
    Case(
        "log_style_list_of_objects",
        THINK
        + '<answer>\n[\n\t{"bbox_2d": [469, 108, 643, 578], "label": "small left apical pneumothorax"}\n]\n</answer>',
        (469, 108, 643, 578),
        S.OK,
    ),
    Case("bare_list_fig1", THINK + "<answer>[370, 259, 537, 554]</answer>", (370, 259, 537, 554), S.OK),
    Case(
        "extra_text_around_json",
        THINK + '<answer>The region is {"bbox_2d": [12, 40, 200, 310]} in the left lung.</answer>',
        (12, 40, 200, 310),
        S.OK,
    ),
    Case(
        "floats",
        THINK + '<answer>{"bbox_2d": [12.5, 40.25, 200.0, 310.75]}</answer>',
        (12.5, 40.25, 200.0, 310.75),
        S.OK,
    ),
    Case("negative", THINK + '<answer>{"bbox_2d": [-5, 10, 120, 200]}</answer>', (-5, 10, 120, 200), S.OK),
    Case(
        "exponents",
        THINK + '<answer>{"bbox_2d": [1.2e2, 4e1, 2.5E2, 3e2]}</answer>',
        (120, 40, 250, 300),
        S.OK,
    ),
    Case(
        "spaces_and_newlines_in_list",
        THINK + '<answer>{"bbox_2d": [ 12 ,\n 40 , 200 , 310 ]}</answer>',
        (12, 40, 200, 310),
        S.OK,
    ),
    Case(
        "normalised_fractions_scaled",
        THINK + '<answer>{"bbox_2d": [0.1, 0.25, 0.5, 0.75]}</answer>',
        (64, 120, 320, 360),
        S.OK,
        flags=frozenset({F.SCALED_FRACTIONS}),
        kwargs={"grid_shape": (640, 480)},
    ),
    Case(
        "normalised_fractions_no_grid",
        THINK + '<answer>{"bbox_2d": [0.1, 0.25, 0.5, 0.75]}</answer>',
        (0.1, 0.25, 0.5, 0.75),
        S.OK,
    ),
    Case(
        "qwen2vl_codec_0_1000",
        THINK + '<answer>{"bbox_2d": [100, 250, 500, 750]}</answer>',
        (64, 120, 320, 360),
        S.OK,
        kwargs={"grid_shape": (640, 480), "codec": NormalizedCodec()},
    ),
    Case(
        "two_answers_last_wins",
        THINK + '<answer>{"bbox_2d": [1, 2, 30, 40]}</answer>\nWait, let me look again.\n'
        '<answer>{"bbox_2d": [5, 6, 70, 80]}</answer>',
        (5, 6, 70, 80),
        S.OK,
        flags=frozenset({F.MULTIPLE_ANSWERS}),
    ),
    Case(
        "complete_then_trailing_unclosed_answer",
        THINK + '<answer>{"bbox_2d": [1, 2, 30, 40]}</answer><answer>{"bbox_2d": [9',
        (1, 2, 30, 40),
        S.OK,
        flags=frozenset({F.UNCLOSED_TRAILING_ANSWER}),
    ),
    Case(
        "truncated_after_first_object",
        THINK + '<answer>\n[\n\t{"bbox_2d": [10, 20, 30, 40], "label": "a"},\n\t{"bbox_2d": [50, 6',
        (10, 20, 30, 40),
        S.TRUNCATED,
    ),
    Case("truncated_mid_list", THINK + '<answer>\n{"bbox_2d": [10, 20, 3', None, S.TRUNCATED),
    Case(
        "truncated_in_think_with_cob_box",
        "<think>\nThe heart [200, 300, 420, 510] is enlarged and the left costophrenic angle",
        (200, 300, 420, 510),
        S.TRUNCATED,
        flags=frozenset({F.FALLBACK_LAST_BOX}),
        n_think=1,
    ),
    Case("truncated_in_think_no_box", "<think>\nThe cardiac silhouette appears", None, S.TRUNCATED),
    Case(
        "boxes_only_in_think_answer_has_none",
        "<think>The left lung [300, 100, 560, 500] has an opacity.</think>\n"
        "<answer>The opacity is in the left lower lobe.</answer>",
        None,
        S.NO_BOX,
        n_think=1,
    ),
    Case(
        "boxes_only_in_think_no_answer",
        "<think>The right lung [50, 80, 300, 520] is clear; the left base [330, 300, 600, 530] is dense.</think>",
        (330, 300, 600, 530),
        S.NO_ANSWER_TAG,
        flags=frozenset({F.FALLBACK_LAST_BOX}),
        n_think=2,
    ),
    Case(
        "no_tags_plain_qwen_json",
        '```json\n[\n\t{"bbox_2d": [135, 114, 1016, 672], "label": "heart"}\n]\n```',
        (135, 114, 1016, 672),
        S.NO_ANSWER_TAG,
        flags=frozenset({F.FALLBACK_LAST_BOX}),
    ),
    Case(
        "qwen2vl_native_pair",
        "<|object_ref_start|>the heart<|object_ref_end|><|box_start|>(120,300),(400,600)<|box_end|><|im_end|>",
        (120, 300, 400, 600),
        S.NO_ANSWER_TAG,
        flags=frozenset({F.FALLBACK_LAST_BOX}),
    ),
    Case(
        "chain_of_box_three_think_boxes",
        "<think>The right lung [50, 80, 300, 520] is clear. The left lung [330, 70, 600, 530] shows a "
        "consolidation in the mid zone [380, 250, 540, 400].</think>\n"
        '<answer>{"bbox_2d": [380, 250, 540, 400], "label": "left midlung consolidation"}</answer>',
        (380, 250, 540, 400),
        S.OK,
        n_think=3,
    ),
    Case(
        "reversed_corners_reordered",
        THINK + '<answer>{"bbox_2d": [540, 400, 380, 250]}</answer>',
        (380, 250, 540, 400),
        S.OK,
        flags=frozenset({F.REORDERED}),
    ),
    Case("degenerate", THINK + '<answer>{"bbox_2d": [100, 200, 100, 300]}</answer>', None, S.DEGENERATE),
    Case("non_finite", THINK + '<answer>{"bbox_2d": [1e400, 2, 3, 4]}</answer>', None, S.NON_FINITE),
    Case(
        "out_of_range", THINK + '<answer>{"bbox_2d": [12345678901, 2, 3, 4]}</answer>', None, S.OUT_OF_RANGE
    ),
    Case(
        "wrong_dimension_2d_in_3d",
        THINK + '<answer>{"bbox_2d": [10, 20, 30, 40]}</answer>',
        None,
        S.WRONG_DIMENSION,
        ndim=3,
    ),
    Case(
        "wrong_dimension_3d_in_2d",
        THINK + '<answer>{"bbox_3d": [10, 20, 3, 30, 40, 9]}</answer>',
        None,
        S.WRONG_DIMENSION,
    ),
    Case(
        "3d_cob",
        "<think>The nodule sits in the right upper lobe [30, 20, 10, 52, 44, 17], near the fissure.</think>\n"
        '<answer>{"bbox_3d": [32, 22, 11, 50, 41, 16]}</answer>',
        (32, 22, 11, 50, 41, 16),
        S.OK,
        ndim=3,
        n_think=1,
    ),
    Case(
        "3d_fenced_list",
        '<think>Liver, segment VII.</think><answer>```json\n[{"bbox_3d": [10, 12, 4, 30, 33, 9], '
        '"label": "liver lesion"}]\n```</answer>',
        (10, 12, 4, 30, 33, 9),
        S.OK,
        ndim=3,
    ),
    Case(
        "3d_fractions_scaled",
        '<answer>{"bbox_3d": [0.25, 0.5, 0.125, 0.5, 0.75, 0.5]}</answer>',
        (16, 32, 4, 32, 48, 16),
        S.OK,
        ndim=3,
        flags=frozenset({F.SCALED_FRACTIONS}),
        kwargs={"grid_shape": (64, 64, 32)},
    ),
    Case(
        "3d_reversed_z",
        '<answer>{"bbox_3d": [10, 12, 9, 30, 33, 4]}</answer>',
        (10, 12, 4, 30, 33, 9),
        S.OK,
        ndim=3,
        flags=frozenset({F.REORDERED}),
    ),
    Case("garbage", "asdf qwerty !!! <<<>>> }{][ 12 ,, [x1, y1, x2, y2]", None, S.NO_ANSWER_TAG),
    Case("empty", "", None, S.EMPTY),
    Case("whitespace", "  \n\t ", None, S.EMPTY),
    Case(
        "arabic_indic_digits",
        THINK + '<answer>{"bbox_2d": [١٢, ٣٤, ٥٦, ٧٨]}</answer>',
        (12, 34, 56, 78),
        S.OK,
        flags=frozenset({F.UNICODE_DIGITS}),
    ),
    Case(
        "fullwidth_digit",
        THINK + '<answer>{"bbox_2d": [１２, 34, 56, 78]}</answer>',
        (12, 34, 56, 78),
        S.OK,
        flags=frozenset({F.UNICODE_DIGITS}),
    ),
    Case(
        "uppercase_tags",
        '<Think>Heart.</Think><Answer>{"bbox_2d": [1, 2, 3, 4]}</Answer>',
        (1, 2, 3, 4),
        S.OK,
    ),
    Case(
        "several_boxes_first_wins",
        THINK
        + '<answer>[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7, 8], "label": "b"}]</answer>',
        (1, 2, 3, 4),
        S.OK,
        flags=frozenset({F.SEVERAL_BOXES}),
    ),
    Case(
        "box_key_preferred",
        THINK + '<answer>{"reference": [1, 2, 3, 4], "bbox_2d": [10, 20, 30, 40]}</answer>',
        (10, 20, 30, 40),
        S.OK,
        flags=frozenset({F.SEVERAL_BOXES}),
    ),
    Case(
        "bare_numbers",
        THINK + "<answer>x1=10, y1=20, x2=30, y2=40</answer>",
        (10, 20, 30, 40),
        S.OK,
        flags=frozenset({F.BARE_NUMBERS}),
    ),
    Case(
        "missing_open_answer_tag",
        '<think>ok</think> {"bbox_2d": [10, 20, 30, 40]}</answer>',
        (10, 20, 30, 40),
        S.OK,
        flags=frozenset({F.MISSING_OPEN_TAG}),
    ),
    Case(
        "repetition_loop_capped",
        "<think>" + LOOP + '</think><answer>{"bbox_2d": [1, 2, 30, 40]}</answer>',
        (1, 2, 30, 40),
        S.OK,
        flags=frozenset({F.INPUT_CAPPED}),
    ),
    Case("no_finding", "<think>No abnormality is visible.</think><answer>None</answer>", None, S.NO_BOX),
    Case("echoed_placeholder", THINK + '<answer>{"bbox_2d": [x1, y1, x2, y2]}</answer>', None, S.NO_BOX),
    Case(
        "point_instead_of_box", THINK + '<answer>{"point_2d": [320, 240]}</answer>', None, S.WRONG_DIMENSION
    ),
]


def test_case_table_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_parse_table(case: Case) -> None:
    result = parse_completion(case.text, case.ndim, **case.kwargs)
    assert result.status is case.status, result.detail
    if case.box is None:
        assert result.box is None
    else:
        assert result.box == pytest.approx(case.box)
    assert case.flags <= result.flags, result.flags
    assert len(result.think_boxes) == case.n_think
    assert result.mode == "lenient"
    assert result.ok == (case.status is S.OK)
    assert (result.failure_reason is None) == (case.status is S.OK)


def test_parse_details() -> None:
    cob = next(c for c in CASES if c.id == "chain_of_box_three_think_boxes")
    result = parse_completion(cob.text, 2)
    assert result.think_boxes == ((50, 80, 300, 520), (330, 70, 600, 530), (380, 250, 540, 400))
    assert result.has_think and result.format_ok_strict
    wrong = parse_completion(THINK + '<answer>{"bbox_2d": [10, 20, 30, 40]}</answer>', 3)
    assert wrong.raw_numbers == (10, 20, 30, 40)
    reordered = parse_completion(THINK + '<answer>{"bbox_2d": [540, 400, 380, 250]}</answer>', 2)
    assert reordered.raw_numbers == (540, 400, 380, 250)
    # Unclosed <think> followed by an answer: the think box still counts, but there is no think section.
    unclosed = parse_completion('<think>heart [1, 2, 3, 4] <answer>{"bbox_2d": [5, 6, 7, 8]}</answer>', 2)
    assert unclosed.box == (5, 6, 7, 8) and unclosed.think_boxes == ((1, 2, 3, 4),) and not unclosed.has_think


def test_fraction_rule_needs_a_written_decimal() -> None:
    """[0, 0, 1, 1] written as integers is a 1-pixel box, not the whole image."""
    ints = parse_completion('<answer>{"bbox_2d": [0, 0, 1, 1]}</answer>', 2, grid_shape=(640, 480))
    assert ints.box == (0, 0, 1, 1) and F.SCALED_FRACTIONS not in ints.flags
    floats = parse_completion('<answer>{"bbox_2d": [0.0, 0.0, 1.0, 1.0]}</answer>', 2, grid_shape=(640, 480))
    assert floats.box == (0, 0, 640, 480)


def test_parse_argument_errors() -> None:
    with pytest.raises(ConfigError, match="ndim"):
        parse_completion("x", 4)
    with pytest.raises(ConfigError, match="mode"):
        parse_completion("x", 2, mode="loose")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="grid_shape"):
        parse_completion("x", 2, codec=NormalizedCodec())
    with pytest.raises(ConfigError, match="ndim"):
        parse_completion("x", 3, grid_shape=(10, 10))
    with pytest.raises(ConfigError, match="positive"):
        parse_completion("x", 2, grid_shape=(10, 0))


def test_non_string_input_is_empty() -> None:
    assert parse_completion(None, 2).status is S.EMPTY  # type: ignore[arg-type]
    assert parse_completion(None, 3, mode="strict").box == (0.0,) * 6  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------
# Strict mode: the MedGround-R1 evaluation rule and the format-reward rule
# ------------------------------------------------------------------------------------------------------

# The published rules as regexes (facts of the protocol), used here only as the oracle.
ANSWER_RE = r"<answer>(.*?)</answer>"
EVAL_BOX_RE = {
    2: r"\{.*\[(\d+),\s*(\d+),\s*(\d+),\s*(\d+)]\s*.*\}",
    3: r"\{.*\[(\d+),\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+)]\s*.*\}",
}
FORMAT_RE = {
    2: r"<think>.*?</think>\s*<answer>.*?\{.*\[\d+,\s*\d+,\s*\d+,\s*\d+\].*\}.*?</answer>",
    3: r"<think>.*?</think>\s*<answer>.*?\{.*\[\d+,\s*\d+,\s*\d+,\s*\d+,\s*\d+,\s*\d+\].*\}.*?</answer>",
}


def oracle_eval(text: str, ndim: int) -> list[int]:
    answer = re.search(ANSWER_RE, text, re.DOTALL)
    if answer:
        box = re.search(EVAL_BOX_RE[ndim], answer.group(1).strip(), re.DOTALL)
        if box:
            return [int(g) for g in box.groups()]
    return [0] * (2 * ndim)


STRICT_CASES = [
    # (text, ndim, expected box, status)
    (
        THINK + '<answer>{"bbox_2d": [249, 308, 567, 531], "label": "x"}</answer>',
        2,
        (249, 308, 567, 531),
        S.OK,
    ),
    (THINK + "<answer>[370, 259, 537, 554]</answer>", 2, (0, 0, 0, 0), S.NO_BOX),  # no {…} around the list
    (THINK + '<answer>{"bbox_2d": [12.5, 40, 200, 310]}</answer>', 2, (0, 0, 0, 0), S.NO_BOX),  # float
    (THINK + '<answer>{"bbox_2d": [-5, 10, 120, 200]}</answer>', 2, (0, 0, 0, 0), S.NO_BOX),  # negative
    (THINK + '<answer>{"bbox_2d": [ 12, 40, 200, 310]}</answer>', 2, (0, 0, 0, 0), S.NO_BOX),  # space after [
    (
        THINK + '<answer>{"bbox_2d": [12 , 40, 200, 310]}</answer>',
        2,
        (0, 0, 0, 0),
        S.NO_BOX,
    ),  # space before ,
    # Two answers: the first one counts (lenient takes the last).
    ('<answer>{"b": [1, 2, 3, 4]}</answer><answer>{"b": [5, 6, 7, 8]}</answer>', 2, (1, 2, 3, 4), S.OK),
    # Several lists inside the braces: the greedy regex takes the last one.
    ('<answer>[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7, 8]}]</answer>', 2, (5, 6, 7, 8), S.OK),
    ('<answer>[1, 2, 3, 4] {"label": "x"}</answer>', 2, (0, 0, 0, 0), S.NO_BOX),  # list before the {
    ('<answer>{"label": "x"} [1, 2, 3, 4]</answer>', 2, (0, 0, 0, 0), S.NO_BOX),  # no } after the list
    ('<answer>{"label": "x"} [1, 2, 3, 4] }</answer>', 2, (1, 2, 3, 4), S.OK),
    ('<Answer>{"bbox_2d": [1, 2, 3, 4]}</Answer>', 2, (0, 0, 0, 0), S.NO_ANSWER_TAG),  # case-sensitive
    ('<answer>{"bbox_2d": [1, 2, 3, 4]}', 2, (0, 0, 0, 0), S.TRUNCATED),
    ('<think>[1, 2, 3, 4]</think>{"b": [1, 2, 3, 4]}', 2, (0, 0, 0, 0), S.NO_ANSWER_TAG),
    ('<answer>{"bbox_2d": [١٢, 3, 4, 5]}</answer>', 2, (12, 3, 4, 5), S.OK),  # Python's \d and int()
    ('<answer>{"bbox_3d": [1, 2, 3, 4, 5, 6]}</answer>', 3, (1, 2, 3, 4, 5, 6), S.OK),
    ('<answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', 3, (0,) * 6, S.NO_BOX),
    ('<answer>{"bbox_3d": [1, 2, 3, 4, 5, 6]}</answer>', 2, (0, 0, 0, 0), S.NO_BOX),
    ("", 2, (0, 0, 0, 0), S.EMPTY),
]


@pytest.mark.parametrize(("text", "ndim", "box", "status"), STRICT_CASES)
def test_strict_rules(text: str, ndim: int, box: tuple[int, ...], status: ParseStatus) -> None:
    result = parse_completion(text, ndim, mode="strict")
    assert result.box == box
    assert result.status is status
    assert result.mode == "strict"
    if text:
        assert list(result.box) == oracle_eval(text, ndim)


def test_strict_huge_integers_fail_cleanly() -> None:
    too_many_digits = "<answer>{[" + "9" * 5000 + ", 1, 2, 3]}</answer>"
    result = parse_completion(too_many_digits, 2, mode="strict")
    assert result.box == (0, 0, 0, 0) and result.status is S.NON_FINITE
    too_large = "<answer>{[" + "9" * 400 + ", 1, 2, 3]}</answer>"
    result = parse_completion(too_large, 2, mode="strict")
    assert result.box == (0, 0, 0, 0) and result.status is S.NON_FINITE


def test_strict_with_codec_decodes() -> None:
    result = parse_completion(
        '<answer>{"bbox_2d": [100, 250, 500, 750]}</answer>',
        2,
        mode="strict",
        codec=NormalizedCodec(),
        grid_shape=(640, 480),
    )
    assert result.box == pytest.approx((64, 120, 320, 360)) and result.raw_numbers == (100, 250, 500, 750)


FORMAT_CASES = [
    ('<think>a</think>\n<answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', 2, True),
    ('<think></think><answer>{"bbox_2d": [1,2,3,4]}</answer>', 2, True),
    ('<think>a</think> <answer>\n[{"bbox_2d": [1, 2, 3, 4], "label": "x"}]\n</answer>', 2, True),
    (' <think>a</think><answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', 2, False),  # leading space
    ('<think>a</think><answer>{"bbox_2d": [1, 2, 3, 4]}</answer>\n', 2, False),  # trailing newline
    ('<think>a</think> so <answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', 2, False),  # text between
    ("<think>a</think><answer>[1, 2, 3, 4]</answer>", 2, False),  # no braces
    ('<think>a</think><answer>{"bbox_2d": [1.5, 2, 3, 4]}</answer>', 2, False),
    ('<answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', 2, False),  # no think
    ('<think>a</think><answer>{"bbox_3d": [1, 2, 3, 4, 5, 6]}</answer>', 3, True),
    ('<think>a</think><answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', 3, False),
    ('<think>x</think><think>y</think>\n<answer>{"b": [1, 2, 3, 4]}</answer>', 2, True),  # .*? spans tags
]


@pytest.mark.parametrize(("text", "ndim", "expected"), FORMAT_CASES)
def test_strict_format_rule(text: str, ndim: int, expected: bool) -> None:
    assert strict_format_ok(text, ndim) is expected
    assert bool(re.fullmatch(FORMAT_RE[ndim], text, re.DOTALL)) is expected
    assert parse_completion(text, ndim).format_ok_strict is expected


# Random texts made of the pieces these rules care about; short, so the oracle regexes stay fast.
PIECES = st.sampled_from(
    [
        "<think>",
        "</think>",
        "<answer>",
        "</answer>",
        "{",
        "}",
        "[",
        "]",
        "1",
        "23",
        "٤",
        ",",
        ", ",
        " ",
        "\n",
        "x",
        "-",
        ".5",
        "[1, 2, 3, 4]",
        "[5,6,7,8,9,10]",
        '{"bbox_2d": [1, 2, 3, 4]}',
    ]
)
PIECE_TEXT = st.lists(PIECES, max_size=24).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=PIECE_TEXT, ndim=st.sampled_from([2, 3]))
def test_strict_matches_the_published_regexes(text: str, ndim: int) -> None:
    result = parse_completion(text, ndim, mode="strict")
    assert list(result.box) == oracle_eval(text, ndim)
    assert strict_format_ok(text, ndim) is bool(re.fullmatch(FORMAT_RE[ndim], text, re.DOTALL))


# ------------------------------------------------------------------------------------------------------
# Fuzz: never raises, linear time
# ------------------------------------------------------------------------------------------------------

NUMBERS = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["1e999", "-1e999", "nan", "inf", "9" * 400, "0.5", "1.", ".5", "٣", "１"]),
)
FUZZ_PIECES = st.one_of(
    PIECES,
    NUMBERS,
    st.text(max_size=20),
    st.sampled_from(
        ["<THINK>", "<Answer>", "</ANSWER>", "```json", "```", "(", ")", ":", '"bbox_2d": ', "\u0130"]
    ),
)
FUZZ_TEXT = st.lists(FUZZ_PIECES, max_size=60).map("".join)


def _assert_well_formed(result: Any, ndim: int) -> None:
    if result.box is not None:
        assert len(result.box) == 2 * ndim
        assert all(math.isfinite(v) for v in result.box)
    for box in result.think_boxes:
        assert len(box) == 2 * ndim and all(math.isfinite(v) for v in box)
    assert isinstance(result.status, ParseStatus)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=FUZZ_TEXT,
    ndim=st.sampled_from([2, 3]),
    mode=st.sampled_from(["lenient", "strict"]),
    use_codec=st.booleans(),
)
def test_fuzz_never_raises(text: str, ndim: int, mode: str, use_codec: bool) -> None:
    grid = (640, 480, 32)[:ndim]
    kwargs: dict[str, Any] = {"codec": NormalizedCodec(), "grid_shape": grid} if use_codec else {}
    result = parse_completion(text, ndim, mode=mode, **kwargs)  # type: ignore[arg-type]
    _assert_well_formed(result, ndim)
    if mode == "strict":
        assert result.box is not None


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300), ndim=st.sampled_from([2, 3]))
def test_fuzz_unicode_text(text: str, ndim: int) -> None:
    for mode in ("lenient", "strict"):
        _assert_well_formed(parse_completion(text, ndim, mode=mode), ndim)  # type: ignore[arg-type]


@settings(max_examples=15, deadline=None)
@given(piece=FUZZ_PIECES.filter(bool), ndim=st.sampled_from([2, 3]))
def test_fuzz_100k_chars(piece: str, ndim: int) -> None:
    text = (piece * (100_000 // len(piece) + 1))[:100_000]
    for mode in ("lenient", "strict"):
        _assert_well_formed(parse_completion(text, ndim, mode=mode), ndim)  # type: ignore[arg-type]


ADVERSARIAL = {
    "brackets": "[" * 100_000,
    "braces_then_list": "<answer>" + "{" * 50_000 + "[1, 2, 3, 4" + "]" * 49_980 + "</answer>",
    "open_answers": "<answer>" * 12_500,
    "digits": "<answer>{[" + "1" * 100_000,
    "spaces_in_pair": "(1," + " " * 100_000 + "2)",
    "spaces_in_list": "[1," + " " * 100_000 + "2",
    "unclosed_lists": "[1, 2, 3, " * 10_000,
    "think_bridges": "<think>" + "</think>" + " " * 100_000 + "<answe",
    "many_boxes": "<think>" + "[1, 2, 3, 4] " * 8_000 + "</think>",
    "nested_tags": "<think><answer><think><answer>{[1, 2, 3, 4]}" * 2_000,
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_inputs_are_fast(name: str) -> None:
    text = ADVERSARIAL[name]
    start = time.perf_counter()
    for ndim in (2, 3):
        for mode in ("lenient", "strict"):
            _assert_well_formed(parse_completion(text, ndim, mode=mode), ndim)  # type: ignore[arg-type]
        strict_format_ok(text, ndim)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"{name}: {elapsed:.2f} s for 4 parses + 2 format checks"


def test_capped_input_only_scans_the_tail() -> None:
    head = '<answer>{"bbox_2d": [1, 2, 3, 4]}</answer>'
    text = head + "x" * MAX_SCAN_CHARS
    result = parse_completion(text, 2)
    assert result.box is None and F.INPUT_CAPPED in result.flags
    # Strict mode reads the whole text, as the original rule does.
    assert parse_completion(text, 2, mode="strict").box == (1, 2, 3, 4)


# ------------------------------------------------------------------------------------------------------
# Codecs
# ------------------------------------------------------------------------------------------------------


def test_codec_hand_values() -> None:
    absolute = AbsolutePixelCodec()
    assert absolute.encode([10.4, 10.5, 20.5, 30.6], (100, 100)) == (10, 11, 21, 31)
    assert absolute.encode([-3, 5, 120, 50], (100, 100)) == (0, 5, 100, 50)
    assert absolute.encode([1.2, 2.5, 3.49, 4.5, 5.5, 40], (10, 10, 32)) == (1, 3, 3, 5, 6, 32)
    assert absolute.decode([1, 2, 3, 4], (10, 10)) == (1.0, 2.0, 3.0, 4.0)
    normal = NormalizedCodec()
    assert normal.encode([64, 120, 320, 360], (640, 480)) == (100, 250, 500, 750)
    assert normal.decode([100, 250, 500, 750], (640, 480)) == pytest.approx((64, 120, 320, 360))
    assert normal.encode([0, 0, 0, 700, 700, 40], (640, 480, 32)) == (0, 0, 0, 1000, 1000, 1000)
    assert normal.step((640, 480)) == (0.64, 0.48)
    assert absolute.step((640, 480, 32)) == (1.0, 1.0, 1.0)


def test_codec_registry_and_errors() -> None:
    assert isinstance(get_codec("qwen2.5-vl"), AbsolutePixelCodec)
    assert isinstance(get_codec("Qwen2_5_VL"), AbsolutePixelCodec)
    assert get_codec("qwen2-vl") == NormalizedCodec(scale=1000)
    assert isinstance(get_codec("qwen2_vl"), NormalizedCodec)
    with pytest.raises(ConfigError, match="known"):
        get_codec("llava")
    with pytest.raises(ConfigError):
        NormalizedCodec(scale=0)
    codec = AbsolutePixelCodec()
    with pytest.raises(BoxError, match="4 numbers"):
        codec.encode([1, 2, 3, 4], (10, 10, 10))
    with pytest.raises(BoxError, match="inverted on axis y"):
        codec.encode([1, 5, 3, 4], (10, 10))
    with pytest.raises(BoxError, match="non-finite"):
        codec.encode([1, 2, math.inf, 4], (10, 10))
    with pytest.raises(BoxError, match="positive integers"):
        codec.decode([1, 2, 3, 4], (10, 0))
    with pytest.raises(BoxError, match=r"2 .* or 3"):
        codec.decode([1, 2], (10,))


@st.composite
def grid_and_box(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[float, ...]]:
    ndim = draw(st.sampled_from([2, 3]))
    grid = tuple(draw(st.integers(1, 2048)) for _ in range(ndim))
    lo, hi = [], []
    for size in grid:
        a = draw(st.floats(0, size, allow_nan=False))
        b = draw(st.floats(0, size, allow_nan=False))
        lo.append(min(a, b))
        hi.append(max(a, b))
    return grid, tuple(lo + hi)


@settings(max_examples=150, deadline=None)
@given(data=grid_and_box(), name=st.sampled_from(["qwen2.5-vl", "qwen2-vl"]))
def test_codec_round_trip_within_half_a_step(
    data: tuple[tuple[int, ...], tuple[float, ...]], name: str
) -> None:
    grid, box = data
    codec = get_codec(name)
    encoded = codec.encode(box, grid)
    assert all(isinstance(v, int) for v in encoded)
    decoded = codec.decode(encoded, grid)
    steps = codec.step(grid)
    n = len(grid)
    for i, (original, back) in enumerate(zip(box, decoded)):
        assert abs(back - original) <= steps[i % n] / 2 + 1e-9 * grid[i % n]
        assert 0 <= back <= grid[i % n]


@settings(max_examples=150, deadline=None)
@given(data=st.data(), name=st.sampled_from(["qwen2.5-vl", "qwen2-vl"]), ndim=st.sampled_from([2, 3]))
def test_codec_text_round_trip_is_exact(data: st.DataObject, name: str, ndim: int) -> None:
    """Integers the model writes → text grid → the same integers."""
    codec = get_codec(name)
    grid = tuple(data.draw(st.integers(1, 2048)) for _ in range(ndim))
    top = [1000] * ndim if isinstance(codec, NormalizedCodec) else list(grid)
    lo = [data.draw(st.integers(0, top[a])) for a in range(ndim)]
    hi = [data.draw(st.integers(lo[a], top[a])) for a in range(ndim)]
    written = tuple(lo + hi)
    assert codec.encode(codec.decode(written, grid), grid) == written


@settings(max_examples=150, deadline=None)
@given(data=st.data(), ndim=st.sampled_from([2, 3]))
def test_normalised_codec_exact_on_integer_boxes_when_grid_is_coarser(data: st.DataObject, ndim: int) -> None:
    codec = NormalizedCodec()
    grid = tuple(data.draw(st.integers(1, 1000)) for _ in range(ndim))
    lo = [data.draw(st.integers(0, s)) for s in grid]
    hi = [data.draw(st.integers(lo[a], grid[a])) for a, s in enumerate(grid)]
    box = tuple(lo + hi)
    back = codec.decode(codec.encode(box, grid), grid)
    assert tuple(math.floor(v + 0.5) for v in back) == box


@settings(max_examples=100, deadline=None)
@given(
    data=grid_and_box(),
    name=st.sampled_from(["qwen2.5-vl", "qwen2-vl"]),
    tpl=st.sampled_from(["r1", "plain"]),
)
def test_completion_round_trip_through_the_parser(
    data: tuple[tuple[int, ...], tuple[float, ...]], name: str, tpl: str
) -> None:
    """Text-grid box → codec → completion text → parser → text-grid box, exact up to the codec's step."""
    grid, box = data
    ndim = len(grid)
    codec = get_codec(name)
    encoded = codec.encode(box, grid)
    text = format_completion(encoded, ndim, template=tpl, reasoning="looking", label="lesion")
    result = parse_completion(text, ndim, codec=codec, grid_shape=grid)
    steps = codec.step(grid)
    if any(encoded[a] == encoded[a + ndim] for a in range(ndim)):
        assert result.status is S.DEGENERATE  # a box thinner than one step rounds to zero extent
        return
    assert result.status is S.OK and result.box is not None
    for i, (original, back) in enumerate(zip(box, result.box)):
        assert abs(back - original) <= steps[i % ndim] / 2 + 1e-9 * grid[i % ndim]
    assert result.format_ok_strict is (tpl == "r1")
    strict = parse_completion(text, ndim, mode="strict", codec=codec, grid_shape=grid)
    assert strict.box == pytest.approx(result.box)


# ------------------------------------------------------------------------------------------------------
# Templates and messages
# ------------------------------------------------------------------------------------------------------


def test_template_registry() -> None:
    assert get_template("r1").think and not get_template("r1").chain_of_box
    assert get_template("chain_of_box").chain_of_box
    assert not get_template("plain").think
    assert get_template(get_template("r1")) is get_template("r1")
    with pytest.raises(ConfigError, match="known"):
        get_template("cot")


def test_r1_instruction_2d() -> None:
    text = build_instruction("small left apical pneumothorax", 2, template="r1")
    question = QUESTION_TEMPLATE.format(phrase="small left apical pneumothorax")
    assert text.startswith(question + " ")
    assert "<think> </think>" in text and "<answer> </answer>" in text
    assert '{"bbox_2d": [x1, y1, x2, y2]}' in text
    assert "Coordinates" not in text  # 2D absolute: the MedGround-R1 prompt has no coordinate note
    assert "bounding box right after it" not in text


def test_chain_of_box_wording_2d_and_3d() -> None:
    two = build_instruction("consolidation", 2, template="chain_of_box")
    three = build_instruction("nodule", 3, template="chain_of_box")
    assert "as [x1, y1, x2, y2]." in two
    assert "as [x1, y1, z1, x2, y2, z2]." in three
    assert '{"bbox_3d": [x1, y1, z1, x2, y2, z2]}' in three
    assert "z is the slice index" in three
    # Order as in MedGround-R1 Fig. 1: tags, then Chain-of-Box, then the JSON sentence.
    assert two.index("<answer> </answer>") < two.index("step by step") < two.index("as JSON")


def test_plain_template() -> None:
    text = build_instruction("heart", 2, template="plain")
    assert "<think>" not in text and "<answer> </answer>" in text
    completion = format_completion([1, 2, 3, 4], 2, template="plain")
    assert completion == '<answer>{"bbox_2d": [1, 2, 3, 4]}</answer>'
    assert parse_completion(completion, 2).status is S.OK


def test_phrase_cleaning_and_errors() -> None:
    text = build_instruction("  Left  pneumothorax is small. ", 2)
    assert "describes: Left pneumothorax is small. " in text and ".." not in text
    with pytest.raises(DataError, match="case-7"):
        build_instruction("   ", 2, record_id="case-7")
    with pytest.raises(ConfigError, match="ndim"):
        build_instruction("x", 1)
    with pytest.raises(ConfigError, match="depth"):
        build_instruction("x", 3, depth=0)


def test_laterality_hints() -> None:
    cxr = laterality_hint("cxr", 2)
    assert "patient's left side appears on the right of the image" in cxr
    ct = laterality_hint("ct", 3, z_direction="inferior")
    assert (
        "radiological convention" in ct
        and "anterior is at the top" in ct
        and "toward the patient's feet" in ct
    )
    assert "toward the patient's head" in laterality_hint("ct", 3, z_direction="superior")
    assert "slice index" not in laterality_hint("ct", 2)
    with pytest.raises(ConfigError, match="z_direction"):
        laterality_hint("ct", 3)
    with pytest.raises(ConfigError, match="cxr"):
        laterality_hint("mri", 2)  # type: ignore[arg-type]
    text = build_instruction("left effusion", 2, laterality="cxr")
    assert text.index("describes") < text.index("radiograph") < text.index("<think>")


def test_coordinate_notes() -> None:
    assert "0 to 1000" in build_instruction("heart", 2, codec=NormalizedCodec())
    assert "Coordinates" in build_instruction("heart", 2, coordinate_note=True)
    assert "Coordinates" not in build_instruction("nodule", 3, coordinate_note=False)
    assert "through the slices" in build_instruction("nodule", 3, codec=NormalizedCodec())


def test_messages_for_each_strategy() -> None:
    image = build_messages("heart", 2)
    assert image == [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": build_instruction("heart", 2)}],
        }
    ]
    video = build_messages("nodule", 3, depth=32)
    assert [p["type"] for p in video[0]["content"]] == ["video", "text"]
    assert "(32 slices)" in video[0]["content"][1]["text"]
    slices = build_messages("nodule", 3, visual="slices", slice_indices=[4, 9, 14])
    parts = slices[0]["content"]
    assert [p["type"] for p in parts] == ["text", "image", "text", "image", "text", "image", "text"]
    assert [p["text"] for p in parts[:-1] if p["type"] == "text"] == [
        "Slice 4: ",
        "\nSlice 9: ",
        "\nSlice 14: ",
    ]
    assert "preceded by its slice index" in parts[-1]["text"]
    montage = build_messages("nodule", 3, visual="montage", slice_indices=[0, 8])
    assert [p["type"] for p in montage[0]["content"]] == ["image", "text"]
    assert "slices 0, 8" in montage[0]["content"][1]["text"]
    system = build_messages("heart", 2, system_prompt="You are a radiologist.")
    assert system[0] == {"role": "system", "content": [{"type": "text", "text": "You are a radiologist."}]}


def test_messages_errors() -> None:
    with pytest.raises(ConfigError, match="slice_indices"):
        build_messages("nodule", 3, visual="slices")
    with pytest.raises(ConfigError, match="does not fit ndim=2"):
        build_messages("heart", 2, visual="video")
    with pytest.raises(ConfigError, match="does not fit ndim=3"):
        build_messages("heart", 3, visual="image")
    with pytest.raises(ConfigError, match="repeat"):
        build_messages("nodule", 3, visual="slices", slice_indices=[1, 1])
    with pytest.raises(ConfigError, match="non-negative"):
        build_messages("nodule", 3, visual="slices", slice_indices=[-1])
    with pytest.raises(ConfigError, match="only used"):
        build_messages("nodule", 3, visual="video", slice_indices=[1])


def test_format_answer() -> None:
    assert format_answer([1, 2, 3, 4], 2) == '{"bbox_2d": [1, 2, 3, 4]}'
    assert (
        format_answer([1.0, 2, 3, 4, 5, 6], 3, label="nodule")
        == '{"bbox_3d": [1, 2, 3, 4, 5, 6], "label": "nodule"}'
    )
    with pytest.raises(BoxError, match="expected 6"):
        format_answer([1, 2, 3, 4], 3)
    with pytest.raises(BoxError, match="non-finite"):
        format_answer([1, 2, math.nan, 4], 2)


# ------------------------------------------------------------------------------------------------------
# Offline tokenizer and the Qwen2-VL style chat template
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_byte_level_tokenizer()


def test_tokenizer_vocabulary(tokenizer: Any) -> None:
    assert len(tokenizer) == 256 + len(QWEN_SPECIAL_TOKENS) == 270
    for token in QWEN_SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    text = 'Box: [12, 34, 5] – Lésion ✓ {"bbox_3d": [1, 2, 3, 4, 5, 6]}'
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_extra_tokens_survive_skip_special_tokens() -> None:
    tok = build_byte_level_tokenizer(extra_tokens=("<think>", "</think>", "<answer>", "</answer>"))
    assert len(tok) == 274
    ids = tok("<answer>[1]</answer><|im_end|>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6  # <answer> [ 1 ] </answer> <|im_end|>
    assert tok.decode(ids, skip_special_tokens=True) == "<answer>[1]</answer>"
    with pytest.raises(ConfigError, match="twice"):
        build_byte_level_tokenizer(extra_tokens=("<|im_end|>",))


def test_render_image_prompt_exactly(tokenizer: Any) -> None:
    messages = build_messages("enlarged cardiac silhouette", 2)
    rendered = render_prompt(tokenizer, messages)
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        + build_instruction("enlarged cardiac silhouette", 2)
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert rendered == expected
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 1
    assert tokenizer.decode(ids) == rendered


def test_render_video_slices_and_system(tokenizer: Any) -> None:
    video = render_prompt(tokenizer, build_messages("nodule", 3, template="chain_of_box"))
    assert "<|vision_start|><|video_pad|><|vision_end|>" in video and "<|image_pad|>" not in video
    slices = render_prompt(tokenizer, build_messages("nodule", 3, visual="slices", slice_indices=[3, 7]))
    assert "user\nSlice 3: <|vision_start|><|image_pad|><|vision_end|>\nSlice 7: <|vision_start|>" in slices
    assert slices.count("<|image_pad|>") == 2 and slices.endswith("<|im_end|>\n<|im_start|>assistant\n")
    custom = render_prompt(tokenizer, build_messages("heart", 2, system_prompt="Be brief."))
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert "helpful assistant" not in custom


def test_render_multi_turn_with_assistant_target(tokenizer: Any) -> None:
    messages = [
        *build_messages("heart", 2, template="plain"),
        {"role": "assistant", "content": "<answer>x</answer>"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert text.endswith("<|im_start|>assistant\n<answer>x</answer><|im_end|>\n")


def test_render_prompt_errors(tokenizer: Any) -> None:
    with pytest.raises(ConfigError, match="apply_chat_template"):
        render_prompt(object(), [])
    tok = build_byte_level_tokenizer()
    tok.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        render_prompt(tok, build_messages("heart", 2))


def test_tokenizer_save_and_reload(tmp_path: Any, tokenizer: Any) -> None:
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == QWEN2_VL_CHAT_TEMPLATE
    messages = build_messages("heart", 2)
    assert render_prompt(loaded, messages) == render_prompt(tokenizer, messages)
    text = render_prompt(tokenizer, messages)
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_terse_template_round_trip() -> None:
    """The tiny-model template: a short question and a bare list that the lenient parser reads back."""
    assert build_instruction("the lesion", 3, template="terse") == "Find the lesion."
    assert build_instruction("Where is the lesion?", 3, template="terse") == "Where is the lesion?"
    completion = format_completion([3, 4, 1, 10, 12, 5], 3, template="terse")
    assert completion == "<answer>[3,4,1,10,12,5]</answer>"
    parsed = parse_completion(completion, 3)
    assert parsed.ok and parsed.box == (3, 4, 1, 10, 12, 5)
