"""Benchmark the rewards: 3D IoU throughput, spatial and semantic reward cost per completion, one GRPO step.

Run by hand (one thread: on a shared 2-core machine more threads oversubscribe and slow torch down 10×):

    OMP_NUM_THREADS=1 .venv/bin/python bench/rewards.py            # tables (≈ 1 min)
    OMP_NUM_THREADS=1 .venv/bin/python bench/rewards.py --study 200  # + the phantom property study (≈ 3 min)
    (per source and pipeline, real CT/MR included: bench/semantic_property.py)

Prints markdown tables and the command that produced them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mg3d.boxes import iou_matrix, pair_iou
from mg3d.rewards import RewardSet, RewardTarget, SemanticReward
from mg3d.studies import phantom_property_study


def _best_of(fn: Callable[[], Any], repeats: int = 5) -> float:
    """Minimum wall time of ``repeats`` calls after one warm-up (seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _random_boxes(rng: np.random.Generator, n: int, ndim: int = 3) -> np.ndarray:
    lo = rng.uniform(0, 100, (n, ndim))
    return np.concatenate([lo, lo + rng.uniform(1, 40, (n, ndim))], axis=1)


def bench_iou(n_pairs: int = 1_000_000) -> list[tuple[str, str]]:
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, n_pairs), _random_boxes(rng, n_pairs)
    t_pair = _best_of(lambda: pair_iou(a, b))
    side = int(np.sqrt(n_pairs))
    t_matrix = _best_of(lambda: iou_matrix(a[:side], b[:side]), repeats=3)
    return [
        (f"3D IoU, paired (`boxes.pair_iou`, {n_pairs:,} pairs)", f"{n_pairs / t_pair / 1e6:.1f} M pairs/s"),
        (
            f"3D IoU, all pairs (MONAI `box_iou`, {side}×{side})",
            f"{side * side / t_matrix / 1e6:.1f} M pairs/s",
        ),
    ]


def _ct_targets(n_records: int) -> list[RewardTarget]:
    from mg3d.data.synthetic import generate_ct_case

    targets = []
    for i, child in enumerate(np.random.SeedSequence(7).spawn(n_records)):
        phantom = generate_ct_case(np.random.default_rng(child), min_lesions=2, max_lesions=3)
        region = phantom.regions[0]
        targets.append(
            RewardTarget(
                f"bench/{i}",
                boxes=[region.box_voxel],
                image=phantom.volume.astype(np.float32),
                affine=phantom.affine,
                phrase=region.phrase,
                unit="HU",
            )
        )
    return targets


def _completions(
    targets: list[RewardTarget], group: int, rng: np.random.Generator
) -> tuple[list[str], list[RewardTarget]]:
    texts, rows = [], []
    for t in targets:
        shape = np.asarray(t.image.shape)
        for _ in range(group):
            box = _random_boxes(rng, 1)[0] * np.tile(shape / 140.0, 2)
            ints = [int(v) for v in np.round(box)]
            ints[3:] = [max(h, lo + 1) for h, lo in zip(ints[3:], ints[:3])]
            texts.append(f'<think>looking</think><answer>{{"bbox_3d": {ints}}}</answer>')
            rows.append(t)
    return texts, rows


def bench_rewards(n_records: int = 4, group: int = 8) -> list[tuple[str, str]]:
    rng = np.random.default_rng(1)
    targets = _ct_targets(n_records)
    texts, rows = _completions(targets, group, rng)
    n = len(texts)
    spatial = RewardSet.from_config(
        {"format": 1.0, "iou_binary": 1.0, "iou": 1.0, "giou": 1.0, "center_distance": 1.0}
    )
    t_spatial = _best_of(lambda: spatial(texts, rows))
    out = [
        (
            f"parse + format + 4 spatial rewards ({n} 3D completions)",
            f"{t_spatial / n * 1e3:.3f} ms/completion",
        )
    ]
    for label, make in (
        ("semantic (radiomics)", lambda: SemanticReward()),
        ("semantic (radiomics, misses only)", lambda: SemanticReward(mode="misses")),
    ):
        reward = make()
        start = time.perf_counter()
        reward(texts, rows)
        cold = time.perf_counter() - start
        warm = _best_of(lambda r=reward: r(texts, rows), repeats=3)
        out.append(
            (
                f"{label}, first batch (stats + references, {n_records} records)",
                f"{cold / n * 1e3:.1f} ms/completion",
            )
        )
        out.append((f"{label}, cached records", f"{warm / n * 1e3:.1f} ms/completion"))
    return out


