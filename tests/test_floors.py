"""Planning on the costs path: ``"auto"`` skips a backend whose cheap lower bound (``Backend.floor``) passes the
cheapest estimate in hand, which must never change what it picks; packed rows are cut into documents in C exactly as
the general lowering does; blocksparse merges its query groups as its group-by-group form did."""

import contextlib
import importlib

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import attnmask as am
from attnmask.attention import _prepare_call
from attnmask.backends import REGISTRY, _clib, _common, _workers
from attnmask.backends import blocksparse as BS
from attnmask.backends import native as NV
from attnmask.backends import varlen as VL
from attnmask.backends.contract import no_floor
from attnmask.lowering import block_layout
from attnmask.tiles import FULL, NONE, PARTIAL
from tests.helpers import counted_in, general_plan
from tests.naive import naive_dense

A = importlib.import_module("attnmask.attention")  # the module; `attnmask.attention` is the function
FLOORED = [b for b in REGISTRY if b.floor is not no_floor]


def test_the_per_document_and_tiled_backends_declare_floors():
    assert sorted(b.name for b in FLOORED) == ["banded", "blocksparse", "reference", "varlen"]


def _doc_ids(draw, rows: int, length: int) -> torch.Tensor:
    """Runs of ids with gaps of -1, sometimes an id repeated apart (not one run: the lowering refuses it)."""
    out = []
    for _ in range(rows):
        row, doc = [], 0
        while len(row) < length:
            n = draw(st.integers(1, max(1, length // 3)))
            gap = draw(st.sampled_from([False, False, True]))
            row += [-1 if gap else doc] * n
            doc += 0 if gap else 1
        out.append(row[:length])
    ids = torch.tensor(out, dtype=torch.long)
    if draw(st.integers(0, 9)) == 0 and length > 2:
        ids[0, -1] = ids[0, 0] if ids[0, 0] >= 0 else 0
    return ids


@st.composite
def varlen_calls(draw):
    """Calls of the varlen form (documents, padding, windows, chunks, causal or not) on rows of up to 600 tokens (the
    tiled backend's three tile sizes), a spec of one row or one per batch row, several head layouts, float32 or
    bfloat16, with or without a gradient."""
    length = draw(st.integers(1, 600))
    batch = draw(st.integers(1, 3))
    rows = draw(st.sampled_from([1, batch]))
    spec = draw(st.sampled_from([am.causal(), am.full()]))
    if draw(st.booleans()):
        spec = spec & am.sliding_window(draw(st.integers(1, length)))
    docs = draw(st.booleans())
    if docs:
        spec = spec & am.document(doc_ids=_doc_ids(draw, rows, length))
    if draw(st.integers(0, 3)) == 0:
        spec = spec & am.chunked(draw(st.integers(1, length)))
    if draw(st.booleans()):
        real = torch.ones(rows, length, dtype=torch.bool)
        for r in range(rows):
            cut = draw(st.integers(0, length))
            kind = draw(st.sampled_from(["right", "left", "scattered"]))
            if kind == "scattered":
                real[r] = torch.tensor(draw(st.lists(st.booleans(), min_size=length, max_size=length)))
            else:
                real[r, cut:] = kind == "left"
                real[r, :cut] = kind == "right"
        spec = spec & am.key_padding(real)
    heads, kv_heads = draw(st.sampled_from([(1, 1), (4, 2), (4, 4)]))
    dim = draw(st.sampled_from([8, 64]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    grad = draw(st.booleans())
    q = torch.randn(batch, heads, length, dim, dtype=dtype, requires_grad=grad)
    k, v = (torch.randn(batch, kv_heads, length, dim, dtype=dtype, requires_grad=grad) for _ in range(2))
    return _prepare_call(q, k, v, spec, None, None, None)


@contextlib.contextmanager
def conditions(threads: int, busy: bool):
    """The thread count and the load the estimates read, set for the block."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_workers, "threads_available", lambda: threads)
        mp.setattr(_workers, "contended", lambda: busy)
        yield


def assert_floors_under_estimates(call, threads: int, busy: bool) -> None:
    with conditions(threads, busy):
        for b in FLOORED:
            if b.not_supported_reasons(call):
                continue
            floor, cost = b.floor(call), b.cost(call)
            assert 0.0 <= floor <= cost * (1 + 1e-12), (b.name, floor, cost)


@settings(max_examples=150, deadline=None)
@given(varlen_calls(), st.sampled_from([1, 2, 4]), st.booleans())
def test_no_floor_exceeds_its_backends_estimate(call, threads, busy):
    assert_floors_under_estimates(call, threads, busy)


@st.composite
def cache_calls(draw):
    """Queries at the end of a longer row of keys (a decoding step, a chunk of a prompt against its cache): causal,
    with or without a window, or every key; ``Q`` of 1-300 against ``K`` of ``Q`` to ``Q + 3000`` (all three tile
    sizes, lengths that are and are not multiples of them)."""
    q_len = draw(st.integers(1, 300))
    kv_len = q_len + draw(st.sampled_from([0, draw(st.integers(1, 3000))]))
    spec = draw(st.sampled_from([am.causal(), am.full()]))
    if draw(st.booleans()):
        spec = spec & am.sliding_window(draw(st.integers(1, kv_len)))
    batch = draw(st.integers(1, 2))
    grad = draw(st.booleans())
    q = torch.randn(batch, 2, q_len, 8, requires_grad=grad)
    k, v = (torch.randn(batch, 2, kv_len, 8, requires_grad=grad) for _ in range(2))
    return _prepare_call(q, k, v, spec, None, None, None)


@settings(max_examples=150, deadline=None)
@given(st.one_of(varlen_calls(), cache_calls()), st.sampled_from([1, 2]))
def test_no_floor_exceeds_its_estimate_once_a_plan_is_built(call, threads):
    """``"native"``, asked before the floors, builds its plan (varlen's, or for right padding under a causal mask its
    own, the padding queries in their row's segment) that the floors then read (``built_exact_plan``): their bounds
    from its segments, on rows and on queries against a longer cache."""
    if isinstance(_common.native_plan(call), str):
        return
    assert _common.built_exact_plan(call) is not None
    assert_floors_under_estimates(call, threads, False)


@settings(max_examples=150, deadline=None)
@given(st.one_of(varlen_calls(), cache_calls()), st.sampled_from([16, 64, 128]))
def test_blocksparse_floor_counts_segment_tiles_in_c_as_numpy_does(call, bs):
    """``_segment_pairs`` runs in C where the kernel is built: the same count as its numpy form, on document rows,
    windows, chunks, padding and queries against a longer cache, at every tile size."""
    if isinstance(_clib.library(), str):
        pytest.skip(_clib.library())
    plan = _common.varlen_plan(call)
    if isinstance(plan, str):
        return
    args = (plan, bs, call.batch, call.q_len, call.kv_len)
    assert BS._segment_pairs(*args) == BS._segment_pairs_numpy(*args)


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(varlen_calls(), cache_calls()),
    st.sampled_from([8, 64, 128, 192, 512]),
    st.sampled_from([1, 2, 4]),
    st.sampled_from([0, 5, NV.BLOCK_MIN_KEYS, NV._NEVER]),
)
def test_native_item_work_in_c_as_numpy_does(call, width, threads, block_keys):
    """native's estimate charges each segment (and each forward block) its pairs and rows in C where the kernel is
    built (``attnmask_item_work``): the numpy form's figures up to rounding, with and without causal rules and
    windows, on rows and on queries against a longer cache, at widths on both sides of the L1 runs, each segment of
    at least ``block_keys`` keys at the blocked form's charges; and the works' sum and the query rows the same pass
    adds up."""
    if isinstance(_clib.library(), str):
        pytest.skip(_clib.library())
    plan = _common.varlen_plan(call)
    if isinstance(plan, str):
        return
    for segs in (plan.segments, NV.forward_items(plan.segments, call.heads, threads)):
        for causal in {plan.causal or plan.window is not None, False}:
            c_form, total, rows = NV._item_work_sums(segs, causal, plan.window, width, block_keys=block_keys)
            numpy_form = NV._item_work_numpy(segs, causal, plan.window, width, block_keys=block_keys)
            np.testing.assert_allclose(c_form, numpy_form, rtol=1e-12)
            assert total == pytest.approx(float(numpy_form.sum()), rel=1e-12)
            assert rows == int(segs[:, 2].sum())


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(varlen_calls(), cache_calls()),
    st.sampled_from([8, 128, 512]),
    st.integers(1, 8),
    st.integers(2, 9),
    st.sampled_from([0.5, 0.85]),
)
def test_native_item_work_and_its_deal_in_one_c_call_as_in_two(call, width, repeat, threads, share):
    """Where native's forward deals the segments themselves, its estimate asks for their works and their deal in one
    C call (``attnmask_item_work_makespan``): the same works, sums and gain as ``_item_work_sums`` then
    ``_pulls_gain``, exactly (empty plans and fewer pulls than threads included); without the library, those two."""
    plan = _common.varlen_plan(call)
    if isinstance(plan, str):
        return
    causal = plan.causal or plan.window is not None
    work, total, rows = NV._item_work_sums(plan.segments, causal, plan.window, width)
    want = (work.tolist(), total, rows, NV._pulls_gain(work, repeat, threads, share))
    got = NV._item_work_gain(plan.segments, causal, plan.window, width, repeat, threads, share)
    assert (got[0].tolist(), *got[1:]) == want
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(NV, "_library", lambda: "switched off by the test")
        got = NV._item_work_gain(plan.segments, causal, plan.window, width, repeat, threads, share)
    np.testing.assert_allclose(got[0], work, rtol=1e-12)
    assert got[2] == rows and got[1] == pytest.approx(total, rel=1e-12) and got[3] == pytest.approx(want[3], rel=1e-12)


@settings(max_examples=150, deadline=None)
@given(st.one_of(varlen_calls(), cache_calls()))
def test_varlen_floor_sums_segments_in_c_as_numpy_does(call):
    """varlen's floor sums its charges over the plan's segments in C where the kernel is built
    (``attnmask_varlen_floor_sums``): the numpy form's sums up to rounding, tiny documents and SDPA's apart, with
    causal rules, windows and documents past SDPA's 512-key block."""
    if isinstance(_clib.library(), str):
        pytest.skip(_clib.library())
    plan = _common.varlen_plan(call)
    if isinstance(plan, str):
        return
    np.testing.assert_allclose(VL._floor_sums(plan), VL._floor_sums_numpy(plan), rtol=1e-12)


@settings(max_examples=150, deadline=None)
@given(st.one_of(varlen_calls(), cache_calls()), st.booleans(), st.sampled_from([None, 1, 5, 300]))
def test_most_keys_seen_in_c_as_numpy_does(call, causal, window):
    """``most_keys_seen`` (banded's floor widens its band to it) runs in C where the kernel is built
    (``attnmask_most_keys_seen``): the numpy form's count, with and without a causal rule and a window, on document
    rows, padding and queries against a longer cache (offsets that put a segment's last query before its keys: 0)."""
    if isinstance(_clib.library(), str):
        pytest.skip(_clib.library())
    plan = _common.varlen_plan(call)
    if isinstance(plan, str):
        return
    for rule in (plan, _common.VarlenPlan(plan.segments, causal, window)):
        assert _common.most_keys_seen(rule) == _common._most_keys_seen_numpy(rule)
    negative = _common.VarlenPlan(torch.tensor([[0, 0, 3, 10, 20, -8], [0, 3, 2, 0, 4, 9]]), True, None)
    assert _common.most_keys_seen(negative) == _common._most_keys_seen_numpy(negative) == 4
    empty = _common.VarlenPlan(torch.zeros(0, 6, dtype=torch.long), True, 3)
    assert _common.most_keys_seen(empty) == _common._most_keys_seen_numpy(empty) == 0


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 7, 300])
def test_varlen_floor_sums_at_the_class_edges_in_c_as_numpy_does(causal, window):
    """Documents of 32 and 33 keys (the tiny class's edge) and of 512 and 513 (SDPA's key block), one query and a
    full row each: the C sums are the numpy form's, and the tiny class holds exactly the documents of <= 32 keys."""
    if isinstance(_clib.library(), str):
        pytest.skip(_clib.library())
    lengths = [32, 33, 512, 513]
    rows = [[0, 0, n, 0, n, 0] for n in lengths] + [[0, 0, 1, 0, n, n - 1] for n in lengths]
    plan = _common.VarlenPlan(torch.tensor(rows, dtype=torch.long), causal, window)
    sums = VL._floor_sums(plan)
    np.testing.assert_allclose(sums, VL._floor_sums_numpy(plan), rtol=1e-12)
    assert sums[2] == 32 + 1 and sums[4] == 2


def test_the_c_sums_read_strided_or_int32_segments_through_a_copy():
    """``segments_address`` hands C the plan's own memory when it is contiguous int64 and a contiguous int64 copy
    otherwise: column-major and int32 segments give the same sums as the plan's."""
    if isinstance(_clib.library(), str):
        pytest.skip(_clib.library())
    q = torch.randn(2, 2, 300, 8)
    ids = torch.arange(300).div(37, rounding_mode="floor").expand(2, 300).contiguous()
    plan = _common.varlen_plan(_prepare_call(q, q, q, am.causal() & am.document(doc_ids=ids), None, None, None))
    segs = plan.segments
    assert segs.is_contiguous() and _common.segments_address(segs)[1] is segs
    for other in (segs.t().contiguous().t(), segs.to(torch.int32)):
        assert _common.segments_address(other)[1] is not other
        twin = _common.VarlenPlan(other, plan.causal, plan.window)
        assert VL._floor_sums(twin) == VL._floor_sums(plan)
        assert BS._segment_pairs(twin, 64, 2, 300, 300) == BS._segment_pairs(plan, 64, 2, 300, 300)
        work, total, rows = NV._item_work_sums(other, True, None, 16)
        np.testing.assert_array_equal(work, NV._item_work(segs, True, None, 16))
        assert (total, rows) == NV._item_work_sums(segs, True, None, 16)[1:]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0, 1e9, allow_subnormal=False), min_size=0, max_size=300),
    st.integers(1, 8),
    st.integers(2, 9),
    st.sampled_from([0.5, 0.85, 1.0]),
)
def test_native_threads_gain_in_c_as_numpy_does(work, repeat, threads, share):
    """native's threads' gain deals its pulls in C where the kernel is built (``attnmask_pull_makespan``): the gain
    ``_workers.expected_speedup`` gives the same pulls (repeated per head, summed in runs of ``_chunk``), for any
    item weights (zeros, ties, fewer pulls than threads) and thread counts."""
    if isinstance(_clib.library(), str):
        pytest.skip(_clib.library())
    work = np.asarray(work, dtype=np.float64)
    chunk = NV._chunk(len(work) * repeat, threads)
    python_form = NV._pulls_gain_python(np.tile(work, repeat), chunk, threads, share)
    assert NV._pulls_gain(work, repeat, threads, share) == pytest.approx(python_form, rel=1e-12)


@settings(max_examples=150, deadline=None)
@given(st.one_of(varlen_calls(), cache_calls()))
def test_blocksparse_counts_each_tile_with_its_own_rows_and_keys(call):
    """The pairs of the computed tiles (FULL and PARTIAL) and of the PARTIAL ones, tile by tile from the layout's
    own query and key ranges: the last query tile and the last key tile of a length that is not a multiple of the
    tile size hold fewer rows and keys."""
    layout = BS._layout(call)
    classes = layout.classes.tolist()
    computed = partial = 0
    for row in classes:
        for i, tiles in enumerate(row):
            q0, q1 = layout.q_range(i)
            for j, kind in enumerate(tiles):
                k0, k1 = layout.kv_range(j)
                computed += (q1 - q0) * (k1 - k0) if kind != NONE else 0
                partial += (q1 - q0) * (k1 - k0) if kind == PARTIAL else 0
    assert BS._tile_pairs(layout) == (computed, partial)


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 70), st.integers(1, 3), st.sampled_from([8, 16, 64]), st.booleans())
def test_padded_rows_tile_pairs_are_the_tiles_holding_an_allowed_pair(data, length, batch, block, causal):
    """``padded_tile_pairs`` (blocksparse's floor on padded rows) counts exactly the pairs of the tiles, each with
    its own rows and keys, that hold a pair the naive mask allows (padding queries see the real keys), and nothing
    for a spec it does not read (a window, documents)."""
    rows = data.draw(st.sampled_from([1, batch]))
    real = torch.tensor(
        data.draw(st.lists(st.lists(st.booleans(), min_size=length, max_size=length), min_size=rows, max_size=rows))
    )
    if data.draw(st.booleans()):  # each row's real tokens one run (left, right or both sides padded): native plans it
        for r in range(rows):
            a = data.draw(st.integers(0, length))
            real[r] = (torch.arange(length) >= a) & (torch.arange(length) < data.draw(st.integers(a, length)))
    spec = (am.causal() if causal else am.full()) & am.key_padding(real)
    q = torch.randn(batch, 2, length, 8)
    call = _prepare_call(q, q, q, spec, None, None, None)
    allowed = naive_dense(spec, length, length, rows)
    expected = 0
    for r in range(rows):
        for q0 in range(0, length, block):
            for k0 in range(0, length, block):
                tile = allowed[r, q0 : q0 + block, k0 : k0 + block]
                expected += tile.numel() if bool(tile.any()) else 0
    expected *= batch if rows == 1 else 1
    assert _common.padded_tile_pairs(call, block) == expected
    plan = _common.native_plan(call)  # what blocksparse's floor reads once native has planned (real keys in one run)
    if not isinstance(plan, str):
        assert BS._segment_pairs(_common.built_exact_plan(call), block, batch, length, length) == expected
    for other in (spec & am.sliding_window(length + 1), spec & am.document(seq_lens=[length])):
        assert _common.padded_tile_pairs(_prepare_call(q, q, q, other, None, None, None), block) == 0


