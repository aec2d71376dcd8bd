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
import sys
from collections.abc import Sequence
from pathlib import Path

from mg3d.errors import Mg3dError


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
        "--eval-metrics", type=Path, default=None, help="a JSON object of metric name → number"
    )
    parser.add_argument(
        "--ndims", type=int, nargs="+", choices=[2, 3], default=None, help="image kinds to document"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="default batch size of configs/inference.json"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mg3d.bundle import SCHEMA_PATH, export_bundle, schema_sha256

    try:
        metrics = None
        if args.eval_metrics is not None:
            metrics = json.loads(args.eval_metrics.read_text(encoding="utf-8"))
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
