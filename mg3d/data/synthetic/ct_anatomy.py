"""The body a CT phantom's lesions sit in: organ label map, tissue HU, and the grid it is built on.

The anatomy is drawn on a canonical RAS-index grid (axis 0 → patient right, 1 → anterior, 2 → superior)
and then stored in the orientation of a real, non-identity affine (:func:`orientation_affine`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

from mg3d.errors import ConfigError

if TYPE_CHECKING:
    from mg3d.data.synthetic.ct import CTOptions

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


#: ``CTOptions.anatomy`` values: every organ, or only the body outline (subcutaneous fat around soft tissue)
ANATOMIES = ("full", "soft_tissue")


def _draw_anatomy(rng: np.random.Generator, grid: _Grid, anatomy: str = "full") -> _Anatomy:
    """The body: ``"full"`` draws lungs, heart, abdominal organs and spine; ``"soft_tissue"`` stops after the
    body outline (fat ring around soft tissue), so a lesion is the one structure inside it."""
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
    if anatomy == "soft_tissue":
        lut = np.array([_ORGAN_HU.get(k, _BONE_HU) for k in range(11)], np.float32)
        lut[:10] += rng.uniform(-5, 5, 10).astype(np.float32) * (np.arange(10) > 0)
        return _Anatomy(labels, lut[labels], organs)
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
