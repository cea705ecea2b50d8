"""What a run kept: the measured cache sizes every comparison is matched on.

All fractions are over the managed layers (those the policy prunes) and relative to ``seen``, the
tokens processed so far, which is what a full cache would hold at that moment.

* A *step* is one forward call (a prefill chunk or one decoded token) followed by the eviction it
  triggered, if any (on the ``delay`` grid, or at the end of the prompt).
* The *kept fraction* at a moment is the cache length averaged over layers / ``seen``
  (= all managed layers' cached tokens / what a full cache would hold in them).
* **final**: the kept fraction at the end.
* **mean**: the average, over every token processed, of the kept fraction right after the step that
  read it and the eviction that step triggered ("on average over the run, the cache held this share
  of the tokens read so far"). Token-weighted: a 128-token prefill chunk counts 128 times, a decoded
  token once.
* **peak**: the largest kept fraction at any moment. The largest moments are right after a chunk was
  appended, before its eviction; so peak >= mean and peak >= final. Under the engine's schedule the
  first chunk is always cached whole, so the run's peak fraction is 1.0; the decode phase's peak and
  the peak in tokens (``peak_len``) and bytes (``peak_kv_bytes``) are what tell methods apart.
* **peak KV bytes**: the largest K and V storage held at any moment, all layers (sliding-window
  layers included), measured after every forward call, i.e. just before any eviction.

The prefill phase is the prompt (the tokens up to and including the feed marked ``end_of_prompt``,
with its eviction; every token if none was marked); the decode phase is everything fed after it
(generated tokens, or a scored continuation). Each has its own final / mean / peak.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field


@dataclass
class PhaseMemory:
    """The cache kept during one phase (prefill or decode); fractions are None for an empty phase.

    tokens:         tokens processed in this phase.
    kept_fraction:  kept fraction at the end of the phase (after the prompt-end eviction for prefill).
    mean_fraction:  token-weighted mean over the phase's tokens of the kept fraction after their step.
    peak_fraction:  largest kept fraction at any moment of the phase.
    peak_kv_bytes:  largest K and V bytes held at any moment of the phase.
    """

    tokens: int = 0
    kept_fraction: float | None = None
    mean_fraction: float | None = None
    peak_fraction: float | None = None
    peak_kv_bytes: int = 0

    def summary(self) -> str:
        if not self.tokens:
            return "0 tokens"
        return (f"{self.tokens} tokens, kept {self.kept_fraction:.1%} at its end (mean {self.mean_fraction:.1%}, "
                f"peak {self.peak_fraction:.1%}), peak KV {_mib(self.peak_kv_bytes)}")


@dataclass
class MemoryReport:
    """Cache kept by one sequence, per managed layer and overall (definitions: module docstring).

    tokens_seen:    tokens processed (prompt + generated).
    final_len:      per layer, tokens in the cache at the end (a ragged layer, whose KV heads keep
                    different numbers of tokens: their mean; padded slots never count).
    mean_len:       per layer, cache length after each step, averaged over the tokens processed.
    peak_len:       per layer, the largest cache length at any moment (just before an eviction).
    kept_fraction:  final kept fraction: mean over layers of final_len / tokens_seen.
    mean_fraction:  token-weighted mean over the run of the kept fraction after each step.
    peak_fraction:  largest kept fraction at any moment (1.0 under the engine's schedule).
    kv_bytes:       bytes of K and V held at the end, all layers (sliding-window layers included;
                    the padded slots of ragged layers too: they are stored).
    kv_bytes_full:  the same for a full cache (also a full cache's peak).
    peak_kv_bytes:  the largest bytes of K and V held at any moment, all layers.
    evictions:      eviction steps run.
    prefill:        the prompt phase (:class:`PhaseMemory`).
    decode:         everything fed after the prompt (:class:`PhaseMemory`).
    head_len:       per layer, tokens each KV head holds at the end (equal within a layer unless
                    the policy keeps ragged heads).
    """

    tokens_seen: int = 0
    final_len: list[float] = field(default_factory=list)
    mean_len: list[float] = field(default_factory=list)
    peak_len: list[float] = field(default_factory=list)
    kept_fraction: float = 1.0
    mean_fraction: float = 1.0
    peak_fraction: float = 1.0
    kv_bytes: int = 0
    kv_bytes_full: int = 0
    peak_kv_bytes: int = 0
    evictions: int = 0
    prefill: PhaseMemory = field(default_factory=PhaseMemory)
    decode: PhaseMemory = field(default_factory=PhaseMemory)
    head_len: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"tokens seen {self.tokens_seen}, kept {self.kept_fraction:.1%} at the end "
            f"(mean {self.mean_fraction:.1%}, peak {self.peak_fraction:.1%}), "
            f"KV {_mib(self.kv_bytes)} vs {_mib(self.kv_bytes_full)} full (peak {_mib(self.peak_kv_bytes)}), "
            f"{self.evictions} evictions; prefill {self.prefill.summary()}; decode {self.decode.summary()}"
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


class _PhaseTotals:
    """Running sums of one phase."""

    def __init__(self, n_layers: int):
        self.tokens = 0
        self.fraction_sum = 0.0  # over the phase's tokens: kept fraction after their step
        self.length_sum = [0.0] * n_layers  # over the phase's tokens: each layer's length after their step
        self.peak_fraction = 0.0
        self.peak_len = [0] * n_layers
        self.peak_kv_bytes = 0
        self.final: float | None = None  # kept fraction when the phase ended

    def memory(self, current: float) -> PhaseMemory:
        if not self.tokens:
            return PhaseMemory()
        return PhaseMemory(tokens=self.tokens, kept_fraction=current if self.final is None else self.final,
                           mean_fraction=self.fraction_sum / self.tokens, peak_fraction=self.peak_fraction,
                           peak_kv_bytes=self.peak_kv_bytes)


class CacheMeter:
    """Follows a sequence's cache through forward calls and evictions; produces a :class:`MemoryReport`.

    The sequence calls :meth:`after_forward` after every forward call, :meth:`after_eviction` after
    every eviction step and :meth:`end_prompt` once the prompt (and its last eviction) is done. A
    forward call's tokens count towards the mean once its step is over: at the next forward call,
    at the end of the prompt, or when a report is made.
    """

    def __init__(self, layers: list[int]):
        self.layers = layers
        self.phases = {"prefill": _PhaseTotals(len(layers)), "decode": _PhaseTotals(len(layers))}
        self.phase = "prefill"
        self.lengths = [0] * len(layers)  # per managed layer, tokens cached now
        self.seen = 0
        self.pending = 0  # tokens of the last forward call, not yet counted
        self.evictions = 0

    def fraction(self) -> float:
        """Kept fraction now: all managed layers' cached tokens / what a full cache would hold."""
        return sum(self.lengths) / (len(self.lengths) * self.seen) if self.lengths and self.seen else 1.0

    def after_forward(self, lengths: list[float], new_tokens: int, seen: int, kv_bytes: int) -> None:
        self._settle()
        self.lengths, self.seen, self.pending = list(lengths), seen, new_tokens
        p = self.phases[self.phase]
        p.peak_fraction = max(p.peak_fraction, self.fraction())
        p.peak_len = [max(a, b) for a, b in zip(p.peak_len, lengths)]
        p.peak_kv_bytes = max(p.peak_kv_bytes, kv_bytes)

    def after_eviction(self, lengths: list[float]) -> None:
        self.lengths = list(lengths)
        self.evictions += 1

    def end_prompt(self) -> None:
        """The prompt is read and its eviction done: what follows is decoding."""
        if self.phase == "prefill":
            self._settle()
            self.phases["prefill"].final = self.fraction()
            self.phase = "decode"

    def _settle(self) -> None:
        """Count the last forward call's tokens with the cache as it is now (after its eviction)."""
        if self.pending:
            p, n, frac = self.phases[self.phase], self.pending, self.fraction()
            p.tokens += n
            p.fraction_sum += n * frac
            p.length_sum = [s + n * length for s, length in zip(p.length_sum, self.lengths)]
            self.pending = 0

    def report(self, kv_bytes: int, kv_bytes_full: int) -> MemoryReport:
        if not self.layers or self.seen == 0:
            return MemoryReport(tokens_seen=self.seen, kv_bytes=kv_bytes, kv_bytes_full=kv_bytes_full,
                                peak_kv_bytes=kv_bytes, evictions=self.evictions)
        meter = copy.deepcopy(self)  # a report mid-run must not count the current step early
        meter._settle()
        pre, dec = meter.phases["prefill"], meter.phases["decode"]
        tokens = pre.tokens + dec.tokens
        now = meter.fraction()
        return MemoryReport(
            tokens_seen=meter.seen,
            final_len=list(meter.lengths),
            mean_len=[round((a + b) / tokens, 2) for a, b in zip(pre.length_sum, dec.length_sum)],
            peak_len=[max(a, b) for a, b in zip(pre.peak_len, dec.peak_len)],
            kept_fraction=now,
            mean_fraction=(pre.fraction_sum + dec.fraction_sum) / tokens,
            peak_fraction=max(pre.peak_fraction, dec.peak_fraction),
            kv_bytes=kv_bytes,
            kv_bytes_full=kv_bytes_full,
            peak_kv_bytes=max(pre.peak_kv_bytes, dec.peak_kv_bytes),
            evictions=meter.evictions,
            prefill=pre.memory(now),
            decode=dec.memory(now),
        )
