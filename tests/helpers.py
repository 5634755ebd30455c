"""Helpers shared by the attention test files: inputs, tolerances and comparisons with the naive float64 reference.

Test files import from here (and from ``naive.py`` and ``strategies.py``), never from one another.
"""

import collections
import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

import attnmask as am
from attnmask import masks as M
from attnmask.attention import AttentionCall
from attnmask.backends import REGISTRY, _clib, _common
from tests.naive import naive_attention

LOW_PRECISION = [torch.bfloat16, torch.float16]
CPU_BACKENDS = [b.name for b in REGISTRY if "cpu" in b.devices and b.auto_on("cpu")] + ["auto"]
"""Every backend "auto" may pick on a CPU, from the registry's declarations, and "auto" itself."""
DTYPES = [torch.float32, *LOW_PRECISION]
# (atol, rtol) of an output against the float64 reference of the same (rounded) inputs.
TOLERANCE = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 1e-4),
    torch.bfloat16: (4e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}
# (atol, rtol) of a gradient against the float64 reference of the same (rounded) inputs.
GRAD_TOLERANCE = {
    torch.float64: (1e-9, 1e-8),
    torch.float32: (1e-4, 1e-3),
    torch.bfloat16: (2.5e-1, 5e-2),
    torch.float16: (2e-2, 1e-2),
}


def make_qkv(case, dtype=torch.float32, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    B, H, Hkv = case["batch"], case["heads"], case["kv_heads"]
    Q, K, D, Dv = case["q_len"], case["kv_len"], case["head_dim"], case["value_dim"]
    tensors = [
        torch.randn(B, H, Q, D, generator=gen),
        torch.randn(B, Hkv, K, D, generator=gen),
        torch.randn(B, Hkv, K, Dv, generator=gen),
    ]
    return [t.to(dtype).requires_grad_(requires_grad) for t in tensors]


def allowed_of(case):
    """The spec's dense mask as ``(B, 1, Q, K)``, broadcast to the case's batch."""
    dense = case["spec"].to_dense(case["q_len"], case["kv_len"])
    return dense.expand(case["batch"], -1, -1).unsqueeze(1)


def assert_matches_reference(got, want, msg=None):
    """``got`` (any dtype) equals the float64 reference ``want`` within the tolerance of ``got``'s dtype."""
    atol, rtol = TOLERANCE[got.dtype]
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=msg)


def grads(out, inputs, seed=1):
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad((out.double() * weight).sum(), inputs)


def left_padded_problem(dtype):
    """Two rows, the first left-padded by 3: its queries at positions 0-2 see no key under causal & key_padding."""
    attention_mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    case = dict(batch=2, heads=4, kv_heads=2, q_len=6, kv_len=6, head_dim=8, value_dim=8)
    return make_qkv(case, dtype=dtype, requires_grad=True), am.causal() & am.key_padding(attention_mask)


def check_against_naive(out_fn, case, spec, dtype, batch_allowed=None):
    """``out_fn(q, k, v)`` equals naive attention under ``spec`` in outputs and in gradients of q, k and v."""
    q, k, v = make_qkv(case, dtype=dtype, requires_grad=True)
    allowed = spec.to_dense(case["q_len"], case["kv_len"]) if batch_allowed is None else batch_allowed
    allowed = allowed.expand(case["batch"], -1, -1).unsqueeze(1)
    got = out_fn(q, k, v)
    assert got.dtype == dtype and got.shape == (case["batch"], case["heads"], case["q_len"], case["value_dim"])
    want = naive_attention(q, k, v, allowed)
    assert_matches_reference(got, want, msg=repr(spec))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want_grads = grads(naive_attention(q64, k64, v64, allowed), (q64, k64, v64))
    atol, rtol = GRAD_TOLERANCE[dtype]
    for name, g, w in zip("qkv", grads(got, (q, k, v)), want_grads, strict=True):
        torch.testing.assert_close(g.double(), w, atol=atol, rtol=rtol, msg=f"d{name} for {spec!r}")


def attention_or_skip(q, k, v, mask, backend, **kwargs):
    """``am.attention(..., backend=backend)``, or a pytest skip when the backend refuses the call through its
    declarations (``am.explain`` shows no cost for it)."""
    if backend != "auto":
        seen = am.explain(q, k, v, mask, **kwargs)
        reasons = dict(zip(seen.backends, seen.reasons, strict=True))[backend]
        if reasons:
            pytest.skip(f"{backend} refuses: {'; '.join(reasons)}")
    return am.attention(q, k, v, mask, backend=backend, **kwargs)


def call_of(q, k, v, spec, positions_given=False):
    """An ``AttentionCall`` at the default (bottom-right) positions, built without ``attention``'s checks."""
    pos = torch.arange(k.shape[2])
    return AttentionCall(q, k, v, spec, q.shape[-1] ** -0.5, pos[-q.shape[2] :], pos, positions_given)


def tiny_documents(n_docs, seed=0, low=4, high=12):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (n_docs,), generator=gen).tolist()


def spec_doc_ids(spec):
    return next(p for p in spec.walk() if isinstance(p, M.Document)).doc_ids


def bench_limit():
    """``benchmarks/bench_limit.py`` as the module ``bench_limit`` (its dataclasses resolve through sys.modules)."""
    if "bench_limit" not in sys.modules:
        script = Path(__file__).parents[1] / "benchmarks" / "bench_limit.py"
        spec = importlib.util.spec_from_file_location("bench_limit", script)
        sys.modules["bench_limit"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["bench_limit"])
    return sys.modules["bench_limit"]


@contextlib.contextmanager
def counted_in(where: str):
    """Planning's counts and packed rows' segments in C (``segattn.c``: the library must be built) or in their
    numpy / torch forms (the library reported missing, as without a compiler or with ``ATTNMASK_NATIVE=0``)."""
    if where == "c":
        if isinstance(_clib.library(), str):
            if os.environ.get("ATTNMASK_STRICT_DEPS") == "1":
                raise RuntimeError(f"the C library is unavailable: {_clib.library()}")
            pytest.skip(_clib.library())
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_clib, "library", lambda: "switched off by the test")
        yield


def general_plan(call):
    """The general path: ``lowering.varlen_args`` and ``segments_from_varlen``, checked: ``(segments, causal,
    window)`` or why not."""
    args = _common.call_varlen_args(call)
    if isinstance(args, str):
        return args
    segs = _common.segments_from_varlen(args, call.batch, call.q_len, call.kv_len, call.mask.batch_size or 1)
    window = None if args.window_size[0] < 0 else args.window_size[0] + 1
    return _common.check_segments(segs, call.q, call.k, call.v).tolist(), args.causal, window


def graph_nodes(out: torch.Tensor) -> collections.Counter:
    """How many autograd nodes of each kind (``node.name()``) ``out``'s backward runs, each node once."""
    seen, stack, names = set(), [out.grad_fn], collections.Counter()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names[node.name()] += 1
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def row_cuts(backend: str, spec_of_rows, rows: int) -> int:
    """The slice and select nodes in the backward of ``backend`` on ``rows`` batch rows of ``spec_of_rows(rows)``
    (one thread): each such node allocates a zero tensor of its whole source for the gradient of its piece."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = spec_of_rows(rows)
        q = torch.randn(rows, 4, 256, 16, requires_grad=True)
        k, v = (torch.randn(rows, 2, 256, 16, requires_grad=True) for _ in range(2))
        nodes = graph_nodes(am.attention(q, k, v, spec, backend=backend))
    finally:
        torch.set_num_threads(before)
    return nodes["SliceBackward0"] + nodes["SelectBackward0"]
