"""The Grounder's settings on disk and in checkpoints: prompt, pipelines and generation ↔ JSON, read safely.

``mg3d_inference.json`` (written by ``Grounder.save_pretrained``, shipped in bundles) and the hyper-parameters
of a training checkpoint are the two places a Grounder's settings come from; both are read here, field by
field, with errors that name the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mg3d.data.transforms import PipelineConfig
from mg3d.data.user_modules import UserModule
from mg3d.errors import ConfigError, DataError
from mg3d.grounding import PromptConfig

__all__ = [
    "INFERENCE_CONFIG_FORMAT",
    "INFERENCE_CONFIG_NAME",
    "INFERENCE_CONFIG_VERSION",
    "check_input_kind",
    "check_overrides",
    "copy_user_modules",
    "modalities_from",
    "pipeline_from",
    "pipeline_to_dict",
    "pipelines_from_hparams",
    "prompt_from",
    "read_inference_config",
    "saved_setting",
]

#: Written next to the weights by :meth:`Grounder.save_pretrained`: prompt, generation and pipeline settings.
INFERENCE_CONFIG_NAME = "mg3d_inference.json"
INFERENCE_CONFIG_FORMAT = "mg3d-inference"
INFERENCE_CONFIG_VERSION = 1


def pipeline_to_dict(config: PipelineConfig) -> dict[str, Any]:
    """Every field but ``augment`` (inference runs the deterministic pipeline only), JSON types."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(PipelineConfig):
        if f.name == "augment":
            continue
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    out["preset_options"] = json.loads(json.dumps(out["preset_options"]))
    return out


def _check_saved_fields(value: Any, cls: type, where: str, subject: str, noun: str) -> None:
    """Refuse a saved settings object that is not a mapping or names a field ``cls`` does not have."""
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{where}: {subject} must be a {cls.__name__} or an object, got {type(value).__name__}"
        )
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown {noun} field(s) {unknown}; known: {sorted(known)}")


def pipeline_from(value: Any, where: str) -> PipelineConfig:
    """A :class:`PipelineConfig` from a saved object (or a copy of one), refusing unknown fields by name, so a
    settings file written by a newer or mistyped config fails loudly instead of running another pipeline."""
    if isinstance(value, PipelineConfig):
        return dataclasses.replace(value)
    _check_saved_fields(value, PipelineConfig, where, "a pipeline", "pipeline")
    try:
        return PipelineConfig(**{k: v for k, v in value.items() if k != "augment"})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: invalid pipeline settings: {err}") from None


def prompt_from(value: Any, where: str, base: PromptConfig | None = None) -> PromptConfig:
    """A :class:`PromptConfig` from a saved object (or a copy of one), its fields laid over ``base`` (so an
    override changes only what it names); unknown fields are refused by name."""
    if isinstance(value, PromptConfig):
        return dataclasses.replace(value)
    _check_saved_fields(value, PromptConfig, where, "prompt settings", "prompt")
    return dataclasses.replace(base or PromptConfig(), **dict(value))


def _pipeline_ndims(config: PipelineConfig) -> tuple[int, ...]:
    if config.spatial_size is not None:
        return (len(config.spatial_size),)
    if config.pixdim is not None:
        return (3,)
    return (2, 3)


def saved_setting(hparams: Mapping[str, Any], group: str, name: str) -> Any:
    """One field of a config group saved in a checkpoint: a plain dict, or a dataclass (older checkpoints)."""
    value = hparams.get(group)
    return value.get(name) if isinstance(value, Mapping) else getattr(value, name, None)


def pipelines_from_hparams(hparams: Any) -> dict[str, PipelineConfig | None]:
    """Per-source pipeline settings found in a DataModule's saved hyper-parameters.

    The DataModule keeps one :class:`PipelineConfig` per source; they are collected wherever they sit (as
    dataclasses, or as objects under a ``pipeline`` key). Each is stored under the dataset name of the source
    that holds it (a ``dataset``/``name`` field) and under ``"2d"``/``"3d"`` by the grid it fits; when two
    different settings claim the same ``"Nd"`` key that key maps to ``None`` (ambiguous), and the grounder
    refuses such records unless a dataset name or an explicit ``pipelines=`` override decides.
    """
    found: list[tuple[PipelineConfig, str | None]] = []

    def context_name(obj: Any) -> str | None:
        for key in ("dataset", "name"):
            value = obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)
            if isinstance(value, str) and value:
                return value
        return None

    def walk(obj: Any, name: str | None, depth: int) -> None:
        if depth > 8:
            return
        if isinstance(obj, PipelineConfig):
            found.append((obj, name))
            return
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            here = context_name(obj) or name
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name), here, depth + 1)
        elif isinstance(obj, Mapping):
            here = context_name(obj) or name
            for key, value in obj.items():
                if key in ("pipeline", "eval_pipeline") and isinstance(value, Mapping):
                    found.append((pipeline_from(value, f"datamodule hyper-parameter {key!r}"), here))
                else:
                    walk(value, here, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value, name, depth + 1)

    walk(hparams, None, 0)
    out: dict[str, PipelineConfig | None] = {}
    clashes: set[str] = set()
    for config, name in found:
        if name is not None:
            out.setdefault(name, config)
        for ndim in _pipeline_ndims(config):
            key = f"{ndim}d"
            known = out.get(key)
            if known is not None and pipeline_to_dict(known) != pipeline_to_dict(config):
                clashes.add(key)
            out.setdefault(key, config)
    for key in clashes:
        out[key] = None
    return out


