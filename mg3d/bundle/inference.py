"""What a bundle runs: (image, phrase) inputs from a pairs file or one pair, predictions, one JSON per input.

``configs/inference.json`` instantiates :class:`BundleInference` (by the path ``mg3d.bundle.BundleInference``),
which loads the bundle through :func:`mg3d.bundle.verify.load_bundle` and writes what the Grounder predicts.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mg3d.atomic import atomic_write_text
from mg3d.bundle.verify import load_bundle
from mg3d.data.jsonl import iter_jsonl_objects
from mg3d.errors import ConfigError, DataError, Mg3dError
from mg3d.grounder import InferenceInput, Prediction

__all__ = ["BundleInference", "read_inputs"]

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
        for lineno, row in iter_jsonl_objects(path):
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


def _flag(value: Any, name: str) -> bool:
    """A boolean from Python or from MONAI's command line (``--overlays true`` arrives as a string or a bool)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", "none", ""):
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


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
        allow_mismatch: run inputs whose modality or ndim the model was not trained on (each logged); by
            default they are refused with a one-line reason.
        overlays: also write ``<id>.png``, the predicted box on the input image (3D: display orientation).
        exit_on_error: a bad input or setting ends the process with a one-line ``error: …`` on stderr and exit
            code 2 (what ``configs/inference.json`` sets for ``python -m monai.bundle run``), instead of raising.
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
        allow_mismatch: bool = False,
        overlays: bool = False,
        exit_on_error: bool = False,
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
        self.allow_mismatch = _flag(allow_mismatch, "allow_mismatch")
        self.overlays = _flag(overlays, "overlays")
        self.exit_on_error = _flag(exit_on_error, "exit_on_error")

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
        try:
            return self._run()
        except Mg3dError as err:
            if not self.exit_on_error:
                raise
            # SystemExit passes through MONAI's expression evaluation (it wraps Exceptions in a traceback)
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    def _run(self) -> list[Path]:
        inputs = self.inputs()
        grounder = load_bundle(self.bundle_root, device=self.device, verify_hashes=self.verify_hashes)
        grounder.allow_mismatch = self.allow_mismatch
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
            if self.overlays:
                from mg3d.viz import overlay_prediction

                written.append(
                    overlay_prediction(pred, self.output_dir / (name[: -len(".json")] + ".png")).path
                )
        return written

    def _write(self, pred: Prediction, name: str, meta: Mapping[str, Any]) -> Path:
        row = pred.to_dict()
        row.pop("gt_boxes")
        row["model"] = {"name": meta.get("name"), "version": meta.get("version")}
        path = self.output_dir / name
        atomic_write_text(path, json.dumps(row, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
        return path
