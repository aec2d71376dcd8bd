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

Loading goes through :func:`mg3d.grounder.load_checkpoint_safely` (``torch.load(weights_only=True)`` after
listing the globals a file references), whatever ``weights_only`` Lightning passes: mg3d never unpickles a
file it is handed (DESIGN.md §6), and a crafted or truncated file is refused with an error naming it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "atomic_torch_save", "remove_stale_temporaries", "with_atomic_checkpoint_io"]

log = logging.getLogger(__name__)

_TMP_SUFFIX = ".tmp"
_HOST = re.sub(r"[^A-Za-z0-9_-]+", "_", socket.gethostname()) or "host"
# ".<final name>.<host>-<pid>-<thread>.tmp": unique per writer, also for threads (Lightning's AsyncCheckpointIO)
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+?)-(?P<pid>\d+)-(?P<tid>\d+)\.tmp$")


def _is_remote(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path)


def temporary_path(path: Path, pid: int | None = None, host: str = _HOST) -> Path:
    """Where ``path`` is written before the rename: a hidden file beside it, unique per host, process, thread."""
    pid = os.getpid() if pid is None else pid
    return path.with_name(f".{path.name}.{host}-{pid}-{threading.get_ident()}{_TMP_SUFFIX}")


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); folders cannot be opened for fsync on Windows."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Any], None]) -> Path:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, fsync it and rename it over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)
    return target


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` that leaves either the complete new file or the previous one."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


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
        from mg3d.grounder import load_checkpoint_safely

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
