"""The "native" backend (a C kernel over document segments) equals the naive reference in outputs and gradients."""

import contextlib
import logging
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import attnmask as am
from attnmask.attention import choose_backend
from attnmask.backends import _clib
from attnmask.backends import native as N
from attnmask.backends._common import native_plan, pair_width, varlen_plan
from attnmask.backends.varlen import segments_from_varlen, varlen_attention
from attnmask.errors import BackendError, DeviceError, DTypeError, ShapeError
from tests.helpers import bench_limit, call_of, counted_in, grads, tiny_documents
from tests.naive import naive_allowed, naive_attention

if N.native_available() is not None:
    if os.environ.get("ATTNMASK_STRICT_DEPS") == "1":  # `make test`: a C compiler is part of the set-up
        raise RuntimeError(f"the native kernel is unavailable: {N.native_available()}")
    pytest.skip(f"native kernel unavailable: {N.native_available()}", allow_module_level=True)


def random_segments(draw, batch, q_len, kv_len):
    """Disjoint query ranges with arbitrary key ranges (overlapping, empty) and offsets: the kernel's general form."""
    segs = []
    for row in range(batch):
        at = 0
        while at < q_len and draw(st.booleans()):
            ql = draw(st.integers(0, q_len - at))
            ks = draw(st.integers(0, kv_len))
            kl = draw(st.integers(0, kv_len - ks))
            segs.append([row, at, ql, ks, kl, draw(st.integers(-4, 8))])
            at += ql + draw(st.integers(0, 2))
    return torch.tensor(segs, dtype=torch.long).reshape(-1, 6)


def segment_mask(segs, batch, q_len, kv_len, causal, window):
    """The dense ``(B, Q, K)`` mask the segments describe, element by element (the independent reference)."""
    allowed = torch.zeros(batch, q_len, kv_len, dtype=torch.bool)
    for row, qs, ql, ks, kl, off in segs.tolist():
        for i in range(ql):
            for j in range(kl):
                d = i + off - j
                if (not causal or d >= 0) and (window is None or d < window):
                    allowed[row, qs + i, ks + j] = True
    return allowed


@contextlib.contextmanager
def kernel_settings(threads, **constants):
    """Within the block torch and the kernel run ``threads`` threads (whatever the machine's load) and ``native``'s
    module constants ``constants`` (``TILE_KEYS=8``, ...) are set; everything is put back after it (hypothesis tests
    cannot take the ``monkeypatch`` fixture)."""
    if "TILE_KEYS" in constants:  # the forward's tiles too, unless named
        constants.setdefault("FORWARD_TILE_KEYS", constants["TILE_KEYS"])
    saved = torch.get_num_threads(), {name: getattr(N, name) for name in ("region_threads", *constants)}
    torch.set_num_threads(threads)
    N.region_threads = lambda work=None, share_work=None: threads
    for name, value in constants.items():
        setattr(N, name, value)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        for name, value in saved[1].items():
            setattr(N, name, value)


def assert_segments_match_naive(got, got_grads, inputs, segs, causal, window, softcap=None):
    """The kernel's output and the gradients of ``inputs`` (q, k, v and the sinks, if any) against the naive
    reference on the mask ``segs`` describes; rows in no segment are 0 (the kernel leaves them)."""
    q, k, v, *rest = inputs
    sink = rest[0] if rest else None
    (batch, _, q_len, _), kv_len = q.shape, k.shape[2]
    allowed = segment_mask(segs, batch, q_len, kv_len, causal, window).unsqueeze(1)
    want = naive_attention(q, k, v, allowed, softcap=softcap, sinks=sink)
    covered = torch.zeros(batch, q_len, dtype=torch.bool)
    for row, qs, ql, *_ in segs.tolist():
        covered[row, qs : qs + ql] = True
    want = want * covered[:, None, :, None]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    for name, g_, w in zip(["q", "k", "v", "sinks"], got_grads, grads(want, inputs), strict=False):
        torch.testing.assert_close(g_, w, atol=1e-12, rtol=1e-10, msg=f"d{name}")


@settings(max_examples=60)
@given(data=st.data(), rule=st.sampled_from(["full", "causal", "window"]), threads=st.sampled_from([1, 2]))
def test_segment_attention_matches_naive_on_arbitrary_segments(data, rule, threads):
    batch, kv_len = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 14))
    q_len = data.draw(
        st.one_of(st.integers(1, N.BLOCK_MIN_QUERIES - 1), st.integers(N.BLOCK_MIN_QUERIES, 24))
    )  # both forms of the kernel
    kv_heads = data.draw(st.integers(1, 2))
    heads = kv_heads * data.draw(st.sampled_from([1, 3]))
    segs = random_segments(data.draw, batch, q_len, kv_len)
    window = data.draw(st.integers(1, 6)) if rule == "window" else None
    causal = rule != "full"
    q = torch.randn(batch, heads, q_len, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, kv_heads, kv_len, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, kv_heads, kv_len, 3, dtype=torch.float64, requires_grad=True)
    # at two threads the forward cuts these small segments into query blocks too
    with kernel_settings(threads, _MIN_BLOCK_ROWS=2):
        got = N.segment_attention(q, k, v, segs, causal=causal, window=window)
        got_grads = grads(got, (q, k, v))
    assert_segments_match_naive(got, got_grads, (q, k, v), segs, causal, window)


def draw_blocked_case(data, rule: str):
    """A call for the blocked form and the tiles: ``(batch, q_len, kv_len, heads, kv_heads, segments, window)``, from
    ``BLOCK_MIN_QUERIES`` queries, on arbitrary segments or on a segment of every query and key of each row (long runs
    shared by many rows, in every tile and panel), a window only under ``rule == "window"``."""
    batch, q_len = data.draw(st.integers(1, 2)), data.draw(st.integers(N.BLOCK_MIN_QUERIES, 70))
    kv_len = data.draw(st.integers(1, 90))
    heads, kv_heads = data.draw(st.sampled_from([(1, 1), (2, 1), (4, 2)]))
    if data.draw(st.booleans()):  # arbitrary segments
        segs = random_segments(data.draw, batch, q_len, kv_len)
    else:
        off = data.draw(st.integers(-4, 8))
        segs = torch.tensor([[row, 0, q_len, 0, kv_len, off] for row in range(batch)], dtype=torch.long)
    window = data.draw(st.integers(1, 30)) if rule == "window" else None
    return batch, q_len, kv_len, heads, kv_heads, segs, window


@settings(max_examples=70)
@given(
    data=st.data(),
    rule=st.sampled_from(["full", "causal", "window"]),
    softcap=st.sampled_from([None, 2.5]),
    sinks=st.booleans(),
    threads=st.sampled_from([1, 2]),
    tile=st.sampled_from([1, 3, 8, 16, N.TILE_KEYS, N.FORWARD_TILE_KEYS]),
    panel=st.sampled_from([4, 8, 12, N.PANEL_ROWS]),
    dims=st.sampled_from([(6, 3), (19, 17), (40, 33)]),
)
def test_the_blocked_kernel_across_tiles_and_panels_matches_naive(
    data, rule, softcap, sinks, threads, tile, panel, dims
):
    """From ``BLOCK_MIN_QUERIES`` queries a call the kernel computes four query rows at a time against transposed
    keys, in panels of ``PANEL_ROWS`` rows over tiles of ``TILE_KEYS`` keys: the forward's online softmax rescales a
    row's sums whenever a later tile raises its max, and the backward sums dk and dv of four keys over the rows all
    four see. On arbitrary segments (offsets, overlapping and empty key ranges, rows in no segment) and on whole rows,
    with a softcap and sinks, with tiles and panels from far smaller than the segments (every row crossing several
    tiles, segments crossing several panels) to the kernel's own, and head sizes that take every width of the
    register sums (float64: a slice of 32 elements, of 8, and the last few one by one), outputs and the gradients of
    q, k, v and the sinks equal the naive reference."""
    batch, q_len, kv_len, heads, kv_heads, segs, window = draw_blocked_case(data, rule)
    causal = rule != "full"
    D, Dv = dims
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q = torch.randn(batch, heads, q_len, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, kv_heads, kv_len, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, kv_heads, kv_len, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    # keys that grow along the segment: later tiles raise a row's max, so the forward rescales what it summed
    k = (k.detach() * torch.linspace(0.2, 3.0, kv_len, dtype=torch.float64)[:, None]).requires_grad_()
    sink = torch.randn(heads, generator=g, dtype=torch.float64, requires_grad=True) if sinks else None
    inputs = (q, k, v) if sink is None else (q, k, v, sink)
    with kernel_settings(threads, TILE_KEYS=tile, PANEL_ROWS=panel):
        got = N.segment_attention(q, k, v, segs, causal=causal, window=window, softcap=softcap, sinks=sink)
        got_grads = grads(got, inputs)
    assert_segments_match_naive(got, got_grads, inputs, segs, causal, window, softcap)


@pytest.mark.parametrize("scale", [-0.7, 0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_any_finite_scale_weighs_the_blocked_rows_as_the_naive_reference(scale, dtype):
    """The blocked forward takes a tile's max of the raw scores and scales it, which is the max of the scaled scores
    only for a positive scale: a negative or zero one (legal: any finite number) is applied to the scores first. Rows
    crossing several tiles of 8 keys, causal with a window, and scores spread over hundreds, so that a weight taken
    against anything but the row's max overflows; outputs and gradients against the naive reference in float64."""
    segs = torch.tensor([[0, 0, 40, 0, 40, 0], [1, 3, 30, 0, 36, 2]])
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=g, dtype=dtype) for _ in range(3))
    q = (q * 12).requires_grad_()
    k, v = k.requires_grad_(), v.requires_grad_()
    with kernel_settings(1, TILE_KEYS=8, PANEL_ROWS=8):
        got = N.segment_attention(q, k, v, segs, causal=True, window=21, scale=scale)
        got_grads = grads(got, (q, k, v))
    allowed = segment_mask(segs, 2, 40, 40, True, 21).unsqueeze(1)
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    covered = torch.zeros(2, 40, dtype=torch.bool)
    for row, qs, ql, *_ in segs.tolist():
        covered[row, qs : qs + ql] = True
    want = naive_attention(*wide, allowed, scale=scale) * covered[:, None, :, None]
    tol = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 2e-4, "rtol": 1e-4}  # q of ~12
    torch.testing.assert_close(got.double(), want, **tol)
    for name, g_, w in zip("qkv", got_grads, grads(want, wide), strict=True):
        torch.testing.assert_close(g_.double(), w, **tol, msg=f"d{name}")


@pytest.mark.parametrize(("window", "tile"), [(32, 32), (30, 32), (64, 32), (40, 16)])
def test_forward_tiles_from_a_blocks_first_key_with_a_short_last_piece_joined(window, tile):
    """The blocked forward walks each four rows' keys in tiles of FORWARD_TILE_KEYS from their first key, and a last
    piece under a tile's eighth joins the tile before it: a window of 32 on tiles of 32 gives each block 35 keys (one
    tile of 35, the piece of 3 joined), 30 gives 33 (one key joined), 64 gives 67 (tiles of 32 and 35), and 40 on
    tiles of 16 gives 43 (16, 16 and a piece of 11, over the eighth: a tile of its own). Rows over several blocks and
    panels, a segment starting mid-row (offset 5), float64 against the naive reference, forward and backward."""
    segs = torch.tensor([[0, 0, 150, 0, 150, 0], [1, 7, 120, 2, 130, 5]])
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 2, 150, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with kernel_settings(1, TILE_KEYS=8, FORWARD_TILE_KEYS=tile, PANEL_ROWS=8):
        got = N.segment_attention(q, k, v, segs, causal=True, window=window)
        got_grads = grads(got, (q, k, v))
    assert_segments_match_naive(got, got_grads, (q, k, v), segs, True, window)


