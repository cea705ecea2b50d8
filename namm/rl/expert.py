"""The expert: a linear policy on normalised states, trained with Augmented Random Search.

ARS (Mania et al., arXiv 1803.07055, version V2-t) perturbs the policy matrix M along N random
directions, runs each perturbation +nu*delta and -nu*delta for one episode (both from the same
start state), and steps M along the b directions whose better side earned most, scaled by the
spread of their returns. States are normalised by a running mean and standard deviation of every
state visited, frozen during an update. It needs no gradients and runs in minutes on 2 cores;
every iteration's policy is kept, so the data generator can replay the path from random to expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from namm.rl.envs import EVAL_SEED_BASE, ARSConfig, ControlTask, run_episode

__all__ = ["LinearPolicy", "RunningStats", "ARSResult", "train_ars"]


@dataclass
class LinearPolicy:
    """action = M @ ((state - mean) / std), clipped to the action space by the episode runner."""

    matrix: np.ndarray  # (act_dim, state_dim)
    mean: np.ndarray  # (state_dim,)
    std: np.ndarray  # (state_dim,)

    def __call__(self, state: np.ndarray) -> np.ndarray:
        return self.matrix @ ((state - self.mean) / self.std)

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {f"{prefix}matrix": self.matrix, f"{prefix}mean": self.mean, f"{prefix}std": self.std}

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "") -> LinearPolicy:
        return cls(*(np.asarray(arrays[f"{prefix}{k}"], dtype=np.float64) for k in ("matrix", "mean", "std")))


class RunningStats:
    """Mean and standard deviation of every state seen (Welford); std 1 where a state never varies."""

    def __init__(self, dim: int) -> None:
        self.count, self.mean, self.m2 = 0, np.zeros(dim), np.zeros(dim)

    def push(self, state: np.ndarray) -> None:
        self.count += 1
        delta = state - self.mean
        self.mean = self.mean + delta / self.count
        self.m2 = self.m2 + delta * (state - self.mean)

    def std(self) -> np.ndarray:
        if self.count < 2:
            return np.ones_like(self.mean)
        std = np.sqrt(self.m2 / (self.count - 1))
        return np.where(std < 1e-8, 1.0, std)


@dataclass
class ARSResult:
    """The trained expert and the path to it: one policy per iteration, before its update, with
    the mean training return of its perturbations (survival bonus removed, see ``ControlTask``)."""

    expert: LinearPolicy
    snapshots: list[LinearPolicy] = field(default_factory=list)
    train_returns: list[float] = field(default_factory=list)


def train_ars(task: ControlTask, env, horizon: int, seed: int, config: ARSConfig | None = None,
              progress=None) -> ARSResult:
    """Train a linear expert for ``task`` on ``env`` (episodes of at most ``horizon`` steps).

    Deterministic for a seed: the directions and every episode's start seed come from one
    ``numpy`` generator. ``progress(iteration, mean_return)`` is called after each update.
    """
    config = config or task.ars
    rng = np.random.default_rng(seed)
    state_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    matrix = np.zeros((act_dim, state_dim))
    stats = RunningStats(state_dim)
    result = ARSResult(expert=LinearPolicy(matrix, np.zeros(state_dim), np.ones(state_dim)))

    def shaped_return(policy: LinearPolicy, episode_seed: int) -> float:
        episode = run_episode(env, policy, episode_seed, on_state=stats.push)
        return episode.ret - task.survival_bonus * len(episode)

    for iteration in range(config.iterations):
        mean, std = stats.mean.copy(), stats.std()  # frozen for this update
        result.snapshots.append(LinearPolicy(matrix.copy(), mean, std))
        deltas = rng.standard_normal((config.directions, act_dim, state_dim))
        seeds = rng.integers(0, EVAL_SEED_BASE, size=config.directions)  # never an evaluation seed
        plus = np.array([shaped_return(LinearPolicy(matrix + config.noise * d, mean, std), s)
                         for d, s in zip(deltas, seeds)])
        minus = np.array([shaped_return(LinearPolicy(matrix - config.noise * d, mean, std), s)
                          for d, s in zip(deltas, seeds)])
        best = np.argsort(-np.maximum(plus, minus), kind="stable")[: config.top]
        spread = np.concatenate([plus[best], minus[best]]).std()
        step = np.tensordot(plus[best] - minus[best], deltas[best], axes=1)
        matrix = matrix + config.step_size / (config.top * max(spread, 1e-8)) * step
        result.train_returns.append(float(np.concatenate([plus, minus]).mean()))
        if progress is not None:
            progress(iteration, result.train_returns[-1])
    result.expert = LinearPolicy(matrix, stats.mean.copy(), stats.std())
    return result
