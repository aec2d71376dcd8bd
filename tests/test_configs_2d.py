"""configs/demo_2d.yaml through mg3d's LightningCLI, as written, shrunk to a handful of phantoms and steps.

What is checked is that the shipped 2D demo runs end to end — its synthetic block writes single-finding
ChestX-ray8 phantoms of the kinds it names, the real adapter reads them as 2D records with place-free phrases,
the warm start and GRPO take steps and the before/after summary is written — not that it learns
(docs/benchmarks.md measures that).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from mg3d.data.records import read_manifest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo_2d.yaml"


def tiny_source(folder: Path) -> dict[str, Any]:
    """The config's own data source (kinds, findings per image, layout), with 10 small images in ``folder``."""
    source = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))["data"]["sources"][0]
    source["path"] = str(folder)
    source["synthetic"]["n"] = 10
    source["synthetic"]["options"]["chestxray8_size"] = 96
    source["pipeline"]["spatial_size"] = [56, 56]
    return source


@pytest.mark.slow
def test_demo_2d_config_runs_with_tiny_overrides(tmp_path):
    from mg3d.cli import main

    source = tiny_source(tmp_path / "cxr2d")
    assert source["synthetic"]["layout"] == "chestxray8"
    cli = main(
        [
            "--config", str(CONFIG), "--trainer.max_steps=4", "--model.warm_start.steps=2",
            "--model.steps_per_generation=1", "--model.rollout.num_generations=2",
            "--model.evaluation.max_samples=3", "--model.evaluation.batch_size=3",
            "--model.log_completions_every_n_steps=0", f"--data.sources=[{json.dumps(source)}]",
            "--data.batch_size=2", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_model_summary=false",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
            "--trainer.logger.name=demo_2d", "--trainer.log_every_n_steps=1",
        ],
        run=False,
    )  # fmt: skip
    assert cli.model.prompt_config.template == "terse"
    assert cli.model.rollout_config.num_generations == 2 and cli.model.loss_config.beta == 0.0
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 4

    options = source["synthetic"]["options"]
    categories = {"mass": "Mass", "nodule": "Nodule"}
    wanted = {categories[k] for k in options["kinds"]}
    records = [
        r for split in ("train", "val", "test") for r in read_manifest(tmp_path / "cxr2d" / f"{split}.jsonl")
    ]
    assert len(records) == 10  # max_findings: 1 → one phrase per image
    for record in records:
        assert (record.ndim, record.modality, record.dataset) == (2, "CXR", "synthetic2d"), record.id
        assert record.category in wanted and len(record.boxes) == 1, record.id
        # ChestX-ray8 has no phrases: the adapter's says what, never where
        assert not {"left", "right", "upper", "lower", "zone"} & set(record.text.split()), record.text

    log_dir = next(tmp_path.glob("demo_2d/version_*"))
    summary = json.loads((log_dir / "grpo_summary.json").read_text(encoding="utf-8"))
    assert summary["warm_start"]["step"] == 2 and summary["after_grpo"]["step"] == 4
    for stage in ("warm_start", "after_grpo"):
        for metric in ("greedy/mIoU", "sampled/mIoU", "greedy/acc@0.5"):
            value = summary[stage][metric]
            assert math.isfinite(value) and 0.0 <= value <= 1.0, (stage, metric, value)
    rows = list(csv.DictReader((log_dir / "metrics.csv").open(encoding="utf-8")))
    keys = set().union(*(r.keys() for r in rows))
    for key in ("sft/loss", "train/reward", "train/rewards/iou/mean", "eval_after_grpo/greedy/mIoU"):
        assert key in keys, key
