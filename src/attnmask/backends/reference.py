"""The "reference" backend: textbook attention with the scores materialised, the semantics every backend matches.

Layer 3 (attention). Float32 (float64 stays float64), O(B·H·Q·K) memory; any device, dtype, mask kind (per-head
specs included: the ``(B, H, Q, K)`` mask of ``dense_mask``), dropout and a gradient through autograd, and every score
modifier (softcap, sinks, ALiBi) written out as its definition.
``"auto"`` picks it only when nothing else serves a call (its cost is the highest).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnmask.backends._common import SDPA_BACKWARD_KEY_COST, ModeFactors, mode_factor
from attnmask.backends.contract import (
    ALL_DTYPES,
    SCORE_MODS,
    TORCH_DEVICES,
    AttentionCall,
    Backend,
    dense_mask,
    rows_with_keys,
    score_bias,
)

__all__ = ["BACKEND"]


def run(call: AttentionCall) -> torch.Tensor:
    """Textbook attention in float32 (float64 stays float64), scores materialised: O(B·H·Q·K) memory."""
    work = torch.promote_types(call.q.dtype, torch.float32)
    rep = call.heads // call.kv_heads
    allowed, _ = dense_mask(call)
    has_key = None if allowed is None else rows_with_keys(allowed)
    q = call.q.to(work)
    if has_key is not None:
        q = q.masked_fill(~has_key, 0.0)  # their output is 0 whatever the query: a NaN there must not reach dk
    k = call.k.to(work).repeat_interleave(rep, dim=1)
    v = call.v.to(work).repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * call.scale
    if call.softcap is not None:
        scores = torch.tanh(scores / call.softcap) * call.softcap
    bias = score_bias(call, work)
    if bias is not None:
        scores = scores + bias
    if allowed is not None:
        # Empty rows get finite scores (a harmless uniform softmax) and are then zeroed: no NaN forward or backward.
        scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0)
    if call.sinks is not None:
        # The sink: one more column of the softmax whose value is 0, so it only enlarges the denominator.
        sink = call.sinks.to(work)[None, :, None, None].expand(*scores.shape[:3], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    if has_key is not None:
        probs = probs.masked_fill(~has_key, 0.0)
    if call.dropout_p > 0:
        probs = F.dropout(probs, call.dropout_p)  # zeros stay zero: empty rows and masked keys are untouched
    return torch.matmul(probs, v).to(call.q.dtype)


# The oracle runs every mode with at least the work of the fused backends (unfused ops over materialised scores,
# autograd's backward, every op split across all threads): each factor is the largest any CPU backend was fitted
# (tests/test_mode_costs.py holds it so), so that "auto" picks it only where nothing else serves.
MODES = ModeFactors(
    bf16=1.31,
    backward=5.0,
    bf16_backward=8.16,
    busy=1.95,
    busy_backward=3.07,
    bf16_no_amx=1.31,
    bf16_backward_no_amx=16.9,
)


def cost(call: AttentionCall) -> float:
    """Unfused, upcast and with materialised scores: several passes over B·H·Q·K, scaled by ``MODES``; with a
    gradient, at least what the fused kernel's backward pays per key (``_common.SDPA_BACKWARD_KEY_COST``)."""
    work = 4.0 * call.batch * call.heads * call.q_len * call.kv_len * (call.head_dim + call.value_dim + 8)
    keys = call.batch * call.heads * call.kv_len * (call.head_dim + call.value_dim) if call.needs_grad else 0
    return work * mode_factor(MODES, call) + keys * SDPA_BACKWARD_KEY_COST


def _scratch_bytes(call: AttentionCall) -> int:
    """Bytes of the materialised scores and probabilities (float32 or float64) and the dense mask: O(B·H·Q·K)."""
    pairs = call.batch * call.heads * call.q_len * call.kv_len
    return pairs * (2 * (8 if call.q.dtype == torch.float64 else 4) + 1)


BACKEND = Backend(
    "reference",
    run,
    cost,
    devices=TORCH_DEVICES,
    dtypes=ALL_DTYPES,
    per_head=True,
    dropout=True,
    score_mods=SCORE_MODS,
    propagates_nonfinite=frozenset({"cpu"}),  # checked by tests/test_conformance.py
    scratch_bytes=_scratch_bytes,
    floor=cost,  # a closed form: asked after the backends without a floor, skipped when one is cheaper
    transforms=frozenset({"grad"}),  # plain torch operators (tests/test_transforms.py)
)
