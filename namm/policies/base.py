"""The memory-policy interface every KV-cache method implements.

A policy is stateful per sequence. The engine calls, for every layer it manages:

* ``observe(layer, attn, keys, positions)`` after each forward call (a prefill chunk or one
  decoded token), with the layer's cache *including* the tokens of this call;
* ``begin_eviction()`` once at an eviction step, before any ``select`` (a policy may do the work
  of all layers at once there, e.g. one batched scorer call);
* ``select(layer)`` at an eviction step, which returns the indices of the cached tokens to keep.

Policies that need more than attention and keys opt in with class flags, so the others pay
nothing: ``needs_attention`` (attention weights), ``needs_queries`` / ``needs_values`` (extra
keyword arguments of ``observe``) and ``needs_side_pass`` (an extra forward before each eviction
step whose KV is discarded, :class:`SidePass`).

The policy prunes its own per-token state with the indices it returns, so its state always lines
up with the cache the engine holds.

Ragged selections: ``select`` may let the KV heads of a layer keep different numbers of tokens by
leading each head's row with -1 (see :func:`ragged_indices`). The engine then pads the layer to its
longest head, hides the padded slots from attention and hands them to ``observe`` at position -1
(with zero attention); every later selection must drop them (they are never kept tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

from namm.profiling import NULL_TIMER


@dataclass(frozen=True)
class CacheSpec:
    """What a policy knows about the model whose cache it manages.

    managed_layers: the layer indices the policy observes and prunes (sliding-window layers of
    models such as Gemma-3 keep their own window and are not handed to the policy).
    """

    num_layers: int
    managed_layers: tuple[int, ...]
    kv_heads: int
    head_dim: int
    #: rope(positions (n,)) -> cos, sin (n, rotary_dim) float32: the rotary embedding the managed
    #: layers apply at those absolute positions (q_rot = q * cos + rotate_half(q) * sin on the first
    #: rotary_dim dims); None when the engine cannot provide it
    rope: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = field(
        default=None, compare=False, repr=False)


@dataclass
class SidePass:
    """What the engine hands a policy with ``needs_side_pass`` before each eviction step.

    token_ids:       (n,) int64 ids of the tokens that some managed layer still caches, oldest first.
    token_positions: (n,) int64 their absolute positions.
    prompt_end:      True at the eviction step that ends the prompt.
    tokenizer:       the engine's tokenizer, or None.
    run:             ``run(ids, observe)`` feeds ``ids`` (m,) after the cache at the next m positions;
                     every managed layer calls ``observe(layer, queries, keys)`` with its queries after
                     RoPE, (kv_heads, groups, m, head_dim), and its keys, (kv_heads, cache_len + m,
                     head_dim), cached keys first; then the cache is put back as it was, so the pass
                     leaves no trace in the cache, the positions or the memory report.
    """

    token_ids: torch.Tensor
    token_positions: torch.Tensor
    prompt_end: bool
    tokenizer: object | None
    run: Callable[[torch.Tensor, Callable[[int, torch.Tensor, torch.Tensor], None]], None]


class MemoryPolicy:
    """Base class of every KV-cache policy.

    Subclasses set ``needs_attention = True`` when ``observe`` must receive attention weights
    (the engine then computes eager attention for managed layers; otherwise ``attn`` is None and
    the engine uses a fused kernel), ``needs_queries`` / ``needs_values`` when ``observe`` must
    receive this call's queries / the cached values (keyword arguments ``queries`` and ``values``,
    passed only to policies that ask), and ``needs_side_pass`` when ``side_pass`` must run before
    each eviction step.
    """

    needs_attention: bool = False
    needs_queries: bool = False
    needs_values: bool = False
    needs_side_pass: bool = False
    name: str = "policy"

    def reset(self, spec: CacheSpec) -> None:
        """Start a new sequence: drop all per-sequence state."""
        self.spec = spec

    def observe(
        self,
        layer: int,
        attn: torch.Tensor | None,
        keys: torch.Tensor,
        positions: torch.Tensor,
        **extras: torch.Tensor,
    ) -> None:
        """See one layer after a forward call.

        attn:      (kv_heads, new_queries, cache_len) float32 softmax probabilities of this call's
                   queries over the whole cache, query heads averaged per KV group; zeros where a
                   key is in the causal future of a query. None unless ``needs_attention``.
        keys:      (kv_heads, cache_len, head_dim) cached keys (after RoPE), new tokens last.
        positions: (kv_heads, cache_len) int64 absolute position of each cached token.
        extras:    only for policies that ask: ``queries`` (kv_heads, groups, new_queries, head_dim),
                   this call's queries after RoPE (query head ``h * groups + g`` reads KV head h),
                   if ``needs_queries``; ``values`` (kv_heads, cache_len, head_dim) if ``needs_values``.
        """

    def side_pass(self, side: SidePass) -> None:
        """Called before ``begin_eviction`` at every eviction step when ``needs_side_pass``."""

    def describe_keep(self) -> str:
        """The keep rule in words, for reports: "budget 256", "keep_ratio 0.25" or "all"."""
        budget, ratio = getattr(self, "budget", None), getattr(self, "keep_ratio", None)
        if budget is not None:
            return f"budget {budget}"
        return f"keep_ratio {float(ratio):g}" if ratio is not None else "all"

    def begin_eviction(self) -> None:
        """Called once per eviction step, before ``select`` runs for each managed layer."""

    def select(self, layer: int) -> torch.Tensor | None:
        """Indices to keep, (kv_heads, n_keep) int64, ascending per head, the same count for
        every head; or None to keep everything. Called only at eviction steps.

        A head that keeps fewer tokens than the longest leads its row with -1 (ragged selection,
        :func:`ragged_indices`); slots at position -1 are padding and must not be kept."""
        return None

    #: where the policy's work is timed (:mod:`namm.profiling`); the engine times its own sections on
    #: the same timer. The default costs nothing; ``namm bench`` sets a SectionTimer.
    timer = NULL_TIMER

    #: optional callback(layer, positions, scores), both (kv_heads, cache_len), that sees the scores
    #: a policy ranked its cache by at each eviction step (``namm inspect`` sets it; off by default)
    score_hook = None

    def record_scores(self, layer: int, positions: torch.Tensor, scores: torch.Tensor) -> None:
        """Hand this step's scores to ``score_hook``, if set; scoring policies call it in ``select``."""
        if self.score_hook is not None:
            self.score_hook(layer, positions, scores)

    # -- prefix sharing (namm.prefix) -----------------------------------------------------------
    #: attributes that ``observe`` builds; copied when a prefix read under one policy is forked
    fork_fields: tuple[str, ...] = ()

    def fork_key(self) -> Hashable | None:
        """None, or a key such that any two policies with equal keys build identical state (the
        ``fork_fields``) from ``observe`` alone, before their first ``select``. A sequence read up
        to its first eviction step under one of them can then be continued under the other."""
        return None

    def on_fork(self, shared: dict) -> None:
        """Called once the ``fork_fields`` are restored from a snapshot. ``shared`` is one dict per
        snapshot, handed to every fork: a policy may keep there what it computes from the restored
        state alone (not from its own parameters), for the other forks to reuse. It must not
        store views of its own state, which later steps change in place."""


