"""The "varlen" backend: each document (segment) of a packed or padded row runs through SDPA on its own.

Layer 3 (attention). For specs with a varlen form (``[causal | full] & [sliding_window] & document(...) &
[key_padding]``, or a padded batch): the spec is lowered to document segments once (``_common.varlen_plan``) and
``varlen_attention`` never builds a mask larger than one document. Attention dropout: SDPA's own ``dropout_p``.

Shapes: ``q`` ``(B, H, Q, D)``, ``k`` ``(B, Hkv, K, D)``, ``v`` ``(B, Hkv, K, Dv)`` with ``H % Hkv == 0``
(grouped-query attention: query head ``h`` reads key/value head ``h // (H // Hkv)``). Output ``(B, H, Q, Dv)`` in
``q.dtype``. A query row with no allowed key gives exactly 0 and a zero gradient.

Worked example, one packed row of 3 documents of lengths 2, 4, 3 (``doc_ids = [0, 0, 1, 1, 1, 1, 2, 2, 2]``),
causal inside each document::

    >>> segs = segments_from_varlen((causal() & document(seq_lens=[2, 4, 3])).varlen(9), 1, 9, 9)
    >>> segs.tolist()   # (row, q_start, q_len, k_start, k_len, offset)
    [[0, 0, 2, 0, 2, 0], [0, 2, 4, 2, 4, 0], [0, 6, 3, 6, 3, 0]]
    >>> q = k = v = torch.randn(1, 2, 9, 8)
    >>> varlen_attention(q, k, v, segs, causal=True).shape   # one SDPA per distinct document length
    torch.Size([1, 2, 9, 8])
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import torch
import torch.nn.functional as F

import attnmask.backends._workers as _workers
from attnmask._dense import fold, zero_rows
from attnmask.backends._clib import c_array
from attnmask.backends._clib import library as _library
from attnmask.backends._common import (
    CALL_COST,
    COPY_COST,
    HANDOVER_COSTS,
    SDPA_BLOCKS,
    SMALL_MATMUL_COST,
    ModeFactors,
    amx_pair_factor,
    built_exact_plan,
    check_qkv,
    check_segments,
    handover_cost,
    mode_factor,
    nan_rows_restored,
    off_cpu,
    pair_width,
    per_cpu_kind,
    rows_seeing_themselves,
    sdpa_pairs,
    segments_address,
    segments_from_varlen,
    varlen_plan,
    whole_row_rule,
)
from attnmask.backends._workers import (
    MIN_TASK_WORK,
    all_threads,
    graph_in,
    parallel_map,
    serial_steps,
    workers_active,
)
from attnmask.backends.contract import ALL_DTYPES, TORCH_DEVICES, Backend, check_dropout_p, rows_with_keys
from attnmask.errors import BackendError, ShapeError, bad
from attnmask.lowering import varlen_form

__all__ = ["BACKEND", "segments_from_varlen", "varlen_attention"]

# What a pair and a query row cost beyond their D + Dv (``_common.pair_width``) in a document SDPA runs and in a tiny
# one (batched matmuls, an unfused softmax), fitted by benchmarks/bench_head_dim.py --fit.
# The pair's per CPU kind (``_common.per_cpu_kind``: with AMX tiles, other), fitted on each CPU's own head-size
# tables: the Xeon's four (benchmarks/head_dim/s30_*.json, two runs at one and two threads) put 64 where the AMD
# EPYC's put 48 (RESULTS.md, issue 15, "Head sizes on the Xeon"); the tiny documents' width fits flat there.
_EXTRA_PAIR_WIDTHS = (64.0, 48.0)
_EXTRA_PAIR_WIDTH = per_cpu_kind(_EXTRA_PAIR_WIDTHS)
_EXTRA_SMALL_WIDTH = 128.0
_PAIR_COST = 1.0  # one multiply-add of a pair inside SDPA's blocked kernel: the unit every CPU estimate is in
# The same inside a call with a bool mask (a window's query block over its key band, _dense_segment): SDPA converts
# the mask and adds it to every head's scores. Measured, one thread, q (1, 4, 512, 64) against 1,023 keys: 13.98 ms
# with the window's mask, 11.83 ms without (benchmarks/RESULTS.md, issue 15, "varlen's window blocks").
_MASKED_PAIR_COST = 1.18
# SDPA's fixed work per query row and head (per element of D + Dv): short documents pay it. 40 until a grid on every
# saved table, each replayed on its CPU's kind (picks within 1.1x of the fastest): x1.3 / 1.4 / 1.5 / 1.6 / 2 read the
# AMD EPYC's 14 head-size tables 1250 / 1261 / 1258 / 1258 / 1247 of 1,344 (1236 at 40), its 25 limit tables 863 of 931
# throughout (857 at 2), the Xeon's 86 limit tables 3076 / 3076 / 3077 / 3070 of 3,389 (3076 at 40): `varlen` had been
# picked on packed rows of 256-1,024 where `native` or `blocksparse` ran faster (RESULTS.md, issue 15, "native's
# charges on the AMD EPYC").
_SDPA_ROW_COST = 56.0
_SMALL_ROW_COST = 130.0  # the tiny-document path's unfused softmax, masking and casts, per query row element and head
_SMALL_SEGMENT = 32  # varlen_attention's default: documents of at most this many keys go through batched matmuls
# Threads: the document groups (a long document's query blocks under a window) are tasks of ``_workers.parallel_map``,
# each added thread contributing this share of a core to their SDPA calls and products, and each task dealt to a worker
# costing ``_HANDOVER_COST`` more (its wake-up and GIL hand-overs); the per-call overhead and the copies run on one
# thread (``serial_steps``). The values of every backend dealing worker tasks (blocksparse's too), fitted with them:
# ``benchmarks/bench_limit.py --fit`` on the 1- and 2-thread tables limit_tables/omp_*.txt, rows of 1,024 and 8,192 at
# low load (RESULTS.md, "native's threads"; was 0.13, fitted under load on rows of 1,024 only). The hand-over is a
# fixed time in estimate units: the tasks weigh H·(D + Dv) a pair, the estimate a pair_width, equal at D = 64 where it
# was fitted; at D = 16 it had counted 1.7x too much (RESULTS.md, issue 15, "Hand-overs in the units of the tasks").
# The hand-over is this CPU's kind's (``_common.handover_cost``: 3.2e6 with AMX tiles, where it was fitted).
# The efficiency with AMX tiles 0.78: the Xeon's two-thread head-size tables (D = 16-128, rows of 256-1,024, 8,192
# tokens a batch) put varlen's picks on documents of ~400 and windows 1.2-1.4x behind blocksparse at 0.85; replayed,
# 0.78 put 2-3 more cells of each of its three float32 tables and one of each bfloat16 one within 1.1x of the fastest
# (342 -> 350 and 327 -> 330 with their 1K limit tables, which did not change; 0.74 and 0.82 lower; a fresh table
# timed after, 92 -> 93 of 96), and changed no pick in the Xeon's eight older two-thread 1K and seven 8K limit
# tables; on the AMD EPYC 0.78 changed nothing but one 8K bfloat16 cell (16 -> 15 of 16), so it keeps 0.85
# (RESULTS.md, issue 15, "varlen's threads on the Xeon").
_THREAD_EFFICIENCIES = (0.78, 0.85)
_THREAD_EFFICIENCY = per_cpu_kind(_THREAD_EFFICIENCIES)
_HANDOVER_COST = handover_cost()
# A bfloat16 pair of a document SDPA runs, in the backward's share of the estimate, per CPU kind: on the AMD EPYC
# (AVX512-BF16, no AMX tiles) a bfloat16 forward + backward of varlen took 2.0-2.1x / 1.6x its float32 time at D = 16
# / 32, ~1.0x at D = 64 and 0.8-0.95x at D = 128, the forward ~1.0x throughout (bench_head_dim.py --dtype bfloat16
# against float32, three pairs of tables): fitted by --fit on the sixteen head-size tables, 192 (median abs log error
# 0.135 -> 0.102; RESULTS.md, issue 15, "A fresh spec's plan"). With AMX tiles: 384, fitted on the Xeon's two bfloat16
# head-size tables with `sdpa`'s own bfloat16 backward width (median abs log error 0.169 -> 0.069; the picks of its
# three tables 264 -> 267 of 288 against 256; RESULTS.md, issue 15, "SDPA's bfloat16 backward at small heads";
# float32's width before, unmeasured).
_EXTRA_BF16_PAIR_WIDTHS = (384.0, 192.0)
_EXTRA_BF16_PAIR_WIDTH = per_cpu_kind(_EXTRA_BF16_PAIR_WIDTHS)
# The constants set by the CPU's kind (_common.per_cpu_kind).
CPU_KIND_VALUES = {
    "_HANDOVER_COST": HANDOVER_COSTS,
    "_THREAD_EFFICIENCY": _THREAD_EFFICIENCIES,
    "_EXTRA_PAIR_WIDTH": _EXTRA_PAIR_WIDTHS,
    "_EXTRA_BF16_PAIR_WIDTH": _EXTRA_BF16_PAIR_WIDTHS,
}
# Idle, groups of documents and a window's query blocks go to the workers from an eighth of ``MIN_TASK_WORK`` on
# average (tiny documents' groups, and any task while other processes hold cores, from ``MIN_TASK_WORK``): rows of
# 1,024 at 2 threads, same process, 9 rounds, two runs, forward / forward + backward in ms: few long documents
# [512, 256, 128, 128] 7.9-8.2 -> 6.9-7.1 / 22.4-25.2 -> 20.1-22.4 (the 256 and 128 groups ran one after the other on
# one core), window 128 7.7-11.1 -> 6.1-8.4 / 32.9-34.8 -> 30.8-31.0, window 128 + documents 11.0 -> 9.5 / 30.1 -> 28.7;
# the other rows within 5%, tiny documents too; with one core busy no change (RESULTS.md, issue 15, "varlen's idle
# tasks").
_IDLE_MIN_WORK = MIN_TASK_WORK / 8
# Other modes than a float32 forward (bfloat16, with a backward): ``bench_limit.py --fit ... --modes`` on the six 1K
# tables benchmarks/limit_tables/modes_*.txt (bf16 and bf16_backward: refitted on those and s13_q*_final.txt once
# documents got ``amx_pair_factor``, fitted with it on every document SDPA runs and kept with it on the unmasked ones
# only, which scored best on nine sets of 1K tables; RESULTS.md, issue 15, "varlen's documents on AMX tiles";
# bf16_backward 5.06 -> 4.24, the --modes fit on s15_q1_after.txt and s15_q2_after.txt, chosen by the deterministic
# replay of every saved set: 1487 -> 1491 rows within 1.1x, the same from 4.0 to 4.5; RESULTS.md, issue 15, "Fresh
# specs at two threads"); with a core taken (busy): ``--fit ... --busy-factors`` on busy_omp_q2.txt
# (RESULTS.md, issue 15, "bfloat16 and backward in the estimates", "Estimates that see a taken core"); bfloat16 on a
# CPU without AMX tiles (the _no_amx factors): --fit ... --modes on limit_tables/s9_q1.txt and s9_q2.txt, an AMD EPYC
# (RESULTS.md, issue 15, "bfloat16 on a CPU without AMX"). Its forward's busy factor by the call's size
# (``_common.BUSY_SMALL_WORK``): 1.03 for small calls (each document group a task on one intra-op thread, the free
# core taking the most), 1.55 for large ones, whose SDPA calls use every thread (measured 1.5-1.6 from 1e8
# multiply-adds; RESULTS.md, issue 15, "Busy factors by the call's size").
MODES = ModeFactors(
    bf16=1.16,
    backward=3.17,
    bf16_backward=4.24,
    busy=1.55,
    busy_backward=1.74,
    busy_small=1.03,
    bf16_no_amx=0.88,
    bf16_backward_no_amx=8.33,
)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: torch.Tensor,
    *,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    small: int = _SMALL_SEGMENT,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention where each segment (document) attends only within itself; query rows in no segment give 0.

    ``segments``: ``(N, 6)`` int ``(row, q_start, q_len, k_start, k_len, offset)`` as from ``segments_from_varlen``;
    query ranges must not overlap. Inside a segment, query ``i`` may attend to key ``j`` if ``causal`` is False, or if
    ``0 <= i + offset - j`` and, with a ``window``, ``i + offset - j < window`` (a window is inclusive of the query:
    ``window=1`` is the diagonal; it implies causal).

    How it runs, never building a mask larger than one document:

    - documents of ``small`` tokens or fewer are grouped by exact length, gathered once, and run as one batched
      (unfused) attention per group with one small ``(Lq, Lk)`` mask;
    - longer documents of equal shape are stacked into one SDPA call; causal uses ``is_causal=True`` when
      ``offset == 0`` (top-left equals bottom-right then), else a ``(q_len, k_len)`` mask of that document;
    - a window shorter than a document runs by query blocks over a key band (``O(q_len·(block + window))`` work).

    ``dropout_p``: attention dropout on each document's probabilities after the softmax (kept ones scaled by
    ``1 / (1 - p)``), by SDPA's own ``dropout_p`` or, for tiny documents, on the batched probabilities; a document's
    queries still read only its own keys, and rows with no allowed key stay exactly 0. Drawn from torch's global RNG.

    Memory: the inputs of stacked or grouped documents are copied once; the output is assembled with one ``cat`` per
    row, or (more than 64 segments) written once by row index. Forward and backward are autograd through SDPA.

    Threads: with more than one intra-op thread and no dropout, the groups (and a long document's query blocks) are
    tasks for ``backends._workers.parallel_map``, each run with one intra-op thread, so that a busy core slows the
    call as much as it slows one SDPA call, not once per small call; tasks averaging under ``MIN_TASK_WORK``
    multiply-adds (at H=4, D=64: documents under ~300 tokens, query blocks of windows under ~220) run in the caller,
    one after the other, and the gathers, masks and assembly run with one intra-op thread too (``serial_steps``):
    only an SDPA call too large to share opens a parallel region. The backward runs where ``backward`` is called,
    in the same kind of block (``_workers.graph_in``; not with dropout, which keeps plain autograd: differentiable
    twice).
    """
    rest = (segments, causal, window, scale, small, dropout_p)
    if dropout_p > 0:
        with serial_steps():  # gathers, masks and assembly with one intra-op thread; see _map for the SDPA calls
            return _varlen_attention(q, k, v, *rest)
    return graph_in(serial_steps, lambda q, k, v: _varlen_attention(q, k, v, *rest), q, k, v)


