"""End-to-end inference: an image (or volume) and a phrase in, a box in the stored image's voxel frame out.

:class:`Grounder` is the one object that evaluation (``scripts/evaluate.py``), the MONAI bundle
(:mod:`mg3d.bundle`) and users call. It ties together what training used — the evaluation (deterministic)
data pipeline of :mod:`mg3d.data.transforms`, the prompt set-up of :class:`~mg3d.grounding.GroundingPrompter`
and greedy generation of :func:`~mg3d.grpo.rollout.generate_completions` — so a box predicted here is the box
``GRPOModule.predict_samples`` would predict for the same sample.

Two rules keep predictions honest and reproducible:

* **The model never sees the answer.** Ground-truth boxes steer parts of the *training* pipeline (the
  foreground crop never cuts a target; slice/montage tokenization centres on the target), so they are removed
  before preprocessing and only attached to the :class:`Prediction` afterwards. A record and the same
  image+phrase given without ground truth (the bundle's inputs) therefore give the same box.
* **Never unpickle a file a user hands in** (DESIGN.md §6). Lightning checkpoints are read with
  ``torch.load(weights_only=True)``; the only non-tensor objects allowed are mg3d's own configuration
  dataclasses (restored field by field, no code runs). Exported models are safetensors + JSON.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mg3d
from mg3d.boxes import clip_boxes, voxel_to_world
from mg3d.data.readers import read_sitk_header
from mg3d.data.records import GroundingRecord, record_from_dict
from mg3d.data.transforms import Pipeline, PipelineConfig, build_pipeline, record_to_item
from mg3d.errors import ConfigError, DataError, Mg3dError
from mg3d.grounding import GroundingPrompter, PromptBatch
from mg3d.grpo.config import EvalConfig, PolicyConfig, PromptConfig
from mg3d.grpo.rollout import RolloutConfig, check_stop_strings, generate_completions
from mg3d.model import Policy, load_policy, save_policy
from mg3d.prompts import ParsedCompletion

__all__ = [
    "INFERENCE_CONFIG_NAME",
    "Grounder",
    "InferenceInput",
    "Prediction",
    "load_checkpoint_safely",
    "pipelines_from_hparams",
    "probe_image",
]

#: Written next to the weights by :meth:`Grounder.save_pretrained`: prompt, generation and pipeline settings.
INFERENCE_CONFIG_NAME = "mg3d_inference.json"
INFERENCE_CONFIG_FORMAT = "mg3d-inference"
INFERENCE_CONFIG_VERSION = 1

#: The modality assumed for inputs that do not name one (the presets of ``mg3d.data.modalities``).
DEFAULT_MODALITY: dict[int, str] = {2: "CXR", 3: "CT"}
DEFAULT_MAX_NEW_TOKENS = EvalConfig().max_new_tokens

_OVERRIDES_COMMON = ("prompt", "pipelines", "max_new_tokens", "stop_strings", "default_modality", "device")
_OVERRIDES_CKPT = (*_OVERRIDES_COMMON, "policy")
_OVERRIDES_PRETRAINED = (*_OVERRIDES_COMMON, "dtype", "attn_implementation")


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Prediction:
    """One greedy answer, read back and mapped to the stored image's voxel frame (and to mm where known).

    ``box_voxel`` follows DESIGN.md §2 (half-open voxel-edge box, MONAI axis order of the stored image), clipped
    to the image as :mod:`mg3d.evaluation` scores it;
    ``box_text`` is the same box on the grid the model saw; ``box_world_mm`` is the hull of the box's corners
    through ``affine`` (RAS mm; exact for axis-aligned affines), ``None`` without geometry (radiographs).
    ``frame`` is the :class:`~mg3d.boxes.CoordinateFrame` (as a dict) from the voxel frame to the text grid.
    ``gt_boxes`` is empty when the input had no ground truth (bundle inputs).
    """

    id: str
    dataset: str
    text: str
    ndim: int
    completion: str
    parsed: ParsedCompletion
    box_text: tuple[float, ...] | None
    box_voxel: tuple[float, ...] | None
    box_world_mm: tuple[float, ...] | None
    gt_boxes: tuple[tuple[float, ...], ...]
    frame: dict[str, Any]
    affine: tuple[tuple[float, ...], ...] | None
    spacing: tuple[float, ...] | None
    category: str | None
    question_type: int | None
    image: str
    modality: str = ""
    spatial_shape: tuple[int, ...] = ()
    codec: str = ""

    @property
    def ok(self) -> bool:
        """True when the completion gave a box that maps back to the voxel frame."""
        return self.box_voxel is not None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the parse as its status, flags and detail)."""
        return {
            "id": self.id,
            "dataset": self.dataset,
            "image": self.image,
            "phrase": self.text,
            "modality": self.modality,
            "ndim": self.ndim,
            "spatial_shape": list(self.spatial_shape),
            "completion": self.completion,
            "parse_status": self.parsed.status.value,
            "parse_flags": sorted(f.value for f in self.parsed.flags),
            "parse_detail": self.parsed.detail,
            "box_voxel": None if self.box_voxel is None else list(self.box_voxel),
            "box_world_mm": None if self.box_world_mm is None else list(self.box_world_mm),
            "box_text": None if self.box_text is None else list(self.box_text),
            "gt_boxes": [list(b) for b in self.gt_boxes],
            "category": self.category,
            "question_type": self.question_type,
            "spacing": None if self.spacing is None else list(self.spacing),
            "affine": None if self.affine is None else [list(r) for r in self.affine],
            "frame": self.frame,
            "codec": self.codec,
        }


