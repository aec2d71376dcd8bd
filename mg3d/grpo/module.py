r"""``GRPOModule``: GRPO over a grounding policy as a LightningModule with manual optimisation.

One training step takes a *generation batch* of B prompts from the DataModule and does, in TRL's order::

    prompts ─► rollout: G completions per prompt (prompt prefilled once, its KV cache shared by the G samples)
            ─► rewards (one parse per completion, mg3d.rewards.RewardSet) ─► group advantages (all ranks)
            ─► for μ iterations × S slices of the batch (``steps_per_generation``):
                   Σ over micro-batches: manual_backward(grpo_loss)   (gradient sync only on the last)
                   clip grad norm ─► optimiser step ─► LR scheduler step

so one generation batch makes ``μ · S`` optimiser steps (``trainer.global_step`` counts them). With S > 1 or
μ > 1 the policy moves between the rollout and the later slices, and the loss uses the log-probs of the
sampling policy (old log-probs), exactly as TRL does.

A supervised warm start can run first (``warm_start.steps`` optimiser steps of teacher-forced
cross-entropy, :mod:`mg3d.sft`): the tiny offline model knows nothing, real checkpoints skip it.

The maths (advantages, clipped surrogate, KL, the four normalisations) is in :mod:`mg3d.grpo.loss`, checked
number for number against TRL 1.16.0. A frozen reference model exists only when β > 0 and is kept out of
checkpoints (it is rebuilt from the policy's initial weights).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from mg3d.boxes import CoordinateFrame
from mg3d.errors import ConfigError
from mg3d.grounding import GroundingPrompter, PromptBatch
from mg3d.grpo.config import EvalConfig, OptimConfig, PolicyConfig, PromptConfig, WarmStartConfig
from mg3d.grpo.loss import GRPOLossConfig, group_advantages, grpo_loss, needs_old_logps
from mg3d.grpo.rollout import HFRolloutBackend, Rollout, RolloutConfig, completion_logprobs
from mg3d.grpo.schedule import PhaseSchedule
from mg3d.rewards import RewardSet, RewardTarget
from mg3d.sft import sft_loss

log = logging.getLogger(__name__)

__all__ = ["GRPOModule"]

DEFAULT_REWARDS: dict[str, Any] = {"format": 1.0, "iou": 1.0}

# Lightning resumes with torch.load(weights_only=True): the checkpoint's hyper-parameters are these plain
# configuration dataclasses, so they are allow-listed — and nothing else, so a crafted pickle still fails.
torch.serialization.add_safe_globals(
    [PolicyConfig, PromptConfig, OptimConfig, WarmStartConfig, EvalConfig, RolloutConfig, GRPOLossConfig]
)


def as_samples(batch: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The DataModule's dict of aligned lists as a list of per-sample dicts (a list passes through)."""
    if isinstance(batch, Mapping):
        keys = list(batch)
        n = len(batch[keys[0]]) if keys else 0
        return [{k: batch[k][i] for k in keys} for i in range(n)]
    return list(batch)


def _subset_rollout(rollout: Rollout, prompts: Sequence[int]) -> tuple[Rollout, Tensor]:
    """The completions of some prompts as a rollout of their own (prompt indices renumbered from 0)."""
    prompts = list(prompts)
    rows = torch.cat([torch.nonzero(rollout.prompt_index == p).flatten() for p in prompts])
    renumber = {p: i for i, p in enumerate(prompts)}
    sub = Rollout(
        prompt_ids=rollout.prompt_ids[prompts],
        prompt_mask=rollout.prompt_mask[prompts],
        completion_ids=rollout.completion_ids[rows],
        completion_mask=rollout.completion_mask[rows],
        texts=[rollout.texts[i] for i in rows.tolist()],
        is_truncated=rollout.is_truncated[rows],
        prompt_index=torch.tensor([renumber[int(p)] for p in rollout.prompt_index[rows].tolist()]),
        num_generations=rollout.num_generations,
    )
    return sub, rows


