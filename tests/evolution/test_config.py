"""Run configs: TOML maps 1:1 onto dataclasses, mistakes get clear errors."""

from __future__ import annotations

import pytest

from namm.evolution.config import RunConfig, load_config


@pytest.mark.parametrize("name", ["tiny-test.toml", "smollm2-passkey.toml"])
def test_examples_load(examples, name):
    config = load_config(examples / name)
    assert config.tasks[0].name == "passkey"
    assert config.optimizer.seed == config.seed  # one seed drives prompts and CMA-ES
    assert config.calibration.task == "passkey"  # defaults to the first task of stage 1
    assert config.total_generations == sum(s.generations for s in config.stages)


def test_out_overrides_output_dir(examples, tmp_path):
    assert load_config(examples / "tiny-test.toml", tmp_path / "x").output_dir == str(tmp_path / "x")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"popsiz": 3}, r"Unknown key\(s\) \['popsiz'\] in the top level"),
        ({"optimizer": {"popsize": 1}}, "popsize must be an integer >= 2"),
        ({"fitness": {"mode": "bleu"}}, "fitness.mode must be one of"),
        ({"fitness": {"kept_cap": 1.5}}, "kept_cap must be a fraction"),
        ({"engine": {"delay": 0}}, "delay must be a positive"),
        ({"stages": [{"tasks": ["niah"], "generations": 2}]}, "not defined in"),
        ({"backend": "slurm"}, "backend must be one of"),
        ({"tasks": [{"name": "passkee"}]}, "Unknown task 'passkee'"),
        ({"stages": []}, "no stages"),
    ],
)
def test_clear_errors(tiny_dict, tmp_path, change, message):
    data = tiny_dict(tmp_path, **change)
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict(data)


def test_missing_file_names_an_example(tmp_path):
    with pytest.raises(FileNotFoundError, match="examples/smollm2-passkey.toml"):
        load_config(tmp_path / "nope.toml")
