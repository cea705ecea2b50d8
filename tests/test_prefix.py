"""Prefix sharing: a prompt forked from a stored snapshot runs exactly as if read from scratch."""

from __future__ import annotations

import pytest
import torch

from namm.engine import Engine, EngineConfig
from namm.memory.model import NAMM
from namm.policies import make_policy
from namm.policies.namm import NAMMPolicy
from namm.prefix import PrefixStore

CONFIG = EngineConfig(chunk_size=16, delay=64)


def member(seed: int) -> NAMMPolicy:
    """A NAMM with random parameters large enough to evict (like a CMA-ES member far from zero)."""
    params = torch.randn(4172, generator=torch.Generator().manual_seed(seed)) * 0.3
    return NAMMPolicy(NAMM(params=params))


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def run(engine: Engine, policy, prompt: torch.Tensor):
    out = engine.generate(prompt, max_new_tokens=12, policy=policy)
    ll = engine.loglikelihood(prompt, ids(9, seed=7), policy=policy, return_report=True)
    return out.token_ids, out.report.to_dict(), ll[0], ll[2].to_dict()


@pytest.mark.parametrize("n_prompt", [40, 64, 150, 200])
@pytest.mark.parametrize("end_eviction", [True, False])
def test_forked_members_equal_unshared_runs(tiny_llama, n_prompt: int, end_eviction: bool) -> None:
    model, tok = tiny_llama
    config = EngineConfig(chunk_size=16, delay=64, evict_at_prefill_end=end_eviction)
    plain = Engine(model, tok, config=config)
    store = PrefixStore()
    shared = Engine(model, tok, config=config, prefix_store=store)
    prompt = ids(n_prompt)
    evicted = False
    for seed in range(3):  # seed 0 fills the store, 1 and 2 fork from it
        expected = run(plain, member(seed), prompt)
        got = run(shared, member(seed), prompt)
        assert got == expected
        evicted |= expected[1]["kept_fraction"] < 1.0
    assert store.hits == 2 * 2 + 1  # generate + loglikelihood of members 1, 2; loglikelihood of member 0
    assert len(store) == 1
    if n_prompt > 64 or end_eviction:
        assert evicted  # the members really evict after the shared prefix


def test_members_with_extra_inputs_fork_their_state(tiny_llama) -> None:
    """A NAMM with extra inputs forks its attention moments and key norms with the spectrogram."""
    from namm.memory.features import FeatureConfig
    from namm.memory.model import NAMMConfig

    model, tok = tiny_llama
    config = NAMMConfig(features=FeatureConfig(extras=("attn_peak", "attn_entropy", "attn_var", "key_norm")))
    store = PrefixStore()
    plain, shared = Engine(model, tok, config=CONFIG), Engine(model, tok, config=CONFIG, prefix_store=store)
    prompt = ids(150)
    kept = []
    for seed in range(2):
        params = torch.randn(NAMM(config).num_params, generator=torch.Generator().manual_seed(seed)) * 0.3
        expected = run(plain, NAMMPolicy(NAMM(config, params)), prompt)
        assert run(shared, NAMMPolicy(NAMM(config, params)), prompt) == expected
        kept.append(expected[1]["kept_fraction"])
    assert store.hits == 3 and min(kept) < 1.0


def test_full_cache_shares_and_other_policies_do_not(tiny_llama) -> None:
    model, tok = tiny_llama
    store = PrefixStore()
    engine = Engine(model, tok, config=CONFIG, prefix_store=store)
    prompt = ids(150)
    first = engine.generate(prompt, max_new_tokens=8)
    again = engine.generate(prompt, max_new_tokens=8)
    assert again.token_ids == first.token_ids and store.hits == 1
    # Expected Attention's statistics come from the queries: it has no fork key and reads its own prompt
    engine.generate(prompt, max_new_tokens=8, policy=make_policy("expected-attention", keep_ratio=0.5))
    assert len(store) == 1 and store.hits == 1


BASELINES = ["h2o", "tova", "snapkv", "pyramidkv", "ada-snapkv", "ada-h2o", "l2", "streaming", "recency", "random"]


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("end_eviction", [True, False])
def test_baseline_settings_fork_one_prefix_exactly(tiny_llama, method: str, end_eviction: bool) -> None:
    """Every setting of a baseline continues one prefix read and runs exactly as if read alone."""
    model, tok = tiny_llama
    config = EngineConfig(chunk_size=16, delay=64, evict_at_prefill_end=end_eviction)
    store = PrefixStore()
    plain, shared = Engine(model, tok, config=config), Engine(model, tok, config=config, prefix_store=store)
    prompt = ids(150)
    kept = []
    for ratio in (0.3, 0.6, 0.3):
        expected = run(plain, make_policy(method, keep_ratio=ratio), prompt)
        assert run(shared, make_policy(method, keep_ratio=ratio), prompt) == expected
        kept.append(expected[1]["kept_fraction"])
    assert store.hits == 3 * 2 - 1 and len(store) == 1  # one read; the rest fork (generate and loglikelihood)
    assert kept[0] < kept[1] < 1.0  # the settings really keep different caches after the shared prefix


