"""mg3d's LightningCLI: ``python scripts/train.py fit|validate|test|predict --config configs/….yaml``.

Subclassed only to set mg3d's defaults (seeded runs, CSV + TensorBoard loggers, rich progress bar, a last
checkpoint for exact resume, atomic checkpoint writes), to link arguments that must agree between the
model and the data, and to read ``--ckpt_path`` safely.

Logs and checkpoints of a run live under its ``trainer.default_root_dir``: the default CSV and TensorBoard loggers
write to ``<default_root_dir>/lightning_logs/version_N`` and ``<default_root_dir>/tensorboard`` (``runs/…`` when no
root is set), and checkpoints to one fixed folder, ``<trainer.default_root_dir>/checkpoints``: a ``ModelCheckpoint``
without a ``dirpath`` would otherwise write into the logger's ``version_N`` folder, and a restarted run (a new
version) would not find the previous run's ``last.ckpt`` with ``--ckpt_path last``.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.cloud_io import _is_local_file_protocol, get_filesystem
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mg3d.checkpointing import load_checkpoint_safely, with_atomic_checkpoint_io
from mg3d.data.datamodule import GroundingDataModule, check_sources
from mg3d.data.user_modules import import_user_modules, user_modules_from
from mg3d.grpo.module import GRPOModule

__all__ = [
    "CHECKPOINT_FOLDER",
    "MG3DCLI",
    "FinalMetricsInLastCheckpoint",
    "StepsProgressBar",
    "fix_checkpoint_dirs",
    "follow_default_root_dir",
    "main",
    "overridden_settings",
]

#: Where checkpoints without their own ``dirpath`` go, under the trainer's ``default_root_dir``.
CHECKPOINT_FOLDER = "checkpoints"
#: save_dir of the default loggers when the run names no ``default_root_dir``.
_DEFAULT_LOG_ROOT = "runs"
_LOGGER_SUBDIRS = {"CSVLogger": "", "TensorBoardLogger": "tensorboard"}


def follow_default_root_dir(trainer_config: Any) -> None:
    """Point mg3d's *default* loggers (still at their default ``save_dir``) at ``trainer.default_root_dir``,
    in the parsed (not yet instantiated) trainer config, so a run's logs sit beside its checkpoints.

    A logger the user configured with another ``save_dir`` is left alone. Lightning has no interpolation for
    this, and setting the folders after the loggers exist would mean writing their private attributes.
    """
    root = trainer_config.get("default_root_dir")
    loggers = trainer_config.get("logger")
    if not root or not isinstance(loggers, list):
        return
    for logger in loggers:
        class_path = str(logger.get("class_path", "")) if hasattr(logger, "get") else ""
        sub = _LOGGER_SUBDIRS.get(class_path.rsplit(".", 1)[-1])
        init_args = logger.get("init_args") if sub is not None else None
        if init_args is None:
            continue
        default = os.path.join(_DEFAULT_LOG_ROOT, sub) if sub else _DEFAULT_LOG_ROOT
        if os.path.normpath(str(init_args.get("save_dir"))) == os.path.normpath(default):
            init_args["save_dir"] = os.path.join(str(root), sub) if sub else str(root)


def fix_checkpoint_dirs(trainer: Trainer) -> list[ModelCheckpoint]:
    """Give every ``ModelCheckpoint`` of ``trainer`` that has no ``dirpath`` the fixed folder
    ``<default_root_dir>/checkpoints`` (resolved as ``ModelCheckpoint`` resolves its own); return those changed.

    Lightning resolves a missing ``dirpath`` only in ``setup``, to the first logger's ``version_N`` folder,
    which is after ``ckpt_path="last"`` has been looked up and differs between a run and its restart.
    """
    folder = os.path.join(trainer.default_root_dir, CHECKPOINT_FOLDER)
    changed = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            local = _is_local_file_protocol(folder)
            callback._fs = get_filesystem(folder)  # as ModelCheckpoint.__init__ sets it for a given dirpath
            callback.dirpath = os.path.realpath(os.path.expanduser(folder)) if local else folder
            changed.append(callback)
    return changed


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values of nested mappings / namespaces (tuples compared as lists)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


def overridden_settings(before: Any, after: Any, prefix: str = "model") -> list[str]:
    """``key: old → new`` for every setting that differs between two configs (what a checkpoint replaced)."""
    old, new = _flat(before), _flat(after)
    return [f"{prefix}.{k}: {old[k]!r} → {new[k]!r}" for k in sorted(new) if k in old and old[k] != new[k]]


class StepsProgressBar(RichProgressBar):
    """Rich progress bar that names the step budget of a run bounded by ``max_steps`` (``max_epochs: -1``):
    Lightning's own shows ``Epoch 1/-2`` there."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs in (None, -1) and trainer.max_steps and trainer.max_steps > 0:
            text = f"Epoch {current_epoch} (max_steps {trainer.max_steps})"
            return f"{text:{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)


