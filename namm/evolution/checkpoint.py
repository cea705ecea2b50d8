"""The run folder: crash-safe writes, the per-generation checkpoint and the CSV log.

Layout of a run folder::

    config.toml / config.json   the run's config as given / as resolved
    calibration.pt              the frozen normalisation statistics (stage 1, step 1)
    reference_scores.json       full-cache result per prompt (computed once)
    state.pkl                   THE checkpoint: optimiser state, history, best evaluation
    mean/                       the CMA mean as a NAMM folder (NAMM.from_pretrained loads it)
    best/                       the mean with the best evaluation so far (when evaluations run)
    log.csv, fitness.png        one row / point per generation; log.csv also lists every member's
                                fitness, score (weighted task ratio) and kept cache, in member order

``state.pkl`` is written first and atomically (temp file + ``os.replace``) after every generation;
it is the only thing a resume reads. Everything else is derived from it and rewritten on resume,
so a ``kill -9`` at any moment loses at most the generation in progress.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

STATE_FILE = "state.pkl"
CALIBRATION_FILE = "calibration.pt"
SESSIONS_FILE = "sessions.jsonl"  # one line per start or resume: generation, date, backend, machine
STATE_FORMAT = "namm-evolve-1"

LOG_COLUMNS = ("generation", "stage", "tasks", "fitness_best", "fitness_mean", "fitness_worst", "raw_mean",
               "kept_mean", "kept_of_best", "sigma", "seconds", "eval_fitness", "eval_kept",
               "member_fitness", "member_score", "member_kept")
# per-member columns (space-separated, member order) and the history key each one reads
MEMBER_COLUMNS = {"member_fitness": "fitness", "member_score": "member_score", "member_kept": "member_kept"}


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that a crash leaves either the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_dir(target: str | Path, write: Callable[[Path], Any]) -> None:
    """Build a folder with ``write(tmp)`` next to ``target``, then swap it in by renames."""
    target = Path(target)
    tmp, old = target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    write(tmp)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def save_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Write the checkpoint (a plain dict: optimiser state, history, best evaluation)."""
    atomic_write_bytes(run_dir / STATE_FILE, pickle.dumps({"format": STATE_FORMAT, **state},
                                                          protocol=pickle.HIGHEST_PROTOCOL))


def load_state(run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint of a run folder, or None if no generation has finished yet."""
    path = run_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        state = pickle.loads(path.read_bytes())
    except Exception as exc:  # a truncated file cannot happen with atomic writes, but say so clearly
        raise ValueError(f"{path} is not a readable namm evolve checkpoint ({exc}).") from exc
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} has format {state.get('format')!r}, expected {STATE_FORMAT!r}.")
    return state


def save_calibration(run_dir: Path, norm) -> None:
    buf = io.BytesIO()
    torch.save({"count": norm.count, "mean": norm.mean, "m2": norm.m2, "n_bins": norm.n_bins}, buf)
    atomic_write_bytes(run_dir / CALIBRATION_FILE, buf.getvalue())


def load_calibration(run_dir: Path):
    """The run's frozen statistics, or None if calibration has not finished."""
    from namm.memory.features import RunningStats

    path = run_dir / CALIBRATION_FILE
    if not path.exists():
        return None
    data = torch.load(path, weights_only=True)
    return RunningStats(int(data["n_bins"]), float(data["count"]), data["mean"], data["m2"])


def export_namm(target: Path, template, params: np.ndarray) -> None:
    """Write ``params`` as a NAMM folder (config, parameters, frozen statistics), atomically."""
    namm = template.with_params(torch.as_tensor(params, dtype=torch.float32))
    atomic_write_dir(target, namm.save_pretrained)


def write_log(path: Path, history: list[dict[str, Any]]) -> None:
    """The per-generation CSV log, rewritten from the checkpoint's history."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _fmt(row.get(MEMBER_COLUMNS.get(k, k))) for k in LOG_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def _fmt(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.10g}"
    if isinstance(value, (list, tuple)) and all(isinstance(v, float) for v in value):
        return " ".join(f"{v:.4g}" for v in value)
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value))
    return value
