"""Pictures of what a grounding model did: box overlays (2D and 3D), a best/median/worst gallery, training curves.

(About 750 lines in one file: the three kinds of picture share the panel, colour and display-orientation
conventions below.)

Overlays are drawn in the **voxel frame** of the stored image (DESIGN.md §2): a 2D image ``(X, Y)`` is shown
with x = column and y = row (as MONAI loads it, transposed for display); a volume ``(X, Y, Z)`` gets four
panels — the axial slice (x →, y ↓), the coronal (x →, z ↑) and sagittal (y →, z ↑) slices through the
target's centre, and a maximum-intensity projection along z (x →, y ↓). Every box is drawn as its
projection on the panel's plane: ground truth green, prediction red, Chain-of-Box boxes from ``<think>``
dashed orange.

The pixel layout is exact and returned (:class:`OverlayLayout`): panels sit at integer pixel rectangles and
voxel-edge coordinate ``e`` lands at ``left + e · width / extent``, so tests and scripts can find a box's
pixels in the PNG. Figures are built with matplotlib's object API on the Agg canvas (no pyplot, no global
state), at a power-of-two DPI so that the PNG has exactly the layout's size.
"""

from __future__ import annotations

import csv
import math
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mg3d.errors import ConfigError, DataError

try:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
except ImportError as _err:  # pragma: no cover - exercised only where matplotlib is missing
    raise ImportError("mg3d.viz needs matplotlib: pip install 'matplotlib>=3.8'") from _err

__all__ = [
    "CURVE_GROUPS",
    "GT_COLOR",
    "PRED_COLOR",
    "THINK_COLOR",
    "OverlayLayout",
    "Panel",
    "curve_columns",
    "display_axes",
    "load_image_array",
    "overlay_2d",
    "overlay_3d",
    "overlay_prediction",
    "overlay_scored",
    "plot_training_curves",
    "select_cases",
    "write_gallery",
]

GT_COLOR = (0.0, 1.0, 0.0)
PRED_COLOR = (1.0, 0.0, 0.0)
THINK_COLOR = (1.0, 0.6, 0.0)
DPI = 128  # a power of two: inches × DPI is exact, so the PNG has exactly the layout's pixel size
LINE_PX = 3.0
THINK_LINE_PX = 2.0
FONT_PT = 9.0
_LINE_H = 18  # pixels per header text line at FONT_PT
_LABEL_H = 18  # pixels of the label band above each 3D panel
_GAP = 6


# ----------------------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Panel:
    """One image panel: its pixel rectangle in the PNG and the voxel axes it shows."""

    name: str
    left: int
    top: int
    width: int
    height: int
    extent: tuple[float, float]  # voxel-edge size along (columns, rows)
    axes: tuple[int, int]  # voxel axes shown as (columns, rows)
    rows_up: bool  # True: the row axis increases upwards
    label: str = ""

    def to_pixel(self, u: float, v: float) -> tuple[float, float]:
        """Voxel-edge coordinates (along ``axes``) → ``(column, row)`` pixel coordinates in the PNG."""
        col = self.left + u * self.width / self.extent[0]
        vv = self.extent[1] - v if self.rows_up else v
        return col, self.top + vv * self.height / self.extent[1]


@dataclass(frozen=True)
class OverlayLayout:
    """Where everything is in a saved overlay PNG."""

    path: Path
    width: int
    height: int
    header: int
    panels: tuple[Panel, ...]

    def panel(self, name: str) -> Panel:
        for p in self.panels:
            if p.name == name:
                return p
        raise ConfigError(f"no panel {name!r} in this overlay; panels: {[p.name for p in self.panels]}")


def _figure(width: int, height: int) -> Figure:
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="black")
    FigureCanvasAgg(fig)
    return fig


