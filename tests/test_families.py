"""Every transformers causal, seq2seq and masked-LM family as a tiny random model under
``attn_implementation="attnmask"``: each scenario (padded batches, packed rows, greedy generation; see
tests/families.py) equals each sequence run alone under eager attention, or is refused with a typed error. A silent
difference (WRONG) or a raw exception (CRASH) fails. Families whose attention does not go through
``AttentionInterface`` are held to the same rule where attnmask's mask function reaches them; where neither of
attnmask's functions is ever called (the model keeps its own attention, or has none), a packed row that mixes documents
is ``not reached`` and must be flagged by `hf.check_packed_inputs` (a warning and False), never passed as exact.

Failures found and not yet fixed go in ``KNOWN_FAILURES`` (strict xfail): a fix flips the family's test to XPASS,
which fails until its entry is removed. The README's "Model families" table is the sweep's, checked here so it
cannot go stale.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tests import families  # noqa: E402

THROUGH, OTHERS = families.attention_families()
README = Path(__file__).resolve().parents[1] / "README.md"

# family id -> "scenarios: what is wrong", as the sweep finds them (`python -m tests.families --known` prints these
# lines). Remove an entry when its fix lands: the strict xfail then reports XPASS. Empty since every family is exact,
# refused, or (outside AttentionInterface only) not reached by attnmask with `hf.check_packed_inputs` warning.
KNOWN_FAILURES: dict[str, str] = {}

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
    bad = ("WRONG", "CRASH") if not found.through else ("WRONG", "CRASH", "not reached")
    failed = {s: str(o) for s, o in found.outcomes.items() if o.status in bad}
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
