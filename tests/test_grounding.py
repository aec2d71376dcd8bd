"""The prompt/answer seam: a target answer written by the prompter decodes back to the ground-truth box."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mg3d.boxes import pair_iou
from mg3d.errors import ConfigError, DataError
from mg3d.frames import CoordinateFrame, resize_step
from mg3d.grounding import GroundingPrompter, PromptConfig
from mg3d.grpo.schedule import PhaseSchedule
from mg3d.model import build_tiny_policy
from mg3d.sft import answer_rollout, sft_loss


@pytest.fixture(scope="module")
def policy():
    return build_tiny_policy(extra_tokens=("<answer>", "</answer>"), seed=0)


def _volume_sample(sid: str, box: list[float]) -> dict:
    # Original voxel grid 64×64×16, the pipeline resized it to 56×56×16.
    frame = CoordinateFrame((64, 64, 16)).then(resize_step((64, 64, 16), (56, 56, 16)))
    image = torch.rand(1, 56, 56, 16)
    return {
        "id": sid,
        "text": "the lesion",
        "image": image,
        "frame": frame,
        "boxes": np.asarray([box]),
        "spacing": None,
    }


def _image_sample(sid: str, box: list[float]) -> dict:
    frame = CoordinateFrame((112, 84))
    return {"id": sid, "text": "the left lung opacity", "image": torch.rand(1, 112, 84), "frame": frame,
            "boxes": np.asarray([box])}  # fmt: skip


@pytest.mark.parametrize("template", ["terse", "plain", "r1", "chain_of_box"])
def test_answer_decodes_to_ground_truth(policy, template):
    prompter = GroundingPrompter(policy, template=template, system_prompt="")
    samples = [_volume_sample("a", [8, 16, 2, 40, 48, 10]), _image_sample("b", [10, 20, 60, 70])]
    batch = prompter.build(samples)
    assert batch.inputs["input_ids"].shape[0] == 2
    assert "pixel_values_videos" in batch.inputs and "pixel_values" in batch.inputs
    completions = (
        batch.answers if template in ("terse", "plain") else [f"<think>ok</think>{a}" for a in batch.answers]
    )
    read = prompter.read(completions, batch, [0, 1])
    for a, gt, frame in zip(read, batch.gt_boxes, batch.voxel_to_text):
        assert a.ok, a.parsed
        # the codec rounds to the integer text grid: within half a text unit of the truth, per edge
        tol = np.tile(frame.text_scale(), 2) / 2 + 1e-6
        assert np.all(np.abs(a.box_source - gt[0]) <= tol)
        assert pair_iou(a.box_source[None], gt[:1])[0] > 0.8


def test_failed_parse_scores_zero(policy):
    prompter = GroundingPrompter(policy, template="terse", system_prompt="")
    batch = prompter.build([_volume_sample("a", [8, 16, 2, 40, 48, 10])])
    read = prompter.read(["no box here", "<answer>[1,2,3]</answer>"], batch, [0, 0])
    assert not read[0].ok and not read[1].ok
    assert read[0].box_source is None and read[1].box_text is None


def test_bad_sample_names_the_record(policy):
    prompter = GroundingPrompter(policy, template="terse")
    bad = _volume_sample("case-17", [8, 16, 2, 40, 48, 10])
    bad["boxes"] = np.asarray([[8, 16, 2, 4, 48, 10]])
    with pytest.raises(DataError, match="case-17"):
        prompter.build([bad])


def test_subset_keeps_rows_aligned(policy):
    prompter = GroundingPrompter(policy, template="terse", system_prompt="")
    samples = [_volume_sample(str(i), [4 + i, 16, 2, 40, 48, 10]) for i in range(3)]
    batch = prompter.build(samples)
    sub = prompter.subset(batch, [2, 0])
    assert sub.ids == ["2", "0"]
    np.testing.assert_array_equal(sub.gt_boxes[0], batch.gt_boxes[2])
    full = prompter.build([samples[2], samples[0]])
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw"):
        torch.testing.assert_close(sub.inputs[key], full.inputs[key])


def test_sft_loss_is_answer_nll_and_trains(policy):
    prompter = GroundingPrompter(policy, template="terse", system_prompt="")
    batch = prompter.build([_volume_sample("a", [8, 16, 2, 40, 48, 10])])
    target = answer_rollout(policy, batch)
    assert (
        target.completion_mask.sum()
        == len(policy.tokenizer(batch.answers[0], add_special_tokens=False)["input_ids"]) + 1
    )
    model = policy.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first, _ = sft_loss(policy, batch)
    # random init: about log(vocab) nats per answer token
    assert 3.0 < float(first.detach()) < 8.0
    for _ in range(5):
        loss, _ = sft_loss(policy, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last, metrics = sft_loss(policy, batch)
    assert float(last.detach()) < float(first.detach()) - 0.5
    assert metrics["answer_tokens"] == float(target.completion_mask.sum())


def test_phase_schedule_values():
    s = PhaseSchedule(warm_steps=10, warm_lr_scale=10.0, warmup_steps=2, schedule="linear", total_steps=22)
    assert s(0) == 10.0 and s(9) == 10.0
    assert s(10) == pytest.approx(0.5) and s(11) == pytest.approx(1.0)
    assert s(12) == pytest.approx(1.0) and s(17) == pytest.approx(0.5) and s(22) == pytest.approx(0.0)
    cos = PhaseSchedule(schedule="cosine", total_steps=4)
    assert cos(2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="max_steps"):
        PhaseSchedule(schedule="linear", total_steps=None)
    # max_steps == warm_start.steps: a supervised-only run (pretraining); fewer steps than the warm start: refused
    sft_only = PhaseSchedule(warm_steps=4, warm_lr_scale=10.0, warm_schedule="cosine", total_steps=4)
    assert sft_only(0) == pytest.approx(10.0) and sft_only(2) == pytest.approx(5.0)
    with pytest.raises(ValueError, match=r"ends before warm_start\.steps=4"):
        PhaseSchedule(warm_steps=4, total_steps=3)


def test_terse_instruction_keeps_the_template_answer_format(policy):
    samples = [_volume_sample("a", [8, 16, 2, 40, 48, 10]), _image_sample("b", [10, 20, 60, 70])]
    full = GroundingPrompter(policy, template="chain_of_box", system_prompt="").build(samples)
    terse = GroundingPrompter(policy, template="chain_of_box", system_prompt="", instruction="terse").build(
        samples
    )
    for prompt in terse.prompts:
        assert "each time you name a region of interest" not in prompt and "<think>" not in prompt
    assert terse.prompts[0].endswith("Find the lesion.<|im_end|>\n<|im_start|>assistant\n")
    assert terse.prompts[1].endswith("Find the left lung opacity.<|im_end|>\n<|im_start|>assistant\n")
    assert "each time you name a region of interest" in full.prompts[1]
    # the byte-level tiny tokenizer: the Chain-of-Box instruction is hundreds of tokens, the terse one a few
    assert full.inputs["input_ids"].shape[1] - terse.inputs["input_ids"].shape[1] > 400
    # same target answers: <think>…</think> then the JSON answer, as the strict format rule wants
    assert (
        terse.answers
        == full.answers
        == [
            '<think></think><answer>{"bbox_3d": [7, 14, 2, 35, 42, 10]}</answer>',
            '<think></think><answer>{"bbox_2d": [10, 20, 60, 70]}</answer>',
        ]
    )


def test_coarse_box_trail_by_hand(policy):
    # text boxes [7, 14, 2, 35, 42, 10] (64 → 56 voxels: × 7/8) and [10, 20, 60, 70] (identity frame);
    # widened to the 8 × 8 × 4 grid: x 7 → 0, 35 → 40; y 14 → 8, 42 → 48; z 2 → 0, 10 → 12 and
    # 2D x 10 → 8, 60 → 64; y 20 → 16, 70 → 72 (2D uses the first two sizes of trail_grid)
    prompter = GroundingPrompter(policy, template="chain_of_box", warm_start_reasoning="coarse_box")
    batch = prompter.build(
        [_volume_sample("a", [8, 16, 2, 40, 48, 10]), _image_sample("b", [10, 20, 60, 70])]
    )
    assert batch.answers == [
        '<think>the lesion [0, 8, 0, 40, 48, 12]</think><answer>{"bbox_3d": [7, 14, 2, 35, 42, 10]}</answer>',
        '<think>the lesion [8, 16, 64, 72]</think><answer>{"bbox_2d": [10, 20, 60, 70]}</answer>',
    ]
    # a coarser grid, and the 2D far border: y 70 → 84 (not 96: the 112 × 84 grid ends there)
    coarse = GroundingPrompter(
        policy, template="chain_of_box", warm_start_reasoning="coarse_box", trail_grid=(32, 28)
    )
    assert coarse.build([_image_sample("b", [10, 20, 60, 70])]).answers == [
        '<think>the lesion [0, 0, 64, 84]</think><answer>{"bbox_2d": [10, 20, 60, 70]}</answer>'
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"instruction": "full"}, "instruction"),
        ({"warm_start_reasoning": "boxes"}, "warm_start_reasoning"),
        ({"trail_grid": (8,)}, "trail_grid"),
        ({"trail_grid": (8, 0, 4)}, "trail_grid"),
        ({"trail_grid": (8.5, 8)}, "trail_grid"),
    ],
)
def test_bad_chain_of_box_settings_are_refused(policy, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GroundingPrompter(policy, template="chain_of_box", **kwargs)


def test_prompter_settings_are_prompt_config_fields(policy):
    """One home for prompt settings: keyword settings go through PromptConfig (its checks, its normalising)."""
    prompter = GroundingPrompter(policy, template="chain_of_box", trail_grid=(8.0, "8"))
    assert prompter.config == PromptConfig(template="chain_of_box", trail_grid=(8, 8))
    with pytest.raises(ConfigError, match="PromptConfig fields"):
        GroundingPrompter(policy, templat="r1")
