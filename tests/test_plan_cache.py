"""Attention plans are cached per spec object and call signature: repeated calls plan once, distinct shapes get
their own entries, an in-place write to the spec's tensors invalidates them, entries die with the spec, and results
across cache hits equal the reference backend."""

import copy
import dataclasses
import gc
import importlib
import pickle
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnmask as am
from attnmask import plancache
from attnmask.attention import Backend, _prepare_call, choose_backend
from attnmask.backends import _common, banded, blocksparse, reference
from attnmask.masks import PLANS_ATTRIBUTE
from tests.helpers import assert_matches_reference, grads, make_qkv
from tests.naive import naive_attention, naive_dense
from tests.strategies import short_documents_case

A = importlib.import_module("attnmask.attention")  # the module; `attnmask.attention` is the function
SPARSE = ("varlen", "blocksparse", "banded")


def qkv(batch=1, heads=4, kv_heads=2, length=24, dim=8, dtype=torch.float32, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((batch, heads, length, dim), (batch, kv_heads, length, dim), (batch, kv_heads, length, dim))
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_(requires_grad) for s in shapes]


def packed_spec(lens=(5, 9, 3, 7), length=24):
    return am.causal() & am.document(seq_lens=list(lens), length=length)


@pytest.fixture
def planning_counts(monkeypatch):
    """How many times each planning function ran (varlen segments, block layout, its tile groups, key band, the
    band's masks)."""
    counts = {"varlen": 0, "layout": 0, "groups": 0, "banded": 0, "band_masks": 0}
    for module, name, key in (
        (_common, "_build_varlen_plan", "varlen"),
        (blocksparse, "_layout", "layout"),
        (blocksparse, "_layout_groups", "groups"),
        (banded, "_plan", "banded"),
        (banded, "_call_band_masks", "band_masks"),
    ):
        original = getattr(module, name)

        def counted(call, original=original, key=key):
            counts[key] += 1
            return original(call)

        monkeypatch.setattr(module, name, counted)
    return counts


# ---------------------------------------------------------------------------------------------------------------------
# Hits


def test_repeated_calls_with_one_spec_plan_each_backend_once(planning_counts):
    spec = packed_spec()
    q, k, v = qkv()
    for backend in ("auto", *SPARSE, "auto"):
        am.attention(q, k, v, spec, backend=backend)
    assert planning_counts == {"varlen": 1, "layout": 1, "groups": 1, "banded": 1, "band_masks": 1}


def test_a_cache_hit_returns_the_same_plan_object():
    spec = packed_spec()
    q, k, v = qkv()
    first, second = (_prepare_call(q, k, v, spec, None, None, None) for _ in range(2))
    plan = _common.varlen_plan(first)
    assert _common.cached(second, "varlen", lambda call: pytest.fail("planned again")) is plan


def test_one_call_object_finds_its_plans_again_until_the_grad_mode_or_the_spec_changes():
    """``call_plans`` remembers its answer on the call object (a choice asks 7-10 times): the same dict while the grad
    mode and the spec's tensors are as they were; under ``no_grad`` the entry of a call that needs no gradient; after
    an in-place write to the spec's document ids a fresh, empty dict, as for a new call object."""
    q, k, v = qkv(requires_grad=True)
    spec = am.causal() & am.document(doc_ids=torch.tensor([[0] * 10 + [1] * 14]))
    call = _prepare_call(q, k, v, spec, None, None, None)
    plans = plancache.call_plans(call)
    plans["marker"] = 1
    assert plancache.call_plans(call) is plans
    with torch.no_grad():
        without_grad = plancache.call_plans(call)
        assert without_grad is not plans and "marker" not in without_grad
        assert without_grad is plancache.call_plans(_prepare_call(q, k, v, spec, None, None, None))
    assert plancache.call_plans(call) is plans
    spec.parts[1].doc_ids[0, 0] = 1
    assert "marker" not in plancache.call_plans(call)
    assert plancache.call_plans(call) is plancache.call_plans(_prepare_call(q, k, v, spec, None, None, None))
    private = _prepare_call(q, k, v, am.custom(lambda b, h, i, j: i >= j), None, None, None)  # never shared
    mine = plancache.call_plans(private)
    with torch.no_grad():
        assert plancache.call_plans(private) is mine
    assert mine is not plancache.call_plans(_prepare_call(q, k, v, private.mask, None, None, None))


