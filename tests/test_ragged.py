"""Ragged layers: KV heads of a layer keeping different numbers of tokens.

The cache is padded to the longest head and the padding is masked: the logits must equal those of
the full model run with a mask that hides, per KV head, exactly the tokens that head dropped (a
physically pruned per-head cache), in fp64, through both attention paths (fused SDPA and the eager
path that hands attention to the policy), with GQA and with sliding-window layers.
"""

from __future__ import annotations

import pytest
import torch
from test_engine import masked_reference_logits, run_with_logits

from namm.engine import Engine, EngineConfig
from namm.models import tiny_model
from namm.policies.base import CacheSpec, MemoryPolicy, ragged_indices


class RaggedRandom(MemoryPolicy):
    """Test policy: each KV head keeps its own seeded random 30-90% of the tokens it holds."""

    def __init__(self, needs_attention: bool = False, seed: int = 0):
        self.needs_attention, self.seed = needs_attention, seed

    def reset(self, spec: CacheSpec) -> None:
        self.spec = spec
        self.gen = torch.Generator().manual_seed(self.seed)
        self.positions: dict[int, torch.Tensor] = {}
        self.attn: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (layer, positions, attn)

    def observe(self, layer, attn, keys, positions):
        self.positions[layer] = positions
        if attn is not None:
            self.attn.append((layer, positions.clone(), attn.clone()))

    def select(self, layer):
        held = self.positions[layer] >= 0  # padding (position -1) is never kept
        keep = torch.zeros_like(held)
        for h in range(self.spec.kv_heads):
            slots = held[h].nonzero().squeeze(-1)
            share = 0.3 + 0.6 * torch.rand((), generator=self.gen).item()
            n = max(1, int(share * slots.numel()))
            keep[h, slots[torch.randperm(slots.numel(), generator=self.gen)[:n]]] = True
        return ragged_indices(keep)


def per_head_masks(seq, n: int, window: int | None) -> dict[int, torch.Tensor]:
    """Per layer, (kv_heads, n, n) bool: what each query of each head sees, from the eviction log
    (kept positions per head, -1 entries being padding), i.e. a physically pruned per-head cache."""
    spec = seq.spec
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    masks = {}
    for layer in range(spec.num_layers):
        mask = causal.expand(spec.kv_heads, n, n).clone()
        if layer not in spec.managed_layers:
            dist = torch.arange(n)[:, None] - torch.arange(n)[None, :]
            masks[layer] = mask & (dist < window)
            continue
        for step, kept in seq.eviction_log:
            for h, row in enumerate(kept[layer]):
                alive = torch.zeros(n, dtype=torch.bool)
                alive[row[row >= 0]] = True
                alive[step:] = True
                mask[h, step:, :] &= alive[None, :]  # queries after the step lose that head's dropped keys
        masks[layer] = mask
    return masks


@pytest.mark.parametrize("arch,needs_attention",
                         [("llama", False), ("llama", True), ("qwen3", False), ("gemma3", True)])
def test_ragged_cache_equals_per_head_masking(arch, needs_attention):
    model, _ = tiny_model(arch, seed=3, dtype=torch.float64)
    prompt = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(2))
    engine = Engine(model, config=EngineConfig(chunk_size=32, delay=64, record_evictions=True))
    logits, tokens, seq = run_with_logits(engine, RaggedRandom(needs_attention), prompt, n_decode=70)
    assert [s for s, _ in seq.eviction_log] == [64, 128, 192, 200, 256]
    assert any((kept[layer] < 0).any() for _, kept in seq.eviction_log for layer in kept), "no ragged step"
    window = getattr(model.config, "sliding_window", None)
    ref = masked_reference_logits(model, tokens, per_head_masks(seq, tokens.numel(), window))
    assert (logits - ref).abs().max().item() < 1e-6
    with torch.no_grad():  # not trivially equal: the unmasked model differs
        plain = model(tokens[None]).logits[0]
    assert (plain[128:] - ref[128:]).abs().max().item() > 1e-3


def test_padding_is_stored_masked_and_not_counted(tiny_llama):
    model, _ = tiny_llama
    policy = RaggedRandom(needs_attention=True, seed=1)
    engine = Engine(model, config=EngineConfig(chunk_size=32, delay=64, record_evictions=True))
    with engine.running():
        seq = engine.start(policy)
        seq.feed(torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(0)), end_of_prompt=True)
        for token in range(5):
            seq.feed(torch.tensor([token]))
    spec = seq.spec
    (_, last), = seq.eviction_log[-1:]
    per_head = [[int((row >= 0).sum()) for row in last[layer]] for layer in spec.managed_layers]
    assert any(len(set(counts)) > 1 for counts in per_head)
    for layer, counts in zip(spec.managed_layers, per_head):
        positions = seq.positions[layer]
        width = max(counts) + 5  # padded to the longest head, then the 5 decoded tokens
        assert seq.cache.layers[layer].keys.shape == (1, spec.kv_heads, width, spec.head_dim)
        assert positions.shape == (spec.kv_heads, width)
        for h, n in enumerate(counts):  # each head: its padding at -1, then its tokens ascending
            assert (positions[h, : width - 5 - n] == -1).all()
            real = positions[h, width - 5 - n :]
            assert torch.equal(real[:n], last[layer][h, -n:]) and (real.diff() > 0).all()
            assert real[-5:].tolist() == list(range(150, 155))
    report = seq.report()
    assert report.head_len == [[n + 5 for n in counts] for counts in per_head]
    assert report.final_len == [sum(counts) / len(counts) + 5 for counts in per_head]
    assert report.kept_fraction == pytest.approx(sum(report.final_len) / (3 * 155))
    width_sum = sum(seq.cache.layers[layer].keys.shape[2] for layer in spec.managed_layers)
    assert report.kv_bytes == width_sum * spec.kv_heads * spec.head_dim * 2 * 4  # the padding is stored
    assert report.kv_bytes < report.kv_bytes_full
    # after the step at 128, every query gives the padding zero attention and the rest sums to 1
    checked = 0
    for layer, positions, attn in policy.attn:
        pad = positions < 0  # (kv_heads, cache_len)
        if pad.any():
            assert (attn.masked_select(pad[:, None, :].expand_as(attn)) == 0).all()
            torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)))
            checked += 1
    assert checked > 0


def test_bad_ragged_indices_are_reported(tiny_llama):
    model, _ = tiny_llama

    class Broken(RaggedRandom):
        def select(self, layer):
            n = self.positions[layer].shape[1]
            return torch.tensor([[0, -1, 2], [n - 3, n - 2, n - 1]])  # padding after a kept token

    engine = Engine(model, chunk_size=32, delay=32)
    with pytest.raises(RuntimeError, match="led by -1"):
        with engine.running():
            engine.start(Broken()).feed(torch.randint(0, 256, (40,)))
