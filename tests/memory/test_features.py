"""Streaming spectrogram + EMA against an offline torch.stft over the whole query history."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from namm.memory.features import FeatureConfig, RunningStats, StreamingSpectrogram, recency_embedding, token_features

CFG = FeatureConfig()


def offline_ema(series: torch.Tensor, cfg: FeatureConfig = CFG) -> torch.Tensor:
    """torch.stft over each key's whole series (keys, queries), zeros before query 0, then the
    closed-form EMA sum_t (1 - beta) beta^(T-1-t) S_t. Returns (keys, n_bins)."""
    padded = F.pad(series, (cfg.overlap, 0))
    n_frames = (padded.shape[1] - cfg.n_fft) // cfg.hop + 1 if padded.shape[1] >= cfg.n_fft else 0
    if n_frames == 0:
        return series.new_zeros(series.shape[0], cfg.n_bins)
    window = torch.hann_window(cfg.n_fft, periodic=True, dtype=series.dtype)
    spec = torch.stft(padded, n_fft=cfg.n_fft, hop_length=cfg.hop, win_length=cfg.n_fft, window=window,
                      center=False, onesided=True, normalized=False, return_complex=True).abs()
    beta = cfg.frame_decay
    weights = (1 - beta) * beta ** torch.arange(n_frames - 1, -1, -1, dtype=series.dtype)
    return (spec * weights).sum(-1)  # (keys, n_bins)


def chunks(total: int, chunk: int, delay: int):
    start = 0
    while start < total:
        stop = min(total, start + chunk - start % chunk, start + delay - start % delay)
        yield start, stop
        start = stop


@pytest.mark.parametrize("prune", [False, True])
@pytest.mark.parametrize("chunk", [1, 16, 48, 128, 512])
def test_streaming_equals_offline_stft(chunk: int, prune: bool) -> None:
    heads, total, delay = 2, 613, 160
    gen = torch.Generator().manual_seed(chunk + 1000 * prune)
    history = torch.rand(heads, total, total, generator=gen, dtype=torch.float64).tril()  # (heads, queries, keys)
    spec = StreamingSpectrogram(CFG)
    alive = torch.empty(heads, 0, dtype=torch.long)  # global index of each cached token, per head
    checked = 0
    for start, stop in chunks(total, chunk, delay):
        alive = torch.cat([alive, torch.arange(start, stop).expand(heads, -1)], dim=1)
        attn = history[:, start:stop, :].gather(2, alive[:, None, :].expand(heads, stop - start, -1))
        spec.observe(0, attn)
        if stop % delay == 0 or stop == total:
            for h in range(heads):
                expected = offline_ema(history[h, :stop, :].T[alive[h]])
                torch.testing.assert_close(spec.ema(0)[h], expected, rtol=1e-12, atol=1e-13)
            assert spec.rows[0].shape[1] == CFG.overlap + stop % CFG.hop  # at most 31 rows buffered
            checked += 1
            if prune and stop < total:
                n_keep = alive.shape[1] * 2 // 3
                keep = torch.stack([torch.randperm(alive.shape[1], generator=gen)[:n_keep].sort().values
                                    for _ in range(heads)])
                spec.prune(0, keep)
                alive = alive.gather(1, keep)
    assert checked == math.ceil(total / delay)


def test_new_tokens_enter_with_zero_ema_and_rows_stay_bounded() -> None:
    spec = StreamingSpectrogram(CFG)
    attn = torch.rand(3, 40, 40).tril()
    spec.observe(5, attn)
    assert spec.ema(5).shape == (3, 40, CFG.n_bins)
    grown = torch.rand(3, 1, 41)
    spec.observe(5, grown)
    assert spec.ema(5).shape == (3, 41, CFG.n_bins)
    assert spec.ema(5)[:, -1].abs().max() == 0  # 41 queries = 2 frames + 9 rows; the new token not yet in a frame
    assert spec.rows[5].shape == (3, CFG.overlap + 41 % CFG.hop, 41)
    with pytest.raises(KeyError):
        spec.ema(0)


def test_recency_embedding_values() -> None:
    positions = torch.tensor([[0, 3, 100, 40000]])
    emb = recency_embedding(positions, 8, 50000.0)
    assert emb.shape == (1, 4, 8)
    torch.testing.assert_close(emb[0, -1], torch.tensor([0.0] * 4 + [1.0] * 4))  # newest: age 0
    freqs = torch.tensor([1.0, 50000 ** -0.25, 50000 ** -0.5, 50000 ** -0.75], dtype=torch.float64)
    age = torch.tensor(40000 - 3, dtype=torch.float64)
    expected = torch.cat([(age * freqs).sin(), (age * freqs).cos()]).float()
    torch.testing.assert_close(emb[0, 1], expected)


def test_running_stats_chan_merge_matches_batch_statistics() -> None:
    data = torch.randn(1000, 17, dtype=torch.float64) * torch.arange(1, 18) + 3
    stats = RunningStats(17)
    for part in data.split([1, 10, 300, 689]):
        stats.update(part)
    torch.testing.assert_close(stats.mean, data.mean(0))
    torch.testing.assert_close(stats.var, data.var(0, unbiased=False))
    normed = stats.normalize(data, 1e-7)
    torch.testing.assert_close(normed.mean(0), torch.zeros(17, dtype=torch.float64), atol=1e-10, rtol=0)


def test_token_features_layout_and_normalisation() -> None:
    ema = torch.rand(2, 6, 17)
    positions = torch.arange(6).expand(2, 6)
    stats = RunningStats.from_mean_var(10.0, torch.full((17,), 0.5), torch.full((17,), 4.0))
    z = token_features(ema, positions, CFG, stats)
    assert z.shape == (2, 6, 25)
    torch.testing.assert_close(z[..., 8:], (ema - 0.5) / 2.0)
    torch.testing.assert_close(z[..., :8], recency_embedding(positions, 8, 50000.0))
    zero_var = RunningStats.from_mean_var(10.0, torch.zeros(17), torch.zeros(17))
    assert torch.isfinite(token_features(ema, positions, CFG, zero_var)).all()  # sigma floored at 1e-7


@pytest.mark.parametrize("kwargs", [dict(n_fft=1), dict(hop=0), dict(hop=33), dict(ema_coeff=1.0), dict(recency_dim=3)])
def test_bad_feature_config(kwargs) -> None:
    with pytest.raises(ValueError):
        FeatureConfig(**kwargs)
