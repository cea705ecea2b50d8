"""Ada-KV: split a layer's budget across its KV heads by score, over any per-head scored policy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from namm.policies.base import ragged_indices
from namm.policies.expected_attention import ExpectedAttention
from namm.policies.h2o import H2O
from namm.policies.pyramidkv import PyramidKV
from namm.policies.ranked import RankedPolicy
from namm.policies.snapkv import SnapKV
from namm.policies.tova import TOVA


def ada_keep(scores: torch.Tensor, held: torch.Tensor, n_keep: int, floor: float) -> torch.Tensor:
    """Ada-KV's keep mask (kv_heads, cache_len) of one layer, budget ``n_keep`` tokens per head.

    scores: (kv_heads, cache_len), higher kept, +inf forced in (sinks, windows); held: bool, False
    on padded slots (never kept). The layer keeps min(kv_heads * n_keep, held tokens) tokens, in
    this order: every forced token; then each head's top int(floor * (n_keep - its forced tokens))
    other tokens (the safeguard); then the best remaining scores of all heads together. Ties go
    to the lower head, then to the older token.
    """
    heads, cache_len = scores.shape
    scores = scores.masked_fill(~held, float("-inf"))
    forced = (scores == float("inf")) & held
    share = (n_keep - forced.sum(dim=-1)).clamp_min(0).double()  # (kv_heads,)
    n_floor = torch.floor(floor * share)  # as the official int(floor_alpha * capacity)
    others = scores.masked_fill(forced | ~held, float("-inf"))
    rank_in_head = torch.sort(others, dim=-1, descending=True, stable=True).indices.argsort(dim=-1)
    safeguard = (rank_in_head < n_floor[:, None]) & held & ~forced
    tier = torch.full_like(scores, 2, dtype=torch.long)  # 0 forced, 1 safeguard, 2 the rest, 3 padding
    tier[safeguard], tier[forced], tier[~held] = 1, 0, 3
    flat = scores.reshape(-1)
    by_score = torch.sort(flat, descending=True, stable=True).indices  # ties: lower head, older token
    order = by_score[torch.sort(tier.reshape(-1)[by_score], stable=True).indices]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    total = held.sum().clamp(max=heads * n_keep)
    return (rank < total).view(heads, cache_len)


@dataclass
class AdaKV(RankedPolicy):
    """Adaptive budget allocation across heads: the layer keeps ``kv_heads * n_keep`` tokens in
    all, chosen by the wrapped policy's scores jointly over its KV heads, so heads whose attention
    is spread out keep more tokens and concentrated ones fewer. Feng et al., "Ada-KV: Optimizing
    KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference", arXiv 2407.11550.

    A mixin: ``class AdaSnapKV(AdaKV, SnapKV)`` runs SnapKV's scores (its budget, window and
    pooling; PyramidKV's per-layer budgets) through :func:`ada_keep`. The heads then keep ragged
    counts: the engine pads the layer to its longest head and masks the padding.

    floor: the safeguard, each head keeps at least this share of its equal split (beyond its
    forced tokens, e.g. SnapKV's window, which the official code also keeps outside the adaptive
    budget). 0.2 as the official code's GQA runs (FFY0/AdaKV, ``--floor_alpha 0.2``, "we suggest
    0.2 while using gqa") and kvpress's ``AdaKVPress`` (``alpha_safeguard``). The official code
    counts each head's share of a joint top-k and rescales it, ``round(c * (1 - floor) +
    int(floor * k))``, whose total can miss ``kv_heads * k`` by rounding; here, as in kvpress, the
    safeguard tokens are taken first and the joint top-k fills the rest, so every layer keeps
    exactly its budget. The official default ``normalize`` is off, as here (no score rescaling).

    A wrapped policy must score each head's tokens as it would on that head's tokens alone (the
    padded slots of a ragged cache hold copies and get zero attention); TOVA, whose scores are
    the mean over heads, cannot be wrapped.
    """

    floor: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self, TOVA):
            raise ValueError("TOVA scores every head with the mean over heads: Ada-KV has nothing to split.")
        if isinstance(self.floor, bool) or not 0.0 <= float(self.floor) <= 1.0:
            raise ValueError(f"floor must be in [0, 1] (each head's least share of its equal budget), "
                             f"got {self.floor!r}.")

    def keep_indices(self, layer: int, scores: torch.Tensor, n_keep: int) -> torch.Tensor:
        held = self._positions[layer] >= 0  # padded slots sit at position -1
        return ragged_indices(ada_keep(scores, held, n_keep, float(self.floor)))

    def prune(self, layer: int, keep: torch.Tensor) -> None:
        super().prune(layer, keep.clamp_min(0))  # padding copies a kept token's state; it is masked


@dataclass
class AdaSnapKV(AdaKV, SnapKV):
    """Ada-SnapKV: SnapKV's pooled window votes, budgets split across heads by Ada-KV (the
    official code's main method)."""

    name = "ada-snapkv"


@dataclass
class AdaPyramidKV(AdaKV, PyramidKV):
    """Ada-PyramidKV: PyramidKV's per-layer budgets, each split across heads by Ada-KV (the
    official code's ``--pyram`` mode)."""

    name = "ada-pyramidkv"


@dataclass
class AdaH2O(AdaKV, H2O):
    """Ada-H2O: H2O's accumulated attention plus recent window, budgets split across heads by Ada-KV."""

    name = "ada-h2o"


@dataclass
class AdaExpectedAttention(AdaKV, ExpectedAttention):
    """Ada-Expected Attention: expected future attention, budgets split across heads by Ada-KV."""

    name = "ada-expected-attention"
