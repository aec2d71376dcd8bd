"""Box geometry: hand-computed values, brute-force IoU, and round trips of every spatial step."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from mg3d.boxes import (
    Box,
    box_volumes,
    center_distance_mm,
    clip_boxes,
    convert_box_mode,
    giou_matrix,
    iou_matrix,
    mask_to_box,
    pair_giou,
    pair_iou,
    validate_box,
    validate_boxes,
    voxel_to_world,
    world_to_voxel,
)
from mg3d.errors import BoxError
from mg3d.frames import (
    AffineStep,
    CoordinateFrame,
    crop_step,
    flip_step,
    pad_step,
    reorient_step,
    resize_step,
    respace_step,
    rot90_step,
    step_from_dict,
    zoom_step,
)

# --------------------------------------------------------------------------------------------------
# strategies


@st.composite
def shapes(draw, ndim=None, lo=1, hi=12):
    d = draw(st.sampled_from([2, 3])) if ndim is None else ndim
    return tuple(draw(st.integers(lo, hi)) for _ in range(d))


@st.composite
def int_boxes_in(draw, shape):
    lo = [draw(st.integers(0, n - 1)) for n in shape]
    hi = [draw(st.integers(a + 1, n)) for a, n in zip(lo, shape)]
    return np.asarray(lo + hi, dtype=float)


@st.composite
def shape_and_box(draw, ndim=None):
    shape = draw(shapes(ndim))
    return shape, draw(int_boxes_in(shape))


def box_mask(shape, box):
    d = len(shape)
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(int(box[a]), int(box[a + d])) for a in range(d))] = True
    return m


# --------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ([1, 2, 3], r"4 \(2D\) or 6 \(3D\)"),
        ([0, 0, float("nan"), 1], "non-finite"),
        ([0, 0, float("inf"), 1], "non-finite"),
        ([5, 0, 1, 3], "hi < lo on axis 0"),
        ([0, 0, 0, 4, 4, 0], "zero extent on axis 2"),
        (["a", 0, 1, 1], "not a list of numbers"),
    ],
)
def test_invalid_boxes_name_the_problem(box, message):
    with pytest.raises(BoxError, match=message) as info:
        validate_box(box, what="record s0001/1 box")
    assert "record s0001/1 box" in str(info.value)


def test_validate_dimension_and_empty():
    with pytest.raises(BoxError, match="3D box has 6 numbers"):
        validate_box([0, 0, 1, 1], ndim=3)
    assert validate_box([0, 0, 0, 1], allow_empty=True).tolist() == [0, 0, 0, 1]
    many = validate_boxes([[0, 0, 1, 1], [1, 1, 2, 2]])
    assert many.shape == (2, 4)
    with pytest.raises(BoxError, match=r"boxes\[1\]"):
        validate_boxes([[0, 0, 1, 1], [1, 1, 0, 2]])


def test_tagged_box_frames():
    b = Box((1, 2, 3, 4), "text")
    assert b.ndim == 2 and b.lo.tolist() == [1, 2]
    with pytest.raises(BoxError, match="expected a box in the voxel frame"):
        b.require("voxel")
    with pytest.raises(BoxError, match="frame must be one of"):
        Box((1, 2, 3, 4), "pixels")  # type: ignore[arg-type]
    frame = CoordinateFrame((10, 10))
    with pytest.raises(BoxError, match="voxel frame"):
        frame.to_text(b)


# --------------------------------------------------------------------------------------------------
# hand-computed values


def test_modes_iou_giou_hand_values():
    assert convert_box_mode([1, 2, 3, 4, 5, 6], "xyzwhd", "xyzxyz").tolist() == [1, 2, 3, 5, 7, 9]
    assert convert_box_mode([5, 5, 5, 4, 4, 4], "cccwhd", "xyzxyz").tolist() == [3, 3, 3, 7, 7, 7]
    a = [[0, 0, 0, 10, 10, 10], [5, 5, 5, 15, 15, 15]]
    b = [[0, 0, 0, 10, 10, 10], [0, 0, 0, 5, 5, 5], [10, 10, 10, 20, 20, 20]]
    np.testing.assert_allclose(iou_matrix(a, b), [[1, 0.125, 0], [125 / 1875, 0, 125 / 1875]], atol=1e-7)
    np.testing.assert_allclose(giou_matrix(a, b)[0], [1, 0.125, -0.75], atol=1e-7)
    np.testing.assert_allclose(pair_iou(a, b[:2]), [1.0, 0.0])
    # 2D: [0,0,2,2] vs [1,1,3,3]: inter 1, union 7, hull 9 → giou = 1/7 - 2/9
    np.testing.assert_allclose(pair_giou([0, 0, 2, 2], [1, 1, 3, 3]), [1 / 7 - 2 / 9])
    assert pair_iou([0, 0, 0, 0], [0, 0, 0, 0]).tolist() == [0.0]
    assert box_volumes([[0, 0, 0, 2, 3, 4]]).tolist() == [24.0]


def test_mask_to_box_hand_values():
    m = np.zeros((6, 7, 8))
    m[2:5, 3, 7] = 1
    assert mask_to_box(m).tolist() == [2, 3, 7, 5, 4, 8]
    single = np.zeros((4, 4))
    single[0, 3] = 1
    assert mask_to_box(single).tolist() == [0, 3, 1, 4]
    with pytest.raises(BoxError, match="empty"):
        mask_to_box(np.zeros((3, 3, 3)))
    with pytest.raises(BoxError, match="2D or 3D"):
        mask_to_box(np.zeros((3,)))


def test_clip_keeps_rows():
    out = clip_boxes([[-2, 1, 5, 12], [20, 20, 30, 30]], (10, 10))
    assert out.tolist() == [[0, 1, 5, 10], [10, 10, 10, 10]]


def test_world_frame_hand_values():
    # LPS-like affine: x and y reversed, 0.8 mm in-plane, 2.5 mm slices, origin (100, 50, -30).
    affine = np.array([[-0.8, 0, 0, 100], [0, -0.8, 0, 50], [0, 0, 2.5, -30], [0, 0, 0, 1]])
    box = [10, 20, 2, 20, 30, 4]
    world = voxel_to_world(box, affine)
    # x: edge 10 → centre coordinate 9.5 → 100 - 0.8*9.5 = 92.4 ; edge 20 → 100 - 0.8*19.5 = 84.4
    # y: edges 20, 30 → 50 - 0.8*19.5 = 34.4, 50 - 0.8*29.5 = 26.4 ; z: edges 2, 4 → -30 + 2.5*1.5, -30 + 2.5*3.5
    np.testing.assert_allclose(world[0], [84.4, 26.4, -26.25, 92.4, 34.4, -21.25])
    np.testing.assert_allclose(world_to_voxel(world, affine)[0], box, atol=1e-9)
    d = center_distance_mm([0, 0, 0, 2, 2, 2], [0, 0, 4, 2, 2, 6], affine)
    np.testing.assert_allclose(d, [10.0])


# --------------------------------------------------------------------------------------------------
# property tests: IoU against brute force


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_iou_equals_voxel_count(data):
    shape = data.draw(shapes(lo=1, hi=9))
    a = data.draw(int_boxes_in(shape))
    b = data.draw(int_boxes_in(shape))
    ma, mb = box_mask(shape, a), box_mask(shape, b)
    expected = (ma & mb).sum() / (ma | mb).sum()
    np.testing.assert_allclose(pair_iou(a, b), [expected], atol=1e-6)
    np.testing.assert_allclose(iou_matrix(a, b), [[expected]], atol=1e-6)
    assert pair_iou(a, b)[0] == pytest.approx(pair_iou(b, a)[0])
    assert 0.0 <= pair_iou(a, b)[0] <= 1.0
    assert pair_iou(a, a)[0] == pytest.approx(1.0)
    assert -1.0 <= pair_giou(a, b)[0] <= pair_iou(a, b)[0] + 1e-12
    np.testing.assert_allclose(pair_giou(a, b), np.diag(giou_matrix(a, b)), atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_mask_to_box_exact_on_random_masks(data):
    shape = data.draw(shapes(lo=1, hi=10))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < data.draw(st.floats(0.0, 0.3))
    border = data.draw(st.booleans())
    if border:  # touch the border, and make sure single-voxel masks occur
        mask[...] = False
        mask[tuple(n - 1 for n in shape)] = True
    if not mask.any():
        mask[tuple(rng.integers(0, n) for n in shape)] = True
    box = mask_to_box(mask)
    idx = np.argwhere(mask)
    np.testing.assert_array_equal(box, np.concatenate([idx.min(0), idx.max(0) + 1]))


# --------------------------------------------------------------------------------------------------
# property tests: every step against the array operation, and round trips


def _check_step_against_array(step, mask, moved_mask):
    assert step.out_shape == moved_mask.shape
    np.testing.assert_allclose(step.map_boxes(mask_to_box(mask))[0], mask_to_box(moved_mask), atol=1e-9)
    back = step.inverse().map_boxes(step.map_boxes(mask_to_box(mask)))[0]
    np.testing.assert_allclose(back, mask_to_box(mask), atol=1e-9)


@settings(max_examples=50, deadline=None)
@given(shape_and_box(), st.data())
def test_flip_matches_numpy(sb, data):
    shape, box = sb
    axes = data.draw(st.lists(st.integers(0, len(shape) - 1), unique=True, max_size=len(shape)))
    m = box_mask(shape, box)
    _check_step_against_array(flip_step(shape, axes), m, np.flip(m, axis=tuple(axes)) if axes else m)


@settings(max_examples=50, deadline=None)
@given(shape_and_box(ndim=3), st.integers(-3, 5), st.sampled_from([(0, 1), (1, 2), (2, 0), (1, 0)]))
def test_rot90_matches_numpy(sb, k, axes):
    shape, box = sb
    m = box_mask(shape, box)
    _check_step_against_array(rot90_step(shape, k, axes), m, np.rot90(m, k, axes))


@settings(max_examples=50, deadline=None)
@given(shape_and_box(), st.data())
def test_reorient_matches_transpose_and_flip(sb, data):
    shape, box = sb
    perm = data.draw(st.permutations(range(len(shape))))
    flips = data.draw(st.lists(st.booleans(), min_size=len(shape), max_size=len(shape)))
    m = box_mask(shape, box)
    moved = np.transpose(m, perm)
    flip_axes = tuple(a for a, f in enumerate(flips) if f)
    moved = np.flip(moved, axis=flip_axes) if flip_axes else moved
    _check_step_against_array(reorient_step(shape, perm, flips), m, moved)


@settings(max_examples=50, deadline=None)
@given(shape_and_box(), st.data())
def test_crop_and_pad_match_slicing(sb, data):
    shape, box = sb
    m = box_mask(shape, box)
    # crop to a window that still contains the box
    start = [data.draw(st.integers(0, int(box[a]))) for a in range(len(shape))]
    stop = [data.draw(st.integers(int(box[a + len(shape)]), n)) for a, n in enumerate(shape)]
    cropped = m[tuple(slice(a, b) for a, b in zip(start, stop))]
    _check_step_against_array(crop_step(shape, start, stop), m, cropped)
    before = [data.draw(st.integers(0, 4)) for _ in shape]
    after = [data.draw(st.integers(0, 4)) for _ in shape]
    padded = np.pad(m, list(zip(before, after)))
    _check_step_against_array(pad_step(shape, before, after), m, padded)
    # a negative crop start is padding
    neg = crop_step(shape, [-b for b in before], [n + a for n, a in zip(shape, after)])
    _check_step_against_array(neg, m, padded)


@settings(max_examples=50, deadline=None)
@given(shape_and_box(), st.data())
def test_integer_resize_matches_nearest_zoom(sb, data):
    shape, box = sb
    factors = [data.draw(st.integers(1, 3)) for _ in shape]
    m = box_mask(shape, box)
    up = m
    for a, f in enumerate(factors):
        up = np.repeat(up, f, axis=a)
    _check_step_against_array(resize_step(shape, up.shape), m, up)
    _check_step_against_array(zoom_step(shape, factors), m, up)


@settings(max_examples=50, deadline=None)
@given(shape_and_box(), st.data())
def test_resize_round_trip_within_tolerance(sb, data):
    shape, box = sb
    out = tuple(data.draw(st.integers(1, 40)) for _ in shape)
    step = resize_step(shape, out)
    np.testing.assert_allclose(step.inverse().map_boxes(step.map_boxes(box))[0], box, atol=1e-9)
    # what a nearest-neighbour resample of the mask gives lies within one output voxel of the box path
    m = box_mask(shape, box)
    coords = [np.minimum((np.arange(o) + 0.5) * n / o, n - 1e-9).astype(int) for n, o in zip(shape, out)]
    resampled = m[np.ix_(*coords)]
    if resampled.any():
        np.testing.assert_allclose(step.map_boxes(box)[0], mask_to_box(resampled), atol=1.0 + 1e-9)


def test_respace_matches_scipy_on_voxel_centres():
    # 2 mm → 1 mm along axis 0, centres kept: voxel i (centre i) lands on output centre 2i.
    shape = (6, 5)
    m = np.zeros(shape)
    m[2:4, 1:3] = 1
    step = respace_step(shape, (2.0, 1.0), (1.0, 1.0), out_shape=(11, 5))
    out = ndimage.affine_transform(m, np.diag([0.5, 1.0]), order=0, output_shape=(11, 5))
    # Input edges 2..4 are centre coordinates 1.5..3.5, i.e. output centres 3..7, output edges 3.5..7.5.
    np.testing.assert_allclose(step.map_boxes(mask_to_box(m))[0], [3.5, 1, 7.5, 3])
    # Nearest resampling rasterises that region to whole voxels: within half a voxel of the exact box.
    assert np.all(np.abs(mask_to_box(out) - [3.5, 1, 7.5, 3]) <= 0.5)
    np.testing.assert_allclose(step.inverse().map_boxes(step.map_boxes(mask_to_box(m)))[0], mask_to_box(m))


@settings(max_examples=40, deadline=None)
@given(shape_and_box(ndim=3), st.data())
def test_frame_chain_round_trip_and_serialisation(sb, data):
    shape, box = sb
    frame = CoordinateFrame(shape)
    for _ in range(data.draw(st.integers(1, 5))):
        kind = data.draw(st.sampled_from(["flip", "rot90", "reorient", "pad", "resize", "respace"]))
        cur = frame.shape
        if kind == "flip":
            step = flip_step(cur, [data.draw(st.integers(0, 2))])
        elif kind == "rot90":
            step = rot90_step(cur, data.draw(st.integers(1, 3)), (0, 2))
        elif kind == "reorient":
            step = reorient_step(cur, data.draw(st.permutations(range(3))), [True, False, True])
        elif kind == "pad":
            step = pad_step(cur, [1, 0, 2], [0, 3, 1])
        elif kind == "resize":
            step = resize_step(cur, [data.draw(st.integers(1, 30)) for _ in cur])
        else:
            step = respace_step(cur, (0.8, 0.8, 2.5), (1.0, 1.0, 1.0))
        frame = frame.then(step)
    text = frame.to_text(box)
    np.testing.assert_allclose(frame.to_voxel(text)[0], box, atol=1e-7)
    np.testing.assert_allclose(frame.composed().map_boxes(box), text, atol=1e-7)
    again = CoordinateFrame.from_dict(frame.to_dict())
    np.testing.assert_allclose(again.to_text(box), text, atol=1e-12)
    # rounding to the integer text grid costs at most half a text unit per edge, i.e. text_scale/2 voxels
    rounded = np.round(text)
    err = np.abs(frame.to_voxel(rounded)[0] - box)
    tol = np.tile(frame.text_scale(), 2) / 2 + 1e-7
    assert np.all(err <= tol)


def test_frame_rejects_mismatched_steps():
    frame = CoordinateFrame((10, 10, 10))
    with pytest.raises(BoxError, match="expects a grid of shape"):
        frame.then(flip_step((9, 10, 10), [0]))
    with pytest.raises(BoxError, match="unknown spatial step type"):
        step_from_dict({"type": "shear"})


def test_general_affine_gives_an_upper_bound():
    """A 30° in-plane rotation: the corner hull contains the rotated mask's tight box (not equal)."""
    shape = (40, 40)
    m = np.zeros(shape, dtype=float)
    m[15:25, 12:20] = 1
    theta = np.deg2rad(30)
    c = np.array([20.0, 20.0])
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    matrix = np.eye(3)
    matrix[:2, :2] = rot
    matrix[:2, 2] = c - rot @ c
    step = AffineStep("rotate", shape, shape, tuple(map(tuple, matrix)))
    assert step.exact is False
    # rotate the mask: output centre q (= edge - 0.5 ... use centres) samples input R^-1 (q - t)
    inv = np.linalg.inv(matrix)
    rotated = ndimage.affine_transform(
        m, inv[:2, :2], offset=inv[:2, :2] @ np.full(2, 0.5) + inv[:2, 2] - 0.5, order=0
    )
    hull = step.map_boxes(mask_to_box(m))[0]
    tight = mask_to_box(rotated)
    assert np.all(hull[:2] <= tight[:2] + 1) and np.all(hull[2:] >= tight[2:] - 1)
    np.testing.assert_allclose(step.inverse().map_points(step.map_points(np.array([[3.0, 4.0]]))), [[3, 4]])
