"""`attnmask.chat.encode_chat`: assistant-only labels from stock chat templates (no generation tags).

The reference is transformers itself: each family's template (tests/chat_templates.py) also exists with
``{% generation %}`` tags around what an assistant turn should train, and ``apply_chat_template(...,
return_assistant_tokens_mask=True)`` on that copy gives the mask attnmask must reproduce from the stock copy.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnmask._spans import IGNORE_INDEX
from attnmask.chat import chat_char_spans, encode_chat
from attnmask.errors import ChatTemplateError, InputError
from tests.chat_templates import FAMILIES, chat_tokenizer, template

pytest.importorskip("transformers")

SYSTEM = "You answer briefly."
TURNS = [
    ("What is two plus two?", "Two plus two is four."),
    ("And the capital of France?", "Paris. 🙂"),
    ("Thanks!", "You are welcome."),
]
# How each family renders an assistant content and its end of turn (the trained characters).
END = {
    "chatml": lambda c: c + "<|im_end|>",
    "qwen3": lambda c: c + "<|im_end|>",
    "tools": lambda c: c + "<|im_end|>",
    "llama3": lambda c: c.strip() + "<|eot_id|>",
    "llama2": lambda c: c.strip() + " </s>",
    "mistral": lambda c: c + "</s>",
    "gemma": lambda c: c.strip() + "<end_of_turn>",
    "phi3": lambda c: c + "<|end|>",
    "zephyr": lambda c: c + "</s>",
}


def conversation(turns=TURNS, system=SYSTEM):
    messages = [{"role": "system", "content": system}] if system is not None else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def runs(ids, mask, tok) -> list[str]:
    """The decoded text of each maximal run of tokens where ``mask`` is set."""
    ids, mask = np.asarray(ids), np.asarray(mask).astype(bool)
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(np.int8), 0]))
    return [tok.decode(ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def reference(family, conv, **kwargs):
    """transformers' input ids and assistant mask from the copy of the template with generation tags."""
    out = chat_tokenizer(family, tags=True).apply_chat_template(
        conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
    )
    return out["input_ids"], out["assistant_masks"]


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_tokens_are_assistant_contents_and_their_end_of_turn(family):
    tok = chat_tokenizer(family)
    enc = encode_chat(tok, [conversation()])
    labels = np.asarray(enc.labels[0])
    trained = labels != IGNORE_INDEX
    assert runs(enc.input_ids[0], trained, tok) == [END[family](a) for _, a in TURNS]
    assert np.array_equal(labels[trained], np.asarray(enc.input_ids[0])[trained])
    assert enc.assistant_masks[0] == trained.astype(int).tolist()
    assert enc.stats.trained_tokens == trained.sum() and enc.stats.untrained == ()


@pytest.mark.parametrize("family", FAMILIES)
def test_equals_return_assistant_tokens_mask_of_the_tagged_template(family):
    convs = [conversation(), conversation(TURNS[:1], system=None), conversation(TURNS[1:], system="  spaced  ")]
    enc = encode_chat(chat_tokenizer(family), convs)
    for k, conv in enumerate(convs):
        ids, mask = reference(family, conv)
        assert enc.input_ids[k] == ids
        assert enc.assistant_masks[k] == mask


def test_a_template_with_generation_tags_is_followed_as_transformers_follows_it(caplog):
    tok = chat_tokenizer("chatml", tags=True)
    tok.chat_template = tok.chat_template.replace("{% endgeneration %}{{- '\\n' }}", "{{- '\\n' }}{% endgeneration %}")
    tok.chat_template = tok.chat_template.replace("message.content + '<|im_end|>' }}", "message.content }}")
    tok.chat_template = tok.chat_template.replace(
        "{{- '\\n' }}{% endgeneration %}", "{% endgeneration %}{{- '<|im_end|>\\n' }}"
    )
    assert "{% endgeneration %}{{- '<|im_end|>" in tok.chat_template  # tags now leave <|im_end|> out
    conv = conversation()
    with caplog.at_level(logging.WARNING, logger="attnmask"):
        enc = encode_chat(tok, [conv])
    out = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert enc.input_ids[0] == out["input_ids"] and enc.assistant_masks[0] == out["assistant_masks"]
    assert runs(enc.input_ids[0], np.asarray(enc.labels[0]) != IGNORE_INDEX, tok)[0] == "Two plus two is four."
    assert "may not learn to stop" in caplog.text


