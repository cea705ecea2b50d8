"""The NAMM policy under the real engine on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from namm.engine import Engine, EngineConfig
from namm.memory.calibration import calibrate
from namm.memory.extra_features import relative_log
from namm.memory.model import NAMM, NAMMConfig
from namm.policies import POLICIES, make_policy
from namm.policies.namm import NAMMPolicy

PROMPT, DECODE = 150, 20
CONFIG = EngineConfig(chunk_size=32, delay=64)


def prompt_ids(n: int = PROMPT, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def logits_under(engine: Engine, policy, ids: torch.Tensor, n_decode: int = DECODE):
    """All prefill logits, then greedy decoding logits, and the sequence (for its report)."""
    with engine.running():
        seq = engine.start(policy)
        logits = [seq.feed(ids, all_logits=True, end_of_prompt=True)]
        for _ in range(n_decode):
            token = int(logits[-1][-1].argmax())
            logits.append(seq.feed(torch.tensor([token]), all_logits=True))
    return torch.cat(logits), seq


def biased_namm(bias: float, recency_weight: float = 0.0) -> NAMM:
    """A NAMM whose score is ``bias + recency_weight * cos(age * w_0)`` (only w3 and b3 set)."""
    vec = torch.zeros(4172)
    vec[-1] = bias
    vec[-26 + 4] = recency_weight  # w3 on feature 4 = cos(r * w_0) of the recency embedding
    return NAMM(params=vec)


def test_registered(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr("namm.memory.model.PRETRAINED_DIR", tmp_path)  # nothing shipped
    assert POLICIES["namm"] is NAMMPolicy
    assert isinstance(make_policy("namm", namm=NAMM()), NAMMPolicy)
    with pytest.raises(ValueError, match="needs a NAMM"):
        make_policy("namm")
    with pytest.raises(ValueError, match="max_cache"):
        NAMMPolicy(NAMM(), max_cache=0)


def test_zero_params_reproduce_full_cache(tiny_llama) -> None:
    model, tok = tiny_llama
    engine = Engine(model, tok, config=CONFIG)
    ids = prompt_ids()
    full, _ = logits_under(engine, None, ids)
    namm, seq = logits_under(engine, NAMMPolicy(NAMM()), ids)
    torch.testing.assert_close(namm, full, rtol=0, atol=1e-5)
    report = seq.report()
    assert report.kept_fraction == 1.0 and report.evictions > 0


def test_negative_scores_evict_with_equal_counts(tiny_llama) -> None:
    model, tok = tiny_llama
    engine = Engine(model, tok, config=EngineConfig(chunk_size=32, delay=64, record_evictions=True))
    policy = NAMMPolicy(biased_namm(-1.0, recency_weight=1.5))  # keeps tokens whose cos(age) >= 2/3
    _, seq = logits_under(engine, policy, prompt_ids())
    assert seq.eviction_log, "no eviction ran"
    for _, kept in seq.eviction_log:
        for layer, positions in kept.items():
            assert positions.shape[0] == 2 and positions.shape[1] < PROMPT
            assert (positions[:, 1:] > positions[:, :-1]).all()
            assert policy.spectrogram.ema(layer).shape[1] == seq.positions[layer].shape[1]
    assert seq.report().kept_fraction < 0.6


def test_all_negative_keeps_newest_and_budget_and_cap(tiny_llama) -> None:
    model, tok = tiny_llama
    engine = Engine(model, tok, config=CONFIG)
    ids = prompt_ids()
    _, seq = logits_under(engine, NAMMPolicy(biased_namm(-1.0)), ids, n_decode=0)
    assert seq.lengths() == [1, 1, 1]  # only the newest token survives the prefill-end eviction
    _, seq = logits_under(engine, NAMMPolicy(biased_namm(1.0), max_cache=40), ids, n_decode=0)
    assert seq.lengths() == [40, 40, 40]
    _, seq = logits_under(engine, NAMMPolicy(NAMM(), budget=25), ids, n_decode=0)
    assert seq.lengths() == [25, 25, 25]


def test_calibration_collects_frozen_stats(tiny_llama, tmp_path) -> None:
    model, tok = tiny_llama
    engine = Engine(model, tok, config=CONFIG)
    prompts = [prompt_ids(100, seed=s).tolist() for s in range(2)]
    namm = calibrate(engine, NAMM(NAMMConfig(evolved_on="tiny")), prompts, max_new_tokens=3, progress=False)
    assert namm.norm is not None and namm.norm.count > 0
    assert torch.isfinite(namm.norm.mean).all() and (namm.norm.var > 0).all()
    namm.save_pretrained(tmp_path)
    out = engine.generate(prompts[0], max_new_tokens=5, policy=NAMMPolicy(str(tmp_path)))
    assert out.report.kept_fraction == 1.0  # zero params still keep everything once calibrated


def test_schedule_comes_from_the_namm() -> None:
    policy = NAMMPolicy(NAMM(NAMMConfig(delay=256, chunk_size=64, evict_at_prefill_end=False)))
    assert policy.schedule == {"chunk_size": 64, "delay": 256, "evict_at_prefill_end": False,
                               "evict_during_prefill": True}
    assert EngineConfig(**policy.schedule).delay == 256


def test_question_attention_decides_what_is_kept() -> None:
    """At a prompt-end step, 5 question queries attend only key 2: with the partial frame the
    NAMM (score = DC bin - c) keeps key 2 and drops key 3; without it both look the same."""
    from namm.memory.features import FeatureConfig
    from namm.policies.base import CacheSpec

    attn = torch.full((1, 69, 10), 0.1)
    attn[:, 64:] = 0.0
    attn[:, 64:, 2] = 1.0  # the question
    kept = {}
    for partial_frame in (True, False):
        vec = torch.zeros(4172)
        vec[-26 + 8] = 1.0  # w3 on the first spectrogram bin (DC) of the un-normalised EMA
        vec[-1] = -1.3  # c: between key 3's ~0.98 and key 2's ~1.68 with the question counted
        policy = NAMMPolicy(NAMM(NAMMConfig(features=FeatureConfig(partial_frame=partial_frame)), params=vec))
        policy.reset(CacheSpec(num_layers=1, managed_layers=(0,), kv_heads=1, head_dim=4))
        policy.observe(0, attn, torch.zeros(1, 10, 4), torch.arange(59, 69)[None])
        policy.begin_eviction()
        keep = policy.select(0)
        kept[partial_frame] = set(range(10)) if keep is None else set(keep[0].tolist())
    assert 2 in kept[True] and 3 not in kept[True]
    assert (2 in kept[False]) == (3 in kept[False])


def random_bam_namm(seed: int) -> NAMM:
    """Random BAM parameters with a (made-up) normalisation that makes the spectrogram matter."""
    from namm.memory.features import RunningStats

    vec = torch.randn(4172, generator=torch.Generator().manual_seed(seed)) * 0.1
    norm = RunningStats.from_mean_var(100.0, torch.full((17,), 0.02), torch.full((17,), 1e-4))
    return NAMM(params=vec, norm=norm)


def test_batched_scores_equal_per_layer_scores() -> None:
    """Layers of unequal cache length: one batched (left-padded) BAM call gives each layer's own
    scores (fp64), and begin_eviction + select keeps what select alone keeps."""
    from namm.policies.base import CacheSpec

    gen = torch.Generator().manual_seed(0)
    lengths = {0: 50, 1: 37, 2: 64}
    namm = random_bam_namm(1)
    namm.scorer.to(dtype=torch.float64)
    kept = []
    for batched in (True, False):
        policy = NAMMPolicy(namm)
        policy.reset(CacheSpec(num_layers=3, managed_layers=(0, 1, 2), kv_heads=2, head_dim=4))
        gen.manual_seed(0)
        for layer, n in lengths.items():
            attn = torch.rand(2, 21, n, generator=gen, dtype=torch.float64) * 0.1  # (kv_heads, queries, keys)
            positions = torch.randperm(300, generator=gen)[:n].sort().values.expand(2, n)
            policy.observe(layer, attn, torch.zeros(2, n, 4), positions)
        if batched:
            emas = [policy.spectrogram.scoring_ema(layer) for layer in lengths]
            together = namm.score_layers(emas, [policy.positions[layer] for layer in lengths])
            for layer, got in zip(lengths, together):
                alone = namm.score(policy.spectrogram.scoring_ema(layer), policy.positions[layer])
                assert got.shape == (2, lengths[layer])
                torch.testing.assert_close(got, alone, rtol=0, atol=1e-12)
            policy.begin_eviction()
        kept.append([policy.select(layer) for layer in lengths])
    assert any(k is not None for k in kept[0])
    for a, b in zip(*kept):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("mode", [dict(), dict(budget=40)], ids=["threshold", "budget"])
def test_batched_scoring_under_the_engine(tiny_llama, monkeypatch, mode) -> None:
    """The engine's begin_eviction path keeps exactly the tokens of per-layer scoring in select()."""
    model, tok = tiny_llama
    config = EngineConfig(chunk_size=32, delay=64, record_evictions=True)
    ids = prompt_ids(200, seed=3)
    logs = []
    for batched in (True, False):
        policy = NAMMPolicy(random_bam_namm(1), **mode)
        if not batched:
            monkeypatch.setattr(policy, "begin_eviction", lambda: None)
        _, seq = logits_under(Engine(model, tok, config=config), policy, ids, n_decode=0)
        logs.append(seq.eviction_log)
    assert len(logs[0]) == len(logs[1]) == 4 and any(kept for _, kept in logs[0])
    for (step_a, kept_a), (step_b, kept_b) in zip(*logs):
        assert step_a == step_b and kept_a.keys() == kept_b.keys()
        for layer in kept_a:
            assert torch.equal(kept_a[layer], kept_b[layer])


