"""Prompts for grounding and reading their answers back, in the *text frame* of DESIGN.md §2.

* :mod:`~mg3d.prompts.codecs` — how a model family writes a box (Qwen2.5-VL pixels, Qwen2-VL 0–1000);
* :mod:`~mg3d.prompts.templates` — R1, Chain-of-Box, plain and terse templates; chat messages;
* :mod:`~mg3d.prompts.parser` — ``parse_completion`` (lenient, and MedGround-R1's strict rule);
* :mod:`~mg3d.prompts.answers` — ``read_answer``: completion → box in the text grid → box in a frame's source
  grid, the one path training, evaluation and inference share.
"""

from mg3d.prompts.answers import Answer, read_answer, read_answer_boxes, usable_box
from mg3d.prompts.codecs import AbsolutePixelCodec, BoxCodec, NormalizedCodec, get_codec
from mg3d.prompts.parser import (
    MAX_ABS_COORDINATE,
    MAX_ANSWER_BOXES,
    MAX_SCAN_CHARS,
    ParsedCompletion,
    ParseFlag,
    ParseMode,
    ParseStatus,
    parse_answer_boxes,
    parse_completion,
    strict_format_ok,
)
from mg3d.prompts.templates import (
    QUESTION_TEMPLATE,
    REASONING_MAX_NEW_TOKENS,
    PromptTemplate,
    build_instruction,
    build_messages,
    check_warm_start_options,
    default_max_new_tokens,
    format_answer,
    format_completion,
    get_template,
    laterality_hint,
    render_prompt,
)

__all__ = [
    "MAX_ABS_COORDINATE",
    "MAX_ANSWER_BOXES",
    "MAX_SCAN_CHARS",
    "QUESTION_TEMPLATE",
    "REASONING_MAX_NEW_TOKENS",
    "AbsolutePixelCodec",
    "Answer",
    "BoxCodec",
    "NormalizedCodec",
    "ParseFlag",
    "ParseMode",
    "ParseStatus",
    "ParsedCompletion",
    "PromptTemplate",
    "build_instruction",
    "build_messages",
    "check_warm_start_options",
    "default_max_new_tokens",
    "format_answer",
    "format_completion",
    "get_codec",
    "get_template",
    "laterality_hint",
    "parse_answer_boxes",
    "parse_completion",
    "read_answer",
    "read_answer_boxes",
    "render_prompt",
    "strict_format_ok",
    "usable_box",
]
