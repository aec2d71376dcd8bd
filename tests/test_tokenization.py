"""Tokenization: HF-identical patches, budgets, exact frames per strategy, mRoPE inputs, tiny-model forward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mg3d.errors import BoxError, ConfigError, DataError
from mg3d.frames import CoordinateFrame, crop_step, flip_step, resize_step
from mg3d.model import build_tiny_policy
from mg3d.prompts import build_messages, get_codec, render_prompt
from mg3d.tokenization import (
    MM_PER_SECOND,
    VisionSpec,
    VisualTokenizer,
    build_mm_token_type_ids,
    build_model_inputs,
    normalize_frames,
    patchify,
    plan_image,
    plan_montage,
    plan_slices,
    plan_video,
    tokenize_image,
    tokenize_montage,
    tokenize_slices,
    tokenize_video,
)

SPEC = VisionSpec()


def to_unit(u8: np.ndarray) -> torch.Tensor:
    """uint8 → [0, 1] float32 exactly as transformers' rescale does it (float64 multiply, then float32)."""
    return torch.from_numpy((u8.astype(np.float64) * (1 / 255)).astype(np.float32))


def hf_pixels(images: list[Image.Image], max_tokens: int = 1024) -> dict[str, torch.Tensor]:
    proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=max_tokens * 28 * 28)
    return dict(proc(images=images, return_tensors="pt"))


