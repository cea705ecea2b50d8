"""Evolving NAMMs: CMA-ES over the NAMM's flat parameter vector, scored by task metrics.

* :mod:`~namm.evolution.optimizer` - CMA-ES (the ``cma`` package) as ask/tell over a saveable state.
* :mod:`~namm.evolution.fitness`   - a member's fitness relative to the full cache; the worker.
* :mod:`~namm.evolution.prompts`   - prompt pools, per-generation draws, full-cache reference cache.
* :mod:`~namm.evolution.backends`  - local (in-process) and Ray (one actor per model replica).
* :mod:`~namm.evolution.config`    - the run's TOML file as dataclasses.
* :mod:`~namm.evolution.runner`    - calibration, stages, evaluation, checkpoints and resume.
* :mod:`~namm.evolution.checkpoint`, :mod:`~namm.evolution.plot` - the run folder's files.

``namm evolve CONFIG`` (namm/commands/evolve.py) runs a config file; see examples/*.toml.
"""

from namm.evolution.config import RunConfig, load_config
from namm.evolution.optimizer import CMAConfig, CMAES
from namm.evolution.runner import EvolutionRun, run_from_file

__all__ = ["CMAES", "CMAConfig", "EvolutionRun", "RunConfig", "load_config", "run_from_file"]
