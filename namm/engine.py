"""The one loop that runs a causal LM under a KV-cache memory policy.

Chunked prefill, then decoding (greedy, or sampling with temperature / top-p), with the policy
called on a fixed schedule (every ``delay`` tokens processed, prefill and decoding alike). See
:mod:`namm.sequence` for the cache bookkeeping and :mod:`namm.attention` for the attention hook.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from namm.models import check_supported
from namm.policies.base import MemoryPolicy
from namm.policies.full import FullCache
from namm.prefix import PrefixStore
from namm.report import MemoryReport
from namm.sequence import EngineConfig, MemorySequence, namm_attention_installed

__all__ = ["Engine", "EngineConfig", "GenerationOutput", "format_conditions"]

log = logging.getLogger(__name__)


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    report: MemoryReport
    timings: dict[str, float] = field(default_factory=dict)
    finish_reason: str = "length"  # "eos", "stop" or "length"


class Engine:
    """Run ``model`` under a memory ``policy``.

    Parameters
    ----------
    model, tokenizer
        A transformers causal LM (batch size 1) and its tokenizer (needed for text prompts).
    policy
        The default :class:`~namm.policies.base.MemoryPolicy`; ``None`` keeps the full cache. A
        NAMM policy brings the conditions it was evolved under: without ``config`` the engine runs
        its schedule, and calls with ``chat=None`` use its chat choice (:meth:`conditions`).
    config
        The schedule (:class:`EngineConfig`); keyword overrides such as ``delay=256`` also work.
    prefix_store
        A :class:`~namm.prefix.PrefixStore`: prompts read again (under any policy that can share,
        e.g. another NAMM) reuse the state of their first ``delay`` tokens instead of recomputing it.
    """

    def __init__(self, model, tokenizer=None, policy: MemoryPolicy | None = None,
                 config: EngineConfig | None = None, prefix_store: PrefixStore | None = None, **overrides):
        check_supported(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.policy = policy
        base = config or EngineConfig(**getattr(policy, "schedule", {}))
        self.config = EngineConfig(**{**base.__dict__, **overrides}) if overrides else base
        self.device = next(model.parameters()).device
        self.prefix_store = prefix_store
        self._warned: set[tuple] = set()

    # -- building blocks -----------------------------------------------------------------------
    def start(self, policy: MemoryPolicy | None = None) -> MemorySequence:
        """A fresh sequence (empty cache, policy reset). Use inside :meth:`running`."""
        return MemorySequence(self.model, policy or self.policy or FullCache(), self.config, tokenizer=self.tokenizer)

    def running(self):
        """Context manager routing the model's attention through the engine's hook."""
        return namm_attention_installed(self.model)

    def max_length(self) -> int | None:
        config = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        return getattr(config, "max_position_embeddings", None)

    def encode(self, prompt, chat: bool | None = None) -> torch.Tensor:
        """Token ids (1-D) of a prompt given as text, a list of ids or a tensor."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("The prompt is empty; give some text to read.")
            if self.tokenizer is None:
                raise ValueError("Text prompts need a tokenizer: Engine(model, tokenizer, ...).")
            use_chat = bool(getattr(self.tokenizer, "chat_template", None)) if chat is None else chat
            if use_chat:
                if not getattr(self.tokenizer, "chat_template", None):
                    raise ValueError("chat=True but this tokenizer has no chat template; use chat=False.")
                enc = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
                )
                ids = enc["input_ids"]
            else:
                ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        else:
            ids = torch.as_tensor(prompt, dtype=torch.long)
        ids = ids.reshape(-1) if ids.dim() <= 1 or ids.shape[0] == 1 else None
        if ids is None:
            raise ValueError("The engine runs one sequence at a time; pass a single prompt (batch size 1).")
        if ids.numel() == 0:
            raise ValueError("The prompt is empty; give at least one token.")
        return ids

    def chat_for(self, chat: bool | None, policy: MemoryPolicy | None = None) -> bool | None:
        """``chat`` if given, else the choice the policy was evolved with (a NAMM's recorded
        ``chat``), else None (:meth:`generate` then uses the tokenizer's template if it has one)."""
        return chat if chat is not None else getattr(policy or self.policy, "chat", None)

    def _check_schedule(self, policy: MemoryPolicy | None) -> None:
        """Say once when a policy runs under another schedule than the one it was evolved with."""
        recorded = getattr(policy or self.policy, "schedule", {})
        differ = tuple(sorted((k, v, getattr(self.config, k)) for k, v in recorded.items()
                              if getattr(self.config, k) != v))
        if differ and differ not in self._warned:
            self._warned.add(differ)
            log.warning("the policy was evolved with %s but this engine runs %s; build the engine with "
                        "Engine(model, tokenizer, policy=...) to use its schedule",
                        ", ".join(f"{k}={v}" for k, v, _ in differ), ", ".join(f"{k}={e}" for k, _, e in differ))

    def conditions(self, policy: MemoryPolicy | None = None, chat: bool | None = None) -> dict[str, Any]:
        """What a :meth:`generate` call with ``policy`` and ``chat`` runs under: the schedule, the
        chat choice and the policy's keep rule (for reports; :func:`format_conditions` prints it)."""
        chat = self.chat_for(chat, policy)
        if chat is None:
            chat = bool(getattr(self.tokenizer, "chat_template", None))
        c = self.config
        return {"chunk_size": c.chunk_size, "delay": c.delay, "evict_at_prefill_end": c.evict_at_prefill_end,
                "evict_during_prefill": c.evict_during_prefill, "chat": chat,
                "keep": (policy or self.policy or FullCache()).describe_keep()}

    def _check_length(self, n_prompt: int, max_new_tokens: int) -> None:
        limit = self.max_length()
        if limit is not None and n_prompt + max_new_tokens > limit:
            raise ValueError(
                f"Prompt of {n_prompt} tokens + {max_new_tokens} new tokens exceeds the model's maximum length "
                f"of {limit} tokens; shorten the prompt (or truncate its middle) or lower max_new_tokens."
            )

    def eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.tokenizer, self.model.config):
            eos = getattr(source, "eos_token_id", None)
            if eos is not None:
                ids.update([eos] if isinstance(eos, int) else list(eos))
        return ids

    # -- generation ----------------------------------------------------------------------------
    def generate(
        self,
        prompt,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        chat: bool | None = None,
        seed: int | None = None,
        policy: MemoryPolicy | None = None,
    ) -> GenerationOutput:
        """Read ``prompt`` and generate up to ``max_new_tokens`` tokens under the policy."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
            raise ValueError("Sampling needs temperature > 0 and 0 < top_p <= 1.")
        self._check_schedule(policy)
        ids = self.encode(prompt, self.chat_for(chat, policy))
        self._check_length(ids.numel(), max_new_tokens)
        warpers = LogitsProcessorList()
        if do_sample:
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
        generator = torch.Generator(device="cpu").manual_seed(seed if seed is not None else 0)
        eos, tokens, finish = self.eos_ids(), [], "length"
        t0 = time.perf_counter()
        with self.running():
            seq = self.start(policy)
            logits = seq.feed(ids, end_of_prompt=True, prefix_store=self.prefix_store)
            t1 = time.perf_counter()
            for step in range(max_new_tokens):
                token = self._choose(logits, do_sample, warpers, generator, ids, tokens)
                if token in eos:
                    finish = "eos"
                    break
                tokens.append(token)
                if stop and self._hit_stop(tokens, stop):
                    finish = "stop"
                    break
                if step + 1 < max_new_tokens:
                    logits = seq.feed(torch.tensor([token]))
        t2 = time.perf_counter()
        text = self._decode(tokens, stop)
        n_new = len(tokens)
        # a prefix restored from the prefix store was read by another call: its seconds are added back,
        # so tokens/s is this sequence's own, shared or not (the wall times stay as measured)
        reused = seq.prefix_reused_s
        timings = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "total_s": t2 - t0, "prefix_reused_s": reused,
                   "tokens_per_s": (ids.numel() + n_new) / max(t2 - t0 + reused, 1e-9)}
        return GenerationOutput(text, tokens, ids.numel(), seq.report(), timings, finish)

    def _choose(self, logits, do_sample, warpers, generator, prompt_ids, tokens) -> int:
        if not do_sample:
            return int(torch.argmax(logits).item())
        context = torch.cat([prompt_ids, torch.tensor(tokens, dtype=torch.long)])[None]
        scores = warpers(context, logits[None].float().cpu())
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs[0], 1, generator=generator).item())

    def _decode(self, tokens: list[int], stop: list[str] | None) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for s in stop or []:
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
        return text

    def _hit_stop(self, tokens: list[int], stop: list[str]) -> bool:
        if self.tokenizer is None:
            return False
        tail = self.tokenizer.decode(tokens[-32:], skip_special_tokens=True)
        return any(s in tail for s in stop)

    # -- scoring -------------------------------------------------------------------------------
    def loglikelihood(self, context, continuation, policy: MemoryPolicy | None = None, chat: bool | None = None,
                      return_report: bool = False):
        """Teacher-forced sum of log p(continuation | context) with the policy evicting on schedule.

        ``context`` is formatted as for :meth:`generate` when ``chat`` is set (None: the policy's
        recorded choice, else raw); ``continuation`` is text (tokenised without special tokens) or
        ids. With ``return_report`` returns ``(loglik, n_continuation_tokens, MemoryReport)``.
        """
        logp, cont, report = self._teacher_forced(context, continuation, policy, chat)
        total = float(logp.gather(1, cont[:, None]).sum())
        return (total, int(cont.numel()), report) if return_report else total

    def answer_margins(self, context, continuation, policy: MemoryPolicy | None = None,
                       chat: bool | None = None) -> tuple[list[float], float, MemoryReport]:
        """Teacher-forced, per continuation token: log p(token) minus the largest log p of any
        other token (> 0 where the token is the model's argmax, so greedy decoding reproduces the
        whole continuation iff every margin is > 0). Returns ``(margins, loglik, MemoryReport)``;
        arguments as :meth:`loglikelihood`."""
        logp, cont, report = self._teacher_forced(context, continuation, policy, chat)
        ref = logp.gather(1, cont[:, None])[:, 0]
        others = logp.scatter(1, cont[:, None], -math.inf).max(dim=1).values
        return (ref - others).tolist(), float(ref.sum()), report

    def _teacher_forced(self, context, continuation, policy, chat):
        """(log-softmax over the vocabulary at each continuation position [n, V] float64,
        continuation ids [n] on that device, MemoryReport)."""
        self._check_schedule(policy)
        ctx = self.encode(context, chat=bool(self.chat_for(chat, policy)))
        if isinstance(continuation, str):
            if self.tokenizer is None:
                raise ValueError("Text continuations need a tokenizer: Engine(model, tokenizer, ...).")
            continuation = self.tokenizer(continuation, add_special_tokens=False).input_ids
        cont = self.encode(continuation)
        self._check_length(ctx.numel(), cont.numel())
        with self.running():
            seq = self.start(policy)
            first = seq.feed(ctx, end_of_prompt=True, prefix_store=self.prefix_store)[None]
            rest = seq.feed(cont[:-1], all_logits=True) if cont.numel() > 1 else first[:0]
        logp = torch.log_softmax(torch.cat([first, rest]).double(), dim=-1)
        return logp, cont.to(logp.device), seq.report()


def format_conditions(conditions: dict[str, Any]) -> str:
    """One line for a report: "chunk 128, delay 512, evict during prefill + at prompt end, raw prompt, keep all"."""
    c = conditions
    steps = [name for name, on in (("during prefill", c["evict_during_prefill"]),
                                   ("at prompt end", c["evict_at_prefill_end"])) if on]
    evict = "evict " + " + ".join(steps) if steps else "evict while decoding only"
    return (f"chunk {c['chunk_size']}, delay {c['delay']}, {evict}, "
            f"{'chat template' if c['chat'] else 'raw prompt'}, keep {c['keep']}")
