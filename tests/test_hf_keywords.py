"""The transformers attention function refuses every keyword it does not know to be harmless: a score modifier or a
new keyword raises `BackendError` naming it, at the first forward, instead of being dropped."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnmask.errors import BackendError  # noqa: E402
from attnmask.integrations import hf  # noqa: E402
from tests.hf_models import COMMON  # noqa: E402

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
}


@pytest.mark.parametrize("name", sorted(NEUTRAL))
def test_harmless_keywords_and_absent_modifiers_leave_the_output_unchanged(name):
    assert name in hf.HARMLESS_KEYWORDS | set(hf.SCORE_MODIFIERS)
    assert torch.equal(call(**{name: NEUTRAL[name]}), call())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"softcap": 30.0}, r"^softcap: expected None: attnmask's attention does not support logit soft-capping"),
        ({"s_aux": torch.zeros(4)}, r"^s_aux: expected None: .* attention sinks .* got a torch.float32 tensor"),
        ({"sinks": torch.zeros(4)}, r"^sinks: expected None: .* attention sinks"),
        ({"position_bias": torch.zeros(1, 4, 6, 6)}, r"^position_bias: expected None: .* additive position bias"),
        (
            {"indices": torch.zeros(1, 6, 2, dtype=torch.long)},
            r"^indices: expected a keyword attnmask's attention knows",
        ),
        ({"a_new_keyword": None}, r"^a_new_keyword: expected a keyword .* \(known: cu_seq_lens_k, cu_seq_lens_q"),
        (
            {"cu_seq_lens_q": torch.tensor([0, 3, 6]), "cu_seq_lens_k": torch.tensor([0, 2, 6])},
            r"^cu_seq_lens_k: expected equal to cu_seq_lens_q",
        ),
    ],
)
def test_unknown_keywords_and_score_modifiers_are_refused_by_name(kwargs, match):
    with pytest.raises(BackendError, match=match):
        call(**kwargs)


def _tiny(config_cls, model_cls, **extra):
    hf.register()
    torch.manual_seed(0)
    return model_cls._from_config(config_cls(**{**COMMON, **extra}), attn_implementation="attnmask").eval()


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: _tiny(transformers.Gemma2Config, transformers.Gemma2ForCausalLM), "^softcap: .*soft-capping"),
        (
            lambda: _tiny(
                transformers.GptOssConfig, transformers.GptOssForCausalLM, num_local_experts=2, num_experts_per_tok=1
            ),
            "^s_aux: .*attention sinks",
        ),
    ],
    ids=["gemma2 softcap", "gpt-oss sinks"],
)
def test_models_with_score_modifiers_are_refused_at_the_first_forward(build, match):
    model = build()
    with pytest.raises(BackendError, match=match), torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]))


def test_t5_relative_position_bias_is_refused_not_dropped():
    hf.register()
    config = transformers.T5Config(vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    config.decoder_start_token_id = 0
    model = transformers.T5ForConditionalGeneration._from_config(config, attn_implementation="attnmask").eval()
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(BackendError, match="^position_bias: .*additive position bias"), torch.no_grad():
        model(input_ids=ids, decoder_input_ids=ids)
