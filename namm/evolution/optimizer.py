"""CMA-ES as ``ask()`` / ``tell(fitness)`` over a state that saves and restores exactly.

The search itself is the ``cma`` package (Hansen's pycma); this file only adapts it to how NAMM
evolution uses it (namm-algorithm.md section 5):

* fitness is **maximised** (pycma minimises, so ``tell`` hands it ``-fitness``);
* the mean starts at zero (a zero NAMM keeps every token) with ``sigma0 = 0.065``;
* separable (diagonal) CMA-ES by default: at ~4K parameters the full covariance learning rates are
  ~1e-7, so sep-CMA behaves the same at linear cost; ``diagonal=False`` gives the full covariance;
* ``mean`` is what evaluations, checkpoints and the final model use (``prefer_mean_to_best``); the
  best sampled member ever seen is tracked as well;
* all randomness comes from one ``numpy.random.RandomState`` owned by this object (handed to pycma
  as its ``randn``), so pickling the state and loading it later continues the run bit for bit.
"""

from __future__ import annotations

import contextlib
import io
import pickle
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import cma
import numpy as np


@dataclass
class CMAConfig:
    """Hyperparameters of the search.

    popsize:   members per generation (lambda); the reference uses 32, 8-16 suits small machines.
    sigma0:    initial step size (0.065 in the reference).
    diagonal:  separable CMA-ES (linear time and memory); False learns the full covariance.
    seed:      seeds the sampling RNG; the same seed gives the same members.
    """

    popsize: int = 16
    sigma0: float = 0.065
    diagonal: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.popsize, int) or self.popsize < 2:
            raise ValueError(f"popsize must be an integer >= 2, got {self.popsize!r}.")
        if not float(self.sigma0) > 0:
            raise ValueError(f"sigma0 must be > 0, got {self.sigma0!r}.")


class _Randn:
    """pycma's ``randn(lam, n)``; picklable, unlike ``np.random.randn`` (a bound method of the
    global RNG, which pickles as a detached copy). Draws from the global RNG, which
    ``CMAES._own_global_rng`` has swapped for the optimiser's own state."""

    def __call__(self, *shape: int) -> np.ndarray:
        return np.random.standard_normal(shape)


class CMAES:
    """Maximising CMA-ES over a flat parameter vector.

    >>> es = CMAES(dim=10, config=CMAConfig(popsize=8, seed=0))
    >>> members = es.ask()                  # (popsize, dim)
    >>> es.tell([-float((m ** 2).sum()) for m in members])
    >>> es.mean.shape
    (10,)
    """

    def __init__(self, dim: int, config: CMAConfig | None = None, x0: np.ndarray | None = None) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}.")
        self.config = config or CMAConfig()
        self.dim = dim
        x0 = np.zeros(dim) if x0 is None else np.asarray(x0, dtype=float)
        if x0.shape != (dim,):
            raise ValueError(f"x0 has shape {x0.shape}, expected ({dim},).")
        self._rng_state = np.random.RandomState(self.config.seed).get_state()
        opts = {
            "popsize": self.config.popsize,
            "CMA_diagonal": bool(self.config.diagonal),
            "randn": _Randn(),
            "seed": float("nan"),  # our own RNG is seeded; keep pycma off the global one
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            "tolx": 0,
            "tolfun": 0,
            "tolfunhist": 0,
            "tolstagnation": int(1e9),
            "maxiter": np.inf,
            "maxfevals": np.inf,
        }
        with self._own_global_rng(), contextlib.redirect_stdout(io.StringIO()):
            self._es = cma.CMAEvolutionStrategy(x0, float(self.config.sigma0), opts)
        self._pending: list[np.ndarray] | None = None
        self.generation = 0  # number of completed tell() calls
        self.best_fitness = -np.inf
        self.best_params: np.ndarray = x0.copy()

    # -- the loop ------------------------------------------------------------------------------

    def ask(self) -> np.ndarray:
        """The members of the current generation, (popsize, dim) float64.

        Asking again before ``tell`` returns the same members (a resumed run re-evaluates them).
        """
        if self._pending is None:
            with self._own_global_rng():
                self._pending = [np.asarray(x, dtype=float) for x in self._es.ask()]
        return np.stack(self._pending)

    def tell(self, fitness: Any) -> None:
        """Update the search with one fitness per member of the last ``ask`` (higher is better)."""
        if self._pending is None:
            raise RuntimeError("tell() called before ask().")
        fitness = np.asarray(fitness, dtype=float).reshape(-1)
        if fitness.shape[0] != len(self._pending):
            raise ValueError(f"tell() needs {len(self._pending)} fitness values, got {fitness.shape[0]}.")
        if not np.all(np.isfinite(fitness)):
            raise ValueError(f"fitness values must be finite, got {fitness.tolist()}.")
        best = int(np.argmax(fitness))
        if fitness[best] > self.best_fitness:
            self.best_fitness = float(fitness[best])
            self.best_params = self._pending[best].copy()
        with self._own_global_rng():
            self._es.tell(self._pending, (-fitness).tolist())
        self._pending = None
        self.generation += 1

    # -- what the run uses -----------------------------------------------------------------------

    @property
    def mean(self) -> np.ndarray:
        """The distribution mean: the parameters that are evaluated, saved and shipped."""
        return np.array(self._es.mean, dtype=float)

    @property
    def sigma(self) -> float:
        """Current overall step size."""
        return float(self._es.sigma)

    @property
    def popsize(self) -> int:
        return int(self._es.popsize)

    # -- exact save / restore --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly: a plain dict of bytes and numbers."""
        return {
            "format": "namm-cmaes-1",
            "config": asdict(self.config),
            "dim": self.dim,
            "generation": self.generation,
            "best_fitness": self.best_fitness,
            "best_params": self.best_params.copy(),
            "rng_state": self._rng_state,
            # the pycma object pickles whole: mean, sigma, paths, sampler, iteration count
            "es": pickle.dumps((self._es, self._pending), protocol=pickle.HIGHEST_PROTOCOL),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "CMAES":
        """Rebuild the optimiser saved by ``state_dict``; its next ``ask`` is the uninterrupted one."""
        if not isinstance(state, dict) or state.get("format") != "namm-cmaes-1":
            raise ValueError("Not a namm CMA-ES state (expected a dict saved by CMAES.state_dict()).")
        self = cls.__new__(cls)
        self.config = CMAConfig(**state["config"])
        self.dim = int(state["dim"])
        self.generation = int(state["generation"])
        self.best_fitness = float(state["best_fitness"])
        self.best_params = np.array(state["best_params"], dtype=float)
        self._rng_state = state["rng_state"]
        self._es, self._pending = pickle.loads(state["es"])
        return self

    # -- internals -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _own_global_rng(self) -> Iterator[None]:
        """Run pycma with numpy's global RNG swapped for ours.

        Every draw pycma makes (its samples through ``randn`` and a few corner paths) then comes
        from the optimiser's own seeded state, and the caller's global RNG is left untouched.
        """
        outside = np.random.get_state()
        np.random.set_state(self._rng_state)
        try:
            yield
        finally:
            self._rng_state = np.random.get_state()
            np.random.set_state(outside)
