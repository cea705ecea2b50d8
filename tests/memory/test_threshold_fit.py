"""Fitting the threshold of a budget-evolved NAMM so its threshold mode keeps a chosen fraction."""

from __future__ import annotations

import pytest
import torch

from namm.engine import Engine, EngineConfig
from namm.memory.calibration import calibrate, fit_threshold, threshold_kept
from namm.memory.model import NAMM, NAMMConfig
from namm.policies.namm import NAMMPolicy
from namm.prefix import PrefixStore

CONFIG = EngineConfig(chunk_size=32, delay=64)


def prompts(n: int = 3, length: int = 200) -> list[list[int]]:
    return [torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(n)]


@pytest.fixture(scope="module")
def setup(tiny_llama):
    """A calibrated linear NAMM with random weights, evolved "in budget mode" at 0.4."""
    engine = Engine(*tiny_llama, config=CONFIG)
    config = NAMMConfig(evolved_on="tiny", scorer={"kind": "mlp", "mlp_depth": 1}, keep="budget", keep_ratio=0.4,
                        chunk_size=32, delay=64)
    namm = NAMM(config)
    namm = namm.with_params(0.3 * torch.randn(namm.num_params, generator=torch.Generator().manual_seed(1)))
    namm = calibrate(engine, namm, prompts(2), max_new_tokens=1, progress=False)
    return engine, namm


def test_kept_fraction_falls_as_the_threshold_rises(setup):
    engine, namm = setup
    kept = [threshold_kept(engine, namm, prompts(), t) for t in (-100.0, -0.5, 0.0, 0.5, 100.0)]
    assert kept[0] == 1.0 and kept[-1] < 0.1  # every token, then about one per layer (the newest)
    assert all(a >= b for a, b in zip(kept, kept[1:])) and kept[1] > kept[3]


@pytest.mark.parametrize("target", [0.3, 0.6])
def test_fitted_threshold_keeps_the_target_in_threshold_mode(setup, target):
    engine, namm = setup
    fitted, record = fit_threshold(engine, namm, prompts(), target, tol=0.01, progress=False)
    # the recorded keep mode, the parameters and the normalisation are unchanged: only the threshold
    assert fitted.config.keep == "budget" and fitted.config.keep_ratio == 0.4
    assert torch.equal(fitted.get_flat(), namm.get_flat())
    assert fitted.config.threshold == record["threshold"] != namm.config.threshold
    assert abs(record["kept"] - target) <= 0.01 and record["prompts"] == 3 and record["runs"] <= 24
    # checked independently: the policy in threshold mode on the same prompts keeps the target
    fractions = [engine.generate(p, max_new_tokens=1, policy=NAMMPolicy(namm=fitted, keep="threshold"))
                 .report.prefill.kept_fraction for p in prompts()]
    assert sum(fractions) / len(fractions) == pytest.approx(record["kept"], abs=1e-9)
    # and the budget mode it was evolved in still runs at its keep_ratio by default
    budget = engine.generate(prompts()[0], max_new_tokens=1, policy=NAMMPolicy(namm=fitted))
    assert budget.report.prefill.kept_fraction == pytest.approx(0.4, abs=0.03)


def test_the_fit_reads_each_prompt_once_and_leaves_the_engine_as_it_was(setup, monkeypatch):
    engine, namm = setup
    assert engine.prefix_store is None
    stores = []
    put = PrefixStore.put

    def spy(self, key, snapshot):
        stores.append(self)
        put(self, key, snapshot)

    monkeypatch.setattr(PrefixStore, "put", spy)
    fitted, record = fit_threshold(engine, namm, prompts(), 0.5, tol=0.01, progress=False)
    store = stores[0]
    # one snapshot per prompt, filled on the first run and read by every later one
    assert len(stores) == store.misses == 3 and record["runs"] >= 3
    assert store.hits == 3 * (record["runs"] - 1)
    assert engine.prefix_store is None
    # an engine's own store too small to hold every prompt (it would drop each before its next read)
    engine.prefix_store = small = PrefixStore(max_entries=2)
    try:
        again, _ = fit_threshold(engine, namm, prompts(), 0.5, tol=0.01, progress=False)
    finally:
        engine.prefix_store = None
    assert stores[-1] is not small and small.misses == 0 and stores[-1].hits == store.hits
    assert again.config.threshold == fitted.config.threshold
    # the same answer as runs that read every prompt whole (no store)
    assert threshold_kept(engine, namm, prompts(), record["threshold"]) == pytest.approx(record["kept"], abs=1e-9)


def test_unreachable_or_bad_targets_raise(setup):
    engine, namm = setup
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        fit_threshold(engine, namm, prompts(), 1.2, progress=False)
    tied = namm.with_params(torch.zeros(namm.num_params))  # every score equal: all or nothing
    with pytest.raises(ValueError, match="No threshold keeps"):
        fit_threshold(engine, tied, prompts(1), 0.5, max_runs=8, progress=False)
