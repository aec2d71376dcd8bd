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
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from nibabel.affines import apply_affine
from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform
from PIL import Image
from scipy import ndimage
from scipy.spatial.transform import Rotation

from mg3d.errors import ConfigError

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
    "CXRPhantom",
    "LesionRegion",
    "generate_ct_case",
    "generate_cxr_case",
    "make_ct3d",
    "make_cxr2d",
    "orientation_affine",
    "patient_side",
]

TRUTH_NAME = "phantom_truth.json"
M3D_CSV_COLUMNS = ("Image", "Mask", "Mask_ID", "Question_Type", "Question", "Answer")
MSCXR_CSV_NAME = "MS_CXR_Local_Alignment_v1.1.0.csv"
MSCXR_COLUMNS = (
    "dicom_id",
    "category_name",
    "label_text",
    "path",
    "x",
    "y",
    "w",
    "h",
    "image_width",
    "image_height",
    "split",
)
# Written verbatim: the published header has the box columns split by their own commas plus three
# empty trailing columns, while the data rows have six fields (checked against the file shipped in
# the torchxrayvision 1.5.7 wheel).
CXR8_BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
CXR8_DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)

# ============================================================================================ 3D CT

# Organ label map of a CT phantom (``CTPhantom.anatomy``); also the sites a lesion can sit in.
ORGAN_LABELS = {
    "outside": 0,
    "soft tissue": 1,
    "fat": 2,
    "right lung": 3,
    "left lung": 4,
    "heart": 5,
    "liver": 6,
    "spleen": 7,
    "right kidney": 8,
    "left kidney": 9,
    "bone": 10,
}
_ORGAN_HU = {
    0: -1000.0,
    1: 40.0,
    2: -100.0,
    3: -850.0,
    4: -850.0,
    5: 45.0,
    6: 60.0,
    7: 50.0,
    8: 140.0,
    9: 140.0,
}
_BONE_HU, _DISC_HU = 700.0, 80.0
_HU_MIN, _HU_MAX = -1024, 3071

# Organs as ellipsoids in normalised patient coordinates (u_R, u_A, u_S) ∈ [-1, 1]³ of the field of
# view, u_R > 0 = patient's right (the RAS+ convention). Centres and radii get a small per-case jitter.
_ORGANS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "right lung": ((0.40, -0.02, 0.45), (0.30, 0.45, 0.62)),
    "left lung": ((-0.40, -0.02, 0.45), (0.28, 0.45, 0.60)),
    "heart": ((-0.08, 0.25, 0.28), (0.26, 0.28, 0.28)),
    "liver": ((0.35, 0.05, -0.32), (0.42, 0.48, 0.38)),
    "spleen": ((-0.52, -0.30, -0.22), (0.16, 0.22, 0.22)),
    "right kidney": ((0.36, -0.42, -0.66), (0.13, 0.15, 0.24)),
    "left kidney": ((-0.36, -0.42, -0.58), (0.13, 0.15, 0.24)),
}
_BODY_RADII = (0.86, 0.70)
_SPINE = ((0.0, -0.56), 0.10)

# Lesion sites: weight, host organ, and HU range per density.
_SITES: dict[str, dict[str, Any]] = {
    "liver": {"weight": 3.0, "hu": {"hypodense": (0.0, 25.0), "hyperdense": (120.0, 200.0)}},
    "spleen": {"weight": 1.0, "hu": {"hypodense": (0.0, 20.0), "hyperdense": (110.0, 190.0)}},
    "right kidney": {"weight": 1.0, "hu": {"hypodense": (0.0, 15.0), "hyperdense": (300.0, 500.0)}},
    "left kidney": {"weight": 1.0, "hu": {"hypodense": (0.0, 15.0), "hyperdense": (300.0, 500.0)}},
    "right lung": {"weight": 1.5, "hu": {"hyperdense": (-20.0, 60.0)}},
    "left lung": {"weight": 1.5, "hu": {"hyperdense": (-20.0, 60.0)}},
    "soft tissue": {"weight": 1.0, "hu": {"hypodense": (-90.0, -30.0), "hyperdense": (100.0, 180.0)}},
}
_DIAGNOSIS = {
    ("liver", "hypodense"): "a hepatic cyst or a metastasis",
    ("liver", "hyperdense"): "a calcification or a hypervascular lesion",
    ("spleen", "hypodense"): "a splenic cyst or infarct",
    ("spleen", "hyperdense"): "a splenic calcification",
    ("kidney", "hypodense"): "a renal cyst",
    ("kidney", "hyperdense"): "a renal calculus",
    ("lung", "hyperdense"): "a pulmonary nodule",
    ("soft tissue", "hypodense"): "a fat-containing lesion such as a lipoma",
    ("soft tissue", "hyperdense"): "a soft-tissue mass",
}

# Margins that make a referring phrase unambiguous (a reader could tell the lesions apart).
_SIDE_MARGIN_MM = 5.0  # |x - midline| below this is "midline"
_EXTREME_MARGIN_MM = 8.0  # leftmost / most superior must beat the runner-up by this much
_SIZE_RATIO = 1.5  # largest / smallest: volume ratio to the runner-up
_HU_MARGIN = 40.0  # brightest / darkest: mean HU difference to the runner-up
_GAP_VOXELS = 2  # free voxels between two lesions, so each mask label is one clean blob
_CASE_ATTEMPTS = 40
_LESION_ATTEMPTS = 60

_Q0_TEMPLATES = (
    "Can you segment {p} in this image?",
    "Where is {p} in this CT scan? Please segment it.",
    "Please segment {p}.",
    "Can you identify and segment {p}?",
    "Where does {p} appear in this image? Please respond with the segmentation mask.",
)
_A0_TEMPLATES = ("Sure, it is [SEG].", "It is [SEG].", "Sure, [SEG].", "The segmentation result is [SEG].")
_Q1_TEMPLATES = (
    "{P} may indicate a pathological change. What could it be? Please segment it and explain.",
    "What could {p} represent? Please segment it and explain the potential cause.",
    "Please segment {p} and explain what it may suggest.",
)
_A1_TEMPLATES = (
    "[SEG]. {D} This may suggest {dx}.",
    "Sure, it is [SEG]. {D} It most likely represents {dx}.",
)


@dataclass(frozen=True)
class CTOptions:
    """How a CT phantom looks. All lengths in mm; ``shape``/``spacing`` in stored (i, j, k) order.

    ``orientation`` is the nibabel axis code of the stored axes (``"LPS"``: i toward the patient's
    left, j posterior, k superior — the affine ``diag(-sx, -sy, sz)`` in nibabel's RAS+ world).
    ``center_mm`` is the world position of the volume centre, so the origin is non-zero and the same
    anatomy lands at the same world position in every orientation.

    ``lesion_contrast_hu`` (low, high): when set, a lesion's HU is its host tissue's HU minus (hypodense) or
    plus (hyperdense) a contrast drawn from this range, instead of the site's typical HU range. The
    typical ranges are realistic and therefore subtle (a hypodense liver lesion is 35–60 HU below the
    liver, i.e. 2–3 % of the ``wide`` window); a conspicuous setting such as ``(300, 500)`` makes every
    lesion visible to a tiny model in minutes (the CPU demo). ``None`` keeps the default phantoms
    bit-identical to earlier versions.
    """

    shape: tuple[int, int, int] = (96, 96, 48)
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5)
    orientation: str = "LPS"
    center_mm: tuple[float, float, float] = (14.0, -22.0, -160.0)
    min_lesions: int = 1
    max_lesions: int = 4
    single_lesion: bool = False
    lesion_radius_mm: tuple[float, float] = (3.0, 12.0)
    lesion_contrast_hu: tuple[float, float] | None = None
    noise_hu: float = 20.0
    smoothing_mm: float = 0.8

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "center_mm", tuple(float(v) for v in self.center_mm))
        object.__setattr__(self, "lesion_radius_mm", tuple(float(v) for v in self.lesion_radius_mm))
        object.__setattr__(self, "orientation", _check_orientation(self.orientation))
        if len(self.shape) != 3 or min(self.shape) < 16:
            raise ConfigError(f"shape must be 3 sizes ≥ 16 voxels (i, j, k), got {list(self.shape)}")
        if len(self.spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in self.spacing):
            raise ConfigError(f"spacing must be 3 finite positive mm values, got {list(self.spacing)}")
        if len(self.center_mm) != 3 or not all(math.isfinite(c) for c in self.center_mm):
            raise ConfigError(f"center_mm must be 3 finite values, got {list(self.center_mm)}")
        if not 1 <= self.min_lesions <= self.max_lesions <= 4:
            raise ConfigError(
                f"need 1 ≤ min_lesions ≤ max_lesions ≤ 4, got min_lesions={self.min_lesions}, "
                f"max_lesions={self.max_lesions}"
            )
        lo, hi = self.lesion_radius_mm if len(self.lesion_radius_mm) == 2 else (0.0, -1.0)
        if not 0 < lo <= hi:
            raise ConfigError(
                f"lesion_radius_mm must be (low, high) with 0 < low ≤ high, got {self.lesion_radius_mm}"
            )
        if self.lesion_contrast_hu is not None:
            contrast = tuple(float(v) for v in self.lesion_contrast_hu)
            if len(contrast) != 2 or not (math.isfinite(contrast[1]) and 0 < contrast[0] <= contrast[1]):
                raise ConfigError(
                    f"lesion_contrast_hu must be (low, high) HU with 0 < low ≤ high, got {self.lesion_contrast_hu}"
                )
            object.__setattr__(self, "lesion_contrast_hu", contrast)
        if not (self.noise_hu >= 0 and self.smoothing_mm >= 0):
            raise ConfigError(
                f"noise_hu and smoothing_mm must be ≥ 0, got {self.noise_hu}, {self.smoothing_mm}"
            )