class GRPOModule(pl.LightningModule):
    """GRPO (with an optional supervised warm start) for medical image grounding.

    Args:
        policy: the model to train (a local checkpoint or the tiny offline model).
        prompt: prompt template, volume strategy, token budget, laterality hint, parser mode.
        rollout: sampling (G = ``num_generations``, temperature, top-p/k, max new tokens, shared prefill).
        loss: the GRPO objective (TRL's names and defaults: loss type, β, ε, δ, scale_rewards, μ, …).
        rewards: ``{name: weight}`` or ``{name: {"weight": w, "type": registry key, **args}}``; see
            ``mg3d.rewards`` (e.g. ``format``, ``iou``, ``iou_binary``, ``giou``, ``semantic``).
        optim: AdamW and the learning-rate schedule of the GRPO phase.
        warm_start: supervised steps before GRPO (0 = none).
        evaluation: held-out evaluation before and after GRPO inside ``fit``.
        steps_per_generation: S, optimiser steps per generation batch (TRL's ``steps_per_generation``).
        micro_batch_size: prompts per forward/backward inside a slice (gradient accumulation); ``None`` = all.
        dynamic_sampling: drop groups whose rewards are all equal (DAPO); they carry no gradient anyway.
        sampling_seed: base seed of the sampling generator (rank r uses ``sampling_seed + r``); also the tiny
            policy's init seed when ``policy.seed`` is null.
        log_completions_every_n_steps: log a table of sampled completions every N steps (0 = never).
        max_consecutive_nonfinite: stop after this many consecutive steps skipped for a NaN/Inf reward or loss.
    """

    def __init__(
        self,
        policy: PolicyConfig | None = None,
        prompt: PromptConfig | None = None,
        rollout: RolloutConfig | None = None,
        loss: GRPOLossConfig | None = None,
        rewards: dict[str, Any] | None = None,
        optim: OptimConfig | None = None,
        warm_start: WarmStartConfig | None = None,
        evaluation: EvalConfig | None = None,
        steps_per_generation: int = 1,
        micro_batch_size: int | None = None,
        dynamic_sampling: bool = False,
        sampling_seed: int = 0,
        log_completions_every_n_steps: int = 50,
        max_consecutive_nonfinite: int = 5,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.policy_config = policy or PolicyConfig()
        self.prompt_config = prompt or PromptConfig()
        self.rollout_config = rollout or RolloutConfig()
        self.loss_config = loss or GRPOLossConfig()
        self.optim_config = optim or OptimConfig()
        self.warm_start = warm_start or WarmStartConfig()
        self.eval_config = evaluation or EvalConfig()
        if steps_per_generation < 1:
            raise ConfigError(f"steps_per_generation must be >= 1, got {steps_per_generation}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be >= 1 or null, got {micro_batch_size}")
        if abs(self.loss_config.temperature - self.rollout_config.temperature) > 1e-12:
            raise ConfigError(
                f"loss.temperature={self.loss_config.temperature} differs from rollout.temperature="
                f"{self.rollout_config.temperature}: log-probs must be computed at the sampling temperature"
            )
        self.steps_per_generation = steps_per_generation
        self.micro_batch_size = micro_batch_size
        self.dynamic_sampling = dynamic_sampling
        self.sampling_seed = sampling_seed
        self.log_completions_every_n_steps = log_completions_every_n_steps
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.save_hyperparameters()

        self.policy = self.policy_config.build(default_seed=self.sampling_seed)
        self.model = self.policy.model  # registered as a submodule: Lightning moves, saves and syncs it
        self.prompter = GroundingPrompter.from_config(self.policy, self.prompt_config)
        self.reward_set = RewardSet.from_config(
            rewards or DEFAULT_REWARDS, codec=self.policy.codec_name, parse_mode=self.prompt_config.parse_mode
        )
        # The reference model is not a registered submodule, so it is neither optimised nor checkpointed.
        self._ref_model: torch.nn.Module | None = None
        if self.loss_config.beta > 0:
            ref = copy.deepcopy(self.policy.model).eval()
            ref.requires_grad_(False)
            object.__setattr__(self, "_ref_model", ref)
        self._backend: HFRolloutBackend | None = None
        self._nonfinite_streak = 0
        self.nonfinite_skips = 0
        self.eval_results: dict[str, dict[str, float]] = {}
        self.grpo_phase_started = False

    # ------------------------------------------------------------------ set-up

    @property
    def grpo_start_step(self) -> int:
        return int(self.warm_start.steps)

    def in_warm_start(self) -> bool:
        return self.global_step < self.grpo_start_step

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the policy has no trainable parameters (is everything frozen?)")
        o = self.optim_config
        optimizer = torch.optim.AdamW(
            params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )
        total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else None
        schedule = PhaseSchedule(
            warm_steps=self.grpo_start_step,
            warm_lr_scale=self.warm_start.lr / o.lr,
            warm_schedule=self.warm_start.schedule,
            warmup_steps=o.warmup_steps,
            schedule=o.schedule,
            total_steps=total,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _rollout_backend(self) -> HFRolloutBackend:
        if self._backend is None:
            rank = self.global_rank if self._trainer is not None else 0  # the property raises when detached
            self._backend = HFRolloutBackend(self.policy, seed=self.sampling_seed, rank=rank)
        return self._backend

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        backend = self._backend
        if backend is not None and backend.generator is not None:
            checkpoint["mg3d_sampling_rng"] = backend.generator.get_state()
        checkpoint["mg3d_eval_results"] = self.eval_results
        checkpoint["mg3d_nonfinite_skips"] = self.nonfinite_skips
        checkpoint["mg3d_grpo_phase_started"] = self.grpo_phase_started

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("mg3d_sampling_rng")
        if state is not None:
            self._rollout_backend().generator.set_state(state)  # type: ignore[union-attr]
        self.eval_results = dict(checkpoint.get("mg3d_eval_results", {}))
        self.nonfinite_skips = int(checkpoint.get("mg3d_nonfinite_skips", 0))
        self.grpo_phase_started = bool(checkpoint.get("mg3d_grpo_phase_started", False))

    # ------------------------------------------------------------------ training

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move the tensors of a sample batch; frames and other metadata stay as they are.

        Lightning's default walks dataclasses and refuses frozen ones (``CoordinateFrame``).
        """

        def move(value: Any) -> Any:
            return value.to(device) if isinstance(value, Tensor) else value

        if isinstance(batch, Mapping):
            return {
                k: [move(v) for v in vals] if isinstance(vals, list) else move(vals)
                for k, vals in batch.items()
            }
        if isinstance(batch, list):
            return [{k: move(v) for k, v in s.items()} if isinstance(s, Mapping) else move(s) for s in batch]
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        batch = as_samples(batch)
        if self.in_warm_start():
            self._warm_start_step(batch)
            return
        if not self.grpo_phase_started:
            self._start_grpo_phase()
        self._grpo_step(batch)

    def _start_grpo_phase(self) -> None:
        """Reset AdamW's moments (GRPO starts as a fresh run would) and evaluate the warm-started policy."""
        self.grpo_phase_started = True
        optimizer = self.optimizers()
        optimizer.optimizer.state.clear()  # type: ignore[union-attr]
        self._evaluate("warm_start" if self.grpo_start_step > 0 else "start")

    def _optimizer_step(self, metrics: dict[str, float]) -> None:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        if self.optim_config.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.optim_config.max_grad_norm
            )
            metrics["grad_norm"] = float(norm)
        metrics["learning_rate"] = float(optimizer.param_groups[0]["lr"])  # the rate this step uses
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()  # type: ignore[union-attr]

    def _skip_nonfinite(self, what: str) -> None:
        """Skip a step whose reward or loss is not finite; stop after too many in a row."""
        self.nonfinite_skips += 1
        self._nonfinite_streak += 1
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        log.warning(
            "step %d skipped: non-finite %s (%d skipped so far)", self.global_step, what, self.nonfinite_skips
        )
        self.log("train/nonfinite_skips", float(self.nonfinite_skips))
        if self._nonfinite_streak >= self.max_consecutive_nonfinite:
            raise FloatingPointError(
                f"{self._nonfinite_streak} consecutive steps had a non-finite {what}; stopping before NaN reaches "
                "the weights. Lower the learning rate, check the rewards, or raise max_consecutive_nonfinite."
            )

    def _warm_start_step(self, samples: Sequence[Mapping[str, Any]]) -> None:
        start = time.perf_counter()
        batch = self.prompter.build(samples, region_hint=True)
        loss, metrics = sft_loss(self.policy, batch)
        if not torch.isfinite(loss):
            self._skip_nonfinite("supervised loss")
            return
        self._nonfinite_streak = 0
        self.manual_backward(loss)
        metrics["loss"] = float(loss.detach())
        self._optimizer_step(metrics)
        metrics["step_time"] = time.perf_counter() - start
        self._log_metrics("sft", metrics, prog_bar=("loss",), batch_size=len(batch))

    def _reward_targets(self, batch: PromptBatch) -> list[RewardTarget]:
        """Targets on the pipeline grid (the tensor the model saw), with tokenization's frame to the text grid.

        IoU is invariant to the axis-aligned maps between the original voxel grid and the pipeline grid, so
        rewards scored here equal rewards in the original frame, and the semantic reward can crop the tensor
        already in memory instead of reloading the original file.
        """
        targets = []
        for i, sample in enumerate(batch.samples):
            pipeline_frame: CoordinateFrame = sample["frame"]
            text_frame = batch.frames[i]
            token_frame = CoordinateFrame(pipeline_frame.shape, text_frame.steps[len(pipeline_frame.steps) :])
            boxes = sample.get("target_boxes")
            if boxes is None:
                boxes = pipeline_frame.to_text(batch.gt_boxes[i])
            image = sample["image"]
            targets.append(
                RewardTarget(
                    record_id=batch.ids[i],
                    boxes=np.asarray(boxes, dtype=np.float64),
                    frame=token_frame,
                    image=image.detach().cpu().numpy() if isinstance(image, Tensor) else image,
                    spacing=sample.get("spacing"),
                    phrase=batch.texts[i],
                )
            )
        return targets

    def _gather_rewards(self, rewards: Tensor) -> tuple[Tensor, int]:
        """Rewards of every rank (rank order) and this rank's offset, for advantages over the global batch."""
        world = self.trainer.world_size if self.trainer is not None else 1
        if world == 1:
            return rewards, 0
        gathered = self.all_gather(rewards)  # (world, N, R): equal N per rank (same batch size and G)
        return gathered.reshape(-1, rewards.shape[-1]), self.global_rank * rewards.shape[0]

    def _all_reduce_sum(self, x: Tensor) -> Tensor:
        if self.trainer is None or self.trainer.world_size == 1:
            return x
        return self.trainer.strategy.reduce(x, reduce_op="sum")

    def _grpo_step(self, samples: Sequence[Mapping[str, Any]]) -> None:
        start = time.perf_counter()
        cfg, G = self.loss_config, self.rollout_config.num_generations
        batch = self.prompter.build(samples, region_hint=True)
        rollout = self._rollout_backend().generate(batch.inputs, self.rollout_config)
        gen_time = time.perf_counter() - start

        targets_per_prompt = self._reward_targets(batch)
        targets = [targets_per_prompt[p] for p in rollout.prompt_index.tolist()]
        parsed = self.reward_set.parse(rollout.texts, targets)
        reward_out = self.reward_set(rollout.texts, targets, batch=parsed)
        per_func = reward_out.as_tensor().to(self.device)
        all_rewards, offset = self._gather_rewards(per_func)
        adv = group_advantages(
            all_rewards, G, reward_weights=list(reward_out.weights.values()), scale_rewards=cfg.scale_rewards
        )
        n_local = per_func.shape[0]
        advantages = adv.advantages[offset : offset + n_local]
        if not torch.isfinite(advantages).all():
            self._skip_nonfinite("advantage (reward)")
            return

        metrics: dict[str, float] = dict(reward_out.metrics())
        metrics["frac_reward_zero_std"] = adv.frac_reward_zero_std
        metrics["num_completions_global"] = float(all_rewards.shape[0])
        ious = parsed.best_iou
        metrics["iou/mean"] = float(np.nanmean(np.where(parsed.has_box, ious, 0.0)))
        metrics["parse_failure_rate"] = float(1.0 - parsed.has_box.mean())
        lengths = rollout.completion_mask.sum(1).float()
        metrics["completions/mean_length"] = float(lengths.mean())
        metrics["completions/clipped_ratio"] = float(rollout.is_truncated.float().mean())
        metrics["time/generate"] = gen_time

        mask = rollout.completion_mask.to(self.device).float()
        if cfg.mask_truncated_completions:
            mask = mask * (~rollout.is_truncated).to(mask.device).float().unsqueeze(1)

        # Prompts that enter the loss: all, or (dynamic sampling) those whose group rewards differ.
        keep = list(range(len(batch)))
        if self.dynamic_sampling:
            zero = adv.group_zero_std[offset // G : offset // G + len(batch)]
            keep = [p for p in keep if not bool(zero[p])]
            metrics["dynamic_sampling/kept_groups"] = float(len(keep))
        if not keep:
            self._log_metrics("train", metrics, batch_size=len(batch))
            return

        S = self.steps_per_generation
        slices = [keep[i::S] for i in range(S)] if len(keep) >= S else [keep]
        with_old = needs_old_logps(cfg.num_iterations, len(slices), 1)
        old_logps = self._logps(batch, rollout, no_grad=True) if with_old else None
        ref_logps = self._logps(batch, rollout, no_grad=True, model=self._ref_model) if cfg.beta > 0 else None
        max_len = rollout.completion_ids.shape[1]
        # Active tokens of the whole generation batch on all ranks: DAPO's global normaliser (TRL).
        num_items = self._all_reduce_sum(mask[[r for p in keep for r in range(p * G, p * G + G)]].sum())

        loss_metrics: list[dict[str, float]] = []
        nonfinite = False
        for _ in range(cfg.num_iterations):
            for prompts in slices:
                micro = self.micro_batch_size or len(prompts)
                chunks = [prompts[i : i + micro] for i in range(0, len(prompts), micro)]
                optimizer = self.optimizers()
                for j, chunk in enumerate(chunks):
                    sub_batch = self.prompter.subset(batch, chunk)
                    sub_rollout, rows = _subset_rollout(rollout, chunk)
                    rows = rows.to(self.device)
                    # DDP: gradients are all-reduced only on the last micro-batch of a slice.
                    with optimizer.toggle_model(sync_grad=j == len(chunks) - 1):
                        logps = completion_logprobs(
                            self.policy, sub_batch.inputs, sub_rollout, cfg.temperature,
                            self.rollout_config.share_prompt,
                        )  # fmt: skip
                        loss, lm = grpo_loss(
                            logps,
                            advantages[rows],
                            mask[rows],
                            cfg,
                            old_logps=None if old_logps is None else old_logps[rows],
                            ref_logps=None if ref_logps is None else ref_logps[rows],
                            num_items_in_batch=num_items,
                            max_completion_length=max_len,
                            grad_accum_steps=len(chunks),
                            steps_per_generation=len(slices),
                            num_processes=self.trainer.world_size if self.trainer is not None else 1,
                        )
                        if not torch.isfinite(loss):
                            nonfinite = True
                            break
                        self.manual_backward(loss)
                    lm["loss"] = float(loss.detach())
                    loss_metrics.append(lm)
                if nonfinite:
                    break
                if not self._grads_finite():
                    nonfinite = True
                    break
                step_metrics: dict[str, float] = {}
                self._optimizer_step(step_metrics)
                metrics.update(step_metrics)
            if nonfinite:
                break
        if nonfinite:
            self._skip_nonfinite("loss or gradient")
            return
        self._nonfinite_streak = 0
        for key in loss_metrics[0] if loss_metrics else []:
            values = [m[key] for m in loss_metrics if not math.isnan(m[key])]
            metrics[key] = float(np.mean(values)) if values else math.nan
        metrics["step_time"] = time.perf_counter() - start
        self._log_metrics("train", metrics, prog_bar=("reward", "iou/mean"), batch_size=len(batch))
        self._maybe_log_completions(batch, rollout, reward_out.total, ious)

    def _log_metrics(
        self, prefix: str, metrics: Mapping[str, float], *, batch_size: int, prog_bar: Sequence[str] = ()
    ) -> None:
        for key, value in metrics.items():
            self.log(f"{prefix}/{key}", float(value), prog_bar=key in prog_bar, batch_size=batch_size)

    def _grads_finite(self) -> bool:
        for p in self.model.parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return False
        return True

    def _logps(
        self, batch: PromptBatch, rollout: Rollout, *, no_grad: bool, model: torch.nn.Module | None = None
    ) -> Tensor:
        """Per-token log-probs of the whole rollout under ``model`` (default: the policy), without gradient."""
        policy = self.policy if model is None else copy.copy(self.policy)
        if model is not None:
            policy.model = model
        was_training = policy.model.training
        policy.model.eval()
        try:
            with torch.no_grad():
                return completion_logprobs(
                    policy,
                    batch.inputs,
                    rollout,
                    self.loss_config.temperature,
                    self.rollout_config.share_prompt,
                )
        finally:
            policy.model.train(was_training)

    def _maybe_log_completions(
        self, batch: PromptBatch, rollout: Rollout, rewards: np.ndarray, ious: np.ndarray
    ) -> None:
        n = self.log_completions_every_n_steps
        if not n or self.global_step % n != 0 or self.trainer is None:
            return
        rows = []
        for i, text in enumerate(rollout.texts[: 4 * rollout.num_generations]):
            p = int(rollout.prompt_index[i])
            rows.append(
                [self.global_step, batch.ids[p], batch.texts[p], text, float(rewards[i]), float(ious[i])]
            )
        columns = ["step", "id", "phrase", "completion", "reward", "iou"]
        for logger in self.loggers:
            log_text = getattr(logger, "log_text", None)
            if callable(log_text):  # W&B-style table loggers
                log_text(key="completions", columns=columns, data=rows)
        if self.trainer.log_dir:
            path = Path(self.trainer.log_dir) / "completions.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(dict(zip(columns, row)), ensure_ascii=False) + "\n")

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def predict_samples(
        self,
        samples: Sequence[Mapping[str, Any]],
        *,
        sampled: bool = False,
        max_new_tokens: int | None = None,
    ) -> tuple[PromptBatch, list[str], np.ndarray]:
        """Greedy (or one sampled) completion per sample; returns the batch, texts and best-match IoUs."""
        batch = self.prompter.build(samples)
        config = RolloutConfig.one_per_prompt(
            max_new_tokens or self.eval_config.max_new_tokens,
            sampled=sampled,
            temperature=self.eval_config.sampled_temperature,
            stop_strings=self.rollout_config.stop_strings,  # evaluated as trained
        )
        rollout = self._rollout_backend().generate(batch.inputs, config)
        index = rollout.prompt_index.tolist()
        decoded = self.prompter.decode(rollout.texts, batch, index)
        return batch, rollout.texts, self.prompter.ious(decoded, batch, index)

    def _eval_samples(self) -> list[Mapping[str, Any]]:
        dm = getattr(self.trainer, "datamodule", None) if self.trainer is not None else None
        if dm is None or not hasattr(dm, "eval_samples"):
            return []
        return list(dm.eval_samples(self.eval_config.max_samples))

    def _evaluate(self, stage: str) -> None:
        """Held-out mIoU / Acc@0.5 (greedy, and sampled at T) of the current policy, logged and remembered."""
        if not self.eval_config.enabled or self.trainer is None:
            return
        samples = self._eval_samples()
        if not samples:
            return
        results: dict[str, float] = {}
        modes = [("greedy", False)] + ([("sampled", True)] if self.eval_config.sampled else [])
        was_training = self.model.training
        self.model.eval()
        try:
            for name, sampled in modes:
                ious: list[float] = []
                bs = self.eval_config.batch_size
                for i in range(0, len(samples), bs):
                    _, _, batch_ious = self.predict_samples(samples[i : i + bs], sampled=sampled)
                    ious.extend(batch_ious.tolist())
                arr = np.asarray(ious)
                results[f"{name}/mIoU"] = float(arr.mean())
                results[f"{name}/acc@0.5"] = float((arr > 0.5).mean())
                results[f"{name}/acc@0.3"] = float((arr > 0.3).mean())
        finally:
            self.model.train(was_training)
        results["n"] = float(len(samples))
        results["step"] = float(self.global_step)
        self.eval_results[stage] = results
        # Straight to the loggers: this also runs in on_train_end, where self.log is not allowed.
        scalars = {f"eval_{stage}/{k}": v for k, v in results.items() if k not in ("n", "step")}
        for logger in self.loggers:
            logger.log_metrics(scalars, step=self.global_step)
        log.info("evaluation %s: %s", stage, results)

    def on_train_end(self) -> None:
        if self.global_step <= self.grpo_start_step or not self.eval_config.enabled:
            return
        self._evaluate("after_grpo")
        self._write_summary()

    def _write_summary(self) -> None:
        if self.trainer is None or not self.trainer.is_global_zero:
            return
        table = format_summary(self.eval_results)
        print("\n" + table + "\n", flush=True)
        if self.trainer.log_dir:
            out = Path(self.trainer.log_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "grpo_summary.json").write_text(
                json.dumps(self.eval_results, indent=2) + "\n", encoding="utf-8"
            )
            (out / "grpo_summary.md").write_text(table + "\n", encoding="utf-8")

    # ------------------------------------------------------------------ validate / test / predict

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        batch = as_samples(batch)
        _, _, ious = self.predict_samples(batch)
        self.log("val/mIoU", float(ious.mean()), batch_size=len(batch), sync_dist=True)
        self.log("val/acc@0.5", float((ious > 0.5).mean()), batch_size=len(batch), sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        batch = as_samples(batch)
        _, _, ious = self.predict_samples(batch)
        self.log("test/mIoU", float(ious.mean()), batch_size=len(batch), sync_dist=True)
        self.log("test/acc@0.5", float((ious > 0.5).mean()), batch_size=len(batch), sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int) -> list[dict[str, Any]]:
        batch = as_samples(batch)
        prompt_batch, texts, ious = self.predict_samples(batch)
        decoded = self.prompter.decode(texts, prompt_batch, list(range(len(texts))))
        return [
            {
                "id": prompt_batch.ids[i],
                "text": prompt_batch.texts[i],
                "completion": texts[i],
                "box_voxel": None if d.box_voxel is None else d.box_voxel.tolist(),
                "iou": float(ious[i]),
            }
            for i, d in enumerate(decoded)
        ]


def format_summary(results: Mapping[str, Mapping[str, float]]) -> str:
    """A short markdown table: held-out mIoU and Acc@0.5 at each evaluation stage."""
    order = [s for s in ("start", "warm_start", "after_grpo") if s in results]
    lines = [
        "| stage | step | greedy mIoU | greedy Acc@0.5 | sampled mIoU | sampled Acc@0.5 | n |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for stage in order:
        r = results[stage]

        def f(key: str, r: Mapping[str, float] = r) -> str:
            return f"{r[key]:.3f}" if key in r else "–"

        lines.append(
            f"| {stage} | {int(r.get('step', 0))} | {f('greedy/mIoU')} | {f('greedy/acc@0.5')} | "
            f"{f('sampled/mIoU')} | {f('sampled/acc@0.5')} | {int(r.get('n', 0))} |"
        )
    if "warm_start" in results and "after_grpo" in results:
        gain = results["after_grpo"]["greedy/mIoU"] - results["warm_start"]["greedy/mIoU"]
        lines.append("")
        lines.append(f"GRPO changed held-out greedy mIoU by {gain:+.3f} over the warm-started policy.")
    return "\n".join(lines)
