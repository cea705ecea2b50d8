"""The NAMM policy: an evolved network scores every cached token from the attention it received."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from namm.memory.features import RunningStats, StreamingSpectrogram
from namm.memory.model import NAMM
from namm.memory.selection import budget_select, threshold_select
from namm.policies.base import BudgetMixin, CacheSpec, MemoryPolicy, tokens_seen

_VECTOR_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".npy", ".safetensors")


def load_namm(source: NAMM | str | Path) -> NAMM:
    """A NAMM from an object, a NAMM folder, a shipped pretrained name, or a bare reference vector file."""
    if isinstance(source, NAMM):
        return source
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in _VECTOR_SUFFIXES:
        return NAMM.from_reference(path)
    return NAMM.from_pretrained(source)


@dataclass
class NAMMPolicy(MemoryPolicy):
    """Neural Attention Memory Model (Cetin et al., "An Evolved Universal Transformer Memory",
    arXiv 2410.13166): each layer's attention is streamed into per-token spectrogram EMAs; at an
    eviction step a small network (BAM) scores every token from its features and each KV head
    keeps the tokens scoring >= 0 (the newest always; every head of a layer keeps the same count).

    namm:      a :class:`~namm.memory.model.NAMM`, a NAMM folder, a shipped pretrained name, or a
               bare reference-layout parameter file (.pt/.safetensors/.npy).
    max_cache: optional cap on tokens kept per layer (overrides the NAMM's own ``max_cache``).
    budget / keep_ratio: keep exactly each head's top-``budget`` tokens (or that fraction of the
               tokens seen) instead of thresholding, for comparisons at matched cache size.
    calibrate: keep everything and collect the feature normalisation statistics (``stats``);
               see :func:`namm.memory.calibration.calibrate`.
    """

    namm: NAMM | str | Path | None = None
    max_cache: int | None = None
    budget: int | None = None
    keep_ratio: float | None = None
    calibrate: bool = False
    needs_attention = True
    name = "namm"

    def __post_init__(self) -> None:
        if self.namm is None:
            if not self.calibrate:
                from namm.memory.model import available_pretrained

                names = ", ".join(available_pretrained()) or "none installed"
                raise ValueError(
                    f"NAMMPolicy needs a NAMM: namm=PATH (a NAMM folder or a parameter file) or a pretrained "
                    f"name (available: {names})."
                )
            self.namm = NAMM()
        self.namm = load_namm(self.namm)
        if self.max_cache is not None and not (isinstance(self.max_cache, int) and self.max_cache > 0):
            raise ValueError(f"max_cache must be a positive number of tokens or None, got {self.max_cache!r}.")
        if self.budget is not None or self.keep_ratio is not None:
            BudgetMixin.check_budget(self)  # type: ignore[arg-type]
        self.stats = RunningStats(self.namm.config.features.n_bins)

    @property
    def schedule(self) -> dict[str, int]:
        """Engine overrides the NAMM was evolved with: ``Engine(model, tok, policy, **policy.schedule)``."""
        return {"chunk_size": self.namm.config.chunk_size, "delay": self.namm.config.delay}

    def reset(self, spec: CacheSpec) -> None:
        super().reset(spec)
        self.spectrogram = StreamingSpectrogram(self.namm.config.features)
        self.positions: dict[int, torch.Tensor] = {}  # layer -> (kv_heads, cache_len)

    def observe(self, layer: int, attn: torch.Tensor | None, keys: torch.Tensor, positions: torch.Tensor) -> None:
        if attn is None:
            raise RuntimeError("NAMMPolicy needs attention weights; run it under an engine with needs_attention.")
        self.spectrogram.observe(layer, attn)
        self.positions[layer] = positions

    def select(self, layer: int) -> torch.Tensor | None:
        ema = self.spectrogram.ema(layer)  # (kv_heads, cache_len, n_bins)
        if self.calibrate:
            self.stats.update(ema)
            return None
        positions = self.positions[layer]
        scores = self.namm.score(ema, positions)  # (kv_heads, cache_len)
        if self.budget is not None or self.keep_ratio is not None:
            n_keep = BudgetMixin.n_keep(self, tokens_seen(positions), scores.shape[-1])  # type: ignore[arg-type]
            keep = budget_select(scores, n_keep)
        else:
            cap = self.max_cache if self.max_cache is not None else self.namm.config.max_cache
            keep = threshold_select(scores, self.namm.config.threshold, cap)
        if keep.shape[-1] == scores.shape[-1]:
            return None  # everything kept: nothing to gather
        self.spectrogram.prune(layer, keep)
        self.positions[layer] = positions.gather(1, keep.to(positions.device))
        return keep
