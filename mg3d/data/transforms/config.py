"""Pipeline configuration: what LightningCLI reads from YAML for each source (and pickles into checkpoints).

The classes are re-exported by :mod:`mg3d.data.transforms`; checkpoints written before the package split
name them ``mg3d.data.transforms.PipelineConfig`` / ``mg3d.data.transforms.AugmentConfig``, which must keep
resolving there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mg3d.errors import ConfigError

#: Canonical 3D display orientation: x → patient Left, y → Posterior, z → Superior (DICOM's LPS grid).
DISPLAY_AXCODES = "LPS"


_FIT_MODES = ("resize", "letterbox", "pad_crop")


@dataclass
class AugmentConfig:
    """Training-time augmentations; every probability defaults to 0 (off).

    Spatial ones keep boxes exact through the frame (the random affine is exact when ``rotate_deg`` is
    0; with rotation the frame's box is a corner hull and ``target_boxes`` comes from the carried mask).
    """

    target_crop_prob: float = 0.0
    target_crop_scale: tuple[float, float] = (0.6, 1.0)
    lateral_flip_prob: float = 0.0
    affine_prob: float = 0.0
    rotate_deg: float = 0.0
    scale: float = 0.1
    translate: float = 0.05
    noise_prob: float = 0.0
    noise_std: float = 0.02
    gamma_prob: float = 0.0
    gamma: tuple[float, float] = (0.7, 1.5)
    bias_prob: float = 0.0
    bias_coeff: float = 0.2

    def __post_init__(self) -> None:
        for name in (
            "target_crop_prob",
            "lateral_flip_prob",
            "affine_prob",
            "noise_prob",
            "gamma_prob",
            "bias_prob",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"AugmentConfig.{name} must lie in [0, 1], got {value}")
        lo, hi = self.target_crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(
                f"AugmentConfig.target_crop_scale must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}"
            )
        if (
            self.rotate_deg < 0
            or self.rotate_deg > 45
            or not 0 <= self.scale < 1
            or not 0 <= self.translate < 0.5
        ):
            raise ConfigError(
                f"AugmentConfig: rotate_deg in [0, 45], scale in [0, 1), translate in [0, 0.5) expected, got "
                f"{self.rotate_deg}, {self.scale}, {self.translate}"
            )

    @property
    def rotates(self) -> bool:
        return self.affine_prob > 0 and self.rotate_deg > 0


@dataclass
class PipelineConfig:
    """Per-source pipeline options (LightningCLI reads these from YAML).

    Args:
        spatial_size: the model grid, in display axis order ((x, y) or (x, y, z)); ``None`` keeps the grid.
        fit: how to reach ``spatial_size``: ``resize`` (stretch), ``letterbox`` (keep the aspect ratio,
            pad the rest) or ``pad_crop`` (no resampling: centre pad/crop).
        axcodes: 3D orientation the volume is turned to (``LPS`` = display orientation); ``None`` keeps
            the stored axis order (arrays without geometry, e.g. M3D's preprocessed ``.npy``).
        pixdim: 3D output voxel size in mm (``Spacingd``); ``None`` keeps the stored spacing.
        preset: modality preset to use; ``None`` uses the record's modality.
        preset_options: per-modality preset options, e.g. ``{"CT": {"windows": ["lung", "mediastinum"]}}``.
        crop_foreground: crop to voxels above ``foreground_threshold`` (after the preset), never cutting
            the target, with ``foreground_margin`` voxels kept around.
        use_mask: load the record's mask when a rotation augmentation needs it for exact boxes.
        carry_mask: always carry the record's target mask (``mask == label``) through the pipeline and
            return it as ``sample["mask"]`` (bool, channel-first) — for visualisation and for checking boxes.
        augment: training augmentations (ignored for validation/test pipelines).
    """

    spatial_size: tuple[int, ...] | None = None
    fit: Literal["resize", "letterbox", "pad_crop"] = "resize"
    axcodes: str | None = DISPLAY_AXCODES
    pixdim: tuple[float, ...] | None = None
    preset: str | None = None
    preset_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    crop_foreground: bool = False
    foreground_threshold: float = 0.05
    foreground_margin: int = 2
    use_mask: bool = True
    carry_mask: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if isinstance(self.augment, Mapping):  # plain dicts from YAML / jsonargparse
            self.augment = AugmentConfig(**self.augment)
        if self.spatial_size is not None:
            self.spatial_size = tuple(int(s) for s in self.spatial_size)
            if len(self.spatial_size) not in (2, 3) or min(self.spatial_size) <= 0:
                raise ConfigError(
                    f"PipelineConfig.spatial_size must be 2 or 3 positive ints, got {self.spatial_size}"
                )
        if self.fit not in _FIT_MODES:
            raise ConfigError(f"PipelineConfig.fit must be one of {_FIT_MODES}, got {self.fit!r}")
        if self.pixdim is not None:
            self.pixdim = tuple(float(p) for p in self.pixdim)
            if len(self.pixdim) != 3 or min(self.pixdim) <= 0:
                raise ConfigError(f"PipelineConfig.pixdim must be 3 positive sizes in mm, got {self.pixdim}")
        if self.axcodes is not None and (
            len(self.axcodes) != 3 or {c for c in self.axcodes.upper()} - set("LRAPSI")
            or len({_AXIS_OF[c] for c in self.axcodes.upper()}) != 3
        ):  # fmt: skip
            raise ConfigError(
                f"PipelineConfig.axcodes must name each of L/R, A/P, S/I once, got {self.axcodes!r}"
            )
        if self.foreground_margin < 0:
            raise ConfigError(f"PipelineConfig.foreground_margin must be >= 0, got {self.foreground_margin}")

    def check_ndim(self, ndim: int, where: str = "pipeline") -> None:
        """Refuse a config that cannot apply to ``ndim``-D images (e.g. a 3D grid for radiographs)."""
        if self.spatial_size is not None and len(self.spatial_size) != ndim:
            raise ConfigError(f"{where}: spatial_size {self.spatial_size} has {len(self.spatial_size)} axes, "
                              f"the images are {ndim}D")  # fmt: skip
        if ndim == 2 and self.pixdim is not None:
            raise ConfigError(f"{where}: pixdim (respacing) applies to 3D volumes only")


_AXIS_OF = {"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}
