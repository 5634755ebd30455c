"""PYTHONPATH=src python benchmarks/bench_chat.py [--n 100000] [--repeat 1] [--quick]

Assistant-only labels for chat fine-tuning, attnmask against TRL in the same process: ``--n`` multi-turn
conversations (a system prompt and 1-4 user / assistant exchanges of 5-60 words) in a `datasets.Dataset` column
``messages``, labelled

- by TRL: ``SFTTrainer``'s dataset preparation (``_prepare_dataset``, ``assistant_only_loss=True``, the tokenizer's
  template has ``{% generation %}`` tags, so TRL uses ``return_assistant_tokens_mask``), called on a stand-in
  trainer object so that no model is built;
- by attnmask: ``encode_chat_dataset`` (Dataset in, Dataset out, as TRL) on the same tokenizer and template (whose
  tags it follows, as transformers does), ``encode_chat`` on plain lists, and ``encode_chat`` on a copy of the
  template without the tags (the stock case: turns located by marker renderings, two renderings per conversation);
- the floor every labeller pays: rendering the template and tokenizing with offsets, with no labels at all.

Both give ``input_ids`` and ``labels``; they are asserted equal before the times are printed. The tokenizer is a
byte-level BPE (GPT-2 pre-tokenizer, vocabulary 4,000) trained here on the same kind of text; nothing downloads.
A warm-up on 20 conversations first (imports, template compilation); then runs alternate (TRL, attnmask, TRL,
...); the table shows the best time of each and the ratio TRL / attnmask.
"""

from __future__ import annotations

import argparse
import logging
import random
import shlex
import sys
import tempfile
import time
import types

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word but "
    "not what all were we when your can said there use an each which she do how their if will up other about out "
    "many then them these so some her would make like him into time has look two more write go see number no way "
    "could people my than first water been call who oil its now find long down day did get come made may part"
).split()
CHATML_TAGGED = (
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- m.content + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)

    def text() -> str:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
        return words[0].upper() + words[1:] + rng.choice(".?!")

    out = []
    for _ in range(n):
        conv = [{"role": "system", "content": text()}]
        for _ in range(rng.randint(1, 4)):
            conv += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        out.append(conv)
    return out


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=4000, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([m["content"] for c in conversations(2000, seed=1) for m in c], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>")
    tok.chat_template = CHATML_TAGGED
    return tok


def trl_prepare(dataset, tok, *, assistant_only_loss: bool = True, completion_only_loss: bool = False):
    """TRL's own dataset preparation (``SFTTrainer._prepare_dataset``) on a stand-in trainer: no model is built."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        assistant_only_loss=assistant_only_loss,
        max_length=None,
        report_to=[],
        use_cpu=True,
        bf16=False,
        shuffle_dataset=False,
        dataset_num_proc=None,
    )
    stand_in = types.SimpleNamespace(_tokenizer=tok, chat_template=None, completion_only_loss=completion_only_loss)
    return SFTTrainer._prepare_dataset(stand_in, dataset, tok, args, False, None, "train")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="conversations")
    parser.add_argument("--repeat", type=int, default=1, help="alternating runs of each")
    parser.add_argument("--quick", action="store_true", help="2,000 conversations, 2 runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.repeat = 2000, 2
    logging.getLogger("datasets").setLevel(logging.ERROR)
    import datasets
    from datasets import Dataset

    from attnmask.chat import encode_chat
    from attnmask.integrations.datasets import encode_chat_dataset

    datasets.disable_progress_bars()
    tok = tokenizer()
    stock = tokenizer()
    stock.chat_template = CHATML_TAGGED.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    convs = conversations(args.n)
    dataset = Dataset.from_dict({"messages": convs})
    runs = {
        "TRL SFTTrainer preparation": lambda: trl_prepare(dataset, tok),
        "attnmask encode_chat_dataset": lambda: encode_chat_dataset(dataset, tok),
        "attnmask encode_chat (lists)": lambda: encode_chat(tok, convs),
        "attnmask encode_chat, stock template": lambda: encode_chat(stock, convs),
        "(floor) render + tokenize, no labels": lambda: tok.backend_tokenizer.encode_batch(
            tok.apply_chat_template(convs, tokenize=False), add_special_tokens=False
        ),
    }
    small = Dataset.from_dict({"messages": convs[:20]})
    trl_prepare(small, tok), encode_chat_dataset(small, tok), encode_chat(stock, convs[:20])  # imports, compilation
    best = {name: float("inf") for name in runs}
    cpu = dict(best)
    outputs = {}
    for _ in range(args.repeat):
        for name, fn in runs.items():
            datasets.disable_caching()
            t, c = time.perf_counter(), time.process_time()
            outputs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t)
            cpu[name] = min(cpu[name], time.process_time() - c)
    trl, ours, lists, located, _ = (outputs[name] for name in runs)
    assert trl["input_ids"] == ours["input_ids"] == lists.input_ids == located.input_ids, "token ids differ"
    assert trl["labels"] == ours["labels"] == lists.labels == located.labels, "labels differ"
    tokens = sum(len(r) for r in lists.input_ids)
    trl_time, trl_cpu = best["TRL SFTTrainer preparation"], cpu["TRL SFTTrainer preparation"]
    trained = lists.stats.trained_tokens
    print(f"\n{args.n:,} conversations, {tokens:,} tokens, {trained:,} trained; best of {args.repeat}")
    print(f"| {'labelling':<36} | wall (s) | cpu (s) | conv/s (wall) | TRL / this, wall | TRL / this, cpu |")
    print(f"|{'-' * 38}|---:|---:|---:|---:|---:|")
    for name, seconds in best.items():
        ratios = f"{trl_time / seconds:.2f}x | {trl_cpu / cpu[name]:.2f}x"
        print(f"| {name:<36} | {seconds:.2f} | {cpu[name]:.2f} | {args.n / seconds:,.0f} | {ratios} |")
    command = shlex.join(["benchmarks/bench_chat.py", *sys.argv[1:]])
    print(f"\nlabels identical: yes\ncommand: PYTHONPATH=src python {command}")


if __name__ == "__main__":
    main()
