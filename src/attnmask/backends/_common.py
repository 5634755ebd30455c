"""What several backends share: argument checks, document segments, the plan cache and the cost units.

Layer 3 (attention); imports ``masks``, ``lowering``, ``plancache``, ``errors`` and the C library's loader
(``_clib``), never a backend.

Costs are estimates in element operations, comparable between backends: multiply-adds of the pairs actually computed,
plus fixed charges per kernel call, tile group or copied element for Python and dispatch overhead (the constants
below are the ones more than one backend charges).

Document segments, the form ``"varlen"`` and ``"native"`` run: ``(N, 6)`` int64 rows ``(row, q_start, q_len,
k_start, k_len, offset)``. Example, one packed row of 3 documents of lengths 2, 4, 3, causal inside each::

    >>> segments_from_varlen((causal() & document(seq_lens=[2, 4, 3])).varlen(9), 1, 9, 9).tolist()
    [[0, 0, 2, 0, 2, 0], [0, 2, 4, 2, 4, 0], [0, 6, 3, 6, 3, 0]]
"""

from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

import attnmask.backends._clib as _clib
import attnmask.backends._workers as _workers
from attnmask import masks as M
from attnmask.errors import BackendError, DTypeError, ShapeError, bad
from attnmask.lowering import VarlenArgs, VarlenForm, varlen_args, varlen_form
from attnmask.plancache import call_plans

__all__ = [
    "BUSY_LARGE_WORK",
    "BUSY_SMALL_WORK",
    "CALL_COST",
    "COPY_COST",
    "FUSED_NAN_KEYS",
    "HANDOVER_COST_AMX",
    "HANDOVER_COST_OTHER",
    "HANDOVER_COSTS",
    "AMX_BF16_PAIR_FACTOR",
    "ModeFactors",
    "SDPA_BACKWARD_KEY_COST",
    "SMALL_MATMUL_COST",
    "VarlenPlan",
    "all_nan_rows",
    "allowed_fraction",
    "amx_pair_factor",
    "built_exact_plan",
    "built_varlen_plan",
    "busy_work",
    "cached",
    "causal_fraction",
    "cheap_varlen_plan",
    "check_qkv",
    "check_segments",
    "cpu_bf16_kind",
    "cpu_has_amx_bf16",
    "cpu_has_avx512_bf16",
    "degenerate",
    "float64_address",
    "mode_factor",
    "nan_rows_restored",
    "nan_rows_restored_lse",
    "handover_cost",
    "per_cpu_kind",
    "most_keys_floor",
    "most_keys_seen",
    "segments_address",
    "rows_seeing_themselves",
    "seeing_themselves",
    "segments_from_varlen",
    "diagonal_pairs_seeing_themselves",
    "padded_tile_pairs",
    "native_plan",
    "unit_stride",
    "varlen_plan",
    "whole_row_rule",
]

# SDPA's backward: its work per key, whatever the number of queries (the key and value gradients it zeroes,
# accumulates and writes, per query head), in the estimate's unit: what makes a decoding step with a gradient cost
# more than its pairs. Measured on bench_limit's decode rows (rows of 1K tables, AMD EPYC, 1 thread,
# limit_tables/s9_q1.txt): forward + backward minus forward 6.0, 8.2 and 10.1 ms for 1, 8 and 16 queries against
# 4,096 keys (H=4, D=Dv=64); the part that does not grow with the queries, 6.0 ms over 2.1M key elements at sdpa's
# 52 ps per unit: ~55. No gain from a second thread there (8.6 ms at 2 threads; RESULTS.md, issue 15, "A different
# CPU"); on the Xeon with AMX tiles the same rows' forward + backward gained 1.6-2.0x from a second thread, and sdpa's
# estimate divides this charge by its threads' gain like the rest: rows within 1.1x of the fastest 888 -> 905 over ten
# sets of 1K tables there, the EPYC's tables' float32 rows one better (RESULTS.md, issue 15, "sdpa's backward keys").
SDPA_BACKWARD_KEY_COST = 55.0
# torch's fused CPU kernel runs bfloat16 on AMX tiles where the CPU has them: in bench_limit's rows of 1,024 tokens
# (2 threads, a Xeon with amx_bf16) SDPA took 1.5-2.3x less time in bfloat16 than in float32 (median 1.9x), while the
# other CPU backends gained 0.6-1.6x (blocksparse and native compute half precision in float32; banded's and varlen's
# small calls are bound by per-call work). float16 gained nothing there. Pair work of a bfloat16 SDPA call on such a
# CPU (``amx_pair_factor``: sdpa's whole call, varlen's documents that SDPA runs):
AMX_BF16_PAIR_FACTOR = 0.5
# The estimates' per-pair charges were calibrated at D = Dv = 64 (bench_limit.py) and scale with ``D + Dv``. The dot
# products and the value sums do, but the exponential and the bookkeeping of each pair do not, so at small heads a
# kernel's time per pair falls less than its width: on packed rows (bench_head_dim.py; RESULTS.md, issue 15, "Head
# sizes") SDPA's time per unit of ``D + Dv`` rose ~1.5x from D = 64 to D = 16 and stayed within a few percent at 128;
# the native kernel's time fell by a quarter (0.62-1.01x) from D = 64 to 16, where ``D + Dv`` fell by three quarters.
# ``pair_width`` charges a pair ``hypot(D + Dv, extra)``, flat below ``extra`` and ``D + Dv`` well above it, scaled
# to equal ``D + Dv`` at the calibrated width; each backend fits its own ``extra``.
CALIBRATED_WIDTH = 128


def pair_width(width: int, extra: float) -> float:
    """The width a pair is charged at: ``hypot(width, extra)`` (``width``: ``D + Dv``) scaled so that
    ``CALIBRATED_WIDTH`` maps to itself. ``extra`` 0: ``width``. Example: ``pair_width(40, 96)`` is
    104 · 128 / 160 = 83.2."""
    return math.hypot(width, extra) * CALIBRATED_WIDTH / math.hypot(CALIBRATED_WIDTH, extra)


# torch's fused CPU SDPA kernel walks a query block's keys in blocks of 512 (all of them when fewer) and, with
# is_causal, stops after the key block that holds the block's last query: every pair up to 512 keys, and about half
# the pairs plus 256 per query past that (``sdpa_pairs``). Timed against unmasked SDPA at one thread (B·L = 8,192,
# H = 4, D = 64; RESULTS.md, issue 15, "SDPA's causal rows"): is_causal over half the unmasked time 1.93 / 2.05 / 1.65 /
# 1.51 / 1.28 / 1.15 at rows of 256 / 512 / 768 / 1,024 / 2,048 / 4,096, where this model reads 2.0 / 2.0 / 1.67 /
# 1.50 / 1.25 / 1.12.
SDPA_BLOCKS = (512.0, 256.0)  # the key block, and the keys a causal query computes past the diagonal on average


def sdpa_pairs(q_len, kv_len, causal: bool):
    """(query, key) pairs torch's CPU SDPA kernel computes for ``q_len`` queries against ``kv_len`` keys (floats or
    float64 numpy arrays, elementwise), with ``is_causal`` when ``causal`` (see ``SDPA_BLOCKS``). Example: a causal row
    of 1,024 computes 1,024 · 1,025 / 2 + 1,024 · 256 = 786,944 pairs, 1.5x the 524,800 it needs."""
    if not causal:
        return q_len * kv_len
    block, extra = SDPA_BLOCKS
    half = q_len * (kv_len + 1) / 2 + q_len * extra
    return np.where(kv_len <= block, q_len * kv_len, np.minimum(half, q_len * kv_len))


CALL_COST = 3e5  # one SDPA call or one tile group: tens of microseconds of overhead
# One small matrix product inside a batched matmul (a tiny document's scores or output for one head): about a
# microsecond of fixed cost on CPU whatever its size, which is what dominates rows of thousands of tiny documents.
SMALL_MATMUL_COST = 2e4
# Copying one element in a gather, scatter or into a fresh tensor: measured ~1 ns per float32 element on one core
# here (page faults of the fresh allocation included), about thirty multiply-adds of SDPA's kernel.
COPY_COST = 30.0


