"""The pretrained tiny policy the demo starts GRPO from (issue 18): how it was made, that it was made on phantoms
the demo never evaluates on, and that it grounds — on phantoms it never saw, against the prior-only controls."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from mg3d.boxes import pair_iou
from mg3d.data.datamodule import GroundingDataModule
from mg3d.data.records import read_manifest
from mg3d.evaluation.baselines import best_constant_box, mean_iou
from mg3d.grounder import Grounder

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))
PRETRAIN = yaml.safe_load((ROOT / "configs" / "demo_pretrain.yaml").read_text(encoding="utf-8"))
FOLDER = ROOT / DEMO["model"]["policy"]["checkpoint"]


def _synthetic(config: dict) -> dict:
    (source,) = config["data"]["sources"]
    return source


def test_the_demo_starts_from_the_shipped_pretrained_policy() -> None:
    assert DEMO["model"]["policy"]["checkpoint"] == "pretrained/ct3d_body_tiny"
    assert (FOLDER / "model.safetensors").is_file() and (FOLDER / "mg3d_inference.json").is_file()
    provenance = json.loads((FOLDER / "mg3d_provenance.json").read_text(encoding="utf-8"))
    # the folder is the end of the pretraining run its config describes, nothing else
    assert (
        provenance["global_step"]
        == PRETRAIN["trainer"]["max_steps"]
        == PRETRAIN["model"]["warm_start"]["steps"]
    )
    assert "configs/demo_pretrain.yaml" in provenance["made_by"]
    assert DEMO["model"]["warm_start"]["steps"] == 0  # GRPO from the first step, as from a pretrained VLM


def test_pretraining_saw_phantoms_of_the_demo_kind_but_never_the_demo_cases() -> None:
    demo, pre = _synthetic(DEMO), _synthetic(PRETRAIN)
    # the same kind of phantom and the same model input: a stale policy for a changed demo task fails here
    assert pre["synthetic"]["options"] == demo["synthetic"]["options"]
    assert pre["pipeline"] == demo["pipeline"]
    assert pre["synthetic"]["kind"] == demo["synthetic"]["kind"]
    assert PRETRAIN["model"]["prompt"] == DEMO["model"]["prompt"]
    # the shipped weights are the model the pretraining config describes
    config = json.loads((FOLDER / "config.json").read_text(encoding="utf-8"))
    sizes = PRETRAIN["model"]["policy"]
    assert config["text_config"]["hidden_size"] == sizes["hidden_size"]
    assert config["text_config"]["num_hidden_layers"] == sizes["num_layers"]
    assert config["vision_config"]["depth"] == sizes["vision_depth"]
    # other generator seed, other folder: no demo validation or test case was drawn
    assert pre["synthetic"]["seed"] != demo["synthetic"]["seed"]
    assert Path(pre["path"]).resolve() != Path(demo["path"]).resolve()


@pytest.fixture(scope="module")
def unseen_cases(tmp_path_factory: pytest.TempPathFactory) -> list:
    """40 phantoms of the demo's kind from the demo's own generator seed (0), which pretraining never used."""
    folder = tmp_path_factory.mktemp("demo_like")
    source = dict(_synthetic(DEMO), path=str(folder))
    source["synthetic"] = dict(source["synthetic"], n=40)
    GroundingDataModule(sources=[source], batch_size=2, cache="none").prepare_data()
    return [r for split in ("train", "val", "test") for r in read_manifest(folder / f"{split}.jsonl")]


def _ious(grounder: Grounder, records: list, targets: list) -> np.ndarray:
    preds = list(grounder.predict_records(records, batch_size=20, progress=False))
    boxes = [p.box_voxel if p.box_voxel is not None else (0.0,) * 6 for p in preds]
    return pair_iou(np.asarray(boxes, dtype=float), np.asarray([t.boxes[0] for t in targets], dtype=float))


@pytest.mark.slow
def test_the_pretrained_policy_grounds_on_unseen_phantoms(unseen_cases) -> None:
    """It must beat the best constant box by far, and lose its lead when each phrase gets another case's image."""
    grounder = Grounder.from_pretrained(FOLDER)
    records = unseen_cases
    looked = _ious(grounder, records, records)
    swapped = [replace(r, image=records[(i + 1) % len(records)].image) for i, r in enumerate(records)]
    blind = _ious(grounder, swapped, records)
    boxes = np.asarray([r.boxes[0] for r in records], dtype=float)
    half = len(records) // 2  # a constant box fitted on one half, scored on the other (and vice versa)
    constant = 0.5 * (
        mean_iou(best_constant_box(boxes[:half]), boxes[half:])
        + mean_iou(best_constant_box(boxes[half:]), boxes[:half])
    )
    assert looked.mean() >= max(2 * constant, constant + 0.10), (looked.mean(), constant)
    assert looked.mean() - blind.mean() >= 0.5 * (looked.mean() - constant), (looked.mean(), blind.mean())


@pytest.mark.slow
@pytest.mark.e2e
def test_demo_config_as_shipped_runs_grpo_from_the_pretrained_policy(tmp_path) -> None:
    """``configs/demo.yaml`` unchanged but for the step budget and the data: loads the folder, runs GRPO steps."""
    source = dict(_synthetic(DEMO), path=str(tmp_path / "phantoms"))
    source["synthetic"] = dict(source["synthetic"], n=24)
    args = [
        sys.executable, str(ROOT / "scripts" / "train.py"), "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
        "--trainer.max_steps=2", "--model.steps_per_generation=1", "--model.rollout.num_generations=2",
        "--model.evaluation.max_samples=4", "--model.evaluation.batch_size=4", "--model.evaluation.sampled=false",
        f"--data.sources=[{json.dumps(source)}]", "--data.batch_size=2", "--data.cache=none",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONUTF8": "1"}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(next((tmp_path / "run").rglob("grpo_summary.json")).read_text(encoding="utf-8"))
    assert set(summary) >= {"start", "after_grpo"} and summary["after_grpo"]["step"] == 2
    assert "GRPO changed held-out greedy mIoU" in done.stdout and "over the starting policy" in done.stdout
