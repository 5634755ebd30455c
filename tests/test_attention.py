"""attention(): every backend equals the float64 naive reference, empty rows give exact zeros, bad input is named."""

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnmask as am
from attnmask.backends import sdpa as sdpa_backend
from attnmask.backends._common import pair_width
from tests.helpers import (
    LOW_PRECISION,
    allowed_of,
    assert_matches_reference,
    call_of,
    left_padded_problem,
    make_qkv,
)
from tests.naive import naive_attention
from tests.strategies import attention_case

A = importlib.import_module("attnmask.attention")  # the module; `attnmask.attention` is the function
# ---------------------------------------------------------------------------------------------------------------------
# Equality with the naive reference


@given(case=attention_case())
def test_every_backend_matches_naive_attention_on_random_specs(case):
    q, k, v = make_qkv(case)
    got = am.attention(q, k, v, case["spec"])
    want = naive_attention(q, k, v, allowed_of(case))
    assert got.shape == want.shape and got.dtype == torch.float32
    assert_matches_reference(got, want, msg=repr(case["spec"]))


# ---------------------------------------------------------------------------------------------------------------------
# Rows with no allowed key


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
def test_gradients_stay_finite_with_empty_rows_in_the_batch(dtype):
    (q, k, v), spec = left_padded_problem(dtype)
    out = am.attention(q, k, v, spec)
    dq, dk, dv = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.equal(dq[0, :, :3], torch.zeros_like(dq[0, :, :3]))
    assert (dk[0, :, 3:] != 0).any()


def _packed_with_padding(dtype, gqa=False):
    """8 rows of 96 tokens, 1-3 documents and some trailing padding each (padding queries see no key)."""
    gen = torch.Generator().manual_seed(11)
    ids = torch.full((8, 96), -1)
    for r in range(8):
        used = int(torch.randint(40, 97, (), generator=gen))
        cut = int(torch.randint(1, used, (), generator=gen))
        ids[r, :cut], ids[r, cut:used] = 0, 1
    q = torch.randn(8, 4, 96, 16, generator=gen).to(dtype).requires_grad_()
    k, v = (torch.randn(8, 2 if gqa else 4, 96, 16, generator=gen).to(dtype).requires_grad_() for _ in range(2))
    return (q, k, v), am.causal() & am.document(doc_ids=ids), ids < 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW_PRECISION])
@pytest.mark.parametrize("gqa", [False, True])
def test_sdpa_leaves_empty_rows_to_the_fused_kernel_where_it_zeroes_them(monkeypatch, dtype, gqa):
    """Where torch's fused CPU kernel zeroes a row of -inf itself (probed once per dtype), the sdpa backend builds
    no zeroing: the output and the query gradient equal the zeroing path's bit for bit, the key / value gradients up
    to rounding, the empty rows and their gradient are exactly 0, and all match the naive reference. Where the probe
    finds the kernel does not (float64 on an AMD EPYC: the kept rows' outputs moved by an ulp when rows were left out,
    so the probe cannot tell), the backend zeroes the rows itself and there is nothing to compare."""
    if not sdpa_backend._probe_empty_rows(dtype):
        pytest.skip(f"the probe finds torch's fused CPU kernel does not zero empty rows exactly in {dtype} here")
    (q, k, v), spec, empty = _packed_with_padding(dtype, gqa)
    grad = torch.randn(q.shape[:3] + (16,)).to(dtype)
    runs = {}
    for leaves in (True, False):
        if not leaves:
            monkeypatch.setattr(sdpa_backend, "_kernel_zeroes_empty_rows", lambda call: False)
        inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        fresh = am.causal() & am.document(doc_ids=spec.parts[1].doc_ids.clone())
        out = am.attention(*inputs, fresh, backend="sdpa")
        runs[leaves] = (out, *torch.autograd.grad(out, inputs, grad))
    monkeypatch.undo()
    (out, dq, dk, dv), (out_z, dq_z, dk_z, dv_z) = runs[True], runs[False]
    assert torch.equal(out, out_z) and torch.equal(dq, dq_z)
    tolerance = {} if dtype in (torch.float32, torch.float64) else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(dk, dk_z, **tolerance)
    torch.testing.assert_close(dv, dv_z, **tolerance)
    rows = empty[:, None, :].expand(-1, 4, -1)
    assert not out[rows].any() and not dq[rows].any()
    want = naive_attention(q.detach(), k.detach(), v.detach(), spec.to_dense(96)[:, None])
    assert_matches_reference(out.detach(), want)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "autocast"])
