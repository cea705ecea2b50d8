"""The performance targets of issue 13, judged pass / miss on one bench run's numbers.

* NAMM prefill <= 1.15x the full cache's at 4K tokens, keeping everything and at the kept ratio;
* its cost growing no faster than the model's: NAMM / full prefill at the longest length no more
  than at the shortest;
* decoding at the longest decode length with the kept ratio >= 1.5x the full cache's tokens/s;
* peak KV bytes during the longest prefill <= the kept cache + one chunk + one delay window, a bound
  computed from the schedule (:func:`kv_bound_bytes`).

A target whose numbers the run does not have (a skipped length, a method not run) is "n/a".
Lengths other than the issue's (4K, 1K to 8K) are used when the run has no such length: each line
says which it compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from namm.bench.measure import Measurement

PREFILL_RATIO_MAX = 1.15
DECODE_SPEEDUP_MIN = 1.5
TARGET_LENGTH = 4096
FULL = "full"
NAMM_ALL = "namm keep-all"
READ_ALL = "h2o keep-all"  # the attention read with next to no feature work: the floor of an attention-reading policy

__all__ = ["DECODE_SPEEDUP_MIN", "FULL", "NAMM_ALL", "PREFILL_RATIO_MAX", "READ_ALL", "TARGET_LENGTH", "Target",
           "evaluate_targets", "kept_label", "kv_bound_bytes"]


def kept_label(method: str, keep_ratio: float) -> str:
    """The bench's row name of a method at a kept ratio: "h2o 25%"."""
    return f"{method} {keep_ratio:.0%}"


@dataclass
class Target:
    name: str
    rule: str
    measured: str
    status: str  # "pass", "miss", "n/a", or "info" (context, not a target)


def kv_bound_bytes(n_tokens: int, keep_ratio: float, chunk_size: int, delay: int, managed_layer_bytes: Iterable[int],
                   window_layer_bytes: Iterable[tuple[int, int]] = ()) -> int:
    """The most K and V bytes a prefill of ``n_tokens`` may hold under the schedule.

    A managed layer holds at most the kept cache (``ceil(keep_ratio * n_tokens)``) plus what was
    read since the last eviction step: under one ``delay`` window, plus one chunk when the prompt
    ends off the grid. ``managed_layer_bytes``: K+V bytes per token of each managed layer;
    ``window_layer_bytes``: (bytes per token, window) of each sliding-window layer, which holds its
    window plus one chunk.
    """
    managed = min(n_tokens, math.ceil(keep_ratio * n_tokens) + chunk_size + delay)
    total = managed * sum(managed_layer_bytes)
    total += sum(per_token * min(n_tokens, window + chunk_size) for per_token, window in window_layer_bytes)
    return total


def _ratio(table, method: str, length: int, over: str = FULL) -> float | None:
    a, b = table.get((method, length)), table.get((over, length))
    if a is None or b is None or not a.prefill_s or not b.prefill_s:
        return None
    return a.prefill_s / b.prefill_s


def _pick(lengths: list[int], preferred: int) -> int | None:
    return preferred if preferred in lengths else (max(lengths) if lengths else None)


