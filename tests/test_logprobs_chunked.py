"""Chunked output head of ``completion_logprobs``: same numbers as one pass, never all tokens' logits at once."""

from __future__ import annotations

import pytest
import torch
from test_rollout import config, image_batch, video_batch

from mg3d.errors import ConfigError
from mg3d.generation import completion_logprobs, generate_completions
from mg3d.generation.logprobs import DEFAULT_CHUNK_ELEMENTS
from mg3d.model import Policy, build_tiny_policy


@pytest.fixture(scope="module")
def policy() -> Policy:
    return build_tiny_policy(initializer_range=0.2)


def _vocab(policy: Policy) -> int:
    return int(policy.model.config.get_text_config().vocab_size)


def _stats_and_grads(
    policy: Policy, batch: dict, rollout, share: bool, chunk_elements: int | None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    policy.model.zero_grad(set_to_none=True)
    policy.model.train()
    try:
        logp, entropy = completion_logprobs(
            policy, batch, rollout, 0.7, share, with_entropy=True, chunk_elements=chunk_elements
        )
        weights = torch.linspace(-1.0, 1.0, logp.shape[0])[:, None]  # advantage-like weights
        (weights * logp).sum().backward()
    finally:
        policy.model.eval()
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    return logp.detach(), entropy, grads


@pytest.mark.parametrize("make_batch", [video_batch, image_batch])
@pytest.mark.parametrize("share", [True, False])
def test_chunked_equals_one_pass(policy: Policy, make_batch, share: bool) -> None:
    """Three tokens per chunk (the last chunk shorter): log-probs, entropies and gradients equal one pass."""
    batch = make_batch(policy)
    rollout = generate_completions(policy, batch, config())
    whole = _stats_and_grads(policy, batch, rollout, share, None)
    chunked = _stats_and_grads(policy, batch, rollout, share, 3 * _vocab(policy))
    assert rollout.completion_ids.numel() % 3 != 0  # so the last chunk is a short one
    assert torch.allclose(chunked[0], whole[0], atol=2e-5, rtol=0)
    assert torch.allclose(chunked[1], whole[1], atol=2e-5, rtol=0)
    assert torch.all(chunked[0][rollout.completion_mask == 0] == 0)
    assert torch.all(chunked[1][rollout.completion_mask == 0] == 0)
    assert chunked[2].keys() == whole[2].keys()
    assert any(name.startswith("model.visual") for name in chunked[2])  # the vision tower is still reached
    for name, ref in whole[2].items():
        assert torch.allclose(chunked[2][name], ref, atol=1e-4 * max(1.0, float(ref.abs().max()))), name


@pytest.mark.parametrize("grad", [True, False])
def test_the_head_never_sees_more_than_one_chunk(policy: Policy, grad: bool) -> None:
    """Every call of the output head (forward, and the backward's recomputation) gets at most one chunk of rows;
    the model's own forwards (prefill, decoder pass) ask it for one position per sequence only."""
    batch = video_batch(policy)
    rollout = generate_completions(policy, batch, config())
    shapes: list[torch.Size] = []
    head = policy.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, args, _out: shapes.append(args[0].shape))
    try:
        policy.model.train(grad)
        with torch.set_grad_enabled(grad):
            logp = completion_logprobs(policy, batch, rollout, 1.0, chunk_elements=5 * _vocab(policy))
            calls_forward = len(shapes)
            if grad:
                logp.sum().backward()
    finally:
        handle.remove()
        policy.model.eval()
        policy.model.zero_grad(set_to_none=True)
    tokens = rollout.completion_ids.numel()
    assert all(s[1] == 1 for s in shapes if len(s) == 3)  # (sequences, 1 position, hidden)
    chunks = [s[0] for s in shapes[:calls_forward] if len(s) == 2]  # (rows, hidden): the chunked head
    assert max(chunks) <= 5 and sum(chunks) == tokens  # every completion token once, 5 at most at a time
    recomputed = [s[0] for s in shapes[calls_forward:]]
    assert sorted(recomputed) == (sorted(chunks) if grad else [])  # the backward recomputes each chunk once


def test_default_chunk_keeps_the_tiny_model_in_one_pass(policy: Policy) -> None:
    """The tiny model's batches fit one default chunk: the numbers are bit for bit those of one pass."""
    assert (
        DEFAULT_CHUNK_ELEMENTS // _vocab(policy) >= 16 * 8 * 64
    )  # the demo's batch × G × new tokens, and more
    batch = image_batch(policy)
    rollout = generate_completions(policy, batch, config())
    default = _stats_and_grads(policy, batch, rollout, True, DEFAULT_CHUNK_ELEMENTS)
    whole = _stats_and_grads(policy, batch, rollout, True, None)
    assert torch.equal(default[0], whole[0]) and torch.equal(default[1], whole[1])
    assert all(torch.equal(default[2][n], whole[2][n]) for n in whole[2])


def test_chunk_elements_must_be_positive(policy: Policy) -> None:
    batch = video_batch(policy)
    rollout = generate_completions(policy, batch, config(max_new_tokens=4))
    with pytest.raises(ConfigError, match="chunk_elements"):
        completion_logprobs(policy, batch, rollout, 1.0, chunk_elements=0)
