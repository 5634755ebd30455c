"""local_window, bidirectional_blocks, key_filter, document_prefix_lm and from_mask_mod: each against a definition
written out here, transformers' own predicates, and FlexAttention's ``create_block_mask`` of the same rule."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask, create_mask

import attnmask as am
from attnmask.errors import ShapeError, SpecError
from tests.helpers import CPU_BACKENDS, assert_matches_reference, check_against_naive, make_qkv
from tests.lowering_refs import assert_same_block_mask, dense_classes, flex_reference
from tests.naive import naive_attention, naive_dense


def grid(n):
    return torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)


# ----------------------------------------------------------------------------------------------------------------------
# local_window


def test_local_window_sees_before_keys_itself_and_after_keys():
    dense = am.local_window(2, 1).to_dense(8)[0]
    assert dense[5].nonzero().view(-1).tolist() == [3, 4, 5, 6]
    assert dense[0].nonzero().view(-1).tolist() == [0, 1]  # clipped at the row's edges
    assert repr(am.local_window(2, 1)) == "local_window(2, 1)"
    assert am.parse_spec("local_window(before=2, after=1)") == am.local_window(2, 1)


@given(st.integers(0, 12), st.integers(0, 12), st.integers(1, 14))
def test_local_window_equals_the_written_definition_and_transformers_bidirectional_overlay(before, after, n):
    q, k = grid(n)
    assert torch.equal(am.local_window(before, after).to_dense(n)[0], (q - k <= before) & (k - q <= after))
    assert torch.equal(am.local_window(before, after).to_dense(n), naive_dense(am.local_window(before, after), n, n))
    masking_utils = pytest.importorskip("transformers.masking_utils")
    overlay = masking_utils.sliding_window_bidirectional_overlay(before)
    want = overlay(torch.tensor(0), torch.tensor(0), q, k)
    assert torch.equal(am.local_window(before, before).to_dense(n)[0], want)


@given(st.integers(0, 9), st.integers(1, 9))
def test_a_local_window_with_nothing_after_is_a_sliding_window(before, n):
    assert torch.equal(am.local_window(before, 0).to_dense(n), am.sliding_window(before + 1).to_dense(n))


@settings(max_examples=80)
@given(st.data(), st.integers(1, 6), st.sampled_from([None, True, False]))
def test_local_window_tiles_are_exact_and_equal_create_block_mask(data, block_size, band):
    kv_len = data.draw(st.integers(1, 30))
    q_len = data.draw(st.integers(1, kv_len))
    spec = am.local_window(data.draw(st.integers(0, 12)), data.draw(st.integers(0, 12)))
    layout = spec.block_layout(q_len, kv_len, block_size=block_size, band=band)
    assert torch.equal(layout.classes, dense_classes(spec.to_dense(q_len, kv_len), block_size))
    assert_same_block_mask(layout.to_flex(), flex_reference(spec, q_len, kv_len, block_size))


def test_the_key_band_of_a_long_row_spans_the_window_on_both_sides():
    spec = am.local_window(20, 9)
    layout = spec.block_layout(256, block_size=16)
    reached = (layout.classes[0] != 0).nonzero()
    # query tile i (16 queries) reaches key tiles from (16 i - 20) // 16 to (16 i + 15 + 9) // 16
    for i in range(16):
        tiles = reached[reached[:, 0] == i, 1].tolist()
        assert tiles == list(range(max(0, (16 * i - 20) // 16), min(15, (16 * i + 24) // 16) + 1))


def test_local_window_refuses_negative_or_non_int_bounds():
    for before, after in ((-1, 0), (0, -2), (1.5, 1), (True, 1)):
        with pytest.raises(SpecError, match="before|after"):
            am.local_window(before, after)


LOCAL_CASE = dict(batch=2, heads=4, kv_heads=2, q_len=40, kv_len=40, head_dim=8, value_dim=8)


def local_problem(after):
    padding = torch.arange(40).expand(2, 40) < torch.tensor([[40], [33]])
    return am.local_window(5, after) & am.key_padding(padding)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("after", [0, 3])
def test_every_cpu_backend_that_accepts_a_local_window_equals_naive_attention(backend, after):
    """Structural backends (blocksparse; banded only for a window ending at the query) run it from the tiles; the
    varlen-form backends (varlen, native) refuse it by their declarations, never compute it wrongly."""
    spec = local_problem(after)
    q, k, v = make_qkv(LOCAL_CASE, requires_grad=True)
    explained = am.explain(q, k, v, spec)
    reasons = dict(zip(explained.backends, explained.reasons, strict=True)).get(backend, ())
    if backend in ("reference", "sdpa", "blocksparse", "auto") or (backend == "banded" and after == 0):
        assert not reasons
    if reasons:
        assert "local_window" in " ".join(reasons) or "later tiles" in " ".join(reasons)
        return
    check_against_naive(lambda q, k, v: am.attention(q, k, v, spec, backend=backend), LOCAL_CASE, spec, torch.float32)


def test_flex_attention_runs_a_local_window_from_its_block_mask():
    """Exact, or (where torch's compiled CPU kernel miscomputes this shape: an AVX2-only CPU) a typed refusal that
    ``explain`` repeats; never a wrong result."""
    spec = local_problem(3)
    q, k, v = make_qkv(LOCAL_CASE)
    allowed = spec.to_dense(40).unsqueeze(1)
    try:
        out = am.attention(q, k, v, spec, backend="flex")
    except am.BackendError as err:
        assert "compiled FlexAttention on this CPU computed this shape wrongly" in str(err)
        explained = am.explain(q, k, v, spec)
        reasons = dict(zip(explained.backends, explained.reasons, strict=True))["flex"]
        assert any("computed this shape wrongly" in r for r in reasons)
        return
    assert_matches_reference(out, naive_attention(q, k, v, allowed))


# ----------------------------------------------------------------------------------------------------------------------
# bidirectional_blocks


def image_block_ids(token_type_ids: torch.Tensor) -> torch.Tensor:
    """Block ids as transformers numbers image runs: -1 for text, 0, 1, ... for each run of image tokens."""
    image = token_type_ids == 1
    start = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
    return torch.where(image, start.long().cumsum(1) - 1, -1)


@st.composite
def token_types(draw, batch=2):
    length = draw(st.integers(1, 24))
    return torch.tensor([[draw(st.integers(0, 1)) for _ in range(length)] for _ in range(batch)])


@given(token_types(), st.integers(1, 5))
def test_causal_or_blocks_equals_transformers_blockwise_overlay_and_its_layout_is_exact(types, block_size):
    masking_utils = pytest.importorskip("transformers.masking_utils")
    ids = image_block_ids(types)
    n = ids.shape[1]
    want = masking_utils.or_masks(masking_utils.causal_mask_function, masking_utils.blockwise_overlay(ids))
    q, k = grid(n)
    for b in range(ids.shape[0]):
        expected = want(torch.tensor(b), torch.tensor(0), q, k)
        assert torch.equal((am.causal() | am.bidirectional_blocks(ids)).to_dense(n)[b], expected)
    blocks = am.bidirectional_blocks(ids)
    assert torch.equal(
        blocks.block_layout(n, block_size=block_size).classes, dense_classes(blocks.to_dense(n), block_size)
    )


def test_a_block_sees_its_own_later_tokens_and_text_stays_causal():
    spec = am.causal() | am.bidirectional_blocks([-1, 0, 0, -1, 1, 1])
    dense = spec.to_dense(6)[0]
    assert dense[1, 2] and not dense[2, 4] and dense[4, 5] and not dense[0, 1]
    assert repr(am.bidirectional_blocks([-1, 0, 0])) == "bidirectional_blocks(<(1, 3), 2 tokens in blocks>)"


# ----------------------------------------------------------------------------------------------------------------------
# key_filter


@given(st.lists(st.lists(st.integers(0, 5), min_size=7, max_size=7), min_size=1, max_size=3), st.integers(1, 4))
def test_key_filter_hides_exactly_the_listed_token_ids(rows, block_size):
    ids = torch.tensor(rows)
    spec = am.key_filter(ids, [0, 3])
    expected = torch.tensor([[[t not in (0, 3) for t in row] for _ in row] for row in rows])
    assert torch.equal(spec.to_dense(7), expected)
    layout = spec.block_layout(7, block_size=block_size)
    assert torch.equal(layout.classes, dense_classes(spec.to_dense(7), block_size))
    assert_same_block_mask(layout.to_flex(), flex_reference(spec, 7, 7, block_size))


def test_key_filter_refuses_float_ids():
    with pytest.raises(SpecError, match="input_ids"):
        am.key_filter(torch.ones(3), [1])


# ----------------------------------------------------------------------------------------------------------------------
# document_prefix_lm


@settings(max_examples=40)
@given(st.data(), st.integers(1, 5))
def test_document_prefix_lm_is_a_prefix_lm_inside_each_document(data, block_size):
    lens = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    prefixes = [data.draw(st.integers(0, n)) for n in lens]
    spec = am.document_prefix_lm([prefixes], [lens])
    n = sum(lens)
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    start = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()[:-1]])[doc]
    q, k = grid(n)
    in_prefix = (k - start[k]) < torch.tensor(prefixes)[doc[k]]
    expected = (doc[q] == doc[k]) & ((k <= q) | in_prefix)
    assert torch.equal(spec.to_dense(n)[0], expected)
    assert torch.equal(spec.block_layout(n, block_size=block_size).classes, dense_classes(spec.to_dense(n), block_size))
    assert_same_block_mask(
        spec.block_layout(n, block_size=block_size).to_flex(), flex_reference(spec, n, n, block_size)
    )


def test_document_prefix_lm_counts_prefixes_in_position_space():
    # one document split over two rows' worth of positions: the piece starting at position 2 has no prefix left
    spec = am.document_prefix_lm([[3, 3]], [[4, 3]], position_ids=[[0, 1, 2, 3, 2, 3, 4]])
    dense = spec.to_dense(7)[0]
    assert dense[0, 2] and not dense[0, 3]  # first document: keys 0-2 are its prefix
    assert dense[4, 4] and not dense[4, 5]  # second: positions 2-4, only position 2 (< 3) is prefix


def test_document_prefix_lm_needs_a_length_for_every_document():
    with pytest.raises(ShapeError, match="prefix_lens"):
        am.document_prefix_lm([[1]], [[2, 2]])


# ----------------------------------------------------------------------------------------------------------------------
# from_mask_mod


def sliding_gym(b, h, q_idx, kv_idx):  # an attention-gym style mod, written for one element
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 3)


def document_gym(doc):
    def mod(b, h, q_idx, kv_idx):
        return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)

    return mod


@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_from_mask_mod_takes_a_scalar_mod_as_is_and_matches_create_block_mask(block_size):
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 2, 2]])
    for mod, batch in ((sliding_gym, 1), (document_gym(doc), 2)):
        spec = am.from_mask_mod(mod)
        want = create_block_mask(mod, batch, 1, 9, 9, device="cpu", BLOCK_SIZE=block_size)
        rows = torch.arange(9).expand(batch, 9)  # per-row positions: the mod's captured rows are evaluated one by one
        assert torch.equal(spec.to_dense(9, q_positions=rows), create_mask(mod, batch, 1, 9, 9, device="cpu")[:, 0])
        layout = spec.block_layout(9, block_size=block_size, q_positions=rows)
        assert_same_block_mask(layout.to_flex(), want)


def test_from_mask_mod_runs_through_attention_like_the_structural_spec():
    q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    got = am.attention(q, k, v, am.from_mask_mod(sliding_gym), backend="reference")
    torch.testing.assert_close(got, am.attention(q, k, v, am.sliding_window(3), backend="reference"))


def test_custom_and_mask_mod_predicates_that_ignore_the_head_run_on_every_head():
    q, k, v = (torch.randn(1, 3, 5, 4, dtype=torch.float64) for _ in range(3))
    for spec in (am.custom(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx), am.from_mask_mod(lambda b, h, q, kv: q >= kv)):
        out = am.attention(q, k, v, spec, backend="reference")
        torch.testing.assert_close(out, am.attention(q, k, v, am.causal(), backend="reference"))


@pytest.mark.parametrize(
    "use",
    [
        lambda h: h % 2 == 0,
        lambda h: h == 0,
        lambda h: torch.tensor([True, False, True])[h],
        lambda h: bool(h),
    ],
)
def test_predicates_that_depend_on_the_head_are_refused_not_evaluated_for_head_zero(use):
    q, k, v = (torch.randn(1, 3, 5, 4) for _ in range(3))
    per_head = am.custom(lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & use(h))
    mod = am.from_mask_mod(lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & use(h))
    for spec in (per_head, mod):
        with pytest.raises(am.SpecError, match="depend on the head index h"):
            am.attention(q, k, v, spec, backend="reference")