def test_the_empty_row_probe_runs_its_backward_under_any_calling_context(monkeypatch, context):
    """The probe is first run by whichever call meets empty rows first, which may be an evaluation under ``no_grad``
    or inference mode, or a model under bfloat16 autocast (that would cast the float32 probe)."""
    enter = {
        "no_grad": torch.no_grad,
        "inference_mode": torch.inference_mode,
        "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    }[context]
    sdpa_backend._probe_empty_rows.cache_clear()
    monkeypatch.setattr(sdpa_backend, "_FUSED_ANSWERS", {})  # the kernel question is asked again, and the probe run
    (q, k, v), spec, empty = _packed_with_padding(torch.float32)
    try:
        with enter():
            out = am.attention(q.detach(), k.detach(), v.detach(), spec, backend="sdpa")
        assert sdpa_backend._probe_empty_rows.cache_info().currsize == 1
        assert sdpa_backend._probe_empty_rows(out.dtype)
    finally:
        sdpa_backend._probe_empty_rows.cache_clear()
    assert not out[empty[:, None, :].expand(-1, 4, -1)].any()


def test_sdpa_zeroes_empty_rows_itself_where_sdpa_runs_another_kernel(monkeypatch):
    """Under ``sdpa_kernel(MATH)`` the same spec object is not served the mask that left its empty rows to the fused
    kernel (cached beside it): the rows see every key and are zeroed, output and gradients finite."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    (q, k, v), spec, empty = _packed_with_padding(torch.float32)
    fused = am.attention(q, k, v, spec, backend="sdpa")
    assert sdpa_backend._kernel_zeroes_empty_rows(A._prepare_call(q, k, v, spec, None, None, None))
    with sdpa_kernel(SDPBackend.MATH):
        assert not sdpa_backend._kernel_zeroes_empty_rows(A._prepare_call(q, k, v, spec, None, None, None))
        math = am.attention(q, k, v, spec, backend="sdpa")
        grads = torch.autograd.grad(math.square().sum(), (q, k, v))
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    rows = empty[:, None, :].expand(-1, 4, -1)
    assert not math[rows].any() and not grads[0][rows].any()
    torch.testing.assert_close(math, fused)


def test_the_fused_kernel_question_is_asked_once_per_shape_and_strides(monkeypatch):
    """A fresh spec of a shape already seen is not asked about again (the answer is kept per shapes, strides, dtype,
    mask shape and flash switch, process-wide), while a key whose last dimension is strided, where SDPA cannot run
    its fused kernel, gets its own answer: its empty rows are zeroed by attnmask, output exactly 0."""
    asked = []
    ask = sdpa_backend._fused_zeroes_empty_rows
    monkeypatch.setattr(sdpa_backend, "_fused_zeroes_empty_rows", lambda call: asked.append(1) or ask(call))
    monkeypatch.setattr(sdpa_backend, "_FUSED_ANSWERS", {})
    (q, k, v), spec, empty = _packed_with_padding(torch.float32)
    q, k, v = (t.detach() for t in (q, k, v))
    fresh = [am.causal() & am.document(doc_ids=spec.tensors()[0].clone()) for _ in range(3)]
    outs = [am.attention(q, k, v, s, backend="sdpa") for s in fresh]
    assert len(asked) == 1 and all(torch.equal(out, outs[0]) for out in outs)
    strided_k = torch.stack([k, k], dim=-1)[..., 0]
    assert strided_k.stride(-1) == 2
    assert not sdpa_backend._kernel_zeroes_empty_rows(A._prepare_call(q, strided_k, v, fresh[0], None, None, None))
    assert len(asked) == 2
    out = am.attention(q, strided_k, v, fresh[0], backend="sdpa")
    assert not out[empty[:, None, :].expand(-1, 4, -1)].any()
    torch.testing.assert_close(out, outs[0])


def test_empty_rows_of_a_bool_tensor_mask_return_zero():
    q, k, v = (torch.randn(2, 2, 3, 4) for _ in range(3))
    mask = torch.ones(2, 2, 3, 3, dtype=torch.bool)
    mask[1, 0, 2] = False
    out = am.attention(q, k, v, mask)
    assert torch.equal(out[1, 0, 2], torch.zeros(4))
    assert_matches_reference(out, naive_attention(q, k, v, mask))


# ---------------------------------------------------------------------------------------------------------------------
# Masks given as tensors, positions and alignment


@pytest.mark.parametrize("shape", [(2, 4, 5, 7), (2, 1, 5, 7), (1, 4, 5, 7), (5, 7), (7,)])
def test_bool_tensor_masks_broadcast_like_torch(shape):
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 4, 5, 8, generator=gen), torch.randn(2, 2, 7, 8, generator=gen), torch.randn(2, 2, 7, 8)
    mask = torch.rand(shape, generator=gen) > 0.4
    got = am.attention(q, k, v, mask)
    assert_matches_reference(got, naive_attention(q, k, v, mask))


def test_no_mask_is_full_attention():
    q, k, v = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    full = torch.ones(4, 6, dtype=torch.bool)
    assert_matches_reference(am.attention(q, k, v), naive_attention(q, k, v, full))
    assert_matches_reference(am.attention(q, k, v, am.full()), naive_attention(q, k, v, full))


def test_more_queries_than_keys_work_without_a_spec():
    q, k, v = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    mask = torch.tensor([True, False, True])
    assert_matches_reference(am.attention(q, k, v, mask), naive_attention(q, k, v, mask))


def test_causal_with_fewer_queries_than_keys_is_bottom_right_aligned():
    q, k, v = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    got = am.attention(q, k, v, am.causal())
    bottom_right = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert_matches_reference(got, naive_attention(q, k, v, bottom_right))


@pytest.mark.parametrize(
    "q_len, kv_len, expect_is_causal, expect_mask", [(5, 5, True, False), (3, 5, False, True), (1, 5, False, False)]
)
def test_sdpa_is_causal_is_used_only_when_queries_equal_keys(monkeypatch, q_len, kv_len, expect_is_causal, expect_mask):
    """(1 query: the last position sees every key, so no mask at all. With a gradient, so that Q < K takes the masked
    call, not the forward-only split: test_sdpa_splits_bottom_right_causal_...)"""
    seen, original = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(sdpa_backend.F, "scaled_dot_product_attention", spy)
    q = torch.randn(1, 2, q_len, 4, requires_grad=True)
    k, v = torch.randn(1, 2, kv_len, 4), torch.randn(1, 2, kv_len, 4)
    out = am.attention(q, k, v, am.causal(), backend="sdpa").detach()
    q = q.detach()
    assert seen and seen[0].get("is_causal", False) == expect_is_causal
    assert (seen[0].get("attn_mask") is not None) == expect_mask
    assert_matches_reference(out, naive_attention(q, k, v, am.causal().to_dense(q_len, kv_len)))


@pytest.mark.parametrize(
    ("name", "expect_is_causal", "expect_mask"),
    [
        ("one document a row", True, False),
        ("padding that pads nothing", True, False),
        ("full, one document a row", False, False),
        ("a row of two documents", False, True),
        ("a row with one padding key", False, True),
        ("a window as wide as the row", False, True),
    ],
)
def test_sdpa_runs_whole_row_specs_as_is_causal_or_unmasked(monkeypatch, name, expect_is_causal, expect_mask):
    """A spec that allows, at the call's shape, exactly what ``causal()`` or ``full()`` would (each row one document
    of all its tokens; a padding mask of ones) runs SDPA's own ``is_causal`` / unmasked call, builds no mask and is
    priced as that call; one document short of that, or a padding key inside a row, keeps the masked call (a window,
    even one as wide as the row, is not read as whole rows). Values and gradients against the naive reference."""
    L = 300
    ones, holed = torch.ones(2, L, dtype=torch.long), torch.ones(2, L, dtype=torch.long)
    holed[1, 7] = 0  # a padding key inside row 1: not whole, nor one run of real tokens (``_padded_runs``)
    specs = {
        "one document a row": am.causal() & am.document(doc_ids=torch.zeros(2, L, dtype=torch.long)),
        "padding that pads nothing": am.causal() & am.key_padding(ones),
        "full, one document a row": am.full() & am.document(doc_ids=torch.zeros(2, L, dtype=torch.long)),
        "a row of two documents": am.causal() & am.document(doc_ids=(torch.arange(L) >= 7).long().expand(2, L)),
        "a row with one padding key": am.causal() & am.key_padding(holed),
        "a window as wide as the row": am.causal() & am.sliding_window(L),
    }
    seen, original = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(sdpa_backend.F, "scaled_dot_product_attention", spy)
    spec = specs[name]
    q, k, v = (torch.randn(2, 2, L, 8, requires_grad=True) for _ in range(3))
    out = am.attention(q, k, v, spec, backend="sdpa")
    assert seen and seen[0].get("is_causal", False) == expect_is_causal
    assert (seen[0].get("attn_mask") is not None) == expect_mask
    want = naive_attention(q, k, v, spec.to_dense(L, L).expand(2, L, L).unsqueeze(1))
    assert_matches_reference(out, want)
    for got_grad, want_grad in zip(
        torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v)), strict=True
    ):
        torch.testing.assert_close(got_grad, want_grad.to(got_grad.dtype), atol=1e-4, rtol=1e-4)
    # the estimate: the is_causal / unmasked call's, not a dense mask's
    plain = am.causal() if expect_is_causal else am.full()
    q0 = q.detach()
    costs = [sdpa_backend.cost(call_of(q0, q0, q0, s)) for s in (spec, plain)]
    assert (costs[0] == costs[1]) == (not expect_mask)


def test_explicit_positions_place_the_spec_like_to_dense():
    q, k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4)
    q_pos = torch.tensor([[0, 1, 2], [3, 4, 5]])
    spec = am.sliding_window(2)
    got = am.attention(q, k, v, spec, q_positions=q_pos)
    want = naive_attention(q, k, v, spec.to_dense(3, 6, q_positions=q_pos).unsqueeze(1))
    assert_matches_reference(got, want)
    assert not torch.allclose(got, am.attention(q, k, v, spec))


def test_grouped_query_heads_read_their_shared_key_value_head():
    q, k, v = torch.randn(2, 6, 4, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8)
    spec = am.causal()
    grouped = am.attention(q, k, v, spec)
    repeated = am.attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), spec)
    torch.testing.assert_close(grouped, repeated)


@given(scale=st.floats(0.01, 4.0))
@settings(max_examples=10)
def test_scale_multiplies_the_scores(scale):
    q, k, v = (torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    got = am.attention(q, k, v, am.causal(), scale=scale)
    want = naive_attention(q, k, v, am.causal().to_dense(4), scale=scale)
    assert_matches_reference(got, want)


def test_reference_computes_in_float32_and_returns_the_input_dtype():
    q, k, v = (
        torch.randn(1, 1, 64, 16, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(i)) for i in range(3)
    )
    out = am.attention(q, k, v, am.causal(), backend="reference")
    exact = naive_attention(q, k, v, am.causal().to_dense(64)).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, exact)  # one rounding at the end, like the float64 reference rounded once


# ---------------------------------------------------------------------------------------------------------------------
# Backend registry


def test_auto_picks_sdpa_over_the_reference():
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    call = A._prepare_call(q, k, v, am.causal() & am.sliding_window(3), None, None, None)
    assert A.choose_backend(call).name == "sdpa"
    assert set(A.available_backends()) >= {"reference", "sdpa"}


def test_a_registered_backend_is_chosen_by_auto_when_cheapest(monkeypatch):
    calls = []

    def run(call):
        calls.append(call)
        return torch.zeros(call.batch, call.heads, call.q_len, call.value_dim, dtype=call.q.dtype)

    cheap = A.Backend(
        "cheap", run, lambda c: 0.0, unsupported=lambda call: None if call.head_dim == 4 else "head_dim must be 4"
    )
    monkeypatch.setitem(A._BACKENDS, "cheap", cheap)
    q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
    am.attention(q, k, v, am.causal())
    assert len(calls) == 1 and calls[0].mask == am.causal() and calls[0].q_positions.tolist() == [0, 1, 2]
    q8, k8, v8 = (torch.randn(1, 2, 3, 8) for _ in range(3))
    am.attention(q8, k8, v8, am.causal())  # unsupported: auto falls back
    assert len(calls) == 1
    with pytest.raises(am.BackendError, match="head_dim must be 4"):
        am.attention(q8, k8, v8, am.causal(), backend="cheap")


def test_registering_a_taken_name_is_an_error():
    with pytest.raises(am.BackendError, match="'sdpa'"):
        A.register_backend(A.Backend("sdpa", sdpa_backend.BACKEND.run, sdpa_backend.BACKEND.cost))


# ---------------------------------------------------------------------------------------------------------------------
# Errors name the argument, the expected and the actual value


def _qkv(q=(2, 4, 3, 8), k=(2, 2, 5, 8), v=(2, 2, 5, 8), dtype=torch.float32):
    return torch.randn(q).to(dtype), torch.randn(k).to(dtype), torch.randn(v).to(dtype)


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: am.attention(*_qkv(q=(2, 4, 3))), am.ShapeError, ["q:", "4D", "(2, 4, 3)"]),
        (lambda: am.attention(*_qkv(k=(2, 2, 5))), am.ShapeError, ["k:", "4D", "(2, 2, 5)"]),
        (lambda: am.attention(*_qkv(k=(3, 2, 5, 8))), am.ShapeError, ["k:", "batch size 2", "(3, 2, 5, 8)"]),
        (lambda: am.attention(*_qkv(k=(2, 2, 5, 4))), am.ShapeError, ["k:", "head dim 8", "(2, 2, 5, 4)"]),
        (lambda: am.attention(*_qkv(k=(2, 3, 5, 8), v=(2, 3, 5, 8))), am.ShapeError, ["k:", "dividing", "4", "3"]),
        (lambda: am.attention(*_qkv(v=(2, 2, 4, 8))), am.ShapeError, ["v:", "(2, 2, 5)", "(2, 2, 4, 8)"]),
        (lambda: am.attention(*_qkv(dtype=torch.int64)), am.DTypeError, ["q:", "floating", "int64"]),
        (lambda: am.attention(*_qkv()[:2], _qkv()[2].half()), am.DTypeError, ["v:", "float32", "float16"]),
        (lambda: am.attention(*_qkv(), backend="flashy"), am.BackendError, ["backend", "'sdpa'", "'flashy'"]),
        (
            lambda: am.attention(*_qkv(), torch.ones(2, 4, 3, 4, dtype=torch.bool)),
            am.ShapeError,
            ["mask", "(2, 4, 3, 5)"],
        ),
        (lambda: am.attention(*_qkv(), torch.ones(2, 3, 5, dtype=torch.bool)), am.ShapeError, ["mask", "unsqueeze(1)"]),
        (lambda: am.attention(*_qkv(), torch.ones(3, 5)), am.DTypeError, ["mask", "bool", "float32"]),
        (lambda: am.attention(*_qkv(), "causal"), am.InputError, ["mask", "MaskSpec", "str"]),
        (lambda: am.attention(*_qkv(), am.key_padding(torch.ones(3, 5))), am.ShapeError, ["mask", "2", "3"]),
        (lambda: am.attention(*_qkv(), q_positions=torch.arange(3)), am.InputError, ["q_positions", "MaskSpec"]),
        (lambda: am.attention(*_qkv(), scale=float("nan")), am.InputError, ["scale", "finite", "nan"]),
        (lambda: am.attention(*_qkv(q=(2, 4, 6, 8)), am.causal()), am.SpecError, ["q_len", "kv_len (5)", "6"]),
        (lambda: am.attention([[1.0]], *_qkv()[1:]), am.InputError, ["q:", "Tensor", "list"]),
    ],
)
def test_bad_arguments_raise_a_typed_error_naming_the_argument(make, error, words):
    with pytest.raises(error) as info:
        make()
    for word in words:
        assert word in str(info.value)


def test_tensors_on_different_devices_raise_a_device_error():
    q, k, v = _qkv()
    with pytest.raises(am.DeviceError, match="k: expected q's device cpu, got meta"):
        am.attention(q, k.to("meta"), v)
    with pytest.raises(am.DeviceError, match="mask"):
        am.attention(q, k, v, torch.ones(3, 5, dtype=torch.bool, device="meta"))


def test_sdpa_never_writes_to_a_mask_it_does_not_own():
    precomputed = torch.ones(1, 3, 3, dtype=torch.bool)
    precomputed[0, 1] = False
    before = precomputed.clone()
    q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
    out = am.attention(q, k, v, am.custom(lambda b, h, qi, ki: precomputed, name="precomputed"), backend="sdpa")
    assert torch.equal(precomputed, before)
    assert torch.equal(out[0, :, 1], torch.zeros(2, 4))
    tensor_mask = before.unsqueeze(1).clone()
    am.attention(q, k, v, tensor_mask, backend="sdpa")
    assert torch.equal(tensor_mask, before.unsqueeze(1))


# ---------------------------------------------------------------------------------------------------------------------
# "auto" serves every valid call; explain() shows its choice


@pytest.mark.parametrize("q_len, kv_len", [(9, 3), (4, 0), (0, 5)])
def test_auto_serves_calls_without_a_mask_for_any_query_and_key_count(q_len, kv_len):
    q, k, v = torch.randn(1, 2, q_len, 4), torch.randn(1, 2, kv_len, 4), torch.randn(1, 2, kv_len, 4)
    got = am.attention(q, k, v)
    assert_matches_reference(got, naive_attention(q, k, v, torch.ones(q_len, kv_len, dtype=torch.bool)))


def test_explain_lists_every_backend_with_its_cost_or_its_reasons_and_auto_s_pick():
    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))
    spec = am.causal() & am.document(seq_lens=[32, 32])
    got = am.explain(q, k, v, spec, dropout_p=0.1)
    assert got.backends == A.available_backends()
    assert got.picked == A.choose_backend(A._prepare_call(q, k, v, spec, None, None, None, 0.1)).name
    for name, cost, reasons in zip(got.backends, got.costs, got.reasons, strict=True):
        backend = A._BACKENDS[name]
        assert (cost is None) == bool(reasons)
        assert (not backend.dropout) <= any("dropout" in r for r in reasons)  # a backend without dropout says so
    text = str(got)
    assert all(name in text for name in got.backends) and f"auto picks: {got.picked}" in text
    assert "has no attention dropout" in text and got.why_none is None


def test_explain_says_why_no_backend_serves_a_call(monkeypatch):
    monkeypatch.setattr(A, "_BACKENDS", {"reference": A._BACKENDS["reference"]})
    q = torch.randn(1, 2, 4, 8)
    with torch.no_grad():
        got = am.explain(q, q, q, am.causal(), dropout_p=0.0)
    assert got.picked == "reference"
    refusing = A.Backend("cuda_only", A._BACKENDS["reference"].run, lambda c: 0.0, devices=frozenset({"cuda"}))
    monkeypatch.setattr(A, "_BACKENDS", {"cuda_only": refusing})
    got = am.explain(q, q, q, am.causal())
    assert got.picked is None and "runs on cuda, not cpu" in got.why_none and "picks nothing" in str(got)
    with pytest.raises(am.BackendError, match="runs on cuda, not cpu"):
        am.attention(q, q, q, am.causal())


def test_a_refused_explicit_backend_lists_all_its_reasons():
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    with pytest.raises(am.BackendError) as info:
        am.attention(q, q, q, torch.ones(4, 4, dtype=torch.bool), backend="banded", dropout_p=0.1)
    assert "takes masks of kind" in str(info.value) and "dropout" in str(info.value)


def test_sdpa_decode_step_under_causal_is_the_unmasked_kernel():
    """One query at the default (last) position sees every key: "sdpa" runs no mask, and matches naive attention."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 1, 8, generator=g)
    k, v = torch.randn(2, 2, 37, 8, generator=g), torch.randn(2, 2, 37, 8, generator=g)
    out = am.attention(q, k, v, am.causal(), backend="sdpa")
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    torch.testing.assert_close(out, naive_attention(q, k, v, torch.ones(1, 37, dtype=torch.bool)).float())
    first = am.attention(q, k, v, am.causal(), backend="sdpa", q_positions=torch.tensor([0]))  # explicit: one key
    torch.testing.assert_close(first, v[:, :, :1].repeat_interleave(2, dim=1))


