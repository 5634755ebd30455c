"""The "blocksparse" backend: attention tile by tile over a block layout, never building a dense ``(Q, K)`` mask.

Layer 3 (attention). The spec is laid out once per call signature (``attnmask.lowering.block_layout``: FULL, PARTIAL
and NONE tiles by interval arithmetic); NONE tiles are skipped, FULL tiles run unmasked, PARTIAL tiles with the
spec evaluated on just their pairs. Online softmax over key chunks, a custom backward that recomputes from the saved
log-sum-exp. Any structural or ``custom`` spec; no attention dropout (declared).

Shapes: ``q`` ``(B, H, Q, D)``, ``k`` ``(B, Hkv, K, D)``, ``v`` ``(B, Hkv, K, Dv)``, ``H % Hkv == 0``; output
``(B, H, Q, Dv)`` in ``q.dtype``; a query row with no allowed key gives exactly 0 and a zero gradient.

Worked example: ``(causal() & document(seq_lens=[32, 32])).block_layout(64, block_size=16)`` has 4 query tiles;
tile 2 (queries 32-47) reads key tile 2 only (PARTIAL, the diagonal) and skips tiles 0-1 (NONE, another document).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import attnmask.backends._clib as _clib
import attnmask.backends._workers as _workers
from attnmask import masks as M
from attnmask._dense import zero_query_rows
from attnmask.backends._common import (
    HANDOVER_COSTS,
    ModeFactors,
    built_exact_plan,
    cached,
    cheap_varlen_plan,
    check_qkv,
    degenerate,
    diagonal_pairs_seeing_themselves,
    handover_cost,
    mode_factor,
    nan_rows_restored_lse,
    off_cpu,
    padded_tile_pairs,
    pair_width,
    per_cpu_kind,
    segments_address,
    unit_stride,
)
from attnmask.backends._workers import MIN_TASK_WORK, on_free_cores, parallel_map
from attnmask.backends.contract import ALL_DTYPES, TORCH_DEVICES, Backend
from attnmask.errors import ShapeError, bad
from attnmask.lowering import BlockLayout, block_layout
from attnmask.tiles import NONE, PARTIAL

__all__ = ["BACKEND", "MAX_KEYS", "MAX_ROWS", "blocksparse_attention", "cover", "run_layout", "spec_tile_mask"]

TileMask = Callable[[int, int, int, int, int], torch.Tensor]
_PAIR_COST = 1.3  # one multiply-add of a pair of a FULL or PARTIAL tile (tile-sized matmuls, online softmax)
_MASK_COST = 40.0  # evaluating a spec on one (query, key) pair of a PARTIAL tile
# What a pair costs beyond its D + Dv (``_common.pair_width``: the tiles' softmax and bookkeeping, as in sdpa's kernel,
# which runs them): fitted by benchmarks/bench_head_dim.py --fit on the fifteen head-size tables (median abs log error
# 0.137 -> 0.060); with it the threads' hand-over weighs the tasks' multiply-adds at the charged width (as varlen's).
# Per CPU kind (``_common.per_cpu_kind``: with AMX tiles, other): fitted on each CPU's own head-size tables; the
# Xeon's four (benchmarks/head_dim/s30_*.json, two runs at one and two threads) put 0-16 (median abs log error 0.073 /
# 0.076 / 0.074 at 0 / 8 / 16, 0.112 at 48) where the AMD EPYC's put 48 (RESULTS.md, issue 15, "Head sizes on the
# Xeon"): 16, a pair's softmax still costs something beyond its width.
_EXTRA_PAIR_WIDTHS = (16.0, 48.0)
_EXTRA_PAIR_WIDTH = per_cpu_kind(_EXTRA_PAIR_WIDTHS)
# One query tile's fixed work (its group's views, a kernel call per run, the copies into place: Python and dispatch):
# per table the median over float32 forward rows of (measured time - the rest of the estimate) / query tiles, in sdpa's
# unit: ``benchmarks/bench_limit.py --fit ... --implied blocksparse._GROUP_COST`` on benchmarks/limit_tables/
# s12_q1_fwd.txt, s12_small_256_1.txt, s12_small_512_1.txt (one thread: 3.1e6, 4.4e6, 3.2e6), s12_q2.txt and
# s13_q2.txt (two threads: 1.5e6, 3.1e6). The two-thread tables agree with the one-thread ones once the estimate deals
# a stack's pieces, not its groups (``_task_weights``; dealt group by group they implied 2e5-2.6e5). Their median,
# 3.0e6, moved three small-row picks, one to a backend measured 1.29x slower (window 128 on rows of 256, forward +
# backward, one thread); 4e6, inside the one-thread tables' range, moves none. RESULTS.md, issue 15, "The estimate
# deals blocksparse's stacks as pieces".
# Per CPU kind (``_common.per_cpu_kind``: with AMX tiles, other), with a charge per call (``_CALL_COST``: the plan's
# look-up, the deal, the output; once a call, not per tile): the Xeon's tables (B = 1-2 rows a call, few tiles) fit
# 4e6 and no call charge best, which they cannot tell apart; on the AMD EPYC a blocksparse call of 4 tiles (B = 1,
# 256 tokens) takes 0.7 ms, 2.5x the estimate without one, and on its head-size tables (batches of 8-32 rows, up to
# 512 tiles a call) the tiles imply 0.5-2.7e6 each (median 1.5e6). A grid over both on every saved table (``auto``'s
# picks within 1.1x of the fastest): the EPYC's 1K / 8K limit tables 668 -> 682 of 739 at (2e6, 2e7), its head-size
# tables 368 -> 420 of 480; the same values on the Xeon's tables lost 20 of 3,389 (RESULTS.md, issue 15, "A charge
# per blocksparse call").
_GROUP_COSTS = (4e6, 2e6)
_CALL_COSTS = (0.0, 2e7)
_GROUP_COST = per_cpu_kind(_GROUP_COSTS)
_CALL_COST = per_cpu_kind(_CALL_COSTS)
# With a gradient the backward runs the groups once more (one kernel call, one copy each), so these two charges grow
# by this share of what the backward factor (``MODES``) adds to the forward's, not by all of it
# (``_overhead_factor``); per CPU kind, as the charges. The Xeon's tables fit the whole factor (a share of 0.7 / 0.5
# / 0.3 there: 3076 -> 3066 / 3053 / 3008 of 3,389 rows within 1.1x of the fastest); on the AMD EPYC a share of 0.4:
# its limit tables 803 -> 806 of 867, its eight head-size tables 653 -> 670 of 768 (0.3: 804, 673; 0.5: 806, 664;
# RESULTS.md, issue 15, "A charge per blocksparse call").
_BACKWARD_OVERHEAD_SHARES = (1.0, 0.4)
_BACKWARD_OVERHEAD_SHARE = per_cpu_kind(_BACKWARD_OVERHEAD_SHARES)
# A query group's backward costs at least what this many rows' pairs cost (fewer rows, as in a decoding step with a
# gradient, still zero, accumulate and write the gradients of every key the group reads, and read its keys and
# values in the kernel's passes): the last query tile of a call with a gradient is charged at least these rows (at
# most the tile's). Per forward + backward decoding row (1, 8 and 16 queries against 4,096 or 32,768 keys) of every
# saved table in benchmarks/limit_tables, the rows that make the estimate equal the measured time in the table's
# unit: float32 median 45 (quartiles 35-55, 177 cells, both CPUs, 1 and 2 threads), bfloat16 64 (52-78, 141 cells).
# Counted with its own rows, a decoding step with a gradient was estimated 3.2-9.8x under its time (quartiles of those
# float32 cells; RESULTS.md, issue 15, "Decoding steps in blocksparse's estimate").
_BACKWARD_ROWS = 45
# Threads: the query groups are tasks of ``_workers.parallel_map`` (no ``min_work``), each added thread contributing
# this share of a core to their pairs and masks, and each group dealt to a worker costing ``_HANDOVER_COST`` more (its
# wake-up and GIL hand-overs); the per-group charge (Python, dispatch) counts on one thread. The values of every backend
# dealing worker tasks (varlen's too), fitted with them: ``benchmarks/bench_limit.py --fit`` on the 1- and 2-thread
# tables limit_tables/omp_*.txt (RESULTS.md, "native's threads"; was 0.13). The hand-over is this CPU's kind's
# (``_common.handover_cost``: 3.2e6 with AMX tiles, where it was fitted; 2.6e5 otherwise, as
# ``benchmarks/bench_handover.py`` timed it on an AMD EPYC; RESULTS.md, issue 15, "What a dealt task costs").
_THREAD_EFFICIENCY = 0.85
_HANDOVER_COST = handover_cost()
# Every constant above set by the CPU's kind, with its values (``_common.per_cpu_kind``).
CPU_KIND_VALUES = {
    "_HANDOVER_COST": HANDOVER_COSTS,
    "_GROUP_COST": _GROUP_COSTS,
    "_CALL_COST": _CALL_COSTS,
    "_BACKWARD_OVERHEAD_SHARE": _BACKWARD_OVERHEAD_SHARES,
    "_EXTRA_PAIR_WIDTH": _EXTRA_PAIR_WIDTHS,
}
# Other modes than a float32 forward (bfloat16, with a backward): ``bench_limit.py --fit ... --modes`` on the six 1K
# tables benchmarks/limit_tables/modes_*.txt; with a core taken (busy): ``--fit ... --busy-factors`` on busy_omp_q2.txt
# (RESULTS.md, issue 15, "bfloat16 and backward in the estimates", "Estimates that see a taken core"); bfloat16 on a
# CPU without AMX tiles (the _no_amx factors): --fit ... --modes on limit_tables/s9_q1.txt and s9_q2.txt, an AMD EPYC
# (RESULTS.md, issue 15, "bfloat16 on a CPU without AMX").
# The busy factors refitted on every saved --busy table of both CPUs, each replayed on its own kind (auto's pick under
# a taken core within 1.1x of the best busy backend): busy 1.0 -> 1.3, busy_backward 1.5 -> 1.7 with sdpa's busy
# 1.95 -> 1.52, the seven Xeon tables (1K and 8K) 143 -> 159 rows, the five AMD EPYC ones 124 -> 132 (a plateau over
# sdpa's 1.45-1.6; RESULTS.md, issue 15, "Busy factors from every busy table"). blocksparse had been picked under a
# taken core 1.15-1.46x slower than SDPA or native on causal rows, decoding steps and small windows. Its forward's
# busy factor by the call's size (``_common.BUSY_SMALL_WORK``): 1.3 for small calls, 1.45 for large ones, whose
# SDPA calls use every thread (measured 1.5-1.8 from 3e8 multiply-adds; the replay of the current busy tables chose
# 1.45 over 1.3-1.7; RESULTS.md, issue 15, "Busy factors by the call's size").
MODES = ModeFactors(
    bf16=1.31,
    backward=3.44,
    bf16_backward=3.2,
    busy=1.45,
    busy_backward=1.7,
    busy_small=1.3,
    bf16_no_amx=1.05,
    bf16_backward_no_amx=3.73,
)


def spec_tile_mask(spec, q_pos: torch.Tensor, kv_pos: torch.Tensor) -> TileMask:
    """A tile predicate ``(b, q0, q1, k0, k1) -> (q1 - q0, k1 - k0) bool`` from a mask spec (True = may attend).

    ``q_pos``: ``(Q,)`` or ``(B, Q)`` positions of the queries, ``kv_pos``: ``(K,)`` or ``(B, K)`` of the keys.
    Evaluates the spec only on the tile's positions: O(tile) time and memory.
    """
    one_row = spec.batch_size in (None, 1)

    def tile(b: int, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
        qp = (q_pos[b if q_pos.shape[0] > 1 else 0] if q_pos.dim() == 2 else q_pos)[q0:q1]
        kp = (kv_pos[b if kv_pos.shape[0] > 1 else 0] if kv_pos.dim() == 2 else kv_pos)[k0:k1]
        bi = torch.tensor(0 if one_row else b, device=qp.device)
        out = spec.evaluate(bi, qp.unsqueeze(1), kp.unsqueeze(0))
        return torch.broadcast_to(out, (q1 - q0, k1 - k0))

    return tile


@dataclass(frozen=True)
class _Run:
    """Contiguous key range ``[k0, k1)`` of one query group; ``partial`` lists the key ranges that need a mask."""

    k0: int
    k1: int
    partial: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class _Group:
    """Query rows ``[q0, q1)`` of batch row ``b`` that share one list of key tiles."""

    b: int
    q0: int
    q1: int
    runs: tuple[_Run, ...]


@dataclass(frozen=True)
class _Stack:
    """Consecutive query groups ``groups`` (plan indices) of batch row ``b`` that the CPU flash kernel computes in one
    forward call, stacked along its batch dimension: group ``i`` holds queries ``[q0 + i·rows,
    q0 + (i + 1)·rows)`` and one run of ``keys`` keys from ``q0 + i·rows + shift``, all with the same additive bias
    (``bias``, ``(rows, keys)``, or None without PARTIAL tiles). The groups' q, k and v are strided views (the keys
    of neighbouring groups overlap), so stacking copies nothing; the output is the same, bit for bit, as group by
    group (the kernel computes each batch entry on its own, with the same query and key blocks). With grouped-query
    heads the queries are copied into the kernel's layout (``(count, Hkv, rep·rows, D)``), as a group alone copies
    its own. The backward runs group by group."""

    groups: tuple[int, ...]
    b: int
    q0: int
    rows: int
    keys: int
    shift: int
    bias: torch.Tensor | None


# The most groups one flash call of a stack computes (``_tasks``): pieces of 2, 4, 8 and whole stacks at two threads
# on windows of 32-1,024 (rows of 1,024 and 8,192) measured 1.02-1.16x, 1.00-1.30x, 0.91-1.45x and 0.91-1.47x
# group by group (RESULTS.md, issue 15, "Stacked query groups").
STACK_PIECE = 8
# Stacking query groups (``_stacks``), read by each forward: set to False to run every group on its own (the tests
# compare both).
STACK_GROUPS = True


def _stacks(plan, masks: dict, biases: dict, empties: dict) -> tuple[_Stack, ...]:
    """The runs of at least two consecutive groups of ``plan`` that one flash call can compute (``_Stack``): each
    with one key run, the same rows, keys and key offset from its first query, no row without a key (``empties``)
    and the same bias view (``biases``: the plan's shared templates, ``(rep·rows, keys)``; a group with PARTIAL tiles
    but no kept bias is not stacked). With grouped-query heads (``rep > 1``) a stack's queries are copied into the
    kernel's layout, as each group's are when run alone. Example: ``sliding_window(256)`` on rows of 8,192 in tiles
    of 128: groups 2-63 (queries 256-8191, each against the 384 keys from 256 before its first) form one stack;
    groups 0 and 1 run alone. O(groups)."""

    def signature(gi: int):
        g = plan[gi]
        if len(g.runs) != 1 or (gi, 0) in empties or (gi, None) in empties:
            return None
        r, bias = g.runs[0], biases.get((gi, 0))
        if (gi, 0) in masks and bias is None:
            return None
        view = None if bias is None else (bias.data_ptr(), tuple(bias.shape), bias.stride())
        return (g.b, g.q1 - g.q0, r.k1 - r.k0, r.k0 - g.q0, view)

    out, start = [], 0
    signatures = [signature(gi) for gi in range(len(plan))]
    for end in range(1, len(plan) + 1):
        same = (
            end < len(plan)
            and signatures[end] is not None
            and signatures[end] == signatures[start]
            and plan[end].q0 == plan[end - 1].q1
        )
        if same:
            continue
        if signatures[start] is not None and end - start >= 2:
            b, rows, keys, shift, _ = signatures[start]
            bias = biases.get((start, 0))
            out.append(_Stack(tuple(range(start, end)), b, plan[start].q0, rows, keys, shift, bias))
        start = end
    return tuple(out)


def _stacked_view(t: torch.Tensor, b: int, first: int, rows: int, count: int, step: int) -> torch.Tensor:
    """``(count, H, rows, X)`` view of ``t`` ``(B, H, L, X)``: entry ``i`` is rows ``[first + i·step, ... + rows)``
    of batch row ``b`` (entries may overlap; no copy)."""
    sb, sh, sl, sx = t.stride()
    offset = t.storage_offset() + b * sb + first * sl
    return t.as_strided((count, t.shape[1], rows, t.shape[3]), (step * sl, sh, sl, sx), offset)


# Consecutive query groups whose key tiles differ are computed as one group of ``max_rows`` rows over the union of
# their key tiles (the pairs outside a group's own tiles masked) when that computes at most this many times their own
# pairs: fewer, larger flash calls and fewer log-sum-exp merges for rows whose key runs are long (a prefix, a window
# of 4,096, the late tiles of a long document). Measured on rows of 8K (``benchmarks/bench_blocksparse_ab.py``,
# RESULTS.md "Long rows and the floor"): prefix-LM 2048 0.76-0.88x, window 4096 0.80-1.11x of main's blocksparse
# (the shared biases included), where the rows without merged groups moved 0.82-1.03x.
# Short runs (a window of 512: the union of four tiles is 1.6x their pairs) stay tile by tile.
_MERGE_GAIN = 1.1


def _plan(tile_class: torch.Tensor, block_q: int, block_k: int, Q: int, K: int, max_keys: int, max_rows: int):
    """Groups of up to ``max_rows`` consecutive query rows sharing one list of key tiles, their contiguous key runs
    split at ``max_keys`` keys.

    Query tiles with identical classes form a group; consecutive groups then become one of exactly ``max_rows`` rows
    when its union of key tiles computes at most ``_MERGE_GAIN`` times their pairs. A group's classes are the union
    of its tiles' (FULL where FULL for every tile, NONE where NONE for every tile, PARTIAL otherwise: the mask decides
    those pairs exactly). Per batch row a few numpy operations on the ``(nQ, nK)`` classes and one pass in Python
    over the groups (``tests/test_floors.py`` holds it to the group-by-group form it replaced), kept per pattern of
    classes and sizes for rows of at most ``_KEPT_ROW_BYTES`` classes (``_kept_row_groups``).
    """
    tc = tile_class.to("cpu", torch.int8).numpy()
    sizes = (block_q, block_k, Q, K, max_keys, max_rows)
    groups = []
    for b in range(tc.shape[0]):
        row = tc[b]
        kept = row.nbytes <= _KEPT_ROW_BYTES
        for q0, q1, runs in _kept_row_groups(row.tobytes(), row.shape, sizes) if kept else _row_groups(row, sizes):
            groups.append(_Group(b, q0, q1, runs))
    return groups


# A batch row's groups depend only on its tile classes and the sizes: rows of the same pattern (padded rows whose real
# lengths fall in the same tile, the same documents' layout) recur within a batch and across batches, so the groups
# of rows of at most _KEPT_ROW_BYTES classes (64 x 64 tiles) are kept, the last _KEPT_ROWS patterns. Measured on a
# fresh spec of 8 rows of 512 at 2 threads (RESULTS.md, issue 15, "Head sizes"): 5 specs of right-padded rows had 8
# patterns among 40 batch rows' 233 groups.
_KEPT_ROW_BYTES = 1 << 12
_KEPT_ROWS = 1024


@functools.lru_cache(maxsize=_KEPT_ROWS)
def _kept_row_groups(classes: bytes, shape: tuple[int, int], sizes: tuple) -> tuple:
    return _row_groups(np.frombuffer(classes, dtype=np.int8).reshape(shape), sizes)


def _row_groups(classes: np.ndarray, sizes: tuple) -> tuple:
    """``((q0, q1, runs), ...)``: the query groups of one batch row's classes ``(nQ, nK)`` (read only), without the
    groups that see no key tile."""
    block_q, block_k, Q, K, max_keys, max_rows = sizes
    n_k = classes.shape[1]
    widths = np.full(n_k, block_k, dtype=np.int64)
    if n_k:
        widths[-1] = K - (n_k - 1) * block_k
    merged = _merged(_identical_tiles(classes, block_q, Q, max_rows), widths, max_rows)
    return tuple((q0, q1, _runs(c, block_k, K, max_keys)) for q0, q1, c in merged if c.any())


def _identical_tiles(classes: np.ndarray, block_q: int, Q: int, max_rows: int) -> list:
    """Runs of consecutive query tiles with identical classes ``(nQ, nK)``, at most ``max_rows`` rows each:
    ``[(q0, q1, classes)]`` in query order."""
    same = (classes[1:] == classes[:-1]).all(1).tolist() if len(classes) > 1 else []
    out = []
    for i in range(classes.shape[0]):
        q0, q1 = i * block_q, min((i + 1) * block_q, Q)
        if out and same[i - 1] and q1 - out[-1][0] <= max_rows:
            out[-1] = (out[-1][0], q1, out[-1][2])
        else:
            out.append((q0, q1, classes[i]))
    return out


def _merged(same: list, widths: np.ndarray, max_rows: int) -> list:
    """``same`` (``_identical_tiles``) with runs of consecutive entries merged where ``_plan`` merges them: from each
    entry not yet merged, the longest run whose rows fit in ``max_rows`` becomes one entry when it holds at least two,
    exactly ``max_rows`` rows, and its union of key tiles computes at most ``_MERGE_GAIN`` times their own pairs.
    The windows' rows, own pairs and any-tile masks come from prefix sums over the entries."""
    n = len(same)
    if n < 2:
        return same
    classes = np.stack([c for _, _, c in same])  # (n, nK)
    rows = np.array([q1 - q0 for q0, q1, _ in same], dtype=np.int64)
    on = classes != NONE
    first = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(rows, out=first[1:])
    own = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(rows * (on @ widths), out=own[1:])
    seen = np.zeros((n + 1, on.shape[1]), dtype=np.int64)
    np.cumsum(on, axis=0, out=seen[1:])
    start = np.arange(n)
    end = np.searchsorted(first, first[:-1] + max_rows, side="right") - 1  # entries [i, end) fit
    span = first[end] - first[:-1]
    union = ((seen[end] - seen[:-1]) > 0) @ widths
    merge = ((end - start) > 1) & (span == max_rows) & (span * union <= _MERGE_GAIN * (own[end] - own[:-1]))
    out, i = [], 0
    merge, end = merge.tolist(), end.tolist()
    while i < n:
        if merge[i]:
            block = classes[i : end[i]]
            out.append((same[i][0], same[end[i] - 1][1], np.where((block == block[0]).all(0), block[0], PARTIAL)))
            i = end[i]
        else:
            out.append(same[i])
            i += 1
    return out


