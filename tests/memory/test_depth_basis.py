"""A NAMM that knows each layer's depth (``FeatureConfig.depth_basis``): Legendre basis, feature
layout, scores on a real engine, lifting a depth-blind linear NAMM, the readout, and a run's init."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from namm.analysis import linear_readout, linear_readout_markdown
from namm.engine import Engine, EngineConfig
from namm.memory.features import FeatureConfig, RunningStats, depth_basis, relative_depth, token_features
from namm.memory.model import NAMM, NAMMConfig, lift_params
from namm.policies.namm import NAMMPolicy

LINEAR = {"kind": "mlp", "mlp_depth": 1}
EXTRAS = ("key_norm", "attn_entropy")
SCHEDULE = {"chunk_size": 32, "delay": 64}


def linear_namm(k: int = 0, seed: int = 0, scale: float = 0.5, extras=EXTRAS) -> NAMM:
    features = FeatureConfig(extras=extras, depth_basis=k)
    config = NAMMConfig(features=features, scorer=LINEAR, keep="budget", keep_ratio=0.5, **SCHEDULE)
    vec = torch.randn(features.feature_dim + 1, generator=torch.Generator().manual_seed(seed)) * scale
    norm = RunningStats.from_mean_var(100.0, torch.full((features.norm_dim,), 0.05), torch.full((features.norm_dim,), 0.01))
    return NAMM(config, params=vec, norm=norm)


@pytest.mark.parametrize("x", [-1.0, -0.3, 0.0, 0.55, 1.0])
def test_basis_is_legendre(x):
    values = depth_basis(x, 5)
    expected = [np.polynomial.legendre.legval(x, np.eye(5)[k]) for k in range(5)]
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-12)
    assert depth_basis(x, 2) == values[:2]


def test_relative_depth_and_bad_values():
    assert [relative_depth(layer, 5) for layer in range(5)] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert relative_depth(0, 1) == 0.0
    with pytest.raises(ValueError, match="not one of the model's 3 layers"):
        relative_depth(3, 3)
    for bad in (1, 9, -1, True, 2.0):
        with pytest.raises(ValueError, match="depth_basis"):
            FeatureConfig(depth_basis=bad)


def test_features_are_the_inputs_times_each_polynomial():
    blind, aware = FeatureConfig(), FeatureConfig(depth_basis=3)
    assert aware.feature_dim == 3 * blind.feature_dim == 75
    ema, positions = torch.rand(2, 7, 17), torch.arange(7).expand(2, 7)
    stats = RunningStats.from_mean_var(10.0, torch.full((17,), 0.5), torch.full((17,), 4.0))
    z = token_features(ema, positions, blind, stats)
    x = 0.4
    za = token_features(ema, positions, aware, stats, depth=x)
    torch.testing.assert_close(za[..., :25], z)
    torch.testing.assert_close(za[..., 25:50], z * x)
    torch.testing.assert_close(za[..., 50:], z * (3 * x * x - 1) / 2)
    with pytest.raises(ValueError, match="pass depth"):
        token_features(ema, positions, aware, stats)


def run(engine: Engine, namm: NAMM, ids: list[int]):
    """Prefill ``ids`` under ``namm``; the policy (its scores) and the logits."""
    policy = NAMMPolicy(namm=namm)
    with engine.running():
        seq = engine.start(policy)
        logits = seq.feed(torch.tensor(ids), all_logits=True, end_of_prompt=True)
    return policy, logits, seq


def test_lifted_namm_keeps_exactly_what_the_blind_one_keeps(tiny_llama):
    engine = Engine(*tiny_llama, config=EngineConfig(**SCHEDULE))
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    blind = linear_namm()
    lifted = NAMM(linear_namm(k=3).config, params=lift_params(blind, linear_namm(k=3).config), norm=blind.norm)
    assert lifted.num_params == 3 * (blind.num_params - 1) + 1
    p_blind, logits_blind, seq_blind = run(engine, blind, ids)
    p_lift, logits_lift, seq_lift = run(engine, lifted, ids)
    assert seq_blind.lengths() == seq_lift.lengths() and seq_blind.lengths()[0] < 150
    for layer in p_blind.positions:
        assert torch.equal(p_blind.positions[layer], p_lift.positions[layer])
    torch.testing.assert_close(logits_blind, logits_lift, rtol=0, atol=0)


def test_depth_weights_score_each_layer_with_its_own_rule(tiny_llama):
    """Scores under the policy equal z . w(x) + b with w(x) = w_0 + x w_1 + P_2(x) w_2, computed
    here from the blind features; the first and last layers keep different tokens."""
    engine = Engine(*tiny_llama, config=EngineConfig(**SCHEDULE))
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(4)).tolist()
    aware = linear_namm(k=3, seed=1)
    blind = NAMM(linear_namm().config, params=torch.zeros(linear_namm().num_params), norm=aware.norm)
    policy, _, _ = run(engine, aware, ids)
    w = aware.scorer.blocks()["w0"].reshape(3, -1).double()
    b = float(aware.scorer.blocks()["b0"])
    layers = sorted(policy.positions)
    n = len(layers)
    for layer in layers:
        ema, pos, extras = policy.spectrogram.scoring_ema(layer), policy.positions[layer], policy.extras(layer)
        x = 2 * layer / (n - 1) - 1
        z = blind.features(ema, pos, extras).double()
        expected = z @ (w[0] + x * w[1] + (3 * x * x - 1) / 2 * w[2]) + b
        torch.testing.assert_close(aware.score(ema, pos, extras, depth=x).double(), expected, rtol=1e-5, atol=1e-5)
    first, last = policy.positions[layers[0]], policy.positions[layers[-1]]
    assert not torch.equal(first.sort(-1).values, last.sort(-1).values)


def test_lift_refuses_what_it_cannot_lift():
    blind = linear_namm()
    with pytest.raises(ValueError, match="only a linear NAMM"):
        lift_params(blind, NAMMConfig(features=FeatureConfig(extras=EXTRAS, depth_basis=2)))  # a BAM
    with pytest.raises(ValueError, match="only a linear NAMM"):  # other extras
        lift_params(blind, linear_namm(k=2, extras=("key_norm",)).config)
    with pytest.raises(ValueError, match="only a linear NAMM"):  # a smaller basis
        lift_params(linear_namm(k=3), linear_namm(k=2).config)
    assert torch.equal(lift_params(blind, blind.config), blind.get_flat())


def test_readout_gives_the_weights_at_the_first_middle_and_last_layer():
    namm = linear_namm(k=3, seed=2)
    out = linear_readout(namm)
    w = namm.scorer.blocks()["w0"].reshape(3, -1).double()
    idx = 8 + 17  # the first extra, key_norm, after the age embedding and the 17 bins
    assert out["weights"]["key_norm"] == pytest.approx(float(w[0, idx]))
    by_depth = out["weights_by_depth"]
    assert by_depth["first"]["key_norm"] == pytest.approx(float(w[0, idx] - w[1, idx] + w[2, idx]))
    assert by_depth["middle"]["key_norm"] == pytest.approx(float(w[0, idx] - w[2, idx] / 2))
    assert by_depth["last"]["key_norm"] == pytest.approx(float(w[0, idx] + w[1, idx] + w[2, idx]))
    assert "at the last layer" in linear_readout_markdown(out)
    assert "weights_by_depth" not in linear_readout(linear_namm())


def test_saved_depth_namm_round_trips(tmp_path):
    namm = linear_namm(k=2, seed=5)
    namm.save_pretrained(tmp_path / "n")
    assert json.loads((tmp_path / "n" / "config.json").read_text())["features"]["depth_basis"] == 2
    loaded = NAMM.from_pretrained(tmp_path / "n")
    assert loaded.config == namm.config and torch.equal(loaded.get_flat(), namm.get_flat())

