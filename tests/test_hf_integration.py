"""attnmask as a transformers attention implementation, checked against transformers' own eager attention.

Tiny random-weight models are built from configs (nothing downloads). The reference for a packed or padded batch is
each sequence run *alone* through transformers' eager implementation, whose masks attnmask does not build.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from attnmask.errors import BackendError, InputError, ShapeError  # noqa: E402
from attnmask.generation import greedy_generate, left_pad_prompts  # noqa: E402
from attnmask.integrations import hf  # noqa: E402
from attnmask.masks import causal, document, key_padding, sliding_window  # noqa: E402
from tests.hf_models import FAMILIES, VOCAB, alone, model, packed_batch, padded_batch, tokens  # noqa: E402
from tests.naive import naive_attention, naive_dense  # noqa: E402


def assert_docs_match(family: str, rows: list[list[list[int]]], logits: torch.Tensor) -> None:
    for r, docs in enumerate(rows):
        start = 0
        for d in docs:
            torch.testing.assert_close(logits[r, start : start + len(d)], alone(family, d), atol=1e-4, rtol=0)
            start += len(d)


ROWS = [
    [tokens(5, 1), tokens(7, 2), tokens(3, 3)],
    [tokens(9, 4), tokens(4, 5)],
]


# ----------------------------------------------------------------------------------------------------------------------
# Registration


def test_register_makes_attnmask_an_attn_implementation_of_auto_models():
    name = hf.register()
    assert hf.register() == name == "attnmask"
    m = model("llama")
    assert m.config._attn_implementation == "attnmask"
    with torch.no_grad():
        out = m(torch.tensor([tokens(6, 0)])).logits
    assert out.shape == (1, 6, VOCAB) and torch.isfinite(out).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_unpadded_sequence_matches_eager(family):
    ids = tokens(11, 7)
    with torch.no_grad():
        ours = model(family)(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, alone(family, ids), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Packed rows


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_match_each_document_alone(family):
    batch = packed_batch(ROWS, length=15)
    with torch.no_grad():
        logits = model(family)(**batch).logits
    assert_docs_match(family, ROWS, logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_ones_mask_with_packed_position_ids_does_not_leak_across_documents(family):
    rows = [[tokens(6, 11), tokens(5, 12), tokens(4, 13)]]
    batch = packed_batch(rows, length=15)
    assert bool(batch["attention_mask"].all())
    with torch.no_grad():
        logits = model(family)(**batch).logits
    assert_docs_match(family, rows, logits)


@pytest.mark.parametrize("use_cache", [True, False])
def test_packed_rows_match_with_and_without_an_empty_cache(use_cache):
    batch = packed_batch(ROWS, length=15)
    del batch["attention_mask"]
    with torch.no_grad():
        logits = model("mistral")(**batch, use_cache=use_cache).logits
    assert_docs_match("mistral", ROWS, logits)


def test_flattened_row_with_cu_seq_lens_kwargs_matches_each_document_alone():
    docs = [tokens(4, 21), tokens(8, 22), tokens(5, 23)]
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    batch = collator([{"input_ids": d} for d in docs])
    batch.pop("labels")
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]  # boundaries must come from cu_seq_lens
    with torch.no_grad():
        logits = model("qwen2")(**batch).logits
    assert_docs_match("qwen2", [docs], logits)


def test_seq_lens_kwarg_gives_document_boundaries():
    docs = [tokens(6, 31), tokens(6, 32)]
    ids = torch.tensor([docs[0] + docs[1]])
    with torch.no_grad():
        logits = model("llama")(ids, position_ids=torch.arange(12)[None], seq_lens=((6, 6),)).logits
    assert_docs_match("llama", [docs], logits)


@settings(max_examples=8)
@given(
    lengths=st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=3), min_size=1, max_size=3),
    family=st.sampled_from(["llama", "mistral"]),
    seed=st.integers(0, 2**16),
)
def test_any_packing_matches_each_document_alone(lengths, family, seed):
    rows = [[tokens(n, seed + 10 * r + i) for i, n in enumerate(row)] for r, row in enumerate(lengths)]
    batch = packed_batch(rows, length=max(sum(r) for r in lengths) + 1)
    with torch.no_grad():
        logits = model(family)(**batch).logits
    assert_docs_match(family, rows, logits)


def test_packed_training_gradients_equal_the_sum_over_documents_alone():
    m = model("mistral")
    docs = [tokens(7, 41), tokens(5, 42)]
    batch = packed_batch([docs], length=12)
    labels = batch["input_ids"].clone()
    labels[0, 7] = -100  # no target crosses the boundary
    m.train()
    try:
        m.zero_grad()
        loss_packed = m(**batch, labels=labels).loss * 10  # mean over 10 targets -> sum
        loss_packed.backward()
        packed = [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
        for d in docs:
            (m(torch.tensor([d]), labels=torch.tensor([d])).loss * (len(d) - 1)).backward()
        alone_grads = [p.grad for p in m.parameters()]
    finally:
        m.eval()
        m.zero_grad()
    for a, b in zip(packed, alone_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Padding


@pytest.mark.parametrize("family", FAMILIES)
def test_right_padded_batch_matches_unpadded(family):
    seqs = [tokens(10, 51), tokens(3, 52), tokens(7, 53)]
    ids, mask = padded_batch(seqs, "right")
    with torch.no_grad():
        logits = model(family)(ids, attention_mask=mask).logits
    for r, s in enumerate(seqs):
        torch.testing.assert_close(logits[r, : len(s)], alone(family, s), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_matches_unpadded_and_is_finite(family):
    seqs = [tokens(10, 61), tokens(2, 62), tokens(6, 63)]
    ids, mask = padded_batch(seqs, "left")
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(family)(ids, attention_mask=mask, position_ids=position_ids).logits
    assert torch.isfinite(logits).all()
    for r, s in enumerate(seqs):
        torch.testing.assert_close(logits[r, -len(s) :], alone(family, s), atol=1e-4, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_nan_embeddings_at_padding_never_reach_the_real_positions(family, side):
    """NaN at every padding position's embedding (their keys and values turn NaN in every layer): the real positions'
    logits are those of the clean batch, bit for bit; masked keys never affect the output. (transformers' own sdpa
    and eager attention let the NaN through a probability of 0 into the real rows of every padded sequence,
    transformers 5.23.)"""
    seqs = [tokens(10, 71), tokens(3, 72), tokens(6, 73)]
    ids, mask = padded_batch(seqs, side)
    m = model(family)
    clean = m.get_input_embeddings()(ids).detach()
    dirty = clean.masked_fill(~mask.bool()[..., None], float("nan"))
    with torch.no_grad():
        want = m(inputs_embeds=clean, attention_mask=mask).logits
        got = m(inputs_embeds=dirty, attention_mask=mask).logits
    real = mask.bool()
    assert got[~real].isnan().any()  # the padding itself carries the NaN: the keys the real rows must not read
    assert torch.equal(got[real], want[real])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_nan_document_in_a_packed_row_leaves_the_other_documents_exact(family):
    """Packed rows (documents from ``position_ids``): NaN embeddings for one document make its own logits NaN and
    leave every other document's, in its row and the next, equal to the clean batch's bit for bit."""
    m = model(family)
    batch = packed_batch([[tokens(5, 81), tokens(7, 82), tokens(4, 83)], [tokens(9, 84), tokens(3, 85)]], 18)
    clean = m.get_input_embeddings()(batch["input_ids"]).detach()
    dirty = clean.clone()
    dirty[0, 5:12] = float("nan")  # row 0's second document
    with torch.no_grad():
        want = m(inputs_embeds=clean, position_ids=batch["position_ids"]).logits
        got = m(inputs_embeds=dirty, position_ids=batch["position_ids"]).logits
    others = batch["attention_mask"].bool()
    others[0, 5:12] = False
    assert got[0, 5:12].isnan().all()
    assert torch.equal(got[others], want[others])


def test_nan_at_encoder_padding_never_reaches_the_decoder():
    """An encoder-decoder model (a tiny BART): NaN embeddings at the encoder's padding positions leave every decoder
    logit equal to the clean batch's (the padding is masked in the encoder's self-attention and in the decoder's
    cross-attention); transformers' own sdpa turned them NaN here (5.23)."""
    hf.register()
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
    )  # fmt: skip
    m = transformers.AutoModelForSeq2SeqLM.from_config(config, attn_implementation="attnmask").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    clean = m.get_input_embeddings()(ids).detach()
    dirty = clean.masked_fill(~mask.bool()[..., None], float("nan"))
    decoder = dict(decoder_input_ids=torch.tensor([[3, 4, 5], [3, 7, 8]]))
    with torch.no_grad():
        want = m(inputs_embeds=clean, attention_mask=mask, **decoder).logits
        got = m(inputs_embeds=dirty, attention_mask=mask, **decoder).logits
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------------------------------
# Generation with a KV cache


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_left_padded_batch_yields_each_prompt_generated_alone(family, cache):
    prompts = [tokens(9, 71), tokens(3, 72), tokens(6, 73)]
    ids, mask = padded_batch(prompts, "left")
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, cache_implementation=cache)
    out = model(family).generate(ids, attention_mask=mask, **kw)
    for r, p in enumerate(prompts):
        expected = model(family, "eager").generate(torch.tensor([p]), **kw)[0, len(p) :]
        assert out[r, ids.shape[1] :].tolist() == expected.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_on_native_folds_grouped_heads_and_yields_each_prompt_generated_alone(family, monkeypatch):
    """Greedy generation through ``native`` (4 query heads on 2 key heads): its decoding steps run each key head's
    query heads as rows of one segment (``native._folded_step``; transformers keeps a sliding-window layer's cache at
    the window, so the window's cut is left to tests/test_native.py), and every prompt of a left-padded batch
    generates what it generates alone under eager attention."""
    from attnmask.backends import native

    folds = []
    fold = native._folded_step
    monkeypatch.setattr(native, "_folded_step", lambda *a: folds.append(fold(*a)) or folds[-1])
    name = hf.register("attnmask_native_fold_test", backend="native")
    m = model(family, "eager")
    m.config._attn_implementation = name
    prompts = [tokens(9, 74), tokens(3, 75), tokens(6, 76)]
    ids, mask = padded_batch(prompts, "left")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    try:
        out = m.generate(ids, attention_mask=mask, **kw)
    finally:
        m.config._attn_implementation = "eager"
    assert any(f is not None for f in folds)
    for r, p in enumerate(prompts):
        expected = m.generate(torch.tensor([p]), **kw)[0, len(p) :]
        assert out[r, ids.shape[1] :].tolist() == expected.tolist()


