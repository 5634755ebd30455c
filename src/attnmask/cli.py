"""The ``attnmask`` command: ``demo``, ``show``, ``pack``, ``inspect`` and ``bench``.

Every failure caused by the user's input is one line on stderr, ``attnmask: error: FILE:LINE: message``, and exit
code 2; never a traceback. ``main(argv)`` returns the exit code, so it can be called in-process.

    attnmask demo [--out DIR]
    attnmask show "causal & sliding_window(4)" --q-len 12
    attnmask pack data.jsonl --max-length 2048 --out packed.parquet
    attnmask inspect packed.parquet
    attnmask bench --quick
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from attnmask.errors import AttnmaskError, CliError
from attnmask.viz import FillReport, pct
from attnmask.viz import draw_table as table

__all__ = ["main", "CliError", "build_parser"]

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
# `show` draws larger masks from their block layout instead of a dense mask.
DENSE_PICTURE_LIMIT = 1 << 22
# A benchmark script exits with this code to say it does not apply on this machine (e.g. it needs a GPU).
EXIT_SKIP = 77
# `show` refuses longer rows: positions are drawn from index tensors of this many entries.
SHOW_LIMIT = 1 << 24
# Unix tools killed by SIGPIPE (`attnmask demo | head -2`) end with this status; we exit quietly with it.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE if hasattr(signal, "SIGPIPE") else 1
# README headlines measured by a script whose --quick sizes are smaller, and why its quick ratios differ:
# `attnmask bench --quick` prints the note after that script's table (tests/test_cli.py checks each headline is in
# README.md word for word, so a changed headline updates its note).
QUICK_NOTES: dict[str, tuple[tuple[str, str], ...]] = {
    "bench_attention.py": (
        (
            "attention over a 16K packed row (mean ~500-token documents) | SDPA with a dense mask / per-document loop "
            "| 111-143x / 1.0x",
            "quick: a 4K row; dense SDPA's cost falls with the square of the row and attnmask's linearly, so expect "
            "about 4x less over dense SDPA",
        ),
        (
            "causal sliding window 4,096 on a 32K row | SDPA with a dense mask | 25-39x",
            "quick: window 1,024 on an 8K row; the dense mask covers 4x fewer keys per query, so expect about 4x less",
        ),
        (
            "2,000 documents of ~8 tokens, forward | per-document SDPA loop | 6.0x",
            "quick: 500 documents; the loop's cost and native's both scale with the count, the ratio should hold",
        ),
    ),
    "bench_mask.py": (
        (
            "`(8, 1, 4096, 4096)` causal + padding mask, bool / fp32 / bf16 | `create_causal_mask` "
            "| 1.2-1.5x fresh; 3.0-4.2x with `out=` reuse",
            "quick: (4, 1, 1024, 1024); fixed per-call costs weigh more on a 16x smaller mask, ratios nearer 1",
        ),
        (
            "`(8, 1, 4096, 4096)` mask of packed documents, bool / fp32 / bf16 | `create_causal_mask` from packed "
            "`position_ids` | 2.8-2.9x / 1.7x / 1.9-2.0x fresh; 2.5-3.4x with `out=` reuse",
            "quick: (4, 1, 1024, 1024), documents of 64-256; a mask that fits in cache has fewer page faults to pay, "
            "so expect higher ratios (measured 3.5x / 3.0x / 2.2x fresh)",
        ),
    ),
    "bench_layout.py": (
        (
            "block layout of a 128K-token packed row | compiled `create_block_mask` | 799x",
            "quick: a 16K row; the peer's cost grows with the square of the row and ours linearly, so expect ~8x less",
        ),
    ),
    "bench_hf_train.py": (
        (
            "training step, tiny Llama, rows of 4096 | padded + sdpa / packed + dense-mask sdpa | 2.5-2.8x / 6.0-8.3x "
            "(2026-12-07, five runs on the Xeon and the AMD EPYC; rows of 128-1,024: 0.99-4.4x against both, rows of "
            "128 running stock SDPA's own call; a new batch each step: 0.98-3.8x)",
            "quick: 16 sequences in rows of 256, where `auto` chooses by its estimates between what stock attention "
            "runs (one SDPA call with the dense mask) and the C kernel `native` (1.12-1.19x at rows of 256 in the full "
            "runs): expect about 0.95-1.3x against packed + dense-mask sdpa (two rounds of a small batch: the spread "
            "of a shared machine; 1.01-1.29x over today's quick runs) and more against padded + sdpa",
        ),
    ),
}


# ----------------------------------------------------------------------------------------------------------------------
# Subcommands


_DTYPES = ("float32", "bfloat16", "float16", "float64")
EXPLAIN_LIMIT = 1 << 20  # longest --q-len / --kv-len of `attnmask explain`


def cmd_explain(args) -> int:
    """Which backend ``"auto"`` picks for a mask expression on inputs of the given shapes (random values, this
    machine's threads), every backend's estimate and refusal; with ``--tune``, each close candidate timed as
    ``attnmask.autotune`` times it (two calls of the shape, forward + backward with ``--grad``)."""
    import torch

    from attnmask import tuning
    from attnmask.expr import ExprError, parse_spec

    try:
        spec = parse_spec(args.expr)
    except ExprError as e:
        raise CliError(f"{e}\n{e.caret()}") from None
    q_len, kv_len = args.q_len, args.kv_len or args.q_len
    if q_len > kv_len:
        raise CliError(f"--q-len {q_len}: expected at most --kv-len {kv_len} (queries are the last keys' positions)")
    covered = spec.max_position()
    if covered is not None and kv_len > covered:
        flag = "--kv-len" if args.kv_len else "--q-len"
        raise CliError(f"{flag} {kv_len}: the expression covers positions [0, {covered}) only; use {covered} or less")
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        raise CliError(f"--kv-heads {kv_heads}: expected a divisor of --heads {args.heads} (grouped-query attention)")
    batch = spec.batch_size or args.batch
    if args.batch not in (1, batch):
        raise CliError(f"--batch {args.batch}: the expression has per-row data for {batch} rows")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        _print_explanation(args, spec, batch, kv_heads, q_len, kv_len)
    finally:  # main() may run in-process: leave torch's threads and tuning's results as they were
        torch.set_num_threads(threads)
        if args.tune:
            tuning.clear()
    return EXIT_OK


def _print_explanation(args, spec, batch: int, kv_heads: int, q_len: int, kv_len: int) -> None:
    import torch

    import attnmask as am
    from attnmask import tuning

    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)

    def tensor(heads: int, length: int) -> torch.Tensor:
        t = torch.randn(batch, heads, length, args.dim, generator=gen).to(dtype)
        return t.requires_grad_(args.grad)

    q, k, v = tensor(args.heads, q_len), tensor(kv_heads, kv_len), tensor(kv_heads, kv_len)
    mode = "forward + backward" if args.grad else "forward"
    print(
        f"{spec!r}: q {tuple(q.shape)}, k and v {tuple(k.shape)}, {args.dtype}, {mode}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    if dtype == torch.bfloat16:
        from attnmask.backends._common import cpu_bf16_kind
        from attnmask.backends.native import amx_ready

        kind = cpu_bf16_kind()
        print(f"bfloat16 on this CPU: {_BF16_ESTIMATES[kind]}{_TILES_NOTE if kind == 'amx' and amx_ready() else ''}")
    if not args.tune:
        print(am.explain(q, k, v, spec))
        return
    tuning.clear()
    with am.autotune():
        for _ in range(2):  # the first call of a kind is only recorded, the second times the close candidates
            out = am.attention(q, k, v, spec)
            if args.grad:
                out.backward(torch.ones_like(out))
        print(am.explain(q, k, v, spec))


# Where native's bfloat16 runs on the tiles (backends.native.amx_ready: built with them, granted by Linux).
_TILES_NOTE = "; native computes on the tiles (ATTNMASK_NATIVE_AMX=0 turns that off)"
# What the CPU estimates assume of bfloat16 on each kind of CPU (backends._common.ModeFactors).
_BF16_ESTIMATES = {
    "amx": "AMX tiles; the estimates use the bfloat16 factors measured on such a CPU",
    "avx512_bf16": "AVX512-BF16, no AMX tiles; the estimates use the float32 factors (measured at float32's time)",
    "none": "no bfloat16 instructions; the estimates use the factors of such a CPU (SDPA's backward ~5x float32's)",
}


def cmd_show(args) -> int:
    from attnmask.expr import ExprError, parse_spec
    from attnmask.viz import draw_mask, draw_tiles, group_tiles, save_mask_png, save_tiles_png

    try:
        spec = parse_spec(args.expr)
    except ExprError as e:
        raise CliError(f"{e}\n{e.caret()}") from None
    q_len, kv_len = args.q_len, args.kv_len or args.q_len
    rows = spec.batch_size or 1
    if not 0 <= args.row < rows:
        raise CliError(f"--row {args.row}: expected a row in [0, {rows}) of the spec")
    if q_len > kv_len:
        raise CliError(f"--q-len {q_len}: expected at most --kv-len {kv_len} (queries are the last keys' positions)")
    covered = spec.max_position()
    length_flag = "--kv-len" if args.kv_len else "--q-len"
    if covered is not None and kv_len > covered:
        raise CliError(
            f"{length_flag} {kv_len}: the expression covers positions [0, {covered}) only (the lengths of its "
            f"documents or padding mask); use {length_flag} {covered} or less"
        )
    if args.png:
        _check_png_path(args.png)
    block = args.block_size
    if block is None and q_len * kv_len > DENSE_PICTURE_LIMIT:
        block = math.ceil(max(q_len, kv_len) / args.max_cells)
    if block is not None and math.ceil(q_len / block) * math.ceil(kv_len / block) > DENSE_PICTURE_LIMIT:
        smallest = math.ceil(math.sqrt(q_len * kv_len / DENSE_PICTURE_LIMIT))
        sizes = f"--q-len {q_len}, --kv-len {kv_len}"
        raise CliError(f"--block-size {block}: too many tiles for {sizes}; use {smallest} or more")
    lines = [f"{spec!r}   (q_len={q_len}, kv_len={kv_len}, row {args.row})"]
    if covered is not None and kv_len < covered:
        shown = f"note: keys 0-{kv_len - 1} of the {covered} positions the expression covers"
        lines.append(f"{shown} ({length_flag} {covered} shows all)")
    if block is None:
        lines.append(draw_mask(spec, q_len, kv_len, row=args.row, max_cells=args.max_cells, ascii_only=args.ascii))
        if args.png:
            save_mask_png(spec, args.png, q_len, kv_len, row=args.row, title=repr(spec))
    else:
        # The block layout comes from the spec's structure (no dense mask), so this works for long rows too.
        layout = spec.block_layout(q_len, kv_len, block_size=block)
        counts = layout.counts()
        tiles = layout.classes[args.row]
        if args.png:  # about one tile per pixel of the 480-pixel image, unless --block-size says otherwise
            png_block = args.block_size or math.ceil(max(q_len, kv_len) / 480)
            png_tiles = spec.block_layout(q_len, kv_len, block_size=png_block).classes[args.row]
            save_tiles_png(png_tiles, png_block, q_len, kv_len, args.png, q_offset=kv_len - q_len, title=repr(spec))
        if max(tiles.shape) > args.max_cells:  # merge tiles so that the picture fits
            group = math.ceil(max(tiles.shape) / args.max_cells)
            tiles, block = group_tiles(tiles, group), block * group
        lines.append(draw_tiles(tiles, block, q_len, kv_len, q_offset=kv_len - q_len, ascii_only=args.ascii))
        lines.append(f"block layout: {counts['full']} full, {counts['partial']} partial, {counts['none']} none tiles")
    if args.png:
        lines.append(f"wrote {args.png}")
    print("\n".join(lines))
    return EXIT_OK


def _check_png_path(path: str) -> None:
    """A PNG goes to an existing folder under a ``.png`` name: nothing is created or renamed behind the user's back."""
    if Path(path).suffix.lower() != ".png":
        raise CliError(f"--png {path}: expected a file name ending in .png (the picture is written as PNG)")
    if not Path(path).parent.is_dir():
        raise CliError(f"--png {path}: the folder {Path(path).parent} does not exist (create it first)")


def _matplotlib_missing(what: str) -> bool:
    """True, after one line on stderr, when matplotlib is not installed (PNG pictures are then skipped)."""
    if importlib.util.find_spec("matplotlib") is not None:
        return False
    print(f"attnmask: {what} skipped: matplotlib is not installed (pip install 'attnmask[viz]')", file=sys.stderr)
    return True


def load_tokenizer(name: str, *, add_eos: bool = False) -> Callable[[str], list[int]]:
    """``"byte"`` (built in, nothing downloads) or a path to a Hugging Face ``tokenizer.json`` or tokenizer folder;
    returns ``text -> token ids`` (with the tokenizer's EOS id appended when ``add_eos``)."""
    from attnmask.tokenizers import get_tokenizer

    if name != "byte" and not Path(name).exists():
        raise CliError(f"--tokenizer {name}: no such file or directory (use 'byte' or a path to a tokenizer.json)")
    try:
        tok = get_tokenizer(name)
    except (AttnmaskError, OSError, ValueError, ImportError) as e:
        raise CliError(f"--tokenizer {name}: {_first_line(e)}") from None
    if add_eos and tok.eos_id is None:
        raise CliError(f"--add-eos: the tokenizer {name} has no EOS token")
    return lambda text: tok.encode(text, add_eos=add_eos)


class Progress:
    """Records read so far, on stderr: a tqdm bar when tqdm is installed, else a plain counter. Shown only when
    stderr is a terminal and not disabled, so pipes and logs stay clean."""

    def __init__(self, label: str, enabled: bool = True):
        self.label, self.bar, self.last = label, None, 0.0
        self.enabled = enabled and sys.stderr.isatty()
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(desc=label, unit=" records", file=sys.stderr, leave=False)

    def __call__(self, n: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n - self.bar.n)
        elif time.monotonic() - self.last > 0.2:
            self.last = time.monotonic()
            print(f"\r{self.label}: {n:,} records", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


def cmd_pack(args) -> int:
    if args.chat:
        from attnmask.chatcli import cmd_pack_chat

        return cmd_pack_chat(args)
    from attnmask.packfile import build_columns, check_every_token, check_output, read_sequences, write_rows

    check_output(args.out)  # refuse a bad output path before reading anything
    tokenize = None if args.ids_field else load_tokenizer(args.tokenizer, add_eos=args.add_eos)
    progress = Progress(f"reading {args.input}", enabled=not args.no_progress)
    try:
        data = read_sequences(
            args.input,
            text_field=None if args.ids_field else args.text_field,
            ids_field=args.ids_field,
            tokenize=tokenize,
            skip_bad=args.skip_bad,
            progress=progress,
        )
    finally:
        progress.close()
    lengths = data.lengths
    from attnmask.pack import pack

    if args.overflow == "error" and int(lengths.max()) > args.max_length:
        first = int(np.flatnonzero(lengths > args.max_length)[0])
        raise CliError(
            f"{args.input}: record {int(data.records[first]) + 1} has {int(lengths[first]):,} tokens, more than "
            f"--max-length {args.max_length} (--overflow error; split or truncate would keep going)"
        )
    try:
        plan = pack(lengths, args.max_length, strategy=args.strategy, overflow=args.overflow)
    except AttnmaskError as e:
        raise CliError(f"{args.input}: {e}") from None
    rows = build_columns(plan.seg_index, plan.seg_start, plan.seg_stop, plan.row_offsets, data)
    keep = args.max_length if args.overflow == "truncate" else None
    dropped = check_every_token(rows, data, keep=keep)
    write_rows(args.out, rows)
    stats = plan.stats
    # The padding baseline: one row of --max-length per sequence (per piece of a longer one, as packing splits).
    kept = np.minimum(lengths, args.max_length) if args.overflow == "truncate" else lengths
    pad_rows = int((-(-kept // args.max_length)).sum())
    report = FillReport(len(lengths), int(kept.sum()), args.max_length, args.max_length, len(rows), pad_rows)
    lines = [
        ("input", f"{args.input} ({data.total_records:,} records)"),
        ("skipped", f"{len(data.bad):,} bad records" + _first_bad(args.input, data.bad)),
        *report.lines(),
        ("strategy", f"{args.strategy}, overflow {args.overflow}"),
        ("split", f"{stats.split_sequences:,} sequences into {stats.split_pieces:,} pieces"),
    ]
    if args.overflow == "truncate":
        lines.append(("truncated", f"{stats.truncated_sequences:,} sequences, {dropped:,} tokens dropped"))
    arrived = int(lengths.sum()) - dropped
    after = " (after truncation)" if dropped else ""
    lines += [
        ("check", f"every token arrived: {arrived:,} of {arrived:,} in order{after}"),
        ("output", f"{args.out} ({len(rows):,} rows, written atomically)" if args.out != "-" else "stdout"),
    ]
    print(table(lines), file=sys.stderr if args.out == "-" else sys.stdout)  # stdout then holds the rows only
    return EXIT_OK


def _first_bad(path: str, bad: list[tuple[int, str]]) -> str:
    return f" (first: {path}:{bad[0][0]}: {bad[0][1]})" if bad else ""


def cmd_inspect(args) -> int:
    if args.chat:
        from attnmask.chatcli import cmd_inspect_chat

        return cmd_inspect_chat(args)
    from attnmask.masks import causal, document
    from attnmask.packfile import check_pieces, read_packed
    from attnmask.viz import draw_histogram, draw_plan, save_histogram_png, save_mask_png

    rows = read_packed(args.packed)
    lens = [n for r in rows for n in r.seq_lens]
    row_tokens = [len(r.input_ids) for r in rows]
    max_length = args.max_length or max(row_tokens)
    if max(row_tokens) > max_length:
        raise CliError(f"{args.packed}: a row holds {max(row_tokens)} tokens, more than --max-length {max_length}")
    tokens = sum(row_tokens)
    docs_per_row = [len(r.seq_lens) for r in rows]
    try:
        records, pieces = check_pieces(rows)
    except AttnmaskError as e:
        raise CliError(f"{args.packed}: {e}") from None
    lines = [
        ("file", f"{args.packed}"),
        ("rows", f"{len(rows):,} of {max_length} tokens" + ("" if args.max_length else " (the longest row)")),
        ("tokens", f"{tokens:,}, fill {pct(tokens / (len(rows) * max_length))}"),
        (
            "documents",
            f"{len(lens):,}; per row min {min(docs_per_row)}, mean {len(lens) / len(rows):.1f}, "
            f"max {max(docs_per_row)}",
        ),
        ("lengths", f"min {min(lens)}, mean {sum(lens) / len(lens):.1f}, max {max(lens)}"),
    ]
    if records:
        lines.append(("sources", f"{records:,} input records, {pieces - records:,} extra pieces from splits"))
    print(table(lines))
    print("\nRows (one letter per document, · = padding):")
    print(draw_plan([r.seq_lens for r in rows], max_length, max_rows=args.rows, ascii_only=args.ascii))
    print("\nDocument lengths:")
    print(draw_histogram(lens, bins=10, ascii_only=args.ascii))
    if args.out and not _matplotlib_missing("PNG pictures"):
        out = Path(args.out)
        if not 0 <= args.row < len(rows):
            raise CliError(f"--row {args.row}: expected a row in [0, {len(rows)})")
        row = rows[args.row]
        spec = causal() & document(seq_lens=row.seq_lens)
        paths = [
            save_mask_png(spec, out / f"row{args.row}-mask.png", len(row.input_ids), title=f"row {args.row}"),
            save_histogram_png(lens, out / "document-lengths.png", title="document lengths"),
        ]
        print(f"\nwrote {', '.join(str(p) for p in paths)}")
    return EXIT_OK


def find_benchmarks(directory: str | None) -> Path:
    """The benchmarks folder: ``--dir``, else ``./benchmarks``, else the one next to the source tree."""
    candidates = (
        [Path(directory)] if directory else [Path.cwd() / "benchmarks", Path(__file__).parents[2] / "benchmarks"]
    )
    for c in candidates:
        if c.is_dir():
            return c
    raise CliError(
        f"no benchmarks folder found (looked in {', '.join(str(c) for c in candidates)}): the benchmarks time "
        "attnmask against its peers from a checkout of the repository; run from there or pass --dir"
    )


def cmd_bench(args) -> int:
    folder = find_benchmarks(args.dir)
    scripts = sorted(p for p in folder.glob("bench_*.py") if not args.only or any(o in p.name for o in args.only))
    if not scripts:
        raise CliError(f"{folder}: no bench_*.py scripts" + (f" matching {args.only}" if args.only else ""))
    env = dict(os.environ)
    roots = [str(folder.parent / "src"), str(folder.parent)]
    env["PYTHONPATH"] = os.pathsep.join(roots + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    results = []
    for script in scripts:
        quick = args.quick and "--quick" in script.read_text(encoding="utf-8", errors="replace")
        command = [sys.executable, str(script)] + (["--quick"] if quick else [])
        shown = " ".join(["python", str(script.relative_to(folder.parent))] + command[2:])
        note = " (no --quick in this script: full size)" if args.quick and not quick else ""
        print(f"\n=== {script.name}: {shown}{note}")
        sys.stdout.flush()
        start = time.perf_counter()
        try:
            code = subprocess.run(command, env=env, cwd=folder.parent, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
        seconds = time.perf_counter() - start
        if args.quick and quick:
            for headline, why in QUICK_NOTES.get(script.name, ()):
                print(f"note: README headline {headline}; {why}")
        status = {0: "ok", EXIT_SKIP: "skipped (does not apply here)", None: f"timed out after {args.timeout}s"}
        results.append((script.name, status.get(code, f"failed (exit {code})"), seconds))
    print("\n" + table([(name, f"{status}, {seconds:.1f} s") for name, status, seconds in results]))
    failed = [r for r in results if not (r[1] == "ok" or r[1].startswith("skipped"))]
    return EXIT_FAIL if failed else EXIT_OK


def _positive(name: str, high: int | None = None) -> Callable[[str], int]:
    """An argparse type for an int in ``[1, high]``; argparse puts ``argument NAME:`` before a refusal."""

    def parse(text: str) -> int:
        digits = text.strip().lstrip("+-").lstrip("0")
        if high is not None and digits.isdigit() and len(digits) > len(str(high)):
            raise argparse.ArgumentTypeError(f"expected an integer <= {high}, got {len(digits):,} digits")
        try:
            value = int(text)
        except ValueError:
            shown = text if len(text) <= 40 else text[:37] + "..."
            raise argparse.ArgumentTypeError(f"expected an integer, got {shown!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"expected an integer <= {high}, got {value}")
        return value

    return parse


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _terminate(signum, frame) -> None:
    """SIGTERM ends the command as Ctrl-C does: unwinding, so a half-written output's temporary file is removed."""
    raise SystemExit(128 + signum)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``attnmask show: error: ...``), as every other error of the command."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 a check or benchmark failed, 2 bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse printed its one-line usage error, or --help / --version
        return int(e.code or 0)
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_USAGE
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (main() called in-process): leave signals alone
        previous = None
    try:
        return args.func(args)
    except CliError as e:
        print(f"attnmask: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except AttnmaskError as e:
        print(f"attnmask: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `attnmask demo | head -2`: the reader left; stop quietly, as Unix tools do
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as e:  # files that cannot be read or written (permissions, disk full)
        print(f"attnmask: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("attnmask: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not hit the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout replaced in-process (tests): nothing to redirect
        pass


def build_parser() -> argparse.ArgumentParser:
    from attnmask import __version__
    from attnmask.pack import MAX_LENGTH

    parser = _Parser(prog="attnmask", description="Padding, packing and attention masks for variable-length sequences.")
    parser.add_argument("--version", action="version", version=f"attnmask {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("demo", help="pad and pack a built-in corpus; print a report and write pictures")
    p.add_argument("--out", default="attnmask-demo", help="folder for the pictures (default: ./attnmask-demo/)")
    p.add_argument("--max-length", type=_positive("--max-length"), default=256, help="packed row length")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("show", help='draw a mask expression, e.g. "causal & sliding_window(4)"')
    p.add_argument("expr", help="mask expression: names, integer and list literals, & | ~ and parentheses")
    p.add_argument("--q-len", type=_positive("--q-len", SHOW_LIMIT), required=True, help="number of queries")
    p.add_argument("--kv-len", type=_positive("--kv-len", SHOW_LIMIT), help="number of keys (default: --q-len)")
    p.add_argument("--block-size", type=_positive("--block-size"), help="draw tiles of this size (block layout)")
    p.add_argument("--row", type=int, default=0, help="batch row to draw for per-row specs")
    p.add_argument("--max-cells", type=_positive("--max-cells"), default=48, help="largest picture side in cells")
    p.add_argument("--png", help="also write the mask as a PNG file (its folder must exist)")
    p.add_argument("--ascii", action="store_true", help="ASCII characters only (# and .)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("explain", help="which attention backend 'auto' picks for a mask expression and shapes, and why")
    p.add_argument("expr", help='mask expression, as for show: e.g. "causal & sliding_window(128)"')
    p.add_argument("--q-len", type=_positive("--q-len", EXPLAIN_LIMIT), required=True, help="number of queries")
    p.add_argument("--kv-len", type=_positive("--kv-len", EXPLAIN_LIMIT), help="number of keys (default: --q-len)")
    p.add_argument("--batch", type=_positive("--batch"), default=1, help="rows (default 1, or the expression's)")
    p.add_argument("--heads", type=_positive("--heads"), default=4, help="query heads (default 4)")
    p.add_argument("--kv-heads", type=_positive("--kv-heads"), help="key/value heads (default: --heads)")
    p.add_argument("--dim", type=_positive("--dim"), default=64, help="head dim (default 64)")
    p.add_argument("--dtype", default="float32", choices=_DTYPES)
    p.add_argument("--grad", action="store_true", help="the call needs a gradient (training)")
    p.add_argument("--threads", type=_positive("--threads"), help="intra-op threads (default: torch's)")
    p.add_argument("--tune", action="store_true", help="also time the close candidates, as attnmask.autotune does")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("pack", help="pack a JSONL or Parquet file of sequences into rows of --max-length tokens")
    p.add_argument("input", help="input file (.jsonl or .parquet, or - for JSONL on stdin), one sequence per record")
    p.add_argument(
        "--max-length", type=_positive("--max-length", MAX_LENGTH), required=True, help="tokens per packed row"
    )
    field = p.add_mutually_exclusive_group()
    field.add_argument("--text-field", default="text", help="field holding text to tokenize (default: text)")
    field.add_argument("--ids-field", help="field holding token ids (e.g. input_ids); no tokenizer is used")
    p.add_argument("--tokenizer", default="byte", help="'byte' (built in) or a path to a tokenizer.json / folder")
    p.add_argument("--add-eos", action="store_true", help="append the tokenizer's EOS token to every text")
    p.add_argument("--strategy", default="bfd", choices=["bfd", "ffd", "wrapped", "ordered"])
    p.add_argument("--overflow", default="split", choices=["split", "truncate", "error"])
    p.add_argument("--out", "-o", required=True, help="output (.jsonl or .parquet, written atomically; - for stdout)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records (counted and reported) instead of failing")
    p.add_argument("--no-progress", action="store_true", help="no progress counter on stderr")
    p.add_argument("--chat", action="store_true", help="records are {'messages': [...]}: chat template of --tokenizer")
    p.add_argument("--train-on", default="assistant", choices=["assistant", "last", "all"], help="with --chat")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("inspect", help="statistics and pictures of a packed file")
    p.add_argument("packed", help="a file written by `attnmask pack` (.jsonl or .parquet, or - for JSONL on stdin)")
    p.add_argument("--max-length", type=_positive("--max-length"), help="row length (default: the longest row)")
    p.add_argument("--rows", type=_positive("--rows"), default=16, help="rows to draw (default: 16)")
    p.add_argument("--out", help="folder for PNG pictures (mask of --row, document length histogram)")
    p.add_argument("--row", type=int, default=0, help="row whose mask is drawn as PNG (default: 0)")
    p.add_argument("--ascii", action="store_true", help="ASCII characters only")
    p.add_argument("--chat", action="store_true", help="show the trained tokens of --row (packed --chat file or JSONL)")
    p.add_argument("--tokenizer", help="with --chat: the tokenizer folder, to decode the tokens")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="run the benchmark scripts under benchmarks/ and print their tables")
    p.add_argument("--quick", action="store_true", help="small sizes (~3 minutes on 2 cores)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only scripts whose file name contains one of these")
    p.add_argument("--dir", help="benchmarks folder (default: ./benchmarks)")
    p.add_argument("--timeout", type=_positive("--timeout"), default=1800, help="seconds per script (default 1800)")
    p.set_defaults(func=cmd_bench)

    return parser


def cmd_demo(args) -> int:
    from attnmask.demo import run_demo

    return run_demo(Path(args.out), max_length=args.max_length)


if __name__ == "__main__":
    sys.exit(main())
