"""Intensity steps: the modality preset, and the clamp back to ``[0, 1]`` after intensity augmentations."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.transforms import Compose, MapTransform, Transform

from mg3d.data.modalities import INTENSITY_KEY, get_preset, intensity_declaration
from mg3d.data.transforms.tracking import IMAGE
from mg3d.errors import ConfigError


class IntensityPresetd(MapTransform):
    """Apply the modality preset (``preset`` or the record's modality) to ``"image"``, and declare it.

    The declaration (:func:`~mg3d.data.modalities.intensity_declaration`, under ``"intensity"``) lets the
    semantic reward turn the ``[0, 1]`` tensor back into HU / SUV (:func:`~mg3d.data.modalities.to_physical`).
    """

    def __init__(self, preset: str | None, options: Mapping[str, Mapping[str, Any]], ndim: int) -> None:
        super().__init__([IMAGE])
        self.preset = preset
        self.options = {k: dict(v) for k, v in options.items()}
        self.ndim = ndim
        self._built: dict[str, Compose] = {}
        if preset is not None:
            self._compose(preset)  # fail at construction on a bad name or option

    def _compose(self, name: str) -> Compose:
        if name not in self._built:
            preset = get_preset(name)
            if self.ndim not in preset.ndims:
                raise ConfigError(f"modality preset {name!r} is for {preset.ndims}D images, not {self.ndim}D")
            self._built[name] = preset.compose(**self.options.get(name, {}))
        return self._built[name]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        name = self.preset or str(d["modality"])
        try:
            compose = self._compose(name)
        except ConfigError as err:
            raise ConfigError(f"record {d.get('id')!r}: {err}") from err
        source = getattr(d[IMAGE], "meta", {}).get("filename_or_obj")
        get_preset(name).check_input(d[IMAGE], f"record {d.get('id')!r}" + (f" ({source})" if source else ""))
        d = dict(compose(d))
        d[IMAGE] = d[IMAGE].to(torch.float32)
        d[INTENSITY_KEY] = intensity_declaration(name, self.options.get(name, {}))
        return d


class ClampIntensityd(Transform):
    """Clamp ``"image"`` to ``[0, 1]`` after intensity augmentations (the tokenizer's input range)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d[IMAGE] = d[IMAGE].clamp(0.0, 1.0)
        return d
