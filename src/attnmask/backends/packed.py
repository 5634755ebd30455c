"""The packed ``(total, H, D)`` layout of FlashAttention's variable-length kernels, shared by ``"cuda_varlen"`` and
``"flash"``: one plan per spec and shape, a gather into the layout, a scatter back.

Layer 3 (attention); imports ``masks``, ``lowering``, ``plancache`` and ``backends.contract``.

A spec of the varlen form (``[causal() or full()] & [sliding_window(w)] & document(...) & [key_padding(m)]``, or a
padded batch; see ``attnmask.lowering.varlen_args``) becomes a :class:`PackedPlan`: the real tokens of every sequence
(a document, or the run of real tokens of a padded row) concatenated in row-major order, with flash-attn's arguments
(``cu_seqlens`` int32 offsets, ``max_seqlen``, ``causal``, ``window_size = (w - 1, 0)`` for ``sliding_window(w)``).
With ``Q < K`` the queries are the last ``Q`` positions of each row, so each sequence's queries are its last tokens,
which is how flash-attn (>= 2.1) aligns ``causal`` and ``window_size``: bottom-right.

A query outside every sequence (padding) sees no key under the spec: :func:`scatter` writes exactly 0 there, and its
gradient is exactly 0. A spec under which padding queries DO see keys (right padding under ``causal() &
key_padding(m)``, any padding without ``causal()``) is refused: the kernel computes only the sequences.

Worked example, one row of 9 tokens holding documents of 2, 4 and 3 tokens, causal::

    cu_seqlens_q = cu_seqlens_k = [0, 2, 6, 9], max_seqlen_q = max_seqlen_k = 4, window_size = (-1, -1)

decoding its last 2 positions (``Q = 2``, ``K = 9``): ``cu_seqlens_q = [0, 2]``, ``cu_seqlens_k = [0, 3]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import attnmask.backends.cuda_costs as cuda_costs
from attnmask.backends._common import call_varlen_args
from attnmask.backends.contract import Backend
from attnmask.lowering import VarlenArgs
from attnmask.plancache import call_plans

__all__ = [
    "MAX_HEAD_DIM",
    "packed_backend",
    "PackedPlan",
    "gather",
    "head_width",
    "packed_attention",
    "packed_cost",
    "packed_plan",
    "packed_unsupported",
    "scatter",
]

MAX_HEAD_DIM = 256  # FlashAttention-2's largest head dimension
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "PackedPlan", float, float], torch.Tensor]


@dataclass(frozen=True, eq=False)
class PackedPlan:
    """A call's sequences in the packed layout.

    - ``args``: ``VarlenArgs`` for all ``B`` rows of the call (a one-row spec is repeated per row): ``cu_seqlens_q`` /
      ``cu_seqlens_k`` ``(N + 1,)`` int32, ``max_seqlen_q`` / ``max_seqlen_k``, ``causal``, ``window_size``,
      ``indices_q`` ``(Tq,)`` int64 into the flattened ``(B * Q)`` queries, ``indices_k`` ``(Tk,)`` into ``(B * K)``.
    - ``q_slot``: ``(B * Q,)`` int64, ``1 + `` the packed index of each query, 0 for a query in no sequence.
    - ``every_query`` / ``every_key``: every query (key) is in a sequence, in order: no gather or scatter by index.
    """

    args: VarlenArgs
    q_slot: torch.Tensor
    every_query: bool
    every_key: bool

    @property
    def num_sequences(self) -> int:
        return self.args.num_sequences

    def to(self, device: torch.device) -> PackedPlan:
        """The plan with its tensors on ``device``."""
        moved = {
            f.name: getattr(self.args, f.name).to(device)
            for f in dataclasses.fields(self.args)
            if isinstance(getattr(self.args, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, args=dataclasses.replace(self.args, **moved), q_slot=self.q_slot.to(device))


def packed_plan(call) -> PackedPlan | str:
    """The call's :class:`PackedPlan` on the spec's device, or why it has none. O(B·K)."""
    args = call_varlen_args(call)
    if isinstance(args, str):
        return args
    spec = call.mask
    if (spec.batch_size or 1) == 1 and call.batch > 1:
        args = _repeat_rows(args, call.batch, call.q_len, call.kv_len)
    B, Q, K = call.batch, call.q_len, call.kv_len
    total_q = args.indices_q.numel()
    q_slot = torch.zeros(B * Q, dtype=torch.long, device=args.indices_q.device)
    q_slot[args.indices_q] = torch.arange(1, total_q + 1, device=q_slot.device)
    return PackedPlan(args, q_slot, total_q == B * Q, args.indices_k.numel() == B * K)


def _repeat_rows(args: VarlenArgs, batch: int, q_len: int, kv_len: int) -> VarlenArgs:
    """One row's arguments repeated for ``batch`` rows: sequences and indices of row ``b`` follow those of ``b - 1``."""
    rows = torch.arange(batch, device=args.indices_q.device)[:, None]
    lens_q, lens_k = (cu.diff().repeat(batch) for cu in (args.cu_seqlens_q, args.cu_seqlens_k))
    return dataclasses.replace(
        args,
        cu_seqlens_q=_offsets(lens_q),
        cu_seqlens_k=_offsets(lens_k),
        indices_q=(args.indices_q[None] + rows * q_len).reshape(-1),
        indices_k=(args.indices_k[None] + rows * kv_len).reshape(-1),
    )


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    """``(N,)`` lengths -> ``(N + 1,)`` int32 offsets from 0: ``[2, 4, 3]`` -> ``[0, 2, 6, 9]``."""
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def _cached_plan(call) -> PackedPlan | str:
    """:func:`packed_plan` once per spec object and call signature (see ``attnmask.plancache``)."""
    plans = call_plans(call)
    if "packed" not in plans:
        plans["packed"] = packed_plan(call)
    return plans["packed"]


