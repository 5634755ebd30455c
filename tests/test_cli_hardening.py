"""The attnmask command on hostile or unusual input (issue 14): one-line errors in the user's terms, files written
with the usual permissions and cleaned up on SIGTERM, pipes and `-`, and no matplotlib."""

import importlib.util
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import attnmask
from attnmask import cli, packfile

ROOT = Path(__file__).resolve().parents[1]
SRC = str(Path(attnmask.__file__).resolve().parents[1])


def call(capsys, *args):
    """``cli.main(ARGS)`` in this process: ``(exit code, stdout, stderr)``."""
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def run(*args, stdin=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, str(ROOT)]), PYTHONIOENCODING="utf-8")
    command = [sys.executable, "-m", "attnmask.cli", *map(str, args)]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, env=env, timeout=120)


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    assert err.startswith("attnmask") and "error: " in err.splitlines()[0] and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_version(capsys):
    code, out, _ = call(capsys, "--version")
    assert code == 0 and out.strip() == f"attnmask {attnmask.__version__}"


def test_usage_errors_are_one_line(capsys):
    code, _, err = call(capsys, "show", "causal")
    assert_one_line_error(code, err, "--q-len")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["show", "causal", "--q-len", str(10**11)], "--q-len: expected an integer <= 16777216"),
        (["show", "causal", "--q-len", "9" * 5000], "--q-len: expected an integer <= 16777216"),
        (["show", "sliding_window(" + "9" * 5000 + ")", "--q-len", "4"], "digits is larger than the limit"),
        (["show", "(" * 5000 + "causal" + ")" * 5000, "--q-len", "4"], "nested deeper"),
        (["show", "~" * 5000 + "causal", "--q-len", "4"], "nested deeper"),
        (["show", "document(" + "[" * 5000 + "1" + "]" * 5000 + ")", "--q-len", "4"], "nested deeper"),
        (["show", "causal & document([3, 5])", "--q-len", "10"], "--q-len 10: the expression covers positions [0, 8)"),
        (["show", "document([3, 5])", "--q-len", "2", "--kv-len", "9"], "--kv-len 9: the expression covers"),
        (["show", "causal", "--q-len", str(2**24), "--block-size", "1"], "--block-size 1: too many tiles"),
    ],
)
def test_show_refuses_in_the_users_terms(capsys, args, fragment):
    code, out, err = call(capsys, *args)
    assert_one_line_error(code, err, fragment)
    assert out == ""
    assert "kv_positions" not in err and "q_positions" not in err


def test_show_says_when_it_draws_part_of_the_expression(capsys):
    code, out, _ = call(capsys, "show", "causal & document([3, 5])", "--q-len", "4", "--ascii")
    assert code == 0
    assert "note: keys 0-3 of the 8 positions the expression covers (--q-len 8 shows all)" in out


def test_show_png_needs_an_existing_folder_and_a_png_name(tmp_path, capsys):
    code, _, err = call(capsys, "show", "causal", "--q-len", "4", "--png", tmp_path / "new" / "m.png")
    assert_one_line_error(code, err, f"the folder {tmp_path / 'new'} does not exist")
    assert not (tmp_path / "new").exists()
    code, _, err = call(capsys, "show", "causal", "--q-len", "4", "--png", tmp_path / "m.jpg")
    assert_one_line_error(code, err, "expected a file name ending in .png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "line, fragment",
    [
        ('{"input_ids": [1, ' + "9" * 5000 + "]}", "in.jsonl:2: unreadable JSON"),
        ('{"input_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}', "record 2 has 10 tokens, more than --max-length 8"),
    ],
)
def test_pack_bad_records_are_one_line(tmp_path, capsys, line, fragment):
    src = write_jsonl(tmp_path / "in.jsonl", ['{"input_ids": [1, 2]}', line])
    args = ["--ids-field", "input_ids", "--max-length", "8", "--overflow", "error", "--out", tmp_path / "o.jsonl"]
    code, _, err = call(capsys, "pack", src, *args)
    assert_one_line_error(code, err, fragment)
    assert err.count("\n") == 1


