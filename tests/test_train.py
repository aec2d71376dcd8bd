"""The main job: GRPOModule + GroundingDataModule through Lightning and the real ``scripts/train.py``.

Tiny settings throughout: 16 phantoms of 32×32×8 voxels, a handful of steps. What is checked is behaviour —
logged metrics, checkpoints, exact resume, DDP weight sync, the non-finite guard, every config file — not
learning (the demo and docs/benchmarks.md measure that).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from mg3d.data.datamodule import GroundingDataModule, SourceConfig
from mg3d.generation import RolloutConfig
from mg3d.grounding import PromptConfig
from mg3d.grpo.config import EvalConfig, OptimConfig, WarmStartConfig
from mg3d.grpo.loss import GRPOLossConfig
from mg3d.grpo.module import GRPOModule, format_summary

ROOT = Path(__file__).resolve().parents[1]
#: configs/demo.yaml starts from the shipped pretrained policy (a path relative to the repository); these
#: tests train the tiny random-init model from another working directory
NO_CKPT = "--model.policy.checkpoint=null"


def make_datamodule(source: SourceConfig, batch_size: int = 2) -> GroundingDataModule:
    return GroundingDataModule([source], batch_size=batch_size, cache="memory", seed=0)


def make_module(**overrides) -> GRPOModule:
    kwargs = dict(
        prompt=PromptConfig(template="terse", system_prompt="", max_vision_tokens=32),
        rollout=RolloutConfig(num_generations=2, max_new_tokens=12),
        loss=GRPOLossConfig(loss_type="dapo"),
        rewards={"iou": 1.0, "format": {"weight": 0.1, "mode": "lenient"}},
        optim=OptimConfig(lr=1e-3, schedule="constant"),
        warm_start=WarmStartConfig(steps=2, lr=1e-3),
        evaluation=EvalConfig(enabled=False),
        log_completions_every_n_steps=0,
    )
    kwargs.update(overrides)
    return GRPOModule(**kwargs)


def weights(module: GRPOModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def trainer(tmp: Path, max_steps: int, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp),
        use_distributed_sampler=False,
    )  # fmt: skip
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def test_predict_samples_works_without_a_trainer(phantom_source):
    """Scripts and notebooks call ``predict_samples`` on a module that was never attached to a Trainer."""
    dm = make_datamodule(phantom_source)
    dm.setup("fit")
    samples = dm.eval_samples(2)
    _, texts, ious = make_module().predict_samples(samples, max_new_tokens=4)
    assert len(texts) == 2 and ious.shape == (2,) and np.all((ious >= 0) & (ious <= 1))


def test_format_summary_table():
    table = format_summary(
        {"warm_start": {"greedy/mIoU": 0.2, "greedy/acc@0.5": 0.1, "step": 10, "n": 5},
         "after_grpo": {"greedy/mIoU": 0.25, "greedy/acc@0.5": 0.2, "step": 20, "n": 5}}
    )  # fmt: skip
    assert "| warm_start | 10 | 0.200 | 0.100 | – |" in table
    assert "+0.050" in table


# The tiny policy writes completions of about 10 characters: rewarding "at most 10" (plus IoU) gives groups a
# reward spread (with G = 8, in every group of every step here), so the weights depend on the batch each step saw.
SPREAD_REWARDS = {
    "iou": 1.0,
    "format": {"mode": "lenient", "sanity_weight": 1.0, "min_think_chars": 0, "max_chars": 10},
}


class _RecordBatches(pl.Callback):
    """The record ids of every training batch, in order (what a replayed or skipped batch would change)."""

    def __init__(self) -> None:
        self.ids: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids.append([sample["id"] for sample in batch])


@pytest.mark.slow
def test_supervised_only_run_ends_with_the_warm_started_policy_evaluated(phantom_source, tmp_path):
    """max_steps == warm_start.steps (how configs/demo_pretrain.yaml pretrains the demo's policy): no GRPO step,
    the held-out table of the warm-started policy at the end."""
    module = make_module(evaluation=EvalConfig(max_samples=2, batch_size=2, max_new_tokens=4, sampled=False))
    trainer(tmp_path, max_steps=2, logger=pl.loggers.CSVLogger(str(tmp_path))).fit(
        module, datamodule=make_datamodule(phantom_source)
    )
    assert module.global_step == 2 and not module.grpo_phase_started
    assert set(module.eval_results) == {"warm_start"} and module.eval_results["warm_start"]["step"] == 2
    summary = json.loads(next(tmp_path.rglob("grpo_summary.json")).read_text(encoding="utf-8"))
    assert "warm_start" in summary and "after_grpo" not in summary


def test_exact_resume_matches_uninterrupted_run(phantom_source, tmp_path, monkeypatch):
    """Stop after 4 steps (warm start done, inside GRPO), resume from the checkpoint: the resumed run sees
    exactly the batches the uninterrupted run saw at steps 5-7 (across an epoch boundary: 12 records, batch 2)
    and ends with the same weights. Every GRPO step has a reward spread, so the weights depend on the batch."""
    import mg3d.grpo.module as module_mod

    spreads: list[float] = []
    real_advantages = module_mod.group_advantages

    def recording(*args, **kwargs):
        out = real_advantages(*args, **kwargs)
        spreads.append(float(out.frac_reward_zero_std))
        return out

    monkeypatch.setattr(module_mod, "group_advantages", recording)
    settings = dict(
        steps_per_generation=1,
        rewards=SPREAD_REWARDS,
        rollout=RolloutConfig(num_generations=8, max_new_tokens=12),
    )

    pl.seed_everything(0)
    full = make_module(**settings)
    seen_full = _RecordBatches()
    trainer(tmp_path / "full", 7, callbacks=[seen_full]).fit(full, make_datamodule(phantom_source))
    reference = weights(full)
    assert len(seen_full.ids) == 7 and len(spreads) == 5  # 2 warm-start steps, 5 GRPO steps
    assert all(s < 1.0 for s in spreads), f"a GRPO step had no reward spread in any group: {spreads}"
    # a replayed (step 4's) or skipped (step 6's) batch in place of step 5's would show in the ids
    assert seen_full.ids[3] != seen_full.ids[4] != seen_full.ids[5]

    pl.seed_everything(0)
    first = make_module(**settings)
    seen_first = _RecordBatches()
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    trainer(tmp_path / "a", 4, callbacks=[ckpt_cb, seen_first], enable_checkpointing=True).fit(
        first, make_datamodule(phantom_source)
    )
    assert seen_first.ids == seen_full.ids[:4]
    ckpt = next((tmp_path / "ckpt").glob("*step=4*.ckpt"))
    pl.seed_everything(123)  # a resumed run must not depend on the global seed at restart
    resumed = make_module(**settings)
    seen_resumed = _RecordBatches()
    trainer(tmp_path / "b", 7, callbacks=[seen_resumed]).fit(
        resumed, make_datamodule(phantom_source), ckpt_path=str(ckpt)
    )
    assert resumed.grpo_phase_started
    assert seen_resumed.ids == seen_full.ids[4:], "the resumed run did not continue at the next batch"
    for key, value in reference.items():
        torch.testing.assert_close(
            weights(resumed)[key], value, rtol=0, atol=0, msg=f"{key} differs after resume"
        )


@pytest.mark.slow
def test_nonfinite_loss_skips_steps_and_stops(phantom_source, tmp_path, monkeypatch):
    """A NaN loss (injected into the real loss) skips the step; 3 in a row stop the run; NaN never lands."""
    import mg3d.grpo.module as module_mod

    real_loss = module_mod.grpo_loss

    def poisoned(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(module_mod, "grpo_loss", poisoned)
    module = make_module(max_consecutive_nonfinite=3)
    with pytest.raises(FloatingPointError, match="3 consecutive steps"):
        trainer(tmp_path, 20).fit(module, make_datamodule(phantom_source))
    assert module.nonfinite_skips == 3
    assert module.global_step == 2  # the two warm-start steps; no GRPO step was taken
    for key, value in weights(module).items():
        assert torch.isfinite(value).all(), key


class _RecordWeights(pl.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        total = sum(float(p.double().sum()) for p in pl_module.model.parameters())
        gathered = pl_module.trainer.callback_metrics.get("train/num_completions_global")
        (self.folder / f"rank{trainer.global_rank}.json").write_text(
            json.dumps(
                {"checksum": total, "global_completions": float(gathered) if gathered is not None else None}
            )
        )


@pytest.mark.slow
def test_ddp_two_processes_keep_weights_in_sync(phantom_source, tmp_path):
    module = make_module()
    dm = make_datamodule(phantom_source)
    t = trainer(tmp_path, 4, devices=2, strategy="ddp_spawn", callbacks=[_RecordWeights(tmp_path)])
    t.fit(module, dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=0, abs=1e-9)
    # advantages were computed on both ranks' completions: 2 prompts × 2 completions × 2 ranks
    assert ranks[0]["global_completions"] == 8.0


@pytest.mark.slow
@pytest.mark.e2e
def test_train_script_fit_logs_and_checkpoints(phantom_source, tmp_path):
    """The real entry point on tiny settings: metrics in the CSV log, a last checkpoint, the summary table."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    source = {"path": phantom_source.path, "synthetic": None, "pipeline": {"spatial_size": [28, 28, 8]}}
    args = [
        sys.executable, str(ROOT / "scripts" / "train.py"), "fit", "--config", str(ROOT / "configs" / "demo.yaml"), NO_CKPT,
        "--trainer.max_steps=5", "--model.warm_start.steps=2", "--model.steps_per_generation=1",
        "--model.rollout.num_generations=2", "--model.rollout.max_new_tokens=12", "--model.prompt.max_vision_tokens=32",
        "--model.evaluation.max_samples=4", "--model.evaluation.batch_size=4", "--model.evaluation.sampled=false",
        f"--data.sources=[{json.dumps(source)}]", "--data.batch_size=2",
        "--trainer.logger+=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.logger.name=e2e", "--trainer.log_every_n_steps=1",
    ]  # fmt: skip
    run = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "GRPO changed held-out greedy mIoU" in run.stdout
    log_dir = next(tmp_path.glob("e2e/version_*"))
    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    keys = set().union(*(r.keys() for r in rows))
    for key in ("sft/loss", "train/reward", "train/rewards/iou/mean", "train/frac_reward_zero_std",
                "train/iou/mean", "train/completions/mean_length", "train/clip_ratio/region_mean"):  # fmt: skip
        assert key in keys, key
    summary = json.loads(next(tmp_path.rglob("grpo_summary.json")).read_text(encoding="utf-8"))
    assert {"warm_start", "after_grpo"} <= set(summary)
    ckpts = list(tmp_path.rglob("last.ckpt"))
    assert ckpts, "no last checkpoint written"
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)
    assert state["global_step"] == 5
    assert not any(k.startswith("_ref_model") for k in state["state_dict"])


