"""Dense-mask plumbing below the spec algebra: fresh output buffers, comparisons of positions and per-row data
(``compare``), folding broadcast bool parts into one (``fold``, ``and_into``), bool masks as additive ones
(``additive``), and zeroing rows (``zero_rows``, ``zero_query_rows``).

A dense mask is O(B·Q·K) and written once, so three costs dominate building it: torch's CPU kernels that run
element by element on bool (a comparison writing bool, a bool operation broadcast along the last axis: done as bytes
here, see the comment above ``FAST_MIN_ELEMENTS``), extra full-size temporaries, and the page faults of a fresh
multi-MiB allocation (the CPU allocator returns new pages for every large tensor, faulted in 4 KiB at a time).
``fold`` does one full-size operation. ``empty_buffer`` can place large CPU outputs on transparent
huge pages (512 times fewer faults): opt in with ``ATTNMASK_HUGE_PAGES=1`` or ``attnmask._dense.USE_HUGE_PAGES =
True``. It is off by default because with the common kernel setting ``defrag=madvise`` a huge-page fault may compact
memory synchronously: measured on a busy 2-core VM, typically 3-6x faster allocation but with occasional stalls 2-10x
slower than plain pages. ``benchmarks/bench_mask.py`` reports both.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger("attnmask")
DENSE_WARN_BYTES = 2**30  # a dense mask above this is worth a warning: a structural backend needs none

HUGE_PAGES_AVAILABLE = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS")
USE_HUGE_PAGES = HUGE_PAGES_AVAILABLE and os.environ.get("ATTNMASK_HUGE_PAGES", "0") == "1"
HUGE_PAGE_MIN_BYTES = 16 * 2**20  # below this the default allocator is as fast
_ANONYMOUS = (mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) if HUGE_PAGES_AVAILABLE else 0


def huge_pages_for(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str | None) -> bool:
    """Whether ``empty_buffer`` would try huge pages for this tensor (enabled, CPU, at least 16 MiB)."""
    if not (USE_HUGE_PAGES and HUGE_PAGES_AVAILABLE):
        return False
    device = torch.device("cpu") if device is None else torch.device(device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return device.type == "cpu" and nbytes >= HUGE_PAGE_MIN_BYTES


def warn_if_large(shape: Sequence[int], dtype: torch.dtype) -> None:
    """Log a warning on the ``attnmask`` logger when a dense mask of ``shape`` and ``dtype`` is above 1 GiB.

    Called before the allocation, so the warning is there even when the allocation then fails.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes > DENSE_WARN_BYTES:
        logger.warning(
            "building a dense attention mask of shape %s (%s, %.1f GiB): O(B·Q·K) memory; a structural backend "
            "(varlen, blocksparse, banded, native, flex) needs none",
            tuple(shape),
            dtype,
            nbytes / 2**30,
        )


def empty_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """An uninitialised contiguous tensor, like ``torch.empty``; large CPU ones (>= 16 MiB) on huge pages if enabled.

    The huge-page tensor is an ordinary CPU tensor whose memory is an anonymous mapping, released when the tensor is
    (its storage is not resizable). Any failure falls back to ``torch.empty``.
    """
    if not huge_pages_for(shape, dtype, device):
        return torch.empty(shape, dtype=dtype, device=device)
    try:
        region = mmap.mmap(-1, math.prod(shape) * torch.empty((), dtype=dtype).element_size(), flags=_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)
        return torch.frombuffer(region, dtype=dtype, count=math.prod(shape)).view(tuple(shape))
    except (OSError, ValueError, TypeError):
        return torch.empty(shape, dtype=dtype, device=device)


# torch's CPU kernels run element by element on bool tensors in two common cases: a comparison that writes bool, and a
# bool operation whose operand is broadcast along the last axis (``(B, Q, K) & (B, Q, 1)``). The same work on bytes
# (uint8) or in the operands' own integer type is vectorised. Measured on (8, 256, 256), one thread, in one process:
# ``ids[:, :, None] == ids[:, None, :]`` (int64) 467 us, the same in uint8 48-66 us (in int16, then narrowed to
# bytes, 300 us, and at (8, 4096, 4096) slower than int64: two passes over wider data);
# ``(B, Q, K) & (B, Q, 1)`` 518 us as bool, 22 us as bytes. Those paths run only on CPU tensors that no transform
# traces (vmap, grad, torch.compile: FlexAttention calls a mask's ``evaluate`` under vmap) and, for comparisons, only
# above ``FAST_MIN_ELEMENTS`` results.
FAST_MIN_ELEMENTS = 1 << 18
_BYTE_OPS = {torch.logical_and: torch.minimum, torch.logical_or: torch.maximum}