def test_decoding_step_by_step_matches_one_forward_over_the_whole_sequence():
    m = model("mistral")
    seq = torch.tensor([tokens(12, 81)])
    with torch.no_grad():
        full_logits = m(seq).logits
        out = m(seq[:, :5], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(5, 12):
            out = m(seq[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full_logits, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# The spec built per call


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, causal()),
        ({"window": 3}, sliding_window(3)),
        ({"padding": torch.tensor([[0, 1, 1, 1]]).bool()}, causal() & key_padding([[0, 1, 1, 1]])),
        ({"documents": document(seq_lens=[2, 2])}, causal() & document(seq_lens=[2, 2])),
    ],
)
def test_spec_for_call_combines_causal_window_padding_and_documents(kwargs, expected):
    spec = hf.spec_for_call(**kwargs)
    assert torch.equal(naive_dense(spec, 4, 4), naive_dense(expected, 4, 4))


def test_spec_for_call_rejects_a_bidirectional_window():
    with pytest.raises(BackendError, match="sliding_window"):
        hf.spec_for_call(is_causal=False, window=3)


@pytest.mark.parametrize(
    ("positions", "mask", "expected"),
    [
        ([[0, 1, 2, 0, 1, 0, 0]], [[1, 1, 1, 1, 1, 0, 0]], [[0, 0, 0, 1, 1, -1, -1]]),
        ([[0, 0, 0, 1, 2], [0, 1, 0, 1, 2]], [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], [[-1, -1, 0, 0, 0], [0, 0, 1, 1, 1]]),
        ([[0, 1, 2, 3, 4], [0, 1, 0, 1, 2]], [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], [[-1, -1, 0, 0, 0], [0, 0, 1, 1, 1]]),
        ([[5, 6, 7, 0, 1]], None, [[0, 0, 0, 1, 1]]),
    ],
)
def test_document_ids_follow_position_restarts_and_skip_padding(positions, mask, expected):
    mask = None if mask is None else torch.tensor(mask)
    assert hf.document_ids_from_position_ids(torch.tensor(positions), mask).tolist() == expected


