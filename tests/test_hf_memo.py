"""The transformers integration's per-forward memo of document ids never hands a new mask the ids of a freed one
(a freed tensor's ``id()`` is reused by the next allocation of the same size)."""

from __future__ import annotations

import torch

from attnmask.integrations import hf


def test_document_memo_never_returns_the_ids_of_a_freed_padding_mask():
    memo = hf._LastDocuments()
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]])  # kept alive: the same object in every call
    g = torch.Generator().manual_seed(0)
    stale = 0
    for _ in range(200):
        padding = torch.rand(1, 8, generator=g) > 0.3  # a fresh mask, freed at the end of the iteration
        got = memo.get(position_ids, padding)
        want = hf.document_ids_from_position_ids(position_ids, padding)
        stale += not (got is None and want is None or got is not None and want is not None and torch.equal(got, want))
        del padding, got
    assert stale == 0


def test_document_memo_reuses_the_ids_while_the_inputs_are_the_same_and_unchanged():
    memo = hf._LastDocuments()
    position_ids = torch.tensor([[0, 1, 0, 1]])
    padding = torch.tensor([[True, True, True, False]])
    first = memo.get(position_ids, padding)
    assert memo.get(position_ids, padding) is first  # every layer of one forward
    padding[0, 3] = True  # changed in place: its version moves on
    assert torch.equal(memo.get(position_ids, padding), torch.tensor([[0, 0, 1, 1]]))
