"""Offline datasets the project makes itself: an expert trained here, and trajectories of mixed
quality around it, as D4RL's "medium", "medium-replay" and "medium-expert" sets mix them.

``generate_dataset(DataConfig(task="halfcheetah"), out)`` trains the expert (:mod:`namm.rl.expert`),
measures the returns that normalise every score (the expert's, acting without noise, = 100; uniform
random actions = 0; both over the same horizon), picks the *medium* policy (the first ARS iteration
whose return reaches ``medium_level`` of the way from random to expert) and records episodes from
four sources:

* ``expert``: the expert, Gaussian action noise ``expert_noise``;
* ``medium``: the medium policy, the same noise;
* ``replay``: the policies ARS passed through up to the medium one, evenly spaced (a replay buffer);
* ``noisy``: the expert under heavy noise ``noisy_noise`` (returns between medium and expert).

Everything comes from one seed (numpy generator; MuJoCo is deterministic), so the same config gives
the same bytes. Episode start seeds are drawn below :data:`EVAL_SEED_BASE`; evaluation episodes use
seeds from it up, so no evaluated start state is in the data. Files in ``out``: ``dataset.npz``
(flat arrays, D4RL style), ``expert.npz`` (the linear expert), ``meta.json`` (config, reference
returns, per-source statistics, SHA-256 of the dataset, package versions). A folder whose
``meta.json`` holds the same config is reused, not regenerated.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from namm.rl.envs import EVAL_SEED_BASE, Episode, get_task, make_env, run_episode
from namm.rl.expert import LinearPolicy, train_ars

__all__ = ["DataConfig", "OfflineData", "EVAL_SEED_BASE", "SOURCES", "default_data_dir", "generate_dataset",
           "load_dataset"]

log = logging.getLogger(__name__)

SOURCES = ("expert", "medium", "replay", "noisy")
FORMAT = "namm-rl-dataset"
FORMAT_VERSION = 1


def default_data_dir(task: str) -> Path:
    """Where ``namm rl data`` writes a task's dataset by default (``runs/`` is not committed)."""
    return Path("runs") / "rl" / get_task(task).name / "data"


@dataclass(frozen=True)
class DataConfig:
    """One dataset: the task, the horizon, the expert's training and how many episodes of each source.

    horizon:          episode steps (default: the task's, ``namm.rl.envs.TASKS``).
    ars_iterations:   ARS updates for the expert (default: the task's ``ARSConfig``); ``ars_directions``
                      likewise.
    medium_level:     the medium policy reaches this share of the way from random to expert.
    reference_episodes: episodes that measure the expert and random returns.
    """

    task: str = "halfcheetah"
    seed: int = 0
    horizon: int | None = None
    ars_iterations: int | None = None
    ars_directions: int | None = None
    expert_episodes: int = 50
    medium_episodes: int = 50
    replay_episodes: int = 50
    noisy_episodes: int = 30
    expert_noise: float = 0.1
    noisy_noise: float = 0.5
    medium_level: float = 1 / 3
    reference_episodes: int = 20

    def __post_init__(self) -> None:
        task = get_task(self.task)
        object.__setattr__(self, "task", task.name)
        object.__setattr__(self, "horizon", self.horizon or task.horizon)
        object.__setattr__(self, "ars_iterations", self.ars_iterations or task.ars.iterations)
        object.__setattr__(self, "ars_directions", self.ars_directions or task.ars.directions)
        counts = [getattr(self, f"{s}_episodes") for s in SOURCES]
        if any(not isinstance(c, int) or c < 0 for c in counts) or sum(counts) == 0:
            raise ValueError("Episode counts must be non-negative integers, at least one of them positive.")
        if not 0 < self.medium_level < 1:
            raise ValueError(f"medium_level must be in (0, 1), got {self.medium_level!r}.")
        if not isinstance(self.reference_episodes, int) or self.reference_episodes < 1:
            raise ValueError("reference_episodes must be a positive integer.")

    def ars(self):
        """The expert's ARS settings: the task's, with this config's iterations and directions."""
        task = get_task(self.task)
        top = min(task.ars.top, self.ars_directions)
        return replace(task.ars, iterations=self.ars_iterations, directions=self.ars_directions, top=top)


