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
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers import StaticCache

from mg3d.errors import ConfigError
from mg3d.model import Policy

#: Vision inputs that belong to individual images / videos (rows are split by grid, not by prompt).
_VISION_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
)
_KNOWN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", *_VISION_KEYS)


@dataclass
class RolloutConfig:
    """Sampling settings of one rollout. ``top_k=0`` and ``top_p=1.0`` switch those filters off."""

    num_generations: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    seed: int | None = None
    share_prompt: bool = True
    #: Shared path only: ``"static"`` writes the expanded prompt cache into a preallocated ``StaticCache``, so
    #: each decoding step writes one token in place instead of re-concatenating the whole G-times expanded
    #: prompt cache (``"dynamic"``, transformers' default). Same tokens; about half the decoding time for
    #: prompts of a few thousand tokens on CPU.
    cache_implementation: str = "static"
    #: Never sample image/video placeholder ids (as TRL does): a completion holding one would break the
    #: placeholder/feature count check in the training forward.
    suppress_vision_tokens: bool = True
    #: Generation of a completion also ends right after any of these strings (e.g. ``"</answer>"``), as
    #: vLLM's ``stop``: whatever a policy would write after its answer is then never sampled, scored or
    #: trained, and the completion counts as finished (not truncated) without an EOS token. Without it a
    #: policy whose end-of-answer EOS drifts under GRPO runs on to ``max_new_tokens`` (docs/benchmarks.md).
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.num_generations < 1:
            raise ConfigError(f"num_generations must be >= 1, got {self.num_generations}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        self.stop_strings = check_stop_strings(self.stop_strings)
        if self.cache_implementation not in ("static", "dynamic"):
            raise ConfigError(
                f"cache_implementation must be 'static' or 'dynamic', got {self.cache_implementation!r}"
            )

    @classmethod
    def one_per_prompt(
        cls,
        max_new_tokens: int,
        *,
        sampled: bool = False,
        temperature: float = 1.0,
        stop_strings: Sequence[str] = (),
    ) -> RolloutConfig:
        """One completion per prompt, greedy or one unfiltered sample at ``temperature``: how held-out
        evaluation (``GRPOModule.predict_samples``) and inference (``Grounder``) generate, so they agree."""
        return cls(
            num_generations=1,
            max_new_tokens=max_new_tokens,
            temperature=temperature if sampled else 1.0,
            do_sample=sampled,
            top_k=0,
            top_p=1.0,
            share_prompt=False,
            stop_strings=tuple(stop_strings),
        )


def check_stop_strings(stop_strings: str | Sequence[str]) -> tuple[str, ...]:
    """Stop strings as a tuple (one string from YAML / the command line is one stop); empty ones refused."""
    stops = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings)
    if any(not isinstance(stop, str) or not stop for stop in stops):
        raise ConfigError(f"stop_strings must be non-empty strings, got {stops!r}")
    return stops


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
        return generate_completions(self.policy, prompt_inputs, config, generator=self.generator)


# ---------------------------------------------------------------------------------------------------
# input checks and bookkeeping
# ---------------------------------------------------------------------------------------------------
def _check_prompt_inputs(policy: Policy, prompt_inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    unknown = sorted(set(prompt_inputs) - set(_KNOWN_KEYS))
    if unknown:
        raise ConfigError(
            f"prompt_inputs has unsupported keys {unknown}; expected a subset of {list(_KNOWN_KEYS)}"
        )
    if "input_ids" not in prompt_inputs:
        raise ConfigError("prompt_inputs needs 'input_ids' (B, L)")
    not_tensors = sorted(
        k for k, v in prompt_inputs.items() if v is not None and not isinstance(v, torch.Tensor)
    )
    if not_tensors:
        raise ConfigError(f"prompt_inputs values must be tensors; {not_tensors} are not")
    device = policy.model.device
    inputs = {k: v.to(device) for k, v in prompt_inputs.items() if v is not None}
    ids = inputs["input_ids"]
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise ConfigError(f"input_ids must be (batch, length >= 2), got shape {tuple(ids.shape)}")
    mask = inputs.setdefault("attention_mask", torch.ones_like(ids))
    if mask.shape != ids.shape:
        raise ConfigError(
            f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}"
        )
    if not bool((mask[:, -1] == 1).all()):
        bad = torch.nonzero(mask[:, -1] != 1).flatten().tolist()
        raise ConfigError(f"prompts {bad} are right-padded; decoder-only generation needs left padding")
    has_vision = "image_grid_thw" in inputs or "video_grid_thw" in inputs
    if "mm_token_type_ids" not in inputs:
        if has_vision:
            raise ConfigError(
                "prompt_inputs has vision grids but no mm_token_type_ids; without them Qwen-VL silently "
                "uses 1D positions for the vision tokens"
            )
        inputs["mm_token_type_ids"] = torch.zeros_like(ids)
    if inputs["mm_token_type_ids"].shape != ids.shape:
        raise ConfigError(
            f"mm_token_type_ids shape {tuple(inputs['mm_token_type_ids'].shape)} differs from input_ids {tuple(ids.shape)}"
        )
    if bool((inputs["mm_token_type_ids"][:, -1] != 0).any()):
        raise ConfigError("the last prompt token must be text (the generation prompt), not a vision token")
    return inputs


