"""Which evolution fitness tracks greedy exact match? Teacher-forced proxies against held-out answers.

Each policy is a method and setting of a ``namm eval`` folder, whose ``rows.jsonl`` holds the exact
match of its greedy answers on the held-out prompts. On the same prompts and schedule (the folder's
``config.json``), this recomputes the two teacher-forced objectives ``namm evolve`` can rank members
by, relative to the full cache: ``fitness.mode = "loglik"`` (per-token likelihood of the answer)
and ``"margin"`` (its tokens' margins over the runner-up token), both with the fitness code itself
(``namm.evolution.fitness.task_ratio``). It prints, per policy, the exact match beside both
fitness values, and over every (policy, prompt) how well each per-prompt proxy separates right
from wrong greedy answers (ROC AUC), and how often "every answer token is the argmax" agrees
with the greedy answer being right.

    python benchmarks/fitness_proxies.py --out docs/results/fitness-proxies \\
        docs/results/smollm2-heldout:namm:threshold docs/results/threshold-gen59:namm:threshold \\
        "docs/results/smollm2-heldout:tova:keep=0.293 (namm)" "docs/results/smollm2-heldout:h2o:keep=0.293 (namm)"

A NAMM folder's ``config.json`` names the NAMM it ran (``namm``); export it there first if it is
not (``docs/results/threshold-gen59/README.md`` says how for that one).
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

from namm.engine import Engine, EngineConfig
from namm.evaluation.runner import ROWS_FILE, load_rows
from namm.evolution.fitness import PromptResult, answer_continuation, loglik_diffs, task_ratio
from namm.models import load_model
from namm.policies import make_policy
from namm.tasks import load_task

SCHEDULE = ("model", "dtype", "seed", "split", "filler", "chunk_size", "delay", "evict_at_prefill_end",
            "evict_during_prefill", "chat")


def parse_policy(spec: str) -> tuple[str, dict, str, str, dict]:
    """FOLDER:METHOD:SETTING -> (label, folder config, method, setting, make_policy kwargs)."""
    try:
        folder, method, setting = spec.split(":", 2)
    except ValueError:
        raise SystemExit(f"policy {spec!r}: expected FOLDER:METHOD:SETTING, e.g. docs/results/x:tova:keep=0.25")
    config = json.loads((Path(folder) / "config.json").read_text())
    kwargs: dict = {}
    if method == "namm":
        if not Path(config["namm"]).exists() and "/" in config["namm"]:
            raise SystemExit(f"{folder}: its NAMM {config['namm']!r} is not there; export it first.")
        kwargs["namm"] = config["namm"]
    if setting == "threshold":
        kwargs["keep"] = "threshold"
    elif setting.startswith("keep="):
        kwargs["keep_ratio"] = float(setting[5:].split()[0])
        if method == "namm":
            kwargs["keep"] = "budget"
    elif setting != "full":
        raise SystemExit(f"policy {spec!r}: setting must be threshold, keep=R[ (namm)] or full")
    return f"{method} {setting} ({Path(folder).name})", config, method, setting, kwargs


def exact_match(folder: str, method: str, setting: str) -> dict[tuple[str, str], float]:
    rows = load_rows(Path(folder) / ROWS_FILE)
    return {(r["task"], r["sample_id"]): r["score"] for r in rows if r["method"] == method and r["setting"] == setting}


def auc(scores: list[float], labels: list[bool]) -> float:
    """P(a right answer's proxy > a wrong one's), ties counted half (Mann-Whitney)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return math.nan
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def measure(args, policies) -> tuple[dict, dict[str, list[dict]]]:
    """Per policy, per held-out prompt: its exact match (from the folder's rows) and the full
    cache's and its own teacher-forced results; plus what they were measured on."""
    base = policies[0][1]
    for label, config, *_ in policies[1:]:
        differ = [k for k in SCHEDULE if config.get(k) != base.get(k)]
        if differ:
            raise SystemExit(f"{label}: ran under other conditions than {policies[0][0]} ({differ}); compare like "
                             "with like.")
    limit = args.limit or base["limit"]
    tasks = args.tasks.split(",")
    model, tokenizer = load_model(base["model"], dtype=base["dtype"], device=base.get("device"))
    engine = Engine(model, tokenizer, config=EngineConfig(
        chunk_size=base["chunk_size"], delay=base["delay"], evict_at_prefill_end=base["evict_at_prefill_end"],
        evict_during_prefill=base["evict_during_prefill"]))
    chat = bool(base["chat"])
    built = [make_policy(method, **kwargs) for _, _, method, _, kwargs in policies]
    matches = [exact_match(spec.split(":", 2)[0], method, setting)
               for spec, (_, _, method, setting, _) in zip(args.policies, policies)]

    def run(prompt: str, answer: str, policy) -> PromptResult:
        """Both objectives as the fitness computes them: margins of the answer as greedy decoding
        would write it, the log-likelihood of the answer as given (two teacher-forced passes)."""
        margins, _, report = engine.answer_margins(prompt, answer_continuation(prompt, answer, chat), policy=policy,
                                                   chat=chat)
        loglik, tokens, _ = engine.loglikelihood(prompt, answer, policy=policy, chat=chat, return_report=True)
        return PromptResult(loglik=loglik, tokens=tokens, kept=float(report.kept_fraction), margins=margins)

    t0 = time.perf_counter()
    per: dict[str, list[dict]] = {label: [] for label, *_ in policies}
    with torch.inference_mode():
        for task in tasks:
            samples = load_task(task, tokenizer, length=base["lengths"][0], n=limit, seed=base["seed"],
                                split=base["split"], filler=base["filler"])
            for sample in samples:
                full = run(sample.prompt, sample.answers[0], None)
                for (label, *_), policy, match in zip(policies, built, matches):
                    if (task, sample.id) not in match:
                        raise SystemExit(f"{label}: no row for {task} {sample.id}; the folder's rows are incomplete.")
                    got = run(sample.prompt, sample.answers[0], policy)
                    per[label].append({"task": task, "sample_id": sample.id, "exact": match[(task, sample.id)],
                                       "full": full.to_dict(), "policy": got.to_dict()})
            print(f"  {task}: {len(samples)} prompts, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    meta = {"model": base["model"], "tasks": tasks, "limit": limit, "split": base["split"], "seed": base["seed"],
            "policies": args.policies}
    return meta, per


