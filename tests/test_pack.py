"""Packing: plans against naive item-by-item references, token conservation, collated batches, streaming, a model."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnmask as am
from attnmask.pack import PackPlan, PackStats

STRATEGIES = ["bfd", "ffd", "wrapped", "ordered"]

# ---------------------------------------------------------------------------------------------------------------------
# Naive references, written from the definitions (one item at a time, linear scans over rows)


def naive_pieces(lengths, max_length, overflow):
    """(index, start, stop) pieces in input order: max_length pieces plus a remainder, or one truncated piece."""
    out = []
    for i, n in enumerate(lengths):
        if overflow == "truncate":
            n = min(n, max_length)
        for a in range(0, n, max_length):
            out.append((i, a, min(a + max_length, n)))
    return out


def naive_best_fit_decreasing(pieces, cap):
    """Largest first (ties in input order); into the row with least free space that fits; ties: longest at it."""
    order = sorted(range(len(pieces)), key=lambda k: (-(pieces[k][2] - pieces[k][1]), k))
    free, since, rows = [], [], []
    for t, k in enumerate(order):
        s = pieces[k][2] - pieces[k][1]
        fits = [r for r in range(len(free)) if free[r] >= s]
        if fits:
            r = min(fits, key=lambda r: (free[r], since[r]))
        else:
            r = len(free)
            free.append(cap)
            since.append(-1)
            rows.append([])
        free[r] -= s
        since[r] = t
        rows[r].append(pieces[k])
    return rows


def naive_first_fit_decreasing(pieces, cap):
    order = sorted(range(len(pieces)), key=lambda k: (-(pieces[k][2] - pieces[k][1]), k))
    free, rows = [], []
    for k in order:
        s = pieces[k][2] - pieces[k][1]
        r = next((r for r in range(len(free)) if free[r] >= s), len(free))
        if r == len(free):
            free.append(cap)
            rows.append([])
        free[r] -= s
        rows[r].append(pieces[k])
    return rows


def naive_next_fit(pieces, cap):
    rows, used = [], cap
    for p in pieces:
        if used + p[2] - p[1] > cap:
            rows.append([])
            used = 0
        rows[-1].append(p)
        used += p[2] - p[1]
    return rows


def naive_wrapped(lengths, cap):
    """Token by token: a new row every cap tokens; a new segment at every row or sequence boundary."""
    rows, pos = [], 0
    for i, n in enumerate(lengths):
        for t in range(n):
            if pos % cap == 0:
                rows.append([])
            row = rows[-1]
            if row and row[-1][0] == i and row[-1][2] == t:
                row[-1] = (i, row[-1][1], t + 1)
            else:
                row.append((i, t, t + 1))
            pos += 1
    return rows


def naive_reference(lengths, max_length, strategy, overflow="split"):
    if strategy == "wrapped":
        return naive_wrapped([min(n, max_length) if overflow == "truncate" else n for n in lengths], max_length)
    pieces = naive_pieces(lengths, max_length, overflow)
    fn = {"bfd": naive_best_fit_decreasing, "ffd": naive_first_fit_decreasing, "ordered": naive_next_fit}[strategy]
    return fn(pieces, max_length)


def make_sequences(lengths, seed=0):
    """Distinct token ids everywhere, so every token can be traced back to (sequence, position)."""
    out, nxt = [], 1
    for n in lengths:
        out.append(list(range(nxt, nxt + n)))
        nxt += n
    return out


cases = st.tuples(st.lists(st.integers(0, 25), max_size=14), st.integers(1, 10))

# ---------------------------------------------------------------------------------------------------------------------
# Plans


@pytest.mark.parametrize("strategy", STRATEGIES)
@given(case=cases, overflow=st.sampled_from(["split", "truncate"]))
def test_plan_equals_naive_item_by_item_reference(strategy, case, overflow):
    lengths, max_length = case
    plan = am.pack(lengths, max_length, strategy=strategy, overflow=overflow)
    assert plan.bins == naive_reference(lengths, max_length, strategy, overflow)


@pytest.mark.parametrize("strategy", STRATEGIES)
@given(case=cases)
def test_every_token_is_placed_exactly_once_and_rows_fit(strategy, case):
    lengths, max_length = case
    plan = am.pack(lengths, max_length, strategy=strategy)
    covered = {i: [] for i in range(len(lengths))}
    for row in plan.bins:
        assert sum(b - a for _, a, b in row) <= max_length
        for i, a, b in row:
            assert 0 <= a < b <= lengths[i]
            covered[i].append((a, b))
    for i, n in enumerate(lengths):
        spans = sorted(covered[i])
        assert [a for a, _ in spans] == [0, *[b for _, b in spans]][: len(spans)]
        assert (spans[-1][1] if spans else 0) == n


@given(case=cases, strategy=st.sampled_from(STRATEGIES), overflow=st.sampled_from(["split", "truncate"]))
def test_stats_arithmetic(case, strategy, overflow):
    lengths, max_length = case
    plan = am.pack(lengths, max_length, strategy=strategy, overflow=overflow)
    s = plan.stats
    placed = sum(b - a for row in plan.bins for _, a, b in row)
    assert s.tokens == placed == sum(lengths) - s.truncated_tokens
    assert s.rows == len(plan.bins) == len(plan)
    assert s.lower_bound == -(-placed // max_length) <= s.rows
    assert s.documents == sum(len(r) for r in plan.bins)
    assert s.sequences == len(lengths) and s.empty_sequences == lengths.count(0)
    long = [n for n in lengths if n > max_length]
    if overflow == "truncate":
        assert s.truncated_sequences == len(long) and s.truncated_tokens == sum(n - max_length for n in long)
    else:
        assert s.truncated_sequences == s.truncated_tokens == 0
    pieces = {}
    for row in plan.bins:
        for i, _, _ in row:
            pieces[i] = pieces.get(i, 0) + 1
    assert s.split_sequences == sum(1 for c in pieces.values() if c > 1)
    assert s.split_pieces == sum(c for c in pieces.values() if c > 1)
    assert s.fill == pytest.approx(placed / (s.rows * max_length) if s.rows else 1.0)
    assert list(plan.row_lengths) == [sum(b - a for _, a, b in r) for r in plan.bins]


def test_bfd_reaches_the_lower_bound_on_lognormal_lengths():
    lengths = np.clip(np.random.default_rng(0).lognormal(6.0, 1.0, 20_000).astype(int), 1, 4 * 2048)
    stats = am.pack(lengths, 2048).stats
    assert stats.rows_above_lower_bound <= 0.001 * stats.lower_bound
    assert stats.tokens == lengths.sum()


def test_plan_is_deterministic_and_lengths_equal_sequences():
    lengths = list(np.random.default_rng(1).integers(0, 40, 300))
    a = am.pack(lengths, 32)
    b = am.pack(np.array(lengths), 32)
    c = am.pack(make_sequences(lengths), 32)
    d = am.pack(torch.tensor(lengths), 32)
    assert a.bins == b.bins == c.bins == d.bins


def test_worked_example_of_the_docstring():
    plan = am.pack([5, 3, 6, 2], 8)
    assert plan.bins == [[(2, 0, 6), (3, 0, 2)], [(0, 0, 5), (1, 0, 3)]]
    assert isinstance(plan, PackPlan) and isinstance(plan.stats, PackStats)


def test_zero_length_sequences_go_in_no_row_and_are_counted():
    plan = am.pack([0, 3, 0], 4)
    assert plan.bins == [[(1, 0, 3)]]
    assert plan.stats.empty_sequences == 2 and plan.stats.sequences == 3


def test_empty_input_gives_an_empty_plan():
    plan = am.pack([], 8)
    assert plan.bins == [] and plan.stats.rows == 0 and plan.stats.fill == 1.0


def test_plan_is_frozen():
    plan = am.pack([3, 4], 8)
    with pytest.raises(AttributeError):
        plan.max_length = 4
    with pytest.raises(ValueError):
        plan.seg_start[0] = 1


def test_picture_shows_rows_and_stats():
    text = str(am.pack([5, 3, 6, 2, 11], 8))
    lines = text.splitlines()
    assert "rows of 8" in lines[0] and "1 split into 2 pieces" in lines[0]
    assert lines[1].startswith("row    0 |") and "[4 0:8]" in lines[1]
    assert lines[-1].count(".") > 0


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"max_length": 0}, "max_length"),
        ({"max_length": 2.5}, "max_length"),
        ({"strategy": "best"}, "strategy"),
        ({"overflow": "drop"}, "overflow"),
    ],
)
def test_bad_options_raise_typed_errors_naming_the_argument(kwargs, arg):
    args = {"max_length": 8, **kwargs}
    with pytest.raises(am.InputError, match=f"^{arg}: expected"):
        am.pack([1, 2], **args)


@pytest.mark.parametrize("bad", [[3, -1], np.array([[1, 2]]), np.array([1.5]), [1, "a"], 7])
def test_bad_lengths_raise_input_error(bad):
    with pytest.raises(am.InputError, match="^lengths: expected"):
        am.pack(bad, 8)


def test_overflow_error_names_how_many_and_the_longest():
    with pytest.raises(am.InputError, match="3 longer ones, the longest 30 tokens"):
        am.pack([9, 30, 4, 12], 8, overflow="error")


# ---------------------------------------------------------------------------------------------------------------------
# Collated batches


def naive_batch(plan, seqs, max_length, prompt_lengths=None):
    """Per row: ids, positions, labels, real flags and document ids, token by token from plan.bins."""
    rows = []
    for segs in plan.bins:
        ids, pos, lab, doc = [], [], [], []
        for d, (i, a, b) in enumerate(segs):
            for t in range(a, b):
                ids.append(seqs[i][t])
                pos.append(t - a)
                prompt = prompt_lengths[i] if prompt_lengths else 0
                lab.append(-100 if t == a or t < prompt else seqs[i][t])
                doc.append(d)
        pad = max_length - len(ids)
        rows.append(
            (ids + [0] * pad, pos + [0] * pad, lab + [-100] * pad, [1] * len(doc) + [0] * pad, doc + [-1] * pad)
        )
    return [torch.tensor(list(col)) for col in zip(*rows, strict=True)]


@given(case=cases, strategy=st.sampled_from(STRATEGIES), data=st.data())
def test_collated_batch_equals_token_by_token_reference(case, strategy, data):
    lengths, max_length = case
    seqs = make_sequences(lengths)
    prompts = [data.draw(st.integers(0, n)) for n in lengths]
    plan = am.pack(lengths, max_length, strategy=strategy)
    batch = plan.collate(seqs, pad_id=0, prompt_lengths=prompts)
    if not plan.stats.rows:
        assert batch.input_ids.shape == (0, max_length)
        return
    ids, pos, lab, real, doc = naive_batch(plan, seqs, max_length, prompts)
    assert torch.equal(batch.input_ids, ids)
    assert torch.equal(batch.position_ids, pos)
    assert torch.equal(batch.labels, lab)
    assert torch.equal(batch.attention_mask, real)
    q = torch.arange(max_length)
    same_doc = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)
    want = same_doc & (q[None, None, :] <= q[None, :, None]) & real.bool()[:, None, :]
    assert torch.equal(batch.mask.to_dense(max_length), want)


@given(case=cases)
def test_cu_seqlens_and_seq_lens_describe_the_documents(case):
    lengths, max_length = case
    plan = am.pack(lengths, max_length)
    batch = plan.collate(make_sequences(lengths), pad_id=0)
    lens = [b - a for row in plan.bins for _, a, b in row]
    assert batch.seq_lens == tuple(tuple(b - a for _, a, b in row) for row in plan.bins)
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == list(np.concatenate([[0], np.cumsum(lens, dtype=int)]))
    assert batch.max_seqlen == max(lens, default=0)
    assert batch.extras["sequence_index"].tolist() == [i for row in plan.bins for i, _, _ in row]


@given(case=cases, strategy=st.sampled_from(STRATEGIES))
def test_padding_free_row_is_the_padded_rows_without_padding(case, strategy):
    lengths, max_length = case
    seqs = make_sequences(lengths)
    plan = am.pack(lengths, max_length, strategy=strategy)
    padded = plan.collate(seqs, pad_id=0)
    flat = plan.collate(seqs, pad_id=0, padding_free=True)
    real = padded.attention_mask.bool()
    assert flat.input_ids.shape == (1, plan.stats.tokens)
    for name in ("input_ids", "position_ids", "labels"):
        assert torch.equal(getattr(flat, name)[0], getattr(padded, name)[real])
    assert torch.equal(flat.cu_seqlens, padded.cu_seqlens)
    lens = [n for row in padded.seq_lens for n in row]
    assert flat.seq_lens == (tuple(lens),)
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens, dtype=torch.long))
    q = torch.arange(len(doc))
    want = (doc[:, None] == doc[None, :]) & (q[None, :] <= q[:, None])
    assert torch.equal(flat.mask.to_dense(len(doc))[0], want)


def test_labels_argument_is_used_instead_of_the_ids():
    seqs = [[5, 6, 7], [8, 9]]
    labels = [[50, 60, 70], [80, 90]]
    batch = am.pack([3, 2], 8).collate(seqs, pad_id=0, labels=labels)
    assert batch.labels.tolist() == [[-100, 60, 70, -100, 90, -100, -100, -100]]


def test_pad_id_equal_to_a_real_token_keeps_its_label():
    batch = am.pack([3], 4).collate([[7, 0, 0]], pad_id=0)
    assert batch.labels.tolist() == [[-100, 0, 0, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0]]


def test_prompt_of_a_split_sequence_masks_only_its_part_in_each_piece():
    seqs = [list(range(10, 20))]
    batch = am.pack([10], 4, strategy="ordered").collate(seqs, pad_id=0, prompt_lengths=[6])
    assert batch.labels.tolist() == [[-100] * 4, [-100, -100, 16, 17], [-100, 19, -100, -100]]


def test_rows_argument_collates_only_those_rows_and_reads_only_their_sequences():
    lengths = [5, 3, 6, 2]
    plan = am.pack(lengths, 8)
    seqs = make_sequences(lengths)
    sparse = {i: seqs[i] for i, _, _ in plan.bins[1]}

    class OnlySome:
        def __len__(self):
            return len(lengths)

        def __getitem__(self, i):
            return sparse[i]

    part = plan.collate(OnlySome(), pad_id=0, rows=[1], pad_to="longest")
    whole = plan.collate(seqs, pad_id=0)
    assert torch.equal(part.input_ids, whole.input_ids[1:2, : part.input_ids.shape[1]])
    assert part.input_ids.shape == (1, 8)


def test_tensor_sequences_give_tensors_on_their_device_and_same_values():
    lengths = [5, 3, 6, 2, 9]
    seqs = make_sequences(lengths)
    plan = am.pack(lengths, 8)
    a = plan.collate(seqs, pad_id=0)
    b = plan.collate([torch.tensor(s) for s in seqs], pad_id=0)
    c = plan.collate([np.array(s) for s in seqs], pad_id=0)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.input_ids, c.input_ids)
    assert b.input_ids.device == b.cu_seqlens.device == torch.device("cpu")


def test_truncated_tokens_are_reported_in_the_batch():
    plan = am.pack([10, 3], 4, overflow="truncate")
    batch = plan.collate(make_sequences([10, 3]), pad_id=0)
    assert batch.num_truncated_tokens == 6 == plan.stats.truncated_tokens
    assert batch.num_tokens == 7


def test_collate_rejects_sequences_that_do_not_match_the_plan():
    plan = am.pack([3, 2], 8)
    with pytest.raises(am.ShapeError, match=r"^sequences\[1\]: expected 2 tokens as planned, got 3"):
        plan.collate([[1, 2, 3], [4, 5, 6]], pad_id=0)
    with pytest.raises(am.ShapeError, match="^sequences: expected 2 sequences"):
        plan.collate([[1, 2, 3]], pad_id=0)
    with pytest.raises(am.InputError, match="^prompt_lengths: expected"):
        plan.collate([[1, 2, 3], [4, 5]], pad_id=0, prompt_lengths=[4, 0])
    with pytest.raises(am.InputError, match="^pad_id: expected"):
        plan.collate([[1, 2, 3], [4, 5]], pad_id=None)
    with pytest.raises(am.InputError, match="^sequences: expected integer token ids"):
        plan.collate([[1.0, 2.0, 3.0], [4.0, 5.0]], pad_id=0)
    with pytest.raises(am.InputError, match="^sequences: expected token ids >= 0"):
        plan.collate([[1, 2, -3], [4, 5]], pad_id=0)


def test_mixed_lists_arrays_and_tensors_collate_alike():
    seqs = [[1, 2, 3], np.array([4, 5]), torch.tensor([6])]
    batch = am.pack([3, 2, 1], 8).collate(seqs, pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 0, 0]]


def test_packing_collator_packs_a_list_of_examples():
    examples = [{"input_ids": s, "prompt_length": 1} for s in make_sequences([5, 3, 6, 2])]
    collator = am.PackingCollator(max_length=8, pad_id=0)
    batch = collator(examples)
    want = am.pack([5, 3, 6, 2], 8).collate([e["input_ids"] for e in examples], pad_id=0, prompt_lengths=[1] * 4)
    assert torch.equal(batch.input_ids, want.input_ids) and torch.equal(batch.labels, want.labels)
    loader = torch.utils.data.DataLoader(examples, batch_size=2, collate_fn=collator)
    assert sum(b.num_tokens for b in loader) == 16


def test_packing_collator_checks_its_options():
    with pytest.raises(am.InputError, match="^strategy: expected"):
        am.PackingCollator(max_length=8, pad_id=0, strategy="x")
    with pytest.raises(am.InputError, match="^examples: expected"):
        am.PackingCollator(max_length=8, pad_id=0)([])
    with pytest.raises(am.InputError, match="^examples: expected 'prompt_length' in every example or in none"):
        am.PackingCollator(max_length=8, pad_id=0)([{"input_ids": [1], "prompt_length": 1}, {"input_ids": [2]}])


# ---------------------------------------------------------------------------------------------------------------------
# Streaming


class CountingIterator:
    def __init__(self, seqs):
        self.seqs, self.pulled = seqs, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.pulled == len(self.seqs):
            raise StopIteration
        self.pulled += 1
        return self.seqs[self.pulled - 1]


@given(
    lengths=st.lists(st.integers(0, 25), max_size=40),
    max_length=st.integers(1, 10),
    buffer_size=st.integers(1, 8),
    strategy=st.sampled_from(STRATEGIES),
)
def test_stream_yields_every_token_once_and_holds_at_most_buffer_size(lengths, max_length, buffer_size, strategy):
    seqs = make_sequences(lengths)
    source = CountingIterator(seqs)
    seen = {i: [] for i in range(len(seqs))}
    for row in am.pack_stream(source, max_length, buffer_size=buffer_size, strategy=strategy):
        assert 0 < len(row.input_ids) <= max_length
        assert row.position_ids == [p for n in row.seq_lens for p in range(n)]
        at = 0
        for i, a, b in row.segments:
            assert row.input_ids[at : at + b - a] == seqs[i][a:b]
            seen[i].append((a, b))
            at += b - a
        done = sum(1 for i in range(source.pulled) if sum(b - a for a, b in seen[i]) == lengths[i])
        assert source.pulled - done <= buffer_size
    for i, n in enumerate(lengths):
        spans = sorted(seen[i])
        assert sum(b - a for a, b in spans) == n and all(x[1] == y[0] for x, y in zip(spans, spans[1:], strict=False))


def test_ordered_stream_keeps_input_order():
    lengths = list(np.random.default_rng(2).integers(1, 9, 60))
    seqs = make_sequences(lengths)
    out = [t for row in am.pack_stream(seqs, 16, buffer_size=7, strategy="ordered") for t in row.input_ids]
    assert out == [t for s in seqs for t in s]


def test_stream_fill_is_close_to_global_packing():
    lengths = np.clip(np.random.default_rng(3).lognormal(4.0, 1.0, 3000).astype(int), 1, 512)
    seqs = [[1] * n for n in lengths]
    rows = sum(1 for _ in am.pack_stream(seqs, 256, buffer_size=500))
    assert rows <= am.pack(lengths, 256).stats.rows * 1.01


def test_stream_counts_truncated_tokens():
    rows = list(am.pack_stream([[1] * 10, [2] * 3], 4, overflow="truncate"))
    assert sum(r.truncated_tokens for r in rows) == 6
    assert sum(len(r.input_ids) for r in rows) == 7


def test_stream_rejects_bad_arguments():
    with pytest.raises(am.InputError, match="^buffer_size: expected"):
        am.pack_stream([], 8, buffer_size=0)
    with pytest.raises(am.InputError, match="^sequence 1 of the stream: expected"):
        list(am.pack_stream([[1], 5], 8))


@settings(max_examples=40)
@given(
    lengths=st.lists(st.integers(0, 25), min_size=1, max_size=30),
    max_length=st.integers(1, 12),
    group=st.integers(1, 4),
    pad_to=st.sampled_from(["max_length", "longest"]),
)
def test_collate_rows_builds_each_streamed_row_token_for_token(lengths, max_length, group, pad_to):
    seqs = make_sequences(lengths)
    rows = list(am.pack_stream(seqs, max_length, buffer_size=5))
    for first in range(0, len(rows), group):
        chosen = rows[first : first + group]
        batch = am.collate_rows(chosen, pad_id=0, max_length=max_length, pad_to=pad_to)
        width = max_length if pad_to == "max_length" else max(len(r.input_ids) for r in chosen)
        assert batch.input_ids.shape == (len(chosen), width)
        doc_ids = torch.full((len(chosen), width), -1)
        for b, row in enumerate(chosen):  # the reference, built from the row alone
            n = len(row.input_ids)
            assert batch.input_ids[b, :n].tolist() == row.input_ids and (batch.input_ids[b, n:] == 0).all()
            assert batch.attention_mask[b].tolist() == [1] * n + [0] * (width - n)
            assert batch.position_ids[b, :n].tolist() == row.position_ids
            starts = np.cumsum([0, *row.seq_lens[:-1]]).tolist()
            want_labels = [-100 if t in starts or t >= n else row.input_ids[t] for t in range(width)]
            assert batch.labels[b].tolist() == want_labels
            for d, (a, n_doc) in enumerate(zip(starts, row.seq_lens, strict=True)):
                doc_ids[b, a : a + n_doc] = d
        same_doc = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (doc_ids[:, :, None] >= 0)
        want = same_doc & torch.ones(width, width, dtype=torch.bool).tril()
        assert torch.equal(batch.mask.to_dense(width), want)
        assert batch.extras["sequence_index"].tolist() == [i for r in chosen for i, _, _ in r.segments]


def test_collate_rows_reports_truncation_and_packs_padding_free():
    rows = list(am.pack_stream([[1] * 10, [2] * 3, [3] * 2], 4, overflow="truncate"))
    batch = am.collate_rows(rows, pad_id=0)
    assert batch.num_truncated_tokens == sum(r.truncated_tokens for r in rows) == 6
    flat = am.collate_rows(rows, pad_id=0, padding_free=True)
    assert flat.input_ids.shape == (1, sum(len(r.input_ids) for r in rows))
    assert flat.cu_seqlens.tolist() == np.cumsum([0, *[n for r in rows for n in r.seq_lens]]).tolist()


def test_collate_rows_rejects_what_it_cannot_build():
    rows = list(am.pack_stream([[1] * 6], 6))
    with pytest.raises(am.InputError, match="^rows: expected"):
        am.collate_rows([], pad_id=0)
    with pytest.raises(am.InputError, match=r"^rows\[0\]: expected a PackedRow"):
        am.collate_rows([[1, 2]], pad_id=0)
    with pytest.raises(am.InputError, match="^max_length: expected at least the longest row's 6 tokens"):
        am.collate_rows(rows, pad_id=0, max_length=4)


# ---------------------------------------------------------------------------------------------------------------------
# A model: a packed batch gives, at every real position, the logits of each document run alone


def test_packed_batch_matches_each_document_run_alone(tiny_llama):
    rng = np.random.default_rng(0)
    lengths = [7, 3, 12, 5, 1, 9, 4]
    seqs = [rng.integers(0, 300, n).tolist() for n in lengths]
    plan = am.pack(lengths, 16)
    batch = plan.collate(seqs, pad_id=0)
    L = batch.input_ids.shape[1]
    with torch.no_grad():
        packed = tiny_llama(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=batch.mask.to_additive(L),
        ).logits
        for r, segs in enumerate(plan.bins):
            at = 0
            for i, a, b in segs:
                alone = tiny_llama(input_ids=torch.tensor([seqs[i][a:b]])).logits[0]
                torch.testing.assert_close(packed[r, at : at + b - a], alone, atol=1e-5, rtol=0)
                at += b - a


def _attnmask_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: attnmask.attention on the batch's mask spec, passed as a model kwarg."""
    out = am.attention(query, key, value, kwargs["attnmask_spec"], scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def test_packed_batch_with_attnmask_attention_matches_each_document_run_alone(tiny_llama):
    from transformers import AttentionInterface

    AttentionInterface.register("attnmask_pack_test", _attnmask_attention)
    rng = np.random.default_rng(1)
    lengths = [6, 11, 2, 8, 5, 3]
    seqs = [rng.integers(0, 300, n).tolist() for n in lengths]
    plan = am.pack(lengths, 12)
    batch = plan.collate(seqs, pad_id=0)
    tiny_llama.set_attn_implementation("attnmask_pack_test")
    try:
        with torch.no_grad():
            packed = tiny_llama(
                input_ids=batch.input_ids, position_ids=batch.position_ids, attnmask_spec=batch.mask
            ).logits
    finally:
        tiny_llama.set_attn_implementation("sdpa")
    real = batch.attention_mask.bool()
    with torch.no_grad():
        alone = torch.cat(
            [tiny_llama(input_ids=torch.tensor([seqs[i][a:b]])).logits[0] for row in plan.bins for i, a, b in row]
        )
    torch.testing.assert_close(packed[real], alone, atol=1e-5, rtol=0)


def test_packed_batch_through_the_attnmask_attn_implementation_matches_each_document_alone():
    hf_models = pytest.importorskip("tests.hf_models")
    lengths = [9, 4, 13, 2, 6]
    seqs = [hf_models.tokens(n, seed) for seed, n in enumerate(lengths)]
    plan = am.pack(lengths, 16)
    batch = plan.collate(seqs, pad_id=0)
    with torch.no_grad():
        logits = hf_models.model("llama", "attnmask")(**batch.model_inputs(labels=False)).logits
    alone = torch.cat([hf_models.alone("llama", seqs[i][a:b]) for row in plan.bins for i, a, b in row])
    torch.testing.assert_close(logits[batch.attention_mask.bool()], alone, atol=1e-5, rtol=0)
