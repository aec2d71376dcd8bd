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

Each preset also *declares* what its output means (``unit`` and ``inverse``): the semantic reward reads
intensities on a physical scale, so the pipeline records the preset it applied (:func:`intensity_declaration`,
stored in every sample under :data:`INTENSITY_KEY`) and :func:`to_physical` turns the ``[0, 1]`` tensor back:
CT windows to HU (exact inside the windows, clipped outside them), PET to SUV (clipped at ``suv_max``). MR and
radiographs have no physical unit; their percentile normalisation *is* the stated scale (``"normalised"``).
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
from mg3d.errors import ConfigError, DataError

__all__ = [
    "CT_WINDOWS",
    "INTENSITY_KEY",
    "Grayscaled",
    "InvertMonochrome1d",
    "ModalityPreset",
    "WindowChannelsd",
    "available_presets",
    "check_preset_settings",
    "get_preset",
    "intensity_declaration",
    "register_preset",
    "to_physical",
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
#: Sample key of the intensity declaration (:func:`intensity_declaration`) the pipeline's preset step writes.
INTENSITY_KEY = "intensity"


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
#: ``inverse(**options)`` → a map from the preset's ``(C, *spatial)`` output to ``(*spatial)`` in ``unit``
InverseBuilder = Callable[..., Callable[[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class ModalityPreset:
    """One modality's intensity recipe.

    ``builder(**options)`` returns MONAI dict transforms acting on ``"image"`` whose output lies in
    ``[0, 1]``; ``defaults`` lists every option it accepts (unknown options are refused, so a typo in a
    config fails loudly); ``ndims`` says which image dimensionalities it is meant for. ``unit`` and
    ``inverse`` declare what the output means (see the module doc); without an inverse the output itself is
    the stated scale (channels averaged) and ``unit`` should stay ``"normalised"``.
    """

    name: str
    builder: PresetBuilder
    ndims: tuple[int, ...] = (2, 3)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    unit: str = "normalised"
    inverse: InverseBuilder | None = None
    #: plausible (1st, 99th) percentiles of a stored input in its unit, or ``None``: an input outside is refused
    #: (a CT, or PET still in Bq/ml, given to a PET model), see :meth:`check_input`
    input_range: tuple[float, float] | None = None

    def check_input(self, image: torch.Tensor, where: str) -> None:
        """Refuse a stored image whose intensities cannot be this modality's (``input_range``), naming it."""
        if self.input_range is None:
            return
        flat = torch.as_tensor(image).detach().reshape(-1).to(torch.float32)
        step = max(1, flat.numel() // 1_000_000)  # a subsample keeps torch.quantile fast on large volumes
        p1, p99 = (float(v) for v in torch.quantile(flat[::step], torch.tensor([0.01, 0.99])))
        lo, hi = self.input_range
        if p1 < lo or p99 > hi:
            raise DataError(
                f"{where}: intensities (1st-99th percentile {p1:.4g} to {p99:.4g}) are not {self.name} in "
                f"{self.unit} (expected within [{lo:g}, {hi:g}]): another modality, or units not converted "
                "(PET in Bq/ml: prepare_data.py own --pet-units)"
            )

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

    def to_physical(self, image: torch.Tensor, **overrides: Any) -> torch.Tensor:
        """The preset's ``(C, *spatial)`` output back in :attr:`unit`, spatial axes only."""
        x = torch.as_tensor(image, dtype=torch.float32)
        if self.inverse is None:
            return x.mean(0)
        return self.inverse(**self.options(**overrides))(x)

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


def check_preset_settings(preset: str | None, preset_options: Mapping[str, Any] | None, where: str) -> None:
    """Refuse an unknown preset name or option in a pipeline's settings, naming ``where`` and the valid names.

    Run when a config is read (the DataModule and the CLI, before any model is built): otherwise a typo in a
    ``preset_options`` key is ignored and one in an option name surfaces per record, where ``on_error: skip``
    would drop a whole source.
    """
    hint = "register it in a user module (--imports, docs/extending.md)"
    if preset is not None and preset not in _PRESETS:
        raise ConfigError(f"{where}: pipeline.preset {preset!r} is not a registered preset; registered: "
                          f"{available_presets()} ({hint})")  # fmt: skip
    for name, options in dict(preset_options or {}).items():
        if name not in _PRESETS:
            raise ConfigError(f"{where}: pipeline.preset_options names preset {name!r}, which is not registered; "
                              f"registered: {available_presets()} ({hint})")  # fmt: skip
        if not isinstance(options, Mapping):
            raise ConfigError(
                f"{where}: pipeline.preset_options[{name!r}] must be a mapping of option → value"
            )
        try:
            _PRESETS[name].options(**dict(options))
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None


def intensity_declaration(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a pipeline records after applying preset ``name``: ``{"preset", "unit", "options"}`` (plain data,
    so it survives the disk cache's ``weights_only`` loading)."""
    preset = get_preset(name)
    opts = preset.options(**dict(options or {}))
    return {"preset": name, "unit": preset.unit, "options": {k: _plain(v) for k, v in opts.items()}}


def _plain(value: Any) -> Any:
    """Tuples → lists, recursively (option values such as window pairs)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def to_physical(image: torch.Tensor, declaration: Mapping[str, Any]) -> tuple[torch.Tensor, str]:
    """A pipeline tensor ``(C, *spatial)`` back in its preset's unit, from the sample's declaration."""
    try:
        name, options = str(declaration["preset"]), dict(declaration.get("options") or {})
    except (KeyError, TypeError) as err:
        raise ConfigError(
            f"malformed intensity declaration {declaration!r}: needs 'preset' and 'options'"
        ) from err
    preset = get_preset(name)
    return preset.to_physical(image, **options), preset.unit


# ---------------------------------------------------------------------------------------------- built-ins


def _ct(windows: Sequence[str | Sequence[float]]) -> list[MapTransform]:
    return [WindowChannelsd("image", windows)]


def _ct_inverse(windows: Sequence[str | Sequence[float]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """HU from window channels: per voxel the narrowest window that did not clip it (exact there); a voxel
    every window clipped gets the widest window's bound."""
    bounds = torch.tensor([_resolve_window(w) for w in windows], dtype=torch.float32)

    def inverse(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(bounds):
            raise ConfigError(f"CT inverse: {x.shape[0]} channels for {len(bounds)} windows")
        view = (-1,) + (1,) * (x.ndim - 1)
        lo, width = bounds[:, 0].view(view), (bounds[:, 1] - bounds[:, 0]).view(view)
        hu = lo + x * width
        if len(bounds) == 1:
            return hu[0]
        unclipped = (x > 0) & (x < 1)
        key = torch.where(unclipped, width.expand_as(x), torch.full_like(x, float("inf")))
        choice = torch.where(
            unclipped.any(0), key.argmin(0), torch.full_like(x[0], int(width.argmax()), dtype=torch.long)
        )
        return hu.gather(0, choice[None])[0]

    return inverse


def _pet_inverse(suv_max: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x.mean(0) * float(suv_max)


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
    ModalityPreset(
        "CT",
        _ct,
        (2, 3),
        {"windows": ("wide",)},
        "Hounsfield windows, one channel per window",
        "HU",
        _ct_inverse,
    ),
    replace=True,
)
register_preset(
    ModalityPreset("MR", _mr, (2, 3), {"lower": 0.5, "upper": 99.5}, "percentile normalisation"), replace=True
)
register_preset(
    ModalityPreset(
        "PET",
        _pet,
        (2, 3),
        {"suv_max": 10.0},
        "SUV clipped to [0, suv_max]",
        "SUV",
        _pet_inverse,
        (-1.0, 100.0),
    ),
    replace=True,
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
