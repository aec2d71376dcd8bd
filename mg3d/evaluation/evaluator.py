"""The accumulator for Lightning hooks and scripts (:class:`GroundingEvaluator`), and re-scoring a file."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mg3d.errors import ConfigError
from mg3d.evaluation.files import read_predictions, write_metrics_json, write_metrics_md, write_predictions
from mg3d.evaluation.metrics import aggregate
from mg3d.evaluation.protocols import (
    DEFAULT_THRESHOLDS,
    GROUP_KEYS,
    Comparison,
    _check_comparison,
    get_protocol,
)
from mg3d.evaluation.scoring import EvalItem, ScoredPrediction, _codec_name, item_from_prediction, score_item
from mg3d.prompts import BoxCodec, get_codec


class GroundingEvaluator:
    """Accumulates scored predictions and computes the metrics of one protocol.

    ``update`` takes ``Grounder`` ``Prediction`` objects, predictions.jsonl rows (dicts), paper-log entries or
    :class:`EvalItem` — one or an iterable. ``compute`` returns ``{name: float}`` (see :func:`aggregate`);
    ``write`` saves predictions.jsonl, metrics.json and metrics.md. ``codec`` is the model family's box codec,
    used for items that do not name one (``None``: numbers are taken as text-grid units).
    """

    def __init__(
        self,
        protocol: str = "mg3d",
        *,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        comparison: Comparison | None = None,
        n_bootstrap: int = 1000,
        ci_level: float = 0.95,
        seed: int = 0,
        codec: str | BoxCodec | None = None,
        group_keys: Sequence[str] = GROUP_KEYS,
    ) -> None:
        self.spec = get_protocol(protocol)
        if comparison is None:
            comparison = self.spec.default_comparison
        comparison = _check_comparison(comparison)
        if self.spec.comparison_fixed and comparison != self.spec.default_comparison:
            raise ConfigError(
                f"the {self.spec.name!r} protocol defines Acc with IoU {self.spec.default_comparison} τ; "
                f"use the 'mg3d' protocol to choose {comparison!r}"
            )
        ts = tuple(float(t) for t in thresholds)
        if not ts or any(not 0.0 < t < 1.0 for t in ts) or len(set(ts)) != len(ts):
            raise ConfigError(f"thresholds must be distinct numbers in (0, 1), got {list(thresholds)!r}")
        if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 0:
            raise ConfigError(f"n_bootstrap must be an integer ≥ 0, got {n_bootstrap!r}")
        unknown = set(group_keys) - set(GROUP_KEYS)
        if unknown:
            raise ConfigError(f"unknown group keys {sorted(unknown)}; known: {list(GROUP_KEYS)}")
        self.thresholds = ts
        self.comparison: Comparison = comparison
        self.n_bootstrap = n_bootstrap
        self.ci_level = float(ci_level)
        self.seed = int(seed)
        self.codec = _codec_name(codec)
        if self.codec is not None:
            get_codec(self.codec)  # fail early on an unknown name
        self.group_keys = tuple(group_keys)
        self.rows: list[ScoredPrediction] = []
        self.duplicates_dropped = 0

    @property
    def protocol(self) -> str:
        return self.spec.name

    def reset(self) -> None:
        self.rows = []
        self.duplicates_dropped = 0

    def __len__(self) -> int:
        return len(self.rows)

    def update(self, predictions: Any) -> list[ScoredPrediction]:
        """Score one prediction or an iterable of them; returns the new rows."""
        if isinstance(predictions, (Mapping, EvalItem)) or hasattr(predictions, "completion"):
            predictions = [predictions]
        new = []
        for obj in predictions:
            item = item_from_prediction(obj, default_id=str(len(self.rows) + len(new)))
            new.append(score_item(item, self.spec, codec=self.codec))
        self.rows.extend(new)
        return new

    def add(self, completion: str, gt_boxes: Sequence[Sequence[float]], **fields: Any) -> ScoredPrediction:
        """Score one completion given as arguments (``ndim``, ``frame``, ``dataset`` … as keywords)."""
        return self.update({"completion": completion, "gt_boxes": gt_boxes, **fields})[0]

    def sync(self) -> int:
        """Gather every rank's rows (``torch.distributed``), dropping repeated ids; returns how many were dropped.

        Lightning's distributed sampler repeats a few samples so that ranks get equal shares; those repeats
        share an id and would otherwise be counted twice. A no-op without an initialised process group.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return 0
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.rows)
        seen: set[str] = set()
        rows: list[ScoredPrediction] = []
        dropped = 0
        for part in gathered:
            for row in part:
                if row.id and row.id in seen:
                    dropped += 1
                    continue
                seen.add(row.id)
                rows.append(row)
        self.rows = rows
        self.duplicates_dropped += dropped
        return dropped

    def compute(self) -> dict[str, float]:
        """The metrics over every row so far (see :func:`aggregate` for the names)."""
        return aggregate(
            self.rows,
            thresholds=self.thresholds,
            comparison=self.comparison,
            n_bootstrap=self.n_bootstrap,
            ci_level=self.ci_level,
            seed=self.seed,
            group_keys=self.group_keys,
        )

    def settings(self) -> dict[str, Any]:
        """The rules the numbers were computed under (written next to them)."""
        return {
            "protocol": self.spec.name,
            "protocol_description": self.spec.description,
            "standard_iou": self.spec.standard,
            "parse_mode": self.spec.parse_mode,
            "comparison": self.comparison,
            "thresholds": list(self.thresholds),
            "n_bootstrap": self.n_bootstrap,
            "ci_level": self.ci_level,
            "seed": self.seed,
            "codec": self.codec,
            "duplicates_dropped": self.duplicates_dropped,
        }

    def report(self) -> dict[str, Any]:
        """``settings()`` plus ``{"metrics": compute()}``: the content of metrics.json."""
        return {**self.settings(), "metrics": self.compute()}

    def write(
        self, out_dir: str | os.PathLike[str], *, gallery: int = 0, image_root: str | None = None
    ) -> dict[str, Path]:
        """Write predictions.jsonl, metrics.json, metrics.md (and a gallery of ``gallery`` cases per tier)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report = self.report()
        paths = {
            "predictions": write_predictions(out / "predictions.jsonl", self.rows),
            "metrics_json": write_metrics_json(out / "metrics.json", report),
            "metrics_md": write_metrics_md(out / "metrics.md", report, self.rows),
        }
        if gallery > 0:
            from mg3d.viz import write_gallery  # matplotlib only when pictures are asked for

            paths["gallery"] = write_gallery(
                self.rows, out / "gallery", k=gallery, metrics=report, image_root=image_root
            )
        return paths


def rescore(
    path: str | os.PathLike[str], protocol: str = "mg3d", **evaluator_kwargs: Any
) -> GroundingEvaluator:
    """Re-score a predictions file without a model: a filled :class:`GroundingEvaluator`."""
    evaluator = GroundingEvaluator(protocol, **evaluator_kwargs)
    evaluator.update(read_predictions(path))
    return evaluator
