"""Sample G completions per prompt, computing each prompt (vision encoder + prefill) only once.

GRPO samples G completions of the same prompt. ``generate(num_return_sequences=G)`` (transformers 5.23)
encodes the vision input once but still prefills the language model over G copies of every prompt; TRL's
training forward repeats the whole prompt, vision encoder included, G times. With volume prompts of
hundreds to thousands of vision tokens and completions of a few dozen, that prefill is most of the cost.

The shared path here runs one forward over the prompts minus their last token (vision encoder + prefill),
repeat-interleaves every layer's keys/values G times (``Cache.batch_repeat_interleave``) and hands the
expanded cache to ``model.generate`` with the prompt ids repeated and the pixel inputs left out. ``generate``
then only feeds the last prompt token before decoding, so sampling, top-k/top-p, EOS and padding all stay
transformers' own code (no hand-written sampling loop). By default the expanded cache is first copied into
a preallocated ``StaticCache``: a dynamic cache re-concatenates all G copies of the prompt's keys/values at
every step, which roughly doubled the decoding time of 2,000-token prompts on CPU. The 3D rotary positions
(mRoPE) are computed once from the full prompt with the model's ``get_rope_index`` and passed explicitly as
``position_ids``; ``generate`` extends them by one per step, so nothing depends on the model's mutable
``rope_deltas`` attribute.

``completion_logprobs`` applies the same trick to the training forward (prefill once, expand, one forward
over the completions), and keeps the prefill in the autograd graph. Both functions also have a naive path
(``share_prompt=False``) behind the same interface, as a reference and for benchmarks; another backend
(e.g. vLLM on GPUs) plugs in through :class:`RolloutBackend`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import CompileConfig, GenerationConfig, StaticCache

from mg3d.errors import ConfigError
from mg3d.generation.config import RolloutConfig
from mg3d.generation.decoding import decode_shared
from mg3d.generation.inputs import (
    check_prompt_inputs,
    prefill_shared,
    prompt_positions,
    replicate_prompt_inputs,
)
from mg3d.generation.inverse_cdf import inverse_cdf_processors
from mg3d.model import Policy
from mg3d.sharding import gathered_parameters

__all__ = [
    "HFRolloutBackend",
    "Rollout",
    "RolloutBackend",
    "cut_at_stop_strings",
    "eval_mode",
    "generate_completions",
    "make_generator",
    "only_configured_processors",
]


@dataclass
class Rollout:
    """G completions for each of B prompts. Completion row ``i`` comes from prompt ``prompt_index[i]``."""

    prompt_ids: torch.Tensor  # (B, L), left-padded, one row per prompt
    prompt_mask: torch.Tensor  # (B, L)
    completion_ids: torch.Tensor  # (B*G, T), pad id after EOS
    completion_mask: torch.Tensor  # (B*G, T), 1 up to and including the first EOS
    texts: list[str]
    is_truncated: torch.Tensor  # (B*G,) bool: no EOS within max_new_tokens
    prompt_index: torch.Tensor  # (B*G,) long
    num_generations: int


class RolloutBackend(Protocol):
    """Anything that turns prompt inputs into a :class:`Rollout` (transformers here; vLLM on GPU clusters)."""

    def generate(self, prompt_inputs: Mapping[str, Any], config: RolloutConfig) -> Rollout: ...


def make_generator(seed: int, rank: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """A sampling generator with a distinct stream per rank (``seed + rank``)."""
    return torch.Generator(device=device).manual_seed(int(seed) + int(rank))


class HFRolloutBackend:
    """transformers ``generate`` backend; keeps one generator so successive rollouts draw fresh samples."""

    def __init__(self, policy: Policy, *, seed: int | None = None, rank: int = 0) -> None:
        self.policy = policy
        self.generator = make_generator(seed, rank) if seed is not None else None

    def generate(self, prompt_inputs: Mapping[str, Any], config: RolloutConfig) -> Rollout:
        with gathered_parameters(self.policy.model):  # FSDP2: one all-gather per rollout, not one per token
            return generate_completions(self.policy, prompt_inputs, config, generator=self.generator)


@contextlib.contextmanager
def _sampling_rng(
    device: torch.device, generator: torch.Generator | None, seed: int | None
) -> Iterator[None]:
    """Seed transformers' sampling (it draws from the global RNG) without disturbing the caller's RNG.

    With a generator, each call draws a fresh sub-seed from it (a stream per rank); with only a seed,
    every call repeats the same draws; with neither, the global RNG is used as is.
    """
    if generator is None and seed is None:
        yield
        return
    if generator is not None:
        sub_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    else:
        sub_seed = int(seed)  # type: ignore[arg-type]
    if device.type == "cpu":
        fork = torch.random.fork_rng(devices=[])
    else:  # also fork (and seed) the accelerator's generator that sampling on that device uses
        fork = torch.random.fork_rng(devices=[device], device_type=device.type)
    with fork:
        torch.manual_seed(sub_seed)
        yield


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Generation runs in eval mode: under training-mode gradient checkpointing transformers drops the cache."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _completion_masks(
    completion_ids: torch.Tensor, eos_ids: list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask up to and including the first EOS, pad id after it, and which rows never reached EOS."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    seen_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    mask = (~seen_before).long()
    ids = completion_ids.masked_fill(seen_before, pad_id)
    truncated = ~is_eos.any(dim=1)
    return ids, mask, truncated


@contextlib.contextmanager
def only_configured_processors(policy: Policy) -> Iterator[None]:
    """During ``generate``, the model's generation config holds token ids only, nothing that shapes logits.

    transformers fills every generation setting a call leaves unset from ``model.generation_config``, which
    a checkpoint folder loads from its ``generation_config.json``: Qwen-VL-Instruct folders set a
    ``repetition_penalty`` (and sampling defaults). A penalty mg3d does not name would change what is sampled,
    so sampled completions would no longer come from the policy whose log-probabilities GRPO trains. Here the
    processors are exactly those of :func:`_generation_kwargs` (temperature, top-k, top-p, suppressed vision
    tokens, stop strings); the folder's config is put back afterwards.
    """
    model = policy.model
    saved = model.generation_config
    clean = GenerationConfig(
        bos_token_id=getattr(saved, "bos_token_id", None),
        eos_token_id=policy.eos_token_ids,
        pad_token_id=policy.pad_token_id,
    )
    model.generation_config = clean
    try:
        yield
    finally:
        model.generation_config = saved


def _generation_kwargs(policy: Policy, config: RolloutConfig, *, compiled: bool = False) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": config.max_new_tokens,
        "do_sample": config.do_sample,
        "eos_token_id": policy.eos_token_ids,
        "pad_token_id": policy.pad_token_id,
        "use_cache": True,
        # Never torch.compile behind the caller's back (transformers auto-compiles on GPU with a static cache;
        # rollout shapes change every step of training, so it would recompile again and again).
        "disable_compile": not compiled,
    }
    if compiled:
        kwargs["compile_config"] = _compile_config(policy.model.device)
    if (
        config.do_sample and config.sampler == "inverse_cdf"
    ):  # transformers' greedy loop picks the drawn token
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        kwargs["logits_processor"] = inverse_cdf_processors(config.temperature, config.top_k, config.top_p)
    elif config.do_sample:
        kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
    else:  # greedy: neutralise any sampling defaults of the checkpoint's generation_config
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if config.suppress_vision_tokens:
        kwargs["suppress_tokens"] = [policy.image_token_id, policy.video_token_id]
    if config.stop_strings:  # transformers' StopStringCriteria: handles strings that span token boundaries
        kwargs.update(stop_strings=list(config.stop_strings), tokenizer=policy.tokenizer)
    return kwargs


def _compile_config(device: torch.device) -> CompileConfig:
    """transformers' compiled decoding: CUDA graphs on GPU (its default), plain inductor elsewhere.

    transformers compiles only on accelerators unless the private ``_compile_all_devices`` flag is set; on CPU
    ``mode="default"`` (``"reduce-overhead"`` means CUDA graphs).
    """
    if device.type in ("cuda", "xpu"):
        return CompileConfig()
    config = CompileConfig(mode="default")
    config._compile_all_devices = True
    return config


@contextlib.contextmanager
def _sdpa_gqa_kernel() -> Iterator[None]:
    """Grouped-query attention inside SDPA (``enable_gqa``) instead of copying every key/value head.

    transformers' SDPA path avoids repeating the key/value heads only in eager decoding (``pack_gqa``); under
    ``torch.compile`` it falls back to ``repeat_kv``, which on CPU materialises the whole static cache with
    every head repeated at every step (slower than not compiling at all, measured). transformers reads this
    switch from the environment at every attention call; it is set only for the compiled ``generate``.
    """
    name = "TRANSFORMERS_SDPA_FORCE_GQA"
    saved = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def cut_at_stop_strings(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    truncated: torch.Tensor,
    tokenizer: Any,
    stop_strings: Sequence[str],
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """End each completion at the token that completes its first stop string (mask, ids, truncation).

    ``generate`` stops a row there but pads it with the pad id, which :func:`_completion_masks` may take for
    an EOS (Qwen's pad ``<|endoftext|>`` is one): that unsampled token must not enter the loss. Decoding is
    monotone in the prefix length (a prefix holding a stop string keeps holding it), so the end is found by
    bisection over prefix lengths.
    """
    ids, mask, trunc = completion_ids.clone(), completion_mask.clone(), truncated.clone()

    def holds_stop(row: torch.Tensor, n: int) -> bool:
        text = tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
        return any(stop in text for stop in stop_strings)

    for r in range(ids.shape[0]):
        n = int(mask[r].sum())
        if n == 0 or not holds_stop(ids[r], n):
            continue
        lo, hi = 1, n  # smallest prefix length that holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if holds_stop(ids[r], mid):
                hi = mid
            else:
                lo = mid + 1
        mask[r, lo:] = 0
        ids[r, lo:] = pad_id
        trunc[r] = False
    return ids, mask, trunc


# ---------------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------------


def _to_static_cache(model: Any, cache: Any, max_cache_len: int) -> StaticCache:
    """Copy a filled dynamic cache into a preallocated static one (one in-place write per decoding step)."""
    static = StaticCache(config=model.config, max_cache_len=max_cache_len)
    if len(static.layers) != len(cache.layers):
        raise ConfigError(
            f"static cache has {len(static.layers)} layers, the prefill cache {len(cache.layers)}"
        )
    for target, source in zip(static.layers, cache.layers):
        target.update(source.keys, source.values)
    return static


def _generate_shared(policy: Policy, inputs: dict[str, torch.Tensor], config: RolloutConfig) -> torch.Tensor:
    g = config.num_generations
    positions = prompt_positions(policy, inputs)
    cache = prefill_shared(policy, inputs, positions, g)
    ids = inputs["input_ids"].repeat_interleave(g, dim=0)
    # Under autocast (Lightning's bf16-mixed) decoding writes bf16 keys/values, which a float32 StaticCache
    # refuses (index_copy_ dtype mismatch); the dynamic cache takes whatever dtype arrives.
    static = config.cache_implementation == "static" and not torch.is_autocast_enabled(ids.device.type)
    if static:
        cache = _to_static_cache(policy.model, cache, ids.shape[1] + config.max_new_tokens)
    compiled = static and config.compile  # transformers compiles only over a static cache
    with _sdpa_gqa_kernel() if compiled else contextlib.nullcontext():
        return policy.model.generate(
            input_ids=ids,
            attention_mask=inputs["attention_mask"].repeat_interleave(g, dim=0),
            position_ids=positions.repeat_interleave(g, dim=1),
            past_key_values=cache,
            **_generation_kwargs(policy, config, compiled=compiled),
        )[:, ids.shape[1] :]


def _generate_naive(policy: Policy, prompt_inputs: Mapping[str, Any], config: RolloutConfig) -> torch.Tensor:
    """Every prompt repeated G times (vision encoder included) and generated from scratch: the reference path.

    The rows are laid out as ``num_return_sequences`` would lay them out (prompt-major), so the same seed draws
    the same tokens; the explicit repetition lets mg3d pass its own rotary positions
    (:func:`~mg3d.generation.inputs.prompt_positions`), as the shared path and the training forward do.
    """
    inputs = replicate_prompt_inputs(policy, prompt_inputs, config.num_generations)
    kwargs = _generation_kwargs(policy, config)
    kwargs["position_ids"] = prompt_positions(policy, inputs)
    length = inputs["input_ids"].shape[1]
    return policy.model.generate(**inputs, **kwargs)[:, length:]


@torch.no_grad()
def generate_completions(
    policy: Policy,
    prompt_inputs: Mapping[str, Any],
    config: RolloutConfig,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample ``config.num_generations`` completions for every prompt of a left-padded batch.

    ``prompt_inputs``: ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and the vision inputs
    (``pixel_values``/``image_grid_thw``, ``pixel_values_videos``/``video_grid_thw``,
    ``second_per_grid_ts``). Rows of the result are grouped by prompt: prompt b owns rows b·G … b·G+G-1.
    """
    inputs = check_prompt_inputs(policy, prompt_inputs)
    model = policy.model
    with (
        eval_mode(model),
        only_configured_processors(policy),
        _sampling_rng(model.device, generator, config.seed),
    ):
        if config.share_prompt and config.decoder == "lean":
            raw = decode_shared(policy, inputs, prompt_positions(policy, inputs), config)
        elif config.share_prompt:
            raw = _generate_shared(policy, inputs, config)
        else:
            raw = _generate_naive(policy, inputs, config)
    completion_ids, completion_mask, truncated = _completion_masks(
        raw, policy.eos_token_ids, policy.pad_token_id
    )
    if config.stop_strings:
        completion_ids, completion_mask, truncated = cut_at_stop_strings(
            completion_ids,
            completion_mask,
            truncated,
            policy.tokenizer,
            config.stop_strings,
            policy.pad_token_id,
        )
    texts = policy.tokenizer.batch_decode(
        [row[m.bool()] for row, m in zip(completion_ids, completion_mask)], skip_special_tokens=True
    )
    b = inputs["input_ids"].shape[0]
    return Rollout(
        prompt_ids=inputs["input_ids"],
        prompt_mask=inputs["attention_mask"],
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        texts=texts,
        is_truncated=truncated,
        prompt_index=torch.arange(b, device=completion_ids.device).repeat_interleave(config.num_generations),
        num_generations=config.num_generations,
    )
