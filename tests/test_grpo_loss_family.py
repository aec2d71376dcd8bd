"""The rest of TRL 1.16's loss family against TRL's own code (issue 22): ``cispo``, ``sapo``, ``luspo``, ``vespo``
with their parameters, the off-policy sequence mask, the entropy bonus (static and adaptive), GDPO advantages
(``multi_objective_aggregation="normalize_then_sum"``) and the TRL-named aliases of the config.

As in ``tests/test_grpo_loss.py`` (whose helpers this file reuses), TRL's private ``_compute_loss`` runs on an
instance carrying only the attributes it reads, with ``_get_per_token_logps_and_entropies`` returning our tensors.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from test_grpo_loss import GROUP, PARITY_TOL, _as_column, random_batch, real_trainer, trl_compute_loss
from trl import GRPOConfig, GRPOTrainer

from mg3d.errors import ConfigError
from mg3d.grpo.entropy_control import AdaptiveEntropyCoef
from mg3d.grpo.loss import LOSS_TYPES, GRPOLossConfig, decoupled_advantages, group_advantages, grpo_loss
from mg3d.grpo.terms import off_policy_sequence_mask, vespo_gamma_weights

__all__ = ["real_trainer"]  # the fixture, imported so that this module can use it


def _inputs(ids, mask, advantages, num_items, old=None, ref=None):
    inputs = {
        "prompt_ids": torch.zeros(ids.size(0), 3, dtype=torch.long),
        "prompt_mask": torch.ones(ids.size(0), 3, dtype=torch.long),
        "completion_ids": ids,
        "completion_mask": mask,
        "advantages": advantages,
        "num_items_in_batch": num_items,
    }
    if old is not None:
        inputs["old_per_token_logps"] = old
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return inputs


def _compare(config, seed, *, off_policy=True, geometry=(2, 1, 2), entropy_grad=False, scale_old=1.0):
    """Loss, gradients (log-probs and, with ``entropy_grad``, entropies) and metrics: mg3d vs TRL."""
    grad_accum, processes, steps = geometry
    ids, mask, _, base, old, ref, entropies, advantages = random_batch(seed)
    old = base + scale_old * (old - base)
    num_items = mask.sum() * (1 if steps * processes == 1 else 3)
    inputs = _inputs(
        ids, mask, advantages, num_items, old if off_policy else None, ref if config.beta else None
    )
    theirs, their_h = base.clone().requires_grad_(True), entropies.clone().requires_grad_(entropy_grad)
    trl_loss, trl_metrics = trl_compute_loss(
        theirs, their_h, inputs, config, grad_accum_steps=grad_accum, num_processes=processes,
        steps_per_generation=steps, max_completion_length=12,
    )  # fmt: skip
    trl_loss.backward()
    ours, our_h = base.clone().requires_grad_(True), entropies.clone().requires_grad_(entropy_grad)
    loss, metrics = grpo_loss(
        ours, advantages, mask, config, old_logps=old if off_policy else None,
        ref_logps=ref if config.beta else None, entropies=our_h, num_items_in_batch=num_items,
        max_completion_length=12, grad_accum_steps=grad_accum, steps_per_generation=steps,
        num_processes=processes,
    )  # fmt: skip
    loss.backward()
    assert abs(loss.item() - trl_loss.item()) <= PARITY_TOL
    assert torch.allclose(ours.grad, theirs.grad, rtol=0, atol=PARITY_TOL)
    assert ours.grad.abs().sum() > 0
    if entropy_grad:
        assert torch.allclose(our_h.grad, their_h.grad, rtol=0, atol=PARITY_TOL)
    if (
        config.entropy_bonus_enabled
    ):  # logged per optimiser step by the module (tests/test_grpo_module_parity.py)
        assert trl_metrics.pop("entropy_coef") == config.entropy_coef
    assert set(metrics) == set(trl_metrics)
    for key, value in trl_metrics.items():
        assert metrics[key] == pytest.approx(value, abs=PARITY_TOL, nan_ok=True), key
    return metrics


PARAMETERS = {
    "cispo": [{"epsilon_high": 5.0}, {"epsilon_high": 1.1}],
    "sapo": [
        {"sapo_temperature_pos": 0.5, "sapo_temperature_neg": 2.0},
        {"importance_sampling_level": "sequence"},
    ],
    "luspo": [{"importance_sampling_level": "sequence"}, {"epsilon_high": 0.28, "delta": 1.5}],
    "vespo": [
        {"vespo_k_pos": 1.5, "vespo_lambda_pos": 2.5, "vespo_k_neg": 4.0, "vespo_lambda_neg": 1.0},
        {"top_entropy_quantile": 0.3},
    ],
}


@pytest.mark.parametrize("geometry", [(1, 1, 1), (2, 1, 2), (4, 2, 2)], ids=["single", "ga2", "ga4_dp2_s2"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize(
    ("loss_type", "params"), [(lt, p) for lt, ps in PARAMETERS.items() for p in ps], ids=lambda v: str(v)
)
def test_new_loss_types_with_their_parameters_equal_trl(loss_type, params, beta, geometry):
    config = GRPOLossConfig(loss_type=loss_type, beta=beta, **params)
    metrics = _compare(
        config, zlib.crc32(repr((loss_type, params, beta, geometry)).encode()), geometry=geometry
    )
    if loss_type == "cispo" and params["epsilon_high"] < 2:
        assert metrics["cispo_clip_ratio"] > 0  # the cap does bite
    if loss_type == "vespo":
        assert metrics["vespo/phi_seq_mean"] != pytest.approx(1.0)  # off-policy sequences are re-weighted


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_off_policy_mask_equals_trl(loss_type):
    config = GRPOLossConfig(loss_type=loss_type, off_policy_mask_threshold=0.02, beta=0.04)
    _compare(config, 11, scale_old=3.0)
    # and it does drop a negative-advantage sequence here (else the test would compare two unmasked losses)
    _, mask, _, base, old, _, _, advantages = random_batch(11)
    old = base + 3.0 * (old - base)
    keep = off_policy_sequence_mask(advantages.unsqueeze(1), base, old, mask.float(), 0.02)
    assert keep.min() == 0 and keep.max() == 1
    assert torch.equal(
        keep,
        GRPOTrainer.get_off_policy_mask(advantages.unsqueeze(1), base, old, mask.float(), 0.02).float(),
    )


@pytest.mark.parametrize("quantile", [1.0, 0.3])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_static_entropy_bonus_equals_trl(loss_type, quantile):
    """L − c · token-mean H / GA: the gradient reaches the entropies, ``policy_loss`` is logged."""
    config = GRPOLossConfig(loss_type=loss_type, entropy_coef=0.05, top_entropy_quantile=quantile)
    metrics = _compare(config, zlib.crc32(repr((loss_type, quantile)).encode()), entropy_grad=True)
    assert "policy_loss" in metrics


def test_vespo_weights_equal_trl_for_large_ratios():
    gen = torch.Generator().manual_seed(5)
    log_ratio = 8 * torch.randn(6, 7, generator=gen)
    mask = (torch.rand(6, 7, generator=gen) > 0.2).float()
    adv = torch.randn(6, 1, generator=gen)
    ours = vespo_gamma_weights(adv, log_ratio, mask, k_pos=1.0, lambda_pos=0.5)
    theirs = GRPOTrainer.get_gamma_weights(adv, log_ratio, mask, None, k_pos=1.0, lambda_pos=0.5)
    assert torch.equal(ours, theirs)
    assert torch.isfinite(ours).all() and float(vespo_gamma_weights(adv, 0 * log_ratio, mask).min()) == 1.0


# --------------------------------------------------------------------------------------------------
# Adaptive entropy control over several optimiser steps
# --------------------------------------------------------------------------------------------------


def _adaptive_trl_stub(config: GRPOLossConfig, grad_accum: int) -> GRPOTrainer:
    """A persistent TRL instance (its controller state lives across calls), as ``trl_compute_loss`` builds one."""
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    for name in ("loss_type", "beta", "epsilon_low", "epsilon_high", "importance_sampling_level"):
        setattr(trainer, name, getattr(config, name))
    trainer.top_entropy_quantile = config.top_entropy_quantile
    trainer.off_policy_mask_threshold = None
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = trainer.aux_loss_enabled = False
    trainer.entropy_coef = config.entropy_coef
    trainer.use_adaptive_entropy = True
    trainer._entropy_bonus_enabled = True
    trainer._last_world_entropy = float("inf")
    trainer._entropy_window_stats = None
    trainer.current_gradient_accumulation_steps = grad_accum
    trainer.max_completion_length = 12
    trainer.model = SimpleNamespace(training=True)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def identity(x, **_):
        return x

    trainer.accelerator = SimpleNamespace(
        num_processes=1, gather=identity, reduce=identity, gather_for_metrics=identity,
        pad_across_processes=identity, sync_gradients=False,
    )  # fmt: skip
    trainer.args = SimpleNamespace(
        delta=None, use_bias_correction_kl=True, steps_per_generation=grad_accum,
        entropy_target=config.entropy_target, entropy_coef_delta=config.entropy_coef_delta,
        entropy_coef_min=config.entropy_coef_min, entropy_coef_max=config.entropy_coef_max,
    )  # fmt: skip
    return trainer


@pytest.mark.parametrize("target", [0.5, 1.4, 5.0])  # the entropy (2.4 → 0.6) crosses 1.4, stays on one side
def test_adaptive_entropy_coefficient_follows_trl_over_steps(target):
    config = GRPOLossConfig(
        loss_type="grpo", entropy_coef=0.05, use_adaptive_entropy=True, entropy_target=target,
        entropy_coef_delta=0.02, top_entropy_quantile=0.5,
    )  # fmt: skip
    grad_accum, steps = 2, 4
    trl = _adaptive_trl_stub(config, grad_accum)
    control = AdaptiveEntropyCoef(0.05, target, 0.02, config.entropy_coef_min, config.entropy_coef_max)
    coefs: list[float] = []
    for step in range(steps):
        for micro in range(grad_accum):
            ids, mask, _, base, _, _, entropies, advantages = random_batch(100 * step + micro)
            entropies = entropies * (1.6 - 0.4 * step)  # token mean ≈ 2.4, 1.8, 1.2, 0.6
            inputs = _inputs(ids, mask, advantages, mask.sum())
            theirs, their_h = base.clone().requires_grad_(True), entropies.clone().requires_grad_(True)
            trl._get_per_token_logps_and_entropies = lambda *a, t=theirs, h=their_h, **k: (t, h, None)
            trl.accelerator.sync_gradients = micro == grad_accum - 1
            trl_loss = GRPOTrainer._compute_loss(trl, None, inputs)
            trl_loss.backward()
            ours, our_h = base.clone().requires_grad_(True), entropies.clone().requires_grad_(True)
            loss, _ = grpo_loss(
                ours, advantages, mask, config, entropies=our_h, grad_accum_steps=grad_accum,
                entropy_control=control,
            )  # fmt: skip
            loss.backward()
            assert abs(loss.item() - trl_loss.item()) <= PARITY_TOL
            assert torch.allclose(our_h.grad, their_h.grad, rtol=0, atol=PARITY_TOL)
        control.end_step()
        coefs.append(control.coef)
        assert control.coef == pytest.approx(trl.entropy_coef, abs=1e-12)
        assert control.last_world_entropy == pytest.approx(trl._last_world_entropy, rel=1e-6)
    assert coefs == pytest.approx(trl._metrics["train"]["entropy_coef"], abs=1e-12)
    assert len(set(coefs)) > 1  # the coefficient did move

    resumed = AdaptiveEntropyCoef(0.0, target, 0.02, 0.0, 1.0)
    resumed.load_state_dict(control.state_dict())
    assert resumed.applied() == control.applied() and resumed.coef == control.coef


def test_adaptive_entropy_needs_its_controller():
    config = GRPOLossConfig(use_adaptive_entropy=True)
    with pytest.raises(ConfigError, match="entropy_control"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3), config, entropies=torch.ones(2, 3))
    with pytest.raises(ConfigError, match="entropies"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3), GRPOLossConfig(entropy_coef=0.1))


# --------------------------------------------------------------------------------------------------
# GDPO advantages against the real TRL trainer
# --------------------------------------------------------------------------------------------------

GDPO_CASES = {
    "mixed_with_unscorable": (
        [1.0, 0.0, 1.0, 0.0, None, 0.5, 0.5, None],
        [0.2, 0.3, None, 0.1, None, 0.5, 0.5, 1.0],
    ),
    "different_scales": (
        [10.0, 0.0, 30.0, 20.0, 0.3, 0.3, 0.3, 0.3],
        [0.0, 1.0, 0.0, 1.0, 0.1, 0.2, 0.3, 0.4],
    ),
}


@pytest.mark.parametrize("weights", [(1.0, 1.0), (2.0, 0.5)])
@pytest.mark.parametrize("case", list(GDPO_CASES))
def test_normalize_then_sum_equals_real_trl_trainer(real_trainer, case, weights):
    first, second = GDPO_CASES[case]
    real_trainer.trainer.multi_objective_aggregation = "normalize_then_sum"
    try:
        out, trl_frac_zero = real_trainer.score(first, second, weights)
    finally:
        real_trainer.trainer.multi_objective_aggregation = "sum_then_normalize"
    rewards = torch.stack([_as_column(first), _as_column(second)], dim=1)
    ours = group_advantages(
        rewards, GROUP, reward_weights=weights, multi_objective_aggregation="normalize_then_sum"
    )
    assert torch.allclose(ours.advantages, out["advantages"], rtol=0, atol=PARITY_TOL)
    assert ours.frac_reward_zero_std == pytest.approx(trl_frac_zero, abs=1e-12)
    assert torch.equal(
        ours.advantages, decoupled_advantages(rewards, GROUP, reward_weights=weights).advantages
    )


def test_normalize_then_sum_balances_reward_scales():
    """GDPO's point: a reward on a 100× larger scale does not drown the other one (sum-then-normalise does)."""
    big = torch.tensor([100.0, 0.0, 100.0, 0.0])
    small = torch.tensor([0.0, 0.0, 1.0, 1.0])
    rewards = torch.stack([big, small], dim=1)
    summed = group_advantages(rewards, 4).advantages.tolist()
    decoupled = decoupled_advantages(rewards, 4).advantages.tolist()
    assert summed[2] - summed[0] < 0.02 * (summed[0] - summed[1])  # the small reward barely counts
    assert decoupled[2] - decoupled[0] == pytest.approx(decoupled[0] - decoupled[1], rel=1e-3)


