"""Tests of mg3d.grpo.loss: parity with TRL 1.16.0, hand-computed values, gradient scale, properties.

TRL is the reference (grpo_anchors.md §5): its private ``GRPOTrainer._compute_loss`` is called on an
instance built with ``GRPOTrainer.__new__`` that carries only the attributes the method reads, with
``_get_per_token_logps_and_entropies`` returning our tensors. Advantages, completion masks and
log-probs come from a real (tiny, offline) ``GRPOTrainer`` with a patched ``generate``.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import entropy_from_logits, selective_log_softmax
from trl.trainer.utils import nanstd as trl_nanstd

from mg3d.errors import ConfigError, DataError
from mg3d.grpo.loss import (
    ADVANTAGE_EPS,
    CLIPPED_LOSS_TYPES,
    LOSS_TYPES,
    GRPOLossConfig,
    aggregate_loss,
    clipped_surrogate,
    completion_mask,
    group_advantages,
    grpo_loss,
    k3_kl,
    nanstd,
    needs_old_logps,
    resolve_scale_rewards,
    token_logps_and_entropies,
    top_entropy_mask,
)

PARITY_TOL = 1e-6
EOS, PAD = 1, 0


# --------------------------------------------------------------------------------------------------
# TRL's _compute_loss on our tensors (grpo_anchors.md §5.1)
# --------------------------------------------------------------------------------------------------


def _identity(x, **_kwargs):
    return x


def trl_compute_loss(
    logps: torch.Tensor,
    entropies: torch.Tensor,
    inputs: dict,
    config: GRPOLossConfig,
    *,
    grad_accum_steps: int,
    num_processes: int,
    steps_per_generation: int,
    max_completion_length: int,
    training: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL 1.16.0's own loss code on an instance holding only the attributes ``_compute_loss`` reads."""
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, entropies, None)
    trainer.loss_type = config.loss_type
    trainer.beta = config.beta
    trainer.epsilon_low = config.epsilon_low
    trainer.epsilon_high = config.epsilon_high
    trainer.importance_sampling_level = config.importance_sampling_level
    trainer.top_entropy_quantile = config.top_entropy_quantile
    trainer.off_policy_mask_threshold = config.off_policy_mask_threshold
    trainer.use_vllm = False
    trainer.vllm_importance_sampling_correction = False
    trainer.aux_loss_enabled = False
    trainer._entropy_bonus_enabled = config.entropy_bonus_enabled
    trainer.entropy_coef = config.entropy_coef
    trainer.use_adaptive_entropy = False  # adaptive control: tests/test_grpo_loss_family.py
    trainer.current_gradient_accumulation_steps = grad_accum_steps
    trainer.max_completion_length = max_completion_length
    trainer.model = SimpleNamespace(training=training)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer.accelerator = SimpleNamespace(
        num_processes=num_processes,
        gather=_identity,
        reduce=_identity,
        gather_for_metrics=_identity,
        pad_across_processes=_identity,
        sync_gradients=True,
    )
    trainer.args = SimpleNamespace(
        delta=config.delta,
        use_bias_correction_kl=config.kl_bias_correction,
        steps_per_generation=steps_per_generation,
        **{
            name: getattr(config, name)
            for name in (
                "sapo_temperature_pos", "sapo_temperature_neg",
                "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg",
            )
        },
    )  # fmt: skip
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    mode = "train" if training else "eval"
    return loss, {key: values[-1] for key, values in trainer._metrics[mode].items()}


