"""A NAMM with extra per-token inputs (``FeatureConfig.extras``): config, state, scoring, saving."""

from __future__ import annotations

import json

import pytest
import torch

from namm.engine import Engine, EngineConfig
from namm.memory.calibration import calibrate
from namm.memory.extra_features import AttentionMoments, extra_features, relative_log_norm
from namm.memory.features import FeatureConfig, RunningStats, recency_embedding
from namm.memory.model import NAMM, NAMMConfig
from namm.policies.base import CacheSpec
from namm.policies.namm import NAMMPolicy

ATTN_EXTRAS = ("attn_peak", "attn_entropy", "attn_var")
ALL_EXTRAS = (*ATTN_EXTRAS, "key_norm")


def bam_params(n_inputs: int) -> int:
    """The BAM's size for d inputs (hidden 32): qkv d*96 + 96, out 32*2d + 2d, head d + 1."""
    return 163 * n_inputs + 97


def extras_namm(extras=ATTN_EXTRAS, seed: int = 0, scale: float = 0.3) -> NAMM:
    features = FeatureConfig(extras=extras)
    vec = torch.randn(bam_params(features.feature_dim), generator=torch.Generator().manual_seed(seed)) * scale
    norm = RunningStats.from_mean_var(100.0, torch.full((features.norm_dim,), 0.02),
                                      torch.full((features.norm_dim,), 1e-2))
    return NAMM(NAMMConfig(features=features), params=vec, norm=norm)


def feed(policy: NAMMPolicy, seed: int = 0, chunks=(21, 7, 16), heads: int = 2, head_dim: int = 4):
    """Observe layer 0 through chunks of random causal attention; returns (attns, keys). The keys
    of cached tokens stay as they were (a cache only appends), each chunk adds its own."""
    gen = torch.Generator().manual_seed(seed)
    attns, n, keys = [], 0, torch.empty(heads, 0, head_dim)
    for q in chunks:
        n += q
        attn = torch.rand(heads, q, n, generator=gen).tril(n - q)  # (kv_heads, queries, keys), causal
        attns.append(attn / attn.sum(-1, keepdim=True))
        keys = torch.cat([keys, torch.randn(heads, q, head_dim, generator=gen)], dim=1)
        policy.observe(0, attns[-1], keys, torch.arange(n).expand(heads, n))
    return attns, keys


def fresh(policy: NAMMPolicy, heads: int = 2) -> NAMMPolicy:
    policy.reset(CacheSpec(num_layers=1, managed_layers=(0,), kv_heads=heads, head_dim=4))
    return policy


def test_default_features_are_the_papers() -> None:
    features = FeatureConfig()
    assert features.extras == () and features.norm_dim == 17 and features.feature_dim == 25
    assert NAMM().num_params == 4172 == bam_params(25)
    policy = fresh(NAMMPolicy(NAMM()))
    assert policy.moments is None and policy.key_norms is None and policy.extras(0) is None


