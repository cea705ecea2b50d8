"""PyramidKV: SnapKV with budgets that fall linearly with depth."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from namm.policies.snapkv import SnapKV


def pyramid_budgets(budget: int, window: int, n_layers: int, beta: float, seen: int) -> list[int]:
    """Tokens kept by each managed layer, bottom first; they sum to ``n_layers * budget``.

    Beyond the window, the top layer gets 1/beta of the uniform share and the bottom layer
    2 - 1/beta of it, linear in between; the bottom layer never gets more than has been seen,
    and below ``2 * (budget - window)`` tokens seen every layer gets ``budget`` (the reference
    code's fallback). Rounding hands the leftover tokens to the largest remainders.
    """
    share = budget - window
    if n_layers == 1 or share <= 0 or seen < 2 * share:
        return [budget] * n_layers
    top = share / beta
    bottom = min(2 * share - top, seen - window)
    top = 2 * share - bottom
    exact = [bottom - (bottom - top) * i / (n_layers - 1) for i in range(n_layers)]
    floors = [math.floor(b) for b in exact]
    by_remainder = sorted(range(n_layers), key=lambda i: floors[i] - exact[i])  # stable
    for i in by_remainder[: n_layers * share - sum(floors)]:
        floors[i] += 1
    return [b + window for b in floors]


@dataclass
class PyramidKV(SnapKV):
    """SnapKV scoring with a pyramid of per-layer budgets: lower layers keep more, higher layers
    less, the total equal to the uniform budget times the managed layers. Cai et al., "PyramidKV:
    Dynamic KV Cache Compression based on Pyramidal Information Funneling", arXiv 2406.02069
    (beta = 20: the top layer keeps 1/20 of the uniform share beyond the window).

    ``budget`` / ``keep_ratio`` give the mean per-layer budget. A layer that holds fewer tokens
    than its share (possible right after the schedule grows) keeps them all.
    """

    beta: float = 20.0
    name = "pyramidkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not float(self.beta) >= 1.0:
            raise ValueError(f"beta must be >= 1 (1 is uniform), got {self.beta!r}.")

    def keep_count(self, layer: int, positions: torch.Tensor) -> int:
        seen = self.tokens_seen(positions)
        managed = self.spec.managed_layers
        budgets = pyramid_budgets(self.n_keep(seen, seen), self.window, len(managed), float(self.beta), seen)
        return max(1, min(positions.shape[-1], budgets[managed.index(layer)]))
