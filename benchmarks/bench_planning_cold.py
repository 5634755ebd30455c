"""PYTHONPATH=src python benchmarks/bench_planning_cold.py [--threads 2] [--specs 400] [--quick]

What planning a fresh spec costs right after a kernel against back to back (issue 15's per-call overhead). For
``bench_small_rows.py``'s three batches (B=8 rows of 256 tokens, H=4, D=64, float32), ``_prepare_call`` and
``choose_backend`` on a new spec object each time, timed either back to back ("warm") or right after stock SDPA's
masked call on the batch ("after a kernel", as between the layers of a model); then, for packed documents, what each
of a few steps run before every planning does to it: nothing, the SDPA call on two threads and on one, a ``fill_`` of
a buffer larger than the core's L2 cache and of one smaller, and a 3 ms sleep. Percentages are of the SDPA call alone
(without building its mask). Medians over the specs after the first quarter.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from attnmask.attention import _prepare_call, choose_backend

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_small_rows import many_docs_spec, packed_spec, padded_spec  # noqa: E402

BATCHES = {"packed documents": packed_spec, "padded rows": padded_spec, "many documents": many_docs_spec}


def planning_ms(make, before, q, k, v, specs: int, seed: int) -> float:
    """The median time of planning ``specs`` fresh specs from ``make``, each right after ``before()``."""
    B, _, L, _ = q.shape
    fresh = [make(B, L, seed=seed + i) for i in range(specs)]
    times = []
    for spec in fresh:
        before()
        t0 = time.perf_counter()
        choose_backend(_prepare_call(q, k, v, spec, None, None, None))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[specs // 4 :]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--specs", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="100 specs a run")
    args = parser.parse_args()
    specs = 100 if args.quick else args.specs
    torch.set_num_threads(args.threads)
    B, L, H, D = 8, 256, 4, 64
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
    print(
        f"B={B} rows of {L} tokens, H={H}, D={D}, float32; torch {torch.__version__}, {args.threads} threads; "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print("| batch | planning warm | after a kernel | SDPA's call |")
    print("|---|---:|---:|---:|")
    seed = 0
    for name, make in BATCHES.items():
        dense = make(B, L, seed=10**6).to_dense(L)[:, None]

        def kernel(dense=dense):
            F.scaled_dot_product_attention(q, k, v, attn_mask=dense)

        planning_ms(make, kernel, q, k, v, specs // 4, seed)  # warm-up
        warm, cold, sdpa = [], [], []
        for _ in range(2):
            seed += 10 * specs
            warm.append(planning_ms(make, lambda: None, q, k, v, specs, seed))
            seed += 10 * specs
            cold.append(planning_ms(make, kernel, q, k, v, specs, seed))
            t = []
            for _ in range(30):
                t0 = time.perf_counter()
                kernel()
                t.append(time.perf_counter() - t0)
            sdpa.append(statistics.median(t) * 1e3)
        w, c, s = statistics.median(warm), statistics.median(cold), statistics.median(sdpa)
        print(f"| {name} | {w:.3f} ms ({100 * w / s:.1f}%) | {c:.3f} ms ({100 * c / s:.1f}%) | {s:.2f} ms |")

    big = torch.empty(8 << 20, dtype=torch.uint8)
    small = torch.empty(256 << 10, dtype=torch.uint8)
    dense = packed_spec(B, L, seed=10**6).to_dense(L)[:, None]

    def one_thread_kernel():
        torch.set_num_threads(1)
        F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        torch.set_num_threads(args.threads)

    steps = {
        "nothing": lambda: None,
        f"stock SDPA, {args.threads} threads": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
        "stock SDPA, one thread": one_thread_kernel,
        "`fill_` of an 8 MiB buffer": lambda: big.fill_(1),
        "`fill_` of a 256 KiB buffer": lambda: small.fill_(1),
        "`time.sleep(0.003)`": lambda: time.sleep(0.003),
    }
    print()
    print("packed documents: planning right after each step (two runs)")
    print("| before each planning | planning |")
    print("|---|---:|")
    runs = {name: [] for name in steps}
    for _ in range(2):
        for name, step in steps.items():
            seed += 10 * specs
            runs[name].append(planning_ms(packed_spec, step, q, k, v, specs, seed))
    for name, ms in runs.items():
        print(f"| {name} | {min(ms):.3f}-{max(ms):.3f} ms |")
    print()
    print(f"command: PYTHONPATH=src python benchmarks/bench_planning_cold.py --threads {args.threads} --specs {specs}")


if __name__ == "__main__":
    main()