def test_qwen3_reasoning_is_trained_where_rendered_and_the_empty_think_block_is_not():
    tok = chat_tokenizer("qwen3")
    conv = conversation([("Q1?", "<think>\nearly thought\n</think>\n\nA1."), ("Q2?", "A2.")])
    enc = encode_chat(tok, [conv], return_texts=True)
    assert "early thought" not in enc.texts[0]  # Qwen3 drops the reasoning of turns before the last question
    assert "<think>\n\n</think>\n\nA2." in enc.texts[0]  # and inserts an empty block in the last turn
    assert runs(enc.input_ids[0], np.asarray(enc.labels[0]) != IGNORE_INDEX, tok) == ["A1.<|im_end|>", "A2.<|im_end|>"]
    conv = conversation([("Q1?", "A1."), ("Q2?", "<think>\nlast thought\n</think>\n\nA2.")])
    enc = encode_chat(tok, [conv])
    got = runs(enc.input_ids[0], np.asarray(enc.labels[0]) != IGNORE_INDEX, tok)
    assert got == ["A1.<|im_end|>", "<think>\nlast thought\n</think>\n\nA2.<|im_end|>"]
    assert enc.assistant_masks[0] == reference("qwen3", conv)[1]


def test_tool_calls_and_tool_responses():
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    conv = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "It is 4."},
    ]
    tok = chat_tokenizer("tools")
    enc = encode_chat(tok, [conv], tools=tools)
    got = runs(enc.input_ids[0], np.asarray(enc.labels[0]) != IGNORE_INDEX, tok)
    tool_call = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>'
    assert got == [tool_call, "Let me check.\n" + tool_call, "It is 4.<|im_end|>"]
    assert enc.assistant_masks[0] == reference("tools", conv, tools=tools)[1]


@pytest.mark.parametrize(
    ("train_on", "expected"),
    [
        ("assistant", ["Two plus two is four.<|im_end|>", "Paris. 🙂<|im_end|>", "You are welcome.<|im_end|>"]),
        ("last", ["You are welcome.<|im_end|>"]),
    ],
)
def test_train_on_every_or_the_last_assistant_turn(train_on, expected):
    tok = chat_tokenizer("chatml")
    enc = encode_chat(tok, [conversation()], train_on=train_on)
    assert runs(enc.input_ids[0], np.asarray(enc.labels[0]) != IGNORE_INDEX, tok) == expected
    assert sum(enc.assistant_masks[0]) > sum(np.asarray(enc.labels[0]) != IGNORE_INDEX) or train_on == "assistant"


def test_train_on_all_and_per_message_flags():
    tok = chat_tokenizer("chatml")
    enc = encode_chat(tok, [conversation()], train_on="all")
    assert enc.labels[0] == enc.input_ids[0]
    conv = conversation()
    conv[2]["train"] = False  # first assistant turn not trained
    conv[3]["train"] = True  # a user turn trained
    enc = encode_chat(tok, [conv])
    got = runs(enc.input_ids[0], np.asarray(enc.labels[0]) != IGNORE_INDEX, tok)
    assert got == ["And the capital of France?<|im_end|>", "Paris. 🙂<|im_end|>", "You are welcome.<|im_end|>"]