# --------------------------------------------------------------------------------------------------
# TRL's names
# --------------------------------------------------------------------------------------------------


def test_trl_named_aliases_mean_the_same():
    assert GRPOLossConfig(epsilon=0.3) == GRPOLossConfig(epsilon_low=0.3)
    assert GRPOLossConfig(use_bias_correction_kl=False) == GRPOLossConfig(kl_bias_correction=False)
    assert GRPOLossConfig(epsilon=0.3).epsilon_high == 0.3
    assert dataclasses.replace(GRPOLossConfig(epsilon=0.3), epsilon_low=0.1).epsilon_low == 0.1
    with pytest.raises(ConfigError, match="epsilon"):
        GRPOLossConfig(epsilon_low=0.1, epsilon=0.3)
    with pytest.raises(ConfigError, match="use_bias_correction_kl"):
        GRPOLossConfig(kl_bias_correction=False, use_bias_correction_kl=True)


def test_new_options_default_to_trl_grpo_config():
    defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    ours = GRPOLossConfig()
    names = [
        "multi_objective_aggregation", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos",
        "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "off_policy_mask_threshold", "entropy_coef",
        "use_adaptive_entropy", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target",
        "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps",
    ]  # fmt: skip
    for name in names:
        assert getattr(ours, name) == defaults[name], name
    assert set(GRPOLossConfig.__dataclass_fields__) - {"kl_bias_correction", "epsilon_low"} <= set(defaults)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sync_ref_model": True}, "sync_ref_model"),
        ({"beta": 0.1, "sync_ref_model": True, "ref_model_mixup_alpha": 1.5}, "ref_model_mixup_alpha"),
        ({"beta": 0.1, "ref_model_sync_steps": 0}, "ref_model_sync_steps"),
        ({"multi_objective_aggregation": "sum"}, "multi_objective_aggregation"),
        ({"sapo_temperature_neg": 0.0}, "sapo_temperature_neg"),
        ({"entropy_coef_min": 0.5, "entropy_coef_max": 0.1}, "entropy_coef_min"),
        ({"off_policy_mask_threshold": math.inf}, "off_policy_mask_threshold"),
    ],
)
def test_bad_new_options_raise_named_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GRPOLossConfig(**kwargs)
