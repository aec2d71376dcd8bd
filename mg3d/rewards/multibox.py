r"""Matched box F1: a reward for phrases that refer to several findings (MS-CXR and ChestX-ray8 have them).

The best-match rewards (``iou``, ``iou_binary``) score one predicted box against the closest ground-truth box,
so naming one of three findings earns full marks. Here the answer may list several boxes
(:func:`mg3d.prompts.read_answer_boxes`), each ground-truth box can be claimed by at most one prediction, and
the score is an F1 over the one-to-one matching that scores best (Hungarian assignment,
``scipy.optimize.linear_sum_assignment``). With P predicted and T true boxes and matching M::

    soft (threshold=None):   F1 = 2 Σ_{(p,t) ∈ M} IoU(p, t) / (P + T)
    hard (threshold=τ):      F1 = 2 |{(p,t) ∈ M : IoU(p, t) ≥ τ}| / (P + T)    (M maximises that count)

Both are in [0, 1], 1 exactly when the predictions are the true boxes (soft) or each matches its own true box
with IoU ≥ τ and none is left over (hard); missing and extra boxes both cost. For one true and one predicted
box the soft F1 is the IoU. Boxes are compared in the voxel frame, as for the other spatial rewards, in 2D and
3D; a completion without a complete answer with a usable box gets ``failure_value`` (0).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from mg3d.boxes import iou_matrix
from mg3d.errors import ConfigError
from mg3d.prompts import MAX_ANSWER_BOXES, read_answer_boxes
from mg3d.rewards.base import ParsedBatch, Reward, register_reward

__all__ = ["MultiBoxF1Reward", "matched_f1"]


def matched_f1(predicted: np.ndarray, truth: np.ndarray, threshold: float | None = None) -> float:
    """F1 of the best one-to-one matching of ``predicted`` (P, 2·d) to ``truth`` (T, 2·d) boxes (see the module).

    0 when either side is empty.
    """
    p, t = len(predicted), len(truth)
    if p == 0 or t == 0:
        return 0.0
    iou = np.clip(np.nan_to_num(iou_matrix(np.array(predicted), np.array(truth)), nan=0.0), 0.0, 1.0)
    gain = iou if threshold is None else (iou >= threshold).astype(np.float64)
    rows, cols = linear_sum_assignment(gain, maximize=True)
    return float(min(1.0, 2.0 * gain[rows, cols].sum() / (p + t)))


@register_reward("box_f1")
class MultiBoxF1Reward(Reward):
    """Matched IoU F1 over all predicted and all ground-truth boxes of a phrase, in [0, 1].

    Args:
        threshold: ``None`` for the soft F1 (matched IoUs summed), or τ for the hard F1 (matches with IoU ≥ τ
            counted; MS-CXR-style Acc@τ generalised to several boxes).
        max_boxes: at most this many predicted boxes are read from one answer (the rest are ignored).
        failure_value: the reward of a completion without a usable box.
        name: logging name (default ``box_f1``).
    """

    value_range = (0.0, 1.0)

    def __init__(
        self,
        *,
        threshold: float | None = None,
        max_boxes: int = MAX_ANSWER_BOXES,
        failure_value: float = 0.0,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise ConfigError(f"{self.name}: threshold must be in (0, 1] or null, got {threshold}")
        if max_boxes < 1:
            raise ConfigError(f"{self.name}: max_boxes must be >= 1, got {max_boxes}")
        if not 0.0 <= failure_value <= 1.0:
            raise ConfigError(f"{self.name}: failure_value {failure_value} is outside [0, 1]")
        self.threshold = None if threshold is None else float(threshold)
        self.max_boxes = int(max_boxes)
        self.failure_value = float(failure_value)

    def score(self, batch: ParsedBatch) -> np.ndarray:
        out = np.full(batch.n, self.failure_value)
        for i, (text, target) in enumerate(zip(batch.texts, batch.targets)):
            predicted = read_answer_boxes(
                text,
                target.ndim,
                frame=target.frame,
                codec=batch.codec,
                grid_shape=target.grid_shape,
                max_boxes=self.max_boxes,
            )
            if len(predicted):
                out[i] = matched_f1(predicted, target.boxes, self.threshold)
        return out