def fitness(mode: str, records: list[dict], tasks: list[str], score=None) -> float:
    """The run's fitness of these records (mean over tasks of the task ratios); ``score``: another
    per-prompt margin score to try in place of the shipped one (PromptResult -> float)."""
    ratios = []
    for task in tasks:
        rs = [(PromptResult.from_dict(r["policy"]), PromptResult.from_dict(r["full"])) for r in records
              if r["task"] == task]
        if score is None:
            ratio = task_ratio(mode, [a for a, _ in rs], [b for _, b in rs])
        else:
            counted = [(a, b) for a, b in rs if b.argmax_answer]
            ratio = sum(score(a) for a, _ in counted) / sum(score(b) for _, b in counted) if counted else None
        if ratio is not None:
            ratios.append(ratio)
    return float(np.mean(ratios))


def mean_sigmoid(r: PromptResult) -> float:
    return float(np.mean([1 / (1 + math.exp(-m)) for m in r.margins]))


def report(meta: dict, per: dict[str, list[dict]]) -> tuple[list[str], dict]:
    tasks = meta["tasks"]
    lines = [f"{meta['model']}, {', '.join(tasks)}, {meta['limit']} held-out prompts per task (split "
             f"{meta['split']}, seed {meta['seed']}); fitness values as namm evolve computes them (mean over tasks of "
             "each task's ratio to the full cache; margin: over the prompts whose full-cache answer is the argmax at "
             "every token, each scored by sigmoid(smallest margin); mean-sigmoid: the mean of every answer token's "
             "sigmoid instead)", "",
             "| policy | exact match x 100 | answer argmax at every token | loglik fitness | margin fitness | "
             "mean-sigmoid variant |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    summary = {}
    for label, records in per.items():
        row = {"exact": float(np.mean([r["exact"] for r in records])),
               "argmax_answer": float(np.mean([PromptResult.from_dict(r["policy"]).argmax_answer for r in records])),
               "loglik": fitness("loglik", records, tasks), "margin": fitness("margin", records, tasks),
               "mean_sigmoid": fitness("margin", records, tasks, score=mean_sigmoid), "prompts": len(records)}
        summary[label] = row
        lines.append(f"| {label} | {100 * row['exact']:.1f} | {100 * row['argmax_answer']:.1f}% | {row['loglik']:.3f} | "
                     f"{row['margin']:.3f} | {row['mean_sigmoid']:.3f} |")
    everything = [r for records in per.values() for r in records]
    right = [r["exact"] > 0.5 for r in everything]
    results = [PromptResult.from_dict(r["policy"]) for r in everything]
    fulls = [PromptResult.from_dict(r["full"]) for r in everything]
    proxies = {"loglik objective (per-token log-likelihood minus the full cache's)": loglik_diffs(results, fulls),
               "margin objective (smallest margin)": [min(r.margins) for r in results],
               "mean of the answer tokens' sigmoid(margin)": [mean_sigmoid(r) for r in results]}
    lines += ["", f"Per prompt, over all {len(everything)} (policy, prompt) pairs ({sum(right)} greedy answers right): "
              "ROC AUC of each proxy for a right greedy answer", ""]
    lines += [f"- {name}: {auc(values, right):.3f}" for name, values in proxies.items()]
    agree = np.mean([r.argmax_answer == y for r, y in zip(results, right)])
    lines.append(f"- 'every answer token is the argmax' agrees with the greedy answer being right on "
                 f"{100 * agree:.1f}%")
    return lines, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("policies", nargs="*", help="FOLDER:METHOD:SETTING of namm eval folders")
    p.add_argument("--tasks", default="passkey,niah_single,niah_multikey")
    p.add_argument("--limit", type=int, default=None, help="prompts per task (default: the folders')")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="folder for results.json and output.txt")
    p.add_argument("--report-only", action="store_true", help="report from --out's results.json, run nothing")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.report_only:
        if not args.out:
            raise SystemExit("--report-only reads --out/results.json: give --out.")
        saved = json.loads((Path(args.out) / "results.json").read_text())
        meta, per = saved["meta"], saved["per_prompt"]
    else:
        if not args.policies:
            raise SystemExit("give at least one FOLDER:METHOD:SETTING policy")
        meta, per = measure(args, [parse_policy(s) for s in args.policies])
    lines, summary = report(meta, per)
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "per_prompt": per},
                                                     indent=1) + "\n")
        (out / "output.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
