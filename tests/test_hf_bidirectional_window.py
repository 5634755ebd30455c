"""Bidirectional sliding windows (ModernBERT's local layers: a token sees keys within ``config.sliding_window``
positions on either side) through attnmask, against each sequence alone with eager attention."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnmask as am  # noqa: E402
from attnmask import masks as M  # noqa: E402
from attnmask.errors import BackendError, UnsupportedModelError  # noqa: E402
from attnmask.integrations import hf  # noqa: E402

SEQS = [list(range(5, 14)), [10, 11, 12], list(range(20, 26))]  # longer than the window: it matters
_MODELS: dict[str, torch.nn.Module] = {}


def model(impl: str = "attnmask") -> torch.nn.Module:
    if impl not in _MODELS:
        hf.register()
        config = transformers.ModernBertConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            local_attention=4,  # |q - k| <= 2
            global_attn_every_n_layers=2,  # layer 0 full, layer 1 local
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
            initializer_range=0.3,  # far from uniform attention, so that the window shows in the logits
        )
        torch.manual_seed(0)
        m = transformers.AutoModelForMaskedLM.from_config(config, attn_implementation=impl).eval()
        if impl != "attnmask":
            m.load_state_dict(model().state_dict())
        _MODELS[impl] = m
    return _MODELS[impl]


def alone(seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model("eager")(input_ids=torch.tensor([seq])).logits[0]


def test_the_local_layer_is_a_bidirectional_window_that_changes_the_logits():
    assert model().config.layer_types == ["full_attention", "sliding_attention"]
    wide = transformers.AutoModelForMaskedLM.from_config(
        transformers.ModernBertConfig(**{**model().config.to_dict(), "local_attention": 64}),
        attn_implementation="eager",
    ).eval()
    wide.load_state_dict(model().state_dict())
    with torch.no_grad():
        assert (wide(input_ids=torch.tensor([SEQS[0]])).logits[0] - alone(SEQS[0])).abs().max() > 1e-2


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_each_sequence_alone(side):
    length = max(map(len, SEQS))
    pads = [[0] * (length - len(s)) for s in SEQS]
    ids = torch.tensor([s + p if side == "right" else p + s for s, p in zip(SEQS, pads, strict=True)])
    with torch.no_grad():
        logits = model()(input_ids=ids, attention_mask=(ids != 0).long()).logits
    for r, s in enumerate(SEQS):
        got = logits[r, : len(s)] if side == "right" else logits[r, length - len(s) :]
        torch.testing.assert_close(got, alone(s), atol=1e-4, rtol=0)


def recorded_specs(monkeypatch) -> list:
    specs, original = [], hf.attention
    monkeypatch.setattr(
        hf, "attention", lambda q, k, v, spec, **kw: specs.append(spec) or original(q, k, v, spec, **kw)
    )
    return specs


def test_the_local_layer_runs_a_structural_local_window_of_the_configs_width_with_the_padding(monkeypatch):
    """``local_attention=4`` is ``config.sliding_window = 2`` (``abs(q - k) <= 2``) although the layer tells its
    attention ``sliding_window=3`` (flash-attn's convention): the window comes from transformers' mask."""
    specs = recorded_specs(monkeypatch)
    ids = torch.tensor([SEQS[0], SEQS[1] + [0] * 6])
    with torch.no_grad():
        model()(input_ids=ids, attention_mask=(ids != 0).long())
    local = [s for s in specs if any(isinstance(p, M.LocalWindow) for p in s.walk())]
    assert len(local) == 1 and len(specs) == 2  # the full layer and the local one
    assert local[0].is_structural
    assert [p for p in local[0].walk() if isinstance(p, M.LocalWindow)] == [am.local_window(2, 2)]
    real = (ids != 0)[:, :, None]  # queries at padding positions: their outputs are unused
    want = (am.local_window(2, 2) & am.key_padding(ids != 0)).to_dense(9)
    assert torch.equal(local[0].to_dense(9) & real, want & real)


def test_the_bidirectional_window_is_read_from_transformers_own_predicate():
    masking_utils = pytest.importorskip("transformers.masking_utils")
    for w in (0, 1, 5):
        fn = masking_utils.sliding_window_bidirectional_mask_function(w)
        info = hf.build_mask_info(2, 7, 7, mask_function=fn)
        assert info.bidirectional_window == w and info.causal is False
        q, k = torch.arange(7).view(-1, 1), torch.arange(7).view(1, -1)
        assert torch.equal(am.local_window(w, w).to_dense(7)[0], fn(torch.tensor(0), torch.tensor(0), q, k))
    for other in (masking_utils.bidirectional_mask_function, masking_utils.causal_mask_function):
        assert hf.build_mask_info(1, 4, 4, mask_function=other).bidirectional_window is None


def test_spec_for_call_builds_a_local_window_only_for_a_bidirectional_call():
    padding = torch.tensor([[True, True, True, False]])
    spec = hf.spec_for_call(is_causal=False, bidirectional_window=1, padding=padding)
    assert torch.equal(spec.to_dense(4), (am.local_window(1, 1) & am.key_padding(padding)).to_dense(4))
    with pytest.raises(BackendError, match="bidirectional_window"):
        hf.spec_for_call(is_causal=True, bidirectional_window=1)
    with pytest.raises(BackendError, match="sliding_window"):
        hf.spec_for_call(is_causal=False, window=3)


def test_a_packed_row_is_refused_since_transformers_never_tells_a_bidirectional_mask_about_packing():
    ids = torch.tensor([SEQS[0] + SEQS[1]])
    position_ids = torch.tensor([list(range(len(SEQS[0]))) + list(range(len(SEQS[1])))])
    with torch.no_grad(), pytest.raises(UnsupportedModelError, match=r"model type 'modernbert' does not hand"):
        model()(input_ids=ids, position_ids=position_ids)


def test_a_packed_row_with_boundaries_at_the_attention_keeps_the_bidirectional_window_inside_each_document():
    """Ultrabert hands its attention ``position_ids``: transformers' bidirectional-window predicate knows nothing of
    the documents, attnmask adds them, so each document of a packed row gets its logits alone."""
    config = transformers.AutoConfig.for_model(
        "ultrabert",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=2,
        layer_types=["sliding_attention", "full_attention"],
        prediction_head_size=32,
        initializer_range=0.3,
    )
    hf.register()
    torch.manual_seed(0)
    ours = transformers.AutoModelForMaskedLM.from_config(copy.deepcopy(config), attn_implementation="attnmask").eval()
    eager = transformers.AutoModelForMaskedLM.from_config(config, attn_implementation="eager").eval()
    eager.load_state_dict(ours.state_dict())
    ids = torch.tensor([SEQS[0] + SEQS[2]])
    position_ids = torch.tensor([list(range(len(SEQS[0]))) + list(range(len(SEQS[2])))])
    with torch.no_grad():
        logits = ours(input_ids=ids, position_ids=position_ids).logits[0]
        start = 0
        for seq in (SEQS[0], SEQS[2]):
            alone = eager(input_ids=torch.tensor([seq])).logits[0]
            torch.testing.assert_close(logits[start : start + len(seq)], alone, atol=1e-4, rtol=0)
            start += len(seq)
        across = eager(input_ids=ids, position_ids=position_ids).logits[0]  # the control: eager attends across
        assert (
            across[len(SEQS[0]) - 2 : len(SEQS[0]) + 2] - logits[len(SEQS[0]) - 2 : len(SEQS[0]) + 2]
        ).abs().max() > 1e-2
