"""Prefix sharing: read a prompt's first stretch once, continue it under many policies.

Until a sequence's first eviction step, the cache and everything a policy has built from
``observe`` do not depend on *which* tokens the policy will later keep: a NAMM's spectrogram
features do not depend on its parameters, a full cache has no state at all. Evolution runs the
same prompt under every member of a population, so the tokens up to the first eviction step
(``delay`` tokens of a long prompt, the whole prompt of a short one) are computed once and the
state is *forked* for every member, bit for bit what each member would have computed itself.

:class:`PrefixStore` holds those snapshots (least recently used first out). Pass one to
:class:`~namm.engine.Engine` (``Engine(model, tok, prefix_store=PrefixStore())``) and every
``generate`` / ``loglikelihood`` call whose policy can share (``MemoryPolicy.fork_key`` is not None)
reads its prefix from the store or fills it.
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Hashable

import torch

__all__ = ["PrefixSnapshot", "PrefixStore"]


@dataclass
class PrefixSnapshot:
    """A sequence's state right before its first eviction step (tensors owned by the store)."""

    cache: Any  # transformers DynamicCache
    positions: dict[int, torch.Tensor]
    seen: int
    meter: Any  # namm.report.CacheMeter
    logits: torch.Tensor  # (vocab,) logits of the prefix's last token
    policy_state: dict[str, Any]
    #: wall seconds reading the prefix took (what each fork skips; reported as ``prefix_reused_s``)
    compute_s: float = 0.0
    #: what the forks may share beyond the state: filled by the first fork that computes it (a
    #: NAMM's eviction inputs at the first step, the same for every member), see MemoryPolicy.on_fork
    shared: dict[Hashable, Any] = field(default_factory=dict)


class PrefixStore:
    """Snapshots of prompt prefixes, keyed by tokens, model, schedule and policy state kind.

    max_entries: how many prefixes are held; the least recently used is dropped first. Evolution
                 needs one per prompt of a generation.
    """

    def __init__(self, max_entries: int = 64) -> None:
        if not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a positive integer, got {max_entries!r}.")
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, PrefixSnapshot] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, key: Hashable) -> PrefixSnapshot | None:
        snap = self._entries.get(key)
        if snap is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return snap

    def put(self, key: Hashable, snapshot: PrefixSnapshot) -> None:
        self._entries[key] = snapshot
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def prefix_key(seq, ids: torch.Tensor) -> Hashable | None:
    """The store key of reading ``ids`` (the prefix) from an empty ``seq``; None if it cannot share."""
    policy = seq.policy
    fork_key = policy.fork_key()
    if fork_key is None:
        return None
    digest = hashlib.sha1(ids.detach().cpu().numpy().tobytes()).hexdigest()
    cfg = seq.config
    param = next(seq.model.parameters())
    return (digest, int(ids.numel()), id(seq.model), str(param.dtype), str(param.device), cfg.chunk_size,
            cfg.delay, bool(policy.needs_attention), fork_key)


def take_snapshot(seq, logits: torch.Tensor, compute_s: float = 0.0) -> PrefixSnapshot:
    """Copy ``seq``'s state (cache, positions, meter, the policy's fork fields); ``seq`` goes on as
    the snapshot's first fork."""
    policy_state = {name: copy.deepcopy(getattr(seq.policy, name)) for name in seq.policy.fork_fields}
    snap = PrefixSnapshot(
        cache=copy.deepcopy(seq.cache),
        positions={k: v.clone() for k, v in seq.positions.items()},
        seen=seq.seen,
        meter=copy.deepcopy(seq.meter),
        logits=logits.detach().clone(),
        policy_state=policy_state,
        compute_s=float(compute_s),
    )
    seq.policy.on_fork(snap.shared)  # its state is the snapshot's: what it computes from it, it shares
    return snap


def restore_snapshot(seq, snap: PrefixSnapshot) -> torch.Tensor:
    """Put a copy of ``snap`` into the empty sequence ``seq``; returns the prefix's last logits."""
    seq.cache = copy.deepcopy(snap.cache)
    seq.positions = {k: v.clone() for k, v in snap.positions.items()}
    seq.seen = snap.seen
    seq.meter = copy.deepcopy(snap.meter)
    for name, value in snap.policy_state.items():
        setattr(seq.policy, name, copy.deepcopy(value))
    seq.policy.on_fork(snap.shared)
    return snap.logits.clone()
