"""Prompts for grounding and the parser that reads a box back out of a completion.

Three parts, all in the *text frame* of DESIGN.md §2 (the grid of the tensor the model sees):

* **Box codecs** — how a model family writes a box: Qwen2.5-VL absolute integer pixels, Qwen2-VL integers
  normalised to 0–1000. Boxes are ``[x1, y1, x2, y2]`` / ``[x1, y1, z1, x2, y2, z2]`` (x = column, y = row,
  z = slice index of the model's depth grid), half-open edges; ``grid_shape`` is ``(x size, y size[, z size])``.
* **Templates** — the R1 template (``<think>`` then ``<answer>``), the Chain-of-Box template (boxes of regions of
  interest appended inside ``<think>``, in 2D or 3D wording), a plain answer-only template for supervised
  warm starts, optional laterality hints, and the chat messages for each visual strategy.
* **Parser** — ``parse_completion`` in a lenient mode (what real VLMs write) and a strict mode that reproduces
  the MedGround-R1 / VLM-R1 evaluation rule exactly; ``strict_format_ok`` is their format-reward rule.

The instruction sentences are our own wording. The question sentence is the MedGround-R1 / VLM-R1 one
(a short factual prompt), kept because the strict evaluation protocol was defined with it.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from mg3d.errors import BoxError, ConfigError, DataError

__all__ = [
    "MAX_ABS_COORDINATE",
    "MAX_SCAN_CHARS",
    "QUESTION_TEMPLATE",
    "AbsolutePixelCodec",
    "BoxCodec",
    "NormalizedCodec",
    "ParseFlag",
    "ParseStatus",
    "ParsedCompletion",
    "PromptTemplate",
    "build_instruction",
    "build_messages",
    "check_warm_start_options",
    "format_answer",
    "format_completion",
    "get_codec",
    "get_template",
    "laterality_hint",
    "parse_completion",
    "render_prompt",
    "strict_format_ok",
]


def check_warm_start_options(
    instruction: object, warm_start_reasoning: object, trail_grid: object, *, prefix: str = ""
) -> tuple[int, ...]:
    """Check the prompt's instruction / warm-start reasoning / trail grid choices; return the grid as a tuple.

    One check for :class:`mg3d.grpo.config.PromptConfig` (``prefix="prompt."``, after it has read command-line
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
ParseMode = Literal["lenient", "strict"]

_AXIS_NAMES = ("x", "y", "z")


# ----------------------------------------------------------------------------------------------------------
# Box codecs
# ----------------------------------------------------------------------------------------------------------


def _check_grid(grid_shape: Sequence[int], what: str) -> tuple[int, ...]:
    grid = tuple(grid_shape)
    if len(grid) not in (2, 3):
        raise BoxError(f"{what}: grid_shape {grid!r} must have 2 (x, y) or 3 (x, y, z) sizes")
    for size in grid:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise BoxError(f"{what}: grid_shape {grid!r} must hold positive integers")
    return grid


def _check_values(values: Sequence[float], grid: tuple[int, ...], what: str) -> tuple[float, ...]:
    vals = tuple(float(v) for v in values)
    if len(vals) != 2 * len(grid):
        raise BoxError(
            f"{what}: box {list(values)!r} has {len(vals)} numbers, expected {2 * len(grid)} for grid {grid}"
        )
    if not all(math.isfinite(v) for v in vals):
        raise BoxError(f"{what}: box {list(values)!r} has a non-finite number")
    return vals


def _round_half_up(value: float) -> int:
    # Python's round() is round-half-to-even; half-up keeps encode deterministic and monotonic.
    return math.floor(value + 0.5)


class BoxCodec(ABC):
    """Turns a text-grid box (floats) into the integers a model family writes, and back."""

    name: str

    @abstractmethod
    def encode(self, box: Sequence[float], grid_shape: Sequence[int]) -> tuple[int, ...]:
        """Round to the codec's integers and clip to the grid. Raises BoxError on a malformed box."""

    @abstractmethod
    def decode(self, values: Sequence[float], grid_shape: Sequence[int]) -> tuple[float, ...]:
        """Model numbers (ints, or floats a model wrote) → text-grid units. No clipping, no reordering."""

    @abstractmethod
    def step(self, grid_shape: Sequence[int]) -> tuple[float, ...]:
        """Text-grid units per integer step, per axis (x, y[, z]): the round trip is exact up to half of it."""

    @abstractmethod
    def describe(self, ndim: int) -> str:
        """One prompt sentence that tells the model what the numbers mean."""

    def _validate_box(
        self, box: Sequence[float], grid_shape: Sequence[int]
    ) -> tuple[tuple[int, ...], tuple[float, ...]]:
        grid = _check_grid(grid_shape, f"{self.name} codec")
        vals = _check_values(box, grid, f"{self.name} codec")
        n = len(grid)
        for axis in range(n):
            if vals[axis] > vals[axis + n]:
                raise BoxError(
                    f"{self.name} codec: box {list(box)!r} is inverted on axis {_AXIS_NAMES[axis]} "
                    f"({vals[axis]} > {vals[axis + n]})"
                )
        return grid, vals


@dataclass(frozen=True)
class AbsolutePixelCodec(BoxCodec):
    """Qwen2.5-VL: absolute integer pixels (and slice indices) of the grid the model sees."""

    name: str = "qwen2.5-vl"

    def encode(self, box: Sequence[float], grid_shape: Sequence[int]) -> tuple[int, ...]:
        grid, vals = self._validate_box(box, grid_shape)
        n = len(grid)
        return tuple(min(max(_round_half_up(v), 0), grid[i % n]) for i, v in enumerate(vals))

    def decode(self, values: Sequence[float], grid_shape: Sequence[int]) -> tuple[float, ...]:
        grid = _check_grid(grid_shape, f"{self.name} codec")
        return _check_values(values, grid, f"{self.name} codec")

    def step(self, grid_shape: Sequence[int]) -> tuple[float, ...]:
        return tuple(1.0 for _ in _check_grid(grid_shape, f"{self.name} codec"))

    def describe(self, ndim: int) -> str:
        if ndim == 2:
            return (
                "Coordinates are integer pixel positions in the image as shown: x counts columns from the left "
                "edge, y counts rows from the top edge, and x2, y2 lie one past the region's last column and row."
            )
        return (
            "Coordinates are integers: x counts pixel columns from the left edge, y counts pixel rows from the top "
            "edge, z is the slice index, and x2, y2, z2 lie one past the region's last column, row and slice."
        )


@dataclass(frozen=True)
class NormalizedCodec(BoxCodec):
    """Qwen2-VL: integers from 0 to ``scale`` (1000), proportional to the grid size on each axis."""

    scale: int = 1000
    name: str = "qwen2-vl"

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, int) or self.scale <= 0:
            raise ConfigError(f"NormalizedCodec scale must be a positive integer, got {self.scale!r}")

    def encode(self, box: Sequence[float], grid_shape: Sequence[int]) -> tuple[int, ...]:
        grid, vals = self._validate_box(box, grid_shape)
        n = len(grid)
        return tuple(
            min(max(_round_half_up(v / grid[i % n] * self.scale), 0), self.scale) for i, v in enumerate(vals)
        )

    def decode(self, values: Sequence[float], grid_shape: Sequence[int]) -> tuple[float, ...]:
        grid = _check_grid(grid_shape, f"{self.name} codec")
        vals = _check_values(values, grid, f"{self.name} codec")
        n = len(grid)
        return tuple(v * grid[i % n] / self.scale for i, v in enumerate(vals))

    def step(self, grid_shape: Sequence[int]) -> tuple[float, ...]:
        return tuple(size / self.scale for size in _check_grid(grid_shape, f"{self.name} codec"))

    def describe(self, ndim: int) -> str:
        axes = (
            "x across the image width and y down its height"
            if ndim == 2
            else ("x across the image width, y down its height and z through the slices")
        )
        return f"Coordinates are integers from 0 to {self.scale}: {axes}, scaled so that {self.scale} is the far edge."


