"""What a run kept: the measured cache sizes every comparison is matched on."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass
class MemoryReport:
    """Cache kept by one sequence, per managed layer and overall.

    tokens_seen:    tokens processed (prompt + generated).
    final_len:      per layer, tokens in the cache at the end.
    mean_len:       per layer, cache length after each forward call, weighted by the tokens of that
                    call (the keys each token was computed against, on average).
    peak_len:       per layer, the largest cache length at any moment (just before an eviction).
    kept_fraction:  mean over layers of final_len / tokens_seen.
    mean_fraction:  mean over layers of mean_len / the same average for a full cache.
    peak_fraction:  max over layers of peak_len / tokens_seen.
    kv_bytes:       bytes of K and V held at the end, all layers (sliding-window layers included).
    kv_bytes_full:  the same for a full cache.
    evictions:      eviction steps run.
    """

    tokens_seen: int = 0
    final_len: list[int] = field(default_factory=list)
    mean_len: list[float] = field(default_factory=list)
    peak_len: list[int] = field(default_factory=list)
    kept_fraction: float = 1.0
    mean_fraction: float = 1.0
    peak_fraction: float = 1.0
    kv_bytes: int = 0
    kv_bytes_full: int = 0
    evictions: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"tokens seen {self.tokens_seen}, kept {self.kept_fraction:.1%} at the end "
            f"(mean {self.mean_fraction:.1%}, peak {self.peak_fraction:.1%}), "
            f"KV {_mib(self.kv_bytes)} vs {_mib(self.kv_bytes_full)} full, {self.evictions} evictions"
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


class CacheMeter:
    """Accumulates cache lengths during a run and produces a :class:`MemoryReport`."""

    def __init__(self, layers: list[int]):
        self.layers = layers
        self.weighted = torch.zeros(len(layers), dtype=torch.float64)
        self.weighted_full = 0.0
        self.weight = 0
        self.peak = [0] * len(layers)
        self.evictions = 0

    def after_forward(self, lengths: list[int], new_tokens: int, tokens_seen: int) -> None:
        self.weighted += torch.tensor(lengths, dtype=torch.float64) * new_tokens
        self.weighted_full += tokens_seen * new_tokens
        self.weight += new_tokens
        self.peak = [max(p, n) for p, n in zip(self.peak, lengths)]

    def report(self, lengths: list[int], tokens_seen: int, kv_bytes: int, kv_bytes_full: int) -> MemoryReport:
        if not self.layers or tokens_seen == 0:
            return MemoryReport(tokens_seen=tokens_seen, kv_bytes=kv_bytes, kv_bytes_full=kv_bytes_full)
        mean_len = (self.weighted / max(self.weight, 1)).tolist()
        mean_full = self.weighted_full / max(self.weight, 1)
        return MemoryReport(
            tokens_seen=tokens_seen,
            final_len=list(lengths),
            mean_len=[round(x, 2) for x in mean_len],
            peak_len=list(self.peak),
            kept_fraction=sum(lengths) / (len(lengths) * tokens_seen),
            mean_fraction=sum(mean_len) / (len(mean_len) * mean_full),
            peak_fraction=max(self.peak) / tokens_seen,
            kv_bytes=kv_bytes,
            kv_bytes_full=kv_bytes_full,
            evictions=self.evictions,
        )