def test_default_loggers_follow_default_root_dir(tmp_path, monkeypatch):
    """Logs sit beside the run's checkpoints under ``default_root_dir``; ``runs/`` when none is set; a logger the
    user pointed elsewhere stays where it was pointed."""
    from mg3d.cli import main

    monkeypatch.chdir(tmp_path)

    def log_dirs(*args: str) -> list[str]:
        cli = main(["--config", str(ROOT / "configs" / "demo.yaml"), NO_CKPT, *args], run=False)
        return [os.path.relpath(logger.log_dir, tmp_path) for logger in cli.trainer.loggers]

    assert log_dirs(f"--trainer.default_root_dir={tmp_path / 'exp'}") == [
        os.path.join("exp", "lightning_logs", "version_0"),
        os.path.join("exp", "tensorboard", "lightning_logs", "version_0"),
    ]
    assert log_dirs("--trainer.default_root_dir=null") == [
        os.path.join("runs", "lightning_logs", "version_0"),
        os.path.join("runs", "tensorboard", "lightning_logs", "version_0"),
    ]
    assert log_dirs(
        f"--trainer.default_root_dir={tmp_path / 'exp'}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path / 'mine'}",
    ) == [os.path.join("mine", "lightning_logs", "version_0")]


CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_prints(config, capsys):
    """Every shipped config parses (``--print_config``), with the GPU-only bits as they are written."""
    from mg3d.cli import main

    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), "--print_config"])
    assert info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "model:" in out and "data:" in out and "trainer:" in out