@dataclass(frozen=True)
class LesionRegion:
    """One lesion: what the generator knows about it, all in the stored voxel frame / RAS+ world mm."""

    region_id: int
    site: str  # a key of ORGAN_LABELS (the host organ) — for kidneys the lesion sits next to it
    side: str  # "left" | "right" | "midline" in patient terms, from the affine
    density: str  # "hypodense" | "hyperdense" relative to the host tissue
    shape: str  # "round" | "oval" | "lobulated"
    center_voxel: tuple[float, float, float]  # centroid of the mask voxels (i, j, k)
    center_world: tuple[float, float, float]  # that centroid through the affine (RAS+ mm)
    box_voxel: tuple[int, int, int, int, int, int]  # half-open [lo_i, lo_j, lo_k, hi_i, hi_j, hi_k]
    n_voxels: int
    volume_mm3: float
    mean_hu: float
    diameter_mm: float
    phrase: str
    phrase_type: str  # plain | laterality | craniocaudal | size | intensity | organ | description
    phrase_value: str  # the attribute the phrase picks out (e.g. "left", "largest", "liver")
    description: str  # the text.json sentence


@dataclass
class CTPhantom:
    """A CT phantom in memory: stored arrays (i, j, k), the affine, and its lesions."""

    volume: np.ndarray  # int16 HU
    mask: np.ndarray  # uint8, region ids 1..K
    anatomy: np.ndarray  # uint8, ORGAN_LABELS
    affine: np.ndarray  # 4×4, voxel → RAS+ mm
    regions: list[LesionRegion]
    midline_world: tuple[float, float, float]  # centroid of the body, the reference for left/right

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))

    def region(self, region_id: int) -> LesionRegion:
        for reg in self.regions:
            if reg.region_id == region_id:
                return reg
        raise ConfigError(
            f"phantom has no region {region_id} (regions: {[r.region_id for r in self.regions]})"
        )

    def lesion_crop(
        self, region_id: int, margin: int = 2
    ) -> tuple[np.ndarray, np.ndarray, tuple[slice, ...]]:
        """Volume and binary mask around one lesion (box grown by ``margin`` voxels, clipped)."""
        box = self.region(region_id).box_voxel
        sl = tuple(
            slice(max(0, box[a] - margin), min(self.volume.shape[a], box[a + 3] + margin)) for a in range(3)
        )
        return self.volume[sl].copy(), self.mask[sl] == region_id, sl


