"""The real ``GRPOModule`` training step against TRL 1.16's own loss code on the same rollout (issue 22).

One generation batch of 4 prompts × 4 completions makes two optimiser steps — two slices of the batch, or (with
micro-batching) μ = 2 passes over the whole batch in two micro-batches — with β > 0 (reference model) and old
log-probs, for every loss type. For each optimiser
step the test restores the weights the module had before it, recomputes the log-probs of that step's
micro-batches, and hands them to TRL's unbound ``GRPOTrainer._compute_loss`` (on an instance carrying only the
attributes it reads, with TRL's batch geometry: GA micro-batches per step, S per generation batch, N active
tokens) — then compares the gradient TRL's loss sends to every parameter with the gradient the module had
before clipping.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from test_grpo_module_parity import Recorder, fit, make_module
from trl import GRPOTrainer

from mg3d.generation import RolloutConfig, completion_logprobs
from mg3d.grpo.loss import LOSS_TYPES, GRPOLossConfig
from mg3d.grpo.module import GRPOModule

PROMPTS, G, MAX_NEW_TOKENS = 4, 4, 12
# (steps_per_generation S, gradient_accumulation_steps GA, num_iterations μ): μ · S / GA = 2 optimiser steps per
# generation batch, each of one micro-batch (2 slices of 2 prompts) or of two (the 4 prompts, twice).
GEOMETRIES = {"no_micro_batching": (2, 1, 1), "micro_batching": (2, 2, 2)}
EXTRA: dict[str, dict[str, Any]] = {  # each type's own parameters away from their defaults where it matters
    "cispo": {"epsilon_high": 1.05},
    "sapo": {"sapo_temperature_neg": 2.0},
    "luspo": {"importance_sampling_level": "sequence"},
    "vespo": {"vespo_lambda_pos": 2.0},
}


def _snapshot_recorder(module: GRPOModule, rec: Recorder) -> list[dict[str, torch.Tensor]]:
    """Also keep the weights before every optimiser step (the recorder keeps the gradients)."""
    states: list[dict[str, torch.Tensor]] = []
    record_grads = module._optimizer_step

    def step(metrics: dict[str, float]) -> None:
        states.append({k: v.detach().clone() for k, v in module.model.state_dict().items()})
        record_grads(metrics)

    module._optimizer_step = step  # type: ignore[method-assign]
    return states


def _trl_stub(config: GRPOLossConfig, grad_accum: int, steps: int) -> GRPOTrainer:
    """TRL's trainer reduced to what ``_compute_loss`` reads; one per generation batch, so the adaptive entropy
    controller's state carries across its optimiser steps."""
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    for name in ("loss_type", "beta", "epsilon_low", "epsilon_high", "importance_sampling_level"):
        setattr(trainer, name, getattr(config, name))
    for name in ("top_entropy_quantile", "off_policy_mask_threshold", "entropy_coef", "use_adaptive_entropy"):
        setattr(trainer, name, getattr(config, name))
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = trainer.aux_loss_enabled = False
    trainer._entropy_bonus_enabled = config.entropy_bonus_enabled
    trainer._last_world_entropy = float("inf")
    trainer._entropy_window_stats = None
    trainer.current_gradient_accumulation_steps = grad_accum
    trainer.max_completion_length = MAX_NEW_TOKENS
    trainer.model = SimpleNamespace(training=True)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def identity(x, **_):
        return x

    trainer.accelerator = SimpleNamespace(
        num_processes=1, gather=identity, reduce=identity, gather_for_metrics=identity,
        pad_across_processes=identity, sync_gradients=True,
    )  # fmt: skip
    names = (
        "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
        "vespo_lambda_neg", "entropy_target", "entropy_coef_delta", "entropy_coef_min", "entropy_coef_max",
    )  # fmt: skip
    trainer.args = SimpleNamespace(
        delta=config.delta, use_bias_correction_kl=config.kl_bias_correction, steps_per_generation=steps,
        **{n: getattr(config, n) for n in names},
    )  # fmt: skip
    return trainer


