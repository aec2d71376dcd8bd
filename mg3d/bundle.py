"""MONAI bundle export of a grounding model, its checks, and the inference workflow the bundle runs.

Layout written by :func:`export_bundle` (MONAI bundle specification, research/data_formats.md §2.6)::

    <bundle>/configs/metadata.json    MONAI metadata + ``schema`` + an ``mg3d`` section (SHA-256 of every file)
    <bundle>/configs/inference.json   a MONAI config whose ``run`` instantiates :class:`BundleInference`
    <bundle>/models/                  model.safetensors, config.json, tokenizer, preprocessor_config.json,
                                      mg3d_inference.json (prompt, generation and pipeline settings) — no pickles
    <bundle>/docs/README.md, LICENSE

MONAI's own tools verify and run it (``verify_metadata`` against the schema shipped in
``mg3d/resources``, so no network is needed; ``run`` with the inputs as overrides). The spec's
``models/model.pt`` is deliberately absent: a ``.pt`` file is a pickle, and mg3d never asks users to unpickle
what they are handed (DESIGN.md §6). :func:`load_bundle` refuses a bundle with a pickle, a missing or changed
file, an unexpected file in ``models/``, or metadata of the wrong shape, each with a :class:`BundleError`
that says which.

Security note for users: MONAI evaluates ``_target_`` and ``$`` expressions of a config file, so run only
bundles whose ``configs/inference.json`` you trust; mg3d's loader itself executes nothing from the bundle.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mg3d
from mg3d.errors import BundleError, ConfigError, DataError
from mg3d.grounder import INFERENCE_CONFIG_NAME, Grounder, InferenceInput, Prediction

__all__ = [
    "BUNDLE_FORMAT",
    "SCHEMA_PATH",
    "BundleInference",
    "export_bundle",
    "load_bundle",
    "read_inputs",
    "schema_sha256",
    "verify_bundle",
]

#: The JSON schema ``configs/metadata.json`` follows (pass it to ``verify_metadata --filepath``).
SCHEMA_PATH = Path(__file__).resolve().parent / "resources" / "bundle_metadata_schema.json"
#: What the metadata's ``schema`` key holds: where the schema lives inside the mg3d package (no URL to fetch).
SCHEMA_ID = "mg3d/resources/bundle_metadata_schema.json"
BUNDLE_FORMAT = 1

_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".pyc")
_HASHED_DIRS = ("models", "configs", "docs")
_UNHASHED = ("configs/metadata.json",)
_REQUIRED = (
    "configs/metadata.json",
    "configs/inference.json",
    "docs/README.md",
    "LICENSE",
    "models/config.json",
    f"models/{INFERENCE_CONFIG_NAME}",
    "models/preprocessor_config.json",
)
_BOX_CONVENTION = (
    "box_voxel: half-open voxel-edge box [lo_0, lo_1, (lo_2), hi_0, hi_1, (hi_2)] in the axis order of the stored "
    "image as MONAI loads it (2D: axis 0 = column x, axis 1 = row y; 3D: the file's i, j, k), voxel i covering "
    "[i, i+1) — MONAI's xyxy / xyzxyz mode. box_world_mm: the hull of that box's corners mapped through the "
    "image affine (RAS millimetres, exact for axis-aligned affines); null for images without geometry."
)


# ---------------------------------------------------------------------------------------------- small helpers


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _looks_pickled(path: Path) -> str | None:
    """Why ``path`` is (or may be) a pickle, or ``None``: suffix, pickle opcode header, or a torch zip."""
    if path.name.lower().endswith(_PICKLE_SUFFIXES):
        return f"its suffix {path.suffix!r} is a pickle/torch format"
    with path.open("rb") as handle:
        head = handle.read(2)
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return f"it starts with a pickle protocol-{head[1]} header"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                if any(n.endswith(".pkl") for n in archive.namelist()):
                    return "it is a zip holding a .pkl (torch.save format)"
        except zipfile.BadZipFile:
            return None
    return None


def _files_of(root: Path) -> list[str]:
    """Bundle-relative POSIX paths of every regular file (symbolic links are refused: they escape the bundle)."""
    out = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise BundleError(
                f"{root}: {path.relative_to(root).as_posix()} is a symbolic link; bundles hold plain files"
            )
        if path.is_file():
            out.append(path.relative_to(root).as_posix())
    return out


def _hashed_files(root: Path) -> list[str]:
    return [
        rel
        for rel in _files_of(root)
        if (rel.split("/")[0] in _HASHED_DIRS or rel == "LICENSE") and rel not in _UNHASHED
    ]


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


def schema_sha256() -> str:
    """SHA-256 of the shipped schema, for ``verify_metadata --hash_val … --hash_type sha256``."""
    return _sha256(SCHEMA_PATH)


# ---------------------------------------------------------------------------------------------- metadata


def _image_inputs(grounder: Grounder, ndims: Sequence[int]) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    for ndim in ndims:
        config = grounder.pipeline_config(None, ndim)
        modality = config.preset or grounder.default_modality[ndim]
        grid = list(config.spatial_size) if config.spatial_size is not None else ["*"] * ndim
        axes = (
            "x (column), y (row)"
            if ndim == 2
            else "x (patient right→left), y (anterior→posterior), z (inferior→superior)"
        )
        inputs["image" if ndim == 3 or len(ndims) == 1 else "image_2d"] = {
            "type": "image",
            "format": "hounsfield" if modality == "CT" else "magnitude",
            "modality": "CR" if modality == "CXR" else modality,
            "num_channels": 1,
            "spatial_shape": grid,
            "dtype": "float32",
            "value_range": [0, 1],
            "is_patch_data": False,
            "channel_def": {"0": f"{modality} image after the {modality} intensity preset"},
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
        "batch_size": batch_size,
        "output_dir": "$@bundle_root + '/eval'",
        "inference": {
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
    return f"""# {meta["name"]} (version {meta["version"]})

