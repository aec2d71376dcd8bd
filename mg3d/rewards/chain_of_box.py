"""Chain-of-Box consistency (beyond the paper, off by default): is the reasoning's box trail usable and coherent?

The Chain-of-Box template asks the model to append a box to every region of interest it names in
``<think>``. Nothing in the paper's rewards checks those boxes, so a model can write any numbers there. This
reward scores two things, in the text grid (containment ratios do not change under the axis-aligned maps of a
``CoordinateFrame``, so no mapping is needed):

* **well-formed** — the share of numeric lists in ``<think>`` that are valid boxes of the right dimension
  lying inside the image grid (tolerance ``grid_tolerance`` text units);
* **consistent** — the answer box lies inside (or near: each think box grown by ``slack`` of its size per
  side) a region box named in ``<think>``: ``max_k |answer ∩ grown_k| / |answer|``; 0 without an answer box.

``reward = w · well_formed + (1 − w) · consistent`` in [0, 1]; NaN when ``<think>`` holds no box at all (the
reward does not apply to reasoning without boxes — combine it with the format reward to require them).
"""

from __future__ import annotations

import re

import numpy as np

from mg3d.errors import ConfigError
from mg3d.rewards.base import ParsedBatch, Reward, register_reward

__all__ = ["ChainOfBoxReward"]

_THINK_RE = re.compile(r"<think>(.*?)(?:</think>|<answer>|$)", re.IGNORECASE | re.DOTALL)
# A bracketed list of numbers (what a box attempt looks like), whatever its length.
_LIST_RE = re.compile(r"\[\s*[-+]?[0-9.][0-9.eE+\-\s,]*\]")


def _count_lists(text: str) -> int:
    m = _THINK_RE.search(text[-20_000:])
    return len(_LIST_RE.findall(m.group(1))) if m else 0


@register_reward("chain_of_box")
class ChainOfBoxReward(Reward):
    """Well-formedness of the ``<think>`` boxes and consistency of the answer with them; see the module doc."""

    value_range = (0.0, 1.0)

    def __init__(
        self,
        *,
        wellformed_weight: float = 0.5,
        slack: float = 0.1,
        grid_tolerance: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        if not 0.0 <= wellformed_weight <= 1.0:
            raise ConfigError(f"{self.name}: wellformed_weight must be in [0, 1], got {wellformed_weight}")
        if slack < 0 or grid_tolerance < 0:
            raise ConfigError(f"{self.name}: slack and grid_tolerance must be ≥ 0")
        self.wellformed_weight = float(wellformed_weight)
        self.slack = float(slack)
        self.grid_tolerance = float(grid_tolerance)

    def score(self, batch: ParsedBatch) -> np.ndarray:
        out = np.full(batch.n, np.nan)
        for i, (parsed, target, text) in enumerate(zip(batch.lenient_parsed, batch.targets, batch.texts)):
            boxes = np.asarray(parsed.think_boxes, dtype=np.float64).reshape(-1, 2 * target.ndim)
            attempts = max(_count_lists(text), boxes.shape[0])
            if attempts == 0:
                continue
            d = target.ndim
            grid = target.grid_shape
            if grid is not None and boxes.shape[0]:
                upper = np.asarray(grid, dtype=np.float64) + self.grid_tolerance
                inside = np.all(boxes[:, :d] >= -self.grid_tolerance, axis=1) & np.all(
                    boxes[:, d:] <= upper, axis=1
                )
            else:
                inside = np.ones(boxes.shape[0], dtype=bool)
            well_formed = float(inside.sum()) / attempts
            answer = batch.pred_text[i]
            consistent = 0.0
            if answer is not None and inside.any():
                good = boxes[inside]
                grow = (good[:, d:] - good[:, :d]) * self.slack
                lo, hi = good[:, :d] - grow, good[:, d:] + grow
                inter = np.prod(
                    np.clip(np.minimum(hi, answer[d:]) - np.maximum(lo, answer[:d]), 0, None), axis=1
                )
                volume = float(np.prod(answer[d:] - answer[:d]))
                consistent = float(np.max(inter) / volume) if volume > 0 else 0.0
            w = self.wellformed_weight
            out[i] = w * well_formed + (1.0 - w) * min(consistent, 1.0)
        return out
