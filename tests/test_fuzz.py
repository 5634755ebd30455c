"""Fuzzing the public API and the command line with hostile input: huge integers, wrong types, deep nesting, empty
tensors and garbage files. Only ``AttnmaskError`` may come out of the API; the command exits 0, or 2 with an
``attnmask ... error:`` first line and no traceback. A few seconds in all."""

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import attnmask as am
from attnmask import cli

HUGE = [2**31, 2**62, 2**63 - 1, 2**63, 2**64, 10**30, -(10**30), 10**5000 - 1]


def huge(i: int) -> int:
    """One of ``HUGE`` (drawn by index: hypothesis prints a strategy's values, and a 5,000-digit int cannot be)."""
    return HUGE[i]


scalars = st.one_of(
    st.integers(-3, 40),
    st.integers(0, len(HUGE) - 1).map(huge),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.booleans(),
    st.none(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner),
    max_leaves=12,
)
# what json.dumps can write (not the 5,000-digit int, past Python's int-to-str limit: garbage_lines has it as text)
json_values = st.recursive(
    scalars.filter(lambda x: x != HUGE[-1]),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner),
    max_leaves=12,
)
tensors = st.sampled_from(
    [
        torch.zeros(0, dtype=torch.long),
        torch.zeros(2, 0, dtype=torch.long),
        torch.ones(2, 3),
        torch.tensor([[1, 0, 1]]),
        torch.tensor([0.5, 1.0]),
        torch.tensor([[True, False]]),
        torch.zeros(2, 2, 2, dtype=torch.long),
        torch.tensor([1 + 2j]),
        np.array(["a", "b"]),
        np.array([2**62, -1]),
    ]
)
arguments = st.one_of(values, tensors)

CONSTRUCTORS = {
    "sliding_window": lambda a: am.sliding_window(a),
    "chunked": lambda a: am.chunked(a),
    "chunked_offsets": lambda a: am.chunked(3, offsets=a),
    "prefix_lm": lambda a: am.prefix_lm(a),
    "document_seq_lens": lambda a: am.document(seq_lens=a),
    "document_doc_ids": lambda a: am.document(doc_ids=a),
    "document_length": lambda a: am.document(seq_lens=[2, 1], length=a),
    "key_padding": lambda a: am.key_padding(a),
    "custom": lambda a: am.custom(a),
}


def only_typed_errors(thunk):
    """Run ``thunk``; an ``AttnmaskError`` is a fine answer, anything else fails the test."""
    try:
        return thunk()
    except am.AttnmaskError:
        return None


@settings(max_examples=150)
@given(st.sampled_from(sorted(CONSTRUCTORS)), arguments, st.integers(1, 6))
def test_mask_constructors_and_evaluation_raise_only_typed_errors(name, argument, length):
    spec = only_typed_errors(lambda: CONSTRUCTORS[name](argument))
    if spec is None:
        return
    for combine in (
        lambda: spec,
        lambda: spec & am.causal(),
        lambda: ~spec | am.document(seq_lens=[[1, 2], [3]]),
        lambda: spec & am.key_padding([[1, 1, 0]]),
    ):
        combined = only_typed_errors(combine)
        if combined is not None:
            only_typed_errors(lambda c=combined: c.to_dense(length))
            only_typed_errors(lambda c=combined: c.block_layout(length, block_size=2))


@settings(max_examples=60)
@given(arguments, arguments)
@example(sequences=[(HUGE[-1], None)], max_length=0)  # the error's message once failed to print the int itself
def test_pad_and_pack_raise_only_typed_errors(sequences, max_length):
    only_typed_errors(lambda: am.pad(sequences, pad_id=0))
    only_typed_errors(lambda: am.pad([[1, 2], [3]], pad_id=max_length))
    only_typed_errors(lambda: am.pack(sequences, 8))
    only_typed_errors(lambda: am.pack([3, 5, 2], max_length))


