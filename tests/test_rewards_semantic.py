"""Semantic consistency reward: crops, intensity statistics, encoders (radiomics, tiny CLIP, the policy's tower),
calibration. The property study over sources and pipelines is tested in test_semantic_property.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mg3d.errors import ConfigError
from mg3d.rewards import RewardTarget, SemanticReward, crop_regions
from mg3d.rewards.encoders import (
    CLIPRegionEncoder,
    PolicyVisionEncoder,
    RadiomicsEncoder,
    RegionEncoder,
    _orthants,
    _radius,
    build_encoder,
    focal_contrast,
    one_sided_difference,
)
from mg3d.rewards.intensity import IntensityStats, foreground_mask, intensity_stats, noise_level, padding_mask


def ans2(box: list[float]) -> str:
    return f'<think>ok</think><answer>{{"bbox_2d": {box}}}</answer>'


def ans3(box: list[float]) -> str:
    return f'<think>ok</think><answer>{{"bbox_3d": {box}}}</answer>'


class MeanIntensityEncoder(RegionEncoder):
    """A transparent encoder for hand-computed rewards: the embedding is the crop's windowed mean."""

    similarity_floor = 0.0

    def crop_size(self, ndim: int) -> tuple[int, ...]:
        return (4,) * ndim

    def embed_regions(
        self, crops: torch.Tensor, stats: IntensityStats, inner_fraction: float
    ) -> torch.Tensor:
        return stats.window(crops).reshape(crops.shape[0], -1).mean(1, keepdim=True)

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 1.0 - (a - b).abs().sum(-1)


# ------------------------------------------------------------------------------------------------ crops, stats


def test_crop_regions_is_exact_on_aligned_boxes() -> None:
    img = torch.arange(48, dtype=torch.float32).reshape(8, 6)
    out = crop_regions(img, np.array([[2, 1, 4, 5]]), (2, 4), margin=0.0)
    torch.testing.assert_close(out[0], img[2:4, 1:5])
    vol = torch.arange(120, dtype=torch.float32).reshape(4, 5, 6)
    out = crop_regions(vol, np.array([[1, 1, 1, 3, 4, 5]]), (2, 3, 4), margin=0.0)
    torch.testing.assert_close(out[0], vol[1:3, 1:4, 1:5])
    # margin 0.5 doubles the extent: box [2, 2, 4, 4] → region [1, 1, 5, 5] sampled at 4 × 4
    out = crop_regions(img, np.array([[2, 2, 4, 4]]), (4, 4), margin=0.5)
    torch.testing.assert_close(out[0], img[1:5, 1:5])
    # outside the image the border is replicated: box [-2, 0, 0, 2] at 2 × 2 samples column 0
    out = crop_regions(img, np.array([[-2, 0, 0, 2]]), (2, 2), margin=0.0)
    torch.testing.assert_close(out[0], img[[0, 0]][:, 0:2])
    assert crop_regions(img, np.zeros((0, 4)), (3, 3), 0.5).shape == (0, 3, 3)


def test_intensity_stats_window_and_equalise() -> None:
    img = np.arange(100, dtype=np.float32).reshape(10, 10)  # uniform 0..99
    s = intensity_stats(img)
    assert s.lo == pytest.approx(0.495) and s.hi == pytest.approx(98.505)
    # the empirical CDF of a uniform ramp is linear: 49.5 sits at the median
    assert float(s.equalise(torch.tensor([49.5]))) == pytest.approx(0.5, abs=1e-3)
    assert float(s.equalise(torch.tensor([-5.0]))) == 0.0 and float(s.equalise(torch.tensor([500.0]))) == 1.0
    assert float(s.window(torch.tensor([0.495 + 98.01 / 2]))) == pytest.approx(0.5)
    assert intensity_stats(np.zeros((8, 8))).noise == 0.0


