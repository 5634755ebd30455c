"""Training under mixed precision through transformers: the HF Trainer with bf16 and TRL's SFTTrainer defaults."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

from attnmask.integrations import hf  # noqa: E402
from attnmask.integrations.hf import DataCollatorForCausalLM  # noqa: E402
from tests.hf_models import COMMON, VOCAB, tokens  # noqa: E402

LENGTHS = [9, 4, 13, 6, 11, 3, 8, 12]


def _llama(impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, attn_implementation=impl))


def _train_losses(impl: str, tmp_path, steps: int = 5) -> list[float]:
    rows = [{"input_ids": tokens(n, seed)} for seed, n in enumerate(LENGTHS)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / impl),
        use_cpu=True,
        bf16=True,
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(
        model=_llama(impl), args=args, train_dataset=rows, data_collator=DataCollatorForCausalLM(pad_id=0)
    )
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def test_trainer_with_bf16_gives_the_losses_of_sdpa(tmp_path):
    ours = _train_losses(hf.register(), tmp_path)
    stock = _train_losses("sdpa", tmp_path)
    assert len(ours) == len(stock) == 5
    # bf16 rounding differs between kernels: within a few bf16 ulps of a loss near log(VOCAB) ~ 5.7.
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(stock), atol=0.05, rtol=0.01)
    assert ours[-1] < ours[0]  # it trains


def _tokenizer():
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(VOCAB)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="t0", eos_token="t2")


def test_sft_trainer_defaults_with_padding_free_train_and_keep_documents_apart(tmp_path):
    data = datasets.Dataset.from_dict({"input_ids": [tokens(n, seed) for seed, n in enumerate(LENGTHS)]})
    config = trl.SFTConfig(
        output_dir=str(tmp_path), use_cpu=True, padding_free=True, max_length=None, max_steps=2, report_to="none"
    )
    assert config.bf16  # TRL's default: the run below is under bf16 autocast
    model = _llama(hf.register())
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=_tokenizer())
    trainer.train()
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in trainer.state.log_history if "loss" in log)

    # The packed batch TRL's collator builds, through the trained model, equals each document run alone (float32).
    examples = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(examples)
    assert batch["input_ids"].shape[0] == 1  # padding-free: one row
    # Fresh copies of the trained weights: accelerate left the trained model's forward wrapped in bf16 autocast.
    ours, eager = _llama(hf.register()).eval(), _llama("eager").eval()
    ours.load_state_dict(model.state_dict())
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        packed = ours(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for ex in examples:
            ids = ex["input_ids"]
            want = eager(torch.tensor([ids])).logits[0]
            torch.testing.assert_close(packed[start : start + len(ids)], want, atol=1e-4, rtol=1e-4)
            start += len(ids)
    assert start == batch["input_ids"].shape[1]


def test_autocast_forward_of_a_registered_llama_matches_sdpa_under_the_same_autocast():
    ours, stock = _llama(hf.register()).eval(), _llama("sdpa").eval()
    batch = DataCollatorForCausalLM(pad_id=0)([{"input_ids": tokens(n, n)} for n in (7, 3, 5)])
    del batch["labels"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(**batch, use_cache=False).logits
        want = stock(**batch, use_cache=False).logits
    assert got.dtype == want.dtype
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real].float(), want[real].float(), atol=0.05, rtol=0.02)
