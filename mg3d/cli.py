"""mg3d's LightningCLI: ``python scripts/train.py fit|validate|test|predict --config configs/….yaml``.

Subclassed only to set mg3d's defaults (seeded runs, CSV + TensorBoard loggers, rich progress bar, a last
checkpoint for exact resume, atomic checkpoint writes) and to link arguments that must agree between the
model and the data.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mg3d.checkpointing import with_atomic_checkpoint_io
from mg3d.data.datamodule import GroundingDataModule
from mg3d.grpo.module import GRPOModule

__all__ = ["MG3DCLI", "main"]


class MG3DCLI(LightningCLI):
    """LightningCLI with mg3d's model, DataModule and defaults."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # One seed drives data order, phantoms and model init; sampling uses seed + rank (GRPOModule).
        parser.link_arguments("seed_everything", "model.sampling_seed")
        parser.set_defaults(
            {
                "trainer.logger": [
                    # CSV first: its folder is trainer.log_dir (summaries, completions, checkpoints go there).
                    {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
                    {
                        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                        "init_args": {"save_dir": "runs/tensorboard"},
                    },
                ],
                "trainer.callbacks": [
                    {"class_path": "lightning.pytorch.callbacks.RichProgressBar"},
                    {
                        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                        "init_args": {"save_last": True, "every_n_train_steps": 100},
                    },
                ],
                # The DataModule's sampler is already per rank (seed + rank) and resumable mid-epoch;
                # Lightning's distributed wrapper would re-split it and lose the resume position.
                "trainer.use_distributed_sampler": False,
            }
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # Atomic, weights-only checkpoint IO (mg3d.checkpointing) unless the run already names a CheckpointIO;
        # added here rather than as a `trainer.plugins` default so that `--trainer.plugins=…` keeps it.
        config = self._get(self.config_init, "trainer", default={})
        plugins = kwargs.get("plugins", config.get("plugins"))
        kwargs["plugins"] = with_atomic_checkpoint_io(plugins, kwargs.get("strategy", config.get("strategy")))
        return super().instantiate_trainer(**kwargs)


def main(args: list[str] | None = None, run: bool = True) -> MG3DCLI:
    # Keep Hugging Face offline: every model and tokenizer mg3d loads is a local folder or built in memory.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return MG3DCLI(
        GRPOModule,
        GroundingDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
    )
