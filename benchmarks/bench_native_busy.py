"""PYTHONPATH=src python benchmarks/bench_native_busy.py [--length 8192] [--only "documents: tiny,..."] [--rounds 9]
[--quick]

With one of the cores taken, does the ``native`` kernel slow more than stock SDPA on a call of the same duration, and
would it do better keeping its whole OpenMP team? For each of ``bench_limit``'s structures named by ``--only``
(forward, float32, every intra-op thread): ``native`` as it runs (under ``native._BUSY_SHARE_WORK`` multiply-adds it
takes only the free core while other processes hold cores), ``native`` with its team kept
(``_BUSY_SHARE_WORK = 0``), and stock unmasked SDPA on a square call of about native's idle time
(``bench_limit.matched_length``). Idle and busy (``bench_limit.Spinner``) phases alternate within each round, the
three calls interleaved; a timing is the mean of calls filling ``--min-ms``; slowdown = busy / idle per round, the
median over rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_limit as bl  # noqa: E402

import attnmask as am  # noqa: E402
import attnmask.backends.native as native  # noqa: E402


def native_with(spec, share_work: float):
    """A ``step``-able native call with ``native._BUSY_SHARE_WORK`` set to ``share_work`` during the call."""

    def run(q, k, v):
        own = native._BUSY_SHARE_WORK
        native._BUSY_SHARE_WORK = share_work
        try:
            return am.attention(q, k, v, spec, backend="native")
        finally:
            native._BUSY_SHARE_WORK = own

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--only", default="documents: tiny,documents: many short,sliding window 256")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--min-ms", type=float, default=100.0)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="a smoke run: rows of 2,048, 3 rounds, 20 ms timings")
    args = parser.parse_args(argv)
    if args.quick:
        args.length, args.rounds, args.min_ms = 2048, 3, 20.0
    wanted = [w for w in args.only.split(",") if w]
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} thread(s), rows of {args.length}, load {os.getloadavg()}")
    print("\n| structure | call | idle ms | busy ms | slowdown |\n|---|---|---:|---:|---:|")
    for case in bl.cases(args.length, 4 * args.length):
        if case.q_len != case.kv_len or not any(w in case.name for w in wanted):
            continue
        qkv = bl.inputs(case, args.heads, args.dim, torch.float32, False, torch.Generator().manual_seed(0))
        fns = {
            "native": native_with(case.spec, native._BUSY_SHARE_WORK),
            "native, team kept": native_with(case.spec, 0.0),
        }
        idle = bl.timed(fns["native"], qkv, False, 1)
        rows = bl.matched_length(idle, torch.float32, False, args)
        fns[f"unmasked sdpa, {rows} rows"] = bl.square_sdpa(rows, torch.float32, False, args)
        calls = {name: bl.calls_filling(args.min_ms, bl.timed(fn, qkv, False, 1)) for name, fn in fns.items()}
        times = {(phase, name): [] for phase in ("idle", "busy") for name in fns}
        names = list(fns)
        for r in range(args.rounds):
            for phase in ("idle", "busy"):
                with bl.Spinner() if phase == "busy" else nullcontext():
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        times[phase, name].append(bl.timed(fns[name], qkv, False, calls[name]))
        for name in fns:
            busy, still = times["busy", name], times["idle", name]
            slowdown = statistics.median(b / i for b, i in zip(busy, still, strict=True))
            print(
                f"| {case.name} | {name} | {statistics.median(still) * 1e3:.1f} | {statistics.median(busy) * 1e3:.1f} "
                f"| {slowdown:.2f} |",
                flush=True,
            )
    print(
        f"\nload {os.getloadavg()}\nreproduce: PYTHONPATH=src python benchmarks/bench_native_busy.py "
        f"--length {args.length} --only {args.only!r} --rounds {args.rounds}"
    )


if __name__ == "__main__":
    main()
