r"""GRPO maths, number for number equal to TRL 1.16.0's ``GRPOTrainer`` (pure torch, no model).

mg3d owns its GRPO loop because TRL has no 3D/video input path, but its maths must stay TRL's, so
that results, hyper-parameters and logged curves mean the same thing. ``tests/test_grpo_loss.py``
checks this file against TRL's own ``_compute_loss`` and ``_generate_and_score_completions``.

One file on purpose (about 600 lines): it is the paper appendix of mg3d — every loss type, the KL and the
normalisations read side by side, as TRL's one ``_compute_loss`` does. The advantages live in
:mod:`mg3d.grpo.advantages` and the non-clipped policy terms (cispo, sapo, vespo) and the off-policy sequence
mask in :mod:`mg3d.grpo.terms`, the per-token inputs (log-probs at temperature, completion and entropy masks) in
:mod:`mg3d.grpo.tokens`; this module re-exports the names it used to define.

Notation (one *generation batch* of prompts, each answered by a group of G completions):

* i indexes completions (rows), t completion tokens, g(i) the group of row i;
* m_{i,t} ∈ {0, 1} the loss mask: 1 up to and including the first EOS (§ ``completion_mask``);
* ℓp_{i,t} = log π_θ(o_{i,t} | q, o_{i,<t}) at the sampling temperature T (with gradient);
  ℓp^old (the policy that sampled, no gradient) and ℓp^ref (the frozen reference);
* A_i the advantage of row i, broadcast over its tokens.

The objective, per token, before aggregation (§ ``grpo_loss``)::

    w_{i,t}  = exp(ℓp_{i,t} − ℓp^old_{i,t})                           (token level)
    ŵ_{i,t}  = clip(w_{i,t}, 1 − ε_low, 1 + ε_high)
    w_{i,t} ← min(w_{i,t}, δ)                                         (only if δ is set)
    ℓ_{i,t}  = −min(w_{i,t} A_i, ŵ_{i,t} A_i) · h_{i,t} + β · KL_{i,t} (h: high-entropy mask, 1 if off)

(``cispo``, ``sapo`` and ``vespo`` replace the clipped term, see ``grpo_loss``) and one of the aggregations
(§ ``aggregate_loss``) turns ℓ into a scalar whose gradient, summed over gradient-accumulation micro-batches
and averaged over data-parallel ranks, is the intended mean. An optional entropy bonus is subtracted after
aggregation. ``docs/grpo.md`` gives each option's formula and when to use it.

Not implemented: the vLLM importance-sampling correction (mg3d samples with the policy itself, so the sampler
and trainer log-probs agree) and the MoE auxiliary loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mg3d.errors import ConfigError, DataError
from mg3d.grpo.advantages import (  # re-exported: this module was their home before issue 22
    ADVANTAGE_EPS,
    MULTI_OBJECTIVE_AGGREGATIONS,
    SCALE_REWARDS,
    GroupAdvantages,
    MultiObjectiveAggregation,
    ScaleRewards,
    decoupled_advantages,
    group_advantages,
    nanstd,
    resolve_scale_rewards,
)
from mg3d.grpo.entropy_control import AdaptiveEntropyCoef
from mg3d.grpo.terms import cispo_term, off_policy_sequence_mask, sapo_term, vespo_gamma_weights
from mg3d.grpo.tokens import (  # re-exported: this module was their home before issue 22
    AllGather,
    AllReduceSum,
    completion_mask,
    token_logps_and_entropies,
    top_entropy_mask,
)

__all__ = [
    "ADVANTAGE_EPS",
    "CLIPPED_LOSS_TYPES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "LOSS_TYPES",
    "MULTI_OBJECTIVE_AGGREGATIONS",
    "SCALE_REWARDS",
    "GRPOLossConfig",
    "GroupAdvantages",
    "aggregate_loss",
    "clipped_surrogate",
    "completion_mask",
    "decoupled_advantages",
    "entropy_bonus",
    "group_advantages",
    "grpo_loss",
    "k3_kl",
    "log_importance_weights",
    "nanstd",
    "needs_old_logps",
    "resolve_scale_rewards",
    "token_logps_and_entropies",
    "top_entropy_mask",
]

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
ImportanceSamplingLevel = Literal["token", "sequence"]

LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
#: Loss types whose policy term is the PPO clipped surrogate (and whose clip ratios are logged).
CLIPPED_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence")


def _identity(x: Tensor) -> Tensor:
    return x


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GRPOLossConfig:
    """Hyper-parameters of the GRPO objective; field names and defaults follow TRL 1.16's ``GRPOConfig``.

    Every field is TRL's name except two kept from older mg3d configs, each with TRL's name accepted as an
    alias (set either; both read the same value afterwards): ``epsilon_low`` = TRL's ``epsilon``, and
    ``kl_bias_correction`` = TRL's ``use_bias_correction_kl``. Formulas and when to use each option:
    ``docs/grpo.md``.

    Args:
        loss_type: the policy term and its aggregation: ``"grpo"`` (per-sequence mean, length-biased),
            ``"bnpo"`` (local token mean), ``"dr_grpo"`` (sum / (B · L_max)), ``"dapo"`` (global token
            mean over the generation batch; TRL's default), ``"cispo"`` (capped, detached ratio × A ℓp; global
            token mean), ``"sapo"`` (soft sigmoid gate; per-sequence mean), ``"luspo"`` (clipped; per-sequence
            *sum*, mean over rows), ``"vespo"`` (gamma-weighted A ℓp; global token mean).
        beta: β, weight of the k3 KL to the reference policy; 0 means no reference model is needed.
        epsilon_low: ε_low, lower clip range of the importance ratio (TRL's ``epsilon``).
        epsilon_high: ε_high, upper clip range (DAPO "clip-higher" uses 0.28); ``None`` means ε_low. For
            ``cispo`` it is the absolute cap ε_max on the ratio (ScaleRL recommends 5.0).
        delta: δ, cap on the *unclipped* ratio (INTELLECT-2 two-sided clipping); ``None`` is off.
            Must exceed 1, otherwise on-policy tokens with negative advantage would get no gradient.
        temperature: T, the sampling temperature; training log-probs are computed from logits / T.
        scale_rewards: ``"group"`` (or ``True``), ``"batch"`` or ``"none"`` (or ``False``).
        multi_objective_aggregation: ``"sum_then_normalize"`` (default) or ``"normalize_then_sum"`` (GDPO).
        mask_truncated_completions: drop completions without EOS from the loss (DAPO overlong filtering).
        top_entropy_quantile: ρ; only the top-ρ fraction of tokens by entropy enter the policy term.
        num_iterations: μ, optimisation passes over one generation batch; μ > 1 needs old log-probs.
        importance_sampling_level: ``"token"`` ratios, or one ``"sequence"`` ratio per row (GSPO).
        kl_bias_correction: multiply the KL by the (differentiable) ratio w, as TRL's
            ``use_bias_correction_kl`` (default ``True``) does; this changes the KL gradient even on-policy.
        sapo_temperature_pos, sapo_temperature_neg: SAPO's τ for positive / non-positive advantages.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's gamma shape (k, λ) by the
            sign of the advantage.
        off_policy_mask_threshold: δ_KL of DeepSeek-V3.2's off-policy sequence mask; ``None`` is off.
        entropy_coef: c, weight of the entropy bonus L ← L − c · mean H (0 = off); the initial value in
            adaptive mode.
        use_adaptive_entropy: adapt c each optimiser step towards ``entropy_target`` (Skywork-OR1): c moves up
            by ``entropy_coef_delta`` while the entropy is at or below the target, down otherwise, within
            [``entropy_coef_min``, ``entropy_coef_max``], and is applied only at or below the target.
        sync_ref_model: every ``ref_model_sync_steps`` optimiser steps mix the reference towards the policy,
            π_ref ← α π_θ + (1 − α) π_ref with α = ``ref_model_mixup_alpha`` (TR-DPO); needs β > 0.
        epsilon: TRL's name of ``epsilon_low`` (alias; read as ``None`` once resolved into ``epsilon_low``).
        use_bias_correction_kl: TRL's name of ``kl_bias_correction`` (alias; ``None`` once resolved).
    """

    loss_type: LossType = "dapo"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    temperature: float = 1.0
    scale_rewards: ScaleRewards | bool = "group"
    mask_truncated_completions: bool = False
    top_entropy_quantile: float = 1.0
    num_iterations: int = 1
    importance_sampling_level: ImportanceSamplingLevel = "token"
    kl_bias_correction: bool = True
    multi_objective_aggregation: MultiObjectiveAggregation = "sum_then_normalize"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    off_policy_mask_threshold: float | None = None
    entropy_coef: float = 0.0
    use_adaptive_entropy: bool = False
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    entropy_target: float = 0.2
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    epsilon: float | None = None
    use_bias_correction_kl: bool | None = None

    def __post_init__(self) -> None:
        # Frozen dataclass: resolve the TRL-named aliases and the "defaults to another field" values once, here.
        epsilon_low = _resolve_alias(self, "epsilon_low", "epsilon", 0.2)
        kl_bias_correction = _resolve_alias(self, "kl_bias_correction", "use_bias_correction_kl", True)
        epsilon_high = epsilon_low if self.epsilon_high is None else self.epsilon_high
        for name, value in (
            ("epsilon_low", epsilon_low),
            ("epsilon", None),  # resolved into epsilon_low: one value, so dataclasses.replace stays coherent
            ("kl_bias_correction", kl_bias_correction),
            ("use_bias_correction_kl", None),
            ("epsilon_high", epsilon_high),
            ("scale_rewards", resolve_scale_rewards(self.scale_rewards)),
        ):
            object.__setattr__(self, name, value)
        choices = (
            ("loss_type", LOSS_TYPES),
            ("importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS),
            ("multi_objective_aggregation", MULTI_OBJECTIVE_AGGREGATIONS),
        )
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"GRPOLossConfig.{name}={getattr(self, name)!r}: must be one of {allowed}")
        positive = ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_lambda_pos", "vespo_lambda_neg")
        checks = [
            (math.isfinite(self.beta) and self.beta >= 0, f"beta={self.beta} must be finite and >= 0"),
            (0 <= epsilon_low < 1, f"epsilon_low={epsilon_low} must be in [0, 1)"),
            (
                math.isfinite(epsilon_high) and epsilon_high >= 0,
                f"epsilon_high={epsilon_high} must be finite and >= 0",
            ),
            (self.delta is None or self.delta > 1, f"delta={self.delta} must be > 1 (or None to disable)"),
            (
                math.isfinite(self.temperature) and self.temperature > 0,
                f"temperature={self.temperature} must be > 0",
            ),
            (
                0 <= self.top_entropy_quantile <= 1,
                f"top_entropy_quantile={self.top_entropy_quantile} must be in [0, 1]",
            ),
            (self.num_iterations >= 1, f"num_iterations={self.num_iterations} must be >= 1"),
            *[(getattr(self, n) > 0, f"{n}={getattr(self, n)} must be > 0") for n in positive],
            (
                self.off_policy_mask_threshold is None or math.isfinite(self.off_policy_mask_threshold),
                f"off_policy_mask_threshold={self.off_policy_mask_threshold} must be finite (or None)",
            ),
            (math.isfinite(self.entropy_coef), f"entropy_coef={self.entropy_coef} must be finite"),
            (
                self.entropy_coef_min <= self.entropy_coef_max and self.entropy_coef_delta >= 0,
                f"entropy_coef_min={self.entropy_coef_min} must be <= entropy_coef_max={self.entropy_coef_max} "
                f"and entropy_coef_delta={self.entropy_coef_delta} >= 0",
            ),
            (
                not self.sync_ref_model or self.beta > 0,
                "sync_ref_model=True needs beta > 0: with beta=0 there is no reference model to synchronise",
            ),
            (
                0 <= self.ref_model_mixup_alpha <= 1,
                f"ref_model_mixup_alpha={self.ref_model_mixup_alpha} must be in [0, 1]",
            ),
            (
                self.ref_model_sync_steps >= 1,
                f"ref_model_sync_steps={self.ref_model_sync_steps} must be >= 1",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"GRPOLossConfig.{message}")

    @property
    def entropy_bonus_enabled(self) -> bool:
        """TRL's ``_entropy_bonus_enabled``: a static coefficient ≠ 0, or adaptive control (even from c = 0)."""
        return self.entropy_coef != 0.0 or self.use_adaptive_entropy


def _resolve_alias(config: object, name: str, alias: str, default: object) -> object:
    """The value of field ``name`` given its TRL-named ``alias`` (``None`` = not set); both set and different
    is an error, since one of them would be silently ignored."""
    value, alias_value = getattr(config, name), getattr(config, alias)
    if alias_value is None:
        return value
    if value != default and value != alias_value:
        raise ConfigError(
            f"GRPOLossConfig.{name}={value!r} and its TRL-named alias {alias}={alias_value!r} disagree: set one"
        )
    return alias_value


def needs_old_logps(num_iterations: int, steps_per_generation: int, grad_accum_steps: int) -> bool:
    """Whether the sampling policy's log-probs must be stored right after generation.

    TRL's rule: they are needed iff ``grad_accum_steps % (steps_per_generation · μ) != 0``, i.e. when some
    micro-batch of a generation batch is trained on after an optimiser step. Otherwise the policy has not
    moved since sampling, ℓp^old = ℓp.detach(), every ratio is exactly 1 and clipping never fires.
    """
    return grad_accum_steps % (steps_per_generation * num_iterations) != 0


# --------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------


def log_importance_weights(
    logps: Tensor, old_logps: Tensor, mask: Tensor, level: ImportanceSamplingLevel = "token"
) -> Tensor:
    r"""log w: per token ``λ_{i,t} = ℓp − ℓp^old`` (B, T), or per sequence (GSPO) as a (B, 1) column
    ``log w_i = Σ_t m_{i,t} λ_{i,t} / max(Σ_t m_{i,t}, 1)``."""
    log_ratio = logps - old_logps
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ConfigError(f"importance_sampling_level={level!r}: must be one of {IMPORTANCE_SAMPLING_LEVELS}")


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    r"""Per-token k3 estimator of KL(π_θ ‖ π_ref), ≥ 0 and unbiased.

    ``KL_{i,t} = exp(ℓp^ref − ℓp) − (ℓp^ref − ℓp) − 1``
    """
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def clipped_surrogate(
    ratio: Tensor, advantages: Tensor, epsilon_low: float, epsilon_high: float, delta: float | None = None
) -> tuple[Tensor, Tensor]:
    r"""PPO clipped surrogate, per token: ``−min(w A, clip(w, 1−ε_low, 1+ε_high) A)``.

    With δ set, the unclipped ratio is first capped, w ← min(w, δ), so a negative-advantage token with a
    huge ratio cannot dominate (INTELLECT-2). The clip range uses the uncapped w.

    Returns:
        ``(per_token_loss, w)``, w being the (possibly δ-capped) ratio, as used for the clip statistics.
    """
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    return -torch.min(ratio * advantages, clipped * advantages), ratio


def aggregate_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    loss_type: LossType,
    *,
    num_items_in_batch: Tensor | float | None = None,
    max_completion_length: int | None = None,
    grad_accum_steps: int = 1,
    steps_per_generation: int | None = None,
    num_processes: int = 1,
    training: bool = True,
) -> Tensor:
    r"""Reduce per-token losses to the scalar one micro-batch back-propagates (TRL 1.16's divisors).

    B is the micro-batch's row count, GA the number of micro-batches accumulated per optimiser step,
    S the number of micro-batches one generation batch is split into, P the number of data-parallel
    ranks, N the active tokens of the *whole generation batch on all ranks*, L_max the generation length
    limit. Gradients are summed over GA micro-batches and averaged over P ranks by DDP. Then::

        grpo    : L = (1/B) Σ_i [Σ_t m ℓ / max(Σ_t m, 1)] / GA   mean of per-sequence means (length-biased)
        bnpo    : L = Σ m ℓ / max(Σ m, 1) / GA                   token mean of this micro-batch
        dr_grpo : L = Σ m ℓ / (B · L_max) / GA                   constant divisor (no length bias)
        dapo    : L = Σ m ℓ / (max(N, 1)/P · GA/S)               with S = GA: P Σ_local / N, which after
                                                                 DDP averaging and GA summation is the
                                                                 token mean of the generation batch
        sapo    : as grpo;   cispo, vespo: as dapo
        luspo   : L = (1/B) Σ_i Σ_t m ℓ / GA                     mean of per-sequence *sums* (LUSPO)

    Outside training (``training=False``) nothing is accumulated: GA is taken as 1 and dapo (cispo,
    vespo) divide by N/P.

    Args:
        per_token_loss: (B, T) or broadcastable to ``mask``.
        mask: (B, T) loss mask.
        loss_type: one of ``LOSS_TYPES``.
        num_items_in_batch: N (dapo, cispo, vespo). ``None`` means "this micro-batch is the whole generation batch":
            N = Σ m, allowed only with P = 1 and S = 1.
        max_completion_length: L_max (dr_grpo only).
        grad_accum_steps: GA (TRL's ``current_gradient_accumulation_steps``).
        steps_per_generation: S; defaults to GA (TRL's default).
        num_processes: P, the world size.
        training: False for evaluation.
    """
    if grad_accum_steps < 1 or num_processes < 1:
        raise ConfigError(
            f"grad_accum_steps={grad_accum_steps}, num_processes={num_processes}: both must be >= 1"
        )
    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    accumulation = grad_accum_steps if training else 1
    if loss_type in ("grpo", "sapo"):
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if loss_type == "luspo":
        return masked.sum(-1).mean() / accumulation
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
    if loss_type == "dr_grpo":
        if max_completion_length is None or max_completion_length < 1:
            raise ConfigError(
                f"loss_type='dr_grpo' needs max_completion_length >= 1, got {max_completion_length}"
            )
        return masked.sum() / (masked.size(0) * max_completion_length) / accumulation
    if loss_type in ("dapo", "cispo", "vespo"):
        steps = grad_accum_steps if steps_per_generation is None else steps_per_generation
        if steps < 1:
            raise ConfigError(f"steps_per_generation={steps_per_generation} must be >= 1")
        if num_items_in_batch is None:
            if num_processes != 1 or (training and steps != 1):
                raise ConfigError(
                    f"loss_type={loss_type!r} needs num_items_in_batch (active tokens of the whole generation batch "
                    f"on all ranks) when num_processes={num_processes} or steps_per_generation={steps} is > 1"
                )
            num_items_in_batch = mask.sum()
        total = torch.as_tensor(num_items_in_batch, dtype=per_token_loss.dtype, device=per_token_loss.device)
        normalizer = total.clamp(min=1.0) / num_processes
        if training:
            normalizer = normalizer * grad_accum_steps / steps
        return masked.sum() / normalizer
    raise ConfigError(f"loss_type={loss_type!r}: must be one of {LOSS_TYPES}")


