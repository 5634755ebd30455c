"""PYTHONPATH=src python benchmarks/bench_tiles.py [--length 8192] [--only "causal,sliding window"] [--rounds 5]
[--threads 2] [--quick]

What the AMX tiles give ``native``'s bfloat16 (issue 15): for each of ``bench_limit``'s structures whose names hold a
part of ``--only`` (default: every one ``native`` runs on rows of queries and keys alike, but tiny documents, which stay
on its row form; rows of ``--length``, H=4, D=64), ``native`` with its forward and backward on the tiles against the
same backend on its float32 arithmetic (``native.amx_ready`` answered False: float32 copies, or bfloat16 widened as it
is loaded), forward and forward + backward, and stock unmasked bfloat16 SDPA on the same q, k, v as the peer: the
issue's pair-proportional ideal is its time times the structure's share of allowed pairs. The three calls are
interleaved in each round (a new order each round); a timing is the mean of calls filling ``--min-ms``; the medians over
rounds are printed with the tiles' speed-up and their time over the ideal. Exits 77 (skipped) on a CPU or build without
the tiles.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_limit as bl  # noqa: E402

import attnmask as am  # noqa: E402
import attnmask.backends.native as native  # noqa: E402

SKIP = 77  # attnmask bench: "skipped (does not apply here)"


def native_on(spec, tiles: bool):
    """A ``bench_limit.step``-able ``native`` call, on the tiles or (``tiles`` False) on the float32 arithmetic."""

    def run(q, k, v):
        ready = native.amx_ready
        if not tiles:
            native.amx_ready = lambda: False
        try:
            return am.attention(q, k, v, spec, backend="native")
        finally:
            native.amx_ready = ready

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--only", default="", help="comma-separated parts of structure names (default: all)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-ms", type=float, default=100.0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: rows of 1,024, 2 rounds, 20 ms timings")
    args = parser.parse_args(argv)
    if args.quick:
        args.length, args.rounds, args.min_ms = 1024, 2, 20.0
    if not native.amx_ready():
        print("no AMX-BF16 tiles here (CPU, kernel build or ATTNMASK_NATIVE_AMX=0): nothing to compare")
        return SKIP
    torch.set_num_threads(args.threads)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), bfloat16, rows of {args.length}, H=4, D=64, load {load}"
    )
    print(
        "\n| structure | mode | allowed | float32 arithmetic ms | tiles ms | speed-up | unmasked SDPA ms "
        "| tiles / ideal |\n|---|---|---:|---:|---:|---:|---:|---:|"
    )
    wanted = [w for w in args.only.split(",") if w]
    for case in bl.cases(args.length, 4 * args.length):
        if case.spec is None or case.q_len != case.kv_len or "tiny" in case.name or "prefix" in case.name:
            continue  # native does not run prefix-LM; tiny documents stay on its row form
        if wanted and not any(w in case.name for w in wanted):
            continue
        share = bl.allowed_fraction(case)
        for grad in (False, True):
            qkv = bl.inputs(case, 4, 64, torch.bfloat16, grad, torch.Generator().manual_seed(0))
            fns = {"f32": native_on(case.spec, False), "tiles": native_on(case.spec, True)}
            fns["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
            calls = {name: bl.calls_filling(args.min_ms, bl.timed(fn, qkv, grad, 1)) for name, fn in fns.items()}
            times = {name: [] for name in fns}
            for r in range(args.rounds):
                order = list(fns)[r % 3 :] + list(fns)[: r % 3]
                for name in order:
                    times[name].append(bl.timed(fns[name], qkv, grad, calls[name]))
            ms = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
            mode = "forward + backward" if grad else "forward"
            print(
                f"| {case.name} | {mode} | {share:.3f} | {ms['f32']:.1f} | {ms['tiles']:.1f} | "
                f"{ms['f32'] / ms['tiles']:.2f}x | {ms['sdpa']:.1f} | {ms['tiles'] / (ms['sdpa'] * share):.2f} |"
            )
    print(f"\nload {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"reproduce: PYTHONPATH=src python benchmarks/bench_tiles.py {' '.join(argv or sys.argv[1:])}".rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