{meta["description"]}

## What it does
Given an image — a 3D volume (NIfTI, DICOM series folder, MetaImage/NRRD) or a 2D radiograph (PNG, JPEG,
DICOM) — and a referring phrase ("the nodule in the left lower lobe"), the model answers with a box around the
region the phrase describes. Image kinds this model was exported for: {", ".join(f"{n}D" for n in m["ndims"])}.

## Inputs
- `image`: the stored image file. The bundle orients volumes to display orientation (LPS), applies the modality
  intensity preset (`modality` override; default CT for volumes, CXR for radiographs), fits the model grid
  ({grids}) and tokenizes it the way training did.
- `phrase`: free text.

Give either one image and one phrase, or a folder of images plus a CSV or JSONL of pairs with the columns
`image` (relative to `dataset_dir`), `phrase` (or `text`) and optionally `id`, `modality`, `dataset`.

## Outputs
One JSON file per input in `output_dir` (default `<bundle_root>/eval`), named by the input's id:
`box_voxel`, `box_world_mm`, `box_text`, `phrase`, `completion` (raw model output), `parse_status`, `image`,
`spatial_shape`, `affine`.

{m["box_convention"]}

## Commands
```bash
# check the metadata against the schema shipped in mg3d (no network; the hash pins the schema file)
python -m monai.bundle verify_metadata --meta_file configs/metadata.json \\
    --filepath "$(python -c 'import mg3d.bundle as b; print(b.SCHEMA_PATH)')" \\
    --hash_val {schema_sha256()} --hash_type sha256
# a folder of images and a CSV of (image, phrase) pairs
python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
    --bundle_root . --dataset_dir /data/images --pairs pairs.csv --output_dir out/
# one image and one phrase
python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
    --bundle_root . --image /data/ct.nii.gz --phrase "the left kidney" --output_dir out/
```
In Python: `mg3d.bundle.load_bundle("<bundle>").predict_image(path, phrase)`.

## How it was trained and evaluated
Model family {m["model_family"]}, {m["num_parameters"]:,} parameters, box codec `{m["codec"]}`, prompt template
`{prompt["template"]}`, volumes shown as `{prompt["volume_strategy"]}` with at most {prompt["max_vision_tokens"]}
vision tokens, `{prompt["parse_mode"]}` parsing. Exported from `{m["source"]}` with mg3d
{meta["required_packages_version"].get("mg3d", "?")}. Greedy decoding, at most {grounder.max_new_tokens} new tokens.

| metric (held-out, recorded by the training run) | value |
| --- | --- |
{metric_lines}

Boxes written by this bundle are identical to those of `scripts/evaluate.py` on the same inputs with the same batch
size: both call `mg3d.grounder.Grounder`, and neither shows the ground truth to the model.

