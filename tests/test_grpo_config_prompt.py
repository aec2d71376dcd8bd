"""PromptConfig: the Chain-of-Box warm-start fields (instruction, warm_start_reasoning, trail_grid).

They are read by LightningCLI from YAML and written into a bundle's ``mg3d_inference.json``, so they must
validate with an error naming the field and survive a JSON round trip unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch

from mg3d.checkpointing import load_checkpoint_safely
from mg3d.errors import ConfigError
from mg3d.grounder import Grounder
from mg3d.grounding import GroundingPrompter, PromptConfig
from mg3d.model import build_tiny_policy


def test_defaults_keep_the_old_behaviour() -> None:
    cfg = PromptConfig()
    assert (
        cfg.instruction == "template" and cfg.warm_start_reasoning == "empty" and cfg.trail_grid == (8, 8, 4)
    )


@pytest.mark.parametrize(
    ("given", "stored"),
    [([16, 16], (16, 16)), ((8, 8, 4), (8, 8, 4)), ("16, 12", (16, 12)), ([8.0, 8, 2], (8, 8, 2))],
)
def test_trail_grid_is_normalised_to_a_tuple_of_ints(given, stored) -> None:
    assert PromptConfig(trail_grid=given).trail_grid == stored


@pytest.mark.parametrize(
    "bad", [[8], [8, 8, 4, 2], [0, 8], [8, -4, 2], [8.5, 8], [True, 8], [float("inf"), 8], "a,b", None, 8, []]
)
def test_bad_trail_grid_names_the_field(bad) -> None:
    with pytest.raises(ConfigError, match=r"prompt\.trail_grid"):
        PromptConfig(trail_grid=bad)


@pytest.mark.parametrize(
    ("field", "value"), [("instruction", "full"), ("warm_start_reasoning", "trail"), ("instruction", None)]
)
def test_bad_choices_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"prompt\.{field}"):
        PromptConfig(**{field: value})


def test_replace_validates_too() -> None:
    # the bundle loader and the inference overrides build configs with dataclasses.replace
    with pytest.raises(ConfigError, match=r"prompt\.trail_grid"):
        dataclasses.replace(PromptConfig(), trail_grid=[4])


def test_from_config_passes_the_fields_on() -> None:
    policy = build_tiny_policy(extra_tokens=("<answer>", "</answer>"), seed=0)
    cfg = PromptConfig(
        template="chain_of_box", instruction="terse", warm_start_reasoning="coarse_box", trail_grid=[16, 16]
    )
    prompter = GroundingPrompter.from_config(policy, cfg)
    assert prompter.config is cfg  # the prompter reads its settings from its config: no field copied
    assert GroundingPrompter(policy, cfg).config == cfg == GroundingPrompter(policy, **vars(cfg)).config


def test_inference_settings_round_trip_the_new_fields(tmp_path) -> None:
    policy = build_tiny_policy(extra_tokens=("<answer>", "</answer>"), seed=0)
    cfg = PromptConfig(
        template="chain_of_box", instruction="terse", warm_start_reasoning="coarse_box", trail_grid=[6, 10, 2]
    )
    grounder = Grounder(policy, prompt=cfg)
    settings = json.loads(json.dumps(grounder.inference_settings()))
    assert settings["prompt"]["trail_grid"] == [6, 10, 2] and settings["prompt"]["instruction"] == "terse"
    folder = grounder.save_pretrained(tmp_path / "bundle")
    loaded = Grounder.from_pretrained(folder)
    assert loaded.prompt_config == cfg
    assert loaded.prompter.config.instruction == "terse" and loaded.prompter.config.trail_grid == (6, 10, 2)


def _pickled_before_the_new_fields() -> PromptConfig:
    old = PromptConfig(template="chain_of_box", max_vision_tokens=64)
    for name in ("instruction", "warm_start_reasoning", "trail_grid"):
        del old.__dict__[name]  # what a config pickled by an earlier mg3d holds
    return old


def test_an_old_pickle_gets_the_new_fields_defaults() -> None:
    loaded = pickle.loads(pickle.dumps(_pickled_before_the_new_fields()))
    assert loaded == PromptConfig(template="chain_of_box", max_vision_tokens=64)


def test_an_old_checkpoint_loads_with_the_new_fields_defaults(tmp_path) -> None:
    # GRPOModule saves its PromptConfig object in the checkpoint's hyper-parameters; mg3d loads it with
    # weights_only (no __setstate__ allowed), so a missing field must fall back to a class attribute
    path = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": {"prompt": _pickled_before_the_new_fields()}, "state_dict": {}}, path)
    prompt = load_checkpoint_safely(path)["hyper_parameters"]["prompt"]
    assert prompt.trail_grid == (8, 8, 4) and prompt.instruction == "template"
    assert dataclasses.replace(prompt) == PromptConfig(template="chain_of_box", max_vision_tokens=64)