@pytest.mark.parametrize(
    "shape",
    [(1, 4, 4, 2, 3), (2, 4, 2, 8, 37), (1, 2, 1, 40, 41), (2, 4, 2, 30, 100), (2, 8, 2, 8, 300), (1, 4, 1, 16, 257)]
    + [(1, 4, 2, 17, 300)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sdpa_splits_bottom_right_causal_with_fewer_queries_than_keys_and_matches_naive(monkeypatch, shape, dtype):
    """Q < K under causal(), no gradient: an unmasked part and an is_causal part merged by log-sum-exp, no mask
    (grouped query heads with at most 16 queries against more than 256 keys: folded into the queries, the last part
    under a small causal mask of its own)."""
    B, H, Hkv, Q, K = shape
    g = torch.Generator().manual_seed(Q)
    q = torch.randn(B, H, Q, 8, generator=g, dtype=dtype)
    k, v = torch.randn(B, Hkv, K, 8, generator=g, dtype=dtype), torch.randn(B, Hkv, K, 8, generator=g, dtype=dtype)
    calls = []
    split = sdpa_backend._split_causal
    monkeypatch.setattr(sdpa_backend, "_split_causal", lambda call: calls.append(call) or split(call))
    monkeypatch.setattr(sdpa_backend, "dense_mask", lambda call: pytest.fail("built a mask"))
    with torch.no_grad():
        out = am.attention(q, k, v, am.causal(), backend="sdpa")
    assert len(calls) == 1 and out.dtype == dtype
    want = naive_attention(q, k, v, am.causal().to_dense(Q, K)).to(dtype)
    torch.testing.assert_close(out, want, **({"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {}))


def assert_matches_naive_with_gradients(got: tuple, base: list, grad: torch.Tensor, spec) -> None:
    """``got`` (output, dq, dk, dv of attention on ``base`` = q, k, v under ``spec``, backward of ``grad``) equals
    naive float64 attention's, to float64's or float32's rounding as ``base`` is."""
    ref = [t.detach().double().requires_grad_() for t in base]
    want = naive_attention(*ref, spec.to_dense(base[0].shape[2])[:, None])
    want.backward(grad.double())
    float64 = base[0].dtype == torch.float64
    tol = {"atol": 1e-12, "rtol": 1e-10} if float64 else {"atol": 2e-5, "rtol": 1e-4}
    for actual, expected in zip(got, (want, *(t.grad for t in ref)), strict=True):
        torch.testing.assert_close(actual.double(), expected.detach(), **tol)


def split_with_gradients(name: str, base: list, grad: torch.Tensor, spec, masked: bool = False) -> tuple[int, tuple]:
    """``sdpa`` on ``base`` (q, k, v) under ``spec``, backward of ``grad``, with its split function ``name`` counted
    and (unless ``masked``) a dense mask failing the test: how many times the split ran, and the output and q / k / v
    gradients."""
    calls = []
    split = getattr(sdpa_backend, name)
    q, k, v = (t.clone().requires_grad_() for t in base)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sdpa_backend, name, lambda *args: calls.append(args) or split(*args))
        if not masked:
            patch.setattr(sdpa_backend, "dense_mask", lambda call: pytest.fail("built a mask"))
        out = am.attention(q, k, v, spec, backend="sdpa")
        out.backward(grad)
    return len(calls), (out, q.grad, k.grad, v.grad)


@settings(max_examples=12, deadline=None)
@given(
    prefixes=st.lists(st.sampled_from([0, 1, 2, 40, 257, 299, 300, 301, 400]), min_size=1, max_size=3),
    float64=st.booleans(),
    layout=st.sampled_from(["contiguous", "tokens first", "sliced"]),
)
def test_sdpa_splits_prefix_lm_into_unmasked_calls_and_matches_naive_with_gradients(prefixes, float64, layout):
    """Prefix-LM rows of 300 tokens (past ``_WHOLE_ROWS_MIN_KEYS``), one prefix per row or one for the batch (0, 1,
    inside, at and past the row's end): the split (every query against the prefix, then ``is_causal`` over the rest,
    merged by log-sum-exp; rows of the same prefix together) builds no mask, and its output and q / k / v gradients
    match naive float64 attention, with inputs contiguous, tokens-first as models hold them, or sliced."""
    dtype = torch.float64 if float64 else torch.float32
    B, H, L, D = max(len(prefixes), 2), 2, 300, 8
    g = torch.Generator().manual_seed(sum(prefixes) + len(prefixes))
    if layout == "tokens first":
        base = [torch.randn(B, L, H, D, generator=g, dtype=dtype).transpose(1, 2) for _ in range(3)]
    elif layout == "sliced":
        base = [torch.randn(B, H, L, 2 * D, generator=g, dtype=dtype)[..., ::2] for _ in range(3)]
    else:
        base = [torch.randn(B, H, L, D, generator=g, dtype=dtype) for _ in range(3)]
    grad = torch.randn(B, H, L, D, generator=g, dtype=dtype)
    spec = am.prefix_lm(prefixes if len(prefixes) == B else prefixes[0])
    calls, got = split_with_gradients("_split_prefix", base, grad, spec)
    assert calls == 1 and got[0].dtype == dtype  # prefixes 0 and 1 as one is_causal call, >= L as no mask
    assert_matches_naive_with_gradients(got, base, grad, spec)


def split_then_masked(monkeypatch, base, spec, switch: str, off) -> list[tuple]:
    """``sdpa``'s output and q / k / v gradients (of the sum) on ``base`` under ``spec``: first as it runs, then with
    its ``switch`` (a split's test) patched to return ``off`` (the masked call)."""
    runs = []
    for split in (True, False):
        if not split:
            monkeypatch.setattr(sdpa_backend, switch, lambda call: off)
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = am.attention(q, k, v, spec, backend="sdpa")
        out.backward(torch.ones_like(out))
        runs.append((out.detach(), q.grad, k.grad, v.grad))
    return runs


def poison_inputs(base: list, spots: dict, poison: str) -> None:
    """Set ``base[which][at]`` (``spots[poison]`` = ``(which, at)``) to infinity if ``poison`` names one, else NaN; no
    change for a name not in ``spots``."""
    if poison in spots:
        which, at = spots[poison]
        base[which][at] = float("inf") if "inf" in poison else float("nan")


def assert_finite_gradients_agree(runs: list[tuple], row: int | None = None) -> None:
    """The q / k / v gradients of ``split_then_masked``'s two runs agree wherever both are finite (only batch row
    ``row`` where given)."""
    for got, want in zip(runs[0][1:], runs[1][1:], strict=True):
        if row is not None:
            got, want = got[row], want[row]
        finite = got.isfinite() & want.isfinite()
        torch.testing.assert_close(got[finite], want[finite], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("poison", ["none", "prefix key", "later key", "query", "later value inf"])
def test_the_prefix_split_gives_what_the_masked_call_gives_nan_and_infinities_included(monkeypatch, poison):
    """A prefix of 100 on rows of 300: a NaN or infinity in a prefix key, a later key or value, or a query reaches
    the rows it reaches under the masked call (the denied later keys are scanned, ``_masked_key_span``); the
    gradients agree where the masked call's are finite, and are NaN nowhere else (a NaN query's row: the masked
    call's value gradient is NaN on every key, the split's only on the keys that query sees). A NaN in a prefix key,
    which every query of its row and head sees, is not scanned for: there, as in an unmasked or ``is_causal`` call,
    the kernel's NaN reaches that head's gradients (the masked call's cleaning run gives them 0), and every other
    head's agree."""
    g = torch.Generator().manual_seed(11)
    base = [torch.randn(2, 2, 300, 8, generator=g) for _ in range(3)]
    spots = {"prefix key": (1, (0, 1, 40, 3)), "later key": (1, (1, 0, 200, 0)), "query": (0, (0, 0, 150, 2))}
    spots["later value inf"] = (2, (1, 1, 250, 1))
    poison_inputs(base, spots, poison)
    spec = am.prefix_lm(100)
    assert sdpa_backend._masked_key_span(A._prepare_call(*base, spec, None, None, None)) == slice(100, None)
    runs = split_then_masked(monkeypatch, base, spec, "_splits_prefix", False)
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=1e-5, rtol=1e-4, equal_nan=True)
    for got, want in zip(runs[0][1:], runs[1][1:], strict=True):
        if poison == "prefix key":
            assert got[0, 1].isnan().all() and not got[0, 0].isnan().any() and not got[1].isnan().any()
            got, want = got[1], want[1]
        assert not (got.isnan() & ~want.isnan()).any()
        finite = ~want.isnan()
        torch.testing.assert_close(got[finite], want[finite], atol=1e-5, rtol=1e-4)


def test_sdpa_keeps_the_masked_call_where_the_prefix_split_does_not_apply(monkeypatch):
    """Grouped query heads, explicit positions, Q != K, rows of at most 256 keys and dropout keep the masked call;
    all still match naive."""
    monkeypatch.setattr(sdpa_backend, "_split_prefix", lambda call: pytest.fail("split"))
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 300, 8, generator=g) for _ in range(3))
    spec = am.prefix_lm(100)
    want = naive_attention(q, k, v, spec.to_dense(300)).float()
    grouped = am.attention(q.repeat(1, 2, 1, 1), k, v, spec, backend="sdpa")
    torch.testing.assert_close(grouped, naive_attention(q.repeat(1, 2, 1, 1), k, v, spec.to_dense(300)).float())
    at = torch.arange(300)
    torch.testing.assert_close(am.attention(q, k, v, spec, backend="sdpa", q_positions=at, kv_positions=at), want)
    short = am.attention(q[:, :, :256], k[:, :, :256], v[:, :, :256], spec, backend="sdpa")
    torch.testing.assert_close(short, naive_attention(*(t[:, :, :256] for t in (q, k, v)), spec.to_dense(256)).float())
    chunk = am.attention(q[:, :, 200:], k, v, spec, backend="sdpa")  # the last 100 queries against every key
    torch.testing.assert_close(chunk, want[:, :, 200:])
    torch.manual_seed(0)
    assert am.attention(q, k, v, spec, backend="sdpa", dropout_p=0.5).shape == want.shape


@settings(max_examples=12, deadline=None)
@given(
    size=st.sampled_from([512, 700]),
    length=st.sampled_from([1030, 1300]),
    batch=st.integers(1, 2),
    grouped=st.booleans(),
    float64=st.booleans(),
    tokens_first=st.booleans(),
)
def test_sdpa_runs_causal_chunks_as_stacked_is_causal_calls_and_matches_naive_with_gradients(
    size, length, batch, grouped, float64, tokens_first
):
    """``causal() & chunked(c)`` in chunks of at least 512 keys: ``is_causal`` over each row's whole chunks stacked as
    views, and over the last, shorter one; no mask built; output and q / k / v gradients match naive float64
    attention, with grouped query heads and tokens-first inputs too."""
    dtype = torch.float64 if float64 else torch.float32
    H, Hkv, D = 4, 2 if grouped else 4, 8
    g = torch.Generator().manual_seed(size + length + batch)

    def make(heads):
        if tokens_first:
            return torch.randn(batch, length, heads, D, generator=g, dtype=dtype).transpose(1, 2)
        return torch.randn(batch, heads, length, D, generator=g, dtype=dtype)

    base = [make(H), make(Hkv), make(Hkv)]
    grad = torch.randn(batch, H, length, D, generator=g, dtype=dtype)
    spec = am.causal() & am.chunked(size)
    calls, got = split_with_gradients("_split_chunks", base, grad, spec)
    assert calls == 1 and got[0].dtype == dtype
    assert_matches_naive_with_gradients(got, base, grad, spec)


@pytest.mark.parametrize("poison", ["none", "later key", "earlier chunk's value", "query"])
def test_the_chunk_split_gives_what_the_masked_call_gives_nan_included(monkeypatch, poison):
    """Chunks of 512 on rows of 1,100: a NaN in a key later in its chunk, a value of an earlier chunk, or a query
    reaches exactly the rows it reaches under the masked call, forward; with a gradient the finite gradients agree."""
    g = torch.Generator().manual_seed(13)
    base = [torch.randn(1, 2, 1100, 8, generator=g) for _ in range(3)]
    spots = {
        "later key": (1, (0, 1, 600, 3)),
        "earlier chunk's value": (2, (0, 0, 50, 1)),
        "query": (0, (0, 1, 800, 0)),
    }
    poison_inputs(base, spots, poison)
    spec = am.causal() & am.chunked(512)
    runs = split_then_masked(monkeypatch, base, spec, "_chunk_split", None)
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=1e-5, rtol=1e-4, equal_nan=True)
    assert_finite_gradients_agree(runs)


def test_sdpa_keeps_the_masked_call_where_the_chunk_split_does_not_apply(monkeypatch):
    """Chunk offsets, chunks of fewer than 512 keys, explicit positions, Q != K and a third part keep the masked call;
    all still match naive."""
    monkeypatch.setattr(sdpa_backend, "_split_chunks", lambda *args: pytest.fail("split"))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 1100, 8, generator=g) for _ in range(3))
    real = torch.ones(2, 1100, dtype=torch.long)
    real[1, :7] = 0
    at = torch.arange(1100)
    for spec, kwargs, rows in [
        (am.causal() & am.chunked(512, offsets=[0, 5]), {}, slice(None)),
        (am.causal() & am.chunked(500), {}, slice(None)),
        (am.causal() & am.chunked(512), {"q_positions": at, "kv_positions": at}, slice(None)),
        (am.causal() & am.chunked(512), {}, slice(100, None)),
        (am.causal() & am.chunked(512) & am.key_padding(real), {}, slice(None)),
    ]:
        want = naive_attention(q, k, v, spec.to_dense(1100)[:, None]).float()
        got = am.attention(q[:, :, rows], k, v, spec, backend="sdpa", **kwargs)
        torch.testing.assert_close(got, want[:, :, rows])