def _vision_kwargs(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: inputs[k] for k in _VISION_KEYS if k in inputs}


def prompt_positions(policy: Policy, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """3D rotary positions (3, B, L) of left-padded prompts, as the model computes them (``get_rope_index``).

    Text-only rows get 1D positions counted over real tokens (what ``generate`` uses), padding gets 0.
    """
    model = policy.model.model
    kwargs = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
    positions, _ = model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        attention_mask=inputs["attention_mask"],
        **kwargs,
    )
    return positions


def _items_per_prompt(
    ids: torch.Tensor, token_id: int, grid: torch.Tensor | None, merge: int
) -> list[list[int]]:
    """Which grid rows (images or videos, in order) belong to each prompt, from its placeholder count."""
    counts = (ids == token_id).sum(dim=1).tolist()
    if grid is None:
        if any(counts):
            raise ConfigError(f"prompts hold vision placeholder id {token_id} but no grid_thw was given")
        return [[] for _ in counts]
    sizes = (grid.prod(dim=-1) // (merge * merge)).tolist()
    groups: list[list[int]] = []
    item = 0
    for b, need in enumerate(counts):
        group: list[int] = []
        while need > 0:
            if item >= len(sizes) or sizes[item] > need:
                raise ConfigError(
                    f"prompt {b}: its {counts[b]} placeholders of id {token_id} do not match the grid_thw rows"
                )
            need -= sizes[item]
            group.append(item)
            item += 1
        groups.append(group)
    if item != len(sizes):
        raise ConfigError(
            f"{len(sizes) - item} grid_thw rows of placeholder id {token_id} belong to no prompt"
        )
    return groups


def _repeat_vision(
    pixels: torch.Tensor, grid: torch.Tensor, groups: list[list[int]], repeats: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Repeat each prompt's vision items (pixel rows + grid rows) ``repeats`` times, prompt by prompt."""
    rows = grid.prod(dim=-1).tolist()
    starts = [0]
    for n in rows:
        starts.append(starts[-1] + n)
    order = [i for group in groups for _ in range(repeats) for i in group]
    pix = torch.cat([pixels[starts[i] : starts[i + 1]] for i in order]) if order else pixels[:0]
    return pix, grid[order], order


def replicate_prompt_inputs(
    policy: Policy, prompt_inputs: Mapping[str, Any], repeats: int
) -> dict[str, torch.Tensor]:
    """Prompt inputs with every prompt (and its images/videos) repeated ``repeats`` times, interleaved."""
    inputs = _check_prompt_inputs(policy, prompt_inputs)
    out = {
        k: inputs[k].repeat_interleave(repeats, dim=0)
        for k in ("input_ids", "attention_mask", "mm_token_type_ids")
    }
    merge = policy.merge_size
    for pix_key, grid_key, token_id in (
        ("pixel_values", "image_grid_thw", policy.image_token_id),
        ("pixel_values_videos", "video_grid_thw", policy.video_token_id),
    ):
        groups = _items_per_prompt(inputs["input_ids"], token_id, inputs.get(grid_key), merge)
        if grid_key not in inputs:
            continue
        if pix_key not in inputs:
            raise ConfigError(f"prompt_inputs has {grid_key} but no {pix_key}")
        out[pix_key], out[grid_key], order = _repeat_vision(
            inputs[pix_key], inputs[grid_key], groups, repeats
        )
        if grid_key == "video_grid_thw" and "second_per_grid_ts" in inputs:
            out["second_per_grid_ts"] = inputs["second_per_grid_ts"][order]
    return out


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
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
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


def _generation_kwargs(policy: Policy, config: RolloutConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": config.max_new_tokens,
        "do_sample": config.do_sample,
        "eos_token_id": policy.eos_token_ids,
        "pad_token_id": policy.pad_token_id,
        "use_cache": True,
        # Never torch.compile behind the caller's back (transformers auto-compiles on GPU with a static cache;
        # rollout shapes change every step of training, so it would recompile again and again).
        "disable_compile": True,
    }
    if config.do_sample:
        kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
    else:  # greedy: neutralise any sampling defaults of the checkpoint's generation_config
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if config.suppress_vision_tokens:
        kwargs["suppress_tokens"] = [policy.image_token_id, policy.video_token_id]
    if config.stop_strings:  # transformers' StopStringCriteria: handles strings that span token boundaries
        kwargs.update(stop_strings=list(config.stop_strings), tokenizer=policy.tokenizer)
    return kwargs


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
def _prefill(
    policy: Policy, inputs: Mapping[str, torch.Tensor], positions: torch.Tensor, repeats: int
) -> Any:
    """One forward over every prompt but its last token (vision encoder included); cache expanded ×repeats."""
    out = policy.model(
        input_ids=inputs["input_ids"][:, :-1],
        attention_mask=inputs["attention_mask"][:, :-1],
        mm_token_type_ids=inputs["mm_token_type_ids"][:, :-1],
        position_ids=positions[..., :-1],
        use_cache=True,
        logits_to_keep=1,  # the logits of the prefill are not needed; keep the LM head cheap
        **_vision_kwargs(inputs),
    )
    cache = out.past_key_values
    if cache is None or cache.get_seq_length() != inputs["input_ids"].shape[1] - 1:
        raise ConfigError("the model returned no usable KV cache for the prompt prefill")
    cache.batch_repeat_interleave(repeats)
    return cache


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
    cache = _prefill(policy, inputs, positions, g)
    ids = inputs["input_ids"].repeat_interleave(g, dim=0)
    # Under autocast (Lightning's bf16-mixed) decoding writes bf16 keys/values, which a float32 StaticCache
    # refuses (index_copy_ dtype mismatch); the dynamic cache takes whatever dtype arrives.
    if config.cache_implementation == "static" and not torch.is_autocast_enabled(ids.device.type):
        cache = _to_static_cache(policy.model, cache, ids.shape[1] + config.max_new_tokens)
    return policy.model.generate(
        input_ids=ids,
        attention_mask=inputs["attention_mask"].repeat_interleave(g, dim=0),
        position_ids=positions.repeat_interleave(g, dim=1),
        past_key_values=cache,
        **_generation_kwargs(policy, config),
    )[:, ids.shape[1] :]


def _generate_naive(policy: Policy, prompt_inputs: Mapping[str, Any], config: RolloutConfig) -> torch.Tensor:
    g = config.num_generations
    kwargs = _generation_kwargs(policy, config)
    if config.do_sample and g > 1:
        inputs = _check_prompt_inputs(policy, prompt_inputs)
        kwargs["num_return_sequences"] = g
    else:  # transformers refuses num_return_sequences > 1 for greedy decoding: repeat the inputs instead
        inputs = replicate_prompt_inputs(policy, prompt_inputs, g)
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
    inputs = _check_prompt_inputs(policy, prompt_inputs)
    model = policy.model
    with _eval_mode(model), _sampling_rng(model.device, generator, config.seed):
        if config.share_prompt:
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


# ---------------------------------------------------------------------------------------------------
# log-probabilities of sampled completions (the GRPO training forward)
# ---------------------------------------------------------------------------------------------------
def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) at the sampled tokens, in float32 (as TRL scales training log-probs by T)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


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
    policy: Policy, inputs: dict[str, torch.Tensor], rollout: Rollout, temperature: float
) -> torch.Tensor:
    g = _check_rollout(inputs, rollout)
    positions = prompt_positions(policy, inputs)
    cache = _prefill(
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
    logits = policy.model(
        input_ids=tokens, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
    ).logits
    return _token_logprobs(logits, completion, temperature) * cmask


def _logprobs_naive(
    policy: Policy, prompt_inputs: Mapping[str, Any], rollout: Rollout, temperature: float
) -> torch.Tensor:
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
    logits = policy.model(**full, position_ids=positions, use_cache=False, logits_to_keep=t + 1).logits[
        :, :-1
    ]
    return _token_logprobs(logits, completion, temperature) * cmask


def completion_logprobs(
    policy: Policy,
    prompt_inputs: Mapping[str, Any],
    rollout: Rollout,
    temperature: float = 1.0,
    share_prompt: bool = True,
) -> torch.Tensor:
    """Per-token log-probs (B*G, T) of the rollout's completions under the current model; 0 where masked.

    Differentiable with respect to every parameter (vision tower and prefill included) on both paths.
    """
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    inputs = _check_prompt_inputs(policy, prompt_inputs)
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
    if share_prompt:
        return _logprobs_shared(policy, inputs, rollout, temperature)
    return _logprobs_naive(policy, inputs, rollout, temperature)


__all__ = [
    "HFRolloutBackend",
    "Rollout",
    "RolloutBackend",
    "RolloutConfig",
    "check_stop_strings",
    "completion_logprobs",
    "cut_at_stop_strings",
    "generate_completions",
    "make_generator",
    "prompt_positions",
    "replicate_prompt_inputs",
]
