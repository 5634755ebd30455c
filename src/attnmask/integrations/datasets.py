"""Hugging Face datasets: pack a whole `Dataset` globally into rows of at most ``max_length`` tokens.

``pack_dataset(ds, 2048)`` plans on the lengths of the ``input_ids`` column (read from the Arrow list offsets, no
Python per example), then builds every packed row with Arrow ``take``s on contiguous pieces (no per-token Python):

    >>> from datasets import Dataset
    >>> ds = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]})
    >>> pack_dataset(ds, 5)[:]
    {'input_ids': [[6, 7, 8, 9, 10], [1, 2, 3, 4, 5]], 'position_ids': [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]],
     'seq_lengths': [[5], [3, 2]]}

Every token column (``labels``, ``attention_mask``, ... : list columns whose lengths equal ``input_ids``' on every
example) travels with the tokens; ``position_ids`` restart at 0 in every document and ``seq_lengths`` lists the
documents of each row. Columns that are not token-aligned (text, scalars) have no meaning per packed row and are left
out. Requires ``datasets`` and ``pyarrow`` (imported when called).

Chat data: ``encode_chat_dataset(ds, tokenizer)`` maps a ``messages`` column through `attnmask.chat.encode_chat`
(batched, ``num_proc`` processes) into ``input_ids``, ``labels`` (assistant turns only) and ``assistant_masks``,
ready for ``pack_dataset`` and the collators.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnmask.chat import ChatStats, encode_chat
from attnmask.errors import InputError, bad
from attnmask.pack import PackPlan, pack

__all__ = ["pack_dataset", "encode_chat_dataset"]

_INT32_MAX = 2**31 - 1


def pack_dataset(
    dataset: Any,
    max_length: int,
    *,
    strategy: str = "bfd",
    overflow: str = "split",
    columns: list[str] | None = None,
    num_proc: int | None = None,
    input_column: str = "input_ids",
    rows_per_shard: int = 20_000,
    position_ids: bool = True,
    return_plan: bool = False,
) -> Any:
    """Pack ``dataset`` (a `datasets.Dataset` or `DatasetDict`) globally with `attnmask.pack`; returns a `Dataset`.

    ``columns``: the token columns to keep (default: every list column aligned with ``input_column``; naming one that
    is not aligned is an error). Output columns: those, ``position_ids`` (list of int32) and ``seq_lengths`` (list
    of int32), one row per packed row, rows of at most ``max_length`` tokens, not padded. ``num_proc > 1`` builds
    the rows in that many processes (``rows_per_shard`` rows per task). ``return_plan=True`` returns
    ``(packed, plan)`` so ``plan.stats`` can be reported. ``position_ids=False`` leaves that column out (a collator
    can rebuild it from ``seq_lengths``, as TRL's does). Memory: the token columns once more, shard by shard.
    """
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        packed = {
            name: pack_dataset(
                split,
                max_length,
                strategy=strategy,
                overflow=overflow,
                columns=columns,
                num_proc=num_proc,
                input_column=input_column,
                rows_per_shard=rows_per_shard,
                position_ids=position_ids,
                return_plan=True,
            )
            for name, split in dataset.items()
        }
        out = datasets.DatasetDict({name: ds for name, (ds, _) in packed.items()})
        return (out, {name: plan for name, (_, plan) in packed.items()}) if return_plan else out
    if not isinstance(dataset, datasets.Dataset):
        raise bad(InputError, "dataset", "a datasets.Dataset or DatasetDict", type(dataset).__name__)
    if num_proc is not None and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1):
        raise bad(InputError, "num_proc", "None or an int >= 1", repr(num_proc))
    if isinstance(rows_per_shard, bool) or not isinstance(rows_per_shard, int) or rows_per_shard < 1:
        raise bad(InputError, "rows_per_shard", "an int >= 1", repr(rows_per_shard))
    arrow = dataset.with_format("arrow")
    if input_column not in dataset.column_names:
        raise bad(InputError, "input_column", f"a column of the dataset {dataset.column_names}", repr(input_column))
    lengths = _list_lengths(arrow[input_column], input_column)
    cols = _token_columns(arrow, dataset.column_names, input_column, lengths, columns)
    plan = pack(lengths, max_length, strategy=strategy, overflow=overflow)
    source = _Source.of(_arrow_table(dataset, cols), cols, plan, bool(position_ids))
    fingerprint = _fingerprint(dataset, max_length, strategy, overflow, cols + ["position_ids"] * bool(position_ids))
    if num_proc is not None and num_proc > 1 and plan.stats.rows > 1:
        packed = _materialise_parallel(plan, source, num_proc, rows_per_shard, fingerprint)
    else:
        packed = _materialise_local(plan, source, rows_per_shard, fingerprint)
    packed = packed.with_format(dataset.format["type"], **dataset.format["format_kwargs"])
    return (packed, plan) if return_plan else packed


def _arrow_table(dataset, cols: list[str]):
    """The dataset's rows (its indices mapping applied, if any) as a pyarrow Table of ``cols``."""
    if dataset._indices is None:
        return dataset.data.table.select(cols)
    return dataset.with_format("arrow").select_columns(cols)[:]


def _list_lengths(column, name: str) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise bad(InputError, name, "a column of token lists", str(column.type))
    if column.null_count:
        raise bad(InputError, name, "no missing rows", f"{column.null_count} null rows")
    return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)


