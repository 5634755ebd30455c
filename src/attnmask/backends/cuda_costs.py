"""Cost estimates of attention on a CUDA GPU, shared by the CUDA backends so that ``"auto"`` compares like with like.

Layer 3 (attention); imports only ``masks``.

Unit: one multiply-add of one (query, key) pair, for one head and one element of ``D + Dv``, inside a fused
FlashAttention-2 class kernel in half precision (about 4e-15 s on an H100/H200-class GPU). The constants below are
ESTIMATES from public kernel characteristics, except ``VARLEN_PAIR``, fitted to timings on one H200
(``benchmarks/device_check.py``, which times the backends on a GPU and prints how far these estimates are from the
clock; ``--fit`` refits it from saved runs).

- Fused kernels compute whole tiles: a sequence of ``lq`` queries costs at least one ``TILE_Q x TILE_K`` tile per
  block of ``TILE_Q`` queries, so rows of thousands of tiny documents pay for padding inside their tiles.
- Memory-bound work (a gather, a scatter, a dense mask) is charged per element moved: one element costs about as much
  as ``COPY`` multiply-adds.
- Every kernel launch with the Python around it costs ``CALL``.

Worked example, one causal document of 4,096 tokens, H = 8, D = Dv = 128: about ``4096 * 4097 / 2`` pairs plus
``32`` diagonal tiles of ``128 x 64``, times ``8 * 256`` units per pair: ``~1.7e10`` units, ``~70 µs``.
"""

from __future__ import annotations

import torch

from attnmask.masks import MaskSpec

__all__ = [
    "CALL",
    "COPY",
    "FLEX_MASK_PAIR",
    "FLEX_PAIR",
    "FUSED_PAIR",
    "MASK_ELEMENT",
    "MASKED_SDPA_PAIR",
    "TILE_K",
    "TILE_Q",
    "VARLEN_PAIR",
    "flex_cost",
    "sdpa_cost",
    "sequence_pairs",
    "varlen_cost",
]

FUSED_PAIR = 1.0  # FlashAttention-2's kernel, SDPA's flash path (the unit itself)
# The variable-length kernels (torch's varlen_attn, flash-attn's varlen function) per pair, relative to FLEX_PAIR as
# measured: the geometric mean over benchmarks/device_check.py's scenarios of their picoseconds per unit over flex's
# (``device_check.py --fit benchmarks/device/s20_h200_*.json``: H200, torch 2.11, 8 timings in two runs).
VARLEN_PAIR = 1.33
MASKED_SDPA_PAIR = 2.0  # SDPA with an attn_mask has no flash path: the memory-efficient kernel, reading a bias tile
FLEX_PAIR = 1.15  # FlexAttention's Triton kernel: ~90% of FlashAttention-2 forward, ~85% backward (PyTorch's blog)
FLEX_MASK_PAIR = 16.0  # mask_mod evaluated on one pair of a PARTIAL tile, per head (a few gathers and compares)
CALL = 2.5e9  # ~10 µs of Python and launches the GPU waits for: one for SDPA, two for our gathers around a varlen
# kernel (the plan lookup, the kernels queue behind each other), three for compiled FlexAttention (its guards)
COPY = 300.0  # one element gathered, scattered or padded: memory-bound, ~1.3 ps per half-precision element
MASK_ELEMENT = 600.0  # one element of a dense (B, 1, Q, K) mask: built from the spec, made additive, read per tile
TILE_Q, TILE_K = 128, 64  # FlashAttention-2's forward tile for head dims up to 128 on sm80/sm90


