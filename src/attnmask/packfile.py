"""Files of sequences in, files of packed rows out: JSONL and Parquet, validated record by record, written atomically.

Input records hold either text (``{"text": "..."}``, tokenized on the way in) or token ids
(``{"input_ids": [1, 2, 3]}``). A packed file has one row per line (JSONL) or per table row (Parquet)::

    {"input_ids": [...], "position_ids": [0, 1, 2, 0, 1], "seq_lens": [3, 2], "segments": [[7, 0, 3], [2, 0, 2]]}

``segments[k] = [record, start, stop]``: document ``k`` of the row is tokens ``start:stop`` of input record number
``record`` (0-based, counting every record of the input, bad ones included), so ``unpack_rows`` gives the input back.

Errors in the data raise ``InputError("FILE:LINE: message")`` (line numbers in JSONL, 1-based row numbers in
Parquet). Parquet needs ``pyarrow`` (imported lazily).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attnmask.errors import InputError

__all__ = [
    "PackedColumns",
    "PackedFileRow",
    "ReadResult",
    "atomic_output",
    "build_columns",
    "check_every_token",
    "check_output",
    "check_pieces",
    "file_format",
    "iter_records",
    "read_packed",
    "read_sequences",
    "unpack_rows",
    "write_rows",
]

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
STDIO = "-"
"""The path that means stdin (to read) or stdout (to write), always JSONL."""


def at(path: str | Path, line: int, message: str) -> InputError:
    """``InputError("FILE:LINE: message")``; the caller raises it."""
    return InputError(f"{path}:{line}: {message}")


# ----------------------------------------------------------------------------------------------------------------------
# Atomic output


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the directory of ``path``; when the block ends normally, fsync the file and
    ``os.replace`` it onto ``path`` (readers see the old file or the complete new one, never a part). On any
    exception (Ctrl-C included) the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    directory = _output_directory(path)
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)


def _new_file_mode(path: Path) -> int:
    """The permissions the output gets: an existing file's own, else what ``open`` would give (0666 less the umask;
    ``mkstemp`` alone would leave 0600)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _output_directory(path: Path) -> Path:
    if not path.parent.is_dir():
        raise InputError(f"{path}: the output directory {path.parent} does not exist")
    return path.parent


def check_output(path: str | Path) -> str:
    """Check an output path before any work: a known format (returned) in an existing directory (``-``: stdout)."""
    if str(path) == STDIO:
        return "jsonl"
    fmt = file_format(path, "output")
    _output_directory(Path(path))
    return fmt


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable where the platform allows it (POSIX); silently skipped elsewhere."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------------------
# Reading records


def file_format(path: str | Path, role: str = "input") -> str:
    """``"jsonl"`` or ``"parquet"`` from the file's suffix (``-``, stdin or stdout, is JSONL)."""
    if str(path) == STDIO:
        return "jsonl"
    suffix = Path(path).suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise InputError(f"{path}: unknown {role} format {suffix or '(no suffix)'!r}; use .jsonl or .parquet")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise InputError("Parquet needs pyarrow: pip install 'attnmask[datasets]'") from e
    return pyarrow


@dataclass(frozen=True)
class RecordProblem:
    """A record that could not be read at all (bad JSON, bad UTF-8); ``message`` says why."""

    message: str


def iter_records(path: str | Path) -> Iterator[tuple[int, object]]:
    """Yield ``(line, record)``: JSONL line numbers (blank lines skipped) or 1-based Parquet row numbers.

    A JSONL line that is not valid JSON yields a ``RecordProblem`` in place of the record, so the caller decides
    whether to stop or to skip it. Memory: one line (JSONL) or one batch of 4,096 rows (Parquet) at a time.
    """
    if str(path) == STDIO:
        for line_no, raw in enumerate(sys.stdin.buffer, start=1):
            if raw.strip():
                yield line_no, _parse_json_line(raw)
        return
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a file")
    if file_format(path) == "jsonl":
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if raw.strip():
                    yield line_no, _parse_json_line(raw)
        return
    pa = _pyarrow()
    try:
        pf = pa.parquet.ParquetFile(path)
    except Exception as e:  # pyarrow has its own exception types for unreadable files
        raise at(path, 1, f"not a readable Parquet file ({e})") from None
    row = 0
    batches = pf.iter_batches(batch_size=4096)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a corrupt page or column: pyarrow's own exception types
            raise at(path, row + 1, f"unreadable Parquet data ({e})") from None
        if batch is None:
            return
        for rec in batch.to_pylist():
            row += 1
            yield row, rec


