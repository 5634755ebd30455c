"""The "native" attention backend: per-document attention in a small C kernel, for rows of many short documents.

Layer 3 (attention). For each document segment (as ``attnmask.backends._common.segments_from_varlen``
gives them) and head, the kernel in ``segattn.c`` walks the queries and, for each, only the keys it may see: scores,
softmax and the weighted sum of values in one pass, forward and backward (a hand-written gradient through the saved
log-sum-exp). It computes exactly the useful pairs with no per-document call, no gather and no mask, which is what
thousands of documents of a few tokens need: there the per-document SDPA loop pays tens of microseconds per call and
batched matmuls pay per tiny matrix. From ``BLOCK_MIN_QUERIES`` queries a call, a document of ``BLOCK_MIN_KEYS`` keys
or more takes the kernel's blocked form (its keys transposed once, four query rows scored per step, the rows in
panels that walk their keys in cache-sized tiles with an online softmax, four rows' or four keys' sums held in
registers), which made documents of hundreds of tokens, windows, chunks and long causal rows its ground too (RESULTS.md,
issue 15, "native's blocked form", "native's tiles"); ``"auto"`` chooses by ``cost``. Its plan is
``_common.native_plan``: the varlen segments, and for padded rows whose padding queries see real keys (right padding
under ``causal()``), those queries in the row's segment too (more queries than keys: each sees the keys its rule
allows), which a varlen kernel, computing only the sequences, cannot express. In bfloat16 on a CPU with AMX-BF16 tiles
the forward of those blocked segments and its backward run on the tiles (``_on_tiles``, ``_tiles_backward``: products
of bfloat16 with float32 sums, the softmax in float32, q, k and v read as stored): 2.9-3.8x the float32 arithmetic's
speed forward on rows of 8,192 and 1.8-2.8x with a backward (``benchmarks/bench_tiles.py``; RESULTS.md, issue 15,
"native's bfloat16 on AMX tiles", "The tiles' backward's finiteness check").

The C source is compiled on first use with the system C compiler and loaded with ctypes (``backends._clib``).
Without a compiler, or with ``ATTNMASK_NATIVE=0``, the backend reports itself unsupported and ``"auto"`` uses the
others.

Semantics are those of every attnmask backend (``tests/naive.py::naive_attention``): CPU tensors, float32 and float64
computed in their own precision, float16 / bfloat16 computed in float32; rows with no allowed key give exactly 0 and a
zero gradient; grouped-query attention. Threads: ``torch.get_num_threads()``, fewer while other processes hold cores
(``backends._workers.region_threads``), as an OpenMP team (torch's own, with GCC's runtime), pulling the forward's
(query block, head) items (``forward_items``: a long segment cut into blocks, so that one window or one long document
uses every thread) and the backward's (segment, key/value head) items.

Worked example, three documents of lengths 2, 4, 3 in one row, causal inside each::

    >>> segs = _common.segments_from_varlen((causal() & document(seq_lens=[2, 4, 3])).varlen(9), 1, 9, 9)
    >>> q = k = v = torch.randn(1, 2, 9, 8)
    >>> segment_attention(q, k, v, segs, causal=True).shape    # (B, H, Q, Dv); query 3 sees keys 2 and 3
    torch.Size([1, 2, 9, 8])
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

import numpy as np
import torch

import attnmask.backends._common as _common
import attnmask.backends._workers as _workers
from attnmask._dense import empty_buffer
from attnmask.backends._clib import c_array
from attnmask.backends._clib import library as _library
from attnmask.backends._common import (
    COPY_COST,
    ModeFactors,
    cached,
    check_segments,
    float64_address,
    mode_factor,
    native_plan,
    pair_width,
    per_cpu_kind,
    segments_address,
)
from attnmask.backends._workers import on_free_cores, region_threads
from attnmask.backends.contract import ALL_DTYPES, SCORE_MODS, Backend, check_score_mods
from attnmask.errors import BackendError, DeviceError, DTypeError, bad

__all__ = ["BACKEND", "native_available", "segment_attention"]

# Windows wider than any query-key distance (positions and offsets stay within 2**41) all mean "no limit": clamped to
# this, so that the kernel's int64 arithmetic never overflows.
_WIDEST = 1 << 60


def native_available() -> str | None:
    """``None`` when the C kernel is built and loaded (building it on first call), else the reason it is not."""
    lib = _library()
    return lib if isinstance(lib, str) else None


# ----------------------------------------------------------------------------------------------------------------------
# The kernel call


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(t: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """``t`` in ``work`` dtype with a contiguous last dimension (strided otherwise: no copy when it already is)."""
    if t.dtype != work:
        t = t.to(work)
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


# From this many queries a call (a whole call's, so that the threads' query blocks of one segment compute alike) the
# kernel takes its blocked form: each item's keys (and in the backward its values) copied once transposed, then four
# query rows at a time scored against them without a horizontal sum per score, and in the backward each key's dk and
# dv rows updated once for the four. Fewer queries (a decoding step of 1-3) keep the row form: each key is read by a
# few queries and its copy would cost more than it saves. Measured on the Xeon VM (RESULTS.md, issue 15, "native's
# blocked form"): packed rows of 256 tokens, D = 16, forward 6.0 -> 3.4 ms, forward + backward 20.7 -> 15.1 ms.
# From 4 queries (was 16): the row form walks every key once per query, so 4-15 queries against a long cache streamed
# it 4-15 times. Decoding against 32,768 keys, H = 4, D = 64, the two forms interleaved in one process (RESULTS.md,
# issue 15, "Decoding steps of 4-15 queries in native's blocked form"), blocked against row: float32 forward 8
# queries 13.7 -> 8.5 ms at two threads (31.6 -> 16.1 at one), with a backward 70 -> 52; 12 queries 21.5 -> 8.5 ms;
# 4-7 queries 1.11-1.45x faster forward at two threads (1.33-1.75x at one) and 1.08-1.30x with a backward (1.22-1.49x),
# against 4,096 keys 1.12-1.32x at one thread; bfloat16, whose row form reads the cache as stored, 0.89-1.10x forward
# and 1.13-1.28x with a backward at 4-7 queries, 8 queries 8.2 -> 6.7 ms. At 3 queries the row form is as fast or
# faster (blocked 0.67-1.08x), and at 1-2 (a decoding step) it is the faster.
BLOCK_MIN_QUERIES = 4
# ... and only on a segment of at least this many keys (a segment's keys stay whole in the threads' query blocks, so
# its rows compute alike whatever the cut): on shorter ones the copy and the blocks of four cost what they save.
# Causal documents of one length on rows of 1,024 tokens, D = 64, one thread, the two forms interleaved (RESULTS.md,
# issue 15, "native's blocked form"): the blocked form 1.05-1.2x slower on documents of 8-24 tokens, even at 32,
# 1.0-1.1x faster at 48, 1.2-1.3x at 64 and 1.15-1.35x at 96 (forward + backward). Per CPU kind
# (``_common.per_cpu_kind``: with AMX tiles, other): on the AMD EPYC, once the row form took four short rows at once,
# the row form ran documents of 24-64 tokens in 0.61-0.92x the blocked form's time (float32 and bfloat16, forward and
# with a backward, one and two threads; 48-96 tokens 0.91-1.03x), tiny ones (8-32) in 0.80-0.98x; from 64 keys there:
# a threshold of 96-160 cost documents of 64-160 tokens up to 1.34x in bfloat16 with a backward (RESULTS.md, issue 15,
# "Rows four at a time"). The Xeon's 32 was measured before that.
_BLOCK_MIN_KEYS = (32, 64)
BLOCK_MIN_KEYS = per_cpu_kind(_BLOCK_MIN_KEYS)
_NEVER = 1 << 62
# The blocked form's rows go in panels of PANEL_ROWS (a multiple of four) that walk their keys in tiles of TILE_KEYS,
# so that a tile's keys and values (in the backward also their dk and dv rows) stay in cache while the panel's rows
# use them (segattn.c). Before the tiles every block of four rows read its whole run of keys again: causal rows of
# 8,192 tokens streamed megabytes per block (RESULTS.md, issue 15, "native's tiles"). The forward walks tiles of
# FORWARD_TILE_KEYS: twice as many keys per tile halve a row's online-softmax steps and rescales; rows of 8,192 tokens,
# two threads, interleaved in one process, 512 against 256: windows of 512-4,096 and chunks of 1,024 2-6% faster,
# causal rows of 1,024 1-3%; the backward (dk and dv rows too) kept 256, where 512-1,024 read 0-3% slower (RESULTS.md,
# issue 15, "native's key copies, tiles and pulls"). The forward's tiles start at each four rows' first key, a last
# piece under an eighth of a tile joining the one before, so a window of 512 walks one tile a row, not two (windows of
# 256-512 4-5% faster; RESULTS.md, issue 15, "Tiles from a block's first key").
TILE_KEYS = 256
FORWARD_TILE_KEYS = 512
PANEL_ROWS = 64


def _block_keys(q_len: int) -> int:
    """The fewest keys a segment needs for the blocked form in a call of ``q_len`` queries (``_NEVER``: none)."""
    return BLOCK_MIN_KEYS if q_len >= BLOCK_MIN_QUERIES else _NEVER


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _call(backward, q, k, v, res, dout, lse, grads, segs, rule, mods, tiles, threads, zero_grads=False) -> None:
    """One kernel call. ``rule``: ``(causal, window, scale)``; ``mods``: ``(softcap or 0, sinks, slopes)``, the
    tensors ``(H,)`` contiguous in the kernel's dtype or ``None``; ``tiles``: bfloat16 on AMX tiles (``_on_tiles``,
    ``_tiles_backward``); ``zero_grads``: the backward's items zero their gradient rows first (``grads`` then
    ``torch.empty``, ``segs`` with ``_gradient_gaps``' items: see ``_SegmentAttention.backward``)."""
    causal, window, scale = rule
    softcap, sinks, slopes = mods
    lib = _library()
    if isinstance(lib, str):
        raise bad(BackendError, "backend", "a built C kernel for 'native'", lib)
    dq, dk, dv = grads if grads is not None else (None, None, None)
    strided = (q, k, v, res, dout if dout is not None else res)
    # ctypes arrays, not tensors, and the longest segment found by the kernel: two small torch ops and a reduction
    # took ~45 us of a call right after a kernel (8 rows of 256, float32)
    strides = _int64s([s for t in strided for s in t.stride()[:3]] + [k.shape[2]])
    block_keys = _block_keys(q.shape[2])
    dims = [q.shape[1], k.shape[1], q.shape[2], q.shape[3], v.shape[3], int(zero_grads), window or 0, int(causal)]
    dims.append(block_keys)
    dims = _int64s(dims + [TILE_KEYS if backward else FORWARD_TILE_KEYS, PANEL_ROWS])
    # bfloat16 read as stored: 16 a forward only, 17 on the tiles; 19 and 18 the same writing bfloat16 (``_out_dtype``)
    read = (18 if tiles else 19) if res.dtype == torch.bfloat16 else (17 if tiles else 16)
    bits = {torch.float64: 64, torch.bfloat16: read}.get(q.dtype, 32)
    status = lib.attnmask_segattn(
        bits,
        int(backward),
        *(_ptr(t) for t in (q, k, v, res, dout, lse, dq, dk, dv)),
        ctypes.addressof(strides),
        ctypes.addressof(dims),
        _ptr(segs),
        len(segs),
        float(scale),
        float(softcap),
        _ptr(sinks),
        _ptr(slopes),
        threads,
    )
    if status == 1:
        raise MemoryError("attnmask native kernel: a thread's scratch allocation failed")
    if status != 0:  # a dtype or pass the kernel was not built for: a caller's bug, never a user's input
        raise RuntimeError(f"attnmask native kernel: status {status} for {q.dtype}, backward={backward}")


