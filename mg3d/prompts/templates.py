"""Prompt templates and chat messages: R1 (``<think>`` then ``<answer>``), Chain-of-Box, plain and terse.

The Chain-of-Box template appends boxes of regions of interest inside ``<think>`` (2D or 3D wording); the plain
template asks for the answer only (supervised warm starts); laterality hints and one message layout per visual
strategy. The instruction sentences are our own wording. The question sentence is the MedGround-R1 / VLM-R1
one (a short factual prompt), kept because the strict evaluation protocol was defined with it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mg3d.errors import BoxError, ConfigError, DataError
from mg3d.prompts.codecs import AbsolutePixelCodec, BoxCodec, _check_ndim


def check_warm_start_options(
    instruction: object, warm_start_reasoning: object, trail_grid: object, *, prefix: str = ""
) -> tuple[int, ...]:
    """Check the prompt's instruction / warm-start reasoning / trail grid choices; return the grid as a tuple.

    One check for :class:`mg3d.grounding.PromptConfig` (``prefix="prompt."``, after it has read command-line
    forms) and :class:`mg3d.grounding.GroundingPrompter`, so the two cannot drift apart.
    """
    if instruction not in ("template", "terse"):
        raise ConfigError(f"{prefix}instruction must be 'template' or 'terse', got {instruction!r}")
    if warm_start_reasoning not in ("empty", "coarse_box"):
        raise ConfigError(
            f"{prefix}warm_start_reasoning must be 'empty' or 'coarse_box', got {warm_start_reasoning!r}"
        )
    try:
        grid = tuple(trail_grid)  # type: ignore[call-overload]
    except TypeError:
        grid = ()
    if len(grid) not in (2, 3) or any(isinstance(g, bool) or not isinstance(g, int) or g <= 0 for g in grid):
        raise ConfigError(
            f"{prefix}trail_grid must be 2 or 3 positive integers (x, y[, z] cell sizes), got {trail_grid!r}"
        )
    return grid


VisualStrategy = Literal["image", "video", "slices", "montage"]


#: The MedGround-R1 / VLM-R1 grounding question (kept verbatim: the strict evaluation protocol uses it).
QUESTION_TEMPLATE = (
    "Please provide the bounding box coordinate of the region this sentence describes: {phrase}."
)

_THINK_SENTENCE = (
    "Reason about the question inside <think> </think> tags first, then put your final answer inside "
    "<answer> </answer> tags."
)
_COB_SENTENCE = (
    "In the <think> section, work step by step, and each time you name a region of interest, write its "
    "bounding box right after it as {fmt}."
)
_JSON_SENTENCE = "Give the final answer as JSON: {example}."
_PLAIN_SENTENCE = "Reply with the answer only, inside <answer> </answer> tags, as JSON: {example}."
_BOX_LETTERS = {2: "[x1, y1, x2, y2]", 3: "[x1, y1, z1, x2, y2, z2]"}


@dataclass(frozen=True)
class PromptTemplate:
    """What a template asks of the model; the wording is assembled by :func:`build_instruction`."""

    name: str
    think: bool  # ask for <think> … </think> before <answer>
    chain_of_box: bool  # ask for boxes of regions of interest inside <think>
    description: str
    # Terse: "Find {phrase}." and a bare-list answer "<answer>[x1, …]</answer>". For tiny byte-level models
    # (one token per character), where a 300-character instruction would dominate the step time.
    terse: bool = False


_TEMPLATES: dict[str, PromptTemplate] = {
    "r1": PromptTemplate("r1", think=True, chain_of_box=False, description="<think> then <answer> with JSON"),
    "chain_of_box": PromptTemplate(
        "chain_of_box", think=True, chain_of_box=True, description="R1 plus boxes of regions inside <think>"
    ),
    "plain": PromptTemplate("plain", think=False, chain_of_box=False, description="answer only (SFT)"),
    "terse": PromptTemplate(
        "terse",
        think=False,
        chain_of_box=False,
        description="'Find {phrase}.' and a bare list (tiny demo)",
        terse=True,
    ),
}


#: Default generation budget of a template that asks for reasoning (the paper configs' 256). An empty
#: ``<think></think>`` plus the answer already costs 34 (2D) / 40 (3D) tokens of Qwen's tokenizer, so the
#: answer-only default (:data:`mg3d.generation.DEFAULT_MAX_NEW_TOKENS`, 48) would cut any reasoning.
REASONING_MAX_NEW_TOKENS = 256


def default_max_new_tokens(template: str | PromptTemplate) -> int:
    """Generation budget that fits ``template``: room to reason for ``<think>`` templates, else the answer's."""
    from mg3d.generation.config import (
        DEFAULT_MAX_NEW_TOKENS,  # policy layer; imported late to keep prompts light
    )

    return REASONING_MAX_NEW_TOKENS if get_template(template).think else DEFAULT_MAX_NEW_TOKENS


