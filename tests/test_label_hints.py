"""One label convention: every collator turns the hints ``labels``, ``assistant_masks``, ``completion_mask`` and
``prompt_length(s)`` into the same labels (a token is a target unless a hint excludes it), checked against labels
computed by hand, against TRL's own label building and collator, and with typed errors for conflicts, missing hints
and steps without a target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnmask as am
from attnmask.integrations.hf import DataCollatorForCausalLM

MAX_LENGTH = 16


def naive_labels(ex: dict) -> list[int]:
    """The convention, token by token: the label (or id) where every hint allows it, else -100."""
    ids = list(ex["input_ids"])
    base = list(ex.get("labels", ids))
    prompt = ex.get("prompt_length", ex.get("prompt_lengths", 0))
    out = []
    for t, value in enumerate(base):
        trained = t >= prompt and value != -100
        trained &= all(int(ex[k][t]) == 1 for k in ("assistant_masks", "completion_mask") if k in ex)
        out.append(value if trained else -100)
    return out


def padded_rows(batch: am.Batch, lengths: list[int], side: str = "right") -> list[list[int]]:
    width = batch.labels.shape[1]
    return [
        batch.labels[i, :n].tolist() if side == "right" else batch.labels[i, width - n :].tolist()
        for i, n in enumerate(lengths)
    ]


def packed_documents(batch: am.Batch) -> dict[int, list[int]]:
    """Labels of every document of a packed batch, keyed by the input example it came from."""
    index = batch.extras["sequence_index"].tolist()
    out, k = {}, 0
    for r, lens in enumerate(batch.seq_lens):
        col = 0
        for n in lens:
            out[index[k]] = batch.labels[r, col : col + n].tolist()
            col, k = col + n, k + 1
    return out


def labels_of(out) -> torch.Tensor:
    return out["labels"] if isinstance(out, dict) else out.labels


def first_token_ignored(labels: list[int]) -> list[int]:
    return [-100, *labels[1:]]


def every_collator(examples: list[dict]) -> dict[str, list[list[int]]]:
    """Per-example labels from each entry point (packed ones with their own boundary rule still applied)."""
    lengths = [len(ex["input_ids"]) for ex in examples]
    n = len(examples)
    packed = {
        "PackPlan.collate": am.pack(lengths, MAX_LENGTH).collate(examples, pad_id=0),
        "PackingCollator": am.PackingCollator(MAX_LENGTH, pad_id=0, allow_empty=True)(examples),
        "PackingCollator padding_free": am.PackingCollator(MAX_LENGTH, pad_id=0, padding_free=True, allow_empty=True)(
            examples
        ),
        "DataCollatorForCausalLM packed": DataCollatorForCausalLM(
            pad_id=0, packing=True, max_length=MAX_LENGTH, return_batch=True, allow_empty=True
        )(examples),
    }
    out = {name: [packed_documents(b)[i] for i in range(n)] for name, b in packed.items()}
    out["pad"] = padded_rows(am.pad(examples, pad_id=0), lengths)
    out["pad left"] = padded_rows(am.pad(examples, pad_id=0, side="left"), lengths, "left")
    out["Collator"] = padded_rows(am.Collator(pad_id=0, allow_empty=True)(examples), lengths)
    hf_padded = DataCollatorForCausalLM(pad_id=0, allow_empty=True)(examples)
    out["DataCollatorForCausalLM"] = [hf_padded["labels"][i, :m].tolist() for i, m in enumerate(lengths)]
    return out


PACKED = ("PackPlan.collate", "PackingCollator", "PackingCollator padding_free", "DataCollatorForCausalLM packed")


def assert_every_collator_gives(examples: list[dict], want: list[list[int]]) -> None:
    for name, got in every_collator(examples).items():
        expected = [first_token_ignored(w) for w in want] if name in PACKED else want
        assert got == expected, name


# ----------------------------------------------------------------------------------------------------------------------
# Hand-computed labels


def test_assistant_masks_keep_exactly_the_assistant_tokens_in_every_collator():
    examples = [
        {"input_ids": [5, 6, 7, 8, 9], "assistant_masks": [0, 0, 1, 1, 1]},
        {"input_ids": [11, 12, 13], "assistant_masks": [0, 1, 1]},
    ]
    assert_every_collator_gives(examples, [[-100, -100, 7, 8, 9], [-100, 12, 13]])


def test_completion_mask_and_prompt_lengths_mask_the_prompt_in_every_collator():
    by_mask = [
        {"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1]},
        {"input_ids": [9, 10], "completion_mask": [0, 1]},
    ]
    by_length = [{"input_ids": [5, 6, 7, 8], "prompt_lengths": 2}, {"input_ids": [9, 10], "prompt_lengths": 1}]
    for examples in (by_mask, by_length):
        assert_every_collator_gives(examples, [[-100, -100, 7, 8], [-100, 10]])


def test_hints_intersect_whatever_their_order():
    ex = {
        "input_ids": [5, 6, 7, 8, 9, 10],
        "labels": [5, 6, 7, -100, 9, 10],  # a token the user excluded by hand
        "assistant_masks": [0, 1, 1, 1, 1, 0],
        "completion_mask": [1, 1, 1, 1, 1, 1],
        "prompt_length": 2,
    }
    assert_every_collator_gives([ex, dict(reversed(ex.items()))], [[-100, -100, 7, -100, 9, -100]] * 2)


def test_assistant_masks_of_a_padded_example_follow_its_real_tokens():
    ex = {"input_ids": [0, 0, 5, 6, 7], "attention_mask": [0, 0, 1, 1, 1], "assistant_masks": [1, 1, 0, 1, 1]}
    assert am.pad([ex], pad_id=0).labels.tolist() == [[-100, 6, 7]]


def test_pad_id_equal_to_eos_keeps_the_eos_label_under_an_assistant_mask():
    eos = 2
    ex = {"input_ids": [7, 8, eos], "assistant_masks": [0, 1, 1]}
    batch = am.pad([ex, {"input_ids": [9], "assistant_masks": [1]}], pad_id=eos)
    assert batch.labels.tolist() == [[-100, 8, eos], [9, -100, -100]]


def _kind(values, kind):
    return {"list": list, "numpy": np.asarray, "tensor": torch.tensor}[kind](values)


@st.composite
def examples_with_hints(draw):
    hints = draw(st.sets(st.sampled_from(["labels", "assistant_masks", "completion_mask", "prompt_length"])))
    both_prompt_keys = "prompt_length" in hints and draw(st.booleans())
    kind = draw(st.sampled_from(["list", "numpy", "tensor"]))
    examples = []
    for _ in range(draw(st.integers(1, 5))):
        n = draw(st.integers(1, 8))
        ids = draw(st.lists(st.integers(1, 99), min_size=n, max_size=n))
        ex = {"input_ids": _kind(ids, kind)}
        bits = st.lists(st.integers(0, 1), min_size=n, max_size=n)
        if "labels" in hints:
            keep = draw(bits)
            ex["labels"] = _kind([t if k else -100 for t, k in zip(ids, keep, strict=True)], kind)
        for key in ("assistant_masks", "completion_mask"):
            if key in hints:
                ex[key] = _kind(draw(bits), kind)
        if "prompt_length" in hints:
            ex["prompt_length"] = draw(st.integers(0, n))
            if both_prompt_keys:
                ex["prompt_lengths"] = ex["prompt_length"]
        examples.append(ex)
    return examples


@settings(max_examples=40, deadline=None)
@given(examples_with_hints())
def test_every_collator_gives_the_hand_computed_labels(examples):
    plain = [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in ex.items()} for ex in examples]
    assert_every_collator_gives(examples, [naive_labels(ex) for ex in plain])


# ----------------------------------------------------------------------------------------------------------------------
# TRL, the peer


def trl_labels(examples: list[dict], *, packing: bool) -> list[list[int]]:
    """Per-example labels from TRL's own pipeline: its SFT dataset preparation (which folds ``assistant_masks`` and
    ``completion_mask`` into labels, with ``completion_only_loss=True``) and its ``DataCollatorForLanguageModeling``
    (``padding_free=True`` for packed rows, where it sets -100 on every document's first token)."""
    datasets = pytest.importorskip("datasets")
    sft = pytest.importorskip("trl.trainer.sft_trainer")
    datasets.disable_progress_bars()
    from types import SimpleNamespace

    trainer = SimpleNamespace(completion_only_loss=True, chat_template=None, _tokenizer=None)
    args = SimpleNamespace(
        dataset_num_proc=None,
        max_length=MAX_LENGTH if packing else None,
        truncation_mode="keep_start",
        packing_strategy="bfd",
        shuffle_dataset=False,
        seed=0,
        dataset_text_field="text",
        assistant_only_loss=False,
    )
    columns = {k: [ex[k] for ex in examples] for k in examples[0]}
    prepared = sft.SFTTrainer._prepare_dataset(
        trainer, datasets.Dataset.from_dict(columns), None, args, packing, None, "train"
    )
    out = sft.DataCollatorForLanguageModeling(pad_token_id=0, padding_free=packing)(list(prepared))
    if not packing:
        return [out["labels"][i, : len(ex["input_ids"])].tolist() for i, ex in enumerate(examples)]
    ids, labels, cu = out["input_ids"][0].tolist(), out["labels"][0].tolist(), out["cu_seq_lens_q"].tolist()
    docs = {tuple(ids[a:b]): labels[a:b] for a, b in zip(cu[:-1], cu[1:], strict=True)}
    return [docs[tuple(ex["input_ids"])] for ex in examples]


TRL_EXAMPLES = [
    {"input_ids": [5, 6, 7, 8], "assistant_masks": [0, 1, 1, 1], "completion_mask": [0, 0, 1, 1]},
    {"input_ids": [9, 10, 11], "assistant_masks": [0, 0, 1], "completion_mask": [0, 1, 1]},
    {"input_ids": [12, 13, 14, 15, 16], "assistant_masks": [1, 1, 0, 1, 1], "completion_mask": [1, 1, 1, 1, 1]},
    {
        "input_ids": [17, 18, 19, 20, 21, 22, 23],
        "assistant_masks": [0, 0, 0, 1, 1, 0, 1],
        "completion_mask": [0] * 3 + [1] * 4,
    },
]


def test_padded_labels_equal_trls_from_the_same_masks():
    ours = every_collator(TRL_EXAMPLES)
    theirs = trl_labels(TRL_EXAMPLES, packing=False)
    for name in ("pad", "Collator", "DataCollatorForCausalLM"):
        assert ours[name] == theirs, name
    assert any(label != -100 for row in theirs for label in row)


def test_packed_labels_equal_trls_padding_free_packing_from_the_same_masks():
    ours = every_collator(TRL_EXAMPLES)
    theirs = trl_labels(TRL_EXAMPLES, packing=True)
    for name in PACKED:
        assert ours[name] == theirs, name


# ----------------------------------------------------------------------------------------------------------------------
# Conflicts, missing hints and empty steps


@pytest.mark.parametrize(
    ("examples", "kwargs", "error", "match"),
    [
        ([{"input_ids": [1, 2, 3], "prompt_length": 1, "prompt_lengths": 2}], {}, am.LabelError, "one prompt length"),
        (
            [{"input_ids": [1, 2], "assistant_masks": [1, 2]}],
            {},
            am.LabelError,
            r"'assistant_masks'\]: expected values 0",
        ),
        ([{"input_ids": [1, 2], "completion_mask": [1.0, 0.0]}], {}, am.LabelError, "expected 0/1 integers"),
        (
            [{"input_ids": [1, 2], "completion_mask": [1]}],
            {},
            am.ShapeError,
            r"'completion_mask'\]: expected 2 entries",
        ),
        (
            [{"input_ids": [1, 2], "prompt_length": 3}],
            {},
            am.LabelError,
            r"'prompt_length'\]: expected an int in \[0, 2\]",
        ),
        ([{"input_ids": [1, 2], "prompt_length": 1.0}], {}, am.LabelError, r"'prompt_length'\]: expected an int"),
        ([{"input_ids": [1, 2], "assistant_masks": [1, 1]}, {"input_ids": [3]}], {}, am.InputError, "in every example"),
    ],
)
def test_unusable_hints_raise_a_typed_error_in_every_collator(examples, kwargs, error, match):
    collators = [
        lambda ex: am.pad(ex, pad_id=0),
        am.Collator(pad_id=0),
        am.PackingCollator(MAX_LENGTH, pad_id=0),
        DataCollatorForCausalLM(pad_id=0),
        DataCollatorForCausalLM(pad_id=0, packing=True, max_length=MAX_LENGTH),
    ]
    for collate in collators:
        with pytest.raises(error, match=match):
            collate(examples, **kwargs)


def test_a_labels_argument_next_to_hints_in_the_examples_is_refused():
    examples = [{"input_ids": [1, 2], "assistant_masks": [0, 1]}]
    with pytest.raises(am.LabelError, match="^labels: expected None when the example dicts carry label hints"):
        am.pad(examples, pad_id=0, labels=[[1, 2]])
    with pytest.raises(am.LabelError, match="^labels, prompt_lengths: expected None when sequences are example"):
        am.pack([2], 4).collate(examples, pad_id=0, prompt_lengths=[1])


@pytest.mark.parametrize(
    "collate",
    [
        am.Collator(pad_id=0, completion_only=True),
        am.PackingCollator(MAX_LENGTH, pad_id=0, completion_only=True),
        DataCollatorForCausalLM(pad_id=0, completion_only=True),
        DataCollatorForCausalLM(pad_id=0, packing=True, max_length=MAX_LENGTH, completion_only=True),
    ],
)
def test_completion_only_without_a_prompt_hint_names_the_keys_looked_for_and_found(collate):
    examples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "prompt": "hi"}]
    with pytest.raises(am.LabelError) as info:
        collate(examples)
    message = str(info.value)
    for looked in ("assistant_masks", "completion_mask", "prompt_length", "prompt_lengths"):
        assert repr(looked) in message
    assert "keys ['input_ids', 'labels', 'prompt']" in message
    with pytest.raises(am.LabelError, match="completion_only=True"):
        collate([[1, 2, 3]])
    out = collate([{"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1]}])
    assert sorted(set(labels_of(out).flatten().tolist())) == [-100, 2, 3]


@pytest.mark.parametrize(
    ("make", "examples"),
    [
        (lambda **kw: am.Collator(pad_id=0, **kw), [{"input_ids": [1, 2], "prompt_length": 2}]),
        (lambda **kw: am.PackingCollator(8, pad_id=0, **kw), [{"input_ids": [1, 2, 3], "assistant_masks": [1, 0, 0]}]),
        (lambda **kw: am.PackingCollator(8, pad_id=0, **kw), [[7], [8]]),  # first tokens of documents only
        (lambda **kw: DataCollatorForCausalLM(pad_id=0, **kw), [{"input_ids": [1, 2], "completion_mask": [1, 0]}]),
        (
            lambda **kw: DataCollatorForCausalLM(pad_id=0, packing=True, max_length=8, **kw),
            [{"input_ids": [1, 2], "labels": [1, -100]}],
        ),
    ],
)
def test_a_batch_with_no_target_raises_unless_allowed(make, examples):
    with pytest.raises(am.NoTargetError, match="^labels: expected at least one target token in the batch"):
        make()(examples)
    assert int(am.count_target_tokens(labels_of(make(allow_empty=True)(examples)))) == 0


def test_an_examples_own_padding_is_stripped_by_padding_and_refused_by_packing():
    ex = {"input_ids": [0, 5, 6, 7], "attention_mask": [0, 1, 1, 1], "completion_mask": [1, 0, 1, 1]}
    assert DataCollatorForCausalLM(pad_id=0)([ex])["labels"].tolist() == [[-100, 6, 7]]
    assert am.Collator(pad_id=0)([ex]).labels.tolist() == [[-100, 6, 7]]
    packers = [am.PackingCollator(8, pad_id=0), DataCollatorForCausalLM(pad_id=0, packing=True, max_length=8)]
    for collate in packers:
        with pytest.raises(am.InputError, match=r"^examples\[0\]\['attention_mask'\]: expected all 1"):
            collate([ex])
        unpadded = {**ex, "attention_mask": [1, 1, 1, 1]}
        assert labels_of(collate([unpadded])).tolist()[0][:4] == [-100, -100, 6, 7]
