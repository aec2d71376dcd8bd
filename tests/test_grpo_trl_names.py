"""A config written with TRL 1.16's option names loads through LightningCLI and means what it means in TRL.

``epsilon`` and ``use_bias_correction_kl`` are TRL's names of ``epsilon_low`` / ``kl_bias_correction``;
``steps_per_generation`` counts micro-batches (TRL's meaning), with ``gradient_accumulation_steps`` of them per
optimiser step; ``generation_batch_size`` is TRL's completions per generation batch. Old mg3d configs (optimiser
steps in ``steps_per_generation`` with ``micro_batch_size``) still load, with a deprecation warning.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import yaml

from mg3d.errors import ConfigError
from mg3d.grpo.loss import GRPOLossConfig
from mg3d.grpo.module import GRPOModule
from mg3d.grpo.step import BatchGeometry

#: Every TRL-named option mg3d supports, under TRL's name, away from its default where that is possible.
TRL_LOSS = {
    "loss_type": "vespo",
    "beta": 0.04,
    "epsilon": 0.3,
    "epsilon_high": 0.4,
    "delta": 1.5,
    "temperature": 0.9,
    "scale_rewards": "batch",
    "multi_objective_aggregation": "normalize_then_sum",
    "mask_truncated_completions": True,
    "top_entropy_quantile": 0.5,
    "num_iterations": 2,
    "importance_sampling_level": "sequence",
    "use_bias_correction_kl": False,
    "sapo_temperature_pos": 0.8,
    "sapo_temperature_neg": 1.2,
    "vespo_k_pos": 1.5,
    "vespo_lambda_pos": 2.5,
    "vespo_k_neg": 2.5,
    "vespo_lambda_neg": 1.5,
    "off_policy_mask_threshold": 0.5,
    "entropy_coef": 0.01,
    "use_adaptive_entropy": True,
    "entropy_coef_min": 0.001,
    "entropy_coef_max": 0.5,
    "entropy_coef_delta": 0.002,
    "entropy_target": 0.3,
    "sync_ref_model": True,
    "ref_model_mixup_alpha": 0.9,
    "ref_model_sync_steps": 64,
}
#: The same objective in mg3d's own names.
MG3D_LOSS = {
    **{k: v for k, v in TRL_LOSS.items() if k not in ("epsilon", "use_bias_correction_kl")},
    "epsilon_low": 0.3,
    "kl_bias_correction": False,
}


def _write_config(tmp_path, phantom_source, model: dict) -> str:
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False},
        "model": {
            "policy": {"checkpoint": None},
            "rollout": {
                "num_generations": 4,
                "temperature": model.get("loss", {}).get("temperature", 1.0),  # TRL: one temperature
                "max_new_tokens": 8,
            },
            **model,
        },
        "data": {
            "sources": [
                {"path": phantom_source.path, "synthetic": None, "pipeline": {"spatial_size": [28, 28, 8]}}
            ],
            "batch_size": 4,
        },
    }
    path = tmp_path / "trl_names.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(config))), encoding="utf-8")
    return str(path)


TRL_MODEL = {
    "loss": TRL_LOSS,
    "steps_per_generation": 4,
    "gradient_accumulation_steps": 2,
    "generation_batch_size": 16,
}


def test_trl_named_config_prints_and_means_the_same(tmp_path, phantom_source, capsys):
    from mg3d.cli import main

    path = _write_config(tmp_path, phantom_source, TRL_MODEL)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", path, "--print_config"])
    assert info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    loss = printed["model"]["loss"]
    assert {k: loss[k] for k in TRL_LOSS} == TRL_LOSS  # every option printed under TRL's name as written

    cli = main(["--config", path], run=False)
    module: GRPOModule = cli.model
    assert module.loss_config == GRPOLossConfig(**MG3D_LOSS)
    assert module.loss_config.epsilon_low == 0.3 and module.loss_config.kl_bias_correction is False
    # TRL's geometry: 4 micro-batches per generation batch, 2 per optimiser step → 2 optimiser steps
    assert module.geometry == BatchGeometry(optimizer_steps=2, grad_accum_steps=2)
    assert module.generation_batch_size == 16
    assert module.entropy_control is not None and module._reference is not None

    # the printed block builds the same objective again
    assert GRPOLossConfig(**loss) == module.loss_config


def test_old_steps_per_generation_with_micro_batch_size_loads_with_a_warning(
    tmp_path, phantom_source, caplog
):
    from mg3d.cli import main

    path = _write_config(tmp_path, phantom_source, {"steps_per_generation": 2, "micro_batch_size": 1})
    with caplog.at_level(logging.WARNING, logger="mg3d.grpo.step"):
        module = main(["--config", path], run=False).model
    assert module.geometry == BatchGeometry(optimizer_steps=2, grad_accum_steps=1, micro_batch_size=1)
    assert "deprecated" in caplog.text and "steps_per_generation" in caplog.text


def test_geometry_rules():
    assert BatchGeometry.from_options(None, 1, None) == BatchGeometry()  # TRL: S defaults to GA
    assert BatchGeometry.from_options(None, 3, None) == BatchGeometry(optimizer_steps=1, grad_accum_steps=3)
    assert BatchGeometry.from_options(4, 1, None).plan(range(4)) == [[[0]], [[1]], [[2]], [[3]]]
    assert BatchGeometry.from_options(4, 2, None).plan(range(4)) == [[[0], [2]], [[1], [3]]]
    assert BatchGeometry.from_options(None, 1, 2).plan(range(5)) == [[[0, 1], [2, 3], [4]]]
    with pytest.raises(ConfigError, match="multiple of gradient_accumulation_steps"):
        BatchGeometry.from_options(3, 2, None)
    with pytest.raises(ConfigError, match="set one"):
        BatchGeometry.from_options(None, 2, 1)
    with pytest.raises(ConfigError, match="generation_batch_size"):
        GRPOModule(generation_batch_size=10)  # not a multiple of num_generations=8


def test_generation_batch_size_is_checked_against_the_data(tmp_path, phantom_source):
    from mg3d.cli import main

    path = _write_config(
        tmp_path, phantom_source, {"generation_batch_size": 24, "evaluation": {"enabled": False}}
    )
    with pytest.raises(ConfigError, match=r"data\.batch_size to 6"):
        main(["fit", "--config", path, f"--trainer.default_root_dir={tmp_path}"])


def test_loss_config_fields_are_trl_names_or_documented_aliases():
    from trl import GRPOConfig

    trl_fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    ours = {f.name for f in dataclasses.fields(GRPOLossConfig)}
    assert ours - trl_fields == {"epsilon_low", "kl_bias_correction"}  # the two mg3d names with TRL aliases