def random_batch(
    seed: int, rows: int = 6, length: int = 9, truncate: bool = False, token_advantages: bool = False
):
    """Random completions (some truncated), log-probs near each other, entropies and advantages."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 12, (rows, length), generator=gen)
    for row in range(rows):
        if row % 3 != 2:  # every third row has no EOS: truncated
            ids[row, torch.randint(0, length, (1,), generator=gen).item()] = EOS
    mask, is_truncated = completion_mask(ids, EOS, mask_truncated=truncate)
    base = (-2.0 * torch.rand(rows, length, generator=gen)) * mask
    old = (base + 0.3 * torch.randn(rows, length, generator=gen)) * mask
    ref = (base + 0.3 * torch.randn(rows, length, generator=gen)) * mask
    entropies = 3.0 * torch.rand(rows, length, generator=gen) * mask
    shape = (rows, length) if token_advantages else (rows,)
    advantages = torch.randn(shape, generator=gen)
    return ids, mask, is_truncated, base, old, ref, entropies, advantages


VARIANTS = {
    "plain": {},
    "clip_higher_delta": {"epsilon_low": 0.2, "epsilon_high": 0.28, "delta": 1.3},
    "sequence_level": {"importance_sampling_level": "sequence"},
    "top_entropy": {"top_entropy_quantile": 0.2},
    "mask_truncated": {"mask_truncated_completions": True},
    "kl_without_bias_correction": {"kl_bias_correction": False},
}
GEOMETRIES = {"single": (1, 1, 1), "ga4": (4, 1, 4), "ga4_dp2_s2": (4, 2, 2)}  # (GA, P, S)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("off_policy", [False, True], ids=["mu1", "mu2_old_logps"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_gradients_and_metrics_equal_trl(loss_type, beta, off_policy, geometry, variant):
    config = GRPOLossConfig(loss_type=loss_type, beta=beta, **VARIANTS[variant])
    grad_accum, processes, steps = GEOMETRIES[geometry]
    seed = zlib.crc32(repr((loss_type, beta, off_policy, geometry, variant)).encode())
    ids, mask, _, base, old, ref, entropies, advantages = random_batch(
        seed, truncate=config.mask_truncated_completions
    )
    # N spans the generation batch on all ranks: here the other micro-batches/ranks add 3x this one's tokens.
    num_items = mask.sum() * (1 if steps * processes == 1 else 4)
    inputs = {
        "prompt_ids": torch.zeros(ids.size(0), 3, dtype=torch.long),
        "prompt_mask": torch.ones(ids.size(0), 3, dtype=torch.long),
        "completion_ids": ids,
        "completion_mask": mask,
        "advantages": advantages,
        "num_items_in_batch": num_items,
    }
    if off_policy:
        inputs["old_per_token_logps"] = old
    if beta:
        inputs["ref_per_token_logps"] = ref

    theirs = base.clone().requires_grad_(True)
    trl_loss, trl_metrics = trl_compute_loss(
        theirs,
        entropies,
        inputs,
        config,
        grad_accum_steps=grad_accum,
        num_processes=processes,
        steps_per_generation=steps,
        max_completion_length=12,
    )
    trl_loss.backward()

    ours = base.clone().requires_grad_(True)
    loss, metrics = grpo_loss(
        ours,
        advantages,
        mask,
        config,
        old_logps=old if off_policy else None,
        ref_logps=ref if beta else None,
        entropies=entropies,
        num_items_in_batch=num_items,
        max_completion_length=12,
        grad_accum_steps=grad_accum,
        steps_per_generation=steps,
        num_processes=processes,
    )
    loss.backward()

    assert abs(loss.item() - trl_loss.item()) <= PARITY_TOL
    assert torch.allclose(ours.grad, theirs.grad, rtol=0, atol=PARITY_TOL)
    assert ours.grad.abs().sum() > 0
    assert set(metrics) == set(trl_metrics)
    for key, value in trl_metrics.items():
        assert metrics[key] == pytest.approx(value, abs=PARITY_TOL, nan_ok=True), key
    if off_policy and variant != "sequence_level" and loss_type in CLIPPED_LOSS_TYPES:
        assert metrics["clip_ratio/region_mean"] > 0  # the μ > 1 cases do exercise clipping


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_eval_mode_and_token_level_advantages_equal_trl(loss_type):
    """No accumulation divisor in eval; (B, T) advantages (TRL accepts them for subclasses)."""
    config = GRPOLossConfig(loss_type=loss_type, beta=0.04, epsilon_high=0.28)
    ids, mask, _, base, old, ref, entropies, advantages = random_batch(7, token_advantages=True)
    inputs = {
        "prompt_ids": torch.zeros(ids.size(0), 2, dtype=torch.long),
        "prompt_mask": torch.ones(ids.size(0), 2, dtype=torch.long),
        "completion_ids": ids,
        "completion_mask": mask,
        "advantages": advantages,
        "num_items_in_batch": mask.sum() * 2,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
    }
    trl_loss, trl_metrics = trl_compute_loss(
        base,
        entropies,
        inputs,
        config,
        grad_accum_steps=4,
        num_processes=2,
        steps_per_generation=4,
        max_completion_length=10,
        training=False,
    )
    loss, metrics = grpo_loss(
        base,
        advantages,
        mask,
        config,
        old_logps=old,
        ref_logps=ref,
        entropies=entropies,
        num_items_in_batch=mask.sum() * 2,
        max_completion_length=10,
        grad_accum_steps=4,
        num_processes=2,
        training=False,
    )
    assert abs(loss.item() - trl_loss.item()) <= PARITY_TOL
    for key, value in trl_metrics.items():
        assert metrics[key] == pytest.approx(value, abs=PARITY_TOL, nan_ok=True), key


def test_top_entropy_mask_equals_trl():
    gen = torch.Generator().manual_seed(3)
    entropies = torch.rand(5, 8, generator=gen)
    mask = (torch.rand(5, 8, generator=gen) > 0.3).long()
    holder = GRPOTrainer.__new__(GRPOTrainer)
    holder.accelerator = SimpleNamespace(pad_across_processes=_identity, gather=_identity)
    for rho in (0.0, 0.2, 0.5, 0.999, 1.0):
        expected = GRPOTrainer.get_high_entropy_mask(holder, entropies, mask, 1 - rho)
        assert torch.equal(top_entropy_mask(entropies, mask, rho), expected)


def test_config_defaults_equal_trl_grpo_config():
    defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    ours = GRPOLossConfig()
    assert ours.loss_type == defaults["loss_type"]
    assert ours.beta == defaults["beta"]
    assert ours.epsilon_low == defaults["epsilon"]
    assert defaults["epsilon_high"] is None and ours.epsilon_high == defaults["epsilon"]
    assert ours.delta == defaults["delta"]
    assert ours.temperature == defaults["temperature"]
    assert ours.scale_rewards == defaults["scale_rewards"]
    assert ours.mask_truncated_completions == defaults["mask_truncated_completions"]
    assert ours.top_entropy_quantile == defaults["top_entropy_quantile"]
    assert ours.num_iterations == defaults["num_iterations"]
    assert ours.importance_sampling_level == defaults["importance_sampling_level"]
    assert ours.kl_bias_correction == defaults["use_bias_correction_kl"]


# --------------------------------------------------------------------------------------------------
# A real GRPOTrainer (tiny random Qwen2, word-level tokenizer, fixed completions): advantages, masks,
# log-probs
# --------------------------------------------------------------------------------------------------

GROUP = 4
COMPLETIONS = torch.tensor(
    [
        [3, 4, 1, 0, 0],  # EOS at 2
        [3, 1, 0, 0, 0],
        [3, 4, 5, 6, 7],  # no EOS: truncated
        [1, 0, 0, 0, 0],  # EOS only: length 1
        [5, 5, 5, 5, 1],  # EOS as the last token
        [5, 6, 7, 8, 9],  # truncated
        [4, 1, 3, 3, 3],  # tokens after the EOS are cut
        [4, 4, 4, 4, 0],  # no EOS but ends on the pad id: TRL does not count it as truncated
    ]
)
TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def real_trainer(tmp_path_factory):
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2, **{f"w{i}": 3 + i for i in range(13)}}
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=16,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
    )
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    rows = COMPLETIONS.size(0)
    dataset = Dataset.from_dict({"prompt": [f"w{i} w{i + 1} w{i}" for i in range(rows)]})
    rewards: dict[str, list] = {}

    def first_reward(completions, **kwargs):
        return rewards["first"]

    def second_reward(completions, **kwargs):
        return rewards["second"]

    args = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        max_steps=1,
        shuffle_dataset=False,
        per_device_train_batch_size=rows,
        num_generations=GROUP,
        max_completion_length=COMPLETIONS.size(1),
        temperature=TEMPERATURE,
        save_strategy="no",
        logging_strategy="no",
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[first_reward, second_reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.model.generate = lambda input_ids=None, **kwargs: torch.cat([input_ids, COMPLETIONS], dim=1)
    trainer.model.train()
    inputs = [{"prompt": prompt} for prompt in dataset["prompt"]]

    def score(first, second, weights=(1.0, 1.0), scale_rewards="group", mask_truncated=False):
        rewards["first"], rewards["second"] = first, second
        trainer.reward_weights = torch.tensor(weights, dtype=torch.float32)
        trainer.scale_rewards = scale_rewards
        trainer.mask_truncated_completions = mask_truncated
        out = trainer._generate_and_score_completions(inputs)
        return out, trainer._metrics["train"]["frac_reward_zero_std"][-1]

    return SimpleNamespace(trainer=trainer, score=score)


def _as_column(values: list[float | None]) -> torch.Tensor:
    return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)


REWARD_CASES = {
    "mixed_with_unscorable": (
        [1.0, 0.0, 1.0, 0.0, None, 0.5, 0.5, None],
        [0.2, 0.3, None, 0.1, None, 0.5, 0.5, 1.0],
    ),
    "one_zero_std_group": ([1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3, 0.3], [0.0] * 8),
    "distinct": ([0.1, 0.9, 0.4, 0.7, 2.0, -1.0, 0.5, 0.25], [1.0, 0.0, 0.5, 0.5, 0.0, 0.0, 1.0, 1.0]),
}


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none", True, False])
@pytest.mark.parametrize("case", list(REWARD_CASES))
@pytest.mark.parametrize("weights", [(1.0, 1.0), (2.0, 0.5)])
def test_advantages_equal_real_trl_trainer(real_trainer, scale_rewards, case, weights):
    first, second = REWARD_CASES[case]
    trl_mode = resolve_scale_rewards(scale_rewards)  # TRL's GRPOConfig maps True/False the same way
    out, trl_frac_zero = real_trainer.score(first, second, weights, trl_mode)
    ours = group_advantages(
        torch.stack([_as_column(first), _as_column(second)], dim=1),
        GROUP,
        reward_weights=weights,
        scale_rewards=scale_rewards,
    )
    assert torch.allclose(ours.advantages, out["advantages"], rtol=0, atol=PARITY_TOL)
    assert ours.frac_reward_zero_std == pytest.approx(trl_frac_zero, abs=1e-12)


@given(
    data=st.lists(
        st.one_of(st.none(), st.floats(-3, 3, allow_nan=False, width=32)), min_size=16, max_size=16
    ),
    mode=st.sampled_from(["group", "batch", "none"]),
    weights=st.tuples(st.floats(0.125, 3.0, width=32), st.floats(0.125, 3.0, width=32)),
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_advantages_equal_real_trl_trainer_random(real_trainer, data, mode, weights):
    first, second = data[:8], data[8:]
    out, trl_frac_zero = real_trainer.score(first, second, weights, mode)
    ours = group_advantages(
        torch.stack([_as_column(first), _as_column(second)], dim=1),
        GROUP,
        reward_weights=weights,
        scale_rewards=mode,
    )
    assert torch.allclose(ours.advantages, out["advantages"], rtol=1e-5, atol=PARITY_TOL)
    assert ours.frac_reward_zero_std == pytest.approx(trl_frac_zero, abs=1e-12)


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_completion_mask_equals_real_trl_trainer(real_trainer, mask_truncated):
    out, _ = real_trainer.score([1.0] * 8, [0.0] * 8, mask_truncated=mask_truncated)
    mask, is_truncated = completion_mask(COMPLETIONS, EOS, pad_token_id=PAD, mask_truncated=mask_truncated)
    assert torch.equal(mask, out["completion_mask"].long())
    assert torch.equal(mask.sum(), out["num_items_in_batch"])
    assert is_truncated.tolist() == [False, False, True, False, False, True, False, False]


def test_token_logps_equal_trl_fused_head_at_temperature(real_trainer):
    """TRL scores completions through its fused LM head at the sampling temperature; we from plain logits."""
    trainer = real_trainer.trainer
    prompt = torch.tensor([[PAD, 3, 4], [5, 6, 7]]).repeat(4, 1)  # left-padded prompts
    prompt_mask = (prompt != PAD).long()
    mask, _ = completion_mask(COMPLETIONS, EOS)
    input_ids = torch.cat([prompt, COMPLETIONS], dim=1)
    attention = torch.cat([prompt_mask, mask], dim=1)
    with torch.no_grad():
        trl_logps, trl_entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention, COMPLETIONS.size(1), compute_entropy=True
        )
        logits = trainer.model(input_ids=input_ids, attention_mask=attention).logits
    completion_logits = logits[:, prompt.size(1) - 1 : -1]  # position t predicts token t + 1
    logps, entropies = token_logps_and_entropies(
        completion_logits, COMPLETIONS, temperature=TEMPERATURE, mask=mask
    )
    assert torch.allclose(logps, trl_logps, rtol=0, atol=1e-5)
    assert torch.allclose(entropies, trl_entropies, rtol=0, atol=1e-5)
    assert torch.all(logps[mask == 0] == 0) and torch.all(entropies[mask == 0] == 0)
    untempered, _ = token_logps_and_entropies(completion_logits, COMPLETIONS, mask=mask)
    assert not torch.allclose(untempered, trl_logps, atol=1e-3)  # the temperature does matter


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_token_logps_equal_trl_selective_log_softmax(dtype, temperature):
    gen = torch.Generator().manual_seed(11)
    logits = (4 * torch.randn(3, 6, 50, generator=gen)).to(dtype)
    ids = torch.randint(0, 50, (3, 6), generator=gen)
    logps, entropies = token_logps_and_entropies(logits, ids, temperature=temperature)
    assert logps.dtype == dtype
    assert torch.allclose(logps, selective_log_softmax(logits, ids, temperature=temperature), atol=1e-6)
    assert torch.allclose(entropies, entropy_from_logits(logits / temperature), atol=1e-6)


def test_token_logps_bf16_logits_are_upcast():
    gen = torch.Generator().manual_seed(5)
    logits = 3 * torch.randn(2, 4, 30, generator=gen)
    ids = torch.randint(0, 30, (2, 4), generator=gen)
    logps, _ = token_logps_and_entropies(logits.bfloat16(), ids)
    reference = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert logps.dtype == torch.float32
    assert torch.allclose(logps, reference, atol=1e-6)


@given(st.lists(st.one_of(st.none(), st.floats(-1e3, 1e3, width=32)), min_size=1, max_size=12))
@settings(max_examples=60, deadline=None)
def test_nanstd_equals_trl(values):
    x = _as_column(values)
    assert torch.allclose(nanstd(x), trl_nanstd(x), equal_nan=True, rtol=1e-6, atol=1e-6)
    grid = torch.cat([x, x.flip(0)]).view(2, -1)
    assert torch.allclose(nanstd(grid, dim=1), trl_nanstd(grid, dim=1), equal_nan=True, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Hand-computed values
# --------------------------------------------------------------------------------------------------


def test_two_completions_get_plus_minus_one_over_sqrt2():
    # rewards 1, 0: mean 1/2, sample std sqrt(2 · 1/4 / 1) = 1/√2, so A = ±(1/2) / (1/√2 + 1e-4).
    out = group_advantages(torch.tensor([1.0, 0.0]), 2)
    expected = 0.5 / (1 / math.sqrt(2) + ADVANTAGE_EPS)
    assert out.advantages.tolist() == pytest.approx([expected, -expected], abs=1e-7)
    assert expected == pytest.approx(1 / math.sqrt(2), abs=1e-4)


def test_anchor_example_four_completions():
    # grpo_anchors.md §1.4: rewards [1,0,1,0] -> ±0.5/(0.57735 + 1e-4) = ±0.8659.
    out = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]), 4)
    assert out.advantages.tolist() == pytest.approx(
        [0.8659, -0.8659, 0.8659, -0.8659, 0.8659, 0.8659, -0.8659, -0.8659], abs=1e-4
    )


def test_batch_and_none_scaling_by_hand():
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0])
    # batch: the mean stays per group (1/2 and 3); std of [1, 0, 3, 3] is sqrt(6.75 / 3) = 1.5.
    batch = group_advantages(rewards, 2, scale_rewards="batch")
    assert batch.advantages.tolist() == pytest.approx([0.5 / 1.5001, -0.5 / 1.5001, 0.0, 0.0], abs=1e-6)
    assert batch.zero_std.tolist() == [False] * 4 and batch.frac_reward_zero_std == 0.0
    assert batch.group_zero_std.tolist() == [False, True]  # dynamic sampling still sees the dead group
    none = group_advantages(rewards, 2, scale_rewards=False)
    assert none.advantages.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])
    assert none.frac_reward_zero_std == 0.5
    assert none.group_std.tolist() == pytest.approx([1 / math.sqrt(2), 0.0])


def test_unscorable_rows_and_weights_by_hand():
    # Row 0 unscorable (all NaN); row 1: 2·1 + NaN -> 2; row 2: 2·0 + 1·0.5 = 0.5.
    rewards = torch.tensor([[math.nan, math.nan], [1.0, math.nan], [0.0, 0.5]])
    out = group_advantages(rewards, 3, reward_weights=[2.0, 1.0])
    std = math.sqrt(((2 - 1.25) ** 2 + (0.5 - 1.25) ** 2) / 1)
    assert math.isnan(out.rewards[0]) and out.rewards[1:].tolist() == [2.0, 0.5]
    assert out.group_mean.tolist() == [1.25]
    assert out.advantages.tolist() == pytest.approx(
        [0.0, 0.75 / (std + 1e-4), -0.75 / (std + 1e-4)], abs=1e-6
    )


def test_completion_mask_by_hand():
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [9, 5, 5, 2], [2, 0, 0, 0]])
    mask, truncated = completion_mask(ids, [1, 2])  # two EOS ids
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False, False]
    masked, _ = completion_mask(ids, [1, 2], mask_truncated=True)
    assert masked.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_token_logps_by_hand():
    # logits [0, ln 3]: at T = 1, p = [1/4, 3/4]; at T = 2, p ∝ [1, √3].
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]], dtype=torch.float64)
    ids = torch.tensor([[1, 0]])
    logps, entropies = token_logps_and_entropies(logits, ids)
    assert logps.tolist()[0] == pytest.approx([math.log(0.75), math.log(0.25)])
    assert entropies[0, 0].item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    logps_t2, _ = token_logps_and_entropies(logits, ids, temperature=2.0, mask=torch.tensor([[1, 0]]))
    assert logps_t2.tolist()[0] == pytest.approx([math.log(math.sqrt(3) / (1 + math.sqrt(3))), 0.0])


ON_POLICY_MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
ON_POLICY_ADV = torch.tensor([1.0, -1.0])


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "row0", "row1"),
    [
        ("grpo", {}, -1 / (2 * 2), 1 / (3 * 2)),  # −A_i / (|o_i| · B)
        ("bnpo", {}, -1 / 5, 1 / 5),  # −A_i / Σm
        ("dr_grpo", {"max_completion_length": 4}, -1 / (2 * 4), 1 / (2 * 4)),  # −A_i / (B · L_max)
        ("dapo", {}, -1 / 5, 1 / 5),  # −A_i / N
        ("dapo", {"num_items_in_batch": 10, "num_processes": 2}, -1 / 5, 1 / 5),  # −A_i / (N / P)
        ("dapo", {"num_items_in_batch": 10, "grad_accum_steps": 2}, -1 / 10, 1 / 10),  # −A_i / (N · GA / S)
        ("grpo", {"grad_accum_steps": 4}, -1 / 16, 1 / 24),
    ],
)
def test_on_policy_gradient_by_hand(loss_type, kwargs, row0, row1):
    logps = torch.full((2, 3), -0.7, requires_grad=True)
    loss, metrics = grpo_loss(
        logps, ON_POLICY_ADV, ON_POLICY_MASK, GRPOLossConfig(loss_type=loss_type), **kwargs
    )
    loss.backward()
    expected = torch.tensor([[row0, row0, 0.0], [row1, row1, row1]])
    assert torch.allclose(logps.grad, expected, atol=1e-7)
    assert metrics["clip_ratio/region_mean"] == 0.0  # ratio exactly 1: nothing clips on-policy
    if loss_type == "grpo":
        assert loss.item() == pytest.approx(0.0, abs=1e-7)  # −mean(A) = 0


def test_clipping_by_hand():
    # One token per row, bnpo = plain mean. Ratios 1.5, 0.5, 0.5, 5 against A = 1, 1, −1, −1 (ε = 0.2):
    #   −min(1.5, 1.2) = −1.2 (high-clipped, no grad) | −min(0.5, 0.8) = −0.5 (grad −0.5)
    #   −min(−0.5, −0.8) = 0.8 (low-clipped, no grad) | −min(−5, −1.2) = 5 (grad 5 = ∂w/∂ℓp)
    ratios = torch.tensor([[1.5], [0.5], [0.5], [5.0]])
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    logps = torch.zeros(4, 1, requires_grad=True)
    old = -torch.log(ratios)
    config = GRPOLossConfig(loss_type="bnpo")
    loss, metrics = grpo_loss(logps, advantages, torch.ones(4, 1), config, old_logps=old)
    loss.backward()
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 5.0) / 4)
    assert logps.grad.squeeze(1).tolist() == pytest.approx([0.0, -0.5 / 4, 0.0, 5.0 / 4])
    assert metrics["clip_ratio/low_mean"] == 0.25 and metrics["clip_ratio/high_mean"] == 0.25
    assert metrics["clip_ratio/region_mean"] == 0.5
    assert metrics["clip_ratio/low_min"] == 0.0 and metrics["clip_ratio/high_max"] == 1.0
    # δ = 2 caps the last ratio: −min(−2, −1.2) = 2, and the cap is flat, so no gradient.
    capped = torch.zeros(4, 1, requires_grad=True)
    loss_delta, _ = grpo_loss(
        capped, advantages, torch.ones(4, 1), GRPOLossConfig("bnpo", delta=2.0), old_logps=old
    )
    loss_delta.backward()
    assert loss_delta.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 2.0) / 4)
    assert capped.grad[3].item() == 0.0
    # clip-higher: ε_high = 0.6 lets ratio 1.5 through.
    per_token, _ = clipped_surrogate(ratios.squeeze(1), advantages, 0.2, 0.6)
    assert per_token[0].item() == pytest.approx(-1.5)


@pytest.mark.parametrize(("bias_correction", "expected_grad"), [(True, math.log(2.0)), (False, 0.5)])
def test_kl_by_hand(bias_correction, expected_grad):
    # ℓp = ln ½, ℓp_ref = ln ¼: d = ℓp_ref − ℓp = ln ½, KL = ½ − ln ½ − 1 = 0.1931.
    # ∂KL/∂ℓp = 1 − e^d = ½; with the bias correction KL·w (w = 1 on-policy, ∂w/∂ℓp = 1) adds KL: ln 2.
    logps = torch.tensor([[math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]], dtype=torch.float64)
    assert k3_kl(logps, ref).item() == pytest.approx(0.5 + math.log(2) - 1)
    config = GRPOLossConfig(loss_type="bnpo", beta=1.0, kl_bias_correction=bias_correction)
    loss, metrics = grpo_loss(
        logps, torch.zeros(1, dtype=torch.float64), torch.ones(1, 1), config, ref_logps=ref
    )
    loss.backward()
    assert metrics["kl"] == pytest.approx(0.5 + math.log(2) - 1)
    assert logps.grad.item() == pytest.approx(expected_grad)


def test_top_entropy_mask_by_hand():
    entropies = torch.tensor([[0.1, 0.5, 0.9, 0.3, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    # median of [0.1, 0.3, 0.5, 0.9] (linear interpolation) is 0.4: keep 0.5 and 0.9; padding never kept.
    assert top_entropy_mask(entropies, mask, 0.5).tolist() == [[False, True, True, False, False]]
    assert top_entropy_mask(entropies, mask, 0.0).tolist() == [[False, False, True, False, False]]
    assert top_entropy_mask(entropies, mask, 1.0).tolist() == [[True, True, True, True, False]]
    assert not top_entropy_mask(entropies, torch.zeros_like(mask), 0.5).any()


@pytest.mark.parametrize(
    ("mu", "steps", "accum", "needed"), [(1, 4, 4, False), (2, 4, 4, True), (1, 2, 4, False), (1, 4, 2, True)]
)
def test_needs_old_logps(mu, steps, accum, needed):
    assert needs_old_logps(mu, steps, accum) is needed


def test_bad_inputs_raise_named_errors():
    with pytest.raises(ConfigError, match="loss_type"):
        GRPOLossConfig(loss_type="ppo")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="delta"):
        GRPOLossConfig(delta=0.9)
    with pytest.raises(ConfigError, match="temperature"):
        GRPOLossConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="scale_rewards"):
        GRPOLossConfig(scale_rewards="sequence")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="multiple of num_generations"):
        group_advantages(torch.ones(5), 2)
    with pytest.raises(ConfigError, match="reward_weights"):
        group_advantages(torch.ones(4, 2), 2, reward_weights=[1.0])
    logps = torch.zeros(2, 3)
    with pytest.raises(ConfigError, match="ref_logps"):
        grpo_loss(logps, torch.zeros(2), torch.ones(2, 3), GRPOLossConfig(beta=0.1))
    with pytest.raises(ConfigError, match="entropies"):
        grpo_loss(logps, torch.zeros(2), torch.ones(2, 3), GRPOLossConfig(top_entropy_quantile=0.2))
    with pytest.raises(ConfigError, match="max_completion_length"):
        grpo_loss(logps, torch.zeros(2), torch.ones(2, 3), GRPOLossConfig(loss_type="dr_grpo"))
    with pytest.raises(ConfigError, match="num_items_in_batch"):
        grpo_loss(logps, torch.zeros(2), torch.ones(2, 3), GRPOLossConfig(), num_processes=2)
    with pytest.raises(DataError, match="advantages"):
        grpo_loss(logps, torch.zeros(3), torch.ones(2, 3), GRPOLossConfig())
    assert GRPOLossConfig(scale_rewards=True).scale_rewards == "group"
    assert GRPOLossConfig(epsilon_low=0.1).epsilon_high == 0.1


# --------------------------------------------------------------------------------------------------
# Gradient scale under gradient accumulation and data parallelism, with plain SGD (§5.2)
# --------------------------------------------------------------------------------------------------


def _sgd_delta(micro_batches_per_rank, loss_type, n_total, lr=0.5):
    """One SGD step: gradients summed over each rank's micro-batches, then averaged over ranks (DDP)."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(0.3 * torch.randn(6, 11))
    start = weight.detach().clone()
    ranks = len(micro_batches_per_rank)
    accum = len(micro_batches_per_rank[0])
    rank_grads = []
    for batches in micro_batches_per_rank:
        weight.grad = None
        for features, ids, mask, advantages in batches:
            logps, _ = token_logps_and_entropies(features @ weight, ids, mask=mask, compute_entropy=False)
            loss, _ = grpo_loss(
                logps,
                advantages,
                mask,
                GRPOLossConfig(loss_type=loss_type),
                num_items_in_batch=n_total,
                max_completion_length=8,
                grad_accum_steps=accum,
                num_processes=ranks,
            )
            loss.backward()
        rank_grads.append(weight.grad.clone())
    weight.grad = torch.stack(rank_grads).mean(0)  # what DDP's all-reduce averages
    torch.optim.SGD([weight], lr=lr).step()
    return (weight.detach() - start), rank_grads