@dataclass
class BudgetMixin:
    """Shared budget arithmetic for fixed-size policies.

    budget:     tokens kept per layer at each eviction step.
    keep_ratio: fraction of the tokens seen so far kept per layer (used when budget is None).
    """

    budget: int | None = None
    keep_ratio: float | None = None

    def check_budget(self) -> None:
        if self.budget is None and self.keep_ratio is None:
            raise ValueError(f"{type(self).__name__} needs a budget (tokens) or a keep_ratio (0-1].")
        if self.budget is not None and self.keep_ratio is not None:
            raise ValueError(f"{type(self).__name__}: give budget or keep_ratio, not both.")
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget <= 0):
            raise ValueError(f"budget must be a positive number of tokens, got {self.budget!r}.")
        if self.keep_ratio is not None and not (0.0 < float(self.keep_ratio) <= 1.0):
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}.")

    def n_keep(self, tokens_seen: int, cache_len: int) -> int:
        """How many tokens to keep now, never more than the cache holds."""
        if self.budget is not None:
            target = self.budget
        else:
            target = math.ceil(float(self.keep_ratio) * tokens_seen)
        return max(1, min(cache_len, target))


def topk_indices(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Top ``n_keep`` entries per head of ``scores`` (kv_heads, cache_len), returned ascending.

    Use +inf in ``scores`` to force a token in (sinks, recent window). Ties break towards the
    lower index so results are deterministic.
    """
    n_keep = min(n_keep, scores.shape[-1])
    # stable descending sort: equal scores keep their chronological order
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :n_keep].sort(dim=-1).values


def ragged_indices(keep: torch.Tensor) -> torch.Tensor:
    """The :meth:`MemoryPolicy.select` indices of a per-head keep mask ``keep`` (kv_heads, cache_len).

    Each head's kept slots ascending, right-aligned in a (kv_heads, n_max) row led by -1 (the
    head's padding), n_max the largest per-head count; a dense (kv_heads, n) tensor when every head
    keeps n tokens. Every head must keep at least one token.
    """
    counts = keep.sum(dim=-1)  # (kv_heads,)
    n_max = int(counts.max().item())
    slots = torch.arange(keep.shape[-1], device=keep.device).expand_as(keep)
    ordered = torch.where(keep, slots, -1).sort(dim=-1).values  # -1 first, then kept slots ascending
    return ordered[:, ordered.shape[-1] - n_max :]


def gather_kept(values: torch.Tensor, keep: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
    """``values.gather(-1, keep)`` for ragged ``keep`` too: ``fill`` where ``keep`` is -1 (padding).

    values: (..., kv_heads, cache_len); keep: (kv_heads, n) as :meth:`MemoryPolicy.select` returns it.
    """
    keep = keep.expand(*values.shape[:-2], *keep.shape)
    return values.gather(-1, keep.clamp_min(0)).masked_fill_(keep < 0, fill)


def tokens_seen(positions: torch.Tensor) -> int:
    """Tokens processed so far, from the absolute positions of the cache (newest last)."""
    return int(positions[..., -1].max().item()) + 1
