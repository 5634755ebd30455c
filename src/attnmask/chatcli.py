"""The chat side of the ``attnmask`` command: ``pack --chat`` and ``inspect --chat``.

``attnmask pack --chat --tokenizer DIR data.jsonl --max-length 2048 -o out.parquet`` reads records
``{"messages": [...], "tools": [...]?}``, renders them with the tokenizer's chat template, labels the assistant turns
(`attnmask.chat.encode_chat`) and packs them globally; the packed file holds ``labels`` besides the usual columns.
``attnmask inspect --chat --tokenizer DIR FILE`` shows which tokens of a row (a packed file) or of a conversation
(a JSONL of messages) are trained: in colour on a terminal, bracketed otherwise, and as a PNG strip with ``--out``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from attnmask.chat import encode_chat
from attnmask.errors import AttnmaskError, CliError
from attnmask.packfile import RecordProblem, at, atomic_output, build_columns, check_output, file_format, iter_records
from attnmask.viz import draw_table as table
from attnmask.viz import pct

__all__ = ["cmd_pack_chat", "cmd_inspect_chat", "load_chat_tokenizer", "read_conversations", "trained_picture"]

_GREEN, _DIM, _RESET = "\033[1;32m", "\033[2m", "\033[0m"


def load_chat_tokenizer(path: str) -> Any:
    """A transformers tokenizer with a chat template, from a local folder (nothing downloads)."""
    if not path:
        raise CliError("--chat needs --tokenizer FOLDER (a tokenizer with a chat template)")
    if not Path(path).is_dir():
        raise CliError(f"--tokenizer {path}: --chat needs a tokenizer folder (with its chat template), not {path!r}")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ImportError, OSError, ValueError) as e:
        raise CliError(f"--tokenizer {path}: {e}") from None
    if not getattr(tok, "chat_template", None):
        raise CliError(f"--tokenizer {path}: the tokenizer has no chat template")
    return tok


def read_conversations(path: str, skip_bad: bool) -> tuple[list[list[dict]], list[Any], list[int], list[tuple]]:
    """``(conversations, tools, line numbers, bad)`` of a JSONL / Parquet file of ``{"messages": [...]}`` records;
    ``bad`` lists ``(line, message)`` of skipped records (an error unless ``skip_bad``)."""
    convs, tools, lines, bad = [], [], [], []
    for line, rec in iter_records(path):
        problem = _record_problem(rec)
        if problem is not None:
            if not skip_bad:
                raise at(path, line, f"{problem} (use --skip-bad to skip such records)")
            bad.append((line, problem))
            continue
        convs.append(rec["messages"])
        tools.append(rec.get("tools"))
        lines.append(line)
    if not convs:
        raise at(path, 1, "no conversations")
    return convs, tools, lines, bad


def _record_problem(rec: object) -> str | None:
    if isinstance(rec, RecordProblem):
        return rec.message
    if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list) or not rec["messages"]:
        return "expected a JSON object with a non-empty list 'messages'"
    if rec.get("tools") is not None and not isinstance(rec["tools"], list):
        return "field 'tools': expected a list of tool schemas"
    return None


def _encode(tok, path: str, convs, tools, lines, bad, *, skip_bad: bool, **kwargs):
    """`encode_chat` of the records; an error names FILE:LINE; with ``skip_bad`` such records are skipped (counted
    in ``bad``) and the rest encoded again."""
    while True:
        try:
            return encode_chat(tok, convs, tools=tools if any(t is not None for t in tools) else None, **kwargs), lines
        except AttnmaskError as e:
            found = re.search(r"conversations\[(\d+)\]", str(e))
            if found is None:
                raise CliError(f"{path}: {e}") from None
            k, rest = int(found.group(1)), str(e)[found.end() :]
            index = re.match(r"\[(\d+)\]", rest)
            message = f"message {index.group(1)}{rest[index.end() :]}" if index else rest.lstrip(": ")
            if not skip_bad:
                raise CliError(f"{path}:{lines[k]}: {message}") from None
            bad.append((lines[k], message))
            convs, tools, lines = convs[:k] + convs[k + 1 :], tools[:k] + tools[k + 1 :], lines[:k] + lines[k + 1 :]
            if not convs:
                raise CliError(f"{path}: no conversation left after skipping bad records") from None


def cmd_pack_chat(args) -> int:
    from attnmask.pack import pack
    from attnmask.packfile import ReadResult

    check_output(args.out)
    tok = load_chat_tokenizer(args.tokenizer)
    convs, tools, lines, bad = read_conversations(args.input, args.skip_bad)
    enc, lines = _encode(
        tok,
        args.input,
        convs,
        tools,
        lines,
        bad,
        skip_bad=args.skip_bad,
        train_on=args.train_on,
        max_length=args.max_length,
        overflow=args.overflow,
    )
    records = [lines[i] - 1 for i in enc.source]  # 0-based line of the record each row comes from
    ids = ReadResult.of(enc.input_ids, records=records)
    labels = ReadResult.of(enc.labels, records=records)
    plan = pack(ids.lengths, args.max_length, strategy=args.strategy, overflow="error")
    columns = build_columns(plan.seg_index, plan.seg_start, plan.seg_stop, plan.row_offsets, ids)
    label_values = build_columns(plan.seg_index, plan.seg_start, plan.seg_stop, plan.row_offsets, labels).input_ids
    _write(args.out, columns, label_values)
    s = enc.stats
    rows = len(columns)
    report = [
        ("input", f"{args.input} ({len(convs) + len(bad):,} records)"),
        ("skipped", f"{len(bad):,} bad records" + (f" (first: {args.input}:{bad[0][0]}: {bad[0][1]})" if bad else "")),
        ("conversations", f"{s.conversations:,} -> {s.rows:,} sequences, {s.tokens:,} tokens"),
        (
            "trained",
            f"{s.trained_tokens:,} tokens ({pct(s.trained_tokens / max(s.tokens, 1))}), train on {args.train_on}",
        ),
        ("overflow", f"{args.overflow}: " + _overflow_line(s)),
        ("untrained", f"{len(s.untrained):,} conversations with no trained token" + _first(s.untrained, lines, args)),
        (
            "packing",
            f"{rows:,} rows x {args.max_length} = {rows * args.max_length:,} slots, "
            f"fill {pct(s.tokens / max(rows * args.max_length, 1))} ({args.strategy})",
        ),
        ("output", f"{args.out} ({rows:,} rows with labels, written atomically)"),
    ]
    print(table(report))
    return 0


def _overflow_line(s) -> str:
    return (
        f"{len(s.dropped):,} dropped, {len(s.truncated):,} truncated, {len(s.split):,} split at turn boundaries, "
        f"{s.cut_tokens:,} tokens cut"
    )


def _first(indices, lines, args) -> str:
    return f" (first: {args.input}:{lines[indices[0]]})" if indices else ""


def _write(path: str, columns, labels: np.ndarray) -> None:
    """The packed rows with their labels, as ``attnmask pack`` writes rows (JSONL or Parquet, atomically)."""
    import json

    if file_format(path, "output") == "jsonl":
        with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for r in range(len(columns)):
                row = columns.row(r).to_dict()
                row["labels"] = labels[columns.row_offsets[r] : columns.row_offsets[r + 1]].tolist()
                f.write(json.dumps(row, separators=(",", ":")) + "\n")
        return
    from attnmask.packfile import _arrow_table, _pyarrow

    pa = _pyarrow()
    t = _arrow_table(pa, columns)
    t = t.append_column("labels", pa.LargeListArray.from_arrays(pa.array(columns.row_offsets), pa.array(labels)))
    with atomic_output(path) as tmp:
        pa.parquet.write_table(t, tmp, use_dictionary=False)


# ----------------------------------------------------------------------------------------------------------------------
# inspect --chat


def cmd_inspect_chat(args) -> int:
    tok = load_chat_tokenizer(args.tokenizer)
    first = next(iter_records(args.packed), (1, None))[1]
    if isinstance(first, dict) and "messages" in first:
        convs, tools, lines, bad = read_conversations(args.packed, skip_bad=False)
        if not 0 <= args.row < len(convs):
            raise CliError(f"--row {args.row}: expected a conversation in [0, {len(convs)})")
        enc, _ = _encode(
            tok,
            args.packed,
            convs[args.row : args.row + 1],
            tools[args.row : args.row + 1],
            lines[args.row : args.row + 1],
            bad,
            skip_bad=False,
        )
        ids, labels, what = enc.input_ids[0], enc.labels[0], f"conversation {args.row} (line {lines[args.row]})"
    else:
        ids, labels, what = _packed_row(args.packed, args.row)
    trained = np.asarray(labels) != -100
    colour = sys.stdout.isatty() and not args.ascii
    print(
        f"{what}: {len(ids):,} tokens, {int(trained.sum()):,} trained "
        + ("(green; dim = not trained)" if colour else "(trained tokens between [[ and ]])")
    )
    print(trained_picture(tok, ids, trained, colour=colour))
    if args.out:
        out = Path(args.out) / f"row{args.row}-labels.png"
        _save_strip(tok, ids, trained, out, title=f"{what}: trained tokens (dark)")
        print(f"\nwrote {out}")
    return 0


def _packed_row(path: str, row: int) -> tuple[list[int], list[int], str]:
    for line, rec in iter_records(path):
        if line - 1 == row:
            if not isinstance(rec, dict) or not isinstance(rec.get("labels"), list):
                raise at(path, line, "no 'labels' field: write the file with `attnmask pack --chat`")
            ids, labels = rec.get("input_ids"), rec["labels"]
            if not isinstance(ids, list) or len(ids) != len(labels):
                raise at(path, line, "fields 'input_ids' and 'labels' must be lists of the same length")
            return ids, labels, f"row {row}"
    raise CliError(f"--row {row}: the file has fewer rows")


def trained_picture(tok, ids, trained: np.ndarray, *, colour: bool) -> str:
    """The decoded tokens, trained ones in green (``colour``) or between ``[[`` and ``]]``."""
    out, k = [], 0
    edges = np.flatnonzero(np.diff(np.r_[0, trained.astype(np.int8), 0]))
    for a, b in zip(edges[::2], edges[1::2], strict=True):
        out.append(_plain_text(tok, ids[k:a], colour))
        text = tok.decode(ids[a:b])
        out.append(f"{_GREEN}{text}{_RESET}" if colour else f"[[{text}]]")
        k = b
    out.append(_plain_text(tok, ids[k:], colour))
    return "".join(out)


def _plain_text(tok, ids, colour: bool) -> str:
    text = tok.decode(ids) if len(ids) else ""
    return f"{_DIM}{text}{_RESET}" if colour and text else text


def _save_strip(tok, ids, trained: np.ndarray, path: Path, *, title: str) -> Path:
    """A PNG strip, one cell per token (dark = trained), wrapped at 64 tokens a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 64
    lines = -(-len(ids) // width)
    grid = np.full(lines * width, np.nan)
    grid[: len(ids)] = trained.astype(float)
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.15 * lines), dpi=96)
    ax.imshow(grid.reshape(lines, width), cmap="Greens", vmin=-0.2, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("token (64 per line)", fontsize=7)
    ax.set_yticks([])
    ax.tick_params(labelsize=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
