"""The "sdpa" backend: ``torch.nn.functional.scaled_dot_product_attention`` with the mask as a dense tensor.

Layer 3 (attention). No mask, ``full()`` and a plain ``causal()`` with ``Q == K`` (``is_causal``) build no mask, nor
does a spec that allows what one of them would at the call's shape (every row one whole document, say), nor on CPU a
bottom-right ``causal()`` chunk without a gradient, a ``prefix_lm`` row, ``causal() & chunked(c)``, padded rows
(``[causal() | full()] & key_padding(m)``, one run of real tokens a row) or a causal ``sliding_window(w)`` (split
into unmasked and ``is_causal`` calls: ``_split_causal``, ``_split_prefix``, ``_split_chunks``, ``_split_padded``,
``_split_window``); any other spec
becomes an O(B·Q·K) additive mask in q's dtype (0 / ``-inf``: what SDPA's fused kernels turn a bool mask into on every
call), a per-head spec an O(B·H·Q·K) one (SDPA takes ``(B, H, Q, K)``), kept with the spec's plans up to
``_CACHED_MASK_BYTES`` so that the layers of a model build it once per forward; a bool tensor mask is passed as given.
Rows with no allowed key attend to every key inside the kernel (finite, NaN-free) and are zeroed afterwards, so their
output and gradient are exactly 0.

Score modifiers: attention sinks and ALiBi slopes, as one float additive bias ``(B or 1, H, Q, K + 1)`` built from the
dense mask (O(B·H·Q·K), as dense as SDPA itself): the ALiBi term where allowed, ``finfo.min`` where not, and the
sink as one more key whose key and value are 0 and whose bias is the sink logit (its output column is dropped with
the value 0). Half-precision inputs run in float32 then, so the bias is not rounded to 8 or 11 bits. Softcapping
changes the scores inside the kernel, which SDPA cannot: not declared.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

import attnmask.backends._common as _common
import attnmask.backends._workers as _workers
import attnmask.backends.cuda_costs as cuda_costs
from attnmask._dense import additive, fold, zero_query_rows, zero_rows
from attnmask.backends._common import (
    ModeFactors,
    cached,
    mode_factor,
    nan_rows_restored,
    nan_rows_restored_lse,
    per_cpu_kind,
    unit_stride,
)
from attnmask.backends.contract import (
    ALL_DTYPES,
    TORCH_DEVICES,
    AttentionCall,
    Backend,
    active_transforms,
    dense_mask,
    rows_with_keys,
    score_bias,
)
from attnmask.masks import And, Causal, Chunked, MaskSpec, PrefixLM, SlidingWindow

__all__ = ["BACKEND"]

# On CPU the estimate is in multiply-adds of SDPA's kernel (the unit of every CPU backend's estimate), plus:
_MASK_COST = 2.0  # building and reading one element of a spec's dense bool mask
# What a pair costs beyond its D + Dv (``_common.pair_width``), fitted by benchmarks/bench_head_dim.py --fit.
_EXTRA_PAIR_WIDTH = 48.0
_CALL_COST = 0.0  # fixed cost of a call with a spec's mask (positions, to_dense, the masked kernel's set-up)
# A spec's mask over ``_CACHED_MASK_BYTES`` is not kept with its plans: every call builds it and the masked kernel
# reads it from memory per head, per element of the mask, charged once per call (outside the mode factors: the
# backward reads the mask the forward built). Fitted on the rows of 8,192 (RESULTS.md, issue 15, "Masks built on
# every call"): masked / unmasked SDPA on the same rows implies 352-413 per element in the forward tables at one and
# two threads, float32 and bfloat16 (medians; 450 with a backward); without it SDPA's masked bfloat16 call was
# estimated cheaper than native on windows of 4,096 and right-padded rows, where it ran 1.7-2.4x slower. Kept masks
# (up to 32 MiB: rows of 1,024) are not charged: a charge per head and pair there lost picks in the grid.
_UNKEPT_MASK_COST = 370.0
# Threads: torch's fused CPU kernel splits one call into B·H·(query blocks) items across every intra-op thread, each
# added thread contributing this share of a core (fitted: ``benchmarks/bench_limit.py --fit`` on the 1- and 2-thread
# tables limit_tables/omp_*.txt, rows of 1,024 and 8,192 at low load, RESULTS.md "native's threads"; was 0.41; the mask
# is built by element-wise ops split the same way).
_THREAD_EFFICIENCY = 0.74
# Other modes than a float32 forward (bfloat16, with a backward): ``bench_limit.py --fit ... --modes`` on the six 1K
# tables benchmarks/limit_tables/modes_*.txt; with a core taken (busy): ``--fit ... --busy-factors`` on busy_omp_q2.txt
# (RESULTS.md, issue 15, "bfloat16 and backward in the estimates", "Estimates that see a taken core"); bfloat16 on a
# CPU without AMX tiles (the _no_amx factors): --fit ... --modes on limit_tables/s9_q1.txt and s9_q2.txt, an AMD EPYC
# (RESULTS.md, issue 15, "bfloat16 on a CPU without AMX").
# busy 1.95 -> 1.52: refitted with blocksparse's busy factors on every saved --busy table of both CPUs (RESULTS.md,
# issue 15, "Busy factors from every busy table"; the measured median slowdown of its forward cells: 1.74 on rows of
# 1K, 1.65 on rows of 8K).
MODES = ModeFactors(
    bf16=0.98,
    backward=3.57,
    bf16_backward=4.47,
    busy=1.52,
    busy_backward=3.07,
    bf16_no_amx=1.0,
    bf16_backward_no_amx=16.9,
)
# A call run as several calls without a mask (``_split_prefix``, ``_split_chunks``, ``_split_padded``,
# ``_split_window``) while other processes hold cores: each of its calls ends in a wait for its threads, and its small
# ops (reversals, merges, copies) run on every thread too. The forward's busy factor of such a call: the median busy /
# idle slowdown of the seven split cells of limit_tables/s43b_busy_8k2_fwd.txt (rows of 8,192, float32, two threads,
# busy phases timed once the load reading has settled, splits on the free cores: 1.60-1.97 against 1.53-1.73 for one
# SDPA call; RESULTS.md, issue 15, "A split's calls on the free cores"). Was 2.12, the same median of
# s42_busy_8k2_fwd.txt, whose busy phases ran their first calls on both cores; without a factor "auto" had kept
# right-padded rows on the padded split under a taken core, 1.22x native's busy time.
_SPLIT_BUSY = 1.80
# bfloat16 with ONE query (a decoding step's forward) on a CPU without AMX tiles: torch's CPU kernel takes 4-7x its
# float32 time there at 4,096 keys (1.0-2.0 ms against 0.2-0.4 ms, H = 4: the AMD EPYC's 1K tables s19-s25) and 2.6x at
# 32,768 (s22_8k2_bf16), while 8 or 16 queries run at float32's time; the Xeon's tables read that bfloat16 call at
# float32's time or less. A charge per key and head of such a call on the CPU (not measured on other devices), per CPU
# kind (``_common.per_cpu_kind``), fitted by a grid on the EPYC's saved tables (RESULTS.md, issue 15, "SDPA's single
# bfloat16 query").
_BF16_ONE_QUERY_KEY_COSTS = (0.0, 2500.0)
_BF16_ONE_QUERY_KEY_COST = per_cpu_kind(_BF16_ONE_QUERY_KEY_COSTS)
# A bfloat16 pair in the backward's share of the estimate (``_common.pair_width``; the forward's share and float32 at
# ``_EXTRA_PAIR_WIDTH``), per CPU kind: torch's bfloat16 SDPA backward at small heads costs more per pair than
# float32's shape of the width says (at D = 16 on rows of 256, documents of ~60 tokens: 34.9 ms against `native`'s
# 19.3 on the Xeon), fitted by benchmarks/bench_head_dim.py --fit on each CPU's bfloat16 head-size tables (RESULTS.md,
# issue 15, "SDPA's bfloat16 backward at small heads").
_EXTRA_BF16_PAIR_WIDTHS = (192.0, 128.0)
_EXTRA_BF16_PAIR_WIDTH = per_cpu_kind(_EXTRA_BF16_PAIR_WIDTHS)
# The same for the forward's bfloat16 pairs: on a CPU with AMX tiles torch's bfloat16 forward runs its products on
# them, and its time grows less with the head than float32's (rows of 256 and 1,024, H = 4: 1.25-1.6x from D = 64 to
# 128, where _EXTRA_PAIR_WIDTH makes 1.9x); elsewhere float32's. Fitted by benchmarks/bench_head_dim.py --fit on the
# Xeon's bfloat16 head-size table (RESULTS.md, issue 15, "Head sizes on the tiles").
_EXTRA_BF16_FORWARD_PAIR_WIDTHS = (192.0, _EXTRA_PAIR_WIDTH)
_EXTRA_BF16_FORWARD_PAIR_WIDTH = per_cpu_kind(_EXTRA_BF16_FORWARD_PAIR_WIDTHS)
CPU_KIND_VALUES = {  # set by the CPU's kind (per_cpu_kind)
    "_BF16_ONE_QUERY_KEY_COST": _BF16_ONE_QUERY_KEY_COSTS,
    "_EXTRA_BF16_PAIR_WIDTH": _EXTRA_BF16_PAIR_WIDTHS,
    "_EXTRA_BF16_FORWARD_PAIR_WIDTH": _EXTRA_BF16_FORWARD_PAIR_WIDTHS,
}
_CACHED_MASK_BYTES = 32 << 20  # a spec's additive mask up to this size is kept with its plans (the layers share it)


def run(call: AttentionCall) -> torch.Tensor:
    """SDPA with the call's dense bool mask (O(B·Q·K) for a spec), ``is_causal`` where it is exact. On CPU without a
    gradient it uses ``backends._workers.region_threads`` intra-op threads: torch's count, fewer only while other
    processes hold cores and the call is small (then it does not wait for a taken core). For a split
    (``_split_parts``) that size is the work its calls compute together, not the dense call's: with one of two cores
    busy, windows of 512 and 1,024 on rows of 8,192 slowed 1.74-1.77x, where on both threads they had slowed
    2.06-2.15x and unmasked causal SDPA on the row 1.60x (RESULTS.md, issue 15, "A split's calls on the free cores").
    With a gradient the threads are torch's, as stock SDPA's: autograd runs the backward on all of them anyway, and a
    forward on the free cores before it measured slower under contention than both on all (rows of 1K, causal,
    forward + backward: 4.5x busy / idle against stock SDPA's 2.3x; RESULTS.md, issue 15). The fused splits
    (``_FusedParts``) are the exception: they run their own backward, so both it and their forward take the region
    of the split's work (rows of 1,024 with a backward under a busy core: padded rows, a window of 512 and prefix-LM
    4.6-6.7x -> 2.0-2.6x, unmasked SDPA 2.5-4.0x)."""
    if call.device_type != "cpu" or call.needs_grad:
        return _run(call)
    with _workers.all_threads(_split_work(call)):
        return _run(call)


# Whole rows are read from a spec only past this many keys: up to it SDPA's causal call computes every pair anyway
# (``_common.sdpa_pairs``), a row's dense mask is small, and "auto"'s stock rule, which runs this backend on such rows
# as stock SDPA without planning, would pay for the plan.
_WHOLE_ROWS_MIN_KEYS = 256


def _unmasked_rule(call: AttentionCall) -> str | None:
    """How SDPA runs the call without a mask: ``"none"`` (every query sees every key: no mask, ``full()``, a decoding
    step's one causal query), ``"causal"`` (``is_causal``: a plain ``causal()`` with ``Q == K``), or ``None`` (it needs
    one). Also a spec that allows, at the call's shape, what ``causal()`` or ``full()`` would
    (``_common.whole_row_rule``: every row one document of all its tokens, padding that pads nothing), read from its
    varlen plan where that is built or cheap to build: without it one causal document of 8,192 tokens built a dense
    mask and ran 471 ms where ``is_causal`` took 138 (two threads, H = 4, D = 64). ``None`` with score modifiers:
    ``run`` then passes the mask in their float bias (``_run_with_bias``), and the estimate and the scratch say so."""
    if call.score_mods:
        return None
    if call.masks_no_key:
        return "none"
    if call.is_plain_causal:
        return "causal"
    if not isinstance(call.mask, MaskSpec) or call.positions_given or call.kv_len <= _WHOLE_ROWS_MIN_KEYS:
        return None
    if active_transforms():  # the plan reads host data, which a functorch transform's tensors do not hold
        return None
    rule = _common.whole_row_rule(call)
    return "none" if rule == "full" else rule


def _run(call: AttentionCall) -> torch.Tensor:
    sdpa_kwargs = {"scale": call.scale}
    if call.heads != call.kv_heads:
        sdpa_kwargs["enable_gqa"] = True
    if call.dropout_p > 0:
        sdpa_kwargs["dropout_p"] = call.dropout_p
    if call.score_mods:
        return _run_with_bias(call, sdpa_kwargs)
    if (rule := _unmasked_rule(call)) is not None:
        # is_causal is top-left aligned: only used when Q == K, where both alignments agree.
        causal = rule == "causal"
        if causal:
            out = F.scaled_dot_product_attention(call.q, call.k, call.v, is_causal=True, **sdpa_kwargs)
        else:
            out = _grouped(call, call.q, None, sdpa_kwargs)
        return nan_rows_restored(out, call.q, call.k, causal, call.scale)
    if _splits_causal(call):
        return _split_causal(call)
    if _splits_prefix(call):
        return _split_prefix(call)
    if (size := _chunk_split(call)) is not None:
        return _split_chunks(call, size, sdpa_kwargs)
    if (runs := _padded_runs(call)) is not None:
        return _split_padded(call, runs, sdpa_kwargs)
    if (window := _window_split(call)) is not None:
        return _split_window(call, window)
    if isinstance(call.mask, MaskSpec):
        bias, empty, left = _spec_mask(call)
        q = _query(call, empty if left is None else left[0])
        out = _grouped(call, q, bias, sdpa_kwargs)
        if left is not None:
            return _zeroed_if_nan(out, left)
        if empty is None:
            return out
        # exactly 0, whatever the row computed; in place when no graph holds the output (no second (B, H, Q, Dv))
        return zero_rows(out, empty)
    allowed, _ = dense_mask(call)
    has_key = rows_with_keys(allowed)
    empty_rows = not bool(has_key.all())
    if empty_rows:
        # Let empty rows attend to every key (finite, NaN-free), then zero their output: their gradient is then 0 too.
        allowed = fold(torch.logical_or, [allowed, ~has_key])
    q = _query(call, ~has_key if empty_rows else None)
    out = _grouped(call, q, allowed, sdpa_kwargs)
    return zero_rows(out, ~has_key) if empty_rows else out


# Grouped-query attention with few queries (a decoding step, a short chunk) on CPU: torch's kernel with enable_gqa
# reads each key and value once per QUERY head, so a step is memory-bound H / Hkv times over (B = 8, K = 4,096,
# H = 32, Hkv = 8, D = 128, two threads: 31 ms, where the same heads without GQA, H = Hkv = 8, took 11.9 ms). Folding
# each key head's query heads into its queries, ``(B, Hkv, rep·Q, D)`` against ``(B, Hkv, K, D)``, reads them once:
# the same scores and softmax per (query head, query) in one call (RESULTS.md, issue 15, "Decoding steps take the
# stock path, and grouped queries in one call"). Up to this many queries per head, where a mask repeated per query
# head stays small, and past this many keys: on rows of at most 256 keys "auto"'s stock rule runs this backend as
# stock SDPA, bit for bit, and a fold there saves little (its rounding differs in the last bits).
_FOLD_MAX_QUERIES = 16
_FOLD_MIN_KEYS = 257
_FOLD_MAX_MASK_BYTES = 64 << 20  # a mask repeated per query head beyond this: not folded (rep times the memory)


def _folds(call: AttentionCall, mask: torch.Tensor | None) -> bool:
    """Whether ``_grouped`` folds the query heads of ``call`` (with ``mask``, ``None`` for none)."""
    if call.heads == call.kv_heads or call.device_type != "cpu" or call.dropout_p:
        return False
    short = call.q_len <= _FOLD_MAX_QUERIES and call.kv_len >= _FOLD_MIN_KEYS
    if not short or mask is None:
        return short
    repeated = mask.shape[0] * call.heads * call.q_len * call.kv_len * mask.element_size()
    return mask.shape[1] == 1 and (call.q_len == 1 or repeated <= _FOLD_MAX_MASK_BYTES)


def _grouped(call: AttentionCall, q: torch.Tensor, mask: torch.Tensor | None, sdpa_kwargs: dict) -> torch.Tensor:
    """SDPA of ``q`` ``(B, H, Q, D)`` against the call's keys and values with ``mask`` (bool or additive,
    ``(B or 1, 1 or H, Q, K)``, or None), ``(B, H, Q, Dv)``: on CPU with grouped query heads, at most
    ``_FOLD_MAX_QUERIES`` queries against at least ``_FOLD_MIN_KEYS`` keys, one mask for every head and no dropout
    (``_folds``), as one call of ``(B, Hkv, rep·Q, D)`` queries without ``enable_gqa`` (the mask repeated per query
    head: a view for one query, else O(B·rep·Q·K)); else SDPA as given."""
    if not _folds(call, mask):
        return F.scaled_dot_product_attention(q, call.k, call.v, attn_mask=mask, **sdpa_kwargs)
    rep = call.heads // call.kv_heads
    B, _, Q, D = q.shape
    folded = q.reshape(B, call.kv_heads, rep * Q, D)  # query head h = key head (h // rep), slot h % rep
    if mask is not None:  # one query: a view (stride 0 across the query heads); more: a copy (_FOLD_MAX_MASK_BYTES)
        rows = mask.shape[0]
        mask = mask.unsqueeze(2).expand(rows, 1, rep, Q, call.kv_len).reshape(rows, 1, rep * Q, call.kv_len)
    kwargs = {name: value for name, value in sdpa_kwargs.items() if name != "enable_gqa"}
    out = F.scaled_dot_product_attention(folded, call.k, call.v, attn_mask=mask, **kwargs)
    return out.reshape(B, call.heads, Q, call.value_dim)


def _query(call: AttentionCall, empty: torch.Tensor | None) -> torch.Tensor:
    """The query the kernel reads: with a gradient and rows with no allowed key (``empty``), those rows at 0 where
    ``q`` holds a non-finite value (``_dense.zero_query_rows``): the kernel's backward reads their scores even where
    their output is zeroed, and a NaN there would reach every key and value gradient."""
    return zero_query_rows(call.q, empty) if empty is not None and call.needs_grad else call.q


# Forward-only float32 / float64 on CPU: a bottom-right ``causal()`` with fewer queries than keys (a decoding step of
# several tokens, a chunk of a prefill after a cache) as two calls of the fused CPU kernel, which returns the
# log-sum-exp: every query sees the first ``K - Q`` keys (unmasked), and the last ``Q`` keys are a top-left
# ``is_causal`` block; the two are merged by their log-sum-exp. No mask is built or read, so the call costs what its
# pairs cost (the bool-mask call was measured 1.85-2.7x unmasked SDPA on 8 and 16 queries against 32K keys).
# Half precision keeps the masked call (each part would round its output before the merge); so does a call that
# records a gradient (the log-sum-exp output has no derivative).
_SPLIT_DTYPES = (torch.float32, torch.float64)


def _flash_cpu():
    """PyTorch's fused CPU flash-attention op, returning ``(output, logsumexp)``, or ``None`` where absent; called
    through ``_flash_forward``, which gives it q, k and v with a contiguous last dimension (``unit_stride``)."""
    return _flash_forward if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") else None


def _flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused CPU op on ``q``, ``k``, ``v`` (each copied only where its last dimension is strided)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*map(unit_stride, (q, k, v)), **kwargs)


def _flash_backward(grad, q, k, v, out, lse, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused CPU op's backward, its tensors with a contiguous last dimension (``unit_stride``)."""
    tensors = map(unit_stride, (grad, q, k, v, out, lse))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(*tensors, *args, **kwargs)