def test_a_repeated_auto_call_asks_no_backend_for_support_or_cost(monkeypatch):
    asked = []

    def spy(b):
        def unsupported(call):
            asked.append(b.name)
            return b.unsupported(call)

        return dataclasses.replace(b, unsupported=unsupported)

    monkeypatch.setattr(A, "_BACKENDS", {name: spy(b) for name, b in A._BACKENDS.items()})
    spec = packed_spec()
    q, k, v = qkv()
    first = choose_backend(_prepare_call(q, k, v, spec, None, None, None))
    n_asked = len(asked)
    assert choose_backend(_prepare_call(q, k, v, spec, None, None, None)) is first
    assert n_asked >= 1 and len(asked) == n_asked  # the first call asked (floors rule out the rest unasked)


def test_a_backend_registered_after_a_call_is_considered_by_the_next_auto_call(monkeypatch):
    spec = packed_spec()
    q, k, v = qkv()
    before = am.attention(q, k, v, spec)
    free = Backend("free", reference.BACKEND.run, lambda call: 0.0)
    monkeypatch.setattr(A, "_BACKENDS", {**A._BACKENDS, "free": free})
    assert choose_backend(_prepare_call(q, k, v, spec, None, None, None)) is free
    torch.testing.assert_close(am.attention(q, k, v, spec), before)


# ---------------------------------------------------------------------------------------------------------------------
# Separate entries


@pytest.mark.parametrize(
    "change",
    [
        dict(heads=8),
        dict(kv_heads=1),
        dict(batch=3),
        dict(dim=16),
        dict(dtype=torch.float64),
        dict(requires_grad=True),
    ],
    ids=lambda change: ",".join(f"{k}={v}" for k, v in change.items()),
)
def test_a_different_shape_dtype_or_grad_requirement_gets_its_own_entry(planning_counts, change):
    spec = packed_spec()
    am.attention(*qkv(), spec, backend="varlen")
    q, k, v = qkv(**change)
    got = am.attention(q, k, v, spec, backend="varlen")
    assert planning_counts["varlen"] == 2 and plancache.cached_signatures(spec) == 2
    want = naive_attention(q, k, v, naive_dense(spec, 24, 24).unsqueeze(1))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


def test_a_different_scale_gets_its_own_entry_and_is_applied():
    spec = packed_spec()
    q, k, v = qkv()
    am.attention(q, k, v, spec)
    got = am.attention(q, k, v, spec, scale=0.5)
    assert plancache.cached_signatures(spec) == 2
    torch.testing.assert_close(got, am.attention(q, k, v, spec, backend="reference", scale=0.5))


def test_at_most_entries_per_spec_signatures_are_kept_least_recent_dropped(planning_counts):
    spec = packed_spec()
    n = plancache.ENTRIES_PER_SPEC + 2
    for heads in range(1, n + 1):
        am.attention(*qkv(heads=heads, kv_heads=1), spec, backend="varlen")
    assert plancache.cached_signatures(spec) == plancache.ENTRIES_PER_SPEC
    am.attention(*qkv(heads=n, kv_heads=1), spec, backend="varlen")  # newest: kept
    assert planning_counts["varlen"] == n
    am.attention(*qkv(heads=1, kv_heads=1), spec, backend="varlen")  # oldest: dropped, planned again
    assert planning_counts["varlen"] == n + 1


def test_specs_with_a_custom_predicate_or_explicit_positions_are_planned_per_call(planning_counts):
    custom = am.custom(lambda b, h, q, k: k <= q) & am.document(seq_lens=[5, 9, 3, 7], length=24)
    q, k, v = qkv()
    for _ in range(2):
        am.attention(q, k, v, custom, backend="blocksparse")
    spec = packed_spec()
    pos = torch.arange(24)
    for _ in range(2):
        am.attention(q, k, v, spec, backend="blocksparse", q_positions=pos, kv_positions=pos)
    assert planning_counts["layout"] == 4
    assert plancache.cached_signatures(custom) == 0 and plancache.cached_signatures(spec) == 0