@settings(max_examples=12, deadline=None)
@given(
    window=st.sampled_from([512, 700]),
    length=st.sampled_from([1024, 1030, 1500, 2100]),
    batch=st.integers(1, 2),
    with_causal=st.booleans(),
    float64=st.booleans(),
    tokens_first=st.booleans(),
)
def test_sdpa_runs_sliding_windows_as_unmasked_calls_and_matches_naive_with_gradients(
    window, length, batch, with_causal, float64, tokens_first
):
    """``sliding_window(W)`` (with ``causal()`` or alone) from 512 keys, on rows a whole number of windows long or
    not: each block's own ``is_causal`` part and the previous block's on the reversed rows, merged by log-sum-exp;
    no mask built; output and q / k / v gradients match naive float64 attention, tokens-first inputs too."""
    dtype = torch.float64 if float64 else torch.float32
    H, D = 2, 8
    g = torch.Generator().manual_seed(window + length + batch)

    def make():
        if tokens_first:
            return torch.randn(batch, length, H, D, generator=g, dtype=dtype).transpose(1, 2)
        return torch.randn(batch, H, length, D, generator=g, dtype=dtype)

    base = [make() for _ in range(3)]
    grad = torch.randn(batch, H, length, D, generator=g, dtype=dtype)
    spec = am.causal() & am.sliding_window(window) if with_causal else am.sliding_window(window)
    calls, got = split_with_gradients("_split_window", base, grad, spec)
    assert calls == 1 and got[0].dtype == dtype
    assert_matches_naive_with_gradients(got, base, grad, spec)


