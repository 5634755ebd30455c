"""Attention that honours a mask spec on every backend, with one semantics for all of them.

``attention(q, k, v, mask)`` validates its inputs, packs them into an :class:`AttentionCall` and hands it to a
backend from a small registry. ``backend="auto"`` picks the cheapest registered backend that supports the call.

Semantics every backend obeys (the tests hold each one to ``tests/naive.py::naive_attention``):

- ``q``: ``(B, H, Q, D)``; ``k``: ``(B, Hkv, K, D)``; ``v``: ``(B, Hkv, K, Dv)``; output ``(B, H, Q, Dv)`` in
  ``q``'s dtype. ``H % Hkv == 0``: query head ``h`` reads key/value head ``h // (H // Hkv)`` (grouped-query attention).
- ``mask``: ``None`` (every query sees every key), a :class:`~attnmask.masks.MaskSpec` (evaluated at query positions
  ``K - Q .. K - 1`` and key positions ``0 .. K - 1``, bottom-right aligned, unless ``q_positions`` /
  ``kv_positions`` are given: exactly as ``MaskSpec.to_dense``), or a bool tensor broadcastable to ``(B, H, Q, K)``.
  True means "may attend".
- A query row with no allowed key returns exactly 0, and its gradient with respect to ``q``, ``k`` and ``v`` is
  exactly 0: never NaN, never a uniform average over the masked keys.
- ``dropout_p`` (attention dropout, as SDPA's): each attention probability, after the softmax, is zeroed with
  probability ``p`` and the kept ones are scaled by ``1 / (1 - p)``, independently per (row, head, query, key); the
  output's expectation is the output without dropout. Dropout never moves weight to a masked key (a key the mask
  denies has probability 0 before and after), and a row with no allowed key still returns exactly 0. It is applied
  whenever ``dropout_p > 0`` (a functional API: pass 0 in evaluation); masks are drawn from torch's global RNG
  (SDPA takes no generator), so ``torch.manual_seed`` (or ``torch.random.fork_rng``) makes a backend's result
  reproducible, while two backends draw different masks for the same seed. Backends ``"reference"``, ``"sdpa"`` and
  ``"varlen"`` declare it; the others declare they have none, so ``"auto"`` never picks them for such a call.
  ``dropout_p=0`` runs exactly the code without dropout (bit-for-bit, no RNG draw).

Masked keys never affect the output: a query's result reads only the keys and values its mask allows, so a NaN or
an infinity in a key or value it may not see leaves it untouched, on every backend. A query that may see one gets NaN
(always, for a NaN), or what float arithmetic makes of it (an infinite value, an infinite output; a key whose score is
``-inf``, a weight of 0), by backend and by whether a gradient is recorded. A NaN in a query makes its row NaN where
it has an allowed key; a row with no allowed key gives 0 whatever its query. (For a backend that may read denied keys,
``attention`` checks for non-finite values in one pass: over the output, after the run, on a call without a gradient
where the backend declares that a denied non-finite value can only show there (``propagates_nonfinite``); else over
the keys and values before it. When they are not finite, the backend runs on cleaned keys and values and a second,
cheap run finds the queries that see a non-finite one: those get NaN.)

Backends: one module each under ``attnmask/backends/`` builds a :class:`Backend` (``backends/contract.py``) that
declares what it supports (devices, dtypes, mask kinds, dropout, backward, score modifiers, whether ``"auto"`` may
pick it) and gives ``run``, ``cost`` and, for what no declaration can say, ``unsupported``, each a function of one
:class:`AttentionCall`. ``attnmask.backends.REGISTRY`` lists them in priority order; :func:`register_backend` adds
one at run time. ``Backend.not_supported_reasons`` turns the declarations into reasons, which drive ``"auto"``, the
error of a refused ``backend=`` and :func:`explain`.

Worked example, two queries decoding against four cached keys (bottom-right: the queries sit at positions 2 and 3)::

    >>> q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    >>> attention(q, k, v, causal()).shape
    torch.Size([1, 4, 2, 8])
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch

from attnmask import tuning
from attnmask._checks import check_strided
from attnmask.backends import REGISTRY, _common, _workers
from attnmask.backends._common import allowed_fraction, causal_fraction, off_cpu
from attnmask.backends._workers import all_threads
from attnmask.backends.contract import (
    AttentionCall,
    Backend,
    active_transforms,
    check_dropout_p,
    check_score_mods,
    dense_mask,
    no_floor,
    rows_with_keys,
)
from attnmask.errors import BackendError, DeviceError, DTypeError, InputError, ShapeError, bad
from attnmask.masks import Causal, MaskSpec, resolve_positions
from attnmask.plancache import adopt_plans, call_plans, remember_call, repeated_call

__all__ = [
    "AttentionCall",
    "Backend",
    "Explanation",
    "attention",
    "available_backends",
    "choose_backend",
    "dense_mask",
    "explain",
    "register_backend",
    "rows_with_keys",
]


# ----------------------------------------------------------------------------------------------------------------------
# The registry

_BACKENDS: dict[str, Backend] = {b.name: b for b in REGISTRY}
"""The run-time registry: ``attnmask.backends.REGISTRY`` in its order, then the backends registered later."""


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Add ``backend`` to the registry that ``attention(..., backend=name)`` and ``"auto"`` draw from (after the
    built-in ones: a tie in cost goes to the earlier backend)."""
    if not isinstance(backend, Backend):
        raise bad(BackendError, "backend", "a Backend", type(backend).__name__)
    if backend.name == "auto" or (backend.name in _BACKENDS and not replace):
        raise bad(BackendError, "backend.name", "a new name (pass replace=True to override)", repr(backend.name))
    _BACKENDS[backend.name] = backend
    return backend


def available_backends() -> tuple[str, ...]:
    """Names of the registered backends, in priority order."""
    return tuple(_BACKENDS)


