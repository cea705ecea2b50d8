"""KV-cache memory policies: the NAMM and the hand-designed baselines, behind one interface.

``make_policy(name, **kwargs)`` builds a policy from its registered name; each module registers
its class in ``POLICIES`` below. Keys are lower case with "-" between words ("expected-attention");
``make_policy`` also accepts "_" ("expected_attention") and any case. "ada-<name>" is the policy
<name> with Ada-KV's per-head budgets (:mod:`namm.policies.adakv`): ``make_policy("ada-snapkv",
budget=256, floor=0.2)``, ``namm eval --methods snapkv,ada-snapkv``.
"""

from __future__ import annotations

from typing import Any

from namm.policies.adakv import AdaExpectedAttention, AdaH2O, AdaKV, AdaPyramidKV, AdaSnapKV
from namm.policies.base import BudgetMixin, CacheSpec, MemoryPolicy, SidePass, ragged_indices, topk_indices
from namm.policies.expected_attention import ExpectedAttention
from namm.policies.full import FullCache
from namm.policies.h2o import H2O
from namm.policies.kvzip import KVzip, KVzipOnce
from namm.policies.l2 import KeyNorm
from namm.policies.namm import NAMMPolicy
from namm.policies.pyramidkv import PyramidKV
from namm.policies.random import RandomPolicy
from namm.policies.snapkv import SnapKV
from namm.policies.streaming import Recency, StreamingLLM
from namm.policies.tova import TOVA

POLICIES: dict[str, type[MemoryPolicy]] = {
    "full": FullCache,
    "streaming": StreamingLLM,
    "recency": Recency,
    "random": RandomPolicy,
    "h2o": H2O,
    "l2": KeyNorm,
    "snapkv": SnapKV,
    "tova": TOVA,
    "pyramidkv": PyramidKV,
    "expected-attention": ExpectedAttention,
    "kvzip": KVzip,
    "kvzip-once": KVzipOnce,
    "ada-snapkv": AdaSnapKV,
    "ada-pyramidkv": AdaPyramidKV,
    "ada-h2o": AdaH2O,
    "ada-expected-attention": AdaExpectedAttention,
    "namm": NAMMPolicy,
}


def make_policy(name: str, **kwargs: Any) -> MemoryPolicy:
    """Build the policy registered under ``name``; unknown names list the known ones."""
    key = name.lower().replace("_", "-")
    if key not in POLICIES:
        known = ", ".join(sorted(POLICIES))
        raise ValueError(f"Unknown policy {name!r}. Known policies: {known}.")
    return POLICIES[key](**kwargs)


__all__ = [
    "H2O",
    "AdaExpectedAttention",
    "AdaH2O",
    "AdaKV",
    "AdaPyramidKV",
    "AdaSnapKV",
    "POLICIES",
    "TOVA",
    "BudgetMixin",
    "CacheSpec",
    "ExpectedAttention",
    "FullCache",
    "KVzip",
    "KeyNorm",
    "MemoryPolicy",
    "PyramidKV",
    "RandomPolicy",
    "Recency",
    "SidePass",
    "SnapKV",
    "StreamingLLM",
    "make_policy",
    "ragged_indices",
    "topk_indices",
]