def _window(data: np.ndarray, window: Sequence[float] | None) -> tuple[float, float]:
    if window is not None:
        lo, hi = (float(v) for v in window)
        if not hi > lo:
            raise ConfigError(f"display window {list(window)!r} must have high > low")
        return lo, hi
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _draw_panel(
    fig: Figure, layout_wh: tuple[int, int], panel: Panel, plane: np.ndarray, vmin: float, vmax: float
):
    """Put ``plane`` (indexed ``[column axis, row axis]``) into the panel's rectangle; returns the Axes."""
    width, height = layout_wh
    rect = (
        panel.left / width,
        1.0 - (panel.top + panel.height) / height,
        panel.width / width,
        panel.height / height,
    )
    ax = fig.add_axes(rect)
    ax.set_axis_off()
    u, v = panel.extent
    if panel.rows_up:
        ax.imshow(
            plane.T,
            cmap="gray",
            vmin=vmin,
            vmax=vmax,
            origin="lower",
            extent=(0, u, 0, v),
            aspect="auto",
            interpolation="nearest",
        )
        ax.set_ylim(0, v)
    else:
        ax.imshow(
            plane.T,
            cmap="gray",
            vmin=vmin,
            vmax=vmax,
            origin="upper",
            extent=(0, u, v, 0),
            aspect="auto",
            interpolation="nearest",
        )
        ax.set_ylim(v, 0)
    ax.set_xlim(0, u)
    if panel.label:
        fig.text(
            (panel.left + 2) / width,
            1.0 - (panel.top - 3) / height,
            panel.label,
            color="white",
            fontsize=FONT_PT - 1,
            va="bottom",
            ha="left",
        )
    return ax


def _rect(ax: Any, box2: Sequence[float], color: tuple[float, float, float], dashed: bool) -> None:
    u1, v1, u2, v2 = (float(b) for b in box2)
    lw = (THINK_LINE_PX if dashed else LINE_PX) * 72.0 / DPI
    ax.add_patch(
        Rectangle(
            (u1, v1),
            u2 - u1,
            v2 - v1,
            fill=False,
            edgecolor=color,
            linewidth=lw,
            linestyle=(0, (4, 3)) if dashed else "solid",
        )
    )


def _draw_boxes(
    ax: Any,
    axes: tuple[int, int],
    ndim: int,
    gt_boxes: np.ndarray,
    pred_box: np.ndarray | None,
    think_boxes: np.ndarray,
) -> None:
    a, b = axes

    def proj(box: np.ndarray) -> tuple[float, float, float, float]:
        return box[a], box[b], box[a + ndim], box[b + ndim]

    for box in think_boxes:
        _rect(ax, proj(box), THINK_COLOR, dashed=True)
    for box in gt_boxes:
        _rect(ax, proj(box), GT_COLOR, dashed=False)
    if pred_box is not None:
        _rect(ax, proj(pred_box), PRED_COLOR, dashed=False)


def _header(fig: Figure, width: int, height: int, lines: Sequence[str], n_bright: int) -> None:
    """The phrase (first ``n_bright`` lines, white), then the caption and legend (grey)."""
    for i, line in enumerate(lines):
        fig.text(
            6 / width,
            1.0 - (4 + i * _LINE_H) / height,
            line,
            color="white" if i < n_bright else (0.8, 0.8, 0.8),
            fontsize=FONT_PT,
            va="top",
            ha="left",
        )


def _header_lines(phrase: str, caption: str | None, width: int) -> tuple[list[str], int]:
    chars = max(20, int(width / (FONT_PT * DPI / 72.0 * 0.55)))
    lines = textwrap.wrap(" ".join(str(phrase).split()), chars)[:3] or [""]
    n_phrase = len(lines)
    if caption:
        lines.append(caption)
    return lines + textwrap.wrap("GT green · prediction red · Chain-of-Box dashed orange", chars), n_phrase


def _as_spatial(data: Any, ndim: int, what: str) -> np.ndarray:
    arr = np.asarray(data.detach().cpu().numpy() if hasattr(data, "detach") else data, dtype=np.float64)
    if arr.ndim == ndim + 1 and arr.shape[0] <= 4:
        arr = arr.mean(axis=0)
    if arr.ndim != ndim or min(arr.shape) < 1:
        raise DataError(f"{what}: expected a {ndim}D array (optionally channel-first), got shape {arr.shape}")
    return arr