def _varlen_attention(q, k, v, segments, causal, window, scale, small, dropout_p) -> torch.Tensor:
    B, H, Q, D, Hkv, K = check_qkv(q, k, v)
    if D == 0:
        raise bad(ShapeError, "q", "a head dim >= 1 (SDPA takes no empty head)", f"shape {tuple(q.shape)}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise bad(BackendError, "window", "None or an int >= 1", repr(window))
    causal = causal or window is not None
    dropout_p = check_dropout_p(dropout_p)
    segs = check_segments(segments, q, k, v)
    scale = D**-0.5 if scale is None else float(scale)
    gqa = H != Hkv
    seg_list = [tuple(s) for s in segs.tolist()]

    results = []  # (output (n, H, q_len, Dv), the n segments it holds)
    groups: dict[tuple[int, int, int], list] = {}
    small_segs = []
    for seg in seg_list:
        if seg[2] > 0:
            (small_segs.append(seg) if seg[4] <= small else groups.setdefault((seg[2], seg[4], seg[5]), []).append(seg))
    # One task per group of stacked documents, dealt to single-threaded workers (see backends._workers); with dropout
    # in the caller, so that the probabilities drawn from the global RNG do not depend on the threads' timing.
    members_by_group = list(groups.values())
    per_pair = H * (D + v.shape[3])  # multiply-adds of one (query, key) pair, all heads
    weights = [seg[2] * seg[4] * len(members) * per_pair for members in members_by_group for seg in members[:1]]
    records_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if members_by_group and records_grad and dropout_p == 0 and workers_active(q.device.type):
        outs = _GroupsInWorkers.apply(members_by_group, weights, (causal, window, scale, gqa), q, k, v)
        results.extend(zip(outs, members_by_group, strict=True))
    elif members_by_group:
        big = [seg for members in members_by_group for seg in members]
        q_parts = _split_rows(q, [(seg[0], seg[1], seg[2]) for seg in big])
        k_parts, v_parts = (_split_rows(t, [(seg[0], seg[3], seg[4]) for seg in big]) for t in (k, v))

        def dense_group(members: list) -> tuple[torch.Tensor, list]:
            parts = ((q_parts, 1), (k_parts, 3), (v_parts, 3))
            qb, kb, vb = (_stack_segments(by_start, members, idx) for by_start, idx in parts)
            return _dense_segment(qb, kb, vb, members[0][5], causal, window, scale, gqa, dropout_p), members

        results.extend(_map(dense_group, members_by_group, weights, dropout_p, q.device.type))
    if small_segs:
        results.extend(_small_segments(q, k, v, small_segs, causal, window, scale, dropout_p))
    if not results:
        out = v.new_zeros(B, H, Q, v.shape[3])
    elif sum(len(m) for _, m in results) > 64:
        out = _assemble_by_index(q, v, results)
    else:
        out = _assemble(q, v, {(seg[0], seg[1]): piece for res, m in results for seg, piece in _per_segment(res, m)})
    if not results and any(t.requires_grad for t in (q, k, v)) and torch.is_grad_enabled():
        # No query sees any key: keep the zeros connected to the inputs so that their gradient is a defined 0.
        anchor = torch.stack([t.reshape(-1)[:1].sum() for t in (q, k, v)]).sum()
        out = out + torch.where(torch.ones((), dtype=torch.bool, device=out.device), 0.0, anchor)
    return out.to(q.dtype)


def _map(fn, items: list, weights: list, dropout_p: float, device_type: str, idle_min_work: float | None = None):
    """``[fn(item) for item in items]`` on the coarse-grained workers (``weights``: multiply-adds; tasks too small
    to hand over, under ``idle_min_work`` on average, ``MIN_TASK_WORK`` while other processes hold cores, run in the
    caller with one intra-op thread, one too large to share with all of them), or in the caller under dropout, each
    call with every intra-op thread."""
    if dropout_p > 0:
        with all_threads():
            return [fn(item) for item in items]
    least = _IDLE_MIN_WORK if idle_min_work is None else idle_min_work
    return parallel_map(_serially(fn), items, weights, device=device_type, min_work=least, busy_min_work=MIN_TASK_WORK)


def _serially(fn):
    """``fn`` with its small ops in a ``serial_steps`` block: a task that gets every intra-op thread (one too large to
    share) uses them only in its SDPA calls (``_sdpa``) and batched products (``_tiny_attention``)."""

    def run(item):
        with serial_steps():
            return fn(item)

    return run


_STARTS = (1, 3, 3)  # where q's, k's and v's range starts in a segment (row, q_start, q_len, k_start, k_len, offset)


def _segment_leaves(t: torch.Tensor, members: list, at: int) -> list[torch.Tensor]:
    """One detached view of ``t`` ``(B, H, L, X)`` per segment, requiring grad: positions ``seg[at]`` to
    ``seg[at] + seg[at + 1]`` of the segment's row, ``(1, H, n, X)`` (the leaves of one task's graph)."""
    return [t[s[0] : s[0] + 1, :, s[at] : s[at] + s[at + 1]].detach().requires_grad_() for s in members]


class _GroupsInWorkers(torch.autograd.Function):
    """The stacked document groups as worker tasks in the backward too (``varlen_attention`` with a gradient and no
    dropout): each task records its own graph, from its own leaves (detached views of q, k, v), in the worker that
    runs it; backward differentiates each task's graph in a worker and adds its leaves' gradients into dq, dk, dv,
    under a lock (documents may share keys). Outputs: one ``(n, H, q_len, Dv)`` tensor per group."""

    @staticmethod
    def forward(ctx, members_by_group, weights, rule, q, k, v):
        causal, window, scale, gqa = rule

        def task(members: list):
            with torch.enable_grad():
                leaves = tuple(_segment_leaves(t, members, at) for t, at in zip((q, k, v), _STARTS, strict=True))
                qb, kb, vb = (parts[0] if len(parts) == 1 else torch.cat(parts) for parts in leaves)
                return _dense_segment(qb, kb, vb, members[0][5], causal, window, scale, gqa), leaves

        least = {"min_work": _IDLE_MIN_WORK, "busy_min_work": MIN_TASK_WORK}
        ctx.done = parallel_map(_serially(task), members_by_group, weights, device=q.device.type, **least)
        ctx.members, ctx.weights = members_by_group, weights
        ctx.inputs = [(t.shape, t.dtype, t.device) for t in (q, k, v)]
        return tuple(out.detach() for out, _ in ctx.done)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):  # inside varlen_attention's graph_in: a serial_steps block
        d_inputs = [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.inputs]
        adding = threading.Lock()

        def task(i: int) -> None:
            out, leaves = ctx.done[i]
            flat = [x for parts in leaves for x in parts]
            # The task graphs live as long as this node (a second backward, retain_graph=True, may come).
            got = iter(torch.autograd.grad(out, flat, grads[i], retain_graph=True, allow_unused=True))
            with adding:
                for d, at in zip(d_inputs, _STARTS, strict=True):
                    for s in ctx.members[i]:
                        g = next(got)
                        if g is not None:
                            d[s[0] : s[0] + 1, :, s[at] : s[at] + s[at + 1]] += g

        device = d_inputs[0].device.type
        parallel_map(
            task, range(len(ctx.done)), ctx.weights, device=device, min_work=_IDLE_MIN_WORK, busy_min_work=MIN_TASK_WORK
        )
        return (None, None, None, *d_inputs)


