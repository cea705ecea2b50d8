"""Member evaluations per minute: the evolution's inner loop, today's code against a baseline commit.

A *member evaluation* is one prompt read and answered (greedy, the task's answer length) under one
CMA-ES member's NAMM: ``Worker.run`` of ``namm evolve``. This script times a generation's worth
of them (``--members`` x ``--prompts`` prompts of ``--length`` tokens) under

* ``base``: the ``namm`` package of ``--base-ref`` (default: main before issue 9), extracted with
  ``git archive`` and imported into *this* process, fp32 (its default);
* the working tree's ``namm`` in several variants (``--variants``): ``fp32`` (code changes only),
  ``fp32+share`` (plus the prompt prefix read once per generation), ``bf16+share`` (plus bfloat16
  weights), ``bf16+share+c512`` (plus 512-token prefill chunks: the schedule
  ``examples/smollm2-default.toml`` uses; eviction still every ``delay`` tokens), ``+rayN`` (the
  members spread over N Ray actors with one torch thread each instead of one process with
  ``--threads``: ``namm evolve`` with ``backend = "ray"``, ``[ray] actors = N``, ``threads = 1``;
  the jobs are cut as ``namm evolve`` cuts them, each actor its own prompts, so each reads only
  its own prompts' shared prefixes: ``namm.evolution.fitness.split_jobs``).

``--objective loglik`` (default, what the default run optimises) scores the teacher-forced
likelihood of the answer; ``metric`` generates it greedily.

Rounds alternate the variants (noise on these shared machines hits all of them alike) after one
untimed warm-up each; the prefix store is emptied at the start of every round, so each round
pays for its prefixes like a real generation does. Prints evaluations per minute and the ratio to
``base``, plus the bfloat16 keep-all error against the plain transformers forward. Usage:

    python benchmarks/member_throughput.py --length 1024 --members 4 --prompts 2 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
BASE_REF = "680144a"  # main before issue 9 ("today's path")


def _namm_modules() -> dict:
    return {k: m for k, m in sys.modules.items() if k == "namm" or k.startswith("namm.")}


def import_namm(root: Path) -> dict:
    """Import the ``namm`` package found under ``root`` without disturbing the current one."""
    current = _namm_modules()
    for k in current:
        del sys.modules[k]
    sys.path.insert(0, str(root))
    try:
        for name in ("namm", "namm.engine", "namm.evolution.fitness", "namm.evolution.prompts", "namm.tasks"):
            importlib.import_module(name)
        loaded = _namm_modules()
    finally:
        sys.path.remove(str(root))
        for k in _namm_modules():
            del sys.modules[k]
        sys.modules.update(current)
    return loaded


@contextlib.contextmanager
def active(modules: dict):
    """Make ``modules`` the ``namm`` package (lazy imports inside it resolve to itself)."""
    saved = _namm_modules()
    for k in saved:
        del sys.modules[k]
    sys.modules.update(modules)
    attention = modules["namm.attention"]
    attention.AttentionInterface.register(attention.ATTN_IMPLEMENTATION, attention.namm_attention)
    try:
        yield
    finally:
        for k in _namm_modules():
            del sys.modules[k]
        sys.modules.update(saved)


def extract(ref: str, into: Path) -> Path:
    """The ``namm`` package of git ``ref`` under ``into``."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", ref, "namm"], check=True, capture_output=True).stdout
    archive = into / "base.tar"
    archive.write_bytes(data)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into


class Variant:
    """One way of running members: a namm package, a dtype, prefix sharing on or off."""

    def __init__(self, name: str, modules: dict, args, dtype: str, share: bool, chunk_size: int,
                 actors: int = 0) -> None:
        self.name, self.modules, self.share, self.backend = name, modules, share, None
        with active(modules):
            fitness = modules["namm.evolution.fitness"]
            engine = modules["namm.sequence"].EngineConfig(chunk_size=chunk_size, delay=args.delay)
            fields = {f for f in fitness.WorkerSpec.__dataclass_fields__}
            spec = dict(model=args.model, dtype=dtype, device="cpu", engine=engine, namm={}, threads=args.threads)
            if "mode" in fields:  # the baseline: one fitness mode per worker, chat template always on
                spec["mode"] = args.objective
            else:  # today: the NAMM config records the conditions; the baseline's, for the same prompts
                spec["namm"] = {"chunk_size": chunk_size, "delay": args.delay, "chat": True}
                spec["share_prefix"] = share
            if share and "share_prefix" not in spec:
                raise SystemExit(f"{name}: this namm has no prefix sharing")
            self.worker = fitness.WorkerSpec(**spec).build()
            self.prompts = self._prompts(args)
            if actors:  # the same worker recipe, one torch thread each, in Ray actors
                from namm.evolution.backends import RayBackend
                from namm.evolution.config import RayConfig

                self.backend = RayBackend(fitness.WorkerSpec(**{**spec, "threads": 1}), RayConfig(actors=actors))

    def _prompts(self, args) -> list:
        prompts_mod, tasks = self.modules["namm.evolution.prompts"], self.modules["namm.tasks"]
        samples = tasks.load_task(args.task, self.worker.engine.tokenizer, length=args.length, n=args.prompts,
                                  seed=args.seed, split="train")
        extra = {"objective": args.objective} if "objective" in prompts_mod.Prompt.__dataclass_fields__ else {}
        return [prompts_mod.Prompt(id=f"{args.task}|{s.id}", task=args.task, sample=s, **extra) for s in samples]

    def generation(self, members: list[np.ndarray]) -> float:
        """Seconds to evaluate every member on every prompt (one generation)."""
        fitness = self.modules["namm.evolution.fitness"]
        if self.backend is not None:
            for actor in self.backend.actors:
                self.backend.ray.get(actor.call.remote("clear_prefixes"))
            t0 = time.perf_counter()  # jobs as `namm evolve` sends them: each actor its own prompts
            self.backend.run(fitness.split_jobs(members, self.prompts, self.backend.workers))
            return time.perf_counter() - t0
        with active(self.modules):
            store = getattr(self.worker.engine, "prefix_store", None)
            if store is not None:
                store.clear()
            t0 = time.perf_counter()
            for i, params in enumerate(members):
                self.worker.run(fitness.Job(i, params, self.prompts))
            return time.perf_counter() - t0


