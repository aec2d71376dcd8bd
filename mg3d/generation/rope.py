"""3D rotary positions (mRoPE) of a Qwen-VL prompt, by the rule Qwen2-VL / Qwen2.5-VL were released with.

Why mg3d numbers the positions itself: the pinned transformers (5.23) starts the text after an image or video
at ``start + max(h, w) / merge`` and ignores the temporal extent, while the rule the checkpoints were
pretrained with starts it one past the *largest* position of the vision block (temporal included). For a
volume shown as a video, whose temporal positions run to ``(t − 1) · interval``, every instruction and
completion token after it would otherwise sit at positions the pretrained model never saw. Both rules agree
on text-only prompts and on images (one temporal step).

The released rule, per prompt (padding excluded; padding gets position 0):

* text runs count on from the current start ``s`` in all three components: ``s, s + 1, …``;
* a vision block of patch grid ``(t, h, w)`` with ``merge``×``merge`` merging has ``t · h/merge · w/merge``
  tokens in (time, row, column) order; token ``(i, j, k)`` gets ``(s + ⌊i · interval⌋, s + j, s + k)`` where
  ``interval`` is ``second_per_grid_t · tokens_per_second`` for a Qwen2.5-VL video (``second_per_grid_t``
  defaults to 1), 0 for a Qwen2.5-VL image, and 1 for Qwen2-VL;
* after a block the next start is ``1 +`` the largest of its positions.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from mg3d.errors import ConfigError

__all__ = ["released_rope_index"]

_TEXT, _IMAGE, _VIDEO = 0, 1, 2


def _block_positions(
    start: int, grid: torch.Tensor, merge: int, seconds: torch.Tensor | None, tokens_per_second: float | None
) -> torch.Tensor:
    t, h, w = (int(v) for v in grid.tolist())
    lh, lw = h // merge, w // merge
    steps = torch.arange(t, dtype=torch.long)
    if tokens_per_second is None:  # Qwen2-VL: one temporal position per temporal patch
        temporal = steps
    elif seconds is None:  # Qwen2.5-VL image: no time axis
        temporal = torch.zeros(t, dtype=torch.long)
    else:  # Qwen2.5-VL video: time-aligned, float32 product then truncation, as released
        temporal = (steps.to(torch.float32) * seconds.to(torch.float32) * float(tokens_per_second)).long()
    tt = temporal.view(-1, 1, 1).expand(t, lh, lw)
    hh = torch.arange(lh).view(1, -1, 1).expand(t, lh, lw)
    ww = torch.arange(lw).view(1, 1, -1).expand(t, lh, lw)
    return torch.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + start


def released_rope_index(
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    *,
    merge_size: int,
    tokens_per_second: float | None,
    attention_mask: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Positions ``(3, B, L)`` by the released rule (module docstring).

    ``tokens_per_second`` is the Qwen2.5-VL vision config's (``None`` for Qwen2-VL, which has no time
    alignment). Images and videos are consumed in order across the batch, as the model consumes their features.
    """
    if input_ids.ndim != 2 or mm_token_type_ids.shape != input_ids.shape:
        raise ConfigError(
            f"input_ids {tuple(input_ids.shape)} and mm_token_type_ids {tuple(mm_token_type_ids.shape)} "
            "must both be (batch, length)"
        )
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    grids: dict[int, Iterator[torch.Tensor]] = {
        _IMAGE: iter(image_grid_thw.cpu() if image_grid_thw is not None else ()),
        _VIDEO: iter(video_grid_thw.cpu() if video_grid_thw is not None else ()),
    }
    seconds = iter(second_per_grid_ts.cpu() if second_per_grid_ts is not None else ())
    out = torch.zeros((3, *input_ids.shape), dtype=torch.long)
    for b in range(input_ids.shape[0]):
        keep = mask[b].bool().cpu()
        types = mm_token_type_ids[b].cpu()[keep].tolist()
        pieces: list[torch.Tensor] = []
        start = 0
        for kind, run in itertools.groupby(types):
            n = len(list(run))
            if kind == _TEXT:
                pieces.append(torch.arange(start, start + n).view(1, -1).expand(3, -1))
                start += n
                continue
            if kind not in grids:
                raise ConfigError(f"prompt {b}: unknown mm_token_type_id {kind} (0 text, 1 image, 2 video)")
            done = 0
            while done < n:  # a run may hold several back-to-back blocks of the same kind
                grid = next(grids[kind], None)
                if grid is None:
                    raise ConfigError(
                        f"prompt {b}: more {('image', 'video')[kind - 1]} tokens than grid_thw rows"
                    )
                sec: torch.Tensor | None = None
                if tokens_per_second is not None and kind == _VIDEO:
                    sec = next(seconds, torch.tensor(1.0))
                block = _block_positions(start, grid, merge_size, sec, tokens_per_second)
                pieces.append(block)
                done += block.shape[1]
                start = int(block.max()) + 1
            if done != n:
                raise ConfigError(f"prompt {b}: a run of {n} vision tokens does not match its grid_thw rows")
        row = torch.cat(pieces, dim=1) if pieces else torch.zeros((3, 0), dtype=torch.long)
        out[:, b, keep] = row
    return out.to(input_ids.device)
