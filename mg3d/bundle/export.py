"""Writing a MONAI bundle: metadata, the MONAI inference config, README and LICENSE, hashes, optional zip.

The README and LICENSE prose are ``str.format`` templates in ``mg3d/resources`` (``bundle_README.md.tmpl``,
``bundle_LICENSE.txt.tmpl``), filled here with the exported model's numbers; a bundle this module writes is
what :func:`mg3d.bundle.verify.verify_bundle` accepts.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mg3d
from mg3d.bundle.verify import (
    BUNDLE_FORMAT,
    SCHEMA_ID,
    SCHEMA_PATH,
    _files_of,
    _hashed_files,
    _looks_pickled,
    _metadata_errors,
    _sha256,
    schema_sha256,
)
from mg3d.errors import BundleError, ConfigError
from mg3d.grounder import Grounder
from mg3d.tokenization import DEFAULT_MAX_VISION_TOKENS

__all__ = ["export_bundle"]

_BOX_CONVENTION = (
    "box_voxel: half-open voxel-edge box [lo_0, lo_1, (lo_2), hi_0, hi_1, (hi_2)] in the axis order of the stored "
    "image as MONAI loads it (2D: axis 0 = column x, axis 1 = row y; 3D: the file's i, j, k), voxel i covering "
    "[i, i+1) — MONAI's xyxy / xyzxyz mode. box_world_mm: the hull of that box's corners mapped through the "
    "image affine (RAS millimetres, exact for axis-aligned affines); null for images without geometry."
)

#: ``docs/README.md`` and ``LICENSE`` of every bundle (``str.format`` templates beside the metadata schema).
_README_TEMPLATE = SCHEMA_PATH.parent / "bundle_README.md.tmpl"
_LICENSE_TEMPLATE = SCHEMA_PATH.parent / "bundle_LICENSE.txt.tmpl"


def _template(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as err:
        raise BundleError(f"{path}: mg3d's bundle template cannot be read ({err}); reinstall mg3d") from None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _flat_metrics(results: Any, prefix: str = "") -> dict[str, float]:
    """``{"after_grpo": {"greedy/mIoU": 0.4}}`` → ``{"after_grpo/greedy/mIoU": 0.4}`` (finite numbers only)."""
    out: dict[str, float] = {}
    if isinstance(results, Mapping):
        for key, value in results.items():
            out.update(_flat_metrics(value, f"{prefix}{key}/"))
    elif (
        isinstance(results, (int, float, np.floating, np.integer))
        and not isinstance(results, bool)
        and np.isfinite(float(results))
    ):
        out[prefix.rstrip("/")] = float(results)
    return out


# ---------------------------------------------------------------------------------------------- metadata


#: MONAI ``format`` of an input image by the unit its preset reads (``ModalityPreset.unit``).
_FORMAT_OF_UNIT = {"HU": "hounsfield", "SUV": "suv"}


def _preprocessing(grounder: Grounder, ndim: int) -> dict[str, Any]:
    """What the bundle does to an input of ``ndim`` axes before the model sees it: the modality it expects, the
    preset (name, options, unit) and the geometry — written from the trained model's settings, never assumed."""
    from mg3d.data.modalities import get_preset, intensity_declaration

    config = grounder.pipeline_config(None, ndim)
    modality = grounder.default_modality[ndim]
    preset = config.preset or modality
    declared = intensity_declaration(preset, config.preset_options.get(preset))
    return {
        "modalities": list((grounder.modalities or {}).get(ndim, (modality,))),
        "preset": preset,
        "preset_options": declared["options"],
        "unit": get_preset(preset).unit,
        "axcodes": config.axcodes if ndim == 3 else None,
        "pixdim": None if config.pixdim is None or ndim == 2 else list(config.pixdim),
        "spatial_size": None if config.spatial_size is None else list(config.spatial_size),
        "fit": config.fit,
    }


