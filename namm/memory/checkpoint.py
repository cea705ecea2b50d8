"""Reading NAMM checkpoints from disk, with errors that say what is wrong and how to fix it.

Two sources: a NAMM folder written by ``NAMM.save_pretrained`` (config.json + namm.safetensors),
and a bare flat parameter vector in the reference layout (a tensor, or a checkpoint dict holding
one) saved as .pt / .safetensors / .npy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from namm.memory.features import RunningStats


def read_pretrained(directory: Path) -> tuple[Any, torch.Tensor, RunningStats | None]:
    """(config, params, norm) of a NAMM folder; raises a clear error for a bad checkpoint."""
    from namm.memory.model import CONFIG_FILE, FORMAT, FORMAT_VERSION, WEIGHTS_FILE, NAMMConfig
    from namm.memory.scoring import build_scorer

    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"NAMM checkpoint {str(directory)!r} is missing {path.name}; a NAMM folder holds "
                f"{CONFIG_FILE} and {WEIGHTS_FILE} (written by NAMM.save_pretrained)."
            )
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path} is not valid JSON ({exc}); the checkpoint is corrupted.") from exc
    if not isinstance(meta, dict) or meta.pop("format", None) != FORMAT:
        raise ValueError(f"{config_path} is not a NAMM config (missing \"format\": \"{FORMAT}\").")
    version = meta.pop("version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{config_path} has format version {version!r}; this namm reads version {FORMAT_VERSION}. "
                         "Upgrade namm or re-save the checkpoint.")
    meta.pop("num_params", None)
    meta.pop("calibrated", None)
    # a NAMM saved before partial frames existed was evolved without them: run it the same way
    if isinstance(meta.get("features"), dict):
        meta["features"].setdefault("partial_frame", False)
    try:
        config = NAMMConfig.from_dict(meta)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config_path}: {exc}") from exc

    tensors = _load_safetensors(weights_path)
    if "params" not in tensors:
        raise ValueError(f"{weights_path} has no 'params' tensor (found: {sorted(tensors)}).")
    params = tensors["params"]
    expected = build_scorer(config.scorer, config.features.feature_dim).num_params
    _check_vector(params, expected, f"{weights_path} 'params'", config.scorer.kind)
    return config, params, _read_norm(tensors, config.features.norm_dim, weights_path)


def _read_norm(tensors: dict[str, torch.Tensor], n_bins: int, where: Path) -> RunningStats | None:
    names = ("norm.count", "norm.mean", "norm.m2")
    present = [n for n in names if n in tensors]
    if not present:
        return None
    if len(present) != len(names):
        raise ValueError(f"{where}: incomplete normalisation statistics (found {present}, need {list(names)}).")
    count, mean, m2 = (tensors[n] for n in names)
    if count.numel() != 1 or mean.shape != (n_bins,) or m2.shape != (n_bins,):
        raise ValueError(f"{where}: normalisation statistics must be 1 count and {n_bins} bins, got shapes "
                         f"{tuple(count.shape)}, {tuple(mean.shape)}, {tuple(m2.shape)}.")
    if not all(torch.isfinite(t).all() for t in (count, mean, m2)) or count.item() <= 0 or (m2 < 0).any():
        raise ValueError(f"{where}: normalisation statistics contain NaN/inf, a non-positive count or a "
                         "negative variance; re-run `namm calibrate`.")
    return RunningStats(n_bins, float(count.item()), mean, m2)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for truncated/garbled files
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); the checkpoint is corrupted.") from exc


def _check_vector(vec: torch.Tensor, expected: int, what: str, scorer: str) -> None:
    if vec.dim() != 1 or vec.numel() != expected:
        raise ValueError(f"{what} has shape {tuple(vec.shape)}, but a {scorer!r} NAMM with this config needs "
                         f"a flat vector of {expected} parameters; the checkpoint and config do not match.")
    if not torch.is_floating_point(vec):
        raise ValueError(f"{what} has dtype {vec.dtype}; NAMM parameters must be floating point.")
    if not torch.isfinite(vec).all():
        raise ValueError(f"{what} contains NaN or inf values; the checkpoint is corrupted.")


def read_reference_vector(path: Path, expected: int, key: str | None = None) -> torch.Tensor:
    """A flat reference-layout vector of ``expected`` floats from a .pt / .safetensors / .npy file."""
    if not path.is_file():
        raise FileNotFoundError(f"No parameter file at {str(path)!r}.")
    loaded = _load_any(path)
    if isinstance(loaded, torch.Tensor):
        candidates = {"": loaded}
    elif isinstance(loaded, dict):
        candidates = dict(_flatten(loaded))
    else:
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a tensor or a dict of tensors.")
    if key is not None:
        if key not in candidates:
            raise KeyError(f"{path} has no tensor {key!r}; tensors: {sorted(candidates)[:20]}.")
        chosen = {key: candidates[key]}
    else:
        chosen = {k: v for k, v in candidates.items() if v.numel() == expected and max(v.shape, default=1) == expected}
        if len(chosen) > 1:
            means = {k: v for k, v in chosen.items() if k.split(".")[-1].endswith("mean")}
            chosen = means if len(means) == 1 else chosen
    if len(chosen) != 1:
        found = {k or "<tensor>": tuple(v.shape) for k, v in candidates.items()}
        hint = "several match; pass key=" if chosen else "none has that size"
        raise ValueError(f"{path}: need one flat vector of {expected} parameters, {hint} (tensors: {found}).")
    name, vec = next(iter(chosen.items()))
    if vec.numel() == expected:  # (1, n) population rows and the like
        vec = vec.reshape(-1)
    _check_vector(vec, expected, f"{path} {name!r}" if name else str(path), "reference")
    return vec.detach().float()


def _load_any(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        import numpy as np

        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except ValueError as exc:
            raise ValueError(f"{path} is not a plain numpy array file ({exc}).") from exc
    if suffix == ".safetensors":
        return _load_safetensors(path)
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(
                f"{path} could not be loaded as plain tensors ({type(exc).__name__}: {exc}). Save the flat "
                "parameter vector alone, e.g. torch.save(ckpt['...']['mean'], 'namm.pt'), and load that."
            ) from exc
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .pt, .safetensors or .npy.")


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    out = []
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            out.append((name, v))
        elif isinstance(v, dict):
            out.extend(_flatten(v, name + "."))
    return out