def test_overflow_is_refused_dropped_truncated_or_split_at_turn_boundaries_and_counted(caplog):
    tok = chat_tokenizer("chatml")
    convs = [conversation(), conversation(TURNS[:1])]
    full = encode_chat(tok, convs)
    n0, n1 = (len(r) for r in full.input_ids)
    ends = [int(e) + 1 for e in np.flatnonzero(np.diff(np.r_[np.asarray(full.assistant_masks[0]), 0]) == -1)]
    limit = ends[1] + 1  # fits two of the three exchanges of conversation 0
    assert n1 <= limit < n0
    with pytest.raises(InputError, match=r"conversations\[0\].*max_length"):
        encode_chat(tok, convs, max_length=limit)
    with caplog.at_level(logging.WARNING, logger="attnmask"):
        dropped = encode_chat(tok, convs, max_length=limit, overflow="drop")
    assert dropped.source == [1] and dropped.stats.dropped == (0,) and dropped.stats.cut_tokens == n0
    assert "dropped 1" in caplog.text
    truncated = encode_chat(tok, convs, max_length=limit, overflow="truncate")
    assert truncated.input_ids[0] == full.input_ids[0][: ends[1]] and truncated.stats.truncated == (0,)
    assert truncated.stats.cut_tokens == n0 - ends[1]
    split = encode_chat(tok, convs, max_length=limit, overflow="split")
    assert split.source == [0, 0, 1] and split.stats.split == (0,) and split.stats.cut_tokens == 0
    assert split.input_ids[0] + split.input_ids[1] == full.input_ids[0]
    assert split.labels[0] + split.labels[1] == full.labels[0]


def test_conversation_without_trained_tokens_is_counted_and_reported(caplog):
    tok = chat_tokenizer("chatml")
    with caplog.at_level(logging.WARNING, logger="attnmask"):
        enc = encode_chat(tok, [conversation(), [{"role": "user", "content": "anyone?"}]])
    assert enc.stats.untrained == (1,) and set(enc.labels[1]) == {IGNORE_INDEX}
    assert "untrained 1" in caplog.text


def test_template_that_transforms_contents_is_refused_naming_the_message():
    tok = chat_tokenizer("chatml")
    upper = "message.content | upper + '<|im_end|>' }}"
    tok.chat_template = template("chatml").replace("message.content + '<|im_end|>' }}", upper)
    with pytest.raises(ChatTemplateError, match=r"conversations\[1\]\[2\].*transformed"):
        encode_chat(tok, [conversation([("a", "OK")]), conversation()])


def test_template_that_raises_is_refused_naming_the_conversation():
    tok = chat_tokenizer("chatml")
    tok.chat_template = template("chatml").replace(
        "{%- for message in messages %}",
        "{%- if messages|length > 4 %}{{ raise_exception('too long') }}{%- endif %}{%- for message in messages %}",
    )
    with pytest.raises(ChatTemplateError, match=r"conversations\[1\]: the chat template raised: too long"):
        encode_chat(tok, [conversation(TURNS[:1]), conversation()])


def test_template_without_end_of_turn_is_refused():
    tok = chat_tokenizer("chatml")
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    with pytest.raises(ChatTemplateError, match="end_of_turn"):
        encode_chat(tok, [conversation()])


def test_multimodal_content_is_refused():
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    with pytest.raises(InputError, match=r"conversations\[0\]\[0\]\['content'\].*multimodal"):
        encode_chat(chat_tokenizer("chatml"), [conv])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"train_on": "user"}, "train_on"), ({"overflow": "wrap"}, "overflow"), ({"max_length": 0}, "max_length")],
)
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(InputError, match=match):
        encode_chat(chat_tokenizer("chatml"), [conversation()], **kwargs)


def test_char_spans_name_the_trained_characters():
    text, spans = chat_char_spans(chat_tokenizer("chatml"), conversation(TURNS[:1]))
    assert [(j, text[a:b], role) for j, a, b, role in spans] == [(2, "Two plus two is four.<|im_end|>", "assistant")]


# ----------------------------------------------------------------------------------------------------------------------
# Property: random conversations never put a label on a character outside an assistant turn

MARKER_TEXT = [
    "<|im_end|>",
    "<|im_start|>assistant\n",
    "<|eot_id|>",
    "</s>",
    "[INST]",
    "<end_of_turn>",
    "</think>",
    "<think>",
    "<|end|>",
    "<|assistant|>\n",
    "{{ x }}",
    " ",
    "\n",
    "",
]
contents = st.lists(
    st.one_of(st.text(st.characters(blacklist_categories=("Cs", "Co")), max_size=12), st.sampled_from(MARKER_TEXT)),
    max_size=4,
).map("".join)


