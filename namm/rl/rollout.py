"""Episodes of a Decision Transformer in its environment, every step through the engine.

At step t the engine is fed the tokens the step adds, ``a_{t-1}, R_t, s_t`` (just ``R_0, s_0`` at
t = 0), as ``inputs_embeds`` (:meth:`namm.rl.model.DecisionTransformer.step_embeds`) through the same
:class:`~namm.sequence.MemorySequence` as text: chunks, absolute positions (token i gets position
i, however much was evicted), the policy's ``observe`` after every forward call and eviction every
``delay`` tokens. The backbone's output at ``s_t`` is the action; the return to go then drops by
the reward received (R_{t+1} = R_t - r_t). There is no prompt: an episode is one long decode, so
the memory report's prefill phase covers it all.

:func:`reference_rollout` is the same episode without the engine and without a cache: a plain
transformers forward over the whole history at every step. With a policy that keeps everything
the two choose the same actions (``tests/rl/test_rl_rollout.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from namm.engine import Engine
from namm.policies.base import MemoryPolicy
from namm.report import MemoryReport
from namm.rl import torch_threads
from namm.rl.model import DecisionTransformer
from namm.sequence import MemorySequence

__all__ = ["RolloutResult", "rollout", "reference_rollout"]


@dataclass
class RolloutResult:
    """One evaluated episode: its return, the same normalised (expert 100, random 0), its length,
    whether the task ended it (a fall) before the horizon, the actions taken (T, A), the memory
    report (None without the engine), the wall time, the tokens fed, and the engine's sequence
    (cache, positions, eviction log) when asked for."""

    ret: float
    normalised: float
    steps: int
    terminated: bool
    actions: np.ndarray
    report: MemoryReport | None
    seconds: float
    tokens: int
    sequence: MemorySequence | None = None


def _play(dt: DecisionTransformer, env, seed: int, choose: Callable[[float, np.ndarray, int, torch.Tensor | None],
                                                                    torch.Tensor],
          target_return: float | None) -> tuple[float, list[np.ndarray], bool]:
    """Run one episode from ``env.reset(seed=seed)``; ``choose(rtg, state, t, prev_action)`` picks
    each action. Returns the return, the actions and whether the episode terminated."""
    rtg = dt.config.target_return if target_return is None else float(target_return)
    obs, _ = env.reset(seed=int(seed))
    total, actions, prev = 0.0, [], None
    for t in range(dt.config.horizon):
        action = choose(rtg, obs, t, prev)
        actions.append(action.cpu().double().numpy())
        obs, reward, terminated, truncated, _ = env.step(actions[-1])
        total += float(reward)
        rtg -= float(reward)
        if terminated or truncated:
            return total, actions, bool(terminated)
        prev = action
    return total, actions, False


def rollout(engine: Engine, dt: DecisionTransformer, env, seed: int, policy: MemoryPolicy | None = None,
            target_return: float | None = None, keep_sequence: bool = False, threads: int | None = 1
            ) -> RolloutResult:
    """One episode with ``dt.backbone`` run by ``engine`` under ``policy`` (default: the engine's);
    ``keep_sequence`` returns the engine's :class:`~namm.sequence.MemorySequence` with it.

    ``threads``: torch CPU threads during the episode (restored after; None leaves them). A step
    is 2-3 tokens, where a second thread only waits on the first: on a shared 2-core machine two
    threads made a tiny model's episode ~100x slower than one.
    """
    if engine.model is not dt.backbone:
        raise ValueError("Build the engine on the Decision Transformer's backbone: Engine(dt.backbone, ...).")
    started = time.perf_counter()
    dt.eval()
    with torch_threads(threads), engine.running(), torch.inference_mode():
        seq = engine.start(policy)

        def choose(rtg, state, t, prev):
            logits = seq.feed(embeds=dt.step_embeds(rtg, state, t, prev))
            return dt.action(logits)

        total, actions, terminated = _play(dt, env, seed, choose, target_return)
    return RolloutResult(total, _normalised(dt, total), len(actions), terminated, np.asarray(actions), seq.report(),
                         time.perf_counter() - started, seq.seen, seq if keep_sequence else None)


def reference_rollout(dt: DecisionTransformer, env, seed: int, target_return: float | None = None) -> RolloutResult:
    """The same episode with no engine and no cache: at every step a plain forward over the whole
    history (R_0, s_0, a_0, ..., R_t, s_t) under the model's own attention."""
    started = time.perf_counter()
    dt.eval()
    history: dict[str, list] = {"rtg": [], "states": [], "actions": []}

    def choose(rtg, state, t, prev):
        history["rtg"].append(rtg)
        history["states"].append(np.asarray(state, dtype=np.float64))
        actions = history["actions"] + [np.zeros(dt.config.act_dim)]  # a_t is not read: dropped below
        n = len(history["rtg"])
        device = dt.state_mean.device
        embeds = dt.embed(torch.tensor(history["rtg"], dtype=torch.float64, device=device)[None],
                          torch.tensor(np.stack(history["states"]), device=device)[None],
                          torch.tensor(np.stack(actions), device=device)[None],
                          torch.arange(n, device=device)[None])[:, :-1]
        logits = dt.backbone(inputs_embeds=embeds, use_cache=False).logits[0, -1]
        action = dt.action(logits)
        history["actions"].append(action.cpu().double().numpy())
        return action

    with torch.inference_mode():
        total, actions, terminated = _play(dt, env, seed, choose, target_return)
    return RolloutResult(total, _normalised(dt, total), len(actions), terminated, np.asarray(actions), None,
                         time.perf_counter() - started, 3 * len(actions) - 1)


def _normalised(dt: DecisionTransformer, ret: float) -> float:
    """The normalised return, NaN for a model that records no reference returns (a test model)."""
    return dt.config.normalise(ret) if dt.config.ref_returns else float("nan")
