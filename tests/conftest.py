from __future__ import annotations

import pytest
import torch

from namm.models import tiny_model


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_model("llama", seed=0)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield
