"""Attention inside functorch transforms (``torch.func.grad``, ``vmap``): a backend runs there only where it declares
the transform (``Backend.transforms``); ``"auto"`` chooses among those, and every other call is refused with a
``BackendError`` naming the transform, before any check that reads values. Gradients under ``torch.func.grad`` equal
autograd's outside it."""

from __future__ import annotations

import importlib

import pytest
import torch

import attnmask as am
from attnmask.backends.contract import TRANSFORMS, active_transforms
from attnmask.errors import BackendError

A = importlib.import_module("attnmask.attention")  # the module; `attnmask.attention` is the function


def _padded_documents(batch: int = 2, length: int = 24) -> am.MaskSpec:
    ids = torch.zeros(batch, length, dtype=torch.long)
    ids[:, length // 2 :] = 1
    ids[:, length - 5 :] = -1  # padding: rows with no key
    return am.causal() & am.document(doc_ids=ids)


MASKS = {
    "none": lambda: None,
    "causal": am.causal,
    "window": lambda: am.causal() & am.sliding_window(5),
    "padded documents": _padded_documents,
    "bool tensor": lambda: torch.rand(2, 1, 24, 24, generator=torch.Generator().manual_seed(0)) > 0.3,
}


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, h, 24, 8, generator=gen) for h in (4, 2, 2))


@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference"])
@pytest.mark.parametrize("mask", list(MASKS))
def test_gradients_under_torch_func_grad_equal_autograds(backend, mask):
    spec = MASKS[mask]()
    q, k, v = _inputs()
    weight = torch.randn(2, 4, 24, 8, generator=torch.Generator().manual_seed(1))

    def loss(q, k, v):
        return (am.attention(q, k, v, spec, backend=backend) * weight).sum()

    inside = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    outside = torch.autograd.grad(loss(*leaves), leaves)
    for name, a, b in zip("qkv", inside, outside, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"d{name}")


def test_a_nan_query_with_no_key_has_no_gradient_under_torch_func_grad():
    spec = _padded_documents()
    q, k, v = _inputs()
    dirty = q.clone()
    dirty[:, :, 21, 0] = float("nan")  # a padding row: no allowed key
    for backend in ("sdpa", "reference"):

        def loss(q, k, v, backend=backend):
            return am.attention(q, k, v, spec, backend=backend).sum()

        grads = torch.func.grad(loss, (0, 1, 2))(dirty, k, v)
        assert all(bool(torch.isfinite(g).all()) for g in grads), backend
        assert not grads[0][:, :, 19:].any(), backend


@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference", "native", "varlen"])
def test_vmap_is_refused_by_name(backend):
    q, k, v = _inputs()
    with pytest.raises(BackendError, match="vmap"):
        torch.func.vmap(lambda q: am.attention(q, k, v, am.causal(), backend=backend))(q[None].repeat(3, 1, 1, 1, 1))


@pytest.mark.parametrize("backend", ["native", "varlen", "blocksparse", "banded"])
def test_a_backend_that_declares_no_transform_is_refused_under_grad(backend):
    q, k, v = _inputs()
    with pytest.raises(BackendError, match=f"'{backend}'.*grad"):
        torch.func.grad(lambda q: am.attention(q, k, v, am.causal(), backend=backend).sum())(q)


def test_the_choice_under_a_transform_is_neither_read_from_nor_left_in_the_plan_cache(monkeypatch):
    """A spec whose ``"auto"`` choice outside is ``native`` (many short documents, forward only): inside
    ``torch.func.grad`` the same spec and shapes go to a backend that runs there, and the choice outside stays."""
    monkeypatch.setattr(A._workers, "contended", lambda: False)
    ids = torch.arange(64).div(8, rounding_mode="floor").expand(4, 64).contiguous()  # documents of 8
    spec = am.causal() & am.document(doc_ids=ids)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 4, 64, 64, generator=gen) for _ in range(3))
    call = A._prepare_call(q, k, v, spec, None, None, None)
    outside = A.choose_backend(call).name
    assert "grad" not in A._BACKENDS[outside].transforms
    picked = []

    def loss(q):
        call = A._prepare_call(q, k, v, spec, None, None, None)
        picked.append(A.choose_backend(call).name)
        return am.attention(q, k, v, spec).sum()

    torch.func.grad(loss)(q)
    assert picked and all("grad" in A._BACKENDS[name].transforms for name in picked)
    assert A.choose_backend(A._prepare_call(q, k, v, spec, None, None, None)).name == outside


def test_transforms_are_read_from_functorchs_stack():
    assert active_transforms() == frozenset()
    seen = []
    torch.func.grad(lambda x: seen.append(active_transforms()) or x.sum())(torch.randn(3))
    torch.func.vmap(lambda x: seen.append(active_transforms()) or x)(torch.randn(2, 3))
    assert seen == [frozenset({"grad"}), frozenset({"vmap"})]
    for backend in A._BACKENDS.values():
        assert backend.transforms <= TRANSFORMS, backend.name
