"""Write synthetic phantoms in the on-disk formats of the real data sets.

``--kind ct3d``: CT-like volumes in the M3D-RefSeg layout (``sNNNN/ct.nii.gz``, ``mask.nii.gz``,
``text.json``, ``M3D_RefSeg_{train,test,all}.csv``), optionally with M3D's npy variant.
``--kind cxr2d``: chest radiographs in the MS-CXR and/or ChestX-ray8 layout.
``--kind mr3d`` / ``pet3d``: MR or PET volumes in the own-data layout (``images/``, ``masks/``, ``phrases.csv``)
that ``prepare_data.py own`` imports (``--pet-units BQML`` writes PET in Bq/ml with dose/weight/time columns).
The ct3d and cxr2d folders get ``phantom_truth.json`` (the generator's own boxes and phrases).

    python scripts/make_synthetic.py --kind ct3d --n 8 --seed 0 --out data/phantoms/ct
    python scripts/make_synthetic.py --kind cxr2d --n 20 --seed 0 --out data/phantoms/cxr --layout both
    python scripts/make_synthetic.py --kind mr3d --n 12 --out data/phantoms/mr --shape 32 32 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from mg3d.data.synthetic import TRUTH_NAME, make_ct3d, make_cxr2d
from mg3d.data.synthetic.own_volumes import make_own_volumes
from mg3d.errors import Mg3dError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("ct3d", "cxr2d", "mr3d", "pet3d"), required=True)
    parser.add_argument("--n", type=int, required=True, help="number of volumes / images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument(
        "--shape",
        type=int,
        nargs="+",
        help="ct3d: I J K voxels (default 96 96 48); cxr2d: W [H] pixels (MS-CXR W×H, ChestX-ray8 W×W)",
    )
    ct = parser.add_argument_group("ct3d")
    ct.add_argument(
        "--spacing", type=float, nargs=3, metavar=("SI", "SJ", "SK"), help="mm (default 0.8 0.8 2.5)"
    )
    ct.add_argument("--orientation", help="nibabel axis code of the stored axes (default LPS)")
    ct.add_argument(
        "--center-mm", type=float, nargs=3, metavar=("X", "Y", "Z"), help="world position of the centre"
    )
    ct.add_argument("--min-lesions", type=int)
    ct.add_argument("--max-lesions", type=int)
    ct.add_argument("--single-lesion", action="store_true", help="one lesion per volume, phrase 'the lesion'")
    ct.add_argument("--npy", action="store_true", help="also write M3D's preprocessed npy variant")
    ct.add_argument("--npy-shape", type=int, nargs=3, metavar=("D", "H", "W"), help="default 32 256 256")
    ct.add_argument(
        "--questions", type=int, nargs=2, metavar=("TYPE0", "TYPE1"), help="CSV rows per region (3 2)"
    )
    ct.add_argument("--test-fraction", type=float, help="share of cases in M3D_RefSeg_test.csv (0.2)")
    own = parser.add_argument_group("mr3d / pet3d (also --shape I J K, --spacing)")
    own.add_argument("--pet-units", choices=("BQML",), help="pet3d: store Bq/ml (+ dose, weight, times)")
    cxr = parser.add_argument_group("cxr2d")
    cxr.add_argument("--layout", choices=("mscxr", "chestxray8", "both"), default="mscxr")
    cxr.add_argument("--kinds", nargs="+", help="finding kinds to draw (default: all the layout has)")
    cxr.add_argument("--min-findings", type=int)
    cxr.add_argument("--max-findings", type=int)
    cxr.add_argument("--n-normal", type=int, help="ChestX-ray8: extra 'No Finding' images")
    return parser


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def run(args: argparse.Namespace) -> list[Path]:
    if args.kind in ("mr3d", "pet3d"):
        options = _given(shape=args.shape, spacing=args.spacing, pet_units=args.pet_units)
        table = make_own_volumes(args.out, args.n, args.seed, modality=args.kind[:-2].upper(), **options)
        return [
            table,
            *sorted((args.out / "images").glob("*.nii.gz")),
            *sorted((args.out / "masks").glob("*")),
        ]
    if args.kind == "ct3d":
        if args.shape is not None and len(args.shape) != 3:
            raise SystemExit("error: --shape for ct3d takes 3 sizes (I J K)")
        options = _given(
            shape=args.shape,
            spacing=args.spacing,
            orientation=args.orientation,
            center_mm=args.center_mm,
            min_lesions=args.min_lesions,
            max_lesions=args.max_lesions,
            npy_shape=args.npy_shape,
            questions_per_region=args.questions,
            test_fraction=args.test_fraction,
        )
        return make_ct3d(
            args.out, args.n, args.seed, npy=args.npy, single_lesion=args.single_lesion, **options
        )
    options = _given(
        kinds=args.kinds,
        min_findings=args.min_findings,
        max_findings=args.max_findings,
        n_normal=args.n_normal,
    )
    if args.shape is not None:
        if len(args.shape) not in (1, 2):
            raise SystemExit("error: --shape for cxr2d takes W or W H")
        width, height = args.shape[0], args.shape[-1]
        if args.layout != "chestxray8":
            options["mscxr_size"] = (width, height)
        if args.layout != "mscxr":
            if width != height:
                raise SystemExit("error: ChestX-ray8 images are square; give one --shape value")
            options["chestxray8_size"] = width
    return make_cxr2d(args.out, args.n, args.seed, layout=args.layout, **options)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        files = run(args)
    except Mg3dError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    images = [f for f in files if f.suffix in (".gz", ".npy", ".jpg", ".png")]
    print(
        f"wrote {args.n} {args.kind} phantoms to {args.out} in {seconds:.1f} s: {len(images)} image/mask files"
    )
    for f in files:
        if f.suffix in (".csv", ".txt") or f.name == TRUTH_NAME:
            print(f"  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
