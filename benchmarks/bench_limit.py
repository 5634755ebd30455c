"""PYTHONPATH=src python benchmarks/bench_limit.py [--quick | --dry-run] [--mode fwd,fwdbwd] [--dtype float32,bfloat16]
[--threads 1] [--busy] [--serial] [--reps 3] [--only causal,window]

How close does attention come to the pair-proportional limit on each mask structure, and does ``"auto"`` pick the
fastest backend? The pair-proportional ideal is unmasked SDPA's time on the same shapes times the fraction of allowed
(query, key) pairs, measured in the same process. For each structure it prints the allowed fraction, the ideal, the
time of every backend ``attnmask.explain`` says supports the call and ``"auto"`` may pick on this device (``reference``
aside: the dense O(B·H·Q·K) definition), ``auto``'s pick (from ``explain``), auto / ideal, auto / best, and the
issue's bound for that row (runs of allowed keys >= 512: forward 1.25x, forward + backward 1.5x; shorter runs: 2x).

Sizes (default): rows of 8,192 tokens, B=1 (B=2 for the padded rows), H=4, D=64; decode: Q of 1, 8, 16 against 32,768
keys. ``--quick``: rows of 1,024 and 4,096 keys (under a minute); ``--dry-run``: rows of 256, one round (a smoke test).

Timing: wall clock, median of ``--reps`` interleaved rounds (each round times every backend in a rotated order) after
one warm-up call each; in a round a backend's time is the mean of as many consecutive calls as fill ``--min-ms``
(default 100 ms, from the warm-up's time; at most 64 calls): a single call of a few milliseconds under a taken core is
mostly the scheduler's time slice. Plans are cached per spec object, as across the layers of a model sharing one
spec, so the times are of the steady state. ``auto``'s time is its pick's time. ``--busy``: in every round the
backends are timed once idle and once while another process spins on a core (started before, killed after each busy
phase; it also ends itself after 15 minutes): the table then shows each backend's slowdown (the median over rounds of
busy / idle in the round) next to stock unmasked SDPA's, and flags ("slows more than sdpa") every backend whose
slowdown over unmasked SDPA's *in the same round* has a median above 1.1: a paired statistic, since the same SDPA
call's own slowdown moved 0.76-2.12 between the rows of one table (other processes' load changes between rounds,
weighing on every backend of the round alike). A short call slows more under a taken core than a long one (the
other process holds the core for a time slice of milliseconds; on this machine unmasked SDPA's 12 ms decode call
slowed 1.77x where its 550 ms call slowed 1.48x), so a second flag compares each backend with stock unmasked SDPA
on a square call of about its own duration (``matched_length``: rows of 128 to 32,768 tokens, a factor of sqrt(2)
apart, the idle time nearest the backend's), timed in the same rounds.
``--serial``: also time "varlen" and "blocksparse" with their tasks run one by one in the caller (columns
"... 1-by-1"), each call split across all intra-op threads as before the coarse-grained workers (``backends._workers``).

The floor (columns "covered", "floor ms", "floor / ideal", "auto / floor"): ``blocksparse`` computes a call as dense
blocks, a query group's rows against each run of key tiles it reads (FULL and PARTIAL tiles, ``blocksparse.cover``).
"covered" is the pairs inside those blocks over all pairs (next to "allowed"); "floor ms" is a real timed call in
the same interleaved rounds: stock unmasked SDPA on every block, one call each on views of q, k, v, no mask built or
applied, no log-sum-exp merging (forward + backward: each block's own backward, its gradients not scattered back).
It is what the stock kernel itself pays for the pairs in that shape (short key runs, the diagonal, the wasted pairs of
PARTIAL tiles), so auto / ideal splits into floor / ideal (the kernel and the tiling) times auto / floor (attnmask's
own overhead: masks of PARTIAL tiles, Python, merges; below 1 where the pick is not blocksparse and beats the cover).

The traffic (columns "traffic / ideal", "auto / traffic"): the time to move the bytes any implementation of the call
moves, once each and nothing else (``traffic_fn``: q, k, v read and the output written; with a backward also the
output and its gradient read and dq, dk, dv written), timed in the same rounds. Where it alone passes the bound
(traffic / ideal above it: rows whose pairs are a thousandth of the row while its tensors are all of it), no
implementation can meet the bound; such a row is held to the bound over the traffic instead ("ok": "yes (traffic)" or
"no (traffic)"), still within 1.1x of the fastest backend.

ps/unit columns (``--units``): measured picoseconds per unit of each backend's cost estimate; a calibrated cost model
has the same ps/unit across backends and rows (``auto`` compares estimates, so only their ratios matter).

``--fit OUTPUT...`` (no timing): re-evaluates auto's picks offline on saved outputs of this script, each at its own
thread count (``at_threads`` patches ``backends._workers.threads_available``), fits the thread efficiency of each
kind of parallel work (``KINDS``; and the worker tasks' hand-over cost) from the 1- and T-thread tables of the same
rows, and prints refits of the other constants. ``--held-out OUTPUT``: the thread constants fitted without that
table, judged on it. ``--grid BACKEND.CONSTANT=V1,V2... [...]``: how many rows ``auto`` puts within 1.1x of the
fastest at every combination of those values, each table replayed on its own CPU kind (``as_measured_on``) with the
values on top, totals per kind (how the per-kind constants of ``kind_constants`` were chosen).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import itertools
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import attnmask as am
from attnmask import tuning
from attnmask.backends import REGISTRY, _common, blocksparse
from attnmask.backends import _workers as workers
from attnmask.backends._common import ModeFactors, cpu_has_amx_bf16, cpu_has_avx512_bf16
from attnmask.backends.contract import AttentionCall

# The constants of each backend's CPU cost estimate that ``--fit`` refits (module attributes of
# ``attnmask.backends.<name>``; every estimate is linear in them). "sdpa"'s estimate (pairs times D + Dv) is the unit.
FITTED = {
    "sdpa": ("_MASK_COST", "_CALL_COST"),
    "varlen": (
        "_PAIR_COST",
        "_MASKED_PAIR_COST",
        "CALL_COST",
        "COPY_COST",
        "SMALL_MATMUL_COST",
        "_SDPA_ROW_COST",
        "_SMALL_ROW_COST",
    ),
    "blocksparse": ("_PAIR_COST", "_MASK_COST", "_GROUP_COST", "_CALL_COST"),
    "banded": ("_PAIR_COST", "_TILE_COST", "_HEAD_COST", "_MASK_COST", "COPY_COST"),
    "native": ("_PAIR_COST", "_LONG_PAIR_COST", "_ROW_COST", "_CALL_COST", "COPY_COST"),
}
TASKED = ("varlen", "blocksparse")  # the backends whose calls run as coarse-grained tasks (backends._workers)
SERIAL = " 1-by-1"  # column suffix (--serial): the same backend with its tasks run one by one in the caller
AUTO = "(auto)"  # --busy: auto itself, timed beside the backends it chooses from
REFERENCE = "(unmasked sdpa)"  # stock SDPA without a mask: the ideal's base, and the busy slowdowns' reference
FLOOR = "(floor)"  # unmasked SDPA on blocksparse's dense blocks (cover_blocks), timed with the backends
TRAFFIC = "(traffic)"  # the bytes any implementation moves (traffic_fn), timed with the backends
MATCHED = "(sdpa {})"  # --busy: stock unmasked SDPA on B=1 rows of that many tokens, a call of about a backend's time
MAX_CALLS = 64  # calls a timing averages at most (--min-ms)
# The spinner's loop, which also ends when the process that started it does (its parent changes): an interrupted run
# had left one spinning for its whole 15 minutes, under every timing made after it.
SPIN = (
    "import os, time\nparent, end = {parent}, time.time() + {seconds}\n"
    "while time.time() < end and os.getppid() == parent:\n    for _ in range(100000):\n        pass\n"
)


@dataclass(frozen=True)
class Case:
    """One row of the table: a mask on ``B`` rows of ``q_len`` queries and ``kv_len`` keys; ``run`` is the length of
    the shortest run of allowed keys the structure is about (document, window, chunk), which sets the bound."""

    name: str
    spec: am.MaskSpec | None
    batch: int
    q_len: int
    kv_len: int
    run: int


def _lengths(total: int, low: int, high: int, gen: torch.Generator) -> list[int]:
    """Random document lengths in ``[low, high]`` summing to ``total`` (the last one cut to fit)."""
    lens, left = [], total
    while left > 0:
        n = min(left, int(torch.randint(low, high + 1, (1,), generator=gen)))
        lens.append(n)
        left -= n
    return lens


def cases(length: int, decode_keys: int, seed: int = 0) -> list[Case]:
    """The structures of issue 15 on rows of ``length`` tokens (decode against ``decode_keys`` keys)."""
    gen = torch.Generator().manual_seed(seed)
    L = length
    real = torch.ones(2, L, dtype=torch.bool)
    left, right = real.clone(), real.clone()
    left[1, : L // 2] = False  # row 1 holds L/2 real tokens, padded on the left ...
    right[1, L // 2 :] = False  # ... or on the right
    few = [L // 2, L // 4, L // 8, L - L // 2 - L // 4 - L // 8]
    short = _lengths(L, max(L // 40, 8), max(L // 14, 16), gen)  # ~400 tokens at L = 8192
    tiny = _lengths(L, 8, 32, gen)
    mixed_docs = _lengths(L, L // 6, L // 3, gen)  # ~2,000 tokens at L = 8192
    w = [max(L // 32, 4), max(L // 16, 6), max(L // 8, 8), max(L // 2, 16)]  # 256, 512, 1024, 4096 at L = 8192
    chunk, prefix = max(L // 8, 8), L // 4
    rows = [
        Case("causal", am.causal(), 1, L, L, L),
        Case("causal + left padding", am.causal() & am.key_padding(left), 2, L, L, L // 2),
        Case("causal + right padding", am.causal() & am.key_padding(right), 2, L, L, L // 2),
        Case(f"documents: few long ({min(few)}+)", am.causal() & am.document(seq_lens=few), 1, L, L, min(few)),
        Case(
            f"documents: many short (~{L // len(short)})",
            am.causal() & am.document(seq_lens=short),
            1,
            L,
            L,
            min(short),
        ),
        Case("documents: tiny (8-32)", am.causal() & am.document(seq_lens=tiny), 1, L, L, 8),
        *(Case(f"sliding window {n}", am.sliding_window(n), 1, L, L, n) for n in w),
        Case(f"causal chunked {chunk}", am.causal() & am.chunked(chunk), 1, L, L, chunk),
        Case(f"prefix-LM {prefix}", am.prefix_lm(prefix), 1, L, L, prefix),
        Case(
            f"window {w[2]} + documents (~{L // len(mixed_docs)})",
            am.sliding_window(w[2]) & am.document(seq_lens=mixed_docs),
            1,
            L,
            L,
            w[2],
        ),
    ]
    rows += [Case(f"decode Q={n}, K={decode_keys}", am.causal(), 1, n, decode_keys, decode_keys) for n in (1, 8, 16)]
    return rows


def allowed_fraction(case: Case) -> float:
    """Fraction of the ``B·Q·K`` (query, key) pairs the mask allows (dense evaluation, 64 query rows at a time)."""
    if case.spec is None:
        return 1.0
    allowed = 0
    q_pos = torch.arange(case.kv_len - case.q_len, case.kv_len)
    kv_pos = torch.arange(case.kv_len)
    for start in range(0, case.q_len, 512):
        dense = case.spec.to_dense(
            min(512, case.q_len - start), case.kv_len, q_positions=q_pos[start : start + 512], kv_positions=kv_pos
        )
        allowed += int(dense.sum()) * (case.batch if dense.shape[0] == 1 else 1)
    return allowed / (case.batch * case.q_len * case.kv_len)


def inputs(case: Case, heads: int, dim: int, dtype: torch.dtype, grad: bool, gen: torch.Generator):
    q = torch.randn(case.batch, heads, case.q_len, dim, generator=gen).to(dtype)
    k, v = (torch.randn(case.batch, heads, case.kv_len, dim, generator=gen).to(dtype) for _ in range(2))
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def serially(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with the coarse-grained workers switched off (every task in the caller)."""
    workers.ENABLED = False
    try:
        return fn(*args, **kwargs)
    finally:
        workers.ENABLED = True


