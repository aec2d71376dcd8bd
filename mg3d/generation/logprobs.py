"""Log-probabilities of sampled completions under the policy: the GRPO training forward.

Each prompt is computed once (vision encoder + prefill, in the autograd graph) and its cache expanded over
its G completions, as sampling does; the naive path (``share_prompt=False``) repeats every prompt and is kept
as the reference the shared path is tested against.

Memory: the language model runs once to its last hidden states, and the output head (vocabulary projection,
log-softmax, entropy) runs over chunks of completion tokens, each recomputed in the backward pass
(activation checkpointing), so no ``[tokens, vocabulary]`` float32 tensor exists for all completion tokens at
once — at Qwen2.5-VL's 151,936-row vocabulary that tensor alone is 1.2 GB for G = 8 × 256 tokens. A batch
that fits one chunk (the tiny model's, at any demo size) runs the head exactly as the model's own forward.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mg3d.errors import ConfigError
from mg3d.generation.inputs import (
    check_prompt_inputs,
    prefill_shared,
    prompt_positions,
    replicate_prompt_inputs,
)
from mg3d.generation.sampling import Rollout
from mg3d.model import Policy
from mg3d.sharding import is_sharded

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "completion_logprobs"]

#: Logit elements (tokens × vocabulary) of one chunk of the output head: 128 MB per float32 copy. That is 220
#: completion tokens of Qwen2.5-VL's 151,936-row vocabulary, and ~100,000 tokens of the tiny model's 320.
DEFAULT_CHUNK_ELEMENTS = 2**25


# ---------------------------------------------------------------------------------------------------
# log-probabilities of sampled completions (the GRPO training forward)
# ---------------------------------------------------------------------------------------------------
#: Per-token log-probs (B*G, T), and per-token entropies (B*G, T) when asked for (else ``None``).
TokenStats = tuple[torch.Tensor, torch.Tensor | None]


#: ``with_entropy``: no entropies (False), entropies without gradient (True), or with gradient ("grad").
EntropyMode = bool | Literal["grad"]


def _token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    cmask: torch.Tensor,
    temperature: float,
    with_entropy: EntropyMode,
) -> TokenStats:
    """log softmax(logits / T) at the sampled tokens, in float32 (as TRL scales training log-probs by T), and
    optionally the entropy H = −Σ_v p_v log p_v of p = softmax(logits / T); both 0 where ``cmask`` is 0.

    The entropy is computed without gradient unless ``with_entropy="grad"``: GRPO uses it only to select tokens
    (``top_entropy_quantile``) and to log, as TRL does, except for the entropy bonus, which needs its gradient.
    """
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * cmask
    if not with_entropy:
        return token_logp, None
    with torch.set_grad_enabled(with_entropy == "grad" and torch.is_grad_enabled()):
        entropy = -(logp.exp() * logp).sum(-1) * cmask
    return token_logp, entropy


def _head_stats(
    model: Any,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    cmask: torch.Tensor,
    temperature: float,
    with_entropy: EntropyMode,
    chunk_elements: int | None,
    *,
    drop_last: bool = False,
) -> TokenStats:
    """Token stats from the last hidden states ``(N, T(+1), H)`` through the model's output head, in chunks.

    ``drop_last``: ``hidden`` has one more position than ``targets`` (the naive path's last prompt token through
    the last completion token); the last one predicts nothing. A batch within one chunk runs the head as the
    model's forward does (same operations, same numbers); larger batches run chunk by chunk over the flattened
    tokens, each chunk checkpointed when gradients are needed, so only one chunk's logits are alive at a time.
    """
    head = model.get_output_embeddings()
    vocab = int(model.config.get_text_config().vocab_size)
    n, t = targets.shape
    per_chunk = n * t if chunk_elements is None else max(1, chunk_elements // vocab)
    if n * t <= per_chunk:
        logits = head(hidden)
        return _token_stats(
            logits[:, :-1] if drop_last else logits, targets, cmask, temperature, with_entropy
        )
    flat = (hidden[:, :-1] if drop_last else hidden).reshape(n * t, -1)
    flat_targets, flat_mask = targets.reshape(-1), cmask.reshape(-1)

    def chunk(h: torch.Tensor, tgt: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp, entropy = _token_stats(head(h), tgt, m, temperature, with_entropy)
        return logp, entropy if entropy is not None else logp.detach()

    recompute = torch.is_grad_enabled()
    logps: list[torch.Tensor] = []
    entropies: list[torch.Tensor] = []
    for start in range(0, n * t, per_chunk):
        args = (flat[start : start + per_chunk], flat_targets[start : start + per_chunk])
        args += (flat_mask[start : start + per_chunk],)
        logp, entropy = checkpoint(chunk, *args, use_reentrant=False) if recompute else chunk(*args)
        logps.append(logp)
        entropies.append(entropy)
    token_logp = torch.cat(logps).view(n, t)
    return token_logp, torch.cat(entropies).view(n, t) if with_entropy else None


def _last_hidden(model: Any, **inputs: Any) -> torch.Tensor:
    """The decoder's last hidden states, through the model's own forward with logits for one position only.

    Through the top-level forward, not the inner decoder alone, so that what wraps the model sees a forward
    (FSDP2 gathers the root's parameters — embeddings, norm, output head — in its pre-forward hook).
    """
    captured: list[torch.Tensor] = []
    handle = model.model.register_forward_hook(lambda _m, _args, out: captured.append(out[0]))
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[0]


def _check_rollout(inputs: Mapping[str, torch.Tensor], rollout: Rollout) -> int:
    b = inputs["input_ids"].shape[0]
    g = rollout.num_generations
    if rollout.completion_ids.shape[0] != b * g:
        raise ConfigError(
            f"rollout has {rollout.completion_ids.shape[0]} completions; expected {b} prompts × {g} generations"
        )
    if rollout.completion_mask.shape != rollout.completion_ids.shape:
        raise ConfigError("rollout completion_mask and completion_ids differ in shape")
    return g


def _logprobs_shared(
    policy: Policy,
    inputs: dict[str, torch.Tensor],
    rollout: Rollout,
    temperature: float,
    with_entropy: EntropyMode,
    chunk_elements: int | None,
) -> TokenStats:
    g = _check_rollout(inputs, rollout)
    positions = prompt_positions(policy, inputs)
    cache = prefill_shared(
        policy, inputs, positions, g
    )  # not detached: gradients reach the prefill and vision tower
    completion = rollout.completion_ids.to(policy.model.device)
    cmask = rollout.completion_mask.to(policy.model.device)
    t = completion.shape[1]
    # Feed the last prompt token, then every completion token but the last: the T outputs predict the T
    # completion tokens. Positions continue from the last prompt position, one per token.
    last = inputs["input_ids"][:, -1:].repeat_interleave(g, dim=0)
    tokens = torch.cat([last, completion[:, :-1]], dim=1)
    start = positions[..., -1:].repeat_interleave(g, dim=1)  # (3, B*G, 1)
    pos = start + torch.arange(t, device=start.device).view(1, 1, -1)
    mask = torch.cat([inputs["attention_mask"].repeat_interleave(g, dim=0), cmask[:, :-1]], dim=1)
    hidden = _last_hidden(
        policy.model,
        input_ids=tokens,
        attention_mask=mask,
        position_ids=pos,
        past_key_values=cache,
        use_cache=True,
    )
    return _head_stats(policy.model, hidden, completion, cmask, temperature, with_entropy, chunk_elements)


def _logprobs_naive(
    policy: Policy,
    prompt_inputs: Mapping[str, Any],
    rollout: Rollout,
    temperature: float,
    with_entropy: EntropyMode,
    chunk_elements: int | None,
) -> TokenStats:
    inputs = replicate_prompt_inputs(policy, prompt_inputs, rollout.num_generations)
    completion = rollout.completion_ids.to(policy.model.device)
    cmask = rollout.completion_mask.to(policy.model.device)
    if completion.shape[0] != inputs["input_ids"].shape[0]:
        raise ConfigError(
            f"rollout has {completion.shape[0]} completions; prompts × generations = {inputs['input_ids'].shape[0]}"
        )
    t = completion.shape[1]
    full = {
        **inputs,
        "input_ids": torch.cat([inputs["input_ids"], completion], dim=1),
        "attention_mask": torch.cat([inputs["attention_mask"], cmask], dim=1),
        "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(completion)], dim=1),
    }
    positions = prompt_positions(policy, full)
    hidden = _last_hidden(policy.model, **full, position_ids=positions, use_cache=False)[:, -(t + 1) :]
    return _head_stats(
        policy.model, hidden, completion, cmask, temperature, with_entropy, chunk_elements, drop_last=True
    )


@overload
def completion_logprobs(
    policy: Policy,
    prompt_inputs: Mapping[str, Any],
    rollout: Rollout,
    temperature: float = ...,
    share_prompt: bool = ...,
    *,
    with_entropy: Literal[False] = ...,
    chunk_elements: int | None = ...,
) -> torch.Tensor: ...


@overload
def completion_logprobs(
    policy: Policy,
    prompt_inputs: Mapping[str, Any],
    rollout: Rollout,
    temperature: float = ...,
    share_prompt: bool = ...,
    *,
    with_entropy: Literal[True],
    chunk_elements: int | None = ...,
    entropy_grad: bool = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


def completion_logprobs(
    policy: Policy,
    prompt_inputs: Mapping[str, Any],
    rollout: Rollout,
    temperature: float = 1.0,
    share_prompt: bool = True,
    *,
    with_entropy: bool = False,
    chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
    entropy_grad: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (B*G, T) of the rollout's completions under the current model; 0 where masked.

    Differentiable with respect to every parameter (vision tower and prefill included) on both paths.
    ``with_entropy=True`` returns ``(logps, entropies)``: the entropies (B*G, T) of softmax(logits / T) from
    the same forward, without gradient, 0 where masked — what GRPO's ``top_entropy_quantile`` and TRL's
    ``entropy`` metric need (TRL computes them in its training forward too). ``chunk_elements`` bounds the
    logits computed at once (tokens × vocabulary, see :data:`DEFAULT_CHUNK_ELEMENTS`); ``None`` computes all
    completion tokens' logits in one go. ``entropy_grad=True`` keeps the entropies' gradient (the entropy
    bonus, ``entropy_coef``, needs it, as TRL's fused head keeps it).
    """
    if chunk_elements is not None and chunk_elements < 1:
        raise ConfigError(f"chunk_elements must be >= 1 or None, got {chunk_elements}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    inputs = check_prompt_inputs(policy, prompt_inputs)
    model = policy.model
    if share_prompt and model.training and getattr(model, "is_activation_checkpointing", False):
        # transformers' checkpointed layers drop past_key_values in training mode, so a cached prefill
        # would silently be ignored; the repeated-prompt forward is exact, only slower.
        warnings.warn(
            "gradient checkpointing is on in training mode: completion_logprobs uses the repeated-prompt "
            "path (share_prompt=False)",
            stacklevel=2,
        )
        share_prompt = False
    if share_prompt and torch.is_grad_enabled() and is_sharded(model):
        # FSDP2 re-gathers a layer's weights for backward on hooks of the layer's outputs; the shared prefill's
        # keys and values reach the loss through the cache instead, after the layer was resharded.
        warnings.warn(
            "the policy is FSDP-sharded: completion_logprobs with gradients uses the repeated-prompt path "
            "(share_prompt=False)",
            stacklevel=2,
        )
        share_prompt = False
    path = _logprobs_shared if share_prompt else _logprobs_naive
    mode: EntropyMode = "grad" if with_entropy and entropy_grad else with_entropy
    logps, entropies = path(policy, inputs, rollout, temperature, mode, chunk_elements)
    if with_entropy:
        assert entropies is not None  # _token_stats computes them when asked
        return logps, entropies
    return logps
