"""Modality presets: the intensity part of the pipelines, and the extension point for new modalities.

A preset turns the loaded image (channel-first, raw scanner units) into floats in ``[0, 1]``, the range
the tokenizer expects. It is a list of MONAI dictionary transforms acting on the ``"image"`` key and is
chosen by the record's ``modality`` (a key of this registry, also accepted by
:mod:`mg3d.data.records`). Presets hold *intensity* transforms only; geometry belongs to
:mod:`mg3d.data.transforms`, which keeps the boxes exact.

Built in:

* ``CT`` — Hounsfield windows (``lung``, ``mediastinum``, ``abdomen``, ``bone``, ``brain``, ``wide`` or an
  explicit ``(lo, hi)`` pair); several windows become several channels.
* ``MR`` — percentile normalisation (arbitrary scanner units, so fixed windows mean nothing).
* ``PET`` — SUV clipping to ``[0, suv_max]`` (the adapter must have converted counts to SUV).
* ``CXR`` — radiographs: colour → grey, percentile normalisation, MONOCHROME1 inversion so bone is bright.

Adding a modality is one call to :func:`register_preset` (``docs/extending.md`` walks through one).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.transforms import (
    Compose,
    MapTransform,
    ScaleIntensityRange,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
)

from mg3d.data.records import register_modality
from mg3d.errors import ConfigError

__all__ = [
    "CT_WINDOWS",
    "Grayscaled",
    "InvertMonochrome1d",
    "ModalityPreset",
    "WindowChannelsd",
    "available_presets",
    "get_preset",
    "register_preset",
]

#: Standard CT display windows as (lower, upper) HU, from (level, width): lo = L - W/2, hi = L + W/2.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-1350.0, 150.0),  # L -600, W 1500
    "mediastinum": (-125.0, 225.0),  # L 50, W 350
    "abdomen": (-150.0, 250.0),  # L 50, W 400
    "bone": (-500.0, 1300.0),  # L 400, W 1800
    "brain": (0.0, 80.0),  # L 40, W 80
    "wide": (-1000.0, 1000.0),  # air to dense bone, the usual grounding default
}

#: Key in the data dict where the loader stores a DICOM's PhotometricInterpretation (CXR inversion reads it).
PHOTOMETRIC_KEY = "photometric"


def _resolve_window(window: str | Sequence[float]) -> tuple[float, float]:
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise ConfigError(
                f"unknown CT window {window!r}; known: {sorted(CT_WINDOWS)} or a (lo, hi) pair in HU"
            )
        return CT_WINDOWS[window]
    values = tuple(float(v) for v in window)
    if len(values) != 2 or not values[0] < values[1]:
        raise ConfigError(f"a CT window is a name or a pair (lo, hi) with lo < hi, got {window!r}")
    return values  # type: ignore[return-value]


class WindowChannelsd(MapTransform):
    """Map HU to ``[0, 1]`` through one or more windows, one output channel per window.

    MONAI's ``ScaleIntensityRanged`` does one window; several windows as channels (the way radiologists
    flip between lung and mediastinal windows) need a copy per window and a concatenation.
    """

    def __init__(self, keys: str | Sequence[str], windows: Sequence[str | Sequence[float]]) -> None:
        super().__init__(keys)
        if not windows:
            raise ConfigError("WindowChannelsd: give at least one window")
        self.windows = [_resolve_window(w) for w in windows]
        self._scalers = [ScaleIntensityRange(lo, hi, 0.0, 1.0, clip=True) for lo, hi in self.windows]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != 1:
                raise ConfigError(f"CT windows expect a single-channel HU image, got {img.shape[0]} channels")
            d[key] = torch.cat([scale(img) for scale in self._scalers], dim=0)
        return d


class Grayscaled(MapTransform):
    """Average the colour channels (alpha dropped) into one grey channel; single-channel images pass.

    Some ChestX-ray14 PNGs are RGB/RGBA although the content is grey; the model expects one channel.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] > 1:
                d[key] = (
                    img[:3].mean(dim=0, keepdim=True) if img.shape[0] in (3, 4) else img.mean(0, keepdim=True)
                )
        return d


