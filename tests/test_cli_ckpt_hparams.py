"""`--ckpt_path` merges the checkpoint's hyper-parameters over the config (Lightning's rule); mg3d says which."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from jsonargparse import Namespace

from mg3d.cli import MG3DCLI, overridden_settings
from mg3d.data.datamodule import GroundingDataModule
from mg3d.grpo.module import GRPOModule

REPO = Path(__file__).resolve().parents[1]


def test_overridden_settings_by_hand() -> None:
    before = Namespace(
        rollout=Namespace(stop_strings=("</answer>",), max_new_tokens=28), warm_start={"steps": 5}
    )
    after = {"rollout": {"stop_strings": [], "max_new_tokens": 28}, "warm_start": {"steps": 5}}
    assert overridden_settings(before, after) == ["model.rollout.stop_strings: ['</answer>'] → []"]
    assert overridden_settings(before, before) == []
    # a key the checkpoint adds (a newer setting) is not an override of the config
    assert overridden_settings({"a": 1}, {"a": 1, "b": 2}) == []


class _Stop(Exception):
    pass


class _ParseOnlyCLI(MG3DCLI):
    """Parses (and merges --ckpt_path) as the real CLI does, then stops before building anything."""

    def instantiate_classes(self) -> None:
        raise _Stop


def test_ckpt_path_hyper_parameters_that_replace_the_config_are_named(tmp_path: Path) -> None:
    ckpt = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": {"rollout": {"max_new_tokens": 5, "stop_strings": []}}}, ckpt)
    args = ["fit", "--config", str(REPO / "configs/demo.yaml"), "--ckpt_path", str(ckpt)]
    with (
        pytest.warns(UserWarning, match=r"model\.rollout\.max_new_tokens: 28 → 5") as record,
        pytest.raises(_Stop),
    ):
        _ParseOnlyCLI(GRPOModule, GroundingDataModule, args=args)
    (message,) = [str(w.message) for w in record if "saved hyper-parameters replace" in str(w.message)]
    assert str(ckpt) in message and "model.rollout.stop_strings: ['</answer>'] → []" in message
    # a setting the checkpoint's (older) group lacks falls back to its default: that is named too
    torch.save({"hyper_parameters": {"rollout": {"max_new_tokens": 28}}}, ckpt)
    with (
        pytest.warns(UserWarning, match=r"model\.rollout\.stop_strings: \['</answer>'\] → \[\]"),
        pytest.raises(_Stop),
    ):
        _ParseOnlyCLI(GRPOModule, GroundingDataModule, args=args)
    # the config's own values change nothing and say nothing
    same = {"max_new_tokens": 28, "stop_strings": ["</answer>"], "decoder": "lean"}  # configs/demo.yaml's
    torch.save({"hyper_parameters": {"rollout": same}}, ckpt)
    with pytest.raises(_Stop):
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*saved hyper-parameters replace.*")
            _ParseOnlyCLI(GRPOModule, GroundingDataModule, args=args)