def _boxes(boxes: Any, ndim: int, what: str) -> np.ndarray:
    if boxes is None:
        return np.zeros((0, 2 * ndim))
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2 * ndim))
    arr = np.atleast_2d(arr)
    if arr.shape[1] != 2 * ndim or not np.all(np.isfinite(arr)):
        raise DataError(f"{what}: expected finite {2 * ndim}-number boxes, got {arr.tolist()!r:.120}")
    return arr


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, facecolor=fig.get_facecolor())
    return out


# ----------------------------------------------------------------------------------------------------------
# Overlays
# ----------------------------------------------------------------------------------------------------------


def overlay_2d(
    image: Any,
    path: str | os.PathLike[str],
    *,
    gt_boxes: Any = None,
    pred_box: Sequence[float] | None = None,
    think_boxes: Any = None,
    phrase: str = "",
    caption: str | None = None,
    size: int = 512,
    window: Sequence[float] | None = None,
) -> OverlayLayout:
    """A 2D image ``(X, Y)`` (or ``(C, X, Y)``) with its boxes, the phrase on top; returns the pixel layout.

    ``size`` is the long side of the image panel in pixels (the image is scaled, nearest neighbour).
    """
    img = _as_spatial(image, 2, "overlay_2d image")
    gts = _boxes(gt_boxes, 2, "overlay_2d gt_boxes")
    think = _boxes(think_boxes, 2, "overlay_2d think_boxes")
    pred = None if pred_box is None else _boxes(pred_box, 2, "overlay_2d pred_box")[0]
    nx, ny = img.shape
    scale = size / max(nx, ny)
    pw, ph = max(1, round(nx * scale)), max(1, round(ny * scale))
    width = pw
    lines, n_phrase = _header_lines(phrase, caption, width)
    header = 8 + _LINE_H * len(lines)
    height = header + ph
    panel = Panel("image", 0, header, pw, ph, (float(nx), float(ny)), (0, 1), False)
    fig = _figure(width, height)
    vmin, vmax = _window(img, window)
    ax = _draw_panel(fig, (width, height), panel, img, vmin, vmax)
    _draw_boxes(ax, (0, 1), 2, gts, pred, think)
    _header(fig, width, height, lines, n_phrase)
    out = _save(fig, path)
    return OverlayLayout(out, width, height, header, (panel,))


def _center_index(
    center: Sequence[float] | None, boxes: Sequence[np.ndarray | None], shape: Sequence[int]
) -> list[int]:
    if center is None:
        src = next((b for b in boxes if b is not None and len(b)), None)
        if src is None:
            c = [n / 2.0 for n in shape]
        else:
            box = np.atleast_2d(src)[0]
            c = [(box[a] + box[a + 3]) / 2.0 for a in range(3)]
    else:
        c = [float(v) for v in center]
    return [int(min(max(math.floor(v), 0), n - 1)) for v, n in zip(c, shape)]


