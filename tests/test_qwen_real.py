"""A real-architecture Qwen2.5-VL folder with the real tokenizer (issue 20): parity with Hugging Face's own
processing, sampling that equals the trained policy, vision and generation budgets, temporal and text-after-video
rotary positions, chat templates from ``chat_template.json``, Qwen-native answers."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mg3d.frames import CoordinateFrame
from mg3d.generation import RolloutConfig, completion_logprobs, generate_completions, prompt_positions
from mg3d.generation.rope import released_rope_index
from mg3d.generation.sampling import _generation_kwargs, only_configured_processors
from mg3d.grounding import GroundingPrompter, PromptConfig
from mg3d.model import Policy, load_policy
from mg3d.prompts import build_instruction, default_max_new_tokens, read_answer
from mg3d.testing import QWEN_FIRST_SPECIAL_ID, QWEN_VOCAB_SIZE
from mg3d.tokenization import VisionSpec, plan_video
from mg3d.trl_processor import trl_image_processor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def policy(qwen_folder: Path) -> Policy:
    return load_policy(qwen_folder, dtype="float32")


def to_unit(u8: np.ndarray) -> torch.Tensor:
    """uint8 → [0, 1] float32 exactly as transformers' rescale does it (float64 multiply, then float32)."""
    return torch.from_numpy((u8.astype(np.float64) * (1 / 255)).astype(np.float32))


def sample_2d(u8: np.ndarray, text: str, sid: str) -> dict:
    image = to_unit(u8).T[None]  # (C, X, Y): x = column, y = row
    return {"image": image, "frame": CoordinateFrame(tuple(image.shape[1:])), "text": text, "id": sid,
            "boxes": np.zeros((0, 4))}  # fmt: skip


def hf_processor(policy: Policy):
    """Hugging Face's Qwen2_5_VLProcessor (tokenizer, PIL image processor, the folder's chat template)."""
    return trl_image_processor(policy)


def hf_positions(policy: Policy, inputs: dict) -> torch.Tensor:
    kwargs = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
    pos, _ = policy.model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        attention_mask=inputs["attention_mask"], **kwargs,
    )  # fmt: skip
    return pos


def last_logits(policy: Policy, inputs: dict, positions: torch.Tensor | None) -> torch.Tensor:
    """Last-token logits of one forward; ``positions=None`` lets the model number the tokens itself."""
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
            "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")  # fmt: skip
    extra = {} if positions is None else {"position_ids": positions}
    with torch.no_grad():
        policy.model.model.rope_deltas = None  # no state left from an earlier generate
        out = policy.model.eval()(**{k: inputs[k] for k in keys if k in inputs}, **extra)
    return out.logits[:, -1]


# ---------------------------------------------------------------------------------------------------------------
# the folder and its tokenizer
# ---------------------------------------------------------------------------------------------------------------
def test_real_tokenizer_known_encodings(policy: Policy) -> None:
    tok = policy.tokenizer
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert tok("2026")["input_ids"] == [tok.convert_tokens_to_ids(d) for d in "2026"]  # one token per digit
    assert tok.convert_tokens_to_ids("<|endoftext|>") == QWEN_FIRST_SPECIAL_ID
    assert policy.vision_start_token_id == 151652 and policy.image_token_id == 151655
    assert policy.video_token_id == 151656 and policy.eos_token_ids[0] == 151645
    assert policy.model.config.text_config.vocab_size == QWEN_VOCAB_SIZE
    assert tok.decode(tok("Box [12, 345] — Lésion ✓")["input_ids"]) == "Box [12, 345] — Lésion ✓"


def test_chat_template_is_read_from_chat_template_json(qwen_folder: Path, policy: Policy) -> None:
    tokenizer_config = json.loads((qwen_folder / "tokenizer_config.json").read_text())
    assert "chat_template" not in tokenizer_config and not (qwen_folder / "chat_template.jinja").exists()
    template = json.loads((qwen_folder / "chat_template.json").read_text())["chat_template"]
    assert policy.tokenizer.chat_template == template