_CODECS: dict[str, Callable[[], BoxCodec]] = {
    "qwen2.5-vl": AbsolutePixelCodec,
    "qwen2_5_vl": AbsolutePixelCodec,  # the Hugging Face config's model_type
    "qwen2-vl": NormalizedCodec,
    "qwen2_vl": NormalizedCodec,
}


def get_codec(name: str) -> BoxCodec:
    """Codec by model family: ``"qwen2.5-vl"`` (absolute pixels) or ``"qwen2-vl"`` (0–1000); HF model_types work too."""
    factory = _CODECS.get(str(name).strip().lower())
    if factory is None:
        raise ConfigError(f"unknown box codec {name!r}; known: {sorted(_CODECS)}")
    return factory()


# ----------------------------------------------------------------------------------------------------------
# Templates and chat messages
# ----------------------------------------------------------------------------------------------------------

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


def _check_ndim(ndim: int) -> int:
    if isinstance(ndim, bool) or ndim not in (2, 3):
        raise ConfigError(f"ndim must be 2 or 3, got {ndim!r}")
    return int(ndim)


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
        return clean if clean.endswith(("?", ".")) else f"Find {clean}."
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


# ----------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------

#: Only the last this-many characters of a completion are scanned in lenient mode. Completions are a few
#: hundred tokens; the cap bounds the work on degenerate outputs (repetition loops) and keeps parsing linear.
#: The answer is at the end, so the cap drops only the start of an overlong <think>.
MAX_SCAN_CHARS = 20_000
#: A decoded coordinate beyond this (text-grid units) is reported as ``out_of_range`` rather than returned,
#: so reward arithmetic (areas, volumes, GIoU) stays finite.
MAX_ABS_COORDINATE = 1e6