def _flat_background_head(seed: int = 0) -> tuple[np.ndarray, list[list[int]]]:
    """A skull-stripped-head-like volume (most voxels exactly 0 HU outside, parenchyma 38 ± 3 HU) with a
    hypodense (−50 HU) and a hyperdense (+50 HU) lesion; returns the volume and the two lesions' boxes."""
    rng = np.random.default_rng(seed)
    shape = (64, 64, 24)
    grid = np.meshgrid(*[(np.arange(n) + 0.5 - n / 2) / (n / 2) for n in shape], indexing="ij")
    inside = grid[0] ** 2 + grid[1] ** 2 <= 0.6**2
    vol = np.where(inside, 38.0 + rng.normal(0.0, 3.0, shape), 0.0).astype(np.float32)
    boxes = []
    for (cx, cy, cz), delta in (((24, 26, 12), -50.0), ((40, 38, 12), 50.0)):
        zz, yy, xx = np.meshgrid(np.arange(64), np.arange(64), np.arange(24), indexing="ij")
        blob = (zz - cx) ** 2 + (yy - cy) ** 2 + ((xx - cz) * 1.5) ** 2 <= 9
        vol[blob] += delta
        idx = np.nonzero(blob)
        boxes.append([int(a.min()) for a in idx] + [int(a.max()) + 1 for a in idx])
    return vol, boxes


def test_noise_and_scale_come_from_the_body_not_the_padding() -> None:
    """Issue 24, causes 1 and 2: a mostly-zero outside made the noise 0 and the robust window [0, 54] HU."""
    vol, _ = _flat_background_head()
    fg = foreground_mask(vol, "HU")
    assert fg.sum() < 0.5 * vol.size and not fg[vol == 0].any()
    assert noise_level(vol, fg) == pytest.approx(3.0, rel=0.2)  # the parenchyma's own σ
    assert noise_level(vol) < 0.5  # what the whole image says: the outside's zero differences dominate
    hu = intensity_stats(vol, "HU")
    assert (hu.lo, hu.hi) == (-1000.0, 1000.0) and hu.unit == "HU"  # fixed by the unit, not the image
    unknown = intensity_stats(vol)  # unknown unit: the foreground's own range
    assert unknown.unit is None and unknown.lo > -20 and unknown.hi < 100
    assert padding_mask(vol)[vol == 0].all() and not padding_mask(vol)[fg].any()


def test_reference_crops_are_centred_on_the_body() -> None:
    """Issue 24, cause 3: reference crops half in the flat outside made any tissue outrank them."""
    from mg3d.rewards.semantic import _reference_boxes

    vol, boxes = _flat_background_head()
    fg = foreground_mask(vol, "HU")
    refs = _reference_boxes(fg, np.asarray(boxes[0], dtype=float), 64, seed=3)
    centres = np.floor((refs[:, :3] + refs[:, 3:]) / 2).astype(int)
    assert fg[tuple(centres.T)].mean() > 0.9  # the shift back inside the image may move a few to the rim
    assert np.all(refs[:, :3] >= 0) and np.all(refs[:, 3:] <= np.asarray(vol.shape))


def test_opposite_density_lesion_beats_tissue_and_padding_in_hu() -> None:
    """The other lesion has the opposite density of the target: it must still outrank parenchyma and the
    flat outside (the issue measured 0/111 such pairs before physical scales)."""
    vol, boxes = _flat_background_head()
    target = RewardTarget("head", boxes=[boxes[0]], image=vol, spacing=(1.0, 1.0, 1.5), unit="HU")
    other = boxes[1]
    size = np.subtract(boxes[0][3:], boxes[0][:3])
    tissue = [30, 14, 6, *(np.array([30, 14, 6]) + size)]
    outside = [2, 2, 6, *(np.array([2, 2, 6]) + size)]
    reward = SemanticReward()
    _, values = reward.similarities(target, np.asarray([boxes[0], other, tissue, outside], dtype=float))
    assert values[0] == 1.0
    assert values[1] > values[2] and values[1] > values[3]
    with pytest.raises(ConfigError, match="unknown intensity unit"):
        reward.similarities(
            RewardTarget("x", boxes=[boxes[0]], image=vol, unit="mmHg"), np.asarray([boxes[0]], dtype=float)
        )


