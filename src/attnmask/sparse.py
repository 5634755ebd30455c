"""Sparse attention kernels that never build a dense ``(Q, K)`` mask: varlen (per document) and block-sparse.

Layer 3 (attention), beside ``attention.py``. Both kernels take explicit arguments (tensors, document segments, a
tile-class tensor) so that they can be tested on their own; the backend functions at the end (``varlen_run``,
``blocksparse_run`` with their ``*_unsupported`` and ``*_cost``) lower an ``AttentionCall``'s spec through
``attnmask.lowering`` and are registered in ``attention.py`` as ``"varlen"`` and ``"blocksparse"`` (FlexAttention:
``attnmask.backends.flex``).

Shapes everywhere: ``q`` ``(B, H, Q, D)``, ``k`` ``(B, Hkv, K, D)``, ``v`` ``(B, Hkv, K, Dv)`` with ``H % Hkv == 0``
(grouped-query attention: query head ``h`` reads key/value head ``h // (H // Hkv)``). Output ``(B, H, Q, Dv)`` in
``q.dtype``.
A query row with no allowed key gives exactly 0 and a zero gradient, as on every attnmask backend.
Attention dropout (``dropout_p``, on the probabilities after the softmax, as SDPA): varlen only; block-sparse and
FlexAttention report it as unsupported (``dropout_unsupported``, shared with the other backends that lack it).

Worked example, one packed row of 3 documents of lengths 2, 4, 3 (``doc_ids = [0, 0, 1, 1, 1, 1, 2, 2, 2]``),
causal inside each document::

    >>> segs = segments_from_varlen((causal() & document(seq_lens=[2, 4, 3])).varlen(9), 1, 9, 9)
    >>> segs.tolist()   # (row, q_start, q_len, k_start, k_len, offset)
    [[0, 0, 2, 0, 2, 0], [0, 2, 4, 2, 4, 0], [0, 6, 3, 6, 3, 0]]
    >>> out = varlen_attention(q, k, v, segs, causal=True)   # one SDPA per distinct document length
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnmask import masks as M
from attnmask.errors import BackendError, InputError, ShapeError, bad
from attnmask.masks import FULL, NONE, PARTIAL
from attnmask.plancache import call_plans

__all__ = [
    "NONE",
    "PARTIAL",
    "FULL",
    "check_segments",
    "segments_from_varlen",
    "varlen_attention",
    "blocksparse_attention",
    "run_layout",
    "spec_tile_mask",
    "check_dropout_p",
    "dropout_unsupported",
]

TileMask = Callable[[int, int, int, int, int], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------------
# Argument checks shared by both kernels


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise bad(ShapeError, name, "a 4D tensor (B, H, L, D)", getattr(t, "shape", type(t).__name__))
    B, H, Q, D = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != B or k.shape[3] != D:
        raise bad(ShapeError, "k, v", f"shapes (B={B}, Hkv, K, D={D}) and (B, Hkv, K, Dv)", (k.shape, v.shape))
    Hkv, K = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv:
        raise bad(ShapeError, "k", f"a number of heads dividing H={H}", Hkv)
    return B, H, Q, D, Hkv, K


def check_dropout_p(dropout_p) -> float:
    """``dropout_p`` as a float in ``[0, 1)``; ``InputError`` naming it otherwise (a bool or a tensor included)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise bad(InputError, "dropout_p", "a float in [0, 1)", repr(dropout_p))
    return float(dropout_p)


# ----------------------------------------------------------------------------------------------------------------------
# Varlen: documents run separately through SDPA


