"""The memory report: every field against a schedule worked out by hand."""

from __future__ import annotations

import pytest
import torch

from namm.engine import Engine, EngineConfig
from namm.models import tiny_model
from namm.policies import make_policy
from namm.policies.streaming import StreamingLLM
from namm.prefix import PrefixStore

BUDGET, N_PROMPT, N_NEW = 24, 100, 10
CONFIG = dict(chunk_size=16, delay=32)


@pytest.fixture(scope="module")
def tiny_llama():
    return tiny_model("llama", seed=3)


def run(model, policy, prefix_store=None):
    """Prompt of 100 tokens, then 10 tokens fed one at a time; the sequence after each step."""
    engine = Engine(model, config=EngineConfig(**CONFIG), prefix_store=prefix_store)
    prompt = torch.randint(0, 256, (N_PROMPT,), generator=torch.Generator().manual_seed(0))
    with engine.running():
        seq = engine.start(policy)
        seq.feed(prompt, end_of_prompt=True, prefix_store=prefix_store)
        prefill = seq.report()
        for token in range(N_NEW):
            seq.feed(torch.tensor([token]))
    return seq, prefill, seq.report()


def token_bytes(model) -> int:
    """Bytes of K and V per cached token, all layers together."""
    c = model.config
    return c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 2 * 4


# StreamingLLM with a budget of 24, chunks of 16, eviction every 32 tokens and at the prompt end (100):
#   call  tokens  seen  cache after the chunk  eviction  cache after the step
#   1     16      16    16                     -         16
#   2     16      32    32                     at 32     24
#   3     16      48    40                     -         40
#   4     16      64    56                     at 64     24
#   5     16      80    40                     -         40
#   6     16      96    56                     at 96     24
#   7      4     100    28                     at 100    24   (the prompt's end)
#   then 10 decoded tokens: seen 101..110, cache 25..34, no eviction (the next is at 128).
PREFILL = [(16, 16, 16, 16), (16, 32, 32, 24), (16, 48, 40, 40), (16, 64, 56, 24),
           (16, 80, 40, 40), (16, 96, 56, 24), (4, 100, 28, 24)]  # (tokens, seen, appended, after step)
DECODE = [(1, 100 + k, 24 + k, 24 + k) for k in range(1, N_NEW + 1)]


def expected(steps):
    tokens = sum(n for n, *_ in steps)
    return {
        "tokens": tokens,
        "kept": steps[-1][3] / steps[-1][1],
        "mean": sum(n * after / seen for n, seen, _, after in steps) / tokens,
        "peak": max(appended / seen for _, seen, appended, _ in steps),
        "peak_len": max(appended for _, _, appended, _ in steps),
        "mean_len": sum(n * after for n, _, _, after in steps) / tokens,
    }


def check_phase(phase, want, per_token: int):
    assert phase.tokens == want["tokens"]
    assert phase.kept_fraction == pytest.approx(want["kept"], rel=1e-12)
    assert phase.mean_fraction == pytest.approx(want["mean"], rel=1e-12)
    assert phase.peak_fraction == pytest.approx(want["peak"], rel=1e-12)
    assert phase.peak_kv_bytes == want["peak_len"] * per_token


def test_every_field_matches_the_schedule_by_hand(tiny_llama):
    model, _ = tiny_llama
    seq, _, report = run(model, make_policy("streaming", budget=BUDGET))
    layers, per_token = model.config.num_hidden_layers, token_bytes(model)
    pre, dec, whole = expected(PREFILL), expected(DECODE), expected(PREFILL + DECODE)
    assert whole["peak"] == 1.0 and pre["peak_len"] == 56 and dec["peak"] == 34 / 110  # the hand schedule
    assert report.tokens_seen == 110 and report.evictions == 4
    assert report.final_len == [34] * layers
    assert report.peak_len == [56] * layers
    assert report.mean_len == [round(whole["mean_len"], 2)] * layers
    assert report.kept_fraction == pytest.approx(34 / 110, rel=1e-12)
    assert report.mean_fraction == pytest.approx(whole["mean"], rel=1e-12)
    assert report.peak_fraction == 1.0
    assert report.kv_bytes == 34 * per_token
    assert report.kv_bytes_full == 110 * per_token
    assert report.peak_kv_bytes == 56 * per_token  # after the 4th and 6th chunks, before their evictions
    check_phase(report.prefill, pre, per_token)
    check_phase(report.decode, dec, per_token)
    assert report.prefill.kept_fraction == 24 / 100  # after the prompt-end eviction
    assert report.peak_fraction >= report.mean_fraction >= report.kept_fraction
    for phase in (report.prefill, report.decode):
        assert phase.peak_fraction >= phase.mean_fraction and phase.peak_fraction >= phase.kept_fraction


def test_report_mid_run_counts_only_what_ran(tiny_llama):
    """A report after the prompt is the prefill phase alone, and making it changes nothing after."""
    model, _ = tiny_llama
    _, prefill, report = run(model, make_policy("streaming", budget=BUDGET))
    pre = expected(PREFILL)
    assert prefill.tokens_seen == 100 and prefill.decode.tokens == 0 and prefill.decode.mean_fraction is None
    assert prefill.mean_fraction == pytest.approx(pre["mean"], rel=1e-12)
    assert prefill.prefill == report.prefill


def test_full_cache_is_one_everywhere(tiny_llama):
    model, _ = tiny_llama
    _, _, report = run(model, make_policy("full"))
    per_token = token_bytes(model)
    assert report.kept_fraction == report.mean_fraction == report.peak_fraction == 1.0
    for phase in (report.prefill, report.decode):
        assert phase.kept_fraction == phase.mean_fraction == phase.peak_fraction == 1.0
    assert report.prefill.tokens == 100 and report.decode.tokens == 10
    assert report.kv_bytes == report.kv_bytes_full == report.peak_kv_bytes == 110 * per_token
    assert report.prefill.peak_kv_bytes == 100 * per_token
    assert report.final_len == report.peak_len == [110] * model.config.num_hidden_layers


class SharedStreaming(StreamingLLM):
    """StreamingLLM whose prompt prefix can be shared (its only state is the positions it observed)."""

    fork_fields = ("_positions",)

    def fork_key(self) -> tuple:
        return ("streaming", self.budget)


def test_prefix_sharing_gives_the_same_report(tiny_llama):
    """A sequence forked from a stored prefix reports what it would have measured itself."""
    model, _ = tiny_llama
    store = PrefixStore()
    _, _, alone = run(model, SharedStreaming(budget=BUDGET))
    _, _, stored = run(model, SharedStreaming(budget=BUDGET), store)
    _, _, forked = run(model, SharedStreaming(budget=BUDGET), store)
    assert (store.misses, store.hits) == (1, 1)
    assert forked == stored == alone


def test_summary_names_both_phases(tiny_llama):
    model, _ = tiny_llama
    _, _, report = run(model, make_policy("streaming", budget=BUDGET))
    text = report.summary()
    assert "kept 30.9% at the end" in text and "peak 100.0%" in text
    assert "prefill 100 tokens, kept 24.0% at its end" in text and "decode 10 tokens" in text
    assert report.to_dict()["decode"]["tokens"] == 10
