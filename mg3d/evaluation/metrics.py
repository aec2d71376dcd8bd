"""Aggregate metrics over scored predictions (mIoU, Acc@τ, bootstrap intervals, groups) and the accumulator
for Lightning hooks."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from mg3d.errors import ConfigError, DataError
from mg3d.evaluation.protocols import (
    DEFAULT_THRESHOLDS,
    GROUP_KEYS,
    Comparison,
    _check_comparison,
    _correct,
)
from mg3d.evaluation.scoring import ScoredPrediction


def bootstrap_ci(
    values: np.ndarray,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    max_block: int = 4_000_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap interval of the mean of each row of ``values`` ``(k, n)``; returns ``(low, high)``.

    All rows are resampled with the same index draws (a paired bootstrap), in blocks of at most ``max_block``
    numbers so that memory stays bounded for large test sets. Seeded: the same inputs give the same interval.
    """
    vals = np.atleast_2d(np.asarray(values, dtype=np.float64))
    k, n = vals.shape
    if n == 0:
        raise DataError("bootstrap_ci: no values")
    if not 0 < level < 1:
        raise ConfigError(f"bootstrap level must be in (0, 1), got {level}")
    if n_resamples < 1:
        raise ConfigError(f"n_resamples must be ≥ 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    means = np.empty((k, n_resamples))
    block = max(1, min(n_resamples, max_block // max(1, k * n)))
    for start in range(0, n_resamples, block):
        stop = min(n_resamples, start + block)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[:, start:stop] = vals[:, idx].mean(axis=2)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha], axis=1)
    return low, high


def _tag(t: float) -> str:
    return f"acc@{t:g}"


def _basic(
    rows: Sequence[ScoredPrediction], thresholds: Sequence[float], comparison: Comparison
) -> dict[str, float]:
    ious = np.asarray([r.iou for r in rows], dtype=np.float64)
    correct = _correct(ious, thresholds, comparison)
    out = {"n": float(len(rows)), "mIoU": float(ious.mean())}
    for t, c in zip(thresholds, correct):
        out[_tag(t)] = float(c.mean())
    out["parse_failure_rate"] = float(np.mean([not r.parse_ok for r in rows]))
    return out


def aggregate(
    rows: Sequence[ScoredPrediction],
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    comparison: Comparison = ">=",
    n_bootstrap: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
    group_keys: Sequence[str] = GROUP_KEYS,
) -> dict[str, float]:
    """Flat ``{name: float}`` metrics: overall, bootstrap intervals, parse statistics, centre errors, groups.

    Names: ``n``, ``mIoU``, ``acc@0.5`` …, ``<metric>_ci_low|_ci_high``, ``parse_failure_rate``,
    ``parse_status/<status>`` (fraction of all rows), ``format_ok_rate`` (MedGround-R1's format rule),
    ``center_vox_mean|_median``, ``center_mm_mean|_median`` (rows with a box, and an affine for mm),
    ``<key>/<value>/<metric>`` for every group key (dataset, category, question_type).
    """
    comparison = _check_comparison(comparison)
    if not rows:
        raise DataError("no predictions to score")
    out = _basic(rows, thresholds, comparison)
    if n_bootstrap > 0:
        ious = np.asarray([r.iou for r in rows], dtype=np.float64)
        stacked = np.vstack([ious[None], _correct(ious, thresholds, comparison).astype(np.float64)])
        low, high = bootstrap_ci(stacked, n_resamples=n_bootstrap, level=ci_level, seed=seed)
        for name, lo, hi in zip(["mIoU", *(_tag(t) for t in thresholds)], low, high):
            out[f"{name}_ci_low"] = float(lo)
            out[f"{name}_ci_high"] = float(hi)
    statuses = Counter(r.parse_status for r in rows)
    for status in sorted(statuses):
        out[f"parse_status/{status}"] = statuses[status] / len(rows)
    out["format_ok_rate"] = float(np.mean([r.format_ok for r in rows]))
    for key in ("center_vox", "center_mm"):
        values = [getattr(r, key) for r in rows if getattr(r, key) is not None]
        if values:
            out[f"{key}_mean"] = float(np.mean(values))
            out[f"{key}_median"] = float(np.median(values))
            out[f"{key}_n"] = float(len(values))
    for key in group_keys:
        groups: dict[str, list[ScoredPrediction]] = {}
        for r in rows:
            value = r.group_value(key)
            if value is not None:
                groups.setdefault(value, []).append(r)
        for value in sorted(groups):
            for name, v in _basic(groups[value], thresholds, comparison).items():
                out[f"{key}/{value}/{name}"] = v
    return out


def accuracy(ious: Sequence[float] | np.ndarray, threshold: float, comparison: Comparison = ">=") -> float:
    """Acc@τ: the fraction of IoUs ``≥ τ`` (mg3d's and MedRPG's rule; ``comparison=">"`` for MedGround-R1's)."""
    arr = np.asarray(ious, dtype=np.float64)
    return (
        float(_correct(arr, [threshold], _check_comparison(comparison))[0].mean()) if arr.size else math.nan
    )