## Limitations
- Research use only; not a medical device. Boxes can be wrong with full confidence.
- Trained on the data named in the metadata's `data_source`; other scanners, protocols, orientations or phrasing
  styles are out of distribution. The CPU demo model is trained on synthetic phantoms and is not meaningful on
  real images.
- "Left"/"right" in phrases mean the patient's side; volumes must carry a correct affine (orientation).
- One box per phrase: phrases naming several regions get one box.
- Weights trained on credentialed data sets (e.g. MS-CXR via PhysioNet) inherit those data use agreements.

## Files and safety
Weights are `models/model.safetensors` (no pickles; the MONAI spec's `models/model.pt` is deliberately absent).
`configs/metadata.json` lists the SHA-256 of every other file; `mg3d.bundle.load_bundle` refuses a bundle whose
files differ, are missing, or include a pickle. MONAI evaluates expressions in `configs/inference.json`: run only
bundles you trust.
"""


_LICENSE = """Copyright {copyright}

Licensed under the Apache License, Version 2.0 (the "License"); you may not use the files of this bundle except
in compliance with the License. You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software distributed under the License is distributed
on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for
the specific language governing permissions and limitations under the License.

Model weights trained on data sets with their own terms (for example data use agreements of credentialed data
sets) are subject to those terms as well; see docs/README.md.
"""


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


def _metadata_errors(meta: Any) -> list[str]:
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(meta), key=lambda e: list(e.absolute_path))
    return [
        f"{'/'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message[:200]}" for e in errors
    ]


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
    (out / "LICENSE").write_text(_LICENSE.format(copyright=copyright), encoding="utf-8")
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


# ---------------------------------------------------------------------------------------------- verify / load


def verify_bundle(bundle_dir: str | os.PathLike[str], *, verify_hashes: bool = True) -> dict[str, Any]:
    """Check a bundle folder and return its metadata; raise :class:`BundleError` saying what is wrong.

    Checks, in order: required files present; no pickle anywhere in the bundle; metadata parses and follows
    the shipped schema; every file the metadata lists exists (and, with ``verify_hashes``, has its SHA-256);
    no file in ``models/`` that the metadata does not list.
    """
    root = Path(bundle_dir).expanduser()
    if not root.is_dir():
        raise BundleError(f"{root}: bundle folder not found")
    present = set(_files_of(root))
    missing = [rel for rel in _REQUIRED if rel not in present]
    if missing:
        raise BundleError(f"{root}: incomplete bundle, missing {missing}")
    if not any(rel.startswith("models/") and rel.endswith(".safetensors") for rel in present):
        raise BundleError(f"{root}: incomplete bundle, no safetensors weights in models/")
    for rel in sorted(present):
        why = _looks_pickled(root / rel)
        if why:
            raise BundleError(
                f"{root}: refused — {rel} may be a pickle ({why}); mg3d bundles never hold pickles"
            )
    meta_path = root / "configs" / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{meta_path}: not valid JSON ({err})") from None
    errors = _metadata_errors(meta)
    if errors:
        raise BundleError(
            f"{meta_path}: metadata of the wrong shape ({len(errors)} problem(s)): {'; '.join(errors[:5])}"
        )
    if meta["mg3d"]["bundle_format"] > BUNDLE_FORMAT:
        raise BundleError(
            f"{meta_path}: bundle format {meta['mg3d']['bundle_format']} is newer than this mg3d reads ({BUNDLE_FORMAT})"
        )
    listed: dict[str, str] = meta["mg3d"]["files"]
    for rel in _REQUIRED:
        if rel not in _UNHASHED and rel not in listed:
            raise BundleError(f"{meta_path}: mg3d.files does not list the required file {rel}")
    for rel, digest in sorted(listed.items()):
        path = root / rel
        if ".." in Path(rel).parts or not path.is_file():
            raise BundleError(f"{root}: {rel} is listed in the metadata but missing from the bundle")
        if verify_hashes and _sha256(path) != digest:
            raise BundleError(
                f"{root}: {rel} differs from the file the bundle was exported with (SHA-256 mismatch)"
            )
    extra = sorted(rel for rel in present if rel.startswith("models/") and rel not in listed)
    if extra:
        raise BundleError(f"{root}: unexpected file(s) in models/ that the metadata does not list: {extra}")
    return meta


def _safe_extract(archive: Path, dest: Path) -> Path:
    """Extract a bundle zip (refusing absolute paths and ``..``); return the folder holding configs/."""
    try:
        with zipfile.ZipFile(archive) as handle:
            for member in handle.infolist():
                parts = Path(member.filename).parts
                if member.filename.startswith(("/", "\\")) or ".." in parts:
                    raise BundleError(
                        f"{archive}: refused — member {member.filename!r} would land outside the bundle"
                    )
            handle.extractall(dest)
    except zipfile.BadZipFile as err:
        raise BundleError(f"{archive}: not a readable zip ({err})") from None
    candidates = [p.parent.parent for p in dest.rglob("configs/metadata.json")]
    if len(candidates) != 1:
        raise BundleError(
            f"{archive}: expected one bundle (configs/metadata.json) inside, found {len(candidates)}"
        )
    return candidates[0]


def load_bundle(
    bundle: str | os.PathLike[str], *, device: str = "cpu", verify_hashes: bool = True
) -> Grounder:
    """A :class:`Grounder` from a bundle folder or zip, after :func:`verify_bundle` has accepted it."""
    path = Path(bundle).expanduser()
    if path.is_file() and zipfile.is_zipfile(path):
        with tempfile.TemporaryDirectory(prefix="mg3d_bundle_") as tmp:
            root = _safe_extract(path, Path(tmp))
            return load_bundle(root, device=device, verify_hashes=verify_hashes)
    meta = verify_bundle(path, verify_hashes=verify_hashes)
    try:
        grounder = Grounder.from_pretrained(path / "models", device=device)
    except (ConfigError, OSError, ValueError) as err:
        raise BundleError(f"{path}: the model in models/ does not load: {err}") from err
    if grounder.codec != meta["mg3d"]["codec"]:
        raise BundleError(
            f"{path}: metadata says codec {meta['mg3d']['codec']!r}, models/{INFERENCE_CONFIG_NAME} {grounder.codec!r}"
        )
    grounder.bundle_metadata = meta
    return grounder


# ---------------------------------------------------------------------------------------------- inputs


def _resolve(value: str, base: Path | None) -> str:
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return str(path)


def _row_input(row: Mapping[str, Any], where: str, base: Path | None) -> InferenceInput:
    image = row.get("image")
    phrase = row.get("phrase", row.get("text"))
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"{where}: needs an 'image' path, got {image!r}")
    if not isinstance(phrase, str) or not phrase.strip():
        raise DataError(f"{where}: needs a non-empty 'phrase' (or 'text'), got {phrase!r}")
    extras = {}
    for key in ("id", "modality", "dataset"):
        value = row.get(key)
        if value not in (None, ""):
            if not isinstance(value, str):
                raise DataError(f"{where}: '{key}' must be a string, got {value!r}")
            extras[key] = value
    return InferenceInput(_resolve(image.strip(), base), phrase, **extras)


def read_inputs(
    pairs: str | os.PathLike[str], dataset_dir: str | os.PathLike[str] | None = None
) -> list[InferenceInput]:
    """(image, phrase) pairs from a CSV (header row) or JSONL file; relative images resolve against ``dataset_dir``.

    Columns/keys: ``image``, ``phrase`` (or ``text``, so an mg3d manifest works), optional ``id``, ``modality``,
    ``dataset``; others are ignored. Errors name the file and line.
    """
    path = Path(pairs).expanduser()
    base = Path(dataset_dir).expanduser() if dataset_dir not in (None, "") else path.parent
    if not path.is_file() and not path.is_absolute() and dataset_dir not in (None, ""):
        path = base / path
    if not path.is_file():
        raise DataError(f"{path}: pairs file not found")
    out: list[InferenceInput] = []
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(row, Mapping):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                out.append(_row_input(row, f"{path}:{lineno}", base))
    elif path.suffix.lower() in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            columns = set(reader.fieldnames or [])
            if "image" not in columns or not columns & {"phrase", "text"}:
                raise DataError(
                    f"{path}: needs the columns 'image' and 'phrase' (or 'text'); found {sorted(columns)}"
                )
            for lineno, row in enumerate(reader, start=2):
                if None in row:
                    raise DataError(f"{path}:{lineno}: more fields than the header has")
                out.append(_row_input(row, f"{path}:{lineno}", base))
    else:
        raise DataError(f"{path}: pairs must be a .csv, .tsv or .jsonl file")
    if not out:
        raise DataError(f"{path}: holds no (image, phrase) pair")
    return out


_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def _output_name(rid: str) -> str:
    name = _UNSAFE_NAME.sub("_", rid).strip("._") or "input"
    return name[:150] + ".json"


# ---------------------------------------------------------------------------------------------- the workflow


class BundleInference:
    """What ``configs/inference.json`` runs: load the bundle, predict every input, write one JSON per input.

    Args:
        bundle_root: the bundle folder.
        dataset_dir: base folder of relative image paths (and of ``pairs`` when that is relative).
        pairs: CSV/JSONL of (image, phrase) pairs; default ``pairs.csv`` / ``pairs.jsonl`` in ``dataset_dir``.
        image, phrase: one input instead of a pairs file.
        modality: modality preset for inputs that do not name one (e.g. ``CT``, ``MR``, ``CXR``).
        output_dir: where the JSON files go (created).
        device: ``cpu`` or ``cuda``.
        batch_size: generation batch size.
        verify_hashes: check every bundle file's SHA-256 before loading.
    """

    def __init__(
        self,
        bundle_root: str,
        dataset_dir: str | None = None,
        pairs: str | None = None,
        image: str | None = None,
        phrase: str | None = None,
        modality: str | None = None,
        output_dir: str | None = None,
        device: str = "cpu",
        batch_size: int = 8,
        verify_hashes: bool = True,
    ) -> None:
        self.bundle_root = Path(str(bundle_root)).expanduser()
        self.dataset_dir = None if dataset_dir in (None, "") else Path(str(dataset_dir)).expanduser()
        self.pairs = None if pairs in (None, "") else str(pairs)
        self.image = None if image in (None, "") else str(image)
        self.phrase = None if phrase in (None, "") else str(phrase)  # fire may hand over a number
        self.modality = None if modality in (None, "") else str(modality)
        self.output_dir = Path(str(output_dir)).expanduser() if output_dir else self.bundle_root / "eval"
        self.device = str(device)
        self.batch_size = int(batch_size)
        self.verify_hashes = bool(verify_hashes)

    def inputs(self) -> list[InferenceInput]:
        """The inputs: one image + phrase, or the rows of the pairs file."""
        if (self.image is None) != (self.phrase is None):
            raise ConfigError("give both 'image' and 'phrase' (one input), or neither and a pairs file")
        if self.image is not None:
            if self.pairs is not None:
                raise ConfigError("give either 'image' + 'phrase' or 'pairs', not both")
            image = _resolve(self.image, self.dataset_dir)
            rows = [InferenceInput(image, str(self.phrase))]
        else:
            pairs = self.pairs
            if pairs is None:
                if self.dataset_dir is None:
                    raise ConfigError("no inputs: set 'image' + 'phrase', or 'dataset_dir' (+ 'pairs')")
                found = [n for n in ("pairs.csv", "pairs.jsonl") if (self.dataset_dir / n).is_file()]
                if len(found) != 1:
                    raise ConfigError(
                        f"{self.dataset_dir}: name the pairs file with 'pairs' (found {found or 'no pairs.csv/pairs.jsonl'})"
                    )
                pairs = found[0]
            rows = read_inputs(pairs, self.dataset_dir)
        if self.modality is not None:
            rows = [
                r if r.modality else InferenceInput(r.image, r.phrase, r.id, self.modality, r.dataset)
                for r in rows
            ]
        return rows

    def run(self) -> list[Path]:
        """Predict every input and write ``<output_dir>/<id>.json``; return the files written."""
        inputs = self.inputs()
        grounder = load_bundle(self.bundle_root, device=self.device, verify_hashes=self.verify_hashes)
        meta = grounder.bundle_metadata
        self.output_dir.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        seen: dict[str, str] = {}
        for pred in grounder.predict_inputs(inputs, batch_size=self.batch_size):
            name = _output_name(pred.id)
            if name in seen:
                raise DataError(
                    f"inputs {seen[name]!r} and {pred.id!r} would both write {name}; give unique ids"
                )
            seen[name] = pred.id
            written.append(self._write(pred, name, meta))
        return written

    def _write(self, pred: Prediction, name: str, meta: Mapping[str, Any]) -> Path:
        row = pred.to_dict()
        row.pop("gt_boxes")
        row["model"] = {"name": meta.get("name"), "version": meta.get("version")}
        path = self.output_dir / name
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(
            json.dumps(row, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8"
        )
        os.replace(tmp, path)
        return path
