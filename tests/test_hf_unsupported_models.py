"""Models attnmask's attention cannot serve exactly are refused with a typed error at the first forward, never computed
wrong and never a raw ``TypeError``; what they can do (padded batches) stays equal to each sequence alone with eager.

- models whose own code computes with the mask (``scores + mask``, ``mask.size()``, ``masked_fill(mask, ...)``):
  ``MaskObjectError`` naming the model type and the operation;
- models that mix tokens outside attention (state-space, convolution, linear-attention layers): packed rows raise
  ``UnsupportedModelError`` naming the layer type;
- models that do not hand the packed rows' ``position_ids`` to their attention, when transformers does not tell the
  mask either (an attention_mask or a KV cache): ``UnsupportedModelError``.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnmask.errors import BackendError, MaskObjectError, UnsupportedModelError  # noqa: E402
from attnmask.integrations import hf  # noqa: E402

SMALL = dict(
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    vocab_size=128,
    head_dim=8,
    max_position_embeddings=64,
    num_hidden_layers=2,
)
# Per-family settings on top of SMALL (only those a family's config class knows are applied).
FAMILY = {
    "bloom": dict(n_layer=2, n_head=4),
    "mpt": dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=64),
    "big_bird": dict(is_decoder=True, attention_type="original_full"),
    "megatron-bert": dict(is_decoder=True),
    "rembert": dict(is_decoder=True, input_embedding_size=32, output_embedding_size=32),
    "roformer": dict(is_decoder=True, embedding_size=32),
    "gpt_neox_japanese": dict(),
    "doge": dict(),
    "trocr": dict(d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64),
    "xglm": dict(d_model=32, num_layers=2, attention_heads=4, ffn_dim=64),
    "lfm2": dict(layer_types=["conv", "full_attention"], block_ff_dim=64, block_auto_adjust_ff_dim=False),
    "qwen3_next": dict(
        layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        num_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
    ),
    "falcon_h1": dict(mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=8),
    "minimax": dict(layer_types=["linear_attention", "full_attention"], num_local_experts=2, num_experts_per_tok=1),
    "gpt_bigcode": dict(n_embd=32, n_head=4, n_layer=2, n_positions=64),
    "persimmon": dict(),
    "openai-gpt": dict(n_embd=32, n_head=4, n_layer=2, n_positions=64),
    "roberta": dict(is_decoder=True),
    "bart": dict(
        d_model=32,
        decoder_layers=2,
        encoder_layers=2,
        decoder_attention_heads=4,
        encoder_attention_heads=4,
        decoder_ffn_dim=64,
        encoder_ffn_dim=64,
    ),
}
MASK_ARITHMETIC = ["bloom", "mpt", "big_bird", "megatron-bert", "rembert", "roformer", "gpt_neox_japanese", "doge"]
MASK_ARITHMETIC += ["trocr", "xglm"]
HYBRID = {"lfm2": "conv", "qwen3_next": "linear_attention", "falcon_h1": "hybrid", "minimax": "linear_attention"}
_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def model(family: str, impl: str = "attnmask") -> torch.nn.Module:
    """The family's tiny random model (seed 0; every implementation holds the attnmask model's weights), eval mode."""
    if (family, impl) not in _MODELS:
        hf.register()
        base = transformers.AutoConfig.for_model(family)
        settings = {k: v for k, v in {**SMALL, **FAMILY[family]}.items() if hasattr(base, k)}
        config = transformers.AutoConfig.for_model(family, **settings)
        torch.manual_seed(0)
        m = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl).eval()
        if impl != "attnmask":
            m.load_state_dict(model(family).state_dict())
        _MODELS[family, impl] = m
    return _MODELS[family, impl]


SEQS = [[5, 6, 7, 8, 9], [10, 11, 12]]


def right_padded() -> dict[str, torch.Tensor]:
    ids = torch.tensor([s + [0] * (5 - len(s)) for s in SEQS])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def packed(**kw) -> dict:
    ids = torch.tensor([SEQS[0] + SEQS[1]])
    return {"input_ids": ids, "position_ids": torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]]), **kw}


def alone(family: str, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(family, "eager")(input_ids=torch.tensor([seq])).logits[0]


def assert_each_row_equals_alone(family: str, logits: torch.Tensor, starts: list[tuple[int, int]]) -> None:
    for (row, start), seq in zip(starts, SEQS, strict=True):
        torch.testing.assert_close(logits[row, start : start + len(seq)], alone(family, seq), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", MASK_ARITHMETIC)
def test_a_model_computing_with_the_mask_gets_a_typed_error_naming_it(family):
    with torch.no_grad():
        reference = model(family, "eager")(**right_padded()).logits  # the model itself runs
    assert torch.isfinite(reference).all()
    with pytest.raises(MaskObjectError, match=rf"^attention_mask: .* got model type '{family}' using "):
        with torch.no_grad():
            model(family)(**right_padded())


def test_the_mask_description_refuses_tensor_use_but_answers_attribute_probes():
    info = hf.build_mask_info(2, 3, 3, attention_mask=torch.tensor([[True, True, False], [True, True, True]]))
    for use in (
        lambda: torch.randn(2, 1, 3, 3) + info,
        lambda: info * 2,
        lambda: info[:, :, :, :2],
        lambda: info.size(),
        lambda: torch.where(info, 0.0, 1.0),
        lambda: torch.randn(2, 1, 3, 3).masked_fill(info, 0.0),
    ):
        with pytest.raises(MaskObjectError, match=r"^attention_mask: expected a model that hands the mask untouched"):
            use()
    assert not hasattr(info, "dtype") and getattr(info, "device", None) is None  # probes see AttributeError
    assert info.shape == (2, 1, 3, 3) and info.ndim == 4 and info.to("cpu") is info
    for twin in (copy.deepcopy(info), pickle.loads(pickle.dumps(info))):  # noqa: S301 (our own bytes)
        assert twin.shape == info.shape and torch.equal(twin.padding, info.padding)


@pytest.mark.parametrize("family", sorted(HYBRID))
def test_a_model_mixing_tokens_outside_attention_refuses_packed_rows_and_keeps_padded_ones_exact(family):
    layer = repr(HYBRID[family])
    assert layer in hf.token_mixing_outside_attention(model(family).config)
    with torch.no_grad():
        logits = model(family)(**right_padded()).logits
        assert_each_row_equals_alone(family, logits, [(0, 0), (1, 0)])
        with pytest.raises(
            UnsupportedModelError, match=rf"model type '{family}', which mixes tokens outside .*{layer}"
        ):
            model(family)(**packed(use_cache=False))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2", "gemma3_text", "llama4_text", "gpt_oss"])
def test_attention_only_families_mix_no_tokens_outside_attention(family):
    assert hf.token_mixing_outside_attention(transformers.AutoConfig.for_model(family)) is None


@pytest.mark.parametrize("family", ["gpt_bigcode", "persimmon"])
def test_packed_rows_whose_boundaries_reach_no_attention_are_refused_and_exact_where_transformers_tells_the_mask(
    family,
):
    """These models hand their attention no ``position_ids``; transformers tells its mask about packed rows only
    without an attention_mask and without a KV cache (attnmask's collators' setting): exact there, refused else."""
    with torch.no_grad():
        logits = model(family)(**packed(use_cache=False)).logits
        assert_each_row_equals_alone(family, logits, [(0, 0), (0, 5)])
        for kw in ({"use_cache": True}, {"use_cache": False, "attention_mask": torch.ones(1, 8, dtype=torch.long)}):
            with pytest.raises(UnsupportedModelError, match=rf"model type '{family}' does not hand the packed rows'"):
                model(family)(**packed(**kw))
        # the search for enclosing position_ids refuses nothing else: padded batches and left-padded generation
        logits = model(family)(**right_padded(), use_cache=True).logits
        assert_each_row_equals_alone(family, logits, [(0, 0), (1, 0)])
    ids = torch.tensor([[0, 0] + SEQS[1], SEQS[0]])
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    out = model(family).generate(ids, attention_mask=(ids != 0).long(), **kw)
    for row, seq in enumerate((SEQS[1], SEQS[0])):
        expected = model(family, "eager").generate(torch.tensor([seq]), **kw)[0, len(seq) :]
        assert out[row, 5:].tolist() == expected.tolist()


def test_roberta_packed_rows_must_number_positions_as_roberta_does_alone():
    """RoBERTa numbers a sequence's positions from ``padding_idx + 1`` (2): documents restarting at 0 (a packing
    collator's) would be embedded at other positions than alone; restarting at 2 they are exact."""
    assert hf.position_offset_on_stack() == 0  # no model forward encloses the test
    with torch.no_grad():
        with pytest.raises(UnsupportedModelError, match=r"start at position 2, where model type 'roberta' starts"):
            model("roberta")(**packed(use_cache=False))
        roberta_positions = torch.tensor([[2, 3, 4, 5, 6, 2, 3, 4]])
        logits = model("roberta")(**packed(use_cache=False) | {"position_ids": roberta_positions}).logits
    assert_each_row_equals_alone("roberta", logits, [(0, 0), (0, 5)])