def grpo_loss(
    logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    config: GRPOLossConfig,
    *,
    old_logps: Tensor | None = None,
    ref_logps: Tensor | None = None,
    entropies: Tensor | None = None,
    num_items_in_batch: Tensor | float | None = None,
    max_completion_length: int | None = None,
    grad_accum_steps: int = 1,
    steps_per_generation: int | None = None,
    num_processes: int = 1,
    training: bool = True,
    entropy_control: AdaptiveEntropyCoef | None = None,
    all_reduce_sum: AllReduceSum | None = None,
    all_gather: AllGather | None = None,
) -> tuple[Tensor, dict[str, float]]:
    r"""The GRPO loss of one micro-batch and TRL's loss metrics (``GRPOTrainer._compute_loss``).

    Steps, in TRL's order::

        λ = ℓp − ℓp^old;  w = exp(λ) (token) or exp(mean_t λ) (sequence)      log_importance_weights
        KL = k3(ℓp, ℓp^ref) · (w if kl_bias_correction)                       k3_kl        (β > 0)
        ℓ = −min(min(w, δ) A, clip(w, 1−ε_low, 1+ε_high) A)                   clipped_surrogate (grpo, bnpo,
                                                                               dr_grpo, dapo, luspo)
          = −sg(min(w, ε_high)) A ℓp                                          cispo_term
          = −(4/τ) σ(τ (w − 1)) A                                             sapo_term
          = −φ(W) A ℓp                                                         vespo_gamma_weights
        ℓ ← ℓ · o   (o: off-policy sequence mask, if a threshold is set)      off_policy_sequence_mask
        ℓ ← ℓ · h   (h: top-ρ entropy mask, ρ < 1)                            top_entropy_mask
        ℓ ← ℓ + β KL                                                           (KL is not masked by o or h)
        L = aggregate(ℓ, m)                                                    aggregate_loss
        L ← L − c · Σ H m h / max(Σ m h, 1) / GA                              entropy bonus (c ≠ 0)

    ``old_logps=None`` means the batch is on-policy (μ = 1 and ``needs_old_logps`` is false): ℓp^old =
    ℓp.detach(), so w = 1 in value but its gradient is ∇ℓp. The loss *value* is then ≈ 0 (mean-zero
    advantages) while its gradient is not.

    Metrics (global over ranks through ``all_reduce_sum`` / ``all_gather``, as TRL logs them):
    ``entropy`` (token mean of H; needs ``entropies``), ``kl`` (token mean of the KL above; β > 0);
    for the clipped types ``clip_ratio/low_mean`` (share of tokens with w < 1−ε_low and A < 0),
    ``clip_ratio/high_mean`` (w > 1+ε_high and A > 0), ``clip_ratio/region_mean`` (either),
    ``clip_ratio/low_min`` and ``clip_ratio/high_max`` (min / max over sequences of the per-sequence share;
    w here is δ-capped); ``cispo_clip_ratio`` (w > ε_high and A > 0); ``vespo/phi_seq_mean``; and with the
    entropy bonus ``policy_loss`` (L before the bonus, mean over ranks).

    Args:
        logps: (B, T) ℓp with gradient, at the sampling temperature, 0 where ``mask`` is 0.
        advantages: (B,) per-sequence or (B, T) per-token advantages.
        mask: (B, T) loss mask (``completion_mask``; truncated rows zeroed if so configured).
        config: the objective's hyper-parameters.
        old_logps: (B, T) ℓp^old from the sampling policy (needed when μ > 1), else ``None``.
        ref_logps: (B, T) ℓp^ref; required when β > 0.
        entropies: (B, T) per-token entropies; required when ``top_entropy_quantile < 1`` or the entropy
            bonus is on (then with gradient, or the bonus adds nothing to the gradient).
        num_items_in_batch, max_completion_length, grad_accum_steps, steps_per_generation, num_processes,
            training: the normalisation inputs, see ``aggregate_loss``.
        entropy_control: with ``use_adaptive_entropy``, the controller whose gated coefficient this micro-batch
            applies and whose window it feeds (training only); the caller ends its step after the optimiser
            step's last micro-batch. Required in adaptive mode; otherwise ``config.entropy_coef`` is applied.
        all_reduce_sum, all_gather: collectives over the data-parallel ranks (identities by default).

    Returns:
        ``(loss, metrics)``: the scalar to back-propagate, and a dict of floats.
    """
    if logps.dim() != 2 or mask.shape != logps.shape:
        raise DataError(f"logps {tuple(logps.shape)} and mask {tuple(mask.shape)} must both be (B, T)")
    for name, other in (("old_logps", old_logps), ("ref_logps", ref_logps), ("entropies", entropies)):
        if other is not None and other.shape != logps.shape:
            raise DataError(
                f"{name} has shape {tuple(other.shape)}, expected {tuple(logps.shape)} like logps"
            )
    if advantages.shape not in ((logps.size(0),), tuple(logps.shape)):
        raise DataError(
            f"advantages has shape {tuple(advantages.shape)}, expected ({logps.size(0)},) or (B, T)"
        )
    if entropies is None and (config.top_entropy_quantile < 1.0 or config.entropy_bonus_enabled):
        raise ConfigError(
            f"top_entropy_quantile={config.top_entropy_quantile} / entropy_coef={config.entropy_coef} "
            f"(use_adaptive_entropy={config.use_adaptive_entropy}) needs per-token entropies"
        )
    reduce_sum = all_reduce_sum or _identity
    gather = all_gather or _identity

    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old
    ratio = torch.exp(log_importance_weights(logps, old, mask, config.importance_sampling_level))

    per_token_kl = None
    if config.beta != 0.0:
        if ref_logps is None:
            raise ConfigError(
                f"beta={config.beta} needs ref_logps (the reference policy's per-token log-probs)"
            )
        per_token_kl = k3_kl(logps, ref_logps)
        if config.kl_bias_correction:
            per_token_kl = per_token_kl * ratio

    epsilon_high = config.epsilon_low if config.epsilon_high is None else config.epsilon_high
    capped_ratio, phi = ratio, None
    if config.loss_type in CLIPPED_LOSS_TYPES:
        per_token_loss, capped_ratio = clipped_surrogate(
            ratio, adv, config.epsilon_low, epsilon_high, config.delta
        )
    elif config.loss_type == "cispo":
        per_token_loss = cispo_term(ratio, adv, logps, epsilon_high)
    elif config.loss_type == "sapo":
        per_token_loss = sapo_term(ratio, adv, config.sapo_temperature_pos, config.sapo_temperature_neg)
    elif config.loss_type == "vespo":
        phi = vespo_gamma_weights(
            adv, log_ratio, mask,
            k_pos=config.vespo_k_pos, lambda_pos=config.vespo_lambda_pos,
            k_neg=config.vespo_k_neg, lambda_neg=config.vespo_lambda_neg,
        )  # fmt: skip
        per_token_loss = -phi * adv * logps
    else:
        raise ConfigError(f"loss_type={config.loss_type!r}: must be one of {LOSS_TYPES}")
    if config.off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * off_policy_sequence_mask(
            adv, logps, old, mask, config.off_policy_mask_threshold
        )
    keep = None
    if config.top_entropy_quantile < 1.0:
        assert entropies is not None  # checked above
        keep = top_entropy_mask(entropies, mask, config.top_entropy_quantile, all_gather=all_gather)
        per_token_loss = per_token_loss * keep
    if per_token_kl is not None:
        per_token_loss = per_token_loss + config.beta * per_token_kl

    loss = aggregate_loss(
        per_token_loss,
        mask,
        config.loss_type,
        num_items_in_batch=num_items_in_batch,
        max_completion_length=max_completion_length,
        grad_accum_steps=grad_accum_steps,
        steps_per_generation=steps_per_generation,
        num_processes=num_processes,
        training=training,
    )
    metrics: dict[str, float] = {}
    if config.entropy_bonus_enabled:
        assert entropies is not None  # checked above
        # TRL's policy_loss: the policy term before the bonus (for grpo-like types, before the GA divisor).
        per_step = 1 if config.loss_type in ("dapo", "cispo", "vespo") or not training else grad_accum_steps
        metrics["policy_loss"] = float(torch.nanmean(gather((loss.detach() * per_step).reshape(1))))
        effective = mask if keep is None else mask * keep
        coef = config.entropy_coef
        if config.use_adaptive_entropy:
            if entropy_control is None:
                raise ConfigError("use_adaptive_entropy=True needs the entropy_control of the training run")
            coef = entropy_control.applied()
            if training:
                entropy_control.observe(entropies, effective)
        loss = loss - coef * entropy_bonus(entropies, effective, grad_accum_steps if training else 1)

    with torch.no_grad():

        def global_mean(x: Tensor) -> float:
            # A (B, 1) tensor holds one value per sequence (sequence-level ratios): average over rows.
            # TRL applies the same shape rule, so a token-level batch with T = 1 is also averaged over rows.
            if x.size(1) == 1:
                local = torch.stack([x.sum(), torch.tensor(float(x.size(0)), dtype=x.dtype, device=x.device)])
            else:
                m = mask.to(x.dtype)
                local = torch.stack([(x * m).sum(), m.sum()])
            total = reduce_sum(local)
            return (total[0] / total[1].clamp(min=1.0)).item()

        def per_sequence_mean(x: Tensor) -> Tensor:
            if x.size(1) == 1:
                return x.squeeze(1)
            m = mask.to(x.dtype)
            return (x * m).sum(-1) / m.sum(-1)  # NaN for rows without tokens

        if per_token_kl is not None:
            metrics["kl"] = global_mean(per_token_kl)
        if entropies is not None:
            metrics["entropy"] = global_mean(entropies)
        if config.loss_type in CLIPPED_LOSS_TYPES:
            # Clip indicators as float32 whatever the log-prob dtype, as TRL does (the shares round the same).
            low = ((capped_ratio < 1 - config.epsilon_low) & (adv < 0)).float()
            high = ((capped_ratio > 1 + epsilon_high) & (adv > 0)).float()
            metrics["clip_ratio/low_mean"] = global_mean(low)
            metrics["clip_ratio/high_mean"] = global_mean(high)
            metrics["clip_ratio/region_mean"] = global_mean(torch.maximum(low, high))
            metrics["clip_ratio/low_min"] = _nan_extreme(gather(per_sequence_mean(low)), torch.min)
            metrics["clip_ratio/high_max"] = _nan_extreme(gather(per_sequence_mean(high)), torch.max)
        elif config.loss_type == "cispo":
            metrics["cispo_clip_ratio"] = global_mean(((ratio > epsilon_high) & (adv > 0)).float())
        elif phi is not None:
            metrics["vespo/phi_seq_mean"] = global_mean(phi)
    return loss, metrics


def entropy_bonus(entropies: Tensor, mask: Tensor, accumulation: int = 1) -> Tensor:
    r"""The entropy term of TRL's bonus, ``Σ H m / max(Σ m, 1) / GA``: the token mean of H over the tokens the
    policy term acts on (``mask`` × the entropy mask), the same for every loss type (not the loss type's
    normaliser), divided only for gradient accumulation. The loss subtracts ``c`` times it."""
    m = mask.to(entropies.dtype)
    return (entropies * m).sum() / m.sum().clamp(min=1.0) / accumulation


def _nan_extreme(x: Tensor, reduce: Callable[[Tensor], Tensor]) -> float:
    """min or max over the non-NaN entries (NaN if there are none)."""
    finite = x[~torch.isnan(x)]
    return float("nan") if finite.numel() == 0 else reduce(finite).item()