@dataclass
class OfflineData:
    """A loaded dataset: flat arrays (D4RL layout) and its ``meta.json``.

    observations (N, S), actions (N, A), rewards (N,) float32; terminals / timeouts (N,) bool;
    episode_ends (E,) int64: one past each episode's last transition; episode_source (E,) index into
    :data:`SOURCES`.
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminals: np.ndarray
    timeouts: np.ndarray
    episode_ends: np.ndarray
    episode_source: np.ndarray
    meta: dict[str, Any]

    def episodes(self) -> list[slice]:
        starts = np.concatenate([[0], self.episode_ends[:-1]])
        return [slice(int(a), int(b)) for a, b in zip(starts, self.episode_ends)]


def _seeds(rng: np.random.Generator, n: int) -> list[int]:
    return [int(s) for s in rng.integers(0, EVAL_SEED_BASE, size=n)]


def _random_policy(env, rng: np.random.Generator):
    low, high = env.action_space.low, env.action_space.high
    return lambda state: rng.uniform(low, high)


def _mean_return(env, act, seeds: list[int], **kwargs) -> tuple[float, float]:
    returns = [run_episode(env, act, s, **kwargs).ret for s in seeds]
    return float(np.mean(returns)), float(np.std(returns))


def _pick_medium(env, snapshots: list[LinearPolicy], seed: int, random: float, expert: float, level: float) -> int:
    """The first ARS iteration whose policy (one episode from ``seed``) reaches ``level`` of the way
    from the random return to the expert's; the best one if none does."""
    returns = [run_episode(env, policy, seed).ret for policy in snapshots]
    target = random + level * (expert - random)
    reached = [i for i, r in enumerate(returns) if r >= target]
    return reached[0] if reached else int(np.argmax(returns))


def _record(env, sources: list[tuple[str, LinearPolicy, float]], rng: np.random.Generator) -> list[tuple[str, Episode]]:
    seeds = _seeds(rng, len(sources))
    return [(name, run_episode(env, policy, s, action_noise=noise, rng=rng))
            for (name, policy, noise), s in zip(sources, seeds)]


def generate_dataset(config: DataConfig, out: str | Path, force: bool = False, progress: bool = True) -> OfflineData:
    """Make (or reuse) the dataset of ``config`` in ``out``; see the module docstring."""
    out = Path(out)
    meta_path = out / "meta.json"
    if meta_path.is_file() and not force:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("config") == asdict(config):
            log.info("reusing the dataset in %s (same config; --force regenerates it)", out)
            return load_dataset(out)
        raise ValueError(f"{out} holds a dataset made with another config; pass --force to replace it, or choose "
                         "another --out.")
    task = get_task(config.task)
    env = make_env(task, config.horizon)
    rng = np.random.default_rng(config.seed)
    bar = _bar(config.ars_iterations, progress)
    ars = train_ars(task, env, config.horizon, int(rng.integers(0, EVAL_SEED_BASE)), config.ars(),
                    progress=lambda i, r: (bar.set_postfix_str(f"return {r:.0f}"), bar.update(1)))
    bar.close()
    ref_seeds = _seeds(rng, config.reference_episodes)
    expert, expert_std = _mean_return(env, ars.expert, ref_seeds)
    random, random_std = _mean_return(env, _random_policy(env, rng), ref_seeds)
    if expert <= random:
        log.warning("the expert (mean return %.1f) does not beat random actions (%.1f): give ARS more iterations "
                    "(--ars-iterations); normalised scores are meaningless until it does", expert, random)
    medium_at = _pick_medium(env, ars.snapshots, ref_seeds[0], random, expert, config.medium_level)
    medium = ars.snapshots[medium_at]
    replay_at = np.linspace(0, medium_at, config.replay_episodes).round().astype(int) if config.replay_episodes else []
    plan = ([("expert", ars.expert, config.expert_noise)] * config.expert_episodes
            + [("medium", medium, config.expert_noise)] * config.medium_episodes
            + [("replay", ars.snapshots[i], 0.0) for i in replay_at]
            + [("noisy", ars.expert, config.noisy_noise)] * config.noisy_episodes)
    episodes = _record(env, plan, rng)
    data = _flatten(episodes)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "dataset.npz", **_arrays(data))
    np.savez(out / "expert.npz", **ars.expert.to_arrays(), **medium.to_arrays("medium_"),
             ars_train_returns=np.asarray(ars.train_returns))
    meta = _meta(config, task, env, episodes, expert, expert_std, random, random_std, medium_at, data)
    meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    data.meta = meta
    return data


