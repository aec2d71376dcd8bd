r"""Group-relative advantages, number for number TRL 1.16.0's ``_generate_and_score_completions``.

Two ways to combine several reward functions (TRL's ``multi_objective_aggregation``):

* ``"sum_then_normalize"`` (default, :func:`group_advantages`): sum the weighted rewards, then subtract the
  group mean and divide by the group (or batch) std;
* ``"normalize_then_sum"`` (GDPO, :func:`decoupled_advantages`): z-score every reward within its group first,
  sum the weighted z-scores, then z-score that sum over the whole batch — so a reward with a large spread
  cannot drown a reward with a small one.

Split from :mod:`mg3d.grpo.loss` (which still re-exports every name) so that file stays the per-token
objective; ``tests/test_grpo_loss.py`` and ``tests/test_grpo_loss_family.py`` check both against TRL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor

from mg3d.errors import ConfigError, DataError

__all__ = [
    "ADVANTAGE_EPS",
    "MULTI_OBJECTIVE_AGGREGATIONS",
    "SCALE_REWARDS",
    "GroupAdvantages",
    "MultiObjectiveAggregation",
    "ScaleRewards",
    "decoupled_advantages",
    "group_advantages",
    "nanstd",
    "resolve_scale_rewards",
]

ScaleRewards = Literal["group", "batch", "none"]
MultiObjectiveAggregation = Literal["sum_then_normalize", "normalize_then_sum"]

SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")
MULTI_OBJECTIVE_AGGREGATIONS: tuple[str, ...] = ("sum_then_normalize", "normalize_then_sum")

#: Added to the reward std before dividing (TRL's value; verl/EasyR1 use 1e-6, OpenRLHF 1e-9).
ADVANTAGE_EPS = 1e-4


def resolve_scale_rewards(value: str | bool) -> ScaleRewards:
    """Map TRL's boolean spellings (``True`` → ``"group"``, ``False`` → ``"none"``) and validate."""
    if value is True:
        return "group"
    if value is False:
        return "none"
    if value not in SCALE_REWARDS:
        raise ConfigError(f"scale_rewards={value!r}: must be one of {SCALE_REWARDS}, True or False")
    return cast(ScaleRewards, value)


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
    multi_objective_aggregation: MultiObjectiveAggregation = "sum_then_normalize",
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
        scale_rewards: ``"group"``/``True``, ``"batch"`` or ``"none"``/``False`` (ignored by GDPO, as in TRL).
        multi_objective_aggregation: ``"normalize_then_sum"`` hands over to :func:`decoupled_advantages`.
    """
    if multi_objective_aggregation == "normalize_then_sum":
        return decoupled_advantages(rewards, num_generations, reward_weights=reward_weights)
    if multi_objective_aggregation != "sum_then_normalize":
        raise ConfigError(
            f"multi_objective_aggregation={multi_objective_aggregation!r}: must be one of "
            f"{MULTI_OBJECTIVE_AGGREGATIONS}"
        )
    scale = resolve_scale_rewards(scale_rewards)
    per_func, _, _, total = _weighted_rewards(rewards, num_generations, reward_weights)
    n_rows = per_func.shape[0]

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


def _weighted_rewards(
    rewards: Tensor, num_generations: int, reward_weights: Sequence[float] | Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validated (N, K) rewards, the K weights, the unscorable rows (every reward NaN) and R_i = Σ_k w_k r_{i,k}
    (NaN-aware; NaN for unscorable rows)."""
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

    return per_func, weights, unscorable, total


def decoupled_advantages(
    rewards: Tensor, num_generations: int, *, reward_weights: Sequence[float] | Tensor | None = None
) -> GroupAdvantages:
    r"""GDPO advantages (TRL's ``multi_objective_aggregation="normalize_then_sum"``).

    Each reward is normalised within its group before the weighted sum, and the sum once more over the whole
    (global) batch::

        z_{i,k} = (r_{i,k} − nanmean_{j ∈ g} r_{j,k}) / (nanstd_{j ∈ g} r_{j,k} + 1e-4)   (0 std when G = 1)
        S_i     = Σ_k w_k z_{i,k}                    (NaN-aware; NaN if every r_{i,k} is NaN)
        A_i     = (S_i − nanmean_j S_j) / (nanstd_j S_j + 1e-4),   A_i ← 0 where NaN

    ``scale_rewards`` plays no part (TRL ignores it here). The group statistics of the result (``group_mean``,
    ``group_std``, ``group_zero_std``) are those of the raw weighted sum R_i, as for the default aggregation, so
    dynamic sampling drops the same groups whichever aggregation is used; ``zero_std`` is TRL's: S's batch std ≈ 0.
    """
    per_func, weights, unscorable, total = _weighted_rewards(rewards, num_generations, reward_weights)
    n_rows, n_funcs = per_func.shape
    grouped = per_func.view(-1, num_generations, n_funcs)
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
    z = ((grouped - mean_k) / (std_k + ADVANTAGE_EPS)).view(n_rows, n_funcs)
    summed = (z * weights).nansum(dim=1)
    summed[unscorable] = float("nan")
    batch_std = nanstd(summed).expand_as(summed) if n_rows > 1 else torch.zeros_like(summed)
    advantages = torch.nan_to_num((summed - torch.nanmean(summed)) / (batch_std + ADVANTAGE_EPS), nan=0.0)

    group_mean = torch.nanmean(total.view(-1, num_generations), dim=1)
    group_std = (
        nanstd(total.view(-1, num_generations), dim=1)
        if num_generations > 1
        else torch.zeros_like(group_mean)
    )
    return GroupAdvantages(
        advantages=advantages,
        rewards=total,
        group_mean=group_mean,
        group_std=group_std,
        scale_std=batch_std,
        zero_std=torch.isclose(batch_std, torch.zeros_like(batch_std)),
        group_zero_std=torch.isclose(group_std, torch.zeros_like(group_std)),
    )