def get_template(name: str | PromptTemplate) -> PromptTemplate:
    """Template by name (``"r1"``, ``"chain_of_box"``, ``"plain"``, ``"terse"``); an instance is returned as is."""
    if isinstance(name, PromptTemplate):
        return name
    template = _TEMPLATES.get(str(name).strip().lower())
    if template is None:
        raise ConfigError(f"unknown prompt template {name!r}; known: {sorted(_TEMPLATES)}")
    return template


def laterality_hint(
    modality: Literal["cxr", "ct"], ndim: int, *, z_direction: Literal["superior", "inferior"] | None = None
) -> str:
    """Tell the model how the image is displayed, so that "left" in a phrase means the patient's left.

    ``z_direction`` (3D CT only) says toward which end of the patient the slice index increases.
    """
    kind = str(modality).lower()
    if kind == "cxr":
        return "The radiograph is displayed as it is read: the patient's left side appears on the right of the image."
    if kind != "ct":
        raise ConfigError(f"laterality hint {modality!r} is not one of 'cxr', 'ct'")
    text = (
        "The axial slices are displayed in radiological convention: the patient's left is on the right of the "
        "image and anterior is at the top"
    )
    if ndim == 3:
        towards = {"superior": "head", "inferior": "feet"}.get(str(z_direction))
        if towards is None:
            raise ConfigError(
                f"a CT laterality hint for a volume needs z_direction 'superior' or 'inferior', got {z_direction!r}"
            )
        text += f"; the slice index increases toward the patient's {towards}"
    return text + "."


def _visual_note(visual: str, depth: int | None, slice_indices: Sequence[int] | None) -> str:
    if visual == "video":
        count = f" ({depth} slices)" if depth is not None else ""
        return f"The video shows the axial slices of one volume in order{count}; frame 0 is slice 0."
    if visual == "slices":
        return "The images are axial slices of one volume, each preceded by its slice index; use that index for z."
    if visual == "montage":
        which = f" (slices {', '.join(str(k) for k in slice_indices)})" if slice_indices else ""
        return (
            f"The image is a montage of axial slices of one volume{which}, tiled left to right and top to bottom; "
            "x and y are positions within a tile."
        )
    return ""


def _answer_example(ndim: int) -> str:
    return f'{{"bbox_{ndim}d": {_BOX_LETTERS[ndim]}}}'


def _clean_phrase(phrase: str, record_id: str | None) -> str:
    where = f"record {record_id!r}: " if record_id is not None else ""
    if not isinstance(phrase, str) or not phrase.strip():
        raise DataError(f"{where}the referring phrase {phrase!r} is empty or not a string")
    text = " ".join(phrase.split())
    # The question template adds the full stop; drop the phrase's own so the prompt never reads "..".
    return text[:-1].rstrip() if text.endswith(".") and len(text) > 1 else text


