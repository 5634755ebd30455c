"""Independent per-element references, written in plain Python from the definitions in DESIGN.md.

Nothing here imports attnmask's evaluation code: each primitive is one `allowed(b, q, k)` rule on ints, and a
spec tree is re-evaluated element by element. Tests compare attnmask's vectorised results with these.
"""

from __future__ import annotations

import torch

from attnmask import masks as M


def naive_allowed(spec: M.MaskSpec, b: int, q: int, k: int) -> bool:
    """Whether query position q of row b may attend to key position k, by the written definitions."""
    if isinstance(spec, M.Full):
        return True
    if isinstance(spec, M.Causal):
        return k <= q
    if isinstance(spec, M.SlidingWindow):
        return 0 <= q - k < spec.window
    if isinstance(spec, M.LocalWindow):
        return -spec.after <= q - k <= spec.before
    if isinstance(spec, M.Chunked):
        off = 0 if spec.offsets is None else int(spec.offsets[b if spec.offsets.shape[0] > 1 else 0])
        return (q - off) // spec.size == (k - off) // spec.size
    if isinstance(spec, M.PrefixLM):
        p = int(spec.prefix_lens[b if spec.prefix_lens.shape[0] > 1 else 0])
        return k <= q or k < p
    if isinstance(spec, M.BidirectionalBlocks):
        row = spec.doc_ids[b if spec.doc_ids.shape[0] > 1 else 0]
        return int(row[q]) != -1 and int(row[q]) == int(row[k])
    if isinstance(spec, M.PrefixKeys):
        return q >= int(spec.visible_from[b if spec.visible_from.shape[0] > 1 else 0][k])
    if isinstance(spec, M.Document):
        row = spec.doc_ids[b if spec.doc_ids.shape[0] > 1 else 0]
        return int(row[q]) >= 0 and int(row[q]) == int(row[k])
    if isinstance(spec, M.KeyPadding):
        row = spec.attention_mask[b if spec.attention_mask.shape[0] > 1 else 0]
        return bool(row[k])
    if isinstance(spec, M.Custom):
        t = lambda x: torch.tensor(x)  # noqa: E731
        return bool(spec.fn(t(b), t(0), t(q), t(k)))
    if isinstance(spec, M.And):
        return all(naive_allowed(p, b, q, k) for p in spec.parts)
    if isinstance(spec, M.Or):
        return any(naive_allowed(p, b, q, k) for p in spec.parts)
    if isinstance(spec, M.Not):
        return not naive_allowed(spec.part, b, q, k)
    raise TypeError(type(spec))


def naive_dense(spec: M.MaskSpec, q_len: int, kv_len: int, batch: int | None = None) -> torch.Tensor:
    """(B, Q, K) bool mask, queries bottom-right aligned, one Python call per element."""
    batch = batch or spec.batch_size or 1
    out = torch.zeros(batch, q_len, kv_len, dtype=torch.bool)
    for b in range(batch):
        for i in range(q_len):
            q = kv_len - q_len + i
            for k in range(kv_len):
                out[b, i, k] = naive_allowed(spec, b, q, k)
    return out


def naive_attention(q, k, v, allowed, scale=None, *, softcap=None, sinks=None, alibi_slopes=None, q_positions=None):
    """Attention by the textbook formula in float64; rows with no allowed key give 0.

    q: (B, H, Q, D); k, v: (B, Hkv, K, D); allowed: bool broadcastable to (B, H, Q, K). Score modifiers, written
    from their definitions and independently of attnmask: ``softcap`` c gives ``c · tanh(s / c)``; ``alibi_slopes``
    ``(H,)`` adds ``-slope_h · (q_pos - k_pos)``, one Python loop per (head, query, key), with ``q_positions`` ``(Q,)``
    (default: the last Q of ``0 .. K - 1``) and keys at ``0 .. K - 1``; ``sinks`` ``(H,)`` is a real extra key column
    whose score is the sink and whose value is 0, always allowed (so a row with no other key gives 0 by itself).
    Differentiable in q, k, v and sinks.
    """
    B, H, Q, D = q.shape
    K = k.shape[2]
    rep = H // k.shape[1]
    k = k.double().repeat_interleave(rep, dim=1)
    v = v.double().repeat_interleave(rep, dim=1)
    scale = D**-0.5 if scale is None else scale
    s = (q.double() @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        q_pos = list(range(K - Q, K)) if q_positions is None else [int(p) for p in q_positions]
        bias = torch.zeros(H, Q, K, dtype=torch.float64)
        for h in range(H):
            for i in range(Q):
                for j in range(K):
                    bias[h, i, j] = -float(alibi_slopes[h]) * (q_pos[i] - j)
        s = s + bias
    allowed = torch.broadcast_to(allowed, s.shape)
    s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink_scores = sinks.double()[None, :, None, None].expand(B, H, Q, 1)
        s = torch.cat([s, sink_scores], dim=-1)
        v = torch.cat([v, torch.zeros(B, H, 1, v.shape[-1], dtype=torch.float64)], dim=2)
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)
    return p @ v
