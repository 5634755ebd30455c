"""`pad` and `Collator`: every field equals a naive per-row Python reference; input forms, truncation, errors."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnmask as am
from attnmask import batch as batch_module
from attnmask.labels import mask_document_starts, mask_spans, span_mask
from attnmask.lowering import varlen_args

IGNORE = -100


# ---------------------------------------------------------------------------------------------------------------------
# The reference: one Python loop per row and per token, written from the definitions in the docstring of `pad`.


def naive_pad(seqs, pad_id, side="right", multiple=None, max_length=None, truncation_side="right", labels=None,
              prompts=None):  # fmt: skip
    kept_ids, kept_labels, cut = [], [], 0
    for i, seq in enumerate(seqs):
        seq = [int(t) for t in seq]
        lab = [int(t) for t in labels[i]] if labels is not None else list(seq)
        prompt = prompts[i] if prompts is not None else 0
        lab = [IGNORE if j < prompt else t for j, t in enumerate(lab)]
        keep = list(range(len(seq)))
        if max_length is not None and len(seq) > max_length:
            keep = keep[:max_length] if truncation_side == "right" else keep[len(seq) - max_length :]
            cut += len(seq) - max_length
        kept_ids.append([seq[j] for j in keep])
        kept_labels.append([lab[j] for j in keep])
    longest = max(len(s) for s in kept_ids)
    length = longest
    while multiple is not None and length % multiple:
        length += 1
    out = {k: [] for k in ("input_ids", "attention_mask", "position_ids", "labels")}
    for seq, lab in zip(kept_ids, kept_labels, strict=True):
        n_pad = length - len(seq)
        left = n_pad if side == "left" else 0
        right = n_pad - left
        out["input_ids"].append([pad_id] * left + seq + [pad_id] * right)
        out["attention_mask"].append([0] * left + [1] * len(seq) + [0] * right)
        out["labels"].append([IGNORE] * left + lab + [IGNORE] * right)
        positions, seen = [], 0
        for m in out["attention_mask"][-1]:
            positions.append(seen if m else 0)
            seen += m
        out["position_ids"].append(positions)
    out = {k: torch.tensor(v, dtype=torch.long).reshape(len(seqs), length) for k, v in out.items()}
    out["seq_lens"] = tuple((len(s),) if s else () for s in kept_ids)
    out["num_truncated_tokens"] = cut
    return out


def naive_causal_padding_mask(attention_mask):
    B, L = attention_mask.shape
    return torch.tensor(
        [[[k <= q and bool(attention_mask[b, k]) for k in range(L)] for q in range(L)] for b in range(B)],
        dtype=torch.bool,
    ).reshape(B, L, L)


# ---------------------------------------------------------------------------------------------------------------------
# Strategies

token_lists = st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=12), min_size=1, max_size=5).filter(
    lambda seqs: any(seqs)
)


@st.composite
def pad_case(draw):
    seqs = draw(token_lists)
    options = {
        "pad_id": draw(st.integers(0, 9)),  # often equal to a real id: the pad == eos case
        "side": draw(st.sampled_from(["left", "right"])),
        "multiple": draw(st.none() | st.integers(1, 5)),
        "max_length": draw(st.none() | st.integers(1, 12)),
        "truncation_side": draw(st.sampled_from(["left", "right"])),
    }
    if draw(st.booleans()):
        options["labels"] = [[draw(st.sampled_from([IGNORE, 1, 2])) for _ in s] for s in seqs]
    if draw(st.booleans()):
        options["prompts"] = [draw(st.integers(0, len(s))) for s in seqs]
    return seqs, options


def call_pad(seqs, o):
    return am.pad(
        seqs,
        pad_id=o["pad_id"],
        side=o["side"],
        pad_to_multiple_of=o["multiple"],
        max_length=o["max_length"],
        truncation=o["max_length"] is not None,
        truncation_side=o["truncation_side"],
        labels=o.get("labels"),
        prompt_lengths=o.get("prompts"),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Properties against the reference


@given(pad_case())
def test_every_field_equals_the_naive_per_row_reference(case):
    seqs, o = case
    batch = call_pad(seqs, o)
    ref = naive_pad(seqs, o["pad_id"], o["side"], o["multiple"], o["max_length"], o["truncation_side"],
                    o.get("labels"), o.get("prompts"))  # fmt: skip
    for key in ("input_ids", "attention_mask", "position_ids", "labels"):
        assert getattr(batch, key).dtype == torch.int64
        assert torch.equal(getattr(batch, key), ref[key]), key
    assert batch.seq_lens == ref["seq_lens"]
    assert batch.num_truncated_tokens == ref["num_truncated_tokens"]


@given(pad_case())
def test_position_ids_are_cumsum_of_the_mask_minus_one_with_zero_on_padding(case):
    seqs, o = case
    batch = call_pad(seqs, o)
    m = batch.attention_mask
    assert torch.equal(batch.position_ids, ((m.cumsum(-1) - 1) * m))


@given(pad_case())
def test_cu_seqlens_index_the_real_tokens_of_the_flattened_batch(case):
    seqs, o = case
    batch = call_pad(seqs, o)
    flat = batch.input_ids[batch.attention_mask.bool()]
    rows = [i for i, lens in enumerate(batch.seq_lens) if lens]
    cu = batch.cu_seqlens
    assert cu.dtype == torch.int32 and cu.shape == (len(rows) + 1,)
    assert batch.max_seqlen == max(n for (n,) in filter(None, batch.seq_lens))
    for j, i in enumerate(rows):
        assert torch.equal(flat[cu[j] : cu[j + 1]], batch.input_ids[i][batch.attention_mask[i].bool()])


@given(pad_case())
def test_cu_seqlens_equal_the_varlen_lowering_of_the_mask(case):
    seqs, o = case
    batch = call_pad(seqs, o)
    args = varlen_args(batch.mask, batch.shape[1])
    assert torch.equal(batch.cu_seqlens, args.cu_seqlens_q) and batch.max_seqlen == args.max_seqlen_q


@given(pad_case())
def test_mask_is_causal_and_key_padding_of_the_attention_mask(case):
    seqs, o = case
    batch = call_pad(seqs, o)
    L = batch.shape[1]
    assert torch.equal(batch.mask.to_dense(L), naive_causal_padding_mask(batch.attention_mask))


@given(pad_case())
def test_torch_value_path_for_accelerator_inputs_equals_the_numpy_path(case):
    # On an accelerator the ids stay tensors on their device (_concat returns a tensor); force that branch on the CPU.
    seqs, o = case
    expected = call_pad(seqs, o)
    numpy_concat = batch_module._concat
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batch_module, "_concat", lambda rows, device: torch.from_numpy(numpy_concat(rows, device)))
        batch = call_pad(seqs, o)
    for key in ("input_ids", "attention_mask", "position_ids", "labels"):
        assert torch.equal(getattr(batch, key), getattr(expected, key)), key


# ---------------------------------------------------------------------------------------------------------------------
# Specific behaviours


def test_pad_equal_to_eos_keeps_real_eos_labels():
    eos = 2
    batch = am.pad([[5, 6, eos], [7, eos]], pad_id=eos)
    assert batch.labels.tolist() == [[5, 6, eos], [7, eos, IGNORE]]
    left = am.pad([[5, 6, eos], [7, eos]], pad_id=eos, side="left")
    assert left.labels.tolist() == [[5, 6, eos], [IGNORE, 7, eos]]


def test_prompt_tokens_get_ignored_labels_and_the_completion_keeps_them():
    batch = am.pad([[1, 2, 3, 4], [5, 6]], pad_id=0, side="left", prompt_lengths=[3, 1])
    assert batch.labels.tolist() == [[IGNORE, IGNORE, IGNORE, 4], [IGNORE, IGNORE, IGNORE, 6]]


def test_pad_to_multiple_of_never_adds_a_block_when_the_length_divides():
    assert am.pad([[1] * 8, [1] * 3], pad_id=0, pad_to_multiple_of=8).shape == (2, 8)
    assert am.pad([[1] * 9, [1] * 3], pad_id=0, pad_to_multiple_of=8).shape == (2, 16)


def test_longer_sequence_without_truncation_is_an_error_naming_count_and_longest():
    with pytest.raises(am.InputError, match=r"max_length: .*got 2 longer sequence\(s\), the longest 7 tokens"):
        am.pad([[1] * 7, [1] * 6, [1] * 3], pad_id=0, max_length=5)


def test_truncation_is_side_aware_and_counted():
    right = am.pad([[1, 2, 3, 4, 5], [6]], pad_id=0, max_length=3, truncation=True)
    left = am.pad([[1, 2, 3, 4, 5], [6]], pad_id=0, max_length=3, truncation=True, truncation_side="left")
    assert right.input_ids[0].tolist() == [1, 2, 3] and left.input_ids[0].tolist() == [3, 4, 5]
    assert right.num_truncated_tokens == left.num_truncated_tokens == 2


def test_zero_length_sequence_gives_an_all_padding_row():
    batch = am.pad([[4, 5], []], pad_id=0)
    assert batch.attention_mask.tolist() == [[1, 1], [0, 0]]
    assert batch.labels[1].tolist() == [IGNORE, IGNORE]
    assert batch.seq_lens == ((2,), ()) and batch.cu_seqlens.tolist() == [0, 2]


def _forms(seqs):
    return {
        "lists": seqs,
        "tuples": [tuple(s) for s in seqs],
        "numpy": [np.array(s, dtype=np.int32) for s in seqs],
        "tensors": [torch.tensor(s) for s in seqs],
        "mixed": [seqs[0], np.array(seqs[1]), torch.tensor(seqs[2])],
        "dicts": [{"input_ids": s} for s in seqs],
        "dicts with all-ones masks": [{"input_ids": s, "attention_mask": [1] * len(s)} for s in seqs],
        "columns": {"input_ids": seqs},
    }


@pytest.mark.parametrize("form", list(_forms([[1]] * 3)))
def test_every_input_form_gives_the_same_batch(form):
    seqs = [[3, 4, 5], [6], [7, 8]]
    expected = am.pad(seqs, pad_id=0, side="left")
    batch = am.pad(_forms(seqs)[form], pad_id=0, side="left")
    for key in ("input_ids", "attention_mask", "position_ids", "labels"):
        assert torch.equal(getattr(batch, key), getattr(expected, key)), key


def test_a_2d_tensor_is_read_as_rows_without_padding():
    batch = am.pad(torch.tensor([[1, 2], [3, 4]]), pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2], [3, 4]] and batch.num_tokens == 4


def test_example_labels_are_padded_with_ignore_index():
    batch = am.pad([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}], pad_id=0)
    assert batch.labels.tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]


def test_example_attention_mask_zeros_are_dropped_before_repadding():
    ex = [{"input_ids": [9, 9, 5, 6], "attention_mask": [0, 0, 1, 1]}, {"input_ids": [7], "attention_mask": [1]}]
    batch = am.pad(ex, pad_id=9)
    assert batch.input_ids.tolist() == [[5, 6], [7, 9]]
    assert batch.attention_mask.tolist() == [[1, 1], [1, 0]]


def test_example_prompt_length_key_masks_the_prompt():
    batch = am.pad([{"input_ids": [1, 2, 3], "prompt_length": 2}, {"input_ids": [4, 5], "prompt_length": 0}], pad_id=0)
    assert batch.labels.tolist() == [[IGNORE, IGNORE, 3], [4, 5, IGNORE]]


def test_unknown_example_keys_come_back_in_extras():
    batch = am.pad([{"input_ids": [1], "id": "a"}, {"input_ids": [2], "id": "b"}], pad_id=0)
    assert batch.extras == {"id": ["a", "b"]}


def test_batch_to_moves_every_tensor_and_the_mask_spec():
    batch = am.pad([[1, 2], [3]], pad_id=0).to("meta")
    assert {t.device.type for t in (batch.input_ids, batch.labels, batch.position_ids, batch.cu_seqlens)} == {"meta"}
    assert batch.mask.device.type == "meta"


def test_explicit_device_places_every_tensor_there():
    batch = am.pad([torch.tensor([1, 2]), [3]], pad_id=0, device="cpu")
    assert batch.input_ids.device.type == "cpu" and batch.mask.device.type == "cpu"


def test_collator_pads_examples_from_a_dataloader():
    data = [{"input_ids": list(range(1, n + 1))} for n in (3, 1, 2, 5)]
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=am.Collator(pad_id=0, pad_to_multiple_of=4))
    shapes = [b.shape for b in loader]
    assert shapes == [(2, 4), (2, 8)]


def test_collator_return_dict_gives_model_inputs():
    out = am.Collator(pad_id=0, return_dict=True)([[1, 2], [3]])
    assert sorted(out) == ["attention_mask", "input_ids", "labels", "position_ids"]


# ---------------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("sequences", "kwargs", "match"),
    [
        ([], {}, r"sequences: expected at least one sequence"),
        ([[1, -3]], {}, r"sequences\[0\]: expected token ids >= 0, got a negative id -3"),
        ([[1], [2.5]], {}, r"sequences\[1\]: expected integer token ids, got dtype float64"),
        ([torch.tensor([1.0])], {}, r"sequences\[0\]: expected integer token ids, got dtype torch.float32"),
        (["hello"], {}, r"sequences\[0\]: expected integer token ids \(tokenize text first\)"),
        ([[[1, 2]]], {}, r"sequences\[0\]: expected a 1D sequence"),
        ("hello", {}, r"sequences: expected a list of token sequences"),
        ([[1]], {"side": "middle"}, r"side: expected 'left' or 'right', got 'middle'"),
        ([[1]], {"pad_id": -1}, r"pad_id: expected an int >= 0, got -1"),
        ([[1]], {"pad_to_multiple_of": 0}, r"pad_to_multiple_of: expected an int >= 1"),
        ([[1]], {"truncation": True}, r"max_length: expected an int when truncation=True"),
        ([[1, 2]], {"prompt_lengths": [3]}, r"prompt_lengths\[0\]: expected at most the sequence length \(2\)"),
        ([[1, 2]], {"prompt_lengths": [1, 1]}, r"prompt_lengths: expected one per sequence \(1\), got 2"),
        ([[1, 2]], {"labels": [[1]]}, r"labels\[0\]: expected 2 labels like sequences\[0\], got 1"),
        ([[1, 2]], {"labels": [[1, -5]]}, r"labels: expected ids >= 0 or -100"),
        ([{"input_ids": [1]}, {"ids": [1]}], {}, r"sequences\[1\]: expected an example dict with 'input_ids'"),
        ([{"input_ids": [1], "labels": [1]}, {"input_ids": [1]}], {}, r"sequences: expected 'labels' in every"),
        ([{"input_ids": [1, 2], "attention_mask": [1, 2]}], {}, r"attention_mask'\]: expected values 0"),
        ([{"input_ids": [1], "labels": [1]}], {"labels": [[1]]}, r"labels: expected None when the example dicts"),
    ],
)
def test_bad_input_raises_a_typed_error_naming_the_argument(sequences, kwargs, match):
    kwargs = {"pad_id": 0, **kwargs}
    with pytest.raises(am.AttnmaskError, match=match):
        am.pad(sequences, **kwargs)


def test_collator_rejects_bad_options_at_construction():
    with pytest.raises(am.InputError, match="side"):
        am.Collator(pad_id=0, side="up")


# ---------------------------------------------------------------------------------------------------------------------
# Label helpers


@given(st.integers(1, 4), st.integers(0, 10), st.data())
def test_span_mask_equals_a_per_span_loop(rows, length, data):
    spans = data.draw(st.lists(st.tuples(st.integers(0, rows - 1), st.integers(0, length)), max_size=6))
    spans = [(r, s, data.draw(st.integers(0, length - s))) for r, s in spans]
    expected = np.zeros((rows, length), dtype=bool)
    for r, s, n in spans:
        expected[r, s : s + n] = True
    got = span_mask((rows, length), [r for r, _, _ in spans], [s for _, s, _ in spans], [n for _, _, n in spans])
    assert np.array_equal(got, expected)


def test_mask_spans_and_document_starts_set_ignore_index_by_position():
    labels = torch.tensor([[1, 2, 3, 4, 5]])
    assert mask_spans(labels, [0], [1], [2]).tolist() == [[1, IGNORE, IGNORE, 4, 5]]
    assert mask_document_starts(labels, [0, 0], [0, 3]).tolist() == [[IGNORE, 2, 3, IGNORE, 5]]


def test_span_outside_the_row_is_an_error():
    with pytest.raises(am.InputError, match=r"starts \+ lengths: expected values in \[0, 5\]"):
        span_mask((1, 5), [0], [4], [2])