def test_radiomics_embedding_by_hand() -> None:
    # 48 × 48 zeros with a 24 × 24 square of 100; the box is the square, margin 0.5 → the crop is the image
    img = np.zeros((48, 48), np.float32)
    img[12:36, 12:36] = 100.0
    enc = RadiomicsEncoder()  # 2D crops are 48 × 48: one sample per pixel
    crops = crop_regions(img, np.array([[12, 12, 36, 36]]), enc.crop_size(2), 0.5)
    emb = enc.embed_regions(crops, intensity_stats(img), 0.5)
    # level: both core quartiles at 100 of window 0..100 → 1, 1; enclosure 0; offset 0; isotropy 1 · 0.5; fill · 0.5
    # where the opening with the 4-neighbour cross removes the square's 4 corner pixels: fill = 572 / 576;
    # focal: at scale 0.7 × the box the core is all 100 and the ring all 0 (spread 0 → the floor 1e-6 × span
    # 100), z = 1e6, z² / (z² + 1.25²) = 1 to float precision, × weight 2.5
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1.0, 0.0, 0.0, 0.5 * 572 / 576, 0.5, 2.5]))
    assert float(enc.similarity(emb, emb)) == 1.0
    no_focal = RadiomicsEncoder(focal_weight=0.0).embed_regions(crops, intensity_stats(img), 0.5)
    torch.testing.assert_close(no_focal, emb[:, :6])
    with pytest.raises(ConfigError):
        RadiomicsEncoder(
            level_weight=0,
            enclosure_weight=0,
            offset_weight=0,
            fill_weight=0,
            isotropy_weight=0,
            focal_weight=0,
        )


def _focal_crop(core: float, quadrant_medians: tuple[float, float, float, float]) -> np.ndarray:
    """A 12 × 12 crop: centre 2 × 2 at ``core``; the ring of scale 0.25 (Chebyshev radius 5/12 or 7/12, 12 voxels
    per quadrant) at each quadrant's median ± 1 in a checkerboard (6 and 6: median m, MAD 1)."""
    x = np.zeros((12, 12), np.float32)
    checker = np.where(np.add.outer(np.arange(12), np.arange(12)) % 2 == 0, 1.0, -1.0)
    for q, m in enumerate(quadrant_medians):
        rows = slice(6, 12) if q & 1 else slice(0, 6)  # orthant bit 0: axis 0 > centre
        cols = slice(6, 12) if q & 2 else slice(0, 6)  # bit 1: axis 1 > centre
        x[rows, cols] = m + checker[rows, cols]
    x[5:7, 5:7] = core
    return x


def test_one_sided_focal_similarity_by_hand() -> None:
    # the focal feature is the last column; a candidate is penalised only where it is *less* focal
    enc = RadiomicsEncoder(kernel_width=1.0)
    ref = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.25, 0.5, 0.4]])
    more_focal = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.25, 0.5, 1.8]])
    less_focal = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.25, 0.5, 0.0]])
    other_level = torch.tensor([[0.8, 0.5, 0.0, 0.0, 0.25, 0.5, 1.8]])
    torch.testing.assert_close(
        one_sided_difference(more_focal[:, -1:], ref[:, -1:]).float(), torch.zeros(1, 1)
    )
    torch.testing.assert_close(
        one_sided_difference(less_focal[:, -1:], ref[:, -1:]).float(), torch.tensor([[0.4]])
    )
    assert float(enc.similarity(more_focal, ref)) == 1.0
    assert float(enc.similarity(less_focal, ref)) == pytest.approx(np.exp(-(0.4**2) / 2))
    # the other columns stay two-sided: d² = 0.3² from the level only
    assert float(enc.similarity(other_level, ref)) == pytest.approx(np.exp(-(0.3**2) / 2))
    # symmetric when switched off: the focal gap counts whichever way
    sym = RadiomicsEncoder(kernel_width=1.0, focal_one_sided=False)
    assert float(sym.similarity(more_focal, ref)) == pytest.approx(np.exp(-(1.4**2) / 2))
    # broadcasting as the reward calls it: (N, 1, D) candidates against (1, K, D) references
    both = enc.similarity(torch.cat([more_focal, less_focal])[:, None], ref[None])
    assert both.shape == (2, 1)
    assert float(both[0, 0]) == 1.0 and float(both[1, 0]) == pytest.approx(np.exp(-(0.4**2) / 2))


