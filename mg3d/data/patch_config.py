"""``PatchConfig``: a source's TorchIO patch-sampling option, apart from :mod:`mg3d.data.sampling` so that configs and
checkpoints name it without importing TorchIO."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mg3d.errors import ConfigError

__all__ = ["PatchConfig"]


@dataclass
class PatchConfig:
    """Train a source's large volumes on patches of the model grid (``GroundingDataModule``'s ``patches``).

    The source's pipeline then keeps its own grid (``spatial_size: null``; ``pixdim`` still respaces), and each
    training draw is one TorchIO patch of ``patch_size`` voxels containing the target with probability
    ``target_probability``. A target the patch cuts is kept when at least ``min_visible`` of it (of the patch,
    for a target larger than the patch) is inside, its box recomputed from the carried mask; a patch without
    the target (cut away entirely) is not trained on. Every verdict is counted (:attr:`PatchDataset.stats`).
    Validation and test still use the whole volume through the source's pipeline.
    """

    patch_size: tuple[int, int, int] = (64, 64, 32)
    target_probability: float = 1.0
    sampler: Literal["label", "weighted"] = "label"
    samples_per_volume: int = 2
    queue_length: int = 16
    min_visible: float = 0.5
    max_draws: int = 50

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(v) for v in self.patch_size)  # type: ignore[assignment]
        if len(self.patch_size) != 3 or min(self.patch_size) <= 0:
            raise ConfigError(f"PatchConfig.patch_size must be 3 positive ints, got {self.patch_size}")
        if not 0.0 < self.target_probability <= 1.0:
            raise ConfigError(
                f"PatchConfig.target_probability must lie in (0, 1], got {self.target_probability}"
            )
        if self.samples_per_volume < 1 or self.queue_length < 1 or self.max_draws < 1:
            raise ConfigError("PatchConfig: samples_per_volume, queue_length and max_draws must be >= 1")
        if not 0.0 < self.min_visible <= 1.0:
            raise ConfigError(f"PatchConfig.min_visible must lie in (0, 1], got {self.min_visible}")
