"""Every registered backend against the naive float64 reference, driven by the registry's declarations.

Nothing here names a backend: the tests parametrise over ``attnmask.backends.REGISTRY`` (plus any backend registered
at run time). A case a backend cannot serve must be refused through ``Backend.not_supported_reasons`` (and then
``attention(..., backend=name)`` raises a ``BackendError``); every other case must match the reference. Backends whose
environment is missing (``available()``, or no CPU among their devices) are skipped with that reason, except under
``ATTNMASK_STRICT_DEPS=1``, where a backend that declares the CPU must run. A backend that ``auto`` excludes on the
CPU (one that compiles per shape, seconds each) runs the fixed representative cases only, not the generated ones.
"""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnmask as am
from attnmask.attention import _BACKENDS, _prepare_call
from attnmask.backends import sdpa as sdpa_module
from tests.helpers import GRAD_TOLERANCE, TOLERANCE, grads
from tests.naive import naive_attention
from tests.strategies import (
    heads_and_dims,
    packed_case,
    padded_case,
    per_head_predicate,
    short_documents_case,
    spec_tree,
)

BACKENDS = list(_BACKENDS.values())
AUTO = [b for b in BACKENDS if b.auto_on("cpu")]  # the others compile per shape: representative cases only
STRICT = os.environ.get("ATTNMASK_STRICT_DEPS") == "1"
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "heads_last", "keys_transposed"]


def runnable(backend):
    """The backend, or a skip naming why its environment cannot run it here (a failure under strict deps on CPU)."""
    if "cpu" not in backend.devices:
        pytest.skip(f"{backend.name} runs on {', '.join(sorted(backend.devices))}, not on this CPU")
    missing = backend.available()
    if missing is not None:
        if STRICT:
            pytest.fail(f"{backend.name} declares the CPU but its environment is missing: {missing}")
        pytest.skip(f"{backend.name}: {missing}")
    return backend


@pytest.fixture(params=BACKENDS, ids=[b.name for b in BACKENDS])
def backend(request):
    return runnable(request.param)


@pytest.fixture(params=AUTO, ids=[b.name for b in AUTO])
def auto_backend(request):
    return runnable(request.param)