def step(fn, qkv, grad: bool):
    """One call of ``fn(q, k, v)``, with its backward when ``grad`` (gradients reset, so nothing accumulates); a
    ``fn`` that returns None ran its own backward."""
    if not grad:
        with torch.no_grad():
            fn(*qkv)
        return
    for t in qkv:
        t.grad = None
    out = fn(*qkv)
    if out is not None:
        out.backward(torch.ones_like(out))


def timed(fn, qkv, grad: bool, calls: int) -> float:
    """Seconds per call of ``step(fn, qkv, grad)``: the mean of ``calls`` consecutive calls."""
    t0 = time.perf_counter()
    for _ in range(calls):
        step(fn, qkv, grad)
    return (time.perf_counter() - t0) / calls


def calls_filling(min_ms: float, seconds: float) -> int:
    """How many calls of ``seconds`` each a timing averages to fill ``min_ms`` (1 to ``MAX_CALLS``)."""
    return max(1, min(MAX_CALLS, math.ceil(min_ms / 1e3 / max(seconds, 1e-6))))


def paired_slowdown(times: dict, name: str, ref: str) -> float:
    """The median over rounds of ``name``'s slowdown (busy / idle in the round) over ``ref``'s in the same round."""
    rounds = zip(times["busy", name], times["idle", name], times["busy", ref], times["idle", ref], strict=True)
    return statistics.median(b / i / (rb / ri) for b, i, rb, ri in rounds)


def square_sdpa(length: int, dtype: torch.dtype, grad: bool, args):
    """A ``step``-able call of stock unmasked SDPA on its own ``(1, H, length, D)`` q, k, v (the arguments it is
    given are ignored; with grad it runs its own backward and returns None)."""
    gen = torch.Generator().manual_seed(length)
    own = [torch.randn(1, args.heads, length, args.dim, generator=gen).to(dtype) for _ in range(3)]

    def run(*_):
        if not (torch.is_grad_enabled() and grad):
            return F.scaled_dot_product_attention(*own)
        parts = [t.detach().requires_grad_(True) for t in own]
        out = F.scaled_dot_product_attention(*parts)
        out.backward(torch.ones_like(out))
        return None

    return run


_LADDER: dict[tuple, float] = {}  # (dtype, grad, heads, dim, length) -> idle seconds of square_sdpa


def matched_length(seconds: float, dtype: torch.dtype, grad: bool, args) -> int:
    """The rows (128 to 32,768 tokens, a factor of sqrt(2) apart) on which stock unmasked SDPA's call takes the time
    nearest ``seconds`` (in ratio); each rung timed once per process (the best of 3 calls) and kept."""
    best, best_gap = 128, math.inf
    for i in range(19):
        length = int(round(128 * 2 ** (i / 2) / 16)) * 16
        key = (dtype, grad, args.heads, args.dim, length)
        if key not in _LADDER:
            fn = square_sdpa(length, dtype, grad, args)
            step(fn, (), grad)
            _LADDER[key] = min(timed(fn, (), grad, 1) for _ in range(3))
        gap = abs(math.log(_LADDER[key] / max(seconds, 1e-9)))
        if gap < best_gap:
            best, best_gap = length, gap
        if _LADDER[key] > seconds:
            break
    return best


def cover_blocks(case: Case, qkv) -> tuple[tuple[int, int, int, int, int], ...] | None:
    """``blocksparse``'s dense blocks ``(b, q0, q1, k0, k1)`` for the case (``blocksparse.cover``), None when it has no
    layout (no spec, or a call it refuses)."""
    q, k, v = qkv
    spec = am.full() if case.spec is None else case.spec
    q_pos, kv_pos = am.masks.resolve_positions(case.q_len, case.kv_len, device=q.device)
    call = AttentionCall(q, k, v, spec, q.shape[-1] ** -0.5, q_pos, kv_pos)
    if blocksparse.BACKEND.not_supported_reasons(call):
        return None
    return blocksparse.cover(call)


def covered_fraction(blocks, case: Case) -> float:
    """Pairs inside the blocks over all ``B·Q·K`` pairs (the blocks of one batch row do not overlap)."""
    return sum((q1 - q0) * (k1 - k0) for _, q0, q1, k0, k1 in blocks) / (case.batch * case.q_len * case.kv_len)


def floor_fn(blocks, qkv):
    """The floor: stock unmasked SDPA on the blocks, one call per distinct block shape ``(rows, keys)``, the blocks of
    a shape stacked along the batch. The stacks are copied from q, k, v here, once, outside the timed call (layout
    work, not the kernel's); the call builds and applies no mask and merges nothing. With grad enabled each stack's
    output is differentiated on its own (gradients of the stacks, not scattered back into q, k, v)."""
    shapes: dict[tuple[int, int], list] = {}
    for b, q0, q1, k0, k1 in blocks:
        shapes.setdefault((q1 - q0, k1 - k0), []).append((b, q0, q1, k0, k1))
    q, k, v = (t.detach() for t in qkv)
    stacks = [
        (
            torch.stack([q[b, :, q0:q1] for b, q0, q1, _, _ in same]),
            torch.stack([k[b, :, k0:k1] for b, _, _, k0, k1 in same]),
            torch.stack([v[b, :, k0:k1] for b, _, _, k0, k1 in same]),
        )
        for same in shapes.values()
    ]

    def run(q, k, v):
        grad = torch.is_grad_enabled() and q.requires_grad
        for parts in stacks:
            out = F.scaled_dot_product_attention(*(t.requires_grad_(grad) for t in parts))
            if grad:
                for t in parts:
                    t.grad = None
                out.backward(torch.ones_like(out))
        return None

    return run


def traffic_fn(qkv, grad: bool):
    """A ``step``-able call that moves the bytes any attention of these inputs moves, once each and nothing else:
    reads q, k and v and writes an output of ``(B, H, Q, Dv)``; with ``grad`` also reads the output and its gradient
    and writes dq, dk and dv (the log-sum-exp's few bytes left out). Reads are sums, writes fills, both on torch's
    intra-op threads over buffers made here, outside the timed call. A bound below this time is one no implementation
    meets: the time to stream the call's data, not its pairs, sets it (tiny documents: the pairs of 8-32-token
    documents are a thousandth of the row's, their tensors all of it)."""
    q, k, v = (t.detach() for t in qkv)
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    reads = [q, k, v] + ([torch.ones_like(out), torch.ones_like(out)] if grad else [])
    writes = [out] + ([torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)] if grad else [])

    def run(*_):
        with torch.no_grad():
            for t in reads:
                t.sum()
            for t in writes:
                t.fill_(1.0)

    return run


