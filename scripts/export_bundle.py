#!/usr/bin/env python
"""Export a trained grounding model as a MONAI bundle (see mg3d.bundle and docs in the bundle's README).

    python scripts/export_bundle.py --ckpt runs/demo/checkpoints/last.ckpt --out bundles/mg3d_demo
    python scripts/export_bundle.py --model exported/policy --out bundles/mg3d_demo --zip

Then, with no network:
    python -m monai.bundle verify_metadata --meta_file bundles/mg3d_demo/configs/metadata.json \\
        --filepath "$(python -c 'import mg3d.bundle as b; print(b.SCHEMA_PATH)')"   # (+ --hash_val, see README)
    python -m monai.bundle run --config_file bundles/mg3d_demo/configs/inference.json \\
        --meta_file bundles/mg3d_demo/configs/metadata.json --bundle_root bundles/mg3d_demo \\
        --image ct.nii.gz --phrase "the left kidney" --output_dir out/
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from mg3d.errors import ConfigError, Mg3dError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write a MONAI bundle (metadata, inference config, safetensors model, docs) for a grounding model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--ckpt", type=Path, help="a Lightning checkpoint of GRPOModule (read with weights_only)"
    )
    src.add_argument("--model", type=Path, help="a Grounder.save_pretrained folder")
    parser.add_argument("--out", type=Path, required=True, help="the bundle folder to create")
    parser.add_argument("--zip", action="store_true", help="also pack the bundle as <out>.zip")
    parser.add_argument("--name", default=None, help="bundle name (default: the --out folder's name)")
    parser.add_argument("--version", default="0.1.0", help="bundle version")
    parser.add_argument("--authors", default="mg3d developers")
    parser.add_argument("--copyright", default="the authors of this model")
    parser.add_argument("--data-source", default=None, help="what the model was trained on")
    parser.add_argument(
        "--eval-metrics",
        type=Path,
        default=None,
        help="metrics.json of scripts/evaluate.py, or a JSON object of metric name → number "
        "(default: the held-out results the checkpoint recorded for its final model)",
    )
    parser.add_argument(
        "--imports",
        nargs="+",
        default=[],
        metavar="MODULE",
        help="user modules to import first (a checkpoint already names the ones it was trained with)",
    )
    parser.add_argument(
        "--ndims", type=int, nargs="+", choices=[2, 3], default=None, help="image kinds to document"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="default batch size of configs/inference.json"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    return parser


def read_eval_metrics(path: Path) -> dict[str, float]:
    """Metric name → number from ``evaluate.py``'s ``metrics.json`` (its ``metrics`` object) or a flat JSON object
    of numbers; anything else is refused naming the file and the key."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--eval-metrics {path}: cannot read a JSON object ({err})") from None
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
        data = data["metrics"]  # scripts/evaluate.py's report: protocol, thresholds, … beside the numbers
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"--eval-metrics {path}: expected a JSON object of metric name → number")
    out: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"--eval-metrics {path}: metric {key!r} is {value!r}, not a finite number")
        out[str(key)] = float(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mg3d.bundle import SCHEMA_PATH, export_bundle, schema_sha256
    from mg3d.data.user_modules import import_user_modules

    try:
        import_user_modules(args.imports)
        metrics = None
        if args.eval_metrics is not None:
            metrics = read_eval_metrics(args.eval_metrics)
        path = export_bundle(
            args.ckpt or args.model,
            args.out,
            zip=args.zip,
            name=args.name,
            version=args.version,
            ndims=args.ndims,
            authors=args.authors,
            copyright=args.copyright,
            data_source=args.data_source,
            eval_metrics=metrics,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
        )
    except (Mg3dError, OSError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"bundle written: {path}")
    print(
        f"verify: python -m monai.bundle verify_metadata --meta_file {args.out}/configs/metadata.json "
        f"--filepath {SCHEMA_PATH} --hash_val {schema_sha256()} --hash_type sha256"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
