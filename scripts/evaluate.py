#!/usr/bin/env python
"""Evaluate a grounding model on a manifest, or re-score a predictions file without a model.

    # greedy generation over a manifest, then metrics (predictions.jsonl, metrics.json, metrics.md in --out)
    python scripts/evaluate.py --ckpt runs/demo/checkpoints/last.ckpt --manifest data/demo/ct3d_body/test.jsonl --out eval/
    python scripts/evaluate.py --model exported/policy --manifest data/test.jsonl --out eval/ --gallery 3

    # re-score an existing file (ours, any JSONL with completion + gt_boxes, or a MedGround-R1 eval log)
    python scripts/evaluate.py --predictions eval/predictions.jsonl --protocol medground-r1 --json

Protocols and metric names: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mg3d.errors import Mg3dError
from mg3d.evaluation import DEFAULT_THRESHOLDS, PROTOCOLS, GroundingEvaluator, read_predictions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Grounding metrics (mIoU, Acc@τ, parse failures, centre error) under a named protocol.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--predictions", type=Path, help="re-score this predictions file (JSONL or a paper log)")
    src.add_argument("--ckpt", type=Path, help="a Lightning checkpoint of GRPOModule (needs --manifest)")
    src.add_argument("--model", type=Path, help="a save_pretrained policy folder (needs --manifest)")
    parser.add_argument("--manifest", type=Path, help="the manifest to predict on (with --ckpt / --model)")
    parser.add_argument("--protocol", default="mg3d", choices=sorted(PROTOCOLS), help="evaluation rules")
    parser.add_argument(
        "--comparison", choices=[">", ">="], default=None, help="Acc@τ rule (default: the protocol's)"
    )
    parser.add_argument(
        "--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS), help="IoU thresholds τ"
    )
    parser.add_argument("--codec", default=None, help="box codec for rows that name none (e.g. qwen2-vl)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: no intervals)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--batch-size", type=int, default=8, help="generation batch size (model mode)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N manifest records")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", type=Path, help="write predictions.jsonl, metrics.json, metrics.md here")
    parser.add_argument("--gallery", type=int, default=0, help="with --out: best/median/worst K overlays")
    parser.add_argument("--image-root", type=Path, help="base folder of relative image paths (gallery)")
    parser.add_argument("--curves", type=Path, help="with --out: plot training curves from this metrics.csv")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object on stdout")
    parser.add_argument(
        "--imports",
        nargs="+",
        default=[],
        metavar="MODULE",
        help="user modules to import first (a checkpoint already names the ones it was trained with)",
    )
    parser.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="predict on records whose modality or ndim the model was not trained on (logged)",
    )
    return parser


def _model_predictions(args: argparse.Namespace) -> tuple[Iterable[Any], Any]:
    """Greedy predictions of a checkpoint or exported policy over a manifest (imports the model lazily)."""
    from mg3d.data.records import read_manifest
    from mg3d.grounder import Grounder

    if args.manifest is None:
        raise SystemExit("error: --ckpt / --model need --manifest")
    options = {"allow_mismatch": True} if args.allow_mismatch else {}
    grounder = (
        Grounder.from_checkpoint(str(args.ckpt), **options)
        if args.ckpt
        else Grounder.from_pretrained(str(args.model), **options)
    )
    records = read_manifest(args.manifest)
    if args.limit is not None:
        records = records[: args.limit]
    preds = grounder.predict_records(records, batch_size=args.batch_size, progress=not args.no_progress)
    return preds, getattr(grounder, "codec", None)


def _summary(report: dict[str, Any]) -> str:
    m = report["metrics"]
    cmp = "≥" if report["comparison"] == ">=" else ">"
    lines = [f"protocol {report['protocol']}  n={int(m['n'])}  (Acc: IoU {cmp} τ)"]
    for name in ["mIoU", *(f"acc@{t:g}" for t in report["thresholds"])]:
        ci = ""
        if f"{name}_ci_low" in m:
            ci = f"  [{m[name + '_ci_low']:.4f}, {m[name + '_ci_high']:.4f}]"
        lines.append(f"  {name:<10} {m[name]:.4f}{ci}")
    lines.append(f"  parse failures {m['parse_failure_rate']:.4f}")
    if "center_mm_mean" in m:
        lines.append(f"  centre error  {m['center_mm_mean']:.2f} mm (median {m['center_mm_median']:.2f})")
    if not report["standard_iou"]:
        lines.append("  NOTE: non-standard 'IoU' (M3D enclosing-box); not comparable with true IoU")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.gallery or args.curves) and args.out is None:
        print("error: --gallery and --curves need --out", file=sys.stderr)
        return 2
    try:
        from mg3d.data.user_modules import import_user_modules

        import_user_modules(args.imports)
        codec: Any = args.codec
        image_root = args.image_root
        if args.predictions is not None:
            items: Iterable[Any] = read_predictions(args.predictions)
            if image_root is None:
                image_root = args.predictions.parent
        else:
            items, model_codec = _model_predictions(args)
            codec = codec or model_codec
        evaluator = GroundingEvaluator(
            args.protocol,
            thresholds=args.thresholds,
            comparison=args.comparison,
            n_bootstrap=args.bootstrap,
            seed=args.seed,
            codec=codec,
        )
        evaluator.update(items)
        report = evaluator.report()
        if args.out is not None:
            evaluator.write(args.out, gallery=args.gallery, image_root=image_root)
            if args.curves is not None:
                from mg3d.viz import plot_training_curves

                plot_training_curves(args.curves, args.out / "curves.png")
    except Mg3dError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, allow_nan=False) if args.json else _summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
