r"""The bookkeeping of one GRPO step: how a generation batch is cut into optimiser steps and micro-batches, the
normalisation inputs TRL 1.16 would give each micro-batch, and the reference model (frozen, or synced).

Batch geometry, with TRL's names (``docs/grpo.md`` has the table)::

    generation batch  = the DataModule batch: B prompts × G completions on each of P ranks
                        (TRL's generation_batch_size = B · G · P)
    S  = steps_per_generation          micro-batches per generation batch (TRL's meaning)
    GA = gradient_accumulation_steps   micro-batches per optimiser step
    S / GA                             optimiser steps per generation batch (× μ = num_iterations)

Optimiser step k of a generation batch trains on the prompts ``keep[k::S/GA]`` (strided, so every step sees a
spread of the batch), cut into GA contiguous micro-batches. ``micro_batch_size`` is mg3d's other spelling of
GA: micro-batches of that many prompts, however many that makes.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mg3d.errors import ConfigError
from mg3d.generation import Rollout

log = logging.getLogger(__name__)

__all__ = ["BatchGeometry", "ReferenceModel", "subset_rollout", "trl_normalisation"]


@dataclass(frozen=True)
class BatchGeometry:
    """How a generation batch becomes optimiser steps and micro-batches.

    Attributes:
        optimizer_steps: optimiser steps per generation batch and iteration (TRL's S / GA).
        grad_accum_steps: micro-batches per optimiser step (TRL's GA); ignored when ``micro_batch_size`` is set.
        micro_batch_size: prompts per micro-batch (mg3d's spelling of gradient accumulation), or ``None``.
    """

    optimizer_steps: int = 1
    grad_accum_steps: int = 1
    micro_batch_size: int | None = None

    @classmethod
    def from_options(
        cls, steps_per_generation: int | None, gradient_accumulation_steps: int, micro_batch_size: int | None
    ) -> BatchGeometry:
        """Resolve the module's options, TRL's rules first: S defaults to GA and must be a multiple of it.

        ``steps_per_generation`` together with ``micro_batch_size`` is how mg3d configs before issue 22 asked for
        several optimiser steps, each cut into micro-batches: read with that meaning, with a deprecation warning.
        """
        ga = gradient_accumulation_steps
        if ga < 1:
            raise ConfigError(f"gradient_accumulation_steps must be >= 1, got {ga}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be >= 1 or null, got {micro_batch_size}")
        steps = ga if steps_per_generation is None else steps_per_generation
        if steps < 1:
            raise ConfigError(f"steps_per_generation must be >= 1, got {steps}")
        if micro_batch_size is not None:
            if ga != 1:
                raise ConfigError(
                    f"micro_batch_size={micro_batch_size} and gradient_accumulation_steps={ga} both set the "
                    "micro-batches of an optimiser step: set one"
                )
            if steps > 1:
                log.warning(
                    "steps_per_generation=%d with micro_batch_size=%d is read with its old mg3d meaning: %d "
                    "optimiser steps per generation batch, each cut into micro-batches of %d prompts. It is "
                    "deprecated: steps_per_generation now counts micro-batches as in TRL; write "
                    "steps_per_generation = %d x (micro-batches per step) and gradient_accumulation_steps = "
                    "(micro-batches per step) instead of micro_batch_size.",
                    steps, micro_batch_size, steps, micro_batch_size, steps,
                )  # fmt: skip
            return cls(optimizer_steps=steps, grad_accum_steps=1, micro_batch_size=micro_batch_size)
        if steps % ga != 0:
            raise ConfigError(
                f"steps_per_generation={steps} must be a multiple of gradient_accumulation_steps={ga} "
                "(micro-batches per generation batch vs per optimiser step)"
            )
        return cls(optimizer_steps=steps // ga, grad_accum_steps=ga)

    def plan(self, keep: Sequence[int]) -> list[list[list[int]]]:
        """Prompt indices per optimiser step, then per micro-batch (empty micro-batches dropped)."""
        keep = list(keep)
        n = self.optimizer_steps
        slices = [keep[i::n] for i in range(n)] if len(keep) >= n else [keep]
        out = []
        for prompts in slices:
            if self.micro_batch_size is not None:
                m = self.micro_batch_size
                chunks = [prompts[i : i + m] for i in range(0, len(prompts), m)]
            else:
                ga = self.grad_accum_steps
                chunks = [prompts[k * len(prompts) // ga : (k + 1) * len(prompts) // ga] for k in range(ga)]
            out.append([c for c in chunks if c])
        return out


def trl_normalisation(
    num_items: Tensor, micro_batches: int, optimizer_steps: int, max_completion_length: int, world_size: int
) -> dict[str, Any]:
    """The normalisation inputs of ``grpo_loss`` for one micro-batch, with TRL 1.16's meanings.

    TRL's ``gradient_accumulation_steps`` (GA) is the micro-batches of one optimiser step and its
    ``steps_per_generation`` the micro-batches of one generation batch; here a generation batch is
    ``optimizer_steps`` slices of ``micro_batches`` micro-batches each, so TRL's S is their product and dapo's
    divisor N/P · GA/S is N / (P · optimizer_steps) whatever the micro-batching. dr_grpo divides by the
    generation limit L_max (TRL's ``max_completion_length``), not by the longest completion of the batch.
    """
    return {
        "num_items_in_batch": num_items,
        "max_completion_length": max_completion_length,
        "grad_accum_steps": micro_batches,
        "steps_per_generation": micro_batches * optimizer_steps,
        "num_processes": world_size,
    }


def subset_rollout(rollout: Rollout, prompts: Sequence[int]) -> tuple[Rollout, Tensor]:
    """The completions of some prompts as a rollout of their own (prompt indices renumbered from 0)."""
    prompts = list(prompts)
    rows = torch.cat([torch.nonzero(rollout.prompt_index == p).flatten() for p in prompts])
    renumber = {p: i for i, p in enumerate(prompts)}
    sub = Rollout(
        prompt_ids=rollout.prompt_ids[prompts],
        prompt_mask=rollout.prompt_mask[prompts],
        completion_ids=rollout.completion_ids[rows],
        completion_mask=rollout.completion_mask[rows],
        texts=[rollout.texts[i] for i in rows.tolist()],
        is_truncated=rollout.is_truncated[rows],
        prompt_index=torch.tensor([renumber[int(p)] for p in rollout.prompt_index[rows].tolist()]),
        num_generations=rollout.num_generations,
    )
    return sub, rows


class ReferenceModel:
    """The frozen reference policy of the KL term (β > 0), optionally synced towards the policy (TR-DPO).

    It is a copy of the policy's initial weights, kept out of the optimiser and out of checkpoints (a resumed run
    rebuilds it from the policy's initial weights — so with ``sync_ref_model`` the mixing restarts there too,
    since the copy is not saved). TRL's ``SyncRefModelCallback`` rule, after every optimiser step::

        if global_step % ref_model_sync_steps == 0:   π_ref ← α π_θ + (1 − α) π_ref   (parameter-wise)
    """

    def __init__(self, policy_model: torch.nn.Module) -> None:
        self.model = copy.deepcopy(policy_model).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def mix(self, policy_model: torch.nn.Module, alpha: float) -> None:
        """π_ref ← α π_θ + (1 − α) π_ref over all parameters (in the same order, as TRL zips them)."""
        for ref_param, param in zip(self.model.parameters(), policy_model.parameters(), strict=True):
            ref_param.data.mul_(1.0 - alpha).add_(param.data, alpha=alpha)

    def maybe_sync(self, policy_model: torch.nn.Module, global_step: int, alpha: float, every: int) -> bool:
        """Mix if ``global_step`` (optimiser steps taken) is a multiple of ``every``; whether it did."""
        if global_step <= 0 or global_step % every != 0 or math.isclose(alpha, 0.0):
            return False
        self.mix(policy_model, alpha)
        return True