# Small rows on CPU: where torch's SDPA kernel holds a row's keys in one block, its one fused call beats every built-in
# structural backend unless the mask denies most pairs: their per-document and per-tile calls (and their backward)
# cost more than the pairs they skip. Measured with benchmarks/bench_hf_train.py (benchmarks/RESULTS.md, "Small
# rows", 2026-11): on rows of 128 to 512 keys allowing 0.23-0.43 of the pairs, "sdpa" was the fastest forward +
# backward (by 1.0-3x); at 0.13 and below the per-document backends won (by 1.2-6x). Rows of 257-512 keys are left
# to the costs since: with the backends of 2026-12, allowing 0.24-0.32 of the pairs (packed documents of 180 and 400
# tokens, windows of half the row), SDPA ran 1.07-1.82x slower than the fastest backend in all 24 such cells at
# D = 16-128 (benchmarks/bench_head_dim.py, an AMD EPYC, 2 threads; RESULTS.md, issue 15, "Head sizes").
# A causal window alone (allowed_fraction counts it too): windows of half the row on rows of 256, 1 and 2 threads,
# float32 and bfloat16, forward and forward + backward, SDPA within 1.1x of the fastest (RESULTS.md, issue 15, "Small
# windows take the stock path"); the costs had picked banded, 2.65x slower than SDPA, on rows of 256 (one thread,
# forward).
# Head sizes: the rule was measured at D = 16 (the tiny Llama of bench_hf_train.py); where D + Dv passes 128 a pair's
# products outweigh the per-call work the rule saves. On rows of 256 at D = 128, SDPA ran over 1.1x the fastest
# backend's time in 44 of 48 rule cells (1.10-1.42x; documents of 180 and 400 tokens, windows of half the row, forward
# and forward + backward, the eight float32 tables of benchmarks/head_dim at 1 and 2 threads), at D = 64 in 16 of 48
# (1.10-1.34x), at D = 16-32 in none (RESULTS.md, issue 15, "A charge per blocksparse call").
# With a backward the products weigh more: at D = 64 SDPA ran over 1.1x the fastest in 19 of the 48 float32 rule
# cells of the AMD EPYC's tables with a backward (1.10-1.19x) where the costs' pick did in 5, in bfloat16 12 of 18
# against 2; at D = 32 in none (RESULTS.md, issue 15, "Rows sliced one by one in the backward").
# bfloat16 with a backward is left to the costs at every head size: torch's bfloat16 SDPA backward at small heads ran
# 1.16-1.22x the fastest backend's time in the Xeon's rule cells at D = 16 (RESULTS.md, issue 15, "SDPA's bfloat16
# backward at small heads"), and its estimate now prices that backward at its own width.
# A masked call on rows of more than _STOCK_NATIVE_KEYS keys that "native" can run is left to the costs since native's
# blocked form (2026-12-06, Xeon, 2 threads): on rows of 256 at D = 16-64 native ran 1.03-1.32x faster than SDPA on
# documents of ~180 and ~400 tokens and windows of half the row (benchmarks/bench_head_dim.py), and the tiny Llama's
# training step on rows of 256 read 1.06-1.08x packed + dense-mask SDPA with the costs deciding against 1.00-1.04x
# with the rule (bench_hf_train.py; rows of 128: 1.00-1.02x against 1.04-1.05x, so they keep it). Where native cannot
# run the call the rule holds. Right padding under causal() (padding queries that see real keys) it runs since its
# plan puts those queries in the row's segment: on 8 right-padded rows of 256 at two threads a fresh spec then ran
# 1.39x stock SDPA's speed forward and 1.31x with a backward, the costs picking native (0.86x / 0.92x under the rule;
# planning included), 1.78x / 1.46x repeated (bench_small_rows.py; RESULTS.md, issue 15, "native's blocked form",
# "Right padding on native").
_STOCK_MAX_KEYS = 256
_STOCK_NATIVE_KEYS = 128
_STOCK_MIN_FRACTION = 0.2
_STOCK_MAX_WIDTH = 128
_STOCK_MAX_WIDTH_BACKWARD = 64
# Decoding steps (at most _STOCK_DECODE_QUERIES queries, fewer than the keys) on rows of any length whose spec allows
# at least _STOCK_DECODE_MIN_FRACTION of the pairs (padded rows, plain causal): each query sees nearly every key, which
# SDPA reads in one pass (grouped heads folded into one call, sdpa._folds), where the others read the same keys in
# more calls. A fresh spec each step (a cache that grows by one) had every backend planned and costed at every step's
# first layer: B = 8, H = 4 / 2, D = 16, 1,000 keys, one query: 2.5 ms a call against stock SDPA's 0.22 ms, the costs
# picking sdpa all the same (RESULTS.md, issue 15, "Repeated calls and decoding steps").
# Float32 and float64 only: one bfloat16 query on a CPU without AMX tiles takes torch's kernel 4-7x its float32 time
# (sdpa._BF16_ONE_QUERY_KEY_COSTS), where `native` ran such a step 2.5-5.8x faster (limit_tables/s27_8k2_bf16.txt,
# s29_q2.txt); half precision is left to the costs.
_STOCK_DECODE_QUERIES = 16
_STOCK_DECODE_MIN_FRACTION = 0.8
_STOCK_DECODE_DTYPES = (torch.float32, torch.float64)
# ... except, on a CPU without AMX tiles, a step of more than _STOCK_DECODE_WORKS[1] multiply-adds (B·H·Q·K·(D + Dv))
# that "native" runs: its estimates decide (native's own charge for a decoding step, native._DECODE_SCALES; and a
# step of one query with grouped heads runs folded, native._folded_step). On the AMD EPYC, repeated calls, native ran
# such steps 1.3-2.0x faster than SDPA (float32, 1 and 8 rows, 4,096-32,768 keys), and the replayed limit tables read
# 189 of 192 rows within 1.1x of the fastest (181 under the rule; RESULTS.md, issue 15, "Decoding steps by their
# estimates"). The bound: the costs' choice on a fresh spec takes ~0.15 ms more than the rule's, more than native saves
# on a step of 0.2-0.5M multiply-adds (SDPA 0.1-0.3 ms) and less than it saves from ~8M (0.4 ms and more); a
# generation step's spec is fresh at its first layer. The Xeon with AMX tiles keeps the rule: its decoding steps'
# charge was not measured after the fold (its float32 tables replay the same picks either way).
_STOCK_DECODE_WORKS = (math.inf, float(1 << 22))
# Calls of at most this many multiply-adds (B·H·Q·K·(D + Dv)) on rows of at most _STOCK_MAX_KEYS keys take the rule
# without counting their pairs: SDPA runs them in tens of microseconds, less than counting (~0.1 ms of numpy on a
# decoding step's padded rows) and far less than planning the others.
_STOCK_TINY_WORK = 1 << 20
_BUILT_IN = frozenset(id(b) for b in REGISTRY)


