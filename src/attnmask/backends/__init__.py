"""The attention backends, one module each, and the one registry ``attention(..., backend=...)`` draws from.

``REGISTRY`` lists every built-in backend in priority order: ``"auto"`` picks the cheapest backend that supports a
call (``Backend.not_supported_reasons``), ties going to the earlier one. Adding a backend: one module here that
builds ``BACKEND = Backend(...)`` with its declarations (``contract.py``), and one line below; the conformance tests
(``tests/test_conformance.py``) read this registry. Users' own backends join at run time through
``attnmask.attention.register_backend``.
"""

from attnmask.backends import banded, blocksparse, flex, native, reference, sdpa, varlen
from attnmask.backends.contract import Backend

__all__ = ["REGISTRY"]

REGISTRY: tuple[Backend, ...] = (
    reference.BACKEND,
    sdpa.BACKEND,
    varlen.BACKEND,
    blocksparse.BACKEND,
    banded.BACKEND,
    native.BACKEND,
    flex.BACKEND,
)