class ParseStatus(str, Enum):
    """Outcome of parsing one completion.

    ``ok``: box from a complete ``<answer>…</answer>``. ``truncated``: an ``<answer>`` (or ``<think>``) is never
    closed; the box, if any, is the first complete one after the open answer tag (or, without an answer tag,
    the last box in the text). ``no_answer_tag``: no answer at all; the box, if any, is the last box in the
    text. The other values are failures and come with ``box=None`` (``[0, 0, 0, 0]`` in strict mode).
    """

    OK = "ok"
    EMPTY = "empty"
    NO_ANSWER_TAG = "no_answer_tag"
    TRUNCATED = "truncated"
    NO_BOX = "no_box"
    WRONG_DIMENSION = "wrong_dimension"
    NON_FINITE = "non_finite"
    OUT_OF_RANGE = "out_of_range"
    DEGENERATE = "degenerate"


class ParseFlag(str, Enum):
    """Things the lenient parser repaired or chose; they never hide a failure."""

    INPUT_CAPPED = "input_capped"  # longer than MAX_SCAN_CHARS; only the tail was scanned
    UNICODE_DIGITS = "unicode_digits"  # non-ASCII decimal digits were read as ASCII digits
    MULTIPLE_ANSWERS = "multiple_answers"  # several complete answers; the last was used
    UNCLOSED_TRAILING_ANSWER = "unclosed_trailing_answer"  # an answer opened after the last complete one
    MISSING_OPEN_TAG = "missing_open_tag"  # "</answer>" without "<answer>"; the answer starts after </think>
    FALLBACK_LAST_BOX = "fallback_last_box"  # no answer; the last box of the text was used
    SEVERAL_BOXES = "several_boxes"  # the answer held several boxes; the first (prefer a *box* key) was used
    BARE_NUMBERS = "bare_numbers"  # no bracketed list; the answer's numbers were used
    SCALED_FRACTIONS = "scaled_fractions"  # all numbers were 0–1 floats; scaled by the grid size
    REORDERED = "reordered"  # some axis had lo > hi; swapped


@dataclass(frozen=True)
class ParsedCompletion:
    """What a completion says. ``box`` is in text-grid units (floats), ``raw_numbers`` as the model wrote them."""

    box: tuple[float, ...] | None
    status: ParseStatus
    raw_numbers: tuple[float, ...] = ()
    think_boxes: tuple[tuple[float, ...], ...] = ()
    has_think: bool = False
    format_ok_strict: bool = False
    flags: frozenset[ParseFlag] = field(default_factory=frozenset)
    detail: str = ""
    mode: ParseMode = "lenient"

    @property
    def ok(self) -> bool:
        """True when the box came from a complete answer."""
        return self.status is ParseStatus.OK

    @property
    def failure_reason(self) -> ParseStatus | None:
        """``None`` when ``ok``; otherwise the status (which may still carry a recovered box)."""
        return None if self.status is ParseStatus.OK else self.status


