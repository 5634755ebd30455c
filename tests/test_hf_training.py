"""Training with transformers: the drop-in collator and the loss normalised over the optimizer step."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnmask.errors import InputError, ShapeError  # noqa: E402
from attnmask.integrations.hf import DataCollatorForCausalLM, num_items_in_step  # noqa: E402
from attnmask.loss import masked_cross_entropy  # noqa: E402
from tests.hf_models import alone, model, tokens  # noqa: E402

EXAMPLES = [
    {"input_ids": [5, 6, 7, 8, 9], "prompt_lengths": 2},
    {"input_ids": [11, 12, 13], "prompt_lengths": 1},
]


# ----------------------------------------------------------------------------------------------------------------------
# Padding collator


def test_padding_collator_returns_the_model_inputs_of_a_right_padded_batch():
    out = DataCollatorForCausalLM(pad_id=0)(EXAMPLES)
    assert sorted(out) == ["attention_mask", "input_ids", "labels", "position_ids"]
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9], [11, 12, 13, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 0]]
    # the prompt_lengths hint is honoured whether or not completion_only is set (one label convention)
    assert out["labels"].tolist() == [[-100, -100, 7, 8, 9], [-100, 12, 13, -100, -100]]


def test_completion_only_masks_the_prompt_by_length():
    out = DataCollatorForCausalLM(pad_id=0, completion_only=True)(EXAMPLES)
    assert out["labels"].tolist() == [[-100, -100, 7, 8, 9], [-100, 12, 13, -100, -100]]


def test_pad_id_equal_to_eos_keeps_the_real_eos_label():
    eos = 2
    out = DataCollatorForCausalLM(pad_id=eos)([{"input_ids": [7, eos]}, {"input_ids": [8, 9, 10, eos]}])
    assert out["labels"].tolist() == [[7, eos, -100, -100], [8, 9, 10, eos]]


def _chat_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>", "<user>", "<assistant>", "hello", "world", "how", "are", "you", "fine", "thanks"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    t.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<user> {{ m['content'] }} "
        "{% else %}<assistant> {% generation %}{{ m['content'] }} <eos> {% endgeneration %}{% endif %}{% endfor %}"
    )
    return t


def test_completion_only_keeps_exactly_the_assistant_tokens_of_a_chat_template():
    tok = _chat_tokenizer()
    chats = [
        [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "fine thanks"}],
        [
            {"role": "user", "content": "how are you"},
            {"role": "assistant", "content": "fine"},
            {"role": "user", "content": "thanks"},
            {"role": "assistant", "content": "you"},
        ],
    ]
    examples = [
        tok.apply_chat_template(c, tokenize=True, return_dict=True, return_assistant_tokens_mask=True) for c in chats
    ]
    out = DataCollatorForCausalLM(pad_id=tok.pad_token_id, completion_only=True)(examples)
    for r, ex in enumerate(examples):
        kept = [t for t, m in zip(ex["input_ids"], ex["assistant_masks"], strict=True) if m]
        labels = out["labels"][r].tolist()
        assert [t for t in labels if t != -100] == kept
    assert tok.convert_ids_to_tokens([t for t in out["labels"][0].tolist() if t != -100]) == ["fine", "thanks", "<eos>"]


def test_completion_only_without_prompt_information_is_an_error():
    with pytest.raises(InputError, match="assistant_masks"):
        DataCollatorForCausalLM(pad_id=0, completion_only=True)([{"input_ids": [1, 2]}])


def test_assistant_mask_of_the_wrong_length_is_an_error():
    with pytest.raises(ShapeError, match="assistant_masks"):
        DataCollatorForCausalLM(pad_id=0, completion_only=True)([{"input_ids": [1, 2], "assistant_masks": [1]}])


def test_too_long_examples_are_cut_only_on_request_and_counted():
    with pytest.raises(InputError, match="max_length"):
        DataCollatorForCausalLM(pad_id=0, max_length=4)(EXAMPLES)
    collate = DataCollatorForCausalLM(pad_id=0, max_length=4, truncation=True)
    assert collate(EXAMPLES)["input_ids"].shape == (2, 4)
    assert collate.num_truncated_tokens == 1


# ----------------------------------------------------------------------------------------------------------------------
# Loss over the optimizer step


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def _grads(m: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in m.parameters()]


def test_two_micro_batches_with_different_token_counts_give_the_gradients_of_one_batch():
    m = model("llama")
    seqs = [tokens(9, 1), tokens(3, 2), tokens(6, 3)]
    collate = DataCollatorForCausalLM(pad_id=0)
    micro = [collate([{"input_ids": s} for s in seqs[:1]]), collate([{"input_ids": s} for s in seqs[1:]])]
    whole = collate([{"input_ids": s} for s in seqs])
    n = num_items_in_step(micro)
    assert int(n) == 8 + 2 + 5

    m.zero_grad()
    for mb in micro:
        masked_cross_entropy(m(**_inputs(mb)).logits, mb["labels"], num_items=n).backward()
    accumulated = _grads(m)
    m.zero_grad()
    masked_cross_entropy(m(**_inputs(whole)).logits, whole["labels"]).backward()
    one_batch = _grads(m)
    m.zero_grad()
    for mb in micro:  # the usual mistake: a mean per micro-batch, averaged
        (masked_cross_entropy(m(**_inputs(mb)).logits, mb["labels"]) / len(micro)).backward()
    mean_of_means = _grads(m)
    m.zero_grad()

    for a, b in zip(accumulated, one_batch, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert any(not torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(mean_of_means, one_batch, strict=True))


def test_num_items_in_step_accepts_dicts_batches_and_label_tensors():
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    batch = DataCollatorForCausalLM(pad_id=0, return_batch=True)([[4, 5, 6, 7]])
    assert int(num_items_in_step([{"labels": labels}, batch, labels])) == 1 + 3 + 1


# ----------------------------------------------------------------------------------------------------------------------
# Packing collator


def test_packing_collator_restarts_positions_per_document_and_omits_the_attention_mask():
    out = DataCollatorForCausalLM(pad_id=0, packing=True, max_length=8)([[1, 2, 3], [4, 5, 6, 7, 8]])
    assert sorted(out) == ["input_ids", "labels", "position_ids", "use_cache"] and out["use_cache"] is False
    assert out["input_ids"].shape == (1, 8)
    docs = {tuple(out["input_ids"][0, :5].tolist()), tuple(out["input_ids"][0, 5:].tolist())}
    assert docs == {(4, 5, 6, 7, 8), (1, 2, 3)}
    pos = out["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0]
    assert starts == [0, 5]
    assert all(out["labels"][0, s] == -100 for s in starts)


def test_packing_collator_with_completion_only_masks_prompts_inside_every_document():
    out = DataCollatorForCausalLM(pad_id=0, packing=True, max_length=16, completion_only=True)(EXAMPLES)
    labels = [t for t in out["labels"].flatten().tolist() if t != -100]
    assert sorted(labels) == [7, 8, 9, 12, 13]


def test_padding_free_collator_returns_flash_attention_kwargs():
    out = DataCollatorForCausalLM(pad_id=0, packing=True, max_length=8, padding_free=True)(EXAMPLES)
    assert out["input_ids"].shape == (1, 8)
    assert out["cu_seq_lens_q"].tolist() == [0, 5, 8] and out["max_length_q"] == 5


def test_packed_collator_batch_through_the_model_matches_each_example_alone():
    seqs = [tokens(n, 200 + n) for n in (7, 3, 9, 4, 6)]
    out = DataCollatorForCausalLM(pad_id=0, packing=True, max_length=16)([{"input_ids": s} for s in seqs])
    with torch.no_grad():
        logits = model("mistral")(**_inputs(out)).logits
    seen = []
    for r in range(out["input_ids"].shape[0]):
        pos = out["position_ids"][r].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:], strict=False):
            ids = out["input_ids"][r, a:b].tolist()
            if ids in seqs:  # a document (not padding)
                torch.testing.assert_close(logits[r, a:b], alone("mistral", ids), atol=1e-4, rtol=0)
                seen.append(ids)
    assert sorted(seen) == sorted(seqs)


def test_plain_loop_example_trains_and_lowers_the_loss():
    import importlib
    import sys
    from pathlib import Path

    examples_dir = str(Path(__file__).resolve().parents[1] / "examples")
    sys.path.insert(0, examples_dir)
    try:
        finetune = importlib.import_module("hf_packed_finetune")
        first = finetune.main(["--steps", "1", "--micro-batch", "8", "--max-length", "64"])
        later = finetune.main(["--steps", "4", "--micro-batch", "8", "--max-length", "64"])
    finally:
        sys.path.remove(examples_dir)
    assert later < first
