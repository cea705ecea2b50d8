"""``RankedPolicy``: the skeleton every fixed-budget baseline shares.

Score each cached token, keep the ``n_keep`` best per head, prune the per-token state with the
same indices. ``protect`` forces sinks / a recent window in; ``pad_to`` extends per-token state to
the tokens just added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from namm.policies.base import BudgetMixin, CacheSpec, MemoryPolicy, gather_kept, tokens_seen, topk_indices


def protect(scores: torch.Tensor, positions: torch.Tensor, n_sink: int = 0, n_recent: int = 0) -> torch.Tensor:
    """Copy of ``scores`` (kv_heads, cache_len) with +inf on the sinks (absolute position < n_sink)
    and on the last ``n_recent`` cache slots, so ``topk_indices`` always keeps them."""
    scores = scores.clone()
    if n_sink > 0:
        scores[positions < n_sink] = float("inf")
    if n_recent > 0:
        scores[..., -n_recent:] = float("inf")
    return scores


def pad_to(state: torch.Tensor, cache_len: int) -> torch.Tensor:
    """Per-token state (..., n) zero-padded on the right to ``cache_len``: the tokens just added."""
    return torch.nn.functional.pad(state, (0, cache_len - state.shape[-1]))


@dataclass
class RankedPolicy(BudgetMixin, MemoryPolicy):
    """Fixed-budget policy that keeps the top-scored tokens per head.

    Subclasses implement ``scores`` (kv_heads, cache_len), higher is kept, and, when they hold
    per-token state, ``update`` (fold in one forward call) and ``prune`` (drop evicted tokens).
    """

    #: the per-token state ``update`` builds besides ``_positions``, for prefix sharing
    #: (:mod:`namm.prefix`): before the first eviction step it depends only on what was observed
    #: and on ``state_params()``, never on the budget, so every setting of the policy can continue
    #: one prefix read. None (the default): the policy reads every prompt itself.
    state_fields: ClassVar[tuple[str, ...] | None] = None

    def __post_init__(self) -> None:
        self.check_budget()

    @property
    def fork_fields(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("_positions", *(self.state_fields or ()))

    def state_params(self) -> tuple:
        """The settings ``update`` depends on (SnapKV's window); part of the fork key."""
        return ()

    def fork_key(self) -> tuple | None:
        """Policies whose state comes from the same ``update`` with the same ``state_params`` share
        prefixes: H2O at 25% and at 50%, SnapKV and PyramidKV with the same window."""
        if self.state_fields is None:
            return None
        return ("ranked", type(self).update.__qualname__, self.state_fields, self.state_params())

    def reset(self, spec: CacheSpec) -> None:
        super().reset(spec)
        self._positions: dict[int, torch.Tensor] = {}  # layer -> (kv_heads, cache_len)
        self._seen: int | None = None

    def observe(self, layer: int, attn: torch.Tensor | None, keys: torch.Tensor, positions: torch.Tensor,
                **extras: torch.Tensor) -> None:
        self._positions[layer] = positions
        self._seen = None  # a new forward call: the count moves on
        self.update(layer, attn, keys, positions, **extras)

    def tokens_seen(self, positions: torch.Tensor) -> int:
        """Tokens processed so far, read from the device once per eviction step: every layer's
        newest cached token is the last one processed when ``select`` runs."""
        if self._seen is None:
            self._seen = tokens_seen(positions)
        return self._seen

    def update(self, layer: int, attn: torch.Tensor | None, keys: torch.Tensor, positions: torch.Tensor,
               **extras: torch.Tensor) -> None:
        """Fold one forward call into the per-token state (default: none kept); ``extras`` holds
        ``queries`` / ``values`` for policies that set ``needs_queries`` / ``needs_values``."""

    def scores(self, layer: int, n_keep: int) -> torch.Tensor:
        raise NotImplementedError

    def prune(self, layer: int, keep: torch.Tensor) -> None:
        """Drop the state of evicted tokens; ``keep`` is (kv_heads, n_keep)."""

    def keep_count(self, layer: int, positions: torch.Tensor) -> int:
        """Tokens this layer keeps now: the budget arithmetic, capped by the cache."""
        return self.n_keep(self.tokens_seen(positions), positions.shape[-1])

    def keep_indices(self, layer: int, scores: torch.Tensor, n_keep: int) -> torch.Tensor:
        """Which tokens to keep given the scores: each head's top ``n_keep`` (Ada-KV overrides this)."""
        return topk_indices(scores, n_keep)

    def select(self, layer: int) -> torch.Tensor | None:
        positions = self._positions[layer]
        n_keep = self.keep_count(layer, positions)
        scores = self.scores(layer, n_keep)
        self.record_scores(layer, positions, scores)
        keep = self.keep_indices(layer, scores, n_keep)
        self._positions[layer] = gather_kept(positions, keep, -1)
        self.prune(layer, keep)
        return keep
