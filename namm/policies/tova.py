"""TOVA: keep the tokens the latest query attends to most, averaged over the layer's heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from namm.policies.base import CacheSpec
from namm.policies.ranked import RankedPolicy


@dataclass
class TOVA(RankedPolicy):
    """Keep the tokens with the highest attention from the most recent query, averaged over all
    heads of the layer, so every head keeps the same tokens. Oren et al., "Transformers are
    Multi-State RNNs", arXiv 2401.06104.
    """

    needs_attention = True
    name = "tova"
    state_fields = ("_latest",)

    def reset(self, spec: CacheSpec) -> None:
        super().reset(spec)
        self._latest: dict[int, torch.Tensor] = {}  # layer -> (cache_len,) latest query's attention

    def update(self, layer: int, attn: torch.Tensor | None, keys: torch.Tensor, positions: torch.Tensor) -> None:
        # KV groups are the same size, so the mean of group means is the mean over all query heads
        self._latest[layer] = attn[:, -1, :].mean(dim=0)

    def scores(self, layer: int, n_keep: int) -> torch.Tensor:
        return self._latest[layer].expand(self._positions[layer].shape[0], -1)

    def prune(self, layer: int, keep: torch.Tensor) -> None:
        self._latest[layer] = self._latest[layer][keep[0]]
