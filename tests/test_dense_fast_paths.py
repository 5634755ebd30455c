"""The byte-level dense-mask paths (``attnmask._dense.compare``, ``fold``, ``and_into``, ``zero_rows``) give
exactly what the plain torch operations give, for every value range, dtype and broadcast shape, bit for bit."""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnmask as am

D = importlib.import_module("attnmask._dense")

OPS = (torch.eq, torch.le, torch.lt, torch.ge, torch.gt)
# Value ranges inside one byte's span (wherever it lies) and wider ones.
RANGES = ((0, 200), (-5, 250), (-128, 127), (2**40, 2**40 + 255), (-30000, 30000), (-(2**40), 2**40))


@settings(max_examples=60, deadline=None)
@given(
    op=st.sampled_from(OPS),
    bounds=st.sampled_from(RANGES),
    rows=st.sampled_from((1, 3)),
    q=st.integers(1, 700),
    k=st.integers(1, 700),
    seed=st.integers(0, 2**16),
)
def test_compare_equals_the_torch_comparison(op, bounds, rows, q, k, seed):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = bounds
    a = torch.randint(lo, hi + 1, (rows, q, 1), generator=gen)
    b = torch.randint(lo, hi + 1, (1, 1, k), generator=gen)
    n = min(a.numel(), k // 2)
    b[0, 0, :n] = a.flatten()[:n]  # equal values occur
    want = op(a, b)
    got = D.compare(op, a, b)
    assert got.dtype == torch.bool and got.shape == want.shape and torch.equal(got, want)


def test_compare_takes_the_byte_path_above_the_threshold_and_is_exact_there(monkeypatch):
    """A result of at least FAST_MIN_ELEMENTS whose operands span at most 256 values (wherever they lie) goes through
    uint8 and equals the plain comparison; so does one whose span is wider (which does not)."""
    seen = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        if args and isinstance(args[0], torch.dtype):
            seen.append(args[0])
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    n = D.FAST_MIN_ELEMENTS // 512 + 1  # rows of 512 keys: a result above the threshold
    for (lo, hi), narrowed in (((0, 255), True), ((-1, 254), True), ((2**40, 2**40 + 255), True), ((-1, 255), False)):
        seen.clear()
        a = torch.randint(lo, hi + 1, (n, 1))
        b = torch.cat([a[: min(n, 256), 0], torch.tensor([lo, hi]), torch.randint(lo, hi + 1, (512,))])[:512]
        b = b.view(1, -1)
        for op in OPS:
            assert torch.equal(D.compare(op, a, b), op(a, b))
        assert (torch.uint8 in seen) == narrowed, (lo, hi, seen)


def test_compare_leaves_floats_bools_and_mixed_dtypes_to_torch():
    a, b = torch.rand(200, 1), torch.rand(1, 200)
    assert torch.equal(D.compare(torch.lt, a, b), a < b)
    ai, bi = torch.arange(200).view(-1, 1), torch.arange(200, dtype=torch.int32).view(1, -1)
    assert torch.equal(D.compare(torch.ge, ai, bi), ai >= bi)


@pytest.mark.parametrize("op", [torch.logical_and, torch.logical_or])
def test_fold_as_bytes_treats_any_nonzero_byte_as_true(op):
    """A bool tensor whose bytes are not 0 / 1 (a view of other bytes) still folds as logical and / or."""
    gen = torch.Generator().manual_seed(1)
    raw = [torch.randint(0, 4, shape, generator=gen, dtype=torch.uint8) for shape in [(3, 64, 1), (1, 64, 300)]]
    parts = [r.view(torch.bool) for r in raw]
    want = op(raw[0] != 0, raw[1] != 0)
    got = D.fold(op, parts)
    assert torch.equal(got.view(torch.uint8) != 0, want)


@pytest.mark.parametrize("grad", [False, True])
def test_zero_rows_zeroes_exactly_the_empty_rows(grad):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(3, 4, 50, 8, generator=gen)
    empty = torch.rand(3, 1, 50, 1, generator=gen) < 0.3
    x = base.clone().requires_grad_(grad)
    src = x * 1.0 if grad else x
    got = D.zero_rows(src, empty)
    want = base.masked_fill(empty, 0.0)
    assert torch.equal(got, want) and torch.equal(got.view(torch.int32), want.view(torch.int32))
    if grad:
        got.sum().backward()
        assert torch.equal(x.grad, (~empty).expand_as(base).float())
    else:
        assert got is x  # in place


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    length=st.sampled_from((130, 380, 520)),
    window=st.integers(1, 600),
    prefix=st.integers(0, 600),
)
def test_large_specs_equal_the_per_element_predicate(seed, length, window, prefix):
    """Every structural part on rows large enough for the byte paths equals its predicate written per element."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2
    ids = torch.randint(0, 4, (rows, length), generator=gen).sort(dim=1).values
    ids[:, length - 7 :] = -1
    pad = (torch.rand(rows, length, generator=gen) > 0.2).long()
    pos = torch.arange(length)
    qp, kp = pos.view(1, -1, 1), pos.view(1, 1, -1)
    same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0)
    cases = {
        am.causal(): kp <= qp,
        am.sliding_window(window): (qp - kp >= 0) & (qp - kp < window),
        am.local_window(window, 3): (qp - kp <= window) & (qp - kp >= -3),
        am.chunked(window): qp // window == kp // window,
        am.prefix_lm([prefix, prefix // 2]): (kp <= qp) | (kp < torch.tensor([prefix, prefix // 2]).view(-1, 1, 1)),
        am.document(doc_ids=ids): same,
        am.causal() & am.document(doc_ids=ids) & am.key_padding(pad): (kp <= qp) & same & pad.bool()[:, None, :],
    }
    for spec, want in cases.items():
        want = torch.broadcast_to(want, (rows if spec.batch_size else 1, length, length))
        assert torch.equal(spec.to_dense(length), want), spec
        buffer = torch.ones(want.shape, dtype=torch.bool)  # the caller's buffer (out=): every element rewritten
        assert spec.to_dense(length, out=buffer) is buffer and torch.equal(buffer, want), spec
        bias = spec.to_additive(length, dtype=torch.bfloat16)
        assert torch.equal(bias[:, 0] == 0, want), spec


FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(FLOATS),
    denied=st.sampled_from((float("-inf"), "min", -1.0, -0.0, 3.5)),
    shape=st.lists(st.integers(0, 9), min_size=1, max_size=4),
    strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_additive_equals_where_bit_for_bit(dtype, denied, shape, strided, seed):
    """``additive`` (integer bits on CPU) gives exactly ``torch.where(allowed, 0, denied)``: every float dtype, any
    denied value (``finfo.min``, ``-0.0``, a positive one), empty, transposed and broadcast (stride 0) masks."""
    gen = torch.Generator().manual_seed(seed)
    denied = torch.finfo(dtype).min if denied == "min" else denied
    allowed = torch.rand(shape, generator=gen) < 0.5
    if strided and allowed.dim() >= 2:
        allowed = allowed.transpose(0, -1)
    elif strided and allowed.numel():
        allowed = allowed[:1].expand(5)
    want = torch.where(allowed, torch.zeros((), dtype=dtype), torch.full((), denied, dtype=dtype))
    got = D.additive(allowed, dtype, denied)
    assert got.dtype == dtype and got.shape == want.shape
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[want.element_size()]  # -0.0 and 0.0 differ here
    assert torch.equal(got.view(bits), want.view(bits))


def test_additive_takes_the_integer_path_on_cpu_and_where_elsewhere(monkeypatch):
    """On CPU the mask is built without ``torch.where`` (the slow bool-condition kernel); traced, it is ``where``."""
    calls = []
    real_where = torch.where
    monkeypatch.setattr(torch, "where", lambda *a, **k: calls.append(1) or real_where(*a, **k))
    allowed = torch.tensor([[True, False], [False, True]])
    assert torch.equal(D.additive(allowed, torch.float32), real_where(allowed, 0.0, float("-inf")))
    assert calls == []
    monkeypatch.setattr(D, "_on_cpu", lambda parts: False)
    assert torch.equal(D.additive(allowed, torch.bfloat16), real_where(allowed, 0.0, float("-inf")).bfloat16())
    assert calls == [1]
