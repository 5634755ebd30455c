"""Dense-mask plumbing below the spec algebra: fresh output buffers and folding broadcast bool parts into one.

A dense mask is O(B·Q·K) and written once, so two costs dominate building it: extra full-size temporaries, and the
page faults of a fresh multi-MiB allocation (the CPU allocator returns new pages for every large tensor, faulted in
4 KiB at a time). ``fold`` does one full-size operation. ``empty_buffer`` can place large CPU outputs on transparent
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


def fold(op: Callable[..., torch.Tensor], parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Combine bool tensors that broadcast together with ``op`` (``torch.logical_and`` / ``torch.logical_or``).

    Parts of one shape are combined first, in order (each step keeps that shape); then, of the few distinct shapes
    left, the two whose combination is smallest meet first, so small ones (``(1, Q, K)`` causal and window,
    ``(B, 1, K)`` padding) are combined before the one operation that produces the full broadcast shape. O(n) steps for
    n parts (the distinct broadcast shapes of a mask are few: each size is 1 or the full one).
    Out-of-place only (parts are never written, and it works under ``torch.vmap``, as FlexAttention calls a
    ``mask_mod``), except that the last, full-size result goes to a huge-page buffer when those are enabled
    (never under vmap or torch.compile).
    Example: shapes ``(2, 1, 5)``, ``(1, 3, 5)``, ``(1, 3, 5)`` give one ``(1, 3, 5)`` and one ``(2, 3, 5)`` operation.
    """
    by_shape: dict[tuple[int, ...], torch.Tensor] = {}
    for part in parts:
        shape = tuple(part.shape)
        by_shape[shape] = op(by_shape[shape], part) if shape in by_shape else part
    pending = list(by_shape.values())
    while len(pending) > 1:
        pairs = [(i, j) for i in range(len(pending)) for j in range(i + 1, len(pending))]
        size = {(i, j): math.prod(torch.broadcast_shapes(pending[i].shape, pending[j].shape)) for i, j in pairs}
        i, j = min(pairs, key=lambda ij: size[ij])
        a, b = pending[i], pending[j]
        shape = torch.broadcast_shapes(a.shape, b.shape)
        if len(pending) == 2 and huge_pages_for(shape, torch.bool, a.device) and not _traced((a, b)):
            combined = op(a, b, out=empty_buffer(shape, torch.bool, a.device))
        else:
            combined = op(a, b)
        pending = [t for n, t in enumerate(pending) if n not in (i, j)] + [combined]
    return pending[0]


def _traced(parts: Sequence[torch.Tensor]) -> bool:
    """Whether any part is wrapped by functorch (vmap, grad) or we are inside torch.compile's tracing."""
    if torch.compiler.is_compiling():
        return True
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return wrapped is not None and any(wrapped(t) for t in parts)