@pytest.mark.parametrize("positions", [[[0, 1, 2, 3]], [[0, 0, 0, 1, 2]], [[7, 8, 9]]])
def test_single_sequences_are_not_treated_as_packed(positions):
    pos = torch.tensor(positions)
    mask = (pos > 0) | (torch.arange(pos.shape[1]) == pos.shape[1] - 3)
    assert hf.document_ids_from_position_ids(pos, mask.long()) is None


@given(st.lists(st.integers(1, 6), min_size=1, max_size=5), st.integers(0, 3))
def test_document_ids_recover_packed_lengths(lengths, pad):
    pos = torch.tensor([[p for n in lengths for p in range(n)] + [0] * pad])
    mask = torch.tensor([[1] * sum(lengths) + [0] * pad])
    ids = hf.document_ids_from_position_ids(pos, mask)
    expected = [i for i, n in enumerate(lengths) for _ in range(n)] + [-1] * pad
    if len(lengths) == 1:
        assert ids is None
    else:
        assert ids.tolist() == [expected]


# ----------------------------------------------------------------------------------------------------------------------
# Bad input


def test_a_bad_softcap_is_rejected_not_ignored():
    q = torch.randn(1, 4, 3, 8)
    k = torch.randn(1, 2, 3, 8)
    module = torch.nn.Module()
    with pytest.raises(InputError, match="^softcap: expected None or a finite number > 0"):
        hf.attention_forward(module, q, k, k, None, softcap=-30.0)


