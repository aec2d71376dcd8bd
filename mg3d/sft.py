"""Supervised warm start: teacher-forced cross-entropy on the answer written in the prompt template.

The tiny offline model starts from random weights and cannot produce a parseable box, so GRPO would see
all-zero rewards (no signal). A few minutes of supervised training on the synthetic data teaches it the
answer format and a rough localisation; GRPO then improves that policy. Real Qwen2.5-VL checkpoints skip
this stage, as MedGround-R1 does (its point: no cold-start SFT).

The target answer is treated as a one-sample "rollout" so that the supervised loss runs through exactly the
same log-probability code as GRPO (:func:`mg3d.generation.completion_logprobs`): a prompt/answer
concatenation bug cannot hide in a second implementation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mg3d.errors import DataError
from mg3d.generation import Rollout, completion_logprobs
from mg3d.grounding import PromptBatch
from mg3d.model import Policy

__all__ = ["answer_rollout", "sft_loss"]


def answer_rollout(policy: Policy, batch: PromptBatch) -> Rollout:
    """The batch's target answers (each followed by EOS) as a :class:`Rollout` with one completion per prompt."""
    if any(not a for a in batch.answers):
        missing = [batch.ids[i] for i, a in enumerate(batch.answers) if not a]
        raise DataError(f"records {missing[:5]} have no ground-truth box to train on")
    tok = policy.tokenizer
    encoded = [tok(a, add_special_tokens=False)["input_ids"] + [policy.eos_token_id] for a in batch.answers]
    length = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), length), policy.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return Rollout(
        prompt_ids=batch.inputs["input_ids"],
        prompt_mask=batch.inputs["attention_mask"],
        completion_ids=ids,
        completion_mask=mask,
        texts=list(batch.answers),
        is_truncated=torch.zeros(len(encoded), dtype=torch.bool),
        prompt_index=torch.arange(len(encoded)),
        num_generations=1,
    )


def sft_loss(policy: Policy, batch: PromptBatch) -> tuple[Tensor, dict[str, float]]:
    """Token-mean negative log-likelihood of the target answers, and the token accuracy of greedy guesses."""
    target = answer_rollout(policy, batch)
    device = next(policy.model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.inputs.items()}
    target.completion_ids = target.completion_ids.to(device)
    target.completion_mask = target.completion_mask.to(device)
    logps = completion_logprobs(policy, inputs, target, temperature=1.0, share_prompt=False)
    mask = target.completion_mask.float()
    tokens = mask.sum().clamp(min=1.0)
    loss = -(logps * mask).sum() / tokens
    with torch.no_grad():
        # a token is "right" when the model gives it probability > 1/2, i.e. it would be the greedy choice
        confident = ((logps > -0.6931) & mask.bool()).sum() / tokens
    return loss, {"answer_tokens": float(tokens), "token_confidence": float(confident)}