def bench_policy_encoder(group: int = 8) -> list[tuple[str, str]]:
    from mg3d.model import build_tiny_policy
    from mg3d.rewards.encoders import PolicyVisionEncoder

    targets = _ct_targets(1)
    texts, rows = _completions(targets, group, np.random.default_rng(2))
    reward = SemanticReward(encoder=PolicyVisionEncoder(build_tiny_policy(seed=0)), n_reference=8)
    reward(texts, rows)
    warm = _best_of(lambda: reward(texts, rows), repeats=3)
    return [
        (
            "semantic (tiny policy vision tower, 56×56×8 crops), cached",
            f"{warm / len(texts) * 1e3:.1f} ms/completion",
        )
    ]


def bench_grpo_step() -> list[tuple[str, str]]:
    """One TRL GRPOTrainer step (tiny policy, 2D 112×84 images, 4 prompts × 4 completions, 24 new tokens)."""
    from datasets import Dataset
    from PIL import Image
    from trl import GRPOConfig, GRPOTrainer

    from mg3d.model import build_tiny_policy
    from mg3d.prompts import build_messages
    from mg3d.rewards.trl_adapter import trl_reward_functions
    from mg3d.trl_processor import trl_image_processor

    policy = build_tiny_policy(seed=0)
    processor = trl_image_processor(policy)
    rows = []
    for i in range(8):
        img = np.full((84, 112), 40, np.uint8)
        img[30:50, 20 + 5 * i : 45 + 5 * i] = 200
        rows.append({"prompt": build_messages(f"square {i}", 2), "image": Image.fromarray(img).convert("RGB"),
                     "boxes": [[20 + 5 * i, 30, 45 + 5 * i, 50]], "id": f"sq/{i}", "text": f"square {i}"})  # fmt: skip
    out = []
    for label, spec in (
        ("format + IoU", {"format": 1.0, "iou_binary": 1.0}),
        ("format + IoU + semantic", {"format": 1.0, "iou_binary": 1.0, "semantic": 1.0}),
    ):
        funcs, weights = trl_reward_functions(RewardSet.from_config(spec), image_processor=policy.processor)
        with tempfile.TemporaryDirectory() as tmp:
            config = GRPOConfig(output_dir=tmp, per_device_train_batch_size=4, num_generations=4, max_completion_length=24,
                                max_steps=2, use_cpu=True, report_to=[], save_strategy="no", reward_weights=weights,
                                logging_steps=1, seed=0)  # fmt: skip
            trainer = GRPOTrainer(model=policy.model, processing_class=processor, reward_funcs=funcs, args=config,
                                  train_dataset=Dataset.from_list(rows))  # fmt: skip
            trainer.train()
        steps = [float(h["step_time"]) for h in trainer.state.log_history if "step_time" in h]
        out.append((f"TRL GRPO step, tiny policy, 16 completions, {label}", f"{min(steps):.2f} s/step"))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--records", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--no-step", action="store_true", help="skip the TRL GRPO step timing")
    parser.add_argument(
        "--study", type=int, default=0, help="also run the semantic property study on N phantoms"
    )
    args = parser.parse_args(argv)

    rows = bench_iou(args.pairs) + bench_rewards(args.records, args.group) + bench_policy_encoder(args.group)
    if not args.no_step:
        rows += bench_grpo_step()
    print(
        f"`OMP_NUM_THREADS={torch.get_num_threads()} python bench/rewards.py {shlex.join(argv or sys.argv[1:])}`\n"
    )
    print("| measurement | result |")
    print("| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if args.study:
        start = time.perf_counter()
        study = phantom_property_study(n_cases=args.study, seed=0)
        print(f"\nSemantic property study (offline radiomics encoder, seed 0, {time.perf_counter() - start:.0f} s, "
              f"{study.skipped} cases skipped):\n")  # fmt: skip
        print(study.table())


if __name__ == "__main__":
    main()
