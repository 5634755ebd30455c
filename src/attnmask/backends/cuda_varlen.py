"""``"cuda_varlen"``: PyTorch's own FlashAttention variable-length kernel, ``torch.nn.attention.varlen.varlen_attn``.

Layer 3 (attention). Packed documents, padded rows (only the real tokens are computed), causal, sliding windows,
grouped-query attention and ``Q < K`` (bottom-right), forward and backward, in float16 and bfloat16 on an NVIDIA GPU
of compute capability 8.0 or newer. No attention dropout (``varlen_attn`` has none). A torch whose ``varlen_attn``
has no ``enable_gqa`` (2.11) gets grouped-query keys and values repeated to the query heads; one without ``scale``
and ``window_size`` is refused by name.

The spec goes through ``attnmask.backends.packed`` (``varlen_args`` -> ``cu_seqlens``, a gather into ``(total, H,
D)``, a scatter back with exact zeros where a query sees no key). ``varlen_attn`` has no ``causal`` flag: causality is
its ``window_size``, ``(-1, 0)`` for causal, ``(w - 1, 0)`` for ``sliding_window(w)`` (a query sees ``w`` keys, itself
included), ``(-1, -1)`` for none; it treats the call as causal only when ``window_size == (-1, 0)`` as a tuple.
"""

from __future__ import annotations

import functools
import inspect

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
        **({"enable_gqa": True} if enable_gqa else {}),  # left out otherwise: a torch without the keyword runs too
    }


def _varlen_attn():
    """The kernel, imported on first use (tests put an emulator of its documented semantics here)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def _kernel(q, k, v, plan, scale, dropout_p):
    """``q (T_q, H, D)``, ``k (T_k, Hkv, D)``, ``v (T_k, Hkv, Dv)``. Grouped-query heads go to the kernel's
    ``enable_gqa``; a ``varlen_attn`` without that keyword (torch 2.11's) gets ``k`` and ``v`` repeated to ``H`` heads
    (query head ``h`` reads key head ``h // (H // Hkv)``, as ``enable_gqa`` does): O(T_k·H·(D + Dv)) more memory,
    gradients summed back by autograd."""
    kernel = _varlen_attn()
    gqa = q.shape[1] != k.shape[1]
    if gqa and "enable_gqa" in missing_keywords(kernel):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        gqa = False
    return kernel(q, k, v, **varlen_attn_kwargs(plan, scale, gqa))


# The keywords ``varlen_attn_kwargs`` passes: torch's first ``varlen_attn`` took ``is_causal`` and none of these, so a
# torch without the first two is refused by name rather than failing inside the call; one without ``enable_gqa``
# (torch 2.11) runs with the key heads repeated (``_kernel``).
_KEYWORDS = ("scale", "window_size", "enable_gqa")
_REQUIRED = ("scale", "window_size")


@functools.cache
def missing_keywords(kernel) -> tuple[str, ...]:
    """Which of ``_KEYWORDS`` the kernel's signature lacks (none when it takes ``**kwargs``)."""
    try:
        params = inspect.signature(kernel).parameters
    except (TypeError, ValueError):  # no introspectable signature: let the call itself decide
        return ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return ()
    return tuple(name for name in _KEYWORDS if name not in params)


@functools.cache
def cuda_varlen_available() -> str | None:
    """``None`` when this torch has a ``varlen_attn`` taking ``scale`` and ``window_size`` and a CUDA GPU of compute
    capability >= 8.0, else why not."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    missing = tuple(name for name in missing_keywords(varlen_attn) if name in _REQUIRED)
    if missing:
        return f"torch {torch.__version__}'s varlen_attn has no {', '.join(missing)} keyword"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"FlashAttention's kernel needs compute capability >= 8.0, this GPU has {major}.{minor}"
    return None


def _cost(call) -> float:
    """``packed.packed_cost``, charging the repeated key heads where ``_kernel`` repeats them."""
    repeats = call.heads != call.kv_heads and "enable_gqa" in missing_keywords(_varlen_attn())
    return packed.packed_cost(call, repeated_kv=repeats)


BACKEND = packed.packed_backend("cuda_varlen", _kernel, dropout=False, available=cuda_varlen_available, cost=_cost)
