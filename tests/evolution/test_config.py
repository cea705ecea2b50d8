"""Run configs: TOML maps 1:1 onto dataclasses, mistakes get clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from namm.evolution.config import RunConfig, load_config

EXAMPLES = sorted(p.name for p in (Path(__file__).resolve().parents[2] / "examples").glob("*.toml"))


def test_every_example_is_checked():
    assert {"tiny-test.toml", "smollm2-default.toml", "smollm2-threshold.toml"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_load(examples, name):
    config = load_config(examples / name)
    assert config.tasks[0].name == "passkey"
    assert config.optimizer.seed == config.seed  # one seed drives prompts and CMA-ES
    assert config.calibration.task == "passkey"  # defaults to the first task of stage 1
    assert config.total_generations == sum(s.generations for s in config.stages)
    if config.init is not None:  # a run that starts from another one names a run folder of the repo
        assert (examples.parent / config.init / "namm.safetensors").is_file(), config.init


def test_default_example_is_the_issue_9_run(examples):
    config = load_config(examples / "smollm2-default.toml")
    assert config.optimizer.popsize >= 16 and config.model == "smollm2" and config.chat is False
    names = {t.name for t in config.tasks}
    assert names == {"passkey", "niah_single", "niah_multikey", "kv_retrieval", "continuation"}
    assert all(1024 <= t.length <= 2048 for t in config.tasks)
    assert config.stages[0].tasks == ["passkey", "niah_single", "continuation"]  # retrieval first
    assert set(config.stages[-1].tasks) == names
    assert config.fitness.eval_split == "test"
    namm = config.namm_config()
    assert namm["keep"] == "budget" and namm["keep_ratio"] == 0.35 and namm["delay"] == config.engine.delay
    # two single-threaded Ray workers: 1.47x one process with two threads (benchmarks/member_throughput.py)
    assert (config.backend, config.threads, config.ray.actors) == ("ray", 1, 2)
    # member-prompts per generation: what the time budget (<= ~180 s) allows at 0.75 s each (measured
    # 0.55 s: stage 2, 16 x 10 member-prompts plus 10 new references in 87.6 s, training/smollm2-default)
    per_generation = [config.optimizer.popsize * sum(config.samples(t) for t in s.tasks) for s in config.stages]
    assert max(per_generation) * 0.75 <= 180


def test_new_keys_map_one_to_one(tiny_dict, tmp_path):
    config = RunConfig.from_dict(tiny_dict(
        tmp_path, chat=True, namm={"keep": "budget", "keep_ratio": 0.5},
        tasks=[{"name": "passkey", "length": 320, "samples": 3, "weight": 2.0},
               {"name": "continuation", "length": 320, "options": {"continuation_tokens": 16}}],
        fitness={"eval_split": "train"}))
    assert config.samples("passkey") == 3 and config.samples("continuation") == config.fitness.samples_per_task
    assert config.task("passkey").weight == 2.0 and config.fitness.eval_split == "train"
    namm = config.namm_config()
    assert (namm["chat"], namm["delay"], namm["chunk_size"], namm["evolved_on"]) == (True, 64, 32, "tiny-llama")
    assert namm["evict_at_prefill_end"] is True and namm["keep"] == "budget"


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
        ({"tasks": [{"name": "passkey", "weight": 0}]}, r"Task 'passkey': weight must be a number > 0"),
        ({"tasks": [{"name": "passkey", "samples": 0}]}, r"Task 'passkey': samples must be"),
        ({"tasks": [{"name": "passkey", "options": {"splt": "test"}}]}, r"unknown options \['splt'\]"),
        ({"fitness": {"eval_split": "dev"}}, "fitness.eval_split must be one of"),
        ({"chat": "yes"}, "chat must be true or false"),
        ({"namm": {"delay": 128}}, r"\[namm\] cannot set \['delay'\].*set \[engine\] delay"),
        ({"namm": {"chat": True}}, "set the top-level chat"),
        ({"namm": {"keep": "budget"}}, r"\[namm\]: keep = \"budget\" needs keep_ratio"),
        ({"namm": {"keep": "topk"}}, r"\[namm\]: keep must be one of"),
        ({"namm": {"keep_ratio": 0.3}}, "only applies to keep = \"budget\""),
        ({"namm": {"hidden": 3}}, r"\[namm\]: Unknown NAMM config keys \['hidden'\]"),
        ({"namm": {"keep": "budget", "keep_ratio": 0.3}, "fitness": {"kept_cap": 0.5}},
         r"fitness.kept_cap has no effect with \[namm\] keep = \"budget\""),
    ],
)
def test_clear_errors(tiny_dict, tmp_path, change, message):
    data = tiny_dict(tmp_path, **change)
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict(data)


def test_missing_file_names_an_example(tmp_path):
    with pytest.raises(FileNotFoundError, match="examples/smollm2-default.toml"):
        load_config(tmp_path / "nope.toml")


def test_namm_extras_from_toml(tiny_dict, write_toml, tmp_path):
    """[namm] features = { extras = [...] } reaches the NAMM the run evolves (28 inputs)."""
    from namm.memory.model import NAMM, NAMMConfig

    extras = ["attn_peak", "attn_entropy", "attn_var"]
    path = write_toml(tmp_path / "run.toml", tiny_dict(tmp_path / "run", namm={"features": {"extras": extras}}))
    assert "features = {extras = [" in path.read_text()
    config = load_config(path)
    namm = NAMM(NAMMConfig.from_dict(config.namm_config()))  # as the fitness workers build it
    assert namm.config.features.extras == tuple(extras) and namm.num_params == 163 * 28 + 97
    with pytest.raises(ValueError, match=r"\[namm\].*value_norm"):
        RunConfig.from_dict(tiny_dict(tmp_path / "run", namm={"features": {"extras": ["value_norm"]}}))
