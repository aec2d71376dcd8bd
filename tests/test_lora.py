"""LoRA (``model.policy.lora``): only adapters train, the base is the KL reference, merging changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from test_rollout import config, video_batch
from test_train import make_datamodule, make_module, trainer, weights

from mg3d.errors import ConfigError
from mg3d.generation import completion_logprobs, generate_completions
from mg3d.grounder import Grounder
from mg3d.grpo.loss import GRPOLossConfig
from mg3d.lora import (
    LoRAConfig,
    adapters_disabled,
    apply_lora,
    has_lora,
    lora_parameter_names,
    merge_lora,
    save_adapter,
)
from mg3d.model import PolicyConfig, build_tiny_policy, load_policy, save_policy

LANGUAGE_LAYERS = 4 * 7  # the tiny model's 4 decoder layers × q, k, v, o, gate, up, down
VISION_LAYERS = 2 * 5  # its 2 vision blocks × qkv, proj, gate, up, down


def _logps(policy, batch, rollout) -> torch.Tensor:
    policy.model.eval()
    with torch.no_grad():
        return completion_logprobs(policy, batch, rollout, 1.0)


def _train_step(policy, batch, rollout, lr: float = 1e-2) -> None:
    """One AdamW step on an advantage-weighted log-likelihood (a GRPO-shaped loss) over the trainable weights."""
    policy.model.train()
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    logp = completion_logprobs(policy, batch, rollout, 1.0)
    weights_ = torch.linspace(-1.0, 1.0, logp.shape[0])[:, None]
    (-(weights_ * logp).sum() / rollout.completion_mask.sum()).backward()
    optimizer.step()
    policy.model.eval()


@pytest.mark.parametrize(
    "bad",
    [
        {"rank": 0},
        {"alpha": 0.0},
        {"dropout": 1.0},
        {"vision": "trained"},
        {"target_modules": []},
        {"target_modules": ["q_proj", "a.b"]},
    ],
)
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ConfigError, match=r"policy\.lora"):
        LoRAConfig(**bad)


def test_unknown_target_modules_name_the_setting() -> None:
    policy = build_tiny_policy()
    with pytest.raises(ConfigError, match="nothing_here"):
        apply_lora(policy.model, LoRAConfig(target_modules=["nothing_here"]))


@pytest.mark.parametrize(
    ("vision", "layers"), [("frozen", LANGUAGE_LAYERS), ("adapted", LANGUAGE_LAYERS + VISION_LAYERS)]
)
def test_only_adapters_are_trainable_and_start_as_a_no_op(vision: str, layers: int) -> None:
    policy = build_tiny_policy(initializer_range=0.2)
    batch = video_batch(policy)
    rollout = generate_completions(policy, batch, config())
    before = _logps(policy, batch, rollout)
    assert apply_lora(policy.model, LoRAConfig(rank=4, vision=vision)) == layers
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable == lora_parameter_names(policy.model) and len(trainable) == 2 * layers
    assert any(n.startswith("model.visual.") for n in trainable) == (vision == "adapted")
    assert torch.equal(_logps(policy, batch, rollout), before)  # B = 0: the adapted model is the base model


def test_a_step_moves_only_adapters_and_disabled_adapters_are_the_base() -> None:
    policy = build_tiny_policy(initializer_range=0.2)
    base = copy.deepcopy(policy.model)
    apply_lora(policy.model, LoRAConfig(rank=4, alpha=8, dropout=0.0, vision="adapted"))
    batch = video_batch(policy)
    rollout = generate_completions(policy, batch, config())
    start = {k: v.clone() for k, v in policy.model.state_dict().items()}
    _train_step(policy, batch, rollout)
    after = policy.model.state_dict()
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert changed and all(".lora_" in k for k in changed)
    assert any(".lora_B." in k for k in changed) and any(k.startswith("model.visual.") for k in changed)
    base_policy = copy.copy(policy)
    base_policy.model = base
    reference = _logps(base_policy, batch, rollout)
    with adapters_disabled(policy.model):
        assert torch.equal(_logps(policy, batch, rollout), reference)
    assert not torch.allclose(_logps(policy, batch, rollout), reference, atol=1e-4)  # adapters back on
    assert lora_parameter_names(policy.model) == [
        n for n, p in policy.model.named_parameters() if p.requires_grad
    ]


def test_merged_model_equals_the_adapted_model(tmp_path) -> None:
    policy = build_tiny_policy(initializer_range=0.2)
    apply_lora(policy.model, LoRAConfig(rank=4, alpha=8, dropout=0.0))
    batch = video_batch(policy)
    rollout = generate_completions(policy, batch, config())
    _train_step(policy, batch, rollout)
    adapted = _logps(policy, batch, rollout)
    greedy = generate_completions(policy, batch, config(do_sample=False, num_generations=1))
    adapter_dir = save_adapter(policy.model, tmp_path / "adapter")
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert len(saved) == 2 * LANGUAGE_LAYERS and all("lora_" in k for k in saved)
    assert (adapter_dir / "adapter_config.json").is_file()

    assert merge_lora(policy.model) == LANGUAGE_LAYERS
    assert not has_lora(policy.model) and not lora_parameter_names(policy.model)
    torch.testing.assert_close(_logps(policy, batch, rollout), adapted, rtol=1e-4, atol=1e-4)
    merged_greedy = generate_completions(policy, batch, config(do_sample=False, num_generations=1))
    assert torch.equal(merged_greedy.completion_ids, greedy.completion_ids)
    reloaded = load_policy(
        save_policy(policy, tmp_path / "merged")
    )  # a plain folder: full weights, no adapter
    assert not has_lora(reloaded.model)
    torch.testing.assert_close(_logps(reloaded, batch, rollout), adapted, rtol=1e-4, atol=1e-4)


def test_policy_config_reads_a_lora_mapping() -> None:
    """Saved hyper-parameters (and plain dicts) come back as a LoRAConfig."""
    cfg = PolicyConfig(lora={"rank": 2, "vision": "adapted"})  # type: ignore[arg-type]
    assert isinstance(cfg.lora, LoRAConfig) and cfg.lora.rank == 2
    assert has_lora(cfg.build().model)


def test_sync_ref_model_needs_full_fine_tuning() -> None:
    with pytest.raises(ConfigError, match="sync_ref_model"):
        make_module(
            policy=PolicyConfig(lora=LoRAConfig(rank=2)),
            loss=GRPOLossConfig(loss_type="dapo", beta=0.04, sync_ref_model=True),
        )


@pytest.mark.slow
def test_grpo_with_lora_resumes_exactly_and_the_grounder_merges(phantom_source, tmp_path) -> None:
    """β > 0 with LoRA: no reference copy; 2 warm-start + 2 GRPO steps change adapters only; a run resumed from
    the step-3 checkpoint ends with the uninterrupted run's weights; the Grounder loads the checkpoint merged."""
    import lightning.pytorch as pl

    settings = dict(
        policy=PolicyConfig(lora=LoRAConfig(rank=4, alpha=8, dropout=0.0)),
        loss=GRPOLossConfig(loss_type="dapo", beta=0.04),
    )
    pl.seed_everything(0)
    full = make_module(**settings)
    assert full._reference is None
    initial = weights(full)
    trainer(tmp_path / "full", 4).fit(full, make_datamodule(phantom_source))
    final = weights(full)
    changed = {k for k in initial if not torch.equal(initial[k], final[k])}
    assert changed and all(".lora_" in k for k in changed)

    pl.seed_everything(0)
    first = make_module(**settings)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer(tmp_path / "a", 3, callbacks=[ckpt_cb], enable_checkpointing=True).fit(
        first, make_datamodule(phantom_source)
    )
    ckpt = next((tmp_path / "ckpt").glob("*step=3*.ckpt"))
    pl.seed_everything(123)
    resumed = make_module(**settings)
    trainer(tmp_path / "b", 4).fit(resumed, make_datamodule(phantom_source), ckpt_path=str(ckpt))
    for key, value in final.items():
        torch.testing.assert_close(weights(resumed)[key], value, rtol=0, atol=0, msg=f"{key} after resume")

    grounder = Grounder.from_checkpoint(ckpt)
    assert not has_lora(grounder.policy.model)
    merged = copy.deepcopy(first.model)
    merge_lora(merged)
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(grounder.policy.model.state_dict()[key], value, rtol=0, atol=0, msg=key)