@pytest.mark.parametrize(("tile", "panel"), [(0, 6), (-3, 0), (5, 3)])
def test_tiles_and_panels_the_kernel_cannot_use_are_rounded_to_ones_it_can(tile, panel):
    """The kernel sizes its scratch from the tile and the panel: a tile under one key becomes one key and a panel
    becomes whole blocks of four rows (at least one), so odd settings still compute exactly (against the naive
    reference) instead of writing past a buffer."""
    segs = torch.tensor([[0, 0, 37, 0, 37, 0], [1, 2, 30, 0, 35, 3]])
    q = torch.randn(2, 2, 37, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 37, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    with kernel_settings(1, TILE_KEYS=tile, PANEL_ROWS=panel):
        got = N.segment_attention(q, k, v, segs, causal=True, window=9)
        got_grads = grads(got, (q, k, v))
    assert_segments_match_naive(got, got_grads, (q, k, v), segs, True, 9)


@pytest.mark.parametrize("rule", ["causal", "window", "document"])
def test_float32_rows_of_many_tiles_match_float64_naive(rule):
    """Rows of 700 keys at D = 64 in float32 with the kernel's own tiles (several per row, the forward's rescaling
    in float32, every slice of the register sums at full width), grouped queries (4 heads on 2) and keys and values
    read through strides (views of one interleaved buffer, rows 128 elements apart), forward and backward, against
    the float64 reference."""
    torch.manual_seed(3)
    L, window = 700, (300 if rule == "window" else None)
    specs = {"causal": am.causal(), "window": am.causal() & am.sliding_window(300)}
    spec = specs.get(rule, am.document(seq_lens=[L]))
    q, kv = torch.randn(1, 4, L, 64), torch.randn(1, 2, L, 2, 64)
    k, v = kv[..., 0, :] * torch.linspace(0.2, 2.0, L)[:, None], kv[..., 1, :]
    leaf = [q.clone().requires_grad_(), torch.stack([k, v], dim=3).requires_grad_()]
    ins = [leaf[0], leaf[1][..., 0, :], leaf[1][..., 1, :]]
    assert ins[1].stride(2) == 128 and not ins[1].is_contiguous()
    got = am.attention(*ins, spec, backend="native")
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    want = naive_attention(*ref, spec.to_dense(L)[:, None])
    assert window is None or L > 2 * window
    torch.testing.assert_close(got, want.float(), atol=2e-5, rtol=1e-4)
    for name, g_, w in zip("qkv", grads(got, ins), grads(want, ref), strict=True):
        torch.testing.assert_close(g_, w.float(), atol=5e-5, rtol=1e-4, msg=f"d{name}")


@pytest.mark.parametrize("dim", [16, 40, 64, 72])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_blocked_forwards_key_copy_holds_every_element_at_every_head_size(monkeypatch, dtype, dim):
    """The blocked form copies an item's keys into blocks of 16 keys (float32 lanes) by 16 x 16 register transposes,
    element by element past the last whole 16 of a head and for a last block of fewer than 16 keys: head sizes of one
    such slice, of two and a remainder, of four and of four and a remainder, keys read through a row stride wider than
    the head (a view of a wider buffer), 53 keys (three whole blocks and 5), bfloat16 read as stored (widened as it is
    copied) and float32; causal with a window of 20, so rows see keys of two blocks. Against the float64 reference
    on the same values."""
    monkeypatch.setattr(N, "_reads_as_stored", lambda *a: True)
    g = torch.Generator().manual_seed(dim)
    L = 53
    q = torch.randn(2, 2, L, dim, generator=g).to(dtype)
    wide = torch.randn(2, 2, L, dim + 24, generator=g).to(dtype)
    k, v = wide[..., 3 : 3 + dim], torch.randn(2, 2, L, 24, generator=g).to(dtype)
    assert k.stride(2) == dim + 24
    segs = torch.tensor([[0, 0, L, 0, L, 0], [1, 5, 48, 0, 50, 2]])
    got = N.segment_attention(q, k, v, segs, causal=True, window=20)
    want = naive_attention(*(t.double() for t in (q, k, v)), segment_mask(segs, 2, L, L, True, 20).unsqueeze(1))
    covered = torch.ones(2, 1, L, 1, dtype=torch.bool)
    covered[1, :, :5] = False
    want = want * covered
    tol = {"atol": 2e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2**-8, "rtol": 2**-7}
    torch.testing.assert_close(got.double(), want.to(dtype).double(), **tol)


@pytest.mark.parametrize("q_len", [15, 16, 37])
def test_alibi_on_documents_equals_naive_in_either_form_of_the_kernel(q_len):
    """ALiBi's distance inside the blocked kernel (from ``BLOCK_MIN_QUERIES`` queries) and the row form, with GQA,
    on causal documents, forward and backward, against the naive reference."""
    torch.manual_seed(q_len)
    lens = [q_len // 3, q_len - q_len // 3]
    q = torch.randn(2, 4, q_len, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, q_len, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    spec = am.causal() & am.document(seq_lens=lens)
    got = am.attention(q, k, v, spec, backend="native", alibi_slopes=slopes)
    want = naive_attention(q, k, v, spec.to_dense(q_len)[:, None], alibi_slopes=slopes)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    for g_, w in zip(grads(got, (q, k, v)), grads(want, (q, k, v)), strict=True):
        torch.testing.assert_close(g_, w, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("q_len", [15, 32])
def test_a_query_row_reads_the_values_of_the_keys_it_sees_only(q_len):
    """A NaN in the value row of key 6 reaches the rows that see it (6 and later, causal) and no earlier one, though
    the blocked forward sums four rows' values at once (rows 4-7 share a block: their common keys 0-4 together, keys
    5-7 row by row); the other rows equal the naive reference."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, q_len, 8, dtype=torch.float64) for _ in range(3))
    bad = v.clone()
    bad[0, :, 6, 2] = torch.nan
    got = N.segment_attention(q, k, bad, torch.tensor([[0, 0, q_len, 0, q_len, 0]]), causal=True)
    assert got[0, :, :6].isfinite().all() and got[0, :, 6:, 2].isnan().all()
    want = naive_attention(q, k, v, am.causal().to_dense(q_len)[:, None])  # the rows before 6 never read key 6
    torch.testing.assert_close(got[0, :, :6], want[0, :, :6], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("q_len", [15, 32])
def test_a_query_row_adds_to_the_gradients_of_the_keys_it_sees_only(q_len):
    """An infinite query element makes its own row NaN and the gradients of the keys that row sees; the keys after
    it, which only later rows of its block of four see, keep the gradient of those rows (the blocked backward sums
    such keys row by row, not as the block's common range): as the naive reference with that row's query at 0."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, q_len, 8, dtype=torch.float64)
    k, v = (torch.randn(1, 2, q_len, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    bad = q.clone()
    bad[0, :, 5, 3] = torch.inf
    got = N.segment_attention(bad.requires_grad_(), k, v, torch.tensor([[0, 0, q_len, 0, q_len, 0]]), causal=True)
    dk, dv = grads(got, (k, v))
    assert dk[0, :, :6].isnan().any() and dk[0, :, 6:].isfinite().all() and dv[0, :, 6:].isfinite().all()
    clean = q.clone()
    clean[0, :, 5] = 0
    want = naive_attention(clean, k, v, am.causal().to_dense(q_len)[:, None])
    want_dk, want_dv = grads(want, (k, v))
    torch.testing.assert_close(dk[0, :, 6:], want_dk[0, :, 6:], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(dv[0, :, 6:], want_dv[0, :, 6:], atol=1e-12, rtol=1e-10)


@settings(max_examples=80)
@given(data=st.data(), heads=st.integers(1, 4), threads=st.integers(2, 4))
def test_forward_items_cut_segments_into_query_blocks_that_cover_each_row_once(data, heads, threads):
    """Every query row of every segment is in exactly one block, which keeps its segment's keys and the rule
    ``query i sees key j when j <= i + offset`` (its offset minus its query start is the segment's); the C cut
    (``attnmask_forward_items``) gives the numpy form's blocks in the numpy form's order."""
    batch, q_len = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 300))
    segs = random_segments(data.draw, batch, q_len, data.draw(st.integers(1, 300)))
    with counted_in("c"):
        blocks = N.forward_items(segs, heads, threads)
    want_items = threads * N._PULLS_PER_THREAD * N._ITEMS_PER_PULL
    if len(segs) and len(segs) * heads < want_items:
        assert torch.equal(N._forward_items_numpy(segs, heads, want_items), blocks)
    assert blocks.dtype == torch.long and blocks.is_contiguous() and blocks.shape[1:] == (6,)
    want = {(row, qs + i, ks, kl, off - qs) for row, qs, ql, ks, kl, off in segs.tolist() for i in range(ql)}
    got = [(row, qs + i, ks, kl, off - qs) for row, qs, ql, ks, kl, off in blocks.tolist() for i in range(ql)]
    assert len(got) == len(set(got)) and set(got) == want
    if len(blocks) > len(segs):  # cut: blocks of equal rows (the last of a segment shorter), no more than needed
        rows = int(blocks[:, 2].max())
        assert rows >= N._MIN_BLOCK_ROWS and len(segs) * heads < threads * N._PULLS_PER_THREAD * N._ITEMS_PER_PULL


@pytest.mark.parametrize("where", ["c", "numpy"])
def test_forward_items_are_blocks_of_a_multiple_of_four_rows_heaviest_first(where):
    """One causal segment of 1,050 queries on 4 heads at two threads wants 64 items: blocks of ceil(4,200 / 64) = 66
    rows rounded up to 68, the last one 30 rows; ordered by rows times the keys the block's last query reaches."""
    segs = torch.tensor([[0, 0, 1050, 0, 1050, 0]])
    with counted_in("c"):
        blocks = N.forward_items(segs, 4, 2) if where == "c" else N._forward_items_numpy(segs, 4, 64)
    starts = list(range(0, 1050, 68))
    by_weight = sorted(starts, key=lambda a: -min(68, 1050 - a) * min(a + 68, 1050))
    assert blocks[:, 1].tolist() == by_weight and blocks[:, 5].tolist() == by_weight
    assert blocks[:, 2].tolist() == [min(68, 1050 - a) for a in by_weight]
    assert (blocks[:, 3] == 0).all() and (blocks[:, 4] == 1050).all() and blocks.is_contiguous()


@pytest.mark.parametrize(
    "spec", [am.causal(), am.sliding_window(96), am.causal() & am.document(seq_lens=[300, 100, 112])]
)
def test_the_threaded_forward_equals_the_one_thread_forward_bit_for_bit(spec, monkeypatch):
    """Cutting a segment into query blocks for the threads changes no output bit, and the gradient (whole segments)
    equals the one-thread gradient."""
    every_thread = lambda work=None, share_work=None: torch.get_num_threads()  # noqa: E731 (whatever the load)
    monkeypatch.setattr(N, "region_threads", every_thread)
    calls = []
    real_call = N._call
    monkeypatch.setattr(N, "_call", lambda *a, **kw: calls.append((a[0], len(a[8]), a[-1])) or real_call(*a, **kw))
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 512, 32, requires_grad=True) for _ in range(3))
    results = []
    before = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            out = am.attention(q, k, v, spec, backend="native")
            results.append((out, grads(out, (q, k, v))))
        finally:
            torch.set_num_threads(before)
    forward = [c for c in calls if not c[0]]
    assert forward[0][2] == 1 and forward[1][2] == 2 and forward[1][1] > forward[0][1]  # the threads got blocks
    assert torch.equal(results[0][0], results[1][0])
    for g1, g2 in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)
    allowed = spec.to_dense(512)[:, None]
    want = naive_attention(q.double(), k.double(), v.double(), allowed)
    torch.testing.assert_close(results[0][0].double(), want, atol=1e-5, rtol=1e-4)


@settings(max_examples=40)
@given(data=st.data(), rule=st.sampled_from(["causal", "window", "full"]))
def test_the_forwards_query_blocks_match_naive_on_arbitrary_segments(data, rule):
    """The forward at two threads, segments cut into blocks of 2-5 query rows (offsets shifted per block), equals the
    naive reference on the kernel's general segment form."""
    batch, q_len, kv_len = data.draw(st.integers(1, 2)), data.draw(st.integers(4, 40)), data.draw(st.integers(1, 40))
    segs = random_segments(data.draw, batch, q_len, kv_len)
    window = data.draw(st.integers(1, 9)) if rule == "window" else None
    q = torch.randn(batch, 2, q_len, 5, dtype=torch.float64)
    k = torch.randn(batch, 1, kv_len, 5, dtype=torch.float64)
    v = torch.randn(batch, 1, kv_len, 3, dtype=torch.float64)
    before, least_rows, region_threads = torch.get_num_threads(), N._MIN_BLOCK_ROWS, N.region_threads
    torch.set_num_threads(2)
    N._MIN_BLOCK_ROWS = data.draw(st.integers(2, 5))
    N.region_threads = lambda work=None, share_work=None: 2
    try:
        got = N.segment_attention(q, k, v, segs, causal=rule != "full", window=window)
    finally:
        torch.set_num_threads(before)
        N._MIN_BLOCK_ROWS, N.region_threads = least_rows, region_threads
    allowed = segment_mask(segs, batch, q_len, kv_len, rule != "full", window).unsqueeze(1)
    torch.testing.assert_close(got, naive_attention(q, k, v, allowed), atol=1e-12, rtol=1e-10)


def test_native_reads_strided_inputs_without_copying_them():
    # (B, L, H, D) projections viewed as (B, H, L, D), as transformers hands them over.
    lens = [3, 5, 4]
    spec = am.causal() & am.document(seq_lens=lens)
    q, k, v = (torch.randn(1, 12, 4, 8).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    got = am.attention(q, k, v, spec, backend="native")
    torch.testing.assert_close(got, am.attention(q, k, v, spec, backend="reference"))


def test_native_rows_with_no_key_and_rows_outside_documents_are_exactly_zero():
    spec = am.causal() & am.document(seq_lens=[3, 4], length=10)
    q, k, v = (torch.randn(1, 2, 10, 4, requires_grad=True) for _ in range(3))
    out = am.attention(q, k, v, spec, backend="native")
    assert torch.equal(out[:, :, 7:], torch.zeros_like(out[:, :, 7:])) and (out[:, :, :7] != 0).all()
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert torch.equal(dq[:, :, 7:], torch.zeros_like(dq[:, :, 7:]))
    # A segment whose queries all sit before its keys (offset -5, causal): no key, zero output and gradient.
    segs = torch.tensor([[0, 0, 3, 5, 5, -5]])
    out = N.segment_attention(q, k, v, segs, causal=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in torch.autograd.grad(out.sum(), (q, k, v)))


def test_native_float64_is_computed_in_float64():
    lens = [2, 6, 1, 5]
    spec = am.sliding_window(3) & am.document(seq_lens=lens)
    q, k, v = (torch.randn(1, 2, 14, 4, dtype=torch.float64) for _ in range(3))
    got = am.attention(q, k, v, spec, backend="native")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, naive_attention(q, k, v, spec.to_dense(14).unsqueeze(1)), atol=1e-13, rtol=0)


def test_native_equals_varlen_on_decoding_queries_against_a_cache():
    # Q < K: the queries are the last positions of their documents (offsets > 0 inside the segments).
    spec = am.causal() & am.document(seq_lens=[[6, 4], [3, 7]])
    q = torch.randn(2, 4, 3, 8)
    k, v = torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    segs = segments_from_varlen(spec.varlen(3, 10), 2, 3, 10, spec_rows=2)
    torch.testing.assert_close(
        N.segment_attention(q, k, v, segs, causal=True), varlen_attention(q, k, v, segs, causal=True)
    )


def test_auto_picks_native_for_tiny_documents_and_documents_of_thousands_and_not_for_one_of_8k(monkeypatch):
    """Measured on the Xeon VM at two threads, forward, D = 64 (RESULTS.md, issue 15, "native's tiles"): thousands of
    tiny documents and two documents of 2,048 run fastest on native (25 ms against varlen's 31), one causal document
    of 8,192 on SDPA's own kernel (varlen 147 ms, native 181 then; since native's faster forward 146-150 against
    stock's 138-158: RESULTS.md, issue 15, "native's key copies, tiles and pulls"; since its sub-tiles a tie, 146.5
    against 145.5 ms interleaved, where the stock kernel is kept: "Scores and values a sub-tile at a time"). The
    Xeon's estimates (its kind's constants, ``bench_limit.on_cpu_kind``), whatever CPU runs the test: on the AMD
    EPYC two documents of 2,048 are a near tie that its own estimates give to varlen (native 32.9-35.4 ms, varlen
    35.5-36.8, interleaved; RESULTS.md, issue 15, "bfloat16 as stored on the AMD EPYC")."""
    from attnmask.backends import _workers as W

    monkeypatch.setattr(W, "threads_available", lambda: 2)
    monkeypatch.setattr(W, "contended", lambda: False)  # the idle estimates, whatever the host's load
    with bench_limit().on_cpu_kind(True, True):
        tiny = tiny_documents(500)
        q = torch.randn(1, 4, sum(tiny), 16)
        assert choose_backend(call_of(q, q, q, am.causal() & am.document(seq_lens=tiny))).name == "native"
        q = torch.randn(1, 4, 4096, 64)
        assert choose_backend(call_of(q, q, q, am.causal() & am.document(seq_lens=[2048, 2048]))).name == "native"
        q = torch.randn(1, 4, 8192, 64)
        assert choose_backend(call_of(q, q, q, am.causal() & am.document(seq_lens=[8192]))).name != "native"


def test_allowed_pairs_counts_every_pair_the_mask_allows():
    gen = torch.Generator().manual_seed(1)
    segs = torch.cat([torch.zeros(40, 1, dtype=torch.long), torch.randint(0, 9, (40, 5), generator=gen)], 1)
    segs[:, 1] = 0  # the count does not need disjoint ranges
    segs[:, 5] -= 4  # offsets -4 .. 4
    for causal, window in [(False, None), (True, None), (True, 1), (True, 3)]:
        want = 0
        for seg in segs:
            want += int(segment_mask(seg[None], 1, 20, 20, causal, window).sum())
        assert N.allowed_pairs(segs, causal, window) == want  # the C pass
        assert float(N.segment_pairs(segs, causal, window).sum()) == want  # the numpy form


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 400), st.integers(-500, 500)), max_size=20),
    st.booleans(),
    st.sampled_from([None, 1, 7, 64, 1000]),
)
def test_allowed_pairs_in_c_as_numpy(rows, causal, window):
    """``attnmask_allowed_pairs`` (the run's and planning's count) equals ``segment_pairs``' numpy sum exactly."""
    segs = torch.tensor([(0, 0, ql, 0, kl, off) for ql, kl, off in rows], dtype=torch.int64).reshape(-1, 6)
    assert N.allowed_pairs(segs, causal, window) == float(N.segment_pairs(segs, causal, window).sum())


