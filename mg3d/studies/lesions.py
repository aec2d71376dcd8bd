"""Study scenes: an image with several lesions, a map of normal tissue, and what each lesion is.

Two makers, one result (:class:`Scene`), so the semantic property study builds its misses the same way on
both:

* :func:`phantom_scene` — mg3d's synthetic abdominal CT phantoms (lesions and organs known by construction);
* :func:`real_scene` — a real image (:mod:`~mg3d.studies.real_volumes`) with 2–4 inserted ellipsoid lesions of
  3–10 mm: the image's own texture plus a contrast of ±20–80 HU (CT) or ±15–50 % of the tissue's median
  (MR, scanner units), with Gaussian-smoothed edges, centred in normal tissue.

*Normal tissue* on real images is a single class found from intensities: for CT soft tissue of −20…120 HU;
for MR the foreground between its 25th and 95th percentiles. Voxels of a constant padding region (the flat
outside of a skull-stripped atlas, a scanner's circular field of view) are never tissue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mg3d.boxes import mask_to_box
from mg3d.errors import DataError
from mg3d.rewards.intensity import otsu_threshold, padding_mask
from mg3d.studies.real_volumes import RealVolume

__all__ = ["LesionInserter", "Scene", "SceneLesion", "phantom_scene", "real_scene", "tissue_mask"]

_CT_TISSUE_HU = (-20.0, 120.0)
_MR_TISSUE_QUANTILES = (0.25, 0.95)


@dataclass(frozen=True)
class SceneLesion:
    """One lesion of a scene in the voxel frame: its label, box, centre (voxel-edge coords) and kind."""

    label: int
    box: np.ndarray  # half-open [lo..., hi...]
    centre: np.ndarray  # centroid of its voxels, in voxel-edge coordinates (index + 0.5)
    density: str  # "hypodense" | "hyperdense"
    host: int  # tissue label it sits in
    phrase: str


@dataclass(frozen=True)
class Scene:
    """An image (its source's units) with labelled lesions and a normal-tissue label map (0 = not tissue)."""

    record_id: str
    modality: str
    image: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray | None
    lesion_labels: np.ndarray  # int, 0 = no lesion, i = lesion i
    tissue: np.ndarray  # int, 0 = background (air, fat, bone, padding), > 0 = a normal-tissue class
    lesions: tuple[SceneLesion, ...]

    @property
    def ndim(self) -> int:
        return self.image.ndim


# ---------------------------------------------------------------------------------------------- phantoms


def phantom_scene(rng: np.random.Generator, record_id: str, shape: tuple[int, int, int]) -> Scene:
    """A synthetic CT phantom with 2–4 lesions; normal tissue = the organs (not soft tissue, fat, bone, air)."""
    from mg3d.data.synthetic import ORGAN_LABELS, generate_ct_case

    phantom = generate_ct_case(rng, shape=shape, min_lesions=2, max_lesions=4)
    organs = [v for k, v in ORGAN_LABELS.items() if k not in ("outside", "soft tissue", "fat", "bone")]
    tissue = np.where(np.isin(phantom.anatomy, organs), phantom.anatomy, 0).astype(np.int32)
    lesions = tuple(
        SceneLesion(
            label=r.region_id,
            box=np.asarray(r.box_voxel, dtype=np.float64),
            centre=np.asarray(r.center_voxel, dtype=np.float64) + 0.5,
            density=r.density,
            host=int(ORGAN_LABELS.get(r.site, 0)),
            phrase=r.phrase,
        )
        for r in phantom.regions
    )
    return Scene(
        record_id,
        "CT",
        phantom.volume.astype(np.float32),
        phantom.spacing,
        phantom.affine,
        phantom.mask.astype(np.int32),
        tissue,
        lesions,
    )


# ---------------------------------------------------------------------------------------------- real images


def tissue_mask(volume: RealVolume) -> np.ndarray:
    """Normal soft tissue of a real image (see the module doc), opened once to drop thin strands."""
    img = volume.image
    padding = padding_mask(img)
    if volume.modality == "CT":
        lo, hi = _CT_TISSUE_HU
        mask = (img >= lo) & (img <= hi)
    else:
        body = ~padding & (img > otsu_threshold(img[~padding]))
        lo, hi = np.quantile(img[body], _MR_TISSUE_QUANTILES)
        mask = body & (img >= lo) & (img <= hi)
    mask &= ~padding
    structure = ndimage.generate_binary_structure(img.ndim, 1)
    # an opening whose erosion treats the outside of the array as tissue: a 2-slice volume would lose all
    eroded = ndimage.binary_erosion(mask, structure, border_value=1)
    return ndimage.binary_dilation(eroded, structure) & mask


def _ellipsoid(
    shape: tuple[int, ...], centre: np.ndarray, radii_mm: np.ndarray, spacing: np.ndarray
) -> np.ndarray:
    axes = [(np.arange(n) + 0.5 - c) * s / r for n, c, s, r in zip(shape, centre, spacing, radii_mm)]
    grids = np.meshgrid(*axes, indexing="ij", sparse=True)
    return sum(g**2 for g in grids) <= 1.0


class LesionInserter:
    """Inserts 2–4 lesions of both densities (each drawn independently, 50/50) into one real image.

    Lesion centres lie in normal tissue at least a radius + 1 mm from its edge and lesions keep a gap of a
    diameter between them. The tissue mask and its depth map are computed once per image, here.
    """

    def __init__(
        self,
        volume: RealVolume,
        *,
        n_lesions: tuple[int, int] = (2, 4),
        diameter_mm: tuple[float, float] = (3.0, 10.0),
        contrast_hu: tuple[float, float] = (20.0, 80.0),
        contrast_fraction: tuple[float, float] = (0.15, 0.5),
        edge_mm: float = 0.7,
        attempts: int = 50,
    ) -> None:
        self.volume = volume
        self.tissue = tissue_mask(volume)
        self.spacing = np.asarray(volume.spacing, dtype=np.float64)
        depth = ndimage.distance_transform_edt(self.tissue, sampling=self.spacing).reshape(-1)
        order = np.flatnonzero(depth > 0)
        order = order[np.argsort(depth[order])]
        self._by_depth, self._depths = order, depth[order]  # tissue voxels, shallowest first
        tissue = self.tissue
        self.scale = (
            None if volume.modality == "CT" or not tissue.any() else float(np.median(volume.image[tissue]))
        )
        self.n_lesions, self.diameter_mm = n_lesions, diameter_mm
        self.contrast_hu, self.contrast_fraction = contrast_hu, contrast_fraction
        self.edge_mm, self.attempts = edge_mm, attempts

    def _centre(self, rng: np.random.Generator, radius: float) -> np.ndarray | None:
        first = int(np.searchsorted(self._depths, radius + 1.0))
        if first >= self._depths.size:
            return None
        flat = self._by_depth[first + rng.integers(self._depths.size - first)]
        return np.asarray(np.unravel_index(flat, self.tissue.shape), dtype=np.float64) + 0.5

    def __call__(self, rng: np.random.Generator, record_id: str) -> Scene:
        volume, spacing, edge = self.volume, self.spacing, self.edge_mm
        shape = volume.image.shape
        image = volume.image.astype(np.float32).copy()
        labels = np.zeros(shape, dtype=np.int32)
        lesions: list[SceneLesion] = []
        n = int(rng.integers(self.n_lesions[0], self.n_lesions[1] + 1))
        for _ in range(self.attempts):
            if len(lesions) == n:
                break
            radius = float(rng.uniform(*self.diameter_mm)) / 2
            centre = self._centre(rng, radius)
            if centre is None or any(
                np.linalg.norm((centre - les.centre) * spacing) < 2 * (radius + self.diameter_mm[1] / 2)
                for les in lesions
            ):
                continue
            radii = radius * rng.uniform(0.8, 1.2, len(shape))
            # work in a window around the lesion: the whole image would cost a full-size filter per lesion
            reach = np.ceil((radii.max() * 1.2 + 4 * edge) / spacing).astype(int) + 1
            lo = np.maximum(np.floor(centre).astype(int) - reach, 0)
            hi = np.minimum(np.floor(centre).astype(int) + reach + 1, shape)
            window = tuple(slice(a, b) for a, b in zip(lo, hi))
            core = _ellipsoid(tuple(hi - lo), centre - lo, radii, spacing)
            soft = ndimage.gaussian_filter(core.astype(np.float32), sigma=edge / spacing, mode="constant")
            solid = soft >= 0.5
            if not solid.any() or (labels[window][solid] > 0).any():
                continue
            sign = 1.0 if rng.random() < 0.5 else -1.0
            if self.scale is None:
                delta = float(rng.uniform(*self.contrast_hu))
            else:
                delta = float(rng.uniform(*self.contrast_fraction)) * self.scale
            image[window] += np.float32(sign * delta) * soft
            label = len(lesions) + 1
            labels[window][solid] = label
            density = "hyperdense" if sign > 0 else "hypodense"
            lesions.append(
                SceneLesion(
                    label=label,
                    box=mask_to_box(solid).astype(np.float64) + np.tile(lo, 2),
                    centre=np.asarray(ndimage.center_of_mass(solid), dtype=np.float64) + 0.5 + lo,
                    density=density,
                    host=1,
                    phrase=f"the {density} lesion",
                )
            )
        if len(lesions) < 2:
            raise DataError(f"{volume.name}: could not place two lesions in its normal tissue ({record_id})")
        return Scene(
            record_id,
            volume.modality,
            image,
            tuple(float(v) for v in spacing),
            volume.affine,
            labels,
            self.tissue.astype(np.int32),
            tuple(lesions),
        )


def real_scene(rng: np.random.Generator, volume: RealVolume, record_id: str, **options: object) -> Scene:
    """One scene of ``volume`` with inserted lesions (:class:`LesionInserter` options)."""
    return LesionInserter(volume, **options)(rng, record_id)  # type: ignore[arg-type]