@dataclass(frozen=True)
class ModeFactors:
    """What a backend's CPU estimate of a float32 forward is multiplied by in the other modes a call can run in:
    ``bf16`` for a bfloat16 forward, ``backward`` for a float32 forward whose backward will run too (the whole
    forward + backward against the forward alone), ``bf16_backward`` for both. Fitted per backend by
    ``benchmarks/bench_limit.py --fit ... --modes`` (median over the timed rows of measured time / estimate in that
    mode, against the same rows' float32 forward). While other processes hold cores (``_workers.contended``) the
    factor is further multiplied by ``busy`` (a forward) or ``busy_backward`` (forward + backward): the backend's
    median slowdown with one of two cores busy (``--fit ... --busy-factors`` on ``--busy`` tables). A backend whose
    small calls slow less than its large ones (their parallel regions and tasks go to the free cores only, or a
    short call ends before the scheduler shares the taken core) also sets ``busy_small`` and ``busy_backward_small``:
    they apply to calls of at most ``BUSY_SMALL_WORK`` multiply-adds of allowed pairs (``busy_work``), ``busy`` and
    ``busy_backward`` from ``BUSY_LARGE_WORK``, and the geometric mean weighted by ``log(work)`` between (``busy_at``).

    ``bf16`` and ``bf16_backward`` were measured on a CPU with AMX bfloat16 tiles, where torch's SDPA kernel runs
    bfloat16 about twice as fast as float32 while the backends that compute in float32 pay for the casts.
    ``bf16_no_amx`` and ``bf16_backward_no_amx`` stand for bfloat16 on a CPU with no bfloat16 instructions at all
    (neither AMX tiles nor AVX512-BF16), where torch converts bfloat16 in its kernels and SDPA's backward measured 5x
    its float32 time (an AMD EPYC without either: rows of 1,024, causal, 2 threads, 167 against 31.6 ms; RESULTS.md,
    issue 15, "bfloat16 on a CPU without AMX"); set both or neither (``None``: that CPU's bfloat16 uses the float32
    factors). A CPU with AVX512-BF16 but no AMX tiles (an AMD EPYC of family 25) runs each backend's bfloat16 at about
    its float32 time, casts included, forward and backward (median bfloat16 / float32 time per backend 0.82-1.26 on
    the 1K tables there), so it uses the float32 factors, which cover its bfloat16 (RESULTS.md, issue 15, "bfloat16
    on a CPU with AVX512-BF16"). float16 always uses the float32 factors.

    Off the CPU (where these estimates are not used to choose) every factor is 1.

        >>> ModeFactors(bf16=1.5, backward=3.0, bf16_backward=2.5).of(torch.float32, "cpu", needs_grad=True)
        3.0
    """

    bf16: float = 1.0
    backward: float = 1.0
    bf16_backward: float = 1.0
    busy: float = 1.0
    busy_backward: float = 1.0
    bf16_no_amx: float | None = None
    bf16_backward_no_amx: float | None = None
    busy_small: float | None = None
    busy_backward_small: float | None = None

    def __post_init__(self):
        if (self.bf16_no_amx is None) != (self.bf16_backward_no_amx is None):
            given = f"bf16_no_amx={self.bf16_no_amx}, bf16_backward_no_amx={self.bf16_backward_no_amx}"
            raise bad(BackendError, "ModeFactors", "both bfloat16 factors of a CPU without AMX, or neither", given)

    def covers(self, dtype: torch.dtype, device_type: str) -> bool:
        """Whether a fitted factor stands for ``dtype`` on ``device_type`` (bfloat16 on a CPU with AMX tiles or
        AVX512-BF16, or on one with neither where the ``_no_amx`` factors are set): then it includes what the backend
        pays for casting to its compute dtype, which the estimate need not add."""
        if device_type != "cpu" or dtype != torch.bfloat16:
            return False
        return cpu_bf16_kind() != "none" or self.bf16_no_amx is not None

    def busy_at(self, needs_grad: bool, work: float | None) -> float:
        """The busy factor of a call of ``work`` multiply-adds of allowed pairs (``None``: unknown, taken as large),
        with a backward or not: ``busy_small`` / ``busy_backward_small`` up to ``BUSY_SMALL_WORK``, ``busy`` /
        ``busy_backward`` from ``BUSY_LARGE_WORK``, interpolated on ``log(work)`` between (``None`` small factors:
        the large ones throughout).

            >>> ModeFactors(busy=1.6, busy_small=1.1).busy_at(False, BUSY_SMALL_WORK)
            1.1
        """
        large = self.busy_backward if needs_grad else self.busy
        small = self.busy_backward_small if needs_grad else self.busy_small
        if small is None or work is None or work >= BUSY_LARGE_WORK:
            return large
        if work <= BUSY_SMALL_WORK:
            return small
        t = math.log(work / BUSY_SMALL_WORK) / math.log(BUSY_LARGE_WORK / BUSY_SMALL_WORK)
        return small * (large / small) ** t

    def of(
        self,
        dtype: torch.dtype,
        device_type: str,
        needs_grad: bool,
        contended: bool = False,
        work: float | None = None,
    ) -> float:
        """The factor for a call in ``dtype`` on ``device_type``, differentiated or not, with cores taken or not
        (then ``busy_at(needs_grad, work)``: ``work`` the call's multiply-adds of allowed pairs, ``busy_work``)."""
        if device_type != "cpu":
            return 1.0
        kind = cpu_bf16_kind() if self.covers(dtype, device_type) else "float32"
        if kind in ("float32", "avx512_bf16"):  # bfloat16 with AVX512-BF16 measured at float32's time
            factor = self.backward if needs_grad else 1.0
        elif kind == "amx":
            factor = self.bf16_backward if needs_grad else self.bf16
        else:
            factor = self.bf16_backward_no_amx if needs_grad else self.bf16_no_amx
        return factor * (self.busy_at(needs_grad, work) if contended else 1.0)


# Where the busy factors change from a backend's small calls' to its large ones' (``ModeFactors.busy_at``), in
# multiply-adds of allowed pairs (``busy_work``). With one of two cores busy, on the Xeon's busy tables of
# 2026-12-05/06, the forwards of "blocksparse", "native" and "varlen" slowed 1.0-1.5x (median per backend) under
# 1e8 (calls of ~0.1-2 ms at two idle threads) and 1.5-1.8x, as SDPA does, from 3e8 (RESULTS.md, issue 15, "Busy
# factors by the call's size"; the bounds and factors chosen by replaying auto's busy picks on the saved tables).
BUSY_SMALL_WORK = 1e8
BUSY_LARGE_WORK = 5e8


def mode_factor(modes: ModeFactors, call, forward: bool = False) -> float:
    """``modes.of`` for ``call`` as it runs now: its dtype, device, whether it needs a gradient (``forward``: as if it
    did not, the factor of the forward's share of an estimate with a backward), and whether other processes hold cores
    (``_workers.contended``, read at most every 0.1 s; then, for a backend with small calls' factors, the call's size,
    ``busy_work``, picks the busy factor)."""
    device_type = call.device_type
    contended = device_type == "cpu" and _workers.contended()
    needs_grad = call.needs_grad and not forward
    if not contended:
        return modes.of(call.q.dtype, device_type, needs_grad)
    small = modes.busy_backward_small if needs_grad else modes.busy_small
    return modes.of(call.q.dtype, device_type, needs_grad, True, None if small is None else busy_work(call))


def busy_work(call) -> float:
    """Multiply-adds of the (query, key) pairs the call's spec allows, one pass: ``B·H·Q·K·(D + Dv)`` times its
    allowed fraction (``allowed_fraction``; a plain ``causal()`` its exact share, chunks of ``c`` about ``c / K`` of
    the pairs, half of that under ``causal()``; any other spec all of them). What sets how much a call slows while
    other processes hold cores (``ModeFactors.busy_at``). Kept with the call's plans under ``"busy_work"``."""
    return cached(call, "busy_work", _busy_work)


def _busy_work(call) -> float:
    dense = call.batch * call.heads * call.q_len * call.kv_len * (call.head_dim + call.value_dim)
    fraction = allowed_fraction(call)
    if fraction is None and call.is_plain_causal and 0 < call.q_len <= call.kv_len:
        fraction = causal_fraction(call.q_len, call.kv_len)
    if fraction is None and isinstance(call.mask, M.MaskSpec) and call.kv_len > 0:
        try:
            form = varlen_form(call.mask)
        except BackendError:
            form = None
        if form is not None and form.chunked is not None:
            fraction = min(1.0, form.chunked.size / call.kv_len) * (0.5 if form.causal else 1.0)
    return float(dense * (1.0 if fraction is None else fraction))


