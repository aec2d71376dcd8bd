#!/usr/bin/env python
"""Peak memory (RSS) of the 3D data pipeline and of a training step at the demo settings.

Run by hand (writes its section of docs/benchmarks.md unless --no-write)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/memory.py

The demo's data are written first (``configs/demo.yaml``: 900 single-lesion CT phantoms of 64×64×16 voxels in
the M3D-RefSeg layout, fitted to 56×56×16 by the pipeline). Each measurement then runs in a fresh process, so
every peak is its own: the kernel's high-water mark (``VmHWM``) is read at each stage.

* ``imports`` — Python, torch, MONAI, Lightning, transformers and mg3d imported (the floor of every process).
* ``pipeline, cache="none"`` — one epoch of training batches (batch 16) through the DataModule, decoded on
  every draw: volumes are streamed, so the peak does not grow with the number of phantoms.
* ``pipeline, cache="memory"`` — the demo's setting: the preprocessed volumes are held (the cache's size is
  reported), then one epoch of batches.
* ``training step`` — the demo's module and DataModule built by the real LightningCLI from ``configs/demo.yaml``
  (tiny policy, batch 16, G = 8, 28 new tokens, video strategy, 64 vision tokens) and a Lightning ``fit`` of one
  warm-start step and one GRPO step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Memory (`bench/memory.py`)"
DEMO_SHAPE = [64, 64, 16]
DEMO_GRID = [56, 56, 16]


def _status_mb() -> dict[str, float]:
    """Current and peak resident set size (MB) from /proc, or the peak from getrusage elsewhere."""
    status = Path("/proc/self/status")
    if status.is_file():
        fields = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status.read_text(), flags=re.MULTILINE))
        return {"rss_mb": int(fields["VmRSS"]) / 1024, "peak_mb": int(fields["VmHWM"]) / 1024}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 1024
    return {"rss_mb": float("nan"), "peak_mb": peak_mb}


def _reset_peak() -> bool:
    """Start a new high-water mark (Linux: ``echo 5 > /proc/self/clear_refs``), so each step's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _source(data: Path, n: int) -> dict[str, Any]:
    return {
        "path": str(data),
        "synthetic": {"kind": "ct3d", "n": n, "seed": 0, "questions_per_region": [1, 0],
                      "options": {"shape": DEMO_SHAPE, "single_lesion": True, "question_style": "phrase"}},
        "pipeline": {"spatial_size": DEMO_GRID},
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- phases (child)


def phase_imports(args: argparse.Namespace) -> dict[str, Any]:
    import lightning  # noqa: F401
    import monai  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import mg3d.cli  # noqa: F401

    return {"after_imports": _status_mb()}


def phase_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    from mg3d.data.datamodule import GroundingDataModule, SourceConfig

    out: dict[str, Any] = {"after_imports": _status_mb()}
    source = SourceConfig(**_source(args.data, args.n), max_records=args.max_records)
    dm = GroundingDataModule([source], batch_size=16, cache=args.cache)
    start = time.perf_counter()
    dm.setup("fit")
    out["setup_s"] = time.perf_counter() - start
    out["after_setup"] = _status_mb()
    parts = dm.build_split("train") + dm.build_split("val")
    sample = parts[0].dataset[0]
    per_volume = sum(v.numel() * v.element_size() for v in sample.values() if hasattr(v, "element_size"))
    out["records"] = sum(p.size for p in parts)
    out["bytes_per_preprocessed_volume"] = int(per_volume)
    out["cache_mb"] = per_volume * out["records"] / 2**20 if args.cache == "memory" else 0.0
    start = time.perf_counter()
    batches = sum(1 for _ in dm.train_dataloader())
    out["epoch_s"] = time.perf_counter() - start
    out["batches"] = batches
    out["after_epoch"] = _status_mb()
    return out


def phase_train(args: argparse.Namespace) -> dict[str, Any]:
    from mg3d.cli import main

    out: dict[str, Any] = {"after_imports": _status_mb()}
    cli = main(
        ["--config", str(ROOT / "configs" / "demo.yaml"), f"--data.sources=[{json.dumps(_source(args.data, args.n))}]",
         "--trainer.max_steps=2", "--model.warm_start.steps=1", "--model.evaluation.enabled=false",
         "--trainer.logger=false", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         f"--trainer.default_root_dir={args.data.parent / 'runs'}"],
        run=False,
    )  # fmt: skip
    out["after_build"] = _status_mb()
    steps: list[dict[str, Any]] = []

    import lightning.pytorch as pl

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # data set up, cache filled
            out["after_setup"] = _status_mb()
            out["per_step_peaks"] = _reset_peak()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append({"step": trainer.global_step, **_status_mb()})
            _reset_peak()

    cli.trainer.callbacks.append(Probe())
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    out["fit_s"] = time.perf_counter() - start
    out["steps"] = steps
    out["settings"] = {
        "batch_size": cli.datamodule.batch_size,
        "num_generations": cli.model.rollout_config.num_generations,
        "max_new_tokens": cli.model.rollout_config.max_new_tokens,
        "steps_per_generation": cli.model.steps_per_generation,
        "parameters": sum(p.numel() for p in cli.model.model.parameters()),
    }
    out["after_fit"] = _status_mb()
    return out


PHASES = {"imports": phase_imports, "pipeline": phase_pipeline, "train": phase_train}


# ---------------------------------------------------------------------------------------------- driver


def _child(
    phase: str, data: Path, n: int, cache: str = "memory", max_records: int | None = None
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--phase", phase, "--data", str(data), "--n", str(n), "--cache", cache]
    if max_records is not None:
        cmd += ["--max-records", str(max_records)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if run.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def prepare_data(data: Path, n: int) -> float:
    from mg3d.data.datamodule import GroundingDataModule, SourceConfig

    start = time.perf_counter()
    GroundingDataModule([SourceConfig(**_source(data, n))]).prepare_data()
    return time.perf_counter() - start


def write_section(r: dict[str, Any], path: Path) -> None:
    imp, none, mem, train = r["imports"], r["pipeline_none"], r["pipeline_memory"], r["train"]
    small = r["pipeline_none_small"]
    s = train["settings"]
    warm, grpo = train["steps"][0], train["steps"][-1]
    own = "peak of this step alone" if train.get("per_step_peaks") else "peak so far"
    lines = [
        SECTION,
        "",
        f"Measured {r['date']} on {r['machine']} (one torch thread, other jobs running). Command: "
        "`OMP_NUM_THREADS=1 .venv/bin/python bench/memory.py`. Peak = the kernel's high-water mark of the "
        "resident set (`VmHWM`) of a fresh process per row.",
        "",
        f"Data: the demo's {r['n']} CT phantoms (64×64×16 int16 `.nii.gz`, {mem['records']} records in train + val), "
        f"fitted to 56×56×16; a preprocessed sample holds {mem['bytes_per_preprocessed_volume'] / 1024:.0f} kB of tensors.",
        "",
        "| process | peak RSS | of which over the imports |",
        "| --- | --- | --- |",
        f"| imports only (torch, MONAI, Lightning, transformers, mg3d) | {imp['after_imports']['peak_mb']:.0f} MB | – |",
        f'| 3D pipeline, `cache="none"`, one epoch of batches of 16, {small["records"]} records '
        f"({small['batches']} batches) | {small['after_epoch']['peak_mb']:.0f} MB | "
        f"{small['after_epoch']['peak_mb'] - small['after_imports']['peak_mb']:.0f} MB |",
        f'| 3D pipeline, `cache="none"`, one epoch of batches of 16, {none["records"]} records '
        f"({none['batches']} batches) | "
        f"{none['after_epoch']['peak_mb']:.0f} MB | {none['after_epoch']['peak_mb'] - none['after_imports']['peak_mb']:.0f} MB |",
        f'| 3D pipeline, `cache="memory"` (the demo), cache filled + one epoch | {mem["after_epoch"]["peak_mb"]:.0f} MB | '
        f"{mem['after_epoch']['peak_mb'] - mem['after_imports']['peak_mb']:.0f} MB (cache: {mem['cache_mb']:.0f} MB) |",
        f"| training at the demo settings: model + DataModule built, cache filled | {train['after_setup']['peak_mb']:.0f} MB | "
        f"{train['after_setup']['peak_mb'] - train['after_imports']['peak_mb']:.0f} MB |",
        f"| … a warm-start step (batch {s['batch_size']}; {own}) | {warm['peak_mb']:.0f} MB | "
        f"{warm['peak_mb'] - train['after_imports']['peak_mb']:.0f} MB |",
        f"| … a GRPO step: batch {s['batch_size']} × G = {s['num_generations']} completions of ≤ {s['max_new_tokens']} "
        f"tokens, {s['steps_per_generation']} optimiser steps, {s['parameters'] / 1e6:.1f} M parameters ({own}) | "
        f"**{grpo['peak_mb']:.0f} MB** | {grpo['peak_mb'] - train['after_imports']['peak_mb']:.0f} MB |",
        "",
        f"Volumes are streamed: without the cache the pipeline's peak is {small['after_epoch']['peak_mb']:.0f} MB for "
        f"{small['records']} records and {none['after_epoch']['peak_mb']:.0f} MB for {none['records']} (one batch of "
        "decoded volumes at a time, whatever the size of the data set). "
        "The demo's memory cache holds "
        f"every preprocessed volume — {mem['cache_mb']:.0f} MB for {mem['records']} records, "
        f"{mem['bytes_per_preprocessed_volume'] / 1024:.0f} kB each — and grows linearly with the data; for data "
        "sets larger than memory use `cache: disk` (same speed after the first epoch) or `cache: none`. "
        f"A GRPO step peaks {grpo['peak_mb'] - train['after_setup']['peak_mb']:.0f} MB above the built run "
        f"(rollout of {s['batch_size'] * s['num_generations']} completions with a shared prompt prefill, log-probs "
        "and the backward passes).",
        "",
    ]
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n\n"
    block = "\n".join(lines) + "\n"
    pattern = re.compile(re.escape(SECTION) + r".*?(?=^## |\Z)", flags=re.DOTALL | re.MULTILINE)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=900, help="phantoms (the demo writes 900)")
    parser.add_argument("--data", type=Path, default=None, help="phantom folder (default: a temporary one)")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="memory", help=argparse.SUPPRESS)
    parser.add_argument("--max-records", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:  # child process: one measurement, one JSON line
        print(json.dumps(PHASES[args.phase](args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="mg3d-memory-") as tmp:
        data = args.data or Path(tmp) / "ct3d"
        results: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "n": args.n,
            "prepare_s": prepare_data(data, args.n),
        }
        results["imports"] = _child("imports", data, args.n)
        results["pipeline_none"] = _child("pipeline", data, args.n, "none")
        results["pipeline_none_small"] = _child("pipeline", data, args.n, "none", max(1, args.n // 10))
        results["pipeline_memory"] = _child("pipeline", data, args.n, "memory")
        results["train"] = _child("train", data, args.n)
    print(json.dumps(results, indent=2))
    if not args.no_write:
        write_section(results, ROOT / "docs" / "benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