def _sgd_batch(seed=1, rows=8, length=7):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, length, 6, generator=gen)
    ids = torch.randint(0, 11, (rows, length), generator=gen)
    lengths = torch.randint(1, length + 1, (rows,), generator=gen)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    advantages = torch.randn(rows, generator=gen)
    return features, ids, mask, advantages


def _split(batch, parts):
    return [tuple(t.chunk(parts)[i] for t in batch) for i in range(parts)]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_sgd_step_is_one_global_mean_under_accumulation_and_ddp(loss_type):
    """dapo: global token mean; grpo: global mean of sequence means; dr_grpo: Σ/(rows·L_max) — with
    equal micro-batch sizes, 2 ranks × 2 accumulated micro-batches step exactly like one full batch."""
    batch = _sgd_batch()
    n_total = batch[2].sum()
    full, _ = _sgd_delta([[batch]], loss_type, n_total)
    quarters = _split(batch, 4)
    split, _ = _sgd_delta([quarters[:2], quarters[2:]], loss_type, n_total)
    assert full.abs().max() > 1e-3
    assert torch.allclose(split, full, rtol=1e-5, atol=1e-7)


def test_sgd_bnpo_is_mean_of_local_token_means():
    """bnpo normalises per micro-batch, so GA changes the step (TRL's documented caveat)."""
    batch = _sgd_batch()
    quarters = _split(batch, 4)
    split, _ = _sgd_delta([quarters[:2], quarters[2:]], "bnpo", None)
    expected = torch.zeros_like(split)
    for quarter in quarters:  # each quarter's own bnpo step, averaged
        delta, _ = _sgd_delta([[quarter]], "bnpo", None)
        expected += delta / 4
    full, _ = _sgd_delta([[batch]], "bnpo", None)
    assert torch.allclose(split, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(split, full, rtol=1e-3, atol=1e-6)


def test_missing_accumulation_divisor_would_show_under_sgd():
    """The scale error Adam would hide: forgetting GA makes the SGD step GA times larger."""
    batch = _sgd_batch()
    halves = _split(batch, 2)
    right, _ = _sgd_delta([halves], "grpo", None)
    torch.manual_seed(0)
    weight = torch.nn.Parameter(0.3 * torch.randn(6, 11))
    start = weight.detach().clone()
    for features, ids, mask, advantages in halves:
        logps, _ = token_logps_and_entropies(features @ weight, ids, mask=mask, compute_entropy=False)
        grpo_loss(logps, advantages, mask, GRPOLossConfig(loss_type="grpo"))[0].backward()  # GA left at 1
    torch.optim.SGD([weight], lr=0.5).step()
    assert torch.allclose(weight.detach() - start, 2 * right, rtol=1e-5, atol=1e-7)


def test_two_simulated_ranks_match_one_rank_on_the_whole_batch():
    """Collectives: rank 0's metrics, entropy threshold and (DDP-averaged) dapo gradient equal those of the
    concatenated batch on one process. Rank 1 runs first and records what it contributes."""
    _, mask, _, base, old, ref, entropies, advantages = random_batch(21, rows=8)
    config = GRPOLossConfig(loss_type="dapo", beta=0.04, epsilon_high=0.28, top_entropy_quantile=0.3)
    n_total = mask.sum()
    full_logps = base.clone().requires_grad_(True)
    full_loss, full_metrics = grpo_loss(
        full_logps, advantages, mask, config, old_logps=old, ref_logps=ref, entropies=entropies
    )
    full_loss.backward()

    def rank_args(rows):
        return (advantages[rows], mask[rows], config), {
            "old_logps": old[rows],
            "ref_logps": ref[rows],
            "entropies": entropies[rows],
            "num_items_in_batch": n_total,
            "num_processes": 2,
        }

    sums, gathers = [], []
    args1, kwargs1 = rank_args(slice(4, 8))
    grpo_loss(
        base[4:],
        *args1,
        **kwargs1,
        all_reduce_sum=lambda t: sums.append(t) or t,
        all_gather=lambda t: gathers.append(t) or t,
    )
    sums_iter, gathers_iter = iter(sums), iter(gathers)
    rank0_logps = base[:4].clone().requires_grad_(True)
    args0, kwargs0 = rank_args(slice(0, 4))
    loss0, metrics0 = grpo_loss(
        rank0_logps,
        *args0,
        **kwargs0,
        all_reduce_sum=lambda t: t + next(sums_iter),
        all_gather=lambda t: torch.cat([t, next(gathers_iter)]),
    )
    loss0.backward()
    assert torch.allclose(rank0_logps.grad / 2, full_logps.grad[:4], rtol=1e-6, atol=1e-7)  # DDP averages
    for key, value in full_metrics.items():
        assert metrics0[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


# --------------------------------------------------------------------------------------------------
# Properties (§5.5)
# --------------------------------------------------------------------------------------------------

rewards_strategy = st.integers(1, 4).flatmap(
    lambda groups: st.tuples(
        st.just(groups),
        st.integers(2, 6).flatmap(
            lambda g: st.tuples(
                st.just(g), st.lists(st.floats(-5, 5, width=32), min_size=groups * g, max_size=groups * g)
            )
        ),
    )
)


@given(rewards_strategy, st.sampled_from(["group", "batch", "none"]))
@settings(max_examples=80, deadline=None)
def test_advantages_sum_to_zero_per_group_and_are_bounded(drawn, mode):
    groups, (size, values) = drawn
    out = group_advantages(torch.tensor(values, dtype=torch.float64), size, scale_rewards=mode)
    per_group = out.advantages.view(groups, size)
    assert torch.allclose(per_group.sum(1), torch.zeros(groups, dtype=torch.float64), atol=1e-9)
    if mode == "group":  # |z| ≤ (G − 1)/√G for a sample-std z-score
        assert per_group.abs().max() <= (size - 1) / math.sqrt(size) + 1e-9
    zero = out.group_zero_std.repeat_interleave(size)
    # No learning signal in a zero-std group. "Zero" is torch.isclose's (σ ≤ 1e-8, as TRL), so |A| ≤ σ√G / 1e-4
    # can reach ~1e-4 · √G (rewards [0, 6.2e-10] give 3.1e-6), not exactly 0.
    assert torch.all(out.advantages[zero].abs() < 1e-4 * math.sqrt(size))


@given(rewards_strategy, st.randoms(use_true_random=False))
@settings(max_examples=40, deadline=None)
def test_advantages_follow_a_permutation_within_groups(drawn, rnd):
    groups, (size, values) = drawn
    rewards = torch.tensor(values, dtype=torch.float64)
    order = torch.cat([torch.tensor(rnd.sample(range(size), size)) + g * size for g in range(groups)])
    assert torch.allclose(
        group_advantages(rewards[order], size).advantages, group_advantages(rewards, size).advantages[order]
    )


loss_inputs = st.tuples(
    st.integers(1, 5),
    st.integers(1, 6),
    st.integers(0, 2**31 - 1),
    st.sampled_from(LOSS_TYPES),
    st.sampled_from(["token", "sequence"]),
    st.booleans(),
)


def _draw_loss_inputs(rows, length, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(rows, length, generator=gen) > 0.3).long()
    logps = -3 * torch.rand(rows, length, generator=gen) * mask
    old = (logps + 0.5 * torch.randn(rows, length, generator=gen)) * mask
    ref = (logps + 0.5 * torch.randn(rows, length, generator=gen)) * mask
    return gen, mask, logps, old, ref


@given(loss_inputs)
@settings(max_examples=80, deadline=None)
def test_loss_finite_and_zero_advantage_gives_zero_policy_gradient(params):
    rows, length, seed, loss_type, level, off_policy = params
    gen, mask, base, old, ref = _draw_loss_inputs(rows, length, seed)
    config = GRPOLossConfig(
        loss_type=loss_type, importance_sampling_level=level, epsilon_high=0.28, delta=3.0
    )
    kwargs = {"old_logps": old if off_policy else None, "max_completion_length": length}
    logps = base.clone().requires_grad_(True)
    loss, metrics = grpo_loss(logps, torch.randn(rows, generator=gen), mask, config, **kwargs)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logps.grad).all()
    assert 0.0 <= metrics.get("clip_ratio/region_mean", 0.0) <= 1.0
    zero = base.clone().requires_grad_(True)
    zero_loss, _ = grpo_loss(zero, torch.zeros(rows), mask, config, **kwargs)
    zero_loss.backward()
    assert zero_loss.item() == 0.0 and torch.all(zero.grad == 0)
    with_kl = base.clone().requires_grad_(True)
    kl_loss, kl_metrics = grpo_loss(
        with_kl, torch.zeros(rows), mask, dataclasses.replace(config, beta=0.1), ref_logps=ref, **kwargs
    )
    kl_loss.backward()
    assert kl_metrics["kl"] >= 0.0 and torch.all(with_kl.grad[mask == 0] == 0)


@given(loss_inputs, st.integers(1, 4))
@settings(max_examples=80, deadline=None)
def test_loss_invariant_to_extra_padding(params, pad):
    rows, length, seed, loss_type, level, off_policy = params
    gen, mask, base, old, ref = _draw_loss_inputs(rows, length, seed)
    advantages = torch.randn(rows, generator=gen)
    config = GRPOLossConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.04)

    def padded(t):
        return torch.cat([t, torch.zeros(rows, pad, dtype=t.dtype)], dim=1)

    short, _ = grpo_loss(
        base,
        advantages,
        mask,
        config,
        old_logps=old if off_policy else None,
        ref_logps=ref,
        max_completion_length=16,
    )
    longer, _ = grpo_loss(
        padded(base),
        advantages,
        padded(mask),
        config,
        old_logps=padded(old) if off_policy else None,
        ref_logps=padded(ref),
        max_completion_length=16,
    )
    assert torch.allclose(short, longer, rtol=1e-6, atol=1e-7)


