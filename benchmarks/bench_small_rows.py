"""PYTHONPATH=src python benchmarks/bench_small_rows.py [--rows 8] [--length 256] [--heads 4] [--dim 64] [--reps 30]
[--threads 1] [--quick]

Per-call overhead of ``attnmask.attention`` on a batch of small rows (issue 15: under 5% of the attention call),
against stock SDPA, in one process, interleaved (a new random order each round). Three batches of ``--rows`` rows of
``--length`` tokens, fp32: packed documents (``causal() & document(...)``, 1-4 documents a row, some trailing
padding), right-padded rows (``causal() & key_padding(mask)``), and many documents (8-16 a row). On rows of at most
128 keys ``auto`` sends the first two to stock SDPA without planning the other backends (``stock``; with a backward
only where D + Dv <= 64, else the costs decide); past 128 keys, and for many documents, the costs decide where
``native`` can run the call (it runs right padding too), and every backend is planned (``costs``). Per
batch, forward and forward + backward (the pick shown per mode), medians of ``--reps`` rounds:

- ``stock``: ``F.scaled_dot_product_attention`` with the spec's dense bool mask, built in the call (a fresh spec each
  call, as transformers builds its mask each forward);
- ``auto, fresh spec``: ``attention(q, k, v, spec)`` on a new spec object each call (planning included);
- ``auto, repeated spec``: the same spec object every call (the layers of a model after the first);
- ``planning``: ``choose_backend`` alone on a fresh spec (validation, the plan cache, the choice), no attention;
- ``picked, fresh spec``: ``attention(q, k, v, spec, backend=P)`` on a new spec object each call, ``P`` the backend
  ``auto`` picks: the same run and the plans it needs itself, without costing the others.

``overhead`` = planning / stock (planning includes the plans the picked backend needs anyway, e.g. the document
segments ``native`` runs on); ``choice`` = auto fresh - picked fresh, what choosing adds to naming the backend, and
``choice / stock``; the ratios are stock / auto (> 1: attnmask faster).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from attnmask import attention, causal, document, explain, key_padding
from attnmask.attention import _prepare_call, choose_backend


def packed_spec(rows: int, length: int, seed: int = 0, docs: tuple[int, int] = (1, 4)):
    """``docs`` (least, most) documents a row, filling 60-100% of it; positions after the last are padding
    (document -1)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((rows, length), -1, dtype=torch.long)
    for r in range(rows):
        n_docs = int(torch.randint(docs[0], docs[1] + 1, (), generator=gen))
        used = int(length * (0.6 + 0.4 * torch.rand((), generator=gen)))
        cuts = sorted(torch.randperm(used - 1, generator=gen)[: n_docs - 1].add(1).tolist())
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, used], strict=True)):
            ids[r, a:b] = i
    return causal() & document(doc_ids=ids)


def many_docs_spec(rows: int, length: int, seed: int = 0):
    """8-16 documents a row (a tenth of the pairs or less): the costs decide, so every backend is planned."""
    return packed_spec(rows, length, seed, docs=(8, 16))


def padded_spec(rows: int, length: int, seed: int = 0):
    """Right padding: 40-100% of each row is real."""
    gen = torch.Generator().manual_seed(seed)
    real = (length * (0.4 + 0.6 * torch.rand(rows, generator=gen))).long().clamp(min=1)
    return causal() & key_padding((torch.arange(length)[None] < real[:, None]).long())


def median_ms(fns: dict, reps: int) -> dict:
    """Median ms of each function over ``reps`` rounds, in a new random order each round (seeded). A call right after
    another's large allocations (the stock call's dense mask) runs slower: a fixed order biased the differences, and
    so did rotating one order, which keeps each function's predecessor (``auto, fresh spec`` always ran right after
    ``stock``: 0.55 ms of its 0.59 ms over ``picked, fresh spec`` on the packed batch, 0.06 ms when the two alone
    alternate)."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names, order = list(fns), random.Random(0)
    for _ in range(reps):
        order.shuffle(names)
        for name in names:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


class _Fresh:
    """Specs handed out one by one, last first, each dropped from the list as it is handed out."""

    def __init__(self, specs: list):
        self.specs = specs

    def __next__(self):
        return self.specs.pop()


def case_fns(make_spec, q, k, v, grad: bool, reps: int, picked: str) -> dict:
    """The five timed functions of one batch (``picked``: the backend ``auto`` picks); fresh specs are made
    beforehand (their construction is not timed) and each is let go once used, as a training loop lets its batch's
    go: a spec's plans (the ``sdpa`` backend's 2 MiB additive mask on 8 rows of 256) live as long as it does, and an
    iterator over a list of them kept every one alive (800 MiB after 200 rounds), which slowed every call with a
    fresh mask 2.2-2.7x on the Xeon (stock 8.05-8.99 ms against 3.95 ms at 100 rounds)."""
    rows, length = q.shape[0], q.shape[2]
    spec = make_spec(rows, length)
    names = ("stock", "auto", "plan", "picked")
    fresh = {name: _Fresh([make_spec(rows, length) for _ in range(reps + 1)]) for name in names}
    gqa = q.shape[1] != k.shape[1]
    inputs = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]

    def finish(out):
        if grad:
            out.sum().backward()

    def stock():
        mask = next(fresh["stock"]).to_dense(length)[:, None]
        finish(F.scaled_dot_product_attention(*inputs, attn_mask=mask, enable_gqa=gqa))

    return {
        "stock": stock,
        "auto, fresh spec": lambda: finish(attention(*inputs, next(fresh["auto"]))),
        "auto, repeated spec": lambda: finish(attention(*inputs, spec)),
        "planning": lambda: choose_backend(_prepare_call(*inputs, next(fresh["plan"]), None, None, None)),
        "picked, fresh spec": lambda: finish(attention(*inputs, next(fresh["picked"]), backend=picked)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps = 5
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(args.rows, args.heads, args.length, args.dim, generator=gen) for _ in range(3))
    print(
        f"B={args.rows} rows of {args.length} tokens, H={args.heads}, D={args.dim}, fp32; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(
        "| batch | mode | auto picks | stock ms | auto fresh ms | auto repeated ms | planning ms | overhead "
        "| picked fresh ms | choice ms | choice / stock | stock / auto fresh | stock / auto repeated |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    batches = (("packed documents", packed_spec), ("padded rows", padded_spec), ("many documents", many_docs_spec))
    for name, make_spec in batches:
        for grad in (False, True):  # the pick of each mode: with a backward the stock rule ends at D + Dv <= 64
            seen = explain(*(t.detach().requires_grad_(grad) for t in (q, k, v)), make_spec(args.rows, args.length))
            picked = f"{seen.picked} ({'stock' if seen.stock else 'costs'})"
            ms = median_ms(case_fns(make_spec, q, k, v, grad, args.reps, seen.picked), args.reps)
            stock, fresh, repeated, planning, named = ms.values()
            print(
                f"| {name} | {'fwd+bwd' if grad else 'fwd'} | {picked} | {stock:.2f} | {fresh:.2f} | {repeated:.2f} | "
                f"{planning:.3f} | {planning / stock:.1%} | {named:.2f} | {fresh - named:.3f} | "
                f"{(fresh - named) / stock:.1%} | {stock / fresh:.2f}x | {stock / repeated:.2f}x |"
            )
    shown = sys.argv[1:] if argv is None else argv
    print("\ncommand: PYTHONPATH=src python benchmarks/bench_small_rows.py " + " ".join(shown))


if __name__ == "__main__":
    main()