@pytest.mark.parametrize("poison", ["none", "later key", "earlier key", "query", "value inf"])
def test_the_window_split_gives_what_the_masked_call_gives_nan_and_infinities_included(monkeypatch, poison):
    """A window of 512 on rows of 1,300: a NaN in a key later in its block, one before a query's window, a query, or
    an infinite value reaches exactly the rows it reaches under the masked call, forward; the finite gradients
    agree."""
    g = torch.Generator().manual_seed(19)
    base = [torch.randn(1, 2, 1300, 8, generator=g) for _ in range(3)]
    spots = {
        "later key": (1, (0, 1, 700, 3)),
        "earlier key": (1, (0, 0, 100, 0)),
        "query": (0, (0, 1, 900, 0)),
        "value inf": (2, (0, 0, 500, 1)),
    }
    poison_inputs(base, spots, poison)
    runs = split_then_masked(monkeypatch, base, am.sliding_window(512), "_window_split", None)
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=1e-5, rtol=1e-4, equal_nan=True)
    assert_finite_gradients_agree(runs)


_RIGHT_PADDED = torch.arange(1300) < torch.tensor([[900], [1300]])  # one row right-padded, one whole


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("switch", "off", "spec", "key_bound"),
    [
        ("_splits_prefix", False, am.prefix_lm([150, 420]), 1.5),
        ("_window_split", None, am.sliding_window(512), 2.0),
        ("_padded_runs", None, am.causal() & am.key_padding(_RIGHT_PADDED), 2.0),
    ],
    ids=["prefix", "window", "padded"],
)
def test_the_splits_in_half_precision_are_as_close_to_float64_as_the_masked_call(
    monkeypatch, dtype, switch, off, spec, key_bound
):
    """Half precision on rows of 1,300 (prefixes of 150 and 420, windows of 512, one row right-padded to 900 tokens):
    the prefix and window splits merge their parts in float32 and round once, the padded split's parts are disjoint
    in their queries; output and gradients within 1.5x the masked call's error against float64 attention (largest
    and mean). Where a key's gradient is the sum of two parts' (windows, padded rows: each rounded to the input's
    dtype by the fused backward), the key's and value's gradients within 2x at the largest (the window's measured
    1.1x and 1.5x in bfloat16)."""
    g = torch.Generator().manual_seed(6)
    base = [torch.randn(2, 2, 1300, 32, generator=g) for _ in range(3)]
    grad = torch.randn(2, 2, 1300, 32, generator=g)
    runs = []
    for split in (True, False, None):
        if split is False:
            monkeypatch.setattr(sdpa_backend, switch, lambda call: off)
        q, k, v = (t.to(torch.float64 if split is None else dtype).requires_grad_() for t in base)
        if split is None:
            out = naive_attention(q, k, v, spec.to_dense(1300)[:, None])
        else:
            out = am.attention(q, k, v, spec, backend="sdpa")
            assert out.dtype == dtype
        out.backward(grad.to(out.dtype))
        runs.append([t.double() for t in (out.detach(), q.grad, k.grad, v.grad)])
    for i, (got, masked, want) in enumerate(zip(*runs, strict=True)):
        for reduce in (torch.amax, torch.mean):
            bound = key_bound if i >= 2 and reduce is torch.amax else 1.5
            assert reduce((got - want).abs()) <= bound * reduce((masked - want).abs())


