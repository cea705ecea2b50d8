"""A/B of one prefix-sharing saving: forks of a prompt's prefix reuse the first eviction step's
inputs (a NAMM's spectrogram EMA and extras, computed by the first member; ``NAMMPolicy.on_fork``)
against every member computing its own, in one process, rounds alternating.

A member evaluation as ``namm evolve`` runs it (``Worker.run``), on the run's prompts, with the
prompt prefixes already stored (each round fills them untimed first), so what is timed is the
members' own work: the eviction step(s), the answer, the gathers. Usage:

    python benchmarks/fork_inputs.py --config examples/smollm2-prompt-end.toml --dtype float32 --rounds 4 \
        --tasks passkey,niah_single,niah_multikey --prompts 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from namm.evolution.config import load_config
from namm.evolution.fitness import Job, WorkerSpec
from namm.policies.namm import NAMMPolicy, load_namm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="examples/smollm2-prompt-end.toml")
    ap.add_argument("--dtype", default=None, help="overrides the run's dtype (float32 on a CPU without native bf16)")
    ap.add_argument("--namm", default="smollm2", help="members are this NAMM plus noise (its statistics are used)")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tasks", default=None, help="comma-separated (default: the run's tasks)")
    ap.add_argument("--prompts", type=int, default=None, help="the first N prompts of generation 0's batch")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    cfg = load_config(args.config, "/tmp/unused")
    spec = WorkerSpec(model=cfg.model, dtype=args.dtype or cfg.dtype, device=None, engine=cfg.engine,
                      namm=cfg.namm_config(), threads=args.threads)
    worker = spec.build()
    init = load_namm(args.namm)
    worker.set_calibration(init.norm)
    base = init.get_flat().numpy()
    rng = np.random.default_rng(0)
    tasks = args.tasks.split(",") if args.tasks else [t.name for t in cfg.tasks]
    prompts = worker.build_pools(cfg).generation_batch(0, tasks)[: args.prompts]
    real = NAMMPolicy.on_fork
    times: dict[str, list[float]] = {"shared": [], "own": []}
    try:
        for r in range(args.rounds):
            for mode in times:
                NAMMPolicy.on_fork = real if mode == "shared" else (lambda self, shared: None)
                worker.clear_prefixes()
                worker.run(Job(0, base, prompts))  # fills the prefixes, untimed
                t0 = time.perf_counter()
                for m in range(args.members):
                    worker.run(Job(m, base + rng.normal(0, 0.05, base.shape), prompts))
                times[mode].append(time.perf_counter() - t0)
            print(f"round {r}: shared {times['shared'][-1]:.2f} s, own {times['own'][-1]:.2f} s, "
                  f"ratio {times['own'][-1] / times['shared'][-1]:.2f}", flush=True)
    finally:
        NAMMPolicy.on_fork = real
    n = args.members * len(prompts)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"{n} member evaluations a round ({args.members} members x {len(prompts)} prompts), median of {args.rounds}: "
          f"shared inputs {med['shared'] / n:.3f} s each, own inputs {med['own'] / n:.3f} s each: "
          f"{med['own'] / med['shared']:.2f}x")


if __name__ == "__main__":
    main()
