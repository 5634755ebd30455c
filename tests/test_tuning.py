"""Measured tuning of "auto" (attnmask.tuning): the fastest timed candidate runs, results stay exact, the caller's
graph, gradients and random stream are untouched, and what cannot be tuned is left to the estimates."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time

import pytest
import torch

import attnmask as am
from attnmask import tuning
from tests.naive import naive_attention

A = importlib.import_module("attnmask.attention")  # the module; `attnmask.attention` is the function


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(A._workers, "contended", lambda: False)  # the load joins the key: keep it from flipping
    tuning.clear()
    with am.autotune(False):
        yield
    tuning.clear()


# The "slow" test backend's extra time per call: far above what a descheduled thread adds to the "fast" one's single
# timed call on a busy 2-core CI machine (5 ms did not suffice once: "fast" timed slower).
SLOW = 0.05


def _backend(name: str, cost: float, runs: list, delay: float = 0.0, fails: bool = False) -> A.Backend:
    """A backend that computes the reference result (after ``delay`` seconds), estimated at ``cost``, logging its
    runs into ``runs``."""
    reference = next(b for b in A.REGISTRY if b.name == "reference")

    def run(call):
        runs.append(name)
        if fails:
            raise RuntimeError(f"{name} is broken")
        time.sleep(delay)
        return reference.run(call)

    return A.Backend(name, run, lambda call: cost, dropout=True)


def _registry(monkeypatch, *backends: A.Backend) -> None:
    monkeypatch.setattr(A, "_BACKENDS", {b.name: b for b in backends})


def _qkv(grad: bool = False, L: int = 6):
    torch.manual_seed(0)
    return tuple(torch.randn(1, 2, L, 4, requires_grad=grad) for _ in range(3))


def _expected(q, k, v, spec):
    return naive_attention(q, k, v, spec.to_dense(q.shape[2], k.shape[2]).unsqueeze(1)).to(q.dtype)


def test_the_second_call_of_a_kind_times_the_candidates_and_later_calls_run_the_fastest(monkeypatch):
    runs: list[str] = []
    _registry(monkeypatch, _backend("slow", 1.0, runs, delay=SLOW), _backend("fast", 2.0, runs))
    q, k, v = _qkv()
    spec = am.causal() & am.sliding_window(3)
    want = _expected(q, k, v, spec)
    with am.autotune():
        out = am.attention(q, k, v, spec)
        assert runs == ["slow"]  # a key seen once: the estimates decide, nothing timed
        runs.clear()
        out2 = am.attention(q, k, v, spec)
        assert runs.count("slow") >= 4 and runs.count("fast") >= 4 and runs[-1] == "fast"
        runs.clear()
        out3 = am.attention(q, k, v, spec)
        assert runs == ["fast"]
        (choice,) = tuning.results()
        assert (choice.estimated, choice.picked) == ("slow", "fast")
        assert [name for name, _ in choice.times_ms] == ["fast", "slow"]
        explained = am.explain(q, k, v, spec)
        assert explained.picked == "fast" and explained.measured == choice
        assert "measured: fast" in str(explained) and "the estimates pick slow" in str(explained)
    for got in (out, out2, out3):
        torch.testing.assert_close(got, want)
    runs.clear()
    am.attention(q, k, v, spec)  # tuning off again: the estimates' pick
    assert runs == ["slow"]


def test_tuning_is_off_unless_asked(monkeypatch):
    runs: list[str] = []
    _registry(monkeypatch, _backend("slow", 1.0, runs, delay=SLOW), _backend("fast", 2.0, runs))
    q, k, v = _qkv()
    for _ in range(3):
        am.attention(q, k, v, am.causal())
    assert runs == ["slow"] * 3 and tuning.results() == ()
    assert tuning.settings().enabled is False


def test_a_gradient_call_is_timed_forward_and_backward_without_touching_the_callers_graph(monkeypatch):
    runs: list[str] = []
    _registry(monkeypatch, _backend("slow", 1.0, runs, delay=SLOW), _backend("fast", 2.0, runs))
    spec = am.causal()
    q, k, v = _qkv(grad=True)
    q0, k0, v0 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    _expected(q0, k0, v0, spec).square().sum().backward()
    with am.autotune():
        for _ in range(2):
            out = am.attention(q, k, v, spec)
            assert q.grad is None and k.grad is None and v.grad is None  # trials ran on detached copies
        out.square().sum().backward()
    assert tuning.results()[0].picked == "fast"
    for got, want in ((q.grad, q0.grad), (k.grad, k0.grad), (v.grad, v0.grad)):
        torch.testing.assert_close(got, want)


def test_tuning_leaves_the_random_stream_alone_and_does_not_tune_dropout(monkeypatch):
    runs: list[str] = []
    _registry(monkeypatch, _backend("slow", 1.0, runs, delay=SLOW), _backend("fast", 2.0, runs))
    q, k, v = _qkv()
    with am.autotune():
        before = torch.get_rng_state()
        for _ in range(2):
            am.attention(q, k, v, am.causal())
        assert torch.equal(torch.get_rng_state(), before)
        tuning.clear()
        runs.clear()
        for _ in range(3):
            am.attention(q, k, v, am.causal(), dropout_p=0.5)
    assert runs == ["slow"] * 3 and tuning.results() == ()


def test_a_candidate_that_raises_in_a_trial_is_dropped_and_logged(monkeypatch, caplog):
    runs: list[str] = []
    _registry(monkeypatch, _backend("ok", 1.0, runs), _backend("broken", 1.5, runs, fails=True))
    q, k, v = _qkv()
    with am.autotune(), caplog.at_level(logging.WARNING, logger="attnmask"):
        for _ in range(3):
            torch.testing.assert_close(am.attention(q, k, v, am.causal()), _expected(q, k, v, am.causal()))
    assert runs.count("broken") == 1  # its warm-up; never timed again, never run for the caller
    (choice,) = tuning.results()
    assert choice.picked == "ok" and [name for name, _ in choice.times_ms] == ["ok"]
    assert any("'broken' raised in a timed trial" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("fast_time, picked", [(0.99, "first"), (0.95, "second")])
def test_the_estimates_pick_stays_unless_another_is_faster_by_the_margin(monkeypatch, fast_time, picked):
    runs: list[str] = []
    _registry(monkeypatch, _backend("first", 1.0, runs), _backend("second", 1.2, runs))
    seconds = {"first": 1.0, "second": fast_time}
    monkeypatch.setattr(tuning, "_timed", lambda backend, call, grad_out: seconds[backend.name])
    q, k, v = _qkv()
    with am.autotune(margin=0.03):
        for _ in range(2):
            am.attention(q, k, v, am.causal())
    assert tuning.results()[0].picked == picked


def test_one_kind_of_call_spans_batches_of_other_documents_and_lengths_but_not_other_structures(monkeypatch):
    runs: list[str] = []
    _registry(monkeypatch, _backend("a", 1.0, runs), _backend("b", 1.5, runs))
    key = _keys_of(monkeypatch)
    q6, q7 = _qkv(L=6), _qkv(L=7)
    first = key(*q6, am.causal() & am.document(seq_lens=[2, 4]))
    assert first == key(*q6, am.causal() & am.document(seq_lens=[3, 3]))  # new documents: the same kind
    assert first == key(*q7, am.causal() & am.document(seq_lens=[3, 4]))  # 6 and 7 tokens: both round up to 8
    assert first != key(*q6, am.causal() & am.sliding_window(2))
    assert key(*q6, am.sliding_window(2)) != key(*q6, am.sliding_window(3))
    assert first != key(*_qkv(L=9), am.causal() & am.document(seq_lens=[4, 5]))


def _keys_of(monkeypatch):
    def key(q, k, v, spec):
        call = A._prepare_call(q, k, v, spec, None, None, None)
        ranked, _ = A._ranked(call, tuple(A._BACKENDS.values()))
        return tuning.tuning_key(call, ranked, 2, False)

    return key


def test_a_second_batch_of_the_same_kind_is_the_one_timed(monkeypatch):
    runs: list[str] = []
    _registry(monkeypatch, _backend("slow", 1.0, runs, delay=SLOW), _backend("fast", 2.0, runs))
    q, k, v = _qkv()
    with am.autotune():
        am.attention(q, k, v, am.causal() & am.document(seq_lens=[2, 4]))
        am.attention(q, k, v, am.causal() & am.document(seq_lens=[3, 3]))
        runs.clear()
        am.attention(q, k, v, am.causal() & am.document(seq_lens=[1, 5]))
    assert runs == ["fast"]


def test_settings_are_checked_and_restored():
    before = tuning.settings()
    with am.autotune(rounds=5) as now:
        assert now.enabled and now.rounds == 5 and tuning.settings() == now
    assert tuning.settings() == before
    for kwargs, name in (
        ({"candidates": 1}, "candidates"),
        ({"rounds": 0}, "rounds"),
        ({"spread": 1.0}, "spread"),
        ({"margin": 1.5}, "margin"),
        ({"enabled": "yes"}, "enabled"),
        ({"cache": 3}, "cache"),
        ({"cache": ""}, "cache"),
    ):
        with pytest.raises(am.InputError, match=name):
            am.autotune(**kwargs)
    assert tuning.settings() == before


@pytest.mark.parametrize("value, enabled", [("1", True), ("on", True), ("0", False), ("", False), ("off", False)])
def test_the_environment_switches_it_on(monkeypatch, value, enabled):
    monkeypatch.setenv("ATTNMASK_AUTOTUNE", value)
    assert tuning._from_environment().enabled is enabled


def test_the_environment_names_the_cache_file(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNMASK_AUTOTUNE_CACHE", str(tmp_path / "tuning.json"))
    assert tuning._from_environment().cache == str(tmp_path / "tuning.json")
    monkeypatch.setenv("ATTNMASK_AUTOTUNE_CACHE", "")
    assert tuning._from_environment().cache is None


def test_an_unknown_environment_value_is_an_error(monkeypatch):
    monkeypatch.setenv("ATTNMASK_AUTOTUNE", "maybe")
    with pytest.raises(am.InputError, match="ATTNMASK_AUTOTUNE.*'maybe'"):
        tuning._from_environment()


@pytest.mark.parametrize(
    "spec",
    [
        am.causal() & am.sliding_window(256),
        am.causal() & am.document(seq_lens=[100, 300, 200, 424]),
        am.causal() & am.chunked(128),
    ],
    ids=["window", "documents", "chunked"],
)
def test_the_built_in_backends_tuned_give_the_reference_result_and_gradients(spec):
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 1024, 16, requires_grad=True) for _ in range(3))
    dense = spec.to_dense(1024).unsqueeze(1)
    q0, k0, v0 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    want = naive_attention(q0, k0, v0, dense).to(q.dtype)
    want.square().sum().backward()
    with am.autotune(spread=10.0):  # a wide spread: several built-in backends are timed at any thread count
        for _ in range(3):
            for t in (q, k, v):
                t.grad = None
            out = am.attention(q, k, v, spec)
            out.square().sum().backward()
            torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
            for got, exp in ((q.grad, q0.grad), (k.grad, k0.grad), (v.grad, v0.grad)):
                torch.testing.assert_close(got, exp, atol=2e-5, rtol=1e-4)
    (choice,) = tuning.results()
    assert len(choice.times_ms) >= 2  # several built-in backends were timed


def test_a_transformers_model_tuned_gives_each_packed_document_its_logits_and_gradients_alone():
    pytest.importorskip("transformers")
    from tests.hf_models import alone, model, packed_batch, tokens

    docs = [tokens(40 + 3 * i, 60 + i) for i in range(12)]  # 642 tokens: not small rows, so "auto" compares costs
    batch = packed_batch([docs], length=660)
    m = model("llama")
    with am.autotune(spread=10.0):
        for _ in range(2):  # layer 2 of the first forward is the first repeat of its kind: timed there
            logits = m(**batch).logits
            start = 0
            for d in docs:
                torch.testing.assert_close(logits[0, start : start + len(d)], alone("llama", d), atol=1e-4, rtol=0)
                start += len(d)
        assert tuning.results(), "no call was tuned"
        tuned = _training_gradients(m, batch)
        assert any(choice.key[2] for choice in tuning.results()), "no call needing a gradient was tuned"
    with am.autotune(False):
        untuned = _training_gradients(m, batch)
    for a, b in zip(tuned, untuned, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_deterministic_algorithms_are_not_tuned(monkeypatch):
    runs: list[str] = []
    _registry(monkeypatch, _backend("slow", 1.0, runs, delay=SLOW), _backend("fast", 2.0, runs))
    q, k, v = _qkv()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with am.autotune():
            for _ in range(3):
                am.attention(q, k, v, am.causal())
    finally:
        torch.use_deterministic_algorithms(before)
    assert runs == ["slow"] * 3 and tuning.results() == ()


def _training_gradients(m, batch) -> list[torch.Tensor]:
    """The parameters' gradients of one training-mode step on ``batch`` (the model left in eval mode, no grads)."""
    m.train()
    try:
        m.zero_grad()
        (m(**batch, labels=batch["input_ids"]).logits.square().mean()).backward()
        return [p.grad.clone() for p in m.parameters()]
    finally:
        m.eval()
        m.zero_grad()