# Tags are matched exactly (case-insensitive in lenient mode); no inner whitespace, so no backtracking.
_TAG_RE = re.compile(r"<(/?)(think|answer)>", re.IGNORECASE)
# A number not glued to an identifier ("x1" is not a number). ASCII only: digits are normalised first.
_NUM = r"(?<![A-Za-z0-9_.])[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
_NUM_RE = re.compile(_NUM)
# A bracket group without nested brackets: from each "[" the scan stops at the next bracket (linear).
_BRACKET_RE = re.compile(r"\[([^\[\]]*)\]")
_SEPARATORS_RE = re.compile(r"[\s,;\"']*")
# Qwen2-VL's native grounding output: (x1,y1),(x2,y2).
_PAIR_RE = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*(?:,\s*)?\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


@dataclass(frozen=True)
class _Candidate:
    start: int
    numbers: tuple[str, ...]
    key: str | None

    @property
    def boxy(self) -> bool:
        return self.key is not None and "box" in self.key.lower()


def _key_before(text: str, start: int) -> str | None:
    """The JSON-ish key right before position ``start`` (``"bbox_2d": [``), read backwards in O(48)."""
    window = text[max(0, start - 48) : start].rstrip()
    if not window or window[-1] not in ":=":
        return None
    window = window[:-1].rstrip().rstrip("\"'")
    i = len(window)
    while i > 0 and window[i - 1] in _KEY_CHARS:
        i -= 1
    return window[i:] or None


def _candidates(text: str, ndim: int) -> list[_Candidate]:
    """Every purely numeric bracket list (and, in 2D, every ``(x1,y1),(x2,y2)`` pair) in order of position."""
    found: list[_Candidate] = []
    for m in _BRACKET_RE.finditer(text):
        inner = m.group(1)
        numbers = _NUM_RE.findall(inner)
        if not numbers or not _SEPARATORS_RE.fullmatch(_NUM_RE.sub("", inner)):
            continue
        found.append(_Candidate(m.start(), tuple(numbers), _key_before(text, m.start())))
    if ndim == 2:
        for m in _PAIR_RE.finditer(text):
            found.append(_Candidate(m.start(), m.groups(), None))
        found.sort(key=lambda c: c.start)
    return found


def _ascii_digits(text: str) -> str:
    """Map every non-ASCII decimal digit (Arabic-Indic, full-width, …) to its ASCII digit; length is kept."""
    if text.isascii():
        return text
    return "".join(str(unicodedata.decimal(c)) if c.isdecimal() and not c.isascii() else c for c in text)


@dataclass
class _Box:
    box: tuple[float, ...] | None
    raw: tuple[float, ...]
    status: ParseStatus | None  # None when the box is good
    flags: set[ParseFlag]
    detail: str


def _convert(numbers: Sequence[str], ndim: int, codec: BoxCodec | None, grid: tuple[int, ...] | None) -> _Box:
    """Model numbers → a validated, ordered text-grid box (or the reason it is not one)."""
    values = tuple(float(s) for s in numbers)  # _NUM_RE-matched ASCII: float() cannot fail (may give inf)
    flags: set[ParseFlag] = set()
    if len(values) != 2 * ndim:
        return _Box(
            None, values, ParseStatus.WRONG_DIMENSION, flags, f"{len(values)} numbers, expected {2 * ndim}"
        )
    if not all(math.isfinite(v) for v in values):
        return _Box(None, values, ParseStatus.NON_FINITE, flags, f"non-finite number in {list(values)}")
    if any(abs(v) > MAX_ABS_COORDINATE for v in values):
        return _Box(None, values, ParseStatus.OUT_OF_RANGE, flags, f"number beyond {MAX_ABS_COORDINATE:g}")
    written_as_float = any(("." in s) or ("e" in s.lower()) for s in numbers)
    if grid is not None and written_as_float and all(0.0 <= v <= 1.0 for v in values):
        coords = tuple(v * grid[i % ndim] for i, v in enumerate(values))
        flags.add(ParseFlag.SCALED_FRACTIONS)
    elif codec is not None and grid is not None:
        coords = codec.decode(values, grid)
    else:
        coords = values
    lo, hi = list(coords[:ndim]), list(coords[ndim:])
    for axis in range(ndim):
        if lo[axis] > hi[axis]:
            lo[axis], hi[axis] = hi[axis], lo[axis]
            flags.add(ParseFlag.REORDERED)
    for axis in range(ndim):
        if lo[axis] == hi[axis]:
            return _Box(
                None,
                values,
                ParseStatus.DEGENERATE,
                flags,
                f"zero extent on axis {_AXIS_NAMES[axis]}: {list(values)}",
            )
    return _Box(tuple(lo + hi), values, None, flags, "")