def _stock(call: AttentionCall, registry: tuple[Backend, ...]) -> Backend | None:
    """``"sdpa"`` (what stock attention runs: one SDPA call with the dense mask, or ``is_causal``) for a CPU call on
    rows of at most ``_STOCK_MAX_KEYS`` keys, or a decoding step (at most ``_STOCK_DECODE_QUERIES`` queries, fewer
    than the keys) on rows of any length, without a mask or with plain ``causal()`` (``Q == K``), or with heads of
    ``D + Dv`` at most ``_STOCK_MAX_WIDTH`` (``_STOCK_MAX_WIDTH_BACKWARD`` when the call records a backward, which
    must not be in bfloat16) and a spec allowing at least ``_STOCK_MIN_FRACTION`` of the pairs
    (``_STOCK_DECODE_MIN_FRACTION`` on rows past ``_STOCK_MAX_KEYS``; ``_stock_fraction``: a few O(B·K) operations,
    not counted for a call of at most ``_STOCK_TINY_WORK`` multiply-adds on short rows), decided without planning or
    costing the other backends; on rows of more than ``_STOCK_NATIVE_KEYS`` keys such a masked call (not a decoding
    step, nor a call of at most ``_STOCK_TINY_WORK``) only where ``"native"`` cannot run it (``_native_runs``: its
    plan, which the costs would build anyway). A decoding step of more than ``_STOCK_DECODE_WORKS`` multiply-adds
    (per CPU kind) that ``"native"`` runs is left to the costs.
    ``None`` for any other call (the costs decide), and whenever ``registry`` holds a backend registered at run time
    (the crossover was measured against the built-in ones only). The call's own conditions come first: on the costs
    path (masked rows, few pairs) the fraction alone refuses, and SDPA's support is not asked twice."""
    if off_cpu(call):
        return None
    short = call.kv_len <= _STOCK_MAX_KEYS
    decoding = call.q_len <= min(_STOCK_DECODE_QUERIES, call.kv_len - 1) and call.q.dtype in _STOCK_DECODE_DTYPES
    if not short and not decoding:
        return None
    if decoding and not short and _work(call) > _common.per_cpu_kind(_STOCK_DECODE_WORKS):
        if _native_runs(call, registry):
            return None
    if not (call.is_full or call.is_plain_causal):
        if call.head_dim + call.value_dim > (_STOCK_MAX_WIDTH_BACKWARD if call.needs_grad else _STOCK_MAX_WIDTH):
            return None
        if call.needs_grad and call.q.dtype == torch.bfloat16:
            return None
        if not short or _work(call) > _STOCK_TINY_WORK:
            # native's plan first: where it runs the call the fraction cannot keep the rule, and the costs build
            # that plan anyway (the fraction's count was 30-36 us of a fresh spec's choice right after a kernel)
            if call.kv_len > _STOCK_NATIVE_KEYS and not decoding and _native_runs(call, registry):
                return None
            fraction = _stock_fraction(call)
            if fraction is None or fraction < (_STOCK_MIN_FRACTION if short else _STOCK_DECODE_MIN_FRACTION):
                return None
    sdpa = _BACKENDS.get("sdpa")
    if sdpa is None or any(id(b) not in _BUILT_IN for b in registry) or not any(b is sdpa for b in registry):
        return None
    if not sdpa.auto_on(call.device_type) or sdpa.not_supported_reasons(call):
        return None
    return sdpa


def _work(call: AttentionCall) -> int:
    """The call's multiply-adds as one dense call computes them: ``B·H·Q·K·(D + Dv)``."""
    return call.batch * call.heads * call.q_len * call.kv_len * (call.head_dim + call.value_dim)


def _native_runs(call: AttentionCall, registry: tuple[Backend, ...]) -> bool:
    """Whether the registered ``"native"`` backend may run ``call`` under ``"auto"``."""
    native = _BACKENDS.get("native")
    if native is None or not any(b is native for b in registry) or not native.auto_on(call.device_type):
        return False
    return not native.not_supported_reasons(call)


def _stock_fraction(call: AttentionCall) -> float | None:
    """``_common.allowed_fraction``, and for a plain ``causal()`` with fewer queries than keys at the default
    positions (query ``i`` of ``Q`` sees ``K - Q + 1 + i`` keys) its exact fraction; ``None`` for a custom spec."""
    if not isinstance(call.mask, MaskSpec) or not call.mask.is_structural:
        return None
    if type(call.mask) is Causal and not call.positions_given and 0 < call.q_len <= call.kv_len:
        return causal_fraction(call.q_len, call.kv_len)
    return allowed_fraction(call)


def _pick(call: AttentionCall, registry: tuple[Backend, ...]) -> tuple[Backend | None, dict, list]:
    """The backend ``"auto"`` picks for ``call`` among ``registry``: ``_stock`` on small rows, else the cheapest that
    supports it (ties: the earlier); the reasons of every backend that refused and the eligible backends with their
    estimates, cheapest first (both empty after ``_stock``)."""
    stock = _stock(call, registry)
    if stock is not None:
        return stock, {}, []
    ranked, refused = _ranked(call, registry)
    return (ranked[0][0] if ranked else None), refused, ranked


def _ranked(
    call: AttentionCall, registry: tuple[Backend, ...], margin: float | None = None
) -> tuple[list[tuple[Backend, float]], dict]:
    """The backends of ``registry`` that ``"auto"`` may pick for ``call`` with their estimated costs, cheapest first
    (ties: the earlier in ``registry``), and the reasons of every backend that refused.

    With ``margin``, the backends without a floor (``Backend.floor``) are asked first, and a backend whose floor
    passes ``margin`` times the cheapest estimate in hand is left out of both: its estimate would too, so it could
    not be picked (``margin`` 1) nor be a tuning candidate (``margin``: tuning's ``spread``), and neither its plan
    nor its ``unsupported`` is built. A backend ``"auto"`` may not pick on the call's device (not declared there, or
    ``auto`` excludes it) is asked for its reasons only when no backend serves the call. On small rows of many
    documents this skips the layouts and band plans of the backends that cost several times the cheapest
    (RESULTS.md, issue 15, "Floors")."""
    order = range(len(registry)) if margin is None else _floors_last(registry)
    refused, ranked, best, idle = {}, [], math.inf, []
    transforms = active_transforms()  # a backend that does not run under them builds no plan (they read host data)
    for i in order:
        b = registry[i]
        here = call.device_type in b.devices and b.auto_on(call.device_type) and transforms <= b.transforms
        if margin is not None and not here:
            idle.append(i)  # cannot be picked here: its reasons only matter when nothing else serves
            continue
        if margin is not None and best < math.inf and b.floor is not no_floor and b.floor(call) > margin * best:
            continue
        reasons = b.not_supported_reasons(call)
        if reasons:
            refused[i] = reasons
        elif b.auto_on(call.device_type):
            cost = b.cost(call)
            ranked.append((cost, i, b))
            best = min(best, cost)
    if not ranked:
        refused.update((i, reasons) for i in idle if (reasons := registry[i].not_supported_reasons(call)))
    ranked.sort(key=lambda item: item[:2])
    return [(b, cost) for cost, _, b in ranked], {registry[i].name: refused[i] for i in sorted(refused)}


