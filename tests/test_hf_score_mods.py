"""Models whose attention carries a score modifier, through ``attn_implementation="attnmask"``: Gemma2's logit
softcapping and gpt-oss's attention sinks are honoured (padded, left-padded and packed batches equal each sequence
alone under transformers' eager attention), never refused or dropped."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnmask.errors import BackendError  # noqa: E402
from attnmask.integrations import hf  # noqa: E402
from tests.hf_models import COMMON, packed_batch, padded_batch, tokens  # noqa: E402  # noqa: E402

# Weights large enough that scores reach the softcap and compete with the sinks (the default 0.02 leaves every score
# near 0, where neither modifier changes anything).
LOUD = dict(COMMON, head_dim=8, initializer_range=0.5, sliding_window=4)


def gemma2(impl: str, softcap: float | None = 1.0):
    config = transformers.Gemma2Config(**LOUD, query_pre_attn_scalar=8, attn_logit_softcapping=softcap)
    return _build(transformers.Gemma2ForCausalLM, config, impl)


def gpt_oss(impl: str):
    config = transformers.GptOssConfig(**LOUD, num_local_experts=2, num_experts_per_tok=1)
    return _build(transformers.GptOssForCausalLM, config, impl)


def _build(model_cls, config, impl):
    hf.register()
    torch.manual_seed(0)
    return model_cls._from_config(config, attn_implementation=impl).eval()


MODELS = {"gemma2 softcap": gemma2, "gpt-oss sinks": gpt_oss}


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
    """The model under attnmask and under eager attention, same weights."""
    ours, eager = MODELS[request.param]("attnmask"), MODELS[request.param]("eager")
    eager.load_state_dict(ours.state_dict())
    return ours, eager


def alone(eager, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return eager(torch.tensor([ids])).logits[0]


SEQS = [tokens(10, 71), tokens(3, 72), tokens(7, 73)]


def test_right_padded_batch_equals_each_sequence_alone(pair):
    ours, eager = pair
    ids, mask = padded_batch(SEQS, "right")
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask).logits
    for r, s in enumerate(SEQS):
        torch.testing.assert_close(logits[r, : len(s)], alone(eager, s), atol=1e-4, rtol=0)


def test_left_padded_batch_equals_each_sequence_alone(pair):
    ours, eager = pair
    ids, mask = padded_batch(SEQS, "left")
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask, position_ids=position_ids).logits
    assert torch.isfinite(logits).all()
    for r, s in enumerate(SEQS):
        torch.testing.assert_close(logits[r, -len(s) :], alone(eager, s), atol=1e-4, rtol=0)


def test_packed_row_equals_each_document_alone(pair):
    ours, eager = pair
    batch = packed_batch([SEQS], length=22)
    with torch.no_grad():
        logits = ours(**batch).logits
    start = 0
    for s in SEQS:
        torch.testing.assert_close(logits[0, start : start + len(s)], alone(eager, s), atol=1e-4, rtol=0)
        start += len(s)


def test_the_softcap_changes_these_logits():
    capped, uncapped = gemma2("attnmask"), gemma2("attnmask", softcap=None)
    uncapped.load_state_dict(capped.state_dict())
    ids = torch.tensor([SEQS[0]])
    with torch.no_grad():
        assert (capped(ids).logits - uncapped(ids).logits).abs().max() > 1e-2


def test_the_sinks_change_these_logits():
    model = gpt_oss("attnmask")
    ids = torch.tensor([SEQS[0]])
    with torch.no_grad():
        before = model(ids).logits
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(-30.0)  # a sink that takes no weight: plain attention
        assert (model(ids).logits - before).abs().max() > 1e-2


def test_gpt_oss_trains_its_sinks():
    model = gpt_oss("attnmask").train()
    batch = packed_batch([SEQS], length=22)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels).loss.backward()
    grads = [layer.self_attn.sinks.grad for layer in model.model.layers]
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_sinks_given_twice_are_refused():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(BackendError, match="^sinks: expected None when 's_aux' is given"):
        hf.attention_forward(torch.nn.Module(), q, k, k, None, s_aux=torch.zeros(4), sinks=torch.zeros(4))


def test_left_padded_greedy_generation_equals_each_prompt_alone(pair):
    ours, eager = pair
    ids, mask = padded_batch(SEQS, "left")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = ours.generate(ids, attention_mask=mask, **kw)
    for r, p in enumerate(SEQS):
        expected = eager.generate(torch.tensor([p]), **kw)[0, len(p) :]
        assert out[r, ids.shape[1] :].tolist() == expected.tolist()
