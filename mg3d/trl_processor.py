"""The policy as one Qwen-VL processor for TRL's ``GRPOTrainer`` (interop and benchmarks against TRL)."""

from __future__ import annotations

import copy
from typing import Any

from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor
from transformers.image_utils import SizeDict

from mg3d.model import Family, Policy
from mg3d.tokenization import VisionSpec

__all__ = ["ImageOnlyQwen2VLProcessor", "ImageOnlyQwen2_5_VLProcessor", "trl_image_processor"]


class _WithoutVideoProcessor:
    """Builds a Qwen-VL processor from an image processor and a tokenizer only.

    transformers' Qwen processors want a video processor, and the only one there is needs torchvision, which
    has no wheel for the pinned CPU torch. ``ProcessorMixin`` takes its sub-processors from the ``__init__``
    signature, so leaving ``video_processor`` out of it makes the processor image + text only: type checks,
    ``save_pretrained`` and ``from_pretrained`` then work. Videos cannot be processed (there is nothing to
    process them with).
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("video_processor", None)
        super().__init__(  # type: ignore[call-arg]
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )


class ImageOnlyQwen2_5_VLProcessor(_WithoutVideoProcessor, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` with the PIL image processor and no video processor (see :func:`trl_image_processor`)."""


class ImageOnlyQwen2VLProcessor(_WithoutVideoProcessor, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` with the PIL image processor and no video processor (see :func:`trl_image_processor`)."""


_IMAGE_ONLY_PROCESSORS: dict[Family, type] = {
    "qwen2.5-vl": ImageOnlyQwen2_5_VLProcessor,
    "qwen2-vl": ImageOnlyQwen2VLProcessor,
}


def trl_image_processor(
    policy: Policy, max_vision_tokens: int | None = None
) -> Qwen2_5_VLProcessor | Qwen2VLProcessor:
    """The policy's tokenizer, PIL image processor and chat template as one Qwen-VL processor, for TRL.

    TRL's ``GRPOTrainer`` (and other HF trainers) take a VLM's inputs from a ``processing_class`` that turns
    chat messages with images into ``input_ids`` + ``pixel_values`` + ``image_grid_thw`` +
    ``mm_token_type_ids``. The stock Qwen-VL processors cannot be built here (their video processor needs
    torchvision), so this one has none: 2D images and multi-image prompts work, videos (mg3d's volumes) do
    not — train those with :class:`mg3d.grpo.module.GRPOModule`.

    Images are sized by the prompter's rule (:meth:`mg3d.tokenization.VisionSpec.image_budget`): the checkpoint
    folder's pixel limits, or ``max_vision_tokens`` (the ``prompt.max_vision_tokens`` of the run) when given.
    """
    cls = _IMAGE_ONLY_PROCESSORS[policy.family]
    image_processor = policy.processor
    if max_vision_tokens is not None or policy.pixel_limits is not None:
        spec = VisionSpec.from_policy(policy)
        lo, hi = spec.image_min_pixels, spec.image_budget(max_vision_tokens) * spec.factor**2
        image_processor = copy.deepcopy(policy.processor)
        image_processor.size = SizeDict(shortest_edge=min(lo, hi), longest_edge=hi)
    return cls(
        image_processor=image_processor,
        tokenizer=policy.tokenizer,
        chat_template=policy.tokenizer.chat_template,
    )