def test_one_sided_shape_similarity_by_hand() -> None:
    # columns: level ×2, enclosure, offset, fill, isotropy, focal; issue 24 fifth round: a candidate pays for the
    # shape only where it is *less* of an enclosed (lower), centred (lower), compact (higher), round (higher) blob
    enc = RadiomicsEncoder(kernel_width=1.0)
    assert enc._sided.tolist() == [0, 0, -1, -1, 1, 1, 1]
    ref = torch.tensor([[0.5, 0.5, 0.5, 0.2, 0.25, 0.25, 0.4]])
    more_blob = torch.tensor([[0.5, 0.5, 0.1, 0.0, 0.45, 0.5, 0.4]])
    less_blob = torch.tensor([[0.5, 0.5, 0.8, 0.5, 0.1, 0.1, 0.4]])
    assert float(enc.similarity(more_blob, ref)) == 1.0
    # d² = 0.3² (enclosure) + 0.3² (offset) + 0.15² (fill) + 0.15² (isotropy) = 0.225
    assert float(enc.similarity(less_blob, ref)) == pytest.approx(np.exp(-0.225 / 2))
    # two-sided when switched off: 0.4² + 0.2² + 0.2² + 0.25² = 0.3025 for the more blob-like candidate
    sym = RadiomicsEncoder(kernel_width=1.0, shape_one_sided=False)
    assert sym._sided.tolist() == [0, 0, 0, 0, 0, 0, 1]
    assert float(sym.similarity(more_blob, ref)) == pytest.approx(np.exp(-0.3025 / 2))
    assert float(sym.similarity(less_blob, ref)) == pytest.approx(np.exp(-0.225 / 2))
    # the column directions follow the groups that are on: histogram (16 two-sided bins) before the focal column
    hist = RadiomicsEncoder(histogram_weight=1.0, focal_one_sided=False, offset_weight=0.0)
    assert hist._sided.tolist() == [0, 0, -1, 1, 1] + [0] * 16 + [0]


def test_focal_contrast_by_hand() -> None:
    """Issue 24: a centre standing out on every side by several spreads, either density; an edge does not."""
    radius = _radius((12, 12)).numpy()
    orthants = _orthants((12, 12))
    assert sorted(np.unique(orthants[radius >= 0.375]).tolist()) == [0, 1, 2, 3]

    def z(x: np.ndarray) -> float:
        return focal_contrast(x, radius, orthants, (0.25,), 1e-6)

    sigma = 1.4826  # MAD 1 in every quadrant
    # bright centre 20 over quadrant medians 10, 12, 10, 11: (20 − max 12) / σ
    assert z(_focal_crop(20.0, (10, 12, 10, 11))) == pytest.approx(8 / sigma, rel=1e-5)
    # dark centre 0: (min 10 − 0) / σ
    assert z(_focal_crop(0.0, (10, 12, 10, 11))) == pytest.approx(10 / sigma, rel=1e-5)
    # either density at the same distance scores the same
    assert z(_focal_crop(18.0, (10, 10, 10, 10))) == pytest.approx(z(_focal_crop(2.0, (10, 10, 10, 10))))
    # a centre between its sides (an edge between two tissues) is not focal
    assert z(_focal_crop(11.0, (10, 12, 10, 12))) == 0.0
    # several scales: the largest z wins. At scale 0.1 the ring is Chebyshev radius 3/12, 3 voxels per quadrant
    # whose checkerboard gives medians 10 − 1, 12 + 1, 10 + 1, 11 − 1 and MAD 0, so the floor (here 1) is σ:
    # z = (20 − 13) / 1 = 7 > 8 / 1.4826
    crop = _focal_crop(20.0, (10, 12, 10, 11))
    assert focal_contrast(crop, radius, orthants, (0.25, 0.1), 1.0) == pytest.approx(7.0)
    assert focal_contrast(crop, radius, orthants, (0.25,), 1.0) == pytest.approx(8 / sigma, rel=1e-5)
    with pytest.raises(ConfigError):
        RadiomicsEncoder(focal_scales=(0.0,))
    with pytest.raises(ConfigError):
        RadiomicsEncoder(focal_z0=0.0)


