"""Llama4's chunked attention (``attention_chunk_size``) through attnmask, against each sequence alone with eager.

Only the layers with rotary embeddings are chunked (``no_rope_layers`` 1 -> ``"chunked_attention"``); transformers
tells the attention function nothing: the chunk reaches attnmask through the mask call (``local_size``).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnmask.integrations import hf  # noqa: E402
from attnmask.masks import causal, chunked, document  # noqa: E402
from tests.hf_models import VOCAB, same_weights, tokens  # noqa: E402
from tests.naive import naive_dense  # noqa: E402

CHUNK = 4


def _config(chunk: int = CHUNK):
    return transformers.Llama4TextConfig(
        hidden_size=32,
        intermediate_size=64,
        intermediate_size_mlp=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_hidden_layers=3,
        vocab_size=VOCAB,
        attention_chunk_size=chunk,
        num_local_experts=2,
        num_experts_per_tok=1,
        no_rope_layers=[1, 0, 1],  # layers 0 and 2 chunked, layer 1 (no rope) full attention
    )


def model(impl: str = "attnmask") -> torch.nn.Module:
    return same_weights(
        ("llama4",),
        impl,
        lambda impl: transformers.AutoModelForCausalLM.from_config(_config(), attn_implementation=impl),
    )


def alone(ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model("eager")(torch.tensor([ids])).logits[0]


def test_the_tiny_llama4_mixes_chunked_and_full_layers_and_the_chunk_changes_its_logits():
    assert _config().layer_types == ["chunked_attention", "full_attention", "chunked_attention"]
    unchunked = transformers.AutoModelForCausalLM.from_config(_config(100), attn_implementation="eager").eval()
    unchunked.load_state_dict(model().state_dict())
    ids = torch.tensor([tokens(9, 1)])
    with torch.no_grad():
        assert (unchunked(ids).logits - model("eager")(ids).logits).abs().max() > 1e-2


def test_one_sequence_matches_eager():
    seq = tokens(9, 2)
    with torch.no_grad():
        logits = model()(torch.tensor([seq])).logits[0]
    torch.testing.assert_close(logits, alone(seq), atol=1e-4, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_each_sequence_alone(side):
    seqs = [tokens(9, 3), tokens(3, 4), tokens(6, 5)]
    length = max(map(len, seqs))
    ids, mask = [], []
    for s in seqs:
        pad = [0] * (length - len(s))
        ids.append(s + pad if side == "right" else pad + s)
        ones = [1] * len(s)
        mask.append(ones + pad if side == "right" else pad + ones)
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model()(ids, attention_mask=mask, position_ids=position_ids).logits
    for r, s in enumerate(seqs):
        got = logits[r, : len(s)] if side == "right" else logits[r, length - len(s) :]
        torch.testing.assert_close(got, alone(s), atol=1e-4, rtol=0)


def test_packed_row_counts_chunks_per_document():
    """Llama4 does not hand ``position_ids`` to its attention: the boundaries come from transformers' mask call, which
    finds packed rows only without a cache (``use_cache=False``, as attnmask's packing collators set)."""
    docs = [tokens(6, 6), tokens(9, 7), tokens(2, 8)]
    ids = torch.tensor([[t for d in docs for t in d]])
    pos = torch.tensor([[p for d in docs for p in range(len(d))]])
    with torch.no_grad():
        logits = model()(ids, position_ids=pos, use_cache=False).logits[0]
    start = 0
    for d in docs:
        torch.testing.assert_close(logits[start : start + len(d)], alone(d), atol=1e-4, rtol=0)
        start += len(d)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_left_padded_greedy_generation_yields_each_prompt_generated_alone(cache):
    prompts = [tokens(9, 9), tokens(3, 10), tokens(6, 11)]
    length = max(map(len, prompts))
    ids = torch.tensor([[0] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(max_new_tokens=7, do_sample=False, pad_token_id=0, cache_implementation=cache)
    out = model().generate(ids, attention_mask=mask, **kw)
    for r, p in enumerate(prompts):
        expected = model("eager").generate(torch.tensor([p]), **kw)[0, len(p) :]
        assert out[r, length:].tolist() == expected.tolist()


def test_chunked_documents_equal_documents_and_chunks_in_position_space():
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5]])
    docs = hf.document_ids_from_position_ids(positions)
    split = hf._chunked_documents(document(doc_ids=docs), 2, True, positions, None)
    n = positions.shape[1]
    q, k = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    same_doc = docs[0, q] == docs[0, k]
    same_chunk = positions[0, q] // 2 == positions[0, k] // 2
    expected = same_doc & same_chunk & (k <= q)
    assert torch.equal(naive_dense(causal() & split, n, n)[0], expected)
    assert torch.equal(naive_dense(causal() & chunked(2), 5, 5)[0], (causal() & split).to_dense(n)[0, :5, :5])


def test_left_padded_batch_without_position_ids_equals_eager_on_the_same_batch():
    """Chunks start after each row's left padding (transformers' ``chunked_overlay``), whatever the positions."""
    seqs = [tokens(10, 12), tokens(5, 13)]
    ids = torch.tensor([[0] * (10 - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (10 - len(s)) + [1] * len(s) for s in seqs])
    with torch.no_grad():
        got, want = model()(ids, attention_mask=mask).logits, model("eager")(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-4, rtol=0)