def test_a_decoding_step_is_estimated_by_its_own_rows_not_a_whole_tile():
    """8 queries against 4,096 keys are one tile row of 8 rows (tiles of 128): its pairs cost 8/128 of 128 queries'
    (counted as a whole tile they had cost 16x their pairs, and a decoding step with a gradient went to SDPA while
    blocksparse ran 1.15-1.18x faster: RESULTS.md, issue 15, "Decoding steps in blocksparse's estimate")."""
    k = torch.randn(1, 4, 4096, 64)
    calls = [_prepare_call(torch.randn(1, 4, n, 64), k, k, am.causal(), None, None, None) for n in (8, 128)]
    with conditions(1, False):
        costs = [BS.cost(call) for call in calls]
    pairs = [c - BS._GROUP_COST - BS._CALL_COST for c in costs]  # one query group each, one call
    assert pairs[0] * 16 == pytest.approx(pairs[1], rel=1e-9)


def test_a_query_group_with_a_gradient_is_charged_at_least_the_backward_s_rows():
    """With a gradient the last query tile counts at least ``_BACKWARD_ROWS`` rows (the keys' gradients cost what
    they cost whatever the queries): 2, 8 and that many queries against one cache (the last key tile PARTIAL for
    each) cost the same, more cost more; without a gradient each counts its own rows."""
    least = BS._BACKWARD_ROWS
    assert 16 < least < 128

    def cost(n, grad):
        q = torch.randn(1, 4, n, 64, requires_grad=grad)
        k = torch.randn(1, 4, 4096, 64, requires_grad=grad)
        with conditions(1, False):
            return BS.cost(_prepare_call(q, k, k, am.causal(), None, None, None))

    assert cost(2, True) == cost(8, True) == cost(least, True) < cost(least + 1, True) < cost(128, True)
    assert cost(2, False) < cost(8, False) < cost(least, False)