@pytest.mark.parametrize(
    ("spec", "length", "switch"),
    [
        (am.sliding_window(512), 1300, "_window_split"),
        (am.sliding_window(512), 1536, "_window_split"),
        (am.causal() & am.key_padding(torch.arange(700) < torch.tensor([[450], [700], [700]])), 700, "_padded_runs"),
        (am.full() & am.key_padding(torch.arange(700) >= torch.tensor([[0], [120], [120]])), 700, "_padded_runs"),
        (am.causal() & am.chunked(512), 1100, "_chunk_split"),
        (am.causal() & am.chunked(512), 1024, "_chunk_split"),
        (am.prefix_lm([300, 300, 0]), 700, "_splits_prefix"),
    ],
    ids=[
        "window, a short first block",
        "window, whole blocks",
        "causal padded",
        "full padded",
        "chunks, a short last chunk",
        "whole chunks",
        "prefix-LM",
    ],
)
def test_the_splits_estimate_prices_the_pairs_their_calls_compute(monkeypatch, spec, length, switch):
    """The estimate of a split into fused calls without a mask (windows, padded rows, chunks, prefix-LM) counts the
    pairs of the calls the run makes (each call's ``sdpa_pairs`` for its shape and ``is_causal``, seen by spying on
    the calls) and one ``CALL_COST`` per call (the copies of the window split aside): what the run does and what
    "auto" prices are the same calls."""
    from attnmask.backends import _common

    monkeypatch.setattr(sdpa_backend, "_WINDOW_COPIES", 0)
    q = torch.randn(3, 2, length, 8)
    call = A._prepare_call(q, q, q, spec, None, None, None)
    assert getattr(sdpa_backend, switch)(call) not in (None, False)
    seen = []
    flash, sdpa = sdpa_backend._flash_cpu(), F.scaled_dot_product_attention

    def spy(kernel):
        def run(q, k, v, *args, is_causal=False, **kwargs):
            seen.append((q.shape[0] * q.shape[1], q.shape[2], k.shape[2], is_causal))
            return kernel(q, k, v, *args, is_causal=is_causal, **kwargs)

        return run

    monkeypatch.setattr(sdpa_backend, "_flash_cpu", lambda: spy(flash))
    monkeypatch.setattr(sdpa_backend.F, "scaled_dot_product_attention", spy(sdpa))
    sdpa_backend.run(call)
    pairs = sum(n * float(_common.sdpa_pairs(Q, K, causal)) for n, Q, K, causal in seen)  # n: batch x heads
    width = _common.pair_width(16, sdpa_backend._EXTRA_PAIR_WIDTH) * _common.amx_pair_factor(call)
    want = pairs * width + _common.CALL_COST * len(seen)
    assert sdpa_backend._one_thread_cost(call) == pytest.approx(want, rel=1e-9)


def test_sdpa_keeps_the_masked_call_where_the_window_split_does_not_apply(monkeypatch):
    """Grouped query heads, windows of fewer than 512 keys or of the whole row, explicit positions, Q != K, a window
    with documents and dropout keep the masked call; all still match naive."""
    monkeypatch.setattr(sdpa_backend, "_split_window", lambda *args: pytest.fail("split"))
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 1100, 8, generator=g) for _ in range(3))
    at = torch.arange(1100)
    window = am.sliding_window(512)
    for spec, kwargs, rows, heads in [
        (window, {}, slice(None), 2),
        (am.sliding_window(500), {}, slice(None), 1),
        (am.sliding_window(1100), {}, slice(None), 1),
        (window, {"q_positions": at, "kv_positions": at}, slice(None), 1),
        (window, {}, slice(100, None), 1),
        (window & am.document(seq_lens=[600, 500]), {}, slice(None), 1),
    ]:
        queries = q.repeat(1, heads, 1, 1)
        want = naive_attention(queries, k, v, spec.to_dense(1100)[:, None]).float()
        got = am.attention(queries[:, :, rows], k, v, spec, backend="sdpa", **kwargs)
        torch.testing.assert_close(got, want[:, :, rows])
    torch.manual_seed(0)
    assert am.attention(q, k, v, window, backend="sdpa", dropout_p=0.5).shape == q.shape