def test_cu_seq_lens_that_do_not_cover_the_row_are_rejected():
    q = torch.randn(1, 4, 6, 8)
    k = torch.randn(1, 2, 6, 8)
    with pytest.raises(ShapeError, match="cu_seq_lens_q"):
        hf.attention_forward(torch.nn.Module(), q, k, k, None, cu_seq_lens_q=torch.tensor([0, 2, 5]))


# ----------------------------------------------------------------------------------------------------------------------
# Our own greedy loop (attnmask.generation) over transformers models


@pytest.mark.parametrize(("family", "impl"), [(f, "attnmask") for f in FAMILIES] + [("mistral", "eager")])
def test_greedy_loop_on_a_left_padded_batch_yields_each_prompt_generated_alone(family, impl):
    prompts = [tokens(9, 91), tokens(2, 92), tokens(5, 93)]
    ids, mask, _ = left_pad_prompts(prompts, pad_id=0)
    out = greedy_generate(model(family, impl), ids, mask, max_new_tokens=7, pad_token_id=0)
    for r, p in enumerate(prompts):
        kw = dict(max_new_tokens=7, do_sample=False, pad_token_id=0)
        expected = model(family, "eager").generate(torch.tensor([p]), **kw)[0, len(p) :]
        assert out[r, ids.shape[1] :].tolist() == expected.tolist()


def test_greedy_loop_pads_rows_after_eos_and_stops_when_all_finished():
    m = model("llama")
    prompts = [tokens(4, 95), tokens(6, 96)]
    ids, mask, _ = left_pad_prompts(prompts, pad_id=0)
    free = greedy_generate(m, ids, mask, max_new_tokens=6, pad_token_id=0)
    eos = int(free[0, ids.shape[1] + 1])  # row 0's second new token
    out = greedy_generate(m, ids, mask, max_new_tokens=6, pad_token_id=0, eos_token_id=eos)
    row0 = out[0, ids.shape[1] :].tolist()
    assert row0[:2] == free[0, ids.shape[1] : ids.shape[1] + 2].tolist()
    assert all(t == 0 for t in row0[2:])
    hf_out = m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=eos)
    assert out.tolist() == hf_out.tolist()


# ----------------------------------------------------------------------------------------------------------------------
# Other inputs transformers may hand over