def cxr_8bit() -> np.ndarray:
    """pydicom-data's real chest radiograph RG1 (MONOCHROME1, so inverted), windowed to 8 bits."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    a = ds.pixel_array.astype(np.float64)
    a = a.max() - a
    return np.round((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)  # (rows, cols)


@pytest.fixture(scope="module")
def policy():
    return build_tiny_policy()


# ----------------------------------------------------------------------------------------------------------
# Patchifier


@pytest.mark.parametrize(("height", "width", "rgb"), [(56, 56, False), (84, 112, False), (140, 56, True)])
def test_patchify_bit_identical_to_hf_random(height, width, rgb):
    rng = np.random.default_rng(height * width)
    u8 = rng.integers(0, 256, (height, width, 3) if rgb else (height, width), dtype=np.uint8)
    ref = hf_pixels([Image.fromarray(u8)])
    unit = to_unit(u8)
    image = unit.permute(2, 1, 0) if rgb else unit.T[None]  # (C, X, Y): x = column, y = row
    tv = tokenize_image(image, CoordinateFrame(tuple(image.shape[1:])))
    assert torch.equal(tv.pixel_inputs["pixel_values"], ref["pixel_values"])
    assert torch.equal(tv.pixel_inputs["image_grid_thw"], ref["image_grid_thw"])
    assert tv.num_tokens == height * width // 28**2
    assert tv.frame.steps == ()  # already on the 28-grid: no resize, same pixels as HF


def test_patchify_bit_identical_to_hf_real_cxr():
    u8 = cxr_8bit()
    # Resize once with PIL to a size smart_resize keeps, so both sides see the same pixels.
    small = np.asarray(
        Image.fromarray(u8).resize((476, 504), Image.Resampling.BICUBIC)
    )  # (rows 504, cols 476)
    ref = hf_pixels([Image.fromarray(small)])
    tv = tokenize_image(to_unit(small).T[None], CoordinateFrame((476, 504)))
    assert torch.equal(tv.pixel_inputs["pixel_values"], ref["pixel_values"])
    assert ref["image_grid_thw"].tolist() == [[1, 36, 34]] == tv.grid_thw.tolist()
    # The same with our own patchify + normalisation on display-layout frames.
    frames = normalize_frames(to_unit(small)[None, None], SPEC)
    pv, grid = patchify(frames)
    assert torch.equal(pv, ref["pixel_values"]) and grid.tolist() == [1, 36, 34]


def test_full_size_cxr_same_grid_and_near_same_pixels_as_hf():
    u8 = cxr_8bit()  # 1955 rows × 1841 cols: both sides resize with their own (anti-aliased bicubic) filters
    ref = hf_pixels([Image.fromarray(u8)], max_tokens=256)
    tv = tokenize_image(to_unit(u8).T[None], CoordinateFrame((1841, 1955)), max_vision_tokens=256)
    assert tv.grid_thw.tolist() == ref["image_grid_thw"].tolist() == [[1, 32, 30]]
    assert tv.frame.shape == (420, 448)  # (x = 30 · 14, y = 32 · 14)
    diff = (tv.pixel_inputs["pixel_values"] - ref["pixel_values"]).abs()
    # HF rounds its resized pixels to 8 bits; ours stay float: within ~2 grey levels, ~1 on average.
    assert diff.max() < 2.5 / 255 / 0.26 and diff.mean() < 1.5 / 255 / 0.26


def test_patchify_order_by_hand():
    p, m, tp = 2, 2, 2
    t_in, c, h, w = 4, 3, 8, 4
    frames = torch.arange(t_in * c * h * w, dtype=torch.float32).reshape(t_in, c, h, w)
    pv, grid = patchify(frames, p, m, tp)
    gt, gh, gw = grid.tolist()
    assert (gt, gh, gw) == (2, 4, 2) and pv.shape == (16, c * tp * p * p)
    for t in range(gt):
        for br in range(gh // m):
            for bc in range(gw // m):
                for mr in range(m):
                    for mc in range(m):
                        row = (((t * (gh // m) + br) * (gw // m) + bc) * m + mr) * m + mc
                        y0, x0 = (br * m + mr) * p, (bc * m + mc) * p
                        want = frames[t * tp : (t + 1) * tp, :, y0 : y0 + p, x0 : x0 + p].permute(1, 0, 2, 3)
                        assert torch.equal(pv[row], want.reshape(-1))


def test_patchify_image_repeats_frame_and_rejects_bad_sizes():
    img = torch.rand(1, 3, 28, 56)
    pv, grid = patchify(img)
    pv2, _ = patchify(img.expand(2, -1, -1, -1))
    assert grid.tolist() == [1, 2, 4] and torch.equal(pv, pv2)
    with pytest.raises(DataError, match="multiple of patch"):
        patchify(torch.rand(1, 3, 30, 28))
    with pytest.raises(DataError, match="temporal patch"):
        patchify(torch.rand(3, 3, 28, 28))


# ----------------------------------------------------------------------------------------------------------
# Plans: sizes and budgets (hand-computed)


def test_plans_hand_computed():
    small = plan_video((64, 64, 16), spacing=(1.0, 1.0, 2.5))  # the CPU demo's volume
    assert small.text_shape == (56, 56, 16) and small.grids == ((8, 4, 4),) and small.num_tokens == 32
    assert small.second_per_grid_t == pytest.approx(2 * 2.5 / MM_PER_SECOND)
    ct = plan_video((512, 512, 100), spacing=(0.7, 0.7, 1.0))  # long CT: M3D-like 32 × 224²
    assert ct.text_shape == (224, 224, 32) and ct.num_tokens == 1024
    assert ct.second_per_grid_t == pytest.approx(2 * (100 / 32) / MM_PER_SECOND)
    odd = plan_video((64, 48, 15))
    assert (
        odd.text_shape == (56, 56, 16)
        and odd.depth_pad == 1
        and [s.name for s in odd.steps] == ["resize", "pad"]
    )
    assert odd.second_per_grid_t == 1.0  # no spacing: nominal 2-fps video
    shrink = plan_video((512, 512, 24))  # 12 steps: in-plane shrinks to 81 tokens per step, depth kept
    assert shrink.text_shape == (252, 252, 24) and shrink.num_tokens == 12 * 81
    trade = plan_video((256, 256, 40))  # 20 steps × 64 tokens > 1024: keep 224² and resample depth to 32
    assert trade.text_shape == (224, 224, 32) and trade.num_tokens == 1024
    assert plan_video((256, 256, 40), max_slices=16).text_shape == (252, 252, 16)
    img = plan_image((1841, 1955), max_vision_tokens=256)
    assert img.text_shape == (420, 448) and img.num_tokens == 240
    sl = plan_slices((100, 80, 40), num_slices=8, max_vision_tokens=256)
    assert sl.slice_indices == (2, 7, 12, 17, 22, 27, 32, 37) and sl.text_shape == (112, 84, 40)
    assert sl.num_tokens == 8 * 12
    mt = plan_montage((64, 64, 32), num_tiles=10, max_vision_tokens=256)
    assert mt.layout == (3, 4) and mt.text_shape == (56, 56, 10) and mt.num_tokens == 12 * 4
    assert mt.slice_indices == (1, 4, 8, 11, 14, 17, 20, 24, 27, 30)


def test_region_centres_slices_and_montage():
    frame = CoordinateFrame((40, 40, 60))
    sl = plan_slices((40, 40, 60), num_slices=8, z_range=(20, 24))  # extent 4 × 2 < 8 → 8-slice window
    assert sl.window == (18, 26) and sl.slice_indices == tuple(range(18, 26))
    wide = plan_slices((40, 40, 60), num_slices=4, z_range=(50, 60))  # 20-slice window clamped to the end
    assert wide.window == (40, 60) and wide.slice_indices == (42, 47, 52, 57)
    mt = plan_montage((40, 40, 60), num_tiles=4, z_range=(10, 14))
    assert mt.window == (8, 16) and [s.name for s in mt.steps] == ["crop", "resize"]
    vol = torch.rand(1, 40, 40, 60)
    tv = tokenize_slices(vol, frame, num_slices=8, region=[5, 5, 20, 9, 9, 24])
    assert tv.slice_indices == tuple(range(18, 26))
    with pytest.raises(BoxError, match="outside"):
        tokenize_slices(vol, frame, region=[0, 0, 70, 5, 5, 80])


@settings(max_examples=150, deadline=None)
@given(
    st.integers(8, 700),
    st.integers(8, 700),
    st.integers(1, 300),
    st.sampled_from([16, 64, 256, 1024, 4096]),
    st.integers(1, 24),
)
def test_budget_respected_for_every_strategy(nx, ny, nz, budget, k):
    plans = [
        lambda: plan_video((nx, ny, nz), max_vision_tokens=budget),
        lambda: plan_slices((nx, ny, nz), num_slices=k, max_vision_tokens=budget),
        lambda: plan_montage((nx, ny, nz), num_tiles=k, max_vision_tokens=budget),
        lambda: plan_image((nx, ny), max_vision_tokens=budget),
    ]
    for make in plans:
        try:
            plan = make()
        except ConfigError:
            # Only a budget of a few tokens per slice/tile, or an extreme aspect ratio, may fail.
            assert budget < 4 * 2 * k or max(nx, ny) / min(nx, ny) > 4
            continue
        assert 0 < plan.num_tokens <= budget
        assert plan.num_tokens == sum(SPEC.tokens(g) for g in plan.grids)
        shape = plan.text_shape
        if plan.strategy in ("video", "image"):
            _t, gh, gw = plan.grids[0]
            assert (shape[0], shape[1]) == (gw * 14, gh * 14) and shape[0] % 28 == 0 and shape[1] % 28 == 0
        if plan.strategy == "video":
            assert shape[2] == 2 * plan.grids[0][0] and shape[2] <= nz + 1
        if plan.strategy == "slices":
            idx = plan.slice_indices
            assert list(idx) == sorted(set(idx)) and idx[0] >= 0 and idx[-1] < nz and shape[2] == nz
        if plan.strategy == "montage":
            rows, cols = plan.layout
            assert rows * cols >= shape[2] and plan.grids[0][1] * 14 == rows * shape[1]


# ----------------------------------------------------------------------------------------------------------
# Frames: exact box round trips through every strategy and both codecs


def _incoming(draw, shape):
    """A random data-pipeline frame ending at ``shape`` (source → crop/flip/resize → tensor grid)."""
    kind = draw(st.sampled_from(["identity", "crop", "flip", "resize"]))
    if kind == "identity":
        return CoordinateFrame(shape)
    if kind == "flip":
        return CoordinateFrame(shape).then(flip_step(shape, [0]))
    if kind == "crop":
        src = tuple(n + 7 for n in shape)
        return CoordinateFrame(src).then(
            crop_step(src, (3, 2, 1)[: len(shape)], tuple(a + n for a, n in zip((3, 2, 1), shape)))
        )
    src = tuple(2 * n + 1 for n in shape)
    return CoordinateFrame(src).then(resize_step(src, shape))


@st.composite
def case(draw):
    strategy = draw(st.sampled_from(["image", "video", "slices", "montage"]))
    nx, ny = draw(st.integers(10, 400)), draw(st.integers(10, 400))
    shape = (nx, ny) if strategy == "image" else (nx, ny, draw(st.integers(2, 120)))
    frame = _incoming(draw, shape)
    lo = [draw(st.integers(0, n - 1)) for n in shape]
    hi = [draw(st.integers(a + 1, n)) for a, n in zip(lo, shape)]
    box = frame.to_voxel(np.asarray(lo + hi, dtype=float))[0]  # a voxel-frame box inside the tensor
    spacing = (1.0, 1.0, draw(st.floats(0.5, 6.0)))
    budget = draw(st.sampled_from([256, 1024, 2048]))
    return strategy, frame, box, spacing, budget, draw(st.sampled_from(["qwen2.5-vl", "qwen2-vl"]))


def _plan(strategy, shape, spacing, budget, region_z=None):
    if strategy == "image":
        return plan_image(shape, max_vision_tokens=budget)
    if strategy == "video":
        return plan_video(shape, spacing=spacing, max_vision_tokens=budget)
    if strategy == "slices":
        return plan_slices(shape, num_slices=8, z_range=region_z, max_vision_tokens=budget)
    return plan_montage(shape, num_tiles=16, z_range=region_z, max_vision_tokens=budget)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case())
def test_box_round_trip_voxel_text_voxel(data):
    strategy, incoming, box, spacing, budget, codec_name = data
    region_z = None
    if strategy in ("slices", "montage"):
        z = incoming.to_text(box)[0]
        region_z = (float(z[2]), float(z[5]))
    plan = _plan(strategy, incoming.shape, spacing, budget, region_z)
    frame = incoming.extend(plan.steps)
    assert frame.shape == plan.text_shape and frame.exact
    text = frame.to_text(box)[0]
    np.testing.assert_allclose(frame.to_voxel(text)[0], box, atol=1e-9)  # exact in floats
    codec = get_codec(codec_name)
    decoded = np.asarray(codec.decode(codec.encode(text, frame.shape), frame.shape))
    back = frame.to_voxel(decoded)[0]
    text_step = np.asarray(codec.step(frame.shape))
    # Rounding to the codec's integers moves each text edge by ≤ half a step; in voxels, times the voxel size
    # of one text unit. A montage window may cut the region in z: those edges land on the window's edges.
    tol = np.tile(text_step / 2 * frame.text_scale(), 2) + 1e-9
    expected = box.copy()
    if strategy == "montage":
        window = frame.to_voxel([0, 0, 0, *frame.shape])[0]
        expected[[2, 5]] = np.clip(box[[2, 5]], window[2], window[5])
    assert np.all(np.abs(back - expected) <= tol)


def unpatchify(pixel_values: torch.Tensor, grid: list[int]) -> torch.Tensor:
    """Inverse of the Qwen-VL patch order (by hand) → channel-0 intensities in [0, 1], ``(T, H, W)``."""
    t, gh, gw = grid
    x = pixel_values.reshape(t, gh // 2, gw // 2, 2, 2, 3, 2, 14, 14)[:, :, :, :, :, 0]  # channel 0
    x = x.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(t * 2, gh * 14, gw * 14)  # (t·tp, rows, cols)
    return x * SPEC.image_std[0] + SPEC.image_mean[0]


@pytest.mark.parametrize("strategy", ["image", "video", "slices", "montage"])
def test_display_orientation_box_lands_where_the_frame_says(strategy):
    """A bright block at a voxel box must appear at frame.to_text(box): x = column, y = row, z = frame/slice/tile."""
    box = np.array([40, 10, 6, 60, 30, 12]) if strategy != "image" else np.array([40, 10, 60, 30])
    shape = (100, 60, 18) if strategy != "image" else (100, 60)
    vol = torch.zeros(1, *shape)
    vol[(0, *(slice(int(a), int(b)) for a, b in zip(box[: len(shape)], box[len(shape) :])))] = 1.0
    tv = VisualTokenizer(max_vision_tokens=256)(
        vol, CoordinateFrame(shape), spacing=(1, 1, 2), strategy=strategy
    )
    text = tv.frame.to_text(box)[0]
    key = "pixel_values_videos" if strategy == "video" else "pixel_values"
    sizes = [int(g.prod()) for g in tv.grid_thw]
    images = [unpatchify(pv, g.tolist()) for pv, g in zip(tv.pixel_inputs[key].split(sizes), tv.grid_thw)]
    if strategy in ("image", "video"):
        stack = images[0][:: 1 if strategy == "video" else 2]  # (z, rows, cols)
    elif strategy == "slices":
        stack = torch.stack([im[0] for im in images])  # one image per labelled slice
    else:
        tw, th, k = tv.frame.shape
        cols = tv.plan.layout[1]
        canvas = images[0][0]
        stack = torch.stack([canvas[(t // cols) * th : (t // cols + 1) * th, (t % cols) * tw : (t % cols + 1) * tw]
                             for t in range(k)])  # fmt: skip
    x1, y1, x2, y2 = (text[0], text[1], text[-3], text[-2]) if strategy != "image" else tuple(text)
    inner = stack[:, math.ceil(y1) + 2 : math.floor(y2) - 2, math.ceil(x1) + 2 : math.floor(x2) - 2]
    outer = stack.clone()
    outer[
        :, max(0, math.floor(y1) - 3) : math.ceil(y2) + 3, max(0, math.floor(x1) - 3) : math.ceil(x2) + 3
    ] = 0
    assert outer.max() < 0.05
    if strategy == "image":
        assert inner.min() > 0.95
        return
    z1, z2 = text[2], text[5]
    if strategy == "slices":  # text z = the labelled slice numbers
        zs = [i for i, k in enumerate(tv.slice_indices) if z1 <= k < z2]
        others = [i for i, k in enumerate(tv.slice_indices) if not z1 - 1 <= k < z2 + 1]
    else:  # text z = frame index (video) or tile index (montage), on the resampled depth grid
        zs = list(range(math.ceil(z1) + 1, math.floor(z2) - 1))
        others = [z for z in range(stack.shape[0]) if not math.floor(z1) - 1 <= z < math.ceil(z2) + 1]
    assert zs and others
    assert inner[zs].min() > 0.9
    assert stack[others].max() < 0.05


def test_slices_text_z_is_the_labelled_slice_index():
    vol = torch.rand(1, 60, 50, 30)
    tv = tokenize_slices(vol, CoordinateFrame((60, 50, 30)), num_slices=5, max_vision_tokens=100)
    assert tv.slice_indices == (3, 9, 15, 21, 27)
    texts = [p["text"] for p in tv.content if p["type"] == "text"]
    assert texts == ["Slice 3: ", "\nSlice 9: ", "\nSlice 15: ", "\nSlice 21: ", "\nSlice 27: "]
    box = tv.frame.to_text([10, 10, 9, 20, 20, 22])[0]
    assert box[2] == 9 and box[5] == 22  # z untouched: the numbers the prompt shows
    assert tv.grid_thw.shape == (5, 3) and tv.num_tokens == 5 * int(tv.grid_thw[0].prod()) // 4 <= 100


def test_montage_tiles_hold_the_resampled_slabs():
    vol = torch.zeros(1, 56, 56, 8)
    for z in range(8):
        vol[0, :, :, z] = (z // 2) / 10  # slab t = slices 2t, 2t + 1 holds t / 10
    tv = tokenize_montage(vol, CoordinateFrame((56, 56, 8)), num_tiles=4, max_vision_tokens=4)
    assert tv.plan.layout == (2, 2) and tv.frame.shape == (28, 28, 4) and tv.slice_indices == (1, 3, 5, 7)
    # tile t covers slices [2t, 2t + 2): a box on slices 2..3 is tile 1.
    np.testing.assert_allclose(tv.frame.to_text([0, 0, 2, 56, 56, 4])[0], [0, 0, 1, 28, 28, 2])
    pv = tv.pixel_inputs["pixel_values"].reshape(2, 2, 2, 2, 3, 2, 14, 14)  # (bh, bw, mh, mw, C, tp, p, p)
    mean, std = SPEC.image_mean[0], SPEC.image_std[0]
    for t in range(4):
        r, c = divmod(t, 2)  # a 28-pixel tile is exactly one merge window
        tile = pv[r, c, :, :, 0, 0] * std + mean
        # The anti-aliased z filter averages a symmetric neighbourhood: exact inside, edge tiles lean inward.
        assert torch.allclose(tile, torch.full_like(tile, t / 10), atol=1e-5 if t in (1, 2) else 0.02)


def test_montage_unused_tiles_are_black():
    tv = tokenize_montage(torch.ones(1, 28, 28, 3), CoordinateFrame((28, 28, 3)), num_tiles=3)
    assert tv.plan.layout == (2, 2)
    windows = tv.pixel_inputs["pixel_values"].reshape(2, 2, 2, 2, 3, 2, 14, 14)  # a 28-pixel tile per window
    for ch in range(3):
        black = -SPEC.image_mean[ch] / SPEC.image_std[ch]
        white = (1 - SPEC.image_mean[ch]) / SPEC.image_std[ch]
        assert torch.allclose(windows[1, 1, :, :, ch], torch.full((2, 2, 2, 14, 14), black))
        assert torch.allclose(windows[0, 0, :, :, ch], torch.full((2, 2, 2, 14, 14), white))


def test_video_pads_with_the_last_slice_and_records_it():
    vol = torch.rand(1, 56, 56, 5)
    tv = tokenize_video(vol, CoordinateFrame((56, 56, 5)), spacing=(1, 1, 3))
    assert tv.frame.shape == (56, 56, 6) and tv.grid_thw.tolist() == [[3, 4, 4]]
    pv = tv.pixel_inputs["pixel_values_videos"].reshape(3, 16, 3, 2, 14, 14)  # (t, patch, C, tp, p, p)
    assert torch.equal(pv[2, :, :, 0], pv[2, :, :, 1])  # slice 4 repeated as slice 5
    assert not torch.equal(pv[1, :, :, 0], pv[1, :, :, 1])
    assert tv.pixel_inputs["second_per_grid_ts"].tolist() == [pytest.approx(0.6)]


def test_tokenized_frame_matches_plan_and_pixels_match_text_grid():
    vol = torch.rand(1, 90, 70, 23)
    frame = CoordinateFrame((90, 70, 23))
    tok = VisualTokenizer(max_vision_tokens=300)
    for strategy in ("video", "slices", "montage"):
        tv = tok(vol, frame, spacing=(1, 1, 2), strategy=strategy)
        assert tv.num_tokens <= 300 and tv.frame.steps == tv.plan.steps
        patches = sum(int(g.prod()) for g in tv.grid_thw)
        key = "pixel_values_videos" if strategy == "video" else "pixel_values"
        assert tv.pixel_inputs[key].shape == (patches, 3 * 2 * 14 * 14)
    img = tok(torch.rand(1, 90, 70), CoordinateFrame((90, 70)))
    assert img.strategy == "image" and img.frame.shape == (84, 56)  # smart_resize: 70 → 56 rows, 90 → 84 cols


def test_bad_inputs_raise_named_errors():
    frame = CoordinateFrame((56, 56, 4))
    with pytest.raises(DataError, match="ends at grid"):
        tokenize_video(torch.rand(1, 56, 56, 6), frame)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        tokenize_video(torch.rand(1, 56, 56, 4) * 1000, frame)
    with pytest.raises(DataError, match="channel-first 3D"):
        tokenize_video(torch.rand(56, 56, 4), frame)
    with pytest.raises(DataError, match="channels"):
        tokenize_video(torch.rand(2, 56, 56, 4), frame)
    with pytest.raises(ConfigError, match="max_vision_tokens"):
        tokenize_slices(torch.rand(1, 56, 56, 4), frame, num_slices=4, max_vision_tokens=3)
    with pytest.raises(ConfigError, match="does not fit"):
        VisualTokenizer()(torch.rand(1, 56, 56), CoordinateFrame((56, 56)), strategy="video")
    with pytest.raises(DataError, match="spacing"):
        plan_video((56, 56, 4), spacing=(1, 1, 0))


# ----------------------------------------------------------------------------------------------------------
# Model inputs: placeholders, padding, mm_token_type_ids, temporal positions


def test_build_model_inputs_equals_tokenizing_the_expanded_prompt(policy):
    tok = policy.tokenizer
    vid = tokenize_video(torch.rand(1, 56, 56, 8), CoordinateFrame((56, 56, 8)), spacing=(1, 1, 2))
    img = tokenize_image(torch.rand(1, 60, 30), CoordinateFrame((60, 30)))
    prompts = [
        "<|vision_start|><|video_pad|><|vision_end|>find it",
        "a<|vision_start|><|image_pad|><|vision_end|>b<|vision_start|><|video_pad|><|vision_end|>",
    ]
    batch = build_model_inputs(prompts, [vid, [img, vid]], tok, SPEC)
    expanded = [
        prompts[0].replace("<|video_pad|>", "<|video_pad|>" * vid.num_tokens),
        prompts[1]
        .replace("<|image_pad|>", "<|image_pad|>" * img.num_tokens)
        .replace("<|video_pad|>", "<|video_pad|>" * vid.num_tokens),
    ]
    ref = tok(expanded, padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
    types = batch["mm_token_type_ids"]
    assert int((types == 2).sum()) == 2 * vid.num_tokens and int((types == 1).sum()) == img.num_tokens
    assert torch.equal(
        types, build_mm_token_type_ids(batch["input_ids"], policy.image_token_id, policy.video_token_id)
    )
    assert batch["video_grid_thw"].tolist() == [[4, 4, 4]] * 2 and batch["image_grid_thw"].tolist() == [
        [1, 4, 6]
    ]
    assert batch["pixel_values_videos"].shape[0] == 2 * 64 and batch["pixel_values"].shape[0] == 24
    assert batch["second_per_grid_ts"].tolist() == [pytest.approx(0.4)] * 2
    with pytest.raises(ConfigError, match="prompt 0: placeholders"):
        build_model_inputs(["<|image_pad|>"], [vid], tok, SPEC)


def _video_batch(policy, spacing_z):
    spec = VisionSpec.from_policy(policy)
    vol = torch.rand(1, 56, 56, 8, generator=torch.Generator().manual_seed(0))
    tv = tokenize_video(vol, CoordinateFrame((56, 56, 8)), spec, spacing=(1.0, 1.0, spacing_z))
    messages = build_messages("the lesion", 3, **tv.prompt_kwargs())
    prompt = render_prompt(policy.tokenizer, messages)
    return tv, build_model_inputs([prompt], [tv], policy.tokenizer, spec)


def test_z_spacing_sets_temporal_positions(policy):
    tps = policy.model.config.vision_config.tokens_per_second
    temporal = {}
    for dz in (2.5, 5.0):
        _tv, batch = _video_batch(policy, dz)
        pos, _ = policy.model.model.get_rope_index(
            batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], video_grid_thw=batch["video_grid_thw"],
            second_per_grid_ts=batch["second_per_grid_ts"], attention_mask=batch["attention_mask"],
        )  # fmt: skip
        is_video = batch["mm_token_type_ids"][0] == 2
        t_pos = pos[0, 0, is_video].reshape(4, 4)  # grid (4, 4, 4): 4 temporal steps × 2 × 2 merged tokens
        start = int(is_video.nonzero()[0])
        assert torch.all(t_pos == t_pos[:, :1])
        # Hand formula: position = start + floor(t · tokens_per_second · (2 · dz / MM_PER_SECOND)).
        expected = [start + math.floor(t * tps * 2 * dz / MM_PER_SECOND + 1e-6) for t in range(4)]
        assert t_pos[:, 0].tolist() == expected
        temporal[dz] = t_pos[:, 0] - start
    assert temporal[2.5].tolist() == [0, 2, 4, 6] and temporal[5.0].tolist() == [0, 4, 8, 12]


def test_mm_token_type_ids_drive_the_3d_positions(policy):
    _, batch = _video_batch(policy, 2.5)
    model = policy.model.eval()
    with torch.no_grad():
        with_types = model(**batch).logits
        model.model.rope_deltas = None
        without = model(**{k: v for k, v in batch.items() if k != "mm_token_type_ids"}).logits
        model.model.rope_deltas = None
    assert torch.isfinite(with_types).all()
    assert (
        with_types - without
    ).abs().max() > 1e-4  # without the types Qwen2.5-VL falls back to 1D positions


# ----------------------------------------------------------------------------------------------------------
# End to end with the tiny policy


def test_tiny_model_forward_on_every_strategy_in_one_batch(policy):
    spec = VisionSpec.from_policy(policy)
    tok = VisualTokenizer(spec, max_vision_tokens=64)
    vol = torch.rand(1, 64, 64, 12)
    vframe = CoordinateFrame((64, 64, 12))
    visuals = [
        tok(torch.rand(1, 80, 60), CoordinateFrame((80, 60))),
        tok(vol, vframe, spacing=(1, 1, 3)),
        tok(vol, vframe, strategy="slices", region=[10, 10, 3, 20, 20, 6]),
        tok(vol, vframe, strategy="montage"),
    ]
    prompts = [
        render_prompt(policy.tokenizer, build_messages("the lesion", v.ndim, **v.prompt_kwargs()))
        for v in visuals
    ]
    batch = build_model_inputs(prompts, visuals, policy.tokenizer, spec)
    assert batch["image_grid_thw"].shape[0] == 1 + 8 + 1  # image, 8 slices, montage
    with torch.no_grad():
        out = policy.model(**batch)
    policy.model.model.rope_deltas = None
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.logits).all()


def test_qwen2_vl_spec_has_no_second_per_grid_ts():
    pol = build_tiny_policy(family="qwen2-vl", num_layers=1, vision_depth=1)
    spec = VisionSpec.from_policy(pol)
    assert not spec.uses_second_per_grid_ts
    tv = tokenize_video(torch.rand(1, 56, 56, 4), CoordinateFrame((56, 56, 4)), spec, spacing=(1, 1, 1))
    assert "second_per_grid_ts" not in tv.pixel_inputs
    prompt = render_prompt(pol.tokenizer, build_messages("x", 3, **tv.prompt_kwargs()))
    batch = build_model_inputs([prompt], [tv], pol.tokenizer, spec)
    with torch.no_grad():
        assert torch.isfinite(pol.model(**batch).logits).all()