def test_explicit_positions_are_never_served_a_plan_made_for_other_positions():
    backend = "blocksparse"  # its layout depends on the positions
    spec = packed_spec(lens=(40, 60, 28), length=128)
    q, k, v = qkv(length=128)
    am.attention(q, k, v, spec, backend=backend)
    pos = torch.arange(128)
    kw = dict(q_positions=pos.flip(0), kv_positions=pos)
    got = am.attention(q, k, v, spec, backend=backend, **kw)
    torch.testing.assert_close(got, am.attention(q, k, v, spec, backend="reference", **kw))


@pytest.mark.parametrize("backend", ["auto", "blocksparse", "sdpa"])
def test_a_spec_of_inference_mode_tensors_is_cached_by_its_contents(backend):
    """Inference-mode tensors have no version counter: the spec keeps a copy of their contents and compares it on
    every call, so the plans are shared while the contents hold and remade after an in-place write (which the
    output then follows, never the old plans)."""
    with torch.inference_mode():
        mask = torch.arange(24).expand(2, 24) < torch.tensor([[24], [13]])
        spec = am.causal() & am.key_padding(mask)
        q, k, v = qkv(batch=2)
        got = [am.attention(q, k, v, spec, backend=backend) for _ in range(2)]
        assert plancache.cached_signatures(spec) == 1
        want = naive_attention(q, k, v, naive_dense(spec, 24, 24).unsqueeze(1))
        for out in got:
            assert_matches_reference(out, want)
        mask[0, 6:] = False  # in place, no version counter to see it
        after = am.attention(q, k, v, spec, backend=backend)
    assert_matches_reference(after, naive_attention(q, k, v, naive_dense(spec, 24, 24).unsqueeze(1)))
    assert not torch.allclose(after, got[0])


def test_a_spec_of_large_inference_mode_tensors_is_not_cached_and_still_correct(monkeypatch):
    monkeypatch.setattr(plancache, "SNAPSHOT_MAX_BYTES", 16)  # the mask below takes 48 bytes
    with torch.inference_mode():
        mask = torch.arange(24).expand(2, 24) < torch.tensor([[24], [13]])
        spec = am.causal() & am.key_padding(mask)
        q, k, v = qkv(batch=2)
        got = [am.attention(q, k, v, spec, backend="blocksparse") for _ in range(2)]
    assert plancache.cached_signatures(spec) == 0
    want = naive_attention(q, k, v, naive_dense(spec, 24, 24).unsqueeze(1))
    for out in got:
        assert_matches_reference(out, want)


# ---------------------------------------------------------------------------------------------------------------------
# Invalidation


@pytest.mark.parametrize(
    "attention_span, backend",
    [(am.causal(), b) for b in ("auto", "varlen", "blocksparse")]  # a causal row of 512 keys has no narrow band
    + [(am.sliding_window(16), b) for b in ("auto", *SPARSE)],
    ids=repr,
)
def test_writing_the_key_padding_mask_in_place_invalidates_the_plans(attention_span, backend):
    mask = torch.ones(2, 512, dtype=torch.bool)
    spec = attention_span & am.key_padding(mask)
    q, k, v = qkv(batch=2, length=512)  # long enough that "auto" plans a sparse backend
    before = am.attention(q, k, v, spec, backend=backend)
    mask[1, :100] = False  # row 1 becomes left-padded, row 0 too by 3 tokens
    mask[0, :3] = False
    after = am.attention(q, k, v, spec, backend=backend)
    torch.testing.assert_close(after, am.attention(q, k, v, spec, backend="reference"))
    assert not torch.allclose(after, before)  # the write changes the answer, so a stale plan would be caught


@pytest.mark.parametrize("backend", ["auto", *SPARSE])
def test_writing_document_ids_in_place_invalidates_the_plans(backend):
    ids = torch.arange(256).div(4, rounding_mode="floor").unsqueeze(0)  # 64 documents of 4 tokens
    spec = am.causal() & am.document(doc_ids=ids)
    q, k, v = qkv(length=256)  # long enough that "auto" plans a sparse backend
    before = am.attention(q, k, v, spec, backend=backend)
    ids[0, :192] = 0  # the first 48 merge: a document of 192 tokens, wider than any band or tile planned for 4
    after = am.attention(q, k, v, spec, backend=backend)
    torch.testing.assert_close(after, am.attention(q, k, v, spec, backend="reference"))
    assert not torch.allclose(after, before)


