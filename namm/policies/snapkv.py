"""SnapKV: the last queries vote for the cached tokens they attend to."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from namm.policies.base import CacheSpec
from namm.policies.ranked import RankedPolicy, pad_to


@dataclass
class SnapKV(RankedPolicy):
    """Sum the attention the last ``window`` queries give each older token, smooth it with a 1-D
    pooling of width ``kernel_size``, keep the top tokens per head and always the ``window``
    newest. Li et al., "SnapKV: LLM Knows What You Are Looking for Before Generation",
    arXiv 2404.14469 (kernel 5; window 32 here, 64 in the paper's code, which pools with "avg").

    The paper compresses once after the prompt; under the engine it runs at every eviction step,
    voting with the last ``window`` queries seen (prompt or decoded), kept in a rolling buffer.
    """

    window: int = 32
    kernel_size: int = 5
    pooling: str = "max"
    needs_attention = True
    name = "snapkv"
    state_fields = ("_votes",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be a positive number of queries, got {self.window!r}.")
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {self.kernel_size!r}.")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {self.pooling!r}.")

    def state_params(self) -> tuple:
        return (self.window,)  # the votes buffer holds the last `window` queries

    def reset(self, spec: CacheSpec) -> None:
        super().reset(spec)
        self._votes: dict[int, torch.Tensor] = {}  # layer -> (kv_heads, <= window, cache_len)

    def update(self, layer: int, attn: torch.Tensor | None, keys: torch.Tensor, positions: torch.Tensor) -> None:
        rows = self._votes.get(layer)
        if rows is not None:
            attn = torch.cat([pad_to(rows, attn.shape[-1]), attn], dim=1)
        self._votes[layer] = attn[:, -self.window :].contiguous()  # a copy: frees the chunk's rows

    def scores(self, layer: int, n_keep: int) -> torch.Tensor:
        votes = self._votes[layer].sum(dim=1)  # (kv_heads, cache_len)
        votes = votes.masked_fill(self._positions[layer] < 0, 0.0)  # padding of ragged heads pools as zeros
        n_window = min(self.window, n_keep, votes.shape[-1])
        prefix = votes[:, : votes.shape[-1] - n_window]
        if prefix.shape[-1] > 0:
            pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
            prefix = pool(prefix[:, None], self.kernel_size, stride=1, padding=self.kernel_size // 2)[:, 0]
        window = torch.full_like(votes[:, :n_window], float("inf"))
        return torch.cat([prefix, window], dim=-1)

    def prune(self, layer: int, keep: torch.Tensor) -> None:
        rows = self._votes[layer]
        self._votes[layer] = rows.gather(-1, keep[:, None, :].expand(-1, rows.shape[1], -1))