def _answer_box(
    segment: str, ndim: int, codec: BoxCodec | None, grid: tuple[int, ...] | None, *, allow_bare: bool
) -> _Box:
    """The box an answer segment gives: its first box-sized list (a ``*box*`` key first), else its bare numbers."""
    cands = _candidates(segment, ndim)
    right = [c for c in cands if len(c.numbers) == 2 * ndim]
    if right:
        boxy = [c for c in right if c.boxy]
        chosen = (boxy or right)[0]
        result = _convert(chosen.numbers, ndim, codec, grid)
        if len(right) > 1:
            result.flags.add(ParseFlag.SEVERAL_BOXES)
        return result
    if cands:
        shown = ([c for c in cands if c.boxy] or cands)[0]
        return _Box(
            None,
            tuple(float(s) for s in shown.numbers),
            ParseStatus.WRONG_DIMENSION,
            set(),
            f"a list of {len(shown.numbers)} numbers, expected {2 * ndim}",
        )
    if allow_bare:
        numbers = _NUM_RE.findall(segment)
        if len(numbers) == 2 * ndim:
            result = _convert(numbers, ndim, codec, grid)
            result.flags.add(ParseFlag.BARE_NUMBERS)
            return result
        if len(numbers) in (4, 6):
            return _Box(
                None,
                tuple(float(s) for s in numbers),
                ParseStatus.WRONG_DIMENSION,
                set(),
                f"{len(numbers)} bare numbers, expected {2 * ndim}",
            )
    return _Box(None, (), ParseStatus.NO_BOX, set(), "no box-like list of numbers in the answer")


def _sections(tags: list[re.Match[str]], name: str) -> tuple[list[tuple[int, int]], int | None]:
    """Pair open/close tags of one name in order: (closed spans, start of a trailing unclosed span).

    A close tag that comes before any open tag of its name gives a span with start -1 (the caller decides).
    """
    closed: list[tuple[int, int]] = []
    open_at: int | None = None
    seen_open = False
    for m in tags:
        if m.group(2).lower() != name:
            continue
        if not m.group(1):
            seen_open = True
            if open_at is None:
                open_at = m.end()
        elif open_at is not None:
            closed.append((open_at, m.start()))
            open_at = None
        elif not seen_open and not closed:
            closed.append((-1, m.start()))
    return closed, open_at


def _parse_lenient(
    text: str, ndim: int, codec: BoxCodec | None, grid: tuple[int, ...] | None, format_ok: bool
) -> ParsedCompletion:
    flags: set[ParseFlag] = set()
    if len(text) > MAX_SCAN_CHARS:
        text = text[-MAX_SCAN_CHARS:]
        flags.add(ParseFlag.INPUT_CAPPED)
    scan = _ascii_digits(text)
    if scan != text:
        flags.add(ParseFlag.UNICODE_DIGITS)
    tags = list(_TAG_RE.finditer(scan))

    think_closed, think_open = _sections(tags, "think")
    has_think = any(start >= 0 for start, _ in think_closed)
    think_spans = [(max(start, 0), end) for start, end in think_closed]
    if think_open is not None:
        next_answer = next(
            (m.start() for m in tags if m.start() >= think_open and m.group(2).lower() == "answer"), None
        )
        think_spans.append((think_open, len(scan) if next_answer is None else next_answer))
    think_boxes: list[tuple[float, ...]] = []
    for start, end in think_spans:
        for cand in _candidates(scan[start:end], ndim):
            if len(cand.numbers) == 2 * ndim:
                converted = _convert(cand.numbers, ndim, codec, grid)
                if converted.box is not None:
                    think_boxes.append(converted.box)

    answers, answer_open = _sections(tags, "answer")
    if answers:
        start, end = answers[-1]
        if start < 0:  # "</answer>" with no "<answer>": the answer follows the last </think> before it
            think_ends = [
                m.end() for m in tags if m.group(1) and m.group(2).lower() == "think" and m.end() <= end
            ]
            start = think_ends[-1] if think_ends else 0
            flags.add(ParseFlag.MISSING_OPEN_TAG)
        if len(answers) > 1:
            flags.add(ParseFlag.MULTIPLE_ANSWERS)
        if answer_open is not None:
            flags.add(ParseFlag.UNCLOSED_TRAILING_ANSWER)
        found = _answer_box(scan[start:end], ndim, codec, grid, allow_bare=True)
        status = found.status or ParseStatus.OK
    elif answer_open is not None:
        # Truncated inside the answer: only complete lists count (a cut list's last number may be cut too).
        found = _answer_box(scan[answer_open:], ndim, codec, grid, allow_bare=False)
        status = ParseStatus.TRUNCATED if found.status in (None, ParseStatus.NO_BOX) else found.status
    else:
        cands = [c for c in _candidates(scan, ndim) if len(c.numbers) == 2 * ndim]
        status = ParseStatus.TRUNCATED if think_open is not None else ParseStatus.NO_ANSWER_TAG
        if cands:
            found = _convert(cands[-1].numbers, ndim, codec, grid)
            found.flags.add(ParseFlag.FALLBACK_LAST_BOX)
            status = found.status or status
        else:
            found = _Box(None, (), None, set(), "no answer tag and no box anywhere in the text")
    return ParsedCompletion(
        box=found.box,
        status=status,
        raw_numbers=found.raw,
        think_boxes=tuple(think_boxes),
        has_think=has_think,
        format_ok_strict=format_ok,
        flags=frozenset(flags | found.flags),
        detail=found.detail,
        mode="lenient",
    )