def test_calls_under_a_functorch_transform_are_not_tuned(monkeypatch, caplog):
    runs: list[str] = []
    under_vmap = {"transforms": frozenset({"vmap"})}  # declared: run inside torch.func.vmap (Backend.transforms)
    slow, fast = _backend("slow", 1.0, runs, delay=SLOW), _backend("fast", 2.0, runs)
    _registry(monkeypatch, dataclasses.replace(slow, **under_vmap), dataclasses.replace(fast, **under_vmap))
    _, k, v = _qkv()
    spec = am.causal()
    with am.autotune(), caplog.at_level(logging.WARNING, logger="attnmask"):
        for _ in range(3):
            batched = torch.func.vmap(lambda q: am.attention(q, k, v, spec), in_dims=0)
            out = batched(torch.randn(2, 1, 2, 6, 4))
    assert out.shape == (2, 1, 2, 6, 4)
    assert set(runs) == {"slow"} and tuning.results() == () and not caplog.records


def test_a_candidate_whose_scratch_passes_the_picks_by_the_cap_is_not_timed(monkeypatch):
    runs: list[str] = []
    roomy = dataclasses.replace(_backend("roomy", 1.5, runs), scratch_bytes=lambda call: tuning.TRIAL_SCRATCH_BYTES + 1)
    _registry(monkeypatch, _backend("slow", 1.0, runs, delay=SLOW), _backend("fast", 2.0, runs), roomy)
    q, k, v = _qkv()
    with am.autotune():
        for _ in range(3):
            am.attention(q, k, v, am.causal())
    assert "roomy" not in runs
    assert [name for name, _ in tuning.results()[0].times_ms] == ["fast", "slow"]