def trl_gradients(
    config: GRPOLossConfig, rec: Recorder, states: list[dict[str, torch.Tensor]], steps: int, grad_accum: int
) -> tuple[list[dict[str, torch.Tensor]], GRPOTrainer]:
    """TRL's gradient for each optimiser step of the recorded generation batch (and TRL's trainer after them)."""
    fresh = make_module(config)
    rollout, inputs, adv = rec.rollouts[0], rec.inputs[0], rec.advantages[0]
    mask = rollout.completion_mask.float()
    entropy_grad = config.entropy_bonus_enabled

    def logps_at(
        state: dict[str, torch.Tensor], train: bool, grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fresh.model.load_state_dict(state)
        fresh.model.train(train)
        with torch.set_grad_enabled(grad):
            return completion_logprobs(
                fresh.policy,
                inputs,
                rollout,
                config.temperature,
                with_entropy=True,
                entropy_grad=entropy_grad,
            )

    old, _ = logps_at(states[0], False, False)  # the sampling policy: the weights before the first step
    ref = old  # the reference is the initial policy too
    optimizer_steps = steps // grad_accum
    per_step = [list(range(PROMPTS))[k::optimizer_steps] for k in range(optimizer_steps)]
    trainer = _trl_stub(config, grad_accum, steps)
    out = []
    for index, state in enumerate(states):
        prompts = per_step[index % optimizer_steps]
        chunks = [prompts[j * len(prompts) // grad_accum : (j + 1) * len(prompts) // grad_accum] for j in range(grad_accum)]  # fmt: skip
        fresh.model.zero_grad(set_to_none=True)
        logps, entropies = logps_at(state, True, True)  # one forward; each micro-batch takes its rows
        total = torch.zeros(())
        for j, chunk in enumerate(chunks):
            rows = [r for p in chunk for r in range(p * G, p * G + G)]
            lp, h = logps[rows], entropies[rows] if entropy_grad else entropies[rows].detach()
            trainer._get_per_token_logps_and_entropies = lambda *a, lp=lp, h=h, **k: (lp, h, None)
            trainer.accelerator.sync_gradients = j == len(chunks) - 1
            batch = {
                "prompt_ids": rollout.prompt_ids[[r // G for r in rows]],
                "prompt_mask": rollout.prompt_mask[[r // G for r in rows]],
                "completion_ids": rollout.completion_ids[rows],
                "completion_mask": mask[rows],
                "advantages": adv[rows],
                "num_items_in_batch": mask.sum(),
                "old_per_token_logps": old[rows],
                "ref_per_token_logps": ref[rows],
            }
            total = total + GRPOTrainer._compute_loss(trainer, None, batch)
        total.backward()
        out.append({n: p.grad.clone() for n, p in fresh.model.named_parameters() if p.grad is not None})
    return out, trainer


def run_and_compare(
    config: GRPOLossConfig, geometry: str, phantom_source, tmp_path, monkeypatch
) -> tuple[GRPOModule, pl.Trainer, GRPOTrainer]:
    steps, grad_accum, _ = GEOMETRIES[geometry]
    module = make_module(
        config,
        steps_per_generation=steps,
        gradient_accumulation_steps=grad_accum,
        rollout=RolloutConfig(num_generations=G, max_new_tokens=MAX_NEW_TOKENS),
    )
    rec = Recorder(module, monkeypatch)
    states = _snapshot_recorder(module, rec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = fit(module, phantom_source, tmp_path, steps=2, batch_size=PROMPTS)
    assert len(rec.rollouts) == 1 and len(rec.grads) == len(states) == 2  # μ × S / GA optimiser steps

    want, trl = trl_gradients(config, rec, states, steps, grad_accum)
    for got, expected in zip(rec.grads, want, strict=True):
        assert got.keys() == expected.keys()
        scale = max(float(g.abs().max()) for g in expected.values())
        assert scale > 1e-6  # a real gradient, not two zeros
        for name, g in expected.items():
            assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-5 * scale), (name, config.loss_type)
    return module, trainer, trl


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_module_gradients_equal_trl_compute_loss(phantom_source, tmp_path, monkeypatch, loss_type, geometry):
    iterations = GEOMETRIES[geometry][2]
    config = GRPOLossConfig(
        loss_type=loss_type, beta=0.04, num_iterations=iterations, **EXTRA.get(loss_type, {})
    )
    run_and_compare(config, geometry, phantom_source, tmp_path, monkeypatch)


OPTIONS: dict[str, dict[str, Any]] = {
    "entropy_bonus": {"loss_type": "dapo", "entropy_coef": 0.05, "top_entropy_quantile": 0.5},
    "adaptive_entropy": {"loss_type": "grpo", "use_adaptive_entropy": True, "entropy_target": 10.0},
    "off_policy_mask": {"loss_type": "bnpo", "off_policy_mask_threshold": 0.0},
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_module_options_equal_trl_compute_loss(phantom_source, tmp_path, monkeypatch, option):
    """The entropy bonus (its gradient through the entropies), adaptive control across optimiser steps (the
    second step applies the coefficient the first one set) and the off-policy mask, with micro-batching."""
    config = GRPOLossConfig(beta=0.04, num_iterations=2, **OPTIONS[option])
    module, trainer, trl = run_and_compare(config, "micro_batching", phantom_source, tmp_path, monkeypatch)
    if config.entropy_bonus_enabled:
        assert float(trainer.callback_metrics["train/entropy_coef"]) == pytest.approx(trl.entropy_coef)
        assert "train/policy_loss" in trainer.callback_metrics
    if config.use_adaptive_entropy:
        assert module.entropy_control is not None
        assert module.entropy_control.coef == pytest.approx(trl.entropy_coef) and trl.entropy_coef > 0
        assert module.entropy_control.last_world_entropy == pytest.approx(trl._last_world_entropy, rel=1e-5)


@pytest.mark.parametrize("sync_steps", [1, 3])
def test_sync_ref_model_mixes_the_reference_as_trl(phantom_source, tmp_path, monkeypatch, sync_steps):
    """After optimiser steps that are multiples of ``ref_model_sync_steps`` the reference is mixed towards the
    policy exactly as TRL's ``SyncRefModelCallback`` mixes it (π_ref ← α π_θ + (1 − α) π_ref)."""
    from trl.trainer.callbacks import SyncRefModelCallback

    config = GRPOLossConfig(
        beta=0.04, sync_ref_model=True, ref_model_mixup_alpha=0.5, ref_model_sync_steps=sync_steps
    )
    module = make_module(
        config,
        steps_per_generation=2,
        rollout=RolloutConfig(num_generations=G, max_new_tokens=MAX_NEW_TOKENS),
    )
    rec = Recorder(module, monkeypatch)
    states = _snapshot_recorder(module, rec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(module, phantom_source, tmp_path, steps=2, batch_size=PROMPTS)
    assert module._reference is not None
    after = [
        states[1],
        {k: v.detach().clone() for k, v in module.model.state_dict().items()},
    ]  # θ after steps 1, 2

    policy, expected = make_module(GRPOLossConfig()).model, make_module(GRPOLossConfig()).model
    expected.load_state_dict(states[0])  # the reference starts as the initial policy
    for step, state in enumerate(after, start=1):
        if step % sync_steps == 0:
            policy.load_state_dict(state)
            SyncRefModelCallback._sync_target_model(policy, expected, 0.5)
    got = dict(module._reference.model.named_parameters())
    for name, p in expected.named_parameters():
        assert torch.allclose(got[name], p, rtol=0, atol=1e-7), name
    moved = any(not torch.equal(got[n], states[0][n]) for n in got)
    assert moved == (sync_steps == 1)
