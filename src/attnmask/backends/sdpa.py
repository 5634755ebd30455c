"""The "sdpa" backend: ``torch.nn.functional.scaled_dot_product_attention`` with the mask as a dense bool tensor.

Layer 3 (attention). No mask, ``full()`` and a plain ``causal()`` with ``Q == K`` (``is_causal``) build no mask;
any other spec becomes an O(B·Q·K) bool mask, a per-head spec an O(B·H·Q·K) one (SDPA takes ``(B, H, Q, K)``). Rows
with no allowed key attend to every key inside the kernel (finite, NaN-free) and are zeroed afterwards, so their output
and gradient are exactly 0.

Score modifiers: attention sinks and ALiBi slopes, as one float additive bias ``(B or 1, H, Q, K + 1)`` built from the
dense mask (O(B·H·Q·K), as dense as SDPA itself): the ALiBi term where allowed, ``finfo.min`` where not, and the
sink as one more key whose key and value are 0 and whose bias is the sink logit (its output column is dropped with
the value 0). Half-precision inputs run in float32 then, so the bias is not rounded to 8 or 11 bits. Softcapping
changes the scores inside the kernel, which SDPA cannot: not declared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import attnmask.backends.cuda_costs as cuda_costs
from attnmask.backends.contract import (
    ALL_DTYPES,
    TORCH_DEVICES,
    AttentionCall,
    Backend,
    dense_mask,
    rows_with_keys,
    score_bias,
)
from attnmask.masks import MaskSpec

__all__ = ["BACKEND"]

# On CPU the estimate is in multiply-adds of SDPA's kernel (the unit of every CPU backend's estimate), plus:
_MASK_COST = 2.0  # building and reading one element of a spec's dense bool mask
_CALL_COST = 0.0  # fixed cost of a call with a spec's mask (positions, to_dense, the masked kernel's set-up)


def run(call: AttentionCall) -> torch.Tensor:
    """SDPA with the call's dense bool mask (O(B·Q·K) for a spec), ``is_causal`` where it is exact."""
    sdpa_kwargs = {"scale": call.scale}
    if call.heads != call.kv_heads:
        sdpa_kwargs["enable_gqa"] = True
    if call.dropout_p > 0:
        sdpa_kwargs["dropout_p"] = call.dropout_p
    if call.score_mods:
        return _run_with_bias(call, sdpa_kwargs)
    if call.masks_no_key:
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


def _run_with_bias(call: AttentionCall, sdpa_kwargs: dict) -> torch.Tensor:
    """SDPA with a float bias carrying the mask, the ALiBi term and the sink key (see the module docstring)."""
    work = torch.promote_types(call.q.dtype, torch.float32)
    q, k, v = call.q.to(work), call.k.to(work), call.v.to(work)
    B, H, Q, K = call.batch, call.heads, call.q_len, call.kv_len
    allowed, _ = dense_mask(call)
    has_key = None if allowed is None else rows_with_keys(allowed)
    if has_key is not None:
        allowed = allowed | ~has_key  # empty rows see every key (finite), zeroed afterwards
    bias = score_bias(call, work)
    if bias is None:
        bias = torch.zeros((1, 1, Q, K), dtype=work, device=q.device)
    if allowed is not None:
        bias = bias.masked_fill(~allowed, torch.finfo(work).min)
    if call.sinks is not None:
        rows = bias.shape[0]
        sink = call.sinks.to(work)[None, :, None, None].expand(rows, H, Q, 1)
        bias = torch.cat([bias.expand(rows, H, Q, K), sink], dim=-1)
        k = torch.cat([k, k.new_zeros(B, call.kv_heads, 1, call.head_dim)], dim=2)
        v = torch.cat([v, v.new_zeros(B, call.kv_heads, 1, call.value_dim)], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, **sdpa_kwargs)
    if has_key is not None:
        out = out.masked_fill(~has_key, 0.0)
    return out.to(call.q.dtype)


def cost(call: AttentionCall) -> float:
    """Pairs times ``D + Dv`` (half for ``is_causal``), plus building the dense mask of a spec; on CUDA
    ``cuda_costs.sdpa_cost`` (comparable with the fused varlen and flex kernels)."""
    if call.q.device.type == "cuda":
        return cuda_costs.sdpa_cost(call)
    work = call.batch * call.heads * call.q_len * call.kv_len * (call.head_dim + call.value_dim)
    if call.masks_no_key:
        return float(work)
    if call.is_plain_causal:
        return work / 2  # the fused kernel skips the tiles above the diagonal
    mask_rows = call.batch * (call.mask_heads or 1) if isinstance(call.mask, MaskSpec) else 0
    bias = 4 * call.batch * call.heads * call.q_len * call.kv_len if call.score_mods else 0  # the float bias
    masked = _MASK_COST * mask_rows * call.q_len * call.kv_len + (_CALL_COST if mask_rows else 0.0)
    return float(work + masked + bias)


BACKEND = Backend(
    "sdpa",
    run,
    cost,
    devices=TORCH_DEVICES,
    dtypes=ALL_DTYPES,
    per_head=True,
    dropout=True,
    score_mods=frozenset({"sinks", "alibi"}),
)
