"""docs/extending.md's own-data walk-through, run verbatim: MR and PET scans → manifests → training → evaluation
and gallery → bundles → ``python -m monai.bundle run``, with one user module and no wrapper script.

Every ``python title=…`` / ``yaml title=…`` block of the section is written to its file and every ``bash`` block
is run by bash, in order, in one folder (``scripts`` linked to the repository's, ``python`` the test's own).
What is checked is that the modality is right at every step and that mismatched inputs are refused.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mg3d.checkpointing import load_checkpoint_safely
from mg3d.data.records import read_manifest, register_modality

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "extending.md"
SECTION = "## Walk-through: your own MR and PET scans, from files to a bundle"


def walkthrough_blocks() -> list[tuple[str, str, str]]:
    """``(kind, title, text)`` of each fenced block of the section, in order (kind ``file`` or ``bash``)."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else len(text)]
    blocks = []
    for match in re.finditer(r"```(\w+)( title=(\S+))?\n(.*?)```", section, flags=re.DOTALL):
        lang, title, body = match.group(1), match.group(3), match.group(4)
        if title:
            blocks.append(("file", title, body))
        elif lang == "bash":
            blocks.append(("bash", "", body))
    return blocks


def test_walkthrough_blocks_are_found() -> None:
    blocks = walkthrough_blocks()
    files = [title for kind, title, _ in blocks if kind == "file"]
    assert files == ["my_presets.py", "mr.yaml", "pet.yaml"]
    assert sum(kind == "bash" for kind, _, _ in blocks) == 6


@pytest.mark.slow
@pytest.mark.e2e
def test_own_data_walkthrough_runs_verbatim(tmp_path: Path) -> None:
    (tmp_path / "scripts").symlink_to(REPO / "scripts")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUTF8": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)  # the user module must come from the config / checkpoint, not the environment
    outputs = []
    for kind, title, body in walkthrough_blocks():
        if kind == "file":
            (tmp_path / title).write_text(body, encoding="utf-8")
            continue
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, (
            f"{body}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
        )
        outputs.append(done.stdout + done.stderr)

    # 2. import: modality stamped as given; PET converted from Bq/ml to SUV
    register_modality("MR_T1")  # the key the user module registers (its preset is not needed to read records)
    mr = read_manifest(tmp_path / "data/mr/train.jsonl")
    pet = read_manifest(tmp_path / "data/pet/train.jsonl")
    assert {r.modality for r in mr} == {"MR_T1"} and {r.modality for r in pet} == {"PET"}
    assert mr[0].spacing == pytest.approx((1.5, 1.5, 3.0)) and pet[0].spacing == pytest.approx(
        (4.0, 4.0, 4.0)
    )
    suv = np.asarray(nib.load(pet[0].image).dataobj)
    assert "converted" in pet[0].image and 3.0 < float(suv.max()) < 9.0 and float(np.median(suv)) < 1.5

    # 3. the checkpoints name their modality, their user code and the final model's metrics
    for name, modality in (("mr", "MR_T1"), ("pet", "PET")):
        ckpt = load_checkpoint_safely(tmp_path / f"runs/{name}/checkpoints/last.ckpt")
        state = ckpt["GroundingDataModule"]
        assert state["modalities"] == {"3": [modality]}
        assert ckpt["mg3d_eval_results"]["after_grpo"]["step"] == ckpt["global_step"]
    assert [m["name"] for m in state["user_modules"]] in ([], ["my_presets"])

    # 4. evaluation and gallery
    metrics = json.loads((tmp_path / "eval/mr/metrics.json").read_text(encoding="utf-8"))
    assert metrics["metrics"]["n"] == 2
    assert list((tmp_path / "eval/mr/gallery/cases").glob("*.png"))

    # 5. bundles: modality and preprocessing in the metadata, metrics of the final model / of evaluate.py
    meta_mr = json.loads((tmp_path / "bundles/mr/configs/metadata.json").read_text(encoding="utf-8"))
    meta_pet = json.loads((tmp_path / "bundles/pet/configs/metadata.json").read_text(encoding="utf-8"))
    image_mr, image_pet = (m["network_data_format"]["inputs"]["image"] for m in (meta_mr, meta_pet))
    assert (image_mr["modality"], image_mr["format"]) == ("MR_T1", "magnitude")
    assert (image_pet["modality"], image_pet["format"]) == ("PET", "suv")
    assert meta_pet["mg3d"]["preprocessing"]["3d"]["preset_options"] == {"suv_max": 8.0}
    assert meta_mr["eval_metrics"]["mIoU"] == metrics["metrics"]["mIoU"]
    assert "after_grpo/greedy/mIoU" in meta_pet["eval_metrics"]
    assert (tmp_path / "bundles/mr/models/user_modules/my_presets.py").is_file()
    assert "trained on 3D MR_T1" in (tmp_path / "bundles/mr/docs/README.md").read_text(encoding="utf-8")
    row = json.loads((tmp_path / "out/mr/0000_case000.json").read_text(encoding="utf-8"))
    assert (
        row["modality"] == "MR_T1"
        and row["spacing"] == [1.5, 1.5, 3.0]
        and row["box_frame"].startswith("stored")
    )
    assert (tmp_path / "out/mr/0000_case000.png").is_file()

    # refusals: one line each, exit 2; the override runs and warns
    refusals = outputs[-1]
    errors = [line for line in refusals.splitlines() if line.startswith("error: ")]
    assert refusals.count("refused, exit 2") == 2 and len(errors) == 2, refusals[-3000:]
    assert "are not PET in SUV" in errors[0] and "ct_raw/s0000/ct.nii.gz" in errors[0]
    assert "modality 'PET', the model was trained on 3D MR_T1 only" in errors[1]
    assert "running anyway (allow_mismatch)" in refusals
    assert len(list((tmp_path / "out/pet_in_mr").glob("*.json"))) == 1
    assert not list((tmp_path / "bundles").rglob("__pycache__"))  # importing the bundle's copy wrote nothing