_floors_last_made: list = [(), []]  # (registry, its order): the registry changes only when a backend is registered


def _floors_last(registry: tuple[Backend, ...]) -> list[int]:
    """The indices of ``registry``, those of the backends without a floor first (stable)."""
    made_for, order = _floors_last_made
    if made_for != registry:  # compares identities first: a few ns for the same backends
        order = sorted(range(len(registry)), key=lambda i: registry[i].floor is not no_floor)
        _floors_last_made[:] = [registry, order]
    return order


def _busy(call: AttentionCall) -> bool:
    """Whether other processes hold cores a CPU call's threads would use (``_workers.contended``; False off the CPU)."""
    return call.device_type == "cpu" and _workers.contended()


def _reasons_text(refused: dict[str, list[str]]) -> str:
    return "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in refused.items())


def choose_backend(call: AttentionCall, backend: str = "auto") -> Backend:
    """The backend named ``backend``, or for ``"auto"`` the cheapest registered backend that supports ``call``
    (on small CPU rows that most pairs may attend, ``"sdpa"`` without costing the others: ``_stock``).

    Ties go to the backend registered first; a backend whose ``auto`` excludes the call's device is only used by
    name. Raises ``BackendError`` for an unknown name, or for a call the named backend (or, for ``"auto"``, every
    backend) refuses, listing every reason. The ``"auto"`` choice is cached with the call's plans
    (``attnmask.plancache``: per spec object and call signature) together with the registry it was made from, the
    thread count the estimates saw (``_workers.threads_available()``) and whether other processes held cores then
    (``_workers.contended()``: the estimates apply their busy factors), so a repeated spec and shape in the same
    conditions skips every ``unsupported`` and ``cost``: these may depend only on the spec, the shapes, strides, dtype
    and device of q, k, v, whether a gradient is needed, the call's scalar fields (the scale), that thread count and
    that load, never on tensor values outside the spec. A choice ``_stock`` made holds whatever the thread count and
    the load (it reads neither), so it asks for neither: the load check is ~30 us right after a kernel.

    With measured tuning on (:func:`attnmask.autotune`, ``ATTNMASK_AUTOTUNE=1``; ``attnmask.tuning``), ``"auto"``
    runs, for a call with several close candidates, the one timed fastest on an earlier call of the same kind
    (timing them on that kind's second call); the estimates decide until then.
    """
    if backend == "auto":
        plans = call_plans(call)
        registry, threads = tuple(_BACKENDS.values()), _workers.threads_available()
        # under a functorch transform the backends it allows differ: chosen afresh, and not kept for later calls
        transformed = bool(active_transforms())
        made = None if transformed else plans.get("auto")
        # (registry, threads, busy, chosen, ranked, margin); a choice _stock made reads neither the threads nor the
        # load (None); ranked holds every backend within margin of the cheapest (_ranked), enough for tuning's spread
        settings = tuning.settings()
        margin = settings.spread if settings.enabled else 1.0
        valid = made is not None and made[0] == registry and made[5] >= margin
        valid = valid and (made[1] is None or made[1:3] == (threads, _busy(call)))
        if not valid:
            stock = _stock(call, registry)
            if stock is not None:
                made = (registry, None, None, stock, [], math.inf)
            else:
                busy = _busy(call)
                with _workers.load_as_read(busy):  # every estimate of this choice sees the load read once
                    ranked, refused = _ranked(call, registry, margin)
                if not ranked:
                    expected = "a registered backend that supports these inputs"
                    raise bad(BackendError, "backend", expected, _reasons_text(refused))
                made = (registry, threads, busy, ranked[0][0], ranked, margin)
            if not transformed:
                plans["auto"] = made
        if len(made[4]) > 1 and settings.enabled:
            return tuning.choose(call, made[4], threads, made[2], plans)
        return made[3]
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise bad(BackendError, "backend", f"one of {['auto', *_BACKENDS]}", repr(backend))
    chosen = _BACKENDS[backend]
    reasons = chosen.not_supported_reasons(call)
    if reasons:
        raise bad(
            BackendError, "backend", f"a backend that supports these inputs ({backend!r} cannot)", "; ".join(reasons)
        )
    return chosen


# ----------------------------------------------------------------------------------------------------------------------
# Explaining the choice


@dataclass(frozen=True)
class Explanation:
    """What ``"auto"`` sees for one call: per registered backend (in priority order) its estimated cost (``None``
    when it refuses), its refusal reasons and whether ``"auto"`` may pick it; the backend ``"auto"`` picks (``None``
    when none serves the call) and, then, why. ``str()`` prints a table."""

    backends: tuple[str, ...]
    costs: tuple[float | None, ...]
    reasons: tuple[tuple[str, ...], ...]
    auto_eligible: tuple[bool, ...]
    picked: str | None
    stock: bool = False
    """Whether ``"auto"`` took the small-rows shortcut to ``"sdpa"`` (``_stock``) instead of the lowest cost."""
    measured: tuning.TunedChoice | None = None
    """With tuning on, the measured choice for this kind of call when there is one (``picked`` follows it)."""

    @property
    def why_none(self) -> str | None:
        """``None`` when ``"auto"`` picks a backend, else every backend's reasons in one line."""
        if self.picked is not None:
            return None
        return "; ".join(
            f"{n}: {', '.join(r) or 'named only'}" for n, r in zip(self.backends, self.reasons, strict=True)
        )

    def __str__(self) -> str:
        rows = [("backend", "cost", "auto", "why not")]
        for name, cost, reasons, eligible in zip(
            self.backends, self.costs, self.reasons, self.auto_eligible, strict=True
        ):
            mark = "<- picked" if name == self.picked else ("yes" if eligible else "named only")
            rows.append((name, "-" if cost is None else f"{cost:.3g}", mark, "; ".join(reasons)))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths, strict=True)) + "  " + r[3] for r in rows]
        lines = [line.rstrip() for line in lines]
        if self.picked is None:
            lines.append("auto picks nothing: no backend serves this call")
        elif self.stock:
            lines.append(f"auto picks: {self.picked} (small rows that most pairs may attend: stock SDPA, not costed)")
        elif self.measured is not None:
            times = ", ".join(f"{name} {ms:.3g} ms" for name, ms in self.measured.times_ms)
            lines.append(f"auto picks: {self.picked} (measured: {times}; the estimates pick {self.measured.estimated})")
        else:
            lines.append(f"auto picks: {self.picked}")
        return "\n".join(lines)


