r"""TRL 1.16's non-clipped policy terms and the sequence masks, per token (pure torch, no model).

:func:`mg3d.grpo.loss.grpo_loss` picks one of these by ``loss_type``; the clipped PPO surrogate shared by
``grpo``/``bnpo``/``dr_grpo``/``dapo``/``luspo`` stays in :mod:`mg3d.grpo.loss`. Notation as there: w the
importance ratio (token or sequence level), λ = ℓp − ℓp^old per token, A the advantage, m the loss mask.
``tests/test_grpo_loss_family.py`` checks each against TRL's own ``_compute_loss``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["cispo_term", "off_policy_sequence_mask", "sapo_term", "vespo_gamma_weights"]

#: VESPO's lower clamp of log w (log 1e-8), TRL's value; the upper clamp is 20.
_VESPO_LOG_FLOOR = math.log(1e-8)


def cispo_term(ratio: Tensor, advantages: Tensor, logps: Tensor, epsilon_max: float) -> Tensor:
    r"""CISPO (MiniMax-M1, ScaleRL): ``ℓ = −sg(min(w, ε_max)) · A · ℓp``.

    The ratio is capped from above and *detached*: it only weighs a REINFORCE gradient A ∇ℓp, so no token ever
    loses its gradient to clipping (the PPO clip zeroes it). ε_max is TRL's ``epsilon_high`` (recommended 5.0).
    """
    return -torch.clamp(ratio, max=epsilon_max).detach() * advantages * logps


def sapo_term(ratio: Tensor, advantages: Tensor, temperature_pos: float, temperature_neg: float) -> Tensor:
    r"""SAPO (soft adaptive policy optimisation): ``ℓ = −(4/τ) σ(τ (w − 1)) · A``, τ = τ_pos if A > 0 else τ_neg.

    A smooth gate in place of the hard clip: at w = 1 it equals −A with slope A (as the surrogate), and the
    gradient fades smoothly as w leaves 1 — faster for negative advantages (τ_neg > τ_pos by default).
    """
    temperatures = torch.where(advantages > 0, temperature_pos, temperature_neg)
    return -torch.sigmoid(temperatures * (ratio - 1)) * 4 / temperatures * advantages


@torch.no_grad()
def vespo_gamma_weights(
    advantages: Tensor,
    log_ratio: Tensor,
    mask: Tensor,
    *,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
) -> Tensor:
    r"""VESPO's sequence weight φ(W_i), shape (B, 1), without gradient (it only scales A ∇ℓp)::

        log W_i = clamp(Σ_t m · clamp(λ_{i,t}, −20, 20), log 1e-8, 20)        (a sum, not GSPO's mean)
        φ(W)    = exp(λ_± + k_± log W − λ_± W)                                  (φ(1) = 1; NaN/Inf → 0)

    with (k, λ) = (k_pos, λ_pos) where A ≥ 0, else (k_neg, λ_neg); λ is floored at 1e-4. The gamma-shaped φ
    fades sequences whose policy has moved far from the sampler in either direction.
    """
    summed = torch.sum(torch.clamp(log_ratio, -20.0, 20.0) * mask, dim=-1, keepdim=True)
    log_w = torch.clamp(summed, _VESPO_LOG_FLOOR, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def off_policy_sequence_mask(
    advantages: Tensor, logps: Tensor, sampling_logps: Tensor, mask: Tensor, threshold: float
) -> Tensor:
    r"""DeepSeek-V3.2's off-policy sequence mask, shape (B, 1): 1 keeps the sequence, 0 drops it.

    ``keep_i = [A_i ≥ 0] ∨ [Σ_t m (ℓp^samp − sg(ℓp)) / max(Σ_t m, 1) ≤ δ]``: a negative-advantage sequence
    whose policy has drifted from the sampler by more than δ (mean per-token KL estimate) is not pushed down
    further. ℓp^samp is the sampling policy's log-prob (mg3d samples with the policy: the old log-probs).
    NaN differences count as 0.
    """
    kl = torch.nan_to_num(sampling_logps - logps.detach(), nan=0.0)
    mean_kl = (kl * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean_kl <= threshold)).to(dtype=mask.dtype)