def test_only_policies_with_the_same_state_share(tiny_llama) -> None:
    model, tok = tiny_llama
    store = PrefixStore()
    engine = Engine(model, tok, config=CONFIG, prefix_store=store)
    prompt = ids(150)
    for method, kwargs in [("snapkv", {}), ("pyramidkv", {}), ("snapkv", {"window": 8}), ("h2o", {}),
                           ("streaming", {}), ("recency", {}), ("l2", {}), ("full", {})]:
        policy = make_policy(method, **kwargs) if method == "full" else make_policy(method, keep_ratio=0.4, **kwargs)
        engine.generate(prompt, max_new_tokens=2, policy=policy)
    # PyramidKV reuses SnapKV's votes (same window), Recency StreamingLLM's positions; the rest read their own
    assert store.hits == 2 and len(store) == 6


def test_a_fork_reports_the_prefix_it_reused(tiny_llama) -> None:
    model, tok = tiny_llama
    engine = Engine(model, tok, config=EngineConfig(chunk_size=16, delay=64, evict_during_prefill=False),
                    prefix_store=PrefixStore())
    prompt = ids(200)
    first = engine.generate(prompt, max_new_tokens=4, policy=make_policy("h2o", keep_ratio=0.5)).timings
    out = engine.generate(prompt, max_new_tokens=4, policy=make_policy("h2o", keep_ratio=0.25))
    fork = out.timings
    assert first["prefix_reused_s"] == 0.0 and fork["prefix_reused_s"] > 0.0
    # the whole prompt was the prefix (no step before its end): the first call's prefill covers it
    assert fork["prefix_reused_s"] <= first["prefill_s"]
    tokens = 200 + len(out.token_ids)
    assert fork["tokens_per_s"] == pytest.approx(tokens / (fork["total_s"] + fork["prefix_reused_s"]))


def test_prefix_keys_separate_prompts_and_schedules(tiny_llama) -> None:
    model, tok = tiny_llama
    store = PrefixStore(max_entries=2)
    engine = Engine(model, tok, config=CONFIG, prefix_store=store)
    engine.generate(ids(150, seed=1), max_new_tokens=2, policy=member(0))
    engine.generate(ids(150, seed=2), max_new_tokens=2, policy=member(0))
    assert len(store) == 2 and store.hits == 0
    # a different delay changes where the prefix ends: its own entry, and the oldest one is dropped
    other = Engine(model, tok, config=EngineConfig(chunk_size=16, delay=32), prefix_store=store)
    other.generate(ids(150, seed=2), max_new_tokens=2, policy=member(0))
    assert len(store) == 2 and store.hits == 0
    engine.generate(ids(150, seed=2), max_new_tokens=2, policy=member(1))
    assert store.hits == 1
    with pytest.raises(ValueError, match="max_entries"):
        PrefixStore(max_entries=0)


def test_forks_compute_the_first_eviction_inputs_once(tiny_llama, monkeypatch) -> None:
    """The first step's inputs (spectrogram EMA, extras) come from the snapshot's state alone: the
    first member computes them, the others reuse them, with their own normalisation statistics."""
    from namm.memory.features import FeatureConfig, RunningStats, StreamingSpectrogram
    from namm.memory.model import NAMMConfig

    model, tok = tiny_llama
    schedule = EngineConfig(chunk_size=16, delay=64, evict_during_prefill=False)  # one step, at the prompt's end
    config = NAMMConfig(features=FeatureConfig(extras=("attn_peak", "key_norm")), threshold=0.0)
    calls = []
    real = StreamingSpectrogram.scoring_ema
    monkeypatch.setattr(StreamingSpectrogram, "scoring_ema", lambda self, layer: calls.append(layer) or real(self, layer))

    def members():
        for seed in range(3):  # other parameters, and other statistics for the third
            g = torch.Generator().manual_seed(seed)
            namm = NAMM(config, torch.randn(NAMM(config).num_params, generator=g) * 0.3)
            if seed == 2:
                dim = config.features.norm_dim
                namm = namm.with_norm(RunningStats(dim, 10.0, torch.randn(dim, generator=g), torch.rand(dim, generator=g) * 10))
            yield NAMMPolicy(namm)

    prompt = ids(150)
    plain = Engine(model, tok, config=schedule)
    expected = [plain.generate(prompt, max_new_tokens=12, policy=p) for p in members()]
    plain_calls = len(calls)
    calls.clear()
    store = PrefixStore()
    shared = Engine(model, tok, config=schedule, prefix_store=store)
    got = [shared.generate(prompt, max_new_tokens=12, policy=p) for p in members()]
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    assert [g.report.to_dict() for g in got] == [e.report.to_dict() for e in expected]
    assert len({e.report.kept_fraction for e in expected}) > 1  # the members keep different tokens
    layers = model.config.num_hidden_layers
    # plain: every member computes every layer's inputs at its step; shared: only the first member
    assert plain_calls == 3 * layers and len(calls) == layers and store.hits == 2
    assert len(store._entries[next(iter(store._entries))].shared) == layers