@settings(max_examples=16, deadline=None)
@given(
    pads=st.lists(
        st.tuples(st.sampled_from([0, 1, 37, 150]), st.sampled_from([0, 1, 90, 299])), min_size=1, max_size=3
    ),
    causal=st.booleans(),
    grouped=st.booleans(),
    float64=st.booleans(),
    tokens_first=st.booleans(),
)
def test_sdpa_runs_padded_rows_as_unmasked_calls_and_matches_naive_with_gradients(
    pads, causal, grouped, float64, tokens_first
):
    """Rows of 300 padded on the left and / or the right (a row all padding too), under ``causal()`` or ``full()``:
    each run of rows with the same real tokens as an ``is_causal`` block and an unmasked call (or one unmasked call),
    padding queries before the run exactly 0; no mask built; output and q / k / v gradients match naive float64
    attention, with grouped query heads, tokens-first inputs and one padding row for the whole batch too."""
    dtype = torch.float64 if float64 else torch.float32
    B, L, H, Hkv, D = len(pads), 300, 4, 2 if grouped else 4, 8
    real = torch.zeros(B, L, dtype=torch.bool)
    for row, (left, right) in enumerate(pads):
        real[row, left : max(left, L - right)] = True
    g = torch.Generator().manual_seed(sum(sum(p) for p in pads) + B)

    def make(heads):
        if tokens_first:
            return torch.randn(max(B, 2), L, heads, D, generator=g, dtype=dtype).transpose(1, 2)
        return torch.randn(max(B, 2), heads, L, D, generator=g, dtype=dtype)

    base = [make(H), make(Hkv), make(Hkv)]
    grad = torch.randn(max(B, 2), H, L, D, generator=g, dtype=dtype)
    spec = (am.causal() if causal else am.full()) & am.key_padding(real)
    calls, got = split_with_gradients("_split_padded", base, grad, spec, masked=not real.any())  # all padding: masked
    assert calls == (0 if real.all() or not real.any() else 1) and got[0].dtype == dtype  # no padding: no mask
    assert_matches_naive_with_gradients(got, base, grad, spec)


@pytest.mark.parametrize("poison", ["none", "padding key", "later key", "padding query", "query", "value inf"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_the_padded_split_gives_what_the_masked_call_gives_nan_and_infinities_included(monkeypatch, poison, causal):
    """Rows of 300, one right-padded (200 real) and one left-padded (100 real): a NaN in a padding key, a later real
    key (read by the ``is_causal`` block: scanned, ``_masked_key_span``), a padding query, a real query, or an
    infinite value reaches exactly the rows it reaches under the masked call (there the masked call's contained run
    gives the row NaN, the split the kernel's infinity in the value's column: non-finite either way, as `native`
    does); the rest of the output and the finite gradients agree (with the infinite value, those of the other batch
    row: an infinite output has no gradient to compare)."""
    g = torch.Generator().manual_seed(17)
    base = [torch.randn(2, 2, 300, 8, generator=g) for _ in range(3)]
    real = torch.ones(2, 300, dtype=torch.bool)
    real[0, 200:] = False
    real[1, :100] = False
    spots = {
        "padding key": (1, (0, 1, 250, 3)),
        "later key": (1, (1, 0, 220, 0)),
        "padding query": (0, (1, 1, 50, 2)),
        "query": (0, (0, 0, 150, 2)),
        "value inf": (2, (0, 1, 120, 1)),
    }
    poison_inputs(base, spots, poison)
    spec = (am.causal() if causal else am.full()) & am.key_padding(real)
    span = sdpa_backend._masked_key_span(A._prepare_call(*base, spec, None, None, None))
    assert span == (slice(0, 300) if causal else slice(0, 0))
    runs = split_then_masked(monkeypatch, base, spec, "_padded_runs", None)
    (split, masked), finite = (run[0] for run in runs), runs[1][0].isfinite()
    assert torch.equal(split.isfinite().all(-1), finite.all(-1))
    torch.testing.assert_close(split[finite], masked[finite], atol=1e-5, rtol=1e-4)
    assert_finite_gradients_agree(runs, 1 if poison == "value inf" else None)


def test_sdpa_keeps_the_masked_call_where_the_padded_split_does_not_apply(monkeypatch):
    """A hole inside a row's real tokens, a window, documents, explicit positions, Q != K, rows of at most 256 keys
    and dropout keep the masked call; all still match naive."""
    monkeypatch.setattr(sdpa_backend, "_split_padded", lambda *args: pytest.fail("split"))
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 300, 8, generator=g) for _ in range(3))
    real = torch.ones(2, 300, dtype=torch.bool)
    real[1, 250:] = False
    holes = real.clone()
    holes[0, 100:110] = False
    at = torch.arange(300)
    pad = am.key_padding(real)
    for spec, kwargs, rows, keys in [
        (am.causal() & am.key_padding(holes), {}, slice(None), 300),
        (am.sliding_window(64) & pad, {}, slice(None), 300),
        (am.causal() & am.document(seq_lens=[[150, 150], [300]]) & pad, {}, slice(None), 300),
        (am.causal() & pad, {"q_positions": at, "kv_positions": at}, slice(None), 300),
        (am.full() & pad, {}, slice(100, None), 300),
        (am.causal() & am.key_padding(real[:, :256]), {}, slice(None), 256),
    ]:
        want = naive_attention(q[:, :, :keys], k[:, :, :keys], v[:, :, :keys], spec.to_dense(keys)[:, None]).float()
        got = am.attention(q[:, :, :keys][:, :, rows], k[:, :, :keys], v[:, :, :keys], spec, backend="sdpa", **kwargs)
        torch.testing.assert_close(got, want[:, :, rows])
    torch.manual_seed(0)
    assert am.attention(q, k, v, am.causal() & pad, backend="sdpa", dropout_p=0.5).shape == q.shape