class FinalMetricsInLastCheckpoint(Callback):
    """Write the module's final held-out results into ``last.ckpt`` after fit.

    ``GRPOModule`` evaluates the trained policy in ``on_train_end``, after the last checkpoint was saved, so that
    checkpoint (and a bundle exported from it) would carry the warm start's metrics. Only the
    ``mg3d_eval_results`` entry changes; the rewrite is atomic and weights-only like every mg3d checkpoint write.
    """

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        results = getattr(pl_module, "eval_results", None)
        if not trainer.is_global_zero or not results:
            return
        from mg3d.checkpointing import AtomicCheckpointIO

        for callback in trainer.checkpoint_callbacks:
            path = getattr(callback, "last_model_path", "")
            if not path or not Path(path).is_file():
                continue
            checkpoint = load_checkpoint_safely(path)
            if checkpoint.get("global_step") != trainer.global_step:
                continue  # not this run's final state
            if checkpoint.get("mg3d_eval_results") == results:
                continue
            checkpoint["mg3d_eval_results"] = dict(results)
            AtomicCheckpointIO().save_checkpoint(checkpoint, path)


class MG3DCLI(LightningCLI):
    """LightningCLI with mg3d's model, DataModule and defaults."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # User code (modality presets, rewards, adapters): imported before any class is built and saved with the
        # checkpoint (the DataModule's state), so evaluate.py / export_bundle.py / bundles need nothing extra.
        parser.add_argument(
            "--imports",
            type=list[str],
            default=[],
            help="user modules to import first: dotted names or .py files (docs/extending.md)",
        )
        # One seed drives the run: the tiny policy's init (unless policy.seed is set) and sampling (seed + rank),
        # and the data order and augmentation (seed + rank). The phantoms keep their own synthetic.seed, so
        # runs with different seeds train on the same benchmark.
        parser.link_arguments("seed_everything", "model.sampling_seed")
        parser.link_arguments("seed_everything", "data.seed")
        parser.set_defaults(
            {
                "trainer.logger": [
                    # CSV first: its folder is trainer.log_dir (summaries, completions, skipped.json go there;
                    # checkpoints go to <default_root_dir>/checkpoints, see fix_checkpoint_dirs).
                    # Both follow trainer.default_root_dir when one is set (follow_default_root_dir).
                    {
                        "class_path": "lightning.pytorch.loggers.CSVLogger",
                        "init_args": {"save_dir": _DEFAULT_LOG_ROOT},
                    },
                    {
                        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                        "init_args": {"save_dir": os.path.join(_DEFAULT_LOG_ROOT, "tensorboard")},
                    },
                ],
                "trainer.callbacks": [
                    {"class_path": "mg3d.cli.StepsProgressBar"},
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

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        import_user_modules(config.get("imports") or [])
        # Preset names and options, and source paths, are checked here: before any model is built.
        data = config.get("data")
        if data is not None and data.get("sources") is not None:
            check_sources(data.get("sources"))
        if config.get("trainer") is not None:
            follow_default_root_dir(config["trainer"])

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's merge of the hyper-parameters saved in an explicit ``--ckpt_path`` file, but read with
        :func:`mg3d.grounder.load_checkpoint_safely` (globals listed before unpickling, weights-only whatever
        torch's default): a crafted, foreign or truncated file stops the run with a ``ConfigError`` naming it."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():  # "last", "best", … are resolved by the Trainer
            return
        checkpoint = load_checkpoint_safely(ckpt_path)
        data_state = checkpoint.get(GroundingDataModule.__qualname__)
        if isinstance(data_state, dict):  # the user code the checkpoint was trained with
            user_modules_from(data_state.get("user_modules"), f"--ckpt_path {ckpt_path}")
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        before = _flat(self.config[subcommand].get("model"))  # now: parse_object may update it in place
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write(f"Parsing of the hyper-parameters saved in {ckpt_path} failed!\n")
            raise
        # Lightning lets the checkpoint's hyper-parameters win over the config and the command line, silently:
        # a resumed run that was meant to change a setting would run with the old one.
        changed = overridden_settings(before, self.config[subcommand].get("model"))
        if changed:
            warnings.warn(
                f"--ckpt_path {ckpt_path}: its saved hyper-parameters replace these settings of the config / "
                f"command line: {'; '.join(changed)} (docs/reliability.md: how to continue with other settings)",
                UserWarning,
                stacklevel=2,
            )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # Atomic, weights-only checkpoint IO (mg3d.checkpointing) unless the run already names a CheckpointIO;
        # added here rather than as a `trainer.plugins` default so that `--trainer.plugins=…` keeps it.
        config = self._get(self.config_init, "trainer", default={})
        plugins = kwargs.get("plugins", config.get("plugins"))
        kwargs["plugins"] = with_atomic_checkpoint_io(plugins, kwargs.get("strategy", config.get("strategy")))
        trainer = super().instantiate_trainer(**kwargs)
        fix_checkpoint_dirs(trainer)
        trainer.callbacks.append(FinalMetricsInLastCheckpoint())
        return trainer


# Lightning warnings that every mg3d run would print and that ask nothing of the user: mg3d overrides
# transfer_batch_to_device on purpose (samples stay on the CPU until the prompter builds model inputs); its
# checkpoints hold the post-step state on purpose (resume continues after the saved step); the pytree notice is
# about Lightning's own use of a torch API.
_EXPECTED_WARNINGS = (
    r"You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a",
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


def main(args: list[str] | None = None, run: bool = True) -> MG3DCLI:
    # Keep Hugging Face offline: every model and tokenizer mg3d loads is a local folder or built in memory.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    for message in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    # No prefix matching of option names: `--trainer.max_step` must be an error, not `max_steps`.
    no_abbrev = {"allow_abbrev": False}
    return MG3DCLI(
        GRPOModule,
        GroundingDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={**no_abbrev, **{name: dict(no_abbrev) for name in LightningCLI.subcommands()}},
    )
