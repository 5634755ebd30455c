"""Encoder-decoder cross-attention through attnmask (a tiny random BART) against the same model on eager attention:
decoder queries see the encoder's real tokens whatever the two lengths."""

from __future__ import annotations

import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.hf_models import same_weights  # noqa: E402


def model(impl: str = "attnmask") -> torch.nn.Module:
    config = transformers.BartConfig(
        vocab_size=300,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
    )
    build = functools.partial(transformers.BartForConditionalGeneration._from_config, config)
    return same_weights(("bart",), impl, lambda impl: build(attn_implementation=impl))


def encoder_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 8 encoder tokens, the second right-padded after 5."""
    ids = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    return ids, mask


@pytest.mark.parametrize("decoder_length", [3, 8, 13])  # shorter than, equal to and longer than the padded encoder
def test_cross_attention_on_a_padded_encoder_equals_eager(decoder_length):
    ids, mask = encoder_batch()
    dec = torch.randint(3, 300, (2, decoder_length), generator=torch.Generator().manual_seed(1))
    dec_mask = torch.ones_like(dec)
    dec_mask[0, decoder_length - 1 :] = 0  # and a padded decoder row
    kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    with torch.no_grad():
        got, want = model()(**kw).logits, model("eager")(**kw).logits
    real = dec_mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)


def test_greedy_generation_on_a_padded_encoder_equals_eager():
    ids, mask = encoder_batch()
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, num_beams=1)
    assert model().generate(ids, **kw).tolist() == model("eager").generate(ids, **kw).tolist()


def test_encoder_padding_is_honoured_by_cross_attention():
    ids, mask = encoder_batch()
    dec = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        masked = model()(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        unmasked = model()(input_ids=ids, decoder_input_ids=dec).logits
    assert torch.equal(masked[0], unmasked[0]) and not torch.allclose(masked[1], unmasked[1], atol=1e-3)
