"""Generation: what a policy writes and how likely it was — sampling with a shared prompt prefill, stop
strings, and completion log-probabilities.

A policy-level package: GRPO (training), the supervised warm start, held-out evaluation and inference
(``Grounder``, bundles) all use it; it imports nothing above the policy (``mg3d.model``).
"""

from mg3d.generation.config import DEFAULT_MAX_NEW_TOKENS, RolloutConfig, check_stop_strings
from mg3d.generation.inputs import prompt_positions, replicate_prompt_inputs
from mg3d.generation.logprobs import completion_logprobs
from mg3d.generation.sampling import (
    HFRolloutBackend,
    Rollout,
    RolloutBackend,
    cut_at_stop_strings,
    generate_completions,
    make_generator,
)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "HFRolloutBackend",
    "Rollout",
    "RolloutBackend",
    "RolloutConfig",
    "check_stop_strings",
    "completion_logprobs",
    "cut_at_stop_strings",
    "generate_completions",
    "make_generator",
    "prompt_positions",
    "replicate_prompt_inputs",
]
