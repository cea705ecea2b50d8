"""Which tokens a NAMM keeps, given its scores.

Threshold selection (the released ``BinarySelection``; Cetin et al., arXiv 2410.13166, section
3.3; namm-algorithm.md section 4): a token is kept when its score is >= 0, the newest token is
always kept, and so the cache stays a dense tensor every KV head of a layer keeps the same number
of tokens, the *largest* per-head count of non-negative scores (heads with fewer also keep their
best negative-score tokens). An optional ``max_cache`` first restricts each head to its top
``max_cache`` scores. Budget selection keeps a fixed top-k instead, for matched-size comparisons.

Per-head threshold selection (:func:`threshold_mask`, an option, not the reference's rule) lets
each head keep exactly its own tokens scoring >= 0; the engine then pads the layer's cache to its
longest head and masks the padding (see :mod:`namm.sequence`).
"""

from __future__ import annotations

import torch


def topk_indices(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Top ``n_keep`` per head, ascending; ties towards the older token (see namm.policies.base)."""
    from namm.policies.base import topk_indices as topk  # lazy: namm.policies imports this module

    return topk(scores, n_keep)


def pool_scores(scores: torch.Tensor, width: int, held: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's score raised to the best score within ``width // 2`` cached tokens on either
    side, per head (a max-pool along the cache, as SnapKV pools its votes): a token is kept when
    it or a neighbour scores high, so a multi-token span (the digits of a number) stays whole.

    scores: (kv_heads, cache_len); width: odd, 1 returns ``scores`` itself. held: bool, False on
    padded slots of a ragged cache, which neither give nor get a pooled score.
    """
    if width == 1:
        return scores
    if not isinstance(width, int) or width < 1 or width % 2 == 0:
        raise ValueError(f"score_pool must be a positive odd number of tokens, got {width!r}.")
    base = scores if held is None else scores.masked_fill(~held, float("-inf"))
    pooled = torch.nn.functional.max_pool1d(base[:, None], width, stride=1, padding=width // 2)[:, 0]
    return pooled if held is None else torch.where(held, pooled, scores)


def check_carry(span: int, decay: float) -> None:
    """Validate ``score_carry`` (tokens, >= 0) and ``score_carry_decay`` (a number >= 0)."""
    if isinstance(span, bool) or not isinstance(span, int) or span < 0:
        raise ValueError(f"score_carry must be a number of tokens >= 0, got {span!r}.")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not decay >= 0:
        raise ValueError(f"score_carry_decay must be a number >= 0, got {decay!r}.")


def carry_scores(scores: torch.Tensor, span: int, decay: float = 0.0, held: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's score raised to the scores of the ``span`` cached tokens before it, less
    ``decay`` per token of distance, per head: ``s'_i = max(s_i, max_{1<=j<=span} s_{i-j} - j * decay)``.

    Causal, unlike :func:`pool_scores`: at the prompt's end the question's attention points at the
    *start* of the span it asks for (the first digits of a number); the tokens after it are read
    only while the answer is written. A start scoring ``m`` above the threshold keeps the next
    ``floor(m / decay)`` tokens too (at most ``span``).

    Neighbours are taken in cache order (ascending positions), so after an earlier eviction a
    token's predecessor is the nearest older token still cached.

    scores: (kv_heads, cache_len); span: tokens, 0 returns ``scores`` itself. held: bool, False on
    padded slots of a ragged cache, which neither give nor get a carried score.
    """
    check_carry(span, decay)
    if span == 0:
        return scores
    base = scores if held is None else scores.masked_fill(~held, float("-inf"))
    out = base.clone()
    for j in range(1, min(span, base.shape[-1] - 1) + 1):
        out[:, j:] = torch.maximum(out[:, j:], base[:, :-j] - j * decay)
    return out if held is None else torch.where(held, out, scores)


def _prepare(scores: torch.Tensor) -> torch.Tensor:
    """Copy of ``scores`` (kv_heads, cache_len) with NaNs dropped and the newest token forced in."""
    if scores.dim() != 2 or scores.shape[-1] == 0:
        raise ValueError(f"scores must be (kv_heads, cache_len) with cache_len > 0, got {tuple(scores.shape)}.")
    scores = torch.nan_to_num(scores.detach().float(), nan=float("-inf"))
    scores[:, -1] = float("inf")
    return scores


def threshold_count(
    scores: torch.Tensor, threshold: float = 0.0, max_cache: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates and the keep count of :func:`threshold_select`, without a host sync.

    Returns (prepared scores (kv_heads, cache_len), n_keep as a 0-dim tensor); the kept indices
    are ``topk_indices(prepared, int(n_keep))``. Lets a caller read the counts of many layers at
    once.
    """
    if max_cache is not None and not (isinstance(max_cache, int) and max_cache >= 1):
        raise ValueError(f"max_cache must be a positive number of tokens or None, got {max_cache!r}.")
    scores = _prepare(scores)
    n_tokens = scores.shape[-1]
    if max_cache is not None and n_tokens > max_cache:
        candidates = topk_indices(scores, max_cache)  # (kv_heads, max_cache)
        capped = torch.full_like(scores, float("-inf"))
        scores = capped.scatter(1, candidates, scores.gather(1, candidates))
    n_below = (scores < threshold).sum(dim=-1)  # (kv_heads,)
    return scores, n_tokens - n_below.min()


def threshold_mask(
    scores: torch.Tensor, threshold: float = 0.0, max_cache: int | None = None, held: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-head keep mask (kv_heads, cache_len): the tokens scoring >= ``threshold`` (the newest
    always), each head on its own; with ``max_cache`` only each head's top-``max_cache`` count.

    held: bool (kv_heads, cache_len), False on padded slots of a ragged cache (never kept).
    """
    if max_cache is not None and not (isinstance(max_cache, int) and max_cache >= 1):
        raise ValueError(f"max_cache must be a positive number of tokens or None, got {max_cache!r}.")
    scores = _prepare(scores)
    if held is not None:
        scores = scores.masked_fill(~held.to(scores.device), float("-inf"))
    keep = scores >= threshold
    if held is not None:
        keep &= held.to(keep.device)
    if max_cache is not None and scores.shape[-1] > max_cache:
        top = torch.zeros_like(keep).scatter_(1, topk_indices(scores, max_cache), True)
        keep &= top
    return keep


def threshold_select(
    scores: torch.Tensor, threshold: float = 0.0, max_cache: int | None = None
) -> torch.Tensor:
    """Indices to keep, (kv_heads, n_keep) ascending, n_keep = max_h #(s_h >= threshold).

    scores:    (kv_heads, cache_len), tokens in chronological order (newest last).
    threshold: keep rule s >= threshold (the reference uses 0).
    max_cache: if set and cache_len > max_cache, only each head's top-``max_cache`` tokens are
               candidates, so at most ``max_cache`` tokens are kept.
    """
    scores, n_keep = threshold_count(scores, threshold, max_cache)
    return topk_indices(scores, int(n_keep.item()))


def budget_select(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Each head's top-``budget`` tokens (newest always in), (kv_heads, min(budget, cache_len))."""
    if budget < 1:
        raise ValueError(f"budget must be a positive number of tokens, got {budget!r}.")
    return topk_indices(_prepare(scores), budget)


__all__ = ["budget_select", "threshold_count", "threshold_select"]
