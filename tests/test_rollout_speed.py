"""Tests for the opt-in speed-ups of the rollout (issue 23): the inverse-CDF sampler, compiled decoding, fused AdamW."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_rollout import config, video_batch

from mg3d.errors import ConfigError
from mg3d.generation import RolloutConfig, generate_completions
from mg3d.generation.inverse_cdf import BLOCK, InverseCDFSampler, draw
from mg3d.model import Policy, build_tiny_policy


@pytest.fixture(scope="module")
def policy() -> Policy:
    return build_tiny_policy(initializer_range=0.2)  # as in test_rollout: greedy tokens vary


def _chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the tokens expected at least 5 times, and its degrees of freedom."""
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * n
    kept = expected >= 5
    return float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum()), int(kept.sum()) - 1


def test_draw_follows_the_distribution_and_never_draws_zero_probability() -> None:
    # Three blocks of the two-level draw, a short tail block, and zeros: a whole block, single entries, the last one.
    vocab = 2 * BLOCK + 952
    gen = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(vocab, generator=gen)
    logits[BLOCK : 2 * BLOCK] = float("-inf")
    logits[[5, 700, vocab - 1]] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    n = 100_000
    u = torch.rand((n, 1), dtype=torch.float64, generator=gen)
    tokens = draw(probs.expand(n, vocab).contiguous(), u).squeeze(1)
    assert not bool((probs[tokens] == 0).any())
    stat, dof = _chi_square(tokens, probs)
    # Pearson's statistic has mean dof and sd sqrt(2 dof) under the right distribution; 5 sd is far outside
    # chance, and far inside what a wrong block mass or a biased position inside a block gives.
    assert abs(stat - dof) < 5 * (2 * dof) ** 0.5, (stat, dof)
    # The draw is a monotone map of u: a sorted u gives sorted tokens (inverse CDF, not another sampler).
    sorted_tokens = draw(probs.expand(9, vocab).contiguous(), torch.linspace(0, 0.999, 9).double()[:, None])
    assert torch.equal(sorted_tokens.squeeze(1), sorted_tokens.squeeze(1).sort().values)


def test_draw_at_the_edges_of_the_unit_interval() -> None:
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    low = draw(probs, torch.zeros(2, 1, dtype=torch.float64))
    high = draw(probs, torch.full((2, 1), 1.0 - 2.0**-53, dtype=torch.float64))
    assert low.squeeze(1).tolist() == [1, 0]
    assert high.squeeze(1).tolist() == [
        3,
        0,
    ]  # never the zero-probability entries after the last positive one


def test_sampler_keeps_only_the_drawn_token() -> None:
    torch.manual_seed(0)
    scores = torch.randn(3, 2500)
    out = InverseCDFSampler()(torch.zeros(3, 1, dtype=torch.long), scores)
    assert bool((torch.isfinite(out).sum(dim=1) == 1).all())
    assert bool((out.max(dim=1).values == 0).all())


def test_inverse_cdf_rollouts_use_transformers_warpers(policy: Policy) -> None:
    batch = video_batch(policy)
    greedy = generate_completions(policy, batch, config(do_sample=False))
    top1 = generate_completions(policy, batch, config(sampler="inverse_cdf", top_k=1))
    assert torch.equal(top1.completion_ids, greedy.completion_ids)  # top-k ran before the draw
    hot = {"temperature": 8.0, "num_generations": 8, "max_new_tokens": 24, "sampler": "inverse_cdf"}
    vision_ids = torch.tensor([policy.image_token_id, policy.video_token_id])
    kept = generate_completions(policy, batch, config(**hot))
    assert not torch.isin(
        kept.completion_ids, vision_ids
    ).any()  # the suppressing processor ran before it too
    free = generate_completions(policy, batch, config(**hot, suppress_vision_tokens=False))
    assert torch.isin(free.completion_ids, vision_ids).any()


def test_inverse_cdf_rollouts_are_seeded_and_shared_equals_naive(policy: Policy) -> None:
    batch = video_batch(policy)
    cfg = config(sampler="inverse_cdf")
    a, b = generate_completions(policy, batch, cfg), generate_completions(policy, batch, cfg)
    assert torch.equal(a.completion_ids, b.completion_ids)
    naive = generate_completions(policy, batch, config(sampler="inverse_cdf", share_prompt=False))
    assert torch.equal(a.completion_ids, naive.completion_ids)
    other = generate_completions(policy, batch, config(sampler="inverse_cdf", seed=2))
    assert not torch.equal(a.completion_ids, other.completion_ids)
    assert len({tuple(r.tolist()) for r in a.completion_ids}) == a.completion_ids.shape[0]


def test_sampler_config() -> None:
    assert RolloutConfig().sampler == "multinomial" and RolloutConfig().compile is False
    with pytest.raises(ConfigError, match="sampler"):
        RolloutConfig(sampler="gumbel")


@pytest.mark.slow
def test_compiled_decoding_draws_the_same_tokens(policy: Policy) -> None:
    batch = video_batch(policy)
    for overrides in ({"do_sample": False}, {}):
        eager = generate_completions(policy, batch, config(**overrides))
        compiled = generate_completions(policy, batch, config(**overrides, compile=True))
        assert torch.equal(eager.completion_ids, compiled.completion_ids), overrides
        assert torch.equal(eager.completion_mask, compiled.completion_mask)
    assert hasattr(policy.model, "_compiled_call")  # transformers did compile (it only warns when it cannot)


def test_fused_adamw_is_opt_in() -> None:
    from mg3d.grpo.config import OptimConfig
    from mg3d.grpo.module import GRPOModule

    for fused, expected in ((False, None), (True, True)):
        module = GRPOModule(optim=OptimConfig(fused=fused))
        module._trainer = SimpleNamespace(max_steps=4)  # what configure_optimizers reads of its Trainer
        optimizer = module.configure_optimizers()["optimizer"]
        assert optimizer.defaults["fused"] is expected
