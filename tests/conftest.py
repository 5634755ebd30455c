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