def _image_inputs(grounder: Grounder, ndims: Sequence[int]) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    for ndim in ndims:
        config = grounder.pipeline_config(None, ndim)
        prep = _preprocessing(grounder, ndim)
        modality = grounder.default_modality[ndim]
        grid = list(config.spatial_size) if config.spatial_size is not None else ["*"] * ndim
        axes = (
            "x (column), y (row)"
            if ndim == 2
            else "x (patient right→left), y (anterior→posterior), z (inferior→superior)"
        )
        inputs["image" if ndim == 3 or len(ndims) == 1 else "image_2d"] = {
            "type": "image",
            "format": _FORMAT_OF_UNIT.get(prep["unit"], "magnitude"),
            "modality": "CR" if modality == "CXR" else modality,
            "num_channels": 1,
            "spatial_shape": grid,
            "dtype": "float32",
            "value_range": [0, 1],
            "is_patch_data": False,
            "channel_def": {
                "0": f"{modality} image after the {prep['preset']} intensity preset ({prep['unit']})"
            },
            "description": (
                f"{ndim}D {'volume (NIfTI, DICOM series, MetaImage/NRRD)' if ndim == 3 else 'image (PNG, JPEG, DICOM)'} "
                f"as stored; the bundle orients it to display orientation, applies the modality preset and fits it to "
                f"the model grid {grid} (axes {axes}) before the model sees it."
            ),
        }
    return inputs


def _box_tensor(ndims: Sequence[int], what: str, unit: str) -> dict[str, Any]:
    sizes = sorted(2 * n for n in ndims)
    return {
        "type": "tuples",
        "format": "box_xyxy" if sizes == [4] else "box_xyzxyz" if sizes == [6] else "box_xyxy_or_xyzxyz",
        "modality": "n/a",
        "num_channels": 1,
        "spatial_shape": [1, sizes[-1]] if len(sizes) == 1 else [1, "2*ndim"],
        "dtype": "float64",
        "value_range": [],
        "is_patch_data": False,
        "channel_def": {"0": f"{what} ({unit}); null when the completion holds no usable box"},
    }


def _metadata(
    grounder: Grounder,
    *,
    name: str,
    version: str,
    ndims: Sequence[int],
    authors: str,
    copyright: str,
    description: str | None,
    intended_use: str | None,
    data_source: str | None,
    eval_metrics: Mapping[str, float],
    changelog: Mapping[str, str] | None,
    source: str,
) -> dict[str, Any]:
    policy = grounder.policy
    params = int(sum(p.numel() for p in policy.model.parameters()))
    # MONAI ≥1.6 reads the spec's old ``optional_packages_version`` as ``required_packages_version`` (and would
    # overwrite it), so every package the bundle uses is listed here: the CLI needs fire, verify jsonschema.
    packages = (
        "mg3d",
        "transformers",
        "safetensors",
        "nibabel",
        "pillow",
        "pydicom",
        "SimpleITK",
        "jsonschema",
        "fire",
    )
    required = {p: _version(p) for p in packages}
    grids = {
        f"{n}d": (
            list(grounder.pipeline_config(None, n).spatial_size)
            if grounder.pipeline_config(None, n).spatial_size
            else None
        )
        for n in ndims
    }
    return {
        "schema": SCHEMA_ID,
        "name": name,
        "version": version,
        "changelog": dict(changelog or {version: f"exported by mg3d {mg3d.__version__} from {source}"}),
        "monai_version": _version("monai") or "unknown",
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {k: v for k, v in required.items() if v},
        "task": "Referring-phrase grounding: a box around the region that a free-text phrase describes, "
        "in a 3D volume or a 2D radiograph",
        "description": description
        or (
            f"A {policy.family} vision-language policy ({params:,} parameters) trained with mg3d (supervised warm "
            "start and GRPO with spatial rewards). Given an image and a referring phrase it writes a box in its text "
            "frame, which the bundle maps back to the stored image's voxel frame and to millimetres."
        ),
        "authors": authors,
        "copyright": copyright,
        "intended_use": intended_use
        or "Research on medical image grounding only. Not a medical device; not for diagnosis or treatment.",
        "data_source": data_source or "See docs/README.md: the data the exporting run was trained on.",
        "data_type": "nifti, dicom, png, jpeg, mhd, nrrd",
        "references": [
            "MedGround-R1: Advancing Medical Image Grounding via Spatial-Semantic Rewarded Group Relative Policy "
            "Optimization (MICCAI 2025)",
        ],
        "network_data_format": {
            "inputs": {
                **_image_inputs(grounder, ndims),
                "text": {
                    "type": "series",
                    "format": "sequence",
                    "modality": "n/a",
                    "num_channels": 1,
                    "spatial_shape": ["*"],
                    "dtype": "str",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": {"0": "referring phrase (UTF-8 text)"},
                },
            },
            "outputs": {
                "box_voxel": _box_tensor(ndims, "box in the voxel frame of the input image", "voxels"),
                "box_world_mm": _box_tensor(ndims, "the same box in world coordinates", "RAS millimetres"),
                "completion": {
                    "type": "series",
                    "format": "sequence",
                    "modality": "n/a",
                    "num_channels": 1,
                    "spatial_shape": ["*"],
                    "dtype": "str",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": {"0": "the model's raw completion (greedy decoding)"},
                },
            },
        },
        "eval_metrics": {k: float(v) for k, v in eval_metrics.items()},
        "mg3d": {
            "bundle_format": BUNDLE_FORMAT,
            "model_family": policy.family,
            "codec": policy.codec_name,
            "ndims": sorted(ndims),
            "box_convention": _BOX_CONVENTION,
            "prompt": grounder.inference_settings()["prompt"],
            "model_grid": grids,
            "preprocessing": {f"{n}d": _preprocessing(grounder, n) for n in ndims},
            "num_parameters": params,
            "source": source,
            "files": {},
        },
    }


