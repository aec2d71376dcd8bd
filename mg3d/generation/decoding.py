"""A lean decoding loop for Qwen-VL policies: each prompt's keys/values kept once, a few operators per token.

Why a loop of mg3d's own (``RolloutConfig.decoder = "lean"``) next to transformers' ``generate``: on the tiny
CPU policy a decoding step of ``generate`` over the shared prompt cache took ≈ 7 ms, of which the layers'
matrix products and attention were about 4; the rest was per-step Python (input preparation, 4D masks, rotary
bookkeeping, output dataclasses), and the attention read G copies of every prompt's keys/values — the cache
``generate`` needs, since its model forward knows only one row per sequence. Here (docs/benchmarks.md, "One GRPO
optimiser step"):

* **Cascade attention.** A prompt's keys/values stay one copy per prompt. At each step the queries of its G rows
  attend to them as *one* query block (G × heads-per-key-head queries per key head), and each row attends to its
  own completion keys separately; the two partial softmaxes are merged by their log-sum-exp:
  ``o = (o₁·e^{ℓ₁} + o₂·e^{ℓ₂}) / (e^{ℓ₁} + e^{ℓ₂})``. The same maths as attending over the concatenation,
  rounded differently.
* **In-place completion cache.** Completion keys/values are written into a preallocated buffer and attention
  reads only its filled part (a static cache is read to its full length at every step).
* **Projections packed once per rollout** and fused (q|k|v, gate|up): see :class:`_Linear`.
* **Nothing else of the model re-implemented.** The model's own modules compute embeddings, norms, the rotary
  tables and activations, with its weights, in the order its forward uses; only the loop, the rotary product
  ``q·cos + rotate_half(q)·sin`` and the attention are written here.
* **transformers' sampling.** The logits processors, warpers and stopping criteria are transformers' classes
  built by the rule ``generate`` uses, and the token is drawn as ``generate`` draws it (``softmax`` +
  ``torch.multinomial`` from the global RNG, or argmax after the inverse-CDF sampler), so a seed draws the same
  tokens when the logits agree.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor
from transformers import LogitsProcessorList, StoppingCriteriaList
from transformers.generation.logits_process import SuppressTokensLogitsProcessor
from transformers.generation.stopping_criteria import EosTokenCriteria, StopStringCriteria

from mg3d.errors import ConfigError
from mg3d.generation.config import RolloutConfig
from mg3d.generation.inputs import prefill_shared
from mg3d.generation.inverse_cdf import inverse_cdf_processors, sampling_warpers
from mg3d.model import Policy

__all__ = ["check_lean_decoding", "decode_shared"]

#: CPU flash attention that also returns the log-sum-exp of each query's scores (the merge needs it).
_flash_with_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def check_lean_decoding(policy: Policy) -> None:
    """Refuse a policy whose decoder this loop does not reproduce (it only knows Qwen2/2.5-VL's text layers)."""
    text = policy.model.config.get_text_config()
    if policy.family not in ("qwen2.5-vl", "qwen2-vl"):
        raise ConfigError(f"decoder='lean' supports Qwen2-VL and Qwen2.5-VL policies, not {policy.family!r}")
    if getattr(text, "use_sliding_window", False):
        raise ConfigError(
            "decoder='lean' does not implement sliding-window attention; use decoder='transformers'"
        )
    if policy.model.device.type != "cpu":
        raise ConfigError(
            "decoder='lean' runs on CPU (its attention is torch's CPU flash kernel); on GPUs use "
            "decoder='transformers' with compile=true (CUDA graphs) or a vLLM backend"
        )
    if torch.is_autocast_enabled("cpu"):
        raise ConfigError(
            "decoder='lean' decodes in the model's own dtype and does not follow autocast (e.g. Lightning's "
            "bf16-mixed); use decoder='transformers' with a dynamic cache there"
        )
    if any(isinstance(p, DTensor) for p in policy.model.parameters()):
        # FSDP2 gathers a layer's weights in the layer's forward hooks, which this loop does not call; inside
        # mg3d.sharding.gathered_parameters (as HFRolloutBackend decodes) every weight is whole
        raise ConfigError(
            "decoder='lean' needs the policy's full weights: decode an FSDP-sharded policy inside "
            "mg3d.sharding.gathered_parameters (the GRPO rollout backend does), or use decoder='transformers'"
        )


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding by the rotate-half convention of Qwen's attention (``cos``/``sin`` already mRoPE-mixed)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class _SharedPrefixAttention:
    """Keys/values of B prompts (one copy each) plus those of B·G completion rows, and attention over both."""

    def __init__(self, prompt_cache: Any, prompt_mask: torch.Tensor, generations: int, steps: int) -> None:
        self.g = generations
        self.keys = [layer.keys for layer in prompt_cache.layers]  # (B, KV, L, d) per layer
        self.values = [layer.values for layer in prompt_cache.layers]
        dtype = self.keys[0].dtype
        # additive mask over prompt positions (left padding), in the attention's dtype as the kernel requires
        self.prompt_bias = torch.zeros(prompt_mask.shape, dtype=dtype, device=prompt_mask.device)
        self.prompt_bias.masked_fill_(prompt_mask == 0, float("-inf"))
        self.prompt_bias = self.prompt_bias[:, None, None, :]
        b, kv, _, d = self.keys[0].shape
        shape = (b * generations, kv, steps, d)
        self.row_keys = [torch.empty(shape, dtype=dtype, device=self.keys[0].device) for _ in self.keys]
        self.row_values = [torch.empty_like(k) for k in self.row_keys]

    def __call__(
        self, layer: int, step: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Attention output (N, H·d) of one new token per row, from its query (N, H, d) and its key and value
        (N, KV, d), which are written to the row cache at ``step``. Query head ``h`` reads key head
        ``h // (H / KV)``, as Qwen's grouped-query attention."""
        n, heads, d = q.shape
        b, kv = self.keys[layer].shape[:2]
        per_kv = heads // kv
        self.row_keys[layer][:, :, step] = k
        self.row_values[layer][:, :, step] = v
        # the G rows of a prompt as one block of queries per key head: (B, KV, G·per_kv, d)
        q_block = q.view(b, self.g, kv, per_kv, d).transpose(1, 2).reshape(b, kv, self.g * per_kv, d)
        out_p, lse_p = _flash_with_lse(
            q_block, self.keys[layer], self.values[layer], attn_mask=self.prompt_bias, scale=scale
        )
        out_p = out_p.view(b, kv, self.g, per_kv, d).transpose(1, 2).reshape(n, kv, per_kv, d)
        lse_p = lse_p.view(b, kv, self.g, per_kv).transpose(1, 2).reshape(n, kv, per_kv, 1)
        out_c, lse_c = _flash_with_lse(
            q.view(n, kv, per_kv, d),
            self.row_keys[layer][:, :, : step + 1],
            self.row_values[layer][:, :, : step + 1],
            scale=scale,
        )
        # softmax over prompt ∪ row keys = the two partial outputs weighted by their shares of the total mass:
        # o = o_c + σ(ℓ_p − ℓ_c)·(o_p − o_c)
        share = torch.sigmoid(lse_p - lse_c.view(n, kv, per_kv, 1))
        return torch.lerp(out_c, out_p, share).reshape(n, heads * d)


class _Linear:
    """``x Wᵀ + b`` for one or several of the model's projections side by side (q|k|v, gate|up), weights frozen
    for the rollout.

    Why: on CPU, ``F.linear`` on a 16-row input repacks the whole weight matrix into the GEMM's blocked layout at
    every call, and a decoding step is a few such products per layer. Here the weights are packed once per
    rollout into oneDNN's layout (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``: the
    prepacked linear inductor emits for frozen weights) and fused where the model computes several products of
    one input. Measured side by side on the decode shapes (16 rows, 20 cycled 1024 × 256 weights, one thread):
    63 GFLOP/s against 26 for ``F.linear`` and 37 for MKL's packed GEMM.
    oneDNN sums in another order than MKL's GEMM (≈ 1e-6 relative); the tests bound the effect on the
    log-probabilities. Without oneDNN or for other dtypes: ``F.linear`` on the concatenated weights.
    """

    def __init__(self, linears: list[torch.nn.Linear], rows: int) -> None:
        weights = [lin.weight.detach() for lin in linears]
        self.weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        biases = [lin.bias for lin in linears]
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        self.sizes = [w.shape[0] for w in weights]
        self.packed = None
        if self.weight.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self(x).split(self.sizes, dim=-1)


class _DecoderWeights:
    """The text decoder's projections, fused and packed for ``rows`` one-token inputs."""

    def __init__(self, model: Any, rows: int) -> None:
        self.text = model.model.language_model
        self.qkv, self.out, self.gate_up, self.down = [], [], [], []
        for layer in self.text.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.qkv.append(_Linear([attn.q_proj, attn.k_proj, attn.v_proj], rows))
            self.out.append(_Linear([attn.o_proj], rows))
            self.gate_up.append(_Linear([mlp.gate_proj, mlp.up_proj], rows))
            self.down.append(_Linear([mlp.down_proj], rows))
        self.head = _Linear([model.lm_head], rows)

    def rotary_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (N, steps, d) of every decoding step at once, by the model's rotary embedding (its values
        are elementwise in the positions, so one call for all steps gives each step's exact table)."""
        probe = self.text.embed_tokens.weight.detach()[:1]  # dtype and device of the hidden states
        return self.text.rotary_emb(probe, positions)

    def step_logits(
        self,
        attention: _SharedPrefixAttention,
        tokens: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        step: int,
    ) -> torch.Tensor:
        """Logits (N, V) of every row's next token, fed one token per row: the model's forward for one position
        (its norms and activation; its weights, packed; ``rotary`` from :meth:`rotary_tables`)."""
        text = self.text
        hidden = text.embed_tokens(tokens[:, None])
        cos, sin = rotary[0][:, step : step + 1], rotary[1][:, step : step + 1]  # (N, 1, d): all heads
        n = tokens.shape[0]
        for i, layer in enumerate(text.layers):
            attn = layer.self_attn
            q, k, v = self.qkv[i].split(layer.input_layernorm(hidden))
            q = _rotate(q.view(n, -1, attn.head_dim), cos, sin)
            k = _rotate(k.view(n, -1, attn.head_dim), cos, sin)
            out = attention(i, step, q, k, v.view(n, -1, attn.head_dim), attn.scaling)
            hidden = hidden + self.out[i](out.view(n, 1, -1))
            gate, up = self.gate_up[i].split(layer.post_attention_layernorm(hidden))
            hidden = hidden + self.down[i](layer.mlp.act_fn(gate) * up)
        return self.head(text.norm(hidden))[:, -1].float()


def _processors(policy: Policy, config: RolloutConfig) -> LogitsProcessorList:
    """What ``generate`` applies for :func:`~mg3d.generation.sampling._generation_kwargs`, in its order."""
    processors = LogitsProcessorList()
    if config.suppress_vision_tokens:
        suppressed = [policy.image_token_id, policy.video_token_id]
        processors.append(SuppressTokensLogitsProcessor(suppressed, device=policy.model.device))
    if config.do_sample and config.sampler == "inverse_cdf":
        processors.extend(inverse_cdf_processors(config.temperature, config.top_k, config.top_p))
    elif config.do_sample:
        processors.extend(sampling_warpers(config.temperature, config.top_k, config.top_p))
    return processors


def _stopping(policy: Policy, config: RolloutConfig) -> StoppingCriteriaList:
    criteria = StoppingCriteriaList([EosTokenCriteria(eos_token_id=policy.eos_token_ids)])
    if config.stop_strings:
        criteria.append(
            StopStringCriteria(tokenizer=policy.tokenizer, stop_strings=list(config.stop_strings))
        )
    return criteria


@torch.no_grad()
def decode_shared(
    policy: Policy, inputs: dict[str, torch.Tensor], positions: torch.Tensor, config: RolloutConfig
) -> torch.Tensor:
    """Completion ids (B·G, ≤ max_new_tokens), pad id after a row finished, as ``generate`` returns them.

    ``inputs``: checked, left-padded prompt inputs; ``positions``: their rotary positions (3, B, L). The prompt
    minus its last token is prefilled once (vision encoder included); decoding starts by feeding the last
    prompt token, as ``generate`` does after a prefilled cache.
    """
    check_lean_decoding(policy)
    model = policy.model
    g, steps = config.num_generations, config.max_new_tokens
    prompt_cache = prefill_shared(policy, inputs, positions, 1)
    attention = _SharedPrefixAttention(prompt_cache, inputs["attention_mask"][:, :-1], g, steps)
    ids = inputs["input_ids"].repeat_interleave(g, dim=0)
    length = ids.shape[1]
    sequences = torch.cat([ids, ids.new_full((ids.shape[0], steps), policy.pad_token_id)], dim=1)
    start = positions[..., -1:].repeat_interleave(g, dim=1)  # (3, N, 1): then one more per step
    offsets = torch.arange(steps, device=start.device)
    processors, stopping = _processors(policy, config), _stopping(policy, config)
    sample = config.do_sample and config.sampler == "multinomial"
    unfinished = torch.ones(ids.shape[0], dtype=torch.long, device=ids.device)
    weights = _DecoderWeights(model, ids.shape[0])
    rotary = weights.rotary_tables(start + offsets)
    tokens = ids[:, -1]
    for step in range(steps):
        logits = weights.step_logits(attention, tokens, rotary, step)
        scores = processors(sequences[:, : length + step], logits)
        if sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        tokens = tokens * unfinished + policy.pad_token_id * (1 - unfinished)
        sequences[:, length + step] = tokens
        unfinished = unfinished & ~stopping(sequences[:, : length + step + 1], None)
        if not bool(unfinished.any()):
            return sequences[:, length : length + step + 1]
    return sequences[:, length:]
