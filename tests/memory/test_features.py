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


def assert_spare_slots_zero(spec: StreamingSpectrogram, layer: int) -> None:
    """Every buffer slot past the tracked tokens is zero: new tokens enter from them unwritten."""
    n = spec.ema(layer).shape[1]
    assert not spec._rows[layer][:, :, n:].any() and not spec._emas[layer][:, :, n:].any()


def check_streaming(cfg: FeatureConfig, chunk: int, prune: bool, total: int = 613, delay: int = 160) -> None:
    """Stream random attention in scheduled chunks (pruning at eviction steps); compare with torch.stft."""
    heads = 2
    gen = torch.Generator().manual_seed(chunk + 1000 * prune)
    history = torch.rand(heads, total, total, generator=gen, dtype=torch.float64).tril()  # (heads, queries, keys)
    spec = StreamingSpectrogram(cfg)
    alive = torch.empty(heads, 0, dtype=torch.long)  # global index of each cached token, per head
    checked = 0
    for start, stop in chunks(total, chunk, delay):
        alive = torch.cat([alive, torch.arange(start, stop).expand(heads, -1)], dim=1)
        attn = history[:, start:stop, :].gather(2, alive[:, None, :].expand(heads, stop - start, -1))
        spec.observe(0, attn)
        assert_spare_slots_zero(spec, 0)
        if stop % delay == 0 or stop == total:
            for h in range(heads):
                expected = offline_ema(history[h, :stop, :].T[alive[h]], cfg)
                torch.testing.assert_close(spec.ema(0)[h], expected, rtol=1e-12, atol=1e-13)
            assert spec.rows[0].shape[1] == cfg.overlap + stop % cfg.hop  # at most n_fft - 1 rows buffered
            checked += 1
            if prune and stop < total:
                n_keep = alive.shape[1] * 2 // 3
                keep = torch.stack([torch.randperm(alive.shape[1], generator=gen)[:n_keep].sort().values
                                    for _ in range(heads)])
                spec.prune(0, keep)
                alive = alive.gather(1, keep)
    assert checked == math.ceil(total / delay)


@pytest.mark.parametrize("prune", [False, True])
@pytest.mark.parametrize("chunk", [1, 16, 48, 128, 512])
def test_streaming_equals_offline_stft(chunk: int, prune: bool) -> None:
    check_streaming(CFG, chunk, prune)


@pytest.mark.parametrize("cfg", [FeatureConfig(n_fft=16, hop=16), FeatureConfig(n_fft=32, hop=8)], ids=["no-overlap", "hop8"])
@pytest.mark.parametrize("chunk", [7, 128])
def test_streaming_other_stft_shapes(cfg: FeatureConfig, chunk: int) -> None:
    check_streaming(cfg, chunk, prune=True, total=300)


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


# -- partial frame: the queries since the last complete frame count when scoring --------------
def question_attention(keys: int = 10, context: int = 64, question: int = 5) -> torch.Tensor:
    """(1, context + question, keys): uniform context attention, then every question query
    attends only to key 2 (key 3 gets nothing from the question)."""
    attn = torch.full((1, context + question, keys), 1.0 / keys, dtype=torch.float64)
    attn[:, context:] = 0.0
    attn[:, context:, 2] = 1.0
    return attn


def test_partial_frame_is_the_next_frame_zero_padded() -> None:
    history = torch.rand(2, 70, 70, generator=torch.Generator().manual_seed(0), dtype=torch.float64).tril()
    spec = StreamingSpectrogram(CFG)
    for start, stop in [(0, 32), (32, 64), (64, 70)]:
        spec.observe(0, history[:, start:stop, :stop])
    assert spec.pending(0) == 6
    padded = F.pad(history, (0, 0, 0, CFG.hop - 6))  # the 10 queries still to come: zeros
    for h in range(2):
        torch.testing.assert_close(spec.scoring_ema(0)[h], offline_ema(padded[h].T), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(spec.ema(0)[h], offline_ema(history[h].T), rtol=1e-12, atol=1e-13)
    on_grid = StreamingSpectrogram(CFG)
    on_grid.observe(0, history[:, :64, :64])
    scored = on_grid.scoring_ema(0)  # on the grid: the state itself, no copy
    assert on_grid.pending(0) == 0 and scored.data_ptr() == on_grid.ema(0).data_ptr()
    assert torch.equal(scored, on_grid.ema(0))


@pytest.mark.parametrize("partial_frame", [True, False])
def test_question_attention_changes_scored_features(partial_frame: bool) -> None:
    spec = StreamingSpectrogram(FeatureConfig(partial_frame=partial_frame))
    spec.observe(0, question_attention())  # 69 queries: 4 frames + 5 question rows pending
    scored = spec.scoring_ema(0)[0]  # (keys, n_bins)
    assert torch.equal(spec.ema(0)[0, 2], spec.ema(0)[0, 3])  # the state does not see the question
    if partial_frame:
        # DC bin: (1 - beta) * sum of the window over the 5 question rows = 0.1485 * 4.72
        window = torch.hann_window(32, periodic=True, dtype=torch.float64)
        gap = (1 - CFG.frame_decay) * window[16:21].sum()
        torch.testing.assert_close(scored[2, 0] - scored[3, 0], gap, rtol=1e-12, atol=0)
        assert gap > 0.69
    else:
        assert torch.equal(scored[2], scored[3])


def test_partial_frame_is_counted_once() -> None:
    attn = torch.rand(2, 96, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64).tril()
    peeked, plain = StreamingSpectrogram(CFG), StreamingSpectrogram(CFG)
    for start, stop in [(0, 40), (40, 70), (70, 96)]:  # 70: 6 rows pending, completed by the next call
        for spec in (peeked, plain):
            spec.observe(0, attn[:, start:stop, :stop])
        peeked.scoring_ema(0)
        peeked.scoring_ema(0)
    assert torch.equal(peeked.ema(0), plain.ema(0)) and torch.equal(peeked.rows[0], plain.rows[0])
    for h in range(2):
        torch.testing.assert_close(peeked.ema(0)[h], offline_ema(attn[h].T), rtol=1e-12, atol=1e-13)


def test_partial_frame_saved_with_the_namm(tmp_path) -> None:
    import json

    from namm.memory.model import NAMM, NAMMConfig

    NAMM(NAMMConfig(features=FeatureConfig(partial_frame=False))).save_pretrained(tmp_path)
    assert NAMM.from_pretrained(tmp_path).config.features.partial_frame is False
    meta = json.loads((tmp_path / "config.json").read_text())
    del meta["features"]["partial_frame"]  # a config.json written before the option existed
    (tmp_path / "config.json").write_text(json.dumps(meta))
    # it was evolved without partial frames, so it runs without them (trained = evaluated)
    assert NAMM.from_pretrained(tmp_path).config.features == FeatureConfig(partial_frame=False)


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


@pytest.mark.parametrize("kwargs", [dict(n_fft=1), dict(hop=0), dict(hop=33), dict(ema_coeff=1.0), dict(recency_dim=3),
                                    dict(partial_frame="yes")])
def test_bad_feature_config(kwargs) -> None:
    with pytest.raises(ValueError):
        FeatureConfig(**kwargs)
