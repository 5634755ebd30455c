"""Every transformers causal, seq2seq and masked-LM family whose attention goes through ``AttentionInterface``, as a
tiny random model under ``attn_implementation="attnmask"``: each scenario (padded batches, packed rows, greedy
generation; see tests/families.py) equals each sequence run alone under eager attention, or is refused with a typed
error. A silent difference (WRONG) or a raw exception (CRASH) fails.

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

# family id -> "scenario: what is wrong", as the sweep found them (transformers 5.23.0). Remove an entry when its fix
# lands (the strict xfail then reports XPASS).
KNOWN_FAILURES = {
    # The mask object reaches model code that indexes or adds it as a tensor (DeepSeek-sparse indexers, Doge, ...)
    "axk2": "every scenario: CRASH (TypeError: 'HFMaskInfo' object is not subscriptable)",
    "deepseek_v32": "every scenario: CRASH (TypeError: 'HFMaskInfo' object is not subscriptable)",
    "glm_moe_dsa": "every scenario: CRASH (TypeError: 'HFMaskInfo' object is not subscriptable)",
    "hy_v4": "every scenario: CRASH (TypeError: 'HFMaskInfo' object is not subscriptable)",
    "doge": "every scenario: CRASH (AttributeError: 'HFMaskInfo' object has no attribute 'dtype')",
    "bigbird_pegasus (seq2seq)": "every scenario: CRASH (TypeError: Tensor + 'HFMaskInfo')",
    "t5gemma2": "every scenario: CRASH (TypeError: expected Tensor as element 0 in argument 0, but got HFMaskInfo)",
    # Decoder self-attention built is_decoder=True, is_causal=False (the causal mask is transformers'): taken for
    # cross-attention, so attended bidirectionally
    "nllb-moe": "decoder shorter/equal/longer: WRONG (0.007), even one unpadded pair",
    "pegasus_x": "decoder shorter/equal/longer: WRONG (0.008), even one unpadded pair",
    "bigbird_pegasus (causal)": "every scenario: WRONG (0.04-0.1; generated tokens differ)",
    # Packed rows whose boundaries never reach the attention (the forward takes no position_ids, or positions are
    # recomputed), or whose mixing outside attention (state-space / linear-attention layers) crosses documents
    "bart (causal)": "packed, packed+cache: WRONG (0.45)",
    "blenderbot (causal)": "packed, packed+cache: WRONG (0.52)",
    "blenderbot-small (causal)": "packed, packed+cache: WRONG (0.01)",
    "marian (causal)": "packed, packed+cache: WRONG (0.63)",
    "mbart (causal)": "packed, packed+cache: WRONG (0.45)",
    "pegasus (causal)": "packed, packed+cache: WRONG (0.40)",
    "plbart (causal)": "packed, packed+cache: WRONG (0.12)",
    "distilbert": "packed: WRONG (0.004)",
    "gte": "packed: WRONG (0.002)",
    "jina_embeddings_v3": "packed: WRONG (0.003)",
    "layoutlm": "packed: WRONG (0.001)",
    "bailing_hybrid": "packed, packed+cache: WRONG (0.48), linear-attention layers",
    "falcon_h1": "packed, packed+cache: WRONG (5e-4), mamba layers",
    "kimi_linear": "packed, packed+cache: WRONG (0.32), linear-attention layers",
    "lfm3": "packed, packed+cache: WRONG (0.23), convolution layers",
    "minimax": "packed, packed+cache: WRONG (0.02), lightning-attention layers",
    "nemotron_h": "packed, packed+cache: WRONG (0.17), mamba layers",
    "olmo_hybrid": "packed, packed+cache: WRONG (0.04), linear-attention layers",
    "qwen3_5": "packed, packed+cache: WRONG (0.02), gated delta-net layers",
    "qwen3_5_moe": "packed, packed+cache: WRONG (0.03), gated delta-net layers",
    "qwen3_5_moe_text": "packed, packed+cache: WRONG (0.03), gated delta-net layers",
    "qwen3_5_text": "packed, packed+cache: WRONG (0.02), gated delta-net layers",
    "qwen3_next": "packed, packed+cache: WRONG (0.02), gated delta-net layers",
    "zaya": "packed: WRONG (0.17); packed+cache: WRONG (0.16)",
    # Packed rows exact without a cache, across documents with one (use_cache=True)
    "ctrl": "packed+cache: WRONG (0.006)",
    "fuyu": "packed+cache: WRONG (0.31)",
    "gpt_bigcode": "packed+cache: WRONG (0.09)",
    "llama4": "packed+cache: WRONG (0.55): chunked layers get the documents only from transformers' packed detection",
    "llama4_text": "packed+cache: WRONG (0.55): as llama4",
    "persimmon": "packed+cache: WRONG (0.26)",
    "whisper": "packed+cache: WRONG (0.24)",
}

_RESULTS: dict[str, families.Result] = {}


def result(family: families.Family) -> families.Result:
    """The family's sweep, once per process (the README test reuses what the family tests ran)."""
    if family.id not in _RESULTS:
        _RESULTS[family.id] = families.sweep_family(family)
    return _RESULTS[family.id]


def _param(family: families.Family):
    reason = KNOWN_FAILURES.get(family.id)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(family, id=family.id, marks=marks)


@pytest.mark.parametrize("family", [_param(f) for f in THROUGH])
def test_every_scenario_is_exact_or_refused(family):
    found = result(family)
    if found.not_built:
        pytest.skip(f"no tiny model: {found.not_built}")
    failed = {s: str(o) for s, o in found.outcomes.items() if o.status in ("WRONG", "CRASH")}
    assert not failed, failed


def test_known_failures_name_swept_families_with_a_reason():
    ids = {f.id for f in THROUGH}
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
    expected = families.table([result(f) for f in THROUGH], OTHERS)
    assert expected in section.group(1), "README table is stale: regenerate with `python -m tests.families --table`"
