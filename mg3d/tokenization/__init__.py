"""Images and volumes → Qwen-VL model inputs, with a token budget and an exact :class:`CoordinateFrame`.

Axis contract (DESIGN.md §2)
----------------------------
The input is what the data pipeline hands over: a float tensor with intensities already in ``[0, 1]`` (the
modality preset did that), channel-first in MONAI's voxel-axis order, already in *display orientation*:

* 2D ``(C, X, Y)``: axis 0 = x = image column (left → right), axis 1 = y = image row (top → bottom).
* 3D ``(C, X, Y, Z)``: x, y as above for every axial slice, axis 2 = z = slice index.

and a ``CoordinateFrame`` whose ``.shape`` is the tensor's spatial shape. Orienting to the display convention
(radiographs as read, axial CT in radiological convention) is the data pipeline's job; tokenization only
resizes, resamples depth, selects slices, tiles, pads and patch-aligns, and appends each of those operations to
the frame as an exact axis-aligned step. The text grid therefore keeps the axis order ``(x, y[, z])`` (no
permutation): the picture the model sees is ``slice[:, :, z].T`` with ``rows = y`` and ``cols = x``, and
``frame.to_text(voxel_boxes)`` gives boxes in the integer grid the model writes about. What z means per strategy:

* ``image`` (2D): no z. Text grid = pixels of the resized image.
* ``video`` (3D default): depth is time. Text z = slice index of the frames fed to the model, after depth
  resampling (only when the budget needs it) and the padding to a multiple of the temporal patch.
* ``slices``: K slices as separate images, each labelled ``Slice k:``. Text z = the input tensor's own slice
  index, i.e. exactly the numbers written in the prompt (the frame has no z step).
* ``montage``: K slices tiled into one image. Text x, y = pixels *within a tile*, text z = tile number (0 = top
  left, row-major). Tile t shows the z-bin ``[s + t·L/K, s + (t+1)·L/K)`` of the input window ``[s, s + L)``,
  resampled with anti-aliasing, so the tile index is an exact (crop + resize) map of z.

Pixels are prepared as Qwen2-VL's image processor does (grey → RGB, ``(x − mean) / std`` with the processor's
image mean/std) and cut into patches by :func:`patchify`, written here because the torchvision-backed
transformers processors cannot be imported with the pinned CPU torch; it is bit-identical to
``Qwen2VLImageProcessorPil`` on 2D images (tests/test_tokenization.py). :func:`build_model_inputs` then does what
the HF processor's ``__call__`` does: expand placeholders, left-pad, and build ``mm_token_type_ids``, which
Qwen2.5-VL needs to compute its 3D rotary positions at all (without it, it silently uses 1D positions).

Layout (one job per module): :mod:`~mg3d.tokenization.plan` decides sizes, slices and frame steps from
shapes alone (no pixels); :mod:`~mg3d.tokenization.visual` turns pixels into patches along a plan;
:mod:`~mg3d.tokenization.inputs` assembles a batch of prompts and visuals into model inputs.
"""

from mg3d.tokenization.inputs import build_mm_token_type_ids, build_model_inputs
from mg3d.tokenization.plan import (
    DEFAULT_MAX_VISION_TOKENS,
    MM_PER_SECOND,
    NOMINAL_FPS,
    Strategy,
    VisionSpec,
    VisualPlan,
    plan_image,
    plan_montage,
    plan_slices,
    plan_video,
)
from mg3d.tokenization.visual import (
    TokenizedVisual,
    VisualTokenizer,
    normalize_frames,
    patchify,
    tokenize_image,
    tokenize_montage,
    tokenize_slices,
    tokenize_video,
)

__all__ = [
    "DEFAULT_MAX_VISION_TOKENS",
    "MM_PER_SECOND",
    "NOMINAL_FPS",
    "Strategy",
    "TokenizedVisual",
    "VisionSpec",
    "VisualPlan",
    "VisualTokenizer",
    "build_mm_token_type_ids",
    "build_model_inputs",
    "normalize_frames",
    "patchify",
    "plan_image",
    "plan_montage",
    "plan_slices",
    "plan_video",
    "tokenize_image",
    "tokenize_montage",
    "tokenize_slices",
    "tokenize_video",
]