def test_bad_chat_template_json_names_the_file(qwen_folder: Path, tmp_path: Path) -> None:
    import shutil

    from mg3d.errors import ConfigError

    copy = tmp_path / "folder"
    shutil.copytree(qwen_folder, copy)
    (copy / "chat_template.json").write_text('{"template": 1}', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"chat_template\.json.*'chat_template' string"):
        load_policy(copy)


def test_save_and_reload_keeps_the_template(policy: Policy, tmp_path: Path) -> None:
    from mg3d.model import save_policy

    again = load_policy(save_policy(policy, tmp_path / "saved"))
    assert again.tokenizer.chat_template == policy.tokenizer.chat_template
    assert again.pixel_limits == policy.pixel_limits


def test_folder_pixel_limits_and_generation_config_are_loaded(policy: Policy) -> None:
    assert policy.pixel_limits == (56 * 56, 12845056)
    assert policy.model.generation_config.repetition_penalty == pytest.approx(1.05)
    assert VisionSpec.from_policy(policy).tokens_per_second == 2


# ---------------------------------------------------------------------------------------------------------------
# parity with Hugging Face's processing
# ---------------------------------------------------------------------------------------------------------------
def test_2d_batch_parity_with_hf_processor(policy: Policy) -> None:
    """Two images of different sizes, left-padded: prompt text, ids, pixels, grids, types, positions, logits."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in ((56, 84), (112, 56))]
    texts = ["the left lower lobe nodule", "cardiomegaly"]
    prompter = GroundingPrompter(policy, PromptConfig(template="r1"))
    batch = prompter.build([sample_2d(u8, t, f"s{i}") for i, (u8, t) in enumerate(zip(images, texts))])

    proc = hf_processor(policy)
    messages = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": build_instruction(t, 2)}]}]
        for t in texts
    ]
    hf_text = [proc.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    assert batch.prompts == hf_text
    hf = proc(text=hf_text, images=[Image.fromarray(u8) for u8 in images], padding=True,
              padding_side="left", return_tensors="pt")  # fmt: skip
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(batch.inputs[key], hf[key]), key
    ours = prompt_positions(policy, batch.inputs)
    assert torch.equal(ours, hf_positions(policy, dict(hf)))
    assert torch.allclose(
        last_logits(policy, batch.inputs, ours), last_logits(policy, dict(hf), None), atol=1e-5
    )


def test_slices_parity_with_hf_processor(policy: Policy) -> None:
    """A volume as three labelled axial slices = HF's multi-image prompt with the same images and labels."""
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, size=(56, 84, 9), dtype=np.uint8)  # (X, Y, Z) on the 28-grid: no resize
    vol = to_unit(u8)[None]
    sample = {"image": vol, "frame": CoordinateFrame((56, 84, 9)), "text": "the liver lesion", "id": "v0",
              "boxes": np.zeros((0, 6))}  # fmt: skip
    prompter = GroundingPrompter(policy, PromptConfig(template="r1", volume_strategy="slices"))
    prompter.visual_tokenizer.num_slices = 3
    batch = prompter.build([sample])
    visual = batch.visuals[0]
    assert visual.slice_indices == (1, 4, 7)
    instruction = build_instruction("the liver lesion", 3, visual="slices", slice_indices=[1, 4, 7])
    content = [*visual.content, {"type": "text", "text": "\n" + instruction}]
    messages = [{"role": "user", "content": content}]
    proc = hf_processor(policy)
    text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert batch.prompts == [text]
    slices = [Image.fromarray(np.ascontiguousarray(u8[:, :, k].T)) for k in (1, 4, 7)]  # rows = y
    hf = dict(proc(text=[text], images=slices, return_tensors="pt"))
    for key in ("input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(batch.inputs[key], hf[key]), key
    ours = prompt_positions(policy, batch.inputs)
    assert torch.equal(ours, hf_positions(policy, hf))
    assert torch.allclose(last_logits(policy, batch.inputs, ours), last_logits(policy, hf, None), atol=1e-5)


def test_video_parity_with_hf_image_processor_and_released_positions(policy: Policy) -> None:
    """A volume as a video. HF's video processor needs torchvision (no CPU wheel), so the reference is HF's
    image processor: with slices in identical pairs, temporal patch k is the image patch of slice 2k. Ids equal
    tokenizing the HF-rendered prompt with the pads expanded; positions follow the released rule."""
    rng = np.random.default_rng(2)
    pairs = rng.integers(0, 256, size=(56, 84, 4), dtype=np.uint8)
    u8 = np.repeat(pairs, 2, axis=2)  # slices 2k and 2k+1 identical
    sample = {"image": to_unit(u8)[None], "frame": CoordinateFrame((56, 84, 8)), "text": "the lesion", "id": "v",
              "boxes": np.zeros((0, 6)), "spacing": (1.0, 1.0, 5.0)}  # fmt: skip
    batch = GroundingPrompter(policy, PromptConfig(template="r1")).build([sample])
    inputs = batch.inputs
    per_step = policy.processor(images=[Image.fromarray(np.ascontiguousarray(pairs[:, :, k].T)) for k in range(4)],
                                return_tensors="pt")  # fmt: skip
    assert torch.equal(inputs["pixel_values_videos"], per_step["pixel_values"])
    assert inputs["video_grid_thw"].tolist() == [[4, 6, 4]]
    assert inputs["second_per_grid_ts"].tolist() == [pytest.approx(1.0)]  # 2 slices × 5 mm / 10 mm per second
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": build_instruction(
        "the lesion", 3, visual="video", depth=8)}]}]  # fmt: skip
    text = hf_processor(policy).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert batch.prompts == [text]
    expanded = text.replace("<|video_pad|>", "<|video_pad|>" * 24)
    assert inputs["input_ids"][0].tolist() == policy.tokenizer(expanded)["input_ids"]
    ours = prompt_positions(policy, inputs)
    theirs = hf_positions(policy, inputs)
    video = (inputs["input_ids"][0] == policy.video_token_id).nonzero().flatten()
    end = int(video[-1]) + 1
    assert torch.equal(ours[:, :, :end], theirs[:, :, :end])  # both rules agree up to the end of the video
    # Released rule: temporal ids 0, 2, 4, 6 (1 s per patch × 2 tokens/s); text resumes one past the largest.
    start = int(video[0])
    assert ours[0, 0, video].unique().tolist() == [start + 0, start + 2, start + 4, start + 6]
    assert ours[:, 0, end].tolist() == [start + 6 + 1] * 3
    assert int(theirs[0, 0, end]) == start + 3  # transformers 5.23: start + max(h, w) / merge


