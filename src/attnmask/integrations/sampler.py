"""A length-aware distributed sampler: pack the dataset once, deal the rows to ranks in balanced steps.

Layer 8 (integrations). :class:`DistributedPackedSampler` packs globally and deals rows so that every rank runs the
same number of steps with nearly the same number of real tokens (the step's target count over ranks, for
``masked_cross_entropy(..., num_items=...)``, is :func:`attnmask.integrations.ranks.global_num_items`). Nothing
touches ``torch.distributed`` at import time; an uninitialised process group means one process.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from attnmask._checks import dense_data
from attnmask.batch import Batch
from attnmask.errors import InputError, bad
from attnmask.integrations.ranks import _check_int, resolve_world
from attnmask.pack import PackPlan, PackStats, pack

__all__ = ["DistributedPackedSampler", "SamplerStats", "Segment"]

Segment = tuple[int, int, int]  # (sequence index, start, stop): tokens [start, stop) of one input sequence


# ----------------------------------------------------------------------------------------------------------------------
# Dealing packed rows to ranks


@dataclass(frozen=True)
class SamplerStats:
    """What a :class:`DistributedPackedSampler` did with the data, the same on every rank.

    ``imbalance``: the largest over steps of (most real tokens on one rank) / (mean over ranks), 1.0 = perfect.
    ``split_sequences``: sequences cut into pieces (longer than ``max_length``, or cut to balance the last steps);
    every piece is its own document. ``empty_rows``: rows with no token (only when there are fewer tokens than rows
    to fill); such a row is all padding with no target, so its rank still runs the step. ``dropped_*``: non-zero only
    with ``drop_last=True``.
    """

    sequences: int
    tokens: int
    steps: int
    rows: int
    split_sequences: int
    rebalanced_rows: int
    empty_rows: int
    imbalance: float
    dropped_sequences: int = 0
    dropped_tokens: int = 0


def _load(row: Sequence[Segment]) -> int:
    return sum(stop - start for _, start, stop in row)


def _loads(rows: Sequence[Sequence[Segment]]) -> np.ndarray:
    return np.fromiter((_load(r) for r in rows), dtype=np.int64, count=len(rows))


def _snake_slots(world_size: int, rows_per_step: int) -> np.ndarray:
    """``(world_size, rows_per_step)``: positions, in a step's rows sorted heaviest first, that each rank gets.

    Snake order 0..W-1, W-1..0, ...: with ``W = 2, k = 2`` rank 0 gets positions 0 and 3, rank 1 positions 1 and 2.
    """
    j = np.arange(world_size * rows_per_step)
    lap, pos = np.divmod(j, world_size)
    rank_of = np.where(lap % 2 == 0, pos, world_size - 1 - pos)
    return np.stack([np.nonzero(rank_of == r)[0] for r in range(world_size)])


def _ratios(rank_loads: np.ndarray) -> np.ndarray:
    """Max over mean along the last axis (1.0 where the mean is 0)."""
    mean = rank_loads.mean(axis=-1)
    return np.where(mean > 0, rank_loads.max(axis=-1) / np.maximum(mean, 1e-12), 1.0)


def _table(loads: np.ndarray, world_size: int, rows_per_step: int) -> np.ndarray:
    """Rows sorted heaviest first (ties by number), taken ``W * k`` at a time and dealt in snake order.

    Returns ``(groups, W, k)`` row numbers; rows past the last whole group are left out (the caller pools them).
    """
    per_step = world_size * rows_per_step
    order = np.lexsort((np.arange(len(loads)), -loads))
    groups = order[: len(order) // per_step * per_step].reshape(-1, per_step)
    return groups[:, _snake_slots(world_size, rows_per_step)]


def _fill_lightest(segments: list[Segment], n_bins: int, cap: int) -> list[list[Segment]]:
    """Longest first into the lightest bin, no bin above ``cap``; a segment is cut only where the lightest bin is full.

    Needs ``tokens <= n_bins * cap``. Whole sequences stay whole unless the bins are nearly full.
    """
    bins: list[list[Segment]] = [[] for _ in range(n_bins)]
    heap = [(0, b) for b in range(n_bins)]
    for index, start, stop in sorted(segments, key=lambda s: (-(s[2] - s[1]), s[0], s[1])):
        while start < stop:
            load, b = heapq.heappop(heap)
            take = min(stop - start, cap - load)
            bins[b].append((index, start, start + take))
            start += take
            heapq.heappush(heap, (load + take, b))
    return bins


def _cut_evenly(segments: list[Segment], n_bins: int) -> list[list[Segment]]:
    """Segments (longest first) laid end to end and cut into ``n_bins`` bins whose loads differ by at most 1.

    At most ``n_bins - 1`` cuts. Example: lengths ``[3, 2]`` into 4 bins: ``[0:2]``, ``[2:3]``, ``[0:1]``, ``[1:2]``.
    """
    tokens = sum(stop - start for _, start, stop in segments)
    targets = [tokens // n_bins + (1 if b < tokens % n_bins else 0) for b in range(n_bins)]
    bins: list[list[Segment]] = [[] for _ in range(n_bins)]
    b, room = 0, targets[0]
    for index, start, stop in sorted(segments, key=lambda s: (-(s[2] - s[1]), s[0], s[1])):
        while start < stop:
            while room == 0:
                b += 1
                room = targets[b]
            take = min(stop - start, room)
            bins[b].append((index, start, start + take))
            start, room = start + take, room - take
    return bins


@dataclass(frozen=True)
class _Deal:
    """The global plan: ``rows`` (lists of segments) and ``table`` ``(steps, W, k)`` of row numbers per rank slot."""

    rows: list[list[Segment]]
    table: np.ndarray
    rebalanced_rows: int


def _deal(
    rows: list[list[Segment]],
    max_length: int,
    world_size: int,
    rows_per_step: int,
    tolerance: float,
    drop_last: bool,
) -> _Deal:
    """Steps of ``world_size`` rank slots of ``rows_per_step`` rows each, balanced to ``tolerance``.

    Rows sorted by real tokens are taken ``world_size * rows_per_step`` at a time and dealt in snake order; a group
    whose rank loads differ by more than ``tolerance`` (max / mean - 1), and the rows left over when the count does not
    divide, are pooled and refilled into whole steps (:func:`_fill_lightest`, else :func:`_cut_evenly`), or dropped
    with ``drop_last``. Time O(rows log rows) plus O(pooled segments · log) for the refill.
    """
    per_step = world_size * rows_per_step
    loads = _loads(rows)
    table = _table(loads, world_size, rows_per_step)
    balanced = _ratios(loads[table].sum(axis=-1)) <= 1 + tolerance
    pooled = np.setdiff1d(np.arange(len(rows)), table[balanced].ravel(), assume_unique=True)
    head = table[balanced]
    if not len(pooled) or drop_last:
        return _Deal(rows, head, 0)
    n_bins = math.ceil(len(pooled) / per_step) * per_step
    segments = [seg for i in pooled.tolist() for seg in rows[i]]
    # First whole sequences only (cut only where no row has room); if that leaves a step out of balance, cut the
    # pooled tokens into rows that differ by at most one token (at most one cut per row), if that is better.
    bins = _fill_lightest(segments, n_bins, max_length)
    tail = _table(_loads(bins), world_size, rows_per_step)
    worst = _ratios(_loads(bins)[tail].sum(axis=-1)).max()
    if worst > 1 + tolerance:
        cut = _cut_evenly(segments, n_bins)
        cut_tail = _table(_loads(cut), world_size, rows_per_step)
        if _ratios(_loads(cut)[cut_tail].sum(axis=-1)).max() < worst:  # cut sequences only where it helps
            bins, tail = cut, cut_tail
    return _Deal(rows + bins, np.concatenate([head, tail + len(rows)]), len(pooled))


class DistributedPackedSampler(Sampler):
    """Packs every sequence of the dataset once, globally, and deals the rows to ranks in balanced steps.

    Each iteration yields one step of this rank: a list of ``rows_per_step`` rows, each a list of segments
    ``(index, start, stop)`` (tokens ``[start, stop)`` of sequence ``index``; each segment is one document of the row).
    Guarantees, for any ``(lengths, max_length, num_replicas, rows_per_step)``:

    - every rank yields the same number of steps (``len(sampler)``), so no rank waits at the end of an epoch;
    - every token of every sequence is in exactly one segment of one rank per epoch (unless ``drop_last=True``);
      zero-length sequences hold no token and appear in no row;
    - real tokens per step differ across ranks by at most ``tolerance`` (max / mean - 1, default 2%) wherever the
      rows allow; the rows that do not fit that bound (the partly filled last rows, or a count of rows that does not
      divide by ``num_replicas * rows_per_step``) are refilled evenly into whole steps, cutting a sequence where a
      row is full (counted in ``stats.split_sequences``). A rank may get an empty row only when there are fewer
      tokens than rows to fill; it then runs the step on padding with no target (its loss adds 0);
    - the same for every rank and every run with the same ``(seed, epoch)``: ``set_epoch`` reshuffles the order of
      steps and which rank gets which row of a step; the packing itself is done once.

    ``num_replicas`` / ``rank`` default to the default process group's (one process when torch.distributed is not
    initialised). ``drop_last=True`` drops those refilled rows instead (counted in ``stats.dropped_*``).
    Packing: :func:`attnmask.pack` with ``strategy`` (default best-fit decreasing over the whole dataset) and
    ``overflow="split"`` (sequences longer than ``max_length`` become pieces, each its own document). Time
    O(n log n) once per sampler, memory O(n) segments.

    Example: 5 sequences of lengths ``[6, 5, 4, 3, 2]``, ``max_length=10``, 2 ranks: rows ``[6, 4]`` and
    ``[5, 3, 2]``, one step, 10 tokens on each rank.

    With a ``DataLoader`` (worker processes build the batches): pass the sampler as ``sampler=`` with
    ``batch_size=None``; the dataset's ``__getitem__`` then receives one step (its list of rows) and returns the batch::

        class Steps(torch.utils.data.Dataset):
            def __getitem__(self, rows):
                return collate(rows, sequences)
        loader = DataLoader(Steps(), sampler=sampler, batch_size=None, num_workers=2)
    """

    def __init__(
        self,
        lengths: Any,
        max_length: int,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        rows_per_step: int = 1,
        tolerance: float = 0.02,
        drop_last: bool = False,
        strategy: str = "bfd",
    ) -> None:
        self.lengths = _lengths_list(lengths)
        _check_int("max_length", max_length, 1)
        _check_int("rows_per_step", rows_per_step, 1)
        _check_int("seed", seed, 0)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
            raise bad(InputError, "tolerance", "a number >= 0", repr(tolerance))
        self.num_replicas, self.rank = resolve_world(num_replicas, rank, None)
        self.max_length, self.rows_per_step = int(max_length), int(rows_per_step)
        self.seed, self.shuffle, self.tolerance, self.drop_last = int(seed), bool(shuffle), float(tolerance), drop_last
        if strategy not in ("bfd", "ffd", "wrapped", "ordered"):
            raise bad(InputError, "strategy", "one of 'bfd', 'ffd', 'wrapped', 'ordered'", repr(strategy))
        self.strategy = strategy
        self.epoch = 0
        self._deal: _Deal | None = None
        self._stats: SamplerStats | None = None

    # -- the global plan (the same on every rank) ---------------------------------------------------------------------
    def _plan(self) -> _Deal:
        if self._deal is None:
            rows = pack(self.lengths, self.max_length, strategy=self.strategy, overflow="split").bins
            deal = _deal(rows, self.max_length, self.num_replicas, self.rows_per_step, self.tolerance, self.drop_last)
            self._deal, self._stats = deal, self._summarise(deal)
        return self._deal

    def _summarise(self, deal: _Deal) -> SamplerStats:
        loads = _loads(deal.rows)[deal.table]  # (steps, W, k)
        used = np.unique(deal.table).tolist()
        index = np.fromiter((seg[0] for r in used for seg in deal.rows[r]), dtype=np.int64)
        pieces = np.bincount(index, minlength=len(self.lengths))
        lengths = np.asarray(self.lengths, dtype=np.int64)
        tokens = int(loads.sum())
        return SamplerStats(
            sequences=len(self.lengths),
            tokens=tokens,
            steps=len(deal.table),
            rows=int(deal.table.size),
            split_sequences=int((pieces > 1).sum()),
            rebalanced_rows=deal.rebalanced_rows,
            empty_rows=int((loads == 0).sum()),
            imbalance=float(_ratios(loads.sum(axis=-1)).max(initial=1.0)),
            dropped_sequences=int(((pieces == 0) & (lengths > 0)).sum()),
            dropped_tokens=int(lengths.sum()) - tokens,
        )

    @property
    def stats(self) -> SamplerStats:
        self._plan()
        return self._stats

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration yields (call it before each epoch, on every rank)."""
        _check_int("epoch", epoch, 0)
        self.epoch = int(epoch)

    def steps_for_rank(self, rank: int) -> list[list[list[Segment]]]:
        """The steps ``rank`` yields this epoch (each a list of rows of segments); for inspection and tests."""
        _check_int("rank", rank, 0)
        if rank >= self.num_replicas:
            raise bad(InputError, "rank", f"an int in [0, {self.num_replicas})", rank)
        deal = self._plan()
        slots = deal.table[:, rank]  # (steps, k)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            order = rng.permutation(len(deal.table))
            deals = rng.permuted(np.tile(np.arange(self.num_replicas), (len(deal.table), 1)), axis=1)
            slots = deal.table[order, deals[order, rank]]
        return [[list(deal.rows[i]) for i in step] for step in slots.tolist()]

    def collate(
        self,
        rows: Sequence[Sequence[Segment]],
        sequences: Sequence[Any],
        *,
        pad_id: int,
        labels: Sequence[Any] | None = None,
        prompt_lengths: Sequence[int] | None = None,
        pad_to: str = "max_length",
    ) -> Batch:
        """The ``Batch`` of one step's ``rows`` (as this sampler yields them), built by ``PackPlan.collate``.

        ``sequences[i]`` holds the tokens of sequence ``i`` (the lengths the sampler was built with). One row per
        packed row, ``(len(rows), max_length)`` tensors (``pad_to="longest"``: the longest row); every segment is its
        own document: ``position_ids`` restart at 0, the first label of each document and padding labels are -100,
        ``mask = causal() & document(...) & key_padding(...)``. An empty row is all padding with no target.
        """
        index = np.fromiter((i for row in rows for i, _, _ in row), dtype=np.int64)
        start = np.fromiter((a for row in rows for _, a, _ in row), dtype=np.int64)
        stop = np.fromiter((b for row in rows for _, _, b in row), dtype=np.int64)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(row) for row in rows], out=offsets[1:])
        tokens = int((stop - start).sum())
        stats = PackStats(
            sequences=len(self.lengths),
            tokens=tokens,
            rows=len(rows),
            max_length=self.max_length,
            documents=len(index),
            lower_bound=-(-tokens // self.max_length),
        )
        lengths = np.asarray(self.lengths, dtype=np.int64)
        plan = PackPlan(self.max_length, self.strategy, "split", lengths, index, start, stop, offsets, stats)
        return plan.collate(sequences, pad_id=pad_id, labels=labels, prompt_lengths=prompt_lengths, pad_to=pad_to)

    def __iter__(self) -> Iterator[list[list[Segment]]]:
        return iter(self.steps_for_rank(self.rank))

    def __len__(self) -> int:
        return len(self._plan().table)


def _lengths_list(lengths: Any) -> list[int]:
    lengths = dense_data("lengths", lengths)
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.tolist()
    elif isinstance(lengths, np.ndarray):
        if lengths.dtype.kind not in "iu":
            raise bad(InputError, "lengths", "integer lengths", f"dtype {lengths.dtype}")
        lengths = lengths.tolist()
    if not isinstance(lengths, (list, tuple)):
        raise bad(InputError, "lengths", "a sequence of int lengths", type(lengths).__name__)
    out = []
    for n in lengths:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise bad(InputError, "lengths", "non-negative int lengths", repr(n))
        out.append(int(n))
    return out
