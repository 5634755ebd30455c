"""PYTHONPATH=src python benchmarks/bench_worker_start.py [--threads 2] [--reps 200] [--quick]

What starting attnmask's worker threads does to the rest of the process (issue 15): small torch ops in the main
thread (a 0.5 MB copy, a layer norm over 1,024 x 256, an unmasked SDPA call on 1,024 tokens in bfloat16) timed
before and after the pool's first worker starts, each the median of ``--reps`` runs of 10 calls. Each of two child
processes starts the worker its own way:

- ``warm-up on one thread``: the worker sets its intra-op thread count to 1 and then computes its warm-up exp and
  log (``_workers._init_worker``);
- ``warm-up first``: the warm-up on the caller's thread count, then the count set to 1 (the order before the fix):
  the worker starts an OpenMP team of its own, which leaves more OpenMP threads than CPUs.

``after / before`` > 1 is the slowdown every later small op of the process pays.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ORDERS = ("warm-up on one thread", "warm-up first")
_KEPT: list = []  # the pool of the order before the fix, alive while the ops are timed


def ops() -> dict:
    """The small ops timed, by name: each a function running 10 calls."""
    x = torch.randn(1, 4, 1024, 64).to(torch.bfloat16)
    out = torch.empty_like(x)
    rows = torch.randn(1024, 256)
    norm = torch.nn.LayerNorm(256)
    q, k, v = (torch.randn(1, 4, 1024, 64).to(torch.bfloat16) for _ in range(3))

    def copy():
        for _ in range(10):
            out.copy_(x)

    def layer_norm():
        with torch.no_grad():
            for _ in range(10):
                norm(rows)

    def sdpa():
        for _ in range(10):
            F.scaled_dot_product_attention(q, k, v)

    return {"copy 0.5 MB": copy, "layer norm 1024 x 256": layer_norm, "SDPA 1024 bf16": sdpa}


def median_ms(fn, reps: int) -> float:
    """The median over ``reps`` runs of ``fn``, in ms per call (``fn`` runs 10)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) / 10 * 1e3)
    return statistics.median(times)


def start_worker(order: str) -> None:
    """Start the pool's one worker thread, initialised in ``order`` (one of ``ORDERS``)."""
    from concurrent.futures import ThreadPoolExecutor

    import attnmask.backends._workers as W

    if order == ORDERS[0]:
        W._executor(1).submit(lambda: None).result()
        return

    def warm_first() -> None:
        torch.get_num_threads()
        W._warm_up()
        for setter in W._thread_count_setters():
            setter(1)

    pool = ThreadPoolExecutor(1, initializer=warm_first)  # kept, as the library keeps its pool
    pool.submit(lambda: None).result()
    _KEPT.append(pool)


def child(order: str, reps: int) -> None:
    """Print ``name<TAB>before<TAB>after`` for each op, the worker started in ``order`` between the two."""
    timed = ops()
    before = {name: median_ms(fn, reps) for name, fn in timed.items()}
    start_worker(order)
    after = {name: median_ms(fn, reps) for name, fn in timed.items()}
    for name in timed:
        print(f"{name}\t{before[name]:.4f}\t{after[name]:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="30 runs of each op")
    parser.add_argument("--child", choices=ORDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.reps = 30
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args.reps)
        return
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {args.threads} threads, load average {load}")
    print("| worker started | op | before ms | after ms | after / before |")
    print("|---|---|---:|---:|---:|")
    for order in ORDERS:
        command = [sys.executable, __file__, "--threads", str(args.threads), "--reps", str(args.reps)]
        lines = subprocess.run([*command, "--child", order], check=True, capture_output=True, text=True).stdout
        for line in lines.strip().splitlines():
            name, before, after = line.split("\t")
            ratio = float(after) / float(before)
            print(f"| {order} | {name} | {float(before):.3f} | {float(after):.3f} | {ratio:.2f}x |")
    flags = f"--threads {args.threads} --reps {args.reps}"
    print(f"\ncommand: PYTHONPATH=src python benchmarks/bench_worker_start.py {flags}")


if __name__ == "__main__":
    main()