tokens = st.sampled_from(
    [
        "causal",
        "full",
        "sliding_window",
        "chunked",
        "prefix_lm",
        "document",
        "key_padding",
        "foo",
        "(",
        ")",
        "[",
        "]",
        ",",
        "&",
        "|",
        "~",
        "=",
        "-",
        "0",
        "3",
        "99999999999",
        "9" * 5000,
        "size",
        "doc_ids",
        "seq_lens",
        "'",
        ".",
    ]
)


@settings(max_examples=200)
@given(st.lists(tokens, max_size=14), st.integers(0, 3), st.sampled_from(["(", "~", "[", "~("]), st.integers(0, 3000))
def test_parse_spec_raises_only_typed_errors(parts, cut, nest, depth):
    text = " ".join(parts)
    only_typed_errors(lambda: am.parse_spec(text))
    only_typed_errors(lambda: am.parse_spec(nest * depth + text[: cut * 4]))


def assert_cli_answers(code, err):
    assert code in (0, 2), err
    if code == 2:
        first = err.splitlines()[0]
        assert first.startswith("attnmask") and "error: " in first, err
    assert "Traceback" not in err


show_args = st.lists(
    st.sampled_from(
        [
            "--q-len",
            "--kv-len",
            "--block-size",
            "--row",
            "--max-cells",
            "--ascii",
            "4",
            "0",
            "-1",
            "x",
            str(10**11),
            "9" * 5000,
            "12",
        ]
    ),
    max_size=6,
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])  # capsys: read each time
@given(st.lists(tokens, min_size=1, max_size=8), show_args)
def test_cli_show_answers_with_exit_0_or_one_error_line(capsys, parts, args):
    code = cli.main(["show", " ".join(parts), "--q-len", "6", *args])
    assert_cli_answers(code, capsys.readouterr().err)


garbage_lines = st.one_of(
    st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
    st.builds(lambda v: json.dumps({"input_ids": v}), json_values),
    st.builds(lambda v: json.dumps({"text": v}), json_values),
    st.builds(lambda v, w: json.dumps({"input_ids": v, "seq_lens": w}), json_values, json_values),
    st.sampled_from(['{"input_ids": [1, ' + "9" * 5000 + "]}", "[" * 5000, '{"input_ids": []}', "null", "7"]),
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(garbage_lines, min_size=0, max_size=4),
    st.sampled_from(["--ids-field", "--text-field"]),
    st.sampled_from(["1", "4", "64", str(2**40), str(10**30)]),
    st.sampled_from(["split", "truncate", "error"]),
)
def test_cli_pack_and_inspect_on_garbage_files(capsys, scratch, lines, field, max_length, overflow):
    src = scratch / "in.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogateescape")
    name = "input_ids" if field == "--ids-field" else "text"
    out = scratch / "out.jsonl"
    for args in (
        ["pack", src, field, name, "--max-length", max_length, "--overflow", overflow, "--out", out, "--skip-bad"],
        ["pack", src, field, name, "--max-length", max_length, "--out", out],
        ["inspect", src],
        ["inspect", out] if out.exists() else ["inspect", scratch / "missing.jsonl"],
    ):
        code = cli.main([str(a) for a in args])
        assert_cli_answers(code, capsys.readouterr().err)


def test_cli_garbage_tokenizer_and_packed_files(capsys, scratch):
    garbage = scratch / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 4)
    (scratch / "t.jsonl").write_text('{"text": "hi"}\n')
    for args in (
        ["pack", scratch / "t.jsonl", "--tokenizer", garbage, "--max-length", "4", "--out", scratch / "o.jsonl"],
        ["pack", garbage, "--max-length", "4", "--out", scratch / "o.jsonl"],
        ["inspect", garbage],
        ["pack", scratch / "t.jsonl", "--max-length", "4", "--out", scratch / "o.parquet.tmp"],
    ):
        code = cli.main([str(a) for a in args])
        assert_cli_answers(code, capsys.readouterr().err)
        assert code == 2
