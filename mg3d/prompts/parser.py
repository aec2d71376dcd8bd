"""Reading a box back out of a completion: ``parse_completion`` (never raises on any text).

A lenient mode (what real VLMs write) and a strict mode that reproduces the MedGround-R1 / VLM-R1 evaluation
rule exactly; ``strict_format_ok`` is their format-reward rule. Boxes come out in the text frame.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from mg3d.errors import BoxError, ConfigError
from mg3d.prompts.codecs import _AXIS_NAMES, BoxCodec, _check_grid, _check_ndim

ParseMode = Literal["lenient", "strict"]

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
    NATIVE_JSON = (
        "native_json"  # no tags at all; the box is a Qwen-native ``"bbox_2d"`` / ``"bbox_3d"`` value
    )


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
            if status is ParseStatus.NO_ANSWER_TAG and not tags and cands[-1].key == f"bbox_{ndim}d":
                found.flags.add(ParseFlag.NATIVE_JSON)  # how Qwen2.5-VL answers when not asked for tags
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


# --- several boxes in one answer (phrases that refer to several findings) ---------------------------------

#: At most this many boxes are read from one answer: a degenerate completion cannot make matching expensive.
MAX_ANSWER_BOXES = 32


def _last_answer_segment(scan: str) -> str | None:
    """The text of the last complete ``<answer>…</answer>`` (lenient rules, as ``_parse_lenient`` finds it)."""
    tags = list(_TAG_RE.finditer(scan))
    answers, _ = _sections(tags, "answer")
    if not answers:
        return None
    start, end = answers[-1]
    if start < 0:  # "</answer>" without "<answer>": the answer follows the last </think> before it
        think_ends = [
            m.end() for m in tags if m.group(1) and m.group(2).lower() == "think" and m.end() <= end
        ]
        start = think_ends[-1] if think_ends else 0
    return scan[start:end]


def parse_answer_boxes(
    text: str,
    ndim: int,
    *,
    codec: BoxCodec | None = None,
    grid_shape: Sequence[int] | None = None,
    max_boxes: int = MAX_ANSWER_BOXES,
) -> tuple[tuple[float, ...], ...]:
    """Every box of a completion's answer, for phrases that refer to several findings (text-grid units).

    The answer is the one :func:`parse_completion` (lenient) reads, and only a complete answer counts: no
    boxes when it reports no usable box there. Inside it, every list of ``2 * ndim`` numbers is a box, in order,
    decoded and validated exactly as the single box is (zero-extent and non-finite lists are skipped,
    reversed corners reordered); repeated boxes count once; at most ``max_boxes``. An answer whose one box is
    written as bare numbers gives that box. ``parse_completion``'s single-box result is unchanged by this.
    Never raises on any text (arguments are checked: ConfigError).
    """
    if max_boxes < 1:
        raise ConfigError(f"max_boxes must be >= 1, got {max_boxes}")
    parsed = parse_completion(text, ndim, mode="lenient", codec=codec, grid_shape=grid_shape)
    if not parsed.ok or parsed.box is None:
        return ()
    scan = _ascii_digits(text[-MAX_SCAN_CHARS:])
    segment = _last_answer_segment(scan)
    if segment is None:
        return (parsed.box,)
    grid = None if grid_shape is None else tuple(int(s) for s in grid_shape)
    boxes: list[tuple[float, ...]] = []
    for cand in _candidates(segment, ndim):
        if len(cand.numbers) != 2 * ndim:
            continue
        box = _convert(cand.numbers, ndim, codec, grid).box
        if box is not None and box not in boxes:
            boxes.append(box)
            if len(boxes) == max_boxes:
                break
    return tuple(boxes) or (parsed.box,)