def _check_orientation(code: str) -> str:
    code = str(code).upper()
    axes = sorted("LRPAIS".index(c) // 2 if c in "LRPAIS" else -1 for c in code)
    if axes != [0, 1, 2]:
        raise ConfigError(
            f"orientation {code!r} is not a valid axis code: it needs one letter of each pair L/R, P/A, I/S "
            "(e.g. 'LPS', 'RAS', 'PLS')"
        )
    return code


def orientation_affine(
    shape: Sequence[int],
    spacing: Sequence[float],
    orientation: str = "LPS",
    center_mm: Sequence[float] = (0, 0, 0),
) -> np.ndarray:
    """The 4×4 voxel → RAS+ mm affine of an axis-aligned grid with the given nibabel axis code.

    Stored axis n with code c points along world axis {L,R: x, P,A: y, I,S: z}, positive when c is
    R, A or S. The translation puts the volume centre at ``center_mm``.
    """
    code = _check_orientation(orientation)
    direction = np.zeros((3, 3))
    for n, c in enumerate(code):
        direction["LRPAIS".index(c) // 2, n] = (1.0 if c in "RAS" else -1.0) * float(spacing[n])
    affine = np.eye(4)
    affine[:3, :3] = direction
    affine[:3, 3] = np.asarray(center_mm, dtype=float) - direction @ (
        (np.asarray(shape, dtype=float) - 1) / 2
    )
    return affine


def patient_side(
    center_world: Sequence[float], midline_world: Sequence[float], margin_mm: float = _SIDE_MARGIN_MM
) -> str:
    """ "left", "right" or "midline" of a world (RAS+ mm) point relative to the patient's midline.

    In RAS+ the x axis points to the patient's right, so a point with smaller x is on the patient's left.
    """
    dx = float(center_world[0]) - float(midline_world[0])
    if dx <= -margin_mm:
        return "left"
    if dx >= margin_mm:
        return "right"
    return "midline"


@dataclass
class _Grid:
    """The canonical (RAS-index) grid the anatomy is built on, and how it maps to the stored grid."""

    shape: tuple[int, int, int]  # canonical: axis 0 → patient right, 1 → anterior, 2 → superior
    spacing: np.ndarray
    half_fov: np.ndarray  # mm
    coords: list[np.ndarray]  # 1D mm offsets from the volume centre per canonical axis
    to_stored: np.ndarray  # nibabel orientation transform canonical → stored
    affine: np.ndarray

    @classmethod
    def build(cls, opts: CTOptions) -> _Grid:
        world_axis = ["LRPAIS".index(c) // 2 for c in opts.orientation]
        shape = [0, 0, 0]
        spacing = np.zeros(3)
        for n, w in enumerate(world_axis):
            shape[w] = opts.shape[n]
            spacing[w] = opts.spacing[n]
        coords = [(np.arange(shape[w]) - (shape[w] - 1) / 2) * spacing[w] for w in range(3)]
        return cls(
            shape=tuple(shape),  # type: ignore[arg-type]
            spacing=spacing,
            half_fov=np.asarray(shape) * spacing / 2,
            coords=coords,
            to_stored=ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(opts.orientation)),
            affine=orientation_affine(opts.shape, opts.spacing, opts.orientation, opts.center_mm),
        )

    def norm(self) -> list[np.ndarray]:
        """Broadcastable normalised coordinates u_R, u_A, u_S."""
        u = [c / h for c, h in zip(self.coords, self.half_fov, strict=True)]
        return [u[0][:, None, None], u[1][None, :, None], u[2][None, None, :]]

    def stored(self, arr: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(apply_orientation(arr, self.to_stored))

    def index_of_mm(self, mm: np.ndarray) -> np.ndarray:
        return mm / self.spacing + (np.asarray(self.shape) - 1) / 2


@dataclass
class _Anatomy:
    labels: np.ndarray  # canonical uint8 ORGAN_LABELS
    hu: np.ndarray  # canonical float32
    organs: dict[str, tuple[np.ndarray, np.ndarray]]  # name → (centre, radii) normalised, after jitter


def _ellipsoid(u: list[np.ndarray], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    return sum(((u[a] - centre[a]) / radii[a]) ** 2 for a in range(3)) <= 1.0  # type: ignore[return-value]


def _draw_anatomy(rng: np.random.Generator, grid: _Grid) -> _Anatomy:
    u = grid.norm()
    full = grid.shape
    body_r = np.array(_BODY_RADII) * rng.uniform(0.93, 1.03, 2)
    body_c = rng.uniform(-0.03, 0.03, 2)
    ring = ((u[0] - body_c[0]) / body_r[0]) ** 2 + ((u[1] - body_c[1]) / body_r[1]) ** 2
    body = np.broadcast_to(ring <= 1.0, full)
    inner = np.broadcast_to(ring <= 0.86**2, full)
    labels = np.zeros(full, np.uint8)
    labels[body] = ORGAN_LABELS["fat"]
    labels[inner] = ORGAN_LABELS["soft tissue"]
    organs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (
        centre,
        radii,
    ) in _ORGANS.items():  # later organs overwrite earlier ones (liver over lung base)
        c = np.array(centre) + rng.uniform(-0.03, 0.03, 3)
        c[:2] += body_c
        r = np.array(radii) * rng.uniform(0.92, 1.08, 3)
        organs[name] = (c, r)
        labels[_ellipsoid(u, c, r) & inner] = ORGAN_LABELS[name]
    spine_c, spine_r = _SPINE
    spine = ((u[0] - spine_c[0] - body_c[0]) / spine_r) ** 2 + (
        (u[1] - spine_c[1] - body_c[1]) / spine_r
    ) ** 2 <= 1
    labels[np.broadcast_to(spine, full) & inner] = ORGAN_LABELS["bone"]
    lut = np.array([_ORGAN_HU.get(k, _BONE_HU) for k in range(11)], np.float32)
    lut[:10] += rng.uniform(-5, 5, 10).astype(np.float32) * (np.arange(10) > 0)
    hu = lut[labels]
    # Intervertebral discs: a 5 mm gap every 28 mm along the patient's long axis.
    disc = np.broadcast_to((np.mod(grid.coords[2] + rng.uniform(0, 28), 28.0) < 5.0)[None, None, :], full)
    hu[(labels == ORGAN_LABELS["bone"]) & disc] = _DISC_HU
    return _Anatomy(labels, hu, organs)


@dataclass
class _Lesion:
    site: str
    density: str
    shape: str
    hu: float


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _lesion_centre(rng: np.random.Generator, grid: _Grid, anatomy: _Anatomy, site: str) -> np.ndarray | None:
    """A centre (mm offset from the volume centre, RAS) for a lesion at this site, or None."""
    if site == "soft tissue":
        angle = rng.uniform(0, 2 * np.pi)
        rho = rng.uniform(0.55, 0.8)
        u = np.array(
            [
                rho * _BODY_RADII[0] * np.cos(angle),
                rho * _BODY_RADII[1] * np.sin(angle),
                rng.uniform(-0.8, 0.8),
            ]
        )
    else:
        c, r = anatomy.organs[site]
        if "kidney" in site:  # on the organ's surface: the lesion lies "next to" the kidney
            u = c + r * _unit(rng) * rng.uniform(0.9, 1.2)
        else:
            u = c + r * _unit(rng) * rng.uniform(0, 0.6) ** (1 / 3) * 0.6
    mm = u * grid.half_fov
    idx = np.round(grid.index_of_mm(mm)).astype(int)
    if np.any(idx < 0) or np.any(idx >= grid.shape):
        return None
    host = ORGAN_LABELS[site] if "kidney" not in site else None
    label = anatomy.labels[tuple(idx)]
    if host is not None and label != host:
        return None
    if host is None and label not in (ORGAN_LABELS[site], ORGAN_LABELS["soft tissue"], ORGAN_LABELS["fat"]):
        return None
    return mm


def _rasterise(
    grid: _Grid,
    centre: np.ndarray,
    radii: np.ndarray,
    rot: np.ndarray,
    lobes: list[tuple[np.ndarray, np.ndarray]],
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """Boolean lesion mask on a padded local block of the canonical grid, or None if it leaves the volume."""
    reach = max([float(np.max(radii))] + [float(np.linalg.norm(c - centre) + np.max(r)) for c, r in lobes])
    lo = np.floor(grid.index_of_mm(centre - reach)).astype(int) - _GAP_VOXELS
    hi = np.ceil(grid.index_of_mm(centre + reach)).astype(int) + 1 + _GAP_VOXELS
    if np.any(lo < 1) or np.any(hi > np.asarray(grid.shape) - 1):
        return None
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    pts = np.stack(
        np.meshgrid(*(grid.coords[a][sl[a]] for a in range(3)), indexing="ij"), axis=-1
    )  # (..., 3) mm
    inside = np.zeros(pts.shape[:3], bool)
    for c, r in [(centre, radii), *lobes]:
        q = (pts - c) @ rot  # coordinates along the ellipsoid's own axes
        inside |= np.sum((q / r) ** 2, axis=-1) <= 1.0
    return sl, inside


def _lesion_hu(
    rng: np.random.Generator, site: str, density: str, contrast: tuple[float, float] | None
) -> float:
    """A lesion's HU: the site's typical range, or its host tissue's HU ∓ a drawn contrast (one draw either way,
    so the rest of the case is the same random sequence)."""
    if contrast is None:
        return float(rng.uniform(*_SITES[site]["hu"][density]))
    # a kidney lesion sits next to the kidney, in the surrounding soft tissue
    host = _ORGAN_HU[ORGAN_LABELS["soft tissue" if "kidney" in site else site]]
    delta = float(rng.uniform(*contrast))
    return host - delta if density == "hypodense" else host + delta


def _place_lesions(
    rng: np.random.Generator, grid: _Grid, anatomy: _Anatomy, n: int, opts: CTOptions
) -> tuple[np.ndarray, list[_Lesion]] | None:
    """Canonical lesion label map (1..n) and lesion parameters, or None if they did not fit."""
    labels = np.zeros(grid.shape, np.uint8)
    lesions: list[_Lesion] = []
    names = list(_SITES)
    weights = np.array([_SITES[s]["weight"] for s in names])
    lo_r, hi_r = opts.lesion_radius_mm
    min_r = 0.75 * float(np.max(grid.spacing))  # at least ~2 voxels across along every axis
    for rid in range(1, n + 1):
        for _ in range(_LESION_ATTEMPTS):
            site = names[rng.choice(len(names), p=weights / weights.sum())]
            centre = _lesion_centre(rng, grid, anatomy, site)
            if centre is None:
                continue
            cap = hi_r
            if site != "soft tissue" and "kidney" not in site:
                cap = max(lo_r, min(hi_r, 0.6 * float(np.min(anatomy.organs[site][1] * grid.half_fov))))
            radii = np.maximum(rng.uniform(lo_r, cap, 3), min_r)
            rot = Rotation.from_euler("zyx", rng.uniform(0, 2 * np.pi, 3)).as_matrix()
            lobulated = rng.random() < 0.35
            lobes = []
            if lobulated:
                for _k in range(int(rng.integers(2, 4))):
                    lobes.append(
                        (centre + rot @ (_unit(rng) * radii * 0.75), radii * rng.uniform(0.45, 0.65))
                    )
            raster = _rasterise(grid, centre, radii, rot, lobes)
            if raster is None:
                continue
            sl, inside = raster
            if inside.sum() < 8:
                continue
            grown = ndimage.binary_dilation(inside, iterations=_GAP_VOXELS)
            if np.any(labels[sl][grown]):
                continue
            labels[sl][inside] = rid
            density_choices = list(_SITES[site]["hu"])
            density = density_choices[int(rng.integers(len(density_choices)))]
            hu = _lesion_hu(rng, site, density, opts.lesion_contrast_hu)
            ratio = float(np.max(radii) / np.min(radii))
            shape = "lobulated" if lobulated else ("round" if ratio < 1.3 else "oval")
            lesions.append(_Lesion(site, density, shape, hu))
            break
        else:
            return None
    return labels, lesions


def _organ_phrase(site: str) -> str:
    if "kidney" in site:
        return f"the lesion next to the {site}"
    if "lung" in site:
        return f"the nodule in the {site}"
    return f"the lesion in the {site}"


def _site_clause(site: str, side: str) -> str:
    if "kidney" in site:
        return f"adjacent to the {site}"
    if site == "soft tissue":
        return (
            f"in the soft tissue of the {side} body wall"
            if side != "midline"
            else "in the midline soft tissue"
        )
    return f"in the {site}"


def _candidates(i: int, regs: list[dict[str, Any]], single_lesion: bool) -> list[tuple[str, str, str]]:
    """(phrase_type, phrase_value, phrase) that pick out lesion i and no other lesion of the case."""
    if single_lesion:
        return [("plain", "lesion", "the lesion")]
    me = regs[i]
    others = regs[:i] + regs[i + 1 :]
    out: list[tuple[str, str, str]] = []
    if not others:
        out.append(("plain", "lesion", "the lesion"))
    opposite = {"left": "right", "right": "left"}
    if me["side"] in opposite and all(o["side"] == opposite[me["side"]] for o in others):
        out.append(("laterality", me["side"], f"the lesion on the patient's {me['side']} side"))
    if others:
        x, z = me["center_world"][0], me["center_world"][2]
        if all(x <= o["center_world"][0] - _EXTREME_MARGIN_MM for o in others):
            out.append(("laterality", "leftmost", "the lesion furthest to the patient's left"))
        if all(x >= o["center_world"][0] + _EXTREME_MARGIN_MM for o in others):
            out.append(("laterality", "rightmost", "the lesion furthest to the patient's right"))
        if all(z >= o["center_world"][2] + _EXTREME_MARGIN_MM for o in others):
            out.append(("craniocaudal", "superior", "the most superior lesion"))
        if all(z <= o["center_world"][2] - _EXTREME_MARGIN_MM for o in others):
            out.append(("craniocaudal", "inferior", "the most inferior lesion"))
        if all(me["volume_mm3"] >= _SIZE_RATIO * o["volume_mm3"] for o in others):
            out.append(("size", "largest", "the largest lesion"))
        if all(me["volume_mm3"] * _SIZE_RATIO <= o["volume_mm3"] for o in others):
            out.append(("size", "smallest", "the smallest lesion"))
        if all(me["mean_hu"] >= o["mean_hu"] + _HU_MARGIN for o in others):
            out.append(("intensity", "brightest", "the brightest lesion"))
        if all(me["mean_hu"] <= o["mean_hu"] - _HU_MARGIN for o in others):
            out.append(("intensity", "darkest", "the darkest lesion"))
    if me["site"] != "soft tissue" and all(o["site"] != me["site"] for o in others):
        out.append(("organ", me["site"], _organ_phrase(me["site"])))
    if all(o["density"] != me["density"] for o in others):
        out.append(("description", me["density"], f"the {me['density']} lesion"))
    return out


def generate_ct_case(
    rng: np.random.Generator, options: CTOptions | None = None, **overrides: Any
) -> CTPhantom:
    """One CT phantom in memory (nothing written): HU volume, region mask, affine, lesions with phrases.

    ``overrides`` are :class:`CTOptions` fields (``shape=(64, 64, 16)``, ``single_lesion=True``, …).
    """
    opts = _ct_options(options, overrides)
    grid = _Grid.build(opts)
    anatomy = _draw_anatomy(rng, grid)
    noise = rng.standard_normal(grid.shape, dtype=np.float32) * np.float32(opts.noise_hu)
    sigma = opts.smoothing_mm / grid.spacing
    body_stored = grid.stored(anatomy.labels > 0)
    midline = apply_affine(grid.affine, np.asarray(ndimage.center_of_mass(body_stored)))
    lo_n, hi_n = (1, 1) if opts.single_lesion else (opts.min_lesions, opts.max_lesions)
    for _ in range(_CASE_ATTEMPTS):
        n = int(rng.integers(lo_n, hi_n + 1))
        placed = _place_lesions(rng, grid, anatomy, n, opts)
        if placed is None:
            continue
        lesion_labels, lesions = placed
        clean = anatomy.hu.copy()
        for rid, les in enumerate(lesions, start=1):
            clean[lesion_labels == rid] = les.hu
        hu = (
            ndimage.gaussian_filter(clean + noise, sigma=sigma, mode="nearest")
            if opts.smoothing_mm > 0
            else clean + noise
        )
        volume = grid.stored(np.clip(np.rint(hu), _HU_MIN, _HU_MAX).astype(np.int16))
        mask = grid.stored(lesion_labels)
        regs = _measure(volume, mask, grid.affine, midline, lesions)
        chosen = []
        for i in range(len(regs)):
            cands = _candidates(i, regs, opts.single_lesion)
            if not cands:
                break
            chosen.append(cands[int(rng.integers(len(cands)))])
        else:
            regions = [_region(reg, lesions[i], chosen[i]) for i, reg in enumerate(regs)]
            return CTPhantom(
                volume=volume,
                mask=mask,
                anatomy=grid.stored(anatomy.labels),
                affine=grid.affine,
                regions=regions,
                midline_world=tuple(float(v) for v in midline),  # type: ignore[arg-type]
            )
    raise ConfigError(
        f"could not place {lo_n}-{hi_n} separable lesions with unambiguous phrases in a {list(opts.shape)} "
        f"volume after {_CASE_ATTEMPTS} attempts; use a larger shape, fewer lesions or smaller lesion_radius_mm"
    )


def _measure(
    volume: np.ndarray, mask: np.ndarray, affine: np.ndarray, midline: np.ndarray, lesions: list[_Lesion]
) -> list[dict[str, Any]]:
    """Attributes of each region, all derived from the stored arrays and the affine."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    objects = ndimage.find_objects(mask)  # slices are half-open: exactly the voxel-frame box
    regs = []
    for rid, les in enumerate(lesions, start=1):
        sl = objects[rid - 1]
        local = mask[sl] == rid
        idx = np.nonzero(local)
        centre = np.array([idx[a].mean() + sl[a].start for a in range(3)])
        world = apply_affine(affine, centre)
        box = tuple(int(s.start) for s in sl) + tuple(int(s.stop) for s in sl)
        extent_mm = (np.array(box[3:]) - np.array(box[:3])) * spacing
        count = int(local.sum())
        regs.append(
            {
                "region_id": rid,
                "center_voxel": tuple(float(v) for v in centre),
                "center_world": tuple(float(v) for v in world),
                "box_voxel": box,
                "n_voxels": count,
                "volume_mm3": float(count * np.prod(spacing)),
                "mean_hu": float(volume[sl][local].mean()),
                "diameter_mm": float(np.max(extent_mm)),
                "side": patient_side(world, midline),
                "site": les.site,
                "density": les.density,
            }
        )
    return regs


def _region(reg: dict[str, Any], les: _Lesion, chosen: tuple[str, str, str]) -> LesionRegion:
    ptype, pvalue, phrase = chosen
    d = reg["diameter_mm"]
    size = "small " if d < 10 else ("large " if d >= 20 else "")
    words = f"{size}{les.shape} {les.density} focus"
    description = (
        f"{phrase[0].upper()}{phrase[1:]} is {'an' if words[0] in 'aeiou' else 'a'} {words} "
        f"{_site_clause(les.site, reg['side'])}, about {round(d)} mm across."
    )
    return LesionRegion(
        region_id=reg["region_id"],
        site=les.site,
        side=reg["side"],
        density=les.density,
        shape=les.shape,
        center_voxel=reg["center_voxel"],
        center_world=reg["center_world"],
        box_voxel=reg["box_voxel"],
        n_voxels=reg["n_voxels"],
        volume_mm3=reg["volume_mm3"],
        mean_hu=reg["mean_hu"],
        diameter_mm=d,
        phrase=phrase,
        phrase_type=ptype,
        phrase_value=pvalue,
        description=description,
    )


def _ct_options(options: CTOptions | None, overrides: dict[str, Any]) -> CTOptions:
    names = {f.name for f in fields(CTOptions)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown CT phantom option(s) {unknown}; known options: {sorted(names)}")
    base = options if options is not None else CTOptions()
    if not overrides:
        return base
    values = {f.name: getattr(base, f.name) for f in fields(CTOptions)}
    values.update(overrides)
    return CTOptions(**values)


def _site_group(site: str) -> str:
    for group in ("kidney", "lung"):
        if group in site:
            return group
    return site


def _qa_rows(
    rng: np.random.Generator, reg: LesionRegion, n0: int, n1: int, style: str = "question"
) -> list[tuple[int, str, str]]:
    """(Question_Type, Question, Answer) in the style of the real CSVs: the phrase asked about several ways.

    ``style="phrase"`` writes the bare referring phrase in the Question column (one row per region, type 0):
    the short form a tiny CPU model can afford, where every character is a token.
    """
    p = reg.phrase
    if style == "phrase":
        return [(0, p, _A0_TEMPLATES[int(rng.integers(len(_A0_TEMPLATES)))].format(D=reg.description, dx=""))]
    big_p = p[0].upper() + p[1:]
    dx = _DIAGNOSIS[(_site_group(reg.site), reg.density)]
    out = []
    for qtype, count, questions, answers in (
        (0, n0, _Q0_TEMPLATES, _A0_TEMPLATES),
        (1, n1, _Q1_TEMPLATES, _A1_TEMPLATES),
    ):
        for k in rng.permutation(len(questions))[:count]:
            answer = answers[int(rng.integers(len(answers)))]
            out.append(
                (qtype, questions[int(k)].format(p=p, P=big_p), answer.format(D=reg.description, dx=dx))
            )
    return out


def _save_nifti(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)  # "scanner", as CTs converted from DICOM carry
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")  # '\n' like the pandas-written originals
        writer.writerow(header)
        writer.writerows(rows)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_seed(seed: int, n: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"n must be a positive number of cases, got {n!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")


def _m3d_npy(
    volume: np.ndarray, mask: np.ndarray, size: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """M3D's own preprocessing (m3d_refseg_data_prepare.py), with MONAI as it used: → (1, D, H, W) float32.

    get_fdata → transpose (2, 0, 1) + channel → percentile scaling 0.5–99.5 to [0, 1] → crop foreground
    → resize (trilinear image, nearest mask).
    """
    from monai.transforms import Compose, CropForegroundd, Resized, ScaleIntensityRangePercentilesd
    from monai.utils import convert_to_numpy

    pipeline = Compose(
        [
            ScaleIntensityRangePercentilesd(
                keys="image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True
            ),
            CropForegroundd(keys=["image", "seg"], source_key="image"),
            Resized(keys=["image", "seg"], spatial_size=size, mode=("trilinear", "nearest")),
        ]
    )
    data = {
        "image": volume.astype(np.float64).transpose(2, 0, 1)[None],
        "seg": mask.astype(np.float64).transpose(2, 0, 1)[None],
    }
    out = pipeline(data)
    return convert_to_numpy(out["image"], dtype=np.float32), convert_to_numpy(out["seg"], dtype=np.float32)


def _box_of(mask: np.ndarray) -> list[int]:
    sl = ndimage.find_objects(mask.astype(np.uint8))[0]
    return [int(s.start) for s in sl] + [int(s.stop) for s in sl]


def _r(values: Sequence[float], nd: int = 4) -> list[float]:
    return [round(float(v), nd) for v in values]


def make_ct3d(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int,
    *,
    npy: bool = False,
    npy_shape: Sequence[int] = (32, 256, 256),
    npy_dir: str | os.PathLike[str] | None = None,
    questions_per_region: Sequence[int] = (3, 2),
    test_fraction: float = 0.2,
    question_style: str = "question",
    **options: Any,
) -> list[Path]:
    """Write ``n`` CT phantoms in the M3D-RefSeg layout under ``out_dir``; return every file written.

    ``options`` are :class:`CTOptions` fields. ``questions_per_region`` = (type-0, type-1) CSV rows per
    region (the real release has about 3 + 2). The train/test CSVs split by case. With ``npy=True``
    the preprocessed variant goes to ``npy_dir`` (default ``out_dir/M3D_RefSeg_npy``) with its own copy
    of the CSVs (which, as in the release, still name the ``.nii.gz`` files). ``question_style="phrase"``
    writes the bare referring phrase instead of questions (one row per region; the CPU demo's choice).
    """
    if question_style not in ("question", "phrase"):
        raise ConfigError(f"question_style must be 'question' or 'phrase', got {question_style!r}")
    _check_seed(seed, n)
    opts = _ct_options(None, options)
    n0, n1 = (int(v) for v in questions_per_region)
    if not (0 <= n0 <= len(_Q0_TEMPLATES) and 0 <= n1 <= len(_Q1_TEMPLATES) and n0 + n1 >= 1):
        raise ConfigError(
            f"questions_per_region must be (type 0, type 1) with 0..{len(_Q0_TEMPLATES)} and "
            f"0..{len(_Q1_TEMPLATES)} and at least one question, got {tuple(questions_per_region)}"
        )
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in [0, 1), got {test_fraction}")
    size = tuple(int(v) for v in npy_shape)
    if npy and (len(size) != 3 or min(size) < 2):
        raise ConfigError(f"npy_shape must be 3 sizes (D, H, W) ≥ 2, got {list(npy_shape)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npy_root = Path(npy_dir) if npy_dir is not None else out / "M3D_RefSeg_npy"
    n_test = min(n - 1, round(n * test_fraction)) if n > 1 else 0
    if test_fraction > 0 and n > 1:
        n_test = max(1, n_test)
    test_cases = set(
        np.random.default_rng([int(seed), 0x7E57]).choice(n, size=n_test, replace=False).tolist()
    )
    written: list[Path] = []
    rows: dict[str, list[list[Any]]] = {"train": [], "test": []}
    cases: dict[str, Any] = {}
    for i, child in enumerate(np.random.SeedSequence(int(seed)).spawn(n)):
        rng = np.random.default_rng(child)
        ph = generate_ct_case(rng, opts)
        case = f"s{i:04d}"
        split = "test" if i in test_cases else "train"
        case_dir = out / case
        case_dir.mkdir(exist_ok=True)
        paths = (case_dir / "ct.nii.gz", case_dir / "mask.nii.gz", case_dir / "text.json")
        _save_nifti(ph.volume, ph.affine, paths[0])
        _save_nifti(ph.mask, ph.affine, paths[1])
        texts = {str(r.region_id): r.description for r in ph.regions}
        _write_json(paths[2], texts)
        written.extend(paths)
        for reg in ph.regions:
            for qtype, question, answer in _qa_rows(rng, reg, n0, n1, question_style):
                rows[split].append(
                    [f"{case}/ct.nii.gz", f"{case}/mask.nii.gz", reg.region_id, qtype, question, answer]
                )
        entry: dict[str, Any] = {
            "image": f"{case}/ct.nii.gz",
            "mask": f"{case}/mask.nii.gz",
            "split": split,
            "shape": list(ph.volume.shape),
            "spacing": _r(ph.spacing, 6),
            "orientation": ph.orientation,
            "affine": [_r(row, 6) for row in ph.affine.tolist()],
            "midline_world": _r(ph.midline_world),
            "regions": {
                str(r.region_id): {
                    "center_voxel": _r(r.center_voxel),
                    "center_world": _r(r.center_world),
                    "box_voxel": list(r.box_voxel),
                    "n_voxels": r.n_voxels,
                    "volume_mm3": round(r.volume_mm3, 3),
                    "mean_hu": round(r.mean_hu, 3),
                    "diameter_mm": round(r.diameter_mm, 3),
                    "site": r.site,
                    "side": r.side,
                    "density": r.density,
                    "shape": r.shape,
                    "phrase": r.phrase,
                    "phrase_type": r.phrase_type,
                    "phrase_value": r.phrase_value,
                    "description": r.description,
                }
                for r in ph.regions
            },
        }
        if npy:
            image, seg = _m3d_npy(ph.volume, ph.mask, size)  # type: ignore[arg-type]
            for reg in ph.regions:
                if not np.any(seg == reg.region_id):
                    raise ConfigError(
                        f"{case}: region {reg.region_id} ({reg.n_voxels} voxels) vanishes when resized to "
                        f"npy_shape {list(size)}; use a larger npy_shape"
                    )
                entry["regions"][str(reg.region_id)]["npy_box"] = _box_of(seg[0] == reg.region_id)
            entry["npy_shape"] = list(seg.shape)
            npy_case = npy_root / case
            npy_case.mkdir(parents=True, exist_ok=True)
            np.save(npy_case / "ct.npy", image)
            np.save(npy_case / "mask.npy", seg)
            _write_json(npy_case / "text.json", texts)
            written.extend([npy_case / "ct.npy", npy_case / "mask.npy", npy_case / "text.json"])
        cases[case] = entry
    csv_dirs = [out, npy_root] if npy else [out]
    for folder in csv_dirs:
        for name, content in (
            ("train", rows["train"]),
            ("test", rows["test"]),
            ("all", sorted(rows["train"] + rows["test"], key=lambda r: r[0])),
        ):
            path = folder / f"M3D_RefSeg_{name}.csv"
            _write_csv(path, M3D_CSV_COLUMNS, content)
            written.append(path)
    truth = {
        "generator": "mg3d.data.synthetic.make_ct3d",
        "kind": "ct3d",
        "layout": "m3d_refseg",
        "seed": int(seed),
        "n": int(n),
        "options": {f.name: getattr(opts, f.name) for f in fields(CTOptions)},
        "questions_per_region": [n0, n1],
        "question_style": question_style,
        "box_convention": "voxel frame of the stored NIfTI (i, j, k), half-open [lo_i, lo_j, lo_k, hi_i, hi_j, hi_k]",
        "npy": {
            "dir": os.path.relpath(npy_root, out),
            "box_convention": "(D, H, W) of the 1×D×H×W array, half-open",
        }
        if npy
        else None,
        "cases": cases,
    }
    _write_json(out / TRUTH_NAME, truth)
    written.append(out / TRUTH_NAME)
    return written


# ============================================================================================ 2D CXR

# Finding kinds of the generator and how each is drawn.
_CXR_GEOMETRY = {
    "opacity": "patchy",
    "consolidation": "patchy",
    "pneumonia": "patchy",
    "infiltrate": "patchy",
    "nodule": "round",
    "mass": "round",
    "atelectasis": "plate",
    "effusion": "effusion",
    "pneumothorax": "pneumothorax",
    "cardiomegaly": "cardiomegaly",
    "edema": "edema",
}
CXR_KINDS = tuple(_CXR_GEOMETRY)
_MSCXR_CATEGORY = {
    "atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "consolidation": "Consolidation",
    "edema": "Edema",
    "opacity": "Lung Opacity",
    "effusion": "Pleural Effusion",
    "pneumonia": "Pneumonia",
    "pneumothorax": "Pneumothorax",
}
_CXR8_LABEL = {
    "atelectasis": "Atelectasis",
    "effusion": "Effusion",
    "cardiomegaly": "Cardiomegaly",
    "infiltrate": "Infiltrate",
    "pneumonia": "Pneumonia",
    "pneumothorax": "Pneumothorax",
    "mass": "Mass",
    "nodule": "Nodule",
}
_CXR8_ENTRY_LABEL = {"Infiltrate": "Infiltration"}  # the label file's name for the box file's "Infiltrate"
_CXR_PHRASES = {
    "opacity": ("{side} {zone} zone opacity", "patchy opacity in the {side} {zone} zone"),
    "consolidation": ("{side} {zone} zone consolidation", "consolidation in the {side} {zone} zone"),
    "pneumonia": (
        "{side} {zone} zone pneumonia",
        "focal {side} {zone} zone opacity concerning for pneumonia",
    ),
    "infiltrate": ("{side} {zone} zone infiltrate", "infiltrate in the {side} {zone} zone"),
    "nodule": ("{side} {zone} zone nodule", "small nodule in the {side} {zone} zone"),
    "mass": ("{side} {zone} zone mass", "mass in the {side} {zone} zone"),
    "atelectasis": ("{side} {zone} zone atelectasis", "plate-like atelectasis in the {side} {zone} zone"),
    "effusion": ("small {side} pleural effusion", "{side} pleural effusion"),
    "pneumothorax": ("{side} apical pneumothorax", "small {side} pneumothorax"),
    "cardiomegaly": ("enlarged cardiac silhouette", "cardiomegaly"),
    "edema": ("bilateral perihilar opacities consistent with edema", "pulmonary edema"),
}
_CXR_BILATERAL = {
    "opacity": "bilateral {zone} zone opacities",
    "consolidation": "bilateral {zone} zone consolidation",
    "pneumonia": "bilateral {zone} zone pneumonia",
    "infiltrate": "bilateral {zone} zone infiltrates",
    "effusion": "bilateral pleural effusions",
}
_ZONES = ("upper", "mid", "lower")
_CXR_ATTEMPTS = 40


@dataclass(frozen=True)
class CXRFinding:
    """One finding: its kind, where it is in patient terms, and the tight box of each of its parts."""

    kind: str  # a key of CXR_KINDS
    side: (
        str  # "left" | "right" (patient's; image right = patient's left on a PA film) | "bilateral" | "none"
    )
    zone: str  # "upper" | "mid" | "lower" | "none"
    phrase: str
    tight_boxes: tuple[tuple[int, int, int, int], ...]  # half-open pixel [x1, y1, x2, y2], x = column


@dataclass
class CXRPhantom:
    image: np.ndarray  # (H, W) uint8, PA view: the patient's left is on the image's right
    findings: list[CXRFinding]

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


@dataclass
class _Chest:
    X: np.ndarray  # (1, W) normalised column centres
    Y: np.ndarray  # (H, 1) normalised row centres
    img: np.ndarray  # (H, W) float32
    torso: np.ndarray
    lungs: dict[str, np.ndarray]  # visible lung (minus heart) per patient side
    lung_shape: dict[str, tuple[float, float, float, float]]  # cx, cy, a, b
    heart: np.ndarray
    zone_rows: dict[str, tuple[int, int]]  # first and last+1 row of visible lung per side


def _cxr_chest(rng: np.random.Generator, width: int, height: int, big_heart: bool) -> _Chest:
    X = ((np.arange(width) + 0.5) / width)[None, :]
    Y = ((np.arange(height) + 0.5) / height)[:, None]

    def jit(s: float) -> float:
        return float(rng.uniform(-s, s))

    torso = ((X - 0.5) / (0.47 + jit(0.02))) ** 2 + ((Y - 0.6) / 0.62) ** 2 <= 1
    img = np.where(torso, 0.42, 0.03).astype(np.float32)
    heart_a = (0.13 + jit(0.01)) * (float(rng.uniform(1.35, 1.5)) if big_heart else 1.0)
    heart_b = (0.115 + jit(0.01)) * (1.12 if big_heart else 1.0)
    heart = ((X - 0.545 - jit(0.01)) / heart_a) ** 2 + ((Y - 0.58 - jit(0.01)) / heart_b) ** 2 <= 1
    lungs, shapes, domes = {}, {}, {}
    for side, cx0 in (
        ("right", 0.30),
        ("left", 0.70),
    ):  # PA film: the patient's right lung is on the image left
        cx, cy, a, b = cx0 + jit(0.015), 0.44 + jit(0.015), 0.155 + jit(0.01), 0.29 + jit(0.015)
        base = cy + 0.8 * b - (0.025 if side == "right" else 0.0)  # the right hemidiaphragm sits higher
        domes[side] = base - 0.07 * np.clip(1 - ((X - cx) / a) ** 2, 0, 1)
        lungs[side] = (
            (((X - cx) / a) ** 2 + ((Y - cy) / b) ** 2 <= 1) & (domes[side] > Y) & (np.abs(X - 0.5) > 0.065)
        )
        shapes[side] = (cx, cy, a, b)
    below = np.where(X < 0.5, domes["right"], domes["left"]) < Y
    img[torso & below] = 0.58
    both = lungs["right"] | lungs["left"]
    markings = ndimage.gaussian_filter(
        rng.standard_normal((height, width)).astype(np.float32), 1.2 * width / 256
    )
    markings *= np.float32(0.035 / (markings.std() + 1e-6))
    hila = sum(np.exp(-np.hypot(X - hx, Y - 0.45) / 0.08) for hx in (0.42, 0.58))
    img[both] = (0.13 + markings + 0.06 * hila)[both]
    img[torso & (np.abs(X - 0.5) < 0.07) & (Y > 0.08) & ~both] = 0.62
    img[heart] = 0.68
    spine = torso & (np.abs(X - 0.5) < 0.035)
    img += np.where(spine, 0.08 * (0.6 + 0.4 * np.cos(2 * np.pi * Y / 0.045)), 0).astype(np.float32)
    visible = {s: m & ~heart for s, m in lungs.items()}
    zone_rows = {}
    for side, m in visible.items():
        rows = np.nonzero(m.any(axis=1))[0]
        zone_rows[side] = (int(rows[0]), int(rows[-1]) + 1)
    return _Chest(X, Y, img, torso, visible, shapes, heart, zone_rows)


def _zone(chest: _Chest, side: str, region: np.ndarray) -> str:
    top, bottom = chest.zone_rows[side]
    row = float(np.nonzero(region)[0].mean())
    k = int(np.clip((row - top) / (bottom - top) * 3, 0, 2))
    return _ZONES[k]


def _pick(
    rng: np.random.Generator, chest: _Chest, side: str, zone: str | None = None
) -> tuple[float, float] | None:
    cand = chest.lungs[side]
    if zone is not None:
        top, bottom = chest.zone_rows[side]
        k = _ZONES.index(zone)
        rows = np.zeros((cand.shape[0], 1), bool)
        rows[top + (bottom - top) * k // 3 : top + (bottom - top) * (k + 1) // 3] = True
        cand = cand & rows
    ys, xs = np.nonzero(cand)
    if ys.size == 0:
        return None
    i = int(rng.integers(ys.size))
    return (xs[i] + 0.5) / cand.shape[1], (ys[i] + 0.5) / cand.shape[0]


def _ellipse(chest: _Chest, cx: float, cy: float, a: float, b: float, angle: float = 0.0) -> np.ndarray:
    dx, dy = chest.X - cx, chest.Y - cy
    c, s = math.cos(angle), math.sin(angle)
    return ((dx * c + dy * s) / a) ** 2 + ((-dx * s + dy * c) / b) ** 2 <= 1


def _finding_parts(
    rng: np.random.Generator, chest: _Chest, kind: str, bilateral: bool
) -> tuple[list[tuple[str, np.ndarray]], str, str] | None:
    """[(side, region mask)], side label and zone of one finding, or None if this draw did not fit."""
    geom = _CXR_GEOMETRY[kind]
    W = chest.X.shape[1]
    if geom == "cardiomegaly":
        return [("none", chest.heart)], "none", "none"
    if geom == "edema":
        parts = []
        for side, hx in (("right", 0.38), ("left", 0.62)):
            region = (
                _ellipse(chest, hx + float(rng.uniform(-0.02, 0.02)), 0.44, 0.07, 0.09) & chest.lungs[side]
            )
            parts.append((side, region))
        return parts, "bilateral", "none"
    sides = ["right", "left"] if bilateral else [("right", "left")[int(rng.integers(2))]]
    if kind == "effusion":
        zone = "lower"
    elif kind == "pneumothorax":
        zone = "upper"
    else:  # plate-like atelectasis lies in the mid or lower zone
        zone = _ZONES[1 + int(rng.integers(2))] if geom == "plate" else _ZONES[int(rng.integers(3))]
    parts = []
    for side in sides:
        cx, cy, a, b = chest.lung_shape[side]
        lung = chest.lungs[side]
        if geom in ("patchy", "round", "plate"):
            at = _pick(rng, chest, side, zone)
            if at is None:
                return None
            px, py = at
            region = np.zeros_like(lung)
            if geom == "patchy":
                for _ in range(int(rng.integers(2, 4))):
                    region |= _ellipse(
                        chest,
                        px + float(rng.normal(0, 0.02)),
                        py + float(rng.normal(0, 0.02)),
                        float(rng.uniform(0.03, 0.06)),
                        float(rng.uniform(0.03, 0.06)),
                    )
            elif geom == "round":
                r = float(rng.uniform(0.012, 0.022) if kind == "nodule" else rng.uniform(0.035, 0.055))
                disc = np.hypot((chest.X - px) * W, (chest.Y - py) * lung.shape[0]) <= r * W
                if (disc & lung).sum() < 0.8 * disc.sum():
                    return None
                region = disc
            else:
                region = _ellipse(
                    chest,
                    px,
                    py,
                    float(rng.uniform(0.06, 0.1)),
                    float(rng.uniform(0.01, 0.018)),
                    float(rng.uniform(-0.35, 0.35)),
                )
            region = region & lung
        elif geom == "effusion":
            top, bottom = chest.zone_rows[side]
            level = (bottom - float(rng.uniform(0.12, 0.25)) * (bottom - top)) / lung.shape[0]
            lateral = np.clip(np.abs(chest.X - 0.5) - abs(cx - 0.5) + a, 0, None) / (2 * a)
            region = lung & (level - 0.06 * lateral < chest.Y)
        else:  # pneumothorax: the lung edge falls away from the chest wall at the apex
            shift = 0.03 if side == "right" else -0.03
            collapsed = _ellipse(chest, cx + shift, cy + 0.03, a * 0.8, b * 0.85)
            region = lung & ~collapsed & (cy > chest.Y)
        if region.sum() < 12:
            return None
        parts.append((side, region))
    zones = {_zone(chest, s, m) for s, m in parts}
    if len(zones) != 1 or (kind in ("effusion", "pneumothorax") and zones != {zone}):
        return None
    side_label = "bilateral" if bilateral else sides[0]
    return parts, side_label, zones.pop()


def _render_finding(
    rng: np.random.Generator, chest: _Chest, kind: str, parts: list[tuple[str, np.ndarray]]
) -> None:
    geom = _CXR_GEOMETRY[kind]
    if geom == "cardiomegaly":
        return  # the heart was drawn enlarged
    scale = chest.X.shape[1] / 256
    target, alpha, sigma = {
        "patchy": (0.62, float(rng.uniform(0.45, 0.7)), 1.5),
        "round": (0.72, 0.85, 0.8),
        "plate": (0.6, 0.7, 0.8),
        "edema": (0.5, 0.45, 3.0),
        "effusion": (0.56, 0.9, 1.0),
        "pneumothorax": (0.05, 0.95, 0.6),
    }[geom]
    for _side, region in parts:
        soft = np.clip(ndimage.gaussian_filter(region.astype(np.float32), sigma * scale) * 1.2, 0, 1) * alpha
        chest.img[:] = chest.img * (1 - soft) + target * soft
        if geom == "pneumothorax":  # the visceral pleural line
            edge = (
                region
                & ~ndimage.binary_erosion(region, iterations=1)
                & ndimage.binary_dilation(~region & chest.lungs[_side])
            )
            chest.img[edge] += 0.15


def _cxr_overlay(rng: np.random.Generator, chest: _Chest) -> None:
    """Ribs and clavicles, projected over everything (they are in front of and behind the lungs)."""
    X, Y = chest.X, chest.Y
    bands = np.zeros_like(chest.img)
    for medial, lateral in ((0.47, 0.12), (0.53, 0.88)):  # patient right (image left), then left
        span = lateral - medial
        t = (X - medial) / span
        inside = (t >= 0) & (t <= 1)
        for r in range(9):
            y0 = 0.17 + 0.058 * r + float(rng.uniform(-0.005, 0.005))
            curve = y0 - 0.02 * np.sin(np.pi * t) + 0.06 * t
            bands += np.where(inside & (np.abs(Y - curve) < 0.006), 0.07, 0)
        cl = np.abs(Y - (0.15 - 0.05 * t)) < 0.008
        bands += np.where(inside & cl & (t < 0.85), 0.12, 0)
    chest.img += bands * chest.torso


def generate_cxr_case(
    rng: np.random.Generator,
    *,
    width: int = 256,
    height: int = 256,
    kinds: Sequence[str] = CXR_KINDS,
    min_findings: int = 1,
    max_findings: int = 3,
    bilateral_probability: float = 0.2,
) -> CXRPhantom:
    """One PA chest-radiograph-like image with 0–3 findings, in memory (nothing written).

    Each finding's phrase is unique in the image and says the side in the patient's terms (the
    patient's left is on the image's right) and the lung zone (upper / mid / lower third).
    """
    kinds = tuple(kinds)
    bad = sorted(set(kinds) - set(CXR_KINDS))
    if bad:
        raise ConfigError(f"unknown CXR finding kind(s) {bad}; known: {list(CXR_KINDS)}")
    if not 0 <= min_findings <= max_findings or (max_findings > 0 and not kinds):
        raise ConfigError(
            f"need 0 ≤ min_findings ≤ max_findings and some kinds, got {min_findings}, {max_findings}, {kinds}"
        )
    if min(width, height) < 64:
        raise ConfigError(f"CXR image size must be at least 64×64, got {width}×{height}")
    n = min(int(rng.integers(min_findings, max_findings + 1)), len(kinds))
    picked = [kinds[int(k)] for k in rng.permutation(len(kinds))[:n]]
    picked.sort(
        key=lambda k: k not in ("cardiomegaly", "edema")
    )  # fixed-place findings first, the rest around them
    for _ in range(_CXR_ATTEMPTS):
        chest = _cxr_chest(rng, width, height, "cardiomegaly" in picked)
        taken = np.zeros_like(chest.img, dtype=bool)
        findings: list[CXRFinding] = []
        drawn: list[tuple[str, list[tuple[str, np.ndarray]]]] = []
        for kind in picked:
            for _try in range(_CXR_ATTEMPTS):
                bilateral = kind in _CXR_BILATERAL and rng.random() < bilateral_probability
                got = _finding_parts(rng, chest, kind, bilateral)
                if got is None:
                    continue
                parts, side, zone = got
                union = np.logical_or.reduce([m for _, m in parts])
                if np.any(union & taken):
                    continue
                if bilateral:
                    phrase = _CXR_BILATERAL[kind].format(zone=zone)
                else:
                    templates = _CXR_PHRASES[kind]
                    phrase = templates[int(rng.integers(len(templates)))].format(side=side, zone=zone)
                if any(f.phrase == phrase for f in findings):
                    continue
                taken |= union
                boxes = []
                for _s, m in parts:
                    ys, xs = np.nonzero(m)
                    boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
                findings.append(CXRFinding(kind, side, zone, phrase, tuple(boxes)))
                drawn.append((kind, parts))
                break
            else:
                break
        if len(findings) < len(picked):
            continue
        for kind, parts in drawn:
            _render_finding(rng, chest, kind, parts)
        _cxr_overlay(rng, chest)
        img = ndimage.gaussian_filter(chest.img, 0.7 * width / 256)
        img += rng.normal(0, 0.012, img.shape).astype(np.float32)
        pixels = np.clip(np.rint(np.clip(img, 0, 1) * 255), 0, 255).astype(np.uint8)
        return CXRPhantom(pixels, findings)
    raise ConfigError(
        f"could not place findings {picked} in a {width}×{height} image after {_CXR_ATTEMPTS} attempts"
    )


_LAYOUT_KEY = {"mscxr": 1, "chestxray8": 2}
_MSCXR_KINDS = tuple(_MSCXR_CATEGORY)
_CXR8_KINDS = tuple(_CXR8_LABEL)
_CXR8_ORIGINAL = ((2500, 2048, 0.168), (2992, 2991, 0.143), (3056, 2544, 0.139), (2682, 2749, 0.143))


@dataclass(frozen=True)
class CXROptions:
    """How the 2D phantoms are drawn and laid out. Sizes are (width, height) in pixels."""

    kinds: tuple[str, ...] | None = None  # None = every kind the layout has a category for
    min_findings: int = 1
    max_findings: int = 3
    bilateral_probability: float = 0.2
    mscxr_size: tuple[int, int] = (256, 320)  # MIMIC-CXR-JPG images are ~2500–3000 px, portrait
    size_jitter: int = 16  # each MS-CXR image gets its own size, ± this much per axis
    chestxray8_size: int = 256  # the real PNGs are 1024×1024
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)  # MS-CXR train/val/test, by patient
    test_fraction: float = 0.2  # ChestX-ray8 test_list.txt share, by patient
    n_normal: int = 0  # ChestX-ray8: extra "No Finding" images (label file only, no box)
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        if self.kinds is not None:
            object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "mscxr_size", tuple(int(v) for v in self.mscxr_size))
        object.__setattr__(self, "split_fractions", tuple(float(v) for v in self.split_fractions))
        if len(self.mscxr_size) != 2 or min(self.mscxr_size) - abs(self.size_jitter) < 64:
            raise ConfigError(f"mscxr_size must be (width, height) ≥ 64 + size_jitter, got {self.mscxr_size}")
        if self.chestxray8_size < 64:
            raise ConfigError(f"chestxray8_size must be ≥ 64, got {self.chestxray8_size}")
        fr = self.split_fractions
        if len(fr) != 3 or min(fr) < 0 or not math.isclose(sum(fr), 1.0, abs_tol=1e-6) or fr[0] <= 0:
            raise ConfigError(
                f"split_fractions must be 3 non-negative fractions summing to 1 with train > 0, got {fr}"
            )
        if not 0 <= self.test_fraction < 1 or self.n_normal < 0 or not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(
                f"need 0 ≤ test_fraction < 1, n_normal ≥ 0, 1 ≤ jpeg_quality ≤ 100; got {self.test_fraction}, "
                f"{self.n_normal}, {self.jpeg_quality}"
            )
        if not 1 <= self.min_findings <= self.max_findings:
            raise ConfigError(
                f"need 1 ≤ min_findings ≤ max_findings, got {self.min_findings}, {self.max_findings}"
            )

    def layout_kinds(self, layout: str) -> tuple[str, ...]:
        allowed = _MSCXR_KINDS if layout == "mscxr" else _CXR8_KINDS
        if self.kinds is None:
            return allowed
        bad = [k for k in self.kinds if k not in allowed]
        if bad or not self.kinds:
            raise ConfigError(
                f"kinds {bad or list(self.kinds)} have no {layout} category; {layout} allows {list(allowed)}"
            )
        return self.kinds


def _cxr_options(options: dict[str, Any]) -> CXROptions:
    names = {f.name for f in fields(CXROptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(f"unknown CXR phantom option(s) {unknown}; known options: {sorted(names)}")
    return CXROptions(**options)


def _loose_boxes(
    rng: np.random.Generator, finding: CXRFinding, width: int, height: int, integer: bool
) -> list[tuple[float, float, float, float]]:
    """The annotator's (x, y, w, h): the tight box grown a little, inside the image.

    MS-CXR boxes are whole pixels; ChestX-ray8 boxes are floats (steps of 1/8 px, exact in binary,
    so the written text and the truth file agree to the last digit).
    """
    out = []
    for x1, y1, x2, y2 in finding.tight_boxes:
        m = rng.integers(0, 3, 4) if integer else rng.integers(0, 17, 4) / 8.0
        a, b = max(0.0, x1 - m[0]), max(0.0, y1 - m[1])
        c, d = min(float(width), x2 + m[2]), min(float(height), y2 + m[3])
        out.append((a, b, c - a, d - b) if not integer else (int(a), int(b), int(c - a), int(d - b)))
    return out


def _fmt(v: float) -> str:
    return f"{v:.15g}"


def _unique_ids(rng: np.random.Generator, count: int, lo: int, hi: int) -> list[int]:
    seen: set[int] = set()
    out = []
    while len(out) < count:
        v = int(rng.integers(lo, hi))
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def _patients(rng: np.random.Generator, n: int) -> list[int]:
    """Patient index of each of n images: 1 or 2 images per patient."""
    owner, p = [], 0
    while len(owner) < n:
        owner.extend([p] * int(rng.integers(1, 3)))
        p += 1
    return owner[:n]


def _finding_truth(f: CXRFinding, boxes: list[tuple[float, float, float, float]]) -> dict[str, Any]:
    return {
        "kind": f.kind,
        "side": f.side,
        "zone": f.zone,
        "phrase": f.phrase,
        "tight_boxes_xyxy": [list(b) for b in f.tight_boxes],
        "boxes_xywh": [list(b) for b in boxes],
        "boxes_xyxy": [[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in boxes],
    }


def _write_mscxr(out: Path, n: int, seed: int, opts: CXROptions) -> tuple[list[Path], dict[str, Any]]:
    kinds = opts.layout_kinds("mscxr")
    root = np.random.SeedSequence([int(seed), _LAYOUT_KEY["mscxr"]])
    meta_seq, *image_seqs = root.spawn(n + 1)
    meta = np.random.default_rng(meta_seq)
    owner = _patients(meta, n)
    n_patients = owner[-1] + 1
    subjects = _unique_ids(meta, n_patients, 10_000_000, 20_000_000)
    studies = _unique_ids(meta, n, 50_000_000, 60_000_000)
    dicom_ids = ["-".join(f"{int(meta.integers(0, 2**32)):08x}" for _ in range(5)) for _ in range(n)]
    order = meta.permutation(n_patients)
    n_val = round(n_patients * opts.split_fractions[1])
    n_test = round(n_patients * opts.split_fractions[2])
    n_train = max(1, n_patients - n_val - n_test)
    split_of = {}
    for rank, p in enumerate(order.tolist()):
        split_of[p] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    written, rows, images = [], [], {}
    for i, seq in enumerate(image_seqs):
        rng = np.random.default_rng(seq)
        w = opts.mscxr_size[0] + int(rng.integers(-opts.size_jitter, opts.size_jitter + 1))
        h = opts.mscxr_size[1] + int(rng.integers(-opts.size_jitter, opts.size_jitter + 1))
        ph = generate_cxr_case(
            rng,
            width=w,
            height=h,
            kinds=kinds,
            min_findings=opts.min_findings,
            max_findings=opts.max_findings,
            bilateral_probability=opts.bilateral_probability,
        )
        sid = f"{subjects[owner[i]]:08d}"
        rel = f"files/p{sid[:2]}/p{sid}/s{studies[i]:08d}/{dicom_ids[i]}.jpg"
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ph.image).save(path, quality=opts.jpeg_quality)
        written.append(path)
        split = split_of[owner[i]]
        findings = []
        for f in ph.findings:
            boxes = _loose_boxes(rng, f, w, h, integer=True)
            for x, y, bw, bh in boxes:
                rows.append([dicom_ids[i], _MSCXR_CATEGORY[f.kind], f.phrase, rel, x, y, bw, bh, w, h, split])
            findings.append(
                {**_finding_truth(f, boxes), "category_name": _MSCXR_CATEGORY[f.kind], "label_text": f.phrase}
            )
        images[dicom_ids[i]] = {
            "path": rel,
            "width": w,
            "height": h,
            "subject_id": sid,
            "study_id": f"{studies[i]:08d}",
            "split": split,
            "findings": findings,
        }
    csv_path = out / MSCXR_CSV_NAME
    _write_csv(csv_path, MSCXR_COLUMNS, rows)
    written.append(csv_path)
    return written, {"csv": MSCXR_CSV_NAME, "image_root": ".", "images": images}


def _write_chestxray8(out: Path, n: int, seed: int, opts: CXROptions) -> tuple[list[Path], dict[str, Any]]:
    kinds = opts.layout_kinds("chestxray8")
    size = opts.chestxray8_size
    total = n + opts.n_normal
    root = np.random.SeedSequence([int(seed), _LAYOUT_KEY["chestxray8"]])
    meta_seq, *image_seqs = root.spawn(total + 1)
    meta = np.random.default_rng(meta_seq)
    owner = _patients(meta, total)
    n_patients = owner[-1] + 1
    patient_ids = _unique_ids(meta, n_patients, 1, 30806)
    ages = meta.integers(18, 90, n_patients)
    genders = meta.choice(np.array(["M", "F"]), n_patients)
    n_test = min(
        n_patients - 1,
        max(1 if opts.test_fraction > 0 and n_patients > 1 else 0, round(n_patients * opts.test_fraction)),
    )
    test_patients = set(meta.permutation(n_patients)[:n_test].tolist())
    followup: dict[int, int] = {}
    normal = set(meta.permutation(total)[: opts.n_normal].tolist())
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    written, box_rows, entry_rows, images = [], [], [], {}
    lists: dict[str, list[str]] = {"train_val": [], "test": []}
    for i, seq in enumerate(image_seqs):
        rng = np.random.default_rng(seq)
        p = owner[i]
        fu = followup.get(p, -1) + 1 + int(rng.integers(0, 3))
        followup[p] = fu
        index = f"{patient_ids[p]:08d}_{fu:03d}.png"
        if i in normal:
            ph = generate_cxr_case(rng, width=size, height=size, kinds=kinds, min_findings=0, max_findings=0)
        else:
            ph = generate_cxr_case(
                rng,
                width=size,
                height=size,
                kinds=kinds,
                min_findings=opts.min_findings,
                max_findings=opts.max_findings,
                bilateral_probability=opts.bilateral_probability,
            )
        Image.fromarray(ph.image).save(images_dir / index)
        written.append(images_dir / index)
        findings, labels = [], set()
        for f in ph.findings:
            label = _CXR8_LABEL[f.kind]
            boxes = _loose_boxes(rng, f, size, size, integer=False)
            for box in boxes:
                box_rows.append([index, label, *(_fmt(v) for v in box)])
            labels.add(_CXR8_ENTRY_LABEL.get(label, label))
            findings.append({**_finding_truth(f, boxes), "finding_label": label})
        orig_w, orig_h, spacing = _CXR8_ORIGINAL[int(rng.integers(len(_CXR8_ORIGINAL)))]
        view = "PA" if rng.random() < 0.8 else "AP"
        finding_labels = "|".join(sorted(labels)) if labels else "No Finding"
        entry_rows.append(
            [
                index,
                finding_labels,
                fu,
                patient_ids[p],
                int(ages[p]) + fu // 4,
                genders[p],
                view,
                orig_w,
                orig_h,
                spacing,
                spacing,
            ]
        )
        split = "test" if p in test_patients else "train_val"
        lists[split].append(index)
        images[index] = {
            "path": f"images/{index}",
            "width": size,
            "height": size,
            "patient_id": int(patient_ids[p]),
            "split": split,
            "finding_labels": finding_labels,
            "findings": findings,
        }
    bbox_path, entry_path = out / "BBox_List_2017.csv", out / "Data_Entry_2017.csv"
    with bbox_path.open("w", newline="", encoding="utf-8") as fh:
        fh.write(CXR8_BBOX_HEADER + "\n")
        csv.writer(fh, lineterminator="\n").writerows(box_rows)
    with entry_path.open("w", newline="", encoding="utf-8") as fh:
        fh.write(CXR8_DATA_ENTRY_HEADER + "\n")
        csv.writer(fh, lineterminator="\n").writerows(sorted(entry_rows))
    written += [bbox_path, entry_path]
    for name, key in (("train_val_list.txt", "train_val"), ("test_list.txt", "test")):
        (out / name).write_text("".join(f"{v}\n" for v in sorted(lists[key])), encoding="utf-8")
        written.append(out / name)
    return written, {
        "bbox_csv": bbox_path.name,
        "data_entry_csv": entry_path.name,
        "image_root": "images",
        "images": images,
    }


def make_cxr2d(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int,
    layout: Literal["mscxr", "chestxray8", "both"] = "mscxr",
    **options: Any,
) -> list[Path]:
    """Write ``n`` chest-radiograph phantoms in the MS-CXR and/or ChestX-ray8 layout; return the files.

    One layout goes straight into ``out_dir``; ``"both"`` writes ``out_dir/mscxr`` and
    ``out_dir/chestxray8`` (each exactly what a single-layout call with the same seed writes).
    ``options`` are :class:`CXROptions` fields.
    """
    _check_seed(seed, n)
    opts = _cxr_options(options)
    if layout not in ("mscxr", "chestxray8", "both"):
        raise ConfigError(f"layout must be 'mscxr', 'chestxray8' or 'both', got {layout!r}")
    out = Path(out_dir)
    targets = (
        [("mscxr", out / "mscxr"), ("chestxray8", out / "chestxray8")]
        if layout == "both"
        else [(layout, out)]
    )
    written: list[Path] = []
    for name, folder in targets:
        folder.mkdir(parents=True, exist_ok=True)
        writer: Callable[..., tuple[list[Path], dict[str, Any]]] = (
            _write_mscxr if name == "mscxr" else _write_chestxray8
        )
        files, truth = writer(folder, n, seed, opts)
        opts_json = {f.name: getattr(opts, f.name) for f in fields(CXROptions)}
        truth = {
            "generator": "mg3d.data.synthetic.make_cxr2d",
            "kind": "cxr2d",
            "layout": name,
            "seed": int(seed),
            "n": int(n),
            "options": opts_json,
            "box_convention": "pixels, x = column, y = row; boxes_xyxy half-open = [x, y, x + w, y + h]",
            **truth,
        }
        _write_json(folder / TRUTH_NAME, truth)
        written += [*files, folder / TRUTH_NAME]
    return written
