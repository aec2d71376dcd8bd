"""The VLM policy: build the tiny offline Qwen2.5-VL / Qwen2-VL, or load any local Qwen-VL checkpoint.

Both paths return the same :class:`Policy` (model + tokenizer + PIL image processor + box codec name), so
the rest of mg3d never asks where the weights came from. Only transformers' *PIL* image processor is used:
the torchvision-backed Qwen processors cannot be imported with the pinned CPU torch (no matching
torchvision wheel), and volumes are patchified by mg3d itself (``mg3d.tokenization``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mg3d.chat_template import build_byte_level_tokenizer
from mg3d.errors import ConfigError
from mg3d.lora import LoRAConfig, apply_lora

Family = Literal["qwen2.5-vl", "qwen2-vl"]

#: transformers ``model_type`` → mg3d family name (which is also the default box codec name).
MODEL_TYPE_TO_FAMILY: dict[str, Family] = {"qwen2_5_vl": "qwen2.5-vl", "qwen2_vl": "qwen2-vl"}

#: mm_token_type_ids values used by Qwen-VL's 3D rotary positions (0 = text).
MM_TYPE_IMAGE = 1
MM_TYPE_VIDEO = 2

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
_IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
#: Released Qwen-VL folders keep the chat template in the processor's file, not in the tokenizer config.
_CHAT_TEMPLATE_FILE = "chat_template.json"


@dataclass
class Policy:
    """A Qwen-VL model with the tokenizer, image processor and box codec name that belong to it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    processor: Qwen2VLImageProcessorPil
    codec_name: str
    family: Family
    #: ``(min_pixels, max_pixels)`` of one image from the checkpoint folder's ``preprocessor_config.json``;
    #: ``None`` for the tiny in-memory policy (its prompter keeps mg3d's own defaults).
    pixel_limits: tuple[int, int] | None = None

    # -- vision geometry -------------------------------------------------------------------------------
    @property
    def vision_config(self) -> Any:
        return self.model.config.vision_config

    @property
    def patch_size(self) -> int:
        return int(self.vision_config.patch_size)

    @property
    def merge_size(self) -> int:
        return int(self.vision_config.spatial_merge_size)

    @property
    def temporal_patch_size(self) -> int:
        return int(self.vision_config.temporal_patch_size)

    # -- special tokens --------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def video_token_id(self) -> int:
        return int(self.model.config.video_token_id)

    @property
    def vision_start_token_id(self) -> int:
        return int(self.model.config.vision_start_token_id)

    @property
    def vision_end_token_id(self) -> int:
        return int(self.model.config.vision_end_token_id)

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a completion: the tokenizer's EOS plus the generation config's."""
        ids: list[int] = []
        if self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        for value in gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]:
            if value is not None and int(value) not in ids:
                ids.append(int(value))
        if not ids:
            raise ConfigError(
                "the policy has no EOS token: set tokenizer.eos_token or generation_config.eos_token_id"
            )
        return ids

    @property
    def eos_token_id(self) -> int:
        return self.eos_token_ids[0]

    @property
    def pad_token_id(self) -> int:
        if self.tokenizer.pad_token_id is not None:
            return int(self.tokenizer.pad_token_id)
        gen_pad = getattr(self.model.generation_config, "pad_token_id", None)
        return int(gen_pad) if gen_pad is not None else self.eos_token_id

    @property
    def codec(self) -> Any:
        """The box codec of this policy's family (text frame ↔ numbers), from ``mg3d.prompts``."""
        from mg3d.prompts import get_codec  # imported late: prompts imports nothing model-side

        return get_codec(self.codec_name)

    # -- token layout ----------------------------------------------------------------------------------
    def num_vision_tokens(self, grid_thw: Sequence[int] | torch.Tensor) -> int:
        return merged_token_count(grid_thw, self.merge_size)

    def vision_span(self, grid_thw: Sequence[int] | torch.Tensor, modality: str) -> VisionSpan:
        """Token ids and mm_token_type_ids of one image/video: ``<|vision_start|>`` pad×n ``<|vision_end|>``."""
        return vision_span(
            grid_thw,
            modality,
            merge_size=self.merge_size,
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id,
        )


@dataclass(frozen=True)
class VisionSpan:
    """The placeholder run a Qwen-VL prompt holds for one image or video."""

    token_ids: list[int]
    mm_token_type_ids: list[int]
    num_vision_tokens: int