# ---------------------------------------------------------------------------------------------------------------------
# Lifetime


@pytest.mark.parametrize("backend", SPARSE)
def test_cached_plans_die_with_the_spec(backend):
    spec = am.causal() & am.key_padding(torch.arange(24).expand(2, 24) >= torch.tensor([[0], [11]]))  # left padding
    q, k, v = qkv(batch=2)
    am.attention(q, k, v, spec, backend=backend)
    record = weakref.ref(spec.__dict__[PLANS_ATTRIBUTE])  # holds the entries and through them every plan
    assert plancache.cached_signatures(spec) == 1
    spec_ref = weakref.ref(spec)
    del spec
    gc.collect()
    assert spec_ref() is None and record() is None


def test_pickling_or_copying_a_spec_leaves_its_plans_behind():
    spec = packed_spec()
    am.attention(*qkv(), spec, backend="varlen")
    for other in (pickle.loads(pickle.dumps(spec)), copy.copy(spec), copy.deepcopy(spec)):
        assert PLANS_ATTRIBUTE not in other.__dict__ and repr(other) == repr(spec)
        assert torch.equal(other.to_dense(24), spec.to_dense(24))


def test_structural_properties_are_kept_on_a_composed_spec_and_left_behind_by_copies(monkeypatch):
    """``is_structural`` and ``heads`` of a composed spec walk its parts at most once (attention asks several times
    a call): ``&`` keeps the heads it checked, a spec built from its parts directly walks them on the first ask;
    pickles and copies carry only the fields, and a per-head or custom part still answers for itself."""
    asked = []
    real = am.masks._common_heads
    spec = packed_spec()  # composing checks the parts' heads once, and keeps the answer
    direct = am.masks.And(spec.parts)
    monkeypatch.setattr(am.masks, "_common_heads", lambda parts: asked.append(1) or real(parts))
    assert spec.is_structural and spec.heads is None and spec.heads is None and not asked
    assert direct.heads is None and direct.heads is None and len(asked) == 1
    assert direct.batch_size == spec.batch_size == 1
    for other in (pickle.loads(pickle.dumps(spec)), copy.copy(spec), copy.deepcopy(spec)):
        assert am.masks._MEMO_ATTRIBUTE not in other.__dict__ and other.is_structural
    per_head = spec & am.custom(lambda b, h, q, k: q >= k, heads=3)
    assert not per_head.is_structural and per_head.heads == 3 and (~per_head).heads == 3
    assert (per_head | am.causal()).is_structural is False


def test_spec_tensors_lists_every_tensor_of_every_part():
    mask, ids, prefix = torch.ones(2, 8, dtype=torch.bool), torch.zeros(2, 8, dtype=torch.long), torch.tensor([2, 3])
    spec = (am.causal() | am.prefix_lm(prefix)) & am.key_padding(mask) & ~am.document(doc_ids=ids)
    assert [id(t) for t in spec.tensors()] == [id(prefix), id(mask), id(ids)]
    assert am.causal().tensors() == ()


# ---------------------------------------------------------------------------------------------------------------------
# Results across hits


