"""Checkpoint files that are either complete or absent, and that are read without unpickling code.

Why not Lightning's own ``TorchCheckpointIO``: its "atomic" save writes through an fsspec transaction whose
temporary file lives in the system temp folder, so the final move is a copy when that folder is on another
file system (the usual case on clusters: /tmp is local, checkpoints are on shared storage), and nothing is
fsynced — a job killed or a node lost mid-copy leaves a truncated ``last.ckpt`` that the next resume loads.

:class:`AtomicCheckpointIO` writes each checkpoint to a temporary file *in the destination folder*, fsyncs it,
renames it over the target with ``os.replace`` (atomic on POSIX and Windows within one file system) and fsyncs
the folder, so a reader sees the old file or the new one, never a prefix. A process killed mid-write leaves only
a hidden ``.<name>.<host>-<pid>-<thread>.tmp`` file: Lightning's ``ckpt_path="last"`` never matches it (it looks for
``last*.ckpt``), and the next successful save in that folder removes temporaries of dead processes of this host.

Loading goes through :func:`load_checkpoint_safely` (``torch.load(weights_only=True)`` after
listing the globals a file references), whatever ``weights_only`` Lightning passes: mg3d never unpickles a
file it is handed (DESIGN.md §6), and a crafted or truncated file is refused with an error naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO

from mg3d.atomic import _HOST, atomic_write, atomic_write_text, temporary_path
from mg3d.errors import ConfigError

__all__ = [
    "MOVED_CLASSES",
    "AtomicCheckpointIO",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_text",
    "load_checkpoint_safely",
    "moved_class_aliases",
    "remove_stale_temporaries",
    "with_atomic_checkpoint_io",
]

log = logging.getLogger(__name__)

# ".<final name>.<host>-<pid>-<thread>.tmp": unique per writer, also for threads (Lightning's AsyncCheckpointIO)
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+?)-(?P<pid>\d+)-(?P<tid>\d+)\.tmp$")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` that leaves either the complete new file or the previous one."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def _is_remote(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete temporaries left in ``folder`` by processes of this host that no longer run; return them.

    Temporaries of other hosts (shared storage) or of live processes are left alone: they may be writing.
    """
    removed: list[Path] = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        match = _TMP_RE.match(entry.name)
        if not match or match["host"] != _HOST:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            removed.append(entry)
            log.info("removed %s, an incomplete checkpoint of a process that was stopped mid-write", entry)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: atomic, durable local saves; weights-only loads (see the module docstring).

    Remote paths (``s3://`` …) keep Lightning's fsspec behaviour for saving: object stores publish an upload
    only when it completes, which is the atomicity that matters there.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if _is_remote(path):
            super().save_checkpoint(checkpoint, path)
            return
        target = atomic_torch_save(checkpoint, path)
        remove_stale_temporaries(target.parent)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            log.warning(
                "%s: a full (unsafe) unpickling was requested; mg3d loads checkpoints weights-only", path
            )
        if _is_remote(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_checkpoint_safely(path)

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        if not _is_remote(path):
            with contextlib.suppress(FileNotFoundError):
                temporary_path(Path(path)).unlink()


def with_atomic_checkpoint_io(plugins: Any, strategy: Any = None) -> list[Any] | Any:
    """``plugins`` plus an :class:`AtomicCheckpointIO`, unless a ``CheckpointIO`` is already chosen.

    Left out when the plugins or a strategy object already bring one (Lightning refuses two), and for TPU
    strategies, whose XLA checkpoint IO must do the writing.
    """
    if plugins is None:
        items: list[Any] = []
    elif isinstance(plugins, Sequence) and not isinstance(plugins, str):
        items = list(plugins)
    else:
        items = [plugins]
    if any(isinstance(p, CheckpointIO) for p in items):
        return plugins
    if getattr(strategy, "_checkpoint_io", None) is not None:
        return plugins
    name = strategy if isinstance(strategy, str) else type(strategy).__name__ if strategy is not None else ""
    if "xla" in name.lower():
        return plugins
    return [*items, AtomicCheckpointIO()]


# ---------------------------------------------------------------------------------------------- safe loading

# Weight files that are pickles (torch.save / legacy formats), named in refusals.
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


#: Configuration classes that moved since checkpoints were first written: old ``module.Qualname`` → new.
#: A checkpoint pickles its hyper-parameters' classes by path, so a moved class keeps loading only through
#: this table (resolved here, not by alias modules left behind at the old paths).
MOVED_CLASSES: dict[str, str] = {
    "mg3d.grpo.config.PolicyConfig": "mg3d.model.PolicyConfig",
    "mg3d.grpo.config.PromptConfig": "mg3d.grounding.PromptConfig",
    "mg3d.grpo.rollout.RolloutConfig": "mg3d.generation.config.RolloutConfig",
    "mg3d.data.transforms.PipelineConfig": "mg3d.data.transforms.config.PipelineConfig",
    "mg3d.data.transforms.AugmentConfig": "mg3d.data.transforms.config.AugmentConfig",
}


def moved_class_aliases() -> list[tuple[type, str]]:
    """``(class, old path)`` for every moved class, for ``torch.serialization.add_safe_globals`` (Lightning's
    own weights-only loads of older checkpoints)."""
    out = []
    for old in MOVED_CLASSES:
        cls = _config_dataclass(old)
        if cls is not None:
            out.append((cls, old))
    return out


def _config_dataclass(name: str) -> type | None:
    """The class named ``module.Qualname`` when it is one of mg3d's plain configuration dataclasses."""
    module_name, _, qualname = MOVED_CLASSES.get(name, name).rpartition(".")
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


def unpickler_reason(err: BaseException) -> str:
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
    allowed: list[type | tuple[type, str]] = []
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
                allowed.append((cls, name))  # the class under the path the file names (it may have moved)
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
            f"{p}: refused by the safe (weights-only) loader ({unpickler_reason(err)}). mg3d never unpickles "
            "arbitrary objects; export the model with save_pretrained (safetensors) instead."
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise ConfigError(f"{p}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"{p}: expected a Lightning checkpoint (a dict), got {type(checkpoint).__name__}")
    return checkpoint
