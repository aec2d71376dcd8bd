"""mg3d: medical image grounding in 3D volumes and 2D radiographs, trained with GRPO.

The names users start from, importable from the package itself::

    from mg3d import Grounder                    # inference: image/volume + phrase → box (voxel frame)
    from mg3d import GRPOModule, GroundingDataModule  # training (LightningModule, LightningDataModule)
    from mg3d import GroundingRecord, read_manifest, write_manifest  # the manifest contract
    from mg3d import Box, CoordinateFrame        # boxes and the frames they live in

They load on first use (``import mg3d`` itself stays light: torch, MONAI and transformers are imported only
when one of these names is touched). ``docs/architecture.md`` maps the modules behind them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name → module that owns it
_PUBLIC: dict[str, str] = {
    "Grounder": "mg3d.grounder",
    "Prediction": "mg3d.grounder",
    "GRPOModule": "mg3d.grpo.module",
    "GroundingDataModule": "mg3d.data.datamodule",
    "GroundingRecord": "mg3d.data.records",
    "read_manifest": "mg3d.data.records",
    "write_manifest": "mg3d.data.records",
    "Box": "mg3d.boxes",
    "CoordinateFrame": "mg3d.frames",
}

__all__ = [
    "Box",
    "CoordinateFrame",
    "GRPOModule",
    "Grounder",
    "GroundingDataModule",
    "GroundingRecord",
    "Prediction",
    "__version__",
    "read_manifest",
    "write_manifest",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily below
    from mg3d.boxes import Box
    from mg3d.data.datamodule import GroundingDataModule
    from mg3d.data.records import GroundingRecord, read_manifest, write_manifest
    from mg3d.frames import CoordinateFrame
    from mg3d.grounder import Grounder, Prediction
    from mg3d.grpo.module import GRPOModule


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'mg3d' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
