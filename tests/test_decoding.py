"""The lean decoding loop (``RolloutConfig.decoder="lean"``, issue 23) against transformers' ``generate``."""

from __future__ import annotations

import pytest
import torch
from test_rollout import config, image_batch, video_batch

from mg3d.errors import ConfigError
from mg3d.generation import RolloutConfig, completion_logprobs, decoding, generate_completions
from mg3d.generation.decoding import _Linear, _SharedPrefixAttention
from mg3d.model import Policy, build_tiny_policy


@pytest.fixture(scope="module")
def policy() -> Policy:
    return build_tiny_policy(initializer_range=0.2)  # as in test_rollout: greedy tokens vary


def _both(policy: Policy, batch: dict, **settings) -> tuple:
    hf = generate_completions(policy, batch, config(**settings))
    lean = generate_completions(policy, batch, config(decoder="lean", **settings))
    return hf, lean


# The seeds draw a mix of completions ending at EOS and running to max_new_tokens (see test_rollout.config).
SETTINGS = [
    {},  # sampled, multinomial
    {"do_sample": False},
    {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "num_generations": 8},
]


@pytest.mark.parametrize("make_batch", [video_batch, image_batch])
@pytest.mark.parametrize("settings", SETTINGS, ids=["multinomial", "greedy", "warped"])
def test_lean_decoder_draws_the_tokens_generate_draws(policy: Policy, make_batch, settings: dict) -> None:
    batch = make_batch(policy)
    hf, lean = _both(policy, batch, **settings)
    assert torch.equal(lean.completion_ids, hf.completion_ids)
    assert torch.equal(lean.completion_mask, hf.completion_mask)
    assert torch.equal(lean.is_truncated, hf.is_truncated)
    assert lean.texts == hf.texts
    if settings.get("do_sample", True):  # not a degenerate case: the rows differ
        assert len(set(lean.texts)) > 1


def test_inverse_cdf_differs_only_at_cdf_boundaries(policy: Policy) -> None:
    """The inverse-CDF draw is a step function of the logits: where the two loops' roundings (≈ 1e-6) move a
    cumulative boundary across the row's uniform number, they pick *neighbouring* tokens and then continue
    from different prefixes. Seed 1 of this batch has one such row (about 1 in 200 rows over 40 seeds; 0 of
    320 with the multinomial draw, whose ties are between exponential races, not boundaries)."""
    batch = video_batch(policy)
    hf, lean = _both(policy, batch, sampler="inverse_cdf")
    differ = (hf.completion_ids != lean.completion_ids).any(dim=1)
    assert int(differ.sum()) <= 1
    for row in differ.nonzero().flatten().tolist():
        first = int((hf.completion_ids[row] != lean.completion_ids[row]).nonzero()[0])
        assert abs(int(hf.completion_ids[row, first]) - int(lean.completion_ids[row, first])) == 1


def test_lean_decoder_honours_stop_strings(policy: Policy) -> None:
    batch = video_batch(policy)
    free = generate_completions(policy, batch, config(decoder="lean", max_new_tokens=24))
    # a stop string that the free run writes in some rows but not all: the cut must fall where generate's does
    texts = [t for t in free.texts if len(t) > 3]
    stop = texts[0][1:3]
    hf, lean = _both(policy, batch, max_new_tokens=24, stop_strings=(stop,))
    assert torch.equal(lean.completion_ids, hf.completion_ids)
    assert torch.equal(lean.completion_mask, hf.completion_mask)
    assert any(stop in t for t in free.texts) and int(lean.completion_mask.sum()) < int(
        free.completion_mask.sum()
    )