@given(st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31 - 1), st.sampled_from(["bnpo", "dapo"]))
@settings(max_examples=50, deadline=None)
def test_on_policy_gradient_is_minus_advantage_over_token_count(rows, length, seed, loss_type):
    gen, mask, base, _, _ = _draw_loss_inputs(rows, length, seed)
    advantages = torch.randn(rows, generator=gen)
    logps = base.clone().requires_grad_(True)
    aggregate = grpo_loss(logps, advantages, mask, GRPOLossConfig(loss_type=loss_type))[0]
    aggregate.backward()
    expected = -advantages.unsqueeze(1) * mask / mask.sum().clamp(min=1)
    assert torch.allclose(logps.grad, expected, rtol=1e-6, atol=1e-7)


def test_aggregate_loss_dapo_eval_ignores_accumulation():
    per_token = torch.ones(2, 3)
    mask = torch.ones(2, 3)
    train = aggregate_loss(
        per_token, mask, "dapo", num_items_in_batch=12, grad_accum_steps=4, steps_per_generation=2
    )
    evaluation = aggregate_loss(
        per_token, mask, "dapo", num_items_in_batch=12, grad_accum_steps=4, training=False
    )
    assert train.item() == pytest.approx(6 / (12 * 4 / 2)) and evaluation.item() == pytest.approx(6 / 12)