@st.composite
def conversations(draw):
    turns = draw(st.lists(st.tuples(contents, contents), min_size=1, max_size=8))
    system = draw(st.one_of(st.none(), contents))
    return conversation(turns, system=system)


def reference_char_spans(family, conv):
    from transformers.utils.chat_template_utils import render_jinja_template

    tok = chat_tokenizer(family, tags=True)
    texts, spans = render_jinja_template(
        conversations=[conv],
        chat_template=tok.chat_template,
        return_assistant_tokens_mask=True,
        **tok.special_tokens_map,
    )
    return texts[0], spans[0]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(FAMILIES), conv=conversations())
def test_random_conversations_label_only_assistant_characters(family, conv):
    tagged = encode_chat(chat_tokenizer(family, tags=True), [conv])  # a template with tags: they decide, exactly
    assert (tagged.input_ids[0], tagged.assistant_masks[0]) == reference(family, conv)
    tok = chat_tokenizer(family)
    try:
        enc = encode_chat(tok, [conv], return_texts=True)
    except ChatTemplateError:
        return  # refused, never a wrong mask
    text, spans = reference_char_spans(family, conv)
    assert enc.texts[0] == text
    inside = np.zeros(len(text) + 1, dtype=bool)
    for a, b in spans:
        inside[a:b] = True
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for (a, b), label in zip(offsets, enc.labels[0], strict=True):
        if label != IGNORE_INDEX:
            assert inside[a : max(b, a + 1)].all(), (text[a:b], text)
    assert enc.assistant_masks[0] == reference(family, conv)[1]


# ----------------------------------------------------------------------------------------------------------------------
# Training: packed chat rows through the transformers Trainer


def _example(name: str, folder: str = "examples"):
    import importlib
    import sys
    from pathlib import Path

    examples_dir = str(Path(__file__).resolve().parents[1] / folder)
    sys.path.insert(0, examples_dir)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(examples_dir)


