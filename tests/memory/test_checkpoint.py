"""NAMM save / load: bit-identical round trips, reference vectors, clear errors for bad checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from namm.memory.features import RunningStats
from namm.memory.model import NAMM, NAMMConfig
from namm.memory.scoring import ScorerConfig


def trained_namm() -> NAMM:
    params = torch.randn(4172, generator=torch.Generator().manual_seed(0)) * 0.1
    stats = RunningStats(17)
    stats.update(torch.rand(500, 17, dtype=torch.float64))
    return NAMM(NAMMConfig(max_cache=2048, evolved_on="tiny-llama"), params, stats)


def test_round_trip_is_bit_identical(tmp_path) -> None:
    namm = trained_namm()
    namm.save_pretrained(tmp_path / "ckpt")
    loaded = NAMM.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == namm.config
    assert torch.equal(loaded.get_flat(), namm.get_flat())
    assert loaded.norm.count == namm.norm.count
    assert torch.equal(loaded.norm.mean, namm.norm.mean) and torch.equal(loaded.norm.m2, namm.norm.m2)
    ema, pos = torch.rand(2, 30, 17), torch.arange(30).expand(2, 30)
    assert torch.equal(loaded.score(ema, pos), namm.score(ema, pos))


def test_round_trip_uncalibrated_mlp(tmp_path) -> None:
    namm = NAMM(NAMMConfig(scorer=ScorerConfig(kind="mlp", mlp_depth=2)))
    namm.save_pretrained(tmp_path)
    loaded = NAMM.from_pretrained(str(tmp_path))
    assert loaded.norm is None and loaded.config.scorer.kind == "mlp" and loaded.num_params == 676


@pytest.mark.parametrize("suffix", [".pt", ".npy", ".safetensors"])
def test_from_reference_vector(tmp_path, suffix) -> None:
    vec = torch.randn(4172)
    path = tmp_path / f"vec{suffix}"
    if suffix == ".pt":
        torch.save(vec, path)
    elif suffix == ".npy":
        np.save(path, vec.numpy())
    else:
        save_file({"params": vec}, str(path))
    assert torch.equal(NAMM.from_reference(path).get_flat(), vec)


def test_from_reference_checkpoint_dict_prefers_mean(tmp_path) -> None:
    mean, best = torch.randn(1, 4172), torch.randn(4172)
    torch.save({"evolution_state": {"mean": mean, "best_member": best, "sigma": torch.tensor(0.06)}, "iter": 3},
               tmp_path / "ckpt.pt")
    assert torch.equal(NAMM.from_reference(tmp_path / "ckpt.pt").get_flat(), mean[0])
    picked = NAMM.from_reference(tmp_path / "ckpt.pt", key="evolution_state.best_member")
    assert torch.equal(picked.get_flat(), best)


def write(path, tensors=None):
    NAMM().save_pretrained(path)
    if tensors is not None:
        save_file(tensors, str(path / "namm.safetensors"))
    return path


def patch_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(
    "corrupt, error, match",
    [
        (lambda p: (p / "config.json").unlink(), FileNotFoundError, "missing config.json"),
        (lambda p: (p / "namm.safetensors").unlink(), FileNotFoundError, "missing namm.safetensors"),
        (lambda p: (p / "namm.safetensors").write_bytes(b"garbage" * 10), ValueError, "corrupted"),
        (lambda p: (p / "config.json").write_text("{not json"), ValueError, "not valid JSON"),
        (lambda p: write(p, tensors={"params": torch.zeros(100)}), ValueError, "4172"),
        (lambda p: write(p, tensors={"weights": torch.zeros(4172)}), ValueError, "no 'params'"),
        (lambda p: write(p, tensors={"params": torch.full((4172,), float("nan"))}), ValueError, "NaN"),
        (lambda p: patch_config(p, scorer={"kind": "lstm"}), ValueError, "Unknown scorer"),
        (lambda p: patch_config(p, frobnicate=1), ValueError, "Unknown NAMM config keys"),
        (lambda p: patch_config(p, version=99), ValueError, "version"),
        (lambda p: write(p, tensors={"params": torch.zeros(4172), "norm.mean": torch.zeros(17)}), ValueError,
         "incomplete normalisation"),
        (lambda p: write(p, tensors={"params": torch.zeros(4172), "norm.count": torch.ones(1, dtype=torch.float64),
                                     "norm.mean": torch.zeros(17, dtype=torch.float64),
                                     "norm.m2": -torch.ones(17, dtype=torch.float64)}), ValueError, "negative variance"),
    ],
)
def test_bad_checkpoints_raise_clear_errors(tmp_path, corrupt, error, match) -> None:
    path = write(tmp_path / "ckpt")
    corrupt(path)
    with pytest.raises(error, match=match):
        NAMM.from_pretrained(path)


def test_missing_and_misnamed_sources(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not a pretrained name"):
        NAMM.from_pretrained(tmp_path / "nowhere")
    torch.save(torch.zeros(4172), tmp_path / "vec.pt")
    with pytest.raises(FileNotFoundError, match="from_reference"):
        NAMM.from_pretrained(tmp_path / "vec.pt")
    torch.save(torch.zeros(10), tmp_path / "small.pt")
    with pytest.raises(ValueError, match="4172"):
        NAMM.from_reference(tmp_path / "small.pt")
    torch.save({"a": torch.zeros(4172), "b": torch.ones(4172)}, tmp_path / "two.pt")
    with pytest.raises(ValueError, match="key="):
        NAMM.from_reference(tmp_path / "two.pt")
    (tmp_path / "vec.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match="unsupported file type"):
        NAMM.from_reference(tmp_path / "vec.txt")
    with pytest.raises(ValueError, match="NaN"):
        NAMM(params=torch.full((4172,), float("inf")))