@dataclass(frozen=True)
class InferenceInput:
    """An image (file or DICOM series folder) and a phrase, without ground truth.

    ``modality`` picks the intensity preset (default: the grounder's default for the image's ndim);
    ``dataset`` picks a per-dataset pipeline when the grounder has one under that name.
    """

    image: str
    phrase: str
    id: str | None = None
    modality: str | None = None
    dataset: str | None = None


@dataclass(frozen=True)
class ImageInfo:
    """What a header says without decoding pixels: ndim, spatial shape (MONAI axis order), geometry."""

    ndim: int
    spatial_shape: tuple[int, ...]
    has_geometry: bool


# ---------------------------------------------------------------------------------------------- image probing


def probe_image(path: str | os.PathLike[str]) -> ImageInfo:
    """Read only the header of an image to learn its ndim and spatial shape (in MONAI's axis order).

    The pipeline's loader checks the decoded image against this shape, so a probe that disagreed with MONAI
    would fail loudly, never shift a box. NIfTI, MetaImage/NRRD and DICOM series carry world geometry;
    PNG/JPEG/2D DICOM radiographs and ``.npy`` arrays do not (as for records, DESIGN.md §3).
    """
    from mg3d.data.sources._common import read_image_header_2d, read_nifti, read_npy_header

    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: image not found")
    name = p.name.lower()
    try:
        if p.is_dir():
            return _probe_sitk(p)
        if name.endswith((".nii", ".nii.gz")):
            header, _ = read_nifti(p, verify=False)
            return ImageInfo(3, tuple(header.spatial_shape), True)
        if name.endswith((".mhd", ".mha", ".nrrd", ".nhdr")):
            return _probe_sitk(p)
        if name.endswith(".npy"):
            shape, _ = read_npy_header(p)
            if len(shape) in (3, 4) and shape[0] == 1:
                shape = shape[1:]
            if len(shape) not in (2, 3):
                raise DataError(
                    f"{p}: array of shape {list(shape)} is neither one 2D image nor one 3D volume"
                )
            return ImageInfo(len(shape), tuple(shape), False)
        header = read_image_header_2d(p, verify=False)
        return ImageInfo(2, tuple(header.spatial_shape), False)
    except DataError as err:
        raise DataError(f"cannot use {p} as an input image: {err}") from None


