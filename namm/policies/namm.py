"""The NAMM policy: an evolved network scores every cached token from the attention it received."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from namm.memory.buffers import capacity_for, fresh, with_capacity
from namm.memory.extra_features import AttentionMoments, extra_columns, vector_norms
from namm.memory.features import RunningStats, StreamingSpectrogram, normalised_inputs, relative_depth
from namm.memory.model import KEEP_MODES, NAMM
from namm.memory.selection import budget_select, carry_scores, pool_scores, threshold_count, threshold_mask
from namm.policies.base import (BudgetMixin, CacheSpec, MemoryPolicy, gather_kept, ragged_indices, tokens_seen,
                                topk_indices)

_VECTOR_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".npy", ".safetensors")


def load_namm(source: NAMM | str | Path) -> NAMM:
    """A NAMM from an object, a NAMM folder, a shipped pretrained name, or a bare reference vector file."""
    if isinstance(source, NAMM):
        return source
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in _VECTOR_SUFFIXES:
        return NAMM.from_reference(path)
    return NAMM.from_pretrained(source)


@dataclass
class NAMMPolicy(MemoryPolicy):
    """Neural Attention Memory Model (Cetin et al., "An Evolved Universal Transformer Memory",
    arXiv 2410.13166): each layer's attention is streamed into per-token spectrogram EMAs; at an
    eviction step a small network (BAM) scores every token from its features and each KV head
    keeps the tokens scoring >= 0 (the newest always; every head of a layer keeps the same count,
    unless ``per_head``).
    A NAMM whose features list ``extras`` also streams them (attention moments, key norms; see
    :mod:`namm.memory.extra_features`) and appends them to each token's features.

    namm:      a :class:`~namm.memory.model.NAMM`, a NAMM folder, a shipped pretrained name, or a
               bare reference-layout parameter file (.pt/.safetensors/.npy); None: the first shipped
               NAMM (:func:`~namm.memory.model.default_pretrained`). ``source`` keeps the name or path.
    max_cache: optional cap on tokens kept per layer (overrides the NAMM's own ``max_cache``).
    budget / keep_ratio: keep exactly each head's top-``budget`` tokens (or that fraction of the
               tokens seen) instead of thresholding, for comparisons at matched cache size.
    keep:      "threshold" or "budget"; by default the arguments decide (a budget or keep_ratio
               means budget, a max_cache threshold), else the keep mode the NAMM records (a
               budget-evolved NAMM then keeps its recorded keep_ratio).
    calibrate: keep everything and collect the feature normalisation statistics (``stats``);
               see :func:`namm.memory.calibration.calibrate`.
    per_head:  threshold mode only: each KV head keeps exactly its own tokens scoring >= the
               threshold (the newest always; ``max_cache`` caps each head) instead of the count of
               the head that keeps most. The heads then hold ragged counts: the engine pads the
               layer to its longest head and masks the padding, so a step stores what the shared
               rule would (the longest head's count) but fewer tokens are attended and counted as
               kept. Off by default (the paper's rule, and what saved NAMMs were evolved with).
               The BAM scorer only looks at newer tokens and the padding is the oldest slots, and
               key norms stay relative to the head's own tokens: padding changes no score.
    """

    namm: NAMM | str | Path | None = None
    max_cache: int | None = None
    budget: int | None = None
    keep_ratio: float | None = None
    calibrate: bool = False
    keep: str | None = None
    per_head: bool = False
    needs_attention = True
    name = "namm"
    fork_fields = ("spectrogram", "positions", "moments", "key_norm_buffers")

    def fork_key(self) -> tuple:
        """Features depend on the feature config only, not on the parameters: members share prefixes."""
        return ("namm", self.namm.config.features)

    def __post_init__(self) -> None:
        if self.namm is None and not self.calibrate:
            from namm.memory.model import default_pretrained

            self.namm = default_pretrained()
            if self.namm is None:
                raise ValueError(
                    "NAMMPolicy needs a NAMM and none is shipped: pass namm=PATH (a NAMM folder or a parameter "
                    "file), or ship one with `namm export RUN_DIR --to namm/pretrained/NAME`."
                )
        self.source = None if self.namm is None or isinstance(self.namm, NAMM) else str(self.namm)
        self.namm = load_namm(NAMM() if self.namm is None else self.namm)
        if self.max_cache is not None and not (isinstance(self.max_cache, int) and self.max_cache > 0):
            raise ValueError(f"max_cache must be a positive number of tokens or None, got {self.max_cache!r}.")
        if self.budget is not None or self.keep_ratio is not None:
            BudgetMixin.check_budget(self)  # type: ignore[arg-type]
        self.keep = self._resolve_keep()
        if not isinstance(self.per_head, bool):
            raise ValueError(f"per_head must be true or false, got {self.per_head!r}.")
        if self.per_head and self.keep != "threshold":
            raise ValueError("per_head applies to the threshold mode (each head keeps its own tokens scoring >= "
                             "the threshold); budget mode already keeps each head's own top-k.")
        self.stats = RunningStats(self.namm.config.features.norm_dim)

    def _resolve_keep(self) -> str:
        """The keep mode (see the ``keep`` field); a budget without a size takes the NAMM's keep_ratio."""
        recorded = self.namm.config
        sized = self.budget is not None or self.keep_ratio is not None
        keep = self.keep or ("budget" if sized else "threshold" if self.max_cache is not None else recorded.keep)
        if keep not in KEEP_MODES:
            raise ValueError(f"keep must be one of {KEEP_MODES}, got {keep!r}.")
        if keep == "threshold" and sized:
            raise ValueError("keep='threshold' keeps an emergent number of tokens; drop budget/keep_ratio "
                             "(cap it with max_cache) or use keep='budget'.")
        if keep == "budget" and not sized:
            if recorded.keep_ratio is None:
                raise ValueError("keep='budget' needs a budget or keep_ratio (this NAMM records none).")
            self.keep_ratio = recorded.keep_ratio
        if keep == "budget" and self.max_cache is not None:
            raise ValueError("max_cache caps the threshold mode; in budget mode give budget or keep_ratio.")
        return keep

    @property
    def schedule(self) -> dict[str, Any]:
        """The engine schedule the NAMM was evolved with (``EngineConfig`` keyword arguments); an
        :class:`~namm.engine.Engine` built with this policy and no config runs it."""
        return self.namm.config.schedule

    @property
    def chat(self) -> bool | None:
        """Whether the NAMM was evolved on chat-formatted prompts (None: not recorded)."""
        return self.namm.config.chat

    def describe_keep(self) -> str:
        if self.keep == "budget":
            return f"budget, top-k NAMM scores, {super().describe_keep()}"
        cap = self.max_cache if self.max_cache is not None else self.namm.config.max_cache
        heads = ", per head" if self.per_head else ""
        return f"threshold (score >= {self.namm.config.threshold:g}){heads}" + (f", cap {cap} tokens" if cap else "")

    def reset(self, spec: CacheSpec) -> None:
        super().reset(spec)
        features = self.namm.config.features
        self.spectrogram = StreamingSpectrogram(features)
        self.positions: dict[int, torch.Tensor] = {}  # layer -> (kv_heads, cache_len)
        attn_extras = any(name.startswith("attn_") for name in features.extras)
        self.moments = AttentionMoments(features.ema_coeff) if attn_extras else None
        # layer -> (kv_heads, capacity) float32 key norms, the first cache_len slots in use
        self.key_norm_buffers: dict[int, torch.Tensor] | None = {} if "key_norm" in features.extras else None
        self._plans: dict[int, tuple] = {}  # this eviction step: layer -> (scores, candidates, n_keep)
        # a fork of a shared prefix (namm.prefix): the snapshot's shared dict, and the layers whose
        # state is still the snapshot's (not observed or pruned since)
        self._shared: dict | None = None
        self._pristine: set[int] = set()

    def on_fork(self, shared: dict) -> None:
        """Every member forked from one prefix scores the same eviction inputs at its first step
        (the features do not depend on the parameters): the first one computes them, the others
        reuse them. The frozen normalisation is applied after, so NAMMs with other statistics
        but the same feature config share them correctly."""
        self._shared = shared
        self._pristine = set(self.positions)

    def observe(self, layer: int, attn: torch.Tensor | None, keys: torch.Tensor, positions: torch.Tensor) -> None:
        if attn is None:
            raise RuntimeError("NAMMPolicy needs attention weights; run it under an engine with needs_attention.")
        self._pristine.discard(layer)
        with self.timer("features"):
            self.spectrogram.observe(layer, attn)
            if self.moments is not None:
                self.moments.observe(layer, attn)
            if self.key_norm_buffers is not None:
                self._observe_key_norms(layer, keys)
        self.positions[layer] = positions

    def _observe_key_norms(self, layer: int, keys: torch.Tensor) -> None:
        """Append the norms of the new tokens' keys (a cached key never changes): a decoding step
        computes one norm per head and writes it in place (:mod:`namm.memory.buffers`)."""
        tracked = self.positions[layer].shape[1] if layer in self.positions else 0
        n = keys.shape[1]
        buffer = self.key_norm_buffers.get(layer)
        if buffer is None:
            buffer = keys.new_zeros(keys.shape[0], capacity_for(n), dtype=torch.float32)
        buffer = self.key_norm_buffers[layer] = with_capacity(buffer, 1, tracked, n)
        buffer[:, tracked:n] = vector_norms(keys[:, tracked:])

    @property
    def key_norms(self) -> dict[int, torch.Tensor] | None:
        """Layer -> (kv_heads, cache_len) norms of the cached keys (views), or None when the NAMM
        does not read them."""
        if self.key_norm_buffers is None:
            return None
        return {layer: self._key_norms(layer) for layer in self.key_norm_buffers}

    def _key_norms(self, layer: int) -> torch.Tensor:
        return self.key_norm_buffers[layer][:, : self.positions[layer].shape[1]]

    def extras(self, layer: int) -> torch.Tensor | None:
        """The configured extra inputs of ``layer``'s tokens, (kv_heads, cache_len, n_extras), or None."""
        names = self.namm.config.features.extras
        if not names:
            return None
        key_norms = None if self.key_norm_buffers is None else self._key_norms(layer)
        if key_norms is not None and self.per_head:  # padding takes the mean of the head's tokens,
            held = self.positions[layer] >= 0  # so norms stay relative to the tokens it holds
            mean = (key_norms * held).sum(-1, keepdim=True) / held.sum(-1, keepdim=True)
            key_norms = torch.where(held, key_norms, mean)
        return extra_columns(names, self.moments, layer, key_norms)

    def depth(self, layer: int) -> float | None:
        """The layer's relative depth in [-1, 1] if the NAMM reads it (``depth_basis``), else None."""
        if not self.namm.config.features.depth_basis:
            return None
        return relative_depth(layer, self.spec.num_layers)

    def begin_eviction(self) -> None:
        """Score every observed layer in batched scorer calls; ``select`` uses the result."""
        layers = [layer for layer in self.spec.managed_layers if layer in self.positions]
        self._plans = {} if self.calibrate or not layers else self._plan(layers)

    def select(self, layer: int) -> torch.Tensor | None:
        if self.calibrate:
            ema = self.spectrogram.scoring_ema(layer)  # what the scorer would see
            self.stats.update(normalised_inputs(ema, self.namm.config.features, self.extras(layer)))
            return None
        positions = self.positions[layer]
        plan = self._plans.pop(layer, None)
        if plan is None or plan[0].shape[-1] != positions.shape[1]:  # called without begin_eviction()
            plan = self._plan([layer])[layer]
        scores, candidates, n_keep = plan
        self.record_scores(layer, positions, scores)
        if n_keep is None:  # per head: candidates is the keep mask
            if bool(candidates.all()):
                return None
            keep = ragged_indices(candidates)
            self.prune(layer, keep)
            return keep
        if n_keep >= scores.shape[-1]:
            return None  # everything kept: nothing to gather
        keep = budget_select(scores, n_keep) if candidates is None else topk_indices(candidates, n_keep)
        self.prune(layer, keep)
        return keep

    def prune(self, layer: int, keep: torch.Tensor) -> None:
        """Keep the per-token state of the tokens ``keep`` (kv_heads, n_keep) of ``layer`` (ragged:
        padding, -1, copies a kept token's state and gets position -1)."""
        self._pristine.discard(layer)
        positions = self.positions[layer]
        self.positions[layer] = gather_kept(positions, keep.to(positions.device), -1)
        keep = keep.clamp_min(0)
        self.spectrogram.prune(layer, keep)
        if self.moments is not None:
            self.moments.prune(layer, keep)
        if self.key_norm_buffers is not None:
            buffer = self.key_norm_buffers[layer]
            self.key_norm_buffers[layer] = fresh(buffer.gather(1, keep.to(buffer.device)), 1)

    def _eviction_inputs(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The scorer's un-normalised inputs of ``layer``: (spectrogram EMA, positions, extras);
        from the snapshot's shared dict when this fork's state is still the snapshot's."""
        pristine = self._shared is not None and layer in self._pristine
        key = ("namm eviction inputs", layer)
        if pristine and key in self._shared:
            return self._shared[key]
        inputs = (self.spectrogram.scoring_ema(layer), self.positions[layer], self.extras(layer))
        if pristine:  # copies: the EMA may be a view of this fork's state, which its later steps change in place
            self._shared[key] = tuple(None if t is None else t.clone() for t in inputs)
        return inputs

    def _plan(self, layers: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor | None, int]]:
        """Per layer: the scores (kv_heads, cache_len), the threshold candidates to rank (None in
        budget mode) and how many tokens to keep; per head: the keep mask and None.

        One host sync for all layers: the token count (budget) or the keep counts (threshold).
        """
        with self.timer("features"):  # (kv_heads, cache_len, feature_dim) per layer
            features = [self.namm.features(*self._eviction_inputs(layer), self.depth(layer)) for layer in layers]
        with self.timer("scorer"):
            scores = self.namm.score_features(features)  # one batched call (or a few) for all layers
            width = self.namm.config.score_pool
            if width > 1:
                scores = [pool_scores(s, width, self.positions[layer] >= 0) for layer, s in zip(layers, scores)]
            span, decay = self.namm.config.score_carry, self.namm.config.score_carry_decay
            if span > 0:
                scores = [carry_scores(s, span, decay, self.positions[layer] >= 0) for layer, s in zip(layers, scores)]
        if self.keep == "budget":
            seen = tokens_seen(self.positions[layers[0]])  # every layer keeps the newest token
            counts = [BudgetMixin.n_keep(self, seen, s.shape[-1]) for s in scores]  # type: ignore[arg-type]
            return {layer: (s, None, n) for layer, s, n in zip(layers, scores, counts)}
        cap = self.max_cache if self.max_cache is not None else self.namm.config.max_cache
        if self.per_head:
            return {layer: (s, threshold_mask(s, self.namm.config.threshold, cap, self.positions[layer] >= 0), None)
                    for layer, s in zip(layers, scores)}
        ranked = [threshold_count(s, self.namm.config.threshold, cap) for s in scores]
        counts = torch.stack([n_keep for _, n_keep in ranked]).tolist()
        return {layer: (s, c, n) for layer, s, (c, _), n in zip(layers, scores, ranked, counts)}
