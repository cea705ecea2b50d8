"""The attention read and the NAMM's features, one layer at a time, against the full cache's SDPA.

One SmolLM2-shaped layer (9 query heads, 3 KV heads, head dim 64 by default) reads a prompt of
``--length`` tokens in chunks of ``--chunk`` as the engine does, keeping everything. Per variant,
the summed wall time over the chunks, best of ``--repeats``, interleaved so every variant sees the
same machine, and its ratio to SDPA (what the full cache runs):

* ``sdpa``: ``F.scaled_dot_product_attention`` with the causal mask, as the full cache's layer;
* ``read``: :func:`namm.attention._eager_read`, the output plus the fp32 attention averaged per
  KV head (what every attention-reading policy runs: H2O, TOVA, SnapKV, the NAMM);
* ``read+h2o``: plus H2O's accumulation (a sum over the queries);
* ``read+namm``: plus the shipped NAMM's feature state (spectrogram, attention moments, key norms),
  ``NAMMPolicy.observe``.

The whole prefill's ratio follows from these and the model's time outside attention (``namm
bench``): (other + variant) / (other + sdpa). Usage:

    python benchmarks/attention_read.py --length 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from namm.attention import LayerHook, _eager_read, visible_mask
from namm.memory.model import NAMM, default_pretrained
from namm.policies.namm import NAMMPolicy, load_namm
from namm.policies.base import CacheSpec


def chunks(length: int, chunk: int, heads: int, kv_heads: int, dim: int, seed: int = 0):
    """(query, key, value) of each chunk: the chunk's queries against every key so far."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, kv_heads, length, dim, generator=g)
    values = torch.randn(1, kv_heads, length, dim, generator=g)
    queries = torch.randn(1, heads, length, dim, generator=g) * 2.0  # peaked softmax, as trained models
    for start in range(0, length, chunk):
        stop = min(length, start + chunk)
        yield queries[:, :, start:stop], keys[:, :, :stop], values[:, :, :stop]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--namm", default=None, help="NAMM folder or shipped name (default: the shipped smollm2 NAMM)")
    ap.add_argument("--variants", default="sdpa,read,read+h2o,read+namm")
    args = ap.parse_args()
    groups = args.heads // args.kv_heads
    scaling = args.dim**-0.5
    data = list(chunks(args.length, args.chunk, args.heads, args.kv_heads, args.dim))
    source = args.namm or default_pretrained("smollm2")
    namm = load_namm(source) if source else NAMM()
    spec = CacheSpec(num_layers=1, kv_heads=args.kv_heads, head_dim=args.dim, managed_layers=(0,))

    def sdpa() -> None:
        for q, k, v in data:
            mask = visible_mask(q.shape[2], k.shape[2], None, q.device)
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)

    def reader(observe):
        hook = LayerHook(managed=frozenset({0}), observe=observe, need_attn=True)

        def run() -> None:
            for q, k, v in data:
                _, attn = _eager_read(q, k, v, scaling, None, groups, None, hook)
                observe(attn, k[0])
        return run

    def h2o_state():
        acc = {}

        def observe(attn, keys) -> None:
            old = acc.get("sum")
            new = attn.sum(dim=1)
            if old is not None:
                new[:, : old.shape[1]] += old
            acc["sum"] = new
        return observe

    def namm_state():
        policy = NAMMPolicy(namm, keep_ratio=1.0)
        policy.reset(spec)
        positions = torch.arange(args.length).expand(args.kv_heads, -1)

        def observe(attn, keys) -> None:
            policy.observe(0, attn, keys, positions[:, : keys.shape[1]])
        return observe

    def make(variant: str):
        if variant == "sdpa":
            return sdpa
        if variant == "read":
            return reader(lambda attn, keys: None)
        if variant == "read+h2o":
            state = {}

            def run() -> None:
                state["observe"] = h2o_state()
                reader(state["observe"])()
            return run
        if variant == "read+namm":
            def run() -> None:
                reader(namm_state())()
            return run
        raise SystemExit(f"unknown variant {variant!r}; known: sdpa, read, read+h2o, read+namm")

    variants = args.variants.split(",")
    runs = {v: make(v) for v in variants}
    times = {v: [] for v in variants}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for v in variants:  # interleaved: every variant sees the same machine
                t0 = time.perf_counter()
                runs[v]()
                times[v].append(time.perf_counter() - t0)
    base = min(times[variants[0]])
    print(f"one layer, {args.heads} query heads / {args.kv_heads} KV heads, dim {args.dim}, {args.length} tokens in "
          f"chunks of {args.chunk}, {torch.get_num_threads()} threads, best of {args.repeats}; NAMM: {source or 'zero'}")
    print(f"{'variant':<12}{'seconds':>10}{'x ' + variants[0]:>10}{'+ s':>10}")
    for v in variants:
        t = min(times[v])
        print(f"{v:<12}{t:>10.3f}{t / base:>10.2f}{t - base:>10.3f}")


if __name__ == "__main__":
    main()