def test_pack_with_a_garbage_tokenizer_file_is_one_line(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", ['{"text": "hello"}'])
    garbage = tmp_path / "tokenizer.json"
    garbage.write_bytes(b"\x00\xffnot a tokenizer{{{")
    code, _, err = call(capsys, "pack", src, "--tokenizer", garbage, "--max-length", "8", "--out", tmp_path / "o.jsonl")
    assert_one_line_error(code, err, "tokenizer", "a readable tokenizer.json file")
    assert err.count("\n") == 1


def test_pack_pads_its_baseline_to_max_length(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", ['{"input_ids": [1, 2, 3]}', '{"input_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9]}'])
    out_file = tmp_path / "o.jsonl"
    code, out, _ = call(capsys, "pack", src, "--ids-field", "input_ids", "--max-length", "8", "--out", out_file)
    assert code == 0
    # one row of 8 per piece: [3], [8, 1] -> 3 rows, 24 slots for 12 tokens
    assert "padding    3 rows x 8 = 24 slots, fill 50.0%" in out


def test_pack_output_honours_the_umask_and_keeps_an_existing_mode(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", ['{"input_ids": [1, 2, 3]}'])
    old = os.umask(0o027)
    try:
        fresh, kept = tmp_path / "fresh.jsonl", tmp_path / "kept.jsonl"
        kept.write_text("old\n")
        kept.chmod(0o604)
        for out in (fresh, kept):
            code, _, err = call(capsys, "pack", src, "--ids-field", "input_ids", "--max-length", "8", "--out", out)
            assert code == 0, err
    finally:
        os.umask(old)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640
    assert stat.S_IMODE(kept.stat().st_mode) == 0o604


def test_pack_removes_its_temporary_file_on_sigterm(tmp_path, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", ['{"input_ids": [1, 2, 3]}', '{"input_ids": [4, 5]}'])
    real = packfile._row_to_json

    def terminated_while_writing(row):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler main() installs runs before the next line
        return real(row)

    monkeypatch.setattr(packfile, "_row_to_json", terminated_while_writing)
    with pytest.raises(SystemExit) as info:
        cli.main(["pack", str(src), "--ids-field", "input_ids", "--max-length", "8", "--out", f"{tmp_path}/o.jsonl"])
    assert info.value.code == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    assert signal.getsignal(signal.SIGTERM) is not cli._terminate  # main() put the previous handler back


def test_pack_and_inspect_read_stdin_and_write_stdout():
    records = "".join(json.dumps({"input_ids": list(range(n))}) + "\n" for n in (3, 5, 2))
    packed = run("pack", "-", "--ids-field", "input_ids", "--max-length", "8", "--out", "-", stdin=records)
    assert packed.returncode == 0, packed.stderr
    rows = [json.loads(line) for line in packed.stdout.splitlines()]
    assert sorted(n for r in rows for n in r["seq_lens"]) == [2, 3, 5]
    assert "every token arrived: 10 of 10" in packed.stderr
    inspected = run("inspect", "-", stdin=packed.stdout)
    assert inspected.returncode == 0, inspected.stderr
    assert "tokens     10, fill 62.5%" in inspected.stdout


def test_inspect_an_empty_row_is_one_line(tmp_path, capsys):
    packed = write_jsonl(tmp_path / "p.jsonl", ['{"input_ids": [], "seq_lens": []}'])
    code, _, err = call(capsys, "inspect", packed)
    assert_one_line_error(code, err, f"{packed}:1: field 'input_ids': an empty row")


def test_demo_piped_into_head_exits_quietly(tmp_path):
    command = f"{sys.executable} -m attnmask.cli demo --out {tmp_path} | head -2; echo status ${{PIPESTATUS[0]}} >&2"
    done = subprocess_bash(command)
    assert done.stdout.count("\n") == 2
    assert done.stderr.strip() in ("status 0", f"status {cli.EXIT_BROKEN_PIPE}")


def subprocess_bash(command):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, str(ROOT)]), PYTHONIOENCODING="utf-8")
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=120)


def test_demo_and_inspect_skip_pictures_without_matplotlib(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code, out, _ = call(capsys, "demo", "--out", tmp_path / "demo")
    assert code == 0 and "Pictures skipped: matplotlib is not installed" in out
    assert list((tmp_path / "demo").iterdir()) == []
    packed = write_jsonl(tmp_path / "p.jsonl", ['{"input_ids": [1, 2, 3], "seq_lens": [3]}'])
    code, _, err = call(capsys, "inspect", packed, "--out", tmp_path / "pictures")
    assert code == 0 and err.strip() == (
        "attnmask: PNG pictures skipped: matplotlib is not installed (pip install 'attnmask[viz]')"
    )