class InvertMonochrome1d(MapTransform):
    """``x → 1 - x`` when the DICOM says MONOCHROME1 (low values are bright), so bone is bright everywhere.

    Runs after normalisation to ``[0, 1]``; reads the interpretation the loader stored under
    ``"photometric"`` (absent for PNG/JPEG, which are stored as displayed).
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if str(d.get(PHOTOMETRIC_KEY, "")).upper() == "MONOCHROME1":
            for key in self.key_iterator(d):
                d[key] = 1.0 - d[key]
        return d


PresetBuilder = Callable[..., list[MapTransform]]


@dataclass(frozen=True)
class ModalityPreset:
    """One modality's intensity recipe.

    ``builder(**options)`` returns MONAI dict transforms acting on ``"image"`` whose output lies in
    ``[0, 1]``; ``defaults`` lists every option it accepts (unknown options are refused, so a typo in a
    config fails loudly); ``ndims`` says which image dimensionalities it is meant for.
    """

    name: str
    builder: PresetBuilder
    ndims: tuple[int, ...] = (2, 3)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def options(self, **overrides: Any) -> dict[str, Any]:
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise ConfigError(
                f"modality preset {self.name!r}: unknown option(s) {unknown}; it accepts {sorted(self.defaults)}"
            )
        return {**self.defaults, **overrides}

    def transforms(self, **overrides: Any) -> list[MapTransform]:
        """The preset's transforms with ``overrides`` applied to its default options."""
        return list(self.builder(**self.options(**overrides)))

    def compose(self, **overrides: Any) -> Compose:
        return Compose(self.transforms(**overrides))

    def channels(self, **overrides: Any) -> int:
        """Channels the preset outputs (CT: one per window; the others: one)."""
        windows = self.options(**overrides).get("windows")
        return len(windows) if windows else 1


_PRESETS: dict[str, ModalityPreset] = {}


def register_preset(preset: ModalityPreset, *, replace: bool = False) -> ModalityPreset:
    """Make ``preset`` available under ``preset.name`` (also as a record modality key)."""
    if not isinstance(preset, ModalityPreset):
        raise ConfigError(f"register_preset expects a ModalityPreset, got {type(preset).__name__}")
    if preset.name in _PRESETS and not replace:
        raise ConfigError(
            f"modality preset {preset.name!r} is already registered (pass replace=True to override)"
        )
    if not set(preset.ndims) <= {2, 3} or not preset.ndims:
        raise ConfigError(f"modality preset {preset.name!r}: ndims must be a non-empty subset of (2, 3)")
    register_modality(preset.name)  # validates the key format too
    _PRESETS[preset.name] = preset
    return preset


def get_preset(name: str) -> ModalityPreset:
    if name not in _PRESETS:
        raise ConfigError(
            f"no modality preset {name!r}; registered: {sorted(_PRESETS)} "
            "(add one with mg3d.data.modalities.register_preset, see docs/extending.md)"
        )
    return _PRESETS[name]


def available_presets() -> list[str]:
    return sorted(_PRESETS)


# ---------------------------------------------------------------------------------------------- built-ins


def _ct(windows: Sequence[str | Sequence[float]]) -> list[MapTransform]:
    return [WindowChannelsd("image", windows)]


def _mr(lower: float, upper: float) -> list[MapTransform]:
    return [ScaleIntensityRangePercentilesd("image", lower, upper, b_min=0.0, b_max=1.0, clip=True)]


def _pet(suv_max: float) -> list[MapTransform]:
    if suv_max <= 0:
        raise ConfigError(f"PET preset: suv_max must be positive, got {suv_max}")
    return [ScaleIntensityRanged("image", a_min=0.0, a_max=suv_max, b_min=0.0, b_max=1.0, clip=True)]


def _cxr(lower: float, upper: float) -> list[MapTransform]:
    return [
        Grayscaled("image"),
        ScaleIntensityRangePercentilesd("image", lower, upper, b_min=0.0, b_max=1.0, clip=True),
        InvertMonochrome1d("image"),
    ]


register_preset(
    ModalityPreset("CT", _ct, (2, 3), {"windows": ("wide",)}, "Hounsfield windows, one channel per window"),
    replace=True,
)
register_preset(
    ModalityPreset("MR", _mr, (2, 3), {"lower": 0.5, "upper": 99.5}, "percentile normalisation"), replace=True
)
register_preset(
    ModalityPreset("PET", _pet, (2, 3), {"suv_max": 10.0}, "SUV clipped to [0, suv_max]"), replace=True
)
register_preset(
    ModalityPreset(
        "CXR",
        _cxr,
        (2,),
        {"lower": 0.5, "upper": 99.5},
        "grey, percentile normalisation, MONOCHROME1 inverted",
    ),
    replace=True,
)
