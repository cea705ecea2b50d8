"""KeyNorm (L2): keep the keys with the lowest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from namm.policies.base import CacheSpec
from namm.policies.ranked import RankedPolicy, protect


@dataclass
class KeyNorm(RankedPolicy):
    """Keep the tokens whose cached key has the lowest L2 norm; low-norm keys draw the most
    attention. Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression", arXiv 2406.11430.

    The paper (and its code) keeps no sinks and no recent window, so both default to 0; it leaves
    some early layers uncompressed (layers 0-1): pass ``skip_layers=(0, 1)`` to do the same, at
    the price of those layers keeping their whole cache (the engine's report shows it).
    """

    n_sink: int = 0
    n_recent: int = 0
    skip_layers: tuple[int, ...] = ()
    name = "l2"
    state_fields = ("_norms",)

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("n_sink", "n_recent"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{field} must be a non-negative number of tokens, got {value!r}.")
        self.skip_layers = tuple(int(layer) for layer in self.skip_layers)

    def reset(self, spec: CacheSpec) -> None:
        super().reset(spec)
        self._norms: dict[int, torch.Tensor] = {}  # layer -> (kv_heads, cache_len)

    def update(self, layer: int, attn: torch.Tensor | None, keys: torch.Tensor, positions: torch.Tensor) -> None:
        self._norms[layer] = keys.float().norm(dim=-1)

    def scores(self, layer: int, n_keep: int) -> torch.Tensor:
        n_recent = min(self.n_recent, n_keep)
        return protect(-self._norms[layer], self._positions[layer], self.n_sink, n_recent)

    def select(self, layer: int) -> torch.Tensor | None:
        if layer in self.skip_layers:
            return None
        return super().select(layer)

    def prune(self, layer: int, keep: torch.Tensor) -> None:
        self._norms[layer] = self._norms[layer].gather(-1, keep)