@pytest.mark.parametrize(
    ("width", "run", "share"),
    [(128, 16, 0.0), (128, 32, 0.0), (128, 80, 0.5), (128, 128, 1.0), (128, 512, 1.0), (256, 16, 0.0), (256, 64, 1.0)],
)
def test_a_pair_is_charged_by_how_far_its_run_leaves_the_l1_cache(width, run, share):
    """native's estimate charges a pair ``_PAIR_COST`` while its run's keys and values (float32, ``width = D + Dv``)
    take at most 16 KiB, ``_LONG_PAIR_COST`` from 64 KiB, linearly in between (``share`` of the way): at D = Dv = 64
    from 32 to 128 keys, at D = Dv = 128 from 16 to 64; each pair at ``pair_width`` of the width, each query row at
    the width. (The short runs' charge is the CPU kind's: 1.8 with AMX tiles, 1.53 without.)"""
    assert (N._PAIR_COST, N._LONG_PAIR_COST) in ((1.8, 3.4), (1.53, 3.4))
    expected = N._PAIR_COST + (N._LONG_PAIR_COST - N._PAIR_COST) * share
    charged = pair_width(width, N._EXTRA_PAIR_WIDTH)
    segs = torch.tensor([[0, 0, 8, 0, run, 0]])  # 8 queries, each seeing all ``run`` keys (no rule)
    item = float(N._item_work(segs, False, None, width)[0])
    per_pair = (item - 8 * N._ROW_COST * width) / (8 * run * charged)
    assert per_pair == pytest.approx(expected)
    # 8 queries past a causal window's first ``run`` rows: each walks ``run`` keys, however long the document
    past = torch.tensor([[0, 0, 8, 0, 1024, 1000]])
    assert float(N.segment_pairs(past, True, run).sum()) == 8 * run
    item = float(N._item_work(past, True, run, width)[0])
    assert (item - 8 * N._ROW_COST * width) / (8 * run * charged) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("width", "length", "offset", "window"), [(128, 200, 0, None), (64, 700, 37, 300), (256, 90, -5, 40)]
)
def test_each_query_of_a_causal_document_is_charged_by_its_own_run(width, length, offset, window):
    """A causal query walks only the keys up to its own (and within its window): query ``i`` of a segment walks
    ``r = clamp(i + offset + 1, 0, k_len) - clamp(i + offset + 1 - window, 0, k_len)`` keys, each pair at the charge of
    a run of ``r`` keys (the forward reads 4 bytes per element of a key's k and v rows, the backward 8: it also
    accumulates dk and dv), so a document's first queries cost ``_PAIR_COST`` a pair even when its last ones leave
    the L1 cache. Summed query by query here, against the estimate's closed form (C) and its numpy form."""

    def charge(r, key_bytes):
        share = (r * key_bytes * width - N._SHORT_RUN_BYTES) / (N._LONG_RUN_BYTES - N._SHORT_RUN_BYTES)
        return N._PAIR_COST + (N._LONG_PAIR_COST - N._PAIR_COST) * min(max(share, 0.0), 1.0)

    segs = torch.tensor([[0, 0, length, 0, length, offset]])
    for key_bytes in (N._FORWARD_KEY_BYTES, N._BACKWARD_KEY_BYTES):
        want = 0.0
        for i in range(length):
            a = i + offset + 1
            r = min(max(a, 0), length) - (0 if window is None else min(max(a - window, 0), length))
            want += r * charge(r, key_bytes)
        want = want * pair_width(width, N._EXTRA_PAIR_WIDTH) + length * N._ROW_COST * width
        assert float(N._item_work(segs, True, window, width, key_bytes)[0]) == pytest.approx(want, rel=1e-12)
        assert float(N._item_work_numpy(segs, True, window, width, key_bytes)[0]) == pytest.approx(want, rel=1e-12)
    assert N._FORWARD_KEY_BYTES == 4.0 and N._BACKWARD_KEY_BYTES == 8.0


def test_segments_in_the_blocked_form_are_charged_its_shares_of_the_pair_charges(monkeypatch):
    """From ``BLOCK_MIN_QUERIES`` queries a call, a segment of at least ``BLOCK_MIN_KEYS`` keys runs (and is priced)
    in the blocked form: its pairs at ``_BLOCKED_SHORT_SCALE`` / ``_BLOCKED_LONG_SCALE`` of the row form's charges,
    its keys' copy at ``_BLOCKED_KEY_COST``, its rows as before; a shorter segment, and every segment of a
    decoding-sized call, at the row form's."""
    assert N._block_keys(N.BLOCK_MIN_QUERIES - 1) == N._NEVER and N._block_keys(N.BLOCK_MIN_QUERIES) == N.BLOCK_MIN_KEYS
    keys = N.BLOCK_MIN_KEYS
    segs = torch.tensor([[0, 0, 300, 0, 300, 0], [0, 300, keys - 1, 300, keys - 1, 0]])
    row_form = N._item_work(segs, True, None, 128)
    blocked = N._item_work(segs, True, None, 128, block_keys=keys)
    monkeypatch.setattr(N, "_PAIR_COST", N._PAIR_COST * N._BLOCKED_SHORT_SCALE)
    monkeypatch.setattr(N, "_LONG_PAIR_COST", N._LONG_PAIR_COST * N._BLOCKED_LONG_SCALE)
    scaled = N._item_work(segs, True, None, 128)
    copy = 300 * 128 * N._BLOCKED_KEY_COST  # the segment's keys transposed, per element of D + Dv
    assert copy > 0 and blocked[0] == pytest.approx(scaled[0] + copy, rel=1e-12) and blocked[0] < row_form[0]
    assert blocked[1] == pytest.approx(row_form[1], rel=1e-12)


@pytest.mark.parametrize("width", [64, 128, 256])
def test_on_the_tiles_only_the_blocked_forms_segments_take_the_tiles_charges(monkeypatch, width):
    """A bfloat16 forward on AMX tiles runs the blocked form's segments there and leaves the shorter ones to the row
    form (segattn.c ``forward_item_amx``): the estimate charges the first's pairs and key copies at ``_tiles_share``
    of the blocked form's (``_TILES_PAIR_SCALE``, its width scaled with ``_TILES_EXTRA_PAIR_WIDTH``) and its rows
    ``_TILES_ROW_COST`` more, the shorter ones as without the tiles, in C as in numpy."""
    monkeypatch.setattr(N, "_TILES_ROW_COST", 30.0)  # whatever it is fitted to
    keys = N.BLOCK_MIN_KEYS
    segs = torch.tensor([[0, 0, 300, 0, 300, 0], [0, 300, keys - 1, 300, keys - 1, 0]])
    plain = N._item_work(segs, True, None, width, block_keys=keys)
    tiles = N._item_work(segs, True, None, width, block_keys=keys, tiles=True)
    share = N._tiles_share(width)
    rows = 300 * N._ROW_COST * width
    assert tiles[1] == pytest.approx(plain[1], rel=1e-12)
    assert tiles[0] - rows - 300 * 30.0 * width == pytest.approx((plain[0] - rows) * share, rel=1e-12)
    np.testing.assert_allclose(N._item_work_numpy(segs, True, None, width, block_keys=keys, tiles=True), tiles)
    wide, narrow = pair_width(width, N._TILES_EXTRA_PAIR_WIDTH), pair_width(width, N._EXTRA_PAIR_WIDTH)
    assert share == pytest.approx(N._TILES_PAIR_SCALE * wide / narrow, rel=1e-12)
    assert N._tiles_share(128) == pytest.approx(N._TILES_PAIR_SCALE, rel=1e-12)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_backward_share_is_charged_at_the_backwards_bytes_per_key(monkeypatch, threads):
    """With a gradient, native's estimate prices the backward's pairs at runs of ``_BACKWARD_KEY_BYTES`` a key
    element (dearer than the forward's in the row form on documents whose runs leave the L1 cache), the forward's at
    ``_FORWARD_KEY_BYTES``; without a gradient the backward's bytes do not matter."""
    from attnmask.backends import _workers as W

    monkeypatch.setattr(W, "threads_available", lambda: threads)
    q = torch.randn(2, 4, 512, 64)
    # documents under BLOCK_MIN_KEYS: the row form, whose runs of 31 keys fit the L1 cache at the forward's bytes and
    # not at the backward's (the blocked form's tiles keep a long run's keys in cache: there bytes matter little)
    spec = am.causal() & am.document(seq_lens=[[31] * 16 + [16], [30] * 17 + [2]])
    graded = q.clone().requires_grad_()
    with_grad, without = N.BACKEND.cost(call_of(graded, q, q, spec)), N.BACKEND.cost(call_of(q, q, q, spec))
    monkeypatch.setattr(N, "_BACKWARD_KEY_BYTES", N._FORWARD_KEY_BYTES)
    assert N.BACKEND.cost(call_of(graded, q, q, spec)) < with_grad
    assert N.BACKEND.cost(call_of(q, q, q, spec)) == without


