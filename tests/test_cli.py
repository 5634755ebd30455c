"""The attnmask command through subprocesses: exit codes, messages and pictures on good and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnmask
from attnmask import cli, packfile
from attnmask import errors as am_errors
from tests.images import png_size

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ROOT = str(Path(attnmask.__file__).resolve().parents[1])  # the attnmask this test imports, for subprocesses


def run(*args, cwd=None, timeout=120):
    """Run ``python -m attnmask.cli ARGS`` with this process's import path; returns the CompletedProcess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT, str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONIOENCODING"] = "utf-8"
    return subprocess.run(
        [sys.executable, "-m", "attnmask.cli", *map(str, args)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


class Result:
    """What ``main()`` returned and printed, shaped like a CompletedProcess."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def call(capsys, *args):
    """Run ``cli.main(ARGS)`` in this process (fast); for the checks that do not need a fresh interpreter."""
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return Result(code, out.out, out.err)


def assert_usage_error(proc, *fragments):
    """Exit code 2, one ``attnmask: error:`` line first, no traceback, and every fragment in stderr."""
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("attnmask: error: ") or "error:" in proc.stderr.splitlines()[-1]
    for fragment in fragments:
        assert fragment in proc.stderr


# ----------------------------------------------------------------------------------------------------------------------
# show


def test_show_draws_causal_sliding_window():
    proc = run("show", "causal & sliding_window(4)", "--q-len", "8", "--ascii")
    assert proc.returncode == 0, proc.stderr
    expected = """\
causal() & sliding_window(4)   (q_len=8, kv_len=8, row 0)
  k 0 1 2 3 4 5 6 7
q 0 # . . . . . . .
  1 # # . . . . . .
  2 # # # . . . . .
  3 # # # # . . . .
  4 . # # # # . . .
  5 . . # # # # . .
  6 . . . # # # # .
  7 . . . . # # # #
"""
    assert proc.stdout == expected


def test_show_draws_documents_of_a_packed_row(capsys):
    proc = call(capsys, "show", "causal & document([3, 5, 4])", "--q-len", "12")
    assert proc.returncode == 0, proc.stderr
    expected = """\
causal() & document(seq_lens=[3, 5, 4])   (q_len=12, kv_len=12, row 0)
                         1
   k 0 1 2 3 4 5 6 7 8 9 0 1
q  0 ■ · · · · · · · · · · ·
   1 ■ ■ · · · · · · · · · ·
   2 ■ ■ ■ · · · · · · · · ·
   3 · · · ■ · · · · · · · ·
   4 · · · ■ ■ · · · · · · ·
   5 · · · ■ ■ ■ · · · · · ·
   6 · · · ■ ■ ■ ■ · · · · ·
   7 · · · ■ ■ ■ ■ ■ · · · ·
   8 · · · · · · · · ■ · · ·
   9 · · · · · · · · ■ ■ · ·
  10 · · · · · · · · ■ ■ ■ ·
  11 · · · · · · · · ■ ■ ■ ■
"""
    assert proc.stdout == expected


def test_show_with_fewer_queries_than_keys_draws_the_last_rows(capsys):
    proc = call(capsys, "show", "causal", "--q-len", "2", "--kv-len", "4", "--ascii")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1:] == ["  k 0 1 2 3", "q 2 # # # .", "  3 # # # #"]


def test_show_with_block_size_draws_tiles(capsys):
    proc = call(capsys, "show", "causal", "--q-len", "8", "--block-size", "4", "--ascii")
    assert proc.returncode == 0, proc.stderr
    assert "8 x 8, tiles of 4" in proc.stdout
    assert "q 0 + .\n  4 # +" in proc.stdout


def test_show_writes_a_png_of_the_default_size(tmp_path, capsys):
    out = tmp_path / "mask.png"
    proc = call(capsys, "show", "causal & document([3, 5, 4])", "--q-len", "12", "--png", out)
    assert proc.returncode == 0, proc.stderr
    assert png_size(out) == (480, 480)


def test_show_unknown_name_points_at_its_column(capsys):
    proc = call(capsys, "show", "causal & foo", "--q-len", "4")
    assert_usage_error(proc, "unknown name 'foo' at column 10")
    assert proc.stderr.splitlines()[1:] == ["  causal & foo", "           ^"]


def test_show_python_escape_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    proc = run("show", f"__import__('os').system('touch {marker}')", "--q-len", "4", cwd=tmp_path)
    assert_usage_error(proc, "unknown name '__import__' at column 1")
    assert not marker.exists()


def test_show_open_call_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    proc = call(capsys, "show", "open([1]) | causal", "--q-len", "4")
    assert_usage_error(proc, "unknown name 'open' at column 1")
    assert list(tmp_path.iterdir()) == []


def test_show_spec_shorter_than_q_len_is_a_clear_error(capsys):
    proc = call(capsys, "show", "document([2, 2])", "--q-len", "6")
    assert_usage_error(proc, "--q-len 6: the expression covers positions [0, 4) only", "use --q-len 4 or less")


@pytest.mark.parametrize("args", [["--q-len", "0"], ["--q-len", "x"], []])
def test_show_bad_lengths_are_usage_errors(capsys, args):
    proc = call(capsys, "show", "causal", *args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_main_returns_exit_code_in_process(capsys):
    assert cli.main(["show", "causal", "--q-len", "2", "--ascii"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["  k 0 1", "q 0 # .", "  1 # #"]
    assert cli.main(["show", "causal(", "--q-len", "2"]) == 2


# ----------------------------------------------------------------------------------------------------------------------
# demo


def test_demo_prints_a_report_and_writes_pictures(tmp_path):
    proc = run("demo", "--out", tmp_path / "pics", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "sentences" in proc.stdout and "tokens" in proc.stdout
    for name in ("packed-mask.png", "lengths.png"):
        width, height = png_size(tmp_path / "pics" / name)
        assert width > 100 and height > 100


def test_demo_default_folder_is_attnmask_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    proc = call(capsys, "demo")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "attnmask-demo" / "lengths.png").exists()


# ----------------------------------------------------------------------------------------------------------------------
# pack

SENTENCES = ["hello world", "a much longer sentence that is split when rows are short", "ok", "héllo ünïcode ✓"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def test_pack_text_jsonl_round_trips_every_sequence(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": s} for s in SENTENCES])
    out = tmp_path / "packed.jsonl"
    proc = run("pack", src, "--max-length", "16", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "every token arrived" in proc.stdout
    rows = packfile.read_packed(out)
    assert all(len(r.input_ids) <= 16 for r in rows)
    tokenize = cli.load_tokenizer("byte")
    assert packfile.unpack_rows(rows) == {i: tokenize(s) for i, s in enumerate(SENTENCES)}


@settings(max_examples=15)
@given(
    seqs=st.lists(st.lists(st.integers(0, 2**40), min_size=1, max_size=40), min_size=1, max_size=25),
    max_length=st.integers(1, 32),
    out_suffix=st.sampled_from([".jsonl", ".parquet"]),
    strategy=st.sampled_from(["bfd", "ffd", "wrapped", "ordered"]),
)
def test_pack_ids_round_trip_exactly(tmp_path_factory, seqs, max_length, out_suffix, strategy):
    tmp = tmp_path_factory.mktemp("rt")
    src = write_jsonl(tmp / "in.jsonl", [{"input_ids": s, "other": 1} for s in seqs])
    out = tmp / f"packed{out_suffix}"
    code = cli.main(
        [
            "pack",
            str(src),
            "--ids-field",
            "input_ids",
            "--max-length",
            str(max_length),
            "--strategy",
            strategy,
            "--out",
            str(out),
        ]
    )
    assert code == 0
    rows = packfile.read_packed(out)
    assert max(len(r.input_ids) for r in rows) <= max_length
    assert packfile.unpack_rows(rows) == dict(enumerate(seqs))


def test_pack_parquet_input_round_trips(tmp_path, capsys):
    seqs = [[5, 6, 7], [1] * 20, [9]]
    src = write_parquet(tmp_path / "in.parquet", {"input_ids": seqs})
    out = tmp_path / "packed.jsonl"
    proc = call(capsys, "pack", src, "--ids-field", "input_ids", "--max-length", "8", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert packfile.unpack_rows(packfile.read_packed(out)) == dict(enumerate(seqs))


def test_pack_position_ids_restart_in_every_document(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"input_ids": [1] * n} for n in (3, 2, 4)])
    out = tmp_path / "packed.jsonl"
    assert call(capsys, "pack", src, "--ids-field", "input_ids", "--max-length", "9", "--out", out).returncode == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["seq_lens"] == [4, 3, 2]
    assert row["position_ids"] == [0, 1, 2, 3, 0, 1, 2, 0, 1]


def test_pack_summary_reports_rows_fill_and_split(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"input_ids": [1] * n} for n in (10, 6, 3, 1)])
    proc = call(capsys, "pack", src, "--ids-field", "input_ids", "--max-length", "8", "--out", tmp_path / "o.jsonl")
    assert proc.returncode == 0
    assert "3 rows x 8 = 24 slots, fill 83.3% (lower bound 3 rows)" in proc.stdout
    assert "1 sequences into 2 pieces" in proc.stdout
    assert "every token arrived: 20 of 20" in proc.stdout


def test_pack_truncate_reports_dropped_tokens(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"input_ids": list(range(1, 11))}, {"input_ids": [1, 2]}])
    out = tmp_path / "o.jsonl"
    proc = call(
        capsys, "pack", src, "--ids-field", "input_ids", "--max-length", "4", "--overflow", "truncate", "--out", out
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 sequences, 6 tokens dropped" in proc.stdout
    assert packfile.unpack_rows(packfile.read_packed(out)) == {0: [1, 2, 3, 4], 1: [1, 2]}


def test_pack_overflow_error_names_the_file(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"input_ids": [1] * 9}])
    proc = call(
        capsys,
        "pack",
        src,
        "--ids-field",
        "input_ids",
        "--max-length",
        "4",
        "--overflow",
        "error",
        "--out",
        tmp_path / "o.jsonl",
    )
    assert_usage_error(proc, f"{src}: record 1 has 9 tokens, more than --max-length 4")
    assert "lengths_or_sequences" not in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


BAD_RECORDS = [
    ('{"text": "fine"}\n{"text": \n', 2, "malformed JSON"),
    ('{"text": "fine"}\n\n{"txt": "x"}\n', 3, "missing field 'text'"),
    ('{"text": null}\n', 1, "missing field 'text'"),
    ('{"text": ""}\n', 1, "zero-length sequence"),
    ('{"text": 5}\n', 1, "expected a string, got int"),
    ("[1, 2]\n", 1, "expected a JSON object"),
]
BAD_ID_RECORDS = [
    ('{"input_ids": [1, 2.5]}\n', 1, "id 1 is not an integer: 2.5"),
    ('{"input_ids": [1, "2"]}\n', 1, 'id 1 is not an integer: "2"'),
    ('{"input_ids": [true]}\n', 1, "id 0 is not an integer: true"),
    ('{"input_ids": [1, -3]}\n', 1, "out of range"),
    ('{"input_ids": []}\n', 1, "zero-length sequence"),
    ('{"input_ids": "1 2"}\n', 1, "expected a list of integer ids, got str"),
    ('{"input_ids": [1]}\n{"input_ids": [[1]]}\n', 2, "id 0 is not an integer: [1]"),
]


@pytest.mark.parametrize("content, line, message", BAD_RECORDS)
def test_pack_bad_text_record_is_one_line_with_file_and_line(tmp_path, capsys, content, line, message):
    src = tmp_path / "in.jsonl"
    src.write_text(content, encoding="utf-8")
    proc = call(capsys, "pack", src, "--max-length", "8", "--out", tmp_path / "o.jsonl")
    assert_usage_error(proc, f"attnmask: error: {src}:{line}: ", message)
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("content, line, message", BAD_ID_RECORDS)
def test_pack_bad_ids_record_is_one_line_with_file_and_line(tmp_path, capsys, content, line, message):
    src = tmp_path / "in.jsonl"
    src.write_text(content, encoding="utf-8")
    proc = call(capsys, "pack", src, "--ids-field", "input_ids", "--max-length", "8", "--out", tmp_path / "o.jsonl")
    assert_usage_error(proc, f"attnmask: error: {src}:{line}: ", message)


def test_pack_invalid_utf8_line_is_reported(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    proc = call(capsys, "pack", src, "--max-length", "8", "--out", tmp_path / "o.jsonl")
    assert_usage_error(proc, f"{src}:2: ", "UTF-8")


def test_pack_bad_record_through_a_subprocess_has_no_traceback(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "unterminated\n', encoding="utf-8")
    proc = run("pack", src, "--max-length", "8", "--out", tmp_path / "o.jsonl")
    assert_usage_error(proc, f"attnmask: error: {src}:2: malformed JSON")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_pack_empty_file_is_an_error(tmp_path, capsys, content):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    proc = call(capsys, "pack", src, "--max-length", "8", "--out", tmp_path / "o.jsonl")
    assert_usage_error(proc, f"{src}:1: empty file")


def test_pack_parquet_missing_column_names_the_row(tmp_path, capsys):
    src = write_parquet(tmp_path / "in.parquet", {"text": ["a", None, "c"]})
    proc = call(capsys, "pack", src, "--max-length", "8", "--out", tmp_path / "o.jsonl")
    assert_usage_error(proc, f"{src}:2: missing field 'text'")


def test_skip_bad_skips_counts_and_keeps_record_numbers(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"input_ids": [1, 2]}\n{"input_ids": [1.5]}\nnot json\n{"input_ids": [7]}\n{"input_ids": []}\n')
    out = tmp_path / "o.parquet"
    proc = call(capsys, "pack", src, "--ids-field", "input_ids", "--max-length", "4", "--skip-bad", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert f"3 bad records (first: {src}:2: field 'input_ids': id 0 is not an integer: 1.5)" in proc.stdout
    assert packfile.unpack_rows(packfile.read_packed(out)) == {0: [1, 2], 3: [7]}


def test_all_records_bad_is_an_error_even_with_skip_bad(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": ""}, {"text": ""}])
    proc = call(capsys, "pack", src, "--max-length", "4", "--skip-bad", "--out", tmp_path / "o.jsonl")
    assert_usage_error(proc, "all 2 records are bad")


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.jsonl", "--out", "o.jsonl"], "missing.jsonl: no such file"),
        (["in.jsonl", "--out", "o.csv"], "unknown output format '.csv'"),
        (["in.txt", "--out", "o.jsonl"], "unknown input format '.txt'"),
        (["in.jsonl", "--out", "nodir/o.jsonl"], "the output directory nodir does not exist"),
        (["in.jsonl", "--out", "o.jsonl", "--tokenizer", "no/such/tokenizer.json"], "no such file or directory"),
    ],
)
def test_pack_bad_paths_are_usage_errors(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "in.jsonl", [{"text": "abc"}])
    (tmp_path / "in.txt").write_text("abc")
    proc = call(capsys, "pack", *args, "--max-length", "4")
    assert_usage_error(proc, message)


def test_interrupted_write_leaves_no_partial_output(tmp_path, monkeypatch, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"input_ids": [i] * 3} for i in range(1, 6)])
    out = tmp_path / "packed.jsonl"
    out.write_text("previous complete output\n")
    calls = []

    def interrupted(row):
        calls.append(row)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return "{}"

    monkeypatch.setattr(packfile, "_row_to_json", interrupted)
    proc = call(capsys, "pack", src, "--ids-field", "input_ids", "--max-length", "3", "--out", out)
    assert proc.returncode == 130
    assert len(calls) == 2
    assert out.read_text() == "previous complete output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "packed.jsonl"]


def test_failed_parquet_write_leaves_no_output(tmp_path, monkeypatch, capsys):
    import pyarrow.parquet as pq

    src = write_jsonl(tmp_path / "in.jsonl", [{"input_ids": [1, 2]}])
    real_write = pq.write_table

    def write_then_fail(table, where, **kw):
        real_write(table, where, **kw)
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", write_then_fail)
    proc = call(capsys, "pack", src, "--ids-field", "input_ids", "--max-length", "4", "--out", tmp_path / "o.parquet")
    assert_usage_error(proc, "attnmask: error: disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


# ----------------------------------------------------------------------------------------------------------------------
# inspect


def test_inspect_prints_statistics_and_pictures(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"input_ids": [1] * n} for n in (5, 3, 6, 2, 9)])
    packed = tmp_path / "packed.parquet"
    assert cli.main(["pack", str(src), "--ids-field", "input_ids", "--max-length", "8", "--out", str(packed)]) == 0
    proc = run("inspect", packed, "--out", tmp_path / "pics", "--ascii")
    assert proc.returncode == 0, proc.stderr
    assert "rows       4 of 8 tokens" in proc.stdout
    assert "tokens     25, fill 78.1%" in proc.stdout
    assert "|AAAAAAAA| 8/8 100%" in proc.stdout
    assert png_size(tmp_path / "pics" / "row0-mask.png") == (480, 480)
    assert png_size(tmp_path / "pics" / "document-lengths.png") == (640, 400)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"input_ids": [1, 2, 3], "seq_lens": [2]}, "seq_lens': sums to 2 but the row has 3"),
        ({"input_ids": [1, 2]}, "missing field 'seq_lens'"),
        ({"input_ids": [1, 2], "seq_lens": [2], "position_ids": [0, 0]}, "does not restart at 0"),
        ({"input_ids": [1, 2], "seq_lens": [2], "segments": [[0, 0, 3]]}, "does not describe a document"),
        ({"input_ids": [1, 2], "seq_lens": [0, 2]}, "lengths must be >= 1"),
    ],
)
def test_inspect_bad_rows_name_file_and_line(tmp_path, capsys, row, message):
    packed = write_jsonl(tmp_path / "p.jsonl", [{"input_ids": [1], "seq_lens": [1]}, row])
    proc = call(capsys, "inspect", packed)
    assert_usage_error(proc, f"{packed}:2: ", message)


def test_inspect_refuses_pieces_that_overlap(tmp_path, capsys):
    rows = [
        {"input_ids": [1, 2, 3], "seq_lens": [3], "segments": [[4, 0, 3]]},
        {"input_ids": [3, 4], "seq_lens": [2], "segments": [[4, 2, 4]]},
    ]
    proc = call(capsys, "inspect", write_jsonl(tmp_path / "p.jsonl", rows))
    assert_usage_error(proc, "record 4: its pieces leave an overlap at token 2")


def test_inspect_empty_file_is_an_error(tmp_path, capsys):
    packed = tmp_path / "p.jsonl"
    packed.write_text("")
    assert_usage_error(call(capsys, "inspect", packed), f"{packed}:1: empty file")


# ----------------------------------------------------------------------------------------------------------------------
# bench


def make_benchmarks(folder):
    folder.mkdir()
    (folder / "bench_alpha.py").write_text(
        "import sys\nprint('| case | ratio |')\nprint('quick' if '--quick' in sys.argv else 'full')\n"
    )
    (folder / "bench_gpu.py").write_text("import sys\nprint('needs a GPU')\nsys.exit(77)\n")
    (folder / "bench_plain.py").write_text("import sys\nprint('args', sys.argv[1:])\n")
    (folder / "helper.py").write_text("raise SystemExit(3)\n")
    return folder


def test_bench_runs_scripts_and_passes_quick_where_supported(tmp_path):
    folder = make_benchmarks(tmp_path / "benchmarks")
    proc = run("bench", "--quick", "--dir", folder)
    assert proc.returncode == 0, proc.stderr
    assert "| case | ratio |\nquick" in proc.stdout
    assert "args []" in proc.stdout
    assert "bench_gpu.py    skipped (does not apply here)" in proc.stdout
    assert "helper" not in proc.stdout


def test_bench_reports_a_failing_script(tmp_path, capsys):
    folder = make_benchmarks(tmp_path / "benchmarks")
    (folder / "bench_broken.py").write_text("raise SystemExit(3)\n")
    proc = call(capsys, "bench", "--dir", folder, "--only", "broken", "alpha")
    assert proc.returncode == 1
    assert "bench_broken.py  failed (exit 3)" in proc.stdout
    assert "bench_alpha.py   ok" in proc.stdout


def test_every_benchmark_script_has_a_quick_size():
    """`attnmask bench --quick` runs a script without the flag at full size (minutes to tens of minutes each)."""
    scripts = sorted((ROOT / "benchmarks").glob("bench_*.py"))
    assert len(scripts) >= 20
    missing = [p.name for p in scripts if '"--quick"' not in p.read_text(encoding="utf-8")]
    assert not missing, f"no --quick size: {missing}"


def test_quick_notes_quote_the_readme_headlines_word_for_word():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for script, notes in cli.QUICK_NOTES.items():
        assert (ROOT / "benchmarks" / script).is_file(), script
        for headline, _ in notes:
            assert f"| {headline}" in readme, headline


def test_bench_quick_prints_why_a_quick_ratio_differs_from_the_readme(tmp_path):
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    (folder / "bench_hf_train.py").write_text("import sys\nprint('--quick' in sys.argv)\n")
    proc = run("bench", "--quick", "--dir", folder)
    assert proc.returncode == 0, proc.stderr
    assert "True\nnote: README headline training step, tiny Llama, rows of 4096" in proc.stdout
    assert "rows of 256" in proc.stdout
    proc = run("bench", "--dir", folder)  # full size: the README's own sizes, no note
    assert "note:" not in proc.stdout


def test_bench_without_scripts_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "benchmarks").mkdir()
    assert_usage_error(call(capsys, "bench", "--dir", tmp_path / "benchmarks"), "no bench_*.py scripts")


def test_show_block_size_draws_the_block_layout(capsys):
    proc = call(capsys, "show", "causal & document([3, 5, 4])", "--q-len", "12", "--block-size", "4", "--ascii")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1:] == [
        "12 x 12, tiles of 4: # all, + some, . none may attend",
        "  k 0 4 8",
        "q 0 + . .",
        "  4 + + .",
        "  8 . . +",
        "block layout: 0 full, 4 partial, 5 none tiles",
    ]


def test_show_long_row_is_drawn_from_its_block_layout(capsys):
    proc = call(capsys, "show", "causal & sliding_window(4096)", "--q-len", "32768", "--max-cells", "4", "--ascii")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1] == "32768 x 32768, tiles of 8192: # all, + some, . none may attend"
    assert lines[-5:] == [
        "q     0 + . . .",
        "   8192 + + . .",
        "  16384 . + + .",
        "  24576 . . + +",
        "block layout: 0 full, 7 partial, 9 none tiles",
    ]


def test_pack_with_a_tokenizer_json_path(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, "a": 3, "cat": 4, "sat": 5}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a cat sat"}, {"text": "cat dog"}])
    out = tmp_path / "o.jsonl"
    proc = call(
        capsys, "pack", src, "--max-length", "8", "--tokenizer", tmp_path / "tokenizer.json", "--add-eos", "--out", out
    )
    assert proc.returncode == 0, proc.stderr
    assert packfile.unpack_rows(packfile.read_packed(out)) == {0: [3, 4, 5, 2], 1: [4, 0, 2]}


def test_output_that_cannot_be_replaced_is_one_line_and_leaves_no_temp_file(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "abc"}])
    (tmp_path / "o.jsonl").mkdir()  # a directory where the output file should go
    proc = call(capsys, "pack", src, "--max-length", "4", "--out", tmp_path / "o.jsonl")
    assert_usage_error(proc, "attnmask: error: ", "o.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "o.jsonl"]


def test_corrupt_parquet_is_one_line(tmp_path, capsys):
    src = tmp_path / "in.parquet"
    src.write_bytes(b"PAR1 this is not parquet PAR1")
    proc = call(capsys, "pack", src, "--ids-field", "input_ids", "--max-length", "4", "--out", tmp_path / "o.jsonl")
    assert_usage_error(proc, f"{src}:1: not a readable Parquet file")


def test_progress_counter_without_tqdm_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm fails: the plain counter is used
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    progress = cli.Progress("reading x.jsonl")
    progress(1234)
    progress.close()
    assert "\rreading x.jsonl: 1,234 records" in capsys.readouterr().err


def test_progress_is_silent_when_stderr_is_not_a_terminal(capsys):
    progress = cli.Progress("reading x.jsonl")
    progress(10)
    progress.close()
    assert capsys.readouterr().err == ""


def columns_of(bins, data):
    """Flat segment arrays of ``bins`` (rows of (index, start, stop)) gathered into PackedColumns."""
    flat = [seg for row in bins for seg in row]
    offsets = [0]
    for row in bins:
        offsets.append(offsets[-1] + len(row))
    index, start, stop = (list(x) for x in zip(*flat, strict=True))
    return packfile.build_columns(index, start, stop, offsets, data)


def test_token_check_passes_when_every_token_is_there_once():
    data = packfile.ReadResult.of([list(range(5)), [10, 11, 12]])
    columns = columns_of([[(0, 0, 3)], [(0, 3, 5), (1, 0, 3)]], data)
    assert columns.row(1).input_ids.tolist() == [3, 4, 10, 11, 12]
    assert columns.position_ids.tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert packfile.check_every_token(columns, data) == 0


def test_token_check_catches_a_missing_piece():
    data = packfile.ReadResult.of([list(range(5)), [10, 11, 12]])
    with pytest.raises(am_errors.InputError, match="record 0 has 3 of its 5 tokens"):
        packfile.check_every_token(columns_of([[(0, 0, 3)], [(1, 0, 3)]], data), data)


def test_token_check_catches_a_piece_given_twice():
    data = packfile.ReadResult.of([list(range(5)), [10, 11, 12]])
    columns = columns_of([[(0, 0, 5)], [(0, 3, 5), (1, 0, 3)]], data)
    with pytest.raises(am_errors.InputError, match="record 0 has 7 of its 5 tokens"):
        packfile.check_every_token(columns, data)


def test_token_check_catches_a_changed_token():
    data = packfile.ReadResult.of([list(range(5)), [10, 11, 12]])
    columns = columns_of([[(0, 0, 3)], [(0, 3, 5), (1, 0, 3)]], data)
    columns.input_ids[6] = 99
    with pytest.raises(am_errors.InputError, match="record 1 is not reassembled exactly"):
        packfile.check_every_token(columns, data)


def test_token_check_with_truncation_counts_the_dropped_tokens():
    data = packfile.ReadResult.of([list(range(5)), [10, 11, 12]])
    columns = columns_of([[(0, 0, 2), (1, 0, 2)]], data)
    assert packfile.check_every_token(columns, data, keep=2) == 4


def test_show_long_row_png_is_drawn_from_tiles(tmp_path, capsys):
    out = tmp_path / "long.png"
    proc = call(capsys, "show", "causal & document([30000, 70000])", "--q-len", "100000", "--png", out)
    assert proc.returncode == 0, proc.stderr
    assert png_size(out) == (480, 480)


def test_show_error_prints_no_partial_picture(capsys):
    proc = call(capsys, "show", "causal", "--q-len", "8", "--kv-len", "4")
    assert_usage_error(proc, "--q-len 8: expected at most --kv-len 4")
    assert proc.stdout == ""


def test_demo_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    proc = call(capsys, "demo", "--out", tmp_path / "taken")
    assert_usage_error(proc, "attnmask: error: ", "taken")
    assert proc.stdout == ""


def test_demo_bad_max_length_is_a_usage_error(capsys):
    proc = call(capsys, "demo", "--max-length", "0")
    assert proc.returncode == 2
    assert "--max-length: expected an integer >= 1, got 0" in proc.stderr


# ----------------------------------------------------------------------------------------------------------------------
# explain: which backend "auto" picks for an expression and shapes


def test_explain_prints_every_backends_estimate_and_the_pick(capsys):
    proc = call(capsys, "explain", "causal & document([3, 5])", "--q-len", "8", "--heads", "4", "--kv-heads", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("causal() & document(seq_lens=[3, 5]): q (1, 4, 8, 64), k and v (1, 2, 8, 64)")
    assert lines[1].split()[:3] == ["backend", "cost", "auto"]
    assert any(line.startswith("varlen ") for line in lines) and lines[-1].startswith("auto picks: ")


@pytest.mark.parametrize(
    "amx, avx512, kind", [(True, True, "amx"), (False, True, "avx512_bf16"), (False, False, "none")]
)
def test_explain_says_which_bfloat16_factors_this_cpu_gets(capsys, monkeypatch, amx, avx512, kind):
    """The estimates price bfloat16 by the CPU's kind (``ModeFactors``): explain names it for a bfloat16 call, and
    on a CPU with AMX tiles says whether ``native`` computes on them (``native.amx_ready``)."""
    from attnmask.backends import _common, native

    monkeypatch.setattr(_common, "cpu_has_amx_bf16", lambda: amx)
    monkeypatch.setattr(_common, "cpu_has_avx512_bf16", lambda: avx512)
    for ready in (True, False):
        monkeypatch.setattr(native, "amx_ready", lambda ready=ready: ready)
        proc = call(capsys, "explain", "causal", "--q-len", "16", "--dtype", "bfloat16")
        assert proc.returncode == 0, proc.stderr
        note = cli._TILES_NOTE if amx and ready else ""
        assert proc.stdout.splitlines()[1] == f"bfloat16 on this CPU: {cli._BF16_ESTIMATES[kind]}{note}"
    proc = call(capsys, "explain", "causal", "--q-len", "16")
    assert "bfloat16 on this CPU" not in proc.stdout


def test_explain_with_tune_times_the_close_candidates(capsys):
    import torch

    from attnmask import tuning

    threads = torch.get_num_threads()
    args = ("explain", "causal & sliding_window(64)", "--q-len", "1024", "--dim", "16", "--grad", "--tune")
    proc = call(capsys, *args, "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert torch.get_num_threads() == threads and tuning.results() == ()  # in-process: nothing left behind
    assert "forward + backward, 1 thread(s)" in proc.stdout.splitlines()[0]
    assert "(measured: " in proc.stdout.splitlines()[-1] and " ms" in proc.stdout.splitlines()[-1]


@pytest.mark.parametrize(
    "args, words",
    [
        (("causal", "--q-len", "8", "--kv-len", "4"), ["--q-len 8", "at most --kv-len 4"]),
        (("causal", "--q-len", "8", "--heads", "4", "--kv-heads", "3"), ["--kv-heads 3", "divisor of --heads 4"]),
        (("causal & document([[2, 2], [4]])", "--q-len", "4", "--batch", "3"), ["--batch 3", "2 rows"]),
        (("document([3, 5])", "--q-len", "9"), ["--q-len 9", "[0, 8)"]),
        (("causal", "--q-len", "8", "--dtype", "int8"), ["--dtype", "invalid choice"]),
    ],
)
def test_explain_bad_input_is_a_usage_error(capsys, args, words):
    proc = call(capsys, "explain", *args)
    assert proc.returncode == 2
    for word in words:
        assert word in proc.stderr
