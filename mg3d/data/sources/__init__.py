"""Adapters from each published on-disk data set format to :class:`~mg3d.data.records.GroundingRecord`.

Each adapter is iterable (yielding records, boxes in the voxel frame of the stored image), has a length
(the number of raw input items, for progress bars) and a ``skips`` log filled under ``on_error="skip"``.
"""

from mg3d.data.sources._common import Skip, SkipLog, Source, SourceError
from mg3d.data.sources.chestxray8 import ChestXray8Source
from mg3d.data.sources.m3d_refseg import M3DRefSegSource
from mg3d.data.sources.mscxr import MedRPGSource, MSCXRSource

__all__ = [
    "ChestXray8Source",
    "M3DRefSegSource",
    "MSCXRSource",
    "MedRPGSource",
    "Skip",
    "SkipLog",
    "Source",
    "SourceError",
]
