"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest

from mg3d.data.datamodule import GroundingDataModule, SourceConfig, SyntheticConfig
from mg3d.data.transforms import PipelineConfig

TINY_SHAPE = [32, 32, 16]


@pytest.fixture(scope="session")
def phantom_source(tmp_path_factory) -> SourceConfig:
    """16 single-lesion CT phantoms of 32×32×16 voxels, prepared (manifests written), fitted to 28×28×8:
    the smallest data on which the training tests run the real adapter and pipeline."""
    folder = tmp_path_factory.mktemp("phantoms") / "ct3d"
    source = SourceConfig(
        path=str(folder),
        synthetic=SyntheticConfig(
            kind="ct3d",
            n=16,
            seed=3,
            val_fraction=0.25,
            questions_per_region=[1, 0],
            options={"shape": TINY_SHAPE, "single_lesion": True},
        ),
        pipeline=PipelineConfig(spatial_size=(28, 28, 8)),
    )
    GroundingDataModule([source]).prepare_data()
    return source


@pytest.fixture(scope="session")
def qwen_folder():
    """A real-architecture Qwen2.5-VL folder (real tokenizer and vocabulary, 3B vision geometry, small random
    layers, Instruct-style generation config with a repetition penalty), built once and cached on disk."""
    from mg3d.testing import real_architecture_folder

    return real_architecture_folder()
