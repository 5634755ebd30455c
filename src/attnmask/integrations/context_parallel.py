"""Context parallelism: one long row split over the ranks of a process group, attention exact as in one process.

Layer 8 (integrations). :func:`context_parallel_positions` / :func:`shard_for_context_parallel` split a row into
``2 * world`` chunks and give rank ``r`` chunks ``r`` and ``2 * world - 1 - r`` (the zig-zag layout: every rank holds
early and late positions, so causal work is balanced); :func:`context_parallel_slices` cuts a mask spec to one rank's
queries with explicit positions and the key range the spec can reach; :func:`context_parallel_attention` gathers keys
and values from the group (all-gather, or a ring exchange with online-softmax merging) and returns exactly the
single-process attention of the local queries, forward and backward. Nothing touches ``torch.distributed`` at import
time; an uninitialised process group means one process.

Whose engine: ``method="flex"`` (and ``"auto"`` where it serves) runs PyTorch's own context parallelism
(``torch.distributed.tensor.experimental._context_parallel``: its FlexAttention all-gather with a reduce-scatter
backward) with a ``BlockMask`` built from our block layout of the rank's positions, O(tiles). Our ring and all-gather
kernels stay for what PyTorch's cannot serve: training on CPU (FlexAttention has no CPU backward, so CPU/gloo
training runs our ring), and zig-zag shards of unequal length (PyTorch's all-gather needs equal shards).
:func:`context_parallel_method` names the choice and the reason. Not used from PyTorch: its ``context_parallel()``
context manager (SDPA's ring through DTensor dispatch, causal or full masks only), its BlockMask sharding
(``_create_cp_block_mask``: a compiled ``create_block_mask`` per element, ``L`` a multiple of ``W·128``) and the
indices of its per-document load balancer: ``seq_lens=`` (a packed row's document lengths, as a pack plan or a
``Batch`` gives them) lays the shards out per document as that balancer documents, for any lengths, and runs on the
``"flex"`` and ``"all_gather"`` methods.

Worked example, a row of 16 tokens on 2 ranks (4 chunks of 4)::

    >>> context_parallel_positions(16, 2, 0).tolist()
    [0, 1, 2, 3, 12, 13, 14, 15]
    >>> context_parallel_positions(16, 2, 1).tolist()
    [4, 5, 6, 7, 8, 9, 10, 11]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from attnmask._checks import check_strided, dense_data
from attnmask.attention import attention
from attnmask.errors import BackendError, InputError, ShapeError, bad
from attnmask.integrations.ranks import _check_int, resolve_world, world
from attnmask.masks import And, Causal, Chunked, Document, LocalWindow, MaskSpec, Or, PrefixLM, SlidingWindow

__all__ = [
    "SpecSlice",
    "context_parallel_attention",
    "context_parallel_method",
    "context_parallel_positions",
    "context_parallel_slices",
    "shard_for_context_parallel",
]


# ----------------------------------------------------------------------------------------------------------------------
# Zig-zag sharding of one row


def _chunk_bounds(seq_len: int, n_chunks: int) -> list[int]:
    """Boundaries of ``n_chunks`` near-equal chunks (sizes differ by at most 1): ``[i * L // n for i in 0..n]``."""
    return [i * seq_len // n_chunks for i in range(n_chunks + 1)]


def _rank_ranges(seq_len: int, world_size: int, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two position ranges ``[start, stop)`` of rank ``rank``: chunks ``rank`` and ``2 * world - 1 - rank``."""
    bounds = _chunk_bounds(seq_len, 2 * world_size)
    late = 2 * world_size - 1 - rank
    return (bounds[rank], bounds[rank + 1]), (bounds[late], bounds[late + 1])


def _local_len(seq_len: int, world_size: int, rank: int) -> int:
    (a, b), (c, d) = _rank_ranges(seq_len, world_size, rank)
    return (b - a) + (d - c)


def _layout_ranges(seq_len: int, world_size: int, rank: int, seq_lens: tuple[int, ...] | None) -> list[tuple[int, int]]:
    """Position ranges of ``rank``: the zig-zag of the whole row, or with ``seq_lens`` the zig-zag of every document
    (chunks ``rank`` and ``2W - 1 - rank`` of each; the positions past the last document count as one more)."""
    if seq_lens is None:
        return list(_rank_ranges(seq_len, world_size, rank))
    out, start = [], 0
    for n in (*seq_lens, seq_len - sum(seq_lens)):
        out.extend((start + a, start + b) for a, b in _rank_ranges(n, world_size, rank) if b > a)
        start += n
    return out


def _layout_sizes(seq_len: int, world_size: int, seq_lens: tuple[int, ...] | None) -> list[int]:
    return [sum(b - a for a, b in _layout_ranges(seq_len, world_size, r, seq_lens)) for r in range(world_size)]


def _check_seq_lens(seq_lens: Any, seq_len: int) -> tuple[int, ...] | None:
    if seq_lens is None:
        return None
    seq_lens = dense_data("seq_lens", seq_lens)
    lens = tuple(seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else seq_lens)
    for n in lens:
        _check_int("seq_lens", n, 0)
    if sum(lens) > seq_len:
        raise bad(InputError, "seq_lens", f"document lengths of one row adding up to at most {seq_len}", sum(lens))
    return tuple(int(n) for n in lens)


def context_parallel_positions(
    seq_len: int,
    world_size: int | None = None,
    rank: int | None = None,
    *,
    group: Any = None,
    device: torch.device | str | None = None,
    seq_lens: Sequence[int] | None = None,
) -> torch.Tensor:
    """Row positions ``(L_local,)`` int64 held by ``rank``: chunks ``rank`` and ``2W - 1 - rank`` of ``2W`` chunks.

    Chunks are near-equal (``L = 10, W = 2``: bounds ``[0, 2, 5, 7, 10]``), so ranks hold ``L / W`` positions each when
    ``2W`` divides ``L`` and within 2 of it otherwise. ``world_size`` / ``rank`` default to ``group``'s.
    Example: ``L = 8, W = 2``: rank 0 holds ``[0, 1, 6, 7]``, rank 1 holds ``[2, 3, 4, 5]``.

    ``seq_lens``: the document lengths of a packed row (``batch.seq_lens[0]``, a pack plan's row): the per-document
    layout, each document cut so, and the positions past the last document as one more. It is the layout PyTorch's
    ``_PerDocumentHeadTailLoadBalancer`` documents (its code, in torch 2.13, orders the indices document by document,
    so that its contiguous shards are not that layout; and it needs ``2W`` to divide every length, here any length
    will do). Causal work within documents is then balanced whatever their lengths. Example: ``seq_lens=[4, 8]``,
    ``W = 2``: rank 0 holds ``[0, 3, 4, 5, 10, 11]``, rank 1 ``[1, 2, 6, 7, 8, 9]``.
    """
    _check_int("seq_len", seq_len, 0)
    world_size, rank = resolve_world(world_size, rank, group)
    ranges = _layout_ranges(seq_len, world_size, rank, _check_seq_lens(seq_lens, seq_len))
    return torch.cat(
        [torch.arange(a, b, device=device) for a, b in ranges] or [torch.zeros(0, dtype=torch.long, device=device)]
    )


def shard_for_context_parallel(
    x: torch.Tensor,
    *,
    dim: int = 1,
    world_size: int | None = None,
    rank: int | None = None,
    group: Any = None,
    seq_lens: Sequence[int] | None = None,
) -> torch.Tensor:
    """The zig-zag shard of ``x`` along ``dim`` (the sequence dimension, length ``L``) held by ``rank``.

    Use it on every per-token tensor of a row: ``input_ids`` / ``labels`` / ``position_ids`` ``(B, L)`` with ``dim=1``,
    ``q`` / ``k`` / ``v`` ``(B, H, L, D)`` with ``dim=2``. Returns a copy of ``L_local`` positions along ``dim``
    (``context_parallel_positions`` lists them). ``world_size`` / ``rank`` default to ``group``'s. ``seq_lens``: the
    per-document layout (see ``context_parallel_positions``). A sparse ``x`` is read as its dense values (the shard
    is dense); a nested one is refused (`InputError`).
    """
    if not isinstance(x, torch.Tensor):
        raise bad(InputError, "x", "a torch.Tensor", type(x).__name__)
    x = dense_data("x", x)
    if not -x.dim() <= dim < x.dim():
        raise bad(ShapeError, "dim", f"a dimension of a {x.dim()}D tensor", dim)
    world_size, rank = resolve_world(world_size, rank, group)
    ranges = _layout_ranges(x.shape[dim], world_size, rank, _check_seq_lens(seq_lens, x.shape[dim]))
    return torch.cat([x.narrow(dim, a, b - a) for a, b in ranges] or [x.narrow(dim, 0, 0)], dim=dim)


# ----------------------------------------------------------------------------------------------------------------------
# Slicing a spec to a rank's queries


@dataclass(frozen=True)
class SpecSlice:
    """One block of a rank's attention: queries at row positions ``[q_start, q_stop)`` against keys
    ``[kv_start, kv_stop)``, the smallest key range ``spec`` can allow for those queries (by its structure).

    The spec is in whole-row coordinates; the block is evaluated with explicit positions, so nothing of size
    ``L x L`` is built. Example, ``causal()`` on ``L = 16``, 2 ranks: rank 0's blocks are queries ``[0, 4)`` against
    keys ``[0, 4)`` and queries ``[12, 16)`` against keys ``[0, 16)``.
    """

    spec: MaskSpec
    q_start: int
    q_stop: int
    kv_start: int
    kv_stop: int

    def q_positions(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.arange(self.q_start, self.q_stop, device=device)

    def kv_positions(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.arange(self.kv_start, self.kv_stop, device=device)

    def to_dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The block's bool mask ``(B, q_stop - q_start, kv_stop - kv_start)``, True = may attend. O(B·Q·K)."""
        return self.spec.to_dense(
            self.q_stop - self.q_start,
            self.kv_stop - self.kv_start,
            q_positions=self.q_positions(device),
            kv_positions=self.kv_positions(device),
            device=device,
        )


def context_parallel_slices(
    spec: MaskSpec, seq_len: int, world_size: int | None = None, rank: int | None = None, *, group: Any = None
) -> tuple[SpecSlice, SpecSlice]:
    """``spec`` cut to ``rank``'s two query chunks (early, late), each with the key range it can reach.

    Key ranges come from the spec's structure (causal, sliding and local windows, chunks, prefix, documents given by
    ``seq_lens``; ``&`` intersects, ``|`` joins); anything else keeps the whole row, which is always exact.
    O(number of spec nodes + B · documents) time, no mask is materialised.
    """
    if not isinstance(spec, MaskSpec):
        raise bad(InputError, "spec", "a MaskSpec", type(spec).__name__)
    _check_int("seq_len", seq_len, 0)
    world_size, rank = resolve_world(world_size, rank, group)
    out = []
    for a, b in _rank_ranges(seq_len, world_size, rank):
        lo, hi = _key_range(spec, a, b, seq_len) if b > a else (0, 0)
        out.append(SpecSlice(spec, a, b, lo, max(lo, hi)))
    return out[0], out[1]


def _key_range(spec: MaskSpec, q_start: int, q_stop: int, seq_len: int) -> tuple[int, int]:
    """A key range ``[lo, hi)`` containing every key that any query in ``[q_start, q_stop)`` may attend."""
    everything = (0, seq_len)
    if isinstance(spec, Causal):
        return 0, q_stop
    if isinstance(spec, SlidingWindow):
        return max(0, q_start - spec.window + 1), q_stop
    if isinstance(spec, LocalWindow):
        return max(0, q_start - spec.before), min(seq_len, q_stop + spec.after)
    if isinstance(spec, Chunked) and spec.offsets is None:
        lo = (q_start // spec.size) * spec.size
        return lo, min(seq_len, ((q_stop - 1) // spec.size + 1) * spec.size)
    if isinstance(spec, PrefixLM):
        prefix = int(spec.prefix_lens.max()) if spec.prefix_lens.numel() else 0
        return 0, min(seq_len, max(q_stop, prefix))
    if isinstance(spec, Document) and spec.seq_lens is not None:
        return _document_key_range(spec.seq_lens, q_start, q_stop, seq_len)
    if isinstance(spec, And):
        ranges = [_key_range(p, q_start, q_stop, seq_len) for p in spec.parts]
        return max(r[0] for r in ranges), min(r[1] for r in ranges)
    if isinstance(spec, Or):
        ranges = [_key_range(p, q_start, q_stop, seq_len) for p in spec.parts]
        return min(r[0] for r in ranges), max(r[1] for r in ranges)
    return everything


def _document_key_range(rows: tuple[tuple[int, ...], ...], q_start: int, q_stop: int, seq_len: int) -> tuple[int, int]:
    """Keys in the documents that hold queries ``[q_start, q_stop)``, joined over rows."""
    lo, hi = seq_len, 0
    for row in rows:
        offsets = np.concatenate([[0], np.cumsum(row, dtype=np.int64)])
        total = int(offsets[-1])
        if q_start >= total:  # every query is past the documents: padding, attends nothing
            continue
        first = int(np.searchsorted(offsets, q_start, side="right")) - 1
        last = int(np.searchsorted(offsets, min(q_stop, total) - 1, side="right")) - 1
        lo, hi = min(lo, int(offsets[first])), max(hi, int(offsets[last + 1]))
    return (lo, hi) if lo < hi else (0, 0)


# ----------------------------------------------------------------------------------------------------------------------
# Context-parallel attention


class _GatherSequence(torch.autograd.Function):
    """All-gather of ``(B, H, n_r, D)`` shards of different lengths ``sizes`` along dim 2, in rank order.

    Backward: the gradient of each rank's shard is the sum over ranks of the gradient of its copy (a reduce-scatter;
    with gloo an all-reduce and a slice, which every torch version supports).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
        ctx.group, ctx.sizes, ctx.rank = group, sizes, rank
        longest = max(sizes)
        padded = _pad_dim2(x.contiguous(), longest)
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:, :, :n] for p, n in zip(parts, sizes, strict=True)], dim=2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sizes, longest = ctx.sizes, max(ctx.sizes)
        pieces = [_pad_dim2(g.contiguous(), longest) for g in grad.split(list(sizes), dim=2)]
        if dist.get_backend(ctx.group) == dist.Backend.GLOO:
            stacked = torch.stack(pieces)
            dist.all_reduce(stacked, group=ctx.group)
            mine = stacked[ctx.rank]
        else:
            mine = torch.empty_like(pieces[0])
            dist.reduce_scatter(mine, pieces, group=ctx.group)
        return mine[:, :, : sizes[ctx.rank]], None, None, None


def _pad_dim2(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[2] == length:
        return x
    pad = x.new_zeros(x.shape[0], x.shape[1], length - x.shape[2], x.shape[3])
    return torch.cat([x, pad], dim=2)


def _gather_row(x_local: torch.Tensor, seq_len: int, world_size: int, rank: int, group: Any) -> torch.Tensor:
    """``(B, H, L, D)`` in row order from every rank's zig-zag shard ``(B, H, L_r, D)``; differentiable."""
    sizes = tuple(_local_len(seq_len, world_size, r) for r in range(world_size))
    if world_size == 1:
        by_rank = [x_local]
    else:
        by_rank = list(_GatherSequence.apply(x_local, group, sizes, rank).split(list(sizes), dim=2))
    chunks: list[torch.Tensor | None] = [None] * (2 * world_size)
    for r, shard in enumerate(by_rank):
        (a, b), _ = _rank_ranges(seq_len, world_size, r)
        chunks[r], chunks[2 * world_size - 1 - r] = shard[:, :, : b - a], shard[:, :, b - a :]
    return torch.cat(chunks, dim=2)


def _shard_lengths(n_local: int, world_size: int, group: Any, device: torch.device) -> list[int]:
    if world_size == 1:
        return [n_local]
    device = torch.device("cpu") if dist.get_backend(group) == dist.Backend.GLOO else device
    mine = torch.tensor([n_local], dtype=torch.long, device=device)
    parts = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(parts, mine, group=group)
    return [int(p) for p in parts]


def context_parallel_attention(
    q_local: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    spec: MaskSpec,
    *,
    seq_len: int | None = None,
    group: Any = None,
    scale: float | None = None,
    method: str = "all_gather",
    block_size: int = 128,
    seq_lens: Sequence[int] | None = None,
) -> torch.Tensor:
    """Attention of this rank's queries against the whole row, exactly as one process would compute it.

    - ``q_local``: ``(B, H, L_r, D)``, ``k_local``: ``(B, Hkv, L_r, D)``, ``v_local``: ``(B, Hkv, L_r, Dv)``: this
      rank's zig-zag shard of the row (:func:`shard_for_context_parallel` with ``dim=2``, or made from sharded
      hidden states). Returns ``(B, H, L_r, Dv)`` in the same order, ``q``'s dtype.
    - ``spec``: the mask of the **whole row** in row positions (e.g. ``causal() & document(seq_lens=...)``); it is
      evaluated on this rank's query positions only (:func:`context_parallel_slices`).
    - ``seq_len``: the row length ``L``; when ``None`` it is found with one small all-gather of the shard lengths.
    - ``group``: the context-parallel process group (default: the whole world; uninitialised: one process).
    - ``method``: ``"all_gather"`` (default): keys and values are all-gathered (one collective for both), the local
      queries attend through :func:`attnmask.attention` (any backend), and the backward reduce-scatters the key and
      value gradients. Memory per rank O(B·Hkv·L·(D + Dv)) for the whole row's keys and values.
      ``"ring"``: key/value shards travel around the ring of ranks (send to ``rank + 1``, receive from ``rank - 1``,
      the next transfer overlapping the current block's work); partial results are merged with their log-sum-exp
      (online softmax), and the backward sends the shards round again with their gradient accumulators. Memory per
      rank O(B·Hkv·L_r·(D + Dv)) for two shards plus the float32 scores of one block (a query chunk against one
      key chunk); attention in float32 with this module's own kernels.
      ``"flex"``: PyTorch's own context-parallel engine: keys and values are all-gathered by
      ``torch.distributed.tensor.experimental._context_parallel.flex_cp_allgather`` (its FlexAttention path, whose
      backward reduce-scatters the gradients) and the local queries run ``flex_attention`` with a ``BlockMask``
      made from this module's block layout of the rank's positions (``spec.block_layout(..., q_positions=...,
      kv_positions=...).to_flex()``: O(tiles) by interval arithmetic, no compiled ``create_block_mask`` over
      ``L x L`` elements, no ``L % (W·128) == 0`` limit). It serves where FlexAttention does: on CPU only without
      gradients (FlexAttention has no CPU backward), and only when the zig-zag shards have equal lengths (always
      when ``2W`` divides ``L``; the gather is an equal-size all-gather). ``block_size``: its tile size.
      ``"auto"``: ``"flex"`` where it serves, else ``"ring"``; :func:`context_parallel_method` says which and why.
    - ``seq_lens``: the shards are in the per-document layout of ``context_parallel_positions(..., seq_lens=...)``
      (one row's document lengths, the same layout for every batch row). ``"all_gather"`` then attends through
      :func:`attnmask.attention` with the gathered positions (one block of the local queries against the row),
      ``"flex"`` as above, ``"auto"`` picks ``"flex"`` where it serves, else ``"all_gather"``; ``"ring"`` refuses
      (it passes whole-row zig-zag chunks round).

    All give the single-process output and gradients of ``q``, ``k`` and ``v`` (up to float rounding), evaluate the
    spec only on blocks of this rank's queries against the key range each can reach (:func:`context_parallel_slices`:
    the causal part of the row for a causal spec), and give rows with no allowed key exactly 0 with zero gradient.
    """
    _check_attention_inputs(q_local, k_local, v_local, spec)
    if method not in METHODS:
        raise bad(InputError, "method", f"one of {METHODS}", repr(method))
    _check_int("block_size", block_size, 1)
    world_size, rank = world(group)
    n_local = q_local.shape[2]
    if seq_len is None:
        sizes = _shard_lengths(n_local, world_size, group, q_local.device)
        seq_len = sum(sizes)
        seq_lens = _check_seq_lens(seq_lens, seq_len)
        expected = _layout_sizes(seq_len, world_size, seq_lens)
        if sizes != expected:
            raise bad(ShapeError, "q_local", f"shard lengths {expected} of a row of {seq_len}", sizes)
    else:
        _check_int("seq_len", seq_len, 0)
        seq_lens = _check_seq_lens(seq_lens, seq_len)
        expected = _layout_sizes(seq_len, world_size, seq_lens)[rank]
        if n_local != expected:
            raise bad(ShapeError, "q_local", f"{expected} positions (rank {rank}'s shard of {seq_len})", n_local)
    if method in ("auto", "flex"):
        chosen, why_not = context_parallel_method(q_local, k_local, v_local, seq_len, world_size, seq_lens=seq_lens)
        if method == "flex" and chosen != "flex":
            raise bad(BackendError, "method", "a method that serves these inputs", f"'flex': {why_not}")
        method = chosen
    if method == "flex":
        return _flex_attention(
            q_local, k_local, v_local, spec, seq_len, seq_lens, world_size, rank, group, scale, block_size
        )
    if seq_lens is not None:
        if method == "ring":
            raise bad(
                BackendError,
                "method",
                "'all_gather', 'flex' or 'auto' with seq_lens= (the per-document layout)",
                "'ring'",
            )
        return _gathered_attention(q_local, k_local, v_local, spec, seq_len, seq_lens, world_size, rank, group, scale)
    if method == "ring":
        if spec.heads is not None:  # its blocks take one mask for every head
            raise bad(BackendError, "method", "'all_gather' or 'flex' for a per-head spec", "'ring'")
        scale = q_local.shape[-1] ** -0.5 if scale is None else float(scale)
        ring = _Ring(spec, seq_len, world_size, rank, group, scale)
        return _RingAttention.apply(q_local, k_local, v_local, ring)
    dk = k_local.shape[-1]
    kv = _gather_row(torch.cat([k_local, v_local], dim=-1), seq_len, world_size, rank, group)
    k_row, v_row = kv[..., :dk], kv[..., dk:]
    outs, start = [], 0
    for piece in context_parallel_slices(spec, seq_len, world_size, rank):
        n = piece.q_stop - piece.q_start
        q = q_local[:, :, start : start + n]
        start += n
        k = k_row[:, :, piece.kv_start : piece.kv_stop]
        v = v_row[:, :, piece.kv_start : piece.kv_stop]
        outs.append(_block_attention(q, k, v, piece, scale))
    # The empty-slice sum (exactly 0) ties the output to the gathered keys and values even when no block reads them,
    # so every rank runs the gather's backward (a collective) and none waits for a missing partner.
    return torch.cat(outs, dim=2) + kv.narrow(2, 0, 0).sum().to(q_local.dtype)


METHODS = ("all_gather", "ring", "flex", "auto")


def context_parallel_method(
    q_local: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    seq_len: int,
    world_size: int,
    *,
    seq_lens: Sequence[int] | None = None,
) -> tuple[str, str | None]:
    """The method ``method="auto"`` runs, and why PyTorch's engine (``"flex"``) does not serve (``None`` when it does).

    ``"flex"`` where PyTorch's context-parallel FlexAttention path serves these inputs, else ``"ring"`` (this module's
    own kernels, which train on CPU with gloo), or ``"all_gather"`` for the per-document layout (``seq_lens``).
    Example: CPU tensors that need gradients give ``("ring", "FlexAttention has no CPU backward ...")``.
    """
    seq_lens = _check_seq_lens(seq_lens, seq_len)
    reason = _flex_refusal(q_local, k_local, v_local, _layout_sizes(seq_len, world_size, seq_lens))
    ours = "ring" if seq_lens is None else "all_gather"
    return (ours, reason) if reason else ("flex", None)


def _flex_refusal(q, k, v, sizes: list[int]) -> str | None:
    try:
        from torch.distributed.tensor.experimental._context_parallel import flex_cp_allgather  # noqa: F401
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the torch version
        return f"this torch has no context-parallel FlexAttention ({e})"
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.device.type == "cpu" and needs_grad:
        return "FlexAttention has no CPU backward (inputs on CPU need gradients)"
    if len(set(sizes)) > 1:
        return f"shards of unequal length {sizes} (the all-gather needs equal ones)"
    if q.shape[1] % k.shape[1]:
        return f"query heads ({q.shape[1]}) not a multiple of key heads ({k.shape[1]})"
    return None


def _flex_attention(q_local, k_local, v_local, spec, seq_len, seq_lens, world_size, rank, group, scale, block_size):
    """PyTorch's context-parallel FlexAttention: equal-size all-gather of the shards (reduce-scatter backward), then
    ``flex_attention`` of the local queries with a ``BlockMask`` from our block layout on the zig-zag positions."""
    import torch.distributed.distributed_c10d as c10d
    from torch.distributed.tensor.experimental._context_parallel import flex_cp_allgather
    from torch.nn.attention.flex_attention import flex_attention

    q_pos, kv_pos = _gathered_positions(seq_len, seq_lens, world_size, rank, q_local.device)
    if world_size == 1:
        k_all, v_all = k_local, v_local
    else:
        k_all, v_all = flex_cp_allgather(k_local, v_local, 2, c10d._get_process_group_name(group or dist.group.WORLD))
    layout = spec.block_layout(q_pos.numel(), seq_len, block_size, q_positions=q_pos, kv_positions=kv_pos)
    block_mask = layout.to_flex()
    if layout.batch_size == 1 < q_local.shape[0]:  # one row of mask for every row of the batch
        mod = block_mask.mask_mod
        block_mask.mask_mod = lambda b, h, q, k: mod(torch.zeros_like(b), h, q, k)
    if not torch.is_grad_enabled():  # FlexAttention refuses CPU inputs that require grad even under no_grad
        q_local, k_all, v_all = q_local.detach(), k_all.detach(), v_all.detach()
    out = flex_attention(
        q_local,
        k_all,
        v_all,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q_local.shape[1] != k_local.shape[1],
    )
    return out.to(q_local.dtype)


def _gathered_positions(seq_len, seq_lens, world_size, rank, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row positions of this rank's queries ``(L_r,)`` and of the keys gathered in rank order ``(L,)``."""
    positions = [
        context_parallel_positions(seq_len, world_size, r, device=device, seq_lens=seq_lens) for r in range(world_size)
    ]
    return positions[rank], torch.cat(positions)


def _gathered_attention(q_local, k_local, v_local, spec, seq_len, seq_lens, world_size, rank, group, scale):
    """All-gather of the shards in rank order (any layout), then :func:`attnmask.attention` of the local queries
    against the whole row at the gathered positions; differentiable (reduce-scatter backward)."""
    q_pos, kv_pos = _gathered_positions(seq_len, seq_lens, world_size, rank, q_local.device)
    kv = torch.cat([k_local, v_local], dim=-1)
    if world_size > 1:
        sizes = tuple(_layout_sizes(seq_len, world_size, seq_lens))
        kv = _GatherSequence.apply(kv, group, sizes, rank)
    dk = k_local.shape[-1]
    if q_local.shape[2] == 0:
        return q_local.new_zeros(*q_local.shape[:3], v_local.shape[-1]) + kv.narrow(2, 0, 0).sum().to(q_local.dtype)
    return attention(q_local, kv[..., :dk], kv[..., dk:], spec, scale=scale, q_positions=q_pos, kv_positions=kv_pos)


def _check_attention_inputs(q, k, v, spec) -> None:
    for name, t in (("q_local", q), ("k_local", k), ("v_local", v)):
        if not isinstance(t, torch.Tensor):
            raise bad(InputError, name, "a torch.Tensor", type(t).__name__)
        check_strided(name, t)
        if t.dim() != 4:
            raise bad(ShapeError, name, "a 4D tensor (B, H, L_local, D)", f"shape {tuple(t.shape)}")
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        shapes = tuple(q.shape), tuple(k.shape), tuple(v.shape)
        raise bad(ShapeError, "k_local", "the same local length as q_local and v_local (dim 2)", shapes)
    if k.shape[:3] != v.shape[:3]:
        raise bad(ShapeError, "v_local", f"(B, Hkv, L_local) = {tuple(k.shape[:3])} like k_local", tuple(v.shape))
    if not isinstance(spec, MaskSpec):
        raise bad(InputError, "spec", "a MaskSpec of the whole row", type(spec).__name__)
    if spec.heads not in (None, q.shape[1]):
        expected = f"a per-head spec for q_local's {q.shape[1]} query heads"
        raise bad(ShapeError, "spec", expected, f"a spec of {spec.heads} heads")


def _block_attention(q, k, v, piece: SpecSlice, scale: float | None) -> torch.Tensor:
    if q.shape[2] == 0 or k.shape[2] == 0:  # no query, or no key the spec can allow: exact zeros
        return q.new_zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
    return attention(
        q,
        k,
        v,
        piece.spec,
        scale=scale,
        q_positions=piece.q_positions(q.device),
        kv_positions=piece.kv_positions(q.device),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Ring attention: shards travel round the ranks, partial results merged by log-sum-exp


@dataclass(frozen=True)
class _Ring:
    """Static description of one ring-attention call (the same numbers on every rank)."""

    spec: MaskSpec
    seq_len: int
    world_size: int
    rank: int
    group: Any
    scale: float

    def ranges(self, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return _rank_ranges(self.seq_len, self.world_size, r)

    def size(self, r: int) -> int:
        return _local_len(self.seq_len, self.world_size, r)

    def pairs(self, src: int):
        """Blocks of work against the shard of rank ``src``: ``(q rows, q positions, kv rows, kv positions)``.

        Local query chunk ``j`` meets key chunk ``c`` of ``src`` only where ``c`` overlaps the key range the spec
        allows for chunk ``j``; slices are into the local query shard and into ``src``'s shard.
        """
        q_off = 0
        for piece in context_parallel_slices(self.spec, self.seq_len, self.world_size, self.rank):
            n_q = piece.q_stop - piece.q_start
            k_off = 0
            for a, b in self.ranges(src):
                lo, hi = max(a, piece.kv_start), min(b, piece.kv_stop)
                if n_q and lo < hi:
                    yield (
                        slice(q_off, q_off + n_q),
                        (piece.q_start, piece.q_stop),
                        slice(k_off + lo - a, k_off + hi - a),
                        (lo, hi),
                    )
                k_off += b - a
            q_off += n_q

    def peer(self, r: int) -> int:
        """Global rank of group rank ``r`` (what point-to-point calls take)."""
        r %= self.world_size
        return r if self.group is None else dist.get_global_rank(self.group, r)


def _exchange(ring: _Ring, sends: list[torch.Tensor], recv_shapes: list[tuple], dtypes: list[torch.dtype]):
    """Post sends to ``rank + 1`` and receives from ``rank - 1``; returns ``(buffers, (requests, sent tensors))``."""
    ops, bufs = [], []
    sends = [t.contiguous() for t in sends]  # returned with the requests: alive until the transfers complete
    for i, t in enumerate(sends):
        ops.append(dist.isend(t, ring.peer(ring.rank + 1), group=ring.group, tag=i))
    for i, (shape, dtype) in enumerate(zip(recv_shapes, dtypes, strict=True)):
        buf = torch.empty(shape, dtype=dtype, device=sends[i].device)
        ops.append(dist.irecv(buf, ring.peer(ring.rank - 1), group=ring.group, tag=i))
        bufs.append(buf)
    return bufs, (ops, sends)


def _block_scores(q, k, ring: _Ring, q_pos: tuple[int, int], kv_pos: tuple[int, int]):
    """Scores ``(B, Hkv, rep, Q, K)`` float32 with -inf where the spec forbids, and the bool mask ``(B|1,1,1,Q,K)``."""
    B, H, Q, D = q.shape
    Hkv = k.shape[1]
    qg = q.float().view(B, Hkv, H // Hkv, Q, D)
    scores = (qg @ k.float().unsqueeze(2).transpose(-1, -2)) * ring.scale
    allowed = ring.spec.to_dense(
        Q,
        k.shape[2],
        q_positions=torch.arange(*q_pos, device=q.device),
        kv_positions=torch.arange(*kv_pos, device=q.device),
        device=q.device,
    )[:, None, None]
    return scores.masked_fill(~allowed, float("-inf")), allowed, qg


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _block_forward(q, k, v, ring, q_pos, kv_pos):
    """Output ``(B, H, Q, Dv)`` and log-sum-exp ``(B, H, Q)`` (float32) of one block; empty rows: 0 and -inf."""
    B, H, Q, _ = q.shape
    scores, _, _ = _block_scores(q, k, ring, q_pos, kv_pos)
    peak = _finite_or_zero(scores.amax(dim=-1, keepdim=True))
    weights = torch.exp(scores - peak)
    total = weights.sum(dim=-1, keepdim=True)
    out = (weights @ v.float().unsqueeze(2)) / torch.where(total > 0, total, torch.ones_like(total))
    lse = (peak + torch.log(total)).squeeze(-1)
    return out.reshape(B, H, Q, -1), lse.reshape(B, H, Q)


def _merge(out, lse, rows: slice, o_blk, lse_blk) -> None:
    """Online softmax: fold a block's ``(o_blk, lse_blk)`` into ``out[:, :, rows]`` / ``lse[:, :, rows]`` in place."""
    old_o, old_lse = out[:, :, rows], lse[:, :, rows]
    new_lse = torch.logaddexp(old_lse, lse_blk)
    safe = _finite_or_zero(new_lse)
    out[:, :, rows] = old_o * torch.exp(old_lse - safe)[..., None] + o_blk * torch.exp(lse_blk - safe)[..., None]
    lse[:, :, rows] = new_lse


def _block_backward(q, k, v, d_out, lse, delta, ring, q_pos, kv_pos):
    """Gradients ``(dq, dk, dv)`` float32 of one block, from the saved log-sum-exp (recomputed probabilities)."""
    B, H, Q, D = q.shape
    Hkv, rep = k.shape[1], H // k.shape[1]
    scores, _, qg = _block_scores(q, k, ring, q_pos, kv_pos)
    probs = torch.exp(scores - _finite_or_zero(lse).view(B, Hkv, rep, Q, 1))  # 0 where forbidden
    dog = d_out.view(B, Hkv, rep, Q, -1)
    dv = (probs.transpose(-1, -2) @ dog).sum(dim=2)
    dp = dog @ v.float().unsqueeze(2).transpose(-1, -2)
    ds = probs * (dp - delta.view(B, Hkv, rep, Q, 1))
    dq = (ds @ k.float().unsqueeze(2)) * ring.scale
    dk = (ds.transpose(-1, -2) @ qg).sum(dim=2) * ring.scale
    return dq.reshape(B, H, Q, D), dk, dv


class _RingAttention(torch.autograd.Function):
    """Ring attention over the zig-zag shards; see ``context_parallel_attention(method="ring")``."""

    @staticmethod
    def forward(ctx, q, k, v, ring: _Ring):
        B, H, n, _ = q.shape
        dk_dim = k.shape[-1]
        out = q.new_zeros(B, H, n, v.shape[-1], dtype=torch.float32)
        lse = torch.full((B, H, n), float("-inf"), dtype=torch.float32, device=q.device)
        block = torch.cat([k, v], dim=-1)
        for step in range(ring.world_size):
            src = (ring.rank - step) % ring.world_size
            pending = None
            if step < ring.world_size - 1:
                nxt = (ring.rank - step - 1) % ring.world_size
                shape = (B, k.shape[1], ring.size(nxt), block.shape[-1])
                pending = _exchange(ring, [block], [shape], [block.dtype])
            for q_rows, q_pos, kv_rows, kv_pos in ring.pairs(src):
                kb, vb = block[:, :, kv_rows, :dk_dim], block[:, :, kv_rows, dk_dim:]
                o_blk, lse_blk = _block_forward(q[:, :, q_rows], kb, vb, ring, q_pos, kv_pos)
                _merge(out, lse, q_rows, o_blk, lse_blk)
            if pending is not None:
                for op in pending[1][0]:
                    op.wait()
                block = pending[0][0]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring = ring
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        ring: _Ring = ctx.ring
        dk_dim = k.shape[-1]
        d_out = d_out.float()
        delta = (d_out * out).sum(dim=-1)  # (B, H, n): rowsum(dO * O)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        block = torch.cat([k, v], dim=-1)
        d_block = torch.zeros(block.shape, dtype=torch.float32, device=q.device)
        for step in range(ring.world_size):
            src = (ring.rank - step) % ring.world_size
            for q_rows, q_pos, kv_rows, kv_pos in ring.pairs(src):
                kb, vb = block[:, :, kv_rows, :dk_dim], block[:, :, kv_rows, dk_dim:]
                dq_b, dk_b, dv_b = _block_backward(
                    q[:, :, q_rows],
                    kb,
                    vb,
                    d_out[:, :, q_rows],
                    lse[:, :, q_rows],
                    delta[:, :, q_rows],
                    ring,
                    q_pos,
                    kv_pos,
                )
                dq[:, :, q_rows] += dq_b
                d_block[:, :, kv_rows, :dk_dim] += dk_b
                d_block[:, :, kv_rows, dk_dim:] += dv_b
            if ring.world_size == 1:
                break
            if step < ring.world_size - 1:  # pass the shard on with its gradient so far
                nxt = (ring.rank - step - 1) % ring.world_size
                shape = (block.shape[0], block.shape[1], ring.size(nxt), block.shape[-1])
                bufs, ops = _exchange(ring, [block, d_block], [shape, shape], [block.dtype, torch.float32])
            else:  # the shard held last belongs to rank + 1: send its gradient home, receive ours
                bufs, ops = _exchange(
                    ring, [d_block], [tuple(block.shape[:2]) + (q.shape[2], block.shape[-1])], [torch.float32]
                )
            for op in ops[0]:
                op.wait()
            if step < ring.world_size - 1:
                block, d_block = bufs
            else:
                d_block = bufs[0]
        return dq.to(q.dtype), d_block[..., :dk_dim].to(k.dtype), d_block[..., dk_dim:].to(v.dtype), None