@pytest.mark.parametrize(
    ("dtype", "amx", "tiles", "name"),
    [
        (torch.bfloat16, True, False, "_BF16_AMX_THREAD_EFFICIENCY"),
        (torch.bfloat16, True, True, "_THREAD_EFFICIENCY"),
        (torch.bfloat16, False, False, "_THREAD_EFFICIENCY"),
        (torch.float32, True, False, "_THREAD_EFFICIENCY"),
    ],
)
def test_the_bfloat16_forward_on_amx_tiles_gains_its_own_share_of_a_thread(monkeypatch, dtype, amx, tiles, name):
    """At two threads native's estimate divides the forward's items by what the threads gain: each added thread
    counts ``_BF16_AMX_THREAD_EFFICIENCY`` of a core in bfloat16 on a CPU with AMX tiles where the forward does not
    run on them (its float32 arithmetic on copies; fitted there), else ``_THREAD_EFFICIENCY`` (on the tiles too: a
    second thread measured 1.8-1.95x the first's speed there); the float32 arithmetic's bfloat16 forward is then
    estimated dearer than it was."""
    from attnmask.backends import _workers as W

    monkeypatch.setattr(N, "amx_ready", lambda: tiles)
    seen = []
    gain = N._pulls_gain
    monkeypatch.setattr(
        N, "_pulls_gain", lambda work, repeat, threads, share: seen.append(share) or gain(work, repeat, threads, share)
    )
    monkeypatch.setattr(N._common, "cpu_has_amx_bf16", lambda: amx)
    monkeypatch.setattr(W, "threads_available", lambda: 2)
    q = torch.randn(1, 4, 512, 64, dtype=dtype)
    cost = N.BACKEND.cost(call_of(q, q, q, am.causal() & am.sliding_window(64)))
    assert seen == [getattr(N, name)]
    monkeypatch.setattr(N, "_BF16_AMX_THREAD_EFFICIENCY", N._THREAD_EFFICIENCY)
    seen.clear()
    same = N.BACKEND.cost(call_of(q, q, q, am.causal() & am.sliding_window(64)))
    assert (cost > same) if name == "_BF16_AMX_THREAD_EFFICIENCY" else cost == same


def test_segment_attention_rejects_bad_arguments():
    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(ShapeError, match="non-overlapping query ranges"):
        N.segment_attention(q, q, q, torch.tensor([[0, 0, 4, 0, 4, 0], [0, 2, 3, 2, 3, 0]]))
    with pytest.raises(ShapeError, match="inside rows"):
        N.segment_attention(q, q, q, torch.tensor([[0, 4, 4, 0, 4, 0]]))
    for offset in (-(2**63), 2**40 + 1, -(2**40) - 1):  # the least int64 is its own absolute value
        with pytest.raises(ShapeError, match="inside rows"):
            N.segment_attention(q, q, q, torch.tensor([[0, 0, 6, 0, 6, offset]]))
    N.segment_attention(q, q, q, torch.tensor([[0, 0, 6, 0, 6, 2**40]]))  # far, but in range: every key seen
    with pytest.raises(ShapeError, match=r"\(N, 6\)"):
        N.segment_attention(q, q, q, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(BackendError, match="window"):
        N.segment_attention(q, q, q, torch.tensor([[0, 0, 6, 0, 6, 0]]), window=0)
    with pytest.raises(DTypeError, match="^k: expected q's floating dtype"):
        N.segment_attention(q, q.double(), q, torch.tensor([[0, 0, 6, 0, 6, 0]]))
    with pytest.raises(DTypeError, match="^q: expected"):
        N.segment_attention(q.long(), q.long(), q.long(), torch.tensor([[0, 0, 6, 0, 6, 0]]))
    meta = torch.empty(1, 2, 6, 4, device="meta")
    with pytest.raises(DeviceError, match="^v: expected a CPU tensor"):
        N.segment_attention(q, q, meta, torch.tensor([[0, 0, 6, 0, 6, 0]]))


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """An empty kernel cache and a forgotten loaded library, restored afterwards."""
    monkeypatch.setenv("ATTNMASK_CACHE_DIR", str(tmp_path))
    N._library.cache_clear()
    yield tmp_path
    N._library.cache_clear()


def test_native_is_skipped_by_auto_and_refused_by_name_when_disabled(fresh_library, monkeypatch):
    monkeypatch.setenv("ATTNMASK_NATIVE", "0")
    tiny = tiny_documents(300)
    spec = am.causal() & am.document(seq_lens=tiny)
    q = torch.randn(1, 2, sum(tiny), 8)
    assert choose_backend(call_of(q, q, q, spec)).name != "native"
    with pytest.raises(BackendError, match="ATTNMASK_NATIVE=0"):
        am.attention(q, q, q, spec, backend="native")


def test_a_failed_build_is_reported_not_raised(fresh_library, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    assert "could not build" in N.native_available()
    assert not list(fresh_library.iterdir())  # no half-written library left in the cache


def test_the_kernel_is_built_once_into_the_cache(fresh_library, caplog):
    with caplog.at_level(logging.INFO, logger="attnmask"):
        assert N.native_available() is None
    (built,) = fresh_library.glob("segattn-*.so")
    assert [r.getMessage() for r in caplog.records] == [
        f"building segattn.c once for this machine into {fresh_library} (a few seconds)"
    ]
    stamp = built.stat().st_mtime_ns
    N._library.cache_clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="attnmask"):
        assert N.native_available() is None and built.stat().st_mtime_ns == stamp
    assert not caplog.records  # loaded from the cache: nothing to say


def test_rows_without_keys_are_zero_even_in_a_recycled_output_buffer():
    # Every query is in a segment (so the output is allocated uninitialised) but the segment has no key.
    segs = torch.tensor([[0, 0, 6, 2, 0, 0]])
    q = torch.randn(1, 2, 6, 4)
    for _ in range(5):
        garbage = torch.full((1, 2, 6, 4), float("nan"))
        del garbage
        out = N.segment_attention(q, q, q, segs, causal=True)
        assert torch.equal(out, torch.zeros_like(out))


def test_a_compiler_that_refuses_march_native_gets_a_portable_build(fresh_library, tmp_path, monkeypatch):
    real = shutil.which("cc")
    wrapper = tmp_path / "picky-cc"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -march=native ] && exit 1; done\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    assert N.native_available() is None
    q = torch.randn(1, 2, 6, 4)
    out = N.segment_attention(q, q, q, torch.tensor([[0, 0, 6, 0, 6, 0]]), causal=True)
    torch.testing.assert_close(out, am.attention(q, q, q, am.causal(), backend="reference"))


def test_a_compiler_without_openmp_gets_a_pthreads_build(fresh_library, tmp_path, monkeypatch):
    """A compiler refusing -fopenmp builds with -fopenmp-simd (and -march=native); the kernel's threads are then
    pthreads, and two of them give the reference's output."""
    real = shutil.which("cc")
    wrapper, seen = tmp_path / "no-openmp-cc", tmp_path / "flags"
    wrapper.write_text(
        f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\necho "$@" >> {seen}\nexec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setattr(N, "region_threads", lambda work=None, share_work=None: 2)
    assert N.native_available() is None
    assert "-fopenmp-simd" in seen.read_text() and "-march=native" in seen.read_text()
    q = torch.randn(1, 2, 96, 8)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = N.segment_attention(q, q, q, torch.tensor([[0, 0, 96, 0, 96, 0]]), causal=True)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, am.attention(q, q, q, am.causal(), backend="reference"))


def test_while_a_core_is_taken_only_large_kernel_calls_keep_every_thread(monkeypatch):
    """``_kernel_threads`` passes native's own threshold (``_BUSY_SHARE_WORK``, under SDPA's ``REGION_WORK``): with one
    of two cores free, a call of fewer multiply-adds runs on one thread, a larger one on both."""
    from attnmask.backends import _workers as W

    monkeypatch.setattr(W, "ADAPT", True)  # the suite switches the adaptation off (tests/conftest.py)
    monkeypatch.setattr(W, "threads_available", lambda: 2)
    monkeypatch.setattr(W, "free_cores", lambda: 1)
    rule, width, heads = (False, None, 1.0), 128, 4
    rows = int((N._BUSY_SHARE_WORK / (heads * width)) ** 0.5) + 1  # one full segment just over the threshold
    big = torch.tensor([[0, 0, rows, 0, rows, 0]])
    small = torch.tensor([[0, 0, rows // 2, 0, rows // 2, 0]])
    assert N._BUSY_SHARE_WORK < W.REGION_WORK
    assert N._kernel_threads(big, heads, width, rule) == 2
    assert N._kernel_threads(small, heads, width, rule) == 1


def test_the_kernels_float32_exp_is_within_two_ulp_of_exp_zero_below_minus_87_and_nan_for_nan():
    import ctypes

    tail = torch.tensor([-87.5, -100.0, -1e4, float("-inf"), float("nan")])
    x = torch.cat([torch.linspace(-87.0, 0.0, 200_001), tail])
    y = torch.empty_like(x)
    N._library().attnmask_exp_f32(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr()), ctypes.c_int64(len(x)))
    want = torch.exp(x[: -len(tail)].double())
    rel = ((y[: -len(tail)].double() - want) / want).abs().max().item()
    assert rel < 2 * 2**-23, rel
    assert torch.equal(y[-5:-1], torch.zeros(4)) and y[-1].isnan()


@pytest.mark.parametrize("spread", [1.0, 30.0])
def test_float32_attention_holds_over_a_wide_range_of_scores(spread):
    # Scores up to about +-200 (spread 30): probabilities that underflow to 0 included.
    gen = torch.Generator().manual_seed(3)
    spec = am.causal() & am.document(seq_lens=[40, 7, 90, 1, 62])
    q = torch.randn(1, 2, 200, 16, generator=gen) * spread
    k, v = torch.randn(1, 2, 200, 16, generator=gen), torch.randn(1, 2, 200, 16, generator=gen)
    got = am.attention(q, k, v, spec, backend="native")
    want = naive_attention(q.double(), k.double(), v.double(), spec.to_dense(200).unsqueeze(1))
    # float32 scores carry ~|s| * 6e-8 of rounding: the tolerance grows with the spread.
    torch.testing.assert_close(got.double(), want, atol=2e-6 * spread, rtol=2e-6 * spread)


def test_an_unwritable_cache_folder_falls_back_to_the_temporary_directory(fresh_library, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ATTNMASK_CACHE_DIR", str(blocker / "cache"))  # cannot be created: its parent is a file
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert N.native_available() is None
    assert list((tmp_path / "tmp").glob("attnmask-*/segattn-*.so"))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40), st.integers(1, 12)), max_size=12))
def test_keys_disjoint_agrees_with_every_pair_of_segments(rows):
    """``_keys_disjoint`` (sorted by row and first key) against a check of every pair of segments of a row (each
    segment with at least one key; an empty one at another's first key may read as shared: the safe answer)."""
    segs = torch.tensor([(b, 0, 1, k0, kl, 0) for b, k0, kl in rows], dtype=torch.long).reshape(-1, 6)
    overlap = any(
        b1 == b2 and max(a1, a2) < min(a1 + l1, a2 + l2)
        for i, (b1, a1, l1) in enumerate(rows)
        for b2, a2, l2 in rows[i + 1 :]
    )
    assert N._keys_disjoint(segs) == (not overlap)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40), st.integers(0, 12)), min_size=2, max_size=12))
@example([(0, 9, 1), (0, 5, 3), (0, 5, 0)])  # unsorted, and a tie whose order decides (the empty one after: shared)
def test_keys_disjoint_in_c_answers_as_the_numpy_form(rows):
    """The C pass (``attnmask_keys_disjoint``: one pass over segments sorted by row and first key, else a sort with
    ties in their order) gives the numpy form's answer, empty segments and unsorted rows included; sorted once more,
    the same."""
    segs = torch.tensor([(b, 0, 1, k0, kl, 0) for b, k0, kl in rows], dtype=torch.long)
    ordered = segs[torch.from_numpy(np.lexsort((segs[:, 3].numpy(), segs[:, 0].numpy())))]
    with counted_in("c"):
        for s in (segs, ordered):
            assert N._keys_disjoint(s) == N._keys_disjoint_numpy(s)