def segments_from_varlen(args, batch: int, q_len: int, kv_len: int, spec_rows: int = 1) -> torch.Tensor:
    """Document segments ``(N, 6)`` int64 ``(row, q_start, q_len, k_start, k_len, offset)`` from varlen arguments.

    ``args``: ``attnmask.lowering.VarlenArgs`` for rows of ``kv_len`` keys whose last ``q_len`` positions are the
    queries; ``offset`` is the query position of ``q_start`` minus the key position of ``k_start``. A spec of
    ``spec_rows == 1`` applied to ``batch`` rows repeats its segments for every row. Example: documents of lengths
    2, 4, 3 in one row (``Q = K = 9``) give ``[[0, 0, 2, 0, 2, 0], [0, 2, 4, 2, 4, 0], [0, 6, 3, 6, 3, 0]]``.
    O(number of sequences).
    """
    lens_q = args.cu_seqlens_q.diff().long().cpu()
    lens_k = args.cu_seqlens_k.diff().long().cpu()
    q_flat = args.indices_q.cpu()[args.cu_seqlens_q[:-1].long().cpu()]
    k_flat = args.indices_k.cpu()[args.cu_seqlens_k[:-1].long().cpu()]
    rows = torch.div(k_flat, max(kv_len, 1), rounding_mode="floor")
    q_start, k_start = q_flat % max(q_len, 1), k_flat % max(kv_len, 1)
    offset = q_start + (kv_len - q_len) - k_start
    segs = torch.stack([rows, q_start, lens_q, k_start, lens_k, offset], dim=1)
    if spec_rows == 1 and batch > 1:
        segs = segs.repeat(batch, 1)
        segs[:, 0] = torch.arange(batch).repeat_interleave(len(lens_k))
    return segs


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: torch.Tensor,
    *,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    small: int = 32,
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
    """
    B, H, Q, D, Hkv, K = _check_qkv(q, k, v)
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
    if groups:
        big = [seg for members in groups.values() for seg in members]
        q_parts = _split_rows(q, [(seg[0], seg[1], seg[2]) for seg in big])
        k_parts, v_parts = (_split_rows(t, [(seg[0], seg[3], seg[4]) for seg in big]) for t in (k, v))
    for (_, _, off), members in groups.items():
        qb, kb, vb = (_stack_segments(parts, members, idx) for parts, idx in ((q_parts, 1), (k_parts, 3), (v_parts, 3)))
        results.append((_dense_segment(qb, kb, vb, off, causal, window, scale, gqa, dropout_p), members))
    if small_segs:
        results.extend(_small_segments(q, k, v, small_segs, causal, window, scale, dropout_p))
    if sum(len(m) for _, m in results) > 64:
        out = _assemble_by_index(q, v, results)
    else:
        out = _assemble(q, v, {(seg[0], seg[1]): res[i, :, : seg[2]] for res, m in results for i, seg in enumerate(m)})
    if not results and any(t.requires_grad for t in (q, k, v)) and torch.is_grad_enabled():
        # No query sees any key: keep the zeros connected to the inputs so that their gradient is a defined 0.
        anchor = torch.stack([t.reshape(-1)[:1].sum() for t in (q, k, v)]).sum()
        out = out + torch.where(torch.ones((), dtype=torch.bool, device=out.device), 0.0, anchor)
    return out.to(q.dtype)


def check_segments(segments, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``segments`` as a contiguous CPU int64 ``(N, 6)`` tensor, checked against ``q`` ``(B, H, Q, D)`` and ``k``,
    ``v``: every range inside its row, lengths >= 0, and no two query ranges of a row overlapping (empty ones aside).
    Raises ``ShapeError`` naming the first offending segment. O(N log N), vectorised."""
    B, _, Q, _, _, K = _check_qkv(q, k, v)
    segs = torch.as_tensor(segments, dtype=torch.long).cpu()
    if segs.numel() % 6 or (segs.dim() == 2 and segs.shape[1] != 6) or segs.dim() > 2:
        raise bad(
            ShapeError,
            "segments",
            "an (N, 6) int tensor (row, q_start, q_len, k_start, k_len, offset)",
            tuple(segs.shape),
        )
    segs = segs.reshape(-1, 6).contiguous()
    row, qs, ql, ks, kl, _ = segs.unbind(1)
    inside = (row >= 0) & (row < B) & (qs >= 0) & (ql >= 0) & (qs + ql <= Q) & (ks >= 0) & (kl >= 0) & (ks + kl <= K)
    if not bool(inside.all()):
        first = segs[int((~inside).nonzero()[0])].tolist()
        raise bad(ShapeError, "segments", f"ranges inside rows of B={B}, Q={Q}, K={K}", first[:5])
    used = segs[ql > 0]
    if len(used) > 1:
        order = torch.argsort(used[:, 0] * (Q + 1) + used[:, 1])
        s = used[order]
        clash = (s[1:, 0] == s[:-1, 0]) & (s[1:, 1] < s[:-1, 1] + s[:-1, 2])
        if bool(clash.any()):
            at = s[1:][clash][0]
            raise bad(
                ShapeError, "segments", "non-overlapping query ranges", f"overlap at row {int(at[0])}, q {int(at[1])}"
            )
    return segs