# ---------------------------------------------------------------------------------------------------------------
# rotary positions: the released rule, by hand
# ---------------------------------------------------------------------------------------------------------------
def test_released_rope_rule_by_hand() -> None:
    """text ×2, video (t=3, 4×2 patches → 2×1 tokens), text ×2; interval 0.5 s × 2 tokens/s = 1."""
    types = torch.tensor([[0, 0, 2, 2, 2, 2, 2, 2, 0, 0]])
    pos = released_rope_index(
        torch.zeros_like(types), types, merge_size=2, tokens_per_second=2,
        video_grid_thw=torch.tensor([[3, 4, 2]]), second_per_grid_ts=torch.tensor([0.5]),
    )  # fmt: skip
    assert pos[0, 0].tolist() == [
        0,
        1,
        2,
        2,
        3,
        3,
        4,
        4,
        5,
        6,
    ]  # temporal: start 2 + 0, 1, 2; text at max + 1
    assert pos[1, 0].tolist() == [0, 1, 2, 3, 2, 3, 2, 3, 5, 6]  # height: rows 0, 1 per temporal step
    assert pos[2, 0].tolist() == [0, 1, 2, 2, 2, 2, 2, 2, 5, 6]  # width: one column
    left = released_rope_index(
        torch.zeros(1, 12, dtype=torch.long), torch.cat([torch.zeros(1, 2, dtype=torch.long), types], 1),
        merge_size=2, tokens_per_second=2, attention_mask=torch.tensor([[0, 0] + [1] * 10]),
        video_grid_thw=torch.tensor([[3, 4, 2]]), second_per_grid_ts=torch.tensor([0.5]),
    )  # fmt: skip
    assert torch.equal(left[:, :, 2:], pos) and left[:, :, :2].eq(0).all()  # left padding: 0, rest unchanged


