"""The NAMM policy under the real engine on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from namm.engine import Engine, EngineConfig
from namm.memory.calibration import calibrate
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


def test_registered() -> None:
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
    policy = NAMMPolicy(NAMM(NAMMConfig(delay=256, chunk_size=64)))
    assert policy.schedule == {"chunk_size": 64, "delay": 256}
    assert EngineConfig(**policy.schedule).delay == 256