@pytest.mark.parametrize("backend", ["auto", *SPARSE])
@settings(max_examples=20)
@given(problem=short_documents_case())
def test_outputs_and_gradients_across_cache_hits_equal_the_reference_backend(backend, problem):
    spec, case = problem  # causal rows of short documents, maybe a window and key padding: every sparse backend's form
    for seed in range(3):  # the first call plans, the others hit the cache with new inputs
        q, k, v = make_qkv(case, seed=seed, requires_grad=True)
        got = am.attention(q, k, v, spec, backend=backend)
        want = am.attention(q, k, v, spec, backend="reference")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        for g, w in zip(grads(got, (q, k, v)), grads(want, (q, k, v)), strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    assert plancache.cached_signatures(spec) == 1


# ---------------------------------------------------------------------------------------------------------------------
# Repeated calls: a call of the same kind on the same spec object skips the input checks


@pytest.fixture
def prepared(monkeypatch):
    """How many calls ran the full input checks (``_prepare_call``)."""
    counts = {"prepared": 0}
    original = A._prepare_call

    def counted(*args, **kwargs):
        counts["prepared"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(A, "_prepare_call", counted)
    return counts


@pytest.mark.parametrize("backend", ["auto", "sdpa", *SPARSE])
def test_a_repeated_call_skips_the_checks_and_gives_what_a_new_spec_gives(prepared, backend):
    spec = packed_spec()
    for seed in range(3):
        q, k, v = qkv(seed=seed)
        got = am.attention(q, k, v, spec, backend=backend)
        assert torch.equal(got, am.attention(q, k, v, packed_spec(), backend=backend))  # a new spec: checked
    assert prepared["prepared"] == 1 + 3


BAD_SECOND_CALLS = [  # second calls that the checks refuse, each with the error a new spec's call raises
    (lambda q, k, v: ((q, k.double(), v), {}), am.DTypeError),
    (lambda q, k, v: ((q, k, v[..., :-1, :]), {}), am.ShapeError),
    (lambda q, k, v: ((q, k, v.to("meta")), {}), am.DeviceError),
    (lambda q, k, v: ((q[0], k, v), {}), am.ShapeError),
    (lambda q, k, v: ((q.to_sparse(), k, v), {}), am.AttnmaskError),
    (lambda q, k, v: ((torch.nested.as_nested_tensor([q[0], q[0]], layout=torch.jagged), k, v), {}), am.AttnmaskError),
    (lambda q, k, v: ((q.int(), k.int(), v.int()), {}), am.DTypeError),
    (lambda q, k, v: ((q, k, v), {"scale": float("nan")}), am.InputError),
    (lambda q, k, v: ((q, k, v), {"scale": True}), am.InputError),
    (lambda q, k, v: ((q, k, v), {"dropout_p": 1.0}), am.InputError),
    (lambda q, k, v: ((q, k, v), {"backend": "no such backend"}), am.BackendError),
    (lambda q, k, v: ((q.expand(3, -1, -1, -1), k, v), {}), am.ShapeError),  # k and v keep a batch of 1
]


@pytest.mark.parametrize("case", range(len(BAD_SECOND_CALLS)))
def test_a_repeated_spec_still_refuses_bad_inputs(case):
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    spec = am.causal() & am.document(doc_ids=ids)
    q, k, v = qkv(length=8)
    am.attention(q, k, v, spec)
    am.attention(q, k, v, spec)  # now remembered
    make, error = BAD_SECOND_CALLS[case]
    args, kwargs = make(q, k, v)
    with pytest.raises(error):
        am.attention(*args, spec, **kwargs)
    with pytest.raises(error):  # the same error on a spec never used
        am.attention(*args, am.causal() & am.document(doc_ids=ids.clone()), **kwargs)


def test_a_repeated_call_with_a_gradient_after_calls_without_one_gets_exact_gradients():
    spec = packed_spec()
    q, k, v = qkv(requires_grad=True)
    with torch.no_grad():
        am.attention(q, k, v, spec)
        am.attention(q, k, v, spec)
    got = am.attention(q, k, v, spec)
    want = am.attention(q, k, v, spec, backend="reference")
    torch.testing.assert_close(got, want)
    for g, w in zip(grads(got, (q, k, v)), grads(want, (q, k, v)), strict=True):
        torch.testing.assert_close(g, w)
    assert plancache.cached_signatures(spec) == 2  # with and without a gradient: two signatures


def test_a_repeated_spec_written_in_place_is_checked_and_planned_again(prepared, planning_counts):
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2]])
    spec = am.causal() & am.document(doc_ids=ids)
    q, k, v = qkv(length=8)
    am.attention(q, k, v, spec, backend="varlen")
    am.attention(q, k, v, spec, backend="varlen")
    ids[0, 3:] = 1  # two documents now
    got = am.attention(q, k, v, spec, backend="varlen")
    assert prepared["prepared"] == 2 and planning_counts["varlen"] == 2
    torch.testing.assert_close(got, am.attention(q, k, v, spec, backend="reference"))