def head_width(call) -> int:
    """The head dimension the kernel sees: ``max(D, Dv)`` rounded up to a multiple of 8 (zero padding: q·k unchanged,
    the padded output columns are dropped)."""
    return -(-max(call.head_dim, call.value_dim) // 8) * 8


def packed_unsupported(call) -> str | None:
    """Why the packed kernels cannot serve ``call``: no varlen form, or heads wider than the kernel's."""
    plan = _cached_plan(call)
    if isinstance(plan, str):
        return plan
    if head_width(call) > MAX_HEAD_DIM:
        return f"head dims up to {MAX_HEAD_DIM}, got D={call.head_dim}, Dv={call.value_dim}"
    return None


def packed_cost(call, repeated_kv: bool = False) -> float:
    """``cuda_costs.varlen_cost`` of the call's sequences (see ``attnmask.backends.cuda_costs``); ``repeated_kv``: the
    kernel gets the key and value heads repeated to the query heads."""
    plan = _cached_plan(call)
    args = plan.args
    left = args.window_size[0]
    window = None if left < 0 else left + 1
    lens_q, lens_k = args.cu_seqlens_q.diff(), args.cu_seqlens_k.diff()
    scattered = not plan.every_query
    return cuda_costs.varlen_cost(call, lens_q, lens_k, args.causal, window, head_width(call), scattered, repeated_kv)


def gather(t: torch.Tensor, index: torch.Tensor, every: bool, width: int) -> torch.Tensor:
    """``t`` ``(B, Hx, L, Dx)`` -> the packed ``(len(index), Hx, width)``, contiguous: rows ``index`` of the flattened
    ``(B * L)`` tokens (all of them, in order, when ``every``), heads zero-padded from ``Dx`` to ``width``."""
    B, Hx, L, Dx = t.shape
    flat = t.transpose(1, 2).reshape(B * L, Hx, Dx)
    packed = flat.contiguous() if every else flat.index_select(0, index)
    return F.pad(packed, (0, width - Dx)) if width > Dx else packed


def scatter(out: torch.Tensor, plan: PackedPlan, batch: int, q_len: int, value_dim: int) -> torch.Tensor:
    """The packed output ``(Tq, H, width)`` -> ``(B, H, Q, Dv)`` (a view of a ``(B, Q, H, Dv)`` tensor), exactly 0 at
    every query in no sequence. A gather from the output with a zero row in front, so the backward is a gather too."""
    out = out.narrow(-1, 0, value_dim)
    if not plan.every_query:
        out = torch.cat([out.new_zeros((1, *out.shape[1:])), out]).index_select(0, plan.q_slot)
    return out.unflatten(0, (batch, q_len)).transpose(1, 2)


def packed_attention(call, kernel: Kernel) -> torch.Tensor:
    """Run ``kernel(q, k, v, plan, scale, dropout_p)`` on the call's packed sequences and scatter the result back:
    ``(B, H, Q, Dv)`` in ``q``'s dtype. ``kernel`` takes ``(Tq, H, P)``, ``(Tk, Hkv, P)``, ``(Tk, Hkv, P)`` and
    returns ``(Tq, H, P)``; the plan lives with the call's plans, moved to ``q``'s device once."""
    plans = call_plans(call)
    if "packed_on_device" not in plans:
        plans["packed_on_device"] = _cached_plan(call).to(call.q.device)
    plan = plans["packed_on_device"]
    args, width = plan.args, head_width(call)
    q = gather(call.q, args.indices_q, plan.every_query, width)
    k = gather(call.k, args.indices_k, plan.every_key, width)
    v = gather(call.v, args.indices_k, plan.every_key, width)
    if plan.num_sequences:
        out = kernel(q, k, v, plan, call.scale, call.dropout_p)
    else:
        # No query sees a key: empty sums are exactly 0 and keep the zeros connected to q, k and v (gradients 0).
        out = q.new_zeros((0, call.heads, width)) + (q.sum() + k.sum() + v.sum())
    return scatter(out, plan, call.batch, call.q_len, call.value_dim).to(call.q.dtype)


def packed_backend(
    name: str,
    kernel: Kernel,
    *,
    dropout: bool,
    available: Callable[[], str | None],
    cost: Callable[..., float] = packed_cost,
) -> Backend:
    """A CUDA backend running ``kernel`` on the packed layout: float16 / bfloat16, structural specs of the varlen
    form, backward, ``dropout`` as the kernel has it, ``available`` its environment check, ``cost`` its estimate."""
    return Backend(
        name,
        lambda call: packed_attention(call, kernel),
        cost,
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        masks=frozenset({"structural"}),
        dropout=dropout,
        backward=True,
        unsupported=packed_unsupported,
        available=available,
    )