def test_default_focal_scales_skip_a_spot_of_a_few_source_pixels_by_hand() -> None:
    """Issue 24, fourth round: the smallest default scale is 0.3 of the box half-size. A 4 × 4 spot at the centre
    of a 48 × 48 crop (one source pixel of a 4 × upsampled crop: what noise looks like there) fills the whole core
    of scale 0.2 but only a quarter of the 8 × 8 core of scale 0.3."""
    radius = _radius((48, 48)).numpy()
    orthants = _orthants((48, 48))
    x = np.zeros((48, 48), np.float32)
    # texture from Chebyshev radius 0.225 (the scale-0.3 ring's inner edge) outwards: −1, 0, 1 in turn, so every
    # orthant's ring has median 0 and MAD 1 (σ = 1.4826) whatever its exact voxel count
    texture = (np.add.outer(np.arange(48), 2 * np.arange(48)) % 3 - 1).astype(np.float32)
    x[radius >= 0.225] = texture[radius >= 0.225]
    x[22:26, 22:26] = 6.0
    enc = RadiomicsEncoder()
    assert min(enc.focal_scales) == 0.3
    # scale 0.3 at inner fraction 0.5: core Chebyshev radius < 0.15 = the 8 × 8 centre, mean 16 · 6 / 64 = 1.5;
    # the larger scales average the spot over more voxels (z 0.45, 0.25, 0.11), so z = 1.5 / 1.4826
    z = 1.5 / 1.4826
    radii = [s * 0.5 for s in enc.focal_scales]
    assert focal_contrast(x, radius, orthants, radii, 1e-6) == pytest.approx(z, rel=1e-5)
    emb = enc.embed_regions(torch.from_numpy(x)[None], intensity_stats(x), 0.5)
    expected = enc.focal_weight * z * z / (z * z + enc.focal_z0**2)
    assert float(emb[0, -1]) == pytest.approx(expected, rel=1e-5)
    # with the former smallest scale 0.2 the core is the spot alone (6 over a ring of mostly flat 0: z = 6 / floor)
    assert focal_contrast(x, radius, orthants, [0.1, *radii], 1.0) == pytest.approx(6.0)


# ------------------------------------------------------------------------------------------------ the reward


def _half_image() -> np.ndarray:
    img = np.zeros((16, 16), np.float32)
    img[8:, :] = 1.0  # right half (x ≥ 8) bright
    return img


def test_linear_calibration_by_hand() -> None:
    target = RewardTarget("half", boxes=[[8, 0, 16, 8]], image=_half_image())  # mean 1
    reward = SemanticReward(encoder=MeanIntensityEncoder(), calibration="linear", margin=0.0)
    texts = [
        ans2([8, 0, 16, 8]),  # the target: s = 1
        ans2([0, 0, 8, 8]),  # dark half: s = 1 − |0 − 1| = 0
        ans2([4, 0, 12, 8]),  # half dark, half bright: mean 0.5 → 0.5
        "no box",  # failure → 0
    ]
    np.testing.assert_allclose(reward(texts, [target] * 4), [1.0, 0.0, 0.5, 0.0])
    # the same in misses-only mode: the hit is not scored
    misses = SemanticReward(encoder=MeanIntensityEncoder(), calibration="linear", margin=0.0, mode="misses")
    np.testing.assert_allclose(misses(texts, [target] * 4), [np.nan, 0.0, 0.5, 0.0])
    # no image: the reward does not apply
    bare = RewardTarget("bare", boxes=[[8, 0, 16, 8]])
    assert np.isnan(reward(texts[:1], [bare])).all()