def causal_fraction(q_len: int, kv_len: int) -> float:
    """The fraction of the ``Q·K`` pairs a plain ``causal()`` allows the last ``Q`` of ``K`` positions (``0 < Q <= K``;
    query ``i`` sees ``K - Q + 1 + i`` keys). Example: ``causal_fraction(4, 4)`` is 10 / 16 = 0.625."""
    return (q_len * (kv_len - q_len + 1) + q_len * (q_len - 1) // 2) / (q_len * kv_len)


def amx_pair_factor(call) -> float:
    """``AMX_BF16_PAIR_FACTOR`` for a bfloat16 call on a CPU with AMX bfloat16 tiles (torch's fused SDPA kernel runs
    its pairs there), else 1."""
    amx = call.q.dtype == torch.bfloat16 and call.device_type == "cpu" and cpu_has_amx_bf16()
    return AMX_BF16_PAIR_FACTOR if amx else 1.0


@functools.cache
def cpu_has_amx_bf16() -> bool:
    """Whether this CPU advertises AMX bfloat16 tiles (Linux's /proc/cpuinfo flags); False where that is unknown."""
    return "amx_bf16" in _cpu_flags()


# What one task dealt to a worker thread (``_workers.parallel_map``: ``varlen``'s document groups, ``blocksparse``'s
# query groups) costs on top of its work, in estimate units: its wake-up and the GIL hand-overs around its torch calls.
# The two CPUs measured differ tenfold. The Xeon with AMX tiles: 3.2e6, fitted jointly with the added thread's share
# of a core (0.85) on its 1K limit tables (16-64 tasks a call; RESULTS.md, "native's threads"). The AMD EPYC without
# them: 2.6e5, timed directly (benchmarks/bench_handover.py, tasks of one query: 4.5-8.3 us, 1.8-3.3e5 units, median
# 2.6e5; RESULTS.md, issue 15, "What a dealt task costs"), where the Xeon's value priced its 2-thread blocksparse
# about 1.7x too high on batches of 8-32 rows (~100 tasks). A CPU takes the value of its kind, AMX tiles or not, until
# it is measured: bench_handover.py prints its own.
HANDOVER_COST_AMX = 3.2e6
HANDOVER_COST_OTHER = 2.6e5
HANDOVER_COSTS = (HANDOVER_COST_AMX, HANDOVER_COST_OTHER)  # (with AMX tiles, other): per_cpu_kind


def handover_cost() -> float:
    """``HANDOVER_COST_AMX`` on a CPU with AMX bfloat16 tiles, else ``HANDOVER_COST_OTHER``: the ``_HANDOVER_COST``
    the modules dealing worker tasks hold (``varlen``, ``blocksparse``; set when they are imported)."""
    return per_cpu_kind(HANDOVER_COSTS)


def per_cpu_kind(values: tuple[float, float]) -> float:
    """The first of ``values`` (fitted on the Xeon with AMX tiles) on a CPU with AMX bfloat16 tiles, else the second
    (fitted on the AMD EPYC without them): a constant the two CPUs measured disagree on. A module holds it set when
    it is imported and declares it, with its two values, in its ``CPU_KIND_VALUES`` (``{name: values}``), from which
    ``benchmarks/bench_limit.py``'s replays set each table's kind."""
    return values[0] if cpu_has_amx_bf16() else values[1]


def cpu_bf16_kind() -> str:
    """Which of ``ModeFactors``' three kinds of CPU this is for bfloat16: ``"amx"`` (AMX tiles), ``"avx512_bf16"``
    (AVX512-BF16 without tiles) or ``"none"``."""
    return "amx" if cpu_has_amx_bf16() else "avx512_bf16" if cpu_has_avx512_bf16() else "none"


@functools.cache
def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU advertises the AVX512-BF16 instructions (/proc/cpuinfo flags); False where that is unknown."""
    return "avx512_bf16" in _cpu_flags()


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The flags of the first processor in Linux's /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            return frozenset(next((line.split() for line in info if line.startswith("flags")), ()))
    except OSError:
        return frozenset()


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """``(B, H, Q, D, Hkv, K)`` of 4D ``q`` ``(B, H, Q, D)``, ``k`` ``(B, Hkv, K, D)``, ``v`` ``(B, Hkv, K, Dv)``
    with ``H % Hkv == 0``; a ``ShapeError`` naming the tensor otherwise."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise bad(ShapeError, name, "a 4D tensor (B, H, L, D)", getattr(t, "shape", type(t).__name__))
    B, H, Q, D = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != B or k.shape[3] != D:
        raise bad(ShapeError, "k, v", f"shapes (B={B}, Hkv, K, D={D}) and (B, Hkv, K, Dv)", (k.shape, v.shape))
    Hkv, K = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv:
        raise bad(ShapeError, "k", f"a number of heads dividing H={H}", Hkv)
    return B, H, Q, D, Hkv, K


def degenerate(call) -> str | None:
    """Why the call has no pair to compute (an empty batch, no query, no key or no head), or ``None``: the backends
    that plan per document or per tile refuse such calls (``"sdpa"`` and ``"reference"`` return the empty or zero
    output)."""
    if call.batch and call.heads and call.q_len and call.kv_len:  # the usual answer without building the message
        return None
    sizes = {"B": call.batch, "H": call.heads, "Q": call.q_len, "K": call.kv_len}
    empty = [f"{name}=0" for name, n in sizes.items() if n == 0]
    return f"has nothing to plan with {', '.join(empty)} (sdpa returns the empty or zero output)" if empty else None


def off_cpu(call) -> bool:
    """The call runs on an accelerator, where the CPU-calibrated estimates of ``varlen``, ``blocksparse`` and
    ``banded`` (many SDPA calls, tuned for torch's CPU kernels) are not comparable with ``cuda_costs``: they cost
    ``inf`` there, so ``"auto"`` chooses among the fused kernels (still runnable when named)."""
    return call.device_type != "cpu"


# torch's fused CPU attention kernel, on a call without a mask (or with ``is_causal``) whose keys all fit in its
# vector's tail (fewer than 16 at float32, bfloat16 and float16 under AVX-512, 8 at float64), reads a row whose every
# score is NaN (a NaN in its query, or in each key it may see), or NaN and ``-inf`` (a NaN key beside keys with an
# infinite element), as a row with no key: output 0 and log-sum-exp 0, where the reference, and the same kernel on 16
# keys or more, give NaN (torch 2.13). Calls on fewer keys than this are checked after the run (``all_nan_rows``);
# the margin covers vectors twice as wide.
FUSED_NAN_KEYS = 32


def all_nan_rows(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float | None) -> torch.Tensor | None:
    """``(B, H, Q, 1)`` bool, the rows of an SDPA call on ``q`` ``(B, H, Q, D)`` and ``k`` ``(B, Hkv, K, D)`` without
    a mask (``causal``: with ``is_causal``, query ``i`` seeing keys ``j <= i``) whose allowed scores are all NaN or
    ``-inf`` with one NaN at least (the kernel's maximum skips a NaN, so its row's maximum is ``-inf``, as an empty
    row's: an infinite key element gives ``-inf``), or ``None`` when there is none or the call needs no check (see
    ``FUSED_NAN_KEYS``): off the CPU, from ``FUSED_NAN_KEYS`` keys, and where ``q`` and ``k`` are finite (two sums,
    O(B·H·Q·D + B·Hkv·K·D)). Otherwise the scores are computed again in float32 (float64 for float64; O(B·H·Q·K)
    memory, K < ``FUSED_NAN_KEYS``)."""
    if q.device.type != "cpu" or k.shape[2] >= FUSED_NAN_KEYS or not q.numel() or not k.numel():
        return None
    wide = torch.promote_types(q.dtype, torch.float32)  # float64 stays float64: its range
    if all(math.isfinite(t.sum(dtype=wide).item()) for t in (q, k)):
        return None
    with torch.no_grad():
        B, H, Q, D = q.shape
        Hkv, K = k.shape[1], k.shape[2]
        qw, kw = q.detach().to(wide), k.detach().to(wide)
        scores = qw.unflatten(1, (Hkv, H // Hkv)) @ kw.unsqueeze(2).transpose(-1, -2)
        scores = scores.flatten(1, 2) * (D**-0.5 if scale is None else scale)  # (B, H, Q, K)
        nan = scores.isnan()
        empty = nan | (scores == -math.inf)  # what the kernel's maximum reads as no key
        if causal:
            later = torch.ones(Q, K, dtype=torch.bool).triu(1)
            empty, nan = empty | later, nan & ~later
        lost = empty.all(-1, keepdim=True) & nan.any(-1, keepdim=True)
    return lost if bool(lost.any()) else None


def nan_rows_restored(
    out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float | None
) -> torch.Tensor:
    """``out`` ``(B, H, Q, Dv)``, the result of torch's SDPA on ``q`` and ``k`` without a mask (``causal``: with
    ``is_causal``), with NaN on ``all_nan_rows``: in place when no graph records ``out``, else a new tensor (those
    rows' gradient 0)."""
    lost = all_nan_rows(q, k, causal, scale)
    if lost is None:
        return out
    return out.masked_fill(lost, math.nan) if out.requires_grad else out.masked_fill_(lost, math.nan)


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a contiguous last dimension, copied only where it has none. torch's fused CPU flash-attention ops
    (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward), called directly, read each row as a
    vector without checking that stride: a query, key, value or output whose last dimension is strided gave garbage
    (``F.scaled_dot_product_attention`` copies it first)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def nan_rows_restored_lse(
    out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and log-sum-exp ``(B, H, Q)`` of torch's fused CPU kernel on ``q`` and ``k`` without a mask, both
    NaN on ``all_nan_rows`` (the kernel gives those rows 0 and 0, which a merge of parts by log-sum-exp would then
    weigh as a real part): new tensors where there are such rows."""
    lost = all_nan_rows(q, k, causal, scale)
    if lost is None:
        return out, lse
    return out.masked_fill(lost, math.nan), lse.masked_fill(lost.squeeze(-1), math.nan)


def cached(call, key: str, build):
    """``build(call)`` once per spec object and call signature (``unsupported``, ``cost`` and ``run`` all need the
    same lowering, and so do the layers of a model that share one spec): see ``attnmask.plancache``. ``build`` may
    read the spec, shapes, dtype, device and whether a gradient is needed, nothing else of the call; its result is
    stored under ``key`` and must not be mutated."""
    entry = call_plans(call)
    if key not in entry:
        entry[key] = build(call)
    return entry[key]


# ----------------------------------------------------------------------------------------------------------------------
# Document segments


def segments_from_varlen(args, batch: int, q_len: int, kv_len: int, spec_rows: int = 1) -> torch.Tensor:
    """Document segments ``(N, 6)`` int64 ``(row, q_start, q_len, k_start, k_len, offset)`` from varlen arguments.

    ``args``: ``attnmask.lowering.VarlenArgs`` for rows of ``kv_len`` keys whose last ``q_len`` positions are the
    queries; ``offset`` is the query position of ``q_start`` minus the key position of ``k_start``. A spec of
    ``spec_rows == 1`` applied to ``batch`` rows repeats its segments for every row. Example: documents of lengths
    2, 4, 3 in one row (``Q = K = 9``) give ``[[0, 0, 2, 0, 2, 0], [0, 2, 4, 2, 4, 0], [0, 6, 3, 6, 3, 0]]``.
    O(number of sequences).
    """
    lens_q = args.cu_seqlens_q.diff().long().cpu()
    lens_k = args.cu_seqlens_k.diff().long().cpu()
    q_flat = args.indices_q.cpu()[args.cu_seqlens_q[:-1].long().cpu()]
    k_flat = args.indices_k.cpu()[args.cu_seqlens_k[:-1].long().cpu()]
    rows = torch.div(k_flat, max(kv_len, 1), rounding_mode="floor")
    q_start, k_start = q_flat % max(q_len, 1), k_flat % max(kv_len, 1)
    offset = q_start + (kv_len - q_len) - k_start
    segs = torch.stack([rows, q_start, lens_q, k_start, lens_k, offset], dim=1)
    if spec_rows == 1 and batch != 1:  # batch 0: no segment
        segs = segs.repeat(batch, 1)
        segs[:, 0] = torch.arange(batch).repeat_interleave(len(lens_k))
    return segs


def segments_address(segs: torch.Tensor) -> tuple[int, object]:
    """The address of ``segs`` ``(N, 6)`` as contiguous int64 host memory for ``segattn.c``'s planning helpers, and the
    object that must stay alive while C reads it: the tensor itself when it already is such memory (what the plans
    hold), else a contiguous int64 numpy copy. ``data_ptr`` costs a few us right after an attention kernel, where a
    numpy view's ``ctypes.data`` costs ~25 (RESULTS.md, issue 15, "Planning on the costs path")."""
    if segs.device.type == "cpu" and segs.dtype == torch.int64 and segs.is_contiguous():
        return segs.data_ptr(), segs
    copy = np.ascontiguousarray(segs.cpu().numpy(), dtype=np.int64)
    return copy.ctypes.data, copy


def float64_address(values: np.ndarray) -> tuple[int, object]:
    """The address of ``values`` as contiguous float64 host memory for ``segattn.c``, and the object that must stay
    alive while C reads it: a ``ctypes`` view of a writable contiguous float64 array (~0.5 us, where numpy's
    ``ctypes.data`` costs ~2 us and many times that right after an attention kernel), else a contiguous copy's."""
    if values.dtype == np.float64 and values.flags.c_contiguous and values.flags.writeable:
        view = ctypes.c_char.from_buffer(values)  # holds the array's buffer
        return ctypes.addressof(view), view
    copy = np.ascontiguousarray(values, dtype=np.float64)
    return copy.ctypes.data, copy


def check_segments(segments, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``segments`` as a contiguous CPU int64 ``(N, 6)`` tensor, checked against ``q`` ``(B, H, Q, D)`` and ``k``,
    ``v``: an integer tensor (or nested list of ints: no float is truncated), every range inside its row, lengths
    >= 0, offsets within ``±2**40``, and no two query ranges of a row overlapping (empty ones aside). Raises
    ``ShapeError`` (``DTypeError`` for a non-integer tensor) naming the first offending segment. O(N log N),
    vectorised."""
    B, _, Q, _, _, K = check_qkv(q, k, v)
    segs = _as_int64(segments)
    if segs.numel() % 6 or (segs.dim() == 2 and segs.shape[1] != 6) or segs.dim() > 2:
        raise bad(
            ShapeError,
            "segments",
            "an (N, 6) int tensor (row, q_start, q_len, k_start, k_len, offset)",
            tuple(segs.shape),
        )
    segs = segs.reshape(-1, 6).contiguous()
    # on a numpy view of the CPU tensor: a dozen operations on (N,) arrays, each several times cheaper than a torch
    # call's dispatch at these sizes (planning a batch of short rows)
    row, qs, ql, ks, kl, off = segs.numpy().T
    inside = (row >= 0) & (row < B) & (qs >= 0) & (ql >= 0) & (qs <= Q - ql) & (ks >= 0) & (kl >= 0) & (ks <= K - kl)
    # query minus key position: far beyond any row, and no overflow in the C kernel (compared, not abs(): abs of the
    # least int64 is itself)
    inside &= (off >= -(1 << 40)) & (off <= 1 << 40)
    if not inside.all():
        first = segs[int(np.flatnonzero(~inside)[0])].tolist()
        raise bad(ShapeError, "segments", f"ranges inside rows of B={B}, Q={Q}, K={K}", first)
    used = segs.numpy()[ql > 0]
    if len(used) > 1:
        s = used[np.argsort(used[:, 0] * (Q + 1) + used[:, 1], kind="stable")]
        clash = (s[1:, 0] == s[:-1, 0]) & (s[1:, 1] < s[:-1, 1] + s[:-1, 2])
        if clash.any():
            at = s[1:][clash][0]
            raise bad(
                ShapeError, "segments", "non-overlapping query ranges", f"overlap at row {int(at[0])}, q {int(at[1])}"
            )
    return segs


def _as_int64(segments) -> torch.Tensor:
    """An integer tensor or nested list of ints as a CPU int64 tensor; floats, bools and huge ints are refused."""
    if isinstance(segments, torch.Tensor):
        if segments.dtype == torch.bool or segments.is_floating_point() or segments.is_complex():
            raise bad(
                DTypeError,
                "segments",
                "an integer tensor (row, q_start, q_len, k_start, k_len, offset)",
                segments.dtype,
            )
        return segments.to("cpu", torch.long)
    try:
        segs = torch.as_tensor(segments)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise bad(ShapeError, "segments", "an (N, 6) int tensor or nested list of ints", type(err).__name__) from None
    if segs.numel() and (segs.dtype == torch.bool or segs.is_floating_point() or segs.is_complex()):
        raise bad(DTypeError, "segments", "integers (row, q_start, q_len, k_start, k_len, offset)", segs.dtype)
    return segs.to(torch.long)


# ----------------------------------------------------------------------------------------------------------------------
# The varlen lowering of a call (shared by "varlen" and "native")


@dataclass(frozen=True)
class VarlenPlan:
    """Lowered form of a varlen-able spec: segments ``(N, 6)`` and the causal / window rule inside them."""

    segments: torch.Tensor
    causal: bool
    window: int | None


def varlen_plan(call) -> VarlenPlan | str:
    """Segments from ``spec.varlen`` (``[causal | full] & [sliding_window] & document(...) & [key_padding]``, or a
    padded batch), or why the call has no such form. Cached per spec and signature under ``"varlen"``. O(B·L)."""
    return cached(call, "varlen", _build_varlen_plan)


def call_varlen_args(call) -> VarlenArgs | str:
    """``varlen_args`` of the call's spec at its shape, or why the call has none: not a spec of the varlen form,
    explicit positions, or padding queries that see keys (a varlen kernel computes only the sequences). O(B·K).
    Shared by the CPU ``varlen`` backend and the CUDA varlen kernels (``backends.packed``)."""
    args = cached(call, "varlen_args", _lowered_varlen)
    if not isinstance(args, str) and args.padding_queries_attend:
        return _PADDING_QUERIES_ATTEND
    return args


_PADDING_QUERIES_ATTEND = (
    "padding queries attend to real keys under this spec, and a varlen kernel computes only the sequences"
)


def _lowered_varlen(call) -> VarlenArgs | str:
    spec = call.mask
    if not isinstance(spec, M.MaskSpec):
        return "needs a mask spec of the varlen form (documents, padding, causal, sliding window)"
    if call.positions_given:
        return "needs default (bottom-right) positions"
    try:
        return varlen_args(spec, call.q_len, call.kv_len)
    except BackendError as err:
        return str(err)


def allowed_fraction(call) -> float | None:
    """About the fraction of the call's ``B·Q·K`` (query, key) pairs its spec allows, for a spec of the varlen form
    (``[causal | full] & [sliding_window] & [document] & [key_padding]``) with ``Q == K`` at default positions, or
    ``Q < K`` (the last ``Q`` positions: a decoding step) for padded rows without documents; ``None`` for any other
    call. One O(B·K) pass in C (``segattn.c``, through ``_clib``), or without the library a
    handful of vectorised numpy operations on host views: cheap enough to decide from before any backend plans.

    Exact for documents (each id one contiguous run: a query sees the earlier keys of its run, at most ``w`` under a
    window, all of its run without ``causal``) and for padded rows (a query sees every real key up to it; under a
    window, the real keys among the last ``w`` positions); padding inside a document is not subtracted. Example:
    ``causal() & document(seq_lens=[2, 2])`` on a row of 4 allows 3 + 3 of 16 pairs: 0.375; ``sliding_window(2)`` on a
    row of 4, 1 + 2 + 2 + 2 of 16: 0.4375."""
    spec = call.mask
    if not isinstance(spec, M.MaskSpec) or call.positions_given or call.q_len > call.kv_len or degenerate(call):
        return None
    try:
        form = varlen_form(spec)
    except BackendError:
        return None
    if form.chunked is not None:
        return None  # chunks: sdpa or the costs settle it
    if call.q_len < call.kv_len:  # the last Q positions (a decoding step): padded rows only
        real = None if form.document is not None or not form.key_padding else _call_real_keys(call, form)
        if real is None:
            return None
        window = call.kv_len if form.window is None else form.window
        pairs = _pairs_of_last(real, call.q_len, window, form.causal or form.window is not None)
        rows = call.batch if (spec.batch_size or 1) == 1 else 1
        return pairs * rows / (call.batch * call.q_len * call.kv_len)
    length = call.kv_len
    parts = [form.document.doc_ids] if form.document is not None else []
    parts += [pad.attention_mask for pad in form.key_padding]
    if any(t.dim() != 2 or t.shape[1] < length for t in parts):
        return None  # the spec does not cover the row: the backend that runs says so
    window = length if form.window is None else form.window
    if form.document is not None:
        pairs = _counted("attnmask_run_pairs", form.document.doc_ids, torch.int64, length, window, form.causal)
        if pairs is None:
            pairs = _run_pairs(_host(form.document.doc_ids)[:, :length], window, form.causal)
    elif form.key_padding:
        pads, pairs = [pad.attention_mask for pad in form.key_padding], None
        if len(pads) == 1:
            pairs = _counted("attnmask_real_pairs", pads[0], torch.bool, length, window, form.causal)
        if pairs is None:
            pairs = _real_pairs(pads, length, window, form.causal)
    elif form.causal and form.window is not None and window < length:
        # a causal window alone: query i sees min(i + 1, w) keys; summed, w(w + 1)/2 for the first w, w for the rest
        pairs = window * (window + 1) // 2 + (length - window) * window
    else:
        return None  # causal() / full() alone: sdpa runs them as they are (is_causal, no mask)
    rows = call.batch if (spec.batch_size or 1) == 1 else 1  # a spec without per-row data repeats per row
    return pairs * rows / (call.batch * call.q_len * call.kv_len)


def _counted(name: str, t: torch.Tensor, dtype: torch.dtype, length: int, window: int, causal: bool) -> int | None:
    """The pairs ``t[:, :length]`` allows, counted by the C function ``name`` of ``segattn.c`` in one pass over the
    tensor's memory through its strides; ``None`` (count in numpy) when the library is not built or ``t`` is not a
    CPU tensor of ``dtype``."""
    lib = _clib.library()
    if isinstance(lib, str) or t.device.type != "cpu" or t.dtype != dtype:
        return None
    rows_stride, col_stride = t.stride()
    return getattr(lib, name)(t.data_ptr(), t.shape[0], length, rows_stride, col_stride, window, int(causal))


def _run_pairs(ids: np.ndarray, window: int, causal: bool) -> int:
    """``attnmask_run_pairs`` in numpy, on ``(B, K)`` document ids: a few vectorised operations on host views."""
    pos = np.arange(ids.shape[1])
    change = np.ones(ids.shape, dtype=bool)
    change[:, 1:] = ids[:, 1:] != ids[:, :-1]
    within = pos - np.maximum.accumulate(np.where(change, pos, 0), axis=1)  # position inside its run of equal ids
    seen = np.minimum(within + 1, window) if causal else 2 * within + 1  # summed over a run: l² if full
    return int(np.where(ids >= 0, seen, 0).sum())


def _real_pairs(pads: list[torch.Tensor], length: int, window: int, causal: bool) -> int:
    """``attnmask_real_pairs`` in numpy, on the AND of the ``(B, K)`` padding masks ``pads``."""
    real = _host(pads[0])[:, :length]
    for pad in pads[1:]:
        real = real & _host(pad)[:, :length]
    return _pairs_of_last(real, length, window, causal)


def _pairs_of_last(real: np.ndarray, q_len: int, window: int, causal: bool) -> int:
    """Pairs the last ``q_len`` of the ``K`` positions of the ``(R, K)`` host bool ``real`` (the real keys) allow:
    query ``p`` sees the real keys in ``(p - window, p]`` (``causal``; a window implies it), else every real key.
    O(R·K). Example: one query after keys ``[0, 1, 1]`` (padding first) sees 2 keys."""
    length = real.shape[1]
    if not causal:
        return int(np.count_nonzero(real)) * q_len
    if q_len == length and window >= length:  # key j is seen by the queries j .. length - 1: one product
        return int((real @ np.arange(length, 0, -1)).sum())
    if window >= length and 2 * q_len <= length:  # a few last queries (a decoding step): the keys before them counted
        first = length - q_len  # once, then the running count over the last q_len keys only
        before = int(np.count_nonzero(real[:, :first]))
        return before * q_len + int(np.cumsum(real[:, first:], axis=1).sum())
    # query p sees the real keys in (p - window, p]: a difference of running counts
    counts = np.zeros((real.shape[0], length + 1), dtype=np.int64)
    np.cumsum(real, axis=1, out=counts[:, 1:])
    last = np.arange(length - q_len, length) + 1  # one past each query's position
    return int((counts[:, last] - counts[:, np.maximum(last - window, 0)]).sum())


def seeing_themselves(call) -> np.ndarray | None:
    """``(R, Q)`` bool on the host (``R``: the spec's rows, 1 or ``B``): the query rows certain to see a key, their
    own position. A spec of the varlen form (``lowering.varlen_form``, chunks included) at default positions with
    ``Q == K`` allows the pair ``(i, i)`` wherever position ``i`` lies in a document (an id >= 0, or no document part)
    and no key padding marks it: causal masks and windows keep the diagonal, a document or a chunk holds each of its
    positions. A subset of the rows that see a key, so the counts of :func:`rows_seeing_themselves` and
    :func:`diagonal_pairs_seeing_themselves` are lower bounds for the estimates' floors (``Backend.floor``). ``None``
    for any other call, and off the CPU. Kept with the plans; O(R·K) on host views."""
    return cached(call, "seeing_themselves", _seeing_themselves)


def _seeing_themselves(call) -> np.ndarray | None:
    form = _host_form(call)
    real = None if form is None else _call_real_keys(call, form)
    if real is None or form.document is None:
        return real
    ids = form.document.doc_ids
    if ids.dim() != 2 or ids.shape[1] < call.kv_len:
        return None
    return real & (_host(ids)[:, : call.kv_len] >= 0)


def rows_seeing_themselves(call) -> int:
    """Query rows of the whole batch in :func:`seeing_themselves` (0 where it is ``None``)."""
    seen = seeing_themselves(call)
    if seen is None:
        return 0
    return int(np.count_nonzero(seen)) * (call.batch if seen.shape[0] == 1 else 1)


def diagonal_pairs_seeing_themselves(call, block: int) -> int:
    """Pairs of the diagonal tiles (query tile ``i`` of ``block`` rows against key tile ``i``; ``Q == K``, the last
    tile ``Q - (ceil(Q / block) - 1)·block`` square) whose query tile holds a row of :func:`seeing_themselves`, over
    the whole batch (0 where it is ``None``): a tiled backend computes at least that tile for each, the one holding
    the row's own key."""
    seen = seeing_themselves(call)
    if seen is None:
        return 0
    held, sides = _tiles_holding(seen, block)
    return int((held * sides**2).sum()) * (call.batch if seen.shape[0] == 1 else 1)


def _tiles_holding(marks: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``(R, n)`` bool, whether each tile of ``block`` positions of the ``(R, L)`` bool ``marks`` holds a marked one,
    and ``(n,)`` int64, each tile's positions (``block``, the last ``L - (n - 1)·block``)."""
    rows, length = marks.shape
    n = -(-length // block)
    padded = np.zeros((rows, n * block), dtype=bool)
    padded[:, :length] = marks
    sides = np.full(n, block, dtype=np.int64)
    sides[-1:] = length - (n - 1) * block
    return padded.reshape(rows, n, block).any(-1), sides


def padded_tile_pairs(call, block: int) -> int:
    """Pairs of the tiles (``block`` square but for the last tile row and column, as
    :func:`diagonal_pairs_seeing_themselves` counts them) that hold an allowed pair, over the whole batch, for padded
    rows: ``[causal() | full()] & key_padding(m)`` (no window, document or chunks; ``Q == K`` at default positions;
    ``_host_form``), where every query, padding included, sees every real key at or before it (causal) or every real
    key (full). Query tile ``t`` then needs key tile ``u`` exactly where ``u`` holds a real key and, when causal,
    ``u <= t``: the tiles any tiled backend computes. 0 for any other call. O(R·K) on the padding's host view."""
    form = _host_form(call)
    if form is None or form.window is not None or form.document is not None or form.chunked is not None:
        return 0
    real = _call_real_keys(call, form)
    if real is None or real.shape[0] not in (1, call.batch):
        return 0
    held, sides = _tiles_holding(real, block)
    keys = held * sides  # (R, n): the keys of each key tile holding a real one
    if form.causal:
        pairs = int((np.cumsum(keys, axis=1) @ sides).sum())  # query tile t: its rows times the keys of tiles <= t
    else:
        pairs = int(keys.sum()) * real.shape[1]
    return pairs * (call.batch if real.shape[0] == 1 else 1)


def built_varlen_plan(call) -> VarlenPlan | None:
    """The call's varlen plan when one is already built (``"native"``, asked before the backends with floors, builds
    it), else ``None``: a floor reads it without building one."""
    plan = call_plans(call).get("varlen")
    return plan if isinstance(plan, VarlenPlan) else None


def built_exact_plan(call) -> VarlenPlan | None:
    """:func:`built_varlen_plan`, else ``"native"``'s plan when it is built (:func:`native_plan`: right padding under
    a causal mask, where varlen's refuses, with the padding queries that see real keys in their row's segment), else
    ``None``. Either plan's segments and rule allow exactly the call's pairs, so the bounds a floor reads from them
    (the key tiles a segment needs, the most keys a query sees) hold for any backend."""
    built = built_varlen_plan(call)
    if built is not None:
        return built
    plan = call_plans(call).get("native")
    return plan if isinstance(plan, VarlenPlan) else None


def cheap_varlen_plan(call) -> VarlenPlan | None:
    """The call's varlen plan (:func:`varlen_plan`) where it is built in one C call or a few numpy ones (packed
    documents, padded rows: ``_document_plan``, ``_padded_plan``; CPU, default positions, ``Q == K``) or is already
    built; ``None`` for any other call, whose plan would take the general lowering (~40 torch calls)."""
    built = built_varlen_plan(call)
    if built is not None:
        return built
    form = _host_form(call)
    if form is None or form.chunked is not None or (form.document is None and not form.key_padding):
        return None
    plan = varlen_plan(call)
    return plan if isinstance(plan, VarlenPlan) else None


def whole_row_rule(call) -> str | None:
    """``"causal"`` or ``"full"`` where the call's spec allows, at its shape, exactly what ``causal()`` (``Q == K``) or
    ``full()`` would: its varlen plan, already built or cheap to build (:func:`cheap_varlen_plan`), holds one segment
    per batch row with every query and every key of the row at offset 0, and no window (``causal() &
    document(seq_lens=[L])``, padding that pads nothing); ``None`` for any other call. Cached with the call's plans
    under ``"whole_rows"``; O(B) past the plan."""
    return cached(call, "whole_rows", _whole_row_rule)


def _whole_row_rule(call) -> str | None:
    plan = cheap_varlen_plan(call) if call.batch else None
    if plan is None or plan.window is not None or plan.segments.shape[0] != call.batch:
        return None
    if plan.causal and call.q_len != call.kv_len:
        return None
    s = plan.segments.numpy()
    whole = (s[:, 1] == 0) & (s[:, 2] == call.q_len) & (s[:, 3] == 0) & (s[:, 4] == call.kv_len) & (s[:, 5] == 0)
    if not whole.all() or not np.array_equal(np.sort(s[:, 0]), np.arange(call.batch)):
        return None
    return "causal" if plan.causal else "full"


def most_keys_floor(call) -> int:
    """At most how many keys some query of the call sees, from below, without building a plan: a plan already built
    (:func:`built_exact_plan`; :func:`most_keys_seen`, exact), else for padded rows (``[causal() | full()] &
    key_padding(m)``, no window, no document, no chunks, ``Q == K`` at default positions) the most real keys of a row,
    all of which the row's last query sees; 0 where neither applies. O(N) on a plan's segments or O(R·K) on the
    padding's host view."""
    built = built_exact_plan(call)
    if built is not None:
        return most_keys_seen(built)
    form = _host_form(call)
    if form is None or form.window is not None or form.document is not None or form.chunked is not None:
        return 0
    real = _call_real_keys(call, form) if form.key_padding else None
    return 0 if real is None else int(np.count_nonzero(real, axis=1).max(initial=0))


def most_keys_seen(plan: VarlenPlan) -> int:
    """The most keys any query of ``plan`` sees (exact: the plan's segments and rule are the call's mask): per
    segment, its last query's keys, ``min(k_len, q_len + offset)`` when causal (at least 0), capped by the window.
    O(N): one pass in C (``attnmask_most_keys_seen``; three numpy operations cost ~25-50 us right after a kernel), or
    :func:`_most_keys_seen_numpy` where the kernel is not built."""
    lib = _clib.library()
    if isinstance(lib, str):
        return _most_keys_seen_numpy(plan)
    address, _held = segments_address(plan.segments)
    window = -1 if plan.window is None else plan.window
    return int(lib.attnmask_most_keys_seen(address, plan.segments.shape[0], int(plan.causal), window))


def _most_keys_seen_numpy(plan: VarlenPlan) -> int:
    """:func:`most_keys_seen` in numpy, on the segments' view."""
    s = plan.segments.numpy()
    if not len(s):
        return 0
    # np.minimum / np.maximum, not np.clip: its Python wrapper costs several times the arithmetic on ~100 segments
    seen = np.minimum(np.maximum(s[:, 2] + s[:, 5], 0), s[:, 4]) if plan.causal or plan.window is not None else s[:, 4]
    most = int(seen.max(initial=0))
    return most if plan.window is None else min(most, plan.window)


def _host_form(call) -> VarlenForm | None:
    """The varlen form (``lowering.varlen_form``) of a CPU call's spec where the host-side counts and plans here read
    it: default positions, ``Q == K``, pairs to compute, any window at least one position wide; else ``None``."""
    spec = call.mask
    if not isinstance(spec, M.MaskSpec) or off_cpu(call) or call.positions_given or call.q_len != call.kv_len:
        return None
    if degenerate(call) is not None:
        return None
    try:
        form = varlen_form(spec)
    except BackendError:
        return None
    return None if form.window is not None and form.window < 1 else form


def _call_real_keys(call, form: VarlenForm) -> np.ndarray | None:
    """``_real_keys(form, call.kv_len)`` for the form of the call's spec, read once per spec and signature (kept with
    the plans under ``"real_keys"``): choosing for a padded batch asks for it from its fraction, floors and plans (five
    reads of the padding before). Read-only."""
    return cached(call, "real_keys", lambda c: _real_keys(form, c.kv_len))


def _real_keys(form: VarlenForm, length: int) -> np.ndarray | None:
    """``(R, length)`` bool on the host: the AND of ``form``'s padding masks over the first ``length`` positions
    (``(1, length)`` True without one); ``None`` when a mask does not cover them."""
    real = None
    for pad in form.key_padding:
        mask = pad.attention_mask
        if mask.dim() != 2 or mask.shape[1] < length:
            return None
        real = _host(mask)[:, :length] != 0 if real is None else real & (_host(mask)[:, :length] != 0)
    return np.ones((1, length), dtype=bool) if real is None else real


def _host(t: torch.Tensor) -> np.ndarray:
    """``t`` as a numpy array: a view of a CPU tensor's memory (no copy, no torch call), else a host copy."""
    return t.numpy() if t.device.type == "cpu" and not t.requires_grad else t.detach().cpu().numpy()


def _build_varlen_plan(call) -> VarlenPlan | str:
    if (empty := degenerate(call)) is not None:
        return empty
    if (fast := _document_plan(call)) is not None or (fast := _padded_plan(call)) is not None:
        return fast
    if (fast := _decode_plan(call)) is not None:
        return fast
    args = call_varlen_args(call)
    if isinstance(args, str):
        return args
    spec = call.mask
    window = None if args.window_size[0] < 0 else args.window_size[0] + 1
    segs = segments_from_varlen(args, call.batch, call.q_len, call.kv_len, spec.batch_size or 1)
    return VarlenPlan(check_segments(segs, call.q, call.k, call.v), args.causal, window)


# Segments a batch row is planned for before they are counted: one C call cuts and counts the rows of up to this many
# documents each (many short documents: 8-16 a row of 256 in bench_small_rows.py), a second one writes the segments
# of rows that hold more. The tensor then holds this many rows a batch row (768 bytes).
_SEGMENTS_GUESS = 16


def _document_plan(call) -> VarlenPlan | None:
    """The plan of ``[causal() | full()] & [sliding_window(w)] & document(...) & [key_padding(m)]`` (packed rows:
    what ``pack`` and the training integrations build) with ``Q == K`` at default positions on CPU int64 ids, cut by
    ``attnmask_doc_segments`` in one C call (check, write, count; a second when a row holds more than
    ``_SEGMENTS_GUESS`` documents) instead of ``lowering.varlen_args`` and
    ``segments_from_varlen`` (~40 torch calls, 1-2 ms right after an attention kernel on rows of 8 x 256). The same
    segments in the same order (tested); ``None`` for any other call, without the library, for ids that are not one
    run per document and for padding inside a document (the general path then says why)."""
    lib = _clib.library()
    form = None if isinstance(lib, str) else _host_form(call)
    if form is None or form.document is None or form.chunked is not None:
        return None
    ids, length = form.document.doc_ids, call.kv_len
    if ids.device.type != "cpu" or ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[1] < length:
        return None
    if ids.shape[0] not in (1, call.batch):
        return None
    if form.key_padding:  # padding outside the documents (a packed row's tail) leaves the segments as they are
        real = _real_keys(form, length)
        if real is None or ((_host(ids)[:, :length] >= 0) & ~real).any():
            return None
    args = (ids.data_ptr(), ids.shape[0], length, *ids.stride(), call.batch)
    cap = _SEGMENTS_GUESS * call.batch
    segs = torch.empty((cap, 6), dtype=torch.int64)
    count = lib.attnmask_doc_segments(*args, segs.data_ptr(), cap)
    if count < 0:
        return None
    if count > cap:  # more documents than guessed: written again, in full
        segs = torch.empty((count, 6), dtype=torch.int64)
        lib.attnmask_doc_segments(*args, segs.data_ptr(), count)
    return VarlenPlan(segs[:count], form.causal, form.window)


def _padded_plan(call, padding_queries: bool = False) -> VarlenPlan | str | None:
    """The plan of padded rows, ``[causal() | full()] & [sliding_window(w)] & key_padding(m)...`` with ``Q == K`` at
    default positions on CPU masks, from the padding's host view instead of ``lowering.varlen_args`` (~40 torch calls,
    1.5 ms on rows of 8 x 1,024 right after an attention kernel): one segment per row with real tokens, or the general
    path's refusal where a padding query sees a real key (right padding under a causal mask). The same plan or refusal
    (tested); ``None`` for any other call and for rows whose real tokens are not one run (the general path then says
    so). O(R·K): ``_padded_cut``, one pass in C (``attnmask_padded_segments``) that both plans read, or its numpy
    form where the library is not built (~15 operations, run twice: ~110 us of a fresh spec's choice on 8 right-padded
    rows of 256 right after a kernel, where the C cut takes ~60).

    ``padding_queries``: instead of that refusal, such a row's segment takes its padding queries too, over the same
    keys (``native_plan``): under a causal mask or a window the queries from the run's first to the row's end (one
    after the run, at position ``p``, sees the run's keys up to ``p``: all of them, unless a window leaves it fewer);
    otherwise every query of the row, each seeing the whole run. One segment per row still, so no two share a key.
    Example: a causal row of 6 with 4 real tokens first gives ``[0, 0, 6, 0, 4, 0]`` (queries 4 and 5 see keys 0-3)."""
    cut = padded_cut(call)
    if cut is None:
        return None
    form, segs, attends = cut
    if attends and not padding_queries:
        return _PADDING_QUERIES_ATTEND
    return VarlenPlan(segs, form.causal, form.window)


def padded_cut(call) -> tuple[VarlenForm, torch.Tensor, bool] | None:
    """:func:`_padded_cut` of the call, kept with its plans under ``"padded_cut"``: varlen's plan, native's and
    "sdpa"'s padded split all read it, so one cut serves them all."""
    return cached(call, "padded_cut", _padded_cut)


def _padded_cut(call) -> tuple[VarlenForm, torch.Tensor, bool] | None:
    """For ``_padded_plan``: the call's padded form, its segments with the padding queries that see real keys taken
    in, and whether there are such queries; ``None`` where it has no plan (another form, a mask that does not cover
    the row, a row whose real tokens are not one run). One padding mask (``key_padding`` holds it as bool) is read
    where it is stored, through its strides (its copy, ``_real_keys``, took ~45 us of a fresh spec's choice on 8 rows
    of 256 right after a kernel); several masks through that copy, their AND."""
    form = _host_form(call)
    if form is None or form.document is not None or form.chunked is not None or not form.key_padding:
        return None
    return _cut_padding(call, form)


def _cut_padding(call, form: VarlenForm) -> tuple[VarlenForm, torch.Tensor, bool] | None:
    """``_padded_cut`` of ``form``'s padding over the call's ``K`` keys, as if its ``Q`` were ``K``."""
    lib = _clib.library()
    if not isinstance(lib, str) and len(form.key_padding) == 1:
        mask = form.key_padding[0].attention_mask
        rows_fit = mask.dim() == 2 and mask.shape[1] >= call.kv_len and mask.shape[0] in (1, call.batch)
        if mask.dtype == torch.bool and mask.device.type == "cpu" and rows_fit:
            return _padded_cut_c(lib, call, form, (mask.data_ptr(), mask.shape[0], *mask.stride()))
    real = _call_real_keys(call, form)
    if real is None or real.shape[0] not in (1, call.batch):
        return None
    if isinstance(lib, str) or real.dtype != np.bool_ or not (real.flags.c_contiguous and real.flags.writeable):
        return _padded_cut_numpy(call, form, real)
    held = ctypes.c_char.from_buffer(real)  # the address of a writable array's buffer (see float64_address)
    return _padded_cut_c(lib, call, form, (ctypes.addressof(held), real.shape[0], real.strides[0], 1))


def _padded_cut_c(lib, call, form: VarlenForm, mask: tuple) -> tuple[VarlenForm, torch.Tensor, bool] | None:
    """``attnmask_padded_segments`` on ``mask``, bool: (address, rows, row stride, column stride)."""
    address, rows, row_stride, col_stride = mask
    banded, window = form.causal or form.window is not None, -1 if form.window is None else form.window
    segs = torch.empty((call.batch, 6), dtype=torch.int64)
    args = (rows, call.kv_len, row_stride, col_stride, call.batch, banded, window)
    found = lib.attnmask_padded_segments(address, *args, segs.data_ptr())
    if found < 0:
        return None  # holes in a row's real tokens
    count, attends = divmod(found, 2)
    return form, segs[:count], bool(attends)


def _padded_cut_numpy(call, form: VarlenForm, real: np.ndarray) -> tuple[VarlenForm, torch.Tensor, bool] | None:
    """:func:`_padded_cut` in numpy, on the real keys' host view (a few vectorised operations)."""
    length, banded = call.kv_len, form.causal or form.window is not None
    n_real = np.count_nonzero(real, axis=1)
    first = np.where(n_real > 0, real.argmax(axis=1), 0)
    end = first + n_real
    pos = np.arange(length)
    if not np.array_equal((pos >= first[:, None]) & (pos < end[:, None]), real):
        return None  # holes in a row's real tokens
    right = (n_real > 0) & (end < length)  # padding queries after the run
    left = (n_real > 0) & (first > 0)  # ... and before it
    if banded:  # the kernels' rule: no key after the query; the first one after the run sees the run's last keys
        # unless a window of one position keeps it alone
        attends = right & (form.window is None or form.window > 1)
    else:
        attends = right | left
    rows = np.flatnonzero(n_real > 0)
    q_start, q_len, offset = first[rows], n_real[rows], np.zeros_like(rows)
    wide = attends[rows]  # rows whose padding queries join the segment
    if banded:
        q_len = np.where(wide, length - q_start, q_len)
    else:
        q_start, offset = np.where(wide, 0, q_start), np.where(wide, -first[rows], offset)
        q_len = np.where(wide, length, q_len)
    segs = np.stack([rows, q_start, q_len, first[rows], n_real[rows], offset], axis=1)
    if real.shape[0] == 1 and call.batch != 1:  # one spec row for the batch: its segments for every row
        segs = np.tile(segs, (call.batch, 1))
        segs[:, 0] = np.repeat(np.arange(call.batch), len(rows))
    return form, torch.from_numpy(segs.astype(np.int64)), bool(attends.any())


def _decode_plan(call) -> VarlenPlan | str | None:
    """The plan of a call with fewer queries than keys (a decoding step: the queries are the last ``Q`` of the ``K``
    positions, the default ones) under ``[causal() | full()] & [sliding_window(w)] & [key_padding(m)]`` on CPU: each
    row's run of real keys (``_cut_padding``: one pass in C over a bool mask, or its numpy form; a spec without
    padding has one run of ``K``) cut to the queries inside it, ``O(R·K)``, instead of ``lowering.varlen_args`` and
    ``segments_from_varlen`` (~40 torch calls: 0.6-0.8 ms of a fresh spec's call on 1-8 rows of 1-4K keys, against
    native's kernel at 0.1-0.3 ms; a generation step's spec is fresh at its first layer). The general path's plan or
    refusal (padding queries that see real keys), the same segments in the same order (tested); ``None`` for any
    other call and for rows whose real keys are not one run (the general path then says why).

    Example: ``causal() & key_padding([[0, 0, 1, 1, 1]])`` with two queries (positions 3 and 4) gives
    ``[[0, 0, 2, 2, 3, 1]]``: queries 0-1 against keys 2-4, the first query one position past the first key."""
    spec = call.mask
    if not 0 < call.q_len < call.kv_len or not isinstance(spec, M.MaskSpec) or off_cpu(call) or call.positions_given:
        return None
    try:
        form = varlen_form(spec)
    except BackendError:
        return None
    if form.document is not None or form.chunked is not None or (form.window is not None and form.window < 1):
        return None
    length, first_query = call.kv_len, call.kv_len - call.q_len
    if form.key_padding:
        cut = _cut_padding(call, form)
        if cut is None:
            return None
        runs = cut[1].numpy()
        rows, first, n_real = runs[:, 0], runs[:, 3], runs[:, 4]
    else:
        rows, first, n_real = np.arange(call.batch), np.zeros(call.batch, np.int64), np.full(call.batch, length)
    end = first + n_real
    right = end < length  # padding queries after the run (every row here has real keys)
    if form.causal:  # the first one after the run sees its last keys unless the window has moved past them
        after = np.maximum(end, first_query)
        attends = right if form.window is None else right & (after - form.window + 1 < end)
    else:
        attends = right | (first > first_query)
    if attends.any():
        return _PADDING_QUERIES_ATTEND
    q_first = np.maximum(first, first_query)
    keep = end > q_first
    segs = np.stack([rows, q_first - first_query, end - q_first, first, n_real, q_first - first], axis=1)[keep]
    return VarlenPlan(torch.from_numpy(np.ascontiguousarray(segs, dtype=np.int64)), form.causal, form.window)


def native_plan(call) -> VarlenPlan | str:
    """``varlen_plan``, and for padded rows whose padding queries see real keys (right padding under ``causal()``,
    either side under ``full()``), where a varlen kernel has no form, the same segments with those queries in them
    (``_padded_plan(call, padding_queries=True)``): a segment may hold more queries than keys, each query seeing the
    keys its rule allows. Cached per spec and signature under ``"native"``."""
    return cached(call, "native", _build_native_plan)


def _build_native_plan(call) -> VarlenPlan | str:
    plan = varlen_plan(call)
    if not (isinstance(plan, str) and plan == _PADDING_QUERIES_ATTEND):
        return plan
    with_queries = _padded_plan(call, padding_queries=True)
    return plan if with_queries is None else with_queries
