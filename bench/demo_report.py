"""Summarise `make demo` runs over seeds, next to the constant-box baseline of the same held-out split.

Run by hand after one demo run per seed (each writes ``grpo_summary.json`` into its log folder)::

    .venv/bin/python bench/demo_report.py runs/demo_s0/lightning_logs/version_0 runs/demo_s1/lightning_logs/version_0 ... \
        --data data/demo/ct3d_body

Why a baseline: the demo's single-lesion phantoms put lesions in a few organs, so lesion positions cluster and a
fixed box already scores a non-zero IoU. "GRPO improves the policy" means little unless the numbers are read
against the best box a model could output without looking at the image. The constant box is fitted on the
*training* split (coordinate ascent on mean IoU, starting from the median box) and scored on the held-out split
the demo evaluates on. Boxes are compared in the stored voxel frame of the manifests; the demo's phantoms all
share one shape and orientation, so one box means the same place in every case. When the phrases differ (the 2D
demo names side, zone and kind), the best box *per phrase* is the baseline of a policy that reads the words and
ignores the image. The per-run table also shows the in-run controls, when the run recorded them: greedy mIoU with
each phrase asked with another case's image (``swap/mIoU``) and the number of distinct greedy boxes. The fitting
lives in :mod:`mg3d.evaluation.baselines`, shared with the run's own final table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import numpy as np

from mg3d.boxes import pair_iou
from mg3d.data.records import read_manifest
from mg3d.evaluation.baselines import best_box_per_key, best_constant_box, mean_iou
from mg3d.grpo.heldout import BEFORE_GRPO_STAGES

METRICS = ("greedy/mIoU", "greedy/acc@0.5", "sampled/mIoU", "sampled/acc@0.5")
# the in-run controls (runs from before they existed lack them: shown as "–")
CONTROLS = ("swap/mIoU", "greedy/distinct_boxes")


def first_boxes(
    manifest: Path, max_samples: int | None = None, shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """The first (only) target box of every record (the first ``max_samples`` records, as the demo's in-run
    evaluation takes them), as an ``(N, 2·ndim)`` array in the voxel frame of an image of ``shape`` (default:
    the first record's).

    Records of other shapes (MS-CXR images each have their own size) are scaled per axis to ``shape``: the
    demo pipelines stretch every image to one model grid (``fit: resize``), and IoU does not change under a
    per-axis scaling, so one box then means the same place in every image, as it does on the model's grid.
    """
    records = read_manifest(manifest)[:max_samples]
    if not records:
        raise SystemExit(f"{manifest}: no records")
    ref = np.asarray(shape or records[0].spatial_shape, dtype=float)
    if {len(r.spatial_shape) for r in records} != {len(ref)}:
        raise SystemExit(f"{manifest}: records of different dimensionality; a constant box is meaningless")
    out = []
    for r in records:
        scale = ref / np.asarray(r.spatial_shape, dtype=float)
        out.append(np.asarray(r.boxes[0], dtype=float) * np.concatenate([scale, scale]))
    return np.array(out)


def phrases(manifest: Path, max_samples: int | None = None) -> list[str]:
    """The phrase of every record (the first ``max_samples``), aligned with :func:`first_boxes`."""
    return [r.text for r in read_manifest(manifest)[:max_samples]]


def load_summary(run: Path) -> dict:
    path = run / "grpo_summary.json" if run.is_dir() else run
    if not path.is_file():
        raise SystemExit(f"{path}: not found (give the log folder of a finished demo run)")
    summary = json.loads(path.read_text(encoding="utf-8"))
    if "after_grpo" not in summary or not any(s in summary for s in BEFORE_GRPO_STAGES):
        raise SystemExit(f"{path}: no before-GRPO or after_grpo stage; did the run finish both phases?")
    return summary


def stages(summary: dict) -> tuple[str, str]:
    """The stage GRPO started from and the final one."""
    return next(s for s in BEFORE_GRPO_STAGES if s in summary), "after_grpo"


def _ms(values: list[float]) -> str:
    return (
        f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
        if len(values) > 1
        else f"{values[0]:.3f}"
    )


def _cell(row: dict, key: str) -> str:
    if key not in row:
        return "–"
    return f"{int(row[key])}" if key.endswith("distinct_boxes") else f"{row[key]:.3f}"


def report(runs: list[Path], data: Path, max_samples: int | None = None) -> str:
    summaries = [load_summary(r) for r in runs]
    columns = METRICS + CONTROLS
    lines = [
        "| run | stage | step | " + " | ".join(columns) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    for run, summary in zip(runs, summaries, strict=True):
        for stage in stages(summary):
            row = summary[stage]
            cells = " | ".join(_cell(row, m) for m in columns)
            lines.append(f"| {run.name} | {stage} | {int(row['step'])} | {cells} |")
    lines += ["", "Mean ± sample std over the runs:", ""]
    lines += ["| metric | before GRPO | after GRPO | gain |", "| --- | --- | --- | --- |"]
    for m in columns:
        if not all(m in s[stage] for s in summaries for stage in stages(s)):
            continue
        before = [s[stages(s)[0]][m] for s in summaries]
        after = [s["after_grpo"][m] for s in summaries]
        gain = [a - b for a, b in zip(after, before, strict=True)]
        lines.append(
            f"| {m} | {_ms(before)} | {_ms(after)} | {'+' if statistics.mean(gain) >= 0 else ''}{_ms(gain)} |"
        )
    shape = tuple(read_manifest(data / "train.jsonl")[0].spatial_shape)  # one frame for every split
    train = first_boxes(data / "train.jsonl", shape=shape)
    train_phrases = phrases(data / "train.jsonl")
    median_box = np.round(np.median(train, axis=0))
    constant = best_constant_box(train)
    nd = train.shape[1] // 2
    size = np.median(train[:, nd:] - train[:, :nd], axis=0)
    lines += [
        "",
        "Baselines (the demo evaluates on `val`; `test` is the larger split `scripts/evaluate.py` scores):",
        "",
        "| box | " + " | ".join(f"{split} mIoU" for split in ("val", "test")) + " |",
        "| --- | --- | --- |",
    ]
    split_names = ("val", "test")
    splits = {split: first_boxes(data / f"{split}.jsonl", max_samples, shape) for split in split_names}
    split_phrases = {split: phrases(data / f"{split}.jsonl", max_samples) for split in split_names}
    centred = {}
    for split, boxes in splits.items():
        centre = (boxes[:, :nd] + boxes[:, nd:]) / 2
        centred[split] = float(
            np.mean(pair_iou(np.concatenate([centre - size / 2, centre + size / 2], 1), boxes))
        )
    rows = [
        (
            f"median training box {median_box.astype(int).tolist()}",
            [mean_iou(median_box, b) for b in splits.values()],
        ),
        (
            f"best constant box on the training split {constant.astype(int).tolist()}",
            [mean_iou(constant, b) for b in splits.values()],
        ),
    ]
    if len(set(train_phrases)) > 1:
        rows.append(
            (
                f"best box per phrase on the training split ({len(set(train_phrases))} phrases)",
                [best_box_per_key(train, train_phrases, splits[s], split_phrases[s]) for s in split_names],
            )
        )
    rows.append(("true centre, median training size (an upper reference)", list(centred.values())))
    for name, values in rows:
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    lines.append(f"\n({', '.join(f'{k}: {len(v)} records' for k, v in splits.items())}; `{data}`)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "runs", nargs="+", type=Path, help="log folders (or grpo_summary.json files) of demo runs"
    )
    parser.add_argument(
        "--data", type=Path, default=Path("data/demo/ct3d_body"), help="the demo's prepared manifests"
    )
    parser.add_argument(
        "--max-samples",
        type=int,
        default=None,
        help="score the first N held-out records (model.evaluation.max_samples)",
    )
    args = parser.parse_args(argv)
    print(report(args.runs, args.data, args.max_samples))
    print(f"\nCommand: `{shlex.join(['python', 'bench/demo_report.py', *(argv or sys.argv[1:])])}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
