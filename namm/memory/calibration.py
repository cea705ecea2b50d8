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


def threshold_kept(engine: Any, namm: NAMM, prompts: Sequence[Any], threshold: float) -> float:
    """Mean over ``prompts`` of the kept fraction at the end of the prompt (kept / seen, averaged over
    layers) when ``namm`` runs in threshold mode with ``threshold``."""
    from namm.policies.namm import NAMMPolicy

    candidate = namm.with_config(keep="threshold", keep_ratio=None, max_cache=None, threshold=float(threshold))
    fractions = []
    for prompt in prompts:
        out = engine.generate(prompt, max_new_tokens=1, policy=NAMMPolicy(namm=candidate))
        fractions.append(out.report.prefill.kept_fraction)
    return sum(fractions) / len(fractions)


def fit_threshold(
    engine: Any,
    namm: NAMM,
    prompts: Sequence[Any],
    target: float,
    tol: float = 0.005,
    max_runs: int = 24,
    progress: bool = True,
) -> tuple[NAMM, dict[str, Any]]:
    """Set the threshold-mode threshold so that ``namm`` keeps ``target`` of the prompt on average.

    A NAMM evolved in budget mode (each head keeps its top-k scores) ranks tokens; its scores have
    no trained zero, since adding a constant to every score changes no top-k. To run it in the
    paper's threshold mode (keep the tokens scoring >= threshold, so each layer, head and prompt
    keeps its own, emergent, number), the threshold is fitted here: bisection over real runs of
    ``prompts`` until the mean kept fraction at the prompt's end is within ``tol`` of ``target``
    (kept fractions fall as the threshold rises). Use training prompts, never held-out ones.

    Each prompt is read once: the runs differ only from the first eviction step on, so an engine
    without a prefix store that holds every prompt gets one for the fit (:mod:`namm.prefix`: the
    KV cache and feature state of each prompt up to that step are held in memory meanwhile) and
    every run after the first continues each prompt from its snapshot, bit for bit the same.
    Under a schedule with one step, at the prompt's end, a run after the first costs only the scorer
    and one token per prompt.

    Returns the NAMM with the fitted threshold (its recorded keep mode, parameters and normalisation
    unchanged: a budget-mode NAMM still runs as one by default, and ``keep="threshold"`` runs it
    with this threshold) and a record: target, achieved fraction, threshold, runs, prompts.
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"target kept fraction must be in (0, 1), got {target!r}.")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("fit_threshold needs at least one prompt.")
    from namm.prefix import PrefixStore

    held = getattr(engine, "prefix_store", False)
    if held is None or (isinstance(held, PrefixStore) and held.max_entries < len(prompts)):
        # a store smaller than the prompts would drop each snapshot before the next run reads it
        engine.prefix_store = PrefixStore(max_entries=len(prompts))
        try:
            return fit_threshold(engine, namm, prompts, target, tol=tol, max_runs=max_runs, progress=progress)
        finally:
            engine.prefix_store = held
    from tqdm.auto import tqdm

    bar = tqdm(total=max_runs, desc="fitting threshold", unit="run", disable=not progress)
    seen: dict[float, float] = {}

    def kept(t: float) -> float:
        if t not in seen:
            seen[t] = threshold_kept(engine, namm, prompts, t)
            bar.update(1)
            bar.set_postfix(threshold=f"{t:.4g}", kept=f"{seen[t]:.3f}")
        return seen[t]

    # bracket: lo keeps >= target, hi keeps <= target
    lo, hi, step = namm.config.threshold - 1.0, namm.config.threshold + 1.0, 1.0
    while kept(lo) < target and len(seen) < max_runs:
        hi, step = lo, step * 2
        lo -= step
    while kept(hi) > target and len(seen) < max_runs:
        lo, step = hi, step * 2
        hi += step
    while len(seen) < max_runs:
        mid = (lo + hi) / 2
        if abs(kept(mid) - target) <= tol:
            break
        lo, hi = (mid, hi) if seen[mid] > target else (lo, mid)
    bar.close()
    best = min(seen, key=lambda t: abs(seen[t] - target))
    if abs(seen[best] - target) > max(tol, 0.05):
        raise ValueError(f"No threshold keeps {target:.3f} of these prompts (closest: {seen[best]:.3f} at "
                         f"{best:.4g} after {len(seen)} runs): the scores may be tied; give more prompts or runs.")
    record = {"target": target, "kept": seen[best], "threshold": best, "runs": len(seen), "prompts": len(prompts)}
    log.info("threshold %.4g keeps %.3f (target %.3f, %d runs)", best, seen[best], target, len(seen))
    return namm.with_config(threshold=best), record


__all__ = ["calibrate", "fit_threshold", "threshold_kept"]