def _parse_json_line(raw: bytes) -> object:
    try:
        return json.loads(raw.rstrip(b"\r\n"))
    except UnicodeDecodeError:
        return RecordProblem("not valid UTF-8")
    except json.JSONDecodeError as e:
        return RecordProblem(f"malformed JSON ({e.msg} at column {e.colno})")
    except ValueError as e:  # Python's limit on integer digits (4,300 by default)
        return RecordProblem(f"unreadable JSON ({str(e).splitlines()[0][:80]})")
    except RecursionError:
        return RecordProblem("malformed JSON (nested too deeply)")


def record_ids(
    record: object, *, text_field: str | None, ids_field: str | None, tokenize: Callable[[str], list[int]]
) -> list[int]:
    """Token ids of one record, or ``ValueError`` with a message for the user.

    Checked: the record is an object, the field is present and not null, ids are non-negative ints (not floats,
    bools or strings) below ``2**63``, text is a string, and the sequence is not empty.
    """
    if isinstance(record, RecordProblem):
        raise ValueError(record.message)
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object with a field, got {type(record).__name__}")
    name = ids_field if ids_field is not None else text_field
    if record.get(name) is None:
        present = ", ".join(repr(k) for k in list(record)[:8]) or "none"
        raise ValueError(f"missing field {name!r} (fields: {present})")
    value = record[name]
    if ids_field is not None:
        if not isinstance(value, list):
            raise ValueError(f"field {name!r}: expected a list of integer ids, got {type(value).__name__}")
        ids = _checked_ids(name, value)
    else:
        if not isinstance(value, str):
            raise ValueError(f"field {name!r}: expected a string, got {type(value).__name__}")
        ids = tokenize(value)
    if len(ids) == 0:
        raise ValueError(f"field {name!r}: zero-length sequence (0 tokens)")
    return ids


def _checked_ids(name: str, value: list) -> np.ndarray:
    """``value`` as int64 ids in ``[0, 2**63)``; ``ValueError`` naming the first bad id (floats, bools and strings are
    refused, not converted). One vectorised pass when every id is fine; the per-id search runs only on errors."""
    if set(map(type, value)) <= {int}:  # bool is not int here: type(True) is bool
        try:
            ids = np.asarray(value, dtype=np.int64)
        except OverflowError:
            ids = None
        if ids is not None and (ids.size == 0 or int(ids.min()) >= 0):
            return ids
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int):
            raise ValueError(f"field {name!r}: id {i} is not an integer: {json.dumps(t)[:40]}")
        if not 0 <= t < 1 << 63:
            raise ValueError(f"field {name!r}: id {i} is out of range [0, 2**63): {t}")
    raise AssertionError("unreachable: a bad id was expected")  # pragma: no cover


@dataclass(frozen=True, eq=False)
class ReadResult:
    """Sequences read from a file, back to back: sequence ``i`` is ``values[offsets[i]:offsets[i + 1]]`` (int64)
    and came from input record number ``records[i]`` (0-based, bad records counted). ``bad`` lists
    ``(line, message)`` of the records skipped with ``skip_bad``."""

    values: np.ndarray
    offsets: np.ndarray
    records: np.ndarray
    bad: list[tuple[int, str]] = field(default_factory=list)
    total_records: int = 0

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    @classmethod
    def of(cls, sequences: list, records: list[int] | None = None, bad=(), total_records: int | None = None):
        """From a list of sequences (lists or arrays of ids); records default to ``0 .. n-1``."""
        lens = np.fromiter((len(q) for q in sequences), dtype=np.int64, count=len(sequences))
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        parts = [np.asarray(q, dtype=np.int64) for q in sequences]
        values = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        recs = np.arange(len(sequences)) if records is None else np.asarray(records, dtype=np.int64)
        return cls(values, offsets, recs, list(bad), len(sequences) if total_records is None else total_records)