def _flatten(episodes: list[tuple[str, Episode]]) -> OfflineData:
    def cat(name: str, dtype) -> np.ndarray:
        return np.concatenate([getattr(e, name) for _, e in episodes]).astype(dtype)

    lengths = np.array([len(e) for _, e in episodes], dtype=np.int64)
    ends = np.cumsum(lengths)
    terminals = np.zeros(int(ends[-1]), dtype=bool)
    timeouts = np.zeros_like(terminals)
    for (_, e), end in zip(episodes, ends):
        (terminals if e.terminated else timeouts)[end - 1] = True
    return OfflineData(cat("observations", np.float32), cat("actions", np.float32), cat("rewards", np.float32),
                       terminals, timeouts, ends, np.array([SOURCES.index(s) for s, _ in episodes], dtype=np.int8), {})


def _arrays(data: OfflineData) -> dict[str, np.ndarray]:
    return {name: getattr(data, name) for name in ("observations", "actions", "rewards", "terminals", "timeouts",
                                                     "episode_ends", "episode_source")}


def _meta(config: DataConfig, task, env, episodes, expert, expert_std, random, random_std, medium_at,
          data: OfflineData) -> dict[str, Any]:
    import gymnasium
    import mujoco

    def normalised(ret: float) -> float | None:
        return 100 * (ret - random) / (expert - random) if expert != random else None

    per_source = {}
    for source in SOURCES:
        returns = [e.ret for s, e in episodes if s == source]
        if returns:
            per_source[source] = {"episodes": len(returns), "mean_return": float(np.mean(returns)),
                                  "mean_normalised": normalised(float(np.mean(returns))),
                                  "min_return": float(np.min(returns)), "max_return": float(np.max(returns))}
    digest = hashlib.sha256()
    for name, array in _arrays(data).items():  # the arrays, not the .npz (zip entries carry a time)
        digest.update(name.encode() + np.ascontiguousarray(array).tobytes())
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "config": asdict(config), "task": task.name,
        "env_id": task.env_id, "horizon": config.horizon,
        "state_dim": int(env.observation_space.shape[0]), "act_dim": int(env.action_space.shape[0]),
        "action_high": [float(x) for x in env.action_space.high],
        "ref_returns": {"expert": expert, "random": random, "expert_std": expert_std, "random_std": random_std,
                        "episodes": config.reference_episodes},
        "medium_iteration": int(medium_at), "sources": per_source,
        "episodes": len(episodes), "transitions": int(sum(len(e) for _, e in episodes)),
        "dataset_sha256": digest.hexdigest(),
        "versions": {"gymnasium": gymnasium.__version__, "mujoco": mujoco.__version__, "numpy": np.__version__},
    }


def load_dataset(path: str | Path) -> OfflineData:
    """A dataset folder written by :func:`generate_dataset`."""
    path = Path(path)
    if not (path / "meta.json").is_file() or not (path / "dataset.npz").is_file():
        raise FileNotFoundError(f"{path} holds no dataset (meta.json + dataset.npz); make one with "
                                "`namm rl data --task TASK --out DIR`.")
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / 'meta.json'} is not a namm RL dataset (format {FORMAT!r}).")
    with np.load(path / "dataset.npz") as arrays:
        return OfflineData(**{k: arrays[k] for k in arrays.files}, meta=meta)


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="it", desc="expert (ARS)", dynamic_ncols=True)
