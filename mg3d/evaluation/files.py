"""Prediction and metric files: JSONL rows in, JSON / markdown reports out, and re-scoring a file."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mg3d.atomic import atomic_write_text
from mg3d.data.jsonl import iter_jsonl_objects
from mg3d.errors import DataError
from mg3d.evaluation.metrics import _tag
from mg3d.evaluation.protocols import GROUP_KEYS
from mg3d.evaluation.scoring import EvalItem, ScoredPrediction, item_from_prediction


def _iter_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, object)`` per prediction: JSONL lines, or the ``results`` of a MedGround-R1 / VLM-R1 log."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"cannot read predictions file {path}: {err}") from None
    except UnicodeDecodeError:
        text = ""  # not a log; the line reader below names the line that is not UTF-8
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict) and isinstance(whole.get("results"), list):
            for i, entry in enumerate(whole["results"]):
                yield f"{path}: results[{i}]", entry
            return
    for lineno, obj in iter_jsonl_objects(path):
        yield f"{path}:{lineno}", obj


def read_predictions(path: str | os.PathLike[str]) -> list[EvalItem]:
    """Read a predictions file (JSONL, or a MedGround-R1 evaluation log ``{"results": [...]}``) as items.

    Rows without an ``id`` get their position (``"0"``, ``"1"`` …). Duplicate ids are refused.
    """
    p = Path(path)
    items: list[EvalItem] = []
    seen: dict[str, str] = {}
    for where, obj in _iter_rows(p):
        item = item_from_prediction(obj, where=where, default_id=str(len(items)))
        if item.id in seen:
            raise DataError(f"{where}: id {item.id!r} already used at {seen[item.id]}")
        seen[item.id] = where
        items.append(item)
    if not items:
        raise DataError(f"{p}: no predictions in the file")
    return items


def write_predictions(path: str | os.PathLike[str], rows: Iterable[ScoredPrediction]) -> Path:
    """One JSON object per scored prediction (see :meth:`ScoredPrediction.to_dict`)."""
    lines = [json.dumps(r.to_dict(), ensure_ascii=False, allow_nan=False) for r in rows]
    return atomic_write_text(Path(path), "\n".join(lines) + ("\n" if lines else ""))


def write_metrics_json(path: str | os.PathLike[str], report: Mapping[str, Any]) -> Path:
    return atomic_write_text(Path(path), json.dumps(dict(report), indent=2, allow_nan=False) + "\n")


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def write_metrics_md(
    path: str | os.PathLike[str], report: Mapping[str, Any], rows: Sequence[ScoredPrediction] = ()
) -> Path:
    """A human-readable summary of metrics.json: overall table with intervals, parse reasons, groups."""
    m: Mapping[str, float] = report["metrics"]
    thresholds = report["thresholds"]
    cmp = "≥" if report["comparison"] == ">=" else ">"
    lines = [f"# Grounding evaluation — protocol `{report['protocol']}`", ""]
    if not report.get("standard_iou", True):
        lines += [
            '> **Non-standard metric.** Under this protocol "IoU" is M3D-LaMed\'s intersection over the '
            "*enclosing* box, which is lower than the true IoU. Compare only with numbers reported the same way.",
            "",
        ]
    lines += [
        f"{report['protocol_description']}.",
        "",
        f"n = {int(m['n'])}; Acc@τ counts IoU {cmp} τ; failures score IoU 0 and stay in the denominator; "
        f"{int(report['ci_level'] * 100)}% percentile-bootstrap intervals from {report['n_bootstrap']} resamples "
        f"(seed {report['seed']}).",
        "",
        "| metric | value | CI low | CI high |",
        "| --- | --- | --- | --- |",
    ]
    for name in ["mIoU", *(_tag(t) for t in thresholds)]:
        lines.append(
            f"| {name} | {_fmt(m[name])} | {_fmt(m.get(name + '_ci_low'))} | {_fmt(m.get(name + '_ci_high'))} |"
        )
    lines.append(f"| parse failure rate | {_fmt(m['parse_failure_rate'])} | | |")
    lines.append(f"| strict format rate | {_fmt(m['format_ok_rate'])} | | |")
    for key, unit in (("center_vox", "voxels"), ("center_mm", "mm")):
        if f"{key}_mean" in m:
            lines.append(
                f"| centre error ({unit}, n={int(m[key + '_n'])}) | mean {_fmt(m[key + '_mean'], 2)} | "
                f"median {_fmt(m[key + '_median'], 2)} | |"
            )
    statuses = sorted(k.split("/", 1)[1] for k in m if k.startswith("parse_status/"))
    if statuses:
        lines += ["", "## Parse outcomes", "", "| status | fraction | count |", "| --- | --- | --- |"]
        for s in statuses:
            frac = m[f"parse_status/{s}"]
            lines.append(f"| {s} | {_fmt(frac)} | {round(frac * m['n'])} |")
    failures = Counter(r.parse_detail or r.parse_status for r in rows if not r.parse_ok)
    if failures:
        lines += ["", "Most frequent failure details:", ""]
        lines += [f"- {count} × {detail}" for detail, count in failures.most_common(10)]
    for key in GROUP_KEYS:
        values = sorted({k.split("/")[1] for k in m if k.startswith(f"{key}/") and k.endswith("/n")})
        if not values:
            continue
        header = ["n", "mIoU", *(_tag(t) for t in thresholds), "parse_failure_rate"]
        lines += ["", f"## By {key.replace('_', ' ')}", "", f"| {key} | " + " | ".join(header) + " |"]
        lines.append("| --- " * (len(header) + 1) + "|")
        for v in values:
            cells = [str(int(m[f"{key}/{v}/n"]))] + [_fmt(m[f"{key}/{v}/{h}"]) for h in header[1:]]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return atomic_write_text(Path(path), "\n".join(lines) + "\n")
