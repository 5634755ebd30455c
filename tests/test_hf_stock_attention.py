"""Packed batches from attnmask's collators stay exact on transformers' stock sdpa and eager attention (the user forgot
``hf.register()``), with the default config (``use_cache=True``): each document gets the logits it gets alone."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnmask as am  # noqa: E402
from attnmask.integrations import hf  # noqa: E402
from tests.hf_models import COMMON, tokens  # noqa: E402

LENGTHS = [7, 3, 9, 4, 6, 2]
MAX_LENGTH = 16


@pytest.fixture(params=[True, False], ids=["registered", "not registered"])
def registered(request, monkeypatch):
    """Run with attnmask registered in transformers' interfaces, and with it removed from them."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    hf.register()
    if not request.param:
        for interface in (AttentionInterface, AttentionMaskInterface):
            monkeypatch.delitem(interface._global_mapping, hf.ATTN_IMPLEMENTATION)
    return request.param


def stock_llama(impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**COMMON)
    assert config.use_cache  # the default this test is about
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation=impl).eval()


def documents(batch_ids: torch.Tensor, position_ids: torch.Tensor, logits: torch.Tensor) -> dict[tuple, torch.Tensor]:
    """Logits of every document of packed rows (real tokens only), keyed by its token ids."""
    out = {}
    for r in range(batch_ids.shape[0]):
        starts = (position_ids[r] == 0).nonzero().flatten().tolist() + [batch_ids.shape[1]]
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            ids = tuple(batch_ids[r, a:b].tolist())
            if ids != (0,):  # a padding position: a one-token document of its own
                out[ids] = logits[r, a:b]
    return out


def packed_inputs(seqs: list[list[int]]) -> dict[str, dict]:
    examples = [{"input_ids": s} for s in seqs]
    return {
        "PackingCollator": am.PackingCollator(MAX_LENGTH, pad_id=0)(examples).model_inputs(labels=False),
        "PackPlan.collate": am.pack(seqs, MAX_LENGTH).collate(seqs, pad_id=0).model_inputs(labels=False),
        "DataCollatorForCausalLM": hf.DataCollatorForCausalLM(pad_id=0, packing=True, max_length=MAX_LENGTH)(examples),
        "padding_free": hf.DataCollatorForCausalLM(pad_id=0, packing=True, max_length=MAX_LENGTH, padding_free=True)(
            examples
        ),
    }


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_collator_batches_are_exact_on_stock_attention_with_the_default_config(impl, registered):
    model = stock_llama(impl)
    seqs = [tokens(n, 300 + i) for i, n in enumerate(LENGTHS)]
    with torch.no_grad():
        alone = {tuple(s): model(torch.tensor([s])).logits[0] for s in seqs}
        for name, inputs in packed_inputs(seqs).items():
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
            assert inputs["use_cache"] is False and "attention_mask" not in inputs, name
            got = documents(inputs["input_ids"], inputs["position_ids"], model(**inputs).logits)
            assert got.keys() == alone.keys(), name
            for ids, logits in got.items():
                torch.testing.assert_close(logits, alone[ids], atol=1e-4, rtol=0, msg=f"{name} {impl} {ids}")


def test_without_use_cache_false_the_stock_path_would_attend_across_documents():
    """The control: the same batch with a cache created (use_cache=True) leaks, which is what the flag prevents."""
    model = stock_llama("sdpa")
    seqs = [tokens(n, 300 + i) for i, n in enumerate(LENGTHS)]
    inputs = am.PackingCollator(MAX_LENGTH, pad_id=0)([{"input_ids": s} for s in seqs]).model_inputs(labels=False)
    with torch.no_grad():
        alone = {tuple(s): model(torch.tensor([s])).logits[0] for s in seqs}
        leaky = model(**{**inputs, "use_cache": True}).logits
    got = documents(inputs["input_ids"], inputs["position_ids"], leaky)
    worst = max(float((got[ids] - alone[ids]).abs().max()) for ids in got)
    assert worst > 1e-2


def test_a_padded_batch_keeps_its_attention_mask_and_the_models_cache_setting():
    batch = am.pad([[1, 2, 3], [4]], pad_id=0)
    assert not batch.is_packed and sorted(batch.model_inputs()) == [
        "attention_mask",
        "input_ids",
        "labels",
        "position_ids",
    ]
    packed = am.pack([3, 1], 8).collate([[1, 2, 3], [4]], pad_id=0)
    assert packed.is_packed and packed.model_inputs()["use_cache"] is False
