"""PYTHONPATH=src:. python benchmarks/bench_backends.py [--quick] [--length 16384] [--reps 2] [--threads 1]

Does "auto" pick the fastest backend? Every backend that supports a call is timed on the same inputs (H=8, D=64,
float32, forward), next to its cost estimate, for one row of ``--length`` tokens holding causal documents of 8, 32,
128, 512 or 2,048 tokens, or a causal sliding window of 256 or 2,048 keys. Prints, per scenario, the backend "auto"
picks, the fastest measured, how much slower auto's pick is than the fastest (1.00x: it picked the fastest), and per
backend its time and picoseconds per estimated unit: the estimates are only compared with one another, so a good
cost model has similar ps/unit across backends and scenarios. Dense SDPA is timed only where its estimate is within
30x of the cheapest (else "-"). ``--quick`` divides the length by 4.
"""

from __future__ import annotations

import argparse
import time

import torch

import attnmask as am

DOCS = (8, 32, 128, 512, 2048)
WINDOWS = (256, 2048)
SKIP_ABOVE = 30.0  # time a backend only when its estimate is within this factor of the cheapest


def scenarios(length: int) -> list[tuple[str, am.MaskSpec]]:
    docs = [(f"documents of {n}", am.causal() & am.document(seq_lens=[n] * (length // n))) for n in DOCS]
    return docs + [(f"sliding window {w}", am.sliding_window(w)) for w in WINDOWS]


def cpu_time(fn, reps: int) -> float:
    """Best process CPU time of ``reps`` calls after a warm-up (one thread: the steady figure on a shared machine)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def measure(title: str, spec: am.MaskSpec, length: int, reps: int, gen: torch.Generator) -> tuple:
    q, k, v = (torch.randn(1, 8, length, 64, generator=gen) for _ in range(3))
    explained = am.explain(q, k, v, spec)
    costs = {
        name: cost
        for name, cost, auto in zip(explained.backends, explained.costs, explained.auto_eligible, strict=True)
        if auto and cost is not None
    }
    cheapest = min(costs.values())
    times = {}
    for name, cost in costs.items():
        if name == "reference" or cost > SKIP_ABOVE * cheapest:
            continue
        times[name] = cpu_time(lambda n=name: am.attention(q, k, v, spec, backend=n), reps)
    picked = explained.picked
    fastest = min(times, key=times.get)
    return title, picked, fastest, times, costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="length / 4: a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    length = args.length // 4 if args.quick else args.length
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    rows = [measure(title, spec, length, args.reps, gen) for title, spec in scenarios(length)]
    names = list(dict.fromkeys(n for row in rows for n in row[4] if n != "reference"))  # registry order
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), one row of {length} tokens, H=8, D=64")
    print(
        "| scenario | auto picks | fastest | auto / fastest | " + " | ".join(f"{n}: ms (ps/unit)" for n in names) + " |"
    )
    print("|---|---|---|---|" + "---|" * len(names))
    for title, picked, fastest, times, costs in rows:
        slower = times[picked] / times[fastest] if picked in times else float("nan")
        cells = [f"{times[n] * 1e3:.0f} ({times[n] / costs[n] * 1e12:.0f})" if n in times else "-" for n in names]
        print(f"| {title} | {picked} | {fastest} | {slower:.2f}x | " + " | ".join(cells) + " |")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
