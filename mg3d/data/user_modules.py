"""User code that extends mg3d (modality presets, rewards, adapters), imported by name or file path.

Every entry point honours the same list: ``scripts/train.py`` (``--imports`` / ``imports:`` in the config),
``scripts/evaluate.py`` and ``scripts/export_bundle.py`` (``--imports``), and a Grounder or bundle loaded from
a checkpoint (the list is saved in it, see :func:`imported_user_modules`). Why one module: a preset registered
by code the process never imported is an ``unknown modality`` far from the cause; recording what was imported
here is what lets a checkpoint name the code it needs.

A spec is either a dotted module name (found on ``sys.path``, the current folder included) or the path of a
``.py`` file (imported under its file stem). Importing the same name twice is a no-op.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from mg3d.errors import ConfigError

__all__ = [
    "UserModule",
    "import_user_module",
    "import_user_modules",
    "imported_user_modules",
    "user_modules_from",
]

_IMPORTED: dict[str, UserModule] = {}


@dataclass(frozen=True)
class UserModule:
    """One imported user module: its module ``name`` and, for a single-file module, its source ``file``
    (absolute), which exports copy so that a bundle carries the code it needs."""

    name: str
    file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file}


def _is_file_spec(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or "/" in spec


def _import_file(path: Path, name: str | None) -> tuple[ModuleType, str]:
    if not path.is_file():
        raise ConfigError(f"user module {str(path)!r}: file not found")
    module_name = name or path.stem
    if not module_name.isidentifier():
        raise ConfigError(f"user module {str(path)!r}: the file name must be a Python identifier + '.py'")
    if module_name in sys.modules:
        return sys.modules[module_name], module_name
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"user module {str(path)!r}: cannot be imported as Python source")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    # no __pycache__ beside the file: a bundle's copy lives in its hashed models/ folder
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise ConfigError(f"user module {str(path)!r} failed on import: {type(err).__name__}: {err}") from err
    finally:
        sys.dont_write_bytecode = writes_bytecode
    return module, module_name


def import_user_module(spec: str | os.PathLike[str], *, name: str | None = None) -> UserModule:
    """Import one user module (a dotted name or a ``.py`` path) and remember it; errors name the spec."""
    text = str(spec).strip()
    if not text:
        raise ConfigError("user module: empty name")
    if name is not None and name in _IMPORTED:
        return _IMPORTED[name]
    if isinstance(spec, os.PathLike) or _is_file_spec(text):
        module, module_name = _import_file(Path(text).expanduser().resolve(), name)
    else:
        module_name = text
        if module_name in _IMPORTED:
            return _IMPORTED[module_name]
        if str(Path.cwd()) not in sys.path and "" not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ConfigError(
                f"user module {module_name!r} cannot be imported ({err}); give a module on the Python path or "
                "the path of a .py file"
            ) from err
        except Exception as err:
            raise ConfigError(
                f"user module {module_name!r} failed on import: {type(err).__name__}: {err}"
            ) from err
    source = getattr(module, "__file__", None)
    single_file = source is not None and Path(source).name != "__init__.py" and source.endswith(".py")
    info = UserModule(module_name, str(Path(source).resolve()) if single_file else None)
    _IMPORTED.setdefault(module_name, info)
    return _IMPORTED[module_name]


def import_user_modules(specs: Iterable[str | os.PathLike[str]] | None) -> list[UserModule]:
    """Import each spec in order (see :func:`import_user_module`)."""
    return [import_user_module(s) for s in specs or ()]


def imported_user_modules() -> list[UserModule]:
    """Every user module imported so far in this process, in import order."""
    return list(_IMPORTED.values())


def user_modules_from(saved: Any, where: str, base: Path | None = None) -> list[UserModule]:
    """Import the user modules listed in a checkpoint or settings file (``[{"name", "file"}, …]``).

    A saved ``file`` is tried first (relative to ``base`` when it is relative: a bundle's own copy), then the
    module ``name``; the error names ``where`` and what is missing.
    """
    if saved in (None, []):
        return []
    if not isinstance(saved, list):
        raise ConfigError(f"{where}: 'user_modules' must be a list, got {type(saved).__name__}")
    out: list[UserModule] = []
    for entry in saved:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"{where}: a user module entry needs a 'name', got {entry!r}")
        name, file = entry["name"], entry.get("file")
        path = None if not file else Path(file) if base is None or Path(file).is_absolute() else base / file
        try:
            if path is not None and path.is_file():
                out.append(import_user_module(path, name=name))
            else:
                out.append(import_user_module(name))
        except ConfigError as err:
            raise ConfigError(
                f"{where}: the model needs user module {name!r} ({err}); put it on the Python path or pass "
                "--imports"
            ) from err
    return out