def _probe_sitk(path: Path) -> ImageInfo:
    size, _dtype = read_sitk_header(path)  # headers only; refuses a claim above the voxel limit
    if len(size) not in (2, 3):
        raise DataError(f"{path}: {len(size)}D image; mg3d reads 2D images and 3D volumes")
    return ImageInfo(len(size), size, len(size) == 3)


# ---------------------------------------------------------------------------------------------- safe checkpoints

# Weight files that are pickles (torch.save / legacy formats), named in refusals.
_PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _config_dataclass(name: str) -> type | None:
    """The class named ``module.Qualname`` when it is one of mg3d's plain configuration dataclasses."""
    module_name, _, qualname = name.rpartition(".")
    if not module_name.startswith("mg3d.") or not qualname.isidentifier():
        return None
    try:
        obj = getattr(importlib.import_module(module_name), qualname, None)
    except ImportError:
        return None
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        return None
    # Unpickling restores such an object as __new__ + __dict__ update; a class that customises that could run code.
    if any(k in vars(obj) for k in ("__setstate__", "__reduce__", "__reduce_ex__", "__getattr__")):
        return None
    return obj


def _unpickler_reason(err: BaseException) -> str:
    """The informative part of torch's weights-only refusal (which global it met), not its advice paragraphs."""
    for line in str(err).splitlines():
        found = re.search(r"Unsupported global: GLOBAL (\S+)", line)
        if found:
            return f"it references {found.group(1)}, which is not allowed"
        if "WeightsUnpickler error" in line:
            return line.split("WeightsUnpickler error:", 1)[-1].strip()[:200]
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"