def test_mixed_left_padded_batch_video_and_image_logits(policy: Policy) -> None:
    """A volume (video) and a radiograph in one left-padded batch: each row's last-token logits equal those of
    the row alone, and the video row's positions are the released rule's."""
    rng = np.random.default_rng(5)
    vol = {"image": to_unit(rng.integers(0, 256, size=(56, 56, 8), dtype=np.uint8))[None], "id": "v",
           "frame": CoordinateFrame((56, 56, 8)), "text": "the lesion", "boxes": np.zeros((0, 6)),
           "spacing": (1.0, 1.0, 2.0)}  # fmt: skip
    img = sample_2d(rng.integers(0, 256, size=(84, 56), dtype=np.uint8), "the right upper lobe opacity", "i")
    prompter = GroundingPrompter(policy, PromptConfig(template="r1"))
    both = prompter.build([vol, img])
    assert both.inputs["attention_mask"][:, 0].tolist() in ([0, 1], [1, 0])  # rows differ in length: padded
    joint = last_logits(policy, both.inputs, prompt_positions(policy, both.inputs))
    for i, sample in enumerate((vol, img)):
        alone = prompter.build([sample]).inputs
        ref = last_logits(policy, alone, prompt_positions(policy, alone))
        assert torch.allclose(joint[i], ref[0], atol=1e-4), i
    ids = both.inputs["input_ids"][0]
    video = (ids == policy.video_token_id).nonzero().flatten()
    pos = prompt_positions(policy, both.inputs)[:, 0]
    after = int(video[-1]) + 1
    assert pos[:, after].tolist() == [int(pos[:, video].max()) + 1] * 3


def test_temporal_stride_fix_for_a_stride_that_is_not_a_power_of_two() -> None:
    from mg3d.tokenization.plan import distinct_second_per_grid

    for tps, steps in ((3, 50), (2, 64), (25, 40)):
        second = distinct_second_per_grid(0.01, tps, steps)
        ids = (
            torch.arange(steps, dtype=torch.float32) * torch.tensor(second, dtype=torch.float32) * tps
        ).long()
        assert ids.unique().numel() == steps and second <= 1.0 / tps * (1 + 1e-6)
    assert distinct_second_per_grid(0.7, 2, 64) == 0.7  # already one id per step: unchanged
    assert distinct_second_per_grid(0.01, None, 64) == 0.01  # Qwen2-VL / unknown: untouched