@pytest.mark.parametrize("length, timed", [(1024, True), (32768, False)])
def test_sdpa_with_a_dense_mask_is_timed_only_while_its_mask_is_small(length, timed):
    from attnmask.backends import blocksparse, sdpa

    q, k, v = (torch.zeros(1, 1, length, 8) for _ in range(3))
    padding = torch.ones(1, length, dtype=torch.long)
    padding[0, 5] = (
        0  # a padding key inside the row: a mask (padding that pads nothing, or only at an end, runs without)
    )
    spec = am.causal() & am.key_padding(padding)
    call = A._prepare_call(q, k, v, spec, None, None, None)
    assert sdpa.BACKEND.scratch_bytes(call) == length * length  # one bool per pair
    close = tuning.candidates(call, [(blocksparse.BACKEND, 1.0), (sdpa.BACKEND, 1.5)], 3.0, 4)
    assert ("sdpa" in [b.name for b, _ in close]) is timed
    plain = A._prepare_call(q, k, v, am.causal(), None, None, None)
    assert sdpa.BACKEND.scratch_bytes(plain) == 0  # is_causal: no mask


def test_a_repeated_spec_works_out_its_tuning_key_once(monkeypatch):
    runs: list[str] = []
    _registry(monkeypatch, _backend("slow", 1.0, runs, delay=SLOW), _backend("fast", 2.0, runs))
    made = []
    real_key = tuning.tuning_key
    monkeypatch.setattr(tuning, "tuning_key", lambda *args: made.append(1) or real_key(*args))
    q, k, v = _qkv()
    spec = am.causal() & am.sliding_window(3)
    with am.autotune():
        for _ in range(5):
            am.attention(q, k, v, spec)
    assert len(made) == 1 and runs[-1] == "fast"