def load_checkpoint_safely(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` a Lightning checkpoint, allowing only mg3d's config dataclasses.

    The globals a checkpoint references are listed *before* unpickling (``torch.serialization``'s scanner
    reads the pickle opcodes, it runs nothing); anything outside tensors, plain containers and mg3d's
    configuration dataclasses is refused with its name — a crafted pickle never gets to run its payload.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{p}: checkpoint file not found")
    allowed: list[type] = []
    if zipfile.is_zipfile(p):
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(p))
        except Exception as err:  # a broken archive: zipfile/RuntimeError/ValueError from torch's reader
            raise ConfigError(
                f"{p}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})"
            ) from None
        refused = []
        for name in names:
            cls = _config_dataclass(name)
            if cls is None:
                refused.append(name)
            else:
                allowed.append(cls)
        if refused:
            raise ConfigError(
                f"{p}: refused — the checkpoint references {sorted(refused)}, which mg3d never unpickles "
                "(only tensors, plain containers and mg3d configuration dataclasses are loaded). If you wrote "
                "this checkpoint yourself, export the model with save_pretrained (safetensors) instead."
            )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            with torch.serialization.safe_globals(allowed):
                checkpoint = torch.load(str(p), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise ConfigError(
            f"{p}: refused by the safe (weights-only) loader ({_unpickler_reason(err)}). mg3d never unpickles "
            "arbitrary objects; export the model with save_pretrained (safetensors) instead."
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise ConfigError(f"{p}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"{p}: expected a Lightning checkpoint (a dict), got {type(checkpoint).__name__}")
    return checkpoint


# ---------------------------------------------------------------------------------------------- configs <-> JSON


def _pipeline_to_dict(config: PipelineConfig) -> dict[str, Any]:
    """Every field but ``augment`` (inference runs the deterministic pipeline only), JSON types."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(PipelineConfig):
        if f.name == "augment":
            continue
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    out["preset_options"] = json.loads(json.dumps(out["preset_options"]))
    return out


def _pipeline_from(value: Any, where: str) -> PipelineConfig:
    if isinstance(value, PipelineConfig):
        return dataclasses.replace(value)
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{where}: a pipeline must be a PipelineConfig or an object, got {type(value).__name__}"
        )
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown pipeline field(s) {unknown}; known: {sorted(known)}")
    try:
        return PipelineConfig(**{k: v for k, v in value.items() if k != "augment"})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: invalid pipeline settings: {err}") from None


def _prompt_from(value: Any, where: str, base: PromptConfig | None = None) -> PromptConfig:
    if isinstance(value, PromptConfig):
        return dataclasses.replace(value)
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{where}: prompt settings must be a PromptConfig or an object, got {type(value).__name__}"
        )
    known = {f.name for f in dataclasses.fields(PromptConfig)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown prompt field(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(base or PromptConfig(), **dict(value))


def _pipeline_ndims(config: PipelineConfig) -> tuple[int, ...]:
    if config.spatial_size is not None:
        return (len(config.spatial_size),)
    if config.pixdim is not None:
        return (3,)
    return (2, 3)


def _saved_setting(hparams: Mapping[str, Any], group: str, name: str) -> Any:
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
                    found.append((_pipeline_from(value, f"datamodule hyper-parameter {key!r}"), here))
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
            if known is not None and _pipeline_to_dict(known) != _pipeline_to_dict(config):
                clashes.add(key)
            out.setdefault(key, config)
    for key in clashes:
        out[key] = None
    return out


def _check_overrides(overrides: Mapping[str, Any], allowed: Sequence[str], who: str) -> None:
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ConfigError(f"{who}: unknown override(s) {unknown}; allowed: {list(allowed)}")


def _read_inference_config(folder: Path) -> dict[str, Any]:
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
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
    return data


# ---------------------------------------------------------------------------------------------- the grounder


class Grounder:
    """A policy with its prompt set-up, evaluation pipelines and greedy decoding: phrase → box.

    Args:
        policy: the model, tokenizer, image processor and codec.
        prompt: the prompt set-up the model was trained with (template, volume strategy, token budget, …).
        pipelines: evaluation pipeline settings by dataset name or ``"2d"``/``"3d"`` (looked up in that
            order; default ``PipelineConfig()``). Augmentation settings are ignored.
        max_new_tokens: the generation budget (as the training module's held-out evaluation).
        stop_strings: generation ends right after any of these (the training rollout's, e.g. ``</answer>``).
        default_modality: modality preset per ndim for inputs that do not name one.
        device: where the model runs.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        prompt: PromptConfig | Mapping[str, Any] | None = None,
        pipelines: Mapping[str, PipelineConfig | Mapping[str, Any] | None] | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        stop_strings: Sequence[str] = (),
        default_modality: Mapping[int | str, str] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.policy = policy
        self.prompt_config = _prompt_from(prompt or {}, "prompt")
        self.prompter = GroundingPrompter.from_config(policy, self.prompt_config)
        # ``None`` marks an ambiguous key (several different training pipelines claimed it): refused when used.
        self.pipelines: dict[str, PipelineConfig | None] = {
            str(k): None if v is None else _pipeline_from(v, f"pipelines[{k!r}]")
            for k, v in (pipelines or {}).items()
        }
        if int(max_new_tokens) < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = int(max_new_tokens)
        self.stop_strings = check_stop_strings(stop_strings or ())
        self.default_modality = dict(DEFAULT_MODALITY)
        for k, v in (default_modality or {}).items():
            if str(k) not in ("2", "3"):
                raise ConfigError(f"default_modality keys are 2 and 3 (ndim), got {k!r}")
            self.default_modality[int(k)] = str(v)
        self.device = torch.device(device)
        self.policy.model.to(self.device)
        self.policy.model.eval()
        self._built: dict[tuple[str, int], Pipeline] = {}
        #: Where the weights came from (set by the constructors; ``eval_results`` feed a bundle's metadata).
        self.checkpoint_info: dict[str, Any] = {}
        #: The metadata of the bundle this grounder was loaded from (``mg3d.bundle.load_bundle``).
        self.bundle_metadata: dict[str, Any] | None = None

    # -- constructors ------------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, ckpt_path: str | os.PathLike[str], **overrides: Any) -> Grounder:
        """The policy of a ``GRPOModule`` Lightning checkpoint, with the prompt and pipelines it trained with.

        Read safely (:func:`load_checkpoint_safely`). The policy is rebuilt from the saved ``PolicyConfig``
        (override a base-checkpoint folder that moved with ``policy={"checkpoint": …}``), then the trained
        ``model.*`` weights are loaded strictly. Pipelines come from ``datamodule_hyper_parameters`` when the
        DataModule saved them. Overrides: ``prompt``, ``pipelines``, ``max_new_tokens``, ``default_modality``,
        ``device``, ``policy``.
        """
        _check_overrides(overrides, _OVERRIDES_CKPT, "Grounder.from_checkpoint")
        path = Path(ckpt_path).expanduser()
        checkpoint = load_checkpoint_safely(path)
        hparams = checkpoint.get("hyper_parameters") or {}
        if not isinstance(hparams, Mapping):
            raise ConfigError(f"{path}: 'hyper_parameters' is a {type(hparams).__name__}, expected a dict")
        policy_config = _policy_config(hparams.get("policy"), overrides.get("policy"), path)
        prompt = _prompt_from(hparams.get("prompt") or {}, f"{path}: hyper-parameter 'prompt'")
        if overrides.get("prompt") is not None:
            prompt = _prompt_from(overrides["prompt"], "override 'prompt'", base=prompt)
        max_new = _saved_setting(hparams, "evaluation", "max_new_tokens")
        stops = _saved_setting(hparams, "rollout", "stop_strings")
        state = checkpoint.get("state_dict")
        if not isinstance(state, Mapping):
            raise ConfigError(f"{path}: no 'state_dict'; is this a Lightning checkpoint of GRPOModule?")
        weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        if not weights:
            raise ConfigError(
                f"{path}: the state dict holds no 'model.*' weights; is this a GRPOModule checkpoint?"
            )
        policy = policy_config.build()
        try:
            policy.model.load_state_dict(weights, strict=True)
        except RuntimeError as err:
            raise ConfigError(
                f"{path}: the weights do not fit the policy described by its hyper-parameters: "
                f"{str(err).splitlines()[0][:300]}"
            ) from None
        pipelines: dict[str, Any] = pipelines_from_hparams(
            checkpoint.get("datamodule_hyper_parameters") or {}
        )
        if overrides.get("pipelines") is not None:
            pipelines.update(overrides["pipelines"])
        elif not pipelines:
            warnings.warn(
                f"{path}: the checkpoint holds no DataModule pipeline settings (datamodule_hyper_parameters); "
                "using PipelineConfig() defaults, which must match training — pass pipelines={'2d': …, '3d': …}",
                stacklevel=2,
            )
        grounder = cls(
            policy,
            prompt=prompt,
            pipelines=pipelines,
            max_new_tokens=int(overrides.get("max_new_tokens") or max_new or DEFAULT_MAX_NEW_TOKENS),
            stop_strings=overrides.get("stop_strings", stops or ()),
            default_modality=overrides.get("default_modality"),
            device=overrides.get("device", "cpu"),
        )
        results = checkpoint.get("mg3d_eval_results")
        grounder.checkpoint_info = {
            "path": str(path),
            "global_step": checkpoint.get("global_step"),
            "epoch": checkpoint.get("epoch"),
            "eval_results": results if isinstance(results, Mapping) else {},
        }
        return grounder

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike[str], **overrides: Any) -> Grounder:
        """A ``save_pretrained`` folder: safetensors weights, tokenizer, processor and ``mg3d_inference.json``.

        Overrides: ``prompt``, ``pipelines``, ``max_new_tokens``, ``default_modality``, ``device``, ``dtype``,
        ``attn_implementation``.
        """
        _check_overrides(overrides, _OVERRIDES_PRETRAINED, "Grounder.from_pretrained")
        folder = Path(model_dir).expanduser()
        settings = _read_inference_config(folder) if folder.is_dir() else {}
        where = str(folder / INFERENCE_CONFIG_NAME)
        try:
            policy = load_policy(
                folder,
                dtype=overrides.get("dtype") or settings.get("dtype") or "auto",
                attn_implementation=overrides.get("attn_implementation"),
                codec_name=settings.get("codec"),
            )
        except pickle.UnpicklingError as err:
            # transformers reads a .bin weights-only and raises torch's long message: say which file and why
            pickled = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in _PICKLED_WEIGHTS)
            raise ConfigError(
                f"{folder}: refused — {', '.join(pickled) or 'a weights file'} cannot be loaded weights-only "
                f"({_unpickler_reason(err)}); mg3d never unpickles model files. Export the model as safetensors "
                "(Grounder.save_pretrained)."
            ) from None
        prompt = _prompt_from(settings.get("prompt") or {}, f"{where}: 'prompt'")
        if overrides.get("prompt") is not None:
            prompt = _prompt_from(overrides["prompt"], "override 'prompt'", base=prompt)
        pipelines: dict[str, Any] = {
            k: None if v is None else _pipeline_from(v, f"{where}: pipelines[{k!r}]")
            for k, v in (settings.get("pipelines") or {}).items()
        }
        if overrides.get("pipelines") is not None:
            pipelines.update(overrides["pipelines"])
        generation = settings.get("generation") or {}
        return cls(
            policy,
            prompt=prompt,
            pipelines=pipelines,
            max_new_tokens=int(
                overrides.get("max_new_tokens") or generation.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
            ),
            stop_strings=overrides.get("stop_strings", generation.get("stop_strings") or ()),
            default_modality=overrides.get("default_modality") or settings.get("default_modality"),
            device=overrides.get("device", "cpu"),
        )

    # -- export ------------------------------------------------------------------------------------------

    def inference_settings(self) -> dict[str, Any]:
        """The content of ``mg3d_inference.json``: everything besides the weights that fixes a prediction."""
        dtype = str(next(self.policy.model.parameters()).dtype).removeprefix("torch.")
        return {
            "format": INFERENCE_CONFIG_FORMAT,
            "version": INFERENCE_CONFIG_VERSION,
            "mg3d_version": mg3d.__version__,
            "codec": self.policy.codec_name,
            "dtype": dtype,
            "prompt": dataclasses.asdict(self.prompt_config),
            "generation": {
                "max_new_tokens": self.max_new_tokens,
                "stop_strings": list(self.stop_strings),
                "do_sample": False,
                "num_generations": 1,
            },
            "pipelines": {
                k: None if v is None else _pipeline_to_dict(v) for k, v in sorted(self.pipelines.items())
            },
            "default_modality": {str(k): v for k, v in sorted(self.default_modality.items())},
        }

    def save_pretrained(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write the policy (safetensors), tokenizer, image processor and ``mg3d_inference.json``."""
        folder = save_policy(self.policy, out_dir)
        text = json.dumps(self.inference_settings(), indent=2, ensure_ascii=False, allow_nan=False)
        (folder / INFERENCE_CONFIG_NAME).write_text(text + "\n", encoding="utf-8")
        return folder

    @property
    def codec(self) -> str:
        return self.policy.codec_name

    # -- prediction --------------------------------------------------------------------------------------

    def pipeline_config(self, dataset: str | None, ndim: int) -> PipelineConfig:
        """The pipeline settings used for a sample of ``dataset`` with ``ndim`` axes."""
        key = dataset if dataset is not None and self.pipelines.get(dataset) is not None else f"{ndim}d"
        if key not in self.pipelines:
            return PipelineConfig()
        config = self.pipelines[key]
        if config is None:
            named = sorted(k for k, v in self.pipelines.items() if v is not None and k not in ("2d", "3d"))
            raise ConfigError(
                f"dataset {dataset!r}: training used several different {ndim}D pipelines ({named}) and none is "
                f"named {dataset!r}; pass pipelines={{'{ndim}d': ...}} (or one per dataset name) to choose"
            )
        return config

    def _pipeline(self, dataset: str | None, ndim: int) -> Pipeline:
        key = dataset if dataset is not None and self.pipelines.get(dataset) is not None else f"{ndim}d"
        if (key, ndim) not in self._built:
            config = self.pipeline_config(dataset, ndim)
            config.check_ndim(ndim, where=f"pipeline {key!r}")
            self._built[(key, ndim)] = build_pipeline(config, ndim, train=False)
        return self._built[(key, ndim)]

    def predict_records(
        self,
        records: Iterable[GroundingRecord | Mapping[str, Any]],
        batch_size: int = 8,
        progress: bool = True,
    ) -> Iterator[Prediction]:
        """Greedy predictions for manifest records, in order; ground truth is attached, never shown to the model."""
        recs = [
            r if isinstance(r, GroundingRecord) else record_from_dict(r, where=f"record {i}")
            for i, r in enumerate(records)
        ]
        jobs = [(_record_item(r), r) for r in recs]
        return self._predict(jobs, batch_size, progress)

    def predict_inputs(
        self, inputs: Iterable[InferenceInput], batch_size: int = 8, progress: bool = False
    ) -> Iterator[Prediction]:
        """Greedy predictions for images + phrases without ground truth (the bundle's inputs), in order."""
        jobs = [(self._input_item(x, i), None) for i, x in enumerate(inputs)]
        return self._predict(jobs, batch_size, progress)

    def predict_image(
        self,
        image_path: str | os.PathLike[str],
        phrase: str,
        *,
        id: str | None = None,
        modality: str | None = None,
        dataset: str | None = None,
    ) -> Prediction:
        """One image or volume file (or DICOM series folder) and one phrase."""
        item = InferenceInput(str(image_path), phrase, id=id, modality=modality, dataset=dataset)
        return next(iter(self.predict_inputs([item], batch_size=1)))

    def _input_item(self, x: InferenceInput, index: int) -> dict[str, Any]:
        if not isinstance(x.phrase, str) or not x.phrase.strip():
            raise DataError(f"input {index} ({x.image}): the phrase is empty")
        info = probe_image(x.image)
        modality = x.modality or self.default_modality[info.ndim]
        rid = x.id or f"{index:04d}_{_stem(x.image)}"
        return {
            "image": str(Path(x.image).expanduser()),
            "id": rid,
            "dataset": x.dataset or "inference",
            "modality": modality,
            "ndim": info.ndim,
            "text": x.phrase,
            "boxes": np.zeros((0, 2 * info.ndim)),
            "spatial_shape": list(info.spatial_shape),
            "category": None,
            "question_type": None,
            "has_spacing": info.has_geometry,
            "affine_src": None,
        }

    def _predict(
        self, jobs: list[tuple[dict[str, Any], GroundingRecord | None]], batch_size: int, progress: bool
    ) -> Iterator[Prediction]:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc="grounding", unit="phrase")
        try:
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start : start + batch_size]
                yield from self._predict_batch(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()

    def _sample(self, item: dict[str, Any]) -> dict[str, Any]:
        pipeline = self._pipeline(item["dataset"], int(item["ndim"]))
        try:
            return pipeline(item)
        except Mg3dError:
            raise
        except Exception as err:  # MONAI wraps a failing transform in RuntimeError; name the input
            cause = err.__cause__ or err
            if isinstance(cause, Mg3dError):
                raise type(cause)(f"record {item['id']!r}: {cause}") from cause
            raise DataError(
                f"record {item['id']!r} ({item['image']}): preprocessing failed: {type(cause).__name__}: {cause}"
            ) from err

    def prompt_batch(self, records: Sequence[GroundingRecord]) -> PromptBatch:
        """What the model is shown for ``records`` (ground truth removed), exactly as :meth:`predict_records`
        builds it — to inspect prompts, visuals and frames."""
        return self.prompter.build([self._sample(_record_item(r)) for r in records])

    @torch.no_grad()
    def _predict_batch(self, chunk: list[tuple[dict[str, Any], GroundingRecord | None]]) -> list[Prediction]:
        samples = [self._sample(item) for item, _ in chunk]
        batch = self.prompter.build(samples)
        config = RolloutConfig.one_per_prompt(self.max_new_tokens, stop_strings=self.stop_strings)
        rollout = generate_completions(self.policy, batch.inputs, config)
        index = rollout.prompt_index.tolist()
        decoded = self.prompter.decode(rollout.texts, batch, index)
        out = []
        for i, ((item, record), dec) in enumerate(zip(chunk, decoded)):
            sample = samples[i]
            affine = sample.get("affine")
            box_voxel = None
            if dec.box_voxel is not None:
                # The region a box denotes is its part inside the image (as mg3d.evaluation scores it).
                inside = clip_boxes(np.asarray(dec.box_voxel)[None], batch.frames[i].source_shape)[0]
                box_voxel = tuple(float(v) for v in inside)
            world = None
            if box_voxel is not None and affine is not None:
                world = tuple(float(v) for v in voxel_to_world(np.asarray(box_voxel), affine)[0])
            gt = () if record is None else tuple(tuple(float(v) for v in b) for b in record.boxes)
            spacing = sample.get("spacing")
            out.append(
                Prediction(
                    id=str(item["id"]),
                    dataset=str(item["dataset"]),
                    text=str(item["text"]),
                    ndim=int(item["ndim"]),
                    completion=rollout.texts[i],
                    parsed=dec.parsed,
                    box_text=None if dec.box_text is None else tuple(float(v) for v in dec.box_text),
                    box_voxel=box_voxel,
                    box_world_mm=world,
                    gt_boxes=gt,
                    frame=batch.frames[i].to_dict(),
                    affine=None if affine is None else tuple(tuple(float(v) for v in row) for row in affine),
                    spacing=None if spacing is None else tuple(float(v) for v in spacing),
                    category=item.get("category"),
                    question_type=item.get("question_type"),
                    image=str(item["image"]),
                    modality=str(item["modality"]),
                    spatial_shape=tuple(int(s) for s in item["spatial_shape"]),
                    codec=self.policy.codec_name,
                )
            )
        return out


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".dcm", ".npy", ".mhd", ".mha", ".nrrd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def _record_item(record: GroundingRecord) -> dict[str, Any]:
    """The pipeline's input dict for a record, with the ground truth (boxes, target mask) removed."""
    item = record_to_item(record)
    item["boxes"] = np.zeros((0, 2 * record.ndim))
    item.pop("mask", None)
    item.pop("mask_label", None)
    return item


def _policy_config(saved: Any, override: Any, path: Path) -> PolicyConfig:
    if saved is None:
        base = PolicyConfig()
    elif isinstance(saved, PolicyConfig):
        base = saved
    elif isinstance(saved, Mapping):
        try:
            base = PolicyConfig(**dict(saved))
        except TypeError as err:
            raise ConfigError(
                f"{path}: hyper-parameter 'policy' does not describe a PolicyConfig: {err}"
            ) from None
    else:
        raise ConfigError(
            f"{path}: hyper-parameter 'policy' is a {type(saved).__name__}, expected a PolicyConfig"
        )
    if override is not None:
        if isinstance(override, PolicyConfig):
            base = override
        elif isinstance(override, Mapping):
            known = {f.name for f in dataclasses.fields(PolicyConfig)}
            unknown = sorted(set(override) - known)
            if unknown:
                raise ConfigError(f"override 'policy': unknown field(s) {unknown}; known: {sorted(known)}")
            base = dataclasses.replace(base, **dict(override))
        else:
            raise ConfigError(
                f"override 'policy' must be a PolicyConfig or a dict, got {type(override).__name__}"
            )
    # Inference needs neither activation checkpointing nor frozen towers.
    return dataclasses.replace(base, gradient_checkpointing=False, freeze_vision=False)
