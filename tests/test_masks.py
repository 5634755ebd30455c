"""Mask specs: vectorised evaluation equals the naive per-element definitions; algebra, repr and errors."""

import pytest
import torch
from hypothesis import given

import attnmask as am
from attnmask import masks as M
from tests.naive import naive_dense
from tests.strategies import spec_case


@given(spec_case())
def test_to_dense_equals_naive_definition(case):
    spec, batch, q_len, kv_len = case
    got = spec.to_dense(q_len, kv_len)
    want = naive_dense(spec, q_len, kv_len, batch=spec.batch_size)
    assert got.dtype == torch.bool
    assert got.shape == want.shape
    assert torch.equal(got, want), repr(spec)


@given(spec_case())
def test_to_additive_is_zero_where_allowed_and_finfo_min_elsewhere(case):
    spec, _, q_len, kv_len = case
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        add = spec.to_additive(q_len, kv_len, dtype=dtype)
        dense = spec.to_dense(q_len, kv_len)
        assert add.dtype == dtype and add.shape == (dense.shape[0], 1, q_len, kv_len)
        assert torch.equal(add[:, 0] == 0, dense)
        assert torch.all((add == 0) | (add == torch.finfo(dtype).min))


# ---------------------------------------------------------------------------------------------------------------------
# Worked examples from the docstrings


def test_causal_document_worked_example():
    dense = (am.causal() & am.document(seq_lens=[2, 4, 3])).to_dense(9)[0]
    assert dense[3].nonzero().flatten().tolist() == [2, 3]
    assert dense[8].nonzero().flatten().tolist() == [6, 7, 8]


def test_sliding_window_counts_the_query_itself():
    dense = am.sliding_window(3).to_dense(8)[0]
    assert dense[5].nonzero().flatten().tolist() == [3, 4, 5]
    assert torch.equal(am.sliding_window(1).to_dense(5)[0], torch.eye(5, dtype=torch.bool))


def test_prefix_lm_is_bidirectional_over_the_prefix():
    dense = am.prefix_lm([3]).to_dense(6)[0]
    assert dense[1].nonzero().flatten().tolist() == [0, 1, 2]
    assert dense[4].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]


def test_queries_are_bottom_right_aligned_when_fewer_than_keys():
    dense = am.causal().to_dense(2, 5)[0]
    assert dense.tolist() == [[True, True, True, True, False], [True] * 5]


def test_explicit_positions_override_alignment():
    dense = am.causal().to_dense(2, 5, q_positions=torch.tensor([0, 1]))[0]
    assert dense.tolist() == [[True, False, False, False, False], [True, True, False, False, False]]


def test_per_row_positions_give_per_row_masks():
    pos = torch.tensor([[0, 1, 2], [2, 3, 4]])
    dense = am.causal().to_dense(3, 5, q_positions=pos)
    assert dense.shape == (2, 3, 5)
    assert dense[1, 0].tolist() == [True, True, True, False, False]


def test_document_positions_past_the_documents_attend_nothing():
    dense = am.document(seq_lens=[2], length=4).to_dense(4)[0]
    assert not dense[2:].any() and not dense[:, 2:].any()


def test_key_padding_broadcasts_with_structural_specs():
    m = torch.tensor([[0, 1, 1], [1, 1, 1]])
    dense = (am.causal() & am.key_padding(m)).to_dense(3)
    assert dense.shape == (2, 3, 3)
    assert not dense[0, :, 0].any()
    assert not dense[0, 0].any()  # left-padded query sees nothing: a fully masked row


# ---------------------------------------------------------------------------------------------------------------------
# Algebra and repr


def test_combinators_flatten_and_print_readably():
    spec = am.causal() & am.sliding_window(4) & am.document(seq_lens=[3, 5])
    assert isinstance(spec, M.And) and len(spec.parts) == 3
    assert repr(spec) == "causal() & sliding_window(4) & document(seq_lens=[3, 5])"
    assert repr(am.causal() | am.chunked(4) & am.full()) == "causal() | (chunked(4) & full())"
    assert repr(~(am.causal() | am.full())) == "~(causal() | full())"
    assert repr(~~am.causal()) == "causal()"


def test_specs_are_immutable():
    spec = am.sliding_window(4)
    with pytest.raises(AttributeError):
        spec.window = 5


def test_batch_size_comes_from_per_row_data():
    assert am.causal().batch_size is None
    assert (am.causal() & am.key_padding(torch.ones(3, 4))).batch_size == 3
    assert (am.key_padding(torch.ones(1, 4)) & am.prefix_lm([1, 2, 3])).batch_size == 3