def _split_rows(t: torch.Tensor, ranges: list) -> dict:
    """Views ``(1, H, n, D)`` of ``t`` ``(B, H, L, D)`` for ranges ``(row, start, n)``: ``{(row, start): view}``.

    The rows are cut with one ``split``, and a row whose ranges do not overlap with one more: a split's backward
    writes every piece's gradient into one tensor, where a slice's allocates a zero tensor of its whole source (one
    per row sliced: 8 of 8 MB per backward on rows of 8 x 1,024 at D = 64, half of that call's time at one thread);
    overlapping ranges are sliced from their row.
    """
    parts = {}
    rows = t.split(1, dim=0)
    for r in sorted({row for row, _, _ in ranges}):
        spans = sorted({(start, n) for row, start, n in ranges if row == r})
        row_t = rows[r]
        ends = [start + n for start, n in spans]
        if all(spans[i + 1][0] >= ends[i] for i in range(len(spans) - 1)):
            sizes, at, keep = [], 0, []
            for start, n in spans:
                if start > at:
                    sizes.append(start - at)
                keep.append(len(sizes))
                sizes.append(n)
                at = start + n
            if at < t.shape[2]:
                sizes.append(t.shape[2] - at)
            pieces = torch.split(row_t, sizes, dim=2)
            parts.update({(r, start): pieces[i] for (start, _), i in zip(spans, keep, strict=True)})
        else:
            parts.update({(r, start): row_t[:, :, start : start + n] for start, n in spans})
    return parts


