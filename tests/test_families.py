"""Every transformers causal, seq2seq and masked-LM family as a tiny random model under
``attn_implementation="attnmask"``: each scenario (padded batches, packed rows, greedy generation; see
tests/families.py) equals each sequence run alone under eager attention, or is refused with a typed error. A silent
difference (WRONG) or a raw exception (CRASH) fails. Families whose attention does not go through
``AttentionInterface`` are held to the same rule: attnmask's mask function still reaches them, so they must run
exactly or refuse, never crash on it or mix packed documents.

Today's failures are listed in ``KNOWN_FAILURES`` (strict xfail): a fix flips the family's test to XPASS, which fails
until its entry is removed. The README's "Model families" table is the sweep's, checked here so it cannot go stale.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tests import families  # noqa: E402

THROUGH, OTHERS = families.attention_families()
README = Path(__file__).resolve().parents[1] / "README.md"

# family id -> "scenarios: what is wrong", as the sweep found them (transformers 5.23.0; `python -m tests.families
# --known` prints these lines). Remove an entry when its fix lands: the strict xfail then reports XPASS. The causes, as
# far as they are known (details in the sweep's notes): CRASH = attnmask's mask object reaches model code that uses
# the mask as a tensor; WRONG on packed rows = the document boundaries never reach the attention (no position_ids in
# the forward, or a KV cache turns transformers' packed detection off) or layers outside attention (state-space,
# linear attention, convolutions) mix the documents; nllb-moe / pegasus_x (/ bigbird_pegasus) = decoder
# self-attention built is_decoder=True, is_causal=False, taken for cross-attention.
KNOWN_FAILURES = {
    "axk2": "every scenario: CRASH (TypeError: 'HFMaskInfo' object is not subscriptable)",
    "bailing_hybrid": "packed, packed+cache: WRONG (6)",
    "bamba": "packed, packed+cache: WRONG (5.2)",
    "bart (causal)": "packed, packed+cache: WRONG (0.45)",
    "big_bird (causal)": "every scenario: CRASH (TypeError: unsupported operand type(s) for +: 'Tensor' and 'HFMask...",
    "big_bird (encoder)": "every scenario: CRASH (TypeError: unsupported operand type(s) for +: 'Tensor' and 'HFMas...",
    "bigbird_pegasus (causal)": "right-padded: WRONG (0.042); left-padded, packed, packed+cache: WRONG (0.1); gener...",
    "bigbird_pegasus (seq2seq)": "every scenario: CRASH (TypeError: unsupported operand type(s) for +: 'Tensor' and...",
    "blenderbot (causal)": "packed, packed+cache: WRONG (0.52)",
    "blenderbot-small (causal)": "packed, packed+cache: WRONG (0.01)",
    "bloom": "every scenario: CRASH (TypeError: unsupported operand type(s) for +: 'Tensor' and 'HFMaskInfo')",
    "codegen": "every scenario: CRASH (TypeError: unsupported operand type(s) for +: 'Tensor' and 'HFMaskInfo')",
    "convbert": "every scenario: CRASH (TypeError: unsupported operand type(s) for +: 'Tensor' and 'HFMaskInfo')",
    "cpmant": "packed, packed+cache: WRONG (24)",
    "ctrl": "packed+cache: WRONG (2.5)",
    "deberta": "packed: WRONG (4.1)",
    "deberta-v2": "packed: WRONG (4.8)",
    "deepseek_v32": "every scenario: CRASH (TypeError: 'HFMaskInfo' object is not subscriptable)",
    "distilbert": "packed: WRONG (3.4)",
    "doge": "every scenario: CRASH (AttributeError: 'HFMaskInfo' object has no attribute 'dtype')",
    "esm": "packed: WRONG (4.5)",
    "falcon_h1": "packed, packed+cache: WRONG (2)",
    "falcon_mamba": "packed, packed+cache: WRONG (2.3)",
    "flaubert": "packed: WRONG (0.003)",
    "fnet": "packed: WRONG (4.6)",
    "fuyu": "packed+cache: WRONG (4.4)",
    "glm_moe_dsa": "every scenario: CRASH (TypeError: 'HFMaskInfo' object is not subscriptable)",
    "gpt_bigcode": "packed+cache: WRONG (4.8)",
    "gpt_neox_japanese": "every scenario: CRASH (TypeError: unsupported operand type(s) for +: 'Tensor' and 'HFMask...",
    "granitemoehybrid": "packed, packed+cache: WRONG (4.5)",
    "gte": "packed: WRONG (3.6)",
    "hy_v4": "every scenario: CRASH (TypeError: 'HFMaskInfo' object is not subscriptable)",
    "ibert": "every scenario: CRASH (TypeError: unsupported operand type(s) for +: 'Tensor' and 'HFMaskInfo')",
    "jamba": "packed, packed+cache: WRONG (5.9)",
    "jina_embeddings_v3": "packed: WRONG (1.1)",
    "kimi_linear": "packed, packed+cache: WRONG (6.1)",
    "layoutlm": "packed: WRONG (1.3)",
    "led": "every scenario: CRASH (AttributeError: 'HFMaskInfo' object has no attribute 'size')",
    "lfm2_moe": "packed, packed+cache: WRONG (4.6)",
    "lfm3": "packed, packed+cache: WRONG (4.6)",
    "llama4": "packed+cache: WRONG (5.3)",
    "llama4_text": "packed+cache: WRONG (5.3)",
    "longformer": "every scenario: CRASH (TypeError: 'HFMaskInfo' object is not subscriptable)",
    "luke": "every scenario: CRASH (TypeError: unsupported operand type(s) for +: 'Tensor' and 'HFMaskInfo')",
    "mamba": "packed, packed+cache: WRONG (2.3)",
    "mamba2": "packed, packed+cache: WRONG (3.5)",
    "marian (causal)": "packed, packed+cache: WRONG (0.39)",
    "mbart (causal)": "packed, packed+cache: WRONG (0.45)",
    "megatron-bert (causal)": "every scenario: CRASH (TypeError: unsupported operand type(s) for +: 'Tensor' and 'H...",
    "megatron-bert (encoder)": "every scenario: CRASH (TypeError: unsupported operand type(s) for +: 'Tensor' and '...",
    "minimax": "packed, packed+cache: WRONG (3.3)",
    "mobilebert": "packed: WRONG (4)",
    "mpnet": "every scenario: CRASH (TypeError: unsupported operand type(s) for +: 'Tensor' and 'HFMaskInfo')",
    "mpt": "every scenario: CRASH (TypeError: masked_fill() received an invalid combination of arguments - got (HFM...",
    "mra": "packed: WRONG (4.6)",
    "mvp (causal)": "every scenario: CRASH (AttributeError: 'HFMaskInfo' object has no attribute 'size')",
    "mvp (seq2seq)": "every scenario: CRASH (AttributeError: 'HFMaskInfo' object has no attribute 'size')",
    "nemo_speechlm": "packed, packed+cache: WRONG (6.1)",
    "nemotron_h": "packed, packed+cache: WRONG (3.4)",
    "nllb-moe": "decoder shorter: WRONG (0.0068); decoder equal: WRONG (0.0067); decoder longer: WRONG (0.0074)",
    "nystromformer": "every scenario: CRASH (TypeError: unsupported operand type(s) for +: 'Tensor' and 'HFMaskInfo')",
    "olmo_hybrid": "packed, packed+cache: WRONG (4.9)",
    "openai-gpt": "packed, packed+cache: WRONG (0.071)",
    "pegasus (causal)": "packed, packed+cache: WRONG (0.4)",
    "pegasus_x": "decoder shorter: WRONG (0.0075); decoder equal: WRONG (0.0085); decoder longer: WRONG (0.008)",
    "perceiver": "every scenario: CRASH (TypeError: unsupported operand type(s) for +: 'Tensor' and 'HFMaskInfo')",
    "persimmon": "packed+cache: WRONG (4.9)",
    "plbart (causal)": "packed, packed+cache: WRONG (1.2)",
    "qwen3_5": "packed, packed+cache: WRONG (4.5)",
    "qwen3_5_moe": "packed, packed+cache: WRONG (4.4)",
    "qwen3_5_moe_text": "packed, packed+cache: WRONG (4.4)",
    "qwen3_5_text": "packed, packed+cache: WRONG (4.5)",
    "qwen3_next": "packed, packed+cache: WRONG (5.2)",
    "recurrent_gemma": "packed: WRONG (0.056); packed+cache: WRONG (0.48)",
    "rembert (causal)": "every scenario: CRASH (TypeError: unsupported operand type(s) for +: 'Tensor' and 'HFMaskI...",
    "rembert (encoder)": "every scenario: CRASH (TypeError: unsupported operand type(s) for +: 'Tensor' and 'HFMask...",
    "roformer (causal)": "every scenario: CRASH (TypeError: unsupported operand type(s) for +: 'Tensor' and 'HFMask...",
    "roformer (encoder)": "every scenario: CRASH (TypeError: unsupported operand type(s) for +: 'Tensor' and 'HFMas...",
    "rwkv": "packed, packed+cache: WRONG (1.9)",
    "squeezebert": "every scenario: CRASH (TypeError: unsupported operand type(s) for +: 'Tensor' and 'HFMaskInfo')",
    "t5gemma2": "every scenario: CRASH (TypeError: expected Tensor as element 0 in argument 0, but got HFMaskInfo)",
    "tapas": "every scenario: CRASH (TypeError: unsupported operand type(s) for +: 'Tensor' and 'HFMaskInfo')",
    "trocr": "every scenario: CRASH (AttributeError: 'HFMaskInfo' object has no attribute 'size')",
    "whisper": "packed+cache: WRONG (0.24)",
    "xglm": "every scenario: CRASH (AttributeError: 'HFMaskInfo' object has no attribute 'size')",
    "xlm": "packed, packed+cache: WRONG (0.003)",
    "xlnet": "packed, packed+cache: WRONG (2.8)",
    "yoso": "packed: WRONG (4.9)",
    "zaya": "packed: WRONG (6.9); packed+cache: WRONG (5.5)",
}

_RESULTS: dict[str, families.Result] = {}


def result(family: families.Family) -> families.Result:
    """The family's sweep, once per process (the README test reuses what the family tests ran)."""
    if family.id not in _RESULTS:
        _RESULTS[family.id] = families.sweep_family(family, through=family in THROUGH)
    return _RESULTS[family.id]


