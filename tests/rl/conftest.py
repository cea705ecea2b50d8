"""Tiny versions of the RL testbed's artefacts (sizes in rl_tiny.py): a dataset and a Decision Transformer."""

from __future__ import annotations

import pytest
from rl_tiny import TINY_DATA, TINY_TRAIN

from namm.rl.data import DataConfig, generate_dataset
from namm.rl.train import train


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("rl") / "data"
    generate_dataset(DataConfig(**TINY_DATA), out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_dt_dir(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rl") / "dt"
    train(tiny_data, out, TINY_TRAIN, progress=False)
    return out


@pytest.fixture(autouse=True)
def _threads():
    """One torch thread: a rollout feeds 2-3 tokens per forward call, where a second thread only
    waits on the first (and on a shared machine, on whatever else runs)."""
    import torch

    torch.set_num_threads(1)
    yield
