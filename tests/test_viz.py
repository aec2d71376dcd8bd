"""Tests for mg3d.viz: overlays checked pixel by pixel at hand-computed positions, gallery, training curves."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mg3d.errors import DataError
from mg3d.evaluation import GroundingEvaluator
from mg3d.viz import (
    Panel,
    curve_columns,
    load_image_array,
    overlay_2d,
    overlay_3d,
    overlay_scored,
    plot_training_curves,
    select_cases,
    write_gallery,
)

GREEN = (0, 255, 0)
RED = (255, 0, 0)
ORANGE = (255, 153, 0)


def rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def near(
    img: np.ndarray, col: float, row: float, color: tuple[int, int, int], radius: int = 1, tol: int = 40
) -> bool:
    """Some pixel within ``radius`` of (col, row) has ``color`` (lines are anti-aliased and snapped)."""
    c, r = int(col), int(row)
    window = img[max(0, r - radius) : r + radius + 1, max(0, c - radius) : c + radius + 1]
    return bool(np.any(np.all(np.abs(window - np.asarray(color)) <= tol, axis=-1)))


def is_color(pixel: np.ndarray, color: tuple[int, int, int], tol: int = 40) -> bool:
    return bool(np.all(np.abs(pixel - np.asarray(color)) <= tol))


def test_overlay_2d_box_pixels_at_hand_computed_positions(tmp_path: Path) -> None:
    image = np.full((200, 100), 0.5)  # x = 200 columns, y = 100 rows
    layout = overlay_2d(
        image,
        tmp_path / "o.png",
        gt_boxes=[[20, 10, 80, 60]],
        pred_box=[100, 30, 150, 90],
        think_boxes=[[10, 5, 190, 95]],
        phrase="left pleural effusion",
        window=(0.0, 1.0),
    )
    # size 512 on the long side: 2.56 px per pixel → panel 512 × 256; header 8 + 2 lines × 18 = 44
    assert (layout.width, layout.height, layout.header) == (512, 300, 44)
    img = rgb(layout.path)
    assert img.shape == (300, 512, 3)
    assert layout.path.stat().st_size > 1000

    def px(x: float, y: float) -> tuple[float, float]:
        return x * 2.56, 44 + y * 2.56

    assert layout.panel("image").to_pixel(20, 35) == pytest.approx(px(20, 35))
    for x, y in [(20, 35), (80, 35), (50, 10), (50, 60)]:  # the four sides of the ground truth
        assert near(img, *px(x, y), GREEN), (x, y)
    for x, y in [(100, 60), (150, 60), (125, 30), (125, 90)]:  # the prediction
        assert near(img, *px(x, y), RED), (x, y)
    assert is_color(img[int(px(50, 35)[1]), int(px(50, 35)[0])], (128, 128, 128), tol=3)  # inside: the image
    assert is_color(img[int(px(90, 20)[1]), int(px(90, 20)[0])], (128, 128, 128), tol=3)  # between boxes
    # the ground truth's top side is solid, the Chain-of-Box box's top side is dashed
    cols = range(int(px(25, 0)[0]), int(px(75, 0)[0]))
    solid = [any(near(img, c, px(0, 10)[1] + d, GREEN, radius=0) for d in (-1, 0, 1)) for c in cols]
    assert all(solid)
    cols = range(int(px(15, 0)[0]), int(px(185, 0)[0]))
    dashed = [any(near(img, c, px(0, 5)[1] + d, ORANGE, radius=0) for d in (-1, 0, 1)) for c in cols]
    assert 0.3 < np.mean(dashed) < 0.9  # dashes and gaps


def test_overlay_3d_four_panels_at_hand_computed_positions(tmp_path: Path) -> None:
    vol = np.zeros((40, 30, 20))
    vol[10:20, 5:15, 4:12] = 1.0  # the target: a bright block
    layout = overlay_3d(
        vol,
        tmp_path / "v.png",
        gt_boxes=[[10, 5, 4, 20, 15, 12]],
        pred_box=[22, 18, 6, 30, 26, 16],
        phrase="lesion",
        spacing=(1.0, 1.0, 2.0),
        window=(0.0, 1.0),
    )
    # size 320 over the longest physical side (x: 40 mm, z: 20 × 2 mm): 8 px/voxel in x, y; 16 in z
    assert (layout.width, layout.height) == (3 * 6 + 320 + 320, 44 + 18 + 240 + 6 + 18 + 320 + 6)
    img = rgb(layout.path)
    assert img.shape == (layout.height, layout.width, 3)
    axial, mip, coronal, sagittal = (layout.panel(n) for n in ("axial", "mip", "coronal", "sagittal"))
    assert (axial.left, axial.top, axial.width, axial.height) == (6, 62, 320, 240)
    assert (coronal.left, coronal.top, coronal.width, coronal.height) == (6, 326, 320, 320)
    assert (sagittal.left, sagittal.width) == (332, 240) and mip.left == 332
    # axial slice z = 8 (the centre of the ground truth): x → col 6 + 8x, y → row 62 + 8y
    assert near(img, 6 + 8 * 10, 62 + 8 * 10, GREEN)  # left side x = 10
    assert near(img, 6 + 8 * 15, 62 + 8 * 15, GREEN)  # bottom side y = 15
    assert near(img, 6 + 8 * 22, 62 + 8 * 22, RED)  # prediction's left side x = 22
    assert is_color(img[62 + 8 * 10, 6 + 8 * 15], (255, 255, 255), tol=3)  # inside the block on the slice
    # coronal slice y = 10, z up: x → col 6 + 8x, z → row 326 + 16 (20 − z)
    assert coronal.to_pixel(15, 4) == pytest.approx((126, 582))
    assert near(img, 6 + 8 * 15, 326 + 16 * (20 - 4), GREEN)  # ground truth's z = 4 side
    assert near(img, 6 + 8 * 26, 326 + 16 * (20 - 16), RED)  # prediction's z = 16 side
    assert near(img, 6 + 8 * 10, 326 + 16 * (20 - 8), GREEN)
    # sagittal slice x = 15: y → col 332 + 8y, z up
    assert near(img, 332 + 8 * 5, 326 + 16 * (20 - 8), GREEN)
    assert is_color(img[326 + 16 * (20 - 8), 332 + 8 * 10], (255, 255, 255), tol=3)
    # MIP along z: the block is bright, the background black
    assert is_color(img[62 + 8 * 10, 332 + 8 * 15], (255, 255, 255), tol=3)
    assert is_color(img[62 + 8 * 25, 332 + 8 * 35], (0, 0, 0), tol=3)
    assert near(img, 332 + 8 * 20, 62 + 8 * 10, GREEN)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 500), st.integers(1, 500), st.integers(1, 300), st.integers(1, 300), st.booleans())
def test_panel_maps_the_extent_onto_its_rectangle(left: int, top: int, w: int, h: int, up: bool) -> None:
    panel = Panel("p", left, top, w, h, (37.0, 11.0), (0, 1), up)
    origin = panel.to_pixel(0, 0)
    far = panel.to_pixel(37, 11)
    assert origin == pytest.approx((left, top + h if up else top))
    assert far == pytest.approx((left + w, top if up else top + h))


def test_load_image_array_uses_the_voxel_frame(tmp_path: Path) -> None:
    rows_cols = np.zeros((30, 50), dtype=np.uint8)  # an image 50 wide, 30 high
    rows_cols[5, 20] = 255  # row 5, column 20
    Image.fromarray(rows_cols).save(tmp_path / "cxr.png")
    arr = load_image_array(tmp_path / "cxr.png", 2)
    assert arr.shape == (50, 30) and arr[20, 5] == 255  # x first, as MONAI loads it
    vol = np.zeros((12, 10, 8), dtype=np.int16)
    vol[3, 4, 5] = 100
    nib.save(nib.Nifti1Image(vol, np.diag([0.7, 0.7, 2.0, 1.0])), tmp_path / "ct.nii.gz")
    loaded = load_image_array(tmp_path / "ct.nii.gz", 3)
    assert loaded.shape == (12, 10, 8) and loaded[3, 4, 5] == 100
    np.save(tmp_path / "m3d.npy", vol[None].astype(np.float32))
    assert load_image_array(tmp_path / "m3d.npy", 3).shape == (12, 10, 8)
    with pytest.raises(DataError, match="does not exist"):
        load_image_array(tmp_path / "missing.png", 2)


def gallery_rows(tmp_path: Path):
    img = np.zeros((40, 64), dtype=np.uint8)
    img[10:30, 10:30] = 200
    Image.fromarray(img).save(tmp_path / "a.png")
    vol = np.zeros((24, 24, 12), dtype=np.int16)
    vol[6:12, 6:12, 3:7] = 500
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 2.5, 1.0])), tmp_path / "ct.nii.gz")
    ev = GroundingEvaluator(n_bootstrap=0)
    for i, top in enumerate([10, 12, 15, 18, 20, 25, 29]):
        ev.add(
            f'<think>the region [5, 5, 35, 35] is bright</think><answer>{{"bbox_2d": [10, {top}, 30, 30]}}</answer>',
            [[10, 10, 30, 30]],
            id=f"cxr/{i}",
            image="a.png",
            phrase=f"opacity {i}",
        )
    ev.add(
        '<answer>{"bbox_3d": [6, 6, 3, 12, 12, 5]}</answer>',
        [[6, 6, 3, 12, 12, 7]],
        id="ct/0",
        image="ct.nii.gz",
        ndim=3,
        spacing=[1, 1, 2.5],
    )
    ev.add("no box here", [[10, 10, 30, 30]], id="cxr/fail", image="a.png")
    return ev


def test_gallery_best_median_worst(tmp_path: Path) -> None:
    ev = gallery_rows(tmp_path)
    tiers = select_cases(ev.rows, 2)
    assert [r.id for r in tiers["best"]] == ["cxr/0", "cxr/1"]  # IoU 1.0, 0.9
    assert [r.id for r in tiers["worst"]] == ["cxr/fail", "cxr/6"]  # IoU 0, 0.05
    assert len(tiers["median"]) == 2
    report = write_gallery(ev.rows, tmp_path / "gallery", k=2, metrics=ev.report(), image_root=tmp_path)
    text = report.read_text(encoding="utf-8")
    assert "## Best" in text and "## Median" in text and "## Worst" in text
    links = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert len(links) == 6
    for link in links:
        png = report.parent / link
        assert png.exists() and Image.open(png).size[0] > 100
    # the 3D case draws through its NIfTI and spacing; the failure draws without a prediction
    layout = overlay_scored(
        next(r for r in ev.rows if r.id == "ct/0"), tmp_path / "ct.png", image_root=tmp_path
    )
    assert [p.name for p in layout.panels] == ["axial", "mip", "coronal", "sagittal"]
    with pytest.raises(DataError, match=r"cxr/0.*does not exist"):
        overlay_scored(ev.rows[0], tmp_path / "x.png", image_root=tmp_path / "nowhere")


def test_evaluator_write_with_gallery(tmp_path: Path) -> None:
    ev = gallery_rows(tmp_path)
    paths = ev.write(tmp_path / "out", gallery=1, image_root=tmp_path)
    assert (
        paths["gallery"].exists() and len(list((tmp_path / "out" / "gallery" / "cases").glob("*.png"))) == 3
    )


def test_training_curves_from_a_lightning_csv_log(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="run", version=0)
    for step in range(12):
        logger.log_metrics(
            {
                "train/reward": 0.1 * step,
                "rewards/iou/mean": 0.05 * step,
                "rewards/iou/std": 0.01,
                "completions/mean_length": 30 - step,
                "kl": 0.001 * step,
            },
            step=step,
        )
        if step % 4 == 3:
            logger.log_metrics({"val/mIoU": 0.02 * step}, step=step)
    logger.save()
    csv_path = next(tmp_path.rglob("metrics.csv"))
    groups = curve_columns(csv_path.read_text(encoding="utf-8").splitlines()[0].split(","))
    assert groups == {
        "rewards": ["rewards/iou/mean", "train/reward"],
        "IoU": ["val/mIoU"],
        "completion length": ["completions/mean_length"],
        "KL": ["kl"],
    }
    out = plot_training_curves(csv_path, tmp_path / "curves.png")
    assert Image.open(out).size[0] == 4 * 4 * 128  # one 4-inch panel per group at 128 dpi
    (tmp_path / "other.csv").write_text("step,loss\n0,1.0\n")
    with pytest.raises(DataError, match="no column matches"):
        plot_training_curves(tmp_path / "other.csv", tmp_path / "x.png")
    (tmp_path / "nostep.csv").write_text("epoch,kl\n0,1.0\n")
    with pytest.raises(DataError, match="no 'step' column"):
        plot_training_curves(tmp_path / "nostep.csv", tmp_path / "x.png")
