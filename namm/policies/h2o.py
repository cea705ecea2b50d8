"""H2O: heavy hitters (most attention received so far) plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from namm.policies.base import CacheSpec
from namm.policies.ranked import RankedPolicy, pad_to, protect


@dataclass
class H2O(RankedPolicy):
    """Keep the tokens with the largest attention accumulated over every query so far (prefill
    chunks and decoded tokens alike), plus the most recent ``recent_ratio`` of the budget; evicts
    again at every eviction step of decoding. Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient
    Generative Inference of Large Language Models", arXiv 2306.14048 (half heavy, half recent).

    Scores are per KV head (the engine averages query heads per KV group).
    """

    recent_ratio: float = 0.5
    needs_attention = True
    name = "h2o"
    state_fields = ("_acc",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.recent_ratio) <= 1.0:
            raise ValueError(f"recent_ratio must be in [0, 1], got {self.recent_ratio!r}.")

    def reset(self, spec: CacheSpec) -> None:
        super().reset(spec)
        self._acc: dict[int, torch.Tensor] = {}  # layer -> (kv_heads, cache_len) attention received

    def update(self, layer: int, attn: torch.Tensor | None, keys: torch.Tensor, positions: torch.Tensor) -> None:
        received = attn.sum(dim=1)  # (kv_heads, cache_len), summed over this call's queries
        acc = self._acc.get(layer)
        self._acc[layer] = received if acc is None else pad_to(acc, received.shape[-1]) + received

    def scores(self, layer: int, n_keep: int) -> torch.Tensor:
        n_recent = int(self.recent_ratio * n_keep)
        return protect(self._acc[layer], self._positions[layer], n_recent=n_recent)

    def prune(self, layer: int, keep: torch.Tensor) -> None:
        self._acc[layer] = self._acc[layer].gather(-1, keep)
