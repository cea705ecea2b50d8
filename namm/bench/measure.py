"""What ``namm bench`` measures, one run at a time: prefill wall time, decoding speed, peak KV bytes,
peak process RSS and the NAMM's time split, for plain transformers and for the engine under a policy.

Plain transformers is the model's own forward (its default attention, a ``DynamicCache``): the
whole prompt in one call, then one call per greedy token, which is what ``model.generate`` runs.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from namm.profiling import SectionTimer
from namm.sequence import cache_argument

__all__ = ["Measurement", "PeakRSS", "engine_run", "plain_run", "process_rss", "prompt_ids"]


@dataclass
class Measurement:
    """One method at one prompt length (``skipped`` says why it has no numbers).

    prefill_s:          wall time of reading the prompt (chunked under the engine; one call plain).
    decode_tokens_per_s: greedy tokens per second after the prompt (None: not measured here), with
                        the eviction steps amortised: 1 / (mean decoding step without an eviction
                        + eviction step / delay). Whether a run's few decoded tokens happen to cross
                        the eviction grid does not change it.
    decode_step_s:      mean time of a decoding step that does not evict.
    eviction_s:         time of one eviction step after decoding (0 for plain transformers).
    peak_kv_bytes:      largest K and V bytes held during the prefill (the engine's memory report;
                        plain: the final cache, which is its largest).
    peak_rss_bytes:     largest resident set size of the process during the prefill.
    rss_growth_bytes:   that peak minus the resident size right before the prefill.
    kept_fraction:      cache kept at the end of the prompt / tokens read (1.0 for plain).
    sections:           the engine's time split during the prefill (:mod:`namm.profiling`).
    """

    method: str
    length: int
    tokens: int = 0
    prefill_s: float | None = None
    decode_tokens_per_s: float | None = None
    decode_tokens: int = 0
    decode_step_s: float | None = None
    eviction_s: float | None = None
    peak_kv_bytes: int | None = None
    peak_rss_bytes: int | None = None
    rss_growth_bytes: int | None = None
    kept_fraction: float | None = None
    sections: dict[str, float] = field(default_factory=dict)
    skipped: str | None = None


def prompt_ids(engine, length: int, seed: int = 0) -> torch.Tensor:
    """A passkey prompt of at most ``length`` tokens (raw, no chat template), as token ids."""
    from namm.tasks.synthetic import generate

    sample = generate("passkey", engine.tokenizer, length, n=1, seed=seed)[0]
    return engine.encode(sample.prompt, chat=False)[:length]


def process_rss() -> int | None:
    """Resident set size of this process in bytes (psutil, else /proc), or None if unknown."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakRSS:
    """Samples the process RSS on a thread while the block runs: ``peak`` and ``start`` in bytes."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.start: int | None = None
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        rss = process_rss()
        if rss is not None:
            self.peak = rss if self.peak is None else max(self.peak, rss)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakRSS:
        self.start = process_rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._loop, name="namm-bench-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def growth(self) -> int | None:
        return None if self.peak is None or self.start is None else self.peak - self.start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _next_token(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(-1, logits.shape[-1])[-1].argmax().reshape(1)


def plain_run(model, ids: torch.Tensor, decode_tokens: int, method: str = "plain", length: int = 0) -> Measurement:
    """The model's own prefill (one forward call) and ``decode_tokens`` greedy steps after it."""
    device = next(model.parameters()).device
    ids = ids.reshape(1, -1).to(device)
    cache_arg = cache_argument(model)
    out = Measurement(method, length or ids.shape[1], tokens=ids.shape[1], kept_fraction=1.0)
    with torch.inference_mode():
        _sync(device)
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            result = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            _sync(device)
            out.prefill_s = time.perf_counter() - t0
        cache = result.cache if getattr(result, "cache", None) is not None else result.past_key_values
        out.peak_rss_bytes, out.rss_growth_bytes = rss.peak, rss.growth
        out.peak_kv_bytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
        if decode_tokens > 0:
            token = _next_token(result.logits)
            t0 = time.perf_counter()
            for _ in range(decode_tokens):
                result = model(input_ids=token[None], use_cache=True, **{cache_arg: cache})
                token = _next_token(result.logits)
            _sync(device)
            out.decode_step_s, out.eviction_s = (time.perf_counter() - t0) / decode_tokens, 0.0
            out.decode_tokens_per_s, out.decode_tokens = 1.0 / out.decode_step_s, decode_tokens
    return out


def engine_run(engine, policy, ids: torch.Tensor, decode_tokens: int, method: str, length: int = 0) -> Measurement:
    """Read ``ids`` under ``policy`` on the engine's schedule, then decode ``decode_tokens`` greedy
    tokens; the prefill's time split comes from a :class:`~namm.profiling.SectionTimer` on the policy."""
    device = engine.device
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    timer = SectionTimer(sync=sync)
    policy.timer = timer
    out = Measurement(method, length or ids.numel(), tokens=ids.numel())
    try:
        with engine.running():
            seq = engine.start(policy)
            _sync(device)
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                logits = seq.feed(ids, end_of_prompt=True)
                _sync(device)
                out.prefill_s = time.perf_counter() - t0
            out.sections = dict(timer.seconds)
            report = seq.report()
            out.peak_kv_bytes, out.kept_fraction = report.prefill.peak_kv_bytes, report.prefill.kept_fraction
            out.peak_rss_bytes, out.rss_growth_bytes = rss.peak, rss.growth
            if decode_tokens > 0:
                _decode(seq, _next_token(logits), decode_tokens, engine.config.delay, out)
    finally:
        del policy.timer  # back to the class default (no timing)
    return out


def _decode(seq, token: torch.Tensor, n: int, delay: int, out: Measurement) -> None:
    """Decode ``n`` greedy tokens, then time one eviction step; fills the decoding fields of ``out``."""
    device, steps = seq.device, []
    for _ in range(n):
        evictions = seq.meter.evictions
        t0 = time.perf_counter()
        token = _next_token(seq.feed(token))
        _sync(device)
        if seq.meter.evictions == evictions:  # steps that crossed the grid are counted by eviction_s
            steps.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    seq.evict()
    _sync(device)
    out.eviction_s = time.perf_counter() - t0
    out.decode_step_s = sum(steps) / len(steps) if steps else None
    if out.decode_step_s:
        out.decode_tokens_per_s, out.decode_tokens = 1.0 / (out.decode_step_s + out.eviction_s / delay), n
