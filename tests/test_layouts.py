"""Sparse and nested tensors given to the functions that read data: computed exactly or refused with a typed error.

The rule (``attnmask._checks.dense_data`` / ``sequences_data``): a sparse tensor (COO, CSR) given as data (token ids,
lengths, masks, labels, positions, prompt lengths) gives exactly the result of its dense values; a nested tensor
where a list of sequences is expected gives the result of the list of its rows; a nested tensor anywhere else, and a
sparse or nested tensor to compute with (logits, q / k / v), raise a typed error naming the argument.
"""

import warnings

import pytest
import torch

import attnmask as am
from attnmask import distributed, labels, viz
from attnmask.generation import extend_attention_mask

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

t = torch.tensor
IDS = t([[5, 6, 7, 9], [8, 3, 0, 0]])
MASK = t([[1, 1, 1, 1], [1, 1, 0, 0]])
LEFT = t([[1, 1, 1, 1], [0, 0, 1, 1]])
LABELS = t([[5, -100, 7, 9], [8, 3, -100, -100]])
NESTED = "got a nested tensor$"


def _nested(*rows):
    with warnings.catch_warnings():  # torch warns once per process that nested tensors are a prototype
        warnings.simplefilter("ignore", UserWarning)
        return torch.nested.nested_tensor(list(rows))


def _sparse(layout):
    """The function that gives a tensor in ``layout``: COO for any tensor, CSR for 2D ones (COO otherwise)."""
    if layout == "coo":
        return torch.Tensor.to_sparse
    return lambda x: x.to_sparse_csr() if x.dim() == 2 else x.to_sparse()


def _dense(x):
    return x


