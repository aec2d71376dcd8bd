"""Tests for mg3d.generation: shared-prefill sampling and log-probs against the naive (repeated) path."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from mg3d.errors import ConfigError
from mg3d.generation import (
    HFRolloutBackend,
    Rollout,
    RolloutBackend,
    RolloutConfig,
    completion_logprobs,
    cut_at_stop_strings,
    generate_completions,
    make_generator,
    prompt_positions,
    replicate_prompt_inputs,
)
from mg3d.generation.sampling import _completion_masks
from mg3d.model import Policy, build_tiny_policy


@pytest.fixture(scope="module")
def policy() -> Policy:
    # A wider init than the default makes the random model's greedy outputs vary from token to token, so
    # equality of completions between the two paths is a real check (with 0.02 every token is the same).
    return build_tiny_policy(initializer_range=0.2)


def video_patches(
    frames: torch.Tensor, patch: int = 14, merge: int = 2, tp: int = 2
) -> tuple[torch.Tensor, list[int]]:
    """Minimal Qwen-VL patchifier for (T, C, H, W) frames (layout of environment.md §2)."""
    t, c, h, w = frames.shape
    gt, gh, gw = t // tp, h // patch, w // patch
    x = frames.reshape(gt, tp, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, c * tp * patch * patch)
    return x, [gt, gh, gw]


def left_pad_batch(policy: Policy, prompts: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    length = max(len(ids) for ids, _ in prompts)
    ids = [[policy.pad_token_id] * (length - len(i)) + i for i, _ in prompts]
    mask = [[0] * (length - len(i)) + [1] * len(i) for i, _ in prompts]
    types = [[0] * (length - len(t)) + t for _, t in prompts]
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "mm_token_type_ids": torch.tensor(types),
    }


def chat(policy: Policy, spans: list, text: str) -> tuple[list[int], list[int]]:
    tok = policy.tokenizer
    head = tok("<|im_start|>user\n").input_ids
    tail = tok(f"{text}<|im_end|>\n<|im_start|>assistant\n").input_ids
    ids, types = list(head), [0] * len(head)
    for span in spans:
        ids += span.token_ids
        types += span.mm_token_type_ids
    return ids + tail, types + [0] * len(tail)


def video_batch(policy: Policy) -> dict[str, torch.Tensor]:
    """Two volumes as videos (8×56×56 and 8×56×84) with prompts of different lengths (left-padded)."""
    gen = torch.Generator().manual_seed(0)
    pix_a, grid_a = video_patches(torch.randn(8, 3, 56, 56, generator=gen))
    pix_b, grid_b = video_patches(torch.randn(8, 3, 56, 84, generator=gen))
    batch = left_pad_batch(
        policy,
        [
            chat(policy, [policy.vision_span(grid_a, "video")], "Find the lesion."),
            chat(policy, [policy.vision_span(grid_b, "video")], "Where is the largest lesion in this CT?"),
        ],
    )
    return {
        **batch,
        "pixel_values_videos": torch.cat([pix_a, pix_b]),
        "video_grid_thw": torch.tensor([grid_a, grid_b]),
    }


def image_batch(policy: Policy) -> dict[str, torch.Tensor]:
    """Prompt 0 holds one image (56×84), prompt 1 two images (56×56, 84×56): uneven items per prompt."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in ((56, 84, 3), (56, 56, 3), (84, 56, 3))]
    pix = policy.processor(images=images, return_tensors="pt")
    spans = [policy.vision_span(g, "image") for g in pix["image_grid_thw"]]
    batch = left_pad_batch(
        policy, [chat(policy, spans[:1], "Find the nodule."), chat(policy, spans[1:], "Compare both views.")]
    )
    return {**batch, **pix}


