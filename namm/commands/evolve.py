"""``namm evolve CONFIG [--resume] [--out DIR]``: evolve a NAMM with CMA-ES, as a TOML file says.

Writes into the run folder a CSV log, a plot, and after every generation a checkpoint (the
optimiser state, the CMA mean as a NAMM folder in ``mean/``, the best-evaluated mean in ``best/``).
``--resume`` continues exactly where a run stopped; the same seed gives the same run.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

log = logging.getLogger("namm.evolve")

DESCRIPTION = """Evolve a NAMM with CMA-ES as the run's TOML file says (examples/*.toml).

The run folder gets log.csv, fitness.png and, after every generation, a checkpoint: state.pkl
(optimiser state and history), mean/ (the CMA mean as a NAMM folder, for `namm generate
--policy namm --namm DIR` or NAMM.from_pretrained) and best/ (the mean with the best
evaluation). --resume continues exactly where a run stopped (even after kill -9); the same
seed gives the same run."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evolve", help="evolve a NAMM with CMA-ES (resumable; local, worker processes or Ray)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="the run's TOML file (see examples/smollm2-default.toml)")
    p.add_argument("--resume", action="store_true", help="continue the run in its output folder")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (overrides output_dir in the file)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads per worker (overrides the file; 1 when other jobs share the cores: two "
                        "threads on a contended core wait on each other)")
    p.add_argument("--backend", choices=("local", "ray", "processes"), default=None,
                   help="where members run (overrides the file): in this process, on Ray actors, or in worker "
                        "processes on this machine (several can share one GPU; no Ray needed)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="Ray actors or worker processes (overrides the file's [ray] actors / [processes] workers)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="the model's dtype (overrides the file; recorded in the run, so --resume needs the same): "
                        "float32 on a CPU without AVX512-BF16 or AMX, where bfloat16 is emulated and slower")
    p.add_argument("--evaluate", default=None, metavar="NAMM",
                   help="evolve nothing: evaluate this NAMM folder (e.g. the run's init, or another run's best/) on "
                        "the run's eval prompts, as the run evaluates its CMA mean, and print its fitness")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no live progress display")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from namm.evolution.runner import run_from_file

    quiet = bool(getattr(args, "quiet", False))
    if args.evaluate is not None:
        result = run_from_file(args.config, output_dir=args.out, on_event=_log_event, threads=args.threads,
                               backend=args.backend, workers=args.workers, evaluate=args.evaluate,
                               dtype=args.dtype)
        tasks = " ".join(f"{task} {value:.4f}" for task, value in result["per_task"].items())
        print(f"{args.evaluate} on the run's eval prompts (stage {result['stage']}, {result['prompts']} prompts): "
              f"fitness {result['fitness']:.4f}, score {result['raw']:.4f}, kept {result['kept']:.1%}; {tasks}")
        return 0
    display = None if quiet else LiveDisplay()
    try:
        state = run_from_file(args.config, output_dir=args.out, resume=args.resume,
                              on_event=display.event if display else _log_event, threads=args.threads,
                              backend=args.backend, workers=args.workers, dtype=args.dtype)
    finally:
        if display:
            display.stop()
    best = state.get("best_eval")
    msg = f"done: {state['generation']} generations"
    if best:
        msg += f"; best evaluated mean {best['fitness']:.4f} (kept {best['kept']:.1%}) at generation {best['generation']}"
    if not quiet:
        print(msg)
    return 0


def _log_event(kind: str, data: dict[str, Any]) -> None:
    if kind == "start":
        log.info("run %s under: %s", data["run_dir"], data["conditions"])
    if kind == "generation":
        log.info("generation %d: best %.4f mean %.4f kept %.1f%% (%.1fs); %s", data["generation"], data["fitness_best"],
                 data["fitness_mean"], 100 * data["kept_mean"], data["seconds"], members_line(data))


def members_line(row: dict[str, Any]) -> str:
    """Every member's score (weighted task ratio before cache terms) and kept cache, in member order."""
    pairs = zip(row.get("member_score", []), row.get("member_kept", []))
    return "members score/kept: " + " ".join(f"{score:.3f}/{kept:.0%}" for score, kept in pairs)


class LiveDisplay:
    """A rich progress bar over generations plus a line per finished generation."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"), console=self.console, transient=False,
        )
        self.task = None
        self.started = False
        self.t_last = time.perf_counter()

    def _ensure(self, total: int, completed: int) -> None:
        if not self.started:
            self.progress.start()
            self.started = True
        if self.task is None:
            self.task = self.progress.add_task("generations", total=total, completed=completed, status="")

    def event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "calibrating":
            self.console.print(f"calibrating normalisation on {data['prompts']} {data['task']} prompts (full cache)")
        elif kind == "references":
            self.console.print(f"full-cache reference on {data['prompts']} new prompts")
        elif kind == "start":
            self.console.print(f"run {data['run_dir']}: {data['params']} parameters, population {data['popsize']}"
                               + (f", resuming at generation {data['generation']}" if data["generation"] else ""))
            self.console.print(f"conditions (recorded in the NAMM): {data['conditions']}")
            self._ensure(data["total"], data["generation"])
        elif kind == "member" and self.task is not None:
            self.progress.update(self.task, status=f"gen {data['generation']}: member {data['member'] + 1}/{data['popsize']}")
        elif kind == "generation" and self.task is not None:
            line = (f"gen {data['generation']:>4} [{data['stage']}] best {data['fitness_best']:.4f} "
                    f"mean {data['fitness_mean']:.4f} kept {data['kept_mean']:.1%} {data['seconds']:.1f} s/gen")
            if data.get("eval_fitness") is not None:
                line += f" | eval {data['eval_fitness']:.4f} kept {data['eval_kept']:.1%}"
            self.progress.console.print(line)
            self.progress.console.print(f"     {members_line(data)}", highlight=False)
            self.progress.update(self.task, advance=1, status="")

    def stop(self) -> None:
        if self.started:
            self.progress.stop()
