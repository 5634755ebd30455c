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
KNOWN_FAILURES: dict[str, str] = {}

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
