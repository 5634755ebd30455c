"""Every ``>>>`` example in the library's docstrings runs and prints what it shows.

The examples are run as doctests with attnmask's public names, ``attnmask`` and ``torch`` in scope (as a reader of
the docs has them after ``from attnmask import *``); the module's own names are in scope too. An example that only
sketches a use (a training loop, a model, a backend of one's own) is written without the prompt and not run."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import attnmask

MODULES = sorted(m.name for m in pkgutil.walk_packages(attnmask.__path__, "attnmask."))
_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _namespace() -> dict:
    names = {n: getattr(attnmask, n) for n in dir(attnmask) if not n.startswith("_")}
    return {**names, "attnmask": attnmask, "torch": torch}


def _run(name: str) -> doctest.TestResults:
    module = importlib.import_module(name)
    return doctest.testmod(module, extraglobs=_namespace(), optionflags=_FLAGS, report=False, verbose=False)


@pytest.mark.parametrize("name", MODULES)
def test_the_docstring_examples_run_as_shown(name):
    if name == "attnmask.integrations.datasets":
        pytest.importorskip("datasets")
    result = _run(name)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} fail (python -m doctest -v)"


def test_the_examples_are_found():
    """The run above is not empty: the modules hold dozens of examples (41 on 2026-12-06); a change that hid them
    from doctest (e.g. a docstring turned into a comment) shows here."""
    pytest.importorskip("datasets")
    attempted = sum(_run(name).attempted for name in MODULES)
    assert attempted >= 40
