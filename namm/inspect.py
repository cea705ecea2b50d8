"""Record what a memory policy kept while the engine read a prompt and answered it.

:func:`trace_memory` runs :meth:`namm.engine.Engine.generate` once and returns a
:class:`MemoryTrace`: for every token, which managed layer and KV head still holds it at the end,
the last score the policy gave it in each layer and head (policies that rank tokens hand them to
``MemoryPolicy.score_hook``: the NAMM and every :class:`~namm.policies.ranked.RankedPolicy`), and
the cache length of each layer over time. :mod:`namm.inspect_page` turns a trace into one
self-contained HTML page (``namm inspect``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from namm.engine import Engine
from namm.policies.base import MemoryPolicy
from namm.policies.full import FullCache
from namm.report import MemoryReport
from namm.sequence import MemorySequence

__all__ = ["MemoryTrace", "ScoreRecorder", "kept_curve", "trace_memory"]


@dataclass
class MemoryTrace:
    """What one run kept. Arrays are indexed by managed layer (``layers``), KV head and position.

    token_ids / tokens: prompt then generated tokens, ids and their text pieces.
    n_prompt:  tokens of the prompt (chat template included).
    seen:      tokens fed into the cache (the last generated token is never fed).
    held:      bool (layers, kv_heads, seen): the token is in that head's cache at the end.
    scores:    float32 (layers, kv_heads, seen): the last score the policy gave the token there
               (NaN where it was never scored; +-inf where the policy forces it in or out).
    curve_x, curve_y: tokens seen and the cache length of each layer (points, layers) around every
               eviction step.
    """

    token_ids: list[int]
    tokens: list[str]
    n_prompt: int
    seen: int
    layers: list[int]
    kv_heads: int
    held: np.ndarray
    scores: np.ndarray
    curve_x: np.ndarray
    curve_y: np.ndarray
    report: MemoryReport
    text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def share(self) -> np.ndarray:
        """(seen,) fraction of managed layers x KV heads that still hold each token."""
        return self.held.mean(axis=(0, 1)) if self.held.size else np.ones(self.seen)

    @property
    def scored(self) -> bool:
        """Whether the policy handed over any scores (a full cache, for one, ranks nothing)."""
        return bool((~np.isnan(self.scores)).any())


class ScoreRecorder:
    """A ``MemoryPolicy.score_hook``: keeps the scores of every eviction step, in order."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (layer, positions, scores)

    def __call__(self, layer: int, positions: torch.Tensor, scores: torch.Tensor) -> None:
        self.steps.append((layer, positions.detach().cpu(), scores.detach().float().cpu()))

    def last_scores(self, layers: list[int], kv_heads: int, n_tokens: int) -> np.ndarray:
        """(layers, kv_heads, n_tokens) float32: each token's score at the last step it was ranked."""
        out = torch.full((len(layers), kv_heads, n_tokens), float("nan"))
        row = {layer: i for i, layer in enumerate(layers)}
        for layer, positions, scores in self.steps:
            held = positions >= 0  # a ragged layer's padding (position -1) is no token
            if bool(held.all()):
                out[row[layer]].scatter_(1, positions, scores)
            else:
                for h in range(positions.shape[0]):
                    out[row[layer], h, positions[h, held[h]]] = scores[h, held[h]]
        return out.numpy()


class _TracingEngine(Engine):
    """An :class:`Engine` that keeps the last sequence it started (its cache and eviction log)."""

    sequence: MemorySequence | None = None

    def start(self, policy: MemoryPolicy | None = None) -> MemorySequence:
        self.sequence = super().start(policy)
        return self.sequence


def trace_memory(engine: Engine, prompt, policy: MemoryPolicy | None = None, max_new_tokens: int = 32,
                 chat: bool | None = None, **generate_kwargs: Any) -> MemoryTrace:
    """``engine.generate(prompt, ...)`` under ``policy`` (default: the engine's; greedy unless told),
    on the engine's model, tokenizer and schedule, recording what the memory kept."""
    policy = policy or engine.policy or FullCache()
    engine = _TracingEngine(engine.model, engine.tokenizer, policy=policy,
                            config=replace(engine.config, record_evictions=True))
    recorder = ScoreRecorder()
    previous = vars(policy).get("score_hook")
    policy.score_hook = recorder
    try:
        out = engine.generate(prompt, max_new_tokens=max_new_tokens, chat=chat, policy=policy, **generate_kwargs)
    finally:
        policy.score_hook = previous
    seq = engine.sequence
    ids = engine.encode(prompt, engine.chat_for(chat, policy)).tolist() + list(out.token_ids)
    layers = list(seq.spec.managed_layers)
    held = np.zeros((len(layers), seq.spec.kv_heads, seq.seen), dtype=bool)
    for i, layer in enumerate(layers):
        positions = seq.positions[layer].cpu()  # (kv_heads, n_keep) absolute positions, -1: padding
        for h, row in enumerate(positions):
            held[i, h, row[row >= 0].numpy()] = True
    curve_x, curve_y = kept_curve(seq.eviction_log, layers, seq.seen)
    return MemoryTrace(
        token_ids=ids, tokens=token_pieces(engine.tokenizer, ids), n_prompt=out.prompt_tokens, seen=seq.seen,
        layers=layers, kv_heads=seq.spec.kv_heads, held=held,
        scores=recorder.last_scores(layers, seq.spec.kv_heads, seq.seen), curve_x=curve_x, curve_y=curve_y,
        report=out.report, text=out.text,
        meta={"policy": getattr(policy, "name", type(policy).__name__), "conditions": engine.conditions(policy, chat),
              "finish_reason": out.finish_reason, "timings": out.timings},
    )


def kept_curve(eviction_log, layers: list[int], seen: int) -> tuple[np.ndarray, np.ndarray]:
    """Cache length of each layer over time from an eviction log ``[(tokens_seen, {layer: kept})]``.

    Every fed token enters every managed layer, so between two steps each layer grows by the
    tokens fed; at a step it drops to what the policy kept (layers it left alone keep growing).
    Returns x (points,) tokens seen and y (points, layers) cache lengths, two points per step (a
    ragged layer's length: the mean over its KV heads, padding not counted).
    """
    length = np.zeros(len(layers))
    xs, ys, last = [0], [length.copy()], 0
    for step, kept in eviction_log:
        length = length + (step - last)
        xs.append(step)
        ys.append(length.copy())
        for i, layer in enumerate(layers):
            if layer in kept:
                length[i] = (kept[layer] >= 0).sum().item() / kept[layer].shape[0]
        xs.append(step)
        ys.append(length.copy())
        last = step
    xs.append(seen)
    ys.append(length + (seen - last))
    return np.asarray(xs), np.stack(ys)


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text of each token on its own (special tokens kept), for display."""
    if tokenizer is None:
        return [f"<{i}>" for i in ids]
    return [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]
