"""Tests for mg3d.model: the tiny offline policy, loading/saving checkpoints, and the vision token layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mg3d.errors import ConfigError
from mg3d.model import (
    MM_TYPE_IMAGE,
    MM_TYPE_VIDEO,
    Policy,
    PolicyConfig,
    build_tiny_policy,
    load_policy,
    merged_token_count,
    mrope_section,
    save_policy,
)
from mg3d.trl_processor import trl_image_processor

FAMILIES = ["qwen2.5-vl", "qwen2-vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def policy(request: pytest.FixtureRequest) -> Policy:
    return build_tiny_policy(family=request.param)


def video_patches(
    frames: torch.Tensor, patch: int = 14, merge: int = 2, tp: int = 2
) -> tuple[torch.Tensor, list[int]]:
    """Minimal Qwen-VL patchifier for (T, C, H, W) frames (layout of environment.md §2)."""
    t, c, h, w = frames.shape
    gt, gh, gw = t // tp, h // patch, w // patch
    x = frames.reshape(gt, tp, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, c * tp * patch * patch)
    return x, [gt, gh, gw]


def chat_inputs(policy: Policy, grid: list[int], modality: str, text: str = "Find the lesion.") -> dict:
    tok = policy.tokenizer
    head = tok("<|im_start|>user\n").input_ids
    tail = tok(f"{text}<|im_end|>\n<|im_start|>assistant\n").input_ids
    span = policy.vision_span(grid, modality)
    ids = head + span.token_ids + tail
    types = [0] * len(head) + span.mm_token_type_ids + [0] * len(tail)
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "mm_token_type_ids": torch.tensor([types]),
    }


def image_inputs(policy: Policy, height: int = 56, width: int = 84, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    pix = policy.processor(images=[image], return_tensors="pt")
    grid = pix["image_grid_thw"][0].tolist()
    return {**chat_inputs(policy, grid, "image"), **pix}


def video_inputs(policy: Policy, frames: int = 8, side: int = 56, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    pixels, grid = video_patches(torch.randn(frames, 3, side, side, generator=gen))
    return {
        **chat_inputs(policy, grid, "video"),
        "pixel_values_videos": pixels,
        "video_grid_thw": torch.tensor([grid]),
    }


# ---------------------------------------------------------------------------------------------------
# building the tiny policy
# ---------------------------------------------------------------------------------------------------
def test_tiny_policy_matches_the_documented_size_and_tokens(policy: Policy) -> None:
    n_params = sum(p.numel() for p in policy.model.parameters())
    expected = {"qwen2.5-vl": 3_320_704, "qwen2-vl": 3_255_296}[
        policy.family
    ]  # environment.md §2: 3.32 / 3.26 M
    assert n_params == expected
    tok = policy.tokenizer
    assert policy.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert policy.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert policy.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert policy.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    # Qwen2.5-VL-Instruct's generation config stops at either end-of-text token
    assert policy.eos_token_ids == [
        tok.convert_tokens_to_ids("<|im_end|>"),
        tok.convert_tokens_to_ids("<|endoftext|>"),
    ]
    assert policy.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")  # the one SFT targets end with
    assert policy.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert (policy.patch_size, policy.merge_size, policy.temporal_patch_size) == (14, 2, 2)
    assert policy.model.config.text_config.vocab_size == 320  # 270 tokens padded to a multiple of 64
    assert policy.model.config.text_config.rope_parameters["mrope_section"] == [8, 12, 12]
    assert policy.tokenizer.padding_side == "left"
    assert policy.codec_name == policy.family
    assert (
        type(policy.codec).__name__
        == {"qwen2.5-vl": "AbsolutePixelCodec", "qwen2-vl": "NormalizedCodec"}[policy.family]
    )


def test_same_seed_same_weights_and_caller_rng_untouched() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_policy(seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # building did not consume the global RNG
    b = build_tiny_policy(seed=7)
    c = build_tiny_policy(seed=8)
    sa, sb, sc = (p.model.state_dict() for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_build_options() -> None:
    p = build_tiny_policy(
        dtype=torch.bfloat16, min_pixels=28 * 28, max_pixels=112 * 112, extra_tokens=("<answer>",)
    )
    assert p.model.dtype == torch.bfloat16
    assert p.processor.size["shortest_edge"] == 28 * 28 and p.processor.size["longest_edge"] == 112 * 112
    assert len(p.tokenizer("<answer>").input_ids) == 1
    with pytest.raises(ConfigError, match="family"):
        build_tiny_policy(family="llava")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="num_heads"):
        build_tiny_policy(hidden_size=250)
    with pytest.raises(ConfigError, match="dtype"):
        build_tiny_policy(dtype="float13")


def test_mrope_section() -> None:
    assert mrope_section(128) == [16, 24, 24]  # Qwen2-VL / Qwen2.5-VL released checkpoints
    assert mrope_section(64) == [8, 12, 12]
    assert sum(mrope_section(96)) == 48
    with pytest.raises(ConfigError):
        mrope_section(7)


# ---------------------------------------------------------------------------------------------------
# vision token layout
# ---------------------------------------------------------------------------------------------------
def test_merged_token_count_and_span(policy: Policy) -> None:
    assert merged_token_count([1, 16, 16], 2) == 64  # a 224² image
    assert merged_token_count(torch.tensor([8, 4, 4]), 2) == 32  # 16 slices of 56²
    assert policy.num_vision_tokens([16, 10, 10]) == 400
    for bad in ([1, 3, 4], [0, 4, 4], [1, 4]):
        with pytest.raises(ConfigError):
            merged_token_count(bad, 2)
    span = policy.vision_span([2, 4, 6], "video")
    assert span.num_vision_tokens == 12
    assert span.token_ids == [
        policy.vision_start_token_id,
        *[policy.video_token_id] * 12,
        policy.vision_end_token_id,
    ]
    assert span.mm_token_type_ids == [0, *[MM_TYPE_VIDEO] * 12, 0]
    span = policy.vision_span([1, 2, 2], "image")
    assert span.token_ids == [policy.vision_start_token_id, policy.image_token_id, policy.vision_end_token_id]
    assert span.mm_token_type_ids == [0, MM_TYPE_IMAGE, 0]
    with pytest.raises(ConfigError, match="modality"):
        policy.vision_span([1, 2, 2], "audio")


def test_test_patchifier_matches_the_image_processor_layout() -> None:
    """The hand patchifier used in these tests lays patches out exactly as Qwen2VLImageProcessorPil does."""
    p = build_tiny_policy()
    rng = np.random.default_rng(1)
    image = rng.random((56, 84, 3)).astype(np.float32)
    ref = p.processor(
        images=[image], do_resize=False, do_rescale=False, do_normalize=False, return_tensors="pt"
    )
    frames = torch.from_numpy(image).permute(2, 0, 1)[None].repeat(2, 1, 1, 1)  # an image is 2 equal frames
    pixels, grid = video_patches(frames)
    assert grid == ref["image_grid_thw"][0].tolist() == [1, 4, 6]
    assert torch.equal(pixels, ref["pixel_values"])


# ---------------------------------------------------------------------------------------------------
# forward, backward, generate
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["image", "video"])
def test_forward_backward_generate(policy: Policy, kind: str) -> None:
    inputs = image_inputs(policy) if kind == "image" else video_inputs(policy)
    n_vision = int((inputs["mm_token_type_ids"] > 0).sum())
    assert n_vision == (6 if kind == "image" else 16)  # 56×84 → grid (1,4,6) → 6; 8×56² → (4,4,4) → 16
    model = policy.model
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**inputs, labels=inputs["input_ids"])
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    visual_grad = sum(
        float(p.grad.abs().sum()) for p in model.model.visual.parameters() if p.grad is not None
    )
    assert visual_grad > 0  # the loss reaches the vision tower through the placeholder tokens
    model.zero_grad(set_to_none=True)
    model.eval()
    generated = model.generate(
        **inputs,
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
        top_k=None,
        top_p=None,
        temperature=None,
    )
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 5)
    assert torch.equal(generated[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_mm_token_type_ids_switch_on_3d_positions() -> None:
    """With mm_token_type_ids the video tokens get (t, h, w) positions; without, silently 1D ones."""
    p = build_tiny_policy()
    model = p.model.eval()
    inputs = video_inputs(p)
    with torch.no_grad():
        with_types = model(**inputs).logits
        without = model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"}).logits
        # Hand-built positions: text before the video counts 0..s-1; video token (t, h, w) of the merged
        # (4, 2, 2) grid sits at (s + t·tokens_per_second, s + h, s + w). (Where the text after a video
        # resumes differs between transformers releases — see transformers issue #45381 — so only the
        # logits up to the last video token are compared.)
        ids = inputs["input_ids"][0]
        s = int((ids == p.video_token_id).nonzero()[0])
        end = s + 16
        tps = p.model.config.vision_config.tokens_per_second
        rows = [[i, i, i] for i in range(s)]
        rows += [[s + t * tps, s + h, s + w] for t in range(4) for h in range(2) for w in range(2)]
        positions = torch.tensor(rows).T[:, None, :]  # (3, 1, end)
        prefix = {
            k: (v[:, :end] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
            for k, v in inputs.items()
        }
        by_hand = model(**prefix, position_ids=positions).logits
    assert torch.allclose(with_types[:, :end], by_hand, atol=1e-5)
    assert not torch.allclose(without[:, :end], by_hand, atol=1e-3)
    assert (with_types - without).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------
# the processor handed to TRL
# ---------------------------------------------------------------------------------------------------
def test_trl_image_processor_matches_the_policy_and_round_trips(policy: Policy, tmp_path) -> None:
    """Image chats become the placeholders, pixels and types mg3d builds itself; save/load keeps them."""
    from PIL import Image

    processor = trl_image_processor(policy)
    assert processor.get_attributes() == [
        "image_processor",
        "tokenizer",
    ]  # no video processor to need torchvision
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, size=(56, 84, 3), dtype=np.uint8))
    chat = [
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": "Find it."}],
            }
        ]
    ]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    out = processor.apply_chat_template(chat, **kwargs)
    ref = policy.processor(images=[image], return_tensors="pt")
    assert torch.equal(out["pixel_values"], ref["pixel_values"])
    assert torch.equal(out["image_grid_thw"], ref["image_grid_thw"])
    ids, types = out["input_ids"][0], out["mm_token_type_ids"][0]
    span = policy.vision_span(ref["image_grid_thw"][0], "image")
    assert int((ids == policy.image_token_id).sum()) == span.num_vision_tokens == 6
    assert torch.equal(types == MM_TYPE_IMAGE, ids == policy.image_token_id)
    assert processor.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        logits = policy.model.eval()(**out).logits
    assert logits.shape[:2] == ids[None].shape and torch.isfinite(logits).all()

    processor.save_pretrained(tmp_path / "proc")
    loaded = type(processor).from_pretrained(tmp_path / "proc")
    again = loaded.apply_chat_template(chat, **kwargs)
    assert set(again) == set(out) and all(torch.equal(again[k], out[k]) for k in out)
    assert loaded.image_processor.size == policy.processor.size


# ---------------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------------
def test_save_load_round_trip_identical_logits(policy: Policy, tmp_path) -> None:
    folder = save_policy(policy, tmp_path / "ckpt")
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin"))
    loaded = load_policy(folder)
    assert loaded.family == policy.family and loaded.codec_name == policy.codec_name
    assert type(loaded.model) is type(policy.model)
    for inputs in (image_inputs(policy), video_inputs(policy)):
        with torch.no_grad():
            assert torch.equal(policy.model.eval()(**inputs).logits, loaded.model.eval()(**inputs).logits)
    text = "Box: [12, 34, 5] - Lésion ✓<|im_end|>"
    assert loaded.tokenizer(text).input_ids == policy.tokenizer(text).input_ids
    assert loaded.tokenizer.chat_template == policy.tokenizer.chat_template
    assert loaded.eos_token_ids == policy.eos_token_ids and loaded.pad_token_id == policy.pad_token_id
    assert loaded.processor.size == policy.processor.size
    assert loaded.processor.merge_size == policy.merge_size


def test_load_options(tmp_path) -> None:
    folder = save_policy(build_tiny_policy(), tmp_path / "ckpt")
    p = load_policy(
        folder, dtype="bfloat16", attn_implementation="eager", min_pixels=28 * 28, max_pixels=84 * 84
    )
    assert p.model.dtype == torch.bfloat16
    assert p.model.config._attn_implementation == "eager"
    assert p.processor.size["shortest_edge"] == 28 * 28 and p.processor.size["longest_edge"] == 84 * 84
    assert load_policy(folder, dtype=torch.float64).model.dtype == torch.float64
    assert load_policy(folder).model.dtype == torch.float32  # "auto" keeps the saved dtype


def test_freeze_vision_and_gradient_checkpointing(tmp_path) -> None:
    ref = build_tiny_policy()
    folder = save_policy(ref, tmp_path / "ckpt")
    p = load_policy(folder, freeze_vision=True, gradient_checkpointing=True)
    assert p.model.is_activation_checkpointing
    assert not any(q.requires_grad for q in p.model.model.visual.parameters())
    assert all(q.requires_grad for q in p.model.model.language_model.parameters())
    inputs = video_inputs(p)
    p.model.train()
    ref.model.train()
    loss = p.model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    ref_loss = ref.model(**inputs, labels=inputs["input_ids"]).loss
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss)
    assert all(q.grad is None for q in p.model.model.visual.parameters())
    lm, ref_lm = p.model.model.language_model, ref.model.model.language_model
    for (name, a), (_, b) in zip(lm.named_parameters(), ref_lm.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name  # checkpointing recomputes, same gradients
    tiny = build_tiny_policy(freeze_vision=True, gradient_checkpointing=True)
    assert tiny.model.is_activation_checkpointing
    assert not any(q.requires_grad for q in tiny.model.model.visual.parameters())


def test_load_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_policy(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"no config\.json"):
        load_policy(empty)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    with pytest.raises(ConfigError, match=r"LlamaForCausalLM.*not a Qwen2-VL"):
        load_policy(llama)
    p = build_tiny_policy()
    model_only = tmp_path / "model_only"
    p.model.save_pretrained(model_only)
    with pytest.raises(ConfigError, match="no tokenizer files"):
        load_policy(model_only)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        load_policy(broken)


def test_load_without_preprocessor_config_uses_vision_config(tmp_path) -> None:
    p = build_tiny_policy()
    folder = tmp_path / "no_proc"
    p.model.save_pretrained(folder)
    p.tokenizer.save_pretrained(folder)
    with pytest.warns(UserWarning, match="preprocessor_config"):
        loaded = load_policy(folder)
    assert (loaded.processor.patch_size, loaded.processor.merge_size) == (14, 2)


def test_tiny_model_settings_next_to_a_checkpoint_are_refused() -> None:
    """A checkpoint folder's config sets its architecture; sizes given beside it used to be silently ignored."""
    folder = "pretrained/ct3d_body_tiny"  # any path: the check runs before the folder is read
    with pytest.raises(
        ConfigError, match=r"policy\.hidden_size=128, policy\.num_layers=2 apply only to the tiny"
    ):
        PolicyConfig(checkpoint=folder, hidden_size=128, num_layers=2).build()
    with pytest.raises(ConfigError, match=r"policy\.family='qwen2-vl'"):
        PolicyConfig(checkpoint=folder, family="qwen2-vl").build()
    # the defaults (what a config that names only the checkpoint leaves) pass through to the loader
    with pytest.raises(ConfigError, match="does not exist"):
        PolicyConfig(checkpoint="/nonexistent/folder").build()