def sequence_pairs(lens_q: torch.Tensor, lens_k: torch.Tensor, causal: bool, window: int | None) -> float:
    """(query, key) pairs a fused kernel computes over sequences of ``lens_q`` queries (the last ones of each
    sequence, bottom-right) and ``lens_k`` keys, tile padding included; float64 arithmetic, O(sequences).

    Allowed pairs: ``lq * lk`` (full), ``lq * (lk - lq) + lq * (lq + 1) / 2`` (causal), or with a window of ``w`` keys
    (itself included) ``sum over the queries of min(w, position + 1)``. Each block of ``TILE_Q`` queries adds one
    ``TILE_Q x TILE_K`` tile for its ragged edge or diagonal. Example: 100 documents of 16 tokens, causal: 13,600
    allowed pairs, charged 832,800 (one tile each).
    """
    lq, lk = lens_q.double().cpu(), lens_k.double().cpu()
    if not causal:
        allowed = lq * lk
    elif window is None:
        allowed = lq * (lk - lq) + lq * (lq + 1) / 2
    else:
        allowed = _window_prefix(lk, window) - _window_prefix(lk - lq, window)
    blocks = torch.ceil(lq / TILE_Q)
    return float((allowed + blocks * TILE_Q * TILE_K).sum())


def _window_prefix(n: torch.Tensor, w: int) -> torch.Tensor:
    """``sum_{p < n} min(w, p + 1)``: the pairs of the first ``n`` queries of a sequence under a window of ``w``."""
    inside = torch.clamp(n, max=w)
    return inside * (inside + 1) / 2 + torch.clamp(n - w, min=0) * w


def varlen_cost(
    call,
    lens_q: torch.Tensor,
    lens_k: torch.Tensor,
    causal: bool,
    window: int | None,
    width: int,
    scattered: bool,
    repeated_kv: bool = False,
) -> float:
    """A FlashAttention varlen kernel over sequences of ``lens_q`` / ``lens_k`` tokens with heads padded to ``width``,
    plus the copies into the packed layout and, when some query is in no sequence (``scattered``), out of it, and,
    for a kernel without grouped-query heads (``repeated_kv``), the keys and values repeated to every query head."""
    pairs = sequence_pairs(lens_q, lens_k, causal, window)
    tokens_q, tokens_k = float(lens_q.sum()), float(lens_k.sum())
    copies = tokens_q * call.heads * width + tokens_k * call.kv_heads * 2 * width
    if scattered:  # a zero row put in front of the output, then a gather of every query
        copies += (tokens_q + call.batch * call.q_len) * call.heads * call.value_dim
    if repeated_kv:
        copies += tokens_k * call.heads * 2 * width
    return pairs * call.heads * 2 * width * VARLEN_PAIR + copies * COPY + 2 * CALL


def sdpa_cost(call) -> float:
    """SDPA on CUDA: the flash kernel without a mask (a plain ``causal()`` skips the tiles above the diagonal), else
    the memory-efficient kernel with a dense mask, built from a spec (``B·Q·K`` elements) or given as a tensor."""
    per_pair = call.heads * (call.head_dim + call.value_dim)
    B, Q, K = call.batch, call.q_len, call.kv_len
    if call.is_plain_causal:
        lens = torch.full((B,), float(Q))
        return sequence_pairs(lens, lens, True, None) * per_pair * FUSED_PAIR + CALL
    if call.is_full:
        return B * Q * K * per_pair * FUSED_PAIR + CALL
    mask_rows = B if isinstance(call.mask, MaskSpec) else 1
    return B * Q * K * per_pair * MASKED_SDPA_PAIR + mask_rows * Q * K * MASK_ELEMENT + 4 * CALL


def flex_cost(call, counts: dict[str, int] | None, block_size: int, layout_rows: int) -> float:
    """Compiled FlexAttention over a block layout's tile ``counts`` (``{"full", "partial", "none"}`` over
    ``layout_rows`` rows, broadcast to the call's batch), or, for a ``custom`` predicate (``counts`` None: laying it
    out evaluates every pair), every tile PARTIAL plus one dense evaluation of the predicate."""
    per_pair = call.heads * (call.head_dim + call.value_dim)
    if counts is None:
        pairs = call.batch * call.q_len * call.kv_len
        return pairs * (per_pair * FLEX_PAIR + call.heads * FLEX_MASK_PAIR + MASK_ELEMENT) + 3 * CALL
    repeat = call.batch // layout_rows
    tile = block_size * block_size
    computed = (counts["full"] + counts["partial"]) * repeat * tile
    masked = counts["partial"] * repeat * tile
    return computed * per_pair * FLEX_PAIR + masked * call.heads * FLEX_MASK_PAIR + 3 * CALL
