"""``"flash"``: flash-attn's ``flash_attn_varlen_func``, when the ``flash_attn`` package (>= 2.3) is installed.

Layer 3 (attention). Same packed layout as ``"cuda_varlen"`` (``attnmask.backends.packed``): packed documents, padded
rows, causal, sliding windows, grouped-query attention, ``Q < K``, forward and backward, float16 and bfloat16 on a
CUDA GPU, plus attention dropout (flash-attn's ``dropout_p``: on the probabilities after the softmax, kept ones scaled
by ``1 / (1 - p)``, drawn from torch's CUDA generator).

flash-attn's documented conventions, which ``packed`` builds: ``cu_seqlens_q`` / ``cu_seqlens_k`` ``(N + 1,)``
int32; ``window_size = (left, right)``, ``-1`` unbounded, a query at ``i`` of a sequence with ``lq`` queries and
``lk`` keys sees keys ``[i + lk - lq - left, i + lk - lq + right]``; ``causal`` bottom-right aligned since 2.1 (2.3
added ``window_size``); fewer key/value heads than query heads for grouped-query attention. ``flash_attn`` is imported
lazily: without it this backend declares itself unavailable.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

import attnmask.backends.packed as packed

__all__ = ["BACKEND", "MIN_VERSION", "flash_kwargs"]

MIN_VERSION = (2, 3)  # bottom-right causal since 2.1, window_size since 2.3


def flash_kwargs(plan: packed.PackedPlan, scale: float, dropout_p: float) -> dict:
    """Keyword arguments of ``flash_attn_varlen_func(q, k, v, **kwargs)`` for a plan."""
    return plan.args.as_flash_kwargs() | {"softmax_scale": scale, "dropout_p": dropout_p}


def _flash_attn_varlen_func():
    """The kernel, imported on first use (tests put an emulator of its documented semantics here)."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def _kernel(q, k, v, plan, scale, dropout_p):
    return _flash_attn_varlen_func()(q, k, v, **flash_kwargs(plan, scale, dropout_p))


def _version(text: str) -> tuple[int, ...]:
    """``"2.6.3"`` -> ``(2, 6, 3)``; non-numeric suffixes (``"2.7.0.post2"``) are dropped."""
    parts = []
    for part in text.split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


@functools.cache
def flash_available() -> str | None:
    """``None`` when ``flash_attn`` >= 2.3 imports and a CUDA GPU is available, else why not."""
    if importlib.util.find_spec("flash_attn") is None:
        return "flash_attn is not installed"
    try:
        import flash_attn

        _flash_attn_varlen_func()
    except ImportError as err:
        return f"flash_attn does not import: {err}"
    version = getattr(flash_attn, "__version__", "0")
    if _version(version) < MIN_VERSION:
        return (
            f"flash_attn >= {'.'.join(map(str, MIN_VERSION))} is needed (bottom-right causal, windows), got {version}"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


BACKEND = packed.packed_backend("flash", _kernel, dropout=True, available=flash_available)