def _stack_segments(parts: dict, members: list, idx: int) -> torch.Tensor:
    """Segments of one shape as a batch ``(n, H, L, D)``: a view for one segment, a copy for several."""
    views = [parts[(s[0], s[idx])] for s in members]
    return views[0] if len(views) == 1 else torch.cat(views)


def _products(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Multiply-adds of attention over stacked segments ``(n, H, Lq, D)`` (or heads-major ``(H, n, Lq, D)``) against
    ``Lk`` keys: what decides the threads of its one parallel region (``_workers.region_threads``)."""
    return q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * (q.shape[3] + v.shape[3])


def _sdpa(q, k, v, mask, is_causal, scale, gqa, dropout_p=0.0):
    with all_threads(_products(q, k, v)):  # all threads for a task too large to share, else one
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=gqa
        )
    # without a mask on few keys (documents under ``small`` keys go to _tiny_attention, unless ``small`` is lowered)
    return out if mask is not None else nan_rows_restored(out, q, k, is_causal, scale)


def _dense_segment(q, k, v, off, causal, window, scale, gqa, dropout_p=0.0):
    """Stacked segments of one shape: ``q`` ``(n, H, ql, D)``, ``k, v`` ``(n, Hkv, kl, D)``, same ``offset``."""
    ql, kl = q.shape[2], k.shape[2]
    if not causal:
        return _sdpa(q, k, v, None, False, scale, gqa, dropout_p)
    widest = ql - 1 + off  # largest i + offset - j over the segment (j = 0)
    if window is None or window > widest:
        if off == 0:
            return _sdpa(q, k, v, None, True, scale, gqa, dropout_p)
        return _masked_rows(q, k, v, _band_mask(0, ql, 0, kl, off, None, q.device), scale, gqa, dropout_p)
    # Window shorter than the document: query blocks over a key band, as tasks for the workers (one per block).
    block = _band_block(window)

    sees_itself = off >= 0 and ql + off <= kl  # every query's own position is a key of its band: no empty row
    starts = list(range(0, ql, block))
    bands = [_band(a, ql, kl, off, window) for a in starts]
    q_blocks = q.split(block, dim=2)
    k_bands, v_bands = (_Slices.apply(t, tuple((k0, max(k0, k1)) for _, k0, k1 in bands)) for t in (k, v))

    def band(i: int) -> torch.Tensor:
        a, (b_end, k0, k1) = starts[i], bands[i]
        if k1 <= k0:
            return v.new_zeros(q.shape[0], q.shape[1], b_end - a, v.shape[3])
        mask = _band_mask(a, b_end, k0, k1, off, window, q.device)
        qkv = q_blocks[i], k_bands[i], v_bands[i]
        if sees_itself:
            return _sdpa(*qkv, mask, False, scale, gqa, dropout_p)
        return _masked_rows(*qkv, mask, scale, gqa, dropout_p)

    per_pair = q.shape[0] * q.shape[1] * (q.shape[3] + v.shape[3])  # multiply-adds
    sizes = [per_pair * p for p in _band_sizes(ql, kl, off, window)]
    outs = _map(band, list(range(len(starts))), sizes, dropout_p, q.device.type)
    return torch.cat(outs, dim=2)


class _Slices(torch.autograd.Function):
    """Views ``t[:, :, a:b]`` of ``t`` ``(n, H, L, X)`` for each ``(a, b)`` of ``ranges`` (they may overlap: a window's
    key bands); the backward adds every view's gradient into one zero tensor of ``t``'s shape, where autograd's own
    slice backward allocates one per slice (16 of a 1,024-key row per backward under a window of 64: 21 of 33 ms at
    one thread)."""

    @staticmethod
    def forward(ctx, t, ranges):
        ctx.like, ctx.ranges = (t.shape, t.dtype, t.device), ranges
        return tuple(t[:, :, a:b] for a, b in ranges)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        shape, dtype, device = ctx.like
        grad = torch.zeros(shape, dtype=dtype, device=device)
        for (a, b), g in zip(ctx.ranges, grads, strict=True):
            if g is not None and b > a:
                grad[:, :, a:b] += g
        return grad, None


def _band_block(window: int) -> int:
    """Queries per block of ``_dense_segment``'s windowed path."""
    return max(window, 64)


def _band(a: int, q_len: int, k_len: int, off: int, window: int) -> tuple[int, int, int]:
    """``(end, k0, k1)`` of the query block starting at ``a`` under a window shorter than its segment: queries
    ``[a, end)`` (blocks of ``_band_block(window)``) against keys ``[k0, k1)``, every key some query of the block may
    see."""
    end = min(a + _band_block(window), q_len)
    return end, max(0, a + off - window + 1), min(k_len, end + off)


def _band_sizes(q_len: int, k_len: int, off: int, window: int) -> list[int]:
    """(query, key) pairs of each query block ``_dense_segment`` runs for a segment under a window shorter than it
    (``_band``), in order: the first blocks' bands are shorter (fewer keys precede them)."""
    sizes = []
    for a in range(0, q_len, _band_block(window)):
        end, k0, k1 = _band(a, q_len, k_len, off, window)
        sizes.append((end - a) * max(0, k1 - k0))
    return sizes


def band_pairs(q_len: int, k_len: int, off: int, window: int) -> int:
    """(query, key) pairs ``_dense_segment`` computes for a segment under a window shorter than it: the masked SDPA
    call of each query block reads its whole key band (``_band``). Example: 8,192 queries under a window of 4,096,
    blocks of 4,096: ``4096·4096 + 4096·8191`` pairs, not the 4,096·8,192 of a causal half."""
    return sum(_band_sizes(q_len, k_len, off, window))


def _band_mask(q0, q1, k0, k1, off, window, device):
    """``(q1 - q0, k1 - k0)`` bool: ``0 <= i + off - j (< window)`` for segment query ``i`` and key ``j``: the
    diagonals ``c - window < j' - i' <= c`` (``c = q0 + off - k0``, block-local indices) of a block of ones, two
    triangle passes over it (5x cheaper than comparing index differences: 0.2 against 1.1 ms at 512 x 1,023)."""
    c = q0 + off - k0
    mask = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=device).tril_(c)
    return mask if window is None else mask.triu_(c - window + 1)


