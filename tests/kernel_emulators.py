"""Pure-torch emulators of the documented semantics of flash-attn's ``flash_attn_varlen_func``, torch's
``varlen_attn`` and FlexAttention with a ``BlockMask``, written from their docstrings (no attnmask import): textbook
attention in float64. The CUDA backends are checked on a CPU by running their own arguments, gathers, scatters and
block masks through these in place of the GPU kernels (``tests/test_cuda_backends.py``, ``benchmarks/device_check.py
--dry-run``).

flash-attn (``flash_attn_interface.py``, 2.x): ``q`` ``(total_q, H, D)``, ``k`` / ``v`` ``(total_k, Hkv, D)``;
``cu_seqlens_*`` ``(N + 1,)`` int32 offsets; a query at ``i`` of a sequence with ``lq`` queries and ``lk`` keys sees,
with ``causal``, keys ``j <= i + lk - lq`` (bottom-right), and with ``window_size = (left, right)`` keys in
``[i + lk - lq - left, i + lk - lq + right]`` (``-1``: unbounded on that side); a row that sees no key outputs 0;
query head ``h`` reads key head ``h // (H // Hkv)``. torch's ``varlen_attn`` has no ``causal`` flag: its
``window_size`` alone decides, ``(-1, 0)`` meaning causal.
"""

from __future__ import annotations

import torch


def _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size):
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        assert cu.dtype == torch.int32, f"{name} must be int32, got {cu.dtype}"
        assert cu.dim() == 1 and int(cu[0]) == 0 and int(cu[-1]) == total, f"{name} must run from 0 to {total}"
        assert bool((cu.diff() >= 0).all()), f"{name} must not decrease"
    assert cu_seqlens_q.numel() == cu_seqlens_k.numel(), "one entry per sequence in both cu_seqlens"
    assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int), "max_seqlen must be Python ints"
    assert max_seqlen_q == int(cu_seqlens_q.diff().max()), "max_seqlen_q is the longest query sequence"
    assert max_seqlen_k == int(cu_seqlens_k.diff().max()), "max_seqlen_k is the longest key sequence"
    assert isinstance(window_size, tuple) and len(window_size) == 2, "window_size is a (left, right) tuple"
    assert q.dim() == k.dim() == v.dim() == 3 and q.shape[1] % k.shape[1] == 0 and q.shape[2] == k.shape[2]
    for t in (q, k, v):
        assert t.stride(-1) == 1, "the kernels need a contiguous last dimension"


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
):
    """flash-attn's documented semantics; ``(total_q, H, Dv)`` in ``q``'s dtype, computed in float64."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size)
    H, Hkv = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    left, right = window_size
    outs = []
    for s in range(cu_seqlens_q.numel() - 1):
        q0, q1, k0, k1 = (int(x) for x in (cu_seqlens_q[s], cu_seqlens_q[s + 1], cu_seqlens_k[s], cu_seqlens_k[s + 1]))
        lq, lk = q1 - q0, k1 - k0
        i = torch.arange(lq)[:, None] + (lk - lq)  # each query's key-axis position (bottom-right)
        j = torch.arange(lk)[None, :]
        allowed = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            allowed &= j <= i
        if left >= 0:
            allowed &= j >= i - left
        if right >= 0:
            allowed &= j <= i + right
        qs = q[q0:q1].double().transpose(0, 1)  # (H, lq, D)
        ks = k[k0:k1].double().transpose(0, 1).repeat_interleave(H // Hkv, dim=0)
        vs = v[k0:k1].double().transpose(0, 1).repeat_interleave(H // Hkv, dim=0)
        scores = (qs @ ks.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).masked_fill(~allowed.any(-1, keepdim=True), 0.0)  # no key: 0 (NaN stays)
        if dropout_p > 0:
            probs = torch.nn.functional.dropout(probs, dropout_p)
        outs.append((probs @ vs).transpose(0, 1))
    if not outs:
        return q.new_zeros((0, H, v.shape[-1]))
    return torch.cat(outs).to(q.dtype)


def varlen_attn(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
):
    """torch's ``varlen_attn``: causal only through ``window_size``; GQA only with ``enable_gqa``."""
    assert enable_gqa or query.shape[1] == key.shape[1], "varlen_attn needs enable_gqa=True for fewer key heads"
    return flash_attn_varlen_func(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, softmax_scale=scale, window_size=window_size
    )


def flex_attention(query, key, value, block_mask=None, scale=None, enable_gqa=False):
    """FlexAttention's documented semantics with a ``BlockMask``: a pair is computed when its tile is listed FULL, or
    listed PARTIAL (``kv_num_blocks`` / ``kv_indices``) and ``mask_mod(b, h, q_idx, kv_idx)`` allows it; tiles listed
    in neither are skipped; a row with no computed pair outputs 0. ``mask_mod`` is called once on broadcast index
    tensors, ``h`` the query head (a block mask of one head serves every head). ``(B, H, Q, Dv)`` in ``query``'s
    dtype, computed in float64."""
    B, H, Q, _ = query.shape
    K, Hkv = key.shape[2], key.shape[1]
    assert enable_gqa or H == Hkv, "flex_attention needs enable_gqa=True for fewer key heads"
    bs_q, bs_k = block_mask.BLOCK_SIZE
    partial = _listed(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = _listed(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    tile_q, tile_k = torch.arange(Q) // bs_q, torch.arange(K) // bs_k
    partial = partial[:, :, tile_q][..., tile_k]
    full = torch.zeros_like(partial) if full is None else full[:, :, tile_q][..., tile_k]
    b, h = torch.arange(partial.shape[0]).view(-1, 1, 1, 1), torch.arange(H).view(1, -1, 1, 1)
    allowed = full | (partial & block_mask.mask_mod(b, h, torch.arange(Q).view(1, 1, -1, 1), torch.arange(K)))
    k = key.double().repeat_interleave(H // Hkv, dim=1)
    v = value.double().repeat_interleave(H // Hkv, dim=1)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query.double() @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).masked_fill(~allowed.any(-1, keepdim=True), 0.0)  # no pair: 0 (NaN stays)
    return (probs @ v).to(query.dtype)


def _listed(num, indices):
    """``(Bm, Hm, nQ, nK)`` bool: the first ``num[b, h, i]`` entries of ``indices[b, h, i]`` as key tiles."""
    if num is None:
        return None
    first = torch.arange(indices.shape[-1]) < num[..., None]
    out = torch.zeros(indices.shape, dtype=torch.int8)
    return out.scatter_reduce(-1, indices.long(), first.to(torch.int8), reduce="amax").bool()