def _check_visual(
    ndim: int, visual: str | None, slice_indices: Sequence[int] | None
) -> tuple[str, tuple[int, ...]]:
    chosen = visual if visual is not None else ("image" if ndim == 2 else "video")
    allowed = ("image",) if ndim == 2 else ("video", "slices", "montage")
    if chosen not in allowed:
        raise ConfigError(f"visual strategy {chosen!r} does not fit ndim={ndim}; use one of {allowed}")
    indices: tuple[int, ...] = ()
    if slice_indices is not None:
        if chosen not in ("slices", "montage"):
            raise ConfigError(
                f"slice_indices are only used by the 'slices' and 'montage' strategies, not {chosen!r}"
            )
        indices = tuple(slice_indices)
        for k in indices:
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ConfigError(f"slice index {k!r} in {list(indices)!r} must be a non-negative integer")
        if len(set(indices)) != len(indices):
            raise ConfigError(f"slice_indices {list(indices)!r} repeat a slice")
    if chosen == "slices" and not indices:
        raise ConfigError("the 'slices' strategy needs slice_indices (one label per image)")
    return chosen, indices


def build_instruction(
    phrase: str,
    ndim: int,
    *,
    template: str | PromptTemplate = "r1",
    visual: VisualStrategy | None = None,
    codec: BoxCodec | None = None,
    slice_indices: Sequence[int] | None = None,
    depth: int | None = None,
    laterality: Literal["cxr", "ct"] | None = None,
    z_direction: Literal["superior", "inferior"] | None = None,
    coordinate_note: bool | None = None,
    record_id: str | None = None,
) -> str:
    """The user-turn text: question, visual and coordinate notes, laterality hint, then the template's demands.

    ``coordinate_note`` defaults to on for volumes and for non-absolute codecs, off for 2D absolute pixels (the
    MedGround-R1 2D prompt has none).
    """
    ndim = _check_ndim(ndim)
    tpl = get_template(template)
    chosen, indices = _check_visual(ndim, visual, slice_indices)
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth <= 0):
        raise ConfigError(f"depth must be a positive integer, got {depth!r}")
    codec = codec if codec is not None else AbsolutePixelCodec()
    if tpl.terse:  # a question is asked as written, a noun phrase as "Find …."
        clean = _clean_phrase(phrase, record_id)
        text = clean if clean.endswith(("?", ".")) else f"Find {clean}."
        if laterality is not None:  # "left" must mean the patient's left in the terse wording too
            text += " " + laterality_hint(laterality, ndim, z_direction=z_direction)
        return text
    if coordinate_note is None:
        coordinate_note = ndim == 3 or not isinstance(codec, AbsolutePixelCodec)
    parts = [QUESTION_TEMPLATE.format(phrase=_clean_phrase(phrase, record_id))]
    if ndim == 3:
        parts.append(_visual_note(chosen, depth, indices))
    if coordinate_note:
        parts.append(codec.describe(ndim))
        if chosen == "montage":  # the montage text frame's z is the tile, not a slice (mg3d.tokenization)
            parts.append(
                "In this montage, z is the tile number (0 = top left, counting left to right, then top to "
                "bottom), not a slice index."
            )
    if laterality is not None:
        parts.append(laterality_hint(laterality, ndim, z_direction=z_direction))
    example = _answer_example(ndim)
    if tpl.think:
        parts.append(_THINK_SENTENCE)
        if tpl.chain_of_box:
            parts.append(_COB_SENTENCE.format(fmt=_BOX_LETTERS[ndim]))
        parts.append(_JSON_SENTENCE.format(example=example))
    else:
        parts.append(_PLAIN_SENTENCE.format(example=example))
    return " ".join(p for p in parts if p)


