"""Reward targets from pipeline samples: the one place training and the studies turn a sample into a target.

Why one function: the semantic reward's numbers depend on the intensities it is handed. The pipeline's
tensor is windowed to ``[0, 1]`` for the model; the reward reads physical units (HU for CT, SUV for PET,
the stated normalisation for MR and radiographs). :func:`target_from_sample` inverts the preset the sample
declares (:func:`mg3d.data.modalities.to_physical`) and sets :attr:`RewardTarget.unit`, so
``GRPOModule`` and :mod:`mg3d.studies.semantic_property` give the reward identical inputs (a test checks it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from mg3d.data.modalities import INTENSITY_KEY, to_physical
from mg3d.frames import CoordinateFrame
from mg3d.rewards.base import RewardTarget

__all__ = ["reward_image", "target_from_sample"]


def reward_image(sample: Mapping[str, Any]) -> tuple[np.ndarray, str | None]:
    """The sample's image as the reward reads it (spatial axes only) and its unit.

    Without a declaration (disk caches written before it) the ``[0, 1]`` tensor is used as it is, with unit
    ``None``: the reward then falls back to the image's own intensity range.
    """
    image = sample["image"]
    tensor = (
        image.detach().cpu().float() if isinstance(image, torch.Tensor) else torch.as_tensor(image).float()
    )
    declaration = sample.get(INTENSITY_KEY)
    if declaration is None:
        return tensor.mean(0).numpy(), None
    physical, unit = to_physical(tensor, declaration)
    return physical.numpy(), unit


def target_from_sample(
    sample: Mapping[str, Any],
    *,
    record_id: str | None = None,
    phrase: str | None = None,
    frame: CoordinateFrame | None = None,
) -> RewardTarget:
    """A target on the sample's pipeline grid: ``target_boxes``, the image in physical units, its spacing.

    ``frame`` maps the pipeline grid on to the grid the model wrote in (tokenization's steps); ``None`` when
    boxes are scored on the pipeline grid itself. ``record_id``/``phrase`` default to the sample's.
    """
    pipeline_frame: CoordinateFrame = sample["frame"]
    boxes = sample.get("target_boxes")
    if boxes is None:
        boxes = pipeline_frame.to_text(sample["boxes"])
    image, unit = reward_image(sample)
    return RewardTarget(
        record_id=str(sample["id"]) if record_id is None else record_id,
        boxes=np.asarray(boxes, dtype=np.float64),
        frame=frame,
        image=image,
        spacing=sample.get("spacing"),
        phrase=str(sample.get("text", "")) if phrase is None else phrase,
        unit=unit,
    )