def test_the_trainer_example_trains_under_autotune_to_the_untuned_loss():
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    examples_dir = str(Path(__file__).resolve().parents[1] / "examples")
    sys.path.insert(0, examples_dir)
    try:
        trainer_example = importlib.import_module("hf_trainer_packed")
        argv = ["--steps", "4", "--micro-batch", "8", "--max-length", "640"]  # rows past the stock small-row path
        untuned = trainer_example.main(argv)
        with am.autotune(spread=10.0):
            tuned = trainer_example.main(argv)
            assert tuning.results(), "no attention call of the Trainer was tuned"
    finally:
        sys.path.remove(examples_dir)
    assert tuned == pytest.approx(untuned, rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# The cache file: measured choices kept across processes


def _tune_once(monkeypatch, cache, runs):
    """Register a slow estimates' pick and a fast rival, and make one kind of call twice (the second is timed)."""
    _registry(monkeypatch, _backend("slow", 1.0, runs, delay=SLOW), _backend("fast", 2.0, runs))
    q, k, v = _qkv()
    spec = am.causal() & am.sliding_window(3)
    with am.autotune(cache=cache):
        am.attention(q, k, v, spec)
        am.attention(q, k, v, spec)
    return q, k, v, spec


def test_a_cache_file_keeps_the_measured_choice_for_the_next_process(monkeypatch, tmp_path):
    import json

    cache, runs = tmp_path / "tuning.json", []
    q, k, v, spec = _tune_once(monkeypatch, cache, runs)
    data = json.loads(cache.read_text())
    assert data["format"] == tuning.CACHE_FORMAT and data["machine"] == tuning._machine()
    ((name, record),) = data["choices"].items()
    assert record["picked"] == "fast" and record["estimated"] == "slow" and "SlidingWindow" in name
    tuning.clear()  # what a new process holds: nothing but the file
    runs.clear()
    with am.autotune(cache=cache):
        out = am.attention(q, k, v, spec)  # the kind's first call here: from the file, nothing timed
        assert runs == ["fast"]
        assert am.explain(q, k, v, spec).measured.picked == "fast"
    torch.testing.assert_close(out, _expected(q, k, v, spec))
    runs.clear()
    with am.autotune():  # without the cache the process knows only what it measured (the file's choice is held now)
        tuning.clear()
        am.attention(q, k, v, spec)
        assert runs == ["slow"]


def test_a_cache_of_another_machine_or_version_is_not_used_and_is_rewritten(monkeypatch, tmp_path, caplog):
    import json

    cache, runs = tmp_path / "tuning.json", []
    q, k, v, spec = _tune_once(monkeypatch, cache, runs)
    data = json.loads(cache.read_text())
    data["machine"] = {**data["machine"], "torch": "0.0"}
    cache.write_text(json.dumps(data))
    tuning.clear()
    runs.clear()
    with am.autotune(cache=cache), caplog.at_level(logging.INFO, logger="attnmask"):
        am.attention(q, k, v, spec)
        assert runs == ["slow"]  # not from the file: seen once, the estimates decide
        assert "written on" in caplog.text
        am.attention(q, k, v, spec)  # timed again, and the file rewritten for this machine
    assert json.loads(cache.read_text())["machine"] == tuning._machine()


def test_a_broken_cache_is_logged_and_replaced_never_fatal(monkeypatch, tmp_path, caplog):
    import json

    cache, runs = tmp_path / "tuning.json", []
    cache.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="attnmask"):
        _tune_once(monkeypatch, cache, runs)
    assert "cannot read the tuning cache" in caplog.text
    assert len(json.loads(cache.read_text())["choices"]) == 1
    unwritable = tmp_path / "missing-folder" / "tuning.json"
    tuning.clear()
    with caplog.at_level(logging.WARNING, logger="attnmask"):
        _tune_once(monkeypatch, unwritable, runs)  # still tuned in memory
    assert "cannot write the tuning cache" in caplog.text and len(tuning.results()) == 1
    assert not list(tmp_path.glob("**/*.tmp"))


