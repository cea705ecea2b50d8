"""CMA-ES wrapper: converges, maximises, and resumes bit for bit."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from namm.evolution.optimizer import CMAConfig, CMAES

TARGET = np.linspace(-0.5, 0.5, 12)


def sphere(x: np.ndarray) -> float:
    """Maximised at TARGET with value 0."""
    return -float(((x - TARGET) ** 2).sum())


def run(es: CMAES, generations: int) -> list[np.ndarray]:
    trace = []
    for _ in range(generations):
        members = es.ask()
        trace.append(members)
        es.tell([sphere(m) for m in members])
    return trace


@pytest.mark.parametrize("diagonal", [True, False])
def test_converges_on_sphere(diagonal):
    es = CMAES(dim=12, config=CMAConfig(popsize=10, sigma0=0.3, diagonal=diagonal, seed=3))
    start = sphere(es.mean)
    run(es, 150)
    assert sphere(es.mean) > -1e-4 > start
    np.testing.assert_allclose(es.mean, TARGET, atol=1e-2)
    # fitness is maximised: the best ever seen is the best of all members, near the optimum
    assert es.best_fitness > -1e-3
    assert es.best_fitness == pytest.approx(sphere(es.best_params))
    assert es.generation == 150


def test_starts_at_zero_with_reference_sigma():
    es = CMAES(dim=5)
    assert es.config.sigma0 == 0.065 and es.config.diagonal
    np.testing.assert_array_equal(es.mean, np.zeros(5))
    assert es.ask().shape == (16, 5)


@pytest.mark.parametrize("diagonal", [True, False])
def test_resume_reproduces_uninterrupted_trajectory(diagonal):
    config = CMAConfig(popsize=6, sigma0=0.2, diagonal=diagonal, seed=11)
    straight = CMAES(dim=12, config=config)
    trace_a = run(straight, 20)

    first = CMAES(dim=12, config=config)
    trace_b = run(first, 8)
    blob = pickle.dumps(first.state_dict())
    del first
    np.random.seed(999)  # unrelated use of the global RNG must not matter
    np.random.standard_normal(17)
    resumed = CMAES.from_state_dict(pickle.loads(blob))
    trace_b += run(resumed, 12)

    for a, b in zip(trace_a, trace_b):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(straight.mean, resumed.mean)
    assert straight.sigma == resumed.sigma
    assert straight.best_fitness == resumed.best_fitness
    assert resumed.generation == 20


def test_state_saved_between_ask_and_tell_asks_the_same_members():
    es = CMAES(dim=12, config=CMAConfig(popsize=4, seed=1))
    run(es, 3)
    members = es.ask()
    again = CMAES.from_state_dict(pickle.loads(pickle.dumps(es.state_dict())))
    np.testing.assert_array_equal(again.ask(), members)
    np.testing.assert_array_equal(es.ask(), members)  # asking twice does not resample


def test_seeded_and_leaves_global_rng_alone():
    np.random.seed(5)
    expected = np.random.standard_normal(3)
    np.random.seed(5)
    a = CMAES(dim=6, config=CMAConfig(popsize=4, seed=7)).ask()
    run(CMAES(dim=12, config=CMAConfig(popsize=4, seed=7)), 2)
    np.testing.assert_array_equal(np.random.standard_normal(3), expected)
    b = CMAES(dim=6, config=CMAConfig(popsize=4, seed=7)).ask()
    c = CMAES(dim=6, config=CMAConfig(popsize=4, seed=8)).ask()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_clear_errors():
    es = CMAES(dim=3, config=CMAConfig(popsize=4))
    with pytest.raises(RuntimeError, match="before ask"):
        es.tell([0.0] * 4)
    es.ask()
    with pytest.raises(ValueError, match="4 fitness values"):
        es.tell([0.0] * 3)
    with pytest.raises(ValueError, match="finite"):
        es.tell([0.0, 1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="popsize"):
        CMAConfig(popsize=1)
    with pytest.raises(ValueError, match="CMA-ES state"):
        CMAES.from_state_dict({"format": "other"})