def _masked_rows(q, k, v, mask, scale, gqa, dropout_p=0.0):
    """SDPA with a bool mask ``(..., Lq, Lk)``; rows with no allowed key are set to exactly 0.

    Such rows attend to every key inside the kernel (finite on every device), then are zeroed: their gradient is 0.
    """
    empty = ~rows_with_keys(mask)
    if not bool(empty.any()):
        return _sdpa(q, k, v, mask, False, scale, gqa, dropout_p)
    return zero_rows(_sdpa(q, k, v, fold(torch.logical_or, [mask, empty]), False, scale, gqa, dropout_p), empty)


def _small_segments(q, k, v, segs, causal, window, scale, dropout_p=0.0) -> list:
    """Tiny documents, grouped by exact shape ``(q_len, k_len, offset)`` (at most a few dozen groups): one gather per
    tensor and one batched attention per group, computed in a heads-major layout ``(H, n, L, D)`` without copies.

    Returns ``[(output (n, H, q_len, Dv), the group's n segments)]``.
    """
    dev = q.device
    groups: dict[tuple[int, int, int], list] = {}
    for seg in segs:
        groups.setdefault((seg[2], seg[4], seg[5]), []).append(seg)
    members_by_group = list(groups.values())
    # Every group's rows in one gather per tensor, then split into the groups: the backward of a gather allocates a
    # zero tensor of its whole source, once here instead of once per group (a few dozen groups of 16 rows of 512:
    # hundreds of MB of fresh pages per backward).
    q_idx, k_idx = [], []
    for members in members_by_group:
        _, ql, _, kl, _ = members[0][1:]
        row, qs, _, ks, _, _ = torch.tensor(members, dtype=torch.long, device=dev).unbind(1)
        q_idx.append(((row * q.shape[2] + qs)[:, None] + torch.arange(ql, device=dev)).reshape(-1))
        k_idx.append(((row * k.shape[2] + ks)[:, None] + torch.arange(kl, device=dev)).reshape(-1))
    q_sizes, k_sizes = [len(i) for i in q_idx], [len(i) for i in k_idx]
    q_parts = _heads_major_rows(q, torch.cat(q_idx)).split(q_sizes, dim=1)
    k_at = torch.cat(k_idx)
    k_parts, v_parts = (_heads_major_rows(t, k_at).split(k_sizes, dim=1) for t in (k, v))

    def tiny_group(i: int) -> tuple[torch.Tensor, list]:
        members = members_by_group[i]
        _, ql, _, kl, off = members[0][1:]
        qb, kb, vb = (parts[i].unflatten(1, (len(members), -1)) for parts in (q_parts, k_parts, v_parts))
        mask = _band_mask(0, ql, 0, kl, off, window, dev) if causal else None
        return _tiny_attention(qb, kb, vb, mask, scale, dropout_p).transpose(0, 1), members

    per_pair = q.shape[1] * (q.shape[3] + v.shape[3])
    weights = [len(members) * (members[0][2] + 8) * members[0][4] * per_pair for members in members_by_group]
    groups_at = list(range(len(members_by_group)))
    return _map(tiny_group, groups_at, weights, dropout_p, dev.type, idle_min_work=MIN_TASK_WORK)


