"""Risky but legal situations go to the ``attnmask`` logger, never to print: a dense mask above 1 GiB, and packed
``position_ids`` meeting a model whose attention is not attnmask's."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
import torch

import attnmask as am
from attnmask import _dense

PACKAGE = Path(am.__file__).resolve().parent


def test_a_dense_mask_above_the_limit_is_logged_before_it_is_allocated(caplog, monkeypatch):
    assert _dense.DENSE_WARN_BYTES == 2**30
    with caplog.at_level(logging.WARNING, logger="attnmask"):
        _dense.warn_if_large((1, 32768, 32769), torch.bool)  # 1.0 GiB + 32 KiB: only the size is computed
    assert [r.name for r in caplog.records] == ["attnmask"]
    assert "(1, 32768, 32769)" in caplog.text and "1.0 GiB" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="attnmask"):
        _dense.warn_if_large((1, 32768, 32768), torch.bool)  # exactly 1 GiB
    assert not caplog.records

    monkeypatch.setattr(_dense, "DENSE_WARN_BYTES", 300)
    spec = am.causal() & am.sliding_window(4)
    with caplog.at_level(logging.WARNING, logger="attnmask"):
        spec.to_dense(16)  # 256 bytes: below
        assert not caplog.records
        spec.to_dense(18)  # 324 bytes
        spec.to_additive(16, dtype=torch.float16)  # 512 bytes
    assert len(caplog.records) == 2 and all(r.levelno == logging.WARNING for r in caplog.records)
    assert "(1, 18, 18) (torch.bool" in caplog.records[0].getMessage()
    assert "(1, 16, 16) (torch.float16" in caplog.records[1].getMessage()
    caplog.clear()
    # the dense mask a backend builds from a padded spec directly (contract._padded_band) is logged as to_dense logs it
    from attnmask.attention import _prepare_call
    from attnmask.backends import contract

    q = torch.zeros(2, 1, 18, 4)
    with caplog.at_level(logging.WARNING, logger="attnmask"):
        call = _prepare_call(q, q, q, am.causal() & am.key_padding(torch.ones(2, 18)), None, None, None)
        assert contract._padded_band(call) is not None
    assert len(caplog.records) == 1 and "(2, 18, 18) (torch.bool" in caplog.records[0].getMessage()


def test_the_library_never_prints_outside_the_command_line_and_the_demo():
    printing = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("cli.py", "chatcli.py", "demo.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                printing.append(f"{path.name}:{node.lineno}")
    assert printing == []


# ----------------------------------------------------------------------------------------------------------------------
# Packed position_ids on a model whose attention is not attnmask's


@pytest.fixture(scope="module")
def llama():
    transformers = pytest.importorskip("transformers")
    from tests.hf_models import COMMON

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(transformers.LlamaConfig(**COMMON), attn_implementation="sdpa")


def _exact(model, inputs, seqs) -> bool:
    """Whether every document of the packed row gets the logits it gets alone (the truth the check must tell)."""
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        at = 0
        for s in seqs:
            alone = model(torch.tensor([s])).logits[0]
            if not torch.allclose(logits[at : at + len(s)], alone, atol=1e-4, rtol=0):
                return False
            at += len(s)
    return True


def test_packed_inputs_on_stock_attention_are_logged_and_judged_as_they_behave(llama, caplog):
    from attnmask.integrations import hf
    from tests.hf_models import tokens

    llama.eval()
    seqs = [tokens(n, 400 + n) for n in (5, 3, 6)]
    batch = am.pack([len(s) for s in seqs], 14, strategy="ordered").collate(seqs, pad_id=0, pad_to="longest")
    collated = batch.model_inputs(labels=False)
    cases = {
        "collator output": collated,
        "with an attention_mask": {**collated, "attention_mask": batch.attention_mask},
        "with use_cache=True": {**collated, "use_cache": True},
    }
    for name, inputs in cases.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="attnmask"):
            verdict = hf.check_packed_inputs(llama, inputs)
        assert verdict == _exact(llama, inputs, seqs), name
        assert [r.name for r in caplog.records] == ["attnmask"], name
        assert "packed position_ids meet attn_implementation='sdpa'" in caplog.text, name
        assert ("attend across" in caplog.text) == (not verdict), name


def test_no_warning_for_attnmask_attention_or_unpacked_rows(caplog):
    pytest.importorskip("transformers")
    from attnmask.integrations import hf
    from tests.hf_models import model

    packed = am.pack([3, 2], 8).collate([[1, 2, 3], [4, 5]], pad_id=0).model_inputs()
    padded = am.pad([[1, 2, 3], [4, 5]], pad_id=0).model_inputs()
    with caplog.at_level(logging.WARNING, logger="attnmask"):
        assert hf.check_packed_inputs(model("llama", "attnmask"), {**packed, "attention_mask": torch.ones(1, 8)})
        assert hf.check_packed_inputs(model("llama", "sdpa"), padded)
    assert not caplog.records
