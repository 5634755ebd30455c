"""PYTHONPATH=src:. python benchmarks/device_check.py [--quick] [--dry-run] [--out results.json] [--budget 330]

The CUDA backends on a GPU, in one run (under 6 minutes on one H200, FlexAttention compiles included):

(a) Checks. Every CUDA backend ("sdpa", "flex", "cuda_varlen", "flash" when flash-attn is installed) against the
    float64 textbook attention on the GPU (``tests/naive.py``), forward and backward, in bfloat16, float16 and float32
    where the backend declares them: packed documents, left padding, documents with trailing padding, right padding,
    a sliding window, ``Q < K`` decoding; every case has grouped-query heads (H = 4, Hkv = 2). First, NaN in queries
    (forward): such a row NaN where it has a key, 0 where it has none. Rows with no allowed
    key must be exactly 0, with exactly 0 gradient. One line per case: PASS / FAIL / SKIP (with the declared reason)
    and the largest error as a share of the tolerance. FlexAttention compiles per shape, dtype and mask structure:
    it is checked in bfloat16 (right padding left out: left padding has its structure) and in float16 / float32 on
    packed documents only.
(b) Timings, forward + backward, bfloat16, H = 8, Hkv = 2, D = 128, one row: packed documents of mixed lengths at 16K
    and 128K tokens, sliding windows, tiny documents. Ours: the backend "auto" would pick among the CUDA backends by
    cost, and each CUDA backend that supports the call; the peers: dense SDPA with the dense bool mask (built before
    timing; skipped where it would not fit in memory), a per-document SDPA loop (``is_causal``), and FlexAttention
    with ``create_block_mask`` on a hand-written ``mask_mod`` (the stock way; its mask build is timed apart). Prints
    milliseconds, the ratio of each to auto's pick, and each backend's picoseconds per estimated cost unit (how far
    ``attnmask.backends.cuda_costs`` is from the clock: a good model has similar figures across backends).

``--fit F.json...``: ``attnmask.backends.cuda_costs.VARLEN_PAIR`` refitted from saved runs: the value they ran with
(``constants`` in the JSON; 1.0 for runs saved before it was recorded) times the geometric mean, over the scenarios
timed with both, of the varlen kernels' picoseconds per unit over FlexAttention's (pairs dominate both estimates).
``--quick``: the 16K scenarios only. ``--budget``: seconds after which remaining timings are skipped (and said so).
``--out``: write the results as JSON there and as markdown next to it (``.md``).
``--dry-run``: everything except the CUDA kernels, on the CPU, in well under a minute: the same checks and timing
harness on tiny shapes, with ``varlen_attn``, ``flash_attn_varlen_func`` and compiled FlexAttention replaced by the
emulators of their documented semantics in ``tests/kernel_emulators.py`` (FlexAttention forward only, as declared on a
CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]  # this checkout's attnmask and tests, whatever the environment

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import attnmask as am  # noqa: E402
from attnmask.backends import cuda_costs, cuda_varlen, flash, flex  # noqa: E402
from attnmask.backends.contract import AttentionCall, Backend  # noqa: E402
from attnmask.masks import resolve_positions  # noqa: E402
from tests import kernel_emulators  # noqa: E402
from tests.naive import naive_attention  # noqa: E402

# (atol, rtol) against float64 attention on the same rounded inputs: outputs, then gradients.
OUT_TOL = {torch.float32: (2e-4, 2e-3), torch.float16: (5e-3, 5e-3), torch.bfloat16: (4e-2, 3e-2)}
GRAD_TOL = {torch.float32: (1e-3, 1e-2), torch.float16: (3e-2, 2e-2), torch.bfloat16: (2.5e-1, 5e-2)}
CHECK_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# FlexAttention compiles per shape, dtype and mask structure (each compile takes seconds): every case in bfloat16, every
# dtype on packed documents, and not right padding, whose structure (causal & key_padding) left padding has.
FLEX_DTYPE, FLEX_ALL_DTYPES, FLEX_SKIPS = torch.bfloat16, "packed documents", ("right padding",)


# ----------------------------------------------------------------------------------------------------------------------
# The backends under check


def _sdpa_run(call) -> torch.Tensor:
    return am.attention(call.q, call.k, call.v, call.mask, backend="sdpa", scale=call.scale, dropout_p=call.dropout_p)


SDPA = Backend("sdpa", _sdpa_run, cuda_costs.sdpa_cost, devices=frozenset({"cpu", "cuda"}), dropout=True)
"""The registry's "sdpa" (run through ``attention``), declared for CUDA and costed by ``cuda_costs.sdpa_cost``."""


