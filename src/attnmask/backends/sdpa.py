"""The "sdpa" backend: ``torch.nn.functional.scaled_dot_product_attention`` with the mask as a dense bool tensor.

Layer 3 (attention). No mask, ``full()`` and a plain ``causal()`` with ``Q == K`` (``is_causal``) build no mask;
any other spec becomes an O(B·Q·K) bool mask. Rows with no allowed key attend to every key inside the kernel (finite,
NaN-free) and are zeroed afterwards, so their output and gradient are exactly 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnmask.backends.contract import ALL_DTYPES, TORCH_DEVICES, AttentionCall, Backend, dense_mask, rows_with_keys
from attnmask.masks import MaskSpec

__all__ = ["BACKEND"]


def run(call: AttentionCall) -> torch.Tensor:
    """SDPA with the call's dense bool mask (O(B·Q·K) for a spec), ``is_causal`` where it is exact."""
    sdpa_kwargs = {"scale": call.scale}
    if call.heads != call.kv_heads:
        sdpa_kwargs["enable_gqa"] = True
    if call.dropout_p > 0:
        sdpa_kwargs["dropout_p"] = call.dropout_p
    if call.is_full:
        return F.scaled_dot_product_attention(call.q, call.k, call.v, **sdpa_kwargs)
    if call.is_plain_causal:
        # is_causal is top-left aligned: only used when Q == K, where both alignments agree.
        return F.scaled_dot_product_attention(call.q, call.k, call.v, is_causal=True, **sdpa_kwargs)
    allowed, owned = dense_mask(call)
    has_key = rows_with_keys(allowed)
    empty_rows = not bool(has_key.all())
    if empty_rows:
        # Let empty rows attend to every key (finite, NaN-free), then zero their output: their gradient is then 0 too.
        allowed = allowed.logical_or_(~has_key) if owned else allowed | ~has_key
    out = F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=allowed, **sdpa_kwargs)
    return out.masked_fill(~has_key, 0.0) if empty_rows else out


def cost(call: AttentionCall) -> float:
    """Pairs times ``D + Dv`` (half for ``is_causal``), plus building the dense mask of a spec."""
    work = call.batch * call.heads * call.q_len * call.kv_len * (call.head_dim + call.value_dim)
    if call.is_full:
        return float(work)
    if call.is_plain_causal:
        return work / 2  # the fused kernel skips the tiles above the diagonal
    mask_rows = call.batch if isinstance(call.mask, MaskSpec) else 0
    return float(work + 2 * mask_rows * call.q_len * call.kv_len)


BACKEND = Backend("sdpa", run, cost, devices=TORCH_DEVICES, dtypes=ALL_DTYPES, dropout=True)
