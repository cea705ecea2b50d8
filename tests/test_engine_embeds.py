"""Embedding inputs (``MemorySequence.feed(embeds=...)``) run through the same chunks, positions,
policy calls and evictions as token ids: the engine invariants, checked on inputs_embeds."""

from __future__ import annotations

import pytest
import torch
from test_engine import DropRandom, reference_masks

from namm.engine import Engine, EngineConfig
from namm.models import tiny_model
from namm.policies import make_policy
from namm.prefix import PrefixStore


def _feed_all(engine: Engine, policy, inputs: dict, n_prompt: int, steps: int = 3):
    """Read a prompt, then feed ``steps`` more rows one call at a time; logits of every row."""
    key, values = next(iter(inputs.items()))
    with engine.running():
        seq = engine.start(policy)
        out = [seq.feed(**{key: values[:n_prompt]}, all_logits=True, end_of_prompt=True)]
        for i in range(n_prompt, n_prompt + steps):
            out.append(seq.feed(**{key: values[i : i + 1]}, all_logits=True))
    return torch.cat(out), seq


@pytest.mark.parametrize("policy", [None, "drop", "h2o"])
def test_embeddings_of_the_ids_give_the_ids_logits_bit_for_bit(policy):
    """The token path is the embedding path with the lookup done first: same logits, same evictions."""
    model, _ = tiny_model("llama", seed=7)
    ids = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(0))
    embeds = model.get_input_embeddings()(ids).detach()
    config = EngineConfig(chunk_size=32, delay=48, record_evictions=True)

    def make():
        return {None: None, "drop": DropRandom(), "h2o": make_policy("h2o", keep_ratio=0.3)}[policy]

    by_ids, seq_ids = _feed_all(Engine(model, config=config), make(), {"ids": ids}, 140, steps=10)
    by_embeds, seq_embeds = _feed_all(Engine(model, config=config), make(), {"embeds": embeds}, 140, steps=10)
    assert torch.equal(by_ids, by_embeds)
    assert [s for s, _ in seq_ids.eviction_log] == [s for s, _ in seq_embeds.eviction_log] == [48, 96, 140, 144]
    for (_, kept_ids), (_, kept_embeds) in zip(seq_ids.eviction_log, seq_embeds.eviction_log):
        assert all(torch.equal(kept_ids[layer], kept_embeds[layer]) for layer in kept_ids)
    assert seq_embeds.report().to_dict() == seq_ids.report().to_dict()


def test_keep_all_embeddings_equal_the_plain_forward():
    model, _ = tiny_model("qwen3", seed=8)
    embeds = torch.randn(1, 130, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(inputs_embeds=embeds).logits[0]
    engine = Engine(model, chunk_size=32, delay=64)
    with engine.running():
        got = engine.start().feed(embeds=embeds, all_logits=True)  # (1, n, hidden) accepted
    assert (got - ref).abs().max().item() < 1e-4


def test_eviction_of_embeddings_is_masking():
    """Arbitrary embeddings (no vocabulary behind them), tokens dropped while they are read and
    afterwards: the logits of a 4-D masked plain forward (fp64), with absolute positions."""
    model, _ = tiny_model("llama", seed=9, dtype=torch.float64)
    n_prompt, steps = 120, 40
    embeds = torch.randn(n_prompt + steps, model.config.hidden_size, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(2))
    engine = Engine(model, config=EngineConfig(chunk_size=16, delay=32, record_evictions=True))
    logits, seq = _feed_all(engine, DropRandom(share=True), {"embeds": embeds}, n_prompt, steps)
    n = n_prompt + steps
    assert seq.seen == n and [s for s, _ in seq.eviction_log] == [32, 64, 96, 120, 128, 160]
    visible = reference_masks(seq, seq.spec, n, None, set())[0][0]  # the same tokens in every layer and head
    mask = torch.zeros(1, 1, n, n, dtype=torch.float64).masked_fill(~visible, torch.finfo(torch.float64).min)
    with torch.no_grad():
        ref = model(inputs_embeds=embeds[None], attention_mask=mask).logits[0]
        plain = model(inputs_embeds=embeds[None]).logits[0]
    assert (logits - ref).abs().max().item() < 1e-6
    assert (plain[64:] - ref[64:]).abs().max().item() > 1e-3  # the evictions matter
    positions = seq.positions[0]
    assert positions[:, -1].tolist() == [n - 1] * seq.spec.kv_heads  # absolute, not the cache length
    assert seq.cache.layers[0].keys.shape[2] == positions.shape[1] < n  # the cache really shrank


def test_embedding_inputs_refuse_what_needs_token_ids():
    model, tok = tiny_model("llama", seed=10)
    embeds = torch.randn(40, model.config.hidden_size)
    engine = Engine(model, tok, chunk_size=16, delay=32)
    with engine.running():
        with pytest.raises(ValueError, match="token ids"):
            engine.start(make_policy("kvzip", keep_ratio=0.5)).feed(embeds=embeds)
        with pytest.raises(ValueError, match="Prefix sharing"):
            engine.start().feed(embeds=embeds, prefix_store=PrefixStore())
        with pytest.raises(ValueError, match=r"\(n, 64\)"):
            engine.start().feed(embeds=torch.randn(40, 32))
        with pytest.raises(ValueError, match="not both"):
            engine.start().feed(torch.tensor([1, 2]), embeds=embeds)
        with pytest.raises(ValueError, match="needs token ids or embeds"):
            engine.start().feed()
