"""Which rule a call follows (causal, bidirectional, cross-attention) is read from the mask transformers builds, as
its own eager and sdpa attention do, not from the module's ``is_causal`` flag alone: decoders whose self-attention
modules are built ``is_causal=False`` (BigBird-Pegasus, NLLB-MoE) and BERT-family cross-attention with a decoder as
long as the padded encoder, against each sequence alone with eager attention."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnmask.integrations import hf  # noqa: E402

SEQS = [[8, 9, 10, 11, 12], [13, 14, 15]]
SMALL = dict(
    vocab_size=64,
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
    init_std=0.2,
)


def pair(build) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``build(impl)`` under attnmask and eager, on the same weights (seed 0), eval mode."""
    hf.register()
    torch.manual_seed(0)
    ours = build("attnmask").eval()
    eager = build("eager").eval()
    eager.load_state_dict(ours.state_dict())
    return ours, eager


def model_pair(family: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    extra = {"attention_type": "original_full"} if family == "bigbird_pegasus" else {}
    extra |= {"num_experts": 2, "expert_capacity": 8} if family == "nllb-moe" else {}
    auto = transformers.AutoModelForCausalLM if family == "bigbird_pegasus" else transformers.AutoModelForSeq2SeqLM

    def build(impl: str) -> torch.nn.Module:
        config = transformers.AutoConfig.for_model(family, **SMALL, **extra)
        return auto.from_config(config, attn_implementation=impl)

    return pair(build)


@pytest.mark.parametrize("family", ["bigbird_pegasus", "nllb-moe"])
def test_decoder_self_attention_built_non_causal_follows_its_causal_mask(family):
    """BigBird-Pegasus as a decoder-only LM, NLLB-MoE as an encoder-decoder (decoder inputs of 4 tokens)."""
    ours, eager = model_pair(family)
    assert ours.model.decoder.layers[0].self_attn.is_causal is False  # the flag this test is about
    ids = torch.tensor([s + [0] * (5 - len(s)) for s in SEQS])
    decoder_ids = torch.tensor([[1, 20, 21, 22], [1, 23, 24, 25]])
    seq2seq = family == "nllb-moe"
    with torch.no_grad():
        extra = {"decoder_input_ids": decoder_ids} if seq2seq else {}
        logits = ours(input_ids=ids, attention_mask=(ids != 0).long(), **extra).logits
        for row, seq in enumerate(SEQS):
            extra = {"decoder_input_ids": decoder_ids[row : row + 1]} if seq2seq else {}
            alone = eager(input_ids=torch.tensor([seq]), **extra).logits[0]
            got = logits[row] if seq2seq else logits[row, : len(seq)]
            torch.testing.assert_close(got, alone, atol=1e-4, rtol=0)


def test_bert_cross_attention_with_a_decoder_as_long_as_the_padded_encoder_equals_each_pair_alone():
    def build(impl: str) -> torch.nn.Module:
        bert = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
        bert |= dict(pad_token_id=0, initializer_range=0.2)
        encoder = transformers.BertConfig(**bert)
        decoder = transformers.BertConfig(**bert, is_decoder=True, add_cross_attention=True)
        config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
        config.decoder_start_token_id, config.pad_token_id = 1, 0
        return transformers.EncoderDecoderModel._from_config(config, attn_implementation=impl)

    ours, eager = pair(build)
    ids = torch.tensor([s + [0] * (5 - len(s)) for s in SEQS])
    decoder_ids = torch.tensor([[1, 20, 21, 22, 23], [1, 24, 25, 26, 27]])  # as long as the padded encoder
    with torch.no_grad():
        logits = ours(input_ids=ids, attention_mask=(ids != 0).long(), decoder_input_ids=decoder_ids).logits
        for row, seq in enumerate(SEQS):
            alone = eager(input_ids=torch.tensor([seq]), decoder_input_ids=decoder_ids[row : row + 1]).logits[0]
            torch.testing.assert_close(logits[row], alone, atol=1e-4, rtol=0)


def test_the_mask_rule_is_read_from_transformers_predicates():
    from transformers import masking_utils as mu

    def info(fn):
        return hf.build_mask_info(1, 4, 4, mask_function=fn)

    assert info(mu.causal_mask_function).causal is True
    assert info(mu.sliding_window_causal_mask_function(3)).causal is True
    assert info(mu.bidirectional_mask_function).causal is False
    assert info(lambda b, h, q, k: q >= k).causal is None  # a predicate of its own: the module's flag decides