def test_thin_slices_get_distinct_temporal_ids(policy: Policy) -> None:
    """64 slices of 2 mm, all kept: 32 temporal patches, 32 distinct monotone temporal ids (25 without the fix)."""
    spec = VisionSpec.from_policy(policy)
    plan = plan_video((56, 56, 64), spec, spacing=(1.0, 1.0, 2.0), max_vision_tokens=2048, min_slice_tokens=4)
    assert plan.grids[0][0] == 32
    grid = torch.tensor([plan.grids[0]])
    n = spec.tokens(plan.grids[0])
    types = torch.tensor([[0] + [2] * n + [0]])
    pos = released_rope_index(torch.zeros_like(types), types, merge_size=2, tokens_per_second=2,
                              video_grid_thw=grid, second_per_grid_ts=torch.tensor([plan.second_per_grid_t]))  # fmt: skip
    temporal = pos[0, 0, 1:-1].view(32, -1)[:, 0]
    assert temporal.unique().numel() == 32 and bool((temporal.diff() >= 1).all())
    naive = (torch.arange(32) * torch.tensor(2 * 2.0 / 10) * 2).long()  # 2 slices × 2 mm / 10 mm per second
    assert naive.unique().numel() == 25
    # thick slices keep their own (larger) stride
    thick = plan_video((56, 56, 16), spec, spacing=(1.0, 1.0, 5.0), max_vision_tokens=2048)
    assert thick.second_per_grid_t == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------------
# sampling equals the policy
# ---------------------------------------------------------------------------------------------------------------
def _prompt_batch(policy: Policy):
    rng = np.random.default_rng(3)
    u8 = rng.integers(0, 256, size=(56, 56), dtype=np.uint8)
    return GroundingPrompter(policy, PromptConfig(template="plain")).build([sample_2d(u8, "the nodule", "p")])


def test_sampled_logprobs_equal_training_logprobs_despite_the_folder_penalty(policy: Policy) -> None:
    batch = _prompt_batch(policy)
    config = RolloutConfig(num_generations=2, max_new_tokens=12, temperature=1.0, share_prompt=False)
    inputs = dict(batch.inputs)
    kwargs = _generation_kwargs(policy, config)
    kwargs.update(
        output_scores=True, return_dict_in_generate=True, position_ids=prompt_positions(policy, inputs)
    )
    torch.manual_seed(0)
    model = policy.model.eval()
    with torch.no_grad(), only_configured_processors(policy):
        out = model.generate(**inputs, **kwargs)
    assert policy.model.generation_config.repetition_penalty == pytest.approx(1.05)  # put back afterwards
    length = inputs["input_ids"].shape[1]
    tokens = out.sequences[:, length:]
    sampled = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)
    sampled = sampled.gather(-1, tokens[..., None]).squeeze(-1)
    rollout = generate_completions(policy, inputs, RolloutConfig(num_generations=1, max_new_tokens=12))
    rollout.completion_ids = tokens
    rollout.completion_mask = torch.ones_like(tokens)
    rollout.num_generations = 1
    trained = completion_logprobs(policy, inputs, rollout, 1.0, share_prompt=False)
    vision = torch.isin(tokens, torch.tensor([policy.image_token_id, policy.video_token_id]))
    assert not vision.any()
    assert torch.allclose(sampled, trained, atol=1e-4)
    # The same generate with the folder's config in force applies the penalty: scores differ.
    with torch.no_grad():
        leaked = model.generate(**inputs, **kwargs)
    assert not torch.allclose(torch.stack(leaked.scores, 1)[:, :1], torch.stack(out.scores, 1)[:, :1])


@pytest.mark.parametrize("share_prompt", [False, True])
def test_greedy_rollout_is_the_argmax_of_the_training_forward(policy: Policy, share_prompt: bool) -> None:
    """With the folder's repetition penalty in its generation config, greedy tokens are still the argmax of the
    policy's own logits (on the shared GRPO path and on the one-per-prompt evaluation path)."""
    batch = _prompt_batch(policy)
    config = RolloutConfig(num_generations=1, max_new_tokens=10, do_sample=False, share_prompt=share_prompt)
    rollout = generate_completions(policy, batch.inputs, config)
    with torch.no_grad():
        full = torch.cat([batch.inputs["input_ids"], rollout.completion_ids], 1)
        inputs = dict(batch.inputs, input_ids=full, attention_mask=torch.ones_like(full))
        inputs["mm_token_type_ids"] = torch.cat(
            [batch.inputs["mm_token_type_ids"], torch.zeros_like(rollout.completion_ids)], 1
        )
        logits = last_logits_all(policy, inputs)
    t = rollout.completion_ids.shape[1]
    logits[..., [policy.image_token_id, policy.video_token_id]] = -torch.inf  # suppressed, as configured
    assert torch.equal(logits[:, -t - 1 : -1].argmax(-1), rollout.completion_ids)
    assert policy.model.generation_config.repetition_penalty == pytest.approx(1.05)