def _runs(row, block_k: int, K: int, max_keys: int) -> tuple[_Run, ...]:
    """The key runs of one group's classes ``row`` ``(nK,)``: contiguous non-NONE key tiles, at most ``max_keys``
    keys each (whole tiles), with the key ranges of their PARTIAL tiles. One pass over the row as Python ints."""
    tiles_per_run = max(1, max_keys // block_k)
    out, tiles, partial = [], [], []
    for j, c in enumerate(row.tolist()):
        if c == NONE:
            continue
        if tiles and (j != tiles[-1] + 1 or len(tiles) >= tiles_per_run):
            out.append(_run(tiles, partial, block_k, K))
            tiles, partial = [], []
        tiles.append(j)
        if c == PARTIAL:
            if partial and partial[-1][1] == j:
                partial[-1][1] = j + 1
            else:
                partial.append([j, j + 1])
    if tiles:
        out.append(_run(tiles, partial, block_k, K))
    return tuple(out)


def _run(tiles: list, partial: list, block_k: int, K: int) -> _Run:
    spans = tuple((a * block_k, min(e * block_k, K)) for a, e in partial)
    return _Run(tiles[0] * block_k, min((tiles[-1] + 1) * block_k, K), spans)


MAX_KEYS, MAX_ROWS = 4096, 512  # blocksparse_attention's defaults: keys per chunk, query rows per group


def blocksparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tile_class: torch.Tensor,
    block_size: int | tuple[int, int],
    tile_mask: TileMask,
    *,
    scale: float | None = None,
    max_keys: int = MAX_KEYS,
    max_rows: int = MAX_ROWS,
) -> torch.Tensor:
    """Attention over a block layout: NONE key tiles skipped, FULL tiles unmasked, PARTIAL tiles masked element-wise.

    ``tile_class``: ``(B, ceil(Q / bq), ceil(K / bk))`` int, ``NONE`` (0), ``PARTIAL`` (1) or ``FULL`` (2) for every
    (query tile, key tile); ``block_size``: ``bq`` or ``(bq, bk)`` (lengths need not be multiples).
    ``tile_mask(b, q0, q1, k0, k1)``: ``(q1 - q0, k1 - k0)`` bool, True = may attend, called on PARTIAL tiles only
    (e.g. ``spec_tile_mask(spec, q_pos, kv_pos)``). The layout must be sound: a NONE tile has no allowed pair, a FULL
    tile no masked pair.

    Consecutive query tiles with the same key-tile list are processed together (up to ``max_rows`` rows), and so are
    ``max_rows`` rows of tiles whose key tiles differ when their union wastes little (``_plan``); their contiguous key
    tiles are read as one slice (no copy) in chunks of at most ``max_keys`` keys, combined by an online
    softmax (running max and sum, rescaled per chunk). All heads at once; GQA without repeating keys. Low-precision
    inputs are computed in float32 (float64 stays float64). On CPU in float32, each chunk runs through PyTorch's fused
    CPU flash-attention kernel (which returns the log-sum-exp) and chunks are merged by log-sum-exp; elsewhere, or
    with ``USE_CPU_FLASH = False``, a portable loop of ``bmm`` and ``exp`` does the same.

    Backward: a custom autograd function that recomputes scores chunk by chunk from the saved log-sum-exp (the
    FlashAttention scheme). Threads: forward and backward deal the query groups to ``backends._workers``'s
    single-threaded workers when torch has more than one intra-op thread (each group writes its own rows; the
    gradients of keys shared by several groups are added under a lock).

    Memory: O(B·H·Q) for the log-sum-exp, one chunk of scores at a time, and the element masks of PARTIAL tiles (kept
    from forward to backward): O(partial tiles · bq · bk) bools. Never O(Q·K).
    """
    B, H, Q, D, Hkv, K = check_qkv(q, k, v)
    plan, masks = _tile_groups(B, Q, K, tile_class, block_size, tile_mask, max_keys, max_rows)
    scale = D**-0.5 if scale is None else float(scale)
    return _BlockSparse.apply(q, k, v, plan, masks, scale, {}, None, None)