@pytest.mark.parametrize(
    ("q_len", "k_len", "spec", "as_stored"),
    [
        (1, 300, am.causal(), True),  # a decoding step: each key read by one query
        (2, 300, am.causal(), True),
        (64, 300, am.causal(), False),  # a prefill chunk: keys read by up to 64 queries
        (256, 256, am.causal() & am.document(seq_lens=[[40, 100, 116], [256]]), False),
        (256, 256, am.causal() & am.sliding_window(2), True),  # a window of 2: each key read by at most 2 queries
    ],
)
def test_bfloat16_is_read_as_stored_where_few_queries_read_each_key(monkeypatch, q_len, k_len, spec, as_stored):
    """The native forward reads bfloat16 q, k, v as stored (the kernel widens each element as it loads it) where each
    key is read by at most ``_AS_STORED_MAX_READS`` queries, else it runs on float32 copies; either way it computes in
    float32 from the same values, so the outputs agree to bfloat16's rounding, and the backward (on float32 copies)
    gives the gradients of the copies' path. (The forward on AMX tiles, which reads bfloat16 as stored wherever it runs,
    is turned off here: ``test_the_bfloat16_forward_on_amx_tiles...``; so is the backward that reads as stored, with
    the forward before it: ``test_the_bfloat16_backward_reads_its_inputs_as_stored_bit_for_bit``.)"""
    monkeypatch.setattr(N, "amx_ready", lambda: False)
    monkeypatch.setattr(N, "_backward_reads_as_stored", lambda segs, disjoint=None: False)
    seen = []
    call = N._call
    monkeypatch.setattr(
        N, "_call", lambda backward, q, *rest, **kw: seen.append((backward, q.dtype)) or call(backward, q, *rest, **kw)
    )
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, q_len, 32, generator=gen).bfloat16()
    k, v = (torch.randn(2, 2, k_len, 32, generator=gen).bfloat16() for _ in range(2))
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = am.attention(*inputs, spec, backend="native")
    out.float().square().sum().backward()
    assert seen == [(False, torch.bfloat16 if as_stored else torch.float32), (True, torch.float32)]
    copies = [t.float().requires_grad_() for t in (q, k, v)]
    want = am.attention(*copies, spec, backend="native")
    want.square().sum().backward()
    torch.testing.assert_close(out.float(), want.bfloat16().float(), atol=2**-7, rtol=2**-7)
    for got, ref in zip(inputs, copies, strict=True):
        torch.testing.assert_close(got.grad.float(), ref.grad.bfloat16().float(), atol=2e-2, rtol=2e-2)


def test_large_bfloat16_caches_are_read_as_stored_up_to_more_queries(monkeypatch):
    """Where the float32 copies of k and v would take ``_FRESH_COPY_BYTES`` or more (fresh pages on every call), keys
    read by up to ``_AS_STORED_MAX_READS_FRESH`` queries are read as stored; below that size, up to
    ``_AS_STORED_MAX_READS``; with no backward to follow, a call the row form takes whole and widens (3 decoding
    queries: no blocked form; at most ``_WIDEN_MAX_KEYS`` keys) whatever its reads, and a longer cache by its reads;
    with one, where the backward reads as stored too (at most ``_WIDEN_MAX_KEYS`` keys a segment), whatever its
    reads."""
    segs = torch.tensor([[0, 0, 8, 0, 1000, 992]])  # 8 decoding queries at the end of 1,000 keys: ~8 reads a key
    q, small = torch.zeros(1, 4, 8, 16, dtype=torch.bfloat16), torch.zeros(1, 2, 1000, 16, dtype=torch.bfloat16)
    kv, blocked = 2 * small.numel(), N.BLOCK_MIN_QUERIES  # a call of as many queries may take the blocked form
    monkeypatch.setattr(N, "_AS_STORED_MAX_READS_NO_GRAD", 2.0)  # the rule without a backward: the test below
    for grad in (True, False):
        assert not N._reads_as_stored(q.dtype, kv, segs, (True, None), grad, blocked)
    three = torch.tensor([[0, 0, 3, 0, 200, 197]])  # 3 reads a key, over _AS_STORED_MAX_READS
    assert N.BLOCK_MIN_QUERIES > 3 and N._WIDEN_MAX_KEYS >= 200
    assert N._reads_as_stored(q.dtype, kv, three, (True, None), False, 3)
    assert N._reads_as_stored(q.dtype, kv, three, (True, None), True, 3)  # the backward takes it as stored
    with monkeypatch.context() as inside:
        inside.setattr(N, "_backward_reads_as_stored", lambda segs, disjoint=None: False)
        assert not N._reads_as_stored(q.dtype, kv, three, (True, None), True, 3)
    long_cache = torch.tensor([[0, 0, 3, 0, 1000, 997]])  # converted as loaded in the kernel: the rule by reads
    assert not N._reads_as_stored(q.dtype, kv, long_cache, (True, None), False, 3)
    source = _clib._SOURCE.read_text()  # the kernel's bound, which the rule mirrors
    assert f"#define WIDEN_MAX_KEYS {N._WIDEN_MAX_KEYS} " in source
    monkeypatch.setattr(N, "_FRESH_COPY_BYTES", small.numel() * 8)
    for grad in (True, False):
        assert N._reads_as_stored(q.dtype, kv, segs, (True, None), grad, blocked)
        assert not N._reads_as_stored(torch.float32, kv, segs, (True, None), grad, 8)
        assert not N._reads_as_stored(torch.float16, kv, segs, (True, None), grad, 8)


@pytest.mark.parametrize("grad", [False, True])
def test_a_forward_no_backward_follows_reads_bfloat16_as_stored_in_the_row_form(monkeypatch, grad):
    """Without a backward to follow (inference, ``torch.no_grad``, inputs that need no gradient) a forward the row form
    takes whole reads bfloat16 as stored whatever its reads (``_AS_STORED_MAX_READS_NO_GRAD`` 0 here); with one and
    a backward that takes copies (``_backward_reads_as_stored`` off here), up to ``_AS_STORED_MAX_READS``: documents
    of 8-16 tokens (~4.5-8.5 reads a key) with the tiles off, as stored or on copies, equal to the copies' path to
    bfloat16's rounding."""
    monkeypatch.setattr(N, "amx_ready", lambda: False)
    monkeypatch.setattr(N, "_AS_STORED_MAX_READS_NO_GRAD", 0.0)
    monkeypatch.setattr(N, "_backward_reads_as_stored", lambda segs, disjoint=None: False)
    seen = []
    call = N._call
    monkeypatch.setattr(
        N, "_call", lambda backward, q, *rest, **kw: seen.append((backward, q.dtype)) or call(backward, q, *rest, **kw)
    )
    spec = am.causal() & am.document(seq_lens=[[8, 16, 8, 16, 16], [16, 16, 16, 16]])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 32, generator=gen).bfloat16().requires_grad_(grad) for _ in range(3))
    out = am.attention(q, k, v, spec, backend="native")
    assert seen[0] == (False, torch.float32 if grad else torch.bfloat16)
    want = am.attention(q.detach().float(), k.detach().float(), v.detach().float(), spec, backend="native")
    torch.testing.assert_close(out.detach().float(), want.bfloat16().float(), atol=2**-7, rtol=2**-7)


@settings(max_examples=120, deadline=None)
@given(
    q_len=st.integers(1, 40),
    extra=st.integers(0, 300),
    docs=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 50)),
    causal=st.booleans(),
    heads=st.sampled_from([(1, 1), (4, 2), (2, 2)]),
    dim=st.sampled_from([8, 24, 64]),
    mods=st.sampled_from(["none", "softcap", "sinks", "alibi"]),
    strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bfloat16_read_as_stored_equals_the_copies_path(
    q_len, extra, docs, window, causal, heads, dim, mods, strided, seed
):
    """Any call the native kernel takes in bfloat16 gives, read as stored, what it gives on float32 copies (both
    compute in float32 from the same values; only the order of float32 sums may differ, so to bfloat16's rounding):
    queries against a longer cache or rows of documents, windows, grouped-query heads, head sizes off the vector
    width, each score modifier, inputs strided in every dimension but the last."""
    kv_len = q_len + extra
    docs = docs and q_len == kv_len
    spec = am.causal() if causal or window or not docs else am.full()  # native takes no call without a mask
    if window:
        spec = spec & am.sliding_window(window)
    if docs:
        gen = torch.Generator().manual_seed(seed)
        spec = spec & am.document(doc_ids=torch.randint(0, 3, (1, kv_len), generator=gen).sort().values)
    h, hkv = heads
    gen = torch.Generator().manual_seed(seed)

    def make(n_heads, length):
        if strided:  # (B, L, H, D) storage seen as (B, H, L, D)
            return torch.randn(2, length, n_heads, dim, generator=gen).bfloat16().transpose(1, 2)
        return torch.randn(2, n_heads, length, dim, generator=gen).bfloat16()

    q, k, v = make(h, q_len), make(hkv, kv_len), make(hkv, kv_len)
    kwargs = {
        "none": {},
        "softcap": {"softcap": 5.0},
        "sinks": {"sinks": torch.randn(h, generator=gen)},
        "alibi": {"alibi_slopes": torch.rand(h, generator=gen)},
    }[mods]
    outs = []
    for reads in (float("inf"), -1.0):  # read as stored, then on copies
        with pytest.MonkeyPatch.context() as mp:
            for name in ("_AS_STORED_MAX_READS", "_AS_STORED_MAX_READS_FRESH", "_AS_STORED_MAX_READS_NO_GRAD"):
                mp.setattr(N, name, reads)
            outs.append(am.attention(q, k, v, spec, backend="native", **kwargs).float())
    torch.testing.assert_close(outs[0], outs[1], atol=2**-7, rtol=2**-7)
    want = am.attention(q.float(), k.float(), v.float(), spec, backend="reference", **kwargs)
    torch.testing.assert_close(outs[0], want, atol=2e-2, rtol=2e-2)


@st.composite
def _padded_rows(draw):
    """Rows of one contiguous run of real tokens each (possibly none), and a rule: causal, full or a causal window."""
    length = draw(st.integers(2, 70))
    rows = draw(st.integers(1, 3))
    real = torch.zeros(rows, length, dtype=torch.bool)
    for r in range(rows):
        first = draw(st.integers(0, length))
        real[r, first : draw(st.integers(first, length))] = True
    rule = draw(st.sampled_from(["causal", "full", "window"]))
    base = {
        "causal": am.causal(),
        "full": am.full(),
        "window": am.causal() & am.sliding_window(draw(st.integers(1, 9))),
    }
    return real, base[rule]


