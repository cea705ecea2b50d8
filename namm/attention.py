"""The attention function the engine installs into a model while it runs a sequence.

transformers lets a model call a registered attention function (``AttentionInterface``). While
the engine drives a model, every attention layer calls :func:`namm_attention` with the layer's
queries and its *whole* cache (keys of earlier tokens plus this call's). It

* builds the causal mask from the shapes alone: the last ``q`` keys are this call's tokens, every
  older cached key is visible (pruned tokens are simply gone), and sliding-window layers keep their
  own window; a layer whose KV heads keep different numbers of tokens (a *ragged* layer, see
  :mod:`namm.sequence`) also hides each head's leading padded slots;
* for layers the policy manages, hands the policy this chunk's attention, query heads averaged per
  KV group, one layer at a time (eager softmax, fp32, tiled per KV head and run of queries so each
  tile stays in cache), so no step ever holds all layers' attention;
  and, only when asked, this chunk's queries (after RoPE, as the model applied it) and the values;
* otherwise runs fused SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from namm.profiling import NULL_TIMER

ATTN_IMPLEMENTATION = "namm"


@dataclass
class LayerHook:
    """What the engine wants from each layer during one forward call.

    managed:      layer index -> True when the policy manages (observes and prunes) that layer.
    observe:      callback(layer, attn (kv_heads, q, K) | None, keys (kv_heads, K, d), **extras).
    need_attn:    whether ``observe`` wants attention weights.
    need_queries: pass ``queries=`` (kv_heads, groups, q, d), this call's queries after RoPE.
    need_values:  pass ``values=`` (kv_heads, K, d), the layer's values.
    timer:        :mod:`namm.profiling` timer of the "attention read" section (a no-op by default).
    padding:      layer index -> (kv_heads,) int64, how many leading cache slots of each KV head are
                  padding (ragged layers only; the engine keeps this dict up to date). Padded slots
                  are hidden from every query; a layer not in the dict has none.
    """

    managed: frozenset[int]
    observe: Callable[..., None]
    need_attn: bool = False
    need_queries: bool = False
    need_values: bool = False
    timer: Callable = NULL_TIMER  # times the "attention read" (namm.profiling)
    padding: dict[int, torch.Tensor] = field(default_factory=dict)
    workspace: dict[str, torch.Tensor] = field(default_factory=dict)  # scratch of :func:`_eager_read`

    def scratch(self, name: str, numel: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A flat scratch tensor of ``numel`` elements, reused across layers and calls (grown on
        demand), so the attention read does not allocate (and page-fault) its scores every call."""
        buffer = self.workspace.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != like.device:
            buffer = self.workspace[name] = torch.empty(numel, dtype=dtype, device=like.device)
        return buffer[:numel]

    def extras(self, query: torch.Tensor, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """The optional ``observe`` arguments asked for, from query (1, Hq, q, d), value (1, Hkv, K, d)."""
        extras = {}
        if self.need_queries:
            kv_heads, (_, hq, q_len, dim) = value.shape[1], query.shape
            extras["queries"] = query[0].view(kv_heads, hq // kv_heads, q_len, dim)
        if self.need_values:
            extras["values"] = value[0]
        return extras


def visible_mask(q_len: int, kv_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Bool (q_len, kv_len): key j is visible to query i of this call.

    The last ``q_len`` keys belong to this call's queries; ``window`` (sliding layers, whose cache
    is contiguous) hides keys ``window`` or more positions back.
    """
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    dist = q_pos - k_pos
    mask = dist >= 0
    if window is not None:
        mask &= dist < window
    return mask


def held_slots(padding: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Bool (kv_heads, kv_len): slot j of head h holds a token (j >= padding[h]), not padding."""
    return torch.arange(kv_len, device=padding.device)[None, :] >= padding[:, None]


def _eager(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    softcap: float | None,
    groups: int,
    window: int | None = None,
    held: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention for grouped queries without copying K and V per query head.

    query (1, Hq, q, d), key/value (1, Hkv, K, d); the mask is :func:`visible_mask`, and, for a
    ragged layer, ``held`` (Hkv, K) hides each head's padded slots (:func:`held_slots`). Query head
    ``h * groups + g`` reads KV head h, so the queries are regrouped to (1, Hkv, groups * q, d)
    and multiplied against the un-repeated keys and values. Returns the output (1, Hq, q, d) and
    the fp32 softmax probabilities (1, Hkv, groups, q, K).
    """
    _, hq, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    grouped = query.reshape(1, kv_heads, groups * q_len, dim)  # rows: (group, query)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).mul_(scaling)  # (1, Hkv, groups * q, K)
    if softcap is not None:
        scores.div_(softcap).tanh_().mul_(softcap)
    scores = scores.view(1, kv_heads, groups, q_len, kv_len)
    if window is None:  # every older key is visible: only this call's own (q, q) block is causal
        if q_len > 1:  # (a single query sees every key, its own included)
            scores[..., kv_len - q_len :].masked_fill_(~visible_mask(q_len, q_len, None, query.device), float("-inf"))
    else:
        scores.masked_fill_(~visible_mask(q_len, kv_len, window, query.device), float("-inf"))
    if held is not None:
        scores.masked_fill_(~held[None, :, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)  # (1, Hkv, groups, q, K)
    out = torch.matmul(probs.view(1, kv_heads, groups * q_len, kv_len).to(value.dtype), value)
    return out.view(1, hq, q_len, dim), probs


# The attention read works on tiles of at most this many bytes of scores (one KV head and a run
# of queries at a time), so the scores, their softmax, the output matmul and the group mean run
# while the tile is in cache: 1.6-2.5x faster than one pass over every head at 0.5K-8K keys on a
# CPU (fp32 and bf16, measured against the untiled read on SmolLM2 shapes).
TILE_BYTES = 4 << 20
UNTILED_BYTES = 1 << 20  # below this (a decoding step, a short cache) one pass over every head is faster


def _eager_read(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    softcap: float | None,
    groups: int,
    held: torch.Tensor | None,
    hook: LayerHook,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_eager` for a layer whose attention the policy reads, tiled.

    Returns the output (1, Hq, q, d) and the fp32 attention averaged over each KV head's query
    heads, (Hkv, q, K), the same numbers as ``_eager(...)[1][0].mean(dim=1)``. Small calls (a
    decoding step: under ``UNTILED_BYTES`` of scores) and every call on a GPU (where kernel launches,
    not caches, are the cost) run as one :func:`_eager`; larger ones on a CPU go one KV head and at
    most ``TILE_BYTES`` of scores at a time, in scratch buffers the hook keeps (no allocation per call).
    """
    _, hq, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    row_bytes = groups * kv_len * 4  # one query's scores in fp32, all its group's heads
    if query.device.type != "cpu" or kv_heads * q_len * row_bytes <= min(UNTILED_BYTES, TILE_BYTES):
        out, probs = _eager(query, key, value, scaling, softcap, groups, held=held)
        return out, probs[0].mean(dim=1)
    tile = min(q_len, max(16, TILE_BYTES // row_bytes))
    grouped = query[0].reshape(kv_heads, groups, q_len, dim)
    out = query.new_empty(kv_heads, groups, q_len, dim)
    attn = torch.empty(kv_heads, q_len, kv_len, dtype=torch.float32, device=query.device)
    hidden = ~visible_mask(q_len, q_len, None, query.device)  # this call's own (q, q) causal block
    scores_buf = hook.scratch("scores", groups * tile * kv_len, query, query.dtype)
    probs_buf = hook.scratch("probs", groups * tile * kv_len, query, torch.float32)
    for head in range(kv_heads):
        key_t = key[0, head].transpose(0, 1)
        for start in range(0, q_len, tile):
            stop = min(q_len, start + tile)
            n = stop - start
            scores = scores_buf[: groups * n * kv_len].view(groups * n, kv_len)
            torch.matmul(grouped[head, :, start:stop].reshape(groups * n, dim), key_t, out=scores)
            scores = scores.mul_(scaling).view(groups, n, kv_len)
            if softcap is not None:
                scores.div_(softcap).tanh_().mul_(softcap)
            scores[..., kv_len - q_len :].masked_fill_(hidden[start:stop], float("-inf"))
            if held is not None:
                scores.masked_fill_(~held[head], float("-inf"))
            probs = probs_buf[: groups * n * kv_len].view(groups, n, kv_len)
            logits = scores
            if scores.dtype != torch.float32:  # bf16 / fp16: the softmax in fp32, as _eager's
                logits = hook.scratch("logits", groups * tile * kv_len, query, torch.float32)
                logits = logits[: groups * n * kv_len].view(groups, n, kv_len).copy_(scores)
            torch.ops.aten._softmax.out(logits, -1, False, out=probs)
            # the output reads the probabilities in the values' dtype (the scores' buffer is free now)
            if value.dtype == torch.float32:
                weights = probs
            else:
                weights = scores.copy_(probs) if scores.dtype == value.dtype else probs.to(value.dtype)
            mixed = torch.matmul(weights.view(groups * n, kv_len), value[0, head])
            out[head, :, start:stop] = mixed.view(groups, n, dim)
            torch.mean(probs, dim=0, out=attn[head, start:stop])
    return out.view(1, hq, q_len, dim), attn


def namm_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    hook: LayerHook | None = kwargs.get("namm_hook")
    if hook is None:
        raise RuntimeError("namm attention was called outside the namm engine; use the model's own attention.")
    if query.shape[0] != 1:
        raise ValueError("The namm engine runs one sequence at a time (batch size 1).")
    if kwargs.get("s_aux") is not None:
        raise ValueError("Models with attention sinks (s_aux) are not supported by the namm engine.")
    layer = module.layer_idx
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    softcap = kwargs.get("softcap")
    q_len, kv_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    managed = layer in hook.managed
    window = None if managed else window
    padding = hook.padding.get(layer) if managed else None
    held = None if padding is None else held_slots(padding, kv_len)  # (kv_heads, K)

    if managed and hook.need_attn:
        with hook.timer("attention read"):
            # attn (kv_heads, q, K): query heads averaged per KV group
            out, attn = _eager_read(query, key, value, scaling, softcap, groups, held, hook)
        hook.observe(layer, attn, key[0], **hook.extras(query, value))
    else:
        if softcap is not None:
            out, _ = _eager(query, key, value, scaling, softcap, groups, window, held)
        else:
            mask = visible_mask(q_len, kv_len, window, query.device)
            if held is not None:  # (Hq, q, K): each query head hides the padding of its KV head
                mask = mask[None] & held.repeat_interleave(groups, dim=0)[:, None, :]
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=groups > 1)
        if managed:
            hook.observe(layer, None, key[0], **hook.extras(query, value))
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, namm_attention)
