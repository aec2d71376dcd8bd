r"""Per-token inputs of the GRPO loss: log-probabilities and entropies at temperature, the completion mask and
the high-entropy token mask — each number for number TRL 1.16.0's (``tests/test_grpo_loss.py``).

Split from :mod:`mg3d.grpo.loss` (which re-exports every name) so that file holds the objective itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mg3d.errors import ConfigError, DataError

__all__ = ["AllGather", "AllReduceSum", "completion_mask", "token_logps_and_entropies", "top_entropy_mask"]

#: ``all_reduce_sum(t)``: t summed over all data-parallel ranks (identity on one process).
AllReduceSum = Callable[[Tensor], Tensor]
#: ``all_gather(t)``: the 1-D tensors of all ranks concatenated in rank order; lengths may differ per rank.
AllGather = Callable[[Tensor], Tensor]


def _identity(x: Tensor) -> Tensor:
    return x


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
