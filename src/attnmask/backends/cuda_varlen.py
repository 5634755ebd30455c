"""``"cuda_varlen"``: PyTorch's own FlashAttention variable-length kernel, ``torch.nn.attention.varlen.varlen_attn``.

Layer 3 (attention). Packed documents, padded rows (only the real tokens are computed), causal, sliding windows,
grouped-query attention and ``Q < K`` (bottom-right), forward and backward, in float16 and bfloat16 on an NVIDIA GPU
of compute capability 8.0 or newer. No attention dropout (``varlen_attn`` has none).

The spec goes through ``attnmask.backends.packed`` (``varlen_args`` -> ``cu_seqlens``, a gather into ``(total, H,
D)``, a scatter back with exact zeros where a query sees no key). ``varlen_attn`` has no ``causal`` flag: causality is
its ``window_size``, ``(-1, 0)`` for causal, ``(w - 1, 0)`` for ``sliding_window(w)`` (a query sees ``w`` keys, itself
included), ``(-1, -1)`` for none; it treats the call as causal only when ``window_size == (-1, 0)`` as a tuple.
"""

from __future__ import annotations

import functools

import torch

import attnmask.backends.packed as packed

__all__ = ["BACKEND", "varlen_attn_kwargs", "varlen_window"]


def varlen_window(causal: bool, window_size: tuple[int, int]) -> tuple[int, int]:
    """``varlen_attn``'s ``window_size`` for flash-attn's ``(causal, window_size)``: ``(False, (-1, -1))`` -> ``(-1,
    -1)``, ``(True, (-1, -1))`` -> ``(-1, 0)``, ``(True, (w - 1, 0))`` -> ``(w - 1, 0)``."""
    if window_size != (-1, -1):
        return (int(window_size[0]), int(window_size[1]))
    return (-1, 0) if causal else (-1, -1)


def varlen_attn_kwargs(plan: packed.PackedPlan, scale: float, enable_gqa: bool) -> dict:
    """Keyword arguments of ``varlen_attn(q, k, v, **kwargs)`` for a plan."""
    args = plan.args
    return {
        "cu_seq_q": args.cu_seqlens_q,
        "cu_seq_k": args.cu_seqlens_k,
        "max_q": args.max_seqlen_q,
        "max_k": args.max_seqlen_k,
        "scale": scale,
        "window_size": varlen_window(args.causal, args.window_size),
        "enable_gqa": enable_gqa,
    }


def _varlen_attn():
    """The kernel, imported on first use (tests put an emulator of its documented semantics here)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def _kernel(q, k, v, plan, scale, dropout_p):
    return _varlen_attn()(q, k, v, **varlen_attn_kwargs(plan, scale, q.shape[1] != k.shape[1]))


@functools.cache
def cuda_varlen_available() -> str | None:
    """``None`` when this torch has ``varlen_attn`` and a CUDA GPU of compute capability >= 8.0, else why not."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"FlashAttention's kernel needs compute capability >= 8.0, this GPU has {major}.{minor}"
    return None


BACKEND = packed.packed_backend("cuda_varlen", _kernel, dropout=False, available=cuda_varlen_available)
