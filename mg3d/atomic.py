"""Files that are either complete or absent: one atomic, durable write for every writer in mg3d.

Manifests, summaries, predictions, metrics, bundle outputs and checkpoints are all written the same way: to a
hidden temporary file *beside* the target (so the final rename never crosses file systems), fsynced, renamed
over the target with ``os.replace`` (atomic on POSIX and Windows within one file system), and the folder
fsynced so the rename itself survives a crash. A reader sees the old file or the new one, never a prefix.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_text", "temporary_path"]

_TMP_SUFFIX = ".tmp"
_HOST = re.sub(r"[^A-Za-z0-9_-]+", "_", socket.gethostname()) or "host"


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


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically and durably (manifests, predictions, metrics, bundle files)."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(data))