@settings(max_examples=60, deadline=None)
@given(_padded_rows(), st.booleans(), st.booleans())
def test_padding_queries_that_see_real_keys_run_on_native_as_the_naive_reference(case, one_spec_row, alibi):
    """Right padding under causal() (either side under full()): the padding queries attend the row's real keys, which
    a varlen kernel has no form for; native's segment of the row takes them in (more queries than keys), forward and
    backward equal to the naive reference, with ALiBi slopes too (a query's distance to a key is its true one)."""
    real, rule = case
    if one_spec_row:  # one spec row applied to a batch of 2
        real = real[:1]
    spec = rule & am.key_padding(real)
    batch, length = (2 if one_spec_row else real.shape[0]), real.shape[1]
    gen = torch.Generator().manual_seed(int(real.sum()))
    q, k, v = (torch.randn(batch, 2, length, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    inputs = [t.requires_grad_() for t in (q, k, v)]
    slopes = torch.rand(2, generator=gen, dtype=torch.float64) if alibi else None
    got = am.attention(*inputs, spec, backend="native", alibi_slopes=slopes)
    want = naive_attention(*inputs, spec.to_dense(length).expand(batch, -1, -1)[:, None], alibi_slopes=slopes)
    torch.testing.assert_close(got, want)
    for a, b in zip(grads(got, inputs), grads(want, inputs), strict=True):
        torch.testing.assert_close(a, b)


def test_a_right_padded_causal_row_is_one_segment_of_every_query_from_its_first_and_varlen_still_refuses():
    """The padding queries after a row's 4 real tokens join its segment (6 queries over the 4 keys: the last two see
    all four); varlen, whose kernels compute only the sequences, still refuses the call."""
    real = torch.tensor([[True] * 4 + [False] * 2])
    q = torch.randn(1, 2, 6, 8)
    call = call_of(q, q, q, am.causal() & am.key_padding(real))
    assert native_plan(call).segments.tolist() == [[0, 0, 6, 0, 4, 0]]  # queries 4 and 5 see keys 0-3
    assert "padding queries attend to real keys" in varlen_plan(call)
    big = torch.randn(1, 2, 300, 64)
    real = torch.ones(1, 300, dtype=torch.bool)
    real[0, 170:] = False
    spec = am.causal() & am.key_padding(real)  # the blocked form, its tiles and panels, on both segments
    got = am.attention(big, big, big, spec, backend="native")
    want = naive_attention(big.double(), big.double(), big.double(), spec.to_dense(300)[:, None])
    torch.testing.assert_close(got, want.float())


needs_tiles = pytest.mark.skipif(not N.amx_ready(), reason="no AMX-BF16 tiles on this CPU (or ATTNMASK_NATIVE_AMX=0)")


def _tiles_seen(monkeypatch) -> list:
    """The ``tiles`` flag of every forward kernel call from now on."""
    seen = []
    call = N._call
    monkeypatch.setattr(N, "_call", lambda *a, **kw: (None if a[0] else seen.append(a[11])) or call(*a, **kw))
    return seen


@needs_tiles
@pytest.mark.parametrize(
    ("spec", "dims", "kv_heads", "strided"),
    [
        (am.causal(), (64, 64), 2, False),
        (am.causal() & am.sliding_window(40), (32, 48), 4, True),  # windows shorter than a step; Dv of 3 tiles
        (am.full() & am.document(seq_lens=[[20, 100, 140], [260]]), (64, 128), 1, False),  # Dv past 4 tiles
        (am.causal() & am.document(seq_lens=[[5, 30, 225], [70, 190]]), (32, 32), 2, False),  # row form's too
        (am.causal() & am.key_padding(torch.arange(260) >= 37), (64, 64), 2, True),  # rows with no key
    ],
)
def test_the_bfloat16_forward_on_amx_tiles_matches_float64(monkeypatch, spec, dims, kv_heads, strided):
    """On a CPU with AMX-BF16 the bfloat16 forward runs on the tiles (bfloat16 products, float32 sums, the weights
    rounded to bfloat16 for the values' product) wherever most pairs are in segments of ``BLOCK_MIN_KEYS`` keys or
    more: its output is float64 attention on the same bfloat16 values to bfloat16's rounding and the weights' (the
    same tolerance the float32 path's bfloat16 output meets), rows with no key exactly 0, and the backward (on float32
    copies, from the tiles' log-sum-exp) gives float64's gradients to bfloat16's rounding."""
    seen = _tiles_seen(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    D, Dv = dims
    L = 260

    def make(heads, width):
        if strided:  # (B, L, H, D) memory, as a model's projections give
            return torch.randn(2, L, heads, width, generator=gen).bfloat16().transpose(1, 2)
        return torch.randn(2, heads, L, width, generator=gen).bfloat16()

    q, k, v = make(4, D), make(kv_heads, D), make(kv_heads, Dv)
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = am.attention(*inputs, spec, backend="native")
    assert seen == [True]
    allowed = spec.to_dense(L)[:, None]
    wide = [t.double().requires_grad_() for t in (q, k, v)]
    want = naive_attention(*wide, allowed)
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)
    empty = ~allowed.any(-1)
    assert (out.float()[empty.expand(2, 4, L)] == 0).all()
    out.float().square().sum().backward()
    want.square().sum().backward()
    for got, ref in zip(inputs, wide, strict=True):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=6e-2, rtol=6e-2)


@needs_tiles
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("Dv", [80, 128, 256])
def test_the_tiles_weigh_values_wider_than_their_tiles_in_groups_of_steps(monkeypatch, Dv, threads):
    """With Dv over 64 the values' sums need more tiles than there are: each group of ``AMX_GROUP`` steps weighs the
    first four chunks of 16 elements as its softmax goes, and the later chunks (one, four, twelve here) from the
    group's kept weights and rescales. Keys that grow along the row move each row's max many times, at a group's
    first step and inside it: the output is float64's on the same bfloat16 values to bfloat16's rounding, causal over
    rows of 600 (19 steps, three groups) at one and two threads."""
    seen = _tiles_seen(monkeypatch)
    gen = torch.Generator().manual_seed(Dv)
    L = 600
    q = torch.randn(1, 2, L, 32, generator=gen).bfloat16()
    k = (torch.randn(1, 1, L, 32, generator=gen) * (1 + torch.arange(L) / 12)[:, None]).bfloat16()
    v = torch.randn(1, 1, L, Dv, generator=gen).bfloat16()
    with kernel_settings(threads):
        out = am.attention(q, k, v, am.causal(), backend="native")
    assert seen == [True]
    want = naive_attention(q.double(), k.double(), v.double(), am.causal().to_dense(L)[:, None])
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    ("spec", "q_len"),
    [
        (am.causal() & am.sliding_window(100), 300),  # on the tiles where there are tiles, else the blocked form
        (am.causal() & am.key_padding(torch.arange(300) >= 37), 300),  # rows with no key: exactly 0
        (am.causal() & am.document(seq_lens=[[100, 200], [40, 260]]), 300),
        (am.causal() & am.document(seq_lens=[[10, 290], [300]]), 300),  # a segment the row form runs
        (am.causal() & am.document(seq_lens=[[8, 12, 20, 30, 230], [17] * 17 + [11]]), 300),  # the row form's copies
        (am.causal(), 1),  # a decoding step: one query row an item
    ],
)
@pytest.mark.parametrize("tiles", [True, False], ids=["tiles", "no_tiles"])
def test_bfloat16_read_as_stored_is_written_in_bfloat16_where_no_gradient_needs_float32(
    monkeypatch, spec, q_len, tiles
):
    """With no gradient to keep the float32 output for, a forward reading bfloat16 as stored (on the tiles where the
    CPU has them, or with them off: the blocked form and the row form; every such forward here) writes its output in
    bfloat16 itself (``_out_dtype``), rounded as torch rounds the float32 output: the same bits as with a gradient
    (float32 out, converted by torch), a value that is not finite included."""
    monkeypatch.setattr(N, "_AS_STORED_MAX_READS_NO_GRAD", float("inf"))
    if not tiles:
        monkeypatch.setattr(N, "amx_ready", lambda: False)
    buffers = []
    call = N._call
    monkeypatch.setattr(N, "_call", lambda *a, **kw: (None if a[0] else buffers.append(a[4].dtype)) or call(*a, **kw))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, q_len, 64, generator=gen).bfloat16()
    k, v = (torch.randn(2, 4, 300, 64, generator=gen).bfloat16() for _ in range(2))
    v[1, :, 250, 3] = float("nan")  # the rows that see it: NaN on both paths
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    got = am.attention(q, k, v, spec, backend="native")
    want = am.attention(*inputs, spec, backend="native").detach()
    assert buffers == [torch.bfloat16, torch.float32]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert got[1].isnan().any() and not got[0].isnan().any()


@pytest.mark.parametrize("base", [am.full(), am.causal()], ids=["full", "causal"])
def test_bfloat16_rows_widened_by_chunks_equal_the_float32_path(monkeypatch, base):
    """A row-form item of many query rows against few keys (300 queries and the first 20 of 300 keys: a padded
    encoder's keys; under causal() query i sees keys 0 .. min(i, 19)) widens its q rows 64 at a time (``WIDEN_ROWS``):
    the output, read as stored with no gradient, is the float32 path's rounded to bfloat16, bit for bit. One thread:
    the items are whole segments, not blocks of rows."""
    monkeypatch.setattr(N, "_kernel_threads", lambda *a, **kw: 1)
    spec = base & am.key_padding(torch.arange(300) < 20)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 300, 64, generator=gen).bfloat16() for _ in range(3))
    got = am.attention(q, k, v, spec, backend="native")
    want = am.attention(q.float(), k.float(), v.float(), spec, backend="native").bfloat16()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_tiles
def test_the_tiles_agree_with_the_float32_path_and_are_off_where_they_would_not_pay(monkeypatch):
    """The tiles' output equals the float32 path's (the same bfloat16 values computed in float32) to bfloat16's
    rounding; ``ATTNMASK_NATIVE_AMX=0`` turns them off (``amx_ready`` is read once per process); and they do not run
    on tiny documents (every segment under ``BLOCK_MIN_KEYS`` keys), a decoding step, a head size that is not a
    multiple of 32, or with a score modifier."""
    seen = _tiles_seen(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 300, 64, generator=gen).bfloat16() for _ in range(3))
    spec = am.causal() & am.sliding_window(100)
    tiles = am.attention(q, k, v, spec, backend="native")
    monkeypatch.setattr(N, "amx_ready", lambda: False)
    plain = am.attention(q, k, v, spec, backend="native")
    torch.testing.assert_close(tiles.float(), plain.float(), atol=2**-6, rtol=2**-6)
    assert seen == [True, False]
    monkeypatch.undo()
    seen = _tiles_seen(monkeypatch)
    am.attention(q, k, v, am.causal() & am.document(seq_lens=[10] * 30), backend="native")
    am.attention(q[:, :, -2:], k, v, am.causal(), backend="native")
    am.attention(q[..., :48], k[..., :48], v, spec, backend="native")
    am.attention(q, k, v, spec, backend="native", softcap=30.0)
    assert seen == [False] * 4
    N.amx_ready.cache_clear()
    try:
        monkeypatch.setenv("ATTNMASK_NATIVE_AMX", "0")
        assert not N.amx_ready()
    finally:
        monkeypatch.delenv("ATTNMASK_NATIVE_AMX")
        N.amx_ready.cache_clear()
    assert N.amx_ready()


@needs_tiles
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("spec", [am.causal(), am.causal() & am.sliding_window(40)])
def test_the_tiles_never_read_a_value_or_key_a_row_may_not_see(bad, spec):
    """A tile multiplies every value of its keys, the weight 0 included: a value that is not finite goes into the
    tiles as 0, and each row that sees it is computed again by the row form, which multiplies it as it is. So a NaN
    or an infinity in a key's value or key leaves every row that may not see that key exactly as it was, bit for bit,
    and the rows that see such a value are not finite, as on every path (the float32 path's rows, to rounding)."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 200, 32, generator=gen).bfloat16() for _ in range(3))
    clean = am.attention(q, k, v, spec, backend="native")
    sees = spec.to_dense(200)[0, :, 150]
    for t in (k, v):
        poisoned = t.clone()
        poisoned[:, :, 150] = bad
        args = (q, poisoned, v) if t is k else (q, k, poisoned)
        out = am.attention(*args, spec, backend="native")
        assert torch.equal(out[:, :, ~sees], clean[:, :, ~sees])
        if t is v:  # every row that sees the key weighs that value
            assert not torch.isfinite(out[:, :, sees]).all(-1).any()
            with kernel_settings(2), pytest.MonkeyPatch.context() as off:
                off.setattr(N, "amx_ready", lambda: False)
                plain = am.attention(*args, spec, backend="native")
            torch.testing.assert_close(out[:, :, sees], plain[:, :, sees], equal_nan=True)


@needs_tiles
def test_the_tiles_give_the_same_rows_at_one_and_two_threads():
    """Two threads cut a segment into query blocks; a row's keys and steps do not change, only when its block's tile
    sums are added into float32 memory, so the outputs agree to float32 rounding (before the output's bfloat16)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 700, 64, generator=gen).bfloat16() for _ in range(3))
    outs = []
    for threads in (1, 2):
        with kernel_settings(threads):
            outs.append(am.attention(q, k, v, am.causal() & am.sliding_window(300), backend="native").float())
    torch.testing.assert_close(outs[0], outs[1], atol=2**-7, rtol=2**-7)


def _backward_tiles_seen(monkeypatch) -> list:
    """The ``tiles`` flag of every backward kernel call from now on."""
    seen = []
    call = N._call
    monkeypatch.setattr(N, "_call", lambda *a, **kw: (seen.append(a[11]) if a[0] else None) or call(*a, **kw))
    return seen


@needs_tiles
@pytest.mark.parametrize(
    ("spec", "dims", "kv_heads"),
    [
        (am.causal(), (64, 64), 2),
        (am.causal() & am.sliding_window(140), (32, 32), 4),
        (am.causal() & am.document(seq_lens=[[5, 30, 225], [70, 190]]), (64, 128), 1),  # ends inside 16 keys
        (am.full() & am.document(seq_lens=[[20, 100, 140], [260]]), (128, 64), 2),
        (am.causal() & am.key_padding(torch.arange(260) >= 37), (64, 64), 2),  # rows with no key
    ],
)
def test_the_bfloat16_backward_on_amx_tiles_matches_float64(monkeypatch, spec, dims, kv_heads):
    """After a forward on the tiles, the backward runs on them too where Dv is a multiple of 32 and q, k and dout are
    finite: P and dS from the forward's log-sum-exp in float32, rounded to bfloat16 for the tile products (dV, dK, dQ)
    with float32 sums. Its gradients are float64's on the same bfloat16 values to bfloat16's rounding, with a second
    thread too (segments whose keys are disjoint are its items), and rows with no key get exactly 0."""
    seen = _backward_tiles_seen(monkeypatch)
    gen = torch.Generator().manual_seed(4)
    D, Dv = dims
    L = 260
    q = torch.randn(2, 4, L, D, generator=gen).bfloat16()
    k = torch.randn(2, kv_heads, L, D, generator=gen).bfloat16()
    v = torch.randn(2, kv_heads, L, Dv, generator=gen).bfloat16()
    dout = torch.randn(2, 4, L, Dv, generator=gen).bfloat16()
    allowed = spec.to_dense(L)[:, None]
    wide = [t.double().requires_grad_() for t in (q, k, v)]
    naive_attention(*wide, allowed).backward(dout.double())
    for threads in (1, 2):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        with kernel_settings(threads):
            am.attention(*inputs, spec, backend="native").backward(dout)
        for got, ref in zip(inputs, wide, strict=True):
            torch.testing.assert_close(got.grad.double(), ref.grad, atol=6e-2, rtol=6e-2)
        empty = ~allowed.any(-1).expand(2, 4, L)
        assert (inputs[0].grad[empty] == 0).all()
    assert seen == [True, True]


@needs_tiles
@pytest.mark.parametrize("where", ["q", "k", "dout"])
def test_the_tiles_backward_leaves_non_finite_inputs_to_the_float32_copies(monkeypatch, where):
    """A NaN in q, k or dout (a row or key that others may not meet) sends the backward to the float32 copies, which
    multiply only the pairs that meet: the gradients of every key and row that never meets it stay finite and equal
    to what that path gives."""
    seen = _backward_tiles_seen(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(1, 2, 200, 64, generator=gen).bfloat16() for _ in range(4))
    tensors = {"q": q, "k": k, "dout": dout}
    tensors[where] = tensors[where].clone()
    tensors[where][:, :, 150] = float("nan")
    inputs = [t.clone().requires_grad_() for t in (tensors["q"], tensors["k"], v)]
    am.attention(*inputs, am.causal(), backend="native").backward(tensors["dout"])
    assert seen == [False]
    if where == "k":  # key 150 is met by rows 150 on: rows before it, and the other keys' dk and dv, stay finite
        assert torch.isfinite(inputs[0].grad[:, :, :150]).all()
    else:  # row 150 meets keys up to 150: the later keys' dk and dv, and the other rows' dq, stay finite
        assert torch.isfinite(inputs[1].grad[:, :, 151:]).all() and torch.isfinite(inputs[2].grad[:, :, 151:]).all()
        assert torch.isfinite(inputs[0].grad[:, :, :150]).all()


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(0, 3), st.integers(1, 3), st.integers(0, 40), st.integers(1, 70)),
    bad=st.lists(
        st.tuples(st.integers(0, 10**6), st.sampled_from(["inf", "-inf", "nan", "3e38", "-1e-40"])), max_size=3
    ),
    layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
)
def test_the_finiteness_check_is_torchs(shape, bad, layout, dtype):
    """``_finite`` (the kernel's one read of a bfloat16 tensor with contiguous rows, torch's ``isfinite`` otherwise)
    answers as ``torch.isfinite(t).all()`` on any shape, an empty one included, with infinities, NaN, the largest
    finite values and subnormals anywhere, on contiguous, transposed and sliced views."""
    B, H, L, D = shape
    base = {"contiguous": (B, H, L, D), "transposed": (B, L, H, D), "sliced": (B, L, H, D + 3)}[layout]
    base = torch.randn(base)
    for where, value in bad:
        if base.numel():
            base.view(-1)[where % base.numel()] = float(value)
    t = base.to(dtype)
    if layout != "contiguous":  # (B, L, H, D) memory, as a model's projections give, or a slice of each row
        t = t[..., :D].transpose(1, 2)
    assert t.shape == (B, H, L, D)
    assert N._finite(t) == bool(torch.isfinite(t).all())


