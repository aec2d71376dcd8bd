"""Batch assembly: chat-templated prompts + tokenized visuals → ``input_ids``, masks and pixel inputs.

What the HF processor's ``__call__`` does (expand placeholders, pad, ``mm_token_type_ids``), without its
torchvision-only video path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from transformers import BatchFeature

from mg3d.errors import ConfigError
from mg3d.model import MM_TYPE_IMAGE, MM_TYPE_VIDEO
from mg3d.tokenization.plan import VisionSpec
from mg3d.tokenization.visual import TokenizedVisual

__all__ = ["build_mm_token_type_ids", "build_model_inputs"]


# ----------------------------------------------------------------------------------------------------------
# Batch assembly: the HF processor's __call__, without its torchvision-only video path
# ----------------------------------------------------------------------------------------------------------


def build_mm_token_type_ids(
    input_ids: torch.Tensor, image_token_id: int, video_token_id: int
) -> torch.Tensor:
    """0 for text (and padding), 1 for image pads, 2 for video pads — Qwen-VL's 3D-position switch."""
    types = torch.zeros_like(input_ids, dtype=torch.long)
    types[input_ids == image_token_id] = MM_TYPE_IMAGE
    types[input_ids == video_token_id] = MM_TYPE_VIDEO
    return types


def _token_id(tokenizer: Any, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == getattr(tokenizer, "unk_token_id", None):
        raise ConfigError(f"the tokenizer has no {token!r} token; it is not a Qwen-VL tokenizer")
    return int(tid)


def build_model_inputs(
    prompts: Sequence[str],
    visuals: Sequence[TokenizedVisual | Sequence[TokenizedVisual] | None],
    tokenizer: Any,
    spec: VisionSpec = VisionSpec(),  # noqa: B008 -- frozen dataclass, so a shared default is safe
    *,
    padding_side: Literal["left", "right"] = "left",
    image_token: str = "<|image_pad|>",
    video_token: str = "<|video_pad|>",
) -> BatchFeature:
    """Chat-templated prompts (one ``<|image_pad|>`` / ``<|video_pad|>`` per image / video) + their visuals →
    ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and the concatenated pixel inputs.

    Each placeholder is expanded to ``grid_thw.prod() // merge²`` pad tokens, in the order the placeholders
    appear (``visuals[i]`` lists the visuals of prompt ``i`` in that order; a slices visual fills one image
    placeholder per slice). Expansion works on token ids (the pads are single special tokens), which equals
    tokenizing the expanded string as the HF processor does, without re-tokenizing thousands of pads.
    """
    if len(prompts) != len(visuals):
        raise ConfigError(
            f"{len(prompts)} prompts but {len(visuals)} visual entries; give one entry per prompt"
        )
    image_id, video_id = _token_id(tokenizer, image_token), _token_id(tokenizer, video_token)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ConfigError("the tokenizer has neither a pad nor an EOS token to pad the batch with")
    encoded = tokenizer(list(prompts))["input_ids"]
    rows: list[list[int]] = []
    images: list[TokenizedVisual] = []
    videos: list[TokenizedVisual] = []
    for i, (ids, entry) in enumerate(zip(encoded, visuals)):
        items = [] if entry is None else [entry] if isinstance(entry, TokenizedVisual) else list(entry)
        expected: list[tuple[int, int]] = []
        for vis in items:
            (videos if vis.modality == "video" else images).append(vis)
            pad = video_id if vis.modality == "video" else image_id
            expected.extend((pad, spec.tokens(g)) for g in vis.grid_thw.tolist())
        found = [tok for tok in ids if tok in (image_id, video_id)]
        if found != [pad for pad, _ in expected]:
            names = {image_id: "image", video_id: "video"}
            raise ConfigError(
                f"prompt {i}: placeholders {[names[t] for t in found]} do not match its visuals "
                f"{[names[p] for p, _ in expected]}; put one <|image_pad|> per image and one <|video_pad|> "
                "per video in the prompt, in order"
            )
        out: list[int] = []
        queue = iter(expected)
        for tok in ids:
            if tok in (image_id, video_id):
                out.extend([tok] * next(queue)[1])
            else:
                out.append(tok)
        rows.append(out)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(length - len(r), length) if padding_side == "left" else slice(0, len(r))
        input_ids[i, sl] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, sl] = 1
    data: dict[str, torch.Tensor] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": build_mm_token_type_ids(input_ids, image_id, video_id),
    }
    if images:
        data["pixel_values"] = torch.cat([v.pixel_inputs["pixel_values"] for v in images])
        data["image_grid_thw"] = torch.cat([v.pixel_inputs["image_grid_thw"] for v in images])
    if videos:
        data["pixel_values_videos"] = torch.cat([v.pixel_inputs["pixel_values_videos"] for v in videos])
        data["video_grid_thw"] = torch.cat([v.pixel_inputs["video_grid_thw"] for v in videos])
        seconds = [v.pixel_inputs.get("second_per_grid_ts") for v in videos]
        if spec.uses_second_per_grid_ts:
            if any(s is None for s in seconds):
                raise ConfigError(
                    "a video visual lacks second_per_grid_ts; tokenize it with a Qwen2.5-VL VisionSpec"
                )
            data["second_per_grid_ts"] = torch.cat(seconds)  # type: ignore[arg-type]
    return BatchFeature(data=data)
