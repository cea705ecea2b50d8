"""Calibrate a NAMM's feature normalisation on keep-all runs, then freeze it.

The reference computes the per-bin mean and variance of the EMA'd attention spectrogram once,
over every layer, head, token and eviction step of full-cache runs (stage 1, iteration 0, on
PassageRetrieval-en), and keeps them frozen for all later evolution and evaluation
(namm-algorithm.md sections 2.4 and 5). Without them the scores shift arbitrarily.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from namm.memory.features import RunningStats
from namm.memory.model import NAMM

log = logging.getLogger(__name__)


def calibrate(
    engine: Any,
    namm: NAMM,
    prompts: Sequence[Any] | Iterable[Any],
    max_new_tokens: int = 1,
    progress: bool = True,
    stats: RunningStats | None = None,
) -> NAMM:
    """Run keep-all generations over ``prompts`` collecting statistics; return the calibrated NAMM.

    Parameters
    ----------
    engine : namm.engine.Engine
        The engine (model, tokenizer and schedule) the NAMM will run under; statistics are taken
        at its eviction steps (every ``delay`` tokens and at the end of each prompt).
    namm : NAMM
        The NAMM to calibrate; its parameters are kept, its statistics replaced.
    prompts : texts or token ids
        Calibration prompts (the reference uses PassageRetrieval-en).
    max_new_tokens : int
        Tokens generated after each prompt (statistics also cover decoding eviction steps).
    stats : RunningStats, optional
        Statistics to continue from (e.g. merged from other workers).
    """
    from namm.policies.namm import NAMMPolicy

    policy = NAMMPolicy(namm=namm, calibrate=True)
    if stats is not None:
        policy.stats = stats.copy()
    prompts = list(prompts)
    iterator: Iterable[Any] = prompts
    if progress and len(prompts) > 1:
        from tqdm.auto import tqdm

        iterator = tqdm(prompts, desc="calibrating NAMM", unit="prompt")
    for prompt in iterator:
        engine.generate(prompt, max_new_tokens=max_new_tokens, policy=policy)
    if policy.stats.count == 0:
        raise ValueError("Calibration saw no eviction step; give at least one non-empty prompt.")
    log.info("calibrated NAMM normalisation on %d prompts (%d feature vectors)", len(prompts), int(policy.stats.count))
    return namm.with_norm(policy.stats)


__all__ = ["calibrate"]