def test_structural_flag_is_false_only_with_custom():
    assert (am.causal() & am.document(seq_lens=[2, 2])).is_structural
    assert not (am.causal() & am.custom(lambda b, h, q, k: q >= k)).is_structural


def test_mask_mod_matches_to_dense_with_offset():
    spec = am.causal() & am.key_padding(torch.tensor([[0, 1, 1, 1, 1]]))
    mod = spec.mask_mod(q_offset=3)
    q = torch.arange(2).view(-1, 1)
    k = torch.arange(5).view(1, -1)
    assert torch.equal(mod(torch.tensor(0), torch.tensor(0), q, k), spec.to_dense(2, 5)[0])


# ---------------------------------------------------------------------------------------------------------------------
# Errors name the argument, the expected and the actual value


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: am.sliding_window(0), ["window", ">= 1", "0"]),
        (lambda: am.chunked(2.5), ["size", "int", "2.5"]),
        (lambda: am.document(), ["document", "exactly one"]),
        (lambda: am.document(seq_lens=[2, -1]), ["seq_lens", "-1"]),
        (lambda: am.key_padding(torch.tensor([[0, 2]])), ["attention_mask", "0 (padding)", "2"]),
        (lambda: am.key_padding(torch.ones(2, 3, 4)), ["attention_mask", "(B, L)", "(2, 3, 4)"]),
        (lambda: am.prefix_lm([-1]), ["prefix_lens", ">= 0"]),
        (lambda: am.key_padding(torch.ones(2, 3)) & am.prefix_lm([1, 2, 3]), ["rows", "[2, 3]"]),
        (lambda: am.causal().to_dense(5, 3), ["q_len", "kv_len (3)", "5"]),
        (lambda: am.key_padding(torch.ones(1, 3)).to_dense(4), ["kv_positions", "[0, 3)", "[0, 3]"]),
        (lambda: am.causal() & torch.ones(3), ["operand", "MaskSpec", "Tensor"]),
    ],
)
def test_bad_arguments_raise_a_typed_error_naming_the_argument(make, words):
    with pytest.raises(am.AttnmaskError) as info:
        make()
    assert isinstance(info.value, ValueError)
    for word in words:
        assert word in str(info.value)


# ---------------------------------------------------------------------------------------------------------------------
# Writing into a caller's buffer


@given(spec_case())
def test_to_dense_and_to_additive_into_a_buffer_equal_the_fresh_results(case):
    spec, _, q_len, kv_len = case
    dense = spec.to_dense(q_len, kv_len)
    buf = torch.ones_like(dense) if dense.numel() % 2 else torch.zeros_like(dense)
    assert spec.to_dense(q_len, kv_len, out=buf) is buf and torch.equal(buf, dense)
    for dtype in (torch.float32, torch.bfloat16):
        add = spec.to_additive(q_len, kv_len, dtype=dtype)
        out = torch.full_like(add, 7.0)
        got = spec.to_additive(q_len, kv_len, dtype=dtype, out=out)
        assert got.data_ptr() == out.data_ptr() and torch.equal(out, add)


@pytest.mark.parametrize(
    "out, words",
    [
        (torch.zeros(2, 4, 4, dtype=torch.bool), ["out", "(1, 4, 4)", "(2, 4, 4)"]),
        (torch.zeros(1, 4, 4, dtype=torch.uint8), ["out", "torch.bool", "torch.uint8"]),
        (torch.zeros(1, 4, 8, dtype=torch.bool)[:, :, ::2], ["out", "contiguous"]),
    ],
)
def test_a_wrong_output_buffer_is_rejected_naming_out(out, words):
    with pytest.raises(am.AttnmaskError) as info:
        am.causal().to_dense(4, out=out)
    for word in words:
        assert word in str(info.value)


def test_structure_lists_the_parts_and_their_fields_as_the_key_function_reduces_them():
    import torch

    def shape_only(value):
        return tuple(value.shape) if isinstance(value, torch.Tensor) else value if isinstance(value, int) else "other"

    a = am.causal() & am.document(doc_ids=[[0, 0, 1, 1]])
    b = am.causal() & am.document(doc_ids=[[0, 1, 1, 1]])
    assert a.structure(shape_only) == b.structure(shape_only)
    assert [part[0] for part in a.structure(shape_only)] == ["And", "Causal", "Document"]
    assert a.structure(shape_only) != (am.causal() & am.document(doc_ids=[[0, 0, 1, 1, 1]])).structure(shape_only)
    assert am.sliding_window(4).structure(shape_only) == (("SlidingWindow", 4),)
