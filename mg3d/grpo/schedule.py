"""The learning-rate multiplier of a run with an optional supervised warm start followed by GRPO.

A callable class rather than a lambda so that ``LambdaLR.state_dict`` stores it and a resumed run continues
on the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mg3d.errors import ConfigError

_SHAPES = ("constant", "linear", "cosine")


def _decay(shape: str, frac: float) -> float:
    frac = min(max(frac, 0.0), 1.0)
    if shape == "constant":
        return 1.0
    if shape == "linear":
        return 1.0 - frac
    return 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclass
class PhaseSchedule:
    """Multiplier of the GRPO learning rate at optimiser step ``step``.

    Steps ``[0, warm_steps)``: ``warm_lr_scale`` × the warm-start shape over the warm-start steps.
    Steps ``[warm_steps, total_steps)``: linear warm-up over ``warmup_steps``, then the GRPO shape (decaying to
    0 at ``total_steps``; with no known total, only ``constant`` is possible).
    """

    warm_steps: int = 0
    warm_lr_scale: float = 1.0
    warm_schedule: str = "constant"
    warmup_steps: int = 0
    schedule: str = "linear"
    total_steps: int | None = None

    def __post_init__(self) -> None:
        for name in (self.warm_schedule, self.schedule):
            if name not in _SHAPES:
                raise ConfigError(f"unknown learning-rate schedule {name!r}; use one of {_SHAPES}")
        if self.schedule != "constant" and self.total_steps is None:
            raise ConfigError(
                f"a {self.schedule!r} learning-rate schedule needs trainer.max_steps; set it or use 'constant'"
            )
        # max_steps == warm_start.steps is a supervised-only run (e.g. pretraining a policy for GRPO later)
        if self.total_steps is not None and self.total_steps < self.warm_steps:
            raise ConfigError(
                f"trainer.max_steps={self.total_steps} ends before warm_start.steps={self.warm_steps}; "
                "set max_steps ≥ warm_start.steps (equal: a supervised-only run)"
            )

    def __call__(self, step: int) -> float:
        if step < self.warm_steps:
            return self.warm_lr_scale * _decay(self.warm_schedule, step / max(self.warm_steps, 1))
        g = step - self.warm_steps
        if g < self.warmup_steps:
            return (g + 1) / self.warmup_steps
        if self.total_steps is None:
            return 1.0
        span = max(self.total_steps - self.warm_steps - self.warmup_steps, 1)
        return _decay(self.schedule, (g - self.warmup_steps) / span)