def bf16_keep_all_error(bf16: Variant, fp32: Variant, args) -> str:
    """Max |logit difference| of the engine's keep-all bf16 run against plain transformers bf16,
    and how often its top-1 token agrees with the fp32 model's."""
    with active(bf16.modules):
        engine = bf16.worker.engine
        ids = engine.encode(bf16.prompts[0].prompt, chat=False)  # real text: a passkey prompt
        with torch.inference_mode():
            plain = engine.model(ids[None]).logits[0].float()
            with engine.running():
                ours = engine.start().feed(ids, all_logits=True)
            ref = fp32.worker.engine.model(ids[None]).logits[0].float()
    err = (ours - plain).abs().max().item()
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return (f"bf16 keep-all: engine vs plain transformers bf16 max |dlogit| {err:.3g} "
            f"(logits up to {plain.abs().max().item():.3g}); top-1 agreement with fp32 {agree:.1%} "
            f"over {ids.numel()} positions of a {args.task} prompt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--task", default="passkey")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--delay", type=int, default=512)
    ap.add_argument("--sigma", type=float, default=0.065, help="members are N(0, sigma^2) like CMA-ES generation 0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-ref", default=BASE_REF)
    ap.add_argument("--objective", default="loglik", choices=("loglik", "metric"),
                    help="loglik: teacher-forced answer likelihood (examples/smollm2-default.toml); "
                         "metric: greedy generation of the answer")
    ap.add_argument("--variants", default="fp32,fp32+share,bf16+share,bf16+share+c512",
                    help="comma-separated: fp32 or bf16, +share (prefix sharing), +cN (prefill chunk N), "
                         "+rayN (N Ray actors x 1 thread)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        base_mods = import_namm(extract(args.base_ref, Path(tmp)))
        variants = [Variant(f"base ({args.base_ref}, fp32)", base_mods, args, "float32", False, args.chunk_size)]
        current = import_namm(REPO)
        for name in args.variants.split(","):
            parts = name.split("+")
            chunk = next((int(p[1:]) for p in parts if p.startswith("c")), args.chunk_size)
            dtype = "bfloat16" if parts[0] == "bf16" else "float32"
            actors = next((int(p[3:]) for p in parts if p.startswith("ray")), 0)
            variants.append(Variant(name, current, args, dtype, "share" in parts, chunk, actors))
        texts = {tuple(p.prompt for p in v.prompts) for v in variants}  # same seed, same prompts
        if len(texts) != 1:
            print("warning: the baseline builds different prompts; timings compare different texts")
        n_params = variants[-1].worker.num_params()
        members = [rng.normal(0.0, args.sigma, n_params).astype(np.float32) for _ in range(args.members)]
        for v in variants:  # warm-up (first calls allocate and tune kernels)
            v.generation(members[:1])
        times: dict[str, list[float]] = {v.name: [] for v in variants}
        for r in range(args.rounds):
            for v in variants:
                times[v.name].append(v.generation(members))
                print(f"round {r}: {v.name}: {times[v.name][-1]:.1f} s", flush=True)

    evals = args.members * args.prompts
    base_rate = None
    print(f"\n{args.model}, {args.task} prompts of {args.length} tokens ({args.objective}), {args.members} members x "
          f"{args.prompts} prompts per generation, delay {args.delay}, chunk {args.chunk_size}, "
          f"{args.threads} threads, median of {args.rounds} rounds")
    print(f"{'variant':34s} {'s/generation':>12s} {'evals/min':>10s} {'x base':>7s}")
    for name, ts in times.items():
        rate = evals / float(np.median(ts)) * 60
        base_rate = base_rate or rate
        print(f"{name:34s} {np.median(ts):12.1f} {rate:10.1f} {rate / base_rate:7.2f}")
    by_dtype = {v.worker.engine.model.dtype: v for v in variants[1:]}
    if torch.bfloat16 in by_dtype and torch.float32 in by_dtype:
        print(bf16_keep_all_error(by_dtype[torch.bfloat16], by_dtype[torch.float32], args))


if __name__ == "__main__":
    main()