def test_a_decoder_numbering_positions_itself_refuses_packed_rows_and_keeps_padded_ones_exact():
    """BART's decoder embeds ``arange(L)`` over the whole row whatever ``position_ids`` it is given (they reach only
    its attention): every document after the first would be embedded at other positions than alone."""
    with torch.no_grad():
        logits = model("bart")(**right_padded()).logits
        assert_each_row_equals_alone("bart", logits, [(0, 0), (1, 0)])
        with pytest.raises(UnsupportedModelError, match=r"model type 'bart' numbers the positions of a row itself"):
            model("bart")(**packed(use_cache=False))


def test_an_encoder_with_its_own_key_padding_mask_refuses_packed_rows():
    """LayoutLM hands its attention a (B, 1, 1, L) additive padding mask of its own, which holds no documents, and no
    ``position_ids``: packed rows are refused; a padded batch stays exact."""
    config = transformers.LayoutLMConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    hf.register()
    torch.manual_seed(0)
    ours = transformers.AutoModelForMaskedLM.from_config(copy.deepcopy(config), attn_implementation="attnmask").eval()
    eager = transformers.AutoModelForMaskedLM.from_config(config, attn_implementation="eager").eval()
    eager.load_state_dict(ours.state_dict())
    with torch.no_grad():
        logits = ours(**right_padded()).logits
        for row, seq in enumerate(SEQS):
            alone = eager(input_ids=torch.tensor([seq])).logits[0]
            torch.testing.assert_close(logits[row, : len(seq)], alone, atol=1e-4, rtol=0)
        with pytest.raises(UnsupportedModelError, match=r"model type 'layoutlm' does not hand the packed rows'"):
            ours(**packed())