def config(**overrides) -> RolloutConfig:
    # Seed 1 on the video batch gives a mix of completions that stop at EOS and that run to max_new_tokens.
    base = {"num_generations": 4, "max_new_tokens": 16, "temperature": 1.0, "do_sample": True, "seed": 1}
    return RolloutConfig(**{**base, **overrides})


# ---------------------------------------------------------------------------------------------------
# masks and config
# ---------------------------------------------------------------------------------------------------
def test_completion_masks_by_hand() -> None:
    eos, pad = 9, 0
    raw = torch.tensor(
        [
            [5, 9, 7, 8],  # EOS in the middle: mask includes it, ids after it become pad
            [9, 3, 9, 4],  # EOS first: only it counts, the second EOS is padding
            [1, 2, 3, 4],  # never ends: truncated
            [1, 2, 3, 9],  # ends on the last token
        ]
    )
    ids, mask, truncated = _completion_masks(raw, [eos], pad)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert ids.tolist() == [[5, 9, 0, 0], [9, 0, 0, 0], [1, 2, 3, 4], [1, 2, 3, 9]]
    assert truncated.tolist() == [False, False, True, False]
    _, mask2, truncated2 = _completion_masks(raw, [eos, 4], pad)  # several EOS ids
    assert mask2.tolist()[2] == [1, 1, 1, 1] and truncated2.tolist() == [False, False, False, False]
    assert mask2.tolist()[1] == [1, 0, 0, 0]


@pytest.mark.parametrize(
    "bad",
    [
        {"num_generations": 0},
        {"max_new_tokens": 0},
        {"temperature": 0.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
    ],
)
def test_rollout_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ConfigError):
        RolloutConfig(**bad)


def test_bad_prompt_inputs(policy: Policy) -> None:
    batch = video_batch(policy)
    no_types = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    with pytest.raises(ConfigError, match="mm_token_type_ids"):
        generate_completions(policy, no_types, config())
    right_padded = dict(batch, attention_mask=batch["attention_mask"].flip(1))
    with pytest.raises(ConfigError, match="right-padded"):
        generate_completions(policy, right_padded, config())
    with pytest.raises(ConfigError, match="must be tensors"):
        generate_completions(policy, dict(batch, input_ids=batch["input_ids"].tolist()), config())
    with pytest.raises(ConfigError, match="unsupported keys"):
        generate_completions(policy, dict(batch, labels=batch["input_ids"]), config())
    few_grids = dict(batch, video_grid_thw=batch["video_grid_thw"][:1])
    with pytest.raises(ConfigError, match="prompt 1"):
        replicate_prompt_inputs(policy, few_grids, 2)


# ---------------------------------------------------------------------------------------------------
# sampling: shared prefill vs the naive path
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_batch", [video_batch, image_batch])
def test_greedy_shared_equals_naive(policy: Policy, make_batch) -> None:
    batch = make_batch(policy)
    cfg = config(do_sample=False, max_new_tokens=10)
    shared = generate_completions(policy, batch, cfg)
    naive = generate_completions(policy, batch, RolloutConfig(**{**cfg.__dict__, "share_prompt": False}))
    assert torch.equal(shared.completion_ids, naive.completion_ids)
    assert torch.equal(shared.completion_mask, naive.completion_mask)
    assert shared.texts == naive.texts
    # greedy: the G copies of one prompt agree, and the two prompts differ
    g = cfg.num_generations
    assert all(torch.equal(shared.completion_ids[i], shared.completion_ids[i - i % g]) for i in range(2 * g))
    assert not torch.equal(shared.completion_ids[0], shared.completion_ids[g])


def test_qwen2_vl_family_shared_equals_naive() -> None:
    policy = build_tiny_policy(family="qwen2-vl", initializer_range=0.2)
    batch = video_batch(policy)
    cfg = config(do_sample=False, max_new_tokens=8)
    shared = generate_completions(policy, batch, cfg)
    naive = generate_completions(policy, batch, RolloutConfig(**{**cfg.__dict__, "share_prompt": False}))
    assert torch.equal(shared.completion_ids, naive.completion_ids)
    with torch.no_grad():
        a = completion_logprobs(policy, batch, shared, 1.0, share_prompt=True)
        b = completion_logprobs(policy, batch, shared, 1.0, share_prompt=False)
    assert torch.allclose(a, b, atol=2e-5, rtol=0)


