"""Benchmark: shared-prefill rollout vs ``generate(num_return_sequences=G)`` on a volume prompt.

Run by hand (not in the test suite), alone on the machine for clean numbers::

    .venv/bin/python bench/rollout.py --tokens 250,500,1000,2000 --generations 8 --threads 2

Each prompt is one video (a volume, depth as time) of N vision tokens on the tiny default policy; the
pixels are random (the speed does not depend on them). For every N it times three sampling paths with
the same seed (so the same tokens): transformers' ``num_return_sequences`` (vision encoded once, language
model prefilled G times), the shared prefill with a dynamic cache (isolates the prefill saving), and the
shared prefill with the default static cache. With ``--logprobs`` it also times the training
forward+backward of ``completion_logprobs`` (shared vs repeated prompt). Medians of ``--runs`` runs after
``--warmup`` untimed ones; the paths alternate run by run and speed-ups are medians of per-run ratios, so
load from other processes hits all paths alike. Prints a markdown table and the exact command.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch

from mg3d.generation import RolloutConfig, completion_logprobs, generate_completions
from mg3d.model import Policy, build_tiny_policy


def video_prompt(
    policy: Policy, num_tokens: int, side_tokens: int, batch: int, seed: int
) -> dict[str, torch.Tensor]:
    """A left-padded batch of chat prompts, each holding one video of ``num_tokens`` merged vision tokens."""
    m = policy.merge_size
    per_frame = side_tokens * side_tokens
    if num_tokens % per_frame:
        raise SystemExit(f"--tokens {num_tokens} must be a multiple of side_tokens² = {per_frame}")
    grid = [num_tokens // per_frame, side_tokens * m, side_tokens * m]
    patch_dim = 3 * policy.temporal_patch_size * policy.patch_size**2
    rows = grid[0] * grid[1] * grid[2]
    tok = policy.tokenizer
    head = tok("<|im_start|>user\n").input_ids
    tail = tok("Find the lesion. Answer with a 3D box.<|im_end|>\n<|im_start|>assistant\n").input_ids
    span = policy.vision_span(grid, "video")
    ids = head + span.token_ids + tail
    types = [0] * len(head) + span.mm_token_type_ids + [0] * len(tail)
    gen = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.tensor([ids] * batch),
        "attention_mask": torch.ones(batch, len(ids), dtype=torch.long),
        "mm_token_type_ids": torch.tensor([types] * batch),
        "pixel_values_videos": torch.randn(batch * rows, patch_dim, generator=gen),
        "video_grid_thw": torch.tensor([grid] * batch),
    }


def alternating_medians(fns: list[Callable[[], object]], runs: int, warmup: int) -> list[list[float]]:
    """Seconds per run of each function; the functions alternate run by run, so a load change on a shared
    machine hits all of them alike (speed-ups are then taken as medians of per-run ratios)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return times


def ratio(baseline: list[float], other: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(baseline, other))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokens", default="250,500,1000,2000", help="vision tokens per prompt, comma-separated"
    )
    parser.add_argument(
        "--side-tokens", type=int, default=5, help="merged tokens per slice side (5 → 140 px)"
    )
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1, help="prompts per rollout")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (2 only when nothing else runs)"
    )
    parser.add_argument("--family", default="qwen2.5-vl", choices=["qwen2.5-vl", "qwen2-vl"])
    parser.add_argument(
        "--logprobs", action="store_true", help="also time completion_logprobs forward+backward"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    policy = build_tiny_policy(family=args.family)
    g = args.generations
    header = (
        "| vision tokens | prompt len | naive `num_return_sequences` (s) | shared, dynamic cache (s) | speed-up "
        "| shared, static cache (s) | speed-up |"
    )
    sep = "|---|---|---|---|---|---|---|"
    if args.logprobs:
        header += " logprobs fwd+bwd naive (s) | shared (s) | speed-up |"
        sep += "---|---|---|"
    rows = []
    for n in (int(x) for x in args.tokens.split(",")):
        inputs = video_prompt(policy, n, args.side_tokens, args.batch, seed=n)
        base = RolloutConfig(
            num_generations=g, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=1.0, seed=0
        )
        configs = [
            RolloutConfig(**{**base.__dict__, "share_prompt": False}),
            RolloutConfig(**{**base.__dict__, "cache_implementation": "dynamic"}),
            base,
        ]
        policy.model.eval()
        naive, dynamic, static = alternating_medians(
            [lambda c=c, i=inputs: generate_completions(policy, i, c) for c in configs],
            args.runs,
            args.warmup,
        )
        med = statistics.median
        row = (
            f"| {n} | {inputs['input_ids'].shape[1]} | {med(naive):.3f} | {med(dynamic):.3f} "
            f"| {ratio(naive, dynamic):.2f}× | {med(static):.3f} | {ratio(naive, static):.2f}× |"
        )
        if args.logprobs:
            rollout = generate_completions(policy, inputs, base)
            policy.model.train()

            def step(share: bool, i: dict[str, torch.Tensor] = inputs, r: object = rollout) -> None:
                policy.model.zero_grad(set_to_none=True)
                lp = completion_logprobs(policy, i, r, 1.0, share_prompt=share)  # type: ignore[arg-type]
                lp.sum().backward()

            l_naive, l_shared = alternating_medians(
                [lambda: step(False), lambda: step(True)], args.runs, args.warmup
            )
            policy.model.eval()
            row += f" {med(l_naive):.3f} | {med(l_shared):.3f} | {ratio(l_naive, l_shared):.2f}× |"
        rows.append(row)
        print(row, flush=True)
    print()
    print(
        f"tiny {args.family} policy ({sum(p.numel() for p in policy.model.parameters()) / 1e6:.2f} M params), "
        f"batch {args.batch} prompt(s) × G = {g}, {args.max_new_tokens} new tokens (sampling, T = 1), "
        f"torch {torch.__version__}, {args.threads} thread(s), median of {args.runs} alternating runs after "
        f"{args.warmup} warm-up; speed-up = median of the per-run ratios"
    )
    print()
    print(header)
    print(sep)
    print("\n".join(rows))
    print()
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))


if __name__ == "__main__":
    main()
