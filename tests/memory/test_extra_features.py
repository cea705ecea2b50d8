"""Extra NAMM inputs: streamed attention statistics against a direct computation, norms, edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from namm.memory.extra_features import EXTRA_FEATURES, AttentionMoments, a_log_a, extra_features, relative_log_norm

G = 0.99


def direct(series: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistics of each key's whole series (keys, T) with weights w_i = (1 - G) G^(T-1-i)."""
    n = series.shape[1]
    age = torch.arange(n - 1, -1, -1, dtype=series.dtype)
    w = (1 - G) * G**age
    total = float(w.sum())
    mean = (series * w).sum(1) / total
    var = (series**2 * w).sum(1) / total - mean**2
    mass = series * w  # (keys, T)
    p = mass / mass.sum(1, keepdim=True).clamp_min(1e-300)  # an unattended key: all zeros, entropy 0
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(1)
    peak = (series * G**age).amax(1)
    return {"mean": mean, "variance": var, "entropy": entropy, "peak": peak,
            "accumulated": series.sum(1), "last": series[:, -1]}


@pytest.mark.parametrize("chunks", [(1,), (7,), (64,), (64, 1, 1, 1, 7)], ids=["1", "7", "64", "prefill+decode"])
def test_streaming_equals_direct_with_pruning(chunks: tuple[int, ...]) -> None:
    """Chunks of 1 take the decoding step's own update (``_fold_one``); mixed schedules alternate."""
    heads, total = 2, 300
    gen = torch.Generator().manual_seed(sum(chunks))
    history = torch.rand(heads, total, total, generator=gen, dtype=torch.float64).tril()  # (heads, q, k)
    history[:, :, 5] = 0.0  # a key nobody attends (entropy 0 while it survives)
    moments = AttentionMoments(G)
    alive = torch.empty(heads, 0, dtype=torch.long)
    start, step = 0, 0
    while start < total:
        stop = min(total, start + chunks[step % len(chunks)], (start // 100 + 1) * 100)
        step += 1
        alive = torch.cat([alive, torch.arange(start, stop).expand(heads, -1)], dim=1)
        moments.observe(0, history[:, start:stop].gather(2, alive[:, None, :].expand(heads, stop - start, -1)))
        n = alive.shape[1]  # slots past the tracked tokens stay zero: new tokens enter from them unwritten
        assert not moments._buffers[0][:, :, n:].any() and not moments._pending[0][:, :, n:].any()
        if stop % 100 == 0 or stop == total:
            for h in range(heads):
                expected = direct(history[h, :stop].T[alive[h]])
                for stat, value in expected.items():
                    torch.testing.assert_close(getattr(moments, stat)(0)[h], value, rtol=1e-9, atol=1e-12)
            if stop < total:  # evict a random half of each head's tokens
                keep = torch.stack([torch.randperm(alive.shape[1], generator=gen)[: alive.shape[1] // 2].sort().values
                                    for _ in range(heads)])
                moments.prune(0, keep)
                alive = alive.gather(1, keep)
        start = stop


def test_decoding_rows_stored_then_folded_match_direct_across_a_prune() -> None:
    """A decoding step's attention is stored and folded later (at 16 rows, a read or a prune): a
    prune straight after some stored rows, then more rows, still gives the direct statistics."""
    heads, total = 2, 60
    gen = torch.Generator().manual_seed(3)
    history = torch.rand(heads, total, total, generator=gen, dtype=torch.float64).tril()
    moments = AttentionMoments(G)
    moments.observe(0, history[:, :40, :40])  # a prefill chunk
    for t in range(40, 45):  # five decoding steps, stored
        moments.observe(0, history[:, t : t + 1, : t + 1])
    keep = torch.tensor([[0, 3, 10, 41, 44], [1, 2, 39, 42, 43]])
    moments.prune(0, keep)  # no read before it: the stored rows must be folded first
    alive = keep
    for t in range(45, total):  # fifteen more: one full buffer of 16 is never reached after the prune
        alive = torch.cat([alive, torch.full((heads, 1), t)], dim=1)
        moments.observe(0, history[:, t : t + 1].gather(2, alive[:, None, :]))
    for h in range(heads):
        expected = direct(history[h, :total].T[alive[h]])
        for stat, value in expected.items():
            torch.testing.assert_close(getattr(moments, stat)(0)[h], value, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_a_log_a_equals_xlogy(dtype: torch.dtype) -> None:
    """The vectorised a log a matches torch.xlogy(a, a): 0 log 0 = 0, denormals, 1, the tensor
    left unchanged."""
    tiny = torch.finfo(dtype).tiny
    a = torch.cat([torch.tensor([0.0, tiny / 4, tiny, 1e-30, 0.5, 1.0]),
                   torch.rand(500, generator=torch.Generator().manual_seed(3))]).to(dtype)
    before = a.clone()
    got, want = a_log_a(a), torch.xlogy(a.double(), a.double())
    assert torch.equal(a, before)
    assert got.dtype == dtype and got[0] == 0.0 and got[5] == 0.0
    assert torch.allclose(got.double(), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-30)
    assert got[1].abs() < 1e-36  # below the smallest normal number: off by < 1e-36 from xlogy


def test_entropy_and_peak_on_simple_patterns() -> None:
    n = 200
    attn = torch.zeros(1, n, 3, dtype=torch.float64)  # (heads, queries, keys)
    attn[0, :, 0] = 0.5  # key 0: every query, equally
    attn[0, 150, 1] = 0.8  # key 1: one query, 49 queries ago
    moments = AttentionMoments(G)
    moments.observe(0, attn)
    w = (1 - G) * G ** torch.arange(n - 1, -1, -1, dtype=torch.float64)
    p = w / w.sum()
    entropy = moments.entropy(0)[0]
    assert float(entropy[0]) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-9)  # spread of the weights
    assert float(entropy[1]) == pytest.approx(0.0, abs=1e-9)  # a single query
    assert float(entropy[2]) == 0.0  # never attended
    assert float(moments.peak(0)[0, 1]) == pytest.approx(0.8 * G**49, rel=1e-12)
    assert float(moments.variance(0)[0, 0]) == pytest.approx(0.0, abs=1e-12)
    assert float(moments.mean(0)[0, 0]) == pytest.approx(0.5, rel=1e-12)


def test_relative_log_norm_is_scale_free() -> None:
    keys = torch.tensor([[[3.0, 4.0], [0.0, 5.0], [0.0, 10.0]]])  # norms 5, 5, 10; mean 20/3
    expected = torch.tensor([[math.log(0.75), math.log(0.75), math.log(1.5)]])
    torch.testing.assert_close(relative_log_norm(keys), expected)
    torch.testing.assert_close(relative_log_norm(keys * 1000), expected)


def test_extra_features_stack_in_order() -> None:
    gen = torch.Generator().manual_seed(0)
    heads, n, d = 3, 40, 8
    keys, values = torch.randn(heads, n, d, generator=gen), torch.randn(heads, n, d, generator=gen)
    moments = AttentionMoments()
    moments.observe(2, torch.softmax(torch.randn(heads, n, n, generator=gen), -1).tril())
    out = extra_features(EXTRA_FEATURES, moments, 2, keys, values)
    assert out.shape == (heads, n, len(EXTRA_FEATURES)) and torch.isfinite(out).all()
    torch.testing.assert_close(out[..., 0], relative_log_norm(values))
    torch.testing.assert_close(out[..., 1], relative_log_norm(keys))
    torch.testing.assert_close(out[..., 3], moments.entropy(2))
    torch.testing.assert_close(out[..., 5], (moments.accumulated(2) + 1e-10).log())
    torch.testing.assert_close(out[..., 6], (moments.last(2) + 1e-10).log())
    swapped = extra_features(["attn_peak", "key_norm"], moments, 2, keys, values)
    torch.testing.assert_close(swapped, out[..., [4, 1]])
    with pytest.raises(ValueError, match="Unknown extra features"):
        extra_features(["bogus"], moments, 2, keys, values)
    with pytest.raises(ValueError, match="ema_coeff"):
        AttentionMoments(1.0)
