#!/usr/bin/env python
"""Data pipeline throughput: 3D and 2D samples/s cold, cached, and through the DataLoader with workers,
next to what one GRPO training step consumes (measured in the same run).

Run by hand (writes its section of docs/benchmarks.md unless --no-write)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/data_pipeline.py

Fixtures are written to a temporary folder: CT-like volumes (128×128×64 int16 ``.nii.gz``, 0.8×0.8×2.5 mm,
stored RAS so the pipeline's reorientation to LPS really flips) and radiograph-like PNGs (1024×1024, the
ChestX-ray8 size). Pipelines: 3D = LPS + 1.6×1.6×2.5 mm + CT window + resize to 112×112×32 (the grid the
tiny Qwen2.5-VL sees as 16×16×16 video patches); 2D = CXR preset + letterbox to 224×224; both with the
training augmentations (target crop, noise, gamma).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset, Dataset
from PIL import Image

from mg3d.data.datamodule import GroundingDataModule, SourceConfig
from mg3d.data.records import GroundingRecord, write_manifest
from mg3d.data.transforms import AugmentConfig, PipelineConfig, build_pipeline, record_to_item

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Data pipeline (`bench/data_pipeline.py`)"
AUG = dict(target_crop_prob=0.5, noise_prob=0.5, gamma_prob=0.5)
CONFIG_3D = PipelineConfig(spatial_size=(112, 112, 32), pixdim=(1.6, 1.6, 2.5), augment=AugmentConfig(**AUG))
CONFIG_2D = PipelineConfig(spatial_size=(224, 224), fit="letterbox", augment=AugmentConfig(**AUG))


def write_fixtures(root: Path, n3: int, n2: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    ct, cxr = root / "ct", root / "cxr"
    ct.mkdir(parents=True)
    cxr.mkdir(parents=True)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    records = []
    for i in range(n3):
        vol = rng.normal(-700, 40, (128, 128, 64)).astype(np.int16)
        lo = rng.integers(10, 90, 3)
        lo[2] = rng.integers(5, 40)
        hi = lo + np.array([20, 16, 10])
        vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 300
        nib.save(nib.Nifti1Image(vol, affine), ct / f"ct{i}.nii.gz")
        records.append(GroundingRecord(
            id=f"bench3d/{i}", dataset="bench3d", split="train", modality="CT", ndim=3, image=f"ct{i}.nii.gz",
            text="the lesion in the left lung", boxes=(tuple(float(v) for v in [*lo, *hi]),),
            spatial_shape=(128, 128, 64), spacing=(0.8, 0.8, 2.5), affine=tuple(map(tuple, affine.tolist())),
        ))  # fmt: skip
    write_manifest(ct / "train.jsonl", records)
    records = []
    for i in range(n2):
        img = rng.normal(90, 20, (1024, 1024)).clip(0, 255).astype(np.uint8)
        x, y = rng.integers(100, 800, 2)
        img[y : y + 120, x : x + 150] = 220
        Image.fromarray(img).save(cxr / f"cxr{i}.png")
        records.append(GroundingRecord(
            id=f"bench2d/{i}", dataset="bench2d", split="train", modality="CXR", ndim=2, image=f"cxr{i}.png",
            text="opacity in the right lower zone", boxes=((float(x), float(y), float(x + 150), float(y + 120)),),
            spatial_shape=(1024, 1024),
        ))  # fmt: skip
    write_manifest(cxr / "train.jsonl", records)
    return ct, cxr


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def bench_pipeline(manifest_dir: Path, config: PipelineConfig, ndim: int, epochs: int) -> dict[str, float]:
    from mg3d.data.records import read_manifest

    items = [record_to_item(r) for r in read_manifest(manifest_dir / "train.jsonl")]
    pipeline = build_pipeline(config, ndim, train=True).set_random_state(0)
    cold = Dataset(items, pipeline)
    t0 = time.perf_counter()
    for i in range(len(cold)):
        cold[i]
    cold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache = CacheDataset(items, pipeline.deterministic, progress=False, num_workers=1)
    fill_s = time.perf_counter() - t0
    cached = Dataset(cache, pipeline.random)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    for _ in range(epochs):
        for i in range(len(cached)):
            cached[i]
    cached_s = time.perf_counter() - t0
    return {
        "n": len(items),
        "cold_samples_per_s": _rate(len(items), cold_s),
        "cache_fill_s": fill_s,
        "cached_samples_per_s": _rate(epochs * len(items), cached_s),
    }


def bench_loader(manifest_dir: Path, config: PipelineConfig, workers: int, batch: int, batches: int) -> float:
    dm = GroundingDataModule(
        [SourceConfig(str(manifest_dir), pipeline=config)],
        batch_size=batch,
        num_workers=workers,
        cache="memory",
        samples_per_epoch=batch * (batches + 1),
    )
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)  # workers started, first batch out
    t0 = time.perf_counter()
    n = sum(len(b) for b in it)
    return _rate(n, time.perf_counter() - t0)


class _StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.times.append(time.perf_counter() - self._t)


def bench_training_step(manifest_dir: Path, prompts: int, steps: int, generations: int) -> dict[str, float]:
    """Seconds per GRPO step of the tiny policy on 3D prompts (data loading excluded)."""
    from mg3d.generation import RolloutConfig
    from mg3d.grpo.config import EvalConfig
    from mg3d.grpo.module import GRPOModule

    module = GRPOModule(
        rollout=RolloutConfig(num_generations=generations), evaluation=EvalConfig(enabled=False)
    )
    dm = GroundingDataModule([SourceConfig(str(manifest_dir), pipeline=CONFIG_3D)], batch_size=prompts,
                             cache="memory", samples_per_epoch=prompts * steps)  # fmt: skip
    timer = _StepTimer()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                        num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    measured = timer.times[1:] or timer.times  # the first step pays one-off costs (graph warm-up)
    step_s = float(np.median(measured))
    return {"prompts_per_step": prompts, "generations": generations, "step_s": step_s,
            "samples_per_s": prompts / step_s}  # fmt: skip


def write_section(results: dict[str, Any], path: Path) -> None:
    r3, r2, step = results["3d"], results["2d"], results["train_step"]
    lines = [
        SECTION,
        "",
        f"Measured {results['date']} on {results['machine']} (torch threads: {results['threads']}, other jobs "
        "running). Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/data_pipeline.py`.",
        "",
        "| pipeline | cold (decode every time) | cache fill | cached (random part only) | DataLoader, "
        f"{results['workers']} workers, cached |",
        "| --- | --- | --- | --- | --- |",
        f"| 3D: {r3['n']} × 128×128×64 `.nii.gz` → LPS, 1.6×1.6×2.5 mm, CT window, 112×112×32 | "
        f"{r3['cold_samples_per_s']:.1f} samples/s | {r3['cache_fill_s']:.1f} s | "
        f"**{r3['cached_samples_per_s']:.1f} samples/s** | {r3['loader_samples_per_s']:.1f} samples/s |",
        f"| 2D: {r2['n']} × 1024² PNG → CXR preset, letterbox 224² | {r2['cold_samples_per_s']:.1f} samples/s | "
        f"{r2['cache_fill_s']:.1f} s | **{r2['cached_samples_per_s']:.1f} samples/s** | "
        f"{r2['loader_samples_per_s']:.1f} samples/s |",
        "",
        f"One GRPO training step of the tiny policy (Lightning `Trainer`, {step['prompts_per_step']} 3D prompts × "
        f"G = {step['generations']} completions, data loading excluded, median over steps after the first): "
        f"**{step['step_s']:.2f} s**, i.e. it consumes **{step['samples_per_s']:.2f} samples/s**.",
        "",
        f"Ratio cached 3D pipeline / training consumption: **{results['ratio_cached']:.0f}×** "
        f"(through the DataLoader with workers: {results['ratio_loader']:.0f}×). The requirement is ≥ 10×: "
        "after the first epoch the data pipeline is never the bottleneck; the cold path (first epoch, or "
        '`cache="none"`) is dominated by gzip decoding and respacing of the full-resolution volume.',
        "",
    ]
    text = (
        path.read_text(encoding="utf-8")
        if path.exists()
        else "# Benchmarks\n\nMeasured by hand; each section names its command.\n\n"
    )
    pattern = re.compile(re.escape(SECTION) + r".*?(?=^## |\Z)", flags=re.DOTALL | re.MULTILINE)
    block = "\n".join(lines) + "\n"
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n3", type=int, default=12, help="number of volumes")
    parser.add_argument("--n2", type=int, default=12, help="number of radiographs")
    parser.add_argument("--epochs", type=int, default=3, help="epochs over the cached samples")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps to time")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per GRPO step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mg3d_bench_") as tmp:
        ct, cxr = write_fixtures(Path(tmp), args.n3, args.n2)
        results: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s) per process",
            "threads": args.threads,
            "workers": args.workers,
            "3d": bench_pipeline(ct, CONFIG_3D, 3, args.epochs),
            "2d": bench_pipeline(cxr, CONFIG_2D, 2, args.epochs),
        }
        results["3d"]["loader_samples_per_s"] = bench_loader(ct, CONFIG_3D, args.workers, 4, 2 * args.n3 // 4)
        results["2d"]["loader_samples_per_s"] = bench_loader(
            cxr, CONFIG_2D, args.workers, 4, 2 * args.n2 // 4
        )
        print(json.dumps({k: results[k] for k in ("3d", "2d")}), flush=True)  # data numbers first
        results["train_step"] = bench_training_step(ct, args.prompts, args.steps, args.generations)
    consumption = results["train_step"]["samples_per_s"]
    results["ratio_cached"] = results["3d"]["cached_samples_per_s"] / consumption
    results["ratio_loader"] = results["3d"]["loader_samples_per_s"] / consumption
    print(json.dumps(results, indent=2))
    if not args.no_write:
        write_section(results, ROOT / "docs" / "benchmarks.md")
    return 0 if results["ratio_cached"] >= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