def last_logits_all(policy: Policy, inputs: dict) -> torch.Tensor:
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    pos = prompt_positions(policy, inputs)
    return policy.model.eval()(**{k: inputs[k] for k in keys if k in inputs}, position_ids=pos).logits


# ---------------------------------------------------------------------------------------------------------------
# vision budgets: one rule on every path
# ---------------------------------------------------------------------------------------------------------------
def test_one_image_size_rule_on_the_prompter_and_the_trl_path(policy: Policy, caplog) -> None:
    u8 = np.full((1024, 1024), 128, dtype=np.uint8)
    folder = GroundingPrompter(policy, PromptConfig(template="r1")).build([sample_2d(u8, "x", "a")])
    trl = trl_image_processor(policy).image_processor(images=[Image.fromarray(u8)], return_tensors="pt")
    assert (
        folder.visuals[0].num_tokens == 1369 == int(trl["image_grid_thw"].prod()) // 4
    )  # the folder's limits
    with caplog.at_level(logging.WARNING, logger="mg3d.grounding"):
        capped = GroundingPrompter(policy, PromptConfig(template="r1", max_vision_tokens=1024))
    assert "overrides the checkpoint folder's image limit" in caplog.text
    trl_capped = trl_image_processor(policy, max_vision_tokens=1024).image_processor(
        images=[Image.fromarray(u8)], return_tensors="pt"
    )
    ours = capped.build([sample_2d(u8, "x", "a")]).visuals[0].num_tokens
    assert ours == 1024 == int(trl_capped["image_grid_thw"].prod()) // 4


# ---------------------------------------------------------------------------------------------------------------
# prompts: Qwen-native answers, terse laterality, generation budgets
# ---------------------------------------------------------------------------------------------------------------
def test_qwen_native_json_counts_only_under_the_native_protocol() -> None:
    from mg3d.evaluation import EvalItem, score_item

    text = '```json\n[\n\t{"bbox_2d": [10, 20, 30, 40], "label": "nodule"}\n]\n```'
    default = read_answer(text, 2, frame=None, codec=None)
    native = read_answer(text, 2, frame=None, codec=None, accept_native=True)
    assert default.box_text is None and native.box_text.tolist() == [10, 20, 30, 40]
    assert (
        read_answer("<think>x [1, 2, 3, 4]", 2, frame=None, codec=None, accept_native=True).box_text is None
    )
    assert read_answer("[10, 20, 30, 40]", 2, frame=None, codec=None, accept_native=True).box_text is None
    item = EvalItem(id="a", completion=text, ndim=2, gt_boxes=((10, 20, 30, 40),), spatial_shape=(64, 64))
    assert score_item(item, "qwen-native").iou == pytest.approx(1.0)
    assert score_item(item, "mg3d").iou == 0.0 and score_item(item, "medground-r1").iou == 0.0


def test_terse_template_carries_laterality() -> None:
    text = build_instruction("left pleural effusion", 2, template="terse", laterality="cxr")
    assert (
        text.startswith("Find left pleural effusion. ") and "patient's left side appears on the right" in text
    )
    ct = build_instruction("the lesion", 3, template="terse", laterality="ct", z_direction="inferior")
    assert "toward the patient's feet" in ct
    assert build_instruction("the lesion", 2, template="terse") == "Find the lesion."