@pytest.mark.parametrize("poison", ["none", "last key", "early key", "query", "last value inf", "early value -inf"])
@pytest.mark.parametrize("padded", [False, True], ids=["causal", "causal+padding"])
def test_folded_grouped_heads_equal_the_grouped_kernel_nan_and_infinities_included(monkeypatch, poison, padded):
    """A decoding chunk (Q = 4 < K = 300, 8 query heads on 2 key heads): the folded call (``sdpa._grouped``, the
    split's ``_split_causal_grouped``) gives what the kernel with ``enable_gqa`` gives, NaN and infinities where
    they reach included."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 8, 4, 8, generator=g)
    k, v = torch.randn(2, 2, 300, 8, generator=g), torch.randn(2, 2, 300, 8, generator=g)
    spots = {
        "last key": (k, (0, 1, 298, 3), float("nan")),
        "early key": (k, (1, 0, 10, 0), float("nan")),
        "query": (q, (0, 5, 1, 2), float("nan")),
        "last value inf": (v, (1, 1, 299, 0), float("inf")),
        "early value -inf": (v, (0, 0, 3, 1), float("-inf")),
    }
    if poison in spots:
        t, at, value = spots[poison]
        t[at] = value
    real = torch.ones(2, 300, dtype=torch.long)
    real[1, :20] = 0
    spec = am.causal() & am.key_padding(real) if padded else am.causal()
    with torch.no_grad():
        folded = am.attention(q, k, v, spec, backend="sdpa")
        monkeypatch.setattr(sdpa_backend, "_FOLD_MIN_KEYS", 10**9)
        grouped = am.attention(q, k, v, spec, backend="sdpa")
    torch.testing.assert_close(folded, grouped, atol=1e-6, rtol=1e-5, equal_nan=True)


def test_the_causal_split_scans_only_its_last_keys_and_still_contains_a_masked_nan(monkeypatch):
    """Every query sees the first K - Q keys, so only the last Q are scanned for non-finite values (once the output
    shows one); a NaN there reaches only the queries that may see it, and a NaN among the first keys reaches every
    query, as the semantics say."""
    scanned = []
    scan = A._all_finite
    monkeypatch.setattr(A, "_all_finite", lambda *ts: scanned.append(tuple(t.shape[2] for t in ts)) or scan(*ts))
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 2, 4, 8, generator=g), torch.randn(1, 2, 30, 8, generator=g), torch.randn(1, 2, 30, 8)
    allowed = am.causal().to_dense(4, 30)
    for at, seen_by in ((28, [False, False, True, True]), (3, [True] * 4)):
        assert allowed[0, :, at].tolist() == seen_by
        poisoned = v.clone()
        poisoned[:, :, at] = float("nan")
        with torch.no_grad():
            out = am.attention(q, k, poisoned, am.causal(), backend="sdpa")
        assert scanned[-1] == (4, 4)  # after the output's scan found the NaN: the keys and values of the span
        nan_rows = out.isnan().any(-1)  # (1, 2, 4)
        assert nan_rows.eq(torch.tensor(seen_by)).all()
        clean = naive_attention(q, k, poisoned.nan_to_num(0.0), allowed).float()
        torch.testing.assert_close(out[~nan_rows], clean[~nan_rows])


@pytest.mark.parametrize("scan", ["per_tensor", "read_once"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_the_finite_scan_finds_every_non_finite_value_and_settles_an_overflowing_sum(dtype, scan):
    """``_all_finite`` sums in the inputs' dtype where its range is float32's: a NaN, +inf or -inf anywhere is found;
    finite values whose sum overflows (bfloat16 and float32 near their maximum, float16 beyond 65504) are finite. Off
    the CPU (``read_once``, run here on CPU tensors) the sums are added and read back once, and +inf in one tensor
    beside -inf in the other (a NaN sum) is found too."""
    finite = A._all_finite if scan == "per_tensor" else lambda *ts: A._all_finite_read_once(ts)
    big = torch.finfo(dtype).max / 4
    huge = torch.full((1, 1, 64, 8), big, dtype=dtype)
    if dtype == torch.bfloat16:
        assert bool(torch.isinf(huge.sum()))  # the cheap sum overflows: the exact check decides
    assert finite(huge, huge) and finite(huge, -huge)
    for bad_value in (float("nan"), float("inf"), float("-inf")):
        k = torch.randn(2, 2, 33, 4).to(dtype)
        k[1, 0, 17, 2] = bad_value
        assert not finite(k, torch.zeros_like(k)) and not finite(torch.zeros_like(k), k)
        assert not finite(k, -k) and not finite(k)
    assert finite(torch.randn(2, 2, 33, 4).to(dtype), torch.randn(2, 2, 33, 4).to(dtype))


def test_off_the_cpu_the_finite_scan_reads_back_once(monkeypatch):
    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or real_item(self))
    k, v = torch.randn(2, 2, 33, 4), torch.randn(2, 2, 33, 6)
    assert A._all_finite_read_once((k, v)) and len(reads) == 1


def test_which_tensors_the_finite_scan_reads(monkeypatch):
    """Without a gradient, on a backend that declares ``propagates_nonfinite`` for the device, the output is scanned
    after the run (fewer elements than k and v); with a gradient, dropout, grouped-query heads whose output outgrows
    k and v, or a backend without the declaration, k and v before it; never for one that reads no denied key."""
    scanned = []
    scan = A._all_finite
    monkeypatch.setattr(A, "_all_finite", lambda *ts: scanned.append([tuple(t.shape) for t in ts]) or scan(*ts))
    spec = am.causal() & am.document(seq_lens=[10, 6])
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 6)
    out, keys = [(2, 4, 16, 6)], [(2, 4, 16, 8), (2, 4, 16, 6)]

    def scans(**kwargs):
        scanned.clear()
        am.attention(kwargs.pop("q", q), kwargs.pop("k", k), kwargs.pop("v", v), spec, **kwargs)
        return scanned

    assert scans(backend="sdpa") == [out]
    assert scans(backend="varlen") == [out]
    assert scans(backend="native") == []
    assert scans(backend="sdpa", q=q.clone().requires_grad_()) == [keys]
    with torch.no_grad():
        assert scans(backend="sdpa", q=q.clone().requires_grad_()) == [out]
    torch.manual_seed(0)
    assert scans(backend="sdpa", dropout_p=0.1) == [keys]
    assert scans(backend="sdpa", k=k[:, :1], v=v[:, :1]) == [[(2, 1, 16, 8), (2, 1, 16, 6)]]  # 4 x 6 > 8 + 6
    monkeypatch.setitem(A._BACKENDS, "plain", A.Backend("plain", sdpa_backend.BACKEND.run, sdpa_backend.BACKEND.cost))
    assert scans(backend="plain") == [keys]


def test_a_non_finite_output_from_finite_keys_is_returned_as_computed(monkeypatch):
    """A NaN query makes its row NaN with every key and value finite: after the output scan, the key scan clears them
    and the output is returned as the backend computed it, without the cleaning runs."""
    monkeypatch.setattr(A, "_contained", lambda *args: pytest.fail("ran the cleaning runs"))
    spec = am.causal() & am.document(seq_lens=[10, 6])
    q, k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    q[0, 1, 4, 0] = float("nan")
    out = am.attention(q, k, v, spec, backend="sdpa")
    nan_rows = torch.zeros(1, 2, 16, dtype=torch.bool)
    nan_rows[0, 1, 4] = True
    assert torch.equal(out.isnan().any(-1), nan_rows)
    want = naive_attention(q, k, v, spec.to_dense(16)[:, None]).float()
    torch.testing.assert_close(out[~nan_rows], want[~nan_rows])


def test_sdpa_keeps_the_masked_call_where_the_causal_split_does_not_apply(monkeypatch):
    """A gradient, half precision, explicit positions or Q == K do not take the split; all still match naive."""
    monkeypatch.setattr(sdpa_backend, "_split_causal", lambda call: pytest.fail("split"))
    q, k, v = torch.randn(1, 2, 3, 8, requires_grad=True), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    want = naive_attention(q.detach(), k, v, am.causal().to_dense(3, 9)).float()
    torch.testing.assert_close(am.attention(q, k, v, am.causal(), backend="sdpa"), want)
    with torch.no_grad():
        half = am.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), am.causal(), backend="sdpa")
        torch.testing.assert_close(half.float(), want, atol=2e-2, rtol=2e-2)
        at = torch.arange(6, 9)
        torch.testing.assert_close(am.attention(q, k, v, am.causal(), backend="sdpa", q_positions=at), want)


def test_a_decoding_step_skips_the_masked_key_scan_since_its_query_sees_every_key(monkeypatch):
    attention_module = sys.modules["attnmask.attention"]  # the package's ``attention`` names the function

    def scanned(*tensors):
        raise AssertionError("scanned for non-finite values a call that masks no key")

    monkeypatch.setattr(attention_module, "_all_finite", scanned)
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    out = am.attention(q, k, v, am.causal())
    full = am.attention(q, k, v, None)
    assert torch.equal(out, full)
    with pytest.raises(AssertionError, match="scanned"):  # two queries: the first does not see the last key
        am.attention(torch.randn(2, 4, 2, 8), k, v, am.causal())


@pytest.mark.parametrize("amx", [True, False])
def test_sdpa_estimate_halves_bfloat16_pair_work_only_on_cpus_with_amx_bf16(monkeypatch, amx):
    """On a CPU with AMX bfloat16 tiles SDPA's bfloat16 kernel runs about twice the pairs per second of float32
    (benchmarks/RESULTS.md); elsewhere (another CPU, another device), and for float16, the estimate is float32's."""
    monkeypatch.setattr(sdpa_backend._common, "cpu_has_amx_bf16", lambda: amx)
    monkeypatch.setattr(sdpa_backend._workers, "threads_available", lambda: 1)  # the one-thread estimate
    # the halving alone (a bfloat16 forward pair's own width on such a CPU: test_mode_costs.py)
    monkeypatch.setattr(sdpa_backend, "_EXTRA_BF16_FORWARD_PAIR_WIDTH", sdpa_backend._EXTRA_PAIR_WIDTH)

    def estimate(dtype, device="cpu"):
        q = torch.zeros(1, 2, 64, 8, dtype=dtype, device=device)
        return sdpa_backend.cost(A._prepare_call(q, q, q, am.sliding_window(8), None, None, None))

    assert estimate(torch.float16) == estimate(torch.float32)
    pairs = 2 * 64 * 64 * pair_width(16, sdpa_backend._EXTRA_PAIR_WIDTH)  # B·H·Q·K at the charged width of D + Dv
    bf16 = (estimate(torch.float32) - pairs * 0.5) * sdpa_backend.MODES.bf16  # the rest: bench_limit --fit --modes
    assert estimate(torch.bfloat16) == pytest.approx(bf16 if amx else estimate(torch.float32))
    assert estimate(torch.bfloat16, "meta") == estimate(torch.float32, "meta")  # the CPU's flags say nothing there
