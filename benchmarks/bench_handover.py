"""PYTHONPATH=src python benchmarks/bench_handover.py [--rows 1,64,256] [--tasks 8,32,128] [--rounds 15] [--quick]

What a task dealt to a worker thread costs on this machine. ``backends._workers.parallel_map`` deals the query
groups of "blocksparse" and the document groups of "varlen" to the caller and ``threads - 1`` workers; their
estimates charge each dealt task ``_HANDOVER_COST`` estimate units on top of its work, serially: the value of this
CPU's kind (``_common.handover_cost``: 3.2e6 with AMX tiles, fitted on a Xeon's 1K limit tables, tasks 16-64 a call;
2.6e5 otherwise, this script's median on an AMD EPYC). Here ``N`` equal tasks, each one unmasked SDPA call on
``R`` queries against ``R`` keys (B=1, H=4, D=64), run one after the other in the caller with one intra-op thread
(``serial``) and through ``parallel_map`` with two threads (``dealt``), interleaved in rounds in one process, idle.
Per task: ``(dealt - serial / 2) / N``, the time dealing takes beyond a perfect split of the work (the hand-over, plus
the second thread's shortfall from a whole core: an upper bound of the hand-over), in microseconds and in estimate units
(one unit: this machine's time per unit of SDPA's one-thread estimate, ``sdpa.cost``, on the largest ``R``'s tasks,
where the work, not the call, sets the time). Compare the last column with ``_HANDOVER_COST``; rows of ``R = 1``
(one query, a few microseconds of work) are almost pure hand-over, those of large ``R`` mostly the second thread's
shortfall.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from attnmask.backends import _workers, sdpa
from attnmask.backends import blocksparse as BS


def task_units(q: torch.Tensor) -> float:
    """SDPA's one-thread estimate of one task (unmasked, ``q`` against itself), in estimate units, idle."""
    call = importlib.import_module("attnmask.attention")._prepare_call(q, q, q, None, None, None, None)
    threads, _workers.threads_available = _workers.threads_available, lambda: 1
    try:
        with _workers.load_as_read(False):
            return sdpa.cost(call)
    finally:
        _workers.threads_available = threads


def time_cell(rows: int, tasks: int, rounds: int) -> tuple[float, float, float]:
    """Median seconds of ``serial`` and ``dealt`` over ``rounds`` interleaved rounds, and one task's estimate."""
    q = torch.randn(1, 4, rows, 64)

    def one(_):
        return F.scaled_dot_product_attention(q, q, q)

    def serial():
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i in range(tasks):
                one(i)
        finally:
            torch.set_num_threads(before)

    def dealt():
        _workers.parallel_map(one, range(tasks), [1.0] * tasks)

    runs = {"serial": serial, "dealt": dealt}
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name in list(runs)[r % 2 :] + list(runs)[: r % 2]:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    return statistics.median(times["serial"]), statistics.median(times["dealt"]), task_units(q)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,64,256")
    parser.add_argument("--tasks", default="8,32,128")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="a smoke run: R = 64, 8 and 32 tasks, 3 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.tasks, args.rounds = "64", "8,32", 3
    torch.set_num_threads(2)
    why = "fewer than two threads available" if _workers.threads_available() < 2 else _workers.workers_available()
    if why is not None:
        raise SystemExit(f"needs two intra-op threads and the worker pool: {why}")
    print(f"torch {torch.__version__}, 2 threads, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"the estimates' hand-over: _HANDOVER_COST = {BS._HANDOVER_COST:.3g} units per dealt task\n")
    cells = [
        (rows, tasks, *time_cell(rows, tasks, args.rounds))
        for rows in sorted(int(r) for r in args.rows.split(","))
        for tasks in (int(n) for n in args.tasks.split(","))
    ]
    last = cells[-1]
    per_unit = last[2] / last[1] / last[4]  # seconds per estimate unit on one thread, on the largest tasks
    print(f"time per estimate unit (R = {last[0]}, one thread): {per_unit * 1e12:.1f} ps\n")
    print("| R | tasks | serial ms | dealt ms | serial / dealt | per task us | per task, units |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for rows, tasks, serial, dealt, _ in cells:
        extra = (dealt - serial / 2) / tasks
        print(
            f"| {rows} | {tasks} | {serial * 1e3:.3f} | {dealt * 1e3:.3f} | {serial / dealt:.2f} | "
            f"{extra * 1e6:.1f} | {extra / per_unit:.3g} |"
        )
    print(f"\nload {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    shown = sys.argv[1:] if argv is None else argv
    print("reproduce: PYTHONPATH=src python benchmarks/bench_handover.py " + " ".join(shown))


if __name__ == "__main__":
    main()
