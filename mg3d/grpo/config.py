"""Typed configuration blocks of the training module, as LightningCLI reads them from YAML.

Each block is a dataclass so that ``--print_config`` shows every knob with its default and type, and so that
a typo in a YAML key is an error at start-up rather than a silently ignored setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from mg3d.errors import ConfigError
from mg3d.model import Policy, build_tiny_policy, load_policy
from mg3d.prompts import check_warm_start_options

__all__ = ["EvalConfig", "OptimConfig", "PolicyConfig", "PromptConfig", "WarmStartConfig"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PolicyConfig:
    """Which policy to train: a local Qwen2-VL / Qwen2.5-VL checkpoint folder, or the tiny offline model.

    Args:
        checkpoint: a local ``save_pretrained`` folder (weights, tokenizer, preprocessor); ``None`` builds the
            tiny randomly initialised model from the sizes below (the CPU default: nothing is downloaded).
        family: ``qwen2.5-vl`` or ``qwen2-vl`` (tiny model only; a checkpoint says what it is).
        dtype: ``float32``, ``bfloat16`` or ``float16`` (``auto`` keeps a checkpoint's own).
        attn_implementation: e.g. ``sdpa``, ``flash_attention_2`` (GPU), or ``None`` for the default.
        freeze_vision: keep the vision tower fixed (fewer trainable parameters; common for 7B runs).
        gradient_checkpointing: trade compute for memory on large models.
        seed: initialisation seed of the tiny model; ``None`` (default) uses the run's seed (``GRPOModule``
            passes its ``sampling_seed``, which the CLI links to ``seed_everything``), so seeds vary the init.
        extra_tokens: tokens added to the tiny tokenizer as single tokens (e.g. ``<answer>``), so short answers
            cost fewer decoding steps.
    """

    checkpoint: str | None = None
    family: Literal["qwen2.5-vl", "qwen2-vl"] = "qwen2.5-vl"
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_depth: int = 2
    vision_hidden: int = 128
    vision_intermediate: int = 256
    seed: int | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str | None = None
    freeze_vision: bool = False
    gradient_checkpointing: bool = False
    extra_tokens: list[str] = field(default_factory=lambda: ["<answer>", "</answer>"])

    def build(self, default_seed: int = 0) -> Policy:
        """The policy; a tiny model is initialised from ``seed``, or ``default_seed`` when ``seed`` is ``None``."""
        if self.checkpoint is not None:
            return load_policy(
                self.checkpoint,
                dtype="auto" if self.dtype == "auto" else _DTYPES[self.dtype],
                attn_implementation=self.attn_implementation,
                freeze_vision=self.freeze_vision,
                gradient_checkpointing=self.gradient_checkpointing,
            )
        if self.dtype == "auto":
            raise ConfigError(
                "policy.dtype='auto' needs a checkpoint; the tiny model is built in float32 by default"
            )
        return build_tiny_policy(
            family=self.family,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            vision_depth=self.vision_depth,
            vision_hidden=self.vision_hidden,
            vision_intermediate=self.vision_intermediate,
            extra_tokens=tuple(self.extra_tokens),
            seed=self.seed if self.seed is not None else default_seed,
            dtype=_DTYPES[self.dtype],
            attn_implementation=self.attn_implementation or "sdpa",
            freeze_vision=self.freeze_vision,
            gradient_checkpointing=self.gradient_checkpointing,
        )


def _whole_number(value: object) -> object:
    """``8.0`` or ``"8"`` (YAML, command line) as the int 8; anything else unchanged, for the check to refuse."""
    if isinstance(value, bool | int):
        return value
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return value
    return int(number) if math.isfinite(number) and number.is_integer() else value


@dataclass
class PromptConfig:
    """How a sample is asked: template, how volumes are shown, the token budget, laterality hint, parsing.

    Args:
        instruction: the user turn. ``template`` is the template's own instruction; ``terse`` asks
            "Find {phrase}." (the ``terse`` template's wording) while keeping the template's answer format and
            ``<think>`` tags — for tiny byte-level models, where the ``chain_of_box`` instruction is ~700
            tokens and makes every step about 10× slower.
        warm_start_reasoning: what the supervised warm start writes inside ``<think>`` for think templates:
            ``empty`` (``<think></think>``), or ``coarse_box`` — a box trail ``the lesion [coarse box]``, the
            answer box widened outward to ``trail_grid``, so a Chain-of-Box model learns to write a box the
            ``chain_of_box`` reward can score.
        trail_grid: coarse cell size per text-grid axis (x, y[, z]) of that trail box; 2 or 3 positive
            integers (2D samples use the first two).
    """

    template: Literal["terse", "plain", "r1", "chain_of_box"] = "r1"
    volume_strategy: Literal["video", "slices", "montage"] = "video"
    max_vision_tokens: int = 1024
    laterality: bool = False
    parse_mode: Literal["lenient", "strict"] = "lenient"
    system_prompt: str | None = None
    instruction: Literal["template", "terse"] = "template"
    warm_start_reasoning: Literal["empty", "coarse_box"] = "empty"
    # A tuple default, not a default factory: a config pickled into a checkpoint before this field existed
    # then reads the class attribute (mg3d's safe checkpoint loader refuses classes with a __setstate__).
    trail_grid: tuple[int, ...] = (8, 8, 4)

    def __post_init__(self) -> None:
        grid = self.trail_grid
        if isinstance(grid, str):  # "8,8,4" from a command line
            grid = [v.strip() for v in grid.split(",")]
        if isinstance(grid, list | tuple):  # anything else is refused by check_warm_start_options
            grid = [_whole_number(v) for v in grid]
        checked = check_warm_start_options(
            self.instruction, self.warm_start_reasoning, grid, prefix="prompt."
        )
        self.trail_grid = checked


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

    The result is printed as a table and written to ``<log_dir>/grpo_summary.json``.
    """

    enabled: bool = True
    max_samples: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 48
    sampled: bool = True
    sampled_temperature: float = 1.0
