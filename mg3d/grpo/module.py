r"""``GRPOModule``: GRPO over a grounding policy as a LightningModule with manual optimisation.

One training step takes a *generation batch* of B prompts from the DataModule and does, in TRL's order::

    prompts ─► rollout: G completions per prompt (prompt prefilled once, its KV cache shared by the G samples)
            ─► rewards (one parse per completion, mg3d.rewards.RewardSet) ─► group advantages (all ranks)
            ─► for μ iterations × S / GA optimiser steps (TRL's steps_per_generation S, gradient accumulation GA):
                   Σ over GA micro-batches: manual_backward(grpo_loss)   (gradient sync only on the last)
                   clip grad norm ─► optimiser step ─► LR scheduler step ─► (entropy control, reference sync)

so one generation batch makes ``μ · S / GA`` optimiser steps (``trainer.global_step`` counts them). With more than
one, the policy moves between the rollout and the later steps, and the loss uses the log-probs of the sampling
policy (old log-probs), exactly as TRL does. The geometry and the normalisation inputs are in
:mod:`mg3d.grpo.step`, the held-out evaluation in :mod:`mg3d.grpo.heldout`.

A supervised warm start can run first (``warm_start.steps`` optimiser steps of teacher-forced
cross-entropy, :mod:`mg3d.sft`): the tiny offline model knows nothing, real checkpoints skip it.

The maths (advantages, the eight loss types, KL, normalisations, entropy bonus) is in :mod:`mg3d.grpo.loss`,
checked number for number against TRL 1.16.0, and this module's use of it by
``tests/test_grpo_module_parity.py``. A reference model exists only when β > 0 and is kept out of checkpoints
(it is rebuilt from the policy's initial weights).
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

from mg3d.checkpointing import moved_class_aliases
from mg3d.errors import ConfigError
from mg3d.generation import HFRolloutBackend, Rollout, RolloutConfig, completion_logprobs
from mg3d.grounding import GroundingPrompter, PromptBatch, PromptConfig
from mg3d.grpo.config import EvalConfig, OptimConfig, WarmStartConfig
from mg3d.grpo.entropy_control import AdaptiveEntropyCoef
from mg3d.grpo.heldout import HeldOutEvaluation, as_samples, format_summary
from mg3d.grpo.loss import GRPOLossConfig, group_advantages, grpo_loss, needs_old_logps
from mg3d.grpo.schedule import PhaseSchedule
from mg3d.grpo.step import BatchGeometry, ReferenceModel, subset_rollout, trl_normalisation
from mg3d.lora import LoRAConfig, adapters_disabled
from mg3d.model import PolicyConfig
from mg3d.rewards import RewardSet, RewardTarget
from mg3d.rewards.targets import target_from_sample
from mg3d.sft import sft_loss
from mg3d.sharding import gathered_parameters, is_sharded, shard_policy

log = logging.getLogger(__name__)

__all__ = ["GRPOModule", "as_samples", "format_summary"]

DEFAULT_REWARDS: dict[str, Any] = {"format": 1.0, "iou": 1.0}

# Lightning resumes with torch.load(weights_only=True): the checkpoint's hyper-parameters are these plain
# configuration dataclasses, so they are allow-listed — and nothing else, so a crafted pickle still fails.
torch.serialization.add_safe_globals(
    [PolicyConfig, PromptConfig, OptimConfig, WarmStartConfig, EvalConfig, RolloutConfig, GRPOLossConfig]
)
torch.serialization.add_safe_globals([LoRAConfig])  # policy.lora, nested in PolicyConfig
torch.serialization.add_safe_globals(moved_class_aliases())  # checkpoints that name a class's old path


class GRPOModule(HeldOutEvaluation, pl.LightningModule):
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
        steps_per_generation: S, micro-batches per generation batch, as in TRL (default: GA, i.e. one optimiser
            step per generation batch). mg3d configs before issue 22 used it for optimiser steps: that meaning is
            kept, with a deprecation warning, when ``micro_batch_size`` is also set (see :mod:`mg3d.grpo.step`).
        gradient_accumulation_steps: GA, micro-batches per optimiser step (TRL's name); S / GA optimiser steps.
        micro_batch_size: prompts per micro-batch (mg3d's other spelling of GA, for a batch size that varies);
            ``None`` = GA micro-batches.
        generation_batch_size: TRL's completions per generation batch on all ranks; mg3d's generation batch is
            the DataModule batch (B prompts × G per rank), so this is a check: B · G · world size must equal it.
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
        steps_per_generation: int | None = None,
        micro_batch_size: int | None = None,
        gradient_accumulation_steps: int = 1,
        generation_batch_size: int | None = None,
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
        self.geometry = BatchGeometry.from_options(
            steps_per_generation, gradient_accumulation_steps, micro_batch_size
        )
        if generation_batch_size is not None and generation_batch_size % self.rollout_config.num_generations:
            raise ConfigError(
                f"generation_batch_size={generation_batch_size} must be a multiple of rollout.num_generations="
                f"{self.rollout_config.num_generations}"
            )
        if abs(self.loss_config.temperature - self.rollout_config.temperature) > 1e-12:
            raise ConfigError(
                f"loss.temperature={self.loss_config.temperature} differs from rollout.temperature="
                f"{self.rollout_config.temperature}: log-probs must be computed at the sampling temperature"
            )
        self.generation_batch_size = generation_batch_size
        # the options as given (the geometry above is what the step uses)
        self.steps_per_generation = steps_per_generation
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.micro_batch_size = micro_batch_size
        self.dynamic_sampling = dynamic_sampling
        self.sampling_seed = sampling_seed
        self.log_completions_every_n_steps = log_completions_every_n_steps
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.save_hyperparameters()

        self.policy = self.policy_config.build(default_seed=self.sampling_seed)
        self.model = self.policy.model  # registered as a submodule: Lightning moves, saves and syncs it
        self.prompter = GroundingPrompter(self.policy, self.prompt_config)
        self.reward_set = RewardSet.from_config(
            rewards or DEFAULT_REWARDS, codec=self.policy.codec_name, parse_mode=self.prompt_config.parse_mode
        )
        # The reference model is not a registered submodule, so it is neither optimised nor checkpointed. With
        # LoRA it is the policy with its adapters switched off (no second copy; see _ref_logps).
        self._reference: ReferenceModel | None = None
        if self.policy_config.lora is not None and self.loss_config.sync_ref_model:
            raise ConfigError(
                "loss.sync_ref_model needs full fine-tuning: with policy.lora the reference is the base model"
            )
        if self.loss_config.beta > 0 and self.policy_config.lora is None:
            object.__setattr__(self, "_reference", ReferenceModel(self.policy.model))
        lc = self.loss_config
        self.entropy_control = (
            AdaptiveEntropyCoef(
                lc.entropy_coef,
                lc.entropy_target,
                lc.entropy_coef_delta,
                lc.entropy_coef_min,
                lc.entropy_coef_max,
            )
            if lc.use_adaptive_entropy
            else None
        )
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
            params,
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            weight_decay=o.weight_decay,
            fused=True if o.fused else None,  # None: torch's default (a for-loop on CPU)
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

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``: shard the policy with FSDP2 over the data-parallel mesh
        (:func:`mg3d.sharding.shard_policy`); other strategies leave it whole."""
        mesh = self.device_mesh
        if mesh is not None and not is_sharded(self.model):
            if self.loss_config.sync_ref_model:  # the reference copy is whole; mixing it needs whole weights
                raise ConfigError("loss.sync_ref_model is not supported under FSDP2 (ModelParallelStrategy)")
            names = mesh.mesh_dim_names or ()
            shard_policy(self.model, mesh["data_parallel"] if "data_parallel" in names else mesh)

    def on_fit_start(self) -> None:
        """Train the policy in train mode, as TRL's Trainer does: a policy loaded from a folder arrives in eval
        mode (``from_pretrained``), which would silently switch dropout (LoRA dropout included) off. Generation
        and the old/reference log-probs still switch to eval mode themselves."""
        self.model.train()

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
        if self.entropy_control is not None:  # TRL: entropy_ctrl_state.json
            checkpoint["mg3d_entropy_control"] = self.entropy_control.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("mg3d_sampling_rng")
        if state is not None:
            self._rollout_backend().generator.set_state(state)  # type: ignore[union-attr]
        self.eval_results = dict(checkpoint.get("mg3d_eval_results", {}))
        self.nonfinite_skips = int(checkpoint.get("mg3d_nonfinite_skips", 0))
        self.grpo_phase_started = bool(checkpoint.get("mg3d_grpo_phase_started", False))
        entropy_state = checkpoint.get("mg3d_entropy_control")
        if self.entropy_control is not None and entropy_state is not None:
            self.entropy_control.load_state_dict(entropy_state)

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
        already in memory instead of reloading the original file. ``target_from_sample`` (shared with the
        semantic property study) turns the windowed tensor back into HU / SUV through the preset's declaration.
        """
        return [
            target_from_sample(sample, record_id=batch.ids[i], phrase=batch.texts[i], frame=grid_to_text)
            for i, (sample, grid_to_text) in enumerate(zip(batch.samples, batch.grid_to_text))
        ]

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
        self._check_generation_batch_size(all_rewards.shape[0])
        adv = group_advantages(
            all_rewards,
            G,
            reward_weights=list(reward_out.weights.values()),
            scale_rewards=cfg.scale_rewards,
            multi_objective_aggregation=cfg.multi_objective_aggregation,
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

        plan = self.geometry.plan(keep)
        with_old = needs_old_logps(cfg.num_iterations, len(plan), 1)
        old_logps = self._logps(batch, rollout, no_grad=True) if with_old else None
        ref_logps = self._ref_logps(batch, rollout) if cfg.beta > 0 else None
        # Active tokens of the whole generation batch on all ranks: DAPO's global normaliser (TRL).
        num_items = self._all_reduce_sum(mask[[r for p in keep for r in range(p * G, p * G + G)]].sum())
        world = self.trainer.world_size if self.trainer is not None else 1
        # The entropy bonus needs the entropies' gradient; otherwise they only select tokens and are logged.
        entropy_grad = cfg.entropy_bonus_enabled

        loss_metrics: list[dict[str, float]] = []
        step_losses: list[float] = []
        nonfinite = False
        for _ in range(cfg.num_iterations):
            for chunks in plan:
                optimizer = self.optimizers()
                step_loss = 0.0
                normalisation = trl_normalisation(
                    num_items, len(chunks), len(plan), self.rollout_config.max_new_tokens, world
                )
                for j, chunk in enumerate(chunks):
                    sub_batch = self.prompter.subset(batch, chunk)
                    sub_rollout, rows = subset_rollout(rollout, chunk)
                    rows = rows.to(self.device)
                    # DDP: gradients are all-reduced only on the last micro-batch of a step.
                    with optimizer.toggle_model(sync_grad=j == len(chunks) - 1):
                        logps, entropies = completion_logprobs(
                            self.policy, sub_batch.inputs, sub_rollout, cfg.temperature,
                            self.rollout_config.share_prompt, with_entropy=True, entropy_grad=entropy_grad,
                        )  # fmt: skip
                        loss, lm = grpo_loss(
                            logps,
                            advantages[rows],
                            mask[rows],
                            cfg,
                            old_logps=None if old_logps is None else old_logps[rows],
                            ref_logps=None if ref_logps is None else ref_logps[rows],
                            entropies=entropies,
                            entropy_control=self.entropy_control,
                            **normalisation,
                        )
                        if not torch.isfinite(loss):
                            nonfinite = True
                            break
                        self.manual_backward(loss)
                    step_loss += float(loss.detach())
                    loss_metrics.append(lm)
                if nonfinite:
                    break
                if not self._grads_finite():
                    nonfinite = True
                    break
                step_losses.append(step_loss)
                step_metrics: dict[str, float] = {}
                self._optimizer_step(step_metrics)
                self._after_optimizer_step(step_metrics)
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
        # As the HF Trainer logs TRL's loss: the micro-batch losses (each already divided for accumulation)
        # summed over an optimiser step, averaged over the optimiser steps — independent of micro-batching.
        metrics["loss"] = float(np.mean(step_losses))
        metrics["step_time"] = time.perf_counter() - start
        self._log_metrics("train", metrics, prog_bar=("reward", "iou/mean"), batch_size=len(batch))
        self._maybe_log_completions(batch, rollout, reward_out.total, ious)

    def _after_optimizer_step(self, metrics: dict[str, float]) -> None:
        """TRL's per-step bookkeeping after ``optimizer.step()``: the adaptive entropy coefficient moves (and
        ``entropy_coef`` is logged whenever the bonus is on), and the reference model is mixed towards the
        policy every ``ref_model_sync_steps`` optimiser steps (``sync_ref_model``)."""
        cfg = self.loss_config
        if self.entropy_control is not None:
            world = self.trainer.world_size if self.trainer is not None else 1
            self.entropy_control.end_step(self._all_reduce_sum if world > 1 else None)
            metrics["entropy_coef"] = self.entropy_control.coef
        elif cfg.entropy_bonus_enabled:
            metrics["entropy_coef"] = cfg.entropy_coef
        if cfg.sync_ref_model and self._reference is not None:
            self._reference.maybe_sync(
                self.model, self.global_step, cfg.ref_model_mixup_alpha, cfg.ref_model_sync_steps
            )

    def _check_generation_batch_size(self, completions: int) -> None:
        """TRL's ``generation_batch_size`` is the completions of one generation batch on all ranks; mg3d's comes
        from the DataModule batch size, so a configured value is checked against it."""
        if self.generation_batch_size is not None and completions != self.generation_batch_size:
            G = self.rollout_config.num_generations
            world = self.trainer.world_size if self.trainer is not None else 1
            raise ConfigError(
                f"generation_batch_size={self.generation_batch_size} but a generation batch has {completions} "
                f"completions (data.batch_size × rollout.num_generations={G} × {world} ranks): set data.batch_size "
                f"to {self.generation_batch_size // (G * world)} or change generation_batch_size"
            )

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

    def _ref_logps(self, batch: PromptBatch, rollout: Rollout) -> Tensor:
        """Log-probs under the reference policy: the frozen copy, or with LoRA the base model (adapters off)."""
        if self._reference is not None:
            return self._logps(batch, rollout, no_grad=True, model=self._reference.model)
        with adapters_disabled(self.model):
            return self._logps(batch, rollout, no_grad=True)

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
            with torch.no_grad(), gathered_parameters(policy.model):  # FSDP2: gathered once for the pass
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
