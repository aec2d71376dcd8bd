"""Draw docs/img/frames.png: the three coordinate frames of mg3d and the steps between them.

Run: `.venv/bin/python docs/make_frames_figure.py` (matplotlib is a dev dependency).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, Rectangle

OUT = Path(__file__).parent / "img" / "frames.png"


def _grid(ax, nx: int, ny: int, title: str, xlabel: str, ylabel: str) -> None:
    for i in range(nx + 1):
        ax.plot([i, i], [0, ny], color="0.85", lw=0.8)
    for j in range(ny + 1):
        ax.plot([0, nx], [j, j], color="0.85", lw=0.8)
    ax.set_xlim(-0.8, nx + 0.8)
    ax.set_ylim(ny + 0.8, -0.8)  # row index grows downwards, as images are shown
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=7)


def main() -> None:
    fig, axes = plt.subplots(1, 3, figsize=(14, 5.4))

    ax = axes[0]
    _grid(ax, 8, 6, "1. voxel frame (stored array)", "axis 0 (i)", "axis 1 (j)")
    ax.add_patch(Rectangle((2, 1), 3, 2, fill=False, ec="tab:green", lw=2.5))
    ax.text(2, 4.0, "box [2, 1, 5, 3]\nhalf-open: voxel i covers [i, i+1)\nmask voxels 2..4 → hi = 4 + 1",
            fontsize=8, color="tab:green")  # fmt: skip
    ax.plot([2.5], [1.5], "k.", ms=5)
    ax.text(2.6, 1.45, "centre of voxel (2,1)\n= edge + 0.5", fontsize=6.5)

    ax = axes[1]
    _grid(ax, 12, 9, "2. text frame (grid the model sees)", "x = column (pixels)", "y = row (pixels)")
    ax.add_patch(Rectangle((3, 1.5), 4.5, 3, fill=False, ec="tab:red", lw=2.5))
    ax.text(0.2, 7.6, 'model writes {"bbox_2d": [3, 2, 8, 5]}\n(integers; Qwen2-VL: 0-1000 normalised)\n'
            "display orientation: patient left\non image right, anterior up", fontsize=8, color="tab:red")  # fmt: skip

    ax = axes[2]
    ax.set_title("3. world frame (mm, through the affine)", fontsize=11)
    ax.add_patch(Rectangle((10, 20), 24, 16, fill=False, ec="tab:blue", lw=2.5))
    ax.set_xlim(0, 50)
    ax.set_ylim(0, 50)
    ax.set_aspect("equal")
    ax.set_xlabel("x (mm, RAS: +x = patient left)", fontsize=9)
    ax.set_ylabel("y (mm, RAS: +y = anterior)", fontsize=9)
    ax.text(2, 42, "world = affine · (edge − 0.5)\ncentre distances in mm", fontsize=8, color="tab:blue")

    fig.subplots_adjust(left=0.04, right=0.98, top=0.92, bottom=0.3, wspace=0.35)
    arrows = [
        (
            0.20,
            0.50,
            "CoordinateFrame: orientation, spacing, crop, resize, pad, patch (each step invertible)",
        ),
        (0.50, 0.82, "affine of the stored image (voxel centres → mm)"),
    ]
    for x0, x1, label in arrows:
        fig.patches.append(FancyArrowPatch((x0, 0.08), (x1, 0.08), transform=fig.transFigure,
                                           arrowstyle="<|-|>", mutation_scale=14, color="0.3"))  # fmt: skip
        fig.text((x0 + x1) / 2, 0.1, label, ha="center", va="bottom", fontsize=8.5)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
