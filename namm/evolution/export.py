"""Ship an evolved NAMM: a run folder's ``mean/`` or ``best/`` NAMM, with where it came from.

``export_run(run_dir, dest)`` (``namm export RUN_DIR --to DEST``) writes DEST as a NAMM folder
(``config.json``, ``namm.safetensors``) plus ``provenance.json``: the model and dtype it was evolved
on, the run's resolved config and its sha256, the generations, stages and tasks it ran, the
evaluations it cost and the compute time, its evaluation results, and the code and machine that
exported it. Export into ``namm/pretrained/<name>/`` to ship it: ``namm generate --policy namm``
then runs it without ``--namm`` (see :func:`namm.memory.model.default_pretrained`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from namm.evolution.checkpoint import SESSIONS_FILE, atomic_write_dir
from namm.evolution.config import RunConfig
from namm.memory.model import CONFIG_FILE, NAMM, PROVENANCE_FILE

WHICH = ("mean", "best")
PROVENANCE_FORMAT = "namm-provenance-1"
RUN_CONFIG_FILE = "config.json"
LOG_FILE = "log.csv"


def export_run(run_dir: str | Path, dest: str | Path, which: str = "mean", force: bool = False,
               fit_threshold: float | None = None, fit_samples: int = 4, progress: bool = True) -> Path:
    """Write the run's ``which`` NAMM ("mean": the final CMA mean, "best": the best-evaluated mean)
    and its ``provenance.json`` into ``dest``, atomically; ``force`` replaces a non-empty ``dest``.

    ``fit_threshold``: also fit the NAMM's threshold-mode threshold so that, in threshold mode, it
    keeps this fraction of a prompt on average (:func:`namm.memory.calibration.fit_threshold`), on
    ``fit_samples`` training prompts of each of the run's retrieval tasks, on the run's model; the
    provenance records the fit. A budget-mode NAMM's scores have no trained zero, so its threshold
    mode means nothing without this.
    """
    run_dir, dest = Path(run_dir), Path(dest)
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}.")
    record = provenance(run_dir, which)
    source = run_dir / which
    if not (source / CONFIG_FILE).is_file():
        hint = " (no evaluation has run: eval_interval = 0 or too few generations)" if which == "best" else ""
        raise ValueError(f"The run {str(run_dir)!r} has no {which}/ NAMM{hint}; export --which "
                         f"{'mean' if which == 'best' else 'best'}, or resume the run with `namm evolve --resume`.")
    _check_dest(dest, run_dir, force)
    namm = NAMM.from_pretrained(source)
    if fit_threshold is not None:
        namm, record["threshold_fit"] = _fit_threshold(run_dir, namm, fit_threshold, fit_samples, progress)
    text = json.dumps(record, indent=2) + "\n"

    def write(tmp: Path) -> None:
        namm.save_pretrained(tmp)
        (tmp / PROVENANCE_FILE).write_text(text)

    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_dir(dest, write)
    return dest


def _fit_threshold(run_dir: Path, namm: NAMM, target: float, samples: int,
                   progress: bool) -> tuple[NAMM, dict[str, Any]]:
    """Fit ``namm``'s threshold on training prompts of the run's retrieval tasks, under the
    conditions it was evolved with (model, dtype, schedule, prompt format)."""
    from namm.engine import Engine, EngineConfig
    from namm.memory.calibration import fit_threshold
    from namm.models import load_model
    from namm.evolution.prompts import build_pool

    config = RunConfig.from_dict(json.loads((run_dir / RUN_CONFIG_FILE).read_bytes()))
    tasks = [t for t in config.tasks if t.name != "continuation"]
    if not tasks:
        raise ValueError("--fit-threshold needs a retrieval task in the run's [[tasks]] for its prompts.")
    model, tokenizer = load_model(config.model, dtype=config.dtype)
    engine = Engine(model, tokenizer, config=EngineConfig(**namm.config.schedule))
    # the first prompts of each task's training pool: prompts the run trained on, never held-out ones
    prompts = [p.prompt for t in tasks for p in build_pool(t, tokenizer, config.seed, n=samples)]
    namm, record = fit_threshold(engine, namm, prompts, target, progress=progress)
    return namm, {**record, "tasks": [t.name for t in tasks], "split": "train", "seed": config.seed,
                  "model": config.model, "dtype": config.dtype}


def provenance(run_dir: str | Path, which: str = "mean") -> dict[str, Any]:
    """Where the run's ``which`` NAMM came from, as ``provenance.json`` records it."""
    run_dir = Path(run_dir)
    config_bytes, rows = _read_run(run_dir)
    data = json.loads(config_bytes)
    config = RunConfig.from_dict(data)
    stages = sorted({int(r["stage"]) for r in rows})
    evals = [(int(r["generation"]), float(r["eval_fitness"])) for r in rows if r["eval_fitness"]]
    init = _init_record(config.init)
    last_eval = evals[-1] if evals else None
    best_eval = max(evals, key=lambda e: e[1]) if evals else None
    return {
        "format": PROVENANCE_FORMAT,
        "model": config.model,
        "dtype": config.dtype,
        "which": which,
        "generation": best_eval[0] if which == "best" and best_eval else int(rows[-1]["generation"]),
        "run_dir": str(run_dir),
        "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
        "generations": len(rows),
        "stages": [{"stage": s, "name": config.stages[s - 1].name, "tasks": list(config.stages[s - 1].tasks),
                    "generations": sum(int(r["stage"]) == s for r in rows),
                    "planned": config.stages[s - 1].generations} for s in stages],
        "popsize": config.optimizer.popsize,
        "member_evaluations": sum(config.optimizer.popsize * _prompts(config, r) for r in rows),
        "mean_evaluations": sum(config.fitness.eval_samples_per_task * len(_stage_tasks(config, r))
                                for r in rows if r["eval_fitness"]),
        "compute_hours": sum(float(r["seconds"]) for r in rows) / 3600,
        "total_compute_hours": sum(float(r["seconds"]) for r in rows) / 3600 + (init or {}).get("total_compute_hours", 0.0),
        "init": init,
        "eval_last": None if last_eval is None else {"generation": last_eval[0], "fitness": last_eval[1]},
        "eval_best": None if best_eval is None else {"generation": best_eval[0], "fitness": best_eval[1]},
        "hardware": hardware(),  # the machine exporting; where the generations ran: "sessions"
        "sessions": _sessions(run_dir),
        "git_commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": data,
    }


