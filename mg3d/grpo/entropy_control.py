r"""Adaptive entropy-bonus coefficient (Skywork-OR1), as TRL 1.16's ``use_adaptive_entropy`` runs it.

The bonus subtracts c · H̄ from the loss (:func:`mg3d.grpo.loss.entropy_bonus`). With adaptive control, c is a
small state machine advanced once per optimiser step::

    H_w  = Σ H m_eff / Σ m_eff over every micro-batch of the step, on all ranks (the window-global entropy)
    c   ← min(c + Δ, c_max)  if H_w ≤ H_target,   else max(c − Δ, c_min)
    applied c = c if the previous step's H_w ≤ H_target else 0   (+∞ before the first step: no bonus)

so every micro-batch of one step applies the same coefficient, and the bonus only acts while entropy is at or
below the target. The state (c, last H_w) is saved in Lightning checkpoints so a resumed run continues the
same curve (TRL writes ``entropy_ctrl_state.json``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["AdaptiveEntropyCoef"]


class AdaptiveEntropyCoef:
    """The coefficient c and the entropy window of the current optimiser step.

    Args:
        coef: the initial c (TRL's ``entropy_coef``).
        target, delta, coef_min, coef_max: TRL's ``entropy_target``, ``entropy_coef_delta``,
            ``entropy_coef_min``, ``entropy_coef_max``.
    """

    def __init__(self, coef: float, target: float, delta: float, coef_min: float, coef_max: float) -> None:
        self.coef = float(coef)
        self.target = float(target)
        self.delta = float(delta)
        self.coef_min = float(coef_min)
        self.coef_max = float(coef_max)
        self.last_world_entropy = math.inf
        self._window: Tensor | None = None

    def applied(self) -> float:
        """The coefficient every micro-batch of the current step applies."""
        return self.coef if self.last_world_entropy <= self.target else 0.0

    def observe(self, entropies: Tensor, effective_mask: Tensor) -> None:
        """Add one training micro-batch's entropy sum and token count to the window (no gradient)."""
        m = effective_mask.to(entropies.dtype)
        stats = torch.stack([(entropies * m).sum(), m.sum()]).detach()
        self._window = stats if self._window is None else self._window + stats

    def end_step(self, all_reduce_sum: Callable[[Tensor], Tensor] | None = None) -> None:
        """At an optimiser-step boundary: the window-global entropy moves c, then the window is reset."""
        if self._window is None:
            return
        totals = self._window if all_reduce_sum is None else all_reduce_sum(self._window)
        world_entropy = float(totals[0] / totals[1].clamp(min=1.0))
        if world_entropy <= self.target:
            self.coef = min(self.coef + self.delta, self.coef_max)
        else:
            self.coef = max(self.coef - self.delta, self.coef_min)
        self.last_world_entropy = world_entropy
        self._window = None

    def state_dict(self) -> dict[str, float]:
        return {"entropy_coef": self.coef, "last_world_entropy": self.last_world_entropy}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.coef = float(state["entropy_coef"])
        self.last_world_entropy = float(state["last_world_entropy"])
        self._window = None