def _split_rows(t: torch.Tensor, ranges: list) -> dict:
    """Views ``(1, H, n, D)`` of ``t`` ``(B, H, L, D)`` for ranges ``(row, start, n)``: ``{(row, start): view}``.

    Where a row's ranges do not overlap, the row is cut with one ``split`` (its backward writes every piece's gradient
    into one tensor, instead of a full-size zero tensor per piece as separate slices would); otherwise by slicing.
    """
    parts = {}
    for r in sorted({row for row, _, _ in ranges}):
        spans = sorted({(start, n) for row, start, n in ranges if row == r})
        row_t = t[r : r + 1]
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


def _sdpa(q, k, v, mask, is_causal, scale, gqa, dropout_p=0.0):
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )


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
    # Window shorter than the document: query blocks over a key band.
    block = max(window, 64)
    outs = []
    for a in range(0, ql, block):
        b_end = min(a + block, ql)
        k0 = max(0, a + off - window + 1)
        k1 = min(kl, b_end + off)
        if k1 <= k0:
            outs.append(v.new_zeros(q.shape[0], q.shape[1], b_end - a, v.shape[3]))
            continue
        mask = _band_mask(a, b_end, k0, k1, off, window, q.device)
        outs.append(_masked_rows(q[:, :, a:b_end], k[:, :, k0:k1], v[:, :, k0:k1], mask, scale, gqa, dropout_p))
    return torch.cat(outs, dim=2)


def _band_mask(q0, q1, k0, k1, off, window, device):
    """``(q1 - q0, k1 - k0)`` bool: ``0 <= i + off - j (< window)`` for segment query ``i`` and key ``j``."""
    d = torch.arange(q0, q1, device=device).unsqueeze(1) + off - torch.arange(k0, k1, device=device)
    return (d >= 0) & (d < window) if window is not None else d >= 0


def _masked_rows(q, k, v, mask, scale, gqa, dropout_p=0.0):
    """SDPA with a bool mask ``(..., Lq, Lk)``; rows with no allowed key are set to exactly 0.

    Such rows attend to every key inside the kernel (finite on every device), then are zeroed: their gradient is 0.
    """
    empty = ~mask.any(-1, keepdim=True)
    if not bool(empty.any()):
        return _sdpa(q, k, v, mask, False, scale, gqa, dropout_p)
    return _sdpa(q, k, v, mask | empty, False, scale, gqa, dropout_p).masked_fill(empty, 0.0)


def _small_segments(q, k, v, segs, causal, window, scale, dropout_p=0.0) -> list:
    """Tiny documents, grouped by exact shape ``(q_len, k_len, offset)`` (at most a few dozen groups): one gather per
    tensor and one batched attention per group, computed in a heads-major layout ``(H, n, L, D)`` without copies.

    Returns ``[(output (n, H, q_len, Dv), the group's n segments)]``.
    """
    dev = q.device
    qf, kf, vf = (_heads_major(t) for t in (q, k, v))
    groups: dict[tuple[int, int, int], list] = {}
    for seg in segs:
        groups.setdefault((seg[2], seg[4], seg[5]), []).append(seg)
    results = []
    for (ql, kl, off), members in groups.items():
        row, qs, _, ks, _, _ = torch.tensor(members, dtype=torch.long, device=dev).unbind(1)
        q_idx = (row * q.shape[2] + qs)[:, None] + torch.arange(ql, device=dev)
        k_idx = (row * k.shape[2] + ks)[:, None] + torch.arange(kl, device=dev)
        qb, kb, vb = (
            t.index_select(1, idx.reshape(-1)).unflatten(1, idx.shape)
            for t, idx in ((qf, q_idx), (kf, k_idx), (vf, k_idx))
        )
        mask = _band_mask(0, ql, 0, kl, off, window, dev) if causal else None
        results.append((_tiny_attention(qb, kb, vb, mask, scale, dropout_p).transpose(0, 1), members))
    return results


