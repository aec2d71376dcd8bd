"""Format reward: does the completion have the shape the template asks for?

``strict`` is MedGround-R1's rule (a full match of ``<think>…</think><answer>…{…[x1, y1, x2, y2]…}…</answer>``;
for volumes the six-integer analogue). ``lenient`` asks only that the answer parses to a box of the right
dimension from a complete ``<answer>``. An optional sanity component rewards a non-trivial ``<think>`` and a
bounded length, for templates whose reasoning should not collapse to nothing or run away.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np

from mg3d.errors import ConfigError
from mg3d.rewards.base import ParsedBatch, Reward, register_reward

__all__ = ["FormatReward", "think_length"]

_THINK_RE = re.compile(r"<think>(.*?)</think>", re.IGNORECASE | re.DOTALL)


def think_length(text: str) -> int:
    """Characters of reasoning inside the first complete ``<think>…</think>`` (stripped); 0 without one."""
    m = _THINK_RE.search(text)
    return len(m.group(1).strip()) if m else 0


@register_reward("format")
class FormatReward(Reward):
    """``(1 − w) · format + w · sanity`` in [0, 1].

    ``format`` is 1 when the completion passes the ``mode`` rule, else 0. ``sanity`` (only when
    ``sanity_weight`` = w > 0) is 1 when the ``<think>`` holds at least ``min_think_chars`` characters and the
    whole completion at most ``max_chars`` (if set). Never NaN: every completion has a format.
    """

    value_range = (0.0, 1.0)

    def __init__(
        self,
        *,
        mode: Literal["strict", "lenient"] = "strict",
        sanity_weight: float = 0.0,
        min_think_chars: int = 1,
        max_chars: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        if mode not in ("strict", "lenient"):
            raise ConfigError(f"format reward: mode must be 'strict' or 'lenient', got {mode!r}")
        if not 0.0 <= sanity_weight <= 1.0:
            raise ConfigError(f"format reward: sanity_weight must be in [0, 1], got {sanity_weight}")
        if min_think_chars < 0 or (max_chars is not None and max_chars <= 0):
            raise ConfigError("format reward: min_think_chars must be ≥ 0 and max_chars > 0")
        self.mode = mode
        self.sanity_weight = float(sanity_weight)
        self.min_think_chars = int(min_think_chars)
        self.max_chars = max_chars

    def score(self, batch: ParsedBatch) -> np.ndarray:
        if self.mode == "strict":
            fmt = batch.strict_format_ok.astype(np.float64)
        else:
            fmt = np.asarray([p.box is not None and p.ok for p in batch.lenient_parsed], dtype=np.float64)
        if self.sanity_weight == 0.0:
            return fmt
        sane = np.asarray(
            [
                think_length(text) >= self.min_think_chars
                and (self.max_chars is None or len(text) <= self.max_chars)
                for text in batch.texts
            ],
            dtype=np.float64,
        )
        return (1.0 - self.sanity_weight) * fmt + self.sanity_weight * sane