def merged_token_count(grid_thw: Sequence[int] | torch.Tensor, merge_size: int) -> int:
    """Number of LLM tokens for a patch grid ``(t, h, w)``: ``t·h·w / merge²`` (merge×merge patches → 1 token)."""
    values = [int(v) for v in (grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw)]
    if len(values) != 3 or min(values) < 1:
        raise ConfigError(f"grid_thw must be three positive integers (t, h, w), got {values}")
    t, h, w = values
    if h % merge_size or w % merge_size:
        raise ConfigError(f"grid_thw {values}: h and w must be multiples of the merge size {merge_size}")
    return t * h * w // (merge_size * merge_size)


def vision_span(
    grid_thw: Sequence[int] | torch.Tensor,
    modality: str,
    *,
    merge_size: int,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    vision_end_token_id: int,
) -> VisionSpan:
    """Build the ``<|vision_start|>`` + n pads + ``<|vision_end|>`` run and its modality types.

    Only the pad tokens are typed 1 (image) / 2 (video); start/end markers are text (0), as transformers'
    processors mark them. Without these types Qwen-VL silently falls back to 1D positions.
    """
    if modality not in ("image", "video"):
        raise ConfigError(f"modality must be 'image' or 'video', got {modality!r}")
    n = merged_token_count(grid_thw, merge_size)
    pad, kind = (image_token_id, MM_TYPE_IMAGE) if modality == "image" else (video_token_id, MM_TYPE_VIDEO)
    ids = [vision_start_token_id, *([pad] * n), vision_end_token_id]
    types = [0, *([kind] * n), 0]
    return VisionSpan(token_ids=ids, mm_token_type_ids=types, num_vision_tokens=n)


def mrope_section(head_dim: int) -> list[int]:
    """Split the rotary half-dimension into (temporal, height, width) parts in Qwen's 1/4, 3/8, 3/8 ratio.

    Qwen2-VL's released head dim of 128 gives [16, 24, 24]; the tiny model's 64 gives [8, 12, 12].
    """
    if head_dim % 2 or head_dim < 8:
        raise ConfigError(f"head dim {head_dim} must be even and at least 8 for 3D rotary positions")
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _resolve_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ConfigError(f"dtype {dtype!r} is neither 'auto' nor a torch dtype name (e.g. 'bfloat16')")
    return resolved


def _configure(model: PreTrainedModel, *, freeze_vision: bool, gradient_checkpointing: bool) -> None:
    """Options users expect: a frozen vision tower (TRL has none) and activation checkpointing."""
    if freeze_vision:
        for param in model.model.visual.parameters():
            param.requires_grad_(False)
    if gradient_checkpointing:
        # Non-reentrant checkpointing keeps gradients flowing even when the (frozen) inputs need none.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def _set_generation_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    gen = model.generation_config
    if gen.eos_token_id is None and tokenizer.eos_token_id is not None:
        gen.eos_token_id = tokenizer.eos_token_id
    if gen.pad_token_id is None:
        gen.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )


def build_tiny_policy(
    *,
    family: Family = "qwen2.5-vl",
    hidden_size: int = 256,
    intermediate_size: int = 512,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_depth: int = 2,
    vision_hidden: int = 128,
    vision_intermediate: int = 256,
    vision_heads: int = 4,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    window_size: int = 112,
    tokens_per_second: int = 4,
    max_position_embeddings: int = 32768,
    initializer_range: float = 0.02,
    tie_word_embeddings: bool = True,
    extra_tokens: Sequence[str] = (),
    min_pixels: int = 56 * 56,
    # The prompter's default image budget (1024 tokens of 28²), so the TRL path and a saved-then-reloaded tiny
    # model size images as the prompter does (mg3d.tokenization.VisionSpec.image_budget).
    max_pixels: int = 1024 * 28 * 28,
    seed: int = 0,
    dtype: str | torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    freeze_vision: bool = False,
    gradient_checkpointing: bool = False,
) -> Policy:
    """Randomly initialised tiny Qwen2.5-VL (or Qwen2-VL) with the offline byte-level tokenizer.

    Everything is built in memory (no files, no hub). The same ``seed`` gives bit-identical weights; the
    caller's global RNG state is left untouched. Defaults give the 3.3 M-parameter model that learned 3D
    boxes on CPU (``research/learning.md``).
    """
    if family not in ("qwen2.5-vl", "qwen2-vl"):
        raise ConfigError(f"family must be 'qwen2.5-vl' or 'qwen2-vl', got {family!r}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ConfigError(
            f"hidden_size {hidden_size} must divide by num_heads {num_heads}, "
            f"and num_heads by num_kv_heads {num_kv_heads}"
        )
    if vision_hidden % vision_heads:
        raise ConfigError(f"vision_hidden {vision_hidden} must divide by vision_heads {vision_heads}")
    tokenizer = build_byte_level_tokenizer(extra_tokens=tuple(extra_tokens))
    tokenizer.padding_side = "left"  # decoder-only generation needs left-padded prompts

    def tid(token: str) -> int:
        return int(tokenizer.convert_tokens_to_ids(token))

    vocab_size = -(-len(tokenizer) // 64) * 64  # pad the embedding to a multiple of 64 (as Qwen does)
    text = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": initializer_range,
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": mrope_section(hidden_size // num_heads),
            "rope_theta": 1e6,
        },
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    common = {
        "image_token_id": tid("<|image_pad|>"),
        "video_token_id": tid("<|video_pad|>"),
        "vision_start_token_id": tid("<|vision_start|>"),
        "vision_end_token_id": tid("<|vision_end|>"),
        "tie_word_embeddings": tie_word_embeddings,
        "initializer_range": initializer_range,
    }
    if family == "qwen2.5-vl":
        vision = {
            "depth": vision_depth,
            "hidden_size": vision_hidden,
            "intermediate_size": vision_intermediate,
            "num_heads": vision_heads,
            "out_hidden_size": hidden_size,
            "patch_size": patch_size,
            "spatial_merge_size": merge_size,
            "temporal_patch_size": temporal_patch_size,
            "window_size": window_size,
            "tokens_per_second": tokens_per_second,
            "fullatt_block_indexes": [vision_depth - 1],
            "initializer_range": initializer_range,
        }
        config: Any = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
        model_cls: Any = Qwen2_5_VLForConditionalGeneration
    else:
        if vision_intermediate % vision_hidden:
            raise ConfigError(
                f"qwen2-vl sizes its vision MLP by a ratio: vision_intermediate {vision_intermediate} "
                f"must be a multiple of vision_hidden {vision_hidden}"
            )
        vision = {
            "depth": vision_depth,
            "embed_dim": vision_hidden,
            "mlp_ratio": vision_intermediate // vision_hidden,
            "num_heads": vision_heads,
            "hidden_size": hidden_size,
            "patch_size": patch_size,
            "spatial_merge_size": merge_size,
            "temporal_patch_size": temporal_patch_size,
            "initializer_range": initializer_range,
        }
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **common)
        model_cls = Qwen2VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    resolved = _resolve_dtype(dtype)
    if isinstance(resolved, torch.dtype) and resolved != torch.float32:
        model = model.to(resolved)
    # Both ends of text stop generation, as in Qwen2.5-VL-Instruct's generation_config: a policy that drifts
    # to <|endoftext|> after its answer then ends there instead of running to max_new_tokens.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
    )
    _configure(model, freeze_vision=freeze_vision, gradient_checkpointing=gradient_checkpointing)
    return Policy(model=model, tokenizer=tokenizer, processor=processor, codec_name=family, family=family)


def _read_config_json(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{path}: no config.json; expected a saved Qwen2-VL / Qwen2.5-VL checkpoint folder")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{config_file}: cannot read the model config ({err})") from err