def fold(op: Callable[..., torch.Tensor], parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Combine bool tensors that broadcast together with ``op`` (``torch.logical_and`` / ``torch.logical_or``).

    Parts of one shape are combined first, in order (each step keeps that shape); then, of the few distinct shapes
    left, the two whose combination is smallest meet first, so small ones (``(1, Q, K)`` causal and window,
    ``(B, 1, K)`` padding) are combined before the one operation that produces the full broadcast shape. O(n) steps for
    n parts (the distinct broadcast shapes of a mask are few: each size is 1 or the full one).
    Out-of-place only (parts are never written, and it works under ``torch.vmap``, as FlexAttention calls a
    ``mask_mod``), except that the last, full-size result goes to a huge-page buffer when those are enabled
    (never under vmap or torch.compile). On CPU, untraced, the parts are combined as bytes (``minimum`` for and,
    ``maximum`` for or: exact for any nonzero byte a bool may hold), the result viewed back as bool.
    Example: shapes ``(2, 1, 5)``, ``(1, 3, 5)``, ``(1, 3, 5)`` give one ``(1, 3, 5)`` and one ``(2, 3, 5)`` operation.
    """
    byte_op = _BYTE_OPS.get(op)
    if byte_op is not None and len(parts) > 1 and all(p.dtype == torch.bool for p in parts) and _on_cpu(parts):
        return _fold(byte_op, [p.view(torch.uint8) for p in parts], torch.uint8).view(torch.bool)
    return _fold(op, parts, torch.bool)


def and_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``torch.logical_and(a, b, out=out)`` for bool tensors, as bytes on CPU (see ``fold``); returns ``out``."""
    if _on_cpu((a, b, out)):
        torch.minimum(a.view(torch.uint8), b.view(torch.uint8), out=out.view(torch.uint8))
        return out
    return torch.logical_and(a, b, out=out)


def _fold(op: Callable[..., torch.Tensor], parts: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    by_shape: dict[tuple[int, ...], torch.Tensor] = {}
    for part in parts:
        shape = tuple(part.shape)
        by_shape[shape] = op(by_shape[shape], part) if shape in by_shape else part
    pending = list(by_shape.values())
    while len(pending) > 1:
        pairs = [(i, j) for i in range(len(pending)) for j in range(i + 1, len(pending))]
        if len(pairs) > 1:
            size = {(i, j): math.prod(broadcast_shape(pending[i].shape, pending[j].shape)) for i, j in pairs}
            i, j = min(pairs, key=lambda ij: size[ij])
        else:
            i, j = pairs[0]
        a, b = pending[i], pending[j]
        shape = broadcast_shape(a.shape, b.shape)
        if len(pending) == 2 and huge_pages_for(shape, dtype, a.device) and not _traced((a, b)):
            combined = op(a, b, out=empty_buffer(shape, dtype, a.device))
        else:
            combined = op(a, b)
        pending = [t for n, t in enumerate(pending) if n not in (i, j)] + [combined]
    return pending[0]


def compare(op: Callable[..., torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``op(a, b)`` for integer tensors that broadcast together (``op``: ``torch.eq``, ``le``, ``lt``, ``ge``, ``gt``):
    bool, of the broadcast shape.

    On CPU, untraced, for a result of at least ``FAST_MIN_ELEMENTS`` elements from operands of at most a quarter of
    its size (positions and per-row data against each other) whose values span at most 256 (document ids with -1
    for padding, positions within a short row): both are shifted by their common minimum into uint8 and compared
    into a uint8 result, one vectorised byte pass, exact (a shift by one constant keeps every order and equality).
    Otherwise ``op(a, b)``. O(operands) to find the span; memory: the result."""
    shape = broadcast_shape(a.shape, b.shape)
    size = math.prod(shape)
    if size < FAST_MIN_ELEMENTS or 4 * (a.numel() + b.numel()) > size or a.dtype != b.dtype:
        return op(a, b)
    if a.is_floating_point() or a.dtype == torch.bool or not _on_cpu((a, b)):
        return op(a, b)
    a_lo, a_hi = torch.aminmax(a)
    b_lo, b_hi = torch.aminmax(b)
    lo, hi = min(int(a_lo), int(b_lo)), max(int(a_hi), int(b_hi))
    if hi - lo > 255:
        return op(a, b)
    a8, b8 = (a - lo).to(torch.uint8), (b - lo).to(torch.uint8)
    return op(a8, b8, out=torch.empty(shape, dtype=torch.uint8)).view(torch.bool)


def zero_rows(out: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """``out`` ``(..., Q, D)`` with the rows where ``empty`` ``(..., Q, 1)`` (bool, broadcasting to ``out``) holds
    set to exactly +0.0: in place when no graph records ``out`` (pass a tensor the caller owns), else a new tensor whose
    gradient is 0 on those rows.

    On CPU, untraced: ``index_put`` at the empty rows (their ``nonzero`` over ``out``'s leading dims: O(B·H·Q)), where
    ``masked_fill`` with a mask broadcast along the last axis runs element by element (``(8, 4, 256, 64)``, a fifth of
    the rows empty: 207 against 963 us). Elsewhere ``masked_fill``."""
    return _rows_zeroed(out, empty, in_place=not out.requires_grad)


def zero_query_rows(q: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """``q`` ``(B, H, Q, D)`` with the rows ``empty`` (bool, broadcasting to ``(B, H, Q, 1)``: queries with no allowed
    key) at exactly 0, in a new tensor, where ``q`` holds a NaN or an infinity; else ``q`` itself.

    For a kernel whose backward reads such a row's scores although its output is zeroed: a NaN query there gives
    ``0 · NaN`` in the key and value gradients (and its own), where the exact gradient, as the output does not depend
    on that query, is 0. On the CPU found by one sum of ``q`` (in float32 at least: O(B·H·Q·D) read, no copy, ~20 us
    on ``(8, 4, 256, 64)``); a non-finite value in another row or a sum that overflows only costs the copy. Off the
    CPU (a read-back would wait for the queued kernels) and under tracing or a functorch transform, always the copy."""
    if _on_cpu((q,)) and not torch._C._are_functorch_transforms_active():
        total = q.detach().sum(dtype=torch.promote_types(q.dtype, torch.float32) if q.dtype == torch.float16 else None)
        if math.isfinite(total.item()):
            return q
    return _rows_zeroed(q, empty, in_place=False)


def _rows_zeroed(out: torch.Tensor, empty: torch.Tensor, in_place: bool) -> torch.Tensor:
    if empty.shape[-1] != 1 or not _on_cpu((out, empty)):
        return out.masked_fill_(empty, 0.0) if in_place else out.masked_fill(empty, 0.0)
    rows = torch.broadcast_to(empty.squeeze(-1), out.shape[:-1]).nonzero(as_tuple=True)
    zero = torch.zeros((), dtype=out.dtype)
    return out.index_put_(rows, zero) if in_place else out.index_put(rows, zero)


_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def additive(allowed: torch.Tensor, dtype: torch.dtype, denied: float = float("-inf")) -> torch.Tensor:
    """``torch.where(allowed, 0.0, denied)`` in the floating ``dtype``: a bool mask (True = may attend) as an additive
    one, of ``allowed``'s shape.

    On CPU, untraced, for a float of 2, 4 or 8 bytes: as integers of that width. The bits of +0.0 are all zero, so
    ``(~allowed) * bits(denied)`` viewed as ``dtype`` is the same tensor bit for bit, in vectorised integer passes,
    where ``torch.where`` on a bool condition runs element by element (``(8, 1, 256, 256)``, one thread: 0.55 against
    3.3 ms). Otherwise ``torch.where``. Memory: the result (and a bool temporary of its size)."""
    as_int = None if dtype.is_complex else _SAME_WIDTH_INT.get(dtype.itemsize)
    if as_int is None or not _on_cpu((allowed,)):
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.full((), denied, dtype=dtype, device=allowed.device))
    bits = int(torch.full((), denied, dtype=dtype).view(as_int))
    return allowed.logical_not().to(as_int).mul_(bits).view(dtype)


def broadcast_shape(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    """The shape that shapes ``a`` and ``b`` broadcast to, assuming they do (the operation that follows checks): plain
    Python on the sizes, several times cheaper than ``torch.broadcast_shapes`` for a call that builds a small mask."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    return tuple(y if x == 1 else x for x, y in zip(a, b, strict=True))


def _on_cpu(parts: Sequence[torch.Tensor]) -> bool:
    """Whether the byte-level paths apply: every tensor on CPU, none traced (vmap, grad, torch.compile)."""
    return all(t.device.type == "cpu" for t in parts) and not _traced(parts)


def _traced(parts: Sequence[torch.Tensor]) -> bool:
    """Whether any part is wrapped by functorch (vmap, grad) or we are inside torch.compile's tracing."""
    if torch.compiler.is_compiling():
        return True
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return wrapped is not None and any(wrapped(t) for t in parts)
