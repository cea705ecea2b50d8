"""One sequence run under a memory policy: the cache, absolute positions, the eviction schedule.

:class:`MemorySequence` feeds tokens through the model in chunks, keeps per-layer absolute
positions of every cached token, calls the policy after each forward call and, at eviction steps,
gathers every managed layer's keys and values down to the indices the policy keeps. The cache
tensors really shrink: each layer holds ``(1, kv_heads, n_keep, head_dim)``.

Ragged layers: a policy may let the KV heads of a layer keep different numbers of tokens (Ada-KV,
the NAMM's per-head threshold). The layer's tensors are then padded to its longest head: head h
holds ``padding[h]`` padded slots first, then its own tokens in order, then every token fed later.
Padded slots are hidden from every query (:mod:`namm.attention`), carry position -1, and count
neither as kept tokens nor in ``lengths()``; the cache bytes (``kv_bytes``) count them, since they
are stored. The next step that prunes the layer drops them.
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from namm.attention import ATTN_IMPLEMENTATION, LayerHook
from namm.policies.base import CacheSpec, MemoryPolicy, SidePass
from namm.prefix import PrefixStore, prefix_key, restore_snapshot, take_snapshot
from namm.profiling import NULL_TIMER
from namm.report import CacheMeter, MemoryReport


@dataclass
class EngineConfig:
    """The schedule every policy runs on.

    chunk_size: prefill chunk length in tokens (the reference uses 128).
    delay: eviction period in tokens processed, prefill and decoding alike (reference 512).
    evict_at_prefill_end: also evict once when the prompt is fully read, so budgets hold while
        decoding (the reference NAMM only evicts on the ``delay`` grid; set False to match it).
    evict_during_prefill: evict on the ``delay`` grid while reading the prompt, which bounds peak
        memory (design invariant 5). False gives the one-shot prompt compression of methods such
        as SnapKV as published: the whole prompt is cached, then pruned once at its end.
    record_evictions: keep, per eviction step, the absolute positions each layer kept (tests).
    """

    chunk_size: int = 128
    delay: int = 512
    evict_at_prefill_end: bool = True
    evict_during_prefill: bool = True
    record_evictions: bool = False

    def __post_init__(self) -> None:
        for name in ("chunk_size", "delay"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive number of tokens, got {value!r}.")


@dataclass(frozen=True)
class Rope:
    """The model's rotary embedding as the managed (full-attention) layers apply it, for
    :attr:`CacheSpec.rope`: ``rope(positions (n,))`` -> cos, sin (n, rotary_dim) float32."""

    embedding: torch.nn.Module
    layer_type: str | None = None  # Gemma-3 keeps one RoPE per layer type

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.embedding.buffers()).device
        probe = torch.zeros(1, dtype=torch.float32, device=device)  # sets the output dtype
        extra = (self.layer_type,) if self.layer_type is not None else ()
        with torch.no_grad():
            cos, sin = self.embedding(probe, positions.to(device)[None], *extra)
        return cos[0].float(), sin[0].float()


def rotary_embedding(model) -> Rope | None:
    """The model's :class:`Rope`, or None if it has no ``rotary_emb`` module where transformers puts it."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    embedding = getattr(decoder, "rotary_emb", None)
    if embedding is None or next(embedding.buffers(), None) is None:
        return None
    typed = "layer_type" in inspect.signature(embedding.forward).parameters
    return Rope(embedding, "full_attention" if typed else None)


def cache_spec(model) -> CacheSpec:
    """Which layers a policy manages: all but those with their own sliding window."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * n_layers
    managed = tuple(i for i, t in enumerate(layer_types) if t == "full_attention")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return CacheSpec(num_layers=n_layers, managed_layers=managed, kv_heads=kv_heads, head_dim=head_dim,
                     rope=rotary_embedding(model))


def cache_argument(model) -> str:
    """The forward argument that takes the cache: ``cache`` in newer transformers 5.x releases
    (which deprecate ``past_key_values``), ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


@contextmanager
def namm_attention_installed(model):
    """Route the model's attention through :func:`namm.attention.namm_attention` for a while."""
    previous = model.config._attn_implementation
    if previous != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    try:
        yield
    finally:
        if previous != ATTN_IMPLEMENTATION:
            model.set_attn_implementation(previous)


