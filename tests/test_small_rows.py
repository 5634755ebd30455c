"""Small rows on CPU: "auto" runs stock SDPA (one call, the dense mask, bit for bit what SDPA computes) without
planning the other backends where they cannot win, decides that from a cheap allowed-pair count that matches the
mask, still costs every backend where the mask denies most pairs, and builds the dense mask once per spec."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnmask as am
from attnmask.attention import _prepare_call
from attnmask.backends import _clib, _common, banded, blocksparse, sdpa
from tests.helpers import counted_in
from tests.naive import naive_attention, naive_dense

A = importlib.import_module("attnmask.attention")  # the module; `attnmask.attention` is the function


def qkv(batch=3, length=64, heads=4, kv_heads=2, dim=16, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((batch, heads, length, dim), (batch, kv_heads, length, dim), (batch, kv_heads, length, dim))
    return [torch.randn(s, generator=gen).requires_grad_(requires_grad) for s in shapes]


def packed(lens_per_row, length):
    """``causal() & document(doc_ids)``, ids from document lengths per row, -1 after the last document."""
    rows = []
    for lens in lens_per_row:
        ids = torch.full((length,), -1, dtype=torch.long)
        at = 0
        for i, n in enumerate(lens):
            ids[at : at + n] = i
            at += n
        rows.append(ids)
    return am.causal() & am.document(doc_ids=torch.stack(rows))


def call(spec, **shape):
    q, k, v = qkv(**shape)
    return _prepare_call(q, k, v, spec, None, None, None)


# ---------------------------------------------------------------------------------------------------------------------
# The allowed-pair count


@st.composite
def documents_spec(draw):
    length = draw(st.integers(1, 24))
    batch = draw(st.integers(1, 3))
    rows = []
    for _ in range(batch):
        lens, left = [], length
        while left and draw(st.booleans()) or not lens and left:
            n = draw(st.integers(1, left))
            lens.append(n)
            left -= n
        rows.append(lens)
    base = draw(st.sampled_from([am.causal(), am.full(), *(am.sliding_window(w) for w in (1, 2, 5))]))
    return base & packed(rows, length).parts[1], length


@st.composite
def padded_spec(draw):
    """Padding anywhere (left, right or scattered), under causal, full or a window; sometimes two padding masks."""
    length = draw(st.integers(1, 24))
    batch = draw(st.integers(1, 3))
    masks = []
    for _ in range(draw(st.integers(1, 2))):
        bits = draw(st.lists(st.lists(st.booleans(), min_size=length, max_size=length), min_size=batch, max_size=batch))
        masks.append(am.key_padding(torch.tensor(bits, dtype=torch.long)))
    base = draw(st.sampled_from([am.causal(), am.full(), *(am.sliding_window(w) for w in (1, 2, 5))]))
    for m in masks:
        base = base & m
    return base, length


@pytest.mark.parametrize("where", ["c", "numpy"])
def test_allowed_fraction_equals_the_fraction_of_the_naive_dense_mask(where):
    @settings(max_examples=120, deadline=None)
    @given(st.one_of(documents_spec(), padded_spec()))
    def check(case):
        spec, length = case
        batch = spec.batch_size
        got = _common.allowed_fraction(call(spec, batch=batch, length=length))
        want = naive_dense(spec, length, length, batch).double().mean().item()
        assert got == pytest.approx(want, abs=1e-12)

    with counted_in(where):
        check()


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 700),
    st.integers(1, 800),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_allowed_fraction_counts_the_same_in_c_and_in_numpy_on_long_rows(rows, length, window, causal, seed):
    """Rows of up to 700 tokens (the naive dense comparison above stops at 24): random runs of ids, some negative,
    some repeated apart, and random padding, every window; the two forms of each count agree exactly."""
    if isinstance(_clib.library(), str):
        pytest.skip(_clib.library())
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, 6, (rows, length), generator=gen).repeat_interleave(7, dim=1)[:, :length]
    real = torch.rand(rows, length, generator=gen) < 0.7
    window = min(window, length)
    assert _common._counted("attnmask_run_pairs", ids, torch.int64, length, window, causal) == _common._run_pairs(
        ids.numpy(), window, causal
    )
    assert _common._counted("attnmask_real_pairs", real, torch.bool, length, window, causal) == _common._real_pairs(
        [real], length, window, causal
    )


@pytest.mark.parametrize("where", ["c", "numpy"])
def test_allowed_fraction_reads_strided_ids_and_padding_through_their_strides(where):
    """Views the C count walks through element strides: every other column of wider ids, a transposed padding mask,
    rows broadcast from one (stride 0), and ids longer than the call's rows."""
    wide = packed([[5, 9, 2], [16], [1, 1, 1, 3]], 32).parts[1].doc_ids  # (3, 32)
    pad = torch.rand(16, 3, generator=torch.Generator().manual_seed(1)) < 0.6  # transposed below: (3, 16)
    cases = [
        am.causal() & am.document(doc_ids=wide[:, ::2]),
        am.full() & am.document(doc_ids=wide[:, ::2]),
        am.sliding_window(3) & am.document(doc_ids=wide[:, 16:]),
        am.causal() & am.key_padding(pad.t()),
        am.sliding_window(4) & am.key_padding(pad.t()),
        am.causal() & am.key_padding(pad.t()[:1].expand(3, 16)),
    ]
    assert not cases[0].parts[1].doc_ids.is_contiguous() and not cases[3].parts[1].attention_mask.is_contiguous()
    for spec in cases:
        with counted_in(where):
            got = _common.allowed_fraction(call(spec, batch=3, length=16))
        want = naive_dense(spec, 16, 16, 3).double().mean().item()
        assert got == pytest.approx(want, abs=1e-12), spec