# --- strict mode: the MedGround-R1 / VLM-R1 rules, reimplemented without backtracking --------------------
#
# Evaluation rule: take the text between the first "<answer>" and the first "</answer>" after it; inside,
# the regex `\{.*\[(\d+),\s*(\d+),\s*(\d+),\s*(\d+)]\s*.*\}` (DOTALL) picks the list. Its greedy `.*` makes
# the chosen list the *last* `[int, int, int, int]` that starts after the answer's first "{" and ends before
# its last "}" (for the usual one-box answer that is also the first). Failure → [0, 0, 0, 0]. Python's
# `\d` matches any Unicode decimal digit and `int()` reads them, so those count as digits here too.
# Format rule: re.fullmatch(`<think>.*?</think>\s*<answer>.*?\{.*\[\d+,\s*\d+,\s*\d+,\s*\d+\].*\}.*?</answer>`,
# DOTALL). The 3D analogue uses six integers. Both regexes backtrack quadratically on adversarial text, so
# the same decisions are made here with str.find and one linear scan.

_STRICT_LIST = {
    2: re.compile(r"\[(\d+),\s*(\d+),\s*(\d+),\s*(\d+)]"),
    3: re.compile(r"\[(\d+),\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+)]"),
}
_THINK_THEN_ANSWER = re.compile(r"</think>\s*<answer>")


def strict_format_ok(text: str, ndim: int = 2) -> bool:
    """MedGround-R1's format reward rule (full match), for ``[x1, y1, x2, y2]`` or the 6-int 3D analogue."""
    ndim = _check_ndim(ndim)
    if not isinstance(text, str) or not text.startswith("<think>") or not text.endswith("</answer>"):
        return False
    final = len(text) - len("</answer>")
    bridge = _THINK_THEN_ANSWER.search(text, len("<think>"))
    if bridge is None:
        return False
    brace = text.find("{", bridge.end(), final)
    close = text.rfind("}", 0, final)
    if brace < 0 or close < 0:
        return False
    box = _STRICT_LIST[ndim].search(text, brace + 1)
    return box is not None and box.end() <= close


def _strict_numbers(text: str, ndim: int) -> tuple[tuple[int, ...] | None, ParseStatus, str]:
    open_at = text.find("<answer>")
    if open_at < 0:
        return None, ParseStatus.NO_ANSWER_TAG, "no <answer> tag"
    close_at = text.find("</answer>", open_at + len("<answer>"))
    if close_at < 0:
        return None, ParseStatus.TRUNCATED, "<answer> is never closed"
    inner = text[open_at + len("<answer>") : close_at]
    brace, close = inner.find("{"), inner.rfind("}")
    chosen = None
    if brace >= 0:
        for m in _STRICT_LIST[ndim].finditer(inner, brace + 1):
            if m.end() > close:
                break
            chosen = m
    if chosen is None:
        return None, ParseStatus.NO_BOX, f"no [{', '.join(['int'] * 2 * ndim)}] inside {{…}} in the answer"
    try:
        return tuple(int(g) for g in chosen.groups()), ParseStatus.OK, ""
    except ValueError:  # more digits than int() accepts (sys.get_int_max_str_digits)
        return None, ParseStatus.NON_FINITE, "an integer with too many digits"


