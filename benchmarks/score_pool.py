"""NAMMs side by side on one selection split, every prompt read once: does score pooling help?

The held-out split (seed 7) stays untouched: this compares variants of a NAMM (e.g. the same
parameters with ``score_pool`` 1, 3, 5, each with its threshold fitted to the same kept fraction on
training prompts by ``namm calibrate --keep-stats --fit-threshold``) on other test-split seeds, to
choose one before a single held-out run. Every variant must share the feature config, so all of
them continue one read of each prompt (namm.prefix) and a prompt costs one prefill.

Per variant: the greedy score per task (the task's metric), the kept fraction, and the answer's
teacher-forced log-likelihood per token relative to the full cache (denser than the score: it moves
when a digit's probability drops without flipping the greedy answer). Paired differences against
the first variant, with standard errors over prompts.

    python benchmarks/score_pool.py --namm /tmp/pool1fit,/tmp/pool3fit,/tmp/pool5fit --seed 11 --limit 16
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch


def main() -> None:
    from namm.engine import Engine, EngineConfig
    from namm.memory.model import NAMM
    from namm.models import load_model
    from namm.policies import make_policy
    from namm.policies.namm import NAMMPolicy
    from namm.prefix import PrefixStore
    from namm.tasks import load_task
    from namm.tasks.base import score_sample

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--namm", required=True, help="comma-separated NAMM folders; the first is the reference")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tasks", default="passkey,niah_single,niah_multikey")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--limit", type=int, default=16, help="prompts per task")
    ap.add_argument("--seed", type=int, default=11, help="test-split seed; 7 is the held-out split's: refused")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.seed == 7:
        raise SystemExit("--seed 7 is the held-out split the README reports on: choose with another seed.")
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = [p for p in args.namm.split(",") if p]
    namms = [NAMM.from_pretrained(p) for p in paths]
    if len({n.config.features for n in namms}) != 1 or len({tuple(n.config.schedule.items()) for n in namms}) != 1:
        raise SystemExit("the NAMMs must share their features and schedule to share each prompt's read.")
    model, tok = load_model(args.model, dtype=args.dtype)
    engine = Engine(model, tok, config=EngineConfig(**namms[0].config.schedule), prefix_store=PrefixStore(2))
    chat = bool(namms[0].config.chat)
    names = ["full", *paths]
    res: dict[str, dict[str, list]] = {n: {"score": [], "kept": [], "ll": [], "task": []} for n in names}
    t0 = time.perf_counter()
    for task in [t for t in args.tasks.split(",") if t]:
        samples = load_task(task, tok, length=args.length, n=args.limit, seed=args.seed, split="test")
        for sample in samples:
            for name, namm in zip(names, [None, *namms]):
                policy = make_policy("full") if namm is None else NAMMPolicy(namm)
                out = engine.generate(sample.prompt, max_new_tokens=sample.max_new_tokens, stop=sample.stop,
                                      chat=chat, policy=policy)
                policy = make_policy("full") if namm is None else NAMMPolicy(namm)
                ll, n_tok = _ll(engine, sample, policy, chat)
                res[name]["score"].append(score_sample(sample, out.text))
                res[name]["kept"].append(out.report.kept_fraction)
                res[name]["ll"].append(ll / n_tok)
                res[name]["task"].append(task)
        print(f"{task}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    _report(names, res, args)


def _ll(engine, sample, policy, chat):
    total, n_tok, _ = engine.loglikelihood(sample.prompt, " " + sample.answers[0], policy=policy, chat=chat,
                                           return_report=True)
    return total, n_tok


def _se(xs: list[float]) -> float:
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")


def _report(names, res, args) -> None:
    tasks = list(dict.fromkeys(res["full"]["task"]))
    print(f"\n{args.model}, {args.tasks} at {args.length} tokens, test split seed {args.seed}, "
          f"{args.limit} prompts per task")
    print("| variant | " + " | ".join(tasks) + " | mean score | kept | answer loglik/token - full |")
    print("| --- |" + " ---: |" * (len(tasks) + 3))
    full_ll = res["full"]["ll"]
    for name in names:
        r = res[name]
        cells = [100 * statistics.mean(s for s, t in zip(r["score"], r["task"]) if t == task) for task in tasks]
        dll = [a - b for a, b in zip(r["ll"], full_ll)]
        print(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells)
              + f" | {100 * statistics.mean(r['score']):.1f} ± {100 * _se(r['score']):.1f}"
              + f" | {100 * statistics.mean(r['kept']):.1f}% | {statistics.mean(dll):+.3f} ± {_se(dll):.3f} |")
    ref = names[1]
    for name in names[2:]:
        ds = [a - b for a, b in zip(res[name]["score"], res[ref]["score"])]
        dl = [a - b for a, b in zip(res[name]["ll"], res[ref]["ll"])]
        print(f"paired {name} - {ref}: score {100 * statistics.mean(ds):+.1f} ± {100 * _se(ds):.1f}, "
              f"loglik/token {statistics.mean(dl):+.3f} ± {_se(dl):.3f} (n = {len(ds)})")


if __name__ == "__main__":
    main()