def test_packed_chat_training_gives_every_conversation_its_loss_alone(tmp_path):
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    chat_sft = _example("chat_sft")
    tok = chat_sft.build_tokenizer()
    enc = encode_chat(tok, chat_sft.conversations(24))
    data = chat_sft.PackedRows(enc, 160, tok.pad_token_id)
    model = chat_sft.tiny_llama(len(tok), tok.pad_token_id)
    eager = AutoModelForCausalLM.from_config(model.config, attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=data.collate)
    batch = next(iter(trainer.get_train_dataloader()))
    labels_of = {tuple(ids): labels for ids, labels in zip(enc.input_ids, enc.labels, strict=True)}
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        token_loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="none"
        ).view(logits.shape[0], -1)
        packed_total, alone_total, targets, seen = 0.0, 0.0, 0, 0
        for r in range(batch["input_ids"].shape[0]):
            pos = batch["position_ids"][r].tolist()
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            for a, b in zip(starts, starts[1:], strict=False):
                ids = tuple(batch["input_ids"][r, a:b].tolist())
                if ids not in labels_of:
                    continue  # padding
                labels = torch.tensor([labels_of[ids]])
                assert batch["labels"][r, a:b].tolist() == labels[0].tolist()  # nothing else trained
                alone = eager(torch.tensor([ids])).logits
                loss_alone = F.cross_entropy(alone[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
                loss_packed = token_loss[r, a : b - 1].sum()
                torch.testing.assert_close(loss_packed, loss_alone, atol=1e-4, rtol=1e-5)
                packed_total, alone_total = packed_total + loss_packed, alone_total + loss_alone
                targets, seen = targets + int((labels[0, 1:] != -100).sum()), seen + 1
        assert seen >= 3
        trainer_loss = trainer.compute_loss(model, batch)
        torch.testing.assert_close(trainer_loss, alone_total / targets, atol=1e-5, rtol=1e-5)
    model.train()
    assert np.isfinite(trainer.train().training_loss)


def test_chat_sft_example_trains_and_lowers_the_loss():
    chat_sft = _example("chat_sft")
    first = chat_sft.main(["--conversations", "32", "--steps", "1", "--max-length", "96"])
    later = chat_sft.main(["--conversations", "32", "--steps", "4", "--max-length", "96"])
    assert later < first


# ----------------------------------------------------------------------------------------------------------------------
# TRL hand-off: a dataset TRL prepared goes through attnmask's collators with no flags


def trl_prepared(convs, *, prompt_completion=False, completion_only_loss=False):
    """``SFTTrainer``'s own dataset preparation (in-process, assistant_only_loss on the tagged ChatML template)."""
    from datasets import Dataset

    tok = chat_tokenizer("chatml", tags=True)
    if prompt_completion:
        ds = Dataset.from_dict({"prompt": [c[:-1] for c in convs], "completion": [c[-1:] for c in convs]})
    else:
        ds = Dataset.from_dict({"messages": convs})
    bench_chat = _example("bench_chat", folder="benchmarks")
    return bench_chat.trl_prepare(
        ds, tok, assistant_only_loss=not prompt_completion, completion_only_loss=completion_only_loss
    )


def collators():
    import attnmask as am
    from attnmask.integrations import hf

    pad_id = chat_tokenizer("chatml").pad_token_id
    return {
        "pad": lambda ex: am.pad(ex, pad_id=pad_id).labels,
        "Collator": lambda ex: am.Collator(pad_id=pad_id)(ex).labels,
        "PackingCollator": lambda ex: am.PackingCollator(512, pad_id=pad_id)(ex).labels,
        "DataCollatorForCausalLM": lambda ex: hf.DataCollatorForCausalLM(pad_id)(ex)["labels"],
        "DataCollatorForCausalLM packed": lambda ex: hf.DataCollatorForCausalLM(pad_id, packing=True, max_length=512)(
            ex
        )["labels"],
    }


def trained_texts(labels, tok) -> list[str]:
    """Decoded runs of trained tokens in a ``(B, L)`` label tensor, row by row."""
    out = []
    for row in labels.tolist():
        row = np.asarray(row)
        out += runs(np.where(row == IGNORE_INDEX, 0, row), row != IGNORE_INDEX, tok)
    return out


CONVS = [conversation(), conversation(TURNS[1:2]), conversation(TURNS[:2], system=None)]


def expected_runs(convs, last_only=False):
    tok = chat_tokenizer("chatml")
    enc = encode_chat(tok, convs, train_on="last" if last_only else "assistant")
    return [
        r for ids, lab in zip(enc.input_ids, enc.labels, strict=True) for r in runs(ids, np.asarray(lab) != -100, tok)
    ]


@pytest.mark.parametrize("collator", list(collators()))
def test_trl_prepared_labels_go_through_every_collator_without_flags(collator):
    pytest.importorskip("trl")
    prepared = trl_prepared(CONVS)
    assert {"input_ids", "labels"} <= set(prepared.column_names)
    examples = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in prepared]
    labels = collators()[collator](examples)
    got = trained_texts(labels, chat_tokenizer("chatml"))
    expected = expected_runs(CONVS)
    if "packed" in collator or collator == "PackingCollator":
        assert sorted(got) == sorted(expected)
    else:
        assert got == expected


@pytest.mark.parametrize("collator", list(collators()))
def test_trl_assistant_masks_column_alone_trains_only_assistant_tokens(collator):
    pytest.importorskip("trl")
    prepared = trl_prepared(CONVS)
    examples = [
        {"input_ids": r["input_ids"], "assistant_masks": [int(x != -100) for x in r["labels"]]} for r in prepared
    ]
    got = trained_texts(collators()[collator](examples), chat_tokenizer("chatml"))
    assert sorted(got) == sorted(expected_runs(CONVS))


@pytest.mark.parametrize("collator", list(collators()))
def test_trl_completion_mask_column_trains_only_the_completion(collator):
    pytest.importorskip("trl")
    prepared = trl_prepared(CONVS, prompt_completion=True)
    assert "completion_mask" in prepared.column_names
    examples = [{"input_ids": r["input_ids"], "completion_mask": r["completion_mask"]} for r in prepared]
    tok = chat_tokenizer("chatml")
    expected = [r for ex in examples for r in runs(ex["input_ids"], ex["completion_mask"], tok)]
    assert expected == [
        END["chatml"](a) + "\n" for a in ("You are welcome.", "Paris. 🙂", "Paris. 🙂")
    ]  # TRL: after the prompt
    got = trained_texts(collators()[collator](examples), tok)
    assert sorted(got) == sorted(expected)


def test_trl_completion_mask_is_everything_after_the_prompt():
    """The reference the test above uses holds (so that test can fail only in the collators)."""
    pytest.importorskip("trl")
    tok = chat_tokenizer("chatml")
    prepared = trl_prepared(CONVS, prompt_completion=True)
    got = [r for ex in prepared for r in runs(ex["input_ids"], ex["completion_mask"], tok)]
    assert got == [END["chatml"](a) + "\n" for a in ("You are welcome.", "Paris. 🙂", "Paris. 🙂")]


# ----------------------------------------------------------------------------------------------------------------------
# Command line: pack --chat and inspect --chat


def test_cli_pack_chat_writes_labels_of_the_assistant_turns_and_inspect_shows_them(tmp_path, capsys):
    import json

    import pyarrow.parquet as pq

    from attnmask.cli import main

    tok = chat_tokenizer("chatml")
    tok.save_pretrained(tmp_path / "tok")
    convs = [conversation(), conversation(TURNS[1:]), conversation(TURNS[:1], system=None)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs), encoding="utf-8")
    out = tmp_path / "packed.parquet"
    args = ["pack", "--chat", "--tokenizer", str(tmp_path / "tok"), str(data), "--max-length", "256", "-o", str(out)]
    assert main(args) == 0
    report = capsys.readouterr().out
    assert "3 -> 3 sequences" in report and "0 dropped" in report
    rows = pq.read_table(out).to_pylist()
    enc = encode_chat(tok, convs)
    found = {}
    for row in rows:
        offset = 0
        for (record, _, _), n in zip(row["segments"], row["seq_lens"], strict=True):
            found[record] = (row["input_ids"][offset : offset + n], row["labels"][offset : offset + n])
            offset += n
    assert [found[k] for k in range(3)] == list(zip(enc.input_ids, enc.labels, strict=True))

    assert (
        main(
            [
                "inspect",
                "--chat",
                "--tokenizer",
                str(tmp_path / "tok"),
                str(data),
                "--row",
                "2",
                "--ascii",
                "--out",
                str(tmp_path / "pics"),
            ]
        )
        == 0
    )
    shown = capsys.readouterr().out
    assert "[[Two plus two is four.<|im_end|>]]" in shown and "[[What" not in shown
    assert (tmp_path / "pics" / "row2-labels.png").stat().st_size > 0
    assert main(["inspect", "--chat", "--tokenizer", str(tmp_path / "tok"), str(out), "--ascii"]) == 0
    assert "[[Paris. 🙂<|im_end|>]]" in capsys.readouterr().out


def test_cli_pack_chat_names_the_line_of_a_bad_record(tmp_path, capsys):
    import json

    from attnmask.cli import main

    chat_tokenizer("chatml").save_pretrained(tmp_path / "tok")
    data = tmp_path / "chat.jsonl"
    bad = [{"role": "user", "content": [{"type": "image"}]}]
    data.write_text(json.dumps({"messages": conversation()}) + "\n" + json.dumps({"messages": bad}) + "\n")
    args = [
        "pack",
        "--chat",
        "--tokenizer",
        str(tmp_path / "tok"),
        str(data),
        "--max-length",
        "256",
        "-o",
        str(tmp_path / "o.jsonl"),
    ]
    assert main(args) == 2
    assert "chat.jsonl:2: message 0['content']" in capsys.readouterr().err
    assert main([*args, "--skip-bad"]) == 0
    assert "1 bad records" in capsys.readouterr().out
