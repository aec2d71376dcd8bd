"""Synthetic phantoms written in the exact on-disk formats of M3D-RefSeg, MS-CXR and ChestX-ray8.

No data set can be downloaded here, so every test and the CPU demo run mg3d's *real* adapters
(``mg3d.data.sources``) on phantoms that look, file for file and column for column, like the
published releases:

* ``kind="ct3d"`` — CT-like volumes in Hounsfield units in the M3D-RefSeg layout
  (``sNNNN/ct.nii.gz``, ``sNNNN/mask.nii.gz`` with region ids 1..K, ``sNNNN/text.json``,
  ``M3D_RefSeg_{train,test,all}.csv``), optionally also M3D's preprocessed npy variant.
  The anatomy is built in patient terms and then stored in the orientation of a real, non-identity
  affine, so "left" in a phrase is only right if it is derived from the affine (nibabel's RAS+ world:
  +x points to the patient's *right*, so a smaller world x is further to the patient's left).
* ``kind="cxr2d"`` — chest-radiograph-like images with findings, in the MS-CXR layout (MIMIC-CXR-JPG
  tree + ``MS_CXR_Local_Alignment_v1.1.0.csv``) and/or the ChestX-ray8 layout (``images/*.png``,
  ``BBox_List_2017.csv`` with its malformed header, ``Data_Entry_2017.csv``, split lists).

Each output folder also gets ``phantom_truth.json``: the generator's own ground truth (boxes computed
from its own masks, centres, phrase types), so tests can check the adapters' box derivation
independently. Everything is deterministic for a seed (``numpy.random.Generator`` from a
``SeedSequence``; case *i* does not depend on how many cases are generated).

Modules, one job each: :mod:`~mg3d.data.synthetic.ct_anatomy` (the body and its grid),
:mod:`~mg3d.data.synthetic.ct` (CT lesions, phrases, :func:`generate_ct_case`),
:mod:`~mg3d.data.synthetic.ct_layout` (the M3D-RefSeg writer :func:`make_ct3d`),
:mod:`~mg3d.data.synthetic.cxr` (radiograph findings, :func:`generate_cxr_case`),
:mod:`~mg3d.data.synthetic.cxr_layout` (the MS-CXR / ChestX-ray8 writer :func:`make_cxr2d`) and
:mod:`~mg3d.data.synthetic.files` (the truth file's name, CSV/JSON writers).
"""

from __future__ import annotations

from mg3d.data.synthetic.ct import CTOptions, CTPhantom, LesionRegion, generate_ct_case, patient_side
from mg3d.data.synthetic.ct_anatomy import ORGAN_LABELS, orientation_affine
from mg3d.data.synthetic.ct_layout import M3D_CSV_COLUMNS, make_ct3d
from mg3d.data.synthetic.cxr import CXR_KINDS, CXRFinding, CXRPhantom, generate_cxr_case
from mg3d.data.synthetic.cxr_layout import (
    CXR8_BBOX_HEADER,
    CXR8_DATA_ENTRY_HEADER,
    MSCXR_COLUMNS,
    MSCXR_CSV_NAME,
    CXROptions,
    make_cxr2d,
)
from mg3d.data.synthetic.files import TRUTH_NAME

__all__ = [
    "CXR8_BBOX_HEADER",
    "CXR8_DATA_ENTRY_HEADER",
    "CXR_KINDS",
    "M3D_CSV_COLUMNS",
    "MSCXR_COLUMNS",
    "MSCXR_CSV_NAME",
    "ORGAN_LABELS",
    "TRUTH_NAME",
    "CTOptions",
    "CTPhantom",
    "CXRFinding",
    "CXROptions",
    "CXRPhantom",
    "LesionRegion",
    "generate_ct_case",
    "generate_cxr_case",
    "make_ct3d",
    "make_cxr2d",
    "orientation_affine",
    "patient_side",
]
