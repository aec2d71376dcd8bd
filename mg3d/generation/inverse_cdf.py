"""Draw each sampled token by inverse-CDF sampling: one uniform number per row instead of one per vocabulary entry.

Why: transformers samples with ``torch.multinomial``, which on CPU draws an exponential random number for every
entry of the (rows × vocabulary) probability matrix at every decoding step. At Qwen's 151,936-row vocabulary that
was 60 % of a CPU rollout of the real-architecture folder (docs/benchmarks.md, "One GRPO optimiser step"); at the
tiny policy's 320 rows it costs nothing. Inverse-CDF sampling draws from exactly the same distribution (the
probabilities transformers' processors and warpers leave), from a different random stream: for a given seed the
completions differ from ``multinomial``'s, so it is opt-in (``RolloutConfig.sampler``).

The draw is two-level (a block of the vocabulary by its mass, then a token inside the block), so nothing of
vocabulary size is converted to float64 at each step. It plugs into transformers' own loop as the last logits processor of a greedy ``generate``: it keeps only the
drawn token (every other score becomes ``-inf``), so the loop's ``argmax`` picks it; the temperature, top-k and
top-p warpers before it are transformers' classes, built by the rule ``generate`` uses when it samples.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

__all__ = ["BLOCK", "InverseCDFSampler", "draw", "inverse_cdf_processors", "sampling_warpers"]


#: Vocabulary entries per block of the two-level draw (a block is chosen by its mass, then a token inside it).
BLOCK = 1024


def _search(weights: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise index ``i`` with ``cdf[i-1] <= u·total < cdf[i]`` (float64), and where ``u·total`` falls inside
    entry ``i`` as a fraction in [0, 1). Never an entry of weight zero: rounding that would step past the last
    positive entry is clamped back to it."""
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:]
    target = u * total
    index = torch.searchsorted(cdf, target, right=True)
    last_positive = (cdf < total).sum(dim=-1, keepdim=True)
    index = torch.minimum(index, last_positive)
    chosen = weights.gather(1, index)
    fraction = ((target - (cdf.gather(1, index) - chosen)) / chosen).clamp_(0.0, 1.0 - 2.0**-52)
    return index, fraction


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` (rows × vocabulary, float32) for uniforms ``u`` (rows × 1, float64).

    Two levels, so that nothing of vocabulary size is copied to float64: a block of :data:`BLOCK` entries is
    chosen by its (float32-summed) mass, then a token inside it from the block's float64 cumulative sum, reusing
    the uniform's fraction within the block (exact in distribution up to float rounding of the block masses).
    """
    rows, vocab = probs.shape
    full = vocab // BLOCK * BLOCK
    mass = probs[:, :full].reshape(rows, -1, BLOCK).sum(dim=-1)
    if full < vocab:
        mass = torch.cat([mass, probs[:, full:].sum(dim=-1, keepdim=True)], dim=1)
    block, fraction = _search(mass.double(), u)
    index = block * BLOCK + torch.arange(BLOCK, device=probs.device)
    inside = probs.gather(1, index.clamp(max=vocab - 1)).double() * (index < vocab)
    token, _ = _search(inside, fraction)
    return index.gather(1, token)


class InverseCDFSampler(LogitsProcessor):
    """Replace each row of scores by ``-inf`` everywhere but one token drawn from ``softmax(scores)``.

    The uniform numbers (one per row) come from torch's global generator, which mg3d seeds per rollout. A token
    of probability zero (filtered by top-k/top-p, suppressed, ``-inf``) is never drawn.
    """

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        u = torch.rand((scores.shape[0], 1), dtype=torch.float64, device=scores.device)
        token = draw(torch.softmax(scores, dim=-1), u)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


def sampling_warpers(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    """The warpers ``generate(do_sample=True)`` adds (same classes, conditions and order)."""
    processors = LogitsProcessorList()
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        processors.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return processors


def inverse_cdf_processors(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    """The warpers ``generate(do_sample=True)`` would add, then the sampler."""
    processors = sampling_warpers(temperature, top_k, top_p)
    processors.append(InverseCDFSampler())
    return processors