@settings(max_examples=100, deadline=None)
@given(varlen_calls(), st.sampled_from([1, 2]), st.sampled_from([1.0, 3.0]))
def test_skipping_by_floors_keeps_the_pick_and_every_candidate_within_the_margin(call, threads, margin):
    registry = tuple(A._BACKENDS.values())
    with conditions(threads, False):
        full, _ = A._ranked(call, registry)
        fast, _ = A._ranked(call, registry, margin)
    assert fast[0][0] is full[0][0]
    best = full[0][1]
    assert [b.name for b, c in fast if c <= margin * best] == [b.name for b, c in full if c <= margin * best]
    assert set(fast) <= set(full)


@settings(max_examples=120, deadline=None)
@given(st.data(), st.integers(1, 20), st.integers(1, 3), st.booleans(), st.booleans())
def test_the_most_keys_a_query_sees_is_read_exactly_from_a_plan_or_padded_rows(data, length, batch, docs, causal):
    """``most_keys_floor`` (what banded's floor widens its band to): from a built varlen plan, or on padded rows
    without one, the naive dense mask's most keys of one query; 0 for anything else."""
    base = am.causal() if causal else am.full()
    if docs:
        spec = base & am.document(doc_ids=_doc_ids(data.draw, batch, length))
        if data.draw(st.booleans()):
            spec = spec & am.sliding_window(data.draw(st.integers(1, length)))
    else:
        real = torch.tensor(data.draw(st.lists(st.booleans(), min_size=batch * length, max_size=batch * length)))
        spec = base & am.key_padding(real.view(batch, length))
    q = torch.randn(batch, 2, length, 8)
    call = _prepare_call(q, q, q, spec, None, None, None)
    most = int(naive_dense(spec, length, length, batch).sum(-1).max())
    if docs:
        assert _common.most_keys_floor(call) == 0  # no plan built yet, and not padded rows
        if isinstance(_common.varlen_plan(call), str):
            return  # an id in two runs: no plan
    assert _common.most_keys_floor(call) == most
    if not docs and not isinstance(_common.native_plan(call), str):  # native's plan read instead of the padding
        assert _common.built_exact_plan(call) is not None and _common.most_keys_floor(call) == most