def _load_image_processor(
    path: Path, vision_config: Any, min_pixels: int | None, max_pixels: int | None
) -> Qwen2VLImageProcessorPil:
    overrides: dict[str, int] = {}
    if min_pixels is not None:
        overrides["min_pixels"] = min_pixels
    if max_pixels is not None:
        overrides["max_pixels"] = max_pixels
    if (path / _IMAGE_PROCESSOR_FILE).is_file():
        try:
            processor = Qwen2VLImageProcessorPil.from_pretrained(
                str(path), local_files_only=True, **overrides
            )
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(
                f"{path / _IMAGE_PROCESSOR_FILE}: cannot build the PIL image processor ({err})"
            ) from err
    else:
        warnings.warn(
            f"{path}: no {_IMAGE_PROCESSOR_FILE}; using the Qwen-VL image processor defaults with the patch "
            "sizes of the model's vision config",
            stacklevel=3,
        )
        processor = Qwen2VLImageProcessorPil(
            patch_size=vision_config.patch_size,
            merge_size=vision_config.spatial_merge_size,
            temporal_patch_size=vision_config.temporal_patch_size,
            **overrides,
        )
    for name, config_name in (
        ("patch_size", "patch_size"),
        ("merge_size", "spatial_merge_size"),
        ("temporal_patch_size", "temporal_patch_size"),
    ):
        if int(getattr(processor, name)) != int(getattr(vision_config, config_name)):
            raise ConfigError(
                f"{path}: image processor {name}={getattr(processor, name)} does not match the vision config "
                f"{config_name}={getattr(vision_config, config_name)}"
            )
    return processor


