"""mg3d rewards as TRL reward functions: the adapter by hand, then inside a real trl==1.16.0 GRPOTrainer step."""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mg3d.errors import DataError
from mg3d.frames import CoordinateFrame, resize_step
from mg3d.rewards import IoUReward, RewardSet
from mg3d.rewards.trl_adapter import (
    TRLReward,
    image_to_voxel_array,
    qwen_image_frame,
    target_from_row,
    trl_reward_functions,
)


def msg(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224, patch_size=14, merge_size=2)


def test_pil_image_is_transposed_to_the_voxel_frame() -> None:
    arr = np.zeros((20, 30), np.uint8)  # 20 rows (y) × 30 columns (x)
    arr[2, 7] = 255  # row 2, column 7
    vox = image_to_voxel_array(Image.fromarray(arr))
    assert vox.shape == (30, 20) and vox[7, 2] == 255.0
    with pytest.raises(DataError):
        image_to_voxel_array("/some/path.png")


def test_qwen_image_frame_matches_smart_resize(image_processor) -> None:
    # 300 × 200 has 60 000 px > 224² = 50 176: β = √(60000 / 50176); h = ⌊200/β/28⌋·28 = 168, w = ⌊300/β/28⌋·28 = 252
    frame = qwen_image_frame(300, 200, image_processor)
    assert frame.source_shape == (300, 200) and frame.shape == (252, 168)
    np.testing.assert_allclose(frame.to_text([[25, 25, 100, 50]]), [[21, 21, 84, 42]])


def test_trl_reward_functions_on_columns(image_processor) -> None:
    img = Image.fromarray(np.zeros((200, 300), np.uint8))
    n = 4
    kwargs = {
        "id": ["a/1"] * n,
        "boxes": [[[25, 25, 100, 50]]] * n,
        "image": [img] * n,
        "text": ["the region"] * n,
        "trainer_state": object(),  # TRL extras are ignored
    }
    completions = [
        msg('<think>ok</think><answer>{"bbox_2d": [21, 21, 84, 42]}</answer>'),  # exact after the resize
        msg(
            '<think>see [0, 0, 84, 42]</think><answer>{"bbox_2d": [21, 21, 84, 63]}</answer>'
        ),  # twice as tall: IoU 1/2
        msg("garbage"),
        [{"role": "assistant", "content": [{"type": "text", "text": "<answer>[0, 0, 10, 10]</answer>"}]}],
    ]
    funcs, weights = trl_reward_functions(
        RewardSet.from_config({"iou": 2.0, "chain_of_box": 1.0}), image_processor=image_processor
    )
    assert [f.__name__ for f in funcs] == ["iou", "chain_of_box"] and weights == [2.0, 1.0]
    iou = funcs[0](prompts=[None] * n, completions=completions, completion_ids=[[0]] * n, **kwargs)
    assert iou == pytest.approx([1.0, 0.5, 0.0, 0.0])
    batch = funcs[0].cache.batch
    cob = funcs[1](prompts=[None] * n, completions=completions, **kwargs)
    assert funcs[1].cache.batch is batch  # one parse for both functions
    assert cob[0] is None and cob[2] is None and cob[3] is None  # NaN (no think box) → None
    # think box [0, 0, 84, 42] grown 10 % holds the answer's part [21, 21, 84, 46.2] of [21, 21, 84, 63]: 25.2/42
    assert cob[1] == pytest.approx(0.5 + 0.5 * (46.2 - 21) / 42)
    assert len({id(t) for t in batch.targets}) == 1  # identical rows share one target


def test_target_from_row_with_frame_column() -> None:
    frame = CoordinateFrame((100, 80)).then(resize_step((100, 80), (50, 40)))
    row = {
        "id": "r",
        "boxes": [[10, 20, 30, 40]],
        "frame": json.dumps(frame.to_dict()),
        "spacing": [0.5, 0.5],
    }
    target = target_from_row(row)
    assert target.frame == frame and target.spacing == (0.5, 0.5) and target.image is None
    reward = TRLReward(IoUReward())
    assert reward(completions=["<answer>[5, 10, 15, 20]</answer>"], **{k: [v] for k, v in row.items()}) == [
        1.0
    ]
    with pytest.raises(DataError, match="boxes"):
        target_from_row({"id": "x"})


@pytest.mark.slow
def test_inside_a_real_grpo_trainer_step(tmp_path: Path) -> None:
    """One GRPOTrainer step on 2D images with the tiny policy; logged reward columns equal mg3d's own."""
    import pandas as pd
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from mg3d.model import build_tiny_policy
    from mg3d.prompts import build_messages
    from mg3d.trl_processor import trl_image_processor

    policy = build_tiny_policy(seed=0)
    processor = trl_image_processor(policy)
    rows = []
    for i in range(4):
        img = np.full((84, 112), 40, np.uint8)
        x0 = 20 + 10 * i
        img[30:50, x0 : x0 + 25] = 200
        phrase = f"bright square number {i}"
        rows.append(
            {
                "prompt": build_messages(phrase, 2),
                "image": Image.fromarray(img).convert("RGB"),
                "boxes": [[x0, 30, x0 + 25, 50]],
                "id": f"square/{i}",
                "text": phrase,
            }
        )
    rewards = RewardSet.from_config(
        {"format": 1.0, "iou_binary": 1.0, "iou": 0.5, "semantic": 0.5, "chain_of_box": 0.1}
    )
    funcs, weights = trl_reward_functions(rewards, image_processor=policy.processor)
    config = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=24,
        max_steps=1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        reward_weights=weights,
        logging_steps=1,
        log_completions=True,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=policy.model,
        processing_class=processor,
        reward_funcs=funcs,
        args=config,
        train_dataset=Dataset.from_list(rows),
    )
    trainer.train()
    logs = next(h for h in trainer.state.log_history if "rewards/iou/mean" in h)
    table = pd.read_parquet(sorted(glob.glob(str(tmp_path / "completions" / "*.parquet")))[-1])
    by_phrase = {r["text"]: r for r in rows}
    targets, completions = [], []
    for prompt, completion in zip(table["prompt"], table["completion"]):
        text = prompt[0]["content"][-1]["text"]
        row = next(r for p, r in by_phrase.items() if p in text)
        targets.append(target_from_row(row, image_processor=policy.processor))
        completions.append(completion)
    ours = rewards(completions, targets)
    for name in rewards.names:
        np.testing.assert_allclose(table[name].to_numpy(dtype=float), ours.columns[name], equal_nan=True)
        expected = ours.metrics()[f"rewards/{name}/mean"]
        value = logs[f"rewards/{name}/mean"]
        logged = math.nan if value is None else float(value)  # TRL logs an all-NaN mean as None
        assert (math.isnan(expected) and math.isnan(logged)) or logged == pytest.approx(expected, abs=1e-6)
