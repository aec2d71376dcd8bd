"""The truth file's name and the small writers every layout writer shares (CSV, JSON, the seed check)."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mg3d.errors import ConfigError

TRUTH_NAME = "phantom_truth.json"


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")  # '\n' like the pandas-written originals
        writer.writerow(header)
        writer.writerows(rows)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_seed(seed: int, n: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"n must be a positive number of cases, got {n!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")


def _progress(items: Iterable[Any], total: int, desc: str, enabled: bool) -> Iterable[Any]:
    """``items`` with a progress bar on stderr when ``enabled`` (writing thousands of phantoms takes minutes)."""
    return tqdm(
        items, total=total, desc=desc, unit="case", disable=not enabled, file=sys.stderr, dynamic_ncols=True
    )