def test_the_llama4_packed_row_with_a_kv_cache_is_refused():
    """Llama4 hands its attention no ``position_ids``; with ``use_cache=True`` (its default) transformers does not
    tell the mask either: refused, where it attended across documents before."""
    config = transformers.Llama4TextConfig(
        **{k: v for k, v in SMALL.items() if k != "num_hidden_layers"},
        intermediate_size_mlp=64,
        num_hidden_layers=2,
        attention_chunk_size=4,
        num_local_experts=2,
        num_experts_per_tok=1,
        no_rope_layers=[1, 0],
    )
    hf.register()
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="attnmask").eval()
    with torch.no_grad(), pytest.raises(UnsupportedModelError, match=r"model type 'llama4_text' does not hand"):
        m(**packed(use_cache=True))


def test_a_dense_mask_carrying_a_score_bias_is_refused_not_turned_into_a_bool_mask():
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    module = torch.nn.Module()
    minimum = torch.finfo(torch.float32).min
    additive = torch.tensor([[0.0, minimum, minimum], [0.0, 0.0, minimum], [0.0, 0.0, 0.0]]).view(1, 1, 3, 3)
    got = hf.attention_forward(module, q, k, k, additive)[0]
    want = hf.attention_forward(module, q, k, k, additive == 0)[0]
    assert torch.equal(got, want)
    with pytest.raises(BackendError, match=r"^attention_mask: expected a bool mask or an additive one .* score bias"):
        hf.attention_forward(module, q, k, k, additive + 0.5)
    with pytest.raises(BackendError, match=r"^attention_mask: expected a bool or an additive \(floating\) 4D mask"):
        hf.attention_forward(module, q, k, k, (additive == 0).long())


@pytest.mark.parametrize(("family", "why"), [("openai-gpt", "AttentionInterface"), ("lfm2", "outside attention")])
def test_check_packed_inputs_says_where_attnmask_cannot_keep_documents_apart(family, why, caplog):
    """OpenAI-GPT computes its own attention (attnmask never runs: its packed rows attend across documents, silently,
    against each document alone); LFM2 mixes tokens in convolutions."""
    inputs = packed(use_cache=False)
    with caplog.at_level("WARNING", logger="attnmask"):
        assert hf.check_packed_inputs(model(family), inputs) is False
    assert why in caplog.text
    if family == "openai-gpt":
        with torch.no_grad():
            logits = model(family)(**inputs).logits
        assert (logits[0, 5:] - alone(family, SEQS[1])).abs().max() > 1e-3  # what the warning is about
    assert hf.check_packed_inputs(model("gpt_bigcode"), inputs) is True
