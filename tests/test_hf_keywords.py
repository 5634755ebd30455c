"""The transformers attention function refuses every keyword it does not know to be harmless: a score modifier or a
new keyword raises `BackendError` naming it, at the first forward, instead of being dropped."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnmask.errors import BackendError  # noqa: E402
from attnmask.integrations import hf  # noqa: E402

Q = torch.randn(1, 4, 6, 8)
K = torch.randn(1, 2, 6, 8)
V = torch.randn(1, 2, 6, 8)


def call(**kwargs) -> torch.Tensor:
    return hf.attention_forward(torch.nn.Module(), Q, K, V, None, **kwargs)[0]


# Keywords that must leave the output exactly as it is without them.
NEUTRAL = {
    "seq_idx": torch.zeros(1, 6, dtype=torch.int32),
    "use_cache": True,
    "output_attentions": False,
    "output_hidden_states": True,
    "output_router_logits": True,
    "num_items_in_batch": torch.tensor(5),
    "deterministic": True,
    "max_length_q": 6,
    "max_length_k": 6,
    "softcap": None,
    "s_aux": None,
    "sinks": None,
    "position_bias": None,
    "logits_to_keep": 1,
    "encoder_hidden_states": None,
    "encoder_attention_mask": None,
    "past_key_values": None,
}


@pytest.mark.parametrize("name", sorted(NEUTRAL))
def test_harmless_keywords_and_absent_modifiers_leave_the_output_unchanged(name):
    assert name in hf.HARMLESS_KEYWORDS | set(hf.SCORE_MODIFIERS) | set(hf.PASSED_MODIFIERS) | hf.ABSENT_KEYWORDS
    assert torch.equal(call(**{name: NEUTRAL[name]}), call())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"position_bias": torch.zeros(1, 4, 6, 6)}, r"^position_bias: expected None: .* additive position bias"),
        (
            {"indices": torch.zeros(1, 6, 2, dtype=torch.long)},
            r"^indices: expected a keyword attnmask's attention knows",
        ),
        ({"a_new_keyword": None}, r"^a_new_keyword: expected a keyword .* \(known: cu_seq_lens_k, cu_seq_lens_q"),
        ({"encoder_hidden_states": torch.zeros(1, 6, 32)}, r"^encoder_hidden_states: expected a keyword attnmask"),
        (
            {"cu_seq_lens_q": torch.tensor([0, 3, 6]), "cu_seq_lens_k": torch.tensor([0, 2, 6])},
            r"^cu_seq_lens_k: expected equal to cu_seq_lens_q",
        ),
    ],
)
def test_unknown_keywords_and_score_modifiers_are_refused_by_name(kwargs, match):
    with pytest.raises(BackendError, match=match):
        call(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "mods"),
    [
        ({"softcap": 0.7}, {"softcap": 0.7}),
        ({"s_aux": torch.tensor([0.5, -1.0, 2.0, 0.0])}, {"sinks": torch.tensor([0.5, -1.0, 2.0, 0.0])}),
        ({"sinks": torch.tensor([1.5, 0.0, -2.0, 3.0])}, {"sinks": torch.tensor([1.5, 0.0, -2.0, 3.0])}),
    ],
    ids=["softcap", "s_aux", "sinks"],
)
def test_score_modifiers_reach_the_attention(kwargs, mods):
    from attnmask import attention, causal

    want = attention(Q, K, V, causal(), **mods).transpose(1, 2)
    torch.testing.assert_close(call(is_causal=True, **kwargs), want, atol=0, rtol=0)
    assert not torch.allclose(call(is_causal=True, **kwargs), call(is_causal=True), atol=1e-3)


def test_t5_relative_position_bias_is_refused_not_dropped():
    hf.register()
    config = transformers.T5Config(vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    config.decoder_start_token_id = 0
    model = transformers.T5ForConditionalGeneration._from_config(config, attn_implementation="attnmask").eval()
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(BackendError, match="^position_bias: .*additive position bias"), torch.no_grad():
        model(input_ids=ids, decoder_input_ids=ids)
