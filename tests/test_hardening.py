"""Regression tests for issue 14's defects 7-10 and the typed errors of the mask constructors.

Each test states the behaviour and checks it against an independent reference (the written definition per element,
a naive O(n^2) best fit) or, for refusals, that the error is a typed ``AttnmaskError`` naming the argument.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnmask as am
from attnmask import _dense
from attnmask.expr import MAX_INT, MAX_LENGTH, MAX_NESTING, parse_spec
from attnmask.masks import MAX_DEPTH
from tests.helpers import CPU_BACKENDS, attention_or_skip
from tests.naive import naive_attention

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------------
# Defect 7: key_padding does not look at query positions


@st.composite
def decoder_longer_than_encoder(draw):
    batch = draw(st.integers(1, 3))
    kv_len = draw(st.integers(1, 8))
    q_len = draw(st.integers(kv_len + 1, 3 * kv_len + 2))
    mask = torch.tensor([[draw(st.integers(0, 1)) for _ in range(kv_len)] for _ in range(batch)])
    q_positions = torch.tensor(draw(st.lists(st.integers(0, 100), min_size=q_len, max_size=q_len)))
    return mask, q_positions


@given(decoder_longer_than_encoder())
def test_key_padding_accepts_queries_past_the_padded_keys(case):
    mask, q_positions = case
    (batch, kv_len), q_len = mask.shape, len(q_positions)
    dense = am.key_padding(mask).to_dense(q_len, kv_len, q_positions=q_positions)
    expected = torch.stack([mask[b].bool().expand(q_len, kv_len) for b in range(batch)])  # allowed[b, q, k] = m[b, k]
    assert torch.equal(dense, expected)
    causal = (am.causal() & am.key_padding(mask)).to_dense(q_len, kv_len, q_positions=q_positions)
    by_definition = expected & (torch.arange(kv_len)[None, None, :] <= q_positions[None, :, None])
    assert torch.equal(causal, by_definition)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cross_attention_of_a_longer_decoder_matches_the_naive_definition(backend):
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    q, k, v = torch.randn(2, 2, 11, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    out = attention_or_skip(q, k, v, am.key_padding(mask), backend, q_positions=torch.arange(11))
    expected = naive_attention(q, k, v, mask.bool()[:, None, None, :])
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_document_still_checks_query_positions():
    with pytest.raises(am.SpecError, match="q_positions"):
        am.document(seq_lens=[3, 2]).to_dense(6, 5, q_positions=torch.arange(6))


# ----------------------------------------------------------------------------------------------------------------------
# Defect 8: best-fit decreasing in memory O(sequences), the same plans as a naive best fit


def naive_best_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Items by decreasing size (ties in input order), each into the row with the least free space that still fits
    (ties: the row that has had that free space longest), else a new row. Rows of item indices. O(n^2)."""
    rows: list[list[int]] = []
    free: list[int] = []
    since: list[int] = []  # the step at which each row reached its current free space
    for step, i in enumerate(sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))):
        fits = [r for r in range(len(rows)) if free[r] >= sizes[i]]
        if fits:
            r = min(fits, key=lambda r: (free[r], since[r]))
        else:
            rows.append([])
            free.append(capacity)
            since.append(step)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= sizes[i]
        since[r] = step
    return rows


@given(st.lists(st.integers(0, 40), max_size=60), st.integers(1, 24))
def test_best_fit_decreasing_equals_a_naive_best_fit(lengths, max_length):
    plan = am.pack(lengths, max_length)
    pieces = [(i, a, min(a + max_length, n)) for i, n in enumerate(lengths) for a in range(0, n, max_length)]
    rows = naive_best_fit_decreasing([b - a for _, a, b in pieces], max_length)
    assert plan.bins == [[pieces[j] for j in row] for row in rows]


@pytest.mark.parametrize("strategy", ["bfd", "ffd", "wrapped", "ordered"])
def test_pack_with_a_huge_max_length_uses_one_row(strategy):
    plan = am.pack([5, 7, 3], 2**40, strategy=strategy)
    assert plan.row_offsets.tolist() == [0, 3] and plan.stats.rows == 1