def read_sequences(
    path: str | Path,
    *,
    text_field: str | None = "text",
    ids_field: str | None = None,
    tokenize: Callable[[str], list[int]] | None = None,
    skip_bad: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ReadResult:
    """Read (and tokenize) every record. The first bad record raises ``InputError("FILE:LINE: ...")`` unless
    ``skip_bad``, which skips and lists it. An empty file, or one whose records are all bad, is an error.
    Memory: the token ids of every good record, as int64 arrays."""
    if (text_field is None) == (ids_field is None):
        raise InputError("read_sequences: expected exactly one of text_field= or ids_field=")
    if ids_field is None and tokenize is None:
        raise InputError("read_sequences: text_field needs a tokenize function")
    sequences, records, bad, total = [], [], [], 0
    for line, record in iter_records(path):
        total += 1
        try:
            ids = record_ids(record, text_field=text_field, ids_field=ids_field, tokenize=tokenize)
        except ValueError as e:
            if not skip_bad:
                raise at(path, line, f"{e} (use --skip-bad to skip such records)") from None
            bad.append((line, str(e)))
            continue
        sequences.append(ids)
        records.append(total - 1)
        if progress is not None:
            progress(total)
    if total == 0:
        raise at(path, 1, "empty file, no records")
    if not sequences:
        raise InputError(f"{path}: all {total} records are bad, nothing to pack")
    return ReadResult.of(sequences, records, bad, total)


# ----------------------------------------------------------------------------------------------------------------------
# Packed rows: build, check, write, read back


@dataclass(frozen=True)
class PackedFileRow:
    """One row of a packed file: ``input_ids`` of its documents back to back, ``position_ids`` restarting at 0 in
    each, the document lengths ``seq_lens`` and ``segments``: per document ``(record, start, stop)`` (empty when the
    file did not carry them)."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    seq_lens: list[int]
    segments: list[tuple[int, int, int]]

    def to_dict(self) -> dict:
        return {
            "input_ids": self.input_ids.tolist(),
            "position_ids": self.position_ids.tolist(),
            "seq_lens": list(self.seq_lens),
            "segments": [list(s) for s in self.segments],
        }


@dataclass(frozen=True, eq=False)
class PackedColumns:
    """Packed rows as flat int64 arrays (what ``attnmask pack`` writes): row ``r`` holds tokens
    ``input_ids[row_offsets[r]:row_offsets[r + 1]]`` and documents ``doc_offsets[r]:doc_offsets[r + 1]`` of
    ``seq_lens`` (``(D,)``) and ``segments`` (``(D, 3)``: record, start, stop).

    Example, documents of 3 and 2 tokens in one row: ``row_offsets [0, 5]``, ``seq_lens [3, 2]``, position ids
    ``[0, 1, 2, 0, 1]``.
    """

    input_ids: np.ndarray
    row_offsets: np.ndarray
    seq_lens: np.ndarray
    doc_offsets: np.ndarray
    segments: np.ndarray

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    @property
    def position_ids(self) -> np.ndarray:
        """``(T,)`` positions restarting at 0 in every document."""
        return _positions(self.seq_lens)

    def row(self, r: int) -> PackedFileRow:
        a, b = self.doc_offsets[r], self.doc_offsets[r + 1]
        lens = self.seq_lens[a:b].tolist()
        ids = self.input_ids[self.row_offsets[r] : self.row_offsets[r + 1]]
        return PackedFileRow(ids, _positions(lens), lens, [tuple(s) for s in self.segments[a:b].tolist()])


def _positions(seq_lens) -> np.ndarray:
    """``[3, 2]`` -> ``[0, 1, 2, 0, 1]``."""
    lens = np.asarray(seq_lens, dtype=np.int64)
    if lens.size == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(np.cumsum(lens) - lens, lens)
    return np.arange(int(lens.sum()), dtype=np.int64) - starts


def build_columns(seg_index, seg_start, seg_stop, seg_row_offsets, data: ReadResult) -> PackedColumns:
    """Gather the rows of a packing plan, given as flat segment arrays (``PackPlan.seg_index`` / ``seg_start`` /
    ``seg_stop`` / ``row_offsets``: segments of row ``r`` are ``seg_row_offsets[r]:seg_row_offsets[r + 1]``), from
    the sequences of ``data``. O(tokens) vectorised; memory: one copy of the tokens plus an int64 index of the same
    size."""
    index = np.asarray(seg_index, dtype=np.int64)
    start = np.asarray(seg_start, dtype=np.int64)
    lens = np.asarray(seg_stop, dtype=np.int64) - start
    out_start = np.cumsum(lens) - lens
    source = np.repeat(data.offsets[index] + start - out_start, lens) + np.arange(int(lens.sum()), dtype=np.int64)
    doc_offsets = np.asarray(seg_row_offsets, dtype=np.int64)
    token_ends = np.concatenate([[0], np.cumsum(lens)])
    segments = np.stack([data.records[index], start, start + lens], axis=1) if len(index) else np.zeros((0, 3))
    return PackedColumns(data.values[source], token_ends[doc_offsets], lens, doc_offsets, segments.astype(np.int64))


def check_every_token(columns: PackedColumns, data: ReadResult, *, keep: int | None = None) -> int:
    """Check, from the output alone, that it holds every token of every input sequence exactly once and in order.

    Each output token is traced back through its segment ``(record, start, stop)`` to a position of the input; the
    positions must cover every input token once (only the first ``keep`` of each sequence when truncation to
    ``keep`` tokens was asked for) and the token there must equal the output token. Returns the tokens dropped by
    truncation (0 without it); raises ``InputError`` naming the first record that is not reassembled exactly.
    Vectorised, O(tokens).
    """
    segs = columns.segments
    lens = segs[:, 2] - segs[:, 1]
    if not np.array_equal(lens, columns.seq_lens) or len(columns.input_ids) != int(lens.sum()):
        raise InputError("check failed: the segments do not match the document lengths")
    seq = np.searchsorted(data.records, segs[:, 0])
    known = (seq < len(data.records)) & (data.records[np.minimum(seq, len(data.records) - 1)] == segs[:, 0])
    if not known.all():
        raise InputError(f"check failed: the output holds record {int(segs[~known][0, 0])}, not in the input")
    starts = np.cumsum(lens) - lens
    source = np.repeat(data.offsets[seq] + segs[:, 1] - starts, lens) + np.arange(int(lens.sum()), dtype=np.int64)
    beyond = segs[:, 2] > data.lengths[seq]
    if beyond.any():
        raise InputError(f"check failed: record {int(segs[beyond][0, 0])} has a piece past its end")
    counts = np.bincount(source, minlength=len(data.values))
    expected = np.ones(len(data.values), dtype=np.int64)
    if keep is not None:
        within = np.arange(len(data.values)) - np.repeat(data.offsets[:-1], data.lengths)
        expected = (within < keep).astype(np.int64)
    wrong = np.flatnonzero(counts != expected)
    if wrong.size:
        i = int(np.searchsorted(data.offsets, wrong[0], side="right") - 1)
        have = int(counts[data.offsets[i] : data.offsets[i + 1]].sum())
        want = int(expected[data.offsets[i] : data.offsets[i + 1]].sum())
        raise InputError(f"check failed: record {int(data.records[i])} has {have} of its {want} tokens in the output")
    changed = np.flatnonzero(columns.input_ids != data.values[source])
    if changed.size:
        doc = int(np.searchsorted(starts, changed[0], side="right") - 1)
        raise InputError(f"check failed: record {int(segs[doc, 0])} is not reassembled exactly")
    return int(len(data.values) - expected.sum())


def _row_to_json(row: PackedFileRow) -> str:
    return json.dumps(row.to_dict(), separators=(",", ":"))


def write_rows(path: str | Path, columns: PackedColumns) -> Path:
    """Write packed rows as JSONL or Parquet (by the suffix of ``path``), atomically (see ``atomic_output``)."""
    fmt = file_format(path, "output")
    if str(path) == STDIO:
        for r in range(len(columns)):
            sys.stdout.write(_row_to_json(columns.row(r)) + "\n")
        sys.stdout.flush()
        return Path(path)
    pa = _pyarrow() if fmt == "parquet" else None
    with atomic_output(path) as tmp:
        if fmt == "jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                for r in range(len(columns)):
                    f.write(_row_to_json(columns.row(r)))
                    f.write("\n")
        else:
            pa.parquet.write_table(_arrow_table(pa, columns), tmp, use_dictionary=False)
    return Path(path)


def _arrow_table(pa, c: PackedColumns):
    """Int64 list columns straight from the flat arrays and their offsets (no per-row or per-token Python)."""

    def lists(offsets: np.ndarray, values) -> object:
        return pa.LargeListArray.from_arrays(pa.array(offsets), values)

    triples = lists(np.arange(0, 3 * len(c.segments) + 1, 3), pa.array(c.segments.reshape(-1)))
    return pa.table(
        {
            "input_ids": lists(c.row_offsets, pa.array(c.input_ids)),
            "position_ids": lists(c.row_offsets, pa.array(c.position_ids)),
            "seq_lens": lists(c.doc_offsets, pa.array(c.seq_lens)),
            "segments": lists(c.doc_offsets, triples),  # per document: [record, start, stop]
        }
    )


def read_packed(path: str | Path) -> list[PackedFileRow]:
    """Read a packed file (``input_ids`` and ``seq_lens`` per row; ``position_ids`` and ``segments`` checked when
    present). Bad rows raise ``InputError("FILE:LINE: ...")``."""
    rows = []
    for line, rec in iter_records(path):
        try:
            rows.append(_packed_row(rec))
        except ValueError as e:
            raise at(path, line, str(e)) from None
    if not rows:
        raise at(path, 1, "empty file, no rows")
    return rows


def _int_list(rec: dict, name: str) -> list[int]:
    value = rec.get(name)
    if not isinstance(value, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in value):
        raise ValueError(f"field {name!r}: expected a list of integers")
    return value


def _packed_row(rec: object) -> PackedFileRow:
    if isinstance(rec, RecordProblem):
        raise ValueError(rec.message)
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    for name in ("input_ids", "seq_lens"):
        if rec.get(name) is None:
            raise ValueError(f"missing field {name!r}")
    ids, lens = _int_list(rec, "input_ids"), _int_list(rec, "seq_lens")
    if not ids:
        raise ValueError("field 'input_ids': an empty row (attnmask pack never writes one)")
    if any(n < 1 for n in lens):
        raise ValueError("field 'seq_lens': lengths must be >= 1")
    if sum(lens) != len(ids):
        raise ValueError(f"field 'seq_lens': sums to {sum(lens)} but the row has {len(ids)} input_ids")
    pos = _positions(lens)
    if rec.get("position_ids") is not None and not np.array_equal(np.asarray(_int_list(rec, "position_ids")), pos):
        raise ValueError("field 'position_ids': does not restart at 0 in every document")
    segments = []
    if rec.get("segments") is not None:
        raw = rec["segments"]
        if not isinstance(raw, list) or len(raw) != len(lens):
            raise ValueError("field 'segments': expected one [record, start, stop] per document")
        for s, n in zip(raw, lens, strict=True):
            ok = isinstance(s, list) and len(s) == 3 and all(isinstance(t, int) and not isinstance(t, bool) for t in s)
            if not ok or s[0] < 0 or s[1] < 0 or s[2] - s[1] != n:
                raise ValueError(f"field 'segments': {s!r} does not describe a document of length {n}")
            segments.append((s[0], s[1], s[2]))
    return PackedFileRow(np.asarray(ids, dtype=np.int64), pos, list(lens), segments)


def check_pieces(rows: list[PackedFileRow]) -> tuple[int, int]:
    """For rows that carry segments: check that the pieces of every record tile ``[0, n)`` with no gap or overlap
    (``n`` unknown here, so the pieces must start at 0 and follow each other). Returns ``(records, pieces)``;
    raises ``InputError`` naming the first record whose pieces do not fit together."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for row in rows:
        for rec, a, b in row.segments:
            spans.setdefault(rec, []).append((a, b))
    for rec, parts in spans.items():
        cursor = 0
        for a, b in sorted(parts):
            if a != cursor:
                what = "a gap" if a > cursor else "an overlap"
                raise InputError(f"record {rec}: its pieces leave {what} at token {min(a, cursor)}")
            cursor = b
    return len(spans), sum(len(p) for p in spans.values())


def unpack_rows(rows: list[PackedFileRow]) -> dict[int, list[int]]:
    """Reassemble input records from packed rows that carry segments: ``{record: token ids}``, pieces in order."""
    pieces: dict[int, list[tuple[int, list[int]]]] = {}
    for row in rows:
        offset = 0
        for (rec, a, _b), n in zip(row.segments, row.seq_lens, strict=True):
            pieces.setdefault(rec, []).append((a, row.input_ids[offset : offset + n].tolist()))
            offset += n
    return {rec: [t for _, part in sorted(parts) for t in part] for rec, parts in sorted(pieces.items())}
