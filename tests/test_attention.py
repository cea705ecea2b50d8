"""The engine's eager attention: grouped queries against un-repeated K and V."""

from __future__ import annotations

import pytest
import torch

from namm.attention import _eager, visible_mask


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