def _sessions(run_dir: Path) -> list[dict[str, Any]]:
    """The run's ``sessions.jsonl``: one record per start or resume (generation, backend, machine)."""
    path = run_dir / SESSIONS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _init_record(init: str | None) -> dict[str, Any] | None:
    """Where a run's ``init`` NAMM came from: the run folder it was saved in (its ``mean/`` or
    ``best/``), summarised recursively, so compute hours add up along the chain; or just its path."""
    if init is None:
        return None
    folder = Path(init)
    run_dir = folder.parent
    if folder.name not in WHICH or not (run_dir / RUN_CONFIG_FILE).is_file() or not (run_dir / LOG_FILE).is_file():
        return {"path": init}
    p = provenance(run_dir, folder.name)
    keep = ("run_dir", "which", "generation", "generations", "config_sha256", "member_evaluations", "compute_hours",
            "total_compute_hours", "eval_last", "init")
    return {"path": init, **{k: p[k] for k in keep}}


def _read_run(run_dir: Path) -> tuple[bytes, list[dict[str, str]]]:
    """The run's resolved config (bytes, as hashed) and its log rows; a clear error if it is no run."""
    if not (run_dir / RUN_CONFIG_FILE).is_file() or not (run_dir / LOG_FILE).is_file():
        raise ValueError(f"{str(run_dir)!r} is not a `namm evolve` run folder (it needs {RUN_CONFIG_FILE} and "
                         f"{LOG_FILE}); pass the folder `namm evolve CONFIG --out DIR` wrote.")
    with open(run_dir / LOG_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"The run {str(run_dir)!r} has not finished a generation yet; resume it with "
                         "`namm evolve CONFIG --out DIR --resume` and export when it has.")
    return (run_dir / RUN_CONFIG_FILE).read_bytes(), rows


def _stage_tasks(config: RunConfig, row: dict[str, str]) -> list[str]:
    return config.stages[int(row["stage"]) - 1].tasks


def _prompts(config: RunConfig, row: dict[str, str]) -> int:
    """Prompts each member read in the logged generation ``row``."""
    return sum(config.samples(task) for task in _stage_tasks(config, row))


def _check_dest(dest: Path, run_dir: Path, force: bool) -> None:
    target, run = dest.resolve(), run_dir.resolve()
    if target == run or target in run.parents or target.parent == run:
        raise ValueError(f"--to {str(dest)!r} is the run folder {str(run_dir)!r}, holds it or is one of its "
                         "own folders; export somewhere else, e.g. namm/pretrained/NAME.")
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"--to {str(dest)!r} is a file; give a folder to write the NAMM into.")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise ValueError(f"--to {str(dest)!r} exists and is not empty; pass --force to replace it, or choose "
                         "another folder.")


def hardware() -> dict[str, Any]:
    """The machine exporting (run the export where the run ran): CPU, core count, torch, GPU."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "torch": torch.__version__, "gpu": gpu}


def git_commit() -> str | None:
    """The commit of the namm code (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None
