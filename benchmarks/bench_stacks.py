"""PYTHONPATH=src python benchmarks/bench_stacks.py [--length 8192] [--threads 2] [--reps 7] [--mode fwd,fwdbwd]
[--only window,chunked] [--min-ms 150] [--heads 4] [--kv-heads 4] [--quick]

What do ``"blocksparse"``'s stacked query groups gain? The same backend with ``blocksparse.STACK_GROUPS`` off (every
query group its own flash call, as before stacking) and on (consecutive groups of one shape and mask in one call on
strided views, ``blocksparse._stacks``), in one process, in interleaved rounds (the order alternated), on the
structures of ``bench_limit.py`` whose names contain one of ``--only`` (rows of ``--length`` tokens, ``--heads``
query heads and ``--kv-heads`` key / value heads, D=64, fp32). In a round each setting's time is the mean of as many
consecutive calls as fill ``--min-ms``; the ratio is the median over rounds of (off / on): above 1, stacking is
faster. Rows without a stack (a chunk of tiles of another shape, a window whose key run is split) measure the noise.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_limit  # noqa: E402

import attnmask as am  # noqa: E402
from attnmask.backends import blocksparse  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--mode", default="fwd", help="comma-separated: fwd, fwdbwd")
    parser.add_argument("--only", default="window,chunked", help="comma-separated substrings of structure names")
    parser.add_argument("--min-ms", type=float, default=150.0)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="a smoke run: rows of 2,048, 3 rounds, 20 ms timings")
    args = parser.parse_args(argv)
    if args.quick:
        args.length, args.reps, args.min_ms = 2048, 3, 20.0
    torch.set_num_threads(args.threads)
    wanted = [w for w in args.only.split(",") if w]
    gen = torch.Generator().manual_seed(0)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), rows of {args.length}, H={args.heads}, "
        f"Hkv={args.kv_heads}, load {bench_limit._load()}"
    )
    print("\n| structure | mode | group by group ms | stacked ms | group by group / stacked |")
    print("|---|---|---|---|---|")
    before = blocksparse.STACK_GROUPS
    try:
        for case in bench_limit.cases(args.length, 4 * args.length):
            if wanted and not any(w in case.name for w in wanted):
                continue
            for mode in args.mode.split(","):
                grad = {"fwd": False, "fwdbwd": True}[mode]
                q = torch.randn(case.batch, args.heads, case.q_len, 64, generator=gen)
                k, v = (torch.randn(case.batch, args.kv_heads, case.kv_len, 64, generator=gen) for _ in range(2))
                qkv = tuple(t.requires_grad_(grad) for t in (q, k, v))

                def fn(q, k, v, spec=case.spec):
                    return am.attention(q, k, v, spec, backend="blocksparse")

                def timed(stack: bool, calls: int, qkv=qkv, grad=grad, fn=fn) -> float:
                    blocksparse.STACK_GROUPS = stack
                    return bench_limit.timed(fn, qkv, grad, calls)

                warm = min(timed(True, 1), timed(False, 1))
                calls = bench_limit.calls_filling(args.min_ms, warm)
                times: dict[bool, list[float]] = {False: [], True: []}
                for r in range(args.reps):
                    for stack in (False, True) if r % 2 == 0 else (True, False):
                        times[stack].append(timed(stack, calls))
                ratio = statistics.median(a / b for a, b in zip(times[False], times[True], strict=True))
                print(
                    f"| {case.name} | {mode} | {bench_limit.fmt_ms(statistics.median(times[False]))} "
                    f"| {bench_limit.fmt_ms(statistics.median(times[True]))} | {ratio:.2f} |",
                    flush=True,
                )
    finally:
        blocksparse.STACK_GROUPS = before
    print(f"\nload {bench_limit._load()}")
    given = sys.argv[1:] if argv is None else argv
    print("reproduce: PYTHONPATH=src python benchmarks/bench_stacks.py " + shlex.join(given))


if __name__ == "__main__":
    main()