def cuda_backends(dry_run: bool) -> dict[str, Backend]:
    """The CUDA candidates; in a dry run declared for the CPU as well, their environment checks answered yes."""
    backends = {"sdpa": SDPA, "cuda_varlen": cuda_varlen.BACKEND, "flash": flash.BACKEND, "flex": flex.BACKEND}
    if dry_run:
        backends = {
            name: dataclasses.replace(b, devices=b.devices | {"cpu"}, available=lambda: None)
            for name, b in backends.items()
        }
    return backends


@contextlib.contextmanager
def cpu_stand_ins():
    """The dry run: the varlen kernels and FlexAttention replaced by emulators of their documented semantics."""
    with (
        mock.patch.object(cuda_varlen, "_varlen_attn", lambda: kernel_emulators.varlen_attn),
        mock.patch.object(flash, "_flash_attn_varlen_func", lambda: kernel_emulators.flash_attn_varlen_func),
        mock.patch.object(flex, "_flex", lambda: kernel_emulators.flex_attention),
    ):
        yield


def make_call(q, k, v, spec, dropout_p=0.0) -> AttentionCall:
    q_pos, kv_pos = resolve_positions(q.shape[2], k.shape[2], device=q.device)
    return AttentionCall(q, k, v, spec, q.shape[-1] ** -0.5, q_pos, kv_pos, dropout_p=dropout_p)


def auto_pick(backends: dict[str, Backend], call) -> Backend | None:
    """What "auto" picks among ``backends``: the cheapest that supports the call."""
    fits = [b for b in backends.values() if not b.not_supported_reasons(call)]
    return min(fits, key=lambda b: b.cost(call)) if fits else None


# ----------------------------------------------------------------------------------------------------------------------
# (a) Checks