def load_policy(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str | None = None,
    freeze_vision: bool = False,
    gradient_checkpointing: bool = False,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    codec_name: str | None = None,
) -> Policy:
    """Load a local Qwen2-VL / Qwen2.5-VL checkpoint folder (never the hub) as a :class:`Policy`."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{folder}: checkpoint folder does not exist")
    raw = _read_config_json(folder)
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPE_TO_FAMILY:
        arch = raw.get("architectures") or model_type
        raise ConfigError(
            f"{folder}: architecture {arch} (model_type {model_type!r}) is not a Qwen2-VL / Qwen2.5-VL model; "
            f"supported model types: {sorted(MODEL_TYPE_TO_FAMILY)}"
        )
    family = MODEL_TYPE_TO_FAMILY[model_type]
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ConfigError(
            f"{folder}: no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)}); "
            "save the tokenizer next to the model (policy.tokenizer.save_pretrained)"
        )
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    kwargs: dict[str, Any] = {"dtype": _resolve_dtype(dtype), "local_files_only": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(folder), config=config, **kwargs)
    except OSError as err:
        raise ConfigError(f"{folder}: cannot load the model weights ({err})") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder}: cannot load the tokenizer ({err})") from err
    tokenizer.padding_side = "left"
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = _read_chat_template(folder)
    _set_generation_tokens(model, tokenizer)
    processor = _load_image_processor(folder, model.config.vision_config, min_pixels, max_pixels)
    _configure(model, freeze_vision=freeze_vision, gradient_checkpointing=gradient_checkpointing)
    return Policy(
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        codec_name=codec_name or family,
        family=family,
        pixel_limits=processor_pixel_limits(processor),
    )


def _read_chat_template(folder: Path) -> str | None:
    """The template of ``chat_template.json`` (``{"chat_template": "..."}``), or ``None`` when there is none."""
    path = folder / _CHAT_TEMPLATE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the chat template ({err})") from err
    template = data.get("chat_template") if isinstance(data, dict) else None
    if not isinstance(template, str) or not template.strip():
        raise ConfigError(f"{path}: expected an object with a non-empty 'chat_template' string")
    return template


def processor_pixel_limits(processor: Qwen2VLImageProcessorPil) -> tuple[int, int] | None:
    """``(min_pixels, max_pixels)`` of a Qwen-VL image processor (its ``size`` shortest/longest edge)."""
    size = dict(getattr(processor, "size", None) or {})
    lo, hi = size.get("shortest_edge"), size.get("longest_edge")
    if lo is None or hi is None:
        return None
    if not 1 <= int(lo) <= int(hi):
        raise ConfigError(f"image processor pixel limits min={lo}, max={hi} are not 1 <= min <= max")
    return int(lo), int(hi)


def save_policy(policy: Policy, path: str | Path) -> Path:
    """Write model (safetensors), tokenizer and image processor into one folder that :func:`load_policy` reads."""
    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    policy.model.save_pretrained(str(folder), safe_serialization=True)
    policy.tokenizer.save_pretrained(str(folder))
    policy.processor.save_pretrained(str(folder))
    return folder


# ---------------------------------------------------------------------------------------------------
# configuration (LightningCLI reads it as model.policy)
# ---------------------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


#: ``PolicyConfig`` fields that only shape the tiny model built from scratch (a checkpoint says its own).
_TINY_ONLY = (
    "family",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "vision_depth",
    "vision_hidden",
    "vision_intermediate",
)


@dataclass
class PolicyConfig:
    """Which policy to train: a local Qwen2-VL / Qwen2.5-VL checkpoint folder, or the tiny offline model.

    Args:
        checkpoint: a local ``save_pretrained`` folder (weights, tokenizer, preprocessor); ``None`` builds the
            tiny randomly initialised model from the sizes below (the CPU default: nothing is downloaded).
        family: ``qwen2.5-vl`` or ``qwen2-vl`` (tiny model only; a checkpoint says what it is).
        dtype: ``float32``, ``bfloat16`` or ``float16`` (``auto`` keeps a checkpoint's own).
        attn_implementation: e.g. ``sdpa``, ``flash_attention_2`` (GPU), or ``None`` for the default.
        freeze_vision: keep the vision tower fixed (fewer trainable parameters; common for 7B runs).
        gradient_checkpointing: trade compute for memory on large models.
        seed: initialisation seed of the tiny model; ``None`` (default) uses the run's seed (``GRPOModule``
            passes its ``sampling_seed``, which the CLI links to ``seed_everything``), so seeds vary the init.
        lora: train LoRA adapters, not every weight (:class:`mg3d.lora.LoRAConfig`); ``None``: full training.
        extra_tokens: tokens added to the tiny tokenizer as single tokens (e.g. ``<answer>``), so short answers
            cost fewer decoding steps.
    """

    checkpoint: str | None = None
    family: Literal["qwen2.5-vl", "qwen2-vl"] = "qwen2.5-vl"
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_depth: int = 2
    vision_hidden: int = 128
    vision_intermediate: int = 256
    seed: int | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str | None = None
    freeze_vision: bool = False
    gradient_checkpointing: bool = False
    extra_tokens: list[str] = field(default_factory=lambda: ["<answer>", "</answer>"])
    lora: LoRAConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):  # a checkpoint's saved hyper-parameters, or a plain mapping
            self.lora = LoRAConfig(**self.lora)

    def build(self, default_seed: int = 0) -> Policy:
        """The policy (with its LoRA adapters when ``lora`` is set; see :meth:`_build_base` for the seed)."""
        policy = self._build_base(default_seed)
        if self.lora is not None:
            apply_lora(policy.model, self.lora)
        return policy

    def _check_no_tiny_settings(self) -> None:
        """A checkpoint folder's own config sets its architecture: tiny-model settings next to it would be
        silently ignored, so a config that changes them (e.g. ``hidden_size`` with a checkpoint) is refused."""
        defaults = {f.name: f.default for f in fields(PolicyConfig)}
        changed = [name for name in _TINY_ONLY if getattr(self, name) != defaults[name]]
        if changed:
            settings = ", ".join(f"policy.{name}={getattr(self, name)!r}" for name in changed)
            raise ConfigError(
                f"policy.checkpoint={self.checkpoint!r} is a model folder whose own config sets its architecture; "
                f"{settings} apply only to the tiny model (policy.checkpoint: null): drop them or the checkpoint"
            )

    def _build_base(self, default_seed: int) -> Policy:
        """The policy; a tiny model is initialised from ``seed``, or ``default_seed`` when ``seed`` is ``None``."""
        if self.checkpoint is not None:
            self._check_no_tiny_settings()
            return load_policy(
                self.checkpoint,
                dtype="auto" if self.dtype == "auto" else _DTYPES[self.dtype],
                attn_implementation=self.attn_implementation,
                freeze_vision=self.freeze_vision,
                gradient_checkpointing=self.gradient_checkpointing,
            )
        if self.dtype == "auto":
            raise ConfigError(
                "policy.dtype='auto' needs a checkpoint; the tiny model is built in float32 by default"
            )
        return build_tiny_policy(
            family=self.family,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            vision_depth=self.vision_depth,
            vision_hidden=self.vision_hidden,
            vision_intermediate=self.vision_intermediate,
            extra_tokens=tuple(self.extra_tokens),
            seed=self.seed if self.seed is not None else default_seed,
            dtype=_DTYPES[self.dtype],
            attn_implementation=self.attn_implementation or "sdpa",
            freeze_vision=self.freeze_vision,
            gradient_checkpointing=self.gradient_checkpointing,
        )