def test_rank_calibration_is_monotone_and_one_at_the_target() -> None:
    target = RewardTarget("half", boxes=[[8, 0, 16, 8]], image=_half_image())
    reward = SemanticReward(encoder=MeanIntensityEncoder(), margin=0.0, n_reference=8)
    boxes = np.array([[8, 0, 16, 8], [6, 0, 14, 8], [4, 0, 12, 8], [2, 0, 10, 8], [0, 0, 8, 8]], dtype=float)
    sims, values = reward.similarities(target, boxes)
    np.testing.assert_allclose(sims, [1.0, 0.75, 0.5, 0.25, 0.0])
    assert values[0] == 1.0
    assert np.all(np.diff(values) < 0)  # strictly decreasing with the similarity: no ties
    assert np.all((values >= 0) & (values <= 1))


def test_semantic_cache_per_record() -> None:
    reward = SemanticReward(encoder=MeanIntensityEncoder(), margin=0.0, n_reference=4)
    target = RewardTarget("r", boxes=[[8, 0, 16, 8]], image=_half_image())
    reward([ans2([8, 0, 16, 8])] * 3, [target] * 3)
    reward([ans2([0, 0, 8, 8])], [target])
    assert len(reward._cache) == 1
    other = RewardTarget("r", boxes=[[8, 0, 16, 8]], image=1.0 - _half_image())  # same id, other image
    reward([ans2([8, 0, 16, 8])], [other])
    assert len(reward._cache) == 2


def _blob_volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    vol = (40.0 + rng.normal(0, 5, (40, 40, 20))).astype(np.float32)  # "organ" at 40 with noise
    vol[:4] = -1000.0  # air along one side
    zz, yy, xx = np.meshgrid(np.arange(40), np.arange(40), np.arange(20), indexing="ij")
    for cx, cy, cz in ((12, 12, 10), (28, 28, 10)):  # two identical lesions at 120
        vol[(zz - cx) ** 2 + (yy - cy) ** 2 + ((xx - cz) * 2) ** 2 <= 16] = 120.0
    return vol


def test_semantic_3d_other_lesion_beats_tissue() -> None:
    vol = _blob_volume()
    target = RewardTarget("vol", boxes=[[8, 8, 8, 17, 17, 13]], image=vol, spacing=(1.0, 1.0, 2.0))
    texts = [
        ans3([8, 8, 8, 17, 17, 13]),  # the target itself
        ans3([24, 24, 8, 33, 33, 13]),  # the other, identical lesion
        ans3([18, 2, 4, 27, 11, 9]),  # plain organ tissue
        ans3([0, 20, 4, 9, 29, 9]),  # straddles the air boundary
    ]
    r = SemanticReward()(texts, [target] * 4)
    assert r[0] == 1.0
    assert r[1] > 0.9
    assert r[1] > r[2] and r[1] > r[3]


def test_semantic_config_errors() -> None:
    with pytest.raises(ConfigError):
        SemanticReward(mode="some")
    with pytest.raises(ConfigError):
        SemanticReward(reference="phrase")  # the radiomics encoder has no text tower
    with pytest.raises(ConfigError):
        build_encoder("vgg")
    with pytest.raises(ConfigError):
        SemanticReward(calibration="zscore")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    boxes=st.lists(
        st.lists(st.floats(-20, 60, allow_nan=False), min_size=4, max_size=4), min_size=1, max_size=4
    ),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["all", "misses"]),
)
def test_semantic_values_in_range(boxes: list[list[float]], seed: int, mode: str) -> None:
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 1, (24, 20)).astype(np.float32)
    target = RewardTarget("h", boxes=[[4, 4, 12, 10]], image=img)
    texts = [ans2([round(v, 1) for v in b]) for b in boxes] + ["garbage"]
    values = SemanticReward(mode=mode, n_reference=4)(texts, [target] * len(texts))
    finite = values[~np.isnan(values)]
    assert np.all(np.isfinite(finite)) and np.all((finite >= 0) & (finite <= 1))
    assert values[-1] == 0.0


