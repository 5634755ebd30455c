"""Sparse backends ("varlen", "blocksparse", "flex") and "auto" equal the naive reference in outputs and gradients."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnmask as am
from attnmask import lowering as L
from attnmask import masks as M
from attnmask.attention import AttentionCall, _prepare_call, choose_backend
from attnmask.backends import _workers as W
from attnmask.backends import blocksparse as BS
from attnmask.backends import varlen as VL
from tests.helpers import DTYPES, assert_matches_reference, check_against_naive, row_cuts, spec_doc_ids
from tests.naive import naive_attention
from tests.strategies import heads_and_dims, spec_tree

# The kernel_path fixture only sets a module flag, which holds for every generated example.
FIXTURE_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


# ---------------------------------------------------------------------------------------------------------------------
# Strategies


@st.composite
def tiled_case(draw):
    """Any spec tree (documents, windows, chunks, prefix, key padding, custom, |, ~), lengths not multiples of the
    block size, Q <= K, and a small block size so that the layout has FULL, PARTIAL and NONE tiles."""
    batch = draw(st.integers(1, 2))
    kv_len = draw(st.integers(1, 40))
    q_len = draw(st.one_of(st.just(kv_len), st.integers(1, kv_len)))
    spec = draw(spec_tree(batch, kv_len))
    return spec, draw(heads_and_dims(batch, q_len, kv_len)), draw(st.integers(2, 16))


# ---------------------------------------------------------------------------------------------------------------------
# varlen


def test_equal_length_documents_share_one_sdpa_call(monkeypatch):
    calls, original = [], VL.F.scaled_dot_product_attention
    monkeypatch.setattr(
        VL.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(a[0].shape) or original(*a, **kw)
    )
    q, k, v = (torch.randn(1, 2, 6 * 40 + 3 * 100, 8) for _ in range(3))
    spec = am.causal() & am.document(seq_lens=[40, 100] * 3 + [40] * 3)
    out = am.attention(q, k, v, spec, backend="varlen")
    assert sorted(s[0] for s in calls) == [3, 6]  # one call per length, documents stacked as a batch
    assert_matches_reference(out, naive_attention(q, k, v, spec.to_dense(q.shape[2]).unsqueeze(1)))


def test_many_tiny_documents_run_in_one_call_per_length(monkeypatch):
    calls, original = [], VL._tiny_attention
    monkeypatch.setattr(VL, "_tiny_attention", lambda q, *a: calls.append(q.shape[1]) or original(q, *a))
    lens = [1 + i % 9 for i in range(300)]
    q, k, v = (torch.randn(1, 2, sum(lens), 8) for _ in range(3))
    spec = am.causal() & am.document(seq_lens=lens)
    out = am.attention(q, k, v, spec, backend="varlen")
    assert sorted(calls) == [33] * 6 + [34] * 3  # lengths 1-9: one batched call per length
    assert_matches_reference(out, naive_attention(q, k, v, spec.to_dense(q.shape[2]).unsqueeze(1)))


@pytest.mark.parametrize("broadcast", [True, False], ids=["sum-loss", "dense-gradient"])
def test_varlen_gradients_of_many_documents_match_naive(broadcast):
    """Over 64 documents (the output assembled by row index, ``_ScatterRows``), tiny ones (one gather per tensor for
    every group, split into the groups) and ones SDPA runs, with grouped-query heads: every gradient equals the naive
    reference's, for the broadcast output gradient of ``out.sum()`` (stride 0) and a dense one."""
    gen = torch.Generator().manual_seed(0)
    rows, length, cycle = 6, 256, [5, 40, 12, 3, 33, 8, 21, 17, 6, 15, 2, 4, 9, 64]
    ids = torch.full((rows, length), -1)
    n_docs = 0
    for r in range(rows):
        at, i = 0, r
        while at + cycle[i % len(cycle)] <= length - 8:  # the last 8+ positions of a row: padding, no document
            ids[r, at : at + cycle[i % len(cycle)]] = i
            at, i, n_docs = at + cycle[i % len(cycle)], i + 1, n_docs + 1
    spec = am.causal() & am.document(doc_ids=ids)
    q = torch.randn(rows, 4, length, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(rows, 2, length, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert n_docs > 64
    out = am.attention(q, k, v, spec, backend="varlen")
    want = naive_attention(q, k, v, spec.to_dense(length).unsqueeze(1))
    if broadcast:
        grad = torch.ones((), dtype=out.dtype).expand(out.shape)
    else:
        grad = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    got, expected = (torch.autograd.grad(o, (q, k, v), grad) for o in (out, want))
    torch.testing.assert_close(out, want)
    for g, w in zip(got, expected, strict=True):
        torch.testing.assert_close(g, w)


def test_segments_of_a_packed_row_follow_its_documents():
    args = (am.causal() & am.document(seq_lens=[2, 3], length=6)).varlen(6)
    segs = VL.segments_from_varlen(args, batch=2, q_len=6, kv_len=6)  # a one-row spec applied to two rows
    assert segs.tolist() == [[0, 0, 2, 0, 2, 0], [0, 2, 3, 2, 3, 0], [1, 0, 2, 0, 2, 0], [1, 2, 3, 2, 3, 0]]


def test_segments_of_decoding_queries_are_bottom_right_aligned():
    args = (am.causal() & am.document(seq_lens=[2, 3], length=6)).varlen(2, 6)  # queries at positions 4 and 5
    segs = VL.segments_from_varlen(args, batch=1, q_len=2, kv_len=6)
    assert segs.tolist() == [[0, 0, 1, 2, 3, 2]]  # query 0 (position 4) is the 3rd token of document 1


def test_varlen_segments_may_share_keys():
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    # Queries 0-2 and 3-5 are two segments over the same six keys, causal by absolute position (offsets 0 and 3).
    segs = torch.tensor([[0, 0, 3, 0, 6, 0], [0, 3, 3, 0, 6, 3]])
    out = VL.varlen_attention(q, k, v, segs, causal=True)
    assert_matches_reference(out, naive_attention(q, k, v, torch.ones(6, 6, dtype=torch.bool).tril()))


@pytest.mark.parametrize(
    "spec, q_len, reason",
    [
        (am.causal() & am.key_padding([[1, 1, 1, 0, 0, 0, 0, 0]]), 8, "padding queries attend"),
    ],
)
def test_varlen_refuses_what_it_would_not_compute_exactly(spec, q_len, reason):
    q, k = torch.randn(1, 1, q_len, 4), torch.randn(1, 1, 8, 4)
    with pytest.raises(am.BackendError, match=reason):
        am.attention(q, k, k, spec, backend="varlen")


def test_varlen_rejects_a_document_split_in_two_runs():
    q = k = v = torch.randn(1, 1, 4, 4)
    spec = am.causal() & am.document(doc_ids=[[0, 1, 0, 1]])
    with pytest.raises(am.BackendError, match="contiguous"):
        am.attention(q, k, v, spec, backend="varlen")


@pytest.mark.parametrize(
    "spec",
    [am.prefix_lm(2), am.causal() | am.prefix_lm(2), ~am.causal(), am.chunked(4) & am.key_padding([[1] * 6 + [0] * 2])],
)
def test_varlen_names_the_part_it_cannot_serve(spec):
    q = k = v = torch.randn(1, 1, 8, 4)
    with pytest.raises(am.BackendError, match="varlen"):
        am.attention(q, k, v, spec, backend="varlen")


def test_varlen_rejects_key_padding_inside_a_document():
    q = k = v = torch.randn(1, 1, 4, 4)
    spec = am.document(seq_lens=[4]) & am.key_padding([[1, 0, 1, 1]])
    with pytest.raises(am.BackendError, match="inside documents"):
        am.attention(q, k, v, spec, backend="varlen")


# ---------------------------------------------------------------------------------------------------------------------
# blocksparse


@pytest.fixture(params=[True, False], ids=["cpu-flash-kernel", "portable-tile-loop"])
def kernel_path(request, monkeypatch):
    monkeypatch.setattr(BS, "USE_CPU_FLASH", request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=40, suppress_health_check=FIXTURE_OK)
@given(tiled=tiled_case())
def test_blocksparse_matches_naive_on_random_specs(kernel_path, dtype, tiled):
    spec, case, block = tiled
    layout = spec.block_layout(case["q_len"], case["kv_len"], block)
    check_against_naive(lambda q, k, v: BS.run_layout(q, k, v, layout), case, spec, dtype)


@settings(max_examples=30, suppress_health_check=FIXTURE_OK)
@given(tiled=tiled_case(), max_keys=st.integers(1, 12))
def test_blocksparse_online_softmax_over_many_key_chunks_matches_naive(kernel_path, tiled, max_keys):
    spec, case, block = tiled
    layout = spec.block_layout(case["q_len"], case["kv_len"], block)
    tile_mask = BS.spec_tile_mask(spec, layout.q_positions, layout.kv_positions)

    def run(q, k, v):
        return BS.blocksparse_attention(q, k, v, layout.classes, block, tile_mask, max_keys=max_keys, max_rows=1)

    check_against_naive(run, case, spec, torch.float32)


def test_blocksparse_backend_matches_naive_on_a_long_windowed_row(kernel_path):
    spec = am.sliding_window(100) | am.prefix_lm(30)  # two key runs per query tile: the prefix and the window
    case = dict(batch=1, heads=4, kv_heads=2, q_len=300, kv_len=333, head_dim=8, value_dim=8)
    check_against_naive(lambda q, k, v: am.attention(q, k, v, spec, backend="blocksparse"), case, spec, torch.float32)


def test_blocksparse_skips_none_tiles(monkeypatch):
    seen = []
    original = BS._run_kv
    monkeypatch.setattr(
        BS, "_run_kv", lambda kf, vf, g, r, batched: seen.append((g.q0, r.k0, r.k1)) or original(kf, vf, g, r, batched)
    )
    q = k = v = torch.randn(1, 1, 64, 4)
    layout = (am.causal() & am.document(seq_lens=[32, 32])).block_layout(64, block_size=16)
    BS.run_layout(q, k, v, layout)
    assert all(k1 <= 32 for q0, k0, k1 in seen if q0 < 32) and all(k0 >= 32 for q0, k0, k1 in seen if q0 >= 32)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=40, suppress_health_check=FIXTURE_OK)
@given(tiled=tiled_case(), max_keys=st.integers(1, 12), tiles=st.integers(1, 4), gain=st.sampled_from([1.0, 1.2, 9.0]))
def test_blocksparse_with_merged_groups_and_shared_biases_matches_naive(
    kernel_path, dtype, tiled, max_keys, tiles, gain, monkeypatch
):
    spec, case, block = tiled
    monkeypatch.setattr(BS, "_MERGE_GAIN", gain)  # 9.0: groups of `tiles` tiles over the union of their key tiles
    layout = spec.block_layout(case["q_len"], case["kv_len"], block)
    tile_mask = BS.spec_tile_mask(spec, layout.q_positions, layout.kv_positions)
    plan, masks = BS._tile_groups(
        case["batch"], case["q_len"], case["kv_len"], layout.classes, block, tile_mask, max_keys, tiles * block
    )
    biases = BS._shared_biases(plan, masks, case["heads"] // case["kv_heads"])
    assert biases.keys() == masks.keys()
    empties = BS._empty_rows(plan, masks, case["heads"] // case["kv_heads"])
    one_head = BS._empty_rows(plan, masks, 1)  # kept only where a group or run has a row without any allowed key
    dense = spec.to_dense(case["q_len"], case["kv_len"]).expand(case["batch"], -1, -1)
    for gi, g in enumerate(plan):
        keyless = ~dense[g.b, g.q0 : g.q1].any(-1)  # the group's runs cover every allowed key of its rows
        assert torch.equal(one_head.get((gi, None), torch.zeros_like(keyless)), keyless), gi

    def run(q, k, v):
        return BS._BlockSparse.apply(q, k, v, plan, masks, q.shape[-1] ** -0.5, biases, empties, None)

    check_against_naive(run, case, spec, dtype)


@settings(max_examples=60, suppress_health_check=FIXTURE_OK)
@given(
    tiled=tiled_case(),
    max_keys=st.integers(1, 12),
    tiles=st.integers(1, 4),
    gain=st.sampled_from([1.0, 9.0]),
    shifted=st.booleans(),
    budget=st.sampled_from([1, 37, BS._STACKED_PAIRS]),
)
def test_spec_group_masks_equal_the_tile_by_tile_masks(tiled, max_keys, tiles, gain, shifted, budget, monkeypatch):
    """The backend's masks, evaluated once per tile shape on stacked tiles, are the masks of ``spec_tile_mask`` span by
    span: the same keys, starts and denied pairs, on any spec tree (custom predicates too), merged groups, key runs cut
    at ``max_keys``, short last tiles, stacks cut by the pair budget, and per-row positions (``shifted``: each row's
    rotated)."""
    spec, case, block = tiled
    monkeypatch.setattr(BS, "_MERGE_GAIN", gain)
    monkeypatch.setattr(BS, "_STACKED_PAIRS", budget)  # 1: a tile per evaluation; 37: a few small tiles
    batch, q_len, kv_len = case["batch"], case["q_len"], case["kv_len"]
    positions = {}
    if shifted:  # row r's positions rotated by r (within the row, where per-row data covers them)
        kv_pos = (torch.arange(kv_len) + torch.arange(batch)[:, None]) % kv_len
        positions = dict(q_positions=kv_pos[:, kv_len - q_len :], kv_positions=kv_pos)
    layout = spec.block_layout(q_len, kv_len, block, **positions)
    tile_mask = BS.spec_tile_mask(spec, layout.q_positions, layout.kv_positions)
    plan, masks = BS._tile_groups(batch, q_len, kv_len, layout.classes, block, tile_mask, max_keys, tiles * block)
    stacked = BS._spec_group_masks(plan, spec, layout.q_positions, layout.kv_positions, block)
    assert stacked.keys() == masks.keys()
    for key, spans in masks.items():
        assert [start for start, _ in stacked[key]] == [start for start, _ in spans], key
        for (_, got), (_, want) in zip(stacked[key], spans, strict=True):
            assert got.dtype == torch.bool and torch.equal(got, want), key


def _window_stacks(spec, length: int, heads: int = 2, kv_heads: int = 2, batch: int = 1):
    q = torch.randn(batch, heads, length, 8)
    k, v = (torch.randn(batch, kv_heads, length, 8) for _ in range(2))
    call = _prepare_call(q, k, v, spec, None, None, None)
    return q, k, v, BS.cached(call, "blocksparse", BS._layout_groups)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.lists(st.booleans(), min_size=0, max_size=12), min_size=1, max_size=6).filter(
        lambda rows: len({len(r) for r in rows}) == 1
    )
)
def test_the_estimates_stack_count_finds_every_run_of_each_row(rows):
    """``_true_runs`` (all rows at once) counts what a row-by-row scan counts: a run of r consecutive True in a row
    is a stack of r + 1 tiles; runs never join across rows."""
    same = np.array(rows, dtype=bool).reshape(len(rows), -1)
    stacked = stacks = 0
    for row in same.tolist():
        run = 0
        for flag in [*row, False]:
            if flag:
                run += 1
            elif run:
                stacked, stacks, run = stacked + run + 1, stacks + 1, 0
    assert BS._true_runs(same) == (stacked, stacks)


def test_blocksparse_stacks_the_inner_groups_of_a_window():
    # rows of 4,096 in tiles of 128, window 256: each group from the third on reads the 384 keys from 256 before its
    # first query, with the same diagonal and window-edge tiles
    *_, (plan, _, _, _, stacks) = _window_stacks(am.sliding_window(256), 4096)
    assert [(st.groups, st.q0, st.rows, st.keys, st.shift) for st in stacks] == [
        (tuple(range(2, 32)), 256, 128, 384, -256)
    ]
    assert stacks[0].bias is not None and stacks[0].bias.shape == (128, 384)
    assert all(plan[gi].q0 == 256 + 128 * i for i, gi in enumerate(stacks[0].groups))
    # the estimate counts the same stack from the tile classes alone
    q, k, v, _ = _window_stacks(am.sliding_window(256), 4096)
    call = _prepare_call(q, k, v, am.sliding_window(256), None, None, None)
    assert BS._stacks_apply(call) and BS._stack_count(call) == (30, 1)
    assert BS.stack_saving(call) == pytest.approx(29 * BS._GROUP_COST)  # 30 groups charged as one (float32: factor 1)
    # grouped-query heads: the same stack, its bias (rows of both query heads of a key head) twice as tall
    gqa = _window_stacks(am.sliding_window(256), 4096, heads=4, kv_heads=2)[3][4]
    assert [(st.groups, st.q0) for st in gqa] == [(tuple(range(2, 32)), 256)] and gqa[0].bias.shape == (256, 384)


@pytest.mark.parametrize(
    "spec",
    [
        am.sliding_window(256),
        am.sliding_window(100),
        am.sliding_window(384) & am.key_padding([[1] * 700 + [0] * 324, [1] * 1024]),
        am.causal() & am.chunked(64),
        am.sliding_window(200) & am.document(seq_lens=[300, 724]),
    ],
)
@pytest.mark.parametrize("heads, kv_heads", [(2, 2), (4, 2)])
def test_blocksparse_stacked_groups_equal_group_by_group_bit_for_bit(spec, heads, kv_heads, monkeypatch):
    """The output (and the backward, group by group in both, from it) the same, bit for bit, with and without
    stacking: dk and dv within float rounding, since the backward's groups add into shared key rows in the order its
    threads finish; both equal to the naive reference; at least one stack is taken on each spec."""
    q, k, v, (*_, stacks) = _window_stacks(spec, 1024, heads=heads, kv_heads=kv_heads, batch=2)
    assert stacks, "the case must exercise a stack"
    results = []
    for stack in (True, False):
        monkeypatch.setattr(BS, "STACK_GROUPS", stack)
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        out = am.attention(*qkv, spec, backend="blocksparse")  # the flag is read by each forward
        out.backward(torch.ones_like(out))
        results.append((out, *(t.grad for t in qkv)))
    for name, got, want in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        if name in ("out", "dq"):
            assert torch.equal(got, want), name
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
    check_against_naive(
        lambda q, k, v: am.attention(q, k, v, spec, backend="blocksparse"),
        dict(batch=2, heads=2, kv_heads=2, q_len=1024, kv_len=1024, head_dim=8, value_dim=8),
        spec,
        torch.float32,
    )


def test_plan_merges_query_tiles_only_where_their_key_runs_are_long():
    def group_rows(spec):
        layout = spec.block_layout(512, 512, 16)
        plan = BS._plan(layout.classes, 16, 16, 512, 512, 512, 64)
        return [g.q1 - g.q0 for g in plan]

    # rows past the prefix of 256 read 256+ keys each: four tiles of 16 rows are one group of 64 (waste <= 1.2x)
    assert set(group_rows(am.prefix_lm(256))) == {64}
    # a window of 32 keys: the union of four tiles reads 96 keys for 64 rows, 1.6x their own pairs: tile by tile
    assert set(group_rows(am.sliding_window(32))) == {16}


def test_shared_biases_are_views_of_one_template_per_pattern(monkeypatch):
    rows, block = 8, 8
    layout = am.causal().block_layout(64, 64, block)
    tile_mask = BS.spec_tile_mask(am.causal(), layout.q_positions, layout.kv_positions)
    plan, masks = BS._tile_groups(1, 64, 64, layout.classes, block, tile_mask, 64, rows)
    biases = BS._shared_biases(plan, masks, 2)
    assert len(biases) == 8 and len({b.untyped_storage().data_ptr() for b in biases.values()}) == 1
    for (gi, ri), bias in biases.items():
        r = plan[gi].runs[ri]
        assert torch.equal(bias, BS._run_bias(masks[gi, ri], rows, r.k1 - r.k0, 2, torch.float32, "cpu"))
    monkeypatch.setattr(BS, "_BIAS_BUDGET", 2 * rows * 64 - 1)  # the template (2·8, 64) no longer fits
    assert BS._shared_biases(plan, masks, 2) == {}


# ---------------------------------------------------------------------------------------------------------------------
# Rows with no allowed key, on every sparse backend


def test_varlen_positions_outside_documents_return_exact_zero():
    q, k, v = (torch.randn(1, 2, 10, 4, requires_grad=True) for _ in range(3))
    out = am.attention(q, k, v, am.causal() & am.document(seq_lens=[3, 4], length=10), backend="varlen")
    assert torch.equal(out[:, :, 7:], torch.zeros_like(out[:, :, 7:]))
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert torch.equal(dq[:, :, 7:], torch.zeros_like(dq[:, :, 7:]))


# ---------------------------------------------------------------------------------------------------------------------
# flex (opt-in, forward only on CPU; its forward runs in tests/test_conformance.py)


def test_flex_refuses_to_train_on_cpu():
    q, k, v = (torch.randn(1, 1, 4, 4, requires_grad=True) for _ in range(3))
    with pytest.raises(am.BackendError, match="backward"):
        am.attention(q, k, v, am.causal(), backend="flex")


# ---------------------------------------------------------------------------------------------------------------------
# auto


def call_for(spec, length, heads=8, dim=64):
    q = torch.empty(1, heads, length, dim)
    k = torch.empty(1, heads, length, dim)
    pos = torch.arange(length)
    return AttentionCall(q, k, k, spec, dim**-0.5, pos, pos)


@pytest.fixture
def no_dense_masks(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an O(L^2) mask was built")

    monkeypatch.setattr(M.MaskSpec, "to_dense", refuse)


def test_auto_runs_packed_documents_per_document(no_dense_masks):
    """Each document alone: varlen (SDPA per document) or native (its kernel per document), whichever the CPU's
    estimates put first (on the Xeon with AMX, forward, H = 8: native 42 ms, varlen 47, blocksparse 54 at two
    threads; 75 / 83 / 104 at one; RESULTS.md, issue 15, "native's tiles")."""
    lens = [700, 1300, 20, 2076]
    assert choose_backend(call_for(am.causal() & am.document(seq_lens=lens), sum(lens))).name in ("varlen", "native")


def test_auto_runs_a_sliding_window_with_prefix_block_sparse(no_dense_masks):
    spec = am.sliding_window(512) | am.prefix_lm(64)
    assert choose_backend(call_for(spec, 8192)).name == "blocksparse"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("spec", "length"), [(am.causal(), 8192), (am.full(), 4096), (am.causal() & am.document(seq_lens=[5, 7]), 12)]
)
def test_auto_keeps_sdpa_for_small_or_dense_problems(monkeypatch, spec, length, threads):
    """Plain causal rows of 8,192 (native measured 1.02-1.07x slower than SDPA's own kernel there at two threads; at
    4,096 the two tie, RESULTS.md, issue 15, "native's key copies, tiles and pulls"; since native's sub-tiles they tie
    at 8,192 too, 1.00x at two threads and 1.02x at one, and the stock kernel is kept: "Scores and values a sub-tile at
    a time"), unmasked rows, tiny rows."""
    monkeypatch.setattr(W, "threads_available", lambda: threads)
    monkeypatch.setattr(W, "contended", lambda: False)
    assert choose_backend(call_for(spec, length)).name == "sdpa"


def test_auto_keeps_sdpa_for_custom_predicates_without_laying_them_out(monkeypatch):
    monkeypatch.setattr(L, "block_layout", lambda *a, **kw: pytest.fail("a custom predicate was laid out"))
    spec = am.custom(lambda b, h, q, k: (q - k) % 2 == 0)
    assert choose_backend(call_for(spec, 512)).name == "sdpa"


def test_flex_on_cpu_refuses_a_shape_its_compiled_kernel_computes_wrongly(monkeypatch):
    """The first CPU call of a shape is checked against uncompiled FlexAttention: a compiled kernel that disagrees (here
    one that drops the last key) is refused with a typed error, and from then on by ``explain``; other shapes and a
    kernel that agrees run as before."""
    from torch.nn.attention.flex_attention import flex_attention

    from attnmask.backends import flex as FX

    monkeypatch.setattr(FX, "_CPU_CHECKED", {})

    def broken(q, k, v, **kwargs):
        return flex_attention(q, k[:, :, :-1], v[:, :, :-1], **{**kwargs, "block_mask": None})

    q, k, v = (torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    spec = am.causal()
    monkeypatch.setattr(FX, "_flex", lambda: broken)
    with pytest.raises(am.BackendError, match="computed this shape wrongly"):
        am.attention(q, k, v, spec, backend="flex")
    explained = am.explain(q, k, v, spec)
    reasons = dict(zip(explained.backends, explained.reasons, strict=True))["flex"]
    assert any("computed this shape wrongly" in r for r in reasons)
    monkeypatch.setattr(FX, "_flex", lambda: FX._eager_flex)  # agrees with itself: runs
    q2, k2, v2 = (torch.randn(1, 2, 24, 8, generator=torch.Generator().manual_seed(i)) for i in range(3, 6))
    torch.testing.assert_close(am.attention(q2, k2, v2, spec, backend="flex"), am.attention(q2, k2, v2, spec))
    with pytest.raises(am.BackendError, match="computed this shape wrongly"):  # the refused shape stays refused
        am.attention(q, k, v, spec, backend="flex")
    window = am.sliding_window(4)  # same shapes, another structure (another compiled kernel): checked on its own
    torch.testing.assert_close(am.attention(q, k, v, window, backend="flex"), am.attention(q, k, v, window))
    assert FX._cpu_signature(_prepare_call(q, k, v, window, None, None, None)) in FX._CPU_CHECKED


def test_flex_on_cpu_judges_a_shape_on_finite_inputs_when_its_first_call_holds_a_nan(monkeypatch):
    """A NaN in the first CPU call of a shape: the compiled kernel is judged against uncompiled FlexAttention on the
    inputs with it at 0 (a kernel that puts NaN rows elsewhere than the uncompiled one had the shape refused for good),
    and a kernel that is wrong is still refused."""
    from torch.nn.attention.flex_attention import flex_attention

    from attnmask.backends import flex as FX

    def zero_nan_rows(q, k, v, **kwargs):  # right on finite rows, 0 where a query holds a NaN
        out = flex_attention(q, k, v, **kwargs)
        return out.masked_fill(q.isnan().any(-1, keepdim=True), 0.0)

    def broken(q, k, v, **kwargs):
        return flex_attention(q, k[:, :, :-1], v[:, :, :-1], **{**kwargs, "block_mask": None})

    q, k, v = (torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    q[0, 1, 5, 2] = float("nan")
    for kernel, refused in ((zero_nan_rows, False), (broken, True)):
        monkeypatch.setattr(FX, "_CPU_CHECKED", {})
        monkeypatch.setattr(FX, "_flex", lambda kernel=kernel: kernel)
        if refused:
            with pytest.raises(am.BackendError, match="computed this shape wrongly"):
                am.attention(q, k, v, am.causal(), backend="flex")
        else:
            out = am.attention(q, k, v, am.causal(), backend="flex")
            assert not out[0, 1, 5].any() and FX._CPU_CHECKED and None in FX._CPU_CHECKED.values()


def test_flex_checks_each_predicate_and_closure_on_its_own():
    """Two predicates of the same shapes compile two kernels, and so does one closing over another window: each is
    checked on its own (a kernel found right once is not trusted for another); the same predicate and window again is
    the same kernel, whatever the tensors' values."""
    from attnmask.backends import flex as FX

    def within(w):
        return lambda b, h, q, k: (q - k).abs() < w

    q, k, v = (torch.zeros(1, 2, 16, 8) for _ in range(3))

    def signature(spec):
        return FX._cpu_signature(_prepare_call(q, k, v, spec, None, None, None))

    pad = torch.ones(1, 16, dtype=torch.bool)
    assert signature(am.custom(within(3))) == signature(am.custom(within(3)))
    assert signature(am.custom(within(3))) != signature(am.custom(within(4)))
    assert signature(am.custom(within(3))) != signature(am.custom(lambda b, h, q, k: q >= k))
    assert signature(am.causal() & am.key_padding(pad)) == signature(am.causal() & am.key_padding(~pad))
    assert signature(am.sliding_window(3)) != signature(am.sliding_window(4))


def test_auto_never_picks_flex():
    with torch.no_grad():
        assert choose_backend(call_for(am.causal() & am.document(seq_lens=[4096, 4096]), 8192)).name != "flex"


def test_auto_on_a_long_packed_row_builds_no_dense_mask_and_matches_naive(no_dense_masks):
    lens = [300, 5, 700, 40, 1000]
    spec = am.causal() & am.document(seq_lens=lens)
    q, k, v = (torch.randn(1, 2, sum(lens), 8) for _ in range(3))
    out = am.attention(q, k, v, spec)
    ids = spec_doc_ids(spec)[0]
    pos = torch.arange(sum(lens))
    allowed = (ids[:, None] == ids[None, :]) & (pos[:, None] >= pos[None, :])
    assert_matches_reference(out, naive_attention(q, k, v, allowed))


def test_chunks_run_as_segments_on_varlen_and_native_and_auto_leaves_varlen_to_its_name():
    torch.manual_seed(3)
    spec = am.causal() & am.chunked(48, [5, 17])
    q, k, v = (torch.randn(2, 2, 200, 16, dtype=torch.float64) for _ in range(3))
    want = naive_attention(q, k, v, spec.to_dense(200)[:, None])
    for backend in ("varlen", "native"):
        torch.testing.assert_close(am.attention(q, k, v, spec, backend=backend), want)
    explained = am.explain(q, k, v, spec)
    assert explained.costs[explained.backends.index("varlen")] == float("inf")
    assert explained.costs[explained.backends.index("native")] < float("inf")


def test_blocksparse_cuts_a_stack_into_pieces_the_threads_share(monkeypatch):
    st = BS._Stack(tuple(range(2, 32)), 0, 256, 128, 384, -256, None)
    bounds = BS._piece_bounds(30, 1)
    assert bounds == [(0, 7), (7, 15), (15, 22), (22, 30)]  # 30 groups: 4 pieces, sizes as equal as they can be
    assert BS._piece_bounds(2, 8) == [(0, 1), (1, 2)] and BS._piece_bounds(1, 2) == [(0, 1)]
    plan = [BS._Group(0, 128 * i, 128 * (i + 1), ()) for i in range(32)]
    for threads, sizes in ((1, [7, 8, 7, 8]), (2, [7, 8, 7, 8]), (8, [3, 4, 4, 4, 3, 4, 4, 4])):
        monkeypatch.setattr(BS._workers, "threads_available", lambda threads=threads: threads)
        tasks, weights = BS._tasks(plan, (st,), torch.zeros(1, 1, 4096, 8), torch.zeros(1, 1, 4096, 8))
        pieces = [t for t in tasks if isinstance(t, BS._Stack)]
        assert [len(p.groups) for p in pieces] == sizes
        assert [p.q0 for p in pieces] == [256 + 128 * (p.groups[0] - 2) for p in pieces]
        assert sum((p.groups for p in pieces), ()) == st.groups
        assert [t for t in tasks if not isinstance(t, BS._Stack)] == [0, 1] and len(weights) == len(tasks)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_blocksparse_stacks_in_half_precision_match_naive(dtype):
    """Half-precision inputs run the float32 flash path, stacked: outputs and gradients against the naive reference."""
    spec = am.sliding_window(96)
    q, k, v, (*_, stacks) = _window_stacks(spec, 1024, batch=1)
    assert stacks
    check_against_naive(
        lambda q, k, v: am.attention(q, k, v, spec, backend="blocksparse"),
        dict(batch=1, heads=2, kv_heads=2, q_len=1024, kv_len=1024, head_dim=8, value_dim=8),
        spec,
        dtype,
    )


def test_blocksparse_stacks_read_q_k_v_in_the_layout_models_hand_over():
    """q, k, v as a model makes them, ``(B, L, H, D)`` transposed to ``(B, H, L, D)`` (heads not outermost), and a
    k, v broadcast over the batch (stride 0): the stacks' strided views follow the real strides."""
    spec = am.sliding_window(96)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1024, 2, 8, generator=gen).transpose(1, 2)
    k, v = (torch.randn(1, 1024, 2, 8, generator=gen).transpose(1, 2).expand(2, -1, -1, -1) for _ in range(2))
    call = _prepare_call(q, k, v, spec, None, None, None)
    assert BS.cached(call, "blocksparse", BS._layout_groups)[4], "the case must exercise a stack"
    got = am.attention(q, k, v, spec, backend="blocksparse")
    want = naive_attention(q, k, v, spec.to_dense(1024, 1024).expand(2, -1, -1).unsqueeze(1))
    assert_matches_reference(got, want)


@pytest.mark.parametrize(
    "q_len, kv_len, spec",
    [(512, 1024, am.sliding_window(100)), (700, 1024, am.sliding_window(64)), (1024, 1536, am.local_window(64, 32))],
)
def test_blocksparse_stacks_with_fewer_queries_than_keys_match_naive(q_len, kv_len, spec):
    """Queries bottom-right aligned against more keys (a cache; both-ways windows): each stack's key views start at
    its queries' offset into the keys; outputs and gradients against the naive reference."""
    case = dict(batch=2, heads=4, kv_heads=2, q_len=q_len, kv_len=kv_len, head_dim=16, value_dim=16)
    q = torch.zeros(2, 4, q_len, 16)
    k = torch.zeros(2, 2, kv_len, 16)
    assert BS.cached(_prepare_call(q, k, k, spec, None, None, None), "blocksparse", BS._layout_groups)[4]
    check_against_naive(lambda q, k, v: am.attention(q, k, v, spec, backend="blocksparse"), case, spec, torch.float32)


@pytest.mark.parametrize("block", [4, 8])
@pytest.mark.parametrize("stack", [True, False], ids=["stacked", "group_by_group"])
def test_tiles_of_few_keys_keep_a_nan_query_rows_nan(monkeypatch, block, stack):
    """Tiles narrower than the fused CPU kernel's vector (``_common.FUSED_NAN_KEYS``): a FULL run of ``block`` keys,
    stacked or alone, whose row has a NaN query gets NaN (the kernel reports such a row as one with no key, 0), and
    the other rows the reference output."""
    monkeypatch.setattr(BS, "STACK_GROUPS", stack)
    L, row = 64, 2 * block + 1
    spec = am.full() & am.chunked(block)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, L, 8, generator=gen) for _ in range(3))
    q[0, 0, row, 0] = float("nan")
    out = BS.run_layout(q, k, v, spec.block_layout(L, block_size=block))
    assert out[0, 0, row].isnan().all()
    want = naive_attention(q, k, v, spec.to_dense(L, L))
    clean = ~q.isnan().any(-1)
    torch.testing.assert_close(out[clean].double(), want[clean], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_documents_of_few_keys_through_sdpa_keep_a_nan_query_rows_nan(causal):
    """``varlen_attention(small=0)`` sends documents of 10 keys to SDPA without a mask: a row with a NaN query gets
    NaN there (the fused CPU kernel gives it 0 on fewer than 16 keys), the other rows the reference output."""
    L = 40
    spec = (am.causal() if causal else am.full()) & am.document(seq_lens=[10, 10, 20])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, L, 8, generator=gen) for _ in range(3))
    q[0, 0, 13, 0] = float("nan")
    out = VL.varlen_attention(q, k, v, VL.segments_from_varlen(spec.varlen(L), 1, L, L), causal=causal, small=0)
    assert out[0, 0, 13].isnan().all()
    clean = ~q.isnan().any(-1)
    want = naive_attention(q, k, v, spec.to_dense(L, L))
    torch.testing.assert_close(out[clean].double(), want[clean], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "spec_of_rows",
    [
        lambda rows: am.causal() & am.document(seq_lens=[32] * 8),  # 8 rows x 8 equal documents: one group, <= 64
        lambda rows: am.causal() & am.document(seq_lens=[5, 40, 12, 3, 100, 96]),  # tiny and SDPA documents
        lambda rows: am.sliding_window(48),  # query blocks over overlapping key bands
    ],
    ids=["equal-documents", "mixed-documents", "window"],
)
def test_varlen_backward_cuts_no_more_pieces_with_more_rows(spec_of_rows):
    """``varlen`` cuts q, k, v and its output into rows, documents and key bands with splits, unbinds and one
    gradient buffer per band set, never a slice or select per piece: autograd's backward of each of those allocates a
    zero tensor of the whole source (64 equal documents of 128 tokens: 64 of 8 MB per backward, 1.5-1.9x the call)."""
    assert row_cuts("varlen", spec_of_rows, 2) == row_cuts("varlen", spec_of_rows, 6)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "spec",
    [
        am.causal() & am.document(seq_lens=[16, 16, 8, 16, 8, 16, 16]),  # groups of equal documents, <= 64 segments
        am.document(seq_lens=[24, 24, 24, 24]),  # bidirectional, one group per batch
        am.sliding_window(20) & am.document(seq_lens=[50, 46]),  # key bands inside documents
    ],
    ids=["causal-equal", "full-equal", "window-documents"],
)
def test_varlen_gradients_of_equal_documents_on_several_rows_match_naive(spec, threads):
    """Equal documents across 4 batch rows (one group each shape, assembled piece by piece) and windows inside
    documents: the output and every gradient equal the naive reference's, at one thread (the split path) and two
    (the worker tasks)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(3)
        q = torch.randn(4, 4, 96, 8, generator=gen, dtype=torch.float64, requires_grad=True)
        k, v = (torch.randn(4, 2, 96, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
        out = am.attention(q, k, v, spec, backend="varlen")
        want = naive_attention(q, k, v, spec.to_dense(96).unsqueeze(1))
        grad = torch.randn(out.shape, generator=gen, dtype=out.dtype)
        torch.testing.assert_close(out, want)
        got, expected = (torch.autograd.grad(o, (q, k, v), grad) for o in (out, want))
        for g, w in zip(got, expected, strict=True):
            torch.testing.assert_close(g, w)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("q_len", [96, 40, 7])
@pytest.mark.parametrize("window", [None, 3, 20])
def test_varlen_tiny_documents_with_offsets_and_windows_match_naive(q_len, window):
    """Tiny documents of 1-32 tokens on 3 rows, with fewer queries than keys (the queries of a document start
    mid-way: offsets) and with a window or without: the output and every gradient equal the naive reference's."""
    gen = torch.Generator().manual_seed(5)
    lens = [1, 32, 9, 16, 3, 8, 17, 2, 8]  # 96 tokens
    spec = am.causal() & am.document(seq_lens=lens)
    if window is not None:
        spec = spec & am.sliding_window(window)
    q = torch.randn(3, 4, q_len, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(3, 2, 96, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = am.attention(q, k, v, spec, backend="varlen")
    want = naive_attention(q, k, v, spec.to_dense(q_len, 96).unsqueeze(1))
    grad = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    torch.testing.assert_close(out, want)
    got, expected = (torch.autograd.grad(o, (q, k, v), grad) for o in (out, want))
    for g, w in zip(got, expected, strict=True):
        torch.testing.assert_close(g, w)