def _heads_major_rows(t: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """``(H, N, X)``: the tokens ``at`` ``(N,)`` (flat indices ``row · L + position``) of ``t`` ``(B, H, L, X)``, heads
    first (a view of one ``(N, H, X)`` gather). Reads only those ``N`` tokens: a heads-major copy of the whole of
    ``t`` to index it cost 3-4 ms a call on rows of 8 x 1,024 at D = 64 for a few dozen tiny documents."""
    if t.shape[0] == 1:
        return t[0].index_select(1, at)
    length = t.shape[2]
    return t[at // length, :, at % length].transpose(0, 1)


def _tiny_attention(q, k, v, mask, scale, dropout_p=0.0):
    """Unfused attention for tiny documents (a fused kernel's per-call overhead dominates there), heads-major.

    ``q`` ``(H, n, Lq, D)``, ``k, v`` ``(Hkv, n, Lk, ·)``, ``mask`` ``(Lq, Lk)`` bool or None; rows with no allowed
    key give 0; ``dropout_p > 0`` drops probabilities (zeros stay 0). Low precision is computed in float32, float64
    in float64.
    Memory ``O(H·n·Lq·Lk)``: used for documents of few tokens.
    """
    with all_threads(_products(q, k, v)):  # a handful of batched ops, each as large as the group
        return _tiny_products(q, k, v, mask, scale, dropout_p)


def _tiny_products(q, k, v, mask, scale, dropout_p):
    H, Hkv = q.shape[0], k.shape[0]
    work = torch.promote_types(q.dtype, torch.float32)  # float64 stays float64
    qh = q.unflatten(0, (Hkv, H // Hkv))  # (Hkv, rep, n, Lq, D): query head h reads key head h // rep
    s = torch.matmul(qh.to(work), k.to(work).unsqueeze(1).transpose(-1, -2)) * scale
    if mask is not None:
        has_key = mask.any(-1, keepdim=True)
        s = s.masked_fill(~(mask | ~has_key), float("-inf"))
    p = torch.softmax(s, dim=-1)
    if mask is not None and not bool(has_key.all()):
        p = p.masked_fill(~has_key, 0.0)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return torch.matmul(p, v.to(work).unsqueeze(1)).flatten(0, 1).to(v.dtype)


def _per_segment(res: torch.Tensor, members: list) -> list[tuple[tuple, torch.Tensor]]:
    """``(segment, its output (H, q_len, Dv))`` for each of a group's ``members``, views of ``res`` ``(n, H, L, Dv)``
    by one ``unbind``: its backward stacks the pieces' gradients into one tensor, where indexing each segment
    allocated a zero tensor of the whole group per segment (64 documents of 128 tokens in one group: 64 of 8 MB per
    backward)."""
    rows = res.unbind(0)
    return [(seg, row if row.shape[1] == seg[2] else row[:, : seg[2]]) for seg, row in zip(members, rows, strict=True)]


def _assemble(q: torch.Tensor, v: torch.Tensor, pieces: dict) -> torch.Tensor:
    """Concatenate segment outputs ``{(row, q_start): (H, q_len, Dv)}`` along the query axis per row, zeros in the
    gaps: ``(B, H, Q, Dv)``. Few segments: one ``cat`` per row, no scatter."""
    B, H, Q, Dv = q.shape[:3] + v.shape[3:]
    rows = []
    for r in range(B):
        parts, at = [], 0
        for _, qs in sorted(key for key in pieces if key[0] == r):
            piece = pieces[(r, qs)]
            if qs > at:
                parts.append(v.new_zeros(H, qs - at, Dv))
            parts.append(piece)
            at = qs + piece.shape[1]
        if at < Q:
            parts.append(v.new_zeros(H, Q - at, Dv))
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return torch.stack(rows) if B > 1 else rows[0].unsqueeze(0)


def _assemble_by_index(q: torch.Tensor, v: torch.Tensor, results: list) -> torch.Tensor:
    """Many segments: every group's output written once into the ``(B, H, Q, Dv)`` result by row index.

    The result is the only allocation of its size (fresh large allocations cost page faults); the backward pass
    gathers each group's gradient rows back with ``index_select``.
    """
    B, H, Q, Dv = q.shape[:3] + v.shape[3:]
    dev = q.device
    indices, sources = [], []
    for res, members in results:
        n, _, lq, _ = res.shape
        row, qs = torch.tensor(members, dtype=torch.long, device=dev)[:, :2].unbind(1)
        indices.append(((row * Q + qs)[:, None] + torch.arange(lq, device=dev)).reshape(-1))
        sources.append(res.transpose(0, 1).reshape(H, n * lq, Dv))
    return _ScatterRows.apply((H, B, Q, Dv), indices, *sources)


class _ScatterRows(torch.autograd.Function):
    """``out[:, idx_i] = src_i`` on a heads-major zero tensor ``(H, B·Q, Dv)``, returned as ``(B, H, Q, Dv)``."""

    @staticmethod
    def forward(ctx, shape, indices, *sources):
        H, B, Q, Dv = shape
        out = sources[0].new_zeros(H, B * Q, Dv)
        for idx, src in zip(indices, sources, strict=True):
            out.index_copy_(1, idx, src)
        ctx.indices, ctx.shape = indices, shape
        return out.view(H, B, Q, Dv).transpose(0, 1)

    @staticmethod
    def backward(ctx, grad):
        H, B, Q, Dv = ctx.shape
        # One contiguous copy at most: index_select makes its source contiguous on every call, and a gradient that
        # broadcasts (``out.sum().backward()``: stride 0) would be copied whole once per group (77 groups of 16 rows
        # of 512: 620 MB of fresh pages per backward, 0.1-1.4 s).
        flat = grad.transpose(0, 1).reshape(H, B * Q, Dv).contiguous()
        return (None, None, *(flat.index_select(1, idx) for idx in ctx.indices))


def unsupported(call) -> str | None:
    if call.head_dim == 0:
        return "needs a head dim >= 1 (SDPA takes no empty head)"
    plan = varlen_plan(call)
    return plan if isinstance(plan, str) else None


def cost(call) -> float:
    """Pairs SDPA computes (its CPU kernel's key blocks included) and a charge per query row for the documents SDPA
    runs, or per small matrix product and query row for tiny documents (see ``_SMALL_SEGMENT``), divided by what
    ``_workers.threads_available()`` threads gain on the tasks ``varlen_attention`` makes of them (``_task_weights``);
    then, on one thread, a charge per SDPA call and per element copied (stacked inputs, the assembled output)."""
    if off_cpu(call):
        return float("inf")
    plan = varlen_plan(call)
    segs = plan.segments
    if not len(segs):
        return CALL_COST
    if whole_row_rule(call) is not None:
        return float("inf")  # one whole row a segment: what "sdpa" runs as is_causal or unmasked, without the lowering
    s = segs.numpy()  # per segment in numpy on this view: ~30 torch calls on a few dozen segments took ~0.4 ms right
    # after an attention kernel (a fresh spec's choice on rows of 512, bench_small_rows.py --length 512)
    if varlen_form(call.mask).chunked is not None:
        # Chunks as segments (one stacked SDPA call of many short rows): this estimate put them first, measured
        # 1.6-1.7x slower than "native" on the same segments (rows of 1K, chunks of 128, 2 threads, forward and
        # forward + backward) and 1.05x "blocksparse" on rows of 8K (chunks of 1,024): served when named, not by
        # "auto" until the estimate is calibrated on such rows (RESULTS.md, issue 15, "Chunks as segments").
        return float("inf")
    ql, kl = s[:, 2].astype(np.float64), s[:, 4].astype(np.float64)
    shapes = s[:, [2, 4, 5]].tolist()  # (q_len, k_len, offset) per segment
    pairs = sdpa_pairs(ql, kl, plan.causal)
    if plan.window is not None:
        pairs = np.minimum(pairs, ql * plan.window * 2)
    if plan.window is not None and plan.causal:
        # Windows shorter than their document run as query blocks over key bands (band_pairs): at least those pairs.
        # Below ql·2w (small windows) the bound is kept: the exact count alone moved rows of 1,024 under windows of 128
        # to varlen, measured 1.1-1.9x slower there (its per-block masks and calls are not in the estimate); above it
        # (a window of 4,096 on 8,192 tokens: 2x the causal half) the band is what runs.
        windowed = {(q, k, o) for q, k, o in shapes if plan.window <= q - 1 + o}
        banded = {shape: band_pairs(*shape, plan.window) for shape in windowed}
        rows = zip(shapes, pairs.tolist(), strict=True)
        pairs = np.array([max(banded.get(tuple(shape), 0), p) for shape, p in rows], dtype=np.float64)
        masked = np.array([tuple(shape) in banded for shape in shapes], dtype=bool)
        blocks = sum(-(-q // _band_block(plan.window)) - 1 for q, _, _ in windowed)  # calls beyond one per group
    else:
        masked, blocks = np.zeros(len(shapes), dtype=bool), 0
    calls = len({tuple(shape) for shape in shapes}) + blocks
    priced = (segs, s, pairs, masked, ql, calls)
    factor = mode_factor(MODES, call)
    estimate = _priced(call, plan, priced, _charged_widths(call.head_dim + call.value_dim))
    if not _bf16_backward_width(call):
        return estimate * factor
    # bfloat16 with a backward: the forward's share at float32's widths, the backward's at the bfloat16 pair width
    forward = mode_factor(MODES, call, forward=True)
    backward = _priced(call, plan, priced, _charged_widths(call.head_dim + call.value_dim, torch.bfloat16))
    return estimate * forward + backward * (factor - forward)


def _bf16_backward_width(call) -> bool:
    """Whether the call's backward is charged at the bfloat16 pair width (``_EXTRA_BF16_PAIR_WIDTH``, where it differs
    from float32's): bfloat16 with a gradient, no dropout."""
    return (
        call.q.dtype == torch.bfloat16
        and call.needs_grad
        and not call.dropout_p
        and _EXTRA_BF16_PAIR_WIDTH != _EXTRA_PAIR_WIDTH
    )


def _priced(call, plan, priced: tuple, widths: tuple[float, float]) -> float:
    """``cost``'s estimate of the segments before the mode factor, with tiny documents' pairs and rows charged at
    ``widths[0]`` and SDPA's at ``widths[1]`` (``_charged_widths``)."""
    segs, s, pairs, masked, ql, calls = priced
    width = call.head_dim + call.value_dim
    small = s[:, 4] <= _SMALL_SEGMENT  # gathered (q, k, v) and scattered back (output); two matmuls per head
    small_width, sdpa_width = widths  # a pair's and a row's width (as the floor's)
    charged = np.where(small, small_width, sdpa_width)
    per_seg = pairs * call.heads * charged * np.where(masked, _MASKED_PAIR_COST, _PAIR_COST)
    if (amx := amx_pair_factor(call)) != 1.0:
        per_seg[~small & ~masked] *= amx  # documents in one fused SDPA call (not tiny ones: matmuls)
    per_seg += np.where(small, _SMALL_ROW_COST, _SDPA_ROW_COST) * ql * call.heads * charged
    per_seg += small * (2.0 * call.heads * SMALL_MATMUL_COST)
    tokens = (s[:, 2] * call.heads + s[:, 4] * call.kv_heads).astype(np.float64) * width
    serial = float(tokens.sum()) * COPY_COST + calls * CALL_COST
    threads = _workers.threads_available()
    if call.dropout_p > 0:  # every call in the caller, split across every thread (_map)
        gain = _workers.expected_speedup([1.0], threads, 0.0, _THREAD_EFFICIENCY)
        return serial + float(per_seg.sum()) / gain
    big_gain = tiny_gain = 1.0  # one thread: no tasks to weigh
    if threads > 1:
        big_tasks, tiny_tasks = _task_weights(segs.tolist(), plan.window, call.heads * width)
        big_min = MIN_TASK_WORK if _workers.contended() else _IDLE_MIN_WORK  # as parallel_map's busy_min_work
        # The tasks weigh H·(D + Dv) a pair (what parallel_map reads), the estimate charges a pair its pair_width: a
        # hand-over (a fixed time, in estimate units) weighs width / charged width of a task's units.
        big_gain, tiny_gain = (
            _workers.expected_speedup(
                tasks, threads, least, _THREAD_EFFICIENCY, handover=_HANDOVER_COST * width / charged_width
            )
            for tasks, least, charged_width in (
                (big_tasks, big_min, sdpa_width),
                (tiny_tasks, MIN_TASK_WORK, small_width),
            )
        )
    return serial + float(per_seg[~small].sum()) / big_gain + float(per_seg[small].sum()) / tiny_gain


def floor(call) -> float:
    """A lower bound of ``cost`` (``Backend.floor``). From a plan already built (``_common.built_exact_plan``:
    ``"native"`` builds varlen's, and where varlen refuses its own, whose bound then only decides whether varlen is
    asked why): ``cost``'s charges
    per segment (its rows, its tiny-document products, its copies, one call at least) with SDPA's pairs before the
    band's and each pair at the cheapest charge it may take, all divided by the most the threads gain (no deal is
    weighed). Without one, from the query rows certain to see a key (``_common.rows_seeing_themselves``): each such
    row and its own key lie in a segment, so each is copied at least once and charged at least the cheaper row
    charge. 0 where neither is known. O(N) on the segments' view, or O(B·K) on host views."""
    width = call.head_dim + call.value_dim
    widths = _charged_widths(width)
    if _bf16_backward_width(call):  # cost charges the backward's share at the bfloat16 widths: the smaller bounds both
        widths = tuple(map(min, widths, _charged_widths(width, torch.bfloat16)))
    small_width, sdpa_width = widths
    gain = _workers.speedup_bound(_workers.threads_available(), _THREAD_EFFICIENCY)
    built = built_exact_plan(call)
    if built is None:
        rows = rows_seeing_themselves(call)
        if rows == 0:
            return 0.0
        serial = rows * (call.heads + call.kv_heads) * width * COPY_COST + CALL_COST
        row_work = rows * call.heads * min(_SMALL_ROW_COST * small_width, _SDPA_ROW_COST * sdpa_width)
        return (serial + row_work / gain) * mode_factor(MODES, call)
    if not built.segments.shape[0]:
        return 0.0
    tiny_pairs, pairs, tiny_rows, rows, tiny, all_rows, keys = _floor_sums(built)
    tiny_work = (tiny_pairs * min(_PAIR_COST, _MASKED_PAIR_COST) + tiny_rows * _SMALL_ROW_COST) * small_width
    sdpa_pair = min(_PAIR_COST * amx_pair_factor(call), _MASKED_PAIR_COST)
    work = (tiny_work + (pairs * sdpa_pair + rows * _SDPA_ROW_COST) * sdpa_width) * call.heads
    work += tiny * 2 * call.heads * SMALL_MATMUL_COST
    tokens = (all_rows * call.heads + keys * call.kv_heads) * width
    return float(tokens * COPY_COST + CALL_COST + work / gain) * mode_factor(MODES, call)


def _floor_sums(plan) -> tuple[float, ...]:
    """What ``floor`` charges of a varlen plan's segments, summed per class: the pairs torch's SDPA kernel computes
    (``sdpa_pairs``, at most two windows a query under a window) in the tiny documents (at most ``_SMALL_SEGMENT``
    keys) and in the others, their query rows likewise, the tiny documents' count, and every segment's query rows
    and keys. One pass in C (``attnmask_varlen_floor_sums``: ~2 us on 106 segments, where the numpy form below, ~20
    operations, took ~25 us), or that form where the kernel is not built."""
    lib = _library()
    if isinstance(lib, str):
        return _floor_sums_numpy(plan)
    address, _held = segments_address(plan.segments)
    out = c_array(ctypes.c_double, 7)
    window = -1 if plan.window is None else plan.window
    n = plan.segments.shape[0]
    lib.attnmask_varlen_floor_sums(address, n, int(plan.causal), window, _SMALL_SEGMENT, *SDPA_BLOCKS, out)
    return tuple(out[:7])


def _floor_sums_numpy(plan) -> tuple[float, ...]:
    """:func:`_floor_sums` in numpy, on the segments' view."""
    s = plan.segments.numpy()
    ql, kl = s[:, 2].astype(np.float64), s[:, 4].astype(np.float64)
    pairs = sdpa_pairs(ql, kl, plan.causal)
    if plan.window is not None:
        pairs = np.minimum(pairs, ql * plan.window * 2)
    tiny = kl <= _SMALL_SEGMENT
    sums = (pairs[tiny].sum(), pairs[~tiny].sum(), ql[tiny].sum(), ql[~tiny].sum(), tiny.sum(), ql.sum(), kl.sum())
    return tuple(float(x) for x in sums)


def _charged_widths(width: int, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """The widths (``_common.pair_width`` of ``D + Dv``) a pair and a query row are charged at in a tiny document (the
    batched matmuls) and in a document SDPA runs (a bfloat16 backward's at ``_EXTRA_BF16_PAIR_WIDTH``)."""
    extra = _EXTRA_BF16_PAIR_WIDTH if dtype == torch.bfloat16 else _EXTRA_PAIR_WIDTH
    return pair_width(width, _EXTRA_SMALL_WIDTH), pair_width(width, extra)


def _task_weights(segs: list, window: int | None, per_pair: int) -> tuple[list[float], list[float]]:
    """The weights ``varlen_attention`` gives ``parallel_map`` (multiply-adds): one per group of stacked documents,
    or, for a single group under a window shorter than its documents that runs with every thread, one per query
    block; and one per group of tiny documents (at most ``_SMALL_SEGMENT`` keys). ``per_pair``: ``H·(D + Dv)``."""
    big: dict[tuple, int] = {}
    tiny: dict[tuple, int] = {}
    for _, _, q_len, _, k_len, off in segs:
        if q_len > 0:
            into = tiny if k_len <= _SMALL_SEGMENT else big
            into[q_len, k_len, off] = into.get((q_len, k_len, off), 0) + 1
    big_weights = [q * k * n * per_pair for (q, k, _), n in big.items()]
    tiny_weights = [n * (q + 8) * k * per_pair for (q, k, _), n in tiny.items()]
    if len(big) == 1 and big_weights[0] >= MIN_TASK_WORK:
        (q_len, k_len, off), n = next(iter(big.items()))
        if window is not None and window <= q_len - 1 + off:  # _dense_segment's query blocks over a key band
            big_weights = [n * per_pair * p for p in _band_sizes(q_len, k_len, off, window)]
    return big_weights, tiny_weights


def run(call) -> torch.Tensor:
    plan = varlen_plan(call)
    return varlen_attention(
        call.q,
        call.k,
        call.v,
        plan.segments,
        causal=plan.causal,
        window=plan.window,
        scale=call.scale,
        dropout_p=call.dropout_p,
    )


BACKEND = Backend(
    "varlen",
    run,
    cost,
    devices=TORCH_DEVICES,
    dtypes=ALL_DTYPES,
    masks=frozenset({"structural"}),
    dropout=True,
    unsupported=unsupported,
    propagates_nonfinite=frozenset({"cpu"}),  # checked by tests/test_conformance.py
    floor=floor,
)
