"""The NAMM itself: token features, scoring networks, selection, and the saved model.

* :mod:`namm.memory.features`  streaming attention spectrogram, EMA, normalisation, recency.
* :mod:`namm.memory.scoring`   BAM and MLP scorers over one flat parameter vector.
* :mod:`namm.memory.selection` threshold (score >= 0) and budget (top-k) selection.
* :mod:`namm.memory.model`     the :class:`NAMM` object: config, parameters, save / load.
* :mod:`namm.memory.calibration` collect and freeze the normalisation statistics.
"""

from __future__ import annotations

from namm.memory.features import FeatureConfig, RunningStats, StreamingSpectrogram
from namm.memory.model import NAMM, NAMMConfig, available_pretrained
from namm.memory.scoring import BAMScorer, MLPScorer, ScorerConfig, build_scorer
from namm.memory.selection import budget_select, threshold_select

__all__ = [
    "NAMM",
    "BAMScorer",
    "FeatureConfig",
    "MLPScorer",
    "NAMMConfig",
    "RunningStats",
    "ScorerConfig",
    "StreamingSpectrogram",
    "available_pretrained",
    "budget_select",
    "build_scorer",
    "threshold_select",
]
