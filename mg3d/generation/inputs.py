"""Prompt inputs of a Qwen-VL policy: checked, positioned (mRoPE), replicated, prefilled once.

Shared by sampling (:mod:`mg3d.generation.sampling`) and the training forward
(:mod:`mg3d.generation.logprobs`): both compute each prompt once and expand its key/value cache G times.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mg3d.errors import ConfigError
from mg3d.generation.rope import released_rope_index
from mg3d.model import Policy

__all__ = [
    "check_prompt_inputs",
    "prefill_shared",
    "prompt_positions",
    "replicate_prompt_inputs",
    "vision_kwargs",
]

#: Vision inputs that belong to individual images / videos (rows are split by grid, not by prompt).
VISION_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
)
KNOWN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", *VISION_KEYS)


def check_prompt_inputs(policy: Policy, prompt_inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    unknown = sorted(set(prompt_inputs) - set(KNOWN_KEYS))
    if unknown:
        raise ConfigError(
            f"prompt_inputs has unsupported keys {unknown}; expected a subset of {list(KNOWN_KEYS)}"
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


def vision_kwargs(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: inputs[k] for k in VISION_KEYS if k in inputs}


def prompt_positions(policy: Policy, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """3D rotary positions (3, B, L) of left-padded prompts, by the rule Qwen-VL was released with.

    Computed by mg3d (:func:`mg3d.generation.rope.released_rope_index`) rather than the model's
    ``get_rope_index``: the pinned transformers numbers text after a video differently from the pretrained
    rule (``docs/conventions.md``). Text-only rows get 1D positions counted over real tokens (what ``generate``
    uses), padding gets 0. Sampling, the training forward and evaluation all pass these positions explicitly.
    """
    vision = policy.model.config.vision_config
    tokens_per_second = getattr(vision, "tokens_per_second", None) if policy.family == "qwen2.5-vl" else None
    if policy.family == "qwen2.5-vl" and tokens_per_second is None:
        raise ConfigError("the Qwen2.5-VL vision config has no tokens_per_second; cannot place video frames")
    kwargs = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
    return released_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        merge_size=policy.merge_size,
        tokens_per_second=tokens_per_second,
        attention_mask=inputs["attention_mask"],
        **kwargs,
    )


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
    inputs = check_prompt_inputs(policy, prompt_inputs)
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


def prefill_shared(
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
        **vision_kwargs(inputs),
    )
    cache = out.past_key_values
    if cache is None or cache.get_seq_length() != inputs["input_ids"].shape[1] - 1:
        raise ConfigError("the model returned no usable KV cache for the prompt prefill")
    if repeats > 1:  # transformers' repeat_interleave copies the whole cache even for 1
        cache.batch_repeat_interleave(repeats)
    return cache