def _parse_strict(
    text: str, ndim: int, codec: BoxCodec | None, grid: tuple[int, ...] | None, format_ok: bool
) -> ParsedCompletion:
    numbers, status, detail = _strict_numbers(text, ndim)
    zeros = tuple(0.0 for _ in range(2 * ndim))
    raw: tuple[float, ...] = ()
    box = zeros
    if numbers is not None:
        try:
            raw = tuple(float(v) for v in numbers)
        except OverflowError:
            numbers, status, detail = None, ParseStatus.NON_FINITE, "an integer too large for a float"
        else:
            box = codec.decode(raw, grid) if codec is not None and grid is not None else raw
            if not all(math.isfinite(v) for v in box):
                box, status, detail = zeros, ParseStatus.NON_FINITE, "decoded box is not finite"
    lenient = _parse_lenient(text, ndim, codec, grid, format_ok)
    return ParsedCompletion(
        box=box,
        status=status,
        raw_numbers=raw,
        think_boxes=lenient.think_boxes,
        has_think=lenient.has_think,
        format_ok_strict=format_ok,
        flags=frozenset(),
        detail=detail,
        mode="strict",
    )


def parse_completion(
    text: str,
    ndim: int,
    *,
    mode: ParseMode = "lenient",
    codec: BoxCodec | None = None,
    grid_shape: Sequence[int] | None = None,
) -> ParsedCompletion:
    """Read the box a completion gives. Never raises on any text (arguments are checked: ConfigError).

    Lenient mode (rewards, evaluation of any model): the answer is the **last complete**
    ``<answer>…</answer>`` (a model that answers twice has changed its mind); inside it, the first list of
    ``2 * ndim`` numbers (one under a key containing "box" first), in JSON, a fenced block, a list of objects
    or plain text; ints, floats, signs and exponents; a Qwen2-VL ``(x1,y1),(x2,y2)`` pair; bare numbers as a
    last resort. Without an answer, the last box of the text is used (flagged). All-0–1 floats are scaled by
    ``grid_shape``; otherwise ``codec`` decodes (no codec: numbers are taken as text-grid units). Boxes with
    lo > hi are reordered (flagged); zero-extent, non-finite and huge boxes are failures. Only the last
    ``MAX_SCAN_CHARS`` characters are scanned; every step is linear in the text length.

    Strict mode reproduces the MedGround-R1 evaluation (see the comment above ``_STRICT_LIST``): failure gives
    the all-zero box. ``think_boxes`` (every box inside ``<think>``) and ``has_think`` are filled in both modes.
    """
    ndim = _check_ndim(ndim)
    if mode not in ("lenient", "strict"):
        raise ConfigError(f"parse mode must be 'lenient' or 'strict', got {mode!r}")
    grid: tuple[int, ...] | None = None
    if grid_shape is not None:
        try:
            grid = _check_grid(grid_shape, "parse_completion")
        except BoxError as exc:
            raise ConfigError(str(exc)) from exc
        if len(grid) != ndim:
            raise ConfigError(f"grid_shape {grid} has {len(grid)} sizes but ndim is {ndim}")
    if codec is not None and grid is None:
        raise ConfigError(f"codec {codec.name!r} needs grid_shape to decode boxes")
    if not isinstance(text, str) or not text.strip():
        zeros = tuple(0.0 for _ in range(2 * ndim)) if mode == "strict" else None
        return ParsedCompletion(
            box=zeros, status=ParseStatus.EMPTY, detail=f"empty completion ({type(text).__name__})", mode=mode
        )
    format_ok = strict_format_ok(text, ndim)
    if mode == "strict":
        return _parse_strict(text, ndim, codec, grid, format_ok)
    return _parse_lenient(text, ndim, codec, grid, format_ok)