def test_reasoning_budget_fits_an_empty_think_and_an_answer(policy: Policy) -> None:
    from mg3d.prompts import format_completion

    for ndim, values in ((2, [1004, 1004, 1023, 1023]), (3, [100, 200, 30, 140, 260, 63])):
        n = len(policy.tokenizer(format_completion(values, ndim, template="r1"))["input_ids"])
        assert n > 30 and default_max_new_tokens("r1") >= 5 * n  # the answer-only 48 leaves no room to reason
    assert default_max_new_tokens("chain_of_box") == default_max_new_tokens("r1") == 256
    assert default_max_new_tokens("plain") == 48


@pytest.mark.slow
def test_evaluate_a_plain_folder_with_a_reasoning_template(qwen_folder: Path, tmp_path: Path) -> None:
    """scripts/evaluate.py --model on the real-architecture folder: runs, the r1 template's default budget
    (256), and a warning for completions the random weights never finish."""
    from test_grounder import write_phantoms

    from mg3d.data.records import write_manifest

    manifest = tmp_path / "test.jsonl"
    write_manifest(manifest, write_phantoms(tmp_path / "phantoms")[:1])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", str(qwen_folder), "--manifest",
         str(manifest), "--limit", "1", "--no-progress", "--bootstrap", "0", "--json"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max_new_tokens=256 unfinished" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["metrics"]["n"] == 1


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl"])
def test_released_rule_equals_transformers_on_images_for_both_families(family: str) -> None:
    """Where the rules agree (images: one temporal step) mg3d's positions are transformers' exactly."""
    from mg3d.model import build_tiny_policy

    tiny = build_tiny_policy(family=family)
    rng = np.random.default_rng(6)
    samples = [sample_2d(rng.integers(0, 256, size=s, dtype=np.uint8), t, t)
               for s, t in (((56, 84), "a"), ((112, 56), "the big one"))]  # fmt: skip
    inputs = GroundingPrompter(tiny, PromptConfig(template="r1")).build(samples).inputs
    assert torch.equal(prompt_positions(tiny, inputs), hf_positions(tiny, inputs))


def test_tiny_policy_sizes_images_the_same_in_memory_on_the_trl_path_and_after_reload(tmp_path: Path) -> None:
    from mg3d.model import build_tiny_policy, save_policy

    tiny = build_tiny_policy()
    reloaded = load_policy(save_policy(tiny, tmp_path / "tiny"))
    u8 = np.full((1100, 900), 100, dtype=np.uint8)
    tokens = [GroundingPrompter(p, PromptConfig()).build([sample_2d(u8, "x", "a")]).visuals[0].num_tokens
              for p in (tiny, reloaded)]  # fmt: skip
    trl = trl_image_processor(tiny).image_processor(images=[Image.fromarray(u8)], return_tensors="pt")
    assert tokens[0] == tokens[1] == int(trl["image_grid_thw"].prod()) // 4 <= 1024


def test_heldout_evaluation_uses_the_template_budget_as_a_plain_folder_does(qwen_folder: Path) -> None:
    """Training's held-out evaluation and Grounder on a plain folder share one default: the template's."""
    from mg3d.grounder import Grounder
    from mg3d.grpo.config import EvalConfig
    from mg3d.grpo.module import GRPOModule

    for template, budget in (("r1", 256), ("chain_of_box", 256), ("terse", 48)):
        module = GRPOModule(prompt=PromptConfig(template=template))
        assert module._eval_rollout_config().max_new_tokens == budget
    explicit = GRPOModule(prompt=PromptConfig(template="r1"), evaluation=EvalConfig(max_new_tokens=30))
    assert explicit._eval_rollout_config().max_new_tokens == 30
    with pytest.warns(UserWarning, match="mg3d_inference.json"):
        grounder = Grounder.from_pretrained(qwen_folder)
    assert grounder.prompt_config.template == "r1" and grounder.max_new_tokens == 256