def key_norm_namm() -> NAMM:
    """A NAMM whose score is the key-norm input, log(|k| / mean |k|) over the head's tokens: heads
    of the tiny random model then keep different numbers of tokens."""
    from namm.memory.features import FeatureConfig, RunningStats

    features = FeatureConfig(extras=("key_norm",))
    vec = torch.zeros(163 * features.feature_dim + 97)  # BAM with zero attention weights: z' = z
    vec[-2] = 1.0  # w3 on the last input, the key norm
    norm = RunningStats.from_mean_var(100.0, torch.cat([torch.full((17,), 0.02), torch.zeros(1)]), torch.ones(18))
    return NAMM(NAMMConfig(features=features), params=vec, norm=norm)


@pytest.mark.parametrize("max_cache", [None, 30])
def test_per_head_threshold_keeps_each_heads_own_tokens(tiny_llama, max_cache) -> None:
    """per_head: at every eviction step each KV head keeps exactly its tokens scoring >= 0 (the
    newest always; with max_cache, those among its top max_cache), padding never; the heads' counts
    differ, and the padded width is the largest count, which the shared rule keeps in every head."""
    model, tok = tiny_llama
    engine = Engine(model, tok, config=EngineConfig(chunk_size=32, delay=64, record_evictions=True))
    policy = NAMMPolicy(key_norm_namm(), per_head=True, max_cache=max_cache)
    scored, alone = [], []

    def hook(layer, positions, scores):
        scored.append((positions.clone(), scores.clone()))
        for h in range(positions.shape[0]):  # padding changes no score: each head scored on its own
            held = positions[h] >= 0
            ema = policy.spectrogram.scoring_ema(layer)[h : h + 1, held]
            key_norms = relative_log(policy.key_norms[layer][h : h + 1, held])[..., None]
            alone.append((policy.namm.score(ema, positions[h : h + 1, held], key_norms)[0], scores[h, held]))

    policy.score_hook = hook
    _, seq = logits_under(engine, policy, prompt_ids(200, seed=3))
    for expected, got in alone:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    kept_steps = [(step, layer, kept[layer]) for step, kept in seq.eviction_log for layer in sorted(kept)]
    assert len(kept_steps) == len(scored) and kept_steps  # every step pruned every layer
    ragged = False
    for (_, _, kept), (positions, scores) in zip(kept_steps, scored):
        widths = []
        for h in range(positions.shape[0]):
            held = positions[h] >= 0
            newest = positions.shape[1] - 1
            candidates = set(range(positions.shape[1]))
            if max_cache is not None:  # the newest counts within the cap
                order = sorted((i for i in candidates if held[i]), key=lambda i: (i != newest, -scores[h, i].item(), i))
                candidates = set(order[:max_cache])
            expected = {positions[h, i].item() for i in candidates if held[i] and (scores[h, i] >= 0 or i == newest)}
            row = kept[h]
            assert set(row[row >= 0].tolist()) == expected
            widths.append(len(expected))
        assert kept.shape[1] == max(widths)
        ragged |= len(set(widths)) > 1
    assert ragged
    report = seq.report()
    assert report.head_len == seq.head_lengths() and any(len(set(heads)) > 1 for heads in report.head_len)
    assert report.kept_fraction < 1.0


def test_per_head_is_an_option_of_the_threshold_mode() -> None:
    assert NAMMPolicy(NAMM()).per_head is False
    assert "per head" in NAMMPolicy(NAMM(), per_head=True).describe_keep()
    with pytest.raises(ValueError, match="per_head applies to the threshold mode"):
        NAMMPolicy(NAMM(), per_head=True, budget=10)
    with pytest.raises(ValueError, match="per_head must be"):
        NAMMPolicy(NAMM(), per_head="yes")