def check_cases(length: int, device: torch.device) -> list[tuple[str, am.MaskSpec, int, int]]:
    """``(name, spec, Q, K)`` over 2 rows of ``length`` keys."""
    L = length
    third = L // 3
    docs = [[third, L - 2 * third - 5, third, 5], [L // 2, L // 4, L - L // 2 - L // 4]]
    short = [[third, third], [L // 2]]  # trailing positions in no document: queries that see no key
    left = torch.ones(2, L, dtype=torch.long, device=device)
    left[0, : L // 4] = 0
    right = torch.ones(2, L, dtype=torch.long, device=device)
    right[1, L - L // 5 :] = 0
    return [
        ("packed documents", am.causal() & am.document(seq_lens=docs, device=device), L, L),
        ("left padding", am.causal() & am.key_padding(left), L, L),
        ("documents + trailing padding", am.causal() & am.document(seq_lens=short, length=L, device=device), L, L),
        ("right padding", am.causal() & am.key_padding(right), L, L),
        ("sliding window", am.sliding_window(L // 5) & am.document(seq_lens=docs, device=device), L, L),
        ("decode Q < K", am.causal() & am.document(seq_lens=docs, device=device), L // 8, L),
    ]


def _max_ratio(got: torch.Tensor, want: torch.Tensor, tol: tuple[float, float]) -> tuple[float, float]:
    """Largest ``|got - want| / (atol + rtol |want|)`` (<= 1 passes) and largest absolute error."""
    if not got.numel():
        return 0.0, 0.0
    atol, rtol = tol
    err = (got.double() - want).abs()
    return float((err / (atol + rtol * want.abs())).max()), float(err.max())


def check(backend: Backend, name: str, spec, q_len: int, kv_len: int, dtype, device, seed: int = 0) -> dict:
    """One backend on one case: forward, backward where declared, empty rows exactly 0."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = [(2, 4, q_len, 64), (2, 2, kv_len, 64), (2, 2, kv_len, 64)]
    q, k, v = (torch.randn(s, generator=gen, device=device).to(dtype) for s in shapes)
    result = {
        "backend": backend.name,
        "case": name,
        "dtype": str(dtype).removeprefix("torch."),
        "Q": q_len,
        "K": kv_len,
    }
    for t in (q, k, v):
        t.requires_grad_()
    call = make_call(q, k, v, spec)
    reasons = backend.not_supported_reasons(call)
    backward = not reasons
    if reasons:  # forward only, on inputs that need no gradient (FlexAttention on a CPU refuses any that do)
        q, k, v = (t.detach() for t in (q, k, v))
        call = make_call(q, k, v, spec)
        forward_reasons = backend.not_supported_reasons(call)
        if forward_reasons:
            return result | {"status": "SKIP", "why": "; ".join(forward_reasons)}
        result["note"] = f"forward only ({'; '.join(reasons)})"
    try:
        out = backend.run(call)
        allowed = spec.to_dense(q_len, kv_len, device=device).unsqueeze(1)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        want = naive_attention(q64, k64, v64, allowed, scale=call.scale)
        ratio, err = _max_ratio(out, want, OUT_TOL[dtype])
        empty = ~allowed.any(-1, keepdim=True).expand(out.shape[0], out.shape[1], -1, 1)
        exact = bool((out.masked_select(empty) == 0).all())
        result |= {"out_err": err, "out_ratio": ratio, "empty_rows": int(empty.sum()) // out.shape[1]}
        if backward:
            dout = torch.randn(out.shape, generator=gen, device=device, dtype=torch.float64)
            got = torch.autograd.grad((out.double() * dout).sum(), (q, k, v))
            ref = torch.autograd.grad((want * dout).sum(), (q64, k64, v64))
            grad_ratios = [_max_ratio(g, r, GRAD_TOL[dtype]) for g, r in zip(got, ref, strict=True)]
            result |= {"grad_err": max(e for _, e in grad_ratios), "grad_ratio": max(r for r, _ in grad_ratios)}
            exact = exact and bool((got[0].masked_select(empty) == 0).all())
        result["empty_rows_exact"] = exact
        ok = ratio <= 1 and result.get("grad_ratio", 0) <= 1 and exact
        result["status"] = "PASS" if ok else "FAIL"
    except Exception as err:  # a crash is a failed check, not the end of the run
        result |= {"status": "FAIL", "why": f"{type(err).__name__}: {str(err)[:300]}"}
    return result


def nan_query_check(backend: Backend, dtype, device) -> dict:
    """A NaN in a query: its row NaN where it has an allowed key (a document of 10 keys, under the 16 keys where torch's
    fused CPU kernel read such a row as empty), exactly 0 where it has none (a padding row), every other row as the
    float64 reference. The backend's own run: ``attention`` scans keys and values, never queries."""
    L, gen = 40, torch.Generator(device=device).manual_seed(2)
    spec = am.causal() & am.document(seq_lens=[[30, 10], [20, 15]], length=L, device=device)
    q, k, v = (
        torch.randn(s, generator=gen, device=device).to(dtype) for s in [(2, 4, L, 64), (2, 2, L, 64), (2, 2, L, 64)]
    )
    clean = q.clone()
    q[0, 1, 33, 5] = q[1, 0, 3, 0] = q[1, 2, 37, 0] = float("nan")  # in the document of 10, in the first, in padding
    result = {
        "backend": backend.name,
        "case": "NaN queries",
        "dtype": str(dtype).removeprefix("torch."),
        "Q": L,
        "K": L,
    }
    call = make_call(q, k, v, spec)
    reasons = backend.not_supported_reasons(call)
    if reasons:
        return result | {"status": "SKIP", "why": "; ".join(reasons)}
    try:
        out = backend.run(call)
        allowed = spec.to_dense(L, L, device=device).unsqueeze(1)
        has_key = allowed.any(-1).expand(2, 4, L)
        nan_rows = q.isnan().any(-1) & has_key
        want = naive_attention(*(t.double() for t in (clean, k, v)), allowed, scale=call.scale)
        ratio, err = _max_ratio(out[~nan_rows], want[~nan_rows], OUT_TOL[dtype])
        wrong = int((out.isnan().any(-1) != nan_rows).sum())
        result |= {"out_err": err, "out_ratio": ratio, "empty_rows": int((~has_key).sum()) // 4}
        result["empty_rows_exact"] = bool((out[~has_key] == 0).all())
        result["note"] = f"rows whose NaN differs from the semantics: {wrong}"
        ok = ratio <= 1 and wrong == 0 and result["empty_rows_exact"]
        result["status"] = "PASS" if ok else "FAIL"
    except am.errors.AttnmaskError as err:  # refused when run (compiled FlexAttention on a CPU checks its result)
        result |= {"status": "SKIP", "why": f"refused: {str(err)[:200]}"}
    except Exception as err:
        result |= {"status": "FAIL", "why": f"{type(err).__name__}: {str(err)[:300]}"}
    return result


def run_checks(backends: dict[str, Backend], device, length: int, dtypes, log) -> list[dict]:
    results = []
    for backend in backends.values():
        for dtype in dtypes:
            if dtype in backend.dtypes and (backend.name != "flex" or dtype == FLEX_DTYPE):
                results.append(nan_query_check(backend, dtype, device))
                log(_check_line(results[-1]))
    for name, spec, q_len, kv_len in check_cases(length, device):
        for backend in backends.values():
            for dtype in dtypes:
                if dtype not in backend.dtypes:
                    continue
                if backend.name == "flex" and (name in FLEX_SKIPS or (dtype != FLEX_DTYPE and name != FLEX_ALL_DTYPES)):
                    continue
                r = check(backend, name, spec, q_len, kv_len, dtype, device)
                results.append(r)
                log(_check_line(r))
    return results


def _check_line(r: dict) -> str:
    head = f"{r['status']:4}  {r['backend']:11} {r['dtype']:8} {r['case']:28} Q={r['Q']:<5} K={r['K']:<5}"
    if r["status"] == "SKIP" or "out_err" not in r:
        return f"{head} {r.get('why', '')}"
    grads = f" grad err {r['grad_err']:.1e} ({r['grad_ratio']:.2f} of tol)" if "grad_err" in r else ""
    empty = f" empty rows {r['empty_rows']} exact={r['empty_rows_exact']}"
    return f"{head} out err {r['out_err']:.1e} ({r['out_ratio']:.2f} of tol){grads}{empty} {r.get('note', '')}"


# ----------------------------------------------------------------------------------------------------------------------
# (b) Timings


@dataclasses.dataclass(frozen=True)
class Scenario:
    title: str
    length: int
    doc_lens: tuple[int, ...] | None  # None: one document (a sliding window over the whole row)
    window: int | None


def mixed_lengths(total: int, shortest: int, longest: int, seed: int) -> tuple[int, ...]:
    """Document lengths drawn log-uniformly in ``[shortest, longest]`` until they fill ``total`` tokens exactly."""
    gen = torch.Generator().manual_seed(seed)
    lens, left = [], total
    lo, hi = torch.log(torch.tensor(float(shortest))), torch.log(torch.tensor(float(longest)))
    while left > 0:
        n = int(torch.exp(lo + (hi - lo) * torch.rand((), generator=gen)))
        lens.append(min(max(n, 1), left))
        left -= lens[-1]
    return tuple(lens)


def scenarios(quick: bool, dry_run: bool) -> list[Scenario]:
    if dry_run:
        return [
            Scenario("documents (mixed) 128", 128, mixed_lengths(128, 8, 64, 0), None),
            Scenario("sliding window 16, 128", 128, None, 16),
            Scenario("tiny documents (8) 64", 64, (8,) * 8, None),
        ]
    docs = Scenario("documents (mixed) 16K", 16384, mixed_lengths(16384, 64, 8192, 0), None)
    long = Scenario("documents (mixed) 128K", 131072, mixed_lengths(131072, 64, 32768, 1), None)
    tiny = Scenario("tiny documents (32) 16K", 16384, (32,) * 512, None)  # same shapes as docs: no new compile
    window = Scenario("sliding window 1024, 16K", 16384, None, 1024)
    return [docs, tiny, window] if quick else [docs, long, tiny, window]


def scenario_spec(s: Scenario, device) -> am.MaskSpec:
    if s.window is not None:
        return am.sliding_window(s.window)
    return am.causal() & am.document(seq_lens=list(s.doc_lens), device=device)


def stock_mask_mod(s: Scenario, device):
    """The hand-written FlexAttention predicate of the scenario, as a FlexAttention user writes it."""
    if s.window is not None:
        w = s.window
        return lambda b, h, q, k: (q >= k) & (q - k < w)
    doc = torch.repeat_interleave(torch.arange(len(s.doc_lens), device=device), torch.tensor(s.doc_lens, device=device))
    return lambda b, h, q, k: (doc[q] == doc[k]) & (q >= k)


class Clock:
    """Milliseconds of a callable: CUDA events on a GPU, ``perf_counter`` on the CPU; median of ``reps`` after one
    warm-up call (which compiles)."""

    def __init__(self, device, reps: int):
        self.cuda = device.type == "cuda"
        self.reps = reps

    def __call__(self, fn) -> float:
        fn()
        times = []
        for _ in range(self.reps):
            if self.cuda:
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                stop.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(stop))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def _step(attend, q, k, v, dout, backward: bool):
    """One forward (and backward) of ``attend(q, k, v)``."""

    def run():
        out = attend(q, k, v)
        if backward:
            torch.autograd.backward(out, dout)
            for t in (q, k, v):
                t.grad = None

    return run


def _dense_fits(length: int, device) -> bool:
    """A dense ``(1, 1, L, L)`` bool mask, the temporaries of its evaluation and SDPA's additive bfloat16 copy of it
    (about 5 bytes per pair) use under half the free memory."""
    need = length * length * 5
    if device.type != "cuda":
        return need < 2**30
    free, _ = torch.cuda.mem_get_info(device)
    return need < free // 2


TIMING_HEADS = {"cuda": (8, 2, 128), "cpu": (4, 2, 32)}  # (H, Hkv, D): the dry run keeps the harness, not the size


def time_scenario(s: Scenario, backends: dict[str, Backend], device, clock: Clock, backward: bool, log) -> dict:
    gen = torch.Generator(device=device).manual_seed(1)
    dtype = torch.bfloat16
    H, Hkv, D = TIMING_HEADS[device.type]
    shapes = [(1, H, s.length, D), (1, Hkv, s.length, D), (1, Hkv, s.length, D)]
    q, k, v = (torch.randn(sh, generator=gen, device=device, dtype=dtype).requires_grad_(backward) for sh in shapes)
    dout = torch.randn(1, H, s.length, D, generator=gen, device=device, dtype=dtype)
    spec = scenario_spec(s, device)
    call = make_call(q, k, v, spec)
    row = {"scenario": s.title, "ms": {}, "ps_per_unit": {}, "notes": []}
    picked = auto_pick(backends, call)
    row["auto"] = picked.name if picked else None

    def measure(label, attend, cost=None):
        try:
            ms = clock(_step(attend, q, k, v, dout, backward))
        except Exception as err:  # out of memory, a kernel that refuses a shape: recorded, the run goes on
            row["notes"].append(f"{label}: {type(err).__name__}: {str(err)[:200]}")
            log(f"  {label:28} error: {type(err).__name__}: {str(err)[:120]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return
        row["ms"][label] = ms
        if cost and cost != float("inf"):
            row["ps_per_unit"][label] = ms * 1e9 / cost
        log(f"  {label:28} {ms:10.2f} ms")

    for name, backend in backends.items():
        if (name == "sdpa" and backend is not picked) or backend.not_supported_reasons(call):
            continue  # "dense sdpa" below is SDPA with the dense mask: our "sdpa" is timed when auto picks it
        measure(name, lambda q_, k_, v_, b=backend: b.run(make_call(q_, k_, v_, spec)), backend.cost(call))
    if _dense_fits(s.length, device):
        dense = {}

        def dense_sdpa(q_, k_, v_):
            if "mask" not in dense:  # built once, in the warm-up call: the timed calls reuse it
                dense["mask"] = spec.to_dense(s.length, device=device).unsqueeze(1)
            return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=dense["mask"], enable_gqa=True)

        measure("dense sdpa", dense_sdpa, cuda_costs.sdpa_cost(call))
        dense.clear()
    else:
        row["notes"].append(f"dense sdpa: skipped, a {s.length}x{s.length} mask would not fit in memory")
        log(f"  {'dense sdpa':28} skipped: the dense mask would not fit in memory")
    if s.doc_lens is not None:
        bounds = torch.tensor((0, *s.doc_lens)).cumsum(0).tolist()

        def per_document(q_, k_, v_):
            parts = [
                F.scaled_dot_product_attention(
                    q_[:, :, a:b], k_[:, :, a:b], v_[:, :, a:b], is_causal=True, enable_gqa=True
                )
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ]
            return torch.cat(parts, dim=2)

        measure("per-document sdpa loop", per_document)
    block_mask = stock_block_mask(s, device, row, log)
    if block_mask is not None:
        compiled = flex._flex()
        measure(
            "flex + create_block_mask", lambda q_, k_, v_: compiled(q_, k_, v_, block_mask=block_mask, enable_gqa=True)
        )
    return row


def stock_block_mask(s: Scenario, device, row: dict, log):
    """``create_block_mask`` on the hand-written predicate, timed; if that fails (out of memory: it evaluates every
    pair), once more with ``_compile=True`` (its chunked, compiled form), said so in the notes."""
    from torch.nn.attention.flex_attention import create_block_mask

    for compiled in (False, True):
        try:
            t0 = time.perf_counter()
            block_mask = create_block_mask(
                stock_mask_mod(s, device), None, None, s.length, s.length, device=device, _compile=compiled
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as err:  # out of memory above all: it evaluates every pair
            row["notes"].append(f"create_block_mask(_compile={compiled}): {type(err).__name__}: {str(err)[:160]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        row["stock_block_mask_ms"] = (time.perf_counter() - t0) * 1e3
        log(f"  {'(create_block_mask itself)':28} {row['stock_block_mask_ms']:10.2f} ms, _compile={compiled}")
        return block_mask
    log("  flex + create_block_mask      skipped: create_block_mask failed (see the notes)")
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Report


def ratio_table(rows: list[dict]) -> list[str]:
    """Markdown: per scenario, auto's pick and each method's milliseconds with its time over auto's pick."""
    methods = []
    for r in rows:
        methods += [m for m in r["ms"] if m not in methods]
    lines = [
        "| scenario | auto picks | " + " | ".join(f"{m}: ms (x auto)" for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for r in rows:
        base = r["ms"].get(r["auto"])
        cells = []
        for m in methods:
            ms = r["ms"].get(m)
            cells.append("-" if ms is None else f"{ms:.2f}" + (f" ({ms / base:.2f}x)" if base else ""))
        lines.append(f"| {r['scenario']} | {r['auto']} | " + " | ".join(cells) + " |")
    return lines


def cost_table(rows: list[dict]) -> list[str]:
    names = sorted({n for r in rows for n in r["ps_per_unit"]})
    lines = ["| scenario | " + " | ".join(f"{n} ps/unit" for n in names) + " |", "|---|" + "---|" * len(names)]
    for r in rows:
        cells = [f"{r['ps_per_unit'][n]:.2e}" if n in r["ps_per_unit"] else "-" for n in names]
        lines.append(f"| {r['scenario']} | " + " | ".join(cells) + " |")
    return lines


def _compiles() -> int:
    """Frames torch.compile has compiled in this process (FlexAttention: one per shape, dtype and mask structure,
    more if a new spec object recompiles)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def machine(device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return f"CPU ({platform.processor() or platform.machine()}), dry run"


def fit_varlen_pair(reports: list[dict]) -> str:
    """``VARLEN_PAIR`` from saved runs (see the module docstring), with the ratios it comes from."""
    logs = []
    lines = []
    for report in reports:
        then = report.get("constants", {}).get("VARLEN_PAIR", 1.0)
        for row in report["timings"]:
            units = row["ps_per_unit"]
            for name in ("cuda_varlen", "flash"):
                if name in units and "flex" in units:
                    ratio = units[name] / units["flex"]
                    logs.append(math.log(then * ratio))
                    lines.append(f"{report['date']} {row['scenario']}: {name} / flex {ratio:.3f} (ran with {then})")
    if not logs:
        return "no scenario timed both a varlen kernel and flex"
    fitted = math.exp(sum(logs) / len(logs))
    return "\n".join([*lines, f"VARLEN_PAIR = {fitted:.3g} (now {cuda_costs.VARLEN_PAIR})"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 16K timing scenarios only")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, emulated kernels, tiny shapes")
    parser.add_argument("--out", type=Path, default=None, help="write JSON here and markdown next to it")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds after which timings are skipped")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--fit", type=Path, nargs="+", default=None, help="refit VARLEN_PAIR from saved JSON runs")
    args = parser.parse_args()
    if args.fit:
        print(fit_varlen_pair([json.loads(p.read_text()) for p in args.fit]))
        return 0
    started = time.perf_counter()
    command = "PYTHONPATH=src:. python benchmarks/device_check.py " + " ".join(sys.argv[1:])

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {line}", flush=True)

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to exercise everything but the kernels on the CPU")
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    torch._dynamo.config.recompile_limit = 64  # one compiled FlexAttention serves every shape, dtype and mask here
    torch._dynamo.config.accumulated_recompile_limit = 512
    backends = cuda_backends(args.dry_run)
    log(f"torch {torch.__version__} on {machine(device)}")
    for b in backends.values():
        log(f"{b.name}: {b.available() or 'available'}")
    available = {n: b for n, b in backends.items() if b.available() is None}
    with cpu_stand_ins() if args.dry_run else contextlib.nullcontext():
        log("(a) checks against float64 attention")
        dtypes = (torch.bfloat16, torch.float32) if args.dry_run else CHECK_DTYPES  # one half precision on the CPU
        checks = run_checks(available, device, 32 if args.dry_run else 256, dtypes, log)
        log(f"compiled graphs so far: {_compiles()}")
        log("(b) timings, forward" + (" + backward" if not args.dry_run else " (no CPU backward for flex)"))
        clock = Clock(device, 1 if args.dry_run else args.reps)
        rows, skipped = [], []
        for s in scenarios(args.quick, args.dry_run):
            if time.perf_counter() - started > args.budget:
                skipped.append(s.title)
                log(f"{s.title}: skipped, past the {args.budget:.0f} s budget")
                continue
            log(s.title)
            rows.append(time_scenario(s, available, device, clock, not args.dry_run, log))
    log(f"compiled graphs in all: {_compiles()}")
    failed = [c for c in checks if c["status"] == "FAIL"]
    table, costs = ratio_table(rows), cost_table(rows)
    print("\n".join(["", *table, "", *costs, "", f"reproduce: {command}"]))
    log(f"{len(checks)} checks: {len(failed)} failed; {len(rows)} timing scenarios, {len(skipped)} skipped")
    if args.out is not None:
        report = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine(device),
            "torch": torch.__version__,
            "command": command,
            "dry_run": args.dry_run,
            "checks": checks,
            "timings": rows,
            "skipped": skipped,
            "seconds": time.perf_counter() - started,
            "constants": {"VARLEN_PAIR": cuda_costs.VARLEN_PAIR, "FLEX_PAIR": cuda_costs.FLEX_PAIR},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str))
        lines = [f"# device_check {report['date']}", "", f"{report['machine']}, torch {report['torch']}", ""]
        lines += ["```", *(_check_line(c) for c in checks), "```", "", *table, "", *costs, "", f"`{command}`", ""]
        args.out.with_suffix(".md").write_text("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