@needs_tiles
@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    rule=st.sampled_from(["full", "causal", "window"]),
    threads=st.sampled_from([1, 2]),
    dims=st.sampled_from([(32, 32), (64, 32), (32, 64), (64, 48), (32, 80), (32, 128)]),
)
def test_the_tiles_match_naive_on_arbitrary_segments(data, rule, threads, dims):
    """The tiles' forward and backward on arbitrary segments (offsets, overlapping and empty key ranges, rows in no
    segment, segments shorter than a step or than a block of 16 rows, which the forward leaves to the row form) and on
    whole rows, at one and two threads (the forward's query blocks, the backward's segments), with Dv that keeps the
    backward on float32 copies (48): outputs and gradients equal float64 attention on the same bfloat16 values to
    bfloat16's rounding, rows in no segment 0."""
    batch, q_len, kv_len, heads, kv_heads, segs, window = draw_blocked_case(data, rule)
    causal = rule != "full"
    D, Dv = dims
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q = torch.randn(batch, heads, q_len, D, generator=g).bfloat16()
    k = torch.randn(batch, kv_heads, kv_len, D, generator=g).bfloat16()
    v = torch.randn(batch, kv_heads, kv_len, Dv, generator=g).bfloat16()
    dout = torch.randn(batch, heads, q_len, Dv, generator=g).bfloat16()
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    # the tiles wherever they may run, the backward on short runs of keys too
    with kernel_settings(threads, _MIN_BLOCK_ROWS=4, _TILES_MIN_SHARE=0.0, _TILES_BACKWARD_MIN_KEYS=1):
        got = N.segment_attention(*inputs, segs, causal=causal, window=window)
        got.backward(dout)
    allowed = segment_mask(segs, batch, q_len, kv_len, causal, window).unsqueeze(1)
    wide = [t.double().requires_grad_() for t in (q, k, v)]
    covered = torch.zeros(batch, q_len, dtype=torch.bool)
    for row, qs, ql, *_ in segs.tolist():
        covered[row, qs : qs + ql] = True
    want = naive_attention(*wide, allowed) * covered[:, None, :, None]
    want.backward(dout.double())
    torch.testing.assert_close(got.double(), want, atol=3e-2, rtol=3e-2)
    for name, t, w in zip("qkv", inputs, wide, strict=True):
        torch.testing.assert_close(t.grad.double(), w.grad, atol=8e-2, rtol=8e-2, msg=f"d{name}")


@needs_tiles
@pytest.mark.parametrize(
    ("spec", "L", "tiles"),
    [
        (am.causal() & am.document(seq_lens=[40] * 7), 280, False),
        (am.causal() & am.document(seq_lens=[200, 80]), 280, True),
        (am.causal() & am.sliding_window(64), 300, False),
        (am.causal() & am.sliding_window(128), 300, True),
    ],
)
def test_the_tiles_backward_takes_long_runs_of_keys_only(monkeypatch, spec, L, tiles):
    """The tiles' backward walks blocks of 16 rows and steps of 32 keys, which cost more than they save where rows
    see few keys: it runs where most pairs are in segments of ``_TILES_BACKWARD_MIN_KEYS`` keys or more, under no
    window shorter than that (documents of 40 tokens, a window of 64: the float32 copies' backward, after a forward
    on the tiles), with the same gradients either way."""
    seen = _backward_tiles_seen(monkeypatch)
    gen = torch.Generator().manual_seed(6)
    q, k, v, dout = (torch.randn(1, 4, L, 64, generator=gen).bfloat16() for _ in range(4))
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    am.attention(*inputs, spec, backend="native").backward(dout)
    assert seen == [tiles]
    wide = [t.double().requires_grad_() for t in (q, k, v)]
    naive_attention(*wide, spec.to_dense(L)[:, None]).backward(dout.double())
    for got, ref in zip(inputs, wide, strict=True):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=6e-2, rtol=6e-2)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 3),
    q_len=st.integers(1, 30),
    pieces=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(0, 6)), max_size=12),
    shuffle=st.randoms(use_true_random=False),
)
def test_the_query_ranges_in_no_segment_cover_each_uncovered_query_once(rows, q_len, pieces, shuffle):
    """``_uncovered`` (C, and its numpy form): with the segments, every query of every row in exactly one range, each
    gap non-empty, of no key (the kernel writes its rows 0); segments in any order, empty ones, rows with none."""
    segs, at = [], [0] * rows
    for row, gap, length in pieces:
        row %= rows
        start = at[row] + gap
        length = min(length, q_len - start)
        if length < 0:
            continue
        segs.append((row, start, length, 0, 1, 0))
        at[row] = start + length
    shuffle.shuffle(segs)
    tensor = torch.tensor(segs, dtype=torch.int64).reshape(-1, 6)
    gaps = N._uncovered(tensor, rows, q_len)
    assert torch.equal(gaps, N._uncovered_numpy(tensor, rows, q_len))  # the C pass as the numpy form
    covered = np.zeros((rows, q_len), dtype=int)
    for row, start, length, *_ in [*segs, *gaps.tolist()]:
        covered[row, start : start + length] += 1
    assert (covered == 1).all()
    assert gaps.dtype == torch.int64 and gaps.shape[1:] == (6,)
    assert (gaps[:, 2] > 0).all() and (gaps[:, 3:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_rows_in_no_document_are_written_zero_by_the_kernel(dtype, threads):
    """Leading and trailing padding, and a row in no document, around documents long enough for the blocked form
    (in bfloat16 on a CPU with AMX tiles: the tiles, writing bfloat16 without a gradient): the kernel writes those
    rows 0 (and the sinks' gradient, which reads their log-sum-exp, matches the reference), whatever the output
    buffer held before; the other rows match the naive reference."""
    B, L = 3, 640
    ids = torch.full((B, L), -1)
    ids[0, :300], ids[0, 300:520] = 0, 1
    ids[1, 40:400], ids[1, 400:600] = 0, 1
    spec = am.causal() & am.document(doc_ids=ids)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, 4, L, 64, generator=gen).to(dtype) for _ in range(3))
    padding = (ids < 0)[:, None, :, None].expand(B, 4, L, 64)
    reference = naive_attention(q.double(), k.double(), v.double(), spec.to_dense(L)[:, None])
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-5
    with kernel_settings(threads):
        for _ in range(3):  # a freed tensor of NaN first: an output buffer that reuses it must still be written
            torch.full((B, 4, L, 64), float("nan"), dtype=dtype)
            out = am.attention(q, k, v, spec, backend="native")
            assert out.dtype == dtype
            assert (out[padding] == 0).all()
            assert (out.double() - reference).abs().max() < tolerance
        sinks = torch.randn(4, generator=gen).to(dtype).requires_grad_()
        got = am.attention(q, k, v, spec, backend="native", sinks=sinks)
        want = am.attention(q.double(), k.double(), v.double(), spec, backend="reference", sinks=sinks.double())
        assert (got[padding] == 0).all()
        (got_grad,) = torch.autograd.grad(got.double().sum(), sinks)
        (want_grad,) = torch.autograd.grad(want.sum(), sinks)
        assert torch.allclose(got_grad.double(), want_grad.double(), atol=tolerance * 10, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_backward_zeroes_every_gradient_row_itself(dtype, threads, monkeypatch):
    """The backward allocates its gradients empty and each item zeroes the rows it owns, the query and key rows in no
    document through items of no key or no query: with freed tensors of NaN before each call (which the gradients'
    buffers may reuse), padding rows get exactly 0 in dq, dk and dv, and every other row the reference's gradient.
    Documents of 5-31 tokens (the row form's key-major sums), of 200 (the blocked form) and grouped key/value heads."""
    B, L, H, Hkv = 2, 400, 4, 2
    ids = torch.full((B, L), -1)
    ids[0, 10:210] = 0
    at, doc = 210, 1
    for n in (5, 31, 7, 16, 12, 29):
        ids[0, at : at + n], at, doc = doc, at + n, doc + 1
    ids[1, :120], ids[1, 150:350] = 0, 1  # padding between the documents and after them
    spec = am.causal() & am.document(doc_ids=ids)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, L, 64, generator=gen).to(dtype)
    k, v = (torch.randn(B, Hkv, L, 64, generator=gen).to(dtype) for _ in range(2))
    inputs = [t.requires_grad_() for t in (q, k, v)]
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    want = am.attention(*ref_inputs, spec, backend="reference")
    dout = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    want_grads = torch.autograd.grad(want, ref_inputs, dout)
    empty = ids < 0  # (B, L): rows of no query and keys of no document
    seen = []
    real_call = N._call
    monkeypatch.setattr(N, "_call", lambda *a, **kw: seen.append(kw.get("zero_grads", False)) or real_call(*a, **kw))
    tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-4
    with kernel_settings(threads):
        for _ in range(3):
            for t in inputs:  # NaN in freed blocks of every gradient's size
                torch.full(t.shape, float("nan"), dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            got = am.attention(*inputs, spec, backend="native")
            got_grads = torch.autograd.grad(got, inputs, dout.to(dtype))
            for got_g, want_g in zip(got_grads, want_grads, strict=True):
                assert (got_g[empty[:, None, :, None].expand_as(got_g)] == 0).all()
                assert (got_g.double() - want_g).abs().max() < tolerance * max(1.0, want_g.abs().max().item())
    assert seen and seen[1] is True  # the backward's call: the kernel zeroed the gradients


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mods", ["none", "softcap", "alibi", "sinks"])
@pytest.mark.parametrize("strided", [False, True])
def test_the_bfloat16_backward_reads_its_inputs_as_stored_bit_for_bit(threads, mods, strided, monkeypatch):
    """Where no two segments share a key and none has over ``_WIDEN_MAX_KEYS`` keys, a bfloat16 forward with a
    gradient to follow and its backward read q, k, v and dO as stored (the kernel's ``backward_item_bf16``: each item
    widened in scratch, the float32 backward item on it, the gradients rounded once) and write bfloat16 gradients:
    bit for bit the float32 copies' path rounded to bfloat16, on documents of 1-31 tokens (the row form) and 32-256
    (the blocked form, chunks of rows within them), grouped key/value heads, rows in no document, score modifiers
    (the sinks' own gradient too), inputs stored (B, L, H, D), one and two threads; and within bfloat16's rounding of
    the float64 reference."""
    monkeypatch.setattr(N, "amx_ready", lambda: False)  # the tiles' own backward elsewhere
    B, L, H, Hkv, D = 2, 420, 4, 2, 64
    ids = torch.full((B, L), -1)
    at = 3
    for doc, n in enumerate((5, 1, 31, 32, 40, 100, 150)):  # 3 padding rows first, 58 after
        ids[0, at : at + n], at = doc, at + n
    ids[1, :256], ids[1, 300:333] = 0, 1
    spec = am.causal() & am.document(doc_ids=ids)
    gen = torch.Generator().manual_seed(11)

    def make(heads):
        if strided:  # (B, L, H, D) storage seen as (B, H, L, D)
            return torch.randn(B, L, heads, D, generator=gen).bfloat16().transpose(1, 2)
        return torch.randn(B, heads, L, D, generator=gen).bfloat16()

    inputs = [make(H).requires_grad_(), make(Hkv).requires_grad_(), make(Hkv).requires_grad_()]
    dout = make(H)
    kwargs = {
        "none": {},
        "softcap": {"softcap": 3.0},
        "alibi": {"alibi_slopes": torch.rand(H, generator=gen)},
        "sinks": {"sinks": torch.randn(H, generator=gen).requires_grad_()},
    }[mods]
    wrt = inputs + ([kwargs["sinks"]] if mods == "sinks" else [])  # the sinks' gradient from dO and the output
    seen = []
    real_call = N._call
    monkeypatch.setattr(N, "_call", lambda b, q, *rest, **kw: seen.append((b, q.dtype)) or real_call(b, q, *rest, **kw))
    with kernel_settings(threads):
        got = am.attention(*inputs, spec, backend="native", **kwargs)
        got_grads = torch.autograd.grad(got, wrt, dout)
        assert seen == [(False, torch.bfloat16), (True, torch.bfloat16)]
        with pytest.MonkeyPatch.context() as inside:  # the float32 copies' path
            inside.setattr(N, "_backward_reads_as_stored", lambda segs, disjoint=None: False)
            copies = am.attention(*inputs, spec, backend="native", **kwargs)
            copies_grads = torch.autograd.grad(copies, wrt, dout)
        assert seen[2:] == [(False, torch.float32), (True, torch.float32)]
    assert all(g.dtype == torch.bfloat16 for g in got_grads[:3])
    assert torch.equal(got, copies)
    for got_g, copies_g in zip(got_grads, copies_grads, strict=True):
        assert torch.equal(got_g, copies_g)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_kwargs = {name: (t.detach().double() if torch.is_tensor(t) else t) for name, t in kwargs.items()}
    want = am.attention(*ref_inputs, spec, backend="reference", **ref_kwargs)
    want_grads = torch.autograd.grad(want, ref_inputs, dout.double())
    for got_g, want_g in zip(got_grads[:3], want_grads, strict=True):
        assert (got_g.double() - want_g).abs().max() < 5e-2 * max(1.0, want_g.abs().max().item())


def test_the_bfloat16_backward_takes_float32_copies_where_segments_share_keys_or_pass_the_widening():
    """A segment of over ``_WIDEN_MAX_KEYS`` keys, or segments that share keys, keep the float32 copies (the kernel's
    bfloat16 backward widens each item whole and owns its key rows); the kernel refuses such segments itself (status 2,
    a ``RuntimeError`` naming the call: a caller's bug, never a user's input)."""
    one = torch.tensor([[0, 0, 300, 0, 300, 0]])
    assert not N._backward_reads_as_stored(one)
    shared = torch.tensor([[0, 0, 8, 0, 16, 8], [0, 8, 8, 0, 16, 0]])  # two query blocks of one causal segment
    assert not N._backward_reads_as_stored(shared)
    assert N._backward_reads_as_stored(torch.tensor([[0, 0, 8, 0, 8, 0], [0, 8, 256, 8, 256, 0]]))
    q = torch.randn(1, 1, 16, 8).bfloat16()
    res, lse = torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16)
    grads = tuple(torch.zeros(1, 1, 16, 8, dtype=torch.bfloat16) for _ in range(3))
    with pytest.raises(RuntimeError, match="status 2"):
        N._call(True, q, q, q, res, q, lse, grads, shared, (True, None, 1.0), (0.0, None, None), False, 1)


