"""Keep every token: the full-cache reference every other method is compared against."""

from __future__ import annotations

from dataclasses import dataclass

from namm.policies.base import MemoryPolicy


@dataclass
class FullCache(MemoryPolicy):
    """Never evicts. Under the engine its logits equal the plain transformers forward."""

    name = "full"

    def fork_key(self) -> tuple[str]:
        return ("full",)  # no per-token state: any prefix read with a full cache can be shared
