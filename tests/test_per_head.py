"""Per-head masks: ``custom(fn, heads=H)`` and ``from_mask_mod(mod, heads=H)`` are evaluated for every query head, stay
per-head under ``&``, ``|`` and ``~``, and every backend either honours them (equal to a naive float64 reference
written per row, head, query and key on Python ints) or refuses them through its declarations."""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnmask as am
from attnmask import masks as M
from attnmask.attention import _BACKENDS, _prepare_call
from attnmask.backends import flex
from attnmask.lowering import FULL, NONE, PARTIAL
from tests import kernel_emulators
from tests.helpers import GRAD_TOLERANCE, TOLERANCE, grads
from tests.naive import naive_allowed, naive_attention
from tests.strategies import heads_and_dims, per_head_predicate, spec_tree

ON_CPU = [b for b in _BACKENDS.values() if "cpu" in b.devices and b.auto_on("cpu") and b.available() is None]
"""Backends that run here without compiling per shape; "flex" (compiled per shape on the CPU) has its own test."""
ONE_MASK = [b for b in _BACKENDS.values() if not b.per_head]


# ----------------------------------------------------------------------------------------------------------------------
# The reference: every part by its written rule


def naive_head_mask(mask, rules, batch, heads, q_len, kv_len):
    """``(B, H, Q, K)`` bool, one Python call per element: a per-head part by its rule on ints (``rules``: ``id`` of
    the part -> rule), any other primitive by ``tests.naive``, ``&`` / ``|`` / ``~`` by ``all`` / ``any`` / ``not``.
    Queries are the last ``Q`` of ``K`` positions."""

    def allowed(spec, b, h, q, k):
        if id(spec) in rules:
            return bool(rules[id(spec)](b, h, q, k))
        if isinstance(spec, M.And):
            return all(allowed(p, b, h, q, k) for p in spec.parts)
        if isinstance(spec, M.Or):
            return any(allowed(p, b, h, q, k) for p in spec.parts)
        if isinstance(spec, M.Not):
            return not allowed(spec.part, b, h, q, k)
        return naive_allowed(spec, b, q, k)

    out = torch.zeros(batch, heads, q_len, kv_len, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                for k in range(kv_len):
                    out[b, h, i, k] = allowed(mask, b, h, kv_len - q_len + i, k)
    return out


@st.composite
def per_head_case(draw, max_len=9):
    """Shapes with grouped-query heads, and a per-head predicate for the query heads alone or combined with a random
    spec tree (``&``, ``|``, ``~`` on either side)."""
    batch, kv_len = draw(st.integers(1, 2)), draw(st.integers(1, max_len))
    case = draw(heads_and_dims(batch, draw(st.integers(1, kv_len)), kv_len))
    spec, rule = draw(per_head_predicate(case["heads"], kv_len))
    tree = draw(spec_tree(batch, kv_len, depth=1))
    how = draw(st.sampled_from(["alone", "and", "or", "not_per_head", "not_tree"]))
    mask = {
        "alone": spec,
        "and": tree & spec,
        "or": spec | tree,
        "not_per_head": ~spec & tree,
        "not_tree": spec & ~tree,
    }[how]
    return dict(case, mask=mask, rules={id(spec): rule})


def reference_mask(case):
    B, H, Q, K = case["batch"], case["heads"], case["q_len"], case["kv_len"]
    return naive_head_mask(case["mask"], case["rules"], B, H, Q, K)


def inputs(case, dtype=torch.float32, requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, H, Hkv, Q, K = case["batch"], case["heads"], case["kv_heads"], case["q_len"], case["kv_len"]
    shapes = ((B, H, Q, case["head_dim"]), (B, Hkv, K, case["head_dim"]), (B, Hkv, K, case["value_dim"]))
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_(requires_grad) for s in shapes]


def dims(B=1, H=4, Hkv=2, Q=8, K=8, D=8):
    return dict(batch=B, heads=H, kv_heads=Hkv, q_len=Q, kv_len=K, head_dim=D, value_dim=D)


WIDTHS = torch.tensor([1, 2, 4, 8])


def window_per_head(heads=4):
    return am.custom(lambda b, h, q, k: (k <= q) & (q - k < WIDTHS[h]), name="window_per_head", heads=heads)


# ----------------------------------------------------------------------------------------------------------------------
# The mask


@settings(max_examples=60, deadline=None)
@given(case=per_head_case())
def test_the_dense_mask_of_a_per_head_spec_follows_every_heads_rule(case):
    mask = case["mask"]
    assert mask.heads == case["heads"]
    got = mask.to_dense(case["q_len"], case["kv_len"], per_head=True)
    want = reference_mask(case)
    assert torch.equal(got.expand_as(want), want), repr(mask)


def test_a_per_head_window_combined_with_documents_is_the_window_of_each_head_inside_each_document():
    spec = window_per_head() & am.document(seq_lens=[[3, 5], [8]])
    got = spec.to_dense(8, per_head=True)
    for h, w in enumerate(WIDTHS.tolist()):
        want = (am.sliding_window(w) & am.document(seq_lens=[[3, 5], [8]])).to_dense(8)
        assert torch.equal(got[:, h], want)


def test_a_per_head_predicate_that_ignores_the_head_gives_every_head_the_same_mask():
    spec = am.custom(lambda b, h, q, k: k <= q, heads=3)
    assert torch.equal(spec.to_dense(5, per_head=True), am.causal().to_dense(5).unsqueeze(1).expand(1, 3, 5, 5))


def test_to_dense_per_head_writes_into_a_buffer_of_its_shape():
    spec = window_per_head()
    out = torch.empty(1, 4, 6, 6, dtype=torch.bool)
    assert spec.to_dense(6, per_head=True, out=out) is out
    assert torch.equal(out, spec.to_dense(6, per_head=True))
    with pytest.raises(am.ShapeError, match="out"):
        spec.to_dense(6, per_head=True, out=torch.empty(1, 6, 6, dtype=torch.bool))


def test_the_flex_predicate_receives_the_head_and_matches_create_mask():
    from torch.nn.attention.flex_attention import create_mask

    spec = window_per_head() | am.prefix_lm(2)
    got = create_mask(spec.mask_mod(), 1, 4, 8, 8, device="cpu")
    assert torch.equal(got, spec.to_dense(8, per_head=True))


@settings(max_examples=30, deadline=None)
@given(case=per_head_case(), block_size=st.sampled_from([1, 2, 3, 4]), band=st.sampled_from([None, True, False]))
def test_the_block_layout_of_a_per_head_spec_is_the_union_over_heads(case, block_size, band):
    """FULL where every head allows every pair of the tile, NONE where no head allows any, PARTIAL otherwise (whether
    only the band of reachable key tiles is classified or all of them)."""
    Q, K = case["q_len"], case["kv_len"]
    layout = case["mask"].block_layout(Q, K, block_size=block_size, band=band)
    dense = reference_mask(case)  # (B, H, Q, K)
    for b in range(case["batch"]):
        for i in range(layout.n_q_tiles):
            for j in range(layout.n_kv_tiles):
                (q0, q1), (k0, k1) = layout.q_range(i), layout.kv_range(j)
                tile = dense[b, :, q0:q1, k0:k1]
                want = FULL if bool(tile.all()) else PARTIAL if bool(tile.any()) else NONE
                assert int(layout.classes[b if layout.batch_size > 1 else 0, i, j]) == want


# ----------------------------------------------------------------------------------------------------------------------
# Attention on every backend that accepts it


def check(backend, case, dtype, with_grads):
    """``backend`` refuses ``case`` through its declarations (naming the per-head mask when that is why) or equals the
    float64 reference, forward (and backward)."""
    q, k, v = inputs(case, dtype, requires_grad=with_grads)
    reasons = backend.not_supported_reasons(_prepare_call(q, k, v, case["mask"], None, None, None))
    if reasons:
        assert backend.per_head or any("per-head" in r for r in reasons), reasons
        with pytest.raises(am.BackendError):
            am.attention(q, k, v, case["mask"], backend=backend.name)
        return False
    allowed = reference_mask(case)
    got = am.attention(q, k, v, case["mask"], backend=backend.name)
    want = naive_attention(q.detach(), k.detach(), v.detach(), allowed)
    atol, rtol = TOLERANCE[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=f"{backend.name}: {case['mask']!r}")
    empty = ~allowed.any(-1, keepdim=True).expand(got.shape)
    assert torch.equal(got[empty], torch.zeros_like(got[empty])), f"{backend.name}: a row with no key is not 0"
    if with_grads:
        ins64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
        want_grads = grads(naive_attention(*ins64, allowed), ins64)
        atol, rtol = GRAD_TOLERANCE[dtype]
        for name, g, w in zip("qkv", grads(got, (q, k, v)), want_grads, strict=True):
            torch.testing.assert_close(g.double(), w, atol=atol, rtol=rtol, msg=f"{backend.name}: d{name}")
    return True


@pytest.mark.parametrize("backend", ON_CPU, ids=[b.name for b in ON_CPU])
@settings(max_examples=30, deadline=None)
@given(case=per_head_case(), dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_outputs_match_the_reference_or_are_refused(backend, case, dtype):
    check(backend, case, dtype, with_grads=False)


@pytest.mark.parametrize("backend", ON_CPU, ids=[b.name for b in ON_CPU])
@settings(max_examples=15, deadline=None)
@given(case=per_head_case(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_gradients_match_the_reference_or_are_refused(backend, case, dtype):
    check(backend, case, dtype, with_grads=True)


@pytest.mark.parametrize("name", ["reference", "sdpa"])
def test_reference_and_sdpa_honour_per_head_masks_forward_and_backward(name):
    case = dict(dims(B=2, Q=7, K=10), mask=window_per_head() & am.key_padding(torch.tensor([[0] * 3 + [1] * 7] * 2)))
    case["rules"] = {id(case["mask"].parts[0]): lambda b, h, q, k: 0 <= q - k < WIDTHS.tolist()[h]}
    assert check(_BACKENDS[name], case, torch.float32, with_grads=True)


def test_grouped_query_heads_each_get_their_own_window():
    """Against an independent form: each query head alone under the structural ``sliding_window`` of its width."""
    q, k, v = inputs(dims(B=2, H=4, Hkv=2, Q=12, K=12), torch.float64)
    got = am.attention(q, k, v, window_per_head(), backend="auto")
    for h, w in enumerate(WIDTHS.tolist()):
        kv = h // 2
        alone = am.attention(q[:, h : h + 1], k[:, kv : kv + 1], v[:, kv : kv + 1], am.sliding_window(w))
        torch.testing.assert_close(got[:, h : h + 1], alone)


def test_sdpa_with_score_modifiers_honours_a_per_head_mask():
    case = dict(dims(Q=6, K=9), mask=window_per_head())
    q, k, v = inputs(case, torch.float64)
    sinks, slopes = torch.randn(4, dtype=torch.float64), torch.rand(4)
    mods = dict(sinks=sinks, alibi_slopes=slopes)
    got = am.attention(q, k, v, case["mask"], backend="sdpa", **mods)
    allowed = case["mask"].to_dense(6, 9, per_head=True)
    torch.testing.assert_close(got, naive_attention(q, k, v, allowed, sinks=sinks, alibi_slopes=slopes))


def test_auto_picks_a_backend_that_accepts_per_head_masks():
    q, k, v = inputs(dims(Q=16, K=16))
    seen = am.explain(q, k, v, window_per_head())
    assert _BACKENDS[seen.picked].per_head
    assert am.attention(q, k, v, window_per_head()).shape == (1, 4, 16, 8)


@pytest.mark.parametrize("block_size", [4, 128])
def test_flex_gives_each_query_head_its_own_mask(block_size):
    """The "flex" backend's block mask (the union layout: FULL, PARTIAL and NONE tiles) and predicate, run through an
    emulator of FlexAttention's documented semantics (FULL tiles computed without the predicate, PARTIAL ones with it,
    given the query head); the compiled kernel would compile for half a minute per shape on this CPU."""
    image = torch.tensor([-1] * 8 + [0] * 4 + [-1] * 4)  # positions 8-11 see each other in every head
    mask = (window_per_head() & am.document(seq_lens=[[5, 11], [16]])) | am.bidirectional_blocks(image)
    case = dict(dims(B=2, H=4, Hkv=2, Q=12, K=16), mask=mask)
    q, k, v = inputs(case)
    if block_size == 4:  # tiles of every class; FULL ones are computed without the predicate
        layout = mask.block_layout(12, 16, block_size=4)
        assert all(layout.counts().values())
        assert int(layout.classes[1, 2, 2]) == PARTIAL  # full in the widest head (8 keys back), not in the others
    with (
        mock.patch.object(flex, "_flex", lambda: kernel_emulators.flex_attention),
        mock.patch.object(flex, "BLOCK_SIZE", block_size),
    ):
        got = am.attention(q, k, v, case["mask"], backend="flex")
    want = naive_attention(q, k, v, case["mask"].to_dense(12, 16, per_head=True))
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Refusals: typed errors, never one head's mask for all


def test_a_predicate_computing_with_the_head_needs_the_opt_in():
    q, k, v = inputs(dims())
    spec = am.custom(lambda b, h, q, k: q - k < WIDTHS[h])
    with pytest.raises(am.SpecError, match="depend on the head index h"):
        am.attention(q, k, v, spec, backend="reference")
    with pytest.raises(am.SpecError, match=r"heads=H"):
        spec.to_dense(8)


def test_q_with_another_number_of_heads_is_refused_naming_both():
    spec = window_per_head(heads=4)
    q, k, v = inputs(dims(H=2, Hkv=2))
    with pytest.raises(am.ShapeError, match=r"q's 2 query heads, got a spec of 4 heads"):
        am.attention(q, k, v, spec)
    q, k, v = inputs(dims(H=8, Hkv=4))  # the key/value heads do not count: the mask is per query head
    with pytest.raises(am.ShapeError, match=r"q's 8 query heads, got a spec of 4 heads"):
        am.attention(q, k, v, spec & am.causal())
    with pytest.raises(am.ShapeError, match="8 query heads"):
        am.explain(q, k, v, spec)


def test_per_head_specs_of_different_head_counts_do_not_combine():
    with pytest.raises(am.ShapeError, match=r"same number of heads, got \[3, 4\]"):
        window_per_head(4) & am.custom(lambda b, h, q, k: q >= k, heads=3)


@pytest.mark.parametrize("backend", ONE_MASK, ids=[b.name for b in ONE_MASK])
def test_a_backend_that_takes_one_mask_for_every_head_refuses_a_per_head_spec(backend):
    q, k, v = inputs(dims())
    spec = am.causal() & window_per_head()
    reasons = backend.not_supported_reasons(_prepare_call(q, k, v, spec, None, None, None))
    assert "takes one mask for every head, not a per-head spec (4 heads)" in reasons
    with pytest.raises(am.BackendError, match="per-head spec"):
        am.attention(q, k, v, spec, backend=backend.name)


def test_consumers_that_take_one_mask_for_every_head_refuse_a_per_head_spec():
    from attnmask import viz

    spec = am.causal() & window_per_head()
    with pytest.raises(am.SpecError, match="per_head=True"):
        spec.to_dense(8)
    with pytest.raises(am.SpecError, match="to_additive"):
        spec.to_additive(8)
    with pytest.raises(am.SpecError, match="without a head index"):
        spec.evaluate(torch.tensor(0), torch.tensor(3), torch.tensor(1))
    with pytest.raises(am.SpecError, match="without a head index"):
        spec.block_layout(8, block_size=4).tile_mask(0, 0, 4, 0, 4)
    with pytest.raises(am.SpecError, match=r"draw one head h as spec.to_dense\(Q, K, per_head=True\)\[:, h\]"):
        viz.draw_mask(spec, 8)
    assert "■" in viz.draw_mask(spec.to_dense(8, per_head=True)[:, 2])  # the way the message names
    with pytest.raises(am.BackendError):
        am.varlen_args(spec, 8)


@pytest.mark.parametrize("heads", [0, -1, True, 2.0, "4"])
def test_the_head_count_is_checked(heads):
    with pytest.raises(am.SpecError, match="heads"):
        am.custom(lambda b, h, q, k: q >= k, heads=heads)
    with pytest.raises(am.SpecError, match="heads"):
        am.from_mask_mod(lambda b, h, q, k: q >= k, heads=heads)


def test_per_head_must_be_a_bool():
    with pytest.raises(am.SpecError, match="per_head"):
        window_per_head().to_dense(4, per_head="yes")


def test_repr_names_the_head_count():
    assert repr(am.causal() & window_per_head()) == "causal() & custom(window_per_head, heads=4)"


def test_context_parallel_honours_a_per_head_spec_or_refuses_it():
    """One process (no process group): "all_gather" runs the rank's blocks through ``attention``; "ring" takes one
    mask for every head and refuses; a spec for another number of heads is refused up front."""
    from attnmask.integrations.context_parallel import context_parallel_attention

    q, k, v = inputs(dims(B=1, H=4, Hkv=2, Q=12, K=12), torch.float64)
    spec = window_per_head() & am.document(seq_lens=[5, 7])
    got = context_parallel_attention(q, k, v, spec, seq_len=12, method="all_gather")
    torch.testing.assert_close(got, naive_attention(q, k, v, spec.to_dense(12, per_head=True)))
    with pytest.raises(am.BackendError, match="per-head"):
        context_parallel_attention(q, k, v, spec, seq_len=12, method="ring")
    with pytest.raises(am.ShapeError, match="4 query heads, got a spec of 3 heads"):
        context_parallel_attention(q, k, v, am.custom(lambda b, h, q, k: k <= q, heads=3), seq_len=12)