def many_documents(batch=8, length=256, seed=0):
    """8-16 documents a row (bench_small_rows' costs batch): the other backends cost several times native."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), -1, dtype=torch.long)
    for r in range(batch):
        cuts = torch.randperm(length - 1, generator=gen)[:11].add(1).sort().values.tolist()
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, length - 20], strict=False)):
            ids[r, a:b] = i
    return am.causal() & am.document(doc_ids=ids)


def test_auto_builds_no_layout_or_band_for_a_backend_its_floor_rules_out():
    if isinstance(_clib.library(), str):
        pytest.skip(_clib.library())
    q = torch.randn(8, 4, 256, 64)
    call = _prepare_call(q, q, q, many_documents(), None, None, None)
    with conditions(2, False):
        picked = A.choose_backend(call)
    plans = A.call_plans(call)
    assert picked.name == "native"
    assert {"layout", "blocksparse_plan", "banded"}.isdisjoint(plans)
    ranked = [b.name for b, _ in plans["auto"][4]]
    assert ranked[0] == "native" and {"varlen", "blocksparse", "banded"}.isdisjoint(ranked)  # ruled out unplanned
    assert am.explain(q, q, q, many_documents()).picked == "native"  # explain still costs every backend


def test_a_choice_reads_the_load_once_and_every_estimate_sees_that_reading(monkeypatch):
    """``load_as_read``: the estimates and floors of one choice all see the load ``"auto"`` read (here: one core
    taken), and the load is not asked again for each of them."""
    asked = []
    monkeypatch.setattr(_workers, "threads_available", lambda: 2)
    monkeypatch.setattr(_workers, "region_threads", lambda work=None, share_work=None: asked.append(work) or 1)
    q = torch.randn(8, 4, 256, 64)
    call = _prepare_call(q, q, q, many_documents(), None, None, None)
    A.choose_backend(call)
    assert len(asked) == 1 and A.call_plans(call)["auto"][2] is True
    native = A._BACKENDS["native"]
    with _workers.load_as_read(True):
        busy = native.cost(call)
    with _workers.load_as_read(False):
        idle = native.cost(call)
    assert busy > idle and _workers.contended() is True  # outside the blocks: asked again (one core taken)


def test_turning_tuning_on_re_ranks_a_choice_made_with_the_narrow_margin():
    q = torch.randn(8, 4, 256, 64)
    call = _prepare_call(q, q, q, many_documents(), None, None, None)
    with conditions(2, False):
        A.choose_backend(call)
        narrow = A.call_plans(call)["auto"]
        with am.autotune(spread=3.0):
            A.choose_backend(call)
            wide = A.call_plans(call)["auto"]
    assert narrow[5] == 1.0 and wide[5] == 3.0
    assert len(wide[4]) >= len(narrow[4])


# ---------------------------------------------------------------------------------------------------------------------
# Packed rows' segments in C


@settings(max_examples=150, deadline=None)
@given(
    st.data(),
    st.integers(1, 300),
    st.integers(1, 3),
    st.booleans(),
    st.sampled_from(["plain", "every other", "t"]),
    st.sampled_from([None, "outside", "anywhere"]),
)
def test_packed_rows_are_cut_in_c_exactly_as_the_general_lowering_cuts_them(
    data, length, batch, one_row, layout, padding
):
    """Random runs with gaps, an id sometimes repeated apart (both refuse it), one spec row for the batch or one per
    row, ids read through strides (every other column of a wider tensor, a transposed one); with a padding mask
    outside the documents (as ``pack`` builds) or anywhere (padding inside a document: both refuse it)."""
    if isinstance(_clib.library(), str):
        pytest.skip(_clib.library())
    rows = 1 if one_row else batch
    ids = _doc_ids(data.draw, rows, length)
    if layout == "every other":
        wide = torch.full((rows, 2 * length), 7, dtype=torch.long)
        wide[:, ::2] = ids
        ids = wide[:, ::2]
    elif layout == "t":
        ids = ids.t().contiguous().t()
    base = data.draw(st.sampled_from([am.causal(), am.full(), am.sliding_window(3)]))
    spec = base & am.document(doc_ids=ids)
    if padding is not None:
        real = (ids >= 0).expand(batch, -1).clone()
        if padding == "anywhere":
            real &= torch.rand(batch, length, generator=torch.Generator().manual_seed(length)) < 0.9
        spec = spec & am.key_padding(real)
    q = torch.randn(batch, 2, length, 8)
    call = _prepare_call(q, q, q, spec, None, None, None)
    fast, general = _common._document_plan(call), general_plan(call)
    if isinstance(general, str):
        assert fast is None
        assert _common.varlen_plan(call) == general  # the general path names the fault
    else:
        assert fast is not None and (fast.segments.tolist(), fast.causal, fast.window) == general


@pytest.mark.parametrize("docs", [1, 15, 16, 17, 40])
@pytest.mark.parametrize("base", [am.causal(), am.full(), am.sliding_window(3)])
def test_packed_rows_are_cut_in_one_c_call_or_two_past_its_guess(docs, base):
    """Packed rows are cut in one C call writing up to ``_SEGMENTS_GUESS`` documents a row, and once more, in full,
    where a row holds more: below, at and past that size (one spec row for the batch, or one per row), the segments
    are the general lowering's, contiguous, and what ``varlen_plan`` keeps."""
    if isinstance(_clib.library(), str):
        pytest.skip(_clib.library())
    assert _common._SEGMENTS_GUESS == 16
    length = 2 * docs + 3
    for rows in ([[2] * docs], [[2] * docs, [1, 2] * (docs // 2) + [3], [length]]):
        ids = torch.full((len(rows), length), -1, dtype=torch.long)
        for r, lens in enumerate(rows):
            starts = [sum(lens[:i]) for i in range(len(lens))]
            for i, (a, n) in enumerate(zip(starts, lens, strict=True)):
                ids[r, a : a + n] = i
        q = torch.randn(3, 2, length, 8)
        call = _prepare_call(q, q, q, base & am.document(doc_ids=ids), None, None, None)
        plan = _common._document_plan(call)
        assert (plan.segments.tolist(), plan.causal, plan.window) == general_plan(call)
        want = 3 * len(rows[0]) if len(rows) == 1 else sum(map(len, rows))
        assert plan.segments.is_contiguous() and len(plan.segments) == want
        assert torch.equal(_common.varlen_plan(call).segments, plan.segments)


def _padding_rows(data, rows: int, length: int, long: bool = False) -> torch.Tensor:
    """``(rows, length)`` padding: each row's real tokens one run at the left, the right, the middle or nowhere,
    sometimes with a hole (or one more token); as int64 with ``long`` (``key_padding`` holds either as bool); sometimes
    a strided view (every other column of a wider tensor), read through its strides."""
    real = torch.zeros(rows, length, dtype=torch.bool)
    for r in range(rows):
        a = data.draw(st.integers(0, length))
        b = data.draw(st.integers(a, length))
        real[r, a:b] = True
        if data.draw(st.integers(0, 5)) == 0:
            real[r, data.draw(st.integers(0, length - 1))] ^= True
    mask = real.long() if long else real
    if data.draw(st.booleans()):
        wide = torch.zeros(rows, 2 * length, dtype=mask.dtype)
        wide[:, ::2] = mask
        mask = wide[:, ::2]
    return mask


@settings(max_examples=200, deadline=None)
@given(
    st.data(),
    st.integers(1, 40),
    st.integers(1, 3),
    st.booleans(),
    st.sampled_from([am.causal(), am.full(), am.sliding_window(1), am.sliding_window(4)]),
)
def test_padded_rows_are_planned_on_the_host_exactly_as_the_general_lowering_plans_them(
    data, length, batch, one_row, base
):
    """Real tokens as one run at the left, the right, the middle or nowhere, or with holes (the general path refuses
    them), one spec row or one per batch row, sometimes two padding masks; the plan, or the refusal where padding
    queries see real keys, is the general path's, cut in C (``attnmask_padded_segments``) or in numpy; with the
    padding queries taken in (``native``'s plan) the two cuts agree segment for segment."""
    mask = _padding_rows(data, 1 if one_row else batch, length, long=data.draw(st.booleans()))
    second = data.draw(st.integers(0, 3)) == 0

    def make_spec():  # a new spec object each time: plans of its own (call_plans shares them per spec object)
        spec = base & am.key_padding(mask)
        return spec & am.key_padding(torch.ones(batch, length, dtype=torch.bool)) if second else spec

    q = torch.randn(batch, 2, length, 8)
    general = general_plan(_prepare_call(q, q, q, make_spec(), None, None, None))
    cuts = {}
    for where in ("numpy", "c"):
        with counted_in(where):
            call = _prepare_call(q, q, q, make_spec(), None, None, None)
            fast, wide = _common._padded_plan(call), _common._padded_plan(call, padding_queries=True)
        if fast is None:  # holes: the general path says why
            assert isinstance(general, str) and "contiguous" in general
            assert wide is None
        elif isinstance(fast, str):
            assert fast == general
        else:
            assert (fast.segments.tolist(), fast.causal, fast.window) == general
        cuts[where] = None if wide is None else (wide.segments.tolist(), wide.causal, wide.window)
    assert cuts["c"] == cuts["numpy"]


@settings(max_examples=200, deadline=None)
@given(
    st.data(),
    st.integers(2, 40),
    st.integers(1, 3),
    st.booleans(),
    st.sampled_from([am.causal(), am.full(), am.sliding_window(1), am.sliding_window(4)]),
    st.sampled_from(["none", "one", "two"]),
)
def test_decoding_steps_are_planned_on_the_host_exactly_as_the_general_lowering_plans_them(
    data, length, batch, one_row, base, padding
):
    """Fewer queries than keys (the last ``Q`` positions): real keys as one run anywhere, or with holes (the general
    path refuses them), one spec row or one per batch row, a strided mask, no padding at all or two masks; the plan,
    or the refusal where padding queries see real keys, is the general path's, cut in C or in numpy."""
    q_len = data.draw(st.integers(1, length - 1))
    real = _padding_rows(data, 1 if one_row else batch, length)

    def make_spec():
        if padding == "none":
            return base & am.full() if data.draw(st.booleans()) else base
        spec = base & am.key_padding(real)
        return spec & am.key_padding(torch.ones(batch, length, dtype=torch.bool)) if padding == "two" else spec

    q, k = torch.randn(batch, 2, q_len, 8), torch.randn(batch, 2, length, 8)
    general = general_plan(_prepare_call(q, k, k, make_spec(), None, None, None))
    for where in ("numpy", "c"):
        with counted_in(where):
            call = _prepare_call(q, k, k, make_spec(), None, None, None)
            fast = _common._decode_plan(call)
        if fast is None:  # holes: the general path says why
            assert isinstance(general, str) and "contiguous" in general
        elif isinstance(fast, str):
            assert fast == general
        else:
            assert (fast.segments.tolist(), fast.causal, fast.window) == general
            assert fast.segments.dtype == torch.int64 and fast.segments.is_contiguous()


def test_decoding_steps_plan_without_the_general_lowering():
    """A left-padded decoding step and a plain causal one never reach ``lowering.varlen_args`` (the fast plan is the
    one ``varlen_plan`` keeps), and an example's segments by hand."""
    q, k = torch.randn(2, 2, 2, 8), torch.randn(2, 2, 5, 8)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_common, "varlen_args", None)  # the general path would call it
        for spec, want in (
            (am.causal() & am.key_padding(mask), [[0, 0, 2, 2, 3, 1], [1, 0, 2, 0, 5, 3]]),
            (am.causal(), [[0, 0, 2, 0, 5, 3], [1, 0, 2, 0, 5, 3]]),
            (am.sliding_window(2) & am.key_padding(mask[:1]), [[0, 0, 2, 2, 3, 1], [1, 0, 2, 2, 3, 1]]),
        ):
            call = _prepare_call(q, k, k, spec, None, None, None)
            assert _common.varlen_plan(call).segments.tolist() == want


def test_without_the_library_packed_rows_take_the_general_path():
    with counted_in("numpy"):
        q = torch.randn(2, 2, 16, 8)
        call = _prepare_call(q, q, q, am.causal() & am.document(seq_lens=[5, 11]), None, None, None)
        assert _common._document_plan(call) is None
        want = [[0, 0, 5, 0, 5, 0], [0, 5, 11, 5, 11, 0], [1, 0, 5, 0, 5, 0], [1, 5, 11, 5, 11, 0]]
        assert _common.varlen_plan(call).segments.tolist() == want


# ---------------------------------------------------------------------------------------------------------------------
# blocksparse's plan: vectorised merging against the group-by-group form it replaced


def plan_group_by_group(tile_class, block_q, block_k, Q, K, max_keys, max_rows):
    """The plan as first written: query tiles with identical classes grouped one by one, then, from each group,
    consecutive groups added while their rows fit and merged where the union of their key tiles computes at most
    ``_MERGE_GAIN`` times their own pairs."""
    tc = tile_class.numpy()
    widths = np.array([min(block_k, K - j * block_k) for j in range(tc.shape[2])], dtype=np.int64)  # the last short
    groups = []
    for b in range(tc.shape[0]):
        same = []
        for i in range(tc.shape[1]):
            q0, q1 = i * block_q, min((i + 1) * block_q, Q)
            if same and (same[-1][2] == tc[b, i]).all() and q1 - same[-1][0] <= max_rows:
                same[-1] = (same[-1][0], q1, same[-1][2])
            else:
                same.append((q0, q1, tc[b, i]))
        i = 0
        while i < len(same):
            j, rows, own, union = i, 0, 0, same[i][2]
            while j < len(same) and rows + same[j][1] - same[j][0] <= max_rows:
                q0, q1, classes = same[j]
                rows, own = rows + q1 - q0, own + (q1 - q0) * int(widths[classes != NONE].sum())
                union = union.copy()
                union[union != classes] = PARTIAL
                j += 1
            if j - i > 1 and rows == max_rows and rows * int(widths[union != NONE].sum()) <= BS._MERGE_GAIN * own:
                merged = [(same[i][0], same[j - 1][1], union)]
            else:
                merged, j = [same[i]], i + 1
            groups += [
                BS._Group(b, q0, q1, runs_tile_by_tile(c, block_k, K, max_keys)) for q0, q1, c in merged if c.any()
            ]
            i = j
    return groups


def runs_tile_by_tile(row, block_k, K, max_keys):
    """A group's key runs as first written: the non-NONE tiles cut into runs, then each run's PARTIAL spans."""
    runs, cur = [], []
    for j in row.nonzero()[0].tolist():
        if cur and (j != cur[-1] + 1 or len(cur) >= max(1, max_keys // block_k)):
            runs.append(cur)
            cur = []
        cur.append(j)
    if cur:
        runs.append(cur)
    out = []
    for tiles in runs:
        partial = []
        for j in tiles:
            if row[j] == PARTIAL:
                if partial and partial[-1][1] == j:
                    partial[-1][1] = j + 1
                else:
                    partial.append([j, j + 1])
        spans = tuple((a * block_k, min(e * block_k, K)) for a, e in partial)
        out.append(BS._Run(tiles[0] * block_k, min((tiles[-1] + 1) * block_k, K), spans))
    return tuple(out)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 2),
    st.integers(1, 40),
    st.integers(1, 40),
    st.sampled_from([(16, 16), (64, 64), (32, 64)]),
    st.sampled_from([64, 128, 512]),
    st.sampled_from([64, 256, 4096]),
    st.integers(0, 2**31 - 1),
)
def test_blocksparse_plans_groups_as_the_group_by_group_form_did(batch, n_q, n_k, block, max_rows, max_keys, seed):
    """Random classes, mostly repeating along the diagonal (runs of identical query tiles to merge), some rows of
    NONE; lengths not multiples of the tiles."""
    bq, bk = block
    gen = np.random.default_rng(seed)
    base = gen.integers(0, 3, size=(batch, 1, n_k))
    classes = np.where(gen.random((batch, n_q, 1)) < 0.6, base, gen.integers(0, 3, size=(batch, n_q, n_k)))
    classes[:, gen.random(n_q) < 0.1] = NONE
    Q, K = n_q * bq - int(gen.integers(0, bq)), n_k * bk - int(gen.integers(0, bk))
    tile_class = torch.from_numpy(classes.astype(np.int8))
    max_rows, max_keys = max(max_rows, bq), max(max_keys, bk)
    got = BS._plan(tile_class, bq, bk, Q, K, max_keys, max_rows)
    assert got == plan_group_by_group(tile_class, bq, bk, Q, K, max_keys, max_rows)


def test_blocksparse_keeps_a_rows_groups_per_classes_and_sizes_only():
    """The groups of a batch row are kept per (classes, sizes): the same classes under another key length or block
    size plan as the group-by-group form says for those sizes, and a row of more than ``_KEPT_ROW_BYTES`` classes is
    planned without being kept."""
    classes = torch.tensor([[[1, 0, 2], [1, 1, 2], [2, 1, 1]]] * 2, dtype=torch.int8)
    for bq, bk, Q, K in [(16, 16, 48, 48), (16, 16, 48, 40), (16, 32, 40, 80), (16, 16, 48, 48)]:
        got = BS._plan(classes, bq, bk, Q, K, 4096, 512)
        assert got == plan_group_by_group(classes, bq, bk, Q, K, 4096, 512)
    n = int(np.sqrt(BS._KEPT_ROW_BYTES)) + 1
    wide = torch.ones(1, n, n, dtype=torch.int8)
    before = BS._kept_row_groups.cache_info().currsize
    got = BS._plan(wide, 16, 16, 16 * n, 16 * n, 4096, 512)
    assert got == plan_group_by_group(wide, 16, 16, 16 * n, 16 * n, 4096, 512)
    assert BS._kept_row_groups.cache_info().currsize == before


@settings(max_examples=300, deadline=None)
@given(call=varlen_calls(), bs=st.sampled_from([1, 3, 16, 64, 128]), queries=st.integers(0, 3), planned=st.booleans())
def test_tile_classes_cut_from_the_segments_are_the_layouts(call, bs, queries, planned):
    """Where the varlen plan is cheap (packed documents, padded rows) or already built, ``blocksparse`` cuts its
    layout's classes from the plan's segments in C: exact on the dense mask (FULL where a tile allows every pair, NONE
    where it allows none, short last tiles included), and never coarser than ``lowering.block_layout``'s (one spec
    row broadcast to the batch), whose interval arithmetic may leave PARTIAL a tile that two parts empty together
    (chunks with documents, a decoding row past its document). ``queries`` > 0: the last ``queries`` rows only
    (decoding steps, ``Q < K``); ``planned``: the varlen plan built first, whatever its cost, as ``"native"`` does in
    ``auto`` (chunks, windows alone)."""
    if isinstance(_clib.library(), str):
        pytest.skip(_clib.library())
    if queries and queries < call.q_len:
        call = _prepare_call(call.q[:, :, -queries:], call.k, call.v, call.mask, None, None, None)
    if planned:
        _common.varlen_plan(call)
    segmented = BS._segment_layout(call, bs)
    assume(segmented is not None)
    dense = call.mask.to_dense(call.q_len, call.kv_len).expand(call.batch, -1, -1)
    n_q, n_k = segmented.classes.shape[1:]
    pad = (0, n_k * bs - call.kv_len, 0, n_q * bs - call.q_len)
    for fill, reduce, cls in ((True, torch.all, FULL), (False, torch.any, NONE)):
        tiles = torch.nn.functional.pad(dense, pad, value=fill).reshape(call.batch, n_q, bs, n_k, bs)
        held = reduce(reduce(tiles, dim=4), dim=2)  # (B, nQ, nK): every / some pair of the tile allowed
        assert torch.equal(segmented.classes == cls, held if cls == FULL else ~held)
    generic = block_layout(call.mask, call.q_len, call.kv_len, bs).classes.expand(call.batch, -1, -1)
    assert bool(((generic == segmented.classes) | (generic == PARTIAL)).all())  # never coarser


def test_tile_classes_are_cut_from_segments_only_where_the_plan_is_cheap():
    """Packed documents and padded rows (the plans of one C call or a few numpy ones) take the C cut; explicit
    positions, chunks and a window alone (whose plan would take the general lowering) keep ``block_layout``."""
    if isinstance(_clib.library(), str):
        pytest.skip(_clib.library())
    q = torch.randn(2, 2, 64, 8)
    packed = am.causal() & am.document(seq_lens=[[20, 44], [64]])
    padded = am.causal() & am.key_padding(torch.arange(64)[None] >= torch.tensor([[0], [9]]))  # left padding
    for spec in (packed, padded):
        segmented = BS._segment_layout(_prepare_call(q, q, q, spec, None, None, None), 16)
        assert torch.equal(segmented.classes, block_layout(spec, 64, 64, 16).classes)
    positions = torch.arange(64)
    for call in (
        _prepare_call(q, q, q, packed, None, positions, positions),
        _prepare_call(q, q, q, packed & am.chunked(16), None, None, None),
        _prepare_call(q, q, q, am.causal() & am.sliding_window(8), None, None, None),
    ):
        assert BS._segment_layout(call, 16) is None
