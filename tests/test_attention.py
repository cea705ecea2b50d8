"""The engine's eager attention: grouped queries against un-repeated K and V."""

from __future__ import annotations

import pytest
import torch

import namm.attention as attention_module
from namm.attention import LayerHook, _eager, _eager_read, held_slots, visible_mask


def repeated_reference(query, key, value, mask, scaling, softcap, groups):
    """Attention the plain way (the engine's code before issue 9): K and V repeated per query
    head, a masked copy of the scores, softmax in fp32."""
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    scores = query @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.float32)  # (1, Hq, q, K)
    return probs.to(value.dtype) @ v, probs


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_grouped_eager_equals_repeated_kv(groups: int, softcap: float | None, window: int | None) -> None:
    gen = torch.Generator().manual_seed(groups)
    kv_heads, q_len, kv_len, dim = 2, 7, 19, 8
    # queries as the model hands them: (1, q, Hq, d) transposed, not contiguous
    query = torch.randn(1, q_len, kv_heads * groups, dim, generator=gen, dtype=torch.float64).transpose(1, 2)
    key = torch.randn(1, kv_heads, kv_len, dim, generator=gen, dtype=torch.float64)
    value = torch.randn(1, kv_heads, kv_len, dim, generator=gen, dtype=torch.float64)
    mask = visible_mask(q_len, kv_len, window, query.device)
    out, probs = _eager(query, key, value, 0.35, softcap, groups, window)
    ref_out, ref_probs = repeated_reference(query, key, value, mask, 0.35, softcap, groups)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    assert probs.dtype == torch.float32 and probs.shape == (1, kv_heads, groups, q_len, kv_len)
    averaged = ref_probs[0].view(kv_heads, groups, q_len, kv_len).mean(dim=1)  # what the policy is handed
    torch.testing.assert_close(probs[0].mean(dim=1), averaged, rtol=0, atol=1e-7)
    assert probs[0, :, :, 0, kv_len - q_len + 1 :].abs().max() == 0  # causal: the first query sees no later key
    if window is not None:
        assert probs[0, :, :, -1, : kv_len - window].abs().max() == 0  # outside the sliding window


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("ragged", [False, True])
def test_tiled_read_equals_eager(monkeypatch, dtype, groups: int, softcap: float | None, ragged: bool) -> None:
    """The policy's attention read, one KV head and a run of queries at a time in reused scratch
    buffers, gives the output and the group-averaged fp32 attention of one untiled eager pass."""
    gen = torch.Generator().manual_seed(groups + 7 * ragged)
    kv_heads, q_len, kv_len, dim = 2, 37, 61, 8
    query = torch.randn(1, q_len, kv_heads * groups, dim, generator=gen).to(dtype).transpose(1, 2)
    key = torch.randn(1, kv_heads, kv_len, dim, generator=gen).to(dtype)
    value = torch.randn(1, kv_heads, kv_len, dim, generator=gen).to(dtype)
    held = held_slots(torch.tensor([0, 5]), kv_len) if ragged else None
    ref_out, ref_probs = _eager(query, key, value, 0.35, softcap, groups, held=held)
    hook = LayerHook(managed=frozenset({0}), observe=lambda *a, **k: None)
    row_bytes = groups * kv_len * 4
    # one untiled pass; one tile per head; tiles of 16 queries (16, 16 and 5 rows)
    for tile_rows, untiled_bytes in ((q_len, 1 << 20), (q_len, 0), (16, 0)):
        monkeypatch.setattr(attention_module, "TILE_BYTES", tile_rows * row_bytes)
        monkeypatch.setattr(attention_module, "UNTILED_BYTES", untiled_bytes)
        out, attn = _eager_read(query, key, value, 0.35, softcap, groups, held, hook)
        assert out.dtype == dtype and out.shape == (1, kv_heads * groups, q_len, dim)
        assert attn.dtype == torch.float32 and attn.shape == (kv_heads, q_len, kv_len)
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
        torch.testing.assert_close(attn, ref_probs[0].mean(dim=1), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(attn.sum(-1), torch.ones(kv_heads, q_len))
        assert attn[:, 0, kv_len - q_len + 1 :].abs().max() == 0  # causal in every tile
        if ragged:
            assert attn[1, :, :5].abs().max() == 0  # head 1's padded slots get nothing
    scores = hook.workspace["scores"]
    _eager_read(query, key, value, 0.35, softcap, groups, held, hook)
    assert hook.workspace["scores"] is scores  # the scratch is reused, not reallocated
