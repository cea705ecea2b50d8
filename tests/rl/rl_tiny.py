"""Sizes of the tiny RL artefacts the tests build (a dataset and a Decision Transformer in seconds)."""

from __future__ import annotations

from namm.rl.train import TrainConfig

TINY_DATA = dict(task="halfcheetah", horizon=24, ars_iterations=3, ars_directions=4, expert_episodes=3,
                 medium_episodes=3, replay_episodes=3, noisy_episodes=2, reference_episodes=2)
TINY_MODEL = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
TINY_TRAIN = TrainConfig(steps=4, batch_size=2, warmup=2, log_every=1, **TINY_MODEL)
