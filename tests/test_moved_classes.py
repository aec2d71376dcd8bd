"""Checkpoints written before configuration classes moved still load (``mg3d.checkpointing.MOVED_CLASSES``).

A Lightning checkpoint pickles its hyper-parameters' classes by path. Here each class is pickled under its
old path — exactly what a checkpoint from before the move holds — and read back with mg3d's safe loader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import sys
import types
import zipfile
from collections.abc import Iterator

import pytest
import torch

from mg3d.checkpointing import MOVED_CLASSES, load_checkpoint_safely
from mg3d.data.transforms import AugmentConfig, PipelineConfig
from mg3d.generation import RolloutConfig
from mg3d.grounding import PromptConfig
from mg3d.model import PolicyConfig

CONFIGS = {
    PolicyConfig: PolicyConfig(hidden_size=64, num_layers=2),
    PromptConfig: PromptConfig(template="terse", max_vision_tokens=32),
    RolloutConfig: RolloutConfig(num_generations=4, stop_strings=("</answer>",)),
    PipelineConfig: PipelineConfig(spatial_size=(28, 28, 8)),
    AugmentConfig: AugmentConfig(),
}


@contextlib.contextmanager
def pickled_as(cls: type, old_path: str) -> Iterator[None]:
    """Make pickle name ``cls`` by ``old_path`` (a module that may no longer exist)."""
    module_name, _, name = old_path.rpartition(".")
    created = module_name not in sys.modules
    module = sys.modules.setdefault(module_name, types.ModuleType(module_name))
    before = (cls.__module__, cls.__qualname__, getattr(module, name, None))
    setattr(module, name, cls)
    cls.__module__, cls.__qualname__ = module_name, name
    try:
        yield
    finally:
        cls.__module__, cls.__qualname__ = before[0], before[1]
        if created:
            del sys.modules[module_name]
        elif before[2] is None:
            delattr(module, name)
        else:
            setattr(module, name, before[2])


@pytest.mark.parametrize("old_path", sorted(MOVED_CLASSES))
def test_a_checkpoint_naming_the_old_path_loads(old_path: str, tmp_path) -> None:
    new_path = MOVED_CLASSES[old_path]
    module, _, name = new_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert f"{cls.__module__}.{cls.__qualname__}" == new_path  # the table names where the class lives now
    config = CONFIGS[cls]
    path = tmp_path / "old.ckpt"
    with pickled_as(cls, old_path):
        torch.save({"hyper_parameters": {"group": config}, "state_dict": {"w": torch.ones(2)}}, path)
    with zipfile.ZipFile(path) as archive:  # the file names the old path (GLOBAL 'module name')
        data = next(archive.read(n) for n in archive.namelist() if n.endswith("data.pkl"))
    module_old, _, name_old = old_path.rpartition(".")
    assert f"{module_old}\n{name_old}".encode() in data
    loaded = load_checkpoint_safely(path)["hyper_parameters"]["group"]
    assert type(loaded) is cls and dataclasses.asdict(loaded) == dataclasses.asdict(config)


def test_an_unknown_old_path_is_still_refused(tmp_path) -> None:
    path = tmp_path / "odd.ckpt"
    with pickled_as(PromptConfig, "mg3d.gone.PromptConfig"):
        torch.save({"hyper_parameters": {"prompt": PromptConfig()}}, path)
    from mg3d.errors import ConfigError

    with pytest.raises(ConfigError, match=r"mg3d\.gone\.PromptConfig"):
        load_checkpoint_safely(path)
