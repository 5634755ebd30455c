"""PYTHONPATH=src python benchmarks/bench_threads_busy.py [--rows 512,1024,2048,4096,8192] [--rounds 3] [--quick]

Does a parallel region still gain from every intra-op thread when another process holds one of the cores? Stock
unmasked SDPA (B=1, H=4, D=64) on rows of each length, timed with one thread and with all of ``--threads`` (default:
torch's count), idle and while another process spins on a core (``bench_limit.Spinner``), interleaved in rounds in
one process. ``2 busy / 1 busy`` above 1 means one thread on the free core beats splitting the call across the taken
core too: the measurement behind ``backends._workers.REGION_WORK``, the size from which attnmask's backends keep
every thread for a region while cores are taken.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_limit import Spinner  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="512,1024,2048,4096,8192")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="a smoke run: rows of 512 and 1,024, one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.rounds = "512,1024", 1
    many = args.threads
    print(f"torch {torch.__version__}, 1 vs {many} threads, H={args.heads}, D={args.dim}, load {os.getloadavg()}")
    print(
        f"\n| rows | multiply-adds | 1 thread idle ms | {many} threads idle ms | 1 thread busy ms "
        f"| {many} threads busy ms | {many} busy / 1 busy |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    before = torch.get_num_threads()
    try:
        for rows in (int(r) for r in args.rows.split(",")):
            q, k, v = (torch.randn(1, args.heads, rows, args.dim) for _ in range(3))
            work = args.heads * rows * rows * 2 * args.dim
            calls = max(1, min(50, int(2e10 / work)))  # ~0.4 s of calls per timing, at most 50
            F.scaled_dot_product_attention(q, k, v)
            times: dict = {}
            for _ in range(args.rounds):
                for phase in ("idle", "busy"):
                    with Spinner() if phase == "busy" else _Idle():
                        for threads in (1, many):
                            torch.set_num_threads(threads)
                            laps = []
                            for _ in range(calls):
                                t0 = time.perf_counter()
                                F.scaled_dot_product_attention(q, k, v)
                                laps.append(time.perf_counter() - t0)
                            times.setdefault((phase, threads), []).append(statistics.median(laps))
            ms = {key: statistics.median(t) * 1e3 for key, t in times.items()}
            print(
                f"| {rows:,} | {work:.1e} | {ms['idle', 1]:.1f} | {ms['idle', many]:.1f} | {ms['busy', 1]:.1f} "
                f"| {ms['busy', many]:.1f} | {ms['busy', many] / ms['busy', 1]:.2f} |",
                flush=True,
            )
    finally:
        torch.set_num_threads(before)
    print(
        f"\nload {os.getloadavg()}\nreproduce: PYTHONPATH=src python benchmarks/bench_threads_busy.py "
        f"--rows {args.rows} --rounds {args.rounds}"
    )


class _Idle:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


if __name__ == "__main__":
    main()