def test_allowed_fraction_with_the_library_never_reaches_numpy(monkeypatch):
    with counted_in("c"):
        monkeypatch.setattr(_common, "_run_pairs", None)  # calling either would raise
        monkeypatch.setattr(_common, "_real_pairs", None)
        assert _common.allowed_fraction(call(packed([[30, 34]], 64), batch=1)) == (30 * 31 + 34 * 35) / 2 / 64**2
        spec = am.causal() & am.key_padding(torch.arange(64)[None] < 40)
        assert _common.allowed_fraction(call(spec, batch=1)) == 40 * 41 / 2 / 64**2 + 40 * 24 / 64**2


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 40), st.integers(1, 39), st.booleans())
def test_allowed_fraction_of_a_window_alone_equals_the_naive_dense_mask(length, window, with_causal):
    spec = am.sliding_window(window)
    spec = am.causal() & spec if with_causal else spec
    got = _common.allowed_fraction(call(spec, batch=2, length=length))
    if window >= length:  # the window reaches every earlier key: causal, which sdpa runs as is
        assert got is None
        return
    want = naive_dense(spec, length, length, 1).double().mean().item()
    assert got == pytest.approx(want, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 3),
    kv_len=st.integers(1, 40),
    data=st.data(),
    base=st.sampled_from(["causal", "full", "causal window 3", "full window 5", "causal, two paddings"]),
)
def test_allowed_fraction_of_a_decoding_step_equals_the_naive_dense_mask(rows, kv_len, data, base):
    """The last ``Q < K`` positions of padded rows (a decoding step against a cache, a chunk of a prefill): the pairs
    the bottom-right queries allow, as the naive mask counts them."""
    q_len = data.draw(st.integers(1, kv_len))
    seed = data.draw(st.integers(0, 2**16))
    real = (torch.rand(rows, kv_len, generator=torch.Generator().manual_seed(seed)) > 0.3).long()
    structure = {
        "causal": am.causal(),
        "full": am.full(),
        "causal window 3": am.causal() & am.sliding_window(3),
        "full window 5": am.full() & am.sliding_window(5),
        "causal, two paddings": am.causal() & am.key_padding(real.flip(0)),
    }[base]
    spec = structure & am.key_padding(real)
    q = torch.randn(rows, 2, q_len, 4)
    k = torch.randn(rows, 2, kv_len, 4)
    got = _common.allowed_fraction(_prepare_call(q, k, k, spec, None, None, None))
    want = naive_dense(spec, q_len, kv_len, rows).double().mean().item()
    assert got == pytest.approx(want, abs=1e-12)


