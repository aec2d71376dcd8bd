"""End-to-end inference: an image (or volume) and a phrase in, a box in the stored image's voxel frame out.

:class:`Grounder` is the one object that evaluation (``scripts/evaluate.py``), the MONAI bundle
(:mod:`mg3d.bundle`) and users call. It ties together what training used — the evaluation (deterministic)
data pipeline of :mod:`mg3d.data.transforms`, the prompt set-up of :class:`~mg3d.grounding.GroundingPrompter`
and greedy generation of :func:`~mg3d.generation.generate_completions` — so a box predicted here is the box
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
import json
import os
import pickle
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mg3d
from mg3d.boxes import voxel_to_world
from mg3d.checkpointing import PICKLED_WEIGHTS, load_checkpoint_safely, unpickler_reason
from mg3d.data.records import GroundingRecord, record_from_dict
from mg3d.data.transforms import Pipeline, PipelineConfig, build_pipeline, record_to_item
from mg3d.data.user_modules import UserModule, user_modules_from
from mg3d.errors import ConfigError, DataError, Mg3dError
from mg3d.evaluation import box_in_image
from mg3d.generation import RolloutBackend, RolloutConfig, check_stop_strings
from mg3d.grounding import GroundingPrompter, PromptBatch, PromptConfig, predict
from mg3d.inference_settings import (
    INFERENCE_CONFIG_FORMAT,
    INFERENCE_CONFIG_NAME,
    INFERENCE_CONFIG_VERSION,
    check_input_kind,
    check_overrides,
    copy_user_modules,
    modalities_from,
    pipeline_from,
    pipeline_to_dict,
    pipelines_from_hparams,
    prompt_from,
    read_inference_config,
    saved_setting,
)
from mg3d.lora import merge_lora
from mg3d.model import Policy, PolicyConfig, load_policy, save_policy
from mg3d.predictions import InferenceInput, Prediction, probe_image
from mg3d.prompts import default_max_new_tokens

__all__ = [
    "INFERENCE_CONFIG_NAME",
    "Grounder",
    "InferenceInput",
    "Prediction",
    "load_checkpoint_safely",  # re-exported from mg3d.checkpointing, its home
    "pipelines_from_hparams",
    "probe_image",
]


#: The modality assumed for inputs that do not name one (the presets of ``mg3d.data.modalities``).
DEFAULT_MODALITY: dict[int, str] = {2: "CXR", 3: "CT"}

_OVERRIDES_COMMON = ("prompt", "pipelines", "max_new_tokens", "stop_strings", "default_modality", "device",
                     "modalities", "allow_mismatch")  # fmt: skip
_OVERRIDES_CKPT = (*_OVERRIDES_COMMON, "policy")
_OVERRIDES_PRETRAINED = (*_OVERRIDES_COMMON, "dtype", "attn_implementation")


# ---------------------------------------------------------------------------------------------- the grounder


class Grounder:
    """A policy with its prompt set-up, evaluation pipelines and greedy decoding: phrase → box.

    Args:
        policy: the model, tokenizer, image processor and codec.
        prompt: the prompt set-up the model was trained with (template, volume strategy, token budget, …).
        pipelines: evaluation pipeline settings by dataset name or ``"2d"``/``"3d"`` (looked up in that
            order; default ``PipelineConfig()``). Augmentation settings are ignored.
        max_new_tokens: the generation budget (as the training module's held-out evaluation); ``None``: what
            fits the prompt template (:func:`mg3d.prompts.default_max_new_tokens`). A warning names the
            completions that reach it unfinished.
        stop_strings: generation ends right after any of these (the training rollout's, e.g. ``</answer>``).
        default_modality: modality preset per ndim for inputs that do not name one (default: the one modality
            the model was trained on for that ndim, else CT / CXR).
        device: where the model runs.
        modalities: the modality keys the model was trained on, per ndim (from the checkpoint); an input of
            another modality or ndim is refused with a one-line reason, ``None`` = unknown (not checked).
        allow_mismatch: run such inputs anyway (each logged as a warning).
        user_modules: the user code this model needs (copied by :meth:`save_pretrained`; the constructors take
            it from the checkpoint, see :func:`mg3d.data.user_modules.import_user_module`).
    """

    def __init__(
        self,
        policy: Policy,
        *,
        prompt: PromptConfig | Mapping[str, Any] | None = None,
        pipelines: Mapping[str, PipelineConfig | Mapping[str, Any] | None] | None = None,
        max_new_tokens: int | None = None,
        stop_strings: Sequence[str] = (),
        default_modality: Mapping[int | str, str] | None = None,
        device: str | torch.device = "cpu",
        backend: RolloutBackend | None = None,
        modalities: Mapping[int | str, Sequence[str]] | None = None,
        allow_mismatch: bool = False,
        user_modules: Sequence[UserModule] | None = None,
    ) -> None:
        self.policy = policy
        #: what writes the completions: transformers ``generate`` (``None``), or any
        #: :class:`~mg3d.generation.RolloutBackend` (e.g. a vLLM server on a cluster)
        self.backend = backend
        self.prompt_config = prompt_from(prompt or {}, "prompt")
        self.prompter = GroundingPrompter(policy, self.prompt_config)
        # ``None`` marks an ambiguous key (several different training pipelines claimed it): refused when used.
        self.pipelines: dict[str, PipelineConfig | None] = {
            str(k): None if v is None else pipeline_from(v, f"pipelines[{k!r}]")
            for k, v in (pipelines or {}).items()
        }
        if max_new_tokens is None:  # what fits the template: room to reason for <think> templates
            max_new_tokens = default_max_new_tokens(self.prompt_config.template)
        if int(max_new_tokens) < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = int(max_new_tokens)
        self.stop_strings = check_stop_strings(stop_strings or ())
        #: modality keys per ndim the model was trained on (``None``: unknown, inputs are not checked)
        self.modalities: dict[int, tuple[str, ...]] | None = (
            None if modalities is None else {int(k): tuple(v) for k, v in modalities.items()}
        )
        self.allow_mismatch = bool(allow_mismatch)
        self.user_modules = list(user_modules or ())
        self.default_modality = dict(DEFAULT_MODALITY)
        for ndim, keys in (self.modalities or {}).items():
            if len(keys) == 1:  # what the model was trained on, not CT: a PET model preprocesses PET
                self.default_modality[ndim] = keys[0]
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
        check_overrides(overrides, _OVERRIDES_CKPT, "Grounder.from_checkpoint")
        path = Path(ckpt_path).expanduser()
        checkpoint = load_checkpoint_safely(path)
        data_state = checkpoint.get("GroundingDataModule")
        data_state = data_state if isinstance(data_state, Mapping) else {}
        # the user code it was trained with (presets, rewards) first: pipelines and prompts may name it
        user_modules = user_modules_from(data_state.get("user_modules"), str(path))
        hparams = checkpoint.get("hyper_parameters") or {}
        if not isinstance(hparams, Mapping):
            raise ConfigError(f"{path}: 'hyper_parameters' is a {type(hparams).__name__}, expected a dict")
        policy_config = _policy_config(hparams.get("policy"), overrides.get("policy"), path)
        prompt = prompt_from(hparams.get("prompt") or {}, f"{path}: hyper-parameter 'prompt'")
        if overrides.get("prompt") is not None:
            prompt = prompt_from(overrides["prompt"], "override 'prompt'", base=prompt)
        max_new = saved_setting(hparams, "evaluation", "max_new_tokens")
        stops = saved_setting(hparams, "rollout", "stop_strings")
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
        if policy_config.lora is not None:
            merge_lora(policy.model)  # inference runs (and bundles ship) the plain model, adapters folded in
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
            max_new_tokens=overrides.get("max_new_tokens") or max_new,  # None: the template's, as in training
            stop_strings=overrides.get("stop_strings", stops or ()),
            default_modality=overrides.get("default_modality"),
            device=overrides.get("device", "cpu"),
            modalities=overrides.get("modalities", modalities_from(data_state.get("modalities"), str(path))),
            allow_mismatch=bool(overrides.get("allow_mismatch", False)),
            user_modules=user_modules,
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
        check_overrides(overrides, _OVERRIDES_PRETRAINED, "Grounder.from_pretrained")
        folder = Path(model_dir).expanduser()
        settings = read_inference_config(folder) if folder.is_dir() else {}
        where = str(folder / INFERENCE_CONFIG_NAME)
        user_modules = user_modules_from(settings.get("user_modules"), where, base=folder)
        try:
            policy = load_policy(
                folder,
                dtype=overrides.get("dtype") or settings.get("dtype") or "auto",
                attn_implementation=overrides.get("attn_implementation"),
                codec_name=settings.get("codec"),
            )
        except pickle.UnpicklingError as err:
            # transformers reads a .bin weights-only and raises torch's long message: say which file and why
            pickled = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLED_WEIGHTS)
            raise ConfigError(
                f"{folder}: refused — {', '.join(pickled) or 'a weights file'} cannot be loaded weights-only "
                f"({unpickler_reason(err)}); mg3d never unpickles model files. Export the model as safetensors "
                "(Grounder.save_pretrained)."
            ) from None
        prompt = prompt_from(settings.get("prompt") or {}, f"{where}: 'prompt'")
        if overrides.get("prompt") is not None:
            prompt = prompt_from(overrides["prompt"], "override 'prompt'", base=prompt)
        pipelines: dict[str, Any] = {
            k: None if v is None else pipeline_from(v, f"{where}: pipelines[{k!r}]")
            for k, v in (settings.get("pipelines") or {}).items()
        }
        if overrides.get("pipelines") is not None:
            pipelines.update(overrides["pipelines"])
        generation = settings.get("generation") or {}
        return cls(
            policy,
            prompt=prompt,
            pipelines=pipelines,
            # A plain model folder has no settings file: the template's default budget (Grounder.__init__).
            max_new_tokens=overrides.get("max_new_tokens") or generation.get("max_new_tokens"),
            stop_strings=overrides.get("stop_strings", generation.get("stop_strings") or ()),
            default_modality=overrides.get("default_modality") or settings.get("default_modality"),
            device=overrides.get("device", "cpu"),
            modalities=overrides.get("modalities", modalities_from(settings.get("modalities"), where)),
            allow_mismatch=bool(overrides.get("allow_mismatch", False)),
            user_modules=user_modules,
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
                k: None if v is None else pipeline_to_dict(v) for k, v in sorted(self.pipelines.items())
            },
            "default_modality": {str(k): v for k, v in sorted(self.default_modality.items())},
            "modalities": None
            if self.modalities is None
            else {str(k): list(v) for k, v in sorted(self.modalities.items())},
            "user_modules": [
                {"name": m.name, "file": None if m.file is None else f"user_modules/{Path(m.file).name}"}
                for m in self.user_modules
            ],
        }

    def save_pretrained(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write the policy (safetensors), tokenizer, image processor and ``mg3d_inference.json``."""
        folder = save_policy(self.policy, out_dir)
        copy_user_modules(self.user_modules, folder / "user_modules")
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
        for r in recs:
            check_input_kind(self.modalities, r.modality, r.ndim, f"record {r.id!r}", self.allow_mismatch)
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
        check_input_kind(
            self.modalities, modality, info.ndim, f"input {rid!r} ({x.image})", self.allow_mismatch
        )
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
        config = RolloutConfig.one_per_prompt(self.max_new_tokens, stop_strings=self.stop_strings)
        predicted = predict(self.prompter, samples, config, self.backend)
        batch = predicted.batch
        cut = [str(item["id"]) for (item, _), t in zip(chunk, predicted.truncated) if t]
        if cut:
            warnings.warn(
                f"{len(cut)} of {len(chunk)} completions reached max_new_tokens={self.max_new_tokens} unfinished "
                f"(records {', '.join(cut[:5])}{', …' if len(cut) > 5 else ''}); their answers may be cut: "
                "raise max_new_tokens (Grounder(max_new_tokens=…), or generation.max_new_tokens in "
                f"{INFERENCE_CONFIG_NAME})",
                stacklevel=3,
            )
        out = []
        for i, ((item, record), answer) in enumerate(zip(chunk, predicted.answers)):
            sample = samples[i]
            affine = sample.get("affine")
            box_voxel = None
            if answer.box_source is not None:
                # The region a box denotes is its part inside the image (mg3d's one scoring convention).
                inside = box_in_image(answer.box_source, batch.voxel_to_text[i].source_shape)
                box_voxel = tuple(float(v) for v in inside)
            world = None
            if box_voxel is not None and affine is not None:
                world = tuple(float(v) for v in voxel_to_world(np.asarray(box_voxel), affine)[0])
            gt = () if record is None else tuple(tuple(float(v) for v in b) for b in record.boxes)
            # the stored frame's voxel size, as box_voxel and affine (the sample's own is the model grid's)
            spacing = (
                None
                if affine is None
                else np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
            )
            out.append(
                Prediction(
                    id=str(item["id"]),
                    dataset=str(item["dataset"]),
                    text=str(item["text"]),
                    ndim=int(item["ndim"]),
                    completion=predicted.texts[i],
                    parsed=answer.parsed,
                    box_text=None if answer.box_text is None else tuple(float(v) for v in answer.box_text),
                    box_voxel=box_voxel,
                    box_world_mm=world,
                    gt_boxes=gt,
                    frame=batch.voxel_to_text[i].to_dict(),
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
    item.pop("target_label", None)
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
