"""Run a memory policy inside stock transformers ``model.generate`` and ``pipeline(...)``.

::

    import namm
    from transformers import pipeline

    policy = namm.make_policy("h2o", keep_ratio=0.25)
    with namm.attach(model, policy, delay=512, chunk_size=128) as memory:
        out = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=64)
        text = pipeline("text-generation", model=model, tokenizer=tokenizer)(prompt, max_new_tokens=64)
    print(memory.report().summary())

While attached, every forward call of ``model`` runs through the engine's own
:class:`~namm.sequence.MemorySequence`: the first call of a sequence (the whole prompt, as
``generate`` sends it) is split into ``chunk_size`` chunks on the ``delay`` grid and the policy
evicts during it exactly as :meth:`namm.engine.Engine.generate` does; each later call (one decoded
token) is fed on the same schedule. The attention goes through the ``namm`` attention function,
positions stay absolute (token ``t`` gets position ``t`` however small the pruned cache is) and the
cache ``generate`` holds really shrinks. Greedy tokens equal ``Engine.generate`` with the same
policy and schedule.

Why stock ``generate`` stays consistent with a pruned cache (transformers 5.x, tested on 5.24):
it computes ``position_ids`` once from the prompt and then adds one per step, and
``prepare_inputs_for_generation`` slices the last token off ``input_ids``; neither reads the cache
length, and every call checks that the positions it sends equal the tokens read so far. Its 2-D
``attention_mask`` grows with the tokens seen, not with the pruned cache, so it is only checked
for padding and then left out: the ``namm`` attention builds the causal mask from the shapes.
The forward returns the logits ``generate`` asks for (``logits_to_keep``) and the same cache object.

Limits: batch size 1 (one sequence per ``generate`` call; a pipeline over many prompts is fine
with its default ``batch_size=1``), no beam search and no ``num_return_sequences > 1`` (those
share one cache between hypotheses), no assisted / speculative decoding, no padding, token ids
only (no ``inputs_embeds``), a ``DynamicCache`` only (no static or quantized cache asked for in
the call, no ``prefill_chunk_size``: ``chunk_size`` is the prefill chunk; a checkpoint's *default*
``cache_implementation``, such as Gemma's, is replaced by the dynamic cache), and each ``generate``
call starts a new sequence (continuing a pruned cache across calls is refused: pass the whole
conversation).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from namm.engine import Engine
from namm.policies.base import MemoryPolicy
from namm.policies.full import FullCache
from namm.report import MemoryReport
from namm.sequence import EngineConfig, MemorySequence

__all__ = ["MemoryAttachment", "attach"]

_MISSING = object()
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# generate() options that cannot run under a per-sequence pruned cache: name -> allowed values
_REFUSED = {
    "num_beams": (None, 1),
    "num_return_sequences": (None, 1),
    "prefill_chunk_size": (None,),
    "cache_implementation": (None, "dynamic"),
    "assistant_model": (None,),
    "prompt_lookup_num_tokens": (None,),
    "use_cache": (None, True),
}
_WHY = {
    "num_beams": "beam search keeps several hypotheses in one cache; use greedy or sampling (num_beams=1)",
    "num_return_sequences": "each returned sequence needs its own pruned cache; call generate once per sample",
    "prefill_chunk_size": "attach() chunks the prompt itself (its chunk_size); drop prefill_chunk_size",
    "cache_implementation": "namm prunes a DynamicCache; drop cache_implementation (or use 'dynamic')",
    "assistant_model": "assisted decoding rolls the cache back, which a pruned cache cannot do",
    "prompt_lookup_num_tokens": "prompt-lookup decoding rolls the cache back, which a pruned cache cannot do",
    "use_cache": "the memory policy manages the KV cache; use_cache=False would bypass it",
}


def attach(model, policy: MemoryPolicy | None = None, config: EngineConfig | None = None,
           **overrides: Any) -> MemoryAttachment:
    """Run ``policy`` inside ``model.generate`` / ``pipeline`` while the ``with`` block lasts.

    ``policy`` defaults to keeping everything; ``config`` (an :class:`~namm.sequence.EngineConfig`)
    or keyword overrides (``chunk_size=128, delay=512, evict_at_prefill_end=...``) set the
    schedule, which otherwise is the policy's own (a NAMM's recorded one) or the defaults, as for
    :class:`~namm.engine.Engine`. Batch size 1, no beams: see the module docstring for the limits.
    """
    return MemoryAttachment(model, policy, config, **overrides)


class MemoryAttachment:
    """The live link between a model and a memory policy; use it as a context manager.

    ``report()`` is the memory report of the last sequence (the last ``generate`` call),
    ``reports`` one per finished ``generate`` call, ``sequence`` the live
    :class:`~namm.sequence.MemorySequence` (its cache, absolute ``positions``, ``seen``).
    """

    def __init__(self, model, policy: MemoryPolicy | None = None, config: EngineConfig | None = None,
                 **overrides: Any) -> None:
        self.engine = Engine(model, policy=policy, config=config, **overrides)
        self.model = model
        self.policy = policy or FullCache()
        self.config = self.engine.config
        self.sequence: MemorySequence | None = None
        self.reports: list[MemoryReport] = []
        self._attention = None
        self._saved: dict[str, Any] = {}

    # -- attaching -----------------------------------------------------------------------------
    def __enter__(self) -> MemoryAttachment:
        model = self.model
        if getattr(model, "_namm_attachment", None) is not None:
            raise RuntimeError("This model already has a memory policy attached; leave that `with attach(...)` block first.")
        self._attention = self.engine.running()
        self._attention.__enter__()
        self._saved = {name: model.__dict__.get(name, _MISSING) for name in ("forward", "generate")}
        model.forward = self._wrap_forward(model.forward)
        model.generate = self._wrap_generate(model.generate)
        model._namm_attachment = self
        return self

    def __exit__(self, *exc_info) -> None:
        model = self.model
        for name, previous in self._saved.items():
            if previous is _MISSING:
                model.__dict__.pop(name, None)
            else:
                setattr(model, name, previous)
        model.__dict__.pop("_namm_attachment", None)
        self._attention.__exit__(*exc_info)
        self._attention = None

    def report(self) -> MemoryReport:
        """The memory report of the current (or last) sequence."""
        if self.sequence is None:
            raise RuntimeError("No sequence has run under this attachment yet; call model.generate(...) first.")
        return self.sequence.report()

    # -- generate ------------------------------------------------------------------------------
    def _wrap_generate(self, original):
        @functools.wraps(original)
        def generate(*args, **kwargs):
            self._check_generate(args, kwargs)
            self.sequence = None  # every generate call reads its prompt afresh
            out = original(*args, **kwargs)
            if self.sequence is not None:
                self.reports.append(self.sequence.report())
            return out

        return generate

    def _check_generate(self, args: tuple, kwargs: dict) -> None:
        inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 2 and inputs.shape[0] != 1:
            raise ValueError(
                f"namm.attach runs one sequence per generate call (batch size 1), got a batch of {inputs.shape[0]}; "
                "call generate once per prompt (a pipeline does this with its default batch_size=1)."
            )
        gen_config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        if "cache_implementation" not in kwargs and getattr(gen_config, "cache_implementation", None) is not None:
            # a checkpoint's default (e.g. Gemma's "hybrid" static cache): namm needs its DynamicCache instead
            kwargs["cache_implementation"] = "dynamic"
        for name, allowed in _REFUSED.items():
            value = kwargs.get(name, getattr(gen_config, name, None))
            if value not in allowed:
                raise ValueError(f"namm.attach does not support {name}={value!r}: {_WHY[name]}.")

    # -- forward -------------------------------------------------------------------------------
    def _wrap_forward(self, original):
        signature = inspect.signature(original)
        var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

        @functools.wraps(original)
        def forward(*args, **kwargs):
            if "namm_hook" in kwargs:  # the engine's own chunk call (cache argument named as `original` wants)
                return original(*args, **kwargs)
            arguments = dict(signature.bind(*args, **kwargs).arguments)
            extra = dict(arguments.pop(var_kw, {})) if var_kw else {}
            return self._forward(arguments, extra)

        return forward

    def _forward(self, arguments: dict[str, Any], extra: dict[str, Any]):
        """One forward call of ``model``: arguments by name; ``extra`` the ``**kwargs`` part."""
        ids = arguments.get("input_ids")
        self._check_inputs(ids, arguments, extra)
        cache = arguments.get("cache")
        if cache is None:
            cache = arguments.get("past_key_values", extra.pop("past_key_values", None))
        if self.sequence is None or cache is None or cache is not self.sequence.cache:
            self.sequence = self._start(cache)
            first = True
        else:
            first = False
        seq = self.sequence
        self._check_positions(seq, arguments.get("position_ids"), extra.get("cache_position"))
        keep = arguments.get("logits_to_keep", 0)
        all_logits = not (isinstance(keep, int) and keep == 1)
        logits = seq.feed(ids.reshape(-1), all_logits=all_logits, end_of_prompt=first)
        logits = (logits if all_logits else logits[None])[None]  # (1, n or 1, vocab)
        if isinstance(keep, int) and keep > 1:
            logits = logits[:, -keep:]
        elif isinstance(keep, torch.Tensor):
            logits = logits[:, keep.to(logits.device)]
        use_cache = arguments.get("use_cache")
        out = CausalLMOutputWithPast(logits=logits, **{_CACHE_FIELD: seq.cache if use_cache is not False else None})
        return out if arguments.get("return_dict", extra.get("return_dict", True)) is not False else out.to_tuple()

    def _check_inputs(self, ids, arguments: dict[str, Any], extra: dict[str, Any]) -> None:
        if ids is None:
            raise ValueError("namm.attach feeds token ids; inputs_embeds is not supported (pass input_ids).")
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(
                f"namm.attach runs one sequence at a time (batch size 1), got input_ids of shape {tuple(ids.shape)}; "
                "beam search and batched generation are not supported."
            )
        if arguments.get("labels") is not None:
            raise ValueError("namm.attach does not compute a loss; use namm.Engine.loglikelihood for scoring.")
        mask = arguments.get("attention_mask")
        if mask is not None and (mask.dim() != 2 or not bool((mask == 1).all())):
            raise ValueError("namm.attach needs an unpadded prompt (attention_mask all ones, batch size 1).")
        for flag in ("output_attentions", "output_hidden_states"):
            if arguments.get(flag, extra.get(flag)):
                raise ValueError(f"namm.attach does not return {flag.split('_', 1)[1]}; drop {flag}=True.")

    def _start(self, cache) -> MemorySequence:
        """A new sequence for the policy, adopting ``cache`` (the DynamicCache generate made) if given."""
        seq = self.engine.start(self.policy)
        if cache is not None:
            if not isinstance(cache, DynamicCache) or getattr(cache, "offloading", False):
                raise ValueError(f"namm.attach prunes a DynamicCache, got {type(cache).__name__}; "
                                 "drop cache_implementation / the cache you passed.")
            if cache.get_seq_length() > 0:
                raise ValueError(
                    "namm.attach starts every sequence from an empty cache; continuing a cache across generate "
                    "calls is not supported (pass the whole conversation as the prompt)."
                )
            seq.cache = cache
        return seq

    @staticmethod
    def _check_positions(seq: MemorySequence, position_ids, cache_position) -> None:
        """generate's own position bookkeeping must agree with the absolute positions namm uses."""
        for name, given in (("position_ids", position_ids), ("cache_position", cache_position)):
            if isinstance(given, torch.Tensor) and given.numel() and int(given.reshape(-1)[0]) != seq.seen:
                raise RuntimeError(
                    f"{name} starts at {int(given.reshape(-1)[0])} but this sequence has read {seq.seen} tokens; "
                    "namm.attach gives token t position t itself (was a step skipped or a cache reused?)."
                )
