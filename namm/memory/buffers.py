"""Per-token state with spare capacity, so a decoding step appends in place instead of copying.

A policy's per-token state (the NAMM's spectrogram rows and EMA, its attention moments) grows by
one token per decoded token. Rebuilding it with ``torch.cat`` / ``F.pad`` at every step copies every
layer's whole state every step; a buffer with spare capacity along the token axis lets the step
write its new slots where they are and copy only when the buffer is full (growing by half, so the
copies amortise to a constant per token). Eviction steps gather the kept tokens into a fresh
buffer sized the same way.
"""

from __future__ import annotations

import torch

MIN_SPARE = 64  # slots of headroom at least, so short decodes after an eviction never regrow


def capacity_for(n: int) -> int:
    """Slots to allocate for ``n`` tokens: half again as many, at least :data:`MIN_SPARE` spare."""
    return n + max(n // 2, MIN_SPARE)


def with_capacity(buffer: torch.Tensor, dim: int, used: int, needed: int) -> torch.Tensor:
    """``buffer`` if its axis ``dim`` has ``needed`` slots, else a zeroed larger buffer holding its
    first ``used`` slots (the old one is dropped by the caller)."""
    if buffer.shape[dim] >= needed:
        return buffer
    shape = list(buffer.shape)
    shape[dim] = capacity_for(needed)
    grown = buffer.new_zeros(shape)
    grown.narrow(dim, 0, used).copy_(buffer.narrow(dim, 0, used))
    return grown


def fresh(values: torch.Tensor, dim: int) -> torch.Tensor:
    """A zeroed buffer with spare capacity along ``dim`` whose first slots hold ``values``."""
    shape = list(values.shape)
    shape[dim] = capacity_for(values.shape[dim])
    buffer = values.new_zeros(shape)
    buffer.narrow(dim, 0, values.shape[dim]).copy_(values)
    return buffer


__all__ = ["MIN_SPARE", "capacity_for", "fresh", "with_capacity"]
