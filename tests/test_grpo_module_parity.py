"""``GRPOModule`` calls the GRPO maths as TRL 1.16's ``GRPOTrainer`` does (issue 22, first build item).

``tests/test_grpo_loss.py`` checks :mod:`mg3d.grpo.loss` against TRL's own code; this file checks the call
site: the gradient that reaches the parameters after one real training step (Lightning, tiny policy, phantom
data) equals the gradient of TRL's loss written out by hand for the same rollout —

* dapo: −Σ m A ∇ℓp / N over the generation batch (S optimiser steps: each step's rows × S / N), whatever the
  micro-batching (here through the deprecated ``steps_per_generation`` + ``micro_batch_size`` spelling of
  several optimiser steps; ``tests/test_grpo_module_trl.py`` uses TRL's ``gradient_accumulation_steps``);
* dr_grpo: −Σ m A ∇ℓp / (B · max_completion_length), the generation limit, not the longest completion;
* ``top_entropy_quantile=0.2``: only the top 20 % tokens by entropy (softmax at T) enter, ``entropy`` logged;

and that a policy loaded from a folder trains in train mode while it still generates in eval mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

import mg3d.grpo.module as module_mod
from mg3d.data.datamodule import GroundingDataModule, SourceConfig
from mg3d.generation import HFRolloutBackend, Rollout, RolloutConfig, completion_logprobs
from mg3d.generation.inputs import prompt_positions, replicate_prompt_inputs
from mg3d.grounding import PromptConfig
from mg3d.grpo.config import EvalConfig, OptimConfig, WarmStartConfig
from mg3d.grpo.loss import GRPOLossConfig, token_logps_and_entropies
from mg3d.grpo.module import GRPOModule
from mg3d.model import PolicyConfig, build_tiny_policy, save_policy

MAX_NEW_TOKENS = 12
# Completions of the random tiny policy are about 10 characters: rewarding "at most 10" (plus IoU) gives
# every group of 8 a reward spread, so the advantages, hence the gradients, are not zero.
SPREAD_REWARDS = {
    "iou": 1.0,
    "format": {"mode": "lenient", "sanity_weight": 1.0, "min_think_chars": 0, "max_chars": 10},
}


def make_module(loss: GRPOLossConfig, **overrides: Any) -> GRPOModule:
    kwargs: dict[str, Any] = dict(
        prompt=PromptConfig(template="terse", system_prompt="", max_vision_tokens=32),
        rollout=RolloutConfig(num_generations=8, max_new_tokens=MAX_NEW_TOKENS),
        loss=loss,
        rewards=SPREAD_REWARDS,
        optim=OptimConfig(lr=1e-3, schedule="constant", max_grad_norm=1.0),
        warm_start=WarmStartConfig(steps=0),
        evaluation=EvalConfig(enabled=False),
        log_completions_every_n_steps=0,
    )
    kwargs.update(overrides)
    return GRPOModule(**kwargs)


class Recorder:
    """What one GRPO step saw and did: prompt inputs, rollout, advantages, and the gradient of each optimiser
    step before clipping (``_optimizer_step`` clips)."""

    def __init__(
        self, module: GRPOModule, monkeypatch: pytest.MonkeyPatch, cut_at: int | None = None
    ) -> None:
        self.inputs: list[dict[str, Any]] = []
        self.rollouts: list[Rollout] = []
        self.advantages: list[torch.Tensor] = []
        self.grads: list[dict[str, torch.Tensor]] = []
        self.generate_in_train_mode: list[bool] = []
        real_generate = HFRolloutBackend.generate
        real_advantages = module_mod.group_advantages
        real_step = module._optimizer_step

        def generate(backend: HFRolloutBackend, prompt_inputs: Any, config: RolloutConfig) -> Rollout:
            modes: list[bool] = []  # the model's mode during its forwards inside generation
            hook = backend.policy.model.register_forward_pre_hook(lambda m, args: modes.append(m.training))
            try:
                rollout = real_generate(backend, prompt_inputs, config)
            finally:
                hook.remove()
            self.generate_in_train_mode.append(any(modes))
            if cut_at is not None:  # completions shorter than the limit (rewards still read the full texts)
                rollout = Rollout(
                    **{
                        **rollout.__dict__,
                        "completion_ids": rollout.completion_ids[:, :cut_at],
                        "completion_mask": rollout.completion_mask[:, :cut_at],
                    }
                )
            self.inputs.append(dict(prompt_inputs))
            self.rollouts.append(rollout)
            return rollout

        def advantages(*args: Any, **kwargs: Any) -> Any:
            out = real_advantages(*args, **kwargs)
            self.advantages.append(out.advantages.clone())
            return out

        def optimizer_step(metrics: dict[str, float]) -> None:
            params = module.model.named_parameters()
            self.grads.append({n: p.grad.detach().clone() for n, p in params if p.grad is not None})
            real_step(metrics)

        monkeypatch.setattr(HFRolloutBackend, "generate", generate)
        monkeypatch.setattr(module_mod, "group_advantages", advantages)
        module._optimizer_step = optimizer_step  # type: ignore[method-assign]


def fit(
    module: GRPOModule,
    source: SourceConfig,
    tmp: Path,
    *,
    steps: int,
    batch_size: int,
    callbacks: list[pl.Callback] | None = None,
) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp),
        use_distributed_sampler=False, enable_checkpointing=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, GroundingDataModule([source], batch_size=batch_size, cache="memory", seed=0))
    return trainer


def hand_gradient(
    loss: GRPOLossConfig, rec: Recorder, divisor: float, rows: list[int] | None = None
) -> tuple[dict[str, torch.Tensor], float]:
    """∇ of −Σ_{rows} m · h · A · exp(ℓp − ℓp.detach()) / divisor on a fresh copy of the initial policy
    (the same seed gives the same weights), h the top-ρ entropy mask over the rows; and the loss value."""
    fresh = make_module(loss)
    fresh.model.train()
    rollout, adv = rec.rollouts[0], rec.advantages[0]
    logps, entropies = completion_logprobs(
        fresh.policy, rec.inputs[0], rollout, loss.temperature, with_entropy=True
    )
    mask = rollout.completion_mask.float()
    if rows is not None:
        keep_rows = torch.zeros(mask.shape[0], 1)
        keep_rows[rows] = 1.0
        mask = mask * keep_rows
    if loss.top_entropy_quantile < 1:
        threshold = torch.quantile(entropies[mask.bool()], 1 - loss.top_entropy_quantile)
        mask_policy = mask * (entropies >= threshold).float()
    else:
        mask_policy = mask
    value = -(mask_policy * adv[:, None] * torch.exp(logps - logps.detach())).sum() / divisor
    value.backward()
    grads = {n: p.grad for n, p in fresh.model.named_parameters() if p.grad is not None}
    return grads, float(value.detach())


def assert_same_gradient(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    scale = max(float(g.abs().max()) for g in want.values())
    assert scale > 1e-6  # a real gradient, not two zeros
    for name, g in want.items():
        assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-5 * scale), name


@pytest.mark.parametrize(
    ("steps_per_generation", "batch_size", "micro_batch_size"),
    [(1, 2, None), (1, 2, 1), (2, 4, None), (2, 4, 1)],
)
def test_dapo_gradient_is_the_global_token_mean_whatever_the_micro_batching(
    phantom_source, tmp_path, monkeypatch, steps_per_generation, batch_size, micro_batch_size
):
    """TRL: L = Σ m ℓ / (N/P · GA/S) with S micro-batches per generation batch, so each optimiser step's
    gradient is (its rows' Σ m ℓ) · S_opt / N. Only the first step is compared: later ones start from moved
    weights. The logged loss is TRL's too: micro-batch losses summed per optimiser step, not shrunk."""
    loss = GRPOLossConfig(loss_type="dapo")
    module = make_module(loss, steps_per_generation=steps_per_generation, micro_batch_size=micro_batch_size)
    rec = Recorder(module, monkeypatch)
    trainer = fit(module, phantom_source, tmp_path, steps=steps_per_generation, batch_size=batch_size)
    assert len(rec.grads) == steps_per_generation and len(rec.rollouts) == 1

    G = module.rollout_config.num_generations
    first_slice = list(range(0, batch_size, steps_per_generation))  # slices are keep[i::S]
    rows = [r for p in first_slice for r in range(p * G, p * G + G)]
    tokens = float(rec.rollouts[0].completion_mask.sum())
    want, value = hand_gradient(loss, rec, tokens / steps_per_generation, rows)
    assert_same_gradient(rec.grads[0], want)
    if steps_per_generation == 1:
        assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(value, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("micro_batch_size", [None, 1])
def test_dr_grpo_divides_by_the_generation_limit(phantom_source, tmp_path, monkeypatch, micro_batch_size):
    """Completions cut to 5 tokens (limit 12): the divisor is B · 12 (TRL's max_completion_length), not B · 5."""
    loss = GRPOLossConfig(loss_type="dr_grpo")
    module = make_module(loss, micro_batch_size=micro_batch_size)
    rec = Recorder(module, monkeypatch, cut_at=5)
    fit(module, phantom_source, tmp_path, steps=1, batch_size=2)
    assert rec.rollouts[0].completion_ids.shape[1] == 5
    rows = rec.rollouts[0].completion_ids.shape[0]
    want, _ = hand_gradient(loss, rec, rows * MAX_NEW_TOKENS)
    assert_same_gradient(rec.grads[0], want)


def test_top_entropy_quantile_trains_and_entropy_is_logged(phantom_source, tmp_path, monkeypatch):
    loss = GRPOLossConfig(loss_type="dapo", top_entropy_quantile=0.2)
    module = make_module(loss)
    rec = Recorder(module, monkeypatch)
    trainer = fit(module, phantom_source, tmp_path, steps=1, batch_size=2)
    assert trainer.global_step == 1
    want, _ = hand_gradient(loss, rec, float(rec.rollouts[0].completion_mask.sum()))
    assert_same_gradient(rec.grads[0], want)
    # TRL's ``entropy``: the token mean of the per-token entropies over the loss mask.
    fresh = make_module(loss)
    with torch.no_grad():
        _, entropies = completion_logprobs(
            fresh.policy, rec.inputs[0], rec.rollouts[0], loss.temperature, with_entropy=True
        )
    mask = rec.rollouts[0].completion_mask.float()
    expected = float((entropies * mask).sum() / mask.sum())
    assert float(trainer.callback_metrics["train/entropy"]) == pytest.approx(expected, rel=1e-5)


def test_entropy_is_logged_by_default(phantom_source, tmp_path):
    module = make_module(GRPOLossConfig(loss_type="grpo"), micro_batch_size=1)
    trainer = fit(module, phantom_source, tmp_path, steps=1, batch_size=2)
    assert float(trainer.callback_metrics["train/entropy"]) > 0


@pytest.mark.parametrize("share_prompt", [True, False])
def test_completion_entropies_are_the_softmax_entropy_at_temperature(phantom_source, share_prompt):
    """``with_entropy=True``: entropies of softmax(logits / T) from a plain forward (via the TRL-checked
    ``token_logps_and_entropies``), 0 where masked; the log-probs are those returned without the option."""
    module = make_module(GRPOLossConfig(loss_type="dapo"))
    dm = GroundingDataModule([phantom_source], batch_size=2, cache="memory", seed=0)
    dm.setup("fit")
    batch = module.prompter.build(dm.eval_samples(2), region_hint=True)
    t = 0.7
    rollout = HFRolloutBackend(module.policy, seed=0).generate(
        batch.inputs, RolloutConfig(num_generations=2, max_new_tokens=6, temperature=t)
    )
    policy = module.policy
    with torch.no_grad():
        logps, entropies = completion_logprobs(
            policy, batch.inputs, rollout, t, share_prompt=share_prompt, with_entropy=True
        )
        plain = completion_logprobs(policy, batch.inputs, rollout, t, share_prompt=share_prompt)
        inputs = replicate_prompt_inputs(policy, batch.inputs, rollout.num_generations)
        ids, cmask = rollout.completion_ids, rollout.completion_mask
        full = {
            **inputs,
            "input_ids": torch.cat([inputs["input_ids"], ids], dim=1),
            "attention_mask": torch.cat([inputs["attention_mask"], cmask], dim=1),
            "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], dim=1),
        }
        logits = policy.model(**full, position_ids=prompt_positions(policy, full), use_cache=False).logits
        ref_logps, ref_entropies = token_logps_and_entropies(
            logits[:, -ids.shape[1] - 1 : -1], ids, temperature=t, mask=cmask
        )
    assert torch.equal(logps, plain)
    assert torch.allclose(logps, ref_logps, atol=2e-5)
    assert torch.allclose(entropies, ref_entropies, atol=2e-5)
    assert torch.all(entropies[cmask == 0] == 0) and bool((entropies[cmask == 1] > 0).all())


def test_policy_loaded_from_a_folder_trains_in_train_mode(phantom_source, tmp_path, monkeypatch):
    folder = save_policy(build_tiny_policy(extra_tokens=["<answer>", "</answer>"]), tmp_path / "policy")
    module = make_module(GRPOLossConfig(loss_type="dapo"), policy=PolicyConfig(checkpoint=str(folder)))
    assert not module.model.training  # from_pretrained returns the model in eval mode

    modes: list[bool] = []

    class TrainMode(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            modes.append(all(m.training for m in pl_module.model.modules()))

    rec = Recorder(module, monkeypatch)
    fit(module, phantom_source, tmp_path, steps=1, batch_size=2, callbacks=[TrainMode()])
    assert modes == [True]
    assert rec.generate_in_train_mode == [False]  # sampling still runs in eval mode
    assert module.model.training