def explain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: MaskSpec | torch.Tensor | None = None,
    *,
    scale: float | None = None,
    q_positions: torch.Tensor | None = None,
    kv_positions: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> Explanation:
    """Which backend ``attention(q, k, v, mask, ...)`` with ``backend="auto"`` would run, every backend's estimated
    cost and why each other one refuses; computes no attention. Arguments as :func:`attention` (and validated the
    same way). Example::

        print(attnmask.explain(q, k, v, causal() & document(seq_lens=[3, 5])))
        backend      cost     auto        why not
        reference    1.2e+04  yes
        sdpa         2.3e+03  <- picked
        varlen       ...
    """
    mods = dict(softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes)
    q, k, v = autocast_inputs(q, k, v)  # the dtypes attention() would hand its backend under the active autocast
    call = _prepare_call(q, k, v, mask, scale, q_positions, kv_positions, dropout_p, **mods)
    registry = tuple(_BACKENDS.values())
    picked, _, ranked = _pick(call, registry)
    reasons = tuple(tuple(b.not_supported_reasons(call)) for b in registry)
    costs = tuple(None if r else float(b.cost(call)) for b, r in zip(registry, reasons, strict=True))
    eligible = tuple(b.auto_on(call.device_type) for b in registry)
    names = tuple(b.name for b in registry)
    stock = picked is not None and not ranked  # _stock decided, without costing the others
    measured = None if stock else _measured(call, ranked)
    if measured is not None:
        picked = _BACKENDS.get(measured.picked, picked)
    return Explanation(names, costs, reasons, eligible, None if picked is None else picked.name, stock, measured)


def _measured(call: AttentionCall, ranked: list[tuple[Backend, float]]) -> tuning.TunedChoice | None:
    """The measured choice tuning holds for ``call``'s kind (``ranked``: ``_pick``'s), if tuning is on and has timed
    it."""
    settings = tuning.settings()
    if not settings.enabled:
        return None
    close = tuning.candidates(call, ranked, settings.spread, settings.candidates)
    if len(close) < 2:
        return None
    return tuning.lookup(tuning.tuning_key(call, close, _workers.threads_available(), _busy(call)))