def _assert_same_batch(got, want):
    for name in ("input_ids", "attention_mask", "position_ids", "labels", "cu_seqlens"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.layout is torch.strided and torch.equal(a, b), name
    assert (got.seq_lens, got.max_seqlen, got.num_truncated_tokens) == (want.seq_lens, want.max_seqlen, 0)
    width = want.input_ids.shape[1]
    assert torch.equal(got.mask.to_dense(width), want.mask.to_dense(width))
    assert got.extras.keys() == want.extras.keys()
    for key, value in want.extras.items():
        assert torch.equal(got.extras[key], value) if isinstance(value, torch.Tensor) else got.extras[key] == value


def _assert_same(got, want):
    """Equal results: tensors (dense and equal), Batches, tuples of them, or anything ``==`` compares."""
    if isinstance(want, am.Batch):
        _assert_same_batch(got, want)
    elif isinstance(want, torch.Tensor):
        assert got.layout is torch.strided and not got.is_nested and torch.equal(got, want)
    elif isinstance(want, (tuple, list)) and want and isinstance(want[0], (torch.Tensor, am.Batch)):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            _assert_same(a, b)
    else:
        assert got == want


# ----------------------------------------------------------------------------------------------------------------------
# The shared helpers


def test_dense_data_returns_dense_inputs_as_they_are_and_sparse_ones_as_their_values():
    from attnmask._checks import dense_data, sequences_data

    x = torch.arange(6).reshape(2, 3)
    assert dense_data("x", x) is x  # no copy on the hot path
    assert dense_data("x", [1, 2]) == [1, 2]
    for sparse in (x.to_sparse(), x.to_sparse_csr()):
        assert torch.equal(dense_data("x", sparse), x)
    with pytest.raises(am.InputError, match=f"^x: expected a dense tensor, {NESTED}"):
        dense_data("x", _nested(t([1, 2]), t([3])))
    rows = sequences_data("x", _nested(t([1, 2]), t([3])))
    assert [r.tolist() for r in rows] == [[1, 2], [3]]
    huge = torch.sparse_coo_tensor(t([[0]]), t([1]), (2**50,), check_invariants=True)
    with pytest.raises(am.InputError, match="^x: expected data that fits in half the memory"):
        dense_data("x", huge)


# ----------------------------------------------------------------------------------------------------------------------
# Sparse data: the same result as its dense values

SPARSE_CASES = {
    "pad rows": lambda s: am.pad([s(t([5, 6, 7])), t([8])], pad_id=0),
    "pad 2D": lambda s: am.pad(s(IDS), pad_id=0, side="left"),
    "pad labels": lambda s: am.pad(IDS, pad_id=0, labels=s(LABELS), prompt_lengths=s(t([1, 2]))),
    "pad label rows": lambda s: am.pad([t([5, 6]), t([7])], pad_id=0, labels=[s(t([5, -100])), s(t([7]))]),
    "pad examples": lambda s: am.pad(
        [
            {"input_ids": s(t([5, 6, 7])), "attention_mask": s(t([1, 1, 0])), "labels": s(t([5, 6, 7]))},
            {"input_ids": s(t([8, 9])), "attention_mask": s(t([1, 1])), "labels": s(t([-100, 9]))},
        ],
        pad_id=0,
    ),
    "pad hints": lambda s: am.pad(
        [
            {"input_ids": s(t([5, 6, 7])), "assistant_masks": s(t([0, 1, 1])), "prompt_length": s(t(1))},
            {"input_ids": t([8, 9]), "assistant_masks": s(t([1, 1])), "prompt_length": t(0)},
        ],
        pad_id=0,
    ),
    "pad columns": lambda s: am.pad({"input_ids": s(IDS), "attention_mask": s(MASK)}, pad_id=0),
    "Collator": lambda s: am.Collator(pad_id=0, side="left")([s(t([5, 6, 7])), s(t([8]))]),
    "Collator 2D": lambda s: am.Collator(pad_id=0)(s(IDS)),
    "Batch": lambda s: am.Batch(s(IDS), s(MASK), s(MASK), s(LABELS), am.causal(), cu_seqlens=s(t([0, 4, 6]))),
    "position_ids_from_mask": lambda s: am.position_ids_from_mask(s(LEFT)),
    "extend_attention_mask": lambda s: extend_attention_mask(s(LEFT), 2),
    "left_pad_prompts": lambda s: am.left_pad_prompts([s(t([5, 6, 7])), s(t([8]))], pad_id=0),
    "left_pad_prompts 2D": lambda s: am.left_pad_prompts(s(IDS), pad_id=1),
    "masked_cross_entropy": lambda s: am.masked_cross_entropy(
        torch.linspace(-2, 2, 2 * 4 * 10).reshape(2, 4, 10), s(t([[5, 1, 7, 9], [8, 3, -100, -100]])), s(t(5))
    ),
    "count_target_tokens": lambda s: am.count_target_tokens(s(LABELS)),
    "count_target_tokens list": lambda s: am.count_target_tokens([s(LABELS), s(LABELS[:1])]),
    "global_num_items": lambda s: distributed.global_num_items(s(LABELS)),
    "labels_from_input_ids": lambda s: labels.labels_from_input_ids(s(IDS), s(MASK)),
    "mask_padding": lambda s: labels.mask_padding(s(LABELS), s(MASK.bool())),
    "mask_spans": lambda s: labels.mask_spans(s(IDS), s(t([0, 1])), s(t([1, 0])), s(t([2, 1]))),
    "mask_document_starts": lambda s: labels.mask_document_starts(s(IDS), s(t([0, 1])), s(t([2, 1]))),
    "span_mask": lambda s: torch.from_numpy(labels.span_mask((2, 4), s(t([1])), s(t([1])), s(t([2])))),
    "pack": lambda s: am.pack(s(t([5, 3, 6, 2])), 8).bins,
    "collate": lambda s: am.pack([3, 1, 2], 4).collate(
        [s(t([1, 2, 3])), s(t([4])), s(t([5, 6]))],
        pad_id=0,
        labels=[s(t([1, -100, 3])), s(t([4])), s(t([5, 6]))],
        prompt_lengths=s(t([1, 0, 2])),
    ),
    "collate 2D": lambda s: am.pack([4, 4], 8).collate(s(IDS), pad_id=0, labels=s(LABELS)),
    "collate examples": lambda s: am.pack([3, 2], 8).collate(
        [
            {"input_ids": s(t([1, 2, 3])), "attention_mask": s(t([1, 1, 1])), "completion_mask": s(t([0, 1, 1]))},
            {"input_ids": s(t([4, 5])), "attention_mask": s(t([1, 1])), "completion_mask": s(t([1, 1]))},
        ],
        pad_id=0,
    ),
    "collate example labels": lambda s: am.pack([3, 2], 8).collate(
        [{"input_ids": s(t([1, 2, 3])), "labels": s(t([1, -100, 3]))}, {"input_ids": t([4, 5]), "labels": t([4, 5])}],
        pad_id=0,
    ),
    "PackingCollator": lambda s: am.PackingCollator(8, pad_id=0)([s(t([1, 2, 3])), s(t([4, 5]))]),
    "PackingCollator examples": lambda s: am.PackingCollator(8, pad_id=0)(
        [{"input_ids": s(t([1, 2, 3])), "prompt_length": s(t(1))}, {"input_ids": s(t([4, 5])), "prompt_length": 1}]
    ),
    "pack_stream": lambda s: list(am.pack_stream([s(t([1, 2, 3])), s(t([4, 5]))], 4)),
    "pack_stream 2D": lambda s: list(am.pack_stream(s(IDS), 8)),
    "DistributedPackedSampler": lambda s: distributed.DistributedPackedSampler(s(t([6, 5, 4, 3, 2])), 10).stats,
    "DistributedPackedSampler.collate": lambda s: distributed.DistributedPackedSampler([3, 1], 8).collate(
        [[(0, 0, 3), (1, 0, 1)]], [s(t([1, 2, 3])), s(t([4]))], pad_id=0
    ),
    "context_parallel_positions": lambda s: distributed.context_parallel_positions(12, 2, 1, seq_lens=s(t([4, 8]))),
    "shard_for_context_parallel": lambda s: distributed.shard_for_context_parallel(
        s(torch.arange(24).reshape(2, 12)), world_size=2, rank=0, seq_lens=s(t([4, 8]))
    ),
    "draw_mask": lambda s: am.draw_mask(s(torch.ones(5, 5, dtype=torch.bool).tril())),
    "draw_mask rows": lambda s: am.draw_mask(s(torch.ones(2, 5, 5, dtype=torch.bool).tril(-1)), row=1, block=2),
    "mask_tiles": lambda s: viz.mask_tiles(s(torch.ones(5, 5, dtype=torch.bool).tril()), 2),
    "draw_tiles": lambda s: viz.draw_tiles(s(t([[1, 0, 0], [2, 1, 0], [2, 2, 1]], dtype=torch.int8)), 2, 5, 5),
    "ByteTokenizer.decode": lambda s: am.ByteTokenizer().decode(s(t([104, 105, 258]))),
}


@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("case", SPARSE_CASES)
def test_sparse_data_gives_the_result_of_its_dense_values(case, layout):
    make = SPARSE_CASES[case]
    _assert_same(make(_sparse(layout)), make(_dense))


def test_sparse_data_in_png_pictures_gives_the_same_image(tmp_path):
    sparse = _sparse("coo")
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    tiles = viz.mask_tiles(mask, 2)
    lengths = t([1, 4, 4, 9])
    for name, save in {
        "mask": lambda s, path: viz.save_mask_png(s(mask), path, size=(200, 160)),
        "tiles": lambda s, path: viz.save_tiles_png(s(tiles), 2, 6, 6, path, size=(200, 160)),
        "histogram": lambda s, path: viz.save_histogram_png(s(lengths), path, size=(200, 160)),
    }.items():
        got, want = save(sparse, tmp_path / f"{name}-sparse.png"), save(_dense, tmp_path / f"{name}.png")
        assert got.read_bytes() == want.read_bytes(), name


class _Model:
    """A deterministic stand-in for a causal LM: the next token depends on the last token and its position."""

    def __call__(self, input_ids, attention_mask, position_ids, past_key_values, use_cache):
        logits = torch.nn.functional.one_hot((input_ids * 3 + position_ids) % 11, 11).float()
        return type("Out", (), {"logits": logits, "past_key_values": None})()


def test_greedy_generate_reads_sparse_ids_and_masks_as_their_values():
    ids = t([[5, 6, 7, 9], [0, 0, 8, 3]])
    want = am.greedy_generate(_Model(), ids, LEFT, max_new_tokens=3, pad_token_id=0, eos_token_id=t([4, 10]))
    for sparse in (_sparse("coo"), _sparse("csr")):
        got = am.greedy_generate(
            _Model(), sparse(ids), sparse(LEFT), max_new_tokens=3, pad_token_id=0, eos_token_id=t([4, 10]).to_sparse()
        )
        assert torch.equal(got, want)


def test_check_targets_reads_sparse_labels_as_their_values():
    labels.check_targets(LABELS.to_sparse(), allow_empty=False)
    with pytest.raises(am.NoTargetError, match="^labels: expected at least one target"):
        labels.check_targets(torch.full((2, 3), -100).to_sparse_csr(), allow_empty=False)


# ----------------------------------------------------------------------------------------------------------------------
# Nested tensors where a list of sequences is expected: the same result as the list of their rows

ROWS = (t([5, 6, 7]), t([8]), t([9, 4]))
NESTED_CASES = {
    "pad": lambda rows: am.pad(rows, pad_id=0, labels=rows, side="left"),
    "pad columns": lambda rows: am.pad({"input_ids": rows, "labels": rows}, pad_id=0),
    "Collator": lambda rows: am.Collator(pad_id=0)(rows),
    "left_pad_prompts": lambda rows: am.left_pad_prompts(rows, pad_id=0),
    "pack": lambda rows: (am.pack(rows, 4).bins, list(am.pack_stream(rows, 4, buffer_size=2))),
    "collate": lambda rows: am.pack([3, 1, 2], 4).collate(rows, pad_id=0, labels=rows),
    "PackingCollator": lambda rows: am.PackingCollator(4, pad_id=0, strategy="ordered")(rows),
}


@pytest.mark.parametrize("case", NESTED_CASES)
def test_a_nested_tensor_of_sequences_gives_the_result_of_its_rows(case):
    make = NESTED_CASES[case]
    _assert_same(make(_nested(*ROWS)), make(list(ROWS)))


# ----------------------------------------------------------------------------------------------------------------------
# Refusals: a nested tensor that is not a list of sequences, and sparse or nested tensors to compute with

_N2 = lambda: _nested(t([1, 1, 1]), t([0, 1, 1]))  # noqa: E731 - a (2, 3)-like nested mask
_LOGITS = torch.zeros(1, 3, 5)
REFUSED = {
    "pad prompt_lengths": (
        lambda: am.pad([[1, 2], [3]], pad_id=0, prompt_lengths=_nested(t([1]), t([0]))),
        am.InputError,
        "prompt_lengths",
    ),
    "pad example ids": (
        lambda: am.pad([{"input_ids": _nested(t([1, 2]))}], pad_id=0),
        am.InputError,
        "sequences\\[0\\]\\['input_ids'\\]",
    ),
    "pad example labels": (
        lambda: am.pad([{"input_ids": t([1, 2]), "labels": _nested(t([1, 2]))}], pad_id=0),
        am.LabelError,
        "sequences\\[0\\]\\['labels'\\]",
    ),
    "pad example mask hint": (
        lambda: am.pad([{"input_ids": t([1, 2]), "assistant_masks": _nested(t([1, 1]))}], pad_id=0),
        am.LabelError,
        "sequences\\[0\\]\\['assistant_masks'\\]",
    ),
    "Batch": (lambda: am.Batch(_N2(), MASK, MASK, LABELS, am.causal()), am.InputError, "input_ids"),
    "position_ids_from_mask": (lambda: am.position_ids_from_mask(_N2()), am.InputError, "attention_mask"),
    "extend_attention_mask": (lambda: extend_attention_mask(_N2()), am.InputError, "attention_mask"),
    "decode_spec": (lambda: am.decode_spec(_N2()), am.InputError, "attention_mask"),
    "greedy_generate ids": (
        lambda: am.greedy_generate(_Model(), _N2(), max_new_tokens=1, pad_token_id=0),
        am.InputError,
        "input_ids",
    ),
    "greedy_generate mask": (
        lambda: am.greedy_generate(_Model(), IDS[:, :3], _N2(), max_new_tokens=1, pad_token_id=0),
        am.InputError,
        "attention_mask",
    ),
    "masked_cross_entropy labels": (
        lambda: am.masked_cross_entropy(_LOGITS, _nested(t([1, 2, 3]))),
        am.InputError,
        "labels",
    ),
    "masked_cross_entropy num_items": (
        lambda: am.masked_cross_entropy(_LOGITS, t([[1, 2, 3]]), _nested(t([2]))),
        am.InputError,
        "num_items",
    ),
    "count_target_tokens": (lambda: am.count_target_tokens(_N2()), am.InputError, "labels"),
    "labels_from_input_ids": (lambda: labels.labels_from_input_ids(_N2(), MASK[:, :3]), am.InputError, "input_ids"),
    "mask_padding": (lambda: labels.mask_padding(LABELS[:, :3], _N2()), am.InputError, "attention_mask"),
    "mask_spans": (lambda: labels.mask_spans(LABELS, _nested(t([0])), [0], [1]), am.InputError, "rows"),
    "check_targets": (lambda: labels.check_targets(_N2(), allow_empty=False), am.LabelError, "labels"),
    "collate prompt_lengths": (
        lambda: am.pack([1, 2], 4).collate([[1], [2, 3]], pad_id=0, prompt_lengths=_nested(t([1]), t([0]))),
        am.InputError,
        "prompt_lengths",
    ),
    "collate sequence": (
        lambda: am.pack([1], 4).collate([_nested(t([1]))], pad_id=0),
        am.InputError,
        "sequences\\[0\\]",
    ),
    "PackingCollator example attention_mask": (
        lambda: am.PackingCollator(4, pad_id=0)([{"input_ids": [1, 2], "attention_mask": _nested(t([1, 1]))}]),
        am.InputError,
        "examples\\[0\\]\\['attention_mask'\\]",
    ),
    "pack_stream sequence": (
        lambda: list(am.pack_stream([_nested(t([1, 2]))], 4)),
        am.InputError,
        "sequence 0 of the stream",
    ),
    "DistributedPackedSampler": (
        lambda: distributed.DistributedPackedSampler(_nested(t([3]), t([4])), 8),
        am.InputError,
        "lengths",
    ),
    "context_parallel_positions": (
        lambda: distributed.context_parallel_positions(8, 2, 0, seq_lens=_nested(t([4]), t([4]))),
        am.InputError,
        "seq_lens",
    ),
    "shard_for_context_parallel": (
        lambda: distributed.shard_for_context_parallel(_N2(), world_size=2, rank=0),
        am.InputError,
        "x",
    ),
    "draw_mask": (lambda: am.draw_mask(_nested(torch.ones(2, 2, dtype=torch.bool))), am.SpecError, "mask"),
    "draw_tiles": (lambda: viz.draw_tiles(_nested(t([2, 0], dtype=torch.int8)), 2, 4, 4), am.InputError, "tiles"),
    "draw_histogram": (lambda: viz.draw_histogram(_nested(t([1, 2]), t([3]))), am.InputError, "lengths"),
    "ByteTokenizer.decode": (lambda: am.ByteTokenizer().decode(_nested(t([104]))), am.InputError, "ids"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_nested_tensor_that_is_not_a_list_of_sequences_is_refused(case):
    call, error, argument = REFUSED[case]
    with pytest.raises(error, match=f"^{argument}: expected a dense tensor, {NESTED}"):
        call()


@pytest.mark.parametrize("layout", ["sparse", "nested"])
def test_masked_cross_entropy_refuses_sparse_and_nested_logits(layout):
    logits = torch.randn(2, 3, 5)
    given = logits.to_sparse() if layout == "sparse" else _nested(*logits.unbind(0))
    got = "layout torch.sparse_coo" if layout == "sparse" else "a nested tensor"
    with pytest.raises(am.InputError, match=f"^logits: expected a dense \\(strided\\) tensor, got {got}$"):
        am.masked_cross_entropy(given, t([[1, -100, 2], [3, 4, -100]]))


@pytest.mark.parametrize("argument", ["q_local", "k_local", "v_local"])
@pytest.mark.parametrize("method", ["all_gather", "ring", "flex"])
def test_context_parallel_attention_refuses_sparse_and_nested_inputs(argument, method):
    x = torch.randn(1, 2, 4, 8)
    for given, got in ((x.to_sparse(), "layout torch.sparse_coo"), (_nested(*x.unbind(0)), "a nested tensor")):
        args = {"q_local": x, "k_local": x, "v_local": x, argument: given}
        with pytest.raises(am.InputError, match=f"^{argument}: expected a dense \\(strided\\) tensor, got {got}$"):
            distributed.context_parallel_attention(**args, spec=am.causal(), seq_len=4, method=method)


def test_sparse_or_nested_tells_tensors_of_every_layout_and_plain_values_apart():
    from attnmask._checks import dense_items, sparse_or_nested

    dense = torch.arange(4)
    plain = [
        [1, 2],
        (3,),
        5,
        None,
        "ids",
        {"a": 1},
        range(3),
        dense.numpy(),
        dense,
        dense[::2],
        torch.nn.Parameter(dense.float()),
    ]
    assert not any(sparse_or_nested(x) for x in plain)
    assert all(sparse_or_nested(x) for x in (dense.to_sparse(), _nested(dense, dense[:2])))
    assert dense_items(plain, str) is plain  # nothing to read: the same list, no name built
    got = dense_items([dense, dense.to_sparse()], lambda j: f"seqs[{j}]")
    assert torch.equal(got[1], dense) and got[1].layout is torch.strided and got[0] is dense
    with pytest.raises(am.InputError, match=r"^seqs\[1\]: expected a dense tensor, got a nested tensor"):
        dense_items([dense, _nested(dense)], lambda j: f"seqs[{j}]")
