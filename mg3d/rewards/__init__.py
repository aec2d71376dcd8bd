"""Rewards for grounding GRPO: one signature, a registry, weights from config (DESIGN.md §4).

Importing this package registers every reward: ``format``, ``iou_binary``, ``iou``, ``giou``,
``center_distance``, ``semantic``, ``chain_of_box`` and ``box_f1`` (several boxes per phrase).
:data:`PAPER_REWARDS` is MedGround-R1's set (format + binary IoU + semantic, unweighted sum); Chain-of-Box
consistency is off unless configured.
"""

from __future__ import annotations

from typing import Any

from mg3d.rewards.base import (
    REWARD_REGISTRY,
    ParsedBatch,
    Reward,
    RewardOutput,
    RewardSet,
    RewardTarget,
    available_rewards,
    build_reward,
    combine,
    completion_text,
    register_reward,
)
from mg3d.rewards.chain_of_box import ChainOfBoxReward
from mg3d.rewards.format import FormatReward
from mg3d.rewards.multibox import MultiBoxF1Reward
from mg3d.rewards.semantic import SemanticReward, crop_regions
from mg3d.rewards.spatial import CenterDistanceReward, GIoUReward, IoUReward, IoUThresholdReward

__all__ = [
    "PAPER_REWARDS",
    "REWARD_REGISTRY",
    "CenterDistanceReward",
    "ChainOfBoxReward",
    "FormatReward",
    "GIoUReward",
    "IoUReward",
    "IoUThresholdReward",
    "MultiBoxF1Reward",
    "ParsedBatch",
    "Reward",
    "RewardOutput",
    "RewardSet",
    "RewardTarget",
    "SemanticReward",
    "available_rewards",
    "build_reward",
    "combine",
    "completion_text",
    "crop_regions",
    "register_reward",
]

#: MedGround-R1: strict format + IoU > 0.5 + semantic consistency, all weighted 1 (``RewardSet.from_config``).
PAPER_REWARDS: dict[str, Any] = {
    "format": {"mode": "strict"},
    "iou_binary": {"threshold": 0.5},
    "semantic": {"mode": "all"},
}