class Spinner:
    """Another process spinning on one core while in the ``with`` block (ended on exit, when this process ends, and by
    itself in 15 min)."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=900, parent=os.getpid())])
        time.sleep(0.3)  # let it take a core
        settle_load()
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()
        time.sleep(0.3)  # the idle phase starts once the backends' thread budget has seen the core free again
        settle_load()


def settle_load() -> None:
    """Two readings of the load ``SAMPLE_SECONDS`` and a half apart (``_workers.free_cores``), so that the backends'
    thread budget is decided from the new phase's load alone before its first timed call. Without them the first
    reading of a phase spanned back into the phase before (or was only a baseline, the last one being over a second
    old), and the first calls timed in a busy phase ran on both cores: a window of 512 on a row of 8,192 under `sdpa`
    took 215 ms, then 141, then 113 ms a call from the third on (RESULTS.md, issue 15, "A split's calls on the free
    cores"). The phases are meant to time the steady state of a load that stays."""
    workers.free_cores()
    time.sleep(1.5 * workers.SAMPLE_SECONDS)
    workers.free_cores()


def measure(case: Case, args, dtype: torch.dtype, grad: bool, gen: torch.Generator) -> dict:
    """Times of the stock unmasked SDPA and every backend auto may pick (idle, and busy with ``--busy``)."""
    qkv = inputs(case, args.heads, args.dim, dtype, grad, gen)
    explained = am.explain(*qkv, case.spec)
    costs = {
        n: c
        for n, c, ok in zip(explained.backends, explained.costs, explained.auto_eligible, strict=True)
        if ok and c is not None and c != float("inf") and n != "reference"
    }
    fns = {REFERENCE: lambda q, k, v: F.scaled_dot_product_attention(q, k, v)}
    blocks = cover_blocks(case, qkv)
    if blocks is not None:
        fns[FLOOR] = floor_fn(blocks, qkv)
    fns[TRAFFIC] = traffic_fn(qkv, grad)
    for name in costs:
        fns[name] = lambda q, k, v, n=name: am.attention(q, k, v, case.spec, backend=n)
    if args.busy:  # auto itself: while a core is taken it may choose another backend than idle
        fns[AUTO] = lambda q, k, v: am.attention(q, k, v, case.spec)
    if args.serial:  # the same backends with their tasks run one by one in the caller (as before issue 15's fix)
        for name in [n for n in costs if n in TASKED]:
            fns[name + SERIAL] = lambda q, k, v, n=name: serially(am.attention, q, k, v, case.spec, backend=n)
    phases = ("idle", "busy") if args.busy else ("idle",)
    warm = {name: timed(fn, qkv, grad, 1) for name, fn in fns.items()}  # plans built and cached, kernel compiled
    matched = {}  # --busy: backend -> the rows of its duration-matched unmasked SDPA call
    if args.busy:
        for name in costs:
            matched[name] = matched_length(warm[name], dtype, grad, args)
        for length in set(matched.values()):
            fns[MATCHED.format(length)] = square_sdpa(length, dtype, grad, args)
            warm[MATCHED.format(length)] = timed(fns[MATCHED.format(length)], qkv, grad, 1)
    calls = {name: calls_filling(args.min_ms, t) for name, t in warm.items()}
    times = {(p, n): [] for p in phases for n in fns}
    names, busy_picks = list(fns), []
    for r in range(args.reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for phase in phases:
            spinner = Spinner() if phase == "busy" else None
            try:
                if spinner:
                    spinner.__enter__()
                for name in order:
                    times[phase, name].append(timed(fns[name], qkv, grad, calls[name]))
                if spinner:  # what auto chose while the core was taken (the load is read at most every 0.1 s)
                    busy_picks.append(am.explain(*qkv, case.spec).picked)
            finally:
                if spinner:
                    spinner.__exit__()
    tuned = tuned_pick(case, qkv, grad) if args.tuned else None
    tuned_busy = None
    if args.tuned and args.busy:  # measured while the core is taken: the key knows the load, so it is tuned anew
        with Spinner():
            tuned_busy = tuned_pick(case, qkv, grad)
    med = {key: statistics.median(ts) for key, ts in times.items()}
    # busy / idle per round (the two phases of a round are seconds apart, so a load change between rounds from other
    # processes on the machine weighs on both), the median over rounds
    pairs = {n: zip(times["busy", n], times["idle", n], strict=True) for n in fns} if args.busy else {}
    slow = {n: statistics.median(b / i for b, i in rounds) for n, rounds in pairs.items()}
    # each backend's slowdown over unmasked SDPA's in the same round (the phases of a round are adjacent, so a change
    # of other processes' load between rounds weighs on both), the median over rounds
    relative = {n: paired_slowdown(times, n, REFERENCE) for n in (fns if args.busy else ())}
    # the same against unmasked SDPA on a call of about the backend's own duration
    relative_matched = {n: paired_slowdown(times, n, MATCHED.format(length)) for n, length in matched.items()}
    # auto's busy time over the best busy backend's (by median) in the same round, the median over rounds
    auto_busy = None
    if args.busy:
        best = min(costs, key=lambda n: med["busy", n])
        auto_busy = statistics.median(a / b for a, b in zip(times["busy", AUTO], times["busy", best], strict=True))
    covered = None if blocks is None else covered_fraction(blocks, case)
    return {
        "fraction": allowed_fraction(case),
        "covered": covered,
        "med": med,
        "slow": slow,
        "relative": relative,
        "matched": matched,
        "relative_matched": relative_matched,
        "costs": costs,
        "picked": explained.picked,
        "busy_picked": max(set(busy_picks), key=busy_picks.count) if busy_picks else None,
        "auto_busy": auto_busy,
        "tuned": tuned,
        "tuned_busy": tuned_busy,
    }


def tuned_pick(case: Case, qkv, grad: bool) -> str | None:
    """``"auto"``'s pick with measured tuning on (``attnmask.autotune``): the call twice (the second times the close
    candidates), then what ``explain`` reports; tuning's results are forgotten before and after."""
    tuning.clear()
    try:
        with am.autotune():
            for _ in range(2):
                step(lambda q, k, v: am.attention(q, k, v, case.spec), qkv, grad)
            return am.explain(*qkv, case.spec).picked
    finally:
        tuning.clear()


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 0.1 else f"{seconds * 1e3:.0f}"


def header(names: list[str], args, dtype, grad) -> list[str]:
    mode = "forward + backward" if grad else "forward"
    return [
        "",
        f"**{mode}, {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} thread(s)** "
        f"(ms, median of {args.reps} rounds, each the mean of calls filling {args.min_ms:g} ms; "
        f"auto = its pick's time{'; ps per cost unit in brackets' if args.units else ''})",
        "",
        "| structure | allowed | ideal ms | covered | floor ms | "
        + " | ".join(names)
        + " | auto picks | auto / ideal | floor / ideal | auto / floor | traffic / ideal | auto / traffic "
        + "| auto / best | bound | ok |"
        + (" tuned picks | tuned / best |" if args.tuned else ""),
        "|---|---|---|---|---|"
        + "---|" * len(names)
        + "---|---|---|---|---|---|---|---|---|"
        + ("---|---|" if args.tuned else ""),
    ]


def row(case: Case, m: dict, names: list[str], args, grad: bool) -> str:
    """One line of the idle table: times, auto's pick, its ratios to the ideal and the best, and the bound."""
    med = m["med"]
    ideal = med["idle", REFERENCE] * m["fraction"]
    timed = {n: med["idle", n] for n in m["costs"]}
    best = min(timed.values())
    auto = timed.get(m["picked"], float("nan"))
    bound = (1.5 if grad else 1.25) if case.run >= 512 else 2.0
    traffic = med.get(("idle", TRAFFIC))
    ok = "yes" if auto / ideal <= bound and auto / best <= 1.1 else "**no**"
    if ok != "yes" and traffic is not None and traffic / ideal > bound and auto / best <= 1.1:
        # the bound is under the time to move the call's bytes: the row is held to the bound over that time instead
        ok = "yes (traffic)" if auto / traffic <= bound else "**no** (traffic)"
    cells = []
    for n in names:
        t, base = med.get(("idle", n)), n.removesuffix(SERIAL)
        if t is None or base not in m["costs"]:
            cells.append("-")
            continue
        cell = fmt_ms(t) + (f" ({t / m['costs'][base] * 1e12:.0f})" if args.units else "")
        cells.append(f"**{cell}**" if n in timed and t == best else cell)
    floor = med.get(("idle", FLOOR))
    covered = "-" if m["covered"] is None else f"{m['covered']:.3f}"
    floor_cells = ("-", "-", "-") if floor is None else (fmt_ms(floor), f"{floor / ideal:.2f}", f"{auto / floor:.2f}")
    traffic_cells = ("-", "-") if traffic is None else (f"{traffic / ideal:.2f}", f"{auto / traffic:.2f}")
    return (
        f"| {case.name} | {m['fraction']:.3f} | {fmt_ms(ideal)} | {covered} | {floor_cells[0]} | "
        + " | ".join(cells)
        + f" | {m['picked']} | {auto / ideal:.2f} | {floor_cells[1]} | {floor_cells[2]} | {traffic_cells[0]} "
        + f"| {traffic_cells[1]} | {auto / best:.2f} | {bound:.2f} | {ok} |"
        + (f" {m['tuned']} | {timed.get(m['tuned'], float('nan')) / best:.2f} |" if args.tuned else "")
    )


def busy_table(case_rows, names: list[str], grad: bool, tuned: bool = False) -> list[str]:
    """Slowdown busy / idle (the median over rounds of each round's ratio) of stock unmasked SDPA and of every
    backend, and auto's pick against the best when busy (and, with ``tuned``, the pick tuning measured busy)."""
    mode = "forward + backward" if grad else "forward"
    cols = [REFERENCE, FLOOR, *names]
    lines = ["", f"**{mode}, one core busy: slowdown busy / idle (busy ms)**", ""]
    lines.append(
        "| structure | "
        + " | ".join(cols)
        + " | auto picks (busy) | auto busy / best busy (paired by round) "
        + "| slows more than sdpa (> 1.1x its slowdown, paired by round) "
        + "| slows more than sdpa of its duration (rows of that sdpa call) |"
        + (" tuned picks (busy) | tuned busy / best busy |" if tuned else "")
    )
    lines.append("|---|" + "---|" * len(cols) + "---|---|---|---|" + ("---|---|" if tuned else ""))
    for case, m in case_rows:
        med = m["med"]
        slow = m["slow"]
        busy = {n: med["busy", n] for n in m["costs"]}
        auto_busy = m["auto_busy"]
        worse = [f"{n} {m['relative'][n]:.2f}" for n in m["costs"] if m["relative"][n] > 1.1]
        matched = m["relative_matched"]
        worse_matched = [f"{n} {matched[n]:.2f} ({m['matched'][n]})" for n in m["costs"] if matched[n] > 1.1]
        cells = [f"{slow[n]:.2f} ({fmt_ms(med['busy', n])})" if n in slow else "-" for n in cols]
        lines.append(
            f"| {case.name} | "
            + " | ".join(cells)
            + f" | {m['busy_picked']} | {auto_busy:.2f} | {', '.join(worse) or '-'}"
            + f" | {', '.join(worse_matched) or '-'} |"
            + (
                f" {m['tuned_busy']} | {busy.get(m['tuned_busy'], math.nan) / min(busy.values()):.2f} |"
                if tuned
                else ""
            )
        )
    return lines


# ----------------------------------------------------------------------------------------------------------------------
# --fit: the cost constants from measured tables


def parse_tables(path: str, length: int, decode_keys: int) -> list[tuple[Case, bool, torch.dtype, str, float]]:
    """``(case, grad, dtype, backend, seconds)`` of every timed cell of this script's idle tables in ``path``."""
    text = open(path, encoding="utf-8").read()
    sizes = re.search(r"rows of (\d+), decode against (\d+) keys", text)
    if sizes:
        length, decode_keys = int(sizes.group(1)), int(sizes.group(2))
    by_name = {c.name: c for c in cases(length, decode_keys)}
    out, grad, dtype, names, first = [], False, torch.float32, [], 3
    for line in text.splitlines():
        title = re.match(r"\*\*(forward \+ backward|forward), (\w+), ", line)
        if title:
            grad, dtype = title.group(1) != "forward", getattr(torch, title.group(2))
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if cells[0] == "structure" and cells[1] != "allowed":  # a --busy table (parse_busy): not idle times
            names = []
        elif cells[0] == "structure" and cells[1] == "allowed":
            first = cells.index("ideal ms") + 1  # then the floor's columns (tables since branch floor), the backends
            first += sum(c in ("covered", "floor ms") for c in cells[first : first + 2])
            names = cells[first : cells.index("auto picks")]
        elif names and cells[0] in by_name and len(cells) > first + len(names):
            for name, cell in zip(names, cells[first : first + len(names)], strict=True):
                if cell != "-" and not name.endswith(SERIAL):
                    out.append((by_name[cells[0]], grad, dtype, name, float(cell.split()[0]) / 1e3))
    return out


def features(case: Case, grad: bool, dtype: torch.dtype, name: str, args, threads: int = 1) -> list[float]:
    """``name``'s estimate for the case at ``threads`` threads split by constant: ``[the rest, d estimate / d constant
    for FITTED[name]]`` (the estimate is linear in each constant, nearly so where the threads' deal of its work
    depends on them: "native"), read through ``am.explain`` with the constants patched."""
    qkv = tuple(torch.zeros(s).requires_grad_(grad) for s in _shapes(case, args))
    qkv = tuple(t.to(dtype) if dtype != torch.float32 else t for t in qkv)
    module = importlib.import_module(f"attnmask.backends.{name}")
    constants = FITTED.get(name, ())
    saved = {c: getattr(module, c) for c in constants}

    def estimate(ones: set[str]) -> float:
        for c in constants:
            setattr(module, c, 1.0 if c in ones else 0.0)
        explained = am.explain(*qkv, case.spec)
        at = explained.backends.index(name)
        if explained.costs[at] is None:
            raise RuntimeError(f"{name} refuses {case.name}: {explained.reasons[at]}")
        return explained.costs[at]

    try:
        with at_threads(threads):
            rest = estimate(set())
            return [rest] + [estimate({c}) - rest for c in constants]
    finally:
        for c, value in saved.items():
            setattr(module, c, value)


def _shapes(case: Case, args) -> list[tuple[int, ...]]:
    q = (case.batch, args.heads, case.q_len, args.dim)
    kv = (case.batch, args.heads, case.kv_len, args.dim)
    return [q, kv, kv]


def nonnegative_fit(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Least squares ``a @ x ~ b`` with ``x >= 0`` (columns whose coefficient would go negative are dropped and the
    rest refitted until none does; an all-zero column gets ``nan``: the data do not determine it)."""
    x = torch.full((a.shape[1],), float("nan"), dtype=torch.float64)
    active = [j for j in range(a.shape[1]) if bool(a[:, j].abs().sum() > 0)]
    x[active] = 0.0
    while active:
        sol = torch.linalg.lstsq(a[:, active], b.unsqueeze(1), driver="gelsd").solution.squeeze(1)
        x[active] = sol
        if bool((sol >= 0).all()):
            break
        dropped = [j for j, v in zip(active, sol.tolist(), strict=True) if v < 0]
        x[dropped] = 0.0
        active = [j for j in active if j not in dropped]
    return x


def fit(paths: list[str], args) -> None:
    """Per backend, the constants of ``FITTED`` scaled by the median of measured time / estimate, in "sdpa"'s unit
    (ps per unit = median of sdpa's time / its pair work), and auto's picks on the measured rows before and after."""
    # forward cells only: the other modes scale these estimates by each backend's MODES (fitted by --fit ... --modes)
    tables = [
        (table_threads(p), [cell for cell in parse_tables(p, args.length, args.decode_keys) if not cell[1]])
        for p in paths
    ]
    cells = [(threads, cell) for threads, table in tables for cell in table]
    sdpa = [t / features(c, g, d, n, args, threads)[0] for threads, (c, g, d, n, t) in cells if n == "sdpa"]
    unit = statistics.median(sdpa)
    print(
        f"{len(cells)} timed cells from {', '.join(paths)}; sdpa: {unit * 1e12:.1f} ps per unit (median of {len(sdpa)})"
    )
    thread_gain(tables, args)
    before = pick_quality(tables, args)
    efficiencies = fit_efficiencies(tables, args)
    print(f"with the fitted efficiencies: {summary(with_constants(efficiencies, pick_quality, tables, args))}\n")
    print("| backend | constant | now | fitted | cells | median abs error now -> fitted |")
    print("|---|---|---|---|---|---|")
    fits, singles = {}, {}
    for name, constants in FITTED.items():
        rows = [(features(c, g, d, n, args, threads), t / unit) for threads, (c, g, d, n, t) in cells if n == name]
        if not rows:
            continue
        module = importlib.import_module(f"attnmask.backends.{name}")
        now = torch.tensor([getattr(module, c) for c in constants], dtype=torch.float64)
        f = torch.tensor([r[0] for r in rows], dtype=torch.float64)
        y = torch.tensor([r[1] for r in rows], dtype=torch.float64)
        # One factor per backend on all its constants, the median of measured / estimated (robust to the noisy
        # cells of a shared machine; a free fit of every constant is not determined by a few dozen cells). "sdpa"'s
        # pair cost is the unit; its mask and call costs are left as they are.
        estimate = f[:, 0] + f[:, 1:] @ now
        scale = 1.0 if name == "sdpa" else float((y / estimate).median())
        fitted = now * scale
        err_now = ((f[:, 0] + f[:, 1:] @ now) / y - 1).abs().median()
        err_fit = ((f[:, 0] + f[:, 1:] @ fitted) / y - 1).abs().median()
        for j, c in enumerate(constants):
            errors = f"{err_now:.2f} -> {err_fit:.2f}" if j == 0 else ""
            print(f"| {name} | {c} | {now[j]:.3g} | {fitted[j]:.3g} | {len(rows)} | {errors} |")
        fits[module] = dict(zip(constants, fitted.tolist(), strict=True))
        singles[module] = one_constant_fits(f, y, now, constants)
    for module, values in fits.items():  # each backend's factor alone: does it improve auto's picks?
        own = {c: getattr(module, c) for c in values}
        try:
            for c, value in values.items():
                setattr(module, c, value)
            alone = pick_quality(tables, args)
        finally:
            for c, value in own.items():
                setattr(module, c, value)
        print(f"{module.__name__.rsplit('.', 1)[1]} factor alone: {summary(alone)}")
    print("\n| backend | constant fitted alone | now | fitted | cells | auto's picks with it |")
    print("|---|---|---|---|---|---|")
    for module, values in singles.items():
        for c, (value, count) in values.items():
            own = getattr(module, c)
            try:
                setattr(module, c, value)
                picks = summary(pick_quality(tables, args))
            finally:
                setattr(module, c, own)
            print(f"| {module.__name__.rsplit('.', 1)[1]} | {c} | {own:.3g} | {value:.3g} | {count} | {picks} |")
    saved = {(module, c): getattr(module, c) for module, values in fits.items() for c in values}
    try:  # auto's picks under all the fitted constants, then the modules' own constants back
        for module, values in fits.items():
            for c, value in values.items():
                setattr(module, c, value)
        after = pick_quality(tables, args)
    finally:
        for (module, c), value in saved.items():
            setattr(module, c, value)
    print("\n| structure | rows | threads | auto / best now | with the fitted constants |")
    print("|---|---|---|---|---|")
    for key in before:
        now, fitted = before[key], after[key]
        print(f"| {key[0]} | {key[1]} | {key[2]} | {now[0]} {now[1]:.2f} | {fitted[0]} {fitted[1]:.2f} |")
    print(f"now: {summary(before)}\nall fitted: {summary(after)}")


def one_constant_fits(f: torch.Tensor, y: torch.Tensor, now: torch.Tensor, constants) -> dict:
    """Each constant refitted with the others held: per cell the value that makes the estimate equal the measured time
    ``y`` (in sdpa's unit), over the cells where that constant carries at least a tenth of the estimate; the median.
    ``{constant: (value, cells)}``; constants no cell depends on that much are left out."""
    out = {}
    estimate = f[:, 0] + f[:, 1:] @ now
    for j, c in enumerate(constants):
        share = f[:, 1 + j] * now[j] / estimate
        used = share >= 0.1
        if now[j] <= 0 or not bool(used.any()):
            continue
        implied = (y[used] - (estimate[used] - f[used, 1 + j] * now[j])) / f[used, 1 + j]
        out[c] = (max(float(implied.median()), 0.0), int(used.sum()))
    return out


def summary(result: dict) -> str:
    ratios = [r[1] for r in result.values()]
    within = sum(r <= 1.1 for r in ratios)
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    return (
        f"{within} of {len(ratios)} rows within 1.1x of the fastest, geometric mean {geo:.2f}, worst {max(ratios):.2f}"
    )


# The kinds of parallel work the CPU estimates model, and the backends doing each: one fused SDPA call split by torch
# ("sdpa"), tasks of ``_workers.parallel_map`` dealt to single-threaded workers ("varlen", "blocksparse"), banded's one
# SDPA call per row on small tiles, the native kernel's pthreads. Per kind, ``--fit`` fits one ``_THREAD_EFFICIENCY``
# (the share of a core each added thread contributes), and for the tasks one ``_HANDOVER_COST`` per dealt task; each
# backend module holds the values of its kind.
KINDS = {
    "fused SDPA": ("sdpa",),
    "worker tasks": ("varlen", "blocksparse"),
    "banded SDPA": ("banded",),
    "native kernel": ("native",),
}
EFFICIENCY = "_THREAD_EFFICIENCY"
HANDOVER = "_HANDOVER_COST"  # per task dealt to a worker ("varlen", "blocksparse"); fitted with the efficiency


class at_threads:  # noqa: N801 (used as a function: ``with at_threads(2): ...``)
    """Inside the block the estimates see ``threads`` threads and no other process holding a core:
    ``torch.set_num_threads``, ``backends._workers.threads_available`` and ``free_cores`` patched (the estimates read
    them through the module; ``contended()`` then says no unless a caller patched it, as ``fit_busy`` does), so that
    an offline evaluation does not depend on this machine's load; all restored on exit."""

    def __init__(self, threads: int):
        self.threads = threads

    def __enter__(self):
        self.before, self.available, self.free = torch.get_num_threads(), workers.threads_available, workers.free_cores
        torch.set_num_threads(self.threads)
        workers.threads_available = lambda: self.threads
        workers.free_cores = lambda: None
        return self

    def __exit__(self, *exc):
        workers.threads_available, workers.free_cores = self.available, self.free
        torch.set_num_threads(self.before)


def estimate(case: Case, dtype: torch.dtype, name: str, threads: int, args, grad: bool = False) -> float:
    """``name``'s CPU estimate for the case's call at ``threads`` threads (forward, or with ``grad`` forward +
    backward), with the module constants as they are (the call built as ``attention`` builds it; no other backend
    costed)."""
    qkv = tuple(torch.zeros(s, dtype=dtype).requires_grad_(grad) for s in _shapes(case, args))
    call = importlib.import_module("attnmask.attention")._prepare_call(*qkv, case.spec, None, None, None)
    backend = next(b for b in REGISTRY if b.name == name)
    with at_threads(threads):
        return float(backend.cost(call))


def thread_pairs(tables) -> list[tuple[Case, torch.dtype, str, int, float, float]]:
    """``(case, dtype, backend, T, seconds at 1 thread, seconds at T threads)`` for every cell timed in a 1-thread
    table and in a T-thread table (T > 1) of the same row, dtype and backend."""
    one = {(c.name, c.kv_len, d, n): t for threads, cells in tables if threads == 1 for c, _, d, n, t in cells}
    return [
        (c, d, n, threads, one[c.name, c.kv_len, d, n], t)
        for threads, cells in tables
        if threads > 1
        for c, _, d, n, t in cells
        if (c.name, c.kv_len, d, n) in one
    ]


def thread_gain(tables, args) -> None:
    """Print what T threads gain over 1 (the 1-thread time / the T-thread time, median over the rows timed at both),
    measured and as the estimates predict it (estimate at 1 thread / estimate at T), per backend."""
    pairs = thread_pairs(tables)
    for threads in sorted({p[3] for p in pairs}):
        listed = []
        for name in dict.fromkeys(p[2] for p in pairs):
            here = [p for p in pairs if p[2] == name and p[3] == threads]
            measured = statistics.median(one / many for *_, one, many in here)
            predicted = statistics.median(
                estimate(c, d, name, 1, args) / estimate(c, d, name, threads, args) for c, d, *_ in here
            )
            listed.append(f"{name} {measured:.2f} (estimates {predicted:.2f})")
        print(f"speed-up at {threads} threads over 1 (median of rows): {', '.join(listed)}")


def efficiency_error(pairs, name: str, args) -> float:
    """Mean |log(predicted gain / measured gain)| of ``name`` over ``pairs`` (``thread_pairs``) under the module's
    constants as they are."""
    errors = []
    for case, dtype, n, threads, one, many in pairs:
        if n == name:
            predicted = estimate(case, dtype, name, 1, args) / estimate(case, dtype, name, threads, args)
            errors.append(abs(math.log(predicted * many / one)))
    return sum(errors) / len(errors)


def fit_efficiencies(tables, args) -> dict:
    """Per kind of parallel work (``KINDS``) timed at 1 and at T threads on the same rows, the ``_THREAD_EFFICIENCY``
    (0 to 1) and, for worker tasks, the ``_HANDOVER_COST`` per dealt task (0, or 1e5 to 5e7 estimate units) whose
    predicted gains (estimate at 1 thread / at T) come closest to the measured ones of its backends: least mean
    absolute log error, on a coarse grid (steps of 0.1, handovers doubling), then efficiency steps of 0.01 and
    handover steps of ~10% around the best. Prints them; returns ``{module: {constant: value}}`` (the modules keep
    their own)."""
    pairs = thread_pairs(tables)
    fitted: dict = {}
    print("| kind | backends | constant | now | fitted | row pairs | mean abs log error of the gain now -> fitted |")
    print("|---|---|---|---|---|---|---|")
    for kind, members in KINDS.items():
        used = [p for p in pairs if p[2] in members]
        if not used:
            continue
        modules = [importlib.import_module(f"attnmask.backends.{name}") for name in members]
        names = (EFFICIENCY, HANDOVER) if all(hasattr(m, HANDOVER) for m in modules) else (EFFICIENCY,)
        own = {m: tuple(getattr(m, c) for c in names) for m in modules}

        def error(values: tuple | None, modules=modules, names=names, used=used) -> float:
            """The kind's mean error with ``values`` set on every member (None: as the modules hold them)."""
            for module in modules if values is not None else ():
                for c, value in zip(names, values, strict=True):
                    setattr(module, c, value)
            timed = {p[2] for p in used}
            return sum(efficiency_error(used, n, args) * sum(p[2] == n for p in used) for n in timed) / len(used)

        handovers = [0.0] + [1e5 * 2**k for k in range(10)] if len(names) == 2 else [None]
        try:
            now = error(None)
            _, best = min((error(v[: len(names)]), v[: len(names)]) for v in _grid(handovers))
            near = [round(best[0] + i / 100, 2) for i in range(-9, 10)]
            _, best = min((error((e, *best[1:])), (e, *best[1:])) for e in near if 0 <= e <= 1)
            if len(names) == 2 and best[1] > 0:
                near = [float(f"{best[1] * 1.1**i:.2g}") for i in range(-7, 8)]
                _, best = min((error((best[0], h)), (best[0], h)) for h in near)
            after = error(best)
        finally:
            for module, values in own.items():
                for c, value in zip(names, values, strict=True):
                    setattr(module, c, value)
        for module in modules:
            fitted[module] = dict(zip(names, best, strict=True))
        for j, c in enumerate(names):
            errors = f"{now:.3f} -> {after:.3f}" if c == EFFICIENCY else ""
            was = " / ".join(f"{own[m][j]:.2f}" if c == EFFICIENCY else f"{own[m][j]:.2g}" for m in modules)
            value = f"{best[j]:.2f}" if c == EFFICIENCY else f"{best[j]:.2g}"
            print(f"| {kind} | {', '.join(members)} | {c} | {was} | {value} | {len(used)} | {errors} |")
    return fitted


def _grid(handovers: list) -> list[tuple]:
    """``(efficiency, handover)`` pairs of the coarse grid (``(efficiency, None)`` without handovers)."""
    return [(i / 10, h) for i in range(11) for h in handovers]


def with_constants(values: dict, fn, *fn_args):
    """``fn(*fn_args)`` with the module constants ``values`` (``{module: {constant: value}}``) set, then put back."""
    saved = {(module, c): getattr(module, c) for module, constants in values.items() for c in constants}
    try:
        for module, constants in values.items():
            for c, value in constants.items():
                setattr(module, c, value)
        return fn(*fn_args)
    finally:
        for (module, c), value in saved.items():
            setattr(module, c, value)


def held_out(paths: list[str], held: str, args) -> None:
    """The efficiencies fitted on ``paths`` only, then auto's picks on the table ``held`` (not in the fit) with them,
    next to its picks with the modules' own constants (fitted on every table)."""
    tables = [
        (table_threads(p), [cell for cell in parse_tables(p, args.length, args.decode_keys) if not cell[1]])
        for p in paths
    ]
    held_table = [(table_threads(held), [c for c in parse_tables(held, args.length, args.decode_keys) if not c[1]])]
    print(f"held out: {held}; efficiencies fitted on {', '.join(paths)}")
    fitted = fit_efficiencies(tables, args)
    without = with_constants(fitted, pick_quality, held_table, args)
    print(f"held-out picks, efficiencies fitted without it: {summary(without)}")
    print(f"held-out picks, the modules' constants: {summary(pick_quality(held_table, args))}")


def table_threads(path: str) -> int:
    """The intra-op thread count a saved table of this script was measured with (its first line says)."""
    found = re.search(r"(\d+) thread\(s\)", open(path, encoding="utf-8").read())
    return int(found.group(1)) if found else 1


def pick_quality(tables, args) -> dict:
    """``(structure, row length, threads) -> (auto's pick, its measured time / the fastest measured)`` under the
    constants the backend modules hold now, per table ``(threads, cells)`` (auto decides at that thread count:
    ``at_threads``)."""
    out = {}
    for threads, cells in tables:
        groups: dict = {}
        for case, grad, dtype, name, seconds in cells:
            groups.setdefault((case.name, case.kv_len, dtype, grad), (case, {}))[1][name] = seconds
        with at_threads(threads):
            for (title, kv_len, dtype, grad), (case, times) in groups.items():
                qkv = tuple(torch.zeros(s, dtype=dtype).requires_grad_(grad) for s in _shapes(case, args))
                picked = am.explain(*qkv, case.spec).picked
                label = ", ".join(
                    [f"{threads}"]
                    + ([str(dtype).removeprefix("torch.")] if dtype != torch.float32 else [])
                    + (["fwd+bwd"] if grad else [])
                )
                out[title, kv_len, label] = (picked, times.get(picked, float("nan")) / min(times.values()))
    return out


MODES = ((torch.bfloat16, False, "bf16"), (torch.float32, True, "backward"), (torch.bfloat16, True, "bf16_backward"))
NO_AMX = {"bf16": "bf16_no_amx", "bf16_backward": "bf16_backward_no_amx"}  # the fields of a CPU without AMX tiles


def table_has_amx(path: str) -> bool:
    """Whether a saved table was measured on a CPU with AMX bfloat16 tiles (its first line says: written since
    2026-12-02, added by hand on 2026-12-05 to the older tables of limit_tables/ from RESULTS.md's record of the
    machines, the Xeon's before 2026-12-02 16:00 UTC and s13's, the AMD EPYC's s9_*; a table without it: this
    machine's flag)."""
    found = re.search(r"bfloat16 tiles: (\w+)", open(path, encoding="utf-8").read())
    return found.group(1) == "amx" if found else cpu_has_amx_bf16()


@contextlib.contextmanager
def as_measured_on(paths: list[str]):
    """Within the block the estimates see the CPU the tables ``paths`` were measured on, when they agree on it: its
    AMX tiles and AVX512-BF16 (``_common.cpu_has_amx_bf16`` / ``cpu_has_avx512_bf16``, which choose the bfloat16
    factors) and the constants of its kind (``_common.per_cpu_kind``: ``kind_constants``); so a replay of another
    CPU's table on this one picks as that CPU's estimates would. Tables of both kinds together: this machine's, with a
    note."""
    kinds = {(table_has_amx(p), table_has_avx512_bf16(p)) for p in paths}
    if len(kinds) != 1:
        print("(tables of several CPU kinds: evaluated with this machine's flags and constants)")
        yield
        return
    with on_cpu_kind(*kinds.pop()):
        yield


@contextlib.contextmanager
def on_cpu_kind(amx: bool, avx512_bf16: bool):
    """Within the block the estimates see a CPU with (or without) AMX bfloat16 tiles and AVX512-BF16: those flags
    (``_common.cpu_has_amx_bf16`` / ``cpu_has_avx512_bf16``) and the constants of that kind (``kind_constants``);
    everything is put back after it."""
    held = [(importlib.import_module(f"attnmask.backends.{m}"), name, values) for m, name, values in kind_constants()]
    saved = (_common.cpu_has_amx_bf16, _common.cpu_has_avx512_bf16, [getattr(m, name) for m, name, _ in held])
    _common.cpu_has_amx_bf16, _common.cpu_has_avx512_bf16 = (lambda: amx), (lambda: avx512_bf16)
    for module, name, values in held:
        setattr(module, name, values[0] if amx else values[1])
    try:
        yield
    finally:
        _common.cpu_has_amx_bf16, _common.cpu_has_avx512_bf16 = saved[:2]
        for (module, name, _), value in zip(held, saved[2], strict=True):
            setattr(module, name, value)


def kind_constants() -> list[tuple[str, str, tuple[float, float]]]:
    """``(backend module, constant, (with AMX tiles, other))`` of every estimate constant set by the CPU's kind, as
    the CPU estimate modules (``FITTED``) declare them in their ``CPU_KIND_VALUES`` (``_common.per_cpu_kind``)."""
    found = []
    for name in FITTED:
        declared = getattr(importlib.import_module(f"attnmask.backends.{name}"), "CPU_KIND_VALUES", {})
        found += [(name, constant, values) for constant, values in declared.items()]
    return found


def table_has_avx512_bf16(path: str) -> bool:
    """Whether a saved table was measured on a CPU with the AVX512-BF16 instructions (its first line says since
    2026-12-04; the AMD EPYC tables s19-s22 were marked by hand, from that day's flags and their bfloat16 times at
    float32's; older tables: no)."""
    found = re.search(r"AVX512-BF16: (\w+)", open(path, encoding="utf-8").readline())
    return bool(found) and found.group(1) == "yes"


def fit_modes(paths: list[str], args) -> None:
    """Per backend, its ``MODES`` (``_common.ModeFactors``): for each other mode than a float32 forward, the median over
    the rows timed in both of (measured time in that mode / in the float32 forward) / (the same ratio of its estimates
    with the factors at 1); then auto's picks in every mode with the modules' factors and with the fitted ones.
    Tables of a CPU with AVX512-BF16 and no AMX tiles (``table_has_avx512_bf16``) fit ``backward`` only (such a CPU's
    bfloat16 uses the float32 factors); tables of a CPU with neither fit ``bf16_no_amx`` and ``bf16_backward_no_amx``
    instead of ``bf16`` and ``bf16_backward``; all the tables must agree, and their picks are judged on this machine's
    flags."""
    amx = {table_has_amx(p) for p in paths}
    if len(amx) > 1:
        raise SystemExit("--modes: tables of CPUs with and without AMX tiles; fit them separately")
    # a CPU with AVX512-BF16 and no AMX tiles: its bfloat16 uses the float32 factors (_common.ModeFactors), so only
    # "backward" is fitted; the bfloat16 ratios are printed (near 1 there) but not kept
    float32_only = not any(amx) and any(table_has_avx512_bf16(p) for p in paths)
    rename = {} if amx.pop() or float32_only else NO_AMX
    tables = [(table_threads(p), parse_tables(p, args.length, args.decode_keys)) for p in paths]
    fitted = {}
    print(f"| backend | now | fitted ({', '.join(rename.get(m[2], m[2]) for m in MODES)}) | rows per mode |")
    print("|---|---|---|---|")
    for name in FITTED:
        module = importlib.import_module(f"attnmask.backends.{name}")
        ratios: dict[str, list[float]] = {label: [] for _, _, label in MODES}
        for threads, cells in tables:
            times = {(c.name, c.kv_len, g, d): (c, t) for c, g, d, n, t in cells if n == name}
            for (title, kv_len, grad, dtype), (case, seconds) in times.items():
                base = times.get((title, kv_len, False, torch.float32))
                label = next((m[2] for m in MODES if m[:2] == (dtype, grad)), None)
                if base is None or label is None:
                    continue
                identity = {module: {"MODES": ModeFactors(bf16_no_amx=1.0, bf16_backward_no_amx=1.0)}}
                est = with_constants(identity, estimate, case, dtype, name, threads, args, grad)
                est_base = with_constants(identity, estimate, case, torch.float32, name, threads, args)
                ratios[label].append((seconds / base[1]) / (est / est_base))
        if not all(ratios.values()):
            continue
        medians = {rename.get(k, k): round(statistics.median(v), 2) for k, v in ratios.items()}
        counts = ", ".join(str(len(v)) for v in ratios.values())
        kept = {"backward": medians["backward"]} if float32_only else medians
        fitted[module] = {"MODES": dataclasses.replace(module.MODES, **kept)}
        shown = f"{medians} (bfloat16 ones not kept)" if float32_only else fitted[module]["MODES"]
        print(f"| {name} | {module.MODES} | {shown} | {counts} |")
    before = pick_quality(tables, args)
    compare_picks(before, with_constants(fitted, pick_quality, tables, args), "auto / best")


def parse_busy(path: str, length: int, decode_keys: int) -> list[tuple[Case, bool, torch.dtype, str, float, float]]:
    """``(case, grad, dtype, backend, slowdown busy / idle, busy seconds)`` of every cell of the ``--busy`` tables in
    ``path`` (the dtype is the one of the idle table before each)."""
    text = open(path, encoding="utf-8").read()
    sizes = re.search(r"rows of (\d+), decode against (\d+) keys", text)
    if sizes:
        length, decode_keys = int(sizes.group(1)), int(sizes.group(2))
    by_name = {c.name: c for c in cases(length, decode_keys)}
    out, grad, dtype, names = [], False, torch.float32, []
    for line in text.splitlines():
        title = re.match(r"\*\*(forward \+ backward|forward), (\w+), ", line)
        if title:
            dtype = getattr(torch, title.group(2))
        busy = re.match(r"\*\*(forward \+ backward|forward), one core busy", line)
        if busy:
            grad = busy.group(1) != "forward"
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if cells[0] == "structure":
            end = next((i for i, c in enumerate(cells) if c.startswith("auto picks")), len(cells))
            names = cells[1:end] if cells[1] == REFERENCE else []
        elif names and cells[0] in by_name and len(cells) > len(names):
            for name, cell in zip(names, cells[1 : 1 + len(names)], strict=True):
                found = re.match(r"([\d.]+) \(([\d.]+)\)", cell)
                if found and not name.startswith("("):
                    slow, ms = float(found.group(1)), float(found.group(2))
                    out.append((by_name[cells[0]], grad, dtype, name, slow, ms / 1e3))
    return out


def cell_work(case: Case, args) -> float:
    """``_common.busy_work`` of the case's call at the benchmark's heads and head size: the size by which a call
    picks its busy factor at run time (a spec it cannot count, e.g. prefix-LM, as all pairs), so that the fit bins a
    cell as ``auto`` will. The call is built on empty tensors, as ``estimate`` builds it."""
    qkv = tuple(torch.empty(s) for s in _shapes(case, args))
    call = importlib.import_module("attnmask.attention")._prepare_call(*qkv, case.spec, None, None, None)
    return _common.busy_work(call)


def fit_busy(paths: list[str], args) -> None:
    """Per backend, ``MODES.busy`` and ``busy_backward``: the median slowdown busy / idle of its forward and forward +
    backward cells in the ``--busy`` tables of ``paths``; for a backend with small calls' factors (``busy_small``,
    ``busy_backward_small``) those from its cells of at most ``_common.BUSY_SMALL_WORK`` multiply-adds of allowed
    pairs and the others from its cells of at least ``BUSY_LARGE_WORK`` (``cell_work``); then auto's picks while a
    core is taken (``_workers.contended`` patched true, each table's thread count), judged on the busy times, with the
    modules' factors and with the fitted ones."""
    tables = [(table_threads(p), parse_busy(p, args.length, args.decode_keys)) for p in paths]
    fitted = {}
    print("| backend | busy now -> fitted | busy_backward now -> fitted | cells |")
    print("|---|---|---|---|")
    for name in FITTED:
        module = importlib.import_module(f"attnmask.backends.{name}")
        modes, changes, counts = module.MODES, {}, []
        for grad, large, small in ((False, "busy", "busy_small"), (True, "busy_backward", "busy_backward_small")):
            cells = [(c, slow) for _, cells in tables for c, g, d, n, slow, _ in cells if n == name and g == grad]
            if getattr(modes, small) is None:
                groups = {large: [slow for _, slow in cells]}
            else:
                sized = [(cell_work(c, args), slow) for c, slow in cells]
                groups = {
                    small: [slow for w, slow in sized if w <= _common.BUSY_SMALL_WORK],
                    large: [slow for w, slow in sized if w >= _common.BUSY_LARGE_WORK],
                }
            for field, slows in groups.items():
                counts.append(f"{field} {len(slows)}")
                if slows:
                    changes[field] = round(statistics.median(slows), 2)
        if not changes:
            continue
        fitted[module] = {"MODES": dataclasses.replace(modes, **changes)}
        shown = {f: f"{getattr(modes, f)} -> {changes.get(f, getattr(modes, f))}" for f in changes}
        forward = ", ".join(v for f, v in shown.items() if "backward" not in f) or "-"
        backward = ", ".join(v for f, v in shown.items() if "backward" in f) or "-"
        print(f"| {name} | {forward} | {backward} | {', '.join(counts)} |")
    busy_times = [(threads, [(c, g, d, n, t) for c, g, d, n, _, t in cells]) for threads, cells in tables]
    contended = workers.contended
    try:
        workers.contended = lambda: True
        before = pick_quality(busy_times, args)
        after = with_constants(fitted, pick_quality, busy_times, args)
    finally:
        workers.contended = contended
    compare_picks(before, after, "auto busy / best busy")


def compare_picks(before: dict, after: dict, ratio: str) -> None:
    """auto's pick and its time over the fastest per row (``pick_quality``), with the modules' constants and with the
    fitted ones, and the summary of each."""
    print(f"\n| structure | rows | threads, mode | {ratio} now | with the fitted factors |")
    print("|---|---|---|---|---|")
    for key in before:
        now, new = before[key], after[key]
        print(f"| {key[0]} | {key[1]} | {key[2]} | {now[0]} {now[1]:.2f} | {new[0]} {new[1]:.2f} |")
    print(f"now: {summary(before)}\nfitted: {summary(after)}")


def fit_implied(paths: list[str], target: str, args) -> None:
    """The value of one cost constant (``target``: ``backend.CONSTANT`` of ``FITTED``, e.g. ``blocksparse._GROUP_COST``)
    that each table implies with the others held: per float32 forward row of that backend, (measured time in the
    table's unit - the estimate without the constant) / the estimate's derivative in it, the table's unit being the
    median of sdpa's time / its estimate there (so that a table's load or machine does not enter); the median per
    table and over all."""
    name, constant = target.split(".")
    module = importlib.import_module(f"attnmask.backends.{name}")
    at = FITTED[name].index(constant)
    everything = []
    for path in paths:
        threads = table_threads(path)
        cells = [c for c in parse_tables(path, args.length, args.decode_keys) if not c[1] and c[2] == torch.float32]
        unit = statistics.median(t / estimate(c, d, n, threads, args) for c, g, d, n, t in cells if n == "sdpa")
        now = [getattr(module, c) for c in FITTED[name]]
        implied = []
        for case, grad, dtype, cell_name, seconds in cells:
            if cell_name != name:
                continue
            f = features(case, grad, dtype, name, args, threads)
            rest = f[0] + sum(v * x for j, (v, x) in enumerate(zip(now, f[1:], strict=True)) if j != at)
            if f[1 + at] > 0:
                implied.append((seconds / unit - rest) / f[1 + at])
        everything += implied
        median = statistics.median(implied)
        print(f"{path}: {threads} thread(s), {len(implied)} rows, implied {constant} median {median:.3g}")
    print(f"all: median {statistics.median(everything):.3g} (now {getattr(module, constant):.3g})")


def fastest_per_row(cells) -> dict[tuple, dict[str, float]]:
    """``{(structure, grad, dtype): {backend: seconds}}`` of ``parse_tables``'s cells."""
    rows: dict[tuple, dict[str, float]] = {}
    for case, grad, dtype, name, seconds in cells:
        rows.setdefault((case.name, grad, dtype), {})[name] = seconds
    return rows


def agreement(first: dict, second: dict, factor: float = 1.1) -> tuple[int, int, int, list]:
    """How two timings of the same rows (``fastest_per_row``) agree on the fastest backend: ``(rows in both, rows where
    the first's fastest takes at most ``factor`` x the second's fastest time in the second, the same the other way,
    [(row, first's fastest, second's fastest, the two ratios)] of the rows off either way)``. An oracle that knew one
    run's times exactly would score the first count on the other: the resolution of "auto within 1.1x of the
    fastest" on the machine (the same code timed twice differs only by noise)."""
    rows = one_on_two = two_on_one = 0
    off = []
    for key in [key for key in first if key in second]:
        a, b = first[key], second[key]
        fa, fb = min(a, key=a.get), min(b, key=b.get)
        if fa not in b or fb not in a:  # a backend timed in one run only: no verdict
            continue
        rows += 1
        ra, rb = b[fa] / b[fb], a[fb] / a[fa]
        one_on_two += ra <= factor
        two_on_one += rb <= factor
        if max(ra, rb) > factor:
            off.append((key, fa, fb, ra, rb))
    return rows, one_on_two, two_on_one, off


def fit_agree(paths: list[str], args) -> None:
    """``agreement`` of two saved outputs of the same rows, per row off and in total."""
    first, second = (fastest_per_row(parse_tables(p, args.length, args.decode_keys)) for p in paths)
    rows, one, two, off = agreement(first, second)
    print(f"| structure | mode | fastest in {paths[0]} | in {paths[1]} | first's on second | second's on first |")
    print("|---|---|---|---|---|---|")
    for (name, grad, dtype), fa, fb, ra, rb in off:
        mode = f"{'forward + backward' if grad else 'forward'}, {str(dtype).split('.')[-1]}"
        print(f"| {name} | {mode} | {fa} | {fb} | {ra:.2f} | {rb:.2f} |")
    print(
        f"the fastest of {paths[0]} within 1.1x of the fastest of {paths[1]} there: {one} of {rows} rows; "
        f"the other way: {two} of {rows}"
    )


def parse_grid(items: list[str]) -> list[tuple[object, str, list[float]]]:
    """``(module, constant, values)`` of each ``backend.CONSTANT=V1,V2`` (a constant the module holds)."""
    axes = []
    for item in items:
        key, _, values = item.partition("=")
        name, _, constant = key.partition(".")
        module = importlib.import_module(f"attnmask.backends.{name}")
        if not constant or not hasattr(module, constant) or not values:
            raise SystemExit(f"--grid: expected backend.CONSTANT=V1,V2 naming a constant of a backend, got {item!r}")
        axes.append((module, constant, [float(v) for v in values.split(",")]))
    return axes


def fit_grid(paths: list[str], items: list[str], args) -> None:
    """Rows within 1.1x of the fastest at each combination of the ``--grid`` values, summed over the tables of each
    CPU kind (AMX tiles or not), each table replayed on its kind with the values set on top of its constants."""
    axes = parse_grid(items)
    combos = list(itertools.product(*(values for _, _, values in axes)))
    totals = {combo: {True: [0, 0], False: [0, 0]} for combo in combos}
    for path in paths:
        threads, amx = table_threads(path), table_has_amx(path)
        cells = parse_tables(path, args.length, args.decode_keys)
        with as_measured_on([path]):
            held = [getattr(module, constant) for module, constant, _ in axes]
            try:
                for combo in combos:
                    for (module, constant, _), value in zip(axes, combo, strict=True):
                        setattr(module, constant, value)
                    picks = pick_quality([(threads, cells)], args)
                    totals[combo][amx][0] += sum(ratio <= 1.1 for _, ratio in picks.values())
                    totals[combo][amx][1] += len(picks)
            finally:
                for (module, constant, _), value in zip(axes, held, strict=True):
                    setattr(module, constant, value)
    names = [f"{module.__name__.rsplit('.', 1)[-1]}.{constant}" for module, constant, _ in axes]
    print("| " + " | ".join(names) + " | tables with AMX tiles | other tables |")
    print("|" + "---|" * (len(names) + 2))
    for combo, kinds in totals.items():
        counts = [f"{ok} of {n}" if n else "-" for ok, n in (kinds[True], kinds[False])]
        print("| " + " | ".join(f"{v:g}" for v in combo) + " | " + " | ".join(counts) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--decode-keys", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--min-ms", type=float, default=100.0, help="a timing averages calls filling this long")
    parser.add_argument("--threads", type=int, default=1, choices=(1, 2))
    parser.add_argument("--mode", default="fwd", help="comma-separated: fwd, fwdbwd")
    parser.add_argument("--dtype", default="float32", help="comma-separated: float32, bfloat16")
    parser.add_argument("--only", default="", help="comma-separated substrings of structure names")
    parser.add_argument("--busy", action="store_true", help="also time every backend with one core busy")
    parser.add_argument("--units", action="store_true", help="add ps per cost unit to every time")
    parser.add_argument(
        "--serial", action="store_true", help="also time varlen and blocksparse with their tasks run one by one"
    )
    parser.add_argument(
        "--tuned", action="store_true", help="also report auto's pick with measured tuning on (attnmask.autotune)"
    )
    parser.add_argument("--quick", action="store_true", help="rows of 1,024, decode against 4,096 keys")
    parser.add_argument("--dry-run", action="store_true", help="rows of 256, decode against 512 keys, one round")
    parser.add_argument("--fit", nargs="+", metavar="OUTPUT", help="fit the cost constants to saved outputs; no timing")
    parser.add_argument(
        "--busy-factors", action="store_true", help="with --fit: each backend's slowdowns from --busy tables"
    )
    parser.add_argument(
        "--implied", metavar="BACKEND.CONSTANT", help="with --fit: the value of one constant each table implies"
    )
    parser.add_argument(
        "--modes", action="store_true", help="with --fit: fit each backend's bfloat16 and backward factors instead"
    )
    parser.add_argument(
        "--agree",
        action="store_true",
        help="with --fit FIRST SECOND: how often one table's fastest backend is within 1.1x of the other's fastest",
    )
    parser.add_argument(
        "--held-out", metavar="OUTPUT", help="with --fit: fit the thread efficiencies without this table, judge on it"
    )
    parser.add_argument(
        "--grid",
        nargs="+",
        metavar="BACKEND.CONSTANT=V1,V2",
        help="with --fit: rows within 1.1x of the fastest at every combination of these values, per CPU kind",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.length, args.decode_keys = 1024, 4096
    if args.dry_run:
        args.length, args.decode_keys, args.reps, args.min_ms = 256, 512, 1, 0.0
    torch.set_num_threads(args.threads)
    if args.fit and args.agree and len(args.fit) != 2:
        parser.error("--agree compares two saved outputs: --fit FIRST SECOND --agree")
    if args.fit and args.grid:
        fit_grid(args.fit, args.grid, args)
        return
    if args.fit:
        with as_measured_on(args.fit + ([args.held_out] if args.held_out else [])):
            if args.agree:
                fit_agree(args.fit, args)
            elif args.held_out:
                held_out(args.fit, args.held_out, args)
            elif args.busy_factors:
                fit_busy(args.fit, args)
            elif args.implied:
                fit_implied(args.fit, args.implied, args)
            elif args.modes:
                fit_modes(args.fit, args)
            else:
                fit(args.fit, args)
        return
    gen = torch.Generator().manual_seed(0)
    wanted = [s for s in args.only.split(",") if s]
    selected = [c for c in cases(args.length, args.decode_keys) if not wanted or any(w in c.name for w in wanted)]
    t0 = time.perf_counter()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), rows of {args.length}, decode against "
        f"{args.decode_keys} keys, H={args.heads}, D={args.dim}, load {_load()}, "
        f"bfloat16 tiles: {'amx' if cpu_has_amx_bf16() else 'none'}, AVX512-BF16: "
        f"{'yes' if cpu_has_avx512_bf16() else 'no'}"
    )
    tally = []
    for dtype_name in args.dtype.split(","):
        dtype = getattr(torch, dtype_name)
        for mode in args.mode.split(","):
            grad = {"fwd": False, "fwdbwd": True}[mode]
            names = [b.name for b in REGISTRY if "cpu" in b.devices and b.auto_on("cpu") and b.name != "reference"]
            names += [n + SERIAL for n in TASKED] if args.serial else []
            print("\n".join(header(names, args, dtype, grad)), flush=True)
            rows = []
            for case in selected:
                rows.append((case, measure(case, args, dtype, grad, gen)))
                print(row(*rows[-1], names, args, grad), flush=True)
            if args.busy:
                print("\n".join(busy_table(rows, names, grad, args.tuned)), flush=True)
            tally.extend(m for _, m in rows)
    print(
        f"\nwithin 1.1x of the fastest: {within(tally, 'picked')}"
        + (f"; tuned {within(tally, 'tuned')}" if args.tuned else "")
    )
    if args.busy:
        paired = [m["relative"][n] for m in tally for n in m["costs"]]
        print(
            f"one core busy: {sum(r <= 1.1 for r in paired)} of {len(paired)} backend cells slow no more than 1.1x "
            "unmasked SDPA's slowdown (paired by round)"
        )
        matched = [m["relative_matched"][n] for m in tally for n in m["costs"]]
        print(
            f"one core busy: {sum(r <= 1.1 for r in matched)} of {len(matched)} backend cells slow no more than 1.1x "
            "the slowdown of unmasked SDPA on a call of their duration (paired by round)"
        )
    print(f"load {_load()}; total {time.perf_counter() - t0:.0f} s")
    if args.length != 8192:
        print(QUICK_NOTE.format(length=args.length))
    print(
        "reproduce: PYTHONPATH=src python benchmarks/bench_limit.py "
        + shlex.join(sys.argv[1:] if argv is None else argv)
    )


# Printed under a table of other rows than the README's (rows of 8,192): ``attnmask bench --quick`` runs rows of 1,024.
QUICK_NOTE = (
    "note: the README's limit figures (rows within the bound, auto within 1.1x of the fastest) are for rows of 8,192 "
    "tokens, the issue's size; on rows of {length} the windows, chunks and documents shrink with the row, so a call's "
    "fixed costs and the traffic of its tensors weigh more against a small ideal and many rows pass their bound "
    "(RESULTS.md, issue 15); auto within 1.1x of the fastest should hold"
)


def within(measured: list[dict], which: str, factor: float = 1.1) -> str:
    """How many rows' ``which`` pick (``"picked"``: auto, ``"tuned"``) took at most ``factor`` x the fastest time."""
    good = 0
    for m in measured:
        timed = {n: m["med"]["idle", n] for n in m["costs"]}
        good += timed.get(m[which], math.inf) <= factor * min(timed.values())
    return f"{good} of {len(measured)} rows"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
