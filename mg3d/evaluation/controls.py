"""Controls that tell a policy that looks at the image from one that answers from the prompt alone.

A held-out mIoU means little on its own: a policy can score well by writing the box where targets usually
are (the same box for every case) or by reading the phrase. Two cheap checks separate that from grounding:

* **image swap** — each held-out phrase is asked with another case's image and scored against its *own*
  target. A policy that looks loses most of its lead; one that reads only the phrase does not move.
* **distinct boxes** — how many different boxes the policy wrote; one box for every case is a prior.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mg3d.evaluation.scoring import ScoredPrediction


def swap_images(samples: Sequence[Mapping[str, Any]], shift: int = 1) -> list[dict[str, Any]] | None:
    """Each sample with the image tensor of the sample ``shift`` places later (cyclically), all else its own.

    The phrase, ground truth and coordinate frames stay the sample's own, so the answer is scored against the
    sample's target in its own frame. That is only meaningful when every image has the same tensor shape (one
    model grid, as the demos' pipelines produce); otherwise, or with fewer than two samples, ``None``.
    """
    n = len(samples)
    if n < 2 or shift % n == 0:
        return None
    shapes = {tuple(getattr(s["image"], "shape", ())) for s in samples}
    if len(shapes) != 1:
        return None
    return [{**samples[i], "image": samples[(i + shift) % n]["image"]} for i in range(n)]


def distinct_boxes(rows: Sequence[ScoredPrediction]) -> int:
    """The number of different boxes (as the policy wrote them) among the parsed predictions."""
    return len({tuple(r.box_raw) for r in rows if r.parse_ok and r.box_raw})
