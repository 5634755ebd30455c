"""Packing: place variable-length sequences into rows of ``max_length`` tokens, losing none, and collate the rows.

``pack(lengths_or_sequences, max_length)`` returns a `PackPlan`: which piece of which sequence goes in which row.
``plan.collate(sequences, pad_id=...)`` turns a plan into a `Batch` whose documents never attend to each other.
``pack_stream`` packs an iterator with bounded memory. Worked example, ``max_length=8``, lengths ``[5, 3, 6, 2]``::

    >>> plan = pack([5, 3, 6, 2], 8)
    >>> plan.bins
    [[(2, 0, 6), (3, 0, 2)], [(0, 0, 5), (1, 0, 3)]]

Row 0 holds all of sequence 2 then all of sequence 3 (8 tokens), row 1 sequences 0 and 1: two rows, the lower bound
``ceil(16 / 8)``. A segment ``(index, start, stop)`` is tokens ``start:stop`` of input sequence ``index``; every
segment is its own document (its own causal block, position ids from 0).

Strategies:

- ``"bfd"`` best-fit decreasing over the whole input: pieces by decreasing length (ties in input order), each into
  the open row with the least free space that still fits it (ties: the row that has had that free space longest),
  else a new row. Pieces of equal length are placed together, so the cost is O(N log N) for the sort plus a term in
  the number of distinct lengths (at most ``max_length``), not in rows times pieces.
- ``"ffd"`` first-fit decreasing: same order, each piece into the lowest-numbered row that fits it.
- ``"wrapped"`` concatenate in input order and cut every ``max_length`` tokens (pre-training style); a sequence cut
  at a row boundary becomes two documents, and ``overflow="split"`` means exactly that cut.
- ``"ordered"`` order-preserving next fit: pieces in input order, a new row whenever the next piece does not fit.

Overflow (a sequence longer than ``max_length``): ``"split"`` (default) into ``max_length`` pieces plus a remainder,
each its own document; ``"truncate"`` keeps the first ``max_length`` tokens and counts what was dropped;
``"error"`` raises `InputError` naming how many sequences are too long and the longest.

Zero-length sequences hold no tokens: they are placed in no row and counted in ``stats.empty_sequences``.

Tensors given sparse (lengths, token ids, labels, masks) are read as their dense values; a nested tensor is read as
its rows where a list of sequences is expected (``pack``'s input, ``collate``'s sequences and labels, a collator's
examples, ``pack_stream``'s iterable), else refused.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from attnmask._checks import INT64_MAX, check_int, dense_data, dense_items, sequences_data, sparse_or_nested
from attnmask._draw import ASCII, plan_bar
from attnmask._spans import IGNORE_INDEX, MASK_HINTS, check_targets, example_labels, label_hints, span_mask
from attnmask.batch import Batch
from attnmask.errors import InputError, LabelError, ShapeError, bad
from attnmask.masks import causal, document, key_padding

__all__ = ["PackPlan", "PackStats", "PackedRow", "PackingCollator", "collate_rows", "pack", "pack_stream"]

STRATEGIES = ("bfd", "ffd", "wrapped", "ordered")
OVERFLOWS = ("split", "truncate", "error")
MAX_LENGTH = 1 << 62
"""Largest ``max_length``: row offsets are int64 and a row boundary plus a length must not overflow."""
MAX_PIECES = 1 << 26
"""Most pieces a plan may hold, 67M: the planner keeps about 100 bytes per piece, so ``pack([2**40], 8)`` is refused
up front rather than by the OOM killer (real corpora are split into far fewer pieces)."""


# ----------------------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class PackStats:
    """What a plan did. ``tokens`` counts the tokens placed (input tokens minus ``truncated_tokens``).

    ``lower_bound = ceil(tokens / max_length)`` is the fewest rows any packing could use; ``fill`` is
    ``tokens / (rows * max_length)``. ``split_sequences`` sequences were cut into ``split_pieces`` segments in all;
    ``truncated_sequences`` lost ``truncated_tokens`` tokens (only with ``overflow="truncate"``).
    """

    sequences: int
    tokens: int
    rows: int
    max_length: int
    documents: int
    lower_bound: int
    split_sequences: int = 0
    split_pieces: int = 0
    truncated_sequences: int = 0
    truncated_tokens: int = 0
    empty_sequences: int = 0

    @property
    def fill(self) -> float:
        """Fraction of the ``rows * max_length`` slots that hold a token (1.0 for an empty plan)."""
        return self.tokens / (self.rows * self.max_length) if self.rows else 1.0

    @property
    def rows_above_lower_bound(self) -> int:
        return self.rows - self.lower_bound

    def __str__(self) -> str:
        text = (
            f"{self.sequences:,} sequences, {self.tokens:,} tokens -> {self.rows:,} rows of {self.max_length} "
            f"(fill {self.fill:.2%}, lower bound {self.lower_bound:,}, +{self.rows_above_lower_bound})"
        )
        if self.split_sequences:
            text += f"; {self.split_sequences:,} split into {self.split_pieces:,} pieces"
        if self.truncated_sequences:
            text += f"; {self.truncated_sequences:,} truncated, {self.truncated_tokens:,} tokens dropped"
        if self.empty_sequences:
            text += f"; {self.empty_sequences:,} empty"
        return text


@dataclass(frozen=True, eq=False, repr=False)
class PackPlan:
    """Which tokens of which input sequence go in which row; the rows never exceed ``max_length``.

    The plan is stored as flat arrays, one entry per segment in row-major order (int64, read-only):
    ``seg_index`` (input sequence), ``seg_start`` / ``seg_stop`` (token range in it) and ``row_offsets``
    ``(rows + 1,)`` (segments of row ``r`` are ``row_offsets[r]:row_offsets[r + 1]``). ``bins`` gives the same as
    Python lists of ``(index, start, stop)`` per row, built on first use. ``lengths`` are the input lengths.
    """

    max_length: int
    strategy: str
    overflow: str
    lengths: np.ndarray
    seg_index: np.ndarray
    seg_start: np.ndarray
    seg_stop: np.ndarray
    row_offsets: np.ndarray
    stats: PackStats

    def __len__(self) -> int:
        return self.stats.rows

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"PackPlan(strategy={self.strategy!r}, overflow={self.overflow!r}, max_length={self.max_length}, "
            f"sequences={s.sequences}, rows={s.rows}, documents={s.documents}, fill={s.fill:.4f})"
        )

    @property
    def seg_lens(self) -> np.ndarray:
        """``(documents,)`` length of every segment, row-major."""
        return self.seg_stop - self.seg_start

    @property
    def row_lengths(self) -> np.ndarray:
        """``(rows,)`` tokens in every row."""
        return np.add.reduceat(self.seg_lens, self.row_offsets[:-1]) if self.stats.rows else np.zeros(0, np.int64)

    @cached_property
    def bins(self) -> list[list[tuple[int, int, int]]]:
        """Rows as lists of segments ``(index, start, stop)``: tokens ``start:stop`` of input sequence ``index``."""
        segs = list(zip(self.seg_index.tolist(), self.seg_start.tolist(), self.seg_stop.tolist(), strict=True))
        bounds = self.row_offsets.tolist()
        return [segs[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def collate(
        self,
        sequences: Sequence[Any],
        *,
        pad_id: int,
        labels: Sequence[Any] | None = None,
        prompt_lengths: Sequence[int] | None = None,
        padding_free: bool = False,
        rows: Iterable[int] | slice | None = None,
        pad_to: str = "max_length",
    ) -> Batch:
        """Build the `Batch` of the plan's rows (all rows, or those named by ``rows``).

        ``sequences[i]`` (list, array or 1D tensor of token ids, or an example dict with ``input_ids`` and the label
        hints of ``attnmask._spans``: ``labels``, ``assistant_masks``, ``completion_mask``, ``prompt_length(s)``)
        must have the length the plan was made for; only the sequences the chosen rows use are read. ``labels``
        (same lengths) default to the token ids; ``-100`` is set on the first token of every document, on padding,
        on the first ``prompt_lengths[i]`` tokens of sequence ``i`` (a split piece masks only the part of the prompt
        that falls inside it) and wherever a mask hint is 0. Hints in the example dicts and the ``labels`` /
        ``prompt_lengths`` arguments together raise `LabelError`.

        Returns ``(B, L)`` int64 tensors, ``B`` = rows, ``L = max_length`` (``pad_to="longest"``: the longest chosen
        row); ``position_ids`` restart at 0 in every document; ``seq_lens`` per row; ``cu_seqlens`` ``(docs + 1,)``
        int32 over the documents of the flattened batch and ``max_seqlen``; ``mask = causal() & document(...) &
        key_padding(attention_mask)``; ``extras["sequence_index"]`` the input index of every document.
        ``padding_free=True`` gives one ``(1, total)`` row holding every document back to back. Tensors are created
        on the device of the sequences when they are tensors. Memory O(B·L), no per-token Python.
        """
        if pad_to not in ("max_length", "longest"):
            raise bad(InputError, "pad_to", "'max_length' or 'longest'", repr(pad_to))
        check_int("pad_id", pad_id, low=0, high=INT64_MAX)
        idx, start, stop, row_offsets = self.segments(rows)
        needed = np.unique(idx)
        sequences = sequences_data("sequences", sequences)
        labels = sequences_data("labels", labels)
        if len(sequences) and isinstance(sequences[0], Mapping):
            if labels is not None or prompt_lengths is not None:
                raise bad(LabelError, "labels, prompt_lengths", "None when sequences are example dicts", "given")
            _check_same_len("sequences", sequences, self.lengths.shape[0])
            sequences, labels, prompt_lengths, _ = _read_hints(sequences, needed)
        device = _device_of(sequences, needed)
        flat_ids, seq_offsets = _flatten(sequences, needed, self.lengths, "sequences", device)
        flat_labels = None
        if labels is not None:
            _check_same_len("labels", labels, self.lengths.shape[0])
            flat_labels, _ = _flatten(labels, needed, self.lengths, "labels", device, allow_negative=True)
        prompt = None
        if prompt_lengths is not None:
            prompt = _prompt_lengths(prompt_lengths, self.lengths)
        seg_lens = stop - start
        src_start = seq_offsets[np.searchsorted(needed, idx)] + start
        layout = _layout(seg_lens, row_offsets, self.max_length, padding_free, pad_to)
        gather = _gather_index(src_start, seg_lens, layout, device)
        input_ids = _scatter(flat_ids[gather.src], gather, layout, pad_id)
        source_labels = flat_labels if flat_labels is not None else flat_ids
        target = _scatter(source_labels[gather.src], gather, layout, IGNORE_INDEX)
        target = target.masked_fill(_label_mask(layout, start, seg_lens, idx, prompt, device), IGNORE_INDEX)
        position_ids = _scatter(gather.within, gather, layout, 0)
        attention_mask = _scatter(torch.ones_like(gather.within), gather, layout, 0)
        row_seq_lens = tuple(tuple(r) for r in _split_rows(seg_lens, layout.row_offsets))
        lens_t = _tensor(seg_lens, device)
        cu = torch.zeros(len(seg_lens) + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(lens_t, 0)
        mask = causal() & document(seq_lens=row_seq_lens, length=layout.width, device=device)
        mask = mask & key_padding(attention_mask)
        truncated = (
            int(np.maximum(self.lengths[needed] - self.max_length, 0).sum()) if self.overflow == "truncate" else 0
        )
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=target,
            mask=mask,
            seq_lens=row_seq_lens,
            cu_seqlens=cu,
            max_seqlen=int(seg_lens.max()) if len(seg_lens) else 0,
            num_truncated_tokens=truncated,
            extras={"sequence_index": _tensor(idx, device)},
        )

    def segments(
        self, rows: Iterable[int] | slice | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(index, start, stop, row_offsets)`` of the chosen rows (default all), as flat arrays like the plan's.

        ``plan.segments([1])`` of the module example gives ``([0, 1], [0, 0], [5, 3], [0, 2])``.
        """
        if rows is None:
            return self.seg_index, self.seg_start, self.seg_stop, self.row_offsets
        chosen = np.arange(self.stats.rows)[rows] if isinstance(rows, slice) else np.asarray(list(rows), np.int64)
        if chosen.size and (chosen.min() < -self.stats.rows or chosen.max() >= self.stats.rows):
            raise bad(InputError, "rows", f"row numbers in [0, {self.stats.rows})", f"{chosen.min()}..{chosen.max()}")
        chosen = chosen % max(self.stats.rows, 1)
        counts = self.row_offsets[chosen + 1] - self.row_offsets[chosen]
        offsets = np.zeros(len(chosen) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        take = _ranges(self.row_offsets[chosen], counts)
        return self.seg_index[take], self.seg_start[take], self.seg_stop[take], offsets

    def __str__(self) -> str:
        return _picture(self)


def _picture(plan: PackPlan, *, rows: int = 8, width: int = 64) -> str:
    """The stats and a small picture of the first rows, drawn as ``attnmask.viz.draw_plan`` draws them (ASCII set):
    one letter per document, ``.`` for free space, then the tokens used and the first segments.

    ``row    0 |AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCC.............| 1843  [17 0:1200] [3 0:600] [9 0:43]``
    """
    lines = [f"PackPlan(strategy={plan.strategy!r}, overflow={plan.overflow!r}): {plan.stats}"]
    idx, start, stop, offsets = plan.segments(range(min(rows, plan.stats.rows)))
    bounds = offsets.tolist()
    segments = list(zip(idx.tolist(), start.tolist(), stop.tolist(), strict=True))
    for r, (first, last) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        segs = segments[first:last]
        lengths = [b - a for _, a, b in segs]
        bar = plan_bar(lengths, plan.max_length, width, ASCII["none"])
        shown = " ".join(f"[{i} {a}:{b}]" for i, a, b in segs[:6]) + (" ..." if len(segs) > 6 else "")
        lines.append(f"row {r:>4} |{bar}| {sum(lengths):>{len(str(plan.max_length))}}  {shown}")
    if plan.stats.rows > rows:
        lines.append(f"... {plan.stats.rows - rows:,} more rows")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Planning


def pack(lengths_or_sequences: Any, max_length: int, *, strategy: str = "bfd", overflow: str = "split") -> PackPlan:
    """Plan rows of at most ``max_length`` tokens holding every input token exactly once (see the module docstring).

    ``lengths_or_sequences``: a 1D int array / tensor or a list of ints (read as lengths), or a list of sequences
    (anything with ``len``). Deterministic: the same input gives the same plan. Time O(N log N) for N pieces
    (about a second for a million on one core); memory O(N).
    """
    check_int("max_length", max_length, low=1, high=MAX_LENGTH)
    if strategy not in STRATEGIES:
        raise bad(InputError, "strategy", f"one of {STRATEGIES}", repr(strategy))
    if overflow not in OVERFLOWS:
        raise bad(InputError, "overflow", f"one of {OVERFLOWS}", repr(overflow))
    lengths = _lengths_of(lengths_or_sequences)
    too_long = lengths > max_length
    if overflow == "error" and too_long.any():
        raise bad(
            InputError,
            "lengths",
            f"sequences of at most max_length={max_length} tokens with overflow='error'",
            f"{int(too_long.sum())} longer ones, the longest {int(lengths.max())} tokens",
        )
    kept = np.minimum(lengths, max_length) if overflow == "truncate" else lengths
    pieces = int((-(-kept // max_length)).sum())
    if pieces > MAX_PIECES:
        raise bad(InputError, "lengths", f"at most {MAX_PIECES:,} pieces of max_length={max_length} tokens", pieces)
    if strategy == "wrapped":
        index, start, stop, row_of = _wrap(kept, max_length)
    else:
        index, start, stop = _pieces(kept, max_length)
        placer = {"bfd": _best_fit_decreasing, "ffd": _first_fit_decreasing, "ordered": _next_fit}[strategy]
        row_of, order = placer(stop - start, max_length)
        index, start, stop = index[order], start[order], stop[order]
    nrows = int(row_of.max()) + 1 if len(row_of) else 0
    if strategy in ("bfd", "ffd"):
        perm = np.argsort(row_of, kind="stable")
        index, start, stop, row_of = index[perm], start[perm], stop[perm], row_of[perm]
    row_offsets = np.zeros(nrows + 1, np.int64)
    np.cumsum(np.bincount(row_of, minlength=nrows), out=row_offsets[1:])
    stats = _stats(lengths, kept, index, nrows, max_length)
    arrays = [lengths, index, start, stop, row_offsets]
    for a in arrays:
        a.flags.writeable = False
    return PackPlan(max_length, strategy, overflow, *arrays, stats)


def _stats(lengths, kept, index, nrows, max_length) -> PackStats:
    tokens = int(kept.sum())
    per_seq = np.bincount(index, minlength=len(lengths))
    split = per_seq > 1
    return PackStats(
        sequences=len(lengths),
        tokens=tokens,
        rows=nrows,
        max_length=max_length,
        documents=len(index),
        lower_bound=-(-tokens // max_length),
        split_sequences=int(split.sum()),
        split_pieces=int(per_seq[split].sum()),
        truncated_sequences=int((kept < lengths).sum()),
        truncated_tokens=int((lengths - kept).sum()),
        empty_sequences=int((lengths == 0).sum()),
    )


def _pieces(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut every sequence into ``max_length`` pieces plus a remainder; empty sequences give no piece.

    ``[5, 0, 9]`` with ``max_length=4`` gives index ``[0, 0, 2, 2, 2]``, start ``[0, 4, 0, 4, 8]``,
    stop ``[4, 5, 4, 8, 9]``.
    """
    npieces = -(-lengths // max_length)
    index = np.repeat(np.arange(len(lengths), dtype=np.int64), npieces)
    first = np.cumsum(npieces) - npieces
    start = (np.arange(len(index), dtype=np.int64) - np.repeat(first, npieces)) * max_length
    stop = np.minimum(start + max_length, lengths[index])
    return index, start, stop


def _decreasing(sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Order of the items by decreasing size, ties in input order, and the ``(size, count)`` groups in that order.

    ``[2, 5, 2]`` gives order ``[1, 0, 2]`` and groups ``[(5, 1), (2, 2)]``. Sizes lie in ``[1, capacity]``, so the
    sort key fits 16 bits for usual capacities and numpy's stable sort is then a radix sort.
    """
    key = capacity - sizes
    if capacity < 2**16:
        key = key.astype(np.uint16)
    order = np.argsort(key, kind="stable")
    ordered = sizes[order]
    firsts = np.flatnonzero(np.diff(ordered, prepend=-1))
    counts = np.diff(np.append(firsts, len(ordered)))
    return order, list(zip(ordered[firsts].tolist(), counts.tolist(), strict=True))


def _best_fit_decreasing(sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing. Returns the row of every placed item and the placement order (indices into ``sizes``).

    Rows are kept in buckets by free space. All items of one size ``s`` are placed together: walking the non-empty
    buckets ``r >= s`` upwards, each row there takes ``r // s`` items (best fit keeps choosing it while its free
    space stays ``>= s``, since no bucket lies in ``[s, r)``), then new rows take ``capacity // s`` each. One walk per
    distinct size; buckets are FIFO, so among rows with equal free space the one that has had it longest wins. The
    free spaces of the non-empty buckets are kept sorted, so "smallest non-empty bucket >= s" is a binary search,
    and rows moved by a walk land below ``s`` (or end it), outside the rest of the walk. Memory O(items), whatever
    the capacity (there are at most as many buckets as open rows).
    """
    order, groups = _decreasing(sizes, capacity)
    buckets: dict[int, list[int]] = {}  # free slots r (0 < r < capacity) -> the rows with exactly r free, FIFO
    free_spaces: list[int] = []  # the keys of ``buckets``, ascending
    row_of: list[int] = []
    nrows = 0

    def move(rows, free: int) -> None:
        if free and rows:
            if free not in buckets:
                buckets[free] = []
                bisect.insort(free_spaces, free)
            buckets[free].extend(rows)

    def close(r: int) -> None:
        del buckets[r]
        del free_spaces[bisect.bisect_left(free_spaces, r)]

    for s, count in groups:
        left = count
        while left:
            i = bisect.bisect_left(free_spaces, s)
            if i == len(free_spaces):
                break
            r = free_spaces[i]
            bucket, per_row = buckets[r], r // s
            full = min(len(bucket), left // per_row)
            if full:
                taken = bucket[:full]
                del bucket[:full]
                left -= full * per_row
                if not bucket:
                    close(r)
                move(taken, r - per_row * s)
                row_of.extend(_each(taken, per_row))
            if left and bucket:
                row = bucket.pop(0)
                if not bucket:
                    close(r)
                move((row,), r - left * s)
                row_of.extend([row] * left)
                left = 0
        if left:
            per_row = capacity // s
            full, rest = divmod(left, per_row)
            move(range(nrows, nrows + full), capacity - per_row * s)
            row_of.extend(_each(range(nrows, nrows + full), per_row))
            nrows += full
            if rest:
                move((nrows,), capacity - rest * s)
                row_of.extend([nrows] * rest)
                nrows += 1
    return np.asarray(row_of, dtype=np.int64), order


def _each(rows, times: int):
    """Every row repeated ``times`` times, in order: ``([4, 7], 2)`` gives ``[4, 4, 7, 7]``."""
    if times == 1:
        return rows
    if len(rows) * times < 256:
        return [r for r in rows for _ in range(times)]
    return np.repeat(np.asarray(rows, np.int64), times).tolist()


def _first_fit_decreasing(sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """First-fit decreasing: items by decreasing size, each into the lowest-numbered row with room.

    All items of one size are placed together: the rows with free space ``>= s``, in row order, each take
    ``free // s`` until the items run out (cumulative sum + searchsorted), then new rows. One vectorised pass over
    the open rows per distinct size.
    """
    order, groups = _decreasing(sizes, capacity)
    free = np.zeros(max(len(sizes), 1), np.int64)
    nrows = 0
    chunks: list[np.ndarray] = []
    for s, count in groups:
        rows = np.flatnonzero(free[:nrows] >= s)
        takes = free[rows] // s
        done = np.cumsum(takes)
        k = int(np.searchsorted(done, count))
        if k < len(rows):
            takes = takes[: k + 1].copy()
            takes[k] -= int(done[k]) - count
            rows = rows[: k + 1]
        free[rows] -= takes * s
        chunks.append(np.repeat(rows, takes))
        left = count - int(takes.sum())
        if left:
            per_row = capacity // s
            full, rest = divmod(left, per_row)
            new = np.full(full + (1 if rest else 0), per_row, np.int64)
            if rest:
                new[-1] = rest
            free[nrows : nrows + len(new)] = capacity - new * s
            chunks.append(np.repeat(np.arange(nrows, nrows + len(new)), new))
            nrows += len(new)
    row_of = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
    return row_of.astype(np.int64, copy=False), order


def _next_fit(sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Order-preserving next fit: a new row whenever the next item does not fit in the current one."""
    row_of = np.empty(len(sizes), np.int64)
    row, used = -1, capacity
    for i, n in enumerate(sizes.tolist()):
        if used + n > capacity:
            row, used = row + 1, 0
        used += n
        row_of[i] = row
    return row_of, np.arange(len(sizes))


def _wrap(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate in input order and cut every ``max_length`` tokens; segments are the pieces between cuts.

    Sequence ``i`` spans ``[begin, end)`` of the stream and crosses ``(end - 1) // M - begin // M`` row boundaries,
    so it has one more segment than that (none when empty). ``[5, 3]`` with ``max_length=4``: row 0 ``(0, 0, 4)``,
    row 1 ``(0, 4, 5), (1, 0, 3)``. O(N + segments), no sort.
    """
    ends = np.cumsum(lengths)
    begins = ends - lengths
    count = np.where(lengths > 0, (ends - 1) // max_length - begins // max_length + 1, 0)
    index = np.repeat(np.arange(len(lengths), dtype=np.int64), count)
    j = np.arange(len(index), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
    row = np.repeat(begins // max_length, count) + j
    seg_a = np.maximum(row * max_length, begins[index])
    seg_b = np.minimum((row + 1) * max_length, ends[index])
    return index, seg_a - begins[index], seg_b - begins[index], row


# ----------------------------------------------------------------------------------------------------------------------
# Collation helpers (vectorised; index arithmetic on the device of the tokens)


@dataclass(frozen=True)
class _Layout:
    """Where segments go: ``(rows, width)`` output, segment ``k`` at row ``row[k]``, columns from ``col[k]``."""

    rows: int
    width: int
    row: np.ndarray
    col: np.ndarray
    row_offsets: np.ndarray


@dataclass(frozen=True)
class _Gather:
    """Per token: flat source index ``src``, flat destination ``dst``, position ``within`` its document."""

    src: torch.Tensor
    dst: torch.Tensor
    within: torch.Tensor


def _layout(seg_lens, row_offsets, max_length, padding_free, pad_to) -> _Layout:
    nseg = len(seg_lens)
    if padding_free:
        col = np.zeros(nseg, np.int64)
        np.cumsum(seg_lens[:-1], out=col[1:]) if nseg else None
        return _Layout(1, int(seg_lens.sum()), np.zeros(nseg, np.int64), col, np.array([0, nseg], np.int64))
    nrows = len(row_offsets) - 1
    row = np.repeat(np.arange(nrows, dtype=np.int64), np.diff(row_offsets))
    ends = np.cumsum(seg_lens)
    col = ends - seg_lens
    first = row_offsets[:-1][np.diff(row_offsets) > 0]
    col -= np.repeat(col[first], np.diff(np.append(first, nseg)))
    longest = int((col + seg_lens).max()) if nseg else 0
    width = max_length if pad_to == "max_length" else longest
    return _Layout(nrows, width, row, col, row_offsets)


def _gather_index(src_start, seg_lens, layout: _Layout, device) -> _Gather:
    lens = _tensor(seg_lens, device)
    seg = torch.repeat_interleave(torch.arange(len(seg_lens), device=device), lens)
    first_tok = torch.cumsum(lens, 0) - lens
    within = torch.arange(int(lens.sum()), device=device) - first_tok[seg]
    src = _tensor(src_start, device)[seg] + within
    base = _tensor(layout.row * layout.width + layout.col, device)
    return _Gather(src=src, dst=base[seg] + within, within=within)


def _scatter(per_token: torch.Tensor, g: _Gather, layout: _Layout, fill: int) -> torch.Tensor:
    """``(rows, width)`` int64 filled with ``fill``, then one value per placed token put at its destination."""
    out = torch.full((layout.rows * layout.width,), fill, dtype=torch.long, device=g.dst.device)
    out[g.dst] = per_token.long()
    return out.view(layout.rows, layout.width)


def _label_mask(layout: _Layout, start, seg_lens, idx, prompt, device) -> torch.Tensor:
    """True where a label is ignored: the first token of every document and the part of the prompt in each piece.

    The prompt of sequence ``i`` covers its tokens ``0:prompt[i]``; a piece ``start:stop`` holds the first
    ``clip(prompt[i] - start, 0, stop - start)`` of them. Built with `attnmask.labels.span_mask`.
    """
    rows, cols, lens = layout.row, layout.col, np.ones_like(seg_lens)
    if prompt is not None:
        in_piece = np.clip(prompt[idx] - start, 0, seg_lens)
        rows, cols, lens = np.concatenate([rows, rows]), np.concatenate([cols, cols]), np.concatenate([lens, in_piece])
    ignore = span_mask((layout.rows, layout.width), rows=rows, starts=cols, lengths=lens)
    return torch.from_numpy(ignore).to(device)


def _tensor(a: np.ndarray, device) -> torch.Tensor:
    """int64 tensor on ``device`` from a numpy array (copied: plan arrays are read-only)."""
    return torch.from_numpy(np.array(a, dtype=np.int64)).to(device)


def _split_rows(seg_lens: np.ndarray, row_offsets: np.ndarray) -> list[list[int]]:
    lens = seg_lens.tolist()
    bounds = row_offsets.tolist()
    return [lens[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + c)`` for every pair: ``([3, 10], [2, 1])`` gives ``[3, 4, 10]``."""
    total = int(counts.sum())
    first = np.cumsum(counts) - counts
    return np.repeat(starts - first, counts) + np.arange(total, dtype=np.int64)


def _device_of(sequences, needed) -> torch.device | None:
    if len(needed):
        first = sequences[int(needed[0])]
        if isinstance(first, torch.Tensor):
            return first.device
    return None


def _flatten(
    seqs, needed: np.ndarray, lengths: np.ndarray, name: str, device, *, allow_negative: bool = False
) -> tuple[torch.Tensor, np.ndarray]:
    """Concatenate ``seqs[i]`` for ``i`` in ``needed`` into one int64 tensor; check lengths (as planned) and ids."""
    _check_same_len(name, seqs, lengths.shape[0])
    positions = needed.tolist()
    picked = dense_items([seqs[i] for i in positions], lambda j: f"{name}[{positions[j]}]")
    got = np.fromiter((len(s) for s in picked), dtype=np.int64, count=len(picked))
    want = lengths[needed]
    if not np.array_equal(got, want):
        k = int(np.flatnonzero(got != want)[0])
        raise bad(ShapeError, f"{name}[{int(needed[k])}]", f"{int(want[k])} tokens as planned", f"{int(got[k])}")
    offsets = np.zeros(len(picked), np.int64)
    np.cumsum(got[:-1], out=offsets[1:]) if len(picked) else None
    if not picked:
        flat = torch.zeros(0, dtype=torch.long, device=device)
    elif all(isinstance(p, torch.Tensor) for p in picked):
        flat = torch.cat([p.reshape(-1).to(device) for p in picked])
    elif all(isinstance(p, np.ndarray) for p in picked):
        flat = torch.from_numpy(np.concatenate([p.reshape(-1) for p in picked])).to(device)
    else:
        items = (p.tolist() if hasattr(p, "tolist") else p for p in picked)
        flat = torch.tensor(list(itertools.chain.from_iterable(items)), device=device)
    if flat.numel() and (flat.dtype == torch.bool or flat.is_floating_point() or flat.is_complex()):
        raise bad(InputError, name, "integer token ids", f"dtype {flat.dtype}")
    flat = flat.long()
    if not allow_negative and flat.numel() and int(flat.min()) < 0:
        raise bad(InputError, name, "token ids >= 0", int(flat.min()))
    return flat, offsets


def _prompt_lengths(prompt_lengths, lengths: np.ndarray) -> np.ndarray:
    prompt_lengths = dense_data("prompt_lengths", prompt_lengths)
    if isinstance(prompt_lengths, (torch.Tensor, np.ndarray)):
        prompt_lengths = prompt_lengths.tolist()
    p = np.asarray([x.item() if hasattr(x, "item") else x for x in prompt_lengths])
    if p.ndim != 1 or p.shape[0] != lengths.shape[0]:
        raise bad(ShapeError, "prompt_lengths", f"one length per sequence ({lengths.shape[0]},)", p.shape)
    if p.size and (not np.issubdtype(p.dtype, np.integer) or (p < 0).any() or (p > lengths).any()):
        raise bad(InputError, "prompt_lengths", "integers in [0, len(sequence)]", p[:5].tolist())
    return p.astype(np.int64)


def _check_same_len(name: str, seqs, n: int) -> None:
    if len(seqs) != n:
        raise bad(ShapeError, name, f"{n} sequences as planned", len(seqs))


# ----------------------------------------------------------------------------------------------------------------------
# Input checks


def _lengths_of(x: Any) -> np.ndarray:
    """int64 lengths from lengths (1D int array / tensor / list of ints) or from a list of sequences (a nested tensor:
    its rows)."""
    x = sequences_data("lengths", x)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        if x.ndim != 1 or not (np.issubdtype(x.dtype, np.integer) or x.size == 0):
            raise bad(InputError, "lengths", "a 1D integer array of lengths", f"{x.dtype} {x.shape}")
        lengths = x.astype(np.int64)
    elif not isinstance(x, Sequence) and not hasattr(x, "__len__"):
        raise bad(InputError, "lengths", "lengths or a list of sequences", type(x).__name__)
    elif len(x) == 0:
        lengths = np.zeros(0, np.int64)
    elif isinstance(x[0], (int, np.integer)) and not isinstance(x[0], bool):
        try:
            lengths = np.asarray(x)
        except (ValueError, TypeError, OverflowError):  # ints mixed with lists
            raise bad(InputError, "lengths", "a list of int lengths", "mixed items") from None
        if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
            raise bad(InputError, "lengths", "a list of int lengths", f"mixed items ({lengths.dtype})")
        lengths = lengths.astype(np.int64)
    else:
        try:
            lengths = np.fromiter((len(s) for s in x), dtype=np.int64, count=len(x))
        except TypeError as e:
            raise bad(InputError, "sequences", "lengths or sequences with a len()", str(e)) from None
    if lengths.size and lengths.min() < 0:
        raise bad(InputError, "lengths", "lengths >= 0", int(lengths.min()))
    if lengths.size and int(lengths.max()) > MAX_LENGTH // max(len(lengths), 1):  # so that their sum fits in int64
        raise bad(InputError, "lengths", f"a total of at most {MAX_LENGTH} tokens", f"{int(lengths.max())} in one")
    return lengths


# ----------------------------------------------------------------------------------------------------------------------
# A collator for a DataLoader


@dataclass(frozen=True)
class PackingCollator:
    """Pack the examples of one DataLoader batch into rows and collate them: ``collator(examples) -> Batch``.

    ``examples``: token sequences, or mappings with ``input_key`` (default ``"input_ids"``) and optionally the label
    hints of ``attnmask._spans``: ``labels_key`` (``labels``), ``assistant_masks``, ``completion_mask``,
    ``prompt_length_key`` (``prompt_length``) or ``prompt_lengths``; a token is a target unless a hint excludes it,
    and the first token of every document never is. ``completion_only=True``: every example must carry a hint that
    marks its prompt (else `LabelError` naming the keys looked for and found). A batch with no target token raises
    `NoTargetError` unless ``allow_empty=True``. The batch has as many rows as the examples need (``B`` varies with
    the data; ``padding_free=True`` always gives one row). Example: ``DataLoader(ds, batch_size=64,
    collate_fn=PackingCollator(2048, pad_id=0))``; ``batch.model_inputs()`` is what a transformers model takes.
    """

    max_length: int
    pad_id: int
    strategy: str = "bfd"
    overflow: str = "split"
    padding_free: bool = False
    pad_to: str = "max_length"
    input_key: str = "input_ids"
    labels_key: str | None = "labels"
    prompt_length_key: str | None = "prompt_length"
    completion_only: bool = False
    allow_empty: bool = False

    def __post_init__(self) -> None:
        check_int("max_length", self.max_length, low=1)
        check_int("pad_id", self.pad_id, low=0, high=INT64_MAX)
        if self.strategy not in STRATEGIES:
            raise bad(InputError, "strategy", f"one of {STRATEGIES}", repr(self.strategy))
        if self.overflow not in OVERFLOWS:
            raise bad(InputError, "overflow", f"one of {OVERFLOWS}", repr(self.overflow))
        for name in ("padding_free", "completion_only", "allow_empty"):
            if not isinstance(getattr(self, name), bool):
                raise bad(InputError, name, "a bool", repr(getattr(self, name)))

    def __call__(self, examples: Sequence[Any]) -> Batch:
        examples = sequences_data("examples", examples)
        if not len(examples):
            raise bad(InputError, "examples", "at least one example", "an empty list")
        seqs, labels, prompts, hints = examples, None, None, ()
        if isinstance(examples[0], Mapping):
            keys = dict(input_key=self.input_key, labels_key=self.labels_key, prompt_key=self.prompt_length_key)
            everything = np.arange(len(examples))
            seqs, labels, prompts, hints = _read_hints(examples, everything, self.completion_only, **keys)
        elif self.completion_only:
            label_hints(examples, completion_only=True)  # raises: plain sequences carry no hint
        plan = pack(seqs, self.max_length, strategy=self.strategy, overflow=self.overflow)
        batch = plan.collate(
            seqs,
            pad_id=self.pad_id,
            labels=labels,
            prompt_lengths=prompts,
            padding_free=self.padding_free,
            pad_to=self.pad_to,
        )
        check_targets(batch.labels, allow_empty=self.allow_empty, hints=hints)
        return batch


def _read_hints(
    examples: Sequence[Any],
    needed: np.ndarray,
    completion_only: bool = False,
    *,
    input_key: str = "input_ids",
    labels_key: str | None = "labels",
    prompt_key: str | None = "prompt_length",
) -> tuple[list, list | None, list | None, tuple[str, ...]]:
    """Token ids, labels, prompt lengths and hint keys of example dicts (``attnmask._spans.example_labels``).

    Only the examples in ``needed`` are read; the others get ``[]`` ids, no labels and prompt 0 (never looked at).
    """
    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping) or input_key not in ex:
            got = sorted(ex) if isinstance(ex, Mapping) else type(ex).__name__
            raise bad(InputError, f"examples[{i}]", f"a mapping with key {input_key!r}", got)
    hints = label_hints(examples, labels_key=labels_key, prompt_key=prompt_key, completion_only=completion_only)
    read = set(needed.tolist())
    ids = [ex[input_key] if i in read else [] for i, ex in enumerate(examples)]
    ids = dense_items(ids, lambda i: f"examples[{i}][{input_key!r}]")
    with_labels = bool(set(hints) & {labels_key, *MASK_HINTS})
    with_prompt = bool(set(hints) - {labels_key, *MASK_HINTS})
    labels = [None] * len(examples) if with_labels else None
    prompts = [0] * len(examples) if with_prompt else None
    for i in needed.tolist():
        _check_unpadded(i, examples[i], len(ids[i]))
        lab, prompt = example_labels(f"examples[{i}]", examples[i], ids[i], hints, labels_key=labels_key)
        if with_labels:
            labels[i] = lab
        if with_prompt:
            prompts[i] = prompt
    return ids, labels, prompts, hints


def _check_unpadded(i: int, example: Mapping, n: int) -> None:
    """Packing takes examples as they are: an ``attention_mask`` with padding (0) in it is refused, not packed."""
    mask = example.get("attention_mask")
    if mask is None:
        return
    name = f"examples[{i}]['attention_mask']"
    mask = dense_data(name, mask)
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.shape != (n,):
        raise bad(ShapeError, name, f"{n} entries like its input_ids", m.shape)
    if not bool((m == 1).all()):
        wanted = "all 1 (packing takes unpadded examples; attnmask.pad strips padding)"
        raise bad(InputError, name, wanted, f"{int((m != 1).sum())} other entries")


# ----------------------------------------------------------------------------------------------------------------------
# Streaming


@dataclass(frozen=True)
class PackedRow:
    """One row from `pack_stream`: the tokens of its documents back to back (at most ``max_length``).

    ``segments[k] = (index, start, stop)``: document ``k`` is tokens ``start:stop`` of the ``index``-th sequence of
    the stream; ``seq_lens[k] = stop - start``. ``truncated_tokens``: tokens dropped (``overflow="truncate"``) from
    the sequences that start in this row.
    """

    input_ids: list[int]
    segments: tuple[tuple[int, int, int], ...]
    truncated_tokens: int = 0

    @property
    def seq_lens(self) -> tuple[int, ...]:
        return tuple(b - a for _, a, b in self.segments)

    @property
    def position_ids(self) -> list[int]:
        """Positions restarting at 0 in every document: seq_lens ``(3, 2)`` give ``[0, 1, 2, 0, 1]``."""
        return [p for n in self.seq_lens for p in range(n)]


@dataclass(frozen=True)
class _Fragment:
    index: int
    offset: int
    tokens: list
    carried: bool = False


def pack_stream(
    iterable: Iterable[Any],
    max_length: int,
    *,
    buffer_size: int = 1000,
    strategy: str = "bfd",
    overflow: str = "split",
) -> Iterator[PackedRow]:
    """Pack an iterator of token sequences into `PackedRow` s, holding at most ``buffer_size`` sequences at a time.

    The buffer is filled, planned with `pack` and its rows yielded. To keep fill high, the least-filled rows of a
    buffer (at most ``buffer_size // 2`` sequences or pieces, each carried at most once) go back into the next
    buffer instead of being yielded; for ``"ordered"`` and ``"wrapped"`` only the last row is carried, so order is
    kept. When the iterator ends, everything left is flushed. Every token is yielded exactly once (unless
    ``overflow="truncate"``, whose drops are counted in ``truncated_tokens``). Memory: O(buffer_size) sequences.
    Example: ``for row in pack_stream(seqs, 2048, buffer_size=10_000): ...``; `collate_rows` makes a `Batch` of
    several rows.
    """
    check_int("max_length", max_length, low=1)
    check_int("buffer_size", buffer_size, low=1)
    if strategy not in STRATEGIES:
        raise bad(InputError, "strategy", f"one of {STRATEGIES}", repr(strategy))
    if overflow not in OVERFLOWS:
        raise bad(InputError, "overflow", f"one of {OVERFLOWS}", repr(overflow))
    return _stream(iter(sequences_data("iterable", iterable)), max_length, buffer_size, strategy, overflow)


def collate_rows(
    rows: Iterable[PackedRow],
    *,
    pad_id: int,
    max_length: int | None = None,
    pad_to: str = "max_length",
    padding_free: bool = False,
) -> Batch:
    """The `Batch` of some `PackedRow` s from `pack_stream`, built as `PackPlan.collate` builds one from a plan.

    ``max_length``: the padded width (default: the longest row's length; must hold every row). Labels are the token
    ids with ``-100`` on the first token of every document and on padding; ``position_ids`` restart in every
    document; ``mask = causal() & document(...) & key_padding(attention_mask)``; ``extras["sequence_index"]`` holds
    the stream index of every document and ``num_truncated_tokens`` the rows' ``truncated_tokens``. Memory O(B·L);
    Python work per document, not per token. Example, batches of 8 rows from a stream::

        stream = pack_stream(seqs, 2048)
        while group := list(itertools.islice(stream, 8)):
            batch = collate_rows(group, pad_id=0, max_length=2048)
    """
    rows = list(rows)
    if not rows:
        raise bad(InputError, "rows", "at least one PackedRow", "none")
    for i, row in enumerate(rows):
        if not isinstance(row, PackedRow):
            raise bad(InputError, f"rows[{i}]", "a PackedRow (from pack_stream)", type(row).__name__)
    totals = np.array([len(row.input_ids) for row in rows], np.int64)
    width = int(totals.max()) if max_length is None else max_length
    check_int("max_length", width, low=1)
    if int(totals.max()) > width:
        raise bad(InputError, "max_length", f"at least the longest row's {int(totals.max())} tokens", width)
    # A plan over the rows themselves: "sequence" r is row r's tokens, and its documents are ranges of it.
    index, start, stop = [], [], []
    for r, row in enumerate(rows):
        at = 0
        for n in row.seq_lens:
            index.append(r), start.append(at), stop.append(at + n)
            at += n
    index_a, start_a, stop_a = (np.array(a, np.int64) for a in (index, start, stop))
    row_offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(row.segments) for row in rows], out=row_offsets[1:])
    stats = _stats(totals, totals, index_a, len(rows), width)
    plan = PackPlan(width, "ordered", "split", totals, index_a, start_a, stop_a, row_offsets, stats)
    batch = plan.collate([row.input_ids for row in rows], pad_id=pad_id, pad_to=pad_to, padding_free=padding_free)
    stream_index = torch.tensor([i for row in rows for i, _, _ in row.segments], dtype=torch.long)
    truncated = sum(row.truncated_tokens for row in rows)
    return dataclasses.replace(batch, extras={"sequence_index": stream_index}, num_truncated_tokens=truncated)


def _stream(it, max_length, buffer_size, strategy, overflow) -> Iterator[PackedRow]:
    frags: list[_Fragment] = []
    count, exhausted = 0, False
    while True:
        while len(frags) < buffer_size and not exhausted:
            try:
                seq = next(it)
            except StopIteration:
                exhausted = True
                break
            frags.append(_Fragment(count, 0, _token_list(seq, count)))
            count += 1
        if not frags:
            return
        plan = pack([len(f.tokens) for f in frags], max_length, strategy=strategy, overflow=overflow)
        carry = set() if exhausted else _rows_to_carry(plan, frags, buffer_size // 2)
        dropped = np.maximum(plan.lengths - max_length, 0) if overflow == "truncate" else None
        kept: list[_Fragment] = []
        for r, segs in enumerate(plan.bins):
            if r in carry:
                kept.extend(
                    _Fragment(frags[i].index, frags[i].offset + a, frags[i].tokens[a:b], True) for i, a, b in segs
                )
                continue
            tokens = []
            for i, a, b in segs:
                tokens.extend(frags[i].tokens[a:b])
            where = tuple((frags[i].index, frags[i].offset + a, frags[i].offset + b) for i, a, b in segs)
            lost = int(sum(dropped[i] for i, a, _ in segs if a == 0)) if dropped is not None else 0
            yield PackedRow(tokens, where, lost)
        frags = kept


def _rows_to_carry(plan: PackPlan, frags: list[_Fragment], budget: int) -> set[int]:
    """Rows to hold back for the next buffer: not full, holding no fragment carried before, within ``budget``."""
    if not plan.stats.rows or budget < 1:
        return set()
    carried = np.fromiter((f.carried for f in frags), dtype=bool, count=len(frags))
    starts = plan.row_offsets[:-1]
    has_carried = np.maximum.reduceat(carried[plan.seg_index], starts) if len(plan.seg_index) else carried[:0]
    sizes = np.diff(plan.row_offsets)
    ok = (plan.row_lengths < plan.max_length) & ~has_carried
    if plan.strategy in ("ordered", "wrapped"):
        last = plan.stats.rows - 1
        return {last} if ok[last] and sizes[last] <= budget else set()
    rows = np.flatnonzero(ok)
    rows = rows[np.argsort(plan.row_lengths[rows], kind="stable")]
    fits = np.cumsum(sizes[rows]) <= budget
    return set(rows[fits].tolist())


def _token_list(seq: Any, position: int) -> list:
    if sparse_or_nested(seq):
        seq = dense_data(f"sequence {position} of the stream", seq)
    if isinstance(seq, (str, bytes)) or not hasattr(seq, "__len__"):
        raise bad(InputError, f"sequence {position} of the stream", "a sequence of token ids", type(seq).__name__)
    return seq.tolist() if hasattr(seq, "tolist") else list(seq)