def test_a_decoding_step_on_a_short_cache_takes_the_stock_path():
    """One new token against a cache of 128 left-padded keys (what ``generate`` calls every step): stock SDPA's one
    call, decided without planning the other backends (the costs had planned every backend each step: a tiny Llama's
    generation 2.71 -> 1.99 ms a token, RESULTS.md, issue 15, "Decoding steps take the stock path")."""
    real = torch.ones(8, 128, dtype=torch.long)
    real[:, :10] = 0
    spec = am.causal() & am.key_padding(real)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(8, 4, 1, 16, generator=gen)
    k, v = (torch.randn(8, 2, 128, 16, generator=gen) for _ in range(2))
    explanation = am.explain(q, k, v, spec)
    assert explanation.picked == "sdpa" and explanation.stock
    allowed = naive_dense(spec, 1, 128, 8).unsqueeze(1)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    assert torch.equal(am.attention(q, k, v, spec), want)
    ids = torch.arange(128).div(16, rounding_mode="floor").expand(8, 128)
    q, k, v = torch.randn(8, 16, 1, 128), torch.randn(8, 16, 128, 128), torch.randn(8, 16, 128, 128)
    assert not am.explain(q, k, v, am.causal() & am.document(doc_ids=ids)).stock  # documents, Q < K: the costs decide
    tiny = [t[:, :4, :, :16] for t in (q, k, v)]  # 8·4·1·128·32 = 131,072 multiply-adds: not counted, stock
    assert am.explain(*tiny, am.causal() & am.document(doc_ids=ids)).stock
    assert A._STOCK_TINY_WORK >= 8 * 4 * 1 * 128 * 32 and 8 * 16 * 128 * 256 > A._STOCK_TINY_WORK


@pytest.mark.parametrize(
    "case, stock",
    [
        ("left padding, one query", True),
        ("left padding, 4 queries", True),
        ("plain causal, 8 queries", True),
        ("no mask, one query", True),
        ("left padding, 17 queries", False),  # not a decoding step: the costs decide
        ("padding over a quarter of the keys", False),  # under _STOCK_DECODE_MIN_FRACTION
        ("sliding window 64", False),  # a narrow band of a long row: the costs decide
        ("heads of 128", False),  # D + Dv over _STOCK_MAX_WIDTH
        ("bfloat16", False),  # one half-precision query: slow in torch's kernel without AMX tiles
    ],
)
def test_a_decoding_step_on_a_long_cache_takes_the_stock_path_where_it_sees_most_keys(case, stock):
    """A decoding step (at most 16 queries) against a cache of 1,000 keys takes stock SDPA without planning the others
    where its spec allows at least 0.8 of the pairs; the result is the dense mask's either way."""
    B, K = 4, 1000
    real = torch.ones(B, K, dtype=torch.long)
    real[:, : 300 if "quarter" in case else 50] = 0
    q_len = {"4 queries": 4, "17 queries": 17, "8 queries": 8}.get(case.split(", ")[-1], 1)
    D = 128 if "128" in case else 16
    spec = {
        "plain causal, 8 queries": am.causal(),
        "no mask, one query": None,
        "sliding window 64": am.sliding_window(64) & am.key_padding(real),
    }.get(case, am.causal() & am.key_padding(real))
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    q = torch.randn(B, 4, q_len, D, generator=gen).to(dtype)
    k, v = (torch.randn(B, 2, K, D, generator=gen).to(dtype) for _ in range(2))
    explanation = am.explain(q, k, v, spec)
    assert explanation.stock == stock and (not stock or explanation.picked == "sdpa")
    allowed = torch.ones(B, 1, q_len, K, dtype=torch.bool) if spec is None else naive_dense(spec, q_len, K, B)[:, None]
    want = naive_attention(q.double(), k.double(), v.double(), allowed)
    tolerance = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(am.attention(q, k, v, spec).double(), want, **tolerance)


