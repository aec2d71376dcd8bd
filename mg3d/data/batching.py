"""Batches and draw order of :class:`~mg3d.data.datamodule.GroundingDataModule`: samples collated as a list
(nothing stacked), and the resumable weighted sampler (re-exported by :mod:`mg3d.data.datamodule`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from mg3d.errors import DataError

__all__ = ["ResumableWeightedSampler", "batch_columns", "collate_samples"]


def collate_samples(samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Collate pipeline samples into a list of sample dicts (nothing stacked; see the module docstring).

    Refuses an empty batch and samples whose keys differ (a sign that two pipelines disagree on the contract).
    """
    if not samples:
        raise DataError("collate_samples: empty batch")
    keys = set(samples[0])
    for sample in samples[1:]:
        if set(sample) != keys:
            differ = sorted(keys ^ set(sample))
            raise DataError(
                f"collate_samples: sample {sample.get('id')!r} and {samples[0].get('id')!r} differ in keys {differ}"
            )
    return [dict(sample) for sample in samples]


def batch_columns(batch: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """A batch as a dict of aligned lists: ``batch_columns(b)["text"][i]`` belongs to ``b[i]``."""
    return {key: [sample[key] for sample in batch] for key in (batch[0] if batch else {})}


class ResumableWeightedSampler(Sampler[int]):
    """Weighted sampling with replacement whose order is a pure function of (seed, epoch), and that can
    start part-way through an epoch — so a run resumed from a mid-epoch checkpoint sees exactly the samples
    the uninterrupted run would have seen (torch's ``WeightedRandomSampler`` cannot skip ahead)."""

    def __init__(self, weights: torch.Tensor, num_samples: int, seed: int) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0  # a skip applies only to the epoch it was recorded in
        self.epoch = int(epoch)

    def __iter__(self):  # type: ignore[no-untyped-def]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        start, self.start = self.start, 0
        return iter(order[start:].tolist())

    def __len__(self) -> int:
        # The whole epoch, also when resuming part-way: Lightning restores how many batches of the epoch were
        # already seen and ends the epoch when that count reaches len(dataloader); a shortened length would end
        # every later epoch early (it is computed once).
        return self.num_samples
