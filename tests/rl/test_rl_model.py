"""The Decision Transformer: token layout, causality, files; training: windows, determinism, learning."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from rl_tiny import TINY_MODEL, TINY_TRAIN
from safetensors.torch import load_file

from namm.rl.data import load_dataset
from namm.rl.model import DecisionTransformer, DTConfig, load_dt
from namm.rl.train import TrainConfig, WindowSampler, returns_to_go, train


def _dt(seed: int = 0, **overrides) -> DecisionTransformer:
    torch.manual_seed(seed)
    config = DTConfig(task="halfcheetah", state_dim=5, act_dim=2, horizon=30, **{**TINY_MODEL, **overrides})
    return DecisionTransformer(config).eval()


def _batch(t: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, t, generator=g) * 100, torch.randn(1, t, 5, generator=g),
            torch.rand(1, t, 2, generator=g) * 2 - 1, torch.arange(t)[None])


def test_an_action_is_read_from_its_state_token_before_it_is_taken():
    dt = _dt()
    rtg, states, actions, times = _batch()
    with torch.no_grad():
        base = dt(rtg, states, actions, times)
        changed = actions.clone()
        changed[0, 5] = -changed[0, 5]
        after = dt(rtg, states, changed, times)
    assert base.shape == (1, 12, 2) and base.abs().max() <= 1
    assert torch.equal(base[0, :6], after[0, :6])  # a_5 is not seen by the prediction of a_5
    assert (base[0, 6:] - after[0, 6:]).abs().max() > 1e-6  # later steps read it


def test_step_embeds_are_the_tokens_of_the_trajectory():
    """The rollout's per-step tokens, (a_{t-1},) R_t, s_t, are the interleaved trajectory's."""
    dt = _dt().double()
    rtg, states, actions, times = _batch(6)
    with torch.no_grad():
        whole = dt.embed(rtg.double(), states.double(), actions.double(), times)[0]  # (18, hidden)
        steps = [dt.step_embeds(float(rtg[0, t]), states[0, t].numpy(), t, None if t == 0 else actions[0, t - 1])
                 for t in range(6)]
    assert torch.allclose(torch.cat(steps), whole[:-1], atol=1e-12)  # the last action is never fed


def test_save_and_load_round_trip(tmp_path):
    dt = _dt(ref_returns={"expert": 10.0, "random": -2.0}, target_return=9.0)
    dt.save_pretrained(tmp_path)
    loaded = load_dt(tmp_path)
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(dt(*batch), loaded(*batch))
    assert loaded.config == dt.config and loaded.config.normalise(4.0) == pytest.approx(50.0)
    assert json.loads((tmp_path / "config.json").read_text())["format"] == "namm-decision-transformer"
    with pytest.raises(FileNotFoundError, match="namm rl train"):
        load_dt(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"format": "namm"}))
    with pytest.raises(ValueError, match="not a Decision Transformer"):
        load_dt(tmp_path)
    with pytest.raises(ValueError, match="ref_returns"):
        _dt().config.normalise(1.0)


def test_windows_are_right_padded_with_absolute_timesteps_and_returns_to_go(tiny_data):
    data = load_dataset(tiny_data)
    sampler = WindowSampler(data, TrainConfig(batch_size=16, full_episode_prob=0.5, seed=3))
    batch = sampler.batch()
    starts = batch["timesteps"][:, 0]
    assert (starts == 0).any() and (starts > 0).any()
    for row in range(16):
        n = int(batch["mask"][row].sum())
        assert batch["mask"][row, :n].all() and not batch["mask"][row, n:].any()  # padding on the right only
        assert batch["timesteps"][row, :n].tolist() == list(range(int(starts[row]), int(starts[row]) + n))
        assert int(starts[row]) + n == 24  # every window runs to its episode's end
        rtg = batch["returns_to_go"][row, :n]
        match = [i for i, e in enumerate(data.episodes())
                 if np.allclose(data.observations[e][int(starts[row]):], batch["states"][row, :n].numpy())]
        assert len(match) == 1
        episode = data.episodes()[match[0]]
        expected = returns_to_go(data.rewards[episode])[int(starts[row]):]
        assert np.allclose(rtg.numpy(), expected)
    assert returns_to_go(np.array([1.0, 2.0, 3.0])).tolist() == [6.0, 5.0, 3.0]


def test_training_is_deterministic_and_learns(tiny_data, tiny_dt_dir, tmp_path):
    again = tmp_path / "again"
    train(tiny_data, again, TINY_TRAIN, progress=False)
    first, second = load_file(str(tiny_dt_dir / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other = tmp_path / "other"
    train(tiny_data, other, replace(TINY_TRAIN, seed=1), progress=False)
    reseeded = load_file(str(other / "model.safetensors"))
    assert not torch.equal(reseeded["embed_state.weight"], first["embed_state.weight"])
    dt = load_dt(tiny_dt_dir)
    meta = load_dataset(tiny_data).meta
    data = load_dataset(tiny_data)
    best = max(data.rewards[e].sum(dtype=np.float64) for e in data.episodes())
    assert dt.config.horizon == 24 and dt.config.target_return == pytest.approx(best)
    assert dt.config.ref_returns == {k: meta["ref_returns"][k] for k in ("expert", "random")}
    for name in ("config.json", "model.safetensors", "train_log.csv", "train_config.json"):
        assert (tiny_dt_dir / name).is_file()
    long = tmp_path / "long"
    train(tiny_data, long, replace(TINY_TRAIN, steps=60, batch_size=4, log_every=20, lr=3e-3), progress=False)
    losses = [float(line.split(",")[1]) for line in (long / "train_log.csv").read_text().splitlines()[1:]]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0]
