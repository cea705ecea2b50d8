"""The README's held-out tables and paired differences, from a ``namm eval`` folder's ``rows.jsonl``.

    python benchmarks/heldout_tables.py docs/results/smollm2-heldout
    python benchmarks/heldout_tables.py docs/results/gemma3-transfer --tasks passkey
    python benchmarks/heldout_tables.py docs/results/rl/halfcheetah --tasks rl:halfcheetah \
        --full-tasks rl:halfcheetah --limit 100 --ratios 0.25,0.5 --vs-full

Prints (markdown) the side-by-side table of the NAMM's threshold rows against every baseline at the
kept fraction matched to it (``--match-namm``), the budget table (mean of the tasks the full cache
can do at 25 / 35 / 50%), and paired differences: per prompt index, the mean over tasks of the
score difference between two methods on the same prompts, then its mean and standard error over
prompts. A cell shows score x 100 ± standard error over its prompts; a mean over tasks has
± sqrt(sum SE^2) / number of tasks; cells with fewer than ``--limit`` prompts are marked ``(n=...)``
and left out of means.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

from namm.evaluation.runner import ROWS_FILE, load_rows

NAMES = {"full": "full cache", "namm": "**NAMM**", "h2o": "H2O", "tova": "TOVA", "snapkv": "SnapKV",
         "streaming": "StreamingLLM", "pyramidkv": "PyramidKV", "l2": "L2 key norm",
         "expected-attention": "Expected Attention", "kvzip": "KVzip", "kvzip-once": "KVzip, once",
         "ada-snapkv": "Ada-SnapKV", "random": "random eviction"}
BASELINES = ["tova", "h2o", "streaming", "snapkv", "pyramidkv", "l2", "expected-attention", "kvzip", "kvzip-once",
             "ada-snapkv", "random"]


def load(folder: Path) -> dict[tuple[str, str], dict[str, list[dict]]]:
    cells: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in load_rows(folder / ROWS_FILE):
        cells[(r["method"], r["setting"])][r["task"]].append(r)
    return cells


def stat(values: list[float]) -> tuple[float, float, int] | None:
    n = len(values)
    if n == 0:
        return None
    m = sum(values) / n
    se = (sum((x - m) ** 2 for x in values) / (n - 1)) ** 0.5 / n ** 0.5 if n > 1 else 0.0
    return m, se, n


def fmt(c: tuple[float, float, int] | None, limit: int) -> str:
    if c is None:
        return "-"
    s = f"{100 * c[0]:.1f} ± {100 * c[1]:.1f}"
    return s if c[2] == limit else f"{s} (n={c[2]})"


def mean_over(cells, key, tasks, limit):
    cs = [stat([r["score"] for r in cells[key][t]]) for t in tasks]
    if any(c is None or c[2] != limit for c in cs):
        return None
    return sum(c[0] for c in cs) / len(cs), math.sqrt(sum(c[1] ** 2 for c in cs)) / len(cs), limit


def share(cells, key, tasks, field):
    rows = [r for t in tasks for r in cells[key][t]]
    if field == "peak":
        values = [r["peak_kv_bytes"] / r["kv_bytes_full"] for r in rows]
    else:
        values = [r[field] for r in rows]
    return f"{100 * sum(values) / len(values):.1f}%" if values else ""


def paired(cells, a, b, tasks):
    """Mean and SE over prompt indices of the per-prompt mean over tasks of score(a) - score(b)."""
    per_task = []
    for t in tasks:
        sa = {r["sample_id"].rsplit("-", 1)[-1]: r["score"] for r in cells[a][t]}
        sb = {r["sample_id"].rsplit("-", 1)[-1]: r["score"] for r in cells[b][t]}
        per_task.append({i: sa[i] - sb[i] for i in sa.keys() & sb.keys()})
    common = set.intersection(*(set(p) for p in per_task)) if per_task else set()
    return stat([sum(p[i] for p in per_task) / len(per_task) for i in sorted(common)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="a namm eval --out folder (reads rows.jsonl)")
    ap.add_argument("--tasks", default="passkey,niah_single,niah_multikey,kv_retrieval")
    ap.add_argument("--full-tasks", default="passkey,niah_single,niah_multikey",
                    help="the tasks the full cache can do: the 'mean of 3' column and the budget table")
    ap.add_argument("--limit", type=int, default=32, help="prompts per complete cell")
    ap.add_argument("--ratios", default="0.25,0.35,0.5", help="the fixed kept fractions of the budget table")
    ap.add_argument("--vs-full", action="store_true",
                    help="also print every row's paired difference against the full cache")
    args = ap.parse_args()
    ratios = args.ratios.split(",")
    cells = load(args.folder)
    tasks, some = args.tasks.split(","), args.full_tasks.split(",")
    matched = sorted({s for (m, s) in cells if s.endswith("(namm)")})
    namm = ("namm", "threshold")

    print("| method | setting | final cache | mean cache / peak KV | " + " | ".join(tasks)
          + f" | mean | mean of {len(some)} |")
    print("| --- | --- | ---: | ---: |" + " ---: |" * (len(tasks) + 2))
    per_head = ("namm", "threshold per head")
    for key in [("full", "full"), namm, per_head] + [(m, s) for s in matched for m in BASELINES]:
        if key not in cells:
            continue
        scores = [fmt(stat([r["score"] for r in cells[key][t]]), args.limit) for t in tasks]
        print(f"| {NAMES.get(key[0], key[0])} | {key[1]} | {share(cells, key, tasks, 'kept_fraction')} | "
              f"{share(cells, key, tasks, 'mean_fraction')} / {share(cells, key, tasks, 'peak')} | "
              + " | ".join(scores) + f" | {fmt(mean_over(cells, key, tasks, args.limit), args.limit)} | "
              f"{fmt(mean_over(cells, key, some, args.limit), args.limit)} |")

    print(f"\nMean of {len(some)} ({', '.join(some)}) at a fixed kept fraction:\n")
    print("| method | " + " | ".join(f"{float(r):.0%}" for r in ratios) + " |")
    print("| --- |" + " ---: |" * len(ratios))
    print(f"| full cache (100%) | {fmt(mean_over(cells, ('full', 'full'), some, args.limit), args.limit)} |"
          + " |" * (len(ratios) - 1))
    for m in ["namm"] + BASELINES:
        if any((m, f"keep={r}") in cells for r in ratios):
            name = NAMES.get(m, m) + (" (budget)" if m == "namm" else "")
            print(f"| {name} | " + " | ".join(fmt(mean_over(cells, (m, f"keep={r}"), some, args.limit), args.limit)
                                             for r in ratios) + " |")

    if namm not in cells:
        return
    print("\nPaired differences, score x 100 (mean ± SE over prompts; n prompts):\n")
    groups = [(f"{len(tasks)} tasks", tasks), (f"{len(some)} tasks", some)]
    def line(a, b, label):
        out = []
        for name, ts in groups:
            c = paired(cells, a, b, ts)
            if c is not None and c[2] > 1:
                out.append(f"{name}: {100 * c[0]:+.1f} ± {100 * c[1]:.1f} (n={c[2]})")
        if out:
            print(f"- {label}: " + "; ".join(out))
    line(namm, ("full", "full"), "NAMM − full cache")
    line(per_head, namm, "NAMM per KV head − NAMM")
    for s in matched:
        for m in BASELINES:
            line(namm, (m, s), f"NAMM − {NAMES.get(m, m)} at {s}")
    for r in ratios:
        line(namm, ("tova", f"keep={r}"), f"NAMM (threshold) − TOVA at {float(r):.0%}")
        line(("namm", f"keep={r}"), ("tova", f"keep={r}"), f"NAMM (budget) − TOVA at {float(r):.0%}")
    if args.vs_full:
        print()
        for key in sorted(k for k in cells if k != ("full", "full")):
            line(key, ("full", "full"), f"{NAMES.get(key[0], key[0])} {key[1]} − full cache")


if __name__ == "__main__":
    main()
