"""The "banded" backend equals the naive reference on rows of many short documents, and "auto" picks it for them."""

import dataclasses

import pytest
import torch

import attnmask as am
from attnmask.attention import AttentionCall, choose_backend
from attnmask.backends.banded import MAX_BAND_KEYS, _band_width, _first_keys, band_mask, banded_attention, unsupported
from tests.helpers import call_of, check_against_naive, row_cuts, tiny_documents
from tests.naive import naive_dense


def test_band_mask_equals_the_dense_mask_on_the_band():
    lens = [3, 5, 1, 7, 2]
    spec = am.causal() & am.document(seq_lens=lens)
    L, bs, width = sum(lens), 4, 3
    band = band_mask(spec, L, bs, width, 1, torch.device("cpu"))[0]  # (nT, bs, W·bs)
    dense = naive_dense(spec, L, L)[0]
    for t in range(band.shape[0]):
        for i in range(bs):
            for c in range(width * bs):
                q, key = t * bs + i, (t - width + 1) * bs + c
                inside = q < L and 0 <= key < L
                assert bool(band[t, i, c]) == (inside and bool(dense[q, key])), (q, key)


def test_rows_with_no_allowed_key_are_exactly_zero_with_zero_gradient():
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [0] * 9 + [1]])
    spec = am.causal() & am.key_padding(mask) & am.sliding_window(3)
    q, k, v = (torch.randn(2, 4, 10, 8, requires_grad=True) for _ in range(3))
    out = am.attention(q, k, v, spec, backend="banded")
    empty = ~mask.bool()
    assert torch.equal(out.detach().permute(0, 2, 1, 3)[empty], torch.zeros(int(empty.sum()), 4, 8))
    out.sum().backward()
    assert torch.equal(q.grad.permute(0, 2, 1, 3)[empty], torch.zeros(int(empty.sum()), 4, 8))
    assert all(bool(t.grad.isfinite().all()) for t in (q, k, v))


@pytest.mark.parametrize(
    ("spec", "q_len", "positions_given", "reason"),
    [
        (am.causal() & am.document(seq_lens=[3, 3]), 4, False, "as many queries as keys"),
        (am.causal() & am.document(seq_lens=[3, 3]), 6, True, "default positions"),
        (am.document(seq_lens=[150, 150]), 300, False, "later tiles"),
        (am.causal(), 300, False, f"more than {MAX_BAND_KEYS}"),
        (am.full(), 6, False, "no key band"),
        (am.custom(lambda b, q, k: q >= k), 6, False, "structural"),
    ],
)
def test_banded_names_what_it_cannot_serve(spec, q_len, positions_given, reason):
    q, k = torch.zeros(1, 2, q_len, 4), torch.zeros(1, 2, max(q_len, 6), 4)
    got = unsupported(call_of(q, k, k, spec, positions_given))
    assert got is not None and reason in got


def test_bidirectional_documents_inside_one_tile_are_served():
    spec = am.document(seq_lens=[3, 3])
    case = dict(batch=1, heads=2, kv_heads=1, q_len=6, kv_len=6, head_dim=4, value_dim=4)
    assert unsupported(call_of(torch.zeros(1, 2, 6, 4), *[torch.zeros(1, 1, 6, 4)] * 2, spec)) is None
    check_against_naive(lambda q, k, v: am.attention(q, k, v, spec, backend="banded"), case, spec, torch.float32)


def test_banded_refuses_a_tensor_mask():
    q = torch.zeros(1, 2, 6, 4)
    assert "mask spec" in unsupported(AttentionCall(q, q, q, torch.ones(6, 6, dtype=torch.bool)[None, None], 1.0))


def test_auto_picks_banded_for_a_row_of_tiny_documents_when_the_native_kernel_is_missing(monkeypatch):
    from attnmask.attention import _BACKENDS

    missing = dataclasses.replace(_BACKENDS["native"], available=lambda: "no C compiler (simulated)")
    monkeypatch.setitem(_BACKENDS, "native", missing)
    lens = tiny_documents(500)
    spec = am.causal() & am.document(seq_lens=lens)
    q = torch.empty(1, 8, sum(lens), 64)
    assert choose_backend(call_of(q, q, q, spec)).name == "banded"


@pytest.mark.parametrize(
    "spec",
    [am.causal() & am.document(seq_lens=tiny_documents(20, low=300, high=700)), am.sliding_window(1024)],
)
def test_auto_leaves_long_documents_and_wide_windows_to_other_backends(spec):
    q = torch.empty(1, 8, 8192, 64)
    assert choose_backend(call_of(q, q, q, spec)).name != "banded"


@pytest.mark.parametrize("block_size", [8, 16, 32, 64])
def test_every_tile_size_matches_naive_with_its_band_width(block_size):
    lens = tiny_documents(30, seed=block_size, low=1, high=12)
    spec = am.causal() & am.document(seq_lens=lens, length=sum(lens) + 5)
    case = dict(batch=1, heads=4, kv_heads=2, q_len=sum(lens) + 5, kv_len=sum(lens) + 5, head_dim=8, value_dim=6)
    width = _band_width(_first_keys(spec, case["q_len"], 1, torch.device("cpu")), block_size)
    run = lambda q, k, v: banded_attention(q, k, v, spec, block_size, width)  # noqa: E731
    check_against_naive(run, case, spec, torch.float32)


def test_banded_backward_cuts_no_more_pieces_with_more_rows():
    """``banded`` takes its batch rows by one ``unbind`` per tensor, not one select per row (each select's backward
    allocates a zero tensor of the whole padded input: a third of the call on rows of 8 x 1,024)."""
    spec_of_rows = lambda rows: am.causal() & am.document(seq_lens=[7, 30, 12, 50, 9, 20] * 8)  # noqa: E731
    assert row_cuts("banded", spec_of_rows, 2) == row_cuts("banded", spec_of_rows, 6)
