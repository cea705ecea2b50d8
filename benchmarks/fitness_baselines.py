"""Where an evolution run stands against the hand-designed methods, on the run's own fitness.

Every method runs on the run's eval pool (other seeds, wordings and filler books than training),
under the run's schedule (chunk, delay, eviction steps, chat) at the run's keep ratio, and is scored
with the run's fitness (the same ``member_fitness`` the CMA-ES ranks members with). The NAMM rows are
the run's ``mean/`` and ``best/`` folders. Full-cache references are read from the run's
``reference_scores.json`` where present (never written: the run may be going on beside this).

    python benchmarks/fitness_baselines.py --run training/smollm2-default --samples 8 --threads 1 \
        --out docs/results/fitness-baselines
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from namm.evolution.config import load_config
from namm.evolution.fitness import PromptResult, Worker, WorkerSpec, loglik_diffs, member_fitness, namm_policy
from namm.evolution.prompts import ReferenceScores
from namm.memory.model import NAMM
from namm.policies import make_policy

BASELINES = ["random", "streaming", "h2o", "tova", "snapkv", "pyramidkv", "l2"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="an evolution run folder (config.toml, calibration.pt, mean/)")
    p.add_argument("--methods", default=",".join(BASELINES + ["namm-mean", "namm-best"]),
                   help="policies; namm-mean / namm-best: the run's folders; namm=PATH: any NAMM folder")
    p.add_argument("--tasks", default=None, help="comma list (default: every task of the run)")
    p.add_argument("--samples", type=int, default=None, help="eval prompts per task (default: the run's)")
    p.add_argument("--keep-ratio", type=float, default=None, help="default: the run's keep_ratio")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="folder for results.json")
    args = p.parse_args(argv)

    run = Path(args.run)
    config = load_config(run / "config.toml", output_dir=run)
    if args.samples:
        config.fitness.eval_samples_per_task = args.samples
    ratio = args.keep_ratio or config.namm_config().get("keep_ratio") or 0.25
    spec = WorkerSpec(model=config.model, dtype=config.dtype, device=config.device, engine=config.engine,
                      namm=config.namm_config(), threads=args.threads)
    worker = Worker(spec)
    pools = worker.build_pools(config)
    tasks = args.tasks.split(",") if args.tasks else [t.name for t in config.tasks]
    prompts = pools.eval_batch(tasks)
    weights = {t.name: float(t.weight) for t in config.tasks}

    cached = ReferenceScores(run / "reference_scores.json", config.model)
    have = {p.id for p in prompts} - {p.id for p in cached.missing(prompts)}
    refs = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            if prompt.id in have:
                refs.append(PromptResult.from_dict(cached.get([prompt])[0]))
            else:
                refs.append(worker.run_prompt(prompt, None))
    print(f"{len(prompts)} eval prompts ({', '.join(tasks)}), keep ratio {ratio:g}; references "
          f"{time.perf_counter() - t0:.0f} s ({len(have)} cached)", flush=True)

    results: dict[str, dict] = {}
    for method in args.methods.split(","):
        if method.startswith("namm="):  # any NAMM folder
            policy = namm_policy(NAMM.from_pretrained(method.split("=", 1)[1]))
        elif method.startswith("namm-"):  # a NAMM folder of the run: namm-mean, namm-best
            policy = namm_policy(NAMM.from_pretrained(run / method.split("-", 1)[1]))
        else:
            policy = make_policy(method, keep_ratio=ratio)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = [worker.run_prompt(prompt, policy) for prompt in prompts]
        fit = member_fitness(config.fitness, prompts, out, refs, weights)
        per_prompt = {}
        for task in tasks:
            idx = [i for i, pr in enumerate(prompts) if pr.task == task]
            per_prompt[task] = loglik_diffs([out[i] for i in idx], [refs[i] for i in idx])
        results[method] = {"fitness": fit.fitness, "raw": fit.raw, "kept": fit.kept, "per_task": fit.per_task,
                           "loglik_diff_per_token": per_prompt, "seconds": time.perf_counter() - t0}
        cells = "  ".join(f"{t} {fit.per_task.get(t, math.nan):.3f}" for t in tasks)
        print(f"{method:10s} fitness {fit.fitness:.3f}  kept {fit.kept:.1%}  {cells}  "
              f"({results[method]['seconds']:.0f} s)", flush=True)

    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        generation = len(_generations(run))
        (out_dir / "results.json").write_text(json.dumps(
            {"run": str(run), "generations_done": generation, "keep_ratio": ratio, "tasks": tasks,
             "prompts_per_task": config.fitness.eval_samples_per_task, "methods": results,
             "command": "python " + " ".join(sys.argv)}, indent=2) + "\n")
    return 0


def _generations(run: Path) -> list:
    log_path = run / "log.csv"
    return log_path.read_text().splitlines()[1:] if log_path.exists() else []


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    raise SystemExit(main())
