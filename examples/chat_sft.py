"""Multi-turn chat fine-tuning with assistant-only loss and global packing: python examples/chat_sft.py

A tiny random-weight Llama learns toy conversations (system prompt, several user / assistant exchanges) through the
transformers ``Trainer``. The tokenizer is a byte-level BPE trained here in a second, with a stock ChatML template
(no ``{% generation %}`` tags): ``attnmask.chat`` locates the assistant turns itself, so only the assistant contents
and their ``<|im_end|>`` are trained. Conversations are then packed globally (``attnmask.pack``, best-fit decreasing
over the whole set) and each batch of packed rows is collated by the plan (``PackPlan.collate``): position ids
restart in every conversation and the ``"attnmask"`` attention keeps conversations apart. CPU, a few seconds;
nothing downloads.
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch

import attnmask as am
from attnmask.chat import encode_chat
from attnmask.integrations import hf

CHATML = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """``n`` toy conversations: a system prompt, then 1-4 exchanges of arithmetic questions and answers."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        conv = [{"role": "system", "content": rng.choice(["You are a calculator.", "Answer with the sum."])}]
        for _ in range(rng.randint(1, 4)):
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            conv.append({"role": "user", "content": f"What is {a} plus {b}?"})
            conv.append({"role": "assistant", "content": f"{a} plus {b} is {a + b}."})
        out.append(conv)
    return out


def build_tokenizer():
    """A byte-level BPE (vocabulary 512) trained on toy conversations, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = [m["content"] for conv in conversations(100, seed=123) for m in conv]
    backend.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|endoftext|>"
    )
    tok.chat_template = CHATML
    return tok


def tiny_llama(vocab_size: int, pad_id: int):
    """A 2-layer random-weight Llama with attnmask's attention (built from a config; nothing downloads)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        pad_token_id=pad_id,
        use_cache=False,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=hf.register())


class PackedRows(torch.utils.data.Dataset):
    """The rows of a global packing plan, as a dataset of row indices; `collate` builds their batch."""

    def __init__(self, encoded, max_length: int, pad_id: int):
        self.encoded, self.pad_id = encoded, pad_id
        self.plan = am.pack([len(r) for r in encoded.input_ids], max_length)

    def __len__(self) -> int:
        return self.plan.stats.rows

    def __getitem__(self, row: int) -> int:
        return row

    def collate(self, rows: list[int]) -> dict[str, torch.Tensor]:
        batch = self.plan.collate(self.encoded.input_ids, pad_id=self.pad_id, labels=self.encoded.labels, rows=rows)
        return {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "labels": batch.labels}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=4, help="packed rows per micro-batch")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per packed row")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    from transformers import Trainer, TrainingArguments

    tok = build_tokenizer()
    encoded = encode_chat(tok, conversations(args.conversations), max_length=args.max_length, overflow="split")
    print(f"encoded: {encoded.stats}")
    data = PackedRows(encoded, args.max_length, tok.pad_token_id)
    print(f"packed: {data.plan.stats}")
    model = tiny_llama(len(tok), tok.pad_token_id)
    with tempfile.TemporaryDirectory() as out_dir:
        training_args = TrainingArguments(
            output_dir=out_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.rows,
            learning_rate=3e-3,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
            remove_unused_columns=False,  # the dataset items are row indices, for the collator
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=data, data_collator=data.collate)
        result = trainer.train()
    print(f"final training loss {result.training_loss:.3f} after {result.global_step} steps")
    return result.training_loss


if __name__ == "__main__":
    main()
