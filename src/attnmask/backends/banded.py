"""The "banded" attention backend: many short documents in one row, computed on a narrow band of small tiles.

When every query tile of ``bs`` tokens may only see the ``W`` key tiles ending at itself (causal specs whose
``key_band`` is narrow: packed rows of short documents, small sliding windows), attention is computed for all query
tiles of a batch row in ONE fused SDPA call: the query tiles ``(nT, H, bs, D)`` and the key / value bands of tiles
``t - W + 1 .. t`` ``(nT, Hkv, W·bs, ·)`` are strided views of q, k and v, padded with ``W - 1`` tiles of zeros in
front of the row (overlapping windows: no gather, no per-document call), and the mask is evaluated from the spec on
just those pairs (the padding blocked). Rows with no allowed key give exactly 0 and a zero gradient; the band views
have a hand-written gradient (``W`` shifted adds).
No attention dropout (declared: ``"auto"`` runs such a call elsewhere).

Worked example: ``L = 6``, documents ``[2, 3, 1]``, ``bs = 2``: query tiles ``[0, 1], [2, 3], [4, 5]``; the document
of tokens 2-4 reaches back one tile from tile ``[4, 5]``, so ``W = 2`` and each query scores 4 keys (the band), of
which the spec allows at most 3.

Threads: the padding, masks and assembly run with one intra-op thread (``_workers.serial_steps``), the one SDPA
call per batch row with all of them: one parallel region per row, as stock SDPA opens, so that a core taken by another
process costs one wait, not one per small op (issue 15). The backward is autograd's, on every thread.

Memory: an O(B·L·W·bs) bool mask (no head dim) and its float form per row; SDPA's own O(B·H·L·W·bs) work at most; one
padded copy of k and v (``W - 1`` tiles longer) and of q when L is not a multiple of bs; one copy of the output
(assembled from the tiles).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

import attnmask.backends._workers as _workers
from attnmask import masks as M
from attnmask._dense import additive, zero_query_rows, zero_rows
from attnmask.backends._common import (
    COPY_COST,
    ModeFactors,
    amx_pair_factor,
    cached,
    degenerate,
    mode_factor,
    most_keys_floor,
    off_cpu,
)
from attnmask.backends._workers import all_threads, graph_in, serial_steps
from attnmask.backends.contract import ALL_DTYPES, TORCH_DEVICES, Backend
from attnmask.tiles import TileGrid

__all__ = ["BACKEND", "MAX_BAND_KEYS", "band_mask", "banded_attention"]

_TILE_SIZES = (8, 16, 32, 64)  # candidate tile sizes; the cheapest by banded_cost wins (ties: the smaller)
MAX_BAND_KEYS = 256  # wider bands go to sdpa / varlen / blocksparse
_HEAD_COST = 1e5  # Python and dispatch overhead of one head's few kernel calls, in element operations
# Per (tile, head) item of the SDPA batch: measured 4-7 us with the mask and (then) the edge tiles, whatever the tile
# size.
_TILE_COST = 2.3e5
_PAIR_COST = 1.0  # one multiply-add of a pair of the band (one SDPA call on small tiles)
_MASK_COST = 20.0  # evaluating the spec on one (query, key) pair of the band, once for all heads
# Threads: only the one SDPA call per batch row (its pairs and per-tile items) is split across the intra-op threads,
# each added one contributing this share of a core; the masks, padding, Python and the output copy run on one
# (``serial_steps``). Fitted: ``benchmarks/bench_limit.py --fit`` on the 1- and 2-thread tables limit_tables/omp_*.txt
# (RESULTS.md, "native's threads"; was 0.0).
_THREAD_EFFICIENCY = 0.14
# Other modes than a float32 forward (bfloat16, with a backward): ``bench_limit.py --fit ... --modes`` on the six 1K
# tables benchmarks/limit_tables/modes_*.txt; bfloat16 on AMX tiles, since the band's pairs are charged at the AMX
# pair factor (``cost``), refitted on the eight 1K tables modes_final_*, s10_*_final, s13_*_final, s14_q1 and
# s14_q2_keys (RESULTS.md, issue 15, "banded's pairs on AMX tiles"); the float32 backward (fitted 3.99-4.18) then
# chosen by the picks it gives, replayed on twelve sets of 1K tables and four of small rows (``--fit ... --modes``):
# 1348 rows within 1.1x of the fastest at 4.18 and 4.8, 1359 at 4.9, 1366 from 5.0 to 8.0 (no set worse; the rows
# gained are windows of 128, chunks and window + documents with a backward at one thread, where banded's forward
# estimate is low against blocksparse's); the smallest of that range is kept; with a core taken (busy): ``--fit ...
# --busy-factors`` on busy_omp_q2.txt (RESULTS.md, issue 15, "bfloat16 and backward in the estimates", "Estimates
# that see a taken core"); bfloat16 on a CPU without AMX tiles (the _no_amx factors): --fit ... --modes on
# limit_tables/s9_q1.txt and s9_q2.txt, an AMD EPYC (RESULTS.md, issue 15, "bfloat16 on a CPU without AMX").
MODES = ModeFactors(
    bf16=1.17,
    backward=5.0,
    bf16_backward=8.16,
    busy=1.13,
    busy_backward=1.67,
    bf16_no_amx=0.9,
    bf16_backward_no_amx=6.99,
)


class _BandPlan(NamedTuple):
    """Tile size ``bs``, band width ``W`` in tiles, and the rows ``R`` (1 or B) of the spec's per-row data."""

    block_size: int
    width: int
    rows: int


