"""PYTHONPATH=src python benchmarks/bench_planning_cold.py [--threads 2] [--specs 400] [--layers 16] [--quick]

What planning a fresh spec costs right after a kernel against back to back (issue 15's per-call overhead). For
``bench_small_rows.py``'s three batches (B=8 rows of 256 tokens, H=4, D=64, float32), ``_prepare_call`` and
``choose_backend`` on a new spec object each time, timed either back to back ("warm") or right after stock SDPA's
masked call on the batch ("after a kernel", as between the layers of a model); then, for packed documents, what each
of a few steps run before every planning does to it: nothing, the SDPA call on two threads and on one, a ``fill_`` of
a buffer larger than the core's L2 cache and of one smaller, and a 3 ms sleep. Percentages are of the SDPA call alone
(without building its mask). Medians over the specs after the first quarter.

Then what a model pays per attention call: ``attention(q, k, v, spec)`` called back to back, each call right after the
one before's kernel, timed whole and inside ``native``'s C kernel (the backend ``auto`` picks on these batches; a
call that picks another backend is reported, not counted); "outside the kernel" is the difference: validation, the
plan cache, the choice, ``native``'s plan and its Python before and after the kernel. On a fresh spec each call (the
first layer of a model's forward, the spec built before the forward as a collator does) and on one spec repeated
(the layers after the first, which find the plans on the spec), and their mean over a model of ``--layers`` layers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import attnmask.backends.native as native
from attnmask import attention
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


class _TimedKernel:
    """``native``'s library with its kernel entry timed: ``spent`` accumulates the seconds inside it."""

    def __init__(self, lib):
        self.lib, self.spent = lib, 0.0

    def __getattr__(self, name):
        return getattr(self.lib, name)

    def attnmask_segattn(self, *args):
        t0 = time.perf_counter()
        try:
            return self.lib.attnmask_segattn(*args)
        finally:
            self.spent += time.perf_counter() - t0


def outside_kernel_ms(specs, q, k, v, timed: _TimedKernel) -> tuple[float, float, int]:
    """Medians (after the first quarter) of ``attention``'s whole time and of its time outside ``native``'s kernel
    over ``specs`` called back to back, and how many calls ran no kernel (another backend picked)."""
    whole, outside, elsewhere = [], [], 0
    for spec in specs:
        timed.spent = 0.0
        t0 = time.perf_counter()
        attention(q, k, v, spec)
        t = time.perf_counter() - t0
        if timed.spent == 0.0:
            elsewhere += 1
            continue
        whole.append(t)
        outside.append(t - timed.spent)
    skip = len(whole) // 4
    return statistics.median(whole[skip:]) * 1e3, statistics.median(outside[skip:]) * 1e3, elsewhere


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--specs", type=int, default=400)
    parser.add_argument("--layers", type=int, default=16, help="layers of the model the per-call mean assumes")
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
    lib = native._library()
    if isinstance(lib, str):
        print(f"no per-call table: native's kernel is not built ({lib})")
    else:
        timed = _TimedKernel(lib)
        native._library = lambda: timed
        try:
            per_call_table(q, k, v, specs, args.layers, timed)
        finally:
            native._library = lambda: lib
    print()
    command = f"PYTHONPATH=src python benchmarks/bench_planning_cold.py --threads {args.threads} --specs {specs}"
    print(f"command: {command} --layers {args.layers}")


def per_call_table(q, k, v, specs: int, layers: int, timed: _TimedKernel) -> None:
    """The table of ``attention``'s time outside ``native``'s kernel, per batch (see the module docstring)."""
    B, _, L, _ = q.shape
    print(f"per attention call, back to back (each right after the one before's kernel); model of {layers} layers")
    print("| batch | fresh spec: whole | outside the kernel | repeated spec: whole | outside the kernel | model mean |")
    print("|---|---:|---:|---:|---:|---:|")
    seed = 10**7
    for name, make in BATCHES.items():
        dense = make(B, L, seed=10**6).to_dense(L)[:, None]
        sdpa = statistics.median(_timed(lambda d=dense: F.scaled_dot_product_attention(q, k, v, attn_mask=d), 30))
        fresh_runs, repeated_runs, elsewhere = [], [], 0
        for _ in range(2):
            seed += 10 * specs
            fresh = outside_kernel_ms([make(B, L, seed=seed + i) for i in range(specs)], q, k, v, timed)
            one = make(B, L, seed=seed - 1)
            repeated = outside_kernel_ms([one] * specs, q, k, v, timed)
            fresh_runs.append(fresh[:2])
            repeated_runs.append(repeated[:2])
            elsewhere += fresh[2] + repeated[2]
        fw, fo = (statistics.median(run[i] for run in fresh_runs) for i in (0, 1))
        rw, ro = (statistics.median(run[i] for run in repeated_runs) for i in (0, 1))
        mean = (fo + (layers - 1) * ro) / layers

        def pct(ms, sdpa=sdpa):
            return f"{ms:.3f} ms ({100 * ms / sdpa:.1f}%)"

        note = f" ({elsewhere} calls ran another backend)" if elsewhere else ""
        print(f"| {name}{note} | {fw:.2f} ms | {pct(fo)} | {rw:.2f} ms | {pct(ro)} | {pct(mean)} |")
    print("(percentages of stock SDPA's masked call on the batch, as above)")


def _timed(fn, n: int) -> list[float]:
    """``n`` timings of ``fn()`` in ms."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


if __name__ == "__main__":
    main()