def check_overrides(overrides: Mapping[str, Any], allowed: Sequence[str], who: str) -> None:
    """Refuse override keyword arguments ``who`` does not take, naming them and the allowed ones."""
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ConfigError(f"{who}: unknown override(s) {unknown}; allowed: {list(allowed)}")


def read_inference_config(folder: Path) -> dict[str, Any]:
    """The checked top level of ``folder``'s :data:`INFERENCE_CONFIG_NAME` (format, version, known keys), or
    ``{}`` with a warning when the folder has none (defaults then stand in for the training settings)."""
    path = folder / INFERENCE_CONFIG_NAME
    if not path.is_file():
        warnings.warn(
            f"{folder}: no {INFERENCE_CONFIG_NAME}; using the default prompt and pipeline settings, which must "
            "match how the model was trained (Grounder.save_pretrained writes this file)",
            stacklevel=3,
        )
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the inference settings ({err})") from None
    if not isinstance(data, dict) or data.get("format") != INFERENCE_CONFIG_FORMAT:
        raise ConfigError(
            f"{path}: not an mg3d inference settings file (expected format {INFERENCE_CONFIG_FORMAT!r})"
        )
    version = data.get("version")
    if not isinstance(version, int) or version > INFERENCE_CONFIG_VERSION:
        raise ConfigError(
            f"{path}: settings version {version!r}; this mg3d reads up to {INFERENCE_CONFIG_VERSION}"
        )
    known = {
        "format",
        "version",
        "mg3d_version",
        "codec",
        "prompt",
        "pipelines",
        "generation",
        "default_modality",
        "dtype",
        "modalities",
        "user_modules",
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
    return data


def modalities_from(saved: Any, where: str) -> dict[int, tuple[str, ...]] | None:
    """The trained modality keys per ndim saved in a checkpoint or settings file (``{"3": ["PET"]}``);
    ``None`` when the file predates them (inputs are then not checked)."""
    if saved in (None, {}):
        return None
    if not isinstance(saved, Mapping):
        raise ConfigError(f"{where}: 'modalities' must map ndim to a list of modality keys, got {saved!r}")
    out: dict[int, tuple[str, ...]] = {}
    for key, value in saved.items():
        if str(key) not in ("2", "3") or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: 'modalities' must map 2/3 to lists of modality keys, got {saved!r}")
        out[int(key)] = tuple(str(v) for v in value)
    return out


def check_input_kind(
    trained: Mapping[int, Sequence[str]] | None, modality: str, ndim: int, where: str, allow: bool
) -> None:
    """Refuse an input whose ndim or modality the model never saw in training (one line naming both), unless
    ``allow``, which logs a warning instead: a 2D PNG given to a 3D model, or a CT to a PET model, would
    otherwise run through the wrong preprocessing and return a box that means nothing."""
    if trained is None:
        return
    problem = None
    if ndim not in trained:
        kinds = " and ".join(f"{n}D" for n in sorted(trained)) or "no"
        problem = f"{where}: is a {ndim}D image, the model was trained on {kinds} images only"
    elif modality not in trained[ndim]:
        problem = f"{where}: modality {modality!r}, the model was trained on {ndim}D {', '.join(trained[ndim])} only"
    if problem is None:
        return
    if not allow:
        raise DataError(
            f"{problem}; refused (to run it anyway: --allow-mismatch in evaluate.py, --allow_mismatch true for a "
            "bundle, allow_mismatch=True in Python)"
        )
    warnings.warn(f"{problem}; running anyway (allow_mismatch)", UserWarning, stacklevel=3)


def copy_user_modules(modules: Sequence[UserModule], folder: Path) -> list[Path]:
    """Copy the single-file user modules a model needs beside its weights (a bundle carries its own code)."""
    copied = []
    for module in modules:
        if module.file is None:
            continue
        source = Path(module.file)
        if not source.is_file():
            raise ConfigError(
                f"user module {module.name!r}: its file {source} is gone; cannot copy it with the model"
            )
        folder.mkdir(parents=True, exist_ok=True)
        copied.append(Path(shutil.copyfile(source, folder / source.name)))
    return copied