def _inference_config(batch_size: int) -> dict[str, Any]:
    """The MONAI config: override ``dataset_dir`` + ``pairs`` (CSV/JSONL) or ``image`` + ``phrase``."""
    return {
        "bundle_root": ".",
        "device": "cpu",
        "dataset_dir": None,
        "pairs": None,
        "image": None,
        "phrase": None,
        "modality": None,
        "allow_mismatch": False,
        "overlays": False,
        "batch_size": batch_size,
        "output_dir": "$@bundle_root + '/eval'",
        "inference": {
            # The public path (re-exported by mg3d/bundle/__init__.py), not the defining module's: every bundle
            # ever exported names it, so it must keep resolving wherever the class lives.
            "_target_": "mg3d.bundle.BundleInference",
            "bundle_root": "@bundle_root",
            "dataset_dir": "@dataset_dir",
            "pairs": "@pairs",
            "image": "@image",
            "phrase": "@phrase",
            "modality": "@modality",
            "output_dir": "@output_dir",
            "device": "@device",
            "batch_size": "@batch_size",
            "allow_mismatch": "@allow_mismatch",
            "overlays": "@overlays",
            "exit_on_error": True,
        },
        "run": ["$@inference.run()"],
    }


def _readme(grounder: Grounder, meta: Mapping[str, Any]) -> str:
    m = meta["mg3d"]
    metrics = meta["eval_metrics"]
    metric_lines = (
        "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()))
        if metrics
        else "| (none recorded by the exporting run) | – |"
    )
    prompt = m["prompt"]
    grids = ", ".join(
        f"{k.upper()} {v if v is not None else 'as stored'}" for k, v in sorted(m["model_grid"].items())
    )
    trained = {
        f"{n}D": ", ".join(prep["modalities"])
        for n, prep in ((int(k[0]), v) for k, v in m["preprocessing"].items())
    }
    return _template(_README_TEMPLATE).format(
        modalities="; ".join(f"{k} {v}" for k, v in sorted(trained.items())),
        name=meta["name"],
        version=meta["version"],
        description=meta["description"],
        image_kinds=", ".join(f"{n}D" for n in m["ndims"]),
        grids=grids,
        box_convention=m["box_convention"],
        schema_sha256=schema_sha256(),
        model_family=m["model_family"],
        num_parameters=m["num_parameters"],
        codec=m["codec"],
        template=prompt["template"],
        volume_strategy=prompt["volume_strategy"],
        max_vision_tokens=prompt["max_vision_tokens"] or DEFAULT_MAX_VISION_TOKENS,  # None: volumes get this
        parse_mode=prompt["parse_mode"],
        source=m["source"],
        mg3d_version=meta["required_packages_version"].get("mg3d", "?"),
        max_new_tokens=grounder.max_new_tokens,
        metric_lines=metric_lines,
    )