@pytest.mark.slow
@pytest.mark.parametrize("config", [c for c in CONFIGS if "paper" in c.parts], ids=lambda p: p.stem)
def test_paper_configs_run_with_tiny_overrides(config, phantom_source, tmp_path):
    """The GPU set-ups, loaded as written and shrunk to the tiny model and phantoms, take real steps here."""
    from mg3d.cli import main

    source = {"path": phantom_source.path, "synthetic": None, "pipeline": {"spatial_size": [28, 28, 8]}}
    cli = main(
        [
            "--config", str(config), "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
            "--trainer.precision=32-true", "--trainer.max_steps=2", "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_val_batches=0",
            "--model.policy.checkpoint=null", "--model.policy.dtype=float32", "--model.policy.attn_implementation=null",
            "--model.policy.gradient_checkpointing=false", "--model.rollout.max_new_tokens=8",
            "--model.rollout.num_generations=2", "--model.prompt.max_vision_tokens=32",
            f"--data.sources=[{json.dumps(source)}]", "--data.num_workers=0", "--data.cache=memory",
            "--data.batch_size=2",
        ],
        run=False,
    )  # fmt: skip
    cfg = cli.model
    assert cfg.loss_config.beta == pytest.approx(0.04) and cfg.rollout_config.num_generations == 2
    assert cfg.prompt_config.template == "chain_of_box"
    assert {"format", "iou_binary", "semantic"} == set(cfg.reward_set.names)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 2
