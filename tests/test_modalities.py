"""Modality presets: hand-computed intensities, the registry, and the docs' walk-through run verbatim."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from mg3d.data import modalities
from mg3d.data.modalities import (
    CT_WINDOWS,
    ModalityPreset,
    available_presets,
    get_preset,
    register_preset,
)
from mg3d.data.records import known_modalities, record_from_dict
from mg3d.errors import ConfigError

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def run(preset: str, values, **options) -> torch.Tensor:
    image = MetaTensor(torch.as_tensor(np.asarray(values, np.float32)))
    return get_preset(preset).compose(**options)({"image": image})["image"]


def test_builtins_are_registered_and_known_to_records():
    assert {"CT", "MR", "PET", "CXR"} <= set(available_presets())
    assert {"CT", "MR", "PET", "CXR"} <= known_modalities()
    assert get_preset("CXR").ndims == (2,)


def test_ct_windows_hand_computed():
    hu = [[[-1350.0, -600.0, 150.0, 40.0, 2000.0]]]  # (1, 1, 5)
    lung = run("CT", hu, windows=["lung"])
    torch.testing.assert_close(lung[0, 0], torch.tensor([0.0, 0.5, 1.0, 1390 / 1500, 1.0]))
    both = run("CT", hu, windows=["mediastinum", (0.0, 100.0)])
    assert both.shape == (2, 1, 5)
    torch.testing.assert_close(both[0, 0, 3], torch.tensor(165 / 350))  # 40 HU in L50/W350
    torch.testing.assert_close(both[1, 0], torch.tensor([0.0, 0.0, 1.0, 0.4, 1.0]))
    assert CT_WINDOWS["abdomen"] == (-150.0, 250.0)
    assert get_preset("CT").channels(windows=["lung", "bone", "brain"]) == 3
    with pytest.raises(ConfigError, match="unknown CT window 'liver'"):
        run("CT", hu, windows=["liver"])
    with pytest.raises(ConfigError, match="lo < hi"):
        run("CT", hu, windows=[(100, 0)])


def test_mr_percentiles_and_pet_suv():
    ramp = np.arange(101, dtype=np.float32)[None, None]  # 0..100: the p-th percentile is p
    out = run("MR", ramp, lower=10.0, upper=90.0)
    torch.testing.assert_close(out[0, 0, [0, 10, 50, 90, 100]], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    suv = run("PET", [[[-1.0, 0.0, 2.5, 5.0, 12.0]]], suv_max=5.0)
    torch.testing.assert_close(suv[0, 0], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    with pytest.raises(ConfigError, match="suv_max"):
        get_preset("PET").transforms(suv_max=0.0)


def test_cxr_grey_and_monochrome1_inversion():
    rgb = np.stack([np.linspace(0, 200, 201, dtype=np.float32)] * 3)[:, :, None]  # (3, 201, 1) colour ramp
    image = MetaTensor(torch.as_tensor(rgb))
    preset = get_preset("CXR").compose(lower=0.0, upper=100.0)
    plain = preset({"image": image})["image"]
    assert plain.shape == (1, 201, 1)
    torch.testing.assert_close(plain[0, [0, 100, 200], 0], torch.tensor([0.0, 0.5, 1.0]))
    inverted = preset({"image": image, modalities.PHOTOMETRIC_KEY: "MONOCHROME1"})["image"]
    torch.testing.assert_close(inverted, 1.0 - plain)
    kept = preset({"image": image, modalities.PHOTOMETRIC_KEY: "MONOCHROME2"})["image"]
    torch.testing.assert_close(kept, plain)


def test_registry_rules():
    with pytest.raises(ConfigError, match="no modality preset 'XX'"):
        get_preset("XX")
    with pytest.raises(ConfigError, match="already registered"):
        register_preset(ModalityPreset("CT", lambda: []))
    with pytest.raises(ConfigError, match="unknown option"):
        get_preset("MR").transforms(lowr=1.0)
    with pytest.raises(ConfigError, match="ndims"):
        register_preset(ModalityPreset("US_BAD", lambda: [], ndims=(4,)))
    register_preset(ModalityPreset("US_TEST", lambda: [], ndims=(2,)), replace=True)
    assert "US_TEST" in known_modalities()
    record = record_from_dict({
        "schema_version": 1, "id": "us/1", "dataset": "us", "split": "test", "modality": "US_TEST", "ndim": 2,
        "image": "a.png", "text": "t", "boxes": [[0, 0, 1, 1]], "spatial_shape": [4, 4],
    })  # fmt: skip
    assert record.modality == "US_TEST"


def doc_python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_extending_walkthrough_runs(tmp_path, monkeypatch, capsys):
    """Runs docs/extending.md's code blocks verbatim, in order, in one namespace."""
    blocks = doc_python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "extending_walkthrough"}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "(33, 41, 25) ('L', 'A', 'S')" in printed and "['reorient', 'respace', 'resize']" in printed
    assert (tmp_path / "mr_demo" / "train.jsonl").is_file()
    assert namespace["sample"]["modality"] == "MR_T1"