# ----------------------------------------------------------------------------------------------------------------------
# Cases: a mask, shapes, a dtype and a memory layout


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` ``(B, H, L, D)`` with the same values in another memory layout: ``heads_last`` as transformers hands
    projections over (``(B, L, H, D)`` transposed), ``keys_transposed`` with a last-dimension stride of ``L`` (a
    K-transposed cache)."""
    if layout == "heads_last":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "keys_transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def make_inputs(case, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    B, H, Hkv = case["batch"], case["heads"], case["kv_heads"]
    Q, K, D, Dv = case["q_len"], case["kv_len"], case["head_dim"], case["value_dim"]
    shapes = ((B, H, Q, D), (B, Hkv, K, D), (B, Hkv, K, Dv))
    dtype, layout = case.get("dtype", torch.float32), case.get("layout", "contiguous")
    made = []
    for shape in shapes:
        t = laid_out(torch.randn(shape, generator=gen).to(dtype), layout)
        made.append(t.requires_grad_(requires_grad))
    return made


def allowed(case) -> torch.Tensor:
    """``(B, 1 or H, Q, K)`` bool: the case's mask, dense (the reference's input)."""
    mask, B, Q, K = case["mask"], case["batch"], case["q_len"], case["kv_len"]
    if mask is None:
        return torch.ones(B, 1, Q, K, dtype=torch.bool)
    if isinstance(mask, am.MaskSpec) and mask.heads is not None:
        return mask.to_dense(Q, K, per_head=True).expand(B, -1, Q, K)
    if isinstance(mask, am.MaskSpec):
        return mask.to_dense(Q, K).expand(B, Q, K).unsqueeze(1)
    mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
    return torch.broadcast_to(mask, (B, mask.shape[1], Q, K))


@st.composite
def tensor_mask_case(draw):
    batch, kv_len = draw(st.integers(1, 2)), draw(st.integers(1, 12))
    case = draw(heads_and_dims(batch, draw(st.integers(1, 12)), kv_len))
    heads = draw(st.sampled_from([1, case["heads"]]))
    seed = draw(st.integers(0, 2**16))
    mask = torch.rand(batch, heads, case["q_len"], kv_len, generator=torch.Generator().manual_seed(seed)) > 0.3
    return mask, case


@st.composite
def spec_tree_case(draw):
    batch, kv_len = draw(st.integers(1, 2)), draw(st.integers(1, 24))
    q_len = draw(st.one_of(st.just(kv_len), st.integers(1, kv_len)))
    return draw(spec_tree(batch, kv_len)), draw(heads_and_dims(batch, q_len, kv_len))


@st.composite
def per_head_case(draw):
    """A per-head predicate for the case's query heads (``per_head_predicate``), with a random spec tree."""
    batch, kv_len = draw(st.integers(1, 2)), draw(st.integers(1, 16))
    case = draw(heads_and_dims(batch, draw(st.integers(1, kv_len)), kv_len))
    per_head, _ = draw(per_head_predicate(case["heads"], kv_len))
    tree = draw(spec_tree(batch, kv_len, depth=1))
    return draw(st.sampled_from([per_head, per_head & tree, tree | per_head, ~per_head])), case


@st.composite
def no_mask_case(draw):
    batch = draw(st.integers(1, 2))
    return None, draw(heads_and_dims(batch, draw(st.integers(1, 10)), draw(st.integers(1, 10))))


@st.composite
def score_mods(draw):
    """Score modifiers for ``attention(..., **mods)``, each present with probability 1/3, as numbers: ``softcap``, and
    seeds of the ``(H,)`` sinks and ALiBi slopes (made by :func:`make_mods` in the case's dtype and head count)."""
    mods = {}
    if draw(st.integers(0, 2)) == 0:
        mods["softcap"] = draw(st.floats(0.5, 8.0))
    if draw(st.integers(0, 2)) == 0:
        mods["sinks"] = draw(st.integers(0, 2**16))
    if draw(st.integers(0, 2)) == 0:
        mods["alibi_slopes"] = draw(st.integers(0, 2**16))
    return mods


def make_mods(case, requires_grad=False) -> dict:
    """The case's score modifiers as ``attention`` takes them: sinks ``(H,)`` in the case's dtype (a gradient when
    asked), slopes ``(H,)`` float32 in ``[0, 1)``."""
    mods, H = dict(case.get("mods", {})), case["heads"]
    if "sinks" in mods:
        sinks = 2 * torch.randn(H, generator=torch.Generator().manual_seed(mods["sinks"]))
        mods["sinks"] = sinks.to(case.get("dtype", torch.float32)).requires_grad_(requires_grad)
    if "alibi_slopes" in mods:
        mods["alibi_slopes"] = torch.rand(H, generator=torch.Generator().manual_seed(mods["alibi_slopes"]))
    return mods


@st.composite
def conformance_case(draw, dtypes=tuple(DTYPES)):
    """A mask (a random spec tree, packed documents, a padded batch, short documents, a bool tensor, a per-head spec
    or none), GQA
    heads, a dtype, a memory layout and score modifiers (softcap, sinks, ALiBi slopes, each one time in three)."""
    mask, case = draw(
        st.one_of(
            spec_tree_case(),
            packed_case(),
            padded_case(),
            short_documents_case(),
            tensor_mask_case(),
            per_head_case(),
            no_mask_case(),
        )
    )
    layout = draw(st.sampled_from(LAYOUTS))
    return dict(case, mask=mask, dtype=draw(st.sampled_from(dtypes)), layout=layout, mods=draw(score_mods()))


def per_head_window(b, h, q, k):
    """Query head ``h`` sees ``2 ** h`` keys back, itself included."""
    return q - k < 2**h


def representative_cases():
    """Fixed cases, one per kind of input a backend may specialise in: every backend must accept some of them (a
    backend that ``auto`` excludes on the CPU runs the first it accepts: rows with no key first)."""

    def dims(B, Q, K, H=4, Hkv=2, D=8, Dv=8):
        return dict(batch=B, heads=H, kv_heads=Hkv, q_len=Q, kv_len=K, head_dim=D, value_dim=Dv)

    lens = [5, 3, 12, 1, 9, 7, 2]
    return {
        "left padded": dict(
            dims(2, 6, 6), mask=am.causal() & am.key_padding(torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6]))
        ),
        "no mask": dict(dims(2, 6, 9), mask=None),
        "bool tensor": dict(
            dims(2, 5, 7), mask=torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.4
        ),
        "causal": dict(dims(1, 40, 40), mask=am.causal()),
        "decoding": dict(dims(2, 3, 20), mask=am.causal()),
        "packed documents": dict(dims(1, 39, 39), mask=am.causal() & am.document(seq_lens=lens)),
        "long documents": dict(dims(1, 100, 100), mask=am.causal() & am.document(seq_lens=[60, 40])),
        "window and prefix": dict(dims(1, 70, 70), mask=am.sliding_window(9) | am.prefix_lm(4)),
        "custom": dict(dims(1, 12, 12), mask=am.custom(lambda b, h, q, k: (q + k) % 3 != 0, name="q_plus_k_mod3")),
        "per-head windows": dict(dims(2, 10, 12), mask=am.causal() & am.custom(per_head_window, heads=4)),
    }


REPRESENTATIVE = representative_cases()


# ----------------------------------------------------------------------------------------------------------------------
# One check: refused through the declarations, or equal to the reference


def check(backend, case, *, with_grads=False, seed=0):
    """``backend`` either refuses ``case`` through ``not_supported_reasons`` (and ``attention`` then raises a
    ``BackendError``) or matches the naive reference in output (and gradients); returns whether it ran."""
    q, k, v = make_inputs(case, seed=seed, requires_grad=with_grads)
    mods = make_mods(case, requires_grad=with_grads)
    call = _prepare_call(q, k, v, case["mask"], None, None, None, **mods)
    reasons = backend.not_supported_reasons(call)
    if reasons:
        assert all(isinstance(r, str) and r for r in reasons)
        if set(mods) - {m.replace("alibi", "alibi_slopes") for m in backend.score_mods}:
            assert any("score modifiers" in r for r in reasons), reasons
        with pytest.raises(am.BackendError):
            am.attention(q, k, v, case["mask"], backend=backend.name, **mods)
        return False
    assert isinstance(backend.cost(call), float)
    got = am.attention(q, k, v, case["mask"], backend=backend.name, **mods)
    naive_mods = {name: t.detach() if isinstance(t, torch.Tensor) else t for name, t in mods.items()}
    want = naive_attention(q.detach(), k.detach(), v.detach(), allowed(case), **naive_mods)
    assert got.dtype == q.dtype and got.shape == want.shape
    atol, rtol = TOLERANCE[got.dtype]
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=f"{backend.name}: {case['mask']!r}")
    empty = ~allowed(case).any(-1, keepdim=True).expand(got.shape)  # rows with no allowed key: exactly 0
    assert torch.equal(got[empty], torch.zeros_like(got[empty])), f"{backend.name}: a row with no key is not 0"
    if with_grads:
        inputs, names = [q, k, v], ["q", "k", "v"]
        if "sinks" in mods:
            inputs.append(mods["sinks"])
            names.append("sinks")
        ins64 = [t.detach().double().requires_grad_() for t in inputs]
        if "sinks" in mods:
            naive_mods["sinks"] = ins64[3]
        want_grads = grads(naive_attention(*ins64[:3], allowed(case), **naive_mods), ins64)
        atol, rtol = GRAD_TOLERANCE[q.dtype]
        for name, g, w in zip(names, grads(got, inputs), want_grads, strict=True):
            torch.testing.assert_close(g.double(), w, atol=atol, rtol=rtol, msg=f"{backend.name}: d{name}")
    return True


def test_every_backend_accepts_some_representative_cases(backend):
    def accepts(case):
        q, k, v = make_inputs(case)
        return not backend.not_supported_reasons(_prepare_call(q, k, v, case["mask"], None, None, None))

    accepted = [name for name, case in REPRESENTATIVE.items() if accepts(case)]
    assert accepted, f"{backend.name} refused every representative case: its conformance tests would be vacuous"
    assert check(backend, REPRESENTATIVE[accepted[0]])  # and runs it (the only run of one auto excludes on the CPU)


def test_a_spec_of_one_row_serves_every_row_of_the_batch(backend):
    case = dict(
        batch=3,
        heads=4,
        kv_heads=2,
        q_len=12,
        kv_len=12,
        head_dim=16,
        value_dim=16,
        mask=am.causal() & am.document(seq_lens=[5, 7]),
    )
    if not check(backend, case):
        pytest.skip(f"{backend.name} refuses it through its declarations")


@pytest.mark.parametrize("name", list(REPRESENTATIVE))
def test_representative_cases_train_or_are_refused(auto_backend, name):
    check(auto_backend, REPRESENTATIVE[name], with_grads=True)


@pytest.mark.parametrize("backend", AUTO, ids=[b.name for b in AUTO])
@settings(max_examples=40)
@given(case=conformance_case())
def test_outputs_match_the_reference_or_are_refused(backend, case):
    check(runnable(backend), case)


@pytest.mark.parametrize("backend", AUTO, ids=[b.name for b in AUTO])
@settings(max_examples=20)
@given(case=conformance_case(dtypes=(torch.float32, torch.float64, torch.bfloat16)))
def test_gradients_match_the_reference_or_are_refused(backend, case):
    check(runnable(backend), case, with_grads=True)


# ----------------------------------------------------------------------------------------------------------------------
# Rows with no allowed key: exactly 0, and exactly 0 gradient


def empty_row_cases():
    """Cases with query rows that see no key, and which rows those are (``(B, Q)`` bool)."""
    pad = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    trailing = am.causal() & am.document(seq_lens=[3, 4], length=10)
    dims = dict(heads=4, kv_heads=2, head_dim=8, value_dim=8)
    return [
        (dict(dims, batch=2, q_len=8, kv_len=8, mask=am.causal() & am.key_padding(pad)), pad == 0),
        (dict(dims, batch=1, q_len=10, kv_len=10, mask=trailing), torch.arange(10)[None] >= 7),
        (dict(dims, batch=2, q_len=8, kv_len=8, mask=~am.full()), torch.ones(2, 8, dtype=torch.bool)),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_with_no_allowed_key_give_exact_zero_and_zero_gradient(auto_backend, dtype):
    if dtype not in auto_backend.dtypes:
        pytest.skip(f"{auto_backend.name} does not declare {dtype}")
    ran = 0
    for case, empty in empty_row_cases():
        q, k, v = make_inputs(dict(case, dtype=dtype), requires_grad=True)
        if auto_backend.not_supported_reasons(_prepare_call(q, k, v, case["mask"], None, None, None)):
            continue
        out = am.attention(q, k, v, case["mask"], backend=auto_backend.name)
        rows = empty[:, None, :, None].expand(out.shape)
        assert torch.equal(out[rows], torch.zeros_like(out[rows])) and torch.isfinite(out).all()
        weight = rows.to(dtype)  # a loss on the empty rows only: every gradient must be exactly 0
        for g in torch.autograd.grad((out * weight).sum(), (q, k, v)):
            assert torch.equal(g, torch.zeros_like(g))
        ran += 1
    assert ran, f"{auto_backend.name} refused every case with empty rows"


# ----------------------------------------------------------------------------------------------------------------------
# Degenerate shapes: a result or a refusal, never a raw exception


DEGENERATE = {"B=0": (0, 4, 8, 4), "Q=0": (1, 0, 8, 6), "K=0": (1, 3, 8, 0), "D=0": (1, 4, 0, 4)}


@pytest.mark.parametrize("shape", list(DEGENERATE))
@pytest.mark.parametrize("mask", ["none", "tensor", "causal", "documents"])
def test_degenerate_shapes_give_a_result_or_a_refusal(backend, shape, mask):
    B, Q, D, K = DEGENERATE[shape]
    case = dict(batch=B, heads=2, kv_heads=2, q_len=Q, kv_len=K, head_dim=D, value_dim=D, mask=None)
    if mask == "tensor":
        case["mask"] = torch.ones(Q, K, dtype=torch.bool)
    elif mask == "causal":
        case["mask"] = am.causal() if Q <= K else pytest.skip("a spec needs Q <= K at the default positions")
    elif mask == "documents":
        case["mask"] = am.causal() & am.document(seq_lens=[K], length=K) if 0 < Q <= K else pytest.skip("no keys")
    q, k, v = make_inputs(case)
    if backend.not_supported_reasons(_prepare_call(q, k, v, case["mask"], None, None, None)):
        with pytest.raises(am.BackendError):
            am.attention(q, k, v, case["mask"], backend=backend.name)
        return
    got = am.attention(q, k, v, case["mask"], backend=backend.name)
    want = naive_attention(q, k, v, allowed(case), scale=1.0 if D == 0 else None)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Masked-out keys never affect the output, NaN included


@pytest.mark.parametrize("where", ["k", "v"])
def test_a_nan_in_a_key_reaches_only_the_rows_that_may_see_it(auto_backend, where):
    ran = 0
    for case in (REPRESENTATIVE["packed documents"], REPRESENTATIVE["window and prefix"], REPRESENTATIVE["causal"]):
        q, k, v = make_inputs(case)
        if auto_backend.not_supported_reasons(_prepare_call(q, k, v, case["mask"], None, None, None)):
            continue
        key = case["kv_len"] // 2 + 3
        poisoned = (k if where == "k" else v).clone()
        poisoned[:, :, key] = float("nan")
        qkv = (q, poisoned, v) if where == "k" else (q, k, poisoned)
        got = am.attention(*qkv, case["mask"], backend=auto_backend.name)
        sees = allowed(case)[..., key].expand(got.shape[:3])  # (B, H, Q)
        assert got[sees].isnan().all(), "a query that may see the NaN key should get NaN"
        clean = naive_attention(q, k, v, allowed(case))
        torch.testing.assert_close(got[~sees].double(), clean[~sees], atol=2e-5, rtol=1e-4)
        ran += 1
    assert ran, f"{auto_backend.name} refused every case"


@st.composite
def poisons(draw, case):
    """1-3 non-finite entries of the case's keys or values: ``(tensor, b, kv_head, key, dim, value)``."""
    found = []
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["k", "v"]))
        dims = case["head_dim"] if where == "k" else case["value_dim"]
        spot = [draw(st.integers(0, n - 1)) for n in (case["batch"], case["kv_heads"], case["kv_len"], dims)]
        found.append((where, *spot, draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))))
    return found


@pytest.mark.parametrize("backend", AUTO, ids=[b.name for b in AUTO])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@settings(max_examples=25)
@given(case=conformance_case(dtypes=(torch.float32, torch.float64, torch.bfloat16)), data=st.data())
def test_non_finite_keys_and_values_reach_only_the_queries_that_may_see_them(backend, grad, case, data):
    """NaN and infinities at random keys and values: every query that may see none of them gets the reference output
    of the clean inputs (and, with a gradient, the reference query gradient), whether ``attention`` scans the keys
    before the run or, for a backend that declares ``propagates_nonfinite`` and a call without a gradient, the
    output after it; a query that may see a NaN gets NaN."""
    runnable(backend)
    q, k, v = make_inputs(case)
    mods = make_mods(case)
    if backend.not_supported_reasons(_prepare_call(q, k, v, case["mask"], None, None, None, **mods)):
        return
    H, Hkv = case["heads"], case["kv_heads"]
    dirty = {"k": k.clone(), "v": v.clone()}
    for where, b, h, key, dim, value in data.draw(poisons(case)):
        dirty[where][b, h, key, dim] = value
    # from the poisoned tensors, not the draws: a later draw may overwrite an earlier one's spot (NaN, then inf)
    bad = ~(dirty["k"].isfinite().all(-1) & dirty["v"].isfinite().all(-1))
    nan = dirty["k"].isnan().any(-1) | dirty["v"].isnan().any(-1)
    q.requires_grad_(grad)
    got = am.attention(q, dirty["k"], dirty["v"], case["mask"], backend=backend.name, **mods)
    dense = allowed(case)  # (B, 1 or H, Q, K)
    sees, sees_nan = ((dense & m.repeat_interleave(H // Hkv, 1)[:, :, None, :]).any(-1) for m in (bad, nan))
    assert got.isnan().any(-1)[sees_nan].all(), f"{backend.name}: a query that may see a NaN did not get NaN"
    q64 = q.detach().double().requires_grad_(grad)
    want = naive_attention(q64, k, v, dense, **{n: t.detach() if torch.is_tensor(t) else t for n, t in mods.items()})
    atol, rtol = TOLERANCE[got.dtype]
    torch.testing.assert_close(got[~sees].double(), want[~sees].detach(), atol=atol, rtol=rtol, msg=backend.name)
    if grad:
        got[~sees].float().sum().backward()
        (want_dq,) = torch.autograd.grad(want[~sees].sum(), q64)
        atol, rtol = GRAD_TOLERANCE[q.dtype]
        torch.testing.assert_close(q.grad[~sees].double(), want_dq[~sees], atol=atol, rtol=rtol, msg=backend.name)


@pytest.mark.parametrize("backend", AUTO, ids=[b.name for b in AUTO])
@settings(max_examples=25)
@given(case=conformance_case(dtypes=(torch.float32, torch.float64, torch.bfloat16)), data=st.data())
def test_non_finite_keys_no_query_may_see_leave_every_gradient_exact(backend, case, data):
    """NaN and infinities in keys and values that no query may see (a padding key, say): the output and the
    gradients of q, k and v over every row are those of the call with those keys and values at 0, and those keys'
    and values' own gradients exactly 0."""
    runnable(backend)
    case = dict(case, mods={n: m for n, m in case["mods"].items() if n != "sinks"})  # no gradient of sinks here
    q, k, v = make_inputs(case)
    mods = make_mods(case)
    if backend.not_supported_reasons(_prepare_call(q, k, v, case["mask"], None, None, None, **mods)):
        return
    H, Hkv = case["heads"], case["kv_heads"]
    dense = allowed(case)  # (B, 1 or H, Q, K)
    unseen = ~dense.any(-2)  # (B, 1 or H, K): no query of the head may see the key
    unseen = unseen.expand(case["batch"], H, case["kv_len"]).unflatten(1, (Hkv, H // Hkv)).all(2)  # (B, Hkv, K)
    spots = unseen.nonzero().tolist()
    if not spots:
        return
    dirty = {"k": k.detach().clone(), "v": v.detach().clone()}
    for _ in range(data.draw(st.integers(1, 3))):
        b, h, key = data.draw(st.sampled_from(spots))
        where = data.draw(st.sampled_from(["k", "v"]))
        dim = data.draw(st.integers(0, dirty[where].shape[-1] - 1))
        dirty[where][b, h, key, dim] = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    inputs = [t.detach().clone().requires_grad_() for t in (q, dirty["k"], dirty["v"])]
    got = am.attention(*inputs, case["mask"], backend=backend.name, **mods)
    got_grads = grads(got, inputs)
    clean = [q.detach()] + [t.detach().masked_fill(unseen.unsqueeze(-1), 0.0) for t in (k, v)]
    wanted = [t.double().requires_grad_() for t in clean]
    want = naive_attention(*wanted, dense, **mods)
    atol, rtol = TOLERANCE[got.dtype]
    torch.testing.assert_close(got.double(), want.detach(), atol=atol, rtol=rtol, msg=backend.name)
    atol, rtol = GRAD_TOLERANCE[q.dtype]
    for name, g, w in zip("qkv", got_grads, grads(want, wanted), strict=True):
        assert torch.isfinite(g).all(), f"{backend.name}: a non-finite d{name}"
        torch.testing.assert_close(g.double(), w, atol=atol, rtol=rtol, msg=f"{backend.name}: d{name}")
    for name, g in zip("kv", got_grads[1:], strict=True):
        assert not g[unseen].any(), f"{backend.name}: a key no query may see got a d{name}"


@pytest.mark.parametrize("backend", AUTO, ids=[b.name for b in AUTO])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@settings(max_examples=25)
@given(case=conformance_case(dtypes=(torch.float32, torch.float64, torch.bfloat16)), data=st.data())
def test_a_nan_in_a_query_makes_exactly_its_row_nan(backend, grad, case, data):
    """NaN at random entries of q: a query row holding one gets NaN wherever it has an allowed key (every score it
    computes is NaN; torch's fused CPU kernel, run without a mask on fewer than 16 keys, gave such rows 0) and exactly
    0 where it has none; every other row gets the reference output (and, with a gradient, query gradient)."""
    runnable(backend)
    q, k, v = make_inputs(case)
    mods = make_mods(case)
    if backend.not_supported_reasons(_prepare_call(q, k, v, case["mask"], None, None, None, **mods)):
        return
    dims = (case["batch"], case["heads"], case["q_len"], case["head_dim"])
    dirty = q.detach().clone()
    for _ in range(data.draw(st.integers(1, 3))):
        dirty[tuple(data.draw(st.integers(0, n - 1)) for n in dims)] = float("nan")
    dirty.requires_grad_(grad)
    got = am.attention(dirty, k, v, case["mask"], backend=backend.name, **mods)
    has_key = allowed(case).any(-1).expand(got.shape[:3])  # (B, H, Q)
    poisoned = dirty.detach().isnan().any(-1)
    assert got[poisoned & has_key].isnan().all(-1).all(), f"{backend.name}: a query row with a NaN did not get NaN"
    assert not got[poisoned & ~has_key].any(), f"{backend.name}: a NaN query row with no allowed key is not 0"
    q64 = q.detach().double().requires_grad_(grad)
    want = naive_attention(
        q64, k, v, allowed(case), **{n: t.detach() if torch.is_tensor(t) else t for n, t in mods.items()}
    )
    atol, rtol = TOLERANCE[got.dtype]
    clean = ~poisoned
    torch.testing.assert_close(got[clean].double(), want[clean].detach(), atol=atol, rtol=rtol, msg=backend.name)
    if grad:
        got[clean].float().sum().backward()
        (want_dq,) = torch.autograd.grad(want[clean].sum(), q64)
        atol, rtol = GRAD_TOLERANCE[q.dtype]
        torch.testing.assert_close(dirty.grad[clean].double(), want_dq[clean], atol=atol, rtol=rtol, msg=backend.name)


@pytest.mark.parametrize("backend", AUTO, ids=[b.name for b in AUTO])
@settings(max_examples=25)
@given(case=conformance_case(dtypes=(torch.float32, torch.float64, torch.bfloat16)), data=st.data())
def test_a_non_finite_query_in_a_row_with_no_key_has_no_gradient(backend, case, data):
    """NaN or an infinity in the query of a row with no allowed key: that row's output is 0 whatever its query
    (DESIGN: exactly 0 and a zero gradient), so the exact gradients of q, k and v are those of the call with that
    query at 0, the row's own query gradient exactly 0. A backend that lets the row's scores into its backward gets
    ``0 · NaN`` in them."""
    runnable(backend)
    q, k, v = make_inputs(case)
    mods = make_mods(case)
    if backend.not_supported_reasons(_prepare_call(q, k, v, case["mask"], None, None, None, **mods)):
        return
    has_key = allowed(case).any(-1).expand(case["batch"], case["heads"], case["q_len"])  # (B, H, Q)
    empty = (~has_key).nonzero().tolist()
    if not empty:
        return
    dirty = q.detach().clone()
    for _ in range(data.draw(st.integers(1, 3))):
        b, h, i = data.draw(st.sampled_from(empty))
        d = data.draw(st.integers(0, case["head_dim"] - 1))
        dirty[b, h, i, d] = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    clean = q.detach().masked_fill(~has_key.unsqueeze(-1), 0.0)
    sinks = [mods.pop("sinks")] if "sinks" in mods else []  # a gradient of the sinks too, passed as leaves below

    def with_sinks(leaves: list) -> dict:
        return dict(mods, sinks=leaves[3]) if sinks else mods

    inputs = [t.detach().clone().requires_grad_() for t in (dirty, k, v, *sinks)]
    got = am.attention(*inputs[:3], case["mask"], backend=backend.name, **with_sinks(inputs))
    assert not got[~has_key].any(), f"{backend.name}: a row with no allowed key is not 0"
    got_grads = grads(got, inputs)
    wanted = [t.detach().double().requires_grad_() for t in (clean, k, v, *sinks)]
    want = naive_attention(*wanted[:3], allowed(case), **with_sinks(wanted))
    atol, rtol = GRAD_TOLERANCE[q.dtype]
    for name, g, w in zip(["q", "k", "v", "sinks"][: len(inputs)], got_grads, grads(want, wanted), strict=True):
        assert torch.isfinite(g).all(), f"{backend.name}: a non-finite d{name}"
        torch.testing.assert_close(g.double(), w, atol=atol, rtol=rtol, msg=f"{backend.name}: d{name}")
    assert not got_grads[0][~has_key].any(), f"{backend.name}: the gradient of a query with no allowed key is not 0"


@pytest.mark.parametrize("structure", ["causal", "full", "window"])
def test_a_nan_query_in_padding_rows_of_a_larger_call_has_no_gradient(auto_backend, structure):
    """The same at 300 tokens, two rows padded from 250 (the tiled kernels' paths), in float32, bfloat16 and float16
    (whose sum of q, the check for a non-finite value, is taken in float32)."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.zeros(2, 300, dtype=torch.long)
    ids[:, 250:] = -1
    base = {"causal": am.causal(), "full": am.full(), "window": am.causal() & am.sliding_window(64)}[structure]
    mask = base & am.document(doc_ids=ids)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q, k, v = (torch.randn(2, 2, 300, 16, generator=gen).to(dtype) for _ in range(3))
        if auto_backend.not_supported_reasons(_prepare_call(q, k, v, mask, None, None, None)):
            continue
        dirty = q.clone()
        dirty[:, :, 270, 0] = float("nan")
        dirty[1, 0, 299, 5] = float("inf")
        clean = q.clone()
        clean[:, :, 250:] = 0
        runs = []
        for query in (dirty, clean):
            inputs = [t.clone().requires_grad_() for t in (query, k, v)]
            runs.append(grads(am.attention(*inputs, mask, backend=auto_backend.name), inputs))
        for name, g, w in zip("qkv", *runs, strict=True):
            torch.testing.assert_close(g, w, msg=f"{auto_backend.name} {dtype}: d{name}")


def _nan_scenario(name):
    """``(q, k, v, mask)`` of a call where a row's every score is NaN (found by the tests above at more examples)."""
    gen = torch.Generator().manual_seed(1)
    nan = float("nan")
    if name == "one key, a NaN key":  # Q = K = 1: torch's fused kernel on fewer than 16 keys reads the row as empty
        q, k, v = (torch.randn(1, 1, 1, 4, generator=gen) for _ in range(3))
        k[..., 0] = nan
        return q, k, v, am.causal()
    if name == "causal, a NaN query":
        q, k, v = (torch.randn(1, 2, 8, 8, generator=gen) for _ in range(3))
        q[0, 1, 7, 3] = nan
        return q, k, v, am.causal()
    if name == "decoding, NaN new keys":  # sdpa's causal split: the tail part of 2 keys, every score NaN
        q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for n in (2, 40, 40))
        k[0, :, 38:, 3] = nan
        return q, k, v, am.causal()
    if name == "a last document of 10 keys":  # blocksparse: a FULL run of 10 keys at the row's end
        q, k, v = (torch.randn(1, 2, 138, 8, generator=gen) for _ in range(3))
        q[0, 0, 135, 1] = nan
        k[0, 1, 128:, 2] = nan
        return q, k, v, am.full() & am.document(seq_lens=[128, 10])
    if name == "no mask, a NaN key beside an infinite one":  # scores NaN and -inf: the kernel's max is -inf, as empty
        q, k, v = torch.randn(1, 2, 1, 4, generator=gen), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4)
        q[0, :, 0, 0] = torch.tensor([1.0, -1.0])  # the infinite key's score +inf in head 0, -inf in head 1
        k[0, 0, 0, 0], k[0, 0, 1, 0] = nan, float("inf")
        return q, k, v, am.full()
    if name == "a NaN query in a padding row":  # no allowed key: exactly 0, whatever the query
        q, k, v = (torch.randn(2, 2, 40, 8, generator=gen) for _ in range(3))
        ids = torch.zeros(2, 40, dtype=torch.long)
        ids[:, 30:] = -1
        q[:, :, 35, 0] = nan
        return q, k, v, am.causal() & am.document(doc_ids=ids)
    raise ValueError(name)


NAN_SCENARIOS = [
    "one key, a NaN key",
    "causal, a NaN query",
    "decoding, NaN new keys",
    "a last document of 10 keys",
    "a NaN query in a padding row",
    "no mask, a NaN key beside an infinite one",
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", NAN_SCENARIOS)
def test_rows_whose_every_score_is_nan_get_nan(auto_backend, name, dtype):
    """A row with an allowed key gets NaN where its query holds a NaN or it may see a key or value that does, and 0
    where it has no allowed key; every other row the reference output; without a gradient (where ``attention`` trusts
    a finite output). The fused CPU kernel gives a row whose every score is NaN, or NaN and ``-inf``, 0 on fewer than
    16 keys, which a merge of parts or that finite-output check then kept."""
    q, k, v, mask = _nan_scenario(name)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if auto_backend.not_supported_reasons(_prepare_call(q, k, v, mask, None, None, None)):
        pytest.skip(f"{auto_backend.name} refuses the case")
    got = am.attention(q, k, v, mask, backend=auto_backend.name).double()
    H, Hkv = q.shape[1], k.shape[1]
    dense = allowed(dict(batch=q.shape[0], q_len=q.shape[2], kv_len=k.shape[2], mask=mask))  # (B, 1, Q, K)
    bad_keys = (k.isnan().any(-1) | v.isnan().any(-1)).repeat_interleave(H // Hkv, 1)[:, :, None, :]  # (B, H, 1, K)
    has_key, sees_nan = dense.any(-1).expand(-1, H, -1), (dense & bad_keys).any(-1)  # (B, H, Q)
    nan_rows = has_key & (q.isnan().any(-1) | sees_nan)
    assert torch.equal(got.isnan().all(-1), nan_rows), f"{auto_backend.name}: NaN rows differ from the semantics"
    assert not got.isnan().any(-1)[~nan_rows].any(), f"{auto_backend.name}: a NaN outside those rows"
    assert not got[~has_key].any(), f"{auto_backend.name}: a row with no allowed key is not 0"
    want = naive_attention(q, k, v, dense)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(got[~nan_rows], want[~nan_rows], atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------------------------------
# A K-transposed cache (last-dimension stride != 1)


def test_keys_of_a_transposed_cache_give_the_reference_output_and_gradients(auto_backend):
    L = 512
    case = dict(batch=1, heads=2, kv_heads=2, q_len=L, kv_len=L, head_dim=16, value_dim=16)
    case.update(mask=am.causal() & am.chunked(64), layout="keys_transposed")
    assert make_inputs(case)[1].stride(-1) == L
    check(auto_backend, case, with_grads=True)


# Inputs whose last dimension is strided on each of sdpa's splits, which call torch's fused CPU op directly: that op
# reads rows as vectors without checking the stride (a transposed cache gave garbage there, ~1e34 off, with no error)
STRIDED_SPLITS = {
    "causal, Q < K": ("_split_causal", dict(q_len=4, kv_len=300, heads=2, kv_heads=2), lambda: am.causal()),
    "causal, Q < K, grouped": ("_split_causal", dict(q_len=4, kv_len=300, heads=4, kv_heads=2), lambda: am.causal()),
    "prefix-LM": ("_split_prefix", dict(q_len=300, kv_len=300, heads=2, kv_heads=2), lambda: am.prefix_lm(100)),
    "window": ("_split_window", dict(q_len=700, kv_len=700, heads=2, kv_heads=2), lambda: am.sliding_window(512)),
    "padded rows": (
        "_split_padded",
        dict(q_len=300, kv_len=300, heads=2, kv_heads=2),
        lambda: am.causal() & am.key_padding(torch.arange(300) < torch.tensor([[300], [260]])),
    ),
}


@pytest.mark.parametrize("split", list(STRIDED_SPLITS))
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_strided_last_dimensions_give_the_reference_on_every_split(monkeypatch, auto_backend, split, grad):
    """q, k and v with a last-dimension stride of L (a K-transposed cache) on each structure ``sdpa`` splits into
    calls of torch's fused CPU op (``sdpa._flash_forward`` / ``_flash_backward`` give it unit strides): every backend
    matches the reference in output and gradients, and ``sdpa`` takes the split (without a gradient; with one where
    the split keeps its own backward)."""
    taken, sizes, spec = STRIDED_SPLITS[split]
    case = dict(batch=2, head_dim=16, value_dim=16, **sizes, mask=spec(), layout="keys_transposed")
    assert make_inputs(case)[0].stride(-1) == case["q_len"]
    seen = []
    if auto_backend.name == "sdpa":
        real = getattr(sdpa_module, taken)
        monkeypatch.setattr(sdpa_module, taken, lambda *a, **kw: seen.append(taken) or real(*a, **kw))
    check(auto_backend, case, with_grads=grad)
    if auto_backend.name == "sdpa" and not (grad and taken == "_split_causal"):  # that split is forward-only
        assert seen, f"sdpa did not take {taken}"


# ----------------------------------------------------------------------------------------------------------------------
# Attention dropout, where declared


@pytest.mark.parametrize("backend", [b for b in AUTO if b.dropout], ids=[b.name for b in AUTO if b.dropout])
def test_dropout_is_unbiased_and_never_weights_a_masked_key(backend):
    backend = runnable(backend)
    spec = am.causal() & am.document(seq_lens=[5, 30, 40], length=80)  # tiny and longer documents, then padding
    draws, Q = 200, 80
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, Q, 8, generator=gen), torch.randn(1, 1, Q, 8, generator=gen)
    v = torch.eye(Q).expand(1, 1, Q, Q)  # values I: the output row is the query's probability row
    assert not backend.not_supported_reasons(_prepare_call(q, k, v, spec, None, None, None, 0.5))
    probs = am.attention(q, k, v, spec, backend=backend.name)
    torch.manual_seed(0)
    samples = am.attention(*(t.expand(draws, -1, -1, -1) for t in (q, k, v)), spec, backend=backend.name, dropout_p=0.5)
    assert not (samples[:, (probs == 0)[0]] != 0).any(), "dropout gave weight to a masked key"
    kept = samples != 0
    torch.testing.assert_close(samples[kept], (probs / 0.5).expand_as(samples)[kept], rtol=1e-5, atol=1e-6)
    mean, sem = samples.double().mean(0), samples.double().std(0) / draws**0.5
    z = (mean - probs[0].double()).abs() / (sem + 1e-9)
    assert float(z.amax()) < 6.0, f"the average over draws is biased: largest z-score {float(z.amax()):.1f}"
