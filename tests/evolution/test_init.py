"""A run's ``init``: the CMA-ES mean starts from a NAMM folder (lifted into the run's NAMM) with its
frozen normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from namm.memory.features import FeatureConfig, RunningStats
from namm.memory.model import NAMM, NAMMConfig

LINEAR = {"kind": "mlp", "mlp_depth": 1}
EXTRAS = ("key_norm", "attn_entropy")


def blind_linear_namm(value: float) -> NAMM:
    """A depth-blind linear NAMM under the tiny run's conditions, every parameter ``value``."""
    features = FeatureConfig(extras=EXTRAS)
    norm = RunningStats.from_mean_var(100.0, torch.full((features.norm_dim,), 0.05), torch.full((features.norm_dim,), 0.01))
    config = NAMMConfig(features=features, scorer=LINEAR, keep="budget", keep_ratio=0.5, chunk_size=32, delay=64)
    return NAMM(config, params=torch.full((features.feature_dim + 1,), value), norm=norm)

def test_a_run_starts_from_init_lifted_with_its_normalisation(tiny_config, tmp_path):
    """``init = FOLDER``: the CMA mean starts at the lifted parameters (here far from the default
    zero start) and the run keeps init's frozen statistics instead of calibrating afresh."""
    from namm.evolution import checkpoint as ckpt
    from namm.evolution.optimizer import CMAES
    from namm.evolution.runner import EvolutionRun

    namm_table = {"scorer": LINEAR, "features": {"extras": list(EXTRAS), "depth_basis": 2}, "keep": "budget",
                  "keep_ratio": 0.5}
    source = blind_linear_namm(2.0)
    source.save_pretrained(tmp_path / "init")
    config = tiny_config(namm=namm_table, init=str(tmp_path / "init"), stages=[{"tasks": ["passkey"], "generations": 1}],
                         eval_interval=0)
    EvolutionRun(config).run()
    run_dir = tmp_path / "run"
    norm = ckpt.load_calibration(run_dir)
    assert torch.equal(norm.mean, source.norm.mean) and norm.count == source.norm.count
    mean = CMAES.from_state_dict(ckpt.load_state(run_dir)["optimizer"]).mean
    half = source.num_params - 1
    assert np.abs(mean[:half] - 2.0).max() < 0.5 and np.abs(mean[half:-1]).max() < 0.5  # P_1 block from zero
    assert abs(mean[-1] - 2.0) < 0.5
    bad = tiny_config(namm={**namm_table, "features": {"extras": ["key_norm"], "depth_basis": 2}},
                      init=str(tmp_path / "init"), output_dir=str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="only a linear NAMM"):
        EvolutionRun(bad).run()


def test_a_run_with_score_carry_starts_from_an_init_without_it_and_records_it(tiny_config, tmp_path):
    """``score_carry`` is a rule of the run, not a parameter: an init evolved without it lifts, and
    the run's checkpoints carry the run's rule (so `namm eval` runs them with it)."""
    from namm.evolution.runner import EvolutionRun

    namm_table = {"scorer": LINEAR, "features": {"extras": list(EXTRAS), "depth_basis": 2}, "keep": "threshold",
                  "threshold": 0.5, "score_carry": 3, "score_carry_decay": 0.25}
    blind_linear_namm(0.1).save_pretrained(tmp_path / "init")
    config = tiny_config(namm=namm_table, init=str(tmp_path / "init"), eval_interval=0,
                         stages=[{"tasks": ["passkey"], "generations": 1}])
    EvolutionRun(config).run()
    saved = NAMM.from_pretrained(tmp_path / "run" / "mean").config
    assert (saved.score_carry, saved.score_carry_decay, saved.keep) == (3, 0.25, "threshold")