def test_sampled_shared_equals_num_return_sequences_for_a_seed(policy: Policy) -> None:
    """Same seed, same draws: the shared path reproduces ``generate(num_return_sequences=G)`` token for token."""
    batch = video_batch(policy)
    cfg = config()
    shared = generate_completions(policy, batch, cfg)
    naive = generate_completions(policy, batch, RolloutConfig(**{**cfg.__dict__, "share_prompt": False}))
    assert torch.equal(shared.completion_ids, naive.completion_ids)
    assert len({tuple(r.tolist()) for r in shared.completion_ids}) == 8  # sampling: all 8 completions differ


@pytest.mark.parametrize("do_sample", [False, True])
def test_static_and_dynamic_cache_give_the_same_tokens(policy: Policy, do_sample: bool) -> None:
    batch = video_batch(policy)
    static = generate_completions(policy, batch, config(do_sample=do_sample))
    dynamic = generate_completions(policy, batch, config(do_sample=do_sample, cache_implementation="dynamic"))
    assert torch.equal(static.completion_ids, dynamic.completion_ids)
    with pytest.raises(ConfigError, match="cache_implementation"):
        config(cache_implementation="paged")


def test_generation_under_bf16_autocast(policy: Policy) -> None:
    # Lightning's precision="bf16-mixed" runs the rollout under autocast: the static cache must not break it.
    batch = video_batch(policy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rollout = generate_completions(policy, batch, config(do_sample=True))
    assert rollout.completion_ids.shape[0] == batch["input_ids"].shape[0] * config().num_generations
    assert (
        int(rollout.completion_ids.min()) >= 0
        and int(rollout.completion_ids.max()) < policy.model.get_output_embeddings().out_features
    )


def test_rollout_fields(policy: Policy) -> None:
    batch = video_batch(policy)
    r = generate_completions(policy, batch, config())
    assert isinstance(r, Rollout)
    assert torch.equal(r.prompt_ids, batch["input_ids"]) and torch.equal(
        r.prompt_mask, batch["attention_mask"]
    )
    assert r.prompt_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert r.completion_ids.shape[0] == 8 and r.completion_ids.shape[1] <= 16
    eos = torch.tensor(policy.eos_token_ids)
    for ids, mask, truncated, text in zip(r.completion_ids, r.completion_mask, r.is_truncated, r.texts):
        n = int(mask.sum())
        ends = torch.isin(ids, eos).nonzero().flatten().tolist()
        if truncated:
            assert not ends and n == ids.shape[0]
        else:
            assert ends[0] == n - 1  # mask ends on (and includes) the first EOS
            assert (ids[n:] == policy.pad_token_id).all()
        assert torch.all(mask[:n] == 1) and torch.all(mask[n:] == 0)
        assert text == policy.tokenizer.decode(ids[:n], skip_special_tokens=True)
    assert r.is_truncated.any() and not r.is_truncated.all()  # both cases occur with this seed


def test_cut_at_stop_strings_by_hand(policy: Policy) -> None:
    tok, pad, eos = policy.tokenizer, policy.pad_token_id, policy.eos_token_id

    def row(text: str, tail: list[int], width: int = 28) -> list[int]:
        ids = tok(text, add_special_tokens=False).input_ids + tail
        return ids + [pad] * (width - len(ids))

    rows = [
        row("<answer>[1,2]</answer>", [pad]),  # generate stopped here and padded: the pad is not sampled
        row("<answer>[1,2]</answer>xy", [eos]),  # stop string inside a finished completion
        row("<answer>[" + "1" * 19, []),  # no stop string, ran out of tokens
        row("no answer", [eos]),  # no stop string, ended by EOS
    ]
    raw = torch.tensor(rows)
    ids, mask, truncated = _completion_masks(raw, policy.eos_token_ids, pad)
    cut_ids, cut_mask, cut_truncated = cut_at_stop_strings(ids, mask, truncated, tok, ["</answer>"], pad)
    n_answer = len(tok("<answer>[1,2]</answer>", add_special_tokens=False).input_ids)
    assert cut_mask.sum(1).tolist() == [n_answer, n_answer, 28, 10]
    assert cut_truncated.tolist() == [False, False, True, False]
    for r in (0, 1):
        assert tok.decode(cut_ids[r, :n_answer].tolist()) == "<answer>[1,2]</answer>"
        assert (cut_ids[r, n_answer:] == pad).all()
    assert torch.equal(cut_ids[2:], ids[2:]) and torch.equal(cut_mask[2:], mask[2:])
    # a stop string that spans several tokens ends at the token completing it, not at its first match start
    _, first_mask, _ = cut_at_stop_strings(ids, mask, truncated, tok, ["]", "</answer>"], pad)
    assert first_mask.sum(1).tolist()[:2] == [13, 13]


def test_stop_strings_end_sampled_completions(policy: Policy) -> None:
    stops = tuple("abcdefghij")
    batch = video_batch(policy)
    hot = {"temperature": 8.0, "num_generations": 8, "max_new_tokens": 24}
    r = generate_completions(policy, batch, config(**hot, stop_strings=stops))
    stopped = 0
    for text, mask, truncated in zip(r.texts, r.completion_mask, r.is_truncated):
        hits = [i for i, ch in enumerate(text) if ch in stops]
        if hits:  # the completion ends with its first stop string and is finished
            stopped += 1
            assert hits == [len(text) - 1] and not truncated
        assert int(mask.sum()) >= 1
    assert stopped >= 4  # 10 of ~320 ids, 24 tokens at T = 8: most rows hit one
    free = generate_completions(policy, batch, config(**hot))
    assert any(any(ch in stops for ch in t[:-1]) for t in free.texts)  # without stops they run on


def test_stop_strings_config() -> None:
    assert RolloutConfig(stop_strings="</answer>").stop_strings == ("</answer>",)
    assert RolloutConfig(stop_strings=["</answer>", "<|im_end|>"]).stop_strings == ("</answer>", "<|im_end|>")
    with pytest.raises(ConfigError, match="stop_strings"):
        RolloutConfig(stop_strings=["</answer>", ""])


def test_truncation_flag(policy: Policy) -> None:
    r = generate_completions(policy, video_batch(policy), config(do_sample=False, max_new_tokens=2))
    assert r.completion_ids.shape[1] == 2
    assert bool(r.is_truncated.all()) and bool((r.completion_mask == 1).all())


def test_vision_placeholders_are_never_sampled(policy: Policy) -> None:
    batch = video_batch(policy)
    hot = {"temperature": 8.0, "num_generations": 8, "max_new_tokens": 24}  # near-uniform over 320 ids
    vision_ids = torch.tensor([policy.image_token_id, policy.video_token_id])
    free = generate_completions(policy, batch, config(**hot, suppress_vision_tokens=False))
    assert torch.isin(free.completion_ids, vision_ids).any()  # they do come up when allowed
    kept = generate_completions(policy, batch, config(**hot))
    assert not torch.isin(kept.completion_ids, vision_ids).any()


def test_seeds_generators_and_ranks(policy: Policy) -> None:
    batch = video_batch(policy)
    cfg = config(seed=None)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a = generate_completions(policy, batch, cfg, generator=make_generator(5))
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's global RNG is untouched
    b = generate_completions(policy, batch, cfg, generator=make_generator(5))
    c = generate_completions(policy, batch, cfg, generator=make_generator(5, rank=1))
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    backend: RolloutBackend = HFRolloutBackend(policy, seed=5)
    first, second = backend.generate(batch, cfg), backend.generate(batch, cfg)
    assert not torch.equal(first.completion_ids, second.completion_ids)  # one stream: fresh samples each call
    again = HFRolloutBackend(policy, seed=5).generate(batch, cfg)
    assert torch.equal(first.completion_ids, again.completion_ids)
    fixed = config(seed=3)
    assert torch.equal(
        generate_completions(policy, batch, fixed).completion_ids,
        generate_completions(policy, batch, fixed).completion_ids,
    )


def test_generation_restores_training_mode(policy: Policy) -> None:
    policy.model.train()
    generate_completions(policy, video_batch(policy), config(max_new_tokens=3))
    assert policy.model.training
    policy.model.eval()


# ---------------------------------------------------------------------------------------------------
# log-probs and gradients
# ---------------------------------------------------------------------------------------------------
def test_replicate_prompt_inputs_keeps_items_with_their_prompt(policy: Policy) -> None:
    batch = image_batch(policy)
    rep = replicate_prompt_inputs(policy, batch, 3)
    grids = batch["image_grid_thw"]
    order = [0, 0, 0, 1, 2, 1, 2, 1, 2]  # prompt 0 owns image 0; prompt 1 owns images 1 and 2
    assert torch.equal(rep["image_grid_thw"], grids[order])
    rows = grids.prod(-1).tolist()
    starts = [0, rows[0], rows[0] + rows[1]]
    expected = torch.cat([batch["pixel_values"][starts[i] : starts[i] + rows[i]] for i in order])
    assert torch.equal(rep["pixel_values"], expected)
    assert torch.equal(rep["input_ids"], batch["input_ids"].repeat_interleave(3, 0))


def test_prompt_positions_follow_the_released_rule(policy: Policy) -> None:
    """Up to the end of a video mg3d's positions are the model's; the text after it starts one past the
    largest position of the video block (the released Qwen2.5-VL rule), not where transformers 5.23 puts it."""
    batch = video_batch(policy)
    pos = prompt_positions(policy, batch)
    ref, _ = policy.model.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        video_grid_thw=batch["video_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    assert not torch.equal(pos[0], pos[1])  # temporal and height positions differ on video tokens
    for b in range(pos.shape[1]):
        video = (batch["input_ids"][b] == policy.video_token_id).nonzero().flatten()
        end = int(video[-1]) + 1
        assert torch.equal(pos[:, b, :end], ref[:, b, :end])
        after = pos[:, b, end:]
        first = int(pos[:, b, video].max()) + 1
        expected = torch.arange(first, first + after.shape[1]).expand(3, -1)
        assert torch.equal(after, expected)


@pytest.mark.parametrize("make_batch", [video_batch, image_batch])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_shared_equal_naive(policy: Policy, make_batch, temperature: float) -> None:
    batch = make_batch(policy)
    rollout = generate_completions(policy, batch, config(temperature=temperature))
    with torch.no_grad():
        shared = completion_logprobs(policy, batch, rollout, temperature, share_prompt=True)
        naive = completion_logprobs(policy, batch, rollout, temperature, share_prompt=False)
    assert shared.shape == rollout.completion_ids.shape
    assert torch.allclose(shared, naive, atol=2e-5, rtol=0)
    assert torch.all(shared[rollout.completion_mask == 0] == 0)
    assert bool((shared[rollout.completion_mask == 1] < 0).all())


def test_logprobs_match_a_plain_forward(policy: Policy) -> None:
    """Row 0's log-probs equal log_softmax(logits / T) of one ordinary forward over prompt + completion."""
    batch = video_batch(policy)
    rollout = generate_completions(policy, batch, config(max_new_tokens=8))
    t = 0.7
    with torch.no_grad():
        shared = completion_logprobs(policy, batch, rollout, t)
        n = int(rollout.completion_mask[0].sum())
        ids = torch.cat([batch["input_ids"][:1], rollout.completion_ids[:1, :n]], dim=1)
        keep = batch["attention_mask"][0].bool()
        ids = ids[:, torch.cat([keep, torch.ones(n, dtype=torch.bool)])]  # drop the left padding
        types = torch.cat([batch["mm_token_type_ids"][:1, keep], torch.zeros(1, n, dtype=torch.long)], dim=1)
        rows = batch["video_grid_thw"][0].prod()
        one = {"input_ids": ids, "mm_token_type_ids": types, "attention_mask": torch.ones_like(ids)}
        one["video_grid_thw"] = batch["video_grid_thw"][:1]
        logits = policy.model(
            input_ids=ids,
            mm_token_type_ids=types,
            pixel_values_videos=batch["pixel_values_videos"][:rows],
            video_grid_thw=batch["video_grid_thw"][:1],
            position_ids=prompt_positions(policy, one),  # released rule (the model's differs after a video)
        ).logits[0, -n - 1 : -1]
        ref = (
            torch.log_softmax(logits / t, dim=-1).gather(-1, rollout.completion_ids[0, :n, None]).squeeze(-1)
        )
    assert torch.allclose(shared[0, :n], ref, atol=2e-5)


def test_gradients_shared_equal_naive() -> None:
    policy = build_tiny_policy(initializer_range=0.2)
    batch = video_batch(policy)
    rollout = generate_completions(policy, batch, config())
    weights = torch.linspace(-1.0, 1.0, rollout.completion_ids.shape[0])[:, None]  # advantage-like weights
    grads = {}
    policy.model.train()
    for share in (True, False):
        policy.model.zero_grad(set_to_none=True)
        logp = completion_logprobs(policy, batch, rollout, 1.0, share_prompt=share)
        (weights * logp).sum().backward()
        grads[share] = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    policy.model.eval()
    assert grads[True].keys() == grads[False].keys()
    assert any(
        name.startswith("model.visual") for name in grads[True]
    )  # the prefill/vision part is in the graph
    for name, g in grads[True].items():
        ref = grads[False][name]
        assert torch.allclose(g, ref, atol=1e-4 * max(1.0, float(ref.abs().max()))), name


def test_gradient_checkpointing_falls_back_to_the_repeated_prompt() -> None:
    policy = build_tiny_policy(initializer_range=0.2)
    batch = video_batch(policy)
    rollout = generate_completions(policy, batch, config(max_new_tokens=6))
    with torch.no_grad():
        ref = completion_logprobs(policy, batch, rollout, 1.0, share_prompt=False)
    policy.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    policy.model.train()
    with pytest.warns(UserWarning, match="gradient checkpointing"):
        logp = completion_logprobs(policy, batch, rollout, 1.0, share_prompt=True)
    assert torch.allclose(logp, ref, atol=2e-5)
    policy.model.eval()  # in eval mode checkpointing is inactive, so the shared path runs without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with torch.no_grad():
            shared = completion_logprobs(policy, batch, rollout, 1.0, share_prompt=True)
    assert torch.allclose(shared, ref, atol=2e-5)


def test_logprobs_reject_a_mismatched_rollout(policy: Policy) -> None:
    batch = video_batch(policy)
    rollout = generate_completions(policy, batch, config(max_new_tokens=4))
    half = Rollout(
        **{
            **rollout.__dict__,
            "completion_ids": rollout.completion_ids[:3],
            "completion_mask": rollout.completion_mask[:3],
        }
    )
    for share in (True, False):
        with pytest.raises(ConfigError, match="completions"):
            completion_logprobs(policy, batch, half, 1.0, share_prompt=share)
    with pytest.raises(ConfigError, match="temperature"):
        completion_logprobs(policy, batch, rollout, 0.0)
