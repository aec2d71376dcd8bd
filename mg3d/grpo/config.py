"""Typed configuration blocks of the training module (optimiser, warm start, held-out evaluation).

The policy, prompt and rollout blocks live beside the code they configure (``mg3d.model.PolicyConfig``,
``mg3d.grounding.PromptConfig``, ``mg3d.generation.RolloutConfig``); LightningCLI reads them all from YAML.

Each block is a dataclass so that ``--print_config`` shows every knob with its default and type, and so that
a typo in a YAML key is an error at start-up rather than a silently ignored setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mg3d.errors import ConfigError

__all__ = ["EvalConfig", "OptimConfig", "WarmStartConfig"]


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (TRL/MedGround-R1 defaults: lr 1e-6, linear decay, no warm-up)."""

    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    #: torch's fused AdamW kernel (what TRL/transformers use by default) instead of the per-tensor loop:
    #: several times faster per step for a model of many small tensors; results differ in the last bits
    #: (≈ 1 float32 ulp per step), so it is opt-in and the demo's numbers stay as they were.
    fused: bool = False

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ConfigError(f"optim.max_grad_norm must be >= 0 (0 = off), got {self.max_grad_norm}")


@dataclass
class WarmStartConfig:
    """Supervised warm start before GRPO (the tiny random model needs it; real checkpoints set ``steps: 0``).

    The first ``steps`` optimiser steps are teacher-forced cross-entropy on the answer (the true box written
    in the prompt template); the optimiser state is reset when GRPO starts, as a separate run would.
    """

    steps: int = 0
    lr: float = 1e-3
    schedule: Literal["constant", "linear", "cosine"] = "constant"


@dataclass
class EvalConfig:
    """Held-out evaluation inside ``fit``: before GRPO (after the warm start) and at the end, greedy and sampled.

    The result is printed as a table and written to ``<log_dir>/grpo_summary.json``. ``max_new_tokens=None``
    (default) is the budget that fits the prompt template (:func:`mg3d.prompts.default_max_new_tokens`: 256 for
    templates that reason, 48 otherwise), the same default ``Grounder`` uses for a plain model folder.
    """

    enabled: bool = True
    max_samples: int | None = None
    batch_size: int = 16
    max_new_tokens: int | None = None
    sampled: bool = True
    sampled_temperature: float = 1.0
