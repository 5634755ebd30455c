"""PYTHONPATH=src python benchmarks/bench_blocksparse_ab.py [--base main] [--threads 1] [--mode fwd,fwdbwd]
[--only window,prefix] [--reps 7] [--length 8192] [--min-ms 100] [--quick]

Is this checkout's ``"blocksparse"`` faster than another revision's? Both versions of
``src/attnmask/backends/blocksparse.py`` (the other read with ``git show REV:...`` and imported beside this one) run
the same calls in one process, in interleaved rounds (the order rotated each round; in a round each version's time is
the mean of as many consecutive calls as fill ``--min-ms``), on the structures of
``bench_limit.py`` (rows of ``--length`` tokens, H=4, D=64, fp32). Each version plans once per spec object (a
separate spec object each, so their cached plans do not mix) and is then timed in the steady state; the table gives
the median milliseconds of each, this / base, and each plan's number of query groups and covered fraction (pairs
computed over all pairs). Everything else (the layout, the workers, torch) is this checkout's.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from attnmask.backends import blocksparse
from attnmask.backends.contract import AttentionCall
from attnmask.masks import resolve_positions

sys.path.insert(0, str(Path(__file__).parent))
import bench_limit  # noqa: E402  (the structures and the timing step are bench_limit's)

PATH = "src/attnmask/backends/blocksparse.py"


def load_revision(rev: str):
    """The ``blocksparse`` module as of git revision ``rev``, imported under the name ``blocksparse_base``."""
    root = Path(__file__).resolve().parents[1]
    text = subprocess.run(["git", "show", f"{rev}:{PATH}"], cwd=root, capture_output=True, text=True, check=True)
    path = Path(tempfile.mkdtemp()) / "blocksparse_base.py"
    path.write_text(text.stdout)
    spec = importlib.util.spec_from_file_location("blocksparse_base", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["blocksparse_base"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def runner(module, spec):
    """``(q, k, v) -> module.run`` of the call at default positions under ``spec``."""

    def run(q, k, v):
        q_pos, kv_pos = resolve_positions(q.shape[2], k.shape[2], device=q.device)
        return module.run(AttentionCall(q, k, v, spec, q.shape[-1] ** -0.5, q_pos, kv_pos))

    return run


def plan_summary(module, spec, qkv, case) -> str:
    """``groups / covered`` of the module's plan for the call."""
    q, k, v = qkv
    q_pos, kv_pos = resolve_positions(case.q_len, case.kv_len, device=q.device)
    plan = module._layout_groups(AttentionCall(q, k, v, spec, q.shape[-1] ** -0.5, q_pos, kv_pos))[0]
    pairs = sum((g.q1 - g.q0) * (r.k1 - r.k0) for g in plan for r in g.runs)
    return f"{len(plan)} / {pairs / (case.batch * case.q_len * case.kv_len):.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="main")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", default="fwd", help="comma-separated: fwd, fwdbwd")
    parser.add_argument("--only", default="", help="comma-separated substrings of structure names")
    parser.add_argument("--min-ms", type=float, default=100.0, help="a timing averages calls filling this long")
    parser.add_argument("--quick", action="store_true", help="a smoke run: rows of 2,048, 3 rounds, 20 ms timings")
    args = parser.parse_args(argv)
    if args.quick:
        args.length, args.reps, args.min_ms = 2048, 3, 20.0
    torch.set_num_threads(args.threads)
    base = load_revision(args.base)
    wanted = [s for s in args.only.split(",") if s]
    this_cases, base_cases = (bench_limit.cases(args.length, 4 * args.length) for _ in range(2))  # own spec objects
    pairs = [
        (c, b) for c, b in zip(this_cases, base_cases, strict=True) if not wanted or any(w in c.name for w in wanted)
    ]
    gen = torch.Generator().manual_seed(0)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), rows of {args.length}, base {args.base}, "
        f"load {bench_limit._load()}"
    )
    for mode in args.mode.split(","):
        grad = {"fwd": False, "fwdbwd": True}[mode]
        print(
            f"\n**{'forward + backward' if grad else 'forward'}** (ms, median of {args.reps} rounds, each the mean of "
            f"calls filling {args.min_ms:g} ms; this / base: the median of the rounds' ratios)\n"
        )
        print("| structure | base ms | this ms | this / base | groups / covered, base | this |")
        print("|---|---|---|---|---|---|")
        for case, base_case in pairs:
            qkv = bench_limit.inputs(case, 4, 64, torch.float32, grad, gen)
            fns = {"base": runner(base, base_case.spec), "this": runner(blocksparse, case.spec)}
            times = {n: [] for n in fns}
            warm = {n: bench_limit.timed(fn, qkv, grad, 1) for n, fn in fns.items()}  # plans built and cached
            calls = bench_limit.calls_filling(args.min_ms, min(warm.values()))
            names = list(fns)
            for r in range(args.reps):
                for name in names[r % 2 :] + names[: r % 2]:
                    times[name].append(bench_limit.timed(fns[name], qkv, grad, calls))
            med = {n: statistics.median(t) for n, t in times.items()}
            ratio = statistics.median(t / b for t, b in zip(times["this"], times["base"], strict=True))
            plans = plan_summary(base, base_case.spec, qkv, case), plan_summary(blocksparse, case.spec, qkv, case)
            print(
                f"| {case.name} | {bench_limit.fmt_ms(med['base'])} | {bench_limit.fmt_ms(med['this'])} | {ratio:.2f} "
                f"| {plans[0]} | {plans[1]} |",
                flush=True,
            )
    print(f"\nload {bench_limit._load()}")
    print(
        "reproduce: PYTHONPATH=src python benchmarks/bench_blocksparse_ab.py "
        + shlex.join(sys.argv[1:] if argv is None else argv)
    )


if __name__ == "__main__":
    main()