def _int64s(values: list[int]) -> ctypes.Array:
    """``values`` as a C array of int64 (alive while the caller holds it)."""
    return c_array(ctypes.c_int64, len(values), values)


def _uncovered(segs: torch.Tensor, B: int, Q: int) -> torch.Tensor:
    """The query ranges of the ``B`` rows of ``Q`` queries in none of ``segs``' (disjoint) ranges, as segments of no
    key ``(row, q_start, q_len, 0, 0, 0)``, ``(G, 6)`` int64 by row and start: the forward runs them as items, whose
    rows the kernel writes 0 (log-sum-exp -inf) as it writes a row that sees no key, so that the output is written
    once, not zeroed whole first (8 rows of 256 with trailing padding, float32, two threads: zeroing the 2 MiB output
    took ~0.1 ms of a 1.2 ms call). One pass in C (``attnmask_uncovered``; a sort where the segments are not by row
    and start), or the numpy form (``_uncovered_numpy``, ~15 operations: ~160 us right after a kernel) where the
    library is not built. O(N) in the segments (O(N log N) unsorted), nothing per query."""
    lib = _library()
    if not isinstance(lib, str):
        address, _held = segments_address(segs)
        out = torch.empty((len(segs) + B, 6), dtype=torch.int64)  # data_ptr: a numpy array's ctypes.data costs more
        count = lib.attnmask_uncovered(address, len(segs), B, Q, out.data_ptr())
        if count >= 0:
            return out[:count]
    return _uncovered_numpy(segs, B, Q)