def test_a_users_4d_mask_is_honoured_as_given():
    docs = [tokens(5, 101), tokens(4, 102)]
    ids = torch.tensor([docs[0] + docs[1]])
    block = document(seq_lens=[5, 4]) & causal()
    with torch.no_grad():
        logits = model("llama")(ids, attention_mask=block.to_dense(9)[:, None]).logits
    assert_docs_match("llama", [docs], logits)


def test_mask_function_overlays_are_evaluated_exactly():
    def prefix_or_causal(b, h, q, k):  # a model's or-overlay: the first 2 keys are visible to everyone
        return (k <= q) | (k < 2)

    info = hf.build_mask_info(2, 5, 5, mask_function=prefix_or_causal, attention_mask=torch.ones(2, 5), use_vmap=True)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    out, _ = hf.attention_forward(torch.nn.Module(), q, k, v, info, scaling=0.5)
    allowed = torch.tensor([[prefix_or_causal(0, 0, i, j) for j in range(5)] for i in range(5)])
    torch.testing.assert_close(out.transpose(1, 2), naive_attention(q, k, v, allowed, scale=0.5).float())


def test_attention_dropout_in_training_stays_within_documents():
    m = model("llama")
    m.config.attention_dropout = 0.5
    for layer in m.model.layers:
        layer.self_attn.attention_dropout = 0.5
    first, second = tokens(6, 111), tokens(5, 112)
    other_first = tokens(6, 113)
    pos = torch.tensor([list(range(6)) + list(range(5))])
    m.train()
    try:
        with torch.no_grad():
            torch.manual_seed(7)
            a = m(torch.tensor([first + second]), position_ids=pos).logits
            torch.manual_seed(7)
            b = m(torch.tensor([other_first + second]), position_ids=pos).logits
    finally:
        m.eval()
        for layer in m.model.layers:
            layer.self_attn.attention_dropout = 0.0
        m.config.attention_dropout = 0.0
    assert not torch.allclose(a[0, :6], b[0, :6])
    torch.testing.assert_close(a[0, 6:], b[0, 6:], atol=1e-5, rtol=0)


def test_position_ids_shared_by_every_row_split_every_row_into_documents():
    rows = [[tokens(4, 121), tokens(3, 122)], [tokens(4, 123), tokens(3, 124)]]
    ids = torch.tensor([r[0] + r[1] for r in rows])
    with torch.no_grad():
        logits = model("qwen2")(ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2]])).logits
    assert_docs_match("qwen2", rows, logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_and_padded_forwards_build_no_quadratic_mask(family, monkeypatch):
    import transformers.masking_utils as mu

    from attnmask import masks

    seqs = [ROWS[0][0], ROWS[1][0]]
    ids, mask = padded_batch(seqs, "right")
    expected = [alone(family, s) for s in seqs]

    def refuse(*args, **kwargs):
        raise AssertionError("an O(Q·K) mask was built")

    for name in ("sdpa_mask", "eager_mask"):
        monkeypatch.setattr(mu, name, refuse)
    monkeypatch.setattr(masks.MaskSpec, "to_dense", refuse)
    m = model(family)
    m.config._attn_implementation = hf.register("attnmask_varlen_test", backend="varlen")
    try:
        with torch.no_grad():
            padded_logits = m(ids, attention_mask=mask).logits
            packed_logits = m(**packed_batch(ROWS, length=15)).logits
    finally:
        m.config._attn_implementation = "attnmask"
    monkeypatch.undo()
    for r, s in enumerate(seqs):
        torch.testing.assert_close(padded_logits[r, : len(s)], expected[r], atol=1e-4, rtol=0)
    assert_docs_match(family, ROWS, packed_logits)


def test_padding_queries_get_exactly_zero_and_real_queries_see_real_keys():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    info = hf.build_mask_info(2, 5, 5, attention_mask=mask)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    out, _ = hf.attention_forward(torch.nn.Module(), q, k, v, info)  # (B, Q, H, D)
    expected = naive_attention(q, k, v, naive_dense(causal() & key_padding(mask), 5, 5)[:, None]).float()
    real = mask.bool()
    assert out[~real].eq(0).all()
    torch.testing.assert_close(out[real], expected.transpose(1, 2)[real])