def build_messages(
    phrase: str,
    ndim: int,
    *,
    template: str | PromptTemplate = "r1",
    visual: VisualStrategy | None = None,
    codec: BoxCodec | None = None,
    slice_indices: Sequence[int] | None = None,
    depth: int | None = None,
    laterality: Literal["cxr", "ct"] | None = None,
    z_direction: Literal["superior", "inferior"] | None = None,
    coordinate_note: bool | None = None,
    system_prompt: str | None = None,
    record_id: str | None = None,
) -> list[dict[str, Any]]:
    """Chat messages for one record: the visual placeholders, then the instruction.

    ``visual``: ``"image"`` (2D, default), ``"video"`` (3D default: depth is time), ``"slices"`` (one image per
    entry of ``slice_indices``, each preceded by a ``Slice k:`` label) or ``"montage"`` (one tiled image).
    The processor fills the placeholders with the pixels; the order of images follows ``slice_indices``.
    """
    ndim = _check_ndim(ndim)
    chosen, indices = _check_visual(ndim, visual, slice_indices)
    text = build_instruction(
        phrase,
        ndim,
        template=template,
        visual=chosen,  # type: ignore[arg-type]
        codec=codec,
        slice_indices=indices or None,
        depth=depth,
        laterality=laterality,
        z_direction=z_direction,
        coordinate_note=coordinate_note,
        record_id=record_id,
    )
    content: list[dict[str, Any]] = []
    if chosen == "video":
        content.append({"type": "video"})
    elif chosen == "slices":
        for i, k in enumerate(indices):
            prefix = "" if i == 0 else "\n"
            content.append({"type": "text", "text": f"{prefix}Slice {k}: "})
            content.append({"type": "image"})
        text = "\n" + text
    else:
        content.append({"type": "image"})
    content.append({"type": "text", "text": text})
    messages: list[dict[str, Any]] = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": content})
    return messages


def render_prompt(processor: Any, messages: Sequence[Mapping[str, Any]]) -> str:
    """Apply a tokenizer's or processor's chat template, ending with the assistant generation prompt."""
    apply = getattr(processor, "apply_chat_template", None)
    if apply is None:
        raise ConfigError(
            f"{type(processor).__name__} has no apply_chat_template; pass a tokenizer or processor"
        )
    if getattr(processor, "chat_template", None) is None:
        raise ConfigError(
            f"{type(processor).__name__} has no chat template; set one, e.g. "
            "mg3d.chat_template.QWEN2_VL_CHAT_TEMPLATE"
        )
    return apply(list(messages), tokenize=False, add_generation_prompt=True)


def format_answer(values: Sequence[float], ndim: int, *, label: str | None = None) -> str:
    """The JSON answer ``{"bbox_2d": [...]}`` / ``{"bbox_3d": [...]}`` for codec integers (SFT targets, demos)."""
    ndim = _check_ndim(ndim)
    vals = list(values)
    if len(vals) != 2 * ndim:
        raise BoxError(f"answer box {vals!r} has {len(vals)} numbers, expected {2 * ndim}")
    out: list[int | float] = []
    for v in vals:
        f = float(v)
        if not math.isfinite(f):
            raise BoxError(f"answer box {vals!r} has a non-finite number")
        out.append(int(f) if f.is_integer() else f)
    payload: dict[str, Any] = {f"bbox_{ndim}d": out}
    if label is not None:
        payload["label"] = label
    return json.dumps(payload, ensure_ascii=False)


def format_completion(
    values: Sequence[float],
    ndim: int,
    *,
    template: str | PromptTemplate = "r1",
    reasoning: str = "",
    label: str | None = None,
) -> str:
    """A completion in the template's format (``<think>…</think><answer>…</answer>`` or the answer alone)."""
    tpl = get_template(template)
    if tpl.terse:
        payload = json.loads(format_answer(values, ndim))[f"bbox_{ndim}d"]
        return f"<answer>[{','.join(str(v) for v in payload)}]</answer>"
    answer = f"<answer>{format_answer(values, ndim, label=label)}</answer>"
    return f"<think>{reasoning}</think>{answer}" if get_template(template).think else answer
