"""Turn data set adapters into manifests: ``train/val/test.jsonl`` plus ``summary.json``.

``summary.json`` holds the counts per split, data set, category, question type and modality of what
was written, and every skipped input item with its reason, so a run with ``--on-error skip`` is
auditable: nothing is dropped without a line saying why.

The command-line front end is :func:`main` (``scripts/prepare_data.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

import mg3d
from mg3d.atomic import atomic_write_text
from mg3d.data.readers import DEFAULT_MAX_PIXELS, DEFAULT_MAX_VOXELS
from mg3d.data.records import MANIFEST_SCHEMA_VERSION, SPLITS, GroundingRecord, write_manifest
from mg3d.data.sources import ChestXray8Source, M3DRefSegSource, MedRPGSource, MSCXRSource, Source
from mg3d.data.sources.own import OWN_TABLE_NAME, OwnDataSource
from mg3d.data.sources.pet import PET_UNITS
from mg3d.data.user_modules import import_user_modules
from mg3d.errors import ConfigError, DataError

__all__ = ["SPLIT_FILES", "build_parser", "main", "prepare", "summarize"]

SPLIT_FILES = {split: f"{split}.jsonl" for split in SPLITS}


def _count_table(records: Iterable[GroundingRecord], key: Any) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = defaultdict(lambda: {"total": 0, **dict.fromkeys(SPLITS, 0)})
    for record in records:
        value = key(record)
        if value is None:
            continue
        row = table[str(value)]
        row["total"] += 1
        row[record.split] += 1
    return dict(sorted(table.items()))


def summarize(
    by_split: dict[str, list[GroundingRecord]],
    sources: Sequence[Source],
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The ``summary.json`` content for records grouped by split and the sources they came from."""
    records = [r for split in SPLITS for r in by_split[split]]
    skipped = [s for src in sources for s in src.skips.items]
    by_kind: dict[str, int] = defaultdict(int)
    for skip in skipped:
        by_kind[skip.kind] += 1
    made = _count_table(records, lambda r: r.dataset)
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "mg3d_version": mg3d.__version__,
        "command": list(command) if command is not None else None,
        "files": dict(SPLIT_FILES),
        "records": {"total": len(records), **{s: len(by_split[s]) for s in SPLITS}},
        "boxes": {
            "total": sum(len(r.boxes) for r in records),
            **{s: sum(len(r.boxes) for r in by_split[s]) for s in SPLITS},
        },
        "datasets": made,
        "categories": _count_table(records, lambda r: r.category),
        "question_types": _count_table(records, lambda r: r.question_type),
        "modalities": _count_table(records, lambda r: r.modality),
        "inputs": {
            src.dataset: {
                "items": len(src),
                "records": made.get(src.dataset, {}).get("total", 0),
                "skipped": len(src.skips),
            }
            for src in sources
        },
        "skipped": {
            "total": len(skipped),
            "by_kind": dict(sorted(by_kind.items())),
            "items": [s.to_dict() for s in skipped],
        },
    }


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def prepare(
    sources: Source | Sequence[Source],
    out_dir: str | os.PathLike[str],
    *,
    relative_paths: bool = False,
    progress: bool = True,
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run the adapters, write one manifest per split (all three, even if empty) and ``summary.json``.

    Ids must be unique across all sources and splits. Returns the summary.
    """
    sources = [sources] if isinstance(sources, Source) else list(sources)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list[GroundingRecord]] = {s: [] for s in SPLITS}
    seen: dict[str, str] = {}
    for src in sources:
        bar = tqdm(
            src,
            total=len(src),
            desc=f"prepare {src.dataset}",
            unit="item",
            disable=not progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        for record in bar:
            if record.id in seen:
                raise DataError(
                    f"record id {record.id!r} produced twice (by {seen[record.id]} and {src.dataset})"
                )
            seen[record.id] = src.dataset
            by_split[record.split].append(record)
    for split, name in SPLIT_FILES.items():
        write_manifest(out / name, by_split[split], relative_paths=relative_paths)
    summary = summarize(by_split, sources, command)
    _write_json(out / "summary.json", summary)
    return summary


# ---------------------------------------------------------------------------------------------- CLI


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder for the manifests and summary.json"
    )
    parser.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="stop at the first bad item (raise) or skip and report it in summary.json",
    )
    parser.add_argument(
        "--relative-paths",
        action="store_true",
        help="store image/mask paths relative to --out instead of absolute",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--imports",
        nargs="+",
        default=[],
        metavar="MODULE",
        help="user modules to import first (a dotted name or a .py file), e.g. one that registers a preset",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="only read headers; do not decode/stream every image to catch truncated files",
    )


def _split_options(parser: argparse.ArgumentParser, val: float = 0.1, test: float = 0.2) -> None:
    parser.add_argument("--val-fraction", type=float, default=val, help="share of patients/cases for val")
    parser.add_argument("--test-fraction", type=float, default=test, help="share of patients/cases for test")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient/case-level split")


def _cxr_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rescale-to-image", action="store_true", help="accept resized images and scale the boxes to them"
    )
    parser.add_argument(
        "--box-tolerance",
        type=float,
        default=0.0,
        help="clip boxes that leave the image by at most this many pixels",
    )
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepare_data.py",
        description="Turn a published grounding data set into mg3d manifests (train/val/test.jsonl + summary.json).",
    )
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")

    p = sub.add_parser("mscxr", help="MS-CXR CSV + MIMIC-CXR-JPG images")
    p.add_argument("--csv", required=True, type=Path, help="MS_CXR_Local_Alignment_v1.x.0.csv")
    p.add_argument(
        "--image-root", required=True, type=Path, help="MIMIC-CXR-JPG root (the CSV paths are under it)"
    )
    p.add_argument(
        "--image-ext", default=None, help="replace the image suffix, e.g. .dcm for MIMIC-CXR DICOMs"
    )
    _split_options(p)
    _cxr_options(p)
    _common_options(p)

    p = sub.add_parser(
        "mscxr-medrpg", help="the MedRPG split of MS-CXR (VLM-R1 JSON: image, problem, solution)"
    )
    p.add_argument("--train", type=Path, help="train JSON")
    p.add_argument("--val", type=Path, help="val JSON")
    p.add_argument("--test", type=Path, help="test JSON")
    p.add_argument(
        "--image-root", required=True, type=Path, help="folder the items' image paths are relative to"
    )
    p.add_argument(
        "--long-side", type=int, default=640, help="long side of the images the boxes refer to (0: no check)"
    )
    _cxr_options(p)
    _common_options(p)

    p = sub.add_parser("chestxray8", help="NIH ChestX-ray8 BBox_List_2017.csv + PNG images")
    p.add_argument("--bbox-csv", required=True, type=Path, help="BBox_List_2017.csv")
    p.add_argument(
        "--image-root", required=True, type=Path, help="folder with the PNGs (sub-folders are searched)"
    )
    p.add_argument("--data-entry", type=Path, default=None, help="Data_Entry_2017.csv: split by patient")
    p.add_argument(
        "--test-list", type=Path, default=None, help="official test_list.txt: its images are the test split"
    )
    p.add_argument(
        "--train-val-list", type=Path, default=None, help="official train_val_list.txt (with --test-list)"
    )
    p.add_argument(
        "--expected-size",
        type=int,
        nargs=2,
        default=(1024, 1024),
        metavar=("W", "H"),
        help="image size the boxes refer to",
    )
    _split_options(p)
    _cxr_options(p)
    _common_options(p)

    p = sub.add_parser(
        "m3d-refseg", help="M3D-RefSeg case folders + CSVs (NIfTI or the preprocessed npy variant)"
    )
    p.add_argument("--root", required=True, type=Path, help="folder with the sNNNN case folders")
    p.add_argument(
        "--train-csv", type=Path, default=None, help="M3D_RefSeg_train.csv (default: found in --root)"
    )
    p.add_argument(
        "--test-csv", type=Path, default=None, help="M3D_RefSeg_test.csv (default: found in --root)"
    )
    p.add_argument("--all-csv", type=Path, default=None, help="M3D_RefSeg_all.csv, split by case instead")
    p.add_argument(
        "--variant",
        choices=("nifti", "npy"),
        default="nifti",
        help="ct.nii.gz/mask.nii.gz or ct.npy/mask.npy",
    )
    p.add_argument("--max-voxels", type=int, default=DEFAULT_MAX_VOXELS, help="refuse larger volumes")
    p.add_argument(
        "--modality",
        default="CT",
        help="modality key of the records (the layout cannot tell; M3D-RefSeg is CT)",
    )
    _split_options(p)
    _common_options(p)

    p = sub.add_parser(
        "own",
        help="your own images (NIfTI, NRRD/MHA, DICOM series, PNG/JPEG) + phrases + masks or boxes (docs/data.md)",
    )
    p.add_argument(
        "--table",
        required=True,
        type=Path,
        help=f"a CSV or JSONL table, or a folder holding {OWN_TABLE_NAME}",
    )
    p.add_argument(
        "--modality",
        required=True,
        help="modality key of every record: CT, MR, PET, CXR or a registered preset",
    )
    p.add_argument("--name", dest="dataset_name", default="own", help="data set name (record id prefix)")
    p.add_argument(
        "--box-units",
        choices=("voxel", "mm"),
        default="voxel",
        help="unit of 'box' values (RAS mm or voxels)",
    )
    p.add_argument(
        "--pet-units",
        choices=PET_UNITS,
        default=None,
        help="PET stored in Bq/ml or counts: convert to SUV (needs dose, weight and time columns)",
    )
    _split_options(p)
    _common_options(p)

    p = sub.add_parser("synthetic", help="generate phantoms in a published layout, then prepare them")
    p.add_argument("--kind", choices=("ct3d", "cxr2d"), required=True)
    p.add_argument("--n", type=int, required=True, help="number of phantom cases/images")
    p.add_argument("--gen-seed", type=int, default=0, help="seed of the phantom generator")
    p.add_argument(
        "--layout", choices=("mscxr", "chestxray8"), default="mscxr", help="on-disk layout for cxr2d"
    )
    p.add_argument(
        "--raw-dir", type=Path, default=None, help="where the phantoms are written (default: OUT/raw)"
    )
    p.add_argument(
        "--ct-shape",
        type=int,
        nargs=3,
        default=None,
        metavar=("I", "J", "K"),
        help="ct3d volume shape in stored (i, j, k) order (default: the generator's)",
    )
    _split_options(p)
    _common_options(p)
    return parser


def _sources_from_args(args: argparse.Namespace) -> list[Source]:
    verify = not args.no_verify
    if args.dataset == "mscxr":
        return [
            MSCXRSource(
                args.csv,
                args.image_root,
                image_ext=args.image_ext,
                rescale_to_image=args.rescale_to_image,
                val_fraction=args.val_fraction,
                test_fraction=args.test_fraction,
                split_seed=args.seed,
                box_tolerance=args.box_tolerance,
                verify_images=verify,
                max_pixels=args.max_pixels,
                on_error=args.on_error,
            )
        ]
    if args.dataset == "mscxr-medrpg":
        files = {s: getattr(args, s) for s in SPLITS if getattr(args, s) is not None}
        if not files:
            raise ConfigError("mscxr-medrpg needs at least one of --train, --val, --test")
        return [
            MedRPGSource(
                files,
                args.image_root,
                long_side=args.long_side or None,
                rescale_to_image=args.rescale_to_image,
                box_tolerance=args.box_tolerance,
                verify_images=verify,
                max_pixels=args.max_pixels,
                on_error=args.on_error,
            )
        ]
    if args.dataset == "chestxray8":
        return [
            ChestXray8Source(
                args.bbox_csv,
                args.image_root,
                data_entry_csv=args.data_entry,
                test_list=args.test_list,
                train_val_list=args.train_val_list,
                val_fraction=args.val_fraction,
                test_fraction=args.test_fraction,
                seed=args.seed,
                expected_size=tuple(args.expected_size),
                rescale_to_image=args.rescale_to_image,
                box_tolerance=args.box_tolerance,
                verify_images=verify,
                max_pixels=args.max_pixels,
                on_error=args.on_error,
            )
        ]
    if args.dataset == "m3d-refseg":
        return [
            M3DRefSegSource(
                args.root,
                train_csv=args.train_csv,
                test_csv=args.test_csv,
                all_csv=args.all_csv,
                variant=args.variant,
                val_fraction=args.val_fraction,
                test_fraction=args.test_fraction,
                seed=args.seed,
                verify_images=verify,
                max_voxels=args.max_voxels,
                on_error=args.on_error,
                modality=args.modality,
            )
        ]
    if args.dataset == "own":
        return [
            OwnDataSource(
                args.table,
                modality=args.modality,
                dataset=args.dataset_name,
                box_units=args.box_units,
                val_fraction=args.val_fraction,
                test_fraction=args.test_fraction,
                seed=args.seed,
                pet_units=args.pet_units,
                converted_dir=args.out / "converted",
                on_error=args.on_error,
            )
        ]
    if args.dataset == "synthetic":
        return _synthetic_sources(args)
    raise ConfigError(f"unknown data set {args.dataset!r}")


def _synthetic_sources(args: argparse.Namespace) -> list[Source]:
    """Generate phantoms with :mod:`mg3d.data.synthetic`, then read them back through the real adapters."""
    raw = args.raw_dir if args.raw_dir is not None else args.out / "raw"
    options = {} if args.ct_shape is None else {"shape": tuple(args.ct_shape)}
    return synthetic_sources(
        args.kind, raw, args.n, gen_seed=args.gen_seed, layout=args.layout, split_seed=args.seed,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, verify_images=not args.no_verify,
        on_error=args.on_error, **options,
    )  # fmt: skip


def synthetic_sources(
    kind: str,
    raw: str | os.PathLike[str],
    n: int,
    *,
    gen_seed: int = 0,
    layout: str = "mscxr",
    split_seed: int = 0,
    val_fraction: float = 0.1,
    verify_images: bool = True,
    on_error: str = "raise",
    questions_per_region: Sequence[int] | None = None,
    test_fraction: float | None = None,
    progress: bool = False,
    **options: Any,
) -> list[Source]:
    """Write ``n`` phantoms of ``kind`` (``ct3d`` / ``cxr2d``) under ``raw`` in a published layout and return
    the real adapters that read them (``options`` go to the generator, e.g. ``shape``, ``single_lesion``).
    ``test_fraction`` (default: the generator's 0.2) is the share of cases or patients in the test split;
    ``progress`` shows the writing on stderr."""
    from mg3d.data import synthetic

    raw = Path(raw)
    common = {"verify_images": verify_images, "on_error": on_error}
    if test_fraction is not None:
        options = {**options, "test_fraction": float(test_fraction)}
    if kind == "ct3d":
        extra = {} if questions_per_region is None else {"questions_per_region": tuple(questions_per_region)}
        synthetic.make_ct3d(raw, n, gen_seed, progress=progress, **extra, **options)
        return [
            M3DRefSegSource(raw, seed=split_seed, val_fraction=val_fraction, dataset="synthetic3d", **common)
        ]
    if kind != "cxr2d":
        raise ConfigError(f"unknown synthetic kind {kind!r}; use 'ct3d' or 'cxr2d'")
    mscxr_test = {} if test_fraction is None else {"test_fraction": options.pop("test_fraction")}
    if layout == "mscxr":
        synthetic.make_cxr2d(raw, n, gen_seed, layout=layout, progress=progress, **options)
        return [
            MSCXRSource(
                raw / synthetic.MSCXR_CSV_NAME,
                raw,
                split_seed=split_seed,
                dataset="synthetic2d",
                **common,
                **mscxr_test,
            )
        ]
    synthetic.make_cxr2d(raw, n, gen_seed, layout=layout, progress=progress, **options, **mscxr_test)
    return [
        ChestXray8Source(
            raw / "BBox_List_2017.csv",
            raw / "images",
            data_entry_csv=raw / "Data_Entry_2017.csv",
            test_list=raw / "test_list.txt",
            train_val_list=raw / "train_val_list.txt",
            val_fraction=val_fraction,
            seed=split_seed,
            expected_size=None,
            dataset="synthetic2d",
            **common,
        )
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/prepare_data.py``; returns the process exit code (2 on bad data or settings,
    with a one-line error naming the file, row or key)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = ["prepare_data.py", *(sys.argv[1:] if argv is None else argv)]
    try:
        import_user_modules(args.imports)
        sources = _sources_from_args(args)
        summary = prepare(
            sources,
            args.out,
            relative_paths=args.relative_paths,
            progress=not args.no_progress,
            command=command,
        )
    except (DataError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = summary["records"]
    print(
        f"wrote {counts['total']} records (train {counts['train']}, val {counts['val']}, test {counts['test']}) "
        f"to {args.out}; skipped {summary['skipped']['total']} item(s)"
    )
    return 0
