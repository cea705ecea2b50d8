"""The control tasks: gymnasium MuJoCo locomotion, cut to a horizon whose whole episode fits the
Decision Transformer's context, and one function that runs an episode under any controller.

Each task records how this testbed runs it: the gymnasium id, the horizon (episode steps; an
episode of H steps is 3H - 1 tokens for the Decision Transformer), the survival bonus that Augmented
Random Search subtracts while training the expert (Mania et al. do so for Hopper and Walker2d, so
that standing still is not a local optimum) and the expert's training settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from namm.rl import require_rl

__all__ = ["ARSConfig", "ControlTask", "EVAL_SEED_BASE", "Episode", "TASKS", "get_task", "make_env", "run_episode"]

#: evaluation episodes start from seeds >= this; the expert's training and the data from seeds below
EVAL_SEED_BASE = 1_000_000_000


@dataclass(frozen=True)
class ARSConfig:
    """Augmented Random Search (V2-t: running state normalisation, top directions), Mania et al.,
    "Simple random search provides a competitive approach to reinforcement learning", arXiv 1803.07055.

    iterations: updates of the linear policy; each runs ``2 * directions`` episodes.
    directions: random directions N per update; top: the b best of them used in the update.
    step_size:  alpha; noise: nu, the scale of the perturbations.
    """

    iterations: int = 200
    directions: int = 32
    top: int = 4
    step_size: float = 0.02
    noise: float = 0.03

    def __post_init__(self) -> None:
        for name in ("iterations", "directions", "top"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ARS {name} must be a positive integer, got {value!r}.")
        if self.top > self.directions:
            raise ValueError(f"ARS top ({self.top}) cannot exceed directions ({self.directions}).")
        if self.step_size <= 0 or self.noise <= 0:
            raise ValueError("ARS step_size and noise must be positive.")


@dataclass(frozen=True)
class ControlTask:
    """One control task as this testbed runs it (``namm eval --tasks rl:<name>``)."""

    name: str
    env_id: str
    horizon: int = 350
    survival_bonus: float = 0.0
    ars: ARSConfig = field(default_factory=ARSConfig)


TASKS: dict[str, ControlTask] = {
    # never terminates: every episode is a full horizon, so the cache always grows to 3H - 1 tokens
    "halfcheetah": ControlTask("halfcheetah", "HalfCheetah-v5"),
    "hopper": ControlTask("hopper", "Hopper-v5", survival_bonus=1.0,
                          ars=ARSConfig(iterations=300, directions=8, top=4, step_size=0.01, noise=0.025)),
    "walker2d": ControlTask("walker2d", "Walker2d-v5", survival_bonus=1.0,
                            ars=ARSConfig(iterations=400, directions=40, top=30, step_size=0.03, noise=0.025)),
}


def get_task(name: str) -> ControlTask:
    """The task registered as ``name`` (``rl:`` prefix allowed); unknown names list the known ones."""
    key = name.lower().removeprefix("rl:")
    if key not in TASKS:
        raise ValueError(f"Unknown control task {name!r}; known: {', '.join('rl:' + t for t in TASKS)}.")
    return TASKS[key]


def make_env(task: ControlTask | str, horizon: int | None = None):
    """The gymnasium environment of ``task``, truncated after ``horizon`` steps (default: the task's)."""
    gym = require_rl()
    task = get_task(task) if isinstance(task, str) else task
    horizon = horizon or task.horizon
    if not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon must be a positive number of steps, got {horizon!r}.")
    return gym.make(task.env_id, max_episode_steps=horizon)


@dataclass
class Episode:
    """One episode: observations[t] is the state the action at t was chosen in.

    observations (T, state_dim), actions (T, act_dim) float32, rewards (T,) float64; terminated: the
    task ended it (a fall), not the horizon.
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: bool

    @property
    def ret(self) -> float:
        return float(self.rewards.sum(dtype=np.float64))

    def __len__(self) -> int:
        return int(self.rewards.shape[0])


def run_episode(env, act: Callable[[np.ndarray], np.ndarray], seed: int, action_noise: float = 0.0,
                rng: np.random.Generator | None = None,
                on_state: Callable[[np.ndarray], None] | None = None) -> Episode:
    """Run ``act(observation) -> action`` from ``env.reset(seed=seed)`` until the episode ends.

    ``action_noise``: Gaussian noise of that standard deviation (drawn from ``rng``) added to each
    action before it is clipped to the action space. ``on_state`` sees every observation acted on.
    """
    low, high = env.action_space.low, env.action_space.high
    obs, _ = env.reset(seed=int(seed))
    observations, actions, rewards = [], [], []
    while True:
        if on_state is not None:
            on_state(obs)
        action = np.asarray(act(obs), dtype=np.float64)
        if action_noise > 0:
            action = action + action_noise * rng.standard_normal(action.shape)
        action = np.clip(action, low, high)
        observations.append(obs)
        actions.append(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        rewards.append(reward)
        if terminated or truncated:
            break
    return Episode(np.asarray(observations, dtype=np.float32), np.asarray(actions, dtype=np.float32),
                   np.asarray(rewards, dtype=np.float64), bool(terminated))