@pytest.mark.parametrize(
    "second",
    [
        lambda q, k, v: (q.transpose(1, 2).contiguous().transpose(1, 2), k, v),  # other strides
        lambda q, k, v: (q, k, v, {"scale": 0.3}),
        lambda q, k, v: (q, k, v, {"scale": 1}),  # an int: its own key, applied as 1.0
        lambda q, k, v: (torch.nn.Parameter(q), k, v),  # a subclass: always checked
        lambda q, k, v: (q.double(), k.double(), v.double()),
        lambda q, k, v: (q[:, :2], k[:, :1], v[:, :1]),
    ],
)
def test_a_call_of_another_kind_on_a_repeated_spec_is_computed_as_on_a_new_spec(second):
    spec = packed_spec()
    q, k, v = qkv()
    for _ in range(2):
        am.attention(q, k, v, spec, backend="sdpa")
    args = second(q, k, v)
    kwargs = args[3] if len(args) == 4 else {}
    got = am.attention(*args[:3], spec, backend="sdpa", **kwargs)
    assert torch.equal(got, am.attention(*args[:3], packed_spec(), backend="sdpa", **kwargs))
    again = am.attention(*args[:3], spec, backend="sdpa", **kwargs)  # and remembered as its own kind
    assert torch.equal(again, got)


def test_a_scale_equal_to_a_remembered_one_but_of_another_type_is_checked_again():
    spec = packed_spec()
    q, k, v = qkv()
    for _ in range(2):
        am.attention(q, k, v, spec, scale=1)
    with pytest.raises(am.InputError):  # True == 1, and hashes alike: the key holds the type too
        am.attention(q, k, v, spec, scale=True)


VARIANTS = {  # inputs of one kind each, from the same values
    "plain": lambda q, k, v: (q, k, v, {}),
    "float64": lambda q, k, v: (q.double(), k.double(), v.double(), {}),
    "strided": lambda q, k, v: (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, {}),
    "scaled": lambda q, k, v: (q, k, v, {"scale": 0.25}),
    "grad": lambda q, k, v: (q.detach().requires_grad_(), k, v, {}),
    "one head group": lambda q, k, v: (q[:, :2], k[:, :1], v[:, :1], {}),
}


@settings(max_examples=25, deadline=None)
@given(order=st.lists(st.sampled_from(sorted(VARIANTS)), min_size=2, max_size=10))
def test_any_sequence_of_call_kinds_on_one_spec_equals_each_call_on_a_new_spec(order):
    spec = packed_spec()
    q, k, v = qkv()
    for name in order:
        q2, k2, v2, kwargs = VARIANTS[name](q, k, v)
        got = am.attention(q2, k2, v2, spec, backend="sdpa", **kwargs)
        want = am.attention(q2, k2, v2, packed_spec(), backend="sdpa", **kwargs)
        assert torch.equal(got, want), name
        if q2.requires_grad:
            assert torch.equal(grads(got, (q2,))[0], grads(want, (q2,))[0]), name


# ---------------------------------------------------------------------------------------------------------------------
# The transformers integration hands every layer of a forward the same spec object


def packed_llama_inputs():
    ids = torch.randint(1, 300, (1, 14), generator=torch.Generator().manual_seed(0))
    return ids, torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1, 2, 3, 4]])


def spy_on_specs(monkeypatch, hf):
    specs = []

    def spying(q, k, v, spec, **kwargs):
        specs.append(spec)
        return am.attention(q, k, v, spec, **kwargs)

    monkeypatch.setattr(hf, "attention", spying)
    return specs


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_every_layer_of_a_transformers_forward_gets_the_same_spec_object(monkeypatch, family):
    pytest.importorskip("transformers")
    from attnmask.integrations import hf
    from tests.hf_models import model

    specs = spy_on_specs(monkeypatch, hf)
    ids, pos = packed_llama_inputs()
    with torch.no_grad():
        shared = model(family)(ids, position_ids=pos).logits
        monkeypatch.setattr(hf, "_recent_specs", hf._RecentSpecs(size=0))  # a fresh spec per layer, as before
        fresh = model(family)(ids, position_ids=pos).logits
    layers = len(specs) // 2
    assert layers == 2 and all(s is specs[0] for s in specs[:layers])
    assert all(a is not b for a, b in zip(specs[layers:], specs[layers + 1 :], strict=False))
    assert torch.equal(shared, fresh)


