"""The bundle format and the checks that guard loading it: required files, hashes, no pickles, the schema.

:func:`verify_bundle` checks a folder against what :mod:`mg3d.bundle.export` writes; :func:`load_bundle` builds a
:class:`~mg3d.grounder.Grounder` only from a bundle it accepted (folder or zip). Nothing from the bundle runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from mg3d.errors import BundleError, ConfigError
from mg3d.grounder import INFERENCE_CONFIG_NAME, Grounder

__all__ = [
    "BUNDLE_FORMAT",
    "SCHEMA_ID",
    "SCHEMA_PATH",
    "load_bundle",
    "schema_sha256",
    "verify_bundle",
]

#: The JSON schema ``configs/metadata.json`` follows (pass it to ``verify_metadata --filepath``).
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "resources" / "bundle_metadata_schema.json"
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def schema_sha256() -> str:
    """SHA-256 of the shipped schema, for ``verify_metadata --hash_val … --hash_type sha256``."""
    return _sha256(SCHEMA_PATH)


def _metadata_errors(meta: Any) -> list[str]:
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(meta), key=lambda e: list(e.absolute_path))
    return [
        f"{'/'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message[:200]}" for e in errors
    ]


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