def _heads_major(t: torch.Tensor) -> torch.Tensor:
    """``(B, H, L, X)`` -> ``(H, B·L, X)`` (a view when ``B == 1``): tokens of all rows along one axis."""
    return t.transpose(0, 1).reshape(t.shape[1], -1, t.shape[3])


def _tiny_attention(q, k, v, mask, scale, dropout_p=0.0):
    """Unfused attention for tiny documents (a fused kernel's per-call overhead dominates there), heads-major.

    ``q`` ``(H, n, Lq, D)``, ``k, v`` ``(Hkv, n, Lk, ·)``, ``mask`` ``(Lq, Lk)`` bool or None; rows with no allowed
    key give 0; ``dropout_p > 0`` drops probabilities (zeros stay 0). Low precision is computed in float32.
    Memory ``O(H·n·Lq·Lk)``: used for documents of few tokens.
    """
    H, Hkv = q.shape[0], k.shape[0]
    qh = q.unflatten(0, (Hkv, H // Hkv))  # (Hkv, rep, n, Lq, D): query head h reads key head h // rep
    s = torch.matmul(qh.float(), k.float().unsqueeze(1).transpose(-1, -2)) * scale
    if mask is not None:
        has_key = mask.any(-1, keepdim=True)
        s = s.masked_fill(~(mask | ~has_key), float("-inf"))
    p = torch.softmax(s, dim=-1)
    if mask is not None and not bool(has_key.all()):
        p = p.masked_fill(~has_key, 0.0)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return torch.matmul(p, v.float().unsqueeze(1)).flatten(0, 1).to(v.dtype)


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
        flat = grad.transpose(0, 1).reshape(H, B * Q, Dv)
        return (None, None, *(flat.index_select(1, idx) for idx in ctx.indices))


# ----------------------------------------------------------------------------------------------------------------------
# Block-sparse: tile by tile over a block layout, online softmax, custom backward


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


def _plan(tile_class: torch.Tensor, block_q: int, block_k: int, Q: int, K: int, max_keys: int, max_rows: int):
    """Groups of query tiles with identical key-tile lists, their contiguous key runs split at ``max_keys`` keys."""
    tc = tile_class.to("cpu", torch.int8).numpy()
    groups = []
    for b in range(tc.shape[0]):
        prev, start = None, 0
        n_q = tc.shape[1]
        for i in range(n_q + 1):
            row = tc[b, i] if i < n_q else None
            same = (
                row is not None and prev is not None and (row == prev).all() and (i - start + 1) * block_q <= max_rows
            )
            if same:
                continue
            if prev is not None and prev.any():
                groups.append(_Group(b, start * block_q, min(i * block_q, Q), _runs(prev, block_k, K, max_keys)))
            prev, start = row, i
    return groups


def _runs(row, block_k: int, K: int, max_keys: int) -> tuple[_Run, ...]:
    runs, cur = [], []
    tiles_per_run = max(1, max_keys // block_k)
    for j in row.nonzero()[0].tolist():
        if cur and (j != cur[-1] + 1 or len(cur) >= tiles_per_run):
            runs.append(cur)
            cur = []
        cur.append(j)
    if cur:
        runs.append(cur)
    out = []
    for tiles in runs:
        partial: list[list[int]] = []
        for j in tiles:
            if row[j] == PARTIAL:
                if partial and partial[-1][1] == j:
                    partial[-1][1] = j + 1
                else:
                    partial.append([j, j + 1])
        spans = tuple((a * block_k, min(e * block_k, K)) for a, e in partial)
        out.append(_Run(tiles[0] * block_k, min((tiles[-1] + 1) * block_k, K), spans))
    return tuple(out)


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

    Consecutive query tiles with the same key-tile list are processed together (up to ``max_rows`` rows); their
    contiguous key tiles are read as one slice (no copy) in chunks of at most ``max_keys`` keys, combined by an online
    softmax (running max and sum, rescaled per chunk). All heads at once; GQA without repeating keys. Low-precision
    inputs are computed in float32 (float64 stays float64). On CPU in float32, each chunk runs through PyTorch's fused
    CPU flash-attention kernel (which returns the log-sum-exp) and chunks are merged by log-sum-exp; elsewhere, or
    with ``USE_CPU_FLASH = False``, a portable loop of ``bmm`` and ``exp`` does the same.

    Backward: a custom autograd function that recomputes scores chunk by chunk from the saved log-sum-exp (the
    FlashAttention scheme). Memory: O(B·H·Q) for the log-sum-exp, one chunk of scores at a time, and the element masks
    of PARTIAL tiles (kept from forward to backward): O(partial tiles · bq · bk) bools. Never O(Q·K).
    """
    B, H, Q, D, Hkv, K = _check_qkv(q, k, v)
    plan, masks = _tile_groups(B, Q, K, tile_class, block_size, tile_mask, max_keys, max_rows)
    scale = D**-0.5 if scale is None else float(scale)
    return _BlockSparse.apply(q, k, v, plan, masks, scale)


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
    ok = denom > 0
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
    """Additive ``(rep·rows, n)`` bias of one run: ``-inf`` on denied pairs of its PARTIAL spans, None if none."""
    if not spans:
        return None
    bias = torch.zeros(rows, n, dtype=dtype, device=device)
    for start, denied in spans:
        bias[:, start : start + denied.shape[1]].masked_fill_(denied, float("-inf"))
    return bias.repeat(rep, 1) if rep > 1 else bias


def _run_empty_rows(spans, n: int, rep: int) -> torch.Tensor | None:
    """``(rep·rows,)`` bool: rows of a run whose every key is denied; None when the run has an unmasked key tile."""
    if not spans or sum(d.shape[1] for _, d in spans) < n:
        return None
    empty = spans[0][1].all(-1)
    for _, denied in spans[1:]:
        empty = empty & denied.all(-1)
    return empty.repeat(rep) if rep > 1 else empty


def _flash_group_forward(qg, runs, rep, scale):
    """Group forward with the CPU flash kernel, one call per run, merged by log-sum-exp.

    ``qg`` ``(1, Hkv, rep·rows, D)``; ``runs``: ``(k, v, spans)`` with ``k, v`` ``(1, Hkv, n, D)``. Returns the
    output and the log-sum-exp (``+inf`` on rows with no allowed key).
    """
    fwd, _ = _flash_cpu_ops()
    n_rows = qg.shape[2]
    outs, lses = [], []
    for kt, vt, spans in runs:
        bias = _run_bias(spans, n_rows // rep, kt.shape[2], rep, qg.dtype, qg.device)
        o, lse = fwd(qg, kt, vt, 0.0, False, attn_mask=bias, scale=scale)
        empty = _run_empty_rows(spans, kt.shape[2], rep)
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
    empty = torch.isneginf(lse)
    return out.masked_fill(empty.unsqueeze(-1), 0.0), lse.masked_fill(empty, float("inf"))


class _BlockSparse(torch.autograd.Function):
    """Block-sparse attention with recomputation in backward; see ``blocksparse_attention``."""

    @staticmethod
    def forward(ctx, q, k, v, plan, masks, scale):
        B, H, Q, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[3]
        rep = H // Hkv
        cdt = torch.promote_types(q.dtype, torch.float32)
        flash = USE_CPU_FLASH and q.device.type == "cpu" and cdt == torch.float32 and D == Dv
        flash = flash and _flash_cpu_ops() is not None
        qf, kf, vf = (t.to(cdt) for t in (q, k, v))
        out = torch.zeros(B, H, Q, Dv, dtype=cdt, device=q.device)
        lse = torch.full((B, H, Q), float("inf"), dtype=cdt, device=q.device)
        for gi, g in enumerate(plan):
            rows = g.q1 - g.q0
            if flash:
                qg = qf[g.b, :, g.q0 : g.q1].reshape(1, Hkv, rep * rows, D)
                runs = [_run_kv(kf, vf, g, r, True) + (masks.get((gi, ri)),) for ri, r in enumerate(g.runs)]
                o, g_lse = _flash_group_forward(qg, runs, rep, scale)
            else:
                qg = (qf[g.b, :, g.q0 : g.q1] * scale).reshape(Hkv, rep * rows, D)
                runs = [_run_kv(kf, vf, g, r, False) + (masks.get((gi, ri)),) for ri, r in enumerate(g.runs)]
                o, g_lse = _online_softmax(qg, runs, rep)
            out[g.b, :, g.q0 : g.q1] = o.view(H, rows, Dv)
            lse[g.b, :, g.q0 : g.q1] = g_lse.view(H, rows)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.masks, ctx.scale, ctx.flash = plan, masks, scale, flash
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan, masks, scale = ctx.plan, ctx.masks, ctx.scale
        qf, kf, vf = (t.to(out.dtype) for t in (q, k, v))
        do = d_out.to(out.dtype)
        dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        group_backward = _flash_group_backward if ctx.flash else _torch_group_backward
        for gi, g in enumerate(plan):
            spans = [masks.get((gi, ri)) for ri in range(len(g.runs))]
            group_backward(qf, kf, vf, out, lse, do, dq, dk, dv, g, spans, scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


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


def _flash_group_backward(qf, kf, vf, out, lse, do, dq, dk, dv, g, spans, scale):
    """One group's gradients with the CPU flash backward kernel, run by run, from the global output and lse."""
    _, bwd = _flash_cpu_ops()
    Hkv = kf.shape[1]
    rep = qf.shape[1] // Hkv
    rows = g.q1 - g.q0
    qg, og, dog = (_group_views(t, g, Hkv, True) for t in (qf, out, do))
    lse_g = _group_views(lse, g, Hkv, True).float()
    dq_g = None
    for r, run_spans in zip(g.runs, spans, strict=True):
        kt, vt = _run_kv(kf, vf, g, r, True)
        bias = _run_bias(run_spans, rows, kt.shape[2], rep, qf.dtype, qf.device)
        gq, gk, gv = bwd(dog, qg, kt, vt, og, lse_g, 0.0, False, attn_mask=bias, scale=scale)
        dq_g = gq if dq_g is None else dq_g + gq
        dk[g.b, :, r.k0 : r.k1] += gk[0]
        dv[g.b, :, r.k0 : r.k1] += gv[0]
    dq[g.b, :, g.q0 : g.q1] = dq_g.reshape(qf.shape[1], rows, qf.shape[3])


def _torch_group_backward(qf, kf, vf, out, lse, do, dq, dk, dv, g, spans, scale):
    """One group's gradients by recomputing probabilities ``exp(s - lse)`` chunk by chunk (portable)."""
    Hkv = kf.shape[1]
    rep = qf.shape[1] // Hkv
    rows = g.q1 - g.q0
    qg = _group_views(qf, g, Hkv, False) * scale
    dog = _group_views(do, g, Hkv, False)
    lse_g = _group_views(lse, g, Hkv, False).unsqueeze(-1)
    delta_g = (dog * _group_views(out, g, Hkv, False)).sum(-1, keepdim=True)
    dq_g = torch.zeros_like(qg)
    for r, run_spans in zip(g.runs, spans, strict=True):
        kt, vt = _run_kv(kf, vf, g, r, False)
        p = _apply_masks(torch.bmm(qg, kt.transpose(1, 2)), run_spans, rep).sub_(lse_g).exp_()
        dv[g.b, :, r.k0 : r.k1] += torch.bmm(p.transpose(1, 2), dog)
        ds = torch.bmm(dog, vt.transpose(1, 2)).sub_(delta_g).mul_(p)
        dq_g += torch.bmm(ds, kt)
        dk[g.b, :, r.k0 : r.k1] += torch.bmm(ds.transpose(1, 2), qg)
    dq[g.b, :, g.q0 : g.q1] = (dq_g * scale).view(qf.shape[1], rows, qf.shape[3])


# ----------------------------------------------------------------------------------------------------------------------
# Backends for attention(): run / unsupported / cost on an ``AttentionCall`` (registered in attention.py)
#
# Costs are estimates in element operations, comparable with the "sdpa" and "reference" estimates: multiply-adds of
# the pairs actually computed, plus a fixed charge per kernel call or tile group for Python and dispatch overhead.

_CALL_COST = 3e5  # one SDPA call or one tile group: tens of microseconds of overhead
_MASK_COST = 40.0  # evaluating a spec on one (query, key) pair of a PARTIAL tile
# One small matrix product inside a batched matmul (a tiny document's scores or output for one head): about a
# microsecond of fixed cost on CPU whatever its size, which is what dominates rows of thousands of tiny documents.
SMALL_MATMUL_COST = 2e4
# Copying one element in a gather, scatter or into a fresh tensor: measured ~1 ns per float32 element on one core
# here (page faults of the fresh allocation included), about thirty multiply-adds of SDPA's kernel.
COPY_COST = 30.0
_SDPA_ROW_COST = 40.0  # SDPA's fixed work per query row and head (per element of D + Dv): short documents pay it
_SMALL_ROW_COST = 130.0  # the tiny-document path's unfused softmax, masking and casts, per query row element and head
_SMALL_SEGMENT = 32  # varlen_attention's default: documents of at most this many keys go through batched matmuls


def dropout_unsupported(call) -> str | None:
    """The ``unsupported`` reason of a backend without attention dropout: a reason when ``call.dropout_p > 0``."""
    if call.dropout_p > 0:
        return f"has no attention dropout (dropout_p={call.dropout_p}; use 'sdpa', 'varlen' or 'reference')"
    return None


def _cached(call, key: str, build):
    """``build(call)`` once per spec object and call signature (``unsupported``, ``cost`` and ``run`` all need the
    same lowering, and so do the layers of a model that share one spec): see ``attnmask.plancache``. ``build`` may
    read the spec, shapes, dtype, device and whether a gradient is needed, nothing else of the call; its result is
    stored under ``key`` and must not be mutated."""
    entry = call_plans(call)
    if key not in entry:
        entry[key] = build(call)
    return entry[key]


@dataclass(frozen=True)
class _VarlenPlan:
    """Lowered form of a varlen-able spec: segments ``(N, 6)`` and the causal / window rule inside them."""

    segments: torch.Tensor
    causal: bool
    window: int | None


def _varlen_plan(call) -> _VarlenPlan | str:
    """Segments from ``spec.varlen`` (``[causal | full] & [sliding_window] & document(...) & [key_padding]``, or a
    padded batch), or why the call has no such form. O(B·L) time and memory."""
    from attnmask.lowering import varlen_args

    spec = call.mask
    if not isinstance(spec, M.MaskSpec):
        return "needs a structural mask spec"
    if call.positions_given:
        return "needs default (bottom-right) positions"
    try:
        args = varlen_args(spec, call.q_len, call.kv_len)
    except BackendError as err:
        return str(err)
    if args.padding_queries_attend:
        return "padding queries attend to real keys under this spec, and varlen computes only the sequences"
    window = None if args.window_size[0] < 0 else args.window_size[0] + 1
    segs = segments_from_varlen(args, call.batch, call.q_len, call.kv_len, spec.batch_size or 1)
    return _VarlenPlan(segs, args.causal, window)


def varlen_unsupported(call) -> str | None:
    plan = _cached(call, "varlen", _varlen_plan)
    return plan if isinstance(plan, str) else None


def varlen_cost(call) -> float:
    """Pairs SDPA computes (its CPU kernel's key blocks included), a charge per SDPA call, per query row for the
    documents SDPA runs, and per element copied (stacked inputs, the assembled output); tiny documents pay per small
    matrix product instead (see ``_SMALL_SEGMENT``)."""
    plan = _cached(call, "varlen", _varlen_plan)
    segs = plan.segments
    if not len(segs):
        return _CALL_COST
    whole_rows = len(segs) == call.batch and bool((segs[:, 2] == call.q_len).all() & (segs[:, 4] == call.kv_len).all())
    if whole_rows and plan.window is None:
        return float("inf")  # one SDPA call per row, exactly what "sdpa" does without the lowering
    ql, kl = segs[:, 2].double(), segs[:, 4].double()
    pairs = sdpa_pairs(ql, kl, plan.causal)
    if plan.window is not None:
        pairs = torch.minimum(pairs, ql * plan.window * 2)
    calls = len({(a, b, c) for a, b, c in segs[:, [2, 4, 5]].tolist()})
    width = call.head_dim + call.value_dim
    work = float(pairs.sum()) * call.heads * width
    small = segs[:, 4] <= _SMALL_SEGMENT  # gathered (q, k, v) and scattered back (output); two matmuls per head
    tokens = (segs[:, 2] * call.heads + segs[:, 4] * call.kv_heads).double() * width
    overhead = int(small.sum()) * 2 * call.heads * SMALL_MATMUL_COST + float(tokens.sum()) * COPY_COST
    overhead += float(segs[~small, 2].sum()) * call.heads * width * _SDPA_ROW_COST
    overhead += float(segs[small, 2].sum()) * call.heads * width * _SMALL_ROW_COST
    return work + calls * _CALL_COST + overhead


def sdpa_pairs(q_len: torch.Tensor, kv_len: torch.Tensor, causal: bool) -> torch.Tensor:
    """(query, key) pairs torch's CPU SDPA kernel computes per segment (float64, elementwise over the lengths).

    It walks keys in blocks of 512 (or all keys when fewer than 512) and, when causal, stops after the block that
    holds the end of the query block: up to 512 keys beyond the diagonal. So a causal document of 256 tokens costs
    all 256·256 pairs, and one of 4096 about half of its pairs plus 256 per query."""
    if not causal:
        return q_len * kv_len
    half = q_len * (kv_len + 1) / 2 + q_len * 256.0
    return torch.where(kv_len <= 512, q_len * kv_len, torch.minimum(half, q_len * kv_len))


def varlen_run(call) -> torch.Tensor:
    plan = _cached(call, "varlen", _varlen_plan)
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


def _block_size(q_len: int, kv_len: int) -> int:
    """Tiles of 128 for long rows; smaller for short ones, so that the layout still skips work."""
    longest = max(q_len, kv_len)
    return 128 if longest >= 2048 else 64 if longest >= 256 else 16


def _layout(call):
    from attnmask.lowering import block_layout

    spec = M.full() if call.mask is None else call.mask
    bs = _block_size(call.q_len, call.kv_len)
    q_pos, kv_pos = (call.q_positions, call.kv_positions) if call.positions_given else (None, None)
    return block_layout(spec, call.q_len, call.kv_len, bs, q_positions=q_pos, kv_positions=kv_pos, device=call.q.device)


def blocksparse_unsupported(call) -> str | None:
    if call.mask is not None and not isinstance(call.mask, M.MaskSpec):
        return "needs a mask spec (a dense tensor mask has no block structure)"
    return dropout_unsupported(call)


def blocksparse_cost(call) -> float:
    """Pairs of the FULL and PARTIAL tiles, mask evaluations of the PARTIAL ones, a charge per query tile. A ``custom``
    predicate is not laid out just to estimate (that evaluates every pair): it is charged as dense plus its mask."""
    per_pair = call.heads * (call.head_dim + call.value_dim)
    if call.mask is not None and not call.mask.is_structural:
        return (1.3 * per_pair + _MASK_COST) * call.batch * call.q_len * call.kv_len
    layout = _cached(call, "layout", _layout)
    counts = layout.counts()
    tile = layout.block_size**2
    rows = call.batch if layout.batch_size == 1 else 1
    work = (counts["full"] + counts["partial"]) * rows * tile * per_pair
    groups = layout.batch_size * layout.n_q_tiles * rows
    return 1.3 * work + counts["partial"] * rows * tile * _MASK_COST + groups * _CALL_COST


def _layout_groups(call):
    """The layout's query groups and the element masks of its PARTIAL tiles, kept with the plans: O(partial tiles ·
    block_size²) bools, which the forward keeps for the backward anyway."""
    layout = _cached(call, "layout", _layout)
    tile_mask = spec_tile_mask(layout.spec, layout.q_positions, layout.kv_positions)
    return _tile_groups(
        call.batch, call.q_len, call.kv_len, layout.classes, layout.block_size, tile_mask, MAX_KEYS, MAX_ROWS
    )


def blocksparse_run(call) -> torch.Tensor:
    plan, masks = _cached(call, "blocksparse", _layout_groups)
    return _BlockSparse.apply(call.q, call.k, call.v, plan, masks, call.scale)


def run_layout(q, k, v, layout, *, scale: float | None = None) -> torch.Tensor:
    """``blocksparse_attention`` over a ``BlockLayout`` (its classes, block size, positions and spec)."""
    tile_mask = spec_tile_mask(layout.spec, layout.q_positions, layout.kv_positions)
    return blocksparse_attention(q, k, v, layout.classes, layout.block_size, tile_mask, scale=scale)