# ----------------------------------------------------------------------------------------------------------------------
# The public function


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: MaskSpec | torch.Tensor | None = None,
    *,
    backend: str = "auto",
    scale: float | None = None,
    q_positions: torch.Tensor | None = None,
    kv_positions: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention honouring ``mask``; rows with no allowed key give exactly 0.

    - ``q``: ``(B, H, Q, D)``; ``k``: ``(B, Hkv, K, D)``; ``v``: ``(B, Hkv, K, Dv)``, ``H % Hkv == 0``, one floating
      dtype and one device. Returns ``(B, H, Q, Dv)`` in that dtype. Mixed dtypes: under autocast (CPU or CUDA,
      bfloat16 or float16) every non-float64 input is cast to the autocast dtype first, exactly as autocast casts
      SDPA's inputs, and the output is in that dtype (``autocast_inputs``); outside autocast, mixed dtypes are a
      ``DTypeError``, as SDPA refuses them.
    - ``mask``: ``None``, a ``MaskSpec`` (queries bottom-right aligned unless ``q_positions`` / ``kv_positions`` are
      given, as ``MaskSpec.to_dense``), or a bool tensor broadcastable to ``(B, H, Q, K)``; True = may attend.
      A per-head spec (``custom(fn, heads=H)``, ``from_mask_mod(mod, heads=H)`` and what is combined with them) needs
      ``q`` with exactly ``H`` heads (per *query* head under grouped-query attention; else a ``ShapeError`` naming
      both) and runs on the backends that declare ``per_head``: ``"reference"``, ``"sdpa"`` (an O(B·H·Q·K) mask)
      and ``"flex"``; the others refuse it.
    - ``backend``: ``"auto"`` (cheapest that supports the inputs, by estimated cost; on CPU rows of at most 256 keys
      whose spec allows at least a fifth of the pairs, ``"sdpa"``, decided without planning the others), ``"sdpa"``,
      ``"reference"``, ``"varlen"`` (per document), ``"blocksparse"`` (tiles of a block layout) or ``"flex"`` (compiled
      FlexAttention, opt-in; ``attnmask.backends.flex``), ``"banded"`` (rows of many short documents: one SDPA call on
      a narrow band of small tiles, ``attnmask.backends.banded``), ``"native"`` (per document in a small C kernel
      built on first use: rows of many short documents, ``attnmask.backends.native``), or one registered later.
      ``scale`` defaults to ``D ** -0.5``.
    - ``dropout_p``: attention dropout in ``[0, 1)`` on the probabilities after the softmax, kept ones scaled by
      ``1 / (1 - p)`` (applied whenever > 0: pass 0 in evaluation). Only ``"reference"``, ``"sdpa"`` and
      ``"varlen"`` support it (``"auto"`` chooses among them); reproducible under ``torch.manual_seed`` for a given
      backend. See the module docstring.
    - Score modifiers, carried with the call (never as dense tensors; a backend that does not declare one refuses
      it, and ``"auto"`` chooses among those that do: ``"reference"``, ``"native"`` and, for sinks and ALiBi,
      ``"sdpa"``). Each score ``s = scale · q·k`` becomes, in this order and before the mask:

      - ``softcap`` (a float > 0; Gemma2's ``attn_logit_softcapping``): ``s -> softcap · tanh(s / softcap)``;
      - ``alibi_slopes`` (``(H,)`` float, no gradient; ALiBi): ``s -> s - slope_h · (q_pos - k_pos)`` at the positions
        the mask is evaluated at (bottom-right aligned, or ``q_positions`` / ``kv_positions``);

      and ``sinks`` (``(H,)`` float, gpt-oss's learned sinks) adds ``exp(sinks[h])`` to each row's softmax
      denominator only, as a virtual key whose value is 0: the weights of a row sum to less than 1. The sink does
      not see the softcap, the ALiBi term nor the mask; a row with no allowed key still returns exactly 0 (and a zero
      gradient, the sink's included). Differentiable in ``sinks`` when it requires a gradient.

    Memory: ``"sdpa"`` builds an O(B·Q·K) bool mask from a spec (none for ``None``, ``full()``, a plain
    ``causal()`` with ``Q == K``, which uses ``is_causal``, and, forward-only in float32 / float64 on CPU, a plain
    ``causal()`` with ``Q < K``: an unmasked and an ``is_causal`` part merged by log-sum-exp); ``"reference"``
    materialises O(B·H·Q·K) float32 scores; ``"varlen"`` and ``"blocksparse"`` never build more than one document's
    or one tile group's mask; ``"banded"`` builds an O(B·L·W·bs) bool mask of its band; ``"native"`` builds no mask
    at all. With ``dropout_p > 0``, torch's CPU SDPA runs its unfused kernel, which holds the O(B·H·Q·K)
    probabilities and dropout mask (``"varlen"``: one document group's at a time).

    Inside functorch transforms only the backends that declare them run (``Backend.transforms``): under
    ``torch.func.grad`` (``vjp``, ``jacrev``) ``"reference"`` and ``"sdpa"``, which ``"auto"`` then chooses between;
    any other backend, and every call inside ``torch.func.vmap``, raises a ``BackendError`` naming the transform.

    Masked keys never affect the output: a NaN or infinity in a key or value that a query may not see leaves that
    query's output untouched on every backend; a query that may see one gets NaN (always, for a NaN), or what float
    arithmetic makes of it (see the module docstring).

    Example: ``attention(q, k, v, causal() & key_padding(batch.attention_mask))`` on a left-padded batch gives 0 at
    the padding queries, which see no key.
    """
    if transforms := active_transforms():
        _check_transforms(transforms, backend)
    autocasting = _autocasting(q)
    if autocasting:
        q, k, v = autocast_inputs(q, k, v)
    with torch.autocast(q.device.type, enabled=False) if autocasting else contextlib.nullcontext():
        plain = q_positions is None and kv_positions is None and not transforms
        plain = plain and softcap is None and sinks is None and alibi_slopes is None
        key = _repeat_key(q, k, v, mask, scale, dropout_p) if plain else None
        call = None if key is None else _repeated_call(q, k, v, mask, key)
        if call is None:
            mods = dict(softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes)
            call = _prepare_call(q, k, v, mask, scale, q_positions, kv_positions, dropout_p, **mods)
            if key is not None:
                remember_call(call, key, (call.scale, call.dropout_p, {name: getattr(call, name) for name in _DERIVED}))
        chosen = choose_backend(call, backend)
        if not chosen.reads_masked_keys or call.masks_no_key:
            return chosen.run(call)
        span = chosen.masked_key_span(call)
        if span != _EVERY_KEY:
            k, v = call.k[:, :, span], call.v[:, :, span]
        if _checks_output(chosen, call, k, v):
            out = chosen.run(call)
            return out if _all_finite(out) or _all_finite(k, v) else _contained(chosen, call)
        return chosen.run(call) if _all_finite(k, v) else _contained(chosen, call)


# ----------------------------------------------------------------------------------------------------------------------
# Repeated calls: the layers of a model, each with the spec object of the first and inputs of the same kind

_EVERY_KEY = slice(None)
# The derived sizes and kinds a repeated call copies from the first instead of computing them again: ``AttentionCall``'s
# ``_once`` fields that depend only on the shapes, the spec and the modifiers present (not whether an input requires a
# gradient, which the key holds only for the call as a whole).
_DERIVED = (
    "batch",
    "heads",
    "kv_heads",
    "q_len",
    "kv_len",
    "head_dim",
    "value_dim",
    "device_type",
    "score_mods",
    "mask_heads",
    "is_plain_causal",
    "is_full",
    "masks_no_key",
)


def _repeat_key(q, k, v, mask, scale, dropout_p) -> tuple | None:
    """For a call on a spec at the default positions without score modifiers (the caller checks those) and outside
    torch.compile's tracing: what every check of ``_prepare_call`` and the plans' signature read (the exact types,
    shapes, strides, dtypes and devices of q, k, v, whether autograd records the call, the scale and the dropout
    probability as given, with their types), so that a call with the same key and spec passes them as the first one
    with that key did; ``None`` where the inputs are not plain dense tensors (a subclass, sparse, nested), whose checks
    always run. ~3 us against ~10-20 for the checks themselves."""
    if not isinstance(mask, MaskSpec) or type(q) is not torch.Tensor or type(k) is not torch.Tensor:
        return None
    if type(v) is not torch.Tensor or q.is_nested or k.is_nested or v.is_nested or torch.compiler.is_compiling():
        return None
    if q.layout is not torch.strided or k.layout is not torch.strided or v.layout is not torch.strided:
        return None
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    devices = (q.device, k.device, v.device)
    shapes = (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype)
    return (*shapes, *devices, grad, type(scale), scale, type(dropout_p), dropout_p)


def _repeated_call(q, k, v, spec: MaskSpec, key: tuple) -> AttentionCall | None:
    """The call of ``q``, ``k``, ``v`` on ``spec``, rebuilt from the first call with the same ``key``
    (``plancache.repeated_call``: while the spec's tensors are unchanged) and holding its plans, or ``None``."""
    kept = repeated_call(spec, key)
    if kept is None:
        return None
    (scale, dropout_p, derived), found = kept
    q_pos, kv_pos = _default_positions(derived["q_len"], derived["kv_len"], q.device)
    call = AttentionCall(q, k, v, spec, scale, q_pos, kv_pos, False, dropout_p)
    call.__dict__.update(derived)
    adopt_plans(call, found)
    return call


def _check_transforms(transforms: frozenset[str], backend: str) -> None:
    """Under functorch transforms (``contract.active_transforms``), a ``BackendError`` unless ``backend`` (or, for
    ``"auto"``, some registered backend) declares every one of them (``Backend.transforms``): raised before the
    call is validated, whose checks read values a transform such as ``vmap`` cannot give."""
    able = [b.name for b in _BACKENDS.values() if transforms <= b.transforms]
    if backend == "auto" and not able or backend != "auto" and backend in _BACKENDS and backend not in able:
        which = "a registered backend" if backend == "auto" else f"backend {backend!r}"
        declared, names = ", ".join(able) if able else "none", ", ".join(sorted(transforms))
        expected = f"{which} that runs under torch.func transforms {names} (declared: {declared})"
        raise bad(BackendError, "backend", expected, "called inside " + ", ".join(sorted(transforms)))


def _autocasting(t: torch.Tensor) -> bool:
    return isinstance(t, torch.Tensor) and torch.is_autocast_enabled(t.device.type)


def autocast_inputs(q, k, v) -> tuple:
    """``q``, ``k``, ``v`` as SDPA receives them under the autocast active on ``q``'s device, else unchanged.

    Autocast runs ``scaled_dot_product_attention`` in its lower precision: every floating input that is not float64
    is cast to the autocast dtype (bfloat16 or float16), whatever mix of dtypes the model handed over (rotary
    embeddings often leave ``q`` and ``k`` in float32 beside a bfloat16 ``v``). The backend then runs with autocast
    disabled, so it computes in its declared precision for that dtype and returns that dtype, as SDPA does.
    """
    if not _autocasting(q):
        return q, k, v
    dtype = torch.get_autocast_dtype(q.device.type)

    def cast(t):
        eligible = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (torch.float64, dtype)
        return t.to(dtype) if eligible else t

    return cast(q), cast(k), cast(v)


_WIDE_RANGE = (torch.bfloat16, torch.float32, torch.float64)  # dtypes whose sums overflow no sooner than float32's


def _checks_output(backend: Backend, call: AttentionCall, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``attention`` scans ``call``'s output for non-finite values after the run instead of the keys and
    values ``k``, ``v`` (the span a denied key may be read in) before it: for a backend that declares
    ``propagates_nonfinite`` on the call's device (a denied non-finite key or value leaves its output as it is or
    makes it non-finite, never a different finite value), on a call without a gradient (its backward could still
    carry the value: a 0 probability times a NaN score gradient) nor dropout, whose output ``(B, H, Q, Dv)`` has no
    more elements than ``k`` and ``v``. A finite output is then the answer; a non-finite one falls back to the key
    scan (and ``_contained``). The output has just been written (in cache), the keys and values often not: on rows
    of 8 x 256 tokens (bench_small_rows.py's batches, float32 and bfloat16, one and two threads) the forward call
    measured 1-5% faster, alternating in one process."""
    if call.device_type not in backend.propagates_nonfinite or call.dropout_p or call.needs_grad:
        return False
    return call.batch * call.heads * call.q_len * call.value_dim <= k.numel() + v.numel()


def _all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every element of ``tensors`` is finite: a tensor's sum is finite exactly when no element is NaN or
    infinite, or when the sum of finite ones overflows, which the exact elementwise check then settles. One
    vectorised pass over each (for keys and values O(K·(D + Dv)), against attention's O(Q·K·(D + Dv)));
    ``isfinite(t).all()`` costs several times more. The sums are in the inputs' dtype where its range is float32's
    (bfloat16: (8, 4, 256, 64), one thread, 0.18 against 0.73 ms summed into float32), else in float32 at least
    (float16 would overflow on sums of ordinary activations and fall back to the exact check), read as a Python float
    (``item``: ~0.08 ms less than a ``torch.isfinite`` call on it, right after a kernel). Off the CPU the sums are
    added and read back once: there each read waits for every kernel queued before it (a sum of finite sums is finite
    exactly when each is; an overflow or ``inf - inf`` sends every tensor to the exact check). On the CPU a read costs
    nothing and the addition ~3 us: one read per sum."""
    if not tensors[0].is_cpu:
        return _all_finite_read_once(tensors)
    # torch's threads while no other process holds a core, else the free ones only (issue 15): on (8, 4, 256, 64)
    # float32 at two threads, right after SDPA, 0.32-0.35 against 0.40-0.41 ms on one thread (serial_steps). Sums
    # below torch's grain size run on the calling thread anyway: no thread count to set.
    elements = sum(t.numel() for t in tensors)
    if elements < _ONE_THREAD_ELEMENTS:
        return _sums_finite(tensors)
    with all_threads(elements):
        return _sums_finite(tensors)


_ONE_THREAD_ELEMENTS = 32768  # torch's CPU grain size (at::internal::GRAIN_SIZE): a smaller reduction is not split


def _sums_finite(tensors) -> bool:
    for t in tensors:
        total = t.sum(dtype=t.dtype if t.dtype in _WIDE_RANGE else torch.promote_types(t.dtype, torch.float32))
        if not math.isfinite(total.item()) and not bool(torch.isfinite(t).all()):
            return False
    return True


def _all_finite_read_once(tensors) -> bool:
    """``_all_finite`` off the CPU: the sums added, one read-back (one synchronisation with the queued kernels)."""
    wide = [
        t.sum(dtype=t.dtype if t.dtype in _WIDE_RANGE else torch.promote_types(t.dtype, torch.float32)) for t in tensors
    ]
    return math.isfinite(sum(wide[1:], wide[0]).item()) or all(bool(torch.isfinite(t).all()) for t in tensors)


def _contained(backend: Backend, call: AttentionCall) -> torch.Tensor:
    """``backend`` on a call with a NaN or infinity among its keys or values, keeping them from the queries that may
    not see them: the backend runs on keys and values with those entries set to 0, and a second run (queries 0, so
    every allowed key gets the same weight; values 1 on a non-finite key, else 0) finds the queries that give a
    non-finite key weight; their output is NaN. Masked-out keys thus never reach the output, as the semantics say,
    whatever the backend's kernel does with masked scores."""
    finite_k, finite_v = torch.isfinite(call.k), torch.isfinite(call.v)
    clean = dataclasses.replace(call, k=call.k.masked_fill(~finite_k, 0.0), v=call.v.masked_fill(~finite_v, 0.0))
    out = backend.run(clean)
    bad = ~(finite_k.all(-1, keepdim=True) & finite_v.all(-1, keepdim=True))  # (B, Hkv, K, 1)
    # Score modifiers dropped from the probe: without them every allowed key gets the same weight, which no sink or
    # slope can round down to 0.
    plain = dict(dropout_p=0.0, softcap=None, sinks=None, alibi_slopes=None)
    probe = dataclasses.replace(clean, q=torch.zeros_like(call.q), v=bad.to(call.q.dtype), **plain)
    with torch.no_grad():
        sees_bad = backend.run(probe) > 0  # (B, H, Q, 1)
    return out.masked_fill(sees_bad, float("nan"))


def _prepare_call(
    q, k, v, mask, scale, q_positions, kv_positions, dropout_p=0.0, *, softcap=None, sinks=None, alibi_slopes=None
) -> AttentionCall:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise bad(InputError, name, "a torch.Tensor", type(t).__name__)
        check_strided(name, t)
        if t.dim() != 4:
            layout = "(B, H, Q, D)" if name == "q" else f"(B, Hkv, K, {'D' if name == 'k' else 'Dv'})"
            raise bad(ShapeError, name, f"a 4D tensor {layout}", f"shape {tuple(t.shape)}")
    if not q.is_floating_point():
        raise bad(DTypeError, "q", "a floating dtype", q.dtype)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise bad(DTypeError, name, f"q's dtype {q.dtype}", t.dtype)
        if t.device != q.device:
            raise bad(DeviceError, name, f"q's device {q.device}", t.device)
    B, H, Q, D = q.shape
    if k.shape[0] != B:
        raise bad(ShapeError, "k", f"batch size {B} like q", f"shape {tuple(k.shape)}")
    if k.shape[3] != D:
        raise bad(ShapeError, "k", f"head dim {D} like q", f"shape {tuple(k.shape)}")
    if k.shape[1] == 0 or H % k.shape[1] != 0:
        raise bad(ShapeError, "k", f"a head count dividing q's {H} heads (grouped-query attention)", k.shape[1])
    if v.shape[:3] != k.shape[:3]:
        raise bad(ShapeError, "v", f"(B, Hkv, K) = {tuple(k.shape[:3])} like k", f"shape {tuple(v.shape)}")
    if scale is None:
        scale = D**-0.5 if D else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise bad(InputError, "scale", "a finite number or None", repr(scale))
    dropout_p = check_dropout_p(dropout_p)
    mods = check_score_mods(q, softcap, sinks, alibi_slopes)
    K = k.shape[2]
    if isinstance(mask, MaskSpec):
        call = _prepare_spec_call(q, k, v, mask, float(scale), q_positions, kv_positions, dropout_p)
        return dataclasses.replace(call, **mods) if mods else call
    for name, pos in (("q_positions", q_positions), ("kv_positions", kv_positions)):
        if pos is not None:
            raise bad(InputError, name, "None unless mask is a MaskSpec (positions only place a spec)", "a value")
    if mask is not None:
        _check_tensor_mask(mask, (B, H, Q, K), q.device)
        mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
    return AttentionCall(q, k, v, mask, float(scale), dropout_p=dropout_p, **mods)


def _prepare_spec_call(q, k, v, spec, scale, q_positions, kv_positions, dropout_p=0.0) -> AttentionCall:
    B, Q, K = q.shape[0], q.shape[2], k.shape[2]
    if spec.batch_size not in (None, 1, B):
        raise bad(ShapeError, "mask", f"a spec with per-row data for 1 or {B} rows (q's batch)", spec.batch_size)
    if spec.device is not None and spec.device != q.device:
        raise bad(DeviceError, "mask", f"a spec whose per-row data is on q's device {q.device}", spec.device)
    if spec.heads not in (None, q.shape[1]):
        raise bad(
            ShapeError, "mask", f"a per-head spec for q's {q.shape[1]} query heads", f"a spec of {spec.heads} heads"
        )
    for name, pos in (("q_positions", q_positions), ("kv_positions", kv_positions)):
        if isinstance(pos, torch.Tensor):
            if pos.device != q.device:
                raise bad(DeviceError, name, f"q's device {q.device}", pos.device)
            if pos.dim() == 2 and pos.shape[0] not in (1, B):
                raise bad(ShapeError, name, f"1 or {B} rows (q's batch)", f"shape {tuple(pos.shape)}")
    given = q_positions is not None or kv_positions is not None
    if given:
        q_pos, kv_pos = resolve_positions(Q, K, q_positions=q_positions, kv_positions=kv_positions, device=q.device)
    else:
        q_pos, kv_pos = _default_positions(Q, K, q.device)
    return AttentionCall(q, k, v, spec, scale, q_pos, kv_pos, given, dropout_p)


_POSITIONS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_POSITIONS_KEPT = 32


def _default_positions(Q: int, K: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``resolve_positions(Q, K, device=device)``: ``(Q,)`` and ``(K,)`` int64, shared by the calls of one ``(Q, K,
    device)`` so that planning a small call does not pay two tensor allocations (each ~0.05 ms right after an
    attention kernel has evicted the caches: ``bench_small_rows.py``). A pair that someone wrote into (its version
    moved) is rebuilt; inside ``torch.inference_mode`` (tensors without a version) nothing is shared. At most
    ``_POSITIONS_KEPT`` pairs are kept."""
    if torch.is_inference_mode_enabled():
        return resolve_positions(Q, K, device=device)
    key = (Q, K, device)
    pair = _POSITIONS.get(key)
    if pair is None or pair[0]._version or pair[1]._version:
        if len(_POSITIONS) >= _POSITIONS_KEPT:
            _POSITIONS.clear()
        pair = _POSITIONS[key] = resolve_positions(Q, K, device=device)
    return pair


def _check_tensor_mask(mask, target: tuple[int, int, int, int], device: torch.device) -> None:
    if not isinstance(mask, torch.Tensor):
        raise bad(InputError, "mask", "None, a MaskSpec or a bool tensor", type(mask).__name__)
    check_strided("mask", mask)
    if mask.dtype != torch.bool:
        raise bad(DTypeError, "mask", "a bool tensor (True = may attend) or a MaskSpec", mask.dtype)
    if mask.device != device:
        raise bad(DeviceError, "mask", f"q's device {device}", mask.device)
    shape = tuple(mask.shape)
    fits = mask.dim() <= 4 and all(
        m in (1, t) for m, t in zip(reversed(shape), reversed(target[-len(shape) :]), strict=True)
    )
    if not fits:
        hint = " (a (B, Q, K) mask from to_dense needs .unsqueeze(1))" if mask.dim() == 3 else ""
        raise bad(ShapeError, "mask", f"a bool tensor broadcastable to (B, H, Q, K) = {target}{hint}", shape)