def test_lean_logits_are_the_models_up_to_rounding(policy: Policy, monkeypatch) -> None:
    """The bound behind "the same tokens": each sampled token's log-probability in the lean loop against the
    model's own forward over the finished completions (the GRPO training forward, naive path)."""
    seen: list[torch.Tensor] = []
    step_logits = decoding._DecoderWeights.step_logits

    def record(self, *args, **kwargs):
        logits = step_logits(self, *args, **kwargs)
        seen.append(torch.log_softmax(logits, dim=-1))
        return logits

    monkeypatch.setattr(decoding._DecoderWeights, "step_logits", record)
    batch = video_batch(policy)
    cfg = config(decoder="lean", max_new_tokens=12)
    rollout = generate_completions(policy, batch, cfg)
    lean = torch.stack(seen, dim=1).gather(2, rollout.completion_ids[:, : len(seen), None]).squeeze(2)
    with torch.no_grad():
        model = completion_logprobs(policy, batch, rollout, share_prompt=False)
    mask = rollout.completion_mask[:, : len(seen)].bool()
    assert mask.sum() > 20
    # measured: ≈ 4e-5 median, ≈ 1e-4 at most (the batched training forward runs other kernels than any
    # one-token decoding step, so part of it is the reference's own rounding)
    assert float((lean - model[:, : len(seen)])[mask].abs().max()) < 3e-4


def test_cascade_attention_by_hand() -> None:
    """Attention over one prompt copy per group + each row's own keys equals softmax attention over the
    concatenation, with the prompt's left padding masked out, and grouped-query heads mapped as in Qwen."""
    gen = torch.Generator().manual_seed(0)
    b, g, kv, heads, d, length, steps = 2, 3, 2, 4, 8, 5, 4
    keys, values = torch.randn(b, kv, length, d, generator=gen), torch.randn(b, kv, length, d, generator=gen)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, :2] = 0  # prompt 1 is left-padded by two positions

    class Layer:
        pass

    layer = Layer()
    layer.keys, layer.values = keys, values
    cache = type("Cache", (), {"layers": [layer]})()
    attention = _SharedPrefixAttention(cache, mask, g, steps)
    rows_k, rows_v = [], []
    for step in range(3):
        q = torch.randn(b * g, heads, d, generator=gen)
        k, v = torch.randn(b * g, kv, d, generator=gen), torch.randn(b * g, kv, d, generator=gen)
        rows_k.append(k)
        rows_v.append(v)
        out = attention(0, step, q, k, v, scale=0.3)
        for row in range(b * g):
            p = row // g
            for h in range(heads):
                j = h // (heads // kv)
                all_k = torch.cat([keys[p, j], torch.stack([rk[row, j] for rk in rows_k])])
                all_v = torch.cat([values[p, j], torch.stack([rv[row, j] for rv in rows_v])])
                visible = torch.cat([mask[p].bool(), torch.ones(step + 1, dtype=torch.bool)])
                weights = torch.softmax((all_k @ q[row, h] * 0.3).masked_fill(~visible, float("-inf")), dim=0)
                expected = weights @ all_v
                assert torch.allclose(out[row, h * d : (h + 1) * d], expected, atol=1e-6), (step, row, h)


def test_fused_packed_projections_equal_the_modules() -> None:
    torch.manual_seed(0)
    q, k = torch.nn.Linear(32, 16), torch.nn.Linear(32, 8)
    x = torch.randn(6, 1, 32)
    fused = _Linear([q, k], rows=6)
    out_q, out_k = fused.split(x)
    assert torch.allclose(out_q, q(x), atol=1e-5) and torch.allclose(out_k, k(x), atol=1e-5)
    no_bias = torch.nn.Linear(32, 4, bias=False)
    assert torch.allclose(_Linear([no_bias], rows=6)(x), no_bias(x), atol=1e-5)


def test_lean_decoder_on_qwen2_vl() -> None:
    policy = build_tiny_policy(family="qwen2-vl", initializer_range=0.2)
    hf, lean = _both(policy, video_batch(policy), max_new_tokens=8)
    assert torch.equal(lean.completion_ids, hf.completion_ids)


def test_lean_decoder_config_and_refusals(policy: Policy) -> None:
    with pytest.raises(ConfigError, match="decoder must be"):
        RolloutConfig(decoder="vllm")
    with pytest.raises(ConfigError, match="share_prompt"):
        RolloutConfig(decoder="lean", share_prompt=False)
    with pytest.raises(ConfigError, match="compile"):
        RolloutConfig(decoder="lean", compile=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ConfigError, match="autocast"):
        generate_completions(policy, video_batch(policy), config(decoder="lean", max_new_tokens=2))
