import importlib
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Two cores, two xdist workers: one intra-op thread each avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

settings.register_profile(
    "attnmask", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "attnmask"))

# `make deep`: ATTNMASK_DEEP=N runs every property test with N times its examples from random seeds (hypothesis prints
# a failure's seed; `--hypothesis-seed` replays it). Runs of this kind found a strided cache read as garbage by a
# fused op and a NaN row read as empty, each a case the fixed seeds never drew.
DEEP = int(os.environ.get("ATTNMASK_DEEP", "0") or 0)


def pytest_collection_modifyitems(items):
    if DEEP <= 0:
        return
    for item in items:
        test = getattr(item, "obj", None)
        found = getattr(test, "_hypothesis_internal_use_settings", None)
        if found is not None:
            test._hypothesis_internal_use_settings = settings(
                found, max_examples=found.max_examples * DEEP, derandomize=False, deadline=None
            )


# `make test` sets ATTNMASK_STRICT_DEPS=1: there every dependency is installed, so a missing import must fail the run
# rather than quietly skip the tests that compare with transformers, TRL or datasets.
if os.environ.get("ATTNMASK_STRICT_DEPS") == "1":

    def _import_or_fail(modname, minversion=None, reason=None, **kwargs):
        return importlib.import_module(modname)

    pytest.importorskip = _import_or_fail


@pytest.fixture(scope="module")
def tiny_llama():
    """The shared tiny random-weight Llama (tests/hf_models.py), with transformers' sdpa attention."""
    return pytest.importorskip("tests.hf_models").model("llama", "sdpa")


# The backends use fewer intra-op threads while other processes hold cores (backends._workers.free_cores); the suite's
# other xdist worker is such a process. Tests of thread counts must not depend on that: the adaptation is off here
# and switched on, with a scripted load, by the tests of it (tests/test_contention.py).
from attnmask.backends import _workers  # noqa: E402

_workers.ADAPT = False


_KIND_MODULES = ("sdpa", "native", "varlen", "blocksparse", "banded")


@pytest.fixture(autouse=True)
def _cpu_kind_constants_put_back():
    """After every test, each constant a backend module sets by the CPU's kind (its ``CPU_KIND_VALUES``) holds this
    CPU's value again: a test that patches one inside a block that sets another kind's (``bench_limit.on_cpu_kind``)
    must put it back inside that block, or every later test in the worker runs with the other CPU's estimates."""
    yield
    from attnmask.backends import _common

    left = []
    for name in _KIND_MODULES:
        module = importlib.import_module(f"attnmask.backends.{name}")
        for constant, values in getattr(module, "CPU_KIND_VALUES", {}).items():
            held, expected = getattr(module, constant), _common.per_cpu_kind(values)
            if held != expected:
                left.append(f"{name}.{constant} left at {held!r} (this CPU's: {expected!r})")
                setattr(module, constant, expected)  # put back: the failure is this test's, not the next ones'
    assert not left, "; ".join(left)
