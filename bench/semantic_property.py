"""Benchmark the semantic reward's defining property per data source and per data pipeline (issue 24).

Sources: mg3d's CT phantoms and the real CT/MR images of :mod:`mg3d.studies.real_volumes` (lesions inserted,
both densities). Pipelines: ``none`` (the image as stored), ``default`` (``PipelineConfig()``) and every paper
config whose dimensionality fits the source (``configs/paper/*.yaml``, ``data.sources[0].pipeline``).
Run by hand, one thread (a single source × pipeline × 200 cases stays under ~7 min):

    OMP_NUM_THREADS=1 .venv/bin/python bench/semantic_property.py --sources phantoms --cases 200
    OMP_NUM_THREADS=1 .venv/bin/python bench/semantic_property.py --sources head_ct_atlas --pipelines m3d_refseg
    OMP_NUM_THREADS=1 .venv/bin/python bench/semantic_property.py --sources all --cases 50 --json out.jsonl

Prints one markdown row per (source, pipeline): the three rates, "both at once" per density pairing, with
95 % percentile-bootstrap intervals over cases, and the command that produced them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from mg3d.data.transforms import PipelineConfig
from mg3d.errors import ConfigError
from mg3d.studies.real_volumes import REAL_SOURCES, available_sources
from mg3d.studies.semantic_property import PropertyStudy, phantom_property_study, real_property_study

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = ("m3d_refseg", "mscxr", "chestxray8")


def paper_pipeline(name: str) -> tuple[PipelineConfig, int]:
    """The first source's pipeline of ``configs/paper/<name>.yaml`` and the dimensionality it is for."""
    path = ROOT / "configs" / "paper" / f"{name}.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    try:
        pipeline = dict(config["data"]["sources"][0].get("pipeline") or {})
    except (KeyError, IndexError, TypeError) as err:
        raise ConfigError(f"{path}: no data.sources[0].pipeline") from err
    cfg = PipelineConfig(**pipeline)
    ndim = 3 if (cfg.pixdim is not None or (cfg.spatial_size and len(cfg.spatial_size) == 3)) else 2
    return cfg, ndim


def pipelines_for(ndim: int, names: list[str]) -> list[tuple[str, PipelineConfig | None]]:
    out: list[tuple[str, PipelineConfig | None]] = []
    for name in names:
        if name == "none":
            out.append((name, None))
        elif name == "default":
            out.append((name, PipelineConfig()))
        else:
            cfg, dim = paper_pipeline(name)
            if dim == ndim:
                out.append((name, cfg))
    return out


def row(study: PropertyStudy, seconds: float) -> tuple[str, dict[str, Any]]:
    hits, ci, rates = study.hits(), study.intervals(), study.rates()

    def cell(key: str) -> str:
        h = hits[key]
        return f"{h.mean():.2f} [{ci[key][0]:.2f}, {ci[key][1]:.2f}] ({h.size})" if h.size else "—"

    means = study.rewards.mean(0)
    text = (
        f"| {study.source} | {study.pipeline} | {study.n} ({study.skipped}) | {cell('lesion_over_both')} | "
        f"{rates['lesion_over_background']:.2f} | {rates['lesion_over_organ']:.2f} | "
        f"{cell('same_density_both')} | {cell('opposite_density_both')} | "
        f"{means[0]:.2f} / {means[1]:.2f} / {means[2]:.2f} | {seconds:.0f} s |"
    )
    record = {
        "source": study.source,
        "pipeline": study.pipeline,
        "n": study.n,
        "skipped": study.skipped,
        "rates": rates,
        "intervals": ci,
        "counts": {k: int(v.size) for k, v in hits.items()},
        "mean_rewards": means.tolist(),
        "seconds": seconds,
    }
    return text, record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sources", nargs="+", default=["phantoms"], help="phantoms, real source names, or all"
    )
    parser.add_argument("--pipelines", nargs="+", default=["default", *PAPER_CONFIGS])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="append one JSON line per row to this file")
    args = parser.parse_args(argv)
    sources = ["phantoms", *available_sources()] if args.sources == ["all"] else args.sources

    print(f"`OMP_NUM_THREADS={torch.get_num_threads()} python bench/semantic_property.py "
          f"{shlex.join(argv if argv is not None else sys.argv[1:])}`\n")  # fmt: skip
    print("| source | pipeline | cases (skipped) | both at once [95 % CI] (n) | > background | > tissue "
          "| same-density pairs | opposite-density pairs | mean reward lesion / bg / tissue | time |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for source in sources:
        ndim = 3 if source == "phantoms" else REAL_SOURCES[source].ndim
        for name, cfg in pipelines_for(ndim, args.pipelines):
            start = time.perf_counter()
            if source == "phantoms":
                study = phantom_property_study(args.cases, args.seed, pipeline=cfg, pipeline_name=name)
            else:
                study = real_property_study(source, args.cases, args.seed, pipeline=cfg, pipeline_name=name)
            text, record = row(study, time.perf_counter() - start)
            print(text, flush=True)
            if args.json is not None:
                with args.json.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps({**record, "seed": args.seed}) + "\n")


if __name__ == "__main__":
    main()
