"""How much more work N processes get out of one GPU on a launch-bound loop, the shape of a small
model's forward pass (why ``backend = "processes"`` runs several workers on one card).

Each process runs, for ``--seconds``, a loop of 30 "layers" (a 128 x 576 by 576 x 576 bf16 matmul,
SiLU, residual add: SmolLM2-135M's width, one 128-token chunk) and one host sync per pass, and
counts passes. Run it once as it is and once under MPS (``nvidia-cuda-mps-control -d``; stop it with
``echo quit | nvidia-cuda-mps-control``): without MPS the processes' kernels take turns on the card,
with MPS they run side by side.

    python benchmarks/gpu_process_sharing.py 1 8 16
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time


def work(seconds: float, queue) -> None:
    import torch

    torch.set_num_threads(1)
    x = torch.randn(128, 576, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(576, 576, device="cuda", dtype=torch.bfloat16)
    for _ in range(20):  # warm-up
        x @ w
    torch.cuda.synchronize()
    passes, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        y = x
        for _ in range(30):
            y = torch.nn.functional.silu(y @ w) + x
        float(y[0, 0])  # a host sync per pass, as a forward pass's .item() / .tolist() calls
        passes += 1
    queue.put(passes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("procs", type=int, nargs="+", help="process counts to time, e.g. 1 8 16")
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    base = None
    for n in args.procs:
        queue = ctx.Queue()
        procs = [ctx.Process(target=work, args=(args.seconds, queue)) for _ in range(n)]
        for p in procs:
            p.start()
        total = sum(queue.get() for _ in procs) / args.seconds
        for p in procs:
            p.join()
        base = base or total
        print(f"procs {n}: {total:.0f} passes/s total ({total / base:.2f}x the first count)", flush=True)


if __name__ == "__main__":
    main()
