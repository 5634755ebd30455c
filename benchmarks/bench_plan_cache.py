"""PYTHONPATH=src:. python benchmarks/bench_plan_cache.py [--quick] [--reps 7] [--threads 1]

What the per-spec plan cache (``attnmask.plancache``) saves per ``attention(..., backend="auto")`` call, measured in
one process on the same inputs (H=8, D=64, float32):

(a) one packed row of 16K tokens, lognormal document lengths, ``causal() & document(seq_lens=...)``;
(b) 2,000 documents of 4-12 tokens in one row, same spec form;
(c) a short padded batch, 8 rows of 256 tokens (right padding, 64-256 real), ``causal() & key_padding(mask)``.

Each scenario is timed with a cold cache (a new, equal spec object for every call: what every call paid before the
cache) and a warm one (the same spec object every call, as the layers of one forward share it), as the whole call
and as the planning alone (``choose_backend`` on a prepared call: every backend's ``unsupported`` and ``cost``, or
the cached choice). Prints best-of-``--reps`` wall and process CPU times, cold / warm ratios, the backend "auto"
picked, and the max abs difference between the cold and warm outputs (0: the same plan). ``--quick`` divides the
sizes by 4.
"""

from __future__ import annotations

import argparse
import time

import torch

import attnmask as am
from attnmask.attention import _prepare_call, choose_backend
from benchmarks.bench_attention import best_time, lognormal_lengths


def packed_row(n: int, gen: torch.Generator):
    lens = lognormal_lengths(n, gen)
    return f"(a) packed row, {n} tokens, {len(lens)} docs", 1, n, lambda: am.causal() & am.document(seq_lens=lens)


def tiny_documents(n_docs: int, gen: torch.Generator):
    lens = torch.randint(4, 13, (n_docs,), generator=gen).tolist()
    title = f"(b) {n_docs} docs of 4-12 tokens ({sum(lens)} tokens)"
    return title, 1, sum(lens), lambda: am.causal() & am.document(seq_lens=lens)


def padded_batch(rows: int, length: int, gen: torch.Generator):
    real = torch.randint(length // 4, length + 1, (rows,), generator=gen)
    mask = torch.arange(length) < real[:, None]
    return f"(c) padded batch {rows} x {length}", rows, length, lambda: am.causal() & am.key_padding(mask)


def measure(scenario, reps: int, gen: torch.Generator) -> list:
    """Rows ``(title, what, cold timing, warm timing, picked, diff)`` of one scenario."""
    title, batch, length, make_spec = scenario
    q, k, v = (torch.randn(batch, 8, length, 64, generator=gen) for _ in range(3))
    fresh = iter([make_spec() for _ in range(2 * (reps + 1))])  # built beforehand: only planning differs
    shared = make_spec()

    def plan_only(spec):
        return choose_backend(_prepare_call(q, k, v, spec, None, None, None))

    t_cold, out_cold = best_time(lambda: am.attention(q, k, v, next(fresh)), reps)
    t_warm, out_warm = best_time(lambda: am.attention(q, k, v, shared), reps)
    p_cold, picked = best_time(lambda: plan_only(next(fresh)), reps)
    p_warm, _ = best_time(lambda: plan_only(shared), reps)
    diff = (out_cold - out_warm).abs().max().item()
    return [
        (title, "attention(auto) call", t_cold, t_warm, picked.name, diff),
        (title, "planning alone", p_cold, p_warm, picked.name, None),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes / 4: a smoke run")
    parser.add_argument("--reps", type=int, default=7, help="timed calls per measurement (best is reported)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scale = 4 if args.quick else 1
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    scenarios = [packed_row(16384 // scale, gen), tiny_documents(2000 // scale, gen), padded_batch(8, 256, gen)]
    rows = [row for scenario in scenarios for row in measure(scenario, args.reps, gen)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), H=8, D=64, float32, best of {args.reps}")
    print(
        "| scenario | timed | auto picks | cold: new spec each call, wall (cpu) | warm: same spec, wall (cpu) "
        "| saved per call | cold / warm wall (cpu) | cold vs warm max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for title, what, cold, warm, picked, diff in rows:
        saved = f"{(cold[0] - warm[0]) * 1e3:.2f} ms"
        ratio = f"{cold[0] / warm[0]:.2f}x ({cold[1] / max(warm[1], 1e-9):.2f}x)"
        print(
            f"| {title} | {what} | {picked} | {_ms(cold)} | {_ms(warm)} | {saved} | {ratio} | "
            f"{'' if diff is None else f'{diff:.1e}'} |"
        )
    print(f"total {time.perf_counter() - t0:.0f} s")


def _ms(t) -> str:
    return f"{t[0] * 1e3:.3f} ms ({t[1] * 1e3:.3f})"


if __name__ == "__main__":
    main()