@pytest.mark.parametrize("tiles", [True, False], ids=["amx", "other"])
@pytest.mark.parametrize("q_len", [1, 16])
def test_a_large_decoding_step_is_left_to_the_costs_on_a_cpu_without_tiles(monkeypatch, tiles, q_len):
    """A decoding step of more than ``_STOCK_DECODE_WORKS`` multiply-adds that ``native`` runs takes the costs on a
    CPU without AMX tiles (the AMD EPYC's fit, where native ran such steps 1.3-2.0x faster than SDPA) and the stock
    rule on one with them; under the bound, or where native cannot run it, the rule holds on both. The output is the
    textbook formula's either way."""
    monkeypatch.setattr(_common, "cpu_has_amx_bf16", lambda: tiles)
    B, K, D = 4, 2048, 64
    real = torch.ones(B, K, dtype=torch.long)
    real[:, :100] = 0
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(B, 8, q_len, D, generator=gen)
    k, v = (torch.randn(B, 2, K, D, generator=gen) for _ in range(2))
    assert B * 8 * q_len * K * 2 * D > A._STOCK_DECODE_WORKS[1]
    spec = am.causal() & am.key_padding(real)
    assert am.explain(q, k, v, spec).stock == tiles
    small = [t[:, :, :, :8] for t in (q, k, v)]  # D = 8: 4 x 8 x 2,048 x 16 = 1M multiply-adds a query
    assert B * 8 * K * 16 <= A._STOCK_DECODE_WORKS[1] < 16 * B * 8 * K * 16
    assert am.explain(*small, spec).stock == (tiles or q_len == 1)
    holes = real.clone()
    holes[:, 500] = 0  # a hole in the real keys: no varlen form, native cannot run it
    assert am.explain(q, k, v, am.causal() & am.key_padding(holes)).stock
    want = naive_attention(q.double(), k.double(), v.double(), naive_dense(spec, q_len, K, B)[:, None])
    torch.testing.assert_close(am.attention(q, k, v, spec).double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("q_len", [1, 4, 16, 17])
@pytest.mark.parametrize("mask", ["none", "padding", "bool per row", "bool per head"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("K", [300, 256])
def test_sdpa_folds_grouped_query_heads_into_the_queries_of_a_short_call(monkeypatch, q_len, mask, grad, K):
    """Grouped-query attention with at most 16 queries against more than 256 keys: one SDPA call of
    ``(B, Hkv, rep·Q, D)`` queries without ``enable_gqa`` (which reads every key once per query head), equal to the
    float64 reference, outputs and gradients; more queries, a mask per head, or rows of at most 256 keys (the stock
    rule's, stock SDPA bit for bit) keep ``enable_gqa``."""
    B, H, Hkv, D = 3, 8, 2, 16
    gen = torch.Generator().manual_seed(q_len)
    real = torch.ones(B, K, dtype=torch.long)
    real[0, :7] = 0
    real[2, : K - 3] = 0  # its first queries see no key when Q > 3
    spec = {
        "none": None,
        "padding": am.causal() & am.key_padding(real),
        "bool per row": torch.rand(B, 1, q_len, K, generator=gen) > 0.4,
        "bool per head": torch.rand(B, H, q_len, K, generator=gen) > 0.4,
    }[mask]
    q = torch.randn(B, H, q_len, D, generator=gen).requires_grad_(grad)
    k, v = (torch.randn(B, Hkv, K, D, generator=gen).requires_grad_(grad) for _ in range(2))
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def recording(query, *args, **kwargs):
        calls.append((tuple(query.shape), kwargs.get("enable_gqa", False)))
        return real_sdpa(query, *args, **kwargs)

    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", recording)
    got = am.attention(q, k, v, spec, backend="sdpa")
    folded = q_len <= sdpa._FOLD_MAX_QUERIES and mask != "bool per head" and K > 256
    assert calls[-1] == (((B, Hkv, 4 * q_len, D), False) if folded else ((B, H, q_len, D), True))
    if spec is None:
        allowed = torch.ones(B, 1, q_len, K, dtype=torch.bool)
    elif isinstance(spec, torch.Tensor):
        allowed = spec
    else:
        allowed = naive_dense(spec, q_len, K, B).unsqueeze(1)
    inputs = [t.detach().double().requires_grad_(grad) for t in (q, k, v)]
    want = naive_attention(*inputs, allowed)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    if grad:
        weight = torch.randn(got.shape, generator=gen, dtype=torch.float64)
        for g, w in zip(
            torch.autograd.grad((got.double() * weight).sum(), (q, k, v)),
            torch.autograd.grad((want * weight).sum(), inputs),
            strict=True,
        ):
            torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-3)


def test_sdpa_folds_a_mask_repeated_per_query_head_only_within_its_memory_bound(monkeypatch):
    """The fold repeats the mask per query head: a copy of rep times its size for several queries, kept under
    ``_FOLD_MAX_MASK_BYTES`` (past it the grouped kernel runs as given); one query's repeat is a view, always folded."""
    monkeypatch.setattr(sdpa, "_FOLD_MAX_MASK_BYTES", 1024)
    real = torch.ones(2, 300, dtype=torch.long)
    real[0, :9] = 0
    spec = am.causal() & am.key_padding(real)
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def recording(query, *args, **kwargs):
        calls.append(kwargs.get("enable_gqa", False))
        return real_sdpa(query, *args, **kwargs)

    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", recording)
    for q_len, folded in ((1, True), (4, False)):
        q = torch.randn(2, 8, q_len, 16)
        k, v = torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16)
        got = am.attention(q, k, v, spec, backend="sdpa")
        assert calls[-1] is not folded
        want = naive_attention(q.double(), k, v, naive_dense(spec, q_len, 300, 2).unsqueeze(1))
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


def test_allowed_fraction_is_none_for_specs_without_a_varlen_form_or_with_explicit_positions():
    assert _common.allowed_fraction(call(am.causal() & am.chunked(8), batch=1)) is None
    q, k, v = qkv(batch=1)
    positions = torch.arange(64)
    spec = packed([[30, 34]], 64)
    assert _common.allowed_fraction(_prepare_call(q, k, v, spec, None, positions, positions)) is None


# ---------------------------------------------------------------------------------------------------------------------
# The stock path


def test_auto_runs_stock_sdpa_on_small_rows_with_the_same_output_bit_for_bit():
    spec = packed([[40, 24], [64], [20, 20, 10]], 64)  # the last row ends with 14 padding queries: no key
    q, k, v = qkv()
    explanation = am.explain(q, k, v, spec)
    assert explanation.picked == "sdpa" and explanation.stock and "stock SDPA" in str(explanation)
    allowed = naive_dense(spec, 64, 64, 3).unsqueeze(1)
    has_key = allowed.any(-1, keepdim=True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has_key, enable_gqa=True)
    got = am.attention(q, k, v, spec)
    assert torch.equal(got, want.masked_fill(~has_key, 0.0))
    assert not bool(got[2, :, 50:].any())


def test_auto_runs_stock_sdpa_on_a_small_row_with_a_wide_window():
    """A window allowing at least a fifth of the pairs on rows of at most ``_STOCK_MAX_KEYS`` (128) keys takes the
    stock path (rows of 256, window 128, one thread: the costs had once picked banded, 2.65x slower than SDPA); a
    narrow one is left to the costs, and so are rows of 256 since native's blocked form (native 1.16-1.30x faster than
    SDPA on windows of half a row of 256 at D = 16-64, RESULTS.md, issue 15, "native's blocked form")."""
    q, k, v = qkv(length=128)
    wide, narrow = am.sliding_window(64), am.sliding_window(8)
    explanation = am.explain(q, k, v, wide)
    assert explanation.picked == "sdpa" and explanation.stock
    assert not am.explain(*qkv(length=256), am.sliding_window(128)).stock
    allowed = naive_dense(wide, 128, 128, 1).unsqueeze(1)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    assert torch.equal(am.attention(q, k, v, wide), want)
    assert not am.explain(q, k, v, narrow).stock


def test_rows_past_128_keys_keep_the_stock_rule_only_where_native_cannot_run_the_call():
    """On rows of 129-256 keys a masked call goes to the costs where ``"native"`` can run it (its blocked form beat
    SDPA there; right padding too since its padding queries join the row's segment: 1.39x stock's forward on 8
    rows of 256), and keeps the stock rule where it cannot (padding with a hole inside a row), for a decoding step and
    for a call too small to plan (at most ``_STOCK_TINY_WORK`` multiply-adds); rows of at most 128 keys keep it either
    way."""
    real = (torch.arange(256)[None] < torch.tensor([[256], [200], [150]])).long()
    right_padded = am.causal() & am.key_padding(real)
    documents = packed([[180, 76], [256], [100, 100, 56]], 256)
    q, k, v = qkv(length=256)
    assert A._native_runs(A._prepare_call(q, k, v, documents, None, None, None), tuple(A._BACKENDS.values()))
    assert not am.explain(q, k, v, documents).stock
    padded = am.explain(q, k, v, right_padded)
    assert not padded.stock and not dict(zip(padded.backends, padded.reasons, strict=True))["native"]
    holes = real.clone()
    holes[1, 100:120] = 0
    holed = am.explain(q, k, v, am.causal() & am.key_padding(holes))
    assert holed.stock and holed.picked == "sdpa"
    assert "holes" in str(dict(zip(holed.backends, holed.reasons, strict=True))["native"])
    left = am.causal() & am.key_padding(real.flip(1))
    assert am.explain(q[:, :, -1:], k, v, left).stock  # a decoding step (one query) that native could run
    assert not am.explain(q, k, v, left).stock  # the whole rows: native runs left padding
    tiny = [t[:, :1, :, :2] for t in (q, k, v)]  # 3·1·256·256·4 = 786,432 multiply-adds: no pair count, no plan
    assert 3 * 256 * 256 * 4 <= A._STOCK_TINY_WORK and am.explain(*tiny, documents).stock


def test_the_stock_rule_leaves_wide_heads_to_the_costs():
    """Heads of ``D + Dv`` over ``_STOCK_MAX_WIDTH`` (128) on a masked small row are costed, not sent to stock SDPA (at
    D = 128 SDPA ran over 1.1x the fastest in 44 of 48 such head-size cells); D = 64 keeps the rule, as do plain
    ``causal()`` and no mask at any width (stock SDPA runs those with ``is_causal`` or nothing)."""
    spec = packed([[90, 38], [128], [50, 50, 28]], 128)
    for dim, stock in ((16, True), (64, True), (65, False), (128, False)):
        q, k, v = qkv(length=128, dim=dim)
        assert am.explain(q, k, v, spec).stock is stock, dim
        assert am.explain(q, k, v, am.causal()).stock and am.explain(q, k, v).stock
    q, k, v = qkv(length=128, dim=64)
    wide_values = torch.randn(3, 2, 128, 65)  # D + Dv = 129
    assert not am.explain(q, k, wide_values, spec).stock


def test_the_stock_rule_with_a_backward_leaves_heads_over_64_to_the_costs():
    """With a backward, heads of ``D + Dv`` over ``_STOCK_MAX_WIDTH_BACKWARD`` (64) on a masked small row are costed
    (at D = 64 SDPA ran over 1.1x the fastest in 19 of 48 such cells with a backward, the costs' pick in 5); the same
    call without a gradient, or under ``no_grad``, keeps the rule up to 128, and plain ``causal()`` keeps it at any
    width."""
    spec = packed([[90, 38], [128], [50, 50, 28]], 128)
    for dim, stock in ((16, True), (32, True), (33, False), (64, False)):
        q, k, v = qkv(length=128, dim=dim, requires_grad=True)
        assert am.explain(q, k, v, spec).stock is stock, dim
        assert am.explain(q, k, v, am.causal()).stock
        with torch.no_grad():
            assert am.explain(q, k, v, spec).stock is (dim <= 64), dim
    q, k, v = qkv(length=128, dim=64, requires_grad=True)
    first = am.attention(q, k, v, spec)  # the choice is cached per spec and call signature, the gradient included
    with torch.no_grad():
        assert am.explain(q, k, v, spec).stock
        torch.testing.assert_close(am.attention(q, k, v, spec), first.detach(), atol=1e-5, rtol=1e-5)


def test_stock_sdpa_gradients_match_sdpa_with_the_bool_mask():
    spec = packed([[40, 24], [64], [20, 44]], 64)
    q, k, v = qkv(requires_grad=True)
    allowed = naive_dense(spec, 64, 64, 3).unsqueeze(1)
    got = torch.autograd.grad(am.attention(q, k, v, spec).square().sum(), (q, k, v))
    want_out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    want = torch.autograd.grad(want_out.square().sum(), (q, k, v))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_auto_on_small_rows_plans_no_other_backend(monkeypatch):
    def refuse(call):
        pytest.fail("planned a backend that the stock path skips")

    for module, name in ((_common, "_build_varlen_plan"), (blocksparse, "_layout"), (banded, "_plan")):
        monkeypatch.setattr(module, name, refuse)
    q, k, v = qkv()
    am.attention(q, k, v, packed([[40, 24], [64], [30, 34]], 64))


def test_a_stock_choice_asks_neither_the_load_nor_the_rule_again_when_the_threads_change(monkeypatch):
    """The stock rule reads neither the thread count nor the load: its choice asks for neither (the load check costs
    ~30 us right after a kernel) and holds when the threads change, where a choice of the costs asks for the load and
    is remade."""
    asked, ruled = [], []
    monkeypatch.setattr(A._workers, "contended", lambda: asked.append(1) or False)
    stock = A._stock
    monkeypatch.setattr(A, "_stock", lambda *args: ruled.append(1) or stock(*args))
    before = torch.get_num_threads()
    stock_call, costs_call = call(packed([[40, 24], [64], [30, 34]], 64)), call(packed([[4] * 16] * 3, 64))
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            assert A.choose_backend(stock_call).name == "sdpa"
        assert ruled == [1] and not asked
        picks = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            picks.append(A.choose_backend(costs_call).name)
        assert len(ruled) == 3 and len(asked) >= 2  # decided at each thread count, the load asked each time
    finally:
        torch.set_num_threads(before)


def test_the_dense_mask_of_a_spec_is_built_once_for_every_layer(monkeypatch):
    built = []
    original = sdpa._build_spec_mask
    monkeypatch.setattr(sdpa, "_build_spec_mask", lambda *args: built.append(1) or original(*args))
    spec = packed([[40, 24], [64], [30, 34]], 64)
    q, k, v = qkv()
    first = am.attention(q, k, v, spec)
    assert torch.equal(am.attention(q, k, v, spec), first) and len(built) == 1


@pytest.mark.parametrize(
    "spec, length",
    [
        (packed([[4] * 16, [8] * 8, [4] * 16], 64), 64),  # tiny documents: a sixth of the pairs at most
        (packed([[300, 300], [600], [200, 400]], 600), 600),  # rows over 256 keys
    ],
    ids=["tiny-documents", "long-rows"],
)
def test_sparse_masks_and_long_rows_are_left_to_the_costs(spec, length):
    assert A._stock(call(spec, length=length), tuple(A._BACKENDS.values())) is None
    ex = am.explain(*qkv(length=length), spec)
    assert not ex.stock
    costs = {n: c for n, c, e in zip(ex.backends, ex.costs, ex.auto_eligible, strict=True) if c is not None and e}
    assert ex.picked == min(costs, key=costs.get)


# ---------------------------------------------------------------------------------------------------------------------
# Default positions shared between calls


def test_default_positions_are_shared_between_calls_and_rebuilt_after_a_write(monkeypatch):
    # an empty cache: one filled to _POSITIONS_KEPT by earlier tests in this process is cleared between the calls
    monkeypatch.setattr(A, "_POSITIONS", {})
    q, k, v = qkv(batch=2, length=16)
    spec = packed([[5, 11], [16]], 16)
    first = _prepare_call(q, k, v, spec, None, None, None)
    second = _prepare_call(q[:, :, 4:], k, v, spec, None, None, None)
    again = _prepare_call(q, k, v, spec, None, None, None)
    assert again.q_positions is first.q_positions and again.kv_positions is first.kv_positions
    assert second.q_positions.tolist() == list(range(4, 16)) and second.kv_positions.tolist() == list(range(16))
    first.q_positions.add_(100)  # a caller wrote into the shared tensor: the next call must not see it
    fresh = _prepare_call(q, k, v, spec, None, None, None)
    assert fresh.q_positions.tolist() == list(range(16)) and fresh.kv_positions.tolist() == list(range(16))
    out = am.attention(q, k, v, spec, backend="reference")
    torch.testing.assert_close(out, am.attention(q, k, v, spec, backend="sdpa"))


def test_default_positions_inside_inference_mode_are_not_shared_with_calls_outside():
    q, k, v = qkv(batch=1, length=8)
    with torch.inference_mode():
        inside = _prepare_call(q, k, v, am.causal(), None, None, None)
    outside = _prepare_call(q, k, v, am.causal(), None, None, None)
    assert inside.q_positions.is_inference() and not outside.q_positions.is_inference()
    assert outside.kv_positions.tolist() == list(range(8))


def test_c_arrays_are_long_enough_zeroed_and_keep_their_types():
    """``_clib.c_array``: at least the count asked for (by powers of two), the values first and zeros after, and the
    same type for every count up to the same power of two, kept (a type made anew per call became cyclic garbage)."""
    import ctypes
    import gc

    a = _clib.c_array(ctypes.c_int64, 5, [7, 8, 9])
    assert len(a) == 8 and list(a) == [7, 8, 9, 0, 0, 0, 0, 0]
    assert type(_clib.c_array(ctypes.c_int64, 6)) is type(a) and len(_clib.c_array(ctypes.c_double, 9)) == 16
    assert len(_clib.c_array(ctypes.c_double, 0)) == 1 and len(_clib.c_array(ctypes.c_double, 1)) == 1
    del a
    gc.collect()
    assert len(_clib.c_array(ctypes.c_int64, 7)) == 8 and gc.collect() == 0


@pytest.mark.parametrize("backend", ["auto", "native", "varlen", "blocksparse", "banded", "sdpa"])
@pytest.mark.parametrize("grad", [False, True])
def test_calls_leave_no_cyclic_garbage(backend, grad):
    """A call, planned anew or not, with or without a backward, leaves nothing for the cycle collector: garbage
    that only it frees (ctypes array types made per call did) costs its collections on every later call, and keeps
    what the cycles hold until one runs."""
    import gc

    specs = [packed([[40, 24, 64]] * 2, 128), packed([[100, 28]] * 2, 128), am.causal() & am.sliding_window(16)]
    q, k, v = qkv(batch=2, length=128, requires_grad=grad)
    for spec in specs:  # every backend's first call: its library, compiled code and caches
        out = am.attention(q, k, v, spec, backend=backend)
        if grad:
            out.sum().backward()
    gc.collect()
    gc.disable()
    try:
        for spec in [*specs, packed([[12, 50, 66]] * 2, 128)]:
            out = am.attention(q, k, v, spec, backend=backend)
            if grad:
                out.sum().backward()
        del out
        assert gc.collect() == 0
    finally:
        gc.enable()


@settings(max_examples=200, deadline=None)
@given(
    st.data(),
    st.integers(1, 3),
    st.integers(1, 40),
    st.sampled_from(["causal", "full", "window", "causal window", "two windows"]),
    st.integers(0, 2),
)
def test_a_padded_spec_is_made_dense_as_the_general_evaluation_makes_it(data, batch, kv_len, base, paddings):
    """``contract.dense_mask``'s direct form of ``[causal() | full()] & [sliding_window(w)] & [key_padding(m)...]``
    (the stock rule's decoding steps and padded rows): the last ``Q <= K`` positions, padding masks of one row or one
    per batch row, bool or int, strided, ANDed: bit for bit the general evaluation's (``MaskSpec.to_dense``) and the
    textbook rule's; explicit positions, a document or a longer query than keys take the general path."""
    from attnmask.backends import contract

    q_len = data.draw(st.integers(1, kv_len))
    w1, w2 = data.draw(st.integers(1, kv_len + 2)), data.draw(st.integers(1, kv_len + 2))
    spec = {
        "causal": am.causal(),
        "full": am.full(),
        "window": am.sliding_window(w1),
        "causal window": am.causal() & am.sliding_window(w1),
        "two windows": am.sliding_window(w1) & am.sliding_window(w2),
    }[base]
    for _ in range(paddings):
        rows = data.draw(st.sampled_from([1, batch]))
        real = torch.tensor(data.draw(st.lists(st.booleans(), min_size=rows * kv_len, max_size=rows * kv_len)))
        real = real.view(rows, kv_len)
        if data.draw(st.booleans()):
            real = real.long()
        if data.draw(st.booleans()):  # every other column of a wider tensor
            wide = torch.zeros(rows, 2 * kv_len, dtype=real.dtype)
            wide[:, ::2] = real
            real = wide[:, ::2]
        spec = spec & am.key_padding(real)
    if base == "full" and paddings == 0:
        spec = am.full() & am.full()
    q, k = torch.randn(batch, 2, q_len, 4), torch.randn(batch, 2, kv_len, 4)
    call = _prepare_call(q, k, k, spec, None, None, None)
    fast = contract._padded_band(call)
    assert fast is not None and fast.dtype == torch.bool
    general = spec.to_dense(q_len, kv_len).unsqueeze(1)
    assert fast.shape == general.shape and torch.equal(fast, general)
    assert torch.equal(contract.dense_mask(call)[0], fast)
    assert torch.equal(fast.expand(batch, 1, q_len, kv_len), naive_dense(spec, q_len, kv_len, batch)[:, None])
    positions = torch.arange(kv_len)
    explicit = _prepare_call(q, k, k, spec, None, positions[-q_len:], positions)
    assert contract._padded_band(explicit) is None
    docs = _prepare_call(q, k, k, spec & am.document(seq_lens=[kv_len]), None, None, None)
    assert contract._padded_band(docs) is None