def test_default_scores_are_recency_plus_normalised_spectrogram() -> None:
    """Without extras the scorer sees exactly [recency (8), (E - mu) / sigma (17)], as before extras existed."""
    gen = torch.Generator().manual_seed(3)
    norm = RunningStats.from_mean_var(10.0, torch.rand(17, generator=gen), torch.rand(17, generator=gen) + 0.1)
    namm = NAMM(params=torch.randn(4172, generator=gen) * 0.3, norm=norm)
    policy = fresh(NAMMPolicy(namm))
    feed(policy)
    ema, positions = policy.spectrogram.scoring_ema(0), policy.positions[0]
    z = torch.cat([recency_embedding(positions, 8, 50000.0), (ema - norm.mean.float()) / norm.var.sqrt().float()], -1)
    expected = namm.scorer(z)
    torch.testing.assert_close(namm.score(ema, positions), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(namm.score_layers([ema], [positions])[0], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("extras", "message"), [
    (["attn_pek"], "Unknown extras"),
    (["value_norm"], "need the cached values"),
    (["attn_var", "attn_var"], "twice"),
    ("attn_var", "must be a list"),
])
def test_bad_extras_are_named(extras, message) -> None:
    with pytest.raises(ValueError, match=message):
        FeatureConfig(extras=extras)
    with pytest.raises(ValueError, match=message):
        NAMMConfig.from_dict({"features": {"extras": extras}})


def test_extras_size_the_network_and_round_trip(tmp_path) -> None:
    config = NAMMConfig.from_dict({"features": {"extras": list(ATTN_EXTRAS)}})  # as read from JSON / TOML
    assert config.features.extras == ATTN_EXTRAS and config.features.feature_dim == 28
    assert NAMM(config).num_params == bam_params(28) == 4661
    namm = extras_namm()
    namm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["features"]["extras"] == list(ATTN_EXTRAS)
    loaded = NAMM.from_pretrained(tmp_path)
    assert loaded.config == namm.config and loaded.num_params == 4661
    assert torch.equal(loaded.get_flat(), namm.get_flat()) and torch.equal(loaded.norm.m2, namm.norm.m2)
    with pytest.raises(ValueError, match="norm has 17 columns"):
        NAMM(config, norm=RunningStats(17))


def test_old_config_without_extras_loads_with_none(tmp_path) -> None:
    NAMM().save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    del meta["features"]["extras"]  # a config.json written before extras existed
    (tmp_path / "config.json").write_text(json.dumps(meta))
    loaded = NAMM.from_pretrained(tmp_path)
    assert loaded.config.features.extras == () and loaded.num_params == 4172


def test_extras_equal_the_extra_feature_functions() -> None:
    """The policy's streamed extras are extra_features() on the attention and keys it was handed."""
    policy = fresh(NAMMPolicy(extras_namm(ALL_EXTRAS)))
    attns, keys = feed(policy)
    moments = AttentionMoments(0.99)
    for attn in attns:
        moments.observe(0, attn)
    expected = extra_features(ALL_EXTRAS, moments, 0, keys, keys)
    assert policy.extras(0).shape == (2, 44, 4)
    torch.testing.assert_close(policy.extras(0), expected, rtol=0, atol=0)
    # and they enter the scorer after the spectrogram, normalised with it
    namm = policy.namm
    ema, positions = policy.spectrogram.scoring_ema(0), policy.positions[0]
    z = torch.cat([recency_embedding(positions, 8, 50000.0),
                   namm.norm.normalize(torch.cat([ema, expected], -1), 1e-7)], -1)
    policy.begin_eviction()
    torch.testing.assert_close(policy._plans[0][0], namm.scorer(z), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", [dict(), dict(budget=20)], ids=["threshold", "budget"])
def test_pruning_keeps_extras_aligned(mode) -> None:
    policy = fresh(NAMMPolicy(extras_namm(ALL_EXTRAS, seed=1), **mode))
    _, keys = feed(policy)
    before = policy.extras(0)
    policy.begin_eviction()
    keep = policy.select(0)
    assert keep is not None and 0 < keep.shape[1] < 44
    after = policy.extras(0)
    idx = keep[:, :, None].expand(-1, -1, before.shape[-1])
    # attention statistics travel with their token; the key norm is relative to the kept cache
    torch.testing.assert_close(after[..., :3], before.gather(1, idx)[..., :3], rtol=0, atol=0)
    kept_keys = keys.gather(1, keep[:, :, None].expand(-1, -1, keys.shape[-1]))
    torch.testing.assert_close(after[..., 3], relative_log_norm(kept_keys), rtol=0, atol=1e-6)
    assert policy.moments.state[0]["s"].shape == policy.positions[0].shape == policy.key_norms[0].shape
    # the next chunk streams on from the pruned state
    n = keep.shape[1] + 5
    policy.observe(0, torch.full((2, 5, n), 1.0 / n), torch.randn(2, n, 4), torch.arange(n).expand(2, n))
    assert policy.extras(0).shape == (2, n, 4)


def test_calibration_covers_spectrogram_and_extras(tiny_llama, tmp_path) -> None:
    model, tok = tiny_llama
    engine = Engine(model, tok, config=EngineConfig(chunk_size=32, delay=64))
    prompts = [torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(2)]
    namm = calibrate(engine, NAMM(NAMMConfig(features=FeatureConfig(extras=ATTN_EXTRAS))), prompts,
                     max_new_tokens=2, progress=False)
    assert namm.norm.n_bins == 17 + 3 and namm.norm.count > 0
    assert torch.isfinite(namm.norm.mean).all() and (namm.norm.var[17:] > 0).all()
    assert (namm.norm.mean[17:][[0, 2]] < 0).all()  # log peak and log variance of probabilities < 1
    namm.with_params(torch.randn(namm.num_params) * 0.3).save_pretrained(tmp_path)
    out = engine.generate(prompts[0], max_new_tokens=4, policy=NAMMPolicy(str(tmp_path)))
    assert len(out.token_ids) == 4


@pytest.mark.parametrize("mode", [dict(), dict(budget=40)], ids=["threshold", "budget"])
def test_batched_scoring_with_extras_under_the_engine(tiny_llama, monkeypatch, mode) -> None:
    """The engine's begin_eviction path keeps exactly the tokens of per-layer scoring in select()."""
    model, tok = tiny_llama
    config = EngineConfig(chunk_size=32, delay=64, record_evictions=True)
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(3))
    logs = []
    for batched in (True, False):
        policy = NAMMPolicy(extras_namm(ALL_EXTRAS, seed=2), **mode)
        if not batched:
            monkeypatch.setattr(policy, "begin_eviction", lambda: None)
        engine = Engine(model, tok, config=config)
        with engine.running():
            seq = engine.start(policy)
            seq.feed(ids, end_of_prompt=True)
        logs.append(seq.eviction_log)
        for layer in seq.positions:
            assert policy.extras(layer).shape[1] == seq.positions[layer].shape[1]
    assert any(kept[layer].shape[1] < 200 for _, kept in logs[0] for layer in kept)
    for (step_a, kept_a), (step_b, kept_b) in zip(*logs):
        assert step_a == step_b and kept_a.keys() == kept_b.keys()
        for layer in kept_a:
            assert torch.equal(kept_a[layer], kept_b[layer])


def test_decoding_across_an_eviction_step_with_stored_attention_rows(tiny_llama) -> None:
    """A decoding step's attention rows are stored, then folded by the eviction step's read, which
    runs outside the forward's inference mode: ``generate`` must get through it (it raised
    "Inplace update to inference tensor outside InferenceMode"), and the rows must count."""
    model, tok = tiny_llama
    # the first eviction step is at token 128, 28 steps into decoding: every buffer is still the
    # one the forward made (a layer the NAMM keeps whole at a step is not rebuilt either)
    engine = Engine(model, tok, config=EngineConfig(chunk_size=32, delay=128, evict_at_prefill_end=False))
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(5))
    policy = NAMMPolicy(extras_namm(ALL_EXTRAS, seed=1), budget=40)
    out = engine.generate(ids, max_new_tokens=40, policy=policy)
    assert len(out.token_ids) == 40 and out.report.evictions == 1
    pending = policy.moments._n_pending
    assert all(0 <= n < 16 for n in pending.values()) and any(n > 0 for n in pending.values())
    for layer in policy.positions:  # a read outside inference mode folds the rows left since
        assert policy.moments.mean(layer).shape == policy.positions[layer].shape
    assert all(n == 0 for n in pending.values())