def test_pack_refuses_a_max_length_beyond_int64():
    with pytest.raises(am.InputError, match="max_length"):
        am.pack([5], 10**30)


def test_cli_pack_with_max_length_2_to_the_40_runs_in_bounded_memory(tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text('{"input_ids": [1, 2, 3]}\n')
    limit = 6 * 2**30  # address space: torch needs a few GiB of it; a list per capacity slot needs terabytes
    code = (
        f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}));"
        "from attnmask.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    args = [str(data), "--ids-field", "input_ids", "--max-length", str(2**40), "--out", str(tmp_path / "o.jsonl")]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run([sys.executable, "-c", code, "pack", *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    too_big = subprocess.run(
        [sys.executable, "-c", code, "pack", *args[:-3], str(10**30), "--out", str(tmp_path / "p.jsonl")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert too_big.returncode == 2 and too_big.stderr.count("\n") == 1 and "--max-length" in too_big.stderr


# ----------------------------------------------------------------------------------------------------------------------
# Defect 9: & over n parts is linear; expression limits


def test_fold_combines_n_parts_with_few_shape_comparisons(monkeypatch):
    calls = []
    real = torch.broadcast_shapes
    monkeypatch.setattr(_dense.torch, "broadcast_shapes", lambda *s: calls.append(s) or real(*s))
    torch.manual_seed(0)
    shapes = [(1, 8, 8), (3, 1, 8), (1, 1, 8)]
    parts = [torch.rand(shapes[i % 3]) > 0.2 for i in range(600)]
    out = _dense.fold(torch.logical_and, parts)
    expected = parts[0]
    for p in parts[1:]:
        expected = expected & p
    assert torch.equal(out, expected)
    assert len(calls) <= 10  # pairs among the 3 distinct shapes, not among 600 parts


def test_an_and_of_many_parts_equals_its_definition():
    spec = parse_spec(" & ".join(["causal", "sliding_window(5)", "chunked(4)"] * 300))
    assert len(spec.parts) == 900
    q, k = torch.arange(12)[:, None], torch.arange(12)[None, :]
    expected = (k <= q) & (q - k < 5) & (q // 4 == k // 4)
    assert torch.equal(spec.to_dense(12)[0], expected)


@pytest.mark.parametrize(
    "text, message",
    [
        ("causal & " * (MAX_LENGTH // 9 + 1) + "causal", "longer than the limit"),
        ("(" * (MAX_NESTING + 1) + "causal" + ")" * (MAX_NESTING + 1), "nested deeper"),
        ("~" * 5000 + "causal", "nested deeper"),
        ("document(" + "[" * 5000 + "1" + "]" * 5000 + ")", "nested deeper"),
        ("sliding_window(" + "9" * 5000 + ")", "digits is larger than the limit"),
        (f"chunked({MAX_INT + 1})", "larger than the limit"),
    ],
)
def test_expressions_past_the_limits_are_refused(text, message):
    with pytest.raises(am.ExprError, match=message):
        parse_spec(text)


def test_specs_nested_past_the_depth_limit_are_refused():
    spec = am.causal()
    with pytest.raises(am.SpecError, match="levels of nested"):
        for i in range(2 * MAX_DEPTH):
            spec = ~(spec & am.sliding_window(3)) if i % 2 else spec | am.chunked(2)


# ----------------------------------------------------------------------------------------------------------------------
# Defect 10: one row of per-row data broadcasts over B rows; B against C rows is refused when combined


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_row_of_padding_broadcasts_over_three_documents_rows(backend):
    pad = torch.tensor([[1, 1, 1, 1, 1, 0]])
    rows = [[2, 3], [5], [1, 3, 1]]
    spec = am.key_padding(pad) & am.document(seq_lens=rows, length=6)
    ids = torch.tensor([[d for d, n in enumerate(r) for _ in range(n)] + [-1] for r in rows])
    allowed = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0) & pad.bool()[:, None, :]
    assert spec.batch_size == 3 and torch.equal(spec.to_dense(6), allowed)
    torch.manual_seed(0)
    q = torch.randn(3, 2, 6, 4)
    out = attention_or_skip(q, q, q, spec, backend)
    torch.testing.assert_close(out.double(), naive_attention(q, q, q, allowed[:, None]), atol=1e-5, rtol=1e-5)


def test_one_row_broadcasts_inside_nested_specs():
    spec = ~(am.prefix_lm(2) | am.key_padding([[1, 0, 1]])) & am.chunked(2, offsets=[0, 1])
    q, k = torch.arange(3)[:, None], torch.arange(3)[None, :]
    inner = (k <= q) | (k < 2) | torch.tensor([True, False, True])
    expected = torch.stack([~inner & ((q - off) // 2 == (k - off) // 2) for off in (0, 1)])
    assert torch.equal(spec.to_dense(3), expected)


def test_two_rows_against_three_rows_is_refused_when_combined():
    with pytest.raises(am.ShapeError, match=r"\[2, 3\] rows"):
        am.key_padding(torch.ones(2, 6)) & am.document(seq_lens=[[6], [6], [6]])
    with pytest.raises(am.ExprError, match="rows"):
        parse_spec("key_padding([[1, 1], [1, 1]]) | document([[1, 1], [2], [2]])")


# ----------------------------------------------------------------------------------------------------------------------
# Huge or wrong-typed values: typed errors naming the argument


@pytest.mark.parametrize(
    "build, argument",
    [
        (lambda: am.sliding_window(10**30), "window"),
        (lambda: am.sliding_window(2.0), "window"),
        (lambda: am.chunked(10**30), "size"),
        (lambda: am.chunked(4, offsets=[2**63 - 1]), "offsets"),
        (lambda: am.prefix_lm(10**30), "prefix_lens"),
        (lambda: am.prefix_lm("3"), "prefix_lens"),
        (lambda: am.document(seq_lens=[10**30]), "seq_lens"),
        (lambda: am.document(seq_lens=[2**45]), "seq_lens"),
        (lambda: am.document(seq_lens=[[2, 1], 3]), "seq_lens"),
        (lambda: am.document(seq_lens=[2, 1], length=2.5), "length"),
        (lambda: am.document(seq_lens=[2, 1], length="9"), "length"),
        (lambda: am.document(doc_ids="0011"), "doc_ids"),
        (lambda: am.document(doc_ids=[[0, 1], [0]]), "doc_ids"),
        (lambda: am.document(doc_ids=[10**30]), "doc_ids"),
        (lambda: am.key_padding("1100"), "attention_mask"),
        (lambda: am.key_padding([[1, 1], [1]]), "attention_mask"),
        (lambda: am.key_padding([[1, 1, 10**30]]), "attention_mask"),
    ],
)
def test_huge_or_wrong_typed_values_give_typed_errors(build, argument):
    with pytest.raises(am.AttnmaskError, match=f"^{argument}: expected"):
        build()


def test_ragged_token_lists_are_refused_with_a_typed_error():
    with pytest.raises(am.InputError, match=r"sequences\[0\].*flat sequence of integer token ids"):
        am.pad([[1, [2, 3]], [4]], pad_id=0)


def test_a_spec_with_zero_rows_of_data_is_refused_when_laid_out():
    spec = am.causal() & am.key_padding(torch.ones(0, 5, dtype=torch.bool))
    with pytest.raises(am.SpecError, match="0 rows"):
        spec.block_layout(5, block_size=2)


# ----------------------------------------------------------------------------------------------------------------------
# Tensors that are not dense and strided


def _nested(*rows):
    with warnings.catch_warnings():  # torch warns once per process that nested tensors are a prototype
        warnings.simplefilter("ignore", UserWarning)
        return torch.nested.nested_tensor(list(rows))


@pytest.mark.parametrize("argument", ["q", "k", "v", "mask", "sinks"])
@pytest.mark.parametrize("layout", ["sparse", "nested"])
def test_attention_refuses_sparse_and_nested_inputs_with_a_typed_error(argument, layout):
    q = torch.randn(1, 2, 6, 4)
    args = {"q": q, "k": q, "v": q, "mask": torch.ones(6, 6, dtype=torch.bool).tril(), "sinks": torch.zeros(2)}
    given = args[argument]
    args[argument] = given.to_sparse() if layout == "sparse" else _nested(*given.unbind(0))
    with pytest.raises(am.InputError, match=f"^{argument}: expected a dense \\(strided\\) tensor, got"):
        am.attention(args["q"], args["k"], args["v"], args["mask"], sinks=args["sinks"])


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("sparse", [torch.Tensor.to_sparse, torch.Tensor.to_sparse_csr])
def test_sparse_spec_data_is_read_as_its_dense_values(sparse):
    """Document ids, padding masks, prefix lengths, lengths and positions given as sparse tensors mean their values:
    the same output as the dense spec, on every backend ``auto`` may pick."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, 8, generator=gen) for _ in range(3))
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, -1, -1, -1], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, -1]])
    pad = torch.ones(2, 12, dtype=torch.long)
    pad[1, :4] = 0
    pairs = [
        (lambda t: am.causal() & am.document(doc_ids=t), ids),
        (lambda t: am.causal() & am.key_padding(t), pad),
        (lambda t: am.prefix_lm(t), torch.tensor([3, 5])),
        (lambda t: am.causal() & am.document(seq_lens=t, length=12), torch.tensor([4, 5, 3])),
        (lambda t: am.causal() & am.key_filter(t, [7]), torch.randint(0, 9, (2, 12), generator=gen)),
    ]
    for make, data in pairs:
        given = sparse(data) if data.dim() == 2 or sparse is torch.Tensor.to_sparse else data.to_sparse()
        got = am.attention(q, k, v, make(given))
        want = naive_attention(q.double(), k.double(), v.double(), make(data).to_dense(12).unsqueeze(1))
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    positions = torch.arange(12)
    got = am.attention(q, k, v, am.causal(), q_positions=positions.to_sparse(), kv_positions=positions.to_sparse())
    torch.testing.assert_close(got, am.attention(q, k, v, am.causal()), atol=1e-6, rtol=1e-6)


def test_nested_spec_data_is_refused_with_a_typed_error():
    ids = _nested(torch.tensor([0, 0, 1]), torch.tensor([0, 1]))
    with pytest.raises(am.SpecError, match="^doc_ids: expected a dense tensor.*got a nested tensor"):
        am.document(doc_ids=ids)
    with pytest.raises(am.SpecError, match="^attention_mask: expected a dense tensor.*got a nested tensor"):
        am.key_padding(ids)
    with pytest.raises(am.SpecError, match="^input_ids: expected a dense tensor.*got a nested tensor"):
        am.key_filter(ids, [0])


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: am.greedy_generate(None, [[1, 2]], max_new_tokens=1, pad_token_id=0), "^input_ids: expected a"),
        (
            lambda: am.greedy_generate(
                None, torch.ones(1, 2, dtype=torch.long), [[1, 1]], max_new_tokens=1, pad_token_id=0
            ),
            "^attention_mask: expected None or a",
        ),
        (lambda: _eos(2.5), "^eos_token_id: expected None, a token id"),
        (lambda: _eos("2"), "^eos_token_id: expected None, a token id"),
        (lambda: _eos([1, -1]), "^eos_token_id: expected an int >= 0, got -1"),
        (lambda: am.viz.draw_histogram(torch.ones(2, 3)), r"^lengths: expected a flat sequence.*shape \(2, 3\)"),
        (lambda: am.viz.draw_histogram(5), "^lengths: expected a flat sequence of integer lengths, got 5"),
    ],
)
def test_generation_and_histogram_arguments_of_the_wrong_kind_give_typed_errors(build, message):
    with pytest.raises(am.InputError, match=message):
        build()


def _eos(eos_token_id):
    from attnmask.generation import _eos_tensor

    return _eos_tensor(eos_token_id, torch.device("cpu"))


@pytest.mark.parametrize("eos", [3, torch.tensor(3), np.int64(3), [3, 5], torch.tensor([3, 5]), (3,), np.array(3)])
def test_eos_token_id_is_read_from_ints_tensors_and_arrays(eos):
    want = [3, 5] if len(np.atleast_1d(np.asarray(eos))) == 2 else [3]
    assert _eos(eos).tolist() == want