def _splits_causal(call: AttentionCall) -> bool:
    """Whether ``run`` takes ``_split_causal`` for ``call`` (see the comment above ``_SPLIT_DTYPES``)."""
    if type(call.mask) is not Causal or call.positions_given or not 1 < call.q_len < call.kv_len:
        return False
    if call.device_type != "cpu" or call.q.dtype not in _SPLIT_DTYPES or call.dropout_p or call.score_mods:
        return False
    if call.batch == 0 or not call.head_dim == call.value_dim > 0:  # the fused op takes one head size, no empty batch
        return False
    return not call.needs_grad and _flash_cpu() is not None


def _masked_key_span(call: AttentionCall) -> slice:
    """Where a denied key may be read: in a split, only the ``is_causal`` parts' keys (every query sees the rest: the
    first ``K - Q`` keys of a bottom-right causal call, a prefix-LM row's prefix); otherwise any key (the dense kernel
    multiplies denied values by 0)."""
    if _splits_causal(call):
        return slice(call.kv_len - call.q_len, None)
    if _splits_prefix(call):
        return slice(min(prefix for _, _, prefix in _prefix_runs(call)), None)
    if (runs := _padded_runs(call)) is not None:  # only the is_causal blocks read a denied key: none under full()
        if not _common.padded_cut(call)[0].causal:
            return slice(0, 0)
        return slice(min(run[4] for run in runs), max(run[4] + run[5] for run in runs))
    return slice(None)