def overlay_3d(
    volume: Any,
    path: str | os.PathLike[str],
    *,
    gt_boxes: Any = None,
    pred_box: Sequence[float] | None = None,
    think_boxes: Any = None,
    phrase: str = "",
    caption: str | None = None,
    spacing: Sequence[float] | None = None,
    center: Sequence[float] | None = None,
    size: int = 320,
    window: Sequence[float] | None = None,
    affine: Any = None,
) -> OverlayLayout:
    """Axial, coronal, sagittal slices through the target centre and a z-MIP of a volume ``(X, Y, Z)``.

    The slices go through ``center`` (voxel-edge coordinates), by default the centre of the first ground-truth
    box (else of the prediction). ``spacing`` (mm per voxel along x, y, z of the *stored* volume) sets the pixel
    aspect; ``size`` is the longest physical side in pixels. With the stored ``affine`` the volume and its boxes
    are turned to radiological display orientation (:func:`display_axes`: axial with patient left on the image
    right and anterior up, coronal and sagittal with superior up) and each panel edge is labelled R/L, A/P, S/I;
    the returned layout then describes the turned volume. Without it the stored voxel order is drawn, unlabelled.
    """
    vol = _as_spatial(volume, 3, "overlay_3d volume")
    gts = _boxes(gt_boxes, 3, "overlay_3d gt_boxes")
    think = _boxes(think_boxes, 3, "overlay_3d think_boxes")
    pred = None if pred_box is None else _boxes(pred_box, 3, "overlay_3d pred_box")[0]
    sp = np.ones(3) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise DataError(f"overlay_3d: spacing {spacing!r} must be three positive numbers")
    edges: dict[str, tuple[str, str, str, str]] = {}
    if affine is not None:
        perm, flips = display_axes(affine)
        shape = vol.shape
        vol = _turn_volume(vol, perm, flips)
        gts, think = _turn_boxes(gts, perm, flips, shape), _turn_boxes(think, perm, flips, shape)
        pred = None if pred is None else _turn_boxes(pred[None], perm, flips, shape)[0]
        sp = sp[perm]
        if center is not None:
            center = [shape[a] - center[a] if f else center[a] for a, f in zip(perm, flips)]
        edges = _EDGE_LABELS
    nx, ny, nz = vol.shape
    phys = np.asarray(vol.shape) * sp / sp.min()
    k = size / phys.max() * sp / sp.min()  # pixels per voxel along x, y, z
    wx, wy, hz = max(1, round(nx * k[0])), max(1, round(ny * k[1])), max(1, round(nz * k[2]))
    cx, cy, cz = _center_index(center, [gts, pred], vol.shape)
    col2 = max(wx, wy)
    width = 3 * _GAP + wx + col2
    lines, n_phrase = _header_lines(phrase, caption, width)
    header = 8 + _LINE_H * len(lines)
    top1 = header + _LABEL_H
    top2 = top1 + wy + _GAP + _LABEL_H
    height = top2 + hz + _GAP
    left2 = 2 * _GAP + wx
    panels = (
        Panel("axial", _GAP, top1, wx, wy, (float(nx), float(ny)), (0, 1), False, f"axial z={cz}"),
        Panel("mip", left2, top1, wx, wy, (float(nx), float(ny)), (0, 1), False, "MIP along z"),
        Panel("coronal", _GAP, top2, wx, hz, (float(nx), float(nz)), (0, 2), True, f"coronal y={cy} (z up)"),
        Panel(
            "sagittal", left2, top2, wy, hz, (float(ny), float(nz)), (1, 2), True, f"sagittal x={cx} (z up)"
        ),
    )
    planes = {
        "axial": vol[:, :, cz],
        "mip": vol.max(axis=2),
        "coronal": vol[:, cy, :],
        "sagittal": vol[cx, :, :],
    }
    fig = _figure(width, height)
    vmin, vmax = _window(vol, window)
    for panel in panels:
        ax = _draw_panel(fig, (width, height), panel, planes[panel.name], vmin, vmax)
        _draw_boxes(ax, panel.axes, 3, gts, pred, think)
        if panel.name in edges:
            _edge_labels(ax, edges[panel.name])
    _header(fig, width, height, lines, n_phrase)
    out = _save(fig, path)
    return OverlayLayout(out, width, height, header, panels)


#: Display orientation of the 3D pictures: x → patient left, y → posterior, z → superior (the pipelines' LPS).
_DISPLAY = "LPS"
_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
#: (left, right, top, bottom) edge letters of each panel of the LPS-turned volume (axial: y down, z up elsewhere)
_EDGE_LABELS = {
    "axial": ("R", "L", "A", "P"),
    "mip": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}


def display_axes(affine: Any) -> tuple[list[int], list[bool]]:
    """Stored axis and flip for each display axis (L, P, S) of a volume with this (RAS) affine."""
    import nibabel as nib

    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise DataError(f"a 3D picture's affine must be a finite 4×4 matrix, got shape {aff.shape}")
    codes = nib.aff2axcodes(aff)
    perm: list[int] = []
    flips: list[bool] = []
    for want in _DISPLAY:
        axis = next((a for a, c in enumerate(codes) if c in (want, _OPPOSITE[want])), None)
        if axis is None or axis in perm:
            raise DataError(f"affine axis codes {codes} do not name each of L/R, A/P, S/I once")
        perm.append(axis)
        flips.append(codes[axis] != want)
    return perm, flips


