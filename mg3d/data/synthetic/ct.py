"""CT phantoms in memory: lesions placed in the anatomy, measured from their masks, named by a unique phrase.

A phantom is built in patient terms and stored in the orientation of a real, non-identity affine, so "left"
in a phrase is only right if it is derived from the affine (nibabel's RAS+ world: +x points to the patient's
*right*, so a smaller world x is further to the patient's left). :func:`generate_ct_case` writes nothing;
:mod:`mg3d.data.synthetic.ct_layout` writes phantoms in the M3D-RefSeg layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.affines import apply_affine
from scipy import ndimage
from scipy.spatial.transform import Rotation

from mg3d.data.synthetic.ct_anatomy import (
    _BODY_RADII,
    _BONE_HU,
    _HU_MAX,
    _HU_MIN,
    _ORGAN_HU,
    ANATOMIES,
    ORGAN_LABELS,
    _Anatomy,
    _check_orientation,
    _draw_anatomy,
    _Grid,
)
from mg3d.errors import ConfigError

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


# Margins that make a referring phrase unambiguous (a reader could tell the lesions apart).
_SIDE_MARGIN_MM = 5.0  # |x - midline| below this is "midline"
_EXTREME_MARGIN_MM = 8.0  # leftmost / most superior must beat the runner-up by this much
_SIZE_RATIO = 1.5  # largest / smallest: volume ratio to the runner-up
_HU_MARGIN = 40.0  # brightest / darkest: mean HU difference to the runner-up
_GAP_VOXELS = 2  # free voxels between two lesions, so each mask label is one clean blob
_PLACEMENTS = ("anatomy", "anywhere")
_DENSITIES = ("any", "hyperdense")
_ANYWHERE_CONTRAST_HU = (150.0, 300.0)  # lesion_placement="anywhere" without lesion_contrast_hu
_CASE_ATTEMPTS = 40
_LESION_ATTEMPTS = 60


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

    ``lesion_placement``: ``"anatomy"`` (default) puts each lesion in an organ drawn by site weight (liver,
    lungs, spleen, next to a kidney, body-wall soft tissue), so lesion positions cluster and a fixed box
    already scores well; ``"anywhere"`` puts its centre uniformly at random inside the body, whatever the
    tissue, so no box fixed in advance does well and a model has to look (the CPU demo). A lesion placed
    anywhere is its host tissue's HU ∓ a contrast from ``lesion_contrast_hu`` (default
    ``_ANYWHERE_CONTRAST_HU``), hyperdense in lung and air, where darker would be invisible.
    ``"anatomy"`` keeps the phantoms bit-identical to earlier versions.

    ``lesion_density``: ``"any"`` (default) draws hypo- or hyperdense as the site allows; ``"hyperdense"``
    makes every lesion brighter than its host tissue, so the one thing to find is a bright blob.

    ``anatomy``: ``"full"`` (default) draws lungs, heart, liver, spleen, kidneys and spine; ``"soft_tissue"``
    only the body outline (a ring of subcutaneous fat around soft tissue), with ``lesion_placement="anywhere"``.
    The CPU demo uses it: with lungs and spine in the field of view the 3.3 M-parameter policy did not learn to
    find a 3-6 mm lesion placed anywhere within its budget; in a soft-tissue body it does
    (docs/benchmarks.md, "A demo task that needs the image").
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
    lesion_placement: str = "anatomy"
    lesion_density: str = "any"
    anatomy: str = "full"
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
        if self.lesion_placement not in _PLACEMENTS:
            raise ConfigError(
                f"lesion_placement must be one of {list(_PLACEMENTS)}, got {self.lesion_placement!r}"
            )
        if self.anatomy not in ANATOMIES:
            raise ConfigError(f"anatomy must be one of {list(ANATOMIES)}, got {self.anatomy!r}")
        if self.anatomy != "full" and self.lesion_placement != "anywhere":
            raise ConfigError(
                f"anatomy={self.anatomy!r} has no organs to put lesions in: it needs lesion_placement='anywhere'"
            )
        if self.lesion_density not in _DENSITIES:
            raise ConfigError(
                f"lesion_density must be one of {list(_DENSITIES)}, got {self.lesion_density!r}"
            )
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


def _centre_anywhere(rng: np.random.Generator, grid: _Grid, anatomy: _Anatomy) -> tuple[np.ndarray, str]:
    """A centre (mm offset from the volume centre, RAS) drawn uniformly over the body's voxels, and the name
    of the tissue it lands in (the lesion's host)."""
    body = np.flatnonzero(anatomy.labels > 0)
    flat = int(body[int(rng.integers(len(body)))])
    idx = np.asarray(np.unravel_index(flat, grid.shape), dtype=float) + rng.uniform(-0.5, 0.5, 3)
    label = int(anatomy.labels.flat[flat])
    host = next(name for name, value in ORGAN_LABELS.items() if value == label)
    return (idx - (np.asarray(grid.shape) - 1) / 2) * grid.spacing, host


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


def _anywhere_hu(
    rng: np.random.Generator, host: str, contrast: tuple[float, float], density_rule: str
) -> tuple[str, float]:
    """Density and HU of a lesion placed anywhere: its host tissue's HU ∓ a drawn contrast; always hyperdense
    in lung or air (nothing is darker than air on CT) and under ``density_rule="hyperdense"``."""
    host_hu = _ORGAN_HU.get(ORGAN_LABELS[host], _BONE_HU)
    dark_ok = host_hu > -500 and density_rule == "any"
    density = "hypodense" if dark_ok and rng.random() < 0.5 else "hyperdense"
    delta = float(rng.uniform(*contrast))
    return density, host_hu - delta if density == "hypodense" else host_hu + delta


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
    anywhere = opts.lesion_placement == "anywhere"
    for rid in range(1, n + 1):
        for _ in range(_LESION_ATTEMPTS):
            if anywhere:
                centre, site = _centre_anywhere(rng, grid, anatomy)
            else:
                site = names[rng.choice(len(names), p=weights / weights.sum())]
                centre = _lesion_centre(rng, grid, anatomy, site)
            if centre is None:
                continue
            cap = hi_r
            if not anywhere and site != "soft tissue" and "kidney" not in site:
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
            if anywhere:
                contrast = opts.lesion_contrast_hu or _ANYWHERE_CONTRAST_HU
                density, hu = _anywhere_hu(rng, site, contrast, opts.lesion_density)
            else:
                density_choices = list(_SITES[site]["hu"])
                density = density_choices[int(rng.integers(len(density_choices)))]
                if opts.lesion_density != "any":  # after the draw: the random stream stays that of "any"
                    density = opts.lesion_density
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
    anatomy = _draw_anatomy(rng, grid, opts.anatomy)
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
