"""Threshold and budget selection (namm-algorithm.md section 4)."""

from __future__ import annotations

import pytest
import torch

from namm.memory.selection import budget_select, threshold_select


def test_threshold_keeps_max_count_over_heads() -> None:
    scores = torch.tensor([
        [0.5, -1.0, 0.0, -0.2, -3.0, -9.0],  # s >= 0: idx 0, 2 and the newest -> 3
        [-1.0, -2.0, -0.5, -0.1, -4.0, -9.0],  # only the newest -> 1, tops up with best negatives
    ])
    keep = threshold_select(scores)
    assert keep.shape == (2, 3)  # max_h #(s >= 0) = 3
    assert keep[0].tolist() == [0, 2, 5]  # score exactly 0 is kept
    assert keep[1].tolist() == [2, 3, 5]  # newest forced in, then the two best negatives, ascending


def test_all_nonnegative_keeps_everything_and_newest_always_kept() -> None:
    assert threshold_select(torch.zeros(4, 9)).tolist() == [list(range(9))] * 4
    keep = threshold_select(torch.full((3, 10), -5.0))
    assert keep.tolist() == [[9]] * 3


def test_random_scores_invariants() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randn(4, 50, generator=gen) - 0.5
        keep = threshold_select(scores)
        assert (keep[:, -1] == 49).all()
        assert (keep[:, 1:] > keep[:, :-1]).all()
        forced = scores.clone()
        forced[:, -1] = float("inf")
        assert keep.shape[1] == int((forced >= 0).sum(-1).max())
        for h in range(4):  # each head keeps its highest scores
            kept = forced[h, keep[h]]
            dropped = forced[h, [i for i in range(50) if i not in keep[h].tolist()]]
            assert dropped.numel() == 0 or kept.min() >= dropped.max()


def test_max_cache_cap() -> None:
    scores = torch.arange(20.0).expand(2, 20).clone()
    keep = threshold_select(scores, max_cache=5)
    assert keep.tolist() == [[15, 16, 17, 18, 19]] * 2
    mixed = torch.tensor([[1.0, 2.0, -1.0, -1.0, 0.0], [-1.0, -1.0, -1.0, -1.0, 0.0]])
    assert threshold_select(mixed, max_cache=3).tolist() == [[0, 1, 4], [0, 1, 4]]  # cap, newest, then ties oldest
    assert threshold_select(mixed, max_cache=10).shape == (2, 3)  # cap above N: plain threshold
    with pytest.raises(ValueError):
        threshold_select(mixed, max_cache=0)


def test_threshold_shift_and_nan() -> None:
    scores = torch.tensor([[0.2, 0.6, float("nan"), 0.1]])
    assert threshold_select(scores, threshold=0.5).tolist() == [[1, 3]]
    assert threshold_select(scores).tolist() == [[0, 1, 3]]  # NaN counts as below


def test_budget_select() -> None:
    scores = torch.tensor([[3.0, 1.0, 2.0, -5.0], [0.0, 9.0, 8.0, -5.0]])
    assert budget_select(scores, 2).tolist() == [[0, 3], [1, 3]]
    assert budget_select(scores, 10).shape == (2, 4)
