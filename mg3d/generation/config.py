"""Sampling settings of a rollout: how many completions, how long, how random, where they stop.

A policy-level concept: GRPO rollouts, the supervised warm start's bookkeeping, held-out evaluation and
inference (``Grounder``, MONAI bundles) all generate with a :class:`RolloutConfig`. The class keeps its name
and fields from when it lived in ``mg3d.grpo.rollout`` (checkpoints written then still load: see
``mg3d.checkpointing.MOVED_CLASSES``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mg3d.errors import ConfigError

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "RolloutConfig", "check_stop_strings"]

#: Generation budget of evaluation and inference when nothing else says.
DEFAULT_MAX_NEW_TOKENS = 48


@dataclass
class RolloutConfig:
    """Sampling settings of one rollout. ``top_k=0`` and ``top_p=1.0`` switch those filters off."""

    num_generations: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    seed: int | None = None
    share_prompt: bool = True
    #: Shared path only: ``"static"`` writes the expanded prompt cache into a preallocated ``StaticCache``, so
    #: each decoding step writes one token in place instead of re-concatenating the whole G-times expanded
    #: prompt cache (``"dynamic"``, transformers' default). Same tokens; about half the decoding time for
    #: prompts of a few thousand tokens on CPU.
    cache_implementation: str = "static"
    #: Shared path with the static cache only: decode through transformers' ``torch.compile``d forward
    #: (``GenerationConfig.compile_config``; inductor on CPU). The same maths (the same tokens in the tests;
    #: inductor's fused kernels round differently, so a rare near-tie can go the other way). It pays only where
    #: shapes repeat: each new prompt length or batch size compiles again (tens of seconds on CPU, a second time
    #: with dynamic shapes, then none); measured on the tiny CPU policy: 5 - 20 % off the generation phase
    #: (docs/benchmarks.md, "One GRPO optimiser step"). Off by default.
    compile: bool = False
    #: How a sampled token is drawn from the processed distribution. ``"multinomial"``: transformers' own
    #: ``torch.multinomial`` (one exponential random number per vocabulary entry and row at every step: on CPU,
    #: most of a rollout at Qwen's 151,936-row vocabulary). ``"inverse_cdf"``: the same distribution from one
    #: uniform number per row (:mod:`mg3d.generation.inverse_cdf`), a different random stream, so other
    #: completions for a given seed. Greedy decoding ignores it.
    sampler: str = "multinomial"
    #: Shared path only: who runs the decoding loop. ``"transformers"``: ``model.generate`` over the G-times
    #: expanded prompt cache. ``"lean"``: mg3d's loop (:mod:`mg3d.generation.decoding`), Qwen2/2.5-VL on CPU:
    #: each prompt's keys/values kept once and attended by all G rows as one query block (cascade attention),
    #: the projections fused and packed once per rollout; transformers' processors, warpers, stopping criteria
    #: and draw. The same maths, rounded differently: the same completions in the tests and in every sampled
    #: token of ``make demo``'s three seeds; with ``sampler: inverse_cdf`` about 1 row in 200 differs at a
    #: cumulative boundary. Not under autocast. Measured in docs/benchmarks.md ("One GRPO optimiser step").
    decoder: str = "transformers"
    #: Never sample image/video placeholder ids (as TRL does): a completion holding one would break the
    #: placeholder/feature count check in the training forward.
    suppress_vision_tokens: bool = True
    #: Generation of a completion also ends right after any of these strings (e.g. ``"</answer>"``), as
    #: vLLM's ``stop``: whatever a policy would write after its answer is then never sampled, scored or
    #: trained, and the completion counts as finished (not truncated) without an EOS token. Without it a
    #: policy whose end-of-answer EOS drifts under GRPO runs on to ``max_new_tokens`` (docs/benchmarks.md).
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.num_generations < 1:
            raise ConfigError(f"num_generations must be >= 1, got {self.num_generations}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        self.stop_strings = check_stop_strings(self.stop_strings)
        if self.sampler not in ("multinomial", "inverse_cdf"):
            raise ConfigError(f"sampler must be 'multinomial' or 'inverse_cdf', got {self.sampler!r}")
        if self.decoder not in ("transformers", "lean"):
            raise ConfigError(f"decoder must be 'transformers' or 'lean', got {self.decoder!r}")
        if self.decoder == "lean" and not self.share_prompt:
            raise ConfigError(
                "decoder='lean' decodes over a shared prompt prefill; it needs share_prompt=true"
            )
        if self.decoder == "lean" and self.compile:
            raise ConfigError(
                "compile=true compiles transformers' decoding; it does not apply to decoder='lean'"
            )
        if self.cache_implementation not in ("static", "dynamic"):
            raise ConfigError(
                f"cache_implementation must be 'static' or 'dynamic', got {self.cache_implementation!r}"
            )

    @classmethod
    def one_per_prompt(
        cls,
        max_new_tokens: int,
        *,
        sampled: bool = False,
        temperature: float = 1.0,
        stop_strings: Sequence[str] = (),
    ) -> RolloutConfig:
        """One completion per prompt, greedy or one unfiltered sample at ``temperature``: how held-out
        evaluation (``GRPOModule.predict_samples``) and inference (``Grounder``) generate, so they agree."""
        return cls(
            num_generations=1,
            max_new_tokens=max_new_tokens,
            temperature=temperature if sampled else 1.0,
            do_sample=sampled,
            top_k=0,
            top_p=1.0,
            share_prompt=False,
            stop_strings=tuple(stop_strings),
        )


def check_stop_strings(stop_strings: str | Sequence[str]) -> tuple[str, ...]:
    """Stop strings as a tuple (one string from YAML / the command line is one stop); empty ones refused."""
    stops = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings)
    if any(not isinstance(stop, str) or not stop for stop in stops):
        raise ConfigError(f"stop_strings must be non-empty strings, got {stops!r}")
    return stops