def _split_causal(call: AttentionCall) -> torch.Tensor:
    """Bottom-right causal attention of ``Q < K`` queries as an unmasked part (keys ``[0, K - Q)``, seen by every
    query) and an ``is_causal`` part (keys ``[K - Q, K)``: query ``i`` sees ``K - Q + j`` for ``j <= i``), merged by
    log-sum-exp. ``(B, H, Q, Dv)``; O(B·H·Q·Dv) memory beyond the output, no mask."""
    flash, cut, k, v = _flash_cpu(), call.kv_len - call.q_len, call.k, call.v
    if _folds(call, None):
        return _split_causal_grouped(call, flash, cut)
    parts = []
    for keys, values, causal in ((k[:, :, :cut], v[:, :, :cut], False), (k[:, :, cut:], v[:, :, cut:], True)):
        out, lse = flash(call.q, keys, values, is_causal=causal, scale=call.scale)
        # a row whose every score in the part is NaN: NaN there (_common.all_nan_rows), which the merge carries
        parts.append(nan_rows_restored_lse(out, lse, call.q, keys, causal, call.scale))
    (head, head_lse), (tail, tail_lse) = parts
    # weights exp(lse_part - lse_all): the tail's is sigmoid(tail_lse - head_lse), the head's 1 minus it
    return torch.lerp(head, tail, torch.sigmoid(tail_lse - head_lse).unsqueeze(-1))


def _split_causal_grouped(call: AttentionCall, flash, cut: int) -> torch.Tensor:
    """``_split_causal`` with each key head's query heads folded into its queries (see ``_grouped``): the unmasked
    part as it is, the last ``Q`` keys under a ``(rep·Q, Q)`` additive causal mask (``is_causal`` would read the
    folded rows as later queries), merged by log-sum-exp, then unfolded. O(B·H·Q·Dv) beyond the output."""
    rep, Q = call.heads // call.kv_heads, call.q_len
    q = call.q.reshape(call.batch, call.kv_heads, rep * Q, call.head_dim)
    k, v = call.k, call.v
    head, head_lse = flash(q, k[:, :, :cut], v[:, :, :cut], is_causal=False, scale=call.scale)
    head, head_lse = nan_rows_restored_lse(head, head_lse, q, k[:, :, :cut], False, call.scale)
    later = torch.ones(Q, Q, dtype=torch.bool, device=q.device).triu(1).repeat(rep, 1)  # (rep·Q, Q)
    bias = torch.zeros(rep * Q, Q, dtype=q.dtype, device=q.device).masked_fill(later, float("-inf"))
    tail, tail_lse = flash(q, k[:, :, cut:], v[:, :, cut:], is_causal=False, attn_mask=bias, scale=call.scale)
    out = torch.lerp(head, tail, torch.sigmoid(tail_lse - head_lse).unsqueeze(-1))
    return out.reshape(call.batch, call.heads, Q, call.value_dim)


# On CPU, Q == K past ``_WHOLE_ROWS_MIN_KEYS`` keys, one key head per query head: a ``prefix_lm`` row (query ``i``
# sees key ``j`` when ``j <= i`` or ``j < P``) as two calls of the fused CPU kernel with no mask: every query against
# the prefix's keys ``[0, P)``, unmasked, and the queries from ``P`` on against keys ``[P, K)`` under ``is_causal``;
# the queries from ``P`` on merge both parts by their log-sum-exp (in float32 for half precision, rounded once: on rows
# of 1,000 the mean error against float64 was 1.04x the masked call's in bfloat16 and float16, the largest the same).
# The masked call computes every pair and builds an O(B·Q·K) mask; the split computes ``K·P`` pairs plus the causal
# block's (rows of 8,192 with a prefix of 2,048, H = 4, D = 64, float32: 1.07-1.10x the pair-proportional ideal at one
# and two threads, forward and with a backward, where blocksparse took 1.23-1.34x; RESULTS.md, issue 15, "Prefix-LM as
# unmasked calls"). Rows of the batch with the same prefix run together (views). With a gradient the backward is the
# fused kernel's backward of each part given the MERGED output and log-sum-exp: a softmax over the union of both
# parts' keys has the score gradient ``p_ij (dO_i·v_j - dO_i·O_i)`` with ``p_ij = exp(s_ij - lse_i)`` over the union,
# which is what each part's backward computes from the merged ``O`` and ``lse``; the query gradient is the sum of the
# parts'. Grouped query heads keep the masked call (the fused op takes no ``enable_gqa``).
_FUSED_SPLIT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # the prefix and window splits


def _splits_prefix(call: AttentionCall) -> bool:
    """Whether ``run`` takes ``_split_prefix`` for ``call`` (see the comment above)."""
    if type(call.mask) is not PrefixLM or call.positions_given or call.q_len != call.kv_len:
        return False
    if call.kv_len <= _WHOLE_ROWS_MIN_KEYS or call.device_type != "cpu" or call.q.dtype not in _FUSED_SPLIT_DTYPES:
        return False
    if call.dropout_p or call.score_mods or call.heads != call.kv_heads or not call.head_dim == call.value_dim > 0:
        return False
    return call.batch > 0 and not active_transforms() and _flash_cpu() is not None


def _prefix_runs(call: AttentionCall) -> tuple[tuple[int, int, int], ...]:
    """``(first row, end row, prefix)`` of each run of consecutive batch rows whose prefix, clamped to ``[0, K]``
    (and 0 for 1: the same pairs as ``causal()``), is the same. Cached with the spec's plans."""

    def runs(c: AttentionCall) -> tuple[tuple[int, int, int], ...]:
        lens = c.mask.prefix_lens.tolist()
        prefixes = [p if p > 1 else 0 for p in (min(max(int(p), 0), c.kv_len) for p in lens)]
        if len(prefixes) != c.batch:  # one spec row for the batch
            prefixes = prefixes * c.batch
        found, start = [], 0
        for row in range(1, c.batch + 1):
            if row == c.batch or prefixes[row] != prefixes[start]:
                found.append((start, row, prefixes[start]))
                start = row
        return tuple(found)

    return cached(call, "sdpa_prefix_runs", runs)


def _split_prefix(call: AttentionCall) -> torch.Tensor:
    """Prefix-LM attention of ``call`` as unmasked and ``is_causal`` parts merged by log-sum-exp (see the comment
    above ``_splits_prefix``). ``(B, H, Q, Dv)``; O(B·H·Q·Dv) memory beyond the output, no mask."""
    forward = functools.partial(_prefix_rows_forward, runs=_prefix_runs(call), scale=call.scale)
    if call.needs_grad:
        backward = functools.partial(_prefix_rows_backward, runs=_prefix_runs(call), scale=call.scale)
        return _FusedParts.apply(call.q, call.k, call.v, forward, backward, _split_work(call))
    return forward(call.q, call.k, call.v)[0]


