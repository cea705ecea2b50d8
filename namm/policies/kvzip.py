"""KVzip: keep the KV pairs the model needs to repeat its context."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from namm.policies.base import CacheSpec, SidePass
from namm.policies.ranked import RankedPolicy, protect

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with "


def repeat_suffix(tokenizer) -> str:
    """What follows the repeat request: the chat template's turn switch to the assistant (found as
    kvpress does, by formatting a dummy user turn), or a newline for a tokenizer without one."""
    if not getattr(tokenizer, "chat_template", None):
        return "\n"
    dummy = "dummy context"
    separator = "\n" + "#" * len(dummy)
    text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + separator}],
                                         add_generation_prompt=True, tokenize=False, enable_thinking=False)
    return text.split(separator)[-1]


@dataclass
class KVzip(RankedPolicy):
    """Score each cached token by the largest attention it receives while the model repeats the
    context: "Repeat the previous context exactly." and the cached text itself are teacher-forced
    after the cache, and a KV pair scores the maximum, over the repeat queries and the query heads
    of its KV group, of their attention to it. Kim et al., "KVzip: Query-Agnostic KV Cache
    Compression with Context Reconstruction", arXiv 2505.23416.

    Defaults follow the official code (snu-mllab/KVzip): the repeat prompts above (later chunks:
    "Repeat the part of the previous context exactly, starting with " and the previous chunk's last
    ``prev_postfix_size`` = 8 tokens), then the assistant turn of the chat template (kvpress's
    rule, a newline without one), then the chunk; chunks of ``chunk_size`` = 2000 tokens, each
    chunk's queries normalised over the sinks, the chunk's cached keys and the repeat keys (causal),
    scale 1/sqrt(head_dim); the first ``n_sink`` = 4 tokens always kept (kvpress; the official code
    keeps the system prompt). Softmax in float32 here (the official code uses the model dtype),
    and each KV head keeps its own top tokens with the same count per layer (no cross-layer
    budget: the official default ranks all layers' pairs together).

    Under the engine, the repeat pass runs at an eviction step over the tokens some managed layer
    still holds (the engine's :class:`SidePass`: a side forward whose KV is discarded, so the
    cache is exactly what selecting the same indices would give without it). ``every_step``:
    run it at every eviction step (prompt and decoding), which costs a forward over the held
    tokens per step; False runs it once, at the eviction step that ends the prompt, and ranks
    tokens read afterwards above the scored ones, newest first (also before that step, so the
    prompt is then read as StreamingLLM would). With ``EngineConfig(evict_during_prefill=False)``
    the first step is the end of the prompt and both settings give the paper's one-shot
    compression of the whole prompt.

    Cost: one forward per chunk over its repeat input (the held tokens plus about 10 prompt
    tokens), and per managed layer an eager softmax of its queries over the chunk's keys; the
    repeat KV (one chunk) lives only during the pass and is not in the memory report. On the tiny
    test Llama (1024-token prompt, keep_ratio 0.25, chunk 128, delay 256) the one-shot pass read
    1.01x the prompt's tokens again and ``every_step`` 2.2x; the scoring, not the forward,
    dominated the wall time there (10x a full-cache prefill, hidden size 64).
    """

    chunk_size: int = 2000
    prev_postfix_size: int = 8
    n_sink: int = 4
    every_step: bool = True
    needs_side_pass = True
    name = "kvzip"

    def __post_init__(self) -> None:
        super().__post_init__()
        for field, low in (("chunk_size", 1), ("prev_postfix_size", 0), ("n_sink", 0)):
            value = getattr(self, field)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{field} must be an int >= {low}, got {value!r}.")

    def reset(self, spec: CacheSpec) -> None:
        super().reset(spec)
        self._scores: dict[int, torch.Tensor] = {}  # layer -> (kv_heads, cache_len), NaN: not scored

    def update(self, layer: int, attn: torch.Tensor | None, keys: torch.Tensor, positions: torch.Tensor,
               **extras: torch.Tensor) -> None:
        scores = self._scores.get(layer, positions.new_empty(positions.shape[0], 0, dtype=torch.float32))
        new = positions.shape[-1] - scores.shape[-1]
        self._scores[layer] = torch.cat([scores, scores.new_full((scores.shape[0], new), float("nan"))], dim=-1)

    # -- the repeat pass ---------------------------------------------------------------------------
    def repeat_inputs(self, ids: torch.Tensor, positions: torch.Tensor, tokenizer) -> list[tuple[torch.Tensor, int, int]]:
        """(repeat ids, first position, last position) per chunk of the held tokens ``ids`` (n,)."""
        def encode(text: str) -> torch.Tensor:
            return torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long, device=ids.device)

        suffix = encode(repeat_suffix(tokenizer))
        chunks, inputs = ids.split(self.chunk_size), []
        for i, (chunk, pos) in enumerate(zip(chunks, positions.split(self.chunk_size))):
            if i == 0:
                request = encode(FIRST_PROMPT)
            else:
                tail = chunks[i - 1][-self.prev_postfix_size:] if self.prev_postfix_size else chunk[:0]
                request = torch.cat([encode(NEXT_PROMPT), tail])
            inputs.append((torch.cat([request, suffix, chunk]), int(pos[0]), int(pos[-1])))
        return inputs

    def side_pass(self, side: SidePass) -> None:
        if not (self.every_step or side.prompt_end) or side.token_ids.numel() == 0:
            return
        if side.tokenizer is None:
            raise ValueError("KVzip writes its repeat prompt with the tokenizer: build the engine with one, "
                             "Engine(model, tokenizer, ...).")
        for ids, first, last in self.repeat_inputs(side.token_ids, side.token_positions, side.tokenizer):
            side.run(ids, lambda layer, queries, keys: self.score_chunk(layer, queries, keys, first, last))

    def score_chunk(self, layer: int, queries: torch.Tensor, keys: torch.Tensor, first: int, last: int) -> None:
        """Score the cached tokens at positions first..last from one chunk's repeat queries
        (kv_heads, groups, m, d) and keys (kv_heads, cache_len + m, d)."""
        positions = self._positions[layer]
        cache_len, m = positions.shape[-1], queries.shape[2]
        if keys.shape[1] != cache_len + m:
            raise RuntimeError(f"layer {layer}: the repeat pass saw {keys.shape[1] - m} cached keys, "
                               f"the policy tracks {cache_len}.")
        in_chunk = (positions >= first) & (positions <= last)  # (kv_heads, cache_len)
        visible = in_chunk | (positions < self.n_sink)
        cols = visible.any(0).nonzero().squeeze(-1)  # the cache slots any head needs
        k = torch.cat([keys[:, cols], keys[:, cache_len:]], dim=1).float()  # (kv_heads, cols + m, d)
        logits = torch.matmul(queries.float(), k[:, None].transpose(-1, -2)).mul_(k.shape[-1] ** -0.5)
        n_cols = cols.numel()  # logits: (kv_heads, groups, m, cols + m)
        logits[..., :n_cols].masked_fill_(~visible[:, None, None, cols], float("-inf"))
        logits[..., n_cols:].masked_fill_(torch.ones(m, m, dtype=torch.bool, device=k.device).triu(1), float("-inf"))
        best = logits.softmax(-1)[..., :n_cols].amax(dim=(1, 2))  # (kv_heads, cols): max over heads, queries
        scores = self._scores[layer]
        scores[:, cols] = torch.where(in_chunk[:, cols], best, scores[:, cols])

    # -- selection -----------------------------------------------------------------------------
    def scores(self, layer: int, n_keep: int) -> torch.Tensor:
        scores = self._scores[layer]
        cache_len = scores.shape[-1]
        newest_first = 1.0 + torch.arange(cache_len, device=scores.device) / cache_len  # above any attention
        scores = torch.where(scores.isnan(), newest_first.expand_as(scores), scores)
        return protect(scores, self._positions[layer], n_sink=self.n_sink)

    def prune(self, layer: int, keep: torch.Tensor) -> None:
        self._scores[layer] = self._scores[layer].gather(-1, keep)


@dataclass
class KVzipOnce(KVzip):
    """KVzip with one repeat pass, at the eviction step that ends the prompt (``every_step=False``;
    see :class:`KVzip`): registered on its own so ``namm eval --methods kvzip,kvzip-once`` compares
    the two schedules side by side."""

    every_step: bool = False
    name = "kvzip-once"
