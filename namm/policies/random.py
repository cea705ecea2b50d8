"""Random eviction: the floor every informed method has to beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from namm.policies.ranked import RankedPolicy


@dataclass
class RandomPolicy(RankedPolicy):
    """Keep a uniformly random subset of the cache per head, always including the newest token.

    The draw depends only on (seed, layer, tokens seen), so the same sequence under the same seed
    evicts the same tokens whatever ran before it.
    """

    seed: int = 0
    name = "random"
    state_fields = ()  # positions only: the draw happens at select

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}.")

    def scores(self, layer: int, n_keep: int) -> torch.Tensor:
        positions = self._positions[layer]
        key = (self.seed * 1_000_003 + layer) * 1_000_003 + self.tokens_seen(positions)
        generator = torch.Generator().manual_seed(key % 2**63)
        scores = torch.rand(positions.shape, generator=generator).to(positions.device)
        scores[..., -1] = float("inf")  # the newest token always stays
        return scores
