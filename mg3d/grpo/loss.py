r"""GRPO maths, number for number equal to TRL 1.16.0's ``GRPOTrainer`` (pure torch, no model).

mg3d owns its GRPO loop because TRL has no 3D/video input path, but its maths must stay TRL's, so
that results, hyper-parameters and logged curves mean the same thing. ``tests/test_grpo_loss.py``
checks this file against TRL's own ``_compute_loss`` and ``_generate_and_score_completions``.

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

and one of four aggregations (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``) turns ℓ into a scalar whose
gradient, summed over gradient-accumulation micro-batches and averaged over data-parallel ranks, is
the intended mean (§ ``aggregate_loss``).

Only TRL's four clipped loss types are implemented (not ``cispo``/``sapo``/``luspo``/``vespo``), and
neither the vLLM importance-sampling correction nor the off-policy sequence mask, since mg3d samples
with the policy itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor

from mg3d.errors import ConfigError, DataError

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ScaleRewards = Literal["group", "batch", "none"]
ImportanceSamplingLevel = Literal["token", "sequence"]

LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence")

#: Added to the reward std before dividing (TRL's value; verl/EasyR1 use 1e-6, OpenRLHF 1e-9).
ADVANTAGE_EPS = 1e-4

#: ``all_reduce_sum(t)``: t summed over all data-parallel ranks (identity on one process).
AllReduceSum = Callable[[Tensor], Tensor]
#: ``all_gather(t)``: the 1-D tensors of all ranks concatenated in rank order; lengths may differ per rank.
AllGather = Callable[[Tensor], Tensor]


def _identity(x: Tensor) -> Tensor:
    return x


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GRPOLossConfig:
    """Hyper-parameters of the GRPO objective; field names and defaults follow TRL 1.16's ``GRPOConfig``.

    Args:
        loss_type: aggregation of per-token losses: ``"grpo"`` (per-sequence mean, length-biased),
            ``"bnpo"`` (local token mean), ``"dr_grpo"`` (sum / (B · L_max)), ``"dapo"`` (global token
            mean over the generation batch; TRL's default).
        beta: β, weight of the k3 KL to the reference policy; 0 means no reference model is needed.
        epsilon_low: ε_low, lower clip range of the importance ratio (TRL's ``epsilon``).
        epsilon_high: ε_high, upper clip range (DAPO "clip-higher" uses 0.28); ``None`` means ε_low.
        delta: δ, cap on the *unclipped* ratio (INTELLECT-2 two-sided clipping); ``None`` is off.
            Must exceed 1, otherwise on-policy tokens with negative advantage would get no gradient.
        temperature: T, the sampling temperature; training log-probs are computed from logits / T.
        scale_rewards: ``"group"`` (or ``True``), ``"batch"`` or ``"none"`` (or ``False``).
        mask_truncated_completions: drop completions without EOS from the loss (DAPO overlong filtering).
        top_entropy_quantile: ρ; only the top-ρ fraction of tokens by entropy enter the policy term.
        num_iterations: μ, optimisation passes over one generation batch; μ > 1 needs old log-probs.
        importance_sampling_level: ``"token"`` ratios, or one ``"sequence"`` ratio per row (GSPO).
        kl_bias_correction: multiply the KL by the (differentiable) ratio w, as TRL's
            ``use_bias_correction_kl`` (default ``True``) does; this changes the KL gradient even on-policy.
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

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise the two "defaults to another field" values once, here.
        epsilon_high = self.epsilon_low if self.epsilon_high is None else self.epsilon_high
        object.__setattr__(self, "scale_rewards", resolve_scale_rewards(self.scale_rewards))
        object.__setattr__(self, "epsilon_high", epsilon_high)
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"GRPOLossConfig.loss_type={self.loss_type!r}: must be one of {LOSS_TYPES}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ConfigError(
                f"GRPOLossConfig.importance_sampling_level={self.importance_sampling_level!r}: "
                f"must be one of {IMPORTANCE_SAMPLING_LEVELS}"
            )
        checks = [
            (math.isfinite(self.beta) and self.beta >= 0, f"beta={self.beta} must be finite and >= 0"),
            (0 <= self.epsilon_low < 1, f"epsilon_low={self.epsilon_low} must be in [0, 1)"),
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
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"GRPOLossConfig.{message}")


def resolve_scale_rewards(value: str | bool) -> ScaleRewards:
    """Map TRL's boolean spellings (``True`` → ``"group"``, ``False`` → ``"none"``) and validate."""
    if value is True:
        return "group"
    if value is False:
        return "none"
    if value not in SCALE_REWARDS:
        raise ConfigError(f"scale_rewards={value!r}: must be one of {SCALE_REWARDS}, True or False")
    return cast(ScaleRewards, value)


def needs_old_logps(num_iterations: int, steps_per_generation: int, grad_accum_steps: int) -> bool:
    """Whether the sampling policy's log-probs must be stored right after generation.

    TRL's rule: they are needed iff ``grad_accum_steps % (steps_per_generation · μ) != 0``, i.e. when some
    micro-batch of a generation batch is trained on after an optimiser step. Otherwise the policy has not
    moved since sampling, ℓp^old = ℓp.detach(), every ratio is exactly 1 and clipping never fires.
    """
    return grad_accum_steps % (steps_per_generation * num_iterations) != 0


# --------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------


def nanstd(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    r"""Sample standard deviation ignoring NaNs, with Bessel's correction n/(n−1) (NaN when n ≤ 1).

    Written by hand because torch has ``nanmean`` but no ``nanstd``:
    σ = sqrt( Σ_j (x_j − x̄)² / (n − 1) ) over the n non-NaN x_j.
    """
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    bessel = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = torch.sqrt(variance * bessel)
    if keepdim:
        return std
    return std.squeeze() if dim is None else std.squeeze(dim)


@dataclass(frozen=True)
class GroupAdvantages:
    """Advantages of one generation batch and the statistics behind them (all on the global batch).

    Attributes:
        advantages: A_i, shape (N,); 0 for unscorable rows (every reward NaN).
        rewards: R_i = Σ_k w_k r_{i,k} (NaN-aware sum), shape (N,); NaN for unscorable rows.
        group_mean: μ_g, shape (N / G,).
        group_std: per-group sample std σ_g, shape (N / G,) (zeros when G = 1).
        scale_std: the σ each row was (or, for ``"none"``, would have been) divided by, shape (N,):
            its group's σ_g, or for ``"batch"`` the std of the whole batch.
        zero_std: ``scale_std ≈ 0`` per row (TRL's ``is_std_zero``); its mean is ``frac_reward_zero_std``.
        group_zero_std: ``σ_g ≈ 0`` per group: groups without learning signal (DAPO dynamic sampling).
    """

    advantages: Tensor
    rewards: Tensor
    group_mean: Tensor
    group_std: Tensor
    scale_std: Tensor
    zero_std: Tensor
    group_zero_std: Tensor

    @property
    def frac_reward_zero_std(self) -> float:
        """Share of rows whose scaling std is ≈ 0, logged by TRL as ``frac_reward_zero_std``."""
        return self.zero_std.float().mean().item()


def group_advantages(
    rewards: Tensor,
    num_generations: int,
    *,
    reward_weights: Sequence[float] | Tensor | None = None,
    scale_rewards: ScaleRewards | bool = "group",
) -> GroupAdvantages:
    r"""Group-relative advantages (TRL's default ``multi_objective_aggregation="sum_then_normalize"``).

    With r_{i,k} the reward k of row i (NaN where a reward does not apply) and w_k its weight::

        R_i = Σ_k w_k r_{i,k}            (NaN terms skipped; NaN if all r_{i,k} are NaN: "unscorable")
        μ_g = nanmean_{j ∈ g} R_j        (unscorable rows are left out of the baseline)
        σ   = nanstd_{j ∈ g} R_j         ("group"; sample std, Bessel-corrected)
            = nanstd_{all j} R_j         ("batch": batch std, but the mean stays the group mean)
        A_i = (R_i − μ_g) / (σ + 1e-4)   ("group", "batch")
            =  R_i − μ_g                 ("none", Dr. GRPO)
        A_i ← 0 where A_i is NaN         (unscorable rows, groups with no scorable row)

    Rows must be ordered group by group (G consecutive rows per prompt) and must hold the *whole*
    generation batch of all ranks, since a group (and the "batch" std) may span ranks: gather the
    rewards first, then slice the local rows out of ``advantages``.

    Args:
        rewards: (N,) summed rewards or (N, K) one column per reward function.
        num_generations: G, completions per prompt; N must be a multiple of G.
        reward_weights: w_k, K weights (default all 1).
        scale_rewards: ``"group"``/``True``, ``"batch"`` or ``"none"``/``False``.
    """
    scale = resolve_scale_rewards(scale_rewards)
    if num_generations < 1:
        raise ConfigError(f"num_generations={num_generations} must be >= 1")
    if rewards.dim() not in (1, 2):
        raise DataError(f"rewards must have shape (N,) or (N, K), got {tuple(rewards.shape)}")
    per_func = rewards if rewards.dim() == 2 else rewards.unsqueeze(1)
    n_rows, n_funcs = per_func.shape
    if n_rows == 0 or n_rows % num_generations != 0:
        raise DataError(
            f"rewards has {n_rows} rows, not a positive multiple of num_generations={num_generations}"
        )
    if not per_func.is_floating_point():
        per_func = per_func.float()
    weights = torch.ones(n_funcs) if reward_weights is None else torch.as_tensor(reward_weights)
    weights = weights.to(device=per_func.device, dtype=per_func.dtype)
    if weights.shape != (n_funcs,):
        raise ConfigError(f"reward_weights has {weights.numel()} entries but rewards has {n_funcs} columns")

    unscorable = torch.isnan(per_func).all(dim=1)
    total = (per_func * weights).nansum(dim=1)
    total[unscorable] = float("nan")

    grouped = total.view(-1, num_generations)
    group_mean = torch.nanmean(grouped, dim=1)
    group_std = nanstd(grouped, dim=1) if num_generations > 1 else torch.zeros_like(group_mean)
    if scale == "batch":
        scale_std = nanstd(total).expand_as(total) if n_rows > 1 else torch.zeros_like(total)
    else:  # "group", and "none" (where σ only feeds the zero-std statistics)
        scale_std = group_std.repeat_interleave(num_generations)

    advantages = total - group_mean.repeat_interleave(num_generations)
    if scale != "none":
        advantages = advantages / (scale_std + ADVANTAGE_EPS)
    advantages = torch.nan_to_num(advantages, nan=0.0)
    return GroupAdvantages(
        advantages=advantages,
        rewards=total,
        group_mean=group_mean,
        group_std=group_std,
        scale_std=scale_std,
        zero_std=torch.isclose(scale_std, torch.zeros_like(scale_std)),
        group_zero_std=torch.isclose(group_std, torch.zeros_like(group_std)),
    )


# --------------------------------------------------------------------------------------------------
# Per-token log-probabilities, entropies and masks
# --------------------------------------------------------------------------------------------------


def token_logps_and_entropies(
    logits: Tensor,
    token_ids: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    compute_entropy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    r"""Per-token log-probabilities and entropies of the temperature-scaled policy.

    For logits z_{i,t,·} that predict token o_{i,t} (the caller has already shifted them by one)::

        ℓp_{i,t} = z_{i,t,o_{i,t}} / T − logsumexp_v(z_{i,t,v} / T)
        H_{i,t}  = − Σ_v p_v log p_v,   p = softmax(z_{i,t,·} / T)

    Scoring at the sampling temperature T is what makes ℓp the log-probability of the distribution the
    completion was drawn from (TRL divides by T too). Rows are processed one at a time so only one
    (T, V) block of temporaries exists at once (like TRL's ``selective_log_softmax``); half-precision
    logits are upcast to float32 per row. Entropies are computed without gradient: GRPO uses them
    only to select tokens and for logging. Positions where ``mask`` is 0 are exactly 0 in both outputs.

    Args:
        logits: (B, T_c, V) logits aligned with ``token_ids``.
        token_ids: (B, T_c) sampled token ids.
        temperature: T > 0.
        mask: optional (B, T_c) completion mask.
        compute_entropy: return entropies (else ``None``).

    Returns:
        ``(logps, entropies)``, each (B, T_c) in float32 (float64 for float64 logits).
    """
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature} must be > 0")
    if logits.dim() != 3 or token_ids.shape != logits.shape[:2]:
        raise DataError(
            f"logits {tuple(logits.shape)} and token_ids {tuple(token_ids.shape)} "
            "must be (B, T, V) and (B, T)"
        )
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    logps, entropies = [], []
    for row_logits, row_ids in zip(logits, token_ids):
        scaled = row_logits.to(out_dtype) / temperature
        log_z = torch.logsumexp(scaled, dim=-1)
        logps.append(scaled.gather(-1, row_ids.unsqueeze(-1)).squeeze(-1) - log_z)
        if compute_entropy:
            with torch.no_grad():
                row_logp = scaled - log_z.unsqueeze(-1)
                entropies.append(-(row_logp.exp() * row_logp).sum(-1))
    logp = torch.stack(logps)
    entropy = torch.stack(entropies) if compute_entropy else None
    if mask is not None:
        keep = mask.bool()
        logp = logp.masked_fill(~keep, 0.0)
        entropy = None if entropy is None else entropy.masked_fill(~keep, 0.0)
    return logp, entropy


def completion_mask(
    completion_ids: Tensor,
    eos_token_ids: int | Sequence[int],
    *,
    pad_token_id: int | None = None,
    mask_truncated: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""Loss mask of sampled completions: 1 up to **and including** the first EOS, 0 after it.

    ``m_{i,t} = 1[t ≤ t_eos(i)]`` with t_eos the first EOS position (the whole row if there is none).
    The EOS is included because emitting it is an action the policy is rewarded for: an EOS-only
    completion has length 1. A row is *truncated* when its last kept token is neither an EOS nor the
    pad id (TRL's test), i.e. generation hit the length limit. With ``mask_truncated`` (DAPO overlong
    filtering) truncated rows are zeroed, so they leave the loss and the token count ``num_items_in_batch``
    — but they still count in their group's reward mean and std.

    Args:
        completion_ids: (B, T_c) generated ids, right-padded.
        eos_token_ids: the id(s) that end a completion.
        pad_token_id: a row without EOS whose last id is this one is not counted as truncated (TRL).
        mask_truncated: zero the mask of truncated rows.

    Returns:
        ``(mask, is_truncated)``: (B, T_c) int64 mask and (B,) bool.
    """
    if completion_ids.dim() != 2 or completion_ids.size(1) == 0:
        raise DataError(f"completion_ids must be (B, T) with T >= 1, got {tuple(completion_ids.shape)}")
    eos = torch.as_tensor(
        [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids),
        device=completion_ids.device,
    )
    is_eos = torch.isin(completion_ids, eos)
    has_eos = is_eos.any(dim=1)
    length = completion_ids.size(1)
    first_eos = torch.where(
        has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, length, dtype=torch.long)
    )
    positions = torch.arange(length, device=completion_ids.device)
    mask = (positions.unsqueeze(0) <= first_eos.unsqueeze(1)).long()
    is_truncated = ~has_eos
    if pad_token_id is not None:
        is_truncated = is_truncated & (completion_ids[:, -1] != pad_token_id)
    if mask_truncated:
        mask = mask * (~is_truncated).long().unsqueeze(1)
    return mask, is_truncated


def top_entropy_mask(
    entropies: Tensor, mask: Tensor, quantile: float, *, all_gather: AllGather | None = None
) -> Tensor:
    r"""High-entropy token mask ("Beyond the 80/20 rule"): keep the top-ρ fraction of tokens by entropy.

    τ = Quantile_{1−ρ}{ H_{j,s} : m_{j,s} = 1, over all ranks } (linear interpolation, ``torch.quantile``);
    h_{i,t} = 1[H_{i,t} ≥ τ] · m_{i,t}. ρ = 1 keeps every token, ρ = 0 only the highest-entropy one(s).

    Args:
        entropies: (B, T) per-token entropies.
        mask: (B, T) loss mask (truncated rows already zeroed, so they are not considered).
        quantile: ρ ∈ [0, 1] (``top_entropy_quantile``).
        all_gather: concatenates the 1-D valid entropies of all ranks (identity on one process).

    Returns:
        (B, T) bool mask.
    """
    if not 0 <= quantile <= 1:
        raise ConfigError(f"top_entropy_quantile={quantile} must be in [0, 1]")
    valid = entropies[mask.bool()].float()
    pooled = (all_gather or _identity)(valid)
    if pooled.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    threshold = torch.quantile(pooled, 1 - quantile)
    return (entropies >= threshold) & mask.bool()


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

    Outside training (``training=False``) nothing is accumulated: GA is taken as 1 and dapo divides
    by N/P.

    Args:
        per_token_loss: (B, T) or broadcastable to ``mask``.
        mask: (B, T) loss mask.
        loss_type: one of ``"grpo"``, ``"bnpo"``, ``"dr_grpo"``, ``"dapo"``.
        num_items_in_batch: N (dapo). ``None`` means "this micro-batch is the whole generation batch":
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
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
    if loss_type == "dr_grpo":
        if max_completion_length is None or max_completion_length < 1:
            raise ConfigError(
                f"loss_type='dr_grpo' needs max_completion_length >= 1, got {max_completion_length}"
            )
        return masked.sum() / (masked.size(0) * max_completion_length) / accumulation
    if loss_type == "dapo":
        steps = grad_accum_steps if steps_per_generation is None else steps_per_generation
        if steps < 1:
            raise ConfigError(f"steps_per_generation={steps_per_generation} must be >= 1")
        if num_items_in_batch is None:
            if num_processes != 1 or (training and steps != 1):
                raise ConfigError(
                    "loss_type='dapo' needs num_items_in_batch (active tokens of the whole generation batch "
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
    all_reduce_sum: AllReduceSum | None = None,
    all_gather: AllGather | None = None,
) -> tuple[Tensor, dict[str, float]]:
    r"""The GRPO loss of one micro-batch and TRL's loss metrics (``GRPOTrainer._compute_loss``).

    Steps, each a function of this module::

        λ = ℓp − ℓp^old;  w = exp(λ) (token) or exp(mean_t λ) (sequence)      log_importance_weights
        KL = k3(ℓp, ℓp^ref) · (w if kl_bias_correction)                       k3_kl        (β > 0)
        ℓ = −min(min(w, δ) A, clip(w, 1−ε_low, 1+ε_high) A)                   clipped_surrogate
        ℓ ← ℓ · h   (h: top-ρ entropy mask, ρ < 1)                            top_entropy_mask
        ℓ ← ℓ + β KL                                                           (KL is not entropy-masked)
        L = aggregate(ℓ, m)                                                    aggregate_loss

    ``old_logps=None`` means the batch is on-policy (μ = 1 and ``needs_old_logps`` is false): ℓp^old =
    ℓp.detach(), so w = 1 in value but its gradient is ∇ℓp. The loss *value* is then ≈ 0 (mean-zero
    advantages) while its gradient is not.

    Metrics (global over ranks through ``all_reduce_sum`` / ``all_gather``, as TRL logs them):
    ``entropy`` (token mean of H; needs ``entropies``), ``kl`` (token mean of the KL above; β > 0),
    ``clip_ratio/low_mean`` (share of tokens with w < 1−ε_low and A < 0), ``clip_ratio/high_mean``
    (w > 1+ε_high and A > 0), ``clip_ratio/region_mean`` (either), ``clip_ratio/low_min`` and
    ``clip_ratio/high_max`` (min / max over sequences of the per-sequence share). w here is δ-capped.

    Args:
        logps: (B, T) ℓp with gradient, at the sampling temperature, 0 where ``mask`` is 0.
        advantages: (B,) per-sequence or (B, T) per-token advantages.
        mask: (B, T) loss mask (``completion_mask``; truncated rows zeroed if so configured).
        config: the objective's hyper-parameters.
        old_logps: (B, T) ℓp^old from the sampling policy (needed when μ > 1), else ``None``.
        ref_logps: (B, T) ℓp^ref; required when β > 0.
        entropies: (B, T) per-token entropies; required when ``top_entropy_quantile < 1``.
        num_items_in_batch, max_completion_length, grad_accum_steps, steps_per_generation, num_processes,
            training: the normalisation inputs, see ``aggregate_loss``.
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
    reduce_sum = all_reduce_sum or _identity
    gather = all_gather or _identity

    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old = logps.detach() if old_logps is None else old_logps
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
    per_token_loss, capped_ratio = clipped_surrogate(
        ratio, adv, config.epsilon_low, epsilon_high, config.delta
    )
    if config.top_entropy_quantile < 1.0:
        if entropies is None:
            raise ConfigError(f"top_entropy_quantile={config.top_entropy_quantile} needs per-token entropies")
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

        metrics: dict[str, float] = {}
        if per_token_kl is not None:
            metrics["kl"] = global_mean(per_token_kl)
        if entropies is not None:
            metrics["entropy"] = global_mean(entropies)
        # Clip indicators as float32 whatever the log-prob dtype, as TRL does (the shares round the same).
        low = ((capped_ratio < 1 - config.epsilon_low) & (adv < 0)).float()
        high = ((capped_ratio > 1 + epsilon_high) & (adv > 0)).float()
        metrics["clip_ratio/low_mean"] = global_mean(low)
        metrics["clip_ratio/high_mean"] = global_mean(high)
        metrics["clip_ratio/region_mean"] = global_mean(torch.maximum(low, high))
        metrics["clip_ratio/low_min"] = _nan_extreme(gather(per_sequence_mean(low)), torch.min)
        metrics["clip_ratio/high_max"] = _nan_extreme(gather(per_sequence_mean(high)), torch.max)
    return loss, metrics


def _nan_extreme(x: Tensor, reduce: Callable[[Tensor], Tensor]) -> float:
    """min or max over the non-NaN entries (NaN if there are none)."""
    finite = x[~torch.isnan(x)]
    return float("nan") if finite.numel() == 0 else reduce(finite).item()