def _turn_volume(vol: np.ndarray, perm: Sequence[int], flips: Sequence[bool]) -> np.ndarray:
    out = np.transpose(vol, perm)
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis=axis)
    return np.ascontiguousarray(out)


def _turn_boxes(
    boxes: np.ndarray, perm: Sequence[int], flips: Sequence[bool], shape: Sequence[int]
) -> np.ndarray:
    """Voxel-edge boxes of the stored volume → boxes of the turned one (exact: axis permutations and flips)."""
    if boxes is None or not len(boxes):
        return boxes
    lo, hi = boxes[:, :3][:, perm], boxes[:, 3:][:, perm]
    for axis, (src, flip) in enumerate(zip(perm, flips)):
        if flip:
            lo[:, axis], hi[:, axis] = shape[src] - hi[:, axis], shape[src] - lo[:, axis]
    return np.concatenate([lo, hi], axis=1)


def _edge_labels(ax: Any, letters: tuple[str, str, str, str]) -> None:
    style = {"color": "yellow", "fontsize": FONT_PT, "fontweight": "bold", "transform": ax.transAxes}
    left, right, top, bottom = letters
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def load_image_array(path: str | os.PathLike[str], ndim: int) -> np.ndarray:
    """The stored image in the voxel frame, channels averaged: ``(X, Y)`` or ``(X, Y, Z)``.

    MONAI's ``LoadImage`` reads it exactly as the data pipelines do (x-first for PNG/JPEG, the file's i, j, k
    for volumes); DICOM series folders and MetaImage/NRRD go through mg3d's SimpleITK reader; M3D's ``.npy``
    arrays (``1 × D × H × W``) are read with numpy.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"image {p} does not exist")
    if p.suffix == ".npy":
        arr = np.load(p, allow_pickle=False)
    else:
        from monai.data import MetaTensor, NibabelReader, PILReader, PydicomReader
        from monai.transforms import EnsureChannelFirst, LoadImage

        from mg3d.data.readers import SUFFIXES, SimpleITKReader, is_dicom_series_dir

        name = p.name.lower()
        reader: Any = None
        if is_dicom_series_dir(p) or name.endswith(SUFFIXES):
            reader = SimpleITKReader()
        elif name.endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")):
            reader = PILReader()
        elif name.endswith((".nii", ".nii.gz")):
            reader = NibabelReader()
        elif name.endswith(".dcm"):
            reader = PydicomReader()
        if reader is None:
            arr = np.asarray(LoadImage(image_only=True, ensure_channel_first=True)(str(p)))
        else:
            # One known reader instead of LoadImage, which instantiates (and warns about) every backend.
            data, meta = reader.get_data(reader.read(str(p)))
            arr = np.asarray(EnsureChannelFirst()(MetaTensor(np.array(data), meta=meta)))
    return _as_spatial(arr, ndim, f"image {p}")


def _resolve(image: str | None, image_root: str | os.PathLike[str] | None, rid: str) -> Path:
    if not image:
        raise DataError(f"prediction {rid!r}: no image path to draw")
    p = Path(image)
    if not p.is_absolute() and image_root is not None:
        p = Path(image_root) / p
    if not p.exists():
        raise DataError(f"prediction {rid!r}: image {p} does not exist")
    return p


def overlay_scored(
    row: Any,
    path: str | os.PathLike[str],
    *,
    image: Any = None,
    image_root: str | os.PathLike[str] | None = None,
    window: Sequence[float] | None = None,
) -> OverlayLayout:
    """Overlay of one :class:`~mg3d.evaluation.ScoredPrediction` (voxel-frame boxes); loads its image if needed."""
    item = row.item
    if image is None:
        image = load_image_array(_resolve(item.image, image_root, item.id), item.ndim)
    caption = f"IoU {row.iou:.3f} · {row.parse_status}"
    phrase = item.phrase or item.id
    kwargs = {
        "gt_boxes": item.gt_boxes,
        "pred_box": row.box_voxel,
        "think_boxes": row.think_boxes_voxel,
        "phrase": phrase,
        "caption": caption,
        "window": window,
    }
    if item.ndim == 2:
        return overlay_2d(image, path, **kwargs)
    gts = np.asarray(item.gt_boxes, dtype=np.float64)
    target = gts[row.best_gt]
    center = [(target[a] + target[a + 3]) / 2.0 for a in range(3)]
    spacing = item.spacing
    if item.affine is not None:  # the stored frame's own voxel size (rows once carried the model grid's)
        spacing = tuple(
            float(v) for v in np.linalg.norm(np.asarray(item.affine, dtype=np.float64)[:3, :3], axis=0)
        )
    return overlay_3d(image, path, spacing=spacing, center=center, affine=item.affine, **kwargs)


def overlay_prediction(
    pred: Any, path: str | os.PathLike[str], *, window: Sequence[float] | None = None
) -> OverlayLayout:
    """Overlay of one Grounder / bundle prediction (:class:`mg3d.predictions.Prediction`) on its stored image:
    the predicted box red, ground truth (records only) green, 3D volumes turned to display orientation and
    labelled through the stored affine."""
    image = load_image_array(_resolve(pred.image, None, pred.id), pred.ndim)
    kwargs = {"gt_boxes": list(pred.gt_boxes) or None, "pred_box": pred.box_voxel, "phrase": pred.text,
              "caption": f"{pred.modality} · {pred.parsed.status.value}", "window": window}  # fmt: skip
    if pred.ndim == 2:
        return overlay_2d(image, path, **kwargs)
    return overlay_3d(image, path, spacing=pred.spacing, affine=pred.affine, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Gallery
# ----------------------------------------------------------------------------------------------------------


def select_cases(rows: Sequence[Any], k: int) -> dict[str, list[Any]]:
    """Best, median and worst ``k`` rows by IoU (ties by id); a row appears in one tier only."""
    if k < 1:
        raise ConfigError(f"gallery size k must be ≥ 1, got {k}")
    ordered = sorted(rows, key=lambda r: (r.iou, r.id))
    n = len(ordered)
    mid = max(0, n // 2 - k // 2)
    picks = {
        "best": list(reversed(ordered[-k:])),
        "median": ordered[mid : mid + k],
        "worst": ordered[:k],
    }
    used: set[int] = set()
    out: dict[str, list[Any]] = {}
    for tier in ("best", "median", "worst"):
        out[tier] = [r for r in picks[tier] if id(r) not in used]
        used.update(id(r) for r in out[tier])
    return out


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "case"


def _box_text(box: Sequence[float] | None) -> str:
    return "none" if box is None else "[" + ", ".join(f"{v:g}" for v in box) + "]"


def write_gallery(
    rows: Sequence[Any],
    out_dir: str | os.PathLike[str],
    *,
    k: int = 3,
    metrics: Mapping[str, Any] | None = None,
    image_root: str | os.PathLike[str] | None = None,
    window: Sequence[float] | None = None,
) -> Path:
    """Overlays of the best, median and worst ``k`` predictions and a ``report.md`` that shows them."""
    if not rows:
        raise DataError("write_gallery: no predictions")
    out = Path(out_dir)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    tiers = select_cases(rows, k)
    lines = ["# Grounding gallery", ""]
    if metrics is not None:
        m = metrics.get("metrics", metrics)
        proto = metrics.get("protocol", "?")
        lines += [
            f"Protocol `{proto}`: n = {int(m['n'])}, mIoU = {m['mIoU']:.4f}, Acc@0.5 = {m.get('acc@0.5', float('nan')):.4f}, "
            f"parse failures = {m['parse_failure_rate']:.4f}.",
            "",
        ]
    lines += [
        "Ground truth green, prediction red, Chain-of-Box boxes dashed orange (voxel frame of the stored image).",
        "",
    ]
    for tier, picked in tiers.items():
        lines += [f"## {tier.capitalize()}", ""]
        for i, row in enumerate(picked):
            name = f"{tier}_{i}_{_safe_name(row.id)}.png"
            overlay_scored(row, out / "cases" / name, image_root=image_root, window=window)
            completion = row.item.completion.replace("```", "'''")
            if len(completion) > 600:
                completion = completion[:300] + " … " + completion[-300:]
            lines += [
                f"### `{row.id}` — IoU {row.iou:.3f}",
                "",
                f"![{row.id}](cases/{name})",
                "",
                f"- phrase: {row.item.phrase or '–'}",
                f"- dataset: {row.item.dataset or '–'}; parse: {row.parse_status}",
                f"- ground truth: {'; '.join(_box_text(b) for b in row.item.gt_boxes)}",
                f"- prediction (voxel frame): {_box_text(row.box_voxel)}",
                "",
                "```text",
                completion,
                "```",
                "",
            ]
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


# ----------------------------------------------------------------------------------------------------------
# Training curves
# ----------------------------------------------------------------------------------------------------------

#: Panels of :func:`plot_training_curves`: title and the regular expression a CSV column must match.
CURVE_GROUPS: tuple[tuple[str, str], ...] = (
    ("rewards", r"reward"),
    ("IoU", r"iou"),
    ("completion length", r"length|(^|[/_])len($|[/_])"),
    ("KL", r"(^|[/_])kl($|[/_])"),
)


def _read_metrics_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except OSError as err:
        raise DataError(f"cannot read training log {path}: {err}") from None


def _number(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def curve_columns(
    columns: Sequence[str], groups: Sequence[tuple[str, str]] = CURVE_GROUPS
) -> dict[str, list[str]]:
    """Which log columns go to which panel: the first group whose pattern matches (case-insensitive).

    ``step``/``epoch`` and ``*std*`` columns are left out (spreads would crowd the panels); groups without a
    column are omitted; columns are sorted within a group.
    """
    compiled = [(title, re.compile(pattern, re.IGNORECASE)) for title, pattern in groups]
    assigned: dict[str, list[str]] = {}
    for col in columns:
        if col in ("step", "epoch") or "std" in col.lower():
            continue
        for title, rx in compiled:
            if rx.search(col):
                assigned.setdefault(title, []).append(col)
                break
    order = [title for title, _ in groups]
    return {title: sorted(assigned[title]) for title in order if title in assigned}


def plot_training_curves(
    metrics_csv: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    groups: Sequence[tuple[str, str]] = CURVE_GROUPS,
) -> Path:
    """Plot rewards, IoU, completion length and KL against the step from a Lightning ``CSVLogger`` file.

    Columns are grouped by :func:`curve_columns`. Raises :class:`DataError` when no column matches any group.
    """
    src = Path(metrics_csv)
    columns, rows = _read_metrics_csv(src)
    if "step" not in columns:
        raise DataError(
            f"{src}: no 'step' column; is this a Lightning CSVLogger metrics.csv? columns: {columns}"
        )
    assigned = curve_columns(columns, groups)
    series: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
    for title, cols in assigned.items():
        for col in cols:
            pts = [(_number(r.get("step")), _number(r.get(col))) for r in rows]
            pts = [(s, v) for s, v in pts if s is not None and v is not None]
            if pts:
                arr = np.asarray(pts)
                series.setdefault(title, []).append((col, arr[:, 0], arr[:, 1]))
    if not series:
        raise DataError(
            f"{src}: no column matches the curve groups {[t for t, _ in groups]}; columns: {columns}"
        )
    fig = Figure(figsize=(4.0 * len(series), 3.2), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(series), squeeze=False)[0]
    for ax, (title, lines) in zip(axes, series.items()):
        for col, steps, values in lines:
            ax.plot(steps, values, label=col, linewidth=1.2, marker="." if len(steps) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    return out