def test_choices_for_a_custom_predicate_are_not_written(monkeypatch, tmp_path):
    cache, runs = tmp_path / "tuning.json", []
    _registry(monkeypatch, _backend("slow", 1.0, runs, delay=SLOW), _backend("fast", 2.0, runs))
    q, k, v = _qkv()
    spec = am.causal() & am.custom(lambda b, h, qi, ki: (qi - ki) < 3)
    with am.autotune(cache=cache):
        am.attention(q, k, v, spec)
        am.attention(q, k, v, spec)
    assert len(tuning.results()) == 1 and not cache.exists()


def test_a_second_process_runs_the_choice_the_first_measured(tmp_path):
    """Two Python processes with ATTNMASK_AUTOTUNE=1 and one cache file: the second's first call of the kind uses the
    choice the first measured (a single call of a new kind is never timed, so a choice held after it came from the
    file)."""
    import os
    import subprocess
    import sys

    script = (
        "import torch, attnmask as am\n"
        "from attnmask import tuning\n"
        "torch.manual_seed(0)\n"
        "q, k, v = (torch.randn(1, 4, 1024, 64) for _ in range(3))\n"
        "spec = am.causal() & am.sliding_window(64)\n"
        "for _ in range(int(__import__('sys').argv[1])):\n"
        "    am.attention(q, k, v, spec)\n"
        "print([c.picked for c in tuning.results()])\n"
    )
    env = {**os.environ, "ATTNMASK_AUTOTUNE": "1", "ATTNMASK_AUTOTUNE_CACHE": str(tmp_path / "tuning.json")}
    first = subprocess.run([sys.executable, "-c", script, "2"], env=env, capture_output=True, text=True, check=True)
    second = subprocess.run([sys.executable, "-c", script, "1"], env=env, capture_output=True, text=True, check=True)
    measured = eval(first.stdout.strip().splitlines()[-1])
    assert len(measured) == 1 and eval(second.stdout.strip().splitlines()[-1]) == measured