def test_a_call_that_records_no_gradient_skips_the_autograd_function(monkeypatch):
    """Without a gradient to record (no input requires one, or ``torch.no_grad``) the forward runs alone, without
    ``autograd.Function``'s dispatch (a repeated call's time outside the kernel 0.21 -> 0.18 ms on 8 rows of 256),
    with the same output; with one, through ``_SegmentAttention`` (its backward)."""
    applied = []
    real = N._SegmentAttention.apply
    monkeypatch.setattr(N._SegmentAttention, "apply", lambda *a: applied.append(1) or real(*a))
    spec = am.causal() & am.document(seq_lens=[[40, 24], [64]])
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 4, 64, 16, generator=gen) for _ in range(3))
    plain = am.attention(q, k, v, spec, backend="native")
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        quiet = am.attention(*inputs, spec, backend="native")
    assert applied == [] and plain.grad_fn is None and quiet.grad_fn is None
    recorded = am.attention(*inputs, spec, backend="native")
    assert applied == [1] and recorded.grad_fn is not None
    torch.testing.assert_close(plain, recorded.detach(), rtol=0, atol=0)
    torch.testing.assert_close(quiet, plain, rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(
    st.data(),
    st.integers(1, 3),
    st.integers(2, 70),
    st.sampled_from([(2, 1), (4, 1), (3, 2), (2, 2)]),
    st.sampled_from(["causal", "full", "window", "causal window"]),
    st.sampled_from([1, 2]),
    st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_a_decoding_step_folds_grouped_heads_into_rows_of_their_key_head(data, B, K, heads, base, threads, dtype):
    """One query with grouped heads (``G`` query heads a key head) and no per-head modifier runs as ``G`` query rows
    of each key head's segment over the keys the query sees, where that gives the threads an item each: the output is
    the unfolded kernel's to float rounding and the textbook formula's; left padding (a row all padding too), a window
    that cuts the cache, a softcap, values wider than the keys, a cache sliced from a longer buffer, the query laid out
    as transformers hands it over ``(B, 1, H, D)`` transposed."""
    from attnmask.backends import _workers as W

    G, Hkv = heads
    window = data.draw(st.integers(1, K + 2))
    spec = {
        "causal": am.causal(),
        "full": am.full(),
        "window": am.sliding_window(window),
        "causal window": am.causal() & am.sliding_window(window),
    }[base]
    real = torch.ones(B, K, dtype=torch.bool)
    for b in range(B):
        real[b, : data.draw(st.integers(0, K))] = False
    if base == "full" or data.draw(st.booleans()):  # full() alone has no structure for native
        spec = spec & am.key_padding(real)
    softcap = data.draw(st.sampled_from([None, 3.0]))
    # D = Dv = 32 in bfloat16: the folded rows on AMX tiles where the CPU has them
    D, Dv = data.draw(st.sampled_from([(8, 8), (16, 24), (32, 32), (32, 48)]))
    gen = torch.Generator().manual_seed(K * 7 + B)
    q = torch.randn(B, 1, G * Hkv, D, generator=gen).to(dtype).transpose(1, 2)
    extra = data.draw(st.sampled_from([0, 5]))  # a cache's first K keys of a longer buffer: strided k and v
    k = torch.randn(B, Hkv, K + extra, D, generator=gen).to(dtype)[:, :, :K]
    v = torch.randn(B, Hkv, K + extra, Dv, generator=gen).to(dtype)[:, :, :K]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(W, "threads_available", lambda: threads)
        taken = []
        fold = N._folded_step
        mp.setattr(N, "_folded_step", lambda *a: taken.append(fold(*a)) or taken[-1])
        got = am.attention(q, k, v, spec, backend="native", softcap=softcap)
        segments = native_plan(call_of(q, k, v, spec)).segments
        assert (taken[0] is not None) == (len(segments) * Hkv >= threads)
        mp.setattr(N, "_folded_step", lambda *a: None)
        unfolded = am.attention(q, k, v, spec, backend="native", softcap=softcap)
    assert got.shape == (B, G * Hkv, 1, Dv) and got.dtype == dtype
    close = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double(), unfolded.double(), **close)
    allowed = torch.tensor(
        [[[[naive_allowed(spec, b, K - 1, j) for j in range(K)]]] for b in range(B)], dtype=torch.bool
    )
    want = naive_attention(q, k, v, allowed, softcap=softcap)
    torch.testing.assert_close(got.double(), want, **close)


def test_a_decoding_step_with_per_head_modifiers_or_a_gradient_is_not_folded(monkeypatch):
    """ALiBi slopes and sinks differ between the query heads of a key head, and a gradient needs the unfolded
    forward's saved tensors: those steps run unfolded, and give the textbook formula's output and gradient."""
    from attnmask.backends import _workers as W

    monkeypatch.setattr(W, "threads_available", lambda: 2)
    folds = []
    fold = N._folded_step
    monkeypatch.setattr(N, "_folded_step", lambda *a: folds.append(fold(*a)) or folds[-1])
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 4, 1, 8, generator=gen), torch.randn(2, 2, 30, 8, generator=gen), torch.randn(2, 2, 30, 8)
    allowed = torch.ones(1, 1, 1, 30, dtype=torch.bool)
    for kwargs in ({"alibi_slopes": torch.rand(4, generator=gen)}, {"sinks": torch.rand(4, generator=gen)}):
        got = am.attention(q, k, v, am.causal(), backend="native", **kwargs)
        torch.testing.assert_close(got.double(), naive_attention(q, k, v, allowed, **kwargs), atol=1e-5, rtol=1e-5)
    assert folds == [None, None]
    graded = q.clone().requires_grad_()
    am.attention(graded, k, v, am.causal(), backend="native").sum().backward()
    assert len(folds) == 2  # not asked with a gradient
    ref = q.double().requires_grad_()
    naive_attention(ref, k, v, allowed).sum().backward()
    torch.testing.assert_close(graded.grad.double(), ref.grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        am.attention(q, k, v, am.causal(), backend="native")
    assert folds[-1] is not None  # the same step without a gradient folds


@settings(max_examples=25, deadline=None)
@given(
    lens=st.lists(st.integers(1, 31), min_size=1, max_size=6),
    dims=st.sampled_from([(16, 16), (32, 48), (64, 64), (64, 24), (48, 128)]),
    threads=st.sampled_from([1, 2]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    mods=st.sampled_from(["none", "scale", "sinks", "softcap"]),
    bad=st.sampled_from([None, float("nan"), float("inf"), float("-inf")]),
    seed=st.integers(0, 2**16),
)
def test_a_documents_rows_taken_four_at_a_time_are_each_row_alone_bit_for_bit(
    lens, dims, threads, dtype, mods, bad, seed
):
    """The row form takes four rows of at most 16 keys each at once (segattn.c's ``rows4``, float32 compute with no
    modifier but a scale, or sinks): every row's output is bit for bit the same row attended alone (one query against
    its document's keys up to it: the row form one row at a time), on documents of 1-31 tokens, head sizes 16-64
    with value heads of 16-128, bfloat16 (widened once) and float32, one and two threads; a softcap takes the rows
    one at a time either way. A NaN or an infinity in one key element (``bad``) gives the same NaN or value in both."""
    (D, Dv), H, L = dims, 2, sum(lens)
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, H, L, D, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(1, H, L, Dv, generator=gen).to(dtype)
    if bad is not None:
        k[0, int(torch.randint(H, (1,), generator=gen)), int(torch.randint(L, (1,), generator=gen)), 0] = bad
    kwargs = {
        "none": {},
        "scale": {"scale": 0.3},
        "sinks": {"sinks": torch.randn(H, generator=gen).to(dtype)},
        "softcap": {"softcap": 2.0},
    }[mods]
    with kernel_settings(threads):
        got = am.attention(q, k, v, am.causal() & am.document(seq_lens=lens), backend="native", **kwargs)
        start = 0
        for n in lens:
            for p in range(start, start + n):
                keys = slice(start, p + 1)
                alone = am.attention(
                    q[:, :, p : p + 1], k[:, :, keys], v[:, :, keys], am.causal(), backend="native", **kwargs
                )
                torch.testing.assert_close(alone[:, :, 0], got[:, :, p], rtol=0, atol=0, equal_nan=True)
            start += n
