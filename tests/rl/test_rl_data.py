"""The offline data: deterministic for a seed, cached, laid out as D4RL; the expert's optimiser learns."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rl_tiny import TINY_DATA

import namm.rl.data as rl_data
from namm.rl import require_rl
from namm.rl.data import EVAL_SEED_BASE, SOURCES, DataConfig, generate_dataset, load_dataset
from namm.rl.envs import ARSConfig, ControlTask, get_task, run_episode
from namm.rl.expert import RunningStats, train_ars


def _files(folder):
    with np.load(folder / "dataset.npz") as d, np.load(folder / "expert.npz") as e:
        arrays = {f"dataset/{k}": d[k] for k in d.files} | {f"expert/{k}": e[k] for k in e.files}
    return arrays, json.loads((folder / "meta.json").read_text())


def test_the_generator_is_deterministic(tiny_data, tmp_path):
    again = tmp_path / "again"
    generate_dataset(DataConfig(**TINY_DATA), again, progress=False)
    (first, meta), (second, meta_again) = _files(tiny_data), _files(again)
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert meta == meta_again  # reference returns, per-source statistics, the dataset's SHA-256
    other = tmp_path / "other-seed"
    generate_dataset(DataConfig(**{**TINY_DATA, "seed": 1}), other, progress=False)
    assert not np.array_equal(_files(other)[0]["dataset/observations"], first["dataset/observations"])


def test_the_dataset_layout_and_what_it_records(tiny_data):
    data = load_dataset(tiny_data)
    meta = data.meta
    counts = {s: TINY_DATA[f"{s}_episodes"] for s in SOURCES}
    assert meta["episodes"] == len(data.episode_ends) == sum(counts.values())
    assert [SOURCES[i] for i in data.episode_source] == [s for s in SOURCES for _ in range(counts[s])]
    assert data.episode_ends[-1] == data.observations.shape[0] == data.actions.shape[0] == data.rewards.shape[0]
    assert data.observations.shape[1] == meta["state_dim"] == 17 and data.actions.shape[1] == meta["act_dim"] == 6
    ends = data.terminals | data.timeouts  # exactly one end marker per episode, at its last transition
    assert np.flatnonzero(ends).tolist() == (data.episode_ends - 1).tolist()
    assert all(e.stop - e.start == 24 for e in data.episodes())  # HalfCheetah never terminates: full horizon
    assert np.abs(data.actions).max() <= 1.0  # clipped to the action space
    ref = meta["ref_returns"]
    for source, stats in meta["sources"].items():
        returns = [data.rewards[e].sum(dtype=np.float64) for e, s in zip(data.episodes(), data.episode_source)
                   if SOURCES[s] == source]
        assert stats["mean_return"] == pytest.approx(np.mean(returns), rel=1e-5, abs=1e-4)
        assert stats["mean_normalised"] == pytest.approx(
            100 * (stats["mean_return"] - ref["random"]) / (ref["expert"] - ref["random"]))
    assert 0 <= meta["medium_iteration"] < TINY_DATA["ars_iterations"]


def test_a_folder_with_the_same_config_is_reused_not_regenerated(tiny_data, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("regenerated")

    monkeypatch.setattr(rl_data, "train_ars", refuse)
    assert load_dataset(tiny_data).meta == generate_dataset(DataConfig(**TINY_DATA), tiny_data, progress=False).meta
    with pytest.raises(ValueError, match="--force"):
        generate_dataset(DataConfig(**{**TINY_DATA, "expert_episodes": 4}), tiny_data, progress=False)


def test_no_episode_of_the_data_starts_from_an_evaluation_seed(tmp_path, monkeypatch):
    import namm.rl.expert as expert
    from namm.rl.evaluate import eval_seeds

    seeds = []

    def recording(env, act, seed, **kwargs):
        seeds.append(seed)
        return run_episode(env, act, seed, **kwargs)

    monkeypatch.setattr(rl_data, "run_episode", recording)
    monkeypatch.setattr(expert, "run_episode", recording)
    generate_dataset(DataConfig(**TINY_DATA), tmp_path, progress=False)
    assert len(seeds) > 40 and all(0 <= s < EVAL_SEED_BASE for s in seeds)
    assert min(e.seed for seed in range(3) for e in eval_seeds(seed, 100)) == EVAL_SEED_BASE


class _Regression:
    """A gymnasium-like task whose best linear policy is known: states ~ N(0, 1) in 3 dimensions,
    reward -(action - W s)^2 per step, W = [[0.6, -0.4, 0.2]]."""

    W = np.array([[0.6, -0.4, 0.2]])

    def __init__(self) -> None:
        from gymnasium.spaces import Box

        self.observation_space = Box(-np.inf, np.inf, (3,))
        self.action_space = Box(-1.0, 1.0, (1,))

    def reset(self, seed=None):
        self.rng, self.t = np.random.default_rng(seed), 0
        self.state = self.rng.standard_normal(3) * 0.5
        return self.state, {}

    def step(self, action):
        reward = -float(((action - self.W @ self.state) ** 2).sum())
        self.state, self.t = self.rng.standard_normal(3) * 0.5, self.t + 1
        return self.state, reward, False, self.t >= 10, {}


def test_ars_finds_the_best_linear_policy():
    env = _Regression()
    config = ARSConfig(iterations=40, directions=8, top=4, step_size=0.05, noise=0.05)
    result = train_ars(ControlTask("regression", "none", ars=config), env, horizon=10, seed=0)
    learned = result.expert.matrix / result.expert.std  # the policy acts on normalised states
    assert np.abs(learned - _Regression.W).max() < 0.1
    start = np.mean([run_episode(env, result.snapshots[0], s).ret for s in range(20)])
    end = np.mean([run_episode(env, result.expert, s).ret for s in range(20)])
    assert end > 0.2 * start  # most of the error gone (returns are negative)
    assert len(result.snapshots) == len(result.train_returns) == 40


def test_running_stats_match_numpy():
    states = np.random.default_rng(0).standard_normal((50, 4)) * [1, 2, 0, 3]
    stats = RunningStats(4)
    for s in states:
        stats.push(s)
    assert np.allclose(stats.mean, states.mean(0))
    assert np.allclose(stats.std(), np.where(states.std(0, ddof=1) < 1e-8, 1.0, states.std(0, ddof=1)))


def test_unknown_tasks_and_missing_packages_say_what_to_do(monkeypatch):
    with pytest.raises(ValueError, match="rl:halfcheetah"):
        get_task("rl:pong")
    assert get_task("rl:hopper").env_id == "Hopper-v5"
    monkeypatch.setitem(__import__("sys").modules, "gymnasium", None)
    with pytest.raises(ImportError, match=r"pip install 'namm\[rl\]'"):
        require_rl()
