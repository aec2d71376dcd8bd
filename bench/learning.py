#!/usr/bin/env python
"""The learning study: what each MedGround-R1 component buys on a demo's synthetic benchmark (3D or 2D).

Run by hand, alone on the machine (one torch thread, runs one after the other)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/learning.py --md docs/bench_learning.md --figures docs/figures
    OMP_NUM_THREADS=1 .venv/bin/python bench/learning.py --smoke    # < 1 min: tiny data, a few steps
    OMP_NUM_THREADS=1 .venv/bin/python bench/learning.py --config configs/demo_2d.yaml --out runs/bench_learning_2d

The defaults (3 seeds, 400 + 50 warm-start steps, 48 GRPO steps per arm, 900 phantoms) fit about 40 CPU-minutes
on a 2-core machine; ``--reuse-warm-starts`` skips the warm starts of an earlier run, ``--warm-start-ckpt``
starts from other checkpoints (e.g. ``make demo``'s), ``--from-pretrained`` starts every seed from the config's
``policy.checkpoint`` (``configs/demo.yaml``: the demo's pretrained policy; not yet run) instead of random init,
``--report-only`` rebuilds the report from the JSON.

Benchmark: the ``--config`` demo as it stands — by default ``configs/demo.yaml``, single-lesion CT phantoms
(64×64×16, M3D-RefSeg layout, real adapter and MONAI pipeline, 56×56×16 video); ``configs/demo_2d.yaml`` runs
the same study on chest-radiograph phantoms (ChestX-ray8 layout, 2D). The tiny random-init Qwen2.5-VL and the
config's (terse) prompt, scored on the phantoms' held-out ``test`` split (cases never drawn in training), greedy
and one sample at T = 1. Every seed changes the policy's initial weights, the data order and the sampling seed.
Everything reads the box dimension from the data (boxes, trail grid, constant-box baseline), so one script
serves both.

Arms, per seed, all GRPO arms starting from the *same* warm-start weights of that seed:

* ``warm_start`` — the supervised warm start alone (terse answer format);
* ``binary`` — GRPO, format + binary IoU > 0.5 (``iou_binary``: the paper's released reward);
* ``binary+iou`` — plus the continuous IoU;
* ``binary+semantic`` — plus the semantic consistency reward (``mg3d.rewards.semantic``);
* ``binary+cob`` — the Chain-of-Box prompt (``chain_of_box`` template, strict format) plus its consistency
  reward (``mg3d.rewards.chain_of_box``), from a Chain-of-Box warm start;
* ``full`` — Chain-of-Box prompt, strict format + binary IoU + IoU + semantic + Chain-of-Box rewards;
* ``sft`` — continued supervised training for the wall time that ``binary+iou`` took (GRPO vs SFT).

Rewards are an unweighted sum, as in the paper. Warm starts are shared: ``--warm-steps`` supervised steps on
the terse template per seed, then ``--branch-steps`` more on each answer format (terse, and Chain-of-Box),
so every arm has had the same number of supervised steps. The Chain-of-Box arms are configured through
:class:`mg3d.grounding.PromptConfig` (see :func:`cob_prompt_fields`): the warm start teaches a *box trail*,
``<think>the lesion [coarse box]</think>`` with the answer box widened outward to a coarse grid, then the exact
answer — a coarse-to-fine chain the consistency reward can check (``--trail coarse`` =
``warm_start_reasoning: coarse_box``, grid ``--trail-grid`` = ``trail_grid``; ``--trail none`` = ``empty``,
mg3d's default ``<think></think>``, which gives that reward nothing to score). Chain-of-Box arms ask
"Find {phrase}." (``--cob-instruction terse`` = ``instruction: terse``) unless ``--cob-instruction full``
(``instruction: template``, the template's own ~712-token instruction, about 10× the cost of a step).

Reported: held-out mIoU and Acc@0.5 per arm with 95 % bootstrap intervals over the held-out cases and
Student-t intervals over the seeds, differences to ``binary`` paired by case and seed (same warm start),
the share of zero-variance groups (``frac_reward_zero_std``) and the mean completion length over training,
and training seconds. Results go to ``<out>/learning.json``, a markdown section (``--md``) and one PNG per
study (``--figures``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mg3d.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
TERSE, COB = "terse", "chain_of_box"
ARMS = ("warm_start", "binary", "binary+iou", "binary+semantic", "binary+cob", "full", "sft")
GRPO_ARMS = ("binary", "binary+iou", "binary+semantic", "binary+cob", "full")
SFT_MATCH = "binary+iou"  # the GRPO arm whose wall time the continued-SFT arm gets


# ------------------------------------------------------------------------------------------------- arms


@dataclass(frozen=True)
class Arm:
    """One way of training from a warm start: prompt template and reward set (empty = supervised)."""

    name: str
    template: str
    rewards: dict[str, Any] = field(default_factory=dict)


def arm_spec(name: str) -> Arm:
    """The template and rewards of arm ``name`` (weights 1: the paper's unweighted sum)."""
    lenient = {"format": {"mode": "lenient"}, "iou_binary": {"threshold": 0.5}}
    strict = {"format": {"mode": "strict"}, "iou_binary": {"threshold": 0.5}}
    specs = {
        "warm_start": Arm(name, TERSE),
        "sft": Arm(name, TERSE),
        "binary": Arm(name, TERSE, lenient),
        "binary+iou": Arm(name, TERSE, {**lenient, "iou": 1.0}),
        "binary+semantic": Arm(name, TERSE, {**lenient, "semantic": {"mode": "all"}}),
        "binary+cob": Arm(name, COB, {**strict, "chain_of_box": 1.0}),
        "full": Arm(name, COB, {**strict, "iou": 1.0, "semantic": {"mode": "all"}, "chain_of_box": 1.0}),
    }
    if name not in specs:
        raise SystemExit(f"unknown arm {name!r}; known: {', '.join(ARMS)}")
    return specs[name]


# ------------------------------------------------------------------------------------------------ config


def load_demo(path: Path) -> dict[str, Any]:
    """The demo's YAML (``model`` and ``data`` sections), read as LightningCLI would."""
    import yaml

    with path.open(encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    for key in ("model", "data"):
        if key not in cfg:
            raise SystemExit(f"{path}: no '{key}' section — is this a mg3d training config?")
    return cfg


def data_folder(cfg: Mapping[str, Any], n: int) -> Path:
    """The demo's data folder when ``n`` is the demo's phantom count (shared with ``make demo``), else its own.

    The bench's own folder is named by the generator settings (kind, layout, options: a short hash), because
    the DataModule reuses any folder that already holds a manifest — two configs must never share one.
    """
    source = cfg["data"]["sources"][0]
    spec = source["synthetic"]
    if n == spec["n"]:
        return ROOT / source["path"]
    key = json.dumps({k: v for k, v in spec.items() if k != "n"}, sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:8]
    return ROOT / "data" / "bench_learning" / f"{spec.get('kind', 'ct3d')}-n{n}-{digest}"


def benchmark_label(cfg: Mapping[str, Any], config: Path) -> dict[str, Any]:
    """What the report says the benchmark is: the config file, the phantom kind and the box dimension."""
    spec = cfg["data"]["sources"][0]["synthetic"]
    kind = spec.get("kind", "ct3d")
    ndim = 2 if kind == "cxr2d" else 3
    if kind == "cxr2d":
        what = f"chest-radiograph phantoms, {spec.get('layout', 'mscxr')} layout, 2D boxes"
    else:
        what = "single-lesion CT phantoms, M3D-RefSeg layout, 3D boxes"
    try:
        name = str(config.resolve().relative_to(ROOT))
    except ValueError:
        name = str(config)
    return {"config": name, "what": what, "ndim": ndim}


def build_datamodule(cfg: Mapping[str, Any], n: int, seed: int) -> Any:
    """The demo's DataModule with ``n`` phantoms; ``seed`` sets the training draw order."""
    from mg3d.data.datamodule import GroundingDataModule, SourceConfig

    source = copy.deepcopy(cfg["data"]["sources"][0])
    source["path"] = str(data_folder(cfg, n))
    source["synthetic"]["n"] = n
    rest = {k: v for k, v in cfg["data"].items() if k != "sources"}
    return GroundingDataModule(sources=[SourceConfig(**source)], **{**rest, "seed": seed})


def build_module(
    cfg: Mapping[str, Any],
    arm: Arm,
    *,
    seed: int,
    warm_steps: int,
    cob_new_tokens: int,
    trail: str,
    trail_grid: Sequence[int],
    cob_instruction: str,
    from_pretrained: bool = False,
) -> Any:
    """A ``GRPOModule`` with the demo's settings, the arm's template and rewards, and no built-in evaluation.

    ``warm_steps`` > 0 makes it a supervised run (``warm_start.steps``; the bench stops it by step or time).
    The policy is the tiny model from random init (seeded), unless ``from_pretrained``: then the config's
    ``policy.checkpoint`` (``configs/demo.yaml``: the shipped pretrained policy), the same weights for every seed.
    """
    from mg3d.generation import RolloutConfig
    from mg3d.grounding import PromptConfig
    from mg3d.grpo.config import EvalConfig, OptimConfig, WarmStartConfig
    from mg3d.grpo.loss import GRPOLossConfig
    from mg3d.grpo.module import GRPOModule
    from mg3d.model import PolicyConfig

    m = cfg["model"]
    tokens = cob_new_tokens if arm.template == COB else m["rollout"]["max_new_tokens"]
    fields = cob_prompt_fields(trail, trail_grid, cob_instruction) if arm.template == COB else {}
    prompt = PromptConfig(**{**m["prompt"], "template": arm.template, **fields})
    policy = {**m["policy"], "seed": seed}
    if not from_pretrained:
        policy["checkpoint"] = None
    return GRPOModule(
        policy=PolicyConfig(**policy),
        prompt=prompt,
        rollout=RolloutConfig(**{**m["rollout"], "max_new_tokens": tokens}),
        loss=GRPOLossConfig(**m["loss"]),
        # A supervised run still builds a reward set; format alone is the cheapest valid one.
        rewards=arm.rewards or {"format": {"mode": "lenient"}},
        optim=OptimConfig(**m["optim"]),
        warm_start=WarmStartConfig(**{**m["warm_start"], "steps": warm_steps}),
        evaluation=EvalConfig(**{**m["evaluation"], "enabled": False, "max_new_tokens": tokens}),
        steps_per_generation=m.get("steps_per_generation", 1),
        sampling_seed=seed,
        log_completions_every_n_steps=0,
    )


def cob_prompt_fields(trail: str, trail_grid: Sequence[int], instruction: str) -> dict[str, Any]:
    """The ``PromptConfig`` fields of the Chain-of-Box arms, from the bench's flags.

    ``instruction="terse"`` asks "Find {phrase}." instead of the ``chain_of_box`` template's 712-token
    instruction: the random-init policy cannot read either, and the long one made a supervised step 11× and a
    GRPO step > 6× slower (measured). The answer format and the strict format rule stay the template's.
    """
    return {
        "instruction": "terse" if instruction == "terse" else "template",
        "warm_start_reasoning": "coarse_box" if trail == "coarse" else "empty",
        "trail_grid": tuple(trail_grid),
    }


# ----------------------------------------------------------------------------------------------- running


def make_logger_and_budget() -> tuple[Any, Any]:
    """An in-memory Lightning logger (every logged step) and a callback that stops by step or by time."""
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers.logger import Logger

    class MemoryLogger(Logger):
        """Keeps each logged step's scalars; the bench reads curves from it instead of CSV files."""

        def __init__(self) -> None:
            super().__init__()
            self.rows: list[dict[str, float]] = []

        @property
        def name(self) -> str:
            return "memory"

        @property
        def version(self) -> str:
            return "0"

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            return None

        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            self.rows.append({"step": float(step or 0), **{k: float(v) for k, v in metrics.items()}})

    class Budget(Callback):
        """Stops ``fit`` after ``max_steps`` optimiser steps or ``max_seconds`` of training; times the run."""

        def __init__(self) -> None:
            self.max_steps: int | None = None
            self.max_seconds: float | None = None
            self.start = 0.0
            self.seconds = 0.0

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            self.seconds = time.perf_counter() - self.start
            if (self.max_steps is not None and trainer.global_step >= self.max_steps) or (
                self.max_seconds is not None and self.seconds >= self.max_seconds
            ):
                trainer.should_stop = True

    return MemoryLogger(), Budget()


@dataclass
class RunLog:
    """What one ``fit`` did: optimiser steps, training seconds and the logged scalars of every step."""

    steps: int
    seconds: float
    rows: list[dict[str, float]]

    def series(self, key: str) -> list[tuple[float, float]]:
        return [(r["step"], r[key]) for r in self.rows if key in r and math.isfinite(r[key])]


def fit(
    module: Any, dm: Any, root: Path, *, max_steps: int | None = None, max_seconds: float | None = None
) -> RunLog:
    """Train ``module`` on ``dm`` with a plain Lightning ``Trainer`` until a step or time budget."""
    import lightning.pytorch as pl

    logger, budget = make_logger_and_budget()
    budget.max_steps, budget.max_seconds = max_steps, max_seconds
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=-1,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        logger=logger,
        callbacks=[budget],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=str(root),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*(max_epochs|does not have many workers|LightningModule.log).*"
        )
        trainer.fit(module, datamodule=dm)
    return RunLog(int(trainer.global_step), budget.seconds, logger.rows)


def save_weights(module: Any, path: Path) -> None:
    """The policy's weights as safetensors (what ``--warm-start-ckpt`` also accepts)."""
    from safetensors.torch import save

    from mg3d.atomic import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    data = save(state)  # safetensors bytes, written through mg3d's one atomic write
    atomic_write(path, lambda handle: handle.write(data))


def load_weights(module: Any, path: Path) -> int | None:
    """Load weights from a bench ``.safetensors`` or a mg3d Lightning ``.ckpt``; returns its step if known."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state, step = load_file(str(path)), None
    else:
        from mg3d.checkpointing import load_checkpoint_safely

        ckpt = load_checkpoint_safely(path)
        if "state_dict" not in ckpt:
            raise SystemExit(f"{path}: no 'state_dict' — not a Lightning checkpoint of a GRPOModule")
        state, step = ckpt["state_dict"], ckpt.get("global_step")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        first = next(
            (ln for ln in lines if "size mismatch" in ln or "Missing" in ln or "Unexpected" in ln), lines[0]
        )
        raise SystemExit(
            f"{path}: weights do not fit the demo's policy ({first[:200]}); "
            "was it trained with the --config file's model sizes?"
        ) from None
    return None if step is None else int(step)


def evaluate(module: Any, samples: Sequence[Mapping[str, Any]], batch_size: int) -> dict[str, list[float]]:
    """Per-case IoU on the held-out samples, greedy and one sample at T = 1 (the module's own decoding)."""
    import lightning.pytorch as pl
    import torch

    try:
        module.trainer  # noqa: B018 - predict_samples needs a trainer attached (for the rank)
    except RuntimeError:
        module.trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    out: dict[str, list[float]] = {}
    was_training = module.model.training
    module.model.eval()
    try:
        with torch.no_grad():
            for mode, sampled in (("greedy", False), ("sampled", True)):
                ious: list[float] = []
                for i in range(0, len(samples), batch_size):
                    _, _, batch_ious = module.predict_samples(samples[i : i + batch_size], sampled=sampled)
                    ious.extend(float(v) for v in batch_ious)
                out[mode] = ious
    finally:
        module.model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------------ study


@dataclass
class Settings:
    """The study's knobs (command-line flags)."""

    seeds: list[int]
    n_phantoms: int
    eval_n: int
    eval_split: str
    warm_steps: int
    branch_steps: int
    cob_branch_steps: int
    grpo_steps: int
    arms: list[str]
    cob_new_tokens: int
    trail: str
    trail_grid: list[int]
    cob_instruction: str
    warm_start_ckpt: dict[int, Path]
    reuse_warm_starts: bool
    out: Path
    from_pretrained: bool = False


class Study:
    """Runs every arm of every seed, one ``fit`` at a time, and keeps the results in one JSON-able dict."""

    def __init__(self, cfg: dict[str, Any], s: Settings) -> None:
        self.cfg, self.s = cfg, s
        self.results: dict[str, Any] = {"runs": {}, "warm_starts": {}}
        self.eval_batch = int(cfg["model"]["evaluation"].get("batch_size", 50))
        self.start = time.perf_counter()

    def log(self, msg: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {msg}", flush=True)

    def module(self, arm: Arm, seed: int, warm_steps: int = 0) -> Any:
        s = self.s
        return build_module(
            self.cfg, arm, seed=seed, warm_steps=warm_steps, cob_new_tokens=s.cob_new_tokens,
            trail=s.trail, trail_grid=s.trail_grid, cob_instruction=s.cob_instruction,
            from_pretrained=s.from_pretrained,
        )  # fmt: skip

    def record(
        self, seed: int, name: str, run: RunLog | None, ious: dict[str, list[float]], **extra: Any
    ) -> None:
        entry: dict[str, Any] = {"ious": ious, **extra}
        for mode, vals in ious.items():
            arr = np.asarray(vals)
            entry[f"{mode}/mIoU"] = float(arr.mean())
            entry[f"{mode}/acc@0.5"] = float((arr >= 0.5).mean())
        if run is not None:
            entry.update(steps=run.steps, seconds=run.seconds, curves=curves(run))
        self.results["runs"].setdefault(str(seed), {})[name] = entry
        self.log(
            f"seed {seed} {name}: greedy mIoU {entry['greedy/mIoU']:.3f} Acc@0.5 {entry['greedy/acc@0.5']:.3f}, "
            f"sampled mIoU {entry['sampled/mIoU']:.3f}"
            + (f" ({run.steps} steps, {run.seconds:.0f} s)" if run else "")
        )
        self.save()

    def save(self) -> None:
        if "meta" in self.results:  # a run stopped early still reports its time (--report-only)
            self.results["meta"]["total_minutes"] = (time.perf_counter() - self.start) / 60
        self.s.out.mkdir(parents=True, exist_ok=True)
        path = self.s.out / "learning.json"
        atomic_write_text(path, json.dumps(self.results, indent=1) + "\n")

    def warm_starts(self, seed: int, dm: Any) -> dict[str, Path]:
        """Base warm start (or the given checkpoint), then one branch per answer format; returns weight files."""
        s = self.s
        folder = s.out / "warm"
        paths = {t: folder / f"seed{seed}-{t}.safetensors" for t in (TERSE, COB)}
        templates = [TERSE] + ([COB] if any(arm_spec(a).template == COB for a in s.arms) else [])
        if s.reuse_warm_starts and all(paths[t].is_file() for t in templates):
            self.log(f"seed {seed}: reusing warm starts {[str(paths[t]) for t in templates]}")
            return paths
        base_path = folder / f"seed{seed}-base.safetensors"
        info: dict[str, Any] = {}
        base = self.module(arm_spec("warm_start"), seed, warm_steps=10**9)
        if seed in s.warm_start_ckpt:
            step = load_weights(base, s.warm_start_ckpt[seed])
            info["base"] = {"from": str(s.warm_start_ckpt[seed]), "step": step}
            self.log(f"seed {seed}: base warm start loaded from {s.warm_start_ckpt[seed]} (step {step})")
        else:
            self.log(f"seed {seed}: base warm start, {s.warm_steps} supervised steps")
            run = fit(base, dm, s.out / "lightning", max_steps=s.warm_steps)
            info["base"] = {"steps": run.steps, "seconds": run.seconds, "loss": run.series("sft/loss")}
        save_weights(base, base_path)
        for template in templates:
            arm = Arm(f"warm_{template}", template)
            module = self.module(arm, seed, warm_steps=10**9)
            load_weights(module, base_path)
            steps = s.cob_branch_steps if template == COB else s.branch_steps
            run = fit(module, dm, s.out / "lightning", max_steps=steps) if steps else None
            save_weights(module, paths[template])
            info[template] = {
                "steps": run.steps if run else 0,
                "seconds": run.seconds if run else 0.0,
                "loss": run.series("sft/loss") if run else [],
            }
        self.results["warm_starts"][str(seed)] = info
        return paths

    def evaluate_warm_starts(self, seed: int, paths: Mapping[str, Path], samples: Sequence[Any]) -> None:
        """Held-out scores of the warm starts themselves (the 'warm start only' arms)."""
        for template, name in ((TERSE, "warm_start"), (COB, "warm_start_cob")):
            if template == COB and not any(arm_spec(a).template == COB for a in self.s.arms):
                continue
            module = self.module(Arm(name, template), seed)
            load_weights(module, paths[template])
            self.record(seed, name, None, evaluate(module, samples, self.eval_batch), template=template)

    def run_seed(self, seed: int, dm: Any, samples: Sequence[Mapping[str, Any]]) -> None:
        """Every arm of one seed. ``dm`` is shared by the seeds (its memory cache is filled once)."""
        import lightning.pytorch as pl

        s = self.s
        dm.seed = seed  # the training draw order of this seed
        pl.seed_everything(seed, workers=True, verbose=False)
        paths = self.warm_starts(seed, dm)
        self.evaluate_warm_starts(seed, paths, samples)
        for name in s.arms:
            if name in ("warm_start", "sft"):
                continue
            arm = arm_spec(name)
            pl.seed_everything(seed, workers=True, verbose=False)
            module = self.module(arm, seed)
            load_weights(module, paths[arm.template])
            self.log(f"seed {seed}: GRPO arm {name}, {s.grpo_steps} optimiser steps")
            run = fit(module, dm, s.out / "lightning", max_steps=s.grpo_steps)
            self.record(seed, name, run, evaluate(module, samples, self.eval_batch), template=arm.template)
        if "sft" in s.arms:
            match = self.results["runs"][str(seed)].get(SFT_MATCH)
            if match is None:
                raise SystemExit(f"the 'sft' arm needs the '{SFT_MATCH}' arm (its wall time) in --arms")
            pl.seed_everything(seed, workers=True, verbose=False)
            module = self.module(arm_spec("sft"), seed, warm_steps=10**9)
            load_weights(module, paths[TERSE])
            self.log(
                f"seed {seed}: continued SFT for {match['seconds']:.0f} s (the wall time of {SFT_MATCH})"
            )
            run = fit(module, dm, s.out / "lightning", max_seconds=match["seconds"])
            self.record(seed, "sft", run, evaluate(module, samples, self.eval_batch), template=TERSE)


def constant_box_ious(dm: Any, samples: Sequence[Mapping[str, Any]]) -> list[float]:
    """Held-out IoU of one box for every case: the per-coordinate median training box (the floor to beat).

    The median is taken in fractions of each image's size and scaled to each held-out image, because 2D
    radiographs differ in size (3D phantoms share one shape, where this is the plain median box). Any box
    dimension: the first box of each record, ``2 · ndim`` numbers.
    """
    from mg3d.boxes import iou_matrix
    from mg3d.data.datamodule import load_source_records

    train = [
        np.asarray(r.boxes[0], dtype=np.float64) / np.tile(np.asarray(r.spatial_shape, dtype=np.float64), 2)
        for src in dm.sources
        for r in load_source_records(src, "train")
    ]
    if not train:
        raise SystemExit(f"no training records in {[str(src.path) for src in dm.sources]}")
    fraction = np.median(np.stack(train), axis=0)
    out = []
    for x in samples:
        box = fraction * np.tile(np.asarray(x["frame"].source_shape, dtype=np.float64), 2)
        out.append(float(iou_matrix(box[None], np.asarray(x["boxes"], dtype=np.float64)).max()))
    return out


def curves(run: RunLog) -> dict[str, list[tuple[float, float]]]:
    """The training curves the report plots (GRPO runs; SFT runs have only the loss)."""
    keys = {
        "frac_reward_zero_std": "train/frac_reward_zero_std",
        "completion_length": "train/completions/mean_length",
        "reward": "train/reward",
        "iou": "train/iou/mean",
        "sft_loss": "sft/loss",
    }
    out = {name: run.series(key) for name, key in keys.items() if run.series(key)}
    per_reward = {
        k for row in run.rows for k in row if k.startswith("train/rewards/") and k.endswith("/mean")
    }
    for key in sorted(per_reward):  # e.g. how often the binary IoU reward fires
        out["reward:" + key.removeprefix("train/rewards/").removesuffix("/mean")] = run.series(key)
    return out


# ------------------------------------------------------------------------------------------------ report


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval over seeds (half-width 0 for one seed: no spread to estimate)."""
    from scipy import stats

    arr = np.asarray(values, dtype=np.float64)
    mean = float(arr.mean())
    if len(arr) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.5 + level / 2, len(arr) - 1) * arr.std(ddof=1) / math.sqrt(len(arr)))
    return mean, mean - half, mean + half


def case_values(runs: Mapping[str, Any], seeds: Sequence[str], name: str, metric: str) -> np.ndarray:
    """``(seeds, cases)`` per-case values of ``metric`` (``greedy/mIoU`` → IoU, ``…/acc@0.5`` → IoU ≥ 0.5)."""
    mode, kind = metric.split("/")
    ious = np.asarray([runs[s][name]["ious"][mode] for s in seeds], dtype=np.float64)
    return ious if kind == "mIoU" else (ious >= 0.5).astype(np.float64)


def case_interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95 % percentile bootstrap over held-out cases of the per-case value averaged over seeds."""
    from mg3d.evaluation import bootstrap_ci

    per_case = np.asarray(values, dtype=np.float64).mean(axis=0)
    low, high = bootstrap_ci(per_case[None], n_resamples=2000, seed=0)
    return float(per_case.mean()), float(low[0]), float(high[0])


def summarise(results: Mapping[str, Any]) -> dict[str, Any]:
    """Per arm: case-bootstrap and seed-t intervals, paired differences, and training statistics."""
    runs = results["runs"]
    seeds = sorted(runs, key=int)
    names = [a for a in (*ARMS[:1], "warm_start_cob", *ARMS[1:]) if any(a in runs[s] for s in seeds)]
    out: dict[str, Any] = {}
    for name in names:
        have = [s for s in seeds if name in runs[s]]
        row: dict[str, Any] = {"seeds": len(have)}
        for metric in ("greedy/mIoU", "greedy/acc@0.5", "sampled/mIoU", "sampled/acc@0.5"):
            mine = case_values(runs, have, name, metric)
            row[metric] = case_interval(mine)
            row[f"t {metric}"] = t_interval(mine.mean(axis=1))
            for other, key in (("binary", "Δ"), (SFT_MATCH, "Δ GRPO−SFT")):
                both = [s for s in have if other in runs[s]]
                if name == other or not both or (key == "Δ GRPO−SFT" and name != "sft"):
                    continue
                diff = case_values(runs, both, name, metric) - case_values(runs, both, other, metric)
                row[f"{key} {metric}"] = case_interval(-diff if key == "Δ GRPO−SFT" else diff)
        for key in ("frac_reward_zero_std", "completion_length", "reward:iou_binary"):
            vals = [np.mean([v for _, v in runs[s][name]["curves"][key]]) for s in have
                    if key in runs[s][name].get("curves", {})]  # fmt: skip
            if vals:
                row[key] = t_interval(vals)
        secs = [runs[s][name]["seconds"] for s in have if "seconds" in runs[s][name]]
        steps = [runs[s][name]["steps"] for s in have if "steps" in runs[s][name]]
        if secs:
            row["seconds"] = float(np.mean(secs))
            row["steps"] = float(np.mean(steps))
        out[name] = row
    return out


def _ci(t: Sequence[float], digits: int = 3) -> str:
    mean, lo, hi = t
    if lo == hi:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


LABELS = {
    "warm_start": "warm start only (terse)",
    "warm_start_cob": "warm start only (Chain-of-Box format)",
    "binary": "GRPO: format + IoU>0.5",
    "binary+iou": "+ continuous IoU",
    "binary+semantic": "+ semantic",
    "binary+cob": "+ Chain-of-Box prompt & reward",
    "full": "full recipe (CoB, IoU>0.5, IoU, semantic, CoB reward)",
    "sft": f"continued SFT (wall time of '{SFT_MATCH}')",
}


def markdown(results: Mapping[str, Any], summary: Mapping[str, Any], command: str) -> str:
    """The docs section: machine, command, settings, tables."""
    meta = results["meta"]
    held = results.get("held_out", {})
    bench = meta.get("benchmark") or {
        "config": "configs/demo.yaml",
        "what": "single-lesion CT phantoms, M3D-RefSeg layout, 3D boxes",
    }
    cob_note = ""
    if any(arm_spec(a).template == COB for a in meta["arms"]):
        fields = cob_prompt_fields(
            meta["trail"], meta.get("trail_grid", [8, 8, 4]), meta.get("cob_instruction", "terse")
        )
        grid = ",".join(str(v) for v in fields["trail_grid"][: bench.get("ndim", 3)])
        cob_note = (
            f" and {meta.get('cob_branch_steps', meta['branch_steps'])} on the Chain-of-Box format (prompt "
            f"`warm_start_reasoning: {fields['warm_start_reasoning']}`, `trail_grid: [{grid}]`, "
            f"`instruction: {fields['instruction']}`)"
        )
    lines = [
        "## The learning study (`bench/learning.py`)",
        "",
        f"Measured {meta['date']} on {meta['machine']}, one torch thread, runs one after the other"
        f"{' — REDUCED RUN: ' + meta['reduced'] if meta.get('reduced') else ''}. Command: `{command}`. "
        f"Total time {meta['total_minutes']:.1f} min (phantom generation {meta['data_minutes']:.1f} min).",
        "",
        f"Benchmark: `{bench['config']}` ({meta['n_phantoms']} {bench['what']}, terse prompt, tiny "
        f"policy); held-out = the `{held.get('split')}` split ({held.get('n')} cases, never trained on). Seeds "
        f"planned {meta['seeds']}, run: {sorted(int(k) for k in results['runs'])} (a seed sets policy init, data "
        "order and sampling; the table says how many seeds each arm has). "
        f"Warm start per seed: {meta['warm_steps']} "
        f"supervised steps, then {meta['branch_steps']} more on the terse format{cob_note}; every GRPO arm of "
        "a seed starts from that seed's "
        f"checkpoint and makes {meta['grpo_steps']} optimiser steps (generation batches of "
        f"{meta['batch_size']} prompts × G = {meta['G']}, {meta['spg']} optimiser steps per batch).",
        "",
        "Intervals in brackets: 95 % percentile bootstrap over the held-out cases (2,000 resamples, "
        "`mg3d.evaluation.bootstrap_ci`) of the per-case value averaged over the seeds that ran the arm — held-out "
        "sampling noise only; the seed-to-seed spread is the last column, a Student-t 95 % interval over the "
        "per-seed greedy mIoU (n − 1 degrees of freedom; none with one seed). Δ = difference to the `binary` "
        "arm, paired by case and seed (same warm start, same cases), same bootstrap. Acc@0.5 uses IoU ≥ 0.5. "
        "Training statistics (zero-std groups, reward rate, length, seconds) are means over seeds. zero-std groups = `frac_reward_zero_std`, the share of prompts whose "
        "G completions all got the same total reward (no gradient), averaged over the run; completion length in "
        "tokens, averaged over the run (curves: the figure); IoU>0.5 reward rate = share of sampled completions "
        "that earned the binary reward during training. Reference: one constant box (the per-coordinate median "
        f"training box) scores mIoU {results['constant_box']['mIoU']:.3f}, Acc@0.5 "
        f"{results['constant_box']['acc@0.5']:.3f} on the same cases.",
        "",
        "| arm | greedy mIoU | greedy Acc@0.5 | sampled mIoU | sampled Acc@0.5 | Δ greedy mIoU vs binary | "
        "zero-std groups | IoU>0.5 reward rate | completion length | train s (steps) | seeds: greedy mIoU, t |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in summary.items():
        delta = _ci(row["Δ greedy/mIoU"]) if "Δ greedy/mIoU" in row else "–"
        zero = f"{row['frac_reward_zero_std'][0]:.2f}" if "frac_reward_zero_std" in row else "–"
        length = f"{row['completion_length'][0]:.1f}" if "completion_length" in row else "–"
        hits = f"{row['reward:iou_binary'][0]:.3f}" if "reward:iou_binary" in row else "–"
        secs = f"{row['seconds']:.0f} ({row['steps']:.0f})" if "seconds" in row else "–"
        lines.append(
            f"| {LABELS.get(name, name)} | {_ci(row['greedy/mIoU'])} | {_ci(row['greedy/acc@0.5'])} | "
            f"{_ci(row['sampled/mIoU'])} | {_ci(row['sampled/acc@0.5'])} | {delta} | {zero} | {hits} | {length} | {secs} | {row['seeds']}: {_ci(row['t greedy/mIoU'])} |"
        )
    if "sft" in summary and SFT_MATCH in summary:
        sft, grpo = summary["sft"], summary[SFT_MATCH]
        lines += [
            "",
            f"GRPO vs continued supervised training at equal wall time (each seed's SFT run got the training "
            f"seconds its `{SFT_MATCH}` GRPO run took; SFT at the warm start's lr, fresh AdamW state):",
            "",
            "| run | greedy mIoU | greedy Acc@0.5 | sampled mIoU | sampled Acc@0.5 | train s | optimiser steps |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for label, row in ((f"GRPO `{SFT_MATCH}`", grpo), ("continued SFT", sft)):
            lines.append(
                f"| {label} | {_ci(row['greedy/mIoU'])} | {_ci(row['greedy/acc@0.5'])} | {_ci(row['sampled/mIoU'])} | "
                f"{_ci(row['sampled/acc@0.5'])} | {row['seconds']:.0f} | {row['steps']:.0f} |"
            )
        lines.append(
            f"| GRPO − SFT (paired by case and seed) | {_ci(sft['Δ GRPO−SFT greedy/mIoU'])} | {_ci(sft['Δ GRPO−SFT greedy/acc@0.5'])} | "
            f"{_ci(sft['Δ GRPO−SFT sampled/mIoU'])} | {_ci(sft['Δ GRPO−SFT sampled/acc@0.5'])} | | |"
        )
    lines += ["", "Per seed (greedy mIoU / sampled mIoU):", ""]
    runs = results["runs"]
    seeds = sorted(runs, key=int)
    lines.append("| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    lines.append("| --- |" + " --- |" * len(seeds))
    for name in summary:
        cells = [
            f"{runs[s][name]['greedy/mIoU']:.3f} / {runs[s][name]['sampled/mIoU']:.3f}"
            if name in runs[s]
            else "–"
            for s in seeds
        ]
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Any], summary: Mapping[str, Any], figures: Path) -> list[Path]:
    """``learning_arms.png`` (held-out scores, zero-std share, completion length) and ``learning_sft.png``.

    Another config than ``configs/demo.yaml`` adds its name (``learning_arms_demo_2d.png``), so a 2D study
    written to the same folder does not overwrite the 3D figures.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures.mkdir(parents=True, exist_ok=True)
    runs = results["runs"]
    names = [n for n in summary if n != "sft"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    x = np.arange(len(names))
    for offset, (mode, colour) in enumerate((("greedy", "C0"), ("sampled", "C1"))):
        means = [summary[n][f"{mode}/mIoU"] for n in names]
        err = np.array([[m[0] - m[1] for m in means], [m[2] - m[0] for m in means]])
        axes[0].bar(x + (offset - 0.5) * 0.38, [m[0] for m in means], 0.38, yerr=err, capsize=3,
                    color=colour, label=f"{mode} mIoU")  # fmt: skip
    axes[0].set_xticks(x, [n.replace("_", " ") for n in names], rotation=30, ha="right")
    axes[0].axhline(results["constant_box"]["mIoU"], color="grey", ls="--", lw=1, label="constant box")
    axes[0].set_ylabel("held-out mIoU (95 % bootstrap over cases)")
    axes[0].set_ylim(0, 1.4 * max(summary[n]["greedy/mIoU"][2] for n in names))
    axes[0].legend(loc="upper right", ncol=3, fontsize=8)
    for ax, key, label in ((axes[1], "frac_reward_zero_std", "share of zero-std groups"),
                           (axes[2], "completion_length", "mean completion length (tokens)")):  # fmt: skip
        for i, name in enumerate(n for n in names if n in GRPO_ARMS):
            for j, seed in enumerate(sorted(runs, key=int)):
                series = runs[seed].get(name, {}).get("curves", {}).get(key)
                if series:
                    steps, vals = zip(*series)
                    ax.plot(steps, vals, color=f"C{i}", alpha=0.8, lw=1, marker=".", ms=3,
                            label=name if j == 0 else None)  # fmt: skip
        ax.set_xlabel(f"generation batch (= {results['meta']['spg']} optimiser steps)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    config = results["meta"].get("benchmark", {}).get("config", "configs/demo.yaml")
    fig.suptitle(f"Learning study: each component from the same warm start ({config})")
    fig.tight_layout()
    stem = Path(results["meta"].get("benchmark", {}).get("config", "demo.yaml")).stem
    suffix = "" if stem == "demo" else f"_{stem}"
    paths = [figures / f"learning_arms{suffix}.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    if "sft" in summary and SFT_MATCH in summary:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        pairs = [("warm_start", "warm start"), (SFT_MATCH, f"GRPO ({SFT_MATCH})"), ("sft", "continued SFT")]
        pairs = [(n, lab) for n, lab in pairs if n in summary]
        x = np.arange(len(pairs))
        for offset, (mode, colour) in enumerate((("greedy", "C0"), ("sampled", "C1"))):
            means = [summary[n][f"{mode}/mIoU"] for n, _ in pairs]
            err = np.array([[m[0] - m[1] for m in means], [m[2] - m[0] for m in means]])
            ax.bar(x + (offset - 0.5) * 0.38, [m[0] for m in means], 0.38, yerr=err, capsize=3,
                   color=colour, label=f"{mode} mIoU")  # fmt: skip
        ax.set_xticks(x, [lab for _, lab in pairs])
        ax.set_ylabel("held-out mIoU (95 % bootstrap over cases)")
        ax.axhline(results["constant_box"]["mIoU"], color="grey", ls="--", lw=1, label="constant box")
        ax.set_title("GRPO vs continued SFT at equal wall time")
        ax.set_ylim(0, 1.35 * max(summary[n]["greedy/mIoU"][2] for n, _ in pairs))
        ax.legend(loc="upper right", ncol=3, fontsize=8)
        fig.tight_layout()
        paths.append(figures / f"learning_sft{suffix}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--config", type=Path, default=DEMO_CONFIG, help="the demo config (model + data)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--n-phantoms", type=int, default=None, help="phantoms to write (default: the config's)")
    p.add_argument("--eval-split", default="test", choices=("test", "val"), help="held-out split")
    p.add_argument("--eval-n", type=int, default=None, help="held-out cases (default: the whole split)")
    p.add_argument("--warm-steps", type=int, default=400, help="base supervised steps per seed")
    p.add_argument(
        "--branch-steps", type=int, default=50, help="supervised steps per answer format after the base"
    )
    p.add_argument("--cob-branch-steps", type=int, default=None,
                   help="supervised steps on the Chain-of-Box format after the base (default: --branch-steps)")  # fmt: skip
    p.add_argument("--grpo-steps", type=int, default=48, help="GRPO optimiser steps per arm")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    p.add_argument(
        "--cob-new-tokens", type=int, default=96, help="max new tokens with the Chain-of-Box format"
    )
    p.add_argument("--trail", choices=("coarse", "none"), default="coarse",
                   help="Chain-of-Box warm-start reasoning: coarse box trail, or mg3d's empty <think>")  # fmt: skip
    p.add_argument("--cob-instruction", choices=("terse", "full"), default="terse",
                   help="Chain-of-Box user turn: 'Find {phrase}.' or the template's full instruction")  # fmt: skip
    p.add_argument("--trail-grid", default=None,
                   help="coarse cell size of the trail box per text-grid axis, x,y[,z] (PromptConfig.trail_grid; "
                        "2D uses the first two; default: the config's prompt.trail_grid, else 8,8,4)")  # fmt: skip
    p.add_argument("--warm-start-ckpt", action="append", default=[], metavar="SEED=PATH",
                   help="base warm start of SEED from a mg3d .ckpt (e.g. runs/demo/…/last.ckpt) or a bench "
                        ".safetensors; replaces --warm-steps for that seed")  # fmt: skip
    p.add_argument(
        "--reuse-warm-starts", action="store_true", help="reuse <out>/warm/*.safetensors if present"
    )
    p.add_argument(
        "--from-pretrained", action="store_true",
        help="start every seed from the config's policy.checkpoint (configs/demo.yaml: the shipped pretrained "
        "policy) instead of the tiny model from random init (the documented runs)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_learning", help="output folder")
    p.add_argument("--md", type=Path, default=None, help="also write the markdown section here")
    p.add_argument("--figures", type=Path, default=None, help="folder for the PNG plots")
    p.add_argument("--reduced", default="", help="note printed in the report when the run is a reduced one")
    p.add_argument(
        "--report-only", action="store_true", help="only rebuild the report from <out>/learning.json"
    )
    p.add_argument("--smoke", action="store_true", help="tiny settings for a < 1 min check")
    p.add_argument("--threads", type=int, default=1, help="torch threads (keep 1 on the shared machine)")
    return p.parse_args(argv)


def trail_grid_from(flag: str | None, cfg: Mapping[str, Any]) -> list[int]:
    """``--trail-grid`` (or the config's ``prompt.trail_grid``, else 8,8,4), checked by ``PromptConfig``."""
    from mg3d.errors import ConfigError
    from mg3d.grounding import PromptConfig

    value: Any = flag if flag is not None else cfg["model"]["prompt"].get("trail_grid", [8, 8, 4])
    try:
        return list(PromptConfig(trail_grid=value).trail_grid)
    except ConfigError as err:
        raise SystemExit(f"--trail-grid {value!r}: {err}") from None


def settings_from(args: argparse.Namespace, cfg: Mapping[str, Any]) -> Settings:
    ckpts: dict[int, Path] = {}
    for item in args.warm_start_ckpt:
        seed, sep, path = item.partition("=")
        if not sep or not seed.strip().lstrip("-").isdigit():
            raise SystemExit(f"--warm-start-ckpt {item!r}: expected SEED=PATH")
        if not Path(path).is_file():
            raise SystemExit(f"--warm-start-ckpt {item!r}: {path} is not a file")
        ckpts[int(seed)] = Path(path)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for a in arms:
        arm_spec(a)
    s = Settings(
        seeds=[int(v) for v in args.seeds.split(",")],
        n_phantoms=args.n_phantoms or int(cfg["data"]["sources"][0]["synthetic"]["n"]),
        eval_n=args.eval_n,
        eval_split=args.eval_split,
        warm_steps=args.warm_steps,
        branch_steps=args.branch_steps,
        cob_branch_steps=args.branch_steps if args.cob_branch_steps is None else args.cob_branch_steps,
        grpo_steps=args.grpo_steps,
        arms=arms,
        cob_new_tokens=args.cob_new_tokens,
        trail=args.trail,
        trail_grid=trail_grid_from(args.trail_grid, cfg),
        cob_instruction=args.cob_instruction,
        warm_start_ckpt=ckpts,
        reuse_warm_starts=args.reuse_warm_starts,
        out=args.out,
        from_pretrained=args.from_pretrained,
    )
    if args.smoke:
        s.n_phantoms, s.eval_n, s.warm_steps, s.grpo_steps = 40, 8, 4, 4
        s.branch_steps = s.cob_branch_steps = 2
        s.out = args.out.parent / (args.out.name + "_smoke")
    return s


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)  # one run per arm: keep the console readable
    os.chdir(ROOT)  # the config's relative data path
    cfg = load_demo(args.config)
    s = settings_from(args, cfg)
    if args.smoke:  # tiny batches too, so the whole smoke check stays under a minute
        cfg["data"]["batch_size"] = 4
        cfg["model"]["evaluation"]["batch_size"] = 8
    if args.report_only:
        results = json.loads((s.out / "learning.json").read_text(encoding="utf-8"))
        return report(results, s.out, results["meta"]["command"], args.md, args.figures)
    command = "OMP_NUM_THREADS=1 .venv/bin/python bench/learning.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    study = Study(cfg, s)
    m = cfg["model"]
    study.results["meta"] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        "command": command,
        "seeds": s.seeds,
        "n_phantoms": s.n_phantoms,
        "warm_steps": s.warm_steps
        if not s.warm_start_ckpt
        else f"{s.warm_steps} (checkpoints: {len(s.warm_start_ckpt)})",
        "branch_steps": s.branch_steps,
        "cob_branch_steps": s.cob_branch_steps,
        "grpo_steps": s.grpo_steps,
        "trail": s.trail,
        "trail_grid": s.trail_grid,
        "cob_instruction": s.cob_instruction,
        "benchmark": benchmark_label(cfg, args.config),
        "batch_size": cfg["data"]["batch_size"],
        "G": m["rollout"]["num_generations"],
        "spg": m.get("steps_per_generation", 1),
        "arms": s.arms,
        "reduced": args.reduced,
    }
    start = time.perf_counter()
    dm = build_datamodule(cfg, s.n_phantoms, s.seeds[0])
    dm.prepare_data()
    study.results["meta"]["data_minutes"] = (time.perf_counter() - start) / 60
    dm.setup("fit")
    samples = dm.eval_samples(s.eval_n, split=s.eval_split)
    study.results["held_out"] = {
        "split": s.eval_split,
        "n": len(samples),
        "texts": [str(x["text"]) for x in samples],
    }
    constant = constant_box_ious(dm, samples)
    study.results["constant_box"] = {
        "mIoU": float(np.mean(constant)),
        "acc@0.5": float(np.mean(np.asarray(constant) >= 0.5)),
    }
    study.log(f"data ready: {dm.source_counts('train')} train, {len(samples)} held-out ({s.eval_split})")
    for seed in s.seeds:
        study.run_seed(seed, dm, samples)
        study.results["meta"]["total_minutes"] = (time.perf_counter() - start) / 60
        study.save()
    return report(study.results, s.out, command, args.md, args.figures)


def report(results: dict[str, Any], out: Path, command: str, md: Path | None, figures: Path | None) -> int:
    """Summarise (also into ``<out>/learning.json``), print the markdown section, write it and the plots."""
    summary = summarise(results)
    results["summary"] = summary
    (out / "learning.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    text = markdown(results, summary, command)
    print("\n" + text)
    if md:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(text, encoding="utf-8")
    if figures:
        for path in plot(results, summary, figures):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