def _first_keys(spec: M.MaskSpec, length: int, rows: int, device) -> np.ndarray | str:
    """Per query tile of ``_TILE_SIZES[0]`` tokens, the first key its band may hold (``(n,)`` int64 on the host,
    ``length`` for a tile with no key), from ``spec.key_band``; or why the spec has no band ending at the query tile.
    O(n log n)."""
    bs = _TILE_SIZES[0]
    pos = torch.arange(length, device=device)
    grid = TileGrid.build(pos, pos, bs, rows, (0, 0))
    band = spec.key_band(grid)
    if band is None:
        return "the spec gives no key band (needs e.g. causal() & document(...) or a sliding window)"
    lo, hi = torch.broadcast_tensors(*band)  # (Rb, n) each
    used = lo < hi
    if bool((used & (hi > torch.arange(grid.n_q_tiles, device=device) + 1)).any()):
        return "some query tile may see keys in later tiles (the band must end at the query tile: causal specs)"
    return torch.where(used, lo * bs, length).amin(0).cpu().numpy()


def _band_width(first_keys: np.ndarray, bs: int) -> int:
    """``W`` for tiles of ``bs`` (a multiple of the smallest size): key tiles of the widest band ending at its query
    tile. A larger tile's band starts at the first key of the small tiles it holds (sound: it holds their bands).
    In numpy: ``_plan`` asks it for every tile size, a few operations on ``(n,)`` each."""
    per = bs // _TILE_SIZES[0]
    n = -(-len(first_keys) // per)
    padded = np.full(n * per, np.iinfo(np.int64).max, dtype=np.int64)
    padded[: len(first_keys)] = first_keys
    first = padded.reshape(n, per).min(1)
    tile = np.arange(n)
    used = first < (tile + 1) * bs
    return max(int(((tile + 1 - first // bs) * used).max()), 1) if n else 1


def _plan(call) -> _BandPlan | str:
    spec = call.mask
    if not isinstance(spec, M.MaskSpec):
        return "needs a mask spec (a dense tensor mask or no mask has no band)"
    if not spec.is_structural:
        return "needs a structural spec (a custom predicate has no band)"
    if call.positions_given:
        return "needs default positions (no explicit q_positions / kv_positions)"
    if call.q_len != call.kv_len:
        return f"needs as many queries as keys (got Q={call.q_len}, K={call.kv_len})"
    if (empty := degenerate(call)) is not None:
        return empty
    rows = spec.batch_size or 1
    first_keys = _first_keys(spec, call.q_len, rows, call.q.device)
    if isinstance(first_keys, str):
        return first_keys
    best: _BandPlan | None = None
    narrowest = None
    for bs in _TILE_SIZES:
        width = _band_width(first_keys, bs)
        if width * bs <= MAX_BAND_KEYS and (best is None or _estimate(call, bs, width) < _estimate(call, *best[:2])):
            best = _BandPlan(bs, width, rows)
        narrowest = width * bs if narrowest is None else min(narrowest, width * bs)
    if best is None:
        return f"band of {narrowest} keys per query at best, more than {MAX_BAND_KEYS} (long documents)"
    return best


def _cached_plan(call) -> _BandPlan | str:
    return cached(call, "banded", _plan)


def unsupported(call) -> str | None:
    plan = _cached_plan(call)
    return plan if isinstance(plan, str) else None


def cost(call) -> float:
    """Pairs computed ``B·H·Lp·W·bs`` times ``D + Dv`` and a charge per tile and head (SDPA item), divided by what
    ``_workers.threads_available()`` threads gain on that one SDPA call per row; then, on one thread, the copy of the
    output, the band's mask evaluations (once for all heads) and a charge per head (comparable with the ``"varlen"``
    backend's cost)."""
    if off_cpu(call):
        return float("inf")
    plan = _cached_plan(call)
    pairs, tiles, serial = _parts(call, plan.block_size, plan.width)
    parallel = pairs * amx_pair_factor(call) + tiles  # bfloat16 pairs on AMX tiles: as SDPA's own estimate
    gain = _workers.expected_speedup([parallel], _workers.threads_available(), 0.0, _THREAD_EFFICIENCY)
    return (serial + parallel / gain) * mode_factor(MODES, call)


def floor(call) -> float:
    """A lower bound of ``cost`` without the plan's key bands (``Backend.floor``): ``_parts`` with the fewest tiles
    (the largest tile size), the fewest pairs (a band as wide as the most keys a query sees,
    ``_common.most_keys_floor``, and at least one tile of the smallest size: every query's keys lie in its band) and
    no mask, divided by the most the threads gain. 0 for a call ``cost`` would not estimate. O(1), or O(N) on a
    plan's segments, or O(B·K) on padding."""
    if off_cpu(call) or not isinstance(call.mask, M.MaskSpec) or not call.mask.is_structural or degenerate(call):
        return 0.0
    heads = call.batch * call.heads
    band = max(min(_TILE_SIZES), most_keys_floor(call))
    pairs = heads * call.q_len * band * (call.head_dim + call.value_dim) * _PAIR_COST
    tiles = heads * -(-call.q_len // max(_TILE_SIZES)) * _TILE_COST
    serial = heads * (_HEAD_COST + call.q_len * call.value_dim * COPY_COST)
    gain = _workers.speedup_bound(_workers.threads_available(), _THREAD_EFFICIENCY)
    return (serial + (pairs * amx_pair_factor(call) + tiles) / gain) * mode_factor(MODES, call)


def _estimate(call, bs: int, width: int) -> float:
    """The one-thread estimate of tiles of ``bs`` and a band of ``width`` tiles (``_plan`` picks the tile size by it:
    the plan does not depend on the thread count)."""
    return sum(_parts(call, bs, width))


def _parts(call, bs: int, width: int) -> tuple[float, float, float]:
    """``(work of the SDPA calls' pairs, of their per-tile items, work on one thread)`` of tiles of ``bs`` and a band
    of ``width`` tiles."""
    n_tiles = -(-call.q_len // bs)
    band = n_tiles * bs * width * bs
    heads = call.batch * call.heads
    pairs = heads * band * (call.head_dim + call.value_dim) * _PAIR_COST
    serial = heads * (_HEAD_COST + call.q_len * call.value_dim * COPY_COST)  # the output is assembled by one copy
    return (
        float(pairs),
        float(heads * n_tiles * _TILE_COST),
        float(serial + (call.mask.batch_size or 1) * band * _MASK_COST),
    )


def run(call) -> torch.Tensor:
    plan = _cached_plan(call)
    masks = cached(call, "banded_masks", _call_band_masks)
    return banded_attention(
        call.q, call.k, call.v, call.mask, plan.block_size, plan.width, scale=call.scale, masks=masks
    )


def _call_band_masks(call) -> _BandMasks:
    plan = _cached_plan(call)
    return band_masks(call.mask, call.q_len, plan.block_size, plan.width, call.q.device)


def band_mask(spec: M.MaskSpec, length: int, bs: int, width: int, rows: int, device) -> torch.Tensor:
    """``(R, nT, bs, W·bs)`` bool: may query ``t·bs + i`` attend to key ``(t - W + 1)·bs + c`` (False off the row).

    Example: ``length=3``, ``bs=2``, ``width=2``, ``causal()``: tile 0 has keys ``-2, -1, 0, 1`` (the first two
    outside the row), tile 1 keys ``0 .. 3`` with query 3 past the row (all False). O(R·L·W·bs)."""
    n_tiles = -(-length // bs)
    tile = torch.arange(n_tiles, device=device)[:, None]
    q = tile * bs + torch.arange(bs, device=device)  # (nT, bs)
    k = (tile - width + 1) * bs + torch.arange(width * bs, device=device)  # (nT, W·bs)
    inside = (q[:, :, None] < length) & (k[:, None, :] >= 0) & (k[:, None, :] < length)
    b = torch.arange(rows, device=device).view(-1, 1, 1, 1)
    qc, kc = q.clamp(max=length - 1)[None, :, :, None], k.clamp(0, length - 1)[None, :, None, :]
    allowed = spec.evaluate(b, qc, kc) & inside
    return torch.broadcast_to(allowed, (rows, n_tiles, bs, width * bs))


def _band_view(t: torch.Tensor, first: int, n: int, bs: int, width: int) -> torch.Tensor:
    """Keys of one batch row ``(Hkv, L, X)`` (contiguous) -> the key bands of query tiles ``first .. first + n - 1``
    as ``(n, Hkv, W·bs, X)``: ONE overlapping strided view (tile ``t``'s band starts at key ``(t - W + 1)·bs``, so
    ``first >= W - 1``: on keys padded with ``W - 1`` tiles in front, ``first = W - 1`` is the row's first tile), no
    copy. Its gradient is the sum of ``W`` shifted slices (autograd's generic backward of
    an overlapping ``as_strided`` is several times slower)."""
    return _BandView.apply(t, first, n, bs, width)


class _BandView(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, first, n, bs, width):
        ctx.meta = (t.shape, first, n, bs, width)
        heads, length, x = t.shape
        offset = t.storage_offset() + (first - width + 1) * bs * x
        return t.as_strided((n, heads, width * bs, x), (bs * x, length * x, x, 1), offset)

    @staticmethod
    def backward(ctx, grad):
        (heads, length, x), first, n, bs, width = ctx.meta
        out = grad.new_zeros((heads, length, x))
        per_offset = grad.reshape(n, heads, width, bs, x)
        for j in range(width):  # band column block j holds the keys of tile t - W + 1 + j
            start = (first - width + 1 + j) * bs
            out[:, start : start + n * bs] += per_offset[:, :, j].transpose(0, 1).reshape(heads, n * bs, x)
        return out, None, None, None, None


class _BandMasks(NamedTuple):
    """What ``banded_attention`` derives from the spec alone (``band_masks``): ``attend`` ``(R, nT, bs, W·bs)``, the
    band's mask with every query row that has no allowed key opened to its whole band (finite scores: its output is
    zeroed or, past the row, dropped), and ``keep`` ``(R, nT, bs, 1)``, whether each query has a key, or None when
    every query of the row does."""

    attend: torch.Tensor
    keep: torch.Tensor | None


def band_masks(spec: M.MaskSpec, length: int, bs: int, width: int, device) -> _BandMasks:
    """The spec's masks on the band of a row of ``length`` (see ``_BandMasks``), for ``banded_attention``'s
    ``masks=``. O(R·L·W·bs) bools."""
    rows = spec.batch_size or 1
    allowed = band_mask(spec, length, bs, width, rows, device)  # (R, nT, bs, W·bs)
    has_key = allowed.any(-1, keepdim=True)  # (R, nT, bs, 1); the padding queries past L have none
    keep = None if bool(has_key.view(rows, -1)[:, :length].all()) else has_key
    attend = allowed if bool(has_key.all()) else allowed | ~has_key
    return _BandMasks(attend, keep)


def _padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bs: int, width: int) -> tuple[torch.Tensor, ...]:
    """``q`` with zero rows up to a whole last tile, and ``k``, ``v`` with ``W - 1`` tiles of zero rows before the
    row and the same tail after it: every query tile's band is then inside the padded row (masked where it leaves
    the real one). Copies: O(B·(H·L·D + Hkv·(L + W·bs)·(D + Dv)))."""
    L = q.shape[2]
    tail = -(-L // bs) * bs - L
    q = F.pad(q, (0, 0, 0, tail)) if tail else q
    return (q, *(F.pad(t, (0, 0, (width - 1) * bs, tail)) for t in (k, v)))


def banded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: M.MaskSpec,
    block_size: int,
    width: int,
    *,
    scale: float | None = None,
    masks: _BandMasks | None = None,
) -> torch.Tensor:
    """Attention where query tile ``t`` of ``block_size`` tokens sees at most key tiles ``t - width + 1 .. t``.

    ``q`` ``(B, H, L, D)``, ``k`` ``(B, Hkv, L, D)``, ``v`` ``(B, Hkv, L, Dv)``, ``H % Hkv == 0``; ``spec`` at the
    default positions (query ``i`` is position ``i``), with every allowed key inside the band (the caller checks
    this with ``spec.key_band``: ``unsupported``). Returns ``(B, H, L, Dv)`` in ``q``'s dtype (a view of a
    padded buffer when ``L`` is not a multiple of ``block_size``); rows with no allowed key are exactly 0 with zero
    gradient.

    Every query tile of each batch row takes ONE fused SDPA call: ``k`` and ``v`` are padded with ``W - 1`` tiles of
    zeros before the row (and ``q``, ``k``, ``v`` to a whole last tile, ``_padded``), so that the query tiles
    ``(nT, H, bs, D)`` and the key / value bands ``(nT, Hkv, W·bs, ·)`` are strided views of the padded tensors (GQA
    through SDPA's ``enable_gqa``) and the mask is the band's ``(nT, 1, bs, W·bs)``, additive (0 / -inf, what SDPA
    makes of a bool one), blocking the padding. (The first ``W - 1`` tiles and a short last one had been gathered and
    computed apart, in float32: half of the work of a row of 8 tiles at ``W = 5``, at 2-3x the time per pair.)
    ``masks``: ``band_masks(spec, L, block_size, width, device)`` when the caller keeps them (the ``"banded"``
    backend caches them with its plan); computed here otherwise.
    """
    L, D, bs = q.shape[2], q.shape[3], block_size
    scale = D**-0.5 if scale is None else scale
    q, k, v = (t.contiguous() for t in (q, k, v))
    if masks is None:
        masks = band_masks(spec, L, bs, width, q.device)
    # The few small ops with one intra-op thread, forward and backward (no parallel region each); the one large SDPA
    # call per row with all of them.
    return graph_in(serial_steps, functools.partial(_banded_rows, masks, bs, width, scale, L), q, k, v)


def _banded_rows(masks: _BandMasks, bs: int, width: int, scale: float, L: int, q, k, v) -> torch.Tensor:
    """``banded_attention``'s computation on contiguous ``q``, ``k``, ``v`` with the band's ``masks``."""
    B, H, _, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    n_tiles = -(-L // bs)
    rows = masks.attend.shape[0]
    if masks.keep is not None and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        # SDPA's backward reads the scores of rows with no key although their output is zeroed: a NaN query there
        # would reach dk and dv (0 · NaN), so such a query is 0 (_dense.zero_query_rows)
        q = zero_query_rows(q, ~masks.keep.reshape(rows, 1, n_tiles * bs, 1)[:, :, :L])
    # Rows by one unbind per tensor: its backward stacks the rows' gradients into one tensor, where indexing each
    # row allocated a zero tensor of the whole padded input per row (a third of the call on rows of 8 x 1,024).
    q_rows, k_rows, v_rows = (t.unbind(0) for t in _padded(q, k, v, bs, width))
    per_row = []
    for b in range(B):
        r = b if rows > 1 else 0
        qt = q_rows[b].view(H, n_tiles, bs, D).transpose(0, 1)
        kb, vb = (_band_view(t[b], width - 1, n_tiles, bs, width) for t in (k_rows, v_rows))
        mask = additive(masks.attend[r, :, None], qt.dtype)  # built here, not in SDPA's own parallel region
        sdpa = functools.partial(F.scaled_dot_product_attention, attn_mask=mask, scale=scale, enable_gqa=H != Hkv)
        region = functools.partial(all_threads, n_tiles * H * bs * kb.shape[2] * (D + Dv))
        out = graph_in(region, sdpa, qt, kb, vb)  # one parallel region, as stock SDPA runs it
        if masks.keep is not None:  # rows with no allowed key: exactly 0 (a multiply would keep a NaN query's NaN)
            out = zero_rows(out, ~masks.keep[r, :, None])
        per_row.append(out.transpose(0, 1))  # (H, nT, bs, Dv)
    out = per_row[0].unsqueeze(0) if B == 1 else torch.stack(per_row)  # one copy either way (reshape below for B = 1)
    return out.reshape(B, H, n_tiles * bs, Dv)[:, :, :L]


BACKEND = Backend(
    "banded",
    run,
    cost,
    devices=TORCH_DEVICES,
    dtypes=ALL_DTYPES,
    masks=frozenset({"structural"}),
    unsupported=unsupported,
    propagates_nonfinite=frozenset({"cpu"}),  # checked by tests/test_conformance.py
    floor=floor,
)