def _token_columns(arrow, names, input_column, lengths, columns) -> list[str]:
    """``input_column`` first, then the requested (or every aligned) list column."""
    import pyarrow as pa

    chosen = [input_column]
    for name in names if columns is None else columns:
        if name == input_column or name in chosen:
            continue
        if name not in names:
            raise bad(InputError, "columns", f"names of dataset columns {names}", repr(name))
        col = arrow[name]
        aligned = (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)) and not col.null_count
        aligned = aligned and np.array_equal(_list_lengths(col, name), lengths)
        if aligned:
            chosen.append(name)
        elif columns is not None:
            raise bad(InputError, "columns", f"token columns as long as {input_column!r} on every row", repr(name))
    return chosen


def _fingerprint(dataset, max_length, strategy, overflow, cols) -> str:
    key = repr((dataset._fingerprint, "attnmask.pack_dataset", max_length, strategy, overflow, cols))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _shards(plan: PackPlan, rows_per_shard: int) -> list[range]:
    """Row ranges small enough for 32-bit Arrow offsets; a single range when one shard holds everything."""
    rows = plan.stats.rows
    rows_per_shard = max(1, min(rows_per_shard, _INT32_MAX // plan.max_length))
    return [range(a, min(a + rows_per_shard, rows)) for a in range(0, rows, rows_per_shard)] or [range(0)]


@dataclass(frozen=True, eq=False)
class _Source:
    """The token columns as single-chunk Arrow list arrays, and where every sequence starts in their values."""

    columns: dict
    seq_starts: np.ndarray
    position_ids: bool

    @staticmethod
    def of(table, cols: list[str], plan: PackPlan, position_ids: bool) -> _Source:
        seq_starts = np.zeros(len(plan.lengths) + 1, np.int64)
        np.cumsum(plan.lengths, out=seq_starts[1:])
        return _Source({name: _one_chunk(table.column(name)) for name in cols}, seq_starts, position_ids)


def _one_chunk(column):
    """A ChunkedArray as one Array, without a copy when it already has a single chunk."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _materialise_local(plan, source: _Source, rows_per_shard, fingerprint):
    import datasets
    import pyarrow as pa

    tables = [_shard_table(plan, source, np.arange(r.start, r.stop)) for r in _shards(plan, rows_per_shard)]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return datasets.Dataset(datasets.table.InMemoryTable(table), fingerprint=fingerprint)


def _materialise_parallel(plan, source: _Source, num_proc, rows_per_shard, fingerprint):
    import datasets

    row_ids = datasets.Dataset.from_dict({"_row": np.arange(plan.stats.rows)}).with_format("arrow")
    return row_ids.map(
        _map_rows,
        batched=True,
        batch_size=min(rows_per_shard, -(-plan.stats.rows // num_proc), _INT32_MAX // plan.max_length),
        num_proc=num_proc,
        remove_columns=["_row"],
        fn_kwargs={"plan": plan, "source": source},
        new_fingerprint=fingerprint,
        desc="attnmask pack_dataset",
    )


def _map_rows(batch, plan, source):
    return _shard_table(plan, source, batch.column("_row").to_numpy())


def _shard_table(plan: PackPlan, source: _Source, rows: np.ndarray):
    """The packed rows ``rows`` as an Arrow table: token columns, ``position_ids``, ``seq_lengths``.

    A list *view* over a column's values (one view per segment: its offset and length) flattens to the segments
    back to back in row order, which is then re-cut at row boundaries; position ids are views of one
    ``arange(max_length)``. One Arrow copy per column, no per-token Python or index arrays.
    """
    import pyarrow as pa

    idx, start, stop, seg_offsets = plan.segments(rows)
    seg_lens = stop - start
    row_tokens = np.add.reduceat(seg_lens, seg_offsets[:-1]) if len(idx) else np.zeros(len(rows), np.int64)
    tok_offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(row_tokens, out=tok_offsets[1:])
    out = {}
    for name, col in source.columns.items():
        values = col.flatten()
        out[name] = _concat_views(values, source.seq_starts[idx] + start, seg_lens, tok_offsets, col.type)
    if source.position_ids:
        ramp = pa.array(np.arange(plan.max_length, dtype=np.int32))
        out["position_ids"] = _concat_views(ramp, np.zeros_like(seg_lens), seg_lens, tok_offsets, pa.list_(pa.int32()))
    out["seq_lengths"] = pa.ListArray.from_arrays(
        pa.array(seg_offsets.astype(np.int32)), pa.array(seg_lens.astype(np.int32))
    )
    return pa.table(out)


def _concat_views(values, starts: np.ndarray, sizes: np.ndarray, row_offsets: np.ndarray, list_type):
    """Rows ``row_offsets`` of the slices ``values[starts[k] : starts[k] + sizes[k]]`` put back to back."""
    import pyarrow as pa

    large = pa.types.is_large_list(list_type) or len(values) > _INT32_MAX
    view, otype = (pa.LargeListViewArray, np.int64) if large else (pa.ListViewArray, np.int32)
    flat = view.from_arrays(pa.array(starts.astype(otype)), pa.array(sizes.astype(otype)), values).flatten()
    kind = pa.LargeListArray if pa.types.is_large_list(list_type) else pa.ListArray
    return kind.from_arrays(pa.array(row_offsets.astype(np.int64 if kind is pa.LargeListArray else np.int32)), flat)


def encode_chat_dataset(
    dataset: Any,
    tokenizer: Any,
    *,
    messages_column: str = "messages",
    tools_column: str | None = None,
    num_proc: int | None = None,
    batch_size: int = 1000,
    return_stats: bool = False,
    **encode_kwargs: Any,
) -> Any:
    """Encode the conversations of ``dataset[messages_column]`` with `attnmask.chat.encode_chat`; returns a `Dataset`.

    Columns out: ``input_ids``, ``labels``, ``assistant_masks`` (token lists) and ``chat_source`` (the input row;
    pieces of a split conversation share it); the input columns are dropped. ``tools_column`` names a column of
    per-conversation tool lists. ``encode_kwargs`` go to ``encode_chat`` (``train_on``, ``max_length``,
    ``overflow``, template variables, ...). ``return_stats=True`` returns ``(dataset, ChatStats)``: conversations
    dropped, truncated or split by ``max_length``, tokens cut, and conversations left with no trained token, all
    counted over every process. A template the chat layer cannot locate raises `ChatTemplateError` naming the row.
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise bad(InputError, "dataset", "a datasets.Dataset", type(dataset).__name__)
    for name, column in (("messages_column", messages_column), ("tools_column", tools_column)):
        if column is not None and column not in dataset.column_names:
            raise bad(InputError, name, f"a column of the dataset {dataset.column_names}", repr(column))
    if num_proc is not None and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1):
        raise bad(InputError, "num_proc", "None or an int >= 1", repr(num_proc))
    out = dataset.map(
        _encode_chat_batch,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        remove_columns=dataset.column_names,
        fn_kwargs={
            "tokenizer": tokenizer,
            "messages_column": messages_column,
            "tools_column": tools_column,
            "encode_kwargs": encode_kwargs,
        },
        desc="attnmask encode_chat",
    )
    stats, empty = _chat_stats(out, len(dataset), encode_kwargs.get("overflow", "error"))
    if stats.dropped or stats.truncated or stats.split or stats.untrained:
        logging.getLogger("attnmask").warning("attnmask.encode_chat_dataset: %s", stats)
    out = out.remove_columns(["_chat_cut"])
    if len(empty):
        out = out.select(np.flatnonzero(np.isin(np.arange(len(out)), empty, invert=True)))
    return (out, stats) if return_stats else out


def _encode_chat_batch(batch, indices, tokenizer, messages_column, tools_column, encode_kwargs):
    tools = batch[tools_column] if tools_column is not None else None
    if tools is not None and all(t is None for t in tools):
        tools = None
    try:
        enc = encode_chat(tokenizer, batch[messages_column], tools=tools, report=False, **encode_kwargs)
    except InputError as e:  # name the dataset row, not the position in this batch
        raise type(e)(re.sub(r"conversations\[(\d+)\]", lambda m: f"row {indices[int(m.group(1))]}", str(e))) from None
    rows = {"input_ids": [], "labels": [], "assistant_masks": [], "chat_source": [], "_chat_cut": []}
    by_source: dict[int, list[int]] = {}
    for r, i in enumerate(enc.source):
        by_source.setdefault(i, []).append(r)
    for i, length in enumerate(enc.lengths):
        found = by_source.get(i, [])
        cut = length - sum(len(enc.input_ids[r]) for r in found)
        for k, r in enumerate(found or [None]):  # a dropped conversation leaves one empty row, removed afterwards
            rows["input_ids"].append(enc.input_ids[r] if r is not None else [])
            rows["labels"].append(enc.labels[r] if r is not None else [])
            rows["assistant_masks"].append(enc.assistant_masks[r] if r is not None else [])
            rows["chat_source"].append(indices[i])
            rows["_chat_cut"].append(cut if k == 0 else 0)
    return rows


def _chat_stats(out, conversations: int, overflow: str) -> tuple[ChatStats, np.ndarray]:
    """`ChatStats` of an encoded dataset, and its empty rows (left by dropped conversations, to be removed)."""
    import pyarrow.compute as pc

    table = out.with_format("arrow")[:]
    lengths = pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
    source = table["chat_source"].to_numpy().astype(np.int64)
    cut = table["_chat_cut"].to_numpy().astype(np.int64)
    flat = pc.list_flatten(table["labels"]).to_numpy(zero_copy_only=False)
    row_of_token = np.repeat(np.arange(len(lengths)), lengths)
    trained = np.bincount(row_of_token, weights=flat != -100, minlength=len(lengths)).astype(np.int64)
    kept = lengths > 0
    pieces = np.bincount(source[kept], minlength=conversations)
    cut_by = np.bincount(source, weights=cut, minlength=conversations).astype(np.int64)
    cut_kept = (cut_by > 0) & (pieces > 0)
    stats = ChatStats(
        conversations=conversations,
        rows=int(kept.sum()),
        tokens=int(lengths.sum()),
        trained_tokens=int(trained.sum()),
        dropped=_ints(np.flatnonzero(pieces == 0)),
        truncated=_ints(np.flatnonzero(cut_kept)) if overflow == "truncate" else (),
        split=_ints(np.flatnonzero((pieces > 1) | cut_kept)) if overflow == "split" else (),
        cut_tokens=int(cut_by.sum()),
        untrained=_ints(np.unique(source[kept & (trained == 0)])),
    )
    return stats, np.flatnonzero(~kept)


def _ints(values: np.ndarray) -> tuple[int, ...]:
    return tuple(int(v) for v in values)