def _tile_groups(B: int, Q: int, K: int, tile_class, block_size, tile_mask: TileMask, max_keys: int, max_rows: int):
    """The query groups of a block layout (``_plan``) and the element masks of their PARTIAL key spans
    (``_group_masks``): what ``blocksparse_attention`` computes from the layout before touching q, k or v."""
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    n_q, n_k = -(-Q // bq), -(-K // bk)
    if tuple(tile_class.shape) != (B, n_q, n_k) and not (
        tile_class.shape[0] == 1 and tile_class.shape[1:] == (n_q, n_k)
    ):
        raise bad(
            ShapeError, "tile_class", f"shape ({B}, {n_q}, {n_k}) for block size ({bq}, {bk})", tuple(tile_class.shape)
        )
    if tile_class.shape[0] == 1 and B > 1:
        tile_class = tile_class.expand(B, n_q, n_k)
    plan = _plan(tile_class, bq, bk, Q, K, max(max_keys, bk), max(max_rows, bq))
    return plan, _group_masks(plan, tile_mask)


def _group_masks(plan, tile_mask) -> dict:
    """Element masks of the PARTIAL key spans of every run: ``{(group, run): [(start, denied)]}``.

    ``start`` is the span's first key relative to the run, ``denied`` ``(rows, span_keys)`` bool is True where a pair
    is masked out (stored inverted, ready for ``masked_fill_``).
    """
    masks = {}
    for gi, g in enumerate(plan):
        for ri, r in enumerate(g.runs):
            if r.partial:
                masks[(gi, ri)] = [(p0 - r.k0, ~tile_mask(g.b, g.q0, g.q1, p0, p1)) for p0, p1 in r.partial]
    return masks


def _spec_group_masks(plan, spec, q_pos: torch.Tensor, kv_pos: torch.Tensor, block_k: int) -> dict:
    """``_group_masks(plan, spec_tile_mask(spec, q_pos, kv_pos))``, the spec evaluated once per shape of tile instead
    of once per span: every PARTIAL span is cut into its key tiles of ``block_k`` keys, the tiles of ``rows`` queries
    and ``keys`` keys are stacked, their batch rows ``(T, 1, 1)``, query positions ``(T, rows, 1)`` and key positions
    ``(T, 1, keys)`` broadcast as ``MaskSpec.evaluate`` allows, and a span's mask is its tiles' slices of the ``(T,
    rows, keys)`` results side by side. The same masks (the predicate is elementwise) in a few torch calls per shape
    (usually one or two shapes) where each span took ~10: ~4 ms of a fresh spec's plan on 8 rows of 512 tokens.
    O(PARTIAL pairs) time and memory, as span by span (a span of several tiles is a copy; the tiles of one call hold
    at most ``_STACKED_PAIRS`` pairs, which bounds what the spec's own temporaries take)."""
    one_row = spec.batch_size in (None, 1)
    shapes: dict[tuple[int, int], list] = {}
    for g in plan:
        for r in g.runs:
            for p0, p1 in r.partial:
                for t0 in range(p0, p1, block_k):
                    shapes.setdefault((g.q1 - g.q0, min(t0 + block_k, p1) - t0), []).append((g.b, g.q0, t0))
    tiles = {}
    for (rows, keys), corners in shapes.items():
        step = max(1, _STACKED_PAIRS // (rows * keys))
        for at in (corners[i : i + step] for i in range(0, len(corners), step)):
            tiles.update(_stacked_tile_masks(spec, q_pos, kv_pos, at, rows, keys, one_row))
    masks = {}
    for gi, g in enumerate(plan):
        for ri, r in enumerate(g.runs):
            if r.partial:
                spans = []
                for p0, p1 in r.partial:
                    parts = [tiles[g.b, g.q0, t0] for t0 in range(p0, p1, block_k)]
                    spans.append((p0 - r.k0, parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)))
                masks[(gi, ri)] = spans
    return masks


# The most (query, key) pairs of one stacked evaluation (``_spec_group_masks``): 32 MiB for an int64 temporary of a
# ``custom`` predicate, 4 MiB of bool masks.
_STACKED_PAIRS = 1 << 22


def _stacked_tile_masks(spec, q_pos, kv_pos, at: list, rows: int, keys: int, one_row: bool) -> zip:
    """``(b, q0, k0) -> (rows, keys)`` bool denied mask, for the tiles ``at`` ``[(b, q0, k0), ...]`` of one shape, from
    one ``spec.evaluate`` on their stacked positions."""
    device = q_pos.device
    where = torch.tensor(at, dtype=torch.int64, device=device)  # (T, 3): batch row, first query, first key
    b = where[:, 0:1]
    q_idx = where[:, 1:2] + torch.arange(rows, device=device)  # (T, rows)
    k_idx = where[:, 2:3] + torch.arange(keys, device=device)  # (T, keys)
    qp = q_pos[q_idx] if q_pos.dim() == 1 else q_pos[b if q_pos.shape[0] > 1 else 0, q_idx]
    kp = kv_pos[k_idx] if kv_pos.dim() == 1 else kv_pos[b if kv_pos.shape[0] > 1 else 0, k_idx]
    allowed = spec.evaluate((torch.zeros_like(b) if one_row else b).view(-1, 1, 1), qp[:, :, None], kp[:, None])
    return zip(at, (~torch.broadcast_to(allowed, (len(at), rows, keys))).unbind(0), strict=True)


def _apply_masks(s: torch.Tensor, spans, rep: int) -> torch.Tensor:
    """Set denied pairs of scores ``s`` ``(Hkv, rep·rows, n)`` to ``-inf`` in place, span by span."""
    if spans:
        s4 = s.view(s.shape[0], rep, s.shape[1] // rep, s.shape[2])
        for start, denied in spans:
            s4[..., start : start + denied.shape[1]].masked_fill_(denied, float("-inf"))
    return s


def _online_softmax(qg: torch.Tensor, runs: list, rep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of scaled queries ``qg`` ``(Hkv, rep·rows, D)`` over key chunks, one chunk at a time.

    ``runs``: ``(k, v, spans)``, ``k, v`` ``(Hkv, n, D)``, ``spans`` as in ``_group_masks`` or None. Keeps a running
    max ``m`` and sum ``denom`` per row and rescales the accumulator when the max grows. Returns the output
    ``(Hkv, rep·rows, D)`` (0 on rows with no allowed key) and the log-sum-exp (``+inf`` on those rows).
    """
    Hkv, n_rows, _ = qg.shape
    m = denom = acc = None
    for kt, vt, mask in runs:
        s = _apply_masks(torch.bmm(qg, kt.transpose(1, 2)), mask, rep)
        m_new = s.amax(-1) if m is None else torch.maximum(m, s.amax(-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = s.sub_(m_safe.unsqueeze(-1)).exp_()
        pv = torch.bmm(p, vt)
        if m is None:
            denom, acc = p.sum(-1), pv
        else:
            alpha = torch.exp(m - m_safe)
            denom = denom * alpha + p.sum(-1)
            acc = acc * alpha.unsqueeze(-1) + pv
        m = m_new
    ok = denom != 0  # 0: no allowed key; NaN (a NaN score) stays NaN, as the reference gives it
    safe_denom = torch.where(ok, denom, torch.ones_like(denom))
    out = torch.where(ok.unsqueeze(-1), acc / safe_denom.unsqueeze(-1), 0.0)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    lse = torch.where(ok, m_safe + torch.log(safe_denom), float("inf"))
    return out, lse


def _flash_cpu_ops():
    """The CPU flash-attention kernels (forward returns the log-sum-exp), or None where this torch lacks them."""
    ops = torch.ops.aten
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
        ops, "_scaled_dot_product_flash_attention_for_cpu_backward"
    ):
        return ops._scaled_dot_product_flash_attention_for_cpu, ops._scaled_dot_product_flash_attention_for_cpu_backward
    return None


# Set to False to force the portable tile loop on CPU as well (the tests run both paths).
USE_CPU_FLASH = True


def _run_bias(spans, rows: int, n: int, rep: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """Additive ``(rep·rows, n)`` bias of one run: ``-inf`` on denied pairs of its PARTIAL spans, None if none. The
    ``rep`` copies are filled together through a ``(rep, rows, n)`` view (each span's mask broadcast over them), not
    built once and repeated."""
    if not spans:
        return None
    bias = torch.zeros(rep * rows, n, dtype=dtype, device=device)
    copies = bias.view(rep, rows, n)
    for start, denied in spans:
        copies[:, :, start : start + denied.shape[1]].masked_fill_(denied, float("-inf"))
    return bias


_BIAS_BUDGET = 1 << 23  # elements of the biases a plan keeps (32 MiB of float32); past it they are built per call


def _shared_biases(plan, masks: dict, rep: int) -> dict:
    """The additive bias of every run with PARTIAL spans (``_run_bias``, float32, ``(rep·rows, n)``), built once
    for a cached plan: ``{(group, run): bias}``.

    Runs of the same rows whose spans sit at the same places counted from the run's end with the same denied pairs
    (the diagonal tile of every causal group, a window's every inner group) share one template as wide as the widest;
    each gets the view of its last ``n`` columns (the flash kernel reads a mask through its row stride), so the memory
    is that of the distinct patterns, not O(Q·K). Example: ``causal()`` on rows of 1,024 in tiles of 128: 8 runs of
    128 ... 1,024 keys, one ``(128, 1024)`` template. ``{}`` when the templates would pass ``_BIAS_BUDGET``.
    """
    members: dict[tuple, list] = {}
    for (gi, ri), spans in masks.items():
        g, r = plan[gi], plan[gi].runs[ri]
        n = r.k1 - r.k0
        pattern = tuple((start - n, denied.shape[1], denied.cpu().numpy().tobytes()) for start, denied in spans)
        members.setdefault((g.q1 - g.q0, pattern), []).append(((gi, ri), n, spans))
    if sum(rows * max(n for _, n, _ in runs) for (rows, _), runs in members.items()) * rep > _BIAS_BUDGET:
        return {}
    out = {}
    for (rows, _), runs in members.items():
        width = max(n for _, n, _ in runs)
        _, n, spans = runs[0]
        template = _run_bias(
            [(start + width - n, denied) for start, denied in spans],
            rows,
            width,
            rep,
            torch.float32,
            spans[0][1].device,
        )
        for key, n, _ in runs:
            out[key] = template[:, width - n :]
    return out


def _run_empty_rows(spans, n: int, rep: int) -> torch.Tensor | None:
    """``(rep·rows,)`` bool: rows of a run whose every key is denied; None when the run has an unmasked key tile."""
    if not spans or sum(d.shape[1] for _, d in spans) < n:
        return None
    empty = spans[0][1].all(-1)
    for _, denied in spans[1:]:
        empty = empty & denied.all(-1)
    return empty.repeat(rep) if rep > 1 else empty


def _empty_rows(plan, masks: dict, rep: int) -> dict:
    """The rows with no allowed key, kept only where there are some: ``{(group, run): (rep·rows,) bool}`` for a run
    (the flash kernel reports a log-sum-exp of 0 there) and ``{(group, None): ...}`` for rows empty in every run of
    their group (zeroed). Usually empty: a run with a FULL key tile, or a diagonal tile, leaves no row without a key.
    O(partial tiles · block_size) work, once per cached plan."""
    out = {}
    for gi, g in enumerate(plan):
        overall, some_run_has_none = None, False
        for ri, r in enumerate(g.runs):
            empty = _run_empty_rows(masks.get((gi, ri)), r.k1 - r.k0, rep)
            if empty is None or not bool(empty.any()):
                some_run_has_none = True
                continue
            out[gi, ri] = empty
            overall = empty if overall is None else overall & empty
        if not some_run_has_none and overall is not None and bool(overall.any()):
            out[gi, None] = overall
    return out


def _flash_group_forward(qg, runs, rep, scale, empty_rows):
    """Group forward with the CPU flash kernel, one call per run, merged by log-sum-exp.

    ``qg`` ``(1, Hkv, rep·rows, D)``; ``runs``: ``(k, v, spans, bias, empty)`` with ``k, v`` ``(1, Hkv, n, D)``,
    ``bias`` the run's ``_run_bias`` when the plan keeps it (else None: built here), ``empty`` the run's rows with no
    allowed key or None (``_empty_rows``); ``empty_rows`` the group's, or None. Returns the output and the
    log-sum-exp (``+inf`` on rows with no allowed key).
    """
    fwd, _ = _flash_cpu_ops()
    n_rows = qg.shape[2]
    outs, lses = [], []
    for kt, vt, spans, bias, empty in runs:
        if bias is None:
            bias = _run_bias(spans, n_rows // rep, kt.shape[2], rep, qg.dtype, qg.device)
        o, lse = fwd(qg, kt, vt, 0.0, False, attn_mask=bias, scale=scale)
        if bias is None:  # no mask: a row whose every score is NaN reads as empty on few keys (_common.all_nan_rows)
            o, lse = nan_rows_restored_lse(o, lse, qg, kt, False, scale)
        if empty is not None:
            lse = lse.masked_fill(empty, float("-inf"))  # the kernel reports 0 for an empty row
        outs.append(o)
        lses.append(lse.to(qg.dtype))
    if len(outs) == 1:
        lse, out = lses[0], outs[0]
    else:
        stacked = torch.stack(lses)
        lse = torch.logsumexp(stacked, 0)
        weights = torch.exp(stacked - lse).nan_to_num_(0.0)
        out = sum(w.unsqueeze(-1) * o for w, o in zip(weights, outs, strict=True))
    if empty_rows is None:
        return out, lse
    return out.masked_fill(empty_rows.unsqueeze(-1), 0.0), lse.masked_fill(empty_rows, float("inf"))


class _BlockSparse(torch.autograd.Function):
    """Block-sparse attention with recomputation in backward; see ``blocksparse_attention``."""

    @staticmethod
    @on_free_cores
    def forward(ctx, q, k, v, plan, masks, scale, biases, empties, stacks):
        B, H, Q, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[3]
        rep = H // Hkv
        cdt = torch.promote_types(q.dtype, torch.float32)
        flash = _runs_flash(q.dtype, q.device.type, D, Dv)
        qf, kf, vf = (unit_stride(t.to(cdt)) for t in (q, k, v))
        if flash and empties is None:
            empties = _empty_rows(plan, masks, rep)
        if not (flash and STACK_GROUPS):
            stacks = ()
        elif stacks is None:
            stacks = _stacks(plan, masks, biases, empties)
        out = torch.zeros(B, H, Q, Dv, dtype=cdt, device=q.device)
        lse = torch.full((B, H, Q), float("inf"), dtype=cdt, device=q.device)

        def stack_forward(st: _Stack) -> None:  # writes only the stack's query rows
            count, rows = len(st.groups), st.rows
            span = slice(st.q0, st.q0 + count * rows)
            if rep == 1:
                qs = _stacked_view(qf, st.b, st.q0, rows, count, rows)
            else:  # each group's rows of the rep query heads of a key head, one after the other: a copy
                qs = qf[st.b, :, span].reshape(Hkv, rep, count, rows, D).permute(2, 0, 1, 3, 4)
                qs = qs.reshape(count, Hkv, rep * rows, D)
            ks, vs = (_stacked_view(t, st.b, st.q0 + st.shift, st.keys, count, rows) for t in (kf, vf))
            o, s_lse = _flash_cpu_ops()[0](qs, ks, vs, 0.0, False, attn_mask=st.bias, scale=scale)
            if st.bias is None:
                o, s_lse = nan_rows_restored_lse(o, s_lse, qs, ks, False, scale)
            # (count, Hkv, rep·rows) into heads h = hkv·rep + r and rows q0 + i·rows + j: one copy each (views)
            out[st.b, :, span].view(Hkv, rep, count, rows, Dv).copy_(
                o.view(count, Hkv, rep, rows, Dv).permute(1, 2, 0, 3, 4)
            )
            lse[st.b, :, span].view(Hkv, rep, count, rows).copy_(s_lse.view(count, Hkv, rep, rows).permute(1, 2, 0, 3))

        def group_forward(gi) -> None:  # writes only the group's own query rows of out and lse
            if isinstance(gi, _Stack):
                return stack_forward(gi)
            g = plan[gi]
            rows = g.q1 - g.q0
            if flash:
                qg = qf[g.b, :, g.q0 : g.q1].reshape(1, Hkv, rep * rows, D)
                runs = [
                    _run_kv(kf, vf, g, r, True) + (masks.get((gi, ri)), biases.get((gi, ri)), empties.get((gi, ri)))
                    for ri, r in enumerate(g.runs)
                ]
                o, g_lse = _flash_group_forward(qg, runs, rep, scale, empties.get((gi, None)))
            else:
                qg = (qf[g.b, :, g.q0 : g.q1] * scale).reshape(Hkv, rep * rows, D)
                runs = [_run_kv(kf, vf, g, r, False) + (masks.get((gi, ri)),) for ri, r in enumerate(g.runs)]
                o, g_lse = _online_softmax(qg, runs, rep)
            # (Hkv, rep·rows) in the kernel's layout (any strides) into heads h = hkv·rep + r: one copy (a view)
            out[g.b, :, g.q0 : g.q1].unflatten(0, (Hkv, rep)).copy_(o.reshape(Hkv, rep, rows, Dv))
            lse[g.b, :, g.q0 : g.q1].unflatten(0, (Hkv, rep)).copy_(g_lse.reshape(Hkv, rep, rows))

        tasks, weights = _tasks(plan, stacks, q, v)
        parallel_map(group_forward, tasks, weights, device=q.device.type, busy_min_work=MIN_TASK_WORK)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.masks, ctx.scale, ctx.flash, ctx.biases = plan, masks, scale, flash, biases
        return out.to(q.dtype)

    @staticmethod
    @on_free_cores
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan, masks, scale, biases = ctx.plan, ctx.masks, ctx.scale, ctx.biases
        qf, kf, vf = (unit_stride(t.to(out.dtype)) for t in (q, k, v))
        # rows with no allowed key (log-sum-exp +inf): their probabilities exp(s - inf) are 0 unless a query there
        # holds a NaN or an infinity, which would reach dq, dk and dv; their output does not depend on it (exactly 0)
        qf = zero_query_rows(qf, torch.isposinf(lse).unsqueeze(-1))
        do = unit_stride(d_out.to(out.dtype))
        dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        group_backward = _flash_group_backward if ctx.flash else _torch_group_backward
        adding = threading.Lock()  # groups write their own rows of dq but may share keys: dk, dv add under it

        def one_group(gi: int) -> None:
            spans = [(masks.get((gi, ri)), biases.get((gi, ri))) for ri in range(len(plan[gi].runs))]
            group_backward(qf, kf, vf, out, lse, do, dq, dk, dv, plan[gi], spans, scale, adding)

        # group by group: stacked, the backward measured 0.92-1.12x (rows of 8,192, windows of 256-1024, one thread;
        # RESULTS.md, issue 15, "Stacked query groups")
        weights = _group_weights(plan, q, v)
        parallel_map(one_group, range(len(plan)), weights, device=q.device.type, busy_min_work=MIN_TASK_WORK)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def _piece_bounds(count: int, threads: int) -> list[tuple[int, int]]:
    """Where ``_tasks`` cuts a stack of ``count`` groups: consecutive pieces of at most ``STACK_PIECE`` groups, at
    least one per thread (``threads``), of sizes as equal as they can be; ``[(start, end), ...]``."""
    most = max(min(STACK_PIECE, -(-count // max(threads, 1))), 1)
    n = -(-count // most)
    bounds = [count * i // n for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _tasks(plan, stacks: tuple[_Stack, ...], q: torch.Tensor, v: torch.Tensor) -> tuple[list, list[float]]:
    """``parallel_map``'s tasks and weights: every stack cut into pieces (``_piece_bounds``; the sum of their groups'
    weights), then every group in no stack (its plan index). A piece has at most ``STACK_PIECE`` groups, and a stack
    gives every thread (``_workers.threads_available``) a piece: one flash call over a whole stack, split across the
    intra-op threads, measured 0.91x group by group on windows of 512 and 1,024 at two threads, where pieces the
    workers share measured 1.03-1.10x (RESULTS.md, issue 15, "Stacked query groups")."""
    weights = _group_weights(plan, q, v)
    cuts, alone = _deal([st.groups for st in stacks], len(plan), _workers.threads_available())
    pieces = [
        dataclasses.replace(stacks[s], groups=stacks[s].groups[a:b], q0=stacks[s].q0 + a * stacks[s].rows)
        for s, a, b in cuts
    ]
    return [*pieces, *alone], [sum(weights[gi] for gi in st.groups) for st in pieces] + [weights[gi] for gi in alone]


def _deal(stacks: list[tuple[int, ...]], groups: int, threads: int) -> tuple[list[tuple[int, int, int]], list[int]]:
    """What ``_tasks`` deals, for stacks given as their groups' plan indices: ``(stack, start, end)`` of every piece
    (``_piece_bounds``), and the groups of ``range(groups)`` in no stack. The estimate deals the same
    (``_task_weights``)."""
    cuts = [(i, a, b) for i, members in enumerate(stacks) for a, b in _piece_bounds(len(members), threads)]
    stacked = {gi for members in stacks for gi in members}
    return cuts, [gi for gi in range(groups) if gi not in stacked]


def _run_kv(kf, vf, g: _Group, r: _Run, batched: bool):
    """Key and value slices of one run: ``(Hkv, n, D)``, or ``(1, Hkv, n, D)`` when ``batched``."""
    kt, vt = kf[g.b, :, r.k0 : r.k1], vf[g.b, :, r.k0 : r.k1]
    return (kt.unsqueeze(0), vt.unsqueeze(0)) if batched else (kt, vt)


def _group_views(t: torch.Tensor, g: _Group, heads: int, batched: bool) -> torch.Tensor:
    """Rows ``[q0, q1)`` of ``t`` ``(B, H, Q, X)`` as ``(Hkv, rep·rows, X)`` (``(1, ...)`` when ``batched``)."""
    x = t[g.b, :, g.q0 : g.q1]
    shape = (heads, -1, x.shape[-1]) if x.dim() == 3 else (heads, -1)
    x = x.reshape(shape)
    return x.unsqueeze(0) if batched else x


def _group_weights(plan, q: torch.Tensor, v: torch.Tensor) -> list[float]:
    """Multiply-adds of each query group's forward (rows times keys read times ``H·(D + Dv)``), to deal the largest
    groups to the workers first (and, while other processes hold cores, to keep groups under ``MIN_TASK_WORK`` in
    the caller: ``backends._workers``)."""
    per_pair = q.shape[1] * (q.shape[3] + v.shape[3])
    return [(g.q1 - g.q0) * sum(r.k1 - r.k0 for r in g.runs) * per_pair for g in plan]


def _flash_group_backward(qf, kf, vf, out, lse, do, dq, dk, dv, g, spans, scale, adding):
    """One group's gradients with the CPU flash backward kernel, run by run, from the global output and lse; its
    ``dk``, ``dv`` rows are added under the lock ``adding`` (other groups may read the same keys)."""
    _, bwd = _flash_cpu_ops()
    Hkv = kf.shape[1]
    rep = qf.shape[1] // Hkv
    rows = g.q1 - g.q0
    qg, og, dog = (_group_views(t, g, Hkv, True) for t in (qf, out, do))
    lse_g = _group_views(lse, g, Hkv, True).float()
    dq_g = None
    for r, (run_spans, bias) in zip(g.runs, spans, strict=True):
        kt, vt = _run_kv(kf, vf, g, r, True)
        if bias is None:
            bias = _run_bias(run_spans, rows, kt.shape[2], rep, qf.dtype, qf.device)
        gq, gk, gv = bwd(dog, qg, kt, vt, og, lse_g, 0.0, False, attn_mask=bias, scale=scale)
        dq_g = gq if dq_g is None else dq_g + gq
        with adding:
            dk[g.b, :, r.k0 : r.k1] += gk[0]
            dv[g.b, :, r.k0 : r.k1] += gv[0]
    dq[g.b, :, g.q0 : g.q1] = dq_g.reshape(qf.shape[1], rows, qf.shape[3])


def _torch_group_backward(qf, kf, vf, out, lse, do, dq, dk, dv, g, spans, scale, adding):
    """One group's gradients by recomputing probabilities ``exp(s - lse)`` chunk by chunk (portable); ``dk``, ``dv``
    added under the lock ``adding``."""
    Hkv = kf.shape[1]
    rep = qf.shape[1] // Hkv
    rows = g.q1 - g.q0
    qg = _group_views(qf, g, Hkv, False) * scale
    dog = _group_views(do, g, Hkv, False)
    lse_g = _group_views(lse, g, Hkv, False).unsqueeze(-1)
    delta_g = (dog * _group_views(out, g, Hkv, False)).sum(-1, keepdim=True)
    dq_g = torch.zeros_like(qg)
    for r, (run_spans, _) in zip(g.runs, spans, strict=True):
        kt, vt = _run_kv(kf, vf, g, r, False)
        p = _apply_masks(torch.bmm(qg, kt.transpose(1, 2)), run_spans, rep).sub_(lse_g).exp_()
        gv = torch.bmm(p.transpose(1, 2), dog)
        ds = torch.bmm(dog, vt.transpose(1, 2)).sub_(delta_g).mul_(p)
        dq_g += torch.bmm(ds, kt)
        gk = torch.bmm(ds.transpose(1, 2), qg)
        with adding:
            dv[g.b, :, r.k0 : r.k1] += gv
            dk[g.b, :, r.k0 : r.k1] += gk
    dq[g.b, :, g.q0 : g.q1] = (dq_g * scale).view(qf.shape[1], rows, qf.shape[3])


def _block_size(q_len: int, kv_len: int) -> int:
    """Tiles of 128 for long rows; smaller for short ones, so that the layout still skips work."""
    longest = max(q_len, kv_len)
    return 128 if longest >= 2048 else 64 if longest >= 256 else 16


def _layout(call):
    spec = M.full() if call.mask is None else call.mask
    bs = _block_size(call.q_len, call.kv_len)
    if (segmented := _segment_layout(call, bs)) is not None:
        return segmented
    q_pos, kv_pos = (call.q_positions, call.kv_positions) if call.positions_given else (None, None)
    return block_layout(spec, call.q_len, call.kv_len, bs, q_positions=q_pos, kv_positions=kv_pos, device=call.q.device)


def _segment_layout(call, bs: int) -> BlockLayout | None:
    """The layout of a call whose varlen plan is cheap (``_common.cheap_varlen_plan``: packed documents, padded rows),
    its classes ``(B, nQ, nK)`` cut from the plan's segments in one C pass (``attnmask_segment_tile_classes``: O(tiles
    the segments reach)) where ``lowering.block_layout`` classifies every spec part with ~50 torch calls (0.4 ms, 0.8
    right after an attention kernel, on 8 rows of 512). The plan's segments are the call's allowed pairs exactly (the
    ``"varlen"`` and ``"native"`` backends compute only them), so the classes are exact: ``block_layout``'s on packed
    documents and padded rows, finer where its interval arithmetic leaves PARTIAL a tile that two parts empty together
    (chunks with documents, a decoding row past its document; tested). ``None`` for any other call, off the CPU (a
    plan another backend built there: the generic layout stays on the call's device) and without the library."""
    lib = _clib.library()
    plan = None if isinstance(lib, str) or off_cpu(call) else cheap_varlen_plan(call)
    if plan is None:
        return None
    n_q, n_k = -(-call.q_len // bs), -(-call.kv_len // bs)
    classes = torch.zeros((call.batch, n_q, n_k), dtype=torch.int8)
    address, _held = segments_address(plan.segments)
    window = -1 if plan.window is None else plan.window
    args = (plan.segments.shape[0], bs, call.q_len, call.kv_len, int(plan.causal), window, classes.data_ptr())
    lib.attnmask_segment_tile_classes(address, *args)
    return BlockLayout(classes, call.q_len, call.kv_len, bs, call.q_positions, call.kv_positions, call.mask)


def unsupported(call) -> str | None:
    """The declarations say the rest (a spec, no dropout); a call with no pair has no layout to build."""
    return degenerate(call)


def cost(call) -> float:
    """Pairs of the FULL and PARTIAL tiles and mask evaluations of the PARTIAL ones, divided by what
    ``_workers.threads_available()`` threads gain on the query groups (``parallel_map``'s tasks), a charge per
    query tile (``_GROUP_COST``) and one per call (``_CALL_COST``). A ``custom`` predicate is not laid out just to
    estimate (that evaluates every pair): it is charged as dense plus its mask, in equal groups of query tiles."""
    if off_cpu(call):
        return float("inf")
    width = call.head_dim + call.value_dim
    charged = pair_width(width, _EXTRA_PAIR_WIDTH)
    per_pair = call.heads * charged
    threads = _workers.threads_available()
    if call.mask is not None and not call.mask.is_structural:
        work = (_PAIR_COST * per_pair + _MASK_COST) * call.batch * call.q_len * call.kv_len
        tiles = call.batch * -(-call.q_len // _block_size(call.q_len, call.kv_len))
        gain = _workers.expected_speedup([1.0] * tiles, threads, 0.0, _THREAD_EFFICIENCY)
        return work / gain * mode_factor(MODES, call) + _CALL_COST * _overhead_factor(call)
    layout = cached(call, "layout", _layout)
    computed, partial = _tile_pairs(layout, _BACKWARD_ROWS if call.needs_grad else 0)
    rows = call.batch if layout.batch_size == 1 else 1
    groups = layout.batch_size * layout.n_q_tiles * rows
    in_tasks = (_PAIR_COST * computed * per_pair + partial * _MASK_COST) * rows
    gain = 1.0  # one thread: no need to plan the groups just to weigh them
    if threads > 1:
        weights = [w * _PAIR_COST * charged / width for w in _task_weights(call)]  # in estimate units
        gain = _workers.expected_speedup(weights, threads, 0.0, _THREAD_EFFICIENCY, handover=_HANDOVER_COST)
    overhead = (groups * _GROUP_COST + _CALL_COST) * _overhead_factor(call)
    return in_tasks / gain * mode_factor(MODES, call) + overhead - stack_saving(call)


def _overhead_factor(call) -> float:
    """The mode factor of the per-tile and per-call charges: the call's (``mode_factor``) without a gradient; with
    one, the forward's plus ``_BACKWARD_OVERHEAD_SHARE`` of what the backward adds to it."""
    full = mode_factor(MODES, call)
    if not call.needs_grad:
        return full
    forward = mode_factor(MODES, call, forward=True)
    return forward + (full - forward) * _BACKWARD_OVERHEAD_SHARE


def _tile_pairs(layout, least_rows: int = 0) -> tuple[int, int]:
    """(query, key) pairs in the layout's FULL and PARTIAL tiles, and in its PARTIAL ones, per spec row: a tile holds
    its own rows times its own keys (``run`` slices them exactly), so the last query tile and the last key tile of a
    row whose length is not a multiple of the tile size hold fewer (a decoding step's 8 queries against 32,768 keys:
    one tile row of 8 rows, not 128; counted as 128 it had been estimated 16x its pairs). The last query tile counts
    at least ``least_rows`` rows (at most the tile's; ``_BACKWARD_ROWS``). O(tiles)."""
    bs = layout.block_size
    short_rows = layout.n_q_tiles * bs - layout.q_len  # rows missing from the last query tile, keys from the last
    short_keys = layout.n_kv_tiles * bs - layout.kv_len  # key tile
    short_rows = min(short_rows, max(bs - least_rows, 0))
    counts = layout.counts()
    computed, partial = counts["full"] + counts["partial"], counts["partial"]
    if not (short_rows or short_keys) or not layout.classes.numel():
        return computed * bs * bs, partial * bs * bs
    return _exact_pairs(layout.classes != NONE, bs, short_rows, short_keys), _exact_pairs(
        layout.classes == PARTIAL, bs, short_rows, short_keys
    )


def _exact_pairs(tiles: torch.Tensor, bs: int, short_rows: int, short_keys: int) -> int:
    """Pairs of the ``(R, nQ, nK)`` bool ``tiles`` when each is ``bs`` square but for the last tile row, ``short_rows``
    rows short, and the last tile column, ``short_keys`` keys short."""
    total = int(tiles.sum()) * bs * bs
    total -= int(tiles[:, -1, :].sum()) * short_rows * bs + int(tiles[:, :, -1].sum()) * short_keys * bs
    return total + int(tiles[:, -1, -1].sum()) * short_rows * short_keys


def floor(call) -> float:
    """A lower bound of ``cost`` without the layout (``Backend.floor``): each query tile computes at least the key
    tiles one segment of a plan already built (``built_exact_plan``: varlen's, else native's, built before the floors
    are asked; on 8 right-padded rows of 256 the C pass over native's segments took ~10 us where the padding's tiles
    in numpy took ~40 right after a kernel) needs there (``_segment_pairs``), on padded rows exactly the
    key tiles holding a real key it sees (``_common.padded_tile_pairs``: there the floor is within the thread gain and
    the stacks of the estimate, and planning skips the layout, 0.5 of 0.76 ms on 8 rows of 256 with a backward), else
    its diagonal tile where it holds a row certain to see a key (``_common.diagonal_pairs_seeing_themselves``), each
    tile counted with its own rows and keys as ``cost`` counts them (``_tile_pairs``), divided by the most the threads
    gain (``_workers.speedup_bound``); every query tile is a group, and the call is charged once; the forward's stacks
    save at most all but one group of each batch row. 0 where the rows are unknown. O(B·K) on host views, or O(N +
    tiles) on a plan's segments."""
    bs = _block_size(call.q_len, call.kv_len)
    built = built_exact_plan(call)
    if built is None:
        pairs = padded_tile_pairs(call, bs) or diagonal_pairs_seeing_themselves(call, bs)
    else:
        pairs = _segment_pairs(built, bs, call.batch, call.q_len, call.kv_len)
    if pairs == 0:
        return 0.0
    per_pair = call.heads * pair_width(call.head_dim + call.value_dim, _EXTRA_PAIR_WIDTH)
    n_q = -(-call.q_len // bs)
    gain = _workers.speedup_bound(_workers.threads_available(), _THREAD_EFFICIENCY)
    estimate = _PAIR_COST * pairs * per_pair / gain * mode_factor(MODES, call)
    estimate += (call.batch * n_q * _GROUP_COST + _CALL_COST) * _overhead_factor(call)
    if _stacks_apply(call):
        estimate -= call.batch * (n_q - 1) * _GROUP_COST * mode_factor(MODES, call, forward=True)
    return estimate


def _segment_pairs(plan, bs: int, batch: int, q_len: int, kv_len: int) -> int:
    """Over the query tiles of ``bs`` rows, the pairs of the most key tiles of ``bs`` that one segment of ``plan``
    needs there: its queries in the tile see one contiguous range of keys (under the plan's rule: causal, a window,
    or every key), and each key tile that range touches holds an allowed pair, so the layout computes it. Each tile
    counts its own rows (the last query tile may hold fewer than ``bs``) and keys (the last key tile, where a range
    ends in it, may hold fewer): a lower bound of ``_tile_pairs``'s FULL and PARTIAL pairs, exact where each query
    tile's pairs come from one segment (padded rows). Example: one causal
    segment of 256 tokens in tiles of 64: (1 + 2 + 3 + 4) tiles of 64 x 64. O(N + tiles): one pass in C
    (``segattn.c``: 6.5 us on 106 segments, where the numpy form below took 53 us), or that numpy form where the C
    kernel is not built."""
    lib = _clib.library()
    if isinstance(lib, str):
        return _segment_pairs_numpy(plan, bs, batch, q_len, kv_len)
    address, _held = segments_address(plan.segments)
    most = _clib.c_array(ctypes.c_int64, batch * -(-q_len // bs))  # zeroed
    window = -1 if plan.window is None else plan.window
    args = (plan.segments.shape[0], bs, batch, q_len, kv_len, int(plan.causal), window)
    return int(lib.attnmask_segment_tile_pairs(address, *args, most))


def _segment_pairs_numpy(plan, bs: int, batch: int, q_len: int, kv_len: int) -> int:
    """:func:`_segment_pairs` in numpy (vectorised over the segments' query tiles)."""
    s = plan.segments.numpy()
    s = s[s[:, 2] > 0]
    if not len(s):
        return 0
    b, qs, ql, ks, kl, off = s.T
    first, last = qs // bs, (qs + ql - 1) // bs
    n = last - first + 1
    seg = np.repeat(np.arange(len(s)), n)
    tile = first[seg] + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    a = np.maximum(qs[seg], tile * bs) - qs[seg]  # the segment's first and last query in the tile (its own indices)
    e = np.minimum(qs[seg] + ql[seg], (tile + 1) * bs) - qs[seg] - 1
    lo, hi = np.zeros_like(a), kl[seg]
    if plan.causal or plan.window is not None:
        hi = np.clip(e + off[seg] + 1, 0, kl[seg])  # the last query's keys: [0, hi)
        if plan.window is not None:
            lo = np.clip(a + off[seg] + 1 - plan.window, 0, kl[seg])  # the first query's first key
    end_tile = (ks[seg] + hi - 1) // bs
    count = np.where(hi > lo, end_tile - (ks[seg] + lo) // bs + 1, 0)
    n_k = -(-kv_len // bs)
    # the keys of the tiles the range touches: the last key tile, the only short one, with its own keys
    keys = count * bs - np.where((count > 0) & (end_tile == n_k - 1), n_k * bs - kv_len, 0)
    n_q = -(-q_len // bs)
    most = np.zeros(batch * n_q, dtype=np.int64)
    np.maximum.at(most, b[seg] * n_q + tile, keys)
    rows = np.full(n_q, bs, dtype=np.int64)
    rows[-1] = q_len - (n_q - 1) * bs
    return int((np.tile(rows, batch) * most).sum())


def stack_saving(call) -> float:
    """What the forward's stacks save of ``cost``'s per-group charge: a stack is charged as one group (one kernel call,
    one copy into place), in the forward's mode factor whether or not a backward follows (the backward runs group by
    group). 0 where ``run`` stacks nothing."""
    if not _stacks_apply(call):
        return 0.0
    layout = cached(call, "layout", _layout)
    rows = call.batch if layout.batch_size == 1 else 1
    stacked, stacks = cached(call, "blocksparse_stack_count", _stack_count)
    forward = mode_factor(MODES, call, forward=True)
    return (stacked - stacks) * rows * _GROUP_COST * forward


def _runs_flash(dtype: torch.dtype, device_type: str, head_dim: int, value_dim: int) -> bool:
    """Whether the forward runs the CPU flash kernel (else the portable tile loop): on the CPU, computing in float32
    (float16 / bfloat16 inputs are cast), D == Dv, and this torch has the kernel."""
    return (
        USE_CPU_FLASH
        and device_type == "cpu"
        and _computes_in_float32(dtype)
        and head_dim == value_dim
        and _flash_cpu_ops() is not None
    )


@functools.cache
def _computes_in_float32(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` promotes to float32 (float32 and the half types), asked once per dtype: a torch call,
    several us right after a kernel, which the floor and the estimate asked on every choice."""
    return torch.promote_types(dtype, torch.float32) == torch.float32


def _stacks_apply(call) -> bool:
    """Whether ``run`` would stack query groups (``_stacks``): only on the CPU flash kernel's path."""
    return STACK_GROUPS and _runs_flash(call.q.dtype, call.device_type, call.head_dim, call.value_dim)


def _stack_count(call) -> tuple[int, int]:
    """``(query tiles in stacks, stacks)`` of the call's layout as ``_stacks`` would form them, from the tile classes
    alone (the estimate plans no group): runs of at least two consecutive query tiles of a batch row that compute one
    contiguous run of key tiles (at most ``MAX_KEYS`` keys) with the same classes at the same offset from the tile
    (which, for a spec the same along the diagonal such as a window or chunks, gives them the same PARTIAL masks).
    O(B·nQ·nK) in numpy."""
    layout = cached(call, "layout", _layout)
    c = layout.classes.to("cpu", torch.int8).numpy()
    batch, nq, nk = c.shape
    if nq < 2 or nk == 0:
        return 0, 0
    # row i's classes placed from column nq - i: equal rows are the same pattern relative to the diagonal
    relative = np.zeros((batch, nq, nq + nk), dtype=np.int8)
    relative[:, np.arange(nq)[:, None], np.arange(nk)[None, :] - np.arange(nq)[:, None] + nq] = c
    on = c != NONE
    first, last = on.argmax(-1), nk - 1 - on[..., ::-1].argmax(-1)
    span = last - first + 1  # a run longer than MAX_KEYS keys is split in two (_plan): not stacked
    one_run = on.any(-1) & (on.sum(-1) == span) & (span * layout.block_size <= max(MAX_KEYS, layout.block_size))
    same = one_run[:, 1:] & one_run[:, :-1] & (relative[:, 1:] == relative[:, :-1]).all(-1)  # (B, nq - 1)
    return _true_runs(same)


def _true_runs(same: np.ndarray) -> tuple[int, int]:
    """``(tiles in stacks, stacks)`` of ``same`` ``(B, n)`` bool: a run of ``r`` consecutive True in a row is a stack
    of ``r + 1`` tiles. All rows at once: a False column on each side of every row keeps runs inside their row."""
    framed = np.zeros((same.shape[0], same.shape[1] + 2), dtype=np.int8)  # np.pad: ~10x the time of these two lines
    framed[:, 1:-1] = same
    edges = np.diff(framed.reshape(-1))
    lengths = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    return int((lengths + 1).sum()), len(lengths)


def _task_weights(call) -> tuple[float, ...]:
    """The weights ``run`` gives ``parallel_map``: the multiply-adds of each query group of the layout (no element
    mask evaluated). Where the estimate can tell which groups ``run`` stacks without evaluating a mask
    (``_plan_stacks``), those are summed per piece as ``_tasks`` cuts them: each dealt task costs a hand-over
    (``_HANDOVER_COST``), so a stack's pieces, not its groups, are what the threads' gain counts."""
    weights = cached(call, "blocksparse_weights", _plan_weights)
    if not _stacks_apply(call):
        return weights
    stacks = cached(call, "blocksparse_plan_stacks", _call_plan_stacks)  # the pieces depend on the threads: not kept
    cuts, alone = _deal(list(stacks), len(weights), _workers.threads_available())
    return tuple([sum(weights[gi] for gi in stacks[i][a:b]) for i, a, b in cuts] + [weights[gi] for gi in alone])


def _plan_weights(call) -> tuple[float, ...]:
    """``_group_weights`` of the call's plan (kept with the plans)."""
    return tuple(_group_weights(cached(call, "blocksparse_plan", _layout_plan), call.q, call.v))


def _call_plan_stacks(call) -> tuple[tuple[int, ...], ...]:
    """``_plan_stacks`` of the call's plan and layout (kept with the plans)."""
    return _plan_stacks(cached(call, "blocksparse_plan", _layout_plan), cached(call, "layout", _layout))


# Specs whose every part is a predicate of q - k alone: on contiguous positions, two tiles at the same offset from the
# diagonal hold the same mask.
_DIAGONAL_PARTS = (M.Full, M.Causal, M.SlidingWindow, M.LocalWindow, M.And, M.Or, M.Not)


def _plan_stacks(plan, layout) -> tuple[tuple[int, ...], ...]:
    """The groups of ``plan`` that ``_stacks`` stacks, found without an element mask: runs of at least two
    consecutive groups of one batch row, each with one key run of the same length at the same offset from its first
    query and the same PARTIAL key ranges relative to it. Only for specs of parts in ``_DIAGONAL_PARTS`` on contiguous
    positions, whose PARTIAL masks then match as ``_stacks`` asks (``_stacks`` also leaves out a group with a row that
    sees no key, which these specs have at most at the edges of the rows); other specs (documents, padding, chunks: a
    boundary inside a tile changes its mask) get ``()``, every group its own task. O(groups + Q + K)."""
    if not all(isinstance(part, _DIAGONAL_PARTS) for part in layout.spec.walk()):
        return ()
    for pos in (layout.q_positions, layout.kv_positions):
        if pos.dim() != 1 or (pos.numel() > 1 and not bool((pos.diff() == 1).all())):
            return ()

    def signature(g: _Group):
        if len(g.runs) != 1:
            return None
        r = g.runs[0]
        return (g.b, g.q1 - g.q0, r.k1 - r.k0, r.k0 - g.q0, tuple((a - r.k0, b - r.k0) for a, b in r.partial))

    signatures = [signature(g) for g in plan]
    out, start = [], 0
    for end in range(1, len(plan) + 1):
        same = end < len(plan) and signatures[end] is not None and signatures[end] == signatures[start]
        if same and plan[end].q0 == plan[end - 1].q1:
            continue
        if signatures[start] is not None and end - start >= 2:
            out.append(tuple(range(start, end)))
        start = end
    return tuple(out)


def _layout_plan(call):
    """The query groups of the call's layout (``_plan``), kept with the plans: the estimate weighs them, ``run``
    computes them (``_layout_groups``)."""
    layout = cached(call, "layout", _layout)
    classes = layout.classes
    if classes.shape[0] == 1 and call.batch > 1:
        classes = classes.expand(call.batch, *classes.shape[1:])
    bs = layout.block_size
    return _plan(classes, bs, bs, call.q_len, call.kv_len, max(MAX_KEYS, bs), max(MAX_ROWS, bs))


def _layout_groups(call):
    """The layout's query groups, the element masks of its PARTIAL tiles and, for the CPU flash kernel, their shared
    additive biases (``_shared_biases``) and rows with no allowed key (``_empty_rows``; None: the forward finds them),
    kept with the plans: O(partial tiles · block_size²) bools, which the forward keeps for the backward anyway, and at
    most ``_BIAS_BUDGET`` floats."""
    layout = cached(call, "layout", _layout)
    plan = cached(call, "blocksparse_plan", _layout_plan)
    masks = _spec_group_masks(plan, layout.spec, layout.q_positions, layout.kv_positions, layout.block_size)
    flash = call.device_type == "cpu" and torch.promote_types(call.q.dtype, torch.float32) == torch.float32
    rep = call.heads // call.kv_heads
    if not flash:
        return plan, masks, {}, None, ()
    biases, empties = _shared_biases(plan, masks, rep), _empty_rows(plan, masks, rep)
    return plan, masks, biases, empties, _stacks(plan, masks, biases, empties)


def cover(call) -> tuple[tuple[int, int, int, int, int], ...]:
    """The dense blocks ``run`` computes for a call: ``(b, q0, q1, k0, k1)``, queries ``[q0, q1)`` of batch row ``b``
    against keys ``[k0, k1)``, one per key run of every query group (FULL and PARTIAL tiles together, split at
    ``MAX_KEYS``). Every allowed pair lies in one block; ``benchmarks/bench_limit.py`` times unmasked SDPA on them
    (the floor of this tiling). Example: ``causal()`` on rows of 256 (tiles of 64) gives ``((0, 0, 64, 0, 64),
    (0, 64, 128, 0, 128), (0, 128, 192, 0, 192), (0, 192, 256, 0, 256))``."""
    plan = cached(call, "blocksparse", _layout_groups)[0]
    return tuple((g.b, g.q0, g.q1, r.k0, r.k1) for g in plan for r in g.runs)


def run(call) -> torch.Tensor:
    plan, masks, biases, empties, stacks = cached(call, "blocksparse", _layout_groups)
    return _BlockSparse.apply(call.q, call.k, call.v, plan, masks, call.scale, biases, empties, stacks)


def run_layout(q, k, v, layout, *, scale: float | None = None) -> torch.Tensor:
    """``blocksparse_attention`` over a ``BlockLayout`` (its classes, block size, positions and spec)."""
    tile_mask = spec_tile_mask(layout.spec, layout.q_positions, layout.kv_positions)
    return blocksparse_attention(q, k, v, layout.classes, layout.block_size, tile_mask, scale=scale)


BACKEND = Backend(
    "blocksparse",
    run,
    cost,
    devices=TORCH_DEVICES,
    dtypes=ALL_DTYPES,
    masks=frozenset({"structural", "custom"}),
    propagates_nonfinite=frozenset({"cpu"}),  # checked by tests/test_conformance.py
    unsupported=unsupported,
    floor=floor,
)