def _prefix_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output ``(B, H, Q, Dv)`` and log-sum-exp ``(B, H, Q)`` of rows sharing ``prefix`` (0: causal, ``K``: every
    key), NaN on rows whose every allowed score is NaN (``_common.nan_rows_restored_lse``)."""
    flash, K = _flash_cpu(), k.shape[2]
    if prefix in (0, K):
        out, lse = flash(q, k, v, is_causal=not prefix, scale=scale)
        return nan_rows_restored_lse(out, lse, q, k, not prefix, scale)
    keys, values = k[:, :, :prefix], v[:, :, :prefix]
    out, lse = nan_rows_restored_lse(*flash(q, keys, values, scale=scale), q, keys, False, scale)
    later, keys, values = q[:, :, prefix:], k[:, :, prefix:], v[:, :, prefix:]
    tail, tail_lse = nan_rows_restored_lse(
        *flash(later, keys, values, is_causal=True, scale=scale), later, keys, True, scale
    )
    # views: the merge writes into out and lse (fresh tensors)
    _merged_into(out[:, :, prefix:], lse[:, :, prefix:], tail, tail_lse)
    return out, lse


def _merged_into(out: torch.Tensor, lse: torch.Tensor, other: torch.Tensor, other_lse: torch.Tensor) -> None:
    """Merge a second part's output ``other`` ``(..., Q, Dv)`` and log-sum-exp ``other_lse`` ``(..., Q)`` into ``out``
    and ``lse`` in place: the softmax over the union of both parts' keys (weights ``exp(lse_part - lse_all)``; the
    second's is ``sigmoid(other_lse - lse)``; ``-inf`` for a part with no key gives it weight 0). Half precision
    merges in float32 (the log-sum-exp's dtype) and rounds once."""
    weight = torch.sigmoid(other_lse - lse).unsqueeze(-1)
    if out.dtype == weight.dtype:
        out.lerp_(other, weight)
    else:
        out.copy_(out.float().lerp_(other.float(), weight))
    torch.logaddexp(lse, other_lse, out=lse)


class _FusedParts(torch.autograd.Function):
    """A split into fused-kernel calls with a gradient: ``forward(q, k, v)`` gives the output and its log-sum-exp
    (merged where parts share queries), ``backward(grad, q, k, v, out, lse)`` the q / k / v gradients from each
    part's fused backward given them (a merged softmax's score gradient is what each part's backward computes from
    the merged output and log-sum-exp: see the comment above ``_splits_prefix``). Both run inside
    ``_workers.all_threads(work)``, ``work`` the multiply-adds of the split's calls (``_split_work``)."""

    @staticmethod
    def forward(ctx, q, k, v, forward, backward, work):
        with _workers.all_threads(work):
            out, lse = forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.backward, ctx.work = backward, work
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        with _workers.all_threads(ctx.work):
            return (*ctx.backward(grad, *ctx.saved_tensors), None, None, None)


def _prefix_rows_forward(q, k, v, runs, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``_prefix_forward`` of each run of rows (``_prefix_runs``), the outputs and log-sum-exps joined."""
    parts = [_prefix_forward(q[a:b], k[a:b], v[a:b], prefix, scale) for a, b, prefix in runs]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])


def _prefix_rows_backward(grad, q, k, v, out, lse, runs, scale: float | None):
    """``_prefix_backward`` of each run of rows, the gradients joined."""
    parts = [
        _prefix_backward(grad[a:b], q[a:b], k[a:b], v[a:b], out[a:b], lse[a:b], prefix, scale) for a, b, prefix in runs
    ]
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat([part[i] for part in parts]) for i in range(3))


def _prefix_backward(grad, q, k, v, out, lse, prefix: int, scale: float | None):
    """``(dq, dk, dv)`` of rows sharing ``prefix``, from the merged ``out`` and ``lse`` (see ``_splits_prefix``)."""
    backward, K = _flash_backward, k.shape[2]
    if prefix in (0, K):
        return backward(grad, q, k, v, out, lse, 0.0, not prefix, scale=scale)
    dq, dk_head, dv_head = backward(grad, q, k[:, :, :prefix], v[:, :, :prefix], out, lse, 0.0, False, scale=scale)
    tail = (t[:, :, prefix:] for t in (grad, q, k, v, out, lse))
    dq_tail, dk_tail, dv_tail = backward(*tail, 0.0, True, scale=scale)
    dq[:, :, prefix:] += dq_tail
    return dq, torch.cat([dk_head, dk_tail], 2), torch.cat([dv_head, dv_tail], 2)


# On CPU, Q == K past ``_WHOLE_ROWS_MIN_KEYS`` keys at the default positions: ``causal() & chunked(c)`` (no offsets)
# as ``is_causal`` over each chunk, the chunks of a batch row stacked as views ``(Q // c, H, c, D)`` in one call (the
# last, shorter chunk in one more), no mask; forward and backward through SDPA's own autograd. SDPA's causal call on
# a chunk of 1,024 computes 1.5x its pairs (``_common.sdpa_pairs``) at the fused kernel's rate: in bfloat16 on AMX
# tiles, where the kernel runs 2.8x float32's speed, rows of 8,192 in chunks of 1,024 ran 1.9-2.2x the ideal forward
# against native's 4.2-4.6x (1.78x / 1.99x with a backward); in float32 native stays faster (1.16-1.24x against
# 1.37-1.62x) and the estimates keep it (RESULTS.md, issue 15, "Chunks as stacked causal calls"). Chunks of fewer than
# ``_CHUNK_MIN`` keys keep the masked call: up to 512 keys the causal call computes every pair, and on rows of 1,024 in
# chunks of 128 the stacked calls ran 1.6x native's time forward in float32 and 2.0x with a backward in bfloat16 where
# the estimates picked them.
_CHUNK_MIN = 512


def _chunk_split(call: AttentionCall) -> int | None:
    """The chunk size ``c`` where ``run`` takes ``_split_chunks`` for ``call`` (see the comment above), else None."""
    spec = call.mask
    if type(spec) is not And or len(spec.parts) != 2 or {type(p) for p in spec.parts} != {Causal, Chunked}:
        return None
    size = next(p for p in spec.parts if type(p) is Chunked).size
    if any(type(p) is Chunked and p.offsets is not None for p in spec.parts) or not _CHUNK_MIN <= size < call.q_len:
        return None
    if call.positions_given or call.q_len != call.kv_len or call.kv_len <= _WHOLE_ROWS_MIN_KEYS:
        return None
    if call.device_type != "cpu" or call.dropout_p or call.score_mods or call.batch == 0:
        return None
    return None if active_transforms() else size


def _stacked(t: torch.Tensor, start: int, count: int, size: int, step: int, row: int) -> torch.Tensor:
    """Row ``row`` of ``t`` ``(B, H, L, D)``: ``count`` blocks of ``size`` tokens, the first at ``start``, one every
    ``step``, as a view ``(count, H, size, D)``."""
    return t[row, :, start : start + count * step].unflatten(1, (count, step))[:, :, :size].transpose(0, 1)


def _split_chunks(call: AttentionCall, size: int, sdpa_kwargs: dict) -> torch.Tensor:
    """``causal() & chunked(size)`` as ``is_causal`` SDPA on each chunk, one call per batch row over its whole chunks
    stacked as views and one over the last, shorter chunk (see the comment above ``_chunk_split``). ``(B, H, Q, Dv)``;
    no mask, one copy of the output to assemble it."""
    H, L, Dv = call.heads, call.q_len, call.value_dim
    whole = L // size * size
    rows = []
    for b in range(call.batch):
        parts = []
        if whole:
            q, k, v = (_stacked(t, 0, whole // size, size, size, b) for t in (call.q, call.k, call.v))  # views
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **sdpa_kwargs)  # (n, H, size, Dv)
            parts.append(out.transpose(0, 1).reshape(H, whole, Dv))
        if whole < L:
            q, k, v = call.q[b : b + 1, :, whole:], call.k[b : b + 1, :, whole:], call.v[b : b + 1, :, whole:]
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **sdpa_kwargs)
            parts.append(nan_rows_restored(out, q, k, True, call.scale)[0])
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return torch.stack(rows)


# On CPU, Q == K past ``_WHOLE_ROWS_MIN_KEYS`` keys at the default positions, one key head per query head: a causal
# sliding window of ``W`` keys (``sliding_window(W)``, alone or with ``causal()``) as calls of the fused CPU kernel
# without a mask. The row is cut into blocks of ``W`` from its end (a shorter first block at its start); a query sees
# its own block's keys up to itself (an ``is_causal`` call over each row's blocks stacked as views) and the previous
# block's keys after its own offset there (a strictly upper triangle: ``is_causal`` with the query's offset shifted
# by one, on q, k and v reversed along the tokens, the previous blocks stacked as views); the two parts are merged by
# their log-sum-exp (in float32 for half precision, rounded once), and the backward is each part's fused backward
# given the merged output and log-sum-exp (``_FusedParts``, as for prefix-LM). Every block computes about twice its
# window's pairs in blocks of ``W`` (``_common.sdpa_pairs``), at the kernel's rate: on AMX tiles in bfloat16, where
# `native` computes in float32 and ran windows of 512-4,096 on rows of 8,192 at 3.1-4.2x the pair-proportional ideal
# forward, the split ran a window of 4,096 at 1.24-1.34x and one of 1,024 at 2.46x (RESULTS.md, issue 15, "Padded
# rows and windows as unmasked calls"). From ``_WINDOW_MIN`` keys: below it a causal call computes every pair. The
# reversed copies of the queries that have a previous block, of the keys and values before the last block and of the
# second part's output are O(B·H·L·D) each.
_WINDOW_MIN = 512
_WINDOW_COPIES = 8  # elements copied per query row element: q, k, v and the second part reversed, the merge


def _window_split(call: AttentionCall) -> int | None:
    """The window ``W`` where ``run`` takes ``_split_window`` for ``call`` (see the comment above), else None."""
    spec = call.mask
    parts = spec.parts if type(spec) is And else (spec,)
    windows = [p.window for p in parts if type(p) is SlidingWindow]
    if len(windows) != 1 or any(type(p) not in (Causal, SlidingWindow) for p in parts):
        return None
    if not _WINDOW_MIN <= windows[0] < call.q_len or call.positions_given or call.q_len != call.kv_len:
        return None
    if call.device_type != "cpu" or call.q.dtype not in _FUSED_SPLIT_DTYPES or call.dropout_p or call.score_mods:
        return None
    if call.heads != call.kv_heads or not call.head_dim == call.value_dim > 0 or call.batch == 0:
        return None
    return None if active_transforms() or _flash_cpu() is None else windows[0]


def _split_window(call: AttentionCall, window: int) -> torch.Tensor:
    """A causal sliding window as unmasked fused calls merged by log-sum-exp (see the comment above
    ``_window_split``). ``(B, H, L, Dv)``."""
    forward = functools.partial(_window_forward, window=window, scale=call.scale)
    if call.needs_grad:
        backward = functools.partial(_window_backward, window=window, scale=call.scale)
        return _FusedParts.apply(call.q, call.k, call.v, forward, backward, _split_work(call))
    return forward(call.q, call.k, call.v)[0]


def _window_blocks(length: int, window: int) -> tuple[int, int]:
    """``(first, n)``: the shorter first block's length (0 for none) and how many whole blocks of ``window`` follow."""
    return length % window, length // window


def _window_forward(q, k, v, window: int, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The output ``(B, H, L, Dv)`` and log-sum-exp ``(B, H, L)`` of a causal window of ``window`` keys: the own
    block's ``is_causal`` part, the previous block's on the reversed rows, merged (see ``_window_split``)."""
    flash, (B, H, L, _), W = _flash_cpu(), q.shape, window
    first, n = _window_blocks(L, W)
    out = q.new_empty(B, H, L, v.shape[-1])
    lse = q.new_empty(B, H, L, dtype=torch.promote_types(q.dtype, torch.float32))  # the kernel's log-sum-exp dtype
    if first:
        part = flash(q[:, :, :first], k[:, :, :first], v[:, :, :first], is_causal=True, scale=scale)
        out[:, :, :first], lse[:, :, :first] = nan_rows_restored_lse(
            *part, q[:, :, :first], k[:, :, :first], True, scale
        )
    for b in range(B):
        qs, ks, vs = (_stacked(t, first, n, W, W, b) for t in (q, k, v))
        part = nan_rows_restored_lse(*flash(qs, ks, vs, is_causal=True, scale=scale), qs, ks, True, scale)
        out[b, :, first:] = part[0].transpose(0, 1).flatten(1, 2)
        lse[b, :, first:] = part[1].transpose(0, 1).flatten(1, 2)
    begin = _window_previous_start(L, W)  # the queries that have a previous block: merged there only
    _merged_into(out[:, :, begin:], lse[:, :, begin:], *_window_previous(q, k, v, W, scale))
    return out, lse


def _window_previous_start(length: int, window: int) -> int:
    """The first query with a previous block: the second block's first (the first block's, when it is shorter)."""
    first, _ = _window_blocks(length, window)
    return first if first else window


def _window_reversed(q, k, v, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The queries from ``_window_previous_start`` on and the keys and values before the last block, each reversed
    along the tokens (copies, O(B·H·L·D)): reversed query block ``j`` (offsets ``0 .. W - 1``) is
    ``q[..., j * W : (j + 1) * W]`` of the first, its previous block's keys the same range of the others (the last
    one ``first`` long where the row's first block is shorter)."""
    L, W = q.shape[2], window
    begin = _window_previous_start(L, W)
    return q[:, :, begin:].flip(2), k[:, :, : L - W].flip(2), v[:, :, : L - W].flip(2)


def _previous_queries(t: torch.Tensor, n: int, window: int, row: int) -> torch.Tensor:
    """Row ``row`` of reversed queries (or their output, gradient) ``t``: the first ``n - 1`` blocks of ``window`` at
    offsets ``1 .. window - 1`` (those whose previous block is whole), as a view ``(n - 1, H, window - 1, D)``."""
    return _stacked(t, 0, n - 1, window, window, row)[:, :, 1:]


def _window_previous(q, k, v, window: int, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query from ``_window_previous_start`` on against the keys of its previous block after its own offset
    there: ``(B, H, L - start, Dv)`` and its log-sum-exp (0 and ``-inf`` for each block's last query, which sees
    none). On the rows reversed (``_window_reversed``) a block holds those queries at offsets ``1 .. W - 1`` and the
    previous block their keys at offsets ``0 .. W - 2``, query offset ``r + 1`` seeing key offsets ``<= r``:
    ``is_causal``."""
    flash, (B, H, L, _), W = _flash_cpu(), q.shape, window
    first, n = _window_blocks(L, W)
    qr, kr, vr = _window_reversed(q, k, v, W)
    out = q.new_empty(B, H, qr.shape[2], v.shape[-1])
    lse = q.new_empty(B, H, qr.shape[2], dtype=torch.promote_types(q.dtype, torch.float32))
    out[:, :, ::W], lse[:, :, ::W] = 0.0, -math.inf  # each block's offset 0: no key
    for b in range(B):
        if n > 1:
            qs, ks, vs = _previous_queries(qr, n, W, b), *(_stacked(t, 0, n - 1, W - 1, W, b) for t in (kr, vr))
            part = nan_rows_restored_lse(*flash(qs, ks, vs, is_causal=True, scale=scale), qs, ks, True, scale)
            _previous_queries(out, n, W, b).copy_(part[0])
            lse[b, :, : (n - 1) * W].unflatten(1, (n - 1, W))[:, :, 1:].copy_(part[1].transpose(0, 1))
    if first:  # the last reversed block against the row's first, shorter block
        at = slice((n - 1) * W + 1, n * W)
        qs, ks, vs = qr[:, :, at], kr[:, :, (n - 1) * W :], vr[:, :, (n - 1) * W :]
        part = nan_rows_restored_lse(*flash(qs, ks, vs, is_causal=True, scale=scale), qs, ks, True, scale)
        out[:, :, at], lse[:, :, at] = part
    return out.flip(2), lse.flip(2)


def _window_backward(grad, q, k, v, out, lse, window: int, scale: float | None):
    """``(dq, dk, dv)`` of ``_window_forward`` from the merged ``out`` and ``lse``: the own block's and the previous
    block's fused backward (see ``_splits_prefix`` for why the merged output serves each part)."""
    backward = _flash_backward
    B, L, W = q.shape[0], q.shape[2], window
    first, n = _window_blocks(L, W)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if first:
        at = (slice(None), slice(None), slice(None, first))
        parts = backward(grad[at], q[at], k[at], v[at], out[at], lse[at], 0.0, True, scale=scale)
        for whole, part in zip((dq, dk, dv), parts, strict=True):
            whole[at] = part
    for b in range(B):
        args = [_stacked(t, first, n, W, W, b) for t in (grad, q, k, v, out)]
        lse_b = lse[b, :, first:].unflatten(1, (n, W)).transpose(0, 1)
        parts = backward(*args, lse_b, 0.0, True, scale=scale)
        for whole, part in zip((dq, dk, dv), parts, strict=True):
            whole[b, :, first:] = part.transpose(0, 1).flatten(1, 2)
    begin = _window_previous_start(L, W)
    qr, kr, vr = _window_reversed(q, k, v, W)
    gr, outr, lser = (t[:, :, begin:].flip(2) for t in (grad, out, lse))
    dqr, dkr, dvr = torch.empty_like(qr), torch.zeros_like(kr), torch.zeros_like(vr)
    dqr[:, :, ::W] = 0.0  # each block's last query sees no key of the previous block
    for b in range(B):
        if n > 1:
            queries = [_previous_queries(t, n, W, b) for t in (gr, qr)]
            keys = [_stacked(t, 0, n - 1, W - 1, W, b) for t in (kr, vr)]
            lse_b = lser[b, :, : (n - 1) * W].unflatten(1, (n - 1, W))[:, :, 1:].transpose(0, 1)
            parts = backward(*queries, *keys, _previous_queries(outr, n, W, b), lse_b, 0.0, True, scale=scale)
            _previous_queries(dqr, n, W, b).copy_(parts[0])
            _stacked(dkr, 0, n - 1, W - 1, W, b).copy_(parts[1])
            _stacked(dvr, 0, n - 1, W - 1, W, b).copy_(parts[2])
    if first:
        at, tail = slice((n - 1) * W + 1, n * W), slice((n - 1) * W, None)
        parts = backward(
            gr[:, :, at],
            qr[:, :, at],
            kr[:, :, tail],
            vr[:, :, tail],
            outr[:, :, at],
            lser[:, :, at],
            0.0,
            True,
            scale=scale,
        )
        dqr[:, :, at], dkr[:, :, tail], dvr[:, :, tail] = parts
    dq[:, :, begin:] += dqr.flip(2)
    dk[:, :, : L - W] += dkr.flip(2)
    dv[:, :, : L - W] += dvr.flip(2)
    return dq, dk, dv


# On CPU, Q == K past ``_WHOLE_ROWS_MIN_KEYS`` keys at the default positions: padded rows, ``[causal() | full()] &
# key_padding(m)`` whose real tokens are one run per row (left, right or both sides padded), as SDPA calls without a
# mask on that run: under ``causal()`` the run's queries are one ``is_causal`` block over its keys and the padding
# queries after it see every key of the run (one unmasked call), under ``full()`` every query of the row sees the run
# (one unmasked call); the padding queries before the run see no key (exactly 0). The parts are disjoint in their
# queries, so nothing is merged: any dtype, grouped query heads through ``enable_gqa``, forward and backward through
# SDPA's own autograd. Consecutive batch rows with the same run share each call (views). The masked call computes
# every pair and builds or reads an O(B·Q·K) mask; `native` computes in float32 what SDPA computes on bfloat16 tiles
# where a CPU has them (right-padded rows of 8,192 in bfloat16: `native` 3.2x the pair-proportional ideal, 1.7x with a
# backward; the split 1.15x and 1.05x; RESULTS.md, issue 15, "Padded rows and windows as unmasked calls").


def _padded_runs(call: AttentionCall) -> tuple[tuple[int, int, int, int, int, int], ...] | None:
    """``(first row, end row, first query, queries, first key, keys)`` of each run of consecutive batch rows with the
    same real run where ``run`` takes ``_split_padded`` (see the comment above), else ``None``: the row's queries that
    see a key and the run's keys (under ``causal()`` the first key is the first query, and the first ``keys`` queries
    are the ``is_causal`` block). Rows with no real token are in no run (a batch with none keeps the masked call, which
    keeps the graph). Cached with the spec's plans; O(B) past the padding's cut (``_common.padded_cut``, O(R·K) once
    per spec and shape)."""
    if not isinstance(call.mask, MaskSpec) or call.positions_given or call.q_len != call.kv_len:
        return None
    if call.kv_len <= _WHOLE_ROWS_MIN_KEYS or call.device_type != "cpu" or call.batch == 0:
        return None
    if call.dropout_p or call.score_mods or call.mask_heads or active_transforms():
        return None
    return cached(call, "sdpa_padded_runs", _build_padded_runs)


def _build_padded_runs(call: AttentionCall) -> tuple[tuple[int, int, int, int, int, int], ...] | None:
    cut = _common.padded_cut(call)
    if cut is None or cut[0].window is not None:
        return None
    segs = cut[1].tolist()  # (row, q_start, q_len, k_start, k_len, offset), at most one a row, rows in order
    if not segs or len({seg[0] for seg in segs}) != len(segs):  # no real token: the masked call keeps the graph
        return None
    found: list[tuple[int, int, int, int, int, int]] = []
    for row, q_start, q_len, k_start, k_len, _ in segs:
        if cut[0].causal and k_start != q_start:  # not the padded cut's form: leave it to the masked call
            return None
        key = (q_start, q_len, k_start, k_len)
        if found and found[-1][1] == row and found[-1][2:] == key:
            found[-1] = (found[-1][0], row + 1, *key)
        else:
            found.append((row, row + 1, *key))
    return tuple(found)


def _split_padded(call: AttentionCall, runs, sdpa_kwargs: dict) -> torch.Tensor:
    """Padded rows as SDPA calls without a mask on each row's real run (see the comment above ``_padded_runs``).
    ``(B, H, Q, Dv)``; no mask, one copy of each part's output into the zeroed output. With a gradient and one key
    head per query head, the fused kernel's forward and backward on each part, writing into whole gradients
    (``_FusedParts``: slices of q, k and v through autograd would each add a whole zeroed gradient)."""
    parts = _padded_parts(runs, _common.padded_cut(call)[0].causal)
    if call.needs_grad and call.heads == call.kv_heads and call.head_dim == call.value_dim and _flash_cpu():
        forward = functools.partial(_padded_forward, parts=parts, scale=call.scale)
        backward = functools.partial(_padded_backward, parts=parts, scale=call.scale)
        return _FusedParts.apply(call.q, call.k, call.v, forward, backward, _split_work(call))
    out = call.q.new_zeros(call.batch, call.heads, call.q_len, call.value_dim)
    for rows, queries, keys, causal in parts:
        q, k, v = call.q[rows, :, queries], call.k[rows, :, keys], call.v[rows, :, keys]
        part = F.scaled_dot_product_attention(q, k, v, is_causal=causal, **sdpa_kwargs)
        out[rows, :, queries] = nan_rows_restored(part, q, k, causal, call.scale)
    return out


def _padded_parts(runs, causal: bool) -> tuple[tuple[slice, slice, slice, bool], ...]:
    """``(rows, queries, keys, is_causal)`` of each call of ``_split_padded`` over ``runs`` (``_padded_runs``)."""
    parts = []
    for a, b, q_start, q_len, k_start, k_len in runs:
        rows, keys = slice(a, b), slice(k_start, k_start + k_len)
        if not causal:
            parts.append((rows, slice(q_start, q_start + q_len), keys, False))
            continue
        parts.append((rows, slice(q_start, q_start + k_len), keys, True))
        if q_len > k_len:
            parts.append((rows, slice(q_start + k_len, q_start + q_len), keys, False))
    return tuple(parts)


def _padded_forward(q, k, v, parts, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel on each of ``parts`` (``_padded_parts``): the output (0 where no part has the query) and
    log-sum-exp."""
    flash = _flash_cpu()
    out = q.new_zeros(*q.shape[:3], v.shape[-1])
    lse = q.new_zeros(q.shape[:3], dtype=torch.promote_types(q.dtype, torch.float32))
    for rows, queries, keys, causal in parts:
        qp, kp = q[rows, :, queries], k[rows, :, keys]
        part = flash(qp, kp, v[rows, :, keys], is_causal=causal, scale=scale)
        out[rows, :, queries], lse[rows, :, queries] = nan_rows_restored_lse(*part, qp, kp, causal, scale)
    return out, lse


def _padded_backward(grad, q, k, v, out, lse, parts, scale: float | None):
    """``(dq, dk, dv)`` of ``_padded_forward``: each part's fused backward, written into whole gradients."""
    backward = _flash_backward
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for rows, queries, keys, causal in parts:
        at = (rows, slice(None), queries)
        kp, vp = k[rows, :, keys], v[rows, :, keys]
        part = backward(grad[at], q[at], kp, vp, out[at], lse[at], 0.0, causal, scale=scale)
        dq[at] = part[0]
        dk[rows, :, keys] += part[1]
        dv[rows, :, keys] += part[2]
    return dq, dk, dv


class _SpecMask(NamedTuple):
    """A spec's mask as SDPA takes it: ``bias`` ``(B or 1, 1 or H, Q, K)`` additive in q's dtype (0 where allowed,
    ``-inf`` elsewhere), and ``empty`` ``(B or 1, 1 or H, Q, 1)`` bool, the rows with no allowed key (``None`` when
    there is none, or when the kernel gives such rows exactly 0 itself: ``_kernel_zeroes_empty_rows``). Where
    ``empty`` is given, its rows of ``bias`` are 0 (they see every key: finite, no NaN) and the output is zeroed
    there after the call. ``left``: where the kernel zeroes them, those rows (``empty``'s form) and their flat
    indices in the output's ``(B, H, Q)`` rows (int64, ``(N,)``), else ``None``: a NaN in such a row's query makes
    its scores NaN, not ``-inf``, and the kernel then writes NaN there (``_zeroed_if_nan``)."""

    bias: torch.Tensor
    empty: torch.Tensor | None
    left: tuple[torch.Tensor, torch.Tensor] | None = None


def _spec_mask(call: AttentionCall) -> _SpecMask:
    """The call's ``_SpecMask``, cached with its plans (``_common.cached``: the layers of a model share it) when it
    takes at most ``_CACHED_MASK_BYTES``.

    Additive, as SDPA's fused CPU and CUDA kernels take a mask (they turn a bool one into a float one per call): 0 and
    ``-inf``, exactly what they make of the bool mask, so the same output bit for bit, one conversion per spec instead
    of one per call and layer. Rows with no allowed key: left to the kernel where it zeroes them
    (``_kernel_zeroes_empty_rows``, asked only when there are such rows), else a copy of the mask opens them to every
    key and the output is zeroed there. (``finfo.min`` instead of ``-inf`` gave the same bits but measured ~12% slower
    in torch's CPU kernel: rows of 256 packed documents, 7.75 against 6.78 ms.)"""
    keep = _spec_mask_bytes(call) <= _CACHED_MASK_BYTES
    mask = cached(call, "sdpa_mask", _build_spec_mask) if keep else _build_spec_mask(call)
    if mask.empty is None:
        return mask
    if _kernel_zeroes_empty_rows(call):
        return cached(call, "sdpa_mask_left", lambda c: _left(mask, c)) if keep else _left(mask, call)
    return cached(call, "sdpa_mask_opened", lambda c: _opened(mask)) if keep else _opened(mask)


def _spec_mask_bytes(call: AttentionCall) -> int:
    """Bytes of the call's additive spec mask, ``(B or 1, 1 or H, Q, K)`` in q's dtype."""
    rows = (call.mask.batch_size or 1) * (call.mask_heads or 1)
    return rows * call.q_len * call.kv_len * call.q.element_size()


def _build_spec_mask(call: AttentionCall) -> _SpecMask:
    """The spec's additive mask, ``-inf`` across rows with no allowed key, and those rows (``None`` if none)."""
    allowed, _ = dense_mask(call)  # (B or 1, 1 or H, Q, K)
    has_key = rows_with_keys(allowed)
    return _SpecMask(additive(allowed, call.q.dtype), None if bool(has_key.all()) else ~has_key)


def _left(mask: _SpecMask, call: AttentionCall) -> _SpecMask:
    """``mask`` with its empty rows left to the kernel (``left``: those rows and their flat indices among the
    call's output rows, see ``_SpecMask``)."""
    rows = torch.broadcast_to(mask.empty.squeeze(-1), (call.batch, call.heads, call.q_len))
    return _SpecMask(mask.bias, None, (mask.empty, rows.reshape(-1).nonzero().squeeze(1)))


def _zeroed_if_nan(out: torch.Tensor, left: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``out`` with the rows ``left`` (see ``_SpecMask``), which the kernel zeroed itself unless their query held a
    NaN (then the whole row is NaN), exactly 0 again where one is NaN. Found by the sum of those rows' first elements
    (``take`` at their flat indices, O(empty rows)): on rows of 8 x 256 with a seventh of them empty, right after
    another kernel, 37-39 us where a weighted sum of the whole first column (O(B·H·Q)) took 73-77 us. An output of
    at most ``_WHOLE_SUM_MAX`` elements is summed whole first (one call): finite, no row is NaN. In place when no
    graph records ``out``, else a new tensor (those rows' gradient 0)."""
    empty, rows = left
    if not out.shape[-1]:
        return out
    read = out.detach() if out.requires_grad else out
    if read.numel() <= _WHOLE_SUM_MAX and math.isfinite(float(read.sum())):
        return out  # no NaN anywhere (a non-finite sum may still come from other rows: the rows' own check then)
    if math.isfinite(float(read[..., 0].reshape(-1).take(rows).sum())):
        return out
    return zero_rows(out, empty)


# Outputs of at most this many elements are checked by one sum of the whole output first: one call instead of the
# five of the take above (one row of 16 tokens padded after 10 beside a full one, H = 4, D = 8, one thread: the
# backend's repeated call 68 -> 56 us, the kernel alone 19-24 us).
_WHOLE_SUM_MAX = 1 << 16


def _opened(mask: _SpecMask) -> _SpecMask:
    """``mask`` with its empty rows at 0 (they see every key: finite, NaN-free; their output, and so their gradient,
    is zeroed after the call), in a copy."""
    return _SpecMask(zero_rows(mask.bias.clone(), mask.empty), mask.empty)


def _kernel_zeroes_empty_rows(call: AttentionCall) -> bool:
    """Whether SDPA runs ``call`` (with its spec's additive mask) in torch's fused CPU kernel (``FLASH_ATTENTION`` by
    ``torch._fused_sdp_choice``, which also follows ``torch.nn.attention.sdpa_kernel``) and that kernel, on this
    torch and dtype, gives a row whose keys are all ``-inf`` an output of exactly 0 and a gradient of exactly 0
    (``_probe_empty_rows``, once per dtype). Then no row needs to see every key and be zeroed afterwards: on rows of
    256 packed documents with trailing padding (8 rows, one thread, forward + backward) that saved 4-10%. ``False``
    off CPU, with dropout (the math kernel), under tracing or a functorch transform, and wherever the choice cannot
    be asked."""
    if call.device_type != "cpu" or call.dropout_p > 0 or torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active():  # the probe records its own gradients: not inside torch.func
        return False
    # The choice reads the shapes, strides and dtype of q, k, v and the mask's shape, and follows the flash-attention
    # switch (``sdpa_kernel`` sets it), never a value: one answer per such key for the whole process, so that a fresh
    # spec of a known shape does not ask again (~0.15 ms a call on rows of 8 x 256, bench_small_rows.py), and with the
    # spec's plans per switch, so that a repeated call does not build that key (~4 us).
    flash = torch.backends.cuda.flash_sdp_enabled()
    return cached(call, ("sdpa_kernel_zeroes", flash), lambda c: _known_answer(c, flash))


def _known_answer(call: AttentionCall, flash: bool) -> bool:
    """``_kernel_zeroes_empty_rows``' answer for ``call`` under the flash switch ``flash``, asked once per key."""
    inputs = tuple((t.shape, t.stride()) for t in (call.q, call.k, call.v))
    key = (inputs, call.q.dtype, call.mask.batch_size, call.mask_heads, call.needs_grad, flash)
    answer = _FUSED_ANSWERS.get(key)
    if answer is None:
        if len(_FUSED_ANSWERS) >= _FUSED_ANSWERS_KEPT:
            _FUSED_ANSWERS.clear()
        answer = _FUSED_ANSWERS[key] = _fused_zeroes_empty_rows(call)
    return answer


_FUSED_ANSWERS: dict[tuple, bool] = {}  # _kernel_zeroes_empty_rows' answers by key
_FUSED_ANSWERS_KEPT = 64


def _fused_zeroes_empty_rows(call: AttentionCall) -> bool:
    choice = getattr(torch, "_fused_sdp_choice", None)
    if choice is None:
        return False
    shape = (call.mask.batch_size or 1, call.mask_heads or 1, call.q_len, call.kv_len)
    placeholder = torch.zeros((), dtype=call.q.dtype).expand(shape)  # the choice reads the mask's shape and dtype
    gqa = call.heads != call.kv_heads
    try:
        picked = choice(call.q, call.k, call.v, placeholder, 0.0, False, scale=call.scale, enable_gqa=gqa)
    except (RuntimeError, TypeError):  # an older signature, or inputs the choice refuses: keep the zeroing
        return False
    return picked == int(SDPBackend.FLASH_ATTENTION) and _probe_empty_rows(call.q.dtype)


@functools.cache
def _probe_empty_rows(dtype: torch.dtype) -> bool:
    """See ``_probe``; the first call in a process may come under ``no_grad``, inference mode or autocast: the probe
    runs outside all three."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        return _probe(dtype)


def _probe(dtype: torch.dtype) -> bool:
    """Whether torch's fused CPU kernel gives rows whose keys are all ``-inf`` exactly 0, forward and backward, in
    ``dtype``: a call of 600 queries and keys (two key blocks of the kernel) with such rows at the edges of its
    blocks, whose other rows' outputs and query gradients must equal those of the same call with the rows left out, and
    whose key / value gradients must too up to a few roundings (the empty rows' output gradient is 1000 times the
    others', so any share of it would show). A few milliseconds, once per dtype and process."""
    gen = torch.Generator().manual_seed(0)
    n, empty_rows = 600, [0, 1, 255, 256, 511, 512, 599]
    q, k, v, grad = (torch.randn(1, 2, n, 16, generator=gen).to(dtype) for _ in range(4))
    grad[:, :, empty_rows] *= 1000  # a gradient leaking from the empty rows into dk, dv would stand out
    allowed = torch.rand(1, 1, n, n, generator=gen) < 0.5
    allowed[..., empty_rows, :] = False
    kept = torch.ones(n, dtype=torch.bool)
    kept[empty_rows] = False
    runs = []
    for rows in (slice(None), kept):
        qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q[:, :, rows], k, v))
        bias = additive(allowed[..., rows, :], dtype)
        if torch._fused_sdp_choice(qr, kr, vr, bias, 0.0, False) != int(SDPBackend.FLASH_ATTENTION):
            return False
        out = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=bias)
        out.backward(grad[:, :, rows])
        runs.append((out.detach(), qr.grad, kr.grad, vr.grad))
    (out, dq, dk, dv), (out_kept, dq_kept, dk_kept, dv_kept) = runs
    zeroed = not out[:, :, ~kept].any() and not dq[:, :, ~kept].any()
    same = torch.equal(out[:, :, kept], out_kept) and torch.equal(dq[:, :, kept], dq_kept)
    # dk, dv: summed over query blocks that differ between the two calls, so equal up to a few roundings
    tolerance = 4 * torch.finfo(dtype).eps
    close = all(
        float((a.float() - b.float()).abs().max()) <= tolerance * float(b.float().abs().max())
        for a, b in ((dk, dk_kept), (dv, dv_kept))
    )
    finite = all(bool(torch.isfinite(t).all()) for t in (out, dq, dk, dv))
    return zeroed and same and close and finite


def _run_with_bias(call: AttentionCall, sdpa_kwargs: dict) -> torch.Tensor:
    """SDPA with a float bias carrying the mask, the ALiBi term and the sink key (see the module docstring)."""
    work = torch.promote_types(call.q.dtype, torch.float32)
    B, H, Q, K = call.batch, call.heads, call.q_len, call.kv_len
    allowed, _ = dense_mask(call)
    has_key = None if allowed is None else rows_with_keys(allowed)
    q = _query(call, None if has_key is None or bool(has_key.all()) else ~has_key).to(work)
    k, v = call.k.to(work), call.v.to(work)
    if has_key is not None:
        allowed = fold(torch.logical_or, [allowed, ~has_key])  # empty rows see every key (finite), zeroed afterwards
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
        out = zero_rows(out, ~has_key)
    return out.to(call.q.dtype)


def cost(call: AttentionCall) -> float:
    """Pairs times ``D + Dv`` (for ``is_causal`` the pairs its key blocks compute, ``_common.sdpa_pairs``: all of them
    up to 512 keys, about half past that; for a split the pairs its calls compute), plus building the dense mask of a
    spec, divided by what the intra-op threads gain (``_threads_gain``), plus with a gradient
    ``_common.SDPA_BACKWARD_KEY_COST`` per key, head and ``D + Dv``, plus a mask over the kept size built and read on
    every call (``_unkept_mask_cost``, outside the mode factors); on CUDA ``cuda_costs.sdpa_cost`` (comparable with the
    fused varlen and flex kernels)."""
    if call.device_type == "cuda":
        return cuda_costs.sdpa_cost(call)
    gain = _threads_gain(call)
    modes = _modes(call)
    factor = mode_factor(modes, call)
    bf16 = call.q.dtype == torch.bfloat16
    # the forward's own bfloat16 width where torch runs it on this CPU's tiles (as ``_common.amx_pair_factor``)
    forward_width = _EXTRA_BF16_FORWARD_PAIR_WIDTH if bf16 and call.device_type == "cpu" else _EXTRA_PAIR_WIDTH
    work = _one_thread_cost(call, forward_width)
    if call.needs_grad and bf16 and _EXTRA_BF16_PAIR_WIDTH != forward_width:
        # the forward's share at its bfloat16 width, the backward's at the backward's
        forward = mode_factor(modes, call, forward=True)
        estimate = (work * forward + _one_thread_cost(call, _EXTRA_BF16_PAIR_WIDTH) * (factor - forward)) / gain
    else:
        estimate = work / gain * factor
    if call.needs_grad:
        keys = _common.SDPA_BACKWARD_KEY_COST * call.batch * call.heads * call.kv_len * (call.head_dim + call.value_dim)
        estimate += keys / gain
    return estimate + _unkept_mask_cost(call) / gain


def _modes(call: AttentionCall) -> ModeFactors:
    """``MODES``, with the forward's busy factor at least ``_SPLIT_BUSY`` for a call run as several calls without a
    mask (a prefix-LM, chunked, padded or window split)."""
    if _SPLIT_BUSY <= MODES.busy or not _runs_split(call):
        return MODES
    return dataclasses.replace(MODES, busy=_SPLIT_BUSY)


def _runs_split(call: AttentionCall) -> bool:
    """Whether ``run`` takes one of the splits into several calls without a mask (not the two-call causal one)."""
    if _splits_prefix(call) or _chunk_split(call) is not None:
        return True
    return _padded_runs(call) is not None or _window_split(call) is not None


def _unkept_mask_cost(call: AttentionCall) -> float:
    """``_UNKEPT_MASK_COST`` per element of a spec mask the call builds and reads whole (one not kept with the plans);
    0 for a call without one (no mask, ``is_causal``, a split, score modifiers' bias, a tensor mask)."""
    if not isinstance(call.mask, MaskSpec) or call.score_mods:
        return 0.0
    nbytes = _spec_mask_bytes(call)
    if nbytes <= _CACHED_MASK_BYTES or _mask_free(call):
        return 0.0
    return _UNKEPT_MASK_COST * nbytes / call.q.element_size()


def _mask_free(call: AttentionCall) -> bool:
    """Whether ``run`` builds no mask for ``call``: no mask or ``full()``, ``is_causal`` or unmasked by
    ``_unmasked_rule``, or a split into unmasked and ``is_causal`` calls."""
    if call.is_full or _unmasked_rule(call) is not None or _splits_causal(call):
        return True
    return _runs_split(call)


def _one_thread_cost(call: AttentionCall, extra: float | None = None) -> float:
    """The call on one thread, its pairs at ``pair_width(D + Dv, extra)`` (``None``: ``_EXTRA_PAIR_WIDTH``)."""
    width = _common.pair_width(call.head_dim + call.value_dim, _EXTRA_PAIR_WIDTH if extra is None else extra)
    work = call.batch * call.heads * call.q_len * call.kv_len * width * _common.amx_pair_factor(call)
    if call.q_len == 1 and call.q.dtype == torch.bfloat16 and not call.needs_grad and call.device_type == "cpu":
        work += call.batch * call.heads * call.kv_len * _BF16_ONE_QUERY_KEY_COST
    rule = _unmasked_rule(call)
    if rule == "none":
        return float(work)
    Q, K = call.q_len, call.kv_len
    if rule == "causal":  # the fused kernel skips the key blocks past the diagonal's (_common.sdpa_pairs)
        return float(work * _common.sdpa_pairs(Q, K, True) / (Q * K))
    if _splits_causal(call):  # no mask: every pair of the first K - Q keys, then an is_causal block of Q x Q
        return float(work * ((K - Q) * Q + _common.sdpa_pairs(Q, Q, True)) / (Q * K))
    if (split := _split_parts(call)) is not None:
        share, calls = split
        copies = 0.0
        if _window_split(call) is not None:  # the reversed queries, keys and values of the previous blocks
            copies = _WINDOW_COPIES * call.batch * call.heads * Q * call.head_dim * _common.COPY_COST
        return float(work * share + _common.CALL_COST * calls + copies)
    mask_rows = call.batch * (call.mask_heads or 1) if isinstance(call.mask, MaskSpec) and not call.is_full else 0
    bias = 4 * call.batch * call.heads * call.q_len * call.kv_len if call.score_mods else 0  # the float bias
    masked = _MASK_COST * mask_rows * call.q_len * call.kv_len + (_CALL_COST if mask_rows else 0.0)
    return float(work + masked + bias)


def _split_work(call: AttentionCall) -> float:
    """The multiply-adds ``run``'s calls compute together, what sizes their parallel region: a split's
    (``_split_parts``), else the dense call's ``B·H·Q·K·(D + Dv)``."""
    split = _split_parts(call)
    share = 1.0 if split is None else split[0]
    return share * call.batch * call.heads * call.q_len * call.kv_len * (call.head_dim + call.value_dim)


def _split_parts(call: AttentionCall) -> tuple[float, int] | None:
    """For a call ``run`` takes as several calls without a mask (``_runs_split``: a prefix-LM, chunked, padded or
    window split), the share of the dense ``B·Q·K`` pairs its calls compute together and how many calls it makes;
    ``None`` for any other call."""
    Q, K = call.q_len, call.kv_len
    if _splits_prefix(call):  # per row every query against the prefix, the rest an is_causal block
        calls = sum(1 if prefix in (0, K) else 2 for _, _, prefix in _prefix_runs(call))
        return _prefix_share(call), calls
    if (size := _chunk_split(call)) is not None:  # an is_causal block per chunk
        whole = Q // size * size
        pairs = whole // size * _common.sdpa_pairs(size, size, True) + _common.sdpa_pairs(Q - whole, Q - whole, True)
        calls = call.batch * ((whole > 0) + (whole < Q))  # a row's stacked whole chunks, its shorter last chunk
        return float(pairs / (Q * K)), calls
    if (runs := _padded_runs(call)) is not None:  # an is_causal block and an unmasked call per run of rows
        pairs, calls = _padded_pairs(runs, _common.padded_cut(call)[0].causal)
        return float(pairs / (call.batch * Q * K)), calls
    if (window := _window_split(call)) is not None:  # two is_causal calls a row over blocks of the window
        calls = 2 * call.batch + (2 if Q % window else 0)  # a row's two stacked calls, the shorter first block's two
        return float(_window_pairs(Q, window) / (Q * K)), calls
    return None


def _window_pairs(length: int, window: int) -> float:
    """The pairs ``_split_window``'s calls compute on one row of ``length`` tokens: per block its own ``is_causal``
    block and the previous block's shifted one (``_common.sdpa_pairs``)."""
    first, n = _window_blocks(length, window)
    own = n * _common.sdpa_pairs(window, window, True) + _common.sdpa_pairs(first, first, True)
    previous = (n - 1) * _common.sdpa_pairs(window - 1, window - 1, True)
    return float(own + previous + (_common.sdpa_pairs(window - 1, first, True) if first else 0))


def _padded_pairs(runs, causal: bool) -> tuple[float, int]:
    """The pairs the calls of ``_split_padded`` compute over its ``runs`` (``_padded_runs``), and how many calls."""
    parts = _padded_parts(runs, causal)
    pairs = sum(
        (rows.stop - rows.start) * _common.sdpa_pairs(queries.stop - queries.start, keys.stop - keys.start, block)
        for rows, queries, keys, block in parts
    )
    return float(pairs), len(parts)


def _prefix_share(call: AttentionCall) -> float:
    """The share of a ``_split_prefix`` call's ``B·Q·K`` pairs its kernels compute: per row ``K·P`` unmasked, and the
    ``is_causal`` block's ``_common.sdpa_pairs`` over the other ``K - P`` queries and keys."""
    K = call.kv_len
    pairs = sum(
        (b - a) * (K * prefix + float(_common.sdpa_pairs(K - prefix, K - prefix, True)))
        for a, b, prefix in _prefix_runs(call)
    )
    return pairs / (call.batch * K * K)


def _threads_gain(call: AttentionCall) -> float:
    """What ``_workers.threads_available()`` threads gain on one fused call: its ``B·H·(query blocks)`` items (blocks
    of 256 queries from 768 queries on, of 64 from 192, else 32, as torch's CPU flash kernel splits them) shared by
    at most that many threads, each added one at ``_THREAD_EFFICIENCY``."""
    block = 256 if call.q_len >= 768 else 64 if call.q_len >= 192 else 32
    items = call.batch * call.heads * -(-call.q_len // block)
    threads = min(_workers.threads_available(), max(items, 1))
    return _workers.expected_speedup([1.0], threads, 0.0, _THREAD_EFFICIENCY)


def _scratch_bytes(call: AttentionCall) -> int:
    """Bytes of the O(B·Q·K) tensors ``run`` builds: the spec's or tensor's bool mask (a byte per pair and mask row),
    the float bias of score modifiers; no mask for an unmasked (``full()`` too), ``is_causal``, split-causal, split
    prefix-LM or stacked-chunks call."""
    pairs = call.batch * call.q_len * call.kv_len
    bias = 4 * pairs * call.heads if call.score_mods else 0
    return bias if _mask_free(call) else pairs * (call.mask_heads or 1) + bias


BACKEND = Backend(
    "sdpa",
    run,
    cost,
    devices=TORCH_DEVICES,
    dtypes=ALL_DTYPES,
    per_head=True,
    dropout=True,
    score_mods=frozenset({"sinks", "alibi"}),
    masked_key_span=_masked_key_span,
    propagates_nonfinite=frozenset({"cpu"}),  # checked by tests/test_conformance.py
    scratch_bytes=_scratch_bytes,
    transforms=frozenset({"grad"}),  # torch's SDPA and plain operators (tests/test_transforms.py)
)