class MemorySequence:
    """The state of one sequence: feed tokens, get logits; the policy prunes on schedule.

    ``tokenizer`` is handed to policies that run a side pass (KVzip builds its repeat prompt with
    it); ``side_tokens`` counts the tokens such passes ran.

    Inputs are token ids or, for any model fed embeddings (a Decision Transformer's return, state
    and action vectors, a multimodal model's projected inputs), ``inputs_embeds`` rows: both go
    through the same chunks, positions, policy calls and eviction schedule. Policies that re-read
    the context as token ids (a side pass, KVzip) refuse embedding inputs.
    """

    def __init__(self, model, policy: MemoryPolicy, config: EngineConfig, tokenizer=None):
        self.model, self.policy, self.config, self.tokenizer = model, policy, config, tokenizer
        self.spec = cache_spec(model)
        self.device = next(model.parameters()).device
        self.cache = DynamicCache(config=model.config)
        self._cache_arg = cache_argument(model)  # once per sequence, not per forward call
        self.seen = 0
        self.positions: dict[int, torch.Tensor] = {
            layer: torch.empty(self.spec.kv_heads, 0, dtype=torch.long, device=self.device)
            for layer in self.spec.managed_layers
        }
        self.padding: dict[int, torch.Tensor] = {}  # ragged layers: (kv_heads,) leading padded slots
        self._pad_counts: dict[int, list[int]] = {}  # the same, on the host (for lengths())
        self.meter = CacheMeter(list(self.spec.managed_layers))
        self.eviction_log: list[tuple[int, dict[int, torch.Tensor]]] = []
        self.timer = getattr(policy, "timer", NULL_TIMER)  # namm.profiling sections
        self.hook = LayerHook(
            managed=frozenset(self.spec.managed_layers),
            observe=self._observe,
            need_attn=bool(policy.needs_attention),
            need_queries=bool(getattr(policy, "needs_queries", False)),
            need_values=bool(getattr(policy, "needs_values", False)),
            timer=self.timer,
            padding=self.padding,
        )
        self.side_tokens = 0
        #: seconds another sequence spent reading the prefix this one restored from a PrefixStore
        #: (the compute this sequence skipped; 0.0 when it read its whole prompt itself)
        self.prefix_reused_s = 0.0
        # ids and positions of the tokens some managed layer still holds, for side passes only
        self._side = bool(getattr(policy, "needs_side_pass", False))
        self._ids = torch.empty(0, dtype=torch.long, device=self.device)
        self._id_positions = torch.empty(0, dtype=torch.long, device=self.device)
        policy.reset(self.spec)

    # -- feeding -------------------------------------------------------------------------------
    def feed(self, ids: torch.Tensor | None = None, all_logits: bool = False, end_of_prompt: bool = False,
             prefix_store: PrefixStore | None = None, *, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``ids`` (1-D or (1, n)), or ``embeds`` ((n, hidden) or (1, n, hidden), the model's
        ``inputs_embeds``), through the model in scheduled chunks.

        Returns logits (n, vocab) if ``all_logits`` else the last position's (vocab,): whatever the
        model's head outputs (a Decision Transformer's action head, see :mod:`namm.rl.model`).
        ``prefix_store``: on an empty sequence, read the tokens up to the first eviction step from
        the store (or compute them and store them), see :mod:`namm.prefix` (token ids only).
        """
        if ids is None and embeds is None:
            raise ValueError("feed() needs token ids or embeds.")
        inputs = ids.reshape(-1).to(self.device) if embeds is None else self._check_embeds(embeds, ids, prefix_store)
        n = inputs.shape[0]
        outputs, done, pending = [], 0, None
        t0 = time.perf_counter()
        if prefix_store is not None and self.seen == 0 and not all_logits:
            n_prefix = self.first_eviction_point(n, end_of_prompt)
            key = prefix_key(self, inputs[:n_prefix])
            snap = None if key is None else prefix_store.get(key)
            if snap is not None:
                outputs.append(restore_snapshot(self, snap)[None])
                self.prefix_reused_s += snap.compute_s
                done = n_prefix
                self._evict_on_grid(end_of_prompt, end_of_prompt and done == n)
            elif key is not None:
                pending = (key, n_prefix)
        for start, stop in list(self._chunks(n - done)):
            logits = self._forward(inputs[done + start : done + stop], all_logits)
            outputs.append(logits)
            if pending is not None and self.seen == pending[1]:
                prefix_store.put(pending[0], take_snapshot(self, logits[-1], time.perf_counter() - t0))
            self._evict_on_grid(end_of_prompt, end_of_prompt and done + stop == n)
        if end_of_prompt and self.config.evict_at_prefill_end:
            if self.seen % self.config.delay != 0 or not self.config.evict_during_prefill:
                self.evict(prompt_end=True)
        if end_of_prompt:
            self.meter.end_prompt()
        return torch.cat(outputs, dim=0) if all_logits else outputs[-1][-1]

    def _check_embeds(self, embeds: torch.Tensor, ids: torch.Tensor | None,
                      prefix_store: PrefixStore | None) -> torch.Tensor:
        """``embeds`` as (n, hidden) on the model's device and dtype, or a clear error."""
        if ids is not None:
            raise ValueError("feed() takes token ids or embeds, not both.")
        if prefix_store is not None:
            raise ValueError("Prefix sharing keys prompts by their token ids; feed embeds without a prefix_store.")
        if self._side:
            raise ValueError(
                f"{type(self.policy).__name__} re-reads the cached context as token ids in a side pass, which "
                "embedding inputs do not have; choose a policy without one (e.g. snapkv, h2o, tova).")
        hidden = self.model.get_input_embeddings().embedding_dim
        if embeds.dim() == 3 and embeds.shape[0] == 1:
            embeds = embeds[0]
        if embeds.dim() != 2 or embeds.shape[-1] != hidden or embeds.shape[0] == 0:
            raise ValueError(f"embeds must be (n, {hidden}) or (1, n, {hidden}) with n >= 1 (batch size 1), "
                             f"got shape {tuple(embeds.shape)}.")
        param = next(self.model.parameters())
        return embeds.to(device=param.device, dtype=param.dtype)

    def _evict_on_grid(self, end_of_prompt: bool, prompt_end: bool) -> None:
        if self.seen % self.config.delay == 0 and (self.config.evict_during_prefill or not end_of_prompt):
            self.evict(prompt_end=prompt_end)

    def first_eviction_point(self, n: int, end_of_prompt: bool) -> int:
        """Tokens of an ``n``-token feed read before its first eviction step (from an empty cache)."""
        grid = self.config.evict_during_prefill or not end_of_prompt
        return self.config.delay if grid and self.config.delay <= n else n

    def _chunks(self, n: int):
        """Split points at absolute multiples of chunk_size and of delay."""
        start, cfg, base = 0, self.config, self.seen
        while start < n:
            pos = base + start
            to_chunk = cfg.chunk_size - pos % cfg.chunk_size
            to_evict = cfg.delay - pos % cfg.delay
            stop = min(n, start + to_chunk, start + to_evict)
            yield start, stop
            start = stop

    def _forward(self, inputs: torch.Tensor, all_logits: bool) -> torch.Tensor:
        """One forward call of token ids (n,) int64, or of embeddings (n, hidden)."""
        n = inputs.shape[0]
        pos = torch.arange(self.seen, self.seen + n, device=self.device)
        for layer in self.positions:
            self.positions[layer] = torch.cat([self.positions[layer], pos.expand(self.spec.kv_heads, n)], dim=1)
        given = {"input_ids": inputs[None]} if inputs.dim() == 1 else {"inputs_embeds": inputs[None]}
        with torch.inference_mode():
            out = self.model(
                **given,
                position_ids=pos[None],
                use_cache=True,
                logits_to_keep=0 if all_logits else 1,
                namm_hook=self.hook,
                **{self._cache_arg: self.cache},
            )
        self.seen += n
        if self._side:
            self._ids, self._id_positions = torch.cat([self._ids, inputs]), torch.cat([self._id_positions, pos])
        self.meter.after_forward(self.lengths(), n, self.seen, self.kv_bytes())
        return out.logits[0].float()

    def _observe(self, layer: int, attn: torch.Tensor | None, keys: torch.Tensor, **extras: torch.Tensor) -> None:
        positions = self.positions[layer]
        if keys.shape[1] != positions.shape[1]:
            raise RuntimeError(
                f"layer {layer}: cache holds {keys.shape[1]} keys but {positions.shape[1]} positions are tracked; "
                "the model's cache is not the engine's (is another cache or generate() in use?)"
            )
        self.policy.observe(layer, attn, keys, positions, **extras)

    # -- side passes (policies with needs_side_pass) ---------------------------------------------
    def side_pass(self, prompt_end: bool) -> SidePass:
        """The :class:`SidePass` of this eviction step: the tokens still held, and a runner."""
        return SidePass(token_ids=self._ids, token_positions=self._id_positions, prompt_end=prompt_end,
                        tokenizer=self.tokenizer, run=self._side_forward)

    def _side_forward(self, ids: torch.Tensor, observe) -> None:
        """Run ``ids`` after the cache with ``observe(layer, queries, keys)`` on every managed layer,
        then put every cache layer back as it was (the forward only appends, by ``torch.cat``, so
        the saved tensors are untouched): no trace in the cache, positions, ``seen`` or meter."""
        ids = ids.reshape(-1).to(self.device)
        pos = torch.arange(self.seen, self.seen + ids.numel(), device=self.device)
        hook = LayerHook(managed=self.hook.managed, need_queries=True, padding=self.padding,
                         observe=lambda layer, attn, keys, queries: observe(layer, queries, keys))
        saved = [dict(layer.__dict__) for layer in self.cache.layers]
        try:
            with torch.inference_mode():
                self.model(input_ids=ids[None], position_ids=pos[None], use_cache=True, logits_to_keep=1,
                           namm_hook=hook, **{self._cache_arg: self.cache})
        finally:
            for layer, state in zip(self.cache.layers, saved):
                layer.__dict__.clear()
                layer.__dict__.update(state)
        self.side_tokens += ids.numel()

    def _forget_evicted_ids(self) -> None:
        """Keep the ids of the tokens some managed layer still holds (padding, at -1, matches none)."""
        held = torch.cat([p.reshape(-1) for p in self.positions.values()])
        keep = torch.isin(self._id_positions, held)
        self._ids, self._id_positions = self._ids[keep], self._id_positions[keep]

    # -- eviction ------------------------------------------------------------------------------
    def evict(self, prompt_end: bool = False) -> None:
        """Ask the policy which tokens each managed layer keeps and shrink the cache to them.
        ``prompt_end``: this is the eviction step that ends the prompt (told to side passes)."""
        if self._side:
            self.policy.side_pass(self.side_pass(prompt_end))
        with self.timer("cache gather"):  # the policy's own sections inside are theirs
            kept = self._prune()
        if self._side:
            self._forget_evicted_ids()
        self.meter.after_eviction(self.lengths())
        if self.config.record_evictions:
            self.eviction_log.append((self.seen, {k: v.clone() for k, v in kept.items()}))

    def _prune(self) -> dict[int, torch.Tensor]:
        """One eviction step's selection and gathers; returns the kept positions of each pruned layer."""
        self.policy.begin_eviction()
        chosen: dict[int, torch.Tensor] = {}
        for layer in self.spec.managed_layers:
            idx = self.policy.select(layer)
            if idx is not None:
                chosen[layer] = self._check_shape(layer, idx)
        ragged = self._check_order(chosen)
        kept: dict[int, torch.Tensor] = {}
        for layer, idx in chosen.items():
            if layer in ragged:
                self._gather_ragged(layer, idx)
            else:
                cache_layer = self.cache.layers[layer]
                gather = idx[None, :, :, None].expand(1, -1, -1, cache_layer.keys.shape[-1])
                cache_layer.keys = cache_layer.keys.gather(2, gather)
                cache_layer.values = cache_layer.values.gather(2, gather)
                self.positions[layer] = self.positions[layer].gather(1, idx)
                if self.padding.pop(layer, None) is not None:
                    del self._pad_counts[layer]
            kept[layer] = self.positions[layer]
        return kept

    def _gather_ragged(self, layer: int, idx: torch.Tensor) -> None:
        """Shrink ``layer`` to a ragged selection: idx (kv_heads, n) with -1 on each head's padding."""
        pad = idx < 0  # (kv_heads, n), True on the leading padded slots
        safe = idx.clamp_min(0)  # padded slots copy some kept token: hidden from attention, never read
        cache_layer = self.cache.layers[layer]
        gather = safe[None, :, :, None].expand(1, -1, -1, cache_layer.keys.shape[-1])
        cache_layer.keys = cache_layer.keys.gather(2, gather)
        cache_layer.values = cache_layer.values.gather(2, gather)
        self.positions[layer] = self.positions[layer].gather(1, safe).masked_fill_(pad, -1)
        self.padding[layer] = pad.sum(dim=1)
        self._pad_counts[layer] = self.padding[layer].tolist()

    def _check_shape(self, layer: int, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(self.device, torch.long)
        if idx.dim() != 2 or idx.shape[0] != self.spec.kv_heads or idx.shape[1] == 0:
            raise RuntimeError(
                f"{type(self.policy).__name__}.select({layer}) returned shape {tuple(idx.shape)}; "
                f"expected (kv_heads={self.spec.kv_heads}, n_keep>0)."
            )
        return idx

    def _check_order(self, chosen: dict[int, torch.Tensor]) -> set[int]:
        """Every layer's indices strictly ascending and in range, -1 (padding of a ragged selection)
        only before a head's first index and never a whole row, with one host sync per step.
        Returns the ragged layers (those with padding)."""
        if not chosen:
            return set()
        checks = torch.stack([torch.stack([
            (idx.min() < -1) | (idx.max() >= self.positions[layer].shape[1]) | (idx[:, -1] < 0).any()
            | ((idx[:, 1:] <= idx[:, :-1]) & ((idx[:, 1:] >= 0) | (idx[:, :-1] >= 0))).any(),
            (idx[:, 0] < 0).any(),
        ]) for layer, idx in chosen.items()])  # (layers, 2) bool: bad, ragged
        bad, ragged = checks.cpu().unbind(1)
        if bool(bad.any()):
            layer = list(chosen)[int(bad.int().argmax())]
            raise RuntimeError(
                f"{type(self.policy).__name__}.select({layer}) must return strictly ascending indices in "
                f"[0, {self.positions[layer].shape[1]}), each row possibly led by -1 (padding of a head "
                "that keeps fewer tokens), never only -1."
            )
        return {layer for layer, r in zip(chosen, ragged.tolist()) if r}

    # -- measurements --------------------------------------------------------------------------
    def lengths(self) -> list[float]:
        """Tokens each managed layer keeps now: its cache length, or for a ragged layer the mean
        over its KV heads of the tokens each holds (padding not counted)."""
        out = []
        for layer in self.spec.managed_layers:
            n = int(self.positions[layer].shape[1])
            pads = self._pad_counts.get(layer)
            out.append(n if pads is None else n - sum(pads) / len(pads))
        return out

    def head_lengths(self) -> list[list[int]]:
        """Per managed layer, the tokens each KV head holds now (padding not counted)."""
        out = []
        for layer in self.spec.managed_layers:
            n = int(self.positions[layer].shape[1])
            out.append([n - p for p in self._pad_counts.get(layer, [0] * self.spec.kv_heads)])
        return out

    def _held(self):
        """(layer index, bytes of K and V held, tokens held) for every layer the cache has filled."""
        for i, cache_layer in enumerate(self.cache.layers):
            if not getattr(cache_layer, "is_initialized", True) or cache_layer.keys is None:
                continue
            keys, values = cache_layer.keys, cache_layer.values
            yield i, keys.numel() * keys.element_size() + values.numel() * values.element_size(), keys.shape[2]

    def kv_bytes(self) -> int:
        """Bytes of K and V held now, all layers (sliding-window layers included)."""
        return sum(held for _, held, _ in self._held())

    def report(self) -> MemoryReport:
        """The memory report so far (definitions in :mod:`namm.report`)."""
        kv_full = sum(held // max(n, 1) * self.seen if i in self.positions else held for i, held, n in self._held())
        report = self.meter.report(self.kv_bytes(), kv_full)
        report.head_len = self.head_lengths()
        return report