# ---------------------------------------------------------------------------------------------- export


def _as_grounder(source: Grounder | str | os.PathLike[str]) -> tuple[Grounder, str]:
    if isinstance(source, Grounder):
        return source, "a Grounder object"
    path = Path(source).expanduser()
    if path.is_file():
        return Grounder.from_checkpoint(path), f"Lightning checkpoint {path.name}"
    if path.is_dir():
        return Grounder.from_pretrained(path), f"model folder {path.name}"
    raise BundleError(f"{path}: neither a Lightning checkpoint file nor a save_pretrained model folder")


def export_bundle(
    source: Grounder | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    zip: bool = False,
    *,
    name: str | None = None,
    version: str = "0.1.0",
    ndims: Sequence[int] | None = None,
    authors: str = "mg3d developers",
    copyright: str = "the authors of this model",
    description: str | None = None,
    intended_use: str | None = None,
    data_source: str | None = None,
    eval_metrics: Mapping[str, float] | None = None,
    changelog: Mapping[str, str] | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
) -> Path:
    """Write a MONAI bundle for a grounder (or a checkpoint / model folder); return its folder (or zip).

    ``ndims`` are the image kinds the bundle documents (default: those the grounder has pipelines for, else
    both). ``eval_metrics`` default to the held-out results a ``GRPOModule`` checkpoint recorded. With
    ``zip`` the folder is also packed as ``<out_dir>.zip`` (MONAI's ``ModelName.zip``) and that path returned.
    ``batch_size`` is the default of ``configs/inference.json`` (``scripts/evaluate.py`` uses 8).
    """
    grounder, origin = _as_grounder(source)
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise BundleError(f"{out}: exists and is not empty; choose a new folder or pass overwrite=True")
        if not (out / "configs" / "metadata.json").is_file():
            raise BundleError(
                f"{out}: refusing to overwrite a folder that is not a bundle (no configs/metadata.json)"
            )
        shutil.rmtree(out)
    if ndims is None:
        have = sorted({int(k[0]) for k in grounder.pipelines if k in ("2d", "3d")})
        ndims = have or [2, 3]
    ndims = sorted({int(n) for n in ndims})
    if not ndims or set(ndims) - {2, 3}:
        raise ConfigError(f"ndims must be a non-empty subset of [2, 3], got {ndims}")
    metrics = (
        dict(eval_metrics)
        if eval_metrics is not None
        else _flat_metrics(grounder.checkpoint_info.get("eval_results"))
    )
    meta = _metadata(
        grounder,
        name=name or out.name,
        version=version,
        ndims=ndims,
        authors=authors,
        copyright=copyright,
        description=description,
        intended_use=intended_use,
        data_source=data_source,
        eval_metrics=metrics,
        changelog=changelog,
        source=origin,
    )
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "docs").mkdir(parents=True, exist_ok=True)
    grounder.save_pretrained(out / "models")
    for rel in _files_of(out / "models"):
        why = _looks_pickled(out / "models" / rel)
        if why:
            raise BundleError(
                f"{out}: save_pretrained wrote models/{rel}, which is not allowed in a bundle: {why}"
            )
    (out / "configs" / "inference.json").write_text(
        json.dumps(_inference_config(batch_size), indent=2) + "\n"
    )
    (out / "docs" / "README.md").write_text(_readme(grounder, meta), encoding="utf-8")
    (out / "LICENSE").write_text(_template(_LICENSE_TEMPLATE).format(copyright=copyright), encoding="utf-8")
    meta["mg3d"]["files"] = {rel: _sha256(out / rel) for rel in _hashed_files(out)}
    errors = _metadata_errors(meta)
    if errors:  # an exporter bug, not a user error: say what the schema refused
        raise BundleError(f"{out}: the metadata mg3d wrote does not follow its own schema: {errors[:5]}")
    (out / "configs" / "metadata.json").write_text(
        json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    if not zip:
        return out
    archive = out.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        for rel in _files_of(out):
            handle.write(out / rel, f"{out.name}/{rel}")
    return archive
