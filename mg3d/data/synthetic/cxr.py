"""Chest-radiograph phantoms in memory: a PA chest with findings, each named by a unique phrase.

Phrases give the side in the patient's terms (the patient's left is on the image's right) and the lung
zone. :func:`generate_cxr_case` writes nothing; :mod:`mg3d.data.synthetic.cxr_layout` writes phantoms in
the MS-CXR and ChestX-ray8 layouts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mg3d.errors import ConfigError

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
MASS_RADIUS = (0.035, 0.055)  # a mass's radius as a fraction of the image width (drawn uniformly)


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
    rng: np.random.Generator,
    chest: _Chest,
    kind: str,
    bilateral: bool,
    mass_radius: tuple[float, float] = MASS_RADIUS,
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
                r = float(rng.uniform(0.012, 0.022) if kind == "nodule" else rng.uniform(*mass_radius))
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
    mass_radius: tuple[float, float] = MASS_RADIUS,
) -> CXRPhantom:
    """One PA chest-radiograph-like image with 0–3 findings, in memory (nothing written).

    Each finding's phrase is unique in the image and says the side in the patient's terms (the
    patient's left is on the image's right) and the lung zone (upper / mid / lower third). ``mass_radius``:
    the range of a mass's radius as a fraction of the width (larger masses make an easier localisation task).
    """
    kinds = tuple(kinds)
    bad = sorted(set(kinds) - set(CXR_KINDS))
    if bad:
        raise ConfigError(f"unknown CXR finding kind(s) {bad}; known: {list(CXR_KINDS)}")
    if not 0 <= min_findings <= max_findings or (max_findings > 0 and not kinds):
        raise ConfigError(
            f"need 0 ≤ min_findings ≤ max_findings and some kinds, got {min_findings}, {max_findings}, {kinds}"
        )
    lo, hi = (float(v) for v in mass_radius)
    if not 0 < lo <= hi <= 0.2:
        raise ConfigError(
            f"mass_radius must be 0 < low ≤ high ≤ 0.2 (fractions of the width), got {mass_radius}"
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
                got = _finding_parts(rng, chest, kind, bilateral, (lo, hi))
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