# ------------------------------------------------------------------------------------------------ other encoders


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import CLIPConfig, CLIPModel

    from mg3d.chat_template import build_byte_level_tokenizer

    tok = build_byte_level_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": 320,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": None,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_clip_encoder_image_and_text(tiny_clip: str, tmp_path) -> None:
    enc = CLIPRegionEncoder(tiny_clip)
    assert enc.has_text and enc.crop_size(2) == (32, 32) and enc.crop_size(3) == (32, 32, 8)
    vol = _blob_volume()
    target = RewardTarget("vol", boxes=[[8, 8, 8, 17, 17, 13]], image=vol, phrase="the round lesion")
    texts = [ans3([8, 8, 8, 17, 17, 13]), ans3([24, 24, 8, 33, 33, 13]), ans3([18, 2, 4, 27, 11, 9])]
    region = SemanticReward(encoder=enc, n_reference=4)(texts, [target] * 3)
    assert region[0] == pytest.approx(1.0)
    assert np.all((region >= 0) & (region <= 1))
    phrase = SemanticReward(encoder=enc, reference="phrase", n_reference=4)(texts, [target] * 3)
    assert phrase[0] == pytest.approx(1.0)  # calibrated so the ground-truth crop's own score is 1
    assert np.all((phrase >= 0) & (phrase <= 1))
    # two ground-truth regions, one phrase: both boxes score 1 against their own calibration
    both = RewardTarget(
        "vol2", boxes=[[8, 8, 8, 17, 17, 13], [24, 24, 8, 33, 33, 13]], image=vol, phrase="a lesion"
    )
    two = SemanticReward(encoder=enc, reference="phrase", n_reference=4)(texts[:2], [both] * 2)
    np.testing.assert_allclose(two, [1.0, 1.0])
    # a checkpoint folder without a tokenizer has no text tower
    from transformers import CLIPModel

    CLIPModel.from_pretrained(tiny_clip).save_pretrained(tmp_path)
    assert not CLIPRegionEncoder(str(tmp_path)).has_text
    with pytest.raises(ConfigError):
        SemanticReward(encoder=CLIPRegionEncoder(str(tmp_path)), reference="phrase")
    with pytest.raises(ConfigError, match=r"config\.json"):
        CLIPRegionEncoder(str(tmp_path / "missing"))


def test_policy_vision_encoder_is_a_frozen_snapshot() -> None:
    from mg3d.model import build_tiny_policy

    policy = build_tiny_policy(seed=0)
    enc = PolicyVisionEncoder(policy)
    stats = intensity_stats(np.arange(100.0))
    crops2 = torch.rand(3, *enc.crop_size(2)) * 100
    crops3 = torch.rand(2, *enc.crop_size(3)) * 100
    e2 = enc.embed_regions(crops2, stats, 0.5)
    e3 = enc.embed_regions(crops3, stats, 0.5)
    assert e2.shape == (3, policy.model.config.text_config.hidden_size) and e3.shape[0] == 2
    with torch.no_grad():
        for p in policy.model.model.visual.parameters():
            p.add_(1.0)  # "training" moves the policy …
    torch.testing.assert_close(enc.embed_regions(crops2, stats, 0.5), e2)  # … not the reward
    assert not any(p.requires_grad for p in enc.visual.parameters())
    target = RewardTarget(
        "img", boxes=[[10, 10, 30, 30]], image=np.random.default_rng(0).normal(size=(64, 48))
    )
    r = SemanticReward(encoder=enc, n_reference=4)(
        [ans2([10, 10, 30, 30]), ans2([30, 20, 50, 40])], [target] * 2
    )
    assert r[0] == pytest.approx(1.0) and 0.0 <= r[1] <= 1.0
    with pytest.raises(ConfigError):
        PolicyVisionEncoder(policy, crop_size_2d=(50, 50))
