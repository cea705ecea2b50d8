"""Expected Attention's RoPE handling on real (tiny) models: queries rotated back with the
model's own rotary embedding no longer depend on position."""

from __future__ import annotations

import pytest
import torch

from namm.engine import Engine, EngineConfig
from namm.models import tiny_model
from namm.policies import MemoryPolicy, make_policy
from namm.policies.expected_attention import unrotate

MODELS = {
    "llama": {},
    "qwen3": {},  # q_norm before RoPE
    "phi3": {"partial_rotary_factor": 0.5},  # RoPE on half of each head
    "gemma3": {"layer_types": ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]},
}


class Capture(MemoryPolicy):
    """Records the first managed layer's queries and values as the engine hands them over."""

    needs_queries = needs_values = True

    def reset(self, spec):
        self.spec, self.calls = spec, []

    def observe(self, layer, attn, keys, positions, queries=None, values=None):
        if layer == self.spec.managed_layers[0]:
            assert values.shape == keys.shape
            self.calls.append((queries, positions[0, -queries.shape[2]:]))


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_unrotated_queries_do_not_depend_on_position(arch: str) -> None:
    """In layer 0 a token's query depends on the token alone (embedding, norm, projection): after
    rotating back with ``CacheSpec.rope``, token 7 at positions 1, 30 and 61 gives one query."""
    model, tok = tiny_model(arch, seed=0, **MODELS[arch])
    engine = Engine(model, tok, config=EngineConfig(chunk_size=32, delay=64))
    ids = torch.randint(10, 256, (64,), generator=torch.Generator().manual_seed(0))
    ids[[1, 30, 61]] = 7
    policy = Capture()
    with engine.running():
        seq = engine.start(policy)
        seq.feed(ids)
    assert seq.spec.managed_layers[0] == 0
    queries = torch.cat([q for q, _ in policy.calls], dim=2)  # (kv_heads, groups, 64, d)
    positions = torch.cat([p for _, p in policy.calls])
    assert torch.equal(positions, torch.arange(64))
    pre = unrotate(queries.double(), *(x.double() for x in seq.spec.rope(positions)))
    same = pre[:, :, [1, 30, 61]]
    assert not torch.allclose(queries[:, :, 1], queries[:, :, 30], atol=1e-3)  # RoPE did move them
    torch.testing.assert_close(same[:, :, 1:], same[:, :, :1].expand_as(same[:, :, 1:]), atol=2e-5, rtol=1e-4)


def test_under_the_engine_with_the_whole_prompt_cached(tiny_llama) -> None:
    """One-shot compression at the end of the prompt (kvpress's prefill setting) keeps the budget
    and the sinks."""
    model, tok = tiny_llama
    engine = Engine(model, tok, config=EngineConfig(chunk_size=32, delay=64, evict_during_prefill=False,
                                                    record_evictions=True))
    with engine.running():
        seq = engine.start(make_policy("expected_attention", budget=40))
        seq.feed(torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(0)), end_of_prompt=True)
    (seen, kept), = seq.eviction_log
    assert seen == 150
    for positions in kept.values():
        assert positions.shape == (2, 40) and bool((positions[:, :4] == torch.arange(4)).all())
