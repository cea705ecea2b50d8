"""Engine overhead: prefill + decode time of each policy against plain transformers, same process.

Prints, per method, seconds and the ratio to the plain transformers baseline measured in the same
run (machines here are noisy; ratios are what to compare). Usage:

    python benchmarks/engine_overhead.py --model smollm2 --length 2048 --new-tokens 32 --repeats 2
"""

from __future__ import annotations

import argparse
import time

import torch

from namm import Engine, load_model, make_policy
from namm.memory import NAMM


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--methods", default="full,streaming,h2o,snapkv,namm")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(args.model, dtype=args.dtype)
    ids = torch.randint(100, 5000 if args.model != "tiny-llama" else 250, (1, args.length))

    def plain():
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    base = best_of(plain, args.repeats)
    print(f"model {args.model}, prompt {args.length} tokens, {args.new_tokens} new tokens, best of {args.repeats}")
    print(f"{'method':<12}{'seconds':>10}{'x plain':>10}{'kept':>8}")
    print(f"{'plain HF':<12}{base:>10.2f}{1.0:>10.2f}{'100%':>8}")
    engine = Engine(model, tok)
    for name in args.methods.split(","):
        if name == "full":
            policy = make_policy("full")
        elif name == "namm":
            policy = make_policy("namm", namm=NAMM())  # zero NAMM: full eager-attention feature path
        else:
            policy = make_policy(name, keep_ratio=0.25)
        result = {}

        def run():
            result["out"] = engine.generate(ids, max_new_tokens=args.new_tokens, policy=policy)

        secs = best_of(run, args.repeats)
        kept = result["out"].report.kept_fraction
        print(f"{name:<12}{secs:>10.2f}{secs / base:>10.2f}{kept:>8.0%}")


if __name__ == "__main__":
    main()