def test_a_forward_after_position_ids_are_written_in_place_builds_a_new_spec(monkeypatch):
    pytest.importorskip("transformers")
    from attnmask.integrations import hf
    from tests.hf_models import alone, model

    specs = spy_on_specs(monkeypatch, hf)
    ids, pos = packed_llama_inputs()
    with torch.no_grad():
        model("llama")(ids, position_ids=pos)
        pos[0, 6:] = torch.arange(8)  # now two documents: 6 and 8 tokens
        logits = model("llama")(ids, position_ids=pos).logits[0]
    assert specs[-1] is not specs[0]
    want = torch.cat([alone("llama", ids[0, :6].tolist()), alone("llama", ids[0, 6:].tolist())])
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-4)


def test_a_transformers_forward_in_inference_mode_with_packed_position_ids_runs():
    pytest.importorskip("transformers")
    from tests.hf_models import model

    ids, pos = packed_llama_inputs()
    with torch.no_grad():
        want = model("llama")(ids, position_ids=pos).logits
    with torch.inference_mode():
        got = model("llama")(ids.clone(), position_ids=pos.clone()).logits  # inference tensors: no version counter
    torch.testing.assert_close(got, want)


def test_every_layer_in_inference_mode_gets_one_spec_and_an_in_place_write_a_new_one(monkeypatch):
    """Under ``torch.inference_mode`` (generation, evaluation) the padding mask has no version counter: its contents,
    compared, let every layer share one spec (and so one plan); an in-place write to the mask makes a new one, and
    the logits follow it."""
    pytest.importorskip("transformers")
    from attnmask.integrations import hf
    from tests.hf_models import model

    specs = spy_on_specs(monkeypatch, hf)
    ids = torch.randint(1, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    written = mask.clone()
    written[0, :3] = 0
    with torch.no_grad():
        want = model("llama")(ids, attention_mask=mask).logits
        want_written = model("llama")(ids, attention_mask=written).logits
    del specs[:]
    with torch.inference_mode():
        ids_i, mask_i = ids.clone(), mask.clone()
        got = model("llama")(ids_i, attention_mask=mask_i).logits
        layers = len(specs)
        mask_i[0, :3] = 0  # in place: no version counter sees it
        again = model("llama")(ids_i, attention_mask=mask_i).logits
    assert layers == 2 and specs[0] is specs[1]
    assert specs[layers] is not specs[0] and specs[layers] is specs[layers + 1]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(again[0, 3:], want_written[0, 3:])
    torch.testing.assert_close(again[1], want_written[1])


def test_recent_specs_compare_inference_tensors_by_their_contents():
    """The same inference-mode tensor object again: its spec is reused while its contents hold, rebuilt after an
    in-place write (which no version counter records)."""
    pytest.importorskip("transformers")
    from attnmask.integrations import hf

    recent, built = hf._RecentSpecs(), []

    def build():
        built.append(am.causal() & am.key_padding(mask.clone()))
        return built[-1]

    with torch.inference_mode():
        mask = torch.ones(2, 8, dtype=torch.long)
        first, second = recent.get(("s",), (mask,), build), recent.get(("s",), (mask,), build)
        mask[0, :2] = 0
        third = recent.get(("s",), (mask,), build)
    assert first is second and third is not first and len(built) == 2


def test_a_single_part_spec_dies_with_its_last_reference_after_planning():
    """Planning keeps a composed spec's varlen form on it (its parts, never the spec itself); a spec of one part is
    taken apart each time, so that no kept form refers back to it: it is freed at once, without a garbage collection."""
    import weakref

    gc.disable()
    try:
        ids = torch.tensor([[0, 0, 1, 1, 1, -1]])
        for make in (lambda: am.document(doc_ids=ids), lambda: am.causal() & am.document(doc_ids=ids)):
            spec = make()
            am.attention(*qkv(length=6), spec)
            ref = weakref.ref(spec)
            del spec
            assert ref() is None
    finally:
        gc.enable()
