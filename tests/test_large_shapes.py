"""Every backend ``auto`` may pick on the CPU against the naive float64 reference on rows of up to 1,100 keys: past
the sizes where the backends change how they work (``blocksparse``'s tiles of 16 and 64 keys, torch's key blocks of
512, ``varlen``'s small documents up to 32 keys, ``native``'s query blocks, ``banded``'s bands), which the
conformance suite's small cases do not reach. Random structures (causal, full, windows, chunks, prefixes; packed
documents from 1 to 900 tokens, padding on either side; decoding steps with fewer queries than keys), GQA, float32,
float64 and bfloat16, with a gradient one time in three, and NaN at random entries of q, k or v one time in three
without one (a row with an allowed key is NaN exactly where its query, or a key or value it may see, holds one)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnmask as am
from attnmask.attention import _BACKENDS, _prepare_call
from tests.helpers import GRAD_TOLERANCE, TOLERANCE
from tests.naive import naive_attention

AUTO = [b for b in _BACKENDS.values() if "cpu" in b.devices and b.auto_on("cpu") and b.available() is None]


@st.composite
def lengths(draw, total: int) -> list[int]:
    """Document lengths filling ``total`` tokens: tiny, short, long and very long ones."""
    lens, left = [], total
    while left > 0:
        size = draw(st.sampled_from([(1, 8), (9, 40), (40, 300), (300, 900)]))
        lens.append(min(left, draw(st.integers(*size))))
        left -= lens[-1]
    return lens


@st.composite
def structure(draw, B: int, Q: int, K: int) -> am.MaskSpec:
    """A base rule, and with ``Q == K`` half the time packed documents (a padding tail one time in two) or padding."""
    base = draw(st.sampled_from(["causal", "full", "window", "chunked", "prefix"]))
    if base == "window":
        spec = am.sliding_window(draw(st.sampled_from([1, 2, 7, 16, 33, 64, 100, 257, 512])))
    elif base == "chunked":
        spec = am.causal() & am.chunked(draw(st.sampled_from([8, 16, 50, 64, 128, 300])))
    elif base == "prefix":
        spec = am.prefix_lm(draw(st.integers(0, K)))
    else:
        spec = am.causal() if base == "causal" else am.full()
    if Q != K or draw(st.booleans()):
        return spec
    if draw(st.booleans()):
        ids = torch.full((B, K), -1, dtype=torch.long)
        for b in range(B):
            start = 0
            for i, n in enumerate(draw(lengths(draw(st.sampled_from([K, draw(st.integers(1, K))]))))):
                ids[b, start : start + n] = i
                start += n
        return spec & am.document(doc_ids=ids)
    mask = torch.ones(B, K, dtype=torch.long)
    for b in range(B):
        n = draw(st.integers(0, K - 1))
        if draw(st.booleans()):
            mask[b, :n] = 0  # left padding
        else:
            mask[b, K - n :] = 0  # right padding
    return spec & am.key_padding(mask)


@st.composite
def large_case(draw):
    B, Hkv = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    H = Hkv * draw(st.sampled_from([1, 2, 4]))
    K = draw(st.one_of(st.integers(1, 40), st.integers(17, 150), st.integers(150, 600), st.integers(600, 1100)))
    Q = draw(st.one_of(st.just(K), st.just(K), st.sampled_from([1, 2, 5, 16]).map(lambda n: min(n, K))))
    D = draw(st.sampled_from([8, 16, 32, 64, 80]))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16]))
    grad = draw(st.integers(0, 2)) == 0
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q, k, v = (torch.randn(B, n, L, D, generator=gen).to(dtype) for n, L in ((H, Q), (Hkv, K), (Hkv, K)))
    clean = (q, k, v)
    if not grad and draw(st.integers(0, 2)) == 0:
        q, k, v = (t.clone() for t in clean)
        for _ in range(draw(st.integers(1, 3))):
            t = draw(st.sampled_from([q, k, v]))
            t[tuple(draw(st.integers(0, n - 1)) for n in t.shape)] = float("nan")
    return q, k, v, clean, draw(structure(B, Q, K)), grad


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    """One intra-op thread (the suite's default under xdist), or two: the backends' parallel paths (``native``'s
    query blocks, ``blocksparse``'s and ``varlen``'s workers) on the same cases."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(before)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=large_case())
def test_every_backend_equals_the_reference_on_large_rows(threads, case):
    q, k, v, clean, spec, grad = case
    B, H, Q, _ = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    allowed = spec.to_dense(Q, K).expand(B, Q, K).unsqueeze(1)  # (B, 1, Q, K)
    bad = (k.isnan().any(-1) | v.isnan().any(-1)).repeat_interleave(H // Hkv, 1)[:, :, None, :]  # (B, H, 1, K)
    has_key = allowed.any(-1).expand(B, H, Q)
    nan_rows = has_key & (q.isnan().any(-1) | (allowed & bad).any(-1))
    wide = [t.detach().double().requires_grad_(grad) for t in clean]  # the rows without NaN: the clean inputs'
    want = naive_attention(*wide, allowed)
    grad_out = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if grad:
        want_grads = torch.autograd.grad(want, wide, grad_out)
    ran = 0
    for backend in AUTO:
        if backend.not_supported_reasons(_prepare_call(q, k, v, spec, None, None, None)):
            continue
        inputs = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
        got = am.attention(*inputs, spec, backend=backend.name)
        assert torch.equal(got.isnan().any(-1), nan_rows), f"{backend.name}: NaN rows differ ({spec!r})"
        atol, rtol = TOLERANCE[q.dtype]
        clean = ~nan_rows
        msg = f"{backend.name} on {spec!r}"
        torch.testing.assert_close(got[clean].double(), want[clean].detach(), atol=atol, rtol=rtol, msg=msg)
        if grad:
            got.backward(grad_out.to(got.dtype))
            atol, rtol = GRAD_TOLERANCE[q.dtype]
            for t, expected in zip(inputs, want_grads, strict=True):
                torch.testing.assert_close(t.grad.double(), expected, atol=atol, rtol=rtol, msg=msg)
        ran += 1
    assert ran, f"no backend served {spec!r}"


def test_the_cases_reach_the_sizes_they_are_for():
    """The strategy draws rows past blocksparse's 256-key tile change and torch's 512-key blocks, and tiny ones."""
    sizes = []

    @settings(max_examples=60, deadline=None, database=None)
    @given(case=large_case())
    def collect(case):
        sizes.append(case[1].shape[2])  # K

    collect()
    assert max(sizes) > 600 and min(sizes) < 32, sizes
