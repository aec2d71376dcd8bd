"""Studies: experiments that measure a property of mg3d on phantoms and real images — not library API.

The top layer beside the CLI: a study may import data, policy and rewards; nothing in ``mg3d`` below it
imports a study. Benchmarks in ``bench/`` drive them and ``docs/`` reports their numbers.

* :mod:`~mg3d.studies.real_volumes` — real CT and MR images that installed packages ship (no download).
* :mod:`~mg3d.studies.lesions` — study scenes: phantoms, or real images with inserted lesions.
* :mod:`~mg3d.studies.semantic_property` — the semantic reward's defining property, per source and pipeline.
"""

from __future__ import annotations

from mg3d.studies.semantic_property import (
    PropertyStudy,
    phantom_property_study,
    real_property_study,
    semantic_property_study,
)

__all__ = ["PropertyStudy", "phantom_property_study", "real_property_study", "semantic_property_study"]
