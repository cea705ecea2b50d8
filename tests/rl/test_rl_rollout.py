"""Rollouts through the engine: keep-all equals a plain forward rollout; eviction during a rollout
keeps the engine's invariants (masking, absolute positions, a cache that really shrinks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rl_tiny import TINY_MODEL
from test_engine import DropRandom, masked_reference_logits, reference_masks

from namm.engine import Engine, EngineConfig
from namm.policies import make_policy
from namm.rl.envs import make_env
from namm.rl.model import DecisionTransformer, DTConfig, load_dt
from namm.rl.rollout import reference_rollout, rollout
from namm.sequence import MemorySequence


def _random_dt(task: str, state_dim: int, act_dim: int, horizon: int, dtype=torch.float64) -> DecisionTransformer:
    torch.manual_seed(0)
    config = DTConfig(task=task, state_dim=state_dim, act_dim=act_dim, horizon=horizon, target_return=30.0,
                      **TINY_MODEL)
    return DecisionTransformer(config).to(dtype).eval()


def test_keep_all_rollout_equals_a_plain_forward_rollout(tiny_dt_dir):
    dt = load_dt(tiny_dt_dir)  # the trained tiny model, float32
    env = make_env("halfcheetah", dt.config.horizon)
    engine = Engine(dt.backbone, chunk_size=16, delay=24)
    for seed in (1_000_000_000, 1_000_000_001):
        got = rollout(engine, dt, env, seed)
        ref = reference_rollout(dt, env, seed)
        assert got.steps == ref.steps == 24 and got.tokens == ref.tokens == 3 * 24 - 1
        assert np.abs(got.actions - ref.actions).max() < 1e-5
        assert got.ret == pytest.approx(ref.ret, abs=1e-4)
        assert got.normalised == pytest.approx(dt.config.normalise(got.ret))
        assert got.report.kept_fraction == got.report.mean_fraction == 1.0


def test_keep_all_rollout_equals_plain_forward_through_terminations():
    """Hopper falls under a random model: both rollouts stop at the same step, fp64 to 1e-10."""
    dt = _random_dt("hopper", 11, 3, horizon=80)
    env = make_env("hopper", 80)
    got = rollout(Engine(dt.backbone, chunk_size=8, delay=16), dt, env, seed=5)
    ref = reference_rollout(dt, env, seed=5)
    assert got.terminated and ref.terminated and got.steps == ref.steps < 80
    assert np.abs(got.actions - ref.actions).max() < 1e-10 and got.ret == ref.ret


class _EmbeddingInputs:
    """Lets test_engine's masked reference (which calls ``model(tokens[None])``) run on embeddings."""

    def __init__(self, backbone) -> None:
        self.backbone, self.config = backbone, backbone.config

    def set_attn_implementation(self, name: str) -> None:
        self.backbone.set_attn_implementation(name)

    def __call__(self, embeds: torch.Tensor, use_cache: bool = False):
        return self.backbone(inputs_embeds=embeds, use_cache=use_cache)


@pytest.mark.parametrize("needs_attention", [False, True])
def test_eviction_during_a_rollout_is_masking(monkeypatch, needs_attention):
    """Each step's action logits equal a cache-free forward over every token fed so far whose
    attention hides, per layer and KV head, exactly what the policy evicted (fp64)."""
    dt = _random_dt("halfcheetah", 17, 6, horizon=40)
    env = make_env("halfcheetah", 40)
    fed, returned = [], []
    feed = MemorySequence.feed

    def recording(self, ids=None, *args, embeds=None, **kwargs):
        out = feed(self, ids, *args, embeds=embeds, **kwargs)
        fed.append(embeds.clone())
        returned.append(out.clone())
        return out

    monkeypatch.setattr(MemorySequence, "feed", recording)
    engine = Engine(dt.backbone, config=EngineConfig(chunk_size=16, delay=24, record_evictions=True))
    result = rollout(engine, dt, env, seed=3, policy=DropRandom(needs_attention), keep_sequence=True)
    seq = result.sequence
    embeds = torch.cat(fed)
    n = embeds.shape[0]
    assert n == seq.seen == result.tokens == 3 * 40 - 1
    assert [step for step, _ in seq.eviction_log] == list(range(24, n, 24))  # the delay grid, mid-step too
    spec = seq.spec
    masks = reference_masks(seq, spec, n, None, set())
    ref = masked_reference_logits(_EmbeddingInputs(dt.backbone), embeds, masks)
    last = torch.tensor([len(e) for e in fed]).cumsum(0) - 1  # each step's state token
    assert (torch.stack(returned) - ref[last]).abs().max().item() < 1e-6  # the engine returns float32 logits
    for layer in spec.managed_layers:  # absolute positions, a cache that really shrank
        positions = seq.positions[layer]
        assert positions[:, -1].tolist() == [n - 1] * spec.kv_heads
        assert bool((positions[:, 1:] > positions[:, :-1]).all())
        assert seq.cache.layers[layer].keys.shape[2] == positions.shape[1] < n / 2
    full = rollout(Engine(dt.backbone, chunk_size=16, delay=24), dt, env, seed=3)
    assert np.abs(full.actions - result.actions).max() > 1e-4  # the evictions changed what it did


def test_a_budget_policy_holds_its_budget_through_an_episode():
    dt = _random_dt("halfcheetah", 17, 6, horizon=60, dtype=torch.float32)
    env = make_env("halfcheetah", 60)
    engine = Engine(dt.backbone, config=EngineConfig(chunk_size=16, delay=30, record_evictions=True))
    result = rollout(engine, dt, env, seed=4, policy=make_policy("h2o", budget=20), keep_sequence=True)
    steps = [step for step, _ in result.sequence.eviction_log]
    assert steps == [30, 60, 90, 120, 150]
    for _, kept in result.sequence.eviction_log:
        assert all(k.shape == (2, 20) for k in kept.values())  # (kv_heads, budget) in every layer
    report = result.report
    assert report.final_len == [20 + 179 - 150] * 2 and report.kept_fraction < 0.3
    assert report.peak_len == [50] * 2  # the budget plus one delay of new tokens, never the episode


def test_the_engine_must_run_the_decision_transformer():
    dt = _random_dt("halfcheetah", 17, 6, horizon=10)
    other = _random_dt("halfcheetah", 17, 6, horizon=10)
    with pytest.raises(ValueError, match="backbone"):
        rollout(Engine(other.backbone), dt, make_env("halfcheetah", 10), seed=0)
