"""The CPU estimates in bfloat16 and with a backward: each backend's ``MODES`` (``_common.ModeFactors``) scale its
float32 forward estimate (for bfloat16 only on CPUs with AMX bfloat16 tiles), and ``bench_limit --fit --modes``
recovers them from its own tables."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import weakref

import pytest
import torch

import attnmask as am
import attnmask.backends._common as C
import attnmask.backends._workers as W
import attnmask.backends.blocksparse as BS
import attnmask.backends.native as N
import attnmask.backends.sdpa as S
import attnmask.backends.varlen as VL
from attnmask.backends._common import ModeFactors
from attnmask.errors import BackendError
from tests.helpers import bench_limit

A = importlib.import_module("attnmask.attention")
CPU_BACKENDS = ("sdpa", "varlen", "blocksparse", "banded", "native")


def test_mode_factors_pick_the_factor_of_the_calls_mode(monkeypatch):
    modes = ModeFactors(bf16=1.5, backward=3.0, bf16_backward=2.5)
    monkeypatch.setattr(C, "cpu_has_amx_bf16", lambda: True)
    assert modes.of(torch.float32, "cpu", False) == 1.0 and modes.of(torch.float32, "cpu", True) == 3.0
    assert modes.of(torch.bfloat16, "cpu", False) == 1.5 and modes.of(torch.bfloat16, "cpu", True) == 2.5
    assert modes.of(torch.float16, "cpu", False) == 1.0 and modes.of(torch.float64, "cpu", True) == 3.0
    assert modes.of(torch.bfloat16, "meta", True) == 1.0 and modes.of(torch.float32, "cuda", True) == 1.0
    monkeypatch.setattr(C, "cpu_has_amx_bf16", lambda: False)  # measured with AMX: elsewhere float32's factors
    monkeypatch.setattr(C, "cpu_has_avx512_bf16", lambda: False)
    assert modes.of(torch.bfloat16, "cpu", False) == 1.0 and modes.of(torch.bfloat16, "cpu", True) == 3.0
    assert not modes.covers(torch.bfloat16, "cpu")
    soft = dataclasses.replace(modes, bf16_no_amx=2.0, bf16_backward_no_amx=7.0)  # ... unless fitted there too
    assert soft.of(torch.bfloat16, "cpu", False) == 2.0 and soft.of(torch.bfloat16, "cpu", True) == 7.0
    assert soft.of(torch.float16, "cpu", True) == 3.0 and soft.covers(torch.bfloat16, "cpu")
    assert soft.of(torch.bfloat16, "cpu", True, contended=True) == 7.0  # busy factors 1 here
    monkeypatch.setattr(C, "cpu_has_avx512_bf16", lambda: True)  # bfloat16 instructions, no tiles: float32's factors
    for factors in (modes, soft):
        assert factors.of(torch.bfloat16, "cpu", False) == 1.0 and factors.of(torch.bfloat16, "cpu", True) == 3.0
        assert factors.covers(torch.bfloat16, "cpu")  # measured at float32's time there, casts included
    monkeypatch.setattr(C, "cpu_has_amx_bf16", lambda: True)
    assert soft.of(torch.bfloat16, "cpu", False) == 1.5 and soft.of(torch.bfloat16, "cpu", True) == 2.5
    with pytest.raises(BackendError, match="both bfloat16 factors"):
        ModeFactors(bf16_no_amx=2.0)


def call(dtype: torch.dtype, grad: bool, dim: int = 16):
    q = torch.zeros(1, 4, 256, dim, dtype=dtype).requires_grad_(grad)
    spec = am.causal() & am.document(seq_lens=[100, 60, 96])
    return A._prepare_call(q, q, q, spec, None, None, None)


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("cpu", ["amx", "avx512_bf16", "neither"])
def test_every_cpu_estimate_scales_by_its_mode_factor(monkeypatch, name, cpu):
    amx = cpu == "amx"
    monkeypatch.setattr(C, "cpu_has_amx_bf16", lambda: amx)
    monkeypatch.setattr(C, "cpu_has_avx512_bf16", lambda: cpu != "neither")
    monkeypatch.setattr(W, "threads_available", lambda: 1)
    module = importlib.import_module(f"attnmask.backends.{name}")
    modes = module.MODES
    assert min(modes.bf16, modes.backward, modes.bf16_backward) > 0
    # sdpa adds a per-key charge to a call with a gradient, after its mode factor; blocksparse takes off what its
    # forward's stacks save, in the forward's factor, and its per-tile and per-call charges grow with a gradient by a
    # share of what the backward adds (test_thread_costs.py): here all of it
    if name == "blocksparse":
        monkeypatch.setattr(module, "_BACKWARD_OVERHEAD_SHARE", 1.0)
    if name == "varlen":  # the factor alone (their bfloat16 backward's own pair width: the tests below)
        monkeypatch.setattr(module, "_EXTRA_BF16_PAIR_WIDTH", module._EXTRA_PAIR_WIDTH)
    if name == "sdpa":  # its bfloat16 forward's own pair width too
        monkeypatch.setattr(module, "_EXTRA_BF16_PAIR_WIDTH", module._EXTRA_BF16_FORWARD_PAIR_WIDTH)
    if name == "native":  # the factor alone (its backward's runs at their own bytes per key: test_native.py)
        monkeypatch.setattr(module, "_BACKWARD_KEY_BYTES", module._FORWARD_KEY_BYTES)
    keys = C.SDPA_BACKWARD_KEY_COST * 4 * 256 * 32 if name == "sdpa" else 0.0

    def cost(c):
        saved = module.stack_saving(c) if name == "blocksparse" else 0.0
        return module.BACKEND.cost(c) - (keys if c.needs_grad else 0.0) + saved

    assert cost(call(torch.float32, True)) == pytest.approx(cost(call(torch.float32, False)) * modes.backward)
    if amx:
        bf16_grad = modes.bf16_backward / modes.bf16
    elif modes.bf16_no_amx is not None and cpu == "neither":
        bf16_grad = modes.bf16_backward_no_amx / modes.bf16_no_amx
    else:
        bf16_grad = modes.backward
    assert cost(call(torch.bfloat16, True)) == pytest.approx(cost(call(torch.bfloat16, False)) * bf16_grad)


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_a_cpu_with_avx512_bf16_and_no_amx_tiles_prices_bfloat16_as_float32(monkeypatch, name):
    """There every backend ran bfloat16 at about its float32 time at D = 64, casts included (RESULTS.md, issue 15,
    "bfloat16 on a CPU with AVX512-BF16"): the whole estimate is float32's there, forward and with a backward
    (blocksparse's forward stacks run on the float32 flash kernel only, so what they save is set aside)."""
    monkeypatch.setattr(W, "threads_available", lambda: 1)
    module = importlib.import_module(f"attnmask.backends.{name}")

    def cost(c):
        return module.BACKEND.cost(c) + (module.stack_saving(c) if name == "blocksparse" else 0.0)

    with bench_limit().on_cpu_kind(False, True):
        for grad in (False, True):
            assert cost(call(torch.bfloat16, grad, 64)) == pytest.approx(cost(call(torch.float32, grad, 64)))
    with bench_limit().on_cpu_kind(False, False):  # neither: the factors fitted there differ
        assert cost(call(torch.bfloat16, True, 64)) != pytest.approx(cost(call(torch.float32, True, 64)))


@pytest.mark.parametrize("amx", [True, False])
def test_varlen_charges_a_bfloat16_backward_pair_its_own_width(monkeypatch, amx):
    """Without AMX tiles (the AMD EPYC), a bfloat16 forward + backward of ``varlen`` ran 1.6-2.1x its float32 time at
    D = 16-32, ~1.0x at D = 64 and 0.8x at D = 128, its forward ~1.0x throughout (RESULTS.md, issue 15, "A fresh spec's
    plan"), and with them (the Xeon) its SDPA's bfloat16 backward at small heads as well ("SDPA's bfloat16 backward at
    small heads"): the backward's share of a bfloat16 estimate charges a pair ``pair_width(D + Dv,
    _EXTRA_BF16_PAIR_WIDTH)``, against float32's width more at D = 16, the same at D = 64, less at D = 128; the
    forward float32's width."""
    monkeypatch.setattr(W, "threads_available", lambda: 1)
    # the width patched inside the kind's block and put back before the block puts the kind's constants back (the
    # test's own monkeypatch would restore, after the block, the value the block had set: another kind's)
    with bench_limit().on_cpu_kind(amx, True), pytest.MonkeyPatch.context() as inside:
        own = {(d, g): VL.cost(call(torch.bfloat16, g, d)) for d in (16, 64, 128) for g in (False, True)}
        inside.setattr(VL, "_EXTRA_BF16_PAIR_WIDTH", VL._EXTRA_PAIR_WIDTH)
        as_float32 = {(d, g): VL.cost(call(torch.bfloat16, g, d)) for d in (16, 64, 128) for g in (False, True)}
    ratio = {key: own[key] / as_float32[key] for key in own}
    assert all(ratio[d, False] == pytest.approx(1.0) for d in (16, 64, 128))  # the forward: float32's width
    assert ratio[64, True] == pytest.approx(1.0)
    assert ratio[16, True] > 1.2 and ratio[128, True] < 0.95


@pytest.mark.parametrize("grad", [False, True])
def test_native_charges_its_bfloat16_copies_on_a_cpu_with_amx_tiles(monkeypatch, grad):
    """With AMX tiles ``native``'s bfloat16 estimate holds the float32 copies of q, k, v and the output's conversion
    back, at ``COPY_COST`` an element over the threads' gain, under the mode factor (the backward copies anew); where
    the forward reads bfloat16 as stored (a decoding step) only the backward's, ``_BF16_BACKWARD_PASSES`` of them
    (copies, zeroed gradients, their conversions); on other CPUs the same at a third of ``COPY_COST`` (fitted on the
    AMD EPYC's tables). Where the forward runs on AMX tiles (``native._on_tiles``) it reads bfloat16 as stored too, and
    only the backward's passes are charged: ``_TILES_BACKWARD_PASSES`` where the backward runs on the tiles too (most
    pairs in segments of ``_TILES_BACKWARD_MIN_KEYS`` keys or more), else ``_BF16_BACKWARD_PASSES``. Where the
    backward reads bfloat16 as stored (``native._backward_reads_as_stored``: segments that share no key, of at most
    ``_WIDEN_MAX_KEYS`` keys), so does the forward before it, and nothing is charged."""
    monkeypatch.setattr(W, "threads_available", lambda: 2)
    monkeypatch.setattr(N, "amx_ready", lambda: False)  # the float32 arithmetic's copies first
    gain = 1.0 + N._THREAD_EFFICIENCY

    def both(c):
        with pytest.MonkeyPatch.context() as inside:
            charged = N.cost(c)
            inside.setattr(N, "_BF16_COPY_COST", 0.0)
            return charged, N.cost(c)

    with bench_limit().on_cpu_kind(True, True):
        assert N._BF16_COPY_COST == C.COPY_COST
        c = call(torch.bfloat16, grad, 64)
        elements = 1 * (4 * 256 + 4 * 256) * 128
        factor = N.MODES.of(torch.bfloat16, "cpu", grad)
        charged, without = both(c)  # documents of 60-100 keys: with a gradient, read as stored forward and backward
        assert charged - without == pytest.approx(0.0 if grad else elements * C.COPY_COST / gain * factor, rel=1e-9)
        with pytest.MonkeyPatch.context() as inside:  # a backward on float32 copies: the forward's copies too
            inside.setattr(N, "_backward_reads_as_stored", lambda segs, disjoint=None: False)
            charged, without = both(c)
        assert charged - without == pytest.approx(elements * C.COPY_COST / gain * factor, rel=1e-9)
        q = torch.zeros(1, 4, 1, 64, dtype=torch.bfloat16).requires_grad_(grad)  # one query: read as stored
        k = torch.zeros(1, 4, 4096, 64, dtype=torch.bfloat16).requires_grad_(grad)
        decode = A._prepare_call(q, k, k, am.causal(), None, None, None)
        charged, without = both(decode)
        copies = 1 * (4 * 1 + 4 * 4096) * 128 * C.COPY_COST / gain * N._BF16_BACKWARD_PASSES
        assert N._BF16_BACKWARD_PASSES > 1  # the copies are not the backward's only pass over the cache
        assert charged - without == pytest.approx(copies if grad else 0.0, rel=1e-9)
        monkeypatch.setattr(N, "amx_ready", lambda: True)
        c = call(torch.bfloat16, grad, 64)
        assert N._on_tiles(torch.bfloat16, 256, (64, 64), N.native_plan(c).segments, (True, None), (0.0, None, None))
        charged, without = both(c)  # documents of 60-100 keys: the backward reads them as stored
        assert charged - without == 0.0
        with pytest.MonkeyPatch.context() as inside:  # ... or on float32 copies
            inside.setattr(N, "_backward_reads_as_stored", lambda segs, disjoint=None: False)
            charged, without = both(c)
        copies = elements * C.COPY_COST / gain * N._BF16_BACKWARD_PASSES
        assert charged - without == pytest.approx(copies if grad else 0.0, rel=1e-9)
        q = torch.zeros(1, 4, 256, 64, dtype=torch.bfloat16).requires_grad_(grad)
        long = A._prepare_call(q, q, q, am.causal() & am.document(seq_lens=[200, 56]), None, None, None)
        charged, without = both(long)  # most pairs in a document of 200 keys: the backward on the tiles too
        copies = elements * C.COPY_COST / gain * N._TILES_BACKWARD_PASSES
        assert charged - without == pytest.approx(copies if grad else 0.0, rel=1e-9)
    with bench_limit().on_cpu_kind(False, True):  # fitted on the AMD EPYC's tables: a third of COPY_COST
        assert N._BF16_COPY_COST == N._BF16_COPY_COSTS[1] == 10.0


def test_the_tiles_backward_charges_key_copies_that_leave_the_l2_cache(monkeypatch):
    """The tiles' backward copies each item's keys (k, v and k^T: 2 D + Dv bfloat16 a key); past ``_TILES_L2_BYTES``
    those copies leave the L2 cache, and its time grew 16-17x from 4K to 32K keys where SDPA's grew 9-10x (RESULTS.md,
    issue 15, "The tiles' backward's finiteness check"): such a segment's keys are charged ``_TILES_SPILL_COST`` an
    element and key/value head (``_tiles_spill``), with a gradient on the tiles only; a segment whose copies fit, and a
    forward, not at all."""
    monkeypatch.setattr(W, "threads_available", lambda: 1)
    monkeypatch.setattr(N, "amx_ready", lambda: True)
    assert N._TILES_SPILL_COST > 0

    def spill(q_len: int, kv_len: int, grad: bool) -> float:
        q = torch.zeros(1, 4, q_len, 64, dtype=torch.bfloat16).requires_grad_(grad)
        k = torch.zeros(1, 2, kv_len, 64, dtype=torch.bfloat16).requires_grad_(grad)
        c = A._prepare_call(q, k, k, am.causal(), None, None, None)
        with pytest.MonkeyPatch.context() as inside:
            charged = N.cost(c)
            inside.setattr(N, "_TILES_SPILL_COST", 0.0)
            return charged - N.cost(c)

    with bench_limit().on_cpu_kind(True, True):
        fits = N._TILES_L2_BYTES // (2 * (2 * 64 + 64))  # the most keys whose copies fit: 5,461
        assert spill(8, fits, True) == 0.0
        assert spill(8, 8192, True) == pytest.approx(8192 * (2 * 64 + 64) * 2 * N._TILES_SPILL_COST, rel=1e-12)
        assert spill(8, 8192, False) == 0.0
        assert spill(2, 8192, True) == 0.0  # two queries: the forward's row form, so no tiles' backward


@pytest.mark.parametrize("amx", [True, False])
def test_sdpa_charges_a_bfloat16_backward_pair_its_own_width(monkeypatch, amx):
    """torch's bfloat16 SDPA backward at small heads costs more per pair than float32's width says (RESULTS.md, issue
    15, "SDPA's bfloat16 backward at small heads"): with a gradient the backward's share of a bfloat16 estimate is
    charged at ``_EXTRA_BF16_PAIR_WIDTH`` (more than float32's width at D = 16, the same at the calibrated D = 64, less
    at D = 128); the forward at ``_EXTRA_BF16_FORWARD_PAIR_WIDTH``, float32 at float32's width."""
    import attnmask.backends.sdpa as SD

    monkeypatch.setattr(W, "threads_available", lambda: 1)
    with bench_limit().on_cpu_kind(amx, True), pytest.MonkeyPatch.context() as inside:
        assert SD._EXTRA_BF16_PAIR_WIDTH > SD._EXTRA_PAIR_WIDTH
        inside.setattr(SD, "_EXTRA_BF16_FORWARD_PAIR_WIDTH", SD._EXTRA_PAIR_WIDTH)  # the backward's width alone
        own = {(d, g, t): SD.cost(call(t, g, d)) for d in (16, 64, 128) for g in (False, True) for t in BOTH}
        inside.setattr(SD, "_EXTRA_BF16_PAIR_WIDTH", SD._EXTRA_PAIR_WIDTH)
        flat = {(d, g, t): SD.cost(call(t, g, d)) for d in (16, 64, 128) for g in (False, True) for t in BOTH}
    ratio = {key: own[key] / flat[key] for key in own}
    assert all(ratio[d, g, t] == pytest.approx(1.0) for d in (16, 64, 128) for g, t in NOT_BF16_BACKWARD)
    assert ratio[64, True, torch.bfloat16] == pytest.approx(1.0)
    assert ratio[16, True, torch.bfloat16] > 1.2 and ratio[128, True, torch.bfloat16] < 0.97


@pytest.mark.parametrize("amx", [True, False])
def test_sdpa_charges_a_bfloat16_forward_pair_its_own_width_on_amx_tiles(monkeypatch, amx):
    """On a CPU with AMX tiles torch's bfloat16 SDPA forward grows less with the head than float32's (1.25-1.6x from
    D = 64 to 128 on the Xeon; RESULTS.md, issue 15, "Head sizes on the tiles"): a bfloat16 forward's pairs are charged
    at ``_EXTRA_BF16_FORWARD_PAIR_WIDTH``, wider than float32's there (more at D = 16, the same at D = 64, less at
    D = 128), and at float32's on other CPUs and off the CPU (a meta tensor: this CPU's tiles say nothing there)."""
    import attnmask.backends.sdpa as SD

    def meta(dtype, dim):
        q = torch.zeros(1, 4, 256, dim, dtype=dtype, device="meta")
        return SD.cost(A._prepare_call(q, q, q, am.causal() & am.sliding_window(64), None, None, None))

    monkeypatch.setattr(W, "threads_available", lambda: 1)
    with bench_limit().on_cpu_kind(amx, True):
        assert (SD._EXTRA_BF16_FORWARD_PAIR_WIDTH > SD._EXTRA_PAIR_WIDTH) == amx
        ratio = {
            d: SD.cost(call(torch.bfloat16, False, d)) / SD.cost(call(torch.float32, False, d)) for d in (16, 64, 128)
        }
        assert all(meta(torch.bfloat16, d) == meta(torch.float32, d) for d in (16, 64, 128))
    if amx:
        assert ratio[16] > ratio[64] * 1.2 and ratio[128] < ratio[64] * 0.9
    else:
        assert ratio[16] == pytest.approx(ratio[64]) and ratio[128] == pytest.approx(ratio[64])


BOTH = (torch.float32, torch.bfloat16)
NOT_BF16_BACKWARD = ((False, torch.float32), (True, torch.float32), (False, torch.bfloat16))


def test_bfloat16_with_a_backward_is_left_to_the_costs_on_small_rows():
    """The stock rule (SDPA without costing, rows of at most 128 keys) does not take bfloat16 with a gradient: there
    torch's SDPA backward at small heads ran 1.16-1.22x the fastest backend's time (the Xeon's rule cells at D = 16);
    float32 with a gradient at D + Dv <= 64 and bfloat16 without one still take it."""
    spec = am.causal() & am.document(seq_lens=[100, 28])  # a third of the pairs: past the rule's fifth
    cases = ((torch.bfloat16, True, False), (torch.float32, True, True), (torch.bfloat16, False, True))
    for dtype, grad, stock in cases:
        q = torch.zeros(2, 4, 128, 16, dtype=dtype).requires_grad_(grad)
        c = A._prepare_call(q, q, q, spec, None, None, None)
        assert (A._stock(c, tuple(A._BACKENDS.values())) is not None) is stock, (dtype, grad)


@pytest.mark.parametrize(("length", "share"), [(256, 1.0), (512, 1.0), (1024, 0.75), (2048, 0.625), (8192, 0.53125)])
def test_sdpa_prices_a_causal_row_at_the_pairs_its_key_blocks_compute(monkeypatch, length, share):
    """torch's fused kernel computes every pair of a causal row up to 512 keys and about half of them plus 256 keys a
    query past that (timed at one thread: is_causal over half the unmasked time 2.05 at 512, 1.51 at 1,024, 1.28 at
    2,048; RESULTS.md, issue 15, "SDPA's causal rows"): its estimate is the unmasked one times that share, not half."""
    monkeypatch.setattr(W, "threads_available", lambda: 1)
    sdpa = importlib.import_module("attnmask.backends.sdpa")
    q = torch.zeros(1, 4, length, 64)
    causal = A._prepare_call(q, q, q, am.causal(), None, None, None)
    unmasked = A._prepare_call(q, q, q, None, None, None, None)
    want = share + (0.5 / length if length > 512 else 0.0)  # half of (L + 1) / L past 512 keys
    assert sdpa.cost(causal) == pytest.approx(sdpa.cost(unmasked) * want)


def test_sdpa_prices_a_causal_row_with_score_modifiers_as_the_biased_call_it_runs(monkeypatch):
    """With ALiBi slopes (or sinks) ``run`` takes no ``is_causal`` shortcut: it builds the dense mask into a float
    bias and SDPA computes every pair (``_run_with_bias``). The estimate and the scratch follow: above the unmasked
    call's pairs by the mask and the bias, not the causal share of them (a plain ``causal()`` and a whole-row document
    alike)."""
    monkeypatch.setattr(W, "threads_available", lambda: 1)
    sdpa = importlib.import_module("attnmask.backends.sdpa")
    q, slopes = torch.zeros(2, 4, 1024, 64), torch.full((4,), 0.5)
    unmasked = A._prepare_call(q, q, q, None, None, None, None)
    for spec in (am.causal(), am.causal() & am.document(seq_lens=[1024])):
        plain = A._prepare_call(q, q, q, spec, None, None, None)
        biased = A._prepare_call(q, q, q, spec, None, None, None, alibi_slopes=slopes)
        assert sdpa.cost(plain) < sdpa.cost(unmasked) < sdpa.cost(biased)
        assert sdpa._scratch_bytes(plain) == 0
        assert sdpa._scratch_bytes(biased) == 2 * 1024 * 1024 * (1 + 4 * 4)  # the bool mask and the float bias
    # full() builds no bool mask under modifiers either (the bias alone), and is priced as no mask at all
    none, full = (A._prepare_call(q, q, q, m, None, None, None, alibi_slopes=slopes) for m in (None, am.full()))
    assert sdpa._scratch_bytes(full) == sdpa._scratch_bytes(none) == 2 * 1024 * 1024 * 4 * 4
    assert sdpa.cost(full) == sdpa.cost(none)


@pytest.mark.parametrize(("queries", "share"), [(8, 1.0), (512, 1.0), (1024, 0.75 + 0.5 / 1024)])
def test_sdpa_prices_a_split_causal_call_by_the_same_key_blocks(monkeypatch, queries, share):
    """A bottom-right causal chunk of Q queries against 2,048 keys runs as an unmasked call over the first K - Q keys
    and an is_causal block of Q x Q, which computes every pair up to 512 keys (``_common.sdpa_pairs``): at Q <= 512
    the whole chunk's pairs, at Q = 1,024 the first half's plus 0.75 of the block's."""
    monkeypatch.setattr(W, "threads_available", lambda: 1)
    sdpa = importlib.import_module("attnmask.backends.sdpa")
    q, k = torch.zeros(1, 4, queries, 64), torch.zeros(1, 4, 2048, 64)
    causal = A._prepare_call(q, k, k, am.causal(), None, None, None)
    unmasked = A._prepare_call(q, k, k, None, None, None, None)
    assert sdpa._splits_causal(causal)
    block = queries / 2048  # the block's share of the call's pairs
    assert sdpa.cost(causal) == pytest.approx(sdpa.cost(unmasked) * (1 - block + block * share))


@pytest.mark.parametrize(("prefixes", "computed"), [([2048], 2048 * 8192 + 6144 * 6145 / 2 + 6144 * 256)])
@pytest.mark.parametrize("rows", [1, 2])
def test_sdpa_prices_a_split_prefix_lm_call_by_the_pairs_its_calls_compute(monkeypatch, prefixes, computed, rows):
    """A prefix-LM row of 8,192 with a prefix of 2,048 runs as every query against the prefix (8,192 x 2,048) and an
    is_causal block of 6,144 (``_common.sdpa_pairs``: half its pairs plus a key block of 256 per query): the estimate
    is the unmasked call's times that share of the row's pairs, plus ``CALL_COST`` per call (two for the run of
    rows); rows of prefixes 0 and 8,192 (``causal()``, every key: one call each) beside it are priced as those."""
    monkeypatch.setattr(W, "threads_available", lambda: 1)
    sdpa = importlib.import_module("attnmask.backends.sdpa")
    q = torch.zeros(rows, 4, 8192, 64)
    call = A._prepare_call(q, q, q, am.prefix_lm(prefixes * rows), None, None, None)
    unmasked = A._prepare_call(q, q, q, None, None, None, None)
    assert sdpa._splits_prefix(call)
    assert sdpa.cost(call) == pytest.approx(sdpa.cost(unmasked) * computed / 8192**2 + 2 * C.CALL_COST)
    mixed = A._prepare_call(
        q[:1].expand(3, -1, -1, -1),
        q[:1].expand(3, -1, -1, -1),
        q[:1].expand(3, -1, -1, -1),
        am.prefix_lm([0, 2048, 8192]),
        None,
        None,
        None,
    )
    causal = C.sdpa_pairs(8192, 8192, True)
    share = (causal + computed + 8192**2) / (3 * 8192**2)
    unmasked3 = A._prepare_call(*(q[:1].expand(3, -1, -1, -1),) * 3, None, None, None, None)
    assert sdpa.cost(mixed) == pytest.approx(sdpa.cost(unmasked3) * share + 4 * C.CALL_COST)


@pytest.mark.parametrize(("length", "size"), [(8192, 1024), (1300, 512)])
def test_sdpa_prices_stacked_chunks_by_the_pairs_their_causal_calls_compute(monkeypatch, length, size):
    """``causal() & chunked(c)`` runs as one is_causal call per chunk (the last one shorter): the estimate is the
    unmasked call's times the share of pairs those calls compute (``_common.sdpa_pairs`` of each chunk), plus
    ``CALL_COST`` per call (the row's stacked whole chunks, its shorter last chunk)."""
    monkeypatch.setattr(W, "threads_available", lambda: 1)
    sdpa = importlib.import_module("attnmask.backends.sdpa")
    q = torch.zeros(1, 4, length, 64)
    call = A._prepare_call(q, q, q, am.causal() & am.chunked(size), None, None, None)
    unmasked = A._prepare_call(q, q, q, None, None, None, None)
    assert sdpa._chunk_split(call) == size
    whole, last = length // size, length % size
    pairs = whole * C.sdpa_pairs(size, size, True) + C.sdpa_pairs(last, last, True)
    calls = 1 + (last > 0)
    assert sdpa.cost(call) == pytest.approx(sdpa.cost(unmasked) * pairs / length**2 + calls * C.CALL_COST)


@pytest.mark.parametrize("grad", [False, True])
def test_sdpa_charges_a_mask_it_builds_on_every_call_once_per_element_outside_the_mode_factor(monkeypatch, grad):
    """A spec mask over ``_CACHED_MASK_BYTES`` (rows of 8,192 in bfloat16: 128 MiB) is built and read on every call:
    ``_UNKEPT_MASK_COST`` per element, not multiplied by the backward's factor; rows of 1,024 (2 MiB, kept with the
    plans) and a split prefix-LM call or window (no mask) pay nothing. Without the charge a bfloat16 window of 4,096
    on rows of 8,192 was priced cheaper on SDPA's masked call than on native, where SDPA ran 2.4x slower (RESULTS.md,
    "Masks built on every call"); windows now run without a mask, so two documents stand in for it."""
    monkeypatch.setattr(W, "threads_available", lambda: 1)
    sdpa = importlib.import_module("attnmask.backends.sdpa")

    def costs(length, spec, charge):
        q = torch.zeros(1, 4, length, 64, dtype=torch.bfloat16, requires_grad=grad)
        monkeypatch.setattr(sdpa, "_UNKEPT_MASK_COST", charge)
        return sdpa.cost(A._prepare_call(q, q, q, spec, None, None, None))

    masked = am.causal() & am.document(seq_lens=[[4096, 4096]])
    assert costs(8192, masked, 370.0) - costs(8192, masked, 0.0) == pytest.approx(370.0 * 8192**2)
    masked = am.causal() & am.document(seq_lens=[[512, 512]])
    assert costs(1024, masked, 370.0) == costs(1024, masked, 0.0)
    for unmasked in (am.prefix_lm(2048), am.sliding_window(4096)):
        assert costs(8192, unmasked, 370.0) == costs(8192, unmasked, 0.0)
    monkeypatch.undo()
    q = torch.zeros(1, 4, 8192, 64, dtype=torch.bfloat16)
    assert am.explain(q, q, q, am.causal() & am.document(seq_lens=[[4096, 4096]])).picked != "sdpa"


def test_sdpa_charges_a_gradient_per_key_so_a_decoding_step_with_a_gradient_is_not_priced_by_its_pairs(monkeypatch):
    """One query against 4,096 keys with a gradient: SDPA's backward pays per key (RESULTS.md: 6.0 ms of 7.3 at one
    thread), so its estimate holds that charge, and the oracle's holds at least as much."""
    monkeypatch.setattr(W, "threads_available", lambda: 1)
    ref = importlib.import_module("attnmask.backends.reference")
    sdpa = importlib.import_module("attnmask.backends.sdpa")
    q = torch.zeros(1, 4, 1, 64, requires_grad=True)
    k = torch.zeros(1, 4, 4096, 64, requires_grad=True)
    with_grad = A._prepare_call(q, k, k, am.causal(), None, None, None)
    without = A._prepare_call(q.detach(), k.detach(), k.detach(), am.causal(), None, None, None)
    keys = C.SDPA_BACKWARD_KEY_COST * 4 * 4096 * 128
    factor = sdpa.MODES.of(torch.float32, "cpu", True)
    assert sdpa.cost(with_grad) == pytest.approx(sdpa.cost(without) * factor + keys)
    assert ref.cost(with_grad) >= sdpa.cost(with_grad) and ref.cost(without) >= sdpa.cost(without)


def test_sdpa_divides_its_backward_key_charge_by_its_threads_gain_too(monkeypatch):
    """At two threads the whole estimate of a decoding step with a gradient, the per-key charge included, is the
    one-thread estimate over what the threads gain on the call (measured on the Xeon: 1.6-2.0x)."""
    sdpa = importlib.import_module("attnmask.backends.sdpa")
    q = torch.zeros(1, 4, 8, 64, requires_grad=True)
    k = torch.zeros(1, 4, 4096, 64, requires_grad=True)
    with_grad = A._prepare_call(q, k, k, am.causal(), None, None, None)
    monkeypatch.setattr(W, "threads_available", lambda: 1)
    one = sdpa.cost(with_grad)
    monkeypatch.setattr(W, "threads_available", lambda: 2)
    assert sdpa._threads_gain(with_grad) > 1.5
    assert sdpa.cost(with_grad) == pytest.approx(one / sdpa._threads_gain(with_grad))


def test_sdpa_charges_each_key_of_a_single_bfloat16_query_by_cpu_kind(monkeypatch):
    """A decoding step's forward with one bfloat16 query pays ``_BF16_ONE_QUERY_KEY_COST`` per key and head on top of
    its pairs (4-7x float32's time on the AMD EPYC; nothing on the Xeon with AMX tiles); 8 queries, float32 and a call
    with a gradient do not; the constant is declared per CPU kind."""
    sdpa = importlib.import_module("attnmask.backends.sdpa")
    monkeypatch.setattr(W, "threads_available", lambda: 1)
    assert sdpa.CPU_KIND_VALUES["_BF16_ONE_QUERY_KEY_COST"] == (0.0, 2500.0)
    assert sdpa._BF16_ONE_QUERY_KEY_COST == C.per_cpu_kind((0.0, 2500.0))

    def one_thread(queries, dtype, grad=False):
        q = torch.zeros(2, 4, queries, 64, dtype=dtype, requires_grad=grad)
        k = torch.zeros(2, 2, 4096, 64, dtype=dtype, requires_grad=grad)
        return sdpa._one_thread_cost(A._prepare_call(q, k, k, None, None, None, None))

    monkeypatch.setattr(sdpa, "_BF16_ONE_QUERY_KEY_COST", 0.0)
    cases = [(n, d, g) for n in (1, 8) for d in (torch.float32, torch.bfloat16) for g in (False, True)]
    plain = {case: one_thread(*case) for case in cases}
    monkeypatch.setattr(sdpa, "_BF16_ONE_QUERY_KEY_COST", 2500.0)
    for (n, dtype, grad), before in plain.items():
        extra = 2 * 4 * 4096 * 2500.0 if (n, dtype, grad) == (1, torch.bfloat16, False) else 0.0
        assert one_thread(n, dtype, grad) == pytest.approx(before + extra), (n, dtype, grad)


def test_auto_weighs_the_backward_it_will_run(monkeypatch):
    """Two backends whose forward estimates tie: the one with the cheaper backward wins once a gradient is needed."""
    monkeypatch.setattr(C, "cpu_has_amx_bf16", lambda: False)
    monkeypatch.setattr(W, "threads_available", lambda: 1)
    fwd, bwd = call(torch.float32, False), call(torch.float32, True)
    scale = BS.BACKEND.cost(fwd) / N.BACKEND.cost(fwd)  # native's forward estimate made equal to blocksparse's
    monkeypatch.setattr(N, "_CALL_COST", N._CALL_COST * scale)
    monkeypatch.setattr(N, "_ROW_COST", N._ROW_COST * scale)
    monkeypatch.setattr(N, "_PAIR_COST", N._PAIR_COST * scale)
    monkeypatch.setattr(N, "_LONG_PAIR_COST", N._LONG_PAIR_COST * scale)
    monkeypatch.setattr(N, "_BLOCKED_KEY_COST", N._BLOCKED_KEY_COST * scale)
    assert N.BACKEND.cost(fwd) == pytest.approx(BS.BACKEND.cost(fwd))
    monkeypatch.setattr(N, "MODES", ModeFactors(backward=2.0))
    monkeypatch.setattr(BS, "MODES", ModeFactors(backward=5.0))
    assert N.BACKEND.cost(bwd) < BS.BACKEND.cost(bwd)
    monkeypatch.setattr(BS, "MODES", ModeFactors(backward=1.5))
    assert N.BACKEND.cost(bwd) > BS.BACKEND.cost(bwd)


def mode_table(threads: int, blocks: dict, tiles: str | None = None) -> str:
    """A saved ``bench_limit`` table (its own format) of rows of 256 tokens with only "blocksparse" timed, in the four
    modes: ``blocks`` ``{(title, structure): ms}``, titles as the script prints them; ``tiles``: what its first line
    says of the CPU's bfloat16 tiles (``None``: nothing, as before 2026-12-02)."""
    said = "" if tiles is None else f", bfloat16 tiles: {tiles}"
    lines = [f"torch x, {threads} thread(s), rows of 256, decode against 512 keys, H=4, D=64, load 0{said}", ""]
    for title in dict.fromkeys(t for t, _ in blocks):
        lines += [
            f"**{title}, {threads} thread(s)** (ms)",
            "",
            "| structure | allowed | ideal ms | covered | floor ms | blocksparse | auto picks | auto / ideal |",
            "|---|---|---|---|---|---|---|---|",
        ]
        rows = [(name, ms) for (t, name), ms in blocks.items() if t == title]
        lines += [f"| {name} | 0.5 | 1.0 | - | - | {ms} | sdpa | 1.0 |" for name, ms in rows]
        lines.append("")
    return "\n".join(lines)


@pytest.mark.parametrize("tiles", ["amx", "none", "none, AVX512-BF16: yes"])
def test_fit_modes_recovers_the_factors_the_tables_were_made_with(tmp_path, capsys, tiles):
    """blocksparse's estimate does not otherwise depend on the dtype or the backward, so the table's ratios are the
    factors themselves; a table of a CPU without AMX tiles gives the ``_no_amx`` bfloat16 factors, the others kept;
    one of a CPU with AVX512-BF16 and no tiles, whose bfloat16 uses the float32 factors, only ``backward``."""
    bench = bench_limit()
    names = [c.name for c in bench.cases(256, 512) if c.name.startswith(("causal +", "prefix", "causal chunked"))]
    made = {"forward, float32": 1.0, "forward, bfloat16": 1.5, "forward + backward, float32": 4.0}
    made["forward + backward, bfloat16"] = 3.0
    blocks = {(title, name): (10.0 + i) * f for title, f in made.items() for i, name in enumerate(names)}
    path = tmp_path / "modes.txt"
    path.write_text(mode_table(1, blocks, tiles))
    own = BS.MODES
    bench.main(["--fit", str(path), "--modes"])
    out = capsys.readouterr().out
    counts = f"{len(names)}, {len(names)}, {len(names)}"
    if tiles == "amx":  # the busy factors kept, and the other CPU's
        fitted = dataclasses.replace(own, bf16=1.5, backward=4.0, bf16_backward=3.0)
    elif tiles == "none":
        fitted = dataclasses.replace(own, bf16_no_amx=1.5, backward=4.0, bf16_backward_no_amx=3.0)
    if tiles.endswith("yes"):
        ratios = {"bf16": 1.5, "backward": 4.0, "bf16_backward": 3.0}
        assert f"| blocksparse | {own} | {ratios} (bfloat16 ones not kept) | {counts} |" in out
    else:
        assert f"| blocksparse | {own} | {fitted} | {counts} |" in out
    assert "1, bfloat16, fwd+bwd" in out and "now: " in out and "fitted: " in out
    assert BS.MODES == own  # the modules keep their own factors
    other = tmp_path / "other.txt"
    other.write_text(mode_table(1, blocks, "none" if tiles == "amx" else "amx"))
    with pytest.raises(SystemExit, match="with and without AMX"):
        bench.main(["--fit", str(path), str(other), "--modes"])


def test_fit_grid_counts_the_picks_at_every_combination(tmp_path, capsys, monkeypatch):
    """``--fit ... --grid``: a table of a CPU without AMX tiles whose columns are every CPU backend's estimate with a
    per-tile charge of 7e6 (no call charge) and native's blocked long share at 0.6 (that kind's before 2026-12-07,
    where blocksparse is the cheapest on some rows), at 1 ps per unit: at those values each pick is the fastest, so
    every row counts; at 1e9 blocksparse is never picked, so the rows it was fastest on do not. One line per
    combination, counted under the table's kind; a constant no backend holds is refused."""
    bench = bench_limit()
    args = argparse.Namespace(heads=4, dim=64, length=1024, decode_keys=4096)
    columns = ("sdpa", "varlen", "blocksparse", "banded", "native")
    rows, fastest = {}, []
    for case in bench.cases(1024, 4096)[:10]:
        qkv = tuple(torch.zeros(shape) for shape in bench._shapes(case, args))
        with bench.at_threads(1), bench.on_cpu_kind(False, False):  # the kind the table's header names
            BS._GROUP_COST, BS._CALL_COST = 7e6, 0.0  # on top of that kind's constants (all its own: put back)
            N._BLOCKED_LONG_SCALE = 0.6
            explained = am.explain(*qkv, case.spec)
        costs = dict(zip(explained.backends, explained.costs, strict=True))
        rows[case.name] = [costs.get(n) if costs.get(n) not in (None, float("inf")) else None for n in columns]
        fastest.append(min((c, n) for c, n in zip(rows[case.name], columns, strict=True) if c is not None)[1])
    assert "blocksparse" in fastest and len(set(fastest)) > 1  # the grid's second value moves some picks
    lines = ["torch x, 1 thread(s), rows of 1024, decode against 4096 keys, H=4, D=64, load 0, bfloat16 tiles: none"]
    lines += ["", "**forward, float32, 1 thread(s)** (ms)", ""]
    header = ["structure", "allowed", "ideal ms", "covered", "floor ms", *columns, "auto picks", "auto / ideal"]
    lines += ["| " + " | ".join(header) + " |"]
    lines += ["|" + "---|" * (len(columns) + 7)]
    for name, times in rows.items():
        cells = " | ".join("-" if t is None else repr(t * 1e-9) for t in times)
        lines.append(f"| {name} | 0.5 | 1.0 | - | - | {cells} | sdpa | 1.0 |")
    path = tmp_path / "grid.txt"
    path.write_text("\n".join(lines) + "\n")
    grid = ["blocksparse._GROUP_COST=7e6,1e9", "blocksparse._CALL_COST=0", "native._BLOCKED_LONG_SCALE=0.6"]
    bench.main(["--fit", str(path), "--grid", *grid])
    out = capsys.readouterr().out.splitlines()
    names = "| blocksparse._GROUP_COST | blocksparse._CALL_COST | native._BLOCKED_LONG_SCALE |"
    assert out[0] == f"{names} tables with AMX tiles | other tables |"
    assert out[2] == f"| 7e+06 | 0 | 0.6 | - | {len(rows)} of {len(rows)} |"
    kept = len(rows) - fastest.count("blocksparse")
    assert out[3] == f"| 1e+09 | 0 | 0.6 | - | {kept} of {len(rows)} |" and len(out) == 4
    with pytest.raises(SystemExit, match="--grid: expected backend.CONSTANT"):
        bench.main(["--fit", str(path), "--grid", "blocksparse._NO_SUCH=1"])


def test_fit_groups_recovers_the_per_tile_charge_the_table_was_made_with(tmp_path, capsys, monkeypatch):
    """A table of a CPU without AMX tiles timed at 1 ps per unit (sdpa's estimate) whose blocksparse column was made
    with a per-tile charge of 7e6 (and that kind's per-call charge): ``--fit --implied blocksparse._GROUP_COST`` reads
    7e6 back, whatever the module holds (the replay holds the table's kind's, ``as_measured_on``)."""
    bench = bench_limit()
    args = argparse.Namespace(heads=4, dim=64, length=256, decode_keys=512)
    names = [c for c in bench.cases(256, 512) if c.name.startswith(("causal +", "prefix", "causal chunked"))]
    monkeypatch.setattr(BS, "_GROUP_COST", 7e6)
    monkeypatch.setattr(BS, "_CALL_COST", BS._CALL_COSTS[1])
    rows = {}
    for case in names:
        times = [bench.estimate(case, torch.float32, n, 1, args) * 1e-9 for n in ("sdpa", "blocksparse")]  # ms
        rows[case.name] = times
    monkeypatch.setattr(BS, "_GROUP_COST", 1e5)
    lines = ["torch x, 1 thread(s), rows of 256, decode against 512 keys, H=4, D=64, load 0, bfloat16 tiles: none", ""]
    lines += ["**forward, float32, 1 thread(s)** (ms)", "", "| structure | allowed | ideal ms | covered | floor ms "]
    lines[-1] += "| sdpa | blocksparse | auto picks | auto / ideal |"
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | 0.5 | 1.0 | - | - | {s!r} | {b!r} | sdpa | 1.0 |" for name, (s, b) in rows.items()]
    path = tmp_path / "groups.txt"
    path.write_text("\n".join(lines) + "\n")
    bench.main(["--fit", str(path), "--implied", "blocksparse._GROUP_COST"])
    out = capsys.readouterr().out
    assert f"1 thread(s), {len(names)} rows, implied _GROUP_COST median 7e+06" in out
    assert f"all: median 7e+06 (now {BS._GROUP_COSTS[1]:.3g})" in out


def test_busy_factors_apply_only_while_cores_are_taken(monkeypatch):
    modes = ModeFactors(backward=3.0, busy=1.5, busy_backward=2.0)
    assert modes.of(torch.float32, "cpu", False, contended=True) == 1.5
    assert modes.of(torch.float32, "cpu", True, contended=True) == 6.0
    assert modes.of(torch.float32, "cpu", True, contended=False) == 3.0
    assert modes.of(torch.float32, "cuda", True, contended=True) == 1.0
    fwd = call(torch.float32, False)
    monkeypatch.setattr(W, "contended", lambda: True)
    assert C.mode_factor(modes, fwd) == 1.5
    monkeypatch.setattr(W, "contended", lambda: False)
    assert C.mode_factor(modes, fwd) == 1.0


def test_busy_factors_follow_the_calls_size(monkeypatch):
    """Small calls take ``busy_small``, large ones ``busy``, a geometric step between; without a small factor the
    large one throughout; the size is the multiply-adds of the pairs the spec allows (``_common.busy_work``)."""
    modes = ModeFactors(busy=1.6, busy_small=1.1, busy_backward=2.0)
    small, large = C.BUSY_SMALL_WORK, C.BUSY_LARGE_WORK
    assert modes.busy_at(False, small / 10) == modes.busy_at(False, small) == 1.1
    assert modes.busy_at(False, large) == modes.busy_at(False, large * 10) == modes.busy_at(False, None) == 1.6
    middle = (small * large) ** 0.5
    assert modes.busy_at(False, middle) == pytest.approx((1.1 * 1.6) ** 0.5)
    assert 1.1 < modes.busy_at(False, middle * 1.5) < 1.6
    assert modes.busy_at(True, small) == 2.0  # no small backward factor: the large one
    assert ModeFactors(busy=1.6).busy_at(False, small) == 1.6

    def made(spec, batch=1, length=1024, dim=64):
        q = torch.zeros(batch, 4, length, dim)
        return A._prepare_call(q, q, q, spec, None, None, None)

    dense = 4 * 1024 * 1024 * 128
    assert C.busy_work(made(am.full())) == dense
    assert C.busy_work(made(am.causal())) == pytest.approx(dense * 1025 / 2048)
    assert C.busy_work(made(am.causal() & am.chunked(128))) == pytest.approx(dense / 16)
    assert C.busy_work(made(am.causal() & am.document(seq_lens=[512, 512]))) == pytest.approx(dense * 1026 / 4096)
    pad = torch.ones(2, 1024, dtype=torch.bool)
    pad[1, :512] = False  # one row of 1,024 real tokens, one of 512: 1,024·1,025 / 2 + 512·513 / 2 pairs
    expected = 4 * 128 * (1024 * 1025 + 512 * 513) / 2
    assert C.busy_work(made(am.causal() & am.key_padding(pad), batch=2)) == pytest.approx(expected)
    assert C.busy_work(made(am.prefix_lm(256))) == dense  # not counted: all pairs

    monkeypatch.setattr(W, "contended", lambda: True)
    assert C.mode_factor(modes, made(am.causal() & am.chunked(16), length=256, dim=16)) == 1.1
    assert C.mode_factor(modes, made(am.causal(), batch=8, length=4096)) == 1.6


@pytest.mark.parametrize(
    "length, name, slower",
    [
        (1024, "causal + left padding", "varlen"),
        (8192, "documents: few long", "varlen"),
        (8192, "sliding window 1024", "blocksparse"),
        (8192, "sliding window 4096", "blocksparse"),
    ],
)
def test_under_a_taken_core_native_keeps_the_rows_it_runs_fastest(monkeypatch, length, name, slower):
    """One core of two taken, forward, the Xeon kind, H = 4, D = 64: ``native`` ran these rows fastest busy in every
    current busy table of that CPU where ``auto`` picked ``varlen`` or ``blocksparse`` with one busy factor per
    backend (left padding on rows of 1K: varlen 1.18-1.46x slower in s34, s35, s35b and s36_busy_q2; few long
    documents on rows of 8K: varlen 1.17-1.34x in s36 and s37_busy_8k2_fwd; windows of 1,024 and 4,096 there:
    blocksparse 1.10-1.29x and 1.17-1.38x, in s37b too). Large calls' factors (varlen 1.55, native 1.5, blocksparse
    1.45) since RESULTS.md, issue 15, "Busy factors by the call's size". The single factors are replayed on the
    estimates of their day (native's blocked long share 0.36; since its faster forward 0.33, which alone sends the
    window of 1,024 to native)."""
    monkeypatch.setattr(W, "contended", lambda: True)
    monkeypatch.setattr(W, "threads_available", lambda: 2)
    bench = bench_limit()
    case = next(c for c in bench.cases(length, 4096) if c.name.startswith(name))
    q = torch.zeros(case.batch, 4, case.q_len, 64)
    k = torch.zeros(case.batch, 4, case.kv_len, 64)
    with bench.on_cpu_kind(True, True):
        assert am.explain(q, k, k, case.spec).picked == "native"
    old = {VL: dataclasses.replace(VL.MODES, busy=1.03, busy_small=None)}
    old[N] = dataclasses.replace(N.MODES, busy=1.61, busy_small=None)
    old[BS] = dataclasses.replace(BS.MODES, busy=1.3, busy_small=None)
    for module, modes in old.items():
        monkeypatch.setattr(module, "MODES", modes)
    monkeypatch.setitem(N.CPU_KIND_VALUES, "_BLOCKED_LONG_SCALE", (0.36, 0.6))
    with bench.on_cpu_kind(True, True):  # one factor per backend picked the slower one
        assert am.explain(q, k, k, case.spec).picked == slower


def test_contended_follows_the_threads_small_regions_get(monkeypatch):
    monkeypatch.setattr(W, "threads_available", lambda: 2)
    monkeypatch.setattr(W, "region_threads", lambda work=None, share_work=None: 1)
    assert W.contended()
    monkeypatch.setattr(W, "region_threads", lambda work=None, share_work=None: 2)
    assert not W.contended()


def test_auto_chooses_again_when_cores_are_taken_or_freed(monkeypatch):
    """The cached choice is keyed by the load: a backend that slows most while a core is taken loses the pick then,
    and wins it back once the core is free, for the same spec object."""
    monkeypatch.setattr(W, "threads_available", lambda: 1)
    fwd = call(torch.float32, False)
    first = A.choose_backend(fwd)
    module = importlib.import_module(f"attnmask.backends.{first.name}")
    monkeypatch.setattr(module, "MODES", dataclasses.replace(module.MODES, busy=1e6, busy_small=None))
    monkeypatch.setattr(W, "contended", lambda: True)
    busy = A.choose_backend(fwd)
    assert busy is not first
    monkeypatch.setattr(W, "contended", lambda: False)
    assert A.choose_backend(fwd) is first


@pytest.mark.parametrize("amx", [True, False], ids=["xeon", "epyc"])
def test_under_a_taken_core_a_long_causal_row_goes_to_sdpa(monkeypatch, amx):
    """One core of two taken, a causal row of 8,192 (forward, H = 4, D = 64): SDPA's ``is_causal`` call measured 252
    ms busy against blocksparse's 303 (Xeon, limit_tables/s31_busy_8k2_fwd.txt; the EPYC's s22_busy_8k2_fwd.txt the
    same order); with blocksparse's busy factor at 1.0 and SDPA's at 1.95 the estimates had picked blocksparse
    (RESULTS.md, issue 15, "Busy factors from every busy table")."""
    monkeypatch.setattr(W, "contended", lambda: True)
    monkeypatch.setattr(W, "threads_available", lambda: 1)
    q, k, v = (torch.randn(1, 4, 8192, 64) for _ in range(3))
    with bench_limit().on_cpu_kind(amx, True):
        assert am.explain(q, k, v, am.causal()).picked == "sdpa"


def test_the_reference_estimate_scales_at_least_as_much_as_any_backend():
    """The oracle is picked only where nothing else serves: in every mode its factor is the largest fitted."""
    ref = importlib.import_module("attnmask.backends.reference").MODES
    for name in CPU_BACKENDS:
        modes = importlib.import_module(f"attnmask.backends.{name}").MODES
        for field in ("bf16", "backward", "bf16_backward", "busy", "busy_backward"):
            assert getattr(ref, field) >= getattr(modes, field), (name, field)
        for field, large in (("busy_small", "busy"), ("busy_backward_small", "busy_backward")):
            if getattr(modes, field) is not None:  # the oracle has none: its large factor covers them
                assert getattr(ref, large) >= getattr(modes, field), (name, field)
        for field in ("bf16_no_amx", "bf16_backward_no_amx"):
            if getattr(modes, field) is not None:
                assert getattr(ref, field) >= getattr(modes, field), (name, field)


def test_fit_busy_factors_reads_the_busy_tables_and_only_them(tmp_path, capsys):
    """Medians of the busy tables' slowdowns per backend and mode; a backend with small calls' factors (native) fits
    them on its small cells (rows of 256: ~1e7 multiply-adds) and keeps its large ones where no cell is large, one
    without them (sdpa) fits its only ones on every cell."""
    bench = bench_limit()
    names = [c.name for c in bench.cases(256, 512) if c.name.startswith(("causal +", "prefix", "causal chunked"))]
    lines = ["torch x, 2 thread(s), rows of 256, decode against 512 keys, H=4, D=64, load 0", ""]
    lines += ["**forward, float32, 2 thread(s)** (ms)", ""]
    lines += ["| structure | allowed | ideal ms | covered | floor ms | sdpa | native | auto picks | auto / ideal |"]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | 0.5 | 1.0 | - | - | 5.0 | 5.0 | sdpa | 1.0 |" for name in names]
    for title, slow in (("forward", 1.5), ("forward + backward", 2.5)):
        lines += ["", f"**{title}, one core busy: slowdown busy / idle (busy ms)**", ""]
        lines += ["| structure | (unmasked sdpa) | (floor) | sdpa | native | auto picks | auto busy / best busy | x |"]
        lines += ["|---|---|---|---|---|---|---|---|"]
        spread = (-0.1, 0.0, 0.4, 0.1)  # median +0.05, mean +0.1
        rows = zip(names, spread, strict=True)
        lines += [
            f"| {n} | 2.00 (9.0) | - | {slow + d:.2f} (7.5) | {slow - 0.3 + d:.2f} (6.0) | sdpa | 1.00 | - |"
            for n, d in rows
        ]
    path = tmp_path / "busy.txt"
    path.write_text("\n".join(lines) + "\n")
    cells = bench.parse_tables(str(path), 8192, 32768)
    assert {seconds for *_, seconds in cells} == {0.005}  # the idle table only
    busy = bench.parse_busy(str(path), 8192, 32768)
    expected = {(g, n) for g in (False, True) for n in ("sdpa", "native")}
    assert {(grad, name) for _, grad, _, name, _, _ in busy} == expected
    assert {seconds for *_, seconds in busy} == {0.0075, 0.006}
    own, native = S.MODES, N.MODES
    assert native.busy_small is not None and native.busy_backward_small is None and own.busy_small is None
    bench.main(["--fit", str(path), "--busy-factors"])
    out = capsys.readouterr().out
    assert f"| sdpa | {own.busy} -> 1.55 | {own.busy_backward} -> 2.55 | busy 4, busy_backward 4 |" in out
    line = f"| native | {native.busy_small} -> 1.25 | {native.busy_backward} -> 2.25 | busy_small 4, busy 0, "
    assert line + "busy_backward 4 |" in out
    assert "now: " in out and S.MODES == own and N.MODES == native


@pytest.mark.parametrize("length, window", [(512, 256), (512, 64), (300, 100), (256, 255)])
def test_varlen_estimate_counts_the_key_bands_its_window_path_computes(monkeypatch, length, window):
    """Under a window shorter than the document, varlen runs masked SDPA per query block over its whole key band:
    ``band_pairs`` counts exactly the pairs those calls compute (a causal half undercounts large windows 2x)."""
    seen = []
    real = VL._sdpa

    def spy(q, k, v, mask, *args):
        assert mask is not None and mask.shape == (q.shape[2], k.shape[2])  # one masked call per query block
        seen.append(q.shape[0] * q.shape[2] * k.shape[2])
        return real(q, k, v, mask, *args)

    monkeypatch.setattr(VL, "_sdpa", spy)
    q = torch.randn(1, 2, length, 8)
    am.attention(q, q, q, am.causal() & am.sliding_window(window), backend="varlen")
    assert sum(seen) == VL.band_pairs(length, length, 0, window) > 0


def test_varlen_charges_the_documents_sdpa_runs_unmasked_at_the_amx_pair_factor(monkeypatch):
    """On a CPU with AMX bfloat16 tiles, the pairs of documents that SDPA's fused kernel runs whole (is_causal) cost
    ``AMX_BF16_PAIR_FACTOR`` of a float32 pair, as in sdpa's own estimate; tiny documents (batched matmuls) and
    windowed ones (masked calls per query block) keep the plain pair cost; float32 and a CPU without the tiles see
    no factor."""
    monkeypatch.setattr(W, "threads_available", lambda: 1)
    monkeypatch.setattr(VL, "MODES", ModeFactors(bf16_no_amx=1.0, bf16_backward_no_amx=1.0))  # every factor 1
    monkeypatch.setattr(VL, "_EXTRA_BF16_PAIR_WIDTH", VL._EXTRA_PAIR_WIDTH)  # one width: the kinds' pair factor alone
    q = torch.zeros(1, 4, 512, 32, dtype=torch.bfloat16)
    specs = {
        "whole": am.causal() & am.document(seq_lens=[256, 256]),
        "tiny": am.causal() & am.document(seq_lens=[16] * 32),
        "windowed": am.causal() & am.sliding_window(64) & am.document(seq_lens=[256, 256]),
    }

    def pair_part(spec, amx, dtype=torch.bfloat16):
        """The estimate with the pair cost at 1 minus at 0: the part that scales with the pairs."""
        monkeypatch.setattr(C, "cpu_has_amx_bf16", lambda: amx)
        estimates = []
        for pair_cost in (1.0, 0.0):
            monkeypatch.setattr(VL, "_PAIR_COST", pair_cost)
            monkeypatch.setattr(VL, "_MASKED_PAIR_COST", pair_cost)
            estimates.append(VL.cost(A._prepare_call(q.to(dtype), q.to(dtype), q.to(dtype), spec, None, None, None)))
        return estimates[0] - estimates[1]

    whole = pair_part(specs["whole"], True) / pair_part(specs["whole"], False)
    assert whole == pytest.approx(C.AMX_BF16_PAIR_FACTOR)
    for name in ("tiny", "windowed"):
        assert pair_part(specs[name], True) == pytest.approx(pair_part(specs[name], False)), name
    assert pair_part(specs["whole"], True, torch.float32) == pytest.approx(pair_part(specs["whole"], False))


def test_banded_charges_its_band_pairs_at_the_amx_pair_factor(monkeypatch):
    """banded runs one SDPA call on its band tiles: on a CPU with AMX bfloat16 tiles their pairs cost
    ``AMX_BF16_PAIR_FACTOR`` of a float32 pair, the per-tile items and the serial work do not change; float32 and a
    CPU without the tiles see no factor."""
    BD = importlib.import_module("attnmask.backends.banded")
    monkeypatch.setattr(W, "threads_available", lambda: 1)
    monkeypatch.setattr(BD, "MODES", ModeFactors(bf16_no_amx=1.0, bf16_backward_no_amx=1.0))  # every factor 1
    spec = am.causal() & am.document(seq_lens=[16] * 32)

    def pair_part(amx, dtype=torch.bfloat16):
        """The estimate with the pair cost at 1 minus at 0: the part that scales with the pairs."""
        monkeypatch.setattr(C, "cpu_has_amx_bf16", lambda: amx)
        q = torch.zeros(1, 4, 512, 32, dtype=dtype)
        estimates = []
        for pair_cost in (1.0, 0.0):
            monkeypatch.setattr(BD, "_PAIR_COST", pair_cost)
            estimates.append(BD.cost(A._prepare_call(q, q, q, spec, None, None, None)))
        return estimates[0] - estimates[1], estimates[1]

    (amx_pairs, amx_rest), (plain_pairs, plain_rest) = pair_part(True), pair_part(False)
    assert plain_pairs > 0 and amx_pairs == pytest.approx(C.AMX_BF16_PAIR_FACTOR * plain_pairs)
    assert plain_rest > 0 and amx_rest == pytest.approx(plain_rest)
    assert pair_part(True, torch.float32)[0] == pytest.approx(pair_part(False, torch.float32)[0])


def test_estimating_a_call_keeps_neither_the_call_nor_its_tensors_and_reads_the_cpu_flags_once():
    """The estimates run on every new spec: nothing may hold the call (and with it q, k, v) after ``attention``
    returns, and the AMX flag comes from /proc/cpuinfo once per process, not once per estimate."""
    assert hasattr(C.cpu_has_amx_bf16, "cache_info")
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(1, 2, 256, 16).to(dtype)  # past _STOCK_TINY_WORK, and few allowed pairs: the costs plan
        spec = am.causal() & am.document(seq_lens=[8] * 32)  # every backend
        assert not am.explain(q, q, q, spec).stock
        am.attention(q, q, q, spec)
        alive = weakref.ref(q)
        del q, spec
        gc.collect()
        assert alive() is None, dtype


def test_a_split_sdpa_call_takes_its_own_busy_factor_and_right_padding_leaves_it_under_a_taken_core(monkeypatch):
    """Under a taken core a call run as several unmasked calls (here right-padded rows of 8,192: an ``is_causal``
    block and an unmasked call) slowed 1.60-1.97x, one SDPA call 1.53-1.73x (limit_tables/s43b_busy_8k2_fwd.txt): its
    forward's busy factor is ``_SPLIT_BUSY``, a plain causal call keeps ``MODES.busy``, and "auto" then leaves the
    padded rows to another backend (it had kept the split at 1.22x native's busy time)."""
    monkeypatch.setattr(W, "threads_available", lambda: 2)
    real = torch.ones(2, 8192, dtype=torch.bool)
    real[1, 4096:] = False
    q = torch.zeros(2, 4, 8192, 64)
    padded = A._prepare_call(q, q, q, am.causal() & am.key_padding(real), None, None, None)
    plain = A._prepare_call(q, q, q, am.causal(), None, None, None)
    assert S._padded_runs(padded) is not None and not S._runs_split(plain)
    idle = [S.cost(c) for c in (padded, plain)]
    monkeypatch.setattr(W, "contended", lambda: True)
    busy = [S.cost(c) for c in (padded, plain)]
    assert busy[0] / idle[0] == pytest.approx(S._SPLIT_BUSY)
    assert busy[1] / idle[1] == pytest.approx(S.MODES.busy)
    assert am.explain(q, q, q, am.causal() & am.key_padding(real)).picked != "sdpa"