def _param(family: families.Family):
    reason = KNOWN_FAILURES.get(family.id)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(family, id=family.id, marks=marks)


@pytest.mark.parametrize("family", [_param(f) for f in families.all_families()])
def test_every_scenario_is_exact_or_refused(family):
    found = result(family)
    if found.not_built:
        pytest.skip(f"no tiny model: {found.not_built}")
    failed = {s: str(o) for s, o in found.outcomes.items() if o.status in ("WRONG", "CRASH")}
    assert not failed, failed


def test_known_failures_name_swept_families_with_a_reason():
    ids = {f.id for f in families.all_families()}
    assert set(KNOWN_FAILURES) <= ids, set(KNOWN_FAILURES) - ids
    assert all(reason.strip() for reason in KNOWN_FAILURES.values())


def test_discovery_reads_the_library():
    """Families come from transformers' auto mappings, and the criterion splits them (Llama through the interface,
    GPT-J with its own attention classes not)."""
    ids = {f.id for f in THROUGH}
    assert {"llama", "gpt2", "t5", "bart (seq2seq)", "bert (encoder)"} <= ids
    assert "gptj" in {f.id for f in OTHERS}
    assert len(THROUGH) + len(OTHERS) == len(families.all_families())


def test_readme_table_is_the_sweeps():
    """README.md's "Model families" section holds what ``python -m tests.families --table`` prints."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Model families\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert section, "README.md has no '## Model families' section"
    expected = families.table([result(f) for f in families.all_families()])
    if expected not in section.group(1):
        found = set(section.group(1).splitlines())
        stale = [line for line in expected.splitlines() if line not in found]
        pytest.fail(f"README table is stale (`python -m tests.families --table` prints it); expected lines: {stale}")


def _family(model_type: str) -> families.Family:
    return next(f for f in families.all_families() if f.model_type == model_type)


def _register(name: str, forward) -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(name, forward)
    return name


def test_an_attention_that_ignores_the_mask_is_classified_wrong():
    """The classifier can fail: transformers' sdpa called without its mask (causal only) is exact on right-padded
    rows (padding comes last) and WRONG on left-padded and packed ones."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def maskless(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    found = families.sweep_family(_family("llama"), impl=_register("families-test-maskless", maskless))
    status = {scenario: outcome.status for scenario, outcome in found.outcomes.items()}
    assert status["right-padded"] == "exact"
    assert status["left-padded"] == status["packed"] == "WRONG"


def test_typed_errors_are_refusals_and_other_errors_crashes():
    from attnmask.errors import BackendError

    def refusing(module, query, key, value, attention_mask, **kwargs):
        raise BackendError("softcap: expected None, got 1.0")

    def crashing(module, query, key, value, attention_mask, **kwargs):
        return attention_mask + query

    refused = families.sweep_family(_family("llama"), impl=_register("families-test-refusing", refusing))
    assert {o.status for o in refused.outcomes.values()} == {"refused"}
    assert "BackendError: softcap" in refused.outcomes["packed"].detail
    crashed = families.sweep_family(_family("llama"), impl=_register("families-test-crashing", crashing))
    assert {o.status for o in crashed.outcomes.values()} == {"CRASH"}