def _uncovered_numpy(segs: torch.Tensor, B: int, Q: int) -> torch.Tensor:
    s = segs.numpy()
    if int(s[:, 2].sum()) == B * Q:
        return torch.empty((0, 6), dtype=torch.int64)
    s = s[s[:, 2] > 0]
    s = s[np.lexsort((s[:, 1], s[:, 0]))]
    rows, starts, ends = s[:, 0], s[:, 1], s[:, 1] + s[:, 2]
    first = np.ones(len(s), dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    last = np.ones(len(s), dtype=bool)
    last[:-1] = first[1:]
    before = np.where(first, 0, np.roll(ends, 1))  # where the range before a segment's starts (0: the row's start)
    empty = np.setdiff1d(np.arange(B), rows)  # rows in no segment
    gap_rows = np.concatenate((rows, rows[last], empty))
    gap_starts = np.concatenate((before, ends[last], np.zeros(len(empty), dtype=np.int64)))
    gap_ends = np.concatenate((starts, np.full(int(last.sum()), Q), np.full(len(empty), Q)))
    keep = gap_ends > gap_starts
    order = np.lexsort((gap_starts[keep], gap_rows[keep]))
    gaps = np.zeros((int(keep.sum()), 6), dtype=np.int64)
    gaps[:, 0], gaps[:, 1], gaps[:, 2] = (
        gap_rows[keep][order],
        gap_starts[keep][order],
        (gap_ends - gap_starts)[keep][order],
    )
    return torch.from_numpy(gaps)


# The backward's gradients are zeroed where they are written: each item zeroes the dq, dk and dv rows it owns right
# before adding into them (segattn.c, zero_grads), instead of three torch.zeros passes over the whole gradients first,
# where every item's rows fit in cache; an item whose rows are larger would evict them before it adds into most of them.
_ZERO_IN_KERNEL_BYTES = 1 << 20


def _item_rows_bytes(segs: torch.Tensor, q: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> int:
    """An upper bound on the gradient bytes one backward item owns: the longest segment's queries on the query heads
    of a key/value head (dq) and its keys (dk, dv)."""
    if not len(segs):
        return 0
    rows = segs[:, 2:5:2].amax(0).tolist()  # the most queries, the most keys
    rep = q.shape[1] // v.shape[1]
    return (rows[0] * rep * q.shape[3] + rows[1] * (q.shape[3] + v.shape[3])) * dtype.itemsize


def _gradient_gaps(segs: torch.Tensor, gaps: torch.Tensor, B: int, K: int) -> torch.Tensor:
    """Items of the backward for the gradient rows in no segment of ``segs`` (``(N, 6)``, key ranges disjoint) on
    ``B`` rows of ``K`` keys: ``gaps``, the query rows in none (``_uncovered``'s, ``(b, q_start, q_len, 0, 0, 0)``),
    then the key rows in none as ``(b, 0, 0, k_start, k_len, 0)``: items of no key or no query, whose rows the kernel
    only zeroes. O(N) in the segments (one C pass), nothing per row."""
    keys = _uncovered(segs[:, [0, 3, 4, 3, 4, 5]], B, K)
    if not len(keys):
        return gaps
    items = torch.zeros_like(keys)
    items[:, 0], items[:, 3], items[:, 4] = keys[:, 0], keys[:, 1], keys[:, 2]
    return torch.cat((gaps, items)) if len(gaps) else items


def _keys_disjoint(segs: torch.Tensor) -> bool:
    """Whether no two segments of a row share a key (then each thread owns the dk / dv rows it writes). ``segs``
    ``(N, 6)`` on the CPU: one pass in C (``attnmask_keys_disjoint``; the numpy form, ``_keys_disjoint_numpy``,
    a sort and two comparisons, took 40-70 us of a fresh spec's choice with a backward on 8 rows of 256 right after a
    kernel), or that form where the library is not built."""
    if len(segs) < 2:
        return True
    lib = _library()
    if not isinstance(lib, str):
        address, _held = segments_address(segs)
        disjoint = lib.attnmask_keys_disjoint(address, segs.shape[0])
        if disjoint >= 0:
            return bool(disjoint)
    return _keys_disjoint_numpy(segs)


def _keys_disjoint_numpy(segs: torch.Tensor) -> bool:
    """:func:`_keys_disjoint` in numpy on the segments' view (a few hundred segments: ~4x cheaper than torch ops)."""
    s = segs.numpy()
    s = s[np.lexsort((s[:, 3], s[:, 0]))]  # by row, then first key
    same_row = s[1:, 0] == s[:-1, 0]
    return not bool((same_row & (s[1:, 3] < s[:-1, 3] + s[:-1, 4])).any())


# bfloat16 inputs: the forward either makes float32 copies of q, k and v and runs on them, or reads them as stored,
# widening each element as it loads it (segattn.c, dtype_bits 16). Widening costs on every pair, so it pays only
# where each key is read by few queries, above all a decoding step, whose copies would be of the whole cache; and the
# copies cost most when they are large enough that glibc maps them anew on every call (from 32 MiB, its largest
# mmap threshold: fresh pages to fault in). Measured at 2 threads on an AMD EPYC VM, H = 4, Hkv = 2, D = 64, one
# process (RESULTS.md, issue 15, "bfloat16 read as stored"): 4,096 keys, copies / as stored 1.24x at 1 query, 1.04x at
# 2, 0.84x at 16; 32,768 keys 2.37x at 1, 1.14x at 16, 1.03x at 32; documents of ~60-180 tokens and windows (tens to
# hundreds of queries a key) 0.71-0.90x.
_AS_STORED_MAX_READS = 2.0  # queries reading a key (allowed pairs / segment keys) up to which bfloat16 is read as is
_AS_STORED_MAX_READS_FRESH = 16.0  # the same where the float32 copies of k and v would take _FRESH_COPY_BYTES or more
_FRESH_COPY_BYTES = 32 << 20
# The same for a forward that no backward follows (whose copies no backward would reuse), on a CPU with AMX tiles
# (AVX512-BF16 widens a vector of bfloat16 in one instruction): rows of 8,192 in documents of 8 and 16 tokens (4.5 and
# 8.5 queries a key, the kernel's row form), as stored over copies 0.61-0.64x the time at two threads and 0.39-0.88x
# at one, documents of 8-32 tokens 0.50-0.63x and 0.73-0.90x (rows of 1,024: 0.63x and 0.82x); with a backward, which
# then makes the copies itself, 1.01-1.13x, so that keeps _AS_STORED_MAX_READS (RESULTS.md, issue 15, "The layers
# after the first"). Longer segments (32 keys or more, 16.5 reads and up) take the tiles, which read as stored anyway.
# Elsewhere the AMD EPYC's copies' rule above. Since 2026-12-07 the row form widens an item's q, k and v to float32
# once (in cache, no more conversions than the copies make) and a forward with no backward writes bfloat16 itself, so a
# call whose every segment runs in the row form and is widened there reads as stored whatever its reads, on every CPU:
# documents of 8-32, 16 and 24 tokens on rows of 8,192 (D = 64 and 48), one and two threads, as stored over copies
# 0.60-0.77x (RESULTS.md, issue 15, "bfloat16 rows widened once and written as bfloat16"). The kernel widens segments
# of at most _WIDEN_MAX_KEYS keys (segattn.c's WIDEN_MAX_KEYS); a decoding step's longer cache converts as it loads,
# and keeps the rule by reads. On the AMD EPYC (AVX512-BF16, no tiles) a forward with no backward reads as stored
# whatever its reads: one process per run, runs alternating, rows of 8,192, H = 4, D = 64, one and two threads, as
# stored over copies 0.70-0.83x on documents of 8-32 tokens (a 32-token one takes the blocked form, so the row-form
# rule above left the call on copies), 0.29-0.88x on documents of 32-512 (the copies' fresh buffers faulted in on most
# calls), 0.67-0.91x on documents of 512-3,000 and 0.84-0.99x on a causal row of 8,192 (RESULTS.md, issue 15,
# "bfloat16 as stored on the AMD EPYC"); before, 2.0.
_AS_STORED_MAX_READS_NO_GRADS = (16.0, float("inf"))
_AS_STORED_MAX_READS_NO_GRAD = per_cpu_kind(_AS_STORED_MAX_READS_NO_GRADS)
_WIDEN_MAX_KEYS = 256


def _backward_reads_as_stored(segs: torch.Tensor, disjoint: bool | None = None) -> bool:
    """Whether the kernel's backward takes bfloat16 ``q``, ``k``, ``v`` and ``dout`` as stored and writes bfloat16
    gradients (segattn.c's ``backward_item_bf16``, dtype_bits 16): no two segments share a key (``disjoint``, when
    the caller has ``_keys_disjoint(segs)`` already) and each has at most ``_WIDEN_MAX_KEYS`` keys, which each item
    widens once. Where it does, the forward with a gradient to follow reads
    them as stored too (its float32 copies would serve no backward): documents of 8-256 tokens in bfloat16, forward
    and backward, in 0.74-0.95x the time on the AMD EPYC, tiny ones 0.74-0.80x (RESULTS.md, issue 15, "bfloat16
    training read as stored")."""
    if not len(segs) or int(segs[:, 4].max()) > _WIDEN_MAX_KEYS:
        return False
    return _keys_disjoint(segs) if disjoint is None else disjoint


def _reads_as_stored(
    dtype: torch.dtype, kv_elements: int, segs: torch.Tensor, rule: tuple, grad: bool, q_len: int
) -> bool:
    """Whether the forward of ``q_len`` queries reads bfloat16 ``q``, ``k``, ``v`` as stored (no float32 copies):
    with no backward to follow (``grad`` false) where every segment runs in the kernel's row form (under
    ``_block_keys``) and is widened there once (at most ``_WIDEN_MAX_KEYS`` keys); with one, where the backward
    reads them as stored too (``_backward_reads_as_stored``); else where the segments' keys are
    each read by at most ``_AS_STORED_MAX_READS`` queries on average (``_AS_STORED_MAX_READS_NO_GRAD`` without
    ``grad``; at least ``_AS_STORED_MAX_READS_FRESH`` when the copies of k and v, ``kv_elements`` in all, would take
    ``_FRESH_COPY_BYTES`` or more). Other dtypes: no (float16 is always copied). Read from shapes and the plan only:
    the estimate asks it too."""
    if dtype != torch.bfloat16 or not len(segs):
        return False
    if not grad and int(segs[:, 4].max()) < min(_block_keys(q_len), _WIDEN_MAX_KEYS + 1):
        return True
    if grad and _backward_reads_as_stored(segs):
        return True
    keys = float(segs[:, 4].sum())
    reads = allowed_pairs(segs, *rule) / keys if keys else 0.0
    most = _AS_STORED_MAX_READS if grad else _AS_STORED_MAX_READS_NO_GRAD
    if kv_elements * 4 >= _FRESH_COPY_BYTES:
        most = max(most, _AS_STORED_MAX_READS_FRESH)
    return reads <= most


# The bfloat16 forward on AMX tiles (segattn.c, dtype_bits 17): q . k and p . v as tile products of bfloat16 with
# float32 sums (the weights rounded to bfloat16 for p . v, as torch's own bfloat16 kernels do), the softmax in float32;
# q, k and v read as stored. It runs a segment of at least BLOCK_MIN_KEYS keys in a call of at least
# BLOCK_MIN_QUERIES queries (the blocked form's ground); the kernel's row form keeps the rest. Taken where most of the
# call's pairs are on that ground (_TILES_MIN_SHARE), with no score modifier, D a multiple of 32 and Dv of 16, on a
# CPU with AMX-BF16 whose kernel was built with it, Linux granting the tiles' state; ATTNMASK_NATIVE_AMX=0 turns it
# off. Its backward runs on the tiles too where Dv is a multiple of 32, most pairs are in segments of
# _TILES_BACKWARD_MIN_KEYS keys or more, and q, k and dout are finite (``_tiles_backward``, ``_finite``), else on
# float32 copies. Rows of 8,192, two threads, against the float32 arithmetic on copies: forward 2.9-3.8x faster,
# with a backward 1.8-2.8x (RESULTS.md, issue 15, "The tiles' backward's finiteness check").
_TILES_MIN_SHARE = 0.5
# The forward's pairs and key copies in the blocked form's segments, which the tiles run, cost this share of the
# blocked form's float32 charges (``_tiles_share``; the shorter segments stay on the row form and its charges), its
# threads gaining as float32's (_THREAD_EFFICIENCY: a second thread measured 1.8-1.95x the first's speed there), with
# no float32 copies in the forward; after it the backward on the tiles (Dv a multiple of 32; ``_tiles_backward``), its
# pairs at _TILES_BACKWARD_SCALE of the float32 backward's charges and its passes over the call's elements (gradients
# zeroed in float32 and converted back; no float32 copies of q, k, v) _TILES_BACKWARD_PASSES times at ``COPY_COST``
# (below).
# Fitted by a grid (``bench_limit.py --fit ... --grid``) on the Xeon's bfloat16 tables after both (rows of 8,192 at
# two threads, of 1,024 at one and two; limit_tables/s44b_*): 0.3-0.4 x 0.5-0.7 read 95 of 96 rows within 1.1x of the
# fastest, 0.25 or 0.5 for the forward 90-93, 0.3-0.4 for the backward 92-93 (RESULTS.md, issue 15, "native's
# bfloat16 on AMX tiles"); the middle of the plateau. Until 2026-12-07 06:00 the share scaled the whole forward, the
# row form's segments and every row included: documents of ~60 tokens on rows of 256 and 1,024 read at a third of
# their time next to SDPA's (RESULTS.md, issue 15, "Head sizes on the tiles").
_TILES_PAIR_SCALE = 0.35
# A tiles' pair's width (``_common.pair_width``; the share above holds at ``CALIBRATED_WIDTH``), and each query row of
# the tiles' segments this much more per element than ``_ROW_COST`` (its q transposed by pairs, its block's sums
# zeroed, moved out of the tiles and transposed back, the steps' last keys past its own): fitted on the Xeon's
# bfloat16 head-size tables at one and two threads (bench_head_dim.py --fit; RESULTS.md, issue 15, "Head sizes on the
# tiles").
_TILES_EXTRA_PAIR_WIDTH = 128.0
_TILES_ROW_COST = 25.0
_TILES_BACKWARD_SCALE = 0.6
# The backward's passes over the call's elements, and its key copies where they leave the L2 cache
# (``_tiles_spill``: an item's k, v and k^T copies past _TILES_L2_BYTES, the 2 MiB of L2 a core of every CPU with AMX
# tiles has, each element at _TILES_SPILL_COST). After the finiteness check moved to C a decoding step's backward
# against 4,096 keys ran 1.1-1.55x faster than SDPA's while against 32,768 it stayed 1.25-1.29x slower: from 4K to
# 32K keys its time grew 16-17x, SDPA's 9-10x, its copies then 12 MiB. Fitted by a grid on the fresh bfloat16 tables
# (limit_tables/s45*_8k*_bf16*, s45b_q*_bf16): passes 2 and no spill charge 140 of 144 rows within 1.1x of the
# fastest; passes 1 and 20-80 all 144 (0.5 and 40-80 too); the head-size tables 164 of 168 either way (RESULTS.md,
# issue 15, "The tiles' backward's finiteness check").
_TILES_BACKWARD_PASSES = 1.0
_TILES_L2_BYTES = 2 << 20
_TILES_SPILL_COST = 40.0


# The backward takes the tiles where at least _TILES_MIN_SHARE of the pairs are in segments of this many keys or more:
# its blocks of 16 rows and steps of 32 keys cost more than they save on short documents (rows of 8 x 1,024,
# bfloat16, two threads, interleaved, the tiles' backward's time over the float32 copies': documents of ~24-40 tokens
# 1.26-1.42, ~64-96 0.99-1.06, ~160 0.89; windows and documents of ~400 tokens on rows of 8,192 run 1.3-2.2x faster;
# RESULTS.md, issue 15, "native's bfloat16 on AMX tiles").
_TILES_BACKWARD_MIN_KEYS = 128


def _long_share(segs: torch.Tensor, rule: tuple, keys: int) -> bool:
    """Whether at least ``_TILES_MIN_SHARE`` of the segments' pairs (``rule``: causal, window) are in segments of
    ``keys`` keys or more (none: False). O(segments), on the plan's host tensor."""
    pairs = segment_pairs(segs, *rule).numpy()
    total = float(pairs.sum())
    return total > 0 and float(pairs[segs[:, 4].numpy() >= keys].sum()) >= _TILES_MIN_SHARE * total


def _tiles_backward(segs: torch.Tensor, rule: tuple, dims: tuple[int, int]) -> bool:
    """Whether the backward of a forward that ran on the tiles may run on them too (segattn.c's backward_item_amx),
    from the plan and shapes (the estimate asks it too): Dv (``dims``: D, Dv) a multiple of 32 and most pairs in
    segments of ``_TILES_BACKWARD_MIN_KEYS`` keys or more, under a window of at least as many (a window's rows see
    that many keys of a long segment: rows of 1,024, windows of 32 / 64 / 128, forward + backward on the tiles at
    0.83x / 1.01x / 1.12x the float32 arithmetic's speed; ``bench_tiles.py --quick``). ``_finite`` decides the rest
    at run time."""
    window = rule[1]
    if dims[1] % 32 or (window is not None and window < _TILES_BACKWARD_MIN_KEYS):
        return False
    return _long_share(segs, rule, _TILES_BACKWARD_MIN_KEYS)


def _finite(*tensors: torch.Tensor) -> bool:
    """Whether every element of ``tensors`` is finite (one pass over each). The tiles' backward needs q, k and dout
    so: a tile multiplies every element of its operands, the weight 0 of a pair that may not meet included, and 0
    times an infinite or NaN element would reach rows and keys that never meet it; otherwise the float32 copies'
    backward runs, which multiplies only the pairs that meet. A bfloat16 (B, H, L, D) tensor with contiguous rows is
    read once by the kernel's ``attnmask_finite_bf16`` (torch's ``isfinite(t).all()`` on bfloat16 took 10.6 ms of a
    50 ms forward and backward on rows of 8,192: RESULTS.md, issue 15, "The tiles' backward's finiteness check");
    others by torch."""
    lib = _library()
    for t in tensors:
        if not isinstance(lib, str) and t.dtype == torch.bfloat16 and t.dim() == 4 and t.stride(-1) == 1:
            if not lib.attnmask_finite_bf16(t.data_ptr(), *t.shape, *t.stride()[:3]):
                return False
        elif not bool(torch.isfinite(t).all()):
            return False
    return True


@functools.cache
def amx_ready() -> bool:
    """Whether the kernel's bfloat16 forward may run on AMX tiles here (once per process: it asks Linux for them)."""
    if os.environ.get("ATTNMASK_NATIVE_AMX", "1") == "0":
        return False
    lib = _library()
    return not isinstance(lib, str) and bool(lib.attnmask_amx_ready())


def _on_tiles(dtype: torch.dtype, q_len: int, dims: tuple[int, int], segs: torch.Tensor, rule: tuple, mods) -> bool:
    """Whether the forward of a call of ``q_len`` queries, heads of ``dims`` (D, Dv), runs on AMX tiles: bfloat16,
    no score modifier (``mods``: softcap or 0, sinks, slopes), and at least ``_TILES_MIN_SHARE`` of the segments'
    pairs in segments of ``BLOCK_MIN_KEYS`` keys or more (read from shapes and the plan: the estimate asks it too)."""
    if dtype != torch.bfloat16 or dims[0] % 32 or dims[1] % 16 or q_len < BLOCK_MIN_QUERIES or not len(segs):
        return False
    if mods[0] or mods[1] is not None or mods[2] is not None or not amx_ready():
        return False
    return _long_share(segs, rule, BLOCK_MIN_KEYS)


def _tiles_spill(segs: torch.Tensor, call) -> float:
    """The tiles' backward's key copies that leave the L2 cache: per segment and key/value head whose copies (k, v and
    k^T, (2 D + Dv) bfloat16 a key) pass ``_TILES_L2_BYTES``, its keys' elements at ``_TILES_SPILL_COST``."""
    per_key = 2 * call.head_dim + call.value_dim
    keys = segs[:, 4].numpy()
    spilled = keys[keys * per_key * 2 > _TILES_L2_BYTES]
    return float(spilled.sum()) * per_key * call.kv_heads * _TILES_SPILL_COST


def _out_dtype(read: torch.dtype, work: torch.dtype, grad: bool) -> torch.dtype:
    """The forward's output dtype: bfloat16 where the kernel reads bfloat16 as stored (``read``) and no gradient keeps
    the float32 output, which the kernel then rounds row by row as torch rounds it (segattn.c, dtype_bits 18 and 19:
    no fresh float32 output and no second pass over it; on the tiles, windows and chunks on rows of 8,192 in 0.69-0.90x
    the time, RESULTS.md, issue 15, "The tiles' exponential and bfloat16 output"); else ``work``."""
    return read if read == torch.bfloat16 and not grad else work


def _modifier(t: torch.Tensor | None, work: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.detach().to(work).contiguous()


@dataclass(frozen=True)
class _Prepared:
    """What the forward derives from the segments alone, kept with the plan by ``run`` (each ~5-60 us of numpy or torch
    right after a kernel, on every layer otherwise): ``gaps``, ``_uncovered``'s query ranges in no segment ``(G,
    6)``; the kernel's items on one thread, ``whole`` (the segments, then the gaps), and on more, ``cut``
    (``forward_items`` for ``threads_available()`` threads, then the gaps; ``None``: cut when the kernel takes two
    threads or more); ``pairs``, ``allowed_pairs``."""

    gaps: torch.Tensor
    whole: torch.Tensor
    cut: torch.Tensor | None
    pairs: float


def _prepared(segs: torch.Tensor, B: int, Q: int, causal: bool, window: int | None, cut=None) -> _Prepared:
    """``_Prepared`` of ``segs`` on ``B`` rows of ``Q`` queries (``cut``: ``forward_items`` of them, or ``None``)."""
    gaps = _uncovered(segs, B, Q)

    def then_gaps(items: torch.Tensor) -> torch.Tensor:
        return torch.cat((items, gaps)) if len(gaps) else items

    return _Prepared(
        gaps, then_gaps(segs), None if cut is None else then_gaps(cut), allowed_pairs(segs, causal, window)
    )


def _forward(q, k, v, segs, causal, window, scale, softcap, sinks, slopes, prepared, grad: bool):
    """The kernel's forward of a call: its output in ``q``'s dtype, and what a backward needs (``grad``: a gradient
    follows; else the output may be written in bfloat16 by the kernel, ``_out_dtype``): the tensors it saves and
    ``ctx.meta``."""
    work = _work_dtype(q.dtype)
    mods = (softcap or 0.0, _modifier(sinks, work), _modifier(slopes, work))
    tiles = _on_tiles(q.dtype, q.shape[2], (q.shape[3], v.shape[3]), segs, (causal, window), mods)
    stored = _reads_as_stored(q.dtype, k.numel() + v.numel(), segs, (causal, window), grad, q.shape[2])
    stored = q.dtype if tiles or stored else work
    qw, kw, vw = (_rows(t, stored) for t in (q, k, v))
    B, H, Q, _ = q.shape
    shape = (B, H, Q, v.shape[3])
    # huge pages when opted in (ATTNMASK_HUGE_PAGES=1): far fewer page faults
    res = empty_buffer(shape, _out_dtype(stored, work, grad))
    lse = torch.empty((B, H, Q), dtype=work)
    rule = (causal, window, scale)
    # the rows in no segment are items too: the kernel writes them 0 and lse -inf (read by the sinks' gradient)
    prepared = _prepared(segs, B, Q, causal, window) if prepared is None else prepared
    threads = _kernel_threads(segs, H, qw.shape[3] + vw.shape[3], rule, pairs=prepared.pairs)
    items = prepared.whole
    if threads >= 2:  # forward_items for threads_available(), cached with the plan by run
        items = prepared.cut
        if items is None:
            items = forward_items(segs, H, threads)
            items = torch.cat((items, prepared.gaps)) if len(prepared.gaps) else items
    _call(False, qw, kw, vw, res, None, lse, None, items, rule, mods, tiles, threads)
    meta = (rule, mods, q.dtype, None if sinks is None else sinks.dtype, tiles, prepared)
    return (res if res.dtype == q.dtype else res.to(q.dtype)), (qw, kw, vw, res, lse, segs), meta


_forward_on_free_cores = on_free_cores(_forward)


class _SegmentAttention(torch.autograd.Function):
    @staticmethod
    @on_free_cores
    def forward(ctx, q, k, v, segs, causal, window, scale, softcap=None, sinks=None, slopes=None, prepared=None):
        args = (q, k, v, segs, causal, window, scale, softcap, sinks, slopes, prepared)
        out, saved, ctx.meta = _forward(*args, any(ctx.needs_input_grad))
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    @on_free_cores
    def backward(ctx, grad):
        qw, kw, vw, res, lse, segs = ctx.saved_tensors
        rule, mods, dtype, sinks_dtype, tiles, prepared = ctx.meta
        tiles = tiles and _tiles_backward(segs, rule[:2], (qw.shape[3], vw.shape[3])) and _finite(qw, kw, grad)
        threads, disjoint = 1, _keys_disjoint(segs)
        # bfloat16 inputs: read as stored, the gradients written in bfloat16; else float32 copies for the backward
        stored = not tiles and qw.dtype == torch.bfloat16 and _backward_reads_as_stored(segs, disjoint)
        if not tiles and not stored:
            qw, kw, vw = (_rows(t, res.dtype) for t in (qw, kw, vw))
        dout = _rows(grad, qw.dtype)
        written = qw.dtype if stored else res.dtype  # the gradients' dtype
        if disjoint:  # else two items could add into one dk / dv row
            width = qw.shape[3] + vw.shape[3]
            threads = _kernel_threads(segs, qw.shape[1], width, rule, passes=3, pairs=prepared.pairs)
        if threads > 1:  # items are (segment, key/value head), segment-major: the heaviest segments first
            segs = segs[_heaviest_first(segs, rule)]
        zeroed = disjoint and _item_rows_bytes(segs, qw, vw, written) <= _ZERO_IN_KERNEL_BYTES
        if zeroed:  # each item zeroes the gradient rows it owns (the rows in no segment: items of their own)
            grads = tuple(torch.empty(t.shape, dtype=written) for t in (qw, kw, vw))
            segs = torch.cat((segs, _gradient_gaps(segs, prepared.gaps, qw.shape[0], kw.shape[2])))
        else:
            grads = tuple(torch.zeros(t.shape, dtype=written) for t in (qw, kw, vw))
        _call(True, qw, kw, vw, res, dout, lse, grads, segs, rule, mods, tiles, threads, zero_grads=zeroed)
        dsinks = None
        if ctx.needs_input_grad[8]:
            dsinks = _sinks_grad(mods[1], lse, res, dout).to(sinks_dtype)
        return (*(g.to(dtype) for g in grads), None, None, None, None, None, dsinks, None, None)


# The forward's items: segattn.c's threads pull (segment, head) items, 8 at a time, from a shared counter. A row of
# one segment (a window, a chunk, a long document) on H=4 heads is 4 items: one pull, so one thread computed all of
# it whatever the thread count. The forward writes each query row from that row alone, so a segment cut into blocks
# of queries is the same computation (bit for bit): each block keeps the segment's keys and shifts its offset by the
# block's start. Enough items for _PULLS_PER_THREAD pulls of _ITEMS_PER_PULL a thread (segattn.c pulls them one at a
# time below 64 items a thread, as it then does here), blocks of at least _MIN_BLOCK_ROWS rows. Each block copies the
# keys its rows see (a window's block of r rows copies r + window - 1) and walks its own panels: items for 4 pulls a
# thread instead of 8 (blocks twice as tall) made windows of 512-4,096 and chunks of 1,024 on rows of 8,192 3-10%
# faster at two threads, rows of 1,024 (causal, left padding, windows of 128 and 512, documents of 128) 2-10%, and
# with one of the two cores busy no slower (0-4% faster at 8,192; RESULTS.md, issue 15, "native's key copies, tiles
# and pulls"). The backward keeps whole segments: its items own the dk / dv rows of their segment's keys, which blocks
# of one segment would share.
_PULLS_PER_THREAD = 4
_MIN_BLOCK_ROWS = 16


def forward_items(segs: torch.Tensor, heads: int, threads: int) -> torch.Tensor:
    """The segments ``(N, 6)`` the forward kernel walks with ``threads`` threads: ``segs`` itself when it already
    gives the threads ``threads * _PULLS_PER_THREAD * _ITEMS_PER_PULL`` (segment, head) items (or one thread);
    otherwise every segment of more than ``rows`` queries cut into blocks of ``rows`` (the last one shorter), the
    heaviest first (a causal segment's last block sees the most keys), so the last pulls are the lightest.

    Example: one causal segment ``(0, 0, 100, 0, 100, 0)``, H=1, 2 threads: 64 items are wanted, so blocks of 16
    rows, ``(0, 0, 16, 0, 100, 0)``, ``(0, 16, 16, 0, 100, 16)``, ..., ``(0, 96, 4, 0, 100, 96)``, ordered by their
    queries times the keys a causal block reaches (block 80-95 first, block 0-15 last). O(N log N) host work in one
    C call (``attnmask_forward_items``; its numpy form, ``_forward_items_numpy``, took ~15 operations, ~50-70 us of a
    fresh spec's choice on 8 padded rows of 256 right after a kernel), or that form where the library is not built
    (torch's own ops here would wake its intra-op threads, which then spin beside the kernel's)."""
    want = threads * _PULLS_PER_THREAD * _ITEMS_PER_PULL
    if threads < 2 or segs.shape[0] * heads >= want or segs.shape[0] == 0:
        return segs
    lib = _library()
    if not isinstance(lib, str):
        address, _held = segments_address(segs)
        cap = segs.shape[0] + want  # blocks of rows >= sum(q_len) * heads / want: at most one more per segment
        out = torch.empty((cap, 6), dtype=torch.int64)
        count = lib.attnmask_forward_items(address, segs.shape[0], heads, want, _MIN_BLOCK_ROWS, out.data_ptr(), cap)
        if count >= 0:
            return segs if count == 0 else out[:count]
    return _forward_items_numpy(segs, heads, want)


def _forward_items_numpy(segs: torch.Tensor, heads: int, want: int) -> torch.Tensor:
    """:func:`forward_items` in numpy, for ``want`` items."""
    s = segs.numpy()
    q_len = s[:, 2]
    rows = max(_MIN_BLOCK_ROWS, -(-int(q_len.sum()) * heads // want))
    rows = -(-rows // 4) * 4  # the kernel's blocks of four query rows then fall alike in a cut segment and a whole one
    blocks = np.maximum((q_len + rows - 1) // rows, 1)
    if int(blocks.max()) == 1:
        return segs
    out = np.repeat(s, blocks, axis=0)
    start = (np.arange(len(out)) - np.repeat(np.cumsum(blocks) - blocks, blocks)) * rows  # each block's first query
    out[:, 1] += start
    out[:, 2] = np.minimum(out[:, 2] - start, rows)
    out[:, 5] += start
    reach = np.maximum(np.minimum(out[:, 5] + out[:, 2], out[:, 4]), 1)  # keys a causal block's last query sees
    return torch.from_numpy(np.ascontiguousarray(out[np.argsort(-(out[:, 2] * reach), kind="stable")]))


# While other processes hold cores, a call of at least this many multiply-adds of allowed pairs keeps every thread:
# its threads pull items, so the one sharing a taken core takes fewer, and only the last pull waits for it. Measured
# with one of 2 cores busy (the team against one thread on the free core, rows of 1,024-8,192 tokens; RESULTS.md,
# issue 15, "native's threads"): the team slowed 1.3-1.6x where a call had ~1e9 and more (28-900 ms at two idle
# threads), one thread 1.9-2.2x; under ~5e8 (1-20 ms) the team slowed 2-7x, one thread 1.6-1.9x.
_BUSY_SHARE_WORK = 8e8


def _kernel_threads(
    segs: torch.Tensor, heads: int, width: int, rule: tuple, passes: int = 1, pairs: float | None = None
) -> int:
    """Threads for a kernel call over ``segs`` on ``heads`` heads (``rule``: causal, window, scale):
    ``backends._workers.region_threads`` of its allowed pairs' multiply-adds (``pairs``: ``allowed_pairs`` of
    ``segs``, counted here when not given; ``passes`` times the forward's: the backward makes ~3): torch's count; the
    free cores only while other processes hold cores and the call has less than ``_BUSY_SHARE_WORK``."""
    causal, window, _ = rule
    pairs = allowed_pairs(segs, causal, window) if pairs is None else pairs
    work = passes * pairs * heads * width
    return region_threads(work, share_work=_BUSY_SHARE_WORK)


def _heaviest_first(segs: torch.Tensor, rule: tuple) -> torch.Tensor:
    """The order of ``segs`` by allowed pairs, most first (stable): the backward's pulls then end on light items."""
    causal, window, _ = rule
    return torch.argsort(segment_pairs(segs, causal, window), descending=True, stable=True)


def _chunk(items: int, threads: int) -> int:
    """Items per pull in segattn.c: 8, or 1 when fewer than 64 per thread."""
    return _ITEMS_PER_PULL if items >= 8 * _ITEMS_PER_PULL * threads else 1


def _sinks_grad(sinks: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """``(H,)``: the gradient of the sinks, ``-sum_{b, i} p_sink(b, h, i) · (dout · out)(b, h, i)`` with the sink's
    probability ``exp(sink_h - lse)`` (0 on rows with no key, whose ``lse`` is ``-inf``). O(B·H·Q·Dv)."""
    has_key = torch.isfinite(lse)
    p_sink = torch.exp(torch.where(has_key, sinks[None, :, None] - lse, -torch.inf))  # (B, H, Q)
    di = (dout * out).sum(-1)
    return -(p_sink * torch.where(has_key, di, 0)).sum((0, 2))


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: torch.Tensor,
    *,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention inside each segment (document), by the C kernel; query rows in no segment give 0.

    ``q`` ``(B, H, Q, D)``, ``k`` ``(B, Hkv, K, D)``, ``v`` ``(B, Hkv, K, Dv)`` on the CPU, ``H % Hkv == 0``;
    ``segments`` ``(N, 6)`` int ``(row, q_start, q_len, k_start, k_len, offset)`` with non-overlapping query ranges, as
    ``attnmask.backends.varlen.varlen_attention`` takes them (same rule: query ``i`` sees key ``j`` if not ``causal`` or
    ``0 <= i + offset - j``, and ``i + offset - j < window`` with a window). Returns ``(B, H, Q, Dv)`` in ``q``'s
    dtype; differentiable in ``q``, ``k``, ``v`` (once).

    Work: the allowed pairs only, ``O(pairs · (D + Dv))``. Memory: the output, a ``(B, H, Q)`` log-sum-exp saved for
    the backward, the gradients (float32 for half-precision inputs); float32 copies of float16 inputs, and of
    bfloat16 ones unless they are read as stored (a decoding step's forward; forward and backward on AMX tiles); no
    mask and no copy of float32 inputs whose last dimension is contiguous. Per
    thread, the kernel's scratch: a segment's keys transposed (and its values, in the backward), O(k_len · (D + Dv)),
    and a panel's tile of scores, O(PANEL_ROWS · FORWARD_TILE_KEYS) in the forward and O(PANEL_ROWS · TILE_KEYS) in
    the backward (4.2 MiB for a causal segment of 8,192 keys at D = Dv = 64 in float32 with a backward).

    Score modifiers as ``attnmask.attention`` defines them and checks them (``softcap``, ``sinks`` and
    ``alibi_slopes``, ``(H,)``, the ALiBi distance being ``i + offset - j``); differentiable in ``sinks`` too.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            raise bad(DeviceError, name, "a CPU tensor (the native kernel runs on the CPU)", t.device)
        if isinstance(t, torch.Tensor) and (not t.is_floating_point() or t.dtype != q.dtype):
            raise bad(DTypeError, name, f"q's floating dtype ({q.dtype})", t.dtype)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise bad(BackendError, "window", "None or an int >= 1", repr(window))
    segs = check_segments(segments, q, k, v)
    mods = check_score_mods(q, softcap, sinks, alibi_slopes)
    window = None if window is None else min(window, _WIDEST)
    scale = q.shape[3] ** -0.5 if scale is None and q.shape[3] else 1.0 if scale is None else float(scale)
    rule = (bool(causal or window is not None), window, scale)
    softcap, sinks, slopes = (mods.get(name) for name in ("softcap", "sinks", "alibi_slopes"))
    return _SegmentAttention.apply(q, k, v, segs, *rule, softcap, sinks, slopes)


# ----------------------------------------------------------------------------------------------------------------------
# The "native" backend: run / unsupported / cost on an ``AttentionCall``

# In "varlen"'s unit (one multiply-add of a pair inside SDPA's blocked kernel, ~0.03 ns on one core here): the
# kernel walks each allowed pair with vector dot products, a vectorised exp and axpys instead of blocked matrix
# products (measured ~2x slower per pair than SDPA's kernel, which however computes whole key blocks), and reads and
# writes each query row once (measured about as costly as SDPA's own per-row work). See bench_backends.py.
# A pair costs more once a query's run of keys no longer stays in the L1 cache (64 keys and values of D=64 floats are
# 32 KiB): measured as native's ps per unit of this estimate against the other backends' on the same rows
# (bench_backends.py --quick and bench_limit.py, RESULTS.md issue 15): about the same for documents of 8-32 tokens,
# 1.5-2.1x (median ~1.9) for runs of 256 keys and more. A run is the keys one query walks (_FORWARD_KEY_BYTES). In
# between, the charge rises linearly with the run's keys and values in float32 bytes, from _PAIR_COST at
# _SHORT_RUN_BYTES (32 keys at D = Dv = 64: they stay in L1) to _LONG_PAIR_COST at _LONG_RUN_BYTES (128 keys): a step
# at 64 keys had priced windows of 64 as runs in L1, and native was picked on them 1.15-1.33x slower than banded
# (limit_tables/s15_*, s16_*); the ramp replays 1610 -> 1619 rows within 1.1x on the eighteen saved sets, ramps ending
# at 96-128 keys 1619-1620, at 160 or 256 keys 1591 / 1568 (RESULTS.md, issue 15, "Fresh specs at two threads").
# Per CPU kind (``_common.per_cpu_kind``: with AMX tiles, other), as the query rows' charge below: on the AMD EPYC
# without the tiles a pair whose run stays in L1 costs 0.85x the Xeon's, one past it the same. Fitted there by a grid on
# every saved table of that CPU, each replayed on its kind (picks within 1.1x of the fastest; RESULTS.md, issue 15,
# "native's charges on the AMD EPYC"): with the row charge at 0.85x too, 26 limit tables 926 of 995 as at the Xeon's
# values, 16 head-size tables 1400 -> 1416 of 1,536 (varlen had been picked on documents of ~60 tokens 1.13-1.78x
# slower than native at one thread); the long runs' charge at 0.85x too read 1439 but 921 (windows of 64 and a decoding
# row went to native, 1.30-1.38x slower), at 0.94x 1426 and 924.
_PAIR_COSTS = (1.8, 1.53)  # a pair of a run of at most _SHORT_RUN_BYTES
_PAIR_COST = per_cpu_kind(_PAIR_COSTS)
_LONG_PAIR_COST = 3.4  # a pair of a run of at least _LONG_RUN_BYTES (1.9x the Xeon's short one)
# The blocked form (BLOCK_MIN_QUERIES) loads each key once for four queries from its transposed copy and sums no
# score across a vector: its pairs cost these shares of the row form's charges above, a run that stays in L1 and one
# past _LONG_RUN_BYTES. Fitted (``bench_limit.py --fit ... --grid``) on the Xeon's tables of rows of 1,024 at one and
# two threads after the change (limit_tables/s33_*; RESULTS.md, issue 15, "native's blocked form"); no table of a CPU
# without AMX tiles measured the blocked form, so both kinds take the short share of their own row charges. The long
# share since the kernel's tiles (a long run's keys no longer leave the cache): refitted on the Xeon's tables of rows
# of 1,024 and 8,192 (limit_tables/s34_*; 0.35-0.42 read 93 of 96 rows within 1.1x of the fastest, 0.6 87, 0.45 89;
# RESULTS.md, issue 15, "native's tiles"), and after the tile's softmax step lost its stores (limit_tables/s36_*:
# 0.28-0.38 read 95 of 96, 0.4 93, where native had become the faster on windows of 4,096 at 8K; the older kernel's
# s35_* tables 212 of 224 at 0.36, 213 at 0.4; RESULTS.md, issue 15, "native's weights"), and after the forward's
# four-vector scores, key transposes, tiles of 512 and fewer pulls (the forward 5-15% faster; limit_tables/s38*_*:
# 0.24-0.33 read 109 of 112 rows within 1.1x of the fastest, 0.34-0.36 108, 0.4 102): 0.33, the plateau's end nearest
# the value before, where plain causal rows of 8,192 stay on SDPA's own kernel (native measured 1.02-1.07x slower
# there; at 0.32 they went to native; RESULTS.md, issue 15, "native's key copies, tiles and pulls"), and after the
# forward took its scores and values a sub-tile at a time (3-7% faster on long runs; limit_tables/s40c_*: 0.26-0.325
# read 110 of 112 rows within 1.1x of the fastest, 0.328-0.33 109, 0.36 107; from 0.328 left-padded rows of 8,192 stay
# on varlen, measured 1.12x slower than native): 0.325, the plateau's end nearest the value before, where plain causal
# rows of 8,192 stay on SDPA's own kernel (native/SDPA measured 1.00x at two threads, 1.02x at one, interleaved; at
# 0.32 they go to native; RESULTS.md, issue 15, "Scores and values a sub-tile at a time"). The AMD EPYC's share (0.6
# until 2026-12-07, from before the blocked form's tiles) by a grid on its fresh tables of rows of 1,024 and 8,192,
# float32 and bfloat16, forward and with a backward, one and two threads (limit_tables/s49_*: 0.34-0.38 read 166-167
# of 192 rows within 1.1x of the fastest, 0.325 163, 0.4 162, 0.6 108; native had become the fastest on windows,
# chunks and causal rows of 1,024 there and was picked on none; RESULTS.md, issue 15, "The AMD EPYC's tables").
_BLOCKED_SHORT_SCALE = 0.8
_BLOCKED_LONG_SCALES = (0.325, 0.36)
_BLOCKED_LONG_SCALE = per_cpu_kind(_BLOCKED_LONG_SCALES)
# ... and each key of such a segment, per element of D + Dv, for its transposed copy (made once per item: where few
# queries read each key, a decoding step of 16 queries, it weighs).
_BLOCKED_KEY_COST = 10.0
# A decoding step's forward (at most _DECODE_QUERIES queries, fewer than the keys; no gradient): each key is read by a
# few queries, not again and again by a run of neighbouring queries from beyond L1 as the long charges above assume,
# and the charges priced such a step 1.8-3.3x SDPA's estimate where native ran it in 0.63-0.96x SDPA's time (AMD
# EPYC, float32, 1-8 rows, 1,024-32,768 keys): its pairs take this share of them. Fitted per CPU kind by a grid on the
# AMD EPYC's limit tables (limit_tables/s49b_*, s49c_q2: rows of 1,024 and 8,192, float32 and bfloat16, forward and
# with a backward, one and two threads, replayed with the stock rule's bound on decoding steps, attention.py's
# _STOCK_DECODE_WORKS): 1.0-0.6 read 181 of 192 rows within 1.1x of the fastest, 0.5 184, 0.4 188, 0.3 down to 0.05
# 189 (35 of the 36 decoding rows; the last, one query against 4,096 keys at one thread, under the rule's bound); 0.3,
# the plateau's end nearest the value before, where the grouped steps of 4-8 queries with D = 128 that SDPA runs
# 1.0-1.1x faster stay nearest their measured ratio (RESULTS.md, issue 15, "Decoding steps by their estimates"). The
# Xeon with AMX tiles keeps 1.0 (its decoding steps stay on the stock rule there).
_DECODE_QUERIES = 16
_DECODE_SCALES = (1.0, 0.3)
_DECODE_SCALE = per_cpu_kind(_DECODE_SCALES)
_SHORT_RUN_BYTES = 16 << 10
_LONG_RUN_BYTES = 64 << 10
# Bytes per element of D + Dv that a run reads for each of its keys: the forward's k and v rows in float32; the
# backward's k and v rows and the dk and dv rows it accumulates into, twice as many. A run is one query's keys (each
# query of a causal document walks the keys up to its own), not the whole document's: with the backward's runs at
# the forward's bytes, or the document as every query's run, replays of the saved tables read fewer picks within 1.1x
# of the fastest (RESULTS.md, issue 15, "native's runs per query").
_FORWARD_KEY_BYTES = 4.0
_BACKWARD_KEY_BYTES = 8.0
# What a pair costs beyond its D + Dv (``_common.pair_width``): its exponential and the online softmax's bookkeeping;
# fitted by benchmarks/bench_head_dim.py --fit.
# Per CPU kind (``_common.per_cpu_kind``: with AMX tiles, other): fitted on each CPU's own head-size tables; the
# Xeon's four (benchmarks/head_dim/s30_*.json, two runs at one and two threads) put 128 where the AMD EPYC's put
# 192 (RESULTS.md, issue 15, "Head sizes on the Xeon"). Since the kernel's blocked form the Xeon's fit reads 96 (its
# two-thread head-size table of 2026-12-06, benchmarks/head_dim/s33_t2.json: the estimates' picks 72 -> 87 of 96 within
# 1.1x of the fastest; RESULTS.md, issue 15, "native's blocked form"), and since its tiles 64 (fresh one- and
# two-thread tables, head_dim/s34_t1.json, s34_t2.json: 181 -> 189 of 192 with only this value changed; the 1K and 8K
# limit tables 93 of 96 at 48-96 alike; RESULTS.md, issue 15, "native's tiles").
_EXTRA_PAIR_WIDTHS = (64.0, 192.0)
_EXTRA_PAIR_WIDTH = per_cpu_kind(_EXTRA_PAIR_WIDTHS)
_ROW_COSTS = (50.0, 42.5)  # per element of a query row (D + Dv) and head: loading q, the output row, its lse
_ROW_COST = per_cpu_kind(_ROW_COSTS)
_CALL_COST = 2e4  # one ctypes call and the output allocation
# Threads: the kernel's threads pull its items (the forward's (query block, head), the backward's (segment, key/value
# head)) 8 at a time, or 1 at a time when there are few (segattn.c), each added thread contributing this share of a
# core. Fitted: ``benchmarks/bench_limit.py --fit`` on 1- and 2-thread tables of rows of 1,024 at low load, after the
# kernel's threads became the OpenMP team torch uses, with rows of 8,192 (benchmarks/limit_tables/omp_*.txt; RESULTS.md,
# issue 15, "native's threads"; before: 0.0, with pthreads started per call).
_THREAD_EFFICIENCY = 0.81
# The same for the forward's items in bfloat16 on a CPU with AMX bfloat16 tiles: the two-thread bfloat16 forward
# rows there gain less than float32's (window 64 on rows of 1,024: 1.4-1.5x from one thread to two, where 0.81 makes
# 1.8x, and native was picked 1.1-1.33x slower than banded in 9 of 14 sets of tables). Replayed on the nineteen saved
# sets of that CPU: 1739 -> 1752 rows within 1.1x of the fastest anywhere from 0.3 to 0.5, no set lower (0.1: 1754,
# the two-thread sets lower); RESULTS.md, issue 15, "Fresh specs at two threads". No table of a CPU without the tiles
# measured it: there the float32 efficiency stays.
_BF16_AMX_THREAD_EFFICIENCY = 0.4
# bfloat16 inputs on a CPU with AMX tiles: the forward's float32 copies of q, k and v and the output's conversion back
# cost their elements at ``COPY_COST`` each, divided by the threads' gain (torch's conversions use them), on top of the
# float32 estimate (and again, through the mode factor, in the backward, which copies them anew). Measured on the
# Xeon VM (RESULTS.md, issue 15, "native's bfloat16 copies"): native's bfloat16 forward is its float32 time plus
# about the time of those copies on every row (rows of 1,024, B = 1 and 4, causal, documents of ~46 tokens, a
# window of 32, one and two threads), where a factor on the whole estimate had priced short rows at a fraction of it.
# Elsewhere 0 until 2026-12-07 (there the bfloat16 estimate was float32's or had its own factors); since then 10, a
# third of COPY_COST: a grid on the AMD EPYC's fresh limit tables (limit_tables/s49b_*, after its blocked long share's
# refit; s49_* before it) read 180 of 192 rows within 1.1x of the fastest at 7.5-15 against 174 at 0 (172 against 167
# before the refit), 163 at 60: its bfloat16 decoding steps with a backward, whose float32 copies of the cache no
# charge held, had gone to native 1.19-1.72x slower than SDPA (RESULTS.md, issue 15, "The AMD EPYC's tables").
_BF16_COPY_COSTS = (COPY_COST, 10.0)
_BF16_COPY_COST = per_cpu_kind(_BF16_COPY_COSTS)
# Where the forward reads bfloat16 as stored (``_reads_as_stored``: a decoding step), the backward's passes over the
# call's elements at that cost: float32 copies of q, k and v, float32 gradients zeroed, and the gradients converted
# back, each a fresh buffer of the cache's size (was 1: the copies alone). A grid replay of the saved tables after the
# worker fix (limit_tables/s42_* and s43_dec_*, AMX tiles): 1 and 1.5 266 of 276 rows within 1.1x of the fastest, 2
# to 4 267. The rows it moves, bfloat16 decoding with a backward, are near ties whose winner changes between runs
# (RESULTS.md, issue 15, "Decoding steps of 4-15 queries in native's blocked form").
_BF16_BACKWARD_PASSES = 3.0
# Every constant above set by the CPU's kind, with its values (``_common.per_cpu_kind``).
CPU_KIND_VALUES = {
    "BLOCK_MIN_KEYS": _BLOCK_MIN_KEYS,
    "_PAIR_COST": _PAIR_COSTS,
    "_ROW_COST": _ROW_COSTS,
    "_BF16_COPY_COST": _BF16_COPY_COSTS,
    "_EXTRA_PAIR_WIDTH": _EXTRA_PAIR_WIDTHS,
    "_BLOCKED_LONG_SCALE": _BLOCKED_LONG_SCALES,
    "_DECODE_SCALE": _DECODE_SCALES,
    "_AS_STORED_MAX_READS_NO_GRAD": _AS_STORED_MAX_READS_NO_GRADS,
}
# Other modes than a float32 forward (bfloat16, with a backward): ``bench_limit.py --fit ... --modes`` on the six 1K
# tables benchmarks/limit_tables/modes_*.txt; with a core taken (busy): ``--fit ... --busy-factors`` on busy_omp_q2.txt
# (RESULTS.md, issue 15, "bfloat16 and backward in the estimates", "Estimates that see a taken core"); bfloat16 on a
# CPU without AMX tiles (the _no_amx factors): --fit ... --modes on limit_tables/s9_q1.txt and s9_q2.txt, an AMD EPYC
# (RESULTS.md, issue 15, "bfloat16 on a CPU without AMX"). The AMX bfloat16 factors since the copies are charged on
# their own (``_BF16_COPY_COST``; were 1.18 and 3.47): a grid replay of the Xeon's saved 1K tables (RESULTS.md, issue
# 15, "native's bfloat16 copies"). Its forward's busy factor by the call's size (``_common.BUSY_SMALL_WORK``): 1.61
# for small calls (on the free core alone under ``_BUSY_SHARE_WORK``), 1.5 for large ones (RESULTS.md, issue 15, "Busy
# factors by the call's size").
MODES = ModeFactors(
    bf16=1.05,
    backward=3.51,
    bf16_backward=3.0,
    busy=1.5,
    busy_backward=2.09,
    busy_small=1.61,
    bf16_no_amx=1.0,
    bf16_backward_no_amx=4.0,
)
_ITEMS_PER_PULL = 8  # segattn.c's worker loop, when there are enough items


def allowed_pairs(segments: torch.Tensor, causal: bool, window: int | None) -> float:
    """Number of (query, key) pairs the segments allow, in closed form (no per-query loop). ``segments`` ``(N, 6)``.
    The sum of :func:`segment_pairs`: one pass in C (``attnmask_allowed_pairs``; numpy's ~12 operations took ~50 us
    of a fresh spec's call right after a kernel), else in numpy."""
    lib = _library()
    if not isinstance(lib, str):
        address, _held = segments_address(segments)
        return lib.attnmask_allowed_pairs(address, len(segments), int(causal), window or 0)
    return float(segment_pairs(segments, causal, window).sum())


def segment_pairs(segments: torch.Tensor, causal: bool, window: int | None) -> torch.Tensor:
    """``(N,)`` float64: the (query, key) pairs each segment allows, in closed form (no per-query loop).

    Causal: query ``i`` of a segment sees ``clamp(a, 0, k_len) - clamp(a - w, 0, k_len)`` keys with
    ``a = i + offset + 1`` (the second term only with a window ``w``), summed through ``F(x) = sum_{a=1..x}
    clamp(a, 0, k_len)``. Example: one segment of 4 queries and 4 keys, offset 0, causal: 1 + 2 + 3 + 4 = 10."""
    return torch.from_numpy(_pairs(segments.numpy(), causal, window))


def _pairs(segs: np.ndarray, causal: bool, window: int | None) -> np.ndarray:
    """:func:`segment_pairs` on the segments' numpy view (the estimate's form: a numpy operation costs several times
    less than a torch one on these few hundred rows)."""
    ql, kl, off = (segs[:, i].astype(np.float64) for i in (2, 4, 5))
    if not causal:
        return ql * kl

    def F(x: np.ndarray) -> np.ndarray:  # sum_{a=1..x} clamp(a, 0, kl), 0 for x <= 0
        x = np.maximum(x, 0.0)
        inside = np.minimum(x, kl)
        return inside * (inside + 1) / 2 + (x - inside) * kl

    pairs = F(off + ql) - F(off)
    if window is not None:
        pairs = pairs - (F(off + ql - window) - F(off - window))
    return pairs


def unsupported(call) -> str | None:
    plan = native_plan(call)
    return plan if isinstance(plan, str) else None


def cost(call) -> float:
    """Allowed pairs times ``H·(D + Dv)`` at ``_PAIR_COST`` each (up to ``_LONG_PAIR_COST`` in runs of keys that
    leave the L1 cache: ``_item_work``; on AMX tiles the blocked form's segments at ``_tiles_share`` of those, their
    rows ``_TILES_ROW_COST`` more) and each query row and head at ``_ROW_COST`` per element, divided by what the
    kernel's threads gain on its items, then float32 copies of half-precision inputs unless ``MODES`` covers their
    dtype (comparable with the ``"varlen"`` backend's cost). With a gradient, the backward's share charges its pairs
    as runs of ``_BACKWARD_KEY_BYTES`` per key element (it also accumulates into each key's dk and dv rows). The
    threads' gain: ``_workers.threads_available()``
    threads pulling ``_ITEMS_PER_PULL`` items at a time, on the forward's query blocks (``forward_items``; in
    bfloat16 on a CPU with AMX tiles at ``_BF16_AMX_THREAD_EFFICIENCY``) and on the backward's whole segments (one
    thread where segments share keys). With a gradient, ``MODES``'s factor scales the whole call as one thread would
    run it, and the forward's share gains what the forward's items allow."""
    plan = native_plan(call)
    width = call.head_dim + call.value_dim
    segs = plan.segments
    causal, window = plan.causal or plan.window is not None, plan.window
    threads = _workers.threads_available()
    blocks = segs if threads < 2 else _forward_blocks(call, segs)
    amx = call.q.dtype == torch.bfloat16 and _common.cpu_has_amx_bf16()  # through the module: one place to patch
    mods = (call.softcap or 0.0, call.sinks, call.alibi_slopes)
    tiles = amx and _on_tiles(call.q.dtype, call.q_len, (call.head_dim, call.value_dim), segs, (causal, window), mods)
    efficiency = _BF16_AMX_THREAD_EFFICIENCY if amx and not tiles else _THREAD_EFFICIENCY
    # the backward on the tiles too (finite inputs assumed)
    tiles_back = tiles and call.needs_grad and _tiles_backward(segs, (causal, window), (call.head_dim, call.value_dim))
    block_keys = _block_keys(call.q_len)
    forward_gain = None
    if blocks is segs and threads >= 2:  # the forward deals the segments themselves: their works and deal in one pass
        item, item_sum, rows, forward_gain = _item_work_gain(
            segs, causal, window, width, call.heads, threads, efficiency, block_keys, tiles
        )
    else:
        item, item_sum, rows = _item_work_sums(
            segs, causal, window, width, block_keys=block_keys, tiles=tiles
        )  # a (segment, head) item
    outside = call.batch * call.q_len - rows  # query rows in no segment (not walked)
    serial = _CALL_COST + outside * call.heads * width * _ROW_COST
    if call.q.dtype not in (torch.float32, torch.float64) and not MODES.covers(call.q.dtype, call.device_type):
        tokens = call.batch * (call.heads * call.q_len + 2 * call.kv_heads * call.kv_len)
        serial += tokens * width * 2 * COPY_COST
    stored_copies = 0.0  # the backward's copies where the forward reads bfloat16 as stored (else in serial)
    if call.q.dtype == torch.bfloat16 and _BF16_COPY_COST:
        elements = call.batch * (call.heads * call.q_len + call.kv_heads * call.kv_len) * width  # q, k, v, the output
        copies = elements * _BF16_COPY_COST / (1.0 + (threads - 1) * _THREAD_EFFICIENCY)
        kv_elements = call.batch * call.kv_heads * call.kv_len * width
        stored = tiles or _reads_as_stored(
            call.q.dtype, kv_elements, segs, (causal, window), call.needs_grad, call.q_len
        )
        if not stored:
            serial += copies
        elif call.needs_grad and (tiles_back or not _backward_reads_as_stored(segs)):
            stored_copies = copies * (_TILES_BACKWARD_PASSES if tiles_back else _BF16_BACKWARD_PASSES)
    if tiles_back:
        stored_copies += _tiles_spill(segs, call) / (1.0 + (threads - 1) * _THREAD_EFFICIENCY)
    kernel = item_sum * call.heads  # the forward's, on one thread
    if not call.needs_grad and call.q_len <= _DECODE_QUERIES and call.q_len < call.kv_len:  # a decoding step
        kernel *= _DECODE_SCALE
    factor = mode_factor(MODES, call)
    if call.needs_grad:  # the backward's runs read and write twice the bytes per key: their own charges
        item, back_sum, _ = _item_work_sums(segs, causal, window, width, _BACKWARD_KEY_BYTES, block_keys)
        back = back_sum * call.heads * (_TILES_BACKWARD_SCALE if tiles_back else 1.0)
    if threads < 2:
        if not call.needs_grad:
            return (serial + kernel) * factor
        return serial * factor + kernel + back * (factor - 1) + stored_copies
    if forward_gain is None:  # the forward's blocks cut the segments
        work = _item_work(blocks, causal, window, width, block_keys=block_keys, tiles=tiles)
        forward_gain = _pulls_gain(work, call.heads, threads, efficiency)
    forward = serial + kernel / forward_gain
    if not call.needs_grad:
        return forward * factor
    gain = 1.0
    if _keys_disjoint(segs):  # segment-major items, the heaviest segments first (as the backward orders them)
        gain = _threads_gain(np.repeat(np.sort(item)[::-1], call.kv_heads))
    return forward + (serial + back / gain) * (factor - 1) + stored_copies


def _forward_blocks(call, segs: torch.Tensor) -> torch.Tensor:
    """``forward_items`` of the call's segments for ``_workers.threads_available()`` threads, cached with the plan
    (the estimate and the run read the same blocks)."""
    threads = _workers.threads_available()
    return cached(call, f"native_blocks_{threads}", lambda c: forward_items(segs, c.heads, threads))


def _item_work(
    segs: torch.Tensor,
    causal: bool,
    window: int | None,
    width: int,
    key_bytes: float = _FORWARD_KEY_BYTES,
    block_keys: int = _NEVER,
    tiles: bool = False,
) -> np.ndarray:
    """``(N,)`` float64: the estimate of each segment's work on one head (its pairs, its query rows). Each query walks
    its own run of keys (causal: query ``i`` of a segment sees ``clamp(i + offset + 1, 0, k_len)`` keys, less those
    before a window; otherwise all ``k_len``), and each pair of a run costs ``_PAIR_COST`` while the run takes at most
    ``_SHORT_RUN_BYTES`` (``key_bytes`` per element of ``width`` per key), ``_LONG_PAIR_COST`` from
    ``_LONG_RUN_BYTES``, linearly in between, times ``pair_width``; each query row ``_ROW_COST`` per element. One
    pass in C (``attnmask_item_work``, in closed form per segment: ~2 us on 106 segments), or the per-query numpy
    form below where the kernel is not built.

    A segment of at least ``block_keys`` keys (``_block_keys``) runs in the kernel's blocked form, whose two charges
    are ``_BLOCKED_SHORT_SCALE`` and ``_BLOCKED_LONG_SCALE`` of those (``_pair_charges``).

    Example: a causal document of 100 keys at ``D = Dv = 64`` (512 bytes a key in the forward): its first 32
    queries' runs stay within 16 KiB, at ``_PAIR_COST``; its last ones (up to 50 KiB) most of the way to
    ``_LONG_PAIR_COST``."""
    return _item_work_sums(segs, causal, window, width, key_bytes, block_keys, tiles)[0]


def _pair_charges(blocked: bool, tiles: float = 1.0) -> tuple[float, float]:
    """A pair's charge in a run of keys that stays in L1 and in one past ``_LONG_RUN_BYTES``: the row form's, or
    the blocked form's shares of them, times ``tiles`` (``_tiles_share``: the same segments on AMX tiles)."""
    if blocked:
        return _PAIR_COST * _BLOCKED_SHORT_SCALE * tiles, _LONG_PAIR_COST * _BLOCKED_LONG_SCALE * tiles
    return _PAIR_COST, _LONG_PAIR_COST


def _tiles_share(width: int) -> float:
    """What a pair on the tiles costs over the blocked form's charge at a head of ``width`` (D + Dv):
    ``_TILES_PAIR_SCALE``, its width scaled as ``pair_width`` with ``_TILES_EXTRA_PAIR_WIDTH`` where the float32
    charges' scale with ``_EXTRA_PAIR_WIDTH`` (1 at ``CALIBRATED_WIDTH``)."""
    own = pair_width(width, _TILES_EXTRA_PAIR_WIDTH) / pair_width(width, _EXTRA_PAIR_WIDTH)
    return _TILES_PAIR_SCALE * own


def _item_work_sums(
    segs: torch.Tensor,
    causal: bool,
    window: int | None,
    width: int,
    key_bytes: float = _FORWARD_KEY_BYTES,
    block_keys: int = _NEVER,
    tiles: bool = False,
) -> tuple[np.ndarray, float, int]:
    """:func:`_item_work`, with the works' sum and the segments' query rows (the C pass adds them up as it goes)."""
    lib = _library()
    if isinstance(lib, str):
        work = _item_work_numpy(segs, causal, window, width, key_bytes, block_keys, tiles)
        return work, float(work.sum()), int(segs.numpy()[:, 2].sum())
    address, _held = segments_address(segs)
    n = segs.shape[0]
    out = c_array(ctypes.c_double, n + 2)  # a ctypes array: its address costs less than a numpy array's after a kernel
    lib.attnmask_item_work(address, *_item_work_args(n, causal, window, width, key_bytes, block_keys, tiles), out)
    return np.frombuffer(out, dtype=np.float64, count=n), out[n], int(out[n + 1])


def _item_work_args(
    n: int, causal: bool, window: int | None, width: int, key_bytes: float, block_keys: int, tiles: bool = False
) -> tuple:
    """``attnmask_item_work``'s arguments after the segments' address, up to its output (``tiles``: the blocked
    form's segments on AMX tiles, their pairs and key copies at ``_tiles_share``)."""
    charges = (*_pair_charges(False), _SHORT_RUN_BYTES, _LONG_RUN_BYTES, pair_width(width, _EXTRA_PAIR_WIDTH))
    window = -1 if window is None else window
    share = _tiles_share(width) if tiles else 1.0
    row_cost = _ROW_COST + (_TILES_ROW_COST if tiles else 0.0)
    blocked = (*_pair_charges(True, share), _BLOCKED_KEY_COST * share, row_cost, block_keys)
    return (n, int(causal), window, float(width), key_bytes * width, *charges, _ROW_COST, *blocked)


def _item_work_gain(
    segs: torch.Tensor,
    causal: bool,
    window: int | None,
    width: int,
    repeat: int,
    threads: int,
    share: float,
    block_keys: int = _NEVER,
    tiles: bool = False,
) -> tuple[np.ndarray, float, int, float]:
    """:func:`_item_work_sums` (the forward's runs) and :func:`_pulls_gain` of those works (``repeat`` times,
    ``threads`` >= 2 threads at ``share`` of a core) in one C call (``attnmask_item_work_makespan``), or the two
    functions where the kernel is not built."""
    lib = _library()
    n = segs.shape[0]
    if isinstance(lib, str) or not n:
        work, total, rows = _item_work_sums(segs, causal, window, width, block_keys=block_keys, tiles=tiles)
        return work, total, rows, _pulls_gain(work, repeat, threads, share)
    address, _held = segments_address(segs)
    chunk = _chunk(n * repeat, threads)
    pulls = -(-n * repeat // chunk)
    out, scratch = c_array(ctypes.c_double, n + 2), c_array(ctypes.c_double, pulls + threads + 1)
    args = (
        *_item_work_args(n, causal, window, width, _FORWARD_KEY_BYTES, block_keys, tiles),
        out,
        repeat,
        chunk,
        threads,
        scratch,
    )
    most = lib.attnmask_item_work_makespan(address, *args)
    gain = _dealt_gain(scratch[pulls + threads], most, min(threads, pulls), share)
    return np.frombuffer(out, dtype=np.float64, count=n), out[n], int(out[n + 1]), gain


def _item_work_numpy(
    segs: torch.Tensor,
    causal: bool,
    window: int | None,
    width: int,
    key_bytes: float = _FORWARD_KEY_BYTES,
    block_keys: int = _NEVER,
    tiles: bool = False,
) -> np.ndarray:
    """:func:`_item_work` in numpy, on the segments' view, query by query (O(B·Q) memory: the form the C pass's
    closed form is held to, and the estimate where the kernel is not built)."""
    s = segs.numpy().astype(np.float64)
    q_len, k_len, offset = s[:, 2], s[:, 4], s[:, 5]
    if causal:
        seg = np.repeat(np.arange(len(s)), s[:, 2].astype(np.int64))
        a = np.arange(len(seg)) - np.repeat(np.cumsum(q_len) - q_len, q_len.astype(np.int64)) + offset[seg] + 1
        run = np.clip(a, 0, k_len[seg])
        if window is not None:
            run = run - np.clip(a - window, 0, k_len[seg])
    else:
        seg, run = np.arange(len(s)), k_len
    share = np.clip((run * (key_bytes * width) - _SHORT_RUN_BYTES) / (_LONG_RUN_BYTES - _SHORT_RUN_BYTES), 0.0, 1.0)
    blocked = k_len[seg] >= block_keys
    on_tiles = _tiles_share(width) if tiles else 1.0
    (short, long), (block_short, block_long) = _pair_charges(False), _pair_charges(True, on_tiles)
    charged = run * np.where(blocked, block_short + (block_long - block_short) * share, short + (long - short) * share)
    if not causal:
        charged = charged * q_len
    pairs = np.bincount(seg, weights=charged, minlength=len(s)) if len(s) else np.zeros(0)
    copies = np.where(k_len >= block_keys, k_len * width * _BLOCKED_KEY_COST * on_tiles, 0.0)
    row_cost = _ROW_COST + np.where(k_len >= block_keys, _TILES_ROW_COST if tiles else 0.0, 0.0)
    return pairs * pair_width(width, _EXTRA_PAIR_WIDTH) + q_len * row_cost * width + copies


def _threads_gain(items: np.ndarray, efficiency: float | None = None) -> float:
    """What the kernel's threads gain on items of work ``items`` ``(N,)``, in the order the kernel takes them:
    ``min(threads, pulls)`` threads pulling runs of ``_chunk`` items until none is left, each added thread
    contributing ``efficiency`` of a core (``None``: ``_THREAD_EFFICIENCY`` as the module holds it now)."""
    threads = _workers.threads_available()
    if threads < 2:
        return 1.0
    share = _THREAD_EFFICIENCY if efficiency is None else efficiency
    return _pulls_gain(np.asarray(items, dtype=np.float64), 1, threads, share)


def _pulls_gain(work: np.ndarray, repeat: int, threads: int, share: float) -> float:
    """``_threads_gain`` of ``work`` ``(N,)`` repeated ``repeat`` times end to end (one run per head), for ``threads``
    >= 2 threads each contributing ``share`` of a core: one pass in C (``attnmask_pull_makespan``, the deal of
    ``_workers.expected_speedup`` with ``share_big=False``), or that function on the pulls where the kernel is not
    built."""
    chunk = _chunk(len(work) * repeat, threads)
    lib = _library()
    if isinstance(lib, str) or not len(work):
        return _pulls_gain_python(np.tile(work, repeat), chunk, threads, share)
    address, _held = float64_address(work)
    pulls = -(-len(work) * repeat // chunk)
    scratch = c_array(ctypes.c_double, pulls + threads + 1)
    most = lib.attnmask_pull_makespan(address, len(work), repeat, chunk, threads, scratch)
    return _dealt_gain(scratch[pulls + threads], most, min(threads, pulls), share)


def _dealt_gain(total: float, most: float, dealt: int, share: float) -> float:
    """What ``dealt`` threads gain on pulls of work ``total`` whose most loaded thread got ``most``, each added
    thread at ``share`` of a core: ``1 + (total / most - 1) · share`` (1 below two threads or without work)."""
    if total <= 0 or most <= 0 or dealt < 2:
        return 1.0
    return 1 + (total / most - 1) * share


def _pulls_gain_python(items: np.ndarray, chunk: int, threads: int, share: float) -> float:
    """:func:`_pulls_gain` on the items in full (``np.tile`` done), through ``_workers.expected_speedup``."""
    pulls = np.zeros(-(-len(items) // chunk) * chunk)
    pulls[: len(items)] = items
    pulls = pulls.reshape(-1, chunk).sum(1)
    threads = min(threads, len(pulls))
    return _workers.expected_speedup(pulls.tolist(), threads, 0.0, share, share_big=False)


def run(call) -> torch.Tensor:
    plan = native_plan(call)
    window = None if plan.window is None else min(plan.window, _WIDEST)
    rule = (plan.causal or window is not None, window, call.scale)
    segs, threads = plan.segments, _workers.threads_available()
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (call.q, call.k, call.v, call.sinks)
    )
    folded = None if grad else cached(call, f"native_folded_{threads}", lambda c: _folded_step(c, segs, rule, threads))
    if folded is not None:  # a decoding step's grouped query heads as the rows of their key head
        fsegs, fprepared = folded
        B, H, _, D = call.q.shape
        q = call.q.reshape(B, call.kv_heads, H // call.kv_heads, D)
        mods = (call.softcap, None, None)
        out = _forward_on_free_cores(q, call.k, call.v, fsegs, False, None, call.scale, *mods, fprepared, False)[0]
        return out.reshape(B, H, 1, call.value_dim)
    prepared = cached(
        call,
        f"native_run_{threads}",
        lambda c: _prepared(segs, c.batch, c.q_len, *rule[:2], cut=_forward_blocks(c, segs)),
    )
    args = (call.q, call.k, call.v, segs, *rule, call.softcap, call.sinks, call.alibi_slopes, prepared)
    if grad:
        return _SegmentAttention.apply(*args)
    # no gradient recorded: the forward alone, without autograd.Function's dispatch (~10 us of a repeated call)
    return _forward_on_free_cores(*args, False)[0]


def _folded_step(call, segs: torch.Tensor, rule: tuple, threads: int) -> tuple[torch.Tensor, _Prepared] | None:
    """For a decoding step of one query with grouped heads (``H = G·Hkv``, ``G > 1``) and no per-head modifier (ALiBi
    slopes, sinks), its segments with the ``G`` query heads of each key head as ``G`` query rows of one segment over
    the keys the query sees (no rule left: every row sees them all) and their ``_Prepared``; ``None`` for any other
    call, and where the folded call has fewer (segment, key head) items than ``threads`` (one item runs on one
    thread). Each key is then read once per key head, not once per query head, as SDPA's folded call reads it
    (``sdpa._folds``): B = 8, K = 4,096, 32 / 8 heads of D = 128, two threads on the AMD EPYC, 39.8 -> 15.3 ms against
    SDPA's 21.5 (RESULTS.md, issue 15, "Decoding steps by their estimates"). ``(N, 6)`` segments, O(N)."""
    heads, kv_heads = call.heads, call.kv_heads
    if call.q_len != 1 or heads == kv_heads or heads % kv_heads or call.alibi_slopes is not None:
        return None
    if call.sinks is not None or len(segs) * kv_heads < threads:
        return None
    causal, window, _ = rule
    s = segs.numpy()
    a = s[:, 5]  # the query's position minus its segment's first key (segattn.c's key_range with query 0)
    hi = np.where(a >= s[:, 4], s[:, 4], np.maximum(a + 1, 0)) if causal else s[:, 4]
    lo = np.where(a >= window, a - window + 1, 0) if window else np.zeros_like(a)
    keys = np.maximum(hi - lo, 0)
    groups = heads // kv_heads
    fsegs = np.stack([s[:, 0], np.zeros_like(a), np.full_like(a, groups), s[:, 3] + lo, keys, np.zeros_like(a)], 1)
    fsegs = torch.from_numpy(np.ascontiguousarray(fsegs[keys > 0], dtype=np.int64))
    cut = forward_items(fsegs, kv_heads, threads) if threads >= 2 else None
    return fsegs, _prepared(fsegs, call.batch, groups, False, None, cut=cut)


BACKEND = Backend(
    "native",
    run,
    cost,
    devices=frozenset({"cpu"}),
    dtypes=ALL_DTYPES,
    masks=frozenset({"structural"}),
    score_mods=SCORE_MODS,
    reads_masked_keys=False,  # each query walks only the keys it may see
    unsupported=unsupported,
    available=native_available,
)