def evaluate_targets(rows: Iterable[Measurement], keep_ratio: float, kv_bounds: dict[int, int]) -> list[Target]:
    """Every target, judged on the measured ``rows``; ``kv_bounds``: length -> :func:`kv_bound_bytes`."""
    table = {(r.method, r.length): r for r in rows if r.skipped is None}
    kept = kept_label("namm", keep_ratio)
    out = []
    for method, what in ((NAMM_ALL, "keeping everything"), (kept, f"keeping {keep_ratio:.0%}")):
        lengths = sorted(n for m, n in table if m == method and (FULL, n) in table)
        at = _pick(lengths, TARGET_LENGTH)
        ratio = None if at is None else _ratio(table, method, at)
        rule = f"<= {PREFILL_RATIO_MAX:.2f}x the full cache's prefill at {at} tokens"
        out.append(_judge(f"NAMM prefill, {what}", rule, ratio, ratio is not None and ratio <= PREFILL_RATIO_MAX,
                          f"{ratio:.2f}x" if ratio is not None else "not measured"))
    for method, what in ((NAMM_ALL, "keeping everything"), (kept, f"keeping {keep_ratio:.0%}")):
        lengths = sorted(n for m, n in table if m == method and (FULL, n) in table)
        if len(lengths) < 2:
            out.append(Target(f"NAMM cost growth, {what}", "needs two lengths", "not measured", "n/a"))
            continue
        lo, hi = lengths[0], lengths[-1]
        r_lo, r_hi = _ratio(table, method, lo), _ratio(table, method, hi)
        rule = f"NAMM / full prefill at {hi} tokens <= at {lo} tokens"
        out.append(_judge(f"NAMM cost growth, {what}", rule, r_hi, r_hi is not None and r_lo is not None
                          and r_hi <= r_lo, f"{r_hi:.2f}x at {hi} vs {r_lo:.2f}x at {lo}"))
    out += _read_floor(table)
    out.append(_decode_target(table, kept, keep_ratio))
    out.append(_kv_target(table, kept, kv_bounds))
    return out


def _read_floor(table) -> list[Target]:
    """Context for the keep-all targets (status "info"): what reading the attention weights costs
    with next to no feature work (H2O keeping everything), and the NAMM keep-all over that floor."""
    lengths = sorted(n for m, n in table if m == READ_ALL and (FULL, n) in table)
    at = _pick(lengths, TARGET_LENGTH)
    if at is None:
        return []
    out = [Target("the attention read alone (h2o keep-all)", f"the floor of any policy that reads the attention "
                  f"weights, at {at} tokens", f"{_ratio(table, READ_ALL, at):.2f}x the full cache", "info")]
    if len(lengths) >= 2:  # as the NAMM's growth target: the longest length against the shortest
        lo, hi = lengths[0], lengths[-1]
        out.append(Target("its growth", f"h2o keep-all / full prefill at {hi} vs {lo} tokens",
                          f"{_ratio(table, READ_ALL, hi):.2f}x vs {_ratio(table, READ_ALL, lo):.2f}x", "info"))
    namm = _ratio(table, NAMM_ALL, at, over=READ_ALL)
    if namm is not None:
        out.append(Target("NAMM keep-all over the read", f"namm keep-all / h2o keep-all prefill at {at} tokens",
                          f"{namm:.2f}x", "info"))
    return out


def _decode_target(table, kept: str, keep_ratio: float) -> Target:
    lengths = sorted(n for (m, n), r in table.items() if m == kept and r.decode_tokens_per_s
                     and (FULL, n) in table and table[(FULL, n)].decode_tokens_per_s)
    name = f"NAMM decoding, keeping {keep_ratio:.0%}"
    if not lengths:
        return Target(name, f">= {DECODE_SPEEDUP_MIN:.1f}x the full cache's tokens/s", "not measured", "n/a")
    n = lengths[-1]
    speedup = table[(kept, n)].decode_tokens_per_s / table[(FULL, n)].decode_tokens_per_s
    return _judge(name, f">= {DECODE_SPEEDUP_MIN:.1f}x the full cache's tokens/s at {n} tokens of context", speedup,
                  speedup >= DECODE_SPEEDUP_MIN, f"{speedup:.2f}x")


def _kv_target(table, kept: str, kv_bounds: dict[int, int]) -> Target:
    lengths = sorted(n for (m, n), r in table.items() if m == kept and r.peak_kv_bytes and n in kv_bounds)
    name = "NAMM peak KV during the prefill"
    if not lengths:
        return Target(name, "<= kept cache + one chunk + one delay window", "not measured", "n/a")
    n = lengths[-1]
    peak, bound = table[(kept, n)].peak_kv_bytes, kv_bounds[n]
    return _judge(name, f"<= kept cache + one chunk + one delay window at {n} tokens ({_mib(bound)})", peak,
                  peak <= bound, f"{_mib(peak)}")


def _judge(name: str, rule: str, value, ok: bool, measured: str) -> Target:
    return Target(name, rule, measured, "n/a" if value is None else ("pass" if ok else "miss"))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
