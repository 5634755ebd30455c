"""Head sizes in the estimates: a pair is charged ``_common.pair_width`` of ``D + Dv`` (RESULTS.md, issue 15, "Head
sizes"; fitted by ``benchmarks/bench_head_dim.py``), which leaves every estimate at the calibrated D = Dv = 64 as it
was, and rows of 257-512 keys are left to the costs."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import attnmask as am
from attnmask.attention import _prepare_call
from attnmask.backends import _common, _workers, blocksparse, native, sdpa, varlen
from attnmask.backends._common import CALIBRATED_WIDTH, pair_width
from tests.helpers import bench_limit

A = importlib.import_module("attnmask.attention")  # the module; `attnmask.attention` is the function
FITTED = (native, sdpa, varlen, blocksparse)
EXTRAS = (
    (native, "_EXTRA_PAIR_WIDTH"),
    (native, "_TILES_EXTRA_PAIR_WIDTH"),
    (sdpa, "_EXTRA_PAIR_WIDTH"),
    (sdpa, "_EXTRA_BF16_FORWARD_PAIR_WIDTH"),
    (sdpa, "_EXTRA_BF16_PAIR_WIDTH"),
    (varlen, "_EXTRA_PAIR_WIDTH"),
    (varlen, "_EXTRA_SMALL_WIDTH"),
    (varlen, "_EXTRA_BF16_PAIR_WIDTH"),
    (blocksparse, "_EXTRA_PAIR_WIDTH"),
)
DOCS = [180, 150, 20, 200, 12, 40]  # documents SDPA runs in varlen and tiny ones (<= 32 keys: batched matmuls)


@pytest.mark.parametrize("extra", [0.0, 48.0, 192.0, 1000.0])
def test_pair_width_keeps_the_calibrated_width_and_grows_with_the_width(extra):
    assert pair_width(CALIBRATED_WIDTH, extra) == pytest.approx(CALIBRATED_WIDTH)
    widths = [2, 16, 32, 64, 128, 256, 512]
    charged = [pair_width(w, extra) for w in widths]
    assert charged == sorted(charged) and len(set(charged)) == len(charged)
    for w, c in zip(widths, charged, strict=True):  # above the calibration a pair costs less than its width, below more
        assert (c >= w) if w <= CALIBRATED_WIDTH else (c <= w)
    assert pair_width(40, 96) == pytest.approx(83.2)  # the docstring's example: hypot(40, 96) = 104, * 128 / 160
    assert pair_width(32, 0.0) == 32.0


def packed_rows(rows: int, length: int, docs: list[int], dim: int, grad: bool):
    """q (B, 4, L, D) against 2 key / value heads, rows of documents of the lengths ``docs`` (cycled, the last cut
    at the row's end), causal."""
    ids = torch.empty(rows, length, dtype=torch.long)
    for r in range(rows):
        pos, i = 0, 0
        while pos < length:
            n = docs[(r + i) % len(docs)]
            ids[r, pos : pos + n] = i
            pos, i = pos + n, i + 1
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(rows, 4, length, dim, generator=gen).requires_grad_(grad)
    k, v = (torch.randn(rows, 2, length, dim, generator=gen).requires_grad_(grad) for _ in range(2))
    return q, k, v, am.causal() & am.document(doc_ids=ids)


def costs(q, k, v, spec, grad: bool) -> dict[str, float]:
    with torch.set_grad_enabled(grad), _workers.load_as_read(False):
        call = _prepare_call(q, k, v, spec, None, None, None)
        return {m.BACKEND.name: m.BACKEND.cost(call) for m in FITTED}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("grad", [False, True])
def test_estimates_at_the_calibrated_width_do_not_depend_on_the_extra_widths(monkeypatch, threads, grad, dtype):
    """(bfloat16 on this machine's CPU kind: with AMX tiles, native on them and SDPA's own bfloat16 widths.)"""
    monkeypatch.setattr(_workers, "threads_available", lambda: threads)
    q, k, v, spec = packed_rows(4, 512, DOCS, 64, False)
    problem = (*(t.to(dtype).requires_grad_(grad) for t in (q, k, v)), spec)
    fitted = costs(*problem, grad)
    for module, name in EXTRAS:
        monkeypatch.setattr(module, name, 0.0)
    assert costs(*problem, grad) == pytest.approx(fitted, rel=1e-12)


@pytest.mark.parametrize("grad", [False, True])
def test_small_heads_charge_a_pair_more_than_its_width(grad):
    """The Xeon's estimates (its kind's constants, ``bench_limit.on_cpu_kind``), whatever CPU runs the test: the
    figures below are its tables'."""
    problem = packed_rows(4, 512, DOCS, 16, grad)
    with bench_limit().on_cpu_kind(True, True), pytest.MonkeyPatch.context() as inside:
        fitted = costs(*problem, grad)
        for module, name in EXTRAS:
            assert getattr(module, name) > 0
            inside.setattr(module, name, 0.0)
        linear = costs(*problem, grad)
    assert all(fitted[name] > linear[name] for name in fitted)
    # since the native kernel's tiles its time falls with D as SDPA's and varlen's do (0.43-0.44x from D = 64 to 16
    # against their 0.42-0.46x, the Xeon's head-size tables head_dim/s34_t1, s34_t2; before the tiles it fell least,
    # 0.62-1.01x): its charge rises about as theirs
    rise = {name: fitted[name] / linear[name] for name in fitted}
    assert all(1 / 1.2 < rise["native"] / rise[name] < 1.2 for name in ("sdpa", "varlen"))


@pytest.mark.parametrize("threads", [1, 2])
def test_a_tiny_llamas_rows_of_512_train_on_native(monkeypatch, threads):
    """bench_hf_train's rows of 512 (documents of ~180 tokens, D = 16, H = 4 against 2), forward + backward: with the
    native kernel's blocked form measured 36-41 ms against varlen's 54-56 (SDPA 90) at one thread, 21-22 against
    40-41 (SDPA 49) at two, on the Xeon VM (RESULTS.md, issue 15, "native's blocked form"); before it, varlen had been
    1.6x faster than native there and was picked. No CPU without AMX tiles has measured the blocked form."""
    with bench_limit().on_cpu_kind(True, True):
        monkeypatch.setattr(_workers, "threads_available", lambda: threads)
        monkeypatch.setattr(_workers, "contended", lambda: False)
        q, k, v, spec = packed_rows(16, 512, [180, 150, 200, 170, 160], 16, True)
        assert am.explain(q, k, v, spec).picked == "native"


# bench_hf_train's rows of 512 as its packing collator makes them (seed 0): documents per row, then padding, which
# the packed position_ids (0 at every padding token) make one-token documents.
HF_ROWS_512 = (
    (428, 77), (422, 90), (411, 101), (386, 119), (380, 132), (369, 135), (307, 197), (287, 216), (279, 232),
    (256, 256), (191, 190, 128), (189, 178, 135), (173, 172, 162), (159, 158, 152), (135, 127, 118, 107),
    (102, 95, 93, 93, 88, 29), (88, 73, 62, 61, 61),
)  # fmt: skip


@pytest.mark.parametrize(
    ("amx", "threads", "fastest"),
    [(False, 1, ("native",)), (False, 2, ("native",)), (True, 2, ("native", "sdpa"))],
    ids=["epyc-1", "epyc-2", "xeon-2"],
)
def test_packed_rows_with_trailing_padding_train_on_the_fastest(monkeypatch, amx, threads, fastest):
    """The tiny Llama's rows of 512 with the collator's padding (305 one-token documents), forward + backward, on each
    CPU kind as measured there. AMD EPYC: varlen measured 35.6 ms, SDPA 49.0, blocksparse 37.8, native 55.4 at 2
    threads (54.7 vs SDPA's 87.5 at one; RESULTS.md "Hand-overs in the units of the tasks"); on 2026-12-05 varlen
    36.0 / 50.3, blocksparse 35.9 / 53.0, SDPA 51.1 / 85.9 at 2 / 1 threads ("A charge per blocksparse call"). A
    hand-over counted in the tasks' units at D = 16 (weights of H·(D + Dv) a pair, against the estimate's wider
    charge) had put varlen's two threads below one and sent the call to SDPA. Xeon with AMX tiles, 2 threads
    (2026-12-06, two runs): native 35.2 / 36.0, SDPA 35.0 / 38.0, varlen 39.8 / 40.4, blocksparse 51.1 / 53.5 ("varlen's
    threads on the Xeon"). AMD EPYC again on 2026-12-07, with native's blocked form and tiles: native 12.2-20.7 /
    21.9-23.4 ms at 2 / 1 threads, varlen 41.3-46.7 / 49.2-52.0, blocksparse 46.9-63.3 / 57.8-72.3, SDPA 51.2-62.4 /
    89.6-98.6 (four rounds interleaved; RESULTS.md, issue 15, "The AMD EPYC's tables"). The pick is one within 1.1x of
    the fastest on that kind."""
    with bench_limit().on_cpu_kind(amx, True):
        monkeypatch.setattr(_workers, "threads_available", lambda: threads)
        monkeypatch.setattr(_workers, "contended", lambda: False)
        ids = torch.empty(len(HF_ROWS_512), 512, dtype=torch.long)
        for r, docs in enumerate(HF_ROWS_512):
            body = torch.repeat_interleave(torch.arange(len(docs)), torch.tensor(docs))
            ids[r] = torch.cat([body, len(docs) + torch.arange(512 - len(body))])
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(len(ids), 4, 512, 16, generator=gen).requires_grad_()
        k, v = (torch.randn(len(ids), 2, 512, 16, generator=gen).requires_grad_() for _ in range(2))
        assert am.explain(q, k, v, am.causal() & am.document(doc_ids=ids)).picked in fastest


def test_rows_over_128_keys_are_left_to_the_costs():
    """SDPA without costing only on rows of at most 128 keys: on rows of 512 allowing 0.24-0.32 of the pairs it ran
    1.1-1.8x slower than the fastest backend at every head size (bench_head_dim.py, AMD EPYC, 2 threads), and on rows
    of 256 since native's blocked form 1.03-1.32x slower than native at D = 16-64 (Xeon, 2 threads; RESULTS.md, issue
    15, "native's blocked form")."""
    for length, docs in ((512, [400, 112]), (256, [200, 56])):
        q, k, v, spec = packed_rows(2, length, docs, 64, False)
        call = _prepare_call(q, k, v, spec, None, None, None)
        assert _common.allowed_fraction(call) >= A._STOCK_MIN_FRACTION
        assert A._stock(call, tuple(A._BACKENDS.values())) is None and not am.explain(q, k, v, spec).stock
    q, k, v, spec = packed_rows(2, 128, [100, 28], 64, False)
    assert am.explain(q, k, v, spec).stock


SMALL_TABLE = ["--lengths", "256", "--dims", "16,64", "--structures", "docs60", "--mode", "fwd", "--reps", "1"]


def load_benchmark():
    """``benchmarks/bench_head_dim.py`` as a module."""
    spec_ = importlib.util.spec_from_file_location(
        "bench_head_dim", Path(__file__).parents[1] / "benchmarks" / "bench_head_dim.py"
    )
    bench = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(bench)
    return bench


def test_the_head_dim_benchmark_runs_and_fits_its_own_cells(capsys, tmp_path):
    bench = load_benchmark()
    saved = tmp_path / "cells.json"
    args = SMALL_TABLE
    bench.main([*args, "--threads", str(torch.get_num_threads()), "--save", str(saved)])
    out = capsys.readouterr().out
    assert out.count("| docs60 | 256 |") == 2 and "within 1.1x of the fastest" in out
    bench.main(["--fit", str(saved)])
    fit = capsys.readouterr().out
    for key in ("native._EXTRA_PAIR_WIDTH", "sdpa._EXTRA_PAIR_WIDTH", "varlen._EXTRA_SMALL_WIDTH"):
        lines = [x for x in fit.splitlines() if x.startswith(f"{key}: ")]
        assert len(lines) == 2 and "inf" not in "".join(lines)  # two passes; each D = 16 cell against its D = 64 one
    assert fit.splitlines()[-1].startswith("fitted: native._EXTRA_PAIR_WIDTH = ")


def test_the_head_dim_fit_replays_the_cpu_its_files_were_timed_on(tmp_path):
    """``--fit`` evaluates saved cells under the CPU kind they record (``bench_limit.on_cpu_kind``: the AMX flags and
    blocksparse's per-kind charges), whatever this machine is; files of several or unrecorded kinds keep this
    machine's; everything is put back after."""
    from attnmask.backends import blocksparse

    bench = load_benchmark()
    paths = {}
    for name, amx in (("xeon", True), ("epyc", False), ("old", None)):
        paths[name] = tmp_path / f"{name}.json"
        cpu = {} if amx is None else {"cpu": f"Some CPU, AMX bfloat16 tiles: {amx}, AVX512-BF16: True"}
        paths[name].write_text(json.dumps({**cpu, "cells": []}))
    assert bench.cpu_kind(str(paths["xeon"])) == (True, True) and bench.cpu_kind(str(paths["old"])) is None
    before = (_common.cpu_has_amx_bf16(), blocksparse._GROUP_COST, blocksparse._BACKWARD_OVERHEAD_SHARE)
    for name, at in (("xeon", 0), ("epyc", 1)):
        with bench.on_files_cpu([str(paths[name])]):
            assert _common.cpu_has_amx_bf16() is (at == 0)
            assert blocksparse._GROUP_COST == blocksparse._GROUP_COSTS[at]
            assert blocksparse._BACKWARD_OVERHEAD_SHARE == blocksparse._BACKWARD_OVERHEAD_SHARES[at]
        assert (_common.cpu_has_amx_bf16(), blocksparse._GROUP_COST, blocksparse._BACKWARD_OVERHEAD_SHARE) == before
    for mixed in (["xeon", "epyc"], ["xeon", "old"]):
        with bench.on_files_cpu([str(paths[n]) for n in mixed]):
            assert (_common.cpu_has_amx_bf16(), blocksparse._GROUP_COST) == before[:2]


def test_the_head_dim_benchmark_times_bfloat16_cells(capsys, tmp_path, monkeypatch):
    """``--dtype bfloat16``: the cells run and are estimated in bfloat16 (saved with their dtype; on a CPU with
    neither AMX tiles nor AVX512-BF16, where bfloat16 has factors of its own), and a table of both dtypes fits each D
    against the same dtype's D = 64 only."""
    bench = load_benchmark()
    saved = tmp_path / "bf16.json"
    args = SMALL_TABLE
    bench.main([*args, "--threads", "1", "--dtype", "bfloat16", "--save", str(saved)])
    out = capsys.readouterr().out
    assert ", bfloat16, H=4" in out and out.count("| docs60 | 256 |") == 2
    cells = json.loads(saved.read_text())["cells"]
    assert [c["dtype"] for c in cells] == ["bfloat16", "bfloat16"]
    q, _, _, _ = bench.make_call(cells[0])
    assert q.dtype == torch.bfloat16
    monkeypatch.setattr(_common, "cpu_has_amx_bf16", lambda: False)
    monkeypatch.setattr(_common, "cpu_has_avx512_bf16", lambda: False)
    est_bf16, _, _ = bench.estimates(cells[0])
    est_fp32, _, _ = bench.estimates({k: v for k, v in cells[0].items() if k != "dtype"})  # saved before --dtype
    assert est_bf16 != est_fp32  # the bfloat16 factors apply
    assert bench.width_error(cells, "sdpa") < math.inf  # the D = 16 cell against the D = 64 one
    by_dim = {c["dim"]: c for c in cells}
    mixed = [by_dim[16], {**by_dim[64], "dtype": "float32"}]  # no dtype holds both sizes: nothing to compare
    assert bench.width_error(mixed, "sdpa") == math.inf
